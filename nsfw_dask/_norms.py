"""The norm check: LAION's CLIP heads expect L2-normalised embeddings (no torch here).

LAION trained its heads on unit-length CLIP embeddings (clip-retrieval stores them normalised;
LAION's aesthetic predictors normalise in their own inference code), but raw ``encode_image``
outputs have norms of ~10-30, and scoring them gives confident nonsense: on 1,000 unit vectors
``x`` and on ``15 * x`` the NSFW scores differ by up to 0.99999 and the share >= 0.5 goes from
0.4 % to 64 % (issue 20).  So every scoring path looks at the norms:

* the job (``nsfw-dask score``, :func:`nsfw_dask.score_dataset`) takes every row's norm from the
  forward pass, counts the rows off unit length by more than :data:`NORM_TOL`, reports quantiles,
  and refuses a partition whose median norm is outside :data:`NORM_RANGE` (clearly not
  normalised) unless told ``--normalize`` or ``--no-norm-check``;
* :func:`nsfw_dask.score_nsfw` and :class:`nsfw_dask.NSFWScorer` look at a sample of
  :data:`SAMPLE_ROWS` rows per call and *warn* (:class:`~nsfw_dask.NotUnitNormWarning`): library
  code called on one partition of a pipeline should not stop the pipeline on its own judgement.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = [
    "NORM_HIST_BINS",
    "NORM_RANGE",
    "NORM_TOL",
    "SAMPLE_ROWS",
    "clearly_not_unit",
    "norm_histogram",
    "norm_quantiles",
    "norm_stats",
    "not_unit_message",
]

#: A row counts as "off unit length" when ``| ||x|| - 1 | > NORM_TOL``.  LAION's float16
#: embeddings of unit vectors have norms within ~1e-3 of 1, so 1 % is well clear of storage
#: rounding and well below anything a head would notice.
NORM_TOL = 0.01
#: A partition whose median norm lies outside this range is clearly not normalised (raw CLIP
#: ViT-L/14 image embeddings have norms of ~10-30, ViT-B/32 ones ~10).
NORM_RANGE = (0.5, 2.0)
#: Rows per call whose norms ``score_nsfw`` and ``NSFWScorer`` look at (a strided sample).
SAMPLE_ROWS = 1024
#: The job's norm histogram: log10(norm) in equal bins over [-4, 4) (0.01 decade, 2.3 % a bin);
#: norms below 1e-4 (zero included) count in the first bin, above 1e4 in the last.
NORM_HIST_BINS = 800
_LOG_LO, _LOG_HI = -4.0, 4.0
_NORM_QUANTILES = (0.01, 0.5, 0.99)


def clearly_not_unit(median: float) -> bool:
    """True when a median norm says the rows are not L2-normalised (NaN: no finite row, False)."""
    return not math.isnan(median) and not NORM_RANGE[0] <= median <= NORM_RANGE[1]


def not_unit_message(where: str, median: float, rows: int, *, cli: bool) -> str:
    """One line: what was seen and the two fixes, as flags (``cli``) or keywords."""
    fix = (
        "Pass --normalize to L2-normalise them before scoring (a zero vector gets NaN), or "
        "--no-norm-check if they are right as they are."
        if cli
        else "Pass normalize=True to L2-normalise them before scoring (a zero vector gets NaN), or "
        "norm_check=False if they are right as they are."
    )
    return (
        f"{where}: the embeddings are not L2-normalised (median L2 norm {median:.4g} over {rows:,} rows); "
        f"LAION's CLIP heads expect unit-length embeddings and score others wrongly. {fix}"
    )


def norm_histogram(norms: np.ndarray) -> np.ndarray:
    """Counts of the finite norms in :data:`NORM_HIST_BINS` log10 bins (NaN rows: none)."""
    v = np.asarray(norms, dtype=np.float64)
    v = v[np.isfinite(v)]
    with np.errstate(divide="ignore"):
        lg = np.log10(v)
    k = np.clip(np.floor((lg - _LOG_LO) / (_LOG_HI - _LOG_LO) * NORM_HIST_BINS), 0, NORM_HIST_BINS - 1)
    return np.bincount(k.astype(np.intp), minlength=NORM_HIST_BINS).astype(np.int64)


def norm_quantiles(hist: np.ndarray) -> dict[str, float | None]:
    """p01, p50, p99 of the norms, each the lower edge of its bin (the value lies within 2.3 %)."""
    from .summary import quantiles_from_histogram  # summary imports this module

    return quantiles_from_histogram(hist, _NORM_QUANTILES, _LOG_LO, _LOG_HI, transform=lambda e: float(f"{10**e:.4g}"))


def norm_stats(norms: np.ndarray) -> dict[str, Any]:
    """A part's norm numbers for the summary: off-unit and zero counts, the histogram, the median."""
    v = np.asarray(norms, dtype=np.float64)
    fin = v[np.isfinite(v)]
    return {
        "norm_off_unit": int(np.sum(np.abs(fin - 1.0) > NORM_TOL)),
        "norm_zero": int(np.sum(fin == 0.0)),
        "norm_histogram": norm_histogram(fin),
        "norm_median": float(np.median(fin)) if len(fin) else math.nan,
        "norm_rows": len(fin),
    }
