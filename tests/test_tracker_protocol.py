"""The tracker's Twisted adapter over in-memory transports and a fake clock:
every TVM code with TVM's exact replies, and every bad input closing only the
connection that sent it."""

import struct

from hypothesis import given, strategies as st
import pytest

from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.protocol import Protocol
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol.constants import RPC_TRACKER_MAGIC, TrackerCode
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame, encode_magic
from tvm_rpc.tracker.limits import TrackerLimits
from tvm_rpc.tracker.protocol import TrackerFactory
from tvm_rpc.tracker.state import TrackerState
from tvm_rpc.transport import KeepAlive, peer_host_port, tune_tcp

PUT, REQUEST, PING, STOP, UPDATE_INFO, SUMMARY, PENDING = (
    TrackerCode.PUT, TrackerCode.REQUEST, TrackerCode.PING, TrackerCode.STOP,
    TrackerCode.UPDATE_INFO, TrackerCode.SUMMARY, TrackerCode.GET_PENDING_MATCHKEYS,
)


pytestmark = pytest.mark.unit


class CountingTransport(StringTransport):
    """A StringTransport that remembers each write separately."""

    def __init__(self, *args, **kwargs):
        """Start with no writes."""
        super().__init__(*args, **kwargs)
        self.writes = []

    def write(self, data):
        """Record C{data} as one write, then buffer it."""
        self.writes.append(bytes(data))
        super().write(data)


class Peer:
    """One in-memory connection to the tracker under test."""

    def __init__(self, factory, host, port):
        """Connect a new protocol from C{factory} to a transport from C{host}:C{port}."""
        address = IPv4Address("TCP", host, port)
        self.protocol = factory.buildProtocol(address)
        self.transport = CountingTransport(peerAddress=address)
        self.protocol.makeConnection(self.transport)
        self._decoder = FrameDecoder(expect_magic=False)

    def greet(self):
        """Send the magic, check its echo. @return: C{self}."""
        self.protocol.dataReceived(encode_magic())
        assert self.transport.value() == encode_magic()
        self.transport.clear()
        self.transport.writes.clear()
        return self

    def send(self, *values):
        """Send C{values} as frames in one chunk."""
        self.protocol.dataReceived(b"".join(encode_frame(v) for v in values))

    def replies(self):
        """@return: the replies written since the last call."""
        values = self._decoder.feed(self.transport.value())
        self.transport.clear()
        assert self._decoder.error is None
        return values

    def ask(self, value):
        """Send one request. @return: its single reply."""
        self.send(value)
        (reply,) = self.replies()
        return reply

    @property
    def closed(self):
        """Whether the tracker closed this connection."""
        return self.transport.disconnecting

    def lose(self):
        """The connection is lost."""
        self.protocol.connectionLost(Failure(ConnectionDone()))


class TrackerTestCase(SynchronousTestCase):
    """Shared set-up: a tracker with a fake clock and a recorded stop."""

    def setUp(self):
        """A tracker state on a fake clock, a factory with stop key C{the-stop-key}."""
        self.clock = Clock()
        self.clock.advance(1000)
        self.state = TrackerState(self.clock)
        self.stops = []
        self.factory = TrackerFactory(
            self.state, "the-stop-key", lambda: self.stops.append(True), KeepAlive()
        )
        self._ports = iter(range(40000, 50000))

    def use_limits(self, **limits):
        """Start again with a fresh tracker whose L{TrackerLimits} are C{limits}."""
        self.state = TrackerState(self.clock, TrackerLimits(**limits))
        self.factory = TrackerFactory(
            self.state, "the-stop-key", lambda: self.stops.append(True), KeepAlive()
        )

    def peer(self, host="10.0.0.1"):
        """@return: a new greeted L{Peer} from C{host}."""
        return Peer(self.factory, host, next(self._ports)).greet()


class HandshakeTests(TrackerTestCase):
    """The magic: echoed once, in any chunking, with or without a first frame."""

    def test_magic_echoed(self):
        """The magic is echoed."""
        self.peer()

    def test_magic_in_pieces(self):
        """A magic sent byte by byte is echoed once complete."""
        peer = Peer(self.factory, "10.0.0.1", 1)
        magic = encode_magic()
        for byte in magic:
            self.assertEqual(peer.transport.value(), b"")
            peer.protocol.dataReceived(bytes([byte]))
        self.assertEqual(peer.transport.value(), magic)
        self.assertFalse(peer.closed)

    def test_magic_with_first_frame(self):
        """Magic and frames in one write: echo first, then the replies."""
        peer = Peer(self.factory, "10.0.0.1", 1)
        peer.protocol.dataReceived(encode_magic() + encode_frame([PING]) + encode_frame([PING]))
        self.assertEqual(peer.transport.value(), encode_magic() + encode_frame(0) * 2)

    def test_silent_peer_closed_after_greeting_timeout(self):
        """A connection that never sends the magic is closed after a minute."""
        peer = Peer(self.factory, "10.0.0.1", 1)
        self.clock.advance(59)
        self.assertFalse(peer.closed)
        with capturedLogs() as events:
            self.clock.advance(2)
        self.assertTrue(peer.closed)
        self.assertIn("no tracker magic", " ".join(formatEvent(e) for e in events))
        peer.lose()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_greeted_peer_has_no_greeting_timer(self):
        """Once greeted, a connection may idle (keepalive watches it)."""
        peer = self.peer()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(3600)
        self.assertFalse(peer.closed)

    def test_wrong_magic_closes(self):
        """A wrong magic closes the connection without an echo and is logged."""
        peer = Peer(self.factory, "10.0.0.1", 1)
        with capturedLogs() as events:
            peer.protocol.dataReceived(struct.pack("<i", RPC_TRACKER_MAGIC + 1))
        self.assertTrue(peer.closed)
        self.assertEqual(peer.transport.value(), b"")
        self.assertIn("wrong magic", " ".join(formatEvent(e) for e in events))


class CodeTests(TrackerTestCase):
    """Every tracker code, answered exactly as TVM's tracker answers."""

    def test_ping(self):
        """PING -> 0."""
        self.assertEqual(self.peer().ask([PING]), 0)

    def test_each_reply_is_one_write(self):
        """Each reply, length and body, leaves in a single write."""
        peer = self.peer()
        peer.send([PING], [SUMMARY], [PUT, "k", [9000, "k:1"], None], [PENDING])
        self.assertEqual(
            [FrameDecoder(expect_magic=False).feed(w) for w in peer.transport.writes],
            [
                [0],
                [[0, {"queue_info": {}, "server_info": [], "leases": []}]],
                [0],
                [["k:1"]],
            ],
        )

    def test_put_then_request(self):
        """A REQUEST gets a free server's peer address, port and matchkey."""
        server, client = self.peer("10.0.0.2"), self.peer("10.0.0.3")
        self.assertEqual(server.ask([PUT, "gpu", [9090, "gpu:0.5"], None]), 0)
        self.assertEqual(client.ask([REQUEST, "gpu", "alice", 1]), [0, ["10.0.0.2", 9090, "gpu:0.5"]])

    def test_put_three_elements_and_string_port(self):
        """PUT as cpp_rpc sends it: no custom address, the port a string."""
        server, client = self.peer("10.0.0.2"), self.peer()
        self.assertEqual(server.ask([PUT, "phone", ["9091", "phone:1"]]), 0)
        self.assertEqual(client.ask([REQUEST, "phone", "", 0]), [0, ["10.0.0.2", 9091, "phone:1"]])

    def test_put_custom_address(self):
        """A custom address replaces the peer's in the answer."""
        server, client = self.peer("10.0.0.2"), self.peer()
        server.ask([PUT, "k", [9000, "k:1"], "board.lan"])
        self.assertEqual(client.ask([REQUEST, "k", "", 0]), [0, ["board.lan", 9000, "k:1"]])

    def test_key_with_colons(self):
        """Keys containing ':' are kept whole."""
        server, client = self.peer("10.0.0.2"), self.peer()
        server.ask([PUT, "rk3399:npu", [9000, "rk3399:npu:0.25"], None])
        self.assertEqual(
            client.ask([REQUEST, "rk3399:npu", "", 0]), [0, ["10.0.0.2", 9000, "rk3399:npu:0.25"]]
        )

    def test_request_waits_for_put(self):
        """A REQUEST before any server waits and is answered by the PUT."""
        server, client = self.peer("10.0.0.2"), self.peer()
        client.send([REQUEST, "k", "", 1])
        self.assertEqual(client.replies(), [])
        self.assertEqual(self.state.summary()["queue_info"], {"k": {"free": 0, "pending": 1}})
        server.ask([PUT, "k", [1, "k:1"], None])
        self.assertEqual(client.replies(), [[0, ["10.0.0.2", 1, "k:1"]]])

    def test_priority_then_fifo(self):
        """Higher priority first, arrival order among equals."""
        server = self.peer("10.0.0.2")
        low, first, second = self.peer(), self.peer(), self.peer()
        low.send([REQUEST, "k", "", 1])
        first.send([REQUEST, "k", "", 5])
        second.send([REQUEST, "k", "", 5])
        for i in range(3):
            server.ask([PUT, "k", [1, f"k:{i}"], None])
        self.assertEqual(first.replies(), [[0, ["10.0.0.2", 1, "k:0"]]])
        self.assertEqual(second.replies(), [[0, ["10.0.0.2", 1, "k:1"]]])
        self.assertEqual(low.replies(), [[0, ["10.0.0.2", 1, "k:2"]]])

    def test_oldest_free_server_first(self):
        """Free servers are handed out oldest first."""
        a, b, client = self.peer("10.0.0.2"), self.peer("10.0.0.3"), self.peer()
        a.ask([PUT, "k", [1, "k:a"], None])
        b.ask([PUT, "k", [1, "k:b"], None])
        self.assertEqual(client.ask([REQUEST, "k", "", 0])[1][2], "k:a")
        self.assertEqual(client.ask([REQUEST, "k", "", 0])[1][2], "k:b")

    def test_update_info_null_host(self):
        """A null host in UPDATE_INFO's addr becomes the peer's address."""
        server, query = self.peer("10.0.0.2"), self.peer()
        self.assertEqual(server.ask([UPDATE_INFO, {"key": "server:k", "addr": [None, 9000]}]), 0)
        summary = query.ask([SUMMARY])
        self.assertEqual(summary[0], 0)
        self.assertEqual(summary[1]["server_info"], [{"key": "server:k", "addr": ["10.0.0.2", 9000]}])

    def test_update_info_merges_and_keeps_given_host(self):
        """UPDATE_INFO merges into the info; a given host stays."""
        server, query = self.peer("10.0.0.2"), self.peer()
        server.ask([UPDATE_INFO, {"key": "server:k", "addr": ["board", 9000]}])
        server.ask([UPDATE_INFO, {"extra": 1, "addr": ["board", 9000]}])
        self.assertEqual(
            query.ask([SUMMARY])[1]["server_info"],
            [{"key": "server:k", "addr": ["board", 9000], "extra": 1}],
        )

    def test_commands_without_arguments_ignore_extra_elements(self):
        """
        PING, SUMMARY and GET_PENDING_MATCHKEYS with extra elements are
        answered as without them, as TVM's tracker does (which ignores them),
        up to the 1 MiB frame cap.
        """
        peer = self.peer()
        self.assertEqual(peer.ask([PING, "x"]), 0)
        self.assertEqual(peer.ask([PING, 1, [2], {"3": None}]), 0)
        self.assertEqual(peer.ask([SUMMARY, "x"])[0], 0)
        self.assertEqual(peer.ask([PENDING, None]), [])
        overhead = len(encode_frame([PING, ""])) - 4
        self.assertEqual(peer.ask([PING, "x" * ((1 << 20) - overhead)]), 0)
        self.assertFalse(peer.closed)

    def test_summary_lists_only_server_infos(self):
        """server_info lists infos whose key starts with 'server' (proxies too)."""
        server, client, query = self.peer("10.0.0.2"), self.peer(), self.peer()
        client.ask([UPDATE_INFO, {"key": "client:x", "addr": [None, 1]}])
        server.ask([UPDATE_INFO, {"key": "server:proxy[a,b]", "addr": [None, 9000]}])
        self.assertEqual(
            [i["key"] for i in query.ask([SUMMARY])[1]["server_info"]], ["server:proxy[a,b]"]
        )

    def test_summary_idle(self):
        """SUMMARY of an idle tracker."""
        self.assertEqual(
            self.peer().ask([SUMMARY]),
            [0, {"queue_info": {}, "server_info": [], "leases": []}],
        )

    def test_summary_keeps_seen_keys(self):
        """A key stays in queue_info at zero counts, as in TVM."""
        server, client, query = self.peer("10.0.0.2"), self.peer(), self.peer()
        server.ask([PUT, "k", [1, "k:1"], None])
        client.ask([REQUEST, "k", "", 0])
        self.assertEqual(query.ask([SUMMARY])[1]["queue_info"], {"k": {"free": 0, "pending": 0}})

    def test_pending_matchkeys(self):
        """GET_PENDING_MATCHKEYS lists this connection's matchkeys not handed out."""
        server, client = self.peer("10.0.0.2"), self.peer()
        server.ask([PUT, "k", [1, "k:1"], None])
        server.ask([PUT, "k", [1, "k:2"], None])
        self.assertEqual(server.ask([PENDING]), ["k:1", "k:2"])
        self.assertEqual(client.ask([PENDING]), [])
        client.ask([REQUEST, "k", "", 0])
        self.assertEqual(server.ask([PENDING]), ["k:2"])

    def test_stop_wrong_key(self):
        """STOP with a wrong key -> -1, logged, nothing stops."""
        peer = self.peer()
        with capturedLogs() as events:
            self.assertEqual(peer.ask([STOP, "nope"]), -1)
        self.assertFalse(peer.closed)
        self.assertEqual(self.stops, [])
        self.assertIn("wrong stop key", " ".join(formatEvent(e) for e in events))

    def test_stop_right_key(self):
        """STOP with the key -> 0, the connection closes, then the tracker stops."""
        peer = self.peer()
        self.assertEqual(peer.ask([STOP, "the-stop-key"]), 0)
        self.assertTrue(peer.closed)
        self.assertEqual(self.stops, [])
        peer.lose()
        self.assertEqual(self.stops, [True])

    def test_request_deadline(self):
        """A REQUEST with a timeout is answered [-1, reason] when it expires."""
        client = self.peer()
        client.send([REQUEST, "k", "", 1, {"timeout": 2.5}])
        self.clock.advance(2.4)
        self.assertEqual(client.replies(), [])
        self.clock.advance(0.2)
        (reply,) = client.replies()
        self.assertEqual(reply[0], -1)
        self.assertIsInstance(reply[1], str)
        self.assertEqual(self.state.summary()["queue_info"], {"k": {"free": 0, "pending": 0}})

    def test_deadline_cancelled_by_match(self):
        """A matched request's deadline timer is cancelled."""
        server, client = self.peer("10.0.0.2"), self.peer()
        client.send([REQUEST, "k", "", 1, {"timeout": 2}])
        server.ask([PUT, "k", [1, "k:1"], None])
        self.assertEqual(client.replies(), [[0, ["10.0.0.2", 1, "k:1"]]])
        self.clock.advance(10)
        self.assertEqual(client.replies(), [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FaultTests(TrackerTestCase):
    """Disconnects, and leases."""

    def test_waiting_client_disconnect_is_withdrawn(self):
        """A waiting client that leaves is never counted nor served."""
        server, gone, stays = self.peer("10.0.0.2"), self.peer(), self.peer()
        gone.send([REQUEST, "k", "", 9])
        stays.send([REQUEST, "k", "", 1])
        gone.lose()
        self.assertEqual(self.state.summary()["queue_info"]["k"]["pending"], 1)
        server.ask([PUT, "k", [1, "k:1"], None])
        self.assertEqual(stays.replies(), [[0, ["10.0.0.2", 1, "k:1"]]])
        self.assertEqual(gone.replies(), [])

    def test_server_disconnect_without_update_info(self):
        """A closing connection takes its free servers along, UPDATE_INFO or not."""
        server, client = self.peer("10.0.0.2"), self.peer()
        server.ask([PUT, "k", [1, "k:1"], None])
        server.ask([PUT, "j", [1, "j:1"], None])
        server.lose()
        self.assertEqual(
            self.state.summary()["queue_info"],
            {"k": {"free": 0, "pending": 0}, "j": {"free": 0, "pending": 0}},
        )
        client.send([REQUEST, "k", "", 0])
        self.assertEqual(client.replies(), [])

    def test_server_disconnect_with_update_info(self):
        """A closing server leaves server_info and the queues."""
        server, query = self.peer("10.0.0.2"), self.peer()
        server.ask([UPDATE_INFO, {"key": "server:k", "addr": [None, 1]}])
        server.ask([PUT, "k", [1, "k:1"], None])
        server.lose()
        self.assertEqual(
            query.ask([SUMMARY])[1],
            {"queue_info": {"k": {"free": 0, "pending": 0}}, "server_info": [], "leases": []},
        )

    def test_lease_recorded_until_fresh_put(self):
        """A lease records who holds which server until the server PUTs again."""
        server, client, query = self.peer("10.0.0.2"), self.peer("10.0.0.3"), self.peer()
        server.ask([PUT, "k", [9000, "k:1"], None])
        self.clock.advance(5)
        client.ask([REQUEST, "k", "bob", 3])
        (lease,) = query.ask([SUMMARY])[1]["leases"]
        self.assertEqual(
            lease,
            {
                "key": "k", "host": "10.0.0.2", "port": 9000,
                "client": ["10.0.0.3", client.transport.getPeer().port],
                "user": "bob", "priority": 3, "since": 1005.0,
            },
        )
        server.ask([PUT, "k", [9000, "k:2"], None])
        self.assertEqual(query.ask([SUMMARY])[1]["leases"], [])

    def test_lease_ends_when_server_closes(self):
        """A lease outlives its client's connection but not its server's."""
        server, client, query = self.peer("10.0.0.2"), self.peer(), self.peer()
        server.ask([PUT, "k", [9000, "k:1"], None])
        client.ask([REQUEST, "k", "", 0])
        client.lose()
        self.assertEqual(len(query.ask([SUMMARY])[1]["leases"]), 1)
        server.lose()
        self.assertEqual(query.ask([SUMMARY])[1]["leases"], [])

    def test_re_put_same_matchkey_replaces(self):
        """PUTting a still-free matchkey again replaces it."""
        server = self.peer("10.0.0.2")
        server.ask([PUT, "k", [1, "k:1"], None])
        server.ask([PUT, "k", [2, "k:1"], None])
        self.assertEqual(server.ask([PENDING]), ["k:1"])
        self.assertEqual(self.state.summary()["queue_info"]["k"]["free"], 1)
        self.assertEqual(self.peer().ask([REQUEST, "k", "", 0]), [0, ["10.0.0.2", 2, "k:1"]])


BAD_INPUTS = {
    "frame over 1 MiB": struct.pack("<i", (1 << 20) + 1),
    "negative length": struct.pack("<i", -5),
    "zero length": struct.pack("<i", 0),
    "bad JSON": struct.pack("<i", 5) + b"[1, ]",
    "non-UTF-8": struct.pack("<i", 3) + b"\xff\xfe\xfd",
    "unknown code": encode_frame([99]),
    "not an array": encode_frame({"code": 1}),
    "empty array": encode_frame([]),
    "code is a string": encode_frame(["1"]),
    "PUT too short": encode_frame([PUT, "k"]),
    "PUT bad address": encode_frame([PUT, "k", [1], None]),
    "PUT bad port": encode_frame([PUT, "k", [70000, "k:1"], None]),
    "REQUEST key not a string": encode_frame([REQUEST, 5, "", 1]),
    "REQUEST bad priority": encode_frame([REQUEST, "k", "", "high"]),
    "REQUEST bad options": encode_frame([REQUEST, "k", "", 1, {"timeout": -1}]),
    "REQUEST infinite priority": encode_frame([REQUEST, "k", "", float("inf")]),
    "REQUEST huge priority": encode_frame([REQUEST, "k", "", 10**400]),
    "REQUEST infinite timeout": encode_frame([REQUEST, "k", "", 1, {"timeout": float("inf")}]),
    "UPDATE_INFO not an object": encode_frame([UPDATE_INFO, [1, 2]]),
    "STOP without key": encode_frame([STOP]),
    "UPDATE_INFO without addr": encode_frame([UPDATE_INFO, {"key": "server:k"}]),
}


class BadInputTests(TrackerTestCase):
    """Each bad input closes its own connection, logs the peer and the reason,
    and leaves every other connection served."""

    def check(self, name, data):
        """C{data} closes its connection with a log line; a bystander is still served."""
        bystander = self.peer("10.9.9.9")
        bystander.send([REQUEST, "k", "", 1])
        bad = self.peer("10.6.6.6")
        bad.ask([PUT, "k2", [1, "k2:1"], None])
        with capturedLogs() as events:
            bad.protocol.dataReceived(data)
        self.assertTrue(bad.closed, name)
        self.assertEqual(bad.transport.value(), b"", name)
        text = " ".join(formatEvent(e) for e in events)
        self.assertIn("10.6.6.6", text, name)
        self.assertIn("closing", text, name)
        bad.protocol.dataReceived(encode_frame([PING]))
        self.assertEqual(bad.transport.value(), b"", name)
        bad.lose()
        self.assertFalse(bystander.closed, name)
        self.assertEqual(bystander.ask([PING]), 0, name)
        self.assertEqual(self.state.summary()["queue_info"]["k2"], {"free": 0, "pending": 0})
        self.peer().ask([PUT, "k", [1, "k:1"], None])
        self.assertEqual(bystander.replies()[0][0], 0)

    def test_bad_inputs(self):
        """Every entry of L{BAD_INPUTS}."""
        for name, data in BAD_INPUTS.items():
            self.check(name, data)

    def test_too_many_requests_on_one_connection(self):
        """More waiting requests than allowed close the connection."""
        self.use_limits(max_pending=3)
        greedy = self.peer("10.6.6.6")
        greedy.send(*[[REQUEST, "k", "", 1]] * 3)
        self.assertFalse(greedy.closed)
        with capturedLogs() as events:
            greedy.send([REQUEST, "k", "", 1])
        self.assertTrue(greedy.closed)
        self.assertIn("more than 3 waiting requests", " ".join(formatEvent(e) for e in events))
        greedy.lose()
        self.assertEqual(self.state.summary()["queue_info"]["k"]["pending"], 0)

    def test_too_many_free_servers_on_one_connection(self):
        """More free servers than allowed close the connection; a re-PUT is not more."""
        self.use_limits(max_free=2)
        server = self.peer("10.6.6.6")
        server.ask([PUT, "k", [1, "k:1"], None])
        server.ask([PUT, "k", [1, "k:2"], None])
        server.ask([PUT, "k", [1, "k:2"], None])
        self.assertFalse(server.closed)
        server.send([PUT, "k", [1, "k:3"], None])
        self.assertTrue(server.closed)

    def test_closing_connection_is_forgotten_at_once(self):
        """A connection being closed is never handed a server while it flushes."""
        bad, server = self.peer("10.6.6.6"), self.peer("10.0.0.2")
        bad.send([REQUEST, "k", "", 1])
        bad.ask([PUT, "j", [1, "j:1"], None])
        bad.protocol.dataReceived(encode_frame([42]))
        self.assertTrue(bad.closed)
        self.assertEqual(
            self.state.summary()["queue_info"],
            {"k": {"free": 0, "pending": 0}, "j": {"free": 0, "pending": 0}},
        )
        server.ask([PUT, "k", [1, "k:1"], None])
        self.assertEqual(bad.transport.value(), b"")
        self.assertEqual(server.ask([PENDING]), ["k:1"])

    def test_good_frame_before_bad_one_is_answered(self):
        """Frames before a bad one in the same chunk are answered."""
        peer = self.peer()
        peer.protocol.dataReceived(encode_frame([PING]) + struct.pack("<i", -1))
        self.assertEqual(peer.replies(), [0])
        self.assertTrue(peer.closed)

    def test_huge_length_refused_before_body(self):
        """A 2 GiB length header closes at once."""
        peer = self.peer()
        peer.protocol.dataReceived(struct.pack("<i", 0x7FFFFFFF))
        self.assertTrue(peer.closed)


class SocketTransport(StringTransport):
    """A StringTransport over a real (unconnected) TCP socket handle."""

    def __init__(self, sock, **kwargs):
        """@param sock: the socket L{getHandle} returns."""
        super().__init__(**kwargs)
        self.sock = sock

    def getHandle(self):
        """@return: the socket."""
        return self.sock


class TuningTests(TrackerTestCase):
    """Every accepted connection gets TCP_NODELAY and keepalive timers."""

    def test_connection_made_tunes_socket(self):
        """connectionMade sets TCP_NODELAY and the keepalive timers."""
        import socket

        self.factory.keepalive = KeepAlive(11, 4, 5)
        with socket.socket() as sock:
            address = IPv4Address("TCP", "10.0.0.1", 1)
            protocol = self.factory.buildProtocol(address)
            protocol.makeConnection(SocketTransport(sock, peerAddress=address))
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                self.assertEqual(
                    [sock.getsockopt(socket.IPPROTO_TCP, o) for o in
                     (socket.TCP_KEEPIDLE, socket.TCP_KEEPINTVL, socket.TCP_KEEPCNT)],
                    [11, 4, 5],
                )


class AddressTests(SynchronousTestCase):
    """Peer descriptions and socket tuning on non-TCP transports."""

    def test_ipv4_mapped_peer(self):
        """IPv4-mapped IPv6 peers are described as IPv4."""
        from twisted.internet.address import IPv6Address

        self.assertEqual(
            peer_host_port(IPv6Address("TCP", "::ffff:10.1.2.3", 5)), ("10.1.2.3", 5)
        )
        self.assertEqual(peer_host_port(IPv6Address("TCP", "fe80::1", 5)), ("fe80::1", 5))

    def test_unix_peer(self):
        """A UNIX peer is described by its path, without a port."""
        self.assertEqual(peer_host_port(UNIXAddress(b"/tmp/x.sock")), ("/tmp/x.sock", None))

    def test_tune_string_transport(self):
        """Transports without a TCP socket are left alone."""
        self.assertFalse(tune_tcp(StringTransport(), KeepAlive()))

    def test_tune_real_socket(self):
        """tune_tcp sets the options on a real socket."""
        import socket

        class Handle:
            """A transport stand-in that only has getHandle."""
            def __init__(self, sock):
                """@param sock: the socket to hand out."""
                self.sock = sock

            def getHandle(self):
                """@return: the socket."""
                return self.sock

        with socket.socket() as sock:
            self.assertTrue(tune_tcp(Handle(sock), KeepAlive(7, 3, 2)))
            self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
            self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE), 1)
            if hasattr(socket, "TCP_KEEPIDLE"):
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), 7)
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL), 3)
                self.assertEqual(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT), 2)


class RawClient(Protocol):
    """A tracker client for iosim: sends what it is told, decodes the replies."""

    def __init__(self):
        """Start with no replies and the connection open."""
        self.decoder = FrameDecoder(expect_magic=True)
        self.replies = []
        self.lost = False

    def dataReceived(self, data):
        """Collect the replies (the echoed magic is checked by the decoder)."""
        self.replies.extend(self.decoder.feed(data))

    def connectionLost(self, reason):
        """Remember the tracker closed the connection."""
        self.lost = True


class InMemoryConnectionTests(TrackerTestCase):
    """Whole connections over iosim, where closing really reaches connectionLost."""

    def connect(self):
        """@return: C{(client, pump)} of a new connection to the tracker."""
        address = IPv4Address("TCP", "10.0.0.9", 4000)
        client, server, pump = connectedServerAndClient(
            lambda: self.factory.buildProtocol(address), RawClient, greet=False
        )
        client.transport.write(encode_magic())
        pump.flush()
        self.assertTrue(client.decoder.greeted)
        return client, pump

    def test_put_request_and_close(self):
        """A server and a client meet; the server's close empties the queue."""
        server, server_pump = self.connect()
        client, client_pump = self.connect()
        server.transport.write(encode_frame([PUT, "k", [9000, "k:1"], None])
                               + encode_frame([PUT, "k", [9000, "k:2"], None]))
        server_pump.flush()
        client.transport.write(encode_frame([REQUEST, "k", "", 1]))
        client_pump.flush()
        self.assertEqual(server.replies, [0, 0])
        self.assertEqual(client.replies[0][0], 0)
        server.transport.loseConnection()
        server_pump.flush()
        self.assertEqual(self.state.summary()["queue_info"]["k"], {"free": 0, "pending": 0})

    def test_bad_frame_really_closes(self):
        """A bad frame ends in connectionLost on both sides and a clean state."""
        client, pump = self.connect()
        client.transport.write(encode_frame([REQUEST, "k", "", 1]) + struct.pack("<i", -1))
        pump.flush()
        self.assertTrue(client.lost)
        self.assertEqual(self.state.summary()["queue_info"]["k"]["pending"], 0)

    def test_stop_flushes_reply_then_stops(self):
        """STOP's reply reaches the client before the tracker stops."""
        client, pump = self.connect()
        client.transport.write(encode_frame([STOP, "the-stop-key"]))
        pump.flush()
        self.assertEqual(client.replies, [0])
        self.assertTrue(client.lost)
        self.assertEqual(self.stops, [True])


@given(
    st.lists(
        st.sampled_from([
            [PING], [SUMMARY], [PENDING], [PUT, "k", [1, "k:1"], None],
            [PUT, "k:x", ["2", "k:x:2"]], [UPDATE_INFO, {"key": "server:k", "addr": [None, 1]}],
            [REQUEST, "k", "", 1], [STOP, "wrong"],
        ]),
        max_size=12,
    ),
    st.lists(st.integers(0, 400), max_size=10),
)
def test_any_chunking_gives_the_same_replies(messages, cuts):
    """However the peer's bytes are split, the tracker's replies are the same."""
    stream = encode_magic() + b"".join(encode_frame(m) for m in messages)

    def run(pieces):
        """@return: what one fresh tracker writes back for C{pieces}."""
        clock = Clock()
        factory = TrackerFactory(TrackerState(clock), "key", lambda: None, KeepAlive())
        peer = Peer(factory, "10.0.0.1", 1)
        for piece in pieces:
            peer.protocol.dataReceived(piece)
        assert not peer.closed
        return peer.transport.value()

    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    pieces = [stream[a:b] for a, b in zip(points, points[1:])]
    assert run(pieces) == run([stream])


class QuickAckTests(TrackerTestCase):
    """TVM's client sends a frame's length and body apart: the tracker ACKs the length at once."""

    def setUp(self):
        super().setUp()
        import tvm_rpc.tracker.protocol as tracker_protocol

        self.acked = []
        self.patch(tracker_protocol, "quick_ack", self.acked.append)

    def test_partial_frame_acknowledged_at_once(self):
        """A length without its body is acknowledged at once; a whole frame needs nothing."""
        peer = self.peer()
        frame = encode_frame([TrackerCode.PING])
        peer.protocol.dataReceived(frame[:4])
        self.assertEqual(self.acked, [peer.transport])
        self.assertEqual(peer.replies(), [])
        peer.protocol.dataReceived(frame[4:])
        self.assertEqual(peer.replies(), [TrackerCode.SUCCESS])
        self.assertEqual(self.acked, [peer.transport])
        peer.send([TrackerCode.PING])
        self.assertEqual(self.acked, [peer.transport])



class ResponderTableTests(SynchronousTestCase):
    """The tracker answers every command of the vocabulary."""

    def test_every_command_has_a_responder(self):
        from tvm_rpc.protocol.tracker_commands import TRACKER_COMMANDS
        from tvm_rpc.tracker.protocol import RESPONDERS

        self.assertEqual(set(RESPONDERS), set(TRACKER_COMMANDS.values()))
