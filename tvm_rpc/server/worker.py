"""Session worker processes: each session runs in a process that owns its socket.

The server starts one *fork server* at start-up: a child that imports Twisted,
the session code and the ``--init`` modules once, then waits on a Unix socket
without ever running a reactor. When a handshake succeeds the server passes the
connection's file descriptor to it (``SCM_RIGHTS``) with the handshake reply and
any early bytes; the fork server hands them to a *session worker* it forked
ahead of time (a spare, in a process group of its own, waiting for its session;
the next spare is forked at once), which writes the reply, gives the client a bounded time
to send its first session message (:func:`~tvm_rpc.server.watchdog.wait_for_start`),
and runs the session in the protocol the client speaks: ours on a reactor (the
lean :class:`~tvm_rpc.server.reactor.WorkerReactor`, which adopts the socket),
TVM's in TVM's own server loop (:mod:`~tvm_rpc.server.tvm_session`). It exits
when the session ends. Forking the warm process takes milliseconds, which the
spare keeps off a session's start. The fork server reports
each worker's pid as it starts and its exit status as it ends.

The server keeps its own copy of each session's descriptor, so that:

- a worker that crashes (``os._exit``, a segfault) or leaks ends only its own
  session: the server hears of the exit, closes its copy and frees the slot;
- a session that outlives its ``-timeout=N`` (or the server's
  ``--max-session-time``) is killed (the worker's whole process group, so
  children that user code started die too), the client is sent its session
  protocol's timeout notice on the server's copy, and the connection is
  closed;
- however a worker ends, the server kills what is left of its process group
  and removes its work directory.

Workers and the fork server watch a *lifeline* socket whose other end only the
server holds: if the server dies, they end too. A worker's watchdog thread
(:mod:`~tvm_rpc.server.watchdog`) also ends it the moment its client goes away,
even in the middle of a call. Run as
``python -m tvm_rpc.server.worker ...`` by :class:`WorkerPool`; never by hand.
"""

import argparse
import base64
import functools
import json
import os
import select
import signal
import socket
import struct
import sys

import attrs
from twisted.internet import defer
from twisted.internet import protocol as tprotocol
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from ..protocol.flavour import OUR_PROTOCOL, TVM_PROTOCOL
from . import tvm_session, watchdog
from .watchdog import EXIT_CLIENT_GONE, EXIT_NO_START, EXIT_REASONS
from .workdir import remove_work_dirs_of
from .limits import SessionSettings
from .listener import ISessionRunner, session_time
from .logs import logger

_LENGTH = struct.Struct("<I")
#: The largest control message (handshake reply, early bytes, metadata).
MAX_CONTROL_MESSAGE = 1 << 20

#: The session protocol factory used unless told otherwise.
DEFAULT_SESSION_FACTORY = "tvm_rpc.server.session:make_session_protocol"



def load_callable(spec):
    """
    Import ``module[:callable]``.

    @param spec: ``package.module`` or ``package.module:name``.
    @return: C{(module, callable_or_None)}.
    @raise ImportError: when the module or name cannot be found.
    """
    import importlib

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
    Import each ``--init`` module and call its callable when one is named.

    @param specs: ``module[:callable]`` strings.
    """
    for spec in specs:
        _, function = load_callable(spec)
        if function is not None:
            function()


def send_control(sock, header, fd):
    """
    Send one control message with a file descriptor.

    @param sock: the server's end of the control socket (blocking).
    @param header: a JSON-able L{dict}.
    @param fd: the descriptor to pass.
    """
    body = json.dumps(header).encode("utf-8")
    if len(body) > MAX_CONTROL_MESSAGE:
        raise ValueError("control message too large")
    data = _LENGTH.pack(len(body)) + body
    sent = socket.send_fds(sock, [data], [fd])
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_control(sock):
    """
    Wait for one control message.

    @return: C{(header, fd)}, or C{(None, None)} when the server went away.
    """
    data, fds, _, _ = socket.recv_fds(sock, 65536, 1)
    if not data:
        return None, None
    while len(data) < _LENGTH.size:
        more = sock.recv(65536)
        if not more:
            return None, None
        data += more
    (length,) = _LENGTH.unpack_from(data)
    if length > MAX_CONTROL_MESSAGE:
        raise ValueError("control message too large")
    while len(data) < _LENGTH.size + length:
        more = sock.recv(65536)
        if not more:
            return None, None
        data += more
    header = json.loads(data[_LENGTH.size : _LENGTH.size + length].decode("utf-8"))
    return header, (fds[0] if fds else None)


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


def _start_logging(silent=False):
    from twisted.logger import (
        FileLogObserver,
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        formatEvent,
        globalLogBeginner,
    )

    # The server stamps and relays each line; workers write the bare text.
    observer = FileLogObserver(sys.stdout, lambda event: (formatEvent(event) or "") + "\n")
    level = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn if silent else LogLevel.info)
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(observer, [level])], redirectStandardIO=False
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
    reactor.adoptStreamConnection(fd, family, tprotocol.Factory.forProtocol(lambda: carrier))
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


def fork_server_main(argv=None):
    """
    The fork server: import everything once, then fork one worker per session.

    @param argv: command-line arguments (see L{WorkerPool.argv}).
    @return: the exit code.
    """
    parser = argparse.ArgumentParser(prog="tvm_rpc.server.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--lifeline-fd", type=int, required=True)
    parser.add_argument("--work-root", required=True)
    parser.add_argument("--session-factory", default=DEFAULT_SESSION_FACTORY)
    parser.add_argument("--init", action="append", default=[])
    parser.add_argument("--session-settings", type=SessionSettings.from_json, default=None)
    parser.add_argument("--silent", action="store_true")
    args = parser.parse_args(argv)
    control = socket.socket(fileno=args.control_fd)
    lifeline = socket.socket(fileno=args.lifeline_fd)
    _start_logging(args.silent)
    module, make_session = load_callable(args.session_factory)
    if args.session_settings is not None:
        make_session = functools.partial(make_session, settings=args.session_settings)
    run_init(args.init)
    prepare = getattr(module, "prepare", None)
    if prepare is not None:
        # Import the array backend once, here, instead of in every session.
        prepare()
    tvm_problem = tvm_session.prepare()
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
            header, fd, lifeline.detach(), args.work_root, make_session, tvm_problem,
            args.session_settings,
        )

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
            try:
                header, fd = receive_control(theirs)
            except (OSError, ValueError):
                header = fd = None
            theirs.close()
            if header is None or fd is None:
                os._exit(0)
            serve(header, fd)
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


class _ForkServerProcess(tprotocol.ProcessProtocol):
    """The server's view of the fork server process: relays its output lines."""

    log = logger("tvm_rpc.server.worker")

    def __init__(self, pool):
        self.pool = pool
        self.server = None
        self.pid = None
        self.ended = None
        self._partial = {1: b"", 2: b""}

    def connectionMade(self):
        """Remember the pid; the fork server reads nothing on stdin."""
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        """Relay the fork server's and its workers' output, a line at a time."""
        buffered = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buffered.split(b"\n")
        for line in lines:
            self.log.info("worker: {line}", line=line.decode("utf-8", "replace"))

    def processEnded(self, reason):
        """Tell the pool: the sessions of this fork server can no longer be followed."""
        self.ended = reason
        self.pool._fork_server_ended(self, reason)


class _ControlReader(LineOnlyReceiver):
    """Reads the fork server's reports (one JSON object a line)."""

    delimiter = b"\n"
    MAX_LENGTH = 65536

    def __init__(self, pool, server):
        self.pool = pool
        self.server = server

    def lineReceived(self, line):
        """Pass one report to the pool; an unreadable line is ignored."""
        try:
            message = json.loads(line)
        except ValueError:
            return
        self.pool._report(self.server, message)


@attrs.define(eq=False)
class _Session:
    """A session handed to the fork server: the server's socket copy and timer."""

    id: int
    handoff: object
    socket: object
    server: object
    pid: "int | None" = None
    timer: object = None
    timed_out: bool = False


@attrs.define(eq=False)
class _ForkServer:
    """The server's handles on one fork server."""

    process: object
    control: object
    lifeline: object
    reader: object = None
    ready: bool = False


@implementer(ISessionRunner)
@attrs.define(eq=False)
class WorkerPool:
    """
    Runs each session in its own worker process, forked from a warm fork server.

    @ivar reactor: provides L{IReactorProcess}, L{IReactorSocket} and
        L{IReactorTime}.
    @ivar work_root: the directory under which sessions make their work
        directories.
    @ivar init: ``--init`` specs imported by the fork server at start.
    @ivar session_factory: ``module:callable`` making a session protocol from
        C{(work_root, clock=...)}, and C{settings=...} when L{session_settings}
        is given.
    @ivar session_settings: the L{SessionSettings<tvm_rpc.server.limits.SessionSettings>}
        passed to every session, or L{None} for the factory's defaults.
    @ivar timeout_notice: makes the bytes sent to a client whose session timed
        out, from the timeout in seconds; L{None} sends nothing.
    @ivar executable: the Python that runs the fork server.
    @ivar env: its environment (the server's own when L{None}).
    @ivar silent: whether workers log only warnings and errors.
    @ivar start_timeout: seconds a client has, once its handshake is
        answered, to send its first session message (L{None}: no limit).
    @ivar max_session_time: the longest a session may run, whatever its
        client asked for (L{None}: as long as the client asks).
    """

    log = logger("tvm_rpc.server.worker")

    reactor: object
    work_root: str
    init: tuple = ()
    session_factory: str = DEFAULT_SESSION_FACTORY
    session_settings: object = None
    timeout_notice: object = None
    executable: str = sys.executable
    env: "dict | None" = None
    silent: bool = False
    start_timeout: "float | None" = None
    max_session_time: "float | None" = None
    _server: object = attrs.field(init=False, default=None)
    _sessions: dict = attrs.field(init=False, factory=dict)
    _by_pid: dict = attrs.field(init=False, factory=dict)
    _next_id: int = attrs.field(init=False, default=0)
    _stopping: bool = attrs.field(init=False, default=False)
    sessions_started: int = attrs.field(init=False, default=0)
    sessions_by_protocol: dict = attrs.field(
        init=False, factory=lambda: {OUR_PROTOCOL: 0, TVM_PROTOCOL: 0}
    )
    crashes: int = attrs.field(init=False, default=0)
    tvm_problem: "str | None" = attrs.field(init=False, default=None)
    _ready_waiters: list = attrs.field(init=False, factory=list)

    def argv(self, control_fd, lifeline_fd=4):
        """@return: the fork server's command line."""
        args = [
            self.executable,
            "-m",
            "tvm_rpc.server.worker",
            "--control-fd",
            str(control_fd),
            "--lifeline-fd",
            str(lifeline_fd),
            "--work-root",
            self.work_root,
            "--session-factory",
            self.session_factory,
        ]
        for spec in self.init:
            args += ["--init", spec]
        if self.session_settings is not None:
            args += ["--session-settings", self.session_settings.to_json()]
        if self.silent:
            args.append("--silent")
        return args

    def when_ready(self):
        """
        @return: a Deferred firing once a fork server is ready to fork
            workers (at once if one is).
        """
        if self._server is not None and self._server.ready:
            return defer.succeed(None)
        waiter = defer.Deferred()
        self._ready_waiters.append(waiter)
        return waiter

    def warm_up(self):
        """Start the fork server if none runs."""
        if self._server is None and not self._stopping:
            self._server = self._spawn()

    def _spawn(self):
        control, child_control = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lifeline, child_lifeline = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        process = _ForkServerProcess(self)
        try:
            self.reactor.spawnProcess(
                process,
                self.executable,
                self.argv(3, 4),
                env=dict(os.environ) if self.env is None else self.env,
                childFDs={
                    0: "w",
                    1: "r",
                    2: "r",
                    3: child_control.fileno(),
                    4: child_lifeline.fileno(),
                },
            )
        finally:
            child_control.close()
            child_lifeline.close()
        server = _ForkServer(process, control, lifeline)
        process.server = server
        server.reader = _ControlReader(self, server)
        reading = control.dup()
        self.reactor.adoptStreamConnection(
            reading.fileno(), socket.AF_UNIX, tprotocol.Factory.forProtocol(lambda: server.reader)
        )
        reading.close()
        return server

    def refusal(self, protocol):
        """
        @return: L{None}: workers run both session protocols (a worker without
            TVM's runtime tells TVM's client what to install itself).
        """
        return None

    def start(self, handoff):
        """Pass the connection to the fork server, which forks its worker."""
        self.warm_up()
        server = self._server
        transport = handoff.transport
        transport.stopReading()
        transport.stopWriting()
        skt = transport.getHandle()
        self._next_id += 1
        session = _Session(self._next_id, handoff, skt, server)
        header = {
            "id": session.id,
            "reply": base64.b64encode(handoff.reply).decode("ascii"),
            "rest": base64.b64encode(handoff.rest).decode("ascii"),
            "peer": handoff.peer,
            "protocol": handoff.protocol,
            "start_timeout": self.start_timeout,
        }
        # The transport is left out of the reactor on purpose: closing it the
        # Twisted way would shut the socket down under the worker.
        try:
            send_control(server.control, header, skt.fileno())
        except OSError:
            self.log.warn("the fork server is gone; starting another")
            self._server = None
            self.warm_up()
            server = session.server = self._server
            send_control(server.control, header, skt.fileno())
        self._sessions[session.id] = session
        self.sessions_started += 1
        self.sessions_by_protocol[handoff.protocol] = (
            self.sessions_by_protocol.get(handoff.protocol, 0) + 1
        )

    def _report(self, server, message):
        if "ready" in message:
            server.ready = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            self.tvm_problem = message.get("tvm")
            if self.tvm_problem is None:
                self.log.info(
                    "fork server {pid} ready: serves tvm_rpc's and Apache TVM's clients",
                    pid=message["ready"],
                )
            else:
                self.log.warn(
                    "fork server {pid} ready: serves tvm_rpc's clients only; Apache TVM's "
                    "clients are refused, as TVM's runtime cannot be imported ({problem})",
                    pid=message["ready"],
                    problem=self.tvm_problem,
                )
        elif "started" in message:
            session = self._sessions.get(message.get("id"))
            if session is None:
                return
            session.pid = message["started"]
            self._by_pid[session.pid] = session
            timeout = self.session_time(session.handoff)
            if timeout:
                # The session's time starts with its worker, not while the
                # fork server is still starting up.
                session.timer = self.reactor.callLater(timeout, self._expired, session)
        elif "ended" in message:
            session = self._by_pid.pop(message["ended"], None)
            if session is not None:
                self._finish(session, message.get("code"), message.get("signal"))

    def session_time(self, handoff):
        """@return: the seconds C{handoff}'s session may run (L{None}: no limit)."""
        return session_time(handoff.timeout, self.max_session_time)

    def _expired(self, session):
        session.timer = None
        session.timed_out = True
        self.log.warn(
            "session for {peer} exceeded its {timeout}s timeout; killing its worker",
            peer=session.handoff.peer,
            timeout=self.session_time(session.handoff),
        )
        self._kill(session)

    def _kill(self, session):
        if session.pid is None:
            return
        try:
            os.killpg(session.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(session.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _finish(self, session, code, signal_number):
        self._sessions.pop(session.id, None)
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None
        # Whatever the worker started dies with it, and what it could not
        # clean up (a kill, a crash) is removed here.
        self._kill(session)
        if session.pid is not None:
            remove_work_dirs_of(self.work_root, session.pid)
        if session.timed_out:
            self._send_notice(session)
        elif code in EXIT_REASONS and signal_number is None:
            level = self.log.warn if code == EXIT_NO_START else self.log.info
            level(
                "worker {pid} for {peer} ended: {reason}",
                pid=session.pid,
                peer=session.handoff.peer,
                reason=EXIT_REASONS[code],
            )
        elif code not in (0, None) or signal_number is not None:
            self.crashes += 1
            self.log.warn(
                "worker {pid} for {peer} died (exit code {code}, signal {signal}); "
                "the server goes on",
                pid=session.pid,
                peer=session.handoff.peer,
                code=code,
                signal=signal_number,
            )
        try:
            session.socket.close()
        finally:
            session.handoff.slot.release()
        self.log.info(
            "{protocol} session for {peer} ended (sessions so far: {counts})",
            protocol=session.handoff.protocol,
            peer=session.handoff.peer,
            counts=", ".join(f"{n} {name}" for name, n in self.sessions_by_protocol.items()),
        )

    def _send_notice(self, session):
        if session.handoff.protocol == TVM_PROTOCOL:
            make_notice = tvm_session.timeout_notice
        else:
            make_notice = self.timeout_notice
        if make_notice is None:
            return
        try:
            notice = make_notice(self.session_time(session.handoff))
            session.socket.setblocking(False)
            session.socket.send(notice)
        except Exception:
            self.log.failure(
                "could not tell {peer} its session timed out", peer=session.handoff.peer
            )

    def _fork_server_ended(self, process, reason):
        server = process.server
        if self._server is server:
            self._server = None
        if not self._stopping:
            self.log.warn("fork server ended: {reason}", reason=reason.getErrorMessage())
        # Without the fork server nobody reports these workers' ends: end them.
        for session in list(self._sessions.values()):
            if session.server is server:
                self._kill(session)
                self._by_pid.pop(session.pid, None)
                self._finish(session, None, signal.SIGKILL)
        for sock in (getattr(server, "control", None), getattr(server, "lifeline", None)):
            if sock is not None:
                sock.close()

    def stop(self):
        """Kill every worker and the fork server."""
        self._stopping = True
        for session in list(self._sessions.values()):
            self._kill(session)
        server = self._server
        if server is not None:
            server.lifeline.close()
            server.control.close()
            try:
                server.process.transport.signalProcess("KILL")
            except Exception:
                pass


if __name__ == "__main__":
    sys.exit(fork_server_main())
