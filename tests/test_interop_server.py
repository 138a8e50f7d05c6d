"""Our rpc-server and client against the real apache-tvm.

- The TVM docs' story: compile a dense + ReLU layer with TVM for ``llvm``,
  request our server by key from our tracker, upload, load, run on device
  arrays, compare with numpy, time it; and the same through TVM's tracker.
- Our server registers with TVM's tracker and TVM's query tool lists it.
- A real TVM client reaching our server directly or through TVM's proxy is
  served (the rest of that story is in ``test_interop_tvm_client.py``); our
  client reaching TVM's server speaks TVM's protocol to it (the story is in
  ``test_interop_tvm_engine.py``).
- A server that cannot import numpy, cloudpickle or TVM serves a ``.py``
  module session.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.daemons import (
    ROOT,
    Daemon,
    child_env,
    gone,
    listen_any,
    our_tracker,
    start_announced,
    tvm_rpc_server,
    tvm_tracker,
    twistd,
    wait_until,
)

pytestmark = pytest.mark.system

CLIENT_SCRIPT = str(ROOT / "tests" / "interop_client.py")
#: Bound on each child client run, so a broken peer fails the test instead of hanging it.
CLIENT_TIMEOUT = 120


def run_client(*args, env=None, script=CLIENT_SCRIPT):
    """Run our client (C{script}) in a child process; @return: its last JSON report."""
    completed = subprocess.run(
        [sys.executable, script, *map(str, args)],
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        env=env or child_env(),
        cwd=str(ROOT),
    )
    lines = [line for line in completed.stdout.decode().splitlines() if line.startswith("{")]
    assert lines, f"no report from the client:\n{completed.stdout.decode()}\n{completed.stderr.decode()}"
    return json.loads(lines[-1])


def our_server(*extra, env=None):
    """@return: a started L{Daemon} of our rpc-server on a port the system picks, and the port."""
    return start_announced(
        "rpc-server", twistd("rpc-server", "--listen", listen_any("127.0.0.1"), *extra), env=env)


def test_tvm_client_served(tvm):
    """TVM's own client connecting directly gets a session of TVM's protocol."""
    daemon, port = our_server("--key", "dev")
    try:
        remote = tvm.rpc.connect("127.0.0.1", port, key="dev", session_timeout=20)
        assert remote.get_function("tvm.rpc.server.workpath")("x").endswith("/x")
        del remote
        daemon.wait_for(r"tvm session for 127\.0\.0\.1:\d+ ended: .* \(key dev, worker \d+,")
    finally:
        daemon.stop()


def test_our_client_works_on_tvm_server(tvm):
    """Our client reaching TVM's server opens a session of TVM's own protocol."""
    with tvm_rpc_server("--key", "dev") as (_, port):
        assert run_client("connect", "127.0.0.1", port, "dev") == {"ok": True}


def test_registers_with_tvm_tracker(tvm):
    """Our server registers with TVM's tracker; TVM's query tool lists it."""
    with tvm_tracker() as (_, tracker_port):
        daemon, port = our_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", "ourdev")
        try:
            daemon.wait_for(r"registered ourdev with tracker")
            query = subprocess.run(
                [sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1",
                 "--port", str(tracker_port)],
                capture_output=True, timeout=60, env=child_env(),
            )
            text = query.stdout.decode()
            assert "server:ourdev" in text, text
            assert "ourdev" in text.split("Queue Status")[1], text
            row = [line for line in text.split("Queue Status")[1].splitlines() if "ourdev" in line]
            assert row[0].split()[1:] == ["1", "1", "0"], text
        finally:
            daemon.stop()


N, M = 64, 32


@pytest.fixture(scope="module")
def dense_relu(tvm, tmp_path_factory):
    """``y = relu(x W^T)`` for ``x: (1, N)``, ``W: (M, N)``, compiled by TVM for llvm."""
    from tvm import te

    x = te.placeholder((1, N), "float32", name="x")
    w = te.placeholder((M, N), "float32", name="w")
    k = te.reduce_axis((0, N), name="k")
    dense = te.compute((1, M), lambda i, j: te.sum(x[i, k] * w[j, k], axis=k), name="dense")
    relu = te.compute(
        (1, M), lambda i, j: te.max(dense[i, j], tvm.tirx.const(0, "float32")), name="relu"
    )
    function = te.create_prim_func([x, w, relu]).with_attr("global_symbol", "dense_relu")
    path = tmp_path_factory.mktemp("model") / "dense_relu.so"
    tvm.compile(function, target="llvm").export_library(str(path))
    return path


def check_story(report):
    assert report["ok"] is True, report
    assert report["max_abs_error"] < 1e-4
    assert report["nonzero"] > 0
    assert len(report["timings"]) == 2
    assert all(t > 0 for t in report["timings"])
    assert report["mean"] > 0
    # Timed by TVM on the device with cooldown, cache flush and f_preproc: one
    # positive mean per repeat, and the same kernel as above, so the same order of magnitude
    # (a generous bound: the flushed caches make each call slower).
    assert len(report["options_timings"]) == 4
    assert all(0 < t < max(report["timings"]) * 1000 for t in report["options_timings"])
    assert "no.such.preproc" in report["unknown_preproc"]


def test_story_via_our_tracker(dense_relu):
    """Compile on the host, run on our server found through our tracker."""
    with our_tracker() as (_, tracker_port):
        daemon, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", "story")
        try:
            daemon.wait_for(r"registered story with tracker")
            check_story(run_client("story", "127.0.0.1", tracker_port, "story", dense_relu, N, M))
        finally:
            daemon.stop()


def test_story_via_tvm_tracker(dense_relu):
    """The same story with TVM's own tracker in the middle."""
    with tvm_tracker() as (_, tracker_port):
        daemon, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", "story")
        try:
            daemon.wait_for(r"registered story with tracker")
            check_story(run_client("story", "127.0.0.1", tracker_port, "story", dense_relu, N, M))
        finally:
            daemon.stop()


BLOCKER = textwrap.dedent(
    '''
    """Make numpy, cloudpickle, TVM and autobahn impossible to import in this process."""
    import sys

    BLOCKED = ("numpy", "cloudpickle", "tvm", "tvm_ffi", "autobahn", "cryptography")


    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked for this test")
            return None


    sys.meta_path.insert(0, Blocker())
    '''
)

PLAIN_MODULE = textwrap.dedent(
    '''
    import sys


    def add(a, b):
        return a + b


    def loaded_modules():
        return sorted(name for name in ("numpy", "cloudpickle", "tvm") if name in sys.modules)
    '''
)


def test_server_without_optional_dependencies(tvm, tmp_path):
    """With numpy, cloudpickle, TVM and autobahn unimportable, the server serves a .py module."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    source = tmp_path / "plain.py"
    source.write_text(PLAIN_MODULE)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    check = subprocess.run(
        [sys.executable, "-c", "import numpy"], env=env, capture_output=True, timeout=60
    )
    assert check.returncode != 0 and b"blocked" in check.stderr
    daemon, port = our_server("--key", "bare", env=env)
    try:
        report = run_client("pymodule", "127.0.0.1", port, "bare", source)
        assert report == {"ok": True, "sum": 42, "modules": []}
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.output


def test_through_tvm_proxy(tvm):
    """Our server behind TVM's proxy: our client and TVM's get sessions in turn."""
    from tests.daemons import tvm_proxy

    with tvm_proxy() as (_, proxy_port):
        daemon = Daemon(
            twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                   "--port", str(proxy_port), "--key", "behind")
        )
        try:
            daemon.wait_for(r"waiting at proxy 127\.0\.0\.1:%d as behind" % proxy_port)
            assert run_client("connect", "127.0.0.1", proxy_port, "behind") == {"ok": True}
            daemon.wait_for(r"waiting at proxy", timeout=30)
            remote = tvm.rpc.connect("127.0.0.1", proxy_port, key="behind", session_timeout=20)
            assert remote.get_function("tvm.rpc.server.workpath")("x").endswith("/x")
            del remote
            daemon.wait_for(r"tvm session for a client through proxy .* ended")
            assert run_client("connect", "127.0.0.1", proxy_port, "behind") == {"ok": True}
        finally:
            daemon.stop()


def test_refusal_packet_is_tvms(tvm):
    """Our refusal packet is byte for byte what TVM's own server sends to report an error."""
    import socket

    from tvm.rpc import _ffi_api

    from tvm_rpc.protocol.flavour import tvm_exception_packet

    ours, theirs = socket.socketpair()
    try:
        message = "a message with ünicode"
        _ffi_api.ReturnException(ours.fileno(), message)
        expected = tvm_exception_packet(message)
        theirs.settimeout(10)
        received = b""
        while len(received) < len(expected):
            chunk = theirs.recv(4096)
            assert chunk
            received += chunk
        assert received == expected
    finally:
        ours.close()
        theirs.close()


def test_fifo_tar_abandoned(tvm, tmp_path):
    """A .tar with a FIFO member hangs its load for ever; the client leaving frees the device."""
    import tarfile

    fifo = tmp_path / "pipe.o"
    os.mkfifo(fifo)
    archive = tmp_path / "fifo.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(fifo, arcname="pipe.o")
    daemon, port = our_server("--key", "fifo", "--init", "tests.server_init_sample")
    try:
        client = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "interop_client.py"), "load", "127.0.0.1",
             str(port), "fifo", str(archive)],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(), cwd=str(ROOT),
        )
        try:
            started = json.loads(client.stdout.readline())
            worker = started["pid"]
            # The load is under way (its linker blocks on the FIFO) once the archive is in.
            wait_until(lambda: os.path.exists(os.path.join(started["workpath"], "fifo.tar")),
                       what="the upload")
            assert not gone(worker)
            client.kill()
            client.wait(30)
        finally:
            client.kill()
            client.wait(30)
        wait_until(lambda: gone(worker), timeout=5, what="the worker's end")
        wait_until(lambda: not os.path.exists(started["workpath"]), timeout=5,
                   what="the work directory's removal")
        assert run_client("connect", "127.0.0.1", port, "fifo") == {"ok": True}
    finally:
        daemon.stop()


def test_longest_file_name_uploads():
    """A file name of NAME_MAX (255) bytes uploads to a real server (its temporary name fits too)."""
    daemon, port = our_server("--key", "names")
    try:
        name = "n" * 251 + ".bin"
        assert run_client("upload", "127.0.0.1", port, "names", name) == {
            "ok": True, "listed": True, "same": True}
    finally:
        daemon.stop()
