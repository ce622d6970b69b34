"""Exact mode: LAION's original AutoKeras model (categorical lookup + NaN imputation).

Ground truth is ``keras_scores`` in ../shared/reference (TensorFlow executing LAION's SavedModels);
the vocabularies exported with TensorFlow (``*_keras_vocab.json`` in ../shared/weights) check our
TensorFlow-free protobuf reader.  Neither is copied into the project.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import dask
import dask.dataframe as dd
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import REFERENCE_DIR, WEIGHTS_DIR
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nsfw_dask
from nsfw_dask import NSFWScorer, score_nsfw
from nsfw_dask.exact import (
    CategoricalEncoding,
    ExactNSFWModel,
    KerasVocabulary,
    clear_vocabulary_cache,
    float_interval,
    load_vocabulary,
    read_savedmodel_vocabulary,
    vocabulary_digest,
)
from nsfw_dask.exceptions import WeightsIntegrityError, WeightsNotFoundError
from nsfw_dask.models import MODEL_SPECS

from _frames import embedding_array, make_frame

pytestmark = pytest.mark.weights

TOL = 1e-5  # issue 5: max |score - keras_scores| on every reference row
HEADS = [("l14", "vit-l-14"), ("b32", "vit-b-32")]


def _npz(name: str) -> dict[str, np.ndarray]:
    assert REFERENCE_DIR is not None
    with np.load(REFERENCE_DIR / name) as d:
        return {k: d[k] for k in d.files}


@pytest.fixture(scope="module", params=HEADS, ids=[h for h, _ in HEADS])
def head(request: pytest.FixtureRequest) -> dict:
    tag, model = request.param
    ref, special = _npz(f"{tag}_reference.npz"), _npz(f"{tag}_special.npz")
    return {
        "tag": tag,
        "model": model,
        "spec": MODEL_SPECS[model],
        "x": np.concatenate([ref["inputs"], special["inputs"]]),
        "keras": np.concatenate([ref["keras_scores"], special["keras_scores"]]).astype(np.float64),
        "n_special": len(special["keras_scores"]),
    }


def _frame(x: np.ndarray, pa_type: pa.DataType | None = None) -> pd.DataFrame:
    emb = embedding_array(x, pa_type or pa.list_(pa.from_numpy_dtype(x.dtype)))
    return make_frame(
        {"id": [f"r{i}" for i in range(len(x))], "emb": emb},
        index=pd.Index([f"k{i}" for i in range(len(x))], name="key"),
    )


def _assert_matches_keras(got: np.ndarray, keras: np.ndarray) -> None:
    got = np.asarray(got, dtype=np.float64)
    assert got.shape == keras.shape
    np.testing.assert_array_equal(np.isnan(got), np.isnan(keras))
    fin = ~np.isnan(keras)
    assert np.max(np.abs(got[fin] - keras[fin])) <= TOL


# ---------------------------------------------------------------- vocabularies from the zip


def test_reader_matches_tensorflow_export(head: dict) -> None:
    """Our protobuf reader gives exactly TensorFlow's exported vocabularies, column by column."""
    assert WEIGHTS_DIR is not None
    vocab = read_savedmodel_vocabulary(WEIGHTS_DIR / head["spec"].keras.filename)
    exported = json.loads((WEIGHTS_DIR / f"{head['tag']}_keras_vocab.json").read_text())
    assert vocab.columns == head["spec"].keras.columns
    assert [str(c) for c in vocab.columns] == list(exported["vocab"])
    assert [i for i, e in enumerate(exported["encoding"]) if e != "none"] == list(vocab.columns)
    for col, strings, indices in zip(vocab.columns, vocab.strings, vocab.indices):
        table = exported["vocab"][str(col)]
        assert table[0] == "[UNK]"  # index 0: out of vocabulary
        assert list(strings) == table[1:]
        assert list(indices) == list(range(1, len(table)))
    assert vocabulary_digest(vocab) == head["spec"].keras.vocab_digest


def test_reader_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "not.zip"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(WeightsIntegrityError, match="not an AutoKeras SavedModel zip"):
        read_savedmodel_vocabulary(bad)
    assert WEIGHTS_DIR is not None
    import zipfile

    z = tmp_path / "pth.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("m/saved_model.pb", b"\x12\x00")
        zf.writestr("m/keras_metadata.pb", b"")
    with pytest.raises(WeightsIntegrityError, match="lookup tables"):
        read_savedmodel_vocabulary(z)


def test_vocabulary_cache_is_written_and_used_without_the_zip(tmp_path: Path, monkeypatch) -> None:
    assert WEIGHTS_DIR is not None
    spec = MODEL_SPECS["vit-b-32"]
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(WEIGHTS_DIR / spec.keras.filename, models)
    cache = tmp_path / "cache"
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(cache))
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    clear_vocabulary_cache()
    first = load_vocabulary(spec, models)
    cached = cache / "clip_autokeras_nsfw_b32.vocab.json"
    assert cached.is_file() and not (models / cached.name).exists()  # never written into model_dir
    (models / spec.keras.filename).unlink()
    clear_vocabulary_cache()
    assert load_vocabulary(spec, models) == first  # from the JSON cache alone
    # A tampered cache is ignored; with no zip anywhere and offline, that is a clear error.
    obj = json.loads(cached.read_text())
    obj["vocabulary"]["92"]["strings"][0] = "0.000001"
    cached.write_text(json.dumps(obj))
    clear_vocabulary_cache()
    with pytest.raises(WeightsNotFoundError, match=r"clip_autokeras_nsfw_b32\.zip.*NSFW_DASK_MODEL_DIR"):
        load_vocabulary(spec, models)
    clear_vocabulary_cache()


def test_wrong_zip_is_refused(tmp_path: Path, monkeypatch) -> None:
    assert WEIGHTS_DIR is not None
    spec = MODEL_SPECS["vit-b-32"]
    (tmp_path / spec.keras.filename).write_bytes(
        (WEIGHTS_DIR / MODEL_SPECS["vit-l-14"].keras.filename).read_bytes()
    )  # the other head's zip
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(tmp_path / "empty-cache"))  # no cached vocabulary
    clear_vocabulary_cache()
    with pytest.raises(WeightsIntegrityError, match=r"sha256"):
        load_vocabulary(spec, tmp_path)
    clear_vocabulary_cache()


# ---------------------------------------------------------------- '%f' intervals and the lookup


def test_intervals_agree_with_python_formatting(head: dict) -> None:
    """Every interval's ends format to the string; the next float outside does not."""
    assert WEIGHTS_DIR is not None
    vocab = read_savedmodel_vocabulary(WEIGHTS_DIR / head["spec"].keras.filename)
    for strings in vocab.strings:
        for s in strings:
            lo, hi = float_interval(s)
            assert "%f" % lo == s and "%f" % hi == s
            assert "%f" % math.nextafter(lo, -math.inf) != s
            assert "%f" % math.nextafter(hi, math.inf) != s


@pytest.mark.parametrize(
    "s, inside, outside",
    [
        ("0.007812", [0.0078125, 0.0078116, 0.0078124999], [0.0078115, 0.0078126]),  # tie 1/128 -> even 2
        ("0.007813", [0.0078134999], [0.0078125]),  # ... so not 3
        ("-0.023438", [-0.0234375], [-0.0234385]),  # -3/128: tie -> even 8
        ("1.000000", [1.0, 0.9999995000000001, 1.0000004999], [1.0000005000000001]),
    ],
)
def test_interval_ties(s: str, inside: list[float], outside: list[float]) -> None:
    lo, hi = float_interval(s)
    for v in inside:
        assert "%f" % v == s and lo <= v <= hi
    for v in outside:
        assert "%f" % v != s and not (lo <= v <= hi)


def test_non_canonical_strings_have_no_interval() -> None:
    for s in ["[UNK]", "nan", "inf", "0.1", "1e-3", "00.100000", "+0.100000", "0.1000000"]:
        assert float_interval(s) is None


def _encoding(strings: list[str]) -> CategoricalEncoding:
    vocab = KerasVocabulary((0,), (tuple(strings),), (tuple(range(1, len(strings) + 1)),))
    return CategoricalEncoding(vocab, 1)


def _python_codes(strings: list[str], values: np.ndarray) -> np.ndarray:
    table = {s: i for i, s in enumerate(strings, start=1)}
    return np.array([table.get("%f" % float(v), 0) for v in values], dtype=np.float32)


def test_signed_zero_nan_inf_lookup() -> None:
    strings = ["0.000000", "-0.000000", "0.000001", "-0.000001", "0.500000"]
    enc = _encoding(strings)
    values = np.array(
        [
            0.0,
            -0.0,
            4.9e-7,
            -4.9e-7,
            5.1e-7,
            -5.1e-7,
            1e-6,
            np.nan,
            -np.nan,
            np.inf,
            -np.inf,
            0.5,
            1e30,
            -1e30,
            5e-324,
            -5e-324,
        ],
        dtype=np.float64,
    )
    got = enc.codes(torch.from_numpy(values).view(-1, 1)).view(-1).numpy()
    np.testing.assert_array_equal(got, _python_codes(strings, values))
    assert list(got[:4]) == [1, 2, 1, 2] and got[7] == 0 and got[9] == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_lookup_equals_python_formatting_near_every_boundary(data: st.DataObject) -> None:
    """Random vocabularies, values at and one float32/float64 step around each boundary."""
    words = data.draw(st.lists(st.integers(-1_000_000, 1_000_000), min_size=1, max_size=30, unique=True))
    strings = ["%f" % (w / 1e6) for w in words]
    strings = list(dict.fromkeys(strings))
    enc = _encoding(strings)
    vals: list[float] = []
    for s in strings:
        d = float(s)
        for edge in (d - 5e-7, d + 5e-7, d):
            for dt in (np.float32, np.float64):
                e = dt(edge)
                vals += [float(e), float(np.nextafter(e, dt(np.inf))), float(np.nextafter(e, dt(-np.inf)))]
    vals += data.draw(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=30))
    for dt in (np.float32, np.float64):
        v = np.asarray(vals, dtype=dt)
        got = enc.codes(torch.from_numpy(v).view(-1, 1)).view(-1).numpy()
        np.testing.assert_array_equal(got, _python_codes(strings, v.astype(np.float64)))


def test_encoding_forward_imputes_nan_and_keeps_inf(head: dict) -> None:
    model = nsfw_dask.load_model(head["model"], exact=True)
    x = torch.from_numpy(head["x"][-head["n_special"] :])
    enc = model.encoding(x)
    cols = list(head["spec"].keras.columns)
    other = [c for c in range(x.shape[1]) if c not in cols]
    xo, eo = x[:, other], enc[:, other]
    assert torch.equal(torch.isnan(xo), eo == 0) or bool((eo[torch.isnan(xo)] == 0).all())
    assert not torch.isnan(enc).any()
    assert torch.equal(torch.isinf(xo), torch.isinf(eo))
    np.testing.assert_array_equal(
        enc[:, cols].numpy(), np.stack([model.encoding.codes(x)[:, j].numpy() for j in range(len(cols))], axis=1)
    )


# ---------------------------------------------------------------- parity with the original model


@pytest.mark.parametrize("batch_size", [1, 37, 1024])
def test_score_nsfw_exact_matches_keras_on_every_row(head: dict, batch_size: int) -> None:
    df = _frame(head["x"])
    out = score_nsfw(df, model=head["model"], exact=True, batch_size=batch_size)
    pd.testing.assert_index_equal(out.index, df.index)
    pd.testing.assert_series_equal(out["id"], df["id"])
    assert out["nsfw_score"].dtype == np.float32
    _assert_matches_keras(out["nsfw_score"].to_numpy(), head["keras"])


def test_scorer_and_module_exact(head: dict) -> None:
    scorer = NSFWScorer(model=head["model"], device="cpu", exact=True)
    got = scorer(head["x"])
    assert got.shape == (len(head["x"]),) and got.dtype == torch.float32
    _assert_matches_keras(got.numpy(), head["keras"])
    assert isinstance(scorer.nsfw_model, ExactNSFWModel)
    with torch.inference_mode():
        mod = scorer.nsfw_model(torch.from_numpy(head["x"])).view(-1).numpy()
    _assert_matches_keras(mod, head["keras"])


def test_exact_input_dtypes_and_list_types(head: dict) -> None:
    """float16 data (how LAION stores it) and float64/fixed-size lists give the same exact scores."""
    with np.errstate(over="ignore"):  # the special rows' 1e30 becomes inf, the same in every variant
        x16 = head["x"].astype(np.float16)
    ref = score_nsfw(_frame(x16.astype(np.float32)), model=head["model"], exact=True)["nsfw_score"]
    dim = x16.shape[1]
    for frame in (
        _frame(x16),
        _frame(x16.astype(np.float64)),
        _frame(x16.astype(np.float32), pa.list_(pa.float32(), dim)),
    ):
        got = score_nsfw(frame, model=head["model"], exact=True)["nsfw_score"]
        np.testing.assert_allclose(got.to_numpy(), ref.to_numpy(), rtol=0, atol=1e-6, equal_nan=True)


def test_exact_through_dask_without_meta(head: dict) -> None:
    df = _frame(head["x"])
    ddf = dd.from_pandas(df, npartitions=5, sort=False)
    with dask.config.set(scheduler="threads"):
        out = ddf.map_partitions(score_nsfw, model=head["model"], exact=True).compute()
    assert list(out.index) == list(df.index)  # dask may store the string index as Arrow strings
    _assert_matches_keras(out["nsfw_score"].to_numpy(), head["keras"])


def test_default_mode_is_unchanged_and_differs_from_exact(head: dict) -> None:
    """exact=False stays NeMo Curator's port; the README's table of differences, recomputed."""
    df = _frame(head["x"])
    default = score_nsfw(df, model=head["model"])["nsfw_score"].to_numpy().astype(np.float64)
    exact = score_nsfw(df, model=head["model"], exact=True)["nsfw_score"].to_numpy().astype(np.float64)
    k = head["keras"]
    fin = ~np.isnan(k) & ~np.isnan(default)
    d_default, d_exact = np.abs(default[fin] - k[fin]), np.abs(exact[fin] - k[fin])
    flips_default = int(np.sum((default[fin] >= 0.5) != (k[fin] >= 0.5)))
    flips_exact = int(np.sum((exact[fin] >= 0.5) != (k[fin] >= 0.5)))
    assert d_default.max() > 0.4 and int(np.sum(d_default > 1e-3)) > 300 and flips_default > 30
    assert d_exact.max() <= TOL and flips_exact == 0
    if head["tag"] == "l14":
        nemo = _npz("l14_reference.npz")["nemo_scores"]
        # the stored NeMo scores come from another CPU (last bits differ by up to 3.5e-6 across
        # CPUs): the contract's 1e-5, not bitwise (README, "Exactness")
        np.testing.assert_allclose(default[: len(nemo)], nemo, rtol=0, atol=1e-5)


def test_exact_type_checked() -> None:
    df = _frame(np.zeros((2, 768), np.float32))
    with pytest.raises(TypeError, match="exact"):
        score_nsfw(df, exact="yes")


# ---------------------------------------------------------------- CLI


def test_cli_exact(tmp_path: Path, head: dict, shared_scheduler: str) -> None:
    """``score --exact``: a finished OUTPUT (``_SUCCESS``), one part per 100-row group in input
    order, the id and LAION's score of every row, the embeddings not written again.  On the
    session's cluster (1 worker x 1 thread, conftest.py): the exact model is loaded there once."""
    n = 300
    table = pa.table({"id": np.arange(n), "emb": pa.array(list(head["x"][:n]), type=pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=100)
    out = tmp_path / "out"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "nsfw_dask",
            "score",
            str(tmp_path / "in.parquet"),
            str(out),
            "--exact",
            "--model",
            head["model"],
            "--rows-per-partition",
            "100",
            "--scheduler",
            shared_scheduler,
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    parts = [f"part.{i:06d}.in.parquet" for i in range(3)]
    assert {p.name for p in out.iterdir()} == {"_SUCCESS", "_nsfw_dask_job.json", *parts}
    files = sorted(out.glob("part.*.parquet"))  # name order = input order
    assert [f.name for f in files] == parts and [pq.read_metadata(f).num_rows for f in files] == [100] * 3
    got = pd.concat([pd.read_parquet(f, dtype_backend="pyarrow") for f in files], ignore_index=True)
    assert list(got.columns) == ["id", "nsfw_score"]
    np.testing.assert_array_equal(got["id"].to_numpy(), np.arange(n))  # row order kept, no row lost
    _assert_matches_keras(got["nsfw_score"].to_numpy(dtype=np.float64, na_value=np.nan), head["keras"][:n])
    job = json.loads((out / "_nsfw_dask_job.json").read_text())
    assert job["options"]["exact"] is True and job["options"]["model"] == head["model"]


def test_lazy_and_eager_nan_imputation_agree(head: dict) -> None:
    """CPU imputes NaN only for rows whose score came out NaN; CUDA imputes every batch.  Both
    paths (run here on the CPU) give the same bits, on rows with NaN in any column."""
    from nsfw_dask._forward import Runner

    model = nsfw_dask.load_model(head["model"], exact=True)
    x = torch.from_numpy(head["x"]).clone()
    x[::97, 5] = float("nan")  # NaN in a numeric column of every 97th row
    cpu = torch.device("cpu")
    lazy, eager = Runner(model, cpu), Runner(model, cpu, impute_eagerly=True)
    assert not lazy.impute_eagerly and eager.impute_eagerly
    a, b = torch.empty(len(x)), torch.empty(len(x))
    with torch.inference_mode():
        for i in range(0, len(x), 512):
            lazy(x[i : i + 512], a[i : i + 512])
            eager(x[i : i + 512], b[i : i + 512])
    assert torch.equal(a.isnan(), b.isnan())
    assert torch.equal(a.nan_to_num(-1), b.nan_to_num(-1))
    assert not a[::97].isnan().any()  # a NaN value counts as 0: those rows are scored


def test_savedmodel_zip_download_is_verified(tmp_path: Path, monkeypatch) -> None:
    """The zip comes through the weights' machinery: downloaded once into the user cache,
    SHA-256 checked (a wrong file is never saved), then found without the network."""
    from nsfw_dask.weights import resolve_file

    from _http import LocalServer

    assert WEIGHTS_DIR is not None
    keras = MODEL_SPECS["vit-b-32"].keras
    srv = LocalServer().start()
    good = srv.serve(f"/{keras.filename}", body=(WEIGHTS_DIR / keras.filename).read_bytes())
    wrong = srv.serve("/wrong.zip", body=b"not the zip")
    cache = tmp_path / "cache"
    monkeypatch.setenv("NSFW_DASK_CACHE_DIR", str(cache))
    monkeypatch.delenv("NSFW_DASK_MODEL_DIR", raising=False)
    try:
        with pytest.raises(WeightsIntegrityError, match="sha256"):
            resolve_file(keras.filename, wrong, keras.sha256, what="zip", download=True)
        assert not (cache / keras.filename).exists() and not list(cache.glob("*.part"))
        path = resolve_file(keras.filename, good, keras.sha256, what="zip", download=True)
        assert path == cache / keras.filename
        assert read_savedmodel_vocabulary(path).columns == keras.columns
        assert srv.hits[f"/{keras.filename}"] == 1
        again = resolve_file(keras.filename, good, keras.sha256, what="zip", download=False)
        assert again == path and srv.hits[f"/{keras.filename}"] == 1  # from the cache, offline
    finally:
        srv.stop()


def test_cli_fetch_weights_exact_caches_the_vocabulary(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "NSFW_DASK_CACHE_DIR": str(tmp_path / "cache"), "NSFW_DASK_OFFLINE": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "nsfw_dask", "fetch-weights", "--exact", "--model", "vit-b-32"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split()
    # every head with weights for vit-b-32 (the NSFW head, then aesthetic v1), then the zip
    assert lines[0].endswith("clip_ViT-B-32_openai_binary_nsfw_head.pth")
    assert lines[1].endswith("sa_0_4_vit_b_32_linear.pth")
    assert lines[2].endswith("clip_autokeras_nsfw_b32.zip") and len(lines) == 3
    cached = tmp_path / "cache" / "clip_autokeras_nsfw_b32.vocab.json"
    assert json.loads(cached.read_text())["digest"] == MODEL_SPECS["vit-b-32"].keras.vocab_digest
