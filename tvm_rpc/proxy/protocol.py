"""The proxy's connection adapter: handshake, then waiting, then relaying.

L{ProxyConnection} is a thin Twisted protocol around the sans-IO pieces: the
handshake decoder of L{tvm_rpc.protocol.handshake}, the L{PairingPool} and
the L{Relay}. The same class serves websocket peers through a transport shim
(see L{tvm_rpc.proxy.web}).
"""

import attrs
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from ..protocol.constants import INT32, RPC_CODE_SUCCESS
from ..protocol.handshake import WRONG_PORT_FOR_TRACKER, HandshakeDecoder, encode_reply
from ..protocol.keys import SERVER_PREFIX, redact_matchkeys
from ..transport import PEER_HANDSHAKE_TIMEOUT, KeepAlive, peer_label, tune_tcp
from .pairing import IPeer
from .relay import RELAY_CHUNK, IRelaySide, Relay

#: TCP keepalive of every proxy connection: a silent dead peer is dropped
#: from a pool or a pair after about a minute and a half.
PROXY_KEEPALIVE = KeepAlive(idle=60, interval=10, count=3)


@implementer(IHalfCloseableProtocol, IPeer, IRelaySide)
class ProxyConnection(TimeoutMixin, Protocol):
    """
    One connection to the proxy, client or server.

    States: C{"handshake"} (reading C{[magic][len][key]}), C{"waiting"} (in
    the pool; bytes that arrive are kept, up to C{chunk_size}, then reading
    pauses), C{"paired"} (accepted, relay being set up), C{"relaying"} and
    C{"closed"}.

    The handshake timer is a L{TimeoutMixin} on C{clock}.

    @ivar key: the key the peer presented, once known.
    @ivar path: how the peer reached the proxy, for the pair metrics
        (C{tcp}; the websocket adapter sets C{websocket}).
    """

    log = Logger()
    path = "tcp"

    def __init__(self, pool, clock, handshake_timeout=PEER_HANDSHAKE_TIMEOUT,
                 chunk_size=RELAY_CHUNK, on_relay_end=None, splice=False):
        """
        @param pool: the L{PairingPool} to join after the handshake.
        @param clock: an L{IReactorTime} for the handshake timeout.
        @param handshake_timeout: seconds allowed for the handshake.
        @param chunk_size: read size and outgoing buffer limit of the transport.
        @param on_relay_end: called once when a relay this connection started
            ends, or L{None}.
        @param splice: relay plain TCP pairs with C{splice(2)} where possible
            (C{clock} must then be the reactor; see L{tvm_rpc.proxy.splice}).
        """
        self._splice = splice
        self._on_relay_end = on_relay_end
        self._pool = pool
        self._activity = pool.activity
        self._clock = clock
        self.callLater = clock.callLater
        self._handshake_timeout = handshake_timeout
        self._chunk_size = chunk_size
        self._decoder = HandshakeDecoder()
        self._early = []
        self._early_size = 0
        self._paused = False
        self._relay = None
        self._read_closed = False
        self._write_closed = False
        self.state = "handshake"
        self.key = None
        self.peer_name = "unknown peer"

    def connectionMade(self):
        """Start the handshake clock and size the transport's buffers."""
        self.peer_name = peer_label(self.transport)
        self._activity.connection_opened()
        tune_tcp(self.transport, PROXY_KEEPALIVE)
        if hasattr(self.transport, "bufferSize"):
            self.transport.bufferSize = self._chunk_size
        if hasattr(self.transport, "SEND_LIMIT"):
            # One send(2) per relayed chunk instead of several of Twisted's default 128 KiB.
            self.transport.SEND_LIMIT = max(self.transport.SEND_LIMIT, self._chunk_size)
        self.setTimeout(self._handshake_timeout)

    def dataReceived(self, data):
        """Route bytes by state: handshake decoder, early buffer or relay."""
        if self.state == "relaying":
            self._relay.received(self, data)
        elif self.state in ("waiting", "paired"):
            self._keep_early(data)
        elif self.state == "handshake":
            self._handshake(data)

    def _handshake(self, data):
        """Feed the handshake decoder; refuse, or join the pool once the key is read."""
        if not self._decoder.feed(data):
            return
        self.setTimeout(None)
        if self._decoder.error is not None:
            self.log.warn("refused handshake from {peer}: {reason}", peer=self.peer_name,
                          reason=self._decoder.error)
            self._activity.refuse("tracker_magic" if self._decoder.error == WRONG_PORT_FOR_TRACKER
                                  else "bad_handshake")
            self._close_now()
            return
        self.key = self._decoder.key
        self.state = "waiting"
        rest, self._decoder = self._decoder.rest, None
        if rest:
            self._keep_early(rest)
        self.log.info("{peer} presented {key!r}", peer=self.peer_name,
                      key=redact_matchkeys(self.key))
        self._pool.arrive(self, self.key)

    def _keep_early(self, data):
        """Keep bytes received before pairing; pause reading past the limit."""
        self._early.append(data)
        self._early_size += len(data)
        if self._early_size >= self._chunk_size and not self._paused:
            self._paused = True
            self.transport.pauseProducing()

    def timeoutConnection(self):
        """The handshake took too long: drop the connection."""
        if self.state == "handshake":
            self.log.warn("dropped {peer}: no handshake within {timeout} s",
                          peer=self.peer_name, timeout=self._handshake_timeout)
            self._activity.refuse("handshake_timeout")
            self._close_now()

    def _close_now(self):
        """Close without a reply (a refused handshake)."""
        self.state = "closed"
        self.transport.loseConnection()

    # IPeer

    def accept(self, partner_key):
        """Paired: send RPC_CODE_SUCCESS and the partner's key."""
        self.state = "paired"
        self.transport.write(encode_reply(RPC_CODE_SUCCESS, partner_key))

    def join(self, partner):
        """Start relaying with C{partner}, passing on what both sent early."""
        relay = Relay(self, partner, self._on_relay_end, reactor=self._clock,
                      splice=self._splice)
        for side in (self, partner):
            side._relay = relay
            side.state = "relaying"
        path = "websocket" if "websocket" in (self.path, partner.path) else "tcp"
        self._activity.pair_started(relay, path, a_is_server=self.key.startswith(SERVER_PREFIX))
        relay.start()
        # Resume first: passing on the early bytes may pause a side again, and
        # that pause must stand.
        for side in (partner, self):
            if side._paused:
                side._paused = False
                side.transport.resumeProducing()
        for side in (partner, self):
            early, side._early, side._early_size = side._early, [], 0
            for chunk in early:
                relay.received(side, chunk)

    def refuse(self, code, reason):
        """Send C{code} and close: duplicate, mismatch or a bad key."""
        self.log.info("refused {peer} ({key!r}): {reason}", peer=self.peer_name,
                      key=redact_matchkeys(self.key), reason=reason)
        self.state = "closed"
        self.transport.write(INT32.pack(code))
        self.transport.loseConnection()

    # IRelaySide

    def send(self, data):
        """Write relayed bytes to this peer."""
        self.transport.write(data)

    def finish_sending(self):
        """Half-close towards this peer once everything relayed is written."""
        self.transport.loseWriteConnection()

    def close(self):
        """Close this peer's connection once its buffered bytes are written."""
        self.state = "closed"
        self.transport.loseConnection()

    # IHalfCloseableProtocol

    def readConnectionLost(self):
        """
        The peer sent end of file. While relaying it is passed on as a
        half-close; before pairing it means the peer left.
        """
        if self._read_closed:
            return
        self._read_closed = True
        if self.state == "relaying":
            self._relay.read_closed(self)
            self._maybe_finished()
        else:
            self._pool.leave(self)
            self._close_now()

    def writeConnectionLost(self):
        """Our half-close towards the peer went out."""
        self._write_closed = True
        self._maybe_finished()

    def _maybe_finished(self):
        """Close once both directions have ended (after half-closes)."""
        if self._read_closed and self._write_closed:
            self.state = "closed"
            self.transport.loseConnection()

    def connectionLost(self, reason):
        """Leave the pool or end the relay; cancel the handshake timer."""
        self.setTimeout(None)
        self._early = []
        self._pool.leave(self)
        relay = self._relay
        if relay is not None and relay.lost(self):
            self._activity.pair_ended(relay, _end_reason(reason, relay))
        self._activity.connection_closed()
        self.state = "closed"


def _end_reason(reason, relay):
    """
    @param reason: the L{Failure} the first side of C{relay} was lost with
        (L{None} counts as a clean close).
    @return: why the pair ended: C{closed} (a peer closed its connection) or
        C{lost} (a peer's connection failed: reset, keepalive timeout).
    """
    spliced = relay.spliced
    if spliced is not None:
        # The splice path closes both connections itself (Twisted then sees
        # sockets already shut down): only the relay knows whether one failed.
        return "lost" if spliced.failed else "closed"
    if reason is None or reason.check(ConnectionDone) is not None:
        return "closed"
    return "lost"


@attrs.define(eq=False)
class ProxyFactory(Factory):
    """
    Builds a L{ProxyConnection} for each accepted connection.

    @ivar pool: the shared L{PairingPool}.
    @ivar clock: an L{IReactorTime}.
    @ivar handshake_timeout: seconds allowed for a handshake.
    @ivar chunk_size: see L{ProxyConnection}.
    @ivar on_relay_end: see L{ProxyConnection}.
    @ivar splice: see L{ProxyConnection}.
    """

    # Twisted's "Starting factory" line would print this whole attrs repr.
    noisy = False

    pool: object
    clock: object
    handshake_timeout: float = PEER_HANDSHAKE_TIMEOUT
    chunk_size: int = RELAY_CHUNK
    on_relay_end: object = None
    splice: bool = False

    def buildProtocol(self, addr):
        """@return: a new L{ProxyConnection}."""
        protocol = ProxyConnection(self.pool, self.clock, self.handshake_timeout,
                                   self.chunk_size, self.on_relay_end, self.splice)
        protocol.factory = self
        return protocol
