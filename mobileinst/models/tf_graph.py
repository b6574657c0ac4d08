"""The constant tensors of a frozen TensorFlow graph (`GraphDef`, a `.pb` file), read without
TensorFlow: the protobuf wire format is decoded by hand for the few fields that hold them.

A frozen graph stores every trained variable as a `Const` node whose `value` attribute is a
`TensorProto`. The field numbers are those of TensorFlow's own schemas
(tensorflow/core/framework/{graph,node_def,attr_value,tensor,tensor_shape,types}.proto):

    GraphDef     1: node (NodeDef, repeated)
    NodeDef      1: name, 2: op, 5: attr (map<string, AttrValue>: entry 1 key, 2 value)
    AttrValue    8: tensor (TensorProto)
    TensorProto  1: dtype (enum), 2: tensor_shape, 4: tensor_content (raw little-endian bytes),
                 5: float_val (packed or not), 7: int_val
    TensorShape  2: dim (repeated), Dim 1: size

Only float32 and int32 constants are returned (trained weights are float32); a constant given by a
single `float_val` is broadcast to its shape, as TensorFlow does.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

DT_FLOAT, DT_INT32 = 1, 3
_NUMPY = {DT_FLOAT: np.float32, DT_INT32: np.int32}


class _Truncated(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """The base-128 varint at buf[i:] -> (value, next index)."""
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Truncated("a varint runs past the end")
        b = buf[i]
        value |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if b < 0x80:
            return value, i


def fields(buf: bytes) -> list[tuple[int, int, bytes | int]]:
    """One message's top-level fields, in order: (field number, wire type, value); the value is an
    int for varints and fixed-width fields, bytes for length-delimited ones."""
    out, i = [], 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise _Truncated("a field runs past the end")
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise _Truncated(f"wire type {wire} is not one of a GraphDef's")
        if i > len(buf):
            raise _Truncated("a field runs past the end")
        out.append((number, wire, value))
    return out


def _shape(buf: bytes) -> tuple[int, ...]:
    dims = []
    for number, _, dim in fields(buf):
        if number == 2:
            sizes = [v for n, _, v in fields(dim) if n == 1]
            dims.append(sizes[0] if sizes else 0)
    return tuple(dims)


def _values(number: int, wire: int, value: bytes | int, dtype: int) -> list:
    """The values of one repeated float_val / int_val field, packed (bytes) or not (one int)."""
    if dtype == DT_FLOAT:
        if wire == 2:
            return list(struct.unpack(f"<{len(value) // 4}f", value))
        return [struct.unpack("<f", int(value).to_bytes(4, "little"))[0]]
    if wire == 2:
        out, i = [], 0
        while i < len(value):
            v, i = _varint(value, i)
            out.append(v - (1 << 64) if v >= 1 << 63 else v)
        return out
    return [value - (1 << 64) if value >= 1 << 63 else value]


def tensor(buf: bytes) -> np.ndarray | None:
    """A TensorProto -> an array (float32 / int32), or None for other dtypes."""
    dtype, shape, content, vals = 0, (), None, []
    for number, wire, value in fields(buf):
        if number == 1:
            dtype = value
        elif number == 2:
            shape = _shape(value)
        elif number == 4:
            content = value
        elif number in (5, 7):
            vals.append((number, wire, value))
    if dtype not in _NUMPY:
        return None
    np_type = _NUMPY[dtype]
    count = int(np.prod(shape)) if shape else 1
    if content is not None:
        arr = np.frombuffer(content, dtype=np.dtype(np_type).newbyteorder("<")).astype(np_type)
    else:
        flat = [x for number, wire, value in vals for x in _values(number, wire, value, dtype)]
        arr = np.array(flat, dtype=np_type)
        if arr.size == 1 and count > 1:  # one value stands for all (TensorFlow's rule)
            arr = np.full(count, arr[0], dtype=np_type)
    if arr.size != count:
        raise _Truncated(f"a tensor holds {arr.size} values for shape {shape}")
    return arr.reshape(shape)


def read_constants(path: str | Path, prefix: str = "") -> dict[str, np.ndarray]:
    """Every float32 / int32 `Const` node of the frozen graph at `path` whose name starts with
    `prefix` -> {node name: array}. Raises CheckpointError with one line when the file is not a
    readable GraphDef."""
    path = Path(path)
    try:
        buf = path.read_bytes()
        out: dict[str, np.ndarray] = {}
        for number, wire, node in fields(buf):
            if number != 1 or wire != 2:
                continue
            name, op, value = "", "", None
            for n, w, v in fields(node):
                if n == 1:
                    name = v.decode("utf-8", "replace")
                elif n == 2:
                    op = v.decode("utf-8", "replace")
                elif n == 5 and w == 2:
                    entry = dict((k, val) for k, _, val in fields(v))
                    if entry.get(1) == b"value" and 2 in entry:
                        value = entry[2]
            if op != "Const" or value is None or not name.startswith(prefix):
                continue
            attr = [v for n, w, v in fields(value) if n == 8 and w == 2]
            arr = tensor(attr[0]) if attr else None
            if arr is not None:
                out[name] = arr
        return out
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it: {e.strerror or e}") from None
    except (_Truncated, UnicodeError, struct.error, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable TensorFlow frozen graph (GraphDef): {e}") from None
