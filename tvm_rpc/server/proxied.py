"""C{rpc-server --through-proxy}: serve sessions over connections made out to a proxy.

A device that nobody can reach connects out to a proxy (TVM's or ours),
presents C{server:<key>} (marked as ours, see L{tvm_rpc.protocol.flavour})
and waits. When the proxy pairs it with a client it answers
C{RPC_CODE_SUCCESS} and the client's key (C{client:<key> -timeout=N ...});
from then on the connection is a session, run by the same session runner as
direct connections (a worker process, or in-process with C{--in-process}). After
each session, and whenever the proxy refuses or goes away, the link connects
again (at once after a session or a proxy timeout, with backoff after errors).
One session at a time, as TVM's server does through a proxy.
"""

import attrs
from twisted.application.service import Service
from twisted.internet.protocol import Protocol

from ..client.reach_report import ReachReport
from ..protocol.constants import (
    RPC_CODE_DUPLICATE,
    RPC_CODE_MISMATCH,
    RPC_CODE_SUCCESS,
    RPC_TRACKER_MAGIC,
)
from ..protocol.flavour import server_key, tvm_exception_packet
from ..protocol.handshake import TRACKER_ANSWERED, ReplyDecoder, encode_handshake
from ..transport import PEER_HANDSHAKE_TIMEOUT, SwitchingCarrier, quiet_factory, set_no_delay
from .activity import ServerActivity
from .listener import Handoff, close_cleanly, read_client_key
from .logs import logger
from .service import SessionHostService

log = logger("tvm_rpc.server.proxied")


class _LinkSlot:
    """A session slot that also brings the link back when it is released."""

    def __init__(self, slot, link):
        self._slot = slot
        self._link = link

    def release(self):
        """Free the slot and connect to the proxy again."""
        if not self._slot.released:
            self._slot.release()
            self._link._session_ended()


class ProxiedServerProtocol(SwitchingCarrier, Protocol):
    """One connection to the proxy: handshake, wait for a client, hand off."""

    def __init__(self, link):
        """@param link: the L{ProxyLink} that made this connection."""
        self._link = link
        self._decoder = ReplyDecoder()
        self._handed_off = False
        self._outcome = "lost"
        self._drain = None
        self._answered_at_all = False
        self._since = None

    def connectionMade(self):
        """Present our key; Nagle off, as on the server port."""
        set_no_delay(self.transport)
        self._since = self._link.clock.seconds()
        self.transport.write(encode_handshake(server_key(self._link.gate.key)))

    def dataReceived(self, data):
        """Read the proxy's answer, then pass bytes to the session."""
        if self.carried(data) or self._handed_off or self._decoder.done:
            return
        self._answered_at_all = True
        if self._decoder.feed(data):
            self._answered()

    def _answered(self):
        decoder = self._decoder
        proxy = self._link.proxy
        if decoder.error is not None or decoder.code not in (
            RPC_CODE_SUCCESS, RPC_CODE_MISMATCH, RPC_CODE_DUPLICATE
        ):
            if decoder.code == RPC_TRACKER_MAGIC:
                problem = TRACKER_ANSWERED
            else:
                problem = decoder.error or f"reply 0x{decoder.code & 0xFFFFFFFF:x}"
            log.error("{proxy} is not an RPC proxy: {problem}", proxy=proxy, problem=problem)
            self._outcome = "error"
            # Closed, not reset: TVM's daemons die on resets.
            self._drain = close_cleanly(self.transport, self._link.clock)
            return
        if decoder.code == RPC_CODE_MISMATCH:
            log.info("{proxy} has no client for {key} yet; connecting again",
                     proxy=proxy, key=self._link.gate.key)
            self._outcome = "again"
            self.transport.loseConnection()
            return
        if decoder.code == RPC_CODE_DUPLICATE:
            log.error("key {key} is already in use at {proxy}", key=self._link.gate.key, proxy=proxy)
            self._outcome = "error"
            self.transport.loseConnection()
            return
        try:
            _, timeout, protocol, resume = read_client_key(decoder.key)
        except ValueError as e:
            log.warn("bad client key from {proxy}: {problem}", proxy=proxy, problem=str(e))
            self._link.activity.refuse("bad_key")
            self._outcome = "again"
            self.transport.loseConnection()
            return
        refusal = self._link.runner.refusal(protocol)
        if refusal is not None:
            log.warn("refusing a client through {proxy}: its {protocol} session cannot run here",
                     proxy=proxy, protocol=protocol)
            self._link.activity.refuse("protocol_unavailable")
            self._outcome = "again"
            self.transport.write(tvm_exception_packet(refusal))
            self._drain = close_cleanly(self.transport, self._link.clock)
            return
        self._handed_off = True
        self.transport.pauseProducing()
        waiting = self._link.gate.claim(self._link.gate.key)
        waiting.addCallback(self._start, timeout, protocol, resume)

    def _start(self, slot, timeout, protocol, resume=None):
        self.transport.resumeProducing()
        handoff = Handoff(
            transport=self.transport,
            carrier=self,
            reply=b"",
            rest=self._decoder.rest,
            timeout=timeout,
            peer=f"a client through {self._link.proxy}",
            slot=_LinkSlot(slot, self._link),
            protocol=protocol,
            key=self._link.gate.key,
            resume=resume,
        )
        log.debug("{protocol} session through {proxy} (timeout {timeout})",
                 protocol=protocol, proxy=self._link.proxy, timeout=timeout)
        try:
            self._link.runner.start(handoff)
        except Exception:
            log.failure("could not start a session through {proxy}", proxy=self._link.proxy)
            handoff.slot.release()
            self.transport.abortConnection()

    def connectionLost(self, reason=None):
        """Connect again, or end the in-process session."""
        if self._drain is not None and self._drain.active():
            self._drain.cancel()
        self.carry_loss(reason)
        if not self._handed_off:
            if (self._outcome == "lost" and not self._answered_at_all and self._since is not None
                    and self._link.clock.seconds() - self._since < PEER_HANDSHAKE_TIMEOUT):
                # Closed at once without a word: what a tracker does with our
                # handshake (a proxy that gives up on a waiting server takes long).
                self._outcome = "unanswered"
            self._link._connection_ended(self._outcome)


@attrs.define(eq=False)
class ProxyLink(Service):
    """
    Keeps one connection waiting at the proxy whenever no session runs.

    @ivar endpoint: reaches the proxy.
    @ivar gate: the L{tvm_rpc.server.gate.SessionGate} (untracked; its key is
        the one presented).
    @ivar runner: the L{tvm_rpc.server.listener.ISessionRunner}.
    @ivar clock: an L{IReactorTime}.
    @ivar proxy: a printable name of the proxy.
    @ivar max_delay: the longest wait between attempts after errors.
    @ivar activity: the L{ServerActivity} counting refused clients.
    """

    endpoint: object
    gate: object
    runner: object
    clock: object
    proxy: str = "proxy"
    max_delay: float = 5.0
    activity: ServerActivity = attrs.field(factory=ServerActivity, repr=False)
    attempts: int = attrs.field(init=False, default=0)
    _delay: float = attrs.field(init=False, default=0.5)
    _pending: object = attrs.field(init=False, default=None)
    _connecting: object = attrs.field(init=False, default=None)
    _unanswered: int = attrs.field(init=False, default=0)
    _reach: ReachReport = attrs.field(init=False, default=None)

    def startService(self):
        """Connect to the proxy."""
        Service.startService(self)
        self._reach = ReachReport(self.proxy, log)
        self._connect()

    def stopService(self):
        """Stop connecting; a waiting connection is closed."""
        Service.stopService(self)
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._connecting is not None:
            self._connecting.cancel()

    def _connect(self):
        self._pending = None
        if not self.running:
            return
        self.attempts += 1
        attempt = self.endpoint.connect(quiet_factory(lambda: ProxiedServerProtocol(self)))
        self._connecting = attempt
        attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, protocol):
        self._connecting = None
        self._reach.reached()
        # Said once, not on every reconnection to a peer that never answers.
        emit = log.debug if self._unanswered else log.info
        emit("waiting at {proxy} as {key}", proxy=self.proxy, key=self.gate.key)
        if not self.running:
            protocol.transport.loseConnection()

    def _failed(self, failure):
        self._connecting = None
        # The peer is down (a proxy restarting): when it is back, a new
        # streak starts, and waiting there is said again.
        self._unanswered = 0
        if self.running:
            self._reach.failed(failure.value, self._delay)
            self._later(backoff=True)

    def _later(self, backoff):
        if not self.running or self._pending is not None:
            return
        delay = self._delay if backoff else 0
        if backoff:
            self._delay = min(self._delay * 2, self.max_delay)
        self._pending = self.clock.callLater(delay, self._connect)

    def _connection_ended(self, outcome):
        if outcome == "unanswered":
            self._unanswered += 1
            if self._unanswered in (1, 10) or self._unanswered % 100 == 0:
                log.error(
                    "{proxy} closed the connection without answering our handshake "
                    "({count} times so far): is it an RPC proxy? A tracker does this; "
                    "point --host/--port at the proxy's port",
                    proxy=self.proxy, count=self._unanswered,
                )
        else:
            self._unanswered = 0
        if outcome == "again":
            self._delay = 0.5
        self._later(backoff=outcome != "again")

    def _session_ended(self):
        self._delay = 0.5
        self._later(backoff=False)


class ProxiedServerService(SessionHostService):
    """The whole C{--through-proxy} server: the link (child C{"link"}) and the session runner."""

    def __init__(self, link, runner, work_root=None, owns_work_root=False):
        """
        @param link: the L{ProxyLink}.
        @param runner: the session runner (C{warm_up}/C{stop} called when present).
        @param work_root: the directory under which sessions work.
        @param owns_work_root: whether to remove C{work_root} on stop.
        """
        super().__init__(runner, work_root, owns_work_root)
        self.link = link
        link.setName("link")

    def startService(self):
        """Warm the runner; wait at the proxy once a session can start at once."""
        super().startService()
        self.add_when_ready(self.link)
