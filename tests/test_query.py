"""The query tool: options, rendering and the in-memory query (the real command
line: ``tests/test_query_tool.py``)."""

import io
import json

import pytest
from twisted.internet import defer, error
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from query_samples import SUMMARY, SUMMARY_TEXT
from tvm_rpc.client.summary_text import text_summary
from tvm_rpc.protocol.tracker_commands import Summary
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame, encode_magic
from tvm_rpc.query import leases_table, parse_args, query

pytestmark = pytest.mark.unit

MAGIC = encode_magic()


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

    def test_peer_that_closes(self):
        """An RPC server or proxy closes a tracker client: the line hints at the port."""
        class Closes(Protocol):
            def dataReceived(self, data):
                self.transport.loseConnection()

        self.assert_one_line_error(
            *self.run_query([], Closes()),
            reason="closed before the tracker answered (is it a tracker's port?",
        )

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
