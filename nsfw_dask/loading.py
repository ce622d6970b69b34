"""The process-wide model cache: each head is loaded once per (worker) process.

Keyed by ``(model, weights checksum, device, dtype)`` and guarded by a lock, so the threads of a
Dask worker share one instance and load it once.  It works the same under the synchronous,
threaded and distributed schedulers (no ``get_worker()`` needed); :class:`~nsfw_dask.NSFWModelPlugin`
fills it eagerly on every worker, and ``client.run(nsfw_dask.model_cache_info)`` shows it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ._forward import HeadSet
from .exact import CategoricalEncoding, ExactNSFWModel, clear_vocabulary_cache, load_vocabulary
from .heads import HeadSpec, parse_heads
from .models import ModelSpec, NSFWModel, get_spec
from .weights import ENV_MODEL_DIR, WeightsInfo, cache_dir, read_state_dict, resolve_weights

__all__ = ["clear_model_cache", "load_heads", "load_model", "model_cache_info", "resolve_device"]

_lock = threading.RLock()
_resolved: dict[tuple[Any, ...], WeightsInfo] = {}
_models: dict[tuple[str, str, str, torch.dtype], Any] = {}
_loads: list[dict[str, Any]] = []


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Normalise ``device``: None -> cpu, ``"cuda"`` -> ``cuda:<current device>``."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():  # else torch's bare AssertionError
        why = (
            f"this torch ({torch.__version__}) was built without CUDA"
            if not torch.backends.cuda.is_built()
            else "no CUDA device is visible (torch.cuda.is_available() is False)"
        )
        raise RuntimeError(f"device={str(device)!r}: {why}; pass device='cpu', or run where torch sees a GPU.")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _abs(p: str | os.PathLike[str] | None) -> str | None:
    return None if not p else str(Path(p).expanduser().resolve())


def _resolve_cached(spec: ModelSpec, model_dir: str | os.PathLike[str] | None) -> WeightsInfo:
    # absolute paths: a relative model_dir means another folder after a chdir
    key = (spec.name, _abs(model_dir), _abs(os.environ.get(ENV_MODEL_DIR)), _abs(cache_dir()))
    info = _resolved.get(key)
    if info is None:
        info = resolve_weights(spec, model_dir)
        _resolved[key] = info
    return info


def load_model(
    model: str | ModelSpec = "vit-l-14",
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    model_dir: str | os.PathLike[str] | None = None,
    exact: bool = False,
) -> Any:
    """Return the cached, eval-mode head for ``model`` on ``device``, loading it on first use.

    Parameters
    ----------
    model : {"vit-l-14", "vit-b-32"} or a head's weights name
        The NSFW head of that CLIP model, or another head's weights
        (:data:`nsfw_dask._specs.HEAD_WEIGHT_SPECS`, e.g. ``"aesthetic-vit-l-14"``;
        :func:`load_heads` picks them by head name).
    device : str or torch.device, optional
        Defaults to the CPU.
    dtype : torch.dtype
        Parameter dtype (float32 unless you ask otherwise).
    model_dir : path, optional
        Searched first for the weights (see :func:`nsfw_dask.resolve_weights`).
    exact : bool, default False
        Return LAION's original model (:class:`~nsfw_dask.exact.ExactNSFWModel`: the
        categorical lookup, then the same head), whose vocabularies come from the original
        SavedModel zip (see :func:`nsfw_dask.exact.load_vocabulary`).

    Returns
    -------
    NSFWModel, ExactNSFWModel, AestheticMLP or AestheticLinear
        Shared by every caller in this process: do not modify it.
    """
    spec = get_spec(model)
    dev = resolve_device(device)
    if exact:
        return _load_exact(spec, dev, dtype, model_dir)
    with _lock:
        info = _resolve_cached(spec, model_dir)
        key = (spec.name, info.checksum, str(dev), dtype)
        m = _models.get(key)
        if m is None:
            t0 = time.perf_counter()
            m = _build(spec)
            m.load_state_dict(read_state_dict(info), strict=True)
            m = m.to(device=dev, dtype=dtype).eval().requires_grad_(False)
            m.__dict__["weights_info"] = info  # a plain attribute (nn.Module types setattr for tensors/modules)
            _models[key] = m
            _loads.append(
                {
                    "model": spec.name,
                    "checksum": info.checksum,
                    "device": str(dev),
                    "dtype": str(dtype).replace("torch.", ""),
                    "path": str(info.path),
                    "pid": os.getpid(),
                    "thread": threading.current_thread().name,
                    "seconds": round(time.perf_counter() - t0, 4),
                }
            )
        return m


def _build(spec: ModelSpec) -> torch.nn.Module:
    """The torch module that reads ``spec``'s weights (``ModelSpec.module``)."""
    if spec.module == "nsfw":
        return NSFWModel(spec)
    from .heads.aesthetic import AestheticLinear, AestheticMLP

    if spec.module == "mlp":
        return AestheticMLP(spec)
    if spec.module == "linear":
        return AestheticLinear(spec)
    raise ValueError(f"internal error: no module reads {spec.name!r} ({spec.module!r})")


_head_sets: dict[tuple[Any, ...], HeadSet] = {}


def load_heads(
    heads: str | Iterable[str | HeadSpec] = ("nsfw",),
    model: str = "vit-l-14",
    *,
    device: str | torch.device | None = None,
    model_dir: str | os.PathLike[str] | None = None,
    exact: bool = False,
) -> HeadSet:
    """The cached, eval-mode heads ``heads`` for CLIP ``model`` on ``device``, scored together.

    Each head's weights are resolved, verified and cached as :func:`load_model` does (once per
    process); the returned :class:`~nsfw_dask._forward.HeadSet` is the same object for the same
    arguments, so the per-thread forward runners are shared too.  ``exact`` applies to the NSFW
    head (LAION's original model).
    """
    specs = parse_heads(heads)
    dev = resolve_device(device)
    with _lock:
        models = [
            load_model(h.spec_for(model), device=dev, model_dir=model_dir, exact=exact and h.name == "nsfw")
            for h in specs
        ]
        key = (tuple(id(m) for m in models), str(dev))
        hs = _head_sets.get(key)
        if hs is None or any(a is not b for a, b in zip(hs.models, models)):
            hs = _head_sets[key] = HeadSet(models, [h.name for h in specs])
        return hs


def _load_exact(
    spec: ModelSpec, dev: torch.device, dtype: torch.dtype, model_dir: str | os.PathLike[str] | None
) -> ExactNSFWModel:
    with _lock:
        head = load_model(spec, device=dev, dtype=dtype, model_dir=model_dir)
        assert isinstance(head, NSFWModel)  # exact=False: the head itself
        assert spec.keras is not None
        key = (spec.name, f"{head.weights_info.checksum}|exact:{spec.keras.vocab_digest}", str(dev), dtype)
        m = _models.get(key)
        if m is None:
            t0 = time.perf_counter()
            vocab = load_vocabulary(spec, model_dir)
            m = ExactNSFWModel(head, CategoricalEncoding(vocab, spec.dim).to(dev)).eval()
            m.weights_info = head.weights_info
            _models[key] = m
            _loads.append(
                {
                    "model": spec.name,
                    "checksum": key[1],
                    "device": str(dev),
                    "dtype": str(dtype).replace("torch.", ""),
                    "path": str(head.weights_info.path),
                    "pid": os.getpid(),
                    "thread": threading.current_thread().name,
                    "seconds": round(time.perf_counter() - t0, 4),
                    "exact": True,
                }
            )
        return m


def model_cache_info() -> dict[str, Any]:
    """What this process has loaded: ``{"pid", "loads", "models": [...]}``.

    ``loads`` counts every load since the process started (or :func:`clear_model_cache`), so
    ``client.run(model_cache_info)`` shows one load per worker after any number of partitions.
    """
    with _lock:
        return {"pid": os.getpid(), "loads": len(_loads), "models": [dict(d) for d in _loads]}


def clear_model_cache() -> None:
    """Forget every loaded model and resolved weights path in this process, and free the scoring
    work buffers (CPU and GPU) of every thread; call it while nothing scores in the process."""
    from ._forward import release_buffers

    with _lock:
        _models.clear()
        _head_sets.clear()
        _resolved.clear()
        _loads.clear()
    clear_vocabulary_cache()
    release_buffers()
