"""The installed cuDF / CuPy / dask-cuda / rmm / torch API is the one ``_cudf.py`` and ``gpu.py`` use.

Runs wherever the GPU extra is installed, with or without a GPU: ``import cudf`` works on a CPU
machine, only creating device objects fails.  So nothing here builds a cuDF Series or a CuPy array;
every check reads signatures, attributes and sources with :mod:`inspect`, or builds host-only
objects (dtypes).  Each failure names the API and the installed version, so an upgrade that moves
an API shows up here on CPU CI instead of on the first GPU run.
"""

from __future__ import annotations

import functools
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.gpu_api


def _version(name: str) -> str:
    mod = sys.modules.get(name) or __import__(name)
    return f"{name} {getattr(mod, '__version__', '?')}"


def _params(func: Any) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(func).parameters)


def _assert_params(func: Any, names: list[str], api: str, lib: str) -> None:
    params = _params(func)
    missing = [n for n in names if n not in params]
    assert not missing, (
        f"{api} no longer accepts {missing} in {_version(lib)}; its signature is {inspect.signature(func)}"
    )


def _assert_property(cls: type, name: str, api: str, lib: str) -> None:
    attr = inspect.getattr_static(cls, name, None)
    assert attr is not None, f"{api} does not exist in {_version(lib)}"
    assert isinstance(attr, (property, functools.cached_property)), (
        f"{api} is a {type(attr).__name__} in {_version(lib)}, expected a property"
    )


def _cudf_release(cudf: Any) -> tuple[int, int]:
    major, minor = cudf.__version__.split(".")[:2]
    return int(major), int(minor)


@pytest.fixture(scope="module")
def cudf() -> Any:
    return pytest.importorskip("cudf")


@pytest.fixture(scope="module")
def cupy() -> Any:
    return pytest.importorskip("cupy")


def _run_python(code: str) -> None:
    """Run ``code`` in a fresh interpreter (clean ``sys.modules`` and dispatch state)."""
    proc = subprocess.run(
        [sys.executable, "-W", "error", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"


# -- a fresh install imports cuDF ---------------------------------------------------------------


def test_fresh_install_imports_cudf() -> None:
    """``import cudf`` in a fresh interpreter, with the numpy this install resolved."""
    _run_python("""
        import numpy, cudf, dask_cudf, dask_cuda
        print(cudf.__version__, numpy.__version__)
    """)


def test_numba_cuda_needs_the_numpy_the_gpu_extras_allow() -> None:
    """Why the GPU extras say ``numpy<2.5``: numba-cuda (``<0.31`` for cuDF 26.10) registers
    ``np.row_stack`` when cuDF imports it, and numpy 2.5 removed that name.  Checked here by
    removing the name from this numpy (numpy 2.5 needs Python >= 3.12): ``import cudf`` then fails
    as it did on the first GPU run.  When a numba-cuda without it is admitted, lift the bound."""
    numba_cuda = pytest.importorskip("numba_cuda")
    from importlib.metadata import version

    src = Path(numba_cuda.__file__).parent / "numba" / "cuda" / "np" / "arrayobj.py"
    registers = src.is_file() and "np.row_stack" in src.read_text()
    if not registers:
        pytest.skip(f"numba-cuda {version('numba-cuda')} no longer registers np.row_stack: numpy<2.5 can go")
    assert hasattr(np, "row_stack"), (
        f"numpy {np.__version__} has no row_stack but numba-cuda {version('numba-cuda')} registers it: "
        "import cudf fails; the GPU extras must keep numpy<2.5"
    )
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", "import numpy; del numpy.row_stack; import cudf"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0 and "row_stack" in proc.stderr, (proc.returncode, proc.stderr[-2000:])


# -- the package's own modules ------------------------------------------------------------------


def test_backend_modules_import(cudf: Any) -> None:
    import nsfw_dask._cudf as backend
    import nsfw_dask.gpu as gpu

    for name in ("default_device", "resolve_column", "to_segments", "attach"):
        assert callable(getattr(backend.CudfBackend, name, None)), f"CudfBackend.{name} missing"
    assert backend.CudfBackend.name == "cudf"
    for name in (
        "cuda_available",
        "local_cuda_cluster",
        "use_rmm_for_torch",
        "cuda_cluster_options",
        "check_cuda_workers",
        "cuda_worker_options",
        "release_gpu_buffers",
    ):
        assert callable(getattr(gpu, name, None)), f"nsfw_dask.gpu.{name} missing"


def test_cpu_import_path_never_imports_gpu_libraries() -> None:
    """``import nsfw_dask`` (and ``nsfw_dask.gpu``) and pandas scoring paths stay off cuDF.

    (CuPy and rmm are left out: ``import dask.dataframe`` and ``import distributed`` import them
    themselves wherever they are installed.)
    """
    _run_python("""
        import sys
        import pandas as pd, pyarrow as pa
        import dask.dataframe as dd
        import nsfw_dask, nsfw_dask.gpu
        t = pd.ArrowDtype(pa.list_(pa.float32()))
        meta = nsfw_dask.nsfw_meta(pd.DataFrame({"emb": pd.Series([], dtype=t)}))
        assert str(meta["nsfw_score"].dtype) == "float32", meta.dtypes
        ddf = dd.from_pandas(pd.DataFrame({"emb": pd.Series([[0.0] * 768] * 4, dtype=t)}),
                             npartitions=2)
        inferred = ddf.map_partitions(nsfw_dask.score_nsfw)._meta
        assert str(inferred["nsfw_score"].dtype) == "float32", inferred.dtypes
        loaded = sorted(m for m in ("cudf", "dask_cudf", "dask_cuda", "pylibcudf",
                                    "nsfw_dask._cudf") if m in sys.modules)
        assert not loaded, f"the CPU path imported {loaded}"
    """)


def test_lazy_dispatch_imports_cudf_backend_on_first_cudf_type() -> None:
    """``Dispatch.register_lazy("cudf")`` resolves ``cudf.DataFrame`` (and subclasses) to the
    cuDF backend, importing ``nsfw_dask._cudf`` only then; no DataFrame is instantiated."""
    _run_python("""
        import sys
        import cudf, dask
        import nsfw_dask
        from nsfw_dask.dispatch import backend_dispatch, _unsupported
        assert "nsfw_dask._cudf" not in sys.modules, "nsfw_dask._cudf imported eagerly"
        assert "cudf" in backend_dispatch._lazy, f"no lazy cudf hook: {backend_dispatch._lazy}"

        class Sub(cudf.DataFrame):  # module __main__: reached through the MRO
            pass

        func = backend_dispatch.dispatch(Sub)
        assert "nsfw_dask._cudf" in sys.modules, "lazy hook did not import nsfw_dask._cudf"
        import nsfw_dask._cudf as backend
        assert func is backend._cudf_backend, (func, dask.__version__)
        assert backend_dispatch.dispatch(cudf.DataFrame) is backend._cudf_backend
        assert func(None) is backend._BACKEND and func(None).name == "cudf"
        # cuDF objects other than DataFrame stay unsupported (a clear TypeError, not a crash)
        assert backend_dispatch.dispatch(cudf.Series) is _unsupported
    """)


def test_dispatch_in_process(cudf: Any) -> None:
    import pandas as pd

    import nsfw_dask._arrow
    import nsfw_dask._cudf
    from nsfw_dask.dispatch import backend_dispatch

    assert backend_dispatch.dispatch(cudf.DataFrame) is nsfw_dask._cudf._cudf_backend, (
        f"cudf.DataFrame does not dispatch to the cuDF backend ({_version('dask')}, {_version('cudf')})"
    )
    assert backend_dispatch.dispatch(pd.DataFrame)(None).name == "pandas"
    assert cudf.DataFrame.__module__.partition(".")[0] == "cudf", (
        f"cudf.DataFrame.__module__ is {cudf.DataFrame.__module__!r} in {_version('cudf')}; "
        "register_lazy('cudf') keys on the top-level module name"
    )


# -- cuDF ---------------------------------------------------------------------------------------


def test_cudf_list_dtype(cudf: Any) -> None:
    assert isinstance(getattr(cudf, "ListDtype", None), type), f"cudf.ListDtype missing ({_version('cudf')})"
    _assert_property(cudf.ListDtype, "element_type", "cudf.ListDtype.element_type", "cudf")
    _assert_property(cudf.ListDtype, "leaf_type", "cudf.ListDtype.leaf_type", "cudf")
    # host-only objects: no device memory involved
    d = cudf.ListDtype("float32")
    assert d.element_type == np.dtype("float32"), (
        f"cudf.ListDtype('float32').element_type is {d.element_type!r} in {_version('cudf')}; "
        "_cudf.py takes np.dtype(element_type).kind"
    )
    nested = cudf.ListDtype(d)
    assert isinstance(nested.element_type, cudf.ListDtype), "nested ListDtype.element_type"
    assert nested.leaf_type == np.dtype("float32")


def test_float_list_dtype_predicate(cudf: Any) -> None:
    """``_is_float_list_dtype`` on the dtypes a cuDF frame can hold (host-only dtypes)."""
    from nsfw_dask._cudf import _is_float_list_dtype

    assert _is_float_list_dtype(cudf.ListDtype("float32"))
    assert _is_float_list_dtype(cudf.ListDtype("float64"))
    for dtype in (
        np.dtype("float32"),
        cudf.ListDtype("int64"),
        cudf.ListDtype("bool"),
        cudf.ListDtype(cudf.ListDtype("float32")),
    ):
        assert not _is_float_list_dtype(dtype), dtype


@pytest.mark.parametrize("element", ["str", "struct", "decimal"])
def test_float_list_dtype_predicate_non_numpy_elements(cudf: Any, element: str) -> None:
    """A ``list<str>``/``list<struct>``/``list<decimal>`` column next to the embeddings is simply
    not a candidate: it must not make column resolution raise."""
    from nsfw_dask._cudf import _is_float_list_dtype

    elem = {
        "str": "str",
        "struct": cudf.StructDtype({"a": "int32"}),
        "decimal": cudf.Decimal64Dtype(7, 2),
    }[element]
    dtype = cudf.ListDtype(elem)
    try:
        got = _is_float_list_dtype(dtype)
    except TypeError as e:  # np.dtype(<extension dtype>) raises
        pytest.fail(
            f"_is_float_list_dtype({dtype!r}) raised {e!r} in {_version('cudf')}: "
            f"element_type is {type(dtype.element_type).__name__}, not a numpy dtype"
        )
    assert got is False


class _SchemaOnlyFrame:
    """Stands in for a cuDF DataFrame where only the schema is read (no device memory)."""

    def __init__(self, dtypes: dict[str, Any]) -> None:
        import pandas as pd

        self.dtypes = pd.Series(dtypes, dtype=object)
        self.columns = list(dtypes)

    def __getitem__(self, key: str) -> Any:
        from types import SimpleNamespace

        return SimpleNamespace(dtype=self.dtypes[key])


def test_resolve_column_skips_non_float_list_columns(cudf: Any) -> None:
    """A ``tags: list<str>`` column beside the embeddings: the embeddings are still found."""
    from nsfw_dask._cudf import CudfBackend

    frame = _SchemaOnlyFrame({"tags": cudf.ListDtype("str"), "emb": cudf.ListDtype("float32"), "id": np.dtype("int64")})
    assert CudfBackend().resolve_column(frame, None, schema_only=True) == "emb"


def test_cudf_dtype_descriptions(cudf: Any) -> None:
    """What ``meta_inference_column`` reads for cuDF dtypes (host-only dtypes, no device)."""
    from nsfw_dask._cudf import describe_dtype

    assert describe_dtype(cudf.ListDtype("float32")) == "list<float32>"
    assert describe_dtype(cudf.ListDtype("float64")) == "list<float64>"
    assert describe_dtype(cudf.ListDtype("int64")) == "list<int64>"
    assert describe_dtype(cudf.ListDtype("str")) == "list<str>"
    assert describe_dtype(cudf.ListDtype(cudf.ListDtype("float32"))) == "list<list<float32>>"
    assert describe_dtype(cudf.dtype("str")) == "str", (cudf.dtype("str"), _version("cudf"))
    assert describe_dtype(np.dtype("int64")) == "int64"


@pytest.mark.parametrize(
    "fake",
    [
        {"id": "int64", "emb": "list<int64>"},  # dask_cudf.from_cudf: the fake list's leaves were not float
        {"id": "int64", "embedding": "str", "url": "str"},  # parquet under the cudf backend: strings
    ],
)
def test_resolve_column_on_dask_cudf_fake_partitions(cudf: Any, fake: dict[str, str]) -> None:
    """The fake partitions the first GPU run met: undecided during meta inference (no error);
    the same schema on a real partition is the one-line "No column of float lists" error."""
    from nsfw_dask._cudf import CudfBackend
    from nsfw_dask.exceptions import EmbeddingColumnError

    dtypes = {"int64": np.dtype("int64"), "str": cudf.dtype("str"), "list<int64>": cudf.ListDtype("int64")}
    frame = _SchemaOnlyFrame({name: dtypes[kind] for name, kind in fake.items()})
    assert CudfBackend().resolve_column(frame, None, schema_only=True) is None
    with pytest.raises(EmbeddingColumnError, match="No column of float lists") as e:
        CudfBackend().resolve_column(frame, None, schema_only=False)
    for name, kind in fake.items():
        assert f"{name!r}: {kind}" in str(e.value), str(e.value)


@pytest.mark.parametrize("element", ["int64", "str", "nested", "not-a-list"])
def test_to_segments_rejects_non_float_lists(cudf: Any, element: str) -> None:
    """``column=`` naming a list column of non-floats: EmbeddingFormatError (a ValueError)
    naming the column, raised from the schema alone before any device work."""
    from nsfw_dask._cudf import CudfBackend
    from nsfw_dask.exceptions import EmbeddingFormatError
    from nsfw_dask.models import get_spec

    dtype = {
        "int64": cudf.ListDtype("int64"),
        "str": cudf.ListDtype("str"),
        "nested": cudf.ListDtype(cudf.ListDtype("float32")),
        "not-a-list": np.dtype("float32"),
    }[element]
    frame = _SchemaOnlyFrame({"bad": dtype})
    with pytest.raises(EmbeddingFormatError, match="'bad'"):
        CudfBackend().to_segments(frame, "bad", get_spec("vit-l-14"))


def test_cudf_series_list_accessor(cudf: Any) -> None:
    _assert_property(cudf.Series, "list", "cudf.Series.list", "cudf")
    from cudf.core.accessors.lists import ListMethods

    ann = inspect.getattr_static(cudf.Series, "list").fget
    assert "ListMethods" in inspect.getsource(ann), "cudf.Series.list no longer returns ListMethods"
    assert callable(getattr(ListMethods, "len", None)), f"Series.list.len missing ({_version('cudf')})"
    assert list(_params(ListMethods.len)) == ["self"], f"Series.list.len{inspect.signature(ListMethods.len)}"
    _assert_property(ListMethods, "leaves", "cudf.Series.list.leaves", "cudf")
    src = inspect.getsource(ListMethods.leaves.fget)
    assert "retain_index=False" in src, (
        f"Series.list.leaves in {_version('cudf')} no longer drops the index (flat values expected)"
    )


def test_cudf_list_leaves_are_a_sliced_view(cudf: Any) -> None:
    """cuDF >= 26.02: leaves = ``_get_sliced_child()``, a view that honours the slice offset."""
    from cudf.core.column.lists import ListColumn

    if _cudf_release(cudf) < (26, 2):
        pytest.skip(f"{_version('cudf')}: leaves of a sliced column are a device copy (GPU_NOTES)")
    leaves_src = inspect.getsource(ListColumn.leaves)
    assert "self.elements" in leaves_src, f"ListColumn.leaves changed in {_version('cudf')}"
    elements = inspect.getattr_static(ListColumn, "elements")
    assert isinstance(elements, property)
    assert "_get_sliced_child" in inspect.getsource(elements.fget), (
        f"ListColumn.elements no longer uses _get_sliced_child in {_version('cudf')}: the "
        "zero-copy claim for sliced frames in nsfw_dask/_cudf.py needs re-checking"
    )


def test_cudf_series_members(cudf: Any) -> None:
    _assert_params(cudf.Series.__init__, ["data", "index", "dtype", "nan_as_null"], "cudf.Series(...)", "cudf")
    _assert_params(cudf.Series.fillna, ["value"], "cudf.Series.fillna", "cudf")
    for name in ("notna", "any", "sum"):
        assert callable(getattr(cudf.Series, name, None)), f"cudf.Series.{name} missing ({_version('cudf')})"
    for name in ("null_count", "values", "iloc", "index", "dtype"):
        _assert_property(cudf.Series, name, f"cudf.Series.{name}", "cudf")
    values = inspect.getattr_static(cudf.Series, "values").fget
    src = inspect.getsource(values)
    assert "cp.asarray(col)" in src or "cupy.asarray(col)" in src, (
        f"cudf.Series.values in {_version('cudf')} no longer returns cp.asarray(column) for "
        "null-free numeric data (the zero-copy CUDA-array-interface path)"
    )


def test_cudf_dataframe_members(cudf: Any) -> None:
    _assert_params(cudf.DataFrame.copy, ["deep"], "cudf.DataFrame.copy", "cudf")
    _assert_property(cudf.DataFrame, "dtypes", "cudf.DataFrame.dtypes", "cudf")
    _assert_property(cudf.DataFrame, "index", "cudf.DataFrame.index", "cudf")
    assert callable(getattr(cudf.DataFrame, "__setitem__", None))


def test_cudf_setitem_with_same_index_does_not_realign(cudf: Any) -> None:
    """``attach`` assigns ``Series(values, index=out.index)``: that must not re-align by label
    (which would fail or reorder on duplicate labels); cuDF short-circuits on an equal index."""
    from cudf.core.indexed_frame import IndexedFrame

    src = inspect.getsource(IndexedFrame._align_to_index)
    assert "if self.index.equals(index):" in src and "return self" in src, (
        f"IndexedFrame._align_to_index in {_version('cudf')} no longer returns early for an equal "
        "index: CudfBackend.attach may re-align (or raise) on duplicate index labels"
    )


def test_cudf_series_from_cupy_keeps_nan(cudf: Any) -> None:
    """``cudf.Series(cupy_array, nan_as_null=False)`` keeps NaN scores as NaN (not null)."""
    from cudf.core.column.column import as_column

    src = inspect.getsource(as_column)
    assert "__cuda_array_interface__" in src and "nan_as_null is not False" in src, (
        f"as_column in {_version('cudf')}: NaN handling of CUDA-array input changed"
    )


# -- dask_cudf / dask ---------------------------------------------------------------------------


def test_dask_cudf_nonempty_list_meta(cudf: Any) -> None:
    """dask_cudf's fake partition for a list column: ``[[0, 1], [0, 1]]`` built for the column's
    own dtype; rows of 2 values, so the scorer must not read values during meta inference.  (On
    the first GPU run the fake column's leaves were not float all the same: ``score_nsfw`` relies
    on neither the values nor the leaf type there, see ``nsfw_dask._common.meta_inference_column``.)"""
    pytest.importorskip("dask_cudf")
    import dask_cudf.backends as backends
    from dask.dataframe.dispatch import meta_nonempty

    src = inspect.getsource(backends._get_non_empty_data)
    assert "np.array([0, 1], dtype=leaf_type)" in src, (
        f"dask_cudf {_version('dask_cudf')}: the non-empty list meta is no longer [0, 1] rows"
    )
    assert "as_column(data, dtype=s.dtype)" in src, (
        f"dask_cudf {_version('dask_cudf')}: the non-empty list meta no longer keeps the dtype"
    )
    assert meta_nonempty.dispatch(cudf.DataFrame) is backends.meta_nonempty_cudf


def test_dask_meta_inference_frame_name() -> None:
    """``scoring._in_dask_meta_inference`` looks for dask's ``emulate`` calling the function."""
    from dask.dataframe.dask_expr import _expr

    assert callable(getattr(_expr, "emulate", None)), (
        f"dask.dataframe.dask_expr._expr.emulate missing ({_version('dask')})"
    )
    assert _expr.emulate.__code__.co_name == "emulate"
    assert "return func(" in inspect.getsource(_expr.emulate), (
        f"{_version('dask')}: emulate no longer calls the function directly"
    )
    assert "emulate(func" in inspect.getsource(_expr._get_meta_map_partitions), (
        f"{_version('dask')}: map_partitions meta inference no longer goes through emulate"
    )


def test_dask_cudf_backend_entry_point() -> None:
    from importlib.metadata import entry_points

    pytest.importorskip("dask_cudf")
    names = [e.name for e in entry_points(group="dask.dataframe.backends")]
    assert "cudf" in names, f"no 'cudf' dask.dataframe.backends entry point: {names}"


# -- CuPy ---------------------------------------------------------------------------------------


def test_cupy_functions(cupy: Any) -> None:
    for name in ("from_dlpack", "flatnonzero", "full", "argmax", "asarray", "asnumpy"):
        assert callable(getattr(cupy, name, None)), f"cupy.{name} missing ({_version('cupy')})"
    _assert_params(cupy.full, ["shape", "fill_value", "dtype"], "cupy.full", "cupy")
    _assert_params(cupy.argmax, ["a"], "cupy.argmax", "cupy")
    _assert_params(cupy.flatnonzero, ["a"], "cupy.flatnonzero", "cupy")
    _assert_params(cupy.asarray, ["a", "dtype"], "cupy.asarray", "cupy")
    doc = cupy.from_dlpack.__doc__ or ""  # a Cython builtin: no inspect signature
    assert doc.startswith("from_dlpack(array"), f"cupy.from_dlpack: {doc[:80]!r} ({_version('cupy')})"
    for name in ("__dlpack__", "__dlpack_device__", "reshape", "copy", "sum"):
        assert hasattr(cupy.ndarray, name), f"cupy.ndarray.{name} missing ({_version('cupy')})"
    assert cupy.float32 is np.float32


# -- torch --------------------------------------------------------------------------------------


def test_torch_dlpack_and_streams() -> None:
    import torch

    _assert_params(torch.from_dlpack, ["ext_tensor"], "torch.from_dlpack", "torch")
    assert hasattr(torch.Tensor, "__dlpack__"), "torch.Tensor.__dlpack__ missing (cp.from_dlpack(scores))"
    _assert_params(torch.cuda.current_stream, ["device"], "torch.cuda.current_stream", "torch")
    assert callable(getattr(torch.cuda.Stream, "synchronize", None))
    for name in ("is_cuda", "data_ptr", "numpy"):
        assert hasattr(torch.Tensor, name), f"torch.Tensor.{name} missing ({_version('torch')})"


def test_torch_pluggable_allocator_api() -> None:
    import torch

    mem = torch.cuda.memory
    assert callable(getattr(mem, "change_current_allocator", None)), (
        f"torch.cuda.memory.change_current_allocator missing ({_version('torch')})"
    )
    assert callable(getattr(mem, "get_allocator_backend", None)), (
        f"torch.cuda.memory.get_allocator_backend missing ({_version('torch')})"
    )
    assert list(_params(mem.get_allocator_backend)) == [], inspect.signature(mem.get_allocator_backend)
    _assert_params(mem.change_current_allocator, ["allocator"], "change_current_allocator", "torch")
    assert isinstance(getattr(mem, "CUDAPluggableAllocator", None), type), (
        "torch.cuda.memory.CUDAPluggableAllocator missing: rmm_torch_allocator would be None"
    )


# -- rmm / dask-cuda / nsfw_dask.gpu ------------------------------------------------------------


def test_rmm_torch_allocator_importable() -> None:
    import torch

    pytest.importorskip("rmm")
    from rmm.allocators.torch import rmm_torch_allocator

    if not torch.cuda.is_available():  # documented: None without CUDA (gpu.py relies on it)
        assert rmm_torch_allocator is None
    else:
        assert isinstance(rmm_torch_allocator, torch.cuda.memory.CUDAPluggableAllocator)


def test_use_rmm_for_torch_without_cuda() -> None:
    import torch

    import nsfw_dask.gpu as gpu

    pytest.importorskip("rmm")
    if torch.cuda.is_available():
        pytest.skip("would switch this process's torch allocator")
    assert gpu.cuda_available() is False
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        gpu.use_rmm_for_torch()
    with pytest.raises(RuntimeError, match="needs a CUDA device"):
        gpu.local_cuda_cluster()


def test_local_cuda_cluster_signature() -> None:
    dask_cuda = pytest.importorskip("dask_cuda")
    _assert_params(
        dask_cuda.LocalCUDACluster.__init__,
        [
            "rmm_async",
            "rmm_allocator_external_lib_list",
            "enable_cudf_spill",
            "rmm_pool_size",
            "rmm_release_threshold",
            "device_memory_limit",
        ],
        "dask_cuda.LocalCUDACluster",
        "dask_cuda",
    )
    from dask_cuda.plugins import enable_rmm_memory_for_library

    src = inspect.getsource(enable_rmm_memory_for_library)
    for lib in ('"torch"', '"cupy"'):
        assert lib in src, f"dask_cuda {dask_cuda.__version__}: rmm_allocator_external_lib_list lacks {lib}"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, {"rmm_allocator_external_lib_list": ["torch", "cupy"], "enable_cudf_spill": False, "rmm_async": True}),
        (
            {"rmm_pool_size": "1GB"},
            {"rmm_allocator_external_lib_list": ["torch", "cupy"], "enable_cudf_spill": False, "rmm_pool_size": "1GB"},
        ),
        (
            {"rmm_managed_memory": True},
            {
                "rmm_allocator_external_lib_list": ["torch", "cupy"],
                "enable_cudf_spill": False,
                "rmm_managed_memory": True,
            },
        ),
        (
            {"enable_cudf_spill": True, "n_workers": 1, "threads_per_worker": 2},
            {
                "rmm_allocator_external_lib_list": ["torch", "cupy"],
                "enable_cudf_spill": True,
                "rmm_async": True,
                "n_workers": 1,
                "threads_per_worker": 2,
            },
        ),
    ],
)
def test_local_cuda_cluster_recipe_binds(
    monkeypatch: pytest.MonkeyPatch, kwargs: dict[str, Any], expected: dict[str, Any]
) -> None:
    """The recipe's keywords bind to the real LocalCUDACluster and never pair a pool size with
    ``rmm_async`` (dask-cuda warns, and will raise); no cluster is started."""
    dask_cuda = pytest.importorskip("dask_cuda")
    import nsfw_dask.gpu as gpu

    real = dask_cuda.LocalCUDACluster
    seen: dict[str, Any] = {}

    def fake(**kw: Any) -> str:
        inspect.signature(real.__init__).bind(None, **kw)  # TypeError on an unknown keyword
        seen.update(kw)
        return "cluster"

    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(dask_cuda, "LocalCUDACluster", fake)
    assert gpu.local_cuda_cluster(**kwargs) == "cluster"
    assert seen == expected
    assert not (seen.get("rmm_async") and seen.get("rmm_pool_size") is not None)
    assert not (seen.get("rmm_async") and seen.get("rmm_managed_memory"))


def _rmm_setup(opts: dict[str, Any]) -> Any:
    """dask-cuda's RMMSetup worker plugin built from the options, as ``LocalCUDACluster`` does
    (``new_worker_spec`` -> ``worker_plugins``); its ``__init__`` validates and touches no GPU."""
    from dask_cuda.plugins import RMMSetup

    return RMMSetup(
        initial_pool_size=opts.get("rmm_pool_size"),
        maximum_pool_size=opts.get("rmm_maximum_pool_size"),
        managed_memory=opts.get("rmm_managed_memory", False),
        async_alloc=opts.get("rmm_async", False),
        release_threshold=opts.get("rmm_release_threshold"),
        log_directory=None,
        track_allocations=False,
        external_lib_list=opts.get("rmm_allocator_external_lib_list"),
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rmm_pool_size": "1GB"},
        {"rmm_managed_memory": True},
        {"rmm_async": False},
        {"rmm_managed_memory": True, "rmm_pool_size": "1GB"},
        {"rmm_release_threshold": "1GB"},
        {"rmm_async": True, "rmm_release_threshold": "1GB", "rmm_maximum_pool_size": "2GB"},
    ],
)
def test_cluster_options_are_accepted_by_rmm_setup(kwargs: dict[str, Any]) -> None:
    """Every allocator mode ``cuda_cluster_options`` produces passes dask-cuda's own checks."""
    dask_cuda = pytest.importorskip("dask_cuda")
    import nsfw_dask.gpu as gpu

    _assert_params(
        dask_cuda.plugins.RMMSetup.__init__,
        [
            "initial_pool_size",
            "maximum_pool_size",
            "managed_memory",
            "async_alloc",
            "release_threshold",
            "log_directory",
            "track_allocations",
            "external_lib_list",
        ],
        "dask_cuda.plugins.RMMSetup",
        "dask_cuda",
    )
    _rmm_setup(gpu.cuda_cluster_options(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "ours", "theirs"),
    [
        ({"rmm_async": True, "rmm_managed_memory": True}, "cannot be combined", "incompatible"),
        ({"rmm_pool_size": "1GB", "rmm_release_threshold": "1GB"}, "needs the async", "requires"),
    ],
)
def test_refused_combinations_are_refused_by_dask_cuda_too(kwargs: dict[str, Any], ours: str, theirs: str) -> None:
    """The combinations ``cuda_cluster_options`` refuses in one line are the ones dask-cuda refuses."""
    pytest.importorskip("dask_cuda")
    import nsfw_dask.gpu as gpu

    with pytest.raises(ValueError, match=ours):
        gpu.cuda_cluster_options(**kwargs)
    with pytest.raises(ValueError, match=theirs):
        _rmm_setup({"rmm_allocator_external_lib_list": None, **kwargs})


def test_dask_cuda_spilling_facts() -> None:
    """docs/gpu.md's reasons for ``enable_cudf_spill=False``, in the installed dask-cuda:
    with cuDF spilling on, ``DeviceHostFile`` keeps cuDF frames out of its own device->host
    spilling; ``LocalCUDACluster(enable_cudf_spill=True)`` turns cuDF spilling on in the client
    too; the default ``device_memory_limit`` is ``"default"`` (80%); one worker per GPU."""
    dask_cuda = pytest.importorskip("dask_cuda")
    from dask_cuda.device_host_file import DeviceHostFile
    from dask_cuda.is_spillable_object import cudf_spilling_status  # noqa: F401

    src = inspect.getsource(DeviceHostFile.__setitem__)
    assert "is_spillable_object(value)" in src and "self.others[key] = value" in src, (
        f"dask_cuda {dask_cuda.__version__}: DeviceHostFile no longer sets cuDF-spillable frames aside"
    )
    init = inspect.getsource(dask_cuda.LocalCUDACluster.__init__)
    assert 'cudf.set_option("spill", enable_cudf_spill)' in init, (
        f"dask_cuda {dask_cuda.__version__}: enable_cudf_spill no longer switches the client process"
    )
    params = _params(dask_cuda.LocalCUDACluster.__init__)
    assert params["device_memory_limit"].default == "default"
    assert params["enable_cudf_spill"].default is False
    assert params["threads_per_worker"].default == 1
    assert "Can not scale beyond visible devices" in inspect.getsource(dask_cuda.LocalCUDACluster.new_worker_spec)


def test_cudf_exposed_buffers_are_unspillable(cudf: Any) -> None:
    """A column's ``__cuda_array_interface__`` (how the leaves reach torch) accesses its buffer with
    ``scope="external"``, which marks a spillable buffer exposed: "unspillable permanently"."""
    from cudf.core.buffer.spillable_buffer import SpillableBufferOwner
    from cudf.core.column.column import ColumnBase

    cai = inspect.getattr_static(ColumnBase, "__cuda_array_interface__").fget
    assert 'scope="external"' in inspect.getsource(cai), f"{_version('cudf')}: CAI access scope changed"
    mark = SpillableBufferOwner.mark_exposed
    assert "unspillable permanently" in (mark.__doc__ or ""), f"{_version('cudf')}: mark_exposed changed"


# -- parquet reading ----------------------------------------------------------------------------


def test_dask_cudf_read_parquet_blocksize(cudf: Any) -> None:
    """``blocksize=None`` disables dask_cudf's partition fusion (default: 1/32 of a GPU)."""
    pytest.importorskip("dask_cudf")
    from dask_cudf.io import parquet as dcp

    _assert_params(dcp.read_parquet, ["path", "blocksize", "storage_options"], "dask_cudf read_parquet", "dask_cudf")
    assert _params(dcp.read_parquet)["blocksize"].default == "default"
    src = inspect.getsource(dcp.read_parquet)
    assert "_normalize_blocksize()" in src, f"{_version('dask_cudf')}: default blocksize no longer device-sized"
    assert _params(dcp._normalize_blocksize)["fraction"].default == 0.03125
    fusion = inspect.getsource(dcp.CudfReadParquetFSSpec._fusion_compression_factor.func)
    assert "if self.blocksize is None:" in fusion and "return 1" in fusion, (
        f"{_version('dask_cudf')}: blocksize=None may no longer disable partition fusion"
    )
    from dask_cudf.backends import CudfBackendEntrypoint

    assert "read_parquet" in inspect.getsource(CudfBackendEntrypoint.read_parquet)


def test_cudf_has_no_float16(cudf: Any) -> None:
    """Why float16 parquet goes through pyarrow: cuDF refuses float16 Arrow data."""
    from cudf.core.column.column import ColumnBase

    src = inspect.getsource(ColumnBase.from_arrow)
    assert "is_float16(array.type)" in src and "NotImplementedError" in src, (
        f"{_version('cudf')}: cuDF may read float16 now; read_parquet_embeddings' pyarrow detour could be dropped"
    )


def test_half_float_hint_for_list_of_strings(cudf: Any) -> None:
    """A list<str> column (libcudf's reading of Parquet FLOAT16) gets the pyarrow hint."""
    from nsfw_dask._cudf import CudfBackend, _is_string_list_dtype
    from nsfw_dask.exceptions import EmbeddingColumnError, EmbeddingFormatError
    from nsfw_dask.models import get_spec

    assert cudf.api.types.is_string_dtype(cudf.ListDtype("str").element_type)
    assert _is_string_list_dtype(cudf.ListDtype("str"))
    assert not _is_string_list_dtype(cudf.ListDtype("float32"))
    frame = _SchemaOnlyFrame({"id": np.dtype("int64"), "emb": cudf.ListDtype("str")})
    # dask's meta inference: undecided (a fake partition's list<str> may stand for anything)
    assert CudfBackend().resolve_column(frame, None, schema_only=True) is None
    with pytest.raises(EmbeddingColumnError) as e:  # a real partition: the hint
        CudfBackend().resolve_column(frame, None, schema_only=False)
    assert "float16" in str(e.value) and "read_parquet_embeddings" in str(e.value)
    # a float list beside it is still found
    ok = _SchemaOnlyFrame({"tags": cudf.ListDtype("str"), "emb": cudf.ListDtype("float32")})
    assert CudfBackend().resolve_column(ok, None, schema_only=True) == "emb"
    assert CudfBackend().resolve_column(ok, None, schema_only=False) == "emb"
    with pytest.raises(EmbeddingFormatError) as e2:
        CudfBackend().to_segments(frame, "emb", get_spec("vit-l-14"))
    msg = str(e2.value)
    assert "expected lists of float32 or float64" in msg and "float16, float32" not in msg
    assert "read_parquet_embeddings" in msg


# -- device of the data -------------------------------------------------------------------------


def test_default_device_follows_the_segments(cudf: Any) -> None:
    import torch

    import nsfw_dask._cudf as backend

    class Frame:  # any weak-referenceable object stands in for the partition
        pass

    a, b = Frame(), Frame()
    assert backend.CudfBackend().default_device(a) == "cuda"
    backend._remember_device(a, torch.device("cuda", 1))
    assert backend.CudfBackend().default_device(a) == "cuda:1"
    assert backend.CudfBackend().default_device(b) == "cuda"  # another frame: torch's current device
    assert torch.device(backend.CudfBackend().default_device(a)).index == 1


def test_cupy_device_context(cupy: Any) -> None:
    """``attach`` copies the scores under ``cp.cuda.Device(scores.device.index)``."""
    assert hasattr(cupy.cuda.Device, "__enter__") and hasattr(cupy.cuda.Device, "__exit__")


# -- what tests/test_gpu.py needs for RMM statistics --------------------------------------------


def test_rmm_statistics_api() -> None:
    pytest.importorskip("rmm")
    import rmm.statistics as st

    for name in ("statistics", "get_statistics", "enable_statistics"):
        assert callable(getattr(st, name, None)), f"rmm.statistics.{name} missing ({_version('rmm')})"
    assert "current_bytes" in st.Statistics.__dataclass_fields__
    import rmm.mr

    assert isinstance(getattr(rmm.mr, "CudaAsyncMemoryResource", None), type)


def test_torch_staging_api() -> None:
    """What ``Runner._stage_to_cuda`` and ``release_gpu_buffers`` call."""
    import torch

    _assert_params(torch.cuda.Event.record, ["stream"], "torch.cuda.Event.record", "torch")
    for name in ("synchronize", "record"):
        assert callable(getattr(torch.cuda.Event, name, None))
    for name in ("is_initialized", "empty_cache", "memory_stats", "current_stream"):
        assert callable(getattr(torch.cuda, name, None)), f"torch.cuda.{name} missing ({_version('torch')})"


# -- what tests/test_gpu.py builds its frames with ----------------------------------------------


def test_apis_used_by_gpu_tests(cudf: Any) -> None:
    dask_cudf = pytest.importorskip("dask_cudf")
    assert callable(getattr(cudf.Series, "from_arrow", None)), f"cudf.Series.from_arrow ({_version('cudf')})"
    assert callable(getattr(cudf.DataFrame, "from_arrow", None))
    _assert_params(cudf.DataFrame.to_pandas, ["arrow_type"], "cudf.DataFrame.to_pandas", "cudf")
    _assert_params(dask_cudf.from_cudf, ["data", "npartitions"], "dask_cudf.from_cudf", "dask_cudf")


def test_report_versions(cudf: Any) -> None:
    """Not a check: prints the versions these checks ran against (``pytest -s``/``-rA``)."""
    import importlib

    names = [
        "cudf",
        "dask_cudf",
        "dask_cuda",
        "cupy",
        "rmm",
        "dask",
        "distributed",
        "pandas",
        "pyarrow",
        "torch",
        "numpy",
    ]
    found = []
    for n in names:
        try:
            found.append(f"{n}={importlib.import_module(n).__version__}")
        except ImportError:
            found.append(f"{n}=missing")
    print("gpu_api checked against: " + ", ".join(found))
