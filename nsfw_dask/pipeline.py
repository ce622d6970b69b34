"""The main job: score a whole dataset on Dask into a resumable, committed parquet folder.

:func:`score_dataset` is what ``nsfw-dask score`` runs.  It plans the input on the client (file
listing and parquet footers / ``.npy`` headers only: no data), then submits one task per input
partition.  Each task runs on a worker, reads its own rows from storage, scores them, writes one
output part and commits it (locally a rename, on object stores one finished upload), then reads
the part's footer back to verify it.  Nothing but a few numbers per part travels to the client.

OUTPUT layout (a local folder or any fsspec URL)::

    OUTPUT/_nsfw_dask_job.json           the job: input files (size, mtime/etag), options, version
    OUTPUT/part.000000.<source>.parquet  one part per input partition, in input order
    OUTPUT/part.000001.<source>.parquet
    ...
    OUTPUT/_SUCCESS                      written last, after every part was verified

Names starting with ``_`` or ``.`` are skipped by pyarrow, dask, pandas and Spark readers, so
temporary files (``.part.*.tmp-*``) and the job file are never read as data.  An OUTPUT is
finished only when it has ``_SUCCESS``.  A killed run keeps its committed parts; ``resume=True``
checks the job description, keeps every part whose footer checks out and scores only the rest.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._version import __version__
from .exceptions import EmbeddingFormatError, JobError
from .io import is_local, show_path
from .models import get_spec

__all__ = [
    "JOB_FILE",
    "SUCCESS_FILE",
    "JobError",
    "Summary",
    "score_dataset",
]

logger = logging.getLogger(__name__)

JOB_FILE = "_nsfw_dask_job.json"
SUCCESS_FILE = "_SUCCESS"
ROW_NUMBER_COLUMN = "row_number"
IS_NSFW_COLUMN = "is_nsfw"
FILTERS = ("none", "keep-safe", "keep-nsfw")
KEEP_EMBEDDINGS = (False, "binary", "list")
HIST_BINS = 10_000  # summary quantiles are exact to 1 / HIST_BINS
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
DEFAULT_ROWS_PER_PARTITION = 262_144
_PART_KEY = b"nsfw_dask.part"
_JOB_FORMAT = "nsfw-dask-job/1"
_PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")
# the writer settings: dictionary encoding only where it pays (see docs/performance.md)
_WRITE_OPTS: dict[str, Any] = {"compression": "snappy"}


# ----------------------------------------------------------------------------- summary


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
    histogram: np.ndarray = field(default_factory=lambda: np.zeros(HIST_BINS, np.int64), repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every field but the histogram."""
        d = asdict(self)
        d.pop("histogram")
        return d


def histogram(scores: np.ndarray) -> np.ndarray:
    """Counts of the finite scores in ``HIST_BINS`` equal bins of [0, 1] (bin k: [k, k+1) / HIST_BINS)."""
    v = np.asarray(scores, dtype=np.float64)
    v = v[np.isfinite(v)]
    k = np.clip(np.floor(v * HIST_BINS), 0, HIST_BINS - 1).astype(np.intp)
    return np.bincount(k, minlength=HIST_BINS).astype(np.int64)


def quantiles_from_histogram(hist: np.ndarray, qs: tuple[float, ...] = QUANTILES) -> dict[str, float | None]:
    """Each quantile as the lower edge of its bin: the true value lies in [q, q + 1/HIST_BINS).

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
        out[key] = k / HIST_BINS
    return out


def _encode_hist(h: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.asarray(h, "<i8").tobytes(), 6)).decode()


def _decode_hist(s: str) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(s)), "<i8").astype(np.int64)


# ----------------------------------------------------------------------------- paths


def _is_url(path: str) -> bool:
    return "://" in path


def _has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def normalize_path(path: str | os.PathLike[str]) -> str:
    """``~`` expanded, ``file://`` stripped, made absolute; URLs of other protocols unchanged."""
    p = os.fspath(path)
    if p.startswith("file://"):
        p = p[len("file://") :]
    if _is_url(p):
        return p
    return os.path.abspath(os.path.expanduser(p))


def _fs(path: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise JobError(f"cannot open {path}: {e}") from e
    return fs, (root.rstrip("/") or "/")


def _real(path: str) -> str:
    return os.path.realpath(path)


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _stamp(info: dict[str, Any]) -> dict[str, Any]:
    """What identifies a file's content version: its size and mtime / ETag (whatever fsspec gives)."""
    out: dict[str, Any] = {"size": info.get("size")}
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(key) is not None:
            v = info[key]
            out["version"] = v if isinstance(v, (int, float, str)) else str(v)
            break
    return out


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Part:
    """One input partition and the output part it becomes."""

    index: int
    source: str  # the parquet file (parquet_npy: the metadata parquet), fs path
    npy: str | None  # parquet_npy: the .npy file
    start: int  # rows [start, stop) of that file
    stop: int
    offset: int  # global row number of the file's row 0 (parquet_npy)
    name: str  # output part file name

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass
class Plan:
    """Everything a worker needs to score and write its part (pickled into each task)."""

    kind: str  # "parquet" or "parquet_npy"
    in_fs: Any
    input: str
    files: list[dict[str, Any]]  # [{"path", "size", "version"}], the job description's input
    parts: list[Part]
    column: str  # the embedding column (parquet_npy: the name it gets)
    meta_columns: list[str]  # the other input columns, in order
    pandas_metadata: dict[str, Any] | None
    out_fs: Any = None
    out_root: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    job_id: str = ""


def _footer(fs: Any, path: str) -> pq.FileMetaData:
    try:
        if is_local(fs):
            return pq.read_metadata(path)
        with fs.open(path, "rb") as f:
            return pq.read_metadata(f)
    except (pa.ArrowInvalid, OSError) as e:
        size = None
        with contextlib.suppress(Exception):
            size = fs.size(path)
        what = "is empty (0 bytes)" if size == 0 else "is not a readable parquet file"
        raise JobError(
            f"INPUT file {show_path(fs, path)} {what} ({str(e).splitlines()[0]}); remove or replace it."
        ) from e


def _list_parquet(fs: Any, root: str, given: str) -> list[str]:
    """The data files of a parquet folder: ``*.parquet`` (also .parq/.pq), hidden ones skipped."""
    files = []
    for path in sorted(fs.find(root)):
        rel = path[len(root) :].lstrip("/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        if path.endswith(_PARQUET_SUFFIXES):
            files.append(path)
    if not files:
        raise JobError(
            f"INPUT folder {given} has no parquet files (*.parquet); check the path, or pass "
            "a LAION parquet_npy folder (img_emb/ + metadata/)."
        )
    return files


def _source_stem(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    for suffix in _PARQUET_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", name).strip(".-") or "part"


def _split(n_rows: int, group_rows: list[int], rows_per_partition: int) -> list[tuple[int, int]]:
    """Row ranges of one file: whole row groups merged up to ``rows_per_partition``; a larger
    group is cut into equal pieces (so no piece is a small leftover)."""
    ranges: list[tuple[int, int]] = []
    start = pos = 0
    for g in group_rows if group_rows else ([n_rows] if n_rows else []):
        if g > rows_per_partition:
            if pos > start:
                ranges.append((start, pos))
            k = -(-g // rows_per_partition)
            cuts = [pos + (g * i) // k for i in range(k + 1)]
            ranges.extend(zip(cuts[:-1], cuts[1:]))
            pos += g
            start = pos
            continue
        if pos + g - start > rows_per_partition:
            ranges.append((start, pos))
            start = pos
        pos += g
    if pos > start:
        ranges.append((start, pos))
    return ranges


def _check_embedding_type(t: pa.DataType, column: str, spec: Any, where: str) -> None:
    """The embedding column's Arrow type, checked before any worker starts."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        raise JobError(
            f"Column {column!r} in {where} is {t}, not a list of floats (CLIP embeddings); "
            "pass --column naming the embedding column."
        )
    vt = t.value_type
    if not pa.types.is_floating(vt):
        raise JobError(
            f"Column {column!r} in {where} holds lists of {vt}, not of float16/32/64; "
            "pass --column naming the CLIP embedding column."
        )
    if pa.types.is_fixed_size_list(t) and t.list_size != spec.dim:
        from ._common import dim_hint

        raise JobError(
            f"Column {column!r} in {where} holds {t.list_size}-d vectors; the {spec.name} head "
            f"expects {spec.dim}.{dim_hint(t.list_size, spec)}"
        )


def _choose_column(schema: pa.Schema, column: str | None, where: str) -> str:
    names = schema.names
    if column is not None:
        if column not in names:
            raise JobError(
                f"Column {column!r} not found in {where}; it has columns {names}. "
                "Pass --column naming the CLIP embedding column."
            )
        return column
    floats = [
        f.name
        for f in schema
        if (pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type))
        and pa.types.is_floating(f.type.value_type)
    ]
    if len(floats) == 1:
        return floats[0]
    if floats:
        raise JobError(
            f"Several columns of {where} hold lists of floats: {floats}; pass --column to "
            "choose the CLIP embedding column."
        )
    desc = ", ".join(f"{f.name!r}: {f.type}" for f in schema)
    raise JobError(
        f"No column of float lists (CLIP embeddings) in {where}; columns are {{{desc}}}. "
        "Pass --column naming the embedding column."
    )


def _map_threads(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    if len(items) <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(32, len(items))) as pool:
        return list(pool.map(fn, items))


def plan_input(
    input: str | os.PathLike[str],
    *,
    column: str | None = None,
    model: str = "vit-l-14",
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION,
    storage_options: dict[str, Any] | None = None,
) -> Plan:
    """Plan the job's input from file listings, parquet footers and ``.npy`` headers (no data).

    Raises :class:`JobError` naming the file and the fix for: a path or glob that matches
    nothing, an empty folder, a ``.npy`` given instead of its parquet_npy folder, a file that is
    not parquet (empty, truncated), files whose schemas differ, a missing or non-float embedding
    column, and embeddings whose width does not fit ``model``.
    """
    from . import io as _io

    spec = get_spec(model)
    given = os.fspath(input)
    path = normalize_path(given)
    fs, root = _fs(path, storage_options)
    if _has_glob(path):
        files = sorted(f for f in fs.glob(root) if fs.isfile(f))
        if not files:
            raise JobError(f"INPUT {given} matches no files; check the pattern.")
        kind = "parquet"
    elif fs.isdir(root):
        kind = "parquet_npy" if fs.isdir(f"{root}/img_emb") and fs.isdir(f"{root}/metadata") else "parquet"
        files = []
    elif fs.isfile(root):
        if root.endswith(".npy"):
            raise JobError(
                f"INPUT {given} is a .npy file; pass the parquet_npy folder that holds "
                "img_emb/ and metadata/ (the metadata rows come from there).",
                2,
            )
        files = [root]
        kind = "parquet"
    else:
        raise JobError(
            f"INPUT {given} not found (a parquet file, folder, glob or URL, or a parquet_npy folder); check the path."
        )

    parts: list[Part] = []
    if kind == "parquet_npy":
        emb = column or "embedding"
        try:
            pairs = _io._pairs(fs, root)
        except FileNotFoundError as e:
            raise JobError(f"INPUT {given}: {e}; add the .npy files or pass another folder.") from e
        except EmbeddingFormatError as e:
            raise JobError(f"INPUT {given}: {e}") from e
        headers = _map_threads(lambda p: _io._npy_header(fs, p[0]), pairs)
        footers = _map_threads(lambda p: _footer(fs, p[1]), pairs)
        schema0 = footers[0].schema.to_arrow_schema()
        names0 = [n for n in schema0.names if not _io._PANDAS_INDEX.fullmatch(n)]
        if emb in names0:
            raise JobError(
                f"{show_path(fs, pairs[0][1])} already has a column {emb!r}; pass --column with "
                "another name for the embeddings of img_emb/ (e.g. --column clip_embedding).",
                2,
            )
        if ROW_NUMBER_COLUMN in names0:
            raise JobError(
                f"{show_path(fs, pairs[0][1])} already has a column {ROW_NUMBER_COLUMN!r}, which the "
                "output uses for the global row number; rename that column in the metadata.",
                2,
            )
        offset = 0
        width0 = None
        for (npy, meta), (shape, dtype, _fortran, data_offset), md in zip(pairs, headers, footers):
            where = show_path(fs, npy)
            if len(shape) != 2 or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
                raise JobError(f"{where} holds a {dtype} array of shape {shape}; expected (rows, dim) floats.")
            if shape[1] != spec.dim:
                from ._common import dim_hint

                raise JobError(
                    f"{where} holds {shape[1]}-d embeddings; the {spec.name} head expects "
                    f"{spec.dim}.{dim_hint(shape[1], spec)}"
                )
            if width0 is not None and (dtype, shape[1]) != width0:
                raise JobError(
                    f"{where} holds {dtype} rows but {show_path(fs, pairs[0][0])} holds "
                    f"{width0[0]}; all .npy files must agree."
                )
            width0 = (dtype, shape[1])
            size = fs.size(npy)
            if size is not None and size < data_offset + int(np.prod(shape)) * dtype.itemsize:
                raise JobError(
                    f"{where} is truncated: its header says {shape} {dtype} but the file has "
                    f"only {size} bytes; regenerate it."
                )
            if md.num_rows != shape[0]:
                raise JobError(
                    f"{where} has {shape[0]} rows but {show_path(fs, meta)} has {md.num_rows}: the "
                    "pair must describe the same images in the same order."
                )
            names = [n for n in md.schema.to_arrow_schema().names if not _io._PANDAS_INDEX.fullmatch(n)]
            if names != names0:
                raise JobError(
                    f"{show_path(fs, meta)} has columns {names} but {show_path(fs, pairs[0][1])} has "
                    f"{names0}; all metadata files must have the same columns."
                )
            groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            for a, b in _split(shape[0], groups, rows_per_partition):
                parts.append(Part(len(parts), meta, npy, a, b, offset, ""))
            offset += shape[0]
        file_list = [p for pair in pairs for p in pair]
        meta_columns = names0
        pandas_md = None
        column_name = emb
    else:
        if not files:
            files = _list_parquet(fs, root, given)
        bad_npy = [f for f in files if f.endswith(".npy")]
        if bad_npy:
            raise JobError(
                f"INPUT {given} names .npy files ({show_path(fs, bad_npy[0])}); pass the parquet_npy "
                "folder that holds img_emb/ and metadata/.",
                2,
            )
        footers = _map_threads(lambda f: _footer(fs, f), files)
        schema0 = footers[0].schema.to_arrow_schema()
        where0 = show_path(fs, files[0])
        for f, md in zip(files[1:], footers[1:]):
            s = md.schema.to_arrow_schema()
            if not s.remove_metadata().equals(schema0.remove_metadata()):
                raise JobError(
                    f"{show_path(fs, f)} has schema {_schema_line(s)} but {where0} has "
                    f"{_schema_line(schema0)}; all INPUT files must have the same columns and types."
                )
        column_name = _choose_column(schema0, column, where0)
        _check_embedding_type(schema0.field(column_name).type, column_name, spec, where0)
        for f, md in zip(files, footers):
            groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            for a, b in _split(md.num_rows, groups, rows_per_partition):
                parts.append(Part(len(parts), f, None, a, b, 0, ""))
        file_list = files
        meta_columns = [n for n in schema0.names if n != column_name]
        pandas_md = schema0.pandas_metadata
    if not parts:  # only empty files: one empty part, so that OUTPUT still has a readable schema
        src = file_list[-1] if kind == "parquet" else pairs[0][1]
        parts = [Part(0, src, None if kind == "parquet" else pairs[0][0], 0, 0, 0, "")]
    width = max(6, len(str(len(parts) - 1)))
    parts = [
        Part(
            p.index,
            p.source,
            p.npy,
            p.start,
            p.stop,
            p.offset,
            f"part.{p.index:0{width}d}.{_source_stem(p.source)}.parquet",
        )
        for p in parts
    ]
    infos = _map_threads(fs.info, file_list)
    stamps = [{"path": show_path(fs, f), **_stamp(i)} for f, i in zip(file_list, infos)]
    return Plan(
        kind=kind,
        in_fs=fs,
        input=path,
        files=stamps,
        parts=parts,
        column=column_name,
        meta_columns=meta_columns,
        pandas_metadata=pandas_md,
    )


def _schema_line(s: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in s) + "}"


# ----------------------------------------------------------------------------- the worker side


@dataclass(frozen=True)
class _Options:
    model: str
    exact: bool
    score_column: str
    threshold: float | None
    filter: str
    keep_embeddings: Any
    batch_size: int | None
    device: str | None
    model_dir: str | None


def _load(plan: Plan, part: Part) -> tuple[pa.Table, pa.Array | pa.ChunkedArray]:
    """The part's other columns (an Arrow table) and its embedding column (an Arrow array)."""
    from . import io as _io

    fs = plan.in_fs
    if plan.kind == "parquet_npy":
        assert part.npy is not None
        emb = _io._read_npy(fs, part.npy, part.start, part.stop)
        if not emb.dtype.isnative:
            emb = emb.astype(emb.dtype.newbyteorder("="))
        values = pa.array(np.ascontiguousarray(emb).reshape(-1))  # a view of the memory map when local
        lists = pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
        table = _io._read_rows(fs, part.source, part.start, part.stop)
        drop = [n for n in table.column_names if _io._PANDAS_INDEX.fullmatch(n)]
        table = table.drop_columns(drop) if drop else table
        table = table.replace_schema_metadata(None)
        rows = pa.array(np.arange(part.offset + part.start, part.offset + part.stop, dtype=np.int64))
        table = table.add_column(0, ROW_NUMBER_COLUMN, rows)
        return table, lists
    table = _io._read_rows(fs, part.source, part.start, part.stop)
    col = table.column(plan.column)  # one chunk per row group: scored chunk by chunk, never combined
    return table.drop_columns([plan.column]), col


def _score(plan: Plan, part: Part, emb: pa.Array, opts: _Options) -> np.ndarray:
    import pandas as pd

    from .scoring import score_nsfw

    frame = pd.DataFrame({plan.column: pd.arrays.ArrowExtensionArray(emb)}, index=pd.RangeIndex(part.start, part.stop))
    try:
        out = score_nsfw(
            frame,
            column=plan.column,
            model=opts.model,
            exact=opts.exact,
            batch_size=opts.batch_size,
            device=opts.device,
            model_dir=opts.model_dir,
            score_column="__nsfw_score__",
        )
    except EmbeddingFormatError as e:
        shown = show_path(plan.in_fs, part.npy or part.source)
        raise EmbeddingFormatError(
            f"{shown}, rows {part.start}-{part.stop - 1} of that file (row numbers count from 0 within the file): {e}"
        ) from None
    return np.asarray(out["__nsfw_score__"].to_numpy(), dtype=np.float32)


def _embedding_as_binary(emb: pa.Array) -> pa.Array:
    """The vectors as fixed_size_binary(dim * itemsize): the raw bytes, no list levels to encode."""
    if isinstance(emb, pa.ChunkedArray):
        emb = emb.combine_chunks()
    vt = emb.type.value_type
    item = np.dtype(vt.to_pandas_dtype()).itemsize
    n = len(emb)
    if pa.types.is_fixed_size_list(emb.type) and emb.null_count == 0 and emb.values.null_count == 0:
        dim = emb.type.list_size  # the values buffer already is the rows' bytes: no copy
        values = emb.values.slice(emb.offset * dim, n * dim)
        buf = values.buffers()[1]
        start = values.offset * item
        return pa.FixedSizeBinaryArray.from_buffers(pa.binary(dim * item), n, [None, buf.slice(start, n * dim * item)])
    if pa.types.is_fixed_size_list(emb.type):
        dim = emb.type.list_size
    else:
        lengths = pc_list_lengths(emb)
        dim = int(np.max(lengths)) if n and np.any(lengths >= 0) else 0
    flat = np.zeros((n, dim), dtype=np.dtype(vt.to_pandas_dtype()))
    valid = np.asarray(emb.is_valid())
    if n and valid.any():
        values = emb.flatten()
        if values.null_count:
            values = values.fill_null(float("nan"))
        flat[valid] = values.to_numpy(zero_copy_only=False).reshape(-1, dim)
    mask = None if valid.all() else pa.array(valid).buffers()[1]
    arr = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(dim * item), n, [mask, pa.py_buffer(flat)], null_count=int(n - valid.sum())
    )
    return arr


def pc_list_lengths(emb: pa.Array) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(emb).fill_null(-1), dtype=np.int64)


def _output_table(
    plan: Plan, part: Part, table: pa.Table, emb: pa.Array, scores: np.ndarray, opts: _Options, stats: dict[str, Any]
) -> pa.Table:
    out = table
    if opts.keep_embeddings == "list":
        out = out.append_column(plan.column, emb)
    elif opts.keep_embeddings:
        vt = emb.type.value_type
        f = pa.field(
            plan.column,
            pa.binary(1),
            metadata={
                b"nsfw_dask.embedding": json.dumps(
                    {"dtype": str(np.dtype(vt.to_pandas_dtype())), "byteorder": "little", "arrow_type": str(emb.type)}
                ).encode()
            },
        )
        b = _embedding_as_binary(emb)
        out = out.append_column(f.with_type(b.type), b)
    nan = np.isnan(scores)
    s_arr = pa.array(scores, type=pa.float32())
    out = out.append_column(opts.score_column, s_arr)
    if opts.threshold is not None:
        flags = pa.array(scores >= opts.threshold, mask=nan, type=pa.bool_())
        out = out.append_column(IS_NSFW_COLUMN, flags)
    if opts.filter != "none":
        keep = (scores < opts.threshold) if opts.filter == "keep-safe" else (scores >= opts.threshold)
        keep &= ~nan
        out = out.filter(pa.array(keep))
    out = out.replace_schema_metadata(_schema_metadata(plan, opts, part, stats, out.num_rows))
    return out


def _schema_metadata(
    plan: Plan, opts: _Options, part: Part, stats: dict[str, Any], rows_written: int
) -> dict[bytes, bytes]:
    md: dict[bytes, bytes] = {}
    pandas_md = _output_pandas_metadata(plan, opts)
    if pandas_md is not None:
        md[b"pandas"] = json.dumps(pandas_md).encode()
    info = {
        "job": plan.job_id,
        "part": part.index,
        "source": show_path(plan.in_fs, part.npy or part.source),
        "rows": [part.start, part.stop],
        "input_rows": part.rows,
        "rows_written": rows_written,
        "nan_scores": stats["nan_scores"],
        "over_threshold": stats["over_threshold"],
        "histogram": _encode_hist(stats["histogram"]),
        "version": __version__,
    }
    md[_PART_KEY] = json.dumps(info).encode()
    return md


_ADDED_PANDAS_COLUMNS: dict[str, dict[str, Any]] = {
    "score": {"pandas_type": "float32", "numpy_type": "float32", "metadata": None},
    IS_NSFW_COLUMN: {"pandas_type": "bool", "numpy_type": "boolean", "metadata": None},
    ROW_NUMBER_COLUMN: {"pandas_type": "int64", "numpy_type": "int64", "metadata": None},
}


def _output_pandas_metadata(plan: Plan, opts: _Options) -> dict[str, Any] | None:
    """pandas metadata for a part: the input's (stored index kept; a RangeIndex becomes pandas'
    default, since a part is a slice) with entries for the columns we add, so that plain
    ``pd.read_parquet`` gives float32 scores and a nullable boolean ``is_nsfw``."""
    base = plan.pandas_metadata if plan.kind == "parquet" else None
    md: dict[str, Any] = (
        dict(base)
        if base
        else {
            "index_columns": [],
            "column_indexes": [],
            "columns": [],
            "creator": {"library": "nsfw_dask", "version": __version__},
            "pandas_version": _pandas_version(),
        }
    )
    index_cols = [c for c in md.get("index_columns", []) if isinstance(c, str)]
    md["index_columns"] = index_cols
    columns = [c for c in md.get("columns", []) if c.get("field_name") != plan.column]
    have = {c.get("field_name") for c in columns}

    def add(name: str, kind: str) -> None:
        if name not in have:
            columns.append({"name": name, "field_name": name, **_ADDED_PANDAS_COLUMNS[kind]})

    if plan.kind == "parquet_npy":
        add(ROW_NUMBER_COLUMN, ROW_NUMBER_COLUMN)
    add(opts.score_column, "score")
    if opts.threshold is not None:
        add(IS_NSFW_COLUMN, IS_NSFW_COLUMN)
    md["columns"] = columns
    return md


def _pandas_version() -> str:
    import pandas as pd

    return pd.__version__


def _tmp_name(name: str) -> str:
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


_TMP = re.compile(r"\.(?P<name>.+)\.tmp-(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _write_committed(fs: Any, root: str, name: str, table: pa.Table) -> None:
    """Write ``table`` so that ``root/name`` appears only complete: a rename, or one upload."""
    final = f"{root}/{name}"
    if is_local(fs):
        tmp = f"{root}/{_tmp_name(name)}"
        try:
            pq.write_table(table, tmp, **_write_options(table))
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **_write_options(table))
    fs.pipe_file(final, buf.getvalue().to_pybytes())  # one PUT: the object exists only when complete


def _write_options(table: pa.Table) -> dict[str, Any]:
    """Dictionary-encode only the columns where it pays: strings of few distinct values.

    Trying a dictionary on unique strings (URLs, captions) and falling back costs ~35% of the
    write; binary embedding bytes never repeat.
    """
    opts = dict(_WRITE_OPTS)
    dict_cols = []
    for f in table.schema:
        t = f.type
        if pa.types.is_string(t) or pa.types.is_large_string(t):
            col = table.column(f.name)
            sample = col.slice(0, 4096)
            if len(sample) and len(sample.unique()) <= len(sample) // 4:
                dict_cols.append(f.name)
        elif pa.types.is_dictionary(t) or pa.types.is_boolean(t):
            dict_cols.append(f.name)
    opts["use_dictionary"] = dict_cols
    return opts


def _read_part_info(fs: Any, path: str) -> tuple[int, dict[str, Any] | None]:
    """Rows and our footer record of a committed part (None if it has none)."""
    if is_local(fs):
        md = pq.read_metadata(path)
    else:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f)
    kv = md.metadata or {}
    raw = kv.get(_PART_KEY)
    return md.num_rows, (json.loads(raw) if raw else None)


def _part_ok(plan: Plan, part: Part, rows: int, info: dict[str, Any] | None) -> bool:
    return (
        info is not None
        and info.get("job") == plan.job_id
        and info.get("part") == part.index
        and info.get("rows") == [part.start, part.stop]
        and info.get("rows_written") == rows
    )


def run_part(plan: Plan, part: Part, opts: _Options) -> dict[str, Any]:
    """One task: read, score, write and commit a part, then verify it from its footer.

    Returns the part's numbers for the summary (a few hundred bytes after compression).
    """
    table, emb = _load(plan, part)
    scores = _score(plan, part, emb, opts) if part.rows else np.zeros(0, np.float32)
    nan = np.isnan(scores)
    stats = {
        "nan_scores": int(nan.sum()),
        "over_threshold": int((scores >= opts.threshold).sum()) if opts.threshold is not None else 0,
        "histogram": histogram(scores),
    }
    out = _output_table(plan, part, table, emb, scores, opts, stats)
    del table, emb
    _write_committed(plan.out_fs, plan.out_root, part.name, out)
    rows, info = _read_part_info(plan.out_fs, f"{plan.out_root}/{part.name}")
    if rows != out.num_rows or not _part_ok(plan, part, rows, info):
        raise JobError(
            f"{show_path(plan.out_fs, plan.out_root + '/' + part.name)} was written with "
            f"{out.num_rows} rows but reads back as {rows}; the storage lost data. Rerun with --resume."
        )
    return {"part": part.index, "rows": part.rows, "rows_written": rows, "reused": False, **stats}


# ----------------------------------------------------------------------------- the client side


def _job_description(plan: Plan, opts: _Options, rows_per_partition: int) -> dict[str, Any]:
    content = {
        "input": show_path(plan.in_fs, plan.input) if not is_local(plan.in_fs) else plan.input,
        "input_kind": plan.kind,
        "input_files": plan.files,
        "options": {
            "model": opts.model,
            "exact": opts.exact,
            "column": plan.column,
            "score_column": opts.score_column,
            "threshold": opts.threshold,
            "filter": opts.filter,
            "keep_embeddings": opts.keep_embeddings,
            "rows_per_partition": rows_per_partition,
            # CUDA kernels may differ from CPU ones in the last bits: parts are not mixed
            "device": "cuda" if opts.device == "cuda" else "cpu",
        },
        "version": __version__,
    }
    job_id = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]
    return {
        "format": _JOB_FORMAT,
        "job_id": job_id,
        **content,
        "partitions": len(plan.parts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


_OPTION_FLAGS = {
    "model": "--model",
    "exact": "--exact",
    "column": "--column",
    "score_column": "--score-column",
    "threshold": "--threshold",
    "filter": "--filter",
    "keep_embeddings": "--keep-embeddings",
    "rows_per_partition": "--rows-per-partition",
    "device": "--gpu",
}


def _job_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    diffs = []
    if old.get("format") != new["format"]:
        return [f"it was written in format {old.get('format')!r}"]
    if old.get("version") != new["version"]:
        diffs.append(f"nsfw-dask version {old.get('version')} wrote it, this is {new['version']}")
    if old.get("input") != new["input"]:
        diffs.append(f"INPUT was {old.get('input')}, now {new['input']}")
    for k, v in new["options"].items():
        was = old.get("options", {}).get(k)
        if was != v:
            diffs.append(f"{_OPTION_FLAGS.get(k, k)} was {was!r}, now {v!r}")
    of = {f["path"]: f for f in old.get("input_files", [])}
    nf = {f["path"]: f for f in new["input_files"]}
    gone = sorted(of.keys() - nf.keys())
    added = sorted(nf.keys() - of.keys())
    if gone:
        diffs.append(f"{len(gone)} input file(s) are gone, e.g. {gone[0]}")
    if added:
        diffs.append(f"{len(added)} input file(s) are new, e.g. {added[0]}")
    changed = [p for p in sorted(of.keys() & nf.keys()) if of[p] != nf[p]]
    if changed:
        p = changed[0]
        diffs.append(
            f"{len(changed)} input file(s) changed since, e.g. {p} "
            f"(size/version {of[p].get('size')}/{of[p].get('version')} -> "
            f"{nf[p].get('size')}/{nf[p].get('version')})"
        )
    return diffs


def _read_json(fs: Any, path: str) -> dict[str, Any] | None:
    try:
        with fs.open(path, "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None
    except (ValueError, OSError):
        return {}


def _put_small(fs: Any, root: str, name: str, data: bytes) -> None:
    if is_local(fs):
        tmp = f"{root}/{_tmp_name(name)}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, f"{root}/{name}")
    else:
        fs.pipe_file(f"{root}/{name}", data)


def _listing(fs: Any, root: str) -> list[str]:
    try:
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        return []


def _check_overlap(plan: Plan, out_fs: Any, out_root: str, output_given: str) -> None:
    """OUTPUT must not contain, or sit inside, anything INPUT reads (globs, ``~``, symlinks resolved)."""
    in_fs = plan.in_fs
    if is_local(in_fs) != is_local(out_fs):
        return
    if not is_local(out_fs) and getattr(in_fs, "protocol", None) != getattr(out_fs, "protocol", None):
        return
    resolve = _real if is_local(out_fs) else (lambda p: p)
    out = resolve(out_root)
    roots = [resolve(_fs_path(in_fs, f["path"])) for f in plan.files]
    if not _has_glob(plan.input) and plan.kind is not None:
        roots.append(resolve(_fs_path(in_fs, plan.input)))
    for r in roots:
        if _inside(r, out) or _inside(out, r):
            raise JobError(
                f"OUTPUT {output_given} overlaps INPUT {plan.input} (both reach {r}); write "
                "to a folder outside INPUT. nsfw-dask never writes into or over its input.",
                2,
            )
    if is_local(out_fs):
        cwd = _real(os.getcwd())
        if _inside(cwd, out):
            raise JobError(
                f"OUTPUT {output_given} is the current folder or one of its parents; choose a new folder.", 2
            )


def _fs_path(fs: Any, shown: str) -> str:
    from ._compat import strip_protocol

    return shown if is_local(fs) else strip_protocol(fs, shown)


def _probe_shared_folder(client: Any, fs: Any, root: str, plan: Plan, given: str) -> None:
    """With a cluster we did not start, local paths must be the same folders on every worker.

    The probe file goes into OUTPUT's nearest existing folder (OUTPUT may not exist yet), before
    anything in OUTPUT is created or replaced.
    """
    token = uuid.uuid4().hex
    folder = root
    if is_local(fs):
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            folder = os.path.dirname(folder)
    probe = f"{folder}/._nsfw_dask_probe-{token}"
    checks: list[tuple[str, int]] = []
    if is_local(plan.in_fs):
        for f in {plan.files[0]["path"], plan.files[-1]["path"]}:
            checks.append((f, os.path.getsize(f)))
    if is_local(fs):
        with open(probe, "w") as fh:
            fh.write(token)
    try:
        result = client.run(_probe_on_worker, probe if is_local(fs) else None, token, checks)
    finally:
        if is_local(fs):
            with contextlib.suppress(OSError):
                os.unlink(probe)
    bad_out = [w for w, r in result.items() if not r[0]]
    bad_in = [(w, r[1]) for w, r in result.items() if r[1]]
    if bad_out:
        raise JobError(
            f"OUTPUT {given} is a local path that {len(bad_out)} worker(s) (e.g. {bad_out[0]}) do "
            "not see as the same folder; use a folder shared by every node (NFS) or an object-"
            "store URL (s3://, gs://, abfs://).",
            2,
        )
    if bad_in:
        w, f = bad_in[0]
        raise JobError(
            f"INPUT file {f} is not the same file on worker {w}; use a path every node shares or an object-store URL.",
            2,
        )


def _probe_on_worker(probe: str | None, token: str, checks: list[tuple[str, int]]) -> tuple[bool, str | None]:
    ok = True
    if probe is not None:
        try:
            with open(probe) as fh:
                ok = fh.read() == token
        except OSError:
            ok = False
    for path, size in checks:
        try:
            if os.path.getsize(path) != size:
                return ok, path
        except OSError:
            return ok, path
    return ok, None


#: Dask threads per worker process in the cluster the job starts on CPU machines.  Each thread
#: scores its own partition with one torch thread (the nanny sets ``OMP_NUM_THREADS=1``); the
#: processes share no memory, so fewer, fuller processes keep one copy of the model and of the
#: page cache's hot pages.  Measured on 2 cores (docs/performance.md): 1 process x 2 threads
#: scored ~17 % more rows/s than 2 processes x 1 thread; up to 4 threads per process keeps the
#: GIL (held between torch calls) from being contended.
THREADS_PER_WORKER = 4


def default_cluster_shape(
    n_workers: int | None = None, threads_per_worker: int | None = None, n_cpu: int | None = None
) -> tuple[int, int]:
    """``(workers, threads_per_worker)`` of the CPU cluster ``score_dataset`` starts.

    What is given wins; the rest fills the machine's cores with workers of at most 4 threads
    (1 x 2 on 2 cores, 2 x 3 on 6, 2 x 4 on 8, 16 x 4 on 64).

    Examples
    --------
    >>> default_cluster_shape(n_cpu=2), default_cluster_shape(n_cpu=6), default_cluster_shape(3, n_cpu=8)
    ((1, 2), (2, 3), (3, 2))
    """
    n_cpu = max(1, n_cpu or os.cpu_count() or 1)
    if n_workers and threads_per_worker:
        return n_workers, threads_per_worker
    if n_workers:
        return n_workers, max(1, n_cpu // n_workers)
    if threads_per_worker:
        return max(1, n_cpu // threads_per_worker), threads_per_worker
    workers = -(-n_cpu // THREADS_PER_WORKER)
    return workers, -(-n_cpu // workers)


def _gpu_cluster_options(n_workers: int | None, threads_per_worker: int | None) -> dict[str, Any]:
    """The keywords for ``local_cuda_cluster`` (checked against the visible GPUs: exit code 2)."""
    from .gpu import cuda_worker_options

    try:
        return cuda_worker_options(n_workers, threads_per_worker)
    except ValueError as e:
        raise JobError(str(e), 2) from None


@contextlib.contextmanager
def _cluster(
    client: Any, n_workers: int | None, threads_per_worker: int | None, gpu: bool, quiet: bool
) -> Iterator[tuple[Any, bool]]:
    """``(client, embedded)``: the given client, the current one, or a cluster started for the job."""
    if client is not None:
        yield client, False
        return
    from distributed import Client

    if gpu:
        from .gpu import local_cuda_cluster

        cluster = local_cuda_cluster(**_gpu_cluster_options(n_workers, threads_per_worker))
    else:
        from distributed import LocalCluster

        workers, threads = default_cluster_shape(n_workers, threads_per_worker)
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=threads,
            processes=True,
            dashboard_address=":0",  # a free port: no clash, no warning
            silence_logs=logging.CRITICAL if quiet else logging.WARNING,
        )
    with cluster, Client(cluster) as c:
        yield c, True


class _Progress:
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


def score_dataset(
    input: str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    column: str | None = None,
    model: str = "vit-l-14",
    exact: bool = False,
    threshold: float | None = None,
    filter: str | None = None,
    keep_embeddings: bool | str = False,
    resume: bool = False,
    overwrite: bool = False,
    client: Any = None,
    storage_options: dict[str, Any] | None = None,
    score_column: str = "nsfw_score",
    batch_size: int | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    gpu: bool = False,
    n_workers: int | None = None,
    threads_per_worker: int | None = None,
    rows_per_partition: int = DEFAULT_ROWS_PER_PARTITION,
    progress: bool = False,
    interrupted: threading.Event | None = None,
) -> Summary:
    """Score a parquet or LAION parquet_npy dataset into a committed, resumable parquet folder.

    Parameters
    ----------
    input : path or fsspec URL
        A parquet file, folder or glob with an Arrow list column of CLIP embeddings, or a LAION
        ``parquet_npy`` folder (``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet``).
        ``~`` is expanded; ``file://`` URLs are local paths.
    output : path or fsspec URL
        The output folder (``s3://``, ``gs://``, ``abfs://``, ``file://`` or a local path).
    column : str, optional
        The embedding column (parquet: default the only list-of-float column; parquet_npy: the
        name given to the ``.npy`` embeddings, default ``"embedding"``).
    model, exact, batch_size, model_dir
        As for :func:`nsfw_dask.score_nsfw`.
    threshold : float, optional
        Also write ``is_nsfw = score >= threshold`` (nullable; <NA> where the score is NaN).
    filter : {"none", "keep-safe", "keep-nsfw"}, optional
        Keep only rows with ``score < threshold`` (keep-safe) or ``>= threshold``; NaN scores are
        kept by neither.  ``threshold`` defaults to 0.5 then.
    keep_embeddings : {False, True, "binary", "list"}
        Also write the embedding column.  ``True``/``"binary"``: as ``fixed_size_binary`` with
        each vector's raw little-endian bytes (its field metadata names the dtype; ~15x faster to
        write than lists); ``"list"``: as the input's Arrow list type.
    resume : bool
        Continue an interrupted run into ``output``: refused if the job description differs;
        committed parts whose footer checks out are kept, the rest are scored.
    overwrite : bool
        Replace ``output`` (its ``_SUCCESS`` is removed first).
    client : distributed.Client, optional
        Run on this client's cluster.  Default: the current client if there is one, else a
        ``LocalCluster`` (``n_workers`` x ``threads_per_worker``; ``gpu=True``: a
        ``LocalCUDACluster``) started for the call.
    storage_options : dict, optional
        fsspec options for both ``input`` and ``output`` (credentials, endpoint).
    rows_per_partition : int
        Rows per output part at most (a part never spans two input files).
    progress : bool
        A progress line on stderr.
    interrupted : threading.Event, optional
        If set when the parts are done, ``_SUCCESS`` is not written (the CLI's signal flag).

    Returns
    -------
    Summary

    Raises
    ------
    JobError
        Paths, options or an existing OUTPUT prevent the run; the message names the fix.
    EmbeddingFormatError
        A row cannot be scored; the message names the file and the row within it.
    """
    from .weights import resolve_weights

    t0 = time.perf_counter()
    spec = get_spec(model)
    opts = _validate_options(
        spec.name,
        exact,
        score_column,
        threshold,
        filter,
        keep_embeddings,
        batch_size,
        resume,
        overwrite,
        rows_per_partition,
    )
    device = "cuda" if gpu else None
    opts = _Options(
        **{**asdict(opts), "device": device, "model_dir": None if model_dir is None else normalize_path(model_dir)}
    )

    plan = plan_input(
        input, column=column, model=spec.name, rows_per_partition=rows_per_partition, storage_options=storage_options
    )
    _check_column_clashes(plan, opts)
    output_given = os.fspath(output)
    out_path = normalize_path(output_given)
    out_fs, out_root = _fs(out_path, storage_options)
    _check_overlap(plan, out_fs, out_root, output_given)

    if client is None:
        with contextlib.suppress(ValueError):
            from distributed import default_client

            client = default_client()
    external = client is not None
    if external:  # workers may be on other nodes: local paths must be the same folders there
        _probe_shared_folder(client, out_fs, out_root, plan, output_given)

    if gpu and not external:  # --workers beyond the visible GPUs: refused before OUTPUT exists
        _gpu_cluster_options(n_workers, threads_per_worker)
    resolve_weights(spec.name, opts.model_dir)  # fail fast, on the client, with the fix in the message
    if exact:
        from .exact import load_vocabulary

        load_vocabulary(spec.name, opts.model_dir)

    plan.out_fs, plan.out_root = out_fs, out_root
    job = _job_description(plan, opts, rows_per_partition)
    plan.job_id = job["job_id"]
    reused, created = _prepare_output(plan, job, output_given, resume=resume, overwrite=overwrite)
    summary = Summary(
        partitions=len(plan.parts),
        partitions_reused=len(reused),
        threshold=opts.threshold,
        output=show_path(out_fs, out_root),
    )
    for r in reused.values():
        _add(summary, r)
    todo = [p for p in plan.parts if p.index not in reused]

    from distributed import as_completed

    from .plugin import NSFWModelPlugin

    quiet = logging.getLogger("nsfw_dask").getEffectiveLevel() > logging.INFO
    rows_scored = 0
    committed = 0
    try:
        with _cluster(client, n_workers, threads_per_worker, gpu, quiet) as (c, _embedded):
            if todo:
                c.register_plugin(
                    NSFWModelPlugin(spec.name, device=device or "cpu", model_dir=opts.model_dir, exact=exact)
                )
            t_compute = time.perf_counter()
            bar = _Progress(len(plan.parts), progress)
            done = len(reused)
            job_spec = replace(plan, parts=[], files=[])  # what each task needs: no per-part lists
            futures = c.map(
                run_part,
                [job_spec] * len(todo),
                todo,
                [opts] * len(todo),
                pure=False,
                key=[f"nsfw-dask-part-{plan.job_id}-{p.index}-{uuid.uuid4().hex[:6]}" for p in todo],
            )
            try:
                for fut in as_completed(futures):
                    if fut.status == "error":
                        raise fut.exception()
                    r = fut.result()
                    fut.release()
                    _add(summary, r)
                    committed += 1
                    rows_scored += r["rows"]
                    done += 1
                    bar.update(done, summary.rows)
                bar.update(done, summary.rows, force=True)
            except BaseException:
                c.cancel(futures)
                raise
            finally:
                bar.close()
                del futures
    except BaseException:
        if not committed and not reused:
            _remove_created(out_fs, out_root, created)
        raise
    compute_seconds = time.perf_counter() - t_compute
    if interrupted is not None and interrupted.is_set():
        raise KeyboardInterrupt("interrupted")
    _finish(plan, summary)
    summary.compute_seconds = compute_seconds
    summary.seconds = time.perf_counter() - t0
    summary.rows_per_s = rows_scored / compute_seconds if compute_seconds > 0 and rows_scored else 0.0
    summary.quantiles = quantiles_from_histogram(summary.histogram)
    return summary


def _add(summary: Summary, r: dict[str, Any]) -> None:
    summary.rows += r["rows"]
    summary.rows_written += r["rows_written"]
    summary.nan_scores += r["nan_scores"]
    summary.over_threshold += r["over_threshold"]
    summary.histogram = summary.histogram + r["histogram"]


def _validate_options(
    model: str,
    exact: bool,
    score_column: Any,
    threshold: Any,
    filter: Any,
    keep_embeddings: Any,
    batch_size: Any,
    resume: bool,
    overwrite: bool,
    rows_per_partition: Any,
) -> _Options:
    if not isinstance(score_column, str) or not score_column.strip():
        raise JobError(f"the score column needs a name (--score-column), not {score_column!r}", 2)
    if filter is None:
        filter = "none"
    if filter not in FILTERS:
        raise JobError(f"filter must be one of {FILTERS}, not {filter!r}", 2)
    if threshold is not None:
        threshold = float(threshold)
        if not 0.0 <= threshold <= 1.0:
            raise JobError(f"threshold must be in [0, 1], not {threshold}", 2)
    elif filter != "none":
        threshold = 0.5
    if keep_embeddings is True:
        keep_embeddings = "binary"
    if keep_embeddings not in KEEP_EMBEDDINGS:
        raise JobError(f"keep_embeddings must be False, True, 'binary' or 'list', not {keep_embeddings!r}", 2)
    if threshold is not None and score_column == IS_NSFW_COLUMN:
        raise JobError(
            f"--score-column {IS_NSFW_COLUMN!r} clashes with the {IS_NSFW_COLUMN} column that "
            "--threshold adds; choose another score column name.",
            2,
        )
    if resume and overwrite:
        raise JobError("--resume keeps the committed parts and --overwrite deletes them; pass one.", 2)
    if not isinstance(rows_per_partition, int) or isinstance(rows_per_partition, bool) or rows_per_partition < 1:
        raise JobError(f"rows_per_partition must be a positive integer, not {rows_per_partition!r}", 2)
    return _Options(
        model=model,
        exact=bool(exact),
        score_column=score_column,
        threshold=threshold,
        filter=filter,
        keep_embeddings=keep_embeddings,
        batch_size=batch_size,
        device=None,
        model_dir=None,
    )


def _check_column_clashes(plan: Plan, opts: _Options) -> None:
    """The columns we add must not clash with each other or with the input's."""
    existing = list(plan.meta_columns) + ([ROW_NUMBER_COLUMN] if plan.kind == "parquet_npy" else [])
    if opts.keep_embeddings:
        existing.append(plan.column)
    if opts.score_column == plan.column:
        raise JobError(f"--score-column {opts.score_column!r} is the embedding column; choose another name.", 2)
    if opts.score_column in existing:
        raise JobError(f"INPUT already has a column {opts.score_column!r}; pass --score-column with another name.", 2)
    if opts.threshold is not None and IS_NSFW_COLUMN in existing:
        raise JobError(
            f"INPUT already has a column {IS_NSFW_COLUMN!r}, which --threshold adds; rename or "
            f"drop that column in INPUT, or run without --threshold/--filter.",
            2,
        )


def _prepare_output(
    plan: Plan, job: dict[str, Any], given: str, *, resume: bool, overwrite: bool
) -> tuple[dict[int, dict[str, Any]], list[str]]:
    """Create, replace or resume OUTPUT; write the job description.

    Returns the reused parts and the folders this call created (deepest first; local only).
    """
    fs, root = plan.out_fs, plan.out_root
    exists = fs.exists(root)
    if exists and not fs.isdir(root):
        raise JobError(f"OUTPUT {given} is a file; OUTPUT is a folder of parquet parts. Choose another path.", 2)
    names = _listing(fs, root) if exists else []
    reused: dict[int, dict[str, Any]] = {}
    if names and overwrite:
        if SUCCESS_FILE in names:  # first, so that a mix of two runs is never taken for finished
            fs.rm(f"{root}/{SUCCESS_FILE}")
        for n in names:
            if n != SUCCESS_FILE:
                fs.rm(f"{root}/{n}", recursive=True)
    elif names and resume:
        old = _read_json(fs, f"{root}/{JOB_FILE}")
        if not old:
            raise JobError(
                f"OUTPUT {given} has no nsfw-dask job description ({JOB_FILE}); it was not written "
                "by nsfw-dask score, so there is nothing to resume. Choose another OUTPUT, or pass "
                "--overwrite to replace it.",
                2,
            )
        diffs = _job_differences(old, job)
        if diffs:
            raise JobError(
                f"--resume refused: OUTPUT {given} was written by a different job: "
                f"{'; '.join(diffs)}. Rerun with the original options, or pass --overwrite to "
                "start again.",
                2,
            )
        if SUCCESS_FILE in names:
            fs.rm(f"{root}/{SUCCESS_FILE}")
        reused = _reusable_parts(plan, names)
    elif names:
        old = _read_json(fs, f"{root}/{JOB_FILE}")
        if old is None:
            raise JobError(
                f"OUTPUT {given} already exists and was not written by nsfw-dask score; choose "
                "another OUTPUT, or pass --overwrite to replace it.",
                2,
            )
        state = "a finished run" if SUCCESS_FILE in names else "an unfinished run"
        raise JobError(
            f"OUTPUT {given} already holds {state}; pass --resume to finish it (only the "
            "missing parts are scored), --overwrite to replace it, or choose another OUTPUT.",
            2,
        )
    created = _makedirs(fs, root) if not exists else []
    _sweep_temporaries(fs, root)
    _put_small(fs, root, JOB_FILE, json.dumps(job, indent=1).encode())
    return reused, created


def _makedirs(fs: Any, root: str) -> list[str]:
    """``fs.makedirs(root)``; returns the local folders it created, deepest first."""
    created = []
    if is_local(fs):
        p = root
        while p and not os.path.exists(p):
            created.append(p)
            p = os.path.dirname(p)
    fs.makedirs(root, exist_ok=True)
    return created


def _remove_created(fs: Any, root: str, created: list[str]) -> None:
    """After a run that committed nothing: remove its job file and the folders it made, if empty."""
    if not created:
        return
    _sweep_temporaries(fs, root)
    if set(_listing(fs, root)) - {JOB_FILE}:  # a part was committed after all: keep it resumable
        return
    with contextlib.suppress(OSError):
        fs.rm(f"{root}/{JOB_FILE}")
    for d in created:
        try:
            os.rmdir(d)
        except OSError:
            break


def _sweep_temporaries(fs: Any, root: str) -> None:
    """Remove ``.part*.tmp-*`` files left by killed runs (a second run into one OUTPUT is not supported)."""
    for n in _listing(fs, root):
        if _TMP.match(n):
            with contextlib.suppress(FileNotFoundError):
                fs.rm(f"{root}/{n}")


def _reusable_parts(plan: Plan, names: list[str]) -> dict[int, dict[str, Any]]:
    fs, root = plan.out_fs, plan.out_root
    by_name = {p.name: p for p in plan.parts}
    present = [by_name[n] for n in names if n in by_name]
    stray = [n for n in names if n.startswith("part.") and n not in by_name]

    def check(part: Part) -> tuple[Part, dict[str, Any] | None]:
        try:
            rows, info = _read_part_info(fs, f"{root}/{part.name}")
        except Exception:
            return part, None
        if not _part_ok(plan, part, rows, info):
            return part, None
        assert info is not None
        return part, {
            "part": part.index,
            "rows": part.rows,
            "rows_written": rows,
            "reused": True,
            "nan_scores": info["nan_scores"],
            "over_threshold": info["over_threshold"],
            "histogram": _decode_hist(info["histogram"]),
        }

    reused = {}
    for part, r in _map_threads(check, present):
        if r is None:
            logger.info("%s does not check out; it is scored again", part.name)
            fs.rm(f"{root}/{part.name}")
        else:
            reused[part.index] = r
    for n in stray:
        fs.rm(f"{root}/{n}")
    return reused


def _finish(plan: Plan, summary: Summary) -> None:
    """Check that every part is there with its rows, then write ``_SUCCESS`` (last)."""
    fs, root = plan.out_fs, plan.out_root
    names = set(_listing(fs, root))
    missing = [p.name for p in plan.parts if p.name not in names]
    if missing:
        raise JobError(
            f"{len(missing)} part(s) are missing from OUTPUT after the run (e.g. {missing[0]}); rerun with --resume."
        )
    if summary.rows != sum(p.rows for p in plan.parts):
        raise JobError(
            f"the parts hold {summary.rows} input rows, the input has "
            f"{sum(p.rows for p in plan.parts)}; rerun with --resume."
        )
    record = {
        "job_id": plan.job_id,
        "partitions": len(plan.parts),
        "rows": summary.rows,
        "rows_written": summary.rows_written,
        "version": __version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _put_small(fs, root, SUCCESS_FILE, json.dumps(record).encode())


def is_finished(output: str | os.PathLike[str], storage_options: dict[str, Any] | None = None) -> bool:
    """True if ``output`` is a finished ``score_dataset`` output (it has ``_SUCCESS``)."""
    fs, root = _fs(normalize_path(output), storage_options)
    return bool(fs.exists(f"{root}/{SUCCESS_FILE}"))
