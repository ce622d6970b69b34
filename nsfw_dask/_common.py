"""Backend-independent pieces: error messages and column choice shared by pandas and cuDF."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Any

from ._specs import MODEL_SPECS, ModelSpec
from .exceptions import EmbeddingColumnError, EmbeddingFormatError


def dim_hint(got: int, spec: ModelSpec) -> str:
    for other in MODEL_SPECS.values():
        if other.dim == got and other.name != spec.name:
            return f" {got}-d vectors look like {other.clip_model} embeddings: pass model={other.name!r}."
    return (
        f" The {spec.name} head scores {spec.dim}-d {spec.clip_model} image embeddings; check that "
        "this column holds them, unpadded and untruncated."
    )


def label_repr(label: Any) -> str:
    """A row label as the user wrote it: ``5``, not ``np.int64(5)``."""
    item = getattr(label, "item", None)
    if item is not None and type(label).__module__ == "numpy":
        label = item()
    return repr(label)


def length_error(column: Any, label: Any, got: int, spec: ModelSpec, n_bad: int) -> EmbeddingFormatError:
    more = f" ({n_bad} rows have a wrong length)" if n_bad > 1 else ""
    return EmbeddingFormatError(
        f"Column {column!r}: row {label_repr(label)} has {got} values, expected {spec.dim} for model "
        f"{spec.name!r}{more}.{dim_hint(got, spec)}"
    )


def element_type_error(column: Any, got: Any, fix: str) -> EmbeddingFormatError:
    return EmbeddingFormatError(
        f"Column {column!r} holds lists of {got}; expected lists of float16, float32 or float64 "
        f"(CLIP embeddings). {fix}"
    )


def several_columns_error(names: list[Any]) -> EmbeddingColumnError:
    return EmbeddingColumnError(
        f"Several columns hold lists of floats: {names}; pass column= to choose the CLIP "
        "embedding column, e.g. score_nsfw(df, column=" + repr(names[0]) + ")."
    )


def choose_column(
    df: Any,
    column: Any,
    *,
    is_candidate: Callable[[Any], bool | None],
    describe: Iterable[tuple[Any, Any]],
) -> Any:
    """Pick the embedding column.

    ``is_candidate(name)`` says True (a list-of-float column), False, or None (cannot tell from
    the schema alone, as for an object column during dask's meta inference).
    """
    columns = list(df.columns)
    if column is not None:
        if column not in columns:
            raise EmbeddingColumnError(
                f"Column {column!r} not found; the partition has columns {columns}. "
                "Pass column= naming the column of CLIP embeddings."
            )
        return column
    verdicts = {c: is_candidate(c) for c in columns}
    sure = [c for c, v in verdicts.items() if v]
    maybe = [c for c, v in verdicts.items() if v is None]
    if len(sure) == 1:
        return sure[0]
    if len(sure) > 1:
        raise several_columns_error(sure)
    if maybe:
        return maybe[0]  # undecidable from the schema; the scored partition decides
    dtypes = ", ".join(f"{c!r}: {d}" for c, d in describe)
    raise EmbeddingColumnError(
        f"No column of float lists (CLIP embeddings) found; columns are {{{dtypes}}}. Pass column=, "
        "and read parquet with dtype_backend='pyarrow' so list columns arrive as Arrow lists."
    )


#: A dtype description (see :func:`meta_inference_column`) that names a list of floats.
_FLOAT_LIST = re.compile(r"(large_|fixed_size_)?list<float(16|32|64)>(\[\d+\])?")


def is_float_list_description(description: str) -> bool:
    """``"list<float32>"``, ``"large_list<float16>"``, ``"fixed_size_list<float64>[768]"``: True."""
    return _FLOAT_LIST.fullmatch(description) is not None


def meta_inference_column(columns: Iterable[tuple[Any, str]]) -> Any:
    """The embedding column during dask's meta inference, from column names and dtype descriptions.

    dask calls ``score_nsfw`` on a fake partition to infer ``meta``, and what that partition holds
    in place of the embeddings depends on the collection, not on the data: dask_cudf fakes a list
    column from its dtype (``[[0, 1], [0, 1]]``, seen with integer leaves on cuDF 26.10, frames
    from ``dask_cudf.from_cudf``) and a parquet read under the cudf backend may describe the list
    column as a string column (``'cat'``, ``'dog'``).  The output schema does not depend on the
    column (the input's columns plus the score column), so the choice here only decides whether to
    fail early: the only float-list column is chosen; several are refused (as on a real partition);
    otherwise ``None``: the partition decides when it is scored, and a partition without an
    embedding column gets its one-line :class:`EmbeddingColumnError` then.

    Parameters
    ----------
    columns : iterable of (name, description)
        ``description`` is the backend's text for the dtype: ``"list<float32>"`` (also
        ``large_list<...>``, ``fixed_size_list<...>[n]``) for lists, ``"list<int64>"``,
        ``"list<str>"``, ``"list<list<float32>>"`` for other lists, ``"str"`` for strings, else the
        dtype's own name (``"int64"``, ``"object"``).

    Returns
    -------
    The chosen column name, or ``None`` (undecided).
    """
    sure = [name for name, description in columns if is_float_list_description(description)]
    if len(sure) > 1:
        raise several_columns_error(sure)
    return sure[0] if sure else None
