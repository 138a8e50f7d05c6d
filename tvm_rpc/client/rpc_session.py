"""
The user's session API: L{RPCSession}, with TVM's names and Deferreds.

L{RPCSession} is a facade: it turns the user's objects (remote functions,
modules, arrays and devices of L{tvm_rpc.client.remote}, host data) into
handle ids and wire values and back, and leaves the conversation with the
server to the L{ISessionEngine<tvm_rpc.client.engine.ISessionEngine>} under
it (L{AMPEngine<tvm_rpc.client.amp_engine.AMPEngine>} for our protocol).
Sessions are opened by L{tvm_rpc.client.session.start_session} (or
C{connect()} / C{TrackerSession.request()}).

Everything is asynchronous and single-threaded: many calls may be in flight
on one session, and many sessions may share one reactor. Every method that
talks to the server returns a L{Deferred<twisted.internet.defer.Deferred>}, so
callers may C{await} it or add callbacks. Remote exceptions arrive as
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} failures; the
session stays usable afterwards.
"""

import math
import weakref

import attrs
from twisted.internet.defer import Deferred, fail, succeed

from ..protocol import values
from ..protocol.evaluator_options import TIME_EVALUATOR_OPTIONS, check_time_evaluator
from ..protocol.session_commands import CHUNK_SIZE, WINDOW
from ..protocol.values import ArrayRef, Handle, HostArray
from .devices import Device, SessionDevices
from .engine import DEFAULT_MAX_RESULT_SIZE, ISessionEngine
from .host_arrays import host_array
from .located_engine import LocatedEngine
from .remote import RemoteArray, RemoteFunction, RemoteModule, TimeEvaluatorResult

#: Seconds close() waits for the server's goodbye before dropping the connection.
CLOSE_TIMEOUT = 5.0
#: Value types that cross the wire as they are (no remote objects inside).
_SCALARS = frozenset((type(None), bool, int, float, str, bytes))


#: The session's attributes that are its engine's transfer parameters.
_TRANSFER_PARAMETERS = ("chunk_size", "window", "max_result_size")


def _reconfigure(session, attribute, value):
    """
    Tell the engine that a transfer parameter of the session changed (attrs
    runs this on assignment after C{__init__}).

    @return: C{value}, the attribute's new value.
    """
    settings = {name: getattr(session, name) for name in _TRANSFER_PARAMETERS}
    settings[attribute.name] = value
    session._engine.configure(**settings)
    return value


def _locate_errors(session, attribute, value):
    """Name the new address in the session's remote errors from now on."""
    session._engine.address = value
    return value


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


@attrs.define(eq=False)
class RPCSession(SessionDevices):
    """
    A session on a remote device, with TVM's API and Deferreds.

    Made by L{start_session<tvm_rpc.client.session.start_session>} (or by
    C{connect()} / C{TrackerSession.request()}).
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

    _engine: ISessionEngine
    chunk_size: int = attrs.field(default=CHUNK_SIZE, on_setattr=_reconfigure)
    window: int = attrs.field(default=WINDOW, on_setattr=_reconfigure)
    server_implementation: str = ""
    address: "str | None" = attrs.field(default=None, on_setattr=_locate_errors)
    session_timeout: float = 0
    max_result_size: int = attrs.field(default=DEFAULT_MAX_RESULT_SIZE, on_setattr=_reconfigure)

    def __attrs_post_init__(self):
        self._engine = LocatedEngine(self._engine, self.address)
        self._engine.configure(self.chunk_size, self.window, self.max_result_size)
        weakref.finalize(self, self._engine.abandon).atexit = False

    # -- state -----------------------------------------------------------

    @property
    def closed(self):
        """Whether the session is over or closing (no new calls are sent)."""
        return self._engine.closed

    def when_closed(self):
        """@return: a Deferred firing with L{None} once the connection is gone."""
        return self._engine.when_closed()

    @property
    def protocol(self):
        """
        The session protocol spoken: C{"tvm_rpc"} with our server
        (L{OUR_PROTOCOL<tvm_rpc.protocol.flavour.OUR_PROTOCOL>}), C{"tvm"} with
        one of TVM's own (L{TVM_PROTOCOL<tvm_rpc.protocol.flavour.TVM_PROTOCOL>}).
        """
        return self._engine.protocol_name

    @property
    def connection(self):
        """The Twisted protocol object that carries the session (the engine's connection)."""
        return self._engine.connection

    def _release(self, handle):
        """Release C{handle} on the server soon (called by the remote objects' finalizers)."""
        self._engine.free(handle)

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
        if isinstance(value, values.DLDevice):
            return self._device(value)
        if isinstance(value, HostArray):
            try:
                return value.numpy()
            except (ImportError, values.CodecError, TypeError):
                return value
        items = _convert_items(value, self._from_wire)
        return value if items is None else items

    async def _wire_args(self, args):
        """@return: the wire values of C{args}, once their lazy functions are looked up."""
        for function in self._lazy_functions(list(args), []):
            await function.resolve()
        return [self._to_wire(arg) for arg in args]

    async def _target(self, function):
        """@return: C{(handle, name)} naming the callee, looking a lazy function up first."""
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
        return self._engine.get_function(name).addCallback(
            lambda handle: RemoteFunction(self, name, handle=handle))

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
                        self._own(function)
                        return self._engine.call(handle, None, list(args), self._from_wire)
            target = self._ready_target(function)
            if target is not None and not self._lazy_functions(args, []):
                return self._engine.call(*target, [self._to_wire(arg) for arg in args],
                                         self._from_wire)
        except Exception:
            return fail()
        return Deferred.fromCoroutine(self._call(function, args))

    def _ready_target(self, function):
        """
        @return: C{(handle, name)} naming the callee (one of them L{None}),
            or L{None} when it is a lazy function not looked up yet.
        """
        if isinstance(function, RemoteFunction):
            handle = self._own(function).handle
            return None if handle is None else (handle, None)
        if isinstance(function, str):
            return (None, function)
        raise TypeError(f"call a RemoteFunction or a global name, not {function!r}")

    async def _call(self, function, args):
        handle, name = await self._target(function)
        wire_args = await self._wire_args(args)
        return await self._engine.call(handle, name, wire_args, self._from_wire)

    def _module_function_handle(self, module, name, query_imports):
        """@return: a Deferred of the handle id of C{module}'s function C{name}."""
        return self._engine.module_function(self._own(module).handle, name, query_imports)

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
        return self._engine.upload(data, target)

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
        return self._engine.download(path, local_path)

    def remove(self, path):
        """@return: a Deferred firing once C{path} (a file or directory) is deleted."""
        return self.call("tvm.rpc.server.remove", path)

    def listdir(self, path="."):
        """
        @return: a Deferred of the sorted names in a directory of the work
            directory (TVM's C{apps/cpp_rpc} answers C{"a,b,"}: split; TVM's
            Python server has no listdir and fails with a L{RemoteError}
            saying so).
        """
        return self.call("tvm.rpc.server.listdir", path).addCallback(
            lambda names: sorted(filter(None, names.split(","))) if isinstance(names, str)
            else names)

    def workpath(self, path=""):
        """@return: a Deferred of the absolute path of C{path} on the server."""
        return self.call("tvm.rpc.server.workpath", path)

    def load_module(self, path):
        """
        Load a module from the work directory: a C{.py} file, or a TVM
        library (C{.so}, C{.tar}) when the server has TVM's runtime.

        @return: a Deferred of a L{RemoteModule}.
        """
        return self._engine.load_module(path).addCallback(
            lambda loaded: RemoteModule(self, loaded[0], loaded[1], path))

    def system_lib(self):
        """@return: a Deferred of the server's system library (TVM's C{ffi.SystemLib}) as a L{RemoteModule}."""
        return self.call("ffi.SystemLib")

    # -- devices ---------------------------------------------------------

    def _device_exists(self, device):
        return self._engine.device_exists(device.device_type, device.index)

    def _device_sync(self, device):
        return self._engine.device_sync(device.device_type, device.index)

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
        allocating = self._engine.empty(shape, dtype, device.device_type, device.index)
        return allocating.addCallback(
            lambda handle: RemoteArray(self, handle, shape, dtype, device))

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

    def _write_array(self, array, data):
        return self._engine.write_array(self._own(array).handle, data, array)

    def _read_array(self, array):
        """@return: a Deferred of the raw bytes of C{array}."""
        try:
            handle = self._own(array).handle
        except ValueError:
            return fail()
        return self._engine.read_array(handle)

    # -- timing ----------------------------------------------------------

    def time_evaluator(self, func_or_name, device, number=10, repeat=1, min_repeat_ms=0,
                       limit_zero_time_iterations=100, cooldown_interval_ms=0,
                       repeats_to_cooldown=1, cache_flush_bytes=0, f_preproc=""):
        """
        Make an evaluator that times a function on the device, excluding
        the network (TVM's C{time_evaluator}, with its options).

        @param func_or_name: a L{RemoteFunction}, or a global function name.
        @param device: the device to sync around each repeat.
        @param number: calls per repeat (grown to last C{min_repeat_ms}).
        @param repeat: repeats; each gives one result.
        @param min_repeat_ms: the shortest duration of one repeat.
        @param limit_zero_time_iterations: how many runs of one repeat may
            measure zero time before that repeat gives up growing C{number}
            (TVM's option).
        @param cooldown_interval_ms: milliseconds to sleep after every
            C{repeats_to_cooldown}-th repeat (TVM's option).
        @param repeats_to_cooldown: repeats between two cooldowns (TVM's option).
        @param cache_flush_bytes: bytes copied on the device before each run
            to flush its cache (TVM's option).
        @param f_preproc: the name of a server function called with the
            arguments before each repeat, e.g.
            C{"cache_flush_cpu_non_first_arg"} (TVM's option).
        @return: a callable; C{evaluator(*args)} returns a Deferred of a
            L{TimeEvaluatorResult} (C{mean}, C{median}, C{min}, C{max},
            C{std}, C{results}, in seconds).
        @raise ValueError: naming every bad parameter (see
            L{check_time_evaluator<tvm_rpc.protocol.evaluator_options.check_time_evaluator>}).
        """
        options = {
            "limit_zero_time_iterations": limit_zero_time_iterations,
            "cooldown_interval_ms": cooldown_interval_ms,
            "repeats_to_cooldown": repeats_to_cooldown,
            "cache_flush_bytes": cache_flush_bytes,
            "f_preproc": f_preproc,
        }
        options = check_time_evaluator(
            number, repeat, min_repeat_ms,
            None if options == TIME_EVALUATOR_OPTIONS else options)
        device = self._device(device)
        if not isinstance(func_or_name, (RemoteFunction, str)):
            raise TypeError(f"time a RemoteFunction or a global name, not {func_or_name!r}")

        def evaluator(*args):
            """@return: a Deferred of the L{TimeEvaluatorResult} for C{args}."""
            return Deferred.fromCoroutine(
                self._time(func_or_name, device, number, repeat, min_repeat_ms, options, args))

        return evaluator

    async def _time(self, function, device, number, repeat, min_repeat_ms, options, args):
        handle, name = await self._target(function)
        wire_args = await self._wire_args(args)
        results = await self._engine.time_evaluator(
            handle, name, wire_args, device.device_type, device.index, number, repeat,
            min_repeat_ms, options)
        return TimeEvaluatorResult(results)

    # -- closing ---------------------------------------------------------

    def close(self, timeout=CLOSE_TIMEOUT):
        """
        End the session: ask the server to finish, then close the
        connection; after C{timeout} seconds without an answer the
        connection is dropped. Idempotent.

        @return: a Deferred firing with L{None} once the connection is gone.
        """
        return self._engine.close(timeout)

    def __aenter__(self):
        """C{async with session:} gives the session itself."""
        return succeed(self)

    def __aexit__(self, exc_type, exc_value, traceback):
        """Leaving C{async with} closes the session (and lets exceptions through)."""
        return self.close().addCallback(lambda _: False)


__all__ = ["CLOSE_TIMEOUT", "RPCSession"]
