"""Session worker processes, the server's side: the pool that hands sessions to them.

A L{WorkerPool} runs each session in its own worker process, forked
from a warm fork server (the child side: L{worker<tvm_rpc.server.worker>}) that
the pool starts as C{python -m tvm_rpc.server.worker} and hands each
session's socket to (L{control<tvm_rpc.server.control>}). The fork server reports
when it is ready, and each worker's pid as it starts and its exit status as
it ends; the pool reads those reports (L{_ControlReader}) and relays
the output of the fork server and its workers to the server's log.

The server keeps its own copy of each session's descriptor, so that:

  - a worker that crashes (C{os._exit}, a segfault) or leaks ends only its own
    session: the server hears of the exit, closes its copy and frees the slot;
  - a session that outlives its C{-timeout=N} (or the server's
    C{--max-session-time}) is killed (the worker's whole process group, so
    children that user code started die too), the client is sent its session
    protocol's timeout notice on the server's copy, and the connection is
    closed;
  - however a worker ends, the server kills what is left of its process group
    and removes its work directory.

A worker may serve more than one session of the same client: when our
client ends a session with C{Goodbye(keep=True)}, the worker answers a
token (made here, one per session) and, once the connection is closed,
waits. The next session that presents the token in its handshake
(C{-resume=}) within L{WorkerPool.keep_worker} seconds runs in that worker:
no fork, no fresh process to warm up, no exit. Any other session retires
it first (retiring kills its process group), so kept workers never
outnumber the sessions at once, and a worker whose session failed, timed
out or was refused is never kept. C{--keep-worker 0} gives every session
a fresh worker.
"""

import base64
import json
import os
import signal
import socket
import sys

import attrs
from twisted.internet import defer
from twisted.internet import protocol as tprotocol
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from ..protocol.flavour import OUR_PROTOCOL, TVM_PROTOCOL
from ..protocol.keys import resume_token
from ..transport import quiet_factory
from . import tvm_session
from .control import send_control, site_flags
from .activity import ServerActivity
from .listener import ISessionRunner, log_session_end, session_time
from .logs import logger
from .modules import DEFAULT_SESSION_FACTORY
from .watchdog import EXIT_CAUSES, EXIT_NO_START, EXIT_REASONS
from .workdir import remove_work_dirs_of

#: The log namespace of the pool's lines (that of the module it came from,
#: which operators' log filters name).
LOG_NAMESPACE = "tvm_rpc.server.worker"

#: Seconds a worker whose client asked to keep it waits for that client's
#: next session (C{--keep-worker}): a tuner's next candidate comes in
#: milliseconds; a client that does not come back frees it soon.
KEEP_WORKER_SECONDS = 5.0


class _ForkServerProcess(tprotocol.ProcessProtocol):
    """The server's view of the fork server process: relays its output lines."""

    log = logger(LOG_NAMESPACE)

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
    started: float = 0.0
    token: "str | None" = None
    resumes: "int | None" = None


@attrs.define(eq=False)
class _Kept:
    """A worker waiting for the next session of the client that holds its token."""

    pid: int
    server: object
    timer: object = None


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
    @ivar init: C{--init} specs imported by the fork server at start.
    @ivar session_factory: C{module:callable} making a session protocol from
        C{(work_root, clock=...)}, and C{settings=...} when L{session_settings}
        is given.
    @ivar session_settings: the L{SessionSettings<tvm_rpc.server.limits.SessionSettings>}
        passed to every session, or L{None} for the factory's defaults.
    @ivar timeout_notice: makes the bytes sent to a client whose session timed
        out, from the timeout in seconds; L{None} sends nothing.
    @ivar executable: the Python that runs the fork server.
    @ivar interpreter_flags: the flags it is run with (L{site_flags}).
    @ivar env: its environment (the server's own when L{None}).
    @ivar silent: whether workers log only warnings and errors.
    @ivar verbose: whether workers log Twisted's lines and debug lines too.
    @ivar libraries: absolute paths of the C{--load-library} libraries,
        loaded in every process that serves sessions.
    @ivar spawn: whether workers are started as fresh interpreters instead
        of forks of the fork server (C{--no-fork}, TVM's meaning).
    @ivar start_timeout: seconds a client has, once its handshake is
        answered, to send its first session message (L{None}: no limit).
    @ivar max_session_time: the longest a session may run, whatever its
        client asked for (L{None}: as long as the client asks).
    @ivar keep_worker: seconds a worker waits for its client's next session
        when that client asks to keep it (see the module); 0 or L{None}: never.
    @ivar activity: the L{ServerActivity} counting sessions and worker exits.
    """

    log = logger(LOG_NAMESPACE)

    reactor: object
    work_root: str
    init: tuple = ()
    session_factory: str = DEFAULT_SESSION_FACTORY
    session_settings: object = None
    timeout_notice: object = None
    executable: str = sys.executable
    interpreter_flags: tuple = attrs.field(factory=site_flags)
    env: "dict | None" = None
    silent: bool = False
    verbose: bool = False
    libraries: tuple = ()
    spawn: bool = False
    start_timeout: "float | None" = None
    max_session_time: "float | None" = None
    keep_worker: "float | None" = KEEP_WORKER_SECONDS
    activity: ServerActivity = attrs.field(factory=ServerActivity, repr=False)
    _kept: dict = attrs.field(init=False, factory=dict)
    _retiring: set = attrs.field(init=False, factory=set)
    _server: object = attrs.field(init=False, default=None)
    _sessions: dict = attrs.field(init=False, factory=dict)
    _by_pid: dict = attrs.field(init=False, factory=dict)
    _next_id: int = attrs.field(init=False, default=0)
    _stopping: bool = attrs.field(init=False, default=False)
    tvm_problem: "str | None" = attrs.field(init=False, default=None)
    _ready_waiters: list = attrs.field(init=False, factory=list)

    def argv(self, control_fd, lifeline_fd=4):
        """@return: the fork server's command line."""
        args = [
            self.executable,
            *self.interpreter_flags,
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
        for path in self.libraries:
            args += ["--load-library", path]
        if self.session_settings is not None:
            args += ["--session-settings", self.session_settings.to_json()]
        if self.silent:
            args.append("--silent")
        if self.verbose:
            args.append("--verbose")
        if self.spawn:
            args.append("--spawn")
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

    @property
    def crashes(self):
        """How many sessions ended because their worker died (a signal, an error exit)."""
        return sum(self.activity.ended[(protocol, "worker_crashed")]
                   for protocol in (OUR_PROTOCOL, TVM_PROTOCOL))

    def spare_ready(self):
        """
        @return: whether a fork server is ready, its spare worker forked (or
            spawned) ahead of the next session.
        """
        return self._server is not None and self._server.ready

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
            reading.fileno(), socket.AF_UNIX, quiet_factory(lambda: server.reader)
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
        session = _Session(self._next_id, handoff, skt, server, started=self.reactor.seconds())
        header = {
            "id": session.id,
            "reply": base64.b64encode(handoff.reply).decode("ascii"),
            "rest": base64.b64encode(handoff.rest).decode("ascii"),
            "peer": handoff.peer,
            "protocol": handoff.protocol,
            "start_timeout": self.start_timeout,
        }
        kept = self._drop_kept(handoff.resume)
        if kept is not None:
            if kept.server is server:
                session.resumes = header["resume"] = kept.pid
            else:
                self._retire(kept)
        # Anyone else's kept worker goes first: they never outnumber the
        # sessions at once.
        self.retire_kept()
        if self.keep_worker and handoff.protocol == OUR_PROTOCOL:
            session.token = header["token"] = resume_token()
            header["keep_for"] = self.keep_worker
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
        self.activity.session_started(handoff.protocol)

    def _report(self, server, message):
        if "ready" in message:
            server.ready = True
            waiters, self._ready_waiters = self._ready_waiters, []
            for waiter in waiters:
                waiter.callback(None)
            self.tvm_problem = message.get("tvm")
            if self.tvm_problem is None:
                self.log.info(
                    "fork server {pid} ready ({workers}): serves tvm_rpc's and Apache TVM's "
                    "clients", pid=message["ready"], workers=self._workers_started(),
                )
            else:
                self.log.warn(
                    "fork server {pid} ready ({workers}): serves tvm_rpc's clients only; "
                    "Apache TVM's clients are refused, as TVM's runtime cannot be imported "
                    "({problem})",
                    pid=message["ready"],
                    workers=self._workers_started(),
                    problem=self.tvm_problem,
                )
        elif "started" in message:
            session = self._sessions.get(message.get("id"))
            if session is None:
                return
            session.pid = message["started"]
            self._by_pid[session.pid] = session
            if session.resumes == session.pid:
                self.activity.session_in_kept_worker()
            timeout = self.session_time(session.handoff)
            if timeout:
                # The session's time starts with its worker, not while the
                # fork server is still starting up.
                session.timer = self.reactor.callLater(timeout, self._expired, session)
        elif "idle" in message:
            session = self._by_pid.get(message["idle"])
            if session is None or session.id != message.get("id") or session.timed_out:
                return
            del self._by_pid[session.pid]
            kept = _Kept(session.pid, server)
            if session.token is None or self._stopping:
                self._retire(kept)
            else:
                # Kept before the slot is freed: freeing it may start the
                # client's next session at once (it waited for the slot).
                kept.timer = self.reactor.callLater(self.keep_worker, self._expire, session.token)
                self._kept[session.token] = kept
            self._finish(session, 0, None, kept=True)
        elif "ended" in message:
            session = self._by_pid.pop(message["ended"], None)
            if session is not None:
                self._finish(session, message.get("code"), message.get("signal"))
            else:
                self._kept_ended(message["ended"])

    def retire_kept(self):
        """Retire every worker waiting for its client's next session."""
        for token in list(self._kept):
            self._retire(self._drop_kept(token))

    def _expire(self, token):
        """Its client did not come back in time: retire the kept worker."""
        kept = self._drop_kept(token)
        if kept is not None:
            self._retire(kept)

    def _drop_kept(self, token):
        """@return: the worker kept for C{token}, no longer waiting (or L{None})."""
        kept = self._kept.pop(token, None) if token else None
        if kept is not None and kept.timer.active():
            kept.timer.cancel()
        return kept

    def _retire(self, kept):
        """
        End a kept worker, and whatever its sessions started, at once: it
        is idle, so nothing is lost, and a worker whose code hogs the CPU or
        blocks its reactor cannot linger beside the next client's session.
        """
        self._retiring.add(kept.pid)
        self._kill_group(kept.pid)

    def _kept_ended(self, pid):
        """A worker ended that no session was running in: kept, retired, or neither (a spare)."""
        known = pid in self._retiring
        self._retiring.discard(pid)
        for token, kept in list(self._kept.items()):
            if kept.pid == pid:
                # It died while kept (killed from outside).
                known = True
                self._drop_kept(token)
                self._kill_group(pid)
        if not known:
            return
        remove_work_dirs_of(self.work_root, pid)
        self.activity.worker_exited("clean")

    def _workers_started(self):
        """@return: how workers start, for the ready line (TVM's server gives the same hint)."""
        if self.spawn:
            return "workers spawned, --no-fork"
        return "workers forked; --no-fork spawns them for GPU runtimes that break across fork"

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
        if session.pid is not None:
            self._kill_group(session.pid)

    @staticmethod
    def _kill_group(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _finish(self, session, code, signal_number, kept=False):
        """
        A session ended: log it, count it, close the server's copy of its
        socket and free its slot.

        @param kept: its worker lives on, waiting for the client's next
            session (it removed the session's work directory itself).
        """
        self._sessions.pop(session.id, None)
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        session.timer = None
        if not kept:
            # Whatever the worker started dies with it, and what it could
            # not clean up (a kill, a crash) is removed here.
            self._kill(session)
            if session.pid is not None:
                remove_work_dirs_of(self.work_root, session.pid)
        failed = True
        if session.timed_out:
            self._send_notice(session)
            how = f"timed out after {self.session_time(session.handoff):g}s"
            cause, exit_cause = "timeout", "killed"
        elif code in EXIT_REASONS and signal_number is None:
            how = EXIT_REASONS[code]
            failed = code == EXIT_NO_START
            cause = exit_cause = EXIT_CAUSES[code]
        elif code not in (0, None) or signal_number is not None:
            how = (f"its worker died (exit code {code}, signal {signal_number}); "
                   "the server goes on")
            cause, exit_cause = "worker_crashed", "error" if signal_number is None else "signal"
        else:
            how, failed = "closed", False
            cause, exit_cause = "closed", "clean"
        duration = self.reactor.seconds() - session.started
        try:
            counts = log_session_end(self.log, session.handoff, how, duration, session.socket,
                                     f"worker {session.pid}", warn=failed)
            self.activity.session_ended(session.handoff.protocol, cause, duration, counts)
            if session.pid is not None and not kept:
                self.activity.worker_exited(exit_cause)
        finally:
            try:
                session.socket.close()
            finally:
                session.handoff.slot.release()

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
        for token, kept in list(self._kept.items()):
            if kept.server is server:
                self._kill_group(self._drop_kept(token).pid)
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
        for token in list(self._kept):
            self._kill_group(self._drop_kept(token).pid)
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
