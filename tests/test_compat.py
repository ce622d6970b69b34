"""``nsfw_dask._compat``: every private API of another project we use, checked on CPU.

Each test fails loudly, with the installed version, when a dependency changes what we rely on;
the fallback tests pin what happens then (see ``nsfw_dask._compat``'s docstring).  No weights
are needed: nothing here scores a row.
"""

from __future__ import annotations

import functools
import re
from importlib.metadata import version
from pathlib import Path

import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import nsfw_dask
from nsfw_dask import _compat, score, score_nsfw
from nsfw_dask import io as nio
from nsfw_dask.exceptions import EmbeddingFormatError

PACKAGE = Path(nsfw_dask.__file__).parent


pytestmark = pytest.mark.usefixtures("fresh_dask_frames")


def _frames(n: int = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The same rows with an Arrow list column and with an object column of arrays."""
    x = np.random.default_rng(0).standard_normal((n, 768)).astype(np.float32)
    arrow = pd.DataFrame(
        {
            "id": np.arange(n),
            "embedding": pd.arrays.ArrowExtensionArray(pa.array(list(x), type=pa.list_(pa.float32()))),
        }
    )
    obj = arrow.assign(embedding=pd.Series(list(x), dtype=object))
    return arrow, obj


# -- 1. dask's meta inference: dask.dataframe.dask_expr._expr.emulate -------------------------


def test_emulate_still_exists() -> None:
    from dask.dataframe.dask_expr import _expr

    where = f"dask {version('dask')}"
    assert callable(getattr(_expr, "emulate", None)), (
        f"{where}: dask.dataframe.dask_expr._expr.emulate is gone; update "
        "nsfw_dask._compat.EMULATE_NAMES (until then meta inference uses the documented fallback)"
    )
    assert _expr.emulate.__code__.co_name in _compat.EMULATE_NAMES, f"{where}: emulate was renamed"
    assert _expr.emulate.__globals__["__name__"].startswith("dask."), f"{where}: emulate left dask"


def test_meta_inference_detected_on_cpu() -> None:
    """True on dask's fake partition (also behind a wrapper), False on every real one."""
    calls: list[tuple[bool, bool]] = []  # (detected, real partition)
    real = {(100, 101, 102), (103, 104, 105)}

    def probe(df: pd.DataFrame, tag: str = "") -> pd.DataFrame:
        calls.append((_compat.in_dask_meta_inference(), tuple(df["a"]) in real))
        return df

    ddf = dd.from_pandas(pd.DataFrame({"a": np.arange(100, 106)}), npartitions=2)
    for fn in (probe, functools.partial(probe, tag="x"), lambda df: probe(df)):
        calls.clear()
        out = ddf.map_partitions(fn)  # no meta=: dask calls fn on its fake partition now
        assert calls and all(detected for detected, _ in calls), (
            f"dask {version('dask')}: map_partitions meta inference is no longer seen ({calls}); see nsfw_dask._compat"
        )
        out.compute(scheduler="threads")
        assert sum(is_real for _, is_real in calls) == 2
        wrong = [c for c in calls if c[0] == c[1]]
        assert not wrong, f"detected on a real partition, or missed on a fake one: {calls}"
    assert _compat.in_dask_meta_inference() is False


def test_map_partitions_without_meta_loads_no_model() -> None:
    """The guarantee ``score_nsfw`` makes: no ``meta=`` needed, no model loaded for it, for
    every column kind (the object column is the one only the detection gets right)."""
    for frame in _frames():
        ddf = dd.from_pandas(frame, npartitions=2)
        scored = ddf.map_partitions(score_nsfw)
        assert list(scored.columns) == ["id", "embedding", "nsfw_score"]
        assert scored._meta["nsfw_score"].dtype == np.float32
        assert nsfw_dask.model_cache_info()["loads"] == 0, "meta inference loaded the model"


def test_fallback_when_emulate_is_not_found(monkeypatch: pytest.MonkeyPatch) -> None:
    """What happens if dask renames ``emulate``: the documented fallback."""
    monkeypatch.setattr(_compat, "EMULATE_NAMES", ("emulate_renamed_by_a_future_dask",))
    arrow, obj = _frames()
    # Arrow lists: dask's fake rows are null, so the meta is still right and no model is loaded
    scored = dd.from_pandas(arrow, npartitions=2).map_partitions(score_nsfw)
    assert scored._meta["nsfw_score"].dtype == np.float32
    # an object column: meta inference fails, loudly, naming the fix
    ddf = dd.from_pandas(obj, npartitions=2)
    with pytest.raises(ValueError, match=r"Metadata inference failed in `score_nsfw`") as info:
        ddf.map_partitions(score_nsfw)
    assert "meta=" in str(info.value)
    with pytest.raises(ValueError, match=r"Metadata inference failed in `score_nsfw`"):
        ddf.map_partitions(score_nsfw, column="embedding")
    assert nsfw_dask.model_cache_info()["loads"] == 0
    # ... and the documented way round it does not depend on the detection
    for out in (ddf.map_partitions(score_nsfw, meta=nsfw_dask.nsfw_meta(ddf)), score(ddf)):
        assert out._meta["nsfw_score"].dtype == np.float32
    assert nsfw_dask.model_cache_info()["loads"] == 0


# -- 2. fsspec's AbstractFileSystem._strip_protocol --------------------------------------------


def test_fsspec_strip_protocol() -> None:
    from fsspec.core import url_to_fs
    from fsspec.spec import AbstractFileSystem

    assert callable(getattr(AbstractFileSystem, "_strip_protocol", None)), (
        f"fsspec {version('fsspec')}: AbstractFileSystem._strip_protocol is gone; "
        "nsfw_dask._compat.strip_protocol falls back to the generic rule"
    )
    for url in ("memory://nsfw-dask-compat/a/b/", "file:///tmp/nsfw-dask-compat/x"):
        fs, path = url_to_fs(url)  # the public way, for a comparison
        assert _compat.strip_protocol(fs, url) == path, f"fsspec {version('fsspec')}: {url}"


def test_strip_protocol_fallback() -> None:
    class NoStrip:  # an fsspec filesystem without _strip_protocol
        protocol = ("s3", "s3a")

    assert _compat.strip_protocol(NoStrip(), "s3://bucket/key/") == "bucket/key"
    assert _compat.strip_protocol(NoStrip(), "s3a://bucket") == "bucket"
    assert _compat.strip_protocol(NoStrip(), "bucket/key") == "bucket/key"

    class Memory:
        protocol = "memory"

    # the documented difference: memory:// adds a root marker, the generic rule does not
    assert _compat.strip_protocol(Memory(), "memory://a/b") == "a/b"


# -- 3. a dask collection's _meta --------------------------------------------------------------


def test_collection_meta() -> None:
    arrow, _ = _frames()
    ddf = dd.from_pandas(arrow, npartitions=2)
    assert _compat.collection_meta(ddf) is ddf._meta
    assert _compat.collection_meta(arrow) is arrow


# -- dropped: numpy's private np.lib.format._read_array_header ---------------------------------


def _write_pair(root: Path, write_npy) -> Path:
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    npy = root / "img_emb" / "img_emb_0.npy"
    with open(npy, "wb") as f:
        write_npy(f)
    pq.write_table(pa.table({"id": np.arange(4)}), root / "metadata" / "metadata_0.parquet")
    return npy


def test_npy_format_3_is_refused_with_the_fix(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((4, 768)).astype(np.float32)
    npy = _write_pair(tmp_path / "v3", lambda f: np.lib.format.write_array(f, x, version=(3, 0)))
    with open(npy, "rb") as f:
        assert np.lib.format.read_magic(f) == (3, 0)
    with pytest.raises(EmbeddingFormatError) as info:
        nsfw_dask.read_embeddings(tmp_path / "v3")
    msg = str(info.value)
    assert "\n" not in msg
    assert re.search(r"img_emb/img_emb_0\.npy is a \.npy file of format version 3\.0; ", msg), msg
    assert "numpy.save(" in msg
    # the fix the message gives works
    np.save(npy, np.load(npy))
    got = nsfw_dask.read_embeddings(tmp_path / "v3").compute(scheduler="sync")
    np.testing.assert_array_equal(np.stack(got["embedding"].to_numpy()), x)


def test_npy_format_3_written_by_np_save(tmp_path: Path) -> None:
    """``np.save`` itself writes 3.0 for field names outside latin-1."""
    path = tmp_path / "structured.npy"
    with pytest.warns(UserWarning, match="format 3.0"):
        np.save(path, np.zeros(3, dtype=[("埋め込み", "<f4")]))
    with open(path, "rb") as f:
        assert np.lib.format.read_magic(f) == (3, 0)
        f.seek(0)
        with pytest.raises(EmbeddingFormatError, match=re.escape(f"{path} is a .npy file of format version 3.0")):
            nio._read_header(f, str(path))


@pytest.mark.parametrize("fmt", [(1, 0), (2, 0)])
def test_npy_formats_1_and_2_still_read(tmp_path: Path, fmt: tuple[int, int]) -> None:
    x = np.random.default_rng(2).standard_normal((4, 768)).astype(np.float16)
    npy = _write_pair(tmp_path, lambda f: np.lib.format.write_array(f, x, version=fmt))
    with open(npy, "rb") as f:
        shape, dtype, fortran, offset = nio._read_header(f, str(npy))
    assert (shape, dtype, fortran, offset) == ((4, 768), np.dtype("<f2"), False, npy.stat().st_size - x.nbytes)
    got = nsfw_dask.read_embeddings(tmp_path).compute(scheduler="sync")
    np.testing.assert_array_equal(np.stack(got["embedding"].to_numpy()), x)


def test_npy_bad_magic_message_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "bad.npy"
    path.write_bytes(b"not an npy file at all")
    with open(path, "rb") as f, pytest.raises(EmbeddingFormatError, match=r"bad\.npy is not a valid \.npy file: "):
        nio._read_header(f, str(path))


# -- the inventory is complete -----------------------------------------------------------------

#: Private names of other projects that must appear nowhere in the package but _compat.py, with
#: the two touches still made in place by modules whose owners are moving them to _compat
#: (pipeline._fs_path -> _compat.strip_protocol, scoring.nsfw_meta -> _compat.collection_meta).
_PRIVATE = {
    "sys._getframe": set(),
    "_read_array_header": set(),
    "_plan[": set(),
    "dask_expr": set(),
    "._strip_protocol(": set(),
    '"_meta"': set(),
}


def test_private_touches_only_in_compat() -> None:
    found = {}
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_compat.py":
            continue
        code = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
        for needle, allowed in _PRIVATE.items():
            if needle in code and path.name not in allowed:
                found.setdefault(needle, []).append(path.name)
    assert not found, f"private APIs of other projects outside nsfw_dask/_compat.py: {found}"
