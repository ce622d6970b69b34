"""Exact mode: LAION's original AutoKeras model, categorical lookup included.

LAION's published scores come from an AutoKeras/TensorFlow SavedModel whose first layer,
``MultiCategoryEncoding``, treats a few columns (180, 316, 413, 440, 644 of ViT-L/14; 92, 133,
312 of ViT-B/32) as categories: the float64 value is formatted with ``'%f'`` (6 decimals),
looked up in a vocabulary (index 0 = out of vocabulary) and the *index* is normalized.  In every
other column NaN becomes 0.  The torch port (NeMo Curator's, our default) drops both steps.

This module reproduces them without TensorFlow, given the vocabularies that
:mod:`nsfw_dask.vocabulary` reads out of the SavedModel (:func:`load_vocabulary`):
:class:`CategoricalEncoding` turns each vocabulary string into the exact interval of float64
values that ``'%f'`` formats to it (:func:`float_interval`: rounding ties and signed zero
included, checked against Python's own formatting), so the lookup is one ``torch.searchsorted``
per batch, on CPU or GPU; :class:`ExactNSFWModel` puts it in front of the head.

The vocabulary names (``load_vocabulary``, ``KerasVocabulary``, ...) are re-exported here, where
they were first defined.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from .models import NSFWModel
from .vocabulary import (
    KerasVocabulary,
    clear_vocabulary_cache,
    load_vocabulary,
    read_savedmodel_vocabulary,
    vocabulary_digest,
    write_vocabulary_cache,
)

if TYPE_CHECKING:
    from .weights import WeightsInfo

__all__ = [
    "CategoricalEncoding",
    "ExactNSFWModel",
    "KerasVocabulary",
    "clear_vocabulary_cache",
    "float_interval",
    "load_vocabulary",
    "read_savedmodel_vocabulary",
    "vocabulary_digest",
    "write_vocabulary_cache",
]


_HALF_ULP6 = Decimal("0.0000005")
_TINY = 5e-324  # smallest positive float64


def _fmt(x: float) -> str:
    return "%f" % x


def _edge(start: float, s: str, direction: float) -> float:
    """The last float from ``start`` towards ``direction`` that formats to ``s``."""
    x = start
    for _ in range(4096):
        if _fmt(x) == s:
            break
        x = math.nextafter(x, -direction)  # outside the interval: step back in
    else:  # pragma: no cover - a few ulps at most for 6-decimal strings
        raise AssertionError(f"no float formats to {s!r} near {start!r}")
    for _ in range(4096):
        nxt = math.nextafter(x, direction)
        if _fmt(nxt) != s:
            return x
        x = nxt
    raise AssertionError(f"interval of {s!r} wider than expected")  # pragma: no cover


def float_interval(s: str) -> tuple[float, float] | None:
    """The closed interval ``[lo, hi]`` of nonzero float64 values ``x`` with ``'%f' % x == s``.

    ``None`` when no float formats to ``s`` (not a canonical 6-decimal string).  Exact zeros are
    left out of every interval (``'%f'`` maps ``0.0`` to ``'0.000000'`` and ``-0.0`` to
    ``'-0.000000'``, which comparisons cannot tell apart); :class:`CategoricalEncoding` looks
    them up by sign.
    """
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    x = float(d)
    if _fmt(x) != s:
        return None
    if d == 0:
        if s.startswith("-"):
            return _edge(float(-_HALF_ULP6), s, -math.inf), -_TINY
        return _TINY, _edge(float(_HALF_ULP6), s, math.inf)
    lo = _edge(float(d - _HALF_ULP6), s, -math.inf)
    hi = _edge(float(d + _HALF_ULP6), s, math.inf)
    return (lo, hi) if lo <= hi else None


class CategoricalEncoding(nn.Module):
    """AutoKeras ``MultiCategoryEncoding`` for float embeddings, vectorized.

    ``forward(x)`` returns a float32 copy of ``x`` with NaN -> 0 in every column and, in the
    categorical columns, the vocabulary index of ``'%f' % float64(x)`` (0 when out of
    vocabulary, NaN and inf included).  :meth:`codes` gives the indices alone.

    Buffers (on the module's device): ``columns`` (k,), ``starts``/``ends`` (k, L) float64
    interval bounds sorted by start (padded with +inf/-inf), ``codes_table`` (k, L) float32
    indices, ``zero_codes`` (k, 2) the indices of ``'0.000000'`` and ``'-0.000000'``.
    """

    # registered buffers (torch types nn.Module.__getattr__ as ``Tensor | Module``)
    columns: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    codes_table: torch.Tensor
    zero_codes: torch.Tensor

    def __init__(self, vocab: KerasVocabulary, dim: int) -> None:
        super().__init__()
        k = len(vocab.columns)
        rows: list[list[tuple[float, float, int]]] = []
        zero = np.zeros((k, 2), np.float32)
        for c, (strings, indices) in enumerate(zip(vocab.strings, vocab.indices)):
            items = []
            for s, idx in zip(strings, indices):
                if s == "0.000000":
                    zero[c, 0] = idx
                elif s == "-0.000000":
                    zero[c, 1] = idx
                iv = float_interval(s)
                if iv is not None:
                    items.append((iv[0], iv[1], idx))
            items.sort()
            for a, b in zip(items, items[1:]):  # '%f' is a function: intervals cannot overlap
                if a[1] >= b[0]:
                    raise AssertionError(f"overlapping vocabulary intervals {a} and {b}")
            rows.append(items)
        width = max((len(r) for r in rows), default=0) + 1
        starts = np.full((k, width), np.inf)
        ends = np.full((k, width), -np.inf)
        codes = np.zeros((k, width), np.float32)
        for c, items in enumerate(rows):
            if items:
                arr = np.asarray(items, dtype=np.float64)
                starts[c, : len(items)], ends[c, : len(items)] = arr[:, 0], arr[:, 1]
                codes[c, : len(items)] = arr[:, 2]
        self.dim = dim
        self.column_list = list(vocab.columns)  # indexes a tensor on any device
        self.register_buffer("columns", torch.tensor(vocab.columns, dtype=torch.long))
        self.register_buffer("starts", torch.from_numpy(starts))
        self.register_buffer("ends", torch.from_numpy(ends))
        self.register_buffer("codes_table", torch.from_numpy(codes))
        self.register_buffer("zero_codes", torch.from_numpy(zero))

    def _gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``(k, n)`` float64 copy of the categorical columns (column views, stacked: cheaper than
        advanced indexing on a row-major matrix)."""
        v = torch.stack([x[:, c] for c in self.column_list])
        return v.to(device=self.starts.device, dtype=torch.float64)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` float32 vocabulary indices of ``x``'s categorical columns (any float dtype)."""
        return self._codes_searchsorted(self._gather_columns(x))

    def _codes_searchsorted(self, v: torch.Tensor) -> torch.Tensor:
        """A binary search over the sorted intervals (``v`` is ``(k, n)``), then containment.

        (A direct-address table on ``round(x * 1e6)`` was tried: no faster on CPU, measured.)
        """
        pos = torch.searchsorted(self.starts, v, right=True).sub_(1)
        found = pos >= 0
        pos.clamp_(min=0)
        found &= v <= self.ends.gather(1, pos)
        out = torch.where(found, self.codes_table.gather(1, pos), 0.0)
        is_zero = v == 0
        zero = torch.where(torch.signbit(v), self.zero_codes[:, 1:2], self.zero_codes[:, 0:1])
        out = torch.where(is_zero, zero, out)
        return out.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nan_to_num(x.to(torch.float32), nan=0.0, posinf=math.inf, neginf=-math.inf)
        out[:, self.columns] = self.codes(x).to(out.device)
        return out


class ExactNSFWModel(nn.Module):
    """LAION's original model: :class:`CategoricalEncoding`, then the head (``exact=True``).

    ``forward`` returns ``(batch, 1)`` probabilities like :class:`~nsfw_dask.NSFWModel`.
    Shares the head's parameters; built by :func:`nsfw_dask.load_model` with ``exact=True``.
    """

    # set by :func:`nsfw_dask.load_model` (the head's weights)
    weights_info: WeightsInfo

    def __init__(self, head: NSFWModel, encoding: CategoricalEncoding) -> None:
        super().__init__()
        self.head = head
        self.encoding = encoding
        self.spec = head.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoding(x))
