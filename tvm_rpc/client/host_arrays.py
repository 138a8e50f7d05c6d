"""
Host data as arrays, without numpy when need be.

L{host_array} describes host data (numpy arrays when numpy is installed, and
otherwise C{bytes}/C{bytearray}/C{memoryview}, L{array.array} and (nested)
lists of numbers with a dtype) as a
L{HostArray<tvm_rpc.protocol.values.HostArray>}: shape, dtype and raw C-order
little-endian bytes. L{unpack} turns such bytes back into nested lists of
Python numbers, so the client works without numpy.
"""

import array as _array
import math
import struct
import sys

from ..protocol.values import CodecError, HostArray, dtype_itemsize

#: struct format letters (little-endian) of the dtypes packable without numpy.
_STRUCT_FORMATS = {
    "bool": "?",
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float16": "e",
    "float32": "f",
    "float64": "d",
}

#: dtype of each array.array type code, by item size where C types vary.
_TYPECODE_KINDS = {
    "b": "int", "B": "uint", "h": "int", "H": "uint", "i": "int", "I": "uint",
    "l": "int", "L": "uint", "q": "int", "Q": "uint", "f": "float", "d": "float",
}


def _numpy():
    """@return: the numpy module, or L{None} when it is not installed."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _nested_shape(value):
    """@return: the shape of a rectangular nesting of lists/tuples of numbers."""
    shape = []
    while isinstance(value, (list, tuple)):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _flatten(value, shape, depth=0):
    """Yield the numbers of a nested list, checking it is rectangular."""
    if depth == len(shape):
        if isinstance(value, (list, tuple)):
            raise ValueError("ragged nested list: cannot make an array of it")
        yield value
        return
    if not isinstance(value, (list, tuple)) or len(value) != shape[depth]:
        raise ValueError("ragged nested list: cannot make an array of it")
    for item in value:
        yield from _flatten(item, shape, depth + 1)


def _infer_dtype(items):
    """Pick a dtype for plain Python numbers as numpy would (bool, int64, float64)."""
    if items and all(isinstance(item, bool) for item in items):
        return "bool"
    if all(isinstance(item, int) for item in items):
        return "int64"
    return "float64"


def _pack(items, dtype):
    """@return: the little-endian C-order bytes of C{items} as C{dtype}."""
    code = _STRUCT_FORMATS.get(dtype)
    if code is None:
        raise ValueError(
            f"dtype {dtype!r} needs numpy (or pass raw bytes); without numpy the client "
            f"packs {', '.join(_STRUCT_FORMATS)}"
        )
    try:
        return struct.pack(f"<{len(items)}{code}", *items)
    except struct.error as e:
        raise ValueError(f"cannot pack values as {dtype}: {e}") from None


def unpack(data, shape, dtype):
    """
    Turn C-order little-endian bytes into nested lists of Python numbers
    (no numpy needed).

    @raise ValueError: for a dtype struct cannot unpack or a size mismatch.
    """
    code = _STRUCT_FORMATS.get(dtype)
    if code is None:
        raise ValueError(f"cannot unpack dtype {dtype!r} without numpy")
    count = math.prod(shape)
    if len(data) != count * dtype_itemsize(dtype):
        raise ValueError(f"{len(data)} bytes do not hold {shape} {dtype}")
    flat = list(struct.unpack(f"<{count}{code}", data))
    for dim in reversed(shape[1:]):
        flat = [flat[start:start + dim] for start in range(0, len(flat), dim)]
    if not shape:
        return flat[0]
    return flat


def host_array(source, dtype=None, shape=None):
    """
    Describe host data as an array: shape, dtype and raw C-order
    little-endian bytes.

    @param source: a numpy array (or anything numpy turns into one, when
        numpy is installed); a L{HostArray}; C{bytes}/C{bytearray}/
        C{memoryview} (C{dtype} defaults to C{"uint8"}); an
        L{array.array}; a number or a (nested) list of numbers (C{dtype}
        defaults to numpy's choice: bool, int64 or float64).
    @param dtype: TVM's dtype string to convert to, or L{None} to keep the
        source's.
    @param shape: for flat sources (bytes, array.array), the shape to give
        the data; its size must match.
    @return: a L{HostArray}.
    @raise ValueError: when the data does not fit the dtype or shape.
    """
    numpy = _numpy()
    if isinstance(source, HostArray):
        if dtype is not None and dtype != source.dtype:
            raise ValueError(f"cannot convert a raw {source.dtype} array to {dtype}")
        return source if shape is None else HostArray(shape, source.dtype, source.data)
    if numpy is not None and isinstance(source, numpy.ndarray):
        array = source if dtype is None else source.astype(dtype, copy=False)
        if shape is not None:
            array = array.reshape(shape)
        if array.dtype.byteorder == ">" or (
            array.dtype.byteorder == "=" and sys.byteorder == "big"
        ):
            array = array.astype(array.dtype.newbyteorder("<"))
        array = numpy.ascontiguousarray(array)
        return HostArray(array.shape, str(array.dtype), array.tobytes())
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        dtype = dtype or "uint8"
        itemsize = dtype_itemsize(dtype)
        if len(data) % itemsize:
            raise ValueError(f"{len(data)} bytes are not a whole number of {dtype} items")
        return _shaped(data, dtype, shape, len(data) // itemsize)
    if isinstance(source, _array.array):
        kind = _TYPECODE_KINDS.get(source.typecode)
        if kind is None:
            raise ValueError(f"array.array type code {source.typecode!r} is not numeric")
        own = f"{kind}{source.itemsize * 8}"
        if dtype is not None and dtype != own:
            return host_array(source.tolist(), dtype, shape)
        if sys.byteorder == "big":
            source = _array.array(source.typecode, source)
            source.byteswap()
        return _shaped(source.tobytes(), own, shape, len(source))
    if numpy is not None:
        try:
            array = numpy.asarray(source, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot make an array of {type(source).__name__}: {e}") from None
        if array.dtype == object:
            raise ValueError(f"cannot make an array of {type(source).__name__}")
        return host_array(array, None, shape)
    if isinstance(source, (int, float, list, tuple)):
        nested_shape = _nested_shape(source)
        items = list(_flatten(source, nested_shape))
        for item in items:
            if not isinstance(item, (int, float)):
                raise ValueError(f"cannot make an array of {type(item).__name__}")
        dtype = dtype or _infer_dtype(items)
        data = _pack(items, dtype)
        return _shaped(data, dtype, shape or nested_shape, len(items))
    raise ValueError(f"cannot make an array of {type(source).__name__}")


def _shaped(data, dtype, shape, count):
    shape = (count,) if shape is None else tuple(shape)
    if math.prod(shape) != count:
        raise ValueError(f"{count} items do not fit shape {shape}")
    try:
        return HostArray(shape, dtype, data)
    except CodecError as e:
        raise ValueError(str(e)) from None


__all__ = ["host_array", "unpack"]
