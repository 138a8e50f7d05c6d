"""Spare session workers forked ahead of their sessions (real forks of the
test process; the rest of the worker machinery, in memory:
``tests/test_server_worker.py``)."""

import os
import signal
import socket

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.server import worker as worker_module

pytestmark = pytest.mark.system


class SpareTests(SynchronousTestCase):
    """Workers forked ahead of their sessions (real forks of this process)."""

    def test_spare_serves_the_session_it_is_handed(self):
        """
        A spare runs C{serve} with the header and socket it is handed, in its
        own group, and the channel stays open both ways (a kept worker reports
        on it and gets its next session through it).
        """

        def serve(header, fd, channel):
            sock = socket.socket(fileno=fd)
            sock.sendall(f"{header['id']} {os.getpgid(0) == os.getpid()}".encode())
            channel.sendall(b"idle")
            os._exit(0)

        spare = worker_module._Spare.fork(serve)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        try:
            self.assertEqual(spare.hand({"id": 7}, theirs.fileno()), spare.pid)
        finally:
            theirs.close()
        ours.settimeout(10)
        self.assertEqual(ours.recv(100), b"7 True")
        spare.channel.settimeout(10)
        self.assertEqual(spare.channel.recv(100), b"idle")
        spare.channel.close()
        self.assertEqual(os.waitpid(spare.pid, 0)[1], 0)

    def test_spare_without_a_session_ends(self):
        """A spare whose channel closes (the fork server is gone) ends without serving."""
        served = []
        spare = worker_module._Spare.fork(lambda header, fd, channel: served.append(header))
        spare.channel.close()
        _, status = os.waitpid(spare.pid, 0)
        self.assertTrue(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)

    def test_dead_spare_says_so(self):
        """Handing a session to a spare that died returns None (the fork server forks another)."""
        spare = worker_module._Spare.fork(lambda header, fd, channel: os._exit(0))
        os.kill(spare.pid, signal.SIGKILL)
        os.waitpid(spare.pid, 0)
        ours, theirs = socket.socketpair()
        self.addCleanup(ours.close)
        self.addCleanup(theirs.close)
        self.assertIsNone(spare.hand({"id": 1}, theirs.fileno()))
