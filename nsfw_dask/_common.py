"""Backend-independent pieces: error messages and column choice shared by pandas and cuDF."""

from __future__ import annotations

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
        raise EmbeddingColumnError(
            f"Several columns hold lists of floats: {sure}; pass column= to choose the CLIP "
            "embedding column, e.g. score_nsfw(df, column=" + repr(sure[0]) + ")."
        )
    if maybe:
        return maybe[0]  # undecidable from the schema; the scored partition decides
    dtypes = ", ".join(f"{c!r}: {d}" for c, d in describe)
    raise EmbeddingColumnError(
        f"No column of float lists (CLIP embeddings) found; columns are {{{dtypes}}}. Pass column=, "
        "and read parquet with dtype_backend='pyarrow' so list columns arrive as Arrow lists."
    )
