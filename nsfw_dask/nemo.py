"""NeMo Curator's classes: ``NSFWScorer`` (its model interface, on nsfw_dask's verified weights
and cache), and the torch head ``NSFWModel`` with its ``Normalization`` layer.

Drop-in replacements for ``nemo_curator.models.nsfw``'s classes of the same names (the same
weights and state-dict keys).  ``NSFWModel`` and ``Normalization`` are defined in
:mod:`nsfw_dask.models` (they also serve ``score_nsfw``) and re-exported here.  All three stay
importable from ``nsfw_dask`` (and ``NSFWScorer`` from ``nsfw_dask.scorer``) as before.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

from .exact import ExactNSFWModel
from .exceptions import (
    EmbeddingFormatError,
    WeightsIntegrityError,
    WeightsNotFoundError,
)
from .loading import load_model, resolve_device
from .models import Normalization, NSFWModel, get_spec
from .scoring import _default_batch_size, score_tensor, warn_if_not_unit
from .weights import fetch_file, fetch_weights, find_weights_in

__all__ = ["AestheticScorer", "NSFWModel", "NSFWScorer", "Normalization"]

logger = logging.getLogger(__name__)


def _as_tensor(embeddings: torch.Tensor | npt.NDArray[np.floating], dim: int, model: str) -> torch.Tensor:
    """A ``(batch, dim)`` float tensor over ``embeddings`` (a writeable NumPy array without a copy;
    NeMo Curator copies it), or a one-line error naming the shape or the cast."""
    if isinstance(embeddings, np.ndarray):
        arr = embeddings if embeddings.flags.writeable else embeddings.copy()
        embeddings = torch.from_numpy(arr)
    if not isinstance(embeddings, torch.Tensor):
        raise TypeError(f"Expected a torch.Tensor or numpy.ndarray but got {type(embeddings).__name__}")
    if embeddings.ndim == 1:
        embeddings = embeddings.unsqueeze(0)
    if embeddings.ndim != 2 or embeddings.shape[1] != dim:
        raise EmbeddingFormatError(
            f"Expected embeddings of shape (batch, {dim}) for model {model!r} but got {tuple(embeddings.shape)}."
        )
    if not embeddings.is_floating_point():  # as score_nsfw: an integer vector is no CLIP embedding
        got = str(embeddings.dtype).replace("torch.", "")
        raise EmbeddingFormatError(
            f"Expected float embeddings (CLIP's float16/float32) but got {got}; "
            "cast them (embeddings.astype(np.float32), or .float() for a tensor), after dequantizing "
            "quantized ones."
        )
    return embeddings


class NSFWScorer:
    """Score CLIP embeddings with LAION's NSFW head; a drop-in for NeMo Curator's ``NSFWScorer``.

    Parameters
    ----------
    model_dir : path, optional
        Folder holding the weights: LAION's file name or NeMo Curator's layout
        (``laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth``).  When it has none,
        ``$NSFW_DASK_MODEL_DIR``, the user cache and a download are tried, in that order.
    model : {"vit-l-14", "vit-b-32"}
    device : str, optional
        Default ``"cuda"`` when available, else ``"cpu"`` (as NeMo Curator).
    batch_size : int, optional
        Rows per forward pass inside one call (default: the best measured for the device, CPU and
        thread count; see :func:`nsfw_dask.score_nsfw`).
    exact : bool, default False
        ``True`` reproduces LAION's original AutoKeras model (LAION-5B's ``punsafe``) instead of
        NeMo Curator's port; see :func:`nsfw_dask.score_nsfw` and README, "Exact mode".
    normalize : bool, default False
        L2-normalise each embedding before scoring (a zero vector gets NaN); NeMo Curator's
        embedders normalise before this scorer, raw ``encode_image`` outputs are not.
    norm_check : bool, default True
        Warn (:class:`~nsfw_dask.NotUnitNormWarning`) when a sample of a call's rows is clearly not
        unit length (median norm outside [0.5, 2]); see :func:`nsfw_dask.score_nsfw`.

    Examples
    --------
    >>> import numpy as np
    >>> from nsfw_dask.nemo import NSFWScorer
    >>> scorer = NSFWScorer("/models")  # doctest: +SKIP
    >>> scorer.setup()  # doctest: +SKIP
    >>> scorer(np.zeros((4, 768), dtype=np.float32)).shape  # doctest: +SKIP
    torch.Size([4])
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        model: str = "vit-l-14",
        device: str | torch.device | None = None,
        batch_size: int | None = None,
        exact: bool = False,
        normalize: bool = False,
        norm_check: bool = True,
    ) -> None:
        self.spec = get_spec(model)
        if self.spec.head != "nsfw":
            raise ValueError(f"NSFWScorer scores the NSFW head; {model!r} is the {self.spec.head!r} head's weights.")
        self.exact = bool(exact)
        self.normalize = bool(normalize)
        self.norm_check = bool(norm_check)
        self.model_dir = model_dir
        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float32
        self.batch_size = batch_size
        self.nsfw_model: NSFWModel | ExactNSFWModel | None = None
        self.weights_path: str | None = None

    @property
    def conda_env_name(self) -> str:
        """The conda environment NeMo Curator runs this model in: ``"video_splitting"``.

        NeMo Curator's ``ModelInterface`` models name one; its own ``NSFWScorer`` returns
        ``"video_splitting"`` (``nemo_curator/models/nsfw.py``), so a pipeline that asks gets the
        same answer.  nsfw_dask itself needs no particular environment.
        """
        return "video_splitting"

    @property
    def model_id_names(self) -> list[str]:
        """Model ids, as NeMo Curator names them (``["laion/clip-autokeras-binary-nsfw"]``)."""
        return [self.spec.model_id]

    @classmethod
    def download_weights_on_node(
        cls, model_dir: str | os.PathLike[str], model: str = "vit-l-14", exact: bool = False
    ) -> Path:
        """Make sure ``model_dir`` holds verified weights, downloading LAION's file if needed.

        A verified copy already on this machine (``$NSFW_DASK_MODEL_DIR``, the user cache) is
        copied into ``model_dir`` instead of downloaded, so this works offline where ``score``
        would find the weights.  Safe to call from every process of a node at once (one
        download, atomic rename).  Returns the path of the verified ``.pth``.  ``exact=True`` also
        fetches LAION's original SavedModel zip (for the vocabularies of ``exact=True``) into
        ``model_dir``.  Without a copy and without a network: ``WeightsNotFoundError``, one line
        with the fix, and ``model_dir`` left as it was.
        """
        spec = get_spec(model)
        folder = Path(model_dir).expanduser()
        if exact and spec.keras is not None:
            fetch_file(spec.keras.filename, spec.keras.url, spec.keras.sha256, folder)
        try:
            found = find_weights_in(spec, folder)
        except WeightsIntegrityError as e:  # truncated/tampered: download it again
            logger.warning("%s; downloading it again", e)
            try:
                return fetch_weights(spec, folder, force=True)
            except WeightsNotFoundError as unreachable:  # no network: a verified local copy will do
                try:
                    return fetch_weights(spec, folder)
                except WeightsNotFoundError:
                    raise unreachable from None
        return found.path if found is not None else fetch_weights(spec, folder)

    def setup(self) -> None:
        """Load the head (once per process; later scorers with the same weights share it)."""
        self.nsfw_model = load_model(
            self.spec, device=self.device, dtype=self.dtype, model_dir=self.model_dir, exact=self.exact
        )
        self.weights_path = str(self.nsfw_model.weights_info.path)

    def __call__(self, embeddings: torch.Tensor | npt.NDArray[np.floating]) -> torch.Tensor:
        """Score ``(batch, dim)`` embeddings; returns float32 scores of shape ``(batch,)``.

        A NumPy input is wrapped without a copy when it is writeable (NeMo Curator copies it);
        the result is on ``self.device``.
        """
        if self.nsfw_model is None:
            self.setup()
        assert self.nsfw_model is not None  # set by setup()
        embeddings = _as_tensor(embeddings, self.spec.dim, self.spec.name)
        if self.norm_check and not self.normalize:
            warn_if_not_unit([embeddings], "NSFWScorer input")
        dev = resolve_device(self.device)
        bs = self.batch_size or _default_batch_size(dev)
        return score_tensor(self.nsfw_model, embeddings, batch_size=bs, device=dev, normalize=self.normalize)


class AestheticScorer:
    """LAION's improved aesthetic predictor; a drop-in for NeMo Curator's ``AestheticScorer``.

    The same network as NeMo Curator's (``nemo_curator/models/aesthetics.py``: its ``MLP`` on the
    weights of ``sac+logos+ava1-l14-linearMSE.pth``), on nsfw_dask's verified weights and cache.
    One difference: NeMo Curator's scorer relies on its embedder having L2-normalised the
    embeddings; this one normalises them itself, as the upstream inference code does
    (``embeddings / ||embeddings||``; a zero vector scores the network's value at 0), so raw
    ``encode_image`` outputs score right too.  On unit-length input both agree within float32
    rounding (``tests/test_heads.py``).

    Parameters
    ----------
    model_dir : path, optional
        Folder searched first for ``sac+logos+ava1-l14-linearMSE.pth`` (then
        ``$NSFW_DASK_MODEL_DIR``, the user cache, a download).
    device : str, optional
        Default ``"cuda"`` when available, else ``"cpu"`` (as NeMo Curator).
    batch_size : int, optional
        Rows per forward pass inside one call.

    Examples
    --------
    >>> from nsfw_dask.nemo import AestheticScorer
    >>> scorer = AestheticScorer("/models")  # doctest: +SKIP
    >>> scorer.setup()  # doctest: +SKIP
    >>> scorer(embeddings)  # (batch, 768) -> (batch,) float32, ~1..10  # doctest: +SKIP
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        device: str | torch.device | None = None,
        batch_size: int | None = None,
    ) -> None:
        from .heads import HEADS

        self.spec = HEADS["aesthetic"].spec_for("vit-l-14")
        self.model_dir = model_dir
        self.device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = torch.float32
        self.batch_size = batch_size
        self.mlp: torch.nn.Module | None = None
        self.weights_path: str | None = None

    @property
    def conda_env_name(self) -> str:
        """``"default"``, as NeMo Curator's ``AestheticScorer``."""
        return "default"

    @property
    def model_id_names(self) -> list[str]:
        """NeMo Curator's model id for these weights: ``["ttj/sac-logos-ava1-l14-linearMSE"]``."""
        return [self.spec.model_id]

    def setup(self) -> None:
        """Load the network (once per process; shared with ``score_aesthetic`` and the job)."""
        mlp = load_model(self.spec, device=self.device, dtype=self.dtype, model_dir=self.model_dir)
        self.mlp = mlp
        self.weights_path = str(mlp.weights_info.path)

    def __call__(self, embeddings: torch.Tensor | npt.NDArray[np.floating]) -> torch.Tensor:
        """Score ``(batch, 768)`` embeddings; float32 scores of shape ``(batch,)`` on ``self.device``."""
        if self.mlp is None:
            self.setup()
        assert self.mlp is not None
        emb = _as_tensor(embeddings, self.spec.dim, self.spec.name)
        dev = resolve_device(self.device)
        bs = self.batch_size or _default_batch_size(dev)
        return score_tensor(self.mlp, emb, batch_size=bs, device=dev)
