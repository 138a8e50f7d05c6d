"""A server's registration with a tracker, kept up for as long as the server runs.

It does what TVM's server does (C{_listen_loop} in C{tvm/rpc/server.py}), so
TVM's tracker and ours both understand it:

  - on every connection:
    C{UPDATE_INFO {"key": "server:<key>", "addr": [custom_addr, port]}},
    then C{PUT [key, [port, matchkey], custom_addr]} when a session slot is
    free;
  - every C{poll_period} seconds C{GET_PENDING_MATCHKEYS}; a matchkey the
    tracker handed out but nobody used for more than C{unmatched_timeout}
    seconds is replaced by a fresh one (a new PUT);
  - a fresh PUT whenever the session gate offers a new matchkey (after each
    session, or as a session starts when more slots are free);
  - when the tracker goes away, reconnect with backoff and register again.

Which matchkey is on offer is the gate's business
(L{SessionGate<tvm_rpc.server.gate.SessionGate>}, or anything with the same
C{key}/C{offered}/C{current_offer()}/C{renew()}/C{offer_changed}).
"""

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

from ..protocol.tracker_commands import GetPendingMatchkeys, Put, UpdateInfo
from ..protocol.keys import SERVER_PREFIX, redact_matchkeys
from ..transport import PEER_HANDSHAKE_TIMEOUT
from .link_errors import connect_reason
from .reach_report import ReachReport, ReportingEndpoint, reporting_policy
from .tracker import NotATracker, TrackerClientFactory

#: Seconds between GET_PENDING_MATCHKEYS polls (TVM's ping period).
POLL_PERIOD = 2.0
#: Seconds a handed-out matchkey may stay unused before it is replaced.
UNMATCHED_TIMEOUT = 4.0
#: Seconds a connected tracker has to echo the magic: a tracker does so at
#: once, a port of another kind (the tracker's --http, any other service) may
#: say nothing at all.
HANDSHAKE_TIMEOUT = PEER_HANDSHAKE_TIMEOUT


def _not_answering(failure, timeout):
    """
    @return: why a registration failed, in words, when the peer is not (or
        no longer) a tracker answering: the handshake timed out, the
        connection closed first, the echo was wrong; L{None} for anything
        else (logged with its traceback).
    """
    if failure.check(defer.TimeoutError):
        return (f"no answer to the tracker handshake in {timeout:g} s "
                "(is it a tracker's port?)")
    if failure.check(error.ConnectionDone, error.ConnectionLost):
        return "the connection closed before the tracker answered (is it a tracker's port?)"
    if failure.check(NotATracker):
        return connect_reason(failure.value)
    return None


def tracker_client_service(endpoint, clock, max_delay, prepare, report=None, peer=None,
                           log_violations=True):
    """
    @param endpoint: reaches the tracker.
    @param clock: an L{IReactorTime} for the backoff.
    @param max_delay: the longest wait between attempts, in seconds.
    @param prepare: called with each new L{TrackerClientProtocol}.
    @param report: a L{ReachReport} told when a failure streak starts and
        ends, or L{None} for a link that says nothing of it (one of many
        links to the same tracker).
    @param peer: the tracker's printable name for Twisted's own retry lines
        when there is no C{report} (else the report's).
    @param log_violations: whether each connection logs a peer that breaks the
        protocol (L{TrackerClientProtocol.log_violations}); off for an owner
        that says why itself.
    @return: a L{ClientService} that keeps a tracker connection up, with the
        reconnection backoff of every tracker link (the server's and the
        proxy's): from 0.5 s, growing 1.5 times per failure.
    """
    policy = backoffPolicy(initialDelay=0.5, maxDelay=max_delay, factor=1.5)
    name = report.peer if report is not None else peer
    if name is not None:
        endpoint = ReportingEndpoint(endpoint, name)
    if report is not None:
        policy = reporting_policy(policy, endpoint, report)
    factory = TrackerClientFactory()
    factory.log_violations = log_violations
    return ClientService(
        endpoint,
        factory,
        retryPolicy=policy,
        clock=clock,
        prepareConnection=prepare,
    )


@attrs.define(eq=False)
class MatchkeyPoller:
    """
    Polls a registered tracker connection, as TVM's server and proxy do:
    C{GET_PENDING_MATCHKEYS} every C{poll_period} seconds, and a matchkey the
    tracker handed out (it is no longer pending) that nobody used for more
    than C{unmatched_timeout} seconds is reported as stale, to be replaced.
    Every L{TrackerLink} polls with it.

    @ivar clock: an L{IReactorTime}.
    @ivar poll_period: seconds between polls.
    @ivar unmatched_timeout: seconds a handed-out matchkey may stay unused.
    @ivar current: returns the matchkey on offer now, or L{None}.
    @ivar stale: called with a matchkey handed out and never used.
    @ivar failed: called with C{(failure, what, protocol)} when a poll fails.
    """

    clock: object
    poll_period: float
    unmatched_timeout: float
    current: object
    stale: object
    failed: object
    _protocol: object = attrs.field(init=False, default=None)
    _call: object = attrs.field(init=False, default=None)
    _unmatched: int = attrs.field(init=False, default=0)

    def start(self, protocol):
        """Poll C{protocol}, a freshly registered tracker connection."""
        self._protocol = protocol
        self.reset()
        self._schedule()

    def stop(self):
        """Stop polling (the connection closed or the service stops)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._protocol = None

    def reset(self):
        """The matchkey on offer is new or was just PUT: count afresh."""
        self._unmatched = 0

    def _schedule(self):
        """Poll again after the poll period."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = self.clock.callLater(self.poll_period, self._poll)

    def _poll(self):
        """Ask the tracker which matchkeys of this connection are still pending."""
        self._call = None
        protocol = self._protocol
        if protocol is None:
            return
        asked = self.current()
        polled = protocol.call(GetPendingMatchkeys())
        polled.addCallback(self._polled, asked, protocol)
        polled.addErrback(self.failed, "GET_PENDING_MATCHKEYS", protocol)

    def _polled(self, pending, asked, protocol):
        """Count a poll in which the matchkey asked about was handed out but unused."""
        if protocol is not self._protocol:
            return
        self._schedule()
        if asked is None or asked != self.current() or asked in pending:
            self._unmatched = 0
            return
        self._unmatched += 1
        if self._unmatched * self.poll_period > self.unmatched_timeout:
            self.stale(asked)


class IRegisteredOffer(Interface):
    """
    One key offered to a tracker, as a L{TrackerLink} keeps it registered:
    the server's own (L{TrackerRegistration}) or one server waiting behind
    a proxy (L{tvm_rpc.proxy.registration}).
    """

    label = Attribute("names the offer in log lines")

    def update_info():
        """@return: the C{UPDATE_INFO} dict sent on every new connection."""

    def offer_on_connect(connection):
        """
        A new connection is about to PUT: the tracker forgot (or may have
        handed out) any matchkey offered before it.

        @param connection: how many connections were made so far, this one
            included.
        @return: the matchkey to PUT on it, or L{None} for none yet.
        """

    def current_matchkey():
        """@return: the matchkey on offer now, or L{None}."""

    def put(matchkey):
        """@return: the L{Put} command that offers C{matchkey}."""

    def renew_stale(matchkey):
        """Offer a fresh matchkey: C{matchkey} was handed out and never used."""


@attrs.frozen
class LinkSettings:
    """
    How a tracker link behaves (shared by every kind of registration).

    @ivar tracker: a printable name of the tracker, for log lines.
    @ivar poll_period: seconds between polls.
    @ivar unmatched_timeout: seconds before an unused matchkey is replaced.
    @ivar max_delay: the longest wait between reconnection attempts.
    """

    tracker: str = "tracker"
    poll_period: float = POLL_PERIOD
    unmatched_timeout: float = UNMATCHED_TIMEOUT
    max_delay: float = 5.0


@attrs.define(eq=False)
class TrackerLink:
    """
    One tracker connection that keeps one offer registered, kept up by a
    L{ClientService} with backoff.

    On every connection it sends C{UPDATE_INFO}, then C{PUT}s the offer's
    matchkey (if any), then polls with a L{MatchkeyPoller} and renews a
    matchkey handed out and never used. L{put_current} PUTs the offer's
    matchkey again after it changed. Closing the link (L{stop}) withdraws
    the PUT: trackers forget a connection's servers when it closes.

    @ivar endpoint: reaches the tracker.
    @ivar clock: an L{IReactorTime} for polls and backoff.
    @ivar offer: the L{IRegisteredOffer}.
    @ivar log: the owner's L{Logger}.
    @ivar settings: the link's L{LinkSettings}.
    @ivar warn_on_loss: whether a lost connection is logged as a warning.
    @ivar registrations: how many connections completed their registration.
    """

    endpoint: object
    clock: object
    offer: object
    log: Logger
    settings: LinkSettings = LinkSettings()
    warn_on_loss: bool = True
    registrations: int = attrs.field(init=False, default=0)
    protocol: object = attrs.field(init=False, default=None)
    _service: object = attrs.field(init=False, default=None)
    _poller: MatchkeyPoller = attrs.field(init=False, default=None)
    _connections: int = attrs.field(init=False, default=0)
    _registered: list = attrs.field(init=False, factory=list)
    _report: object = attrs.field(init=False, default=None)
    _not_registering: bool = attrs.field(init=False, default=False)

    def __attrs_post_init__(self):
        """Poll as configured; report failure streaks when losses are worth a warning."""
        if self.warn_on_loss:
            self._report = ReachReport(self.settings.tracker, self.log)
        self._poller = MatchkeyPoller(
            self.clock,
            self.settings.poll_period,
            self.settings.unmatched_timeout,
            current=self.offer.current_matchkey,
            stale=self.offer.renew_stale,
            failed=self._call_failed,
        )

    def start(self):
        """Start connecting to the tracker."""
        self._service = tracker_client_service(
            self.endpoint, self.clock, self.settings.max_delay, self._prepare, self._report,
            self.settings.tracker, log_violations=False)
        self._service.startService()

    def stop(self):
        """
        Stop polling and close the connection (which withdraws the PUT).

        @return: a Deferred that fires once it is closed.
        """
        self._poller.stop()
        self.protocol = None
        service, self._service = self._service, None
        if service is None:
            return defer.succeed(None)
        return service.stopService()

    def when_registered(self):
        """
        @return: a Deferred firing with the tracker protocol at the next
            completed registration (at once if registered now).
        """
        if self.protocol is not None:
            return defer.succeed(self.protocol)
        waiter = defer.Deferred()
        self._registered.append(waiter)
        return waiter

    def put_current(self):
        """PUT the offer's current matchkey (it changed), if registered."""
        self._poller.reset()
        protocol = self.protocol
        matchkey = self.offer.current_matchkey()
        if protocol is None or matchkey is None:
            return
        put = protocol.call(self.offer.put(matchkey))
        put.addErrback(self._call_failed, "PUT", protocol)

    def _prepare(self, protocol):
        # Registration runs beside the connection rather than as its
        # preparation: ClientService keeps a connection whose preparation
        # failed open, and then cannot handle its loss. A failed registration
        # closes the connection instead, and ClientService reconnects.
        registering = defer.Deferred.fromCoroutine(self._register(protocol))
        registering.addErrback(self._registration_failed, protocol)

    def _registration_failed(self, failure, protocol):
        if self._service is not None:
            reason = _not_answering(failure, HANDSHAKE_TIMEOUT)
            if reason is None:
                self.log.failure("registering with {tracker} failed; reconnecting", failure,
                                 tracker=self.settings.tracker)
            elif not self._not_registering:
                self._not_registering = True
                self.log.warn("cannot register with {tracker}: {reason}; retrying",
                              tracker=self.settings.tracker, reason=reason)
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()

    async def _register(self, protocol):
        # A TimeoutError at the timeout; the cancellation drops the connection.
        await protocol.ready.addTimeout(HANDSHAKE_TIMEOUT, self.clock)
        self._connections += 1
        await protocol.call(UpdateInfo(self.offer.update_info()))
        matchkey = self.offer.offer_on_connect(self._connections)
        if matchkey is not None:
            await protocol.call(self.offer.put(matchkey))
        if self._service is None:
            protocol.transport.loseConnection()
            return
        self.protocol = protocol
        self.registrations += 1
        self._not_registering = False
        if self._report is not None:
            self._report.reached()
        self.log.info(
            "registered {what} with {tracker} (matchkey {matchkey})",
            what=self.offer.label,
            tracker=self.settings.tracker,
            matchkey=redact_matchkeys(matchkey),
        )
        protocol.when_closed().addBoth(self._lost, protocol)
        self._poller.start(protocol)
        waiters, self._registered = self._registered, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _lost(self, reason, protocol):
        if self.protocol is protocol:
            self.protocol = None
            self._poller.stop()
            if self.warn_on_loss and self._service is not None:
                self.log.warn("lost {tracker}; reconnecting", tracker=self.settings.tracker)

    def _call_failed(self, failure, what, protocol):
        self.log.failure(
            "{what} to {tracker} failed; reconnecting", failure, what=what, tracker=self.settings.tracker
        )
        if protocol is self.protocol and protocol.transport is not None:
            protocol.transport.abortConnection()


@implementer(IRegisteredOffer)
@attrs.define(eq=False)
class _GateOffer:
    """A server's own offer: its key, and the matchkey its session gate offers."""

    registration: "TrackerRegistration"

    @property
    def label(self):
        """The server's key."""
        return self.registration.gate.key

    def update_info(self):
        """@return: C{server:<key>} at the server's address."""
        registration = self.registration
        return {"key": SERVER_PREFIX + registration.gate.key,
                "addr": [registration.custom_addr, registration.port]}

    def offer_on_connect(self, connection):
        """@return: a fresh offer: the tracker forgot the old matchkey with the old connection."""
        gate = self.registration.gate
        if gate.offered is not None:
            gate.offered = None
        return gate.current_offer()

    def current_matchkey(self):
        """@return: the gate's offered matchkey."""
        return self.registration.gate.offered

    def put(self, matchkey):
        """@return: the PUT of C{matchkey} at the server's port and address."""
        registration = self.registration
        return Put(registration.gate.key, registration.port, matchkey, registration.custom_addr)

    def renew_stale(self, matchkey):
        """Have the gate offer a fresh matchkey."""
        self.registration.log.info(
            "matchkey {matchkey} was handed out but never used; offering a fresh one",
            matchkey=redact_matchkeys(matchkey),
        )
        self.registration.gate.renew()


@attrs.define(eq=False)
class TrackerRegistration(Service):
    """
    Keeps one server registered with one tracker (a L{TrackerLink}).

    @ivar endpoint: reaches the tracker.
    @ivar gate: decides the matchkey on offer; its C{offer_changed} hook is
        taken over by this service while it runs.
    @ivar port: the server's port as reported to the tracker.
    @ivar custom_addr: the address clients should use, or L{None} for the one
        the tracker sees.
    @ivar clock: the reactor: an L{IReactorTime} for polls and backoff.
    @ivar settings: the link's L{LinkSettings}.
    """

    log = Logger()

    endpoint: object
    gate: object
    port: int
    custom_addr: "str | None"
    clock: object
    settings: LinkSettings = LinkSettings()
    _link: TrackerLink = attrs.field(init=False, default=None)

    def __attrs_post_init__(self):
        """Initialise the L{Service} part and the link."""
        Service.__init__(self)
        self._link = TrackerLink(
            self.endpoint, self.clock, _GateOffer(self), self.log, self.settings)

    @property
    def registrations(self):
        """How many connections completed their registration."""
        return self._link.registrations

    @property
    def _protocol(self):
        """The registered tracker connection, or L{None}."""
        return self._link.protocol

    @property
    def registered(self):
        """Whether a tracker connection holds the registration now."""
        return self._link.protocol is not None

    def startService(self):
        """Start connecting to the tracker."""
        Service.startService(self)
        self.gate.offer_changed = self._link.put_current
        self._link.start()

    def stopService(self):
        """Stop polling and close the tracker connection (which withdraws the PUT)."""
        Service.stopService(self)
        self.gate.offer_changed = None
        return self._link.stop()

    def when_registered(self):
        """
        @return: a Deferred firing with the tracker protocol at the next
            completed registration (at once if registered now).
        """
        return self._link.when_registered()
