"""The local S3 endpoint of ``tests/_s3.py``: plain ``s3://`` URLs reach it, here and in children."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from _s3 import S3, s3, s3_endpoint, s3_server  # noqa: F401  (fixtures)

CHILD_TIMEOUT = 120


def test_server_is_loopback_and_stops() -> None:
    import socket

    with s3_server() as url:
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening
    # (moto's /moto-api/data.json is no probe: it can fail on buckets deleted by earlier tests)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_env_points_at_server(s3: S3) -> None:
    import fsspec.config

    assert os.environ["FSSPEC_S3_ENDPOINT_URL"] == s3.endpoint
    assert fsspec.config.conf["s3"]["endpoint_url"] == s3.endpoint
    assert s3.url("a/b") == f"s3://{s3.bucket}/a/b"
    assert s3.url() == f"s3://{s3.bucket}"


def test_fsspec_open_roundtrip_without_endpoint_args(s3: S3) -> None:
    import fsspec

    payload = os.urandom(1000) + b"end"
    with fsspec.open(s3.url("x"), "wb") as f:
        f.write(payload)
    with fsspec.open(s3.url("x"), "rb") as f:
        assert f.read() == payload
    # the bytes really are on the server: the fixture's explicitly configured filesystem sees them
    assert s3.fs.cat(s3.url("x")) == payload
    fs = fsspec.filesystem("s3")
    assert fs.endpoint_url == s3.endpoint
    assert fs.ls(s3.bucket) == [f"{s3.bucket}/x"]
    assert fs.info(s3.url("x"))["size"] == len(payload)
    assert s3.fs.ls(s3.bucket, detail=False) == [f"{s3.bucket}/x"]


def test_bucket_is_fresh_per_test(s3: S3) -> None:
    import fsspec

    assert fsspec.filesystem("s3").ls(s3.bucket) == []


def test_missing_key_fails(s3: S3) -> None:
    import fsspec

    with pytest.raises(FileNotFoundError):
        with fsspec.open(s3.url("nope"), "rb") as f:
            f.read()


def test_subprocess_sees_same_bytes(s3: S3) -> None:
    """Child processes (Dask workers) reach the endpoint from the inherited environment alone."""
    import fsspec

    payload = b"hello from the parent \x00\xff"
    with fsspec.open(s3.url("x"), "wb") as f:
        f.write(payload)
    code = (
        "import sys, fsspec\n"
        f"with fsspec.open({s3.url('x')!r}) as f:\n"
        "    sys.stdout.write(repr(f.read()))\n"
        f"with fsspec.open({s3.url('from-child')!r}, 'wb') as f:\n"
        "    f.write(b'child')\n"
    )
    r = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == repr(payload)
    assert s3.fs.cat(s3.url("from-child")) == b"child"


def test_subprocess_follows_the_env_endpoint(s3: S3) -> None:
    """The check above can fail: a child whose FSSPEC_S3_ENDPOINT_URL names a dead loopback port
    does not get the bytes (it errors, naming that port), so the endpoint really comes from the
    environment."""
    import fsspec

    with fsspec.open(s3.url("x"), "wb") as f:
        f.write(b"only on the moto server")
    code = (
        "import sys, fsspec\n"
        "try:\n"
        f"    with fsspec.open({s3.url('x')!r}) as f:\n"
        "        sys.stdout.write(repr(f.read()))\n"
        "except Exception as e:\n"
        "    sys.stdout.write(f'{type(e).__name__}: {e}')\n"
        "    raise SystemExit(3)\n"
    )
    with socket.socket() as dead:  # bound, never listening: connections are refused
        dead.bind(("127.0.0.1", 0))
        port = dead.getsockname()[1]
        env = {
            **os.environ,
            "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_MAX_ATTEMPTS": "1",
            "AWS_RETRY_MODE": "standard",
        }
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT)
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert f"127.0.0.1:{port}" in r.stdout, r.stdout


def test_parquet_write_via_s3fs_read_via_pandas(s3: S3) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = pd.DataFrame({"i": range(100), "s": [f"row{i}" for i in range(100)]})
    with s3.fs.open(s3.url("f.parquet"), "wb") as f:
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), f)
    # no storage_options: pandas uses pyarrow's own S3 filesystem, configured by AWS_ENDPOINT_URL_S3
    got = pd.read_parquet(s3.url("f.parquet"))
    pd.testing.assert_frame_equal(got, df, check_dtype=False)
    # and through fsspec/s3fs (as dask does), endpoint from FSSPEC_S3_ENDPOINT_URL
    got2 = pd.read_parquet(s3.url("f.parquet"), storage_options={})
    pd.testing.assert_frame_equal(got2, df, check_dtype=False)


def _read_in_worker(url: str) -> tuple[int, bytes]:
    import os

    import fsspec

    with fsspec.open(url, "rb") as f:
        return os.getpid(), f.read()


def test_dask_worker_process_reads_and_writes(s3: S3) -> None:
    """A Dask worker *process* started under the fixture reads and writes plain s3:// URLs."""
    import dask.dataframe as dd
    import pandas as pd
    from distributed import Client, LocalCluster

    s3.fs.pipe(s3.url("x"), b"for the worker")
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", worker_dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        pid, data = c.submit(_read_in_worker, s3.url("x"), pure=False).result(timeout=60)
        assert pid != os.getpid()
        assert data == b"for the worker"
        df = pd.DataFrame({"i": range(20)})
        dd.from_pandas(df, npartitions=2).to_parquet(s3.url("out"), write_index=False)
        got = dd.read_parquet(s3.url("out")).compute()
    assert sorted(s3.fs.ls(s3.url("out"), detail=False))  # the parts are on the server
    pd.testing.assert_frame_equal(got.sort_values("i").reset_index(drop=True), df, check_dtype=False)
