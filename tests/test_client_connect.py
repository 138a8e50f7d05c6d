"""``request`` and ``request_and_run``: retries, cancellation, closing, with fakes."""

import importlib

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionLost, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.client.connect import KeyMismatch, RequestFailed, request, request_and_run
from tvm_rpc.client.session_errors import SessionTimeout
from tvm_rpc.protocol.remote_error import RemoteError
from tvm_rpc.protocol.tracker_commands import Allocation

# The package exports the function connect(), which hides the module of the
# same name as an attribute; the module itself is what these tests patch.
pytestmark = pytest.mark.unit


connect_module = importlib.import_module("tvm_rpc.client.connect")

class FakeTracker:
    """Hands out allocations on demand; records cancellations."""

    def __init__(self):
        self.reactor = Clock()
        self.address = "tracker:1"
        self.asked = []
        self.cancelled = 0
        self.auto = True
        self.count = 0
        self.summaries = 0

    def summary(self):
        self.summaries += 1
        return defer.succeed({"queue_info": {"rk": {"free": 0, "pending": 3}},
                              "server_info": []})

    def allocate(self, key, priority=1, timeout=None):
        self.asked.append((key, priority, timeout))
        if self.auto:
            self.count += 1
            return defer.succeed(Allocation("127.0.0.1", 9000 + self.count, f"{key}:{self.count}"))

        def cancel(d):
            self.cancelled += 1

        return defer.Deferred(cancel)


class FakeSession:
    """A session that records being closed."""

    def __init__(self, port):
        self.port = port
        self.closed = False

    def close(self):
        self.closed = True
        return defer.succeed(None)


class RequestTests(SynchronousTestCase):
    """Retries over allocations and connections."""

    def setUp(self):
        self.tracker = FakeTracker()
        self.outcomes = []
        self.connected = []
        self.patch(connect_module, "connect", self.fake_connect)

    def fake_connect(self, host, port, key, session_timeout, *, reactor, **options):
        self.connected.append((port, key, session_timeout))
        outcome = self.outcomes.pop(0) if self.outcomes else None
        if isinstance(outcome, Exception):
            return defer.fail(outcome)
        return defer.succeed(FakeSession(port))

    def test_connects_with_matchkey(self):
        """The allocated matchkey and session timeout go to connect()."""
        session = self.successResultOf(request(self.tracker, "dev", 2, 30, timeout=5))
        self.assertEqual(self.tracker.asked, [("dev", 2, 5)])
        self.assertEqual(self.connected, [(9001, "dev:1", 30)])
        self.assertEqual(session.port, 9001)

    def test_retries_connection_failures(self):
        """A refused connection or a mismatch means: ask for another server."""
        self.outcomes = [ConnectionRefusedError(), KeyMismatch("stale")]
        session = self.successResultOf(request(self.tracker, "dev", max_retry=3))
        self.assertEqual(session.port, 9003)
        self.assertEqual(len(self.tracker.asked), 3)

    def test_gives_up(self):
        """After max_retry failures: RequestFailed naming the last problem."""
        self.outcomes = [ConnectionRefusedError()] * 2
        failure = self.failureResultOf(request(self.tracker, "dev", max_retry=2), RequestFailed)
        self.assertIn("after 2 attempts", str(failure.value))

    def test_other_errors_not_retried(self):
        """An unexpected error surfaces at once."""
        self.outcomes = [ValueError("boom")]
        self.failureResultOf(request(self.tracker, "dev"), ValueError)
        self.assertEqual(len(self.tracker.asked), 1)

    def test_cancel_withdraws(self):
        """Cancelling a waiting request cancels the allocation."""
        self.tracker.auto = False
        waiting = request(self.tracker, "dev")
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(self.tracker.cancelled, 1)


class RequestAndRunTests(SynchronousTestCase):
    """Run a function on a session, on another server if the first drops out."""

    def setUp(self):
        self.tracker = FakeTracker()
        self.sessions = []
        self.patch(connect_module, "connect", self.fake_connect)

    def fake_connect(self, host, port, key, session_timeout, *, reactor, **options):
        self.sessions.append(FakeSession(port))
        return defer.succeed(self.sessions[-1])

    def test_result_and_close(self):
        result = request_and_run(self.tracker, "dev", lambda s: defer.succeed(s.port * 2))
        self.assertEqual(self.successResultOf(result), 18002)
        self.assertTrue(self.sessions[0].closed)

    def test_retry_on_lost_server(self):
        """A lost connection is retried on another server; both sessions are closed."""
        calls = []

        def work(session):
            calls.append(session.port)
            if len(calls) == 1:
                return defer.fail(ConnectionLost())
            return defer.succeed("done")

        self.assertEqual(self.successResultOf(request_and_run(self.tracker, "dev", work)), "done")
        self.assertEqual(calls, [9001, 9002])
        self.assertTrue(all(s.closed for s in self.sessions))

    def test_remote_error_not_retried(self):
        """An error raised by the remote code is the caller's, at once."""
        def work(session):
            return defer.fail(RemoteError("ValueError", "bad", ""))

        self.failureResultOf(request_and_run(self.tracker, "dev", work), RemoteError)
        self.assertEqual(len(self.sessions), 1)
        self.assertTrue(self.sessions[0].closed)

    def test_timeout_not_retried(self):
        """A session the server ended for its timeout is reported, not retried."""
        self.failureResultOf(
            request_and_run(
                self.tracker, "dev", lambda s: defer.fail(SessionTimeout("timed out")),
                session_timeout=5,
            ),
            SessionTimeout,
        )
        self.assertEqual(len(self.sessions), 1)

    def test_late_loss_is_a_timeout(self):
        """A connection lost after (nearly) the whole timeout reads as a timeout."""
        clock = self.tracker.reactor

        def work(session):
            clock.advance(9.6)
            return defer.fail(ConnectionLost())

        self.failureResultOf(
            request_and_run(self.tracker, "dev", work, session_timeout=10), SessionTimeout
        )

    def test_gives_up(self):
        failure = self.failureResultOf(
            request_and_run(self.tracker, "dev", lambda s: defer.fail(ConnectionLost()), max_retry=2),
            RequestFailed,
        )
        self.assertIn("max_retry=2", str(failure.value))
        self.assertEqual(len(self.sessions), 2)


class StringEndpoint:
    """Connects protocols to StringTransports that nobody answers."""

    def __init__(self):
        self.transports = []

    def connect(self, factory):
        from twisted.internet.testing import StringTransport

        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.transports.append(transport)
        return defer.succeed(protocol)


class ConnectTimeoutTests(SynchronousTestCase):
    def test_unanswered_handshake(self):
        """A peer that never answers fails the connect after the handshake timeout."""
        from tvm_rpc.client.connect import NotAnRpcServer, connect

        clock = Clock()
        endpoint = StringEndpoint()
        attempt = connect("h", 1, "k", reactor=clock, endpoint=endpoint, handshake_timeout=5)
        clock.advance(4.9)
        self.assertNoResult(attempt)
        clock.advance(0.2)
        failure = self.failureResultOf(attempt, NotAnRpcServer)
        self.assertIn("within 5 s", str(failure.value))
        self.assertTrue(endpoint.transports[0].disconnected)


class ProgressTests(SynchronousTestCase):
    """A request waiting in the queue reports its progress every period."""

    def test_progress_every_period_until_allocated(self):
        from tvm_rpc.client.waiting import WaitProgress

        tracker = FakeTracker()
        tracker.auto = False
        allocated = defer.Deferred()
        tracker.allocate = lambda key, priority=1, timeout=None: allocated
        self.patch(connect_module, "connect",
                   lambda host, port, key, session_timeout, **kw: defer.succeed(FakeSession(port)))
        seen = []
        requesting = request(tracker, "rk", progress=seen.append, progress_period=10)
        tracker.reactor.advance(9)
        self.assertEqual((seen, tracker.summaries), ([], 0))
        tracker.reactor.advance(1)
        tracker.reactor.advance(10)
        self.assertEqual(seen, [WaitProgress("rk", 3, 10.0), WaitProgress("rk", 3, 20.0)])
        self.assertEqual(tracker.summaries, 2)
        allocated.callback(Allocation("127.0.0.1", 9001, "rk:1"))
        self.assertEqual(self.successResultOf(requesting).port, 9001)
        tracker.reactor.advance(30)
        self.assertEqual((len(seen), tracker.summaries), (2, 2))

    def test_request_and_run_reports_each_attempts_wait(self):
        """request_and_run passes progress to every attempt's request: the
        second attempt's wait reports too, its time counted from its own start."""
        from tvm_rpc.client.waiting import WaitProgress

        tracker = FakeTracker()
        allocations = []

        def allocate(key, priority=1, timeout=None):
            allocations.append(defer.Deferred())
            return allocations[-1]

        tracker.allocate = allocate
        self.patch(connect_module, "connect",
                   lambda host, port, key, session_timeout, **kw: defer.succeed(FakeSession(port)))
        ran = []

        def work(session):
            ran.append(session.port)
            return defer.fail(ConnectionLost()) if len(ran) == 1 else defer.succeed("done")

        seen = []
        running = request_and_run(tracker, "rk", work, progress=seen.append, progress_period=10)
        tracker.reactor.advance(10)
        allocations[0].callback(Allocation("127.0.0.1", 9001, "rk:1"))
        self.assertEqual(ran, [9001])
        tracker.reactor.advance(5)
        tracker.reactor.advance(5)
        self.assertNoResult(running)
        allocations[1].callback(Allocation("127.0.0.1", 9002, "rk:2"))
        self.assertEqual(self.successResultOf(running), "done")
        self.assertEqual(seen, [WaitProgress("rk", 3, 10.0), WaitProgress("rk", 3, 10.0)])

    def test_request_and_run_progress_period_zero_is_silent(self):
        """progress_period=0 reaches each request: no summary, no report."""
        tracker = FakeTracker()
        allocated = defer.Deferred()
        tracker.allocate = lambda key, priority=1, timeout=None: allocated
        self.patch(connect_module, "connect",
                   lambda host, port, key, session_timeout, **kw: defer.succeed(FakeSession(port)))
        seen = []
        running = request_and_run(tracker, "rk", lambda s: s.port, progress=seen.append,
                                  progress_period=0)
        tracker.reactor.advance(100)
        allocated.callback(Allocation("127.0.0.1", 9001, "rk:1"))
        self.assertEqual(self.successResultOf(running), 9001)
        self.assertEqual((seen, tracker.summaries), ([], 0))

    def test_unknown_position_and_one_summary_at_a_time(self):
        """A summary not answered yet holds the next one back; a failed one gives None."""
        from tvm_rpc.client.waiting import WaitReporter

        tracker = FakeTracker()
        answers = []

        def summary():
            tracker.summaries += 1
            answers.append(defer.Deferred())
            return answers[-1]

        tracker.summary = summary
        seen = []
        reporter = WaitReporter(tracker, "rk", seen.append, 5)
        reporter.start()
        tracker.reactor.advance(5)
        tracker.reactor.advance(50)
        self.assertEqual(tracker.summaries, 1)
        answers[0].errback(ConnectionLost())
        self.assertEqual([(p.pending, p.waited) for p in seen], [(None, 55.0)])
        reporter.stop()
        tracker.reactor.advance(50)
        self.assertEqual(tracker.summaries, 1)


class RefusingEndpoint:
    """An endpoint whose every connection attempt is refused."""

    def connect(self, factory):
        return defer.fail(ConnectionRefusedError(111, "Connection refused"))


class ConnectRefusedTests(SynchronousTestCase):
    def test_refused_names_the_address(self):
        """A refused connection says what was being done, where, and why."""
        from twisted.internet.error import ConnectError

        from tvm_rpc.client.connect import connect

        attempt = connect("10.0.0.7", 9091, "k", reactor=Clock(), endpoint=RefusingEndpoint())
        failure = self.failureResultOf(attempt, ConnectError)
        self.assertEqual(str(failure.value),
                         "connecting to the RPC server at 10.0.0.7:9091: connection refused")


class RecordingSession:
    """A session protocol that records what it is given."""

    def __init__(self):
        self.transport = None
        self.received = []
        self.lost = []

    def makeConnection(self, transport):
        self.transport = transport

    def dataReceived(self, data):
        self.received.append(data)

    def connectionLost(self, reason=None):
        self.lost.append(reason)


class SwitchingCarrierTests(SynchronousTestCase):
    """The handshake-then-session carrier shared by the client and the server."""

    def test_carries_after_switch(self):
        """Before the switch nothing is carried; after it, early bytes, later
        bytes and the loss go to the session on the same transport."""
        from twisted.internet.testing import StringTransport

        from tvm_rpc.client.connect import ClientHandshake

        carrier = ClientHandshake("k", 0, "here:1")
        transport = StringTransport()
        carrier.makeConnection(transport)
        self.assertFalse(carrier.carried(b"x"))
        session = RecordingSession()
        carrier.switch_to(session, b"early")
        self.assertIs(session.transport, transport)
        carrier.dataReceived(b"later")
        self.assertEqual(session.received, [b"early", b"later"])
        carrier.done.addErrback(lambda failure: None)
        reason = Failure(ConnectionLost("gone"))
        carrier.connectionLost(reason)
        self.assertEqual(session.lost, [reason])

    def test_set_no_delay(self):
        """Nagle goes off where the transport has the switch; others are left alone."""
        from tvm_rpc.transport import set_no_delay

        class TCPish:
            calls = []

            def setTcpNoDelay(self, enabled):
                self.calls.append(enabled)

        class Refusing:
            def setTcpNoDelay(self, enabled):
                raise OSError("not TCP")

        tcp = TCPish()
        set_no_delay(tcp)
        set_no_delay(Refusing())
        set_no_delay(object())
        self.assertEqual(tcp.calls, [True])


class DyingServerEndpoint:
    """
    A server that completes the handshake as ours does, then dies before it
    answers the session's Hello (a worker lost between handshake and session
    start).
    """

    def __init__(self):
        self.protocols = []

    def connect(self, factory):
        from twisted.internet.testing import StringTransport

        from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS
        from tvm_rpc.protocol.flavour import server_key
        from tvm_rpc.protocol.handshake import encode_reply

        protocol = factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(encode_reply(RPC_CODE_SUCCESS, server_key("dev")))
        self.protocols.append(protocol)
        return defer.succeed(protocol)

    def die(self):
        """The server's end goes away."""
        from twisted.internet.error import ConnectionDone

        self.protocols[-1].connectionLost(Failure(ConnectionDone()))


class LostBeforeSessionStartTests(SynchronousTestCase):
    """request() retries a server lost between the handshake and the session's start."""

    def test_retried_like_any_failed_attempt(self):
        from tvm_rpc.client.session_errors import SessionClosed

        tracker = FakeTracker()
        endpoint = DyingServerEndpoint()
        self.patch(connect_module, "server_endpoint", lambda *args, **kwargs: endpoint)
        requesting = request(tracker, "dev", max_retry=3)
        for attempt in range(3):
            self.assertNoResult(requesting)
            self.assertEqual(len(tracker.asked), attempt + 1)
            endpoint.die()
        failure = self.failureResultOf(requesting, RequestFailed)
        self.assertIn("after 3 attempts", str(failure.value))
        self.assertIsInstance(failure.value.__context__, SessionClosed)


class ConnectDescribesSessionTests(SynchronousTestCase):
    """connect() gives its session the address and the session timeout, as request() does."""

    def test_address_and_session_timeout(self):
        from twisted.protocols import amp

        from tvm_rpc.client.connect import connect
        from tvm_rpc.protocol import session_commands

        endpoint = DyingServerEndpoint()
        opening = connect("h", 1, "k", session_timeout=7, reactor=Clock(), endpoint=endpoint)
        self.assertNoResult(opening)
        answer = amp.AmpBox(
            _answer=b"1", protocol=session_commands.SESSION_PROTOCOL.encode(),
            version=str(session_commands.SESSION_VERSION).encode(), implementation=b"test",
            chunk_size=b"1000", window=b"4", max_inline_value=b"1000",
        ).serialize()
        endpoint.protocols[-1].dataReceived(answer)
        session = self.successResultOf(opening)
        self.assertEqual((session.address, session.session_timeout), ("h:1", 7))
