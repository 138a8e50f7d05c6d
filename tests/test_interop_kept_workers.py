"""A kept worker runs what each session uploads, not what an earlier one
loaded: two libraries compiled with apache-tvm, with the same file name and the
same function name, uploaded in turn by one client whose sessions continue in
one worker of a real ``twistd -n rpc-server``."""

import os
import shutil
import tempfile

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests.daemons import listen_any, start_announced, twistd
from tests.private_reactor import PrivateReactor
from tvm_rpc.client.connect import connect

pytestmark = pytest.mark.system

KEY = "kept-tvm"


def build_scale(factor, path):
    """Compile C{y = x * factor} (float32, 8 elements) as function C{f} into C{path}."""
    import tvm
    from tvm import te

    x = te.placeholder((8,), "float32", name="x")
    y = te.compute((8,), lambda i: x[i] * tvm.tirx.const(factor, "float32"), name="y")
    function = te.create_prim_func([x, y]).with_attr("global_symbol", "f")
    tvm.compile(function, target="llvm").export_library(path)


class KeptWorkerLibraryTests(PrivateReactor, SynchronousTestCase):
    @classmethod
    def setUpClass(cls):
        cls.build = tempfile.mkdtemp()
        for factor in (2, 3):
            build_scale(factor, os.path.join(cls.build, f"times{factor}.so"))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.build, True)

    def setUp(self):
        self.start_private_reactor()
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.daemon, self.port = start_announced("rpc-server", twistd(
            "rpc-server", "--listen", listen_any("127.0.0.1"), "--key", KEY,
            "--work-dir", self.root, "--init", "tests.server_init_sample"))
        self.addCleanup(self.daemon.stop)

    def run_library(self, factor):
        """
        Upload C{times<factor>.so} as C{lib.so}, run its C{f} on 1..8.

        @return: C{(worker pid, result)}.
        """
        import numpy as np

        session = self.resolve(connect("127.0.0.1", self.port, KEY, reactor=self.reactor))
        pid = self.resolve(self.resolve(session.get_function("test.pid"))())
        self.resolve(session.upload(os.path.join(self.build, f"times{factor}.so"), "lib.so"))
        module = self.resolve(session.load_module("lib.so"))
        device = session.cpu(0)
        x = self.resolve(session.array(np.arange(1, 9, dtype="float32"), device))
        y = self.resolve(session.empty((8,), "float32", device))
        self.resolve(module["f"](x, y))
        result = self.resolve(y.numpy())
        self.resolve(session.close())
        return pid, result

    def test_each_session_runs_its_own_library(self):
        """
        The second session, in the same worker, runs the library it uploaded
        (same file name, same function name), not the first one (which TVM's
        runtime keeps mapped: each session's work directory has a path of
        its own, so the loader never takes one for the other).
        """
        import numpy as np

        first, doubled = self.run_library(2)
        second, tripled = self.run_library(3)
        self.assertEqual(first, second)
        np.testing.assert_array_equal(doubled, np.arange(1, 9) * 2)
        np.testing.assert_array_equal(tripled, np.arange(1, 9) * 3)
