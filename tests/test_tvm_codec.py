"""Property tests of the codec of TVM's session protocol (values and packets)."""

import math
import struct

import pytest
from hypothesis import given, strategies as st

from tvm_rpc.protocol import tvm_packets as packets
from tvm_rpc.protocol import tvm_values as tv
from tvm_rpc.protocol.values import DLDevice

pytestmark = pytest.mark.unit

int64s = st.integers(-(1 << 63), (1 << 63) - 1)
u64s = st.integers(0, (1 << 64) - 1)
dtypes = st.builds(tv.DataType, st.sampled_from([0, 1, 2, 4, 6]),
                   st.sampled_from([8, 16, 32, 64]), st.integers(1, 16))
devices = st.builds(DLDevice, st.integers(1, 16), st.integers(0, 7))
tensors = st.builds(
    tv.TensorDesc, u64s, devices,
    st.lists(st.integers(0, 1 << 20), max_size=6).map(tuple), dtypes, u64s,
)
scalars = (
    st.none() | st.booleans() | int64s
    | st.floats(allow_nan=False) | st.text(max_size=40) | st.binary(max_size=64)
)
wire_values = (
    scalars
    | u64s.map(tv.OpaquePtr) | dtypes | devices | tensors
    | u64s.map(tv.FunctionRef) | u64s.map(tv.ModuleRef) | u64s.map(tv.ObjectRef)
)


def split(data, cuts):
    """Cut C{data} at the given fractions."""
    points = sorted({int(c * len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(st.lists(wire_values, max_size=12))
def test_sequence_round_trip(items):
    """Every kind of value decodes to what was encoded, and nothing is left over."""
    encoded = tv.encode_seq(items)
    decoded, end = tv.decode_seq(encoded)
    assert end == len(encoded)
    assert decoded == items


@given(st.floats(allow_nan=True))
def test_float_bits_kept(value):
    """A float travels as its 64-bit pattern (NaN included)."""
    (decoded,), _ = tv.decode_seq(tv.encode_seq([value]))
    assert struct.pack("<d", decoded) == struct.pack("<d", value) or (
        math.isnan(value) and math.isnan(decoded))


def test_captured_bytes():
    """The bytes TVM's own peers send (captures of the reference study)."""
    assert tv.encode_seq([-2]) == bytes.fromhex("01000000 01000000 feffffffffffffff")
    assert tv.encode_seq([1.5]) == bytes.fromhex("01000000 03000000 000000000000f83f")
    assert tv.encode_seq([tv.DataType.parse("float16")]) == bytes.fromhex(
        "01000000 05000000 02100100 00000000")
    tensor = tv.TensorDesc(0x7F7BF800F200, DLDevice(1, 0), (1024,), tv.DataType.parse("float32"))
    assert tensor.encode() == bytes.fromhex(
        "00f200f87b7f0000 01000000 00000000 01000000 02200100 0004000000000000 "
        "0000000000000000")
    assert packets.init_server() == bytes.fromhex(
        "1500000000000000 02000000 0500000000000000 302e382e30 00000000")
    assert packets.SHUTDOWN_PACKET == bytes.fromhex("0400000000000000 01000000")
    # Object-encoded values as TVM sends them: SmallBytes, Str, an RPC object.
    small = bytes.fromhex("01000000 0c000000 42000000 0200000000000000 7879")
    assert tv.decode_seq(small)[0] == [b"xy"]
    text = bytes.fromhex("01000000 41000000 41000000 0200000000000000 6869")
    assert tv.decode_seq(text)[0] == ["hi"]
    ref = bytes.fromhex("01000000 73000000 73000000 0900000000000000")
    assert tv.decode_seq(ref)[0] == [tv.ObjectRef(9)]


@pytest.mark.parametrize("dtype", ["float32", "int8", "uint16", "bool", "float32x4",
                                   "bfloat16", "int64", "float64"])
def test_dtype_spelling_round_trip(dtype):
    assert str(tv.DataType.parse(dtype)) == dtype


@pytest.mark.parametrize("dtype", ["complex64", "int8x", "bool8", "", "float32xa"])
def test_bad_dtype(dtype):
    with pytest.raises(tv.TVMCodecError):
        tv.DataType.parse(dtype)


@given(st.lists(wire_values, min_size=1, max_size=6), st.data())
def test_truncated_sequence_is_refused(items, data):
    """Cutting an encoding anywhere short gives TVMCodecError, never a wrong value."""
    encoded = tv.encode_seq(items)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(tv.TVMCodecError):
        tv.decode_seq(encoded[:cut])


@pytest.mark.parametrize("index", [10, 13, 63, 67, 200, -1])
def test_unknown_type_index(index):
    """An index TVM does not send is named in the error."""
    with pytest.raises(tv.TVMCodecError, match="type index"):
        tv.decode_seq(struct.pack("<iiQ", 1, index, 0) + b"\0" * 16)


def test_unknown_object_index():
    with pytest.raises(tv.TVMCodecError, match="object type index 71"):
        tv.decode_seq(struct.pack("<iiIQ", 1, 71, 71, 0))


def test_unencodable():
    with pytest.raises(tv.TVMCodecError, match="cannot carry"):
        tv.encode_seq([object()])
    with pytest.raises(tv.TVMCodecError, match="64-bit"):
        tv.encode_seq([1 << 63])


def test_call_return_convention():
    assert tv.call_return([0, None]) == (0, None, None)
    assert tv.call_return([1, 42]) == (1, 42, None)
    tensor = tv.TensorDesc(8, DLDevice(1, 0), (2,), tv.DataType.parse("float32"))
    assert tv.call_return([70, tensor, tv.OpaquePtr(5)]) == (70, tensor, 5)
    assert tv.call_return([7, tensor]) == (7, tensor, None)
    for bad in ([], [None, 1], [1, 2, 3], [70, 1, tv.OpaquePtr(1)], [1, 2, 3, 4]):
        with pytest.raises(tv.TVMCodecError):
            tv.call_return(bad)


packet_lists = st.lists(
    st.tuples(st.sampled_from(sorted(packets.CODE_NAMES)), st.binary(max_size=100)),
    max_size=8)


@given(packet_lists, st.lists(st.floats(0, 1), max_size=20), st.booleans())
def test_frames_split_anywhere(items, cuts, keepalive):
    """Packets split at any boundaries (and keep-alives between) decode whole, in order."""
    stream = b"".join(
        (b"\0" * 8 if keepalive else b"") + packets.packet(code, body) for code, body in items)
    decoder = packets.FrameDecoder(max_packet=1 << 20)
    decoded = []
    for piece in split(stream, cuts):
        decoded.extend(decoder.feed(piece))
    assert decoded == items
    assert decoder.buffered == 0


def test_frames_split_at_every_byte():
    """Byte by byte works too."""
    items = [(packets.RETURN, tv.encode_seq([0, None])), (packets.COPY_ACK, b"abc")]
    stream = b"".join(packets.packet(code, body) for code, body in items)
    decoder = packets.FrameDecoder(max_packet=64)
    decoded = []
    for i in range(len(stream)):
        decoded.extend(decoder.feed(stream[i:i + 1]))
    assert decoded == items


def test_frame_bound_checked_before_buffering():
    """A too-long announcement is refused on its 8 length bytes alone."""
    decoder = packets.FrameDecoder(max_packet=100)
    with pytest.raises(packets.TVMPacketError, match="101 bytes, more than the bound of 100"):
        decoder.feed(struct.pack("<Q", 101))
    assert packets.FrameDecoder(100).feed(packets.packet(packets.RETURN, b"x" * 96))


@given(st.lists(st.floats(0, 1), max_size=10))
def test_oversize_frames_skipped_unkept(cuts):
    """With skip_oversize, a too-long packet is announced and dropped, whatever the split."""
    stream = (packets.packet(packets.RETURN, b"a" * 200) + packets.packet(packets.COPY_ACK, b"ok")
              + packets.packet(packets.RETURN, b"b" * 300))
    decoder = packets.FrameDecoder(max_packet=100, skip_oversize=True)
    decoded = []
    for piece in split(stream, cuts):
        decoded.extend(decoder.feed(piece))
        assert decoder.buffered <= 100 + 8
    assert decoded == [(None, 204), (packets.COPY_ACK, b"ok"), (None, 304)]


def test_frame_too_short_for_a_code():
    with pytest.raises(packets.TVMPacketError, match="cannot hold its code"):
        packets.FrameDecoder(100).feed(struct.pack("<Q", 3) + b"abc")


@given(st.lists(wire_values, max_size=6), u64s)
def test_call_func_packet(args, handle):
    """kCallFunc is the handle then the arguments."""
    (code, body), = packets.FrameDecoder(1 << 24).feed(packets.call_func(handle, args))
    assert code == packets.CALL_FUNC
    assert struct.unpack_from("<Q", body)[0] == handle
    assert tv.decode_seq(body, 8) == (args, len(body))


@given(tensors, st.binary(max_size=200))
def test_copy_packets(desc, data):
    """Copy packets carry the descriptor, the size and (to remote) the data."""
    (code, body), = packets.FrameDecoder(1 << 24).feed(packets.copy_to_remote(desc, data))
    assert code == packets.COPY_TO_REMOTE
    assert body.endswith(struct.pack("<Q", len(data)) + data)
    assert body.startswith(desc.encode())
    assert len(body) + 4 == packets.copy_packet_size(desc, len(data))
    (code, body), = packets.FrameDecoder(1 << 24).feed(packets.copy_from_remote(desc, 7))
    assert (code, body) == (packets.COPY_FROM_REMOTE, desc.encode() + struct.pack("<Q", 7))
