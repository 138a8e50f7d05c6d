"""The client's network entry points: L{connect}, L{request} and L{request_and_run}.

L{connect} opens a TCP connection to a server (or a proxy), performs TVM's
RPC handshake marked as ours (see L{tvm_rpc.protocol.flavour}), then
switches the connection to the session protocol the reply announces (ours for
a marked reply, TVM's own for one of TVM's servers) and returns the
L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>}. L{request} first obtains a
server from a tracker; L{request_and_run} runs a function on a session and
retries on another server when the one it got drops out. All return Deferreds.
"""

import functools

from twisted.internet import defer, error
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from ..protocol.constants import RPC_CODE_DUPLICATE, RPC_CODE_MISMATCH, RPC_CODE_SUCCESS
from ..protocol.flavour import OUR_PROTOCOL, TVM_PROTOCOL, client_key, reply_is_marked
from ..protocol.handshake import ReplyDecoder, encode_handshake
from ..transport import SwitchingCarrier, client_endpoint, set_no_delay
from .engine import DEFAULT_MAX_RESULT_SIZE
from .kept_workers import KEPT_WORKERS
from .link_errors import reaching
from .waiting import PROGRESS_PERIOD, WaitReporter
from .session import open_session
from .session_errors import SessionTimeout

log = Logger()

#: Seconds L{connect} allows to connect and receive the handshake reply.
CONNECT_TIMEOUT = 30.0


class HandshakeError(Exception):
    """The server (or proxy) did not accept the session."""


class KeyMismatch(HandshakeError):
    """The server answered RPC_CODE_MISMATCH: it does not accept this key or matchkey."""


class DuplicateKey(HandshakeError):
    """The proxy answered RPC_CODE_DUPLICATE: the key is already waiting there."""


class NotAnRpcServer(HandshakeError):
    """The peer does not speak the RPC handshake at all, or closed during it."""


class RequestFailed(Exception):
    """No session could be opened on any server the tracker offered."""


def server_endpoint(reactor, host, port, timeout=CONNECT_TIMEOUT):
    """
    @return: an L{IStreamClientEndpoint} reaching C{host}:C{port} (see
        L{tvm_rpc.transport.client_endpoint}), with the handshake's timeout.
    """
    return client_endpoint(reactor, host, port, timeout)


class ClientHandshake(SwitchingCarrier, TimeoutMixin, Protocol):
    """
    The connecting side of the RPC handshake, then a carrier for the session.

    Its timer (a L{TimeoutMixin} on C{clock}) bounds connecting and the
    answer together: it starts with L{shake}.

    @ivar peer_protocol: once accepted, the session protocol the reply
        announced: L{OUR_PROTOCOL} (marked) or L{TVM_PROTOCOL}.
    @ivar done: fires with the bytes received after the reply once the server
        accepted us; errbacks with a L{HandshakeError} (the connection is then
        closed), the connection error or the connection's loss. Cancelling it
        gives up the connection.
    """

    def __init__(self, key, session_timeout, address, clock=None, timeout=None, resume=None):
        """
        @param key: the key or matchkey to present (without C{client:}).
        @param session_timeout: seconds, or 0/L{None} for none.
        @param address: C{host:port}, for messages.
        @param clock: an L{IReactorTime} for the timer; needed with C{timeout}.
        @param timeout: seconds L{shake} may take, or L{None} for no limit.
        @param resume: the token of a worker this server kept for us
            (L{tvm_rpc.client.kept_workers}), or L{None}.
        """
        self._key = key
        self._resume = resume
        self._session_timeout = session_timeout
        self._address = address
        self._timeout = timeout
        if clock is not None:
            self.callLater = clock.callLater
        self._connecting = None
        self._decoder = ReplyDecoder()
        self.peer_protocol = None
        self.done = defer.Deferred(self._give_up)

    def shake(self, endpoint):
        """
        Connect through C{endpoint} and do the handshake, within the timeout.

        @return: L{done}.
        """
        self.setTimeout(self._timeout)
        self._connecting = defer.Deferred.fromCoroutine(reaching(
            f"connecting to the RPC server at {self._address}", connectProtocol(endpoint, self)))
        self._connecting.addErrback(self._fail)
        return self.done

    def _give_up(self, done):
        """C{done} was cancelled: stop connecting, or drop the connection."""
        self.setTimeout(None)
        if self.transport is not None:
            self.transport.abortConnection()
        elif self._connecting is not None:
            self._connecting.cancel()

    def _fail(self, problem):
        """Fail L{done} (once) with C{problem}."""
        self.setTimeout(None)
        if not self.done.called:
            self.done.errback(problem)

    def timeoutConnection(self):
        """Connecting and the answer took longer than the timeout."""
        self._fail(NotAnRpcServer(
            f"{self._address} did not answer the RPC handshake within {self._timeout:g} s "
            f"(a busy server answers once its session ends, a proxy once a "
            f"server with the key arrives: pass a larger handshake_timeout "
            f"to wait longer)"
        ))
        if self.transport is not None:
            self.transport.abortConnection()
        elif self._connecting is not None:
            self._connecting.cancel()

    def connectionMade(self):
        """Send the handshake in one write, with Nagle off."""
        set_no_delay(self.transport)
        self.transport.write(encode_handshake(
            client_key(self._key, self._session_timeout, self._resume)))

    def dataReceived(self, data):
        """Decode the reply, then pass bytes to the session."""
        if self.carried(data) or self.done.called:
            return
        if self._decoder.feed(data):
            self._reply()

    def _reply(self):
        decoder = self._decoder
        problem = None
        if decoder.error is not None:
            problem = NotAnRpcServer(f"{self._address} sent a bad handshake reply: {decoder.error}")
        elif decoder.code == RPC_CODE_MISMATCH:
            problem = KeyMismatch(
                f"{self._address} does not accept key {self._key!r} (RPC_CODE_MISMATCH)"
            )
        elif decoder.code == RPC_CODE_DUPLICATE:
            problem = DuplicateKey(
                f"key {self._key!r} is already in use at {self._address} (RPC_CODE_DUPLICATE)"
            )
        elif decoder.code != RPC_CODE_SUCCESS:
            problem = NotAnRpcServer(
                f"{self._address} is not an RPC server or proxy "
                f"(handshake reply 0x{decoder.code & 0xFFFFFFFF:x})"
            )
        if problem is not None:
            self.transport.loseConnection()
            self._fail(problem)
            return
        self.setTimeout(None)
        self.peer_protocol = OUR_PROTOCOL if reply_is_marked(decoder.key) else TVM_PROTOCOL
        self.done.callback(decoder.rest)

    def connectionLost(self, reason=None):
        """Fail the handshake, or tell the session."""
        self._fail(
            NotAnRpcServer(
                f"{self._address} closed the connection during the RPC handshake "
                f"({reason.getErrorMessage() if reason else 'closed'}): is it a server's or "
                "a proxy's port? A tracker's port closes like this"
            )
        )
        self.carry_loss(reason)


def connect(host, port, key="", session_timeout=0, *, reactor=None, endpoint=None,
            handshake_timeout=CONNECT_TIMEOUT,
            max_result_size=DEFAULT_MAX_RESULT_SIZE, keep_worker=True):
    """
    Open a session on a server (directly, or through a proxy by key).

    @param host: the server's host name or address.
    @param port: its port.
    @param key: the key (or tracker matchkey) to present; C{""} for a server
        started without a tracker and without C{--key}.
    @param session_timeout: seconds after which the server ends the session
        (0: never).
    @param reactor: the reactor; the global one when L{None}.
    @param endpoint: an endpoint to use instead of one made from C{host} and
        C{port}.
    @param handshake_timeout: seconds allowed to connect and be answered, or
        L{None} for no limit. Through a proxy the answer waits until a server
        with the key is there: raise it (or pass L{None}) to wait longer.
    @param max_result_size: the longest encoded result of one call the
        session accepts (see L{RPCSession.max_result_size}).
    @param keep_worker: on our servers, ask at the session's end to keep its
        worker process for this process's next session on the same server
        (L{tvm_rpc.client.kept_workers}), and continue in a worker kept by
        an earlier one; L{False} for a fresh worker each time.
    @return: a Deferred firing with an L{RPCSession} whose C{address} is
        C{host:port} and whose C{session_timeout} is the one asked for; it
        errbacks with L{KeyMismatch}, L{DuplicateKey} or
        L{NotAnRpcServer} when refused, with L{SessionLostAtStart} when the
        connection is lost between the handshake and the session's start,
        or the connection error.
    """
    if reactor is None:
        from twisted.internet import reactor
    address = f"{host}:{port}"
    if endpoint is None:
        endpoint = server_endpoint(reactor, host, port, handshake_timeout)

    kept = KEPT_WORKERS if keep_worker else None

    async def run():
        handshake = ClientHandshake(
            key, session_timeout, address, reactor, handshake_timeout,
            resume=kept.take(address) if kept is not None else None,
        )
        rest = await handshake.shake(endpoint)
        return await open_session(
            handshake, rest, reactor=reactor, session_timeout=session_timeout,
            address=address, max_result_size=max_result_size,
            protocol=handshake.peer_protocol,
            on_kept=functools.partial(kept.keep, address) if kept is not None else None,
        )

    return defer.Deferred.fromCoroutine(run())


#: Failures worth another server: the connection or handshake broke (a
#: connection lost before the session started, L{SessionLostAtStart}, is a
#: L{error.ConnectionClosed}).
RETRYABLE = (
    error.ConnectError,
    error.ConnectionClosed,
    KeyMismatch,
    NotAnRpcServer,
    defer.TimeoutError,
)


def request(tracker, key, priority=1, session_timeout=0, max_retry=5, timeout=None, *,
            max_result_size=DEFAULT_MAX_RESULT_SIZE, progress=None,
            progress_period=PROGRESS_PERIOD, keep_worker=True):
    """
    Obtain a server for C{key} from a tracker and open a session on it.

    @param tracker: a L{tvm_rpc.client.tracker.TrackerSession}.
    @param key: the device key.
    @param priority: higher is served first.
    @param session_timeout: seconds after which the server ends the session.
    @param max_retry: attempts (allocation plus connection) before giving up.
    @param timeout: seconds each wait in the tracker's queue may take, or L{None}.
    @param max_result_size: see L{connect}.
    @param keep_worker: see L{connect}.
    @param progress: called with a L{WaitProgress<tvm_rpc.client.waiting.WaitProgress>}
        (key, requests pending for it, seconds waited) every C{progress_period}
        seconds while the request waits in the tracker's queue; a log line
        says the same with or without it.
    @param progress_period: seconds between progress reports (one SUMMARY
        each); 0 for none.
    @return: a Deferred firing with an L{RPCSession}; cancelling it withdraws
        the request. It errbacks with L{RequestFailed} after C{max_retry}
        failed attempts (a connection, handshake or session start that
        failed), and with the tracker's error (for instance
        L{tvm_rpc.client.tracker.AllocationTimeout}) at once.
    """
    reactor = tracker.reactor

    async def run():
        last = None
        for attempt in range(max(1, max_retry)):
            waiting = WaitReporter(tracker, key, progress, progress_period)
            waiting.start()
            try:
                allocation = await tracker.allocate(key, priority=priority, timeout=timeout)
            finally:
                waiting.stop()
            try:
                return await connect(
                    allocation.host, allocation.port, allocation.matchkey,
                    session_timeout, reactor=reactor, max_result_size=max_result_size,
                    keep_worker=keep_worker,
                )
            except RETRYABLE as e:
                last = e
                log.warn(
                    "session on {host}:{port} for {key} failed ({problem}); attempt {n} of {max}",
                    host=allocation.host, port=allocation.port, key=key,
                    problem=str(e) or type(e).__name__, n=attempt + 1, max=max_retry,
                )
        raise RequestFailed(
            f"cannot open a session for key {key!r} via tracker {tracker.address} "
            f"after {max_retry} attempts: {last}"
        )

    return defer.Deferred.fromCoroutine(run())


def request_and_run(tracker, key, func, priority=1, session_timeout=0, max_retry=2, *,
                    max_result_size=DEFAULT_MAX_RESULT_SIZE, progress=None,
                    progress_period=PROGRESS_PERIOD, keep_worker=True):
    """
    Run C{func(session)} on a server for C{key}, on another server when the
    one obtained drops out.

    @param func: takes an L{RPCSession}, returns a Deferred (or a value).
    @param progress: see L{request}: each attempt's wait in the tracker's
        queue reports to it (C{waited} counts from that attempt's start).
    @param progress_period: see L{request}.
    @param keep_worker: see L{connect}.
    @return: a Deferred firing with what C{func}'s Deferred gives; the session
        is closed however it ends. It errbacks with L{SessionTimeout} when the
        server ended the session for its timeout, with C{func}'s own error at
        once (a remote error is not retried), and with L{RequestFailed} when
        every attempt lost its server.
    """
    reactor = tracker.reactor

    async def run():
        last = None
        for attempt in range(max(1, max_retry)):
            session = await request(
                tracker, key, priority=priority, session_timeout=session_timeout,
                max_result_size=max_result_size, progress=progress,
                progress_period=progress_period, keep_worker=keep_worker,
            )
            started = reactor.seconds()
            try:
                return await defer.maybeDeferred(func, session)
            except SessionTimeout:
                raise
            except RETRYABLE as e:
                elapsed = reactor.seconds() - started
                if session_timeout and elapsed >= session_timeout * 0.95:
                    raise SessionTimeout(
                        f"the {session_timeout:g} s session on key {key!r} timed out "
                        f"while running {getattr(func, '__name__', func)!r}"
                    ) from e
                last = e
                log.warn(
                    "lost the server for {key} ({problem}); attempt {n} of {max}",
                    key=key, problem=str(e) or type(e).__name__, n=attempt + 1, max=max_retry,
                )
            finally:
                await _close_quietly(session)
        raise RequestFailed(
            f"failed to run on key {key!r} (max_retry={max_retry}): {last}"
        )

    return defer.Deferred.fromCoroutine(run())


async def _close_quietly(session):
    try:
        await defer.maybeDeferred(session.close)
    except Exception:
        log.failure("closing a session failed")
