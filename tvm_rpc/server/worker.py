"""Session worker processes: each session runs in a process that owns its socket.

The server keeps one *warm* worker ready: a child that has already imported
Twisted, the session code and the ``--init`` modules, and waits on a Unix
socket. When a handshake succeeds the server passes the connection's file
descriptor to it (``SCM_RIGHTS``) with the handshake reply and any early bytes;
the worker adopts the socket (``reactor.adoptStreamConnection``), writes the
reply, runs the session protocol and exits when the connection ends. A fresh
warm worker is started at once for the next session.

The server keeps its own copy of each session's descriptor, so that:

- a worker that crashes (``os._exit``, a segfault) or leaks ends only its own
  session: the server sees the process end, closes its copy and frees the slot;
- a session that outlives its ``-timeout=N`` is killed (the worker's whole
  process group, so children that user code started die too), the client is
  sent the session protocol's timeout notice on the server's copy, and the
  connection is closed.

Run as ``python -m tvm_rpc.server.worker --control-fd N ...`` by
:class:`WorkerPool`; never by hand.
"""

import argparse
import base64
import json
import os
import signal
import socket
import struct
import sys

import attrs
from twisted.internet import protocol as tprotocol
from zope.interface import implementer

from .listener import ISessionRunner
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


def encode_control(header, fd, sock):
    """
    Send one control message with a file descriptor.

    @param header: a JSON-able L{dict}.
    @param fd: the descriptor to pass.
    @param sock: the parent's end of the control socket (blocking).
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

    @return: C{(header, fd)}, or C{(None, None)} when the parent went away.
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
    The worker's side of an adopted connection: write the handshake reply,
    then hand every byte to the session protocol.
    """

    def __init__(self, session, reply, rest, on_lost):
        """
        @param session: the session protocol.
        @param reply: the handshake reply, written first.
        @param rest: bytes the client sent after its handshake.
        @param on_lost: called with the reason when the connection ends.
        """
        self._session = session
        self._reply = reply
        self._rest = rest
        self._on_lost = on_lost

    def connectionMade(self):
        """Reply, then start the session with the early bytes."""
        self.transport.write(self._reply)
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


class _ParentWatch(tprotocol.Protocol):
    """The worker's control socket during a session: EOF means the server died."""

    def __init__(self, on_gone):
        self._on_gone = on_gone

    def connectionLost(self, reason=None):
        self._on_gone()


def worker_main(argv=None):
    """
    The worker process: wait for one connection, serve one session, exit.

    @param argv: command-line arguments (see L{WorkerPool.argv}).
    """
    parser = argparse.ArgumentParser(prog="tvm_rpc.server.worker")
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--work-root", required=True)
    parser.add_argument("--session-factory", default=DEFAULT_SESSION_FACTORY)
    parser.add_argument("--init", action="append", default=[])
    args = parser.parse_args(argv)
    # Our own process group: the server kills the session with everything
    # user code started in it.
    os.setpgid(0, 0)
    control = socket.socket(fileno=args.control_fd)
    from twisted.logger import FileLogObserver, formatEvent, globalLogBeginner

    # The server stamps and relays each line; the worker writes the bare text.
    observer = FileLogObserver(sys.stdout, lambda event: (formatEvent(event) or "") + "\n")
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    log = logger("tvm_rpc.server.worker")
    _, make_session = load_callable(args.session_factory)
    run_init(args.init)
    from twisted.internet import reactor

    header, fd = receive_control(control)
    if header is None or fd is None:
        return 0
    probe = socket.socket(fileno=fd)
    family = probe.family
    probe.detach()
    session = make_session(args.work_root, clock=reactor)
    outcome = {"code": 0, "ended": False}

    def lost(reason):
        outcome["ended"] = True
        if reactor.running:
            reactor.stop()

    def parent_gone():
        if outcome["ended"]:
            return
        log.warn("server went away; ending the session")
        outcome["code"] = 3
        transport.abortConnection()

    carrier = SessionCarrier(
        session,
        base64.b64decode(header["reply"]),
        base64.b64decode(header["rest"]),
        lost,
    )
    factory = tprotocol.Factory.forProtocol(lambda: carrier)
    transport = reactor.adoptStreamConnection(fd, family, factory)
    os.close(fd)
    control.setblocking(False)
    reactor.adoptStreamConnection(
        control.fileno(), socket.AF_UNIX, tprotocol.Factory.forProtocol(lambda: _ParentWatch(parent_gone))
    )
    log.info("serving {peer}", peer=header.get("peer"))
    reactor.run()
    return outcome["code"]


class _WorkerProcess(tprotocol.ProcessProtocol):
    """The server's view of one worker process."""

    log = logger("tvm_rpc.server.worker")

    def __init__(self, pool):
        self.pool = pool
        self.pid = None
        self.control = None
        self.session = None
        self.ended = None
        self._partial = {1: b"", 2: b""}

    def connectionMade(self):
        self.pid = self.transport.pid
        self.transport.closeStdin()

    def childDataReceived(self, fd, data):
        buffered = self._partial.get(fd, b"") + data
        *lines, self._partial[fd] = buffered.split(b"\n")
        for line in lines:
            self.log.info(
                "worker {pid}: {line}", pid=self.pid, line=line.decode("utf-8", "replace")
            )

    def processEnded(self, reason):
        self.ended = reason
        if self.control is not None:
            self.control.close()
            self.control = None
        self.pool._ended(self, reason)


@attrs.define(eq=False)
class _Session:
    """A session running in a worker: the server's copy of its socket and timer."""

    handoff: object
    socket: object
    timer: object = None
    timed_out: bool = False


@implementer(ISessionRunner)
@attrs.define(eq=False)
class WorkerPool:
    """
    Runs each session in its own worker process, keeping one warm.

    @ivar reactor: provides L{IReactorProcess} and L{IReactorTime}.
    @ivar work_root: the directory under which sessions make their work
        directories.
    @ivar init: ``--init`` specs the workers import at start.
    @ivar session_factory: ``module:callable`` making a session protocol from
        C{(work_root, clock=...)}.
    @ivar timeout_notice: makes the bytes sent to a client whose session timed
        out, from the timeout in seconds; L{None} sends nothing.
    @ivar executable: the Python that runs workers.
    @ivar env: the workers' environment (the server's own when L{None}).
    """

    log = logger("tvm_rpc.server.worker")

    reactor: object
    work_root: str
    init: tuple = ()
    session_factory: str = DEFAULT_SESSION_FACTORY
    timeout_notice: object = None
    executable: str = sys.executable
    env: "dict | None" = None
    _warm: object = attrs.field(init=False, default=None)
    _workers: set = attrs.field(init=False, factory=set)
    _stopping: bool = attrs.field(init=False, default=False)
    sessions_started: int = attrs.field(init=False, default=0)
    crashes: int = attrs.field(init=False, default=0)

    def argv(self, control_fd):
        """@return: the command line of a worker whose control socket is C{control_fd}."""
        args = [
            self.executable,
            "-m",
            "tvm_rpc.server.worker",
            "--control-fd",
            str(control_fd),
            "--work-root",
            self.work_root,
            "--session-factory",
            self.session_factory,
        ]
        for spec in self.init:
            args += ["--init", spec]
        return args

    def warm_up(self):
        """Start the warm worker if there is none."""
        if self._warm is None and not self._stopping:
            self._warm = self._spawn()

    def _spawn(self):
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        worker = _WorkerProcess(self)
        try:
            self.reactor.spawnProcess(
                worker,
                self.executable,
                self.argv(3),
                env=dict(os.environ) if self.env is None else self.env,
                childFDs={0: "w", 1: "r", 2: "r", 3: child.fileno()},
            )
        finally:
            child.close()
        worker.control = parent
        self._workers.add(worker)
        return worker

    def start(self, handoff):
        """Pass the connection to the warm worker and warm up the next one."""
        worker, self._warm = self._warm, None
        if worker is None or worker.ended is not None:
            worker = self._spawn()
        transport = handoff.transport
        transport.stopReading()
        transport.stopWriting()
        skt = transport.getHandle()
        header = {
            "reply": base64.b64encode(handoff.reply).decode("ascii"),
            "rest": base64.b64encode(handoff.rest).decode("ascii"),
            "peer": handoff.peer,
        }
        try:
            encode_control(header, skt.fileno(), worker.control)
        except OSError:
            self.log.warn("warm worker {pid} is gone; starting another", pid=worker.pid)
            worker = self._spawn()
            encode_control(header, skt.fileno(), worker.control)
        # The transport is left out of the reactor on purpose: closing it the
        # Twisted way would shut the socket down under the worker.
        session = _Session(handoff, skt)
        if handoff.timeout:
            session.timer = self.reactor.callLater(
                handoff.timeout, self._expired, worker, session
            )
        worker.session = session
        self.sessions_started += 1
        self.warm_up()

    def _expired(self, worker, session):
        session.timer = None
        session.timed_out = True
        self.log.warn(
            "session for {peer} exceeded its {timeout}s timeout; killing worker {pid}",
            peer=session.handoff.peer,
            timeout=session.handoff.timeout,
            pid=worker.pid,
        )
        self._kill(worker)

    def _kill(self, worker):
        if worker.ended is not None or worker.pid is None:
            return
        try:
            os.killpg(worker.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                worker.transport.signalProcess("KILL")
            except Exception:
                pass

    def _ended(self, worker, reason):
        self._workers.discard(worker)
        if worker is self._warm:
            self._warm = None
        session = worker.session
        code = getattr(reason.value, "exitCode", None)
        signal_number = getattr(reason.value, "signal", None)
        if session is None:
            if not self._stopping:
                self.log.warn(
                    "idle worker {pid} ended (exit code {code}, signal {signal})",
                    pid=worker.pid,
                    code=code,
                    signal=signal_number,
                )
            return
        worker.session = None
        if session.timer is not None and session.timer.active():
            session.timer.cancel()
        if session.timed_out:
            self._send_notice(session)
        elif code not in (0, None) or signal_number is not None:
            self.crashes += 1
            self.log.warn(
                "worker {pid} for {peer} died (exit code {code}, signal {signal}); "
                "the server goes on",
                pid=worker.pid,
                peer=session.handoff.peer,
                code=code,
                signal=signal_number,
            )
        try:
            session.socket.close()
        finally:
            session.handoff.slot.release()
        self.log.info("session for {peer} ended", peer=session.handoff.peer)

    def _send_notice(self, session):
        if self.timeout_notice is None:
            return
        try:
            notice = self.timeout_notice(session.handoff.timeout)
            session.socket.setblocking(False)
            session.socket.send(notice)
        except Exception:
            self.log.failure("could not tell {peer} its session timed out", peer=session.handoff.peer)

    def stop(self):
        """Kill every worker, idle or busy."""
        self._stopping = True
        for worker in list(self._workers):
            self._kill(worker)
            if worker.control is not None:
                worker.control.close()
                worker.control = None


if __name__ == "__main__":
    sys.exit(worker_main())
