"""``ddf.map_partitions(score_nsfw)`` without ``meta=`` when dask's fake partition is not the data.

dask infers ``meta`` by calling ``score_nsfw`` on a fake partition built from the collection's
meta, and what stands in for the embeddings there depends on the collection: on the first GPU run
(dask_cudf 26.10) a ``dask_cudf.from_cudf`` frame's list column arrived with non-float leaves, and a
``read_parquet_embeddings`` frame under the cudf backend described its embedding column as strings
(``'cat'``, ``'dog'``).  Both made ``map_partitions(score_nsfw)`` fail with "Metadata inference
failed".  The column choice during meta inference is now a pure function of column names and dtype
descriptions (``nsfw_dask._common.meta_inference_column``), tested here with those exact shapes;
the real partition decides when it is scored.

The same happens with pandas partitions whose collection meta says something else than the data
(``dd.from_map(..., meta=...)``), which reproduces the GPU failure on CPU: those tests score real
rows with LAION's weights.  The cuDF descriptions themselves are checked in ``test_gpu_api.py``
(needs the GPU extra), the dask_cudf frames in ``test_gpu.py`` / ``test_gpu_cluster.py`` (needs a GPU).
"""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import nsfw_dask
from nsfw_dask import EmbeddingColumnError, score_nsfw
from nsfw_dask._arrow import describe_dtype
from nsfw_dask._common import is_float_list_description, meta_inference_column

from _frames import embedding_array

pytestmark = pytest.mark.usefixtures("fresh_dask_frames")

# -- the pure function --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        # dask_cudf.from_cudf: dask_cudf's fake list column, leaves not float (cuDF ListDtype(int64))
        ([("id", "int64"), ("emb", "list<int64>")], None),
        # read_parquet_embeddings under the cudf backend: the embedding column described as strings
        ([("id", "int64"), ("embedding", "str"), ("url", "str")], None),
        # the same shapes with an object column (pandas parquet without dtype_backend)
        ([("id", "int64"), ("embedding", "object")], None),
        ([("tags", "list<str>"), ("emb", "list<list<float32>>")], None),
        ([("x", "int64"), ("w", "float32")], None),  # nothing to choose: the partition decides
        ([], None),
        # a float list is sure, whatever sits beside it
        ([("id", "int64"), ("emb", "list<float32>")], "emb"),
        ([("tags", "list<str>"), ("emb", "list<float64>"), ("ids", "list<int64>")], "emb"),
        ([("caption", "str"), ("e", "large_list<float16>")], "e"),
        ([("e", "fixed_size_list<float32>[768]"), ("n", "fixed_size_list<int8>[768]")], "e"),
        ([(0, "list<float32>"), (1, "str")], 0),  # non-string labels
    ],
)
def test_meta_inference_column(columns: list[tuple[object, str]], expected: object) -> None:
    assert meta_inference_column(columns) == expected


def test_meta_inference_column_refuses_several_float_lists() -> None:
    with pytest.raises(EmbeddingColumnError) as info:
        meta_inference_column([("a_emb", "list<float32>"), ("id", "int64"), ("b_emb", "large_list<float16>")])
    msg = str(info.value)
    assert "'a_emb'" in msg and "'b_emb'" in msg and "column=" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "description",
    ["list<float16>", "list<float32>", "list<float64>", "large_list<float32>", "fixed_size_list<float16>[512]"],
)
def test_float_list_descriptions(description: str) -> None:
    assert is_float_list_description(description)


@pytest.mark.parametrize(
    "description",
    ["list", "str", "object", "float32", "list<int64>", "list<str>", "list<list<float32>>", "list<Float32>"],
)
def test_not_float_list_descriptions(description: str) -> None:
    assert not is_float_list_description(description)


@pytest.mark.parametrize(
    ("dtype", "description"),
    [
        (pd.ArrowDtype(pa.list_(pa.float32())), "list<float32>"),
        (pd.ArrowDtype(pa.large_list(pa.float16())), "large_list<float16>"),
        (pd.ArrowDtype(pa.list_(pa.float64(), 768)), "fixed_size_list<float64>[768]"),
        (pd.ArrowDtype(pa.list_(pa.int64())), "list<int64>"),
        (pd.ArrowDtype(pa.list_(pa.string())), "list<str>"),
        (pd.ArrowDtype(pa.list_(pa.list_(pa.float32()))), "list<list<float32>>"),
        (pd.StringDtype(), "str"),
        (np.dtype(object), "object"),
        (np.dtype("int64"), "int64"),
    ],
)
def test_pandas_descriptions(dtype: object, description: str) -> None:
    assert describe_dtype(dtype) == description


# -- pandas collections whose meta is not the data (the GPU failure, reproduced on CPU) ---------

N_PARTS = 3
ROWS = 40


def _part(i: int, x: np.ndarray) -> pd.DataFrame:
    """Partition ``i``: ROWS real rows (id, float32 Arrow list embedding, url), index ``1000 + row``."""
    rows = np.arange(i * ROWS, (i + 1) * ROWS)
    return pd.DataFrame(
        {"id": rows, "embedding": embedding_array(x[rows]), "url": [f"u{r}" for r in rows]},
        index=pd.Index(1000 + rows, name="row"),
    )


def _lying_meta(kind: str) -> pd.DataFrame:
    """The collection's meta, with the embedding column described as dask_cudf described it."""
    emb = {
        "str": pd.Series([], dtype=object).astype(str),  # parquet under the cudf backend: strings
        "list<int64>": pd.Series([], dtype=pd.ArrowDtype(pa.list_(pa.int64()))),  # from_cudf's fake
    }[kind]
    return pd.DataFrame(
        # url: a string column as cuDF has them (an object column would be a candidate itself)
        {"id": pd.Series([], dtype="int64"), "embedding": emb, "url": pd.Series([], dtype=object).astype(str)},
        index=pd.Index([], dtype="int64", name="row"),
    )


def _collection(kind: str, x: np.ndarray) -> dd.DataFrame:
    return dd.from_map(_part, range(N_PARTS), x=x, meta=_lying_meta(kind), enforce_metadata=False)


@pytest.mark.weights
@pytest.mark.parametrize("kind", ["str", "list<int64>"])
def test_map_partitions_without_meta_when_the_fake_partition_is_not_embeddings(l14_ref, kind: str) -> None:
    x = l14_ref["inputs"][: N_PARTS * ROWS]
    ddf = _collection(kind, x)
    scored = ddf.map_partitions(score_nsfw)  # no meta=: failed with "Metadata inference failed" before
    assert list(scored.columns) == ["id", "embedding", "url", "nsfw_score"]
    assert scored._meta["nsfw_score"].dtype == np.float32
    assert nsfw_dask.model_cache_info()["loads"] == 0, "meta inference loaded the model"
    eager = score_nsfw(pd.concat([_part(i, x) for i in range(N_PARTS)]))
    repartitioned = ddf.repartition(npartitions=2).map_partitions(score_nsfw)
    persisted = ddf.persist(scheduler="sync").map_partitions(score_nsfw)
    for got in (scored, repartitioned, persisted):
        out = got.compute(scheduler="sync")
        assert out.index.tolist() == eager.index.tolist()
        assert out["id"].tolist() == eager["id"].tolist() and out["url"].tolist() == eager["url"].tolist()
        assert out["nsfw_score"].dtype == np.float32
        np.testing.assert_allclose(out["nsfw_score"].to_numpy(), eager["nsfw_score"].to_numpy(), rtol=0, atol=1e-6)
        np.testing.assert_allclose(out["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][: len(x)], rtol=0, atol=1e-5)


@pytest.mark.weights
@pytest.mark.parametrize("kind", ["str", "list<int64>"])
def test_explicit_meta_from_a_collection_whose_meta_is_not_embeddings(l14_ref, kind: str) -> None:
    """``nsfw_meta(ddf)`` and ``score(ddf)`` read the collection's meta, which is the schema the
    fake partition came from: the same rule applies (they failed on the parent commit)."""
    x = l14_ref["inputs"][: N_PARTS * ROWS]
    ddf = _collection(kind, x)
    meta = nsfw_dask.nsfw_meta(ddf)
    assert list(meta.columns) == ["id", "embedding", "url", "nsfw_score"] and len(meta) == 0
    assert meta["nsfw_score"].dtype == np.float32 and meta["embedding"].dtype == ddf._meta["embedding"].dtype
    out = nsfw_dask.score(ddf).compute(scheduler="sync")
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), l14_ref["nemo_scores"][: len(x)], rtol=0, atol=1e-5)
    assert nsfw_dask.nsfw_meta(ddf, column="embedding")["nsfw_score"].dtype == np.float32
    with pytest.raises(ValueError, match="score_column 'embedding' is the embedding column"):
        nsfw_dask.nsfw_meta(ddf, column="embedding", score_column="embedding")
    with pytest.raises(EmbeddingColumnError, match="'nope' not found"):
        nsfw_dask.nsfw_meta(ddf, column="nope")


def test_no_embedding_column_fails_when_scored_with_one_line() -> None:
    """A collection that really has no embedding column: the graph builds (its meta cannot tell),
    and scoring a partition raises the one-line EmbeddingColumnError naming the columns."""

    def part(i: int) -> pd.DataFrame:
        return pd.DataFrame({"id": np.arange(3) + 3 * i, "embedding": ["a", "b", "c"]})

    meta = pd.DataFrame({"id": pd.Series([], dtype="int64"), "embedding": pd.Series([], dtype=object).astype(str)})
    ddf = dd.from_map(part, range(2), meta=meta, enforce_metadata=False)
    scored = ddf.map_partitions(score_nsfw)
    assert list(scored.columns) == ["id", "embedding", "nsfw_score"]
    with pytest.raises(EmbeddingColumnError) as info:
        scored.compute(scheduler="sync")
    msg = str(info.value)
    assert "No column of float lists" in msg and "'id'" in msg and "'embedding'" in msg and "column=" in msg
    assert "\n" not in msg.strip()
    assert nsfw_dask.model_cache_info()["loads"] == 0


def test_explicit_column_is_still_checked_against_the_names() -> None:
    """Names are what the fake partition gets right: a missing ``column=`` still fails at once."""
    meta = pd.DataFrame({"id": pd.Series([], dtype="int64")})
    ddf = dd.from_map(lambda i: pd.DataFrame({"id": [i]}), range(2), meta=meta)
    with pytest.raises(Exception, match="'nope' not found"):
        ddf.map_partitions(score_nsfw, column="nope")
