"""
The codec of TVM's session protocol against TVM's own encoder, both ways.

- What TVM's real client (C{tvm.rpc.connect}) sends decodes to the values the
  test passed: a small in-test server speaks the handshake and the session
  start, answers lookups with a fake handle and records each call.
- What our encoder sends, a real C{python -m tvm.exec.rpc_server} reads:
  hypothesis-made arguments go to its C{testing.echo} and come back equal.
"""

import queue
import socket
import struct
import threading

import pytest
from hypothesis import given, settings, strategies as st

from tests.daemons import recv_exactly, tvm_rpc_server
from tvm_rpc.protocol import tvm_packets as packets
from tvm_rpc.protocol import tvm_values as tv
from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply
from tvm_rpc.protocol.values import DLDevice

#: Seconds any socket operation of these tests may block.
SOCKET_TIMEOUT = 30
#: Examples per live test: each is a round trip through a real TVM process.
LIVE = settings(max_examples=40, deadline=None)

int64s = st.integers(-(1 << 63), (1 << 63) - 1)
texts = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                max_size=40)
dtype_names = st.sampled_from(["float32", "int8", "uint16", "bool", "float32x4", "int64",
                               "bfloat16", "float64"])


def read_packet(sock):
    """@return: C{(code, body)} of the next packet on a blocking socket."""
    (size,) = struct.unpack("<Q", recv_exactly(sock, 8))
    body = recv_exactly(sock, size)
    return struct.unpack_from("<i", body)[0], body[4:]


def read_handshake(sock):
    """Read a client's handshake; @return: its key."""
    _, length = struct.unpack("<ii", recv_exactly(sock, 8))
    return recv_exactly(sock, length).decode()


class RecordingServer:
    """
    A stand-in for TVM's server on a thread: handshake, kInitServer, then
    every kGetGlobalFunc gets handle 1 and every kCallFunc's arguments are
    recorded (and answered with None).
    """

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(SOCKET_TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.calls = queue.Queue()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        conn, _ = self.listener.accept()
        self.conn = conn
        conn.settimeout(SOCKET_TIMEOUT)
        with conn:
            read_handshake(conn)
            conn.sendall(encode_reply(RPC_CODE_SUCCESS, "server:recorder"))
            while True:
                try:
                    code, body = read_packet(conn)
                except (ConnectionError, OSError):
                    return
                if code == packets.SHUTDOWN:
                    return
                if code == packets.CALL_FUNC:
                    self.calls.put(tv.decode_seq(body, 8)[0])
                    reply = [0, None]
                elif code == packets.GET_GLOBAL_FUNC:
                    reply = [tv.OpaquePtr(1)]
                else:
                    reply = [None]
                conn.sendall(packets.packet(packets.RETURN, tv.encode_seq(reply)))

    def close(self):
        """End the session from this side (TVM's client then sees the connection closed)."""
        self.conn.shutdown(socket.SHUT_RDWR)
        self.thread.join(SOCKET_TIMEOUT)
        self.listener.close()


@pytest.fixture(scope="module")
def tvm_client_call(tvm):
    """@return: C{call(*args)}: TVM's client calls a function with C{args}; gives what we decoded."""
    server = RecordingServer()
    remote = tvm.rpc.connect("127.0.0.1", server.port)
    function = remote.get_function("recorded")

    def call(*args):
        function(*args)
        return server.calls.get(timeout=SOCKET_TIMEOUT)

    call.device = remote.device
    yield call
    server.close()
    del call.device, function, remote


@LIVE
@given(st.lists(st.none() | st.booleans() | int64s | st.floats(allow_nan=False) | texts
                | st.binary(max_size=80), max_size=6))
def test_tvm_client_scalars_decoded(tvm_client_call, args):
    """Scalars, strings and bytes TVM's client sends (every encoding it picks) read back equal."""
    assert tvm_client_call(*args) == args


@LIVE
@given(dtype_names, st.sampled_from(["cpu", "cuda", "opencl", "vulkan"]), st.integers(0, 7))
def test_tvm_client_dtype_and_device_decoded(tvm_client_call, tvm, dtype, device, index):
    """A DataType and a (session's) Device from TVM's client read as the same values."""
    decoded = tvm_client_call(tvm.DataType(dtype), tvm_client_call.device(device, index))
    assert decoded == [tv.DataType.parse(dtype), DLDevice.named(device, index)]


class BlockingSession:
    """A minimal blocking client of TVM's protocol built on our codec (for the oracle tests)."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        self.sock.sendall(encode_handshake("client:"))
        code, length = struct.unpack("<ii", recv_exactly(self.sock, 8))
        assert code == RPC_CODE_SUCCESS
        recv_exactly(self.sock, length)
        self.sock.sendall(packets.init_server())
        assert self.reply() == [None]

    def reply(self):
        code, body = read_packet(self.sock)
        if code == packets.EXCEPTION:
            raise RuntimeError(tv.decode_seq(body)[0][0])
        assert code == packets.RETURN, code
        items, end = tv.decode_seq(body)
        assert end == len(body)
        return items

    def global_function(self, name):
        self.sock.sendall(packets.syscall(packets.GET_GLOBAL_FUNC, [name]))
        (handle,) = self.reply()
        return handle.value

    def call(self, handle, args):
        self.sock.sendall(packets.call_func(handle, args))
        return tv.call_return(self.reply())

    def close(self):
        self.sock.sendall(packets.SHUTDOWN_PACKET)
        self.sock.close()


@pytest.fixture(scope="module")
def tvm_echo(tvm):
    """@return: C{echo(value)}: a real TVM server's C{testing.echo} called with our encoding."""
    with tvm_rpc_server() as (_, port):
        session = BlockingSession(port)
        handle = session.global_function("testing.echo")
        assert handle != 0, "the TVM server has no testing.echo"
        yield lambda value: session.call(handle, [value])
        session.sock.sendall(packets.syscall(packets.FREE_HANDLE, [tv.OpaquePtr(handle)]))
        session.reply()
        session.close()


@LIVE
@given(st.none() | st.booleans() | int64s | st.floats(allow_nan=False) | texts
       | st.binary(max_size=80))
def test_echo_scalars_through_tvm_server(tvm_echo, value):
    """TVM's server decodes what we encode: its echo gives back the same value."""
    type_index, echoed, extra = tvm_echo(value)
    assert echoed == value and extra is None
    expected = {type(None): (tv.NONE,), bool: (tv.BOOL,), int: (tv.INT,),
                float: (tv.FLOAT,), str: (tv.SMALL_STR, tv.STR),
                bytes: (tv.SMALL_BYTES, tv.BYTES)}[type(value)]
    assert type_index in expected


@LIVE
@given(dtype_names, st.sampled_from(["cpu", "cuda", "opencl"]), st.integers(0, 7))
def test_echo_dtype_and_device_through_tvm_server(tvm_echo, dtype, device, index):
    """DataType (with its padding) and Device survive TVM's decoder and encoder."""
    assert tvm_echo(tv.DataType.parse(dtype)) == (tv.DATA_TYPE, tv.DataType.parse(dtype), None)
    assert tvm_echo(DLDevice.named(device, index)) == (
        tv.DEVICE, DLDevice.named(device, index), None)
