"""
The server's end of a remote call: find the callee, decode the arguments,
run the function, answer.

L{CallResponder} serves every
L{CallFunction<tvm_rpc.protocol.session_commands.CallFunction>} box a
session receives, on a short path: the boxes are read and written by
L{tvm_rpc.protocol.calls} (what AMP would send for the command), without
Deferred layers when the call completes at once. Any exception becomes a
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} answer and the
session stays usable. A function may return a Deferred or be a coroutine
function: its call is answered when it completes, while other calls proceed.
"""

import inspect

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.python.failure import Failure

from ..protocol import calls, session_commands, values
from ..protocol.remote_error import as_remote_error

#: Result types that are never awaitable (checked before L{inspect.isawaitable}).
_PLAIN_RESULTS = frozenset((type(None), bool, int, float, str, bytes, list, tuple, dict))
#: Values the environment passes through unchanged in both directions
#: (C{from_wire} for arguments, C{to_wire} for results).
_SCALARS = frozenset((type(None), bool, int, float, str, bytes))


async def _awaited(awaitable):
    """@return: the result of C{awaitable} (so L{ensureDeferred} takes any awaitable)."""
    return await awaitable


class CallResponder:
    """
    Mix into the session's L{AMP<twisted.protocols.amp.AMP>} protocol
    (before it): C{CallFunction} boxes are served here, every other box goes
    on to AMP's dispatch.

    The protocol provides C{environment} (the session's
    L{SessionEnvironment<tvm_rpc.server.environment.SessionEnvironment>}),
    C{send_tracebacks}, C{emit} (write whole boxes) and C{unhandledError}.

    @ivar _callees: the functions already called, by handle id (handles are
        never reused; the protocol drops an entry when its handle is freed).
    """

    def _callee(self, function, name):
        """
        @return: the function named by handle or by name.
        @raise ValueError: unless exactly one is given.
        """
        if (function is None) == (name is None):
            raise ValueError("name the function by exactly one of 'function' or 'name'")
        if function is not None:
            # Handles are never reused and only Free drops them (see free()),
            # so a function found once stays valid until then.
            callee = self._callees.get(function)
            if callee is None:
                callee = self._callees[function] = self.environment.get(function, "function")
            return callee
        return self.environment.lookup(name)

    def _arguments(self, args, args_stream):
        """@return: the decoded argument list, inline or from a finished value stream."""
        if args is not None and args_stream is not None:
            raise ValueError("give the arguments inline or by stream, not both")
        if args_stream is not None:
            args = self.environment.take_value(args_stream)
        if args is None:
            return []
        return _argument_list(args)

    def _result(self, value):
        """@return: the answer of a call: the encoded result inline, or a read stream of it."""
        encoded = values.encode(value)
        if len(encoded) <= session_commands.MAX_INLINE_VALUE:
            return {"result": encoded}
        return {"result_stream": self.environment.open_result(encoded),
                "result_size": len(encoded)}

    def _call(self, function=None, name=None, args=None, args_stream=None):
        """
        Call a function with decoded arguments.

        @return: the answer (see L{_result}), or a Deferred of it when the
            function returns an awaitable.
        """
        callee = self._callee(function, name)
        arguments = self._arguments(args, args_stream)
        for argument in arguments:
            if type(argument) not in _SCALARS:
                result = self.environment.invoke(callee, arguments)
                break
        else:
            result = callee(*arguments)
        return self._answer_of(result)

    def _answer_of(self, result):
        """
        @return: the answer for a function's return value (see L{_result}),
            or a Deferred of it when the value is awaitable.
        """
        if type(result) not in _PLAIN_RESULTS and inspect.isawaitable(result):
            return ensureDeferred(_awaited(result)).addCallback(self._converted)
        return self._converted(result)

    def _converted(self, result):
        """@return: the answer for a function's result."""
        if type(result) not in _SCALARS:
            result = self.environment.to_wire(result)
        return self._result(result)

    def ampBoxReceived(self, box):
        """
        Serve L{CallFunction<tvm_rpc.protocol.session_commands.CallFunction>},
        the command of every remote call, here: read the box and answer it
        with the boxes of L{tvm_rpc.protocol.calls} (what AMP would send for
        the command), without Deferred layers when the call completes at
        once (and in this one frame: it is the hot path). Everything else
        goes through AMP's dispatch.
        """
        if box.get(b"_command") != b"CallFunction":
            super().ampBoxReceived(box)
            return
        ask = box.get(b"_ask")
        reply = None
        try:
            known = calls.handle_call(box)
            callee = None if known is None else self._callees.get(known[0])
            if callee is None:
                answer = self._call(*calls.parse_request(box))
            else:
                # The common call, by a handle already called, with small
                # plain arguments and result: no helper layers, no answer dict.
                answer = self._call_known(callee, known[1])
                if type(answer) is bytes:
                    reply, answer = calls.answer_box(ask, answer), None
        except BaseException:
            self._send_call_error(ask, Failure())
            return
        if reply is not None:
            self.emit(reply)
        elif isinstance(answer, Deferred):
            self._answer_later(ask, answer)
        else:
            self._send_call_answer(ask, answer)

    def _call_known(self, callee, args):
        """
        Call a function already looked up with inline arguments.

        @return: the encoded result (C{bytes}) when it is a scalar short
            enough to answer inline; otherwise what L{_call} returns.
        """
        arguments = _argument_list(args)
        for argument in arguments:
            if type(argument) not in _SCALARS:
                return self._answer_of(self.environment.invoke(callee, arguments))
        result = callee(*arguments)
        if type(result) in _SCALARS:
            encoded = values.encode(result)
            if len(encoded) <= session_commands.MAX_INLINE_VALUE:
                return encoded
        return self._answer_of(result)

    def _answer_later(self, ask, answer):
        """Send the answer (or error) box of a call once its Deferred fires."""
        answer.addCallbacks(lambda objects: self._send_call_answer(ask, objects),
                            lambda failure: self._send_call_error(ask, failure))
        answer.addErrback(self.unhandledError)

    def _send_call_answer(self, ask, answer):
        """
        Send the answer box of a call (an error box if it cannot be encoded).

        @param answer: the answer's C{result}, or C{result_stream} and
            C{result_size} (see L{_result}).
        """
        if ask is None:
            return
        try:
            result = answer.get("result")
            if result is not None:
                reply = calls.answer_box(ask, result)
            else:
                reply = calls.streamed_answer_box(
                    ask, answer["result_stream"], answer["result_size"])
        except BaseException:
            self._send_call_error(ask, Failure())
            return
        self.emit(reply)

    def _send_call_error(self, ask, failure):
        """
        Send the error box of a call: its failure as a RemoteError. Without
        an C{_ask} tag there is no one to tell: the failure is unhandled, as
        in AMP's dispatch (logged, and the connection closed).
        """
        if ask is None:
            self.unhandledError(as_remote_error(failure, self.send_tracebacks))
            return
        error = as_remote_error(failure, self.send_tracebacks).value
        self.emit(calls.error_box(ask, error))


def _argument_list(encoded):
    """
    @param encoded: a call's encoded arguments.
    @return: the decoded argument list (a list or tuple).
    @raise TypeError: when the value is not a list.
    """
    decoded = values.decode(encoded)
    if not isinstance(decoded, (list, tuple)):
        raise TypeError(f"call arguments must be a list, not {type(decoded).__name__}")
    return decoded
