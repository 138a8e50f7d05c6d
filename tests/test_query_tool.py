"""The query tool's command line (``python -m tvm_rpc.query``) as a process,
against scripted peers on loopback and our tracker."""

import json
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest

from daemons import child_env, our_tracker, recv_exactly
from query_samples import SUMMARY
from tvm_rpc.protocol.constants import INT32
from tvm_rpc.protocol.framing import encode_frame, encode_magic

pytestmark = pytest.mark.system

MAGIC = encode_magic()


@contextmanager
def socket_peer(behaviour):
    """
    A one-shot peer on a loopback port, run by C{behaviour(conn)} in a thread.

    @return: the port.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(20)

    def serve():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                behaviour(conn)
            except OSError:
                pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(25)


def run_main(*args):
    """Run C{python -m tvm_rpc.query} and return the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "tvm_rpc.query", *args],
        capture_output=True, env=child_env(), timeout=60,
    )


def test_main_unreachable_tracker():
    """Nothing listens: one line on stderr naming the address, exit status 1."""
    # A port bound but not listening refuses connections, and nobody else can take it.
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        port = bound.getsockname()[1]
        result = run_main("--host", "127.0.0.1", "--port", str(port), "--timeout", "5")
    assert result.returncode == 1
    assert result.stdout == b""
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert f"127.0.0.1:{port}" in err
    assert "connection refused" in err
    assert "Traceback" not in err


def test_main_not_a_tracker():
    """A peer that answers the magic with something else: one line, exit 1."""

    def http(conn):
        conn.recv(4)
        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        conn.recv(1)

    with socket_peer(http) as port:
        result = run_main("--port", str(port))
    assert result.returncode == 1
    err = result.stderr.decode()
    assert err.count("\n") == 1, err
    assert "not an RPC tracker" in err


def test_main_json():
    """--json prints the summary a tracker sends, as JSON."""
    summary = dict(SUMMARY, leases=[])

    def tracker(conn):
        assert recv_exactly(conn, 4) == MAGIC
        conn.sendall(MAGIC)
        (length,) = INT32.unpack(recv_exactly(conn, 4))
        assert json.loads(recv_exactly(conn, length)) == [6]
        conn.sendall(encode_frame([0, summary]))
        conn.recv(1)

    with socket_peer(tracker) as port:
        result = run_main("--port", str(port), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == summary
    assert result.stderr == b""


OUR_TRACKER_SCRIPT = """
import json, subprocess, sys
from twisted.internet import defer, task
from tvm_rpc.client import TrackerError, connect_tracker
from tvm_rpc.protocol.tracker_commands import Put, UpdateInfo

async def pending(session):
    return (await session.summary())["queue_info"]["dev"]["pending"]

async def settle(reactor, session, want):
    for _ in range(100):
        if await pending(session) == want:
            return want
        await task.deferLater(reactor, 0.02, lambda: None)
    return await pending(session)

async def go(reactor):
    host, port = sys.argv[1], int(sys.argv[2])
    report = {}
    session = await connect_tracker(host, port, reactor=reactor, connect_timeout=10)
    server = await session.open_connection()
    await server.call(UpdateInfo({"key": "server:dev", "addr": [None, 9999]}))
    await server.call(Put("dev", 9999, "dev:0.25"))
    got = await session.allocate("dev", priority=3, user="alice", timeout=10)
    report["allocation"] = [got.host, got.port, got.matchkey]
    try:
        await session.allocate("dev", timeout=0.3)
    except TrackerError as e:
        report["timeout"] = type(e).__name__
    waiting = session.allocate("dev")
    waiting.addErrback(lambda failure: None)
    report["pending_before_cancel"] = await settle(reactor, session, 1)
    waiting.cancel()
    report["pending_after_cancel"] = await settle(reactor, session, 0)
    leases = subprocess.run(
        [sys.executable, "-m", "tvm_rpc.query", "--host", host, "--port", str(port),
         "--leases"], capture_output=True, timeout=60)
    report["leases"] = leases.stdout.decode()
    await server.close()
    await session.close()
    print(json.dumps(report))

task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))
"""


def test_client_and_query_tool_against_our_tracker():
    """
    Our client and query tool with our tracker (C{twistd rpc-tracker}): an
    allocation becomes a lease that --leases shows, a timeout is honoured and a
    cancelled request leaves the queue at once.
    """
    with our_tracker() as (_, port):
        done = subprocess.run(
            [sys.executable, "-c", OUR_TRACKER_SCRIPT, "127.0.0.1", str(port)],
            stdin=subprocess.DEVNULL, capture_output=True, env=child_env(), timeout=120,
        )
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    report = json.loads(done.stdout)
    assert report["allocation"] == ["127.0.0.1", 9999, "dev:0.25"]
    assert report["timeout"] in ("TrackerError", "AllocationTimeout")
    assert report["pending_before_cancel"] == 1
    assert report["pending_after_cancel"] == 0
    rows = [line.split() for line in report["leases"].splitlines()]
    lease = next(row for row in rows if "dev" in row)
    assert lease[0].startswith("127.0.0.1:")
    assert lease[1:4] == ["(alice)", "dev", "3"]
    assert lease[-1] == "127.0.0.1:9999"
    assert "dev:0.25" not in report["leases"]
