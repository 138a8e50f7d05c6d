"""TVM's global functions on our server, and --no-code-upload against TVM's code loaders.

With the real apache-tvm: TVM's client (TVM's protocol) and ours (our
protocol, falling back to TVM's globals) reach uploaded code through TVM's
loaders on an open server and are refused under --no-code-upload.
"""

import re

import pytest

from tests.test_interop_server import M, N, dense_relu, our_server, run_client  # noqa: F401
from tests.test_interop_tvm_client import tvm_client

pytestmark = pytest.mark.system

#: Names in TVM's registry that look like loaders (by name) but were checked
#: in apache-tvm 0.27's sources and load or run no client code.
REVIEWED_HARMLESS = {
    "ffi.Module.create.const_loader": "wraps constants (tensors) in a module",
    "ffi.ModuleImportModule": "imports a module the session already holds into another",
    "tvm.rpc.server.ImportModule": "the same, for TVM's server",
    "ffi.ModuleClearImports": "drops a module's imports",
    "ffi.SystemLib": "the functions linked into the runtime at build time",
    "rpc.LoadRemoteModule": "asks a remote session's tvm.rpc.server.load_module (refused there)",
    "rpc.ImportRemoteModule": "imports a module held by a remote session",
    "runtime.LoadParams": "deserialises tensors",
    "runtime.LoadMetaDataFromJSON": "parses function metadata",
    "runtime.CSourceModuleCreate": "holds source text; running it needs a compiler, closed",
    "runtime.SourceModuleCreate": "holds source text; running it needs a compiler, closed",
    "runtime.ModulePackImportsToC": "writes modules as C source text",
    "runtime.ModulePackImportsToTensor": "packs modules into a byte tensor",
    "codegen.codegen_blob": "emits a blob as LLVM data; loading it needs a loader, closed",
    "codegen.llvm_target_enabled": "a query",
    "relax.VMCodeGen": "emits VM bytecode, which calls only globals the client may call itself",
    "relax.VMTIRCodeGen": "the same, as TIR to compile (compiling is closed)",
    "relax.ExternFunc": "an IR node",
    "relax.dpl.ExternFuncPattern": "an IR pattern",
    "tirx.ExecScope": "an IR node",
    "s_tir.transform.InjectSoftwarePipeline": "an IR pass",
    "tvm.rpc.server.download": "reads a file of the work directory (paths through our workpath)",
    "tvm.rpc.server.upload": "ours: writes into the work directory, within its byte limit",
    "s_tir.meta_schedule.MeasureCallbackRemoveBuildArtifact": "removes build directories (no code)",
    "runtime.disco.WorkerProcess": "runs a disco worker loop in this process, where the refusals hold",
    "runtime.disco.socket_session_init_workers": "initialises the workers of a socket session "
                                                 "(starting one is closed)",
    "s_tir.meta_schedule.SearchStrategyNotifyRunnerResults": "passes results on",
    "tvm.codegen.llvm.GetProcessTriple": "a query",
}

#: Prefixes of names that deal in data only.
DATA_ONLY = ("runtime.disco.ShardLoader", "s_tir.meta_schedule.Workload",
             "s_tir.meta_schedule.Database",
             # Runner objects: the local runner is closed; a Python runner
             # calls only a function the client already holds.
             "s_tir.meta_schedule.Runner")

RISKY_NAME = re.compile(
    r"load|dlopen|library|popen|exec|pipe|extern|build|compile|link|codegen|jit|process|spawn"
    r"|socket|runner|entrypoint", re.I
)


def test_every_loader_looking_global_is_closed_or_reviewed(tvm):
    """
    Every global of the installed TVM whose name looks like it loads or runs
    code is either closed under --no-code-upload or reviewed above: a new
    TVM that adds one fails here until it is looked at.
    """
    from tvm_rpc.server.tvm_globals import FILE_ESCAPES, TVM_REGISTRY, code_loaders

    import tvm.rpc  # noqa: F401  (what the worker imports: the whole registry)

    names = TVM_REGISTRY.names()
    closed = {**code_loaders(names), **{name: why for name, why in FILE_ESCAPES.items()
                                         if name in names}}
    for must in ("ffi.Module.load_from_file.so", "ffi.ModuleLoadFromFile", "rpc.PopenSession",
                 "target.build.llvm", "ffi.Module.load_from_file.ll",
                 "runtime.disco.SessionProcess", "s_tir.meta_schedule.runner.get_local_runner",
                 "runtime.LoadParamsFromFile", "ffi.ModuleWriteToFile"):
        assert must in closed
    unreviewed = sorted(
        name for name in names
        if RISKY_NAME.search(name) and name not in closed and name not in REVIEWED_HARMLESS
        and not _builder_syntax(name)
    )
    assert unreviewed == []


def _builder_syntax(name):
    """IR construction and inspection: builds IR values, runs nothing (compiling is closed)."""
    return name.startswith((
        "script.ir_builder.", "relax.BlockBuilder", "relax.ExecBuilder", "s_tir.meta_schedule.Builder",
        "s_tir.meta_schedule.Profiler", "tirx.Buffer", "te.", "tvm.codegen.llvm.",
        "target.llvm_", "relax.transform.", "relax.analysis.", "tirx.intrinsics.",
    ) + DATA_ONLY)


def _server(*extra):
    return our_server("--key", "dev", *extra)


@pytest.mark.parametrize("locked", [False, True])
def test_tvm_client_and_tvm_loaders(tvm, dense_relu, locked):
    """TVM's client loads uploaded code through TVM's loaders, unless --no-code-upload."""
    daemon, port = _server(*(["--no-code-upload"] if locked else []))
    try:
        report = tvm_client("loaders", "direct", "127.0.0.1", port, "dev", dense_relu, N, M)
    finally:
        daemon.stop()
    assert report["ok"] is True, report
    for label in ("load_from_file_so", "module_load_from_file"):
        outcome = report[label]
        if locked:
            assert outcome["ok"] is False, report
            assert "--no-code-upload" in outcome["message"], report
        else:
            assert outcome == {"ok": True, "y": [float(N)]}, report
    if locked:
        assert "--no-code-upload" in report["popen"]["message"], report
    # Paths outside the work directory are refused either way.
    assert report["outside"]["ok"] is False, report
    assert "reaches files only in its work directory" in report["outside"]["message"], report


def test_tvm_client_and_tvm_loaders_spawned(tvm, dense_relu):
    """Spawned workers (--no-fork) close TVM's loaders too: they prepare on their own."""
    daemon, port = _server("--no-code-upload", "--no-fork")
    try:
        report = tvm_client("loaders", "direct", "127.0.0.1", port, "dev", dense_relu, N, M)
    finally:
        daemon.stop()
    assert "--no-code-upload" in report["load_from_file_so"]["message"], report


@pytest.mark.parametrize("flags", [(), ("--no-code-upload",), ("--no-code-upload", "--no-fork"),
                                   ("--no-code-upload", "--in-process")])
def test_our_client_reaches_tvm_globals(tvm, dense_relu, flags):
    """
    Our client calls TVM's globals on our server; their loaders refuse under
    --no-code-upload, in forked workers, spawned ones and in-process sessions.
    """
    locked = "--no-code-upload" in flags
    daemon, port = _server(*flags)
    try:
        report = run_client("tvm-globals", "127.0.0.1", port, "dev", dense_relu)
    finally:
        daemon.stop()
    assert report["ok"] is True, report
    assert report["filled"] > 0, report
    assert report["all"] > 2000 > report["ours"], report
    assert "no.such.function" in report["missing"]["message"], report
    if locked:
        assert report["load"]["ok"] is False, report
        assert "--no-code-upload" in report["load"]["message"], report
    else:
        assert report["load"]["ok"] is True, report
