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

from tests.daemons import our_tracker, recv_exactly, wait_until
from tvm_rpc.protocol.constants import RPC_TRACKER_MAGIC, TrackerCode

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]

HOST = "127.0.0.1"
MAGIC = struct.pack("<i", RPC_TRACKER_MAGIC)


class Peer:
    """A blocking tracker peer over a plain socket, as TVM's Python peers speak."""

    def __init__(self, port, timeout=10.0):
        """Connect to the tracker on C{port} and exchange the magic."""
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.sendall(MAGIC)
        assert recv_exactly(self.sock, 4) == MAGIC

    def send(self, message):
        """Send one JSON message as one frame."""
        body = json.dumps(message).encode()
        self.sock.sendall(struct.pack("<i", len(body)) + body)

    def recv_raw(self):
        """@return: the body of the next frame, undecoded."""
        (size,) = struct.unpack("<i", recv_exactly(self.sock, 4))
        return recv_exactly(self.sock, size)

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


def test_summary_flood_without_reading_is_dropped():
    """
    A peer sends 20,000 SUMMARY requests (140 KB) and never reads. With 300
    keys listed each reply is about 15 KB, so the replies would be about
    300 MB; the tracker stops reading the peer, closes it once it owes more
    than 4 MiB (with a log line), and serves everyone else meanwhile. How
    much it grows is measured by C{bench/bounds.py tracker-flood}.
    """
    with our_tracker() as (daemon, port):
        servers = Peer(port)
        for i in range(300):
            key = f"a-board-with-a-rather-long-key-name-{i:04d}"
            servers.send([TrackerCode.PUT, key, [9090, f"{key}:1"], None])
        for _ in range(300):
            assert json.loads(servers.recv_raw()) == 0
        summary = servers.call([TrackerCode.SUMMARY])
        assert len(json.dumps(summary)) > 14_000

        flooder = Peer(port)
        frame = json.dumps([TrackerCode.SUMMARY]).encode()
        frame = struct.pack("<i", len(frame)) + frame
        sender = threading.Thread(
            target=lambda: flooder.sock.sendall(frame * 20_000), daemon=True)
        sender.start()
        daemon.wait_for(r"closing tracker connection from 127\.0\.0\.1:\d+: more than "
                        r"4194304 bytes of replies not read", timeout=60)

        other = Peer(port)
        assert other.call([TrackerCode.PING]) == 0
        assert other.call([TrackerCode.SUMMARY])[1]["queue_info"] == summary[1]["queue_info"]
        other.close()

        # The close is an orderly one: reading what was owed ends in EOF (or a
        # reset, for the requests the tracker never read).
        flooder.sock.settimeout(10)
        ended = False
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if not flooder.sock.recv(1 << 20):
                    ended = True
                    break
            except ConnectionResetError:
                ended = True
                break
        assert ended, "the tracker kept the flooder's connection open"
        sender.join(10)
        flooder.close()
        servers.close()


def test_departed_peers_keys_are_forgotten():
    """
    Keys PUT by 20 peers that then left (2,000 keys) show as TVM shows them
    (free 0, pending 0) at first, and are gone after --key-idle-timeout; a
    key whose server stays connected outlives them.
    """
    with our_tracker("--key-idle-timeout", "2") as (_, port):
        # PUT before the others: once theirs are forgotten, it has been
        # listed for longer than the idle timeout.
        stays = Peer(port)
        stays.call([TrackerCode.PUT, "stays", [9090, "stays:1"], None])
        for batch in range(20):
            peer = Peer(port)
            for i in range(100):
                key = f"gone-{batch}-{i}"
                peer.send([TrackerCode.PUT, key, [9090, f"{key}:1"], None])
            for _ in range(100):
                assert json.loads(peer.recv_raw()) == 0
            peer.close()
        watcher = Peer(port)
        try:
            seen = []

            def departed_forgotten():
                queue_info = watcher.call([TrackerCode.SUMMARY])[1]["queue_info"]
                seen.append(queue_info)
                return not any(key.startswith("gone-") for key in queue_info)

            wait_until(departed_forgotten, 30, interval=0.2,
                       what=lambda: f"the departed keys forgotten ({len(seen[-1])} listed)")
            first = {key: v for key, v in seen[0].items() if key != "stays"}
            assert len(first) > 0
            assert all(v == {"free": 0, "pending": 0} for v in first.values())
            assert seen[-1] == {"stays": {"free": 1, "pending": 0}}
        finally:
            stays.close()
            watcher.close()
