"""TVM's global functions in our sessions, and the code loaders C{--no-code-upload} closes.

A session of our protocol whose array backend is TVM's (L{TVMBackend
<tvm_rpc.server.backends.TVMBackend>}) reaches every global function of TVM's
registry by name, after our built-ins and our registry (L{lookup}): so our
client calls C{tvm.contrib.random.random_fill_for_measure} or C{runtime.*} on
our server as it does on TVM's, with no C{--init} module registering them.

TVM's registry also holds functions that load or run code a client supplies
without going through C{tvm.rpc.server.load_module}: loaders by file format,
deserialisers, compilers with an in-process JIT, process launchers.
L{CODE_LOADERS} names them, from the registry of apache-tvm 0.27 and the
sources of its wheel. Under C{--no-code-upload} each of them refuses, with
the same L{CodeUploadRefused<tvm_rpc.server.errors.CodeUploadRefused>} as
C{load_module}:

  - in the worker, before any session: L{close_code_loaders} overrides each
    in TVM's registry itself, so TVM's clients (whose C{get_function}
    resolves any global), TVM's C++ dispatch (C{ffi.ModuleLoadFromFile}
    finds C{ffi.Module.load_from_file.<format>} by name) and our sessions
    all meet the refusal;
  - in L{lookup}, by name, so sessions run in the server's own process
    (C{--in-process}), which never overrides the registry, refuse too.

Some globals read, write or remove a file at any path the client names,
outside the session's work directory, where every path a session names is
confined (a lab's server must not hand out its secrets or let one client
delete another's files). L{FILE_ESCAPES} names them; they refuse always, in
the same two places, with a L{PathEscapeError
<tvm_rpc.server.errors.PathEscapeError>}. No TVM tool calls them through
RPC (they are what C{export_library}, parameter files and MetaSchedule's
local cost model use on the host).
"""

from .errors import PathEscapeError, code_upload_refused
from .logs import logger

log = logger("tvm_rpc.server.tvm_globals")

#: What in TVM's registry loads or runs code a client supplies, and how.
#: A name ending in C{.} covers every global it starts (formats added later
#: follow the same naming); any other name is exact.
CODE_LOADERS = {
    "ffi.ModuleLoadFromFile": "loads a module file by format (any ffi.Module.load_from_file.*)",
    "ffi.Module.load_from_file.": "loads a module from a file: .so is dlopened, .ll is "
                                  "compiled by LLVM's JIT, relax.VMExecutable is VM bytecode",
    "ffi.Module.load_from_bytes.": "makes a module from bytes: VM bytecode, the modules "
                                   "packed in a library",
    "relax.ExecutableLoadFromFile": "loads a Relax VM executable from a file",
    "runtime.ModuleLoadStaticLibrary": "wraps an object file for linking into a library",
    "runtime.disco.load_vm_module": "dlopens a library in the disco workers",
    # Fresh interpreters do not inherit the refusals below.
    "runtime.disco.SessionProcess": "starts disco workers as `python -m ENTRYPOINT`, a module "
                                    "the client names (the work directory is on their path)",
    "runtime.disco.create_process_pool": "the same: `python -m ENTRYPOINT` processes",
    "runtime.disco.SocketSession": "starts local disco worker processes (as SessionProcess)",
    "runtime.disco.RemoteSocketSession": "starts local disco worker processes (as SessionProcess)",
    "s_tir.meta_schedule.runner.": "MetaSchedule's local runner loads built libraries in "
                                   "fresh processes",
    "rpc.PopenSession": "runs an executable given as bytes or a path",
    "rpc.CreatePipeClient": "runs an executable given by path",
    "ffi.FunctionFromExternC": "calls machine code at an address the client names",
    "target.build.": "compiles IR the client built (llvm runs it through LLVM's JIT)",
    "target.Build": "compiles IR the client built",
    "tirx.build": "compiles IR the client built",
    "codegen.LLVMModuleCreate": "makes an LLVM module to compile into",
    "runtime.ModulePackImportsToLLVM": "compiles modules into LLVM code",
    "relax.VMLink": "links a Relax VM executable with libraries",
    "s_tir.meta_schedule.builder.": "compiles and exports libraries (runs the C compiler)",
    "tvm_callback_cuda_compile": "compiles CUDA source with nvcc",
    "tvm_callback_rocm_link": "links ROCm code objects",
}


#: Globals that touch a file at any path the client names, and what they do.
FILE_ESCAPES = {
    "ffi.ModuleWriteToFile": "writes a module to any path",
    "runtime.SaveParamsToFile": "writes parameters to any path",
    "runtime.LoadParamsFromFile": "reads any file",
    "s_tir.meta_schedule.CostModelSave": "writes a cost model to any path",
    "s_tir.meta_schedule.CostModelLoad": "reads any file",
    "s_tir.meta_schedule.remove_build_dir": "removes any directory",
    "vm.builtin.tensor_cache.load": "reads tensors from any directory",
}


def escape_refusal(name, reason):
    """
    @return: a function that refuses, whatever it is called with: C{name}
        reaches files outside the session's work directory.
    """

    def refuse(*args):
        raise PathEscapeError(
            f"{name} is not served: it {reason}, and a session reaches files only in its "
            f"work directory (use tvm.rpc.server.upload/download/remove)")

    refuse.__name__ = f"refuse_{name}"
    return refuse


def loader_reason(name):
    """
    @param name: a global function's name.
    @return: why C{name} loads or runs client code (from L{CODE_LOADERS}),
        or L{None} when it does not.
    """
    reason = CODE_LOADERS.get(name)
    if reason is not None:
        return reason
    for pattern, reason in CODE_LOADERS.items():
        if pattern.endswith(".") and name.startswith(pattern):
            return reason
    return None


def code_loaders(names):
    """
    @param names: global function names (TVM's registry).
    @return: C{{name: reason}} for those among C{names} that load or run
        client code.
    """
    found = {}
    for name in names:
        reason = loader_reason(name)
        if reason is not None:
            found[name] = reason
    return found


def refusal(name, reason):
    """
    @return: a function that refuses, as C{load_module} does under
        C{--no-code-upload}, whatever it is called with.
    """

    def refuse(*args):
        raise code_upload_refused(f"call {name} ({reason})")

    refuse.__name__ = f"refuse_{name}"
    return refuse


class TVMRegistry:
    """TVM's global function table of this process (through C{tvm_ffi}, imported on first use)."""

    def _ffi(self):
        """@return: the C{tvm_ffi} module, or L{None} when TVM's runtime is not importable."""
        try:
            import tvm_ffi
        except ImportError:
            return None
        return tvm_ffi

    def names(self):
        """@return: every global function's name (none without TVM's runtime)."""
        tvm_ffi = self._ffi()
        return [] if tvm_ffi is None else list(tvm_ffi.registry.list_global_func_names())

    def get(self, name):
        """@return: the global function C{name}, or L{None}."""
        tvm_ffi = self._ffi()
        return None if tvm_ffi is None else tvm_ffi.get_global_func(name, allow_missing=True)

    def override(self, name, function):
        """Register C{function} as the global function C{name}, replacing the one there."""
        self._ffi().register_global_func(name, function, override=True)


#: The process's TVM registry.
TVM_REGISTRY = TVMRegistry()


def _table(registry):
    """@return: C{registry}, or L{TVM_REGISTRY} when it is L{None}."""
    return TVM_REGISTRY if registry is None else registry


def close_code_loaders(settings, registry=None):
    """
    Override every L{FILE_ESCAPES} global of TVM's registry of this process
    with an L{escape_refusal}, and under C{--no-code-upload} every code
    loader with a L{refusal}; call it once, in the process that serves
    sessions, after C{--load-library} and C{--init} (which may load).

    @param settings: the operator's
        L{SessionSettings<tvm_rpc.server.limits.SessionSettings>}, or L{None}.
    @param registry: TVM's global functions (L{TVM_REGISTRY} if L{None}).
    @return: the code loaders closed, sorted (none when code upload is
        allowed or TVM's runtime is missing).
    """
    registry = _table(registry)
    present = registry.names()
    for name in FILE_ESCAPES.keys() & set(present):
        registry.override(name, escape_refusal(name, FILE_ESCAPES[name]))
    if settings is None or settings.code_upload:
        return []
    closed = code_loaders(present)
    for name, reason in closed.items():
        registry.override(name, refusal(name, reason))
    if closed:
        log.info("--no-code-upload: {count} code loaders of TVM's registry refuse",
                 count=len(closed))
    return sorted(closed)


def lookup(name, backend, settings, registry=None):
    """
    Find a global function of TVM's registry for a session of our protocol.

    @param backend: the session's array backend: TVM's registry is consulted
        only when it is TVM's (its arrays are then what TVM's functions take).
    @param settings: the session's
        L{SessionSettings<tvm_rpc.server.limits.SessionSettings>}.
    @param registry: TVM's global functions (L{TVM_REGISTRY} if L{None}).
    @return: the function, an L{escape_refusal} for a L{FILE_ESCAPES}
        global, a L{refusal} for a code loader under C{--no-code-upload}, or L{None} when TVM's registry has no C{name}
        (or is not this session's).
    """
    if backend.name != "tvm":
        return None
    function = _table(registry).get(name)
    if function is None:
        return None
    if name in FILE_ESCAPES:
        return escape_refusal(name, FILE_ESCAPES[name])
    reason = None if settings.code_upload else loader_reason(name)
    if reason is not None:
        return refusal(name, reason)
    return function


def names(backend, registry=None):
    """
    @param registry: TVM's global functions (L{TVM_REGISTRY} if L{None}).
    @return: the names of TVM's global functions, sorted, when C{backend} is
        TVM's (empty otherwise).
    """
    if backend.name != "tvm":
        return []
    return sorted(_table(registry).names())
