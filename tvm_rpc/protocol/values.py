"""The value codec of the session protocol: compact, versioned, never pickle.

L{encode} turns a value into bytes and L{decode} turns bytes back into a
value. Supported values:

  - C{None}, C{bool}, C{int} (any size up to L{MAX_INT_BYTES}), C{float},
    C{str}, C{bytes} (C{bytearray}/C{memoryview} encode as bytes), C{list},
    C{tuple}, C{dict} (keys: C{str}, C{int}, C{bool}, C{bytes});
  - L{HostArray} (a small array inline: shape, dtype, raw C-order bytes);
  - L{ArrayRef} (an array that lives on the server, by handle id);
  - L{Handle} (a remote function or module, by id);
  - L{DLDevice} (TVM's C{(device_type, index)}).

This module holds those value types, TVM's dtype and device numbering they
check against, and the encoder and decoder; the byte layer under them
(version byte, tags, varints, the reader, the fast path for small calls) is
L{tvm_rpc.protocol.value_bytes}.

Layout: one version byte (L{VERSION}) then one value. Each value is a
one-byte tag followed by its body; lengths and counts are unsigned LEB128
varints, signed integers are zigzag varints, floats are IEEE 754 doubles
(little-endian). Decoding garbage raises only L{CodecError}; nesting is
bounded by C{max_depth} and the input length by C{max_size}.
"""

import math
import re

import attrs

from .value_bytes import (
    DOUBLE,
    MISS,
    QUICK_SIZE,
    TAG_ARRAY_REF,
    TAG_BYTES,
    TAG_DEVICE,
    TAG_DICT,
    TAG_FALSE,
    TAG_FLOAT,
    TAG_HANDLE,
    TAG_HOST_ARRAY,
    TAG_INT,
    TAG_LIST,
    TAG_NONE,
    TAG_STR,
    TAG_TRUE,
    TAG_TUPLE,
    VERSION,
    CodecError,
    Reader,
    quick_decode,
    write_varint,
    zigzag,
)

#: Default nesting limit (lists, tuples, dicts inside each other).
MAX_DEPTH = 64
#: Default limit on encoded size accepted by L{decode} (1 GiB).
MAX_SIZE = 1 << 30
#: Longest integer accepted, in bytes of its varint (~30,000 decimal digits).
MAX_INT_BYTES = 16 * 1024

_DTYPE = re.compile(r"^(int|uint|float|bfloat|bool)(\d+)?(?:x(\d+))?$")
_DEFAULT_BITS = {"int": 32, "uint": 32, "float": 32, "bfloat": 16, "bool": 8}


def dtype_itemsize(dtype):
    """
    The size in bytes of one element of C{dtype}, in TVM's spelling
    (C{"float32"}, C{"int8"}, C{"uint16"}, C{"bool"}, C{"float32x4"}, ...).

    @raise CodecError: for a dtype this codec does not know.
    """
    match = _DTYPE.match(dtype) if isinstance(dtype, str) else None
    if match is None:
        raise CodecError(f"unsupported dtype {dtype!r}")
    kind, bits, lanes = match.groups()
    bits = int(bits) if bits else _DEFAULT_BITS[kind]
    lanes = int(lanes) if lanes else 1
    if kind == "bool":
        bits = 8
    if bits not in (8, 16, 32, 64) or not 1 <= lanes <= 64:
        raise CodecError(f"unsupported dtype {dtype!r}")
    return bits // 8 * lanes


def _shape(value):
    """@return: C{value} as a tuple of non-negative ints. @raise CodecError: otherwise."""
    shape = tuple(value)
    for dim in shape:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 0:
            raise CodecError(f"bad array shape {shape!r}")
    return shape


def array_nbytes(shape, dtype):
    """@return: the size in bytes of a C-order array of C{shape} and C{dtype}."""
    return math.prod(_shape(shape)) * dtype_itemsize(dtype)


def _small_number(value):
    """@return: C{value} if it is an int in 0..2**31-1. @raise CodecError: otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
        raise CodecError(f"bad device number {value!r}")
    return value


#: TVM's device type numbers (DLPack plus TVM's extensions).
DEVICE_TYPES = {
    "cpu": 1,
    "cuda": 2,
    "cuda_host": 3,
    "opencl": 4,
    "vulkan": 7,
    "metal": 8,
    "vpi": 9,
    "rocm": 10,
    "rocm_host": 11,
    "ext_dev": 12,
    "cuda_managed": 13,
    "oneapi": 14,
    "webgpu": 15,
    "hexagon": 16,
}
#: The reverse of L{DEVICE_TYPES}.
DEVICE_NAMES = {number: name for name, number in DEVICE_TYPES.items()}


@attrs.frozen
class DLDevice:
    """
    A device by TVM's numbering, as the wire carries it (DLPack's
    C{DLDevice}): C{DLDevice(1, 0)} is C{cpu(0)}. The client's user-facing
    device, bound to a session, is L{tvm_rpc.client.devices.Device}.

    @ivar device_type: TVM's device type number (see L{DEVICE_TYPES}).
    @ivar index: the device index.
    """

    device_type: int = attrs.field(converter=_small_number)
    index: int = attrs.field(default=0, converter=_small_number)

    @classmethod
    def named(cls, name, index=0):
        """
        @param name: a name of L{DEVICE_TYPES} (C{"cpu"}, C{"cuda"}, ...).
        @raise CodecError: for an unknown name.
        """
        try:
            return cls(DEVICE_TYPES[name], index)
        except KeyError:
            raise CodecError(f"unknown device name {name!r}") from None

    @property
    def name(self):
        """TVM's name of the device type, or C{"device<N>"} for an unknown one."""
        return DEVICE_NAMES.get(self.device_type, f"device{self.device_type}")

    def __str__(self):
        """@return: TVM's spelling, e.g. C{cpu(0)}."""
        return f"{self.name}({self.index})"


@attrs.frozen
class Handle:
    """
    A remote function or module: an id in the session's handle table.

    @ivar kind: C{"function"} or C{"module"}.
    @ivar id: the handle id.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(("function", "module")))
    id: int = attrs.field(converter=_small_number)


@attrs.frozen
class ArrayRef:
    """
    An array that lives on the server, by handle id, with its metadata.

    @ivar id: the handle id.
    @ivar shape: the shape (a tuple of ints).
    @ivar dtype: TVM's dtype string.
    @ivar device: the L{DLDevice} holding it.
    """

    id: int = attrs.field(converter=_small_number)
    shape: tuple = attrs.field(converter=_shape)
    dtype: str
    device: DLDevice = attrs.field(factory=lambda: DLDevice(1, 0))

    def __attrs_post_init__(self):
        """Check the dtype. @raise CodecError: for an unknown one."""
        dtype_itemsize(self.dtype)

    @property
    def nbytes(self):
        """The array's size in bytes."""
        return array_nbytes(self.shape, self.dtype)


@attrs.frozen
class HostArray:
    """
    A host array inline: shape, dtype and its raw C-order bytes.

    @raise CodecError: when the data length does not match shape and dtype.
    """

    shape: tuple = attrs.field(converter=_shape)
    dtype: str
    data: bytes = attrs.field(converter=bytes, repr=lambda data: f"<{len(data)} bytes>")

    def __attrs_post_init__(self):
        """Check the data length against shape and dtype."""
        expected = array_nbytes(self.shape, self.dtype)
        if len(self.data) != expected:
            raise CodecError(
                f"array of shape {self.shape} and dtype {self.dtype} needs "
                f"{expected} bytes, got {len(self.data)}"
            )

    @classmethod
    def from_numpy(cls, array):
        """@param array: a numpy array (made C-contiguous). @return: a L{HostArray}."""
        import numpy

        array = numpy.ascontiguousarray(array)
        return cls(array.shape, str(array.dtype), array.tobytes())

    def numpy(self):
        """@return: a numpy array holding a copy of the data (needs numpy)."""
        import numpy

        if self.dtype.startswith("bfloat") or "x" in self.dtype:
            raise CodecError(f"numpy cannot represent dtype {self.dtype!r}")
        return numpy.frombuffer(self.data, dtype=self.dtype).reshape(self.shape).copy()




def _encode_text(text, out):
    """Append C{text} as a varint length and its UTF-8 bytes."""
    raw = text.encode("utf-8")
    write_varint(len(raw), out)
    out += raw


def _encode_into(value, out, depth, max_depth):
    """Append the tag and body of C{value} to C{out}; see L{encode}."""
    if depth > max_depth:
        raise CodecError(f"value nested deeper than {max_depth}")
    kind = type(value)
    if kind is int:
        number = value << 1 if value >= 0 else ((-value) << 1) - 1
        if number < 0x4000:
            out.append(TAG_INT)
            if number < 0x80:
                out.append(number)
            else:
                out.append((number & 0x7F) | 0x80)
                out.append(number >> 7)
            return
    elif kind is list:
        out.append(TAG_LIST)
        write_varint(len(value), out)
        for item in value:
            _encode_into(item, out, depth + 1, max_depth)
        return
    if value is None:
        out.append(TAG_NONE)
    elif value is True:
        out.append(TAG_TRUE)
    elif value is False:
        out.append(TAG_FALSE)
    elif isinstance(value, int):
        out.append(TAG_INT)
        start = len(out)
        write_varint(zigzag(int(value)), out)
        if len(out) - start > MAX_INT_BYTES:
            raise CodecError("integer too large to encode")
    elif isinstance(value, float):
        out.append(TAG_FLOAT)
        out += DOUBLE.pack(value)
    elif isinstance(value, str):
        out.append(TAG_STR)
        try:
            _encode_text(value, out)
        except UnicodeEncodeError as e:
            raise CodecError(f"string is not encodable as UTF-8: {e}") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out.append(TAG_BYTES)
        write_varint(len(raw), out)
        out += raw
    elif isinstance(value, (list, tuple)):
        out.append(TAG_LIST if isinstance(value, list) else TAG_TUPLE)
        write_varint(len(value), out)
        for item in value:
            _encode_into(item, out, depth + 1, max_depth)
    elif isinstance(value, dict):
        out.append(TAG_DICT)
        write_varint(len(value), out)
        for key, item in value.items():
            if not isinstance(key, (str, int, bytes)):
                raise CodecError(f"dict keys must be str, int or bytes, not {type(key).__name__}")
            _encode_into(key, out, depth + 1, max_depth)
            _encode_into(item, out, depth + 1, max_depth)
    elif isinstance(value, Handle):
        out.append(TAG_HANDLE)
        _encode_text(value.kind, out)
        write_varint(value.id, out)
    elif isinstance(value, DLDevice):
        out.append(TAG_DEVICE)
        write_varint(value.device_type, out)
        write_varint(value.index, out)
    elif isinstance(value, ArrayRef):
        out.append(TAG_ARRAY_REF)
        write_varint(value.id, out)
        _encode_shape(value.shape, out)
        _encode_text(value.dtype, out)
        write_varint(value.device.device_type, out)
        write_varint(value.device.index, out)
    elif isinstance(value, HostArray):
        out.append(TAG_HOST_ARRAY)
        _encode_shape(value.shape, out)
        _encode_text(value.dtype, out)
        write_varint(len(value.data), out)
        out += value.data
    else:
        raise CodecError(f"cannot encode a value of type {type(value).__name__}")


def _encode_shape(shape, out):
    """Append a shape: its rank, then each dimension, as varints."""
    write_varint(len(shape), out)
    for dim in shape:
        write_varint(dim, out)


def encode(value, *, max_depth=MAX_DEPTH):
    """
    Encode a value.

    @param value: a supported value (see the module docstring).
    @param max_depth: the deepest nesting allowed.
    @return: the encoding, as L{bytes}.
    @raise CodecError: for an unsupported type, a dict key of another type,
        nesting deeper than C{max_depth} or an integer above L{MAX_INT_BYTES}.
    """
    kind = type(value)
    if kind is int:
        if -0x2000 <= value < 0x2000:
            number = value << 1 if value >= 0 else ((-value) << 1) - 1
            if number < 0x80:
                return bytes((VERSION, TAG_INT, number))
            return bytes((VERSION, TAG_INT, (number & 0x7F) | 0x80, number >> 7))
    elif kind is list and max_depth > 0 and len(value) < 0x80:
        # Small ints only (the usual call arguments); anything else below.
        out = bytearray((VERSION, TAG_LIST, len(value)))
        for item in value:
            if type(item) is not int or not -0x2000 <= item < 0x2000:
                break
            number = item << 1 if item >= 0 else ((-item) << 1) - 1
            if number < 0x80:
                out += bytes((TAG_INT, number))
            else:
                out += bytes((TAG_INT, (number & 0x7F) | 0x80, number >> 7))
        else:
            return bytes(out)
    out = bytearray([VERSION])
    try:
        _encode_into(value, out, 0, max_depth)
    except RecursionError:
        raise CodecError("value nested too deeply") from None
    return bytes(out)


def _decode_from(reader, depth, max_depth):
    """Read one value (tag and body) from C{reader}; see L{decode}."""
    if depth > max_depth:
        raise CodecError(f"value nested deeper than {max_depth}")
    tag = reader.byte()
    if tag == TAG_INT:
        number = reader.varint(MAX_INT_BYTES)
        return number >> 1 if not number & 1 else -((number + 1) >> 1)
    if tag == TAG_LIST or tag == TAG_TUPLE:
        items = [_decode_from(reader, depth + 1, max_depth) for _ in range(reader.count())]
        return items if tag == TAG_LIST else tuple(items)
    if tag == TAG_NONE:
        return None
    if tag == TAG_TRUE:
        return True
    if tag == TAG_FALSE:
        return False
    if tag == TAG_FLOAT:
        return DOUBLE.unpack(reader.take(8))[0]
    if tag == TAG_STR:
        return reader.text()
    if tag == TAG_BYTES:
        return bytes(reader.take(reader.count()))
    if tag == TAG_DICT:
        result = {}
        for _ in range(reader.count()):
            key = _decode_from(reader, depth + 1, max_depth)
            if not isinstance(key, (str, int, bytes)):
                raise CodecError(f"bad dict key of type {type(key).__name__}")
            result[key] = _decode_from(reader, depth + 1, max_depth)
        return result
    if tag == TAG_HANDLE:
        kind = reader.text()
        if kind not in ("function", "module"):
            raise CodecError(f"unknown handle kind {kind!r}")
        return Handle(kind, reader.small())
    if tag == TAG_DEVICE:
        return DLDevice(reader.small(), reader.small())
    if tag == TAG_ARRAY_REF:
        handle = reader.small()
        shape = reader.shape()
        dtype = reader.text()
        device = DLDevice(reader.small(), reader.small())
        return ArrayRef(handle, shape, dtype, device)
    if tag == TAG_HOST_ARRAY:
        shape = reader.shape()
        dtype = reader.text()
        # Checked before taking the data, so a bogus shape cannot allocate.
        expected = array_nbytes(shape, dtype)
        length = reader.count()
        if length != expected:
            raise CodecError(f"host array data is {length} bytes, expected {expected}")
        return HostArray(shape, dtype, bytes(reader.take(length)))
    raise CodecError(f"unknown value tag {bytes([tag])!r}")



def decode(data, *, max_depth=MAX_DEPTH, max_size=MAX_SIZE):
    """
    Decode one value.

    @param data: the encoding (bytes-like).
    @param max_depth: the deepest nesting accepted.
    @param max_size: the longest input accepted.
    @return: the value.
    @raise CodecError: for anything that is not a complete, valid encoding
        of this version (and for nothing else).
    """
    if type(data) is bytes:
        if len(data) <= QUICK_SIZE and max_depth > 0 and len(data) <= max_size:
            value = quick_decode(data)
            if value is not MISS:
                return value
        view = data
    else:
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise CodecError(f"cannot decode a {type(data).__name__}") from None
    if len(view) > max_size:
        raise CodecError(f"encoded value of {len(view)} bytes exceeds {max_size}")
    reader = Reader(view)
    version = reader.byte()
    if version != VERSION:
        raise CodecError(f"unsupported value encoding version {version}")
    try:
        value = _decode_from(reader, 0, max_depth)
    except RecursionError:
        raise CodecError("value nested too deeply") from None
    if reader.position != len(view):
        raise CodecError(f"{len(view) - reader.position} bytes of trailing garbage")
    return value

