"""The head's forward pass into preallocated buffers: no allocation per batch.

``NSFWModel.forward`` (NeMo Curator's port) computes ``(x - mean) / sqrt(variance)``, then
``Linear`` + ReLU per layer and a sigmoid, allocating every intermediate.  ``Runner`` computes the
same function into buffers it keeps per thread, with one pass fewer over each batch:

* ``x - mean`` is computed per element in float32, into the block buffer (float32 input in one
  pass, ``sub(out=)``; a float16/float64 batch is cast into the buffer first and centred there,
  since torch's mixed-dtype ``sub`` is a slow scalar path on CPU): for CLIP-like embeddings, which
  sit near LAION's mean, this difference is nearly exact, which is why NeMo's port is accurate there;
* the division by ``sqrt(variance)`` is folded into the first layer's weights, computed in
  float64 and rounded once (``W1 / std``): one elementwise pass less;
* then ``addmm`` + ``relu_`` per layer and a sigmoid.

Folding the mean into the bias as well would save the subtraction too, but loses that exactness:
measured on the reference set, the fully folded head is 2x further from a float64 evaluation on
the CLIP-like groups (docs/exact.md, "The contract"), so it is not used.  The scores are within
1e-5 of NeMo Curator's port (its own last bits move by as much with the CPU and the batch size)
and no less accurate against float64 (``tests/test_contract.py``).

Determinism: a row's score never depends on its batch.  On CPU every batch is computed as a
whole number of ``ROW_BLOCK``-row blocks of at least ``MIN_ROWS`` rows, the tail padded
(``Runner.__call__``); on CUDA every forward pass has exactly ``CUDA_BLOCK_ROWS`` rows, since
cuBLAS picks its kernels by shape.

Buffers are sized to the largest batch seen (at most ``batch_size``; on CUDA one block) and grow
on demand; runners are kept per thread in a weak mapping keyed by the model (or the
:class:`HeadSet` of several heads scored together).  They never shrink
on their own: ``release_buffers`` (public: ``nsfw_dask.gpu.release_gpu_buffers``) frees them in
every thread of the process, and the next batch allocates them again.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Sequence
from typing import Any, Protocol, cast

import torch

from .exact import CategoricalEncoding, ExactNSFWModel
from .models import ModelSpec, NSFWModel

__all__ = [
    "CUDA_BLOCK_ROWS",
    "MIN_ROWS",
    "ROW_BLOCK",
    "HeadSet",
    "Runner",
    "check_matmul_precision",
    "get_runner",
    "release_buffers",
]

#: CPU: every batch is computed as a whole number of ``ROW_BLOCK``-row blocks and at least
#: ``MIN_ROWS`` rows, the tail padded.  BLAS computes the rows of a GEMM in blocks; rows left
#: over after the last full block, and short matrices, go through other kernels that round
#: differently in the last bits (up to 6e-6 in a score for a 1-row batch).  And MKL shares a
#: short GEMM among threads differently from a tall one: on its AVX2 code path (AMD EPYC, or
#: ``MKL_ENABLE_INSTRUCTIONS=AVX2``) with 2 threads, 256-row batches of the L/14 head rounded
#: 1,613 of the 2,692 reference rows differently from 1 thread, 1,024 rows and more never did
#: (AVX-512 and SSE4.2 paths: no difference at any size).  Padded to whole blocks of at least
#: 1,024 rows, every row goes through the same arithmetic: bitwise identical scores whatever the
#: batch size, partitioning or thread count (checked by ``tests/test_determinism.py`` and
#: ``tests/test_contract.py`` on every CPU the suite runs on, and again under another MKL code
#: path by ``make test-kernels``), at the cost of at most 63 extra rows per batch of 1,024 rows or
#: more (a shorter batch, e.g. a small partition's, costs what 1,024 rows cost: ~2 ms).
ROW_BLOCK = 64
MIN_ROWS = 1024
#: CUDA: every forward pass has exactly this many rows, the last block of a call padded.
#: cuBLAS chooses tile shapes and split-K by the matrix shape, so a row's last bits would
#: otherwise depend on how many rows shared its batch (measured on an H100: 8.1e-6 between
#: batch shapes).  One shape, one kernel per layer: the batch size and the partitioning no longer
#: matter.  32,768 rows are ~210 MB of float32 buffers and a few ms of work per pass.
CUDA_BLOCK_ROWS = 32_768

_tls = threading.local()
#: Every runner of the process, whichever thread made it (for ``release_buffers``).
_all_runners: weakref.WeakSet[Runner] = weakref.WeakSet()
_all_lock = threading.Lock()


def _fold_first_layer(model: NSFWModel) -> tuple[torch.Tensor, torch.Tensor]:
    """``W1 / std`` (transposed, contiguous) and ``mean``, in the model's dtype.

    The quotient is computed in float64 and rounded once; ``(x - mean) @ (W1 / std).T`` is then
    the normalization and the first layer without the division pass.
    """
    first = model.get_submodule("linear_1")
    assert isinstance(first, torch.nn.Linear)
    std = model.norm.variance.double().sqrt()
    w1 = first.weight.double() / std
    return w1.t().contiguous().to(first.weight.dtype), model.norm.mean.to(first.weight.dtype)


#: The sigmoid runs in place over whole padded blocks, in chunks of this many values: a multiple
#: of 64 and below torch's parallel grain size (32,768), so every value goes through the same
#: vectorized kernel.  torch computes the elements left over after its last full SIMD vector with
#: the scalar ``std::exp``, which rounds differently from the vector ``exp`` (1 ulp on 199 of the
#: 2,692 reference rows for a 1-row batch); a split across threads could leave such a tail anywhere.
SIGMOID_CHUNK = 4096


def _sigmoid_blocks_(h: torch.Tensor) -> None:
    if h.device.type != "cpu":  # a GPU thread computes each element alike
        h.sigmoid_()
        return
    for i in range(0, h.shape[0], SIGMOID_CHUNK):
        h[i : i + SIGMOID_CHUNK].sigmoid_()


def _matmul_precision(device_type: str) -> str:
    """The float32 matmul precision torch applies on ``device_type`` now: ``"ieee"`` (full),
    ``"tf32"`` or ``"bf16"``.  Read from the backend's ``fp32_precision`` (torch >= 2.9), which
    reflects the legacy API (``set_float32_matmul_precision``, ``allow_tf32``) as well as the
    ``fp32_precision`` tree and is what the kernels consult; older torch: the legacy switches."""
    if device_type == "cuda":
        node: Any = torch.backends.cuda.matmul
    elif device_type == "cpu":
        node = getattr(torch.backends.mkldnn, "matmul", None)
    else:
        return "ieee"
    value = getattr(node, "fp32_precision", None)
    if value is not None:
        value = str(value).lower()
        return "ieee" if value in ("none", "ieee") else value
    # torch < 2.9: TF32 on CUDA from allow_tf32; bfloat16 on CPU from "medium"
    if device_type == "cuda":
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return "bf16" if torch.get_float32_matmul_precision() == "medium" else "ieee"


def check_matmul_precision(device: torch.device) -> None:
    """Raise :class:`~nsfw_dask.exceptions.ReducedPrecisionError` if float32 matmuls on
    ``device`` would not run in full float32 (a process-wide torch setting)."""
    prec = _matmul_precision(device.type)
    if prec == "ieee":
        return
    from .exceptions import ReducedPrecisionError

    setting = "torch.backends.cuda.matmul" if device.type == "cuda" else "torch.backends.mkldnn.matmul"
    raise ReducedPrecisionError(
        f"float32 matmuls on {device.type} are set to {prec} in this process ({setting}.fp32_precision, set by "
        f"torch.set_float32_matmul_precision('high'/'medium'), allow_tf32 = True or fp32_precision), which moves "
        f"NSFW scores by up to ~1e-3 (TF32 on a GPU) or 0.07 (bfloat16 on an AMX CPU): call "
        f"torch.set_float32_matmul_precision('highest') before scoring, or score in a process that does not set it"
    )


class HeadSet:
    """Several loaded heads scored together from one read of each batch (:func:`nsfw_dask.loading.load_heads`
    caches one per set of heads, model and device, so its identity keys the per-thread runners)."""

    __slots__ = ("__weakref__", "models", "names")

    def __init__(self, models: Sequence[torch.nn.Module], names: Sequence[str]) -> None:
        self.models = tuple(models)
        self.names = tuple(names)

    def __repr__(self) -> str:
        return f"HeadSet({', '.join(self.names)})"


class _Foldable(Protocol):
    def fold(self) -> tuple[torch.Tensor, float]: ...


def _spec_of(m: torch.nn.Module) -> ModelSpec:
    spec = getattr(m, "spec", None)
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"internal error: {type(m).__name__} has no ModelSpec")
    return spec


def _modules(models: Any) -> list[torch.nn.Module]:
    if isinstance(models, HeadSet):
        return list(models.models)
    if isinstance(models, torch.nn.Module):
        return [models]
    return list(models)


class Runner:
    """Buffers and folded, pre-transposed weights for a set of heads on one device, in one thread.

    At most one NSFW head (NeMo's port or exact mode) and any number of linear heads (the aesthetic
    predictors, folded to one dot product each).  Every batch is read and prepared once: cast into
    the block buffer, each row's norm taken while it is in cache, the linear heads scored from it
    (one ``(rows, dim) x (dim, 1)`` product per head), then the NSFW head's forward on the same buffer.
    """

    def __init__(self, models: Any, device: torch.device, *, impute_eagerly: bool | None = None) -> None:
        from .heads import HEADS

        mods = _modules(models)
        # weak: the per-thread mapping is keyed by the model (or head set), and a strong reference
        # from its value would keep the models (and these buffers) alive after ``clear_model_cache``
        self._models = [weakref.ref(m) for m in mods]
        self.n_out = len(mods)
        nsfw = [(i, m) for i, m in enumerate(mods) if isinstance(m, (NSFWModel, ExactNSFWModel))]
        lin = [(i, m) for i, m in enumerate(mods) if (i, m) not in nsfw]
        if len(nsfw) > 1 or any(not callable(getattr(m, "fold", None)) for _, m in lin):
            raise TypeError(f"internal error: cannot score {[type(m).__name__ for m in mods]} together")
        specs = [_spec_of(m) for m in mods]
        dims = {sp.dim for sp in specs}
        if len(dims) != 1:
            raise ValueError(f"heads of different embedding widths cannot share a batch: {sorted(dims)}")
        self.dim = dims.pop()
        self.device = device
        self.dtype = next(iter(mods[0].parameters())).dtype
        self.encoding: CategoricalEncoding | None = None
        # Exact mode's NaN -> 0: on CUDA an extra elementwise pass on every batch (no host sync);
        # on CPU only for the rows whose score came out NaN (a NaN input always gives a NaN
        # score), recomputed by a second runner that imputes: no pass over clean data.
        self.impute_eagerly = device.type != "cpu" if impute_eagerly is None else impute_eagerly
        self._imputer: Runner | None = None
        self.nsfw_pos: int | None = nsfw[0][0] if nsfw else None
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        with torch.inference_mode():
            if nsfw:
                model = nsfw[0][1]
                if isinstance(model, ExactNSFWModel):
                    self.encoding = model.encoding.to(device)
                    model = model.head
                w1_t, mean = _fold_first_layer(model)
                self.mean = mean.to(device)
                self.layers = [(w1_t.to(device), model.get_parameter("linear_1.bias").to(device))] + [
                    (
                        getattr(model, f"linear_{i}").weight.t().contiguous().to(device),
                        getattr(model, f"linear_{i}").bias.to(device),
                    )
                    for i in range(2, model.n_linear + 1)
                ]
                if self.encoding is not None:
                    self.cat_mean = self.mean[self.encoding.columns]
            # The linear heads: each one affine map (folded in float64, rounded once): one dot
            # product per row on the prepared block.
            self.lin_pos = [i for i, _ in lin]
            self.lin_w: torch.Tensor | None = None
            if lin:
                folded = [cast(_Foldable, m).fold() for _, m in lin]
                self.lin_w = torch.stack([w for w, _ in folded], dim=1).to(self.dtype).contiguous().to(device)
                self.lin_cols = [self.lin_w[:, j : j + 1].contiguous() for j in range(len(folded))]
                self.lin_b = torch.tensor([b for _, b in folded], dtype=torch.float64).to(self.dtype).to(device)
                # a zero vector: upstream v2 replaces the zero norm by 1 (its score is the bias),
                # v1 divides by it (0/0: NaN)
                self.lin_zero_to_one = torch.tensor(
                    [HEADS[_spec_of(m).head].zero_norm == "bias" for _, m in lin], device=device
                )
        # CUDA: one forward shape for every pass (``CUDA_BLOCK_ROWS``); CPU: whole 64-row blocks
        self.block = CUDA_BLOCK_ROWS if device.type == "cuda" else None
        self.capacity = 0
        self.x_in: torch.Tensor | None = None
        # the prepared batch, each NSFW layer's output and the linear heads' dot products
        self.x_norm: torch.Tensor | None = None
        self.hidden: list[torch.Tensor] | None = None
        self.lin_out: torch.Tensor | None = None
        # Host -> CUDA staging (a pandas partition scored with device="cuda"): two pinned buffers
        # used in turn, so the memcpy of batch i+1 into one overlaps the GPU's work on batch i;
        # a float16/float64 batch lands in a device buffer of its own dtype (``_staged``) and is
        # cast there, on the GPU.
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._pinned_done: list[Any] = [None, None]
        self._staged: torch.Tensor | None = None
        self._slot = 0

    def rows_for(self, n: int) -> int:
        """How many rows a forward pass over ``n`` rows computes (``n`` plus the padding)."""
        if self.block is not None:
            return self.block
        return max(MIN_ROWS, -(-n // ROW_BLOCK) * ROW_BLOCK)

    def _reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}
        self.x_norm = torch.empty(n, self.dim, **kw)
        self.hidden = [torch.empty(n, w.shape[1], **kw) for w, _ in self.layers]
        self.lin_out = None if self.lin_w is None else torch.empty(self.lin_w.shape[1], n, **kw)
        self.x_in = None  # allocated only if a batch is staged from the host
        self._pinned = [None, None]  # a copy still reading the old ones keeps them (torch's host allocator)
        self._pinned_done = [None, None]
        self._staged = None
        self.capacity = n

    def release(self) -> bool:
        """Drop every work buffer (they are allocated again by the next batch); True if any was held.

        Only while no other thread scores with this runner (``release_buffers`` documents when).
        """
        held = self.capacity > 0
        if self.device.type == "cuda" and held:
            # the last batch's kernels may still read them: let them finish before the memory goes
            torch.cuda.current_stream(self.device).synchronize()
        self.capacity = 0
        self.x_in = None
        self.x_norm = self.hidden = self.lin_out = None
        self._pinned = [None, None]
        self._pinned_done = [None, None]
        self._staged = None
        if self._imputer is not None:
            held = self._imputer.release() or held
        return held

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
        order).  Falls back to a plain copy if pinning fails.
        """
        x_in = self.x_in
        if x_in is None:
            x_in = self.x_in = torch.empty(self.capacity, self.dim, dtype=self.dtype, device=self.device)
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

    def __call__(
        self,
        x: torch.Tensor,
        out: torch.Tensor | Sequence[torch.Tensor],
        codes: torch.Tensor | None = None,
        *,
        norms: torch.Tensor | None = None,
        normalize: bool = False,
    ) -> None:
        """Score ``x`` (``(n, dim)``, any float dtype/device) into ``out``: one ``(n,)`` tensor
        per head, in the runner's order (a single tensor for a single head).

        ``codes``: exact mode's ``self.codes(x)``, if already computed.  ``norms``: an ``(n,)``
        float32 tensor on ``self.device`` that receives each row's L2 norm (computed from the
        batch while it is in cache).  ``normalize``: the NSFW head scores ``x / ||x||`` (a zero row
        gets NaN); the linear heads always normalise, as their upstream code does.
        """
        outs = [out] if isinstance(out, torch.Tensor) else list(out)
        if len(outs) != self.n_out:
            raise TypeError(f"internal error: {len(outs)} outputs for {self.n_out} heads")
        n = x.shape[0]
        if n == 0:
            return
        if self.block is not None and n > self.block:  # CUDA: one block per forward pass
            blk = self.block
            for i in range(0, n, blk):
                self(
                    x[i : i + blk],
                    [o[i : i + blk] for o in outs],
                    None if codes is None else codes[i : i + blk],
                    norms=None if norms is None else norms[i : i + blk],
                    normalize=normalize,
                )
            return
        m = self.rows_for(n)
        self._reserve(m)
        x_norm, hidden = self.x_norm, self.hidden
        assert x_norm is not None and hidden is not None  # allocated by ``_reserve``
        src = x
        if x.device != self.device:  # a host batch scored on CUDA
            x = self._stage_to_cuda(x, n)
        h = x_norm[:m]
        enc = self.encoding
        nsfw = self.nsfw_pos is not None
        eager = enc is not None and self.impute_eagerly
        need_norms = norms is not None or (normalize and nsfw) or self.lin_w is not None
        if nsfw and self.lin_w is None and x.dtype == self.dtype and not eager and not need_norms:
            torch.sub(x, self.mean, out=h[:n])  # one pass: read the batch, write it centered
            if m > n:
                h[n:m].zero_()  # padding rows: finite, never read back
        else:
            # cast (or copy) into the block buffer first: torch's mixed-dtype ``sub`` is a slow
            # scalar path on CPU, and the norms and linear heads then read the buffer in cache
            hn = h[:n].copy_(x)
            if m > n:
                h[n:m].zero_()
            nrm = None
            if need_norms:  # of the row as given (NaN for a row with a NaN)
                if norms is not None and norms.dtype == self.dtype and norms.device == self.device:
                    nrm = torch.linalg.vector_norm(hn, dim=1, out=norms)
                else:
                    nrm = torch.linalg.vector_norm(hn, dim=1)
                    if norms is not None:
                        norms.copy_(nrm)
            if self.lin_w is not None:
                assert nrm is not None
                self._linear_heads(h, nrm, n, m, outs)
            if nsfw:
                if eager:  # exact mode: NaN -> 0 (+-inf kept)
                    torch.nan_to_num(hn, nan=0.0, posinf=math.inf, neginf=-math.inf, out=hn)
                if normalize:
                    assert nrm is not None
                    hn.div_(nrm.unsqueeze(1))  # a zero row: 0/0 = NaN everywhere, so a NaN score
                    if enc is not None:  # exact mode looks up the values it scores
                        codes = enc.codes(hn)
                hn.sub_(self.mean)
        if not nsfw:
            return
        if enc is not None:  # the categorical columns: their vocabulary indices, centered
            if codes is None:
                codes = enc.codes(src)
            codes = codes.to(device=self.device, dtype=self.dtype)
            h[:n, enc.columns] = torch.sub(codes, self.cat_mean)
        last = len(self.layers) - 1
        for i, (w_t, b) in enumerate(self.layers):
            h = torch.addmm(b, h, w_t, out=hidden[i][:m])
            if i < last:
                h.relu_()
        _sigmoid_blocks_(h.view(-1))
        assert self.nsfw_pos is not None
        out = outs[self.nsfw_pos]
        out.copy_(h.view(-1)[:n])
        if enc is not None and not self.impute_eagerly:
            nan = torch.isnan(out)
            if bool(nan.any()):  # rows with a NaN input: again, imputing (or NaN/inf for real)
                rows = nan.nonzero().view(-1)
                if self._imputer is None:
                    model = self._models[self.nsfw_pos]()
                    if model is None:  # pragma: no cover - a caller holds the model while scoring
                        raise RuntimeError("internal error: the model of this runner was freed")
                    self._imputer = Runner(model, self.device, impute_eagerly=True)
                fixed = torch.empty(len(rows), dtype=out.dtype, device=out.device)
                self._imputer(
                    src[rows.to(src.device)], fixed, None if codes is None else codes[rows], normalize=normalize
                )
                out[rows] = fixed

    def _linear_heads(self, h: torch.Tensor, nrm: torch.Tensor, n: int, m: int, outs: list[torch.Tensor]) -> None:
        """The linear heads' scores ``(x . w) / ||x|| + b`` for the ``n`` rows of the block ``h``.

        One GEMM over the whole padded block (the same shape for any batch: the same kernel, the
        same bits), then the division by the norm the head's upstream code normalises by.
        """
        assert self.lin_w is not None and self.lin_out is not None
        # one (m, dim) x (dim, 1) product per head, never one (dim, k) GEMM: MKL picks other
        # kernels for k = 1 and k = 2, and a head's bits must not depend on which others run
        for j, w in enumerate(self.lin_cols):
            torch.mm(h, w, out=self.lin_out[j, :m].unsqueeze(1))
        dots = self.lin_out[:, :n].t()
        denom = nrm.unsqueeze(1).expand(n, dots.shape[1])
        denom = torch.where((denom == 0) & self.lin_zero_to_one, torch.ones_like(denom), denom)
        scores = dots / denom + self.lin_b
        for j, pos in enumerate(self.lin_pos):
            outs[pos].copy_(scores[:, j])


def get_runner(model: NSFWModel | ExactNSFWModel | HeadSet | torch.nn.Module, device: torch.device) -> Runner:
    """This thread's runner for ``model`` (one head, or a :class:`HeadSet`) on ``device``."""
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
