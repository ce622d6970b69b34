"""cuDF partitions: list leaves -> CuPy -> ``torch.from_dlpack`` on the device that holds them.

The only module that imports cudf or cupy.  It is imported by ``nsfw_dask.dispatch`` the first
time a cuDF DataFrame is scored (``Dispatch.register_lazy("cudf")``), never on a CPU-only path.

Zero-copy chain (cuDF >= 26.02; sources in docs/gpu.md): ``Series.list.leaves`` is a view of the list
child that respects the slice offset, its float32 ``.values`` is a CuPy array over the same
device memory (CUDA array interface), and ``torch.from_dlpack`` wraps it.  On cuDF <= 25.12 a
sliced column's leaves are a device copy made by cuDF.  Nulls inside a list are NaN-filled
(a copy); null rows contribute no leaves and get NaN scores.

Device: the partition is scored where its leaves are, the DLPack tensor's own device (not torch's
current device, which in a multi-GPU process may be another one: every batch would then cross
devices); ``default_device`` reports that device for the frame ``to_segments`` has just read.

Parquet float16: libcudf reads a Parquet FLOAT16 column as fixed-length strings and cuDF has no
float16 dtype, so a half-float embedding file arrives here as ``list<str>``; the error then says
to read such files with pyarrow (``nsfw_dask.io.read_parquet_embeddings`` does it) and score the
pandas partitions with ``device="cuda"``.

Streams: cuDF exports no stream and torch uses its current stream; both are the legacy default
stream unless ``CUDF_PER_THREAD_STREAM=1`` or a custom ``torch.cuda.Stream`` is used, in which
case the result is synchronised before it is handed back to cuDF.

NOT RUN ON A GPU by the authors (no GPU was available); the API calls are checked against the
installed release by ``tests/test_gpu_api.py`` and exercised by ``tests/test_gpu.py`` where a
CUDA device exists.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import Any

import cudf
import cupy as cp
import numpy as np
import torch

from ._common import choose_column, length_error, meta_inference_column
from .dispatch import Segment, backend_dispatch
from .exceptions import EmbeddingColumnError, EmbeddingFormatError
from .models import ModelSpec

logger = logging.getLogger(__name__)

_CAST_FIX = "Cast it, e.g. df[col] = df[col].astype(cudf.ListDtype('float32')), or pass column=."
_HALF_FIX = (
    "A list<str> column is what cuDF makes of a Parquet float16 (half-float) list column: cuDF has "
    "no float16. Read such files with pyarrow, e.g. nsfw_dask.io.read_parquet_embeddings(path, "
    "backend='cudf') (it does so by itself), and score those pandas partitions with device='cuda'."
)

# The device of the embeddings of the frame ``to_segments`` read last in this thread, for
# ``default_device`` (called right after it by ``score_nsfw``); weak, so no partition is kept.
_last = threading.local()


def _is_float_element(t: Any) -> bool:
    # list<str>, list<struct>, list<decimal>, list<list> elements are not numpy dtypes
    return isinstance(t, np.dtype) and t.kind == "f"


def _is_float_list_dtype(dtype: Any) -> bool:
    return isinstance(dtype, cudf.ListDtype) and _is_float_element(dtype.element_type)


def _is_string_list_dtype(dtype: Any) -> bool:
    """``list<str>``: what libcudf reads a Parquet FLOAT16 list column as."""
    return isinstance(dtype, cudf.ListDtype) and bool(cudf.api.types.is_string_dtype(dtype.element_type))


def describe_dtype(dtype: Any) -> str:
    """A dtype as :func:`nsfw_dask._common.meta_inference_column` reads it: ``"list<float32>"``,
    ``"list<int64>"``, ``"list<list<float32>>"``, ``"str"``, ``"int64"``."""
    if isinstance(dtype, cudf.ListDtype):
        return f"list<{describe_dtype(dtype.element_type)}>"
    if cudf.api.types.is_string_dtype(dtype):
        return "str"
    try:
        return np.dtype(dtype).name
    except TypeError:
        return str(dtype)


def _remember_device(df: Any, device: torch.device) -> None:
    try:
        _last.frame = weakref.ref(df)
    except TypeError:  # not weak-referenceable: default_device falls back to "cuda"
        _last.frame = None
    _last.device = device


class CudfBackend:
    name = "cudf"

    def default_device(self, df: cudf.DataFrame) -> str:
        """The device of ``df``'s embeddings if ``to_segments`` just read them, else ``"cuda"``."""
        ref = getattr(_last, "frame", None)
        if ref is not None and ref() is df:
            return str(_last.device)
        return "cuda"

    def resolve_column(self, df: cudf.DataFrame, column: Any, *, schema_only: bool) -> Any:
        dtypes = df.dtypes
        if schema_only and column is None:
            # dask_cudf's fake partition: a list column may hold integer leaves, or arrive as
            # strings (parquet under the cudf backend); the real partition decides
            return meta_inference_column((c, describe_dtype(d)) for c, d in dtypes.items())
        try:
            return choose_column(
                df,
                column,
                is_candidate=lambda c: _is_float_list_dtype(dtypes[c]),
                describe=((c, describe_dtype(d)) for c, d in dtypes.items()),
            )
        except EmbeddingColumnError as e:
            kinds = [d for _, d in dtypes.items()]
            if column is None and not any(map(_is_float_list_dtype, kinds)) and any(map(_is_string_list_dtype, kinds)):
                raise type(e)(f"{e} {_HALF_FIX}") from None
            raise

    def to_segments(self, df: cudf.DataFrame, column: Any, spec: ModelSpec) -> list[Segment]:
        s = df[column]
        d = s.dtype
        if not isinstance(d, cudf.ListDtype):
            raise EmbeddingFormatError(
                f"Column {column!r} has dtype {d}; expected a list<float32> column of CLIP embeddings."
            )
        if not _is_float_element(d.element_type):
            fix = _HALF_FIX if _is_string_list_dtype(d) else _CAST_FIX
            raise EmbeddingFormatError(  # not _common.element_type_error: cuDF has no float16
                f"Column {column!r} holds lists of {d.element_type}; expected lists of float32 or "
                f"float64 (CLIP embeddings). {fix}"
            )
        n, dim = len(s), spec.dim
        n_null = int(s.null_count)
        # 1. lengths, before anything is reshaped (null rows have <NA> length)
        lengths = s.list.len().fillna(dim)
        bad = lengths != dim
        if bool(bad.any()):
            bad_values = bad.values
            pos = int(cp.argmax(bad_values))
            raise length_error(column, s.index[pos], int(lengths.iloc[pos]), spec, int(bad_values.sum()))
        # 2. the leaves: a view of exactly these rows (null rows contribute none)
        n_valid = n - n_null
        leaves = s.list.leaves
        if len(leaves) != n_valid * dim:  # null rows with values behind them: gather the valid rows
            logger.debug("column %r: null rows hold values; gathering the valid rows (a copy)", column)
            leaves = s.dropna().list.leaves
        if leaves.null_count:
            logger.debug("column %r has null elements inside embeddings: NaN-filled copy", column)
            leaves = leaves.fillna(np.nan)
        if len(leaves) != n_valid * dim:  # never reshape what does not fit
            raise EmbeddingFormatError(
                f"Column {column!r}: {len(leaves)} leaf values for {n_valid} non-null rows of "
                f"{dim}. Rebuild the column, e.g. df[col] = df[col].dropna().reindex(df.index)."
            )
        arr = leaves.values  # CuPy array over the column's memory (CAI, no copy)
        emb = torch.from_dlpack(arr.reshape(n_valid, dim))  # on the device that holds the leaves
        _remember_device(df, emb.device)
        if n_null == 0:
            return [Segment(0, n, emb)]
        rows = torch.from_dlpack(cp.flatnonzero(s.notna().values))
        return [Segment(0, n, emb, rows=rows)]

    def attach(self, df: cudf.DataFrame, score_column: Any, scores: torch.Tensor | None) -> cudf.DataFrame:
        n = len(df)
        if scores is None:
            values = cp.full(n, np.nan, dtype=cp.float32)
        elif scores.is_cuda:
            torch.cuda.current_stream(scores.device).synchronize()
            with cp.cuda.Device(scores.device.index):  # the copy on the scores' own device
                values = cp.from_dlpack(scores).copy()  # RMM-owned; frees torch's buffer
        else:
            values = cp.asarray(scores.numpy())
        out = df.copy(deep=False)
        out[score_column] = cudf.Series(values, index=out.index, nan_as_null=False)
        return out


_BACKEND = CudfBackend()


@backend_dispatch.register(cudf.DataFrame)
def _cudf_backend(df: cudf.DataFrame) -> CudfBackend:
    return _BACKEND
