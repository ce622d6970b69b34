"""The GPU path's CPU-testable decisions: cluster options, worker checks, float16 parquet, blocksize.

Everything here runs without a GPU and without RAPIDS: ``nsfw_dask.gpu``'s option builders are pure
functions, the parquet reader chooses its backend from the footer alone, and ``local_cuda_cluster``
is checked against a stand-in ``dask_cuda`` module.  (``tests/test_gpu_api.py`` checks the same
options against the real dask-cuda where the GPU extra is installed.)
"""

from __future__ import annotations

import itertools
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nsfw_dask import gpu
from nsfw_dask import io as nio

# ----------------------------------------------------------------------------- cuda_cluster_options

_ABSENT = object()


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as CLIP embeddings are stored (raw rows: NotUnitNormWarning)."""
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_default_options() -> None:
    assert gpu.cuda_cluster_options() == {
        "rmm_allocator_external_lib_list": ["torch", "cupy"],
        "enable_cudf_spill": False,
        "rmm_async": True,
    }


def test_default_options_are_fresh_objects() -> None:
    a = gpu.cuda_cluster_options()
    a["rmm_allocator_external_lib_list"].append("x")
    assert gpu.cuda_cluster_options()["rmm_allocator_external_lib_list"] == ["torch", "cupy"]


@pytest.mark.parametrize(
    ("given", "expected_mode"),
    [
        ({"rmm_pool_size": "30GB"}, {"rmm_pool_size": "30GB"}),
        ({"rmm_pool_size": 0.5}, {"rmm_pool_size": 0.5}),
        ({"rmm_managed_memory": True}, {"rmm_managed_memory": True}),
        ({"rmm_async": True}, {"rmm_async": True}),
        ({"rmm_async": False}, {"rmm_async": False}),  # the user's choice: no RMM resource at all
        ({"rmm_pool_size": None}, {"rmm_pool_size": None, "rmm_async": True}),  # None is "no pool"
        ({"rmm_managed_memory": False}, {"rmm_managed_memory": False, "rmm_async": True}),
        (
            {"rmm_managed_memory": True, "rmm_pool_size": "4GB"},
            {"rmm_managed_memory": True, "rmm_pool_size": "4GB"},
        ),  # a managed pool: one mode in dask-cuda
        ({"rmm_async": True, "rmm_release_threshold": "4GB"}, {"rmm_async": True, "rmm_release_threshold": "4GB"}),
        ({"rmm_release_threshold": "4GB"}, {"rmm_release_threshold": "4GB", "rmm_async": True}),
    ],
)
def test_allocator_modes(given: dict[str, Any], expected_mode: dict[str, Any]) -> None:
    assert gpu.cuda_cluster_options(**given) == {
        "rmm_allocator_external_lib_list": ["torch", "cupy"],
        "enable_cudf_spill": False,
        **expected_mode,
    }


@pytest.mark.parametrize(
    ("pool", "managed", "async_"),
    list(itertools.product([_ABSENT, None, "2GB"], [_ABSENT, False, True], [_ABSENT, False, True])),
)
def test_every_combination(pool: Any, managed: Any, async_: Any) -> None:
    """All 27 ways of passing (or not) rmm_pool_size, rmm_managed_memory, rmm_async."""
    given = {
        k: v
        for k, v in (("rmm_pool_size", pool), ("rmm_managed_memory", managed), ("rmm_async", async_))
        if v is not _ABSENT
    }
    if async_ is True and managed is True:  # dask-cuda's RMMSetup raises: we say so first, in one line
        with pytest.raises(ValueError, match="rmm_managed_memory=True cannot be combined with rmm_async=True") as e:
            gpu.cuda_cluster_options(**given)
        assert "\n" not in str(e.value)
        return
    opts = gpu.cuda_cluster_options(**given)
    for k, v in given.items():  # the user's keywords win, unchanged
        assert opts[k] == v, (k, opts)
    chose = async_ is not _ABSENT or pool not in (_ABSENT, None) or managed is True
    if chose:  # nothing added
        assert set(opts) == {"rmm_allocator_external_lib_list", "enable_cudf_spill", *given}
    else:  # the default mode, async, is added
        assert opts["rmm_async"] is True
        assert set(opts) == {"rmm_allocator_external_lib_list", "enable_cudf_spill", "rmm_async", *given}
    # never a second mode the user did not ask for
    if opts.get("rmm_async") is True and "rmm_async" not in given:
        assert opts.get("rmm_pool_size") is None and not opts.get("rmm_managed_memory")


def test_release_threshold_without_async_is_refused() -> None:
    with pytest.raises(ValueError, match="rmm_release_threshold needs the async allocator"):
        gpu.cuda_cluster_options(rmm_pool_size="8GB", rmm_release_threshold="4GB")
    with pytest.raises(ValueError, match="rmm_release_threshold needs the async allocator"):
        gpu.cuda_cluster_options(rmm_async=False, rmm_release_threshold="4GB")


def test_spill_and_library_overrides_win() -> None:
    opts = gpu.cuda_cluster_options(
        enable_cudf_spill=True, rmm_allocator_external_lib_list=None, device_memory_limit="40GB", n_workers=2
    )
    assert opts == {
        "rmm_allocator_external_lib_list": None,
        "enable_cudf_spill": True,
        "rmm_async": True,
        "device_memory_limit": "40GB",
        "n_workers": 2,
    }


def test_local_cuda_cluster_passes_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """``local_cuda_cluster(**kw)`` constructs ``LocalCUDACluster(**cuda_cluster_options(**kw))``."""
    seen: list[dict[str, Any]] = []
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = lambda **kw: seen.append(kw) or "cluster"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    assert gpu.local_cuda_cluster(n_workers=1, threads_per_worker=3) == "cluster"
    assert gpu.local_cuda_cluster(rmm_pool_size="1GB") == "cluster"
    assert seen == [
        gpu.cuda_cluster_options(n_workers=1, threads_per_worker=3),
        gpu.cuda_cluster_options(rmm_pool_size="1GB"),
    ]
    assert seen[0]["enable_cudf_spill"] is False and seen[0]["threads_per_worker"] == 3
    with pytest.raises(ValueError, match="cannot be combined"):  # before any cluster is built
        gpu.local_cuda_cluster(rmm_async=True, rmm_managed_memory=True)
    assert len(seen) == 2


def test_local_cuda_cluster_needs_a_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        gpu.local_cuda_cluster()


# ----------------------------------------------------------------------------- workers vs GPUs


def test_more_workers_than_gpus_is_one_line() -> None:
    with pytest.raises(ValueError) as e:
        gpu.check_cuda_workers(3, None, n_gpus=2)
    msg = str(e.value)
    assert "\n" not in msg
    assert "3 GPU workers" in msg and "2 GPU(s)" in msg and "--workers 2" in msg


@pytest.mark.parametrize(
    ("workers", "threads", "gpus", "expected"),
    [
        (None, None, 1, {}),
        (2, None, 2, {"n_workers": 2}),
        (1, None, 4, {"n_workers": 1}),
        (None, 4, 2, {"threads_per_worker": 4}),
        (2, 3, 8, {"n_workers": 2, "threads_per_worker": 3}),
    ],
)
def test_cuda_worker_options(workers: Any, threads: Any, gpus: int, expected: dict[str, int]) -> None:
    assert gpu.cuda_worker_options(workers, threads, n_gpus=gpus) == expected


@pytest.mark.parametrize(
    ("workers", "threads", "gpus", "match"),
    [
        (5, None, 4, "5 GPU workers asked for but 4 GPU"),
        (1, None, 0, "needs a CUDA device"),
        (None, None, 0, "needs a CUDA device"),
        (None, 0, 2, "threads per worker must be a positive integer"),
        (None, True, 2, "threads per worker must be a positive integer"),
        (0, None, 2, "number of GPU workers must be a positive integer"),
        (1.5, None, 2, "number of GPU workers must be a positive integer"),
    ],
)
def test_cuda_worker_errors(workers: Any, threads: Any, gpus: int, match: str) -> None:
    with pytest.raises(ValueError, match=match) as e:
        gpu.cuda_worker_options(workers, threads, n_gpus=gpus)
    assert "\n" not in str(e.value)


def test_visible_gpus_come_from_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu.cuda_worker_options(2, 1) == {"n_workers": 2, "threads_per_worker": 1}
    with pytest.raises(ValueError, match="3 GPU workers asked for but 2 GPU"):
        gpu.check_cuda_workers(3)


# ----------------------------------------------------------------------------- the --gpu cluster's shape


@pytest.mark.parametrize(
    ("given", "gpus", "n_cpu", "expected"),
    [
        ((None, None), 1, 16, (1, 8)),  # the first GPU run's machine: 8 partitions in flight, not 1
        ((None, None), 1, 64, (1, 8)),  # at most 8 threads (each keeps ~360 MB of GPU buffers)
        ((None, None), 1, 4, (1, 4)),
        ((None, None), 1, 2, (1, 2)),
        ((None, None), 1, 1, (1, 2)),  # at least 2: one task's host work overlaps another's GPU work
        ((None, None), 2, 16, (2, 8)),
        ((None, None), 4, 16, (4, 4)),
        ((None, None), 8, 64, (8, 8)),
        ((None, None), 8, 112, (8, 8)),
        ((None, None), 8, 16, (8, 2)),
        ((None, None), 8, 8, (8, 2)),
        ((1, None), 8, 16, (1, 8)),  # the cores are shared by the workers that run, not by all GPUs
        ((2, None), 8, 12, (2, 6)),
        ((None, 1), 1, 16, (1, 1)),  # --threads-per-worker wins, 1 included (dask-cuda's own default)
        ((None, 16), 2, 8, (2, 16)),
        ((3, 5), 4, 64, (3, 5)),
    ],
)
def test_default_gpu_cluster_shape(given: tuple[Any, Any], gpus: int, n_cpu: int, expected: tuple[int, int]) -> None:
    from nsfw_dask.pipeline import default_gpu_cluster_shape

    assert default_gpu_cluster_shape(*given, n_gpus=gpus, n_cpu=n_cpu) == expected


def test_default_gpu_cluster_shape_counts_this_machines_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from nsfw_dask.pipeline import default_gpu_cluster_shape

    monkeypatch.setattr(os, "cpu_count", lambda: 24)
    assert default_gpu_cluster_shape(n_gpus=4) == (4, 6)
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown: 1 core, so the floor of 2 threads
    assert default_gpu_cluster_shape(n_gpus=1) == (1, 2)


@pytest.mark.parametrize(
    ("workers", "threads", "gpus", "expected"),
    [
        (None, None, 1, {"threads_per_worker": 8}),  # dask-cuda's default would be 1
        (None, None, 2, {"threads_per_worker": 8}),
        (None, None, 4, {"threads_per_worker": 4}),
        (1, None, 4, {"n_workers": 1, "threads_per_worker": 8}),
        (None, 3, 2, {"threads_per_worker": 3}),
        (2, 1, 2, {"n_workers": 2, "threads_per_worker": 1}),
    ],
)
def test_job_gpu_cluster_runs_several_threads_per_worker(
    monkeypatch: pytest.MonkeyPatch, workers: Any, threads: Any, gpus: int, expected: dict[str, int]
) -> None:
    """What ``score_dataset(gpu=True)`` (``nsfw-dask score --gpu``) passes to ``local_cuda_cluster``
    on a 16-core machine: ``threads_per_worker`` always, from ``default_gpu_cluster_shape`` unless
    given.  (Before: only what was given, so dask-cuda's one thread per GPU.)"""
    import os

    from nsfw_dask.pipeline import _gpu_cluster_options

    monkeypatch.setattr(gpu, "_visible_gpus", lambda: gpus)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert _gpu_cluster_options(workers, threads) == expected


# ----------------------------------------------------------------------------- float16 parquet


@pytest.mark.parametrize(
    ("t", "half"),
    [
        (pa.list_(pa.float16()), True),
        (pa.large_list(pa.float16()), True),
        (pa.list_(pa.float16(), 768), True),
        (pa.list_(pa.float32()), False),
        (pa.list_(pa.float64(), 768), False),
        (pa.float16(), False),  # a scalar: not embeddings
        (pa.list_(pa.list_(pa.float16())), False),  # nested: not an embedding column either
        (pa.list_(pa.string()), False),
    ],
)
def test_half_float_list_columns(t: pa.DataType, half: bool) -> None:
    schema = pa.schema([("id", pa.int64()), ("emb", t)])
    assert nio.half_float_list_columns(schema) == (["emb"] if half else [])


def _write(path: Path, x: np.ndarray, *, fixed: bool = True, start: int = 0) -> None:
    values = pa.array(x.reshape(-1))
    if fixed:
        emb = pa.FixedSizeListArray.from_arrays(values, x.shape[1])
    else:
        emb = pa.ListArray.from_arrays(
            pa.array(np.arange(0, (len(x) + 1) * x.shape[1], x.shape[1], dtype=np.int32)), values
        )
    pq.write_table(pa.table({"id": np.arange(start, start + len(x)), "emb": emb}), path)


@pytest.fixture
def half_folder(tmp_path: Path) -> tuple[Path, np.ndarray]:
    x = _unit(np.random.default_rng(1).standard_normal((30, 768))).astype(np.float16)
    folder = tmp_path / "half"
    folder.mkdir()
    for i, a in enumerate(range(0, 30, 10)):
        _write(folder / f"part.{i}.parquet", x[a : a + 10], start=a)
    (folder / "_SUCCESS").write_text("")  # not parquet: skipped
    (folder / ".part.0.parquet.crc").write_text("")
    return folder, x


def test_parquet_schema_from_file_folder_glob_and_list(half_folder: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    folder, _ = half_folder
    for p in (
        folder,
        str(folder),
        folder / "part.0.parquet",
        f"{folder}/part.*.parquet",
        [str(folder / "part.2.parquet"), str(folder / "part.0.parquet")],
    ):
        schema = nio.parquet_schema(p)
        assert schema is not None and schema.field("emb").type.value_type == pa.float16(), p
    empty = tmp_path / "empty"
    empty.mkdir()
    assert nio.parquet_schema(empty) is None
    assert nio.parquet_schema(f"{folder}/*.nothing") is None


def test_parquet_schema_prefers_the_metadata_file(tmp_path: Path) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    _write(folder / "part.0.parquet", np.zeros((2, 4), dtype=np.float32))
    pq.write_metadata(pa.schema([("id", pa.int64()), ("emb", pa.list_(pa.float16(), 4))]), folder / "_metadata")
    assert nio.half_float_list_columns(nio.parquet_schema(folder)) == ["emb"]


_F16 = pa.schema([("emb", pa.list_(pa.float16(), 768))])
_F32 = pa.schema([("emb", pa.list_(pa.float32(), 768))])


@pytest.mark.parametrize(
    ("backend", "schema", "blocksize", "expected"),
    [
        ("cudf", _F32, nio._UNSET, ("cudf", {"blocksize": None})),  # one partition per file
        ("cudf", None, nio._UNSET, ("cudf", {"blocksize": None})),
        ("cudf", _F32, "1GiB", ("cudf", {"blocksize": "1GiB"})),  # a size you choose
        ("cudf", _F32, None, ("cudf", {"blocksize": None})),
        ("cudf", _F16, nio._UNSET, ("pandas", {"dtype_backend": "pyarrow"})),  # cuDF cannot read float16
        ("cudf", _F16, "1GiB", ("pandas", {"dtype_backend": "pyarrow", "blocksize": "1GiB"})),
        ("pandas", _F32, nio._UNSET, ("pandas", {"dtype_backend": "pyarrow"})),  # dask's default blocksize
        ("pandas", None, None, ("pandas", {"dtype_backend": "pyarrow", "blocksize": None})),
    ],
)
def test_parquet_read_options(backend: str, schema: Any, blocksize: Any, expected: Any) -> None:
    assert nio.parquet_read_options(backend, schema, blocksize) == expected


def test_parquet_read_options_rejects_other_backends() -> None:
    with pytest.raises(ValueError, match="backend must be"):
        nio.parquet_read_options("cupy", None)


def test_float16_parquet_with_the_cudf_backend_reads_with_pyarrow(half_folder: tuple[Path, np.ndarray]) -> None:
    """No cuDF needed: the footer says float16, so pandas partitions come back, one per file."""
    import dask

    folder, x = half_folder
    with dask.config.set({"dataframe.backend": "cudf"}):
        ddf = nio.read_parquet_embeddings(folder)  # backend from the config
        assert type(ddf._meta) is pd.DataFrame
        assert ddf.npartitions == 3
        df = ddf.compute(scheduler="sync")
    assert df["emb"].dtype.pyarrow_dtype == pa.list_(pa.float16(), 768)
    got = np.stack([np.asarray(v, dtype=np.float16) for v in df.sort_values("id")["emb"]])
    np.testing.assert_array_equal(got.view(np.uint16), x.view(np.uint16))


def test_float32_parquet_with_the_cudf_backend_keeps_one_partition_per_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What ``dd.read_parquet`` is asked for under ``backend="cudf"`` (dask_cudf is not installed
    here, so the call itself is captured): blocksize=None, within the cudf backend."""
    import dask
    import dask.dataframe as dd

    _write(tmp_path / "a.parquet", np.zeros((4, 768), dtype=np.float32))
    calls: list[tuple[Any, dict[str, Any], str]] = []

    def fake(path: Any, **kw: Any) -> str:
        calls.append((path, kw, dask.config.get("dataframe.backend")))
        return "ddf"

    monkeypatch.setattr(dd, "read_parquet", fake)
    assert nio.read_parquet_embeddings(tmp_path, backend="cudf") == "ddf"
    assert nio.read_parquet_embeddings(tmp_path, backend="cudf", blocksize="2GiB", columns=["emb"]) == "ddf"
    assert nio.read_parquet_embeddings(str(tmp_path), backend="pandas") == "ddf"
    assert calls == [
        (tmp_path, {"storage_options": None, "blocksize": None}, "cudf"),
        (tmp_path, {"storage_options": None, "blocksize": "2GiB", "columns": ["emb"]}, "cudf"),
        (str(tmp_path), {"storage_options": None, "dtype_backend": "pyarrow"}, "pandas"),
    ]


def test_pandas_backend_reads_arrow_lists(tmp_path: Path) -> None:
    x = np.arange(2 * 4 * 768, dtype=np.float32).reshape(8, 768)
    _write(tmp_path / "a.parquet", x[:4], fixed=False)
    _write(tmp_path / "b.parquet", x[4:], fixed=False, start=4)
    ddf = nio.read_parquet_embeddings(tmp_path, backend="pandas")
    assert ddf.npartitions == 2
    df = ddf.compute(scheduler="sync")
    assert str(df["emb"].dtype) == "list<element: float>[pyarrow]"
    np.testing.assert_array_equal(np.stack([np.asarray(v) for v in df["emb"]]), x)


@pytest.mark.weights
def test_float16_parquet_scores_like_float32_on_cpu(half_folder: tuple[Path, np.ndarray]) -> None:
    """The pandas partitions that the cudf-backend read hands back score (here on the CPU; with
    ``device="cuda"`` on a GPU) like the same vectors widened to float32."""
    import dask

    from nsfw_dask import NSFWScorer, score_nsfw

    folder, x = half_folder
    with dask.config.set({"dataframe.backend": "cudf"}):
        ddf = nio.read_parquet_embeddings(folder)
    got = ddf.map_partitions(score_nsfw).compute(scheduler="sync").sort_values("id")["nsfw_score"].to_numpy()
    expected = NSFWScorer(device="cpu")(x.astype(np.float32)).numpy()
    np.testing.assert_array_equal(got, expected)


# ----------------------------------------------------------------------------- releasing buffers


@pytest.mark.weights
def test_release_buffers_frees_and_rescoring_is_unchanged() -> None:
    from nsfw_dask import clear_model_cache, load_model
    from nsfw_dask._forward import get_runner, release_buffers
    from nsfw_dask.scoring import score_tensor

    clear_model_cache()  # a fresh model: this thread has no runner for it yet (earlier tests' runners go with theirs)
    head = load_model("vit-l-14", device="cpu")
    x = torch.from_numpy(_unit(np.random.default_rng(3).standard_normal((700, 768))).astype(np.float32))
    dev = torch.device("cpu")
    before = score_tensor(head, x, batch_size=512, device=dev).clone()
    runner = get_runner(head, dev)
    assert runner.capacity == runner.rows_for(512) == 1024 and runner.x_norm is not None  # MIN_ROWS
    assert release_buffers(device_type="cuda") == 0  # CPU buffers are left alone
    assert runner.capacity == 1024
    assert gpu.release_gpu_buffers() == 0
    assert release_buffers(device_type="cpu") >= 1
    assert runner.capacity == 0 and runner.x_norm is None and runner.hidden is None
    after = score_tensor(head, x, batch_size=512, device=dev)
    assert torch.equal(before, after)  # allocated again, same arithmetic, same bits
    assert runner.capacity == 1024


# ----------------------------------------------------------------------------- parquet_npy under cudf


def test_read_embeddings_partitions_are_never_merged_under_the_cudf_backend(tmp_path: Path) -> None:
    """Issue 11 item 1 does not apply to ``read_embeddings``: ``dd.from_map`` is not dispatched on
    ``dataframe.backend`` and dask's optimizer never fuses ``from_map`` partitions, so the
    ``rows_per_partition`` split survives optimization, with pandas partitions."""
    import dask

    root = tmp_path / "laion"
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    x = _unit(np.random.default_rng(2).standard_normal((30, 768))).astype(np.float16)
    for i in range(3):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[10 * i : 10 * i + 10])
        pq.write_table(pa.table({"key": [f"{i}-{j}" for j in range(10)]}), root / "metadata" / f"metadata_{i}.parquet")
    with dask.config.set({"dataframe.backend": "cudf"}):
        ddf = nio.read_embeddings(root, rows_per_partition=4)
        assert type(ddf._meta) is pd.DataFrame
        assert ddf.npartitions == 9  # 4 + 4 + 2 rows per file
        assert ddf.optimize().npartitions == 9
        df = ddf.compute(scheduler="sync")
    assert df["embedding"].dtype.pyarrow_dtype == pa.list_(pa.float16(), 768)
    assert list(df.index) == list(range(30))


# ----------------------------------------------------------------------------- the GPU extras


@pytest.mark.parametrize("extra", ["gpu-cu12", "gpu-cu13"])
def test_gpu_extras_keep_numpy_below_2_5(extra: str) -> None:
    """numba-cuda <= 0.30.4 (the newest cuDF 26.10 admits) registers ``np.row_stack``, which
    numpy 2.5 removed: ``import cudf`` raises AttributeError under numpy 2.5 (seen on the first GPU
    run, Python 3.12).  Each GPU extra must keep a fresh install below it."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    reqs = [Requirement(r) for r in pyproject["project"]["optional-dependencies"][extra]]
    numpy = [r for r in reqs if r.name == "numpy"]
    assert numpy, f"[{extra}] has no numpy bound: a fresh install resolves numpy 2.5 on Python 3.12"
    assert all(not r.specifier.contains("2.5.0") for r in numpy), numpy
    assert all(r.specifier.contains("2.4.6") for r in numpy), numpy  # the version the GPU run used
