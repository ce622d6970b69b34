"""The `nsfw-dask` CLI through real subprocesses: success, each error, no-overwrite, interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsfw_dask import NSFWScorer

from _cli import run_concurrently

pytestmark = pytest.mark.weights

#: The CLI's own cluster (what a user gets), for the runs about it, and the runs that error
#: before a cluster would start.
CLUSTER = ["--workers", "1", "--threads-per-worker", "1"]


@pytest.fixture()
def shared(shared_scheduler: str) -> list[str]:
    """The session's cluster (1 worker x 1 thread, conftest.py), for runs whose subject is not
    the cluster: the same job without starting a cluster and loading the model each time."""
    return ["--scheduler", shared_scheduler]


def cli_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "nsfw_dask", *args]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(cli_cmd(*args), capture_output=True, text=True, env=full_env, timeout=timeout)


def run_clis(*args: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess]:
    """Independent CLI runs, two at a time (see ``_cli.run_concurrently``)."""
    return run_concurrently(*(cli_cmd(*a) for a in args), env={**os.environ, **(env or {})}, timeout=180)


def write_parquet(path: Path, x: np.ndarray, row_group_size: int = 500) -> pd.DataFrame:
    n, dim = x.shape
    lists = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(x.reshape(-1))
    )
    table = pa.table({"url": [f"https://e.org/{i}.jpg" for i in range(n)], "id": np.arange(n) * 3, "embedding": lists})
    pq.write_table(table, path, row_group_size=row_group_size)
    return table.to_pandas()


@pytest.fixture(scope="module")
def expected(l14_ref) -> np.ndarray:
    return NSFWScorer(device="cpu")(l14_ref["inputs"]).numpy()


@pytest.fixture()
def dataset(tmp_path, l14_ref) -> Path:
    path = tmp_path / "in.parquet"
    write_parquet(path, l14_ref["inputs"])
    return path


def read_output(path: Path) -> pd.DataFrame:
    """A finished OUTPUT's parts, in name (= input) order."""
    assert (path / "_SUCCESS").is_file(), sorted(p.name for p in path.iterdir())
    files = sorted(path.glob("part.*.parquet"))
    return pd.concat([pd.read_parquet(f, dtype_backend="pyarrow") for f in files])


def test_help_on_every_command():
    cmds = ([], ["score"], ["fetch-weights"], ["demo"])
    for cmd, r in zip(cmds, run_clis(*([*cmd, "--help"] for cmd in cmds))):
        assert r.returncode == 0, r.stderr
        assert f"Usage: nsfw-dask {' '.join(cmd)}".rstrip() + " [OPTIONS]" in r.stdout, r.stdout


def test_score_success_threshold_and_order(tmp_path, dataset, expected, shared):
    out = tmp_path / "out"
    r = run_cli("score", str(dataset), str(out), "--threshold", "0.5", *shared)
    assert r.returncode == 0, r.stderr
    assert "rows scored      2,692" in r.stdout and "score quantiles" in r.stdout
    assert f"score >= 0.5     {int((expected >= 0.5).sum()):,} rows" in r.stdout
    got = read_output(out)
    assert list(got.columns) == ["url", "id", "nsfw_score", "is_nsfw"]  # the embeddings are not written again
    assert str(got["nsfw_score"].dtype) in ("float32", "float[pyarrow]")
    np.testing.assert_array_equal(got["id"].to_numpy(), np.arange(2692) * 3)  # row order kept
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got["is_nsfw"].to_numpy(), got["nsfw_score"].to_numpy() >= 0.5)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left


def test_filter_keep_safe_and_keep_nsfw(tmp_path, dataset, expected, shared):
    modes = (("keep-safe", expected < 0.3), ("keep-nsfw", expected >= 0.3))
    runs = run_clis(
        *(["score", str(dataset), str(tmp_path / m), "--threshold", "0.3", "--filter", m, *shared] for m, _ in modes)
    )
    for (mode, keep), r in zip(modes, runs):
        out = tmp_path / mode
        assert r.returncode == 0, r.stderr
        got = read_output(out)
        assert f"rows written     {int(keep.sum()):,}" in r.stdout
        np.testing.assert_array_equal(got["id"].to_numpy(), (np.arange(2692) * 3)[keep])


def test_existing_output_refused_then_overwritten(tmp_path, dataset, shared):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = run_cli("score", str(dataset), str(out), *CLUSTER)
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--overwrite" in r.stderr and "not written by nsfw-dask" in r.stderr
    assert (out / "keep.txt").read_text() == "user data"
    r = run_cli("score", str(dataset), str(out), "--overwrite", *shared)
    assert r.returncode == 0, r.stderr
    assert not (out / "keep.txt").exists() and len(read_output(out)) == 2692


def _one_line_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("nsfw-dask: error:")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_missing_column_error(tmp_path, dataset):
    line = _one_line_error(run_cli("score", str(dataset), str(tmp_path / "o"), "--column", "nope", *CLUSTER))
    assert "'nope' not found" in line and "embedding" in line
    assert not (tmp_path / "o").exists()


def test_wrong_dimension_error(tmp_path, b32_ref, shared):
    path = tmp_path / "b32.parquet"
    write_parquet(path, b32_ref["inputs"][:200])
    line = _one_line_error(run_cli("score", str(path), str(tmp_path / "o"), *shared))
    assert "has 512 values, expected 768" in line and "vit-b-32" in line
    assert "b32.parquet" in line and "rows 0-199 of that file" in line and "--model vit-b-32" in line
    assert not (tmp_path / "o").exists()  # a run that committed nothing leaves nothing
    r = run_cli("score", str(path), str(tmp_path / "o"), "--model", "vit-b-32", *shared)
    assert r.returncode == 0, r.stderr


def test_weights_unavailable_offline(tmp_path, dataset):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {"NSFW_DASK_MODEL_DIR": str(empty), "NSFW_DASK_CACHE_DIR": str(empty), "NSFW_DASK_OFFLINE": "1"}
    plain, verbose = run_clis(
        ["score", str(dataset), str(tmp_path / "o"), *CLUSTER],
        ["score", str(dataset), str(tmp_path / "o"), "--verbose", *CLUSTER],
        env=env,
    )
    line = _one_line_error(plain)
    assert "NSFW_DASK_MODEL_DIR" in line and "clip_ViT-L-14_openai_binary_nsfw_head.pth" in line
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_missing_input_error(tmp_path):
    line = _one_line_error(run_cli("score", str(tmp_path / "nothing"), str(tmp_path / "o"), *CLUSTER))
    assert "nothing" in line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_run_keeps_committed_parts_and_resumes(tmp_path, l14_ref, expected, sig, shared):
    path = tmp_path / "big.parquet"
    write_parquet(path, l14_ref["inputs"], row_group_size=200)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nsfw_dask",
            "score",
            str(path),
            str(out),
            "--batch-size",
            "1",
            "--rows-per-partition",
            "200",
            "--no-norm-check",  # rows 2048-2175 of the reference set are raw (norm ~27) on purpose
            *CLUSTER,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # a process group of its own, as a terminal's foreground job
    )
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and list(out.glob("part.*.parquet"))):
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    assert list(out.glob("part.*.parquet")), "the run never committed a part"
    if sig == signal.SIGINT:  # Ctrl-C: a terminal sends it to the whole process group, workers included
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    # only our line: no worker process's KeyboardInterrupt traceback
    assert [ln for ln in err.splitlines() if ln.strip()] == [
        f"nsfw-dask: interrupted; committed parts are kept in {out}; rerun the same command with --resume to finish it"
    ], err
    assert not (out / "_SUCCESS").exists()  # never taken for finished
    committed = sorted(p.name for p in out.glob("part.*.parquet"))
    assert committed
    r = run_cli("score", str(path), str(out), *CLUSTER)
    assert r.returncode == 2 and "--resume" in r.stderr, r.stderr
    # the interrupted run had a cluster of its own; the resume is any run's
    r = run_cli(
        "score", str(path), str(out), "--resume", "--json", "--rows-per-partition", "200", "--no-norm-check", *shared
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["partitions"] == 14 and summary["partitions_reused"] >= len(committed) - 1
    got = read_output(out)
    np.testing.assert_array_equal(got["id"].to_numpy(), np.arange(2692) * 3)
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)


def _parquet_npy(root: Path, x: np.ndarray, sizes: list[int], dtype=np.float16) -> None:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    start = 0
    for i, n in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[start : start + n].astype(dtype))
        pd.DataFrame(
            {"url": [f"u{j}" for j in range(start, start + n)], "row": np.arange(start, start + n)}
        ).to_parquet(root / "metadata" / f"metadata_{i}.parquet")
        start += n


def test_parquet_npy_input(tmp_path, l14_ref, shared):
    x = l14_ref["inputs"]
    root = tmp_path / "laion"
    _parquet_npy(root, x, [1000, 1692])
    out = tmp_path / "out"
    r = run_cli("score", str(root), str(out), *shared)
    assert r.returncode == 0, r.stderr
    got = read_output(out)
    np.testing.assert_array_equal(got["row"].to_numpy(), np.arange(len(x)))
    np.testing.assert_array_equal(got["row_number"].to_numpy(), np.arange(len(x)))  # the global row number
    assert list(got.columns) == ["row_number", "url", "row", "nsfw_score"]
    expected = NSFWScorer(device="cpu")(x.astype(np.float16).astype(np.float32)).numpy()
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)


def test_parquet_npy_row_count_mismatch(tmp_path, l14_ref):
    root = tmp_path / "laion"
    _parquet_npy(root, l14_ref["inputs"], [100, 100])
    np.save(root / "img_emb" / "img_emb_1.npy", l14_ref["inputs"][:99].astype(np.float16))
    line = _one_line_error(run_cli("score", str(root), str(tmp_path / "o"), *CLUSTER))
    assert "img_emb_1.npy has 99 rows" in line and "metadata_1.parquet has 100" in line


def test_fetch_weights_prints_verified_path(weights_dir):
    """Every head with weights for the model (issue 22): the NSFW head, then aesthetic v1."""
    r = run_cli("fetch-weights", "--model", "vit-b-32", env={"NSFW_DASK_MODEL_DIR": str(weights_dir)})
    assert r.returncode == 0, r.stderr
    assert [Path(p) for p in r.stdout.split()] == [
        (weights_dir / "clip_ViT-B-32_openai_binary_nsfw_head.pth").resolve(),
        (weights_dir / "sa_0_4_vit_b_32_linear.pth").resolve(),
    ]
    r = run_cli("fetch-weights", "--heads", "aesthetic", "--model", "vit-b-32")
    assert r.returncode == 2 and "'aesthetic' head has no weights for vit-b-32" in r.stderr, r.stderr


def test_null_embeddings_are_not_labelled_safe(tmp_path, l14_ref, shared):
    x = l14_ref["inputs"][:50]
    rows = [list(r) for r in x]
    rows[3] = rows[17] = None
    pq.write_table(
        pa.table({"id": np.arange(50), "embedding": pa.array(rows, type=pa.list_(pa.float32()))}),
        tmp_path / "in.parquet",
    )
    r, safe = run_clis(
        ["score", str(tmp_path / "in.parquet"), str(tmp_path / "o"), "--threshold", "0.5", *shared],
        ["score", str(tmp_path / "in.parquet"), str(tmp_path / "s"), "--filter", "keep-safe", *shared],
    )
    assert r.returncode == 0, r.stderr
    assert "NaN scores       2" in r.stdout
    got = read_output(tmp_path / "o")
    assert got["is_nsfw"].isna().to_numpy()[[3, 17]].all() and got["is_nsfw"].notna().sum() == 48
    assert safe.returncode == 0, safe.stderr
    assert set(read_output(tmp_path / "s")["id"]).isdisjoint({3, 17})  # unknown is not safe


def test_output_overlapping_input_is_refused(tmp_path, dataset):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "in.parquet").write_bytes(dataset.read_bytes())
    outs = (folder, folder / "in.parquet", tmp_path)
    runs = run_clis(*(["score", str(folder / "in.parquet"), str(out), "--overwrite", *CLUSTER] for out in outs))
    for out, r in zip(outs, runs):
        assert r.returncode == 2 and "overlaps INPUT" in r.stderr, (out, r.stderr)
    assert (folder / "in.parquet").read_bytes() == dataset.read_bytes()


def test_bad_numbers_and_existing_score_column(tmp_path, dataset):
    bads = (["--batch-size", "0"], ["--threshold", "1.5"], ["--workers", "-1"])
    *runs, r = run_clis(
        *(["score", str(dataset), str(tmp_path / "o"), *bad] for bad in bads),
        ["score", str(dataset), str(tmp_path / "o"), "--score-column", "id", *CLUSTER],
    )
    for bad, r_bad in zip(bads, runs):
        assert r_bad.returncode == 2 and "usage: nsfw-dask score [OPTIONS] INPUT OUTPUT" in r_bad.stderr, bad
        assert len(r_bad.stderr.strip().splitlines()) == 1, r_bad.stderr
        assert r_bad.stderr.startswith("nsfw-dask: error: "), r_bad.stderr
    assert r.returncode == 2 and "already has a column 'id'" in r.stderr
    assert not (tmp_path / "o").exists()


def test_demo_main_job(tmp_path, shared):
    out = tmp_path / "demo"
    other = tmp_path / "user"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    # the demo with its own cluster, and (independent, at the same time) one refused a user's folder
    r, refused = run_clis(
        ["demo", "--rows", "3000", "--file-rows", "1000", "--out", str(out), *CLUSTER],
        ["demo", "--rows", "3000", "--out", str(other), *CLUSTER],
    )
    assert r.returncode == 0, r.stderr
    assert "rows scored      3,000" in r.stdout and "score >= 0.5" in r.stdout
    got = read_output(out / "scored")
    assert list(got.columns) == ["row_number", "url", "caption", "key", "nsfw_score", "is_nsfw"]
    np.testing.assert_array_equal(got["row_number"].to_numpy(), np.arange(3000))
    assert (out / "score_histogram.png").stat().st_size > 0
    r = run_cli("demo", "--rows", "3000", "--out", str(out), *shared)  # rerun into its own folder: fine
    assert r.returncode == 0, r.stderr
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert (other / "mine.txt").read_text() == "x"
