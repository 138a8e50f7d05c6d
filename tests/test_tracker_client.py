"""In-memory tests of the tracker client: the protocol adapter and TrackerSession."""

import importlib

from hypothesis import given
from hypothesis import strategies as st
import pytest
from twisted.internet import defer, error
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.client import (
    Allocation,
    TrackerClientFactory,
    TrackerClientProtocol,
    TrackerError,
    TrackerSession,
    connect_tracker,
)
from tvm_rpc.client import tracker as tracker_module
from tvm_rpc.client.tracker import AllocationTimeout, NotATracker, tracker_endpoint
from tvm_rpc.protocol.tracker_commands import (
    BadMessage,
    GetPendingMatchkeys,
    Ping,
    Put,
    Request,
    Summary,
    parse_tracker_message,
)
from tvm_rpc.protocol.constants import INT32
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame, encode_magic

pytestmark = pytest.mark.unit


MAGIC = encode_magic()


class WriteRecorder(StringTransport):
    """A StringTransport that also keeps each write apart."""

    def __init__(self):
        super().__init__()
        self.writes = []

    def write(self, data):
        self.writes.append(data)
        super().write(data)


def connected():
    """@return: a connected protocol and its transport."""
    protocol = TrackerClientProtocol()
    transport = WriteRecorder()
    protocol.makeConnection(transport)
    return protocol, transport


def greeted():
    """@return: a protocol whose magic the tracker echoed, and its transport."""
    protocol, transport = connected()
    protocol.dataReceived(MAGIC)
    transport.clear()
    transport.writes.clear()
    return protocol, transport


def sent_messages(data):
    """Decode the frames a client wrote after its magic."""
    decoder = FrameDecoder(expect_magic=False)
    messages = decoder.feed(data)
    assert decoder.error is None
    return messages


class ProtocolTests(SynchronousTestCase):
    """The adapter between a tracker connection and Deferreds."""

    def test_sends_magic_and_fires_ready_on_echo(self):
        protocol, transport = connected()
        self.assertEqual(transport.value(), MAGIC)
        self.assertNoResult(protocol.ready)
        protocol.dataReceived(MAGIC[:2])
        self.assertNoResult(protocol.ready)
        protocol.dataReceived(MAGIC[2:])
        self.assertIs(self.successResultOf(protocol.ready), protocol)

    def test_wrong_magic_fails_ready_and_closes(self):
        protocol, transport = connected()
        protocol.dataReceived(b"HTTP/1.1 400 Bad Request\r\n")
        failure = self.failureResultOf(protocol.ready, NotATracker)
        self.assertIn("not an RPC tracker", str(failure.value))
        self.assertTrue(transport.disconnecting)

    def test_giving_up_on_ready_closes_cleanly(self):
        """
        Cancelling C{ready} (a handshake timeout) closes the connection without
        a reset: the peer may be a TVM daemon whose accept thread a reset kills.
        """
        protocol, transport = connected()
        protocol.ready.cancel()
        self.failureResultOf(protocol.ready, defer.CancelledError)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(transport.disconnected, "aborted (reset), not closed")

    def test_call_before_ready_is_sent_after_echo_in_one_write(self):
        protocol, transport = connected()
        first = protocol.call(Ping())
        second = protocol.call(Summary())
        self.assertEqual(transport.value(), MAGIC)
        transport.writes.clear()
        protocol.dataReceived(MAGIC)
        self.assertEqual(len(transport.writes), 1)
        self.assertEqual(sent_messages(transport.writes[0]), [[1], [6]])
        self.assertNoResult(first)
        self.assertNoResult(second)

    def test_part_of_a_reply_is_acknowledged_at_once(self):
        """
        A reply's length without its body gets an immediate ACK: TVM's
        tracker sends the body only once the length is acknowledged (Nagle).
        """
        acked = []
        self.patch(tracker_module, "quick_ack", acked.append)
        protocol, transport = greeted()
        answer = protocol.call(Ping())
        frame = encode_frame(0)
        protocol.dataReceived(frame[:4])
        self.assertEqual(acked, [transport])
        protocol.dataReceived(frame[4:])
        self.assertIsNone(self.successResultOf(answer))
        self.assertEqual(acked, [transport])

    def test_call_before_connection_is_queued(self):
        protocol = TrackerClientProtocol()
        result = protocol.call(Ping())
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.value(), MAGIC)
        protocol.dataReceived(MAGIC + encode_frame(0))
        self.assertIsNone(self.successResultOf(result))
        self.assertEqual(sent_messages(transport.value()[4:]), [[1]])

    def test_each_call_is_one_write(self):
        protocol, transport = greeted()
        protocol.call(Put("k", 9000, "k:0.1"))
        self.assertEqual(len(transport.writes), 1)
        self.assertEqual(sent_messages(transport.writes[0]), [[3, "k", [9000, "k:0.1"], None]])

    def test_replies_are_matched_first_in_first_out(self):
        protocol, transport = greeted()
        ping = protocol.call(Ping())
        summary = protocol.call(Summary())
        pending = protocol.call(GetPendingMatchkeys())
        body = {"queue_info": {}, "server_info": []}
        protocol.dataReceived(encode_frame(0) + encode_frame([0, body]) + encode_frame(["a:1"]))
        self.assertIsNone(self.successResultOf(ping))
        self.assertEqual(self.successResultOf(summary), body)
        self.assertEqual(self.successResultOf(pending), ["a:1"])

    def test_replies_split_byte_by_byte(self):
        protocol, transport = connected()
        calls = [protocol.call(Ping()), protocol.call(GetPendingMatchkeys())]
        stream = MAGIC + encode_frame(0) + encode_frame(["x:2", "y:3"])
        for i in range(len(stream)):
            protocol.dataReceived(stream[i:i + 1])
        self.assertIsNone(self.successResultOf(calls[0]))
        self.assertEqual(self.successResultOf(calls[1]), ["x:2", "y:3"])

    def test_fail_reply_errbacks_and_keeps_the_connection(self):
        protocol, transport = greeted()
        request = protocol.call(Request("k"))
        protocol.dataReceived(encode_frame([-1, "no server in time"]))
        failure = self.failureResultOf(request, TrackerError)
        self.assertIn("no server in time", str(failure.value))
        self.assertFalse(transport.disconnecting)
        ping = protocol.call(Ping())
        protocol.dataReceived(encode_frame(0))
        self.assertIsNone(self.successResultOf(ping))

    def test_bad_reply_closes_and_fails_everything_outstanding(self):
        protocol, transport = greeted()
        first = protocol.call(Summary())
        second = protocol.call(Ping())
        closed = protocol.when_closed()
        protocol.dataReceived(encode_frame("not a summary") + encode_frame(0))
        self.failureResultOf(first, BadMessage)
        self.assertTrue(transport.disconnecting)
        # The reply after the violation is not trusted.
        self.assertNoResult(second)
        self.failureResultOf(protocol.call(Ping()), BadMessage)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(second, error.ConnectionDone)
        self.assertIsNone(self.successResultOf(closed))

    def test_unsolicited_reply_closes(self):
        protocol, transport = greeted()
        protocol.dataReceived(encode_frame(0))
        self.assertTrue(transport.disconnecting)

    def test_bad_frame_closes(self):
        protocol, transport = greeted()
        ping = protocol.call(Ping())
        protocol.dataReceived(INT32.pack(-5))
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(ping, error.ConnectionDone)

    def test_connection_lost_fails_outstanding_calls(self):
        protocol, transport = greeted()
        calls = [protocol.call(Ping()), protocol.call(Request("k"))]
        protocol.connectionLost(Failure(error.ConnectionLost()))
        for call in calls:
            self.failureResultOf(call, error.ConnectionLost)
        self.failureResultOf(protocol.call(Ping()), error.ConnectionLost)

    def test_connection_lost_before_echo_fails_ready_and_queued_calls(self):
        protocol, transport = connected()
        queued = protocol.call(Ping())
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.failureResultOf(protocol.ready, error.ConnectionDone)
        self.failureResultOf(queued, error.ConnectionDone)

    def test_when_closed(self):
        protocol, transport = greeted()
        waiting = protocol.when_closed()
        self.assertNoResult(waiting)
        protocol.close()
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(error.ConnectionDone()))
        self.assertIsNone(self.successResultOf(waiting))
        self.assertIsNone(self.successResultOf(protocol.when_closed()))

    def test_cancelled_call_drops_its_reply(self):
        protocol, transport = greeted()
        first = protocol.call(GetPendingMatchkeys())
        second = protocol.call(GetPendingMatchkeys())
        first.cancel()
        self.failureResultOf(first, defer.CancelledError)
        self.assertFalse(transport.disconnecting)
        protocol.dataReceived(encode_frame(["first"]) + encode_frame(["second"]))
        self.assertEqual(self.successResultOf(second), ["second"])

    def test_cancelled_request_closes_the_connection(self):
        protocol, transport = greeted()
        request = protocol.call(Request("k"))
        request.cancel()
        self.failureResultOf(request, defer.CancelledError)
        self.assertTrue(transport.disconnecting)

    def test_factory_builds_the_protocol(self):
        protocol = TrackerClientFactory().buildProtocol(None)
        self.assertIsInstance(protocol, TrackerClientProtocol)

    @given(
        replies=st.lists(
            st.one_of(
                st.just(0),
                st.lists(st.text(max_size=8), max_size=3),
            ),
            min_size=1,
            max_size=6,
        ),
        cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
    )
    def test_any_split_of_the_replies_gives_the_same_results(self, replies, cuts):
        protocol, transport = connected()
        calls = [
            protocol.call(Ping() if reply == 0 else GetPendingMatchkeys())
            for reply in replies
        ]
        stream = MAGIC + b"".join(encode_frame(reply) for reply in replies)
        points = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
        for start, end in zip(points, points[1:]):
            protocol.dataReceived(stream[start:end])
        results = [self.successResultOf(call) for call in calls]
        self.assertEqual(results, [None if r == 0 else r for r in replies])
        self.assertFalse(transport.disconnecting)


class FakeTracker(Protocol):
    """
    A scripted tracker: echoes the magic, answers PING and SUMMARY at once and
    holds each REQUEST until the test answers it.
    """

    def __init__(self, summary=None):
        self.decoder = FrameDecoder()
        self.summary = summary or {"queue_info": {}, "server_info": []}
        self.messages = []
        self.requests = []
        self.lost = False

    def dataReceived(self, data):
        greeted = self.decoder.greeted
        values = self.decoder.feed(data)
        if not greeted and self.decoder.greeted:
            self.transport.write(MAGIC)
        for value in values:
            self.messages.append(value)
            command = parse_tracker_message(value)
            if isinstance(command, Request):
                self.requests.append(command)
            elif isinstance(command, Summary):
                self.transport.write(encode_frame(Summary.encode_result(self.summary)))
            else:
                self.transport.write(encode_frame(0))

    def answer(self, result):
        """Answer the held REQUEST with an Allocation or a failure reason."""
        self.transport.write(encode_frame(Request.encode_result(result)))

    def connectionLost(self, reason=None):
        self.lost = True


class ClosableSession:
    """A stand-in session: its port, and a close that succeeds."""

    def __init__(self, port):
        self.port = port

    def close(self):
        return defer.succeed(None)


class Silent(Protocol):
    """A peer that accepts the connection and never says anything."""

    lost = False

    def connectionLost(self, reason=None):
        self.lost = True


class SessionHarness:
    """Connects the client's outgoing TCP attempts to fake trackers in memory."""

    def __init__(self):
        self.reactor = MemoryReactorClock()
        self.trackers = []
        self.pumps = []

    def accept(self, tracker=None):
        """Complete the oldest connection attempt with a fake tracker."""
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        tracker = tracker or FakeTracker()
        client = factory.buildProtocol(None)
        pump = iosim.connect(
            tracker, iosim.makeFakeServer(tracker),
            client, iosim.makeFakeClient(client),
            greet=False,
        )
        self.trackers.append(tracker)
        self.pumps.append(pump)
        self.flush()
        return tracker

    def refuse(self):
        """Fail the oldest connection attempt with a refusal."""
        host, port, factory, timeout, bind = self.reactor.tcpClients.pop(0)
        factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))

    def flush(self):
        """Move bytes until every connection is quiet."""
        for _ in range(10):
            moved = False
            for pump in self.pumps:
                moved = pump.flush() or moved
            if not moved:
                return


class SessionTests(SynchronousTestCase):
    """TrackerSession over in-memory connections to fake trackers."""

    def open_session(self, tracker=None):
        harness = SessionHarness()
        connecting = connect_tracker("127.0.0.1", 9190, reactor=harness.reactor)
        self.assertEqual(harness.reactor.tcpClients[0][:2], ("127.0.0.1", 9190))
        control = harness.accept(tracker)
        session = self.successResultOf(connecting)
        self.assertIsInstance(session, TrackerSession)
        return harness, session, control

    def test_connect_ping_summary_text_summary(self):
        summary = {
            "queue_info": {"rk": {"free": 1, "pending": 0}},
            "server_info": [{"key": "server:rk", "addr": ["10.0.0.2", 9090]}],
        }
        harness, session, control = self.open_session(FakeTracker(summary))
        self.assertEqual((session.host, session.port, session.reactor),
                         ("127.0.0.1", 9190, harness.reactor))
        ping = session.ping()
        harness.flush()
        self.assertIsNone(self.successResultOf(ping))
        got = session.summary()
        harness.flush()
        self.assertEqual(self.successResultOf(got), summary)
        text = session.text_summary()
        harness.flush()
        self.assertIn("10.0.0.2:9090            server:rk\n", self.successResultOf(text))
        self.assertEqual(control.messages, [[1], [6], [6]])

    def test_refused(self):
        harness = SessionHarness()
        connecting = connect_tracker("127.0.0.1", 9190, reactor=harness.reactor)
        harness.refuse()
        failure = self.failureResultOf(connecting, error.ConnectError)
        self.assertEqual(str(failure.value),
                         "connecting to the tracker at 127.0.0.1:9190: connection refused")
        self.assertIsInstance(failure.value.cause, error.ConnectionRefusedError)

    def test_unknown_host_name(self):
        """A name that does not resolve is a CannotReach naming the tracker, as a refusal is."""
        class Unresolved:
            def connect(self, factory):
                return defer.fail(error.DNSLookupError("no results for hostname lookup: lab"))

        connecting = connect_tracker("lab", 9190, reactor=MemoryReactorClock(),
                                     endpoint=Unresolved())
        failure = self.failureResultOf(connecting, error.ConnectError)
        self.assertEqual(str(failure.value),
                         "connecting to the tracker at lab:9190: host name not found")
        self.assertIsInstance(failure.value.cause, error.DNSLookupError)

    def test_not_a_tracker(self):
        harness = SessionHarness()
        connecting = connect_tracker("127.0.0.1", 9190, reactor=harness.reactor)

        class Chatty(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"SSH-2.0-OpenSSH\r\n")

        harness.accept(Chatty())
        self.failureResultOf(connecting, NotATracker)

    def test_peer_closing_at_once_is_named(self):
        """A port that closes tracker clients (a server's, a proxy's) is named, with a hint."""
        harness = SessionHarness()
        connecting = connect_tracker("127.0.0.1", 9190, reactor=harness.reactor)

        class Closing(Protocol):
            def dataReceived(self, data):
                self.transport.loseConnection()

        harness.accept(Closing())
        harness.flush()
        failure = self.failureResultOf(connecting, NotATracker)
        self.assertIn("127.0.0.1:9190 closed the connection before the tracker answered",
                      str(failure.value))
        self.assertIn("tracker's port?", str(failure.value))

    def test_silent_peer_times_out(self):
        harness = SessionHarness()
        connecting = connect_tracker("127.0.0.1", 9190, reactor=harness.reactor,
                                     connect_timeout=5)
        peer = harness.accept(Silent())
        self.assertNoResult(connecting)
        harness.reactor.advance(4.9)
        self.assertNoResult(connecting)
        harness.reactor.advance(0.1)
        failure = self.failureResultOf(connecting, defer.TimeoutError)
        self.assertIn("127.0.0.1:9190", str(failure.value))
        harness.flush()
        self.assertTrue(peer.lost)

    def test_endpoint_keyword(self):
        endpoint, completer = iosim.connectableEndpoint()
        connecting = connect_tracker("tracker.example", 1, endpoint=endpoint,
                                     reactor=MemoryReactorClock())
        pump = completer.succeedOnce()
        # The far end of connectableEndpoint is a plain Protocol: it never echoes.
        pump.flush()
        self.assertNoResult(connecting)
        pump.server.transport.write(MAGIC)
        pump.flush()
        session = self.successResultOf(connecting)
        self.assertIs(session.endpoint, endpoint)
        self.assertEqual(session.address, "tracker.example:1")

    def test_allocate_on_its_own_connection(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk", priority=3, user="me")
        request_tracker = harness.accept()
        self.assertIsNot(request_tracker, control)
        self.assertEqual(request_tracker.messages, [[4, "rk", "me", 3]])
        self.assertNoResult(allocating)
        # The control connection stays usable while the request waits.
        ping = session.ping()
        harness.flush()
        self.assertIsNone(self.successResultOf(ping))
        request_tracker.answer(Allocation("10.1.2.3", 9091, "rk:0.42"))
        harness.flush()
        self.assertEqual(self.successResultOf(allocating),
                         Allocation("10.1.2.3", 9091, "rk:0.42"))
        self.assertTrue(request_tracker.lost)
        self.assertFalse(control.lost)

    def test_request_and_run_reports_progress_while_waiting(self):
        """TrackerSession.request_and_run hands progress= and progress_period=
        to the wait: one SUMMARY on the control connection per period."""
        from tvm_rpc.client.waiting import WaitProgress

        connect_module = importlib.import_module("tvm_rpc.client.connect")
        opened = []

        def fake_connect(host, port, key, session_timeout, **options):
            opened.append((host, port, key))
            return defer.succeed(ClosableSession(port))

        self.patch(connect_module, "connect", fake_connect)
        summary = {"queue_info": {"rk": {"free": 0, "pending": 2}}, "server_info": []}
        harness, session, control = self.open_session(FakeTracker(summary))
        seen = []
        running = session.request_and_run("rk", lambda s: s.port + 1, progress=seen.append,
                                          progress_period=5)
        request_tracker = harness.accept()
        for _ in range(2):
            harness.reactor.advance(5)
            harness.flush()
        self.assertEqual(seen, [WaitProgress("rk", 2, 5.0), WaitProgress("rk", 2, 10.0)])
        self.assertEqual(control.messages, [[6], [6]])
        request_tracker.answer(Allocation("10.1.2.3", 9091, "rk:0.42"))
        harness.flush()
        self.assertEqual(self.successResultOf(running), 9092)
        self.assertEqual(opened, [("10.1.2.3", 9091, "rk:0.42")])

    def test_allocations_run_concurrently(self):
        harness, session, control = self.open_session()
        first = session.allocate("a")
        second = session.allocate("b")
        tracker_a = harness.accept()
        tracker_b = harness.accept()
        tracker_b.answer(Allocation("h", 2, "b:1"))
        harness.flush()
        self.assertEqual(self.successResultOf(second).matchkey, "b:1")
        self.assertNoResult(first)
        tracker_a.answer(Allocation("h", 1, "a:1"))
        harness.flush()
        self.assertEqual(self.successResultOf(first).matchkey, "a:1")

    def test_allocate_fail_reply(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk")
        request_tracker = harness.accept()
        request_tracker.answer("request timed out")
        harness.flush()
        failure = self.failureResultOf(allocating, TrackerError)
        self.assertIn("request timed out", str(failure.value))
        self.assertTrue(request_tracker.lost)

    def test_allocate_timeout_is_sent_and_enforced_locally(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk", timeout=2.5)
        request_tracker = harness.accept()
        self.assertEqual(request_tracker.messages, [[4, "rk", "", 1, {"timeout": 2.5}]])
        harness.reactor.advance(2.4)
        self.assertNoResult(allocating)
        harness.reactor.advance(0.1)
        failure = self.failureResultOf(allocating, AllocationTimeout)
        self.assertIsInstance(failure.value, defer.TimeoutError)
        self.assertIsInstance(failure.value, TrackerError)
        self.assertIn("'rk'", str(failure.value))
        harness.flush()
        self.assertTrue(request_tracker.lost)
        self.assertFalse(control.lost)

    def test_allocate_timeout_covers_connecting(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk", timeout=1)
        harness.reactor.advance(1)
        self.failureResultOf(allocating, AllocationTimeout)

    def test_cancel_withdraws_by_closing_the_connection(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk")
        request_tracker = harness.accept()
        allocating.cancel()
        self.failureResultOf(allocating, defer.CancelledError)
        harness.flush()
        self.assertTrue(request_tracker.lost)
        self.assertFalse(control.lost)

    def test_tracker_closing_under_a_waiting_request_says_so(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk")
        request_tracker = harness.accept()
        request_tracker.transport.loseConnection()
        harness.flush()
        failure = self.failureResultOf(allocating, error.ConnectionLost)
        self.assertEqual(str(failure.value),
                         "the tracker at 127.0.0.1:9190 closed the connection "
                         "while request('rk') was waiting")

    def test_close_ends_control_and_pending_requests(self):
        harness, session, control = self.open_session()
        allocating = session.allocate("rk")
        request_tracker = harness.accept()
        closing = session.close()
        harness.flush()
        self.assertIsNone(self.successResultOf(closing))
        self.assertTrue(control.lost)
        self.assertTrue(request_tracker.lost)
        self.failureResultOf(allocating, error.ConnectionDone)


class EndpointTests(SynchronousTestCase):
    """How a tracker address becomes an endpoint."""

    def test_kinds(self):
        reactor = MemoryReactorClock()
        self.assertIsInstance(tracker_endpoint(reactor, "127.0.0.1", 9190), TCP4ClientEndpoint)
        self.assertIsInstance(tracker_endpoint(reactor, "::1", 9190), TCP6ClientEndpoint)
        self.assertIsInstance(tracker_endpoint(reactor, "tracker.lab", 9190), HostnameEndpoint)

    def test_connect_timeout_reaches_the_reactor(self):
        reactor = MemoryReactorClock()
        connect_tracker("10.1.1.1", 9300, reactor=reactor, connect_timeout=7)
        host, port, factory, timeout, bind = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("10.1.1.1", 9300, 7))
