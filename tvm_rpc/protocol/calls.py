"""
A remote call on the wire: the one encoder and decoder of C{CallFunction}.

Every remote call of a session is a C{CallFunction} command (declared, with
its schema, in L{tvm_rpc.protocol.session_commands}) and its answer. Both ends build
and read those boxes here, as bytes, and nowhere else: AMP's typed argument
machinery would cost more than the rest of a small call. The bytes are the
ones AMP writes for the command's schema (keys sorted, integers in decimal,
names in UTF-8, optional arguments left out when L{None}); the tests compare
them with AMP's own encoder and decoder on the same values.

Sans-IO: functions of bytes and boxes (C{dict}s of C{bytes} to C{bytes}, as
L{tvm_rpc.protocol.ampwire.BoxParser} gives them).
"""

import struct

from twisted.protocols import amp

from .ampwire import MAX_VALUE_LENGTH, BoxError, serialize
from .remote_error import REMOTE_ERROR_CODE
from .session_commands import CallFunction

_pack = struct.Struct("!H").pack
_ASK = b"\x00\x04_ask"
_COMMAND_CALL = b"\x00\x08_command\x00\x0cCallFunction"
_ARGS = b"\x00\x04args"
_FUNCTION = b"\x00\x08function"
_NAME = b"\x00\x04name"
_ANSWER = b"\x00\x07_answer"
_RESULT = b"\x00\x06result"
_END = b"\x00\x00"


def request_box(tag, args=None, function=None, name=None, args_stream=None):
    """
    The C{CallFunction} request box, as C{callRemote(CallFunction, ...)} writes it.

    @param tag: the C{_ask} tag (bytes).
    @param args: the encoded argument list (at most L{MAX_VALUE_LENGTH}
        bytes), or L{None}.
    @param function: the callee's handle id, or L{None}.
    @param name: the callee's global name as UTF-8 bytes, or L{None}.
    @param args_stream: the id of a finished value stream holding the
        encoded arguments, or L{None}.
    @return: the box's bytes.
    @raise BoxError: for a value too long for AMP.
    """
    if len(tag) > MAX_VALUE_LENGTH:
        raise BoxError("CallFunction tag too long for one AMP box")
    parts = [_ASK, _pack(len(tag)), tag, _COMMAND_CALL]
    if args is not None:
        if len(args) > MAX_VALUE_LENGTH:
            raise BoxError("CallFunction value too long for one AMP box")
        parts += (_ARGS, _pack(len(args)), args)
    if args_stream is not None:
        number = b"%d" % args_stream
        parts += (b"\x00\x0bargs_stream", _pack(len(number)), number)
    if function is not None:
        number = b"%d" % function
        parts += (_FUNCTION, _pack(len(number)), number)
    if name is not None:
        if len(name) > MAX_VALUE_LENGTH:
            raise BoxError("function name too long for one AMP box")
        parts += (_NAME, _pack(len(name)), name)
    parts.append(_END)
    return b"".join(parts)


def parse_request(box):
    """
    Read a C{CallFunction} request box, as AMP's C{parseArguments} would.

    @param box: the received box.
    @return: C{(function, name, args, args_stream)}: the handle id, the
        global name (C{str}), the encoded arguments, the value stream id;
        each L{None} when absent.
    @raise ValueError: for an integer or a name that does not parse.
    """
    get = box.get
    function = get(b"function")
    if function is not None:
        function = int(function)
    name = get(b"name")
    if name is not None:
        name = name.decode("utf-8")
    stream = get(b"args_stream")
    if stream is not None:
        stream = int(stream)
    return function, name, get(b"args"), stream


def handle_call(box):
    """
    Read the common request fast: a handle called with inline arguments.

    @param box: a received C{CallFunction} request box.
    @return: C{(function, args)} when the box holds exactly C{_ask},
        C{_command}, C{function} and C{args} (what L{parse_request} would
        give, with no name and no stream); L{None} for any other request
        (read it with L{parse_request}).
    @raise ValueError: for a handle that does not parse.
    """
    if len(box) == 4:
        function = box.get(b"function")
        args = box.get(b"args")
        if function is not None and args is not None and b"_ask" in box:
            return int(function), args
    return None


def answer_box(tag, result):
    """
    The answer box of a call whose encoded result is inline, as AMP writes
    C{CallFunction}'s response C{{"result": result}}.

    @param tag: the C{_ask} tag of the request.
    @param result: the encoded result (at most L{MAX_VALUE_LENGTH} bytes).
    @return: the box's bytes.
    @raise BoxError: for a value too long for AMP.
    """
    if len(result) > MAX_VALUE_LENGTH or len(tag) > MAX_VALUE_LENGTH:
        raise BoxError("answer value too long for one AMP box")
    return b"".join((_ANSWER, _pack(len(tag)), tag, _RESULT, _pack(len(result)), result, _END))


def streamed_answer_box(tag, result_stream, result_size):
    """
    The answer box of a call whose encoded result is too long to inline, as
    AMP writes C{CallFunction}'s response C{{"result_stream": ...,
    "result_size": ...}}.

    @param tag: the C{_ask} tag of the request.
    @param result_stream: the id of the read stream holding the result.
    @param result_size: the result's size in bytes.
    @return: the box's bytes.
    """
    return serialize([
        (b"_answer", tag),
        (b"result_size", b"%d" % result_size),
        (b"result_stream", b"%d" % result_stream),
    ])


def parse_answer(box):
    """
    Read the answer box of a call, as AMP's C{parseResponse} would.

    @param box: the received box.
    @return: a C{dict} with C{"result"}, C{"result_stream"} and
        C{"result_size"} (each L{None} when absent).
    @raise ValueError: for an integer that does not parse.
    """
    stream = box.get(b"result_stream")
    size = box.get(b"result_size")
    return {
        "result": box.get(b"result"),
        "result_stream": None if stream is None else int(stream),
        "result_size": None if size is None else int(size),
    }


def inline_result(box):
    """
    @param box: a received answer box.
    @return: its inline encoded result, or L{None} when the result comes by
        stream (then see L{parse_answer}).
    """
    return box.get(b"result")


def error_box(tag, error):
    """
    The error answer of a call, as AMP writes a declared error.

    @param tag: the C{_ask} tag of the request.
    @param error: the L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>}.
    @return: the box's bytes.
    """
    return serialize([
        (b"_error", tag),
        (b"_error_code", REMOTE_ERROR_CODE),
        (b"_error_description", error.wire_description().encode("utf-8", "replace")),
    ])


def error_of(box):
    """
    The exception of an error answer, as C{callRemote(CallFunction, ...)}
    fails with it.

    @param box: the received error box.
    @return: a L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>},
        or an L{amp.UnknownRemoteError} for an error code C{CallFunction}
        does not declare.
    """
    code = box.get(b"_error_code")
    description = box.get(b"_error_description", b"").decode("utf-8", "replace")
    kind = CallFunction.reverseErrors.get(code)
    return amp.UnknownRemoteError(description) if kind is None else kind(description)
