"""Serving Apache TVM's own clients: TVM's endpoint on the session socket, our environment.

A client whose handshake key carries no tvm_rpc mark is one of TVM's
(C{tvm.rpc.connect}, C{connect_tracker(...).request}, MetaSchedule's
C{RPCRunner}). Its session speaks TVM's RPC endpoint protocol, which TVM's
runtime implements in C++: so the session worker, which owns the socket,
runs that endpoint on it (C{rpc.ServerLoop}, TVM's own server loop; the
GIL is released while it runs).

Why the C++ loop and not TVM's event-driven server on the worker's reactor:
the loop reads and writes the socket directly, so a TVM client sees exactly
TVM's server (speed included: no Python on the path of a call), and writes
are complete before the next request is read, so a worker killed at its
timeout never leaves a reply half-written behind a notice. What the reactor
gave the worker, a thread gives here: it watches the lifeline (the server
died) and the client's end of the socket (the client left, even in the
middle of a long call), and ends the worker at once.

The server environment is ours, confined to the session's work directory as
in our own protocol (L{WorkDirectory<tvm_rpc.server.workdir.WorkDirectory>}):

  - C{tvm.rpc.server.workpath} resolves and confines every path, and TVM's
    C++ C{download} resolves its paths through it;
  - C{tvm.rpc.server.upload} is ours, so the work directory's byte limit
    (C{--max-work-dir-bytes}) holds for TVM's clients too;
  - C{tvm.rpc.server.remove} removes a file or a directory tree, and, as
    TVM's, says nothing of a missing one; it never removes the work directory
    itself (TVM's removes it once empty, which MetaSchedule's clean-up, asking
    to remove C{""}, does, and the session can then store nothing more);
  - C{tvm.rpc.server.load_module} and C{download_linked_module} load or link
    only files inside the work directory;
  - C{tvm.rpc.server.listdir} (which TVM's Python server lacks and its C++
    C{apps/cpp_rpc} has) answers as C{apps/cpp_rpc} does: C{"a,b,"};
  - C{tvm.rpc.server.GetCRTMaxPacketSize} caps a copy's packet, so tensor
    copies reach the device in bounded pieces, and TVM's client asks for it
    once per session instead of before every copy (it does not cache a miss);
  - every function registered with L{tvm_rpc.server.register_func}
    (C{--init} modules included) is a TVM global function too.

Under C{--no-code-upload}, TVM's own code loaders (C{ffi.Module.load_from_file.so},
C{rpc.PopenSession}, ...) refuse too: see L{tvm_rpc.server.tvm_globals}.

These are registered once, in the fork server (L{prepare}); each
worker points them at its own session (L{serve}).
"""

import os
import socket
import time

from ..protocol.flavour import tvm_exception_packet
from .environment import SessionEnvironment
from .limits import SessionSettings
from .listener import REFUSAL_DRAIN
from . import watchdog
from .logs import logger
from .registry import GLOBAL_REGISTRY
from .workdir import WorkDirectory

log = logger("tvm_rpc.server.tvm_session")

#: The largest packet TVM's client may send for one piece of a tensor copy.
MAX_COPY_PACKET = 16 << 20

#: What TVM's client hears when the device cannot serve it.
RUNTIME_MISSING = (
    "this tvm_rpc server cannot serve Apache TVM's client: TVM's runtime is not "
    "importable on the device ({reason}); install apache-tvm there "
    "(pip install apache-tvm), or connect with tvm_rpc's client "
    "(tvm_rpc.client.connect / connect_tracker(...).request(key))"
)


def timeout_notice(seconds):
    """
    @param seconds: the session timeout that ran out.
    @return: the packet TVM's own server sends then: TVM's client raises
        C{RPCSessionTimeoutError} on it.
    """
    return tvm_exception_packet(
        f"RPCSessionTimeoutError: Your {float(seconds)}s session has expired, "
        'try to increase the "session_timeout" value.'
    )


def refusal_packet(reason):
    """@return: the packet telling TVM's client why it cannot be served."""
    return tvm_exception_packet(RUNTIME_MISSING.format(reason=reason))


class _Current:
    """The session the registered environment functions serve (one per worker)."""

    environment = None

    @classmethod
    def get(cls):
        if cls.environment is None:
            raise RuntimeError("no tvm_rpc session runs in this process")
        return cls.environment


def _workpath(path):
    return _Current.get().workpath(path)


def _upload(path, data):
    _Current.get().upload(path, data)


def _remove(path):
    _Current.get().remove(path)


def _listdir(path):
    return "".join(name + "," for name in _Current.get().listdir(path or "."))


def _load_module(path):
    """Load a TVM library from the work directory (Python modules serve our protocol only)."""
    environment = _Current.get()
    if os.path.splitext(path)[1].lower() == ".py":
        raise ValueError(
            f"cannot load {path!r} for a TVM client: Python modules are served to "
            "tvm_rpc's client only; upload a TVM-compiled library (.so, .tar)"
        )
    return environment.load_module(path)


def _download_linked_module(path):
    """
    Link an object file or an archive of them into a shared library, as TVM's
    server does, and return the library's bytes.
    """
    from tvm.support import cc, tar, utils

    environment = _Current.get()
    environment.check_code_upload(path)
    source = environment.workpath(path)
    if source.endswith(".o"):
        linked = source + ".so"
        cc.create_shared(linked, source)
    elif source.endswith(".tar"):
        members = utils.tempdir(custom_path=source[: -len(".tar")])
        tar.untar(source, members.temp_dir)
        linked = source + ".so"
        cc.create_shared(linked, [members.relpath(name) for name in members.listdir()])
    elif source.endswith((".so", ".dylib")):
        linked = source
    else:
        raise RuntimeError(f"Do not know how to link {path}")
    with open(linked, "rb") as f:
        return bytearray(f.read())


def _max_copy_packet():
    return MAX_COPY_PACKET


def runtime_problem():
    """
    @return: L{None} when TVM's runtime can serve sessions here, else why not
        (the text of the import error).
    """
    try:
        import tvm.rpc  # noqa: F401
        import tvm.runtime  # noqa: F401
        import tvm_ffi  # noqa: F401
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def prepare(registry=GLOBAL_REGISTRY):
    """
    Import TVM's runtime and register our environment and the registry's
    functions as TVM global functions; called once in the fork server.

    @return: L{None} when TVM's clients can be served, else why not.
    """
    problem = runtime_problem()
    if problem is not None:
        return problem
    import tvm_ffi

    environment_functions = {
        "tvm.rpc.server.workpath": _workpath,
        "tvm.rpc.server.upload": _upload,
        "tvm.rpc.server.remove": _remove,
        "tvm.rpc.server.load_module": _load_module,
        "tvm.rpc.server.download_linked_module": _download_linked_module,
        "tvm.rpc.server.listdir": _listdir,
        "tvm.rpc.server.GetCRTMaxPacketSize": _max_copy_packet,
    }
    for name, function in environment_functions.items():
        tvm_ffi.register_global_func(name, function, override=True)
    for name in registry.names():
        try:
            tvm_ffi.register_global_func(name, registry.get(name), override=True)
        except Exception as e:
            log.warn("cannot offer {name} to TVM's clients: {problem}", name=name, problem=e)
    return None


def _callback_loop(sock, early):
    """
    TVM's server loop over Python send/receive functions, for a connection
    whose client sent session bytes along with its handshake: the C++ loop on
    a bare descriptor could not take them.
    """
    from tvm.rpc import _ffi_api

    pending = [bytes(early)]

    def send(data):
        return sock.send(bytes(data))

    def receive(size):
        if pending:
            data = pending.pop()
            if len(data) > size:
                pending.append(data[size:])
                data = data[:size]
            return bytearray(data)
        return bytearray(sock.recv(size))

    _ffi_api.ServerLoop(send, receive)


def serve(sock, rest, work_root, lifeline_fd, problem=None, settings=None):
    """
    Run one TVM session in this (freshly forked) worker.

    @param sock: the session socket (blocking), its handshake answered.
    @param rest: session bytes the client sent along with its handshake.
    @param work_root: where the session's work directory is made.
    @param lifeline_fd: the lifeline socket (end of file: the server died).
    @param problem: why TVM's runtime cannot serve here (from L{prepare}), or
        L{None}: the client is then told so and the connection closed cleanly.
    @param settings: the operator's L{SessionSettings} (C{--no-code-upload}
        applies to TVM's clients too), or L{None} for the defaults.
    @return: the worker's exit code.
    """
    if problem is not None:
        refuse(sock, problem)
        return 0
    from tvm.rpc import _ffi_api

    work_dir = WorkDirectory.create(work_root)
    _Current.environment = SessionEnvironment(work_dir, settings=settings or SessionSettings())
    os.chdir(work_dir.root)
    watchdog.start(sock.fileno(), lifeline_fd, work_root)
    try:
        if rest:
            _callback_loop(sock, rest)
        else:
            # The loop closes the descriptor when it ends.
            _ffi_api.ServerLoop(sock.detach())
    finally:
        _Current.environment.close()
        _Current.environment = None
    return 0


def refuse(sock, problem):
    """
    Tell TVM's client (its handshake answered) why it cannot be served, and
    close cleanly: half-close, then read until the client closes (bounded), so
    the close is never a reset (a reset can kill the accept thread of TVM's
    tools).
    """
    deadline = time.monotonic() + REFUSAL_DRAIN
    try:
        sock.sendall(refusal_packet(problem))
        sock.shutdown(socket.SHUT_WR)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            if not sock.recv(65536):
                break
    except OSError:
        pass
    finally:
        sock.close()
