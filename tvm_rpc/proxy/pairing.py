"""The proxy's pairing state machine: sans-IO, driven by an injected clock.

Connections that finished their handshake arrive here with the key they
presented (C{server:<key>} or C{client:<key>[ options]}). In plain mode a
client and a server presenting the same key are paired whichever comes first;
a second connection with a key already waiting is refused with
RPC_CODE_DUPLICATE; one left alone past its timeout gets RPC_CODE_MISMATCH. In
tracker mode every server gets a fresh matchkey that a
L{IOfferObserver} (the tracker registration) advertises, and a client is
paired with the server whose matchkey it presents, or refused with
RPC_CODE_MISMATCH.

The pool never touches a transport: it talks to connections through
L{IPeer}.
"""

import enum

import attrs
from twisted.logger import Logger
from zope.interface import Interface

from ..protocol.constants import RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH
from ..protocol.keys import CLIENT_PREFIX, SERVER_PREFIX, random_matchkey, redact_matchkeys
from .activity import ProxyActivity

#: TVM's proxy lets a client or server wait this long for a partner.
DEFAULT_TIMEOUT = 600.0


class Role(enum.Enum):
    """Which side of a session a connection plays."""

    SERVER = SERVER_PREFIX
    CLIENT = CLIENT_PREFIX


class IPeer(Interface):
    """A connection that finished its handshake, as the pool sees it."""

    def accept(partner_key):
        """
        The connection is paired: send RPC_CODE_SUCCESS and C{partner_key}.

        @param partner_key: the handshake key the partner presented, unchanged
            (so a client's C{ -timeout=..} option reaches the server).
        """

    def join(partner):
        """
        Start relaying bytes with C{partner}. Called once per pair, on the
        connection that arrived last, after both were accepted.
        """

    def refuse(code, reason):
        """
        Send C{code} (RPC_CODE_DUPLICATE or RPC_CODE_MISMATCH) and close.

        @param reason: a human-readable explanation for the log.
        """


class IOfferObserver(Interface):
    """Told about the servers waiting in tracker mode (the tracker registration)."""

    def offered(offer):
        """A L{ServerOffer} is waiting; advertise it."""

    def renewed(offer, old_matchkey):
        """C{offer} got a new matchkey in place of C{old_matchkey}."""

    def withdrawn(offer):
        """C{offer} is gone: paired, closed or refused. Take it out of the tracker."""


def parse_proxy_key(text):
    """
    Read the key a connection presented in its handshake.

    @param text: C{server:<key>} or C{client:<key>}, possibly followed by
        whitespace-separated options that are forwarded untouched.
    @return: C{(role, match_key)} where C{match_key} is the first token after
        the prefix.
    @raise ValueError: for any other prefix or an empty key.
    """
    for role in Role:
        if text.startswith(role.value):
            tokens = text[len(role.value) :].split()
            if not tokens:
                raise ValueError(f"empty key after {role.value!r}")
            return role, tokens[0]
    raise ValueError(f"key {text[:40]!r} starts with neither 'server:' nor 'client:'")


@attrs.define(eq=False)
class ServerOffer:
    """
    A server waiting behind the proxy in tracker mode.

    @ivar key: the device key the server presented (C{server:<key>}).
    @ivar matchkey: what the tracker hands to clients for this server; clients
        present C{client:<matchkey>}. Renewal replaces it, the key stays.
    @ivar handshake_key: the server's handshake key as sent.
    @ivar peer: the server's connection.
    """

    key: str
    matchkey: str
    handshake_key: str
    peer: object


@attrs.define(eq=False)
class _Waiting:
    """A plain-mode connection waiting for a partner."""

    role: Role
    match_key: str
    handshake_key: str
    peer: object
    timer: object = None


@attrs.define(eq=False)
class PairingPool:
    """
    The pools of connections waiting for a partner.

    @ivar clock: an L{IReactorTime} for the waiting timeouts.
    @ivar timeout_client: seconds a client waits for a server (plain mode).
    @ivar timeout_server: seconds a server waits for a client (plain mode;
        in tracker mode servers wait as long as they stay connected, since
        the tracker advertises them).
    @ivar tracker_mode: whether servers are advertised by matchkey.
    @ivar observer: an L{IOfferObserver} told about tracker-mode offers, or
        L{None}.
    @ivar make_matchkey: builds a fresh matchkey from a device key.
    @ivar activity: the proxy's L{ProxyActivity}, shared with every
        connection that joins this pool.
    """

    clock: object
    timeout_client: float = DEFAULT_TIMEOUT
    timeout_server: float = DEFAULT_TIMEOUT
    tracker_mode: bool = False
    observer: object = None
    make_matchkey: object = random_matchkey
    activity: ProxyActivity = attrs.field(factory=ProxyActivity, repr=False)
    _waiting: dict = attrs.field(init=False, factory=dict)
    _offers: dict = attrs.field(init=False, factory=dict)
    _by_peer: dict = attrs.field(init=False, factory=dict)

    log = Logger()

    def arrive(self, peer, handshake_key):
        """
        A connection finished its handshake.

        @param peer: the connection's L{IPeer}.
        @param handshake_key: the key it presented.
        @return: C{"waiting"}, C{"paired"} or C{"refused"}.
        """
        try:
            role, match_key = parse_proxy_key(handshake_key)
        except ValueError as e:
            self._refuse(peer, "bad_key", RPC_CODE_MISMATCH, str(e))
            return "refused"
        if self.tracker_mode:
            if role is Role.SERVER:
                return self._offer(peer, match_key, handshake_key)
            return self._claim(peer, match_key, handshake_key)
        return self._match(peer, role, match_key, handshake_key)

    def leave(self, peer):
        """
        A connection closed. Forget it if it was waiting; harmless otherwise.
        """
        entry = self._by_peer.pop(peer, None)
        if isinstance(entry, _Waiting):
            self._drop_waiting(entry)
            self.log.info("{role} {key!r} left while waiting", role=entry.role.name.lower(),
                          key=entry.match_key)
        elif isinstance(entry, ServerOffer):
            self._offers.pop(entry.matchkey, None)
            self.log.info("server {key!r} left the proxy", key=entry.key)
            self._tell("withdrawn", entry)

    def renew(self, offer):
        """
        Give a waiting server a fresh matchkey (its old one was handed out by
        the tracker but never used); the device key stays.

        @return: the new matchkey, or L{None} if C{offer} is no longer waiting.
        """
        if self._offers.get(offer.matchkey) is not offer:
            return None
        old = offer.matchkey
        del self._offers[old]
        offer.matchkey = self._fresh_matchkey(offer.key)
        self._offers[offer.matchkey] = offer
        self._tell("renewed", offer, old)
        return offer.matchkey

    def offers(self):
        """@return: the servers waiting in tracker mode, oldest first."""
        return list(self._offers.values())

    def keys(self):
        """@return: the sorted device keys of the waiting tracker-mode servers."""
        return sorted({offer.key for offer in self._offers.values()})

    def waiting(self):
        """@return: how many connections wait for a partner, in either mode."""
        return len(self._by_peer)

    def waiting_by_role(self):
        """
        @return: C{(servers, clients)}: a L{dict} of the servers waiting by
            device key (plain-mode match key, or tracker-mode key), and how
            many clients wait.
        """
        servers, clients = {}, 0
        for entry in self._by_peer.values():
            if isinstance(entry, _Waiting) and entry.role is Role.CLIENT:
                clients += 1
                continue
            key = entry.key if isinstance(entry, ServerOffer) else entry.match_key
            servers[key] = servers.get(key, 0) + 1
        return servers, clients

    def close(self):
        """Cancel every timer and forget every waiting connection (shutdown)."""
        for entry in list(self._by_peer.values()):
            if isinstance(entry, _Waiting) and entry.timer is not None and entry.timer.active():
                entry.timer.cancel()
        self._waiting.clear()
        self._offers.clear()
        self._by_peer.clear()

    def _match(self, peer, role, match_key, handshake_key):
        """Plain mode: pair with a partner of the other role, refuse a duplicate, or wait."""
        other_role = Role.CLIENT if role is Role.SERVER else Role.SERVER
        partner = self._waiting.get((other_role, match_key))
        if partner is not None:
            self._drop_waiting(partner)
            del self._by_peer[partner.peer]
            self.log.info("paired {role} and {other} for key {key!r}",
                          role=role.name.lower(), other=other_role.name.lower(), key=match_key)
            self._pair(partner.peer, partner.handshake_key, peer, handshake_key)
            return "paired"
        if (role, match_key) in self._waiting:
            self._refuse(peer, "duplicate_key", RPC_CODE_DUPLICATE,
                         f"a {role.name.lower()} with key {match_key!r} is already waiting")
            return "refused"
        entry = _Waiting(role, match_key, handshake_key, peer)
        timeout = self.timeout_server if role is Role.SERVER else self.timeout_client
        entry.timer = self.clock.callLater(timeout, self._expire, entry)
        self._waiting[(role, match_key)] = entry
        self._by_peer[peer] = entry
        return "waiting"

    def _offer(self, peer, key, handshake_key):
        """Tracker mode: a server waits under a fresh matchkey and is advertised."""
        offer = ServerOffer(key, self._fresh_matchkey(key), handshake_key, peer)
        self._offers[offer.matchkey] = offer
        self._by_peer[peer] = offer
        self.log.info("server {key!r} waits behind the proxy as {matchkey!r}", key=key,
                      matchkey=redact_matchkeys(offer.matchkey))
        self._tell("offered", offer)
        return "waiting"

    def _claim(self, peer, matchkey, handshake_key):
        """Tracker mode: a client takes the server waiting under its matchkey."""
        offer = self._offers.pop(matchkey, None)
        if offer is None:
            self._refuse(peer, "unknown_matchkey", RPC_CODE_MISMATCH,
                         f"no server waits under matchkey {redact_matchkeys(matchkey)!r}")
            return "refused"
        del self._by_peer[offer.peer]
        self.log.info("paired client with server {key!r} by matchkey {matchkey!r}",
                      key=offer.key, matchkey=redact_matchkeys(matchkey))
        self._tell("withdrawn", offer)
        self._pair(offer.peer, offer.handshake_key, peer, handshake_key)
        return "paired"

    def _pair(self, waiting_peer, waiting_key, newcomer, newcomer_key):
        """Accept both sides (each learns the other's key), then start the relay."""
        waiting_peer.accept(newcomer_key)
        newcomer.accept(waiting_key)
        newcomer.join(waiting_peer)

    def _expire(self, entry):
        """A waiting connection's timeout: refuse it with RPC_CODE_MISMATCH."""
        entry.timer = None
        if self._by_peer.get(entry.peer) is not entry:
            return
        del self._by_peer[entry.peer]
        self._drop_waiting(entry)
        self._refuse(entry.peer, "partner_timeout", RPC_CODE_MISMATCH,
                     f"no partner for key {entry.match_key!r} in time")

    def _refuse(self, peer, kind, code, reason):
        """Count a refusal of C{kind} (its metric label) and refuse C{peer}."""
        self.activity.refuse(kind)
        peer.refuse(code, reason)

    def _drop_waiting(self, entry):
        """Take a plain-mode entry out of its pool and cancel its timer."""
        if self._waiting.get((entry.role, entry.match_key)) is entry:
            del self._waiting[(entry.role, entry.match_key)]
        if entry.timer is not None and entry.timer.active():
            entry.timer.cancel()
        entry.timer = None

    def _fresh_matchkey(self, key):
        """@return: a matchkey for C{key} not used by any waiting server."""
        for _ in range(1000):
            matchkey = self.make_matchkey(key)
            if matchkey not in self._offers:
                return matchkey
        raise RuntimeError(f"cannot make a fresh matchkey for {key!r}")

    def _tell(self, event, *args):
        """Pass an event to the observer; its failures are logged, never raised."""
        if self.observer is None:
            return
        try:
            getattr(self.observer, event)(*args)
        except Exception:
            self.log.failure("offer observer failed on {event}", event=event)

