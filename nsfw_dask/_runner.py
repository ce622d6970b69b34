"""The head's forward pass into preallocated buffers: no allocation per batch.

``NSFWModel.forward`` allocates every intermediate (a 1,024 x 512 float32 activation is 2 MB,
which glibc serves with a fresh ``mmap`` and page faults on every batch).  ``Runner`` computes
exactly the same operations (``(x - mean) / sqrt(variance)``, then ``addmm`` + ``relu_`` per
layer, ``sigmoid``) into buffers it keeps per thread, so scores are bitwise identical to the
module's and the per-batch cost is the arithmetic alone.  Measured on the 2-core CI machine:
about 2x the module's rows/s at batch 1,024 (see README, Performance).
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from .models import NSFWModel

__all__ = ["Runner", "get_runner"]

_tls = threading.local()
_MAX_RUNNERS_PER_THREAD = 4


class Runner:
    """Buffers and pre-transposed weights for one (model, batch size, device) in one thread."""

    def __init__(self, model: NSFWModel, batch_size: int, device: torch.device) -> None:
        p = next(model.parameters())
        self.dtype, self.device, self.batch_size = p.dtype, device, batch_size
        with torch.inference_mode():
            self.mean = model.norm.mean.to(device)
            self.std = model.norm.variance.sqrt().to(device)
            self.layers = [
                (getattr(model, f"linear_{i}").weight.t().contiguous().to(device),
                 getattr(model, f"linear_{i}").bias.to(device))
                for i in range(1, model.n_linear + 1)
            ]
            dim = self.mean.shape[0]
            self.x_in = torch.empty(batch_size, dim, dtype=self.dtype, device=device)
            self.x_norm = torch.empty(batch_size, dim, dtype=self.dtype, device=device)
            self.hidden = [torch.empty(batch_size, w.shape[1], dtype=self.dtype, device=device)
                           for w, _ in self.layers]

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Score ``x`` (``(n, dim)``, n <= batch_size, any float dtype/device) into ``out`` (``(n,)``)."""
        n = x.shape[0]
        if x.dtype != self.dtype or x.device != self.device:
            x = self.x_in[:n].copy_(x, non_blocking=True)
        h = torch.sub(x, self.mean, out=self.x_norm[:n])
        h.div_(self.std)
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


def get_runner(model: NSFWModel, batch_size: int, device: torch.device) -> Runner:
    """This thread's runner for ``model`` (kept for the model's lifetime, a few per thread)."""
    cache = getattr(_tls, "runners", None)
    if cache is None:
        cache = _tls.runners = OrderedDict()
    key = (id(model), batch_size, str(device))
    entry = cache.get(key)
    if entry is not None and entry[0] is model:
        cache.move_to_end(key)
        return entry[1]
    runner = Runner(model, batch_size, device)
    cache[key] = (model, runner)
    while len(cache) > _MAX_RUNNERS_PER_THREAD:
        cache.popitem(last=False)
    return runner
