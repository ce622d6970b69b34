"""LAION's AutoKeras vocabularies: read out of the SavedModel zip, verified, cached.

Exact mode (:mod:`nsfw_dask.exact`) needs the lookup tables of the SavedModel's
``MultiCategoryEncoding`` layer: for each categorical column, the ``'%f'`` strings and their
indices.

* :func:`read_savedmodel_vocabulary` reads them straight out of ``saved_model.pb`` with a small
  protobuf wire-format reader (:mod:`nsfw_dask._protobuf`; they are ``Const`` string tensors
  feeding the lookup tables), and the categorical columns out of ``keras_metadata.pb``.
* :func:`load_vocabulary` finds the pinned SavedModel zip like the weights (``model_dir`` ->
  ``$NSFW_DASK_MODEL_DIR`` -> user cache -> download, SHA-256 checked), checks what it read
  against the digest pinned in :data:`nsfw_dask.models.MODEL_SPECS` (``nsfw_dask._specs``), and caches it as JSON
  (``<zip name>.vocab.json``) in the user cache, beside a downloaded zip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._atomic import atomic_write_bytes
from ._protobuf import DT_INT64, DT_STRING, const_value, fields, graph_nodes
from ._specs import KerasSpec, ModelSpec, get_spec
from .exceptions import WeightsIntegrityError
from .weights import cache_dir, resolve_file, search_folders

__all__ = [
    "KerasVocabulary",
    "clear_vocabulary_cache",
    "load_vocabulary",
    "read_savedmodel_vocabulary",
    "vocabulary_digest",
    "write_vocabulary_cache",
]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


def _encoding_columns(metadata_pb: bytes) -> tuple[int, ...] | None:
    """Columns of the MultiCategoryEncoding layer, from the JSON configs in keras_metadata.pb."""
    found: list[tuple[int, ...]] = []

    def walk(obj: Any) -> None:
        if isinstance(obj, dict):
            if str(obj.get("class_name", "")).endswith("MultiCategoryEncoding"):
                enc = obj.get("config", {}).get("encoding")
                if isinstance(enc, list):
                    found.append(tuple(i for i, e in enumerate(enc) if e != "none"))
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    def scan(buf: bytes, depth: int) -> None:
        for _, wire, v in fields(buf):
            if wire != 2:
                continue
            if v[:1] == b"{":
                try:
                    walk(json.loads(v))
                    continue
                except ValueError:
                    pass
            if depth < 2:
                try:
                    scan(v, depth + 1)
                except ValueError:
                    pass

    scan(metadata_pb, 0)
    if not found or len(set(found)) != 1:
        return None
    return found[0]


@dataclass(frozen=True)
class KerasVocabulary:
    """The lookup tables of one SavedModel: for each categorical column, strings -> indices."""

    columns: tuple[int, ...]
    strings: tuple[tuple[str, ...], ...]
    indices: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            str(c): {"strings": list(s), "indices": list(i)}
            for c, s, i in zip(self.columns, self.strings, self.indices)
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KerasVocabulary:
        cols = sorted(obj, key=int)
        return cls(
            tuple(int(c) for c in cols),
            tuple(tuple(str(s) for s in obj[c]["strings"]) for c in cols),
            tuple(tuple(int(i) for i in obj[c]["indices"]) for c in cols),
        )


def vocabulary_digest(vocab: KerasVocabulary) -> str:
    """Hex SHA-256 of the columns, strings and indices (a canonical JSON form)."""
    text = json.dumps(vocab.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_savedmodel_vocabulary(path: str | os.PathLike[str]) -> KerasVocabulary:
    """Read the categorical vocabularies out of one of LAION's AutoKeras SavedModel zips.

    No TensorFlow: ``saved_model.pb`` is walked with a protobuf wire-format reader.  Each lookup
    table is initialized from a string ``Const`` (the keys) and an int64 ``Const`` (the indices)
    that feed one node together; tables are taken in graph order and matched, in column order,
    with the MultiCategoryEncoding columns named in ``keras_metadata.pb``.

    Raises
    ------
    WeightsIntegrityError
        The file is not a zip, or not a SavedModel with the expected structure.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            pb_name = next(n for n in names if n.endswith("saved_model.pb"))
            meta_name = next(n for n in names if n.endswith("keras_metadata.pb"))
            pb, meta = zf.read(pb_name), zf.read(meta_name)
    except (zipfile.BadZipFile, StopIteration, OSError, KeyError) as e:
        raise WeightsIntegrityError(
            f"{path} is not an AutoKeras SavedModel zip (saved_model.pb and keras_metadata.pb): {e!r}"
        ) from e
    try:
        columns = _encoding_columns(meta)
        consts: dict[str, tuple[int, Any]] = {}
        tables: list[tuple[str, str]] = []
        for name, op, inputs, attrs in graph_nodes(pb):
            if op == "Const" and "value" in attrs:
                dtype, value = const_value(attrs["value"])
                if dtype in (DT_STRING, DT_INT64) and value is not None:
                    consts[name] = (dtype, value)
                continue
            ins = [i.split(":")[0] for i in inputs if not i.startswith("^")]
            keys = [i for i in ins if consts.get(i, (0,))[0] == DT_STRING and len(consts[i][1]) > 1]
            vals = [i for i in ins if consts.get(i, (0,))[0] == DT_INT64 and len(consts[i][1]) > 1]
            if len(keys) == 1 and len(vals) == 1 and len(consts[keys[0]][1]) == len(consts[vals[0]][1]):
                if (keys[0], vals[0]) not in tables:
                    tables.append((keys[0], vals[0]))
    except (ValueError, UnicodeDecodeError) as e:
        raise WeightsIntegrityError(f"{path}: saved_model.pb could not be read ({e})") from e
    if columns is None or len(columns) != len(tables):
        raise WeightsIntegrityError(
            f"{path}: found {len(tables)} lookup tables for categorical columns {columns}; "
            "this is not one of LAION's AutoKeras NSFW SavedModels."
        )
    strings = tuple(tuple(s.decode("utf-8") for s in consts[k][1]) for k, _ in tables)
    indices = tuple(tuple(int(i) for i in consts[v][1]) for _, v in tables)
    return KerasVocabulary(tuple(columns), strings, indices)


_vocab_lock = threading.Lock()
_vocab_cache: dict[tuple[Any, ...], KerasVocabulary] = {}


def _cache_name(keras: KerasSpec) -> str:
    return keras.filename.rsplit(".", 1)[0] + ".vocab.json"


def _read_cached(path: Path, keras: KerasSpec) -> KerasVocabulary | None:
    try:
        obj = json.loads(path.read_text())
        if obj.get("format") != _CACHE_FORMAT or obj.get("source_sha256") != keras.sha256:
            return None
        vocab = KerasVocabulary.from_json(obj["vocabulary"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        logger.warning("Ignoring unreadable vocabulary cache %s: %s", path, e)
        return None
    if vocabulary_digest(vocab) != keras.vocab_digest:
        logger.warning("Ignoring vocabulary cache %s: its content does not match the pinned digest", path)
        return None
    return vocab


def write_vocabulary_cache(vocab: KerasVocabulary, keras: KerasSpec, folders: list[Path]) -> Path | None:
    """Write ``vocab`` as ``<zip name>.vocab.json`` into the first writable of ``folders``."""
    obj = {
        "format": _CACHE_FORMAT,
        "source": keras.filename,
        "source_sha256": keras.sha256,
        "digest": keras.vocab_digest,
        "vocabulary": vocab.to_json(),
    }
    data = json.dumps(obj, separators=(",", ":")).encode()
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            return atomic_write_bytes(folder / _cache_name(keras), data)  # readable by other users' workers
        except OSError as e:
            logger.debug("could not cache the vocabulary in %s: %s", folder, e)
    return None


def load_vocabulary(
    model: str | ModelSpec = "vit-l-14",
    model_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool | None = None,
) -> KerasVocabulary:
    """The verified vocabularies of ``model``'s original SavedModel (cached per process).

    A cached ``<zip name>.vocab.json`` is looked for in ``model_dir``, ``$NSFW_DASK_MODEL_DIR``
    and the user cache, and used if its content matches the pinned digest.  Otherwise the
    SavedModel zip is resolved like the weights (``model_dir`` -> ``$NSFW_DASK_MODEL_DIR`` -> the
    user cache -> a download; pinned SHA-256), read, checked against the pinned digest, and
    cached in the user cache, beside a downloaded zip (``nsfw-dask fetch-weights --exact DIR``
    also writes it into DIR).
    """
    spec = get_spec(model)
    keras = spec.keras
    if keras is None:  # pragma: no cover - every shipped head has one
        raise ValueError(f"Model {spec.name!r} has no original SavedModel to reproduce")
    folders = search_folders(model_dir) + [cache_dir().resolve()]
    key = (spec.name, tuple(str(f) for f in folders))
    with _vocab_lock:
        vocab = _vocab_cache.get(key)
        if vocab is not None:
            return vocab
        for folder in folders:
            cached = folder / _cache_name(keras)
            if cached.is_file():
                vocab = _read_cached(cached, keras)
                if vocab is not None:
                    break
        if vocab is None:
            zip_path = resolve_file(
                keras.filename,
                keras.url,
                keras.sha256,
                model_dir,
                what=f"LAION's original {spec.clip_model} SavedModel",
                download=download,
            )
            vocab = read_savedmodel_vocabulary(zip_path)
            if vocab.columns != keras.columns or vocabulary_digest(vocab) != keras.vocab_digest:
                raise WeightsIntegrityError(
                    f"The vocabularies read from {zip_path} (columns {vocab.columns}, digest "
                    f"{vocabulary_digest(vocab)}) are not the pinned ones (columns {keras.columns}, "
                    f"digest {keras.vocab_digest}); exact mode cannot be used with this file."
                )
            # Into the user cache (beside the downloaded zip), never into a model_dir given to us:
            # that may be a shared read-only copy (and root would write there regardless).
            where = write_vocabulary_cache(vocab, keras, [cache_dir().resolve()])
            logger.info("read %d vocabularies from %s, cached in %s", len(vocab.columns), zip_path, where)
        _vocab_cache[key] = vocab
        return vocab


def clear_vocabulary_cache() -> None:
    with _vocab_lock:
        _vocab_cache.clear()
