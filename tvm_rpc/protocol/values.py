"""The value codec of the session protocol: compact, versioned, never pickle.

:func:`encode` turns a value into bytes and :func:`decode` turns bytes back
into a value. Supported values:

- ``None``, ``bool``, ``int`` (any size up to :data:`MAX_INT_BYTES`),
  ``float``, ``str``, ``bytes`` (``bytearray``/``memoryview`` encode as
  bytes), ``list``, ``tuple``, ``dict`` (keys: ``str``, ``int``, ``bool``, ``bytes``);
- :class:`HostArray` (a small array inline: shape, dtype, raw C-order bytes);
- :class:`ArrayRef` (an array that lives on the server, by handle id);
- :class:`Handle` (a remote function or module, by id);
- :class:`DLDevice` (TVM's ``(device_type, index)``).

Layout: one version byte (:data:`VERSION`) then one value. Each value is a
one-byte tag followed by its body; lengths and counts are unsigned LEB128
varints, signed integers are zigzag varints, floats are IEEE 754 doubles
(little-endian). Decoding garbage raises only :class:`CodecError`; nesting is
bounded by ``max_depth`` and the input length by ``max_size``.
"""

import math
import re
import struct

import attrs

#: The first byte of every encoded value.
VERSION = 1
#: Default nesting limit (lists, tuples, dicts inside each other).
MAX_DEPTH = 64
#: Default limit on encoded size accepted by :func:`decode` (1 GiB).
MAX_SIZE = 1 << 30
#: Longest integer accepted, in bytes of its varint (~30,000 decimal digits).
MAX_INT_BYTES = 16 * 1024

_DOUBLE = struct.Struct("<d")


class CodecError(ValueError):
    """A value that cannot be encoded, or bytes that are not a valid encoding."""


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
#: The reverse of :data:`DEVICE_TYPES`.
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


_NONE, _TRUE, _FALSE = b"N", b"T", b"F"
_INT, _FLOAT, _STR, _BYTES = b"i", b"f", b"s", b"b"
_LIST, _TUPLE, _DICT = b"l", b"u", b"d"
_HANDLE, _ARRAY_REF, _HOST_ARRAY, _DEVICE = b"H", b"A", b"h", b"D"


def _varint(number, out):
    """Append C{number} (non-negative) to C{out} as an unsigned LEB128 varint."""
    while True:
        low = number & 0x7F
        number >>= 7
        if number:
            out.append(low | 0x80)
        else:
            out.append(low)
            return


def _zigzag(number):
    """@return: C{number} mapped to a non-negative int (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...)."""
    return number << 1 if number >= 0 else ((-number) << 1) - 1


def _encode_text(text, out):
    """Append C{text} as a varint length and its UTF-8 bytes."""
    raw = text.encode("utf-8")
    _varint(len(raw), out)
    out += raw


def _encode_into(value, out, depth, max_depth):
    """Append the tag and body of C{value} to C{out}; see L{encode}."""
    if depth > max_depth:
        raise CodecError(f"value nested deeper than {max_depth}")
    kind = type(value)
    if kind is int:
        number = value << 1 if value >= 0 else ((-value) << 1) - 1
        if number < 0x4000:
            out += _INT
            if number < 0x80:
                out.append(number)
            else:
                out.append((number & 0x7F) | 0x80)
                out.append(number >> 7)
            return
    elif kind is list:
        out += _LIST
        _varint(len(value), out)
        for item in value:
            _encode_into(item, out, depth + 1, max_depth)
        return
    if value is None:
        out += _NONE
    elif value is True:
        out += _TRUE
    elif value is False:
        out += _FALSE
    elif isinstance(value, int):
        out += _INT
        start = len(out)
        _varint(_zigzag(int(value)), out)
        if len(out) - start > MAX_INT_BYTES:
            raise CodecError("integer too large to encode")
    elif isinstance(value, float):
        out += _FLOAT
        out += _DOUBLE.pack(value)
    elif isinstance(value, str):
        out += _STR
        try:
            _encode_text(value, out)
        except UnicodeEncodeError as e:
            raise CodecError(f"string is not encodable as UTF-8: {e}") from None
    elif isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        out += _BYTES
        _varint(len(raw), out)
        out += raw
    elif isinstance(value, (list, tuple)):
        out += _LIST if isinstance(value, list) else _TUPLE
        _varint(len(value), out)
        for item in value:
            _encode_into(item, out, depth + 1, max_depth)
    elif isinstance(value, dict):
        out += _DICT
        _varint(len(value), out)
        for key, item in value.items():
            if not isinstance(key, (str, int, bytes)):
                raise CodecError(f"dict keys must be str, int or bytes, not {type(key).__name__}")
            _encode_into(key, out, depth + 1, max_depth)
            _encode_into(item, out, depth + 1, max_depth)
    elif isinstance(value, Handle):
        out += _HANDLE
        _encode_text(value.kind, out)
        _varint(value.id, out)
    elif isinstance(value, DLDevice):
        out += _DEVICE
        _varint(value.device_type, out)
        _varint(value.index, out)
    elif isinstance(value, ArrayRef):
        out += _ARRAY_REF
        _varint(value.id, out)
        _encode_shape(value.shape, out)
        _encode_text(value.dtype, out)
        _varint(value.device.device_type, out)
        _varint(value.device.index, out)
    elif isinstance(value, HostArray):
        out += _HOST_ARRAY
        _encode_shape(value.shape, out)
        _encode_text(value.dtype, out)
        _varint(len(value.data), out)
        out += value.data
    else:
        raise CodecError(f"cannot encode a value of type {type(value).__name__}")


def _encode_shape(shape, out):
    """Append a shape: its rank, then each dimension, as varints."""
    _varint(len(shape), out)
    for dim in shape:
        _varint(dim, out)


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
                return bytes((VERSION, _T_INT, number))
            return bytes((VERSION, _T_INT, (number & 0x7F) | 0x80, number >> 7))
    elif kind is list and max_depth > 0 and len(value) < 0x80:
        # Small ints only (the usual call arguments); anything else below.
        out = bytearray((VERSION, _T_LIST, len(value)))
        for item in value:
            if type(item) is not int or not -0x2000 <= item < 0x2000:
                break
            number = item << 1 if item >= 0 else ((-item) << 1) - 1
            if number < 0x80:
                out += bytes((_T_INT, number))
            else:
                out += bytes((_T_INT, (number & 0x7F) | 0x80, number >> 7))
        else:
            return bytes(out)
    out = bytearray([VERSION])
    try:
        _encode_into(value, out, 0, max_depth)
    except RecursionError:
        raise CodecError("value nested too deeply") from None
    return bytes(out)


_T_NONE, _T_TRUE, _T_FALSE = _NONE[0], _TRUE[0], _FALSE[0]
_T_INT, _T_FLOAT, _T_STR, _T_BYTES = _INT[0], _FLOAT[0], _STR[0], _BYTES[0]
_T_LIST, _T_TUPLE, _T_DICT = _LIST[0], _TUPLE[0], _DICT[0]
_T_HANDLE, _T_ARRAY_REF, _T_HOST_ARRAY, _T_DEVICE = (
    _HANDLE[0], _ARRAY_REF[0], _HOST_ARRAY[0], _DEVICE[0])


@attrs.define
class _Reader:
    """
    A cursor over the bytes being decoded (C{bytes}, or a byte
    C{memoryview}); every failure is a L{CodecError}.
    """

    data: object
    position: int = 0

    def byte(self):
        """@return: the next byte. @raise CodecError: at the end of the input."""
        position = self.position
        if position >= len(self.data):
            raise CodecError("truncated value")
        self.position = position + 1
        return self.data[position]

    def take(self, length):
        """@return: the next C{length} bytes (a slice). @raise CodecError: past the end."""
        end = self.position + length
        if end > len(self.data):
            raise CodecError(f"truncated value: wants {length} bytes at {self.position}")
        chunk = self.data[self.position:end]
        self.position = end
        return chunk

    def varint(self, limit=10):
        """Read an unsigned LEB128 varint of at most C{limit} bytes."""
        data = self.data
        position = self.position
        if position < len(data) and data[position] < 0x80:
            self.position = position + 1
            return data[position]
        result = shift = 0
        for _ in range(limit):
            byte = self.byte()
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
        raise CodecError("varint too long")

    def count(self):
        """A length or element count, at most the bytes that remain."""
        number = self.varint()
        if number > len(self.data) - self.position:
            raise CodecError(f"announced length {number} exceeds the remaining input")
        return number

    def text(self):
        """@return: a varint-prefixed UTF-8 string."""
        raw = self.take(self.count())
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"invalid UTF-8 in string: {e}") from None

    def small(self):
        """A non-negative number below 2**31 (ids, device numbers, dimensions)."""
        number = self.varint(5)
        if number >= 1 << 31:
            raise CodecError(f"number {number} out of range")
        return number

    def shape(self):
        """@return: a varint rank followed by that many dimensions."""
        return tuple(self.small() for _ in range(self.count()))


def _decode_from(reader, depth, max_depth):
    """Read one value (tag and body) from C{reader}; see L{decode}."""
    if depth > max_depth:
        raise CodecError(f"value nested deeper than {max_depth}")
    tag = reader.byte()
    if tag == _T_INT:
        number = reader.varint(MAX_INT_BYTES)
        return number >> 1 if not number & 1 else -((number + 1) >> 1)
    if tag == _T_LIST or tag == _T_TUPLE:
        items = [_decode_from(reader, depth + 1, max_depth) for _ in range(reader.count())]
        return items if tag == _T_LIST else tuple(items)
    if tag == _T_NONE:
        return None
    if tag == _T_TRUE:
        return True
    if tag == _T_FALSE:
        return False
    if tag == _T_FLOAT:
        return _DOUBLE.unpack(reader.take(8))[0]
    if tag == _T_STR:
        return reader.text()
    if tag == _T_BYTES:
        return bytes(reader.take(reader.count()))
    if tag == _T_DICT:
        result = {}
        for _ in range(reader.count()):
            key = _decode_from(reader, depth + 1, max_depth)
            if not isinstance(key, (str, int, bytes)):
                raise CodecError(f"bad dict key of type {type(key).__name__}")
            result[key] = _decode_from(reader, depth + 1, max_depth)
        return result
    if tag == _T_HANDLE:
        kind = reader.text()
        if kind not in ("function", "module"):
            raise CodecError(f"unknown handle kind {kind!r}")
        return Handle(kind, reader.small())
    if tag == _T_DEVICE:
        return DLDevice(reader.small(), reader.small())
    if tag == _T_ARRAY_REF:
        handle = reader.small()
        shape = reader.shape()
        dtype = reader.text()
        device = DLDevice(reader.small(), reader.small())
        return ArrayRef(handle, shape, dtype, device)
    if tag == _T_HOST_ARRAY:
        shape = reader.shape()
        dtype = reader.text()
        # Checked before taking the data, so a bogus shape cannot allocate.
        expected = array_nbytes(shape, dtype)
        length = reader.count()
        if length != expected:
            raise CodecError(f"host array data is {length} bytes, expected {expected}")
        return HostArray(shape, dtype, bytes(reader.take(length)))
    raise CodecError(f"unknown value tag {bytes([tag])!r}")


#: Longest input tried by L{_quick_decode} first.
_QUICK_SIZE = 256
_MISS = object()
_unpack_double = _DOUBLE.unpack_from


def _quick_decode(data):
    """
    Decode the common small values of a call (a list of, or one: small int,
    float, None, bool, short str) without the general reader.

    @param data: the whole encoding (C{bytes}).
    @return: the value, or C{_MISS} for anything else, including every
        invalid input (L{decode}'s general path then decodes or rejects it).
    """
    try:
        if data[0] != VERSION:
            return _MISS
        end = len(data)
        tag = data[1]
        if tag == _T_LIST:
            count = data[2]
            if count >= 0x80:
                return _MISS
            position = 3
            items = []
            append = items.append
            for _ in range(count):
                tag = data[position]
                if tag == _T_INT:
                    number = data[position + 1]
                    if number < 0x80:
                        position += 2
                    else:
                        high = data[position + 2]
                        if high >= 0x80:
                            return _MISS
                        number = (number & 0x7F) | (high << 7)
                        position += 3
                    append(number >> 1 if not number & 1 else -((number + 1) >> 1))
                elif tag == _T_FLOAT:
                    if position + 9 > end:
                        return _MISS
                    append(_unpack_double(data, position + 1)[0])
                    position += 9
                elif tag == _T_STR:
                    length = data[position + 1]
                    start = position + 2
                    position = start + length
                    if length >= 0x80 or position > end:
                        return _MISS
                    append(str(data[start:position], "utf-8"))
                elif tag == _T_NONE:
                    append(None)
                    position += 1
                elif tag == _T_TRUE:
                    append(True)
                    position += 1
                elif tag == _T_FALSE:
                    append(False)
                    position += 1
                else:
                    return _MISS
            return items if position == end else _MISS
        if tag == _T_INT:
            number = data[2]
            if end == 3 and number < 0x80:
                return number >> 1 if not number & 1 else -((number + 1) >> 1)
            if end == 4 and number >= 0x80 and data[3] < 0x80:
                number = (number & 0x7F) | (data[3] << 7)
                return number >> 1 if not number & 1 else -((number + 1) >> 1)
            return _MISS
        if tag == _T_FLOAT:
            return _unpack_double(data, 2)[0] if end == 10 else _MISS
        if end == 2:
            if tag == _T_NONE:
                return None
            if tag == _T_TRUE:
                return True
            if tag == _T_FALSE:
                return False
        return _MISS
    except (IndexError, UnicodeDecodeError):
        return _MISS


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
        if len(data) <= _QUICK_SIZE and max_depth > 0 and len(data) <= max_size:
            value = _quick_decode(data)
            if value is not _MISS:
                return value
        view = data
    else:
        try:
            view = memoryview(data).cast("B")
        except TypeError:
            raise CodecError(f"cannot decode a {type(data).__name__}") from None
    if len(view) > max_size:
        raise CodecError(f"encoded value of {len(view)} bytes exceeds {max_size}")
    reader = _Reader(view)
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
