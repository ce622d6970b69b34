"""The main job against a real local S3 endpoint (moto's server, s3fs): worker processes read
INPUT and write OUTPUT themselves; nothing is written to a local folder named after the URL."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsfw_dask import NSFWScorer

from _s3 import s3, s3_endpoint  # noqa: F401  (fixtures)

pytestmark = pytest.mark.weights

CLUSTER = ["--workers", "2", "--threads-per-worker", "1", "--no-progress"]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsfw_dask", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=300,
    )


def upload_npy(s3, prefix: str, x: np.ndarray, sizes: list[int]) -> str:
    start = 0
    for i, n in enumerate(sizes):
        buf = io.BytesIO()
        np.save(buf, x[start : start + n])
        s3.fs.pipe(s3.url(f"{prefix}/img_emb/img_emb_{i}.npy"), buf.getvalue())
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table({"key": [f"{j:09d}" for j in range(start, start + n)]}), sink, row_group_size=300)
        s3.fs.pipe(s3.url(f"{prefix}/metadata/metadata_{i}.parquet"), sink.getvalue().to_pybytes())
        start += n
    return s3.url(prefix)


def read_s3_output(s3, prefix: str) -> pa.Table:
    names = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(s3.url(prefix), detail=False))
    assert "_SUCCESS" in names and "_nsfw_dask_job.json" in names, names
    assert not [n for n in names if n.startswith(".")], names  # no temporary object left
    tables = []
    for n in names:
        if n.startswith("part."):
            with s3.fs.open(s3.url(f"{prefix}/{n}"), "rb") as f:
                tables.append(pq.read_table(f))
    return pa.concat_tables(tables)


@pytest.fixture(scope="module")
def x16(l14_ref) -> np.ndarray:
    return l14_ref["inputs"][:1500].astype(np.float16)


@pytest.fixture(scope="module")
def expected16(x16) -> np.ndarray:
    return NSFWScorer(device="cpu")(x16.astype(np.float32)).numpy()


def test_s3_input_and_output_with_worker_processes_then_resume(s3, x16, expected16, tmp_path):
    src = upload_npy(s3, "laion", x16, [700, 800])
    r = run_cli(
        "score",
        src,
        s3.url("scored"),
        "--rows-per-partition",
        "300",
        "--threshold",
        "0.5",
        "--json",
        *CLUSTER,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["rows"], s["rows_written"], s["partitions"], s["output"]) == (1500, 1500, 6, s3.url("scored"))
    t = read_s3_output(s3, "scored")
    assert t.column_names == ["row_number", "key", "nsfw_score", "is_nsfw"]
    np.testing.assert_array_equal(t.column("row_number").to_numpy(), np.arange(1500))
    np.testing.assert_allclose(t.column("nsfw_score").to_numpy(), expected16, rtol=0, atol=1e-6)
    assert list(tmp_path.iterdir()) == []  # nothing local, no "./s3:" folder
    # a run killed after some parts: delete two parts and _SUCCESS, then resume
    parts = sorted(p for p in s3.fs.ls(s3.url("scored"), detail=False) if "/part." in p)
    before = {p: s3.fs.cat(p) for p in parts}
    for p in parts[2:4] + [s3.url("scored/_SUCCESS")]:
        s3.fs.rm(p)
    r = run_cli("score", src, s3.url("scored"), "--rows-per-partition", "300", "--threshold", "0.5", *CLUSTER)
    assert r.returncode == 2 and "--resume" in r.stderr
    r = run_cli(
        "score",
        src,
        s3.url("scored"),
        "--rows-per-partition",
        "300",
        "--threshold",
        "0.5",
        "--json",
        "--resume",
        *CLUSTER,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["partitions_reused"] == 4
    assert {p: s3.fs.cat(p) for p in parts} == before  # identical to the uninterrupted run
    assert s3.fs.exists(s3.url("scored/_SUCCESS"))


def test_local_input_to_s3_url_output_is_not_a_local_folder(s3, x16, expected16, tmp_path):
    """The bug: `score INPUT s3://bucket/out` wrote into ./s3:/bucket/out and exited 0."""
    src = tmp_path / "in.parquet"
    pq.write_table(
        pa.table(
            {
                "id": np.arange(300),
                "embedding": pa.array(list(x16[:300].astype(np.float32)), type=pa.list_(pa.float32())),
            }
        ),
        src,
    )
    work = tmp_path / "cwd"
    work.mkdir()
    r = run_cli("score", str(src), s3.url("out"), *CLUSTER, cwd=work)
    assert r.returncode == 0, r.stderr
    assert list(work.iterdir()) == [] and s3.url("out") in r.stdout
    t = read_s3_output(s3, "out")
    np.testing.assert_array_equal(t.column("id").to_numpy(), np.arange(300))
    np.testing.assert_allclose(t.column("nsfw_score").to_numpy(), expected16[:300], rtol=0, atol=1e-6)


def test_storage_options_reach_the_workers(s3, x16, tmp_path):
    """--storage-options alone (no endpoint in the environment) is enough for every worker."""
    src = upload_npy(s3, "laion", x16[:400], [400])
    env = {"FSSPEC_S3_ENDPOINT_URL": "http://127.0.0.1:9"}  # a dead endpoint, overridden by the option
    opts = json.dumps({"endpoint_url": s3.endpoint, "key": "testing", "secret": "testing"})
    r = run_cli("score", src, s3.url("o"), "--storage-options", opts, "--json", *CLUSTER, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 400 and read_s3_output(s3, "o").num_rows == 400
