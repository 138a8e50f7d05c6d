"""Our Deferred client against Apache TVM's servers when things go wrong.

Each error path gives its own clear error, within a bound, and leaks nothing:

- a missing function and a remote exception (the session goes on);
- the session timeout asked at the handshake (TVM's server sends its
  ``RPCSessionTimeoutError`` notice: our L{SessionTimeout});
- the serving processes killed mid-call (the call fails with a lost
  connection at once);
- a server that answers the handshake like TVM's, then sends garbage (see
  L{tests.tvm_garbage}): that session closes naming what was wrong (an
  answer longer than the session's bound fails its call, naming the length,
  and is skipped unread), while another session in the same reactor keeps
  working;
- handle counting: a relay that decodes the session stream counts the
  handles TVM's server hands out and those freed (see
  L{tests.tvm_handle_count}); after the story, cancelled calls and remote
  errors they balance by the session's end.
"""

import json
import signal
import subprocess
import sys

import pytest

from tests.daemons import ROOT, Daemon, child_env, tvm_rpc_server
from tests.test_interop_server import M, N, dense_relu, run_client  # noqa: F401
from tests.tvm_garbage import BAD_CODE, BAD_TYPE_INDEX, HUGE_LENGTH, KINDS, SHORT_COPY

pytestmark = pytest.mark.system

DRIVER = str(ROOT / "tests" / "tvm_server_driver.py")
HOST = "127.0.0.1"
#: Seconds the driver may take to report after the server went away.
PROMPTLY = 30


def drive(*args):
    """Run L{tests.tvm_server_driver} with C{args}; @return: its JSON report."""
    return run_client(*args, script=DRIVER)


def test_missing_function_and_remote_exception(tvm):
    """Both arrive as RemoteError with TVM's text; the session works on."""
    with tvm_rpc_server("--key", "errors") as (_, port):
        report = drive("errors", HOST, port, "errors")
    assert report["ok"] is True, report
    assert report["protocol"] == "tvm"
    for missing in (report["missing"], report["missing_call"]):
        assert missing["error_type"] == "RemoteError", missing
        assert "no.such.function" in missing["message"], missing
    raised = report["raised"]
    assert raised["error_type"] == "RemoteError", raised
    # TVM's kException carries the error's text, not its kind.
    assert "raised on purpose" in raised["message"], raised
    assert report["after"].endswith("/after"), report


def run_long(port, key, library, session_timeout):
    """@return: the driver of a never-ending call on TVM's server at C{port}, once it is sent."""
    driver = Daemon([sys.executable, DRIVER, "long", HOST, str(port), key, str(library),
                     str(N), str(M), str(session_timeout)], env=child_env(), cwd=str(ROOT))
    try:
        driver.wait_for(r'"calling": true', timeout=60)
    except BaseException:
        driver.stop()
        raise
    return driver


def final_report(driver, timeout=PROMPTLY):
    """@return: the driver's last JSON report, once it printed it."""
    try:
        driver.wait_for(r'^\{"ok"', timeout=timeout)
    finally:
        driver.stop()
    return json.loads([line for line in driver.lines if line.startswith('{"ok"')][-1])


def test_session_timeout(tvm, dense_relu):
    """TVM's timeout notice fails the call in flight with SessionTimeout and ends the session."""
    with tvm_rpc_server("--key", "timeout") as (server, port):
        report = final_report(run_long(port, "timeout", dense_relu, 3))
        server.wait_for(r"timeout in RPC session, kill")
    assert report["ok"] is False, report
    assert "SessionTimeout" in report["error_types"], report
    assert "session_timeout" in report["message"] or "expired" in report["message"], report
    # Read as the call fails: the session must already say it is over.
    assert report["closed"] is True, "session.closed is False when the call fails"
    assert "SessionClosed" in report["later"]["error_types"], report


def test_server_killed_mid_call(tvm, dense_relu):
    """SIGKILL to the serving process group fails the call in flight with a lost connection."""
    with tvm_rpc_server("--key", "killed") as (server, port):
        driver = run_long(port, "killed", dense_relu, 0)
        server.stop(signal.SIGKILL)
        report = final_report(driver)
    assert report["ok"] is False, report
    assert "ConnectionLost" in report["error_types"], report
    assert "TimeoutError" not in report["error_types"], report
    assert report["closed"] is True, "session.closed is False when the call fails"
    assert "SessionClosed" in report["later"]["error_types"], report


#: What the error of each kind of garbage must name.
NAMED = {
    "code": str(BAD_CODE),
    "type": str(BAD_TYPE_INDEX),
    "length": str(HUGE_LENGTH),
    "copyack": str(SHORT_COPY),
}


@pytest.mark.parametrize("kind", KINDS)
def test_garbage_closes_only_its_session(tvm, kind):
    """A server of garbage: its session closes with an error naming it; another goes on."""
    with tvm_rpc_server("--key", "good") as (_, port):
        report = drive("garbage", kind, HOST, port, "good")
    assert report["ok"] is True, report
    assert report["opened"] == "ok", report
    assert report["protocol"] == "tvm"
    bad = report["bad"]
    assert bad["ok"] is False, report
    assert "TimeoutError" not in bad["error_types"], report
    assert NAMED[kind] in bad["message"], report
    if kind == "length":
        # An answer over max_result_size fails its call and is skipped as it
        # comes (never kept): the session may go on, and close() ends it.
        assert "ResultTooLarge" in bad["error_types"] or report["bad_closed"], report
        assert report["bad_closed"] or report["bad_close"] is None, report
    else:
        assert report["bad_closed"] is True, report
        assert "SessionClosed" in report["bad_later"]["error_types"], report
    assert report["during"].endswith("/during"), report
    assert report["after"].endswith("/after"), report


def test_handles_balance(tvm, dense_relu):
    """Every handle and allocation TVM's server handed out is freed by the session's end."""
    with tvm_rpc_server("--key", "count") as (_, port):
        report = drive("count", HOST, port, "count", dense_relu, N, M)
    assert report["ok"] is True, report
    assert report["missing"]["error_type"] == "RemoteError", report
    assert report["raised"]["error_type"] == "RemoteError", report
    assert report["missing_in_module"]["error_type"] == "RemoteError", report
    # The story alone makes functions, a module and three arrays on the server.
    assert report["handles_acquired"] >= 4, report
    assert report["data_acquired"] >= 3, report
    assert report["handles_held"] == {}, report
    assert report["data_held"] == {}, report
    assert report["unmatched"] == 0, report
    assert report["shutdown"] is True, report


#: TVM's own client through the counting relay: the story's objects, a remote
#: exception, then freeing everything (C{free}) or exiting at once (C{leave}).
TVM_CLIENT = """
import os, sys
import tvm, tvm.rpc
port, library, n, m, ending = sys.argv[1:]
remote = tvm.rpc.connect("127.0.0.1", int(port), key="count")
remote.upload(library, "dense_relu.so")
module = remote.load_module("dense_relu.so")
device = remote.cpu(0)
arrays = [tvm.runtime.empty(shape, "float32", device)
          for shape in ((1, int(n)), (int(m), int(n)), (1, int(m)))]
module["dense_relu"](*arrays)
try:
    remote.get_function("testing.test_raise_error")("ValueError", "raised on purpose")
except Exception:
    pass
if ending == "leave":
    os._exit(0)
del arrays, module, remote
"""


@pytest.mark.parametrize("ending", ["free", "leave"])
def test_counter_on_tvms_own_client(tvm, dense_relu, ending):
    """The counter finds TVM's own client balanced, and one that leaves without freeing not."""
    with tvm_rpc_server("--key", "count") as (_, port):
        relay = Daemon([sys.executable, DRIVER, "relay", HOST, str(port)], env=child_env(),
                       cwd=str(ROOT))
        try:
            relay_port = int(relay.wait_for(r'"relay": (\d+)', timeout=60).group(1))
            subprocess.run([sys.executable, "-c", TVM_CLIENT, str(relay_port), str(dense_relu),
                            str(N), str(M), ending], check=True, timeout=120, env=child_env())
        except BaseException:
            relay.stop()
            raise
        report = final_report(relay)
    assert report["ok"] is True, report
    assert report["handles_acquired"] >= 4 and report["data_acquired"] == 3, report
    if ending == "free":
        assert (report["handles_held"], report["data_held"]) == ({}, {}), report
        assert report["shutdown"] is True
    else:
        assert len(report["data_held"]) == 3 and report["handles_held"], report
        assert report["shutdown"] is False
