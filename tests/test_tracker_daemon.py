"""Real ``twistd -n rpc-tracker`` daemons on loopback: smoke and STOP, keepalive
timers, SIGTERM, the port range and a fatal bind, and a daemon at its
descriptor limit (options and the service tree: ``tests/test_tracker_tap.py``)."""

import contextlib
import os
import random
import re
import signal
import socket
import struct
import sys

import pytest

from tests.daemons import (
    Daemon,
    child_env,
    listen_any,
    our_tracker,
    recv_exactly,
    start_announced,
    twistd,
    twistd_with_fd_limit,
    wait_until,
)
from tvm_rpc.protocol.constants import RPC_TRACKER_MAGIC

pytestmark = pytest.mark.system

MAGIC = struct.pack("<i", RPC_TRACKER_MAGIC)


def tracker_call(port, *messages, timeout=5):
    """Greet a tracker and send C{messages}; return the decoded replies."""
    import json

    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(MAGIC)
        assert recv_exactly(sock, 4) == MAGIC
        replies = []
        for message in messages:
            body = json.dumps(message).encode()
            sock.sendall(struct.pack("<i", len(body)) + body)
            (length,) = struct.unpack("<i", recv_exactly(sock, 4))
            replies.append(json.loads(recv_exactly(sock, length)))
        return replies


def test_twistd_smoke():
    """A real ``twistd -n rpc-tracker``: serves, and stops on the right STOP key."""
    with our_tracker("--stop-key", "secret") as (daemon, port):
        assert tracker_call(port, [1], [3, "k", [9000, "k:1"], None], [6]) == [
            0, 0, [0, {"queue_info": {"k": {"free": 1, "pending": 0}},
                       "server_info": [], "leases": []}],
        ]
        assert tracker_call(port, [2, "wrong"]) == [-1]
        assert tracker_call(port, [2, "secret"]) == [0]
        assert daemon.proc.wait(15) == 0
        assert "wrong stop key" in daemon.output
        assert "secret" not in daemon.output


@contextlib.contextmanager
def _busy_port_before_free_one():
    """
    Hold a listening port P whose successor P+1 was free a moment ago.

    Ports are drawn below the usual ephemeral range, which outgoing
    connections crowd on a busy machine.
    """
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as busy, socket.socket() as probe:
            # As Twisted binds: connections in TIME_WAIT do not count.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                busy.bind(("127.0.0.1", port))
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            probe.close()
            busy.listen(1)
            yield port
            return
    raise AssertionError("no port with a free successor")


def _tcp_timer(local_port, remote_port):
    """
    The kernel's timer on the loopback TCP socket C{local_port} -> C{remote_port},
    from /proc/net/tcp: C{(kind, ticks)}; kind 2 is the keepalive timer.
    """
    want_local, want_remote = f":{local_port:04X}", f":{remote_port:04X}"
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[1].endswith(want_local) and fields[2].endswith(want_remote):
                kind, when = fields[5].split(":")
                return int(kind, 16), int(when, 16)
    raise AssertionError(f"no socket {local_port} -> {remote_port}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp")
def test_accepted_sockets_get_keepalive_timers():
    """The daemon's side of an idle connection runs a keepalive timer set from
    --keepalive-idle (a plain socket has no timer at all when idle)."""
    with our_tracker("--keepalive-idle", "7") as (daemon, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(MAGIC)
            assert recv_exactly(sock, 4) == MAGIC
            mine = sock.getsockname()[1]
            # Until the echo is acknowledged the retransmit timer (kind 1) shows.
            wait_until(lambda: _tcp_timer(port, mine)[0] != 1, 5, interval=0.05,
                       what="the echo acknowledged")
            kind, ticks = _tcp_timer(port, mine)
            assert kind == 2
            assert 0 < ticks <= 7 * os.sysconf("SC_CLK_TCK")
            assert _tcp_timer(mine, port)[0] in (0, 1)


def test_twistd_sigterm_stops_cleanly():
    """SIGTERM shuts the reactor down: the listener closes, twistd finishes.

    (twistd re-raises the signal after a clean shutdown, so the exit status
    says SIGTERM.)
    """
    with our_tracker("--silent") as (daemon, port):
        assert tracker_call(port, [1]) == [0]
    assert daemon.proc.returncode in (0, -signal.SIGTERM)
    assert re.search(r"rpc-tracker stopped listening on \S+:%d" % port, daemon.output)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_twistd_port_range_and_fatal_bind():
    """The first free port of the range is bound; none free exits non-zero."""
    with _busy_port_before_free_one() as port:
        args = twistd("rpc-tracker", "--host", "127.0.0.1", "--port", str(port),
                      "--port-end", str(port + 2))
        daemon = Daemon(args)
        try:
            match = daemon.wait_for(r"rpc-tracker listening on 127\.0\.0\.1:(\d+)")
            assert int(match.group(1)) == port + 1
        finally:
            daemon.stop()
        daemon = Daemon(twistd("rpc-tracker", "--host", "127.0.0.1", "--port", str(port),
                               "--port-end", str(port + 1)))
        try:
            assert daemon.proc.wait(30) != 0
            assert "rpc-tracker listening" not in daemon.output
        finally:
            daemon.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc and RLIMIT_NOFILE")
def test_out_of_file_descriptors_recovers():
    """A daemon at its descriptor limit refuses connections and serves again
    once connections close. That it does not spin meanwhile is measured by
    C{bench/bounds.py fd-cpu}."""
    args = twistd_with_fd_limit(48, "rpc-tracker", "--listen", listen_any("127.0.0.1"))
    daemon, port = start_announced("rpc-tracker", args, env=child_env())
    held = []
    try:
        refused = 0
        for _ in range(100):
            if refused >= 3:
                break
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.settimeout(2)
            try:
                sock.sendall(MAGIC)
                if recv_exactly(sock, 4) == MAGIC:
                    held.append(sock)
                    continue
            except (OSError, ConnectionError):
                pass
            refused += 1
            sock.close()
        assert held and refused, (len(held), refused)
        daemon.wait_for(r"out of file descriptors")
        for sock in held:
            sock.close()
        held.clear()
        last_error = [None]

        def answers():
            try:
                assert tracker_call(port, [1], timeout=2) == [0]
                return True
            except (OSError, ConnectionError) as e:
                last_error[0] = e
                return False

        wait_until(answers, 15, what=lambda: f"an answer again (last: {last_error[0]!r})")
        daemon.wait_for(r"accepting connections on .* again")
        assert daemon.output.count("out of file descriptors on") == 1
    finally:
        for sock in held:
            sock.close()
        daemon.stop()
