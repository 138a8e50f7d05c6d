"""Tracker mode: advertise the servers waiting behind the proxy.

TVM's tracker protocol has no command that withdraws one PUT: a tracker drops
a connection's free servers only when that connection closes. So that a
server leaving the proxy leaves the tracker at once, every waiting server
gets a tracker connection of its own (a L{TrackerLink} of a L{_WaitingServer}) that says
C{UPDATE_INFO {"key": "proxy-entry:<key>", ...}} (an info key not starting
with C{server}, so trackers do not list it as a server), PUTs the server's
matchkey, polls GET_PENDING_MATCHKEYS and renews a matchkey that was handed
out but never used. Closing that connection takes the entry out of the
tracker, on TVM's tracker and ours alike.

One more connection reports the proxy itself as TVM's proxy does:
C{UPDATE_INFO {"key": "server:proxy[key1,key2,...]", "addr": [null, port]}}
listing the keys currently waiting, so C{query_rpc_tracker} shows the
servers behind the proxy.

Every link is a L{ClientService} with backoff: after a tracker restart each
one reconnects and registers again (with a fresh matchkey, since the old one
may have been handed out before the restart).
"""

import attrs
from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from ..client.reach_report import ReachReport
from ..client.registration import (
    IRegisteredOffer,
    LinkSettings,
    TrackerLink,
    tracker_client_service,
)
from ..protocol.tracker_commands import Put, UpdateInfo
from ..protocol.keys import PROXY_ENTRY_PREFIX, proxy_info_key, redact_matchkeys
from .pairing import IOfferObserver

#: Seconds between GET_PENDING_MATCHKEYS polls (TVM's proxy: 2).
POLL_PERIOD = 2.0
#: Seconds a handed-out matchkey may stay unused before it is renewed (TVM's proxy: 5).
UNMATCHED_TIMEOUT = 5.0
def _prepared(protocol, coroutine):
    """
    Run a registration coroutine for C{ClientService}'s C{prepareConnection}.

    C{ClientService} neither closes a connection whose preparation failed nor
    one whose preparation it cancelled (when stopped), so this does.

    @return: a Deferred of the coroutine's result.
    """

    def failed(failure):
        """Drop the connection the preparation was for."""
        transport = getattr(protocol, "transport", None)
        if transport is not None:
            transport.abortConnection()
        return failure

    return defer.Deferred.fromCoroutine(coroutine).addErrback(failed)


def link_settings(tracker):
    """
    @param tracker: a printable name of the tracker, for log lines.
    @return: the L{LinkSettings} of the proxy's links (TVM's proxy's timing).
    """
    return LinkSettings(tracker, POLL_PERIOD, UNMATCHED_TIMEOUT)


@implementer(IOfferObserver)
@attrs.define(eq=False)
class ProxyRegistration(Service):
    """
    Keeps the servers behind the proxy registered with one tracker.

    Install it as the pool's observer (C{pool.observer = registration}).

    @ivar endpoint: an L{IStreamClientEndpoint} reaching the tracker.
    @ivar pool: the L{PairingPool} in tracker mode.
    @ivar clock: an L{IReactorTime} for polls and backoff.
    @ivar get_port: returns the proxy's listening port (known once bound).
    @ivar settings: the L{LinkSettings} of its links.
    """

    log = Logger()

    endpoint: object
    pool: object
    clock: object
    get_port: object
    settings: LinkSettings = attrs.field(factory=lambda: link_settings("tracker"))
    _links: dict = attrs.field(init=False, factory=dict)
    _summary: object = attrs.field(init=False, default=None)
    _summary_protocol: object = attrs.field(init=False, default=None)
    _reported: object = attrs.field(init=False, default=None)
    _reach: object = attrs.field(init=False, default=None)

    def startService(self):
        """Connect the proxy's own link and one link per waiting server."""
        Service.startService(self)
        # Only the proxy's own link reports failure streaks: the per-server
        # links reach the same tracker and would repeat its line.
        self._reach = ReachReport(self.settings.tracker, self.log)
        self._summary = tracker_client_service(
            self.endpoint, self.clock, self.settings.max_delay, self._announce, self._reach)
        self._summary.startService()
        for offer in self.pool.offers():
            self.offered(offer)

    def stopService(self):
        """Close every tracker connection (which withdraws every PUT)."""
        Service.stopService(self)
        stopping = [link.stop() for link in self._links.values()]
        self._links.clear()
        if self._summary is not None:
            stopping.append(self._summary.stopService())
            self._summary = None
        self._summary_protocol = None
        return defer.DeferredList(stopping)

    def links(self):
        """@return: the number of per-server links (for tests and status)."""
        return len(self._links)

    # IOfferObserver

    def offered(self, offer):
        """A server waits: open its link and report the proxy's keys."""
        if not self.running or offer in self._links:
            return
        link = self._links[offer] = TrackerLink(
            self.endpoint, self.clock, _WaitingServer(self, offer), self.log, self.settings,
            warn_on_loss=False,
        )
        link.start()
        self._report()

    def renewed(self, offer, old_matchkey):
        """PUT the fresh matchkey on the server's link."""
        link = self._links.get(offer)
        if link is not None:
            link.put_current()

    def withdrawn(self, offer):
        """The server paired or left: close its link and report the keys."""
        link = self._links.pop(offer, None)
        if link is not None:
            link.stop()
        self._report()

    # the proxy's own link

    def _announce(self, protocol):
        """C{prepareConnection} of the proxy's own link."""
        return _prepared(protocol, self._announce_on(protocol))

    async def _announce_on(self, protocol):
        """Report C{server:proxy[...]} on a fresh connection."""
        await protocol.ready
        keys = self.pool.keys()
        await protocol.call(UpdateInfo(
            {"key": proxy_info_key(keys), "addr": [None, self.get_port()]}))
        self._reported = keys
        self._summary_protocol = protocol
        protocol.when_closed().addBoth(self._summary_lost, protocol)
        self._reach.reached()
        self.log.info("reported {info} to {tracker}", info=proxy_info_key(keys),
                      tracker=self.settings.tracker)
        self._report()

    def _summary_lost(self, _, protocol):
        """The proxy's own link closed; C{ClientService} reconnects it."""
        if self._summary_protocol is protocol:
            self._summary_protocol = None
            if self.running:
                self.log.warn("lost {tracker}; reconnecting", tracker=self.settings.tracker)

    def _report(self):
        """Send UPDATE_INFO again when the waiting keys changed."""
        protocol = self._summary_protocol
        keys = self.pool.keys()
        if protocol is None or keys == self._reported:
            return
        self._reported = keys
        call = protocol.call(UpdateInfo(
            {"key": proxy_info_key(keys), "addr": [None, self.get_port()]}))
        call.addErrback(_abort_on_failure, protocol, "UPDATE_INFO", self.settings.tracker)


def _abort_on_failure(failure, protocol, what, tracker):
    """Log a failed tracker call and drop the link, which reconnects."""
    ProxyRegistration.log.failure("{what} to {tracker} failed; reconnecting", failure,
                                  what=what, tracker=tracker)
    if protocol.transport is not None:
        protocol.transport.abortConnection()


@implementer(IRegisteredOffer)
@attrs.define(eq=False)
class _WaitingServer:
    """The offer of one server waiting behind the proxy: its key, its matchkey in the pool."""

    owner: ProxyRegistration
    offer: object

    @property
    def label(self):
        """The server's key, behind the proxy."""
        return f"{self.offer.key} behind the proxy"

    def update_info(self):
        """@return: C{proxy-entry:<key>} (not listed as a server) at the proxy's port."""
        return {"key": PROXY_ENTRY_PREFIX + self.offer.key, "addr": [None, self.owner.get_port()]}

    def offer_on_connect(self, connection):
        """
        @return: the server's matchkey; renewed first on a later connection,
            as the old one may have been handed out before the tracker went away.
        """
        if connection > 1:
            self.owner.pool.renew(self.offer)
        return self.offer.matchkey

    def current_matchkey(self):
        """@return: the server's matchkey in the pool."""
        return self.offer.matchkey

    def put(self, matchkey):
        """@return: the PUT of C{matchkey} at the proxy's port."""
        return Put(self.offer.key, self.owner.get_port(), matchkey, None)

    def renew_stale(self, matchkey):
        """Renew the matchkey in the pool (the server keeps its key)."""
        self.owner.log.info(
            "matchkey {matchkey} of {key} was handed out but never used; renewing",
            matchkey=redact_matchkeys(matchkey), key=self.offer.key)
        self.owner.pool.renew(self.offer)
