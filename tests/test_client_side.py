"""The client side of the job imports no torch: only workers score.

The process that plans the job, starts or joins the cluster and writes ``_SUCCESS`` (the CLI, or
``score_dataset`` in a notebook on a login node) needs the model's *identity* (shape, weights file,
digests: ``nsfw_dask._specs``), never torch itself; importing it cost every ``nsfw-dask`` run
~2 s and ~300 MB on the client, and an error found while planning waited for it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest


def _dataset(folder: Path, x: np.ndarray) -> Path:
    folder.mkdir()
    lists = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).reshape(-1)), x.shape[1])
    pq.write_table(pa.table({"key": [f"k{i}" for i in range(len(x))], "embedding": lists}), folder / "a.parquet")
    return folder


def _run(code: str, cwd: Path) -> dict:
    r = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.weights
def test_score_dataset_on_a_cluster_imports_no_torch_on_the_client(tmp_path, l14_ref):
    x = l14_ref["inputs"][:300]
    _dataset(tmp_path / "in", x)
    got = _run(
        """
        import json, sys
        from distributed import Client, LocalCluster

        if __name__ == "__main__":
            with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=None) as c, Client(c) as client:
                import nsfw_dask

                s = nsfw_dask.score_dataset("in", "out", client=client)
                on_worker = client.run(lambda: "torch" in sys.modules)
                print(json.dumps({"rows": s.rows, "client_torch": "torch" in sys.modules,
                                  "worker_torch": list(on_worker.values())}))
        """,
        tmp_path,
    )
    assert got == {"rows": 300, "client_torch": False, "worker_torch": [True]}
    out = pq.read_table(tmp_path / "out").to_pandas()
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][:300], rtol=0, atol=1e-5)
    assert out["key"].tolist() == [f"k{i}" for i in range(300)]


def test_cli_planning_error_comes_without_torch(tmp_path):
    (tmp_path / "empty").mkdir()
    got = _run(
        """
        import json, sys
        from nsfw_dask.cli import main

        code = main(["score", "empty", "out", "--no-progress"])
        loaded = {m: m in sys.modules for m in ("torch", "dask.dataframe")}
        print(json.dumps({"code": code, **loaded}))
        """,
        tmp_path,
    )
    assert got == {"code": 1, "torch": False, "dask.dataframe": False}


def test_the_jobs_cpu_cluster_keeps_freed_memory_a_few_seconds_in_its_workers(monkeypatch):
    """pyarrow's allocator in the job's own workers returns freed memory after 5 s, not at once
    (each partition's decode would page-fault its buffers in again); the user's setting wins."""
    import os

    from nsfw_dask import pipeline

    monkeypatch.delenv("MIMALLOC_PURGE_DELAY", raising=False)
    assert pipeline.default_worker_env() == {"MIMALLOC_PURGE_DELAY": "5000"}
    with pipeline._cluster(None, 1, 1, False, True) as (client, embedded):
        assert embedded
        assert set(client.run(lambda: os.environ.get("MIMALLOC_PURGE_DELAY")).values()) == {"5000"}
    monkeypatch.setenv("MIMALLOC_PURGE_DELAY", "250")
    assert pipeline.default_worker_env() == {"MIMALLOC_PURGE_DELAY": "250"}
