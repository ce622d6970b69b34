"""The main job (`score_dataset`, `nsfw-dask score`): layout, commit protocol, resume, summary.

Most cases call ``score_dataset`` on one module-wide 2-process LocalCluster (workers start once);
the CLI-only behaviour (signals, --json, one-line errors) runs whole ``nsfw-dask`` processes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from nsfw_dask import NSFWScorer
from nsfw_dask.exceptions import EmbeddingFormatError
from nsfw_dask.pipeline import (
    HIST_BINS,
    JOB_FILE,
    SUCCESS_FILE,
    JobError,
    histogram,
    quantiles_from_histogram,
    score_dataset,
)

from _cli import run_concurrently

pytestmark = pytest.mark.weights

#: The CLI's own cluster, for the runs about it and the runs that fail before a cluster starts;
#: other CLI runs use the session's cluster (``shared``, 1 worker x 1 thread, conftest.py).
CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--no-progress"]


@pytest.fixture()
def shared(shared_scheduler: str) -> list[str]:
    return ["--scheduler", shared_scheduler, "--no-progress"]


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as c,
    ):
        yield c


@pytest.fixture(scope="module")
def x16(l14_ref) -> np.ndarray:
    return l14_ref["inputs"].astype(np.float16)


@pytest.fixture(scope="module")
def expected16(x16) -> np.ndarray:
    return NSFWScorer(device="cpu")(x16.astype(np.float32)).numpy()


@pytest.fixture(scope="module")
def expected(l14_ref) -> np.ndarray:
    return NSFWScorer(device="cpu")(l14_ref["inputs"]).numpy()


def make_npy(root: Path, x: np.ndarray, sizes: list[int], extra: dict | None = None) -> Path:
    """A LAION parquet_npy folder: img_emb/img_emb_N.npy + metadata/metadata_N.parquet (url, caption, key)."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    start = 0
    for i, n in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[start : start + n])
        keys = [f"{j:09d}" for j in range(start, start + n)]
        cols = {"url": [f"https://e.org/{k}.jpg" for k in keys], "caption": [f"c{k}" for k in keys], "key": keys}
        cols.update({k: v[start : start + n] for k, v in (extra or {}).items()})
        pq.write_table(pa.table(cols), root / "metadata" / f"metadata_{i}.parquet", row_group_size=500)
        start += n
    return root


def make_parquet(folder: Path, x: np.ndarray, sizes: list[int], index: bool = False) -> Path:
    """parquet files with url (string), id (int64) and a list<float32> embedding column."""
    folder.mkdir(parents=True)
    start = 0
    for i, n in enumerate(sizes):
        dim = x.shape[1]
        lists = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(x[start : start + n].reshape(-1))
        )
        df = pd.DataFrame(
            {
                "url": pd.array([f"u{j}" for j in range(start, start + n)], dtype=pd.ArrowDtype(pa.string())),
                "id": np.arange(start, start + n) * 3,
                "embedding": pd.arrays.ArrowExtensionArray(lists),
            }
        )
        if index:
            df.index = pd.Index([f"img-{j:05d}" for j in range(start, start + n)], name="key")
        df.to_parquet(folder / f"part{i}.parquet", row_group_size=400)
        start += n
    return folder


def parts(out: Path) -> list[Path]:
    return sorted(out.glob("part.*.parquet"))


def read(out: Path) -> pd.DataFrame:
    assert (out / SUCCESS_FILE).is_file()
    return pd.concat([pd.read_parquet(p) for p in parts(out)], ignore_index=True)


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsfw_dask", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        **kw,
    )


def run_clis(*args: list[str]) -> list[subprocess.CompletedProcess]:
    """Independent CLI runs, two at a time (``_cli.run_concurrently``), in the given order."""
    cmds = [[sys.executable, "-m", "nsfw_dask", *a] for a in args]
    return run_concurrently(*cmds, env=dict(os.environ), timeout=300)


def one_line_error(r: subprocess.CompletedProcess, code: int = 1) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsfw-dask: error:"), r.stderr
    return lines[0]


# ----------------------------------------------------------------------------- layout


def test_parquet_npy_layout_scores_and_order(tmp_path, client, x16, expected16):
    src = make_npy(tmp_path / "laion", x16, [1000, 1692])
    out = tmp_path / "out"
    s = score_dataset(src, out, client=client, threshold=0.5, rows_per_partition=600)
    # one part per input partition, named by order and source; partitions never span files
    assert [p.name for p in parts(out)] == [
        "part.000000.metadata_0.parquet",
        "part.000001.metadata_0.parquet",
        "part.000002.metadata_1.parquet",
        "part.000003.metadata_1.parquet",
        "part.000004.metadata_1.parquet",
        "part.000005.metadata_1.parquet",
    ]  # row groups of 500 are not merged past 600 rows
    assert sorted(p.name for p in out.iterdir()) == sorted([JOB_FILE, SUCCESS_FILE] + [p.name for p in parts(out)])
    got = read(out)
    assert list(got.columns) == ["row_number", "url", "caption", "key", "nsfw_score", "is_nsfw"]
    np.testing.assert_array_equal(got["row_number"].to_numpy(), np.arange(2692))
    assert got["key"].tolist() == [f"{j:09d}" for j in range(2692)]
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected16, rtol=0, atol=1e-6)
    assert str(got["nsfw_score"].dtype) == "float32" and str(got["is_nsfw"].dtype) == "boolean"
    np.testing.assert_array_equal(got["is_nsfw"].to_numpy(bool), got["nsfw_score"].to_numpy() >= 0.5)
    assert (s.rows, s.rows_written, s.partitions, s.partitions_reused) == (2692, 2692, 6, 0)
    assert s.over_threshold == int((expected16 >= 0.5).sum()) and s.nan_scores == 0
    job = json.loads((out / JOB_FILE).read_text())
    assert job["input_kind"] == "parquet_npy" and len(job["input_files"]) == 4
    assert all({"path", "size", "version"} <= set(f) for f in job["input_files"])
    assert job["options"]["threshold"] == 0.5 and job["version"]
    done = json.loads((out / SUCCESS_FILE).read_text())
    assert done["rows"] == 2692 and done["partitions"] == 6


def test_default_output_reads_back_with_plain_readers(tmp_path, client, l14_ref, expected):
    """pandas, pyarrow and dask read OUTPUT without options: no list columns, no dask index
    column, a unique index, strings stay `string` (issue: output that reads back badly)."""
    src = make_parquet(tmp_path / "in", l14_ref["inputs"], [1300, 1392])
    out = tmp_path / "out"
    score_dataset(src, out, client=client, threshold=0.5)
    df = pd.read_parquet(out)
    assert list(df.columns) == ["url", "id", "nsfw_score", "is_nsfw"]
    assert df.index.is_unique and len(df) == 2692 and "__null_dask_index__" not in df.columns
    np.testing.assert_array_equal(df["id"].to_numpy(), np.arange(2692) * 3)
    np.testing.assert_allclose(df["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert str(df["is_nsfw"].dtype) == "boolean"
    t = pads.dataset(out, format="parquet").to_table()
    assert t.schema.field("url").type == pa.string() and t.schema.field("nsfw_score").type == pa.float32()
    assert t.num_rows == 2692
    ddf = dd.read_parquet(str(out))
    assert list(ddf.columns) == ["url", "id", "nsfw_score", "is_nsfw"] and len(ddf.compute()) == 2692
    assert pd.read_parquet(out, columns=["nsfw_score"]).shape == (2692, 1)


def test_parquet_input_keeps_its_own_index(tmp_path, client, l14_ref, expected):
    src = make_parquet(tmp_path / "in", l14_ref["inputs"], [1000, 1692], index=True)
    out = tmp_path / "out"
    score_dataset(src, out, client=client, rows_per_partition=700)
    df = pd.read_parquet(out)
    assert df.index.name == "key" and list(df.index) == [f"img-{j:05d}" for j in range(2692)]
    assert list(df.columns) == ["url", "id", "nsfw_score"]
    np.testing.assert_allclose(df["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("form", ["binary", "list"])
def test_keep_embeddings(tmp_path, client, x16, expected16, form):
    src = make_npy(tmp_path / "laion", x16[:900], [500, 400])
    out = tmp_path / "out"
    score_dataset(src, out, client=client, keep_embeddings=form)
    t = pads.dataset(out, format="parquet").to_table()
    col = t.column("embedding").combine_chunks()
    if form == "binary":
        assert col.type == pa.binary(768 * 2)
        meta = json.loads(t.schema.field("embedding").metadata[b"nsfw_dask.embedding"])
        assert meta["dtype"] == "float16"
        back = np.frombuffer(col.buffers()[1], dtype=np.float16)[col.offset * 768 :].reshape(-1, 768)
    else:
        assert col.type == pa.list_(pa.float16(), 768)
        back = col.flatten().to_numpy().reshape(-1, 768)
    np.testing.assert_array_equal(back.view(np.uint16), x16[:900].view(np.uint16))  # bit for bit
    np.testing.assert_allclose(t.column("nsfw_score").to_numpy(), expected16[:900], rtol=0, atol=1e-6)


def test_filter_and_nan_rows(tmp_path, client, l14_ref, expected):
    x = l14_ref["inputs"][:300]
    rows = [list(r) for r in x]
    rows[3] = rows[17] = None
    pq.write_table(
        pa.table({"id": np.arange(300), "embedding": pa.array(rows, type=pa.list_(pa.float32()))}),
        tmp_path / "in.parquet",
    )
    s = score_dataset(tmp_path / "in.parquet", tmp_path / "all", client=client, threshold=0.5)
    got = read(tmp_path / "all")
    assert s.nan_scores == 2 and got["is_nsfw"].isna().to_numpy().nonzero()[0].tolist() == [3, 17]
    s = score_dataset(tmp_path / "in.parquet", tmp_path / "safe", client=client, filter="keep-safe")
    keep = expected[:300] < 0.5
    keep[[3, 17]] = False
    assert s.rows == 300 and s.rows_written == int(keep.sum())
    assert read(tmp_path / "safe")["id"].tolist() == np.arange(300)[keep].tolist()


# ----------------------------------------------------------------------------- commit and resume


def test_existing_output_refused_without_resume_and_resume_reuses(tmp_path, client, x16):
    src = make_npy(tmp_path / "laion", x16[:1200], [600, 600])
    out = tmp_path / "out"
    score_dataset(src, out, client=client, rows_per_partition=300)
    first = {p.name: p.read_bytes() for p in parts(out)}
    with pytest.raises(JobError, match=r"pass resume=True to finish it") as e:  # Python: the keyword
        score_dataset(src, out, client=client, rows_per_partition=300)
    assert e.value.code == 2
    # a killed run: two parts lost, one stale temporary, no _SUCCESS
    for p in parts(out)[1:3]:
        p.unlink()
    (out / SUCCESS_FILE).unlink()
    (out / ".part.000001.metadata_0.parquet.tmp-host-1-0123abcd").write_bytes(b"partial")
    s = score_dataset(src, out, client=client, rows_per_partition=300, resume=True)
    assert (s.partitions, s.partitions_reused, s.rows) == (6, 4, 1200)
    assert {p.name: p.read_bytes() for p in parts(out)} == first  # identical to the uninterrupted run
    assert (out / SUCCESS_FILE).exists() and not [p for p in out.iterdir() if p.name.startswith(".")]
    # a damaged part is scored again, not reused
    p0 = parts(out)[0]
    p0.write_bytes(p0.read_bytes()[:-100])
    s = score_dataset(src, out, client=client, rows_per_partition=300, resume=True)
    assert s.partitions_reused == 5 and p0.read_bytes() == first[p0.name]


STAGES = ("read_s", "metadata_s", "score_s", "build_s", "write_s")


def check_stages(stages: dict, compute_seconds: float, threads: int, *, metadata: bool) -> None:
    """The job's own account of where its time went: every stage present, non-negative, their
    sum ``task_s``, no more thread time than the cluster had while the parts ran."""
    assert set(stages) == {*STAGES, "task_s"}, stages
    assert all(isinstance(v, float) and v >= 0 for v in stages.values()), stages
    assert stages["task_s"] == pytest.approx(sum(stages[k] for k in STAGES), rel=1e-9, abs=1e-9)
    for k in ("read_s", "score_s", "build_s", "write_s"):  # every scored part went through each
        assert stages[k] > 0, (k, stages)
    assert (stages["metadata_s"] > 0) is metadata, stages  # parquet_npy only: parquet reads it all at once
    assert threads >= 1 and 0 < stages["task_s"] <= threads * compute_seconds * 1.01 + 0.05, (
        stages,
        threads,
        compute_seconds,
    )


def test_summary_says_where_the_time_went(tmp_path, client, l14_ref):
    """Per-part stage times summed on the client, with the cluster's threads (the most parts in
    flight); a resumed run counts only the parts it scored."""
    src = make_parquet(tmp_path / "in", l14_ref["inputs"][:1200], [600, 600])
    out = tmp_path / "out"
    s = score_dataset(src, out, client=client, rows_per_partition=300)
    assert (s.partitions, s.workers, s.threads) == (6, 2, 2)  # the module's 2 x 1 cluster
    check_stages(s.stages, s.compute_seconds, s.threads, metadata=False)
    d = s.to_dict()
    assert d["stages"] == s.stages and (d["workers"], d["threads"]) == (2, 2)
    json.dumps(d)  # what --json prints
    parts(out)[1].unlink()
    (out / SUCCESS_FILE).unlink()
    r = score_dataset(src, out, client=client, rows_per_partition=300, resume=True)
    assert r.partitions_reused == 5
    check_stages(r.stages, r.compute_seconds, r.threads, metadata=False)
    done = score_dataset(src, tmp_path / "out2", client=client, rows_per_partition=300)
    (tmp_path / "out2" / SUCCESS_FILE).unlink()
    again = score_dataset(src, tmp_path / "out2", client=client, rows_per_partition=300, resume=True)
    assert again.partitions_reused == 6 and done.partitions_reused == 0
    assert set(again.stages.values()) == {0.0} and (again.workers, again.threads) == (0, 0)


def test_resume_refused_when_options_or_input_differ(tmp_path, client, x16):
    src = make_npy(tmp_path / "laion", x16[:600], [600])
    out = tmp_path / "out"
    score_dataset(src, out, client=client)
    with pytest.raises(JobError, match=r"threshold was None, now 0\.3"):
        score_dataset(src, out, client=client, threshold=0.3, resume=True)
    with pytest.raises(JobError, match="score_column was 'nsfw_score', now 's'"):
        score_dataset(src, out, client=client, resume=True, score_column="s")
    np.save(src / "img_emb" / "img_emb_0.npy", x16[600:1200])  # same size, new content
    os.utime(src / "img_emb" / "img_emb_0.npy", ns=(1, 1))
    with pytest.raises(JobError, match="changed since"):
        score_dataset(src, out, client=client, resume=True)
    assert (out / SUCCESS_FILE).exists()  # a refused resume touches nothing


def test_overwrite_removes_success_first(tmp_path, client, l14_ref):
    """An --overwrite run that fails half-way never leaves the old _SUCCESS beside new parts."""
    x = l14_ref["inputs"][:400]
    good = make_parquet(tmp_path / "good", x, [200, 200])
    out = tmp_path / "out"
    score_dataset(good, out, client=client)
    assert (out / SUCCESS_FILE).exists()
    rows = [list(r) for r in x]
    rows[300] = rows[300][:700]
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        pq.write_table(
            pa.table(
                {
                    "url": [f"u{j}" for j in range(i * 200, i * 200 + 200)],
                    "embedding": pa.array(rows[i * 200 : i * 200 + 200], type=pa.list_(pa.float32())),
                }
            ),
            bad / f"part{i}.parquet",
        )
    with pytest.raises(EmbeddingFormatError, match="part1.parquet"):
        score_dataset(bad, out, client=client, overwrite=True)
    assert not (out / SUCCESS_FILE).exists()
    # the old run's content is gone either way; the new job file stays only if the failed run
    # committed a part first (part0 may finish before part1 fails, or not: two workers), since a
    # run that committed nothing removes what it created (issue 20.4)
    # a task still running when the job failed (two workers) finishes in the background: its
    # commit is refused (the lease is closing, then gone) and it removes its own temporary
    deadline = time.time() + 60
    while out.exists() and any(p.name.startswith(".part") for p in out.iterdir()) and time.time() < deadline:
        time.sleep(0.1)
    names = {p.name for p in out.iterdir()} if out.exists() else set()
    assert names <= {JOB_FILE, "part.000000.part0.parquet"}, names
    if "part.000000.part0.parquet" in names:
        assert json.loads((out / JOB_FILE).read_text())["input"] == str(bad)
    else:
        assert JOB_FILE not in names


def test_partition_plan(tmp_path, x16):
    from nsfw_dask import pipeline

    src = make_npy(tmp_path / "laion", x16[:1300], [300, 1000])
    plan = pipeline.plan_input(src, rows_per_partition=400)
    # row groups of 500 > 400 rows: each is cut in two equal halves
    assert [(p.start, p.stop, p.offset) for p in plan.parts] == [
        (0, 300, 0),
        (0, 250, 300),
        (250, 500, 300),
        (500, 750, 300),
        (750, 1000, 300),
    ]
    assert pipeline._split(1000, [400, 400, 200], 500) == [(0, 400), (400, 800), (800, 1000)]
    assert pipeline._split(1000, [1000], 300) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert pipeline._split(0, [], 300) == []
    assert pipeline._split(1000, [100] * 10, 250) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]


# ----------------------------------------------------------------------------- summary


def test_quantiles_exact_to_the_bin():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.random(5000) ** 6, rng.random(300), 1 - rng.random(700) ** 4]).astype(np.float32)
    v[:40] = 3e-6
    h = histogram(np.concatenate([v, [np.nan, np.nan]]))
    assert h.sum() == len(v) and len(h) == HIST_BINS
    qs = quantiles_from_histogram(h, (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999))
    for q, got in zip((0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999), qs.values()):
        true = float(np.quantile(v.astype(np.float64), q, method="inverted_cdf"))
        last = got == 1 - 1 / HIST_BINS  # the last bin is closed: [0.9999, 1]
        assert got <= true and (true < got + 1 / HIST_BINS or (last and true <= 1)), (q, got, true)
    assert quantiles_from_histogram(np.zeros(HIST_BINS, np.int64))["p50"] is None


# ----------------------------------------------------------------------------- the CLI


def test_cli_json_and_human_summary(tmp_path, x16, shared):
    src = make_npy(tmp_path / "laion", x16[:800], [800])
    r = run_cli("score", str(src), str(tmp_path / "out"), "--json", "--threshold", "0.5", *shared)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert {"rows", "rows_written", "partitions", "partitions_reused", "seconds", "rows_per_s", "output"} <= set(s)
    assert (s["rows"], s["rows_written"], s["partitions"], s["output"]) == (800, 800, 1, str(tmp_path / "out"))
    r = run_cli("score", str(src), str(tmp_path / "out"), "--resume", "--threshold", "0.5", *shared)
    assert r.returncode == 0, r.stderr
    assert "parts            1 (1 reused)" in r.stdout and "score quantiles  p01" in r.stdout


def test_cli_json_reports_the_stages_of_the_tasks(tmp_path, x16, shared):
    """``--json`` gives the stages (read, metadata, score, build, write, their sum) summed over
    the parts, the workers and threads they ran on; the human summary prints them on one line."""
    src = make_npy(tmp_path / "laion", x16[:1500], [900, 600])
    r = run_cli("score", str(src), str(tmp_path / "out"), "--json", "--rows-per-partition", "500", *shared)
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert (s["rows"], s["partitions"], s["workers"], s["threads"]) == (1500, 4, 1, 1)  # the shared 1 x 1
    check_stages(s["stages"], s["compute_seconds"], s["threads"], metadata=True)
    r = run_cli("score", str(src), str(tmp_path / "out"), "--overwrite", *shared)
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("time per stage")]
    assert len(line) == 1, r.stdout
    assert re.fullmatch(
        r"time per stage   read [\d.]+ s, metadata [\d.]+ s, score [\d.]+ s, build [\d.]+ s, write [\d.]+ s  "
        r"\(summed over the parts; 1 thread\(s\) on 1 worker\(s\), busy \d+%\)",
        line[0],
    ), line[0]


def test_cli_sigkill_of_the_process_group_then_resume(tmp_path, l14_ref, expected, shared):
    # 2 files of 1,346 rows, row groups of 400 cut in two: 14 parts of at most 200 rows
    x = l14_ref["inputs"]
    src = make_parquet(tmp_path / "in", x, [1346, 1346])
    out = tmp_path / "out"
    args = ["score", str(src), str(out), "--batch-size", "1", "--rows-per-partition", "200"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nsfw_dask", *args, *CLUSTER],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and len(parts(out) if out.exists() else []) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=30)
    committed = len(parts(out))
    assert 2 <= committed < 14 and not (out / SUCCESS_FILE).exists()
    r = run_cli(*args, *CLUSTER)
    assert "--resume" in one_line_error(r, 2)
    r = run_cli(*args, "--resume", "--json", *shared)  # the killed run's cluster is gone: any will do
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["partitions"] == 14 and s["partitions_reused"] >= committed - 1 > 0
    got = read(out)
    np.testing.assert_array_equal(got["id"].to_numpy(), np.arange(len(x)) * 3)
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_cli_glob_and_file_url_overlap_never_deletes_input(tmp_path, l14_ref):
    data = make_parquet(tmp_path / "g2", l14_ref["inputs"][:200], [100, 100])
    before = {p.name: p.read_bytes() for p in data.iterdir()}
    link = tmp_path / "link"
    link.symlink_to(data)
    cases = (
        [str(data / "*.parquet"), str(data), "--overwrite", "--filter", "keep-safe"],
        [f"file://{data}", str(data), "--overwrite"],
        [str(data / "*.parquet"), str(data)],
        [str(data), f"file://{data}/sub", "--overwrite"],
    )
    *runs, r_link = run_clis(
        *(["score", *args, *CLUSTER] for args in cases), ["score", str(data), str(link), "--overwrite", *CLUSTER]
    )
    for args, r in zip(cases, runs):
        line = one_line_error(r, 2)
        assert "overlaps INPUT" in line and "--overwrite" not in line.replace("never", ""), (args, line)
    assert {p.name: p.read_bytes() for p in data.iterdir()} == before
    line = one_line_error(r_link, 2)
    assert "overlaps INPUT" in line


def test_cli_tilde_is_expanded_everywhere(tmp_path, x16):
    home = tmp_path / "home"
    make_npy(home / "in", x16[:300], [300])
    r = run_cli("score", "~/in", "~/scored/deep", *CLUSTER, env={"HOME": str(home)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (home / "scored" / "deep" / SUCCESS_FILE).exists() and not (tmp_path / "~").exists()


def test_cli_score_column_clashes(tmp_path, x16):
    src = make_npy(tmp_path / "laion", x16[:100], [100], extra={"is_nsfw": np.zeros(300, bool)})
    src2 = make_npy(tmp_path / "l2", x16[:100], [100])
    o = str(tmp_path / "o")
    r1, r2, r3, *empty = run_clis(
        ["score", str(src), o, "--threshold", "0.5", *CLUSTER],
        ["score", str(src), o, "--score-column", "is_nsfw", *CLUSTER],
        ["score", str(src2), o, "--score-column", "is_nsfw", "--threshold", "0.5", *CLUSTER],
        *(["score", str(src2), o, "--score-column", bad, *CLUSTER] for bad in ("", "  ")),
    )
    line = one_line_error(r1, 2)
    assert "'is_nsfw'" in line and "--threshold" in line and "--score-column" not in line
    line = one_line_error(r2, 2)
    assert "'is_nsfw'" in line
    line = one_line_error(r3, 2)
    assert "clashes" in line
    for r in empty:
        assert r.returncode == 2 and "cannot be empty" in r.stderr
    assert not (tmp_path / "o").exists()


def test_cli_errors_are_one_line_before_the_cluster(tmp_path, l14_ref, x16):
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero.parquet").write_bytes(b"")
    good = make_parquet(tmp_path / "good", l14_ref["inputs"][:50], [50])
    (tmp_path / "trunc.parquet").write_bytes((good / "part0.parquet").read_bytes()[:3000])
    (tmp_path / "text.parquet").write_text("id,embedding\n1,2\n")
    npy = make_npy(tmp_path / "laion", x16[:100], [100])
    b32 = make_npy(tmp_path / "b32", np.zeros((130, 512), np.float16), [130])
    cases = [
        ([str(tmp_path / "nothing" / "*.parquet")], "matches no files"),
        ([str(tmp_path / "empty")], "has no parquet files"),
        ([str(tmp_path / "zero.parquet")], "zero.parquet is empty (0 bytes)"),
        ([str(tmp_path / "trunc.parquet")], "trunc.parquet is not a readable parquet file"),
        ([str(tmp_path / "text.parquet")], "text.parquet is not a readable parquet file"),
        ([str(npy / "img_emb" / "img_emb_0.npy")], "pass the parquet_npy folder"),
        ([str(good), "--column", "id"], "Column 'id' in"),
        ([str(b32)], "img_emb_0.npy holds 512-d embeddings; the vit-l-14 head expects 768"),
        ([str(good), "--model", "vit-b-32"], "--model vit-l-14"),
    ]
    # each case its own OUTPUT, two runs at a time (each run's own time is measured)
    runs = run_clis(
        *(["score", args[0], str(tmp_path / f"o{i}"), *args[1:], *CLUSTER] for i, (args, _) in enumerate(cases))
    )
    for i, ((args, text), r) in enumerate(zip(cases, runs)):
        line = one_line_error(r, 2 if "npy folder" in text else 1)
        assert text in line, (args, line)
        assert "An error occurred while calling" not in r.stderr and "model=" not in line
        assert "model_dir=" not in line
        assert not (tmp_path / f"o{i}").exists()
        if "--model" not in args:
            assert r.seconds < 30, ("the error came after a cluster started", args, r.seconds)


def test_cli_parquet_npy_metadata_with_an_embedding_column(tmp_path, x16, expected16, shared):
    src = make_npy(tmp_path / "laion", x16[:200], [200], extra={"embedding": [f"text-{i}" for i in range(200)]})
    line = one_line_error(run_cli("score", str(src), str(tmp_path / "o"), *CLUSTER), 2)
    assert "already has a column 'embedding'" in line and "--column" in line
    r = run_cli("score", str(src), str(tmp_path / "o"), "--column", "clip", "--json", *shared)
    assert r.returncode == 0, r.stderr
    got = read(tmp_path / "o")
    assert list(got.columns) == ["row_number", "url", "caption", "key", "embedding", "nsfw_score"]
    assert got["embedding"].tolist()[:2] == ["text-0", "text-1"]
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), expected16[:200], rtol=0, atol=1e-6)


def test_cli_wrong_width_rows_name_the_file_and_its_row(tmp_path, l14_ref, shared):
    x = l14_ref["inputs"][:200]
    rows = [list(r) for r in x]
    for k in (103, 150):
        rows[k] = rows[k][:767]
    folder = tmp_path / "in"
    folder.mkdir()
    pq.write_table(pa.table({"embedding": pa.array(rows[:100], type=pa.list_(pa.float32()))}), folder / "a.parquet")
    pq.write_table(pa.table({"embedding": pa.array(rows[100:], type=pa.list_(pa.float32()))}), folder / "b.parquet")
    out = tmp_path / "o"
    line = one_line_error(run_cli("score", str(folder), str(out), *shared))
    assert "b.parquet" in line and "row 3 has 767 values" in line and "2 rows have a wrong length" in line, line
    assert not (out / SUCCESS_FILE).exists()  # a.parquet's part may be committed (resumable), never finished
    # a failed run that committed nothing leaves none of the folders it made
    (folder / "a.parquet").unlink()
    line = one_line_error(run_cli("score", str(folder), str(tmp_path / "deep" / "er" / "o"), *shared))
    assert "b.parquet" in line
    assert not (tmp_path / "deep").exists()


def test_cli_zero_rows(tmp_path, shared):
    pq.write_table(
        pa.table({"id": pa.array([], pa.int64()), "embedding": pa.array([], pa.list_(pa.float32()))}),
        tmp_path / "z.parquet",
    )
    r = run_cli("score", str(tmp_path / "z.parquet"), str(tmp_path / "o"), *shared)
    assert r.returncode == 0, r.stderr
    assert "score quantiles  (no scores" in r.stdout and "rows scored      0" in r.stdout
    assert pd.read_parquet(tmp_path / "o").shape == (0, 2)


def test_library_error_for_bad_rows_names_the_file(tmp_path, client, l14_ref):
    x = l14_ref["inputs"][:100]
    rows = [list(r) for r in x]
    rows[7] = None
    rows[9] = rows[9][:10]
    pq.write_table(pa.table({"embedding": pa.array(rows, type=pa.list_(pa.float32()))}), tmp_path / "a.parquet")
    with pytest.raises(EmbeddingFormatError, match=r"a\.parquet, rows 0-99 of that file .*row 9 has 10 values"):
        score_dataset(tmp_path / "a.parquet", tmp_path / "o", client=client)


@pytest.mark.parametrize(
    "given, n_cpu, expected",
    [
        ((None, None), 1, (1, 1)),
        ((None, None), 2, (1, 2)),
        ((None, None), 4, (1, 4)),
        ((None, None), 6, (2, 3)),
        ((None, None), 8, (2, 4)),
        ((None, None), 64, (16, 4)),
        ((2, None), 2, (2, 1)),
        ((3, None), 8, (3, 2)),
        ((None, 1), 2, (2, 1)),
        ((None, 3), 2, (1, 3)),
        ((5, 7), 2, (5, 7)),
    ],
)
def test_default_cluster_shape(given, n_cpu, expected):
    """The CPU cluster the job starts: what is given wins, the rest fills the cores with
    workers of at most 4 threads (every core used, never more than one thread short)."""
    from nsfw_dask.pipeline import default_cluster_shape

    workers, threads = default_cluster_shape(*given, n_cpu=n_cpu)
    assert (workers, threads) == expected
    if given == (None, None):
        assert threads <= 4 and workers * threads >= n_cpu > (workers - 1) * threads


def test_gpu_workers_beyond_visible_gpus_refused_before_output(tmp_path, x16, monkeypatch):
    """--gpu --workers N with N above the visible GPUs: a one-line usage error (code 2) from the
    client, before the OUTPUT folder exists (the count is faked: no GPU here)."""
    import distributed

    import nsfw_dask.gpu as gpu

    monkeypatch.setattr(gpu, "_visible_gpus", lambda: 1)

    def no_client():
        raise ValueError("No clients found")  # as with no Client: the job would start its own cluster

    monkeypatch.setattr(distributed, "default_client", no_client)
    src = make_npy(tmp_path / "in", x16, [300])
    out = tmp_path / "out"
    with pytest.raises(JobError) as e:
        score_dataset(src, out, gpu=True, n_workers=2, progress=False)
    assert e.value.code == 2
    msg = str(e.value)
    assert "\n" not in msg and "2 GPU workers" in msg and "n_workers=1" in msg
    assert not out.exists()
