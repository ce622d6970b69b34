"""LAION's CLIP NSFW detector heads as torch modules.

``Normalization``, ``NSFWModel`` and :class:`~nsfw_dask.NSFWScorer` keep the API of NeMo Curator's
``nemo_curator/models/nsfw.py`` (the port its users know); the state-dict keys are exactly those of
LAION's published ``.pth`` files (``norm.mean``, ``norm.variance``, ``linear_1`` ... ``linear_N``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from ._specs import MODEL_SPECS, KerasSpec, ModelSpec, get_spec

if TYPE_CHECKING:
    from .weights import WeightsInfo

__all__ = ["MODEL_SPECS", "KerasSpec", "ModelSpec", "NSFWModel", "Normalization", "get_spec"]


class Normalization(nn.Module):
    """Keras-style feature normalization: ``(x - mean) / sqrt(variance)``.

    Parameters
    ----------
    shape : list of int
        Shape of the ``mean`` and ``variance`` buffers (``[768]`` for ViT-L/14).
    """

    # registered buffers (torch types nn.Module.__getattr__ as ``Tensor | Module``)
    mean: torch.Tensor
    variance: torch.Tensor

    def __init__(self, shape: list[int] | tuple[int, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(shape))
        self.register_buffer("variance", torch.ones(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.variance.sqrt()


class NSFWModel(nn.Module):
    """LAION's NSFW head: Normalization, then Linear+ReLU layers and a sigmoid.

    ``NSFWModel()`` is the ViT-L/14 head (768-64-512-256-1), exactly as in NeMo Curator;
    ``NSFWModel("vit-b-32")`` is the ViT-B/32 head (512-32-32-1).

    Parameters
    ----------
    model : str, default "vit-l-14"
        Which head to build.

    Examples
    --------
    >>> import torch
    >>> from nsfw_dask import NSFWModel
    >>> m = NSFWModel().eval()
    >>> m(torch.zeros(3, 768)).shape
    torch.Size([3, 1])
    """

    # set by :func:`nsfw_dask.load_model` on the models it caches (absent on a bare ``NSFWModel()``)
    weights_info: WeightsInfo

    def __init__(self, model: str | ModelSpec = "vit-l-14") -> None:
        super().__init__()
        spec = get_spec(model)
        self.spec = spec
        self.norm = Normalization([spec.dim])
        for i, (n_in, n_out) in enumerate(zip(spec.layers[:-1], spec.layers[1:]), start=1):
            setattr(self, f"linear_{i}", nn.Linear(n_in, n_out))
        self.n_linear = len(spec.layers) - 1
        self.act = nn.ReLU()
        self.act_out = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Score a ``(batch, dim)`` tensor; returns ``(batch, 1)`` probabilities."""
        x = self.norm(x)
        for i in range(1, self.n_linear):
            x = self.act(getattr(self, f"linear_{i}")(x))
        return self.act_out(getattr(self, f"linear_{self.n_linear}")(x))
