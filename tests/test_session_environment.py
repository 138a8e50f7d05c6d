"""The session environment: confinement, files, handles, modules, arrays, timing."""

import os
import shutil
import sys
import tempfile
import types

import pytest
from hypothesis import given, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from hypothesis import strategies as st

from tvm_rpc.protocol import values
from tvm_rpc.protocol.streams import StreamError
from tvm_rpc.protocol.values import ArrayRef, DLDevice, Handle, HostArray
from tvm_rpc.server import register_func
from tvm_rpc.server.backends import NumpyBackend, PythonArray, PythonBackend, select_backend
from tvm_rpc.server.environment import SessionEnvironment
from tvm_rpc.server.errors import DeviceError, HandleError, PathEscapeError, TVMRuntimeMissing
from tvm_rpc.server.modules import PythonModule
from tvm_rpc.server.workdir import WorkDirectory
from tvm_rpc.server.registry import GLOBAL_REGISTRY, NoSuchFunction, Registry


pytestmark = pytest.mark.unit


@pytest.fixture
def root():
    """A temporary root for work directories, removed afterwards."""
    directory = tempfile.mkdtemp()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(params=["python", "numpy"])
def env(request, root):
    """An environment per array backend, closed afterwards."""
    registry = Registry()
    registry.register("add", lambda a, b: a + b)
    environment = SessionEnvironment.create(root, registry, backend_name=request.param)
    yield environment
    environment.close()


segments = st.sampled_from(["a", "b", "..", ".", "", "c.txt", "~", "x\\..", "\\", "C:", "\x00"])
paths = st.lists(segments, max_size=6).map("/".join) | st.text(max_size=20)


@given(paths)
def test_confinement_property(path):
    """Every path resolves inside the work directory or is refused."""
    work = WorkDirectory(_shared_root())
    try:
        resolved = work.resolve(path)
    except PathEscapeError as e:
        assert repr(path) in str(e)
        return
    assert resolved == work.root or resolved.startswith(work.root + os.sep)
    assert ".." not in path.replace("\\", "/").split("/")
    assert not os.path.isabs(path)


_SHARED = []


def _shared_root():
    """
    A work directory built once for the property tests::

        base/outside/            a directory outside the work directory
        base/work/sub/           a real subdirectory
        base/work/in -> sub      a symlink that stays inside
        base/work/out -> outside a symlink that leads out
        base/work/up -> ..       a relative symlink that leads out
        base/work/sub/back -> .. a symlink to the work directory itself
    """
    if not _SHARED:
        base = tempfile.mkdtemp()
        _SHARED.append(base)
        work = os.path.join(base, "work")
        os.makedirs(os.path.join(work, "sub"))
        os.makedirs(os.path.join(base, "outside"))
        os.symlink("sub", os.path.join(work, "in"))
        os.symlink(os.path.join(base, "outside"), os.path.join(work, "out"))
        os.symlink("..", os.path.join(work, "up"))
        os.symlink("..", os.path.join(work, "sub", "back"))
    return os.path.join(_SHARED[0], "work")


link_segments = st.sampled_from(["sub", "in", "out", "up", "back", "..", ".", "", "f"])
link_paths = st.lists(link_segments, min_size=1, max_size=5).map("/".join)


@given(link_paths)
def test_symlink_confinement_property(path):
    """Through any mix of symlinks, a resolved path stays inside, or it is refused."""
    work = WorkDirectory(_shared_root())
    parts = path.split("/")
    try:
        resolved = work.resolve(path)
    except PathEscapeError as e:
        assert repr(path) in str(e)
        return
    assert resolved == work.root or resolved.startswith(work.root + os.sep)
    assert "out" not in parts[:1] and "up" not in parts[:1]


def teardown_module():
    """Remove the shared directory of the property test."""
    for directory in _SHARED:
        shutil.rmtree(directory, ignore_errors=True)


def test_escapes_refused(root):
    """Absolute paths, '..' and symlinks out are refused with the path named."""
    work = WorkDirectory.create(root)
    outside = tempfile.mkdtemp(dir=root)
    os.symlink(outside, os.path.join(work.root, "out"))
    os.symlink(os.path.join(work.root, "sub"), os.path.join(work.root, "in"))
    os.makedirs(os.path.join(work.root, "sub"))
    for bad in ("/etc/passwd", "../x", "a/../../x", "a/..", "out", "out/file", "\\abs", "nul\x00"):
        with pytest.raises(PermissionError, match="refused path"):
            work.resolve(bad)
    assert work.resolve("in/f") == os.path.join(work.root, "sub", "f")
    assert work.resolve("") == work.root == work.resolve(".")
    with pytest.raises(TypeError):
        work.resolve(b"bytes")
    work.remove()
    assert not os.path.exists(work.root)
    assert os.path.isdir(outside)


def test_remove_work_dirs_of(root):
    """A dead worker's work directories are found by pid and removed; others stay."""
    from tvm_rpc.server.workdir import remove_work_dirs_of

    mine = WorkDirectory.create(root)
    assert os.path.basename(mine.root).startswith(f"session-{os.getpid()}-")
    with open(os.path.join(mine.root, "f"), "w") as f:
        f.write("x")
    other = os.path.join(root, "session-1-abc")
    os.makedirs(other)
    assert remove_work_dirs_of(root, os.getpid()) == 1
    assert os.listdir(root) == ["session-1-abc"]
    assert remove_work_dirs_of(os.path.join(root, "missing"), 1) == 0


def test_files(env):
    """The TVM-named built-ins upload, download, list and remove files."""
    call = env.lookup
    call("tvm.rpc.server.upload")("dir/sub/f.bin", b"abc")
    assert call("tvm.rpc.server.download")("dir/sub/f.bin") == b"abc"
    assert call("tvm.rpc.server.listdir")("dir") == ["sub"]
    assert call("tvm.rpc.server.listdir")() == ["dir"]
    assert call("tvm.rpc.server.workpath")("dir") == os.path.join(env.work_dir.root, "dir")
    call("tvm.rpc.server.remove")("dir")
    assert call("tvm.rpc.server.listdir")(".") == []
    # TVM's leniency: a missing path is no error; the work directory stays.
    call("tvm.rpc.server.remove")("missing")
    call("tvm.rpc.server.remove")(".")
    call("tvm.rpc.server.remove")("")
    assert os.path.isdir(env.work_dir.root)
    with pytest.raises(PermissionError):
        call("tvm.rpc.server.remove")("../elsewhere")
    with pytest.raises(PermissionError):
        call("tvm.rpc.server.upload")("../f", b"")
    with pytest.raises(FileNotFoundError):
        call("tvm.rpc.server.download")("missing")
    with pytest.raises(IsADirectoryError):
        call("tvm.rpc.server.upload")("", b"")


def test_streamed_upload_and_cancel(env):
    """Uploads stream into place; a cancelled one leaves nothing."""
    stream = env.open_upload("u/x.bin", 6)
    env.streams.write(stream, b"abc")
    env.streams.write(stream, b"def")
    assert env.streams.finish(stream) == 6
    assert env.download("u/x.bin") == b"abcdef"
    stream = env.open_upload("u/y.bin")
    env.streams.write(stream, b"partial")
    env.free([stream])
    assert env.listdir("u") == ["x.bin"]
    stream, size = env.open_download("u/x.bin")
    assert (size, env.streams.read(stream, 0, 100)) == (6, b"abcdef")
    with pytest.raises(PermissionError):
        env.open_upload("/tmp/evil")
    with pytest.raises(StreamError):
        env.open_upload("n", -1)


def test_handles(env):
    """Handles have kinds, can be freed, and all go when the session closes."""
    function = env.add(env.lookup("add"))
    assert env.get(function, "function")(1, 2) == 3
    with pytest.raises(HandleError, match="is a function, not a module"):
        env.get(function, "module")
    env.free([function, 12345])
    with pytest.raises(HandleError, match="no function"):
        env.get(function, "function")
    stream = env.open_value(3)
    env.close()
    assert stream not in env.streams
    assert len(env) == 0
    assert not os.path.exists(env.work_dir.root)


def test_lookup(env):
    """Built-ins come first, then the registry; unknown names fail clearly."""
    assert "tvm.rpc.server.upload" in env.list_functions()
    assert "add" in env.list_functions()
    with pytest.raises(NoSuchFunction, match="'missing'"):
        env.lookup("missing")


MODULE_SOURCE = '''
import math

state = []

def scale(array, factor):
    """Multiply a float32 array in place (any backend)."""
    if hasattr(array, "data") and isinstance(array.data, bytearray):
        view = memoryview(array.data).cast("f")
        for i in range(len(view)):
            view[i] *= factor
    else:
        array *= factor
    return array

def hypot(a, b):
    return math.hypot(a, b)

def remember(x):
    state.append(x)
    return len(state)

def _private():
    return 1
'''


def test_python_module(env):
    """A .py module's public functions are callable; private ones are not."""
    env.upload("m.py", MODULE_SOURCE.encode())
    module = env.load_module("m.py")
    assert isinstance(module, PythonModule)
    assert module.function_names() == ["hypot", "remember", "scale"]
    assert env.module_function(module, "hypot")(3, 4) == 5.0
    with pytest.raises(NoSuchFunction):
        env.module_function(module, "_private")
    with pytest.raises(NoSuchFunction):
        env.module_function(module, "math")
    other = env.load_module("m.py")
    env.module_function(module, "remember")(1)
    assert env.module_function(other, "remember")(1) == 1
    handle = env.to_wire(module)
    assert isinstance(handle, Handle) and handle.kind == "module"
    name = module.module.__name__
    env.free([handle.id])
    assert name not in sys.modules


def test_module_errors(env, monkeypatch):
    """Broken modules raise their error; TVM libraries need TVM's runtime; other files fail."""
    env.upload("broken.py", b"raise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        env.load_module("broken.py")
    env.upload("lib.so", b"\x7fELF not really")
    monkeypatch.setitem(sys.modules, "tvm", None)
    monkeypatch.delitem(sys.modules, "tvm.runtime", raising=False)
    with pytest.raises(TVMRuntimeMissing, match="TVM's runtime is not installed"):
        env.load_module("lib.so")
    env.upload("data.txt", b"")
    with pytest.raises(ValueError, match="unsupported module type"):
        env.load_module("data.txt")
    with pytest.raises(FileNotFoundError):
        env.load_module("none.py")
    with pytest.raises(PermissionError):
        env.load_module("../x.py")


def test_arrays(env):
    """Arrays are allocated, filled by stream, passed by handle and read back."""
    handle, nbytes = env.empty((2, 3), "float32", DLDevice(1, 0))
    assert nbytes == 24
    data = values.HostArray((6,), "float32", bytes(range(24))).data
    stream, size = env.open_array_write(handle)
    assert size == 24
    env.streams.write(stream, data[:10])
    env.streams.write(stream, data[10:])
    assert env.streams.finish(stream) == 24
    stream, ref = env.open_array_read(handle)
    assert ref == ArrayRef(handle, (2, 3), "float32", DLDevice(1, 0))
    assert env.streams.read(stream, 0, 100) == data
    too_long = env.open_array_write(handle)[0]
    with pytest.raises(StreamError):
        env.streams.write(too_long, b"x" * 25)
    short = env.open_array_write(handle)[0]
    env.streams.write(short, b"x")
    with pytest.raises(StreamError):
        env.streams.finish(short)


def test_calls_convert_values(env):
    """Calls take handles, host arrays and devices, and return references."""
    env.upload("m.py", MODULE_SOURCE.encode())
    module = env.to_wire(env.load_module("m.py"))
    scale = env.to_wire(env.module_function(env.get(module.id, "module"), "scale"))
    assert isinstance(scale, Handle) and scale.kind == "function"
    host = HostArray.from_numpy(__import__("numpy").arange(4, dtype="float32"))
    result = env.call(env.get(scale.id, "function"), [host, 2.0])
    assert isinstance(result, ArrayRef) and result.shape == (4,)
    stream, _ = env.open_array_read(result.id)
    assert env.streams.read(stream, 0, 100) == HostArray.from_numpy(
        __import__("numpy").arange(4, dtype="float32") * 2).data
    again = env.call(env.get(scale.id, "function"), [result, 0.5])
    assert env.get(again.id, "array") is env.get(result.id, "array")
    assert env.call(lambda d: d, [DLDevice(1, 0)]) == DLDevice(1, 0)
    assert env.call(lambda: {"k": [1, (2, b"x")]}, []) == {"k": [1, (2, b"x")]}
    assert env.call(lambda: range(3), []) == [0, 1, 2]
    assert env.call(lambda: types.MappingProxyType({"a": 1}), []) == {"a": 1}
    with pytest.raises(TypeError, match="cannot send"):
        env.call(lambda: object(), [])
    with pytest.raises(TypeError, match="must be a list"):
        env.call(lambda: 1, "abc")
    with pytest.raises(DeviceError):
        env.call(lambda d: d, [DLDevice(2, 0)])


def test_numpy_results():
    """numpy scalars come back as Python numbers."""
    import numpy

    environment = SessionEnvironment(WorkDirectory(tempfile.mkdtemp()), Registry(),
                                     backend_name="numpy")
    try:
        assert environment.to_wire(numpy.float32(1.5)) == 1.5
        assert type(environment.to_wire(numpy.int64(3))) is int
        assert environment.to_wire(numpy.bool_(True)) is True
    finally:
        environment.close()


def test_devices(env):
    """cpu always exists; others need TVM's runtime."""
    assert env.device_exists(DLDevice(1, 0))
    assert not env.device_exists(DLDevice(2, 0))
    env.device_sync(DLDevice(1, 0))
    with pytest.raises(DeviceError, match="only cpu"):
        env.empty((1,), "float32", DLDevice(2, 0))
    with pytest.raises(values.CodecError):
        env.empty((1,), "complex64", DLDevice(1, 0))


def test_python_backend_directly():
    """The pure-Python backend holds bytes with a shape and a dtype."""
    backend = PythonBackend()
    array = backend.empty((2, 2), "int16", DLDevice(1, 0))
    assert isinstance(array, PythonArray) and array.nbytes == 8
    backend.fill(array, b"12345678")
    assert bytes(backend.host_bytes(array)) == b"12345678"
    assert backend.describe(array) == ((2, 2), "int16", DLDevice(1, 0))
    assert not backend.is_array(b"x")


def test_select_backend():
    """Backends are chosen by name; unknown names fail."""
    assert select_backend("python").name == "python"
    assert isinstance(select_backend("numpy"), NumpyBackend)
    with pytest.raises(ValueError):
        select_backend("fortran")


class FakeTimer:
    """A timer that advances only when the timed function runs."""

    def __init__(self):
        """Start at time zero."""
        self.now = 0.0

    def __call__(self):
        """@return: the current fake time."""
        return self.now


def test_time_evaluator(env):
    """Per-repeat means come from the injected timer; min_repeat_ms grows number."""
    timer = FakeTimer()
    env.timer = timer
    calls = []

    def work(cost):
        """Advance the fake time by C{cost}."""
        calls.append(cost)
        timer.now += cost

    results = env.time_evaluator(work, DLDevice(1, 0), 3, 2, 0, [0.001])
    assert results == pytest.approx([0.001, 0.001])
    assert len(calls) == 1 + 3 * 2
    calls.clear()
    results = env.time_evaluator(work, DLDevice(1, 0), 1, 1, 10, [0.001])
    assert results == pytest.approx([0.001])
    assert len(calls) > 10
    for bad in ((0, 1, 0), (1, 0, 0), (1, 1, -1)):
        with pytest.raises(ValueError):
            env.time_evaluator(work, DLDevice(1, 0), *bad, [0.001])


def test_registry():
    """register_func works as a call, a decorator and a bare decorator."""
    registry = Registry()
    registry.register("a", len)

    @registry.register("b")
    def b():
        """A decorated function."""
        return "b"

    @registry.register
    def c():
        """A function registered under its own name."""
        return "c"

    assert registry.names() == ["a", "b", "c"]
    assert registry.get("b")() == "b"
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a", len)
    registry.register("a", str, override=True)
    assert registry.get("a") is str
    with pytest.raises(TypeError):
        registry.register("x", 3)
    with pytest.raises(TypeError):
        registry.register("", len)
    registry.unregister("a")
    with pytest.raises(NoSuchFunction):
        registry.get("a")

    @register_func("test_session_environment.global")
    def global_function():
        """A function in the process-wide registry."""
        return 1

    try:
        assert GLOBAL_REGISTRY.get("test_session_environment.global") is global_function
    finally:
        GLOBAL_REGISTRY.unregister("test_session_environment.global")


class HandleMachine(RuleBasedStateMachine):
    """Handles and streams of one environment against a simple model."""

    def __init__(self):
        """A fresh environment on the pure-Python backend, and an empty model."""
        super().__init__()
        self.root = tempfile.mkdtemp()
        self.env = SessionEnvironment.create(self.root, Registry(), backend_name="python")
        self.model = {}
        self.issued = set()

    def _issue(self, handle, kind):
        """Record a new id, which must never have been issued before."""
        assert handle not in self.issued
        self.issued.add(handle)
        self.model[handle] = kind

    @rule()
    def add_function(self):
        """A function handle."""
        self._issue(self.env.add(len), "function")

    @rule(size=st.integers(0, 16))
    def add_array(self, size):
        """An array handle."""
        handle, nbytes = self.env.empty((size,), "uint8", DLDevice(1, 0))
        assert nbytes == size
        self._issue(handle, "array")

    @rule(size=st.integers(0, 16))
    def open_stream(self, size):
        """A value stream (streams share the id space)."""
        self._issue(self.env.open_value(size), "stream")

    @rule(data=st.data())
    def free(self, data):
        """Free a held id, or one never issued."""
        handle = data.draw(st.sampled_from(sorted(self.model) or [0]) | st.integers(0, 1000))
        self.env.free([handle])
        self.model.pop(handle, None)

    @rule(data=st.data(), kind=st.sampled_from(["function", "array", "module"]))
    def get(self, data, kind):
        """A lookup succeeds exactly for a held id of the same kind."""
        handle = data.draw(st.sampled_from(sorted(self.issued) or [0]))
        if self.model.get(handle) == kind:
            assert self.env.get(handle, kind) is not None
        elif self.model.get(handle) == "stream":
            assert handle in self.env.streams
        else:
            with pytest.raises(HandleError):
                self.env.get(handle, kind)

    @invariant()
    def counts_match(self):
        """The environment holds what the model holds."""
        held = sum(1 for kind in self.model.values() if kind != "stream")
        assert len(self.env) == held
        assert len(self.env.streams) == len(self.model) - held

    def teardown(self):
        """Closing drops everything and removes the work directory."""
        self.env.close()
        assert len(self.env) == 0 and len(self.env.streams) == 0
        assert not os.path.exists(self.env.work_dir.root)
        shutil.rmtree(self.root, ignore_errors=True)


TestHandles = HandleMachine.TestCase
TestHandles.settings = settings(max_examples=30, stateful_step_count=20, deadline=None)


@pytest.mark.parametrize("name", ["python", "numpy", "tvm"])
def test_backends_provide_the_interface(name):
    """Every array backend that imports here provides IArrayBackend."""
    from zope.interface.verify import verifyObject

    from tvm_rpc.server.backends import IArrayBackend

    try:
        backend = select_backend(name)
    except ImportError:
        pytest.skip(f"the {name} backend does not import here")
    assert verifyObject(IArrayBackend, backend)


def test_errors_keep_their_wire_names():
    """The session's errors reach clients under the names they always had (a remote
    error's type name is the exception's module and qualified name)."""
    from tvm_rpc.server import errors

    for kind in (errors.PathEscapeError, errors.DeviceError, errors.TVMRuntimeMissing,
                 errors.HandleError, errors.CodeUploadRefused):
        assert f"{kind.__module__}.{kind.__qualname__}" == (
            f"tvm_rpc.server.environment.{kind.__name__}")
