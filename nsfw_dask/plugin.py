"""A ``distributed.WorkerPlugin`` that loads the head on every worker before any task runs."""

from __future__ import annotations

import os
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ._specs import get_spec

__all__ = ["NSFWModelPlugin"]


class NSFWModelPlugin(WorkerPlugin):
    """Preload LAION's NSFW head into each worker's process-wide model cache.

    ``score_nsfw`` reads the same cache, so tasks never load the model themselves; workers that
    join later (or replace a dead one) run ``setup`` too.  Without the plugin the first partition
    on each worker loads it instead: the plugin only moves that cost (and any weights error)
    to start-up.

    Parameters
    ----------
    model : {"vit-l-14", "vit-b-32"}
    device : str, optional
        Where to load it: match what your partitions use (cuDF -> ``"cuda"``, pandas ->
        ``"cpu"``).  Default: ``"cuda"`` if the worker sees a GPU, else ``"cpu"``.
    model_dir : path, optional
        As for ``score_nsfw``; resolved on each worker.
    exact : bool, default False
        Preload the exact-mode model (``score_nsfw(..., exact=True)``) as well.

    Examples
    --------
    >>> from distributed import Client, LocalCluster
    >>> from nsfw_dask import NSFWModelPlugin, model_cache_info
    >>> client = Client(LocalCluster(n_workers=2))  # doctest: +SKIP
    >>> client.register_plugin(NSFWModelPlugin(device="cpu"))  # doctest: +SKIP
    >>> client.run(model_cache_info)  # doctest: +SKIP
    """

    idempotent = True

    def __init__(
        self,
        model: str = "vit-l-14",
        *,
        device: str | None = None,
        model_dir: str | os.PathLike[str] | None = None,
        exact: bool = False,
    ) -> None:
        self.model = get_spec(model).name  # validated on the client
        self.device = device
        self.model_dir = None if model_dir is None else str(model_dir)
        self.exact = bool(exact)
        self.name = f"nsfw-dask-{self.model}-{device or 'auto'}{'-exact' if exact else ''}"

    def setup(self, worker: Any = None) -> None:
        import torch  # on the worker: the client that registers the plugin needs no torch

        from .loading import load_model

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        load_model(self.model, device=device, model_dir=self.model_dir, exact=self.exact)
