"""Reading embeddings as Dask DataFrames: parquet, and LAION's ``parquet_npy`` layout.

LAION-style embedding sets (clip-retrieval's output, read by embedding-reader) are folders with
``img_emb/img_emb_N.npy`` (float16 or float32, one row per image) beside
``metadata/metadata_N.parquet`` (the same rows, in the same order).  :func:`read_embeddings`
turns such a folder into a Dask DataFrame whose partitions hold the metadata columns plus an
Arrow ``fixed_size_list`` embedding column over the memory-mapped ``.npy``: nothing of the
embeddings is read or copied until a partition is scored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .exceptions import EmbeddingFormatError

__all__ = ["is_parquet_npy", "read_embeddings", "read_input"]

_NPY = re.compile(r"img_emb_(\d+)\.npy$")


def is_parquet_npy(path: str | os.PathLike[str]) -> bool:
    """True if ``path`` is a local folder with ``img_emb/*.npy`` and ``metadata/*.parquet``."""
    p = Path(path)
    return (p / "img_emb").is_dir() and (p / "metadata").is_dir()


def _pairs(root: Path) -> list[tuple[Path, Path]]:
    pairs = []
    for npy in sorted((root / "img_emb").glob("img_emb_*.npy"),
                      key=lambda f: int(_NPY.search(f.name).group(1))):  # type: ignore[union-attr]
        n = _NPY.search(npy.name).group(1)  # type: ignore[union-attr]
        meta = root / "metadata" / f"metadata_{n}.parquet"
        if not meta.is_file():
            raise FileNotFoundError(f"{npy} has no matching metadata file {meta}")
        pairs.append((npy, meta))
    if not pairs:
        raise FileNotFoundError(f"No img_emb/img_emb_N.npy files in {root}")
    return pairs


def _load_part(part: tuple[str, str, int, int], column: str) -> pd.DataFrame:
    npy, meta, start, stop = part
    emb = np.load(npy, mmap_mode="r")[start:stop]
    table = pq.read_table(meta)
    if start or stop != table.num_rows:
        table = table.slice(start, stop - start)
    df = table.to_pandas(types_mapper=pd.ArrowDtype)
    values = pa.array(np.asarray(emb).reshape(-1))  # wraps the memory map, no copy
    lists = pa.FixedSizeListArray.from_arrays(values, emb.shape[1])
    df[column] = pd.arrays.ArrowExtensionArray(lists)
    df.index = pd.RangeIndex(start, stop)
    return df


def read_embeddings(
    path: str | os.PathLike[str],
    *,
    column: str = "embedding",
    rows_per_partition: int = 262_144,
) -> Any:
    """Read a LAION ``parquet_npy`` folder as a Dask DataFrame (metadata columns + embeddings).

    Parameters
    ----------
    path : path
        Folder with ``img_emb/img_emb_N.npy`` and ``metadata/metadata_N.parquet``.
    column : str
        Name of the embedding column to create.
    rows_per_partition : int
        Large files are split into partitions of at most this many rows.

    Returns
    -------
    dask.dataframe.DataFrame
        Index: the row number within each file pair.

    Raises
    ------
    EmbeddingFormatError
        A pair's row counts differ, or an ``.npy`` is not a 2-d float array.
    """
    import dask.dataframe as dd

    root = Path(path)
    parts = []
    meta_df = None
    for npy, meta in _pairs(root):
        arr = np.load(npy, mmap_mode="r")
        if arr.ndim != 2 or arr.dtype.kind != "f":
            raise EmbeddingFormatError(
                f"{npy} holds a {arr.dtype} array of shape {arr.shape}; expected (rows, dim) floats."
            )
        n_meta = pq.read_metadata(meta).num_rows
        if n_meta != arr.shape[0]:
            raise EmbeddingFormatError(
                f"{npy} has {arr.shape[0]} rows but {meta} has {n_meta}: the pair must describe "
                "the same images in the same order. Regenerate or remove the pair."
            )
        if column in pq.read_schema(meta).names:
            raise EmbeddingFormatError(
                f"{meta} already has a column {column!r}; pass another column= name."
            )
        for start in range(0, arr.shape[0], rows_per_partition):
            parts.append((str(npy), str(meta), start, min(start + rows_per_partition, arr.shape[0])))
        if meta_df is None:
            meta_df = _load_part((str(npy), str(meta), 0, 0), column)
    return dd.from_map(_load_part, parts, column=column, meta=meta_df, enforce_metadata=False)


def read_input(path: str, **kwargs: Any) -> Any:
    """Read ``path`` for scoring: a parquet_npy folder, else parquet with Arrow list columns."""
    import dask.dataframe as dd

    if is_parquet_npy(path):
        return read_embeddings(path, **kwargs)
    return dd.read_parquet(path, dtype_backend="pyarrow", **kwargs)
