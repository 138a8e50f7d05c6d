"""C{twistd -n rpc-server --http} as a real process on loopback: sessions of
our client and of Apache TVM's client, a timed-out one and a refused
handshake show in C{/metrics}; with C{--tracker}, the registration state."""

import socket

import pytest

from tests.daemons import announced_port, our_rpc_server, our_tracker, wait_until
from tests.test_interop_server import run_client
from tests.test_interop_tvm_client import INIT, tvm_client
from tests.test_proxy_http import metrics, value
from tvm_rpc.protocol.handshake import encode_handshake

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]

HOST = "127.0.0.1"
HTTP_ANY = f"tcp:0:interface={HOST}"


def test_metrics_show_both_protocols_and_end_causes(tvm):
    with our_rpc_server("--key", "dev", "--http", HTTP_ANY, *INIT) as (daemon, port):
        http = announced_port(daemon, "rpc-server http")
        wait_until(lambda: value(metrics(http), "tvm_rpc_server_spare_worker_ready") == 1,
                   what="the spare worker")
        assert run_client("connect", HOST, port, "dev")["ok"] is True
        assert tvm_client("ping", "direct", HOST, port, "dev")["add"] == 42
        report = tvm_client("hang", "direct", HOST, port, "dev", 2, 60)
        assert report["error_type"] == "RPCSessionTimeoutError", report
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(encode_handshake("client:wrongkey"))
            assert sock.recv(64)
        wait_until(lambda: value(metrics(http), 'tvm_rpc_server_sessions_active'
                                                '{protocol="tvm"}') == 0,
                   what="the sessions end")
        text = metrics(http)
        for protocol, started in (("tvm_rpc", 1), ("tvm", 2)):
            assert value(text, f'tvm_rpc_server_sessions_started_total{{protocol="{protocol}"}}') \
                == started
            assert value(text, f'tvm_rpc_server_received_bytes_total{{protocol="{protocol}"}}') > 0
            assert value(text, f'tvm_rpc_server_sent_bytes_total{{protocol="{protocol}"}}') > 0
            assert value(text, f'tvm_rpc_server_session_duration_seconds_count'
                               f'{{protocol="{protocol}"}}') == started
        # A client that closes its session is seen going away either by the
        # session (closed) or first by the worker's watchdog (client_gone).
        for protocol in ("tvm_rpc", "tvm"):
            assert sum(value(text, f'tvm_rpc_server_sessions_ended_total'
                                   f'{{cause="{cause}",protocol="{protocol}"}}')
                       for cause in ("closed", "client_gone")) == 1
        assert value(text, 'tvm_rpc_server_sessions_ended_total'
                           '{cause="timeout",protocol="tvm"}') == 1
        assert value(text, 'tvm_rpc_server_worker_exits_total{cause="killed"}') == 1
        assert value(text, 'tvm_rpc_server_worker_exits_total{cause="clean"}') + value(
            text, 'tvm_rpc_server_worker_exits_total{cause="client_gone"}') == 2
        assert value(text, 'tvm_rpc_server_handshakes_refused_total{reason="mismatch"}') == 1
        assert value(text, "tvm_rpc_server_tracker_registered") is None


def test_metrics_show_tracker_registration():
    with our_tracker() as (_, tracker_port), our_rpc_server(
            "--tracker", f"{HOST}:{tracker_port}", "--key", "dev", "--in-process",
            "--http", HTTP_ANY) as (daemon, _):
        http = announced_port(daemon, "rpc-server http")
        wait_until(lambda: value(metrics(http), "tvm_rpc_server_tracker_registered") == 1,
                   what="the registration")
        # In process, no worker is spared.
        assert value(metrics(http), "tvm_rpc_server_spare_worker_ready") is None
