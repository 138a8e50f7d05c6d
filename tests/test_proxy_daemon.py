"""``twistd -n rpc-proxy`` as a real process on loopback.

Pairing and relaying over real sockets, half-close, bad handshakes, the
websocket endpoint, a slow reader on a 1 GiB stream, and running out of file
descriptors (the memory and CPU bounds of the last two are measured by
``bench/bounds.py``).
"""

import base64
import os
import socket
import struct

import pytest

from daemons import (
    Daemon,
    child_env,
    free_servers,
    listen_any,
    listen_on,
    on_free_port,
    our_proxy,
    recv_exactly,
    start_announced,
    stream_to_slow_reader,
    twistd,
    twistd_with_fd_limit,
    wait_summary,
    wait_until,
)
from tvm_rpc.protocol.constants import INT32, RPC_CODE_MISMATCH, RPC_CODE_SUCCESS, RPC_MAGIC
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply

pytestmark = pytest.mark.system

MiB = 1024 * 1024


def recv_all(sock):
    """Read until end of file."""
    data = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(data)
        data += chunk


def connect(port, key, extra=b""):
    """Open a connection and send the handshake for C{key} (plus C{extra})."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(encode_handshake(key) + extra)
    return sock


def expect_success(sock, partner_key):
    reply = encode_reply(RPC_CODE_SUCCESS, partner_key)
    assert recv_exactly(sock, len(reply)) == reply


def test_pair_relay_half_close_and_bad_peers():
    with our_proxy("--handshake-timeout", "2") as (daemon, port):
        # Bad peers first: each is closed at once, the daemon keeps serving.
        bad = [
            INT32.pack(RPC_MAGIC) + INT32.pack(1 << 30),
            INT32.pack(RPC_MAGIC) + INT32.pack(-5),
            INT32.pack(0x12345) + b"junk",
            INT32.pack(RPC_MAGIC) + INT32.pack(4) + b"\xff\xfe\xfd\xfc",
        ]
        for data in bad:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(data)
                assert recv_all(sock) == b""
        with connect(port, "abcdefgkey") as sock:
            assert recv_all(sock) == INT32.pack(RPC_CODE_MISMATCH)
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert recv_all(silent) == b""
        silent.close()
        daemon.wait_for(r"refused handshake from 127\.0\.0\.1:\d+: key length 1073741824")
        daemon.wait_for(r"no handshake within 2")

        server = connect(port, "server:dev", b"server-early")
        client = connect(port, "client:dev -timeout=5", b"client-early")
        expect_success(server, "client:dev -timeout=5")
        expect_success(client, "server:dev")
        assert recv_exactly(server, 12) == b"client-early"
        assert recv_exactly(client, 12) == b"server-early"
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        assert recv_all(server) == b"request"
        server.sendall(b"answer after the client's half-close")
        server.close()
        assert recv_all(client) == b"answer after the client's half-close"
        client.close()
        # A pair that ended leaves nothing behind: the same key pairs again.
        server = connect(port, "server:dev")
        client = connect(port, "client:dev")
        expect_success(client, "server:dev")
        client.close()
        expect_success(server, "client:dev")
        assert recv_all(server) == b""
        server.close()


def ws_connect(port, path="/ws"):
    """A minimal websocket client handshake over a plain socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    head = bytearray()
    while not head.endswith(b"\r\n\r\n"):
        byte = sock.recv(1)
        assert byte, bytes(head)
        head += byte
    return sock, head.split(b"\r\n", 1)[0]


def ws_send(sock, data, opcode=0x2):
    """Send one masked frame."""
    mask = os.urandom(4)
    if len(data) < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | len(data))
    elif len(data) < 65536:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, len(data))
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, len(data))
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    sock.sendall(header + mask + masked)


def ws_recv(sock):
    """@return: C{(opcode, payload)} of the next frame."""
    first, second = recv_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exactly(sock, 8))
    return first & 0x0F, recv_exactly(sock, length)


def test_websocket_peer_paired_with_tcp_peer():
    # --web-port 0 turns the websocket off, so its port is picked free in advance.
    def args(web_port):
        return twistd("rpc-proxy", "--host", "127.0.0.1", "--listen", listen_any("127.0.0.1"),
                      "--web-port", str(web_port))

    with on_free_port(args, r"rpc-proxy websocket /ws listening on") as (daemon, web_port):
        port = int(daemon.wait_for(r"rpc-proxy listening on \S+:(\d+)").group(1))
        wrong, status = ws_connect(web_port, "/other")
        assert b"101" not in status
        wrong.close()
        ws, status = ws_connect(web_port)
        assert b"101" in status
        handshake = encode_handshake("server:browser")
        ws_send(ws, handshake[:6])
        ws_send(ws, handshake[6:] + b"hello from the browser")
        client = connect(port, "client:browser", b"hello from tcp")
        expect_success(client, "server:browser")
        received = bytearray()
        while len(received) < len(encode_reply(RPC_CODE_SUCCESS, "client:browser")) + 14:
            opcode, payload = ws_recv(ws)
            assert opcode == 0x2
            received += payload
        assert bytes(received) == encode_reply(RPC_CODE_SUCCESS, "client:browser") + b"hello from tcp"
        assert recv_exactly(client, 22) == b"hello from the browser"
        ws_send(ws, b"x" * 70000)
        assert recv_exactly(client, 70000) == b"x" * 70000
        client.sendall(b"bye")
        opcode, payload = ws_recv(ws)
        assert (opcode, payload) == (0x2, b"bye")
        ws.close()
        assert recv_all(client) == b""
        client.close()
    assert "Starting factory" not in daemon.output, daemon.output


def test_slow_reader_on_a_1gib_stream():
    """
    A sender pushes 1 GiB as fast as it can; the reader is slower: every byte
    arrives and the pair ends cleanly. The proxy's memory meanwhile
    is measured by C{bench/bounds.py proxy-rss}.
    """
    total = 1024 * MiB
    block = os.urandom(MiB)
    with our_proxy() as (daemon, port):
        server = connect(port, "server:big")
        client = connect(port, "client:big")
        expect_success(server, "client:big")
        expect_success(client, "server:big")
        received, sent = stream_to_slow_reader(client, server, block, total)
        assert sent
        assert recv_all(server) == b""
        server.close()
        client.close()
        assert received == total
        assert daemon.proc.poll() is None


def limited_proxy(limit):
    """Our proxy with RLIMIT_NOFILE lowered to C{limit}; @return: C{(daemon, port)}."""
    args = twistd_with_fd_limit(limit, "rpc-proxy", "--host", "127.0.0.1",
                                "--listen", listen_any("127.0.0.1"), "--web-port", "0")
    return start_announced("rpc-proxy", args, env=child_env())


def test_running_out_of_descriptors_does_not_wedge():
    """
    Out of descriptors, the proxy keeps running while more peers knock, and
    pairs again once descriptors are free. That it does not spin meanwhile is
    measured by C{bench/bounds.py fd-cpu}.
    """
    daemon, port = limited_proxy(64)
    hogs = []
    try:
        for i in range(80):
            try:
                sock = connect(port, f"server:hog{i}")
            except OSError:
                break
            hogs.append(sock)
        daemon.wait_for(r"EMFILE", timeout=30)
        # More peers knock while no descriptor is free.
        knocking = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(5)]
        for sock in knocking:
            sock.close()
        for sock in hogs:
            sock.close()
        hogs = []
        # The first attempts may still meet a full descriptor table (accepted and
        # closed at once): each attempt uses its own key and closes what it opened.
        attempts = iter(range(1000))
        last_error = [None]

        def paired():
            attempt = next(attempts)
            opened = []
            try:
                server = connect(port, f"server:after{attempt}")
                opened.append(server)
                client = connect(port, f"client:after{attempt}")
                opened.append(client)
                server.settimeout(5)
                client.settimeout(5)
                expect_success(server, f"client:after{attempt}")
                expect_success(client, f"server:after{attempt}")
                return server, client
            except (OSError, AssertionError) as e:
                last_error[0] = e
                for sock in opened:
                    sock.close()
                return None

        server, client = wait_until(paired, 20, interval=0.2,
                                    what=lambda: f"a pair again (last: {last_error[0]!r})")
        client.sendall(b"still serving")
        assert recv_exactly(server, 13) == b"still serving"
        server.close()
        client.close()
        assert daemon.proc.poll() is None
    finally:
        for sock in hogs:
            sock.close()
        daemon.stop()


def test_taken_port_range_is_fatal():
    """When no port of the range can be bound, twistd exits with an error."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        args = twistd("rpc-proxy", "--host", "127.0.0.1", "--port", str(port),
                      "--port-end", str(port + 1), "--web-port", "0")
        daemon = Daemon(args, env=child_env())
        try:
            assert daemon.proc.wait(60) != 0
        finally:
            daemon.stop()
        assert "CannotListenError" in daemon.output or "Couldn't listen" in daemon.output, \
            daemon.output


def test_taken_websocket_port_is_fatal_and_named():
    """
    A taken --web-port (8888 by default: a second proxy on one machine) stops
    the proxy with an error naming that port, not only its number.
    """
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        web_port = taken.getsockname()[1]
        daemon = Daemon(twistd("rpc-proxy", "--host", "127.0.0.1",
                               "--listen", listen_any("127.0.0.1"), "--web-port", str(web_port)),
                        env=child_env())
        try:
            assert daemon.proc.wait(60) != 0
        finally:
            daemon.stop()
        assert "rpc-proxy websocket /ws: no free port among 1 candidates" in daemon.output, \
            daemon.output


def test_tracker_restart_reregisters_and_leaving_server_is_withdrawn():
    """
    Tracker mode with our tracker: a server that leaves the proxy leaves the
    tracker at once; after a tracker restart the proxy registers again what it
    still holds.
    """
    tracker, tracker_port = start_announced(
        "rpc-tracker", twistd("rpc-tracker", "--listen", listen_any("127.0.0.1")), env=child_env())
    try:
        with our_proxy("--tracker", f"127.0.0.1:{tracker_port}") as (proxy, port):
            first = connect(port, "server:a")
            second = connect(port, "server:b")
            wait_summary(tracker_port,
                         lambda s: free_servers(s, "a") == 1 and free_servers(s, "b") == 1)
            first.close()
            summary = wait_summary(tracker_port, lambda s: free_servers(s, "a") == 0, timeout=5)
            assert free_servers(summary, "b") == 1
            wait_summary(tracker_port, lambda s: {"key": "server:proxy[b]",
                                                  "addr": ["127.0.0.1", port]}
                         in s["server_info"], timeout=5)
            tracker.stop()
            tracker = Daemon(twistd("rpc-tracker", "--listen", listen_on(tracker_port)),
                             env=child_env())
            tracker.wait_for(r"rpc-tracker listening on")
            # Each link reconnects on its own backoff: wait for both.
            reported = {"key": "server:proxy[b]", "addr": ["127.0.0.1", port]}
            wait_summary(tracker_port,
                         lambda s: free_servers(s, "b") == 1 and reported in s["server_info"],
                         timeout=30)
            second.close()
            wait_summary(tracker_port, lambda s: free_servers(s, "b") == 0, timeout=5)
        # The factories' "Starting factory <repr>" lines (one per tracker link) stay out.
        assert "Starting factory" not in proxy.output, proxy.output
    finally:
        tracker.stop()
