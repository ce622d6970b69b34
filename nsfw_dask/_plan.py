"""Planning a job, on the client: normalized paths and filesystems, the input's files and its
partitions (runs of whole row groups of one file), from listings, parquet footers and ``.npy``
headers only: no data is read."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ._specs import get_spec
from .exceptions import EmbeddingFormatError, JobError
from .io import _basename, is_local, show_path

__all__ = [
    "DEFAULT_ROWS_PER_PARTITION",
    "Part",
    "Plan",
    "ROW_NUMBER_COLUMN",
    "file_identity",
    "filesystem",
    "has_glob",
    "is_inside",
    "map_threads",
    "normalize_path",
    "plan_input",
    "real_path",
]

logger = logging.getLogger(__name__)


ROW_NUMBER_COLUMN = "row_number"


DEFAULT_ROWS_PER_PARTITION = 262_144


_PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def _is_url(path: str) -> bool:
    return "://" in path


def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def normalize_path(path: str | os.PathLike[str]) -> str:
    """``~`` expanded, ``file://`` stripped, made absolute; URLs of other protocols unchanged."""
    p = os.fspath(path)
    if p.startswith("file://"):
        p = p[len("file://") :]
    if _is_url(p):
        return p
    return os.path.abspath(os.path.expanduser(p))


def filesystem(path: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(path, **(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise JobError(f"cannot open {path}: {e}") from e
    return fs, (root.rstrip("/") or "/")


def real_path(path: str) -> str:
    return os.path.realpath(path)


def is_inside(child: str, parent: str) -> bool:
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


def file_identity(info: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(size, mtime/ETag, inode/version id)`` of a file's ``fs.info``: what a task compares
    with the plan before and after it reads the file (the job description keeps the first two)."""
    ident = next((info[k] for k in ("ino", "VersionId", "generation") if info.get(k) is not None), None)
    return info.get("size"), _stamp(info).get("version"), ident


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
    # (fs path, size, mtime/ETag, inode/version id) of each file it reads, as planned
    stamps: tuple[tuple[Any, ...], ...] = ()
    partition_values: tuple[Any, ...] = ()  # the file's hive partition values (Plan.partition_columns)

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
    run_id: str = ""  # this run's lease (a part is committed only while OUTPUT's lease names it)
    # hive partition columns (``key=value`` folders below INPUT): [(name, "int32" | "string")]
    partition_columns: list[tuple[str, str]] = field(default_factory=list)
    # the embedding column's forms among the files: [(its Arrow type as --keep-embeddings list
    # writes it, its float dtype, the first file with it)]
    embedding_forms: list[tuple[str, str, str]] = field(default_factory=list)


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
    """A part name's source: ``path`` (a file's path relative to INPUT) without its parquet
    suffix, folders joined by ``.`` (``lang=en/part-0.parquet`` -> ``lang=en.part-0``)."""
    name = path.strip("/")
    for suffix in _PARQUET_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = re.sub(r"[^A-Za-z0-9_.=-]+", "-", name.replace("/", ".")).strip(".-") or "part"
    if len(name) > _MAX_STEM:  # a file name has at most 255 bytes; the part index keeps names unique
        name = name[: _MAX_STEM // 2] + "~" + name[-(_MAX_STEM // 2) :]
    return name


_MAX_STEM = 180


#: pyarrow's (and Hive's) name for a null partition value.
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


def _hive_segments(rel: str) -> dict[str, str | None]:
    """The ``key=value`` folders of a file's path relative to INPUT, parsed as
    ``pyarrow.dataset.partitioning(flavor="hive")`` parses them: URI-decoded, folders without
    ``=`` skipped, ``__HIVE_DEFAULT_PARTITION__`` null."""
    out: dict[str, str | None] = {}
    for seg in rel.split("/")[:-1]:
        key, eq, value = seg.partition("=")
        if eq and key:
            value = urllib.parse.unquote(value)
            out[urllib.parse.unquote(key)] = None if value == HIVE_NULL else value
    return out


def _is_int32(value: str) -> bool:
    return re.fullmatch(r"-?[0-9]+", value) is not None and -(2**31) <= int(value) < 2**31


def _hive_partitions(rels: list[str]) -> tuple[list[tuple[str, str]], list[tuple[Any, ...]]]:
    """The hive partition columns of files at ``rels`` (paths relative to INPUT) and each file's
    values, typed as pyarrow infers them: int32 if every value is one, else string; in order of
    first appearance; a file without a key gets null there."""
    per_file = [_hive_segments(r) for r in rels]
    names: list[str] = []
    for d in per_file:
        names.extend(k for k in d if k not in names)
    columns = []
    for name in names:
        values = [v for d in per_file if (v := d.get(name)) is not None]
        columns.append((name, "int32" if values and all(_is_int32(v) for v in values) else "string"))
    rows = [tuple(_typed(d.get(n), t) for n, t in columns) for d in per_file]
    return columns, rows


def _typed(value: str | None, type_name: str) -> Any:
    return int(value) if value is not None and type_name == "int32" else value


def _glob_base(root: str) -> str:
    """The folder of a glob above its first wildcard (``data/*/x.parquet`` -> ``data``)."""
    first = min(i for i, c in enumerate(root) if c in "*?[")
    return root[:first].rsplit("/", 1)[0] if "/" in root[:first] else ""


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


def _kept_form(f: pa.Field) -> tuple[pa.DataType, str]:
    """The embedding column as ``--keep-embeddings list`` writes it, and its float dtype."""
    from .io import binary_embedding_dtype

    dtype = binary_embedding_dtype(f)
    if dtype is not None:  # our own binary form: read as fixed_size_list over its buffer
        return pa.list_(pa.from_numpy_dtype(dtype), f.type.byte_width // dtype.itemsize), dtype.name
    return f.type, np.dtype(f.type.value_type.to_pandas_dtype()).name


def _check_embedding_type(f: pa.Field, column: str, spec: Any, where: str) -> None:
    """The embedding column's Arrow type, checked before any worker starts."""
    t = f.type
    if pa.types.is_fixed_size_binary(t):
        from .io import binary_embedding_dtype

        if binary_embedding_dtype(f) is None:
            raise JobError(
                f"Column {column!r} in {where} is {t} with no record of its float dtype (the "
                "nsfw_dask.embedding field metadata that --keep-embeddings writes); store the "
                "vectors as a list of floats (as --keep-embeddings list writes them), or pass "
                "--column naming the embedding column."
            )
        t = _kept_form(f)[0]
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
    from .io import binary_embedding_dtype

    floats = [
        f.name
        for f in schema
        if (
            (pa.types.is_list(f.type) or pa.types.is_large_list(f.type) or pa.types.is_fixed_size_list(f.type))
            and pa.types.is_floating(f.type.value_type)
        )
        or binary_embedding_dtype(f) is not None
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


def map_threads(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
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
    from . import io

    spec = get_spec(model)
    given = os.fspath(input)
    path = normalize_path(given)
    fs, root = filesystem(path, storage_options)
    base: str | None = None  # parquet: the folder the files' paths are relative to (None: one file)
    if has_glob(path):
        files = sorted(f for f in fs.glob(root) if fs.isfile(f))
        if not files:
            raise JobError(f"INPUT {given} matches no files; check the pattern.")
        kind = "parquet"
        base = _glob_base(root)
    elif fs.isdir(root):
        kind = "parquet_npy" if fs.isdir(f"{root}/img_emb") and fs.isdir(f"{root}/metadata") else "parquet"
        files = []
        base = root
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
            pairs = io.parquet_npy_pairs(fs, root)
        except FileNotFoundError as e:
            raise JobError(f"INPUT {given}: {e}; add the .npy files or pass another folder.") from e
        except EmbeddingFormatError as e:
            raise JobError(f"INPUT {given}: {e}") from e
        file_list = [p for pair in pairs for p in pair]
        infos = map_threads(fs.info, file_list)  # before any header or footer is read
        headers = map_threads(lambda p: io.npy_header(fs, p[0]), pairs)
        footers = map_threads(lambda p: _footer(fs, p[1]), pairs)
        schema0 = footers[0].schema.to_arrow_schema()
        names0 = [n for n in schema0.names if not io.PANDAS_INDEX.fullmatch(n)]
        if emb in names0:
            raise JobError(
                f"{show_path(fs, pairs[0][1])} already has a column {emb!r}; pass --column with "
                "another name for the embeddings of img_emb/ (e.g. --column 'clip_embedding').",
                2,
            )
        if ROW_NUMBER_COLUMN in names0:
            raise JobError(
                f"{show_path(fs, pairs[0][1])} already has a column {ROW_NUMBER_COLUMN!r}, which the "
                "output uses for the global row number; rename that column in the metadata.",
                2,
            )
        offset = 0
        forms: list[tuple[str, str, str]] = []
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
            kept = str(pa.list_(pa.from_numpy_dtype(dtype.newbyteorder("=")), shape[1]))
            if kept not in (k for k, _, _ in forms):  # each file is read as it is (float16 or 32)
                forms.append((kept, dtype.name, where))
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
            names = [n for n in md.schema.to_arrow_schema().names if not io.PANDAS_INDEX.fullmatch(n)]
            if names != names0:
                raise JobError(
                    f"{show_path(fs, meta)} has columns {names} but {show_path(fs, pairs[0][1])} has "
                    f"{names0}; all metadata files must have the same columns."
                )
            groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            for a, b in _split(shape[0], groups, rows_per_partition):
                parts.append(Part(len(parts), meta, npy, a, b, offset, ""))
            offset += shape[0]
        meta_columns = names0
        pandas_md = None
        column_name = emb
        hive: list[tuple[str, str]] = []
        part_names = {meta: _source_stem(_basename(meta)) for _, meta in pairs}
        by_file: dict[str, tuple[Any, ...]] = {}
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
        infos = map_threads(fs.info, files)  # before any footer is read
        footers = map_threads(lambda f: _footer(fs, f), files)
        schema0 = footers[0].schema.to_arrow_schema()
        where0 = show_path(fs, files[0])
        column_name = _choose_column(schema0, column, where0)
        rest0 = schema0.remove(schema0.get_field_index(column_name)).remove_metadata()
        forms = []
        for f, md in zip(files, footers):
            s = md.schema.to_arrow_schema()
            i = s.get_field_index(column_name)
            # the embedding column may take any float-list form per file (each is read as it is)
            if i < 0 or not s.remove(i).remove_metadata().equals(rest0):
                raise JobError(
                    f"{show_path(fs, f)} has schema {_schema_line(s)} but {where0} has "
                    f"{_schema_line(schema0)}; all INPUT files must have the same columns and types "
                    f"(the embedding column {column_name!r} may differ only in its list form)."
                )
            _check_embedding_type(s.field(i), column_name, spec, show_path(fs, f))
            kept, float_dtype = _kept_form(s.field(i))
            if str(kept) not in (k for k, _, _ in forms):
                forms.append((str(kept), float_dtype, show_path(fs, f)))
        for f, md in zip(files, footers):
            groups = [md.row_group(i).num_rows for i in range(md.num_row_groups)]
            for a, b in _split(md.num_rows, groups, rows_per_partition):
                parts.append(Part(len(parts), f, None, a, b, 0, ""))
        file_list = files
        meta_columns = [n for n in schema0.names if n != column_name]
        pandas_md = schema0.pandas_metadata
        # paths relative to INPUT: they name the parts and hold the hive partitions
        rels = [f[len(base) :].lstrip("/") if base is not None else _basename(f) for f in files]
        hive, values = _hive_partitions(rels) if base is not None else ([], [() for _ in files])
        clash = [n for n, _ in hive if n in schema0.names]
        if clash:
            raise JobError(
                f"INPUT {given} has hive partition folders {clash[0]}=... but its files already "
                f"have a column {clash[0]!r}; rename those folders or that column.",
                2,
            )
        part_names = {f: _source_stem(r) for f, r in zip(files, rels)}
        by_file = dict(zip(files, values))
        parts = [replace(p, partition_values=by_file[p.source]) for p in parts]
    if not parts:  # only empty files: one empty part, so that OUTPUT still has a readable schema
        src = file_list[-1] if kind == "parquet" else pairs[0][1]
        npy0 = None if kind == "parquet" else pairs[0][0]
        parts = [Part(0, src, npy0, 0, 0, 0, "", partition_values=by_file.get(src, ()))]
    width = max(6, len(str(len(parts) - 1)))
    ident = {f: file_identity(i) for f, i in zip(file_list, infos)}
    parts = [
        replace(
            p,
            name=f"part.{p.index:0{width}d}.{part_names[p.source]}.parquet",
            stamps=tuple((f, *ident[f]) for f in (p.npy, p.source) if f is not None),
        )
        for p in parts
    ]
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
        partition_columns=hive,
        embedding_forms=forms,
    )


def _schema_line(s: pa.Schema) -> str:
    return "{" + ", ".join(f"{f.name}: {f.type}" for f in s) + "}"
