"""Compatibility: ``NSFWScorer`` is defined in :mod:`nsfw_dask.nemo` (NeMo Curator's classes).

``from nsfw_dask.scorer import NSFWScorer`` keeps working; new code imports it from
``nsfw_dask.nemo``.
"""

from __future__ import annotations

from .nemo import NSFWScorer

__all__ = ["NSFWScorer"]
