"""LAION's aesthetic predictors as torch modules, with their upstream state-dict keys.

* :class:`AestheticMLP` — the improved aesthetic predictor ("aesthetic v2"): the ``MLP`` class of
  christophschuhmann/improved-aesthetic-predictor's ``simple_inference.py`` (and NeMo Curator's
  ``nemo_curator/models/aesthetics.py``): Linear 768-1024-128-64-16-1 with dropout between the
  first four (inactive in eval mode) and **no activation**; keys ``layers.{0,2,4,6,7}``.
* :class:`AestheticLinear` — LAION-AI/aesthetic-predictor's v1 head: one ``nn.Linear(dim, 1)``;
  keys ``weight``, ``bias``.

Both expect L2-normalised CLIP embeddings: the upstream inference code divides by the norm first
(v2: numpy, a zero norm replaced by 1; v1: ``x / x.norm(dim=-1)``).  Their ``forward`` is the
upstream network on what it is given (no normalisation), as NeMo Curator's ``MLP`` is; the
scorer (:mod:`nsfw_dask._forward`) normalises, as the upstream inference does.

Since neither has an activation, each is one affine map: :meth:`fold` returns it, computed in
float64 (``w`` of shape ``(dim,)``, ``b``); the forward pass scores with it, one dot product per
row instead of ~920k multiply-adds (measured on the reference set: the folded float32 head is
closer to a float64 evaluation than the layered float32 one, ``tests/test_heads.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from .._specs import ModelSpec, get_spec

if TYPE_CHECKING:
    from ..weights import WeightsInfo

__all__ = ["AestheticLinear", "AestheticMLP"]


class AestheticMLP(nn.Module):
    """LAION's improved aesthetic predictor (upstream ``MLP``), for ``aesthetic-vit-l-14``."""

    weights_info: WeightsInfo  # set by :func:`nsfw_dask.load_model` on the models it caches

    def __init__(self, spec: str | ModelSpec = "aesthetic-vit-l-14") -> None:
        super().__init__()
        self.spec = get_spec(spec)
        dims = self.spec.layers
        drops = {0: 0.2, 1: 0.2, 2: 0.1}
        mods: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            mods.append(nn.Linear(a, b))
            if i in drops:
                mods.append(nn.Dropout(drops[i]))
        self.layers = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The upstream network on ``x`` as given; ``(batch, dim)`` -> ``(batch, 1)``."""
        return self.layers(x)

    def fold(self) -> tuple[torch.Tensor, float]:
        """The whole network as one affine map ``x @ w + b``, in float64."""
        w = torch.eye(self.spec.dim, dtype=torch.float64)
        b = torch.zeros(self.spec.dim, dtype=torch.float64)
        for m in self.layers:
            if isinstance(m, nn.Linear):
                wt = m.weight.detach().to("cpu", torch.float64)
                w = w @ wt.t()
                b = b @ wt.t() + m.bias.detach().to("cpu", torch.float64)
        return w.view(-1), float(b.item())


class AestheticLinear(nn.Linear):
    """LAION's aesthetic predictor v1: ``nn.Linear(dim, 1)`` (keys ``weight``, ``bias``)."""

    weights_info: WeightsInfo

    def __init__(self, spec: str | ModelSpec = "aesthetic-v1-vit-l-14") -> None:
        self.spec = get_spec(spec)
        super().__init__(self.spec.dim, 1)

    def fold(self) -> tuple[torch.Tensor, float]:
        return self.weight.detach().to("cpu", torch.float64).view(-1), float(self.bias.detach().double().item())
