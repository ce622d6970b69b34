"""Every use of another project's private API, in one place.

Each entry names what it touches, the CPU test in ``tests/test_compat.py`` that fails loudly when
the dependency changes, and what happens (the documented fallback) if it changes anyway.

Inventory
---------
1. **dask's meta inference** (:func:`in_dask_meta_inference`, used by ``score_nsfw``).
   ``ddf.map_partitions(f)`` without ``meta=`` calls ``f`` once, eagerly, on a fake partition,
   through ``dask.dataframe.dask_expr._expr.emulate`` (``dask.dataframe.core._emulate`` before
   dask-expr).  We recognise it by that function's name on the call stack (a private name; the
   frames come from the public :func:`inspect.currentframe`).

   Tests: ``test_emulate_still_exists`` (the name, its module, that ``map_partitions`` meta
   inference calls it) and ``test_meta_inference_detected_on_cpu`` /
   ``test_map_partitions_without_meta_loads_no_model`` (the behaviour, on CPU, no weights).

   Fallback, if dask renames or removes it: detection answers False, never True (a false True
   on a real partition would give NaN scores, so the match is exact by design), and
   ``score_nsfw`` treats dask's fake partition as data:

   * pandas partitions with an Arrow list column (``dtype_backend="pyarrow"``, and what
     ``read_embeddings`` gives): dask's fake rows are null lists, so the meta is still right and
     no model is loaded;
   * an object column of arrays, or cuDF partitions: the fake values are not embeddings
     (strings, or ``[0, 1]`` lists), so ``map_partitions`` fails at graph construction with
     dask's ``Metadata inference failed in `score_nsfw``` error around our
     ``EmbeddingColumnError`` / ``EmbeddingFormatError``.  Pass ``meta=nsfw_meta(ddf)``, or call
     ``nsfw_dask.score(ddf)``: neither depends on this detection.

   ``test_fallback_when_emulate_is_not_found`` pins this fallback.

2. **fsspec's ``AbstractFileSystem._strip_protocol``** (:func:`strip_protocol`): a path as the
   filesystem names it (``"s3://b/k/"`` -> ``"b/k"``).  fsspec documents it for implementers
   only.  Test: ``test_fsspec_strip_protocol``.  Fallback, if it is gone: fsspec's generic rule
   (the filesystem's own ``protocol://`` prefix and trailing ``/`` removed); filesystems that
   add a root marker (``memory://a`` -> ``/a``) then differ, which ``test_strip_protocol_fallback``
   shows.  (``nsfw_dask.pipeline._fs_path`` still calls ``fs._strip_protocol`` itself.)

3. **a dask collection's ``_meta``** (:func:`collection_meta`): replaced by dask's public
   ``dask.dataframe.utils.make_meta``, which returns it.  Test: ``test_collection_meta``.
   (``nsfw_dask.scoring.nsfw_meta`` still reads ``getattr(frame, "_meta", frame)`` itself.)

Dropped
-------
* numpy's private ``np.lib.format._read_array_header`` (``.npy`` format 3.0 headers):
  ``nsfw_dask.io`` reads headers with the public ``read_magic`` and
  ``read_array_header_1_0`` / ``read_array_header_2_0`` only, and says how to re-save any other
  version.  Test: ``test_npy_format_3_is_refused_with_the_fix``.
* dask-expr's ``_plan["parts"]`` (the old CLI's output file names): the CLI plans its
  partitions itself (``nsfw_dask.pipeline``); nothing reads ``_plan`` any more.

Not private, so not here: ``dask.utils.Dispatch`` (``nsfw_dask.dispatch``), Arrow's
``__arrow_array__`` protocol and ``Array.buffers()``, DLPack, cuDF's ``.list`` accessor.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["collection_meta", "in_dask_meta_inference", "strip_protocol"]

#: Names of the dask functions that run a user function on a fake partition to infer ``meta``:
#: ``dask.dataframe.dask_expr._expr.emulate`` (dask >= 2025.1) and
#: ``dask.dataframe.core._emulate`` (legacy dask.dataframe).
EMULATE_NAMES: tuple[str, ...] = ("emulate", "_emulate")


def in_dask_meta_inference() -> bool:
    """True when dask is calling us on its fake partition to infer ``meta``.

    ``map_partitions`` without ``meta=`` calls the function once, eagerly, through
    ``dask.dataframe.dask_expr._expr.emulate`` on ``meta_nonempty`` data (null Arrow lists for
    pandas, ``[[0, 1], [0, 1]]`` for cuDF): values that no real partition has.  There the output
    schema is all that matters, so ``score_nsfw`` builds it without loading the model or reading
    values.  The whole stack is searched: wrappers (``functools.partial``, lambdas, user
    functions) may sit between dask and the scorer.  False when the interpreter gives no frames
    (see the module docstring for what that means).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name in EMULATE_NAMES and str(frame.f_globals.get("__name__", "")).startswith("dask."):
                return True
            frame = frame.f_back
        return False
    finally:
        del frame  # no reference cycle through this frame


def strip_protocol(fs: Any, path: str) -> str:
    """``path`` as ``fs`` names it: without ``protocol://`` or a trailing ``/``.

    fsspec's ``fs._strip_protocol(path)``; without it, fsspec's generic rule (see the module
    docstring).
    """
    strip = getattr(fs, "_strip_protocol", None)
    if strip is not None:
        return str(strip(path))
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    for protocol in protocols:
        if path.startswith(f"{protocol}://"):
            path = path[len(protocol) + 3 :]
            break
    return path.rstrip("/") or "/"


def collection_meta(frame: Any) -> Any:
    """The empty frame describing ``frame``: a dask collection's meta, else ``frame`` itself."""
    from dask import is_dask_collection

    if is_dask_collection(frame):
        from dask.dataframe.utils import make_meta

        return make_meta(frame)
    return frame
