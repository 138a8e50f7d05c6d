"""The environment of one session: work directory, handles, devices, arrays, modules.

A :class:`SessionEnvironment` is what a session protocol serves. It owns:

- a fresh work directory (:class:`WorkDirectory`) under a configurable root,
  removed when the session ends. Every path a client names is confined to
  it: absolute paths, ``..`` components and symlinks that lead out are
  refused with :class:`PathEscapeError` (a :class:`PermissionError`) naming
  the path;
- the handle table: integer ids for the functions, modules and arrays the
  client holds (and the ids of open streams, from the same counter);
- the built-in functions under TVM's names (``tvm.rpc.server.upload``,
  ``.download``, ``.remove``, ``.listdir``, ``.load_module``, ``.workpath``),
  then the global :class:`~tvm_rpc.server.registry.Registry`;
- an array backend: TVM tensors when TVM's runtime is importable (so compiled
  TVM functions take them directly), else numpy arrays, else
  :class:`PythonArray` (a bytearray with a shape and a dtype). The server
  needs none of numpy, cloudpickle or TVM;
- devices by TVM's numbering; ``cpu`` always exists, others only through
  TVM's runtime. A device type TVM does not number is refused with
  :class:`DeviceError` before TVM's runtime sees it (it would crash);
- the operator's limits (:class:`~tvm_rpc.server.limits.SessionSettings`):
  open streams, bytes uploads put in the work directory, and whether
  uploaded modules may be loaded at all (:meth:`SessionEnvironment.check_code_upload`).

It is plain synchronous Python: no reactor, no transport.
"""

import collections.abc
import importlib.util
import itertools
import math
import os
import re
import shutil
import sys
import tempfile
import time
import types

import attrs
from twisted.logger import Logger
from zope.interface import implementer

from ..protocol import values
from ..protocol.streams import (
    BytesSink,
    BytesSource,
    FileSink,
    FileSource,
    ISink,
    ISource,
    StreamError,
    StreamTable,
)
from ..protocol.values import ArrayRef, Device, Handle, HostArray
from .limits import SessionSettings, WorkDirQuota
from .registry import GLOBAL_REGISTRY, NoSuchFunction

log = Logger()


class PathEscapeError(PermissionError):
    """A path that would leave the session's work directory."""


class DeviceError(RuntimeError):
    """A device that does not exist, or that this server cannot drive."""


class TVMRuntimeMissing(RuntimeError):
    """A TVM-compiled library was loaded on a device without TVM's runtime."""


class HandleError(LookupError):
    """A handle id that is unknown, freed, or of another kind."""


class CodeUploadRefused(PermissionError):
    """A module uploaded in the session, on a server that runs only its own functions."""


_VALID_DEVICE_TYPES = ", ".join(f"{name}={number}" for name, number in values.DEVICE_TYPES.items())


def check_device(device):
    """
    Refuse a device type TVM does not number, before TVM's runtime sees it
    (its runtime crashes the process on an unknown device type).

    @param device: a L{Device}.
    @return: C{device}.
    @raise DeviceError: for an unknown device type, naming the valid ones.
    """
    if device.device_type not in values.DEVICE_NAMES:
        raise DeviceError(
            f"unknown device type {device.device_type}: valid device types are "
            f"{_VALID_DEVICE_TYPES}"
        )
    return device


_SEPARATORS = re.compile(r"[\\/]+")


@attrs.define(eq=False)
class WorkDirectory:
    """
    A session's work directory and the confinement of paths to it.

    @ivar root: the directory, as a canonical absolute path.
    """

    root: str = attrs.field(converter=os.path.realpath)

    @classmethod
    def create(cls, parent=None):
        """
        Make a fresh, private directory.

        @param parent: the directory to create it in (made if missing); the
            system's temporary directory when L{None}.
        @return: a L{WorkDirectory}.
        """
        if parent is not None:
            os.makedirs(parent, exist_ok=True)
        # The pid in the name lets the server remove what a worker that died
        # (crash, timeout kill) could not: see remove_work_dirs_of.
        return cls(tempfile.mkdtemp(prefix=f"session-{os.getpid()}-", dir=parent))

    def resolve(self, path):
        """
        Confine a client's path to the work directory.

        @param path: a relative path (C{""} and C{"."} name the directory).
        @return: the canonical absolute path inside the work directory.
        @raise PathEscapeError: for an absolute path, a C{..} component, a NUL
            byte, or a path that leads out through a symlink.
        @raise TypeError: when C{path} is not a string.
        """
        if not isinstance(path, str):
            raise TypeError(f"paths are strings, not {type(path).__name__}")
        if "\x00" in path:
            raise PathEscapeError(f"refused path {path!r}: it contains a NUL byte")
        if os.path.isabs(path) or path[:1] in ("/", "\\") or os.path.splitdrive(path)[0]:
            raise PathEscapeError(
                f"refused path {path!r}: absolute paths are not allowed; "
                "paths are relative to the session's work directory"
            )
        if ".." in _SEPARATORS.split(path):
            raise PathEscapeError(f"refused path {path!r}: '..' is not allowed")
        real = os.path.realpath(os.path.join(self.root, path))
        if real != self.root and not real.startswith(self.root + os.sep):
            raise PathEscapeError(
                f"refused path {path!r}: it leads out of the work directory (symlink)"
            )
        return real

    def remove(self):
        """Delete the directory and everything in it (errors are logged)."""

        if not os.path.isdir(self.root):
            return

        def failed(function, path, error):
            """Log a file that could not be removed."""
            log.warn("could not remove {path}: {error}", path=path, error=error)

        if sys.version_info >= (3, 12):
            shutil.rmtree(self.root, onexc=failed)
        else:
            shutil.rmtree(self.root, onerror=lambda function, path, info: failed(function, path, info[1]))


def remove_work_dirs_of(work_root, pid):
    """
    Remove the work directories that the process C{pid} created under
    C{work_root} (for a session worker that died without cleaning up).

    @return: the number of directories removed.
    """
    prefix = f"session-{int(pid)}-"
    removed = 0
    try:
        names = os.listdir(work_root)
    except FileNotFoundError:
        return 0
    for name in names:
        path = os.path.join(work_root, name)
        if name.startswith(prefix) and os.path.isdir(path) and not os.path.islink(path):
            WorkDirectory(path).remove()
            removed += 1
    return removed


@attrs.define(eq=False)
class PythonArray:
    """
    An array without numpy: raw C-order bytes with a shape, a dtype, a device.

    Functions of ``.py`` modules receive these when neither TVM nor numpy is
    installed on the device; C{memoryview(array.data).cast(fmt, shape)}
    gives typed access.
    """

    shape: tuple
    dtype: str
    data: bytearray
    device: Device = attrs.field(factory=lambda: Device(1, 0))

    @property
    def nbytes(self):
        """The size in bytes."""
        return len(self.data)


class PythonBackend:
    """Arrays as L{PythonArray}; only the cpu exists."""

    name = "python"

    def device(self, device):
        """@param device: a L{Device}. @return: the device object functions receive."""
        self._check(device)
        return device

    def _check(self, device):
        """@raise DeviceError: unless C{device} is the cpu."""
        if device.device_type != values.DEVICE_TYPES["cpu"]:
            raise DeviceError(
                f"device {device} is not available: only cpu exists on a server "
                "without TVM's runtime"
            )

    def exists(self, device):
        """@return: whether C{device} exists."""
        return device.device_type == values.DEVICE_TYPES["cpu"]

    def sync(self, device):
        """Wait for the device (nothing to wait for on the cpu)."""
        self._check(device)

    def to_wire_device(self, device):
        """@return: the L{Device} of a device object, or L{None} if it is not one."""
        return device if isinstance(device, Device) else None

    def is_array(self, value):
        """@return: whether C{value} is an array of this backend."""
        return isinstance(value, PythonArray)

    def empty(self, shape, dtype, device):
        """@return: a new zero-filled array."""
        self._check(device)
        return PythonArray(tuple(shape), dtype, bytearray(values.array_nbytes(shape, dtype)), device)

    def describe(self, array):
        """@return: C{(shape, dtype, Device)}."""
        return array.shape, array.dtype, array.device

    def host_bytes(self, array):
        """@return: the array's bytes in C order (a bytes-like, possibly a view)."""
        return memoryview(array.data)

    def writable_view(self, array):
        """@return: a writable byte view of the array, or L{None} when it has none."""
        return memoryview(array.data)

    def fill(self, array, data):
        """Copy C{data} (exactly the array's size) into the array."""
        array.data[:] = data

    def piecewise(self, array):
        """
        @return: whether the array can be written and read a byte range at a
            time with L{write_at} / L{read_at} (arrays without a host view,
            e.g. on a GPU); L{False} here, as every array has a host view.
        """
        return False


class NumpyBackend(PythonBackend):
    """Arrays as numpy arrays; only the cpu exists."""

    name = "numpy"

    def __init__(self):
        """Import numpy (raising L{ImportError} when it is missing)."""
        import numpy

        self._numpy = numpy

    def _dtype(self, dtype):
        """@return: the numpy dtype of C{dtype}. @raise DeviceError: when numpy has none."""
        values.dtype_itemsize(dtype)
        try:
            return self._numpy.dtype(dtype)
        except TypeError:
            raise DeviceError(f"dtype {dtype!r} needs TVM's runtime on this device") from None

    def is_array(self, value):
        """@return: whether C{value} is a numpy array."""
        return isinstance(value, self._numpy.ndarray)

    def empty(self, shape, dtype, device):
        """@return: a new zero-filled numpy array on the cpu."""
        self._check(device)
        return self._numpy.zeros(tuple(shape), dtype=self._dtype(dtype))

    def describe(self, array):
        """@return: C{(shape, dtype, Device)}."""
        return tuple(array.shape), str(array.dtype), Device(1, 0)

    def _bytes_view(self, array):
        """@return: a byte view of a C-contiguous array (no copy)."""
        return memoryview(array.reshape(-1).view(self._numpy.uint8))

    def host_bytes(self, array):
        """@return: the array's bytes in C order (a view when already contiguous)."""
        return self._bytes_view(self._numpy.ascontiguousarray(array))

    def writable_view(self, array):
        """@return: a writable byte view, or L{None} for a non-contiguous or read-only array."""
        if not array.flags["C_CONTIGUOUS"] or not array.flags["WRITEABLE"]:
            return None
        return self._bytes_view(array)

    def fill(self, array, data):
        """Copy C{data} into the array."""
        array[...] = self._numpy.frombuffer(data, dtype=array.dtype).reshape(array.shape)


class TVMBackend(PythonBackend):
    """Arrays as TVM tensors on any device TVM's runtime drives."""

    name = "tvm"

    def __init__(self):
        """Import TVM's runtime and numpy (raising L{ImportError} when missing)."""
        import numpy
        import tvm.runtime

        self._numpy = numpy
        self._runtime = tvm.runtime

    def device(self, device):
        """
        @return: TVM's device object for C{device}.
        @raise DeviceError: for a device type TVM does not number.
        """
        check_device(device)
        return self._runtime.device(device.device_type, device.index)

    def exists(self, device):
        """@return: whether TVM's runtime reports C{device} as present."""
        try:
            return bool(self.device(device).exist)
        except Exception:
            return False

    def _existing(self, device):
        """@return: TVM's device object. @raise DeviceError: when it does not exist."""
        tvm_device = self.device(device)
        if not tvm_device.exist:
            raise DeviceError(f"device {device} does not exist on this server")
        return tvm_device

    def sync(self, device):
        """Wait for the device's queued work."""
        self._existing(device).sync()

    def to_wire_device(self, device):
        """@return: the L{Device} of a TVM device object, or L{None}."""
        if isinstance(device, self._runtime.Device):
            return Device(device.dlpack_device_type(), device.index)
        return None

    def is_array(self, value):
        """@return: whether C{value} is a TVM tensor."""
        return isinstance(value, self._runtime.Tensor)

    def empty(self, shape, dtype, device):
        """@return: a new TVM tensor on C{device}. @raise DeviceError: when it does not exist."""
        values.dtype_itemsize(dtype)
        return self._runtime.empty(tuple(shape), dtype, self._existing(device))

    def describe(self, array):
        """@return: C{(shape, dtype, Device)}."""
        return tuple(array.shape), str(array.dtype), self.to_wire_device(array.device)

    def _host_view(self, array):
        """A numpy view of a cpu tensor's memory (DLPack, no copy), or L{None}."""
        if array.device.dlpack_device_type() != values.DEVICE_TYPES["cpu"]:
            return None
        try:
            view = self._numpy.from_dlpack(array)
        except Exception:
            return None
        return view if view.flags["C_CONTIGUOUS"] else None

    def host_bytes(self, array):
        """@return: the tensor's bytes in C order (a view for cpu tensors, else a copy)."""
        view = self._host_view(array)
        if view is None:
            view = self._numpy.ascontiguousarray(array.numpy())
        return memoryview(view.reshape(-1).view(self._numpy.uint8))

    def writable_view(self, array):
        """@return: a writable byte view of a cpu tensor, or L{None}."""
        view = self._host_view(array)
        if view is None or not view.flags["WRITEABLE"]:
            return None
        return memoryview(view.reshape(-1).view(self._numpy.uint8))

    def piecewise(self, array):
        """@return: whether byte-range views of the tensor can be made (TVM's C{_create_view})."""
        return hasattr(array, "_create_view")

    def _byte_range(self, array, offset, length):
        """A uint8 view of C{length} bytes at C{offset} of the tensor, on its device."""
        return array._create_view((length,), "uint8", relative_byte_offset=offset)

    def write_at(self, array, offset, data):
        """Copy C{data} into the tensor at byte C{offset} (any device, no staging)."""
        chunk = self._numpy.frombuffer(data, dtype=self._numpy.uint8)
        self._byte_range(array, offset, len(chunk)).copyfrom(chunk)

    def read_at(self, array, offset, length):
        """@return: C{length} bytes of the tensor at byte C{offset} (any device)."""
        return memoryview(self._byte_range(array, offset, length).numpy())

    def fill(self, array, data):
        """Copy C{data} into the tensor (any device)."""
        shape, dtype = tuple(array.shape), str(array.dtype)
        if "x" in dtype:
            raise DeviceError(f"cannot fill an array of dtype {dtype!r} from host bytes")
        # numpy has no bfloat16: TVM's copyfrom takes its bits as uint16.
        host_dtype = "uint16" if dtype == "bfloat16" else dtype
        array.copyfrom(self._numpy.frombuffer(data, dtype=host_dtype).reshape(shape))


_BACKENDS = {"tvm": TVMBackend, "numpy": NumpyBackend, "python": PythonBackend}
_chosen = {}


def tvm_runtime_available():
    """@return: whether TVM's runtime can be imported (without importing it)."""
    try:
        return importlib.util.find_spec("tvm") is not None
    except (ImportError, ValueError):
        return False


def select_backend(preference="auto"):
    """
    Choose (and import, once per process) an array backend.

    @param preference: C{"tvm"}, C{"numpy"}, C{"python"}, or C{"auto"} (the
        first of those that imports).
    @return: the backend object.
    @raise ImportError: when a named backend cannot be imported.
    @raise ValueError: for an unknown name.
    """
    if preference in _chosen:
        return _chosen[preference]
    if preference == "auto":
        for name in ("tvm", "numpy"):
            try:
                backend = select_backend(name)
                break
            except ImportError:
                continue
        else:
            backend = select_backend("python")
    elif preference in _BACKENDS:
        backend = _BACKENDS[preference]()
    else:
        raise ValueError(f"unknown array backend {preference!r}")
    _chosen[preference] = backend
    return backend


_module_counter = itertools.count(1)


@attrs.define(eq=False)
class PythonModule:
    """
    A ``.py`` file loaded in a session: its public functions are callable.

    @ivar path: the file it was loaded from.
    @ivar module: the Python module object.
    """

    path: str
    module: types.ModuleType

    @classmethod
    def load(cls, path):
        """
        Execute a ``.py`` file as a fresh module (a unique name, so two
        sessions or two loads never share state).

        @raise Exception: whatever the module raises while executing.
        """
        name = f"tvm_rpc_session_module_{next(_module_counter)}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return cls(path, module)

    def function_names(self):
        """@return: the names of the public functions, sorted."""
        return sorted(
            name
            for name, value in vars(self.module).items()
            if not name.startswith("_") and callable(value) and not isinstance(value, type)
        )

    def get_function(self, name, query_imports=False):
        """
        @return: the public callable C{name}.
        @raise NoSuchFunction: when the module has none.
        """
        function = None if name.startswith("_") else getattr(self.module, name, None)
        if function is None or not callable(function):
            raise NoSuchFunction(f"module {os.path.basename(self.path)} has no function {name!r}")
        return function

    def unload(self):
        """Forget the module."""
        sys.modules.pop(self.module.__name__, None)


_TVM_LIBRARY_SUFFIXES = (".so", ".tar", ".dylib", ".dll", ".o")


@attrs.define(eq=False)
class SessionEnvironment:
    """
    Everything one session holds; see the module docstring.

    @ivar work_dir: the session's L{WorkDirectory}.
    @ivar registry: the global functions (L{GLOBAL_REGISTRY} by default).
    @ivar backend_name: the array backend preference (see L{select_backend}).
    @ivar timer: the clock L{time_evaluator} measures with (seconds).
    @ivar settings: the operator's L{SessionSettings} (stream and work
        directory limits, code upload).
    """

    work_dir: WorkDirectory
    registry: object = GLOBAL_REGISTRY
    backend_name: str = "auto"
    timer: object = time.perf_counter
    settings: SessionSettings = attrs.field(factory=SessionSettings)
    _objects: dict = attrs.field(factory=dict)
    _ids: object = attrs.field(factory=lambda: itertools.count(1))
    streams: StreamTable = attrs.field(default=None)
    _backend: object = None
    _builtins: object = None
    _origins: dict = attrs.field(factory=dict)
    _quota: object = None
    closed: bool = False

    def __attrs_post_init__(self):
        """Share the id counter with the stream table; apply the limits."""
        if self.streams is None:
            self.streams = StreamTable(next_id=self.new_id,
                                       max_streams=self.settings.max_streams)
        self._quota = WorkDirQuota(self.work_dir.root, self.settings.max_work_dir_bytes)

    @classmethod
    def create(cls, work_root=None, registry=None, **kwargs):
        """
        Make an environment with a fresh work directory under C{work_root}.

        @param registry: the global functions (L{GLOBAL_REGISTRY} if L{None}).
        """
        return cls(
            WorkDirectory.create(work_root),
            GLOBAL_REGISTRY if registry is None else registry,
            **kwargs,
        )

    def new_id(self):
        """@return: a fresh id for a handle or a stream."""
        return next(self._ids)

    @property
    def backend(self):
        """The array backend, chosen on first use."""
        if self._backend is None:
            self._backend = select_backend(self.backend_name)
        return self._backend

    # -- handles ---------------------------------------------------------

    def add(self, value):
        """Keep C{value} in the handle table. @return: its new id."""
        handle = self.new_id()
        self._objects[handle] = value
        return handle

    def _kind(self, value):
        """@return: C{"module"}, C{"array"}, C{"function"} or C{"object"}."""
        if self._is_module(value):
            return "module"
        if callable(value):
            return "function"
        if self.backend.is_array(value):
            return "array"
        return "object"

    def get(self, handle, kind):
        """
        @param kind: C{"function"}, C{"module"} or C{"array"}.
        @return: the object of that kind under C{handle}.
        @raise HandleError: unknown or freed id, or another kind.
        """
        try:
            value = self._objects[handle]
        except KeyError:
            raise HandleError(f"no {kind} with handle {handle} in this session") from None
        actual = self._kind(value)
        if actual != kind:
            raise HandleError(f"handle {handle} is a {actual}, not a {kind}")
        return value

    def free(self, handles):
        """Drop handles (and streams) by id; unknown ids are ignored."""
        for handle in handles:
            self._origins.pop(handle, None)
            value = self._objects.pop(handle, None)
            if isinstance(value, PythonModule):
                value.unload()
            self.streams.close(handle)

    def __len__(self):
        """@return: the number of handles held."""
        return len(self._objects)

    def close(self):
        """End the session: drop every handle and stream, remove the work directory."""
        if self.closed:
            return
        self.closed = True
        self.streams.close_all()
        self.free(list(self._objects))
        self.work_dir.remove()

    # -- functions -------------------------------------------------------

    def builtins(self):
        """@return: the built-in functions by TVM's names."""
        if self._builtins is None:
            self._builtins = self._make_builtins()
        return self._builtins

    def _make_builtins(self):
        """@return: the built-ins, bound to this environment."""
        return {
            "tvm.rpc.server.upload": self.upload,
            "tvm.rpc.server.download": self.download,
            "tvm.rpc.server.remove": self.remove,
            "tvm.rpc.server.listdir": self.listdir,
            "tvm.rpc.server.load_module": self.load_module,
            "tvm.rpc.server.workpath": self.workpath,
            "tvm_rpc.server.list_functions": self.list_functions,
        }

    def lookup(self, name):
        """
        @return: the built-in or global function C{name}.
        @raise NoSuchFunction: when there is none.
        """
        builtin = self.builtins().get(name)
        if builtin is not None:
            return builtin
        return self.registry.get(name)

    def list_functions(self):
        """@return: the names of every built-in and global function."""
        return sorted(set(self.builtins()) | set(self.registry.names()))

    def call(self, function, args):
        """
        Call C{function} with arguments received from the wire.

        @param function: a callable (from L{lookup} or L{get}).
        @param args: a list of decoded values (handles, array references,
            host arrays and devices are turned into their objects).
        @return: the result, ready to encode (arrays, modules and functions
            are added to the handle table and returned as references).
        """
        return self.to_wire(self.invoke(function, args))

    def invoke(self, function, args):
        """
        Call C{function} with arguments received from the wire.

        @return: the function's own result, not yet converted (it may be a
            Deferred or a coroutine: the session waits for it, then calls
            L{to_wire}).
        """
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"call arguments must be a list, not {type(args).__name__}")
        return function(*[self.from_wire(arg) for arg in args])

    def from_wire(self, value, depth=0):
        """Turn a decoded value into what functions receive."""
        if isinstance(value, Handle):
            return self.get(value.id, value.kind)
        if isinstance(value, ArrayRef):
            return self.get(value.id, "array")
        if isinstance(value, HostArray):
            array = self.backend.empty(value.shape, value.dtype, Device(1, 0))
            self.backend.fill(array, value.data)
            return array
        if isinstance(value, Device):
            return self.backend.device(check_device(value))
        if isinstance(value, list):
            return [self.from_wire(item, depth + 1) for item in value]
        if isinstance(value, tuple):
            return tuple(self.from_wire(item, depth + 1) for item in value)
        if isinstance(value, dict):
            return {key: self.from_wire(item, depth + 1) for key, item in value.items()}
        return value

    def to_wire(self, value, depth=0):
        """
        Turn a function's result into an encodable value.

        @raise TypeError: for a value that cannot cross the wire.
        """
        if depth > values.MAX_DEPTH:
            raise TypeError("result nested too deeply to send")
        if value is None or isinstance(value, (bool, int, float, str, bytes)):
            if isinstance(value, str) and type(value) is not str:
                return str(value)
            if isinstance(value, int) and type(value) not in (int, bool):
                return int(value)
            return value
        if isinstance(value, (bytearray, memoryview)):
            return bytes(value)
        if isinstance(value, (Device, HostArray, ArrayRef, Handle)):
            return value
        # Plain containers first: only other objects need the array backend
        # (which may import TVM's runtime) to be told apart.
        if isinstance(value, list) or (isinstance(value, tuple) and type(value) is not tuple):
            return [self.to_wire(item, depth + 1) for item in value]
        if isinstance(value, tuple):
            return tuple(self.to_wire(item, depth + 1) for item in value)
        if isinstance(value, dict):
            return {self.to_wire(key, depth + 1): self.to_wire(item, depth + 1)
                    for key, item in value.items()}
        if self._is_module(value):
            return Handle("module", self.add(value))
        if self.backend.is_array(value):
            return self.array_ref(self.add(value))
        device = self.backend.to_wire_device(value)
        if device is not None:
            return device
        if isinstance(value, collections.abc.Mapping):
            return {self.to_wire(key, depth + 1): self.to_wire(item, depth + 1)
                    for key, item in value.items()}
        if isinstance(value, collections.abc.Sequence):
            return [self.to_wire(item, depth + 1) for item in value]
        item = getattr(value, "item", None)
        if callable(item) and type(value).__module__ == "numpy":
            return self.to_wire(item(), depth + 1)
        if callable(value):
            return Handle("function", self.add(value))
        raise TypeError(f"cannot send a {type(value).__module__}.{type(value).__qualname__} "
                        "back to the client")

    def _is_module(self, value):
        """@return: whether C{value} is a Python or TVM module."""
        if isinstance(value, PythonModule):
            return True
        runtime = sys.modules.get("tvm.runtime")
        return runtime is not None and isinstance(value, runtime.Module)

    def add_module_function(self, module, name, query_imports=False):
        """
        Add the function C{name} of a loaded module to the handle table,
        remembering where it came from (so L{time_evaluator} can use TVM's
        own timer for functions of TVM modules).

        @return: the new handle.
        """
        function = self.module_function(module, name, query_imports)
        handle = self.add(function)
        if not isinstance(module, PythonModule):
            self._origins[handle] = (module, name)
        return handle

    def origin(self, handle):
        """@return: C{(module, name)} of a TVM module function's handle, or L{None}."""
        return self._origins.get(handle)

    def module_function(self, module, name, query_imports=False):
        """@return: the function C{name} of a loaded module."""
        if isinstance(module, PythonModule):
            return module.get_function(name)
        try:
            return module.get_function(name, query_imports)
        except (AttributeError, RuntimeError) as e:
            raise NoSuchFunction(f"module has no function {name!r}: {e}") from None

    # -- files -----------------------------------------------------------

    def workpath(self, path=""):
        """C{tvm.rpc.server.workpath}: @return: the confined absolute path."""
        return self.work_dir.resolve(path)

    def upload(self, path, data):
        """
        C{tvm.rpc.server.upload}: write C{data} to C{path} (parents made).

        @raise WorkDirFull: when the work directory would pass its byte limit.
        """
        target = self._file_target(path)
        self._quota.measure()
        self._quota.charge(len(data), path)
        with open(target, "wb") as f:
            f.write(data)

    def _file_target(self, path):
        """@return: the confined path of a file to write (its parents made). @raise IsADirectoryError: for the work directory itself."""
        target = self.work_dir.resolve(path)
        if target == self.work_dir.root:
            raise IsADirectoryError(f"{path!r} is the work directory, not a file")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def download(self, path):
        """C{tvm.rpc.server.download}: @return: the bytes of C{path}."""
        with open(self.work_dir.resolve(path), "rb") as f:
            return f.read()

    def remove(self, path):
        """C{tvm.rpc.server.remove}: delete a file or a directory tree."""
        target = self.work_dir.resolve(path)
        if target == self.work_dir.root:
            raise PathEscapeError(f"refused to remove the work directory itself ({path!r})")
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        else:
            os.unlink(target)

    def listdir(self, path="."):
        """C{tvm.rpc.server.listdir}: @return: the sorted names in a directory."""
        return sorted(os.listdir(self.work_dir.resolve(path)))

    def open_upload(self, path, size=None):
        """
        @return: a stream id for a streamed upload to C{path}.
        @raise WorkDirFull: when the announced size would take the work
            directory past its byte limit (an upload of unknown size fails
            at the chunk that would).
        """
        if size is not None and size < 0:
            raise StreamError(f"negative upload size {size}")
        target = self._file_target(path)
        self._quota.measure()
        if size is None:
            return self.streams.open_sink(FileSink(target, charge=self._quota.charge))
        self._quota.charge(size, path)
        return self.streams.open_sink(FileSink(target, size))

    def open_download(self, path):
        """@return: C{(stream id, size)} for a streamed download of C{path}."""
        source = FileSource(self.work_dir.resolve(path))
        return self.streams.open_source(source), source.size

    def open_value(self, size):
        """@return: a stream id collecting an encoded value of C{size} bytes."""
        if not 0 <= size <= values.MAX_SIZE:
            raise StreamError(f"value size {size} outside 0..{values.MAX_SIZE}")
        return self.streams.open_sink(BytesSink(size, size))

    def open_result(self, encoded):
        """@return: a stream id serving a long encoded result."""
        return self.streams.open_source(BytesSource(encoded))

    # -- modules ---------------------------------------------------------

    def check_code_upload(self, path):
        """
        Refuse to load or link a module uploaded in the session when the
        server runs only its own functions (C{--no-code-upload}).

        @param path: the module's path, for the message.
        @raise CodeUploadRefused: unless the settings allow code upload.
        """
        if not self.settings.code_upload:
            raise CodeUploadRefused(
                f"refused to load {path!r}: this server does not run uploaded code "
                "(--no-code-upload); only its registered functions and --init modules run"
            )

    def load_module(self, path):
        """
        C{tvm.rpc.server.load_module}: load a ``.py`` file or a TVM library.

        @return: the module object (a L{PythonModule} or a TVM module).
        @raise CodeUploadRefused: when the server does not run uploaded code.
        @raise TVMRuntimeMissing: for a TVM library when TVM's runtime is not
            installed on this device.
        @raise ValueError: for another kind of file.
        """
        self.check_code_upload(path)
        target = self.work_dir.resolve(path)
        if not os.path.isfile(target):
            raise FileNotFoundError(f"no file {path!r} in the work directory")
        suffix = os.path.splitext(target)[1].lower()
        if suffix == ".py":
            return PythonModule.load(target)
        if suffix in _TVM_LIBRARY_SUFFIXES:
            try:
                import tvm.runtime
            except ImportError as e:
                raise TVMRuntimeMissing(
                    f"cannot load {path!r}: TVM's runtime is not installed on this device "
                    f"({e}); install apache-tvm on the device, or load a .py module"
                ) from None
            return tvm.runtime.load_module(target)
        raise ValueError(
            f"cannot load {path!r}: unsupported module type {suffix or '(none)'!r} "
            f"(use .py, or a TVM library: {', '.join(_TVM_LIBRARY_SUFFIXES)})"
        )

    # -- devices and arrays ----------------------------------------------

    def device_exists(self, device):
        """
        @return: whether C{device} (a L{Device}) exists here.
        @raise DeviceError: for a device type TVM does not number.
        """
        check_device(device)
        if device.device_type == values.DEVICE_TYPES["cpu"]:
            return True
        if self.backend.name != "tvm":
            return False
        return self.backend.exists(device)

    def device_sync(self, device):
        """Wait until C{device} has finished its queued work."""
        self.backend.sync(check_device(device))

    def empty(self, shape, dtype, device):
        """
        Allocate an array.

        @return: C{(handle, nbytes)}.
        @raise DeviceError: on a device this server cannot drive.
        """
        shape = tuple(shape)
        nbytes = values.array_nbytes(shape, dtype)
        array = self.backend.empty(shape, dtype, check_device(device))
        return self.add(array), nbytes

    def array_ref(self, handle):
        """@return: the L{ArrayRef} describing the array under C{handle}."""
        shape, dtype, device = self.backend.describe(self.get(handle, "array"))
        return ArrayRef(handle, shape, dtype, device)

    def open_array_write(self, handle):
        """@return: C{(stream id, nbytes)} for filling the array from host bytes."""
        array = self.get(handle, "array")
        ref = self.array_ref(handle)
        sink = ArraySink(self.backend, array, ref.nbytes)
        return self.streams.open_sink(sink), ref.nbytes

    def open_array_read(self, handle):
        """
        @return: C{(stream id, ArrayRef)} for copying the array to host: a
            view of its memory when it has a host view, else read a chunk at
            a time from its device (so a GPU tensor is never copied whole).
        """
        ref = self.array_ref(handle)
        array = self.get(handle, "array")
        if self.backend.writable_view(array) is None and self.backend.piecewise(array):
            source = PiecewiseArraySource(self.backend, array, ref.nbytes)
        else:
            source = BytesSource(self.backend.host_bytes(array))
        return self.streams.open_source(source), ref

    # -- timing ----------------------------------------------------------

    def time_evaluator(self, function, device, number, repeat, min_repeat_ms, args,
                       origin=None):
        """
        Time C{function(*args)} on the device: one warm-up call, then
        C{repeat} runs of C{number} calls each, the device synced around
        each run. When a run is shorter than C{min_repeat_ms}, C{number}
        grows and the run is redone.

        @param origin: C{(module, name)} when C{function} comes from a TVM
            module (see L{origin}): TVM's own C{time_evaluator} then times it
            natively, without Python's call overhead.
        @return: the mean seconds per call of each run.
        @raise ValueError: for C{number} or C{repeat} below 1 or a negative
            C{min_repeat_ms}.
        """
        if number < 1 or repeat < 1 or not min_repeat_ms >= 0:
            raise ValueError(
                f"time_evaluator needs number >= 1, repeat >= 1, min_repeat_ms >= 0; got "
                f"{number}, {repeat}, {min_repeat_ms}"
            )
        check_device(device)
        call_args = [self.from_wire(arg) for arg in args]
        if origin is not None and self.backend.name == "tvm":
            module, name = origin
            evaluator = module.time_evaluator(
                name, self.backend.device(device), number=number, repeat=repeat,
                min_repeat_ms=int(math.ceil(min_repeat_ms)),
            )
            return [float(seconds) for seconds in evaluator(*call_args).results]
        self.device_sync(device)
        function(*call_args)
        results = []
        for _ in range(repeat):
            while True:
                self.device_sync(device)
                start = self.timer()
                for _ in range(number):
                    function(*call_args)
                self.device_sync(device)
                elapsed = self.timer() - start
                if elapsed * 1000 >= min_repeat_ms or number >= 1 << 30:
                    break
                # As TVM does: aim straight at min_repeat_ms, growing at least 1.618x.
                wanted = number * 10 if elapsed <= 0 else number * min_repeat_ms / (elapsed * 1000)
                number = min(max(math.ceil(wanted), math.ceil(number * 1.618)), 1 << 30)
            results.append(elapsed / number)
        return results


@implementer(ISink)
@attrs.define(eq=False)
class ArraySink:
    """
    Fill an array from a write stream: straight into the array's memory when
    the backend exposes it (numpy, pure Python, TVM tensors on the cpu), else
    a chunk at a time onto its device (TVM tensors elsewhere), else into a
    host buffer copied to the array at the end.
    """

    backend: object
    array: object
    nbytes: int
    _view: object = None
    _buffer: object = None
    _piecewise: bool = False
    _offset: int = 0

    def __attrs_post_init__(self):
        """Choose how chunks reach the array (see the class docstring)."""
        self._view = self.backend.writable_view(self.array)
        if self._view is None:
            self._piecewise = self.backend.piecewise(self.array)
            if not self._piecewise:
                self._buffer = bytearray(self.nbytes)
                self._view = memoryview(self._buffer)

    def write(self, data):
        """Copy a chunk at the current offset. @raise StreamError: past the end."""
        end = self._offset + len(data)
        if end > self.nbytes:
            raise StreamError(f"array takes {self.nbytes} bytes; got more")
        if self._piecewise:
            if data:
                self.backend.write_at(self.array, self._offset, data)
        else:
            self._view[self._offset:end] = data
        self._offset = end

    def finish(self):
        """Check the size and move a host buffer into the array. @return: the size."""
        if self._offset != self.nbytes:
            raise StreamError(f"array takes {self.nbytes} bytes; got {self._offset}")
        if self._buffer is not None:
            self.backend.fill(self.array, self._buffer)
        self.cancel()
        return self.nbytes

    def cancel(self):
        """Drop the buffer (the array keeps what was written so far)."""
        self._view = None
        self._buffer = None


@implementer(ISource)
@attrs.define(eq=False)
class PiecewiseArraySource:
    """
    Serve an array without a host view (a tensor on a GPU, say) a chunk at a
    time, each copied from the device when asked for.
    """

    backend: object
    array: object
    size: int

    def read(self, offset, length):
        """@return: up to C{length} bytes at C{offset}."""
        length = max(0, min(length, self.size - offset))
        if not length:
            return b""
        return self.backend.read_at(self.array, offset, length)

    def close(self):
        """Drop the reference to the array."""
        self.array = None
