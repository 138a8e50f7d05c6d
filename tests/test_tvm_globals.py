"""TVM's global functions in sessions of our protocol, and the code loaders --no-code-upload closes.

Over a fake TVM registry: the real one is driven in test_interop_tvm_globals.py.
"""

import shutil
import tempfile

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_rpc.server import tvm_globals
from tvm_rpc.server.environment import SessionEnvironment
from tvm_rpc.server.errors import CodeUploadRefused, PathEscapeError
from tvm_rpc.server.limits import SessionSettings
from tvm_rpc.server.registry import NoSuchFunction, Registry
from tvm_rpc.server.tvm_globals import CODE_LOADERS, code_loaders, loader_reason

pytestmark = pytest.mark.unit

PREFIXES = sorted(pattern for pattern in CODE_LOADERS if pattern.endswith("."))
EXACT = sorted(pattern for pattern in CODE_LOADERS if not pattern.endswith("."))


@attrs.define
class FakeTVMRegistry:
    """A TVM global function table in a dict (the interface of L{tvm_globals.TVMRegistry})."""

    functions: dict = attrs.field(factory=dict)

    def names(self):
        return list(self.functions)

    def get(self, name):
        return self.functions.get(name)

    def override(self, name, function):
        self.functions[name] = function


@attrs.frozen
class FakeBackend:
    """An array backend reduced to its name (all that the lookup consults)."""

    name: str


def loaded(path, kind="so"):
    return ("loaded", path, kind)


def fake_table():
    return FakeTVMRegistry({
        "ffi.Module.load_from_file.so": loaded,
        "ffi.ModuleLoadFromFile": loaded,
        "rpc.PopenSession": loaded,
        "runtime.LoadParamsFromFile": loaded,
        "tvm.contrib.random.uniform": lambda low, high: (low + high) / 2,
        "shadowed": lambda: "tvm's",
    })


@given(st.sampled_from(PREFIXES), st.text(max_size=20))
def test_prefixes_cover_every_format(prefix, suffix):
    """A loader added later under a known prefix (a new file format) is covered."""
    assert loader_reason(prefix + suffix) == CODE_LOADERS[prefix]


@given(st.text(max_size=40))
def test_other_names_are_not_loaders(name):
    """Only the listed names and the names under the listed prefixes are loaders."""
    listed = name in EXACT or any(name.startswith(prefix) for prefix in PREFIXES)
    assert (loader_reason(name) is not None) == listed


def test_exact_names_are_exact():
    """An exact name does not cover names it begins."""
    assert loader_reason("rpc.PopenSession") is not None
    assert loader_reason("rpc.PopenSessionX") is None
    assert loader_reason("ffi.Module.load_from_file") is None
    assert code_loaders(["rpc.Connect", "tirx.build", "runtime.SaveParams"]) == {
        "tirx.build": CODE_LOADERS["tirx.build"]}


def test_close_code_loaders_overrides_each():
    """Under --no-code-upload each loader refuses as load_module does; the rest stay."""
    table = fake_table()
    closed = tvm_globals.close_code_loaders(SessionSettings(code_upload=False), table)
    assert closed == ["ffi.Module.load_from_file.so", "ffi.ModuleLoadFromFile", "rpc.PopenSession"]
    for name in closed:
        with pytest.raises(CodeUploadRefused) as raised:
            table.get(name)("x.so", "so")
        assert f"refused to call {name} (" in str(raised.value)
        assert "--no-code-upload" in str(raised.value)
    assert table.get("tvm.contrib.random.uniform")(1.0, 3.0) == 2.0


@pytest.mark.parametrize("settings", [None, SessionSettings()])
def test_close_code_loaders_leaves_an_open_server(settings):
    """A server that runs uploaded code keeps TVM's loaders."""
    table = fake_table()
    assert tvm_globals.close_code_loaders(settings, table) == []
    assert table.get("ffi.Module.load_from_file.so") is loaded


@pytest.fixture
def root():
    directory = tempfile.mkdtemp()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def table(monkeypatch):
    """The fake table in place of TVM's registry of this process."""
    table = fake_table()
    monkeypatch.setattr(tvm_globals, "TVM_REGISTRY", table)
    return table


def environment(root, backend="tvm", **settings):
    registry = Registry()
    registry.register("ours", lambda: "ours")
    registry.register("shadowed", lambda: "ours")
    return SessionEnvironment.create(root, registry, backend=FakeBackend(backend),
                                     settings=SessionSettings(**settings))


def test_lookup_order(root, table):
    """Built-ins, then our registry, then TVM's globals; missing everywhere: NoSuchFunction."""
    env = environment(root)
    try:
        assert env.lookup("tvm.rpc.server.workpath") == env.workpath
        assert env.lookup("ours")() == "ours"
        assert env.lookup("shadowed")() == "ours"
        assert env.lookup("tvm.contrib.random.uniform")(0.0, 1.0) == 0.5
        assert env.lookup("ffi.Module.load_from_file.so") is loaded
        with pytest.raises(NoSuchFunction, match="no global function named 'no.such'"):
            env.lookup("no.such")
    finally:
        env.close()


def test_no_tvm_globals_without_tvm_arrays(root, table):
    """A session whose arrays are not TVM's sees only our functions."""
    env = environment(root, backend="numpy")
    try:
        with pytest.raises(NoSuchFunction):
            env.lookup("tvm.contrib.random.uniform")
        assert env.list_functions(include_tvm=True) == env.list_functions()
    finally:
        env.close()


@pytest.mark.parametrize("settings", [None, SessionSettings(), SessionSettings(code_upload=False)])
def test_file_escapes_always_closed(settings):
    """A global that reads a file at any path refuses on every server."""
    table = fake_table()
    tvm_globals.close_code_loaders(settings, table)
    with pytest.raises(PathEscapeError, match="reaches files only in its work directory"):
        table.get("runtime.LoadParamsFromFile")("/etc/shadow")
    assert table.get("tvm.contrib.random.uniform")(1.0, 3.0) == 2.0


@pytest.mark.parametrize("code_upload", [True, False])
def test_lookup_refuses_file_escapes(root, table, code_upload):
    """Sessions in the server's own process (nothing overridden) refuse them by name."""
    env = environment(root, code_upload=code_upload)
    try:
        with pytest.raises(PathEscapeError, match="runtime.LoadParamsFromFile is not served"):
            env.lookup("runtime.LoadParamsFromFile")("/etc/shadow")
    finally:
        env.close()


def test_lookup_refuses_loaders_without_code_upload(root, table):
    """
    Under --no-code-upload a loader found in TVM's registry refuses when
    called, even where the registry itself was not overridden (--in-process).
    """
    env = environment(root, code_upload=False)
    try:
        refusal = env.lookup("ffi.ModuleLoadFromFile")
        with pytest.raises(CodeUploadRefused, match="--no-code-upload"):
            refusal("x.so", "so")
        assert env.lookup("tvm.contrib.random.uniform")(2.0, 2.0) == 2.0
        with pytest.raises(NoSuchFunction):
            env.lookup("ffi.Module.load_from_file.ll")
    finally:
        env.close()


def test_list_functions(root, table):
    """TVM's names are listed only when asked for."""
    env = environment(root)
    try:
        ours = env.list_functions()
        assert "ours" in ours and "tvm.contrib.random.uniform" not in ours
        everything = env.list_functions(include_tvm=True)
        assert set(ours) < set(everything)
        assert "tvm.contrib.random.uniform" in everything
        assert everything == sorted(everything)
        assert env.lookup("tvm_rpc.server.list_functions")(True) == everything
    finally:
        env.close()
