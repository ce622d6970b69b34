"""nsfw_dask: LAION's CLIP NSFW detector as a zero-copy Dask partition scorer.

>>> import dask.dataframe as dd
>>> from nsfw_dask import score_nsfw
>>> ddf = dd.read_parquet("embeddings/", dtype_backend="pyarrow")  # doctest: +SKIP
>>> scored = ddf.map_partitions(score_nsfw)  # doctest: +SKIP
"""

from ._version import __version__
from .exceptions import (
    EmbeddingColumnError,
    EmbeddingFormatError,
    NsfwDaskError,
    WeightsError,
    WeightsIntegrityError,
    WeightsNotFoundError,
)
from .exact import ExactNSFWModel, load_vocabulary
from .io import read_embeddings
from .loading import clear_model_cache, load_model, model_cache_info
from .models import MODEL_SPECS, ModelSpec, NSFWModel, Normalization
from .pipeline import JobError, Summary, score_dataset
from .plugin import NSFWModelPlugin
from .scorer import NSFWScorer
from .scoring import DEFAULT_BATCH_SIZE, nsfw_meta, score, score_nsfw
from .weights import cache_dir, fetch_weights, resolve_weights

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "MODEL_SPECS",
    "EmbeddingColumnError",
    "EmbeddingFormatError",
    "ExactNSFWModel",
    "JobError",
    "ModelSpec",
    "NSFWModel",
    "NSFWModelPlugin",
    "NSFWScorer",
    "Normalization",
    "Summary",
    "NsfwDaskError",
    "WeightsError",
    "WeightsIntegrityError",
    "WeightsNotFoundError",
    "__version__",
    "cache_dir",
    "clear_model_cache",
    "fetch_weights",
    "load_model",
    "load_vocabulary",
    "model_cache_info",
    "nsfw_meta",
    "read_embeddings",
    "resolve_weights",
    "score",
    "score_dataset",
    "score_nsfw",
]
