"""The server port: TVM's RPC handshake, then a hand-off to a session runner.

L{HandshakeProtocol} is a thin adapter around the sans-IO
L{HandshakeDecoder<tvm_rpc.protocol.handshake.HandshakeDecoder>} and the
L{SessionGate<tvm_rpc.server.gate.SessionGate>}. Each connection gets its own
handshake timer, so a silent peer is dropped and never blocks anyone else.
Once the handshake succeeds and a session slot is free, the connection goes to
an L{ISessionRunner}: a worker process (see L{tvm_rpc.server.worker})
or the in-process runner below (C{--in-process}).
"""

import attrs
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from zope.interface import Interface, implementer

from ..protocol.constants import RPC_CODE_MISMATCH, RPC_CODE_SUCCESS
from ..protocol.flavour import (
    OUR_PROTOCOL,
    TVM_CLIENT_REFUSAL,
    TVM_PROTOCOL,
    server_key,
    session_protocol,
    tvm_exception_packet,
)
from ..protocol.handshake import WRONG_PORT_FOR_TRACKER, HandshakeDecoder, encode_reply
from ..protocol.keys import (
    parse_client_key,
    parse_resume_option,
    parse_timeout_option,
    redact_matchkeys,
)
from ..transport import (
    PEER_HANDSHAKE_TIMEOUT,
    SwitchingCarrier,
    peer_label,
    set_no_delay,
    tcp_byte_counts,
    tcp_socket_of,
)
from .activity import ServerActivity
from .logs import logger

#: Seconds a refused client has to close its end before we close ours.
REFUSAL_DRAIN = 5.0


def read_client_key(text):
    """
    Read what a client presented in its handshake.

    @param text: C{client:<matchkey>} with its options.
    @return: C{(matchkey, timeout, protocol, resume)}: the matchkey, the
        session timeout it asks for (seconds or L{None}), the session protocol
        it speaks (L{OUR_PROTOCOL} or L{TVM_PROTOCOL}) and the token of a kept
        worker it asks to continue in (or L{None}).
    @raise ValueError: when C{text} is not a client key or an option is bad.
    """
    matchkey, options = parse_client_key(text)
    return (matchkey, parse_timeout_option(options), session_protocol(options),
            parse_resume_option(options))


def session_time(asked, cap):
    """
    @param asked: the session timeout the client asked for, or L{None}.
    @param cap: the server's longest session (C{--max-session-time}), or L{None}.
    @return: the seconds the session may run; L{None} for no limit.
    """
    limits = [t for t in (asked, cap) if t]
    return min(limits) if limits else None


#: The one line each session leaves in the server's log, when it ends.
SESSION_ENDED = (
    "{protocol} session for {peer} ended: {how} (key {key}, {where}, {duration:.3f}s, "
    "{received} bytes in, {sent} bytes out)"
)


def log_session_end(log, handoff, how, duration, sock, where, warn=False):
    """
    Log L{SESSION_ENDED} for a session: who, key, protocol, bytes moved,
    duration and how it ended.

    @param log: the L{Logger}.
    @param handoff: the session's L{Handoff}.
    @param how: how it ended, in words.
    @param duration: seconds it ran.
    @param sock: its connection's socket (read before it is closed), or L{None}.
    @param where: the process that served it (C{worker 1234}, C{in process}).
    @param warn: log it as a warning (the session ended in a failure).
    @return: C{(received, sent)} bytes as logged, or L{None} when unknown.
    """
    counts = tcp_byte_counts(sock) if sock is not None else None
    received, sent = counts if counts is not None else ("?", "?")
    (log.warn if warn else log.info)(
        SESSION_ENDED, protocol=handoff.protocol, peer=handoff.peer, how=how,
        key=handoff.key or "-", where=where, duration=duration, received=received, sent=sent,
    )
    return counts


def close_cleanly(transport, clock, grace=REFUSAL_DRAIN):
    """
    Close after a refusal without a reset (a reset can kill the accept
    thread of TVM's tools): stop writing, and close once the peer has closed
    or after C{grace} seconds. The caller discards what the peer still sends.

    @return: the delayed call that closes at the latest (cancel it when the
        connection is lost).
    """
    lose_write = getattr(transport, "loseWriteConnection", None)
    if lose_write is None:
        # A transport without half-close: what was written still leaves first.
        transport.loseConnection()
    else:
        lose_write()
    return clock.callLater(grace, transport.loseConnection)


def provides(interface):
    """An attrs validator: the value must provide C{interface}."""

    def check(instance, attribute, value):
        if not interface.providedBy(value):
            raise TypeError(f"{attribute.name} must provide {interface.__name__}")

    return check


@attrs.frozen
class Handoff:
    """
    A connection whose handshake succeeded, ready to become a session.

    @ivar transport: the connection.
    @ivar carrier: the L{HandshakeProtocol} that owns it; in-process runners
        call L{HandshakeProtocol.switch_to} on it.
    @ivar reply: the handshake reply not yet written (the runner writes it,
        so it leaves ahead of any session byte).
    @ivar rest: bytes the client sent after its handshake.
    @ivar timeout: the session timeout in seconds, or L{None}.
    @ivar peer: a printable address of the client.
    @ivar slot: the L{tvm_rpc.server.gate.Slot} to release when the session ends.
    @ivar protocol: the session protocol the client speaks
        (L{OUR_PROTOCOL} or L{TVM_PROTOCOL}).
    @ivar key: the device key the session was granted under.
    @ivar resume: the token of a kept worker the client asked to continue
        in (C{-resume=}), or L{None}.
    """

    transport: object
    carrier: object
    reply: bytes
    rest: bytes
    timeout: "float | None"
    peer: str
    slot: object
    protocol: str = OUR_PROTOCOL
    key: str = ""
    resume: "str | None" = None


class ISessionRunner(Interface):
    """Runs sessions on connections whose handshake succeeded."""

    def start(handoff):
        """
        Run one session; release C{handoff.slot} when it ends, however it ends.

        @param handoff: a L{Handoff}.
        """

    def refusal(protocol):
        """
        @param protocol: a session protocol's name (L{OUR_PROTOCOL}, L{TVM_PROTOCOL}).
        @return: L{None} when this runner can run such sessions, else what
            the client is told.
        """


class HandshakeProtocol(SwitchingCarrier, TimeoutMixin, Protocol):
    """
    One connection to the server port: handshake, wait for a slot, hand off.

    The handshake timer is a L{TimeoutMixin} on the listener's clock.

    After an in-process hand-off it keeps forwarding bytes and the connection
    loss to the session protocol it switched to.
    """

    log = logger("tvm_rpc.server.listener")

    def __init__(self, listener):
        """@param listener: the L{ListenerFactory} that built this protocol."""
        self._listener = listener
        self.callLater = listener.clock.callLater
        self._decoder = HandshakeDecoder()
        self._drain = None
        self._waiting = None
        self._handed_off = False
        self._refused = False
        self.peer = "?"

    def connectionMade(self):
        """Switch Nagle off (sessions are request/response) and start the handshake timer."""
        self.peer = peer_label(self.transport, unknown="?")
        set_no_delay(self.transport)
        self.setTimeout(self._listener.handshake_timeout)

    def dataReceived(self, data):
        """Feed the handshake, or pass bytes on once a session runs."""
        if self.carried(data) or self._handed_off or self._refused:
            return
        if self._decoder.done:
            self._decoder.feed(data)
            return
        if self._decoder.feed(data):
            self.setTimeout(None)
            self._handshake_done()

    def connectionLost(self, reason=None):
        """Give up a place in line, or tell the session."""
        self.setTimeout(None)
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        self._drain = None
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.cancel()
        self.carry_loss(reason)

    def timeoutConnection(self):
        """No handshake within the handshake timeout: drop the peer."""
        self.log.warn(
            "dropping {peer}: no handshake within {timeout}s",
            peer=self.peer,
            timeout=self._listener.handshake_timeout,
        )
        self._listener.activity.refuse("handshake_timeout")
        self.transport.abortConnection()

    def _refuse(self, kind, why, **fields):
        self._listener.activity.refuse(kind)
        self.log.warn("mismatch key from {peer}: " + why, peer=self.peer, **fields)
        self.transport.write(encode_reply(RPC_CODE_MISMATCH))
        self.transport.loseConnection()

    def _handshake_done(self):
        decoder = self._decoder
        if decoder.error is not None:
            self.log.warn(
                "bad handshake from {peer}: {error}", peer=self.peer, error=decoder.error
            )
            self._listener.activity.refuse(
                "tracker_magic" if decoder.error == WRONG_PORT_FOR_TRACKER else "bad_handshake")
            # Closed, not reset: a reset can kill a TVM peer's accept thread.
            self._close_cleanly()
            return
        try:
            matchkey, timeout, protocol, resume = read_client_key(decoder.key)
        except ValueError as e:
            self._refuse("bad_key", "{problem}", problem=str(e))
            return
        gate = self._listener.gate
        if not gate.accepts(matchkey):
            self._refuse("mismatch", "presented {key!r}", key=redact_matchkeys(matchkey))
            return
        refusal = self._listener.runner.refusal(protocol)
        if refusal is not None:
            self._listener.activity.refuse("protocol_unavailable")
            self.log.warn(
                "refusing {peer}: its {protocol} session cannot run here",
                peer=self.peer,
                protocol=protocol,
            )
            if gate.tracked:
                # The tracker handed this matchkey out; offer a fresh one.
                gate.renew()
            self.transport.write(
                encode_reply(RPC_CODE_SUCCESS, server_key(gate.key)) + tvm_exception_packet(refusal)
            )
            self._close_cleanly()
            return
        waiting = gate.claim(matchkey)
        # Hold the client's further bytes in the kernel until its session runs.
        self.transport.pauseProducing()
        self._waiting = waiting
        waiting.addCallbacks(
            lambda slot: self._slot_granted(slot, timeout, protocol, resume),
            lambda failure: None,
        )

    def _close_cleanly(self):
        """Refused: discard what the peer still sends while L{close_cleanly} closes."""
        self._refused = True
        self._drain = close_cleanly(self.transport, self._listener.clock)

    def _slot_granted(self, slot, timeout, protocol=OUR_PROTOCOL, resume=None):
        self._waiting = None
        self._handed_off = True
        self.transport.resumeProducing()
        handoff = Handoff(
            transport=self.transport,
            carrier=self,
            reply=encode_reply(RPC_CODE_SUCCESS, server_key(self._listener.gate.key)),
            rest=self._decoder.rest,
            timeout=timeout,
            peer=self.peer,
            slot=slot,
            protocol=protocol,
            key=self._listener.gate.key,
            resume=resume,
        )
        self.log.debug(
            "{protocol} session for {peer} (timeout {timeout})",
            protocol=protocol,
            peer=self.peer,
            timeout=timeout,
        )
        try:
            self._listener.runner.start(handoff)
        except Exception:
            self.log.failure("could not start a session for {peer}", peer=self.peer)
            slot.release()
            self.transport.abortConnection()


@attrs.define(eq=False)
class ListenerFactory(Factory):
    """
    Builds a L{HandshakeProtocol} per connection.

    @ivar gate: the L{tvm_rpc.server.gate.SessionGate}.
    @ivar runner: the L{ISessionRunner}.
    @ivar clock: an L{IReactorTime} for the handshake timers.
    @ivar handshake_timeout: seconds a peer has to complete its handshake.
    @ivar activity: the L{ServerActivity} counting refused handshakes.
    """

    noisy = False

    gate: object
    runner: object = attrs.field(validator=provides(ISessionRunner))
    clock: object
    handshake_timeout: float = PEER_HANDSHAKE_TIMEOUT
    activity: ServerActivity = attrs.field(factory=ServerActivity, repr=False)

    def buildProtocol(self, addr):
        """@return: a L{HandshakeProtocol}."""
        protocol = HandshakeProtocol(self)
        protocol.factory = self
        return protocol


@implementer(ISessionRunner)
@attrs.define(eq=False)
class InProcessRunner:
    """
    Runs each session in the server's own process (C{--in-process}).

    A hung or crashing call takes the whole server with it in this mode; the
    session timeout still closes the connection when the reactor gets a turn.

    @ivar make_protocol: makes a fresh session protocol.
    @ivar clock: an L{IReactorTime} for the session timeout.
    @ivar timeout_notice: makes the bytes sent to a client whose session
        timed out, from the timeout in seconds; L{None} sends nothing.
    @ivar grace: seconds the notice may take to leave before the connection
        is cut.
    @ivar max_session_time: the longest a session may run, whatever its
        client asked for (L{None}: as long as the client asks).
    @ivar activity: the L{ServerActivity} counting sessions.
    """

    log = logger("tvm_rpc.server.listener")

    make_protocol: object
    clock: object
    timeout_notice: object = None
    grace: float = 1.0
    max_session_time: "float | None" = None
    activity: ServerActivity = attrs.field(factory=ServerActivity, repr=False)

    def refusal(self, protocol):
        """@return: why TVM's clients cannot be served in-process; L{None} for ours."""
        return TVM_CLIENT_REFUSAL if protocol == TVM_PROTOCOL else None

    def start(self, handoff):
        """Write the reply and switch the connection to a session protocol."""
        protocol = self.make_protocol()
        timer = None
        timeout = session_time(handoff.timeout, self.max_session_time)
        if timeout:
            timer = self.clock.callLater(timeout, self._expired, handoff, timeout)
        original_lost = protocol.connectionLost
        started = self.clock.seconds()
        # Twisted closes its socket before the protocol hears of the loss: a
        # duplicate keeps the connection's counters readable until then.
        sock = tcp_socket_of(handoff.transport)
        copy = None if sock is None else sock.dup()

        def lost(reason=None):
            expired = timer is not None and not timer.active()
            if timer is not None and timer.active():
                timer.cancel()
            handoff.slot.release()
            how = f"timed out after {timeout:g}s" if expired else "closed"
            duration = self.clock.seconds() - started
            try:
                counts = log_session_end(self.log, handoff, how, duration, copy, "in process",
                                         warn=expired)
                self.activity.session_ended(handoff.protocol, "timeout" if expired else "closed",
                                            duration, counts)
            finally:
                if copy is not None:
                    copy.close()
            return original_lost(reason)

        protocol.connectionLost = lost
        handoff.transport.write(handoff.reply)
        self.activity.session_started(handoff.protocol)
        handoff.carrier.switch_to(protocol, handoff.rest)

    def _expired(self, handoff, timeout):
        self.log.warn(
            "session for {peer} exceeded its {timeout}s timeout; closing",
            peer=handoff.peer,
            timeout=timeout,
        )
        transport = handoff.transport
        if self.timeout_notice is None:
            transport.abortConnection()
            return
        transport.write(self.timeout_notice(timeout))
        transport.loseConnection()
        # A peer that does not read must not keep the connection open.
        self.clock.callLater(self.grace, transport.abortConnection)


__all__ = [
    "REFUSAL_DRAIN",
    "close_cleanly",
    "read_client_key",
    "session_time",
    "HandshakeProtocol",
    "Handoff",
    "ISessionRunner",
    "InProcessRunner",
    "ListenerFactory",
]
