"""score_nsfw through Dask: meta, schedulers, partitions, parity with NSFWScorer and NeMo."""

from __future__ import annotations

import warnings

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import nsfw_dask
from nsfw_dask import NSFWScorer, nsfw_meta, score_nsfw

from _frames import embedding_array

pytestmark = [pytest.mark.weights, pytest.mark.usefixtures("fresh_dask_frames")]


_arrow_col = embedding_array


@pytest.fixture(scope="module")
def frame(l14_ref) -> pd.DataFrame:
    x = l14_ref["inputs"]
    n = len(x)
    # a non-default, non-monotonic index and other columns of several dtypes
    idx = pd.Index([f"img-{i * 7919 % n:05d}" for i in range(n)], name="key")
    return pd.DataFrame(
        {
            "url": [f"https://example.org/{i}.jpg" for i in range(n)],
            "width": np.arange(n, dtype=np.int32),
            "embedding": _arrow_col(x),
            "flag": pd.array([i % 3 == 0 for i in range(n)], dtype="boolean"),
        },
        index=idx,
    )


def test_single_partition_matches_nemo(frame, l14_ref):
    out = score_nsfw(frame)
    assert list(out.columns) == [*frame.columns, "nsfw_score"]
    assert out["nsfw_score"].dtype == np.float32
    pd.testing.assert_index_equal(out.index, frame.index)
    pd.testing.assert_frame_equal(out[frame.columns], frame)
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), l14_ref["nemo_scores"], rtol=0, atol=1e-5)
    assert "nsfw_score" not in frame.columns  # input not mutated


@pytest.mark.parametrize("scheduler", ["sync", "threads"])
def test_map_partitions_without_meta_identical_to_scorer(frame, scheduler):
    ddf = dd.from_pandas(frame, npartitions=7, sort=False)
    assert ddf.npartitions >= 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scored = ddf.map_partitions(score_nsfw)  # meta inferred on dask's fake partition
    assert nsfw_dask.model_cache_info()["loads"] == 0, "meta inference must not load the model"
    assert scored._meta["nsfw_score"].dtype == np.float32
    assert list(scored.columns) == [*frame.columns, "nsfw_score"]
    out = scored.compute(scheduler=scheduler)
    expected = NSFWScorer(device="cpu")(np.stack(frame["embedding"].to_numpy())).numpy()
    pd.testing.assert_index_equal(out.index, frame.index)
    pd.testing.assert_frame_equal(out[frame.columns], frame)
    # row for row: the same rows in the same order, equal to float32 rounding (a short last batch
    # in a partition may use another GEMM kernel than the same rows inside a full batch)
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert nsfw_dask.model_cache_info()["loads"] == 1
    # partitions aligned with the batches: bitwise identical
    aligned = dd.from_pandas(frame, chunksize=1024, sort=False).map_partitions(score_nsfw, batch_size=1024)
    assert aligned.npartitions == 3
    np.testing.assert_array_equal(aligned.compute(scheduler=scheduler)["nsfw_score"].to_numpy(), expected)


def test_explicit_meta_and_score_helper(frame):
    ddf = dd.from_pandas(frame, npartitions=5, sort=False)
    meta = nsfw_meta(ddf)
    assert len(meta) == 0 and meta["nsfw_score"].dtype == np.float32
    assert list(meta.columns) == [*frame.columns, "nsfw_score"]
    assert nsfw_dask.model_cache_info()["loads"] == 0
    a = ddf.map_partitions(score_nsfw, meta=meta).compute(scheduler="sync")
    b = nsfw_dask.score(ddf, score_column="p").compute(scheduler="sync")
    np.testing.assert_array_equal(a["nsfw_score"].to_numpy(), b["p"].to_numpy())


def test_parquet_roundtrip_pyarrow_and_object(tmp_path, frame):
    frame.to_parquet(tmp_path / "data.parquet", row_group_size=500)
    ref = score_nsfw(frame)["nsfw_score"].to_numpy()
    arrow = dd.read_parquet(tmp_path / "data.parquet", dtype_backend="pyarrow", split_row_groups=True)
    assert arrow.npartitions >= 5
    got = arrow.map_partitions(score_nsfw).compute(scheduler="sync")
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), ref, rtol=0, atol=1e-6)
    assert list(got.index) == list(frame.index)
    # default read: the list column arrives as an object column of numpy arrays (one copy, same scores)
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, tmp_path / "plain.parquet", row_group_size=500)  # as other writers do
    obj = dd.read_parquet(tmp_path / "plain.parquet", split_row_groups=True)
    assert obj["embedding"].dtype == object
    got = obj.map_partitions(score_nsfw, column="embedding").compute(scheduler="sync")
    np.testing.assert_allclose(got["nsfw_score"].to_numpy(), ref, rtol=0, atol=1e-6)


def test_b32_and_options(b32_ref):
    x = b32_ref["inputs"]
    df = pd.DataFrame({"image_embedding": _arrow_col(x)}, index=np.arange(len(x))[::-1])
    ddf = dd.from_pandas(df, npartitions=6, sort=False)
    out = ddf.map_partitions(
        score_nsfw, column="image_embedding", model="vit-b-32", batch_size=4096, score_column="punsafe"
    ).compute(scheduler="sync")
    assert out["punsafe"].dtype == np.float32
    expected = NSFWScorer(model="vit-b-32", device="cpu")(x).numpy()
    np.testing.assert_allclose(out["punsafe"].to_numpy(), expected, rtol=0, atol=1e-6)
    assert list(out.index) == list(df.index)


def test_wrong_model_for_dimension_names_the_fix(b32_ref):
    df = pd.DataFrame({"emb": _arrow_col(b32_ref["inputs"][:3])}, index=["a", "b", "c"])
    with pytest.raises(nsfw_dask.EmbeddingFormatError, match=r"'emb'.*row 'a'.*512.*768.*vit-b-32"):
        score_nsfw(df)


def test_error_surfaces_from_dask_compute(l14_ref):
    x = l14_ref["inputs"][:20]
    rows = [list(r) for r in x]
    rows[13] = rows[13][:767]
    df = pd.DataFrame(
        {"emb": pd.arrays.ArrowExtensionArray(pa.array(rows, type=pa.list_(pa.float32())))},
        index=pd.RangeIndex(100, 120),
    )
    scored = dd.from_pandas(df, npartitions=4, sort=False).map_partitions(score_nsfw)  # meta: fine
    with pytest.raises(ValueError, match=r"row 113 has 767 values, expected 768"):
        scored.compute(scheduler="sync")


def test_missing_column_fails_at_graph_construction(frame):
    ddf = dd.from_pandas(frame, npartitions=2, sort=False)
    with pytest.raises(Exception, match="'nope' not found"):
        ddf.map_partitions(score_nsfw, column="nope")


def test_meta_inference_object_column_and_all_null(frame):
    # object column (parquet without dtype_backend): the fake partition holds sentinels, not arrays
    obj = frame.assign(
        embedding=pd.Series(list(np.stack(frame["embedding"].to_numpy())), index=frame.index, dtype=object)
    )
    ddf = dd.from_pandas(obj, npartitions=3, sort=False)
    scored = ddf.map_partitions(score_nsfw)
    assert scored._meta["nsfw_score"].dtype == np.float32
    assert nsfw_dask.model_cache_info()["loads"] == 0
    np.testing.assert_allclose(
        scored.compute(scheduler="sync")["nsfw_score"].to_numpy(),
        score_nsfw(frame)["nsfw_score"].to_numpy(),
        rtol=0,
        atol=1e-6,
    )


def test_scorer_nemo_api(l14_ref, weights_dir):
    s = NSFWScorer(str(weights_dir), device="cpu")
    assert s.model_id_names == ["laion/clip-autokeras-binary-nsfw"]
    s.setup()
    x = l14_ref["inputs"][:64]
    import torch

    out_np = s(x)
    out_t = s(torch.from_numpy(x.copy()))
    assert out_np.shape == (64,) and out_np.dtype == torch.float32
    torch.testing.assert_close(out_np, out_t, rtol=0, atol=0)
    np.testing.assert_allclose(out_np.numpy(), l14_ref["nemo_scores"][:64], rtol=0, atol=1e-5)
    ro = x.copy()
    ro.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(s(ro), out_np, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\(batch, 768\)"):
        s(np.zeros((2, 512), np.float32))


def test_model_state_dict_keys_match_laion(weights_dir):
    import torch

    for name, fname, n_lin in [
        ("vit-l-14", "clip_ViT-L-14_openai_binary_nsfw_head.pth", 4),
        ("vit-b-32", "clip_ViT-B-32_openai_binary_nsfw_head.pth", 3),
    ]:
        sd = torch.load(weights_dir / fname, weights_only=True)
        m = nsfw_dask.NSFWModel(name) if name != "vit-l-14" else nsfw_dask.NSFWModel()
        assert set(m.state_dict()) == set(sd)
        assert set(sd) == {"norm.mean", "norm.variance"} | {
            f"linear_{i}.{p}" for i in range(1, n_lin + 1) for p in ("weight", "bias")
        }
        m.load_state_dict(sd, strict=True)
        assert m(torch.zeros(5, m.spec.dim)).shape == (5, 1)


def test_clear_model_cache_frees_model_and_buffers(frame):
    """A runner (per-thread work buffers) must not keep its model alive: after
    clear_model_cache the model and every runner's buffers are gone (they leaked before)."""
    import gc
    import weakref

    from nsfw_dask import clear_model_cache, load_model
    from nsfw_dask._forward import _all_runners

    model = load_model("vit-l-14", device="cpu")
    out = score_nsfw(frame.iloc[:300], column="embedding")
    assert out["nsfw_score"].notna().all()
    assert any(r.capacity > 0 for r in _all_runners)
    ref = weakref.ref(model)
    del model
    clear_model_cache()
    gc.collect()
    assert ref() is None
    assert all(r.capacity == 0 for r in _all_runners)
