"""The tracker's Twisted adapter: bytes in, L{TrackerState} calls, one write per reply."""

import hmac
import socket

import attrs
from zope.interface import implementer

from twisted.internet.protocol import Factory, Protocol

from ..protocol.commands import (
    BadMessage,
    GetPendingMatchkeys,
    Ping,
    Put,
    Request,
    Stop,
    Summary,
    UpdateInfo,
    parse_tracker_message,
)
from ..protocol.framing import FrameDecoder, encode_frame, encode_magic
from .logs import logger
from .state import ITrackerPeer

log = logger("tvm_rpc.tracker")


@attrs.frozen
class KeepAlive:
    """
    Per-socket TCP keepalive timers, so a dead peer is noticed in about
    C{idle + interval * count} seconds.

    @ivar idle: seconds of silence before the first probe.
    @ivar interval: seconds between probes.
    @ivar count: unanswered probes before the kernel drops the connection.
    """

    idle: int = 30
    interval: int = 10
    count: int = 3


def _socket_of(transport):
    """@return: the socket under C{transport} (looking through TLS), or L{None}."""
    for _ in range(4):
        if transport is None:
            return None
        get_handle = getattr(transport, "getHandle", None)
        if get_handle is not None:
            try:
                handle = get_handle()
            except Exception:
                handle = None
            if isinstance(handle, socket.socket):
                return handle
        transport = getattr(transport, "transport", None)
    return None


def tune_socket(transport, keepalive):
    """
    Set TCP_NODELAY and TCP keepalive with C{keepalive}'s timers on the
    socket of C{transport}, when it is a TCP socket.

    @return: whether the socket was tuned.
    """
    sock = _socket_of(transport)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for name, value in (
            ("TCP_KEEPIDLE", keepalive.idle),
            ("TCP_KEEPINTVL", keepalive.interval),
            ("TCP_KEEPCNT", keepalive.count),
        ):
            option = getattr(socket, name, None)
            if option is not None:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
    except OSError as e:
        log.warn("could not tune socket: {error}", error=e)
        return False
    return True


def describe_peer(address):
    """
    @return: C{(host, port)} of a peer address; port is L{None} for non-IP
        peers. An IPv4 peer of a dual-stack listener (C{::ffff:a.b.c.d}) is
        given as plain IPv4, the address its clients can reach it on.
    """
    host = getattr(address, "host", None)
    if host is not None:
        if host.lower().startswith("::ffff:") and host.count(".") == 3:
            host = host[len("::ffff:"):]
        return host, getattr(address, "port", None)
    name = getattr(address, "name", None)
    return (name.decode("utf-8", "replace") if isinstance(name, bytes) else (name or "localhost")), None


@implementer(ITrackerPeer)
class TrackerProtocol(Protocol):
    """
    One tracker connection: the magic echo, then one reply per request frame.

    A bad frame, a wrong magic or a message that breaks the protocol closes
    this connection (and only it) with a log line naming the peer.
    """

    def __init__(self, factory):
        """@param factory: the L{TrackerFactory} sharing the state."""
        self.factory = factory
        self._decoder = FrameDecoder(expect_magic=True)
        self._connection = None
        self._closing = False
        self._stopping = False
        self._peer = "?"
        self._greeting_timer = None

    def connectionMade(self):
        """Tune the socket and register the connection with the state."""
        host, port = describe_peer(self.transport.getPeer())
        self._peer = f"{host}:{port}" if port is not None else host
        tune_socket(self.transport, self.factory.keepalive)
        self._connection = self.factory.state.connect(self, host, port)
        if self.factory.greeting_timeout is not None:
            self._greeting_timer = self.factory.state.clock.callLater(
                self.factory.greeting_timeout, self._greeting_expired
            )

    def _greeting_expired(self):
        """The peer never sent the magic: close, so idle sockets cannot pile up."""
        self._greeting_timer = None
        self._drop(f"no tracker magic within {self.factory.greeting_timeout:g} s")

    def _cancel_greeting_timer(self):
        """The magic came, or the connection ended."""
        if self._greeting_timer is not None:
            if self._greeting_timer.active():
                self._greeting_timer.cancel()
            self._greeting_timer = None

    def dataReceived(self, data):
        """Echo the magic once it arrives, then handle every complete frame."""
        if self._closing:
            return
        greeted = self._decoder.greeted
        values = self._decoder.feed(data)
        if not greeted and self._decoder.greeted:
            self._cancel_greeting_timer()
            self.transport.write(encode_magic())
        for value in values:
            if self._closing:
                return
            try:
                command = parse_tracker_message(value)
            except BadMessage as e:
                self._drop(str(e))
                return
            try:
                self._dispatch(command)
            except BadMessage as e:
                self._drop(str(e))
                return
            except Exception:
                log.failure("error handling {command!r} from {peer}", command=command, peer=self._peer)
                self._drop("internal error")
                return
        if self._decoder.error is not None:
            self._drop(self._decoder.error)

    def _dispatch(self, command):
        """Carry out one parsed command. @raise BadMessage: to close this connection."""
        state = self.factory.state
        connection = self._connection
        if isinstance(command, Request):
            state.request(connection, command)
        elif isinstance(command, Put):
            state.put(connection, command)
            self._reply(Put.encode_result(None))
        elif isinstance(command, Ping):
            self._reply(Ping.encode_result(None))
        elif isinstance(command, Summary):
            self._reply(Summary.encode_result(state.summary()))
        elif isinstance(command, UpdateInfo):
            state.update_info(connection, command)
            self._reply(UpdateInfo.encode_result(None))
        elif isinstance(command, GetPendingMatchkeys):
            self._reply(GetPendingMatchkeys.encode_result(state.pending_matchkeys(connection)))
        elif isinstance(command, Stop):
            accepted = self.factory.check_stop_key(command.stop_key)
            self._reply(Stop.encode_result(accepted))
            if accepted:
                log.info("stop requested by {peer}", peer=self._peer)
                self._closing = self._stopping = True
                self._forget()
                self.transport.loseConnection()
            else:
                log.warn("wrong stop key from {peer}", peer=self._peer)

    def answer_request(self, pending, result):
        """Send the answer of a REQUEST (see L{ITrackerPeer})."""
        self._reply(Request.encode_result(result))

    def _reply(self, value):
        """Send one JSON value as one frame, in one write."""
        self.transport.write(encode_frame(value))

    def _drop(self, reason):
        """Close this connection because of C{reason}, with a log line."""
        self._closing = True
        if len(reason) > 300:
            reason = reason[:300] + "..."
        log.warn("closing tracker connection from {peer}: {reason}", peer=self._peer, reason=reason)
        self._forget()
        self.transport.loseConnection()

    def _forget(self):
        """Take this connection out of the tracker state (once)."""
        # At once, not at connectionLost: a closing connection must not be
        # handed a server while its last replies flush.
        if self._connection is not None:
            self.factory.state.disconnect(self._connection)
            self._connection = None

    def connectionLost(self, reason):
        """Forget the connection; stop the tracker if this one carried STOP."""
        self._cancel_greeting_timer()
        self._forget()
        if self._stopping:
            self._stopping = False
            self.factory.on_stop()


class TrackerFactory(Factory):
    """
    Builds L{TrackerProtocol}s around one shared L{TrackerState}.

    @ivar state: the tracker's L{TrackerState}.
    @ivar stop_key: the key a STOP must carry.
    @ivar on_stop: called (once the STOP reply is flushed) to stop the tracker.
    @ivar keepalive: the L{KeepAlive} timers set on every accepted socket.
    @ivar greeting_timeout: seconds a new connection has to send the magic
        before it is closed, or L{None} for no limit.
    """

    noisy = False

    def __init__(self, state, stop_key, on_stop, keepalive=KeepAlive(), greeting_timeout=60.0):
        """See the class docstring for the parameters."""
        self.state = state
        self.stop_key = stop_key
        self.on_stop = on_stop
        self.keepalive = keepalive
        self.greeting_timeout = greeting_timeout

    def buildProtocol(self, addr):
        """@return: a L{TrackerProtocol} for a new connection."""
        return TrackerProtocol(self)

    def check_stop_key(self, key):
        """@return: whether C{key} is the stop key."""
        return hmac.compare_digest(key.encode("utf-8"), self.stop_key.encode("utf-8"))
