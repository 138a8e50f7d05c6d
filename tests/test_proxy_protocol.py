"""The proxy's connection adapter: handshakes, refusals, timeouts, pairing, closing."""

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tvm_rpc.protocol.constants import (
    INT32,
    RPC_CODE_DUPLICATE,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    RPC_MAGIC,
)
from tvm_rpc.protocol.handshake import MAX_KEY_LENGTH, encode_handshake, encode_reply
from tvm_rpc.proxy.pairing import IPeer, PairingPool
from tvm_rpc.proxy.protocol import ProxyFactory
from tvm_rpc.proxy.relay import IRelaySide


pytestmark = pytest.mark.unit


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records half-closes."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class ProxyConnectionTests(SynchronousTestCase):
    """L{ProxyConnection} over in-memory transports, with a fake clock."""

    def setUp(self):
        self.clock = Clock()
        self.pool = PairingPool(self.clock, timeout_client=30, timeout_server=30)
        self.factory = ProxyFactory(self.pool, self.clock, handshake_timeout=5, chunk_size=1024)
        self.port = 40000

    def connect(self):
        """@return: C{(protocol, transport)} for a new accepted connection."""
        self.port += 1
        address = IPv4Address("TCP", "127.0.0.1", self.port)
        protocol = self.factory.buildProtocol(address)
        transport = HalfCloseTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def test_interfaces(self):
        protocol, _ = self.connect()
        verifyObject(IPeer, protocol)
        verifyObject(IRelaySide, protocol)
        verifyObject(IHalfCloseableProtocol, protocol)

    def test_pair_and_relay_early_bytes(self):
        server, server_t = self.connect()
        client, client_t = self.connect()
        server.dataReceived(encode_handshake("server:k") + b"from-server-early")
        self.assertEqual(server_t.value(), b"")
        client.dataReceived(encode_handshake("client:k -timeout=3") + b"hello")
        self.assertEqual(
            server_t.value(),
            encode_reply(RPC_CODE_SUCCESS, "client:k -timeout=3") + b"hello",
        )
        self.assertEqual(
            client_t.value(), encode_reply(RPC_CODE_SUCCESS, "server:k") + b"from-server-early"
        )
        server_t.clear()
        client_t.clear()
        client.dataReceived(b"more")
        server.dataReceived(b"answer")
        self.assertEqual(server_t.value(), b"more")
        self.assertEqual(client_t.value(), b"answer")
        self.assertIs(server_t.producer, client_t)
        self.assertIs(client_t.producer, server_t)
        self.assertTrue(server_t.streaming and client_t.streaming)

    def test_handshake_byte_by_byte(self):
        server, server_t = self.connect()
        client, client_t = self.connect()
        for byte in encode_handshake("server:abc"):
            server.dataReceived(bytes([byte]))
        data = encode_handshake("client:abc") + b"xyz"
        for byte in data:
            client.dataReceived(bytes([byte]))
        self.assertEqual(server_t.value(), encode_reply(RPC_CODE_SUCCESS, "client:abc") + b"xyz")

    def test_wrong_magic(self):
        protocol, transport = self.connect()
        protocol.dataReceived(INT32.pack(0x1234) + b"rest")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.pool.waiting(), 0)

    def test_bad_key_lengths_close_at_once(self):
        for length in (0, -1, -(2**31), MAX_KEY_LENGTH + 1, 1 << 30):
            protocol, transport = self.connect()
            protocol.dataReceived(INT32.pack(RPC_MAGIC) + INT32.pack(length))
            self.assertTrue(transport.disconnecting, length)
            self.assertEqual(transport.value(), b"")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_non_utf8_key(self):
        protocol, transport = self.connect()
        protocol.dataReceived(INT32.pack(RPC_MAGIC) + INT32.pack(9) + b"server:\xff\xfe")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.waiting(), 0)

    def test_bad_prefix_and_empty_key(self):
        for key in ("abcdefgkey", "server:", "client:  ", "proxy:x"):
            protocol, transport = self.connect()
            protocol.dataReceived(encode_handshake(key))
            self.assertEqual(transport.value(), INT32.pack(RPC_CODE_MISMATCH), key)
            self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.waiting(), 0)

    def test_silent_peer_dropped(self):
        protocol, transport = self.connect()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnecting)

    def test_partial_handshake_dropped(self):
        protocol, transport = self.connect()
        protocol.dataReceived(encode_handshake("server:k")[:6])
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.waiting(), 0)

    def test_handshake_timer_cancelled(self):
        protocol, transport = self.connect()
        protocol.dataReceived(encode_handshake("server:k"))
        self.clock.advance(5)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.pool.waiting(), 1)
        self.clock.advance(25)
        self.assertEqual(transport.value(), INT32.pack(RPC_CODE_MISMATCH))
        self.assertTrue(transport.disconnecting)

    def test_duplicate(self):
        first, first_t = self.connect()
        second, second_t = self.connect()
        first.dataReceived(encode_handshake("client:k"))
        second.dataReceived(encode_handshake("client:k"))
        self.assertEqual(second_t.value(), INT32.pack(RPC_CODE_DUPLICATE))
        self.assertTrue(second_t.disconnecting)
        self.assertFalse(first_t.disconnecting)

    def test_close_while_waiting_leaves_pool(self):
        protocol, transport = self.connect()
        protocol.dataReceived(encode_handshake("server:k"))
        protocol.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.pool.waiting(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eof_while_waiting_leaves_pool(self):
        protocol, transport = self.connect()
        protocol.dataReceived(encode_handshake("server:k"))
        protocol.readConnectionLost()
        self.assertEqual(self.pool.waiting(), 0)
        self.assertTrue(transport.disconnecting)

    def test_early_bytes_keep_backpressure(self):
        """Early bytes that fill the partner's buffer leave their sender paused."""
        from test_relay import ModelTransport

        factory = ProxyFactory(self.pool, self.clock, chunk_size=1000)
        server = factory.buildProtocol(None)
        server_t = ModelTransport(1)
        server.makeConnection(server_t)
        server.dataReceived(encode_handshake("server:bp") + b"x" * 900)
        server.dataReceived(b"x" * 900)
        self.assertFalse(server_t.reading)
        client = factory.buildProtocol(None)
        client_t = ModelTransport(2)
        client_t.bufferSize = 1000
        client.makeConnection(client_t)
        client.dataReceived(encode_handshake("client:bp"))
        self.assertFalse(server_t.reading)
        self.assertEqual(client_t.take(1 << 20)[-1800:], b"x" * 1800)
        self.assertTrue(server_t.reading)

    def test_early_bytes_bounded(self):
        protocol, transport = self.connect()
        protocol.dataReceived(encode_handshake("server:k") + b"x" * 600)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"x" * 600)
        self.assertEqual(transport.producerState, "paused")
        client, client_t = self.connect()
        client.dataReceived(encode_handshake("client:k"))
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(client_t.value(), encode_reply(RPC_CODE_SUCCESS, "server:k") + b"x" * 1200)

    def pair(self):
        server, server_t = self.connect()
        client, client_t = self.connect()
        server.dataReceived(encode_handshake("server:k"))
        client.dataReceived(encode_handshake("client:k"))
        server_t.clear()
        client_t.clear()
        return server, server_t, client, client_t

    def test_half_close_passed_on(self):
        server, server_t, client, client_t = self.pair()
        client.dataReceived(b"request")
        client.readConnectionLost()
        self.assertTrue(server_t.write_closed)
        self.assertFalse(server_t.disconnecting)
        self.assertIsNone(server_t.producer)
        self.assertIs(client_t.producer, server_t)
        server.dataReceived(b"answer")
        self.assertEqual(client_t.value(), b"answer")
        client.readConnectionLost()
        server.writeConnectionLost()
        self.assertFalse(server_t.disconnecting)
        server.readConnectionLost()
        self.assertTrue(client_t.write_closed)
        client.writeConnectionLost()
        self.assertTrue(client_t.disconnecting)
        self.assertTrue(server_t.disconnecting)

    def test_connection_lost_closes_partner(self):
        server, server_t, client, client_t = self.pair()
        server.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(client_t.disconnecting)
        self.assertIsNone(client_t.producer)
        self.assertIsNone(server_t.producer)
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.pool.waiting(), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class WebSocketTests(SynchronousTestCase):
    """The ``/ws`` endpoint over in-memory transports (autobahn on both ends)."""

    def setUp(self):
        from twisted.internet.testing import MemoryReactorClock

        self.clock = MemoryReactorClock()
        self.pool = PairingPool(self.clock, timeout_client=30, timeout_server=30)
        self.tcp_factory = ProxyFactory(self.pool, self.clock, handshake_timeout=5)

    def websocket(self, path="/ws", first=b""):
        """@return: C{(client protocol, received messages, pump)} over iosim."""
        from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
        from twisted.test import iosim

        from tvm_rpc.proxy.web import ProxyWebSocketFactory

        received = []

        class Browser(WebSocketClientProtocol):
            def onOpen(self):
                if first:
                    self.sendMessage(first, isBinary=True)

            def onMessage(self, payload, isBinary):
                received.append((payload, isBinary))

        client_factory = WebSocketClientFactory(f"ws://127.0.0.1:8888{path}", reactor=self.clock)
        client_factory.protocol = Browser
        server = ProxyWebSocketFactory(self.pool, self.clock, 5).buildProtocol(None)
        client = client_factory.buildProtocol(None)
        pump = iosim.connect(server, iosim.FakeTransport(server, isServer=True),
                             client, iosim.FakeTransport(client, isServer=False),
                             clock=self.clock)
        pump.flush()
        return client, received, pump

    def tcp(self):
        protocol = self.tcp_factory.buildProtocol(None)
        transport = HalfCloseTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        protocol.makeConnection(transport)
        return protocol, transport

    def test_websocket_server_and_tcp_client(self):
        browser, received, pump = self.websocket(first=encode_handshake("server:web") + b"early")
        self.assertEqual(self.pool.waiting(), 1)
        client, client_t = self.tcp()
        client.dataReceived(encode_handshake("client:web") + b"hello")
        pump.flush()
        self.assertEqual(client_t.value(), encode_reply(RPC_CODE_SUCCESS, "server:web") + b"early")
        self.assertEqual(b"".join(p for p, _ in received),
                         encode_reply(RPC_CODE_SUCCESS, "client:web") + b"hello")
        self.assertTrue(all(binary for _, binary in received))
        browser.sendMessage(b"from the browser", isBinary=True)
        pump.flush()
        self.assertTrue(client_t.value().endswith(b"from the browser"))
        browser.sendClose(1000)
        pump.flush()
        self.assertTrue(client_t.disconnecting)

    def test_tcp_end_of_file_closes_the_websocket(self):
        browser, received, pump = self.websocket(first=encode_handshake("server:web"))
        client, client_t = self.tcp()
        client.dataReceived(encode_handshake("client:web"))
        client.readConnectionLost()
        pump.flush()
        self.assertEqual(browser.state, browser.STATE_CLOSED)

    def test_text_message_closes(self):
        browser, received, pump = self.websocket()
        browser.sendMessage(b"not binary", isBinary=False)
        pump.flush()
        self.assertEqual(browser.state, browser.STATE_CLOSED)
        self.assertEqual(self.pool.waiting(), 0)

    def test_other_path_refused(self):
        browser, received, pump = self.websocket(path="/other")
        self.assertNotEqual(browser.state, browser.STATE_OPEN)
        self.assertEqual(self.pool.waiting(), 0)

    def plain_http(self, request):
        """@return: what the websocket port answers to C{request} (raw bytes), and its transport."""
        from tvm_rpc.proxy.web import ProxyWebSocketFactory

        class TCPLike(StringTransport):
            def unregisterProducer(self):
                # As Twisted's TCP transport: autobahn unregisters on every drop.
                self.producer = None

        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = ProxyWebSocketFactory(self.pool, self.clock, 5).buildProtocol(address)
        transport = TCPLike(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        return transport.value(), transport

    def test_plain_get_says_what_the_port_is(self):
        """A browser's plain GET gets a 426 naming /ws, not autobahn's banner page."""
        answer, transport = self.plain_http(b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8888\r\n\r\n")
        head, _, body = answer.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 426 "), answer)
        self.assertIn(b"Upgrade: websocket", head)
        self.assertIn(b"Content-Length: %d" % len(body), head)
        self.assertIn(b"tvm_rpc proxy", body)
        self.assertIn(b"/ws", body)
        self.assertNotIn(b"Autobahn", answer)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.pool.waiting(), 0)

    def test_no_open_redirect(self):
        """autobahn's status page would 303 to any ?redirect= URL; this port does not."""
        answer, _ = self.plain_http(
            b"GET /?redirect=https%3A%2F%2Fexample.com%2F HTTP/1.1\r\nHost: 127.0.0.1:8888\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 426 "), answer)
        self.assertNotIn(b"Location", answer)

    def test_other_path_is_a_404_with_the_explanation(self):
        """A websocket to another path is refused with a 404 that names /ws."""
        answer, _ = self.plain_http(
            b"GET /other HTTP/1.1\r\nHost: 127.0.0.1:8888\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer)
        self.assertIn(b"/ws", answer.partition(b"\r\n\r\n")[2])

    def raw_websocket(self):
        """
        @return: C{(protocol, transport)}: the ``/ws`` endpoint upgraded over a
            StringTransport, for feeding it hand-made frames.
        """
        from tvm_rpc.proxy.web import ProxyWebSocketFactory

        address = IPv4Address("TCP", "127.0.0.1", 40000)
        protocol = ProxyWebSocketFactory(self.pool, self.clock, 5).buildProtocol(address)
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        protocol.dataReceived(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8888\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n")
        self.assertIn(b" 101 ", transport.value())
        transport.clear()
        return protocol, transport

    @staticmethod
    def frame_header(length):
        """A final binary frame's header from a client, with an all-zero mask (so the
        payload goes as it is)."""
        if length < 126:
            return bytes([0x82, 0x80 | length]) + bytes(4)
        if length < 65536:
            return bytes([0x82, 0x80 | 126]) + length.to_bytes(2, "big") + bytes(4)
        return bytes([0x82, 0x80 | 127]) + length.to_bytes(8, "big") + bytes(4)

    def test_frame_bytes_relayed_as_they_arrive(self):
        """A frame's payload is relayed piece by piece, before the frame is complete."""
        ws, ws_t = self.raw_websocket()
        handshake = encode_handshake("server:web")
        ws.dataReceived(self.frame_header(len(handshake)) + handshake)
        client, client_t = self.tcp()
        client.dataReceived(encode_handshake("client:web"))
        self.assertEqual(client_t.value(), encode_reply(RPC_CODE_SUCCESS, "server:web"))
        client_t.clear()
        payload = bytes(range(256)) * 4096
        ws.dataReceived(self.frame_header(len(payload)) + payload[:1000])
        self.assertEqual(client_t.value(), payload[:1000])
        ws.dataReceived(payload[1000:300000])
        self.assertEqual(client_t.value(), payload[:300000])
        ws.dataReceived(payload[300000:])
        self.assertEqual(client_t.value(), payload)
        self.assertEqual(ws.state, ws.STATE_OPEN)

    def test_message_larger_than_16_mib_relayed(self):
        """No message size limit: nothing is held per message, so none is needed."""
        ws, ws_t = self.raw_websocket()
        handshake = encode_handshake("server:web")
        ws.dataReceived(self.frame_header(len(handshake)) + handshake)
        client, client_t = self.tcp()
        client.dataReceived(encode_handshake("client:web"))
        client_t.clear()
        piece = b"\xab" * (1 << 20)
        ws.dataReceived(self.frame_header(20 << 20))
        for _ in range(20):
            ws.dataReceived(piece)
            self.assertFalse(ws.message_data)
        self.assertEqual(len(client_t.value()), 20 << 20)
        self.assertEqual(ws.state, ws.STATE_OPEN)
        client_t.clear()
        client.dataReceived(b"answer")
        self.assertIn(b"answer", ws_t.value())

    def test_silent_websocket_dropped(self):
        browser, received, pump = self.websocket()
        self.clock.advance(5)
        pump.flush()
        self.assertEqual(browser.state, browser.STATE_CLOSED)
