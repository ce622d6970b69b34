"""GPU set-up helpers: probing for a device, RMM shared with torch, a LocalCUDACluster recipe.

Nothing here imports a GPU library at module import time, and the option builders
(:func:`cuda_cluster_options`, :func:`check_cuda_workers`, :func:`cuda_worker_options`) are pure
functions that run on any machine.  NOT RUN ON A GPU by the authors: the RAPIDS calls are checked
against the installed release by ``tests/test_gpu_api.py``; see ``docs/gpu.md``.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "check_cuda_workers",
    "cuda_available",
    "cuda_cluster_options",
    "cuda_worker_options",
    "local_cuda_cluster",
    "release_gpu_buffers",
    "use_rmm_for_torch",
]

_GPU_EXTRA = "install the GPU extra: pip install 'nsfw-dask[gpu-cu12]' (or [gpu-cu13])"

#: The keywords that choose dask-cuda's RMM allocator (``dask_cuda.plugins.RMMSetup``): an
#: async pool (``rmm_async``), a classic pool (``rmm_pool_size``) or managed memory
#: (``rmm_managed_memory``).  If the caller names any of them, the recipe adds none.
_ALLOCATOR_KEYS = ("rmm_async", "rmm_pool_size", "rmm_managed_memory")


def cuda_available() -> bool:
    """True when torch sees a CUDA device (``import cudf`` alone succeeds without one)."""
    try:
        return bool(torch.cuda.is_available() and torch.cuda.device_count() > 0)
    except Exception:
        return False


def use_rmm_for_torch() -> bool:
    """Route torch's CUDA allocations through RMM in this process (before any CUDA tensor).

    Returns True if the allocator was switched, False if torch already uses a pluggable one.
    Under dask-cuda prefer ``LocalCUDACluster(rmm_allocator_external_lib_list=["torch"])``,
    which does this on every worker before any task runs.
    """
    try:
        from rmm.allocators.torch import rmm_torch_allocator
    except ImportError as e:
        raise ModuleNotFoundError(f"use_rmm_for_torch requires rmm; {_GPU_EXTRA}") from e
    if rmm_torch_allocator is None:
        raise RuntimeError("use_rmm_for_torch needs a CUDA device (torch.cuda.is_available() is False)")
    if torch.cuda.memory.get_allocator_backend() == "pluggable":
        return False
    torch.cuda.memory.change_current_allocator(rmm_torch_allocator)
    return True


def _given(opts: dict[str, Any], key: str) -> bool:
    """Whether ``key`` selects an allocator mode: a pool size that is not None, a True flag."""
    value = opts.get(key)
    if key == "rmm_pool_size":
        return value is not None
    return bool(value)


def cuda_cluster_options(**overrides: Any) -> dict[str, Any]:
    """The keyword arguments :func:`local_cuda_cluster` passes to ``dask_cuda.LocalCUDACluster``.

    Defaults, each overridable by keyword (the caller's keywords always win):

    * ``rmm_async=True``: RMM's CUDA async memory pool on every worker, unless the caller
      chooses an allocator mode themselves with ``rmm_async``, ``rmm_pool_size`` (a classic
      pool) or ``rmm_managed_memory`` (managed memory): only one mode is ever set, since
      dask-cuda refuses managed memory with async (``RMMSetup``: "``rmm_managed_memory`` is
      incompatible with the ``rmm_async``") and warns on a pool size with async.
    * ``rmm_allocator_external_lib_list=["torch", "cupy"]``: torch and CuPy allocate from the
      same RMM resource (switched by dask-cuda's ``RMMSetup`` on each worker before any task).
    * ``enable_cudf_spill=False``: dask-cuda's own device -> host spilling
      (``device_memory_limit``, default 80% of the GPU) handles persisted partitions.  With
      cuDF spilling on, dask-cuda stops spilling cuDF frames itself (``DeviceHostFile`` keeps
      them in ``others``) and cuDF cannot spill the embedding buffers either: exporting the
      list leaves to torch (``__cuda_array_interface__``) marks them exposed, "unspillable
      permanently".  See ``docs/gpu.md``.

    Raises ValueError (one line) for combinations dask-cuda would refuse when the workers
    start: managed memory together with async, and ``rmm_release_threshold`` without async.

    Examples
    --------
    >>> cuda_cluster_options()["rmm_async"]
    True
    >>> "rmm_async" in cuda_cluster_options(rmm_pool_size="30GB")
    False
    """
    opts: dict[str, Any] = {
        "rmm_allocator_external_lib_list": ["torch", "cupy"],
        "enable_cudf_spill": False,
    }
    chosen = "rmm_async" in overrides or any(_given(overrides, k) for k in _ALLOCATOR_KEYS)
    if not chosen:
        opts["rmm_async"] = True
    opts.update(overrides)
    if _given(opts, "rmm_async") and _given(opts, "rmm_managed_memory"):
        raise ValueError(
            "rmm_managed_memory=True cannot be combined with rmm_async=True (dask-cuda refuses "
            "it); pass one allocator mode: rmm_async, rmm_pool_size or rmm_managed_memory."
        )
    if opts.get("rmm_release_threshold") is not None and not _given(opts, "rmm_async"):
        raise ValueError(
            "rmm_release_threshold needs the async allocator (dask-cuda refuses it otherwise); "
            "drop it or pass rmm_async=True instead of rmm_pool_size/rmm_managed_memory."
        )
    return opts


def _visible_gpus() -> int:
    try:
        return int(torch.cuda.device_count()) if torch.cuda.is_available() else 0
    except Exception:
        return 0


def check_cuda_workers(
    n_workers: int | None, threads_per_worker: int | None = None, *, n_gpus: int | None = None
) -> None:
    """Raise ValueError (one line) if a ``LocalCUDACluster`` cannot have these workers.

    ``LocalCUDACluster`` runs one worker per visible GPU (``CUDA_VISIBLE_DEVICES``); more
    workers than GPUs fail deep inside dask-cuda ("Can not scale beyond visible devices").
    ``threads_per_worker`` (None: dask-cuda's default, 1) must be a positive integer: it is
    passed on, several threads then share their worker's GPU.  ``n_gpus`` defaults to the
    devices torch sees, which honours ``CUDA_VISIBLE_DEVICES`` as dask-cuda does.
    """
    if threads_per_worker is not None and (
        isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int) or threads_per_worker < 1
    ):
        raise ValueError(f"threads per worker must be a positive integer, not {threads_per_worker!r}.")
    if n_workers is not None and (isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1):
        raise ValueError(f"the number of GPU workers must be a positive integer, not {n_workers!r}.")
    gpus = _visible_gpus() if n_gpus is None else int(n_gpus)
    if gpus < 1:
        raise ValueError(
            "--gpu needs a CUDA device, and torch sees none here (check the driver, "
            "CUDA_VISIBLE_DEVICES and that torch is a CUDA build)."
        )
    if n_workers is not None and n_workers > gpus:
        raise ValueError(
            f"{n_workers} GPU workers asked for but {gpus} GPU(s) are visible; a LocalCUDACluster "
            f"runs one worker per GPU: use --workers {gpus} or fewer (or leave it out), and "
            "--threads-per-worker for more threads per GPU."
        )


def cuda_worker_options(
    n_workers: int | None, threads_per_worker: int | None = None, *, n_gpus: int | None = None
) -> dict[str, Any]:
    """:func:`check_cuda_workers`, then the keywords for :func:`local_cuda_cluster`.

    Only what was given is returned (``{"n_workers": 2, "threads_per_worker": 4}``): left out,
    dask-cuda starts one worker per visible GPU with one thread each.

    Examples
    --------
    >>> cuda_worker_options(None, 4, n_gpus=2)
    {'threads_per_worker': 4}
    """
    check_cuda_workers(n_workers, threads_per_worker, n_gpus=n_gpus)
    out: dict[str, Any] = {}
    if n_workers is not None:
        out["n_workers"] = n_workers
    if threads_per_worker is not None:
        out["threads_per_worker"] = threads_per_worker
    return out


def local_cuda_cluster(**kwargs: Any) -> Any:
    """A ``dask_cuda.LocalCUDACluster`` with RMM shared by cuDF, CuPy and torch.

    The keywords are :func:`cuda_cluster_options`'s (``rmm_async=True``,
    ``rmm_allocator_external_lib_list=["torch", "cupy"]``, ``enable_cudf_spill=False``) with
    ``kwargs`` on top; anything else (``n_workers``, ``device_memory_limit``, ...) goes to
    ``LocalCUDACluster`` unchanged.  ``enable_cudf_spill=True`` also switches cuDF spilling on
    in *this* (client) process: dask-cuda does that in ``LocalCUDACluster.__init__``.

    Examples
    --------
    >>> from distributed import Client
    >>> from nsfw_dask import NSFWModelPlugin
    >>> from nsfw_dask.gpu import local_cuda_cluster
    >>> cluster = local_cuda_cluster()  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    >>> client.register_plugin(NSFWModelPlugin(device="cuda"))  # doctest: +SKIP
    """
    opts = cuda_cluster_options(**kwargs)
    if not cuda_available():
        raise RuntimeError("local_cuda_cluster needs a CUDA device; none is visible to torch.")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise ModuleNotFoundError(f"local_cuda_cluster requires dask-cuda; {_GPU_EXTRA}") from e
    return LocalCUDACluster(**opts)


def release_gpu_buffers() -> int:
    """Free the scoring buffers this process keeps on CUDA devices; returns how many runners held some.

    Scoring keeps per-thread work buffers sized to the largest batch seen (a batch-size sweep to
    262,144 rows leaves about 2.5 GB on the GPU).  Call this when no scoring runs in the
    process, e.g. after a sweep in a notebook, or on every worker with
    ``client.run(nsfw_dask.gpu.release_gpu_buffers)``; later scoring allocates them again.
    With torch's own caching allocator the freed blocks are also returned to the driver
    (``torch.cuda.empty_cache()``); under RMM they go back to the RMM pool.
    """
    from ._forward import release_buffers

    n = release_buffers(device_type="cuda")
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()  # a no-op for a pluggable (RMM) allocator without a reset hook
    return n
