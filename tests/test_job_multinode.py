"""``--scheduler`` with workers that do not share the client's folders (another node, simulated by a
worker in its own mount namespace with a tmpfs over the data folder): local INPUT/OUTPUT paths are
refused before anything is written; with workers that do share them the run completes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = [pytest.mark.weights, pytest.mark.slow]

DASK = str(Path(sys.executable).parent / "dask")


def _mount_namespaces_work(tmp: Path) -> bool:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    r = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", f"mount -t tmpfs tmpfs {tmp}"],
        capture_output=True,
        timeout=30,
    )
    return r.returncode == 0


def _wait_workers(sched_file: Path, n: int, timeout: float = 120) -> str:
    from distributed import Client

    deadline = time.time() + timeout
    while True:
        try:
            address = json.loads(sched_file.read_text())["address"]
            break
        except (FileNotFoundError, ValueError, KeyError):  # not written yet, or half-written
            assert time.time() < deadline, "the scheduler did not start"
            time.sleep(0.1)
    with Client(address, timeout=30) as c:
        c.wait_for_workers(n, timeout=timeout)
    return address


@pytest.fixture()
def cluster_procs():
    procs: list[subprocess.Popen] = []
    yield procs
    # the workers first, while their scheduler is there to take their goodbye: a worker whose
    # scheduler is gone retries to reach it before it exits (~8 s)
    for group in (procs[1:], procs[:1]):
        for p in group:
            p.terminate()
        for p in group:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def test_local_paths_must_be_shared_by_every_worker(tmp_path, l14_ref, cluster_procs):
    data = tmp_path / "data"
    data.mkdir()
    if not _mount_namespaces_work(data):
        pytest.skip("needs root and mount namespaces (unshare) to simulate a worker on another node")
    n = 500
    pq.write_table(
        pa.table({"id": np.arange(n), "embedding": pa.array(list(l14_ref["inputs"][:n]), type=pa.list_(pa.float32()))}),
        data / "in.parquet",
    )
    sched = tmp_path / "scheduler.json"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    cluster_procs.append(
        subprocess.Popen(
            [DASK, "scheduler", "--scheduler-file", str(sched), "--port", "0", "--dashboard-address", ":0"], **quiet
        )
    )
    worker = [DASK, "worker", "--scheduler-file", str(sched), "--nthreads", "1", "--dashboard-address", ":0"]
    cluster_procs.append(subprocess.Popen(worker, **quiet))
    # "another node": the same machine, but /data is an empty tmpfs in this worker's mount namespace
    cluster_procs.append(
        subprocess.Popen(
            [
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                f"mount -t tmpfs tmpfs {data} && exec {' '.join(worker)}",
            ],
            **quiet,
        )
    )
    address = _wait_workers(sched, 2)
    out = data / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nsfw_dask",
            "score",
            str(data / "in.parquet"),
            str(out),
            "--scheduler",
            address,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2, r.stderr
    assert "worker(s)" in r.stderr and "not see as the same folder" in r.stderr and "s3://" in r.stderr, r.stderr
    assert not out.exists() and sorted(p.name for p in data.iterdir()) == ["in.parquet"]  # nothing written

    # the same with only workers that share the folder: accepted, and finished
    other = cluster_procs.pop()
    other.terminate()
    other.wait(timeout=60)
    from distributed import Client

    with Client(address) as c:
        deadline = time.time() + 60
        while len(c.scheduler_info()["workers"]) != 1:
            assert time.time() < deadline
            time.sleep(0.2)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nsfw_dask",
            "score",
            str(data / "in.parquet"),
            str(out),
            "--scheduler",
            address,
            "--no-progress",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == n and (out / "_SUCCESS").exists()
