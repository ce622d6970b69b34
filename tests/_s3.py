"""A real local S3 endpoint for tests: moto's server on 127.0.0.1, no mocks.

``s3_server()`` runs ``moto.server.ThreadedMotoServer`` on a loopback port chosen by the OS and
yields its URL.  The ``s3`` fixture points every S3 client at it *through the environment*, so
code under test needs no endpoint arguments, and neither do child processes started during the
test (``subprocess``, Dask worker processes): they inherit the variables.

* fsspec/s3fs: ``FSSPEC_S3_ENDPOINT_URL`` (fsspec reads ``FSSPEC_<proto>_<kwarg>`` into
  ``fsspec.config.conf`` at import; the fixture re-reads it in this process too).
* boto3/botocore/aiobotocore and pyarrow's own S3 filesystem (which ``pd.read_parquet`` uses for
  ``s3://`` URLs without storage_options): ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``.
* dummy credentials and region, no EC2 metadata probing, no shared AWS config files, no proxy for
  loopback.

Use it from a test module with::

    from _s3 import s3, s3_endpoint  # noqa: F401  (fixtures)

    def test_x(s3):
        s3.fs.pipe(s3.url("a"), b"...")        # or fsspec.open(s3.url("a"), "wb")
        run(["nsfw-dask", "score", s3.url("in"), s3.url("out")])

(or import ``s3_endpoint`` and ``s3`` in ``conftest.py`` to share them).  Skips, with the
reason, where moto[server] or s3fs are not installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import socket
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest

START_TIMEOUT = 30.0  # seconds for the server thread to bind and answer
STOP_TIMEOUT = 10.0

_MISSING = [m for m in ("moto.server", "s3fs", "flask") if importlib.util.find_spec(m.split(".")[0]) is None]


def _require() -> None:
    if _MISSING:
        pytest.skip(f"local S3 tests need moto[server] and s3fs (pip install -e '.[test]'); missing: {_MISSING}")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """moto/boto imports and requests may warn (deprecations): not ours, never errors here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        yield


def _wait_ready(host: str, port: int, deadline: float) -> None:
    """Until ``deadline``: the server accepts a connection (it was bound before start() returned).

    Not an HTTP probe: ``/moto-api/data.json`` dumps every backend and can itself fail on state
    left by earlier tests (moto's backends are global to the process).
    """
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=2).close()
            return
        except OSError as e:
            last = e
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {host}:{port} did not accept connections in time: {last!r}")


@contextlib.contextmanager
def s3_server(timeout: float = START_TIMEOUT) -> Iterator[str]:
    """Run moto's S3 (all services, in memory) on 127.0.0.1:<free port>; yield ``http://127.0.0.1:PORT``.

    Start and stop are bounded (``timeout``, ``STOP_TIMEOUT``): a server that fails to bind or
    answer raises instead of hanging.  Port 0 lets the OS pick the port, so there is no race with
    other processes between choosing and binding it.

    moto keeps its backends (buckets, objects) global to the process: two servers started here
    serve the same data.  Tests keep apart by bucket name (the ``s3`` fixture makes a unique one).
    """
    _require()
    with _quiet():
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        # ThreadedMotoServer.start() waits unboundedly for its thread to bind: bound it here.
        starter = threading.Thread(target=server.start, name="moto-start", daemon=True)
        starter.start()
        starter.join(timeout)
        if starter.is_alive():
            raise RuntimeError(f"moto server did not start within {timeout}s")
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        _wait_ready(host, port, time.monotonic() + timeout)
        yield url
    finally:
        stopper = threading.Thread(target=server.stop, name="moto-stop", daemon=True)
        stopper.start()
        stopper.join(STOP_TIMEOUT)


@dataclasses.dataclass
class S3:
    """What the ``s3`` fixture yields: one fresh, empty bucket on the local endpoint."""

    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # unique per test
    fs: Any  # s3fs.S3FileSystem pointed at ``endpoint`` explicitly

    def url(self, path: str = "") -> str:
        """``s3://<bucket>/<path>`` (``s3://<bucket>`` for an empty path)."""
        path = path.lstrip("/")
        return f"s3://{self.bucket}/{path}" if path else f"s3://{self.bucket}"


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables that point fsspec/s3fs, boto and pyarrow (this process and children) at ``endpoint``."""
    no_proxy = ",".join(
        x for x in [os.environ.get("NO_PROXY") or os.environ.get("no_proxy"), "127.0.0.1", "localhost"] if x
    )
    return {
        "FSSPEC_S3_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
    }


# Variables that would send a client elsewhere or to other credentials: removed for the test.
_UNSET = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_S3_ENDPOINT",
    "FSSPEC_S3",
)


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """One moto server for the whole session (buckets keep tests apart)."""
    with s3_server() as url:
        yield url


@pytest.fixture
def s3(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3]:
    """A fresh bucket on the local endpoint, reachable from plain ``s3://`` URLs here and in children.

    Environment (restored after the test) and fsspec's in-process config point at the server;
    s3fs's instance cache is cleared before and after, so no filesystem built for another
    endpoint (or this one) leaks across tests.
    """
    _require()
    import fsspec.config
    import s3fs

    for k in _UNSET:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_env(s3_endpoint).items():
        monkeypatch.setenv(k, v)
    # Never read the user's ~/.aws files (profiles, endpoints, credentials).
    nowhere = tmp_path_factory.getbasetemp() / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(nowhere / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere / "credentials"))

    # fsspec read FSSPEC_* at import (set_conf_env); re-read them now, into a scratch dict, and put
    # the result in place with monkeypatch so the global config is restored afterwards.
    fresh: dict[str, dict[str, Any]] = {}
    fsspec.config.set_conf_env(fresh)
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fresh.get("s3", {})})
    s3fs.S3FileSystem.clear_instance_cache()

    bucket = f"test-{uuid.uuid4().hex[:16]}"
    with _quiet():
        # region from AWS_DEFAULT_REGION; an explicit client_kwargs region_name would make
        # mkdir send LocationConstraint=us-east-1, which S3 (and moto) reject.
        fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, key="testing", secret="testing", skip_instance_cache=True)
        fs.mkdir(bucket)
    try:
        yield S3(endpoint=s3_endpoint, bucket=bucket, fs=fs)
    finally:
        with _quiet(), contextlib.suppress(Exception):
            fs.rm(bucket, recursive=True)  # frees the server's memory; failures do not matter
        s3fs.S3FileSystem.clear_instance_cache()
