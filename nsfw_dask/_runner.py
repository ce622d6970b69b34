"""The head's forward pass into preallocated buffers: no allocation per batch.

``NSFWModel.forward`` allocates every intermediate (a 1,024 x 512 float32 activation is 2 MB,
which glibc serves with a fresh ``mmap`` and page faults on every batch).  ``Runner`` computes
the same operations (``(x - mean) / sqrt(variance)``, then ``addmm`` + ``relu_`` per layer,
``sigmoid``) into buffers it keeps per thread, so the per-batch cost is the arithmetic alone:
on the reference set its scores equal NeMo Curator's bit for bit at batch sizes >= 256 (tests),
and about twice the module's rows/s at batch 1,024 on the 2-core CI machine (README,
Performance).  Very small batches (a few rows) may round differently in the last bits, as the
module's own do.

Buffers are sized to the largest batch seen (at most ``batch_size``) and grow on demand; runners
are kept per thread in a weak mapping keyed by the model, so ``clear_model_cache`` frees them.
"""

from __future__ import annotations

import math
import threading
import weakref

import torch

from .exact import CategoricalEncoding, ExactNSFWModel
from .models import NSFWModel

__all__ = ["Runner", "get_runner"]

_tls = threading.local()


class Runner:
    """Buffers and pre-transposed weights for one model on one device, in one thread."""

    def __init__(self, model: NSFWModel | ExactNSFWModel, device: torch.device) -> None:
        self.encoding: CategoricalEncoding | None = None
        if isinstance(model, ExactNSFWModel):
            self.encoding = model.encoding.to(device)
            model = model.head
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, device
        with torch.inference_mode():
            self.mean = model.norm.mean.to(device)
            self.std = model.norm.variance.sqrt().to(device)
            self.layers = [
                (getattr(model, f"linear_{i}").weight.t().contiguous().to(device),
                 getattr(model, f"linear_{i}").bias.to(device))
                for i in range(1, model.n_linear + 1)
            ]
        self.dim = self.mean.shape[0]
        if self.encoding is not None:
            cols = self.encoding.columns
            self.cat_mean, self.cat_std = self.mean[cols], self.std[cols]
        self.capacity = 0
        self.x_in: torch.Tensor | None = None
        self.x_norm = self.hidden = None  # type: ignore[assignment]

    def _reserve(self, n: int) -> None:
        if n <= self.capacity:
            return
        kw = {"dtype": self.dtype, "device": self.device}
        self.x_norm = torch.empty(n, self.dim, **kw)
        self.hidden = [torch.empty(n, w.shape[1], **kw) for w, _ in self.layers]
        self.x_in = None  # allocated only if a batch needs a cast or a move
        self.capacity = n

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Score ``x`` (``(n, dim)``, any float dtype/device) into ``out`` (``(n,)``)."""
        n = x.shape[0]
        self._reserve(n)
        src = x
        if x.dtype != self.dtype or x.device != self.device:
            if self.x_in is None:
                self.x_in = torch.empty(self.capacity, self.dim, dtype=self.dtype, device=self.device)
            x = self.x_in[:n].copy_(x, non_blocking=True)
        if self.encoding is None:
            h = torch.sub(x, self.mean, out=self.x_norm[:n])
        else:  # exact mode: NaN -> 0 (+-inf kept), then the categorical columns' indices
            h = torch.nan_to_num(x, nan=0.0, posinf=math.inf, neginf=-math.inf, out=self.x_norm[:n])
            h.sub_(self.mean)
        h.div_(self.std)
        if self.encoding is not None:  # from the input's own precision (float64 stays float64)
            codes = self.encoding.codes(src).to(self.device)
            h[:, self.encoding.columns] = codes.sub_(self.cat_mean).div_(self.cat_std)
        last = len(self.layers) - 1
        for i, (w_t, b) in enumerate(self.layers):
            h = torch.addmm(b, h, w_t, out=self.hidden[i][:n])
            if i < last:
                h.relu_()
        h = h.view(-1)
        if out.dtype == h.dtype and out.device == h.device:
            torch.sigmoid(h, out=out)
        else:
            out.copy_(h.sigmoid_())


def get_runner(model: NSFWModel | ExactNSFWModel, device: torch.device) -> Runner:
    """This thread's runner for ``model`` on ``device``."""
    per_model = getattr(_tls, "runners", None)
    if per_model is None:
        per_model = _tls.runners = weakref.WeakKeyDictionary()
    runners = per_model.setdefault(model, {})
    runner = runners.get(str(device))
    if runner is None:
        runner = runners[str(device)] = Runner(model, device)
    return runner
