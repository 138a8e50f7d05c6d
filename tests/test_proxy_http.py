"""C{twistd -n rpc-proxy --http} as a real process on loopback: a pair made
and its bytes relayed (on the splice path, and with C{--no-splice} on
Twisted's) show in C{/metrics}."""

import re
import socket
import urllib.request

import pytest

from tests.daemons import announced_port, our_proxy, recv_exactly, wait_until
from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply

pytestmark = [pytest.mark.system, pytest.mark.timeout(120)]

HOST = "127.0.0.1"


def metrics(port):
    """@return: the text of C{/metrics} on C{127.0.0.1:port}."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10) as response:
        assert response.headers["content-type"].startswith("text/plain")
        return response.read().decode("utf-8")


def value(text, sample):
    """@return: the value of the line starting with C{sample} in C{text}, or L{None}."""
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return None if match is None else float(match.group(1))


def connect(port, key):
    """@return: a connection to the proxy that sent the handshake of C{key}."""
    sock = socket.create_connection((HOST, port), timeout=30)
    sock.sendall(encode_handshake(key))
    return sock


@pytest.mark.parametrize("relay, flags", [("splice", ()), ("twisted", ("--no-splice",))])
def test_metrics_show_pair_and_bytes(relay, flags):
    with our_proxy("--http", f"tcp:0:interface={HOST}", *flags) as (daemon, port):
        http = announced_port(daemon, "rpc-proxy http")
        with urllib.request.urlopen(f"http://{HOST}:{http}/", timeout=10) as response:
            assert b'href="metrics"' in response.read()
        server = connect(port, "server:metrics")
        wait_until(lambda: value(metrics(http),
                                 'tvm_rpc_proxy_servers_waiting{key="metrics"}') == 1,
                   what="the server waits")
        client = connect(port, "client:metrics")
        with server, client:
            for sock, partner in ((server, "client:metrics"), (client, "server:metrics")):
                reply = encode_reply(RPC_CODE_SUCCESS, partner)
                assert recv_exactly(sock, len(reply)) == reply
            up, down = b"u" * 300_000, b"d" * 70_000
            client.sendall(up)
            assert recv_exactly(server, len(up)) == up
            server.sendall(down)
            assert recv_exactly(client, len(down)) == down
            text = metrics(http)
            assert value(text, 'tvm_rpc_proxy_pairs_total{path="tcp"}') == 1
            assert value(text, "tvm_rpc_proxy_pairs_active") == 1
            # A clean end: each side half-closes and reads the other's end of file.
            client.shutdown(socket.SHUT_WR)
            assert server.recv(1) == b""
            server.shutdown(socket.SHUT_WR)
            assert client.recv(1) == b""
        wait_until(lambda: value(metrics(http), "tvm_rpc_proxy_pairs_active") == 0,
                   what="the pair ends")
        text = metrics(http)
        sent = {d: sum(value(text, f'tvm_rpc_proxy_relayed_bytes_total{{direction="{d}",'
                                   f'relay="{r}"}}') or 0 for r in ("splice", "twisted"))
                for d in ("client_to_server", "server_to_client")}
        assert sent == {"client_to_server": len(up), "server_to_client": len(down)}
        if relay == "twisted":
            assert value(text, 'tvm_rpc_proxy_relayed_bytes_total{direction='
                               '"client_to_server",relay="twisted"}') == len(up)
        assert value(text, 'tvm_rpc_proxy_pairs_ended_total{reason="closed"}') == 1
        assert value(text, "tvm_rpc_proxy_connections") == 0
