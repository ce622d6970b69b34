"""Reading embeddings as Dask DataFrames: parquet, and LAION's ``parquet_npy`` layout.

LAION-style embedding sets (clip-retrieval's output, read by embedding-reader) are folders with
``img_emb/img_emb_N.npy`` (float16 or float32, one row per image) beside
``metadata/metadata_N.parquet`` (the same rows, in the same order).  :func:`read_embeddings`
turns such a folder into a Dask DataFrame whose partitions hold the metadata columns plus an
Arrow ``fixed_size_list`` embedding column over the memory-mapped ``.npy``: nothing of the
embeddings is read or copied until a partition is scored.

The folder may be local or any fsspec URL (``s3://``, ``gs://``, ``memory://``, ...).  Local
``.npy`` files are memory-mapped; remote ones cannot be, so each partition reads just its own
rows' bytes of the ``.npy`` (and just the parquet row groups covering its rows).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .exceptions import EmbeddingFormatError

__all__ = ["is_parquet_npy", "read_embeddings", "read_input"]

_NPY = re.compile(r"img_emb_(\d+)\.npy")
_META = re.compile(r"metadata_(\d+)\.parquet")
# pandas stores an *unnamed* non-range index as ``__index_level_N__``; we replace the index, so
# these anonymous columns are dropped (named index levels are ordinary columns and are kept).
_PANDAS_INDEX = re.compile(r"__index_level_\d+__")


def _url_to_fs(path: str | os.PathLike[str]) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(os.fspath(path))
    return fs, root.rstrip("/") or "/"


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def _show(fs: Any, path: str) -> str:
    """``path`` as a user would write it: plain for local files, a URL otherwise."""
    return path if _is_local(fs) else fs.unstrip_protocol(path)


def _basename(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def is_parquet_npy(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` (local, or an fsspec URL) is a folder with ``img_emb/`` and ``metadata/``."""
    fs, root = _url_to_fs(path)
    return bool(fs.isdir(f"{root}/img_emb") and fs.isdir(f"{root}/metadata"))


def _numbered(fs: Any, folder: str, suffix: str, pattern: re.Pattern[str]) -> dict[int, str]:
    """``{N: path}`` for every ``*suffix`` file in ``folder``; a name other than pattern is an error."""
    found: dict[int, str] = {}
    for info in fs.ls(folder, detail=True):
        path = info["name"]
        name = _basename(path)
        if info.get("type") != "file" or not name.endswith(suffix):
            continue
        m = pattern.fullmatch(name)
        if m is None:
            expected = pattern.pattern.replace(r"(\d+)", "<N>").replace("\\", "")
            raise EmbeddingFormatError(
                f"{_show(fs, path)}: unexpected file name in a parquet_npy folder; expected "
                f"{expected} with an integer N. Rename or remove it."
            )
        n = int(m.group(1))
        if n in found:
            raise EmbeddingFormatError(
                f"{_show(fs, found[n])} and {_show(fs, path)} have the same number {n}; "
                "remove one of them."
            )
        found[n] = path
    return found


def _pairs(fs: Any, root: str) -> list[tuple[str, str]]:
    """The ``(npy, parquet)`` pairs of a parquet_npy folder, in numeric order of N."""
    npys = _numbered(fs, f"{root}/img_emb", ".npy", _NPY)
    metas = _numbered(fs, f"{root}/metadata", ".parquet", _META)
    for n in sorted(npys.keys() ^ metas.keys()):
        have, want = (npys[n], f"{root}/metadata/metadata_{n}.parquet") if n in npys else (
            metas[n], f"{root}/img_emb/img_emb_{n}.npy")
        raise EmbeddingFormatError(
            f"{_show(fs, have)} has no partner: expected {_show(fs, want)} (each "
            f"img_emb/img_emb_N.npy needs metadata/metadata_N.parquet, and vice versa). "
            "Add the missing file or remove the orphan."
        )
    if not npys:
        raise FileNotFoundError(f"No img_emb/img_emb_N.npy files in {_show(fs, root)}")
    return [(npys[n], metas[n]) for n in sorted(npys)]


def _read_header(f: Any, shown: str) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """Shape, dtype, Fortran order and data offset of the ``.npy`` open as ``f`` (at its start)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f)
        else:  # 3.0 (utf-8 header) has no public reader
            shape, fortran, dtype = fmt._read_array_header(f, version)
    except ValueError as e:
        raise EmbeddingFormatError(f"{shown} is not a valid .npy file: {e}") from e
    return shape, dtype, fortran, f.tell()


def _npy_header(fs: Any, path: str) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """:func:`_read_header` of ``path``, reading only the header."""
    with fs.open(path, "rb") as f:
        return _read_header(f, _show(fs, path))


def _to_pandas(table: pa.Table, start: int = 0) -> pd.DataFrame:
    """Rows ``start ..`` of a file as an Arrow-backed frame; pandas index levels become columns.

    A named index that pandas stored as a column is an ordinary column here; a named
    ``RangeIndex`` (which pandas stores only in the schema's metadata) is rebuilt as an int64
    column; an unnamed stored index (``__index_level_N__``) is dropped.
    """
    df = table.to_pandas(types_mapper=pd.ArrowDtype, ignore_metadata=True)
    drop = [c for c in df.columns if isinstance(c, str) and _PANDAS_INDEX.fullmatch(c)]
    if drop:
        df = df.drop(columns=drop)
    pandas_md = table.schema.pandas_metadata or {}
    for index in pandas_md.get("index_columns", []):
        if isinstance(index, dict) and index.get("kind") == "range":
            name = index.get("name")
            if name is not None and name not in df.columns:
                rows = np.arange(start, start + len(df), dtype=np.int64)
                df[name] = pd.array(index["start"] + index["step"] * rows, dtype=pd.ArrowDtype(pa.int64()))
    return df


def _read_rows(fs: Any, meta: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a parquet file, reading only the row groups that hold them."""

    def read(pf: pq.ParquetFile) -> pa.Table:
        md = pf.metadata
        bounds = [0]
        for i in range(md.num_row_groups):
            bounds.append(bounds[-1] + md.row_group(i).num_rows)
        groups = [i for i in range(md.num_row_groups) if bounds[i] < stop and bounds[i + 1] > start]
        if not groups:
            return pf.schema_arrow.empty_table()
        table = pf.read_row_groups(groups)
        return table.slice(start - bounds[groups[0]], stop - start)

    if _is_local(fs):
        with pq.ParquetFile(meta) as pf:
            return read(pf)
    with fs.open(meta, "rb") as f, pq.ParquetFile(f) as pf:
        return read(pf)


def _read_npy(fs: Any, npy: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-d ``.npy``: a view of the memory map when local."""
    if _is_local(fs):
        return np.load(npy, mmap_mode="r")[start:stop]
    with fs.open(npy, "rb") as f:
        shape, dtype, fortran, offset = _read_header(f, _show(fs, npy))
        if fortran:  # rows are not contiguous: read it all (rare; np.save writes C order)
            f.seek(0)
            return np.load(f)[start:stop]
        row = dtype.itemsize * shape[1]
        f.seek(offset + start * row)
        data = f.read((stop - start) * row)
    return np.frombuffer(data, dtype=dtype).reshape(stop - start, shape[1])


def _load_part(part: tuple[str, str, int, int, int], column: str, fs: Any = None) -> pd.DataFrame:
    npy, meta, start, stop, offset = part
    if fs is None:
        from fsspec.implementations.local import LocalFileSystem

        fs = LocalFileSystem()
    emb = _read_npy(fs, npy, start, stop)
    if not emb.dtype.isnative:
        emb = emb.astype(emb.dtype.newbyteorder("="))
    df = _to_pandas(_read_rows(fs, meta, start, stop), start)
    # a view of the memory map when C-contiguous; pa.array wraps it without copying
    values = pa.array(np.asarray(emb).reshape(-1))
    lists = pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
    df[column] = pd.arrays.ArrowExtensionArray(lists)
    df.index = pd.RangeIndex(offset + start, offset + stop)
    return df


def read_embeddings(
    path: str | os.PathLike[str],
    *,
    column: str = "embedding",
    rows_per_partition: int = 262_144,
) -> Any:
    """Read a LAION ``parquet_npy`` folder as a Dask DataFrame (metadata columns + embeddings).

    Every ``img_emb/img_emb_N.npy`` is paired with ``metadata/metadata_N.parquet`` (N an
    integer); pairs are read in numeric order of N.  Each partition holds rows of one pair: the
    metadata columns (Arrow-backed; a column the parquet stored as a named pandas index is an
    ordinary column here) plus ``column``, an Arrow ``fixed_size_list`` of the ``.npy``'s own
    float type (float16 stays float16; the scorer casts batch by batch).  Local ``.npy`` files are
    memory-mapped and wrapped without a copy; remote ones (any fsspec URL) cannot be
    memory-mapped, so each partition reads only its own rows' bytes.  Each partition reads only
    the parquet row groups covering its rows.

    Parameters
    ----------
    path : path or fsspec URL
        Folder with ``img_emb/img_emb_N.npy`` and ``metadata/metadata_N.parquet``.
    column : str
        Name of the embedding column to create.
    rows_per_partition : int
        Large files are split into partitions of at most this many rows (a partition never
        spans two files).

    Returns
    -------
    dask.dataframe.DataFrame
        Index: the global row number, ``0 .. total_rows - 1`` across all files in file order
        (unique, with known divisions).

    Raises
    ------
    EmbeddingFormatError
        A file has no partner (``img_emb_N.npy`` without ``metadata_N.parquet`` or vice versa),
        a file name in ``img_emb/`` or ``metadata/`` is not ``img_emb_<N>.npy`` /
        ``metadata_<N>.parquet``, a pair's row counts differ, an ``.npy`` is not a 2-d float
        array, the ``.npy`` files differ in dtype or width, the metadata files differ in
        columns, or the metadata already has a column named ``column``.
    FileNotFoundError
        There are no ``.npy`` files.
    """
    import dask.dataframe as dd

    if not isinstance(rows_per_partition, (int, np.integer)) or rows_per_partition < 1:
        raise ValueError(f"rows_per_partition must be a positive integer, not {rows_per_partition!r}")
    rows_per_partition = int(rows_per_partition)
    fs, root = _url_to_fs(path)
    parts: list[tuple[str, str, int, int, int]] = []
    pairs = _pairs(fs, root)
    # the first pair sets the frame's columns, embedding dtype and width; the others must agree
    npy0, meta0 = pairs[0]
    dtype0: np.dtype[Any] | None = None
    width0 = 0
    schema0 = pa.schema([])
    names0: list[Any] = []
    offset = 0
    for npy, meta in pairs:
        shape, dtype, _, data_offset = _npy_header(fs, npy)
        if len(shape) != 2 or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise EmbeddingFormatError(
                f"{_show(fs, npy)} holds a {dtype} array of shape {shape}; expected (rows, dim) floats."
            )
        dtype = dtype.newbyteorder("=")
        size = fs.size(npy)
        if size is not None and size < data_offset + int(np.prod(shape)) * dtype.itemsize:
            raise EmbeddingFormatError(
                f"{_show(fs, npy)} is truncated: its header says {shape} {dtype} but the file has "
                f"only {size} bytes."
            )
        if _is_local(fs):
            md = pq.read_metadata(meta)
        else:
            with fs.open(meta, "rb") as f:
                md = pq.read_metadata(f)
        if md.num_rows != shape[0]:
            raise EmbeddingFormatError(
                f"{_show(fs, npy)} has {shape[0]} rows but {_show(fs, meta)} has {md.num_rows}: the "
                "pair must describe the same images in the same order. Regenerate or remove the pair."
            )
        schema = md.schema.to_arrow_schema()
        names = list(_to_pandas(schema.empty_table()).columns)
        if dtype0 is None:
            if column in names:
                raise EmbeddingFormatError(
                    f"{_show(fs, meta)} already has a column {column!r}; pass another column= name."
                )
            dtype0, width0, schema0, names0 = dtype, shape[1], schema, names
        else:
            if (dtype, shape[1]) != (dtype0, width0):
                raise EmbeddingFormatError(
                    f"{_show(fs, npy)} holds {dtype} rows of width {shape[1]} but {_show(fs, npy0)} "
                    f"holds {dtype0} rows of width {width0}; all .npy files must agree."
                )
            if names != names0:
                raise EmbeddingFormatError(
                    f"{_show(fs, meta)} has columns {names} but {_show(fs, meta0)} has "
                    f"{names0}; all metadata files must have the same columns."
                )
        for start in range(0, shape[0], rows_per_partition):
            parts.append((npy, meta, start, min(start + rows_per_partition, shape[0]), offset))
        offset += shape[0]
    assert dtype0 is not None  # _pairs raised if there were no files

    meta_df = _to_pandas(schema0.empty_table())  # from the footer: no data read
    list_type = pa.list_(pa.from_numpy_dtype(dtype0), width0)
    meta_df[column] = pd.Series([], dtype=pd.ArrowDtype(list_type), index=meta_df.index)
    meta_df.index = pd.RangeIndex(0, 0)

    divisions: tuple[int, ...] | None
    if parts:
        divisions = (*(p[4] + p[2] for p in parts), offset - 1)
    else:  # every file is empty: one empty partition
        parts = [(npy0, meta0, 0, 0, 0)]
        divisions = None
    kwargs: dict[str, Any] = {"column": column}
    if not _is_local(fs):
        kwargs["fs"] = fs
    return dd.from_map(
        _load_part, parts, meta=meta_df, divisions=divisions, label="read-embeddings",
        enforce_metadata=False, **kwargs,
    )


def read_input(path: Any, **kwargs: Any) -> Any:
    """Read ``path`` for scoring: a parquet_npy folder, else parquet with Arrow list columns.

    ``path`` may be local or an fsspec URL; for parquet also a glob or a list of paths.
    """
    import dask.dataframe as dd

    if isinstance(path, (str, os.PathLike)):
        try:
            npy_layout = is_parquet_npy(path)
        except (ImportError, ValueError):  # e.g. a protocol whose fsspec package is missing:
            npy_layout = False  # let read_parquet report it
        if npy_layout:
            return read_embeddings(path, **kwargs)
    return dd.read_parquet(path, dtype_backend="pyarrow", **kwargs)
