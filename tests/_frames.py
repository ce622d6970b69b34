"""Frame builders shared by the test modules (one copy, not one per file).

``embedding_array(x)`` is how every test turns a ``(rows, dim)`` NumPy array into an Arrow list
column the way users get one from parquet (``dtype_backend="pyarrow"``): one Python list per row
through ``pa.array``, so each test exercises the same Arrow layout as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa


def embedding_array(
    x: np.ndarray | pa.Array | pa.ChunkedArray, pa_type: pa.DataType | None = None
) -> pd.arrays.ArrowExtensionArray:
    """A pandas Arrow column of embeddings: ``x`` as ``list<float32>`` (or ``pa_type``, e.g.
    ``pa.list_(pa.float16())`` or a ``fixed_size_list``); Arrow arrays are wrapped as they are."""
    if isinstance(x, (pa.Array, pa.ChunkedArray)):
        return pd.arrays.ArrowExtensionArray(x)
    return pd.arrays.ArrowExtensionArray(pa.array(list(x), type=pa_type or pa.list_(pa.float32())))


def make_frame(columns: dict[str, Any], index: Any = None) -> pd.DataFrame:
    """A DataFrame in the given column order; 2-d NumPy arrays and Arrow arrays become embedding
    columns (:func:`embedding_array`), anything else is passed to pandas as is."""
    data = {
        name: embedding_array(v)
        if isinstance(v, (pa.Array, pa.ChunkedArray)) or (isinstance(v, np.ndarray) and v.ndim == 2)
        else v
        for name, v in columns.items()
    }
    return pd.DataFrame(data, index=index)


def unit_vectors(n: int, seed: int = 0, dim: int = 768) -> np.ndarray:
    """``n`` random unit-length float32 rows, as CLIP embeddings are stored."""
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)
