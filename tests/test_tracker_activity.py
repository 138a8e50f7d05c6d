"""The tracker's activity record on a fake clock: counters, the wait-time
histogram, the ring of recent events, the grant and release lines and their
budget, the faults counted by the protocol adapter."""

from hypothesis import given, strategies as st
import pytest

from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from tests.test_tracker_protocol import PUT, REQUEST, Peer, TrackerTestCase
from tvm_rpc.daemon.histogram import Histogram
from tvm_rpc.protocol.framing import encode_frame
from tvm_rpc.tracker.activity import (
    RECENT_EVENTS,
    WAIT_BUCKETS,
    Event,
    LineBudget,
    TrackerActivity,
)
from tvm_rpc.tracker.limits import TrackerLimits
from tvm_rpc.tracker.state import TrackerState

pytestmark = pytest.mark.unit


def lines(events):
    """@return: the formatted text of captured log events."""
    return [formatEvent(e) for e in events]


@given(st.lists(st.floats(0, 1e5, allow_nan=False), max_size=50))
def test_histogram_cumulative(waits):
    """Cumulative bucket counts never decrease, end at the count, and hold
    exactly the waits at or below each bound."""
    histogram = Histogram(WAIT_BUCKETS)
    for wait in waits:
        histogram.observe(wait)
    rows = histogram.cumulative()
    assert [bound for bound, _ in rows] == [repr(b) for b in WAIT_BUCKETS] + ["+Inf"]
    for bound, count in rows:
        assert count == sum(1 for w in waits if w <= float(bound))
    assert rows[-1][1] == histogram.count == len(waits)
    assert histogram.total == pytest.approx(sum(waits))


class RecordingLog:
    """A stand-in logger that records the summing-up lines."""

    def __init__(self):
        """Start with no line."""
        self.lines = []

    def info(self, fmt, **fields):
        """Record one line's fields."""
        self.lines.append(fields)


@given(st.integers(1, 5), st.lists(st.floats(0, 0.6), min_size=1, max_size=60))
def test_line_budget_bounds_lines_and_counts_the_rest(rate, gaps):
    """
    However events are spaced, lines come in windows of one second that
    allow C{rate} lines each (so at most twice C{rate} within any second),
    and every line left out is counted once in a summing-up line.
    """
    clock = Clock()
    log = RecordingLog()
    budget = LineBudget(clock, rate, log)
    decisions, times = [], []
    for gap in gaps:
        clock.advance(gap)
        times.append(clock.seconds())
        decisions.append(budget.allow("grant", clock.seconds()))
    clock.advance(2)
    # The rule, stated directly: a window opens at the first event one second
    # or more after the last window opened, and lets its first `rate` lines through.
    expected, opened, used = [], None, 0
    for at in times:
        if opened is None or at - opened >= 1.0:
            opened, used = at, 0
        expected.append(used < rate)
        used += used < rate
    assert decisions == expected
    allowed = [at for at, ok in zip(times, decisions) if ok]
    for at in allowed:
        assert sum(1 for other in allowed if at <= other < at + 1.0) <= 2 * rate
    skipped = sum(line["count"] for line in log.lines)
    assert skipped == decisions.count(False)
    assert not clock.getDelayedCalls()


def test_line_budget_off():
    """Without a rate every line is allowed and nothing is scheduled."""
    clock = Clock()
    budget = LineBudget(clock, None, RecordingLog())
    assert all(budget.allow("grant", 0.0) for _ in range(1000))
    assert not clock.getDelayedCalls()


class StateActivityTests(TrackerTestCase):
    """What the state records as requests are served, over the real adapter."""

    def test_grant_and_release_lines(self):
        """One line per grant and one per release, with key, server, client and
        user; never the matchkey."""
        server, client = self.peer("10.0.0.2"), self.peer("10.0.0.3")
        with capturedLogs() as events:
            server.ask([PUT, "rasp", [9090, "rasp:0.123456789"], None])
            self.clock.advance(2)
            client.send([REQUEST, "rasp", "alice", 1])
            self.clock.advance(7)
            server.ask([PUT, "rasp", [9090, "rasp:0.987654321"], None])
        text = lines(events)
        grants = [t for t in text if t.startswith("granted")]
        releases = [t for t in text if t.startswith("released")]
        self.assertEqual(len(grants), 1)
        self.assertEqual(len(releases), 1)
        self.assertIn("rasp server 10.0.0.2:9090 to 10.0.0.3:", grants[0])
        self.assertIn("'alice'", grants[0])
        self.assertIn("for 7.000 s", releases[0])
        self.assertNotIn("123456789", " ".join(text))
        self.assertNotIn("987654321", " ".join(text))
        activity = self.state.activity
        self.assertEqual((activity.grants, activity.releases, activity.requests), (1, 1, 1))
        self.assertEqual([e.kind for e in activity.events()], ["join", "grant", "release"])

    def test_wait_time_observed_at_grant(self):
        """The wait from REQUEST to grant goes into the histogram."""
        client, server = self.peer(), self.peer("10.0.0.2")
        client.send([REQUEST, "k", "", 1])
        self.clock.advance(42)
        server.ask([PUT, "k", [1, "k:1"], None])
        waits = self.state.activity.wait_times
        self.assertEqual(waits.count, 1)
        self.assertEqual(waits.total, 42)
        self.assertEqual(dict(waits.cumulative())["30.0"], 0)
        self.assertEqual(dict(waits.cumulative())["60.0"], 1)

    def test_join_leave_withdraw_expire(self):
        """A server's first PUT joins, its close leaves; a waiting client that
        leaves is withdrawn; a deadline that passes expires."""
        server, quitter, patient = self.peer("10.0.0.2"), self.peer(), self.peer()
        server.ask([PUT, "k", [9000, "k:1"], None])
        server.ask([PUT, "k", [9000, "k:2"], None])
        quitter.send([REQUEST, "j", "q", 1])
        patient.send([REQUEST, "j", "p", 1, {"timeout": 5}])
        self.clock.advance(3)
        quitter.lose()
        self.clock.advance(3)
        server.lose()
        recent = self.state.activity.events()
        self.assertEqual([e.kind for e in recent], ["join", "withdraw", "expire", "leave"])
        self.assertEqual(recent[1].seconds, 3)
        self.assertEqual(recent[2].seconds, 5)
        self.assertIn("(2 free, 0 handed out)", recent[3].text())
        activity = self.state.activity
        self.assertEqual((activity.withdrawn, activity.expired), (1, 1))

    def test_join_via_proxy(self):
        """A server PUT by a proxy's connection joins "via a proxy"."""
        proxy = self.peer("10.0.0.5")
        proxy.ask([5, {"key": "proxy-entry:k", "addr": [None, 9190]}])
        proxy.ask([PUT, "k", [9190, "k:1"], None])
        self.assertEqual(self.state.activity.events()[-1].text(),
                         "server 10.0.0.5:9190 of k joined via a proxy")

    def test_faults_counted_by_reason(self):
        """Connections closed for a fault are counted by reason and kept in the
        ring; an idle close is no fault."""
        self.use_limits(max_pending=1, idle_timeout=10)
        self.peer("10.6.6.1").protocol.dataReceived(encode_frame([42]))
        self.peer("10.6.6.2").protocol.dataReceived(b"\xff\xff\xff\xff")
        greedy = self.peer("10.6.6.3")
        greedy.send([REQUEST, "k", "", 1], [REQUEST, "k", "", 1])
        self.peer("10.6.6.4")
        self.clock.advance(11)
        activity = self.state.activity
        self.assertEqual(activity.errors, {"bad_message": 1, "bad_frame": 1, "limit": 1})
        drops = [e for e in activity.events() if e.kind == "drop"]
        self.assertEqual([e.client.split(":")[0] for e in drops],
                         ["10.6.6.1", "10.6.6.2", "10.6.6.3"])

    def test_open_connections_counted(self):
        """Admitted connections are counted while open; refused ones are faults."""
        self.use_limits(max_connections_per_address=2)
        a, b = self.peer("10.1.1.1"), self.peer("10.1.1.1")
        activity = self.state.activity
        self.assertEqual((activity.connections_open, activity.connections_total), (2, 2))
        refused = Peer(self.factory, "10.1.1.1", 1)
        self.assertTrue(refused.closed)
        self.assertEqual(activity.errors, {"per_address": 1})
        a.lose()
        b.lose()
        self.assertEqual((activity.connections_open, activity.connections_total), (0, 2))


class RingTests(SynchronousTestCase):
    """The ring of recent events and the text of each kind."""

    def test_ring_is_bounded(self):
        """Only the last L{RECENT_EVENTS} events are kept."""
        activity = TrackerActivity(Clock(), log_rate=1)
        for i in range(RECENT_EVENTS + 30):
            activity.joined(float(i), "k", f"h:{i}")
        self.assertEqual(len(activity.events()), RECENT_EVENTS)
        self.assertEqual(activity.events()[0].server, "h:30")

    def test_every_kind_has_text(self):
        """Each kind renders to a line without leftover braces."""
        for kind in ("grant", "release", "join", "leave", "expire", "withdraw", "drop"):
            text = Event(0.0, kind, "k", "h:1", "c:2", "u", 1.5, " more").text()
            self.assertNotIn("{", text, kind)

    def test_budget_from_limits(self):
        """The state's line budget is the limits' C{activity_lines_per_second}."""
        state = TrackerState(Clock(), TrackerLimits(activity_lines_per_second=3))
        self.assertEqual(state.activity.budget.rate, 3)
