"""The TVM engine and its protocol on in-memory transports with a fake clock."""

import struct

import pytest
from hypothesis import given, strategies as st
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tvm_rpc.client.engine import ISessionEngine
from tvm_rpc.client.rpc_session import RPCSession
from tvm_rpc.client.session_errors import SessionClosed, SessionTimeout
from tvm_rpc.client.tvm_engine import TVMEngine
from tvm_rpc.client.tvm_protocol import PACKET_SLACK, TVMClientProtocol
from tvm_rpc.protocol import tvm_packets as packets
from tvm_rpc.protocol import tvm_values as tv
from tvm_rpc.protocol.remote_error import RemoteError
from tvm_rpc.protocol.streams import ResultTooLarge
from tvm_rpc.protocol.values import DLDevice

pytestmark = pytest.mark.unit

CPU = DLDevice(1, 0)
F32 = tv.DataType.parse("float32")


class EngineTestBase(SynchronousTestCase):
    """A session on a TVM engine whose server is the test: it reads requests and answers."""

    max_result_size = 1 << 20
    chunk_size = 1 << 16

    def setUp(self):
        self.clock = Clock()
        self.transport = StringTransport()
        self.protocol = TVMClientProtocol(self.max_result_size + PACKET_SLACK)
        self.protocol.makeConnection(self.transport)
        self.engine = TVMEngine(self.protocol, self.clock)
        self.session = RPCSession(self.engine, chunk_size=self.chunk_size,
                                  max_result_size=self.max_result_size)
        self.decoder = packets.FrameDecoder(1 << 30)

    def requests(self):
        """@return: the packets written since the last call, as C{(code, body)}."""
        written = self.transport.value()
        self.transport.clear()
        return self.decoder.feed(written)

    def answer(self, *items, code=packets.RETURN):
        """Send one kReturn (or another code) with C{items}."""
        self.protocol.dataReceived(packets.packet(code, tv.encode_seq(list(items))))

    def raw(self, code, body=b""):
        self.protocol.dataReceived(packets.packet(code, body))

    def call_args(self, body):
        """@return: C{(handle, args)} of a kCallFunc body."""
        return struct.unpack_from("<Q", body)[0], tv.decode_seq(body, 8)[0]

    def lookup(self, name, pointer):
        """Expect one kGetGlobalFunc for C{name}; answer with C{pointer}."""
        [(code, body)] = self.requests()
        self.assertEqual((code, tv.decode_seq(body)[0]), (packets.GET_GLOBAL_FUNC, [name]))
        self.answer(tv.OpaquePtr(pointer))

    def function(self, name="f", pointer=0x100):
        """@return: a RemoteFunction looked up through the test server."""
        getting = self.session.get_function(name)
        self.lookup(name, pointer)
        return self.successResultOf(getting)

    def array(self, shape=(4,), pointer=0x5000):
        """@return: a RemoteArray allocated through the test server."""
        allocating = self.session.empty(shape, "float32")
        [(code, body)] = self.requests()
        self.assertEqual(code, packets.DEV_ALLOC_DATA)
        self.assertEqual(tv.decode_seq(body)[0], [CPU, 4 * shape[0], 64, F32])
        self.answer(tv.OpaquePtr(pointer))
        return self.successResultOf(allocating)


class CallTests(EngineTestBase):
    def test_interface(self):
        self.assertTrue(verifyObject(ISessionEngine, self.engine))
        self.assertEqual(self.session.protocol, "tvm")
        self.assertIs(self.session.connection, self.protocol)

    def test_pipelined_fifo(self):
        """Calls in flight together are written at once and answered in order."""
        f = self.function()
        first, second = f(1, "a"), f(2.5, b"xy")
        sent = self.requests()
        self.assertEqual([self.call_args(body) for _, body in sent],
                         [(0x100, [1, "a"]), (0x100, [2.5, b"xy"])])
        self.answer(tv.INT, 10)
        self.assertEqual(self.successResultOf(first), 10)
        self.assertNoResult(second)
        self.answer(tv.STR, "ok")
        self.assertEqual(self.successResultOf(second), "ok")

    def test_global_looked_up_once_per_name(self):
        """Calls by name share one kGetGlobalFunc; the pointer is freed at close."""
        first, second = self.session.call("g", 1), self.session.call("g", 2)
        self.lookup("g", 0x200)
        sent = self.requests()
        self.assertEqual([self.call_args(body) for _, body in sent],
                         [(0x200, [1]), (0x200, [2])])
        self.answer(tv.NONE, None)
        self.answer(tv.NONE, None)
        self.assertIsNone(self.successResultOf(first))
        third = self.session.call("g", 3)
        self.assertEqual([self.call_args(body) for _, body in self.requests()], [(0x200, [3])])
        self.answer(tv.INT, 3)
        self.assertEqual(self.successResultOf(third), 3)
        closing = self.session.close()
        sent = self.requests()
        self.assertEqual(sent, [(packets.FREE_HANDLE, tv.encode_seq([tv.OpaquePtr(0x200)])),
                                (packets.SHUTDOWN, b"")])
        self.assertFalse(self.transport.disconnecting)
        self.answer(None)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)
        self.successResultOf(closing)

    def test_close_frees_what_answers_in_flight_made(self):
        """close() waits for the answers in flight, frees all the session holds, then kShutdown."""
        array = self.array((4,), 0x5000)
        getting = self.session.get_function("late")
        self.requests()
        closing = self.session.close()
        array.close()  # after close() began: close() frees it
        self.clock.advance(0)
        self.assertEqual(self.requests(), [])
        self.answer(tv.OpaquePtr(0x333))
        late = self.successResultOf(getting)
        self.assertEqual(self.requests(), [
            (packets.DEV_FREE_DATA, tv.encode_seq([CPU, tv.OpaquePtr(0x5000)])),
            (packets.FREE_HANDLE, tv.encode_seq([tv.OpaquePtr(0x333)])),
            (packets.SHUTDOWN, b""),
        ])
        self.failureResultOf(late(), SessionClosed)
        self.answer(None)
        self.assertFalse(self.transport.disconnecting)
        self.answer(None)
        self.assertTrue(self.transport.disconnecting)
        self.protocol.connectionLost(None)
        self.successResultOf(closing)

    def test_close_drops_a_silent_server(self):
        """A server that never answers is dropped after the timeout."""
        self.function()
        closing = self.session.close(timeout=3)
        self.clock.advance(0)
        self.requests()
        self.clock.advance(3)
        self.assertTrue(self.transport.disconnecting or getattr(self.transport, "aborted", False))
        self.protocol.connectionLost(None)
        self.successResultOf(closing)

    def test_missing_function(self):
        """A null pointer is the same RemoteError as our server's missing function."""
        getting = self.session.get_function("nope")
        self.lookup("nope", 0)
        error = self.failureResultOf(getting, RemoteError).value
        self.assertEqual(error.short_type_name, "NoSuchFunction")
        self.assertIn("no global function named 'nope'", error.message)

    def test_remote_exception_keeps_session(self):
        f = self.function()
        failing, after = f(1), f(2)
        self.requests()
        self.answer("Traceback...\nValueError: bad value", code=packets.EXCEPTION)
        error = self.failureResultOf(failing, RemoteError).value
        self.assertEqual(error.type_name, "tvm.ValueError")
        self.assertIn("bad value", error.message)
        self.answer(tv.INT, 2)
        self.assertEqual(self.successResultOf(after), 2)

    def test_returned_objects_are_handles_and_freed(self):
        """A returned module, function and tensor become handles; closing them frees them."""
        f = self.function()
        module, function, tensor = f(), f(), f()
        self.requests()
        self.answer(tv.MODULE, tv.OpaquePtr(0x300))
        self.answer(tv.FUNCTION, tv.OpaquePtr(0x400))
        desc = tv.TensorDesc(0x900, CPU, (2, 3), F32)
        self.answer(tv.TENSOR, desc, tv.OpaquePtr(0x910))
        module, function, tensor = map(self.successResultOf, (module, function, tensor))
        self.assertEqual((tensor.shape, tensor.dtype), ((2, 3), "float32"))
        module.close(), function.close(), tensor.close()
        self.assertEqual(self.requests(), [])
        self.clock.advance(0)
        freed = [tv.decode_seq(body)[0] for code, body in self.requests()
                 if code == packets.FREE_HANDLE]
        self.assertEqual(freed, [[tv.OpaquePtr(0x300)], [tv.OpaquePtr(0x400)],
                                 [tv.OpaquePtr(0x910)]])

    def test_array_argument_is_its_descriptor(self):
        f = self.function()
        array = self.array((4,), 0x5000)
        calling = f(array, self.session.cpu(0))
        [(_, body)] = self.requests()
        self.assertEqual(self.call_args(body)[1],
                         [tv.TensorDesc(0x5000, CPU, (4,), F32), CPU])
        self.answer(tv.NONE, None)
        self.successResultOf(calling)
        array.close()
        self.clock.advance(0)
        self.assertEqual(self.requests(), [(packets.DEV_FREE_DATA,
                                            tv.encode_seq([CPU, tv.OpaquePtr(0x5000)]))])


class CancelTests(EngineTestBase):
    def test_cancelled_lookup_frees_its_pointer(self):
        """Cancelling mid-flight keeps the slot: the answer is read, freed, and the next call fits."""
        getting = self.session.get_function("f")
        self.requests()
        getting.cancel()
        self.failureResultOf(getting, CancelledError)
        f2 = self.session.get_function("g")
        self.requests()
        self.answer(tv.OpaquePtr(0x111))
        self.answer(tv.OpaquePtr(0x222))
        function = self.successResultOf(f2)
        self.assertEqual(function.name, "g")
        self.clock.advance(0)
        self.assertEqual(self.requests(),
                         [(packets.FREE_HANDLE, tv.encode_seq([tv.OpaquePtr(0x111)]))])

    def test_cancelled_call_frees_the_tensor_it_returned(self):
        f = self.function()
        calling, after = f(), f(5)
        self.requests()
        calling.cancel()
        self.failureResultOf(calling, CancelledError)
        self.answer(tv.TENSOR, tv.TensorDesc(0x900, CPU, (1,), F32), tv.OpaquePtr(0x910))
        self.answer(tv.INT, 5)
        self.assertEqual(self.successResultOf(after), 5)
        self.clock.advance(0)
        self.assertEqual(self.requests(),
                         [(packets.FREE_HANDLE, tv.encode_seq([tv.OpaquePtr(0x910)]))])

    def test_cancelled_read_keeps_the_stream_in_step(self):
        array = self.array((4,))
        self.engine._max_packet = 0  # no packet limit: known already
        reading = array.read()
        [(code, _)] = self.requests()
        self.assertEqual(code, packets.COPY_FROM_REMOTE)
        reading.cancel()
        self.failureResultOf(reading, CancelledError)
        f = self.session.call("after")
        self.raw(packets.COPY_ACK, b"\0" * 16)
        self.lookup("after", 0x700)
        self.requests()
        self.answer(tv.INT, 1)
        self.assertEqual(self.successResultOf(f), 1)


class EndingTests(EngineTestBase):
    def pending_call(self):
        f = self.function()
        calling = f()
        self.requests()
        return calling

    def test_unsolicited_shutdown(self):
        calling = self.pending_call()
        self.raw(packets.SHUTDOWN)
        error = self.failureResultOf(calling, SessionClosed).value
        self.assertIn("kShutdown", str(error))
        self.assertIn("pre-FFI", str(error))
        self.assertTrue(self.transport.disconnecting)
        self.failureResultOf(self.session.call("x"), SessionClosed)

    def test_session_timeout_notice(self):
        calling = self.pending_call()
        calling.addErrback(lambda failure: (self.session.closed, failure))
        self.answer("RPCSessionTimeoutError: Your 1.0s session has expired", code=packets.EXCEPTION)
        # The session reads as closed already when the call's failure arrives,
        # before the connection is gone.
        closed, failure = self.successResultOf(calling)
        self.assertTrue(closed)
        failure.trap(SessionTimeout)
        self.assertTrue(self.transport.disconnecting)

    def assert_broken(self, data, text):
        calling = self.pending_call()
        self.protocol.dataReceived(data)
        error = self.failureResultOf(calling, SessionClosed).value
        self.assertIn(text, str(error))
        self.assertTrue(self.transport.disconnecting)
        self.assertTrue(self.session.closed)

    def test_unknown_code(self):
        self.assert_broken(packets.packet(77, b""), "unknown code (code 77)")

    def test_unknown_type_index(self):
        self.assert_broken(packets.packet(packets.RETURN, struct.pack("<iiq", 2, 1, 0)
                                          + struct.pack("<i", 10)), "unknown type index 10")

    def test_copy_ack_of_wrong_size(self):
        array = self.array((4,))
        self.engine._max_packet = 0
        reading = array.read()
        self.requests()
        self.raw(packets.COPY_ACK, b"\0" * 15)
        self.assertIn("kCopyAck of 15 bytes where 16 were asked",
                      str(self.failureResultOf(reading, SessionClosed).value))

    def test_unsolicited_return(self):
        self.answer(None)
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("unsolicited kReturn", str(self.protocol.ending_error()))

    def test_frame_bound(self):
        """
        A reply longer than max_result_size fails its call on its length
        alone; its bytes are dropped unkept and the next answer fits.
        """
        f = self.function()
        big, after = f(), f()
        self.requests()
        size = self.max_result_size + PACKET_SLACK + 1
        self.protocol.dataReceived(struct.pack("<Q", size) + b"\0" * 1000)
        self.assertIn(f"answer has {size} bytes",
                      str(self.failureResultOf(big, ResultTooLarge).value))
        self.assertLess(self.protocol._decoder.buffered, 1)
        self.protocol.dataReceived(b"\0" * (size - 1000) + packets.packet(
            packets.RETURN, tv.encode_seq([tv.INT, 3])))
        self.assertEqual(self.successResultOf(after), 3)
        self.assertFalse(self.transport.disconnecting)

    def test_connection_lost(self):
        calling = self.pending_call()
        self.protocol.connectionLost(None)
        self.assertIn("connection was lost", str(self.failureResultOf(calling, SessionClosed).value))


class CopyTests(EngineTestBase):
    chunk_size = 64

    def serve_copies(self, array_bytes):
        """Answer every copy request written so far; @return: their C{(code, desc, n)}."""
        seen = []
        for code, body in self.requests():
            desc = tv.decode_seq(struct.pack("<ii", 1, tv.DL_TENSOR_PTR) + body)[0][0]
            size = struct.unpack_from("<Q", body, len(desc.encode()))[0]
            seen.append((code, desc, size))
            if code == packets.COPY_TO_REMOTE:
                data = body[len(desc.encode()) + 8:]
                array_bytes[desc.byte_offset:desc.byte_offset + size] = data
                self.answer(None)
            else:
                self.raw(packets.COPY_ACK, bytes(array_bytes[desc.byte_offset:
                                                             desc.byte_offset + size]))
        return seen

    def test_chunked_without_packet_limit_asked_once(self):
        array = self.array((40,))  # 160 bytes: chunks of 64, 64, 32
        data = bytes(range(160))
        writing = self.session._write_array(array, data)
        self.lookup("tvm.rpc.server.GetCRTMaxPacketSize", 0)
        remote = bytearray(160)
        seen = []
        while not writing.called:
            seen += self.serve_copies(remote)
        self.successResultOf(writing)
        self.assertEqual(bytes(remote), data)
        self.assertEqual([(d.byte_offset, d.shape, n) for _, d, n in seen],
                         [(0, (16,), 64), (64, (16,), 64), (128, (8,), 32)])
        reading = array.read()
        while not reading.called:
            self.assertTrue(self.serve_copies(remote))
        self.assertEqual(self.successResultOf(reading), data)

    def test_window_bounds_chunks_in_flight(self):
        self.session.window = 2
        array = self.array((64,))  # 256 bytes: 4 chunks
        self.engine._max_packet = 0
        writing = self.session._write_array(array, bytes(256))
        self.assertEqual(len(self.requests()), 2)
        self.answer(None)
        self.assertEqual(len(self.requests()), 1)

    def test_packet_limit_asked_once_by_copies_at_once(self):
        """Two copies starting together share the one question."""
        first, second = self.array((4,), 0x5000), self.array((4,), 0x6000)
        writing = [self.session._write_array(first, bytes(16)),
                   self.session._write_array(second, bytes(16))]
        self.lookup("tvm.rpc.server.GetCRTMaxPacketSize", 0)
        sent = self.requests()
        self.assertEqual([code for code, _ in sent], [packets.COPY_TO_REMOTE] * 2)
        self.answer(None)
        self.answer(None)
        for each in writing:
            self.successResultOf(each)

    def test_packet_limit_asked_once(self):
        array = self.array((40,))
        writing = self.session._write_array(array, bytes(160))
        self.lookup("tvm.rpc.server.GetCRTMaxPacketSize", 0x600)
        [(code, body)] = self.requests()
        self.assertEqual(self.call_args(body), (0x600, []))
        self.answer(tv.INT, 44 + 8 + 40)  # room for 40 bytes a chunk: 10 floats
        remote = bytearray(160)
        seen = []
        while not writing.called:
            seen += self.serve_copies(remote)
        self.assertEqual([n for _, _, n in seen], [40, 40, 40, 40])
        reading = array.read()
        while not reading.called:
            self.assertTrue(all(code == packets.COPY_FROM_REMOTE
                                for code, _, _ in self.serve_copies(remote)))
        self.assertEqual(len(self.successResultOf(reading)), 160)


@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=12),
       st.lists(st.integers(1, 64), max_size=4))
def test_any_cancels_keep_fifo_in_step(calls, cuts):
    """
    Calls in flight, any of them cancelled, answered in one stream cut
    anywhere: every call left gets its own answer, and every handle a
    cancelled call was given back is freed.

    @param calls: per call, C{(returns a function handle, cancelled)}.
    """
    case = EngineTestBase("run")
    case.setUp()
    f = case.function()
    pending = [f(index) for index in range(len(calls))]
    case.requests()
    for calling, (_, cancelled) in zip(pending, calls):
        if cancelled:
            calling.cancel()
            calling.addErrback(lambda failure: failure.trap(CancelledError))
    stream = b"".join(
        packets.packet(packets.RETURN, tv.encode_seq(
            [tv.FUNCTION, tv.OpaquePtr(0x1000 + index)] if handle else [tv.INT, index]))
        for index, (handle, _) in enumerate(calls))
    position = 0
    for cut in cuts + [len(stream)]:
        case.protocol.dataReceived(stream[position:position + cut])
        position += cut
    case.protocol.dataReceived(stream[position:])
    kept = []
    for index, (calling, (handle, cancelled)) in enumerate(zip(pending, calls)):
        if not cancelled:
            result = case.successResultOf(calling)
            if handle:
                kept.append(result)
                assert result.name.startswith("<function")
            else:
                assert result == index
    case.clock.advance(0)
    freed = [tv.decode_seq(body)[0][0].value for code, body in case.requests()
             if code == packets.FREE_HANDLE]
    assert freed == [0x1000 + index for index, (handle, cancelled) in enumerate(calls)
                     if handle and cancelled]
    assert not case.transport.disconnecting
