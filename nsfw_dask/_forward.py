"""The head's forward pass into preallocated buffers: no allocation per batch.

``NSFWModel.forward`` allocates every intermediate (a 1,024 x 512 float32 activation is 2 MB,
which glibc serves with a fresh ``mmap`` and page faults on every batch).  ``Runner`` computes
the same operations (``(x - mean) / sqrt(variance)``, then ``addmm`` + ``relu_`` per layer,
``sigmoid``) into buffers it keeps per thread, so the per-batch cost is the arithmetic alone:
on the reference set its scores equal NeMo Curator's bit for bit at any batch size (every batch
is computed as whole 64-row blocks: ``Runner._padded``), and it runs at about twice the module's
rows/s at batch 1,024 on the 2-core CI machine (README, Performance).

Buffers are sized to the largest batch seen (at most ``batch_size``) and grow on demand; runners
are kept per thread in a weak mapping keyed by the model.  They never shrink on their own:
``release_buffers`` (public: ``nsfw_dask.gpu.release_gpu_buffers``) frees them in every thread of
the process, and the next batch allocates them again.
"""

from __future__ import annotations

import math
import threading
import weakref
from typing import Any

import torch

from .exact import CategoricalEncoding, ExactNSFWModel
from .models import NSFWModel

__all__ = ["MIN_ROWS", "ROW_BLOCK", "Runner", "get_runner", "release_buffers"]

#: Every batch is computed as a whole number of ``ROW_BLOCK``-row blocks and at least
#: ``MIN_ROWS`` rows, padding the last one (see ``Runner._padded``): measured here, batches of
#: that shape round exactly like NeMo Curator's at any length and thread count.
ROW_BLOCK = 64
MIN_ROWS = 256

_tls = threading.local()
#: Every runner of the process, whichever thread made it (for ``release_buffers``).
_all_runners: weakref.WeakSet[Runner] = weakref.WeakSet()
_all_lock = threading.Lock()


class Runner:
    """Buffers and pre-transposed weights for one model on one device, in one thread."""

    def __init__(
        self, model: NSFWModel | ExactNSFWModel, device: torch.device, *, impute_eagerly: bool | None = None
    ) -> None:
        # weak: the per-thread mapping is keyed by the model, and a strong reference from its
        # value would keep the model (and these buffers) alive after ``clear_model_cache``
        self._model = weakref.ref(model)
        self.encoding: CategoricalEncoding | None = None
        # Exact mode's NaN -> 0: on CUDA an extra elementwise pass on every batch (no host sync);
        # on CPU only for the rows whose score came out NaN (a NaN input always gives a NaN
        # score), recomputed by a second runner that imputes: no pass over clean data.
        self.impute_eagerly = device.type != "cpu" if impute_eagerly is None else impute_eagerly
        self._imputer: Runner | None = None
        if isinstance(model, ExactNSFWModel):
            self.encoding = model.encoding.to(device)
            model = model.head
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, device
        with torch.inference_mode():
            self.mean = model.norm.mean.to(device)
            self.std = model.norm.variance.sqrt().to(device)
            self.layers = [
                (
                    getattr(model, f"linear_{i}").weight.t().contiguous().to(device),
                    getattr(model, f"linear_{i}").bias.to(device),
                )
                for i in range(1, model.n_linear + 1)
            ]
        self.dim = self.mean.shape[0]
        if self.encoding is not None:
            cols = self.encoding.columns
            self.cat_mean, self.cat_std = self.mean[cols], self.std[cols]
        self.capacity = 0
        self.x_in: torch.Tensor | None = None
        # the normalized batch and each layer's output; allocated by ``_reserve``
        self.x_norm: torch.Tensor | None = None
        self.hidden: list[torch.Tensor] | None = None
        # Host -> CUDA staging (a pandas partition scored with device="cuda"): two pinned buffers
        # used in turn, so the memcpy of batch i+1 into one overlaps the GPU's work on batch i;
        # a float16/float64 batch lands in a device buffer of its own dtype (``_staged``) and is
        # cast there, on the GPU.
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._pinned_done: list[Any] = [None, None]
        self._staged: torch.Tensor | None = None
        self._slot = 0
        self._pad: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
        self._pad_out: torch.Tensor | None = None

    def _reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.x_norm = torch.empty(n, self.dim, **kw)
        self.hidden = [torch.empty(n, w.shape[1], **kw) for w, _ in self.layers]
        self.x_in = None  # allocated only if a batch needs a cast or a move
        self._pinned = [None, None]  # a copy still reading the old ones keeps them (torch's host allocator)
        self._pinned_done = [None, None]
        self._staged = None
        self.capacity = n

    def release(self) -> bool:
        """Drop every work buffer (they are allocated again by the next batch); True if any was held.

        Only while no other thread scores with this runner (``release_buffers`` documents when).
        """
        held = self.capacity > 0 or bool(self._pad) or self._pad_out is not None
        if self.device.type == "cuda" and held:
            # the last batch's kernels may still read them: let them finish before the memory goes
            torch.cuda.current_stream(self.device).synchronize()
        self.capacity = 0
        self.x_in = None
        self.x_norm = self.hidden = None
        self._pinned = [None, None]
        self._pinned_done = [None, None]
        self._staged = None
        self._pad = {}
        self._pad_out = None
        if self._imputer is not None:
            held = self._imputer.release() or held
        return held

    def _padded(self, x: torch.Tensor, out: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        """A batch whose length is not a multiple of ``ROW_BLOCK`` (or is under ``MIN_ROWS``),
        computed padded to one that is.

        BLAS computes the rows of a GEMM in blocks; rows left over after the last full block,
        and short matrices, go through other kernels whose sums round differently in the last
        bits (up to 6e-6 in a score for a 1-row batch, 1e-7 for a tail of a long one), and for
        some short sizes differently per thread count.  A row's score would then depend on how
        many rows shared its batch (a partition's tail) and on the worker's threads.  Padded,
        every row goes through the full-block kernel: scores are bitwise identical whatever the
        batch size, partitioning or thread count (measured here: MKL sgemm, 2-core AVX2 CPU),
        at the cost of at most ``ROW_BLOCK - 1`` extra rows per partition.
        """
        n = x.shape[0]
        m = max(MIN_ROWS, -(-n // ROW_BLOCK) * ROW_BLOCK)
        key = (x.dtype, x.device)
        pad = self._pad.get(key)
        if pad is None or pad.shape[0] < m:
            pad = self._pad[key] = torch.zeros(m, self.dim, dtype=x.dtype, device=x.device)
        if self._pad_out is None or self._pad_out.shape[0] < m:
            self._pad_out = torch.empty(m, dtype=torch.float32, device=self.device)
        pad[:n].copy_(x)
        pad[n:m].zero_()  # rows are independent; zeros keep the padding cheap and finite
        if codes is not None:
            codes = torch.cat([codes, codes.new_zeros(m - n, codes.shape[1])])
        pad_out = self._pad_out[:m]
        self(pad[:m], pad_out, codes)
        out.copy_(pad_out[:n])

    def _stage_to_cuda(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Copy a CPU batch to ``self.x_in`` through pinned memory, asynchronously (CUDA only).

        ``copy_(non_blocking=True)`` from pageable memory is synchronous; from pinned memory it
        is queued on the current stream of ``self.device`` (torch's ``copy_kernel_cuda`` sets the
        destination device, then takes its current stream), so the host moves on to the next
        batch while this one computes.  A pinned buffer is refilled only after the copy that last
        read it has finished: a CUDA event recorded on that same stream (``Event.record()``
        without a stream would record on the *current device's* stream, which is another one when
        ``self.device`` is not the current device).

        The host -> device copy is always between tensors of the same dtype: a cross-device copy
        that also casts makes torch allocate a temporary device tensor on every call (a blocking
        one casts on the CPU instead), so a float16 or float64 batch is copied into ``_staged``,
        a device buffer of its own dtype, and cast into ``x_in`` on the GPU (same stream, so in
        order).  NOT RUN by the authors (no GPU); falls back to a plain copy if pinning fails.
        """
        x_in = self.x_in
        assert x_in is not None  # allocated by ``__call__``, the only caller, just before
        k = self._slot = self._slot ^ 1
        buf = self._pinned[k]
        if buf is None or buf.dtype != x.dtype:
            try:
                buf = self._pinned[k] = torch.empty(self.capacity, self.dim, dtype=x.dtype, pin_memory=True)
            except RuntimeError:  # no pinned memory to be had: the synchronous copy
                return x_in[:n].copy_(x)
            self._pinned_done[k] = None
        done = self._pinned_done[k]
        if done is not None:
            done.synchronize()
        buf[:n].copy_(x)
        if x.dtype == self.dtype:
            staged = x_in[:n].copy_(buf[:n], non_blocking=True)
        else:
            dev = self._staged
            if dev is None or dev.dtype != x.dtype:
                dev = self._staged = torch.empty(self.capacity, self.dim, dtype=x.dtype, device=self.device)
            dev[:n].copy_(buf[:n], non_blocking=True)  # same dtype: a plain cudaMemcpyAsync
            staged = x_in[:n].copy_(dev[:n])  # the cast, a kernel on the same device and stream
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self._pinned_done[k] = ev
        return staged

    def codes(self, x: torch.Tensor) -> torch.Tensor | None:
        """Exact mode: ``(n, k)`` vocabulary indices of ``x``'s categorical columns (else None).

        From the input's own values (a float64 one is looked up before any rounding); computed
        for many batches at once by ``score_tensor``, so the lookup's per-call overhead is paid
        once per chunk of rows rather than per batch.
        """
        return None if self.encoding is None else self.encoding.codes(x)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, codes: torch.Tensor | None = None) -> None:
        """Score ``x`` (``(n, dim)``, any float dtype/device) into ``out`` (``(n,)``).

        ``codes``: exact mode's ``self.codes(x)``, if already computed.
        """
        n = x.shape[0]
        if n and (n < MIN_ROWS or n % ROW_BLOCK):
            self._padded(x, out, codes)
            return
        self._reserve(n)
        x_norm, hidden = self.x_norm, self.hidden
        if x_norm is None or hidden is None:
            # only an empty batch before any other (``score_tensor`` never passes one): no
            # buffers yet; the same error that indexing the missing buffer below used to raise
            raise TypeError("'NoneType' object is not subscriptable")
        src = x
        enc = self.encoding
        eager = enc is not None and self.impute_eagerly
        h = None
        if x.dtype != self.dtype or x.device != self.device:
            if x.device.type == "cpu" and self.device.type == "cuda":
                if self.x_in is None:
                    self.x_in = torch.empty(self.capacity, self.dim, dtype=self.dtype, device=self.device)
                x = self._stage_to_cuda(x, n)
            elif not eager:
                # cast straight into the normalization buffer and subtract in place: the same
                # float32 arithmetic as ``sub(cast, mean)``, one buffer (and one pass) fewer
                h = x_norm[:n].copy_(x, non_blocking=True).sub_(self.mean)
            else:
                x_in = self.x_in
                if x_in is None:
                    x_in = self.x_in = torch.empty(self.capacity, self.dim, dtype=self.dtype, device=self.device)
                x = x_in[:n].copy_(x, non_blocking=True)
        if h is None and eager:  # exact mode: NaN -> 0 (+-inf kept)
            h = torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf, out=x_norm[:n])
            h.sub_(self.mean)
        elif h is None:
            h = torch.sub(x, self.mean, out=x_norm[:n])
        h.div_(self.std)
        if enc is not None:  # the categorical columns: their vocabulary indices, normalized
            if codes is None:
                codes = enc.codes(src)
            codes = codes.to(device=self.device, dtype=self.dtype)
            h[:, enc.columns] = torch.sub(codes, self.cat_mean).div_(self.cat_std)
        last = len(self.layers) - 1
        for i, (w_t, b) in enumerate(self.layers):
            h = torch.addmm(b, h, w_t, out=hidden[i][:n])
            if i < last:
                h.relu_()
        h = h.view(-1)
        if out.dtype == h.dtype and out.device == h.device:
            torch.sigmoid(h, out=out)
        else:
            out.copy_(h.sigmoid_())
        if enc is not None and not self.impute_eagerly:
            nan = torch.isnan(out)
            if bool(nan.any()):  # rows with a NaN input: again, imputing (or NaN/inf for real)
                rows = nan.nonzero().view(-1)
                if self._imputer is None:
                    model = self._model()
                    if model is None:  # pragma: no cover - a caller holds the model while scoring
                        raise RuntimeError("internal error: the model of this runner was freed")
                    self._imputer = Runner(model, self.device, impute_eagerly=True)
                fixed = torch.empty(len(rows), dtype=out.dtype, device=out.device)
                self._imputer(src[rows.to(src.device)], fixed, None if codes is None else codes[rows])
                out[rows] = fixed


def get_runner(model: NSFWModel | ExactNSFWModel, device: torch.device) -> Runner:
    """This thread's runner for ``model`` on ``device``."""
    per_model = getattr(_tls, "runners", None)
    if per_model is None:
        per_model = _tls.runners = weakref.WeakKeyDictionary()
    runners = per_model.setdefault(model, {})
    runner = runners.get(str(device))
    if runner is None:
        runner = runners[str(device)] = Runner(model, device)
        with _all_lock:
            _all_runners.add(runner)
    return runner


def release_buffers(device_type: str | None = None) -> int:
    """Free the work buffers of every runner in the process (of ``device_type`` only, if given).

    Returns how many runners held buffers.  Call it while no scoring runs in the process (a
    runner in use by another thread would lose its buffers mid-batch); the next batch of each
    runner allocates them again.
    """
    with _all_lock:
        runners = list(_all_runners)
    n = 0
    for r in runners:
        if device_type is None or r.device.type == device_type:
            n += bool(r.release())
    return n
