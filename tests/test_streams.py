"""Chunked transfers by stream id over AMP, in memory with iosim."""

import os
import shutil
import tempfile

from hypothesis import given, settings
from hypothesis import strategies as st
import pytest
from twisted.internet.defer import Deferred
from twisted.protocols import amp
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tvm_rpc.protocol import remote_error, session_commands
from tvm_rpc.protocol.stream_table import BytesSink, BytesSource, ISink, StreamTable
from tvm_rpc.protocol.streams import (
    StreamError,
    chunked,
    file_chunks,
    read_stream,
    receive_value,
    send_value,
    write_stream,
)
from tvm_rpc.server.workdir import FileSink, FileSource


pytestmark = pytest.mark.unit


class StreamServer(remote_error.RemoteErrorLocator, amp.AMP):
    """A minimal AMP peer that serves a L{StreamTable} (the session server does more)."""

    def __init__(self):
        """Start with an empty stream table."""
        super().__init__()
        self.table = StreamTable()
        self.writes_received = 0

    @session_commands.StreamWrite.responder
    def stream_write(self, stream, data):
        """Pass a chunk to the table; answer once it is consumed."""
        self.writes_received += 1
        result = self.table.write(stream, data)
        if isinstance(result, Deferred):
            return result.addCallback(lambda _: {})
        return {}

    @session_commands.StreamFinish.responder
    def stream_finish(self, stream):
        """End a write stream."""
        return {"size": self.table.finish(stream)}

    @session_commands.StreamRead.responder
    def stream_read(self, stream, offset, length):
        """Serve a chunk of a read stream."""
        return {"data": self.table.read(stream, offset, length)}

    @session_commands.StreamClose.responder
    def stream_close(self, stream):
        """Close a stream."""
        self.table.close(stream)
        return {}

    @session_commands.OpenValue.responder
    def open_value(self, size):
        """Open a value stream of the announced size."""
        return {"stream": self.table.open_sink(BytesSink(size, size))}


@implementer(ISink)
class SlowSink:
    """A sink that consumes a chunk only when the test says so."""

    def __init__(self):
        """Nothing consumed yet."""
        self.pending = []
        self.data = bytearray()
        self.cancelled = False

    def write(self, data):
        """Hold the chunk until L{release}."""
        d = Deferred()
        self.pending.append((d, bytes(data)))
        return d

    def release(self):
        """Consume the oldest held chunk."""
        d, data = self.pending.pop(0)
        self.data += data
        d.callback(None)

    def finish(self):
        """@return: the bytes consumed."""
        return len(self.data)

    def cancel(self):
        """Note the cancellation."""
        self.cancelled = True


def connect():
    """@return: (server, client, pump) connected in memory."""
    client, server, pump = connectedServerAndClient(StreamServer, amp.AMP)
    return server, client, pump


class StreamTransferTests(SynchronousTestCase):
    """write_stream / read_stream against a StreamTable through AMP."""

    def test_write_with_backpressure(self):
        """At most `window` writes are outstanding until the sink consumes."""
        server, client, pump = connect()
        sink = SlowSink()
        stream = server.table.open_sink(sink)
        data = os.urandom(10 * 1000)
        d = write_stream(client.callRemote, stream, chunked(data, 1000), window=3)
        pump.flush()
        self.assertEqual(server.writes_received, 3)
        self.assertEqual(len(sink.pending), 3)
        sink.release()
        pump.flush()
        self.assertEqual(server.writes_received, 4)
        while sink.pending:
            sink.release()
            pump.flush()
        self.assertEqual(self.successResultOf(d), len(data))
        self.assertEqual(bytes(sink.data), data)
        self.assertNotIn(stream, server.table)

    def test_write_cancel(self):
        """Cancelling a write closes the stream on the other end; the sink is cancelled."""
        server, client, pump = connect()
        sink = SlowSink()
        stream = server.table.open_sink(sink)
        d = write_stream(client.callRemote, stream, chunked(b"x" * 5000, 1000), window=2)
        pump.flush()
        d.cancel()
        pump.flush()
        self.failureResultOf(d)
        self.assertTrue(sink.cancelled)
        self.assertNotIn(stream, server.table)

    def test_read_window_and_order(self):
        """Reads keep `window` outstanding and deliver in order."""
        server, client, pump = connect()
        data = os.urandom(25 * 1000 + 7)
        stream = server.table.open_source(BytesSource(data))
        received = []
        d = read_stream(client.callRemote, stream, len(data), received.append,
                        window=4, chunk_size=1000)
        pump.flush()
        self.assertEqual(self.successResultOf(d), len(data))
        self.assertEqual(b"".join(received), data)
        self.assertEqual(max(len(c) for c in received), 1000)
        self.assertNotIn(stream, server.table)

    def test_read_consumer_backpressure_and_cancel(self):
        """A consumer returning a Deferred holds the reads; cancelling releases the stream."""
        server, client, pump = connect()
        stream = server.table.open_source(BytesSource(b"y" * 10000))
        held = Deferred()
        calls = []

        def consumer(chunk):
            """Record the chunk and hold the transfer."""
            calls.append(chunk)
            return held

        d = read_stream(client.callRemote, stream, 10000, consumer, window=2, chunk_size=1000)
        pump.flush()
        self.assertEqual(len(calls), 1)
        d.cancel()
        pump.flush()
        self.failureResultOf(d)
        self.assertNotIn(stream, server.table)

    def test_unknown_stream(self):
        """Writing or reading an unknown stream is a RemoteError; closing is harmless."""
        server, client, pump = connect()
        failures = []
        client.callRemote(session_commands.StreamWrite, stream=99, data=b"x").addErrback(failures.append)
        client.callRemote(session_commands.StreamRead, stream=99, offset=0, length=1).addErrback(
            failures.append
        )
        d3 = client.callRemote(session_commands.StreamClose, stream=99)
        pump.flush()
        self.assertEqual(len(failures), 2)
        for failure in failures:
            error = failure.trap(remote_error.RemoteError) and failure.value
            self.assertEqual(error.type_name, "tvm_rpc.protocol.streams.StreamError")
            self.assertIn("99", error.message)
            # No send_tracebacks on this protocol: type and message only.
            self.assertEqual(error.traceback_text, "")
        self.assertEqual(self.successResultOf(d3), {})

    def test_write_error_mid_window(self):
        """A chunk refused while others are outstanding fails the transfer, not the connection."""
        server, client, pump = connect()
        stream = server.table.open_sink(BytesSink(2500))
        d = write_stream(client.callRemote, stream, chunked(b"z" * 5000, 1000), window=4)
        pump.flush()
        error = self.failureResultOf(d, remote_error.RemoteError).value
        self.assertIn("exceeds", error.message)
        self.assertNotIn(stream, server.table)
        self.assertFalse(client.transport.disconnecting)
        d = client.callRemote(session_commands.StreamClose, stream=stream)
        pump.flush()
        self.assertEqual(self.successResultOf(d), {})

    def test_value_inline_and_streamed(self):
        """send_value inlines short values and streams long ones."""
        server, client, pump = connect()
        d = send_value(client.callRemote, b"short")
        pump.flush()
        self.assertEqual(self.successResultOf(d), {"args": b"short"})
        long_value = os.urandom(session_commands.MAX_INLINE_VALUE * 3 + 5)
        d = send_value(client.callRemote, long_value)
        pump.flush()
        stream = self.successResultOf(d)["args_stream"]
        self.assertEqual(server.table.take_finished(stream), long_value)
        self.assertNotIn(stream, server.table)

    def test_receive_value(self):
        """receive_value reads a result stream and releases it."""
        server, client, pump = connect()
        payload = os.urandom(200_000)
        stream = server.table.open_source(BytesSource(payload))
        d = receive_value(client.callRemote, {"result_stream": stream, "result_size": len(payload)})
        pump.flush()
        self.assertEqual(self.successResultOf(d), payload)
        self.assertNotIn(stream, server.table)
        self.assertEqual(self.successResultOf(receive_value(client.callRemote, {"result": b"r"})), b"r")


class BlobTests(SynchronousTestCase):
    """Chunks above one AMP value travel as several values of one box."""

    def round_trip(self, data):
        """Serialize a StreamWrite box and parse it back; @return: (box bytes, parsed data)."""
        box = session_commands.StreamWrite.makeArguments({"stream": 1, "data": data}, None)
        for key, value in box.items():
            self.assertLessEqual(len(value), 0xFFFF, key)
            self.assertLessEqual(len(key), 255)
        wire = box.serialize()
        parsed = session_commands.StreamWrite.parseArguments(amp.AmpBox(box), None)
        return wire, parsed

    def test_boundaries(self):
        """Lengths around the 65,535-byte value limit, and a full chunk, round-trip."""
        for length in (0, 1, 0xFFFE, 0xFFFF, 0x10000, 2 * 0xFFFF, 2 * 0xFFFF + 1,
                       session_commands.CHUNK_SIZE):
            data = os.urandom(length)
            _, parsed = self.round_trip(data)
            self.assertEqual(parsed["data"], data, length)
            self.assertEqual(parsed["stream"], 1)

    def test_memoryview_accepted(self):
        """Writers may pass memoryview slices (no copy before the box)."""
        data = os.urandom(200_000)
        _, parsed = self.round_trip(memoryview(data)[1000:150_000])
        self.assertEqual(parsed["data"], data[1000:150_000])


class StreamTableTests(SynchronousTestCase):
    """The table's checks, without a connection."""

    def test_chunk_limit(self):
        """A chunk above the limit is refused and the stream closed."""
        table = StreamTable(chunk_size=10)
        sink = BytesSink(100)
        stream = table.open_sink(sink)
        with self.assertRaises(StreamError):
            table.write(stream, b"x" * 11)
        self.assertNotIn(stream, table)

    def test_bytes_sink_limits(self):
        """A value stream refuses more than announced and fails short."""
        table = StreamTable()
        stream = table.open_sink(BytesSink(4, 4))
        table.write(stream, b"abc")
        with self.assertRaises(StreamError):
            table.finish(stream)
        stream = table.open_sink(BytesSink(4, 4))
        with self.assertRaises(StreamError):
            table.write(stream, b"abcde")

    def test_read_limits(self):
        """Reads beyond the chunk size or at negative offsets are refused."""
        table = StreamTable(chunk_size=10)
        stream = table.open_source(BytesSource(b"abc"))
        with self.assertRaises(StreamError):
            table.read(stream, 0, 11)
        with self.assertRaises(StreamError):
            table.read(stream, -1, 1)
        self.assertEqual(table.read(stream, 1, 10), b"bc")
        self.assertEqual(table.read(stream, 10, 10), b"")

    def test_file_sink_atomic_and_cancel(self):
        """A file appears only when finished; a cancelled one leaves nothing."""
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "f.bin")
        sink = FileSink(path, expected=6)
        sink.write(b"abc")
        self.assertFalse(os.path.exists(path))
        sink.write(b"def")
        self.assertEqual(sink.finish(), 6)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"abcdef")
        sink = FileSink(os.path.join(directory, "g.bin"))
        sink.write(b"abc")
        sink.cancel()
        self.assertEqual(os.listdir(directory), ["f.bin"])
        short = FileSink(os.path.join(directory, "h.bin"), expected=10)
        short.write(b"x")
        with self.assertRaises(StreamError):
            short.finish()
        self.assertEqual(os.listdir(directory), ["f.bin"])
        source = FileSource(path)
        self.assertEqual((source.size, source.read(2, 3)), (6, b"cde"))
        source.close()
        with self.assertRaises(StreamError):
            source.read(0, 1)

    def test_close_all(self):
        """close_all cancels sinks and releases sources."""
        table = StreamTable()
        sink = SlowSink()
        table.open_sink(sink)
        table.open_source(BytesSource(b"x"))
        table.close_all()
        self.assertTrue(sink.cancelled)
        self.assertEqual(len(table), 0)

    def test_interfaces(self):
        """The sinks and sources provide their interfaces."""
        from zope.interface.verify import verifyObject

        from tvm_rpc.protocol.stream_table import ISource

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        path = os.path.join(directory, "f")
        sink = FileSink(path)
        self.assertTrue(verifyObject(ISink, sink))
        sink.finish()
        self.assertTrue(verifyObject(ISink, BytesSink(1)))
        self.assertTrue(verifyObject(ISource, BytesSource(b"")))
        source = FileSource(path)
        self.assertTrue(verifyObject(ISource, source))
        source.close()

    def test_file_chunks(self):
        """file_chunks reads a file piecewise."""
        import io

        self.assertEqual(list(file_chunks(io.BytesIO(b"abcdefg"), 3)), [b"abc", b"def", b"g"])


@settings(max_examples=25)
@given(
    st.binary(max_size=5000),
    st.integers(1, 700),
    st.integers(1, 5),
    st.integers(1, 700),
)
def test_round_trip_any_chunking(data, write_chunk, window, read_chunk):
    """Any chunk size and window gives the same bytes both ways."""
    server, client, pump = connect()
    sink = BytesSink(len(data), len(data))
    stream = server.table.open_sink(sink)
    d = write_stream(client.callRemote, stream, chunked(data, write_chunk), window=window)
    pump.flush()
    results = []
    d.addCallback(results.append)
    assert results == [len(data)]
    assert sink.getvalue() == data
    source = server.table.open_source(BytesSource(data))
    received = []
    d = read_stream(client.callRemote, source, len(data), received.append,
                    window=window, chunk_size=read_chunk)
    pump.flush()
    assert b"".join(received) == data
