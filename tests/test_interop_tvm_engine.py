"""
Our client on TVM's own server (C{python -m tvm.exec.rpc_server}): the TVM
engine against the real thing.

- The seed story, directly: upload a dense + ReLU layer TVM compiled, load
  it, run it on device arrays, compare with numpy, time it with TVM's
  options, and the verbs around it (download, remove, workpath, system_lib,
  a clear error for listdir, which TVM's Python server lacks).
- Errors: a missing function and a remote exception map to the same
  L{RemoteError} types as on our server, an answer over max_result_size to
  L{ResultTooLarge}, and the session goes on.
- The server keeps serving after our sessions (TVM's client is served next).
- A server with a packet limit (C{tvm.rpc.server.GetCRTMaxPacketSize}) gets
  chunked copies and returns the data intact.
"""

import json
import subprocess
import sys

from tests.daemons import ROOT, child_env, free_port, running, tvm_rpc_server
from tests.test_interop_server import M, N, dense_relu  # noqa: F401 (a fixture)

CLIENT_SCRIPT = str(ROOT / "tests" / "tvm_engine_client.py")
#: Bound on each child client run, so a broken peer fails the test instead of hanging it.
CLIENT_TIMEOUT = 120


def run_client(*args):
    """Run our client in a child process; @return: its JSON report."""
    completed = subprocess.run(
        [sys.executable, CLIENT_SCRIPT, *map(str, args)], capture_output=True,
        timeout=CLIENT_TIMEOUT, env=child_env(), cwd=str(ROOT))
    lines = [line for line in completed.stdout.decode().splitlines() if line.startswith("{")]
    assert lines, f"no report:\n{completed.stdout.decode()}\n{completed.stderr.decode()}"
    return json.loads(lines[-1])


def test_seed_story_on_tvm_server(tvm, dense_relu):
    """The whole story runs on TVM's server through the TVM engine, and the server serves on."""
    with tvm_rpc_server() as (_, port):
        report = run_client("story", "127.0.0.1", port, dense_relu, N, M)
        assert report["protocol"] == "tvm"
        assert report["uploaded"] == dense_relu.stat().st_size
        assert report["download_matches"] is True
        assert report["cpu_exists"] is True and report["cuda_exists"] is False
        assert report["max_abs_error"] < 1e-4 and report["nonzero"] > 0
        assert report["w_back_equal"] is True
        assert len(report["timings"]) == 3 and all(t > 0 for t in report["timings"])
        assert len(report["lazy_timings"]) == 2
        assert report["workpath"].endswith("/x")
        assert report["addone"] == 41 and report["echo_text"] == "hé"
        assert report["system_lib"] == "RemoteModule"
        assert report["listdir_error"]["type_name"].endswith("NoSuchFunction")
        assert "only apps/cpp_rpc registers it" in report["listdir_error"]["message"]
        assert report["closed"] is True
        remote = tvm.rpc.connect("127.0.0.1", port)
        assert remote.get_function("tvm.rpc.server.workpath")("x").endswith("x")


def test_errors_on_tvm_server(tvm):
    """
    A missing function and a remote exception are RemoteErrors, a download
    over max_result_size is ResultTooLarge; the session goes on after each.
    """
    with tvm_rpc_server() as (_, port):
        report = run_client("errors", "127.0.0.1", port)
    assert report["missing"]["type"] == "RemoteError"
    assert report["missing"]["type_name"] == "tvm_rpc.server.registry.NoSuchFunction"
    assert "no global function named 'no.such.function'" in report["missing"]["message"]
    assert report["exception"]["type"] == "RemoteError"
    assert "missing.so" in report["exception"]["message"]
    assert report["after"] == 7
    assert report["too_large"]["type"] == "ResultTooLarge"
    assert "5" in report["too_large"]["message"] and "max_result_size" in report["too_large"]["message"]
    assert report["after_too_large"] == 8


def test_copies_within_the_servers_packet_limit(tvm):
    """A server with GetCRTMaxPacketSize gets copies in chunks within it, and the data is intact."""
    port = free_port()
    script = str(ROOT / "tests" / "tvm_packet_limit_server.py")
    with running([sys.executable, script, str(port), "1024"], r"listening on"):
        report = run_client("chunks", "127.0.0.1", port, 5000)
    assert report == {"equal": True, "limit": 1024}
