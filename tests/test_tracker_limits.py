"""The tracker's per-connection and per-address limits over in-memory
transports and a fake clock: back-pressure and the output bound, the
per-address connection cap, the idle timeout, the priority cap, and log lines
that never carry a matchkey (``docs/robustness.md``)."""

import pytest
from twisted.internet.address import UNIXAddress
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent

from tests.test_tracker_protocol import (
    PENDING,
    PING,
    PUT,
    REQUEST,
    SUMMARY,
    UPDATE_INFO,
    Peer,
    TrackerTestCase,
)
from tvm_rpc.protocol.framing import encode_frame, encode_magic
from tvm_rpc.tracker.limits import TrackerLimits
from tvm_rpc.tracker.state import TrackerState

#: The bytes of SUMMARY's reply on an idle tracker.
pytestmark = pytest.mark.unit


IDLE_SUMMARY = len(encode_frame([0, {"queue_info": {}, "server_info": [], "leases": []}]))


def logged(events):
    """@return: the captured log events as one string."""
    return " | ".join(formatEvent(e) for e in events)


class BackPressureTests(TrackerTestCase):
    """A peer that does not read its replies is not read either, and is
    closed once it owes more than C{max_output} bytes."""

    def test_registered_as_streaming_producer(self):
        """Each connection produces for its own transport, streaming."""
        peer = self.peer()
        self.assertIs(peer.transport.producer, peer.protocol)
        self.assertTrue(peer.transport.streaming)

    def test_pause_stops_reading_and_resume_reads_again(self):
        """When the transport's buffer fills the tracker stops reading the peer."""
        peer = self.peer()
        peer.protocol.pauseProducing()
        self.assertEqual(peer.transport.producerState, "paused")
        peer.protocol.resumeProducing()
        self.assertEqual(peer.transport.producerState, "producing")
        self.assertEqual(peer.ask([PING]), 0)

    def test_unread_replies_beyond_bound_close(self):
        """Replies owed to a paused peer past the bound close it, cleanly and logged."""
        peer = self.peer()
        peer.send([REQUEST, "k", "", 1])
        busy_summary = len(encode_frame(peer.ask([SUMMARY])))
        self.state.limits = TrackerLimits(max_output=10 * busy_summary)
        peer.protocol.pauseProducing()
        peer.send(*[[SUMMARY]] * 10)
        self.assertFalse(peer.closed)
        with capturedLogs() as events:
            peer.send(*[[SUMMARY]] * 5)
        self.assertTrue(peer.closed)
        self.assertIsNone(peer.transport.producer)
        self.assertEqual(len(peer.transport.value()), 10 * busy_summary)
        self.assertIn("10.0.0.1", logged(events))
        self.assertIn("replies not read", logged(events))
        self.assertEqual(self.state.summary()["queue_info"]["k"]["pending"], 0)
        peer.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_repeated_pause_keeps_the_count(self):
        """A transport calls pauseProducing on every write while full: still one count."""
        self.use_limits(max_output=10 * IDLE_SUMMARY)
        peer = self.peer()
        for _ in range(11):
            peer.protocol.pauseProducing()
            peer.send([SUMMARY])
        self.assertTrue(peer.closed)

    def test_resume_resets_the_count(self):
        """Only what is owed since the last pause counts."""
        self.use_limits(max_output=10 * IDLE_SUMMARY)
        peer = self.peer()
        for _ in range(3):
            peer.protocol.pauseProducing()
            peer.send(*[[SUMMARY]] * 10)
            peer.protocol.resumeProducing()
        self.assertFalse(peer.closed)
        self.assertEqual(len(peer.replies()), 30)

    def test_a_peer_that_reads_is_never_bounded(self):
        """Without a pause, however much is written, nothing is counted."""
        self.use_limits(max_output=IDLE_SUMMARY)
        peer = self.peer()
        peer.send(*[[SUMMARY]] * 100)
        self.assertFalse(peer.closed)
        self.assertEqual(len(peer.replies()), 100)

    def test_request_answer_counts(self):
        """An answer to a REQUEST, written while paused, counts too."""
        self.use_limits(max_output=IDLE_SUMMARY)
        client, server = self.peer(), self.peer("10.0.0.2")
        client.send([REQUEST, "k", "", 1], [REQUEST, "k", "", 1])
        client.protocol.pauseProducing()
        client.send([SUMMARY])
        server.ask([PUT, "k", [9000, "k:1"], None])
        self.assertTrue(client.closed)
        self.assertNotIn(b"k:1", client.transport.value())
        self.assertEqual(self.state.summary()["queue_info"]["k"]["pending"], 0)


class PerAddressTests(TrackerTestCase):
    """At most C{max_connections_per_address} connections from one IP address."""

    def setUp(self):
        """A tracker allowing two connections per address."""
        super().setUp()
        self.use_limits(max_connections_per_address=2)

    def connect(self, host):
        """@return: a new, not yet greeted, L{Peer} from C{host}."""
        return Peer(self.factory, host, next(self._ports))

    def test_refused_beyond_the_cap(self):
        """A third connection from one address is closed at once, without an echo."""
        first, second = self.peer(), self.peer()
        with capturedLogs() as events:
            third = self.connect("10.0.0.1")
            fourth = self.connect("10.0.0.1")
        for refused in (third, fourth):
            self.assertTrue(refused.closed)
            refused.protocol.dataReceived(encode_magic() + encode_frame([PING]))
            self.assertEqual(refused.transport.value(), b"")
            self.assertIsNone(refused.transport.producer)
        text = logged(events)
        self.assertEqual(text.count("refusing connections from 10.0.0.1"), 1)
        self.assertFalse(first.closed or second.closed)
        self.assertEqual(first.ask([PING]), 0)
        self.assertEqual(self.peer("10.0.0.2").ask([PING]), 0)
        third.lose()
        fourth.lose()
        self.assertEqual(self.factory.connections_from("10.0.0.1"), 2)

    def test_admitted_again_once_one_closes(self):
        """A slot freed is taken again, with a line counting the refusals."""
        first, _ = self.peer(), self.peer()
        self.connect("10.0.0.1").lose()
        first.lose()
        with capturedLogs() as events:
            again = self.peer()
        self.assertEqual(again.ask([PING]), 0)
        self.assertIn("accepting connections from 10.0.0.1 again; refused 1", logged(events))

    def test_refusals_told_when_the_address_leaves(self):
        """An address whose connections all close leaves no refusal count behind."""
        first, second = self.peer(), self.peer()
        self.connect("10.0.0.1").lose()
        first.lose()
        with capturedLogs() as events:
            second.lose()
        self.assertIn("all connections from 10.0.0.1 closed; refused 1", logged(events))
        self.assertEqual(self.factory._refused, {})
        self.assertEqual(self.factory._open, {})

    def test_every_close_releases(self):
        """Bad input, STOP and plain closes all give the slot back."""
        bad, plain = self.peer(), self.peer()
        bad.protocol.dataReceived(encode_frame([99]))
        bad.lose()
        plain.lose()
        self.assertEqual(self.factory.connections_from("10.0.0.1"), 0)

    def test_unix_peers_not_counted(self):
        """Peers on a UNIX socket share no address; they are not capped."""
        peers = []
        for _ in range(5):
            transport = StringTransport(peerAddress=UNIXAddress(b"/run/t.sock"))
            protocol = self.factory.buildProtocol(None)
            protocol.makeConnection(transport)
            protocol.dataReceived(encode_magic())
            peers.append(transport)
        self.assertFalse(any(t.disconnecting for t in peers))
        self.assertTrue(all(t.value() == encode_magic() for t in peers))


class IdleTimeoutTests(TrackerTestCase):
    """With C{idle_timeout}, a connection that holds nothing is closed when silent."""

    def setUp(self):
        """A tracker with a 30 s idle timeout."""
        super().setUp()
        self.use_limits(idle_timeout=30)

    def test_silent_connection_closed(self):
        """Silent for the idle timeout after the magic: closed, logged."""
        peer = self.peer()
        self.clock.advance(29)
        self.assertFalse(peer.closed)
        with capturedLogs() as events:
            self.clock.advance(1)
        self.assertTrue(peer.closed)
        self.assertIn("idle for 30 s", logged(events))
        peer.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_activity_restarts_the_timer(self):
        """Each message received restarts the timer."""
        peer = self.peer()
        for _ in range(5):
            self.clock.advance(20)
            self.assertEqual(peer.ask([SUMMARY])[0], 0)
        self.clock.advance(29)
        self.assertFalse(peer.closed)
        self.clock.advance(1)
        self.assertTrue(peer.closed)

    def test_waiting_request_never_dropped(self):
        """A connection with a waiting REQUEST is kept however long it waits;
        once answered, the idle timer runs again."""
        client = self.peer()
        client.send([REQUEST, "k", "", 1])
        self.clock.advance(3600)
        self.assertFalse(client.closed)
        self.peer("10.0.0.2").ask([PUT, "k", [9000, "k:1"], None])
        self.assertEqual(client.replies()[0][0], 0)
        self.clock.advance(29)
        self.assertFalse(client.closed)
        self.clock.advance(1)
        self.assertTrue(client.closed)

    def test_registered_server_never_dropped(self):
        """A server with a free server, a handed-out one, or server info is kept."""
        free = self.peer("10.0.0.2")
        free.ask([PUT, "k", [9000, "k:1"], None])
        leased = self.peer("10.0.0.3")
        leased.ask([PUT, "j", [9000, "j:1"], None])
        self.assertEqual(self.peer().ask([REQUEST, "j", "", 1])[0], 0)
        info = self.peer("10.0.0.4")
        info.ask([UPDATE_INFO, {"key": "server:k", "addr": [None, 9000]}])
        self.clock.advance(7200)
        self.assertFalse(free.closed or leased.closed or info.closed)
        self.assertEqual(free.ask([PENDING]), ["k:1"])

    def test_greeting_timeout_still_applies_first(self):
        """Before the magic the greeting timeout rules (60 s), not the idle one."""
        peer = Peer(self.factory, "10.0.0.1", 1)
        self.clock.advance(59)
        self.assertFalse(peer.closed)
        self.clock.advance(1)
        self.assertTrue(peer.closed)

    def test_off_by_default(self):
        """Without the option a greeted connection may idle for ever."""
        self.use_limits()
        peer = self.peer()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(86400)
        self.assertFalse(peer.closed)


class PriorityCapTests(TrackerTestCase):
    """Priorities above C{max_priority} are queued at it (not refused)."""

    def test_clamped_logged_once_and_shown_in_lease(self):
        """The request is served; its lease shows the priority used; one log line."""
        self.use_limits(max_priority=50)
        greedy, modest = self.peer("10.0.0.5"), self.peer("10.0.0.6")
        with capturedLogs() as events:
            greedy.send([REQUEST, "k", "", 10**6], [REQUEST, "k", "", 10**9])
        modest.send([REQUEST, "k", "", 50])
        self.assertEqual(logged(events).count("priority"), 1)
        self.assertIn("10.0.0.5", logged(events))
        for i in range(3):
            self.peer(f"10.0.1.{i}").ask([PUT, "k", [9000, f"k:{i}"], None])
        self.assertEqual([r[1][2] for r in greedy.replies()], ["k:0", "k:1"])
        self.assertEqual([r[1][2] for r in modest.replies()], ["k:2"])
        leases = self.state.summary()["leases"]
        self.assertEqual(sorted(lease["priority"] for lease in leases), [50, 50, 50])


class MatchkeyLogTests(TrackerTestCase):
    """No log line of the tracker carries a matchkey."""

    def test_internal_error_logs_the_command_name_only(self):
        """An unexpected error handling a PUT names the command, not its matchkey."""
        peer = self.peer()

        def broken(state, connection, command):
            """Fail as a bug would."""
            raise RuntimeError("bug")

        self.patch(TrackerState, "put", broken)
        with capturedLogs() as events:
            peer.send([PUT, "k", [9000, "k:secret-matchkey"], None])
        self.assertTrue(peer.closed)
        self.assertIn("PUT", logged(events))
        self.assertNotIn("secret-matchkey", logged(events))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_malformed_put_logs_its_shape_only(self):
        """A PUT whose address is not [port, matchkey] is logged by shape."""
        peer = self.peer()
        with capturedLogs() as events:
            peer.send([PUT, "k", [9000, "k:secret-matchkey", "extra"], None])
        self.assertTrue(peer.closed)
        self.assertIn("a list of 3", logged(events))
        self.assertNotIn("secret-matchkey", logged(events))

    def test_served_requests_log_no_matchkey(self):
        """A whole allocation cycle logs nothing with the matchkey."""
        with capturedLogs() as events:
            server, client = self.peer("10.0.0.2"), self.peer()
            server.ask([UPDATE_INFO, {"key": "server:k", "addr": [None, 9000]}])
            server.ask([PUT, "k", [9000, "k:secret-matchkey"], None])
            client.ask([REQUEST, "k", "", 10**7])
            server.ask([PUT, "k", [9000, "k:secret-2"], None])
            server.lose()
            client.lose()
        self.assertNotIn("secret", logged(events))
