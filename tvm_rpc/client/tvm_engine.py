"""
The engine of TVM's own session protocol: L{TVMEngine} drives an
L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>} on one of TVM's servers
(C{python -m tvm.exec.rpc_server}, C{apps/cpp_rpc}, the Android app) over a
L{TVMClientProtocol<tvm_rpc.client.tvm_protocol.TVMClientProtocol>}, natively
on the reactor: no TVM import, no threads.

The facade's handle ids map to the server's raw pointers: a function (with
the module and name it came from, for C{time_evaluator}), a module, or an
array (its descriptor, and either the tensor object that owns it or nothing
when this engine allocated the data). Releasing a handle sends kFreeHandle
(or kDevFreeData for data allocated here) on the next reactor turn; a
request that creates something and is cancelled before its answer frees
what the answer names, so neither end leaks. The remote functions each verb
uses are those of TVM's client (C{reference/tvm_session_protocol.md} 4.1).
"""

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from ..protocol import tvm_packets as packets
from ..protocol.flavour import TVM_PROTOCOL
from ..protocol.tvm_values import (
    FUNCTION, MODULE, OPAQUE_PTR, TENSOR, DataType, FunctionRef, ModuleRef, OpaquePtr,
    TensorDesc, call_return,
)
from ..protocol.values import ArrayRef, DLDevice, Handle
from .engine import DEFAULT_MAX_RESULT_SIZE, EngineState, ISessionEngine
from .tvm_protocol import PACKET_SLACK, TVMClientProtocol, no_such_function
from .tvm_transfers import TVMTransfers

log = Logger()

#: Chunk size of array copies on TVM's servers (they buffer a whole packet).
TVM_CHUNK_SIZE = 1 << 20
#: Seconds a session dropped without close() has to finish closing.
ABANDON_TIMEOUT = 5.0
#: Alignment of arrays allocated on the server (TVM's client uses 64 too).
ALIGNMENT = 64


def _ignore(failure):
    """Errback of best-effort requests: their failure is of no interest."""
    return None


@attrs.frozen
class _Function:
    pointer: int
    module: "int | None" = None
    name: "str | None" = None


@attrs.frozen
class _Module:
    pointer: int


@attrs.frozen
class _Array:
    desc: TensorDesc
    #: The tensor object owning the data (kFreeHandle), or None: data we allocated.
    owner: "int | None" = None


@implementer(ISessionEngine)
@attrs.define(eq=False)
class TVMEngine(EngineState, TVMTransfers):
    """
    TVM's own session protocol as an L{ISessionEngine}.

    @ivar chunk_size: the largest chunk of an array copy (bounded further by
        the server's C{GetCRTMaxPacketSize} when it has one).
    @ivar window: array-copy chunks kept in flight.
    @ivar max_result_size: the longest answer accepted (a longer packet ends
        the session before it is buffered).
    """

    _protocol: TVMClientProtocol
    _clock: object
    chunk_size: int = TVM_CHUNK_SIZE
    window: int = 4
    max_result_size: int = DEFAULT_MAX_RESULT_SIZE

    #: The session protocol this engine speaks (see L{ISessionEngine}).
    protocol_name = TVM_PROTOCOL
    #: The handle entries of arrays (for L{TVMTransfers}).
    _array_entry = _Array

    _handles: dict = attrs.field(factory=dict, init=False)
    _next_id: int = attrs.field(default=1, init=False)
    #: Global function pointers looked up by name for calls by name, or the
    #: list of Deferreds waiting for a lookup in flight.
    _globals: dict = attrs.field(factory=dict, init=False)
    _to_free: list = attrs.field(factory=list, init=False)
    _free_call: object = attrs.field(default=None, init=False)
    _close_started: bool = attrs.field(default=False, init=False)
    _max_packet: object = attrs.field(default=None, init=False)

    # -- state -----------------------------------------------------------

    def configure(self, chunk_size, window, max_result_size):
        """Set the transfer parameters (see L{ISessionEngine.configure})."""
        self.chunk_size = chunk_size
        self.window = window
        self.max_result_size = max_result_size
        self._protocol.max_packet = max_result_size + PACKET_SLACK

    def abandon(self):
        """Close the connection of a session object that was garbage-collected."""
        protocol = self._protocol
        if not protocol.lost and protocol.transport is not None:
            log.info("TVM session dropped without close(): closing its connection")
            self._clock.callLater(0, self.close, ABANDON_TIMEOUT)

    # -- requests ----------------------------------------------------------

    def _request(self, data, copy_ack=None, orphan=None):
        """
        A request (see L{TVMClientProtocol.request}), or a L{SessionClosed}
        failure once the session is over.
        """
        if self.closed:
            return fail(self._protocol.ending_error())
        return self._protocol.request(data, copy_ack, orphan)

    def _syscall(self, code, *args, orphan=None):
        """
        @param orphan: called with the one value answered when the caller
            cancelled first (see L{TVMClientProtocol.request}).
        @return: a Deferred of the one value a syscall answers.
        """
        release = None if orphan is None else (lambda items: orphan(items[0]))
        return self._request(packets.syscall(code, list(args)), orphan=release).addCallback(
            lambda items: items[0])

    def _add(self, entry):
        handle = self._next_id
        self._next_id += 1
        self._handles[handle] = entry
        return handle

    def _entry(self, handle, kind):
        entry = self._handles.get(handle)
        if not isinstance(entry, kind):
            raise ValueError(f"handle {handle} is no {kind.__name__.strip('_').lower()} "
                             "of this session (closed?)")
        return entry

    # -- releasing ---------------------------------------------------------

    def free(self, handle):
        """
        Queue the release of C{handle} on the server (called by finalizers:
        never raises, sends nothing itself; the frees go out on the next
        reactor turn).
        """
        if self._close_started:
            return  # close() frees whatever is still held
        entry = self._handles.pop(handle, None)
        if entry is not None and not self._protocol.lost:
            self._release(entry)

    def _release(self, entry):
        """Queue the server-side release of an entry's pointers."""
        if isinstance(entry, _Array):
            if entry.owner is not None:
                self._queue_free(packets.FREE_HANDLE, OpaquePtr(entry.owner))
            else:
                self._queue_free(packets.DEV_FREE_DATA, entry.desc.device,
                                 OpaquePtr(entry.desc.data))
        else:
            self._queue_free(packets.FREE_HANDLE, OpaquePtr(entry.pointer))

    def _queue_free(self, code, *args):
        self._schedule_free(packets.syscall(code, list(args)))

    def _flush_free(self):
        """Send the queued releases, pipelined."""
        self._free_call = None
        frees, self._to_free = self._to_free, []
        for data in frees:
            if self._protocol.lost:
                return
            self._protocol.request(data).addErrback(_ignore)

    def _orphan_return(self, items):
        """Free what the answer of a cancelled call made (a function, module or tensor)."""
        type_index, value, owner = call_return(items)
        if owner is not None:
            self._queue_free(packets.FREE_HANDLE, OpaquePtr(owner))
        elif type_index >= 64 and isinstance(value, OpaquePtr) and value.value:
            self._queue_free(packets.FREE_HANDLE, value)

    # -- functions -----------------------------------------------------------

    def _global(self, name):
        """@return: a Deferred of the pointer of global C{name}, looked up once per session."""
        known = self._globals.get(name)
        if isinstance(known, int):
            return succeed(known)
        waiter = Deferred()
        if known is None:
            self._globals[name] = [waiter]
            looking = self._syscall(packets.GET_GLOBAL_FUNC, name)
            looking.addCallbacks(self._found_global, self._global_failed,
                                 callbackArgs=(name,), errbackArgs=(name,))
        else:
            known.append(waiter)
        return waiter

    def _found_global(self, pointer, name):
        waiters = self._globals.pop(name)
        if isinstance(pointer, OpaquePtr) and pointer.value:
            self._globals[name] = pointer.value  # freed by close() at the latest
            for waiter in waiters:
                if not waiter.called:
                    waiter.callback(pointer.value)
        else:
            for waiter in waiters:
                if not waiter.called:
                    waiter.errback(no_such_function(name))

    def _global_failed(self, failure, name):
        # Waiters cancelled meanwhile were already called: skip them.
        for waiter in self._globals.pop(name):
            if not waiter.called:
                waiter.errback(failure)

    def get_function(self, name):
        """@return: a Deferred of the handle id of the global function C{name} (its own pointer)."""
        looking = self._syscall(
            packets.GET_GLOBAL_FUNC, name,
            orphan=lambda pointer: pointer.value and self._queue_free(packets.FREE_HANDLE, pointer))

        def found(pointer):
            if not (isinstance(pointer, OpaquePtr) and pointer.value):
                raise no_such_function(name)
            return self._add(_Function(pointer.value, None, name))

        return looking.addCallback(found)

    def module_function(self, module, name, query_imports):
        """@return: a Deferred of the handle id of module C{module}'s function C{name}."""
        try:
            pointer = self._entry(module, _Module).pointer
        except ValueError:
            return fail()

        def found(returned):
            if returned is None:
                raise no_such_function(name, "module has no function")
            return self._add(_Function(returned.pointer, pointer, name))

        return self._call_by_name(
            "tvm.rpc.server.ModuleGetFunction",
            [ModuleRef(pointer), name, bool(query_imports)], found, raw=True)

    def call(self, function, name, args, convert):
        """Call a remote function (see L{ISessionEngine.call})."""
        if self.closed:
            return fail(self._protocol.ending_error())
        try:
            wire = [self._to_tvm(arg) for arg in args]
        except (ValueError, TypeError):
            return fail()
        if function is not None:
            try:
                pointer = self._entry(function, _Function).pointer
            except ValueError:
                return fail()
            return self._call_pointer(pointer, wire, convert)
        return self._call_by_name(name, wire, convert)

    def _call_by_name(self, name, wire, convert, raw=False):
        if self.closed:
            return fail(self._protocol.ending_error())
        known = self._globals.get(name)
        if isinstance(known, int):
            return self._call_pointer(known, wire, convert, raw)
        return self._global(name).addCallback(
            lambda pointer: self._call_pointer(pointer, wire, convert, raw))

    def _call_pointer(self, pointer, wire, convert, raw=False):
        try:
            data = packets.call_func(pointer, wire)
        except ValueError:
            return fail()
        calling = self._request(data, orphan=self._orphan_return)
        return calling.addCallback(lambda items: convert(self._from_tvm(items, raw)))

    # -- values ------------------------------------------------------------

    def _to_tvm(self, value):
        """@return: the TVM wire value of a facade wire value."""
        kind = type(value)
        if kind is Handle:
            if value.kind == "module":
                return ModuleRef(self._entry(value.id, _Module).pointer)
            return FunctionRef(self._entry(value.id, _Function).pointer)
        if kind is ArrayRef:
            return self._entry(value.id, _Array).desc
        if kind in (list, tuple, dict):
            raise TypeError("TVM's session protocol carries no lists or dicts as arguments")
        if kind.__name__ == "HostArray":
            raise TypeError("TVM's session protocol cannot pass host arrays: copy them "
                            "to the device first (session.array(...))")
        return value

    def _from_tvm(self, items, raw=False):
        """
        @return: the facade wire value of a kCallFunc's answer (with C{raw},
            the L{_Function} or L{_Module} entry instead of a handle id, or
            L{None} for a missing function).
        """
        type_index, value, owner = call_return(items)
        if type_index == TENSOR:
            handle = self._add(_Array(value, owner))
            return ArrayRef(handle, value.shape, str(value.dtype), value.device)
        if type_index in (FUNCTION, MODULE):
            entry = (_Function if type_index == FUNCTION else _Module)(value.value)
            if raw:
                return entry
            return Handle("function" if type_index == FUNCTION else "module", self._add(entry))
        if isinstance(value, OpaquePtr) and type_index >= 64:
            if value.value:
                self._queue_free(packets.FREE_HANDLE, value)
            raise TypeError(f"the function returned an object of type index {type_index}, "
                            "which TVM's session protocol gives only by handle; this client "
                            "reads functions, modules, tensors and scalars")
        if isinstance(value, DataType):
            return str(value)
        if isinstance(value, TensorDesc):
            # A DLTensor* argument returned unchanged: nothing new to own.
            return None
        if type_index == OPAQUE_PTR and isinstance(value, OpaquePtr):
            return value.value
        return value

    # -- files, modules, devices --------------------------------------------

    def load_module(self, path):
        """@return: a Deferred of C{(handle, "tvm")} of the module loaded from C{path}."""
        return self._call_by_name("tvm.rpc.server.load_module", [path],
                                  lambda handle: (handle.id, "tvm"))

    def device_exists(self, device_type, index):
        """@return: a Deferred of whether the device exists (cpu always does, as TVM says)."""
        if device_type == 1:
            return succeed(True)
        asking = self._syscall(packets.DEV_GET_ATTR, DLDevice(device_type, index),
                               packets.ATTR_EXIST)
        return asking.addCallback(lambda value: bool(value))

    def device_sync(self, device_type, index):
        """@return: a Deferred firing once the device finished its queued work."""
        return self._syscall(packets.DEV_STREAM_SYNC, DLDevice(device_type, index),
                             OpaquePtr(0)).addCallback(lambda _: None)

    def empty(self, shape, dtype, device_type, index):
        """@return: a Deferred of the handle id of a new array (kDevAllocData)."""
        try:
            desc = TensorDesc(0, DLDevice(device_type, index), tuple(shape),
                              DataType.parse(dtype))
        except ValueError:
            return fail()
        device = desc.device
        allocating = self._syscall(
            packets.DEV_ALLOC_DATA, device, desc.nbytes, ALIGNMENT, desc.dtype,
            orphan=lambda data: self._queue_free(packets.DEV_FREE_DATA, device, data))
        return allocating.addCallback(
            lambda data: self._add(_Array(attrs.evolve(desc, data=data.value))))

    def time_evaluator(self, function, name, args, device_type, index, number, repeat,
                       min_repeat_ms, options):
        """
        Time a function on the device with the server's
        C{runtime.RPCTimeEvaluator} (TVM's options, all of them).

        @return: a Deferred of the list of per-repeat seconds.
        """
        if function is not None:
            try:
                entry = self._entry(function, _Function)
            except ValueError:
                return fail()
            if entry.name is None:
                return fail(ValueError(
                    "on TVM's servers time_evaluator times a global function or a module's "
                    "function by name; this function came from a call"))
            module, name = entry.module, entry.name
        else:
            module = None
        return Deferred.fromCoroutine(self._time(
            module, name, args, [
                device_type, index, number, repeat, int(min_repeat_ms),
                options["limit_zero_time_iterations"], options["cooldown_interval_ms"],
                options["repeats_to_cooldown"], options["cache_flush_bytes"],
                options["f_preproc"]]))

    async def _time(self, module, name, args, options):
        target = None if module is None else ModuleRef(module)
        wire = [self._to_tvm(arg) for arg in args]
        evaluator = await self._call_by_name(
            "runtime.RPCTimeEvaluator", [target, name, *options], lambda value: value, raw=True)
        try:
            blob = await self._call_pointer(evaluator.pointer, wire, lambda value: value)
        finally:
            self._queue_free(packets.FREE_HANDLE, OpaquePtr(evaluator.pointer))
        return list(memoryview(blob).cast("d")[:len(blob) // 8])

    # -- closing ---------------------------------------------------------

    def close(self, timeout):
        """
        End the session: once the server answered what is in flight (so
        what those answers made is known), free everything the session
        still holds, send kShutdown, and close once every answer is in (a
        reset mid-answer upsets TVM's server); drop the connection after
        C{timeout} seconds. Idempotent.

        @return: a Deferred firing with L{None} once the connection is gone.
        """
        protocol = self._protocol
        if not self.closed:
            self._close_started = True
            protocol.closing = True
            dropping = self._clock.callLater(timeout, protocol.transport.abortConnection)
            protocol.when_lost().addCallback(
                lambda _: dropping.cancel() if dropping.active() else None)
            protocol.drained().addCallback(self._finish)
        return protocol.when_lost()

    def _finish(self, _):
        """Free what is held, say kShutdown, close when the answers are in."""
        protocol = self._protocol
        if protocol.lost:
            return
        for entry in self._handles.values():
            self._release(entry)
        self._handles.clear()
        for pointer in self._globals.values():
            if isinstance(pointer, int):
                self._queue_free(packets.FREE_HANDLE, OpaquePtr(pointer))
        self._globals.clear()
        if self._free_call is not None:
            self._free_call.cancel()
        self._flush_free()
        protocol.send(packets.SHUTDOWN_PACKET)
        protocol.drained().addCallback(lambda _: protocol.transport.loseConnection())


__all__ = ["ALIGNMENT", "TVM_CHUNK_SIZE", "TVMEngine"]
