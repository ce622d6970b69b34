"""``fetch-weights --model-dir D`` and ``NSFWScorer.download_weights_on_node(D)`` on a machine
without a network.

* A verified copy already on the machine (``$NSFW_DASK_MODEL_DIR``, the user cache) is copied into
  D, verified, without the network, and D gets nothing but the file (no lock, no temporary file).
* With no copy and no network, the error is one line naming the file, the URL, the cause and the
  fix, and D is left as it was (not even created).

No test here reaches the internet: name resolution of any host but 127.0.0.1 fails with the
message of an air-gapped machine (``Name or service not known``), and the unreachable server is
``127.0.0.1:9`` (nothing listens there: connection refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nsfw_dask
import nsfw_dask.models
from nsfw_dask import (
    MODEL_SPECS,
    NSFWScorer,
    WeightsNotFoundError,
    fetch_weights,
    resolve_weights,
)
from nsfw_dask.weights import sha256_file

from _http import loopback_only

pytestmark = pytest.mark.weights

ROOT = Path(__file__).resolve().parents[1]
L14 = MODEL_SPECS["vit-l-14"]
B32 = MODEL_SPECS["vit-b-32"]
DEAD_URL = "http://127.0.0.1:9/x.pth"  # port 9 (discard), nothing listening: connection refused

# Run the CLI in a child whose name resolution fails for every host but 127.0.0.1, as on an
# air-gapped node (and so that the pinned URL is never really fetched).
NO_DNS_CLI = r"""
import socket, sys
real = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    if host in ("127.0.0.1", b"127.0.0.1"):
        return real(host, *args, **kwargs)
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
socket.getaddrinfo = getaddrinfo
from nsfw_dask.cli import main
sys.exit(main(sys.argv[1:]))
"""


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> None:
    """Name resolution fails for every host but 127.0.0.1; urlopen refuses other hosts too."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host in ("127.0.0.1", b"127.0.0.1"):
            return real(host, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    loopback_only(monkeypatch)


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "user-cache"
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(cache))
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "1")
    return cache


@pytest.fixture(autouse=True)
def _clean_model_cache():  # type: ignore[no-untyped-def]
    nsfw_dask.clear_model_cache()
    yield
    nsfw_dask.clear_model_cache()


def cli_env(**extra: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NSFW_DASK_MODEL_DIR", "NSFW_DASK_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def assert_one_line_fix(msg: str, filename: str, url: str, cause: str, target: Path) -> None:
    assert "\n" not in msg, msg
    assert filename in msg and url in msg and cause in msg, msg
    assert "NSFW_DASK_MODEL_DIR" in msg and "machine with internet" in msg, msg
    assert f"fetch-weights --heads nsfw --model vit-l-14 --model-dir {target}" in msg, msg


# --------------------------------------------------------------------------------------------
# A verified copy on this machine is copied into D, offline
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [L14, B32], ids=["vit-l-14", "vit-b-32"])
@pytest.mark.parametrize("source", ["model_dir_env", "user_cache"])
def test_fetch_weights_copies_a_local_verified_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_dir: Path, user_cache: Path, spec, source: str
) -> None:
    if source == "model_dir_env":
        monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    else:
        user_cache.mkdir(parents=True)
        shutil.copy(weights_dir / spec.filename, user_cache / spec.filename)
    target = tmp_path / "node" / "models"  # does not exist yet
    path = fetch_weights(spec.name, target)
    assert path == target / spec.filename
    assert sha256_file(path) == spec.sha256
    assert names(target) == {spec.filename}  # no lock, no temporary file
    # and it resolves from there
    assert resolve_weights(spec.name, target).path == path
    # again: reused as it is
    mtime = path.stat().st_mtime_ns
    assert fetch_weights(spec.name, target) == path and path.stat().st_mtime_ns == mtime
    assert names(target) == {spec.filename}


def test_fetch_weights_replaces_a_corrupted_file_with_the_local_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_dir: Path
) -> None:
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    target = tmp_path / "models"
    target.mkdir()
    (target / L14.filename).write_bytes(b"truncated")
    assert fetch_weights("vit-l-14", target) == target / L14.filename
    assert sha256_file(target / L14.filename) == L14.sha256
    assert names(target) == {L14.filename}


def test_download_weights_on_node_copies_a_local_verified_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_dir: Path
) -> None:
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    target = tmp_path / "node" / "models"
    path = NSFWScorer.download_weights_on_node(target)
    assert Path(path) == target / L14.filename
    assert sha256_file(path) == L14.sha256
    assert names(target) == {L14.filename}
    # exact=True: LAION's SavedModel zip the same way
    keras = L14.keras
    assert keras is not None
    assert NSFWScorer.download_weights_on_node(target, exact=True) == path
    assert sha256_file(target / keras.filename) == keras.sha256
    assert names(target) == {L14.filename, keras.filename}
    # and the scorer loads from there
    scorer = NSFWScorer(target, device="cpu")
    scorer.setup()
    assert scorer.weights_path == str(path)


def test_download_weights_on_node_tampered_file_offline_uses_the_local_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_dir: Path
) -> None:
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    target = tmp_path / "models"
    target.mkdir()
    data = bytearray((weights_dir / L14.filename).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (target / L14.filename).write_bytes(bytes(data))
    path = NSFWScorer.download_weights_on_node(target)
    assert sha256_file(path) == L14.sha256
    assert names(target) == {L14.filename}


def test_cli_fetch_weights_copies_a_local_verified_file(tmp_path: Path, weights_dir: Path) -> None:
    target = tmp_path / "node" / "models"
    env = cli_env(
        NSFW_DASK_MODEL_DIR=str(weights_dir), NSFW_DASK_OFFLINE="1", NSFW_DASK_CACHE_DIR=str(tmp_path / "cache")
    )
    r = subprocess.run(
        [sys.executable, "-m", "nsfw_dask", "fetch-weights", "--heads", "nsfw", "--model-dir", str(target)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == target / L14.filename
    assert sha256_file(target / L14.filename) == L14.sha256
    assert names(target) == {L14.filename}


def test_cli_fetch_weights_copies_every_heads_file_by_default(tmp_path: Path, weights_dir: Path) -> None:
    """Issue 22: ``fetch-weights`` fetches the files of every head with weights for ``--model``."""
    from nsfw_dask.heads import HEADS

    target = tmp_path / "models"
    env = cli_env(
        NSFW_DASK_MODEL_DIR=str(weights_dir), NSFW_DASK_OFFLINE="1", NSFW_DASK_CACHE_DIR=str(tmp_path / "cache")
    )
    r = subprocess.run(
        [sys.executable, "-m", "nsfw_dask", "fetch-weights", "--model-dir", str(target)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    specs = [h.spec_for("vit-l-14") for h in HEADS.values()]
    assert [Path(p) for p in r.stdout.split()] == [target / s.filename for s in specs]
    assert names(target) == {s.filename for s in specs}
    for s in specs:
        assert sha256_file(target / s.filename) == s.sha256


COPY_CHILD = r"""
import os, sys, time
from nsfw_dask import fetch_weights
ready, go, target = sys.argv[1:4]
open(ready, "w").close()
deadline = time.monotonic() + 120
while not os.path.exists(go):
    if time.monotonic() > deadline:
        sys.exit("never told to go")
    time.sleep(0.002)
print(fetch_weights("vit-l-14", target))
"""


def test_concurrent_copies_into_one_folder(tmp_path: Path, weights_dir: Path) -> None:
    """Several processes of a node at once: all get the verified file, D gets nothing else."""
    n = 3
    target = tmp_path / "shared-models"
    sync = tmp_path / "sync"
    sync.mkdir()
    env = cli_env(
        NSFW_DASK_MODEL_DIR=str(weights_dir), NSFW_DASK_OFFLINE="1", NSFW_DASK_CACHE_DIR=str(tmp_path / "cache")
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", COPY_CHILD, str(sync / f"ready{i}"), str(sync / "go"), str(target)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(tmp_path),
        )
        for i in range(n)
    ]
    try:
        deadline = time.monotonic() + 120
        while not all((sync / f"ready{i}").exists() for i in range(n)):
            assert all(p.poll() is None for p in procs), "a child died before it was ready"
            assert time.monotonic() < deadline, "children did not start"
            time.sleep(0.01)
        (sync / "go").touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert Path(out.strip()) == target / L14.filename
    assert sha256_file(target / L14.filename) == L14.sha256
    assert names(target) == {L14.filename}


# --------------------------------------------------------------------------------------------
# No copy, no network: one line with the fix, D left as it was
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("env_dir", ["unset", "empty"])
@pytest.mark.parametrize("exists", [False, True], ids=["new-dir", "existing-dir"])
def test_fetch_weights_offline_no_copy_is_one_line_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, env_dir: str, exists: bool
) -> None:
    if env_dir == "empty":
        (tmp_path / "empty").mkdir()
        monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(tmp_path / "empty"))
    target = tmp_path / "node" / "models"
    if exists:
        target.mkdir(parents=True)
    with pytest.raises(WeightsNotFoundError) as ei:
        fetch_weights("vit-l-14", target)
    assert isinstance(ei.value, FileNotFoundError)
    assert_one_line_fix(str(ei.value), L14.filename, L14.url, "Name or service not known", target)
    assert target.exists() == exists  # not created
    assert names(target) == set()
    assert not (tmp_path / "node").exists() or exists


def test_fetch_weights_unreachable_url_is_one_line_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NSFW_DASK_OFFLINE")
    target = tmp_path / "models"
    with pytest.raises(WeightsNotFoundError) as ei:
        fetch_weights("vit-l-14", target, url=DEAD_URL, timeout=5)
    assert_one_line_fix(str(ei.value), L14.filename, DEAD_URL, "Connection refused", target)
    assert not target.exists()
    # An existing folder keeps exactly what it had.
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with pytest.raises(WeightsNotFoundError):
        fetch_weights("vit-l-14", target, url=DEAD_URL, timeout=5)
    assert names(target) == {"notes.txt"}


def test_fetch_weights_with_url_does_not_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weights_dir: Path
) -> None:
    # An explicit mirror is an explicit request to download from it.
    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    with pytest.raises(WeightsNotFoundError):
        fetch_weights("vit-l-14", tmp_path / "models", url=DEAD_URL, timeout=5)
    assert not (tmp_path / "models").exists()


def test_download_weights_on_node_offline_no_copy(tmp_path: Path) -> None:
    target = tmp_path / "node" / "models"
    with pytest.raises(WeightsNotFoundError) as ei:
        NSFWScorer.download_weights_on_node(target)
    assert_one_line_fix(str(ei.value), L14.filename, L14.url, "Name or service not known", target)
    assert not (tmp_path / "node").exists()


def test_resolve_weights_unreachable_says_where_it_looked_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user_cache: Path
) -> None:
    monkeypatch.setenv("NSFW_DASK_OFFLINE", "0")
    spec = dataclasses.replace(L14, url=DEAD_URL)
    monkeypatch.setitem(nsfw_dask.models.MODEL_SPECS, "vit-l-14", spec)
    (tmp_path / "nowhere").mkdir()  # an empty folder (a missing one is refused as such)
    with pytest.raises(WeightsNotFoundError) as ei:
        resolve_weights("vit-l-14", tmp_path / "nowhere", timeout=5)
    msg = str(ei.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and str(user_cache) in msg, msg
    assert DEAD_URL in msg and "Connection refused" in msg and "NSFW_DASK_MODEL_DIR" in msg, msg
    assert msg.count("NSFW_DASK_MODEL_DIR") == 1, msg  # the fix once, not twice
    assert names(user_cache) == set()


def _one_error_line(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("nsfw-dask: error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize("how", ["dns-failure", "connection-refused"])
def test_cli_fetch_weights_offline_no_copy(tmp_path: Path, how: str) -> None:
    target = tmp_path / "node" / "models"
    (tmp_path / "empty").mkdir()
    if how == "dns-failure":  # the pinned URL, on a machine without name resolution
        env = cli_env(
            NSFW_DASK_MODEL_DIR=str(tmp_path / "empty"),
            NSFW_DASK_OFFLINE="1",
            NSFW_DASK_CACHE_DIR=str(tmp_path / "cache"),
        )
        cmd = [sys.executable, "-c", NO_DNS_CLI, "fetch-weights", "--heads", "nsfw", "--model-dir", str(target)]
        url, cause = L14.url, "Name or service not known"
    else:
        env = cli_env(NSFW_DASK_CACHE_DIR=str(tmp_path / "cache"))
        cmd = [sys.executable, "-m", "nsfw_dask", "fetch-weights", "--heads", "nsfw", "--model-dir", str(target)]
        cmd += ["--url", DEAD_URL]
        url, cause = DEAD_URL, "Connection refused"
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=120, cwd=str(tmp_path))
    line = _one_error_line(r)
    assert_one_line_fix(line, L14.filename, url, cause, target)
    assert r.stdout == ""
    assert not (tmp_path / "node").exists()


def test_cli_fetch_weights_dns_failure_copies_when_env_dir_has_it(tmp_path: Path, weights_dir: Path) -> None:
    """The issue's machine: no name resolution, NSFW_DASK_MODEL_DIR holding the verified file."""
    target = tmp_path / "models"
    env = cli_env(NSFW_DASK_MODEL_DIR=str(weights_dir), NSFW_DASK_CACHE_DIR=str(tmp_path / "cache"))
    r = subprocess.run(
        [sys.executable, "-c", NO_DNS_CLI, "fetch-weights", "--heads", "nsfw", "--model-dir", str(target)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == target / L14.filename
    assert hashlib.sha256((target / L14.filename).read_bytes()).hexdigest() == L14.sha256
    assert names(target) == {L14.filename}
