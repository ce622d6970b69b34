"""nsfw_dask: LAION's CLIP NSFW detector as a zero-copy Dask partition scorer.

>>> import dask.dataframe as dd
>>> from nsfw_dask import score_nsfw
>>> ddf = dd.read_parquet("embeddings/", dtype_backend="pyarrow")  # doctest: +SKIP
>>> scored = ddf.map_partitions(score_nsfw)  # doctest: +SKIP

The top level (``__all__``) is what a Dask user needs.  The rest lives in modules named for
their job: NeMo Curator's classes in :mod:`nsfw_dask.nemo`, weights in :mod:`nsfw_dask.weights`,
model specs in :mod:`nsfw_dask.models`, exact mode in :mod:`nsfw_dask.exact`.  Names that used
to be here keep working (see ``_COMPAT`` and ``_MOVED`` below).
"""

import importlib as _importlib
import importlib.util as _importlib_util
import warnings as _warnings
from typing import TYPE_CHECKING

from ._version import __version__
from .exceptions import (
    EmbeddingColumnError,
    EmbeddingFormatError,
    EmbeddingNormError,
    JobError,
    NotUnitNormWarning,
    NsfwDaskError,
    ReducedPrecisionError,
    WeightsError,
    WeightsIntegrityError,
    WeightsNotFoundError,
)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first use (_LAZY)
    from .io import read_embeddings
    from .loading import clear_model_cache, load_heads, load_model, model_cache_info
    from .pipeline import Summary, score_dataset
    from .plugin import NSFWModelPlugin
    from .scoring import nsfw_meta, score, score_aesthetic, score_heads, score_nsfw

#: The public names that need torch, pyarrow or dask, imported on first use: {name: module}.
#: ``import nsfw_dask`` (and so ``nsfw-dask --help``, and every ``dask ...`` command, which loads
#: the ``dask_cli`` entry points) imports neither torch nor dask.
_LAZY: dict[str, str] = {
    "read_embeddings": "io",
    "clear_model_cache": "loading",
    "load_heads": "loading",
    "load_model": "loading",
    "model_cache_info": "loading",
    "Summary": "pipeline",
    "score_dataset": "pipeline",
    "NSFWModelPlugin": "plugin",
    "nsfw_meta": "scoring",
    "score": "scoring",
    "score_aesthetic": "scoring",
    "score_heads": "scoring",
    "score_nsfw": "scoring",
}

__all__ = [
    "EmbeddingColumnError",
    "EmbeddingFormatError",
    "EmbeddingNormError",
    "JobError",
    "NSFWModelPlugin",
    "NotUnitNormWarning",
    "NsfwDaskError",
    "ReducedPrecisionError",
    "Summary",
    "WeightsError",
    "WeightsIntegrityError",
    "WeightsNotFoundError",
    "__version__",
    "clear_model_cache",
    "load_heads",
    "load_model",
    "model_cache_info",
    "nsfw_meta",
    "read_embeddings",
    "score",
    "score_aesthetic",
    "score_dataset",
    "score_heads",
    "score_nsfw",
]

#: Still importable from here, without a warning, but not in ``__all__``: {name: module}.
#: NeMo Curator's classes (``from nsfw_dask import NSFWScorer`` is how NeMo users import them),
#: and names the README, notebooks and tests use from here today.
_COMPAT: dict[str, str] = {
    "AestheticScorer": "nemo",
    "NSFWScorer": "nemo",
    "NSFWModel": "nemo",
    "Normalization": "nemo",
    "MODEL_SPECS": "models",
    "cache_dir": "weights",
    "fetch_weights": "weights",
    "resolve_weights": "weights",
}

#: Moved: still importable from here, with a DeprecationWarning naming the new place: {name: module}.
_MOVED: dict[str, str] = {
    "DEFAULT_BATCH_SIZE": "scoring",
    "ExactNSFWModel": "exact",
    "ModelSpec": "models",
    "load_vocabulary": "exact",
}


def __getattr__(name: str) -> object:
    if name in _LAZY or name in _COMPAT:
        module = _LAZY.get(name) or _COMPAT[name]
        value = getattr(_importlib.import_module(f"{__name__}.{module}"), name)
        globals()[name] = value  # resolved once
        return value
    if name in _MOVED:
        module = f"{__name__}.{_MOVED[name]}"
        _warnings.warn(
            f"nsfw_dask.{name} is deprecated at the top level; use `from {module} import {name}`.",
            DeprecationWarning,
            stacklevel=2,  # the importing line (warnings skips importlib's frames)
        )
        return getattr(_importlib.import_module(module), name)
    if not name.startswith("__") and _importlib_util.find_spec(f"{__name__}.{name}") is not None:
        return _importlib.import_module(f"{__name__}.{name}")  # a submodule: nsfw_dask.pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_COMPAT) | set(_MOVED))
