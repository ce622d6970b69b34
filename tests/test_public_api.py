"""The public surface: ``nsfw_dask.__all__``, every name that used to be there, NeMo's classes."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import warnings

import pytest

import nsfw_dask

ALL = [
    "EmbeddingColumnError",
    "EmbeddingFormatError",
    "EmbeddingNormError",
    "JobError",
    "NSFWModelPlugin",
    "NotUnitNormWarning",
    "NsfwDaskError",
    "ReducedPrecisionError",
    "Summary",
    "WeightsError",
    "WeightsIntegrityError",
    "WeightsNotFoundError",
    "__version__",
    "clear_model_cache",
    "load_heads",
    "load_model",
    "model_cache_info",
    "nsfw_meta",
    "read_embeddings",
    "score",
    "score_aesthetic",
    "score_dataset",
    "score_heads",
    "score_nsfw",
]

#: Out of ``__all__`` but still at the top level, silently: name -> the module that has it.
COMPAT = {
    "AestheticScorer": "nsfw_dask.nemo",
    "NSFWScorer": "nsfw_dask.nemo",
    "NSFWModel": "nsfw_dask.nemo",
    "Normalization": "nsfw_dask.nemo",
    "MODEL_SPECS": "nsfw_dask.models",
    "cache_dir": "nsfw_dask.weights",
    "fetch_weights": "nsfw_dask.weights",
    "resolve_weights": "nsfw_dask.weights",
}

#: Moved: the top level still has them, with a DeprecationWarning naming the module.
MOVED = {
    "DEFAULT_BATCH_SIZE": "nsfw_dask.scoring",
    "ExactNSFWModel": "nsfw_dask.exact",
    "ModelSpec": "nsfw_dask.models",
    "load_vocabulary": "nsfw_dask.exact",
}

#: ``nsfw_dask.__all__`` before the surface was cut (0.x): every one must still import.
OLD_ALL = [
    "DEFAULT_BATCH_SIZE",
    "MODEL_SPECS",
    "EmbeddingColumnError",
    "EmbeddingFormatError",
    "ExactNSFWModel",
    "JobError",
    "ModelSpec",
    "NSFWModel",
    "NSFWModelPlugin",
    "NSFWScorer",
    "Normalization",
    "Summary",
    "NsfwDaskError",
    "WeightsError",
    "WeightsIntegrityError",
    "WeightsNotFoundError",
    "__version__",
    "cache_dir",
    "clear_model_cache",
    "fetch_weights",
    "load_model",
    "load_vocabulary",
    "model_cache_info",
    "nsfw_meta",
    "read_embeddings",
    "resolve_weights",
    "score",
    "score_dataset",
    "score_nsfw",
]


def test_all_is_exactly_the_dask_surface() -> None:
    assert nsfw_dask.__all__ == ALL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ALL:
            assert getattr(nsfw_dask, name) is not None


def test_star_import_gives_all_and_no_warning() -> None:
    ns: dict[str, object] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec("from nsfw_dask import *", ns)
    assert sorted(k for k in ns if k != "__builtins__") == sorted(ALL)


#: Added to ``__all__`` since the surface was cut (the norm check, issue 20).
ADDED = {
    "AestheticScorer",
    "EmbeddingNormError",
    "NotUnitNormWarning",
    "ReducedPrecisionError",
    "load_heads",
    "score_aesthetic",
    "score_heads",
}


def test_old_names_all_still_import() -> None:
    assert set(OLD_ALL) | ADDED == set(ALL) | set(COMPAT) | set(MOVED)
    for name in OLD_ALL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ns: dict[str, object] = {}
            exec(f"from nsfw_dask import {name}", ns)
            assert ns[name] is getattr(nsfw_dask, name)


@pytest.mark.parametrize("name", sorted(COMPAT))
def test_compat_names_import_silently_from_their_module(name: str) -> None:
    module = importlib.import_module(COMPAT[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ns: dict[str, object] = {}
        exec(f"from nsfw_dask import {name}", ns)
    assert ns[name] is getattr(module, name)
    assert name not in nsfw_dask.__all__
    assert name in dir(nsfw_dask)


@pytest.mark.parametrize("name", sorted(MOVED))
def test_moved_names_warn_with_the_new_import(name: str) -> None:
    module = importlib.import_module(MOVED[name])
    hint = f"from {MOVED[name]} import {name}"
    with pytest.warns(DeprecationWarning, match=hint) as record:
        value = getattr(nsfw_dask, name)
    assert value is getattr(module, name)
    assert record[0].filename == __file__  # points at the user's line, not at nsfw_dask
    with pytest.warns(DeprecationWarning, match=hint) as record:
        ns: dict[str, object] = {}
        exec(compile(f"from nsfw_dask import {name}", __file__, "exec"), ns)
    assert ns[name] is getattr(module, name)
    assert {r.filename for r in record} == {__file__}
    assert name not in nsfw_dask.__all__


def test_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        nsfw_dask.no_such_name  # noqa: B018
    assert not hasattr(nsfw_dask, "no_such_name")
    with pytest.raises(ImportError):
        exec("from nsfw_dask import no_such_name", {})


def test_nemo_module_holds_nemo_classes() -> None:
    import nsfw_dask.models
    import nsfw_dask.nemo
    import nsfw_dask.scorer
    from nsfw_dask.scorer import NSFWScorer as FromScorer

    assert nsfw_dask.nemo.NSFWScorer is nsfw_dask.NSFWScorer is FromScorer
    assert nsfw_dask.nemo.NSFWScorer.__module__ == "nsfw_dask.nemo"
    assert nsfw_dask.nemo.NSFWModel is nsfw_dask.NSFWModel is nsfw_dask.models.NSFWModel
    assert nsfw_dask.nemo.Normalization is nsfw_dask.Normalization is nsfw_dask.models.Normalization
    assert sorted(nsfw_dask.nemo.__all__) == ["AestheticScorer", "NSFWModel", "NSFWScorer", "Normalization"]
    assert nsfw_dask.scorer.__all__ == ["NSFWScorer"]


def test_nsfw_scorer_has_nemo_curators_interface() -> None:
    from nsfw_dask.nemo import NSFWScorer

    # NeMo Curator's nemo_curator/models/nsfw.py: ModelInterface with these members
    assert isinstance(NSFWScorer.__dict__["conda_env_name"], property)
    assert isinstance(NSFWScorer.__dict__["model_id_names"], property)
    assert callable(NSFWScorer.setup) and callable(NSFWScorer.download_weights_on_node)
    scorer = NSFWScorer(device="cpu")  # no weights needed for these
    assert scorer.conda_env_name == "video_splitting"
    assert scorer.model_id_names == ["laion/clip-autokeras-binary-nsfw"]
    assert scorer.nsfw_model is None and scorer.weights_path is None


def test_import_loads_no_gpu_library() -> None:
    """``import nsfw_dask`` imports no GPU library, and its own code does not even try (installed
    or not; distributed's own optional ``import rmm`` is not ours)."""
    code = textwrap.dedent("""
        import inspect, os, sys
        GPU = ("cudf", "cupy", "rmm", "dask_cudf", "dask_cuda", "cuml", "pylibcudf")
        tried = []
        class Spy:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in GPU:
                    frame = inspect.currentframe().f_back
                    while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
                        frame = frame.f_back  # the import machinery
                    where = frame.f_code.co_filename if frame is not None else ""
                    if os.sep + "nsfw_dask" + os.sep in where:
                        tried.append(name)
                return None
        sys.meta_path.insert(0, Spy())
        import nsfw_dask
        for name in nsfw_dask.__all__:
            getattr(nsfw_dask, name)
        import nsfw_dask.nemo
        # rmm: distributed imports it itself when installed (the GPU extra); our attempts are in `tried`
        print(sorted(set(tried)), sorted(m for m in sys.modules if m.split(".")[0] in GPU and m.split(".")[0] != "rmm"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []", out.stdout
