"""Reliability under faults: a killed Dask worker, bad weights files, a killed CLI.

Which test proves which fault (the ones already covered elsewhere are listed, not repeated):

Dask worker killed mid-run
    ``test_worker_killed_mid_run_output_identical_and_one_load_per_process``: a 2-process
    ``LocalCluster`` (nanny) writes 40 scored parquet partitions; one worker is SIGKILLed after it
    has finished partitions and while it is inside another.  The job completes, the output equals
    an undisturbed run on the same cluster (same files, rows, order, string index, embeddings, and
    bit-identical scores), the lost partitions were recomputed elsewhere, the nanny's replacement
    process ran partitions and loaded the model exactly once, and the survivor still once in all.

Weights files (``nsfw_dask.weights``)
    Already in ``tests/test_weights.py``: a truncated or one-byte-flipped file in ``model_dir``
    (``test_tampered_explicit_dir_is_an_error_and_never_loaded``), in ``$NSFW_DASK_MODEL_DIR``
    (``test_tampered_env_dir_is_an_error``), in the user cache online (re-downloaded,
    ``test_tampered_user_cache_is_replaced_by_a_download``) and offline (flipped only,
    ``test_tampered_user_cache_offline_is_not_used``); bad downloads (``test_fetch_rejects_wrong_bytes``,
    ``test_fetch_connection_dropped_mid_body``, ...); a file changed after verification
    (``test_file_changed_after_verification_is_never_loaded``); processes downloading at once
    into an empty folder download once and a watcher never sees an incomplete file at the final
    name (``test_concurrent_processes_download_once``).

    Added here, for a zero-byte file, a same-size file of zeros, a same-size *loadable* torch file
    with one tensor changed (valid zip, CRCs fixed: only the checksum can catch it), LAION's B/32
    file under the L/14 name, and (for the new checks only) the truncated and flipped files:

    * ``test_bad_weights_in_model_dir_or_env_dir_are_refused``: in ``model_dir`` or in
      ``$NSFW_DASK_MODEL_DIR``, with good weights further down the search order and a download
      available, ``resolve_weights``, ``load_model``, ``score_nsfw`` and ``NSFWModelPlugin.setup``
      raise ``WeightsIntegrityError`` naming the file and the fix; ``torch.load`` is never called
      (spied), nothing is downloaded, the file is left as it was.
    * ``test_bad_weights_in_user_cache_online_are_replaced``: ``score_nsfw`` re-downloads from a
      local HTTP server once and scores correctly; ``torch.load`` only ever sees the pinned bytes.
    * ``test_bad_weights_in_user_cache_offline_are_a_clear_error``: ``WeightsNotFoundError`` naming
      the cache folder, the file name and ``NSFW_DASK_MODEL_DIR``; never loaded.
      ``test_offline_error_names_the_rejected_cached_file``: that error also says which file was
      rejected (fails today: the message is "No weights for vit-l-14 ... in <cache folder>, and
      downloading is disabled" although a file is there; why it was refused is only logged, which
      on a Dask worker goes to the worker's log).
    * ``test_processes_replacing_a_corrupt_cached_file_download_once``: 3 processes call
      ``load_model`` at once over a user cache holding a loadable-but-wrong file: one download, each
      process loads the model once and ``torch.load`` sees only the pinned bytes, and a reader
      polling the folder sees at the final name only the old file, then the complete new one.

CLI killed
    Already in ``tests/test_cli.py``: SIGINT/SIGTERM exit 130 naming ``--resume``, keep the
    committed parts and write no ``_SUCCESS``.
    Added, with SIGKILL (no clean-up can run), on 2,692 rows in 4 files cut into 16 parts
    (``--rows-per-partition 200``, ``--batch-size 1`` so that a run lasts long enough to be
    killed in the middle):

    * ``test_cli_sigkill_keeps_committed_parts_and_resume_finishes``: the whole process group
      killed during a first run, once two parts are committed: OUTPUT holds the job file and
      committed parts only (each complete: its rows of its file, in order, with the reference
      scores; at most one hidden ``.part.*.tmp-*``), no ``_SUCCESS``, no process of the group left
      running; the same command again is refused (exit 2, naming ``--resume``) and changes
      nothing; ``--resume`` reuses exactly the committed parts (``partitions_reused``, same bytes,
      same files), scores the rest and writes ``_SUCCESS``: every row once, in order, with its
      reference score, no temporary left.
    * ``test_cli_sigkill_during_overwrite_never_leaves_a_finished_looking_output``: only the CLI's
      own process killed during ``--overwrite`` of a finished OUTPUT, once a new part is committed:
      its worker processes exit by themselves; no ``_SUCCESS`` (never taken for finished), no part
      of the old run beside the new ones; ``--resume`` then finishes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import nsfw_dask
import nsfw_dask.models
from nsfw_dask import (
    MODEL_SPECS,
    NSFWModelPlugin,
    WeightsIntegrityError,
    WeightsNotFoundError,
    model_cache_info,
    resolve_weights,
    score_nsfw,
)

from _http import LocalServer, loopback_only

pytestmark = pytest.mark.weights

L14 = MODEL_SPECS["vit-l-14"]
B32 = MODEL_SPECS["vit-b-32"]
LOCK = f".{L14.filename}.lock"
_torch_load = torch.load  # the real one, for the tests' own reads (``torch_loads`` spies on the rest)


# --------------------------------------------------------------------------------------------
# Small helpers (local equivalents of test_weights' helpers, kept independent of that module)
# --------------------------------------------------------------------------------------------


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def put(folder: Path, data: bytes, name: str = L14.filename) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path


def retensored(data: bytes) -> bytes:
    """LAION's file with ``linear_4.bias`` changed in place: same size, still a valid torch zip
    (both CRC-32 fields fixed), so ``torch.load`` would accept it; only the SHA-256 can tell."""
    zf = zipfile.ZipFile(io.BytesIO(data))
    info = next(i for i in zf.infolist() if i.file_size == 4 and "/data/" in i.filename)
    assert info.compress_type == zipfile.ZIP_STORED
    b = bytearray(data)
    off = info.header_offset
    assert b[off : off + 4] == b"PK\x03\x04"
    fn_len, extra_len = struct.unpack_from("<HH", b, off + 26)
    start = off + 30 + fn_len + extra_len
    (val,) = struct.unpack_from("<f", b, start)
    new = struct.pack("<f", val + 5.0)
    b[start : start + 4] = new
    crc = zlib.crc32(new)
    struct.pack_into("<I", b, off + 14, crc)
    pos, name = zf.start_dir, info.filename.encode()
    while b[pos : pos + 4] == b"PK\x01\x02":
        n, m, k = struct.unpack_from("<HHH", b, pos + 28)
        if bytes(b[pos + 46 : pos + 46 + n]) == name:
            struct.pack_into("<I", b, pos + 16, crc)
            break
        pos += 46 + n + m + k
    else:
        raise AssertionError("central directory entry not found")
    return bytes(b)


def flip_middle_byte(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


FAULTS: dict[str, Callable[[bytes, bytes], bytes]] = {
    "empty": lambda good, b32: b"",
    "zeros-same-size": lambda good, b32: bytes(len(good)),
    "loadable-same-size": lambda good, b32: retensored(good),
    "b32-file-under-l14-name": lambda good, b32: b32,
    "truncated": lambda good, b32: good[: len(good) // 2],
    "flipped-byte": lambda good, b32: flip_middle_byte(good),
}


@pytest.fixture(scope="module")
def l14_bytes(weights_dir: Path) -> bytes:
    data = (weights_dir / L14.filename).read_bytes()
    assert sha(data) == L14.sha256
    return data


@pytest.fixture(scope="module")
def b32_bytes(weights_dir: Path) -> bytes:
    data = (weights_dir / B32.filename).read_bytes()
    assert sha(data) == B32.sha256
    return data


@pytest.fixture(params=sorted(FAULTS))
def bad_bytes(request, l14_bytes: bytes, b32_bytes: bytes) -> bytes:
    data = FAULTS[request.param](l14_bytes, b32_bytes)
    assert sha(data) != L14.sha256
    if request.param.endswith("same-size"):
        assert len(data) == len(l14_bytes)
    if request.param == "loadable-same-size":  # the fault a missing checksum would let through
        sd = _torch_load(io.BytesIO(data), map_location="cpu", weights_only=True)
        good = _torch_load(io.BytesIO(l14_bytes), map_location="cpu", weights_only=True)
        assert sorted(sd) == sorted(good)
        assert [k for k in sd if not torch.equal(sd[k], good[k])] == ["linear_4.bias"]
    return data


@pytest.fixture
def serve_good(l14_bytes: bytes, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """LAION's L/14 file on a local server, and the pinned URL pointed at it."""
    srv = LocalServer().start()
    url = srv.serve("/l14.pth", body=l14_bytes)
    monkeypatch.setitem(nsfw_dask.models.MODEL_SPECS, "vit-l-14", dataclasses.replace(L14, url=url))
    assert nsfw_dask.weights.get_spec("vit-l-14").url == url
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any download from a host other than 127.0.0.1 fails the test instead of leaving the machine."""
    loopback_only(monkeypatch)


@pytest.fixture(autouse=True)
def _own_user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh user cache per test (conftest's is shared by the session), offline by default."""
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(tmp_path / "user-cache"))
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "1")
    return tmp_path / "user-cache"


@pytest.fixture(autouse=True)
def _clean_model_cache() -> Iterator[None]:
    nsfw_dask.clear_model_cache()
    yield
    nsfw_dask.clear_model_cache()


@pytest.fixture
def torch_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """SHA-256 of the bytes behind every ``torch.load`` call (path or file object)."""
    seen: list[str] = []
    real = torch.load

    def spy(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(f, (str, os.PathLike)):
            seen.append(sha(Path(f).read_bytes()))
        elif isinstance(f, io.BytesIO):
            seen.append(sha(f.getvalue()))
        else:
            seen.append(f"<{type(f).__name__}>")
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


def small_frame(x: np.ndarray) -> pd.DataFrame:
    emb = pd.arrays.ArrowExtensionArray(pa.array(list(x), type=pa.list_(pa.float32())))
    return pd.DataFrame({"emb": emb}, index=[f"r{i}" for i in range(len(x))])


# --------------------------------------------------------------------------------------------
# Bad weights files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["model_dir", "env_dir"])
def test_bad_weights_in_model_dir_or_env_dir_are_refused(
    where: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    serve_good: LocalServer,
    torch_loads: list[str],
    bad_bytes: bytes,
    l14_bytes: bytes,
    l14_ref,
) -> None:
    bad = put(tmp_path / "bad", bad_bytes)
    mtime = bad.stat().st_mtime_ns
    put(nsfw_dask.cache_dir(), l14_bytes)  # good weights further down the search order
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")  # and a download available: neither may paper over it
    if where == "model_dir":
        monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(put(tmp_path / "good-env", l14_bytes).parent))
        kw = {"model_dir": bad.parent}
    else:
        monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(bad.parent))
        kw = {}
    df = small_frame(l14_ref["inputs"][:5])

    with pytest.raises(WeightsIntegrityError) as ei:
        resolve_weights("vit-l-14", **kw)
    msg = str(ei.value)
    assert str(bad) in msg and L14.sha256 in msg, msg
    assert "fetch-weights" in msg and "Delete it" in msg, msg  # the fix
    assert not isinstance(ei.value, WeightsNotFoundError)
    with pytest.raises(WeightsIntegrityError, match=str(bad)):
        nsfw_dask.load_model("vit-l-14", **kw)
    with pytest.raises(WeightsIntegrityError, match=str(bad)):
        score_nsfw(df, **kw)
    with pytest.raises(WeightsIntegrityError, match=str(bad)):
        NSFWModelPlugin("vit-l-14", device="cpu", **kw).setup()

    assert torch_loads == [], "torch.load was called"
    assert model_cache_info()["loads"] == 0
    assert serve_good.hits["/l14.pth"] == 0
    assert bad.read_bytes() == bad_bytes and bad.stat().st_mtime_ns == mtime
    assert names(bad.parent) == {L14.filename}


def test_bad_weights_in_user_cache_online_are_replaced(
    monkeypatch: pytest.MonkeyPatch,
    serve_good: LocalServer,
    torch_loads: list[str],
    bad_bytes: bytes,
    l14_bytes: bytes,
    l14_ref,
) -> None:
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    cache = nsfw_dask.cache_dir()
    bad = put(cache, bad_bytes)
    x = l14_ref["inputs"][:300]
    out = score_nsfw(small_frame(x))
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][:300], rtol=0, atol=1e-6)
    assert serve_good.hits["/l14.pth"] == 1
    assert bad.read_bytes() == l14_bytes
    assert names(cache) == {L14.filename, LOCK}
    assert torch_loads and set(torch_loads) == {L14.sha256}, torch_loads
    assert model_cache_info()["loads"] == 1
    score_nsfw(small_frame(x[:10]))  # no second download, no second load
    assert serve_good.hits["/l14.pth"] == 1 and model_cache_info()["loads"] == 1


def test_bad_weights_in_user_cache_offline_are_a_clear_error(
    monkeypatch: pytest.MonkeyPatch,
    torch_loads: list[str],
    bad_bytes: bytes,
    l14_ref,
) -> None:
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    cache = nsfw_dask.cache_dir()
    bad = put(cache, bad_bytes)
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("vit-l-14")
    msg = str(ei.value)
    assert str(cache) in msg and L14.filename in msg and "NSFW_DASK_MODEL_DIR" in msg, msg
    with pytest.raises(WeightsNotFoundError):
        score_nsfw(small_frame(l14_ref["inputs"][:5]))
    assert torch_loads == []
    assert model_cache_info()["loads"] == 0
    assert bad.read_bytes() == bad_bytes


def test_offline_error_names_the_rejected_cached_file(monkeypatch: pytest.MonkeyPatch, l14_bytes: bytes) -> None:
    """ "No weights in <cache>" while a (rejected) file sits there must say which file and why:
    on a Dask worker the warning that does say it goes to the worker's log, not to the user."""
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    bad = put(nsfw_dask.cache_dir(), l14_bytes[:1000])
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("vit-l-14")
    assert str(bad) in str(ei.value), str(ei.value)


CHILD_LOAD = r"""
import dataclasses, hashlib, io, json, os, sys, time
import torch
import nsfw_dask, nsfw_dask.models
ready, go, url = sys.argv[1:4]
spec = nsfw_dask.models.MODEL_SPECS["vit-l-14"]
nsfw_dask.models.MODEL_SPECS["vit-l-14"] = dataclasses.replace(spec, url=url)
seen = []
real = torch.load
def spy(f, *a, **k):
    data = f.getvalue() if isinstance(f, io.BytesIO) else open(f, "rb").read()
    seen.append(hashlib.sha256(data).hexdigest())
    return real(f, *a, **k)
torch.load = spy
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.002)
t0 = time.monotonic()
m = nsfw_dask.load_model("vit-l-14")
print(json.dumps({"t0": t0, "loaded": seen, "loads": nsfw_dask.model_cache_info()["loads"],
                  "path": str(m.weights_info.path)}))
"""


def test_processes_replacing_a_corrupt_cached_file_download_once(tmp_path: Path, l14_bytes: bytes) -> None:
    n = 3
    cache = tmp_path / "node-cache"
    old = retensored(l14_bytes)  # loadable, wrong: the worst thing to leave in a cache
    target = put(cache, old)
    # ~27 chunks x 60 ms: the download lasts about 1.6 s, so the processes overlap it.
    srv = LocalServer().start()
    url = srv.serve("/l14.pth", body=l14_bytes, chunk=32 * 1024, chunk_sleep=0.06)
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "NSFW_DASK_MODEL_DIR"}
    env.update(NSFW_DASK_CACHE_DIR=str(cache), NSFW_DASK_OFFLINE="0")

    states: list[str] = []  # what a reader finds at the final name, in order
    part_seen: list[str] = []
    bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        known = {sha(old): "old", L14.sha256: "new"}
        while not stop.is_set():
            for name in names(cache):
                if name == L14.filename:
                    try:
                        data = target.read_bytes()
                    except FileNotFoundError:
                        bad.append("final name missing for a moment")
                        continue
                    state = known.get(sha(data), f"other ({len(data)} bytes)")
                    if not states or states[-1] != state:
                        states.append(state)
                elif name.endswith(".part") and name.startswith(f".{L14.filename}."):
                    if not part_seen:
                        part_seen.append(name)
                elif name != LOCK:
                    bad.append(f"unexpected file {name}")
            time.sleep(0.002)

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD_LOAD, str(sync / f"ready{i}"), str(sync / "go"), url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(tmp_path),
        )
        for i in range(n)
    ]
    watcher = threading.Thread(target=watch, daemon=True)
    try:
        deadline = time.monotonic() + 90
        while not all((sync / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), "a child died before it was ready"
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        watcher.start()
        (sync / "go").touch()
        outs = [p.communicate(timeout=90) for p in procs]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        if watcher.is_alive():
            watcher.join(5)
        srv.stop()

    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert srv.hits["/l14.pth"] == 1
    for r in results:
        assert r["path"] == str(target)
        assert r["loads"] == 1
        assert r["loaded"] == [L14.sha256], r  # one torch.load each, of the pinned bytes only
    ((start, end),) = srv.spans
    assert all(r["t0"] < end for r in results), "the processes did not overlap the download"
    assert not bad, bad
    # The reader saw the old file, the download in progress, then only the complete new file.
    assert states == ["old", "new"], states
    assert part_seen, "the download was never seen in progress"
    assert names(cache) == {L14.filename, LOCK}
    assert target.read_bytes() == l14_bytes


# --------------------------------------------------------------------------------------------
# A Dask worker killed mid-run
# --------------------------------------------------------------------------------------------

N_PARTS = 40


def _make_scorer(sync_dir: str, gate: bool, batch_size: int) -> Callable:
    """``score_nsfw`` plus markers: ``done-<pid>-<partition>`` after scoring.  With ``gate``, a
    worker process that has already finished a partition writes ``wait-<pid>-<partition>`` and
    waits for the file ``go`` before scoring the next: each worker finishes one partition, then
    holds one, whatever order the scheduler picks.  A closure, so cloudpickle ships it by value
    (the workers need not import this test module)."""

    def scorer(df, partition_info=None):  # type: ignore[no-untyped-def]
        import os
        import time
        from pathlib import Path

        from nsfw_dask import score_nsfw

        d, pid = Path(sync_dir), os.getpid()
        i = partition_info["number"]
        if gate and any(d.glob(f"done-{pid}-*")):
            (d / f"wait-{pid}-{i}").touch()
            deadline = time.monotonic() + 120
            while not (d / "go").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        out = score_nsfw(df, batch_size=batch_size)
        (d / f"done-{pid}-{i}").touch()
        return out

    return scorer


def _markers(d: Path, kind: str) -> list[tuple[int, int]]:
    out = []
    for p in d.glob(f"{kind}-*"):
        _, pid, i = p.name.split("-")
        out.append((int(pid), int(i)))
    return out


def _wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def _read_parts(folder: Path) -> pd.DataFrame:
    """dask's ``to_parquet`` output: ``part.0.parquet`` .. ``part.39.parquet``, in number order."""
    files = sorted(folder.glob("part.*.parquet"), key=lambda p: int(p.stem.split(".")[-1]))
    return pd.concat([pd.read_parquet(f, dtype_backend="pyarrow") for f in files])


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_worker_killed_mid_run_output_identical_and_one_load_per_process(tmp_path: Path, l14_ref) -> None:
    from distributed import Client, LocalCluster

    x = l14_ref["inputs"]
    n = len(x)
    src = tmp_path / "in"
    src.mkdir()
    bounds = np.linspace(0, n, N_PARTS + 1).astype(int)
    for k in range(N_PARTS):
        a, b = bounds[k], bounds[k + 1]
        pd.DataFrame(
            {
                "id": np.arange(a, b) * 3,
                "embedding": pd.arrays.ArrowExtensionArray(pa.array(list(x[a:b]), type=pa.list_(pa.float32()))),
            },
            index=pd.Index([f"img-{j:05d}" for j in range(a, b)], name="key"),
        ).to_parquet(src / f"part.{k:03d}.parquet")
    ddf = dd.read_parquet(str(src), dtype_backend="pyarrow")
    assert ddf.npartitions == N_PARTS
    meta = nsfw_dask.nsfw_meta(ddf)
    runs = {name: tmp_path / f"sync-{name}" for name in ("calm", "killed")}
    for d in runs.values():
        d.mkdir()
    batch = 16  # ~67-row partitions: 4 batches of 16 and a short one

    with (
        LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        Client(cluster) as client,
    ):
        try:
            # 1. Undisturbed run on the same cluster (same processes' thread counts, same batches).
            calm = ddf.map_partitions(_make_scorer(str(runs["calm"]), False, batch), meta=meta)
            client.compute(calm.to_parquet(str(tmp_path / "out-calm"), compute=False)).result(timeout=180)
            pids_before = client.run(os.getpid)
            assert len(set(pids_before.values())) == 2
            addrs_before = set(pids_before)

            # 2. The same job; one worker is killed after finishing partitions, inside another.
            killed_dir = runs["killed"]
            job = ddf.map_partitions(_make_scorer(str(killed_dir), True, batch), meta=meta)
            fut = client.compute(job.to_parquet(str(tmp_path / "out-killed"), compute=False))

            def victim() -> int | None:
                done = {pid for pid, _ in _markers(killed_dir, "done")}
                waiting = {pid for pid, _ in _markers(killed_dir, "wait")}
                both = sorted(done & waiting & set(pids_before.values()))
                return both[0] if both else None

            pid = _wait_for(victim, 120, "a worker that has finished a partition and is inside another")
            assert not fut.done()
            victim_addr = next(a for a, p in pids_before.items() if p == pid)
            victim_done = {i for p, i in _markers(killed_dir, "done") if p == pid}
            victim_busy = {i for p, i in _markers(killed_dir, "wait") if p == pid} - victim_done
            assert victim_done and victim_busy
            os.kill(pid, signal.SIGKILL)
            _wait_for(lambda: _dead(pid), 30, f"worker {pid} to die")

            def replaced() -> set[str] | None:
                addrs = set(client.scheduler_info()["workers"])
                return addrs if len(addrs) == 2 and victim_addr not in addrs else None

            addrs_after = _wait_for(replaced, 120, "the nanny's replacement worker")
            assert len(addrs_after - addrs_before) == 1
            (new_addr,) = addrs_after - addrs_before
            new_pid = client.run(os.getpid, workers=[new_addr])[new_addr]
            # The gate lets every process finish one partition: the replacement's comes first.
            _wait_for(
                lambda: any(p == new_pid for p, _ in _markers(killed_dir, "done")),
                120,
                "the replacement worker to finish a partition",
            )
            assert not fut.done()  # the job was still running when the worker died
        finally:
            (runs["killed"] / "go").touch()  # never leave tasks waiting, whatever happened
        fut.result(timeout=180)

        pids_after = client.run(os.getpid)
        infos = client.run(model_cache_info)
        assert pids_after[new_addr] == new_pid
        assert new_pid not in pids_before.values() and pid not in pids_after.values()

    # The lost work was redone elsewhere, the replacement took part, and every partition is done.
    done = _markers(killed_dir, "done")
    assert {i for _, i in done} == set(range(N_PARTS))
    for i in victim_done | victim_busy:
        assert any(p != pid and j == i for p, j in done), f"partition {i} was not recomputed"
    assert any(p == new_pid for p, _ in done), "the replacement worker ran no partition"
    # Exactly one model load in each process: the replacement's first, the survivor's over both runs.
    assert set(infos) == addrs_after
    assert {a: v["loads"] for a, v in infos.items()} == {a: 1 for a in addrs_after}, infos
    assert infos[new_addr]["pid"] == new_pid
    print(
        f"killed worker {pid} after partitions {sorted(victim_done)}, inside {sorted(victim_busy)}; "
        f"replacement {new_pid} ran {sorted(i for p, i in done if p == new_pid)}"
    )

    # The output is the undisturbed run's output: same files, rows, order, index, bits.
    calm_out, killed_out = tmp_path / "out-calm", tmp_path / "out-killed"
    assert names(killed_out) == names(calm_out)
    assert len(list(killed_out.glob("part.*.parquet"))) == N_PARTS
    a, b = _read_parts(calm_out), _read_parts(killed_out)
    assert list(b.columns) == ["id", "embedding", "nsfw_score"]
    assert b.index.equals(a.index) and list(b.index) == [f"img-{j:05d}" for j in range(n)]
    np.testing.assert_array_equal(b["id"].to_numpy(), np.arange(n) * 3)
    assert pa.array(b["embedding"]).equals(pa.array(a["embedding"]))
    sa, sb = (f["nsfw_score"].to_numpy(dtype=np.float32) for f in (a, b))
    np.testing.assert_array_equal(sb.view(np.uint32), sa.view(np.uint32))
    np.testing.assert_allclose(sb, l14_ref["nemo_scores"], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The CLI killed with SIGKILL
# --------------------------------------------------------------------------------------------

CLUSTER = ["--workers", "1", "--threads-per-worker", "1", "--no-progress"]
N_FILES = 4  # the 2,692 reference rows in 4 files of 673 rows
ROWS_PER_PART = 200  # row groups of 200 rows, one part each: (200, 200, 200, 73) per file, 16 parts
SLOW = ["--batch-size", "1"]  # one row per forward pass: a part takes about a second, the run ~15 s
JOB, SUCCESS, LEASE = "_nsfw_dask_job.json", "_SUCCESS", "_nsfw_dask_lease.json"
PART_TMP = re.compile(r"^\.part\.\d{6}\.\d+\.parquet\.tmp-.+-\d+-[0-9a-f]+$")  # a part being written


@dataclasses.dataclass
class CliData:
    src: Path
    scores: np.ndarray  # the reference score of each row, files in order
    parts: dict[str, tuple[int, int, int, int]]  # part name -> (file, start, stop, row of the file's row 0)


def _cli_data(tmp_path: Path, l14_ref) -> CliData:
    x = l14_ref["inputs"]
    dim = x.shape[1]
    src = tmp_path / "in"
    src.mkdir()
    parts: dict[str, tuple[int, int, int, int]] = {}
    offset = 0
    for k, chunk in enumerate(np.array_split(x, N_FILES)):
        m = len(chunk)
        lists = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (m + 1) * dim, dim, dtype=np.int32)), pa.array(chunk.reshape(-1))
        )
        pq.write_table(
            pa.table({"id": np.arange(m) + k * 10_000, "embedding": lists}),
            src / f"{k}.parquet",
            row_group_size=ROWS_PER_PART,
        )
        for a in range(0, m, ROWS_PER_PART):  # a part per row group: a part never spans two files
            parts[f"part.{len(parts):06d}.{k}.parquet"] = (k, a, min(m, a + ROWS_PER_PART), offset)
        offset += m
    assert offset == len(x) and len(parts) == 16
    return CliData(src, l14_ref["nemo_scores"], parts)


@pytest.fixture()
def shared(shared_scheduler: str) -> list[str]:
    """The session's cluster (1 worker x 1 thread, conftest.py), for the runs that are not
    killed: a run that is killed has a cluster of its own (its processes are the subject)."""
    return ["--scheduler", shared_scheduler, "--no-progress"]


def _score_cmd(data: CliData, out: Path, *extra: str, cluster: list[str] = CLUSTER) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nsfw_dask",
        "score",
        str(data.src),
        str(out),
        "--rows-per-partition",
        str(ROWS_PER_PART),
        # the reference set holds 128 raw (norm ~27) rows on purpose; a part made mostly of them
        # would be refused by the norm check, which is not what these runs are about (test_norms.py)
        "--no-norm-check",
        *cluster,
        *extra,
    ]


def _start_cli(data: CliData, out: Path, *extra: str) -> subprocess.Popen:
    """The CLI in a session (and process group) of its own, whose id is its pid."""
    return subprocess.Popen(
        _score_cmd(data, out, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _run_cli(data: CliData, out: Path, *extra: str, cluster: list[str] = CLUSTER) -> subprocess.CompletedProcess:
    return subprocess.run(_score_cmd(data, out, *extra, cluster=cluster), capture_output=True, text=True, timeout=180)


def _json_summary(r: subprocess.CompletedProcess) -> dict:
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout  # --json: one JSON object, nothing else on stdout
    return json.loads(lines[0])


def _ident(path: Path) -> tuple[int, int] | None:
    """Which file this is: a committed part is a rename of a new file, so a new inode and mtime."""
    try:
        st = path.stat()
    except FileNotFoundError:  # removed meanwhile (an --overwrite run clearing OUTPUT)
        return None
    return st.st_ino, st.st_mtime_ns


def _snapshot_parts(out: Path, part_names: list[str]) -> dict[str, tuple[str, int, int]]:
    return {n: (sha((out / n).read_bytes()), *_ident(out / n)) for n in part_names}  # type: ignore[misc]


def _committed(out: Path) -> list[str]:
    return sorted(n for n in names(out) if n.startswith("part."))


def _check_part(path: Path, data: CliData) -> None:
    """A committed part holds exactly its rows of its file, in order: the id and score of each,
    the embeddings not written again."""
    k, a, b, offset = data.parts[path.name]
    t = pq.read_table(path)
    assert t.column_names == ["id", "nsfw_score"], (path.name, t.column_names)
    assert t.schema.field("nsfw_score").type == pa.float32()
    np.testing.assert_array_equal(t["id"].to_numpy(), k * 10_000 + np.arange(a, b), err_msg=path.name)
    np.testing.assert_allclose(
        t["nsfw_score"].to_numpy(), data.scores[offset + a : offset + b], rtol=0, atol=1e-5, err_msg=path.name
    )


def _check_finished(out: Path, data: CliData) -> None:
    """``_SUCCESS``, the job file and every part, nothing else (no temporary left); read in name
    order the parts give every row once, in input order, with its reference score."""
    assert names(out) == {SUCCESS, JOB, *data.parts}, sorted(names(out))
    files = sorted(out.glob("part.*.parquet"))  # name order = input order
    assert [f.name for f in files] == list(data.parts)
    for f in files:
        _check_part(f, data)
    got = pd.concat([pd.read_parquet(f, dtype_backend="pyarrow") for f in files], ignore_index=True)
    ids = np.concatenate([k * 10_000 + np.arange(len(c)) for k, c in enumerate(np.array_split(data.scores, N_FILES))])
    np.testing.assert_array_equal(got["id"].to_numpy(), ids)
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(dtype=np.float32), data.scores, rtol=0, atol=1e-5)


def _check_killed(out: Path, data: CliData) -> tuple[list[str], set[str]]:
    """What a SIGKILLed run leaves: the job file, its lease (stale: its process is gone),
    committed parts (each complete and right), at most one temporary (one worker thread writes
    one part at a time), and no ``_SUCCESS``."""
    left = names(out)
    committed = _committed(out)
    assert SUCCESS not in left and JOB in left and LEASE in left, sorted(left)
    assert set(committed) <= set(data.parts), committed
    temps = left - {JOB, LEASE, *committed}
    assert all(PART_TMP.match(n) for n in temps) and len(temps) <= 1, sorted(left)
    for n in committed:
        _check_part(out / n, data)
    return committed, temps


def _group_alive(pgid: int) -> list[int]:
    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, psutil.Error):
            pass
    return alive


def _kill_when(proc: subprocess.Popen, ready: Callable[[], object], what: str, *, group: bool) -> None:
    """Wait for ``ready()``, then SIGKILL the CLI, and check that none of its processes outlives it.

    ``group``: the whole process group (a terminal's or a CI job's kill); else only the CLI's own
    process (the OOM killer's choice), and its worker processes must then exit by themselves.
    """

    def waiting() -> object:
        if proc.poll() is not None:
            _out, err = proc.communicate()
            raise AssertionError(f"the CLI exited ({proc.returncode}) before it could be killed:\n{err}")
        return ready()

    try:
        _wait_for(waiting, 120, what)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "no worker process found"
        if group:
            os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        _wait_for(
            lambda: all(_dead(c.pid) for c in children),
            30,
            f"the killed CLI's worker processes {[c.pid for c in children]} to exit",
        )
        _wait_for(lambda: not _group_alive(proc.pid), 30, "every process of the killed CLI's group to exit")
    finally:
        with contextlib.suppress(ProcessLookupError):  # never leave a process behind, pass or fail
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


def test_cli_sigkill_keeps_committed_parts_and_resume_finishes(tmp_path: Path, l14_ref, shared) -> None:
    data = _cli_data(tmp_path, l14_ref)
    out = tmp_path / "new" / "out"  # its parent is created by the run too

    # 1. SIGKILL of the whole process group during a first run, once two parts are committed:
    #    the committed parts stay, complete and right; no _SUCCESS; no process left running.
    proc = _start_cli(data, out, *SLOW)
    _kill_when(proc, lambda: len(_committed(out)) >= 2, "the CLI to commit two parts", group=True)
    committed, temps = _check_killed(out, data)
    assert 2 <= len(committed) < len(data.parts), committed
    print(f"killed with {len(committed)} parts committed, temporaries {sorted(temps)}")
    kept = _snapshot_parts(out, committed)

    # 2. The same command again: refused (exit 2) with the fix, OUTPUT untouched.
    r = _run_cli(data, out, *SLOW)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "--resume" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert names(out) == {JOB, LEASE, *committed, *temps}
    assert _snapshot_parts(out, committed) == kept

    # 3. --resume (at the default batch size: the batch size is not part of the job): the
    #    committed parts are kept as they are (same bytes, same files), only the others are
    #    scored; every row once, in order, with its reference score; the temporary is gone.
    s = _json_summary(_run_cli(data, out, "--resume", "--json", cluster=shared))
    assert s["partitions"] == len(data.parts) and s["partitions_reused"] == len(committed), s
    assert s["rows"] == s["rows_written"] == len(data.scores) and s["nan_scores"] == 0, s
    assert _snapshot_parts(out, committed) == kept
    _check_finished(out, data)


def test_cli_sigkill_during_overwrite_never_leaves_a_finished_looking_output(tmp_path: Path, l14_ref, shared) -> None:
    data = _cli_data(tmp_path, l14_ref)
    out = tmp_path / "out"
    r = _run_cli(data, out, cluster=shared)
    assert r.returncode == 0, r.stderr
    _check_finished(out, data)
    old = {_ident(out / n) for n in data.parts}

    # 1. SIGKILL of the CLI's own process during an --overwrite run, once it has committed a new
    #    part: its workers exit by themselves; OUTPUT has no _SUCCESS, so it is never taken for
    #    finished, and no part of the old run is left beside the new ones (--overwrite removed
    #    _SUCCESS, then everything, before scoring).
    proc = _start_cli(data, out, "--overwrite", *SLOW)

    def new_part_committed() -> bool:
        return SUCCESS not in names(out) and any(
            i is not None and i not in old for i in map(_ident, out.glob("part.*.parquet"))
        )

    _kill_when(proc, new_part_committed, "the --overwrite run to commit a part", group=False)
    committed, temps = _check_killed(out, data)
    print(f"killed with {len(committed)} new parts committed, temporaries {sorted(temps)}")
    assert 1 <= len(committed) < len(data.parts), committed
    assert not {_ident(out / n) for n in committed} & old, "a part of the old run survived --overwrite"

    # 2. --resume finishes it from the new parts.
    kept = _snapshot_parts(out, committed)
    s = _json_summary(_run_cli(data, out, "--resume", "--json", cluster=shared))
    assert s["partitions"] == len(data.parts) and s["partitions_reused"] == len(committed), s
    assert s["rows"] == s["rows_written"] == len(data.scores), s
    assert _snapshot_parts(out, committed) == kept
    _check_finished(out, data)
