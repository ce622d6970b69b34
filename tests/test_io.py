"""nsfw_dask.io: LAION's parquet_npy layout (img_emb/img_emb_N.npy + metadata/metadata_N.parquet)."""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nsfw_dask
from nsfw_dask.exceptions import EmbeddingFormatError
from nsfw_dask.io import _load_part, is_parquet_npy, read_embeddings, read_input

SIZES = [7, 12, 5]
DIM = 8


def _write(
    root: Path | str,
    x: np.ndarray,
    sizes: list[int],
    *,
    fs=None,
    dtype=np.float16,
    row_group_size: int | None = None,
    index: str | None = None,
) -> None:
    """Write a parquet_npy folder; ``index``: None, "named", "named-range" or "unnamed"."""
    if fs is None:
        Path(root, "img_emb").mkdir(parents=True)
        Path(root, "metadata").mkdir()
    start = 0
    for i, n in enumerate(sizes):
        rows = np.arange(start, start + n)
        df = pd.DataFrame({"url": [f"u{j}" for j in rows], "row": rows})
        if index == "named":
            df.index = pd.Index(rows * 10, name="key")
        elif index == "named-range":
            df.index = pd.RangeIndex(100 + start, 100 + start + n, name="key")
        elif index == "unnamed":
            df.index = pd.Index(rows * 10)
        npy, meta = f"{root}/img_emb/img_emb_{i}.npy", f"{root}/metadata/metadata_{i}.parquet"
        if fs is None:
            np.save(npy, x[start : start + n].astype(dtype))
            df.to_parquet(meta, row_group_size=row_group_size)
        else:
            with fs.open(npy, "wb") as f:
                np.save(f, x[start : start + n].astype(dtype))
            with fs.open(meta, "wb") as f:
                df.to_parquet(f, row_group_size=row_group_size)
        start += n


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((sum(SIZES), DIM)).astype(np.float32)


@pytest.fixture
def laion(tmp_path, x) -> Path:
    root = tmp_path / "laion"
    _write(root, x, SIZES)
    return root


def _embeddings(df: pd.DataFrame, column: str = "embedding") -> np.ndarray:
    arr = pa.chunked_array(df[column].array._pa_array).combine_chunks()
    return arr.values.to_numpy(zero_copy_only=False).reshape(len(df), -1)


# --- file discovery -------------------------------------------------------------------------------


def test_orphan_metadata_is_an_error(laion):
    pd.DataFrame({"url": ["a"], "row": [0]}).to_parquet(laion / "metadata" / "metadata_3.parquet")
    with pytest.raises(EmbeddingFormatError) as e:
        read_embeddings(laion)
    msg = str(e.value)
    assert "metadata_3.parquet" in msg and str(laion / "img_emb" / "img_emb_3.npy") in msg


def test_orphan_npy_is_an_error(laion, x):
    np.save(laion / "img_emb" / "img_emb_3.npy", x[:2])
    with pytest.raises(EmbeddingFormatError) as e:
        read_embeddings(laion)
    msg = str(e.value)
    assert "img_emb_3.npy" in msg and str(laion / "metadata" / "metadata_3.parquet") in msg


@pytest.mark.parametrize("name", ["img_emb/img_emb_a.npy", "img_emb/emb_0.npy", "metadata/metadata_x.parquet"])
def test_bad_file_name_is_an_error(laion, x, name):
    if name.endswith(".npy"):
        np.save(laion / name, x[:2])
    else:
        pd.DataFrame({"url": ["a"], "row": [0]}).to_parquet(laion / name)
    with pytest.raises(EmbeddingFormatError, match=Path(name).name.replace(".", r"\.")):
        read_embeddings(laion)


def test_other_files_are_ignored_and_order_is_numeric(tmp_path, x):
    root = tmp_path / "laion"
    sizes = [2] * 11  # img_emb_10 sorts before img_emb_2 as text
    _write(root, x, sizes)
    (root / "img_emb" / "README.txt").write_text("not data")
    (root / "metadata" / "_SUCCESS").write_text("")
    df = read_embeddings(root).compute()
    np.testing.assert_array_equal(df["row"].to_numpy(), np.arange(22))
    np.testing.assert_array_equal(_embeddings(df), x[:22].astype(np.float16))


def test_no_npy_files(tmp_path):
    (tmp_path / "img_emb").mkdir()
    (tmp_path / "metadata").mkdir()
    assert is_parquet_npy(tmp_path)
    with pytest.raises(FileNotFoundError, match="No img_emb"):
        read_embeddings(tmp_path)


# --- checks on the pairs ----------------------------------------------------------------------------


def test_row_count_mismatch(laion, x):
    np.save(laion / "img_emb" / "img_emb_1.npy", x[:11].astype(np.float16))
    with pytest.raises(EmbeddingFormatError) as e:
        read_embeddings(laion)
    assert "img_emb_1.npy has 11 rows" in str(e.value) and "metadata_1.parquet has 12" in str(e.value)


def test_column_collision(laion):
    with pytest.raises(EmbeddingFormatError, match="already has a column 'url'"):
        read_embeddings(laion, column="url")
    assert "emb" in read_embeddings(laion, column="emb").columns


def test_mixed_npy_dtypes_are_an_error(laion, x):
    np.save(laion / "img_emb" / "img_emb_2.npy", x[19:24].astype(np.float32))
    with pytest.raises(EmbeddingFormatError, match="all .npy files must agree"):
        read_embeddings(laion)


def test_not_a_float_matrix(laion):
    np.save(laion / "img_emb" / "img_emb_2.npy", np.zeros((5, DIM), dtype=np.int32))
    with pytest.raises(EmbeddingFormatError, match="expected \\(rows, dim\\) floats"):
        read_embeddings(laion)


def test_truncated_npy(laion):
    path = laion / "img_emb" / "img_emb_1.npy"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(EmbeddingFormatError, match="img_emb_1.npy is truncated"):
        read_embeddings(laion)


# --- the frame ------------------------------------------------------------------------------------


def test_global_index_and_divisions(laion, x):
    ddf = read_embeddings(laion, rows_per_partition=5)  # splits files 0 and 1, not 2
    assert ddf.known_divisions
    assert ddf.divisions == (0, 5, 7, 12, 17, 19, 23)
    assert ddf.npartitions == 6
    df = ddf.compute()
    assert df.index.is_unique
    np.testing.assert_array_equal(df.index.to_numpy(), np.arange(24))
    np.testing.assert_array_equal(df["row"].to_numpy(), np.arange(24))
    np.testing.assert_array_equal(_embeddings(df), x.astype(np.float16))
    for i in range(ddf.npartitions):
        part = ddf.get_partition(i).compute()
        assert part.index[0] == ddf.divisions[i]
    assert ddf.loc[15:18].compute()["row"].tolist() == [15, 16, 17, 18]


def test_meta_matches_partitions(laion):
    ddf = read_embeddings(laion, rows_per_partition=5)
    part = ddf.get_partition(3).compute()
    meta = ddf._meta
    assert list(meta.columns) == list(part.columns) == ["url", "row", "embedding"]
    pd.testing.assert_series_equal(meta.dtypes, part.dtypes)
    assert meta.index.dtype == part.index.dtype


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_embedding_dtype_preserved(tmp_path, x, dtype):
    _write(tmp_path, x, SIZES, dtype=dtype)
    ddf = read_embeddings(tmp_path)
    want = pd.ArrowDtype(pa.list_(pa.from_numpy_dtype(np.dtype(dtype)), DIM))
    assert ddf.dtypes["embedding"] == want
    df = ddf.compute()
    assert df["embedding"].dtype == want
    np.testing.assert_array_equal(_embeddings(df), x.astype(dtype))


@pytest.mark.parametrize("index", ["named", "named-range"])
def test_named_pandas_index_is_kept_as_a_column(tmp_path, x, index):
    _write(tmp_path, x, SIZES, index=index)
    ddf = read_embeddings(tmp_path, rows_per_partition=4)
    assert list(ddf.columns) == ["url", "row", "key", "embedding"]
    df = ddf.compute()
    want = np.arange(24) * 10 if index == "named" else 100 + np.arange(24)
    np.testing.assert_array_equal(df["key"].to_numpy(), want)
    np.testing.assert_array_equal(df.index.to_numpy(), np.arange(24))
    pd.testing.assert_series_equal(ddf._meta.dtypes, df.dtypes)


def test_unnamed_stored_pandas_index_is_dropped(tmp_path, x):
    _write(tmp_path, x, SIZES, index="unnamed")
    ddf = read_embeddings(tmp_path)
    assert list(ddf.columns) == ["url", "row", "embedding"]
    assert list(ddf.compute().columns) == ["url", "row", "embedding"]


def test_reads_only_the_row_groups_needed(tmp_path, x, monkeypatch):
    _write(tmp_path, x, SIZES, row_group_size=3)
    full = pd.concat([pd.read_parquet(tmp_path / "metadata" / f"metadata_{i}.parquet") for i in range(3)])
    calls = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        calls.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("read a whole file"))
    ddf = read_embeddings(tmp_path, rows_per_partition=4)
    assert calls == []  # building the graph and its meta reads no data
    df = ddf.compute(scheduler="sync")
    np.testing.assert_array_equal(df["url"].to_numpy(dtype=object), full["url"].to_numpy(dtype=object))
    np.testing.assert_array_equal(df["row"].to_numpy(), full["row"].to_numpy())
    # file 0 (7 rows, groups of 3): [0,4) -> groups 0,1; [4,7) -> 1,2
    # file 1 (12 rows): [0,4) -> 0,1; [4,8) -> 1,2; [8,12) -> 2,3;  file 2 (5 rows): [0,4) -> 0,1; [4,5) -> 1
    assert sorted(calls) == sorted([[0, 1], [1, 2], [0, 1], [1, 2], [2, 3], [0, 1], [1]])  # any order


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_embeddings_are_not_copied(tmp_path, x, monkeypatch, dtype):
    _write(tmp_path, x, SIZES, dtype=dtype)
    maps = []
    real_load = np.load

    def load(*args, **kwargs):
        arr = real_load(*args, **kwargs)
        if kwargs.get("mmap_mode"):
            maps.append(arr)
        return arr

    monkeypatch.setattr(np, "load", load)
    ddf = read_embeddings(tmp_path, rows_per_partition=5)
    npy = str(tmp_path / "img_emb" / "img_emb_1.npy")
    meta = str(tmp_path / "metadata" / "metadata_1.parquet")
    itemsize = np.dtype(dtype).itemsize
    for get in (
        lambda: _load_part((npy, meta, 5, 10, 7), "embedding"),
        lambda: ddf.get_partition(3).compute(scheduler="sync"),
    ):
        maps.clear()
        part = get()
        assert part.index[0] == 12 and len(part) == 5
        (mm,) = maps
        assert isinstance(mm, np.memmap) and mm.filename == npy
        (chunk,) = part["embedding"].array._pa_array.chunks
        values = chunk.values
        address = values.buffers()[1].address + values.offset * itemsize
        # rows 5..9 of the file, in place in its memory map
        assert address == mm.ctypes.data + 5 * DIM * itemsize
        assert mm.ctypes.data <= address < address + 5 * DIM * itemsize <= mm.ctypes.data + mm.nbytes
        maps.clear()
        del mm  # the partition keeps the memory map alive
        np.testing.assert_array_equal(_embeddings(part), x[12:17].astype(dtype))


def test_read_input_plain_parquet_gives_arrow_lists(tmp_path, x):
    df = pd.DataFrame(
        {
            "url": [f"u{i}" for i in range(len(x))],
            "embedding": pd.Series(list(x), dtype=pd.ArrowDtype(pa.list_(pa.float32()))),
        }
    )
    (tmp_path / "pq").mkdir()
    df.iloc[:10].to_parquet(tmp_path / "pq" / "part.0.parquet")
    df.iloc[10:].to_parquet(tmp_path / "pq" / "part.1.parquet")
    assert not is_parquet_npy(tmp_path / "pq")
    ddf = read_input(str(tmp_path / "pq"))
    assert ddf.dtypes["embedding"] == pd.ArrowDtype(pa.list_(pa.float32()))
    np.testing.assert_array_equal(_embeddings(ddf.compute()), x)


def test_read_input_parquet_npy(laion, x):
    assert is_parquet_npy(laion) and is_parquet_npy(str(laion))
    ddf = read_input(str(laion), rows_per_partition=10)
    assert ddf.npartitions == 4
    np.testing.assert_array_equal(_embeddings(ddf.compute()), x.astype(np.float16))


def test_all_files_empty(tmp_path, x):
    _write(tmp_path, x, [0, 0])
    ddf = read_embeddings(tmp_path)
    df = ddf.compute()
    assert len(df) == 0 and list(df.columns) == ["url", "row", "embedding"]


# --- fsspec URLs ----------------------------------------------------------------------------------


@pytest.fixture
def memory_laion(x):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = f"/nsfw-dask-test-{uuid.uuid4().hex}"
    _write(root, x, SIZES, fs=fs, row_group_size=4)
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_fsspec_url(memory_laion, x, tmp_path):
    assert is_parquet_npy(memory_laion)
    ddf = read_input(memory_laion, rows_per_partition=5)
    assert ddf.divisions == (0, 5, 7, 12, 17, 19, 23)
    df = ddf.compute(scheduler="sync")
    np.testing.assert_array_equal(df.index.to_numpy(), np.arange(24))
    np.testing.assert_array_equal(df["row"].to_numpy(), np.arange(24))
    np.testing.assert_array_equal(_embeddings(df), x.astype(np.float16))
    pd.testing.assert_series_equal(ddf._meta.dtypes, df.dtypes)
    _write(tmp_path, x, SIZES)
    pd.testing.assert_frame_equal(df, read_embeddings(tmp_path, rows_per_partition=5).compute())


def test_fsspec_url_errors_name_urls(memory_laion):
    import fsspec

    fs = fsspec.filesystem("memory")
    root = memory_laion.removeprefix("memory://")
    fs.rm(f"{root}/img_emb/img_emb_2.npy")
    with pytest.raises(EmbeddingFormatError) as e:
        read_embeddings(memory_laion)
    assert f"memory://{root}/metadata/metadata_2.parquet" in str(e.value)
    assert f"memory://{root}/img_emb/img_emb_2.npy" in str(e.value)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_fortran_order_npy(tmp_path, memory_laion, x, where):
    """np.save of a Fortran-ordered array: rows are not contiguous, values must still be right."""
    import fsspec

    if where == "local":
        _write(tmp_path, x, SIZES)
        url, fs, root = str(tmp_path), fsspec.filesystem("file"), str(tmp_path)
    else:
        url, fs, root = memory_laion, fsspec.filesystem("memory"), memory_laion.removeprefix("memory://")
    with fs.open(f"{root}/img_emb/img_emb_1.npy", "wb") as f:
        np.save(f, np.asfortranarray(x[7:19].astype(np.float16)))
    df = read_embeddings(url, rows_per_partition=5).compute(scheduler="sync")
    np.testing.assert_array_equal(_embeddings(df), x.astype(np.float16))


# --- scoring --------------------------------------------------------------------------------------


@pytest.mark.weights
def test_scoring_partitions(tmp_path, l14_ref):
    x = l14_ref["inputs"]
    sizes = [300, len(x) - 500, 200]
    _write(tmp_path, x, sizes)
    ddf = read_embeddings(tmp_path, rows_per_partition=256)
    scored = ddf.map_partitions(nsfw_dask.score_nsfw, meta=nsfw_dask.nsfw_meta(ddf)).compute()
    np.testing.assert_array_equal(scored.index.to_numpy(), np.arange(len(x)))
    np.testing.assert_array_equal(scored["row"].to_numpy(), np.arange(len(x)))
    expected = nsfw_dask.NSFWScorer(device="cpu")(x.astype(np.float16).astype(np.float32)).numpy()
    np.testing.assert_allclose(scored["nsfw_score"].to_numpy(), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tail_rows", [500, 65_536])
def test_read_parquet_rows_any_range_of_big_row_groups(tmp_path, monkeypatch, tail_rows):
    """Rows [start, stop) of a file, whether the groups are read whole or decoded in batches up to
    ``stop`` (a partition cut out of a row group much longer than itself): the same rows, values,
    nulls, schema and pandas metadata as slicing the whole table."""
    import random

    import fsspec

    from nsfw_dask import io

    n = 10_000
    df = pd.DataFrame(
        {"s": [f"x{i}" if i % 7 else None for i in range(n)], "v": np.arange(n)},
        index=pd.Index(np.arange(n) * 2, name="idx"),
    )
    table = pa.Table.from_pandas(df).append_column(
        "emb", pa.array([[float(i)] * 3 for i in range(n)], type=pa.list_(pa.float32()))
    )
    pq.write_table(table, tmp_path / "big.parquet", row_group_size=4000)
    full = pq.read_table(tmp_path / "big.parquet")
    monkeypatch.setattr(io, "_TAIL_ROWS", tail_rows)
    fs = fsspec.filesystem("file")
    rng = random.Random(0)
    ranges = [(0, n), (0, 1), (n - 1, n), (3999, 4001), (4000, 8000), (100, 200)]
    ranges += [(a, rng.randrange(a, n) + 1) for a in (rng.randrange(n) for _ in range(60))]
    for a, b in ranges:
        got = io.read_parquet_rows(fs, str(tmp_path / "big.parquet"), a, b)
        want = full.slice(a, b - a)
        assert got.equals(want), (a, b)
        assert got.schema.metadata == want.schema.metadata
        assert got.column("v").to_pylist() == list(range(a, b))
