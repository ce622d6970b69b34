"""Issue 20 item 1: embeddings that are not unit length are never scored silently.

LAION's heads were trained on L2-normalised CLIP embeddings; raw ``encode_image`` outputs have
norms of ~10-30 and get confident, wrong scores.  What is checked here:

* the hazard itself, on the reference set's unit rows ``x`` and ``15 * x`` (the issue's figures);
* ``score_nsfw`` / ``NSFWScorer``: a :class:`NotUnitNormWarning` for clearly non-unit input (none
  for unit input), ``normalize=True`` scores ``15 * x`` as ``x`` (within the contract's 1e-5; a
  zero vector gets NaN), ``norm_check=False`` silences the warning, and normalised scores do not
  depend on the batch size (bitwise);
* the job: a clearly non-unit partition fails with one line naming the file, the rows, the median
  norm and both fixes (as flags for the CLI, keywords for ``score_dataset``); ``--normalize`` and
  ``--no-norm-check`` run; the summary and ``--json`` report norm quantiles and counts;
  ``--resume`` with another ``--normalize`` is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nsfw_dask import EmbeddingNormError, NotUnitNormWarning, NSFWScorer, score_dataset, score_nsfw
from nsfw_dask._norms import NORM_TOL, norm_quantiles, norm_stats

from _frames import embedding_array, make_frame

pytestmark = pytest.mark.weights

#: Contract item 2 (tests/test_contract.py): a normalised row and the row it came from are the
#: same embedding up to float32 rounding of the scaling, so within the contract's 1e-5.
TOL = 1e-5
N = 1000


@pytest.fixture(scope="module")
def unit(l14_ref) -> np.ndarray:
    """The reference set's first 1,000 unit-norm Gaussian rows (``normalized_gaussian``)."""
    x = np.ascontiguousarray(l14_ref["inputs"][:N])
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    return x


def _scores(df: pd.DataFrame) -> np.ndarray:
    return df["nsfw_score"].to_numpy(np.float32)


def _frame(x: np.ndarray) -> pd.DataFrame:
    return make_frame({"id": np.arange(len(x)), "emb": x})


def test_the_hazard_raw_embeddings_get_confident_wrong_scores(unit):
    """Why the check exists (the issue's figures): scaling unit rows by 15, as raw CLIP outputs
    are, moves scores by up to ~1 and turns most rows 'NSFW'."""
    s1 = _scores(score_nsfw(_frame(unit)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUnitNormWarning)
        s15 = _scores(score_nsfw(_frame(15 * unit)))
    assert np.abs(s15 - s1).max() > 0.99
    assert np.mean(s1 >= 0.5) < 0.01 and np.mean(s15 >= 0.5) > 0.5


def test_score_nsfw_warns_on_raw_embeddings_and_not_on_unit_ones(unit):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at all for unit rows
        score_nsfw(_frame(unit))
    with pytest.warns(NotUnitNormWarning) as rec:
        out = score_nsfw(_frame(15 * unit))
    msg = str(rec[0].message)
    assert "\n" not in msg and "Column 'emb'" in msg and "median L2 norm 15" in msg, msg
    assert "normalize=True" in msg and "norm_check=False" in msg, msg
    assert rec[0].filename == __file__  # points at the caller's line
    assert len(out) == N and out.index.equals(pd.RangeIndex(N))  # a warning: still scored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        score_nsfw(_frame(15 * unit), norm_check=False)  # told: silent


def test_normalize_scores_raw_rows_as_their_unit_rows(unit):
    want = _scores(score_nsfw(_frame(unit)))
    raw = 15 * unit
    raw[::7] *= 3.0  # every norm differs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # normalize: no warning either
        got = score_nsfw(_frame(raw), normalize=True)
    np.testing.assert_allclose(_scores(got), want, rtol=0, atol=TOL)
    assert got["id"].tolist() == list(range(N))


def test_normalize_gives_nan_for_a_zero_vector_and_only_there(unit):
    x = 15 * unit[:300].copy()
    x[[0, 77, 299]] = 0.0
    s = _scores(score_nsfw(_frame(x), normalize=True))
    assert np.flatnonzero(np.isnan(s)).tolist() == [0, 77, 299]
    want = _scores(score_nsfw(_frame(unit[:300])))
    keep = np.ones(300, bool)
    keep[[0, 77, 299]] = False
    np.testing.assert_allclose(s[keep], want[keep], rtol=0, atol=TOL)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_normalize_is_bitwise_independent_of_batch_size(unit, dtype):
    x = (11 * unit[:300]).astype(dtype)  # batch 1: a padded 1,024-row pass per row
    pa_type = pa.list_(pa.from_numpy_dtype(np.dtype(dtype)))
    df = make_frame({"emb": embedding_array(x, pa_type)})
    assert df["emb"].dtype.pyarrow_dtype == pa_type  # the column is really of this dtype
    got = {bs: _scores(score_nsfw(df, normalize=True, batch_size=bs)) for bs in (1, 7, 256, None)}
    for bs, s in got.items():
        assert np.array_equal(s.view(np.uint32), got[None].view(np.uint32)), bs


def test_normalize_through_dask_without_meta(unit):
    ddf = dd.from_pandas(_frame(15 * unit), npartitions=3, sort=False)
    got = ddf.map_partitions(score_nsfw, normalize=True).compute(scheduler="threads")
    np.testing.assert_allclose(_scores(got), _scores(score_nsfw(_frame(unit))), rtol=0, atol=TOL)
    assert got["id"].tolist() == list(range(N))


def test_nsfw_scorer_warns_and_normalizes(unit):
    scorer = NSFWScorer(device="cpu")
    want = scorer(unit).numpy()
    with pytest.warns(NotUnitNormWarning, match="median L2 norm 15"):
        scorer(15 * unit)
    got = NSFWScorer(device="cpu", normalize=True)(15 * unit).numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NSFWScorer(device="cpu", norm_check=False)(15 * unit)


def test_norm_stats_and_quantiles():
    norms = np.array([1.0, 1.005, 0.98, 15.0, 0.0, np.nan], np.float32)
    st = norm_stats(norms)
    assert st["norm_off_unit"] == 3 and st["norm_zero"] == 1 and st["norm_rows"] == 5  # 0.98, 15, 0
    assert st["norm_median"] == pytest.approx(1.0)
    q = norm_quantiles(st["norm_histogram"])
    assert q["p01"] is not None and q["p01"] <= 1e-4  # the zero vector: the first bin
    assert q["p50"] == pytest.approx(1.0, rel=0.024) and q["p99"] == pytest.approx(15.0, rel=0.024)
    assert NORM_TOL == 0.01


# ----------------------------------------------------------------------------- the job


def _npy_folder(root: Path, x: np.ndarray, files: int = 2, dtype: type = np.float16) -> Path:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for i, part in enumerate(np.array_split(x, files)):
        np.save(root / "img_emb" / f"img_emb_{i}.npy", part.astype(dtype))
        pd.DataFrame({"key": [f"{i}-{j}" for j in range(len(part))]}).to_parquet(
            root / "metadata" / f"metadata_{i}.parquet"
        )
    return root


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nsfw_dask", "score", *args], capture_output=True, text=True)


def _read(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(f) for f in sorted(out.glob("part.*.parquet"))], ignore_index=True)


def test_cli_refuses_raw_embeddings_with_one_line(tmp_path, unit, shared_scheduler):
    src = _npy_folder(tmp_path / "raw", 15 * unit)
    out = tmp_path / "out"
    r = _cli(str(src), str(out), "--scheduler", shared_scheduler, "--no-progress")
    assert r.returncode == 1, (r.returncode, r.stderr)
    line = r.stderr.strip()
    assert "\n" not in line, r.stderr
    assert "img_emb_0.npy, rows 0-499 of that file" in line or "img_emb_1.npy, rows 0-499 of that file" in line, line
    assert "not L2-normalised (median L2 norm 15" in line and "--normalize" in line and "--no-norm-check" in line
    assert not (out / "_SUCCESS").exists()


def test_cli_normalize_and_no_norm_check(tmp_path, unit, shared_scheduler):
    common = ["--scheduler", shared_scheduler, "--no-progress", "--json"]
    # float32 on disk: float16 rounding would make the two folders hold other embeddings (~1e-3)
    ref = _npy_folder(tmp_path / "unit", unit, dtype=np.float32)
    raw = _npy_folder(tmp_path / "raw", 15 * unit, dtype=np.float32)
    runs = {
        "unit": _cli(str(ref), str(tmp_path / "o_unit"), *common),
        "normalize": _cli(str(raw), str(tmp_path / "o_norm"), "--normalize", *common),
        "as_is": _cli(str(raw), str(tmp_path / "o_asis"), "--no-norm-check", *common),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
    s = {name: json.loads(r.stdout) for name, r in runs.items()}
    assert s["unit"]["norms"]["off_unit"] == 0 and s["unit"]["norms"]["p50"] == pytest.approx(1.0, rel=0.024)
    for name in ("normalize", "as_is"):
        assert s[name]["norms"]["off_unit"] == N and s[name]["norms"]["p50"] == pytest.approx(15.0, rel=0.024)
    assert s["normalize"]["norms"]["normalized"] is True and s["unit"]["norms"]["normalized"] is False
    unit_scores = _read(tmp_path / "o_unit")["nsfw_score"].to_numpy(np.float32)
    norm_scores = _read(tmp_path / "o_norm")["nsfw_score"].to_numpy(np.float32)
    np.testing.assert_allclose(norm_scores, unit_scores, rtol=0, atol=TOL)
    asis = _read(tmp_path / "o_asis")
    assert asis["key"].tolist() == [f"{i}-{j}" for i in range(2) for j in range(500)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUnitNormWarning)
        want = score_nsfw(_frame(15 * unit))["nsfw_score"].to_numpy(np.float32)
    assert np.array_equal(asis["nsfw_score"].to_numpy(np.float32).view(np.uint32), want.view(np.uint32))
    # --normalize changes the scores: it is part of the job, and --resume without it is refused
    r = _cli(str(raw), str(tmp_path / "o_norm"), "--resume", "--scheduler", shared_scheduler, "--no-progress")
    assert r.returncode == 2 and "--normalize was True, now None" in r.stderr, r.stderr
    meta = pq.read_schema(next((tmp_path / "o_norm").glob("part.*.parquet"))).metadata[b"nsfw_dask.part"]
    assert json.loads(meta)["norm_off_unit"] == 500  # per part, in the footer: a resumed summary has it


def test_score_dataset_names_keywords_and_counts_zero_vectors(tmp_path, unit, shared_scheduler):
    from distributed import Client

    raw = 15 * unit
    raw[[3, 600]] = 0.0
    src = _npy_folder(tmp_path / "raw", raw)
    with Client(shared_scheduler) as client:
        with pytest.raises(EmbeddingNormError) as e:
            score_dataset(src, tmp_path / "o1", client=client)
        msg = str(e.value)
        assert "normalize=True" in msg and "norm_check=False" in msg and "--" not in msg, msg
        s = score_dataset(src, tmp_path / "o2", client=client, normalize=True)
    assert s.norms["zero"] == 2 and s.nan_scores == 2 and s.norms["off_unit"] == N
    got = _read(tmp_path / "o2")
    assert np.flatnonzero(got["nsfw_score"].isna().to_numpy()).tolist() == [3, 600]
