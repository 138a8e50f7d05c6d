"""The server's counters and C{/metrics} families: refused handshakes, sessions
of the in-process runner and of the worker pool by how they ended, over
in-memory transports and fake clocks."""

import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.test_server_listener import RecordingRunner, Recorder, connect
from tests.test_server_worker import FakeTCPTransport, ProcessReactor
from tvm_rpc.protocol.constants import INT32, RPC_TRACKER_MAGIC
from tvm_rpc.protocol.flavour import OUR_PROTOCOL, TVM_PROTOCOL, client_key
from tvm_rpc.protocol.handshake import encode_handshake
from tvm_rpc.server import pool as pool_module
from tvm_rpc.server.activity import SESSION_END_CAUSES, ServerActivity
from tvm_rpc.server.gate import SessionGate
from tvm_rpc.server.listener import Handoff, InProcessRunner, ListenerFactory
from tvm_rpc.server.metrics import server_registry
from tvm_rpc.server.watchdog import EXIT_CLIENT_GONE, EXIT_NO_START

pytestmark = pytest.mark.unit


def sample(activity, name, registered=None, spare_ready=None, **labels):
    """@return: the value of sample C{name} with C{labels}, or L{None}."""
    return server_registry(activity, registered, spare_ready).get_sample_value(name, labels)


class RefusalTests(SynchronousTestCase):
    """Handshakes the listener refuses, by reason."""

    def test_reasons(self):
        clock = Clock()
        factory = ListenerFactory(SessionGate("dev"), RecordingRunner(), clock, 5.0)
        protocol, _ = connect(factory)
        protocol.dataReceived(INT32.pack(0x12345) + b"junk")
        protocol, _ = connect(factory)
        protocol.dataReceived(INT32.pack(RPC_TRACKER_MAGIC))
        protocol, _ = connect(factory)
        protocol.dataReceived(encode_handshake(client_key("other")))
        protocol, _ = connect(factory)
        protocol.dataReceived(encode_handshake("server:dev"))
        protocol, _ = connect(factory)
        # Unmarked: TVM's client, which this runner does not serve.
        protocol.dataReceived(encode_handshake("client:dev"))
        connect(factory)
        clock.advance(5)
        for reason in ("bad_handshake", "tracker_magic", "mismatch", "bad_key",
                       "protocol_unavailable", "handshake_timeout"):
            self.assertEqual(sample(factory.activity, "tvm_rpc_server_handshakes_refused_total",
                                    reason=reason), 1, reason)


class InProcessTests(SynchronousTestCase):
    """Sessions run in process: started, active, ended closed or timed out."""

    def test_closed_and_timed_out(self):
        clock = Clock()
        runner = InProcessRunner(Recorder, clock)
        factory = ListenerFactory(SessionGate("dev", max_sessions=2), runner, clock,
                                  activity=runner.activity)
        first, _ = connect(factory)
        first.dataReceived(encode_handshake(client_key("dev")))
        second, _ = connect(factory)
        second.dataReceived(encode_handshake(client_key("dev", 3)))
        activity = runner.activity
        self.assertEqual(sample(activity, "tvm_rpc_server_sessions_active",
                                protocol=OUR_PROTOCOL), 2)
        clock.advance(2)
        first.connectionLost(None)
        clock.advance(1)
        second.connectionLost(None)
        ended = "tvm_rpc_server_sessions_ended_total"
        self.assertEqual(sample(activity, ended, protocol=OUR_PROTOCOL, cause="closed"), 1)
        self.assertEqual(sample(activity, ended, protocol=OUR_PROTOCOL, cause="timeout"), 1)
        self.assertEqual(sample(activity, "tvm_rpc_server_sessions_active",
                                protocol=OUR_PROTOCOL), 0)
        durations = "tvm_rpc_server_session_duration_seconds"
        self.assertEqual(sample(activity, durations + "_count", protocol=OUR_PROTOCOL), 2)
        self.assertEqual(sample(activity, durations + "_sum", protocol=OUR_PROTOCOL), 5)
        self.assertEqual(sample(activity, durations + "_bucket", protocol=OUR_PROTOCOL,
                                le="1.0"), 0)
        self.assertEqual(sample(activity, durations + "_bucket", protocol=OUR_PROTOCOL,
                                le="5.0"), 2)
        # No tracker, no worker: those gauges are left out.
        self.assertIsNone(sample(activity, "tvm_rpc_server_tracker_registered"))
        self.assertIsNone(sample(activity, "tvm_rpc_server_spare_worker_ready"))


class WorkerPoolTests(SynchronousTestCase):
    """Sessions in workers: each end counted by cause, with its worker's exit."""

    def setUp(self):
        self.reactor = ProcessReactor()
        self.patch(pool_module.os, "killpg", lambda pid, sig: None)
        self.pool = pool_module.WorkerPool(self.reactor, "/work-root")
        self.pool.warm_up()
        self.gate = SessionGate("k", max_sessions=8)
        self.sockets = []
        self.sessions = 0

    def tearDown(self):
        for _, _, kept in self.reactor.spawned:
            for sock in kept.values():
                sock.close()
        for sock in self.sockets:
            sock.close()

    def run_session(self, code, signal_number=None, protocol=OUR_PROTOCOL, timeout=None):
        """Start one session, then end its worker with C{code}/C{signal_number}."""
        server_end, client_end = socket.socketpair()
        self.sockets.append(client_end)
        slot = self.successResultOf(self.gate.claim("k"))
        self.pool.start(Handoff(FakeTCPTransport(server_end), None, b"", b"", timeout, "peer",
                                slot, protocol))
        self.sessions += 1
        pid = 1000 + self.sessions
        server = self.reactor.spawned[-1][0].server
        self.pool._report(server, {"started": pid, "id": self.sessions})
        if timeout:
            self.reactor.advance(timeout)
        self.pool._report(server, {"ended": pid, "code": code, "signal": signal_number})

    def test_causes(self):
        self.assertEqual(sample(self.pool.activity, "tvm_rpc_server_spare_worker_ready",
                                spare_ready=self.pool.spare_ready), 0)
        self.pool._report(self.reactor.spawned[-1][0].server, {"ready": 1})
        self.assertEqual(sample(self.pool.activity, "tvm_rpc_server_spare_worker_ready",
                                spare_ready=self.pool.spare_ready), 1)
        self.run_session(0)
        self.run_session(EXIT_CLIENT_GONE, protocol=TVM_PROTOCOL)
        self.run_session(EXIT_NO_START)
        self.run_session(None, 11)
        self.run_session(7)
        self.run_session(None, 9, timeout=2)
        activity = self.pool.activity
        ended = "tvm_rpc_server_sessions_ended_total"
        expected = {(OUR_PROTOCOL, "closed"): 1, (TVM_PROTOCOL, "client_gone"): 1,
                    (OUR_PROTOCOL, "no_start"): 1, (OUR_PROTOCOL, "worker_crashed"): 2,
                    (OUR_PROTOCOL, "timeout"): 1}
        for (protocol, cause), count in expected.items():
            self.assertEqual(sample(activity, ended, protocol=protocol, cause=cause), count,
                             (protocol, cause))
        exits = {"clean": 1, "client_gone": 1, "no_start": 1, "signal": 1, "error": 1,
                 "killed": 1, "server_gone": 0}
        for cause, count in exits.items():
            self.assertEqual(sample(activity, "tvm_rpc_server_worker_exits_total", cause=cause),
                             count, cause)
        self.assertEqual(sample(activity, "tvm_rpc_server_sessions_active",
                                protocol=OUR_PROTOCOL), 0)


@given(events=st.lists(st.tuples(st.sampled_from([OUR_PROTOCOL, TVM_PROTOCOL]),
                                 st.sampled_from(SESSION_END_CAUSES + (None,)),
                                 st.floats(min_value=0, max_value=1e5)), max_size=40))
def test_active_is_started_minus_ended(events):
    """Each session ended (cause given) or still running (None) is counted once."""
    activity = ServerActivity()
    for protocol, cause, seconds in events:
        activity.session_started(protocol)
        if cause is not None:
            activity.session_ended(protocol, cause, seconds, (3, 5))
    for protocol in (OUR_PROTOCOL, TVM_PROTOCOL):
        mine = [cause for p, cause, _ in events if p == protocol]
        done = [cause for cause in mine if cause is not None]
        assert sample(activity, "tvm_rpc_server_sessions_active", protocol=protocol) == \
            len(mine) - len(done)
        assert sample(activity, "tvm_rpc_server_received_bytes_total", protocol=protocol) == \
            3 * len(done)
        count = sample(activity, "tvm_rpc_server_session_duration_seconds_count",
                       protocol=protocol)
        assert (count or 0) == len(done)
