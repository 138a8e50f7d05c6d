"""The client end of a session: an AMP protocol and the Deferred API on it.

After the RPC handshake (see L{tvm_rpc.client.connect}) the bytes of the
connection belong to the session protocol of
L{tvm_rpc.protocol.session_commands}. This module speaks its client side:

- L{SessionClientProtocol} (made by L{make_client_protocol}) is
  the L{AMP<twisted.protocols.amp.AMP>} protocol. It turns the server's
  L{SessionEnded<tvm_rpc.protocol.session_commands.SessionEnded>} notice and the loss of the
  connection into L{SessionTimeout} / L{SessionClosed} failures
  for every call still outstanding.
- L{start_session} performs the opening
  L{Hello<tvm_rpc.protocol.session_commands.Hello>} exchange (bounded in time, so a
  peer that is not a tvm_rpc session server gives L{ProtocolMismatch}
  instead of a hang) and returns a Deferred of an L{RPCSession}.
- L{RPCSession} is the user's API, with TVM's names: functions, files,
  modules, devices, arrays, C{time_evaluator}, C{close()} and
  C{async with}.

Handing a connection over after the handshake (what C{connect()} does)::

    protocol = make_client_protocol()
    protocol.makeConnection(transport)   # the handshaken TCP transport
    if rest:                             # bytes that came after the reply
        protocol.dataReceived(rest)
    # from now on: dataReceived(...) and connectionLost(reason) of the
    # transport go to `protocol` (set transport.protocol, or forward them)
    session = await start_session(protocol, clock=reactor)

Everything is asynchronous and single-threaded: many calls may be in flight
on one session, and many sessions may share one reactor. Every method that
talks to the server returns a L{Deferred<twisted.internet.defer.Deferred>}, so
callers may C{await} it or add callbacks. Bulk data (uploads, downloads,
array copies) moves in chunks of at most C{chunk_size} bytes with at most
C{window} chunks in flight per transfer (60 KiB x 16 = 960 KiB by default),
whatever the total size; cancelling the Deferred of a transfer stops it and
closes the stream on the server (a partial upload is deleted there).

Remote exceptions arrive as L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>}
failures (C{type_name}, C{message}, and C{traceback_text}, empty unless
the server sends tracebacks); the session stays usable afterwards.

A call's result longer than C{max_result_size} (default
L{DEFAULT_MAX_RESULT_SIZE}) fails with
L{ResultTooLarge<tvm_rpc.protocol.streams.ResultTooLarge>} before any of it is read,
so a server cannot make the client allocate what it announces.
"""

import math
import os
import weakref

import attrs
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, fail, succeed
from twisted.internet.error import ConnectionClosed, ConnectionLost
from twisted.logger import Logger
from twisted.python.failure import Failure

import tvm_rpc

from ..lean_amp import LeanAMP
from ..protocol import calls, values
from ..protocol.remote_error import RemoteError
from ..protocol.session_commands import (
    CHUNK_SIZE,
    MAX_INLINE_VALUE,
    SESSION_PROTOCOL,
    SESSION_VERSION,
    WINDOW,
    DeviceExists,
    DeviceSync,
    Empty,
    Free,
    GetFunction,
    Goodbye,
    Hello,
    LoadModule,
    ModuleGetFunction,
    OpenArrayRead,
    OpenArrayWrite,
    OpenDownload,
    OpenUpload,
    SessionEnded,
    StreamClose,
    TimeEvaluator,
)
from ..localfiles import open_temporary
from ..protocol.streams import chunked, file_chunks, read_stream
from ..protocol.streams import receive_value, send_value, write_stream
from ..protocol.values import ArrayRef, Handle, HostArray
from .remote import (
    Device,
    RemoteArray,
    RemoteFunction,
    RemoteModule,
    TimeEvaluatorResult,
    host_array,
    resolve_device_type,
)

log = Logger()

#: Seconds the opening Hello may take before the peer is declared foreign.
HELLO_TIMEOUT = 10.0
#: Seconds close() waits for the server's goodbye before dropping the connection.
CLOSE_TIMEOUT = 5.0
#: Most handle ids released by one Free command (keeps the box under 64 KiB).
FREE_BATCH = 4000
#: Largest window accepted from a server (it bounds our memory per transfer).
MAX_WINDOW = 64
#: Longest encoded result of one call accepted by default (256 MiB). A result
#: is held whole (its chunks, then joined, then decoded), while arrays and
#: modules come back as handles and files through download(): a bigger
#: result is almost surely a mistake or a hostile server. Raise it per
#: session with C{max_result_size}.
DEFAULT_MAX_RESULT_SIZE = 256 << 20
#: Value types that cross the wire as they are (no remote objects inside).
_SCALARS = frozenset((type(None), bool, int, float, str, bytes))


class SessionClosed(ConnectionLost):
    """
    The session is over: closed by the client, the server, or a lost
    connection (a L{ConnectionLost}, so code that retries on lost
    connections treats it alike).
    """


class SessionTimeout(SessionClosed):
    """The server ended the session because its C{-timeout} ran out."""


class ProtocolMismatch(Exception):
    """The peer does not speak the tvm_rpc session protocol (or not this version)."""


class SessionLostAtStart(ProtocolMismatch, SessionClosed):
    """
    The connection was lost after the handshake, before the session's Hello
    was answered: the server died in between (or the peer is not a session
    server). A L{SessionClosed}, so callers that retry lost connections
    (C{request()}) try another server.
    """


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


def start_session(protocol, *, clock=None, hello_timeout=HELLO_TIMEOUT,
                  max_result_size=DEFAULT_MAX_RESULT_SIZE):
    """
    Open a session on a connected L{SessionClientProtocol}.

    @param protocol: the protocol, already given its transport.
    @param clock: the reactor (an L{IReactorTime}) that bounds the Hello and
        schedules handle releases; the global reactor when L{None}.
    @param hello_timeout: seconds the server may take to answer Hello.
    @param max_result_size: the longest encoded result of a call accepted
        (see L{RPCSession.max_result_size}).
    @return: a Deferred of an L{RPCSession}; it fails with
        L{SessionLostAtStart} when the connection is lost before the answer
        (the server died, or is not a session server), and with
        L{ProtocolMismatch} (the connection is then closed) when the peer
        answers something else or stays silent.
    """
    if clock is None:
        from twisted.internet import reactor as clock
    return Deferred.fromCoroutine(
        _start_session(protocol, clock, hello_timeout, max_result_size))


async def _start_session(protocol, clock, hello_timeout, max_result_size):
    asking = protocol.callRemote(
        Hello,
        protocol=SESSION_PROTOCOL,
        version=SESSION_VERSION,
        implementation=f"tvm_rpc-client {tvm_rpc.__version__}",
    )
    asking.addTimeout(hello_timeout, clock)
    try:
        answer = await asking
    except CancelledError:
        protocol.transport.loseConnection()
        raise
    except RemoteError as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(f"the server refused the session: {e.message}") from e
    except ConnectionClosed as e:
        raise SessionLostAtStart(
            "the connection was lost before the answer to the tvm_rpc session "
            f"Hello ({e}): the server went away, or the peer is not a tvm_rpc "
            "session server"
        ) from e
    except TimeoutError as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(
            f"no answer to the tvm_rpc session Hello within {hello_timeout} s: "
            "the peer is not a tvm_rpc session server (is it Apache TVM's?)"
        ) from e
    except Exception as e:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(f"bad answer to the session Hello: {e}") from e
    if answer["protocol"] != SESSION_PROTOCOL or answer["version"] != SESSION_VERSION:
        protocol.transport.loseConnection()
        raise ProtocolMismatch(
            f"the server speaks {answer['protocol']!r} version {answer['version']}, "
            f"this client {SESSION_PROTOCOL!r} version {SESSION_VERSION}"
        )
    return RPCSession(
        protocol,
        clock,
        chunk_size=max(1, min(answer["chunk_size"], CHUNK_SIZE)),
        window=max(1, min(answer["window"], MAX_WINDOW)),
        server_implementation=answer["implementation"],
        max_result_size=max_result_size,
    )


def open_session(carrier, rest=b"", *, reactor=None, session_timeout=0, address=None,
                 hello_timeout=HELLO_TIMEOUT, max_result_size=DEFAULT_MAX_RESULT_SIZE):
    """
    Switch a handshaken connection to the session protocol and open the
    session (what L{tvm_rpc.client.connect.connect} calls).

    @param carrier: the handshake protocol; its C{switch_to(protocol, rest)}
        connects the new protocol to the transport and forwards the bytes
        and the connection's loss to it from then on.
    @param rest: bytes received after the handshake reply.
    @param reactor: as C{clock} of L{start_session}.
    @param session_timeout: the session timeout the handshake asked for
        (kept as L{RPCSession.session_timeout}, for information).
    @param address: C{host:port} of the server, for messages.
    @param max_result_size: see L{start_session}.
    @return: a Deferred of an L{RPCSession} (see L{start_session}).
    """
    protocol = make_client_protocol()
    carrier.switch_to(protocol, rest)
    opening = start_session(protocol, clock=reactor, hello_timeout=hello_timeout,
                            max_result_size=max_result_size)

    def describe(session):
        session.address = address
        session.session_timeout = session_timeout
        return session

    return opening.addCallback(describe)


def _abandon(protocol, clock):
    """Close the connection of a session object that was garbage-collected."""
    if not protocol.lost and protocol.transport is not None:
        log.info("session dropped without close(): closing its connection")
        protocol.closing = True
        clock.callLater(0, protocol.transport.loseConnection)


def _detached(calling):
    """
    Hand a command's Deferred to a caller who may attach errbacks late.

    AMP drops the connection when an error answer meets a Deferred that has
    no errback yet; the caller gets a separate Deferred instead, so an error
    waits there (cancelling it cancels the command's Deferred).
    """
    result = Deferred(lambda _: calling.cancel())
    calling.addCallbacks(result.callback, result.errback)
    return result


def _ignore(failure):
    """Errback for best-effort commands: their failure is of no interest."""
    return None



def _convert_items(value, convert):
    """
    @param value: any value.
    @param convert: applied to each item of a container.
    @return: a list, tuple or dict C{value} with C{convert} applied to its
        items (the keys of a dict kept); L{None} for anything else.
    """
    if isinstance(value, list):
        return [convert(item) for item in value]
    if isinstance(value, tuple):
        return tuple(convert(item) for item in value)
    if isinstance(value, dict):
        return {key: convert(item) for key, item in value.items()}
    return None


def _device_shortcut(dev_type, what):
    """
    @param dev_type: TVM's device name.
    @param what: the device's name for the docstring.
    @return: a method C{session.<name>(index=0)} giving that device of the session.
    """

    def shortcut(self, index=0):
        return self.device(dev_type, index)

    shortcut.__doc__ = f"@return: the remote {what} device C{{index}}."
    return shortcut


@attrs.define(eq=False)
class RPCSession:
    """
    A session on a remote device, with TVM's API and Deferreds.

    Made by L{start_session} (or by C{connect()} / C{TrackerSession.request()}).
    Use it with C{await} or callbacks; end it with L{close} or
    C{async with session:}. A session whose object is garbage-collected
    without L{close} has its connection closed, and one whose connection goes
    away fails its outstanding and later calls with L{SessionClosed}.

    @ivar chunk_size: the chunk size of transfers (from the server's Hello).
    @ivar window: chunks kept in flight per transfer.
    @ivar server_implementation: what the server says it is.
    @ivar address: C{host:port} of the server when known, else L{None}.
    @ivar session_timeout: the session timeout asked for at the handshake.
    @ivar max_result_size: the longest encoded result of a call accepted; a
        call whose answer announces more fails with
        L{ResultTooLarge<tvm_rpc.protocol.streams.ResultTooLarge>} without
        reading it (the session stays usable).
    """

    _protocol: SessionClientProtocol
    _clock: object
    chunk_size: int = CHUNK_SIZE
    window: int = WINDOW
    server_implementation: str = ""
    address: "str | None" = None
    session_timeout: float = 0
    max_result_size: int = DEFAULT_MAX_RESULT_SIZE
    _to_free: list = attrs.field(factory=list, init=False)
    _free_call: object = attrs.field(default=None, init=False)
    _close_started: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self):
        weakref.finalize(self, _abandon, self._protocol, self._clock).atexit = False
        # Weakly: the protocol must not keep an abandoned session alive.
        orphan = weakref.WeakMethod(self._orphan_answer)

        def clean_up(answer):
            method = orphan()
            if method is not None:
                method(answer)

        self._protocol.orphan = clean_up

    # -- state -----------------------------------------------------------

    @property
    def protocol(self):
        """The L{SessionClientProtocol} under this session."""
        return self._protocol

    @property
    def closed(self):
        """Whether the session is over or closing (no new calls are sent)."""
        return self._protocol.lost or self._close_started

    def when_closed(self):
        """@return: a Deferred firing with L{None} once the connection is gone."""
        return self._protocol.when_lost()

    def _call_remote(self, command, **kwargs):
        """C{callRemote}, or a L{SessionClosed} failure once the session is over."""
        if self.closed:
            return fail(self._protocol.ending_error())
        return self._protocol.callRemote(command, **kwargs)

    def _guarded(self, command, orphan, **kwargs):
        """
        Call a command that creates something on the server (a handle, a
        stream). When the caller cancels before the answer, the answer is
        still awaited and C{orphan(answer)} cleans up what it created.

        @return: a cancellable Deferred of the answer.
        """
        calling = self._call_remote(command, **kwargs)
        cancelled = []
        result = Deferred(lambda _: cancelled.append(True))

        def arrived(answer):
            if cancelled:
                orphan(answer)
            else:
                result.callback(answer)

        def failed(failure):
            if not cancelled:
                result.errback(failure)

        calling.addCallbacks(arrived, failed)
        return result

    def _orphan_answer(self, answer):
        """
        Release what the answer of a cancelled call made on the server: its
        result stream is closed; handles in an inline result are decoded into
        remote objects that are dropped at once, so their finalizers free them.
        """
        try:
            if answer.get("result") is not None:
                self._from_wire(values.decode(answer["result"]))
            elif answer.get("result_stream") is not None:
                self._close_stream(answer["result_stream"])
        except Exception:
            log.failure("cleaning up after a cancelled call's answer")

    def _close_stream(self, stream):
        """Close a stream on the server, best-effort."""
        self._call_remote(StreamClose, stream=stream).addErrback(_ignore)

    def _release(self, handle):
        """
        Queue C{handle} for release on the server (called by finalizers, so
        it never raises and sends nothing itself: a Free goes out on the next
        reactor turn).
        """
        if self.closed:
            return
        self._to_free.append(handle)
        if self._free_call is None:
            self._free_call = self._clock.callLater(0, self._flush_free)

    def _flush_free(self):
        """Send the queued releases."""
        self._free_call = None
        handles, self._to_free = self._to_free, []
        if self.closed:
            return
        for start in range(0, len(handles), FREE_BATCH):
            self._call_remote(Free, handles=handles[start:start + FREE_BATCH]).addErrback(
                lambda failure: log.info("releasing handles failed: {why}",
                                         why=failure.getErrorMessage())
            )

    # -- values ----------------------------------------------------------

    def _own(self, thing):
        """
        @return: C{thing}, a remote object or device of this session.
        @raise ValueError: for one of another session, or a closed handle.
        """
        if thing.session is not self:
            raise ValueError(f"{thing!r} belongs to another session")
        if getattr(thing, "closed", False):
            raise ValueError(f"{thing!r} was closed")
        return thing

    def _lazy_functions(self, value, found):
        """Collect the unresolved L{RemoteFunction}s inside C{value}."""
        if type(value) in _SCALARS:
            return found
        if isinstance(value, RemoteFunction):
            if value.handle is None:
                found.append(value)
        elif isinstance(value, (list, tuple)):
            for item in value:
                self._lazy_functions(item, found)
        elif isinstance(value, dict):
            for item in value.values():
                self._lazy_functions(item, found)
        return found

    def _to_wire(self, value):
        """Turn an argument into what the value codec carries."""
        if type(value) in _SCALARS:
            return value
        if isinstance(value, RemoteArray):
            return self._own(value).to_wire()
        if isinstance(value, RemoteFunction):
            return Handle("function", self._own(value).handle)
        if isinstance(value, RemoteModule):
            return Handle("module", self._own(value).handle)
        if isinstance(value, Device):
            return self._own(value).to_wire()
        items = _convert_items(value, self._to_wire)
        if items is not None:
            return items
        module = type(value).__module__
        if module == "numpy" and type(value).__name__ == "ndarray":
            return host_array(value)
        if module == "numpy" and hasattr(value, "item"):
            return value.item()
        return value

    def _from_wire(self, value):
        """Turn a decoded result into client objects."""
        if type(value) in _SCALARS:
            return value
        if isinstance(value, Handle):
            if value.kind == "module":
                return RemoteModule(self, value.id, kind=None)
            return RemoteFunction(self, f"<function {value.id}>", handle=value.id)
        if isinstance(value, ArrayRef):
            return RemoteArray(self, value.id, value.shape, value.dtype,
                               self._device(value.device))
        if isinstance(value, values.Device):
            return self._device(value)
        if isinstance(value, HostArray):
            try:
                return value.numpy()
            except (ImportError, values.CodecError, TypeError):
                return value
        items = _convert_items(value, self._from_wire)
        return value if items is None else items

    async def _encode_args(self, args):
        """@return: the keyword arguments carrying C{args} (inline or streamed)."""
        for function in self._lazy_functions(list(args), []):
            await function.resolve()
        encoded = values.encode([self._to_wire(arg) for arg in args])
        return await send_value(self._call_remote, encoded, window=self.window)

    async def _target(self, function):
        """@return: the C{function=} or C{name=} argument naming the callee."""
        if isinstance(function, RemoteFunction) and function.handle is None:
            await self._own(function).resolve()
        return self._ready_target(function)

    # -- functions -------------------------------------------------------

    def get_function(self, name):
        """
        Look up a global function of the server (registered functions and
        the built-ins under TVM's names, e.g. C{"tvm.rpc.server.upload"}).

        @return: a Deferred of a L{RemoteFunction}; fails with
            L{RemoteError} when the server has no such function.
        """
        getting = self._guarded(GetFunction, lambda answer: self._release(answer["function"]),
                                name=name)
        return getting.addCallback(
            lambda answer: RemoteFunction(self, name, handle=answer["function"]))

    def call(self, name, *args):
        """
        Call the global function C{name} in one round trip (no handle).

        @return: a Deferred of the result.
        """
        return self._call_function(name, args)

    def _call_function(self, function, args):
        """
        @param function: a L{RemoteFunction} or a global name.
        @return: a Deferred of C{function(*args)} (see L{RemoteFunction}).
        """
        try:
            # The common call: a looked-up function with plain arguments.
            if type(function) is RemoteFunction:
                handle = function.handle
                if handle is not None:
                    for arg in args:
                        if type(arg) not in _SCALARS:
                            break
                    else:
                        encoded = values.encode(list(args))
                        if len(encoded) <= MAX_INLINE_VALUE:
                            self._own(function)
                            if self._protocol.lost or self._close_started:
                                return fail(self._protocol.ending_error())
                            return self._protocol.call_function(
                                encoded, self._box_result, handle)
            target = self._ready_target(function)
            if target is not None and not self._lazy_functions(args, []):
                encoded = values.encode([self._to_wire(arg) for arg in args])
                if len(encoded) <= MAX_INLINE_VALUE:
                    return self._send_call(encoded, self._box_result, **target)
        except Exception:
            return fail()
        return Deferred.fromCoroutine(self._call(function, args))

    def _send_call(self, args, decode, function=None, name=None, args_stream=None):
        """
        Send a L{CallFunction} (see L{SessionClientProtocol.call_function}),
        or fail with L{SessionClosed} once the session is over.

        @return: a Deferred of what C{decode} makes of the answer box.
        """
        if self._protocol.lost or self._close_started:
            return fail(self._protocol.ending_error())
        return self._protocol.call_function(args, decode, function, name, args_stream)

    def _box_result(self, box):
        """@return: the decoded result of a call's answer box (a Deferred when streamed)."""
        result = calls.inline_result(box)
        if result is not None:
            return self._from_wire(values.decode(result))
        return self._result(calls.parse_answer(box))

    def _ready_target(self, function):
        """
        @return: the C{function=} or C{name=} argument naming the callee, or
            L{None} when it is a lazy function not looked up yet.
        """
        if isinstance(function, RemoteFunction):
            handle = self._own(function).handle
            return None if handle is None else {"function": handle}
        if isinstance(function, str):
            return {"name": function}
        raise TypeError(f"call a RemoteFunction or a global name, not {function!r}")

    def _result(self, answer):
        """@return: the decoded result of a call answer (a Deferred when streamed)."""
        if answer.get("result") is not None:
            return self._from_wire(values.decode(answer["result"]))
        receiving = receive_value(self._call_remote, answer, window=self.window,
                                  max_size=self.max_result_size)
        return receiving.addCallback(lambda encoded: self._from_wire(
            values.decode(encoded, max_size=max(self.max_result_size, values.MAX_SIZE))))

    async def _call(self, function, args):
        target = await self._target(function)
        carried = await self._encode_args(args)
        answer = await self._send_call(carried.get("args"), calls.parse_answer, **target,
                                       args_stream=carried.get("args_stream"))
        result = self._result(answer)
        if isinstance(result, Deferred):
            result = await result
        return result

    def _module_function_handle(self, module, name, query_imports):
        """@return: a Deferred of the handle id of C{module}'s function C{name}."""
        getting = self._guarded(
            ModuleGetFunction, lambda answer: self._release(answer["function"]),
            module=self._own(module).handle, name=name, query_imports=bool(query_imports),
        )
        return getting.addCallback(lambda answer: answer["function"])

    # -- files and modules ----------------------------------------------

    def upload(self, data, target=None):
        """
        Upload a file into the session's work directory, in chunks.

        @param data: a local path (C{str} or path-like; read as it is sent),
            or a bytes-like object.
        @param target: the path on the server; by default the local file's
            base name (required for bytes).
        @return: a Deferred firing with the number of bytes uploaded.
            Cancelling it stops the upload; the server deletes the partial
            file.
        """
        return Deferred.fromCoroutine(self._upload(data, target))

    async def _upload(self, data, target):
        if isinstance(data, (str, os.PathLike)):
            path = os.fspath(data)
            if target is None:
                target = os.path.basename(path)
            with open(path, "rb") as source:
                size = os.fstat(source.fileno()).st_size
                return await self._send_file(target, file_chunks(source, self.chunk_size), size)
        if target is None:
            raise ValueError("upload of bytes needs a target path")
        view = memoryview(data).cast("B")
        return await self._send_file(target, chunked(view, self.chunk_size), len(view))

    async def _send_file(self, target, chunks, size):
        answer = await self._guarded(
            OpenUpload, lambda answer: self._close_stream(answer["stream"]),
            path=target, size=size,
        )
        return await write_stream(self._call_remote, answer["stream"], chunks,
                                  window=self.window)

    def download(self, path, local_path=None):
        """
        Download a file of the session's work directory, in chunks.

        @param path: the path on the server.
        @param local_path: when given, the data is written there as it
            arrives (through a temporary file beside it, renamed at the end)
            instead of being collected in memory.
        @return: a Deferred of the file's bytes, or of the number of bytes
            written when C{local_path} is given. Cancelling it stops the
            transfer (and leaves no partial local file).
        """
        return Deferred.fromCoroutine(self._download(path, local_path))

    async def _download(self, path, local_path):
        answer = await self._guarded(
            OpenDownload, lambda answer: self._close_stream(answer["stream"]), path=path)
        stream, size = answer["stream"], answer["size"]
        if local_path is None:
            parts = []
            await read_stream(self._call_remote, stream, size, parts.append,
                              window=self.window, chunk_size=self.chunk_size)
            return b"".join(parts)
        local_path = os.path.abspath(os.fspath(local_path))
        temporary, sink = open_temporary(local_path)
        try:
            with sink:
                received = await read_stream(
                    self._call_remote, stream, size, sink.write,
                    window=self.window, chunk_size=self.chunk_size,
                )
            os.replace(temporary, local_path)
        except BaseException:
            try:
                os.unlink(temporary)
            except FileNotFoundError:
                pass
            raise
        return received

    def remove(self, path):
        """@return: a Deferred firing once C{path} (a file or directory) is deleted."""
        return self.call("tvm.rpc.server.remove", path)

    def listdir(self, path="."):
        """@return: a Deferred of the sorted names in a directory of the work directory."""
        return self.call("tvm.rpc.server.listdir", path)

    def workpath(self, path=""):
        """@return: a Deferred of the absolute path of C{path} on the server."""
        return self.call("tvm.rpc.server.workpath", path)

    def load_module(self, path):
        """
        Load a module from the work directory: a C{.py} file, or a TVM
        library (C{.so}, C{.tar}) when the server has TVM's runtime.

        @return: a Deferred of a L{RemoteModule}.
        """
        loading = self._guarded(LoadModule, lambda answer: self._release(answer["module"]),
                                path=path)
        return loading.addCallback(
            lambda answer: RemoteModule(self, answer["module"], answer["kind"], path))

    # -- devices ---------------------------------------------------------

    def device(self, dev_type, index=0):
        """
        @param dev_type: a name (C{"cpu"}, C{"cuda"}, C{"cl"}, C{"cuda:1"},
            ...) or TVM's device type number.
        @param index: the device index (unless the name carries one).
        @return: a L{Device} of this session (no round trip; see
            L{Device.exists}).
        """
        device_type, named_index = resolve_device_type(dev_type)
        return Device(self, device_type, index if named_index is None else named_index)

    def cpu(self, index=0):
        """@return: the remote C{cpu(index)}."""
        return self.device("cpu", index)

    cuda = _device_shortcut("cuda", "CUDA")
    cl = _device_shortcut("opencl", "OpenCL")
    vulkan = _device_shortcut("vulkan", "Vulkan")
    metal = _device_shortcut("metal", "Metal")
    rocm = _device_shortcut("rocm", "ROCm")
    ext_dev = _device_shortcut("ext_dev", "extension")
    hexagon = _device_shortcut("hexagon", "Hexagon")
    webgpu = _device_shortcut("webgpu", "WebGPU")

    def _device(self, device):
        """Normalise a device argument (None means cpu(0))."""
        if device is None:
            return self.cpu(0)
        if isinstance(device, Device):
            return self._own(device)
        if isinstance(device, values.Device):
            return Device(self, device.device_type, device.index)
        return self.device(device)

    def _device_exists(self, device):
        answer = self._call_remote(DeviceExists, device_type=device.device_type,
                                   device_id=device.index)
        return _detached(answer).addCallback(lambda answer: answer["exists"])

    def _device_sync(self, device):
        answer = self._call_remote(DeviceSync, device_type=device.device_type,
                                   device_id=device.index)
        return _detached(answer).addCallback(lambda _: None)

    # -- arrays ----------------------------------------------------------

    def empty(self, shape, dtype="float32", device=None):
        """
        Allocate an uninitialised array on a device.

        @param shape: a sequence of non-negative ints (or one int).
        @param dtype: TVM's dtype string.
        @param device: a L{Device} of this session, a device name, or L{None}
            for C{cpu(0)}.
        @return: a Deferred of a L{RemoteArray}.
        """
        try:
            device = self._device(device)
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            values.array_nbytes(shape, dtype)
        except (ValueError, TypeError) as e:
            return fail(e if isinstance(e, ValueError) else ValueError(str(e)))
        allocating = self._guarded(
            Empty, lambda answer: self._release(answer["array"]),
            shape=list(shape), dtype=dtype, device_type=device.device_type,
            device_id=device.index,
        )
        return allocating.addCallback(
            lambda answer: RemoteArray(self, answer["array"], shape, dtype, device))

    def array(self, source, device=None, dtype=None):
        """
        Copy a host array to a device.

        @param source: a numpy array, or without numpy bytes/array.array/
            nested lists (see L{tvm_rpc.client.remote.host_array}).
        @param device: as for L{empty}.
        @param dtype: convert to this dtype first (bytes default to uint8).
        @return: a Deferred of the L{RemoteArray}, once filled.
        """
        return Deferred.fromCoroutine(self._array(source, device, dtype))

    async def _array(self, source, device, dtype):
        host = host_array(source, dtype)
        array = await self.empty(host.shape, host.dtype, device)
        try:
            await self._write_array(array, host.data)
        except BaseException:
            array.close()
            raise
        return array

    async def _copy_to_array(self, array, source):
        host = host_array(source, array.dtype)
        count = math.prod(host.shape)
        if count != math.prod(array.shape) or (
            len(host.shape) > 1 and tuple(host.shape) != array.shape
        ):
            raise ValueError(
                f"cannot copy an array of shape {host.shape} into one of shape {array.shape}"
            )
        await self._write_array(array, host.data)
        return array

    async def _write_array(self, array, data):
        answer = await self._guarded(
            OpenArrayWrite, lambda answer: self._close_stream(answer["stream"]),
            array=self._own(array).handle,
        )
        if answer["size"] != len(data):
            self._close_stream(answer["stream"])
            raise ValueError(
                f"the server expects {answer['size']} bytes for {array!r}, not {len(data)}")
        await write_stream(self._call_remote, answer["stream"],
                           chunked(data, self.chunk_size), window=self.window)

    def _read_array(self, array):
        """@return: a Deferred of the raw bytes of C{array}."""
        return Deferred.fromCoroutine(self._read_array_data(array))

    async def _read_array_data(self, array):
        answer = await self._guarded(
            OpenArrayRead, lambda answer: self._close_stream(answer["stream"]),
            array=self._own(array).handle,
        )
        parts = []
        await read_stream(self._call_remote, answer["stream"], answer["size"], parts.append,
                          window=self.window, chunk_size=self.chunk_size)
        return b"".join(parts)

    # -- timing ----------------------------------------------------------

    def time_evaluator(self, func_or_name, device, number=10, repeat=1, min_repeat_ms=0):
        """
        Make an evaluator that times a function on the device, excluding
        the network (TVM's C{time_evaluator}).

        @param func_or_name: a L{RemoteFunction}, or a global function name.
        @param device: the device to sync around each repeat.
        @param number: calls per repeat (grown to last C{min_repeat_ms}).
        @param repeat: repeats; each gives one result.
        @param min_repeat_ms: the shortest duration of one repeat.
        @return: a callable; C{evaluator(*args)} returns a Deferred of a
            L{TimeEvaluatorResult} (C{mean}, C{median}, C{min}, C{max},
            C{std}, C{results}, in seconds).
        @raise ValueError: for C{number} or C{repeat} below 1 or a negative
            C{min_repeat_ms}.
        """
        if not (isinstance(number, int) and number >= 1 and isinstance(repeat, int)
                and repeat >= 1 and min_repeat_ms >= 0):
            raise ValueError(
                f"time_evaluator needs number >= 1, repeat >= 1, min_repeat_ms >= 0; "
                f"got {number!r}, {repeat!r}, {min_repeat_ms!r}")
        device = self._device(device)
        if not isinstance(func_or_name, (RemoteFunction, str)):
            raise TypeError(f"time a RemoteFunction or a global name, not {func_or_name!r}")

        def evaluator(*args):
            """@return: a Deferred of the L{TimeEvaluatorResult} for C{args}."""
            return Deferred.fromCoroutine(
                self._time(func_or_name, device, number, repeat, min_repeat_ms, args))

        return evaluator

    async def _time(self, function, device, number, repeat, min_repeat_ms, args):
        target = await self._target(function)
        carried = await self._encode_args(args)
        answer = await self._call_remote(
            TimeEvaluator, **target, **carried, device_type=device.device_type,
            device_id=device.index, number=number, repeat=repeat,
            min_repeat_ms=float(min_repeat_ms),
        )
        return TimeEvaluatorResult(answer["results"])

    # -- closing ---------------------------------------------------------

    def close(self, timeout=CLOSE_TIMEOUT):
        """
        End the session: ask the server to finish (L{Goodbye}), then close
        the connection; after C{timeout} seconds without an answer the
        connection is dropped. Idempotent.

        @return: a Deferred firing with L{None} once the connection is gone.
        """
        if not self.closed:
            self._close_started = True
            self._protocol.closing = True
            if self._free_call is not None:
                self._free_call.cancel()
                self._free_call = None
            transport = self._protocol.transport
            dropping = self._clock.callLater(timeout, transport.abortConnection)
            self._protocol.when_lost().addCallback(
                lambda _: dropping.cancel() if dropping.active() else None)
            goodbye = self._protocol.callRemote(Goodbye)
            goodbye.addErrback(_ignore)
            goodbye.addCallback(lambda _: transport.loseConnection())
        return self._protocol.when_lost()

    def __aenter__(self):
        """C{async with session:} gives the session itself."""
        return succeed(self)

    def __aexit__(self, exc_type, exc_value, traceback):
        """Leaving C{async with} closes the session (and lets exceptions through)."""
        return self.close().addCallback(lambda _: False)


__all__ = [
    "DEFAULT_MAX_RESULT_SIZE",
    "ProtocolMismatch",
    "RPCSession",
    "RemoteError",
    "SessionClientProtocol",
    "SessionClosed",
    "SessionLostAtStart",
    "SessionTimeout",
    "make_client_protocol",
    "open_session",
    "start_session",
]
