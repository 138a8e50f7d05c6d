"""Client-side proxies for the things a session holds on the device.

Each object here stands for something that lives on the server of one
L{RPCSession<tvm_rpc.client.session.RPCSession>}:

- L{RemoteFunction}: a function handle; calling it returns a Deferred
  of the result;
- L{RemoteModule}: a loaded module (a C{.py} file or a TVM library);
- L{RemoteArray}: an array in device memory, filled from and read back
  to the host in chunks;
- L{Device}: a device by TVM's numbering, bound to the session.

L{TimeEvaluatorResult} holds the timings of a C{time_evaluator} run.

Handles are released on the server (the C{Free} command) when the object is
closed with C{close()} or garbage-collected, best-effort; everything a
session holds is released when the session ends anyway.

The host-side array helpers (L{host_array}) accept numpy arrays when
numpy is installed, and otherwise C{bytes}/C{bytearray}/C{memoryview},
L{array.array} and (nested) lists of numbers with a dtype, so the
client works without numpy.
"""

import array as _array
import math
import statistics
import struct
import sys
import weakref

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from ..protocol import values
from ..protocol.values import CodecError, HostArray, dtype_itemsize

#: TVM's device names, including its older aliases, to device type numbers.
DEVICE_ALIASES = {
    **values.DEVICE_TYPES,
    "llvm": 1,
    "stackvm": 1,
    "c": 1,
    "gpu": 2,
    "nvptx": 2,
    "cl": 4,
    "mtl": 8,
    "mps": 8,
    "wgpu": 15,
}

#: struct format letters (little-endian) of the dtypes packable without numpy.
_STRUCT_FORMATS = {
    "bool": "?",
    "int8": "b",
    "uint8": "B",
    "int16": "h",
    "uint16": "H",
    "int32": "i",
    "uint32": "I",
    "int64": "q",
    "uint64": "Q",
    "float16": "e",
    "float32": "f",
    "float64": "d",
}

#: dtype of each array.array type code, by item size where C types vary.
_TYPECODE_KINDS = {
    "b": "int", "B": "uint", "h": "int", "H": "uint", "i": "int", "I": "uint",
    "l": "int", "L": "uint", "q": "int", "Q": "uint", "f": "float", "d": "float",
}


def _numpy():
    """@return: the numpy module, or L{None} when it is not installed."""
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def resolve_device_type(dev_type):
    """
    @param dev_type: TVM's device type number, or a name (C{"cpu"},
        C{"cuda"}, C{"cl"}, ...), optionally with an index (C{"cuda:1"}).
    @return: C{(device_type, index or None)}.
    @raise ValueError: for an unknown name or a bad number.
    """
    if isinstance(dev_type, bool):
        raise ValueError(f"bad device type {dev_type!r}")
    if isinstance(dev_type, int):
        if not 0 < dev_type < 1 << 31:
            raise ValueError(f"bad device type number {dev_type}")
        return dev_type, None
    if isinstance(dev_type, str):
        name, _, index = dev_type.strip().partition(":")
        if name not in DEVICE_ALIASES:
            raise ValueError(
                f"unknown device type {dev_type!r}; known: {', '.join(sorted(DEVICE_ALIASES))}"
            )
        if index:
            try:
                return DEVICE_ALIASES[name], int(index)
            except ValueError:
                raise ValueError(f"bad device index in {dev_type!r}") from None
        return DEVICE_ALIASES[name], None
    raise ValueError(f"a device type is a name or a number, not {type(dev_type).__name__}")


@attrs.frozen(eq=False)
class Device:
    """
    A device of the remote end, by TVM's numbering (cpu=1, cuda=2, ...).

    Pass it wherever a device is expected (C{empty}, C{array},
    C{time_evaluator}, function arguments).

    @ivar session: the L{RPCSession<tvm_rpc.client.session.RPCSession>}.
    @ivar device_type: TVM's device type number.
    @ivar index: the device index.
    """

    session: object = attrs.field(repr=False)
    device_type: int
    index: int = 0

    @property
    def name(self):
        """TVM's name of the device type (C{"cpu"}, C{"cuda"}, ...)."""
        return values.DEVICE_NAMES.get(self.device_type, f"device{self.device_type}")

    def to_wire(self):
        """@return: the L{tvm_rpc.protocol.values.Device} the codec carries."""
        return values.Device(self.device_type, self.index)

    def exists(self):
        """@return: a Deferred firing with whether the device exists on the server."""
        return self.session._device_exists(self)

    def sync(self):
        """@return: a Deferred firing once the device finished its queued work."""
        return self.session._device_sync(self)

    def __eq__(self, other):
        if isinstance(other, Device):
            return (other.session, other.device_type, other.index) == (
                self.session, self.device_type, self.index)
        return NotImplemented

    def __hash__(self):
        return hash((id(self.session), self.device_type, self.index))

    def __str__(self):
        return f"remote {self.name}({self.index})"


@attrs.frozen
class TimeEvaluatorResult:
    """
    Timings of a C{time_evaluator} run, in seconds, as TVM's
    C{BenchmarkResult}: each element of L{results} is the mean time of one
    call over one repeat (C{number} calls).

    @ivar results: the per-repeat seconds, a tuple.
    """

    results: tuple = attrs.field(converter=tuple)

    def __attrs_post_init__(self):
        if not self.results:
            raise ValueError("a time_evaluator result needs at least one timing")

    @property
    def mean(self):
        """The mean of L{results}."""
        return statistics.fmean(self.results)

    @property
    def median(self):
        """The median of L{results}."""
        return statistics.median(self.results)

    @property
    def min(self):
        """The smallest of L{results}."""
        return min(self.results)

    @property
    def max(self):
        """The largest of L{results}."""
        return max(self.results)

    @property
    def std(self):
        """The population standard deviation of L{results} (numpy's C{std})."""
        return statistics.pstdev(self.results)

    def __str__(self):
        return (
            "Execution time summary:\n"
            f"{'mean (ms)':^12} {'median (ms)':^12} {'max (ms)':^12} "
            f"{'min (ms)':^12} {'std (ms)':^12}\n"
            f"{self.mean * 1000:^12.4f} {self.median * 1000:^12.4f} "
            f"{self.max * 1000:^12.4f} {self.min * 1000:^12.4f} {self.std * 1000:^12.4f}"
        )


# -- host arrays ---------------------------------------------------------


def _nested_shape(value):
    """@return: the shape of a rectangular nesting of lists/tuples of numbers."""
    shape = []
    while isinstance(value, (list, tuple)):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return tuple(shape)


def _flatten(value, shape, depth=0):
    """Yield the numbers of a nested list, checking it is rectangular."""
    if depth == len(shape):
        if isinstance(value, (list, tuple)):
            raise ValueError("ragged nested list: cannot make an array of it")
        yield value
        return
    if not isinstance(value, (list, tuple)) or len(value) != shape[depth]:
        raise ValueError("ragged nested list: cannot make an array of it")
    for item in value:
        yield from _flatten(item, shape, depth + 1)


def _infer_dtype(items):
    """Pick a dtype for plain Python numbers as numpy would (bool, int64, float64)."""
    if items and all(isinstance(item, bool) for item in items):
        return "bool"
    if all(isinstance(item, int) for item in items):
        return "int64"
    return "float64"


def _pack(items, dtype):
    """@return: the little-endian C-order bytes of C{items} as C{dtype}."""
    code = _STRUCT_FORMATS.get(dtype)
    if code is None:
        raise ValueError(
            f"dtype {dtype!r} needs numpy (or pass raw bytes); without numpy the client "
            f"packs {', '.join(_STRUCT_FORMATS)}"
        )
    try:
        return struct.pack(f"<{len(items)}{code}", *items)
    except struct.error as e:
        raise ValueError(f"cannot pack values as {dtype}: {e}") from None


def unpack(data, shape, dtype):
    """
    Turn C-order little-endian bytes into nested lists of Python numbers
    (no numpy needed).

    @raise ValueError: for a dtype struct cannot unpack or a size mismatch.
    """
    code = _STRUCT_FORMATS.get(dtype)
    if code is None:
        raise ValueError(f"cannot unpack dtype {dtype!r} without numpy")
    count = math.prod(shape)
    if len(data) != count * dtype_itemsize(dtype):
        raise ValueError(f"{len(data)} bytes do not hold {shape} {dtype}")
    flat = list(struct.unpack(f"<{count}{code}", data))
    for dim in reversed(shape[1:]):
        flat = [flat[start:start + dim] for start in range(0, len(flat), dim)]
    if not shape:
        return flat[0]
    return flat


def host_array(source, dtype=None, shape=None):
    """
    Describe host data as an array: shape, dtype and raw C-order
    little-endian bytes.

    @param source: a numpy array (or anything numpy turns into one, when
        numpy is installed); a L{HostArray}; C{bytes}/C{bytearray}/
        C{memoryview} (C{dtype} defaults to C{"uint8"}); an
        L{array.array}; a number or a (nested) list of numbers (C{dtype}
        defaults to numpy's choice: bool, int64 or float64).
    @param dtype: TVM's dtype string to convert to, or L{None} to keep the
        source's.
    @param shape: for flat sources (bytes, array.array), the shape to give
        the data; its size must match.
    @return: a L{HostArray}.
    @raise ValueError: when the data does not fit the dtype or shape.
    """
    numpy = _numpy()
    if isinstance(source, HostArray):
        if dtype is not None and dtype != source.dtype:
            raise ValueError(f"cannot convert a raw {source.dtype} array to {dtype}")
        return source if shape is None else HostArray(shape, source.dtype, source.data)
    if numpy is not None and isinstance(source, numpy.ndarray):
        array = source if dtype is None else source.astype(dtype, copy=False)
        if shape is not None:
            array = array.reshape(shape)
        if array.dtype.byteorder == ">" or (
            array.dtype.byteorder == "=" and sys.byteorder == "big"
        ):
            array = array.astype(array.dtype.newbyteorder("<"))
        array = numpy.ascontiguousarray(array)
        return HostArray(array.shape, str(array.dtype), array.tobytes())
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        dtype = dtype or "uint8"
        itemsize = dtype_itemsize(dtype)
        if len(data) % itemsize:
            raise ValueError(f"{len(data)} bytes are not a whole number of {dtype} items")
        return _shaped(data, dtype, shape, len(data) // itemsize)
    if isinstance(source, _array.array):
        kind = _TYPECODE_KINDS.get(source.typecode)
        if kind is None:
            raise ValueError(f"array.array type code {source.typecode!r} is not numeric")
        own = f"{kind}{source.itemsize * 8}"
        if dtype is not None and dtype != own:
            return host_array(source.tolist(), dtype, shape)
        if sys.byteorder == "big":
            source = _array.array(source.typecode, source)
            source.byteswap()
        return _shaped(source.tobytes(), own, shape, len(source))
    if numpy is not None:
        try:
            array = numpy.asarray(source, dtype=dtype)
        except (TypeError, ValueError) as e:
            raise ValueError(f"cannot make an array of {type(source).__name__}: {e}") from None
        if array.dtype == object:
            raise ValueError(f"cannot make an array of {type(source).__name__}")
        return host_array(array, None, shape)
    if isinstance(source, (int, float, list, tuple)):
        nested_shape = _nested_shape(source)
        items = list(_flatten(source, nested_shape))
        for item in items:
            if not isinstance(item, (int, float)):
                raise ValueError(f"cannot make an array of {type(item).__name__}")
        dtype = dtype or _infer_dtype(items)
        data = _pack(items, dtype)
        return _shaped(data, dtype, shape or nested_shape, len(items))
    raise ValueError(f"cannot make an array of {type(source).__name__}")


def _shaped(data, dtype, shape, count):
    shape = (count,) if shape is None else tuple(shape)
    if math.prod(shape) != count:
        raise ValueError(f"{count} items do not fit shape {shape}")
    try:
        return HostArray(shape, dtype, data)
    except CodecError as e:
        raise ValueError(str(e)) from None


# -- handles -------------------------------------------------------------


def _release_on_collect(owner, session, handle):
    """
    Release C{handle} on the server when C{owner} is garbage-collected.

    @return: the L{weakref.finalize} (call it to release now).
    """
    finalizer = weakref.finalize(owner, session._release, handle)
    finalizer.atexit = False
    return finalizer


@attrs.define(eq=False)
class RemoteFunction:
    """
    A function on the server; C{f(*args)} returns a Deferred of its result.

    Arguments may be None, bool, int, float, str, bytes, lists, tuples,
    dicts, numpy arrays (sent inline), L{RemoteArray}, L{RemoteFunction},
    L{RemoteModule} and L{Device}. Results come back the same way: remote
    arrays as L{RemoteArray}, functions as L{RemoteFunction}, modules as
    L{RemoteModule}, small host arrays as numpy arrays (or
    L{HostArray<tvm_rpc.protocol.values.HostArray>} without numpy).

    A function obtained from C{module[name]} is lazy: its handle is looked up
    on first use (a lookup error fails that call, and the next call tries
    again).

    @ivar session: the owning session.
    @ivar name: the function's name, for messages.
    """

    session: object = attrs.field(repr=False)
    name: str
    _handle: "int | None" = attrs.field(default=None, alias="handle")
    _resolver: object = attrs.field(default=None, repr=False, alias="resolver")
    _waiters: "list | None" = attrs.field(default=None, init=False, repr=False)
    _finalizer: object = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self):
        if self._handle is not None:
            self._finalizer = _release_on_collect(self, self.session, self._handle)
        elif self._resolver is None:
            raise ValueError("a RemoteFunction needs a handle or a resolver")

    @property
    def handle(self):
        """The handle id on the server, or L{None} while not looked up yet."""
        return self._handle

    def resolve(self):
        """
        @return: a Deferred firing with the handle id, looking it up first
            when the function is lazy (concurrent callers share one lookup).
        """
        if self._handle is not None:
            return succeed(self._handle)
        waiter = Deferred()
        if self._waiters is None:
            self._waiters = [waiter]
            Deferred.fromCoroutine(self._resolve())
        else:
            self._waiters.append(waiter)
        return waiter

    async def _resolve(self):
        """Look the handle up and tell every waiter; never fails itself."""
        try:
            handle = await self._resolver()
        except BaseException:
            outcome = Failure()
        else:
            self._handle = handle
            self._finalizer = _release_on_collect(self, self.session, handle)
            outcome = handle
        waiters, self._waiters = self._waiters, None
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    def __call__(self, *args):
        """@return: a Deferred of the result of calling the function with C{args}."""
        return self.session._call_function(self, args)

    @property
    def closed(self):
        """Whether the handle was released (by L{close} or garbage collection)."""
        return self._finalizer is not None and not self._finalizer.alive

    def close(self):
        """Release the function's handle on the server (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()


@attrs.define(eq=False)
class RemoteModule:
    """
    A module loaded on the server (C{.py} or a TVM library).

    C{module.get_function(name)} returns a Deferred of a L{RemoteFunction};
    C{module[name]} returns a lazy L{RemoteFunction} at once (looked up on its
    first call), like TVM's C{module["name"]}.

    @ivar session: the owning session.
    @ivar handle: the module's handle id.
    @ivar kind: C{"python"} or C{"tvm"} (as the server says).
    @ivar path: the path it was loaded from, when known.
    """

    session: object = attrs.field(repr=False)
    handle: int
    kind: str = "python"
    path: "str | None" = None
    _finalizer: object = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self):
        self._finalizer = _release_on_collect(self, self.session, self.handle)

    def get_function(self, name, query_imports=False):
        """
        @param name: the function's name in the module.
        @param query_imports: also search the module's imports (TVM modules).
        @return: a Deferred of a L{RemoteFunction}; fails with
            L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} when the
            module has no such function.
        """
        return Deferred.fromCoroutine(self._get_function(name, query_imports))

    async def _get_function(self, name, query_imports):
        handle = await self.session._module_function_handle(self, name, query_imports)
        return RemoteFunction(self.session, name, handle=handle)

    def __getitem__(self, name):
        """@return: a lazy L{RemoteFunction} for C{name} (see the class docstring)."""
        return RemoteFunction(
            self.session, name,
            resolver=lambda: self.session._module_function_handle(self, name, False),
        )

    def time_evaluator(self, name, device, number=10, repeat=1, min_repeat_ms=0):
        """
        As L{RPCSession.time_evaluator<tvm_rpc.client.session.RPCSession.time_evaluator>}
        for the module's function C{name}.
        """
        return self.session.time_evaluator(self[name], device, number, repeat, min_repeat_ms)

    @property
    def closed(self):
        """Whether the handle was released (by L{close} or garbage collection)."""
        return self._finalizer is not None and not self._finalizer.alive

    def close(self):
        """Release the module's handle on the server (idempotent)."""
        self._finalizer()


@attrs.define(eq=False)
class RemoteArray:
    """
    An array in the memory of a remote device.

    Fill it with C{copyfrom(host)}; read it back with C{read()} (raw bytes),
    C{numpy()} (needs numpy) or C{tolist()} (pure Python). Transfers move in
    chunks with a bounded window, so a big array never sits whole in one
    message.

    @ivar session: the owning session.
    @ivar handle: the array's handle id.
    @ivar shape: its shape, a tuple.
    @ivar dtype: TVM's dtype string.
    @ivar device: the L{Device} holding it.
    """

    session: object = attrs.field(repr=False)
    handle: int
    shape: tuple = attrs.field(converter=tuple)
    dtype: str
    device: Device
    _finalizer: object = attrs.field(default=None, init=False, repr=False)

    def __attrs_post_init__(self):
        self._finalizer = _release_on_collect(self, self.session, self.handle)

    @property
    def nbytes(self):
        """The array's size in bytes."""
        return values.array_nbytes(self.shape, self.dtype)

    def to_wire(self):
        """@return: the L{ArrayRef<tvm_rpc.protocol.values.ArrayRef>} naming it."""
        return values.ArrayRef(self.handle, self.shape, self.dtype, self.device.to_wire())

    def copyfrom(self, source):
        """
        Overwrite the array with host data.

        @param source: anything L{host_array} accepts; converted to this
            array's dtype; its size must match (and its shape, when it has
            one of more than one dimension).
        @return: a Deferred firing with this array once the data is on the
            device; cancelling it stops the transfer.
        @raise ValueError: (in the Deferred) when the data does not fit.
        """
        return Deferred.fromCoroutine(self.session._copy_to_array(self, source))

    def read(self):
        """@return: a Deferred of the array's raw C-order bytes."""
        return self.session._read_array(self)

    def numpy(self):
        """@return: a Deferred of a numpy array holding a copy of the data (needs numpy)."""
        return self.read().addCallback(
            lambda data: HostArray(self.shape, self.dtype, data).numpy())

    def tolist(self):
        """@return: a Deferred of the data as nested lists of Python numbers."""
        return self.read().addCallback(unpack, self.shape, self.dtype)

    @property
    def closed(self):
        """Whether the handle was released (by L{close} or garbage collection)."""
        return self._finalizer is not None and not self._finalizer.alive

    def close(self):
        """Release the array on the server (idempotent)."""
        self._finalizer()


__all__ = [
    "DEVICE_ALIASES",
    "Device",
    "RemoteArray",
    "RemoteFunction",
    "RemoteModule",
    "TimeEvaluatorResult",
    "host_array",
    "resolve_device_type",
    "unpack",
]
