"""Shared fixtures and markers.

* ``gpu`` tests run only where torch sees a CUDA device and cuDF/CuPy import (``import cudf``
  alone succeeds on a CPU machine, so the device is probed).
* ``gpu_api`` tests run where the GPU extra is installed, GPU or not.
* ``weights`` tests need LAION's weights: ``$NSFW_DASK_MODEL_DIR``, else ``../shared/weights``
  beside the checkout.  With ``NSFW_DASK_REQUIRE_WEIGHTS=1`` (as in .ci/run) missing weights are
  an error instead of a skip.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
L14_FILE = "clip_ViT-L-14_openai_binary_nsfw_head.pth"


def _weights_dir() -> Path | None:
    env = os.environ.get("NSFW_DASK_MODEL_DIR")
    for cand in ([Path(env)] if env else []) + [SHARED / "weights"]:
        if (cand / L14_FILE).is_file():
            return cand
    return None


def _reference_dir() -> Path | None:
    env = os.environ.get("NSFW_DASK_REFERENCE_DIR")
    for cand in ([Path(env)] if env else []) + [SHARED / "reference"]:
        if (cand / "l14_reference.npz").is_file():
            return cand
    return None


WEIGHTS_DIR = _weights_dir()
REFERENCE_DIR = _reference_dir()


def _cuda_device_present() -> bool:
    try:
        import torch

        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return False
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0 and importlib.util.find_spec("cudf") is not None
    except Exception:
        return False


def _gpu_extra_installed() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("cudf", "cupy", "dask_cudf", "dask_cuda"))


def pytest_configure(config: pytest.Config) -> None:
    if WEIGHTS_DIR is not None:
        os.environ["NSFW_DASK_MODEL_DIR"] = str(WEIGHTS_DIR)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    need_weights = any("weights" in item.keywords for item in items)
    if need_weights and (WEIGHTS_DIR is None or REFERENCE_DIR is None):
        if os.environ.get("NSFW_DASK_REQUIRE_WEIGHTS") == "1":
            raise pytest.UsageError(
                "NSFW_DASK_REQUIRE_WEIGHTS=1 but LAION's weights or the reference data were not "
                f"found (NSFW_DASK_MODEL_DIR={os.environ.get('NSFW_DASK_MODEL_DIR')!r}, "
                f"looked in {SHARED}); weight-dependent tests would be skipped."
            )
    gpu = _cuda_device_present()
    extra = _gpu_extra_installed()
    for item in items:
        if "gpu" in item.keywords and not gpu:
            item.add_marker(pytest.mark.skip(reason="no CUDA device (or cuDF/CuPy) here"))
        if "gpu_api" in item.keywords and not extra:
            item.add_marker(pytest.mark.skip(reason="GPU extra (cudf, cupy, dask-cudf, dask-cuda) not installed"))
        if "weights" in item.keywords and (WEIGHTS_DIR is None or REFERENCE_DIR is None):
            item.add_marker(pytest.mark.skip(reason="LAION weights / reference data not found"))


_skipped_weight_tests: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    kw = report.keywords
    if report.skipped and "weights" in kw and "gpu" not in kw and "gpu_api" not in kw:
        _skipped_weight_tests.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("NSFW_DASK_REQUIRE_WEIGHTS") == "1" and _skipped_weight_tests:
        print(
            f"\nNSFW_DASK_REQUIRE_WEIGHTS=1 but {len(_skipped_weight_tests)} weight-dependent test(s) "
            f"were skipped: {_skipped_weight_tests[:5]}"
        )
        session.exitstatus = 1


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch the user's cache, never reach the network unless a test asks."""
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "user-cache"))
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "1")


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    assert WEIGHTS_DIR is not None
    return WEIGHTS_DIR


@pytest.fixture(scope="session")
def l14_ref() -> dict[str, np.ndarray]:
    assert REFERENCE_DIR is not None
    with np.load(REFERENCE_DIR / "l14_reference.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def b32_ref() -> dict[str, np.ndarray]:
    assert REFERENCE_DIR is not None
    with np.load(REFERENCE_DIR / "b32_reference.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="session")
def l14_special() -> dict[str, np.ndarray]:
    assert REFERENCE_DIR is not None
    with np.load(REFERENCE_DIR / "l14_special.npz") as d:
        return {k: d[k] for k in d.files}


class SyntheticModel:
    """A tiny head (768 -> 8 -> 1) with random weights, registered as model ``"synthetic"``.

    Its ``.pth`` is written into ``folder`` (also ``$NSFW_DASK_MODEL_DIR``) and pinned by its own
    SHA-256 like LAION's files, so the whole stack (resolution, verification, loading, the
    forward pass, the job) runs on it without LAION's weights.  Only in this process: use an
    in-process cluster (``LocalCluster(processes=False)``) for Dask tests.
    """

    name = "synthetic"

    def __init__(self, folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        import hashlib

        import torch

        from nsfw_dask import _specs, models

        g = torch.Generator().manual_seed(0)
        self.state = {
            "norm.mean": torch.randn(768, generator=g) * 0.01,
            "norm.variance": torch.rand(768, generator=g) * 1e-3 + 1e-4,
            "linear_1.weight": torch.randn(8, 768, generator=g) * 0.05,
            "linear_1.bias": torch.randn(8, generator=g) * 0.1,
            "linear_2.weight": torch.randn(1, 8, generator=g),
            "linear_2.bias": torch.randn(1, generator=g),
        }
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "synthetic_nsfw_head.pth"
        torch.save(self.state, path)
        spec = models.ModelSpec(
            name=self.name,
            clip_model="a synthetic 768-d test head",
            layers=(768, 8, 1),
            filename=path.name,
            url="http://127.0.0.1:9/synthetic_nsfw_head.pth",
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        )
        monkeypatch.setitem(models.MODEL_SPECS, self.name, spec)
        monkeypatch.setitem(_specs._ALIASES, self.name, self.name)
        monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(folder))
        self.folder, self.spec = folder, spec

    def expected(self, x: np.ndarray) -> np.ndarray:
        """The head computed independently, in float64.  The library computes in float32: with
        this variance the normalised inputs reach ~100, and a 768-term float32 sum of such values
        is exact to a few 1e-6 in the score (measured max 2.4e-6); tests use 1e-5."""
        s = {k: v.double().numpy() for k, v in self.state.items()}
        h = (np.asarray(x, np.float64) - s["norm.mean"]) / np.sqrt(s["norm.variance"])
        h = np.maximum(h @ s["linear_1.weight"].T + s["linear_1.bias"], 0)
        return 1 / (1 + np.exp(-(h @ s["linear_2.weight"].T + s["linear_2.bias"])[:, 0]))


@pytest.fixture
def synthetic_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SyntheticModel]:
    """A registered tiny head with random weights: tests of layout and errors that need no LAION files."""
    import nsfw_dask

    nsfw_dask.clear_model_cache()
    yield SyntheticModel(tmp_path / "synthetic-weights", monkeypatch)
    nsfw_dask.clear_model_cache()


@pytest.fixture
def fresh_dask_frames() -> Iterator[None]:
    """No cached model before or after the test, and dask's string conversion off (string index
    and columns stay object dtype, so frames compare exactly).  Modules use it with
    ``pytestmark = pytest.mark.usefixtures("fresh_dask_frames")``."""
    import dask

    import nsfw_dask

    nsfw_dask.clear_model_cache()
    with dask.config.set({"dataframe.convert-string": False}):
        yield
    nsfw_dask.clear_model_cache()


@pytest.fixture(scope="session")
def shared_scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a Dask cluster started once per session: 1 worker process x 1 thread.

    For CLI runs whose subject is not the cluster's own start or shut-down: ``--scheduler
    ADDRESS`` instead of ``--workers 1 --threads-per-worker 1`` spares each run starting a
    cluster and loading the model in a new worker (~4 s a run on 2 cores); the CLI then also
    runs its shared-folder probe.  The worker runs in a process of its own (``_shared_cluster.py``)
    and its environment is fixed when it starts: ``$NSFW_DASK_MODEL_DIR`` as found here, the
    tests' user cache (``_isolated_cache``), offline, and a cwd of its own.  So CLI runs that
    change the weights or network environment, kill or interrupt the CLI, count model loads, use
    S3 settings, depend on the CLI's cwd, or check ``--workers`` keep a cluster of their own.
    """
    cwd = tmp_path_factory.mktemp("shared-cluster")
    env = {
        **os.environ,
        "NSFW_DASK_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "user-cache"),
        "NSFW_DASK_OFFLINE": "1",
    }
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("_shared_cluster.py"))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None
        address = proc.stdout.readline().strip()
        assert address.startswith("tcp://"), f"the shared cluster did not start ({proc.poll()=}, {address!r})"
        yield address
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture
def inprocess_client() -> Iterator[object]:
    """A ``LocalCluster`` with in-process workers (1 x 2 threads): they see what this process
    registered (the ``synthetic_model`` fixture's head)."""
    import logging

    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0", silence_logs=logging.ERROR
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c
