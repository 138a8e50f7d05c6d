"""Property tests for the session value codec."""

import math
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_rpc.protocol import value_bytes, values
from tvm_rpc.protocol.values import (
    ArrayRef,
    CodecError,
    DLDevice,
    Handle,
    HostArray,
    decode,
    encode,
)

pytestmark = pytest.mark.unit


devices = st.builds(DLDevice, st.integers(1, 16), st.integers(0, 8))
dtypes = st.sampled_from(["float32", "float64", "int8", "uint8", "int16", "int64", "bool", "float16"])
shapes = st.lists(st.integers(0, 4), max_size=3).map(tuple)


@st.composite
def host_arrays(draw):
    """Host arrays whose data matches their shape and dtype."""
    shape = draw(shapes)
    dtype = draw(dtypes)
    data = draw(st.binary(min_size=values.array_nbytes(shape, dtype),
                          max_size=values.array_nbytes(shape, dtype)))
    return HostArray(shape, dtype, data)


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**600), max_value=2**600)
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.builds(Handle, st.sampled_from(["function", "module"]), st.integers(0, 2**31 - 1))
    | devices
    | st.builds(ArrayRef, st.integers(0, 2**31 - 1), shapes, dtypes, devices)
    | host_arrays()
)
keys = st.text() | st.integers() | st.binary() | st.booleans()
value_trees = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.lists(children, max_size=4).map(tuple)
    | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)


@given(value_trees)
def test_round_trip(value):
    """Every supported value decodes to an equal value of the same types."""
    decoded = decode(encode(value))
    assert decoded == value
    assert type(decoded) is type(value)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_floats_bit_exact(number):
    """Floats (NaN, infinities, -0.0 included) keep their exact bits."""
    decoded = decode(encode(number))
    assert struct.pack("<d", decoded) == struct.pack("<d", number)


@given(st.binary(max_size=200))
def test_garbage_raises_only_codec_error(data):
    """Arbitrary bytes either decode or raise CodecError, nothing else."""
    try:
        decode(data)
    except CodecError:
        pass


@given(value_trees, st.data())
def test_mutated_encodings_raise_only_codec_error(value, data):
    """Truncated or corrupted encodings raise CodecError or decode to something."""
    encoded = bytearray(encode(value))
    cut = data.draw(st.integers(0, len(encoded)))
    truncated = bytes(encoded[:cut])
    if cut < len(encoded):
        with pytest.raises(CodecError):
            decode(truncated)
    position = data.draw(st.integers(0, len(encoded) - 1))
    encoded[position] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(encoded))
    except CodecError:
        pass


def test_version_byte():
    """The first byte is the version; another version is refused."""
    assert encode(None) == bytes([values.VERSION]) + b"N"
    with pytest.raises(CodecError, match="version"):
        decode(bytes([values.VERSION + 1]) + b"N")


def test_trailing_garbage_refused():
    """Bytes after the value are an error."""
    with pytest.raises(CodecError, match="trailing"):
        decode(encode(1) + b"N")


def test_depth_limit():
    """Nesting beyond the limit is refused on both sides."""
    deep = []
    for _ in range(10):
        deep = [deep]
    with pytest.raises(CodecError, match="deeper"):
        encode(deep, max_depth=5)
    encoded = encode(deep)
    with pytest.raises(CodecError, match="deeper"):
        decode(encoded, max_depth=5)
    very_deep = bytes([values.VERSION]) + b"l\x01" * 100000 + b"N"
    with pytest.raises(CodecError):
        decode(very_deep)


def test_size_limit():
    """Inputs longer than max_size are refused before decoding."""
    with pytest.raises(CodecError, match="exceeds"):
        decode(encode(b"x" * 100), max_size=50)


def test_huge_announced_lengths_do_not_allocate():
    """A list or bytes announcing 2**60 elements fails fast."""
    for tag in (b"l", b"b", b"s", b"d"):
        data = bytes([values.VERSION]) + tag + b"\xff" * 8 + b"\x7f"
        with pytest.raises(CodecError, match="exceeds|varint"):
            decode(data)


def test_host_array_bogus_shape():
    """A host array whose shape implies terabytes is refused without allocating."""
    body = bytearray([values.VERSION]) + b"h" + b"\x02" + b"\xff\xff\xff\xff\x07" * 2
    body += b"\x07float32" + b"\x04abcd"
    with pytest.raises(CodecError):
        decode(bytes(body))


def test_unsupported_types():
    """Objects, sets and odd dict keys are refused with CodecError."""
    for bad in (object(), {1, 2}, {(1, 2): 3}, {None: 1}):
        with pytest.raises(CodecError):
            encode(bad)
    with pytest.raises(CodecError):
        decode("not bytes")


def test_host_array_checks_length():
    """Data length must match shape and dtype."""
    with pytest.raises(CodecError, match="needs 8 bytes"):
        HostArray((2,), "float32", b"abc")
    assert HostArray((2, 2), "int16", b"12345678").data == b"12345678"


def test_dtype_itemsize():
    """TVM's dtype spellings map to item sizes; unknown ones fail."""
    assert values.dtype_itemsize("float32") == 4
    assert values.dtype_itemsize("int8") == 1
    assert values.dtype_itemsize("bool") == 1
    assert values.dtype_itemsize("float32x4") == 16
    assert values.dtype_itemsize("bfloat16") == 2
    for bad in ("float7", "complex64", "", "int8x0", 3):
        with pytest.raises(CodecError):
            values.dtype_itemsize(bad)


def test_devices():
    """Devices use TVM's numbering."""
    assert DLDevice.named("cpu") == DLDevice(1, 0)
    assert DLDevice.named("cuda", 1) == DLDevice(2, 1)
    assert str(DLDevice(4, 2)) == "opencl(2)"
    with pytest.raises(CodecError):
        DLDevice.named("abacus")


def test_numpy_round_trip():
    """HostArray converts from and to numpy arrays."""
    import numpy

    array = numpy.arange(12, dtype="float32").reshape(3, 4)
    host = HostArray.from_numpy(array)
    assert host.shape == (3, 4) and host.dtype == "float32"
    assert (decode(encode(host)).numpy() == array).all()
    assert math.prod(host.shape) * 4 == len(host.data)


small_call_values = st.one_of(
    st.none(), st.booleans(), st.integers(-20000, 20000),
    st.floats(allow_nan=False), st.text(max_size=150))


def _general_decode(data):
    """Decode through the general reader only (a memoryview skips the quick path)."""
    return decode(memoryview(data))


@given(st.one_of(small_call_values, st.lists(small_call_values, max_size=140)))
def test_quick_decode_round_trip(value):
    """The common small values of calls round-trip whether or not the quick path takes them."""
    encoded = encode(value)
    assert decode(encoded) == value
    quick = value_bytes.quick_decode(encoded)
    assert quick is value_bytes.MISS or encode(quick) == encoded


@given(st.one_of(st.binary(max_size=40),
                 st.lists(small_call_values, max_size=5).map(encode).flatmap(
                     lambda encoded: st.tuples(st.just(encoded), st.integers(0, len(encoded) - 1),
                                               st.integers(0, 255)).map(
                         lambda t: t[0][:t[1]] + bytes([t[2]]) + t[0][t[1] + 1:]))))
def test_quick_decode_agrees_with_general_path(data):
    """On any bytes the quick path either declines or gives what the general path gives."""
    quick = value_bytes.quick_decode(data)
    if quick is value_bytes.MISS:
        return
    general = _general_decode(data)
    assert encode(quick) == encode(general)
    # repr, not ==, where a NaN is inside: two NaNs never compare equal, even in lists.
    assert decode(data) == quick or repr(decode(data)) == repr(quick)


def test_quick_decode_declines_bad_utf8_and_truncation():
    """Invalid or truncated small encodings still raise CodecError (general path)."""
    for data in (b"\x01l\x01s\x01\xff", b"\x01l\x02i\x02", b"\x01i\x80", b"\x01", b"",
                 b"\x01l\x01f\x00\x00", b"\x01i\x02\x00"):
        assert value_bytes.quick_decode(data) is value_bytes.MISS
        with pytest.raises(CodecError):
            decode(data)


@given(st.one_of(st.integers(-0x2100, 0x2100),
                 st.lists(st.one_of(st.integers(-0x2100, 0x2100), st.booleans()), max_size=130)))
def test_quick_encode_matches_general_encoder(value):
    """Small ints and lists of them encode to the general encoder's bytes."""
    out = bytearray([values.VERSION])
    values._encode_into(value, out, 0, values.MAX_DEPTH)
    assert encode(value) == bytes(out)
    assert decode(encode(value)) == value


def test_quick_encode_respects_depth_limit():
    """A list still counts as nesting for max_depth=0 (the quick path steps aside)."""
    assert encode([], max_depth=0) == b"\x01l\x00"
    with pytest.raises(CodecError):
        encode([1], max_depth=0)
