"""The tracker against careless and hostile peers, as a real ``twistd -n
rpc-tracker`` on loopback: what a peer can see and what it can make the
tracker hold (see ``docs/robustness.md``)."""

import json
import secrets
import socket
import struct
import threading
import time

import pytest

from tests.daemons import our_tracker
from tvm_rpc.protocol.constants import RPC_TRACKER_MAGIC, TrackerCode

pytestmark = pytest.mark.timeout(180)

HOST = "127.0.0.1"
MAGIC = struct.pack("<i", RPC_TRACKER_MAGIC)


class Peer:
    """A blocking tracker peer over a plain socket, as TVM's Python peers speak."""

    def __init__(self, port, timeout=10.0):
        """Connect to the tracker on C{port} and exchange the magic."""
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.sendall(MAGIC)
        assert self._recv(4) == MAGIC

    def _recv(self, size):
        """@return: exactly C{size} bytes. @raise ConnectionError: on EOF first."""
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise ConnectionError("tracker closed the connection")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def send(self, message):
        """Send one JSON message as one frame."""
        body = json.dumps(message).encode()
        self.sock.sendall(struct.pack("<i", len(body)) + body)

    def recv_raw(self):
        """@return: the body of the next frame, undecoded."""
        (size,) = struct.unpack("<i", self._recv(4))
        return self._recv(size)

    def call(self, message):
        """@return: the decoded answer to C{message}."""
        self.send(message)
        return json.loads(self.recv_raw())

    def close(self):
        """Close the socket."""
        self.sock.close()


def test_summary_poller_never_sees_a_matchkey():
    """
    The stolen-session race: a peer polling SUMMARY while servers are granted
    sees who holds what (the lease: key, server address, client, user) but
    never a matchkey, so it cannot connect first with it.
    """
    with our_tracker() as (_, port):
        granted = []
        seen = []
        stop = threading.Event()

        def poll():
            """Ask for SUMMARY as fast as the tracker answers, keeping every reply."""
            poller = Peer(port)
            try:
                for _ in range(100_000):
                    if stop.is_set():
                        break
                    poller.send([TrackerCode.SUMMARY])
                    seen.append(poller.recv_raw())
            finally:
                poller.close()

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        server, client, watcher = Peer(port), Peer(port), Peer(port)
        try:
            assert server.call([TrackerCode.UPDATE_INFO,
                                {"key": "server:dev", "addr": [None, 9090]}]) == 0
            for _ in range(12):
                matchkey = f"dev:{secrets.token_hex(8)}"
                assert server.call([TrackerCode.PUT, "dev", [9090, matchkey], None]) == 0
                code, (host, server_port, got) = client.call([TrackerCode.REQUEST, "dev", "u", 1])
                assert (code, got) == (0, matchkey)
                granted.append(matchkey)
                raw = watcher.call([TrackerCode.SUMMARY])
                (lease,) = raw[1]["leases"]
                assert (lease["key"], lease["host"], lease["port"], lease["user"]) == (
                    "dev", host, server_port, "u")
                assert matchkey not in json.dumps(raw)
        finally:
            stop.set()
            thread.join(30)
            for peer in (server, client, watcher):
                peer.close()
        assert len(seen) > 12
        everything = b"".join(seen)
        assert b'"leases": [{' in everything or b'"leases":[{' in everything
        for matchkey in granted:
            assert matchkey.encode() not in everything
