"""``--through-proxy``: the link to the proxy, in memory."""

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tvm_rpc.protocol.constants import RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH, RPC_CODE_SUCCESS
from tvm_rpc.protocol.flavour import TVM_CLIENT_REFUSAL, TVM_PROTOCOL, client_key, server_key, tvm_exception_packet
from tvm_rpc.protocol.handshake import HandshakeDecoder, encode_reply
from tvm_rpc.server.gate import SessionGate
from tvm_rpc.server.listener import ISessionRunner
from tvm_rpc.server.proxied import ProxyLink


pytestmark = pytest.mark.unit


@implementer(ISessionRunner)
class RecordingRunner:
    def __init__(self):
        self.handoffs = []

    def refusal(self, protocol):
        return TVM_CLIENT_REFUSAL if protocol == TVM_PROTOCOL else None

    def start(self, handoff):
        self.handoffs.append(handoff)


class FakeEndpoint:
    """Connects to StringTransports; can refuse."""

    def __init__(self):
        self.refuse = False
        self.connections = []

    def connect(self, factory):
        if self.refuse:
            return defer.fail(ConnectionRefusedError())
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.connections.append((protocol, transport))
        return defer.succeed(protocol)


class ProxyLinkTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.gate = SessionGate("board", max_sessions=1)
        self.runner = RecordingRunner()
        self.link = ProxyLink(self.endpoint, self.gate, self.runner, self.clock, proxy="p")
        self.link.startService()
        self.addCleanup(self.link.stopService)

    def latest(self):
        return self.endpoint.connections[-1]

    def lose(self, protocol):
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_presents_marked_server_key(self):
        _, transport = self.latest()
        decoder = HandshakeDecoder()
        decoder.feed(transport.value())
        self.assertEqual(decoder.key, server_key("board"))

    def test_session_then_reconnect(self):
        """A paired client becomes a session; its end brings a new connection."""
        protocol, _ = self.latest()
        protocol.dataReceived(encode_reply(RPC_CODE_SUCCESS, client_key("board", 7)) + b"x")
        [handoff] = self.runner.handoffs
        self.assertEqual((handoff.timeout, handoff.rest, handoff.reply), (7.0, b"x", b""))
        self.assertEqual(len(self.endpoint.connections), 1)
        handoff.slot.release()
        self.clock.advance(0)
        self.assertEqual(len(self.endpoint.connections), 2)
        self.assertEqual(self.gate.active, 0)

    def test_mismatch_reconnects_at_once(self):
        """The proxy's timeout (MISMATCH) means: wait again, at once."""
        protocol, transport = self.latest()
        protocol.dataReceived(encode_reply(RPC_CODE_MISMATCH))
        self.assertTrue(transport.disconnecting)
        self.lose(protocol)
        self.clock.advance(0)
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_errors_back_off(self):
        """Refused connections and DUPLICATE are retried with growing delays."""
        protocol, _ = self.latest()
        self.endpoint.refuse = True
        protocol.dataReceived(encode_reply(RPC_CODE_DUPLICATE))
        self.lose(protocol)
        self.clock.advance(0.5)
        self.clock.advance(1.0)
        self.assertEqual(self.link.attempts, 3)
        self.clock.advance(1.9)
        self.assertEqual(self.link.attempts, 3)
        self.endpoint.refuse = False
        self.clock.advance(0.1)
        self.assertEqual(self.link.attempts, 4)
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_tvm_client_refused(self):
        """A client without our mark gets TVM's exception packet; the link waits again."""
        protocol, transport = self.latest()
        protocol.dataReceived(encode_reply(RPC_CODE_SUCCESS, "client:board -timeout=3"))
        self.assertTrue(transport.value().endswith(tvm_exception_packet(TVM_CLIENT_REFUSAL)))
        self.assertEqual(self.runner.handoffs, [])
        self.lose(protocol)
        self.clock.advance(0)
        self.assertEqual(len(self.endpoint.connections), 2)

    def test_stop(self):
        """Once stopped, nothing reconnects."""
        protocol, _ = self.latest()
        self.link.stopService()
        self.lose(protocol)
        self.clock.advance(10)
        self.assertEqual(len(self.endpoint.connections), 1)


class WrongPeerTests(SynchronousTestCase):
    """A --through-proxy server pointed at something that is not a proxy says so."""

    setUp = ProxyLinkTests.setUp
    latest = ProxyLinkTests.latest
    lose = ProxyLinkTests.lose

    def events(self):
        from twisted.logger import formatEvent, globalLogPublisher

        seen = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        return lambda: " | ".join(formatEvent(e) for e in seen)

    def test_tracker_magic_answer(self):
        """An answer with the tracker's magic names the mistake; closed, not reset."""
        from tvm_rpc.protocol.constants import INT32, RPC_TRACKER_MAGIC

        text = self.events()
        protocol, transport = self.latest()
        protocol.dataReceived(INT32.pack(RPC_TRACKER_MAGIC))
        self.assertIn("p is not an RPC proxy: it answered 0x2f271, the tracker's magic", text())
        self.assertFalse(getattr(transport, "aborted", False))
        self.assertTrue(transport.disconnecting)

    def test_closed_without_answer(self):
        """A peer that closes at once without answering is named, and 'waiting' is said once."""
        text = self.events()
        for _ in range(3):
            protocol, _ = self.latest()
            self.lose(protocol)
            self.clock.advance(10)
        self.assertEqual(len(self.endpoint.connections), 4)
        self.assertIn("p closed the connection without answering our handshake (1 times so far)",
                      text())
        self.assertNotIn("(2 times so far)", text())
        self.assertNotIn("waiting at p", text())

    def test_proxy_back_after_a_restart_is_said(self):
        """
        A proxy killed while we waited (our connection closed unanswered),
        then down a while and back: waiting there is said again.
        """
        text = self.events()
        protocol, _ = self.latest()
        self.lose(protocol)
        self.endpoint.refuse = True
        self.clock.advance(10)
        self.endpoint.refuse = False
        self.clock.advance(10)
        self.assertIn("waiting at p", text())

    def test_proxy_giving_up_late_is_not_suspect(self):
        """A proxy that closes a long-waiting server is not mistaken for a tracker."""
        text = self.events()
        protocol, _ = self.latest()
        self.clock.advance(600)
        self.lose(protocol)
        self.assertNotIn("without answering", text())
