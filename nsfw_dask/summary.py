"""The job's summary: counts, a fixed-bin histogram of the scores and the stage times per part,
reduced on the client; quantiles from that histogram; the progress line."""

from __future__ import annotations

import base64
import logging
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ._norms import NORM_HIST_BINS, NORM_TOL, norm_quantiles

__all__ = [
    "HIST_BINS",
    "Progress",
    "QUANTILES",
    "STAGES",
    "Summary",
    "add_part",
    "decode_histogram",
    "encode_histogram",
    "histogram",
    "quantiles_from_histogram",
]

logger = logging.getLogger(__name__)


HIST_BINS = 10_000  # summary quantiles are exact to 1 / HIST_BINS


QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


#: The stages of a task (``nsfw_dask._task``, beside ``run_part``, says what each covers), disjoint
#: and in this order; ``Summary.stages`` holds their seconds and their sum, ``task_s``.
STAGES = ("read_s", "metadata_s", "score_s", "build_s", "write_s")


@dataclass
class Summary:
    """What :func:`score_dataset` did.  ``to_dict()`` is what ``--json`` prints."""

    rows: int = 0
    rows_written: int = 0
    partitions: int = 0
    partitions_reused: int = 0
    nan_scores: int = 0
    over_threshold: int = 0
    threshold: float | None = None
    seconds: float = 0.0
    compute_seconds: float = 0.0
    rows_per_s: float = 0.0
    output: str = ""
    quantiles: dict[str, float | None] = field(default_factory=dict)
    #: The embeddings' L2 norms (the norm check, :mod:`nsfw_dask._norms`): quantiles ``p01``,
    #: ``p50``, ``p99`` (each within 2.3 %), ``off_unit`` (rows with ``| ||x|| - 1 | > tolerance``),
    #: ``zero`` (zero vectors: NaN scores with ``normalize``), ``tolerance``, ``normalized``.
    norms: dict[str, Any] = field(default_factory=dict)
    #: seconds per stage of the tasks, summed over the parts scored in this run (reused parts add
    #: nothing): ``read_s``, ``metadata_s``, ``score_s``, ``build_s``, ``write_s`` and their sum
    #: ``task_s`` (see ``nsfw_dask._task``)
    stages: dict[str, float] = field(default_factory=lambda: dict.fromkeys((*STAGES, "task_s"), 0.0))
    #: the cluster the parts ran on, when they started: worker processes and their threads in all
    #: (the most tasks in flight at once); 0 when every part was reused (no cluster was asked)
    workers: int = 0
    threads: int = 0
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64), repr=False)
    norm_histogram: np.ndarray = field(default_factory=lambda: np.zeros(NORM_HIST_BINS, np.int64), repr=False)
    norm_off_unit: int = field(default=0, repr=False)
    norm_zero: int = field(default=0, repr=False)
    #: Per head (``--heads``): ``column``, ``nan_scores``, ``quantiles`` (each the lower edge of a
    #: 1/10,000 bin of the head's output range); the top-level ``nan_scores``/``quantiles`` are
    #: the first head's.
    heads: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: ``--keep`` conditions and how many rows passed each (rows written pass all of them)
    keep: list[dict[str, Any]] = field(default_factory=list)
    head_histograms: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    head_nan: dict[str, int] = field(default_factory=dict, repr=False)
    keep_counts: list[int] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field but the histograms and the raw norm counts (in ``norms``)."""
        d = asdict(self)
        for k in ("histogram", "norm_histogram", "norm_off_unit", "norm_zero", "head_histograms", "head_nan"):
            d.pop(k)
        d.pop("keep_counts")
        return d

    def finish_heads(self, columns: dict[str, str], keep: list[str]) -> None:
        """Fill :attr:`heads` and :attr:`keep` from the per-part counts (once, at the end)."""
        from .heads import HEADS

        first = next(iter(columns), None)
        if first in self.head_histograms:  # the top-level figures are the first head's
            self.histogram = self.head_histograms[first]
        self.heads = {}
        for h, column in columns.items():
            lo, hi = HEADS[h].output_range
            hist = self.head_histograms.get(h, np.zeros(HIST_BINS, np.int64))
            self.heads[h] = {
                "column": column,
                "nan_scores": self.head_nan.get(h, 0),
                "quantiles": quantiles_from_histogram(hist, lo=lo, hi=hi),
            }
        counts = self.keep_counts or [0] * len(keep)
        self.keep = [{"condition": c, "rows": n} for c, n in zip(keep, counts)]

    def finish_norms(self, *, normalized: bool) -> None:
        """Fill :attr:`norms` from the per-part counts (the client calls it once, at the end)."""
        self.norms = {
            **norm_quantiles(self.norm_histogram),
            "off_unit": self.norm_off_unit,
            "zero": self.norm_zero,
            "tolerance": NORM_TOL,
            "normalized": normalized,
        }


def histogram(scores: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """Counts of the finite scores in ``HIST_BINS`` equal bins of [lo, hi] (bin k:
    ``lo + [k, k+1) * (hi - lo) / HIST_BINS``); scores outside are counted in the end bins."""
    v = np.asarray(scores, dtype=np.float64)
    v = v[np.isfinite(v)]
    k = np.clip(np.floor((v - lo) * (HIST_BINS / (hi - lo))), 0, HIST_BINS - 1).astype(np.intp)
    return np.bincount(k, minlength=HIST_BINS).astype(np.int64)


def quantiles_from_histogram(
    hist: np.ndarray,
    qs: tuple[float, ...] = QUANTILES,
    lo: float = 0.0,
    hi: float = 1.0,
    transform: Callable[[float], float] | None = None,
) -> dict[str, float | None]:
    """Each quantile as the lower edge of its bin of ``len(hist)`` equal bins of [lo, hi]: the true
    value lies in [q, q + (hi - lo) / len(hist)) (``transform``: of the edge, e.g. a log scale's).

    Same definition as ``np.quantile(scores, q, method="inverted_cdf")``: the smallest score
    whose share of rows at or below it reaches q.
    """
    cum = np.cumsum(np.asarray(hist, dtype=np.int64))
    n = int(cum[-1]) if len(cum) else 0
    out: dict[str, float | None] = {}
    for q in qs:
        key = f"p{round(q * 100):02d}"
        if n == 0:
            out[key] = None
            continue
        k = int(np.searchsorted(cum, q * n, side="left"))
        edge = lo + k * (hi - lo) / len(cum)
        out[key] = transform(edge) if transform is not None else round(edge, 10)
    return out


def encode_histogram(h: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.asarray(h, "<i8").tobytes(), 6)).decode()


def decode_histogram(s: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), "<i8").astype(np.int64)


class Progress:
    """One status line on stderr: parts done, rows, rows/s."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled
        self.last = 0.0
        self.t0 = time.perf_counter()

    def update(self, done: int, rows: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self.last < 0.5):
            return
        self.last = now
        width = 30
        filled = int(width * done / max(1, self.total))
        rate = rows / max(1e-9, now - self.t0)
        sys.stderr.write(
            f"\r[{'#' * filled}{' ' * (width - filled)}] {done}/{self.total} parts, {rows:,} rows, {rate:,.0f} rows/s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def add_part(summary: Summary, r: dict[str, Any]) -> None:
    summary.rows += r["rows"]
    summary.rows_written += r["rows_written"]
    summary.nan_scores += r["nan_scores"]
    summary.over_threshold += r["over_threshold"]
    heads = r.get("heads") or {}
    if not heads:  # a record without per-head numbers: its one head's histogram
        summary.histogram = summary.histogram + r["histogram"]
    for h, v in heads.items():
        prev = summary.head_histograms.get(h)
        summary.head_histograms[h] = v["histogram"] if prev is None else prev + v["histogram"]
        summary.head_nan[h] = summary.head_nan.get(h, 0) + v["nan"]
    counts = r.get("keep_counts") or []
    if counts:
        summary.keep_counts = [a + b for a, b in zip(summary.keep_counts or [0] * len(counts), counts)]
    summary.norm_off_unit += r.get("norm_off_unit", 0)
    summary.norm_zero += r.get("norm_zero", 0)
    if r.get("norm_histogram") is not None:
        summary.norm_histogram = summary.norm_histogram + r["norm_histogram"]
    for k, v in r.get("stages", {}).items():  # a reused part has none
        summary.stages[k] = summary.stages.get(k, 0.0) + float(v)
