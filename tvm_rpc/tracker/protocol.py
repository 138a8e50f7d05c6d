"""The tracker's Twisted adapter: bytes in, L{TrackerState} calls, one write per reply.

Each connection is the streaming producer of its own transport: when replies
pile up unread, the transport pauses it and it stops reading from the peer
(TCP then slows the peer down); replies still owed to a paused peer are
counted, and past C{max_output} bytes the connection is closed.
"""

import hmac

from zope.interface import implementer

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin

from ..daemon.logs import logger
from ..protocol.tracker_commands import (
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
from ..transport import KeepAlive, peer_host_port, quick_ack, tune_tcp
from .state import ITrackerPeer, LimitExceeded

log = logger("tvm_rpc.tracker")


@implementer(ITrackerPeer, IPushProducer)
class TrackerProtocol(TimeoutMixin, Protocol):
    """
    One tracker connection: the magic echo, then one reply per request frame.

    A bad frame, a wrong magic or a message that breaks the protocol closes
    this connection (and only it) with a log line naming the peer. Every
    close is a clean one (C{loseConnection}: buffered replies are sent first),
    never an abort.

    Its one timer (L{TimeoutMixin}, on the state's clock) is the greeting
    timeout until the magic arrives, then the idle timeout while the
    connection holds nothing (see L{TrackerState.holds}).
    """

    def __init__(self, factory):
        """@param factory: the L{TrackerFactory} sharing the state."""
        self.factory = factory
        self.callLater = factory.state.clock.callLater
        self._decoder = FrameDecoder(expect_magic=True)
        self._connection = None
        self._closing = False
        self._stopping = False
        self._peer = "?"
        self._host = None
        self._producing = False
        self._paused = False
        self._owed = 0
        self._clamp_logged = False
        self._counted = False

    def connectionMade(self):
        """Admit the peer (or refuse it), tune the socket and register the connection."""
        host, port = peer_host_port(self.transport.getPeer())
        self._peer = f"{host}:{port}" if port is not None else host
        if port is not None:
            if not self.factory.admit(host):
                self.factory.state.activity.fault("per_address")
                self._closing = True
                self.transport.loseConnection()
                return
            self._host = host
        self._counted = True
        self.factory.state.activity.connection_opened()
        tune_tcp(self.transport, self.factory.keepalive)
        self.transport.registerProducer(self, True)
        self._producing = True
        self._connection = self.factory.state.connect(self, host, port)
        self.setTimeout(self.factory.limits.greeting_timeout)

    def timeoutConnection(self):
        """The greeting or idle timeout passed: close, so idle sockets cannot pile up."""
        limits = self.factory.limits
        if not self._decoder.greeted:
            self._drop(f"no tracker magic within {limits.greeting_timeout:g} s",
                       "greeting_timeout")
        elif self._connection is not None and self.factory.state.holds(self._connection):
            self.setTimeout(None)
        else:
            self._drop(f"idle for {limits.idle_timeout:g} s", warn=False)

    def _watch_idle(self):
        """Run the idle timeout only while this greeted connection holds nothing."""
        if self._closing or not self._decoder.greeted:
            return
        connection = self._connection
        if connection is not None and self.factory.state.holds(connection):
            self.setTimeout(None)
        else:
            self.setTimeout(self.factory.limits.idle_timeout)

    def dataReceived(self, data):
        """Echo the magic once it arrives, then handle every complete frame."""
        if self._closing:
            return
        self.resetTimeout()
        greeted = self._decoder.greeted
        values = self._decoder.feed(data)
        if not greeted and self._decoder.greeted:
            self.transport.write(encode_magic())
        for value in values:
            if self._closing:
                return
            try:
                command = parse_tracker_message(value)
            except BadMessage as e:
                self._drop(str(e), "bad_message")
                return
            try:
                self._dispatch(command)
            except BadMessage as e:
                self._drop(str(e), "limit" if isinstance(e, LimitExceeded) else "bad_message")
                return
            except Exception:
                # The command's name only: a PUT's repr carries its matchkey.
                log.failure("error handling {command} from {peer}",
                            command=command.code.name, peer=self._peer)
                self._drop("internal error", "internal_error")
                return
        if self._decoder.error is not None:
            self._drop(self._decoder.error, "bad_frame")
            return
        if self._decoder.pending:
            # Part of a frame: its sender may be waiting for our ACK to send the rest.
            quick_ack(self.transport)
        self._watch_idle()

    def _dispatch(self, command):
        """Carry out one parsed command. @raise BadMessage: to close this connection."""
        RESPONDERS[type(command)](self, command)

    def _on_request(self, command):
        """REQUEST: queue it; the answer comes through L{answer_request}."""
        pending = self.factory.state.request(self._connection, command)
        if pending.priority != command.priority and not self._clamp_logged:
            self._clamp_logged = True
            log.info("queueing requests from {peer} asking for priority {asked:g} at "
                     "{priority:g}, the highest allowed", peer=self._peer,
                     asked=command.priority, priority=pending.priority)

    def _on_put(self, command):
        """PUT: offer a free server."""
        self.factory.state.put(self._connection, command)
        self._reply(Put.encode_result(None))

    def _on_ping(self, command):
        """PING: answer at once."""
        self._reply(Ping.encode_result(None))

    def _on_summary(self, command):
        """SUMMARY: the queues and the servers."""
        self._reply(Summary.encode_result(self.factory.state.summary()))

    def _on_update_info(self, command):
        """UPDATE_INFO: keep what the peer says about itself."""
        self.factory.state.update_info(self._connection, command)
        self._reply(UpdateInfo.encode_result(None))

    def _on_get_pending_matchkeys(self, command):
        """GET_PENDING_MATCHKEYS: this connection's matchkeys not handed out yet."""
        self._reply(GetPendingMatchkeys.encode_result(
            self.factory.state.pending_matchkeys(self._connection)))

    def _on_stop(self, command):
        """STOP: stop the tracker when the stop key is right."""
        accepted = self.factory.check_stop_key(command.stop_key)
        self._reply(Stop.encode_result(accepted))
        if accepted:
            log.info("stop requested by {peer}", peer=self._peer)
            self._stopping = True
            self._close()
        else:
            log.warn("wrong stop key from {peer}", peer=self._peer)

    def answer_request(self, pending, result):
        """Send the answer of a REQUEST (see L{ITrackerPeer})."""
        self._reply(Request.encode_result(result))
        self._watch_idle()

    def _reply(self, value):
        """
        Send one JSON value as one frame, in one write; or, when the peer
        would then owe more than C{max_output} unread bytes, close instead.
        """
        if self._closing:
            return
        frame = encode_frame(value)
        if self._paused:
            self._owed += len(frame)
            if self._owed > self.factory.limits.max_output:
                self._drop(
                    f"more than {self.factory.limits.max_output} bytes of replies not read",
                    "output_bound",
                )
                return
        self.transport.write(frame)

    def pauseProducing(self):
        """
        The transport's buffer is full (the peer is not reading): stop
        reading it. (Twisted's transports call this again on every write
        while full.)
        """
        if not self._paused:
            self._paused = True
            self._owed = 0
            self.transport.pauseProducing()

    def resumeProducing(self):
        """The transport's buffer was flushed: read the peer again."""
        self._paused = False
        self._owed = 0
        if not self._closing:
            self.transport.resumeProducing()

    def stopProducing(self):
        """The connection is going away; L{connectionLost} cleans up."""

    def _drop(self, reason, fault=None, warn=True):
        """
        Close this connection because of C{reason}, with a log line.

        @param fault: the short name under which the close is counted as a
            fault (L{tvm_rpc.tracker.activity.TrackerActivity.fault}), or
            L{None} when it is none.
        """
        if self._closing:
            return
        if len(reason) > 300:
            reason = reason[:300] + "..."
        if fault is not None:
            self.factory.state.activity.fault(fault, self._peer, reason)
        emit = log.warn if warn else log.info
        emit("closing tracker connection from {peer}: {reason}", peer=self._peer, reason=reason)
        self._close()

    def _close(self):
        """Forget the connection and close it once its replies are flushed."""
        self._closing = True
        self.setTimeout(None)
        self._forget()
        if self._producing:
            # A registered producer keeps the transport from closing.
            self._producing = False
            self.transport.unregisterProducer()
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
        self.setTimeout(None)
        self._forget()
        if self._counted:
            self._counted = False
            self.factory.state.activity.connection_closed()
        if self._host is not None:
            self.factory.release(self._host)
            self._host = None
        if self._stopping:
            self._stopping = False
            self.factory.on_stop()


#: The responder of each tracker command, by the command's class.
RESPONDERS = {
    Request: TrackerProtocol._on_request,
    Put: TrackerProtocol._on_put,
    Ping: TrackerProtocol._on_ping,
    Summary: TrackerProtocol._on_summary,
    UpdateInfo: TrackerProtocol._on_update_info,
    GetPendingMatchkeys: TrackerProtocol._on_get_pending_matchkeys,
    Stop: TrackerProtocol._on_stop,
}


class TrackerFactory(Factory):
    """
    Builds L{TrackerProtocol}s around one shared L{TrackerState}, and counts
    the open connections of each IP address.

    @ivar state: the tracker's L{TrackerState}.
    @ivar stop_key: the key a STOP must carry.
    @ivar on_stop: called (once the STOP reply is flushed) to stop the tracker.
    @ivar keepalive: the L{KeepAlive} timers set on every accepted socket.
    @ivar limits: the L{tvm_rpc.tracker.limits.TrackerLimits} (the state's).
    """

    noisy = False

    def __init__(self, state, stop_key, on_stop, keepalive=KeepAlive()):
        """See the class docstring for the parameters."""
        self.state = state
        self.stop_key = stop_key
        self.on_stop = on_stop
        self.keepalive = keepalive
        self._open = {}
        self._refused = {}

    @property
    def limits(self):
        """The state's L{tvm_rpc.tracker.limits.TrackerLimits}."""
        return self.state.limits

    def buildProtocol(self, addr):
        """@return: a L{TrackerProtocol} for a new connection."""
        return TrackerProtocol(self)

    def admit(self, host):
        """
        Count a new connection from C{host}, unless C{host} has the most
        allowed already; the first refusal of a run is logged, and the count
        of refusals once C{host} is admitted again.

        @return: whether the connection is admitted (and counted: call
            L{release} when it ends).
        """
        count = self._open.get(host, 0)
        limit = self.limits.max_connections_per_address
        if count >= limit:
            refused = self._refused.get(host, 0) + 1
            self._refused[host] = refused
            if refused == 1:
                log.warn("refusing connections from {host}: {count} open, the most allowed "
                         "per address", host=host, count=count)
            return False
        self._open[host] = count + 1
        refused = self._refused.pop(host, 0)
        if refused:
            log.warn("accepting connections from {host} again; refused {refused}",
                     host=host, refused=refused)
        return True

    def release(self, host):
        """A connection counted by L{admit} ended."""
        count = self._open.get(host, 0) - 1
        if count > 0:
            self._open[host] = count
            return
        self._open.pop(host, None)
        # The address left altogether: its refusals are told now, so that
        # addresses that never come back leave nothing behind.
        refused = self._refused.pop(host, 0)
        if refused:
            log.warn("all connections from {host} closed; refused {refused} meanwhile",
                     host=host, refused=refused)

    def connections_from(self, host):
        """@return: how many connections from C{host} are open."""
        return self._open.get(host, 0)

    def check_stop_key(self, key):
        """@return: whether C{key} is the stop key."""
        return hmac.compare_digest(key.encode("utf-8"), self.stop_key.encode("utf-8"))
