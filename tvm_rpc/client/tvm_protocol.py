"""
The Twisted adapter of TVM's own session protocol, client side.

L{TVMClientProtocol} cuts the connection's bytes into packets
(L{FrameDecoder<tvm_rpc.protocol.tvm_packets.FrameDecoder>}), and matches
each answer to the oldest request still waiting: TVM's server handles
packets strictly one after the other and answers in order, so there are no
request ids, only a FIFO. A request's Deferred fires with the decoded
sequence of its kReturn (or the raw bytes of its kCopyAck), or fails with a
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} for its kException.

What is not an answer ends the session, every waiting request failing with
a L{SessionClosed<tvm_rpc.client.session_errors.SessionClosed>} saying why:
an unsolicited kShutdown (the server hit a decoding error), TVM's session
timeout notice (a kException starting with C{RPCSessionTimeoutError:},
L{SessionTimeout<tvm_rpc.client.session_errors.SessionTimeout>}), bytes that
do not decode (an unknown code or type index, a kCopyAck of the wrong size),
and the connection's loss. An answer longer than the bound fails its request
with L{ResultTooLarge<tvm_rpc.protocol.streams.ResultTooLarge>}: its bytes
are dropped as they come, never kept, and the session goes on.
"""

import collections
import re

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.protocol import Protocol
from twisted.logger import Logger

from ..lean_amp import write_now
from ..protocol import tvm_packets as packets
from ..protocol.remote_error import RemoteError
from ..protocol.streams import ResultTooLarge
from ..protocol.tvm_values import TVMCodecError, decode_seq
from ..transport import quick_ack, set_no_delay
from .session_errors import SessionClosed, SessionTimeout

log = Logger()

#: The prefix of TVM's session-timeout notice (C{rpc_endpoint.cc}).
TIMEOUT_PREFIX = "RPCSessionTimeoutError:"
#: Bytes of a packet besides the result a call may return (code, count, tags).
PACKET_SLACK = 64
_UNSOLICITED = object()
_ERROR_KIND = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception)): ", re.MULTILINE)


#: The type name of the remote error for a missing function (as our server's).
NO_SUCH_FUNCTION = "tvm_rpc.server.registry.NoSuchFunction"
#: Functions only some of TVM's servers register, and which.
_ONLY_ON = {"tvm.rpc.server.listdir": "only apps/cpp_rpc registers it, "
                                       "TVM's Python server does not"}


def no_such_function(name, what="no global function named"):
    """@return: the L{RemoteError} for a function the server lacks (as our server's)."""
    hint = _ONLY_ON.get(name)
    where = "" if what.startswith("module") else " on this server"
    return RemoteError(NO_SUCH_FUNCTION, f"{what} {name!r}{where}"
                       + (f" ({hint})" if hint else ""), "")


def tvm_remote_error(message):
    """
    @param message: the text of a kException.
    @return: the L{RemoteError} for it, its type the last C{XxxError:} named
        in the text (C{tvm.InternalError}, ...), else C{tvm.RPCError}.
    """
    kinds = _ERROR_KIND.findall(message)
    return RemoteError(f"tvm.{kinds[-1]}" if kinds else "tvm.RPCError", message, "")


class TVMClientProtocol(Protocol):
    """
    TVM's session protocol on one connection, client side: a FIFO of
    pending requests.

    @ivar lost: whether the connection is gone.
    @ivar closing: set by the engine when it ends the session itself.
    """

    def __init__(self, max_packet):
        """@param max_packet: the longest packet accepted from the server."""
        self._decoder = packets.FrameDecoder(max_packet, skip_oversize=True)
        self._pending = collections.deque()
        self._waiters = []
        self._drain_waiters = []
        self._ending = None
        self.lost = False
        self.closing = False

    @property
    def ended(self):
        """
        Whether the session is over: the connection is gone, or the protocol
        ended it (a timeout notice, an unsolicited shutdown, bytes that do not
        decode) and is closing the connection.
        """
        return self.lost or self._ending is not None

    @property
    def max_packet(self):
        """The longest packet accepted from the server."""
        return self._decoder.max_packet

    @max_packet.setter
    def max_packet(self, value):
        self._decoder.max_packet = value

    @property
    def pending(self):
        """Requests written and not answered yet."""
        return len(self._pending)

    def connectionMade(self):
        """Nagle off: every request is one write and waits for its answer."""
        set_no_delay(self.transport)

    # -- requests ----------------------------------------------------------

    def request(self, data, copy_ack=None, orphan=None):
        """
        Write one packet and wait for its answer.

        @param data: the whole packet (one write).
        @param copy_ack: for kCopyFromRemote, the number of bytes the
            kCopyAck must carry; L{None} for a packet answered by kReturn.
        @param orphan: for a request that creates something on the server:
            called with the answer (the decoded sequence) when it arrives
            after the Deferred was cancelled, to release what it made.
        @return: a Deferred of the decoded sequence of the kReturn (or of the
            kCopyAck's bytes). Cancelling it fails it at once, but its slot
            stays in the FIFO and its answer is read and dropped (after
            C{orphan}), so the stream stays in step.
        """
        if self.lost or self._ending is not None:
            return fail(self.ending_error())
        answer = Deferred()
        self._pending.append((answer, copy_ack, orphan))
        write_now(self.transport, data)
        return answer

    def send(self, data):
        """Write a packet that gets no answer (kShutdown)."""
        if not self.lost:
            write_now(self.transport, data)

    def ending_error(self):
        """@return: the L{SessionClosed} that requests fail with once the session is over."""
        if self._ending is not None:
            return self._ending
        return SessionClosed("the session is closed")

    def drained(self):
        """@return: a Deferred firing with L{None} once no request waits for its answer."""
        if not self._pending or self.lost:
            return succeed(None)
        waiter = Deferred()
        self._drain_waiters.append(waiter)
        return waiter

    def _fire_drained(self):
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def when_lost(self):
        """@return: a Deferred firing with L{None} once the connection is gone."""
        if self.lost:
            return succeed(None)
        waiter = Deferred()
        self._waiters.append(waiter)
        return waiter

    # -- answers -----------------------------------------------------------

    def dataReceived(self, data):
        """Decode the packets and hand each answer to its request."""
        if self._ending is not None:
            return
        try:
            for code, body in self._decoder.feed(data):
                self._packet(code, body)
                if self._ending is not None:
                    return
        except (packets.TVMPacketError, TVMCodecError) as e:
            self._violation(str(e))
            return
        if self._pending:
            # TVM's server leaves Nagle on: with answers still due, its next
            # small write waits for our ACK, so do not delay it.
            quick_ack(self.transport)

    def _packet(self, code, body):
        # The slot is taken only once its answer reads well: a violation
        # fails it with every other pending request.
        if code is None:
            if self._expected(f"answer of {body} bytes") is not _UNSOLICITED:
                self._deliver(Deferred.errback, ResultTooLarge(
                    f"the server's answer has {body} bytes, more than this session accepts "
                    f"({self.max_packet - PACKET_SLACK} bytes; raise its max_result_size); "
                    "it was dropped unread"))
        elif code == packets.RETURN:
            items, end = decode_seq(body)
            if end != len(body):
                raise TVMCodecError(f"{len(body) - end} bytes after a kReturn's values")
            copy_ack = self._expected("kReturn")
            if copy_ack is not None:
                self._violation(f"a kReturn where a kCopyAck of {copy_ack} bytes was due")
            elif copy_ack is None and self._pending:
                self._deliver(Deferred.callback, items)
        elif code == packets.COPY_ACK:
            copy_ack = self._expected("kCopyAck")
            if copy_ack != len(body) and self._pending:
                self._violation(
                    f"a kCopyAck of {len(body)} bytes where "
                    + ("a kReturn was due" if copy_ack is None else f"{copy_ack} were asked"))
            elif self._pending:
                self._deliver(Deferred.callback, body)
        elif code == packets.EXCEPTION:
            items, _ = decode_seq(body)
            message = str(items[0]) if items else ""
            if message.startswith(TIMEOUT_PREFIX):
                self._end(SessionTimeout(f"the server ended the session: {message}"))
            elif self._expected("kException", message) is not _UNSOLICITED:
                self._deliver(Deferred.errback, tvm_remote_error(message))
        elif code == packets.SHUTDOWN:
            self._end(SessionClosed(
                "the server ended the session (kShutdown): TVM's server does so when it "
                "cannot decode a request, for instance one of TVM <= 0.20 (its pre-FFI "
                "encoding) that passes the version check and then fails on arguments"))
        else:
            name = packets.CODE_NAMES.get(code, "an unknown code")
            self._violation(f"{name} (code {code}) is no answer of TVM's session protocol")

    def _expected(self, what, detail=""):
        """
        @return: what the oldest pending request expects (L{None} for a
            kReturn, a byte count for a kCopyAck), or L{_UNSOLICITED} after
            ending the session when none is pending.
        """
        if not self._pending:
            self._violation(f"an unsolicited {what}" + (f": {detail}" if detail else ""))
            return _UNSOLICITED
        return self._pending[0][1]

    def _deliver(self, outcome, value):
        """
        Take the oldest pending request and fire it; a cancelled one's
        successful answer goes to its orphan handler instead.
        """
        answer, _, orphan = self._pending.popleft()
        if not answer.called:
            outcome(answer, value)
        elif orphan is not None and outcome is Deferred.callback:
            try:
                orphan(value)
            except Exception:
                log.failure("releasing what a cancelled request made")
        # After the answer's callbacks, which may have asked more.
        if not self._pending and self._drain_waiters:
            self._fire_drained()

    def _violation(self, what):
        """The server sent what cannot be read: end the session saying so."""
        log.warn("closing a TVM session: the server sent {what}", what=what)
        self._end(SessionClosed(f"the server broke TVM's session protocol: {what}"))

    def _end(self, error):
        """End the session with C{error} (what waiting and later requests fail with)."""
        if self._ending is None:
            self._ending = error
            self._fail_pending()
            if self.transport is not None:
                self.transport.loseConnection()

    def _fail_pending(self):
        pending, self._pending = self._pending, collections.deque()
        for answer, _, _ in pending:
            if not answer.called:
                answer.errback(self._ending)

    def connectionLost(self, reason=None):
        """Fail what is still waiting; tell who waits for the end."""
        self.lost = True
        if self._ending is None:
            why = reason.getErrorMessage() if reason is not None else "closed"
            self._ending = SessionClosed(
                "the session is closed" if self.closing else f"the connection was lost ({why})")
        self._fail_pending()
        self._fire_drained()
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)


__all__ = [
    "NO_SUCH_FUNCTION",
    "PACKET_SLACK",
    "TIMEOUT_PREFIX",
    "TVMClientProtocol",
    "no_such_function",
    "tvm_remote_error",
]
