"""The environment of one session: handles, functions, files, modules, arrays, streams.

A L{SessionEnvironment} is what a session protocol serves; its methods are the
session's verbs. It holds:

  - a fresh work directory (L{WorkDirectory<tvm_rpc.server.workdir.WorkDirectory>})
    under a configurable root, removed when the session ends; every path a
    client names is confined to it;
  - the handle table: integer ids for the functions, modules and arrays the
    client holds (and the ids of open streams, from the same counter);
  - the built-in functions under TVM's names (C{tvm.rpc.server.upload},
    C{.download}, C{.remove}, C{.listdir}, C{.load_module}, C{.workpath}),
    then the global L{Registry<tvm_rpc.server.registry.Registry>}, then
    TVM's global functions when the arrays are TVM's
    (L{tvm_rpc.server.tvm_globals});
  - the session's open streams: the C{open_*} verbs open them over files,
    arrays and long values, the C{stream_*} verbs move their chunks;
  - an array backend (L{tvm_rpc.server.backends}): TVM tensors when TVM's
    runtime is importable, else numpy arrays, else pure-Python arrays;
  - modules loaded in the session (L{tvm_rpc.server.modules}) and
    C{time_evaluator} (L{tvm_rpc.server.timing});
  - the operator's limits (L{SessionSettings<tvm_rpc.server.limits.SessionSettings>}):
    open streams, bytes uploads put in the work directory, and whether
    uploaded modules may be loaded at all (L{SessionEnvironment.check_code_upload}).

How arguments and results are converted on their way in and out is
L{tvm_rpc.server.wire_values}; the errors are in L{tvm_rpc.server.errors}.
It is plain synchronous Python: no reactor, no transport.
"""

import itertools
import os
import time

import attrs

from ..protocol import values
from ..protocol.stream_table import BytesSink, BytesSource, StreamTable
from ..protocol.streams import StreamError
from ..protocol.values import ArrayRef
from . import modules, timing, tvm_globals, wire_values
from .array_streams import ArraySink, PiecewiseArraySource
from .backends import check_device, select_backend
from .errors import HandleError, code_upload_refused
from .limits import SessionSettings, WorkDirQuota
from .modules import PythonModule
from .registry import GLOBAL_REGISTRY
from .workdir import FileSink, FileSource, WorkDirectory


@attrs.define(eq=False)
class SessionEnvironment:
    """
    Everything one session holds; see the module docstring.

    @ivar work_dir: the session's L{WorkDirectory}.
    @ivar registry: the global functions (L{GLOBAL_REGISTRY} by default).
    @ivar backend_name: the array backend preference (see L{select_backend}).
    @ivar timer: the clock L{time_evaluator} measures with (seconds).
    @ivar sleep: how L{time_evaluator} waits out a cooldown (seconds).
    @ivar settings: the operator's L{SessionSettings} (stream and work
        directory limits, code upload).
    @ivar streams: the session's open streams (a L{StreamTable}, made from
        the settings when not given); the C{open_*} and C{stream_*} verbs
        act on it.
    """

    work_dir: WorkDirectory
    registry: object = GLOBAL_REGISTRY
    backend_name: str = "auto"
    timer: object = time.perf_counter
    sleep: object = time.sleep
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
        if modules.is_module(value):
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
        @return: the function C{name}: a built-in, else one of the registry,
            else, when the session's arrays are TVM's, one of TVM's global
            functions (see L{tvm_globals.lookup}: a code loader refuses under
            C{--no-code-upload}).
        @raise NoSuchFunction: when there is none.
        """
        builtin = self.builtins().get(name)
        if builtin is not None:
            return builtin
        if name not in self.registry:
            function = tvm_globals.lookup(name, self.backend, self.settings)
            if function is not None:
                return function
        return self.registry.get(name)

    def list_functions(self, include_tvm=False):
        """
        @param include_tvm: whether to list TVM's global functions too (over
            2000 names), which sessions whose arrays are TVM's can call.
        @return: the names of every built-in and registered function, sorted.
        """
        names = set(self.builtins()) | set(self.registry.names())
        if include_tvm:
            names.update(tvm_globals.names(self.backend))
        return sorted(names)

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

    def from_wire(self, value):
        """Turn a decoded value into what functions receive (see L{wire_values.from_wire})."""
        return wire_values.from_wire(self, value)

    def to_wire(self, value):
        """
        Turn a function's result into an encodable value (see
        L{wire_values.to_wire}).

        @raise TypeError: for a value that cannot cross the wire.
        """
        return wire_values.to_wire(self, value)

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

    def module_function(self, module, name, query_imports=False):
        """@return: the function C{name} of a loaded module (see L{modules.module_function})."""
        return modules.module_function(module, name, query_imports)

    def origin(self, handle):
        """@return: C{(module, name)} of a TVM module function's handle, or L{None}."""
        return self._origins.get(handle)

    # -- files -----------------------------------------------------------

    def workpath(self, path=""):
        """C{tvm.rpc.server.workpath}: @return: the confined absolute path."""
        return self.work_dir.resolve(path)

    def upload(self, path, data):
        """
        C{tvm.rpc.server.upload}: write C{data} to C{path} (parents made).

        @raise WorkDirFull: when the work directory would pass its byte limit.
        """
        target = self.work_dir.file_target(path)
        self._quota.measure()
        self._quota.charge(len(data), path)
        with open(target, "wb") as f:
            f.write(data)

    def download(self, path):
        """C{tvm.rpc.server.download}: @return: the bytes of C{path}."""
        return self.work_dir.read(path)

    def remove(self, path):
        """
        C{tvm.rpc.server.remove}: delete a file or a directory tree, as
        leniently as TVM's servers: a missing path is no error, and the work
        directory itself (C{""}, C{"."}, which MetaSchedule's clean-up
        removes) stays, as the session owns it; a path that leaves the work
        directory is refused.
        """
        target = self.work_dir.resolve(path)
        if target != self.work_dir.root and os.path.lexists(target):
            self.work_dir.delete(path)

    def listdir(self, path="."):
        """C{tvm.rpc.server.listdir}: @return: the sorted names in a directory."""
        return self.work_dir.listdir(path)

    def open_upload(self, path, size=None):
        """
        @return: a stream id for a streamed upload to C{path}.
        @raise WorkDirFull: when the announced size would take the work
            directory past its byte limit (an upload of unknown size fails
            at the chunk that would).
        """
        if size is not None and size < 0:
            raise StreamError(f"negative upload size {size}")
        target = self.work_dir.file_target(path)
        self._quota.measure()
        if size is None:
            return self.streams.open_sink(FileSink(target, charge=self._quota.charge))
        self._quota.charge(size, path)
        return self.streams.open_sink(FileSink(target, size))

    def open_download(self, path):
        """@return: C{(stream id, size)} for a streamed download of C{path}."""
        source = FileSource(self.work_dir.existing_file(path))
        return self.streams.open_source(source), source.size

    def open_value(self, size):
        """@return: a stream id collecting an encoded value of C{size} bytes."""
        if not 0 <= size <= values.MAX_SIZE:
            raise StreamError(f"value size {size} outside 0..{values.MAX_SIZE}")
        return self.streams.open_sink(BytesSink(size, size))

    def open_result(self, encoded):
        """@return: a stream id serving a long encoded result."""
        return self.streams.open_source(BytesSource(encoded))

    # -- streams ---------------------------------------------------------

    def stream_write(self, stream, data):
        """Pass a chunk to a write stream (see L{StreamTable.write})."""
        return self.streams.write(stream, data)

    def stream_finish(self, stream):
        """End a write stream (see L{StreamTable.finish}). @return: the bytes it received."""
        return self.streams.finish(stream)

    def stream_read(self, stream, offset, length):
        """@return: up to C{length} bytes at C{offset} (see L{StreamTable.read})."""
        return self.streams.read(stream, offset, length)

    def stream_close(self, stream):
        """Cancel a write stream or release a read stream; unknown ids are ignored."""
        self.streams.close(stream)

    def take_value(self, stream):
        """@return: the bytes of a finished value stream, which is then gone (see L{open_value})."""
        return self.streams.take_finished(stream)

    # -- modules ---------------------------------------------------------

    def check_code_upload(self, path):
        """
        Refuse to load or link a module uploaded in the session when the
        server runs only its own functions (C{--no-code-upload}).

        @param path: the module's path, for the message.
        @raise CodeUploadRefused: unless the settings allow code upload.
        """
        if not self.settings.code_upload:
            raise code_upload_refused(f"load {path!r}")

    def load_module(self, path):
        """
        C{tvm.rpc.server.load_module}: load a C{.py} file or a TVM library.

        @return: the module object (a L{PythonModule} or a TVM module).
        @raise CodeUploadRefused: when the server does not run uploaded code.
        @raise TVMRuntimeMissing: for a TVM library when TVM's runtime is not
            installed on this device.
        @raise ValueError: for another kind of file.
        """
        self.check_code_upload(path)
        return modules.load_module(self.work_dir.existing_file(path), path)

    # -- devices and arrays ----------------------------------------------

    def device_exists(self, device):
        """
        @return: whether C{device} (a L{DLDevice<tvm_rpc.protocol.values.DLDevice>}) exists here.
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
                       origin=None, options=None):
        """
        Time C{function(*args)} on the device (see
        L{tvm_rpc.server.timing.time_evaluator}).

        @param args: the arguments as received from the wire.
        @param origin: C{(module, name)} when C{function} comes from a TVM
            module (see L{origin}): TVM's own C{time_evaluator} then times it
            natively, without Python's call overhead — unless C{f_preproc}
            names one of this session's functions, which only the Python
            timer can call.
        @param options: TVM's other options by name (defaults when missing).
        @return: the mean seconds per call of each run.
        @raise ValueError: naming every bad parameter, or for an
            C{f_preproc} that names no function.
        """
        options = timing.check_parameters(number, repeat, min_repeat_ms, options)
        check_device(device)
        preproc = None
        if options["f_preproc"]:
            preproc, is_session_function = self._preproc(options["f_preproc"])
            if is_session_function:
                origin = None
        call_args = [self.from_wire(arg) for arg in args]
        return timing.time_evaluator(function, call_args, device, number, repeat, min_repeat_ms,
                                     options, backend=self.backend, timer=self.timer,
                                     origin=origin, preproc=preproc, sleep=self.sleep)

    def _preproc(self, name):
        """
        @return: the function C{name} for C{f_preproc}, and whether it is
            one of the session's (a built-in or registered function) rather
            than one of TVM's globals.
        @raise ValueError: when neither has it.
        """
        if name in self.builtins() or name in self.registry:
            return self.lookup(name), True
        try:
            import tvm
        except ImportError:
            tvm = None
        found = None if tvm is None else tvm.get_global_func(name, allow_missing=True)
        if found is None:
            raise ValueError(
                f"time_evaluator's f_preproc names no function on this server: {name!r} is "
                f"neither a registered function nor one of TVM's globals"
                + ("" if tvm is not None else " (TVM's runtime is not installed here)"))
        return found, False
