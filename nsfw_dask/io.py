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

import json
import os
import re
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .exceptions import EmbeddingFormatError

__all__ = [
    "EMBEDDING_METADATA_KEY",
    "binary_as_lists",
    "binary_embedding_dtype",
    "is_parquet_npy",
    "read_embeddings",
    "read_input",
    "read_parquet_embeddings",
]

_NPY = re.compile(r"img_emb_(\d+)\.npy")
_META = re.compile(r"metadata_(\d+)\.parquet")
# pandas stores an *unnamed* non-range index as ``__index_level_N__``; we replace the index, so
# these anonymous columns are dropped (named index levels are ordinary columns and are kept).
PANDAS_INDEX = re.compile(r"__index_level_\d+__")

#: The field metadata with which ``nsfw-dask score --keep-embeddings`` (binary) records the
#: float dtype of a ``fixed_size_binary`` embedding column (JSON: ``{"dtype": "float16", ...}``).
EMBEDDING_METADATA_KEY = b"nsfw_dask.embedding"


def _url_to_fs(path: str | os.PathLike[str]) -> tuple[Any, str]:
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(os.fspath(path))
    return fs, root.rstrip("/") or "/"


def is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def show_path(fs: Any, path: str) -> str:
    """``path`` as a user would write it: plain for local files, a URL otherwise."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


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
                f"{show_path(fs, path)}: unexpected file name in a parquet_npy folder; expected "
                f"{expected} with an integer N. Rename or remove it."
            )
        n = int(m.group(1))
        if n in found:
            raise EmbeddingFormatError(
                f"{show_path(fs, found[n])} and {show_path(fs, path)} have the same number {n}; remove one of them."
            )
        found[n] = path
    return found


def parquet_npy_pairs(fs: Any, root: str) -> list[tuple[str, str]]:
    """The ``(npy, parquet)`` pairs of a parquet_npy folder, in numeric order of N."""
    npys = _numbered(fs, f"{root}/img_emb", ".npy", _NPY)
    metas = _numbered(fs, f"{root}/metadata", ".parquet", _META)
    for n in sorted(npys.keys() ^ metas.keys()):
        have, want = (
            (npys[n], f"{root}/metadata/metadata_{n}.parquet")
            if n in npys
            else (metas[n], f"{root}/img_emb/img_emb_{n}.npy")
        )
        raise EmbeddingFormatError(
            f"{show_path(fs, have)} has no partner: expected {show_path(fs, want)} (each "
            f"img_emb/img_emb_N.npy needs metadata/metadata_N.parquet, and vice versa). "
            "Add the missing file or remove the orphan."
        )
    if not npys:
        raise FileNotFoundError(f"No img_emb/img_emb_N.npy files in {show_path(fs, root)}")
    return [(npys[n], metas[n]) for n in sorted(npys)]


def _read_header(f: Any, shown: str) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """Shape, dtype, Fortran order and data offset of the ``.npy`` open as ``f`` (at its start)."""
    fmt = np.lib.format  # public functions only (numpy's reader of other versions is private)
    try:
        version = fmt.read_magic(f)
    except ValueError as e:
        raise EmbeddingFormatError(f"{shown} is not a valid .npy file: {e}") from e
    if version not in ((1, 0), (2, 0)):  # 3.0: np.save writes it only for non-latin-1 field names
        raise EmbeddingFormatError(
            f"{shown} is a .npy file of format version {version[0]}.{version[1]}; only versions 1.0 "
            "and 2.0 are read. Re-save it with numpy.save(path, numpy.load(path)), which writes a "
            "float array as version 1.0."
        )
    read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
    try:
        shape, fortran, dtype = read(f)
    except ValueError as e:
        raise EmbeddingFormatError(f"{shown} is not a valid .npy file: {e}") from e
    return shape, dtype, fortran, f.tell()


def npy_header(fs: Any, path: str) -> tuple[tuple[int, ...], np.dtype[Any], bool, int]:
    """:func:`_read_header` of ``path``, reading only the header."""
    with fs.open(path, "rb") as f:
        return _read_header(f, show_path(fs, path))


def binary_embedding_dtype(field: pa.Field) -> np.dtype[Any] | None:
    """The float dtype of a ``fixed_size_binary`` column of embeddings as ``--keep-embeddings``
    writes them (each row a vector's little-endian bytes, the dtype in the field metadata
    :data:`EMBEDDING_METADATA_KEY`); None for any other column, or one without that record."""
    md = field.metadata or {}
    if not pa.types.is_fixed_size_binary(field.type) or EMBEDDING_METADATA_KEY not in md:
        return None
    try:
        record = json.loads(md[EMBEDDING_METADATA_KEY])
        dtype = np.dtype(record["dtype"])
    except (ValueError, KeyError, TypeError):
        return None
    if record.get("byteorder", "little") != "little" or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        return None
    if field.type.byte_width == 0 or field.type.byte_width % dtype.itemsize:
        return None
    return dtype.newbyteorder("<")


def binary_as_lists(chunk: pa.Array, dtype: np.dtype[Any]) -> pa.Array:
    """A ``fixed_size_binary`` chunk of :func:`binary_embedding_dtype` ``dtype`` as a
    ``fixed_size_list`` of that float type over the same buffers (no copy; nulls stay null)."""
    value_type = pa.from_numpy_dtype(dtype)
    dim = chunk.type.byte_width // dtype.itemsize
    list_type = pa.list_(value_type, dim)
    if len(chunk) == 0:
        return pa.array([], type=list_type)
    validity, data = chunk.buffers()
    values = pa.Array.from_buffers(value_type, (chunk.offset + len(chunk)) * dim, [None, data])
    return pa.Array.from_buffers(list_type, len(chunk), [validity], offset=chunk.offset, children=[values])


def _to_pandas(table: pa.Table, start: int = 0) -> pd.DataFrame:
    """Rows ``start ..`` of a file as an Arrow-backed frame; pandas index levels become columns.

    A named index that pandas stored as a column is an ordinary column here; a named
    ``RangeIndex`` (which pandas stores only in the schema's metadata) is rebuilt as an int64
    column; an unnamed stored index (``__index_level_N__``) is dropped.
    """
    df = table.to_pandas(types_mapper=pd.ArrowDtype, ignore_metadata=True)
    drop = [c for c in df.columns if isinstance(c, str) and PANDAS_INDEX.fullmatch(c)]
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


#: ``read_parquet_rows`` stops decoding a row group early when more than this many of its rows
#: lie after the range (and decodes it in batches of this many rows).
_TAIL_ROWS = 65_536


def read_parquet_rows(fs: Any, meta: str, start: int, stop: int) -> pa.Table:
    """Rows ``[start, stop)`` of a parquet file, reading only the row groups that hold them."""

    def read(pf: pq.ParquetFile) -> pa.Table:
        md = pf.metadata
        bounds = [0]
        for i in range(md.num_row_groups):
            bounds.append(bounds[-1] + md.row_group(i).num_rows)
        groups = [i for i in range(md.num_row_groups) if bounds[i] < stop and bounds[i + 1] > start]
        if not groups:
            return pf.schema_arrow.empty_table()
        # decoded in the calling thread: parallelism comes from the job's tasks (one per Dask
        # thread), and inside a Dask worker pyarrow's own pool has one thread (the nanny sets
        # OMP_NUM_THREADS=1, which sizes it), so every task's decode would queue behind it
        first = bounds[groups[0]]
        if bounds[groups[-1] + 1] - stop <= _TAIL_ROWS:
            table = pf.read_row_groups(groups, use_threads=False)
            return table.slice(start - first, stop - start)
        # A row group much longer than the range (a partition cut out of a big group, e.g. a
        # metadata file written as one group): decode it in batches and stop after ``stop``,
        # rather than decode the whole group once per partition cut from it.  Rows before
        # ``start`` are still decoded (parquet pages cannot be skipped here) but not kept.
        batches, pos = [], first
        for batch in pf.iter_batches(batch_size=_TAIL_ROWS, row_groups=groups, use_threads=False):
            lo, hi = max(start - pos, 0), min(stop - pos, batch.num_rows)
            if hi > lo:
                batches.append(batch.slice(lo, hi - lo))
            pos += batch.num_rows
            if pos >= stop:
                break
        return pa.Table.from_batches(batches, schema=pf.schema_arrow)

    if is_local(fs):
        # memory-mapped: pages are decoded straight from the page cache, not first copied into
        # freshly allocated (page-faulted) buffers
        with pq.ParquetFile(meta, memory_map=True) as pf:
            return read(pf)
    with fs.open(meta, "rb") as f, pq.ParquetFile(f) as pf:
        return read(pf)


def read_npy_rows(fs: Any, npy: str, start: int, stop: int) -> np.ndarray:
    """Rows ``[start, stop)`` of a 2-d ``.npy``: a view of the memory map when local."""
    if is_local(fs):
        return np.load(npy, mmap_mode="r")[start:stop]
    with fs.open(npy, "rb") as f:
        shape, dtype, fortran, offset = _read_header(f, show_path(fs, npy))
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
    emb = read_npy_rows(fs, npy, start, stop)
    if not emb.dtype.isnative:
        emb = emb.astype(emb.dtype.newbyteorder("="))
    df = _to_pandas(read_parquet_rows(fs, meta, start, stop), start)
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
        (unique, with known divisions).  Its partitions are pandas (Arrow) frames under any
        ``dataframe.backend``, ``"cudf"`` included: ``dd.from_map`` is not dispatched on the
        backend, and dask never fuses ``from_map`` partitions (``BlockwiseIO``'s
        ``_fusion_compression_factor`` is 1), so ``rows_per_partition`` is what you get.  On
        GPU workers score them with ``score_nsfw(..., device="cuda")``: batches are copied to the
        GPU and cast there (float16 stays float16 on the host and over PCIe).

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
    pairs = parquet_npy_pairs(fs, root)
    # the first pair sets the frame's columns, embedding dtype and width; the others must agree
    npy0, meta0 = pairs[0]
    dtype0: np.dtype[Any] | None = None
    width0 = 0
    schema0 = pa.schema([])
    names0: list[Any] = []
    offset = 0
    for npy, meta in pairs:
        shape, dtype, _, data_offset = npy_header(fs, npy)
        if len(shape) != 2 or dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise EmbeddingFormatError(
                f"{show_path(fs, npy)} holds a {dtype} array of shape {shape}; expected (rows, dim) floats."
            )
        dtype = dtype.newbyteorder("=")
        size = fs.size(npy)
        if size is not None and size < data_offset + int(np.prod(shape)) * dtype.itemsize:
            raise EmbeddingFormatError(
                f"{show_path(fs, npy)} is truncated: its header says {shape} {dtype} but the file has "
                f"only {size} bytes."
            )
        if is_local(fs):
            md = pq.read_metadata(meta)
        else:
            with fs.open(meta, "rb") as f:
                md = pq.read_metadata(f)
        if md.num_rows != shape[0]:
            raise EmbeddingFormatError(
                f"{show_path(fs, npy)} has {shape[0]} rows but {show_path(fs, meta)} has {md.num_rows}: the "
                "pair must describe the same images in the same order. Regenerate or remove the pair."
            )
        schema = md.schema.to_arrow_schema()
        names = list(_to_pandas(schema.empty_table()).columns)
        if dtype0 is None:
            if column in names:
                raise EmbeddingFormatError(
                    f"{show_path(fs, meta)} already has a column {column!r}; pass another column= name."
                )
            dtype0, width0, schema0, names0 = dtype, shape[1], schema, names
        else:
            if (dtype, shape[1]) != (dtype0, width0):
                raise EmbeddingFormatError(
                    f"{show_path(fs, npy)} holds {dtype} rows of width {shape[1]} but {show_path(fs, npy0)} "
                    f"holds {dtype0} rows of width {width0}; all .npy files must agree (one Dask "
                    f"frame, one dtype): convert one, e.g. numpy.save(path, numpy.load(path).astype('{dtype0}')), "
                    "or score the folder with nsfw-dask score, which reads each file as it is."
                )
            if names != names0:
                raise EmbeddingFormatError(
                    f"{show_path(fs, meta)} has columns {names} but {show_path(fs, meta0)} has "
                    f"{names0}; all metadata files must have the same columns."
                )
        for start in range(0, shape[0], rows_per_partition):
            parts.append((npy, meta, start, min(start + rows_per_partition, shape[0]), offset))
        offset += shape[0]
    assert dtype0 is not None  # parquet_npy_pairs raised if there were no files

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
    if not is_local(fs):
        kwargs["fs"] = fs
    return dd.from_map(
        _load_part,
        parts,
        meta=meta_df,
        divisions=divisions,
        label="read-embeddings",
        enforce_metadata=False,
        **kwargs,
    )


_PARQUET_SUFFIXES = (".parq", ".parquet", ".pq")  # dd.read_parquet's parquet_file_extension
_UNSET: Any = object()


def half_float_list_columns(schema: pa.Schema) -> list[str]:
    """The columns of ``schema`` that are lists (``list``, ``large_list``, ``fixed_size_list``) of float16.

    libcudf reads a Parquet FLOAT16 column as fixed-length strings (``reader_impl_helpers.cpp``:
    FIXED_LEN_BYTE_ARRAY without a DECIMAL logical type -> STRING) and cuDF has no float16 dtype,
    so such embeddings cannot be read as cuDF partitions.
    """
    out = []
    for field in schema:
        t = field.type
        if (
            pa.types.is_list(t)
            or pa.types.is_large_list(t)
            or pa.types.is_fixed_size_list(t)
            or getattr(pa.types, "is_list_view", lambda _: False)(t)
            or getattr(pa.types, "is_large_list_view", lambda _: False)(t)
        ):
            if pa.types.is_float16(t.value_type):
                out.append(field.name)
    return out


def parquet_schema(path: Any, storage_options: dict[str, Any] | None = None) -> pa.Schema | None:
    """The Arrow schema of the first parquet file of ``path`` (a file, folder, glob, URL or list of
    them), from its footer only; None if no parquet file is found (``dd.read_parquet`` reports it)."""
    from fsspec.core import url_to_fs

    first = path[0] if isinstance(path, (list, tuple)) and path else path
    if not isinstance(first, (str, os.PathLike)):
        return None
    fs, root = url_to_fs(os.fspath(first), **(storage_options or {}))
    if any(c in root for c in "*?["):
        candidates = sorted(fs.glob(root))
    elif fs.isdir(root):
        if fs.isfile(f"{root.rstrip('/')}/_metadata"):
            candidates = [f"{root.rstrip('/')}/_metadata"]
        else:
            candidates = sorted(fs.find(root))
    else:
        candidates = [root]
    files = [
        f
        for f in candidates
        if f.endswith("/_metadata") or (f.endswith(_PARQUET_SUFFIXES) and not _basename(f).startswith(("_", ".")))
    ]
    if not files:
        return None
    with fs.open(files[0], "rb") as f:
        return pq.read_schema(f)


def parquet_read_options(backend: str, schema: pa.Schema | None, blocksize: Any = _UNSET) -> tuple[str, dict[str, Any]]:
    """``(backend to read with, keywords for dd.read_parquet)`` for :func:`read_parquet_embeddings`.

    * ``"cudf"``: ``blocksize=None`` unless given: one partition per file.  dask_cudf's own
      default (``"default"``) is 1/32 of the smallest worker GPU's memory and *fuses* smaller
      files into one partition (``dask_cudf/io/parquet.py``: ``_normalize_blocksize``; fusion is
      off only for ``blocksize=None``), so on a 141 GB GPU ~4.4 GB of files become one
      partition and the other GPUs of the node wait.
    * ``"cudf"`` with a float16 list column in ``schema``: read with the pandas backend and
      ``dtype_backend="pyarrow"`` instead (cuDF cannot hold float16; see
      :func:`half_float_list_columns`).
    * ``"pandas"``: ``dtype_backend="pyarrow"`` (Arrow list columns, no per-row objects);
      ``blocksize`` only if given (dask's default otherwise).
    """
    if backend not in ("pandas", "cudf"):
        raise ValueError(f"backend must be 'pandas' or 'cudf', not {backend!r}")
    if backend == "cudf" and not (schema is not None and half_float_list_columns(schema)):
        return "cudf", {"blocksize": None if blocksize is _UNSET else blocksize}
    kw: dict[str, Any] = {"dtype_backend": "pyarrow"}
    if blocksize is not _UNSET:
        kw["blocksize"] = blocksize
    return "pandas", kw


def read_parquet_embeddings(
    path: Any,
    *,
    backend: str | None = None,
    blocksize: Any = _UNSET,
    storage_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Any:
    """Read parquet files of embeddings (``list<float>`` columns) as a Dask DataFrame, CPU or GPU.

    The one reading function for parquet input on both backends (the benchmark and the GPU
    notebook use it).  ``backend`` (default: dask's ``dataframe.backend``):

    * ``"pandas"``: ``dd.read_parquet(path, dtype_backend="pyarrow")``: Arrow list columns.
    * ``"cudf"``: cuDF partitions, **one per file** (``blocksize=None``; pass ``blocksize=`` to
      choose a size instead).  If the first file's schema has a float16 list column, which
      cuDF cannot read, the files are read with pyarrow into pandas partitions instead (a log
      line says so): score those with ``score_nsfw(..., device="cuda")``.

    With the pandas backend dask may still fuse files smaller than
    ``dataframe.parquet.minimum-partition-size`` (75 MB by default) when the graph is optimized.
    Other keywords go to ``dd.read_parquet``.
    """
    import logging

    import dask
    import dask.dataframe as dd

    backend = backend or dask.config.get("dataframe.backend", "pandas") or "pandas"
    schema = parquet_schema(path, storage_options) if backend == "cudf" else None
    use, kw = parquet_read_options(backend, schema, blocksize)
    if use != backend:
        logging.getLogger(__name__).info(
            "columns %s hold float16 lists, which cuDF cannot read: reading with pyarrow (pandas "
            "partitions; score them with device='cuda')",
            half_float_list_columns(schema),
        )
    with dask.config.set({"dataframe.backend": use}):
        return dd.read_parquet(path, storage_options=storage_options, **{**kw, **kwargs})


def read_input(path: Any, **kwargs: Any) -> Any:
    """Read ``path`` for scoring: a parquet_npy folder, else parquet with Arrow list columns.

    ``path`` may be local or an fsspec URL; for parquet also a glob or a list of paths.  Parquet
    goes through :func:`read_parquet_embeddings` (Arrow list columns on pandas; one cuDF partition
    per file, and float16 lists through pyarrow, under the cudf backend).
    """
    if isinstance(path, (str, os.PathLike)):
        try:
            npy_layout = is_parquet_npy(path)
        except (ImportError, ValueError):  # e.g. a protocol whose fsspec package is missing:
            npy_layout = False  # let read_parquet report it
        if npy_layout:
            return read_embeddings(path, **kwargs)
    return read_parquet_embeddings(path, **kwargs)
