"""Client-side proxies for the things a session holds on the device.

Each object here stands for something that lives on the server of one
L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>}:

  - L{RemoteFunction}: a function handle; calling it returns a Deferred
    of the result;
  - L{RemoteModule}: a loaded module (a C{.py} file or a TVM library);
  - L{RemoteArray}: an array in device memory, filled from and read back
    to the host in chunks.

L{TimeEvaluatorResult} holds the timings of a C{time_evaluator} run. Devices
are in L{tvm_rpc.client.devices}; host data is described by
L{host_array<tvm_rpc.client.host_arrays.host_array>} and read back by
L{unpack<tvm_rpc.client.host_arrays.unpack>} (both importable from here too,
as documented).

Handles are released on the server (the C{Free} command) when the object is
closed with C{close()} or garbage-collected, best-effort; everything a
session holds is released when the session ends anyway.
"""

import statistics
import weakref

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from ..protocol import values
from ..protocol.values import HostArray
from .devices import Device
from .host_arrays import host_array, unpack


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

    def time_evaluator(self, name, device, number=10, repeat=1, min_repeat_ms=0, **options):
        """
        As L{RPCSession.time_evaluator<tvm_rpc.client.rpc_session.RPCSession.time_evaluator>}
        for the module's function C{name} (TVM's options by keyword).
        """
        return self.session.time_evaluator(self[name], device, number, repeat, min_repeat_ms,
                                           **options)

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
    "RemoteArray",
    "RemoteFunction",
    "RemoteModule",
    "TimeEvaluatorResult",
    "host_array",
    "unpack",
]
