"""TCP options our daemons set, read back from real loopback sockets."""

import pytest
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

pytestmark = pytest.mark.system


class TuneSocketTests(SynchronousTestCase):
    """L{tune_tcp} on a real TCP socket (no reactor involved)."""

    def test_nodelay_and_keepalive(self):
        import socket

        from tvm_rpc.proxy.protocol import PROXY_KEEPALIVE
        from tvm_rpc.transport import tune_tcp

        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(1)
            with socket.create_connection(listener.getsockname()) as sock:

                class Handle:
                    def getHandle(self):
                        return sock

                tune_tcp(Handle(), PROXY_KEEPALIVE)
                self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                self.assertTrue(sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE))
                if hasattr(socket, "TCP_KEEPIDLE"):
                    self.assertEqual(
                        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE), PROXY_KEEPALIVE.idle)
        tune_tcp(StringTransport(), PROXY_KEEPALIVE)


class QuickAckSocketTests(SynchronousTestCase):
    """quick_ack on real sockets."""

    def test_quick_ack_sets_the_socket_option(self):
        """On a real TCP socket, quick_ack switches the socket to quick ACKs."""
        import socket

        from tvm_rpc.transport import quick_ack

        if not hasattr(socket, "TCP_QUICKACK"):
            self.skipTest("TCP_QUICKACK is Linux's")
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        client = socket.create_connection(listener.getsockname())
        self.addCleanup(client.close)
        server, _ = listener.accept()
        self.addCleanup(server.close)
        for _ in range(3):
            # A few exchanges put the connection in delayed-ACK mode.
            client.sendall(b"x")
            server.recv(1)
            server.sendall(b"y")
            client.recv(1)

        class Transport:
            def getHandle(self):
                return server

        quick_ack(Transport())
        self.assertEqual(server.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK), 1)
        quick_ack(StringTransport())  # not a socket: nothing to do
