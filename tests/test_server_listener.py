"""The server port's handshake, admission and in-process hand-off, in memory."""

import struct

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.protocol import Protocol
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from tvm_rpc.protocol.constants import RPC_CODE_MISMATCH, RPC_CODE_SUCCESS
from tvm_rpc.protocol.flavour import (
    MARKER,
    OUR_PROTOCOL,
    TVM_CLIENT_REFUSAL,
    TVM_PROTOCOL,
    client_key,
    reply_is_marked,
    server_key,
    tvm_exception_packet,
)
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient

from tvm_rpc.client.connect import (
    ClientHandshake,
    DuplicateKey,
    KeyMismatch,
    NotAnRpcServer,
)
from tvm_rpc.protocol.constants import RPC_CODE_DUPLICATE
from tvm_rpc.protocol.handshake import HandshakeDecoder, ReplyDecoder, encode_handshake, encode_reply
from tvm_rpc.server.gate import SessionGate
from tvm_rpc.server.listener import (
    InProcessRunner,
    ISessionRunner,
    ListenerFactory,
)


@implementer(ISessionRunner)
class RecordingRunner:
    """Keeps every hand-off for inspection."""

    def __init__(self, serves_tvm=False):
        self.handoffs = []
        self.sessions = []
        self.serves_tvm = serves_tvm

    def refusal(self, protocol):
        if protocol == TVM_PROTOCOL and not self.serves_tvm:
            return TVM_CLIENT_REFUSAL
        return None

    def start(self, handoff):
        self.handoffs.append(handoff)
        self.sessions.append(Recorder())
        handoff.carrier.switch_to(self.sessions[-1])


class Recorder(Protocol):
    """A session protocol that records what reaches it."""

    def __init__(self):
        self.data = b""
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason=None):
        self.lost = True


def keys(counter=iter(range(10**6))):
    """A deterministic matchkey maker."""
    return lambda key: f"{key}:{next(counter)}"


def connect(factory):
    """@return: C{(protocol, transport)} for one new in-memory connection."""
    transport = StringTransport()
    protocol = factory.buildProtocol(None)
    protocol.makeConnection(transport)
    return protocol, transport


def reply_of(transport):
    """@return: the L{ReplyDecoder} fed with what the server wrote."""
    decoder = ReplyDecoder()
    decoder.feed(transport.value())
    return decoder


class HandshakeTests(SynchronousTestCase):
    """Handshake outcomes with a recording runner."""

    def setUp(self):
        self.clock = Clock()
        self.gate = SessionGate("dev", max_sessions=1)
        self.runner = RecordingRunner()
        self.factory = ListenerFactory(self.gate, self.runner, self.clock, 5.0)

    def test_good_handshake(self):
        """A marked client with the right key is handed off with its timeout."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev", 7)) + b"early")
        [handoff] = self.runner.handoffs
        self.assertEqual(handoff.timeout, 7.0)
        self.assertEqual(handoff.rest, b"early")
        decoder = ReplyDecoder()
        decoder.feed(handoff.reply)
        self.assertEqual(decoder.code, RPC_CODE_SUCCESS)
        self.assertEqual(decoder.key, server_key("dev"))
        self.assertTrue(reply_is_marked(decoder.key))
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.gate.active, 1)

    def test_float_timeout_and_no_timeout(self):
        """``-timeout=`` may be a float; 0 or absent means none."""
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:dev -timeout=0.5" + MARKER))
        self.assertEqual(self.runner.handoffs[0].timeout, 0.5)
        self.runner.handoffs[0].slot.release()
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:dev -timeout=0" + MARKER))
        self.assertIsNone(self.runner.handoffs[1].timeout)

    def test_split_handshake(self):
        """A handshake arriving one byte at a time is served."""
        protocol, _ = connect(self.factory)
        for byte in encode_handshake(client_key("dev")):
            protocol.dataReceived(bytes([byte]))
        self.assertEqual(len(self.runner.handoffs), 1)

    def test_mismatch(self):
        """A wrong key gets MISMATCH and a closed connection."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("other")))
        self.assertEqual(transport.value(), struct.pack("<i", RPC_CODE_MISMATCH))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.runner.handoffs, [])
        self.assertEqual(self.gate.active, 0)

    def test_server_prefix_is_mismatch(self):
        """A server key on a server port is refused."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake("server:dev"))
        self.assertEqual(reply_of(transport).code, RPC_CODE_MISMATCH)

    def test_bad_timeout_is_mismatch(self):
        """An unreadable timeout is refused, not crashed on."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:dev -timeout=soon" + MARKER))
        self.assertEqual(reply_of(transport).code, RPC_CODE_MISMATCH)

    def test_wrong_magic(self):
        """Another protocol on the port is cut off at once."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_huge_key_length(self):
        """An announced 1 GiB key is refused without waiting for it."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(struct.pack("<ii", 0xFF271, 1 << 30))
        self.assertTrue(transport.disconnecting)

    def test_silent_peer_dropped(self):
        """A silent peer is dropped after the handshake timeout; others are served."""
        _, silent = connect(self.factory)
        self.clock.advance(4)
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev")))
        self.assertEqual(len(self.runner.handoffs), 1)
        self.clock.advance(1)
        self.assertTrue(silent.disconnecting)
        self.assertFalse(self.runner.handoffs[0].transport.disconnecting)

    def test_completed_handshake_has_no_timer(self):
        """The handshake timer stops once the handshake is complete."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev")))
        self.clock.advance(100)
        self.assertFalse(transport.disconnecting)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_tvm_client_refused_clearly(self):
        """A client without our mark (TVM's) gets TVM's exception packet."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:dev -timeout=3"))
        decoder = reply_of(transport)
        self.assertEqual(decoder.code, RPC_CODE_SUCCESS)
        self.assertEqual(decoder.rest, tvm_exception_packet(TVM_CLIENT_REFUSAL))
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.runner.handoffs, [])
        self.assertEqual(self.gate.active, 0)

    def test_tvm_client_handed_off_when_served(self):
        """A runner that runs TVM's protocol gets TVM's client with its protocol named."""
        self.runner.serves_tvm = True
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:dev -timeout=3"))
        self.assertEqual(transport.value(), b"")
        [handoff] = self.runner.handoffs
        self.assertEqual(handoff.protocol, TVM_PROTOCOL)
        self.assertEqual(handoff.timeout, 3)
        self.assertFalse(transport.disconnecting)

    def test_refusal_discards_and_waits_for_the_peer(self):
        """After a refusal, later bytes are discarded and the close is bounded in time."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:dev"))
        written = transport.value()
        protocol.dataReceived(b"\x15" + b"\x00" * 40)
        self.assertEqual(transport.value(), written)
        self.assertEqual(self.runner.handoffs, [])
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_busy_server_queues(self):
        """A second client waits for the slot, then gets it."""
        first, _ = connect(self.factory)
        first.dataReceived(encode_handshake(client_key("dev")))
        second, second_transport = connect(self.factory)
        second.dataReceived(encode_handshake(client_key("dev")) + b"x")
        self.assertEqual(len(self.runner.handoffs), 1)
        self.assertEqual(second_transport.producerState, "paused")
        self.runner.handoffs[0].slot.release()
        self.assertEqual(len(self.runner.handoffs), 2)
        self.assertEqual(self.runner.handoffs[1].rest, b"x")
        self.assertEqual(second_transport.producerState, "producing")

    def test_waiting_client_leaves(self):
        """A client that leaves while queued never gets a slot."""
        first, _ = connect(self.factory)
        first.dataReceived(encode_handshake(client_key("dev")))
        second, _ = connect(self.factory)
        second.dataReceived(encode_handshake(client_key("dev")))
        second.connectionLost(None)
        self.runner.handoffs[0].slot.release()
        self.assertEqual(len(self.runner.handoffs), 1)
        self.assertEqual(self.gate.active, 0)

    @given(st.lists(st.integers(min_value=1, max_value=40), max_size=20), st.binary(max_size=30))
    def test_any_chunking(self, cuts, extra):
        """Every split of handshake plus early bytes gives the same hand-off."""
        gate = SessionGate("dev", max_sessions=1)
        runner = RecordingRunner()
        factory = ListenerFactory(gate, runner, Clock(), 5.0)
        protocol, _ = connect(factory)
        data = encode_handshake(client_key("dev", 2)) + extra
        position = 0
        for cut in cuts:
            protocol.dataReceived(data[position : position + cut])
            position += cut
        protocol.dataReceived(data[position:])
        [handoff] = runner.handoffs
        self.assertEqual(handoff.rest + runner.sessions[0].data, extra)
        self.assertEqual(handoff.timeout, 2.0)


class TrackedGateTests(SynchronousTestCase):
    """With a tracker, only the offered matchkey opens a session, once."""

    def setUp(self):
        self.changes = []
        self.gate = SessionGate(
            "dev", tracked=True, new_matchkey=keys(), offer_changed=lambda: self.changes.append(1)
        )
        self.runner = RecordingRunner()
        self.factory = ListenerFactory(self.gate, self.runner, Clock(), 5.0)

    def test_offered_matchkey_once(self):
        """The offered matchkey works once; the plain key never does."""
        offered = self.gate.current_offer()
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev")))
        self.assertEqual(reply_of(transport).code, RPC_CODE_MISMATCH)
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key(offered)))
        self.assertEqual(len(self.runner.handoffs), 1)
        self.assertIsNone(self.gate.offered)
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key(offered)))
        self.assertEqual(reply_of(transport).code, RPC_CODE_MISMATCH)

    def test_release_offers_fresh_matchkey(self):
        """When the session ends a fresh matchkey is offered (a re-PUT)."""
        offered = self.gate.current_offer()
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key(offered)))
        self.assertEqual(self.changes, [])
        self.runner.handoffs[0].slot.release()
        self.assertEqual(self.changes, [1])
        self.assertNotIn(self.gate.offered, (None, offered))

    def test_concurrent_sessions_reoffer_at_once(self):
        """With free slots left, a fresh matchkey is offered as a session starts."""
        self.gate.max_sessions = 2
        offered = self.gate.current_offer()
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key(offered)))
        self.assertEqual(self.changes, [1])
        second = self.gate.offered
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key(second)))
        self.assertEqual(len(self.runner.handoffs), 2)
        self.assertIsNone(self.gate.offered)

    def test_tvm_client_burns_matchkey(self):
        """A refused TVM client's matchkey is replaced at once."""
        offered = self.gate.current_offer()
        protocol, _ = connect(self.factory)
        protocol.dataReceived(encode_handshake("client:" + offered))
        self.assertEqual(self.changes, [1])
        self.assertNotEqual(self.gate.offered, offered)


class InProcessRunnerTests(SynchronousTestCase):
    """``--no-fork``: the session protocol takes over the same transport."""

    def setUp(self):
        self.clock = Clock()
        self.gate = SessionGate("dev", max_sessions=1)
        self.sessions = []

        def make():
            self.sessions.append(Recorder())
            return self.sessions[-1]

        self.factory = ListenerFactory(self.gate, InProcessRunner(make, self.clock), self.clock)

    def test_switch(self):
        """The reply goes first; early and later bytes reach the session."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev")) + b"ab")
        protocol.dataReceived(b"cd")
        [session] = self.sessions
        self.assertIs(session.transport, transport)
        self.assertEqual(session.data, b"abcd")
        decoder = reply_of(transport)
        self.assertEqual(decoder.key, server_key("dev"))
        protocol.connectionLost(None)
        self.assertTrue(session.lost)
        self.assertEqual(self.gate.active, 0)

    def test_timeout_notice_then_close(self):
        """With a notice, the client is told why before the connection closes."""
        self.factory.runner.timeout_notice = lambda seconds: f"ended after {seconds:g}".encode()
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev", 3)))
        transport.clear()
        self.clock.advance(3)
        self.assertEqual(transport.value(), b"ended after 3")
        self.assertTrue(transport.disconnecting)
        self.clock.advance(1)
        self.assertTrue(transport.disconnected)

    def test_timeout_closes(self):
        """The session timeout closes the connection; the slot comes back."""
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev", 3)))
        self.clock.advance(2.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(transport.disconnected)
        protocol.connectionLost(None)
        self.assertEqual(self.gate.active, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])


    def test_max_session_time(self):
        """--max-session-time ends a session whose client asked for no timeout."""
        self.factory.runner.max_session_time = 5
        self.factory.runner.timeout_notice = lambda seconds: f"ended after {seconds:g}".encode()
        protocol, transport = connect(self.factory)
        protocol.dataReceived(encode_handshake(client_key("dev")))
        transport.clear()
        self.clock.advance(4.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.2)
        self.assertEqual(transport.value(), b"ended after 5")


class ClientHandshakeTests(SynchronousTestCase):
    """The client side of the handshake, and both sides together."""

    def shake(self, key="dev", timeout=0):
        protocol = ClientHandshake(key, timeout, "h:1")
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def test_sends_marked_key(self):
        """The handshake carries the key, the timeout and our mark."""
        _, transport = self.shake("dev:0.5", 10)
        decoder = HandshakeDecoder()
        decoder.feed(transport.value())
        self.assertEqual(decoder.key, "client:dev:0.5 -timeout=10" + MARKER)

    def test_success_switches(self):
        """A marked reply succeeds; later bytes reach the session protocol."""
        protocol, transport = self.shake()
        protocol.dataReceived(encode_reply(RPC_CODE_SUCCESS, server_key("dev")) + b"ab")
        self.assertEqual(self.successResultOf(protocol.done), b"ab")
        session = Recorder()
        protocol.switch_to(session, b"ab")
        protocol.dataReceived(b"cd")
        self.assertEqual(session.data, b"abcd")
        protocol.connectionLost(None)
        self.assertTrue(session.lost)

    def test_refusals(self):
        """Each refusal is its own clear error and closes the connection."""
        cases = [
            (encode_reply(RPC_CODE_MISMATCH), KeyMismatch, "does not accept key"),
            (encode_reply(RPC_CODE_DUPLICATE), DuplicateKey, "already in use"),
            (struct.pack("<i", 0x1234), NotAnRpcServer, "not an RPC server"),
        ]
        for reply, kind, text in cases:
            protocol, transport = self.shake()
            written = len(transport.value())
            protocol.dataReceived(reply)
            failure = self.failureResultOf(protocol.done, kind)
            self.assertIn(text, str(failure.value))
            # Closed cleanly, never reset (a reset kills TVM's accept thread).
            self.assertTrue(transport.disconnecting)
            self.assertFalse(getattr(transport, "aborted", False))
            self.assertEqual(transport.value()[written:], b"")

    def test_reply_tells_the_session_protocol(self):
        """A marked reply announces our session protocol, an unmarked one TVM's own."""
        for key, expected in [(server_key("dev"), OUR_PROTOCOL), ("server:dev", TVM_PROTOCOL)]:
            protocol, transport = self.shake()
            protocol.dataReceived(encode_reply(RPC_CODE_SUCCESS, key) + b"x")
            self.assertEqual(self.successResultOf(protocol.done), b"x")
            self.assertEqual(protocol.peer_protocol, expected)
            self.assertFalse(transport.disconnecting)

    def test_closed_during_handshake(self):
        """A peer that hangs up before replying gives NotAnRpcServer."""
        protocol, _ = self.shake()
        protocol.dataReceived(b"\x71")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(protocol.done, NotAnRpcServer)

    def test_against_our_listener(self):
        """Our client and our listener agree over an in-memory connection."""
        clock = Clock()
        gate = SessionGate("", max_sessions=1)
        runner = RecordingRunner()
        factory = ListenerFactory(gate, runner, clock)
        client = ClientHandshake("", 5, "h:1")
        client, _, pump = connectedServerAndClient(
            lambda: factory.buildProtocol(None), lambda: client, greet=False
        )
        pump.flush()
        [handoff] = runner.handoffs
        self.assertEqual(handoff.timeout, 5.0)
        handoff.transport.write(handoff.reply + b"hello")
        pump.flush()
        self.assertEqual(self.successResultOf(client.done), b"hello")
