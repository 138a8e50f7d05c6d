"""Sessions in child processes: the server and the client without their
optional dependencies, an unknown device type on a real worker, a 256 MiB
round trip over loopback TCP, and a client that floods a server with reads
it never reads back (the memory these take is
measured by C{bench/bounds.py session-rss})."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from twisted.trial.unittest import SynchronousTestCase

from tests import session_processes
from tests.daemons import child_env, our_rpc_server
from tvm_rpc.protocol import session_commands

pytestmark = pytest.mark.system


NO_OPTIONAL_DEPENDENCIES = textwrap.dedent('''
    import builtins, json, os, shutil, sys, tempfile
    real_import = builtins.__import__
    BLOCKED = ("numpy", "tvm", "tvm_ffi", "cloudpickle")

    def guarded(name, *args, **kwargs):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)
        return real_import(name, *args, **kwargs)

    builtins.__import__ = guarded
    for name in list(sys.modules):
        if name.split(".")[0] in BLOCKED:
            del sys.modules[name]

    from twisted.internet.task import Clock
    from twisted.protocols import amp
    from twisted.test.iosim import connectedServerAndClient
    from tvm_rpc.protocol import session_commands, values
    from tvm_rpc.protocol.streams import chunked, read_stream, write_stream
    from tvm_rpc.server.session import SessionProtocol, prepare

    root = tempfile.mkdtemp()
    client, server, pump = connectedServerAndClient(
        lambda: SessionProtocol(root, clock=Clock()), amp.AMP)
    out = {"backend": prepare()}

    def call(command, **kw):
        results = []
        client.callRemote(command, **kw).addBoth(results.append)
        pump.flush()
        return results[0]

    def finish(d):
        results = []
        d.addBoth(results.append)
        pump.flush()
        return results[0]

    source = "def total(array):\\n    view = memoryview(array.data).cast('i')\\n" \\
             "    return sum(view)\\n"
    call(session_commands.CallFunction, name="tvm.rpc.server.upload",
         args=values.encode(["m.py", source.encode()]))
    module = call(session_commands.LoadModule, path="m.py")["module"]
    total = call(session_commands.ModuleGetFunction, module=module, name="total")["function"]
    array = call(session_commands.Empty, shape=[4], dtype="int32", device_type=1, device_id=0)["array"]
    stream = call(session_commands.OpenArrayWrite, array=array)["stream"]
    data = b"".join(i.to_bytes(4, "little") for i in (1, 2, 3, 4))
    finish(write_stream(client.callRemote, stream, chunked(data)))
    ref = values.ArrayRef(array, (4,), "int32")
    answer = call(session_commands.CallFunction, function=total, args=values.encode([ref]))
    out["total"] = values.decode(answer["result"])
    cuda = call(session_commands.DeviceExists, device_type=2, device_id=0)
    out["cuda"] = cuda["exists"]
    call(session_commands.CallFunction, name="tvm.rpc.server.upload",
         args=values.encode(["lib.so", b"x"]))
    error = call(session_commands.LoadModule, path="lib.so")
    out["so_error"] = error.value.message
    out["loaded"] = sorted(n for n in sys.modules if n.split(".")[0] in BLOCKED)
    print(json.dumps(out))
    shutil.rmtree(root)
''')


class NoOptionalDependenciesTests(SynchronousTestCase):
    """The server side works with numpy, TVM and cloudpickle all missing."""

    def test_python_only_session(self):
        """A .py module session runs on the pure-Python backend."""
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=here)
        completed = subprocess.run(
            [sys.executable, "-c", NO_OPTIONAL_DEPENDENCIES],
            capture_output=True, text=True, timeout=120, env=env, cwd=here,
        )
        self.assertEqual(completed.returncode, 0, completed.stderr)
        out = json.loads(completed.stdout.strip().splitlines()[-1])
        self.assertEqual(out["backend"], "python")
        self.assertEqual(out["total"], 10)
        self.assertFalse(out["cuda"])
        self.assertIn("TVM's runtime is not installed", out["so_error"])
        self.assertEqual(out["loaded"], [])


class RoundTripTests(SynchronousTestCase):
    """A 256 MiB upload and download over loopback TCP, byte-exact (its memory
    is measured by C{bench/bounds.py session-rss})."""

    def test_256_mib_round_trip(self):
        """Client and server share one process: every byte comes back, nothing is left."""
        out = session_processes.round_trip(256 * 1024 * 1024)
        self.assertNotIn("error", out, out.get("error"))
        self.assertEqual(out["size"], 256 * 1024 * 1024)
        self.assertTrue(out["same"])
        self.assertEqual(out["left"], [])


class FloodTests(SynchronousTestCase):
    """A client that asks for data and never reads it (how much the server
    grows meanwhile is measured by C{bench/bounds.py session-rss})."""

    def test_unread_downloads_leave_the_server_serving(self):
        """After 128 unread 512 KiB reads (64 MiB asked for), the server serves another client."""
        import socket

        server, port = session_processes.start_flood_server()
        self.addCleanup(server.wait, 30)
        self.addCleanup(server.kill)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.connect(("127.0.0.1", port))
        self.addCleanup(sock.close)
        size = 64 * 1024 * 1024
        stream = session_processes.open_array_stream(sock, [b""], size)
        self.assertGreater(session_processes.flood_unread_reads(sock, stream, size), 0)
        other = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.addCleanup(other.close)
        answer = session_processes.ask(other, [b""], session_commands.Empty, b"1", shape=[4],
                                       dtype="uint8", device_type=1, device_id=0)
        self.assertEqual(int(answer[b"nbytes"]), 4)
        self.assertIsNone(server.poll())


WITHOUT_NUMPY = textwrap.dedent('''
    import sys, tempfile
    sys.modules["numpy"] = None  # the client and the server run without numpy
    from twisted.internet.task import Clock
    from twisted.test.iosim import connectedServerAndClient
    from tvm_rpc.client.amp_protocol import make_client_protocol
    from tvm_rpc.client.session import start_session
    from tvm_rpc.server.registry import Registry
    from tvm_rpc.server.session import SessionProtocol

    def double_in_place(target):
        view = memoryview(target.data).cast("i")
        for index in range(len(view)):
            view[index] *= 2

    registry = Registry()
    registry.register("double_in_place", double_in_place)
    clock = Clock()
    client, server, pump = connectedServerAndClient(
        lambda: SessionProtocol(tempfile.mkdtemp(), registry, clock=clock, backend="python"),
        make_client_protocol, clock=clock)

    def run(deferred):
        pump.flush()
        return deferred.result

    session = run(start_session(client, clock=clock))
    remote = run(session.array([[1, 2, 3], [4, 5, 6]], dtype="int32"))
    run(session.call("double_in_place", remote))
    print(run(remote.tolist()))
    print(run(session.array(b"\\x01\\x02")).dtype)
    run(session.close())
    print("numpy" in sys.modules and sys.modules["numpy"] is not None)
''')


def test_client_without_numpy():
    """Arrays from nested lists and back as lists, with numpy absent on both ends."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    output = subprocess.run(
        [sys.executable, "-c", WITHOUT_NUMPY], cwd=root, capture_output=True, text=True,
        timeout=60, env={**os.environ, "PYTHONPATH": root},
    )
    assert output.returncode == 0, output.stderr
    assert output.stdout.split("\n")[:3] == ["[[2, 4, 6], [8, 10, 12]]", "uint8", "False"]


_DEVICE_CLIENT = """
import json, sys
from twisted.internet import task

async def main(reactor, port):
    from tvm_rpc.client.connect import connect
    session = await connect("127.0.0.1", int(port), "dev999", reactor=reactor, handshake_timeout=30)
    out = {}
    for what, make in [("exists", lambda: session.device(999).exists()),
                       ("empty", lambda: session.empty((2,), "float32", session.device(999)))]:
        try:
            await make()
            out[what] = "no error"
        except Exception as e:
            out[what] = [type(e).__name__, getattr(e, "type_name", ""), str(getattr(e, "message", e))]
    out["after"] = await session.call("tvm.rpc.server.listdir", ".")
    await session.close()
    print(json.dumps(out))

task.react(lambda reactor: __import__("twisted").internet.defer.ensureDeferred(
    main(reactor, sys.argv[1])))
"""


def test_unknown_device_type_does_not_kill_a_real_worker():
    """Device type 999 on a real worker (TVM's runtime when installed): a clear error, no crash."""
    with our_rpc_server("--key", "dev999") as (daemon, port):
        result = subprocess.run(
            [sys.executable, "-c", _DEVICE_CLIENT, str(port)], env=child_env(),
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stderr
        out = json.loads(result.stdout.strip().splitlines()[-1])
        for what in ("exists", "empty"):
            kind, type_name, message = out[what]
            assert kind == "RemoteError" and type_name.endswith("DeviceError"), out
            assert "unknown device type 999" in message and "cpu=1" in message, out
        assert out["after"] == []
        assert "died" not in daemon.output
