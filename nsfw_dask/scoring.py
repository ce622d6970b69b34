"""``score_nsfw``: one partition in, the same partition plus a float32 score column out."""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ._compat import in_dask_meta_inference
from ._forward import CUDA_BLOCK_ROWS, MIN_ROWS, HeadSet, check_matmul_precision, get_runner
from ._norms import SAMPLE_ROWS, clearly_not_unit, not_unit_message
from .dispatch import Segment, get_backend
from .exceptions import EmbeddingFormatError, NotUnitNormWarning
from .heads import HeadSpec, get_head, parse_heads
from .loading import load_heads, load_model, resolve_device
from .models import get_spec

if TYPE_CHECKING:
    from .exact import ExactNSFWModel
    from .models import NSFWModel

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "nsfw_meta",
    "score",
    "score_aesthetic",
    "score_heads",
    "score_nsfw",
    "score_partition",
    "score_tensor",
    "score_tensors",
]

logger = logging.getLogger(__name__)


def _cpu_batch_size() -> int:
    """Rows per forward pass on this CPU, now, as measured (``make bench``: ``score_nsfw_by_batch``).

    Interleaved medians on a 2-core Intel Xeon with AVX-512/AMX (2026-12-05): with 2 torch threads
    ``score_nsfw`` ran at 0.90 G with 4,096 rows and 0.87 G with 1,024; with 1 thread (a Dask
    worker's: ``OMP_NUM_THREADS=1``), float16 input with the job's norms, 0.93 G₁ with 1,024 and
    0.77 G₁ with 4,096 (a 12 MB block leaves the core's L2).  On a 2-core AMD EPYC (AVX2) 1,024
    was the best (docs/performance.md).  The scores do not depend on it (bitwise), only the speed.
    """
    try:
        wide = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except Exception:  # pragma: no cover - an older torch without get_cpu_capability
        wide = False
    return 4096 if wide and torch.get_num_threads() > 1 else 1024


#: Rows per forward pass when ``batch_size=None``, as measured for this CPU and thread count at
#: import (:func:`_cpu_batch_size`; each call decides again, since a Dask worker's thread count
#: may differ); CUDA: one fixed block (``_forward.CUDA_BLOCK_ROWS``; not measured here).
DEFAULT_BATCH_SIZE = {"cpu": _cpu_batch_size(), "cuda": CUDA_BLOCK_ROWS}


def _default_batch_size(device: torch.device) -> int:
    if device.type == "cpu":
        return _cpu_batch_size()
    return DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"])


def _in_dask_meta_inference() -> bool:
    """True when dask is calling us on its fake partition to infer ``meta``.

    The check uses dask's private ``emulate``; it lives, with its fallback, in
    :func:`nsfw_dask._compat.in_dask_meta_inference`.
    """
    return in_dask_meta_inference()


def score_tensor(
    model: NSFWModel | ExactNSFWModel | HeadSet | torch.nn.Module,
    emb: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    out: torch.Tensor | None = None,
    norms: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Score ``emb`` (``(n, dim)``, any float dtype/device) in batches into a float32 ``(n,)``.

    Each batch is moved and cast on its own, into a preallocated buffer, so a float16 or
    float64 column, or a CPU column scored on CUDA, never gets a full-size converted copy, and
    no batch allocates (see ``nsfw_dask._forward``).  On CUDA a batch is a whole number of
    ``CUDA_BLOCK_ROWS``-row forward passes whatever ``batch_size`` says (one shape for cuBLAS:
    a row's score does not depend on its batch).

    ``norms``: an ``(n,)`` tensor on ``device`` that receives each row's L2 norm (the norm check);
    ``normalize``: score ``x / ||x||`` instead of ``x`` (a zero row gets NaN).  For several heads
    (a :class:`~nsfw_dask._forward.HeadSet`) see :func:`score_tensors`.
    """
    if get_runner(model, device).n_out != 1:
        raise TypeError(f"score_tensor scores one head; {model!r} has several: use score_tensors")
    outs = score_tensors(
        model,
        emb,
        batch_size=batch_size,
        device=device,
        outs=None if out is None else [out],
        norms=norms,
        normalize=normalize,
    )
    return outs[0]


def score_tensors(
    models: NSFWModel | ExactNSFWModel | HeadSet | torch.nn.Module,
    emb: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    outs: list[torch.Tensor] | None = None,
    norms: torch.Tensor | None = None,
    normalize: bool = False,
) -> list[torch.Tensor]:
    """Every head of ``models`` on ``emb``, from one read of each batch: a float32 ``(n,)`` per head."""
    n = emb.shape[0]
    check_matmul_precision(device)  # a process-wide TF32/bf16 setting would move the scores
    runner = get_runner(models, device)
    if outs is None:
        outs = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(runner.n_out)]
    if n == 0:
        return outs
    if runner.block is not None:  # CUDA: whole blocks per batch
        bs = -(-min(batch_size, n) // runner.block) * runner.block
    else:  # CPU: a forward pass computes at least MIN_ROWS rows (padded), so never pass fewer
        bs = min(max(batch_size, MIN_ROWS), n)
    with torch.inference_mode():
        if runner.encoding is None or normalize:  # exact mode + normalize: codes of the normalized rows
            for i in range(0, n, bs):
                nv = None if norms is None else norms[i : i + bs]
                runner(emb[i : i + bs], [o[i : i + bs] for o in outs], norms=nv, normalize=normalize)
            return outs
        # exact mode: the vocabulary lookup for a chunk of batches at once (bounded memory)
        chunk = bs * max(1, _EXACT_CHUNK_ROWS // bs)
        for c in range(0, n, chunk):
            part = emb[c : c + chunk]
            codes = runner.codes(part)
            assert codes is not None  # runner.encoding is set: exact mode
            for i in range(0, part.shape[0], bs):
                nv = None if norms is None else norms[c + i : c + i + bs]
                runner(part[i : i + bs], [o[c + i : c + i + bs] for o in outs], codes[i : i + bs], norms=nv)
    return outs


#: Exact mode looks up the categorical columns of up to this many rows at once (a few MB).
_EXACT_CHUNK_ROWS = 65_536


def _score_segments(
    models: NSFWModel | ExactNSFWModel | HeadSet | torch.nn.Module,
    segments: list[Segment],
    n: int,
    *,
    batch_size: int,
    device: torch.device,
    norms: torch.Tensor | None = None,
    normalize: bool = False,
) -> list[torch.Tensor]:
    """Each head's scores for a partition's ``n`` rows (NaN for rows without an embedding);
    ``norms``, if given, an ``(n,)`` tensor on ``device`` that receives each row's L2 norm (NaN
    likewise)."""
    k = get_runner(models, device).n_out
    outs = [torch.empty(n, dtype=torch.float32, device=device) for _ in range(k)]
    covered = 0
    for seg in segments:
        views = [o[seg.start : seg.stop] for o in outs]
        nview = None if norms is None else norms[seg.start : seg.stop]
        kw: dict[str, Any] = {"batch_size": batch_size, "device": device, "normalize": normalize}
        if seg.rows is None and seg.emb.shape[0] == seg.stop - seg.start:
            score_tensors(models, seg.emb, outs=views, norms=nview, **kw)
        else:
            if seg.rows is None or len(seg.rows) != seg.emb.shape[0]:
                raise AssertionError("internal error: a segment's rows do not match its embeddings")
            for v in views:
                v.fill_(float("nan"))
            if nview is not None:
                nview.fill_(float("nan"))
            if seg.emb.shape[0]:
                m = seg.emb.shape[0]
                seg_norms = None if nview is None else torch.empty(m, dtype=torch.float32, device=device)
                scores = score_tensors(models, seg.emb, norms=seg_norms, **kw)
                rows = seg.rows.to(device)
                for v, sc in zip(views, scores):
                    v[rows] = sc
                if nview is not None and seg_norms is not None:
                    nview[rows] = seg_norms
        if seg.null_rows is not None and len(seg.null_rows):
            null_rows = seg.null_rows.to(device)
            for v in views:
                v[null_rows] = float("nan")
            if nview is not None:
                nview[null_rows] = float("nan")
        covered += seg.stop - seg.start
    if covered != n:  # only zero-length chunks are skipped
        raise AssertionError(f"internal error: segments cover {covered} of {n} rows")
    return outs


def sample_norm_median(embeddings: list[torch.Tensor]) -> tuple[float, int]:
    """Median L2 norm of a strided sample of at most ``SAMPLE_ROWS`` rows of ``embeddings``
    (each ``(k, dim)``), and the sample's size; NaN rows are left out.  Cheap next to scoring."""
    total = sum(int(e.shape[0]) for e in embeddings)
    if total == 0:
        return math.nan, 0
    step = max(1, total // SAMPLE_ROWS)
    # the sample in float32 (a copy of <= SAMPLE_ROWS rows): float16 accumulates in float32,
    # float64 is rounded first (vector_norm refuses to narrow it)
    parts = [torch.linalg.vector_norm(e[::step].float(), dim=1) for e in embeddings if e.shape[0]]
    nrm = torch.cat([p.to("cpu") for p in parts])
    nrm = nrm[torch.isfinite(nrm)]
    if not len(nrm):
        return math.nan, 0
    return float(nrm.median()), len(nrm)


def warn_if_not_unit(embeddings: list[torch.Tensor], what: str, *, stacklevel: int = 3) -> None:
    """:class:`NotUnitNormWarning` when a sample of the rows is clearly not L2-normalised."""
    median, k = sample_norm_median(embeddings)
    if clearly_not_unit(median):
        warnings.warn(
            NotUnitNormWarning(not_unit_message(what, median, k, cli=False).replace(" rows)", " sampled rows)")),
            stacklevel=stacklevel,
        )


#: The "or pass column= ..." ending of a backend's fix, dropped when the caller named the column.
_COLUMN_HINT = re.compile(r",? or pass column=[^.]*\.")


def score_nsfw(
    df: Any,
    *,
    column: Any = None,
    model: str = "vit-l-14",
    score_column: Any = "nsfw_score",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    exact: bool = False,
    normalize: bool = False,
    norm_check: bool = True,
) -> Any:
    """Score one partition of CLIP image embeddings with LAION's NSFW detector.

    Made for ``ddf.map_partitions(score_nsfw)``; also works on any single pandas or cuDF
    DataFrame.  Returns a new frame (the input is not modified) with every column, the index and
    the row order of ``df``, plus ``score_column`` as float32 in [0, 1] (1 = NSFW).

    Parameters
    ----------
    df : pandas.DataFrame or cudf.DataFrame
        The partition.  pandas: an Arrow ``list``/``large_list``/``fixed_size_list`` column of
        float16/32/64 (read parquet with ``dtype_backend="pyarrow"``), or an object column of
        numpy arrays.  cuDF: a ``list<float>`` column.
    column : str, optional
        The embedding column.  Default: the only list-of-float column (an error lists the
        candidates when there are several or none).
    model : {"vit-l-14", "vit-b-32"}
        ``"vit-l-14"`` scores 768-d CLIP ViT-L/14 embeddings, ``"vit-b-32"`` 512-d ViT-B/32 ones.
    score_column : str, default "nsfw_score"
        Name of the appended column (replaced if it exists).
    batch_size : int, optional
        Rows per forward pass; default: the best measured for the device, CPU kind and torch
        thread count (4,096 with AVX-512 and several threads, else 1,024; CUDA: one 32,768-row
        block).  The scores do not depend on it.
    device : str or torch.device, optional
        Default: where the data is (cuDF -> the current CUDA device, pandas -> CPU).  Passing
        ``"cuda"`` for a pandas partition moves it batch by batch.
    model_dir : path, optional
        Folder searched first for the weights (then ``$NSFW_DASK_MODEL_DIR``, the user cache,
        a download).
    exact : bool, default False
        ``False``: NeMo Curator's torch port (Normalization -> MLP), within 1e-5 (the contract:
        docs/exact.md).  ``True``:
        LAION's original AutoKeras model, whose scores are LAION-5B's published ``punsafe``:
        a few columns are looked up in the original vocabularies (read from LAION's SavedModel
        zip, found like the weights) and NaN values count as 0.  See README, "Exact mode".
    normalize : bool, default False
        L2-normalise each embedding before scoring (``x / ||x||``; a zero vector gets NaN).  For
        raw ``encode_image`` outputs: LAION's heads were trained on unit-length embeddings.  A row
        holding a NaN has no norm and scores NaN, also with ``exact=True`` (where a NaN element
        otherwise counts as 0).
    norm_check : bool, default True
        Look at the norms of a sample of the rows (up to 1,024 per call, cheap next to scoring)
        and warn (:class:`~nsfw_dask.NotUnitNormWarning`) when they are clearly not unit length
        (median outside [0.5, 2]): such rows get confident, wrong scores.  ``False`` when you know
        your embeddings are right as they are.  It warns rather than refuses: a library call on one
        partition should not stop a pipeline on its own judgement; ``nsfw-dask score`` refuses.

    Returns
    -------
    DataFrame
        Same type as ``df``.

    Notes
    -----
    * Zero-copy: the scored tensor is a view of the Arrow (CPU) or cuDF (GPU) buffer.
    * A null embedding row gets a NaN score; other rows are unaffected.  A NaN anywhere in an
      embedding gives a NaN score (``exact=True``: the NaN counts as 0, as in the original
      model, and so does a null element inside a list); ``+-inf`` gives whatever the head
      computes (NaN or a saturated 0/1), as in both references.
    * Rows of the wrong length raise :class:`~nsfw_dask.EmbeddingFormatError` naming the column,
      the first bad row's index label, its length and the expected one, before any reshape.
    * An empty partition, and dask's meta inference, get the score column without loading the
      model, so ``ddf.map_partitions(score_nsfw)`` needs no ``meta=``.

    Examples
    --------
    >>> import dask.dataframe as dd
    >>> from nsfw_dask import score_nsfw
    >>> ddf = dd.read_parquet("embeddings/", dtype_backend="pyarrow")  # doctest: +SKIP
    >>> scored = ddf.map_partitions(score_nsfw)  # doctest: +SKIP
    >>> safe = scored[scored.nsfw_score < 0.5]  # doctest: +SKIP
    """
    return _score_and_attach(
        df,
        heads=("nsfw",),
        score_columns={"nsfw": score_column},
        column=column,
        model=model,
        batch_size=batch_size,
        device=device,
        model_dir=model_dir,
        exact=exact,
        normalize=normalize,
        norm_check=norm_check,
    )


def score_heads(
    df: Any,
    *,
    heads: str | Sequence[str] = ("nsfw",),
    column: Any = None,
    model: str = "vit-l-14",
    score_columns: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    exact: bool = False,
    normalize: bool = False,
    norm_check: bool = True,
) -> Any:
    """Score one partition with several of LAION's CLIP heads from one read of its embeddings.

    Made for ``ddf.map_partitions(score_heads, heads=("nsfw", "aesthetic"))`` (no ``meta=``
    needed); also works on any single pandas or cuDF DataFrame.  Returns a new frame with every
    column, the index and the row order of ``df``, plus one float32 column per head.

    Parameters
    ----------
    df : pandas.DataFrame or cudf.DataFrame
        The partition, as for :func:`score_nsfw`.
    heads : str or sequence of str
        ``"nsfw"`` (LAION's NSFW detector, 0..1), ``"aesthetic"`` (LAION's improved aesthetic
        predictor, ~1..10, ViT-L/14 only), ``"aesthetic-v1"`` (LAION-5B's ``aesthetic``, ~1..10);
        a comma-separated string works too.  See :mod:`nsfw_dask.heads`.
    column : str, optional
        The embedding column (default: the only list-of-float column).
    model : {"vit-l-14", "vit-b-32"}
        The CLIP model the embeddings come from; every head must have weights for it.
    score_columns : mapping, optional
        Head -> the column it writes (default ``nsfw_score``, ``aesthetic_score``,
        ``aesthetic_v1_score``: NeMo Curator's names for the first two).
    batch_size, device, model_dir
        As for :func:`score_nsfw`.
    exact : bool, default False
        The NSFW head reproduces LAION's original model (see :func:`score_nsfw`).
    normalize : bool, default False
        The NSFW head scores L2-normalised embeddings (the aesthetic heads always normalise, as
        their upstream inference code does).
    norm_check : bool, default True
        With the NSFW head and without ``normalize``: warn when the embeddings are clearly not
        unit length (:class:`~nsfw_dask.NotUnitNormWarning`; see :func:`score_nsfw`).

    Returns
    -------
    DataFrame
        Same type as ``df``; NaN scores for null or non-finite embeddings, per head.

    Examples
    --------
    >>> scored = ddf.map_partitions(score_heads, heads=("nsfw", "aesthetic"))  # doctest: +SKIP
    >>> subset = scored[(scored.nsfw_score < 0.5) & (scored.aesthetic_score >= 5)]  # doctest: +SKIP
    """
    specs = parse_heads(heads)
    cols = {h.name: h.score_column for h in specs}
    for name, c in (score_columns or {}).items():
        h = get_head(name)
        if h.name not in cols:
            raise ValueError(f"score_columns names the {h.name!r} head, which is not in heads={heads!r}.")
        cols[h.name] = c
    if len(set(cols.values())) != len(cols):
        raise ValueError(f"Two heads would write the same column: {cols}; pass score_columns= with distinct names.")
    return _score_and_attach(
        df,
        heads=tuple(h.name for h in specs),
        score_columns=cols,
        column=column,
        model=model,
        batch_size=batch_size,
        device=device,
        model_dir=model_dir,
        exact=exact,
        normalize=normalize,
        norm_check=norm_check,
    )


def score_aesthetic(
    df: Any,
    *,
    column: Any = None,
    model: str = "vit-l-14",
    score_column: Any = "aesthetic_score",
    head: str = "aesthetic",
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    model_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Score one partition with LAION's aesthetic predictor: :func:`score_nsfw`'s twin.

    ``head="aesthetic"`` (default): the improved predictor ("aesthetic v2", NeMo Curator's
    ``AestheticScorer``; ViT-L/14); ``head="aesthetic-v1"``: LAION-5B's ``aesthetic`` column
    (ViT-L/14 or ViT-B/32).  Both L2-normalise each embedding first, as their upstream
    inference code does, so raw and normalised embeddings score alike.  A float32
    ``score_column`` (~1..10) is appended; NaN for null or non-finite embeddings.

    Examples
    --------
    >>> scored = ddf.map_partitions(score_aesthetic)  # doctest: +SKIP
    >>> pretty = scored[scored.aesthetic_score >= 5]  # doctest: +SKIP
    """
    h = get_head(head)
    if h.name == "nsfw":
        raise ValueError("score_aesthetic scores an aesthetic head; use score_nsfw for 'nsfw'.")
    return _score_and_attach(
        df,
        heads=(h.name,),
        score_columns={h.name: score_column},
        column=column,
        model=model,
        batch_size=batch_size,
        device=device,
        model_dir=model_dir,
        exact=False,
        normalize=False,
        norm_check=False,
    )


def _check_call(batch_size: Any, exact: Any) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral) or batch_size < 1
    ):
        raise ValueError(f"Expected batch_size to be a positive int or None but got {batch_size!r}")
    if not isinstance(exact, bool):
        raise TypeError(f"Expected exact to be True or False but got {exact!r}")


def _score_and_attach(
    df: Any,
    *,
    heads: tuple[str, ...],
    score_columns: Mapping[str, Any],
    column: Any,
    model: str,
    batch_size: int | None,
    device: str | torch.device | None,
    model_dir: str | os.PathLike[str] | None,
    exact: bool,
    normalize: bool,
    norm_check: bool,
) -> Any:
    """``score_nsfw`` / ``score_heads`` / ``score_aesthetic``: resolve, score, attach each head's column."""
    _check_call(batch_size, exact)
    specs = parse_heads(heads)
    if exact and all(h.name != "nsfw" for h in specs):
        raise ValueError("exact=True is LAION's original NSFW model; it needs the 'nsfw' head in heads=.")
    for h in specs:
        h.spec_for(model)  # every head has weights for this CLIP model (else one line, now)
    backend = get_backend(df)
    schema_only = _in_dask_meta_inference()
    col = backend.resolve_column(df, column, schema_only=schema_only)  # None: undecided on dask's fake partition
    for h in specs:
        if col is not None and score_columns[h.name] == col:
            keyword = "score_column" if len(specs) == 1 else f"score_columns[{h.name!r}]"
            raise ValueError(f"{keyword} {score_columns[h.name]!r} is the embedding column; choose another name.")
    n = len(df)
    scores: list[torch.Tensor | None] = [None] * len(specs)
    if n and not schema_only:
        got, _ = _score_frame(
            backend,
            df,
            col,
            specs,
            model,
            column_given=column is not None,
            batch_size=batch_size,
            device=device,
            model_dir=model_dir,
            exact=exact,
            normalize=normalize,
            warn_norms=norm_check,
            with_norms=False,
        )
        if got is not None:
            scores = list(got)
    out = df
    for h, sc in zip(specs, scores):
        out = backend.attach(out, score_columns[h.name], sc)
    return out


def _score_frame(
    backend: Any,
    df: Any,
    col: Any,
    heads: tuple[HeadSpec, ...],
    model: str,
    *,
    column_given: bool,
    batch_size: int | None,
    device: str | torch.device | None,
    model_dir: str | os.PathLike[str] | None,
    exact: bool,
    normalize: bool,
    warn_norms: bool,
    with_norms: bool,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """Each head's scores of ``df[col]`` (None: no row has an embedding, so no model was loaded)
    and, ``with_norms``, every row's L2 norm; ``warn_norms``: the sampled norm check's warning
    (for the NSFW head: the aesthetic heads normalise their input themselves)."""
    clip = get_spec(model)  # the embedding width and the messages' model names
    try:
        segments = backend.to_segments(df, col, clip)
    except EmbeddingFormatError as e:
        if not column_given:
            raise
        # the caller named the column: the fix is the cast alone, not "or pass column="
        raise EmbeddingFormatError(_COLUMN_HINT.sub(".", str(e))) from None
    if not any(seg.emb.shape[0] for seg in segments):  # every row null: no model needed
        return None, None
    n = len(df)
    dev = resolve_device(device if device is not None else backend.default_device(df))
    if warn_norms and not normalize and any(not h.normalizes for h in heads):
        warn_if_not_unit([seg.emb for seg in segments], f"Column {col!r}", stacklevel=5)
    bs = int(batch_size) if batch_size else _default_batch_size(dev)
    models: Any
    if len(heads) == 1:  # one head: its own model (the runner NSFWScorer and score_tensor share)
        only = heads[0]
        models = load_model(only.spec_for(model), device=dev, model_dir=model_dir, exact=exact and only.name == "nsfw")
    else:
        models = load_heads(heads, clip.name, device=dev, model_dir=model_dir, exact=exact)
    norms = torch.empty(n, dtype=torch.float32, device=dev) if with_norms else None
    outs = _score_segments(models, segments, n, batch_size=bs, device=dev, norms=norms, normalize=normalize)
    logger.debug(
        "scored %d rows of %r with %s on %s in %d segment(s), exact=%s",
        n,
        col,
        ",".join(h.name for h in heads),
        dev,
        len(segments),
        exact,
    )
    return outs, norms


def score_partition(
    df: Any,
    *,
    column: Any,
    model: str = "vit-l-14",
    heads: Sequence[str] = ("nsfw",),
    batch_size: int | None = None,
    device: str | torch.device | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    exact: bool = False,
    normalize: bool = False,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The job's scoring step: each head's float32 scores and every row's L2 norm, as host arrays.

    NaN for rows without an embedding, in both.  The norms come from the forward pass (each
    batch while it is in cache); the job checks and reports them (:mod:`nsfw_dask._norms`).
    """
    specs = parse_heads(heads)
    backend = get_backend(df)
    col = backend.resolve_column(df, column, schema_only=False)
    outs, norms = _score_frame(
        backend,
        df,
        col,
        specs,
        model,
        column_given=True,
        batch_size=batch_size,
        device=device,
        model_dir=model_dir,
        exact=exact,
        normalize=normalize,
        warn_norms=False,
        with_norms=True,
    )
    if outs is None or norms is None:
        nan = np.full(len(df), np.nan, dtype=np.float32)
        return {h.name: nan.copy() for h in specs}, nan
    return {h.name: o.cpu().numpy() for h, o in zip(specs, outs)}, norms.cpu().numpy()


def nsfw_meta(frame: Any, *, column: Any = None, score_column: Any = "nsfw_score") -> Any:
    """The ``meta`` of ``frame.map_partitions(score_nsfw, ...)``: its columns plus float32 score.

    For users who pass ``meta=`` explicitly (no model is loaded, no data read).

    Examples
    --------
    >>> scored = ddf.map_partitions(score_nsfw, meta=nsfw_meta(ddf))  # doctest: +SKIP
    """
    from ._compat import collection_meta

    empty = collection_meta(frame).iloc[:0]
    # a schema, like dask's fake partition: a collection's meta may describe the embedding
    # column as something else (dask_cudf's parquet meta: strings), so names and dtypes decide
    # only what they can (see _common.meta_inference_column); the partitions decide the rest
    backend = get_backend(empty)
    col = backend.resolve_column(empty, column, schema_only=True)
    if col is not None and score_column == col:
        raise ValueError(f"score_column {score_column!r} is the embedding column; choose another name.")
    return backend.attach(empty, score_column, None)


def score(ddf: Any, **kwargs: Any) -> Any:
    """``ddf.map_partitions(score_nsfw, meta=nsfw_meta(ddf), **kwargs)`` in one call.

    Keyword arguments are those of :func:`score_nsfw`.
    """
    meta = nsfw_meta(ddf, column=kwargs.get("column"), score_column=kwargs.get("score_column", "nsfw_score"))
    return ddf.map_partitions(score_nsfw, meta=meta, **kwargs)
