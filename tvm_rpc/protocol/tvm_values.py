"""
The values of TVM's own session protocol (apache-tvm 0.27, the tvm-ffi era).

A packed sequence (C{SEQ}) is C{i32 count} then, per value, C{i32 type_index}
and its payload: integers, bools and floats as 8 bytes, opaque pointers as
C{u64}, a DataType as C{u8 code, u8 bits, u16 lanes} plus 4 padding bytes, a
device as two C{i32}, a DLTensor descriptor (L{TensorDesc}, no strides), raw
strings and byte arrays as C{u64 length} + bytes, function and module
handles as C{u64}, and the object-encoded values (strings, bytes, remote
objects) with their type index written twice. Everything is little-endian
and unpadded. C{reference/tvm_session_protocol.md} section 3 has the bytes.

Python values map onto it as TVM's client maps them: C{None}, C{bool},
C{int} (64-bit), C{float}, C{str} (sent as a raw string), bytes-like (sent
as a byte array), and the wire types of this module (L{OpaquePtr},
L{DataType}, L{DLDevice}, L{TensorDesc}, L{FunctionRef}, L{ModuleRef},
L{ObjectRef}). Decoding gives the same kinds back (any string encoding as
C{str}, any bytes encoding as C{bytes}).

Sans-IO: nothing here reads or writes a socket.
"""

import struct

import attrs

from .values import DLDevice

# tvm-ffi type indices (tvm/ffi/c_api.h) and TVM's RPC object index.
NONE, INT, BOOL, FLOAT, OPAQUE_PTR, DATA_TYPE, DEVICE, DL_TENSOR_PTR = range(8)
RAW_STR, BYTE_ARRAY_PTR = 8, 9
SMALL_STR, SMALL_BYTES = 11, 12
STATIC_OBJECT_BEGIN = 64
STR, BYTES = 65, 66
FUNCTION, ARRAY, TENSOR, MODULE = 68, 71, 70, 73
#: C{kRuntimeRPCObjectRef}: a remote object passed back by handle.
RPC_OBJECT_REF = 115

#: Most dimensions of a tensor descriptor accepted from a peer.
MAX_NDIM = 64
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TAG_I64 = struct.Struct("<iq")
_TAG_F64 = struct.Struct("<id")
_TAG_U64 = struct.Struct("<iQ")
_TAG_DTYPE = struct.Struct("<iBBHi")
_TAG_DEVICE = struct.Struct("<iii")
_DLT_HEAD = struct.Struct("<QiiiBBH")
_OBJECT_HEAD = struct.Struct("<iIQ")
_NONE_TAG = _I32.pack(NONE)


class TVMCodecError(ValueError):
    """A value that TVM's protocol cannot carry, or bytes that are no valid encoding."""


@attrs.frozen
class OpaquePtr:
    """A raw pointer of the server (a handle, tensor data), C{u64} on the wire."""

    value: int


@attrs.frozen
class FunctionRef:
    """A function handle of the server, passed as an argument."""

    handle: int


@attrs.frozen
class ModuleRef:
    """A module handle of the server, passed as an argument."""

    handle: int


@attrs.frozen
class ObjectRef:
    """A remote object (C{RPCObjectRef}) by handle."""

    handle: int


# (code) -> TVM's dtype prefix; bool is code 6 with 8 bits.
_DTYPE_NAMES = {0: "int", 1: "uint", 2: "float", 3: "handle", 4: "bfloat", 6: "bool"}
_DTYPE_CODES = {name: code for code, name in _DTYPE_NAMES.items()}
_DEFAULT_BITS = {"int": 32, "uint": 32, "float": 32, "bfloat": 16, "handle": 64, "bool": 8}


@attrs.frozen
class DataType:
    """
    DLPack's C{DLDataType}: C{code}, C{bits}, C{lanes}
    (C{DataType.parse("float32")} is C{DataType(2, 32, 1)}).
    """

    code: int
    bits: int
    lanes: int = 1

    @classmethod
    def parse(cls, text):
        """
        @param text: TVM's spelling (C{"float32"}, C{"int8"}, C{"bool"}, C{"float32x4"}).
        @raise TVMCodecError: for one it does not know.
        """
        base, x, lanes = text.partition("x")
        name = base.rstrip("0123456789")
        bits = base[len(name):]
        if name not in _DTYPE_CODES or (x and not lanes.isdigit()) or (
                bits and name == "bool"):
            raise TVMCodecError(f"unsupported dtype {text!r}")
        return cls(_DTYPE_CODES[name], int(bits) if bits else _DEFAULT_BITS[name],
                   int(lanes) if lanes else 1)

    def __str__(self):
        """@return: TVM's spelling."""
        name = _DTYPE_NAMES.get(self.code, f"code{self.code}_")
        text = name if name == "bool" else f"{name}{self.bits}"
        return text if self.lanes == 1 else f"{text}x{self.lanes}"

    @property
    def itemsize(self):
        """Bytes per element (bits rounded up to bytes, times lanes)."""
        return (self.bits * self.lanes + 7) // 8


@attrs.frozen
class TensorDesc:
    """
    A DLTensor descriptor as the wire carries it (C{SendDLTensor}): the
    remote data pointer, device, shape, dtype and byte offset; no strides
    (the data is C-contiguous).
    """

    data: int
    device: DLDevice
    shape: tuple
    dtype: DataType
    byte_offset: int = 0

    @property
    def nbytes(self):
        """Bytes of the whole tensor."""
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize

    def encode(self):
        """@return: the C{36 + 8 * ndim} descriptor bytes."""
        ndim = len(self.shape)
        dtype = self.dtype
        return b"".join((
            _DLT_HEAD.pack(self.data, self.device.device_type, self.device.index, ndim,
                           dtype.code, dtype.bits, dtype.lanes),
            struct.pack(f"<{ndim}q", *self.shape),
            _U64.pack(self.byte_offset),
        ))


def _encode_int(value):
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise TVMCodecError(f"{value} does not fit TVM's 64-bit integer")
    return _TAG_I64.pack(INT, value)


def _encode_str(value):
    raw = value.encode("utf-8")
    return _TAG_U64.pack(RAW_STR, len(raw)) + raw


def _encode_bytes(value):
    raw = bytes(value)
    return _TAG_U64.pack(BYTE_ARRAY_PTR, len(raw)) + raw


def _encode_device(value):
    return _TAG_DEVICE.pack(DEVICE, value.device_type, value.index)


_ENCODERS = {
    type(None): lambda value: _NONE_TAG,
    bool: lambda value: _TAG_I64.pack(BOOL, int(value)),
    int: _encode_int,
    float: lambda value: _TAG_F64.pack(FLOAT, value),
    str: _encode_str,
    bytes: _encode_bytes,
    bytearray: _encode_bytes,
    memoryview: lambda value: _encode_bytes(value.cast("B") if value.ndim != 1 else value),
    OpaquePtr: lambda value: _TAG_U64.pack(OPAQUE_PTR, value.value),
    DataType: lambda value: _TAG_DTYPE.pack(DATA_TYPE, value.code, value.bits, value.lanes, 0),
    DLDevice: _encode_device,
    TensorDesc: lambda value: _I32.pack(DL_TENSOR_PTR) + value.encode(),
    FunctionRef: lambda value: _TAG_U64.pack(FUNCTION, value.handle),
    ModuleRef: lambda value: _TAG_U64.pack(MODULE, value.handle),
    ObjectRef: lambda value: _OBJECT_HEAD.pack(RPC_OBJECT_REF, RPC_OBJECT_REF, value.handle),
}


def encode_value(value):
    """
    @return: the type index and payload of one value.
    @raise TVMCodecError: for a value TVM's protocol cannot carry.
    """
    encoder = _ENCODERS.get(type(value))
    if encoder is None:
        raise TVMCodecError(f"TVM's session protocol cannot carry {type(value).__name__} "
                            f"values ({value!r:.80})")
    try:
        return encoder(value)
    except struct.error as e:
        raise TVMCodecError(f"cannot encode {value!r:.80}: {e}") from None


def encode_seq(items):
    """@return: the packed sequence of C{items} (see L{encode_value})."""
    return b"".join([_I32.pack(len(items)), *map(encode_value, items)])


def _read_sized(data, pos, what):
    (size,) = _U64.unpack_from(data, pos)
    end = pos + 8 + size
    if end > len(data):
        raise TVMCodecError(f"{what} of {size} bytes runs past the end of its packet")
    return bytes(data[pos + 8:end]), end


def _read_tensor(data, pos):
    pointer, device_type, index, ndim, code, bits, lanes = _DLT_HEAD.unpack_from(data, pos)
    if not 0 <= ndim <= MAX_NDIM:
        raise TVMCodecError(f"tensor descriptor with {ndim} dimensions")
    pos += _DLT_HEAD.size
    shape = struct.unpack_from(f"<{ndim}q", data, pos)
    pos += 8 * ndim
    (offset,) = _U64.unpack_from(data, pos)
    try:
        device = DLDevice(device_type, index)
    except ValueError:
        raise TVMCodecError(f"bad device ({device_type}, {index}) in a tensor") from None
    return TensorDesc(pointer, device, shape, DataType(code, bits, lanes), offset), pos + 8


def _read_object(data, pos, outer):
    (inner,) = _U32.unpack_from(data, pos)
    pos += 4
    if inner == STR:
        return _read_text(data, pos)
    if inner == BYTES:
        return _read_sized(data, pos, "a byte string")
    if inner == RPC_OBJECT_REF:
        return ObjectRef(_U64.unpack_from(data, pos)[0]), pos + 8
    raise TVMCodecError(f"unknown object type index {inner} (outer {outer})")


def _read_text(data, pos):
    """@return: C{(text, next position)} of a sized UTF-8 string (bad bytes replaced)."""
    raw, pos = _read_sized(data, pos, "a string")
    try:
        return raw.decode("utf-8"), pos
    except UnicodeDecodeError:
        return raw.decode("utf-8", "replace"), pos


def _read_value(data, pos):
    """@return: C{(value, next position)} of the value at C{pos}."""
    (index,) = _I32.unpack_from(data, pos)
    pos += 4
    if index == INT:
        return _TAG_I64.unpack_from(data, pos - 4)[1], pos + 8
    if index == NONE:
        return None, pos
    if index == OPAQUE_PTR:
        return OpaquePtr(_U64.unpack_from(data, pos)[0]), pos + 8
    if index == RAW_STR:
        return _read_text(data, pos)
    if index == BYTE_ARRAY_PTR:
        return _read_sized(data, pos, "a byte array")
    if index == FLOAT:
        return _TAG_F64.unpack_from(data, pos - 4)[1], pos + 8
    if index == BOOL:
        return _TAG_I64.unpack_from(data, pos - 4)[1] != 0, pos + 8
    if index == DATA_TYPE:
        _, code, bits, lanes, _ = _TAG_DTYPE.unpack_from(data, pos - 4)
        return DataType(code, bits, lanes), pos + 8
    if index == DEVICE:
        _, device_type, device_index = _TAG_DEVICE.unpack_from(data, pos - 4)
        try:
            return DLDevice(device_type, device_index), pos + 8
        except ValueError:
            raise TVMCodecError(f"bad device ({device_type}, {device_index})") from None
    if index == DL_TENSOR_PTR:
        return _read_tensor(data, pos)
    if index == FUNCTION:
        return FunctionRef(_U64.unpack_from(data, pos)[0]), pos + 8
    if index == MODULE:
        return ModuleRef(_U64.unpack_from(data, pos)[0]), pos + 8
    if index >= STATIC_OBJECT_BEGIN or index in (SMALL_STR, SMALL_BYTES):
        return _read_object(data, pos, index)
    raise TVMCodecError(f"unknown type index {index}")


def decode_seq(data, pos=0):
    """
    Decode the packed sequence at C{pos} of C{data}.

    @return: C{(values, position after it)}.
    @raise TVMCodecError: for a truncated sequence or an unknown type index.
    """
    try:
        (count,) = _I32.unpack_from(data, pos)
        pos += 4
        if count < 0 or count * 4 > len(data) - pos:
            raise TVMCodecError(f"a sequence of {count} values in {len(data) - pos} bytes")
        items = []
        for _ in range(count):
            value, pos = _read_value(data, pos)
            items.append(value)
    except struct.error:
        raise TVMCodecError("a value runs past the end of its packet") from None
    return items, pos


def call_return(items):
    """
    Read kCallFunc's return convention (C{LocalSession::EncodeReturn}):
    C{[Int type_index, value]}, or C{[Int 70, TensorDesc, OpaquePtr
    tensor_object]} for a Tensor (a 2-entry DLTensor return is tolerated).

    @param items: the decoded sequence of a kReturn.
    @return: C{(type_index, value, tensor_object_or_None)}.
    @raise TVMCodecError: for a reply that follows no such shape.
    """
    if not 2 <= len(items) <= 3 or type(items[0]) is not int:
        raise TVMCodecError(f"a call's return is [type_index, value], not {items!r:.200}")
    type_index, value = items[0], items[1]
    if len(items) == 3:
        if type_index != TENSOR or not isinstance(value, TensorDesc) or not isinstance(
                items[2], OpaquePtr):
            raise TVMCodecError(f"a 3-entry return must be a Tensor, not {items!r:.200}")
        return type_index, value, items[2].value
    return type_index, value, None


__all__ = [
    "DataType",
    "FunctionRef",
    "ModuleRef",
    "ObjectRef",
    "OpaquePtr",
    "TVMCodecError",
    "TensorDesc",
    "call_return",
    "decode_seq",
    "encode_seq",
    "encode_value",
]
