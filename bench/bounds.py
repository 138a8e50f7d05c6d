"""Memory and CPU bounds of our daemons: pass/fail checks that measure.

Usage (from the repository root)::

    python bench/bounds.py [proxy-rss] [session-rss] [tracker-flood] [fd-cpu]
                           [dead-server] [--write-docs]

With no check named, all run. Each starts our daemons on loopback (port 0,
the announced port read back), drives them as the tests in ``tests/`` do, and
prints every target with its figure and PASS or FAIL; the exit status is 1
when any target is missed. The tests keep the behaviour (every byte arrives,
the daemon logs the refusal and serves again); the figures live here, since
they depend on the machine and its load:

- ``proxy-rss``: a pair relays 1 GiB to a slow reader; the proxy's RSS grows
  by less than 12 MiB (4 MiB per pair, twice that for a moment, plus
  allocator slack; docs/proxy.md) and is back within 2 MiB of its start
  within 10 s of the pair's end.
- ``session-rss``: a 256 MiB upload and download through one session
  (client and server in one process) grows that process by less than
  32 MiB; 128 unread 512 KiB reads (64 MiB asked for) grow the server by less
  than 16 MiB.
- ``tracker-flood``: a peer sends 20,000 SUMMARY requests (300 keys listed,
  about 300 MB of replies) and never reads: the tracker grows by less than
  64 MiB before it drops the peer.
- ``fd-cpu``: the server, the tracker and the proxy, each at its descriptor
  limit while a peer connects every 50 ms, use less than 1 s of CPU in 2 s.
- ``dead-server``: one of TVM's servers registered with our tracker is killed
  (SIGKILL to its process group); it leaves the tracker's summary (listing
  and free count) within 1 s of the kill.
"""

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    DOCS,
    MiB,
    child_env,
    machine_description,
    machine_markdown,
    our_tracker,
    replace_section,
    shown_command_line,
    tree_cpu_seconds,
    tree_rss,
)
from tests import session_processes  # noqa: E402
from tests.daemons import (  # noqa: E402
    listen_any,
    our_proxy,
    recv_exactly,
    start_announced,
    stream_to_slow_reader,
    tracker_summary,
    tvm_rpc_server,
    twistd_with_fd_limit,
)
from tvm_rpc.protocol.constants import (  # noqa: E402
    RPC_CODE_SUCCESS,
    RPC_TRACKER_MAGIC,
    TrackerCode,
)
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply  # noqa: E402

HOST = "127.0.0.1"
MAGIC = struct.pack("<i", RPC_TRACKER_MAGIC)
STANDIN = "tests.standin_session:make"


class Targets:
    """The targets checked so far: each with its figure and whether it was met."""

    def __init__(self):
        self.rows = []

    def check(self, name, value, bound, unit):
        """Record (and print) whether C{value} is below C{bound}."""
        met = value < bound
        self.rows.append((name, value, bound, unit, met))
        print(f"{'PASS' if met else 'FAIL'}  {name}: {value:.2f} {unit} (bound < {bound:g} {unit})",
              flush=True)

    @property
    def all_met(self):
        return all(row[-1] for row in self.rows)


def paired(port, key):
    """
    Pair a server and a client of C{key} at our proxy on C{port}.

    @return: C{(server, client)} sockets, past the handshake.
    """
    socks = []
    for role, other in (("server", "client"), ("client", "server")):
        sock = socket.create_connection((HOST, port), timeout=30)
        sock.sendall(encode_handshake(f"{role}:{key}"))
        socks.append((sock, f"{other}:{key}"))
    for sock, peer in socks:
        reply = encode_reply(RPC_CODE_SUCCESS, peer)
        assert recv_exactly(sock, len(reply)) == reply
    return socks[0][0], socks[1][0]


def proxy_rss(targets):
    """The proxy relaying 1 GiB to a slow reader."""
    total = 1024 * MiB
    block = os.urandom(MiB)
    with our_proxy() as (daemon, port):
        pid = daemon.proc.pid
        # Warm the relay path up once so imports and first allocations are in the baseline.
        server, client = paired(port, "warm")
        client.sendall(block)
        recv_exactly(server, len(block))
        client.close()
        server.close()
        # The proxy gives free heap back a second after a pair ends.
        time.sleep(2)
        baseline = tree_rss(pid)
        server, client = paired(port, "big")
        peak = baseline

        def sample():
            nonlocal peak
            peak = max(peak, tree_rss(pid))

        stream_to_slow_reader(client, server, block, total, on_pause=sample)
        server.close()
        client.close()
        deadline = time.monotonic() + 10
        while True:
            after = tree_rss(pid)
            if after - baseline < 2 * MiB or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    targets.check("proxy: growth relaying 1 GiB to a slow reader", (peak - baseline) / MiB, 12,
                  "MiB")
    targets.check("proxy: not returned 10 s after the pair ended", (after - baseline) / MiB, 2,
                  "MiB")


def session_rss(targets):
    """A 256 MiB round trip, then a flood of unread reads."""
    out = session_processes.round_trip(256 * MiB)
    assert "error" not in out and out["same"], out
    targets.check("session: growth of a 256 MiB upload + download (both ends)",
                  out["growth_kib"] / 1024, 32, "MiB")
    server, port = session_processes.start_flood_server()
    try:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            sock.connect((HOST, port))
            size = 64 * MiB
            stream = session_processes.open_array_stream(sock, [b""], size)
            before = tree_rss(server.pid)
            session_processes.flood_unread_reads(sock, stream, size)
            # Let the server act on what it read before measuring.
            time.sleep(1)
            growth = tree_rss(server.pid) - before
    finally:
        server.kill()
        server.wait(30)
    targets.check("session: server growth under 128 unread 512 KiB reads", growth / MiB, 16,
                  "MiB")


def tracker_call(sock, message):
    """Send one JSON frame on C{sock}."""
    body = json.dumps(message).encode()
    sock.sendall(struct.pack("<i", len(body)) + body)


def tracker_flood(targets):
    """A peer floods SUMMARY with 300 keys listed and never reads."""
    with our_tracker() as (daemon, port):
        servers = socket.create_connection((HOST, port), timeout=30)
        servers.sendall(MAGIC)
        assert recv_exactly(servers, 4) == MAGIC
        for i in range(300):
            key = f"a-board-with-a-rather-long-key-name-{i:04d}"
            tracker_call(servers, [TrackerCode.PUT, key, [9090, f"{key}:1"], None])
        for _ in range(300):
            (size,) = struct.unpack("<i", recv_exactly(servers, 4))
            recv_exactly(servers, size)
        before = tree_rss(daemon.proc.pid)
        flooder = socket.create_connection((HOST, port), timeout=30)
        flooder.sendall(MAGIC)
        assert recv_exactly(flooder, 4) == MAGIC
        frame = json.dumps([TrackerCode.SUMMARY]).encode()
        frame = struct.pack("<i", len(frame)) + frame
        threading.Thread(target=lambda: flooder.sendall(frame * 20_000), daemon=True).start()
        daemon.wait_for(r"more than 4194304 bytes of replies not read", timeout=60)
        grown = tree_rss(daemon.proc.pid) - before
        flooder.close()
        servers.close()
    targets.check("tracker: growth under a SUMMARY flood never read", grown / MiB, 64, "MiB")


def cpu_while_knocking(pid, port, seconds=2.0, hello=b""):
    """
    Connect to C{port} every 50 ms for C{seconds} (sending C{hello}, then
    closing), as peers keep knocking at a daemon out of descriptors.

    @return: the CPU seconds process C{pid} used meanwhile.
    """
    before = tree_cpu_seconds(pid)
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        try:
            with socket.create_connection((HOST, port), timeout=5) as sock:
                if hello:
                    sock.sendall(hello)
        except OSError:
            pass  # refused or reset: what a daemon out of descriptors may do
        # The knocking rate, not a wait.
        time.sleep(0.05)
    return tree_cpu_seconds(pid) - before


def fd_cpu(targets):
    """Each daemon at its descriptor limit while peers knock."""
    # (daemon, descriptor limit, arguments, what a held peer sends, what a
    # knocking peer sends, the log line of the exhausted table)
    cases = [
        ("rpc-server", 40, ["--key", "dev", "--in-process", "--session-factory", STANDIN,
                            "--handshake-timeout", "60"], lambda i: b"", b"",
         "out of file descriptors on"),
        ("rpc-tracker", 48, [], lambda i: MAGIC, MAGIC, "out of file descriptors"),
        ("rpc-proxy", 64, ["--host", HOST, "--web-port", "0"],
         lambda i: encode_handshake(f"server:hog{i}"), b"", "EMFILE"),
    ]
    for name, limit, extra, greeting, hello, exhausted in cases:
        args = twistd_with_fd_limit(limit, name, "--listen", listen_any(HOST), *extra)
        daemon, port = start_announced(name, args, env=child_env())
        held = []
        try:
            for i in range(100):
                if exhausted in daemon.output:
                    break
                try:
                    sock = socket.create_connection((HOST, port), timeout=5)
                    sock.sendall(greeting(i))
                except OSError:
                    break
                held.append(sock)
            daemon.wait_for(exhausted, timeout=30)
            busy = cpu_while_knocking(daemon.proc.pid, port, hello=hello)
        finally:
            for sock in held:
                sock.close()
            daemon.stop()
        targets.check(f"{name}: CPU in 2 s at its descriptor limit, knocked every 50 ms", busy,
                      1.0, "s")


def dead_server(targets):
    """Kill a registered TVM server; time until our tracker lists it no more."""
    def listed(summary):
        """@return: whether the doomed server is still in C{summary} at all."""
        infos = summary["server_info"]
        free = summary["queue_info"].get("doomed", {}).get("free", 0)
        return free > 0 or any(info.get("key") == "server:doomed" for info in infos)

    with our_tracker() as (_, port):
        with tvm_rpc_server("--tracker", f"{HOST}:{port}", "--key", "doomed") as (server, _):
            deadline = time.monotonic() + 60
            while not listed(tracker_summary(port)):
                if time.monotonic() > deadline:
                    raise RuntimeError("TVM's server never registered with our tracker")
                time.sleep(0.05)
            killed_at = time.monotonic()
            server.stop(sig=signal.SIGKILL)
            # Polled every 10 ms: the figure is accurate to that, bounded at 30 s.
            while listed(tracker_summary(port)) and time.monotonic() < killed_at + 30:
                time.sleep(0.01)
            seconds = time.monotonic() - killed_at
    targets.check("tracker: a killed TVM server leaves the summary", seconds, 1, "s")


CHECKS = {
    "proxy-rss": proxy_rss,
    "session-rss": session_rss,
    "tracker-flood": tracker_flood,
    "fd-cpu": fd_cpu,
    "dead-server": dead_server,
}

#: What each check measures, and the test that keeps its behaviour, for the docs.
MEASURES = {
    "proxy-rss": "our proxy's RSS while one pair relays 1 GiB to a reader slower than the "
                 "writer, and after the pair ended (behaviour: "
                 "`tests/test_proxy_daemon.py::test_slow_reader_on_a_1gib_stream`)",
    "session-rss": "the RSS of one process running our session client and server over "
                   "loopback during a 256 MiB upload and download, and of a session server "
                   "asked for 64 MiB in reads it never reads back (behaviour: "
                   "`tests/test_session_processes.py` `RoundTripTests`, `FloodTests`)",
    "tracker-flood": "our tracker's RSS while a peer sends 20,000 SUMMARY requests with 300 "
                     "keys listed and never reads, until the tracker drops it (behaviour: "
                     "`tests/test_tracker_robustness.py::"
                     "test_summary_flood_without_reading_is_dropped`)",
    "fd-cpu": "the CPU each daemon (server, tracker, proxy) uses in 2 s at its "
              "`RLIMIT_NOFILE` (40, 48, 64) while a peer connects every 50 ms (behaviour: "
              "`test_out_of_file_descriptors_recovers` in `tests/test_server_daemon.py` and "
              "`tests/test_tracker_daemon.py`, `tests/test_proxy_daemon.py::"
              "test_running_out_of_descriptors_does_not_wedge`)",
    "dead-server": "seconds from SIGKILL of a TVM server's process group until our tracker "
                   "no longer lists it nor counts it free (issue 2's bound of 1 s; behaviour: "
                   "`tests/test_interop_tracker.py::test_terminated_tvm_server_leaves_our_summary`)",
}


def report(targets, machine, command_line, checks):
    """@return: the Markdown body of the ``Bounds`` section."""
    lines = [
        f"Measured by `python bench/bounds.py {command_line}` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, on loopback:",
        "",
        *machine_markdown(machine),
        "",
        "The tests check the behaviour (every byte arrives, the daemon logs the refusal and "
        "serves again); these figures depend on the machine and its load, so they are "
        "measured here, each against its bound. The script prints PASS or FAIL per bound and "
        "exits with 1 when one is missed; rerun one check with "
        "`python bench/bounds.py CHECK` (add `--write-docs` to rewrite this section).",
        "",
        *(f"- `{name}`: {MEASURES[name]}." for name in checks),
        "",
        "| check | figure | bound | |",
        "|---|---|---|---|",
    ]
    for name, value, bound, unit, met in targets.rows:
        lines.append(f"| {name} | {value:.2f} {unit} | < {bound:g} {unit} | "
                     f"{'met' if met else 'NOT met'} |")
    return "\n".join(lines)


def main(argv=None):
    """Run the checks named (all by default); @return: 0 when every target was met."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checks", nargs="*", metavar="CHECK",
                        help=f"the checks to run: {', '.join(CHECKS)} (all by default)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the figures into docs/benchmarks.md (## Bounds)")
    options = parser.parse_args(argv)
    unknown = set(options.checks) - set(CHECKS)
    if unknown:
        parser.error(f"unknown checks: {', '.join(sorted(unknown))}")
    machine = machine_description()
    targets = Targets()
    for name in options.checks or CHECKS:
        print(f"== {name}", flush=True)
        CHECKS[name](targets)
    if options.write_docs:
        replace_section(DOCS, "Bounds", report(targets, machine, shown_command_line(argv),
                                               options.checks or list(CHECKS)))
        print(f"wrote {DOCS}")
    return 0 if targets.all_met else 1


if __name__ == "__main__":
    sys.exit(main())
