"""pandas partitions: Arrow list buffers -> torch CPU tensors without a copy.

For each Arrow chunk of the column (``list``, ``large_list`` or ``fixed_size_list`` of
float16/32/64) the rows' lengths and nulls are checked first, then the child values covering
exactly this (possibly sliced) chunk are wrapped with ``torch.from_dlpack``: no copy, whatever the
slice offset (``ListArray.values`` ignores it, so the range is taken from the offsets).  Several
chunks give several segments, still without a copy.  Copies happen only where the layout makes
them unavoidable, and are logged at DEBUG: an object column of numpy arrays (one conversion to
Arrow), null elements inside a list (filled with NaN), and null rows backed by values of other
lengths (a gather of the valid rows).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from ._common import choose_column, element_type_error, label_repr, length_error, meta_inference_column
from .dispatch import Segment, backend_dispatch
from .exceptions import EmbeddingColumnError, EmbeddingFormatError
from .models import ModelSpec

logger = logging.getLogger(__name__)

_CAST_FIX = (
    "Cast it, e.g. ddf[col] = ddf[col].astype(pd.ArrowDtype(pa.list_(pa.float32()))), "
    "or pass column= naming the embedding column."
)


def _is_list_type(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_float_list_dtype(dtype: Any) -> bool:
    if not isinstance(dtype, pd.ArrowDtype):
        return False
    t = dtype.pyarrow_dtype
    return _is_list_type(t) and pa.types.is_floating(t.value_type)


def _describe_arrow(t: pa.DataType) -> str:
    if _is_list_type(t):
        if pa.types.is_fixed_size_list(t):
            return f"fixed_size_list<{_describe_arrow(t.value_type)}>[{t.list_size}]"
        kind = "large_list" if pa.types.is_large_list(t) else "list"
        return f"{kind}<{_describe_arrow(t.value_type)}>"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_floating(t) or pa.types.is_integer(t):
        return np.dtype(t.to_pandas_dtype()).name
    return str(t)


def describe_dtype(dtype: Any) -> str:
    """A dtype as :func:`nsfw_dask._common.meta_inference_column` reads it: ``"list<float32>"``,
    ``"fixed_size_list<float16>[768]"``, ``"list<int64>"``, ``"str"``, ``"object"``, ``"int64"``."""
    if isinstance(dtype, pd.ArrowDtype):
        return _describe_arrow(dtype.pyarrow_dtype)
    if isinstance(dtype, pd.StringDtype):
        return "str"
    return str(dtype)


def _is_null(v: Any) -> bool:
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _first_valid(s: pd.Series) -> Any:
    notna = s.notna().to_numpy()
    return s.array[int(np.argmax(notna))] if notna.any() else None


def _looks_like_vector(v: Any) -> bool | None:
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        return v.ndim == 1 and v.dtype.kind == "f"
    if isinstance(v, (list, tuple)) and v:
        return isinstance(v[0], float)
    return False


def _check_unique(df: pd.DataFrame, column: Any) -> None:
    dup = df.columns[df.columns.duplicated()]
    if len(dup) and (column is None or column in dup):
        raise EmbeddingColumnError(
            f"Column names {sorted(map(str, set(dup)))} appear more than once; rename them "
            "(e.g. df.columns = [...]) so the embedding column is unambiguous."
        )


class PandasBackend:
    name = "pandas"

    def default_device(self, df: pd.DataFrame) -> str:
        return "cpu"

    def resolve_column(self, df: pd.DataFrame, column: Any, *, schema_only: bool) -> Any:
        _check_unique(df, column)
        dtypes = df.dtypes
        if schema_only and column is None:  # dask's fake partition: names and dtypes only
            return meta_inference_column((c, describe_dtype(d)) for c, d in dtypes.items())

        def is_candidate(c: Any) -> bool | None:
            d = dtypes[c]
            if _is_float_list_dtype(d):
                return True
            if d == object:  # noqa: E721 (a dtype equality: numpy's object dtype, not a type check)
                return _looks_like_vector(_first_valid(df[c]))
            return False

        return choose_column(df, column, is_candidate=is_candidate, describe=dtypes.items())

    def to_segments(self, df: pd.DataFrame, column: Any, spec: ModelSpec) -> list[Segment]:
        s = df[column]
        if isinstance(s.dtype, pd.ArrowDtype):
            chunks = s.array.__arrow_array__().chunks
        elif s.dtype == object:
            chunks = [_object_to_arrow(s, column)]
        else:
            raise EmbeddingFormatError(
                f"Column {column!r} has dtype {s.dtype}; expected an Arrow list of floats "
                "(read parquet with dtype_backend='pyarrow') or an object column of numpy arrays."
            )
        _check_lengths(chunks, column, spec, df.index)  # every chunk, before any segment exists
        segments = []
        start = 0
        for chunk in chunks:
            if len(chunk):
                segments.append(_chunk_segment(chunk, start, column, spec, df.index))
            start += len(chunk)
        if len(chunks) > 1:
            logger.debug(
                "column %r arrived in %d Arrow chunks: %d segments, no copy", column, len(chunks), len(segments)
            )
        return segments

    def attach(self, df: pd.DataFrame, score_column: Any, scores: torch.Tensor | None) -> pd.DataFrame:
        if scores is None:
            values = np.full(len(df), np.nan, dtype=np.float32)
        else:
            values = scores.detach().to("cpu").numpy()
        out = df.copy(deep=False)
        key = score_column
        if isinstance(df.columns, pd.MultiIndex) and not isinstance(key, tuple):
            key = (key,) + ("",) * (df.columns.nlevels - 1)
        out[key] = values  # positional: no index alignment, duplicate labels are fine
        return out


def _object_to_arrow(s: pd.Series, column: Any) -> pa.Array:
    """One conversion of an object column (numpy arrays, lists, None) to an Arrow list array."""
    logger.debug("column %r is an object column: one copy to Arrow", column)
    for row, v in enumerate(s.array):  # pyarrow would silently turn an integer array into floats
        if isinstance(v, np.ndarray) and v.dtype.kind != "f":
            raise EmbeddingFormatError(
                f"Column {column!r}: row {label_repr(s.index[row])} holds a numpy array of {v.dtype}, "
                "not of floats (a quantized or integer embedding is not a CLIP embedding until it "
                f"is dequantized). {_CAST_FIX}"
            )
    try:
        arr = pa.array(s.array, from_pandas=True)
    except (pa.ArrowException, TypeError, ValueError) as e:
        pos, desc = _first_non_vector(s)
        if pos is None:  # every element is a float vector, just of mixed dtypes
            arr = pa.array(
                [None if _is_null(v) else np.asarray(v, dtype=np.float32) for v in s.array],
                type=pa.list_(pa.float32()),
            )
        else:
            raise EmbeddingFormatError(
                f"Column {column!r}: row {label_repr(s.index[pos])} holds {desc}, not a 1-d array of floats "
                f"({e}). Store one float32 vector (or None) per row."
            ) from e
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_null(arr.type):  # every row None
        return pa.nulls(len(arr), pa.list_(pa.float32()))
    if not _is_list_type(arr.type):
        pos, desc = _first_non_vector(s)
        where = f" (row {label_repr(s.index[pos])} holds {desc})" if pos is not None else ""
        raise EmbeddingFormatError(
            f"Column {column!r} holds {arr.type} values{where}; expected one array of floats per row. {_CAST_FIX}"
        )
    if pa.types.is_integer(arr.type.value_type):  # Python lists of numbers that happen to be all ints
        # (numpy integer arrays were refused above): floats, as pyarrow makes a list mixing ints and floats
        arr = arr.cast(pa.list_(pa.float64()))
    return arr


def _first_non_vector(s: pd.Series) -> tuple[int | None, str]:
    for pos, v in enumerate(s.array):
        if _is_null(v):
            continue
        if isinstance(v, (str, bytes)):
            return pos, f"a {type(v).__name__}"
        try:
            a = np.asarray(v)
        except Exception:
            return pos, f"a {type(v).__name__}"
        if a.ndim != 1 or a.dtype.kind not in "fiu":
            return pos, f"a {type(v).__name__} of shape {a.shape} and dtype {a.dtype}"
    return None, ""


def _strip_validity(values: pa.Array) -> pa.Array:
    """The same buffer without its validity bitmap (zero-copy)."""
    return pa.Array.from_buffers(values.type, len(values), [None, values.buffers()[1]], offset=values.offset)


def _bad_lengths(chunk: pa.Array, dim: int) -> tuple[int, int, int]:
    """(position of the first non-null row whose length is not ``dim``, its length, how many such
    rows); ``(-1, 0, 0)`` when every row is right."""
    t = chunk.type
    valid = chunk.is_valid().to_numpy(zero_copy_only=False) if chunk.null_count else None
    if pa.types.is_fixed_size_list(t):
        if t.list_size == dim or (valid is not None and not valid.any()):
            return -1, 0, 0
        pos = 0 if valid is None else int(np.argmax(valid))
        return pos, t.list_size, len(chunk) if valid is None else int(valid.sum())
    lengths = np.diff(chunk.offsets.to_numpy(zero_copy_only=False))  # respects the slice
    bad = lengths != dim
    if valid is not None:
        bad &= valid
    if not bad.any():
        return -1, 0, 0
    pos = int(np.argmax(bad))
    return pos, int(lengths[pos]), int(bad.sum())


def _check_lengths(chunks: list[pa.Array], column: Any, spec: ModelSpec, index: pd.Index) -> None:
    first: tuple[int, int] | None = None
    total = start = 0
    for chunk in chunks:
        if len(chunk) and _is_list_type(chunk.type) and pa.types.is_floating(chunk.type.value_type):
            pos, got, n_bad = _bad_lengths(chunk, spec.dim)
            if n_bad and first is None:
                first = (start + pos, got)
            total += n_bad
        start += len(chunk)
    if first is not None:
        raise length_error(column, index[first[0]], first[1], spec, total)


def _chunk_segment(chunk: pa.Array, start: int, column: Any, spec: ModelSpec, index: pd.Index) -> Segment:
    n, dim, t = len(chunk), spec.dim, chunk.type
    if not _is_list_type(t):
        raise element_type_error(column, t, _CAST_FIX)
    if not pa.types.is_floating(t.value_type):
        raise element_type_error(column, t.value_type, _CAST_FIX)

    valid = None
    if chunk.null_count:
        valid = chunk.is_valid().to_numpy(zero_copy_only=False)

    # 1. lengths, checked before anything is reshaped
    if pa.types.is_fixed_size_list(t):
        size = t.list_size
        lengths = None
        base, end = chunk.offset * size, (chunk.offset + n) * size
        if size != dim:
            pos = 0 if valid is None else int(np.argmax(valid))
            if valid is None or valid.any():
                n_bad = n if valid is None else int(valid.sum())
                raise length_error(column, index[start + pos], size, spec, n_bad)
    else:
        offsets = chunk.offsets.to_numpy(zero_copy_only=False)  # respects the slice
        lengths = np.diff(offsets)
        base, end = int(offsets[0]), int(offsets[-1])
        bad = lengths != dim
        if valid is not None:
            bad &= valid
        if bad.any():
            pos = int(np.argmax(bad))
            raise length_error(column, index[start + pos], int(lengths[pos]), spec, int(bad.sum()))

    if valid is not None and not valid.any():  # every row null: nothing to read or score
        dtype = {16: torch.float16, 32: torch.float32, 64: torch.float64}[t.value_type.bit_width]
        return Segment(start, start + n, torch.empty((0, dim), dtype=dtype), rows=torch.empty(0, dtype=torch.int64))

    # 2. the values of exactly this chunk, zero-copy (``.values`` ignores the slice offset)
    values = chunk.values.slice(base, end - base)
    if values.null_count:
        elem_null = ~values.is_valid().to_numpy(zero_copy_only=False)
        if valid is None:
            in_valid_rows = bool(elem_null.any())
        else:
            row_lengths = np.full(n, t.list_size) if lengths is None else lengths
            in_valid_rows = bool((elem_null & np.repeat(valid, row_lengths)).any())
        if in_valid_rows:
            logger.debug("column %r has null elements inside embeddings: NaN-filled copy", column)
            values = values.fill_null(pa.scalar(float("nan"), type=values.type))
        else:  # nulls only under null rows (fixed-size lists): the data buffer is usable as is
            values = _strip_validity(values)
    flat = torch.from_dlpack(values)

    # 3. rows
    if valid is None:
        return Segment(start, start + n, flat.view(n, dim))
    null_pos = np.flatnonzero(~valid)
    valid_pos = np.flatnonzero(valid)
    null_lengths = np.full(len(null_pos), dim) if lengths is None else lengths[null_pos]
    if (null_lengths == dim).all():  # every row occupies dim slots: score all, NaN the nulls
        return Segment(start, start + n, flat.view(n, dim), null_rows=torch.from_numpy(null_pos))
    rows = torch.from_numpy(valid_pos)
    if (null_lengths == 0).all():  # null rows take no slots: the valid rows are contiguous
        return Segment(start, start + n, flat.view(len(valid_pos), dim), rows=rows)
    logger.debug("column %r: null rows with values behind them; gathering the valid rows", column)
    starts = torch.from_numpy(offsets[:-1][valid_pos] - base)
    gather = starts[:, None] + torch.arange(dim, dtype=starts.dtype)
    return Segment(start, start + n, flat[gather], rows=rows)


_BACKEND = PandasBackend()


@backend_dispatch.register(pd.DataFrame)
def _pandas_backend(df: pd.DataFrame) -> PandasBackend:
    return _BACKEND
