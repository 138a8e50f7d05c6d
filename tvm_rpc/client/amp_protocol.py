"""
The client side of our session protocol: an AMP conversation.

After the RPC handshake (see L{tvm_rpc.client.connect}) the bytes of the
connection belong to the session protocol of
L{tvm_rpc.protocol.session_commands}. L{SessionClientProtocol} (made by
L{make_client_protocol}) speaks its client side: remote calls as raw boxes
(L{tvm_rpc.protocol.calls}), their answers, every other command through
C{callRemote}, and the server's
L{SessionEnded<tvm_rpc.protocol.session_commands.SessionEnded>} notice. The
notice and the loss of the connection become L{SessionTimeout} /
L{SessionClosed} failures for every call still outstanding.

What a session does with the protocol (handles, streams, files, arrays) is
L{tvm_rpc.client.amp_engine}'s.
"""

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..lean_amp import LeanAMP
from ..protocol import calls
from ..protocol.session_commands import SessionEnded
from .session_errors import SessionClosed, SessionTimeout

log = Logger()


class SessionClientProtocol(LeanAMP):
    """
    The client side of the session protocol (an AMP conversation).

    Remote calls take L{call_function}: the request box is built as bytes
    and the answer is read from the raw box by L{tvm_rpc.protocol.calls},
    one Deferred per call (the wire format is the one C{callRemote} uses).

    @ivar end_code: the code of the server's L{SessionEnded} notice
        (C{"timeout"}, C{"shutdown"}), or L{None}.
    @ivar end_reason: the sentence that came with it.
    @ivar closing: set by the client when it ends the session itself.
    @ivar lost: whether the connection is gone.
    @ivar lost_reason: the L{Failure} outstanding calls failed with.
    @ivar orphan: called with the answer (a C{dict} as C{callRemote} gives
        it: C{result} or C{result_stream}) of a L{call_function} call
        cancelled before its answer came, so that what the answer made on the
        server (a result stream, handles) is released; L{None} to drop it.
    """

    #: Answers of sequential calls read right after the request was sent, at
    #: most this many times before the reactor's next turn (see
    #: L{LeanAMP.read_eagerly<tvm_rpc.lean_amp.LeanAMP.read_eagerly>}).
    eager_reads = 16

    def __init__(self):
        super().__init__()
        self.end_code = None
        self.end_reason = None
        self.closing = False
        self.lost = False
        self.lost_reason = None
        self._lost_waiters = []
        self._calls = {}
        self.orphan = None

    def call_function(self, args, decode, function=None, name=None, args_stream=None):
        """
        Send a L{CallFunction} box.

        @param args: the encoded argument list (at most
            L{MAX_INLINE_VALUE<tvm_rpc.protocol.session_commands.MAX_INLINE_VALUE>}
            bytes), or L{None} when they travel by stream.
        @param decode: called with the answer box (a C{dict}); its result
            (or the result of the Deferred it returns) is the call's result.
        @param function: the callee's handle id, or L{None}.
        @param name: the callee's global name (C{str}), or L{None}.
        @param args_stream: the id of a finished value stream holding the
            encoded arguments, or L{None}.
        @return: a Deferred of the result; it fails with L{RemoteError}
            (or AMP's C{UnknownRemoteError} for an undeclared error code)
            when the server answers an error, and with the session's
            ending error when the connection goes.
        """
        if self.stopped_reason is not None:
            return fail(self.stopped_reason)
        tag = self.next_tag()
        box = calls.request_box(
            tag, args, function, None if name is None else name.encode("utf-8"), args_stream)
        deferred = Deferred()
        self._calls[tag] = (deferred, decode)
        self.emit(box)
        self.read_eagerly()
        return deferred

    def _awaiting_answers(self):
        """@return: whether answers to L{call_function} calls are due (for eager reads)."""
        return bool(self._calls)

    def ampBoxReceived(self, box):
        """Answer the calls of L{call_function}; hand every other box to AMP."""
        calls = self._calls
        if calls:
            tag = box.get(b"_answer")
            if tag is not None:
                waiting = calls.pop(tag, None)
                if waiting is not None:
                    if waiting[0].called:
                        self._orphaned(box)
                    else:
                        _deliver(waiting, box)
                    return
            else:
                tag = box.get(b"_error")
                if tag is not None:
                    waiting = calls.pop(tag, None)
                    if waiting is not None:
                        _deliver_error(waiting[0], box)
                        return
        super().ampBoxReceived(box)

    @SessionEnded.responder
    def session_ended(self, code, reason):
        """Remember why the server is about to close the session."""
        log.info("server ends the session ({code}): {reason}", code=code, reason=reason)
        self.end_code = code
        self.end_reason = reason
        return {}

    def ending_error(self, reason=None):
        """
        @param reason: the L{Failure} the connection was lost with, if known.
        @return: the L{SessionClosed} (or L{SessionTimeout}) that says why
            the session is over.
        """
        if self.end_code == "timeout":
            return SessionTimeout(f"session timed out on the server: {self.end_reason}")
        if self.end_code is not None:
            return SessionClosed(f"server ended the session ({self.end_code}): {self.end_reason}")
        if self.closing:
            return SessionClosed("session closed")
        why = reason.getErrorMessage() if reason is not None else "connection lost"
        return SessionClosed(f"session connection lost: {why}")

    @property
    def ended(self):
        """Whether the session is over (the connection is gone)."""
        return self.lost

    def connectionLost(self, reason):
        """Fail outstanding calls with a session error, then tell the waiters."""
        self.lost = True
        self.lost_reason = Failure(self.ending_error(reason))
        super().connectionLost(self.lost_reason)
        calls, self._calls = self._calls, {}
        for deferred, _ in calls.values():
            if not deferred.called:
                deferred.errback(self.lost_reason)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(None)

    def _orphaned(self, box):
        """The answer to a cancelled call came: hand it to L{orphan}."""
        if self.orphan is None:
            return
        self.orphan(calls.parse_answer(box))

    def when_lost(self):
        """@return: a Deferred firing with L{None} once the connection is gone."""
        if self.lost:
            return succeed(None)
        waiter = Deferred()
        self._lost_waiters.append(waiter)
        return waiter


def _deliver(waiting, box):
    """Fire a call's Deferred with its decoded answer (unless it was cancelled)."""
    deferred, decode = waiting
    if deferred.called:
        return
    try:
        result = decode(box)
    except BaseException:
        deferred.errback(Failure())
        return
    if isinstance(result, Deferred):
        result.chainDeferred(deferred)
    else:
        deferred.callback(result)


def _deliver_error(deferred, box):
    """Fail a call's Deferred with the error of an AMP error box, as C{callRemote} would."""
    if not deferred.called:
        deferred.errback(Failure(calls.error_of(box)))


def make_client_protocol():
    """@return: a new L{SessionClientProtocol}, not yet connected."""
    return SessionClientProtocol()



__all__ = ["SessionClientProtocol", "make_client_protocol"]
