"""GPU set-up helpers: probing for a device, RMM shared with torch, a LocalCUDACluster recipe.

Nothing here imports a GPU library at module import time.  NOT RUN ON A GPU by the authors.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["cuda_available", "local_cuda_cluster", "use_rmm_for_torch"]

_GPU_EXTRA = "install the GPU extra: pip install 'nsfw-dask[gpu-cu12]' (or [gpu-cu13])"


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


def local_cuda_cluster(**kwargs: Any) -> Any:
    """A ``dask_cuda.LocalCUDACluster`` with RMM shared by cuDF, CuPy and torch.

    Defaults (each overridable by keyword): ``rmm_async=True`` (a CUDA async memory pool),
    ``rmm_allocator_external_lib_list=["torch", "cupy"]`` (torch allocates from the same pool,
    switched in dask-cuda's RMMSetup plugin before any task) and ``enable_cudf_spill=True``.
    Passing ``rmm_pool_size`` selects a classic pool instead of the async one.

    Examples
    --------
    >>> from distributed import Client
    >>> from nsfw_dask import NSFWModelPlugin
    >>> from nsfw_dask.gpu import local_cuda_cluster
    >>> cluster = local_cuda_cluster()  # doctest: +SKIP
    >>> client = Client(cluster)  # doctest: +SKIP
    >>> client.register_plugin(NSFWModelPlugin(device="cuda"))  # doctest: +SKIP
    """
    if not cuda_available():
        raise RuntimeError("local_cuda_cluster needs a CUDA device; none is visible to torch.")
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as e:
        raise ModuleNotFoundError(f"local_cuda_cluster requires dask-cuda; {_GPU_EXTRA}") from e
    opts: dict[str, Any] = {
        "rmm_allocator_external_lib_list": ["torch", "cupy"],
        "enable_cudf_spill": True,
    }
    if "rmm_pool_size" not in kwargs:  # pool size with async warns (dask-cuda >= 25.12)
        opts["rmm_async"] = True
    opts.update(kwargs)
    return LocalCUDACluster(**opts)
