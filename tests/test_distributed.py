"""Once per worker: a 2-process LocalCluster loads the head exactly once per worker process."""

from __future__ import annotations

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster

import nsfw_dask
from nsfw_dask import NSFWModelPlugin, model_cache_info, score_nsfw

from _frames import make_frame

pytestmark = [pytest.mark.weights, pytest.mark.filterwarnings("ignore:Sending large graph:UserWarning")]


@pytest.fixture(scope="module")
def client():
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0", worker_dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        yield c


def _frame(x: np.ndarray) -> pd.DataFrame:
    return make_frame({"emb": x, "i": np.arange(len(x))}, index=np.arange(len(x)) * 2 + 1)


def test_one_load_per_worker_after_many_partitions(client, l14_ref):
    x = l14_ref["inputs"]
    df = _frame(x)
    ddf = dd.from_pandas(df, npartitions=24, sort=False)
    out = ddf.map_partitions(score_nsfw).compute()
    np.testing.assert_allclose(out["nsfw_score"].to_numpy(), l14_ref["nemo_scores"], rtol=0, atol=1e-5)
    assert list(out.index) == list(df.index)
    info = client.run(model_cache_info)
    assert len(info) == 2
    pids = {v["pid"] for v in info.values()}
    assert len(pids) == 2
    for addr, v in info.items():
        assert v["loads"] <= 1, (addr, v)
    assert sum(v["loads"] for v in info.values()) >= 1
    # a second pass loads nothing more
    ddf.map_partitions(score_nsfw).compute()
    info2 = client.run(model_cache_info)
    assert {a: v["loads"] for a, v in info2.items()} == {a: v["loads"] for a, v in info.items()}


def test_plugin_preloads_every_worker(client, l14_ref):
    client.run(nsfw_dask.clear_model_cache)
    client.register_plugin(NSFWModelPlugin("vit-l-14", device="cpu"))
    info = client.run(model_cache_info)
    assert all(v["loads"] == 1 for v in info.values()), info
    assert all(v["models"][0]["device"] == "cpu" and v["models"][0]["model"] == "vit-l-14" for v in info.values())
    df = _frame(l14_ref["inputs"][:600])
    dd.from_pandas(df, npartitions=12, sort=False).map_partitions(score_nsfw).compute()
    assert all(v["loads"] == 1 for v in client.run(model_cache_info).values())


def test_plugin_validates_on_client():
    with pytest.raises(ValueError, match="vit-l-14"):
        NSFWModelPlugin("vit-h-14")


def test_torch_threads_follow_the_worker_budget(client, l14_ref):
    """Issue 4, target 4: no oversubscription.  A nanny starts each worker process with
    OMP_NUM_THREADS=1 (distributed's ``nanny.pre-spawn-environ``), so torch runs one intra-op
    thread per Dask thread: 2 processes x 2 threads use 4 threads, not 4 x 2."""
    import torch

    ddf = dd.from_pandas(_frame(l14_ref["inputs"][:512]), npartitions=4)
    ddf.map_partitions(score_nsfw).compute()
    assert set(client.run(torch.get_num_threads).values()) == {1}
    in_task = client.submit(torch.get_num_threads, pure=False).result()
    assert in_task == 1
