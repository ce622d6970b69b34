"""Finding, downloading and verifying LAION's weights (``nsfw_dask.weights``).

Every download goes to a local ``ThreadingHTTPServer`` on 127.0.0.1 serving bytes from a dict the
test controls (and counting requests); ``urllib.request.urlopen`` is wrapped so that any attempt to
reach another host fails the test instead of touching the internet.  LAION's real files are copied
into ``tmp_path`` at run time only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import nsfw_dask
import nsfw_dask.models
from nsfw_dask import (
    MODEL_SPECS,
    NSFWScorer,
    WeightsError,
    WeightsIntegrityError,
    WeightsNotFoundError,
    fetch_weights,
    resolve_weights,
)
from nsfw_dask.weights import sha256_file, state_dict_digest

from _http import LocalServer, loopback_only

pytestmark = pytest.mark.weights

ROOT = Path(__file__).resolve().parents[1]
L14 = MODEL_SPECS["vit-l-14"]
B32 = MODEL_SPECS["vit-b-32"]
NEMO_PATH = "laion/clip-autokeras-binary-nsfw/clip_autokeras_binary_nsfw.pth"
LOCK = f".{L14.filename}.lock"


# --------------------------------------------------------------------------------------------
# A local HTTP server serving bytes we control
# --------------------------------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer().start()
    try:
        yield srv
    finally:
        srv.stop()


# --------------------------------------------------------------------------------------------
# Isolation fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    loopback_only(monkeypatch)


@pytest.fixture(autouse=True)
def user_cache(_isolated_cache: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty user cache per test, no ``$NSFW_DASK_MODEL_DIR`` and offline by default."""
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(cache))
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "1")
    assert nsfw_dask.cache_dir() == cache
    return cache


@pytest.fixture(autouse=True)
def _clean_model_cache() -> Iterator[None]:
    nsfw_dask.clear_model_cache()
    yield
    nsfw_dask.clear_model_cache()


@pytest.fixture(scope="module")
def l14_bytes(weights_dir: Path) -> bytes:
    data = (weights_dir / L14.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == L14.sha256
    return data


@pytest.fixture(scope="module")
def b32_bytes(weights_dir: Path) -> bytes:
    data = (weights_dir / B32.filename).read_bytes()
    assert hashlib.sha256(data).hexdigest() == B32.sha256
    return data


def flipped(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0xFF
    return bytes(b)


def truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


TAMPER = {"flipped": flipped, "truncated": truncated}


def put(folder: Path, name: str, data: bytes) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def close_http_errors(exc: BaseException) -> None:
    """Close any ``HTTPError`` in ``exc``'s cause chain (see test_http_error_response_is_closed)."""
    e: BaseException | None = exc
    while e is not None:
        if isinstance(e, urllib.error.HTTPError):
            e.close()
        e = e.__cause__


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def patch_url(monkeypatch: pytest.MonkeyPatch, model: str, url: str) -> None:
    """Point ``MODEL_SPECS[model]`` at ``url`` and check that the lookups the package does see it."""
    spec = dataclasses.replace(nsfw_dask.models.MODEL_SPECS[model], url=url)
    monkeypatch.setitem(nsfw_dask.models.MODEL_SPECS, model, spec)
    assert nsfw_dask.models.get_spec(model).url == url
    assert nsfw_dask.weights.get_spec(model).url == url
    assert nsfw_dask.MODEL_SPECS[model].url == url  # the same dict object everywhere


# --------------------------------------------------------------------------------------------
# fetch_weights: download, verify, reuse
# --------------------------------------------------------------------------------------------


def test_fetch_downloads_verifies_and_reuses(tmp_path: Path, server: LocalServer, l14_bytes: bytes) -> None:
    url = server.serve("/l14.pth", body=l14_bytes)
    target = tmp_path / "models" / "nested"  # created on demand
    path = fetch_weights("vit-l-14", target, url=url)
    assert path == target / L14.filename
    assert isinstance(path, Path)
    assert path.read_bytes() == l14_bytes
    assert sha256_file(path) == L14.sha256
    assert server.hits["/l14.pth"] == 1
    assert names(target) == {L14.filename, LOCK}  # no temp file left behind

    # A verified file is reused: no request.
    mtime = path.stat().st_mtime_ns
    assert fetch_weights("vit-l-14", target, url=url) == path
    assert server.hits["/l14.pth"] == 1
    assert path.stat().st_mtime_ns == mtime

    # force=True downloads again.
    assert fetch_weights("vit-l-14", target, url=url, force=True) == path
    assert server.hits["/l14.pth"] == 2
    assert path.read_bytes() == l14_bytes
    assert names(target) == {L14.filename, LOCK}


def test_fetch_defaults_to_user_cache(server: LocalServer, user_cache: Path, l14_bytes: bytes) -> None:
    url = server.serve("/l14.pth", body=l14_bytes)
    path = fetch_weights("l14", url=url)  # alias name, no model_dir
    assert path == user_cache / L14.filename
    assert sha256_file(path) == L14.sha256


def test_fetch_replaces_a_corrupted_file(
    tmp_path: Path, server: LocalServer, l14_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    url = server.serve("/l14.pth", body=l14_bytes)
    bad = put(tmp_path, L14.filename, flipped(l14_bytes))
    with caplog.at_level(logging.WARNING, logger="nsfw_dask.weights"):
        assert fetch_weights("vit-l-14", tmp_path, url=url) == bad
    assert bad.read_bytes() == l14_bytes
    assert server.hits["/l14.pth"] == 1
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


@pytest.mark.parametrize("tamper", sorted(TAMPER))
def test_fetch_rejects_wrong_bytes(tmp_path: Path, server: LocalServer, l14_bytes: bytes, tamper: str) -> None:
    url = server.serve("/bad.pth", body=TAMPER[tamper](l14_bytes))
    with pytest.raises(WeightsIntegrityError) as ei:
        fetch_weights("vit-l-14", tmp_path, url=url)
    msg = str(ei.value)
    assert url in msg
    assert L14.sha256 in msg
    assert isinstance(ei.value, OSError)
    # Nothing but the (empty) lock file remains: no destination file, no .part temp file.
    assert names(tmp_path) == {LOCK}
    assert (tmp_path / LOCK).stat().st_size == 0


@pytest.mark.parametrize("status", [404, 500])
def test_fetch_http_error(tmp_path: Path, server: LocalServer, l14_bytes: bytes, status: int) -> None:
    if status == 404:
        url = server.url("/missing.pth")  # no route
    else:
        url = server.serve("/x.pth", body=l14_bytes, status=status)
    with pytest.raises(WeightsError) as ei:
        fetch_weights("vit-l-14", tmp_path, url=url)
    assert not isinstance(ei.value, WeightsIntegrityError)
    assert str(status) in str(ei.value)
    assert url in str(ei.value)
    assert names(tmp_path) == {LOCK}
    close_http_errors(ei.value)


def test_http_error_response_is_closed(tmp_path: Path, server: LocalServer) -> None:
    with pytest.raises(WeightsError) as ei:
        fetch_weights("vit-l-14", tmp_path, url=server.url("/missing.pth"))
    cause = ei.value.__cause__
    assert isinstance(cause, urllib.error.HTTPError)
    try:
        assert cause.fp is None or cause.fp.isclosed()
    finally:
        close_http_errors(ei.value)


def test_fetch_http_error_keeps_an_existing_verified_file_when_forced(
    tmp_path: Path, server: LocalServer, l14_bytes: bytes
) -> None:
    good = put(tmp_path, L14.filename, l14_bytes)
    with pytest.raises(WeightsError) as ei:
        fetch_weights("vit-l-14", tmp_path, url=server.url("/missing.pth"), force=True)
    close_http_errors(ei.value)
    assert good.read_bytes() == l14_bytes
    assert names(tmp_path) == {L14.filename, LOCK}


@pytest.mark.parametrize("where", ["before-headers", "mid-body"])
def test_fetch_stalled_server_times_out(tmp_path: Path, server: LocalServer, l14_bytes: bytes, where: str) -> None:
    stall_after = None if where == "before-headers" else 1000
    url = server.serve("/slow.pth", body=l14_bytes, delay=20.0, stall_after=stall_after)
    t0 = time.monotonic()
    with pytest.raises(WeightsError) as ei:
        fetch_weights("vit-l-14", tmp_path, url=url, timeout=0.5)
    assert time.monotonic() - t0 < 10
    assert not isinstance(ei.value, WeightsIntegrityError)
    assert url in str(ei.value)
    assert "timed out" in str(ei.value)
    assert names(tmp_path) == {LOCK}


def test_fetch_connection_dropped_mid_body(tmp_path: Path, server: LocalServer, l14_bytes: bytes) -> None:
    # The server announces the full length, sends half and hangs up: http.client returns the short
    # body without complaint, so the checksum is what catches it.
    url = server.serve("/drop.pth", body=truncated(l14_bytes), content_length=len(l14_bytes))
    with pytest.raises(WeightsIntegrityError) as ei:
        fetch_weights("vit-l-14", tmp_path, url=url, timeout=5)
    assert url in str(ei.value) and f"({len(l14_bytes) // 2} bytes)" in str(ei.value)
    assert names(tmp_path) == {LOCK}


def test_fetch_chunked_transfer(tmp_path: Path, server: LocalServer, l14_bytes: bytes) -> None:
    url = server.serve("/chunked.pth", body=l14_bytes, chunked=True, chunk=100_000)
    path = fetch_weights("vit-l-14", tmp_path, url=url)
    assert path.read_bytes() == l14_bytes


def test_fetch_chunked_connection_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: LocalServer, l14_bytes: bytes
) -> None:
    url = server.serve("/drop.pth", body=l14_bytes, chunked=True, chunk=100_000, drop_after=400_000)
    try:
        with pytest.raises(WeightsError) as ei:
            fetch_weights("vit-l-14", tmp_path, url=url, timeout=5)
        assert url in str(ei.value)
        # resolve_weights turns it into "not found, download failed" like any network error.
        monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
        patch_url(monkeypatch, "vit-l-14", url)
        with pytest.raises(WeightsNotFoundError):
            resolve_weights("vit-l-14")
    finally:
        # Whatever escapes, the temp file is removed and the lock released.
        assert names(tmp_path) - {"user-cache"} == {LOCK}


def test_fetched_file_has_umask_permissions(tmp_path: Path, server: LocalServer, l14_bytes: bytes) -> None:
    url = server.serve("/l14.pth", body=l14_bytes)
    path = fetch_weights("vit-l-14", tmp_path, url=url)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------------------------
# Many processes on one node download once
# --------------------------------------------------------------------------------------------

CHILD = r"""
import json, os, sys, time
from nsfw_dask import fetch_weights
from nsfw_dask.weights import sha256_file
ready, go, target, url = sys.argv[1:5]
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.002)
t0 = time.monotonic()
path = fetch_weights("vit-l-14", target, url=url, timeout=20)
t1 = time.monotonic()
print(json.dumps({"path": str(path), "sha": sha256_file(path), "t0": t0, "t1": t1}))
"""


def test_concurrent_processes_download_once(tmp_path: Path, server: LocalServer, l14_bytes: bytes) -> None:
    n = 4
    # ~27 chunks x 60 ms: the download lasts about 1.6 s, so every process starts inside it.
    url = server.serve("/slow.pth", body=l14_bytes, chunk=32 * 1024, chunk_sleep=0.06)
    target = tmp_path / "shared-models"
    sync = tmp_path / "sync"
    sync.mkdir()
    go = sync / "go"
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=pythonpath)

    seen: set[str] = set()
    bad: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        # Only the final name may ever be picked up, and whenever it exists it is complete.
        while not stop.is_set():
            for name in names(target):
                seen.add(name)
                if name == L14.filename:
                    try:
                        data = (target / name).read_bytes()
                    except FileNotFoundError:
                        continue
                    if data != l14_bytes:
                        bad.append(f"{name}: {len(data)} bytes")
                elif name != LOCK and not (name.startswith(f".{L14.filename}.") and name.endswith(".part")):
                    bad.append(f"unexpected file {name}")
            time.sleep(0.002)

    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(sync / f"ready{i}"), str(go), str(target), url],
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
        deadline = time.monotonic() + 60
        while not all((sync / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), "a child died before it was ready"
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        watcher.start()
        go.touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        stop.set()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
        if watcher.is_alive():
            watcher.join(5)

    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert server.hits["/slow.pth"] == 1
    assert {r["path"] for r in results} == {str(target / L14.filename)}
    assert {r["sha"] for r in results} == {L14.sha256}
    # They really overlapped: every process asked while the single download was still running.
    ((start, end),) = server.spans
    assert all(r["t0"] < end for r in results), (results, server.spans)
    assert end - start > 0.3
    assert not bad, bad
    assert L14.filename in seen
    assert any(s.endswith(".part") for s in seen)  # the download was observed in progress
    assert names(target) == {L14.filename, LOCK}
    assert (target / L14.filename).read_bytes() == l14_bytes


# --------------------------------------------------------------------------------------------
# resolve_weights: search order, offline, download into the user cache
# --------------------------------------------------------------------------------------------


def test_resolve_order(tmp_path: Path, user_cache: Path, monkeypatch: pytest.MonkeyPatch, l14_bytes: bytes) -> None:
    explicit = put(tmp_path / "explicit", L14.filename, l14_bytes)
    env_dir = put(tmp_path / "env", L14.filename, l14_bytes)
    cached = put(user_cache, L14.filename, l14_bytes)
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(env_dir.parent))

    info = resolve_weights("vit-l-14", explicit.parent)
    assert info.path == explicit
    assert info.checksum == f"sha256:{L14.sha256}"
    assert info.spec == L14
    assert resolve_weights("vit-l-14").path == env_dir
    # An explicit folder without the file falls through to the environment.
    (tmp_path / "empty").mkdir()
    assert resolve_weights("vit-l-14", tmp_path / "empty").path == env_dir
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", "")  # empty means unset
    assert resolve_weights("vit-l-14").path == cached
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR")
    assert resolve_weights("vit-l-14").path == cached
    assert resolve_weights("vit-l-14", explicit.parent).path == explicit


def test_resolve_nothing_anywhere_offline(tmp_path: Path, user_cache: Path) -> None:
    (tmp_path / "nowhere").mkdir()  # an empty folder (a missing one is refused as such)
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("vit-l-14", tmp_path / "nowhere")
    msg = str(ei.value)
    assert "NSFW_DASK_MODEL_DIR" in msg
    assert L14.filename in msg
    assert str(user_cache) in msg and str(tmp_path / "nowhere") in msg
    assert isinstance(ei.value, FileNotFoundError) and isinstance(ei.value, WeightsError)
    assert not user_cache.exists() or names(user_cache) <= {LOCK}


def test_resolve_download_false_beats_online(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: LocalServer, l14_bytes: bytes
) -> None:
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    patch_url(monkeypatch, "vit-l-14", server.serve("/l14.pth", body=l14_bytes))
    with pytest.raises(WeightsNotFoundError):
        resolve_weights("vit-l-14", download=False)
    assert server.hits["/l14.pth"] == 0


def test_resolve_downloads_into_user_cache(
    monkeypatch: pytest.MonkeyPatch, server: LocalServer, user_cache: Path, l14_bytes: bytes
) -> None:
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    patch_url(monkeypatch, "vit-l-14", server.serve("/l14.pth", body=l14_bytes))
    info = resolve_weights("vit-l-14")
    assert info.path == user_cache / L14.filename
    assert info.checksum == f"sha256:{L14.sha256}"
    assert info.path.read_bytes() == l14_bytes
    assert server.hits["/l14.pth"] == 1
    # Found in the cache next time, even offline.
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "1")
    assert resolve_weights("vit-l-14").path == info.path
    assert server.hits["/l14.pth"] == 1


def test_resolve_failed_download_is_not_found(
    monkeypatch: pytest.MonkeyPatch, server: LocalServer, user_cache: Path
) -> None:
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    url = server.url("/missing.pth")
    patch_url(monkeypatch, "vit-l-14", url)
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("vit-l-14")
    assert "404" in str(ei.value) and "NSFW_DASK_MODEL_DIR" in str(ei.value)
    close_http_errors(ei.value)
    assert names(user_cache) == {LOCK}


def test_resolve_bad_download_is_integrity_error(
    monkeypatch: pytest.MonkeyPatch, server: LocalServer, user_cache: Path, l14_bytes: bytes
) -> None:
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    url = server.serve("/bad.pth", body=flipped(l14_bytes))
    patch_url(monkeypatch, "vit-l-14", url)
    with pytest.raises(WeightsIntegrityError, match=L14.sha256):
        resolve_weights("vit-l-14")
    assert names(user_cache) == {LOCK}


# --------------------------------------------------------------------------------------------
# Corrupted files: an error where the user put them, a fresh download in the user cache
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tamper", sorted(TAMPER))
def test_tampered_explicit_dir_is_an_error_and_never_loaded(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    server: LocalServer,
    weights_dir: Path,
    l14_bytes: bytes,
    tamper: str,
) -> None:
    bad_bytes = TAMPER[tamper](l14_bytes)
    bad = put(tmp_path / "models", L14.filename, bad_bytes)
    mtime = bad.stat().st_mtime_ns
    # Good weights elsewhere and downloads allowed must not paper over the bad file.
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    patch_url(monkeypatch, "vit-l-14", server.serve("/l14.pth", body=l14_bytes))
    loads = nsfw_dask.model_cache_info()["loads"]

    with pytest.raises(WeightsIntegrityError) as ei:
        resolve_weights("vit-l-14", bad.parent)
    assert str(bad) in str(ei.value)
    assert L14.sha256 in str(ei.value)
    with pytest.raises(WeightsIntegrityError, match=str(bad)):
        nsfw_dask.load_model("vit-l-14", model_dir=bad.parent)
    with pytest.raises(WeightsIntegrityError):
        NSFWScorer(bad.parent, device="cpu").setup()

    assert nsfw_dask.model_cache_info()["loads"] == loads
    assert bad.read_bytes() == bad_bytes  # left exactly as it was
    assert bad.stat().st_mtime_ns == mtime
    assert names(bad.parent) == {L14.filename}
    assert server.hits["/l14.pth"] == 0

    # an explicit download request for that folder (NeMo's API) is where re-downloading is allowed
    assert NSFWScorer.download_weights_on_node(bad.parent) == bad
    assert bad.read_bytes() == l14_bytes
    assert server.hits["/l14.pth"] == 1


@pytest.mark.parametrize("tamper", sorted(TAMPER))
def test_tampered_env_dir_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, l14_bytes: bytes, tamper: str
) -> None:
    bad = put(tmp_path / "env", L14.filename, TAMPER[tamper](l14_bytes))
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(bad.parent))
    with pytest.raises(WeightsIntegrityError, match=str(bad)):
        resolve_weights("vit-l-14")
    assert bad.read_bytes() == TAMPER[tamper](l14_bytes)


@pytest.mark.parametrize("tamper", sorted(TAMPER))
def test_tampered_user_cache_is_replaced_by_a_download(
    monkeypatch: pytest.MonkeyPatch,
    server: LocalServer,
    user_cache: Path,
    l14_bytes: bytes,
    tamper: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = put(user_cache, L14.filename, TAMPER[tamper](l14_bytes))
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    patch_url(monkeypatch, "vit-l-14", server.serve("/l14.pth", body=l14_bytes))
    with caplog.at_level(logging.WARNING, logger="nsfw_dask.weights"):
        info = resolve_weights("vit-l-14")
    assert info.path == bad
    assert bad.read_bytes() == l14_bytes
    assert server.hits["/l14.pth"] == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad) in m for m in warnings), warnings
    assert names(user_cache) == {L14.filename, LOCK}
    # And it loads.
    m = nsfw_dask.load_model("vit-l-14")
    assert m.weights_info.path == bad
    assert nsfw_dask.model_cache_info()["loads"] == 1


def test_tampered_user_cache_offline_is_not_used(
    user_cache: Path, l14_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    bad = put(user_cache, L14.filename, flipped(l14_bytes))
    with caplog.at_level(logging.WARNING, logger="nsfw_dask.weights"):
        with pytest.raises(WeightsNotFoundError):
            resolve_weights("vit-l-14")
    assert any(str(bad) in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert bad.read_bytes() == flipped(l14_bytes)
    with pytest.raises(WeightsError):
        nsfw_dask.load_model("vit-l-14")
    assert nsfw_dask.model_cache_info()["loads"] == 0


# --------------------------------------------------------------------------------------------
# NeMo Curator's layout: verified by tensor content
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def l14_state_dict(weights_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(weights_dir / L14.filename, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("alias", L14.alias_paths)
def test_nemo_layout_same_bytes(tmp_path: Path, l14_bytes: bytes, l14_state_dict: dict, alias: str) -> None:
    path = put(tmp_path, alias, l14_bytes)
    info = resolve_weights("vit-l-14", tmp_path)
    assert info.path == path
    assert info.checksum.startswith("tensors:")
    assert info.checksum == f"tensors:{state_dict_digest(l14_state_dict)}"


def test_nemo_layout_resaved_state_dict(tmp_path: Path, l14_bytes: bytes, l14_state_dict: dict) -> None:
    path = tmp_path / NEMO_PATH
    path.parent.mkdir(parents=True)
    torch.save({k: v.clone() for k, v in l14_state_dict.items()}, path)
    assert path.read_bytes() != l14_bytes
    info = resolve_weights("vit-l-14", tmp_path)
    assert info.path == path
    assert info.checksum == f"tensors:{state_dict_digest(l14_state_dict)}"
    # The NeMo-style folder works through NSFWScorer exactly like NeMo Curator's.
    scorer = NSFWScorer(tmp_path, device="cpu")
    scorer.setup()
    assert scorer.weights_path == str(path)
    ref = NSFWScorer(put(tmp_path / "laion-name", L14.filename, l14_bytes).parent, device="cpu")
    x = torch.nn.functional.normalize(torch.randn(5, 768, generator=torch.Generator().manual_seed(0)), dim=1)
    torch.testing.assert_close(scorer(x), ref(x), rtol=0, atol=0)


def test_nemo_layout_changed_tensor_is_rejected(tmp_path: Path, l14_state_dict: dict) -> None:
    sd = {k: v.clone() for k, v in l14_state_dict.items()}
    key = sorted(k for k in sd if k.endswith("weight"))[0]
    sd[key].view(-1)[0] += 1e-3
    path = tmp_path / NEMO_PATH
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    with pytest.raises(WeightsIntegrityError, match=str(path)):
        resolve_weights("vit-l-14", tmp_path)
    with pytest.raises(WeightsIntegrityError):
        nsfw_dask.load_model("vit-l-14", model_dir=tmp_path)
    assert nsfw_dask.model_cache_info()["loads"] == 0
    assert path.exists()


@pytest.mark.parametrize("content", ["garbage", "truncated", "empty"])
def test_nemo_layout_unreadable_file_is_rejected(tmp_path: Path, l14_bytes: bytes, content: str) -> None:
    data = {
        "garbage": b"this is not a torch file\n" * 10,
        "truncated": truncated(l14_bytes),
        "empty": b"",
    }[content]
    path = put(tmp_path, NEMO_PATH, data)
    with pytest.raises(WeightsIntegrityError, match=str(path)):
        resolve_weights("vit-l-14", tmp_path)
    assert path.read_bytes() == data


def test_laion_name_wins_over_nemo_layout(tmp_path: Path, l14_bytes: bytes) -> None:
    put(tmp_path, NEMO_PATH, b"garbage")  # never even read when LAION's file is there
    path = put(tmp_path, L14.filename, l14_bytes)
    assert resolve_weights("vit-l-14", tmp_path).path == path


# --------------------------------------------------------------------------------------------
# NSFWScorer (NeMo Curator's interface)
# --------------------------------------------------------------------------------------------


def test_scorer_download_weights_on_node_then_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: LocalServer, l14_bytes: bytes
) -> None:
    patch_url(monkeypatch, "vit-l-14", server.serve("/l14.pth", body=l14_bytes))
    model_dir = tmp_path / "node" / "models"  # does not exist yet
    path = NSFWScorer.download_weights_on_node(model_dir)
    assert Path(path) == model_dir / L14.filename
    assert sha256_file(path) == L14.sha256
    assert server.hits["/l14.pth"] == 1
    assert NSFWScorer.download_weights_on_node(model_dir) == path  # already there
    assert server.hits["/l14.pth"] == 1

    scorer = NSFWScorer(model_dir)
    scorer.setup()
    assert scorer.model_id_names == ["laion/clip-autokeras-binary-nsfw"]
    assert scorer.weights_path == str(path)
    out = scorer(np.full((3, 768), 768**-0.5, np.float32))  # unit vectors (zeros: NotUnitNormWarning)
    assert isinstance(out, torch.Tensor)
    assert out.dtype == torch.float32
    assert tuple(out.shape) == (3,)
    assert torch.isfinite(out).all() and ((out >= 0) & (out <= 1)).all()
    info = nsfw_dask.model_cache_info()
    assert info["loads"] == 1 and info["models"][0]["path"] == str(path)


def test_scorer_download_weights_on_node_nemo_layout_is_not_downloaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: LocalServer, l14_bytes: bytes
) -> None:
    patch_url(monkeypatch, "vit-l-14", server.serve("/l14.pth", body=l14_bytes))
    path = put(tmp_path, NEMO_PATH, l14_bytes)
    assert NSFWScorer.download_weights_on_node(tmp_path) == path
    assert server.hits["/l14.pth"] == 0


# --------------------------------------------------------------------------------------------
# ViT-B/32
# --------------------------------------------------------------------------------------------


def test_b32_fetch_verify_and_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, server: LocalServer, b32_bytes: bytes
) -> None:
    url = server.serve("/b32.pth", body=b32_bytes)
    path = fetch_weights("vit-b-32", tmp_path / "b32", url=url)
    assert path == tmp_path / "b32" / B32.filename
    assert path.read_bytes() == b32_bytes
    assert names(path.parent) == {B32.filename, f".{B32.filename}.lock"}
    info = resolve_weights("b32", path.parent)
    assert info.checksum == f"sha256:{B32.sha256}" and info.spec == B32
    m = nsfw_dask.load_model("vit-b-32", model_dir=path.parent)
    assert m(torch.zeros(2, 512)).shape == (2, 1)

    # Wrong bytes for B/32 are rejected the same way (and the L/14 file is not a B/32 file).
    bad_url = server.serve("/b32-bad.pth", body=flipped(b32_bytes))
    with pytest.raises(WeightsIntegrityError, match=B32.sha256):
        fetch_weights("vit-b-32", tmp_path / "b32-bad", url=bad_url)
    assert names(tmp_path / "b32-bad") == {f".{B32.filename}.lock"}

    # Download into the user cache through the (patched) pinned URL.
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    patch_url(monkeypatch, "vit-b-32", url)
    assert resolve_weights("vit-b-32").path == nsfw_dask.cache_dir() / B32.filename
    assert server.hits["/b32.pth"] == 2


def test_file_changed_after_verification_is_never_loaded(tmp_path: Path, weights_dir: Path) -> None:
    import torch

    folder = tmp_path / "w"
    folder.mkdir()
    path = folder / L14.filename
    path.write_bytes((weights_dir / L14.filename).read_bytes())
    nsfw_dask.load_model("vit-l-14", model_dir=folder)  # verified and cached
    sd = torch.load(path, weights_only=True)
    sd["linear_4.bias"] += 5
    torch.save(sd, path)  # tampered after the first verification
    with pytest.raises(WeightsIntegrityError, match="changed since it was verified"):
        nsfw_dask.load_model("vit-l-14", model_dir=folder, dtype=torch.float64)  # a new cache entry
