"""The server's side of the worker processes, with a fake process reactor.

Real processes are exercised by ``tests/test_server_daemon.py``; here the fork
server's reports are fed by hand, so timeouts, crashes and a dying fork
server are checked deterministically.
"""

import os
import signal
import socket
import types

import pytest
from twisted.internet.error import ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.server import pool as pool_module
from tvm_rpc.server import worker as worker_module
from tvm_rpc.server import control
from tvm_rpc.server.control import receive_control, send_control
from tvm_rpc.server.gate import SessionGate
from tvm_rpc.server.listener import Handoff
from tvm_rpc.server.pool import WorkerPool

pytestmark = pytest.mark.unit


class FakeProcessTransport:
    def __init__(self, pid):
        self.pid = pid
        self.signals = []

    def closeStdin(self):
        pass

    def signalProcess(self, name):
        self.signals.append(name)


class ProcessReactor(MemoryReactorClock):
    """Records spawned processes, keeping a copy of the descriptors handed to them."""

    def __init__(self):
        super().__init__()
        self.spawned = []

    def spawnProcess(self, protocol, executable, args=(), env=None, path=None, uid=None,
                     gid=None, usePTY=False, childFDs=None):
        kept = {n: socket.socket(fileno=os.dup(fd)) for n, fd in childFDs.items()
                if isinstance(fd, int)}
        self.spawned.append((protocol, args, kept))
        protocol.makeConnection(FakeProcessTransport(1000 + len(self.spawned)))


class FakeTCPTransport:
    """A session connection: a real socket handle, reading switched off by the pool."""

    def __init__(self, sock):
        self.sock = sock
        self.reading = True

    def stopReading(self):
        self.reading = False

    def stopWriting(self):
        pass

    def getHandle(self):
        return self.sock


class WorkerPoolTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = ProcessReactor()
        self.killed = []
        self.patch(pool_module.os, "killpg", lambda pid, sig: self.killed.append((pid, sig)))
        self.pool = WorkerPool(
            self.reactor, "/work-root", init=("mod:fn",), session_factory="a.b:c",
            timeout_notice=lambda seconds: f"timeout {seconds:g}".encode(),
        )
        self.pool.warm_up()
        self.gate = SessionGate("k", max_sessions=4)
        self.client_ends = []

    def tearDown(self):
        for _, _, kept in self.reactor.spawned:
            for sock in kept.values():
                sock.close()
        for sock in self.client_ends:
            sock.close()

    def fork_server(self, index=-1):
        protocol, args, kept = self.reactor.spawned[index]
        return protocol, args, kept[3]

    def start_session(self, timeout=None, rest=b"", resume=None, slot=None,
                      protocol="tvm_rpc"):
        server_end, client_end = socket.socketpair()
        self.client_ends.append(client_end)
        if slot is None:
            slot = self.successResultOf(self.gate.claim("k"))
        handoff = Handoff(FakeTCPTransport(server_end), None, b"REPLY", rest, timeout, "peer", slot,
                          protocol=protocol, resume=resume)
        self.pool.start(handoff)
        return handoff, client_end

    def control_message(self):
        """@return: the next message the fork server reads (its descriptor closed)."""
        _, _, control = self.fork_server()
        header, fd = receive_control(control)
        if fd is not None:
            os.close(fd)
        return header

    def kept_worker(self, pid=50):
        """Run a session whose worker is kept; @return: its token."""
        handoff, _ = self.start_session()
        header = self.control_message()
        self.report({"started": pid, "id": header["id"]})
        self.report({"idle": pid, "id": header["id"]})
        self.assertTrue(handoff.slot.released)
        return header["token"]

    def test_kept_worker_serves_the_next_session_of_its_token(self):
        """
        A worker that reports idle (its client asked to keep it) ends its
        session as closed without being killed, and the session that presents
        its token is handed to it.
        """
        token = self.kept_worker(50)
        self.assertEqual(self.killed, [])
        self.assertEqual(dict(self.pool.activity.worker_exits), {})
        self.assertEqual(self.pool.activity.ended[("tvm_rpc", "closed")], 1)
        self.start_session(resume=token)
        header = self.control_message()
        self.assertEqual(header["resume"], 50)
        self.assertNotEqual(header["token"], token)
        self.assertEqual(self.pool.activity.kept_worker_sessions, 0)
        self.report({"started": 50, "id": header["id"]})
        self.assertEqual(self.pool.activity.kept_worker_sessions, 1)
        self.report({"ended": 50, "code": 0, "signal": None})
        self.assertEqual(self.killed, [(50, signal.SIGKILL)])

    def test_token_serves_once(self):
        """A token used once is gone: a second session presenting it gets a fresh worker."""
        token = self.kept_worker(50)
        self.start_session(resume=token)
        self.control_message()
        self.start_session(resume=token)
        self.assertNotIn("resume", self.control_message())

    def test_any_other_session_retires_the_kept_worker(self):
        """A session without the token (or with another) retires the kept worker first."""
        token = self.kept_worker(50)
        self.start_session(resume="0" * 32)
        # Killed with what it started, before the fork server hears of the session.
        self.assertEqual(self.killed, [(50, signal.SIGKILL)])
        self.assertNotIn("resume", self.control_message())
        self.start_session(resume=token)
        self.assertNotIn("resume", self.control_message())
        # Its exit is counted once it comes.
        self.report({"ended": 50, "code": None, "signal": 9})
        self.assertEqual(dict(self.pool.activity.worker_exits), {"clean": 1})

    def test_kept_worker_is_retired_after_keep_worker_seconds(self):
        """A client that does not come back within --keep-worker frees the worker."""
        token = self.kept_worker(50)
        self.reactor.advance(pool_module.KEEP_WORKER_SECONDS - 0.1)
        self.assertEqual(self.pool._kept.keys(), {token})
        self.assertEqual(self.killed, [])
        self.reactor.advance(0.2)
        self.assertEqual(self.killed, [(50, signal.SIGKILL)])
        self.start_session(resume=token)
        self.assertNotIn("resume", self.control_message())

    def test_waiting_session_resumes_when_the_slot_frees(self):
        """
        The client's next session may be waiting for the slot when the worker
        reports idle: it is handed to that worker, not to a fresh one.
        """
        self.gate = SessionGate("k", max_sessions=1)
        self.start_session()
        header = self.control_message()
        self.report({"started": 60, "id": header["id"]})
        self.gate.claim("k").addCallback(
            lambda slot: self.start_session(resume=header["token"], slot=slot))
        self.report({"idle": 60, "id": header["id"]})
        self.assertEqual(self.control_message()["resume"], 60)

    def test_no_token_without_keep_worker_or_for_tvm_sessions(self):
        """--keep-worker 0 never keeps a worker; TVM's protocol never does."""
        self.pool.keep_worker = 0
        self.start_session()
        self.assertNotIn("token", self.control_message())
        self.pool.keep_worker = 5
        self.start_session(protocol="tvm")
        self.assertNotIn("token", self.control_message())

    def test_timed_out_session_is_not_kept(self):
        """An idle report from a worker whose session timed out (being killed) is ignored."""
        handoff, _ = self.start_session(timeout=1)
        header = self.control_message()
        self.report({"started": 70, "id": header["id"]})
        self.reactor.advance(1.1)
        self.report({"idle": 70, "id": header["id"]})
        self.assertFalse(handoff.slot.released)
        self.report({"ended": 70, "code": None, "signal": 9})
        self.assertTrue(handoff.slot.released)
        self.start_session(resume=header["token"])
        self.assertNotIn("resume", self.control_message())

    def test_stop_and_fork_server_death_end_kept_workers(self):
        """Kept workers die with the pool, and with their fork server."""
        self.kept_worker(50)
        protocol, _, _ = self.fork_server()
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertIn((50, signal.SIGKILL), self.killed)
        self.assertEqual(self.pool._kept, {})
        self.killed.clear()
        self.kept_worker(51)
        self.pool.stop()
        self.assertIn((51, signal.SIGKILL), self.killed)

    def report(self, message, index=-1):
        protocol, _, _ = self.fork_server(index)
        self.pool._report(protocol.server, message)

    def test_one_fork_server_with_the_options(self):
        """warm_up starts one fork server with the control and lifeline sockets."""
        self.pool.warm_up()
        self.assertEqual(len(self.reactor.spawned), 1)
        _, args, kept = self.reactor.spawned[0]
        self.assertEqual(sorted(kept), [3, 4])
        self.assertEqual(args[1:3], ["-m", "tvm_rpc.server.worker"])
        self.assertIn("--init", args)
        self.assertEqual(args[args.index("--session-factory") + 1], "a.b:c")

    def test_handoff_passes_descriptor(self):
        """The connection's descriptor, reply and early bytes reach the fork server."""
        handoff, client_end = self.start_session(rest=b"early")
        self.assertFalse(handoff.transport.reading)
        _, _, control = self.fork_server()
        header, fd = receive_control(control)
        self.assertEqual(header["id"], 1)
        self.assertEqual(header["peer"], "peer")
        self.assertIsNotNone(fd)
        passed = socket.socket(fileno=fd)
        passed.sendall(b"from the worker")
        self.assertEqual(client_end.recv(100), b"from the worker")
        passed.close()

    def test_normal_end(self):
        """A worker's clean exit frees the slot and closes the server's copy."""
        handoff, _ = self.start_session()
        self.report({"started": 4242, "id": 1})
        self.report({"ended": 4242, "code": 0, "signal": None})
        self.assertTrue(handoff.slot.released)
        self.assertEqual(handoff.transport.sock.fileno(), -1)
        self.assertEqual(self.pool.crashes, 0)

    def test_crash(self):
        """A segfault is counted and ends only that session."""
        first, _ = self.start_session()
        second, _ = self.start_session()
        self.report({"started": 1, "id": 1})
        self.report({"started": 2, "id": 2})
        self.report({"ended": 1, "code": None, "signal": 11})
        self.assertEqual(self.pool.crashes, 1)
        self.assertTrue(first.slot.released)
        self.assertFalse(second.slot.released)

    def test_timeout_counts_from_start_and_kills_group(self):
        """The timer starts with the worker; expiry kills its group and sends the notice."""
        handoff, client_end = self.start_session(timeout=5)
        self.reactor.advance(100)
        self.assertEqual(self.killed, [])
        self.report({"started": 77, "id": 1})
        self.reactor.advance(4.9)
        self.assertEqual(self.killed, [])
        self.reactor.advance(0.2)
        self.assertEqual(self.killed, [(77, signal.SIGKILL)])
        self.report({"ended": 77, "code": None, "signal": 9})
        self.assertEqual(client_end.recv(100), b"timeout 5")
        self.assertTrue(handoff.slot.released)
        self.assertEqual(self.pool.crashes, 0)

    def test_fork_server_death_ends_its_sessions(self):
        """If the fork server dies, its sessions end and the next one gets a new server."""
        handoff, _ = self.start_session()
        self.report({"started": 5, "id": 1})
        protocol, _, _ = self.fork_server()
        protocol.processEnded(Failure(ProcessTerminated(signal=9)))
        self.assertTrue(handoff.slot.released)
        self.assertIn((5, signal.SIGKILL), self.killed)
        later, _ = self.start_session()
        self.assertEqual(len(self.reactor.spawned), 2)
        self.assertFalse(later.slot.released)

    def test_ready_waiters(self):
        """when_ready waits for the fork server's ready report, then answers at once."""
        waiting = self.pool.when_ready()
        self.assertNoResult(waiting)
        self.report({"ready": 1001, "tvm": None})
        self.successResultOf(waiting)
        self.successResultOf(self.pool.when_ready())
        self.assertIsNone(self.pool.tvm_problem)

    def test_max_session_time_caps_every_session(self):
        """--max-session-time ends a session whose client asked for none, or for more."""
        self.pool.max_session_time = 3
        for asked, pid in ((None, 81), (10, 82), (2, 83)):
            self.killed.clear()
            handoff, _ = self.start_session(timeout=asked)
            self.report({"started": pid, "id": self.pool._next_id})
            limit = min(t for t in (asked, 3) if t)
            self.reactor.advance(limit - 0.1)
            self.assertEqual(self.killed, [])
            self.reactor.advance(0.2)
            self.assertEqual(self.killed, [(pid, signal.SIGKILL)])
            self.report({"ended": pid, "code": None, "signal": 9})
            self.assertTrue(handoff.slot.released)

    def test_start_timeout_and_protocol_reach_the_worker(self):
        """The control message carries the start timeout and the session protocol."""
        self.pool.start_timeout = 7.5
        self.start_session(protocol="tvm")
        header = self.control_message()
        self.assertEqual((header["start_timeout"], header["protocol"]), (7.5, "tvm"))
        self.assertEqual(dict(self.pool.activity.started), {"tvm": 1})

    def test_end_kills_the_group_and_removes_the_work_directory(self):
        """However a worker ends, its group is killed and its work directory removed."""
        import tempfile

        from tvm_rpc.server.watchdog import EXIT_CLIENT_GONE

        root = tempfile.mkdtemp()
        self.addCleanup(os.rmdir, root)
        self.pool.work_root = root
        os.mkdir(os.path.join(root, "session-91-abc"))
        os.mkdir(os.path.join(root, "session-910-abc"))
        self.addCleanup(os.rmdir, os.path.join(root, "session-910-abc"))
        handoff, _ = self.start_session()
        self.report({"started": 91, "id": 1})
        self.report({"ended": 91, "code": EXIT_CLIENT_GONE, "signal": None})
        self.assertEqual(self.killed, [(91, signal.SIGKILL)])
        self.assertEqual(sorted(os.listdir(root)), ["session-910-abc"])
        self.assertTrue(handoff.slot.released)
        # A client that went away is not a crash.
        self.assertEqual(self.pool.crashes, 0)

    def test_stop_kills_everything(self):
        self.start_session()
        self.report({"started": 9, "id": 1})
        self.pool.stop()
        self.assertIn((9, signal.SIGKILL), self.killed)
        protocol, _, _ = self.fork_server()
        self.assertEqual(protocol.transport.signals, ["KILL"])
        self.pool.warm_up()
        self.assertEqual(len(self.reactor.spawned), 1)



class ControlMessageTests(SynchronousTestCase):
    def test_queued_messages_stay_apart(self):
        """Messages queued while the fork server starts are read one by one, each with its fd."""
        parent, child = socket.socketpair()
        self.addCleanup(parent.close)
        self.addCleanup(child.close)
        sent = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
        for index, fd in enumerate(sent):
            send_control(parent, {"id": index, "pad": "x" * 3000 * index}, fd)
            os.close(fd)
        for index in range(3):
            header, fd = receive_control(child)
            self.assertEqual(header["id"], index)
            self.assertIsNotNone(fd)
            os.close(fd)
        parent.close()
        self.assertEqual(receive_control(child), (None, None))

    def test_message_without_descriptor_then_one_with(self):
        """
        A message without a descriptor queued just before one with keeps
        apart from it: the second and its descriptor are not swallowed.
        """
        parent, child = socket.socketpair()
        self.addCleanup(parent.close)
        self.addCleanup(child.close)
        send_control(parent, {"idle": 50}, None)
        fd = os.open(os.devnull, os.O_RDONLY)
        send_control(parent, {"id": 2}, fd)
        os.close(fd)
        self.assertEqual(receive_control(child), ({"idle": 50}, None))
        header, fd = receive_control(child)
        self.assertEqual(header, {"id": 2})
        self.assertIsNotNone(fd)
        os.close(fd)


class RelayTests(SynchronousTestCase):
    """The fork server reading a worker's channel (non-blocking, as it keeps them)."""

    def setUp(self):
        self.control, self.server_side = socket.socketpair()
        self.addCleanup(self.control.close)
        self.addCleanup(self.server_side.close)
        self.ours, self.worker_end = socket.socketpair()
        self.addCleanup(self.worker_end.close)
        self.ours.setblocking(False)
        self.busy = {77: self.ours}
        self.server_side.setblocking(False)

    def test_idle_is_relayed_with_the_known_pid(self):
        """The worker's idle report reaches the server under the pid the fork server knows."""
        send_control(self.worker_end, {"idle": 1, "id": 5}, None)
        worker_module._relay_worker(self.control, self.busy, 77)
        self.assertEqual(self.server_side.recv(100), b'{"idle": 77, "id": 5}\n')
        self.assertIn(77, self.busy)

    def test_cut_message_closes_the_channel_without_blocking(self):
        """A message cut short (the session's own code writing there) costs the worker its channel."""
        self.worker_end.sendall(b"\x64\x00\x00\x00" + b"{" * 10)
        worker_module._relay_worker(self.control, self.busy, 77)
        self.assertEqual(self.busy, {})
        self.assertEqual(self.ours.fileno(), -1)
        self.assertRaises(BlockingIOError, self.server_side.recv, 100)

    def test_what_a_session_could_forge_goes_no_further(self):
        """
        A descriptor is closed, an id that is not a session's number is
        dropped (a long one would overflow the server's report line), and
        a message that is not an object ends the channel.
        """
        fd = os.open(os.devnull, os.O_RDONLY)
        send_control(self.worker_end, {"idle": 1, "id": 5}, fd)
        os.close(fd)
        send_control(self.worker_end, {"idle": 1, "id": "x" * 100_000}, None)
        for _ in range(2):
            worker_module._relay_worker(self.control, self.busy, 77)
        self.assertEqual(self.server_side.recv(100_000), b'{"idle": 77, "id": 5}\n')
        self.assertRaises(BlockingIOError, self.server_side.recv, 100)
        send_control(self.worker_end, [1, 2], None)
        worker_module._relay_worker(self.control, self.busy, 77)
        self.assertEqual(self.busy, {})

    def test_end_of_channel(self):
        """The worker's end (its exit) closes the channel."""
        self.worker_end.close()
        worker_module._relay_worker(self.control, self.busy, 77)
        self.assertEqual(self.busy, {})


class KeptWorkerEndTests(SynchronousTestCase):
    """How a worker's session ends decides whether it waits for the next or ends."""

    class Guard:
        def __init__(self):
            self.armed = None

        def disarm(self):
            self.armed = False

    class Reactor:
        running = True

        def __init__(self):
            self.readers = []

        def stop(self):
            self.running = False

        def addReader(self, reader):
            self.readers.append(reader)

    def worker(self, channel=None):
        kept = worker_module._KeptWorker(None, "/nowhere", self.Guard(), channel)
        kept._reactor = self.Reactor()
        return kept

    def test_a_session_that_knows_nothing_of_keeping_ends_the_worker(self):
        """A --session-factory protocol without C{kept} (the plumbing tests' stand-in) ends it."""
        kept = self.worker()
        kept._ended(object(), 1)
        self.assertEqual((kept._done, kept._reactor.running, kept._guard.armed),
                         (True, False, False))

    def test_kept_session_waits_on_the_channel(self):
        """A kept session reports idle and waits; a channel gone ends the worker instead."""
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        kept = self.worker(ours)
        session = types.SimpleNamespace(kept=True)
        kept._ended(session, 3)
        self.assertEqual(receive_control(theirs), ({"idle": os.getpid(), "id": 3}, None))
        self.assertEqual(len(kept._reactor.readers), 1)
        self.assertFalse(kept._done)
        ours.close()
        closed = self.worker(ours)
        closed._ended(session, 4)
        self.assertTrue(closed._done)


class SessionCarrierTests(SynchronousTestCase):
    """The worker's side of the adopted session socket."""

    def test_early_bytes_then_data(self):
        """The carrier hands the early bytes, then every later byte and the end to the session."""
        from twisted.internet.testing import StringTransport

        class Session:
            """Records what the carrier hands it."""

            def __init__(self):
                self.transport = None
                self.received = []

            def makeConnection(self, transport):
                """Remember the transport."""
                self.transport = transport

            def dataReceived(self, data):
                """Remember the bytes."""
                self.received.append(data)

            def connectionLost(self, reason):
                """Remember the end."""
                self.received.append(None)

        ended = []
        session = Session()
        carrier = worker_module.SessionCarrier(session, b"early", ended.append)
        transport = StringTransport()
        carrier.makeConnection(transport)
        self.assertEqual(transport.value(), b"")
        self.assertIs(session.transport, transport)
        carrier.dataReceived(b"more")
        self.assertEqual(session.received, [b"early", b"more"])
        carrier.connectionLost(None)
        self.assertEqual((session.received[-1], ended), (None, [None]))


class WatchdogTests(SynchronousTestCase):
    """The worker's watchdog, on real socket pairs, with the process exit recorded."""

    def setUp(self):
        from tvm_rpc.server import watchdog

        self.watchdog = watchdog
        self.exits = []

        def exit_(code):
            self.exits.append(code)
            raise SystemExit(code)

        self.patch(watchdog.os, "_exit", exit_)
        self.ours, self.theirs = socket.socketpair()
        self.addCleanup(self.ours.close)
        self.addCleanup(self.theirs.close)

    def test_silent_client_never_starts(self):
        """A client that sends nothing after the handshake ends the worker (EXIT_NO_START)."""
        self.assertRaises(SystemExit, self.watchdog.wait_for_start, self.ours.fileno(), 0.01)
        self.assertEqual(self.exits, [self.watchdog.EXIT_NO_START])

    def test_started_client_and_no_limit(self):
        """A first message (left unread) or no limit lets the session run."""
        self.watchdog.wait_for_start(self.ours.fileno(), None)
        self.theirs.sendall(b"hello")
        self.watchdog.wait_for_start(self.ours.fileno(), 5)
        self.assertEqual(self.exits, [])
        self.assertEqual(self.ours.recv(10), b"hello")

    def _armed(self, lifeline, root):
        """@return: a watchdog (its loop run by the test) armed on our end."""
        watchdog = self.watchdog.Watchdog(lifeline.fileno(), root)
        watchdog.arm(self.ours.fileno())
        return watchdog

    def test_client_gone(self):
        """The client's close ends the worker at once, its data left unread."""
        lifeline, server_end = socket.socketpair()
        self.addCleanup(lifeline.close)
        self.addCleanup(server_end.close)
        self.theirs.sendall(b"a request")
        self.theirs.close()
        self.assertRaises(SystemExit, self._armed(lifeline, "/nowhere").watch)
        self.assertEqual(self.exits, [self.watchdog.EXIT_CLIENT_GONE])
        self.assertEqual(self.ours.recv(20), b"a request")

    def test_disarmed_watchdog_ignores_the_clients_close(self):
        """
        Disarmed (the session said goodbye; its worker may be kept), the
        client's close no longer ends the worker; the lifeline still does.
        """
        lifeline, server_end = socket.socketpair()
        self.addCleanup(lifeline.close)
        watchdog = self._armed(lifeline, "/nowhere")
        watchdog.disarm()
        self.theirs.close()
        server_end.close()
        self.assertRaises(SystemExit, watchdog.watch)
        self.assertEqual(self.exits, [self.watchdog.EXIT_SERVER_GONE])

    def test_server_gone(self):
        """The lifeline's end ends the worker and removes its work directories."""
        import tempfile

        root = tempfile.mkdtemp()
        self.addCleanup(lambda: os.path.isdir(root) and os.rmdir(root))
        mine = os.path.join(root, f"session-{os.getpid()}-x")
        os.mkdir(mine)
        lifeline, server_end = socket.socketpair()
        self.addCleanup(lifeline.close)
        server_end.close()
        self.assertRaises(SystemExit, self._armed(lifeline, root).watch)
        self.assertEqual(self.exits, [self.watchdog.EXIT_SERVER_GONE])
        self.assertFalse(os.path.exists(mine))


class _Reader:
    """A selectable reading one end of a socket pair; its C{doRead} does what the test says."""

    def __init__(self, sock, on_read):
        self.sock = sock
        self.on_read = on_read
        self.lost = []

    def fileno(self):
        """@return: the socket's descriptor."""
        return self.sock.fileno()

    def logPrefix(self):
        """@return: a name for log lines."""
        return "test reader"

    def doRead(self):
        """Hand the readable socket to the test's callable."""
        return self.on_read(self.sock)

    def connectionLost(self, reason):
        """Remember why the reactor dropped this reader."""
        self.lost.append(reason)


class WorkerReactorTests(SynchronousTestCase):
    """The session worker's lean reactor keeps Twisted's semantics (a real, uninstalled instance)."""

    def setUp(self):
        from tvm_rpc.server.reactor import WorkerReactor

        self.reactor = WorkerReactor()
        self.addCleanup(self._close)

    def _close(self):
        for reader in list(self.reactor.getReaders()):
            self.reactor.removeReader(reader)
        self.reactor._poller.close()

    def run_reactor(self):
        """Run the reactor until the test stops it (or 10 s pass, a failure)."""
        timeout = self.reactor.callLater(10, self.reactor.stop)
        self.reactor.run(installSignalHandlers=False)
        self.assertTrue(timeout.active(), "the reactor was stopped by the safety timeout")
        timeout.cancel()

    def pair(self):
        """@return: a connected socket pair, closed after the test."""
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        ours.setblocking(False)
        return ours, theirs

    def test_timed_calls_and_stop(self):
        """Timed calls fire in order, also ones scheduled while idle, and stop ends run()."""
        fired = []
        self.reactor.callLater(0.02, fired.append, "later")
        self.reactor.callLater(0, fired.append, "now")
        self.reactor.callLater(0.03, self.reactor.stop)
        self.run_reactor()
        self.assertEqual(fired, ["now", "later"])

    def test_end_of_the_loop_is_a_debug_line(self):
        """
        The loop's "Main loop terminated." is debug (Twisted says it at info):
        under our namespace the daemons' filter would let it end the log of
        every session whose worker stops its reactor before the watchdog ends it.
        """
        from twisted.logger import LogLevel, globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.reactor.callLater(0, self.reactor.stop)
        self.run_reactor()
        ends = [event for event in events if event.get("log_format") == "Main loop terminated."]
        self.assertEqual([event["log_level"] for event in ends], [LogLevel.debug])

    def test_reads_and_thread_calls(self):
        """A plain read reaches doRead; a call from another thread runs in the loop."""
        import threading

        ours, theirs = self.pair()
        got = []

        def read(sock):
            got.append(sock.recv(100))
            threading.Thread(target=self.reactor.callFromThread,
                             args=(self.reactor.stop,)).start()

        self.reactor.addReader(_Reader(ours, read))
        theirs.sendall(b"ping")
        self.run_reactor()
        self.assertEqual(got, [b"ping"])

    def test_failing_reader_is_disconnected(self):
        """An exception from doRead is logged and drops that reader; the loop serves the others."""
        bad, bad_peer = self.pair()
        good, good_peer = self.pair()

        def explode(sock):
            raise RuntimeError("boom")

        def read(sock):
            sock.recv(100)
            self.reactor.stop()

        failing = _Reader(bad, explode)
        self.reactor.addReader(failing)
        bad_peer.sendall(b"x")
        self.reactor.callLater(0.05, good_peer.sendall, b"y")
        self.reactor.addReader(_Reader(good, read))
        self.run_reactor()
        self.assertEqual(len(failing.lost), 1)
        self.assertNotIn(failing, self.reactor.getReaders())
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_end_of_stream_and_writes(self):
        """A peer that leaves (a hang-up event, not a plain read) ends the reader, as in Twisted."""
        ours, theirs = self.pair()
        reader = _Reader(ours, lambda sock: None if sock.recv(100) else "done")

        def check():
            if reader.lost:
                self.reactor.stop()
            else:
                self.reactor.callLater(0.01, check)

        self.reactor.addReader(reader)
        theirs.close()
        self.reactor.callLater(0, check)
        self.run_reactor()
        self.assertEqual(len(reader.lost), 1)


@pytest.mark.parametrize("flags, expected", [
    (dict(no_site=0, no_user_site=0, safe_path=False), ()),
    (dict(no_site=1, no_user_site=1, safe_path=True), ("-S", "-s", "-P")),
    (dict(no_site=0, no_user_site=1), ("-s",)),
])
def test_site_flags(flags, expected):
    """The fork server runs with the server's site flags (C{-I} gives C{-s -P}), not C{-E}."""
    assert control.site_flags(types.SimpleNamespace(**flags)) == expected


def test_pool_argv_carries_the_flags():
    pool = WorkerPool(None, "/w", interpreter_flags=("-S", "-s"))
    assert pool.argv(3)[:4] == [pool.executable, "-S", "-s", "-m"]


def test_spawned_spare_command_line():
    """A --no-fork spare runs the fork server's command, its channel in place of the control socket."""
    from tvm_rpc.server.worker import _spare_argv

    argv = ["--control-fd", "3", "--lifeline-fd", "4", "--work-root", "/w", "--init", "m:f",
            "--load-library", "/l.so", "--silent", "--spawn"]
    assert _spare_argv(argv, 9)[1:] == [
        "-m", "tvm_rpc.server.worker", "--spare-fd", "9", "--lifeline-fd", "4", "--work-root",
        "/w", "--init", "m:f", "--load-library", "/l.so", "--silent"]
