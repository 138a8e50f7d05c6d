"""The server's tracker registration loop, against a scripted in-memory tracker."""

import itertools

import pytest
from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.client.registration import LinkSettings, TrackerRegistration
from tvm_rpc.protocol.tracker_commands import TrackerError
from tvm_rpc.protocol.constants import TrackerCode
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame, encode_magic
from tvm_rpc.server.gate import SessionGate


pytestmark = pytest.mark.unit


class FakeTracker(Protocol):
    """Echoes the magic, records every message, answers as a tracker does."""

    def __init__(self, owner):
        self.owner = owner
        self.decoder = FrameDecoder(expect_magic=True)
        self.messages = []

    def dataReceived(self, data):
        was_greeted = self.decoder.greeted
        values = self.decoder.feed(data)
        if self.decoder.greeted and not was_greeted:
            self.transport.write(encode_magic())
        for message in values:
            self.messages.append(message)
            self.owner.log.append(message)
            if message[0] == TrackerCode.GET_PENDING_MATCHKEYS:
                reply = sorted(self.owner.pending)
            else:
                if message[0] == TrackerCode.PUT:
                    self.owner.pending.add(message[2][1])
                reply = 0
            self.transport.write(encode_frame(reply))


class FakeEndpoint:
    """Connects client factories to L{FakeTracker}s over iosim transports."""

    def __init__(self, tracker_class=None):
        self.tracker_class = tracker_class or FakeTracker
        self.up = True
        self.pumps = []
        self.trackers = []
        self.log = []
        self.pending = set()

    def connect(self, factory):
        if not self.up:
            return defer.fail(ConnectionRefusedError())
        client = factory.buildProtocol(None)
        tracker = self.tracker_class(self)
        self.trackers.append(tracker)
        self.pumps.append(
            iosim.connect(
                tracker,
                iosim.FakeTransport(tracker, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
            )
        )
        return defer.succeed(client)

    def flush(self):
        for _ in range(3):
            for pump in self.pumps:
                pump.flush()

    def hand_out(self, matchkey):
        """Pretend the tracker gave C{matchkey} to a client."""
        self.pending.discard(matchkey)

    def drop(self):
        """The tracker goes away."""
        self.up = False
        self.pending.clear()
        for tracker in self.trackers:
            tracker.transport.loseConnection()
        self.flush()


def codes(messages):
    return [message[0] for message in messages]


class RegistrationTests(SynchronousTestCase):
    """Registration as TVM's server does it."""

    def setUp(self):
        self.clock = Clock()
        counter = itertools.count()
        self.gate = SessionGate(
            "dev", tracked=True, new_matchkey=lambda key: f"{key}:{next(counter)}"
        )
        self.endpoint = FakeEndpoint()
        self.service = TrackerRegistration(
            self.endpoint, self.gate, 9091, None, self.clock, LinkSettings(tracker="fake")
        )
        self.service.startService()
        self.endpoint.flush()
        self.addCleanup(self.service.stopService)

    def advance(self, seconds):
        """Move time on in poll-sized steps, delivering bytes in between."""
        steps = int(seconds / 0.5)
        for _ in range(steps):
            self.clock.advance(0.5)
            self.endpoint.flush()

    def test_registers_like_tvm(self):
        """UPDATE_INFO with server:<key> and the port, then PUT with a matchkey."""
        self.assertEqual(
            self.endpoint.log,
            [
                [TrackerCode.UPDATE_INFO, {"key": "server:dev", "addr": [None, 9091]}],
                [TrackerCode.PUT, "dev", [9091, "dev:0"], None],
            ],
        )
        self.assertEqual(self.gate.offered, "dev:0")
        self.assertEqual(self.service.registrations, 1)
        self.assertIsNotNone(self.successResultOf(self.service.when_registered()))

    def test_custom_addr(self):
        """A custom address goes in both UPDATE_INFO and PUT."""
        endpoint = FakeEndpoint()
        gate = SessionGate("k", tracked=True, new_matchkey=lambda key: key + ":x")
        service = TrackerRegistration(endpoint, gate, 9, "10.0.0.7", self.clock)
        service.startService()
        endpoint.flush()
        self.addCleanup(service.stopService)
        self.assertEqual(endpoint.log[0][1]["addr"], ["10.0.0.7", 9])
        self.assertEqual(endpoint.log[1], [TrackerCode.PUT, "k", [9, "k:x"], "10.0.0.7"])

    def test_polls_every_two_seconds(self):
        """GET_PENDING_MATCHKEYS every 2 s; a pending matchkey is kept."""
        self.advance(6)
        polls = [m for m in self.endpoint.log if m[0] == TrackerCode.GET_PENDING_MATCHKEYS]
        self.assertEqual(len(polls), 3)
        self.assertEqual(self.gate.offered, "dev:0")
        self.assertEqual(codes(self.endpoint.log).count(TrackerCode.PUT), 1)

    def test_unused_matchkey_renewed(self):
        """A matchkey handed out but unused is replaced after about 6 s."""
        self.endpoint.hand_out("dev:0")
        self.advance(4)
        self.assertEqual(self.gate.offered, "dev:0")
        self.advance(2)
        self.assertEqual(self.gate.offered, "dev:1")
        self.assertEqual(self.endpoint.log[-1], [TrackerCode.PUT, "dev", [9091, "dev:1"], None])

    def test_reput_after_session(self):
        """A session consumes the matchkey; its end brings a fresh PUT."""
        self.endpoint.hand_out("dev:0")
        slot = self.successResultOf(self.gate.claim("dev:0"))
        self.endpoint.flush()
        self.assertIsNone(self.gate.offered)
        self.advance(20)
        self.assertEqual(codes(self.endpoint.log).count(TrackerCode.PUT), 1)
        slot.release()
        self.endpoint.flush()
        self.assertEqual(self.endpoint.log[-1], [TrackerCode.PUT, "dev", [9091, "dev:1"], None])

    def test_reconnects_and_registers_again(self):
        """When the tracker goes and comes back, registration resumes within seconds."""
        self.endpoint.drop()
        self.assertIsNone(self.service._protocol)
        waiting = self.service.when_registered()
        self.advance(10)
        self.assertNoResult(waiting)
        before = len(self.endpoint.log)
        self.endpoint.up = True
        self.advance(6)
        self.successResultOf(waiting)
        again = self.endpoint.log[before:]
        self.assertEqual(codes(again)[:2], [TrackerCode.UPDATE_INFO, TrackerCode.PUT])
        self.assertEqual(again[1][2][1], "dev:1")
        self.assertEqual(self.service.registrations, 2)

    def test_stop_closes(self):
        """Stopping the service closes the tracker connection and stops polling."""
        self.service.stopService()
        self.endpoint.flush()
        self.assertTrue(self.endpoint.trackers[0].transport.disconnected)
        before = len(self.endpoint.log)
        self.advance(10)
        self.assertEqual(len(self.endpoint.log), before)


class RefusingTracker(FakeTracker):
    """Answers FAIL to every PUT."""

    def dataReceived(self, data):
        was_greeted = self.decoder.greeted
        values = self.decoder.feed(data)
        if self.decoder.greeted and not was_greeted:
            self.transport.write(encode_magic())
        for message in values:
            self.owner.log.append(message)
            self.transport.write(encode_frame(-1 if message[0] == TrackerCode.PUT else 0))


class FailedRegistrationTests(SynchronousTestCase):
    def test_failed_registration_closes_and_retries(self):
        """A tracker that refuses the PUT: the connection is closed and retried later."""
        clock = Clock()
        endpoint = FakeEndpoint(RefusingTracker)
        gate = SessionGate("dev", tracked=True, new_matchkey=lambda key: key + ":1")
        service = TrackerRegistration(endpoint, gate, 1, None, clock)
        service.startService()
        endpoint.flush()
        self.addCleanup(service.stopService)
        self.assertTrue(endpoint.trackers[0].transport.disconnected)
        self.assertEqual(service.registrations, 0)
        # Retries come within the backoff's longest delay plus its jitter.
        for _ in range(12):
            clock.advance(0.5)
            endpoint.flush()
        self.assertGreaterEqual(len(endpoint.trackers), 2)
        self.assertTrue(all(t.transport.disconnected for t in endpoint.trackers))
        self.assertEqual(len(self.flushLoggedErrors(TrackerError)), len(endpoint.trackers))


class SilentPeer(FakeTracker):
    """A port of another kind (the tracker's --http, say): reads, never answers."""

    def dataReceived(self, data):
        self.owner.log.append(data)


class WrongEcho(FakeTracker):
    """Answers the magic with bytes that are not the tracker's magic."""

    def dataReceived(self, data):
        self.owner.log.append(data)
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")


class NotATrackerTests(SynchronousTestCase):
    """A --tracker address that is not a tracker's port: one clear line per streak."""

    def register(self, peer_class):
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        clock = Clock()
        endpoint = FakeEndpoint(peer_class)
        gate = SessionGate("dev", tracked=True, new_matchkey=lambda key: key + ":1")
        service = TrackerRegistration(endpoint, gate, 1, None, clock,
                                      LinkSettings(tracker="tracker 127.0.0.1:9190"))
        service.startService()
        self.addCleanup(service.stopService)
        # A minute: several attempts, each given up at the handshake timeout at most.
        for _ in range(120):
            clock.advance(0.5)
            endpoint.flush()
        lines = [event for event in events
                 if event.get("log_namespace", "").startswith("tvm_rpc")]
        return service, endpoint, lines

    def assert_one_line(self, lines, reason):
        from twisted.logger import LogLevel, formatEvent

        texts = [formatEvent(event) for event in lines]
        self.assertEqual(len(texts), 1, texts)
        self.assertEqual(lines[0]["log_level"], LogLevel.warn)
        self.assertIn("cannot register with tracker 127.0.0.1:9190: ", texts[0])
        self.assertIn(reason, texts[0])
        self.assertNotIn("log_failure", lines[0])

    def test_silent_port_times_out(self):
        """A peer that never echoes the magic is dropped at the handshake timeout, and retried."""
        from tvm_rpc.client.registration import HANDSHAKE_TIMEOUT

        service, endpoint, lines = self.register(SilentPeer)
        self.assertEqual(service.registrations, 0)
        self.assertGreaterEqual(len(endpoint.trackers), 3)
        self.assertLessEqual(len(endpoint.trackers), 60 / HANDSHAKE_TIMEOUT + 1)
        self.assertTrue(all(t.transport.disconnected for t in endpoint.trackers[:-1]))
        self.assert_one_line(lines, f"no answer to the tracker handshake in {HANDSHAKE_TIMEOUT:g} s")

    def test_wrong_echo(self):
        """A peer that answers something else is closed and named once, not per attempt."""
        service, endpoint, lines = self.register(WrongEcho)
        self.assertEqual(service.registrations, 0)
        self.assertGreaterEqual(len(endpoint.trackers), 3)
        self.assert_one_line(lines, "magic")


class PollingProtocol:
    """A tracker connection that answers GET_PENDING_MATCHKEYS from a set, or fails."""

    def __init__(self):
        self.pending = set()
        self.calls = 0
        self.fail = False

    def call(self, command):
        """@return: a Deferred of the pending matchkeys (or a failure)."""
        self.calls += 1
        if self.fail:
            return defer.fail(ConnectionRefusedError())
        return defer.succeed(sorted(self.pending))


class MatchkeyPollerTests(SynchronousTestCase):
    """The polling that the server's registration and the proxy's links share."""

    def setUp(self):
        from tvm_rpc.client.registration import MatchkeyPoller

        self.clock = Clock()
        self.current = "k:1"
        self.stale = []
        self.failed = []
        self.poller = MatchkeyPoller(
            self.clock, 2.0, 5.0, current=lambda: self.current, stale=self.stale.append,
            failed=lambda failure, what, protocol: self.failed.append(what))
        self.protocol = PollingProtocol()

    def test_polls_every_period(self):
        """One GET_PENDING_MATCHKEYS per period while started, none after stop."""
        self.protocol.pending.add("k:1")
        self.poller.start(self.protocol)
        self.clock.advance(1.9)
        self.assertEqual(self.protocol.calls, 0)
        self.clock.pump([0.1, 2, 2])
        self.assertEqual(self.protocol.calls, 3)
        self.poller.stop()
        self.clock.advance(10)
        self.assertEqual((self.protocol.calls, self.stale), (3, []))

    def test_stale_after_timeout(self):
        """A handed-out matchkey unused for more than the timeout is stale (third poll: 6 s > 5 s)."""
        self.poller.start(self.protocol)
        self.clock.pump([2, 2])
        self.assertEqual(self.stale, [])
        self.clock.advance(2)
        self.assertEqual(self.stale, ["k:1"])

    def test_reset_by_pending_new_offer_or_put(self):
        """A pending matchkey, a different one on offer, or a reset start the count afresh."""
        self.poller.start(self.protocol)
        self.clock.pump([2, 2])
        self.protocol.pending.add("k:1")
        self.clock.advance(2)
        self.protocol.pending.clear()
        self.clock.pump([2, 2])
        self.poller.reset()
        self.clock.pump([2, 2])
        self.current = None
        self.clock.pump([2, 2, 2])
        self.assertEqual(self.stale, [])
        self.current = "k:2"
        self.clock.pump([2, 2, 2])
        self.assertEqual(self.stale, ["k:2"])

    def test_failure_reported(self):
        """A failed poll goes to C{failed}, named."""
        self.protocol.fail = True
        self.poller.start(self.protocol)
        self.clock.advance(2)
        self.assertEqual(self.failed, ["GET_PENDING_MATCHKEYS"])
