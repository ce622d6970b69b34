"""Exact mode: LAION's original AutoKeras model, categorical lookup included.

LAION's published scores come from an AutoKeras/TensorFlow SavedModel whose first layer,
``MultiCategoryEncoding``, treats a few columns (180, 316, 413, 440, 644 of ViT-L/14; 92, 133,
312 of ViT-B/32) as categories: the float64 value is formatted with ``'%f'`` (6 decimals),
looked up in a vocabulary (index 0 = out of vocabulary) and the *index* is normalized.  In every
other column NaN becomes 0.  The torch port (NeMo Curator's, our default) drops both steps.

This module reproduces them without TensorFlow:

* :func:`read_savedmodel_vocabulary` reads the vocabularies straight out of ``saved_model.pb``
  with a small protobuf wire-format reader (they are ``Const`` string tensors feeding the lookup
  tables), and the categorical columns out of ``keras_metadata.pb``.
* :func:`load_vocabulary` finds the pinned SavedModel zip like the weights (``model_dir`` ->
  ``$NSFW_DASK_MODEL_DIR`` -> user cache -> download, SHA-256 checked), checks what it read
  against a pinned digest, and caches it as JSON in the user cache, beside a downloaded zip.
* :class:`CategoricalEncoding` turns each vocabulary string into the exact interval of float64
  values that ``'%f'`` formats to it (rounding ties and signed zero included, checked against
  Python's own formatting), so the lookup is one ``torch.searchsorted`` per batch, on CPU or GPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._atomic import atomic_write_bytes
from .exceptions import WeightsIntegrityError
from .models import KerasSpec, ModelSpec, NSFWModel, get_spec
from .weights import cache_dir, resolve_file, search_folders

__all__ = [
    "CategoricalEncoding",
    "ExactNSFWModel",
    "KerasVocabulary",
    "float_interval",
    "load_vocabulary",
    "read_savedmodel_vocabulary",
    "vocabulary_digest",
]

logger = logging.getLogger(__name__)

_CACHE_FORMAT = 1


# --------------------------------------------------------------------------------------------
# Protobuf wire format: just enough to walk SavedModel -> MetaGraphDef -> GraphDef -> NodeDef.
# --------------------------------------------------------------------------------------------

def _varint(buf: bytes, i: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[i]
        i += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, i
        shift += 7
        if shift > 70:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of every field of one message; values of type 2 are bytes."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield field, wire, value


# tensorflow/core/framework/types.proto
_DT_STRING, _DT_INT64 = 7, 9


def _tensor(buf: bytes) -> tuple[int, list[bytes] | np.ndarray | None]:
    """(dtype, strings or int64 values) of a TensorProto (only what vocabularies need)."""
    dtype, strings, content, ints = None, [], None, []
    for field, wire, value in _fields(buf):
        if field == 1:
            dtype = value
        elif field == 4:
            content = value
        elif field == 8:
            strings.append(value)
        elif field == 10:
            if wire == 2:  # packed
                j = 0
                while j < len(value):
                    v, j = _varint(value, j)
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            else:
                ints.append(value - (1 << 64) if value >= 1 << 63 else value)
    if dtype == _DT_STRING:
        return dtype, strings
    if dtype == _DT_INT64:
        return dtype, np.frombuffer(content, "<i8").copy() if content is not None else np.asarray(ints, np.int64)
    return dtype or 0, None


def _graph_nodes(saved_model_pb: bytes) -> Iterator[tuple[str, str, list[str], dict[str, bytes]]]:
    """(name, op, inputs, attrs) of every node of the first meta graph's top-level GraphDef."""
    for field, _, meta_graph in _fields(saved_model_pb):
        if field != 2:  # SavedModel.meta_graphs
            continue
        for f_mg, _, graph_def in _fields(meta_graph):
            if f_mg != 2:  # MetaGraphDef.graph_def
                continue
            for f_g, _, node in _fields(graph_def):
                if f_g != 1:  # GraphDef.node
                    continue
                name = op = ""
                inputs: list[str] = []
                attrs: dict[str, bytes] = {}
                for f_n, _, v in _fields(node):
                    if f_n == 1:
                        name = v.decode()
                    elif f_n == 2:
                        op = v.decode()
                    elif f_n == 3:
                        inputs.append(v.decode())
                    elif f_n == 5:  # map<string, AttrValue> entry
                        key, val = "", b""
                        for f_a, _, av in _fields(v):
                            if f_a == 1:
                                key = av.decode()
                            elif f_a == 2:
                                val = av
                        attrs[key] = val
                yield name, op, inputs, attrs
        return


def _const_value(attr_value: bytes) -> tuple[int, Any]:
    for field, _, v in _fields(attr_value):
        if field == 8:  # AttrValue.tensor
            return _tensor(v)
    return 0, None


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
        for _, wire, v in _fields(buf):
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


# --------------------------------------------------------------------------------------------
# Vocabularies
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KerasVocabulary:
    """The lookup tables of one SavedModel: for each categorical column, strings -> indices."""

    columns: tuple[int, ...]
    strings: tuple[tuple[str, ...], ...]
    indices: tuple[tuple[int, ...], ...]

    def to_json(self) -> dict[str, Any]:
        return {str(c): {"strings": list(s), "indices": list(i)}
                for c, s, i in zip(self.columns, self.strings, self.indices)}

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> KerasVocabulary:
        cols = sorted(obj, key=int)
        return cls(tuple(int(c) for c in cols),
                   tuple(tuple(str(s) for s in obj[c]["strings"]) for c in cols),
                   tuple(tuple(int(i) for i in obj[c]["indices"]) for c in cols))


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
        for name, op, inputs, attrs in _graph_nodes(pb):
            if op == "Const" and "value" in attrs:
                dtype, value = _const_value(attrs["value"])
                if dtype in (_DT_STRING, _DT_INT64) and value is not None:
                    consts[name] = (dtype, value)
                continue
            ins = [i.split(":")[0] for i in inputs if not i.startswith("^")]
            keys = [i for i in ins if consts.get(i, (0,))[0] == _DT_STRING and len(consts[i][1]) > 1]
            vals = [i for i in ins if consts.get(i, (0,))[0] == _DT_INT64 and len(consts[i][1]) > 1]
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
    obj = {"format": _CACHE_FORMAT, "source": keras.filename, "source_sha256": keras.sha256,
           "digest": keras.vocab_digest, "vocabulary": vocab.to_json()}
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
            zip_path = resolve_file(keras.filename, keras.url, keras.sha256, model_dir,
                                    what=f"LAION's original {spec.clip_model} SavedModel",
                                    download=download)
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


# --------------------------------------------------------------------------------------------
# '%f' strings -> intervals of floats
# --------------------------------------------------------------------------------------------

_HALF_ULP6 = Decimal("0.0000005")
_TINY = 5e-324  # smallest positive float64


def _fmt(x: float) -> str:
    return "%f" % x


def _edge(start: float, s: str, direction: float) -> float:
    """The last float from ``start`` towards ``direction`` that formats to ``s``."""
    x = start
    for _ in range(4096):
        if _fmt(x) == s:
            break
        x = math.nextafter(x, -direction)  # outside the interval: step back in
    else:  # pragma: no cover - a few ulps at most for 6-decimal strings
        raise AssertionError(f"no float formats to {s!r} near {start!r}")
    for _ in range(4096):
        nxt = math.nextafter(x, direction)
        if _fmt(nxt) != s:
            return x
        x = nxt
    raise AssertionError(f"interval of {s!r} wider than expected")  # pragma: no cover


def float_interval(s: str) -> tuple[float, float] | None:
    """The closed interval ``[lo, hi]`` of nonzero float64 values ``x`` with ``'%f' % x == s``.

    ``None`` when no float formats to ``s`` (not a canonical 6-decimal string).  Exact zeros are
    left out of every interval (``'%f'`` maps ``0.0`` to ``'0.000000'`` and ``-0.0`` to
    ``'-0.000000'``, which comparisons cannot tell apart); :class:`CategoricalEncoding` looks
    them up by sign.
    """
    try:
        d = Decimal(s)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    x = float(d)
    if _fmt(x) != s:
        return None
    if d == 0:
        if s.startswith("-"):
            return _edge(float(-_HALF_ULP6), s, -math.inf), -_TINY
        return _TINY, _edge(float(_HALF_ULP6), s, math.inf)
    lo = _edge(float(d - _HALF_ULP6), s, -math.inf)
    hi = _edge(float(d + _HALF_ULP6), s, math.inf)
    return (lo, hi) if lo <= hi else None


class CategoricalEncoding(nn.Module):
    """AutoKeras ``MultiCategoryEncoding`` for float embeddings, vectorized.

    ``forward(x)`` returns a float32 copy of ``x`` with NaN -> 0 in every column and, in the
    categorical columns, the vocabulary index of ``'%f' % float64(x)`` (0 when out of
    vocabulary, NaN and inf included).  :meth:`codes` gives the indices alone.

    Buffers (on the module's device): ``columns`` (k,), ``starts``/``ends`` (k, L) float64
    interval bounds sorted by start (padded with +inf/-inf), ``codes_table`` (k, L) float32
    indices, ``zero_codes`` (k, 2) the indices of ``'0.000000'`` and ``'-0.000000'``.
    """

    def __init__(self, vocab: KerasVocabulary, dim: int) -> None:
        super().__init__()
        k = len(vocab.columns)
        rows: list[list[tuple[float, float, int]]] = []
        zero = np.zeros((k, 2), np.float32)
        for c, (strings, indices) in enumerate(zip(vocab.strings, vocab.indices)):
            items = []
            for s, idx in zip(strings, indices):
                if s == "0.000000":
                    zero[c, 0] = idx
                elif s == "-0.000000":
                    zero[c, 1] = idx
                iv = float_interval(s)
                if iv is not None:
                    items.append((iv[0], iv[1], idx))
            items.sort()
            for a, b in zip(items, items[1:]):  # '%f' is a function: intervals cannot overlap
                if a[1] >= b[0]:
                    raise AssertionError(f"overlapping vocabulary intervals {a} and {b}")
            rows.append(items)
        width = max((len(r) for r in rows), default=0) + 1
        starts = np.full((k, width), np.inf)
        ends = np.full((k, width), -np.inf)
        codes = np.zeros((k, width), np.float32)
        for c, items in enumerate(rows):
            if items:
                arr = np.asarray(items, dtype=np.float64)
                starts[c, : len(items)], ends[c, : len(items)] = arr[:, 0], arr[:, 1]
                codes[c, : len(items)] = arr[:, 2]
        self.dim = dim
        self.column_list = list(vocab.columns)  # indexes a tensor on any device
        self.register_buffer("columns", torch.tensor(vocab.columns, dtype=torch.long))
        self.register_buffer("starts", torch.from_numpy(starts))
        self.register_buffer("ends", torch.from_numpy(ends))
        self.register_buffer("codes_table", torch.from_numpy(codes))
        self.register_buffer("zero_codes", torch.from_numpy(zero))

    def _gather_columns(self, x: torch.Tensor) -> torch.Tensor:
        """``(k, n)`` float64 copy of the categorical columns (column views, stacked: cheaper than
        advanced indexing on a row-major matrix)."""
        v = torch.stack([x[:, c] for c in self.column_list])
        return v.to(device=self.starts.device, dtype=torch.float64)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """``(n, k)`` float32 vocabulary indices of ``x``'s categorical columns (any float dtype)."""
        return self._codes_searchsorted(self._gather_columns(x))

    def _codes_searchsorted(self, v: torch.Tensor) -> torch.Tensor:
        """A binary search over the sorted intervals (``v`` is ``(k, n)``), then containment.

        (A direct-address table on ``round(x * 1e6)`` was tried: no faster on CPU, measured.)
        """
        pos = torch.searchsorted(self.starts, v, right=True).sub_(1)
        found = pos >= 0
        pos.clamp_(min=0)
        found &= v <= self.ends.gather(1, pos)
        out = torch.where(found, self.codes_table.gather(1, pos), 0.0)
        is_zero = v == 0
        zero = torch.where(torch.signbit(v), self.zero_codes[:, 1:2], self.zero_codes[:, 0:1])
        out = torch.where(is_zero, zero, out)
        return out.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nan_to_num(x.to(torch.float32), nan=0.0, posinf=math.inf, neginf=-math.inf)
        out[:, self.columns] = self.codes(x).to(out.device)
        return out


class ExactNSFWModel(nn.Module):
    """LAION's original model: :class:`CategoricalEncoding`, then the head (``exact=True``).

    ``forward`` returns ``(batch, 1)`` probabilities like :class:`~nsfw_dask.NSFWModel`.
    Shares the head's parameters; built by :func:`nsfw_dask.load_model` with ``exact=True``.
    """

    def __init__(self, head: NSFWModel, encoding: CategoricalEncoding) -> None:
        super().__init__()
        self.head = head
        self.encoding = encoding
        self.spec = head.spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoding(x))

