"""Workers kept for the same client's next session, on a real ``twistd -n
rpc-server``: our client (a private reactor in this process) opens sessions
one after another, and the worker serving each is read from its work
directory's name (``session-<pid>-...``)."""

import os
import re
import shutil
import signal
import tempfile

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.daemons import gone, listen_any, start_announced, twistd, wait_until
from tests.private_reactor import PrivateReactor
from tvm_rpc.client.connect import connect
from tvm_rpc.client.kept_workers import KEPT_WORKERS

pytestmark = pytest.mark.system

KEY = "kept"


class KeptWorkerTests(PrivateReactor, SynchronousTestCase):
    """One server per test (its options vary), sessions opened in turn."""

    def setUp(self):
        self.start_private_reactor()
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)

    def start_server(self, *options):
        self.daemon, self.port = start_announced("rpc-server", twistd(
            "rpc-server", "--listen", listen_any("127.0.0.1"), "--key", KEY,
            "--work-dir", self.root, "--init", "tests.server_init_sample", *options))
        self.addCleanup(self.daemon.stop)

    def session(self, keep_worker=True):
        """Open a session, note its worker and work directory, and close it."""
        session = self.resolve(connect("127.0.0.1", self.port, KEY, reactor=self.reactor,
                                       keep_worker=keep_worker))
        where = self.resolve(session.workpath(""))
        listed = self.resolve(session.listdir("."))
        self.resolve(session.upload(b"left by this session", "mine.txt"))
        self.resolve(session.close())
        pid = int(re.search(r"session-(\d+)-", where).group(1))
        return pid, where, listed

    def ended_lines(self, count):
        return wait_until(
            lambda: (lines := re.findall(r"session for .* ended: (\w+) .*worker (\d+)",
                                         self.daemon.output)) and len(lines) >= count and lines,
            30, what=lambda: f"{count} session lines in:\n{self.daemon.output}")

    def test_same_client_continues_in_its_worker(self):
        """
        A client's sessions run one after another in one worker, each in a
        fresh work directory (the previous one removed, its files unseen),
        each logged as closed; a session that does not ask to keep gets a
        fresh worker, and the kept one is retired (its process ends).
        """
        self.start_server()
        first, first_dir, _ = self.session()
        second, second_dir, listed = self.session()
        third, _, _ = self.session()
        self.assertEqual({first, second, third}, {first})
        self.assertNotEqual(first_dir, second_dir)
        self.assertFalse(os.path.exists(first_dir))
        self.assertEqual(listed, [])
        fresh, _, _ = self.session(keep_worker=False)
        self.assertNotEqual(fresh, first)
        wait_until(lambda: gone(first), 30, what=f"kept worker {first} retired")
        lines = self.ended_lines(4)
        self.assertEqual([how for how, _ in lines], ["closed"] * 4)
        self.assertEqual([int(pid) for _, pid in lines], [first] * 3 + [fresh])
        # The last one did not ask: its worker exits with its session.
        wait_until(lambda: gone(fresh), 30, what=f"worker {fresh} gone")

    def test_retired_with_what_it_started(self):
        """
        Retiring a kept worker kills its process group: a child its client's
        session started dies, and a thread spinning in it cannot keep it alive
        beside the next client's session.
        """
        self.start_server()
        session = self.resolve(connect("127.0.0.1", self.port, KEY, reactor=self.reactor))
        worker = self.resolve(self.resolve(session.get_function("test.pid"))())
        child = self.resolve(self.resolve(session.get_function("test.start_child"))())
        self.resolve(session.close())
        self.assertFalse(gone(child))
        other, _, _ = self.session(keep_worker=False)
        self.assertNotEqual(other, worker)
        wait_until(lambda: gone(worker) and gone(child), 30,
                   what=f"kept worker {worker} and its child {child} gone")

    def test_grown_worker_is_not_kept(self):
        """A worker whose sessions left it 256 MiB larger than it started is not kept."""
        self.start_server()
        session = self.resolve(connect("127.0.0.1", self.port, KEY, reactor=self.reactor))
        worker = self.resolve(self.resolve(session.get_function("test.pid"))())
        self.resolve(self.resolve(session.get_function("test.hold"))(300 * 1024 * 1024))
        self.resolve(session.close())
        # At once: a kept worker would take this session.
        self.assertNotEqual(self.session()[0], worker)
        wait_until(lambda: gone(worker), 30, what=f"grown worker {worker} gone")

    def test_through_the_tracker(self):
        """
        Sessions a tracker hands out continue in the kept worker too (each
        with the tracker's fresh matchkey); keep_worker=False on the request
        gets a fresh worker.
        """
        from tests.daemons import our_tracker
        from tvm_rpc.client import connect_tracker

        with our_tracker() as (_, tracker_port):
            self.start_server("--tracker", f"127.0.0.1:{tracker_port}")
            self.daemon.wait_for(r"registered kept with tracker")
            tracker = self.resolve(connect_tracker("127.0.0.1", tracker_port,
                                                   reactor=self.reactor))
            self.addCleanup(lambda: self.resolve(tracker.close()))

            def worker(**options):
                session = self.resolve(tracker.request(KEY, **options))
                pid = self.resolve(self.resolve(session.get_function("test.pid"))())
                self.resolve(session.close())
                return pid

            first = worker()
            self.assertEqual(worker(), first)
            self.assertNotEqual(worker(keep_worker=False), first)

    def test_spawned_workers_are_kept_too(self):
        """With --no-fork (spawned workers), a client's sessions continue in one worker too."""
        self.start_server("--no-fork")
        first, _, _ = self.session()
        self.assertEqual(self.session()[0], first)

    def test_through_our_proxy(self):
        """A --through-proxy server keeps its worker for the client it paired with again."""
        from tests.daemons import Daemon, our_proxy

        with our_proxy() as (_, proxy_port):
            self.daemon = Daemon(twistd(
                "rpc-server", "--through-proxy", "--host", "127.0.0.1",
                "--port", str(proxy_port), "--key", KEY, "--work-dir", self.root))
            self.addCleanup(self.daemon.stop)
            self.daemon.wait_for(r"waiting at proxy")
            self.port = proxy_port
            first, _, _ = self.session()
            self.assertEqual(self.session()[0], first)

    def test_keep_worker_zero_gives_fresh_workers(self):
        """--keep-worker 0: every session in a fresh worker, whatever the client asks."""
        self.start_server("--keep-worker", "0")
        pids = [self.session()[0] for _ in range(3)]
        self.assertEqual(len(set(pids)), 3)

    def test_kept_worker_retired_after_its_time(self):
        """A client that does not come back frees the worker after --keep-worker seconds."""
        self.start_server("--keep-worker", "0.5")
        pid, _, _ = self.session()
        wait_until(lambda: gone(pid), 30, what=f"kept worker {pid} retired")
        # The client's token is stale now: its next session still opens, in a fresh worker.
        self.assertNotEqual(self.session()[0], pid)

    def test_kept_worker_killed_while_waiting(self):
        """A kept worker that dies while waiting costs its client nothing: a fresh one serves."""
        self.start_server()
        pid, _, _ = self.session()
        # Our server's own worker (a descendant of the daemon this test started).
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), 30, what=f"worker {pid} killed")
        again, _, _ = self.session()
        self.assertNotEqual(again, pid)
        self.assertEqual(self.session()[0], again)

    def test_another_client_cannot_take_the_worker(self):
        """A session with a token not handed to it (a guess) gets a fresh worker."""
        self.start_server()
        pid, _, _ = self.session()
        KEPT_WORKERS.take(f"127.0.0.1:{self.port}")
        KEPT_WORKERS.keep(f"127.0.0.1:{self.port}", "0" * 32, 30)
        other, _, _ = self.session()
        self.assertNotEqual(other, pid)
        wait_until(lambda: gone(pid), 30, what=f"kept worker {pid} retired")
