"""Input handling and messages (issue 20, items 5-8): hive-partitioned parquet, our own
``--keep-embeddings`` output scored again, mixed embedding forms in one folder, and the one-line
messages of small mistakes (each phrased for its caller: a flag for the CLI, a keyword in Python).

Job runs call ``score_dataset`` on the session's shared cluster (``conftest.shared_scheduler``):
no cluster of their own, and both runs compared bit for bit are scored by the same worker process.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from nsfw_dask import NSFWScorer, score_nsfw
from nsfw_dask.exceptions import EmbeddingFormatError, JobError, WeightsNotFoundError
from nsfw_dask.pipeline import SUCCESS_FILE, score_dataset

DIM = 768


@pytest.fixture(scope="module")
def client(shared_scheduler):
    from distributed import Client

    with Client(shared_scheduler) as c:
        yield c


@pytest.fixture(scope="module")
def x(l14_ref) -> np.ndarray:
    return l14_ref["inputs"][:600]


@pytest.fixture(scope="module")
def expected(x) -> np.ndarray:
    return NSFWScorer(device="cpu")(x).numpy()


def lists(x: np.ndarray, form: str = "list") -> pa.Array:
    flat = pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x).reshape(-1)), x.shape[1])
    return flat if form == "fixed" else flat.cast(pa.list_(flat.type.value_type))


def write(path: Path, x: np.ndarray, keys: list[str], form: str = "list") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"key": keys, "emb": lists(x, form)}), path, row_group_size=100)


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "nsfw_dask", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )


def one_line_error(r: subprocess.CompletedProcess, code: int) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nsfw-dask: error:"), r.stderr
    return lines[0]


def scores(out: Path, column: str = "nsfw_score") -> np.ndarray:
    assert (out / SUCCESS_FILE).is_file()
    return pads.dataset(out, format="parquet").to_table().column(column).to_numpy()


# ----------------------------------------------------------------------------- 8. messages


@pytest.mark.weights
def test_object_column_of_integer_python_lists_is_converted(x):
    ints = np.rint(x[:20] * 100).astype(np.int64)
    df = pd.DataFrame({"emb": pd.Series([list(map(int, r)) for r in ints], dtype=object)}, index=np.arange(20) * 2)
    got = score_nsfw(df, column="emb")
    want = score_nsfw(
        pd.DataFrame({"emb": pd.Series([r.astype(np.float64) for r in ints], dtype=object)}, index=df.index),
        column="emb",
    )
    assert list(got.index) == list(df.index)
    np.testing.assert_array_equal(
        got["nsfw_score"].to_numpy().view(np.uint32), want["nsfw_score"].to_numpy().view(np.uint32)
    )


def test_named_column_errors_do_not_say_pass_column():
    df = pd.DataFrame({"emb": pd.Series([["a", "b"], ["c"]], dtype=object), "e2": [1, 2]})
    with pytest.raises(EmbeddingFormatError) as e:
        score_nsfw(df, column="emb")
    assert "Cast it" in str(e.value) and "pass column=" not in str(e.value)
    num = pd.DataFrame({"emb": pd.Series([np.zeros(4, np.uint8)], dtype=object)})
    with pytest.raises(EmbeddingFormatError, match="uint8") as e:
        score_nsfw(num, column="emb")
    assert "pass column=" not in str(e.value)


@pytest.mark.weights
def test_nsfw_scorer_refuses_integer_arrays(weights_dir):
    scorer = NSFWScorer(weights_dir, device="cpu")
    for arr in (np.ones((2, DIM), np.int32), np.ones((2, DIM), np.uint8)):
        with pytest.raises(EmbeddingFormatError, match=r"Expected float embeddings .* got (int32|uint8); cast them"):
            scorer(arr)


def test_score_dataset_messages_name_keywords_the_cli_flags(tmp_path, x):
    write(tmp_path / "in" / "p.parquet", x[:5], list("abcde"))
    with pytest.raises(JobError) as e:
        score_dataset(tmp_path / "in", tmp_path / "out", column="nope")
    assert "Pass column= naming" in str(e.value) and "--column" not in str(e.value)
    r = cli("score", str(tmp_path / "in"), str(tmp_path / "out"), "--column", "nope", "--workers", "1")
    line = one_line_error(r, 1)
    assert "Pass --column naming" in line and "column=" not in line


@pytest.mark.weights
def test_missing_model_dir_is_refused_even_with_the_env_set(tmp_path, weights_dir, monkeypatch):
    from nsfw_dask.weights import resolve_weights

    monkeypatch.setenv("NSFW_DASK_MODEL_DIR", str(weights_dir))
    missing = tmp_path / "nonexistent"
    with pytest.raises(
        WeightsNotFoundError, match=re.escape(f"model_dir='{missing}' is not a folder; pass model_dir=")
    ):
        resolve_weights("vit-l-14", missing)
    resolve_weights("vit-l-14", tmp_path)  # an existing folder without the file: the next one is used
    write(tmp_path / "in" / "p.parquet", x_small(), list("abcde"))
    r = cli("score", str(tmp_path / "in"), str(tmp_path / "out"), "--model-dir", str(missing), "--workers", "1")
    line = one_line_error(r, 1)
    assert f"--model-dir {missing} is not a folder" in line and "leave out --model-dir" in line
    assert not (tmp_path / "out").exists()


def x_small() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float32)


def test_cuda_device_without_cuda_is_one_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    df = pd.DataFrame({"emb": pd.arrays.ArrowExtensionArray(lists(x_small()))})
    with pytest.raises(RuntimeError, match=r"^device='cuda': .*; pass device='cpu'") as e:
        score_nsfw(df, device="cuda")
    assert "\n" not in str(e.value) and not isinstance(e.value, AssertionError)


def test_unreachable_scheduler_is_one_line_after_the_given_timeout(tmp_path, x):
    write(tmp_path / "in" / "p.parquet", x[:5], list("abcde"))
    r = cli(
        "score",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "--scheduler",
        "tcp://127.0.0.1:1",
        "--scheduler-timeout",
        "1",
    )
    line = one_line_error(r, 1)
    assert "no Dask scheduler at tcp://127.0.0.1:1 (" in line and "drop --scheduler" in line
    assert "OSError" not in line and not (tmp_path / "out").exists()
    r = cli("score", str(tmp_path / "in"), str(tmp_path / "out"), "--scheduler", "foo:bar")
    assert "is not a Dask scheduler address" in one_line_error(r, 2)
    r = cli("score", "--help")
    assert "--scheduler-timeout" in r.stdout and "(default 10)" in " ".join(r.stdout.split())
