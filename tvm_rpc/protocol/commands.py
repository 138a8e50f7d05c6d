"""The command vocabulary, declared once and shared by every peer.

Tracker commands encode onto TVM's JSON frames, so real TVM peers understand
them. Each command is a frozen attrs class that knows its wire message
(:meth:`to_message` / :meth:`from_message`) and its reply
(:meth:`encode_result` / :meth:`decode_result`). A message that does not fit
its command raises :class:`BadMessage` (a protocol violation: the receiver
closes the connection); a well-formed FAIL reply raises :class:`TrackerError`.
"""

import math
from typing import ClassVar

import attrs

from .constants import TrackerCode


class BadMessage(ValueError):
    """A message or reply that breaks the protocol."""


class TrackerError(Exception):
    """The tracker answered FAIL."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value):
    """Whether C{value} is a number a float can hold (JSON allows Infinity and huge ints)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _port(value):
    """A port as TVM's servers send it: an int, or a string of digits (cpp_rpc)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not _is_int(value) or not 0 <= value <= 65535:
        raise BadMessage(f"bad port {value!r}")
    return value


def _string(value, what):
    if not isinstance(value, str):
        raise BadMessage(f"{what} must be a string, not {value!r}")
    return value


def _expect_success(value):
    if value == TrackerCode.SUCCESS and _is_int(value):
        return None
    if value == TrackerCode.FAIL and _is_int(value):
        raise TrackerError("tracker answered FAIL")
    raise BadMessage(f"unexpected reply {value!r}")


class _Command:
    """Shared behaviour: the argument count check and the plain 0 reply."""

    code: ClassVar[TrackerCode]
    arity: ClassVar[tuple] = (1, 1)

    @classmethod
    def check_arity(cls, message):
        low, high = cls.arity
        if not low <= len(message) <= high:
            raise BadMessage(
                f"{cls.code.name} takes {low - 1} to {high - 1} arguments, "
                f"got {len(message) - 1}"
            )

    @staticmethod
    def encode_result(result):
        """@return: the reply as a JSON value (plain success)."""
        return int(TrackerCode.SUCCESS)

    @staticmethod
    def decode_result(value):
        """@raise TrackerError: on FAIL. @raise BadMessage: on anything else."""
        return _expect_success(value)


@attrs.frozen
class Ping(_Command):
    """Liveness check: ``[PING]`` -> ``0``."""

    code: ClassVar = TrackerCode.PING

    def to_message(self):
        return [int(self.code)]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        return cls()


@attrs.frozen
class Stop(_Command):
    """Stop the tracker if the key matches: ``[STOP, key]`` -> ``0`` or ``-1``."""

    code: ClassVar = TrackerCode.STOP
    arity: ClassVar = (2, 2)
    stop_key: str

    def to_message(self):
        return [int(self.code), self.stop_key]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        return cls(_string(message[1], "stop key"))

    @staticmethod
    def encode_result(result):
        """@param result: whether the tracker stops."""
        return int(TrackerCode.SUCCESS if result else TrackerCode.FAIL)


@attrs.frozen
class Put(_Command):
    """
    Offer a free server: ``[PUT, key, [port, matchkey], custom_addr]`` -> ``0``.

    TVM's servers send 3 or 4 elements, the port as an int or a string, and a
    custom address that is a string or null.
    """

    code: ClassVar = TrackerCode.PUT
    arity: ClassVar = (3, 4)
    key: str
    port: int
    matchkey: str
    custom_addr: "str | None" = None

    def to_message(self):
        return [int(self.code), self.key, [self.port, self.matchkey], self.custom_addr]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        key = _string(message[1], "key")
        address = message[2]
        if not isinstance(address, list) or len(address) != 2:
            # The shape only: the value may hold a matchkey, and this ends up in logs.
            shape = (f"a list of {len(address)}" if isinstance(address, list)
                     else type(address).__name__)
            raise BadMessage(f"PUT wants [port, matchkey], got {shape}")
        custom = message[3] if len(message) == 4 else None
        if custom is not None:
            custom = _string(custom, "custom address")
        return cls(key, _port(address[0]), _string(address[1], "matchkey"), custom)


@attrs.frozen
class Allocation:
    """What a request obtains: where the server is and the matchkey to present."""

    host: str
    port: int
    matchkey: str


@attrs.frozen
class Request(_Command):
    """
    Ask for a server: ``[REQUEST, key, user, priority, options?]``.

    Answered, when a server is free, by ``[0, [host, port, matchkey]]``. The
    optional fifth element is ours (TVM's tracker ignores it):
    ``{"timeout": seconds}`` makes the tracker answer ``[-1, reason]`` when no
    server came in time.
    """

    code: ClassVar = TrackerCode.REQUEST
    arity: ClassVar = (4, 5)
    key: str
    user: str = ""
    priority: float = 1
    timeout: "float | None" = None

    def to_message(self):
        message = [int(self.code), self.key, self.user, self.priority]
        if self.timeout is not None:
            message.append({"timeout": self.timeout})
        return message

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        key = _string(message[1], "key")
        user = message[2]
        if user is None:
            user = ""
        user = _string(user, "user")
        priority = message[3]
        if not _is_finite_number(priority):
            raise BadMessage(f"bad priority {priority!r}")
        timeout = None
        if len(message) == 5 and message[4] is not None:
            options = message[4]
            if not isinstance(options, dict):
                raise BadMessage(f"request options must be an object, not {options!r}")
            timeout = options.get("timeout")
            if timeout is not None and (not _is_finite_number(timeout) or not timeout > 0):
                raise BadMessage(f"bad request timeout {timeout!r}")
        return cls(key, user, priority, timeout)

    @staticmethod
    def encode_result(result):
        """
        @param result: an L{Allocation}, or a L{str} saying why the request failed.
        """
        if isinstance(result, Allocation):
            return [int(TrackerCode.SUCCESS), [result.host, result.port, result.matchkey]]
        return [int(TrackerCode.FAIL), str(result)]

    @staticmethod
    def decode_result(value):
        """@return: an L{Allocation}. @raise TrackerError: when the request failed."""
        if not isinstance(value, list) or len(value) != 2:
            raise BadMessage(f"unexpected reply to REQUEST {value!r}")
        code, body = value
        if code == TrackerCode.FAIL:
            raise TrackerError(str(body))
        if code != TrackerCode.SUCCESS or not isinstance(body, list) or len(body) != 3:
            raise BadMessage(f"unexpected reply to REQUEST {value!r}")
        host, port, matchkey = body
        return Allocation(_string(host, "host"), _port(port), _string(matchkey, "matchkey"))


@attrs.frozen
class UpdateInfo(_Command):
    """
    Describe this connection: ``[UPDATE_INFO, {"key": ..., "addr": [host, port]}]``.

    The info object is kept whole (TVM merges it into the connection's info);
    a null host in ``addr`` is replaced by the peer's address by the tracker.
    """

    code: ClassVar = TrackerCode.UPDATE_INFO
    arity: ClassVar = (2, 2)
    info: dict = attrs.field(eq=False)

    def to_message(self):
        return [int(self.code), self.info]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        info = message[1]
        if not isinstance(info, dict):
            raise BadMessage(f"UPDATE_INFO wants an object, got {info!r}")
        if "key" in info:
            _string(info["key"], "info key")
        if "addr" in info:
            addr = info["addr"]
            if not isinstance(addr, list) or len(addr) != 2:
                raise BadMessage(f"bad addr {addr!r}")
            if addr[0] is not None:
                _string(addr[0], "addr host")
            _port(addr[1])
        return cls(info)


@attrs.frozen
class Summary(_Command):
    """The tracker's state: ``[SUMMARY]`` -> ``[0, {"queue_info": ..., "server_info": ...}]``."""

    code: ClassVar = TrackerCode.SUMMARY

    def to_message(self):
        return [int(self.code)]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        return cls()

    @staticmethod
    def encode_result(result):
        return [int(TrackerCode.SUCCESS), result]

    @staticmethod
    def decode_result(value):
        if (
            not isinstance(value, list)
            or len(value) != 2
            or value[0] != TrackerCode.SUCCESS
            or not isinstance(value[1], dict)
        ):
            raise BadMessage(f"unexpected reply to SUMMARY {value!r}")
        return value[1]


@attrs.frozen
class GetPendingMatchkeys(_Command):
    """This connection's matchkeys not yet handed out: ``[7]`` -> ``[matchkey, ...]``."""

    code: ClassVar = TrackerCode.GET_PENDING_MATCHKEYS

    def to_message(self):
        return [int(self.code)]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        return cls()

    @staticmethod
    def encode_result(result):
        return list(result)

    @staticmethod
    def decode_result(value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadMessage(f"unexpected reply to GET_PENDING_MATCHKEYS {value!r}")
        return value


TRACKER_COMMANDS = {
    command.code: command
    for command in (Ping, Stop, Put, Request, UpdateInfo, Summary, GetPendingMatchkeys)
}


def parse_tracker_message(message):
    """
    Turn a decoded frame into a tracker command.

    @param message: a JSON value from L{tvm_rpc.protocol.framing.FrameDecoder}.
    @return: an instance of one of L{TRACKER_COMMANDS}.
    @raise BadMessage: for anything else (unknown code, wrong shape).
    """
    if not isinstance(message, list) or not message:
        raise BadMessage(f"message must be a non-empty array, got {message!r}"[:200])
    code = message[0]
    if not _is_int(code) or code not in TRACKER_COMMANDS:
        raise BadMessage(f"unknown tracker code {code!r}"[:200])
    return TRACKER_COMMANDS[code].from_message(message)


# ---------------------------------------------------------------------------
# Session commands (client <-> server, after the handshake)
# ---------------------------------------------------------------------------

SESSION_DOC = """
The session protocol: AMP commands between our client and our server.

After the RPC handshake the bytes of the connection belong to a
:class:`twisted.protocols.amp.AMP` conversation. The client calls, the server
answers; every command below lists its typed ``arguments``, its ``response``
and its ``errors``. The call model:

Opening
    The client first calls :class:`Hello` (``protocol="tvm_rpc-session"``,
    ``version=SESSION_VERSION``). A server that answers anything else, or does
    not answer within a few seconds, is not a tvm_rpc session server (a real
    TVM server answers nothing we can parse): the client reports the protocol
    mismatch instead of hanging. The answer also gives the transfer
    parameters (``chunk_size``, ``window``).

Handles
    The server keeps one table per session that maps integer ids to
    functions, modules, arrays and streams. Ids are never reused within a
    session. :class:`Free` drops ids (unknown ids are ignored, so freeing
    twice is harmless); everything is dropped when the session ends.

Values
    Arguments and results of calls are encoded with
    :mod:`tvm_rpc.protocol.values` (never pickle) and carried as raw bytes in
    ``args`` / ``result``. In values, functions and modules appear as
    :class:`~tvm_rpc.protocol.values.Handle`, server arrays as
    :class:`~tvm_rpc.protocol.values.ArrayRef`, small host arrays inline as
    :class:`~tvm_rpc.protocol.values.HostArray` (the server turns them into
    arrays before the call) and devices as
    :class:`~tvm_rpc.protocol.values.Device`.

Calls
    :class:`GetFunction` turns a global name into a function handle;
    :class:`CallFunction` calls a handle, or a global name directly, with the
    encoded argument list and answers the encoded result. Many calls may be
    in flight at once on one session. The built-ins exist under TVM's names
    and are called like any function: ``tvm.rpc.server.upload(path, data)``,
    ``.download(path)`` -> bytes, ``.remove(path)``, ``.listdir(path=".")``
    -> list of names, ``.load_module(path)`` -> module handle,
    ``.workpath(path)`` -> absolute path on the device; and
    ``tvm_rpc.server.list_functions()`` -> every name callable. A server
    function may return a Deferred or be a coroutine function; its call is
    answered when it completes while other calls proceed.
    :class:`TimeEvaluator` times a function on the device (TVM's own timer
    for functions of TVM modules).

Big values and bulk data: streams
    No AMP value ever exceeds 65,535 bytes: a chunk of a stream is carried
    in one box as consecutive values (:class:`Blob`). When encoded arguments
    are longer than ``MAX_INLINE_VALUE``, the client opens a value sink
    (:class:`OpenValue`), writes the bytes with :class:`StreamWrite`, ends it
    with :class:`StreamFinish` and passes the stream id as ``args_stream``
    (the call consumes the stream). A result too long to inline comes back
    as ``result_stream`` + ``result_size``: the client reads it with
    :class:`StreamRead` and releases it with :class:`StreamClose`.
    Uploads (:class:`OpenUpload`) and array fills (:class:`OpenArrayWrite`)
    are write streams; downloads (:class:`OpenDownload`) and array reads
    (:class:`OpenArrayRead`) are read streams. Writes are sequential; each
    :class:`StreamWrite` is answered once its chunk is consumed (written to
    disk or into the array), and the writer keeps at most ``window`` chunks
    unanswered. Reads name their offset; the reader keeps at most ``window``
    reads outstanding. So one transfer holds at most
    ``window * chunk_size`` (4 x 512 KiB = 2 MiB by default) in flight on
    each end, whatever the total size; and the server stops reading requests
    while its answers wait to be sent, so even a client that ignores the
    window cannot make it buffer more than about one chunk. :class:`StreamClose` cancels a write
    stream (a partial upload is deleted) or releases a read stream.
    :mod:`tvm_rpc.protocol.streams` implements both ends.

Errors
    Every exception raised on the server reaches the client as
    :class:`RemoteError` carrying the remote exception's type name and
    message, and its traceback text only when the server's operator asked
    for it (``--send-tracebacks``; the traceback shows the server's code and
    paths). The session stays usable after an error.

Closing
    :class:`Goodbye` asks the server to end the session (it answers, then
    closes the connection); closing the connection has the same effect. When
    the server ends a session itself (the ``-timeout=N`` of the handshake ran
    out), it sends :class:`SessionEnded` (``code="timeout"``) to the client
    first, so the client's outstanding calls fail with a session-timeout
    error instead of a bare lost connection.

Caution for both ends
    AMP drops the whole connection when an error answer reaches a Deferred
    that has no errback yet: attach errbacks (or ``await``) before giving
    control back to the reactor, and settle windowed commands at once (as
    :mod:`tvm_rpc.protocol.streams` does).
"""

__doc__ += SESSION_DOC

import functools  # noqa: E402
import json  # noqa: E402

from twisted.internet.defer import Deferred, fail, succeed  # noqa: E402
from twisted.protocols import amp  # noqa: E402
from twisted.python.failure import Failure  # noqa: E402

#: The ``protocol`` name exchanged by :class:`Hello`.
SESSION_PROTOCOL = "tvm_rpc-session"
#: The session protocol version; bumped on incompatible changes.
SESSION_VERSION = 1
#: Largest chunk carried by one :class:`StreamWrite` / :class:`StreamRead` (one
#: box, split into values of at most 65,535 bytes by :class:`Blob`).
CHUNK_SIZE = 512 * 1024
#: Chunks a writer or reader keeps outstanding on one stream.
WINDOW = 4
#: Longest encoded value sent inline in ``args`` / ``result``; longer values
#: travel through a stream. Leaves room under AMP's 65,535-byte value limit.
MAX_INLINE_VALUE = 60 * 1024

_REMOTE_ERROR_LIMIT = 60 * 1024


class RemoteError(Exception):
    """
    An exception raised on the other end of a session.

    @ivar type_name: the remote exception's qualified type name
        (e.g. ``"builtins.PermissionError"``).
    @ivar message: C{str(exception)} on the remote end.
    @ivar traceback_text: the remote traceback, formatted; C{""} when the
        server does not send tracebacks (its default).

    On the wire the three parts travel as one JSON description (AMP carries
    only a description string). AMP rebuilds the exception by calling
    C{RemoteError(description)}; that form is recognised and unpacked.
    """

    def __init__(self, type_name, message=None, traceback_text=None):
        """@param type_name: the remote type name, or a whole wire description (then the other two are omitted)."""
        if message is None and traceback_text is None:
            type_name, message, traceback_text = self._unpack(type_name)
        self.type_name = str(type_name)
        self.message = "" if message is None else str(message)
        self.traceback_text = "" if traceback_text is None else str(traceback_text)
        super().__init__(self.type_name, self.message, self.traceback_text)

    @staticmethod
    def _unpack(description):
        """Split a wire description; a foreign one becomes an unknown error."""
        try:
            parts = json.loads(description)
            return str(parts["type"]), str(parts["message"]), str(parts["traceback"])
        except (ValueError, TypeError, KeyError):
            return "tvm_rpc.UnknownRemoteError", str(description), ""

    @classmethod
    def from_exception(cls, exception, traceback_text=""):
        """
        @param exception: a local exception (or a L{RemoteError} to pass on).
        @param traceback_text: its formatted traceback.
        @return: the L{RemoteError} describing it.
        """
        if isinstance(exception, RemoteError):
            return exception
        kind = type(exception)
        module = kind.__module__
        name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        return cls(name, str(exception), traceback_text)

    @property
    def short_type_name(self):
        """The type name without its module (C{"PermissionError"})."""
        return self.type_name.rsplit(".", 1)[-1]

    def __str__(self):
        """
        The wire description: JSON of type, message and traceback, shortened
        (the traceback keeps its end, the message its start) to fit in one
        AMP value.
        """
        message, traceback_text = self.message, self.traceback_text
        while True:
            text = json.dumps(
                {"type": self.type_name[:1024], "message": message, "traceback": traceback_text},
                ensure_ascii=False,
            )
            if len(text.encode("utf-8", "replace")) <= _REMOTE_ERROR_LIMIT:
                return text
            if len(traceback_text) > 64:
                traceback_text = "...\n" + traceback_text[len(traceback_text) // 2:]
            else:
                traceback_text = ""
                message = message[: len(message) // 2] + "..."

    def __repr__(self):
        """@return: the type name and message."""
        return f"RemoteError({self.type_name!r}, {self.message!r})"


def as_remote_error(failure, tracebacks=False):
    """
    An errback for responders: any failure becomes a L{RemoteError} with the
    exception's type name and message (so AMP sends it as a declared error
    and the session stays usable).

    @param failure: a L{twisted.python.failure.Failure}.
    @param tracebacks: whether the error carries the formatted traceback too;
        off by default, as it shows the peer the server's code and paths.
    @return: a Failure wrapping the L{RemoteError}.
    """
    if failure.check(RemoteError):
        return failure
    text = failure.getTraceback(elideFrameworkCode=True) if tracebacks else ""
    return Failure(RemoteError.from_exception(failure.value, text))


def _tracebacks(args):
    """@return: whether the responder's protocol (C{args[0]}) sends tracebacks."""
    return bool(args) and getattr(args[0], "send_tracebacks", False) is True


def remote_errors(function):
    """
    Decorate a responder so that every exception it raises (or its Deferred
    fails with) reaches the peer as a L{RemoteError}, with its traceback
    only when the responder's protocol has a true C{send_tracebacks}
    attribute. Apply it below C{@Command.responder}::

        @CallFunction.responder
        @remote_errors
        def call_function(self, ...): ...

    @return: a function returning a Deferred.
    """

    @functools.wraps(function)
    def responder(*args, **kwargs):
        # A plain try/except rather than maybeDeferred: this sits on the path
        # of every call, and AMP wraps the answer in a Deferred anyway.
        """Call the responder; its failures become L{RemoteError}s."""
        try:
            result = function(*args, **kwargs)
        except BaseException:
            return fail(as_remote_error(Failure(), _tracebacks(args)))
        if isinstance(result, Deferred):
            return result.addErrback(as_remote_error, _tracebacks(args))
        return succeed(result)

    return responder


class Blob(amp.Argument):
    """
    Bytes longer than one AMP value, carried in consecutive keys of one box:
    ``name``, ``name.1``, ``name.2``, ... each at most L{PIECE_SIZE} bytes,
    so no AMP value ever exceeds 65,535 bytes. The receiver checks the total
    length (a L{StreamWrite} chunk above L{CHUNK_SIZE} is refused by the
    stream table with a L{RemoteError}).
    """

    #: The longest single AMP value used (AMP's own limit is 65,535).
    PIECE_SIZE = 0xFFFF

    def toBox(self, name, strings, objects, proto):
        """Split the bytes of C{objects[name]} over C{name}, C{name.1}, ..."""
        value = objects.get(name.decode("ascii"))
        if value is None:
            if not self.optional:
                raise amp.InvalidSignature(f"missing required argument {name!r}")
            return
        # Slices of a memoryview: the box is serialized at once, so the only
        # copy is AMP's own join.
        view = memoryview(value).cast("B")
        size = self.PIECE_SIZE
        strings[name] = view[:size]
        for index, start in enumerate(range(size, len(view), size), 1):
            strings[b"%s.%d" % (name, index)] = view[start:start + size]

    def fromBox(self, name, strings, objects, proto):
        """Join C{name}, C{name.1}, ... back into one L{bytes}."""
        first = strings.pop(name, None)
        if first is None:
            if not self.optional:
                raise KeyError(name)
            objects[name.decode("ascii")] = None
            return
        pieces = [first]
        index = 1
        while True:
            piece = strings.pop(b"%s.%d" % (name, index), None)
            if piece is None:
                break
            pieces.append(piece)
            index += 1
        objects[name.decode("ascii")] = pieces[0] if len(pieces) == 1 else b"".join(pieces)


_ERRORS = {RemoteError: b"REMOTE_ERROR"}


class Hello(amp.Command):
    """
    Identify both ends; the first command of every session.

    The server answers with its own protocol name and version. The client
    must check that C{protocol == SESSION_PROTOCOL} and that the version is
    one it speaks; a peer that is not a tvm_rpc session server never answers
    (so the client bounds the wait and reports the mismatch).
    """

    arguments = [
        (b"protocol", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"implementation", amp.Unicode(optional=True)),
    ]
    response = [
        (b"protocol", amp.Unicode()),
        (b"version", amp.Integer()),
        (b"implementation", amp.Unicode()),
        (b"chunk_size", amp.Integer()),
        (b"window", amp.Integer()),
        (b"max_inline_value", amp.Integer()),
    ]
    errors = _ERRORS


class GetFunction(amp.Command):
    """
    Look up a global function (registry or built-in) by name.

    Response ``function``: a new function handle id. Raises L{RemoteError}
    (type ``tvm_rpc.server.registry.NoSuchFunction``) when nothing has that name.
    """

    arguments = [(b"name", amp.Unicode())]
    response = [(b"function", amp.Integer())]
    errors = _ERRORS


class CallFunction(amp.Command):
    """
    Call a function and answer its result.

    Exactly one of ``function`` (a handle id) or ``name`` (a global name)
    names the callee. The arguments are a list encoded with
    L{tvm_rpc.protocol.values.encode}: inline in ``args`` (at most
    L{MAX_INLINE_VALUE} bytes), or in a finished value stream named by
    ``args_stream`` (consumed by the call). Missing both means no arguments.

    The response holds the encoded result inline in ``result``, or, when it
    is longer than L{MAX_INLINE_VALUE}, a read stream ``result_stream`` of
    ``result_size`` bytes that the client reads and then closes.

    Both ends build and read these boxes with L{tvm_rpc.protocol.calls}
    (byte for byte what AMP writes for this schema).
    """

    arguments = [
        (b"function", amp.Integer(optional=True)),
        (b"name", amp.Unicode(optional=True)),
        (b"args", amp.String(optional=True)),
        (b"args_stream", amp.Integer(optional=True)),
    ]
    response = [
        (b"result", amp.String(optional=True)),
        (b"result_stream", amp.Integer(optional=True)),
        (b"result_size", amp.Integer(optional=True)),
    ]
    errors = _ERRORS


class Free(amp.Command):
    """Drop handles (functions, modules, arrays, streams); unknown ids are ignored."""

    arguments = [(b"handles", amp.ListOf(amp.Integer()))]
    response = []
    errors = _ERRORS


class LoadModule(amp.Command):
    """
    Load a module from a path in the session's work directory.

    A ``.py`` file gives a module whose public functions are callable; a
    ``.so``/``.tar``/``.dylib``/``.dll`` built by TVM is loaded with
    ``tvm.runtime.load_module`` when TVM's runtime is installed on the device
    (else L{RemoteError} says it is not). Response: the module handle id and
    its ``kind`` (``"python"`` or ``"tvm"``).
    """

    arguments = [(b"path", amp.Unicode())]
    response = [(b"module", amp.Integer()), (b"kind", amp.Unicode())]
    errors = _ERRORS


class ModuleGetFunction(amp.Command):
    """
    Get a function of a loaded module by name.

    ``query_imports`` also searches the module's imports (TVM modules).
    Response ``function``: a new function handle id.
    """

    arguments = [
        (b"module", amp.Integer()),
        (b"name", amp.Unicode()),
        (b"query_imports", amp.Boolean(optional=True)),
    ]
    response = [(b"function", amp.Integer())]
    errors = _ERRORS


class DeviceExists(amp.Command):
    """
    Whether a device exists on the server, by TVM's numbering
    (cpu=1, cuda=2, cuda_host=3, opencl=4, vulkan=7, metal=8, ...).
    ``name`` is TVM's device name (``"cpu"``, ``"cuda"``, ...).
    """

    arguments = [(b"device_type", amp.Integer()), (b"device_id", amp.Integer())]
    response = [(b"exists", amp.Boolean()), (b"name", amp.Unicode())]
    errors = _ERRORS


class DeviceSync(amp.Command):
    """Wait until all work queued on a device has finished."""

    arguments = [(b"device_type", amp.Integer()), (b"device_id", amp.Integer())]
    response = []
    errors = _ERRORS


class Empty(amp.Command):
    """
    Allocate an uninitialised array on a device.

    Response: the array handle id and its size in bytes.
    """

    arguments = [
        (b"shape", amp.ListOf(amp.Integer())),
        (b"dtype", amp.Unicode()),
        (b"device_type", amp.Integer()),
        (b"device_id", amp.Integer()),
    ]
    response = [(b"array", amp.Integer()), (b"nbytes", amp.Integer())]
    errors = _ERRORS


class OpenArrayWrite(amp.Command):
    """
    Open a write stream that fills an array from host bytes (C order).

    Response: the stream id and the number of bytes the array expects; the
    stream must carry exactly that many bytes before L{StreamFinish}.
    """

    arguments = [(b"array", amp.Integer())]
    response = [(b"stream", amp.Integer()), (b"size", amp.Integer())]
    errors = _ERRORS


class OpenArrayRead(amp.Command):
    """
    Open a read stream over an array's bytes (C order), for copying to host.

    Response: the stream id, its size in bytes, the shape and the dtype.
    """

    arguments = [(b"array", amp.Integer())]
    response = [
        (b"stream", amp.Integer()),
        (b"size", amp.Integer()),
        (b"shape", amp.ListOf(amp.Integer())),
        (b"dtype", amp.Unicode()),
    ]
    errors = _ERRORS


class OpenUpload(amp.Command):
    """
    Open a write stream into a file of the work directory (created or
    truncated; parent directories are created). ``size``, when given, is
    checked at L{StreamFinish}. A cancelled upload leaves no file.
    """

    arguments = [(b"path", amp.Unicode()), (b"size", amp.Integer(optional=True))]
    response = [(b"stream", amp.Integer())]
    errors = _ERRORS


class OpenDownload(amp.Command):
    """Open a read stream over a file of the work directory; answers its size."""

    arguments = [(b"path", amp.Unicode())]
    response = [(b"stream", amp.Integer()), (b"size", amp.Integer())]
    errors = _ERRORS


class OpenValue(amp.Command):
    """Open a write stream that collects an encoded value too long to inline."""

    arguments = [(b"size", amp.Integer())]
    response = [(b"stream", amp.Integer())]
    errors = _ERRORS


class StreamWrite(amp.Command):
    """
    Append a chunk (at most L{CHUNK_SIZE} bytes) to a write stream.

    Answered once the chunk is consumed, so a writer with at most L{WINDOW}
    writes outstanding bounds the memory both ends spend on the transfer.
    """

    arguments = [(b"stream", amp.Integer()), (b"data", Blob())]
    response = []
    errors = _ERRORS


class StreamFinish(amp.Command):
    """End a write stream; answers the number of bytes it received."""

    arguments = [(b"stream", amp.Integer())]
    response = [(b"size", amp.Integer())]
    errors = _ERRORS


class StreamRead(amp.Command):
    """
    Read up to ``length`` (at most L{CHUNK_SIZE}) bytes at ``offset`` of a
    read stream; an empty answer means the end.
    """

    arguments = [
        (b"stream", amp.Integer()),
        (b"offset", amp.Integer()),
        (b"length", amp.Integer()),
    ]
    response = [(b"data", Blob())]
    errors = _ERRORS


class StreamClose(amp.Command):
    """Cancel a write stream (partial data discarded) or release a read stream; idempotent."""

    arguments = [(b"stream", amp.Integer())]
    response = []
    errors = _ERRORS


class TimeEvaluator(amp.Command):
    """
    Time a function on the device, excluding the network.

    The callee is ``function`` (a handle) or ``name``; ``args`` /
    ``args_stream`` as for L{CallFunction}. The function runs ``number``
    times per repeat, ``repeat`` times; when ``min_repeat_ms`` > 0 ``number``
    grows until one repeat lasts at least that long. The device is synced
    around each repeat. Response ``results``: the mean seconds per call of
    each repeat (the client derives mean/median/min/max/std).
    """

    arguments = [
        (b"function", amp.Integer(optional=True)),
        (b"name", amp.Unicode(optional=True)),
        (b"args", amp.String(optional=True)),
        (b"args_stream", amp.Integer(optional=True)),
        (b"device_type", amp.Integer()),
        (b"device_id", amp.Integer()),
        (b"number", amp.Integer()),
        (b"repeat", amp.Integer()),
        (b"min_repeat_ms", amp.Float()),
    ]
    response = [(b"results", amp.ListOf(amp.Float()))]
    errors = _ERRORS


class Goodbye(amp.Command):
    """End the session: the server answers, drops everything and closes."""

    arguments = []
    response = []
    errors = _ERRORS


class SessionEnded(amp.Command):
    """
    Sent by the server (no answer expected) just before it closes a session
    it ends itself: ``code`` is ``"timeout"`` when the session outlived the
    client's ``-timeout=N`` (the worker was killed), ``"shutdown"`` when the
    server stops, ``"limit"`` when the client passed one of the server's
    limits (a box too large). The client should fail every outstanding call with an
    error saying so. Built as raw bytes by L{session_ended_box} because the
    worker that ran the session may already be dead.
    """

    arguments = [(b"code", amp.Unicode()), (b"reason", amp.Unicode())]
    requiresAnswer = False


def session_ended_box(code, reason):
    """
    @param code: C{"timeout"}, C{"shutdown"} or C{"limit"}.
    @param reason: a sentence for the user.
    @return: the serialized AMP box of a L{SessionEnded} command.
    """
    box = amp.AmpBox(
        _command=b"SessionEnded",
        code=code.encode("utf-8"),
        reason=reason.encode("utf-8")[:MAX_INLINE_VALUE],
    )
    return box.serialize()


#: Every session command, by class name.
SESSION_COMMANDS = {
    command.__name__: command
    for command in (
        Hello, GetFunction, CallFunction, Free, LoadModule, ModuleGetFunction,
        DeviceExists, DeviceSync, Empty, OpenArrayWrite, OpenArrayRead,
        OpenUpload, OpenDownload, OpenValue, StreamWrite, StreamFinish,
        StreamRead, StreamClose, TimeEvaluator, Goodbye, SessionEnded,
    )
}
