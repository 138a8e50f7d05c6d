"""
The engine of our session protocol: L{AMPEngine} drives an
L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>} over a
L{SessionClientProtocol<tvm_rpc.client.amp_protocol.SessionClientProtocol>}.

It encodes arguments with the value codec (L{tvm_rpc.protocol.values}),
sends them inline or by stream, reads results (refusing one longer than
C{max_result_size} unread, with
L{ResultTooLarge<tvm_rpc.protocol.streams.ResultTooLarge>}), batches handle
releases into C{Free} commands, and ends the session with C{Goodbye}. The
bulk transfers are L{StreamTransfers<tvm_rpc.client.transfers.StreamTransfers>}'.
"""

import attrs
from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from zope.interface import implementer

from ..protocol import calls, values
from ..protocol.session_commands import (
    CHUNK_SIZE,
    MAX_INLINE_VALUE,
    WINDOW,
    DeviceExists,
    DeviceSync,
    Empty,
    Free,
    GetFunction,
    Goodbye,
    LoadModule,
    ModuleGetFunction,
    StreamClose,
    TimeEvaluator,
)
from ..protocol.evaluator_options import TIME_EVALUATOR_OPTIONS
from ..protocol.streams import receive_value, send_value
from ..protocol.values import ArrayRef, Handle
from .amp_protocol import SessionClientProtocol
from .engine import DEFAULT_MAX_RESULT_SIZE, EngineState, ISessionEngine, guarded
from .transfers import StreamTransfers

log = Logger()

#: Most handle ids released by one Free command (keeps the box under 64 KiB).
FREE_BATCH = 4000


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


def _handles_in(value, found):
    """@return: C{found}, with the handle ids inside a decoded value appended."""
    if isinstance(value, (Handle, ArrayRef)):
        found.append(value.id)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _handles_in(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _handles_in(item, found)
    return found


@implementer(ISessionEngine)
@attrs.define(eq=False)
class AMPEngine(EngineState, StreamTransfers):
    """
    Our session protocol (AMP boxes, the value codec, streams) as an
    L{ISessionEngine}.

    @ivar chunk_size: the chunk size of transfers (from the server's Hello).
    @ivar window: chunks kept in flight per transfer.
    @ivar max_result_size: the longest encoded result of a call accepted.
    @ivar on_kept: called with C{(token, keep_for)} when the server keeps
        the session's worker for our next session; the session's C{Goodbye}
        asks for that only when it is set.
    """

    _protocol: SessionClientProtocol
    _clock: object
    chunk_size: int = CHUNK_SIZE
    window: int = WINDOW
    max_result_size: int = DEFAULT_MAX_RESULT_SIZE
    on_kept: object = None

    #: The session protocol this engine speaks (see L{ISessionEngine}).
    protocol_name = "tvm_rpc"

    #: Handle ids waiting for the next C{Free}, and the call that sends it.
    _to_free: list = attrs.field(factory=list, init=False)
    _free_call: object = attrs.field(default=None, init=False)
    _close_started: bool = attrs.field(default=False, init=False)

    def __attrs_post_init__(self):
        self._protocol.orphan = self._orphan_answer

    # -- state -----------------------------------------------------------

    def configure(self, chunk_size, window, max_result_size):
        """Set the transfer parameters (see L{ISessionEngine.configure})."""
        self.chunk_size = chunk_size
        self.window = window
        self.max_result_size = max_result_size

    def abandon(self):
        """Close the connection of a session object that was garbage-collected."""
        protocol = self._protocol
        if not protocol.lost and protocol.transport is not None:
            log.info("session dropped without close(): closing its connection")
            protocol.closing = True
            self._clock.callLater(0, protocol.transport.loseConnection)

    # -- commands --------------------------------------------------------

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
        return guarded(self._call_remote(command, **kwargs), orphan)

    def _orphan_answer(self, answer):
        """
        Release what the answer of a cancelled call made on the server: its
        result stream is closed, and the handles in an inline result are freed.
        """
        try:
            if answer.get("result") is not None:
                for handle in _handles_in(values.decode(answer["result"]), []):
                    self.free(handle)
            elif answer.get("result_stream") is not None:
                self._close_stream(answer["result_stream"])
        except Exception:
            log.failure("cleaning up after a cancelled call's answer")

    def _close_stream(self, stream):
        """Close a stream on the server, best-effort."""
        self._call_remote(StreamClose, stream=stream).addErrback(_ignore)

    def free(self, handle):
        """
        Queue C{handle} for release on the server (called by finalizers, so
        it never raises and sends nothing itself: a Free goes out on the next
        reactor turn).
        """
        if not self.closed:
            self._schedule_free(handle)

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

    # -- calls -----------------------------------------------------------

    def call(self, function, name, args, convert):
        """
        Call a remote function (see L{ISessionEngine.call}): arguments up to
        L{MAX_INLINE_VALUE} encoded bytes travel in the call's box, longer
        ones by stream first.
        """
        if self._protocol.lost or self._close_started:
            return fail(self._protocol.ending_error())
        encoded = values.encode(args)
        if len(encoded) <= MAX_INLINE_VALUE:
            return self._protocol.call_function(
                encoded, lambda box: self._box_result(box, convert), function, name)
        return Deferred.fromCoroutine(self._call_streamed(function, name, encoded, convert))

    async def _call_streamed(self, function, name, encoded, convert):
        carried = await send_value(self._call_remote, encoded, window=self.window)
        if self._protocol.lost or self._close_started:
            raise self._protocol.ending_error()
        answer = await self._protocol.call_function(
            carried.get("args"), calls.parse_answer, function, name, carried.get("args_stream"))
        result = self._result(answer, convert)
        if isinstance(result, Deferred):
            result = await result
        return result

    def _box_result(self, box, convert):
        """@return: the converted result of a call's answer box (a Deferred when streamed)."""
        result = calls.inline_result(box)
        if result is not None:
            return convert(values.decode(result))
        return self._result(calls.parse_answer(box), convert)

    def _result(self, answer, convert):
        """@return: the converted result of a call answer (a Deferred when streamed)."""
        if answer.get("result") is not None:
            return convert(values.decode(answer["result"]))
        receiving = receive_value(self._call_remote, answer, window=self.window,
                                  max_size=self.max_result_size)
        return receiving.addCallback(lambda encoded: convert(
            values.decode(encoded, max_size=max(self.max_result_size, values.MAX_SIZE))))

    def get_function(self, name):
        """@return: a Deferred of the handle id of the global function C{name}."""
        getting = self._guarded(GetFunction, lambda answer: self.free(answer["function"]),
                                name=name)
        return getting.addCallback(lambda answer: answer["function"])

    def module_function(self, module, name, query_imports):
        """@return: a Deferred of the handle id of module C{module}'s function C{name}."""
        getting = self._guarded(
            ModuleGetFunction, lambda answer: self.free(answer["function"]),
            module=module, name=name, query_imports=bool(query_imports),
        )
        return getting.addCallback(lambda answer: answer["function"])

    def time_evaluator(self, function, name, args, device_type, index, number, repeat,
                       min_repeat_ms, options):
        """
        @return: a Deferred of the per-repeat seconds of timing a function.
            Only TVM's options (C{options}) that differ from their defaults
            go on the wire: the common request stays as small as before,
            and a server that predates them still understands it.
        """
        changed = {key: value for key, value in options.items()
                   if value != TIME_EVALUATOR_OPTIONS[key]}
        return Deferred.fromCoroutine(self._time(
            function, name, args, device_type, index, number, repeat, min_repeat_ms, changed))

    async def _time(self, function, name, args, device_type, index, number, repeat,
                    min_repeat_ms, changed):
        target = {"name": name} if function is None else {"function": function}
        carried = await send_value(self._call_remote, values.encode(args), window=self.window)
        if changed:
            target["options"] = [changed]
        answer = await self._call_remote(
            TimeEvaluator, **target, **carried, device_type=device_type,
            device_id=index, number=number, repeat=repeat,
            min_repeat_ms=float(min_repeat_ms),
        )
        return answer["results"]

    # -- modules, devices, arrays ----------------------------------------

    def load_module(self, path):
        """@return: a Deferred of C{(handle, kind)} of the module loaded from C{path}."""
        loading = self._guarded(LoadModule, lambda answer: self.free(answer["module"]),
                                path=path)
        return loading.addCallback(lambda answer: (answer["module"], answer["kind"]))

    def device_exists(self, device_type, index):
        """@return: a Deferred of whether the device exists on the server."""
        answer = self._call_remote(DeviceExists, device_type=device_type, device_id=index)
        return _detached(answer).addCallback(lambda answer: answer["exists"])

    def device_sync(self, device_type, index):
        """@return: a Deferred firing once the device finished its queued work."""
        answer = self._call_remote(DeviceSync, device_type=device_type, device_id=index)
        return _detached(answer).addCallback(lambda _: None)

    def empty(self, shape, dtype, device_type, index):
        """@return: a Deferred of the handle id of a new uninitialised array."""
        allocating = self._guarded(
            Empty, lambda answer: self.free(answer["array"]),
            shape=list(shape), dtype=dtype, device_type=device_type, device_id=index,
        )
        return allocating.addCallback(lambda answer: answer["array"])

    # -- closing ---------------------------------------------------------

    def close(self, timeout):
        """
        Ask the server to finish (C{Goodbye}), then close the connection;
        after C{timeout} seconds without an answer the connection is
        dropped. Idempotent.

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
            if self.on_kept is None:
                goodbye = self._protocol.callRemote(Goodbye)
            else:
                goodbye = self._protocol.callRemote(Goodbye, keep=True)
                goodbye.addCallback(self._kept)
            goodbye.addErrback(_ignore)
            goodbye.addCallback(lambda _: transport.loseConnection())
        return self._protocol.when_lost()

    def _kept(self, answer):
        """The server answered C{Goodbye}: remember the token of a kept worker."""
        if answer.get("token"):
            self.on_kept(answer["token"], answer.get("keep_for"))


__all__ = ["FREE_BATCH", "AMPEngine"]
