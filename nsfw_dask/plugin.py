"""A ``distributed.WorkerPlugin`` that loads the head on every worker before any task runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from ._specs import get_spec
from .heads import parse_heads

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
    heads : str or sequence of str, default ("nsfw",)
        The heads the tasks score together (``score_heads(..., heads=...)``, ``--heads``): each
        one's weights are loaded, and the set they are scored with.

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
        heads: str | Sequence[str] = ("nsfw",),
    ) -> None:
        self.model = get_spec(model).name  # validated on the client
        self.heads = tuple(h.name for h in parse_heads(heads))
        for h in parse_heads(heads):
            h.spec_for(self.model)
        self.device = device
        self.model_dir = None if model_dir is None else str(model_dir)
        self.exact = bool(exact)
        extra = "" if self.heads == ("nsfw",) else "-" + "+".join(self.heads)
        self.name = f"nsfw-dask-{self.model}-{device or 'auto'}{'-exact' if exact else ''}{extra}"

    def setup(self, worker: Any = None) -> None:
        import torch  # on the worker: the client that registers the plugin needs no torch

        from .loading import load_heads, load_model

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if self.heads == ("nsfw",):
            load_model(self.model, device=device, model_dir=self.model_dir, exact=self.exact)
        else:  # every head's weights, and the head set the tasks score with
            load_heads(self.heads, self.model, device=device, model_dir=self.model_dir, exact=self.exact)
