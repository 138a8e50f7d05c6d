"""The relay: byte-exact in both directions for any chunking, and bounded memory.

L{ModelTransport} mimics how Twisted's TCP transport buffers writes and
pauses its streaming producer (``abstract.FileDescriptor``), so the bound the
proxy promises can be checked without sockets: a fast sender and a slow
reader never make the proxy hold more than the transport's buffer limit plus
one read per direction.
"""

from hypothesis import given, settings, strategies as st
import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply
from tvm_rpc.proxy.pairing import PairingPool
from tvm_rpc.proxy.protocol import ProxyFactory
from tvm_rpc.proxy.relay import Relay


pytestmark = pytest.mark.unit


class ModelTransport:
    """
    An in-memory transport with Twisted's write-buffer and producer rules.

    @ivar buffer: bytes written and not yet taken by the remote reader.
    @ivar reading: whether the transport reads from its peer (not paused).
    @ivar peak: the largest C{len(buffer)} seen.
    """

    def __init__(self, port):
        self.buffer = bytearray()
        self.bufferSize = 65536
        self.producer = None
        self.streaming = None
        self.producer_paused = False
        self.reading = True
        self.peak = 0
        self.write_closed = False
        self.disconnecting = False
        self._peer = IPv4Address("TCP", "127.0.0.1", port)

    def getPeer(self):
        return self._peer

    def getHost(self):
        return IPv4Address("TCP", "127.0.0.1", 9090)

    def write(self, data):
        if self.write_closed:
            return
        self.buffer += data
        self.peak = max(self.peak, len(self.buffer))
        if self.producer is not None and self.streaming and len(self.buffer) > self.bufferSize:
            self.producer_paused = True
            self.producer.pauseProducing()

    def take(self, limit):
        """The remote reader takes up to C{limit} bytes; a drained buffer resumes the producer."""
        data = bytes(self.buffer[:limit])
        del self.buffer[:limit]
        if not self.buffer and self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        return data

    def registerProducer(self, producer, streaming):
        if self.producer is not None:
            raise RuntimeError("producer already registered")
        self.producer, self.streaming = producer, streaming

    def unregisterProducer(self):
        self.producer = None

    def pauseProducing(self):
        self.reading = False

    def resumeProducing(self):
        self.reading = True

    def stopProducing(self):
        self.loseConnection()

    def loseWriteConnection(self):
        self.write_closed = True

    def loseConnection(self):
        self.disconnecting = True


def paired(chunk_size=65536):
    """@return: C{(client, client_transport, server, server_transport)} relaying."""
    clock = Clock()
    factory = ProxyFactory(PairingPool(clock), clock, chunk_size=chunk_size)
    sides = []
    for port, key in ((1, "server:dev"), (2, "client:dev")):
        transport = ModelTransport(port)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(encode_handshake(key))
        sides.append((protocol, transport))
    (server, server_t), (client, client_t) = sides
    assert client_t.take(1 << 20) == encode_reply(RPC_CODE_SUCCESS, "server:dev")
    assert server_t.take(1 << 20) == encode_reply(RPC_CODE_SUCCESS, "client:dev")
    return client, client_t, server, server_t


def chunked(data, sizes):
    """Split C{data} into pieces of the given sizes (cycled), the last one what remains."""
    pieces, offset, index = [], 0, 0
    while offset < len(data):
        size = sizes[index % len(sizes)]
        pieces.append(data[offset : offset + size])
        offset += size
        index += 1
    return pieces


@settings(max_examples=60)
@given(
    up=st.binary(max_size=5000),
    down=st.binary(max_size=5000),
    up_sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    down_sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    take_sizes=st.lists(st.integers(1, 900), min_size=1, max_size=8),
    interleave=st.randoms(use_true_random=False),
)
def test_relay_is_byte_exact(up, down, up_sizes, down_sizes, take_sizes, interleave):
    """Bytes arrive whole and in order both ways, whatever the chunking and pacing."""
    client, client_t, server, server_t = paired(chunk_size=1000)
    up_pieces, down_pieces = chunked(up, up_sizes), chunked(down, down_sizes)
    got_up, got_down = bytearray(), bytearray()
    steps = 0
    while up_pieces or down_pieces or server_t.buffer or client_t.buffer:
        steps += 1
        assert steps < 100000
        move = interleave.randrange(4)
        take = take_sizes[steps % len(take_sizes)]
        if move == 0 and up_pieces and client_t.reading:
            client.dataReceived(up_pieces.pop(0))
        elif move == 1 and down_pieces and server_t.reading:
            server.dataReceived(down_pieces.pop(0))
        elif move == 2:
            got_up += server_t.take(take)
        else:
            got_down += client_t.take(take)
    assert bytes(got_up) == up
    assert bytes(got_down) == down


class BoundTests(SynchronousTestCase):
    """A slow reader never makes the proxy buffer more than its bound."""

    def test_slow_reader_bounded(self):
        chunk = 64 * 1024
        client, client_t, server, server_t = paired(chunk_size=chunk)
        total = 64 * 1024 * 1024
        block = bytes(range(256)) * (chunk // 256)
        sent = received = 0
        while received < total:
            while client_t.reading and sent < total:
                client.dataReceived(block)
                sent += len(block)
            data = server_t.take(4096)
            received += len(data)
        self.assertEqual(received, total)
        # At most the buffer limit plus one read sits in the proxy.
        self.assertLessEqual(server_t.peak, server_t.bufferSize + chunk)
        self.assertEqual(server_t.bufferSize, chunk)
        self.assertTrue(client_t.reading)

    def test_backpressure_both_ways(self):
        client, client_t, server, server_t = paired(chunk_size=1000)
        client.dataReceived(b"x" * 1500)
        self.assertFalse(client_t.reading)
        self.assertTrue(server_t.reading)
        server.dataReceived(b"y" * 1500)
        self.assertFalse(server_t.reading)
        server_t.take(1500)
        self.assertTrue(client_t.reading)
        client_t.take(1500)
        self.assertTrue(server_t.reading)

    def test_lost_side_unhooks_producers(self):
        client, client_t, server, server_t = paired()
        ended = []
        client._relay.on_end = lambda: ended.append(True)
        client.connectionLost(None)
        server.connectionLost(None)
        self.assertEqual(ended, [True])
        self.assertTrue(server_t.disconnecting)
        self.assertIsNone(server_t.producer)
        self.assertIsNone(client_t.producer)


class RelayUnitTests(SynchronousTestCase):
    """L{Relay} on its own."""

    def test_read_closed_reports_both_done(self):
        a_t, b_t = ModelTransport(1), ModelTransport(2)

        class Side:
            def __init__(self, transport):
                self.transport = transport
                self.sent = []
                self.finished = False
                self.closed = False

            def send(self, data):
                self.sent.append(data)

            def finish_sending(self):
                self.finished = True

            def close(self):
                self.closed = True

        a, b = Side(a_t), Side(b_t)
        relay = Relay(a, b)
        relay.start()
        relay.received(a, b"to-b")
        self.assertEqual(b.sent, [b"to-b"])
        self.assertFalse(relay.read_closed(a))
        self.assertTrue(b.finished)
        self.assertFalse(relay.read_closed(a))
        self.assertTrue(relay.read_closed(b))
        relay.lost(a)
        self.assertTrue(b.closed)
        relay.received(b, b"ignored")
        self.assertEqual(a.sent, [])


def test_splice_requested_on_in_memory_transports_stays_on_the_twisted_relay():
    """
    A factory asked to splice, on a clock that is no descriptor reactor and
    transports without sockets, couples the transports as producers and
    plans no hand-over.
    """
    clock = Clock()
    factory = ProxyFactory(PairingPool(clock), clock, chunk_size=1000, splice=True)
    transports = []
    for port, key in ((1, "server:dev"), (2, "client:dev")):
        transport = ModelTransport(port)
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(transport)
        protocol.dataReceived(encode_handshake(key))
        transports.append(transport)
    server_t, client_t = transports
    assert server_t.producer is client_t and client_t.producer is server_t
    relay = protocol._relay
    assert relay.splice and relay.spliced is None
    assert [call for call in clock.getDelayedCalls()
            if call.func == relay._begin_splice] == []
