"""The session behaviours (L{tests.session_behaviour}) against a real server:
our client on a private reactor in this process, ``twistd -n rpc-server`` on
loopback running each session in a worker it forks."""

import os
import shutil
import tempfile

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.daemons import listen_any, start_announced, twistd, wait_until
from tests.private_reactor import PrivateReactor
from tests.session_behaviour import SessionBehaviour
from tvm_rpc.client.connect import connect

pytestmark = pytest.mark.system

KEY = "behaviour"


class ForkedWorkerSessionTests(SessionBehaviour, PrivateReactor, SynchronousTestCase):
    """
    One server for the class (its work directories under a directory of the
    test's), a fresh session (and worker) per test.
    """

    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp()
        cls.daemon, cls.port = start_announced("rpc-server", twistd(
            "rpc-server", "--listen", listen_any("127.0.0.1"), "--key", KEY,
            "--work-dir", cls.root, "--init", "tests.server_init_sample"))

    @classmethod
    def tearDownClass(cls):
        cls.daemon.stop()
        shutil.rmtree(cls.root, True)

    def setUp(self):
        self.start_private_reactor()
        self.session = self.resolve(connect("127.0.0.1", self.port, KEY, reactor=self.reactor))
        self.addCleanup(self.close_session)
        super().setUp()

    def close_session(self):
        """Close the session if a test left it open."""
        if not self.session.closed:
            self.resolve(self.session.close())

    def session_dir(self):
        return self.resolve(self.session.workpath(""))

    def server_root(self):
        return self.root

    def connected(self):
        return not self.session.closed

    def test_close(self):
        """The worker removes the session's work directory once the session ends."""
        where = self.session_dir()
        self.assertTrue(where.startswith(self.root + os.sep), where)
        super().test_close()
        wait_until(lambda: not os.path.exists(where), 30, what=f"{where} removed")
