"""One task of the job, on a worker: read a partition, score it, build its output table, write
the part and commit it (a local rename or one object-store upload), then verify it from its
footer.  Only a few numbers per part go back to the client, among them the wall time of each
stage (``summary.STAGES``, below)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._atomic import TMP_NAME, storage_error, tmp_name
from ._lease import confirm_holder
from ._norms import clearly_not_unit, norm_stats, not_unit_message
from ._plan import ROW_NUMBER_COLUMN, Part, Plan, file_identity
from ._specs import get_spec
from ._version import __version__
from .exceptions import EmbeddingFormatError, EmbeddingNormError, JobError
from .heads import HEADS
from .io import is_local, show_path
from .summary import STAGES, encode_histogram, histogram

__all__ = [
    "IS_NSFW_COLUMN",
    "Options",
    "TMP_NAME",
    "part_ok",
    "read_part_info",
    "run_part",
    "tmp_name",
]

logger = logging.getLogger(__name__)


IS_NSFW_COLUMN = "is_nsfw"


_PART_KEY = b"nsfw_dask.part"


# the writer settings: dictionary encoding only where it pays (see docs/performance.md)
_WRITE_OPTS: dict[str, Any] = {"compression": "snappy"}


@dataclass(frozen=True)
class Options:
    model: str
    exact: bool
    score_column: str
    threshold: float | None
    filter: str
    keep_embeddings: Any
    batch_size: int | None
    device: str | None
    model_dir: str | None
    normalize: bool = False  # L2-normalise each embedding before scoring (changes the scores)
    norm_check: bool = True  # refuse a partition whose embeddings are clearly not unit length
    heads: tuple[str, ...] = ("nsfw",)  # the heads scored from one read (nsfw_dask.heads)
    # rows kept: (head, op, value) conditions, all must hold (a NaN score holds none)
    keep: tuple[tuple[str, str, float], ...] = ()

    def score_columns(self) -> dict[str, str]:
        """Head -> the column it writes (``score_column`` names the NSFW head's)."""
        return {h: self.score_column if h == "nsfw" else HEADS[h].score_column for h in self.heads}


#: ``--keep`` operators: a row passes when ``score OP value`` (False for a NaN score)
KEEP_OPS: dict[str, Any] = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}


def keep_mask(scores: dict[str, np.ndarray], keep: tuple[tuple[str, str, float], ...]) -> list[np.ndarray]:
    """Each condition's pass mask (NaN scores pass none)."""
    masks = []
    for head, op, value in keep:
        s = scores[head]
        with np.errstate(invalid="ignore"):
            masks.append(KEEP_OPS[op](s, value) & ~np.isnan(s))
    return masks


# The stages of a task whose wall times (seconds) it returns (``summary.STAGES``), disjoint and
# in this order:
#
# * ``read_s``: the input files' identity check, then reading the embeddings (parquet input: the
#   partition's row groups, every column, one read; parquet_npy: the ``.npy`` rows: on local disk
#   only a memory map, whose pages are read later, by whatever first touches them: ``score_s``);
# * ``metadata_s``: parquet_npy only, reading the metadata parquet's rows (0 for parquet input);
# * ``score_s``: ``score_nsfw`` on the partition: on CUDA the host -> device staging, the GPU's
#   work (and waiting for other threads' work on the same GPU) and the copy of the scores back;
# * ``build_s``: the counts and histogram of the scores, the output table (columns, filter,
#   footer metadata);
# * ``write_s``: the parquet write, the checks before the commit (input files, lease), the
#   commit and the read-back of the footer.
#
# ``task_s`` is their sum: the task's whole time on its worker thread.  Measured with
# ``time.perf_counter`` around the stages: no device synchronization is added (the scores are
# copied to the host in ``score_s`` anyway).


class _Clock:
    """Laps of one task: each ``lap(stage)`` adds the time since the previous lap to ``stage``."""

    def __init__(self) -> None:
        self.stages = dict.fromkeys(STAGES, 0.0)
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.stages[stage] += now - self._t
        self._t = now

    def result(self) -> dict[str, float]:
        return {**self.stages, "task_s": sum(self.stages.values())}


def _load(plan: Plan, part: Part, clock: _Clock | None = None) -> tuple[pa.Table, pa.Array | pa.ChunkedArray]:
    """The part's other columns (an Arrow table) and its embedding column (an Arrow array)."""
    from . import io

    fs = plan.in_fs
    if plan.kind == "parquet_npy":
        assert part.npy is not None
        emb = io.read_npy_rows(fs, part.npy, part.start, part.stop)
        if not emb.dtype.isnative:
            emb = emb.astype(emb.dtype.newbyteorder("="))
        values = pa.array(np.ascontiguousarray(emb).reshape(-1))  # a view of the memory map when local
        lists = pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
        if clock is not None:
            clock.lap("read_s")
        table = io.read_parquet_rows(fs, part.source, part.start, part.stop)
        drop = [n for n in table.column_names if io.PANDAS_INDEX.fullmatch(n)]
        table = table.drop_columns(drop) if drop else table
        table = table.replace_schema_metadata(None)
        rows = pa.array(np.arange(part.offset + part.start, part.offset + part.stop, dtype=np.int64))
        table = table.add_column(0, ROW_NUMBER_COLUMN, rows)
        if clock is not None:
            clock.lap("metadata_s")
        return table, lists
    table = io.read_parquet_rows(fs, part.source, part.start, part.stop)
    col = table.column(plan.column)  # one chunk per row group: scored chunk by chunk, never combined
    dtype = io.binary_embedding_dtype(table.schema.field(plan.column))
    if dtype is not None:  # our own --keep-embeddings bytes: fixed_size_list views of the same buffers
        lists = [io.binary_as_lists(c, dtype) for c in col.chunks]
        col = pa.chunked_array(lists, type=pa.list_(pa.from_numpy_dtype(dtype), col.type.byte_width // dtype.itemsize))
    return table.drop_columns([plan.column]), col


def _score(plan: Plan, part: Part, emb: pa.Array, opts: Options) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each head's scores of the part and every row's L2 norm (NaN where a row has no embedding)."""
    import pandas as pd

    from .scoring import score_partition

    frame = pd.DataFrame({plan.column: pd.arrays.ArrowExtensionArray(emb)}, index=pd.RangeIndex(part.start, part.stop))
    try:
        return score_partition(
            frame,
            column=plan.column,
            model=opts.model,
            heads=opts.heads,
            exact=opts.exact,
            batch_size=opts.batch_size,
            device=opts.device,
            model_dir=opts.model_dir,
            normalize=opts.normalize,
        )
    except EmbeddingFormatError as e:
        raise EmbeddingFormatError(f"{_where(plan, part)}: {e}") from None


def _where(plan: Plan, part: Part) -> str:
    shown = show_path(plan.in_fs, part.npy or part.source)
    return f"{shown}, rows {part.start}-{part.stop - 1} of that file (row numbers count from 0 within the file)"


def _check_norms(plan: Plan, part: Part, norm: dict[str, Any], opts: Options) -> None:
    """Refuse a partition whose embeddings are clearly not L2-normalised (see ``_norms``)."""
    # the aesthetic heads normalise their input themselves; the NSFW head scores it as given
    nsfw_as_given = "nsfw" in opts.heads and not opts.normalize
    if opts.norm_check and nsfw_as_given and clearly_not_unit(norm["norm_median"]):
        raise EmbeddingNormError(not_unit_message(_where(plan, part), norm["norm_median"], norm["norm_rows"], cli=True))


def _embedding_as_binary(emb: pa.Array, width: int) -> pa.Array:
    """The vectors as fixed_size_binary(width * itemsize): the raw bytes, no list levels to encode.

    ``width`` is the model's embedding width, not read from the rows: a partition whose rows are
    all null has the same column type as every other part (``fixed_size_binary[0]`` otherwise,
    and the parts would not read back as one dataset)."""
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
    dim = width  # every row was checked to have this many values before it was scored
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


def _output_table(
    plan: Plan,
    part: Part,
    table: pa.Table,
    emb: pa.Array,
    scores: dict[str, np.ndarray],
    opts: Options,
    stats: dict[str, Any],
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
        b = _embedding_as_binary(emb, get_spec(opts.model).dim)
        out = out.append_column(f.with_type(b.type), b)
    for (name, type_name), value in zip(plan.partition_columns, part.partition_values):
        # hive partition columns, after the file's own (where pyarrow.dataset puts them)
        out = out.append_column(name, pa.repeat(pa.scalar(value, type=pa.type_for_alias(type_name)), out.num_rows))
    for head, column in opts.score_columns().items():
        out = out.append_column(column, pa.array(scores[head], type=pa.float32()))
    keep: np.ndarray | None = None
    if "nsfw" in scores and opts.threshold is not None:
        nsfw = scores["nsfw"]
        nan = np.isnan(nsfw)
        flags = pa.array(nsfw >= opts.threshold, mask=nan, type=pa.bool_())
        out = out.append_column(IS_NSFW_COLUMN, flags)
        if opts.filter != "none":
            keep = (nsfw < opts.threshold) if opts.filter == "keep-safe" else (nsfw >= opts.threshold)
            keep &= ~nan
    for mask in stats["keep_masks"]:
        keep = mask if keep is None else keep & mask
    if keep is not None:
        out = out.filter(pa.array(keep))
    out = out.replace_schema_metadata(_schema_metadata(plan, opts, part, stats, out.num_rows))
    return out


def _schema_metadata(
    plan: Plan, opts: Options, part: Part, stats: dict[str, Any], rows_written: int
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
        "histogram": encode_histogram(stats["histogram"]),
        "heads": {
            h: {"nan": v["nan"], "histogram": encode_histogram(v["histogram"])} for h, v in stats["heads"].items()
        },
        "keep_counts": stats["keep_counts"],
        "norm_off_unit": stats["norm_off_unit"],
        "norm_zero": stats["norm_zero"],
        "norm_histogram": encode_histogram(stats["norm_histogram"]),
        "version": __version__,
    }
    md[_PART_KEY] = json.dumps(info).encode()
    return md


_ADDED_PANDAS_COLUMNS: dict[str, dict[str, Any]] = {
    "score": {"pandas_type": "float32", "numpy_type": "float32", "metadata": None},
    IS_NSFW_COLUMN: {"pandas_type": "bool", "numpy_type": "boolean", "metadata": None},
    ROW_NUMBER_COLUMN: {"pandas_type": "int64", "numpy_type": "int64", "metadata": None},
}


def _output_pandas_metadata(plan: Plan, opts: Options) -> dict[str, Any] | None:
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
    for column in opts.score_columns().values():
        add(column, "score")
    if opts.threshold is not None:
        add(IS_NSFW_COLUMN, IS_NSFW_COLUMN)
    md["columns"] = columns
    return md


def _pandas_version() -> str:
    import pandas as pd

    return pd.__version__


def _write_committed(
    fs: Any, root: str, name: str, table: pa.Table, before_commit: Callable[[], None] | None = None
) -> None:
    """Write ``table`` so that ``root/name`` appears only complete: a rename, or one upload.

    ``before_commit`` runs after the data is written (locally into the temporary) and before it
    becomes the part: it raises to commit nothing.  A failed write names the part, OUTPUT and the fix.
    """
    final = f"{root}/{name}"
    if is_local(fs):
        tmp = f"{root}/{tmp_name(name)}"
        try:
            # our own file object, closed whatever happens: given a path, a failed write (a full
            # disk) keeps the file open for as long as its exception lives (on a worker: as long
            # as the erred task), and the removed temporary's space with it
            with pa.OSFile(tmp, "wb") as sink:
                pq.write_table(table, sink, **_write_options(table))
            if before_commit is not None:
                before_commit()
            os.replace(tmp, final)
        except OSError as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise storage_error(final, root, e) from e
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, **_write_options(table))
    if before_commit is not None:
        before_commit()
    try:
        fs.pipe_file(final, buf.getvalue().to_pybytes())  # one PUT: the object exists only when complete
    except OSError as e:
        raise storage_error(show_path(fs, final), show_path(fs, root), e) from e


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


def read_part_info(fs: Any, path: str) -> tuple[int, dict[str, Any] | None]:
    """Rows and our footer record of a committed part (None if it has none)."""
    if is_local(fs):
        md = pq.read_metadata(path)
    else:
        with fs.open(path, "rb") as f:
            md = pq.read_metadata(f)
    kv = md.metadata or {}
    raw = kv.get(_PART_KEY)
    return md.num_rows, (json.loads(raw) if raw else None)


def part_ok(plan: Plan, part: Part, rows: int, info: dict[str, Any] | None) -> bool:
    return (
        info is not None
        and info.get("job") == plan.job_id
        and info.get("part") == part.index
        and info.get("rows") == [part.start, part.stop]
        and info.get("rows_written") == rows
    )


def check_inputs(plan: Plan, part: Part) -> None:
    """Each file the part reads is still the planned one: size, mtime/ETag, inode/version id.

    Run before the part reads anything and again after its data is written, before the commit:
    a part is committed only if its files did not change while it read them.
    """
    fs = plan.in_fs
    for path, size, version, ident in part.stamps:
        with contextlib.suppress(Exception):
            fs.invalidate_cache(path)  # object stores: no listing cached since planning
        try:
            got = file_identity(fs.info(path))
        except FileNotFoundError:
            what = "it is gone"
        else:
            if got == (size, version, ident):
                continue
            if got[0] != size:
                what = f"size {size} -> {got[0]}"
            elif got[1] != version:
                what = f"mtime/ETag {version} -> {got[1]}"
            else:
                what = f"replaced by another file: inode/version {ident} -> {got[2]}"
        raise JobError(
            f"INPUT file {show_path(fs, path)} changed while the job ran ({what}); {part.name} was not "
            "committed, nor is any part read after the change. Restore the file and rerun with --resume, "
            "or rerun with --overwrite to score the new content."
        )


def part_stats(scores: dict[str, np.ndarray], norm: dict[str, Any], opts: Options) -> dict[str, Any]:
    """A part's numbers for the summary: per head NaN count and histogram (over the head's
    output range), the keep conditions' pass counts, the norm counts.  The top-level
    ``nan_scores``/``histogram`` are the first head's (the one ``--json`` has always reported)."""
    per_head = {}
    for h in opts.heads:
        lo, hi = HEADS[h].output_range
        per_head[h] = {"nan": int(np.isnan(scores[h]).sum()), "histogram": histogram(scores[h], lo, hi)}
    masks = keep_mask(scores, opts.keep)
    first = per_head[opts.heads[0]]
    nsfw = scores.get("nsfw")
    return {
        "nan_scores": first["nan"],
        "over_threshold": int((nsfw >= opts.threshold).sum()) if nsfw is not None and opts.threshold is not None else 0,
        "histogram": first["histogram"],
        "heads": per_head,
        "keep_masks": masks,
        "keep_counts": [int(m.sum()) for m in masks],
        "norm_off_unit": norm["norm_off_unit"],
        "norm_zero": norm["norm_zero"],
        "norm_histogram": norm["norm_histogram"],
    }


def run_part(plan: Plan, part: Part, opts: Options) -> dict[str, Any]:
    """One task: read, score, write and commit a part, then verify it from its footer.

    The part is committed only if the files it read are still the planned ones and the run still
    holds OUTPUT's lease.  Returns the part's numbers for the summary (a few hundred bytes after
    compression), with the wall time of each of its stages (``STAGES``, plus their sum ``task_s``).
    """
    clock = _Clock()
    check_inputs(plan, part)
    table, emb = _load(plan, part, clock)
    clock.lap("read_s")  # parquet input: all of the read (parquet_npy: nothing left, ~0)
    if part.rows:
        scores, norms = _score(plan, part, emb, opts)
    else:
        scores, norms = {h: np.zeros(0, np.float32) for h in opts.heads}, np.zeros(0, np.float32)
    clock.lap("score_s")
    norm = norm_stats(norms)
    _check_norms(plan, part, norm, opts)
    stats = part_stats(scores, norm, opts)
    out = _output_table(plan, part, table, emb, scores, opts, stats)
    del table, emb, stats["keep_masks"]
    clock.lap("build_s")

    def before_commit() -> None:
        check_inputs(plan, part)
        if plan.run_id:
            confirm_holder(plan.out_fs, plan.out_root, plan.run_id, part.name)

    _write_committed(plan.out_fs, plan.out_root, part.name, out, before_commit)
    rows, info = read_part_info(plan.out_fs, f"{plan.out_root}/{part.name}")
    if rows != out.num_rows or not part_ok(plan, part, rows, info):
        raise JobError(
            f"{show_path(plan.out_fs, plan.out_root + '/' + part.name)} was written with "
            f"{out.num_rows} rows but reads back as {rows}; the storage lost data. Rerun with --resume."
        )
    clock.lap("write_s")
    return {
        "part": part.index,
        "rows": part.rows,
        "rows_written": rows,
        "reused": False,
        **stats,
        "stages": clock.result(),
    }
