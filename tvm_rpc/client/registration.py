"""A server's registration with a tracker, kept up for as long as the server runs.

It does what TVM's server does (``_listen_loop`` in ``tvm/rpc/server.py``), so
TVM's tracker and ours both understand it:

- on every connection: ``UPDATE_INFO {"key": "server:<key>", "addr": [custom_addr, port]}``,
  then ``PUT [key, [port, matchkey], custom_addr]`` when a session slot is free;
- every ``poll_period`` seconds ``GET_PENDING_MATCHKEYS``; a matchkey the
  tracker handed out but nobody used for more than ``unmatched_timeout``
  seconds is replaced by a fresh one (a new PUT);
- a fresh PUT whenever the session gate offers a new matchkey (after each
  session, or as a session starts when more slots are free);
- when the tracker goes away, reconnect with backoff and register again.

Which matchkey is on offer is the gate's business
(:class:`tvm_rpc.server.gate.SessionGate`, or anything with the same
``key``/``offered``/``current_offer()``/``renew()``/``offer_changed``).
"""

import attrs
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from ..protocol.tracker_commands import GetPendingMatchkeys, Put, UpdateInfo
from ..protocol.keys import SERVER_PREFIX, redact_matchkeys
from .tracker import TrackerClientFactory

#: Seconds between GET_PENDING_MATCHKEYS polls (TVM's ping period).
POLL_PERIOD = 2.0
#: Seconds a handed-out matchkey may stay unused before it is replaced.
UNMATCHED_TIMEOUT = 4.0


def retry_policy(max_delay):
    """
    @param max_delay: the longest wait between attempts, in seconds.
    @return: the reconnection backoff of every tracker link (the server's
        and the proxy's): from 0.5 s, growing 1.5 times per failure.
    """
    return backoffPolicy(initialDelay=0.5, maxDelay=max_delay, factor=1.5)


@attrs.define(eq=False)
class MatchkeyPoller:
    """
    Polls a registered tracker connection, as TVM's server and proxy do:
    C{GET_PENDING_MATCHKEYS} every C{poll_period} seconds, and a matchkey the
    tracker handed out (it is no longer pending) that nobody used for more
    than C{unmatched_timeout} seconds is reported as stale, to be replaced.
    The server's L{TrackerRegistration} and the proxy's per-server links
    (L{tvm_rpc.proxy.registration}) both poll with it.

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


@attrs.define(eq=False)
class TrackerRegistration(Service):
    """
    Keeps one server registered with one tracker.

    @ivar endpoint: reaches the tracker.
    @ivar gate: decides the matchkey on offer; its C{offer_changed} hook is
        taken over by this service while it runs.
    @ivar port: the server's port as reported to the tracker.
    @ivar custom_addr: the address clients should use, or L{None} for the one
        the tracker sees.
    @ivar clock: the reactor: an L{IReactorTime} for polls and backoff.
    @ivar poll_period: seconds between polls.
    @ivar unmatched_timeout: seconds before an unused matchkey is replaced.
    @ivar max_delay: the longest wait between reconnection attempts.
    @ivar tracker: a printable name of the tracker, for log lines.
    """

    log = Logger()

    endpoint: object
    gate: object
    port: int
    custom_addr: "str | None"
    clock: object
    poll_period: float = POLL_PERIOD
    unmatched_timeout: float = UNMATCHED_TIMEOUT
    max_delay: float = 5.0
    tracker: str = "tracker"
    registrations: int = attrs.field(init=False, default=0)
    _client: object = attrs.field(init=False, default=None)
    _protocol: object = attrs.field(init=False, default=None)
    _poller: MatchkeyPoller = attrs.field(init=False, default=None)
    _registered: list = attrs.field(init=False, factory=list)

    def __attrs_post_init__(self):
        """Initialise the L{Service} part and the poller."""
        Service.__init__(self)
        self._poller = MatchkeyPoller(
            self.clock,
            self.poll_period,
            self.unmatched_timeout,
            current=lambda: self.gate.offered,
            stale=self._stale,
            failed=self._call_failed,
        )

    def startService(self):
        """Start connecting to the tracker."""
        Service.startService(self)
        self.gate.offer_changed = self._offer_changed
        self._client = ClientService(
            self.endpoint,
            TrackerClientFactory(),
            retryPolicy=retry_policy(self.max_delay),
            clock=self.clock,
            prepareConnection=self._prepare,
        )
        self._client.startService()

    def stopService(self):
        """Stop polling and close the tracker connection (which withdraws the PUT)."""
        Service.stopService(self)
        self._poller.stop()
        self.gate.offer_changed = None
        self._protocol = None
        client, self._client = self._client, None
        if client is None:
            return defer.succeed(None)
        return client.stopService()

    def when_registered(self):
        """
        @return: a Deferred firing with the tracker protocol at the next
            completed registration (at once if registered now).
        """
        if self._protocol is not None:
            return defer.succeed(self._protocol)
        waiter = defer.Deferred()
        self._registered.append(waiter)
        return waiter

    def _prepare(self, protocol):
        # Registration runs beside the connection rather than as its
        # preparation: ClientService keeps a connection whose preparation
        # failed open, and then cannot handle its loss. A failed registration
        # closes the connection instead, and ClientService reconnects.
        registering = defer.Deferred.fromCoroutine(self._register(protocol))
        registering.addErrback(self._registration_failed, protocol)

    def _registration_failed(self, failure, protocol):
        self.log.failure(
            "registering with {tracker} failed; reconnecting", failure, tracker=self.tracker
        )
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()

    async def _register(self, protocol):
        await protocol.ready
        key = self.gate.key
        await protocol.call(
            UpdateInfo({"key": SERVER_PREFIX + key, "addr": [self.custom_addr, self.port]})
        )
        if self.gate.offered is not None:
            # The tracker forgot the old matchkey with the old connection.
            self.gate.offered = None
        matchkey = self.gate.current_offer()
        if matchkey is not None:
            await protocol.call(Put(key, self.port, matchkey, self.custom_addr))
        if not self.running:
            return
        self._protocol = protocol
        self.registrations += 1
        self.log.info(
            "registered {key} with {tracker} (port {port}, matchkey {matchkey})",
            key=key,
            tracker=self.tracker,
            port=self.port,
            matchkey=redact_matchkeys(matchkey),
        )
        protocol.when_closed().addBoth(self._lost, protocol)
        self._poller.start(protocol)
        waiters, self._registered = self._registered, []
        for waiter in waiters:
            waiter.callback(protocol)

    def _lost(self, reason, protocol):
        if self._protocol is protocol:
            self._protocol = None
            self._poller.stop()
            if self.running:
                self.log.warn(
                    "lost {tracker}; reconnecting", tracker=self.tracker
                )

    def _offer_changed(self):
        self._poller.reset()
        protocol = self._protocol
        matchkey = self.gate.offered
        if protocol is None or matchkey is None:
            return
        put = protocol.call(Put(self.gate.key, self.port, matchkey, self.custom_addr))
        put.addErrback(self._call_failed, "PUT", protocol)

    def _call_failed(self, failure, what, protocol):
        self.log.failure(
            "{what} to {tracker} failed; reconnecting", failure, what=what, tracker=self.tracker
        )
        if protocol is self._protocol and protocol.transport is not None:
            protocol.transport.abortConnection()

    def _stale(self, matchkey):
        """Offer a fresh matchkey: C{matchkey} was handed out and never used."""
        self.log.info(
            "matchkey {matchkey} was handed out but never used; offering a fresh one",
            matchkey=redact_matchkeys(matchkey),
        )
        self.gate.renew()
