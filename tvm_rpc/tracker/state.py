"""The tracker's pure state: connections, free servers, waiting requests, leases.

No reactor and no transports: each connection talks back through an
L{ITrackerPeer}, time comes from an injected L{IReactorTime} (a
L{twisted.internet.task.Clock} in tests). Every operation costs O(log n) or
less; only L{TrackerState.summary} walks its (output-sized) collections.
"""

from collections import OrderedDict, deque

import attrs
from zope.interface import Interface

from ..protocol.keys import is_proxy_info_key
from ..protocol.tracker_commands import Allocation, BadMessage
from .activity import TrackerActivity, address
from .limits import TrackerLimits
from .scheduler import KeyLimitExceeded, Offer, Scheduler, Status, Waiter


#: TVM's tracker lists in C{server_info} every connection whose info key
#: starts with this, which includes proxies (C{server:proxy[key1,key2]}).
SERVER_INFO_PREFIX = "server"


class LimitExceeded(BadMessage):
    """A connection tried to hold more than its L{TrackerLimits} allow."""


class ITrackerPeer(Interface):
    """The far end of a tracker connection, as the state sees it."""

    def answer_request(pending, result):
        """
        Answer one of this peer's REQUESTs.

        @param pending: the L{PendingRequest} answered.
        @param result: an L{Allocation}, or a L{str} saying why it failed.
        """


def _provides(interface):
    """@return: an attrs validator checking that a value provides C{interface}."""
    def validate(instance, attribute, value):
        """@raise TypeError: when C{value} does not provide the interface."""
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name} must provide {interface.__name__}")

    return validate


@attrs.define(eq=False)
class Connection:
    """
    One peer connected to the tracker.

    @ivar peer: where answers go.
    @ivar host: the peer's address, used for servers that name no address.
    @ivar port: the peer's port (for the lease records), or L{None}.
    @ivar info: what the peer said about itself in UPDATE_INFO.
    @ivar offers: this connection's free servers by matchkey, in PUT order.
    @ivar requests: this connection's waiting requests.
    @ivar leases: this connection's servers handed out, per key, oldest first.
    @ivar joined: C{(key, "host:port")} of the first server it offered
        (PUT), or L{None} before that.
    """

    peer: object = attrs.field(validator=_provides(ITrackerPeer))
    host: str
    port: "int | None" = None
    info: dict = attrs.field(factory=dict)
    offers: OrderedDict = attrs.field(factory=OrderedDict)
    requests: dict = attrs.field(factory=dict)
    leases: dict = attrs.field(factory=dict)
    closed: bool = False
    joined: "tuple | None" = None

    @property
    def via_proxy(self):
        """Whether this connection speaks for a proxy (by its UPDATE_INFO key)."""
        key = self.info.get("key")
        return isinstance(key, str) and is_proxy_info_key(key)


@attrs.define(eq=False)
class ServerSlot:
    """
    What an L{Offer} carries: a free server and the connection that PUT it.

    @ivar since: when it was PUT (clock seconds).
    """

    connection: Connection
    key: str
    host: str
    port: int
    matchkey: str
    since: float = 0.0


@attrs.define(eq=False)
class PendingRequest(Waiter):
    """
    A REQUEST waiting for its answer: the scheduler's L{Waiter} itself.

    @ivar connection: who asked.
    @ivar user: the user named in the request.
    @ivar since: when it arrived (clock seconds).
    @ivar timer: the deadline's delayed call, if it has a deadline.
    """

    connection: Connection = attrs.field(kw_only=True, repr=False)
    user: str = attrs.field(kw_only=True, default="")
    since: float = attrs.field(kw_only=True, default=0.0)
    timer: object = attrs.field(kw_only=True, default=None, repr=False)


@attrs.frozen(eq=False)
class Lease:
    """
    A server handed out: who obtained it, until its connection PUTs again.

    @ivar server: the connection that PUT the server.
    """

    server: Connection = attrs.field(repr=False)
    key: str
    matchkey: str
    host: str
    port: int
    client_host: str
    client_port: "int | None"
    user: str
    priority: float
    since: float

    def to_json(self):
        """
        @return: the lease as listed in SUMMARY's C{leases}: who holds which
            server, never the matchkey (anyone may ask for SUMMARY, and the
            matchkey is what lets a client into the server).
        """
        return {
            "key": self.key,
            "host": self.host,
            "port": self.port,
            "client": [self.client_host, self.client_port],
            "user": self.user,
            "priority": self.priority,
            "since": self.since,
        }


@attrs.define(eq=False)
class TrackerState:
    """
    Everything the tracker knows, and the rules of TVM's tracker protocol.

    @ivar clock: an L{IReactorTime} for deadlines, lease times and the age
        of unused keys.
    @ivar limits: the L{TrackerLimits}; L{put} and L{request} raise
        L{LimitExceeded} beyond C{max_free}, C{max_pending} and C{max_keys},
        and L{request} queues a priority above C{max_priority} at
        C{max_priority}.
    @ivar scheduler: the L{Scheduler}, built from C{clock} and C{limits}.
    @ivar activity: the L{TrackerActivity} (counters, recent events, the
        grant and release lines), built from C{clock} and C{limits}.
    """

    clock: object
    limits: TrackerLimits = attrs.field(factory=TrackerLimits)
    scheduler: Scheduler = attrs.field(init=False)
    activity: TrackerActivity = attrs.field(init=False)
    _servers: dict = attrs.field(factory=dict, init=False)
    _leases: dict = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self):
        """Build the scheduler with the key limits and this clock."""
        self.scheduler = Scheduler(
            now=self.clock.seconds,
            idle_timeout=self.limits.key_idle_timeout,
            max_keys=self.limits.max_keys,
        )
        self.activity = TrackerActivity(self.clock, self.limits.activity_lines_per_second)

    def connect(self, peer, host, port=None):
        """
        Register a new connection.

        @param peer: an L{ITrackerPeer}.
        @param host: the peer's address.
        @param port: the peer's port, when it has one.
        @return: the L{Connection}.
        """
        return Connection(peer, host, port)

    def disconnect(self, connection):
        """
        Forget a connection: its free servers leave the queues, its waiting
        requests are withdrawn (never answered), its leases end.
        """
        if connection.closed:
            return
        connection.closed = True
        self._servers.pop(connection, None)
        offered = len(connection.offers)
        held = sum(len(leases) for leases in connection.leases.values())
        for offer in connection.offers.values():
            self.scheduler.remove(offer)
        connection.offers.clear()
        now = self.clock.seconds()
        for pending in list(connection.requests):
            if self._withdraw(pending):
                self.activity.request_ended(
                    now, "withdraw", pending, address(connection.host, connection.port),
                    now - pending.since)
        for leases in connection.leases.values():
            for lease in leases:
                self._end_lease(lease)
        connection.leases.clear()
        if connection.joined is not None:
            key, server = connection.joined
            self.activity.left(now, key, server, f" ({offered} free, {held} handed out)")

    def put(self, connection, command):
        """
        Offer a free server (PUT).

        The server's address is the custom address if the peer gave one,
        else the peer's own. PUTting a matchkey this connection already has
        free replaces it. A PUT ends the oldest lease of this connection for
        the same key: the server is free again.

        @param command: a L{tvm_rpc.protocol.tracker_commands.Put}.
        """
        limit = self.limits.max_free
        if len(connection.offers) >= limit and command.matchkey not in connection.offers:
            raise LimitExceeded(f"more than {limit} free servers")
        host = command.custom_addr if command.custom_addr is not None else connection.host
        now = self.clock.seconds()
        slot = ServerSlot(connection, command.key, host, command.port, command.matchkey, now)
        if connection.joined is None:
            connection.joined = (command.key, f"{host}:{command.port}")
            self.activity.joined(now, command.key, connection.joined[1],
                                 " via a proxy" if connection.via_proxy else "")
        offer = Offer(command.key, slot)
        old = connection.offers.pop(command.matchkey, None)
        if old is not None:
            self.scheduler.remove(old)
        ending = None
        leases = connection.leases.get(command.key)
        if leases:
            ending = leases.popleft()
            if not leases:
                del connection.leases[command.key]
        try:
            waiter = self.scheduler.put(offer)
        except KeyLimitExceeded as e:
            raise LimitExceeded(str(e)) from None
        # The lease ends after the put: ending it first could leave the key
        # unused for a moment, and a new key could then evict it.
        if ending is not None:
            self._end_lease(ending)
        if waiter is None:
            connection.offers[command.matchkey] = offer
        else:
            self._hand_out(waiter, slot)

    def request(self, connection, command):
        """
        Ask for a server (REQUEST); the answer goes to the peer, at once if a
        server is free, else when one is put or the deadline passes.

        @param command: a L{tvm_rpc.protocol.tracker_commands.Request}.
        @return: the L{PendingRequest}; its C{priority} is the one queued
            (at most C{limits.max_priority}).
        """
        limits = self.limits
        self.activity.requested()
        if len(connection.requests) >= limits.max_pending:
            raise LimitExceeded(f"more than {limits.max_pending} waiting requests")
        pending = PendingRequest(
            command.key, min(command.priority, limits.max_priority), connection=connection,
            user=command.user, since=self.clock.seconds(),
        )
        try:
            offer = self.scheduler.request(pending)
        except KeyLimitExceeded as e:
            raise LimitExceeded(str(e)) from None
        if offer is not None:
            self._hand_out(pending, offer.payload)
            return pending
        connection.requests[pending] = None
        if command.timeout is not None:
            pending.timer = self.clock.callLater(
                command.timeout, self._expire, pending, command.timeout
            )
        return pending

    def cancel(self, pending):
        """
        Withdraw a waiting request without answering it.

        @return: whether it was still waiting.
        """
        return self._withdraw(pending)

    def update_info(self, connection, command):
        """
        Merge what a peer says about itself (UPDATE_INFO), as TVM does: a null
        host in C{addr} becomes the peer's address.

        @param command: a L{tvm_rpc.protocol.tracker_commands.UpdateInfo}.
        """
        info = dict(command.info)
        addr = info.get("addr")
        if isinstance(addr, list) and len(addr) == 2 and addr[0] is None:
            info["addr"] = [connection.host, addr[1]]
        connection.info.update(info)
        key = connection.info.get("key")
        if isinstance(key, str) and key.startswith(SERVER_INFO_PREFIX):
            self._servers[connection] = None
        else:
            self._servers.pop(connection, None)

    def holds(self, connection):
        """
        @return: whether C{connection} holds anything: a waiting request, a
            free or handed-out server, or a server's info (TVM's servers and
            proxies keep their connection open, silent, between sessions).
        """
        return bool(
            connection.requests or connection.offers or connection.leases
            or connection in self._servers
        )

    def leases(self):
        """@return: the servers handed out and not free again, as L{Lease}s, oldest first."""
        return list(self._leases)

    def pending_matchkeys(self, connection):
        """@return: this connection's matchkeys not yet handed out, in PUT order."""
        return list(connection.offers)

    def summary(self):
        """
        @return: TVM's summary (C{queue_info}, C{server_info}) plus C{leases}.
        """
        return {
            "queue_info": self.scheduler.summary(),
            "server_info": [connection.info for connection in self._servers],
            "leases": [lease.to_json() for lease in self._leases],
        }

    def _hand_out(self, pending, slot):
        """Give C{slot}'s server to C{pending}: record the lease and answer."""
        server = slot.connection
        server.offers.pop(slot.matchkey, None)
        client = pending.connection
        client.requests.pop(pending, None)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        now = self.clock.seconds()
        lease = Lease(
            server, slot.key, slot.matchkey, slot.host, slot.port,
            client.host, client.port, pending.user, pending.priority, now,
        )
        server.leases.setdefault(slot.key, deque()).append(lease)
        self._leases[lease] = None
        self.scheduler.hold(slot.key)
        self.activity.granted(lease, now - pending.since)
        client.peer.answer_request(
            pending, Allocation(slot.host, slot.port, slot.matchkey)
        )

    def _end_lease(self, lease):
        """A handed-out server is free again, or gone."""
        if lease in self._leases:
            del self._leases[lease]
            self.scheduler.release(lease.key)
            self.activity.released(lease, self.clock.seconds())

    def _withdraw(self, pending):
        """Take a waiting request out of its queue. @return: whether it waited."""
        pending.connection.requests.pop(pending, None)
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        pending.timer = None
        return self.scheduler.withdraw(pending)

    def _expire(self, pending, timeout):
        """A request's deadline passed: withdraw it and answer FAIL."""
        pending.timer = None
        if pending.status is Status.QUEUED and self._withdraw(pending):
            connection = pending.connection
            self.activity.request_ended(self.clock.seconds(), "expire", pending,
                                        address(connection.host, connection.port), timeout)
            pending.connection.peer.answer_request(
                pending, f"no free server for key {pending.key!r} within {timeout:g} s"
            )
