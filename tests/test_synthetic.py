"""The stack on a synthetic head (``synthetic_model`` in conftest): no LAION files needed.

Layout, commit protocol, resume refusal and error messages do not depend on LAION's weights; these
tests pin them with a tiny random head registered for the test, so they run (and fail) anywhere.
The weight-dependent suites still check the real scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsfw_dask import EmbeddingFormatError, JobError, score_dataset, score_nsfw
from nsfw_dask.pipeline import JOB_FILE, SUCCESS_FILE

from _frames import make_frame, unit_vectors


@pytest.fixture
def client(inprocess_client):
    return inprocess_client


def _npy_folder(root: Path, x: np.ndarray, sizes: list[int]) -> Path:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    start = 0
    for i, n in enumerate(sizes):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", x[start : start + n].astype(np.float16))
        keys = [f"{j:09d}" for j in range(start, start + n)]
        pq.write_table(
            pa.table({"url": [f"https://e.org/{k}.jpg" for k in keys], "key": keys}),
            root / "metadata" / f"metadata_{i}.parquet",
            row_group_size=100,
        )
        start += n
    return root


def test_score_nsfw_on_the_synthetic_head(synthetic_model):
    x = unit_vectors(300)
    df = make_frame({"id": np.arange(300), "emb": x}, index=pd.Index([f"k{i}" for i in range(299, -1, -1)]))
    emb = df["emb"].array._pa_array.combine_chunks()
    with_null = pa.array(emb.to_pylist()[:5] + [None] + emb.to_pylist()[6:], type=emb.type)
    df["emb"] = pd.arrays.ArrowExtensionArray(with_null)
    out = score_nsfw(df, column="emb", model="synthetic")
    assert out.index.equals(df.index) and list(out.columns) == ["id", "emb", "nsfw_score"]
    s = out["nsfw_score"].to_numpy()
    assert s.dtype == np.float32 and np.isnan(s[5]) and np.isfinite(np.delete(s, 5)).all()
    np.testing.assert_allclose(np.delete(s, 5), np.delete(synthetic_model.expected(x), 5), rtol=0, atol=1e-5)


def test_job_layout_commit_and_resume_on_the_synthetic_head(tmp_path, synthetic_model, client):
    x = unit_vectors(1500, seed=1)
    src = _npy_folder(tmp_path / "in", x, [700, 300, 500])
    out = tmp_path / "out"
    s = score_dataset(src, out, model="synthetic", client=client, threshold=0.5, rows_per_partition=400, progress=False)
    assert (s.rows, s.rows_written, s.partitions, s.partitions_reused) == (1500, 1500, 5, 0)
    names = sorted(p.name for p in out.iterdir())
    parts = [n for n in names if n.startswith("part.")]
    assert parts == [
        "part.000000.metadata_0.parquet",
        "part.000001.metadata_0.parquet",
        "part.000002.metadata_1.parquet",
        "part.000003.metadata_2.parquet",
        "part.000004.metadata_2.parquet",
    ]
    assert set(names) == {*parts, JOB_FILE, SUCCESS_FILE}
    table = pa.concat_tables(pq.read_table(out / p) for p in parts)
    assert table.column_names == ["row_number", "url", "key", "nsfw_score", "is_nsfw"]
    np.testing.assert_array_equal(table["row_number"].to_numpy(), np.arange(1500))
    assert table["key"].to_pylist() == [f"{j:09d}" for j in range(1500)]
    want = synthetic_model.expected(x.astype(np.float16).astype(np.float32))
    np.testing.assert_allclose(table["nsfw_score"].to_numpy(), want, rtol=0, atol=1e-5)
    assert table["is_nsfw"].to_pylist() == (table["nsfw_score"].to_numpy() >= 0.5).tolist()
    assert s.over_threshold == int((table["nsfw_score"].to_numpy() >= 0.5).sum())

    with pytest.raises(JobError) as e:  # an existing OUTPUT without --resume: refused
        score_dataset(src, out, model="synthetic", client=client, threshold=0.5, rows_per_partition=400, progress=False)
    assert e.value.code == 2 and "resume=True" in str(e.value)
    with pytest.raises(JobError, match="threshold"):  # resume with another content option: refused
        score_dataset(
            src,
            out,
            model="synthetic",
            client=client,
            threshold=0.4,
            rows_per_partition=400,
            resume=True,
            progress=False,
        )
    before = {p: (out / p).read_bytes() for p in parts}
    (out / parts[2]).unlink()  # as if killed before that part was committed
    (out / SUCCESS_FILE).unlink()
    r = score_dataset(
        src, out, model="synthetic", client=client, threshold=0.5, rows_per_partition=400, resume=True, progress=False
    )
    assert (r.partitions, r.partitions_reused, r.rows) == (5, 4, 1500)
    assert (out / SUCCESS_FILE).exists()
    assert {p: (out / p).read_bytes() for p in parts} == before  # identical to the uninterrupted run


def test_bad_row_names_file_and_row_on_the_synthetic_head(tmp_path, synthetic_model, client):
    x = unit_vectors(40, seed=2)
    rows = [list(r) for r in x]
    rows[17] = rows[17][:767]  # one short row in the second file
    (tmp_path / "in").mkdir()
    for i, (a, b) in enumerate([(0, 10), (10, 40)]):
        pq.write_table(
            pa.table({"id": list(range(a, b)), "embedding": pa.array(rows[a:b], type=pa.list_(pa.float32()))}),
            tmp_path / "in" / f"f{i}.parquet",
        )
    with pytest.raises(EmbeddingFormatError) as e:
        score_dataset(tmp_path / "in", tmp_path / "out", model="synthetic", client=client, progress=False)
    msg = str(e.value)
    assert "f1.parquet" in msg and "row 7" in msg and "767" in msg, msg
    assert not (tmp_path / "out" / SUCCESS_FILE).exists()
