"""Apache TVM's own client on our rpc-server (TVM's session protocol in our worker).

Every client here is the real ``tvm.rpc`` of apache-tvm, run in a child
process (``tests/tvm_client.py``) so a hang fails its test instead of the run:

- TVM's story (upload a compiled library, load it, remote tensors, run,
  compare with numpy, ``time_evaluator``, download, remove, a missing
  function, a remote exception, a registered function, a path that escapes)
  through our tracker, TVM's tracker, our proxy and TVM's proxy;
- the session timeout gives TVM's ``RPCSessionTimeoutError``; garbage after
  the handshake, a client killed mid-call and a worker killed mid-call end
  that session only: the next client is served at once and the server is
  back in the tracker's free pool;
- refusals (a server without TVM's runtime, or running sessions in-process)
  name what is missing and close cleanly; our client's sessions on one of
  TVM's servers leave that server serving.
"""

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time

import pytest

from tests.daemons import (
    ROOT,
    Daemon,
    child_env,
    free_port,
    gone,
    our_proxy,
    our_tracker,
    recv_exactly,
    running,
    tvm_proxy,
    tvm_tracker,
    twistd,
    wait_until,
)
from tests.test_interop_server import BLOCKER, dense_relu, our_server, run_client  # noqa: F401
from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS, RPC_MAGIC

TVM_CLIENT = str(ROOT / "tests" / "tvm_client.py")
#: Bound on each child client run.
CLIENT_TIMEOUT = 120
INIT = ("--init", "tests.server_init_sample")
N, M = 64, 32


def tvm_client(*args, timeout=CLIENT_TIMEOUT):
    """Run TVM's client in a child process; @return: its last JSON report."""
    completed = subprocess.run(
        [sys.executable, TVM_CLIENT, *map(str, args)],
        capture_output=True, timeout=timeout, env=child_env(), cwd=str(ROOT),
    )
    lines = [line for line in completed.stdout.decode().splitlines() if line.startswith("{")]
    assert lines, f"no report from TVM's client:\n{completed.stdout.decode()}\n{completed.stderr.decode()}"
    return json.loads(lines[-1])


def check_story(report):
    assert report["ok"] is True, report
    assert "dense_relu.so" in report["listed"].split(",")
    assert report["max_abs_error"] < 1e-4
    assert report["nonzero"] > 0
    assert len(report["timings"]) == 2 and all(t > 0 for t in report["timings"])
    assert report["download_same"] is True
    assert report["missing"]["error_type"] == "AttributeError"
    assert "no_such_function" in report["missing"]["message"]
    assert report["remote_error"]["error_type"] == "RPCError"
    assert "the kernel said no" in report["remote_error"]["message"]
    assert report["add"] == 42
    assert "'..' is not allowed" in report["escape"]["message"]
    assert report["listed_after"] == ""


def free_servers(tracker_port, key):
    """@return: the free servers of C{key} in our tracker's summary (TVM's query as a library)."""
    import tvm.rpc

    summary = tvm.rpc.connect_tracker("127.0.0.1", tracker_port).summary()
    return summary["queue_info"].get(key, {}).get("free", 0)


@pytest.fixture
def tracked_server(tvm):
    """Our tracker and one of our servers under key C{tvmdev}; yields C{(server, tracker_port)}."""
    with our_tracker() as (_, tracker_port):
        server, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", "tvmdev", *INIT)
        try:
            server.wait_for(r"registered tvmdev with tracker")
            yield server, tracker_port
        finally:
            server.stop()


def test_story_via_our_tracker(tracked_server, dense_relu):
    server, tracker_port = tracked_server
    check_story(tvm_client("story", "tracker", "127.0.0.1", tracker_port, "tvmdev", dense_relu, N, M))
    server.wait_for(r"tvm session for .* ended \(sessions so far: 0 tvm_rpc, 1 tvm\)")
    assert "Traceback" not in server.output


def test_story_via_tvm_tracker(tvm, dense_relu):
    with tvm_tracker() as (_, tracker_port):
        server, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", "tvmdev", *INIT)
        try:
            server.wait_for(r"registered tvmdev with tracker")
            check_story(
                tvm_client("story", "tracker", "127.0.0.1", tracker_port, "tvmdev", dense_relu, N, M)
            )
        finally:
            server.stop()


def test_story_through_our_proxy(tvm, dense_relu):
    """Our server behind our proxy, which registers it with our tracker."""
    with our_tracker() as (_, tracker_port), \
         our_proxy("--tracker", f"127.0.0.1:{tracker_port}") as (_, proxy_port):
        server = Daemon(twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                               "--port", str(proxy_port), "--key", "behind", *INIT))
        try:
            server.wait_for(r"waiting at proxy")
            wait_until(lambda: free_servers(tracker_port, "behind") == 1, what="a free server")
            check_story(
                tvm_client("story", "tracker", "127.0.0.1", tracker_port, "behind", dense_relu, N, M)
            )
            server.wait_for(r"tvm session for a client through proxy .* ended")
        finally:
            server.stop()


def test_story_through_tvm_proxy(tvm, dense_relu):
    """Our server behind TVM's proxy, reached by key directly at the proxy."""
    with tvm_proxy() as (_, proxy_port):
        server = Daemon(twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                               "--port", str(proxy_port), "--key", "behind", *INIT))
        try:
            server.wait_for(r"waiting at proxy")
            check_story(
                tvm_client("story", "direct", "127.0.0.1", proxy_port, "behind", dense_relu, N, M)
            )
            # The link comes back for the next client, which is served too.
            server.wait_for(r"waiting at proxy .* as behind", timeout=30)
            assert tvm_client("ping", "direct", "127.0.0.1", proxy_port, "behind")["add"] == 42
        finally:
            server.stop()


def back_in_pool(server, tracker_port):
    """The server is free at the tracker again and serves the next TVM client."""
    wait_until(lambda: free_servers(tracker_port, "tvmdev") == 1, what="the server free again")
    report = tvm_client("ping", "tracker", "127.0.0.1", tracker_port, "tvmdev")
    assert report == {"ok": True, "add": 42, "seconds": report["seconds"]}, report


def test_session_timeout(tracked_server):
    """TVM's client gets TVM's RPCSessionTimeoutError; the worker was killed first."""
    server, tracker_port = tracked_server
    report = tvm_client("hang", "tracker", "127.0.0.1", tracker_port, "tvmdev", 2, 60)
    assert report["ok"] is False
    assert report["error_type"] == "RPCSessionTimeoutError", report
    assert "Your 2.0s session has expired" in report["message"]
    server.wait_for(r"exceeded its 2\.0s timeout; killing its worker")
    back_in_pool(server, tracker_port)


def test_garbage_after_handshake(tracked_server):
    """A client that sends garbage after the handshake ends its own session only."""
    server, tracker_port = tracked_server
    host, port, matchkey = _grant(tracker_port)
    with socket.create_connection((host, port), timeout=30) as sock:
        key = f"client:{matchkey}".encode()
        sock.sendall(struct.pack("<ii", RPC_MAGIC, len(key)) + key)
        code, length = struct.unpack("<ii", recv_exactly(sock, 8))
        assert code == RPC_CODE_SUCCESS
        recv_exactly(sock, length)
        # A packet of 12 bytes whose value has an unknown type index.
        sock.sendall(struct.pack("<QiiI", 12, 3, 1, 99) + os.urandom(64))
        received = b""
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass  # the worker ended with our garbage unread
    # TVM's endpoint ends the session with an unsolicited shutdown packet, or just closes.
    assert received in (b"", struct.pack("<Qi", 4, 1)), received
    back_in_pool(server, tracker_port)


def _grant(tracker_port):
    """Ask our tracker for C{tvmdev} as TVM's client does; @return: C{(host, port, matchkey)}."""
    from tvm_rpc.protocol.constants import RPC_TRACKER_MAGIC

    with socket.create_connection(("127.0.0.1", tracker_port), timeout=30) as sock:
        sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
        recv_exactly(sock, 4)
        body = json.dumps([4, "tvmdev", "test", 0]).encode()
        sock.sendall(struct.pack("<i", len(body)) + body)
        (length,) = struct.unpack("<i", recv_exactly(sock, 4))
        code, (host, port, matchkey) = json.loads(recv_exactly(sock, length))
        assert code == 0
        return host, port, matchkey


def start_pid_hang(tracker_port):
    """Start TVM's client calling C{test.hang(60)}; @return: C{(process, worker pid)}."""
    client = subprocess.Popen(
        [sys.executable, TVM_CLIENT, "pid-hang", "tracker", "127.0.0.1", str(tracker_port),
         "tvmdev", "60"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=child_env(), cwd=str(ROOT),
    )
    line = client.stdout.readline()
    assert line.startswith(b"{"), line
    return client, json.loads(line)["pid"]


def test_client_killed_mid_call(tracked_server):
    """The worker ends as soon as its client is gone, even in the middle of a call."""
    server, tracker_port = tracked_server
    client, worker = start_pid_hang(tracker_port)
    try:
        client.kill()
        client.wait(30)
        wait_until(lambda: gone(worker), timeout=5, what="the worker's end")
    finally:
        client.kill()
        client.wait(30)
    back_in_pool(server, tracker_port)


def test_worker_killed_mid_call(tracked_server):
    """A worker killed in the middle of a call ends that session; the client hears of it."""
    server, tracker_port = tracked_server
    client, worker = start_pid_hang(tracker_port)
    try:
        os.kill(worker, signal.SIGKILL)
        out, _ = client.communicate(timeout=60)
    finally:
        client.kill()
        client.wait(30)
    report = json.loads(out.decode().splitlines()[-1])
    assert report["ok"] is False, report
    server.wait_for(r"worker %d for .* died \(exit code None, signal 9\)" % worker)
    back_in_pool(server, tracker_port)


def test_refused_in_process_clearly(tvm):
    """--no-fork runs sessions in the daemon: TVM's client is told so, and closed cleanly."""
    daemon, port = our_server("--key", "dev", "--no-fork")
    try:
        report = tvm_client("ping", "direct", "127.0.0.1", port, "dev")
        assert report["ok"] is False
        assert "--no-fork" in report["message"], report
        daemon.wait_for(r"refusing 127\.0\.0\.1:\d+: its tvm session cannot run here")
        # Our client is still served.
        assert run_client("connect", "127.0.0.1", port, "dev") == {"ok": True}
    finally:
        daemon.stop()


def test_refused_without_tvm_runtime(tvm, tmp_path):
    """A device without TVM's runtime tells TVM's client what to install."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    daemon, port = our_server("--key", "bare", env=env)
    try:
        daemon.wait_for(r"serves tvm_rpc's clients only")
        report = tvm_client("ping", "direct", "127.0.0.1", port, "bare")
        assert report["ok"] is False
        assert "pip install apache-tvm" in report["message"], report
        assert run_client("connect", "127.0.0.1", port, "bare") == {"ok": True}
    finally:
        daemon.stop()


def test_our_client_leaves_tvm_server_serving(tvm):
    """Our client's sessions on TVM's server end cleanly: TVM's server serves the next client."""
    port = free_port()
    args = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
            "--port", str(port), "--port-end", str(port + 1), "--key", "dev"]
    with running(args, r"bind to"):
        for _ in range(2):
            report = run_client("connect", "127.0.0.1", port, "dev")
            assert report == {"ok": True}, report
        remote = tvm.rpc.connect("127.0.0.1", port, key="dev", session_timeout=30)
        assert remote.get_function("tvm.rpc.server.workpath")("x").endswith("x")


def test_operator_limits_hold_for_tvm_clients(tvm, dense_relu):
    """--max-work-dir-bytes and --no-code-upload apply to TVM's clients too."""
    daemon, port = our_server("--key", "locked", "--no-code-upload",
                              "--max-work-dir-bytes", "100K", *INIT)
    try:
        report = tvm_client("limits", "direct", "127.0.0.1", port, "locked", dense_relu)
        assert report["ok"] is True, report
        assert "work directory would exceed its limit" in report["upload"]["message"], report
        assert "--no-code-upload" in report["load"]["message"], report
        assert report["add"] == 3
    finally:
        daemon.stop()

