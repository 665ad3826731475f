"""Read an ONNX file's graph without the `onnx` package: a small protobuf decoder.

The torch runtime (torch_onnx.py) needs the nodes, their attributes and the weights of
yolox_l.onnx and dw-ll_ucoco_384.onnx, nothing more. Reading them here keeps `onnx` (and
the protobuf version it pins, a frequent conflict in ComfyUI environments) out of the
user's install. Only the fields of ModelProto that describe a computation are decoded;
everything else is skipped by wire type, so files from any exporter read the same way.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InvalidCheckpointError

# TensorProto.DataType -> numpy dtype (the types a DWPose graph can hold)
NUMPY_TYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 4: np.dtype(np.uint16),
    5: np.dtype(np.int16), 6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_),
    10: np.dtype(np.float16), 11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}  # fmt: skip
BFLOAT16 = 16


class _Truncated(Exception):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data):
            raise _Truncated
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise _Truncated


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(data: memoryview) -> list[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: an int for varints and fixed
    widths (raw bits), a memoryview for length-delimited fields."""
    out, pos = [], 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            if pos + 8 > len(data):
                raise _Truncated
            value, pos = int.from_bytes(data[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise _Truncated
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            if pos + 4 > len(data):
                raise _Truncated
            value, pos = int.from_bytes(data[pos : pos + 4], "little"), pos + 4
        else:  # groups (3, 4) do not occur in ONNX
            raise _Truncated
        out.append((number, wire, value))
    return out


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated int64 field's values, packed (wire 2) or not."""
    if wire != 2:
        return [_signed(value)]
    values, pos, data = [], 0, value
    while pos < len(data):
        item, pos = _varint(data, pos)
        values.append(_signed(item))
    return values


def _floats(wire: int, value: Any) -> list[float]:
    if wire == 2:
        return list(struct.unpack(f"<{len(value) // 4}f", value))
    return [struct.unpack("<f", value.to_bytes(4, "little"))[0]]


def _text(value: Any) -> str:
    return bytes(value).decode("utf-8")


@dataclass
class Node:
    op_type: str
    inputs: list[str]
    outputs: list[str]
    attributes: dict[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""


@dataclass
class ValueInfo:
    name: str
    shape: list[int | str]  # dim_value, or dim_param (a name) for a dynamic axis


@dataclass
class Graph:
    nodes: list[Node]
    initializers: dict[str, np.ndarray]
    inputs: list[ValueInfo]  # graph inputs that are not initializers
    outputs: list[ValueInfo]
    opset: int  # the default domain's version


def _tensor(data: memoryview, directory: Path | None) -> tuple[str, np.ndarray]:
    dims: list[int] = []
    data_type, name, raw = 1, "", None
    typed: dict[int, list] = {}
    external: dict[str, str] = {}
    for number, wire, value in _fields(data):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            data_type = value
        elif number == 8:
            name = _text(value)
        elif number == 9:
            raw = bytes(value)
        elif number == 4:
            typed.setdefault(4, []).extend(_floats(wire, value))
        elif number in (5, 7, 11):
            typed.setdefault(number, []).extend(_ints(wire, value))
        elif number == 10:
            typed.setdefault(10, []).extend(
                struct.unpack(f"<{len(value) // 8}d", value) if wire == 2 else [struct.unpack("<d", value.to_bytes(8, "little"))[0]]
            )  # fmt: skip
        elif number == 13:
            entry = {n: _text(v) for n, _, v in _fields(value)}
            external[entry.get(1, "")] = entry.get(2, "")
        elif number == 6:
            raise InvalidCheckpointError(f"tensor {name or '?'} holds strings, which no DWPose network uses")
    if data_type == BFLOAT16:
        dtype = np.dtype(np.uint16)
    elif data_type in NUMPY_TYPES:
        dtype = NUMPY_TYPES[data_type]
    else:
        raise InvalidCheckpointError(f"tensor {name or '?'} has ONNX data type {data_type}, which is not supported")
    if any(d < 0 for d in dims):
        raise InvalidCheckpointError(f"tensor {name or '?'} has a negative dimension: {dims}")
    count = int(np.prod(dims, dtype=object)) if dims else 1
    if external:
        raw = _external(name, external, directory, count * dtype.itemsize)
    if raw is not None:
        array = np.frombuffer(raw, dtype=dtype.newbyteorder("<"), count=count).astype(dtype)
    elif 4 in typed:
        array = np.asarray(typed[4], dtype=np.float32)
    elif 10 in typed:
        array = np.asarray(typed[10], dtype=np.float64)
    elif 7 in typed:
        array = np.asarray(typed[7], dtype=np.int64)
    elif 11 in typed:
        array = np.asarray([v & 0xFFFFFFFFFFFFFFFF for v in typed[11]], dtype=np.uint64)
    elif 5 in typed:  # int32_data also carries int8/16, uint8/16, bool and float16 bits
        bits = np.asarray(typed[5], dtype=np.int64)
        array = bits.astype(np.uint16).view(np.float16) if dtype == np.float16 else bits.astype(dtype)
    elif count == 0:
        array = np.zeros(0, dtype=dtype)
    else:
        raise InvalidCheckpointError(f"tensor {name or '?'} of shape {dims} holds no values")
    if array.size != count:
        raise InvalidCheckpointError(f"tensor {name or '?'} holds {array.size} values for shape {dims}")
    array = array.reshape(dims)
    if data_type == BFLOAT16:  # widen bfloat16 bits to float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return name, array


def _external(name: str, entry: dict[str, str], directory: Path | None, size: int) -> bytes:
    location = entry.get("location", "")
    if directory is None or not location:
        raise InvalidCheckpointError(f"tensor {name} is stored in an external file that cannot be located")
    path = (directory / location).resolve()
    if directory.resolve() not in path.parents:
        raise InvalidCheckpointError(f"tensor {name} points outside the model's folder: {location}")
    offset = int(entry.get("offset", 0))
    length = int(entry.get("length", size))
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            raw = handle.read(length)
    except OSError as exc:
        raise InvalidCheckpointError(f"tensor {name}: its external data file {path} cannot be read: {exc}") from exc
    if len(raw) != size:
        raise InvalidCheckpointError(f"tensor {name}: {path} holds {len(raw)} bytes at {offset}, expected {size}")
    return raw


def _attribute(data: memoryview, directory: Path | None) -> tuple[str, Any]:
    name, kind = "", 0
    values: dict[int, list] = {}
    for number, wire, value in _fields(data):
        if number == 1:
            name = _text(value)
        elif number == 20:
            kind = value
        elif number == 2:
            values[2] = _floats(wire, value)
        elif number == 3:
            values[3] = _ints(wire, value)
        elif number == 4:
            values[4] = [bytes(value)]
        elif number == 5:
            values[5] = [_tensor(value, directory)[1]]
        elif number == 7:
            values.setdefault(7, []).extend(_floats(wire, value))
        elif number == 8:
            values.setdefault(8, []).extend(_ints(wire, value))
        elif number == 9:
            values.setdefault(9, []).append(bytes(value))
        elif number in (6, 10, 11):
            raise InvalidCheckpointError(f"attribute {name or '?'} holds sub-graphs or tensor lists, not supported")
    # AttributeProto.AttributeType: FLOAT 1, INT 2, STRING 3, TENSOR 4, FLOATS 6, INTS 7, STRINGS 8
    singles = {1: 2, 2: 3, 3: 4, 4: 5}
    if kind in singles:
        found = values.get(singles[kind])
        return name, found[0] if found else None
    if kind in (6, 7, 8):
        return name, values.get({6: 7, 7: 8, 8: 9}[kind], [])
    raise InvalidCheckpointError(f"attribute {name or '?'} has type {kind}, which is not supported")


def _node(data: memoryview, directory: Path | None) -> Node:
    node = Node("", [], [])
    for number, _, value in _fields(data):
        if number == 1:
            node.inputs.append(_text(value))
        elif number == 2:
            node.outputs.append(_text(value))
        elif number == 3:
            node.name = _text(value)
        elif number == 4:
            node.op_type = _text(value)
        elif number == 7:
            node.domain = _text(value)
        elif number == 5:
            key, attr = _attribute(value, directory)
            node.attributes[key] = attr
    return node


def _value_info(data: memoryview) -> ValueInfo:
    name, shape = "", []
    for number, _, value in _fields(data):
        if number == 1:
            name = _text(value)
        elif number == 2:  # TypeProto.tensor_type (1) -> shape (2) -> dim (1)
            for n_type, _, tensor_type in _fields(value):
                if n_type != 1:
                    continue
                for n_shape, _, shape_proto in _fields(tensor_type):
                    if n_shape != 2:
                        continue
                    for n_dim, _, dim in _fields(shape_proto):
                        if n_dim != 1:
                            continue
                        entry: int | str = "?"
                        for n, _, v in _fields(dim):
                            entry = _signed(v) if n == 1 else _text(v) if n == 2 else entry
                        shape.append(entry)
    return ValueInfo(name, shape)


def read_graph(path: str | Path) -> Graph:
    """The computation of an ONNX model file: nodes in file order, initializers as numpy
    arrays, the real inputs (initializers excluded), the outputs and the default opset.
    A file that is not an ONNX model raises InvalidCheckpointError."""
    path = Path(path)
    try:
        data = memoryview(path.read_bytes())
    except OSError as exc:
        raise InvalidCheckpointError(f"{path} cannot be read: {exc}") from exc
    try:
        return _graph(data, path.parent)
    except _Truncated:
        raise InvalidCheckpointError(f"{path} is not an ONNX model (its protobuf data is cut short or corrupt)") from None
    except (UnicodeDecodeError, ValueError, struct.error) as exc:
        if isinstance(exc, InvalidCheckpointError):
            raise InvalidCheckpointError(f"{path}: {exc}") from None
        raise InvalidCheckpointError(f"{path} is not an ONNX model ({exc})") from None


def _graph(data: memoryview, directory: Path) -> Graph:
    graph_data, opset = None, None
    for number, wire, value in _fields(data):
        if number == 7 and wire == 2:
            graph_data = value
        elif number == 8 and wire == 2:
            entry = dict((n, v) for n, _, v in _fields(value))
            if not _text(entry.get(1, b"")) or _text(entry.get(1, b"")) == "ai.onnx":
                opset = _signed(entry.get(2, 0))
    if graph_data is None or opset is None:
        raise InvalidCheckpointError("no graph or no opset of the default domain: not an ONNX model")
    nodes, initializers, inputs, outputs = [], {}, [], []
    for number, wire, value in _fields(graph_data):
        if wire != 2:
            continue
        if number == 1:
            nodes.append(_node(value, directory))
        elif number == 5:
            name, array = _tensor(value, directory)
            initializers[name] = array
        elif number == 11:
            inputs.append(_value_info(value))
        elif number == 12:
            outputs.append(_value_info(value))
        elif number == 15:
            raise InvalidCheckpointError("sparse initializers are not supported")
    inputs = [info for info in inputs if info.name not in initializers]
    if not nodes or not outputs:
        raise InvalidCheckpointError("the graph has no nodes or no outputs: not an ONNX model")
    return Graph(nodes, initializers, inputs, outputs, opset)
