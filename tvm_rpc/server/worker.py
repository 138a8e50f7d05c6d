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
                  settings=None, channel=None):
    """
    Run one session in this (freshly forked) process, and for a session of
    our protocol whose client asked to keep its worker, the same client's
    next ones (L{_KeptWorker}); never returns.

    @param header: the control message.
    @param fd: the session socket.
    @param lifeline_fd: the lifeline socket.
    @param work_root: the directory under which the session works.
    @param make_session: makes the session protocol.
    @param tvm_problem: why TVM's clients cannot be served here, or L{None}.
    @param settings: the operator's L{SessionSettings}, or L{None} for the defaults.
    @param channel: this worker's channel to the fork server (the next
        sessions of a kept worker come through it), or L{None}.
    """
    code = 1
    try:
        if header.get("protocol") == TVM_PROTOCOL:
            sock, rest = _take(header, fd)
            code = tvm_session.serve(
                sock, rest, work_root, lifeline_fd, problem=tvm_problem, settings=settings
            )
        else:
            code = _KeptWorker(
                make_session, work_root, watchdog.Watchdog(lifeline_fd, work_root).start(),
                channel,
            ).run(header, fd)
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _take(header, fd):
    """
    Take a session's socket: answer its handshake and give the client a
    bounded time to start (L{watchdog.wait_for_start}).

    @return: C{(socket, rest)}: the socket, blocking, and the bytes the
        client sent after its handshake.
    """
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
        watchdog.wait_for_start(sock.fileno(), header.get("start_timeout"))
    return sock, rest


class _KeptWorker:
    """
    Runs sessions of our protocol on the worker's reactor: the first, and,
    when its client asks to keep the worker (C{Goodbye} with C{keep}) and the
    server offers it (a C{token} in the control message), that client's next
    ones, until the server retires the worker.

    Between sessions the worker tells the fork server it is idle and waits
    on its channel, the reactor still running (a reactor cannot be started
    twice); the server hands it the next session only to a client that
    presents the token, and kills it to retire it (the channel's end, the
    fork server gone, ends it too). A session that
    ends any other way (the client went away, a timeout, a protocol error)
    ends the worker, as does the L{MAX_SESSIONS}th, and any once the worker
    has grown by L{MAX_GROWTH}.
    """

    #: Sessions one worker serves at most (bounds what their leftovers
    #: can accumulate in one process).
    MAX_SESSIONS = 100
    #: Growth of the resident set since the first session beyond which the
    #: worker is no longer kept: what sessions leave stays in the process
    #: (TVM's runtime never unloads a library it loaded), and a device has
    #: little memory to spare.
    MAX_GROWTH = 256 * 1024 * 1024

    def __init__(self, make_session, work_root, guard, channel):
        """
        @param make_session: makes the session protocol.
        @param work_root: the directory under which sessions work.
        @param guard: the worker's L{watchdog.Watchdog}, running.
        @param channel: the channel to the fork server, or L{None} (no reuse).
        """
        self._make_session = make_session
        self._work_root = work_root
        self._guard = guard
        self._channel = channel
        self._served = 0
        self._reactor = None
        self._done = False
        self._code = 0
        self._resident_at_start = resident_bytes()

    def run(self, header, fd):
        """Serve the first session, and any that follow; @return: the exit code."""
        from . import reactor as worker_reactor

        self._reactor = worker_reactor.install()
        self._start(header, fd)
        if not self._done:
            self._reactor.run()
        return self._code

    def _start(self, header, fd):
        """Answer a session's handshake and run it on the reactor."""
        sock, rest = _take(header, fd)
        self._guard.arm(sock.fileno())
        self._served += 1
        session = self._make_session(self._work_root, clock=self._reactor)
        session.keeper = functools.partial(self._goodbye, header)
        carrier = SessionCarrier(
            session, rest, lambda reason: self._ended(session, header["id"]))
        self._reactor.adoptStreamConnection(
            sock.fileno(), sock.family, quiet_factory(lambda: carrier))
        sock.close()

    def _goodbye(self, header, keep):
        """
        The client said goodbye: its close is no longer a client gone away.

        @param keep: whether it asks to keep this worker for its next session.
        @return: the rest of C{Goodbye}'s answer: the token and C{keep_for}
            when this worker stays for that session.
        """
        self._guard.disarm()
        token = header.get("token")
        if (keep and token and self._channel is not None
                and self._served < self.MAX_SESSIONS
                and resident_bytes() - self._resident_at_start < self.MAX_GROWTH):
            return {"token": token, "keep_for": header.get("keep_for")}
        return {}

    def _ended(self, session, session_id):
        """A session ended: wait for the same client's next one, or end the worker."""
        self._guard.disarm()
        try:
            # Another --session-factory's protocol may know nothing of keeping.
            if getattr(session, "kept", False):
                send_control(self._channel, {"idle": os.getpid(), "id": session_id}, None)
                self._reactor.addReader(_NextSession(self._reactor, self._channel, self._next))
                return
        except Exception:
            # Whatever went wrong, the worker must end: the server is
            # waiting for that to free the session's slot.
            import traceback

            traceback.print_exc()
        self._stop()

    def _stop(self, code=0):
        self._done = True
        self._code = code
        if self._reactor.running:
            self._reactor.stop()

    def _next(self, header, fd):
        """The fork server handed the next session (or went away: L{None})."""
        if header is None:
            self._stop()
            return
        try:
            self._start(header, fd)
        except BaseException:
            # The server is following this session: end the worker, so it hears.
            import traceback

            traceback.print_exc()
            self._stop(1)


def resident_bytes():
    """@return: this process's resident set in bytes (its peak where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class _NextSession:
    """
    Reads the channel of an idle kept worker (an C{IReadDescriptor}): one
    control message, the next session, or the channel's end.
    """

    def __init__(self, reactor, channel, handed):
        """
        @param reactor: the reactor that reads it.
        @param channel: the channel to the fork server.
        @param handed: called with C{(header, fd)}, or C{(None, None)} at the end.
        """
        self._reactor = reactor
        self._channel = channel
        self._handed = handed

    def fileno(self):
        """@return: the channel's descriptor."""
        return self._channel.fileno()

    def logPrefix(self):
        """@return: the name in Twisted's log lines."""
        return "kept worker"

    def doRead(self):
        """Take the next session, once."""
        self._reactor.removeReader(self)
        try:
            header, fd = receive_control(self._channel)
        except (OSError, ValueError):
            header = fd = None
        if header is not None and fd is None:
            # Not a session (nothing else is sent to a worker): end.
            header = None
        self._handed(header, fd)

    def connectionLost(self, reason):
        """The reactor dropped the channel: nothing more comes."""


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
    Wait on a spare's channel for its session (the channel stays open: a
    kept worker reports on it and gets its next sessions through it).

    @return: C{(header, fd)}, or C{(None, None)} when the fork server went
        away (the channel is then closed).
    """
    try:
        header, fd = receive_control(channel)
    except (OSError, ValueError):
        header = fd = None
    if fd is None:
        channel.close()
        return None, None
    return header, fd


def spare_main(args):
    """
    A spare worker started by spawn (C{--no-fork}): a fresh interpreter that
    prepares everything itself, waits for its session and serves it.

    @return: the exit code, when no session came (the fork server is gone).
    """
    make_session, settings, tvm_problem = _prepare(args)
    channel = socket.socket(fileno=args.spare_fd)
    header, fd = _receive_session(channel)
    if header is None:
        return 0
    serve_session(header, fd, args.lifeline_fd, args.work_root, make_session, tvm_problem,
                  settings, channel)


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

    # The fork server's ends of the channels of workers that may be kept
    # (their next sessions go through them), by pid.
    busy = {}

    def serve(header, fd, channel):
        serve_session(
            header, fd, lifeline.detach(), args.work_root, make_session, tvm_problem, settings,
            channel,
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
            # A worker holding another's channel open would keep that one
            # waiting after the fork server has gone.
            return _Spare.fork(
                serve, close_in_child=(control, wake_read, wake_write, *busy.values()))

    spare = fork_spare()
    _report(control, {"ready": os.getpid(), "tvm": tvm_problem})
    while True:
        readable, _, _ = select.select([control, lifeline, wake_read, *busy.values()], [], [])
        if wake_read in readable:
            try:
                os.read(wake_read, 4096)
            except BlockingIOError:
                pass
            _reap(control)
        if lifeline in readable:
            return 0
        for pid, channel in list(busy.items()):
            if channel in readable:
                _relay_worker(control, busy, pid)
        if control not in readable:
            continue
        header, fd = receive_control(control)
        if header is None:
            return 0
        if fd is None:
            continue
        pid = _resume(busy, header, fd)
        if pid is None:
            pid = spare.hand(header, fd)
            if pid is None:
                # The spare died (killed from outside); fork one for this session.
                spare = fork_spare()
                pid = spare.hand(header, fd)
            if pid is not None:
                # Never blocks on what a worker (its session's code too) sends.
                spare.channel.setblocking(False)
                busy[pid] = spare.channel
            # The next session's worker is forked now, off its critical path.
            spare = None
        os.close(fd)
        if pid is not None:
            _report(control, {"started": pid, "id": header["id"]})
        if spare is None:
            spare = fork_spare()


def _relay_worker(control, busy, pid):
    """
    Read what a worker sent on its channel: that it is idle, kept for its
    client's next session (told to the server), or the channel's end. The
    channel is non-blocking: a worker writes each message at once, so one
    that is cut short (or too long) is a worker that broke the rule, and its
    channel is closed (it can no longer be kept) instead of stalling the fork
    server.
    """
    channel = busy[pid]
    try:
        message, fd = receive_control(channel)
    except (OSError, ValueError):
        message = fd = None
    if fd is not None:
        # No worker has a descriptor to give.
        os.close(fd)
    if not isinstance(message, dict):
        del busy[pid]
        channel.close()
    elif type(message.get("id")) is int and "idle" in message:
        # Only what the server asked for goes on, under the pid known here:
        # the session's own code may have written this.
        _report(control, {"idle": pid, "id": message["id"]})


def _resume(busy, header, fd):
    """
    Hand a session to the kept worker it resumes, if it asks to and that
    worker is still there.

    @return: the worker's pid, or L{None} (a spare must take the session).
    """
    pid = header.get("resume")
    channel = busy.get(pid)
    if channel is None:
        return None
    try:
        send_control(channel, header, fd)
    except OSError:
        del busy[pid]
        channel.close()
        return None
    return pid


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
        self.channel = channel

    @classmethod
    def fork(cls, serve, close_in_child=()):
        """
        @param serve: runs a session in the child, from C{(header, fd,
            channel)}; never returns.
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
            serve(header, fd, theirs)
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
        Give this spare its session; the channel stays open (L{channel}).

        @return: its pid, or L{None} when it is gone.
        """
        try:
            send_control(self.channel, header, fd)
        except OSError:
            self.channel.close()
            return None
        return self.pid


if __name__ == "__main__":
    sys.exit(fork_server_main())
