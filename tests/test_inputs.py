"""Input handling and messages (issue 20, items 5-8): hive-partitioned parquet, our own
``--keep-embeddings`` output scored again, mixed embedding forms in one folder, and the one-line
messages of small mistakes (each phrased for its caller: a flag for the CLI, a keyword in Python).

Job runs call ``score_dataset`` on the session's shared cluster (``conftest.shared_scheduler``):
no cluster of their own, and both runs compared bit for bit are scored by the same worker process.
"""

from __future__ import annotations

import json
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
from nsfw_dask.pipeline import JOB_FILE, SUCCESS_FILE, plan_input, score_dataset

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


# ----------------------------------------------------------------------------- 5. hive partitions


HIVE_FILES = [  # (relative path, rows of x)
    ("year=2020/lang=en/part-0.parquet", slice(0, 150)),
    ("year=2020/lang=en/part-1.parquet", slice(150, 250)),
    ("year=2021/lang=__HIVE_DEFAULT_PARTITION__/part-0.parquet", slice(250, 300)),
    ("year=2021/lang=de/part-0.parquet", slice(300, 450)),
    ("year=2021/lang=pt%20BR/part-0.parquet", slice(450, 600)),
]


@pytest.fixture()
def hive(tmp_path, x) -> Path:
    root = tmp_path / "hive"
    for rel, rows in HIVE_FILES:
        write(root / rel, x[rows], [f"k{j}" for j in range(rows.start, rows.stop)])
    return root


@pytest.mark.weights
def test_hive_partition_columns_are_kept_as_pyarrow_reads_them(tmp_path, client, hive, x, expected):
    out = tmp_path / "out"
    score_dataset(hive, out, client=client, rows_per_partition=100)
    # the source path relative to INPUT in each part's name, in the input's order
    names = sorted(p.name for p in out.glob("part.*.parquet"))
    assert names[:3] == [
        "part.000000.year=2020.lang=en.part-0.parquet",
        "part.000001.year=2020.lang=en.part-0.parquet",
        "part.000002.year=2020.lang=en.part-1.parquet",
    ], names
    assert names[-1] == "part.000007.year=2021.lang=pt-20BR.part-0.parquet", names
    got = pads.dataset(out, format="parquet").to_table()
    ref = pads.dataset(hive, format="parquet", partitioning="hive").to_table()
    # after the file's columns, with pyarrow.dataset's types (int32 year, string lang)
    assert got.column_names == ["key", "year", "lang", "nsfw_score"]
    assert got.schema.field("year").type == ref.schema.field("year").type == pa.int32()
    assert got.schema.field("lang").type == ref.schema.field("lang").type == pa.string()
    # row for row the values pyarrow reads from the paths (null for __HIVE_DEFAULT_PARTITION__)
    ref = ref.sort_by([("key", "ascending")])
    order = np.argsort(got.column("key").to_numpy(zero_copy_only=False), kind="stable")
    assert got.column("key").to_pylist() == [f"k{j}" for j in range(600)]
    for name in ("key", "year", "lang"):
        assert got.column(name).take(order).to_pylist() == ref.column(name).to_pylist(), name
    assert got.column("lang").to_pylist()[250:300] == [None] * 50
    assert set(got.column("lang").to_pylist()[450:]) == {"pt BR"}
    np.testing.assert_allclose(got.column("nsfw_score").to_numpy(), expected, rtol=0, atol=1e-6)
    # plain readers see them too
    df = pd.read_parquet(out)
    assert list(df.columns) == ["key", "year", "lang", "nsfw_score"] and df["year"].tolist()[:1] == [2020]
    job = json.loads((out / JOB_FILE).read_text())
    assert job["partition_columns"] == [["year", "int32"], ["lang", "string"]]


@pytest.mark.weights
def test_hive_resume_refused_when_a_partition_value_changes(tmp_path, client, hive):
    out = tmp_path / "out"
    score_dataset(hive, out, client=client)
    (hive / "year=2021" / "lang=de").rename(hive / "year=2021" / "lang=fr")
    with pytest.raises(JobError, match=r"input file\(s\) are gone.*lang=de") as e:
        score_dataset(hive, out, client=client, resume=True)
    assert "overwrite=True" in str(e.value) and "--overwrite" not in str(e.value)
    # a value that changes the inferred type (year no longer int32) is named as such
    (hive / "year=2021").rename(hive / "year=twenty-one")
    with pytest.raises(JobError, match=r"hive partition columns were \[\['year', 'int32'\]"):
        score_dataset(hive, out, client=client, resume=True)


def test_hive_columns_clashing_with_file_or_added_columns_are_refused(tmp_path, x):
    write(tmp_path / "a" / "key=1" / "f.parquet", x[:5], list("abcde"))
    with pytest.raises(JobError, match=r"hive partition folders key=\.\.\. but its files already have a column 'key'"):
        plan_input(tmp_path / "a")
    write(tmp_path / "b" / "nsfw_score=1" / "f.parquet", x[:5], list("abcde"))
    with pytest.raises(JobError, match=r"INPUT already has a column 'nsfw_score'; pass score_column="):
        score_dataset(tmp_path / "b", tmp_path / "out")
    r = cli("score", str(tmp_path / "b"), str(tmp_path / "out2"), "--workers", "1")
    assert "pass --score-column" in one_line_error(r, 2)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


HIVE_INFERENCE_CASES = {
    "int32-or-string": ["x=1/f.parquet", "x=3000000000/f.parquet"],  # beyond int32: string
    "negative-and-leading-zero": ["x=-1/f.parquet", "x=07/f.parquet"],
    "float-is-string": ["x=1.5/f.parquet", "x=2/f.parquet"],
    "null": ["x=__HIVE_DEFAULT_PARTITION__/f.parquet", "x=2/f.parquet"],
    "empty-value": ["x=/f.parquet", "x=2/f.parquet"],
    "plain-folders-skipped": ["d/x=1/f.parquet", "g.parquet", "x=2/e/f.parquet"],
    "uri-encoded": ["x=a%2Fb/f.parquet", "x=c%20d/f.parquet"],
    "two-keys-any-order": ["x=1/y=a/f.parquet", "y=b/x=2/f.parquet"],
    "plus-sign": ["x=+5/f.parquet", "x=5/f.parquet"],
}


@pytest.mark.parametrize("case", sorted(HIVE_INFERENCE_CASES))
def test_hive_inference_matches_pyarrow_dataset(tmp_path, case):
    root = tmp_path / case
    for i, rel in enumerate(HIVE_INFERENCE_CASES[case]):
        write(root / rel, np.full((1, 4), i, np.float32), [rel])
    plan = plan_input(root, model="vit-l-14")  # list<float> of any length passes the plan
    ref = pads.dataset(root, format="parquet", partitioning="hive")
    names = [n for n in ref.schema.names if n not in ("key", "emb")]
    assert [n for n, _ in plan.partition_columns] == names
    assert [str(t) for _, t in plan.partition_columns] == [str(ref.schema.field(n).type) for n in names]
    table = ref.to_table()
    want = {k: tuple(table.column(n)[i].as_py() for n in names) for i, k in enumerate(table.column("key").to_pylist())}
    got = {plan.files[p.index]["path"][len(str(root)) + 1 :]: p.partition_values for p in plan.parts}
    assert got == want


def test_part_names_carry_the_path_below_input(tmp_path, x):
    write(tmp_path / "in" / "a" / "x.parquet", x[:3], ["a", "b", "c"])
    write(tmp_path / "in" / "b" / "x.parquet", x[:3], ["a", "b", "c"])
    write(tmp_path / "in" / "top.parquet", x[:3], ["a", "b", "c"])
    assert [p.name for p in plan_input(tmp_path / "in").parts] == [
        "part.000000.a.x.parquet",
        "part.000001.b.x.parquet",
        "part.000002.top.parquet",
    ]
    # a glob: below its folder above the first wildcard; one file: its name
    assert [p.name for p in plan_input(str(tmp_path / "in" / "*" / "x.parquet")).parts] == [
        "part.000000.a.x.parquet",
        "part.000001.b.x.parquet",
    ]
    assert [p.name for p in plan_input(tmp_path / "in" / "a" / "x.parquet").parts] == ["part.000000.x.parquet"]


# ----------------------------------------------------------------------------- 6. our own binary output


def test_binary_as_lists_is_a_view_with_nulls_kept():
    from nsfw_dask.io import binary_as_lists, binary_embedding_dtype

    x = np.arange(5 * 4, dtype=np.float16).reshape(5, 4)
    valid = np.array([True, True, False, True, True])
    b = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(8), 5, [pa.array(valid).buffers()[1], pa.py_buffer(x)], null_count=1
    ).slice(1, 3)
    got = binary_as_lists(b, np.dtype("float16"))
    assert got.type == pa.list_(pa.float16(), 4)
    assert got.to_pylist() == [x[1].tolist(), None, x[3].tolist()]
    assert got.values.buffers()[1].address == b.buffers()[1].address  # the same memory: no copy
    field = pa.field("e", pa.binary(8), metadata={b"nsfw_dask.embedding": b'{"dtype": "float16"}'})
    assert binary_embedding_dtype(field) == np.dtype("float16")
    assert binary_embedding_dtype(pa.field("e", pa.binary(8))) is None


@pytest.mark.weights
@pytest.mark.parametrize("source", ["parquet_npy float16", "parquet list<float32> with null rows"])
def test_keep_embeddings_output_scores_again_bit_for_bit(tmp_path, client, x, source):
    src = tmp_path / "in"
    if source.startswith("parquet_npy"):
        (src / "img_emb").mkdir(parents=True)
        (src / "metadata").mkdir()
        np.save(src / "img_emb" / "img_emb_0.npy", x.astype(np.float16))
        pq.write_table(pa.table({"key": [f"k{j}" for j in range(len(x))]}), src / "metadata" / "metadata_0.parquet")
        column = "embedding"
    else:
        arr = lists(x)
        arr = pa.array([None if j % 7 == 3 else v for j, v in enumerate(arr.to_pylist())], type=arr.type)
        src.mkdir()
        pq.write_table(pa.table({"key": [f"k{j}" for j in range(len(x))], "emb": arr}), src / "p.parquet")
        column = "emb"
    out1, out2, out3 = tmp_path / "out1", tmp_path / "out2", tmp_path / "out3"
    score_dataset(src, out1, client=client, keep_embeddings=True, rows_per_partition=250)
    assert pads.dataset(out1).schema.field(column).type == pa.binary(DIM * (2 if "float16" in source else 4))
    # named, and found without --column (our binary form is the only embedding column)
    score_dataset(out1, out2, client=client, column=column, score_column="again", keep_embeddings=True)
    score_dataset(out1, out3, client=client, score_column="again", keep_embeddings="list")
    first, again = scores(out1), scores(out2, "again")
    assert np.isnan(first).sum() == (len(x) // 7 + 1 if "null" in source else 0)
    np.testing.assert_array_equal(again.view(np.uint32), first.view(np.uint32))  # bit for bit, NaNs included
    np.testing.assert_array_equal(scores(out3, "again").view(np.uint32), first.view(np.uint32))
    # the bytes kept again are the bytes that came in
    b1 = pads.dataset(out1).to_table().column(column).combine_chunks()
    b2 = pads.dataset(out2).to_table().column(column).combine_chunks()
    assert b1.equals(b2)


def test_fixed_size_binary_without_our_metadata_names_the_fix(tmp_path, x):
    raw = pa.FixedSizeBinaryArray.from_buffers(pa.binary(DIM * 4), 3, [None, pa.py_buffer(x[:3].copy())])
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"emb": raw}), tmp_path / "in" / "p.parquet")
    with pytest.raises(JobError) as e:
        score_dataset(tmp_path / "in", tmp_path / "out", column="emb")
    msg = str(e.value)
    assert "no record of its float dtype" in msg and "keep_embeddings='list'" in msg and "--" not in msg
    r = cli("score", str(tmp_path / "in"), str(tmp_path / "out"), "--column", "emb", "--workers", "1")
    assert "--keep-embeddings list" in one_line_error(r, 1)


# ----------------------------------------------------------------------------- 8. mixed forms in one folder


@pytest.mark.weights
def test_float16_and_float32_npy_files_are_each_scored_as_they_are(tmp_path, client, x):
    src = tmp_path / "laion"
    (src / "img_emb").mkdir(parents=True)
    (src / "metadata").mkdir()
    for i, (rows, dtype) in enumerate([(slice(0, 200), np.float16), (slice(200, 600), np.float32)]):
        np.save(src / "img_emb" / f"img_emb_{i}.npy", x[rows].astype(dtype))
        pq.write_table(
            pa.table({"key": [f"k{j}" for j in range(rows.start, rows.stop)]}), src / f"metadata/metadata_{i}.parquet"
        )
    out = tmp_path / "out"
    score_dataset(src, out, client=client)
    want = np.concatenate(
        [
            NSFWScorer(device="cpu")(x[:200].astype(np.float16).astype(np.float32)).numpy(),
            NSFWScorer(device="cpu")(x[200:]).numpy(),
        ]
    )
    np.testing.assert_allclose(scores(out), want, rtol=0, atol=1e-6)
    # kept embeddings would give parts of two schemas: refused, naming the fix, before OUTPUT exists
    for form in (True, "list"):
        with pytest.raises(JobError, match="parts of different schemas") as e:
            score_dataset(src, tmp_path / "o2", client=client, keep_embeddings=form)
        assert "float16 vectors for" in str(e.value) and "img_emb_1.npy" in str(e.value)
        assert "leave keep_embeddings= out" in str(e.value)
    assert not (tmp_path / "o2").exists()


@pytest.mark.weights
def test_list_and_fixed_size_list_files_in_one_folder(tmp_path, client, x, expected):
    write(tmp_path / "in" / "a.parquet", x[:300], [f"k{j}" for j in range(300)], form="list")
    write(tmp_path / "in" / "b.parquet", x[300:], [f"k{j}" for j in range(300, 600)], form="fixed")
    out = tmp_path / "out"
    score_dataset(tmp_path / "in", out, client=client, keep_embeddings="binary")  # the same bytes per row
    np.testing.assert_allclose(scores(out), expected, rtol=0, atol=1e-6)
    assert pads.dataset(out).schema.field("emb").type == pa.binary(DIM * 4)
    with pytest.raises(JobError, match=r"keep_embeddings='list' would write list<element: float> for .*a\.parquet"):
        score_dataset(tmp_path / "in", tmp_path / "o2", client=client, keep_embeddings="list")
    r = cli("score", str(tmp_path / "in"), str(tmp_path / "o3"), "--keep-embeddings", "list", "--workers", "1")
    assert "pass --keep-embeddings binary" in one_line_error(r, 2)


# ----------------------------------------------------------------------------- 8. messages


@pytest.mark.weights
def test_object_column_of_integer_python_lists_is_converted(x):
    ints = np.rint(x[:20] * 100).astype(np.int64)
    df = pd.DataFrame({"emb": pd.Series([list(map(int, r)) for r in ints], dtype=object)}, index=np.arange(20) * 2)
    # x * 100 rounded: norms ~100, which the norm check rightly warns about; here only the conversion counts
    got = score_nsfw(df, column="emb", norm_check=False)
    want = score_nsfw(
        pd.DataFrame({"emb": pd.Series([r.astype(np.float64) for r in ints], dtype=object)}, index=df.index),
        column="emb",
        norm_check=False,
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


def test_keep_embeddings_binary_of_an_all_null_partition_has_the_models_width(tmp_path, shared_scheduler):
    """Found in review: an all-null partition wrote ``fixed_size_binary[0]`` beside the other
    parts' ``[3072]``, so the output no longer read back as one dataset, nor as our own input."""
    import subprocess
    import sys

    x = np.random.default_rng(0).standard_normal((20, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    src = tmp_path / "in"
    src.mkdir()
    rows = [list(r) for r in x[:10]] + [None] * 10  # the second row group (partition) is all null
    pq.write_table(
        pa.table({"id": np.arange(20), "emb": pa.array(rows, type=pa.list_(pa.float32()))}),
        src / "a.parquet",
        row_group_size=10,
    )
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "nsfw_dask",
        "score",
        str(src),
        str(out),
        "--keep-embeddings",
        "--rows-per-partition",
        "10",
    ]
    r = subprocess.run([*cmd, "--scheduler", shared_scheduler, "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    types = {pq.read_schema(f).field("emb").type for f in sorted(out.glob("part.*.parquet"))}
    assert types == {pa.binary(DIM * 4)}, types
    got = pads.dataset(out).to_table()  # one dataset again
    assert got.num_rows == 20 and got.column("emb").null_count == 10
