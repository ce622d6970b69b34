"""Partition-type dispatch: pandas eagerly, cuDF lazily (never imported on a CPU-only path).

Follows dask's own ``Dispatch.register_lazy("cudf")`` pattern: the cuDF backend module
(``nsfw_dask._cudf``) is imported the first time a cuDF object is seen, and only then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from dask.utils import Dispatch

if TYPE_CHECKING:
    import torch

    from .models import ModelSpec

__all__ = ["Backend", "Segment", "get_backend"]


@dataclass
class Segment:
    """A run of partition rows and the embedding rows that score them.

    ``emb`` is ``(k, dim)`` in the column's own float dtype and on its own device (a view of the
    column's memory wherever possible).  ``rows`` maps emb row i to partition row
    ``start + rows[i]`` (None: row ``start + i``); rows of ``[start, stop)`` that no emb row
    scores, and the rows in ``null_rows``, get NaN.
    """

    start: int
    stop: int
    emb: torch.Tensor
    rows: torch.Tensor | None = None
    null_rows: torch.Tensor | None = None


class Backend(Protocol):
    """What a partition type must provide to be scored."""

    name: str

    def default_device(self, df: Any) -> str: ...

    def resolve_column(self, df: Any, column: Any, *, schema_only: bool) -> Any: ...

    def to_segments(self, df: Any, column: Any, spec: ModelSpec) -> list[Segment]: ...

    def attach(self, df: Any, score_column: Any, scores: torch.Tensor | None) -> Any: ...


backend_dispatch = Dispatch("nsfw_dask_backend")


@backend_dispatch.register(object)
def _unsupported(df: Any) -> Backend:
    raise TypeError(
        f"score_nsfw expects a pandas or cuDF DataFrame partition, got {type(df).__module__}."
        f"{type(df).__name__}; call it through ddf.map_partitions(score_nsfw) or on one partition."
    )


@backend_dispatch.register_lazy("pandas")
def _register_pandas() -> None:
    from . import _arrow  # noqa: F401  (registers pandas.DataFrame)


@backend_dispatch.register_lazy("cudf")
def _register_cudf() -> None:
    from . import _cudf  # noqa: F401  (registers cudf.DataFrame)


def get_backend(df: Any) -> Backend:
    """The :class:`Backend` for ``df``'s type; TypeError for unsupported types."""
    return backend_dispatch(df)
