"""A peer that speaks the wrong protocol on a daemon's port: both ends say so, and the
connection is closed cleanly (an end of stream, never a reset: TVM's peers die on resets)."""

import socket

import pytest

from tests.daemons import Daemon, our_tracker, start_announced, twistd, wait_until
from tvm_rpc.protocol.constants import INT32, RPC_TRACKER_MAGIC
from tvm_rpc.protocol.handshake import encode_handshake

pytestmark = pytest.mark.system


def closed_cleanly(port, greeting):
    """Send C{greeting} to C{port}; @return: whether the daemon closed with an end of stream."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(greeting)
        try:
            return sock.recv(4096) == b""
        except ConnectionResetError:
            return False


def test_tracker_told_rpc_handshake():
    with our_tracker() as (tracker, port):
        assert closed_cleanly(port, encode_handshake("client:dev"))
        tracker.wait_for(r"wrong magic 0xff271, the RPC handshake of a client or server: "
                         r"this is a tracker; RPC handshakes go to an rpc-server or rpc-proxy port")


@pytest.mark.parametrize("name", ["rpc-server", "rpc-proxy"])
def test_server_and_proxy_told_tracker_magic(name):
    args = ["--listen", "tcp:0:interface=127.0.0.1"]
    if name == "rpc-proxy":
        args += ["--web-port", "0"]
    daemon, port = start_announced(name, twistd(name, *args))
    try:
        assert closed_cleanly(port, INT32.pack(RPC_TRACKER_MAGIC))
        daemon.wait_for(r"wrong magic 0x2f271, the tracker protocol's: this port takes RPC "
                        r"handshakes \(rpc-server, rpc-proxy\); tracker clients go to the "
                        r"tracker's port")
    finally:
        daemon.stop()


def test_through_proxy_pointed_at_a_tracker():
    """Both ends say what is wrong; the server does not claim to wait there for ever."""
    with our_tracker() as (tracker, port):
        server = Daemon(twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                               "--port", str(port), "--key", "dev"))
        try:
            server.wait_for(r"proxy 127\.0\.0\.1:%d closed the connection without answering "
                            r"our handshake \(1 times so far\): is it an RPC proxy\? A tracker "
                            r"does this" % port, 60)
            # Three attempts (with backoff) seen by the tracker, one line each.
            wait_until(lambda: tracker.output.count("this is a tracker; RPC handshakes go to")
                       >= 3, 60, "three refused attempts")
        finally:
            server.stop()
        assert server.output.count("waiting at proxy") <= 1, server.output
