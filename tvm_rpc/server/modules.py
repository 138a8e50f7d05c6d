"""Modules: those the server names at start, and those a session loads.

At start the server imports the C{--init} modules (L{run_init}) and
its session factory (C{--session-factory}, L{DEFAULT_SESSION_FACTORY}
unless told otherwise) by C{module[:callable]} specs (L{load_callable}):
in the fork server, or in the server itself when sessions run in process.
The shared libraries of C{--load-library} are found at start
(L{find_libraries}) and loaded as TVM loads them (L{load_libraries}) in
every process that serves sessions.

In a session, L{load_module} loads a file of the work directory by its
suffix: a C{.py} file becomes a L{PythonModule} (its public functions
are callable), a TVM library (C{.so}, C{.tar}, ...) a C{tvm.runtime.Module}
when TVM's runtime is installed on the device, and
L{TVMRuntimeMissing<tvm_rpc.server.errors.TVMRuntimeMissing>} otherwise.
L{is_module} and L{module_function} treat both kinds alike.
"""

import ctypes
import importlib.util
import itertools
import os
import sys
import types

import attrs

from .errors import TVMRuntimeMissing
from .registry import NoSuchFunction

_module_counter = itertools.count(1)
#: The libraries loaded by L{load_libraries}, kept so they are never unloaded.
_LOADED_LIBRARIES = []


@attrs.define(eq=False)
class PythonModule:
    """
    A C{.py} file loaded in a session: its public functions are callable.

    @ivar path: the file it was loaded from.
    @ivar module: the Python module object.
    """

    path: str
    module: types.ModuleType

    @classmethod
    def load(cls, path):
        """
        Execute a C{.py} file as a fresh module (a unique name, so two
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


def load_module(target, path):
    """
    Load a C{.py} file or a TVM library.

    @param target: the file, already confined to the work directory.
    @param path: the path the client named, for messages.
    @return: the module object (a L{PythonModule} or a TVM module).
    @raise TVMRuntimeMissing: for a TVM library when TVM's runtime is not
        installed on this device.
    @raise ValueError: for another kind of file.
    """
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


def is_module(value):
    """@return: whether C{value} is a Python or TVM module."""
    if isinstance(value, PythonModule):
        return True
    runtime = sys.modules.get("tvm.runtime")
    return runtime is not None and isinstance(value, runtime.Module)


def module_function(module, name, query_imports=False):
    """
    @return: the function C{name} of a loaded module.
    @raise NoSuchFunction: when the module has none.
    """
    if isinstance(module, PythonModule):
        return module.get_function(name)
    try:
        return module.get_function(name, query_imports)
    except (AttributeError, RuntimeError) as e:
        raise NoSuchFunction(f"module has no function {name!r}: {e}") from None


#: The session protocol factory used unless told otherwise.
DEFAULT_SESSION_FACTORY = "tvm_rpc.server.session:make_session_protocol"


def load_callable(spec):
    """
    Import C{module[:callable]}.

    @param spec: C{package.module} or C{package.module:name}.
    @return: C{(module, callable_or_None)}.
    @raise ImportError: when the module or name cannot be found.
    """
    module_name, _, name = spec.partition(":")
    module = importlib.import_module(module_name)
    if not name:
        return module, None
    try:
        return module, getattr(module, name)
    except AttributeError:
        raise ImportError(f"{module_name} has no attribute {name!r}") from None


def run_init(specs):
    """
    Import each C{--init} module and call its callable when one is named.

    @param specs: C{module[:callable]} strings.
    """
    for spec in specs:
        _, function = load_callable(spec)
        if function is not None:
            function()


def find_libraries(spec, cwd=None):
    """
    Find the libraries of C{--load-library}, as TVM's server does: a
    colon-separated list of files, each relative to the current directory
    (or absolute).

    @param spec: the option's value, or L{None}.
    @param cwd: the directory relative names start from (the current one
        when L{None}).
    @return: the absolute paths, in order (a daemon changes its directory
        later, so they are resolved now).
    @raise ValueError: naming the first file that does not exist.
    """
    base = os.getcwd() if cwd is None else cwd
    paths = []
    for name in (spec or "").split(":"):
        if not name:
            continue
        path = os.path.abspath(os.path.join(base, name))
        if not os.path.isfile(path):
            raise ValueError(f"cannot find library {name} (looked for {path})")
        paths.append(path)
    return paths


def load_libraries(paths):
    """
    Load shared libraries into this process as TVM's C{--load-library} does
    (C{ctypes.CDLL} with C{RTLD_GLOBAL}, so their symbols and the functions
    they register are visible to what loads later).

    @param paths: absolute paths from L{find_libraries}.
    @raise OSError: when one cannot be loaded.
    """
    for path in paths:
        _LOADED_LIBRARIES.append(ctypes.CDLL(path, ctypes.RTLD_GLOBAL))
