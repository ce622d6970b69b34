"""Exceptions raised by nsfw_dask.

Every exception derives from :class:`NsfwDaskError` and from the builtin a caller would
naturally catch (``ValueError`` for bad data, ``KeyError`` for a missing column, ``OSError``
for weights on disk or on the network), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class NsfwDaskError(Exception):
    """Base class of every error raised by nsfw_dask."""


class EmbeddingFormatError(NsfwDaskError, ValueError):
    """The embedding column holds something the head cannot score as it is.

    The message names the column, the first offending row (its index label) and the fix.
    """


class EmbeddingColumnError(NsfwDaskError, KeyError):
    """The embedding column is missing or cannot be chosen unambiguously."""

    def __str__(self) -> str:  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class WeightsError(NsfwDaskError, OSError):
    """The model weights could not be found, downloaded or verified."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No verified weights file was found and none could be downloaded."""


class WeightsIntegrityError(WeightsError):
    """A weights file exists but is truncated, corrupted or not LAION's file."""


class ReducedPrecisionError(NsfwDaskError, RuntimeError):
    """torch is set to compute float32 matmuls in lower precision (TF32 on CUDA, bfloat16 on CPU).

    ``torch.set_float32_matmul_precision("high")``/``("medium")``, ``allow_tf32 = True`` or the
    ``fp32_precision`` settings change every float32 matmul of the process, the head's included:
    measured on the L/14 reference set, ``"medium"`` on an AMX CPU moves scores by up to 0.066.
    Scoring refuses rather than return such scores; the message names the setting and the fix.
    """


class JobError(NsfwDaskError):
    """The job cannot run as asked (paths, options, an existing OUTPUT); the message says the fix.

    ``code`` is the CLI exit status: 2 for a usage problem, 1 otherwise.
    (Raised by :func:`nsfw_dask.score_dataset`; also importable from :mod:`nsfw_dask.pipeline`.)
    """

    def __init__(self, msg: str, code: int = 1) -> None:
        super().__init__(msg)
        self.code = code

    def __reduce__(self) -> tuple[type, tuple[str, int]]:
        return (type(self), (str(self), self.code))


class EmbeddingNormError(JobError):
    """The job found embeddings that are clearly not L2-normalised (exit 1).

    The message names the file, the rows, the median norm seen and the two fixes
    (``--normalize`` / ``--no-norm-check``; ``normalize=True`` / ``norm_check=False`` from Python).
    """


class NotUnitNormWarning(UserWarning):
    """``score_nsfw``/``NSFWScorer`` were given embeddings that are clearly not L2-normalised.

    LAION's heads score such rows wrongly; pass ``normalize=True`` (L2-normalise before scoring)
    or ``norm_check=False`` (the embeddings are right as they are).
    """
