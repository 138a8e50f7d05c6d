"""Property tests of the tracker framing decoder and the command vocabulary."""

import json
import struct

from hypothesis import assume, given, strategies as st
import pytest

from tvm_rpc.protocol.tracker_commands import (
    Allocation,
    BadMessage,
    GetPendingMatchkeys,
    Ping,
    Put,
    Request,
    Stop,
    Summary,
    TrackerError,
    UpdateInfo,
    parse_tracker_message,
)
from tvm_rpc.protocol.constants import MAX_TRACKER_FRAME, RPC_TRACKER_MAGIC
from tvm_rpc.protocol.framing import WRONG_PORT_FOR_RPC, FrameDecoder, encode_frame, encode_magic
from tvm_rpc.protocol.handshake import WRONG_PORT_FOR_TRACKER, HandshakeDecoder, encode_handshake

pytestmark = pytest.mark.unit


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def split(data, cuts):
    """Cut C{data} at the given fractions."""
    points = sorted({int(c * len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


def feed_all(decoder, pieces):
    """@return: every value C{decoder} yields for C{pieces}, fed in order."""
    values = []
    for piece in pieces:
        values.extend(decoder.feed(piece))
    return values


@given(st.lists(json_values, max_size=8), st.lists(st.floats(0, 1), max_size=12))
def test_any_split_gives_the_same_values(values, cuts):
    """Any chunking of magic + frames decodes to the values encoded."""
    stream = encode_magic() + b"".join(encode_frame(v) for v in values)
    decoder = FrameDecoder()
    assert feed_all(decoder, split(stream, cuts)) == values
    assert decoder.error is None and decoder.greeted


@given(st.lists(json_values, max_size=4))
def test_byte_by_byte(values):
    """One byte at a time decodes the same as one chunk."""
    stream = encode_magic() + b"".join(encode_frame(v) for v in values)
    decoder = FrameDecoder()
    assert feed_all(decoder, [stream[i : i + 1] for i in range(len(stream))]) == values


@given(st.binary(max_size=300), st.booleans(), st.lists(st.floats(0, 1), max_size=6))
def test_garbage_never_raises(garbage, with_magic, cuts):
    """Random bytes, with or without the magic, never raise; an error is final."""
    data = (encode_magic() if with_magic else b"") + garbage
    decoder = FrameDecoder()
    for value in feed_all(decoder, split(data, cuts)):
        json.dumps(value)
    if decoder.error is not None:
        assert decoder.feed(encode_frame([1])) == []


@given(json_values, st.binary(min_size=1, max_size=50))
def test_good_frames_before_garbage_are_kept(value, tail):
    """A complete frame before garbage is still returned."""
    decoder = FrameDecoder()
    assert decoder.feed(encode_magic() + encode_frame(value) + tail)[:1] == [value]


@given(st.integers(-(2**31), 2**31 - 1).filter(lambda n: n != RPC_TRACKER_MAGIC))
def test_wrong_magic(magic):
    """Any other first int32 is refused as a wrong magic."""
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack("<i", magic) + encode_frame([1])) == []
    assert "magic" in decoder.error


def test_rpc_handshake_named():
    """The RPC handshake's magic on a tracker port is named as such, with where it belongs."""
    decoder = FrameDecoder()
    assert decoder.feed(encode_handshake("client:dev")) == []
    assert decoder.error == WRONG_PORT_FOR_RPC
    assert "this is a tracker" in decoder.error


def test_tracker_magic_named_on_rpc_ports():
    """The tracker's magic on a server or proxy port is named, and where it belongs."""
    decoder = HandshakeDecoder()
    assert decoder.feed(encode_magic())
    assert decoder.error == WRONG_PORT_FOR_TRACKER
    assert "tracker clients go to the tracker's port" in decoder.error


@given(st.one_of(st.integers(-(2**31), 0), st.integers(MAX_TRACKER_FRAME + 1, 2**31 - 1)))
def test_bad_lengths(length):
    """Zero, negative and over-1-MiB lengths are errors from the header alone."""
    decoder = FrameDecoder(expect_magic=False)
    assert decoder.feed(struct.pack("<i", length)) == []
    assert decoder.error is not None


def test_length_at_limit_waits_for_body():
    """Exactly 1 MiB is allowed: the decoder waits for the body."""
    decoder = FrameDecoder(expect_magic=False)
    assert decoder.feed(struct.pack("<i", MAX_TRACKER_FRAME)) == []
    assert decoder.error is None


@given(st.binary(min_size=1, max_size=40))
def test_bad_utf8_or_json(body):
    """A body that is not UTF-8 JSON is an error."""
    try:
        json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        pass
    else:
        assume(False)
    decoder = FrameDecoder(expect_magic=False)
    assert decoder.feed(struct.pack("<i", len(body)) + body) == []
    assert decoder.error is not None


def test_deep_nesting_is_an_error():
    """JSON nested past the recursion limit is an error, not a crash."""
    body = b"[" * 100000 + b"]" * 100000
    decoder = FrameDecoder(expect_magic=False)
    assert decoder.feed(struct.pack("<i", len(body)) + body) == []
    assert decoder.error is not None


names = st.text(min_size=1, max_size=20)
commands = st.one_of(
    st.builds(Ping),
    st.builds(Stop, names),
    st.builds(Put, names, st.integers(0, 65535), names, st.none() | names),
    st.builds(
        Request, names, st.text(max_size=8),
        st.integers(-100, 100) | st.floats(-1e6, 1e6, allow_nan=False),
        st.none() | st.floats(0.001, 1e6),
    ),
    st.builds(
        UpdateInfo,
        st.fixed_dictionaries(
            {"key": names, "addr": st.tuples(st.none() | names, st.integers(0, 65535)).map(list)}
        ),
    ),
    st.builds(Summary),
    st.builds(GetPendingMatchkeys),
)


@given(commands)
def test_commands_round_trip_through_frames(command):
    """Every command survives to_message -> frame -> parse_tracker_message."""
    decoder = FrameDecoder(expect_magic=False)
    (message,) = decoder.feed(encode_frame(command.to_message()))
    parsed = parse_tracker_message(message)
    assert parsed == command
    if isinstance(command, UpdateInfo):
        assert parsed.info == command.info


@given(json_values)
def test_parse_only_raises_bad_message(value):
    """Any JSON value either parses or raises BadMessage, nothing else."""
    try:
        parse_tracker_message(value)
    except BadMessage:
        pass


@given(st.integers(0, 7), st.lists(json_values, max_size=5))
def test_parse_arbitrary_arguments(code, arguments):
    """Known codes with arbitrary arguments parse or raise BadMessage."""
    try:
        parse_tracker_message([code, *arguments])
    except BadMessage:
        pass


def test_put_as_tvm_servers_send_it():
    """PUT with 3 elements and a string port (cpp_rpc) or a custom address."""
    assert parse_tracker_message([3, "k:x", ["9090", "k:x:0.1"]]) == Put("k:x", 9090, "k:x:0.1")
    assert parse_tracker_message([3, "k", [9090, "k:1"], "10.0.0.5"]).custom_addr == "10.0.0.5"


@given(names, st.integers(0, 65535), names)
def test_request_results_round_trip(host, port, matchkey):
    """REQUEST answers encode as TVM's and decode back; FAIL raises TrackerError."""
    allocation = Allocation(host, port, matchkey)
    wire = json.loads(json.dumps(Request.encode_result(allocation)))
    assert wire == [0, [host, port, matchkey]]
    assert Request.decode_result(wire) == allocation
    failed = json.loads(json.dumps(Request.encode_result("timed out")))
    assert failed == [-1, "timed out"]
    try:
        Request.decode_result(failed)
    except TrackerError as e:
        assert "timed out" in str(e)
    else:
        raise AssertionError("FAIL not raised")


def test_plain_replies():
    """The plain replies are TVM's integers and lists."""
    assert Ping.encode_result(None) == 0
    assert Stop.encode_result(True) == 0 and Stop.encode_result(False) == -1
    assert Summary.encode_result({"queue_info": {}}) == [0, {"queue_info": {}}]
    assert GetPendingMatchkeys.encode_result(iter(["a:1"])) == ["a:1"]
