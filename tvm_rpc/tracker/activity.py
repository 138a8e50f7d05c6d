"""What the tracker did lately: counters, the wait-time histogram, a ring of
recent events, and the log lines of grants and releases.

Sans-IO: time comes from an injected L{IReactorTime}; lines go to a
L{twisted.logger.Logger}. Grants and releases are on the tracker's hot path
(one each per session), so recording one is a few attribute updates and one
plain tuple holding the lease; its L{Event} and text are made only for the
lines logged and when the status page reads the ring. Log lines are bounded (L{LineBudget}): a flood of grants is summed up
instead of written line by line.
"""

from collections import deque
from typing import NamedTuple

import attrs

from ..daemon.histogram import Histogram
from ..daemon.logs import logger

#: Upper bounds (seconds) of the wait-time histogram's buckets: a free server
#: answers at once; a busy lab makes clients wait seconds to hours.
WAIT_BUCKETS = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 600.0, 1800.0, 3600.0)
#: How many recent events the ring keeps.
RECENT_EVENTS = 100

#: The text of each kind of event, in the format language of both
#: C{str.format} and L{twisted.logger} (one source for log lines and the page).
EVENT_FORMATS = {
    "grant": "granted {key} server {server} to {client} (user {user!r}) after waiting "
             "{seconds:.3f} s",
    "release": "released {key} server {server} held by {client} (user {user!r}) for "
               "{seconds:.3f} s",
    "join": "server {server} of {key} joined{detail}",
    "leave": "server {server} of {key} left{detail}",
    "expire": "request for {key} from {client} (user {user!r}) expired after {seconds:g} s",
    "withdraw": "request for {key} from {client} (user {user!r}) withdrawn after "
                "{seconds:.3f} s: the client left",
    "drop": "closed connection from {client}: {detail}",
}


class Event(NamedTuple):
    """
    One thing the tracker did.

    @ivar at: when (clock seconds).
    @ivar kind: a key of L{EVENT_FORMATS}.
    @ivar key: the device key concerned, or C{""}.
    @ivar server: the server's C{host:port}, or C{""}.
    @ivar client: the client's (or peer's) C{host:port}, or C{""}.
    @ivar user: the user named in the request, or C{""}.
    @ivar seconds: waited (grant), held (release), the deadline (expire).
    @ivar detail: more words (the reason of a drop), or C{""}.
    """

    at: float
    kind: str
    key: str = ""
    server: str = ""
    client: str = ""
    user: str = ""
    seconds: float = 0.0
    detail: str = ""

    def text(self):
        """@return: the event as one line of text (as logged)."""
        return EVENT_FORMATS[self.kind].format(**self._asdict())

    @classmethod
    def of_lease(cls, kind, at, lease, seconds):
        """
        @param kind: C{"grant"} or C{"release"}.
        @param lease: the L{tvm_rpc.tracker.state.Lease} granted or released.
        @return: the event of a grant or a release.
        """
        return cls(at, kind, lease.key, f"{lease.host}:{lease.port}",
                   address(lease.client_host, lease.client_port), lease.user, seconds)


def address(host, port):
    """@return: C{host:port}, or C{host} alone when there is no port."""
    return host if port is None else f"{host}:{port}"


@attrs.define(eq=False)
class LineBudget:
    """
    At most C{rate} activity lines a second; past that lines are counted by
    kind, and one line at the end of the second says how many were left out.

    @ivar clock: an L{IReactorTime}.
    @ivar rate: lines allowed per second, or L{None} for no bound.
    @ivar log: the L{twisted.logger.Logger} of the summing-up line.
    """

    clock: object
    rate: "int | None"
    log: object
    _window: float = attrs.field(default=float("-inf"), init=False)
    _used: int = attrs.field(default=0, init=False)
    _skipped: dict = attrs.field(factory=dict, init=False)
    _report_call: object = attrs.field(default=None, init=False)

    def allow(self, kind, now):
        """
        @param kind: the kind of line about to be written.
        @param now: the clock's time.
        @return: whether it may be written now; if not, it is counted.
        """
        if self.rate is None:
            return True
        if now - self._window >= 1.0:
            self._window = now
            self._used = 0
        if self._used < self.rate:
            self._used += 1
            return True
        self._skipped[kind] = self._skipped.get(kind, 0) + 1
        if self._report_call is None:
            self._report_call = self.clock.callLater(
                max(0.0, self._window + 1.0 - now), self._report)
        return False

    def _report(self):
        """Say how many lines were left out in the second that just ended."""
        self._report_call = None
        skipped, self._skipped = self._skipped, {}
        counts = ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items()))
        self.log.info("{count} more activity lines not logged in the last second "
                      "(at most {rate} a second): {counts}", count=sum(skipped.values()),
                      rate=self.rate, counts=counts)


@attrs.define(eq=False)
class TrackerActivity:
    """
    The tracker's counters, wait times and recent events, fed by the
    L{tvm_rpc.tracker.state.TrackerState} and the protocol adapter.

    @ivar clock: an L{IReactorTime}.
    @ivar log_rate: activity lines logged per second at most, or L{None}.
    @ivar log: where the lines go.
    @ivar started: when the tracker started (clock seconds).
    @ivar recent: the last L{RECENT_EVENTS} events, oldest first: L{Event}s,
        or for grants and releases C{(kind, at, lease, seconds)} tuples (see
        L{events}).
    @ivar wait_times: how long granted requests waited, a L{Histogram} of
        L{WAIT_BUCKETS}.
    @ivar errors: connections closed for a fault, by reason (a short name).
    """

    clock: object
    log_rate: "int | None" = 100
    log: object = attrs.field(factory=lambda: logger("tvm_rpc.tracker"))
    started: float = attrs.field(init=False)
    recent: deque = attrs.field(factory=lambda: deque(maxlen=RECENT_EVENTS), init=False)
    wait_times: Histogram = attrs.field(factory=lambda: Histogram(WAIT_BUCKETS), init=False)
    budget: LineBudget = attrs.field(init=False)
    grants: int = attrs.field(default=0, init=False)
    releases: int = attrs.field(default=0, init=False)
    requests: int = attrs.field(default=0, init=False)
    expired: int = attrs.field(default=0, init=False)
    withdrawn: int = attrs.field(default=0, init=False)
    connections_open: int = attrs.field(default=0, init=False)
    connections_total: int = attrs.field(default=0, init=False)
    errors: dict = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self):
        """Note the start time; build the line budget."""
        self.started = self.clock.seconds()
        self.budget = LineBudget(self.clock, self.log_rate, self.log)

    def events(self):
        """@return: the ring as L{Event}s, oldest first."""
        return [record if isinstance(record, Event) else Event.of_lease(*record)
                for record in self.recent]

    def record(self, event):
        """Keep C{event} in the ring and log it, within the line budget."""
        self.recent.append(event)
        if self.budget.allow(event.kind, event.at):
            self.log.info(EVENT_FORMATS[event.kind], **event._asdict())

    def _lease_event(self, kind, at, lease, seconds):
        """Keep a grant or a release in the ring and log it, within the line budget."""
        record = (kind, at, lease, seconds)
        self.recent.append(record)
        if self.budget.allow(kind, at):
            self.log.info(EVENT_FORMATS[kind], **Event.of_lease(*record)._asdict())

    def granted(self, lease, waited):
        """
        A request got a server.

        @param lease: the L{tvm_rpc.tracker.state.Lease} made.
        @param waited: seconds the request waited.
        """
        self.grants += 1
        self.wait_times.observe(waited)
        self._lease_event("grant", lease.since, lease, waited)

    def released(self, lease, now):
        """A handed-out server is free again, or gone (its lease ended at C{now})."""
        self.releases += 1
        self._lease_event("release", now, lease, now - lease.since)

    def requested(self):
        """A REQUEST arrived."""
        self.requests += 1

    def joined(self, now, key, server, detail=""):
        """A connection offered its first server (C{server} is C{host:port})."""
        self.record(Event(now, "join", key, server, detail=detail))

    def left(self, now, key, server, detail=""):
        """A connection that had offered servers closed."""
        self.record(Event(now, "leave", key, server, detail=detail))

    def request_ended(self, now, kind, pending, client, seconds):
        """
        A waiting request left its queue unanswered.

        @param kind: C{"expire"} (its deadline passed) or C{"withdraw"} (its
            client left).
        @param pending: the L{tvm_rpc.tracker.state.PendingRequest}.
        @param client: the client's C{host:port}.
        @param seconds: the deadline (expire) or the time waited (withdraw).
        """
        if kind == "expire":
            self.expired += 1
        else:
            self.withdrawn += 1
        self.record(Event(now, kind, pending.key, "", client, pending.user, seconds))

    def connection_opened(self):
        """A connection was admitted."""
        self.connections_open += 1
        self.connections_total += 1

    def connection_closed(self):
        """An admitted connection ended."""
        self.connections_open -= 1

    def fault(self, reason, peer=None, detail=""):
        """
        Count a connection closed or refused for a fault.

        @param reason: a short name (C{"bad_frame"}, C{"limit"}, ...), the
            label of the C{errors} counters.
        @param peer: the peer's C{host:port} when the event belongs in the
            ring (refusals in bulk do not); the line itself is the adapter's.
        @param detail: the reason in words, for the ring.
        """
        self.errors[reason] = self.errors.get(reason, 0) + 1
        if peer is not None:
            self.recent.append(Event(self.clock.seconds(), "drop", client=peer, detail=detail))
