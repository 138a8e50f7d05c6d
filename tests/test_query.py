"""The query tool: options, rendering, the in-memory query and the real command line."""

import io
import json
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import pytest
from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from daemons import child_env, our_tracker
from tvm_rpc.client.tracker import text_summary
from tvm_rpc.protocol.tracker_commands import Summary
from tvm_rpc.protocol.constants import INT32
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame, encode_magic
from tvm_rpc.query import leases_table, parse_args, query

MAGIC = encode_magic()

SUMMARY = {
    "queue_info": {
        "rasp3b": {"free": 1, "pending": 0},
        "v100": {"free": 0, "pending": 3},
        "gone": {"free": 0, "pending": 0},
    },
    "server_info": [
        {"key": "server:v100", "addr": ["10.0.0.3", 9091]},
        {"key": "server:rasp3b", "addr": ["10.0.0.2", 9090]},
    ],
}

#: What TVM's query_rpc_tracker prints for SUMMARY (after its address line).
SUMMARY_TEXT = (
    "Server List\n"
    "------------------------------\n"
    "server-address           key\n"
    "------------------------------\n"
    "10.0.0.2:9090            server:rasp3b\n"
    "10.0.0.3:9091            server:v100\n"
    "------------------------------\n"
    "\n"
    "Queue Status\n"
    "------------------------------\n"
    "key      total  free  pending\n"
    "------------------------------\n"
    "rasp3b   1      1     0      \n"
    "v100     1      0     3      \n"
    "------------------------------\n"
)


class TextSummaryTests(SynchronousTestCase):
    """The pure renderer."""

    def test_tvm_layout(self):
        self.assertEqual(text_summary(SUMMARY), SUMMARY_TEXT)

    def test_empty(self):
        self.assertEqual(
            text_summary({"queue_info": {}, "server_info": []}),
            "Server List\n"
            "------------------------------\n"
            "server-address           key\n"
            "------------------------------\n"
            "------------------------------\n"
            "\n"
            "Queue Status\n"
            "---------------------------\n"
            "key   total  free  pending\n"
            "---------------------------\n"
            "---------------------------\n",
        )

    def test_proxy_entry_counts_toward_each_listed_key(self):
        text = text_summary({
            "queue_info": {"a": {"free": 1, "pending": 0}, "b": {"free": 2, "pending": 0}},
            "server_info": [{"key": "server:proxy[a,b]", "addr": ["10.0.0.9", 9090]}],
        })
        self.assertIn("10.0.0.9:9090            server:proxy[a,b]\n", text)
        self.assertIn("a   1      1     0      \n", text)
        self.assertIn("b   1      2     0      \n", text)

    def test_key_with_colon_is_counted_whole(self):
        text = text_summary({
            "queue_info": {"board:v2": {"free": 1, "pending": 0}},
            "server_info": [{"key": "server:board:v2", "addr": ["h", 1]}],
        })
        self.assertIn("board:v2   1      1     0      \n", text)

    def test_extra_fields_are_ignored(self):
        self.assertEqual(text_summary(dict(SUMMARY, leases=[{"key": "x"}])), SUMMARY_TEXT)


class LeasesTableTests(SynchronousTestCase):
    """The --leases table."""

    def test_no_leases_field(self):
        self.assertIsNone(leases_table({"queue_info": {}, "server_info": []}))

    def test_rows(self):
        table = leases_table({"leases": [
            {"key": "rk", "matchkey": "rk:0.5", "host": "10.0.0.2", "port": 9090,
             "client": ["127.0.0.1", 5555], "user": "me", "priority": 2,
             "since": 1700000000},
            {"key": "a", "matchkey": "a:1", "host": "h", "port": 1,
             "client": ["c", None], "user": "", "priority": 1.5, "since": 0},
        ]})
        lines = table.splitlines()
        self.assertEqual(lines[0], "Leases")
        self.assertEqual(lines[2].split(), ["holder", "key", "priority", "since", "(UTC)",
                                            "server"])
        self.assertEqual(lines[4].split(), ["c", "a", "1.5", "1970-01-01", "00:00:00",
                                            "h:1"])
        self.assertEqual(lines[5].split(), ["127.0.0.1:5555", "(me)", "rk", "2",
                                            "2023-11-14", "22:13:20", "10.0.0.2:9090"])

    def test_matchkey_never_printed(self):
        """A matchkey from a tracker that still lists one is not shown."""
        table = leases_table({"leases": [
            {"key": "rk", "matchkey": "rk:0.5", "host": "10.0.0.2", "port": 9090,
             "client": ["127.0.0.1", 5555], "user": "me", "priority": 2, "since": 0}]})
        self.assertNotIn("rk:0.5", table)
        self.assertIn("10.0.0.2:9090", table)

    def test_empty(self):
        self.assertIn("no server is held", leases_table({"leases": []}))


class ParseArgsTests(SynchronousTestCase):
    """Options and their defaults, as TVM's tool takes them."""

    def test_defaults(self):
        options = parse_args([], environ={})
        self.assertEqual((options.host, options.port), ("127.0.0.1", 9190))
        self.assertFalse(options.json)
        self.assertFalse(options.leases)

    def test_environment(self):
        env = {"TVM_TRACKER_HOST": "tracker.lab", "TVM_TRACKER_PORT": "9200"}
        options = parse_args([], environ=env)
        self.assertEqual((options.host, options.port), ("tracker.lab", 9200))
        options = parse_args(["--host", "h", "--port", "1"], environ=env)
        self.assertEqual((options.host, options.port), ("h", 1))

    def test_empty_host_and_zero_port_mean_default(self):
        options = parse_args(["--host", "", "--port", "0"], environ={})
        self.assertEqual((options.host, options.port), ("127.0.0.1", 9190))

    def test_bad_values(self):
        for argv, env in [
            (["--port", "70000"], {}),
            ([], {"TVM_TRACKER_PORT": "nine"}),
            (["--json", "--leases"], {}),
            (["--timeout", "0"], {}),
        ]:
            with pytest.raises(SystemExit) as raised:
                parse_args(argv, environ=env)
            self.assertEqual(raised.value.code, 2)


class ScriptedTracker(Protocol):
    """Echoes the magic and answers SUMMARY with a fixed reply."""

    def __init__(self, reply):
        self.decoder = FrameDecoder()
        self.reply = reply

    def dataReceived(self, data):
        greeted = self.decoder.greeted
        values = self.decoder.feed(data)
        if not greeted and self.decoder.greeted:
            self.transport.write(MAGIC)
        for _ in values:
            if self.reply is not None:
                self.transport.write(encode_frame(self.reply))


class QueryTests(SynchronousTestCase):
    """L{query} against in-memory peers."""

    def run_query(self, argv, peer=None, refuse=False, advance=None):
        reactor = MemoryReactorClock()
        options = parse_args(argv + ["--port", "9190", "--host", "127.0.0.1"], environ={})
        out, err = io.StringIO(), io.StringIO()
        status = defer.Deferred.fromCoroutine(query(reactor, options, out, err))
        host, port, factory, timeout, bind = reactor.tcpClients.pop(0)
        self.assertEqual((host, port), ("127.0.0.1", 9190))
        if refuse:
            factory.clientConnectionFailed(None, Failure(error.ConnectionRefusedError()))
        else:
            client = factory.buildProtocol(None)
            pump = iosim.connect(peer, iosim.makeFakeServer(peer),
                                 client, iosim.makeFakeClient(client), greet=False)
            pump.flush()
            if advance is not None:
                reactor.advance(advance)
                pump.flush()
        return self.successResultOf(status), out.getvalue(), err.getvalue()

    def test_text(self):
        peer = ScriptedTracker(Summary.encode_result(SUMMARY))
        status, out, err = self.run_query([], peer)
        self.assertEqual(status, 0)
        self.assertEqual(out, "Tracker address 127.0.0.1:9190\n\n" + SUMMARY_TEXT + "\n")
        self.assertEqual(err, "")

    def test_json(self):
        peer = ScriptedTracker(Summary.encode_result(SUMMARY))
        status, out, err = self.run_query(["--json"], peer)
        self.assertEqual(status, 0)
        self.assertEqual(json.loads(out), SUMMARY)

    def test_leases_from_a_tracker_without_them(self):
        peer = ScriptedTracker(Summary.encode_result(SUMMARY))
        status, out, err = self.run_query(["--leases"], peer)
        self.assertEqual(status, 0)
        self.assertIn("reports no leases", out)

    def test_leases(self):
        lease = {"key": "rk", "matchkey": "rk:0.5", "host": "10.0.0.2", "port": 9090,
                 "client": ["127.0.0.1", 5555], "user": "", "priority": 1, "since": 0}
        peer = ScriptedTracker(Summary.encode_result(dict(SUMMARY, leases=[lease])))
        status, out, err = self.run_query(["--leases"], peer)
        self.assertEqual(status, 0)
        self.assertIn("127.0.0.1:5555", out)
        self.assertIn("10.0.0.2:9090", out)
        self.assertNotIn("rk:0.5", out)

    def assert_one_line_error(self, status, out, err, reason):
        self.assertEqual(status, 1)
        self.assertEqual(out, "")
        self.assertEqual(err.count("\n"), 1)
        self.assertTrue(err.endswith("\n"))
        self.assertIn("127.0.0.1:9190", err)
        self.assertIn(reason, err)

    def test_refused(self):
        self.assert_one_line_error(*self.run_query([], refuse=True),
                                   reason="connection refused")

    def test_not_a_tracker(self):
        class Http(Protocol):
            def dataReceived(self, data):
                self.transport.write(b"HTTP/1.0 400 Bad Request\r\n\r\n")

        self.assert_one_line_error(*self.run_query([], Http()), reason="not an RPC tracker")

    def test_silent_peer(self):
        self.assert_one_line_error(
            *self.run_query(["--timeout", "3"], Protocol(), advance=3),
            reason="no answer within 3 s",
        )

    def test_tracker_that_never_answers_summary(self):
        self.assert_one_line_error(
            *self.run_query(["--timeout", "2"], ScriptedTracker(None), advance=2),
            reason="no answer within 2 s",
        )

    def test_bad_summary_reply(self):
        self.assert_one_line_error(*self.run_query([], ScriptedTracker([0, "nope"])),
                                   reason="bad answer")

    def test_summary_without_the_tables(self):
        self.assert_one_line_error(*self.run_query([], ScriptedTracker([0, {}])),
                                   reason="cannot be shown")


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


def recv_exactly(conn, size):
    """Read C{size} bytes from a blocking socket."""
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


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
