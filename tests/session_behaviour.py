"""One behaviour suite for a session, whatever carries it.

L{SessionBehaviour} holds the core behaviours of a session as our client sees
them: calling a global function, a remote exception that leaves the session
usable, files in the work directory (upload, download, remove, listdir, a path
escaping it refused), arrays, a module loaded and called, time_evaluator, and
close. It is mixed into a test case that makes the session:
C{tests/test_session_client.py} with client and server on in-memory
transports in one process, C{tests/test_session_forked.py} with our client
against a real C{twistd rpc-server} on loopback, each session in a worker
forked by it (as the transit relay runs one behaviour mixin over TCP and over
WebSocket).
"""

import os
import random
import shutil
import tempfile

import numpy

from tvm_rpc.client.remote import RemoteArray, RemoteFunction, RemoteModule
from tvm_rpc.client.session_errors import SessionClosed
from tvm_rpc.protocol.remote_error import RemoteError

#: A module the tests upload and load (C{.py}, so it runs without TVM's runtime).
MODULE = b'''
def double(x):
    return x * 2

def fail(message):
    raise KeyError(message)
'''


class SessionBehaviour:
    """
    The behaviours, for a test case that provides:

      - C{self.session}: an open L{RPCSession} whose server has the global
        functions C{add(a, b)} and C{boom()} (which divides by zero);
      - C{resolve(deferred)}: the result of C{deferred} once it fires (fails
        the test on an error); C{failure(deferred, *types)}: its failure;
      - C{session_dir()}: the session's work directory on the server;
      - C{server_root()}: the directory the server keeps work directories in;
      - C{connected()}: whether the client's connection is still up.
    """

    def setUp(self):
        super().setUp()
        self.blob = random.Random(3).randbytes(5 * 1024 * 1024 + 123)
        self.local = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.local, True)

    def load_module(self):
        """Upload and load L{MODULE}; @return: the L{RemoteModule}."""
        self.resolve(self.session.upload(MODULE, "lib/mod.py"))
        return self.resolve(self.session.load_module("lib/mod.py"))

    def test_get_function_and_call(self):
        """get_function gives a RemoteFunction; calling it gives the result."""
        add = self.resolve(self.session.get_function("add"))
        self.assertIsInstance(add, RemoteFunction)
        self.assertEqual(self.resolve(add(2, 3)), 5)
        self.assertEqual(self.resolve(add("a", "b")), "ab")
        self.assertEqual(self.resolve(self.session.call("add", 1.5, 2)), 3.5)

    def test_remote_error_and_still_usable(self):
        """
        A remote exception arrives as RemoteError with its type and message,
        without the server's traceback (the server's default); the session
        goes on.
        """
        failure = self.failure(self.session.call("boom"), RemoteError)
        self.assertTrue(self.connected())
        self.assertEqual(failure.value.type_name, "ZeroDivisionError")
        self.assertEqual(failure.value.short_type_name, "ZeroDivisionError")
        self.assertIn("division by zero", failure.value.message)
        self.assertEqual(failure.value.traceback_text, "")
        self.assertNotIn(self.server_root(), str(failure.value))
        self.assertEqual(self.resolve(self.session.call("add", 1, 1)), 2)

    def test_upload_path_and_download_to_file(self):
        """A local file uploads under its base name; a download streams into a local file."""
        source = os.path.join(self.local, "model.bin")
        with open(source, "wb") as f:
            f.write(self.blob)
        self.assertEqual(self.resolve(self.session.upload(source)), len(self.blob))
        self.assertEqual(self.resolve(self.session.listdir()), ["model.bin"])
        target = os.path.join(self.local, "copy.bin")
        self.assertEqual(self.resolve(self.session.download("model.bin", local_path=target)),
                         len(self.blob))
        with open(target, "rb") as f:
            self.assertEqual(f.read(), self.blob)
        self.assertEqual(sorted(os.listdir(self.local)), ["copy.bin", "model.bin"])

    def test_download_missing_and_remove(self):
        """Errors of file operations are RemoteErrors; remove deletes."""
        failure = self.failure(self.session.download("nothing.bin"), RemoteError)
        self.assertEqual(failure.value.type_name, "FileNotFoundError")
        self.assertEqual(failure.value.message, "no file 'nothing.bin' in the work directory")
        where = f" (on {self.session.address})" if self.session.address else ""
        self.assertEqual(str(failure.value),
                         f"FileNotFoundError: no file 'nothing.bin' in the work directory{where}")
        self.resolve(self.session.upload(b"abc", "a.txt"))
        self.resolve(self.session.remove("a.txt"))
        self.assertEqual(self.resolve(self.session.listdir(".")), [])
        self.assertEqual(self.resolve(self.session.workpath("x/y")),
                         os.path.join(self.session_dir(), "x", "y"))
        failure = self.failure(self.session.upload(b"abc", "../escape.txt"), RemoteError)
        self.assertIn("PathEscapeError", failure.value.type_name)

    def test_array_round_trip(self):
        """A numpy array copied to the device reads back equal, as numpy, bytes or lists."""
        host = numpy.arange(12, dtype="float32").reshape(3, 4)
        remote_array = self.resolve(self.session.array(host, self.session.cpu()))
        self.assertIsInstance(remote_array, RemoteArray)
        self.assertEqual((remote_array.shape, remote_array.dtype), ((3, 4), "float32"))
        numpy.testing.assert_array_equal(self.resolve(remote_array.numpy()), host)
        self.assertEqual(self.resolve(remote_array.read()), host.tobytes())
        self.assertEqual(self.resolve(remote_array.tolist()), host.tolist())

    def test_module_functions(self):
        """module.get_function and module[name] both call the module's functions."""
        module = self.load_module()
        self.assertIsInstance(module, RemoteModule)
        self.assertEqual(module.kind, "python")
        double = self.resolve(module.get_function("double"))
        self.assertEqual(self.resolve(double(21)), 42)
        self.assertEqual(self.resolve(module["double"]("ab")), "abab")

    def test_module_error(self):
        """An exception in module code names its type (no traceback by default)."""
        module = self.load_module()
        failure = self.failure(module["fail"]("why"), RemoteError)
        self.assertEqual(failure.value.type_name, "KeyError")
        self.assertEqual(failure.value.traceback_text, "")

    def test_module_time_evaluator(self):
        """A module's function is timed by name (looked up lazily)."""
        module = self.load_module()
        evaluator = module.time_evaluator("double", self.session.cpu(), number=3, repeat=2)
        result = self.resolve(evaluator(4))
        self.assertEqual(len(result.results), 2)
        self.assertGreaterEqual(result.min, 0)

    def test_close(self):
        """close() says goodbye, later calls fail with SessionClosed, closing again is fine."""
        closing = self.session.close()
        self.assertTrue(self.session.closed)
        self.resolve(closing)
        self.assertFalse(self.connected())
        self.failure(self.session.call("add", 1, 2), SessionClosed)
        self.resolve(self.session.close())
