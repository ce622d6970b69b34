"""cuDF partitions on a CUDA device: the pandas (CPU) contracts, carried over to cuDF.

Parity with the reference scores, a zero-copy view of the list column's leaves, NaN for null rows,
errors that name the column / row / lengths, empty partitions, ``dask_cudf`` without ``meta=``, and
agreement between the CPU and GPU paths.  Runs only where torch sees a CUDA device and cuDF/CuPy
import (conftest skips it elsewhere); cuDF, CuPy and dask_cudf are imported inside the tests, so
collection works on a CPU-only install.

Tolerances: 1e-5 against reference scores (the reference README's "exact"); 1e-6 where the same
rows are scored by the same model in differently sized GEMMs (dask partitions vs one frame).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet
import pytest
import torch

import nsfw_dask
from nsfw_dask import EmbeddingFormatError, nsfw_meta, score_nsfw
from nsfw_dask.models import get_spec

pytestmark = [pytest.mark.gpu, pytest.mark.weights]

L14_FILE = "clip_ViT-L-14_openai_binary_nsfw_head.pth"
B32_FILE = "clip_ViT-B-32_openai_binary_nsfw_head.pth"
REF_FIXTURE = {"vit-l-14": "l14_ref", "vit-b-32": "b32_ref"}


@pytest.fixture(scope="module")
def cudf() -> Any:
    return pytest.importorskip("cudf")


@pytest.fixture(scope="module")
def cp() -> Any:
    return pytest.importorskip("cupy")


# ----------------------------------------------------------------------------- helpers


def _arrow_lists(
    x: np.ndarray,
    *,
    null_rows: tuple[int, ...] = (),
    null_elements: tuple[tuple[int, int], ...] = (),
    value_type: pa.DataType = pa.float32(),
) -> pa.ListArray:
    """Rows of ``x`` as an Arrow ``list<value_type>``; null rows hold no values (cuDF's layout),
    ``null_elements`` are ``(row, column)`` cells made null inside a valid row."""
    n, dim = x.shape
    valid = np.ones(n, dtype=bool)
    valid[list(null_rows)] = False
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(np.where(valid, dim, 0), out=offsets[1:])
    flat = np.ascontiguousarray(x[valid]).reshape(-1).astype(value_type.to_pandas_dtype())
    vmask = np.zeros(flat.size, dtype=bool)
    for row, col in null_elements:
        assert valid[row]
        vmask[offsets[row] + col] = True
    values = pa.array(flat, type=value_type, mask=vmask if vmask.any() else None)
    mask = pa.array(~valid) if not valid.all() else None
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=mask)


def _cudf_frame(cudf: Any, arr: pa.Array, index: Any) -> Any:
    """A cuDF frame ``{"id", "emb"}`` (id = row number) from an Arrow list array."""
    n = len(arr)
    df = cudf.DataFrame.from_arrow(pa.table({"id": pa.array(np.arange(n, dtype=np.int64)), "emb": arr}))
    df.index = cudf.Index(index)
    return df


def _pandas_frame(arr: pa.Array, index: Any) -> pd.DataFrame:
    n = len(arr)
    return pd.DataFrame(
        {"id": np.arange(n, dtype=np.int64), "emb": pd.arrays.ArrowExtensionArray(arr)},
        index=pd.Index(index),
    )


def _host(series: Any) -> np.ndarray:
    """A cuDF numeric Series as a numpy array (NaN stays NaN)."""
    return series.values.get()


def _check_scored(cudf: Any, out: Any, df: Any) -> np.ndarray:
    """Shared contract: a new cuDF frame with the input's columns, index and row order plus a
    float32 ``nsfw_score`` column holding NaN (never null); the input is left alone."""
    assert isinstance(out, cudf.DataFrame)
    assert out is not df
    assert list(out.columns) == [*df.columns, "nsfw_score"]
    assert "nsfw_score" not in df.columns, "the input partition was modified"
    assert out["nsfw_score"].dtype == np.dtype("float32")
    assert out["nsfw_score"].null_count == 0, "missing scores must be NaN, not null"
    assert len(out) == len(df)
    np.testing.assert_array_equal(out.index.to_numpy(), df.index.to_numpy())
    np.testing.assert_array_equal(_host(out["id"]), _host(df["id"]))
    return _host(out["nsfw_score"])


def _numpy_head(path: Path, x: np.ndarray) -> np.ndarray:
    """LAION's head in float64 numpy from the state dict: (x - mean) / sqrt(var), Linear+ReLU
    ..., Linear, sigmoid (written as exp(-log(1 + exp(-z))): no overflow warning)."""
    sd = {k: v.double().numpy() for k, v in torch.load(path, weights_only=True).items()}
    h = (x.astype(np.float64) - sd["norm.mean"]) / np.sqrt(sd["norm.variance"])
    n_linear = sum(1 for k in sd if k.startswith("linear_") and k.endswith(".weight"))
    for i in range(1, n_linear):
        h = np.maximum(h @ sd[f"linear_{i}.weight"].T + sd[f"linear_{i}.bias"], 0.0)
    z = (h @ sd[f"linear_{n_linear}.weight"].T + sd[f"linear_{n_linear}.bias"]).reshape(-1)
    return np.exp(-np.logaddexp(0.0, -z))


def _expected(model: str, ref: dict[str, np.ndarray], weights_dir: Path) -> np.ndarray:
    if model == "vit-l-14":
        return ref["nemo_scores"]
    return _numpy_head(weights_dir / B32_FILE, ref["inputs"])


# ----------------------------------------------------------------------------- (a) parity


@pytest.mark.parametrize("batch_size", [None, 1000])
def test_l14_matches_nemo_reference(cudf: Any, l14_ref: dict[str, np.ndarray], batch_size: int | None) -> None:
    x = l14_ref["inputs"]
    n = len(x)
    index = np.arange(n, dtype=np.int64)[::-1] * 3 + 100  # non-default, descending
    df = _cudf_frame(cudf, _arrow_lists(x), index)
    out = score_nsfw(df, batch_size=batch_size)
    got = _check_scored(cudf, out, df)
    np.testing.assert_allclose(got, l14_ref["nemo_scores"], rtol=0, atol=1e-5)


def test_b32_matches_float64_head(cudf: Any, b32_ref: dict[str, np.ndarray], weights_dir: Path) -> None:
    x = b32_ref["inputs"]
    n = len(x)
    index = [f"img-{i}" for i in range(n)]
    df = _cudf_frame(cudf, _arrow_lists(x), index)
    out = score_nsfw(df, model="vit-b-32")
    got = _check_scored(cudf, out, df)
    np.testing.assert_allclose(got, _numpy_head(weights_dir / B32_FILE, x), rtol=0, atol=1e-5)


def test_float64_lists(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    x = l14_ref["inputs"][:300]
    df = _cudf_frame(cudf, _arrow_lists(x, value_type=pa.float64()), np.arange(300) + 7)
    assert df["emb"].dtype == cudf.ListDtype("float64")
    got = _check_scored(cudf, score_nsfw(df), df)
    np.testing.assert_allclose(got, l14_ref["nemo_scores"][:300], rtol=0, atol=1e-5)


def test_duplicate_index_labels(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    """Scores are attached by position: duplicate labels neither fail nor reorder."""
    x = l14_ref["inputs"][:200]
    index = np.repeat(np.arange(100), 2)[::-1].copy()
    df = _cudf_frame(cudf, _arrow_lists(x), index)
    got = _check_scored(cudf, score_nsfw(df), df)
    np.testing.assert_allclose(got, l14_ref["nemo_scores"][:200], rtol=0, atol=1e-5)


def test_existing_score_column_is_replaced(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    x = l14_ref["inputs"][:40]
    df = _cudf_frame(cudf, _arrow_lists(x), np.arange(40) * 2)
    df["nsfw_score"] = np.full(40, -1.0)
    out = score_nsfw(df)
    assert list(out.columns) == list(df.columns)
    assert out["nsfw_score"].dtype == np.dtype("float32")
    np.testing.assert_allclose(_host(out["nsfw_score"]), l14_ref["nemo_scores"][:40], rtol=0, atol=1e-5)
    assert (_host(df["nsfw_score"]) == -1.0).all(), "the input partition was modified"


# ----------------------------------------------------------------------------- (b) no copy


def _leaves_buffer(df: Any) -> tuple[int, int]:
    leaves = df["emb"].list.leaves.values  # CuPy over the list child (CUDA array interface)
    return leaves.data.ptr, leaves.nbytes


def test_backend_tensor_is_a_view_of_the_leaves(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    from nsfw_dask._cudf import CudfBackend

    spec = get_spec("vit-l-14")
    x = l14_ref["inputs"][:64]
    df = _cudf_frame(cudf, _arrow_lists(x), np.arange(64) + 1000)
    base, nbytes = _leaves_buffer(df)
    assert nbytes == x.nbytes

    segments = CudfBackend().to_segments(df, "emb", spec)
    assert len(segments) == 1
    emb = segments[0].emb
    assert emb.is_cuda and emb.dtype == torch.float32 and tuple(emb.shape) == (64, 768)
    assert emb.data_ptr() == base, "the embedding tensor is a copy, not a view of the leaves"
    assert torch.equal(emb.cpu(), torch.from_numpy(x))

    # the scored frame passes the embedding column through without copying it either
    out = score_nsfw(df)
    assert _leaves_buffer(out)[0] == base


def test_sliced_frame_is_a_view(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    """``df.iloc[5:20]``: the tensor starts 5 rows into the parent's leaves (cuDF >= 26.02;
    older releases copy the child of a sliced list column)."""
    from nsfw_dask._cudf import CudfBackend

    if tuple(int(p) for p in cudf.__version__.split(".")[:2]) < (26, 2):
        pytest.skip(f"cudf {cudf.__version__}: leaves of a sliced list column are a device copy")
    spec = get_spec("vit-l-14")
    x = l14_ref["inputs"][:64]
    df = _cudf_frame(cudf, _arrow_lists(x), np.arange(64) + 1000)
    base, nbytes = _leaves_buffer(df)

    sub = df.iloc[5:20]
    emb = CudfBackend().to_segments(sub, "emb", spec)[0].emb
    assert tuple(emb.shape) == (15, 768)
    start, stop = emb.data_ptr(), emb.data_ptr() + emb.numel() * emb.element_size()
    assert base <= start and stop <= base + nbytes, (
        f"sliced tensor [{start:#x}, {stop:#x}) lies outside the leaves [{base:#x}, {base + nbytes:#x})"
    )
    assert start == base + 5 * 768 * 4
    assert torch.equal(emb.cpu(), torch.from_numpy(x[5:20]))

    out = score_nsfw(sub)
    got = _check_scored(cudf, out, sub)
    np.testing.assert_allclose(got, l14_ref["nemo_scores"][5:20], rtol=0, atol=1e-5)


def test_null_rows_keep_the_view(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    """Null rows contribute no leaves: the valid rows are still one view of the child."""
    from nsfw_dask._cudf import CudfBackend

    x = l14_ref["inputs"][:32]
    df = _cudf_frame(cudf, _arrow_lists(x, null_rows=(3, 10)), np.arange(32))
    base, _ = _leaves_buffer(df)
    (seg,) = CudfBackend().to_segments(df, "emb", get_spec("vit-l-14"))
    assert tuple(seg.emb.shape) == (30, 768)
    assert seg.emb.data_ptr() == base
    assert seg.rows is not None
    expected_rows = [i for i in range(32) if i not in (3, 10)]
    assert seg.rows.cpu().tolist() == expected_rows


# ----------------------------------------------------------------------------- (c) nulls


def test_null_rows_score_nan(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    x = l14_ref["inputs"][:50]
    nulls = (0, 7, 49)
    df = _cudf_frame(cudf, _arrow_lists(x, null_rows=nulls), np.arange(50)[::-1] + 500)
    assert df["emb"].null_count == len(nulls)
    got = _check_scored(cudf, score_nsfw(df), df)
    assert np.isnan(got[list(nulls)]).all()
    keep = np.setdiff1d(np.arange(50), nulls)
    assert not np.isnan(got[keep]).any()
    np.testing.assert_allclose(got[keep], l14_ref["nemo_scores"][keep], rtol=0, atol=1e-5)


def test_null_element_scores_nan(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    """A null inside one embedding: that row is NaN (NaN-filled leaves), the others unchanged."""
    x = l14_ref["inputs"][:20]
    df = _cudf_frame(cudf, _arrow_lists(x, null_rows=(2,), null_elements=((5, 100),)), np.arange(20))
    assert df["emb"].list.leaves.null_count == 1
    got = _check_scored(cudf, score_nsfw(df), df)
    assert np.isnan(got[[2, 5]]).all()
    keep = np.setdiff1d(np.arange(20), [2, 5])
    np.testing.assert_allclose(got[keep], l14_ref["nemo_scores"][keep], rtol=0, atol=1e-5)


def test_all_rows_null(cudf: Any) -> None:
    x = np.zeros((6, 768), dtype=np.float32)
    df = _cudf_frame(cudf, _arrow_lists(x, null_rows=tuple(range(6))), np.arange(6))
    got = _check_scored(cudf, score_nsfw(df), df)
    assert np.isnan(got).all()


# ----------------------------------------------------------------------------- (d) errors


def test_ragged_rows_name_column_row_and_lengths(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    x = l14_ref["inputs"][:8]
    rows = [x[i] for i in range(8)]
    rows[3] = rows[3][:767]
    rows[4] = np.concatenate([rows[4], [0.5]]).astype(np.float32)
    arr = pa.array(rows, type=pa.list_(pa.float32()))
    df = _cudf_frame(cudf, arr, [f"r{i}" for i in range(8)])
    assert _host(df["emb"].list.len()).tolist() == [768, 768, 768, 767, 769, 768, 768, 768]
    with pytest.raises(ValueError) as info:
        score_nsfw(df)
    assert isinstance(info.value, EmbeddingFormatError)
    msg = str(info.value)
    for part in ("'emb'", "r3", "767", "768"):
        assert part in msg, f"{part!r} not in {msg!r}"


def test_wrong_width_suggests_the_other_model(cudf: Any, b32_ref: dict[str, np.ndarray]) -> None:
    df = _cudf_frame(cudf, _arrow_lists(b32_ref["inputs"][:10]), np.arange(10))
    with pytest.raises(EmbeddingFormatError, match="vit-b-32"):
        score_nsfw(df)  # default vit-l-14 expects 768


def test_non_float_list_column_is_rejected(cudf: Any) -> None:
    df = cudf.DataFrame({"emb": cudf.Series([[1, 2], [3, 4]], dtype=cudf.ListDtype("int64"))})
    with pytest.raises(EmbeddingFormatError, match="'emb'"):
        score_nsfw(df, column="emb")


# ----------------------------------------------------------------------------- (e) empty


def test_empty_partition(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    df = _cudf_frame(cudf, _arrow_lists(l14_ref["inputs"][:10]), np.arange(10) + 3)
    empty = df.iloc[:0]
    out = score_nsfw(empty)
    assert isinstance(out, cudf.DataFrame)
    assert len(out) == 0
    assert list(out.columns) == ["id", "emb", "nsfw_score"]
    assert out["nsfw_score"].dtype == np.dtype("float32")
    assert out["emb"].dtype == df["emb"].dtype


# ----------------------------------------------------------------------------- (f) dask_cudf


def test_dask_cudf_map_partitions_without_meta(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    import dask

    dask_cudf = pytest.importorskip("dask_cudf")

    x = l14_ref["inputs"][:500]
    index = np.arange(500, dtype=np.int64) * 2 + 10  # monotonic: from_cudf(sort=True) keeps the order
    df = _cudf_frame(cudf, _arrow_lists(x, null_rows=(17, 250)), index)
    single = score_nsfw(df)

    with dask.config.set({"dataframe.backend": "cudf"}):
        ddf = dask_cudf.from_cudf(df, npartitions=5)
        assert ddf.npartitions > 1
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scored = ddf.map_partitions(score_nsfw)
            meta = nsfw_meta(ddf)
            explicit = ddf.map_partitions(score_nsfw, meta=meta)
            via_score = nsfw_dask.score(ddf)

        assert isinstance(scored._meta, cudf.DataFrame)
        assert list(scored._meta.columns) == ["id", "emb", "nsfw_score"]
        assert scored._meta["nsfw_score"].dtype == np.dtype("float32")
        # scored._meta["emb"] is whatever dask_cudf's fake partition held (on the first GPU run its
        # leaves were not float): printed, not asserted; nsfw_meta keeps the collection's own dtype
        print("meta inferred from dask_cudf's fake partition:", dict(scored._meta.dtypes))
        assert isinstance(meta, cudf.DataFrame) and len(meta) == 0
        assert list(meta.columns) == list(scored._meta.columns)
        assert meta["emb"].dtype == df["emb"].dtype

        repartitioned = ddf.repartition(npartitions=3).map_partitions(score_nsfw)
        persisted = ddf.persist(scheduler="sync").map_partitions(score_nsfw)
        for result in (scored, explicit, via_score, repartitioned, persisted):
            res = result.compute(scheduler="sync")
            assert isinstance(res, cudf.DataFrame)
            assert res["emb"].dtype == df["emb"].dtype
            assert list(res.columns) == list(single.columns)
            np.testing.assert_array_equal(res.index.to_numpy(), single.index.to_numpy())
            np.testing.assert_array_equal(_host(res["id"]), _host(single["id"]))
            assert res["nsfw_score"].dtype == np.dtype("float32")
            np.testing.assert_allclose(
                _host(res["nsfw_score"]), _host(single["nsfw_score"]), rtol=0, atol=1e-6, equal_nan=True
            )
    got = _host(single["nsfw_score"])
    assert np.isnan(got[[17, 250]]).all()


@pytest.mark.parametrize("reader", ["read_parquet_embeddings", "dd.read_parquet"])
def test_dask_cudf_parquet_frames_without_meta(
    cudf: Any, tmp_path: Path, l14_ref: dict[str, np.ndarray], reader: str
) -> None:
    """Parquet read under the cudf backend: dask's fake partition describes the embedding column
    as strings ('cat', 'dog'), and ``map_partitions(score_nsfw)`` still needs no ``meta=``; also
    after ``repartition`` and ``persist``."""
    import dask
    import dask.dataframe as dd

    from nsfw_dask.io import read_parquet_embeddings

    pytest.importorskip("dask_cudf")
    x = l14_ref["inputs"][:600]
    (tmp_path / "in").mkdir()
    for i in range(3):
        rows = np.arange(i * 200, (i + 1) * 200)
        arr = _arrow_lists(x[rows])
        table = pa.table({"id": pa.array(rows), "url": pa.array([f"u{r}" for r in rows]), "embedding": arr})
        pa.parquet.write_table(table, tmp_path / "in" / f"part{i}.parquet")
    with dask.config.set({"dataframe.backend": "cudf"}):
        if reader == "read_parquet_embeddings":
            ddf = read_parquet_embeddings(str(tmp_path / "in"))
        else:
            ddf = dd.read_parquet(str(tmp_path / "in"))
        assert isinstance(ddf._meta, cudf.DataFrame)
        frames = {
            "as read": ddf.map_partitions(score_nsfw),
            "repartitioned": ddf.repartition(npartitions=2).map_partitions(score_nsfw),
            "persisted": ddf.persist(scheduler="sync").map_partitions(score_nsfw),
            "score(ddf)": nsfw_dask.score(ddf),  # meta from the collection's meta: the same rule
        }
        for what, scored in frames.items():
            assert list(scored.columns) == ["id", "url", "embedding", "nsfw_score"], what
            assert scored._meta["nsfw_score"].dtype == np.dtype("float32"), what
            res = scored.compute(scheduler="sync").to_pandas().sort_values("id")
            assert res["id"].tolist() == list(range(600)), what
            assert res["url"].tolist() == [f"u{r}" for r in range(600)], what
            np.testing.assert_allclose(
                res["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][:600], rtol=0, atol=1e-5, err_msg=what
            )


def test_dask_cudf_frame_without_embeddings_fails_when_scored(cudf: Any) -> None:
    """No embedding column at all: the graph builds (dask_cudf's meta cannot tell), and the
    partition's one-line EmbeddingColumnError names the columns when it is scored."""
    import dask

    from nsfw_dask import EmbeddingColumnError

    dask_cudf = pytest.importorskip("dask_cudf")
    df = cudf.DataFrame({"id": np.arange(6), "tags": cudf.Series([[1, 2]] * 6, dtype=cudf.ListDtype("int64"))})
    with dask.config.set({"dataframe.backend": "cudf"}):
        scored = dask_cudf.from_cudf(df, npartitions=2).map_partitions(score_nsfw)
        with pytest.raises(EmbeddingColumnError) as info:
            scored.compute(scheduler="sync")
    msg = str(info.value)
    assert "No column of float lists" in msg and "'tags': list<int64>" in msg and "\n" not in msg.strip()


# ----------------------------------------------------------------------------- (g, h) CPU vs GPU


@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_cpu_and_gpu_agree(cudf: Any, request: pytest.FixtureRequest, weights_dir: Path, model: str) -> None:
    ref = request.getfixturevalue(REF_FIXTURE[model])
    x = ref["inputs"]
    n = len(x)
    index = np.arange(n)[::-1] * 5 + 1
    arr = _arrow_lists(x, null_rows=(1, n - 1), null_elements=((4, 0),))
    cpu = score_nsfw(_pandas_frame(arr, index), model=model)
    df = _cudf_frame(cudf, arr, index)
    gpu = score_nsfw(df, model=model)
    got = _check_scored(cudf, gpu, df)
    np.testing.assert_array_equal(gpu.index.to_numpy(), cpu.index.to_numpy())
    np.testing.assert_allclose(got, cpu["nsfw_score"].to_numpy(), rtol=0, atol=1e-5, equal_nan=True)
    assert np.array_equal(np.isnan(got), np.isnan(cpu["nsfw_score"].to_numpy()))
    keep = np.setdiff1d(np.arange(n), [1, 4, n - 1])
    np.testing.assert_allclose(got[keep], _expected(model, ref, weights_dir)[keep], rtol=0, atol=1e-5)

    # and the cuDF frame converted to pandas (Arrow types) scores the same on the CPU
    back = score_nsfw(df.to_pandas(arrow_type=True), model=model)
    np.testing.assert_allclose(back["nsfw_score"].to_numpy(), got, rtol=0, atol=1e-5, equal_nan=True)


def test_pandas_partition_on_cuda(l14_ref: dict[str, np.ndarray]) -> None:
    x = l14_ref["inputs"]
    n = len(x)
    index = np.arange(n)[::-1] + 40
    pdf = _pandas_frame(_arrow_lists(x, null_rows=(0, 9)), index)
    cpu = score_nsfw(pdf)
    gpu = score_nsfw(pdf, device="cuda")
    assert type(gpu) is pd.DataFrame
    assert gpu["nsfw_score"].dtype == np.dtype("float32")
    assert gpu.index.equals(pdf.index)
    assert list(gpu.columns) == ["id", "emb", "nsfw_score"]
    g, c = gpu["nsfw_score"].to_numpy(), cpu["nsfw_score"].to_numpy()
    assert np.isnan(g[[0, 9]]).all()
    np.testing.assert_allclose(g, c, rtol=0, atol=1e-5, equal_nan=True)
    keep = np.setdiff1d(np.arange(n), [0, 9])
    np.testing.assert_allclose(g[keep], l14_ref["nemo_scores"][keep], rtol=0, atol=1e-5)


def test_cudf_partition_on_cpu(cudf: Any, l14_ref: dict[str, np.ndarray]) -> None:
    """``device="cpu"`` for a cuDF frame: scored batch by batch on the CPU, returned as cuDF."""
    x = l14_ref["inputs"][:300]
    df = _cudf_frame(cudf, _arrow_lists(x, null_rows=(5,)), np.arange(300) + 1)
    on_gpu = _host(score_nsfw(df)["nsfw_score"])
    out = score_nsfw(df, device="cpu")
    got = _check_scored(cudf, out, df)
    np.testing.assert_allclose(got, on_gpu, rtol=0, atol=1e-5, equal_nan=True)
    assert np.isnan(got[5])


# ----------------------------------------------------------------------------- exact mode


@pytest.mark.parametrize("model", ["vit-l-14", "vit-b-32"])
def test_exact_mode_matches_keras_on_cuda(cudf: Any, request: pytest.FixtureRequest, model: str) -> None:
    """``exact=True`` on a cuDF partition: the lookup runs on the GPU; LAION's TF scores ≤ 1e-5."""
    ref = request.getfixturevalue(REF_FIXTURE[model])
    x = ref["inputs"]
    n = len(x)
    df = _cudf_frame(cudf, _arrow_lists(x), np.arange(n)[::-1])
    got = _check_scored(cudf, score_nsfw(df, model=model, exact=True), df)
    np.testing.assert_allclose(got, ref["keras_scores"], rtol=0, atol=1e-5)
    # and a pandas partition sent to CUDA, batch by batch
    pdf = _pandas_frame(_arrow_lists(x), np.arange(n))
    g = score_nsfw(pdf, model=model, exact=True, device="cuda")["nsfw_score"].to_numpy()
    np.testing.assert_allclose(g, ref["keras_scores"], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- issue 11: staging


def _native_allocator() -> bool:
    return torch.cuda.memory.get_allocator_backend() == "native"


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("batch_size", [256, 300, 1000])
def test_pandas_half_and_double_on_cuda_in_several_batches(
    l14_ref: dict[str, np.ndarray], dtype: type, batch_size: int
) -> None:
    """A float16 / float64 pandas partition scored with ``device="cuda"`` in 3-11 batches (both
    pinned buffers in turn, batches padded or not): each batch is copied host -> device in its own
    dtype and cast on the GPU.  Against the CPU scores of the same partition: 1e-5, the module's
    CPU-vs-GPU tolerance (float32 GEMMs summed in another order; float16 -> float32 is exact and
    float64 -> float32 rounds the same way on both)."""
    x = l14_ref["inputs"].astype(dtype)
    n = len(x)
    arr = _arrow_lists(x, null_rows=(3, n - 2), value_type=pa.from_numpy_dtype(np.dtype(dtype)))
    pdf = _pandas_frame(arr, np.arange(n) + 11)
    cpu = score_nsfw(pdf, batch_size=batch_size)["nsfw_score"].to_numpy()
    gpu = score_nsfw(pdf, device="cuda", batch_size=batch_size)
    assert type(gpu) is pd.DataFrame and gpu.index.equals(pdf.index)
    g = gpu["nsfw_score"].to_numpy()
    assert g.dtype == np.float32
    assert np.isnan(g[[3, n - 2]]).all() and np.array_equal(np.isnan(g), np.isnan(cpu))
    np.testing.assert_allclose(g, cpu, rtol=0, atol=1e-5, equal_nan=True)
    keep = np.setdiff1d(np.arange(n), [3, n - 2])
    ref = score_nsfw(_pandas_frame(_arrow_lists(x.astype(np.float32)), np.arange(n)))["nsfw_score"].to_numpy()
    np.testing.assert_allclose(g[keep], ref[keep], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.float32])
def test_staging_allocates_no_device_memory_per_batch(dtype: torch.dtype) -> None:
    """The host -> device copy of a float16/float64 batch used to allocate a temporary device
    tensor per batch (torch's ``copy_kernel_cuda``: a cross-device copy that casts needs a
    temporary); now the second pass over 16 batches allocates nothing on the device."""
    from nsfw_dask import load_model
    from nsfw_dask.scoring import score_tensor

    if not _native_allocator():
        pytest.skip("torch's allocation counters exist only for its native allocator")
    dev = torch.device("cuda", torch.cuda.current_device())
    head = load_model("vit-l-14", device=dev)
    bs, batches = 256, 16
    x = torch.randn(bs * batches, 768, dtype=torch.float32).to(dtype)  # CPU, pageable
    out = torch.empty(bs * batches, dtype=torch.float32, device=dev)
    score_tensor(head, x, batch_size=bs, device=dev, out=out)  # buffers, cuBLAS workspace
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_stats(dev)["allocation.all.allocated"]
    score_tensor(head, x, batch_size=bs, device=dev, out=out)
    torch.cuda.synchronize(dev)
    allocated = torch.cuda.memory_stats(dev)["allocation.all.allocated"] - before
    assert allocated == 0, f"{allocated} device allocations for {batches} batches of {dtype}"
    expected = score_tensor(head, x.float().to(dev), batch_size=bs, device=dev)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)  # the same float32 input on the GPU


def test_staging_to_a_device_that_is_not_current(l14_ref: dict[str, np.ndarray]) -> None:
    """``device="cuda:1"`` while device 0 is current: the copies run on device 1's stream, and the
    event that guards each pinned buffer is recorded there too (recorded on device 0's stream it
    would not wait for the copy, and a pinned buffer could be refilled while being read)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    x = l14_ref["inputs"].astype(np.float16)
    pdf = _pandas_frame(_arrow_lists(x, value_type=pa.float16()), np.arange(len(x)))
    cpu = score_nsfw(pdf, batch_size=256)["nsfw_score"].to_numpy()
    for _ in range(3):  # a race would show as a wrong batch now and then
        g = score_nsfw(pdf, device="cuda:1", batch_size=256)["nsfw_score"].to_numpy()
        np.testing.assert_allclose(g, cpu, rtol=0, atol=1e-5)
    assert torch.cuda.current_device() == 0


def test_cudf_frame_is_scored_on_the_device_that_holds_it(cudf: Any, cp: Any, l14_ref: dict[str, np.ndarray]) -> None:
    """The backend's default device is the DLPack tensor's own device, not ``"cuda"`` (torch's
    current device).  cuDF itself runs its kernels on the current device, so the scoring call is
    made with the frame's device current; the device choice is checked with another one current."""
    from nsfw_dask import model_cache_info
    from nsfw_dask._cudf import CudfBackend

    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    x = l14_ref["inputs"][:500]
    torch.cuda.set_device(0)
    with cp.cuda.Device(1):  # the frame's memory on device 1
        df = _cudf_frame(cudf, _arrow_lists(x), np.arange(500))
        (seg,) = CudfBackend().to_segments(df, "emb", get_spec("vit-l-14"))
    assert torch.cuda.current_device() == 0
    assert seg.emb.device == torch.device("cuda", 1)
    # device 0 is current now: "cuda" would mean cuda:0, and every batch would cross devices
    assert CudfBackend().default_device(df) == "cuda:1"
    with cp.cuda.Device(1):  # cuDF's own operations want the frame's device to be current
        got = _host(score_nsfw(df)["nsfw_score"])
    np.testing.assert_allclose(got, l14_ref["nemo_scores"][:500], rtol=0, atol=1e-5)
    assert any(m["device"] == "cuda:1" for m in model_cache_info()["models"])


# ----------------------------------------------------------------------------- determinism on CUDA: one block shape


def test_batch_size_and_partitioning_do_not_change_a_bit(l14_ref: dict[str, np.ndarray]) -> None:
    """Contract item 1 on CUDA: every forward pass is ``CUDA_BLOCK_ROWS`` rows (the tail padded),
    so cuBLAS runs one kernel per layer whatever the batch size: scores are bitwise identical to
    the whole-frame scores at every batch size and slicing, and within 1e-5 of NeMo Curator's
    stored scores (computed on a CPU).  TF32 must be off (it would give ~1e-3).  (Before the fixed
    block, the first H100 run measured 8.1e-6 between batch shapes.)"""
    from nsfw_dask import load_model
    from nsfw_dask._forward import CUDA_BLOCK_ROWS
    from nsfw_dask.scoring import score_tensor

    assert torch.backends.cuda.matmul.allow_tf32 is False, "TF32 matmuls are on in this process"
    assert torch.get_float32_matmul_precision() == "highest"
    dev = torch.device("cuda", torch.cuda.current_device())
    head = load_model("vit-l-14", device=dev)
    x = torch.from_numpy(l14_ref["inputs"]).to(dev)
    whole = score_tensor(head, x, batch_size=len(x), device=dev).cpu()
    np.testing.assert_allclose(whole.numpy(), l14_ref["nemo_scores"], rtol=0, atol=1e-5)
    for bs in (1, 7, 63, 64, 255, 256, 300, 512, 1000, 2048, 4096, CUDA_BLOCK_ROWS + 1):
        got = score_tensor(head, x, batch_size=bs, device=dev).cpu()
        assert torch.equal(got, whole), f"batch_size={bs}: max |diff| {float((got - whole).abs().max()):.2e}"
    # partitions of any length (each its own call), and a frame longer than one block
    cuts = [0, 1, 8, 300, 1757, len(x)]
    parts = torch.cat([score_tensor(head, x[a:b], batch_size=1024, device=dev).cpu() for a, b in zip(cuts, cuts[1:])])
    assert torch.equal(parts, whole)
    big = x.repeat(CUDA_BLOCK_ROWS // len(x) + 2, 1)
    got = score_tensor(head, big, batch_size=len(big), device=dev).cpu()
    assert torch.equal(got, whole.repeat(CUDA_BLOCK_ROWS // len(x) + 2))


# ----------------------------------------------------------------------------- issue 11: releasing buffers


def test_release_gpu_buffers_returns_the_memory() -> None:
    from nsfw_dask import load_model
    from nsfw_dask.gpu import release_gpu_buffers
    from nsfw_dask.scoring import score_tensor

    if not _native_allocator():
        pytest.skip("torch.cuda.memory_allocated needs torch's native allocator")
    dev = torch.device("cuda", torch.cuda.current_device())
    head = load_model("vit-l-14", device=dev)
    n = 65_536
    x = torch.randn(n, 768, device=dev)
    first = score_tensor(head, x, batch_size=n, device=dev).clone()
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    assert release_gpu_buffers() >= 1
    freed = before - torch.cuda.memory_allocated(dev)
    from nsfw_dask._forward import CUDA_BLOCK_ROWS

    buffers = CUDA_BLOCK_ROWS * (768 + 64 + 512 + 256 + 1) * 4  # one block: x_norm and the 4 layer outputs
    assert freed >= 0.9 * buffers, f"freed {freed:,} bytes, the buffers hold {buffers:,}"
    again = score_tensor(head, x, batch_size=n, device=dev)  # allocated again on demand
    assert torch.equal(first, again)
