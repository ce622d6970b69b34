"""GPU workers: ``local_cuda_cluster`` + ``NSFWModelPlugin(device="cuda")``, and ``nsfw-dask score --gpu``.

Runs only where torch sees a CUDA device and the GPU extra is installed (conftest skips it
elsewhere).  NOT RUN by the authors (no GPU was available): written from dask-cuda's and RMM's
source (see docs/gpu.md) to be right on the first machine that has one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nsfw_dask import NSFWModelPlugin, NSFWScorer, model_cache_info, score_nsfw

pytestmark = [pytest.mark.gpu, pytest.mark.weights]


def _write_parquet(folder: Path, x: np.ndarray, sizes: list[int]) -> Path:
    folder.mkdir(parents=True)
    start = 0
    for i, n in enumerate(sizes):
        dim = x.shape[1]
        lists = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(x[start : start + n].reshape(-1))
        )
        pq.write_table(
            pa.table({"id": np.arange(start, start + n), "embedding": lists}),
            folder / f"part{i}.parquet",
            row_group_size=400,
        )
        start += n
    return folder


def _write_npy(root: Path, x: np.ndarray, sizes: list[int]) -> Path:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    start = 0
    for i, n in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[start : start + n])
        pq.write_table(
            pa.table({"key": [f"{j:09d}" for j in range(start, start + n)]}),
            root / "metadata" / f"metadata_{i}.parquet",
            row_group_size=500,
        )
        start += n
    return root


# ----------------------------------------------------------------------------- worker-side probes


def _torch_through_rmm() -> dict[str, Any]:
    """On a worker: torch's allocator backend, RMM's resource, and the bytes RMM sees when torch
    allocates 16 MiB (``rmm.statistics`` pushes a statistics adaptor for the duration)."""
    import rmm
    import rmm.statistics

    info: dict[str, Any] = {
        "backend": torch.cuda.memory.get_allocator_backend(),
        "resource": type(rmm.mr.get_current_device_resource()).__name__,
    }
    with rmm.statistics.statistics():
        t = torch.empty(16 * 2**20, dtype=torch.uint8, device="cuda")
        info["rmm_bytes"] = rmm.statistics.get_statistics().current_bytes
        del t
        torch.cuda.synchronize()
    return info


def _cudf_spill() -> bool:
    import cudf

    return bool(cudf.get_option("spill"))


def test_local_cuda_cluster_loads_once_per_worker_and_torch_uses_rmm(
    tmp_path: Path, l14_ref: dict[str, np.ndarray]
) -> None:
    import dask
    from distributed import Client

    from nsfw_dask.gpu import local_cuda_cluster
    from nsfw_dask.io import read_parquet_embeddings

    n_gpus = min(2, torch.cuda.device_count())
    x = l14_ref["inputs"]
    src = _write_parquet(tmp_path / "in", x, [700, 700, 700, 592])
    with local_cuda_cluster(n_workers=n_gpus, dashboard_address=":0") as cluster, Client(cluster) as client:
        client.register_plugin(NSFWModelPlugin(device="cuda"))
        probes = client.run(_torch_through_rmm)
        assert len(probes) == n_gpus
        for addr, p in probes.items():
            assert p["backend"] == "pluggable", (addr, p)  # rmm_allocator_external_lib_list=["torch", ...]
            assert p["resource"] == "CudaAsyncMemoryResource", (addr, p)  # rmm_async=True, the default
            assert p["rmm_bytes"] >= 16 * 2**20, (addr, p)  # torch's bytes came from RMM
        assert set(client.run(_cudf_spill).values()) == {False}  # dask-cuda spilling, not cuDF's
        import cudf

        assert cudf.get_option("spill") is False  # nor switched on in this (client) process

        with dask.config.set({"dataframe.backend": "cudf"}):
            ddf = read_parquet_embeddings(src)
            assert isinstance(ddf._meta, cudf.DataFrame)
            assert ddf.optimize().npartitions == 4  # one per file: no 1/32-of-a-GPU fusion
            out = ddf.map_partitions(score_nsfw).compute()
        got = out.to_pandas().sort_values("id")["nsfw_score"].to_numpy()
        np.testing.assert_allclose(got, l14_ref["nemo_scores"], rtol=0, atol=1e-5)

        infos = client.run(model_cache_info)
        assert len(infos) == n_gpus
        for addr, info in infos.items():
            assert info["loads"] == 1, (addr, info)  # by the plugin, none by the 4 tasks
            assert info["models"][0]["device"].startswith("cuda"), (addr, info)


# ----------------------------------------------------------------------------- the CLI


def _run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsfw_dask", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=timeout,
    )


def _read_scores(out: Path, key: str) -> pd.DataFrame:
    from nsfw_dask.pipeline import SUCCESS_FILE

    assert (out / SUCCESS_FILE).is_file()
    df = pd.concat([pd.read_parquet(p) for p in sorted(out.glob("part.*.parquet"))], ignore_index=True)
    return df.sort_values(key)


@pytest.mark.parametrize("layout", ["parquet", "parquet_float16", "parquet_npy"])
def test_cli_score_gpu(tmp_path: Path, l14_ref: dict[str, np.ndarray], layout: str) -> None:
    """``nsfw-dask score --gpu``: the pipeline reads with pyarrow and scores pandas partitions with
    ``device="cuda"`` (float16 included, which cuDF could not read); scores as on the CPU."""
    x = l14_ref["inputs"]
    if layout == "parquet":
        src, key, dtype = _write_parquet(tmp_path / "in", x, [1300, 1392]), "id", np.float32
    elif layout == "parquet_float16":
        src, key, dtype = _write_parquet(tmp_path / "in", x.astype(np.float16), [1300, 1392]), "id", np.float16
    else:
        src, key, dtype = _write_npy(tmp_path / "laion", x.astype(np.float16), [1000, 1692]), "row_number", np.float16
    expected = NSFWScorer(device="cpu")(x.astype(dtype).astype(np.float32)).numpy()
    out = tmp_path / "out"
    r = _run_cli(
        "score",
        str(src),
        str(out),
        "--gpu",
        "--workers",
        "1",
        "--no-progress",
        "--json",
        "--rows-per-partition",
        "600",
        "--batch-size",
        "256",
    )
    assert r.returncode == 0, (r.stdout, r.stderr)
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["rows"] == len(x)
    from nsfw_dask.pipeline import JOB_FILE

    job = json.loads((out / JOB_FILE).read_text())
    assert job["options"]["device"] == "cuda", job["options"]  # the job description records --gpu
    got = _read_scores(out, key)["nsfw_score"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_cli_gpu_threads_per_worker_is_passed_on(tmp_path: Path, l14_ref: dict[str, np.ndarray]) -> None:
    src = _write_parquet(tmp_path / "in", l14_ref["inputs"][:900], [450, 450])
    out = tmp_path / "out"
    r = _run_cli("score", str(src), str(out), "--gpu", "--workers", "1", "--threads-per-worker", "2", "--no-progress")
    assert r.returncode == 0, (r.stdout, r.stderr)
    expected = NSFWScorer(device="cpu")(l14_ref["inputs"][:900]).numpy()
    np.testing.assert_allclose(_read_scores(out, "id")["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-5)


def test_cli_gpu_more_workers_than_gpus_is_one_line(tmp_path: Path, l14_ref: dict[str, np.ndarray]) -> None:
    src = _write_parquet(tmp_path / "in", l14_ref["inputs"][:100], [100])
    n = torch.cuda.device_count()
    r = _run_cli("score", str(src), str(tmp_path / "out"), "--gpu", "--workers", str(n + 1), "--no-progress")
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsfw-dask: error:"), r.stderr
    assert f"{n + 1} GPU workers" in lines[0] and f"{n} GPU(s)" in lines[0], lines[0]
    from nsfw_dask.pipeline import SUCCESS_FILE

    assert not (tmp_path / "out" / SUCCESS_FILE).exists()


def test_cli_gpu_several_threads_per_worker_match_the_cpu_job_and_each_other(
    tmp_path: Path, l14_ref: dict[str, np.ndarray]
) -> None:
    """``--gpu`` runs several partitions per GPU at once (``default_gpu_cluster_shape``): rows,
    order and scores as the CPU job's (within 1e-5), and the same bytes whatever the threads per
    worker and the batch size (every CUDA forward pass is one fixed 32,768-row block)."""
    from nsfw_dask.pipeline import default_gpu_cluster_shape

    x = l14_ref["inputs"].astype(np.float16)
    src = _write_npy(tmp_path / "laion", x, [1000, 1692])
    common = ["--json", "--no-progress", "--rows-per-partition", "200", "--threshold", "0.5"]  # 16 parts
    runs = {
        "cpu": ["--workers", "1", "--threads-per-worker", "2"],
        "gpu": ["--gpu", "--workers", "1"],  # the default threads
        "gpu_1": ["--gpu", "--workers", "1", "--threads-per-worker", "1", "--batch-size", "1000"],
        "gpu_4": ["--gpu", "--workers", "1", "--threads-per-worker", "4"],
    }
    frames, summaries = {}, {}
    for name, extra in runs.items():
        r = _run_cli("score", str(src), str(tmp_path / name), *common, *extra)
        assert r.returncode == 0, (name, r.stdout, r.stderr)
        summaries[name] = s = json.loads(r.stdout.strip().splitlines()[-1])
        assert (s["rows"], s["rows_written"], s["partitions"]) == (len(x), len(x), 16), (name, s)
        frames[name] = pd.concat(
            [pd.read_parquet(p) for p in sorted((tmp_path / name).glob("part.*.parquet"))], ignore_index=True
        )
    default_threads = default_gpu_cluster_shape(1, None, n_gpus=torch.cuda.device_count())[1]
    assert [summaries[n]["threads"] for n in ("gpu", "gpu_1", "gpu_4")] == [default_threads, 1, 4]
    assert default_threads >= 2
    for name, s in summaries.items():  # where the time went, on the GPU too
        st = s["stages"]
        assert all(st[k] > 0 for k in ("read_s", "metadata_s", "score_s", "build_s", "write_s")), (name, st)
        assert st["task_s"] <= s["threads"] * s["compute_seconds"] * 1.01 + 0.05, (name, s)
    cpu = frames["cpu"]
    for name in ("gpu", "gpu_1", "gpu_4"):
        got = frames[name]
        np.testing.assert_array_equal(got["row_number"].to_numpy(), np.arange(len(x)))  # every row, in order
        assert got["key"].tolist() == cpu["key"].tolist()
        np.testing.assert_allclose(got["nsfw_score"].to_numpy(), cpu["nsfw_score"].to_numpy(), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(got["nsfw_score"].to_numpy(), frames["gpu"]["nsfw_score"].to_numpy())
    names = sorted(p.name for p in (tmp_path / "gpu").glob("part.*.parquet"))
    for name in ("gpu_1", "gpu_4"):  # the same job (threads and batch size change no byte)
        for n in names:
            assert (tmp_path / name / n).read_bytes() == (tmp_path / "gpu" / n).read_bytes(), (name, n)
