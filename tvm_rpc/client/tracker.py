"""The client side of the tracker protocol, with Deferreds.

L{TrackerClientProtocol} is a thin adapter around the sans-IO
L{FrameDecoder<tvm_rpc.protocol.framing.FrameDecoder>}: it sends the magic, waits for
the tracker's echo, sends each command in one write and matches replies to calls
first in, first out (the protocol has no request ids).

L{connect_tracker} opens a L{TrackerSession}: its control connection
serves C{ping}/C{summary}; each L{TrackerSession.allocate} opens a
connection of its own, because a REQUEST may be answered long after replies to
later commands, so only one REQUEST may be outstanding per connection.
"""

from collections import deque

import attrs
from twisted.internet import defer, error
from twisted.internet.endpoints import connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..protocol.tracker_commands import (
    BadMessage,
    Ping,
    Request,
    Summary,
    TrackerError,
)
from ..protocol.framing import FrameDecoder, encode_frame, encode_magic
from ..transport import client_endpoint, peer_label, quick_ack, set_no_delay
from .link_errors import TrackerClosed, reaching
from .summary_text import text_summary

__all__ = [
    "AllocationTimeout",
    "NotATracker",
    "TrackerClientFactory",
    "TrackerClientProtocol",
    "TrackerHungUp",
    "TrackerSession",
    "connect_tracker",
    "tracker_endpoint",
]

#: Seconds allowed to open a tracker connection and get the magic echoed.
DEFAULT_CONNECT_TIMEOUT = 30

log = Logger()


class NotATracker(BadMessage):
    """The peer did not answer the tracker magic as a tracker does."""


class TrackerHungUp(NotATracker):
    """
    The peer closed the connection before answering the tracker handshake:
    what an RPC server's or a proxy's port does with a tracker client.
    """


class AllocationTimeout(TrackerError, defer.TimeoutError):
    """No server was allocated within the timeout the caller gave."""


@attrs.define(eq=False)
class _Call:
    """
    One command awaiting its reply.

    @ivar command: the command sent.
    @ivar deferred: fires with the decoded reply.
    @ivar cancelled: whether the caller gave up; its reply is then dropped.
    """

    command: object
    deferred: defer.Deferred
    cancelled: bool = False


class TrackerClientProtocol(Protocol):
    """
    The client side of a tracker connection; sends the magic on connect.

    @ivar ready: a Deferred firing with this protocol once the tracker echoed
        the magic; it errbacks with L{NotATracker} when the echo is wrong and
        with the connection-loss reason when the connection closes first.
    @ivar log_violations: whether a peer that breaks the protocol is logged
        here as it is closed (an owner that says why itself, once per failure
        streak, turns it off).
    """

    log_violations = True

    def __init__(self):
        self.ready = defer.Deferred(self._cancel_ready)
        self._decoder = FrameDecoder(expect_magic=True)
        self._calls = deque()
        self._unsent = []
        self._closed = False
        self._broken = False
        self._close_reason = None
        self._close_waiters = []
        self._peer = "tracker"

    def connectionMade(self):
        """Send the magic and switch off Nagle: every command is one small write."""
        self._peer = peer_label(self.transport, unknown="tracker")
        set_no_delay(self.transport)
        self.transport.write(encode_magic())

    def call(self, command):
        """
        Send a command and wait for its reply.

        Commands issued before the tracker echoed the magic are queued and sent,
        in order and in one write, right after the echo (TVM's tracker refuses
        a connection whose magic arrives together with a frame).

        @param command: an instance of a command of
            L{tvm_rpc.protocol.tracker_commands}.
        @return: a Deferred firing with C{type(command).decode_result(reply)};
            it errbacks with L{TrackerError} on a FAIL reply, L{BadMessage}
            when the reply breaks the protocol (the connection is then closed),
            and the connection-loss reason when the connection ends first.
            Cancelling it drops the reply when it comes; cancelling a
            L{Request} also closes the connection, which withdraws the request.
        """
        if self._closed or self._broken:
            return defer.fail(self._close_reason or Failure(error.ConnectionDone()))
        entry = _Call(command, None)
        entry.deferred = defer.Deferred(lambda d: self._cancel_call(entry))
        self._calls.append(entry)
        frame = encode_frame(command.to_message())
        if self.ready.called and self.transport is not None:
            self.transport.write(frame)
        else:
            self._unsent.append(frame)
        return entry.deferred

    def when_closed(self):
        """@return: a Deferred fired (with L{None}) when the connection has ended."""
        if self._closed:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._close_waiters.append(waiter)
        return waiter

    def close(self):
        """
        Close the connection; outstanding calls errback.

        @return: L{when_closed}.
        """
        if not self._closed and self.transport is not None:
            self.transport.loseConnection()
        return self.when_closed()

    def dataReceived(self, data):
        """Feed the decoder; fire C{ready} on the echo and calls on replies."""
        if self._broken:
            return
        greeted = self._decoder.greeted
        values = self._decoder.feed(data)
        if not greeted and self._decoder.greeted:
            self._on_greeted()
        for value in values:
            if self._broken:
                return
            self._on_reply(value)
        if self._decoder.error is not None and not self._broken:
            if not self._decoder.greeted:
                problem = NotATracker(
                    f"{self._peer} is not an RPC tracker ({self._decoder.error})"
                )
            else:
                problem = BadMessage(f"bad reply from tracker {self._peer}: "
                                     f"{self._decoder.error}")
            self._violation(problem)
        elif self._decoder.pending and self.transport is not None:
            # Part of a reply: TVM's tracker writes a reply's length and body
            # in two sends under Nagle, so the body waits for our ACK.
            quick_ack(self.transport)

    def connectionLost(self, reason=None):
        """Fail C{ready} (if still waiting) and every outstanding call."""
        if reason is None:
            reason = Failure(error.ConnectionDone())
        self._closed = True
        if self._close_reason is None:
            self._close_reason = reason
        self._unsent.clear()
        if not self.ready.called:
            self.ready.errback(self._close_reason)
        while self._calls:
            entry = self._calls.popleft()
            if not entry.deferred.called:
                entry.deferred.errback(reason)
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _on_greeted(self):
        """The magic came back: send what was queued, then fire C{ready}."""
        if self._unsent:
            self.transport.write(b"".join(self._unsent))
            self._unsent.clear()
        self.ready.callback(self)

    def _on_reply(self, value):
        """Hand a reply to the oldest outstanding call."""
        if not self._calls:
            self._violation(BadMessage(
                f"tracker {self._peer} sent a reply nobody asked for: {value!r}"[:300]
            ))
            return
        entry = self._calls.popleft()
        if entry.cancelled:
            return
        try:
            result = type(entry.command).decode_result(value)
        except BadMessage as e:
            entry.deferred.errback(e)
            self._violation(e)
            return
        except TrackerError as e:
            entry.deferred.errback(e)
            return
        entry.deferred.callback(result)

    def _violation(self, problem):
        """Close the connection because the peer broke the protocol."""
        if self.log_violations:
            log.warn("closing tracker connection to {peer}: {problem}",
                     peer=self._peer, problem=problem)
        self._broken = True
        self._close_reason = Failure(problem)
        if not self.ready.called:
            self.ready.errback(Failure(problem))
        self.transport.loseConnection()

    def _cancel_ready(self, deferred):
        """
        Giving up on C{ready} closes the connection, cleanly: the peer may be
        a TVM daemon whose accept thread a reset can kill.
        """
        if self.transport is not None and not self._closed:
            self.transport.loseConnection()

    def _cancel_call(self, entry):
        """
        Forget a call's reply; a cancelled REQUEST is withdrawn by closing the
        connection, the only way the protocol offers.
        """
        entry.cancelled = True
        if isinstance(entry.command, Request) and not self._closed:
            if self.transport is not None:
                self.transport.abortConnection()


class TrackerClientFactory(Factory):
    """Builds L{TrackerClientProtocol}s; usable with endpoints and C{ClientService}."""

    protocol = TrackerClientProtocol
    #: No "Starting factory" line per connection (see L{tvm_rpc.transport.quiet_factory}).
    noisy = False
    #: The protocols' L{TrackerClientProtocol.log_violations}.
    log_violations = True

    def buildProtocol(self, address):
        """@return: a L{TrackerClientProtocol} that logs violations as this factory says."""
        protocol = super().buildProtocol(address)
        protocol.log_violations = self.log_violations
        return protocol


def tracker_endpoint(reactor, host, port, timeout=DEFAULT_CONNECT_TIMEOUT):
    """
    @return: an L{IStreamClientEndpoint} reaching a tracker by host name or
        address (see L{tvm_rpc.transport.client_endpoint}).
    """
    return client_endpoint(reactor, host, port, timeout)


async def _open(reactor, endpoint, address, timeout):
    """
    Connect and wait for the magic echo, within C{timeout} seconds in all.

    @return: a ready L{TrackerClientProtocol}.
    @raise defer.TimeoutError: when that takes longer than C{timeout}.
    """

    async def connect():
        """Connect, then wait for the echo."""
        protocol = await reaching(f"connecting to the tracker at {address}",
                                  connectProtocol(endpoint, TrackerClientProtocol()))
        try:
            return await protocol.ready
        except (error.ConnectionDone, error.ConnectionLost) as e:
            raise TrackerHungUp(
                f"{address} closed the connection before the tracker answered "
                "(is it a tracker's port? an RPC server or proxy closes tracker clients)"
            ) from e

    attempt = defer.Deferred.fromCoroutine(connect())
    if timeout is not None:
        def expired(result, seconds):
            """Replace the cancellation by a timeout naming the tracker."""
            raise defer.TimeoutError(
                f"tracker at {address} did not answer within {seconds:g} s"
            )
        attempt.addTimeout(timeout, reactor, onTimeoutCancel=expired)
    return await attempt


@attrs.define(eq=False)
class TrackerSession:
    """
    A conversation with a tracker.

    @ivar reactor: the reactor (or clock and connector) used for every
        connection and timer.
    @ivar host: the tracker's host as given.
    @ivar port: the tracker's port as given.
    @ivar endpoint: the endpoint every connection to the tracker is made with.
    @ivar connect_timeout: seconds allowed to open each connection.
    """

    reactor: object
    host: str
    port: int
    endpoint: object
    _control: TrackerClientProtocol
    connect_timeout: "float | None" = DEFAULT_CONNECT_TIMEOUT
    _requests: set = attrs.field(factory=set)
    _closing: bool = False

    @property
    def address(self):
        """The tracker's address as C{host:port}, for messages."""
        return f"{self.host}:{self.port}"

    def open_connection(self):
        """
        Open one more connection to the tracker.

        @return: a Deferred firing with a ready L{TrackerClientProtocol}.
        """
        return defer.Deferred.fromCoroutine(
            _open(self.reactor, self.endpoint, self.address, self.connect_timeout)
        )

    def ping(self):
        """@return: a Deferred firing with L{None} when the tracker answered."""
        return self._control.call(Ping())

    def summary(self):
        """@return: a Deferred firing with the tracker's summary L{dict}."""
        return self._control.call(Summary())

    def text_summary(self):
        """@return: a Deferred firing with the summary as TVM's query tool prints it."""
        return self.summary().addCallback(text_summary)

    def allocate(self, key, priority=1, timeout=None, user=""):
        """
        Ask the tracker for a free server, on a connection of its own.

        @param key: the device key.
        @param priority: higher is served first; FIFO among equals.
        @param timeout: seconds to wait at most, or L{None}. It is sent to the
            tracker (ours answers FAIL when it expires; TVM's ignores it) and
            enforced here as well.
        @param user: who asks (shown by the tracker).
        @return: a Deferred firing with an L{tvm_rpc.protocol.tracker_commands.Allocation}; it errbacks with
            L{TrackerError} when the tracker refuses, L{AllocationTimeout}
            when C{timeout} expires. Cancelling it withdraws the request by
            closing its connection.
        """
        attempt = defer.Deferred.fromCoroutine(
            self._allocate(Request(key, user, priority, timeout))
        )
        if timeout is not None:
            def expired(result, seconds):
                """Replace the cancellation by a timeout naming the key."""
                raise AllocationTimeout(
                    f"no server for key {key!r} from tracker {self.address} "
                    f"within {seconds:g} s"
                )
            attempt.addTimeout(timeout, self.reactor, onTimeoutCancel=expired)
        return attempt

    async def _allocate(self, request):
        """Send C{request} on a fresh connection, closed once it is answered."""
        connection = await self.open_connection()
        self._requests.add(connection)
        try:
            return await connection.call(request)
        except error.ConnectionClosed as e:
            if self._closing:
                raise
            raise TrackerClosed(
                f"the tracker at {self.address} closed the connection while "
                f"request({request.key!r}) was waiting") from e
        finally:
            self._requests.discard(connection)
            connection.close()

    def request(self, key, priority=1, session_timeout=0, max_retry=5, timeout=None, **options):
        """
        Obtain a server for C{key} and open a session on it (TVM's C{request}).

        @param key: the device key.
        @param priority: higher is served first.
        @param session_timeout: seconds after which the server ends the session.
        @param max_retry: attempts before giving up.
        @param timeout: seconds each wait in the queue may take, or L{None}.
        @param options: session options (C{max_result_size}, C{keep_worker})
            and the wait's C{progress}/C{progress_period}; see
            L{tvm_rpc.client.connect.connect}.
        @return: a Deferred firing with an L{RPCSession}; cancelling it
            withdraws the request. See L{tvm_rpc.client.connect.request}.
        """
        from .connect import request

        return request(self, key, priority, session_timeout, max_retry, timeout, **options)

    def request_and_run(self, key, func, priority=1, session_timeout=0, max_retry=2,
                        **options):
        """
        Run C{func(session)} on a server for C{key}, retrying on another server
        when the one obtained drops out; the session is always closed.

        @param options: session options (C{max_result_size}, C{keep_worker}),
            see L{tvm_rpc.client.connect.connect}, and each attempt's wait's
            C{progress}/C{progress_period}, see L{request}.
        @return: a Deferred firing with what C{func}'s Deferred gives. See
            L{tvm_rpc.client.connect.request_and_run}.
        """
        from .connect import request_and_run

        return request_and_run(self, key, func, priority, session_timeout, max_retry,
                               **options)

    def close(self):
        """
        Close the control connection and withdraw every allocation in progress.

        @return: a Deferred firing with L{None} once the control connection ended.
        """
        self._closing = True
        for connection in list(self._requests):
            connection.close()
        return self._control.close()


def connect_tracker(host, port, *, reactor=None, endpoint=None,
                    connect_timeout=DEFAULT_CONNECT_TIMEOUT):
    """
    Connect to a tracker.

    @param host: the tracker's host name or address.
    @param port: the tracker's port.
    @param reactor: the reactor to use; the global one when L{None}.
    @param endpoint: an endpoint to reach the tracker with instead of one made
        from C{host} and C{port} (which then only name it in messages).
    @param connect_timeout: seconds allowed for each connection to open and
        the tracker to echo the magic, or L{None} for no limit.
    @return: a Deferred firing with a L{TrackerSession}; it errbacks with
        L{NotATracker} when the peer is not a tracker, with
        L{defer.TimeoutError} when it does not answer in time, and with the
        connection error otherwise.
    """
    if reactor is None:
        from twisted.internet import reactor
    if endpoint is None:
        endpoint = tracker_endpoint(reactor, host, port, connect_timeout)

    async def connect():
        """Open the control connection, then build the session on it."""
        control = await _open(reactor, endpoint, f"{host}:{port}", connect_timeout)
        return TrackerSession(reactor, host, port, endpoint, control, connect_timeout)

    return defer.Deferred.fromCoroutine(connect())
