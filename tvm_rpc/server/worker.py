"""Session worker processes, the child side: the fork server and the workers it forks.

The server (L{WorkerPool<tvm_rpc.server.pool.WorkerPool>}) starts one *fork
server* at start-up: a child that imports Twisted, the session code and the
C{--init} modules once, then waits on a Unix socket without ever running a
reactor. When a handshake succeeds the server passes the connection's file
descriptor to it (a control message, L{control<tvm_rpc.server.control>}) with the
handshake reply and any early bytes; the fork server hands them to a
*session worker* it forked ahead of time (a spare, in a process group of its
own, waiting for its session; the next spare is forked at once), which
writes the reply, gives the client a bounded time to send its first session
message (L{wait_for_start<tvm_rpc.server.watchdog.wait_for_start>}), and runs the
session in the protocol the client speaks: ours on a reactor (the lean
L{WorkerReactor<tvm_rpc.server.reactor.WorkerReactor>}, which adopts the socket),
TVM's in TVM's own server loop (L{tvm_session<tvm_rpc.server.tvm_session>}). It exits
when the session ends. Forking the warm process takes milliseconds, which the
spare keeps off a session's start. The fork server reports each worker's pid
as it starts and its exit status as it ends.

With C{--spawn} (the server's C{--no-fork}, TVM's meaning) no worker is a
fork: each spare is a fresh interpreter started with C{posix_spawn}
(L{spare_main}) that loads the libraries, the C{--init} modules and TVM's
runtime itself. A GPU runtime (ROCm, Metal, OpenCL) initialised in one
process is then never used in a forked copy of it, which those runtimes do
not survive. The spare is still started ahead of its session, so its
start-up (a second or so) stays off the session's path unless sessions
come back to back.

Workers and the fork server watch a *lifeline* socket whose other end only the
server holds: if the server dies, they end too. A worker's watchdog thread
(L{watchdog<tvm_rpc.server.watchdog>}) also ends it the moment its client goes away,
even in the middle of a call. Run as
C{python -m tvm_rpc.server.worker ...} by the pool
(L{argv<tvm_rpc.server.pool.WorkerPool.argv>}); never by hand.
"""

import argparse
import base64
import functools
import json
import os
import select
import signal
import socket
import sys

from twisted.internet import protocol as tprotocol

from ..protocol.flavour import TVM_PROTOCOL
from ..transport import quiet_factory
from . import tvm_globals, tvm_session, watchdog
from .control import receive_control, send_control, site_flags
from .limits import SessionSettings
from .modules import DEFAULT_SESSION_FACTORY, load_callable, load_libraries, run_init


class SessionCarrier(tprotocol.Protocol):
    """
    The worker's side of an adopted connection (its handshake answered):
    hand every byte to the session protocol.
    """

    def __init__(self, session, rest, on_lost):
        """
        @param session: the session protocol.
        @param rest: bytes the client sent after its handshake.
        @param on_lost: called with the reason when the connection ends.
        """
        self._session = session
        self._rest = rest
        self._on_lost = on_lost

    def connectionMade(self):
        """Start the session with the early bytes."""
        self._session.makeConnection(self.transport)
        if self._rest:
            self._session.dataReceived(self._rest)

    def dataReceived(self, data):
        """Pass bytes to the session."""
        self._session.dataReceived(data)

    def connectionLost(self, reason=None):
        """End the session, then the worker."""
        try:
            self._session.connectionLost(reason)
        finally:
            self._on_lost(reason)


def _start_logging(silent=False, verbose=False):
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
    )

    from ..daemon.logfile import operator_filter

    # The server stamps and relays each line; workers write the bare text.
    observer = FileLogObserver(sys.stdout, lambda event: (formatEvent(event) or "") + "\n")
    level = LogLevelFilterPredicate(
        defaultLogLevel=LogLevel.warn if silent else LogLevel.debug if verbose else LogLevel.info
    )
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [level, operator_filter(verbose)])],
        redirectStandardIO=False,
    )


def serve_session(header, fd, lifeline_fd, work_root, make_session, tvm_problem=None,
                  settings=None):
    """
    Run one session in this (freshly forked) process; never returns.

    @param header: the control message.
    @param fd: the session socket.
    @param lifeline_fd: the lifeline socket.
    @param work_root: the directory under which the session works.
    @param make_session: makes the session protocol.
    @param tvm_problem: why TVM's clients cannot be served here, or L{None}.
    @param settings: the operator's L{SessionSettings}, or L{None} for the defaults.
    """
    code = 1
    try:
        rest = base64.b64decode(header["rest"])
        sock = socket.socket(fileno=fd)
        # The server's reactor made the (shared) file description
        # non-blocking; the worker's own steps here block.
        sock.setblocking(True)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            # Every answer is latency.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(base64.b64decode(header["reply"]))
        if not rest:
            watchdog.wait_for_start(fd, header.get("start_timeout"))
        if header.get("protocol") == TVM_PROTOCOL:
            code = tvm_session.serve(
                sock, rest, work_root, lifeline_fd, problem=tvm_problem, settings=settings
            )
        else:
            watchdog.start(fd, lifeline_fd, work_root)
            code = _serve_session(sock.detach(), rest, make_session, work_root)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _serve_session(fd, rest, make_session, work_root):
    """Run a session of our protocol on the worker's reactor; @return: the exit code."""
    from . import reactor as worker_reactor

    reactor = worker_reactor.install()
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.detach()
    session = make_session(work_root, clock=reactor)
    ended = []

    def lost(reason):
        ended.append(reason)
        if reactor.running:
            reactor.stop()

    carrier = SessionCarrier(session, rest, lost)
    reactor.adoptStreamConnection(fd, family, quiet_factory(lambda: carrier))
    os.close(fd)
    if not ended:
        reactor.run()
    return 0


def _report(control, message):
    control.sendall(json.dumps(message).encode("utf-8") + b"\n")


def _reap(control):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if os.WIFSIGNALED(status):
            _report(control, {"ended": pid, "code": None, "signal": os.WTERMSIG(status)})
        else:
            _report(control, {"ended": pid, "code": os.WEXITSTATUS(status), "signal": None})


def _parser():
    parser = argparse.ArgumentParser(prog="tvm_rpc.server.worker")
    parser.add_argument("--control-fd", type=int)
    parser.add_argument("--spare-fd", type=int)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--work-root", required=True)
    parser.add_argument("--session-factory", default=DEFAULT_SESSION_FACTORY)
    parser.add_argument("--init", action="append", default=[])
    parser.add_argument("--load-library", action="append", default=[])
    parser.add_argument("--session-settings", default=None)
    parser.add_argument("--silent", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--spawn", action="store_true")
    return parser


def _prepare(args):
    """
    Load what every session needs, once per process: C{--load-library}
    libraries first (C{--init} modules may use them), the session factory,
    the C{--init} modules, the array backend and TVM's runtime (whose code
    loaders then refuse under C{--no-code-upload}, see
    L{tvm_globals.close_code_loaders}).

    @return: C{(make_session, settings, tvm_problem)}.
    """
    _start_logging(args.silent, args.verbose)
    load_libraries(args.load_library)
    module, make_session = load_callable(args.session_factory)
    settings = None
    if args.session_settings is not None:
        settings = SessionSettings.from_json(args.session_settings)
        make_session = functools.partial(make_session, settings=settings)
    run_init(args.init)
    prepare = getattr(module, "prepare", None)
    if prepare is not None:
        # Import the array backend once, here, instead of in every session.
        prepare()
    try:
        # Its import probes Twisted (the fence): milliseconds of every session's start.
        from . import reactor  # noqa: F401
    except ImportError:
        # No epoll here: a session of our protocol reports it when it starts.
        pass
    tvm_problem = tvm_session.prepare()
    if tvm_problem is None:
        # After --load-library and --init, which may load code themselves.
        tvm_globals.close_code_loaders(settings)
    return make_session, settings, tvm_problem


def _spare_argv(argv, spare_fd):
    """
    @param argv: the fork server's own arguments.
    @param spare_fd: the descriptor of the spare's end of its channel.
    @return: the command line of a spawned spare worker (C{--no-fork}): the
        fork server's (its interpreter flags too), with the spare's channel in
        place of the control socket.
    """
    spare = [sys.executable, *site_flags(), "-m", "tvm_rpc.server.worker"]
    arguments = iter(argv)
    for argument in arguments:
        if argument == "--control-fd":
            next(arguments)
            spare += ["--spare-fd", str(spare_fd)]
        elif argument != "--spawn":
            spare.append(argument)
    return spare


def _receive_session(channel):
    """
    Wait on a spare's channel for its session, then close the channel.

    @return: C{(header, fd)}, or C{(None, None)} when the fork server went away.
    """
    try:
        header, fd = receive_control(channel)
    except (OSError, ValueError):
        header = fd = None
    channel.close()
    if fd is None:
        return None, None
    return header, fd


def spare_main(args):
    """
    A spare worker started by spawn (C{--no-fork}): a fresh interpreter that
    prepares everything itself, waits for its session and serves it.

    @return: the exit code, when no session came (the fork server is gone).
    """
    make_session, settings, tvm_problem = _prepare(args)
    header, fd = _receive_session(socket.socket(fileno=args.spare_fd))
    if header is None:
        return 0
    serve_session(header, fd, args.lifeline_fd, args.work_root, make_session, tvm_problem,
                  settings)


def fork_server_main(argv=None):
    """
    The fork server: import everything once, then fork one worker per session
    (or, with C{--spawn}, start each worker as a fresh interpreter).

    @param argv: command-line arguments (see L{WorkerPool.argv}).
    @return: the exit code.
    """
    if argv is None:
        argv = sys.argv[1:]
    args = _parser().parse_args(argv)
    if args.spare_fd is not None:
        return spare_main(args)
    control = socket.socket(fileno=args.control_fd)
    lifeline = socket.socket(fileno=args.lifeline_fd)
    make_session, settings, tvm_problem = _prepare(args)
    # Import what a worker needs without installing a reactor: the reactor
    # must be created after the fork, in the worker.
    import twisted.internet.default  # noqa: F401
    import twisted.internet.tcp  # noqa: F401
    import twisted.internet.unix  # noqa: F401

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda number, frame: None)

    def serve(header, fd):
        serve_session(
            header, fd, lifeline.detach(), args.work_root, make_session, tvm_problem, settings,
        )

    if args.spawn:
        # Only the lifeline goes to spawned workers (the control socket came
        # in as a plain, inheritable descriptor).
        os.set_inheritable(control.fileno(), False)
        os.set_inheritable(lifeline.fileno(), True)

        def fork_spare():
            return _Spare.spawn(lambda fd: _spare_argv(argv, fd))
    else:
        def fork_spare():
            return _Spare.fork(serve, close_in_child=(control, wake_read, wake_write))

    spare = fork_spare()
    _report(control, {"ready": os.getpid(), "tvm": tvm_problem})
    while True:
        readable, _, _ = select.select([control, lifeline, wake_read], [], [])
        if wake_read in readable:
            try:
                os.read(wake_read, 4096)
            except BlockingIOError:
                pass
            _reap(control)
        if lifeline in readable:
            return 0
        if control not in readable:
            continue
        header, fd = receive_control(control)
        if header is None:
            return 0
        if fd is None:
            continue
        pid = spare.hand(header, fd)
        if pid is None:
            # The spare died (killed from outside); fork one for this session.
            pid = fork_spare().hand(header, fd)
        os.close(fd)
        if pid is not None:
            _report(control, {"started": pid, "id": header["id"]})
        # The next session's worker is forked now, off its critical path.
        spare = fork_spare()


class _Spare:
    """
    A worker forked ahead of its session, waiting for it: forking the warm
    fork server (TVM's runtime loaded) takes milliseconds, and its first steps
    touch more pages, so a worker forked in advance starts a session in a
    fraction of that. It gets its session's control message and socket over
    a socket pair of its own, and ends if that closes first (the fork server
    is gone).
    """

    def __init__(self, pid, channel):
        self.pid = pid
        self._channel = channel

    @classmethod
    def fork(cls, serve, close_in_child=()):
        """
        @param serve: runs a session in the child, from C{(header, fd)}; never returns.
        @param close_in_child: sockets and descriptors the child must not keep.
        @return: the L{_Spare}.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Buffered output would otherwise be written twice, by both processes.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for item in close_in_child:
                if isinstance(item, int):
                    os.close(item)
                else:
                    item.close()
            ours.close()
            os.setpgid(0, 0)
            header, fd = _receive_session(theirs)
            if header is None:
                os._exit(0)
            serve(header, fd)
        theirs.close()
        return cls(pid, ours)

    @classmethod
    def spawn(cls, command):
        """
        Start a spare as a fresh interpreter (C{--no-fork}): nothing of this
        process's memory (a GPU runtime's state, say) reaches it.

        @param command: makes the spare's command line from the descriptor
            of its end of the channel.
        @return: the L{_Spare}.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.set_inheritable(theirs.fileno(), True)
            argv = command(theirs.fileno())
            sys.stdout.flush()
            sys.stderr.flush()
            # posix_spawn execs at once (no copy of this process runs any
            # code); the spare gets a process group of its own, as forked ones do.
            pid = os.posix_spawn(argv[0], argv, os.environ, setpgroup=0)
        finally:
            theirs.close()
        return cls(pid, ours)

    def hand(self, header, fd):
        """
        Give this spare its session.

        @return: its pid, or L{None} when it is gone.
        """
        try:
            send_control(self._channel, header, fd)
        except OSError:
            return None
        finally:
            self._channel.close()
        return self.pid


if __name__ == "__main__":
    sys.exit(fork_server_main())
