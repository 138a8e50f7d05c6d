"""Our Deferred client against Apache TVM's own servers (real apache-tvm processes).

- The seed story (upload, load_module, arrays, run, numpy check,
  time_evaluator with TVM's options, close) on TVM's ``rpc_server`` reached
  directly (``connect``), through our tracker (``request``) or TVM's
  (``request_and_run``), and through our proxy or TVM's; ``session.protocol``
  says ``"tvm"`` every time.
- One client process, one reactor: eight TVM servers used at once; TVM's
  servers and ours mixed under one key, each session telling which it is.

The error paths (timeouts, a killed server, garbage, handle counting) are in
``test_interop_tvm_servers_faults.py``.
"""

import contextlib
import sys

import pytest

from tests.daemons import (
    ROOT,
    Daemon,
    free_port,
    free_servers,
    our_proxy,
    our_rpc_server,
    our_tracker,
    tvm_proxy,
    tvm_rpc_server,
    tvm_rpc_server_through,
    tvm_tracker,
    wait_listening,
    wait_summary,
)
from tests.test_interop_server import M, N, dense_relu, run_client  # noqa: F401

pytestmark = pytest.mark.system

DRIVER = str(ROOT / "tests" / "tvm_server_driver.py")
HOST = "127.0.0.1"
#: Seconds a server may take to start or to show up where the client looks for it.
START_TIMEOUT = 60


def drive(*args):
    """Run L{tests.tvm_server_driver} with C{args}; @return: its JSON report."""
    return run_client(*args, script=DRIVER)


def check_story(report, protocol="tvm"):
    """The story ran, gave numpy's answer and timed the layer (both ways)."""
    assert report["ok"] is True, report
    assert report["protocol"] == protocol
    assert report["max_abs_error"] < 1e-4
    assert report["nonzero"] > 0
    assert len(report["timings"]) == 2 and all(t > 0 for t in report["timings"]), report
    tuned = report["tuned_timings"]
    if protocol == "tvm_rpc" and isinstance(tuned, dict):
        # Our server may refuse TVM's extra options, but then names them.
        assert tuned["error_type"] == "ValueError", report
        assert "cooldown_interval_ms" in tuned["message"], report
    else:
        assert len(tuned) == 3 and all(t > 0 for t in tuned), report


@contextlib.contextmanager
def tracked_by(tracker, key):
    """TVM's server registered as C{key} with a tracker; yields the tracker's port."""
    with tracker() as (_, tracker_port), \
            tvm_rpc_server("--tracker", f"{HOST}:{tracker_port}", "--key", key):
        wait_summary(tracker_port, lambda summary: free_servers(summary, key) == 1,
                     timeout=START_TIMEOUT)
        yield tracker_port


@contextlib.contextmanager
def behind(proxy, ready, key):
    """TVM's server waiting at a proxy as C{key}; yields the proxy's port."""
    with proxy() as (proxy_daemon, proxy_port), tvm_rpc_server_through(proxy_port, key):
        proxy_daemon.wait_for(ready, timeout=START_TIMEOUT)
        yield proxy_port


@contextlib.contextmanager
def reached(path, key):
    """TVM's server reached along C{path}; yields the driver's C{(via, host, port)}."""
    if path == "direct":
        with tvm_rpc_server("--key", key) as (_, port):
            yield "direct", HOST, port
    elif path == "our tracker":
        with tracked_by(our_tracker, key) as port:
            yield "tracker", HOST, port
    elif path == "TVM's tracker":
        # request_and_run here, request() above: both hand the story a session.
        with tracked_by(tvm_tracker, key) as port:
            yield "run", HOST, port
    elif path == "our proxy":
        with behind(our_proxy, f"presented 'server:{key}'", key) as port:
            yield "direct", HOST, port
    else:
        with behind(tvm_proxy, rf"Handler ready \S*server:{key}\b", key) as port:
            yield "direct", HOST, port


@pytest.mark.parametrize(
    "path", ["direct", "our tracker", "TVM's tracker", "our proxy", "TVM's proxy"])
def test_story(tvm, dense_relu, path):
    """The seed story on TVM's rpc_server, reached along C{path}."""
    with reached(path, "tvmdev") as (via, host, port):
        check_story(drive("story", via, host, port, "tvmdev", dense_relu, N, M))


@contextlib.contextmanager
def tvm_servers(count, *extra):
    """
    C{count} TVM rpc_servers started together (their imports overlap);
    yields their ports once each listens.
    """
    ports, daemons = [], []
    try:
        for _ in range(count):
            port = free_port(HOST)
            while port in ports:
                port = free_port(HOST)
            ports.append(port)
            daemons.append(Daemon([
                sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(port),
                "--port-end", str(port + 1), *extra]))
        for daemon, port in zip(daemons, ports):
            daemon.wait_for(r"bind to", timeout=START_TIMEOUT)
            wait_listening(port)
        yield ports
    finally:
        for daemon in daemons:
            daemon.stop()


def test_eight_tvm_servers_at_once(tvm, dense_relu):
    """Eight sessions on eight TVM servers from one reactor, the story on all at once."""
    with our_tracker() as (_, tracker_port), \
            tvm_servers(8, "--tracker", f"{HOST}:{tracker_port}", "--key", "eight") as ports:
        wait_summary(tracker_port, lambda summary: free_servers(summary, "eight") == 8,
                     timeout=START_TIMEOUT)
        report = drive("many", HOST, tracker_port, "eight", 8, dense_relu, N, M)
    assert report["ok"] is True, report
    for story in report["stories"]:
        check_story(story)
    used = sorted(int(story["address"].rsplit(":", 1)[1]) for story in report["stories"])
    assert used == sorted(ports)


def test_tvm_servers_and_ours_under_one_key(tvm, dense_relu):
    """Two TVM servers and two of ours share a key: every session works and says which it is."""
    with contextlib.ExitStack() as stack:
        _, tracker_port = stack.enter_context(our_tracker())
        tracker = ("--tracker", f"{HOST}:{tracker_port}", "--key", "mixed")
        theirs = stack.enter_context(tvm_servers(2, *tracker))
        ours = [stack.enter_context(our_rpc_server(*tracker))[1] for _ in range(2)]
        wait_summary(tracker_port, lambda summary: free_servers(summary, "mixed") == 4,
                     timeout=START_TIMEOUT)
        report = drive("many", HOST, tracker_port, "mixed", 4, dense_relu, N, M)
    assert report["ok"] is True, report
    protocols = {}
    for story in report["stories"]:
        port = int(story["address"].rsplit(":", 1)[1])
        expected = "tvm" if port in theirs else "tvm_rpc"
        check_story(story, protocol=expected)
        protocols[port] = story["protocol"]
    assert sorted(protocols) == sorted(theirs + ours)
