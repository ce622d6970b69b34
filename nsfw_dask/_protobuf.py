"""A protobuf wire-format reader: just enough to walk SavedModel -> MetaGraphDef -> GraphDef -> NodeDef.

No ``protobuf`` or TensorFlow dependency: :func:`fields` splits one message into its fields,
and the walkers below know the few field numbers of TensorFlow's ``saved_model.proto``,
``graph.proto``, ``node_def.proto``, ``attr_value.proto`` and ``tensor.proto`` that
:mod:`nsfw_dask.vocabulary` needs to pull the lookup tables' ``Const`` tensors out of
``saved_model.pb``.  Malformed input is a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["DT_INT64", "DT_STRING", "const_value", "fields", "graph_nodes", "tensor_value", "varint"]

# tensorflow/core/framework/types.proto
DT_STRING, DT_INT64 = 7, 9


def varint(buf: bytes, i: int) -> tuple[int, int]:
    """(value, next index) of the base-128 varint at ``buf[i]``."""
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


def fields(buf: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of every field of one message; values of type 2 are bytes."""
    i, n = 0, len(buf)
    value: int | bytes
    while i < n:
        key, i = varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            length, i = varint(buf, i)
            value, i = buf[i : i + length], i + length
        elif wire == 5:
            value, i = buf[i : i + 4], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > n:
            raise ValueError("truncated protobuf message")
        yield field, wire, value


def tensor_value(buf: bytes) -> tuple[int, list[bytes] | np.ndarray | None]:
    """(dtype, strings or int64 values) of a TensorProto (only what vocabularies need)."""
    dtype, strings, content, ints = None, [], None, []
    for field, wire, value in fields(buf):
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
                    v, j = varint(value, j)
                    ints.append(v - (1 << 64) if v >= 1 << 63 else v)
            else:
                ints.append(value - (1 << 64) if value >= 1 << 63 else value)
    if dtype == DT_STRING:
        return dtype, strings
    if dtype == DT_INT64:
        return dtype, np.frombuffer(content, "<i8").copy() if content is not None else np.asarray(ints, np.int64)
    return dtype or 0, None


def graph_nodes(saved_model_pb: bytes) -> Iterator[tuple[str, str, list[str], dict[str, bytes]]]:
    """(name, op, inputs, attrs) of every node of the first meta graph's top-level GraphDef."""
    for field, _, meta_graph in fields(saved_model_pb):
        if field != 2:  # SavedModel.meta_graphs
            continue
        for f_mg, _, graph_def in fields(meta_graph):
            if f_mg != 2:  # MetaGraphDef.graph_def
                continue
            for f_g, _, node in fields(graph_def):
                if f_g != 1:  # GraphDef.node
                    continue
                name = op = ""
                inputs: list[str] = []
                attrs: dict[str, bytes] = {}
                for f_n, _, v in fields(node):
                    if f_n == 1:
                        name = v.decode()
                    elif f_n == 2:
                        op = v.decode()
                    elif f_n == 3:
                        inputs.append(v.decode())
                    elif f_n == 5:  # map<string, AttrValue> entry
                        key, val = "", b""
                        for f_a, _, av in fields(v):
                            if f_a == 1:
                                key = av.decode()
                            elif f_a == 2:
                                val = av
                        attrs[key] = val
                yield name, op, inputs, attrs
        return


def const_value(attr_value: bytes) -> tuple[int, Any]:
    """(dtype, value) of the tensor held by an AttrValue (a ``Const`` node's ``value``)."""
    for field, _, v in fields(attr_value):
        if field == 8:  # AttrValue.tensor
            return tensor_value(v)
    return 0, None
