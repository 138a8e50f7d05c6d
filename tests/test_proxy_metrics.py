"""The proxy's counters and C{/metrics} families, over in-memory transports
and a fake clock."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import generate_latest
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol.constants import INT32, RPC_TRACKER_MAGIC
from tvm_rpc.protocol.handshake import encode_handshake
from tvm_rpc.proxy.metrics import proxy_registry
from tvm_rpc.proxy.pairing import PairingPool
from tvm_rpc.proxy.protocol import ProxyFactory

from tests.test_proxy_protocol import HalfCloseTransport

pytestmark = pytest.mark.unit


def sample(pool, name, **labels):
    """@return: the value of sample C{name} with C{labels} in C{pool}'s registry."""
    value = proxy_registry(pool).get_sample_value(name, labels)
    assert value is not None, f"no sample {name} {labels}"
    return value


class ProxyCountersTests(SynchronousTestCase):
    """What one proxy's connections count."""

    def setUp(self):
        self.clock = Clock()
        self.pool = PairingPool(self.clock, timeout_client=30, timeout_server=30)
        self.factory = ProxyFactory(self.pool, self.clock, handshake_timeout=5, chunk_size=1024)
        self.port = 40000

    def connect(self, handshake=None):
        """@return: C{(protocol, transport)} of a new connection, after C{handshake}."""
        self.port += 1
        address = IPv4Address("TCP", "127.0.0.1", self.port)
        protocol = self.factory.buildProtocol(address)
        transport = HalfCloseTransport(peerAddress=address)
        protocol.makeConnection(transport)
        if handshake is not None:
            protocol.dataReceived(encode_handshake(handshake))
        return protocol, transport

    def test_waiting_pairing_bytes_and_end(self):
        server, _ = self.connect("server:dev")
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_servers_waiting", key="dev"), 1)
        client, _ = self.connect("client:dev")
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_total", path="tcp"), 1)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_active"), 1)
        self.assertIsNone(proxy_registry(self.pool).get_sample_value(
            "tvm_rpc_proxy_servers_waiting", {"key": "dev"}))
        client.dataReceived(b"x" * 10)
        client.dataReceived(b"y" * 5)
        server.dataReceived(b"z" * 7)
        # Live pairs are read at each scrape.
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_relayed_bytes_total",
                                direction="client_to_server", relay="twisted"), 15)
        client.connectionLost(Failure(ConnectionDone()))
        server.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_active"), 0)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_ended_total", reason="closed"), 1)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_relayed_bytes_total",
                                direction="client_to_server", relay="twisted"), 15)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_relayed_bytes_total",
                                direction="server_to_client", relay="twisted"), 7)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_connections"), 0)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_connections_accepted_total"), 2)

    def test_lost_connection_ends_pair_as_lost(self):
        client, _ = self.connect("client:dev")
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_clients_waiting"), 1)
        server, _ = self.connect("server:dev")
        server.connectionLost(Failure(ConnectionLost()))
        client.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_ended_total", reason="lost"), 1)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_ended_total", reason="closed"), 0)

    def test_websocket_side_makes_a_websocket_pair(self):
        server, _ = self.connect()
        # What the websocket adapter sets on its connections.
        server.path = "websocket"
        server.dataReceived(encode_handshake("server:web"))
        self.connect("client:web")
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_total", path="websocket"), 1)
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_pairs_total", path="tcp"), 0)

    def test_refusals_by_reason(self):
        self.connect("server:dup")
        self.connect("server:dup")
        self.connect("nobody:x")
        self.connect("client:late")
        bad, _ = self.connect()
        bad.dataReceived(INT32.pack(0x12345) + b"junk")
        tracker_port, _ = self.connect()
        tracker_port.dataReceived(INT32.pack(RPC_TRACKER_MAGIC))
        self.connect()
        self.clock.advance(30)
        # Both waiting peers ran out of time: the first "dup" server and "late".
        expected = {"duplicate_key": 1, "bad_key": 1, "partner_timeout": 2,
                    "bad_handshake": 1, "tracker_magic": 1, "handshake_timeout": 1}
        for reason, count in expected.items():
            self.assertEqual(
                sample(self.pool, "tvm_rpc_proxy_handshakes_refused_total", reason=reason),
                count, reason)

    def test_tracker_mode_matchkey(self):
        self.pool.tracker_mode = True
        self.connect("server:board")
        self.connect("server:board")
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_servers_waiting", key="board"), 2)
        self.connect("client:nosuchmatchkey")
        self.assertEqual(sample(self.pool, "tvm_rpc_proxy_handshakes_refused_total",
                                reason="unknown_matchkey"), 1)


@given(reads=st.lists(st.tuples(st.booleans(), st.binary(min_size=1, max_size=64)),
                      max_size=30))
def test_relayed_bytes_sum_reads(reads):
    """Whatever the reads, each direction counts exactly the bytes passed on."""
    pool = PairingPool(Clock())
    factory = ProxyFactory(pool, Clock())
    sides = {}
    for role in ("server", "client"):
        protocol = factory.buildProtocol(None)
        protocol.makeConnection(HalfCloseTransport())
        protocol.dataReceived(encode_handshake(f"{role}:k"))
        sides[role] = protocol
    for from_client, data in reads:
        sides["client" if from_client else "server"].dataReceived(data)
    expected = {
        "client_to_server": sum(len(d) for c, d in reads if c),
        "server_to_client": sum(len(d) for c, d in reads if not c),
    }
    for direction, count in expected.items():
        assert sample(pool, "tvm_rpc_proxy_relayed_bytes_total", direction=direction,
                      relay="twisted") == count
    assert b"tvm_rpc_proxy_pairs_total" in generate_latest(proxy_registry(pool))
