"""Our rpc-server and client against the real apache-tvm.

- The TVM docs' story: compile a dense + ReLU layer with TVM for ``llvm``,
  request our server by key from our tracker, upload, load, run on device
  arrays, compare with numpy, time it; and the same through TVM's tracker.
- Our server registers with TVM's tracker and TVM's query tool lists it.
- A real TVM client reaching our server, and our client reaching TVM's
  server, each get a clear error naming the mismatch.
- A server that cannot import numpy, cloudpickle or TVM serves a ``.py``
  module session.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.daemons import ROOT, Daemon, child_env, free_port, our_tracker, running, tvm_tracker, twistd
from tvm_rpc.protocol.flavour import TVM_CLIENT_REFUSAL

CLIENT_SCRIPT = str(ROOT / "tests" / "interop_client.py")
#: Bound on each child client run, so a broken peer fails the test instead of hanging it.
CLIENT_TIMEOUT = 120


def run_client(*args, env=None):
    """Run our client in a child process; @return: its JSON report."""
    completed = subprocess.run(
        [sys.executable, CLIENT_SCRIPT, *map(str, args)],
        capture_output=True,
        timeout=CLIENT_TIMEOUT,
        env=env or child_env(),
        cwd=str(ROOT),
    )
    lines = [line for line in completed.stdout.decode().splitlines() if line.startswith("{")]
    assert lines, f"no report from the client:\n{completed.stdout.decode()}\n{completed.stderr.decode()}"
    return json.loads(lines[-1])


def our_server(*extra, env=None):
    """@return: a started L{Daemon} of our rpc-server on a free port, and the port."""
    port = free_port()
    daemon = Daemon(
        twistd(
            "rpc-server", "--host", "127.0.0.1", "--port", str(port),
            "--port-end", str(port + 1), *extra,
        ),
        env=env,
    )
    try:
        daemon.wait_for(r"rpc-server listening on", timeout=60)
    except BaseException:
        daemon.stop()
        raise
    return daemon, port


def test_tvm_client_refused_clearly(tvm):
    """TVM's own client reaching our server raises an error naming the mismatch."""
    daemon, port = our_server("--key", "dev")
    try:
        with pytest.raises(Exception) as caught:
            tvm.rpc.connect("127.0.0.1", port, key="dev", session_timeout=20)
        assert "tvm_rpc server" in str(caught.value)
        assert "not Apache TVM's native RPC server" in str(caught.value)
        daemon.wait_for(r"refusing 127\.0\.0\.1:\d+: an Apache TVM client")
        assert TVM_CLIENT_REFUSAL.split(":")[0] in str(caught.value)
    finally:
        daemon.stop()


def test_our_client_refused_by_tvm_server_clearly(tvm):
    """Our client reaching TVM's server fails at once with NotTvmRpcServer."""
    port = free_port()
    args = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
            "--port", str(port), "--port-end", str(port + 1), "--key", "dev"]
    with running(args, r"bind to"):
        report = run_client("connect", "127.0.0.1", port, "dev")
    assert report["ok"] is False
    assert report["error_type"] == "NotTvmRpcServer"
    assert "Apache TVM's native RPC server, not tvm_rpc" in report["message"]


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
