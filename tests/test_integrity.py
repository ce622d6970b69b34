"""A finished OUTPUT is one run (issue 20, items 2-4): one live run per OUTPUT, inputs that
change during a run, a disk that fills.

Where the behaviour is about processes (two runs at once, a file replaced during a run, a run
that meets a full disk) whole ``python -m nsfw_dask score`` processes run on LAION's weights.  A
run is held still mid-run, without sleeps or test hooks, by suspending its Dask worker processes
(SIGSTOP) once it has committed a part: its client keeps its lease alive meanwhile, as in a long
run.  The full disk is a real 1 MB tmpfs (``mount -t tmpfs``, root only: skipped with the
reason elsewhere).  The lease protocol itself runs in-process on the synthetic head, on a local
folder and on the local S3 endpoint (``tests/_s3.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsfw_dask import JobError, score_dataset

from _cli import run_concurrently
from _frames import unit_vectors
from _s3 import s3, s3_endpoint  # noqa: F401  (fixtures)

JOB, SUCCESS, LEASE = "_nsfw_dask_job.json", "_SUCCESS", "_nsfw_dask_lease.json"
CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--no-progress"]
ROWS = 200  # rows per row group and per part


# ----------------------------------------------------------------------------- helpers


def write_parquet(path: Path, x: np.ndarray, first_id: int) -> Path:
    """``id`` and a ``list<float32>`` embedding column, row groups of ``ROWS``."""
    n, dim = x.shape
    lists = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32)), pa.array(x.astype(np.float32).reshape(-1))
    )
    pq.write_table(pa.table({"id": np.arange(first_id, first_id + n), "embedding": lists}), path, row_group_size=ROWS)
    return path


def folder(root: Path, x: np.ndarray, sizes: list[int], names: str = "abcdefgh") -> Path:
    """Files ``a.parquet``, ``b.parquet``, ... with ids 0.. in input order."""
    root.mkdir(parents=True)
    start = 0
    for name, n in zip(names, sizes):
        write_parquet(root / f"{name}.parquet", x[start : start + n], start)
        start += n
    return root


def names(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()} if out.exists() else set()


def committed(out: Path) -> list[str]:
    return sorted(n for n in names(out) if n.startswith("part."))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nsfw_dask", "score", *args]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsfw-dask: error: "), r.stderr
    return lines[0]


def wait_for(cond: Callable[[], object], proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run exited ({proc.returncode}) before {what}: {proc.communicate()}")
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@contextlib.contextmanager
def workers_suspended(proc: subprocess.Popen) -> Iterator[None]:
    """SIGSTOP every process the CLI started (its Dask nanny and worker), not the CLI itself:
    the run stands still mid-run while its client keeps its lease alive; SIGCONT afterwards."""
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children, "the CLI has no worker process"
    for c in children:
        c.suspend()
    # SIGSTOP takes effect when a process next returns to user space: a rename (a part's commit)
    # in flight completes first.  Wait until each one is stopped, then nothing more happens.
    deadline = time.monotonic() + 10
    for c in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            while c.status() != psutil.STATUS_STOPPED:
                assert time.monotonic() < deadline, f"{c.pid} did not stop"
                time.sleep(0.005)
    try:
        yield
    finally:
        for c in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                c.resume()


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def footer(path: Path) -> dict:
    return json.loads(pq.read_metadata(path).metadata[b"nsfw_dask.part"])


# ----------------------------------------------------------------------------- item 2: one live run per OUTPUT


@pytest.mark.weights
def test_a_second_run_into_a_live_output_is_refused_and_the_first_finishes(tmp_path, l14_ref):
    """Issue 20.2: run A (--threshold 0.5) is live; B with --overwrite and B with --resume into
    the same OUTPUT are refused with one line (exit 2) and touch nothing, not even A's
    temporaries; A finishes alone: every part has is_nsfw and names A's job, _SUCCESS and the job
    file name A's run, and the lease is gone.  (Before: both exited 0 and the parts were mixed.)"""
    x = l14_ref["inputs"][:1200]
    src = folder(tmp_path / "in", x, [600, 600])  # 6 parts
    out = tmp_path / "out"
    a = subprocess.Popen(
        cli(str(src), str(out), "--threshold", "0.5", "--rows-per-partition", str(ROWS), "--json", *CLUSTER),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: committed(out), a, "run A to commit a part")
        with workers_suspended(a):
            before = {n: (out / n).stat().st_ino for n in names(out) if n != LEASE}
            b_overwrite, b_resume = run_concurrently(
                cli(str(src), str(out), "--overwrite", "--rows-per-partition", str(ROWS), *CLUSTER),
                cli(str(src), str(out), "--resume", "--threshold", "0.5", "--rows-per-partition", str(ROWS), *CLUSTER),
                env=dict(os.environ),
                timeout=300,
            )
            for r in (b_overwrite, b_resume):
                line = one_line_error(r, 2)
                assert f"OUTPUT {out} is in use" in line and f"pid {a.pid}" in line, line
                assert "--resume" in line, line
            # nothing of A's was removed or replaced: parts, job file, temporaries
            assert {n: (out / n).stat().st_ino for n in names(out) if n != LEASE} == before
            lease = json.loads((out / LEASE).read_text())
            assert lease["pid"] == a.pid and lease["expires"] > time.time()
        r = finish(a)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["partitions"] == 6
    parts = committed(out)
    assert len(parts) == 6 and names(out) == {JOB, SUCCESS, *parts}  # no lease, no temporary
    job = json.loads((out / JOB).read_text())
    done = json.loads((out / SUCCESS).read_text())
    assert done["job_id"] == job["job_id"] and done["run"] == job["run"]
    assert {footer(out / p)["job"] for p in parts} == {job["job_id"]}
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "nsfw_score", "is_nsfw"] and df["is_nsfw"].notna().all()
    np.testing.assert_array_equal(df["id"].to_numpy(), np.arange(1200))
    np.testing.assert_allclose(df["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][:1200], rtol=0, atol=1e-5)


@pytest.mark.weights
def test_success_only_when_every_part_footer_names_this_job(tmp_path, l14_ref, shared_scheduler):
    """Issue 20.2: a part of another job that lands in OUTPUT during a run (here put there while
    the run's workers are held still) keeps the run from writing _SUCCESS: exit 1, one line
    naming the part; --resume scores that part again and finishes.  (Before: _SUCCESS checked
    part names and counts only.)"""
    x = l14_ref["inputs"][:800]
    src = folder(tmp_path / "in", x, [800])  # 4 parts
    out = tmp_path / "out"
    args = [str(src), str(out), "--rows-per-partition", str(ROWS)]
    a = subprocess.Popen(cli(*args, *CLUSTER), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: committed(out), a, "the run to commit a part")
        with workers_suspended(a):
            first = committed(out)[0]
            assert len(committed(out)) < 4
            # another job's part (it has is_nsfw, its footer another job id), put in place whole
            t = pq.read_table(out / first)
            info = footer(out / first)
            info["job"] = "0123456789abcdef"
            t = t.append_column("is_nsfw", pa.array(np.asarray(t["nsfw_score"]) >= 0.5))
            md = {**t.schema.metadata, b"nsfw_dask.part": json.dumps(info).encode()}
            pq.write_table(t.replace_schema_metadata(md), tmp_path / "foreign.parquet")
            os.replace(tmp_path / "foreign.parquet", out / first)
        r = finish(a)
    finally:
        if a.poll() is None:
            a.kill()
            a.communicate()
    line = one_line_error(r, 1)
    assert first in line and "not this job's" in line and "job 0123456789abcdef" in line and "--resume" in line, line
    assert SUCCESS not in names(out) and LEASE not in names(out)
    r = run(*args, "--resume", "--json", "--scheduler", shared_scheduler, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["partitions_reused"] == 3
    df = pd.read_parquet(out)
    assert list(df.columns) == ["id", "nsfw_score"]
    np.testing.assert_array_equal(df["id"].to_numpy(), np.arange(800))
    np.testing.assert_allclose(df["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][:800], rtol=0, atol=1e-5)


@pytest.fixture
def client(inprocess_client):
    return inprocess_client


def lease_record(host: str, *, heartbeat_ago: float, seconds: float = 60.0, machine: str | None = None, pid: int = 1):
    """A lease as another run writes it (the format of nsfw_dask._lease)."""
    hb = time.time() - heartbeat_ago
    return {
        "format": "nsfw-dask-lease/1",
        "run": "f" * 32,
        "job": "0123456789abcdef",
        "host": host,
        "machine": machine or f"{host}/boot/4026531836",
        "pid": pid,
        "started": 0.0,
        "acquired": "2026-12-01T00:00:00Z",
        "heartbeat": hb,
        "expires": hb + seconds,
        "seconds": seconds,
    }


def test_a_live_lease_of_another_host_refuses_every_run_until_it_expires(tmp_path, synthetic_model, client, caplog):
    """A lease written by a run on another host is honoured while live (a plain run, --resume
    and --overwrite are refused with one line naming that host and what to do, and nothing in
    OUTPUT changes) and taken over by --resume once its heartbeat is older than its expiry."""
    src = folder(tmp_path / "in", unit_vectors(1000), [600, 400])
    out = tmp_path / "out"
    kw = {"model": "synthetic", "client": client, "rows_per_partition": ROWS, "progress": False}
    score_dataset(src, out, **kw)
    (out / SUCCESS).unlink()
    (out / "part.000004.b.parquet").unlink()  # an unfinished run
    (out / LEASE).write_text(json.dumps(lease_record("elsewhere", heartbeat_ago=5)))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for mode in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(JobError) as e:
            score_dataset(src, out, **kw, **mode)
        msg = str(e.value)
        assert e.value.code == 2 and "\n" not in msg, msg
        assert f"OUTPUT {out} is in use" in msg and "host elsewhere, pid 1" in msg, msg
        # a Python caller is told the keyword (resume=True), the CLI the flag
        assert re.search(r"its lease expires in 5\d s .*then rerun with resume=True", msg), msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    (out / LEASE).write_text(json.dumps(lease_record("elsewhere", heartbeat_ago=61)))  # expired a second ago
    with caplog.at_level(logging.WARNING, logger="nsfw_dask"):
        s = score_dataset(src, out, resume=True, **kw)
    assert (s.partitions, s.partitions_reused) == (5, 4)
    assert "took over the stale lease" in caplog.text and "host elsewhere" in caplog.text
    assert LEASE not in names(out) and SUCCESS in names(out)


def test_a_dead_local_runs_lease_is_stale_at_once(tmp_path, synthetic_model, client):
    """A crashed run's lease never blocks --resume on its own machine: its pid is gone (here a
    process that exited), whatever the expiry says."""
    from nsfw_dask._lease import _machine

    src = folder(tmp_path / "in", unit_vectors(400), [400])
    out = tmp_path / "out"
    kw = {"model": "synthetic", "client": client, "rows_per_partition": ROWS, "progress": False}
    score_dataset(src, out, **kw)
    (out / SUCCESS).unlink()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    rec = lease_record("this-host", heartbeat_ago=0, seconds=3600, machine=_machine(), pid=dead.pid)
    (out / LEASE).write_text(json.dumps(rec))
    s = score_dataset(src, out, resume=True, **kw)
    assert s.partitions_reused == 2 and names(out) == {JOB, SUCCESS, *committed(out)}


def test_a_run_that_loses_its_lease_stops_and_leaves_the_new_holders_lease(tmp_path):
    """The heartbeat renews the lease; when another run's lease replaces it (a takeover after
    this run's heartbeats stopped), this run finds out at the next beat: check() raises, no part
    may be committed under it, and release() leaves the other run's lease in place."""
    import fsspec

    from nsfw_dask._lease import Lease, confirm_holder, read_lease

    fs, root = fsspec.filesystem("file"), str(tmp_path)
    a = Lease(fs, root, "job-a", root, seconds=0.6)  # a heartbeat every 0.1 s
    a.acquire()
    try:
        first = read_lease(fs, root)
        assert first["run"] == a.run and first["pid"] == os.getpid()
        deadline = time.monotonic() + 10
        while read_lease(fs, root)["heartbeat"] == first["heartbeat"]:
            assert time.monotonic() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        confirm_holder(fs, root, a.run, "part.000000.a.parquet")  # still ours: no error
        a.check(fresh=True)
        other = lease_record("elsewhere", heartbeat_ago=0)
        (tmp_path / LEASE).write_text(json.dumps(other))
        assert a.lost.wait(10), "the heartbeat did not notice"
        with pytest.raises(JobError, match="this run lost OUTPUT .*host elsewhere"):
            a.check()
        with pytest.raises(JobError, match=r"no longer holds OUTPUT .*part\.000000\.a\.parquet was not committed"):
            confirm_holder(fs, root, a.run, "part.000000.a.parquet")
    finally:
        a.release()
    assert read_lease(fs, root)["run"] == other["run"]


def test_s3_output_has_one_live_run_and_a_stale_lease_is_taken_over(s3, tmp_path, synthetic_model, client):
    """On an object store (no lock files): a live lease refuses a run; an expired one is taken
    over (written, read back); the lease is gone when the run is done."""
    src = folder(tmp_path / "in", unit_vectors(400), [400])
    out = s3.url("out")
    kw = {"model": "synthetic", "client": client, "rows_per_partition": ROWS, "progress": False}
    s3.fs.pipe(s3.url(f"out/{LEASE}"), json.dumps(lease_record("elsewhere", heartbeat_ago=1)).encode())
    with pytest.raises(JobError, match=f"OUTPUT {out} is in use: .*host elsewhere") as e:
        score_dataset(src, out, **kw)
    assert e.value.code == 2
    assert [p.rsplit("/", 1)[-1] for p in s3.fs.ls(out, detail=False)] == [LEASE]
    s3.fs.pipe(s3.url(f"out/{LEASE}"), json.dumps(lease_record("elsewhere", heartbeat_ago=120)).encode())
    s = score_dataset(src, out, **kw)
    assert s.rows == 400
    s3.fs.invalidate_cache()
    left = sorted(p.rsplit("/", 1)[-1] for p in s3.fs.ls(out, detail=False))
    assert left == sorted([JOB, SUCCESS, "part.000000.a.parquet", "part.000001.a.parquet"])
    with s3.fs.open(s3.url("out/part.000001.a.parquet"), "rb") as f:
        assert pq.read_table(f)["id"].to_pylist() == list(range(200, 400))


# ----------------------------------------------------------------------------- item 3: inputs changed mid-run


@pytest.mark.weights
def test_an_input_file_replaced_mid_run_fails_the_job_and_nothing_mixed_is_committed(tmp_path, l14_ref):
    """Issue 20.3: ``mv`` of a different file over b.parquet while the run is under way: exit 1,
    one line naming b.parquet and the fix; no _SUCCESS; every committed part holds the old file's
    rows, and no part of b is committed after the change.  (Before: exit 0, _SUCCESS, rows of
    both files.)"""
    x = l14_ref["inputs"]
    src = folder(tmp_path / "in", x[:1000], [200, 800])  # a: 1 part, b: 4 parts
    write_parquet(tmp_path / "new-b.parquet", x[1000:1800], 100_000)  # another file: same rows, other ids
    out = tmp_path / "out"
    proc = subprocess.Popen(
        cli(str(src), str(out), "--rows-per-partition", str(ROWS), *CLUSTER),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: any(".b." in n for n in committed(out)), proc, "a part of b.parquet to be committed")
        with workers_suspended(proc):
            before = committed(out)
            os.replace(tmp_path / "new-b.parquet", src / "b.parquet")  # mv
        r = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    line = one_line_error(r, 1)
    assert f"INPUT file {src / 'b.parquet'} changed while the job ran" in line, line
    assert "--resume" in line and "--overwrite" in line, line
    assert SUCCESS not in names(out) and LEASE not in names(out)
    after = committed(out)
    assert [n for n in after if ".b." in n] == [n for n in before if ".b." in n]  # none of b after the mv
    assert 1 <= len([n for n in after if ".b." in n]) < 4
    want = {f"part.{i:06d}.{'a' if i == 0 else 'b'}.parquet": range(i * ROWS, (i + 1) * ROWS) for i in range(5)}
    for n in after:
        t = pq.read_table(out / n)
        assert t["id"].to_pylist() == list(want[n]), n
        np.testing.assert_allclose(
            t["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][want[n].start : want[n].stop], rtol=0, atol=1e-5
        )


def test_a_task_refuses_a_file_replaced_with_the_same_size_and_mtime(tmp_path):
    """The planned inode (local) is checked too: a file with the same size and mtime put in place
    by a rename is another file, and the task says so before reading it."""
    from nsfw_dask._plan import plan_input
    from nsfw_dask._task import check_inputs

    src = folder(tmp_path / "in", unit_vectors(400), [400])
    plan = plan_input(src, rows_per_partition=ROWS)
    check_inputs(plan, plan.parts[0])  # unchanged: no error
    other = tmp_path / "other.parquet"
    shutil.copyfile(src / "a.parquet", other)  # same bytes even, but another file
    st = (src / "a.parquet").stat()
    os.utime(other, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(other, src / "a.parquet")
    with pytest.raises(JobError, match=r"a\.parquet changed while the job ran \(replaced by another file"):
        check_inputs(plan, plan.parts[1])
    (src / "a.parquet").unlink()
    with pytest.raises(JobError, match=r"a\.parquet changed while the job ran \(it is gone\)"):
        check_inputs(plan, plan.parts[0])


def test_s3_input_changed_mid_run_is_refused_by_its_etag(s3, tmp_path):
    """On an object store the plan keeps each input's ETag (and VersionId where the bucket has
    versions); a task compares them before reading."""
    from nsfw_dask._plan import plan_input
    from nsfw_dask._task import check_inputs

    data = write_parquet(tmp_path / "a.parquet", unit_vectors(400), 0).read_bytes()
    s3.fs.pipe(s3.url("in/a.parquet"), data)
    plan = plan_input(s3.url("in"), rows_per_partition=ROWS)
    check_inputs(plan, plan.parts[0])
    k = len(data) // 2
    s3.fs.pipe(s3.url("in/a.parquet"), data[:k] + bytes([data[k] ^ 1]) + data[k + 1 :])  # same size
    with pytest.raises(JobError, match=r"s3://.*/in/a\.parquet changed while the job ran \(mtime/ETag"):
        check_inputs(plan, plan.parts[1])


# ----------------------------------------------------------------------------- item 4: a full disk


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MB tmpfs (root only; elsewhere the test is skipped with the reason)."""
    d = tmp_path / "disk"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(
            f"cannot mount a 1 MB tmpfs here ({r.stderr.strip() or r.returncode}); the full-disk tests need root"
        )
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill(disk: Path, leave_pages: int) -> None:
    """Fill the tmpfs but ``leave_pages`` 4 KiB pages (tmpfs counts whole pages per file)."""
    filler = disk / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(disk)
    assert st.f_frsize == 4096
    with open(filler, "wb") as f:
        f.write(b"\0" * ((st.f_bavail - leave_pages) * 4096))
    assert os.statvfs(disk).f_bavail == leave_pages


def pages(paths: list[Path]) -> int:
    return sum(-(-p.stat().st_size // 4096) for p in paths)


@pytest.mark.weights
def test_a_disk_full_at_the_start_leaves_nothing_and_names_the_fix(tmp_path, small_disk, l14_ref, shared_scheduler):
    """Issue 20.4: OUTPUT on a full disk, whether the first write (the lease) or the job file
    fails, and whether OUTPUT is new or an existing empty folder: exit 1, one line naming the
    file, OUTPUT and the fix; nothing the run created is left.  After freeing space the same
    command runs (before: a 0-byte job temporary was left and the rerun was refused as "not
    written by nsfw-dask score")."""
    src = folder(tmp_path / "in", l14_ref["inputs"][:400], [400])
    out = small_disk / "out"
    args = [str(src), str(out), "--rows-per-partition", str(ROWS)]
    fill(small_disk, 0)
    r_lease = run(*args, *CLUSTER)
    fill(small_disk, 1)  # room for the lease, not for the job file
    r_job = run(*args, *CLUSTER)
    for r, name in ((r_lease, LEASE), (r_job, JOB)):
        line = one_line_error(r, 1)
        assert f"cannot write {out}/{name}: No space left on device (OUTPUT {out})" in line, line
        assert "Free space there" in line and "--resume" in line, line
        assert names(small_disk) == {"filler"}, names(small_disk)
    out.mkdir()  # an existing, empty OUTPUT stays, empty
    line = one_line_error(run(*args, *CLUSTER), 1)
    assert f"cannot write {out}/{JOB}: No space left on device" in line, line
    assert names(small_disk) == {"filler", "out"} and names(out) == set()
    (small_disk / "filler").unlink()
    r = run(*args, "--json", "--scheduler", shared_scheduler, "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 400 and names(out) == {JOB, SUCCESS, *committed(out)}


@pytest.mark.weights
def test_a_disk_that_fills_at_a_part_or_at_success_leaves_no_temporary_and_resume_finishes(
    tmp_path, small_disk, l14_ref, shared_scheduler
):
    """Issue 20.4: the disk fills while a worker writes a part (room for the lease, the job file
    and all parts but one page), or just when _SUCCESS is written (room for all of them; sizes
    measured from a first run): exit 1, one line naming that file, OUTPUT and the fix; no
    temporary (.part...tmp-*, ._SUCCESS.tmp-*) and no lease left, and no worker keeps a removed
    temporary open (before, the worker's failed write held it, and its space, as long as the
    erred task lived); the committed parts stay, and after freeing space --resume reuses them and
    finishes."""
    src = folder(tmp_path / "in", l14_ref["inputs"][:600], [600])  # 3 parts
    shared = ["--scheduler", shared_scheduler, "--no-progress"]
    env = {"NSFW_DASK_LEASE_SECONDS": "3600"}  # no heartbeat (it needs a page) during the runs
    ref = small_disk / "ref"
    r = run(str(src), str(ref), "--rows-per-partition", str(ROWS), *shared, env=env)
    assert r.returncode == 0, r.stderr
    need = pages([ref / n for n in committed(ref)]) + 2  # the parts, the lease and the job file
    shutil.rmtree(ref)
    for leave, name, kept in ((need - 1, r"part\.00000\d\.a\.parquet", 2), (need, SUCCESS, 3)):
        out = small_disk / f"out-{leave}"
        args = [str(src), str(out), "--rows-per-partition", str(ROWS), *shared]
        fill(small_disk, leave)
        line = one_line_error(run(*args, env=env), 1)
        assert re.search(rf"cannot write {out}/{name}: No space left on device \(OUTPUT {out}\)", line), line
        assert "Free space there" in line and "--resume" in line, line
        assert names(out) == {JOB, *committed(out)} and len(committed(out)) == kept, names(out)
        # and no process holds a removed temporary open: its space is free again at once
        assert os.statvfs(small_disk).f_bavail == leave - pages([out / n for n in names(out)])
        (small_disk / "filler").unlink()
        r = run(*args, "--resume", "--json", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["partitions_reused"] == kept and names(out) == {JOB, SUCCESS, *committed(out)}
        np.testing.assert_array_equal(pd.read_parquet(out)["id"].to_numpy(), np.arange(600))
