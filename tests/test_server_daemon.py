"""``twistd -n rpc-server`` as a real process, with our tracker, over loopback.

The sessions here run the line-based stand-in protocol of
``tests/standin_session.py`` so these tests exercise the plumbing alone:
registration, handshake, worker processes, timeouts, crashes and concurrency.
"""

import os
import re
import socket
import threading

import pytest

from tests.daemons import (
    Daemon,
    free_port,
    gone,
    listen_any,
    listen_on,
    our_tracker,
    start_announced,
    twistd,
    wait_until,
)
from tvm_rpc.protocol.constants import RPC_CODE_MISMATCH, RPC_CODE_SUCCESS, TrackerCode
from tvm_rpc.protocol.flavour import client_key, reply_is_marked
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame, encode_magic
from tvm_rpc.protocol.handshake import ReplyDecoder, encode_handshake

pytestmark = pytest.mark.system

STANDIN = "tests.standin_session:make"
#: Bound on every blocking socket operation, so a broken server fails, never hangs.
IO_TIMEOUT = 20


def our_server(*extra):
    """
    Our rpc-server (C{twistd -n}) on a port the system picks.

    @return: C{(daemon, port)} once it listens; the caller stops it.
    """
    return start_announced("rpc-server",
                           twistd("rpc-server", "--listen", listen_any("127.0.0.1"), *extra))


class TrackerLink:
    """A blocking tracker connection, for driving the tracker from a test."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.decoder = FrameDecoder(expect_magic=True)
        self.values = []
        self.sock.sendall(encode_magic())

    def call(self, message):
        self.sock.sendall(encode_frame(message))
        while not self.values:
            data = self.sock.recv(65536)
            assert data, "tracker closed the connection"
            self.values += self.decoder.feed(data)
        return self.values.pop(0)

    def close(self):
        self.sock.close()


def allocate(tracker_port, key):
    """@return: C{(host, port, matchkey)} from the tracker."""
    link = TrackerLink(tracker_port)
    try:
        code, (host, port, matchkey) = link.call([TrackerCode.REQUEST, key, "test", 1])
        assert code == 0
        return host, port, matchkey
    finally:
        link.close()


def free_count(tracker_port, key):
    link = TrackerLink(tracker_port)
    try:
        _, summary = link.call([TrackerCode.SUMMARY])
        return summary["queue_info"].get(key, {}).get("free", 0)
    finally:
        link.close()


class LineSession:
    """A session with the stand-in protocol over a raw socket."""

    def __init__(self, port, matchkey, timeout=None, marked=True):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        key = client_key(matchkey, timeout) if marked else "client:" + matchkey
        self.sock.sendall(encode_handshake(key))
        decoder = ReplyDecoder()
        while not decoder.done:
            data = self.sock.recv(4096)
            if not data:
                break
            decoder.feed(data)
        self.code = decoder.code
        self.key = decoder.key
        self.buffer = decoder.rest

    def ask(self, line):
        self.sock.sendall(line.encode() + b"\n")
        return self.read_line()

    def read_line(self):
        while b"\n" not in self.buffer:
            data = self.sock.recv(4096)
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()

    def send(self, line):
        self.sock.sendall(line.encode() + b"\n")

    def wait_closed(self):
        """@return: True once the server closed the connection."""
        while True:
            try:
                if not self.sock.recv(4096):
                    return True
            except ConnectionResetError:
                return True

    def close(self):
        self.sock.close()


@pytest.fixture(scope="module")
def tracked_server():
    """Our tracker and one rpc-server (two session slots) registered as ``plumb``."""
    with our_tracker() as (tracker, tracker_port):
        server, port = our_server(
            "--tracker", f"127.0.0.1:{tracker_port}",
            "--key", "plumb", "--session-factory", STANDIN, "--max-sessions", "2",
        )
        try:
            server.wait_for(r"registered plumb with tracker")
            yield server, tracker_port, port
        finally:
            server.stop()
        assert server.proc.returncode is not None


def session_via_tracker(tracker_port, timeout=None):
    _, port, matchkey = allocate(tracker_port, "plumb")
    session = LineSession(port, matchkey, timeout)
    assert session.code == RPC_CODE_SUCCESS
    return session


def test_register_and_serve_in_a_worker(tracked_server):
    """The server registers; a session runs in another process; the server re-registers."""
    server, tracker_port, port = tracked_server
    session = session_via_tracker(tracker_port)
    assert reply_is_marked(session.key)
    assert session.key.startswith("server:plumb ")
    pid = int(session.ask("pid"))
    assert pid != server.proc.pid
    assert session.ask("echo hello there") == "hello there"
    session.close()
    for _ in range(3):
        again = session_via_tracker(tracker_port)
        assert int(again.ask("pid")) != pid
        again.close()


def test_wrong_matchkey_mismatch(tracked_server):
    """A client presenting a stale or made-up matchkey gets MISMATCH."""
    server, _, port = tracked_server
    session = LineSession(port, "plumb:0.123")
    assert session.code == RPC_CODE_MISMATCH
    assert session.wait_closed()
    server.wait_for(r"mismatch key from 127\.0\.0\.1")


def test_timeout_kills_hung_call(tracked_server):
    """-timeout=N kills a hung session's worker; the server then serves again."""
    server, tracker_port, _ = tracked_server
    session = session_via_tracker(tracker_port, timeout=1)
    pid = int(session.ask("pid"))
    session.send("hang")
    assert session.wait_closed()
    server.wait_for(r"exceeded its 1\.0s timeout")
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    again = session_via_tracker(tracker_port)
    assert again.ask("echo alive") == "alive"
    again.close()


def wait_gone(pid, timeout=5):
    """Wait (bounded) until process C{pid} no longer exists."""
    wait_until(lambda: gone(pid), timeout, what=f"the end of process {pid}")


def test_client_gone_mid_call_frees_the_device(tracked_server):
    """A client that leaves in the middle of a call ends its worker at once."""
    server, tracker_port, _ = tracked_server
    session = session_via_tracker(tracker_port)
    pid = int(session.ask("pid"))
    session.send("hang")
    session.close()
    wait_gone(pid)
    server.wait_for(r"ended: the client went away \(key \S+, worker %d," % pid)
    again = session_via_tracker(tracker_port)
    assert again.ask("echo alive") == "alive"
    again.close()


def one_server(*extra, key="solo"):
    """Our rpc-server with the stand-in sessions on a free port; @return: C{(daemon, port)}."""
    server, port = our_server("--key", key, "--session-factory", STANDIN, *extra)
    try:
        server.wait_for(r"fork server \d+ ready")
    except BaseException:
        server.stop()
        raise
    return server, port


def test_silent_client_after_handshake_dropped():
    """A client that never sends its session's first message is dropped."""
    server, port = one_server("--handshake-timeout", "1")
    try:
        silent = LineSession(port, "solo")
        assert silent.code == RPC_CODE_SUCCESS
        assert silent.wait_closed()
        server.wait_for(r"ended: the client never started its session")
        busy = LineSession(port, "solo")
        assert busy.ask("echo alive") == "alive"
        busy.close()
    finally:
        server.stop()


def test_max_session_time_frees_a_frozen_client():
    """--max-session-time ends a session whose client asked for no timeout."""
    server, port = one_server("--max-session-time", "1.5")
    try:
        frozen = LineSession(port, "solo")
        pid = int(frozen.ask("pid"))
        frozen.send("hang")
        assert frozen.wait_closed()
        server.wait_for(r"exceeded its 1\.5s timeout; killing its worker")
        wait_gone(pid)
        again = LineSession(port, "solo")
        assert again.ask("echo alive") == "alive"
        again.close()
    finally:
        server.stop()


def test_unreachable_tracker_said_once_per_streak():
    """
    A server whose tracker is down says so once, with the address and the
    reason, then once that it reached the tracker again when it comes up.
    """
    tracker_port = free_port()
    server, _ = one_server("--tracker", f"127.0.0.1:{tracker_port}", key="patient")
    try:
        server.wait_for(rf"cannot reach tracker 127\.0\.0\.1:{tracker_port}: "
                        rf"connection refused; retrying in [0-9.]+ s")
        tracker = start_announced(
            "rpc-tracker", twistd("rpc-tracker", "--listen", listen_on(tracker_port)))[0]
        try:
            server.wait_for(rf"reached tracker 127\.0\.0\.1:{tracker_port} again")
            server.wait_for(r"registered patient with tracker")
            assert server.output.count("cannot reach tracker") == 1, server.output
            assert "Scheduling retry" not in server.output
        finally:
            tracker.stop()
    finally:
        server.stop()


def test_offered_to_the_tracker_once_ready():
    """The server registers only once its fork server can fork a worker at once."""
    with our_tracker() as (_, tracker_port):
        server, _ = one_server("--tracker", f"127.0.0.1:{tracker_port}", key="late")
        try:
            server.wait_for(r"registered late with tracker")
            lines = server.lines
            ready = next(i for i, line in enumerate(lines) if "fork server" in line and "ready" in line)
            registered = next(i for i, line in enumerate(lines) if "registered late" in line)
            assert ready < registered
        finally:
            server.stop()


@pytest.mark.parametrize("how", ["crash", "segv"])
def test_crashing_worker_leaves_server_serving(tracked_server, how):
    """os._exit or a segfault in a session ends only that session."""
    server, tracker_port, _ = tracked_server
    session = session_via_tracker(tracker_port)
    session.send(how)
    assert session.wait_closed()
    server.wait_for(r"died \(exit code (7|None), signal (None|11)\); the server goes on")
    again = session_via_tracker(tracker_port)
    assert again.ask("echo still here") == "still here"
    again.close()
    assert server.proc.poll() is None


def test_many_concurrent_sessions(tracked_server):
    """Many clients at once all get served, two sessions at a time."""
    _, tracker_port, _ = tracked_server
    results = []
    errors = []

    def one(index):
        try:
            session = session_via_tracker(tracker_port)
            results.append(session.ask(f"echo {index}"))
            session.close()
        except Exception as e:  # collected and reported below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert sorted(results, key=int) == [str(i) for i in range(8)]


@pytest.fixture(scope="module")
def direct_server():
    """A server without a tracker, key ``dev``, short handshake timeout."""
    server, port = our_server("--key", "dev", "--session-factory", STANDIN,
                              "--handshake-timeout", "1")
    try:
        yield server, port
    finally:
        server.stop()


def test_silent_peer_never_blocks(direct_server):
    """A connection that says nothing is dropped; others are served meanwhile."""
    server, port = direct_server
    silent = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    session = LineSession(port, "dev")
    assert session.code == RPC_CODE_SUCCESS
    assert session.ask("echo ok") == "ok"
    session.close()
    try:
        assert silent.recv(10) == b""
    except ConnectionResetError:
        pass
    server.wait_for(r"no handshake within 1\.0s")
    silent.close()


def test_direct_key_rule(direct_server):
    """Without a tracker, ``client:<key>`` is accepted and nothing else."""
    _, port = direct_server
    assert LineSession(port, "other").code == RPC_CODE_MISMATCH
    session = LineSession(port, "dev", timeout=30)
    assert session.code == RPC_CODE_SUCCESS
    session.close()


def run_client(*args):
    """Run our client in a child process; @return: its JSON report."""
    import json
    import subprocess
    import sys

    from tests.daemons import ROOT, child_env

    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "interop_client.py"), *map(str, args)],
        capture_output=True, timeout=120, env=child_env(), cwd=str(ROOT),
    )
    lines = [line for line in completed.stdout.decode().splitlines() if line.startswith("{")]
    assert lines, completed.stdout.decode() + completed.stderr.decode()
    return json.loads(lines[-1])


def test_real_session_timeout():
    """A hung call in a real session ends with SessionTimeout; the server serves on."""
    server, port = our_server("--key", "hang", "--init", "tests.server_init_sample:setup")
    try:
        report = run_client("hang", "127.0.0.1", port, "hang", 2)
        assert report["ok"] is False
        assert report["error_type"] == "SessionTimeout", report
        assert "timed out" in report["message"]
        server.wait_for(r"exceeded its 2\.0s timeout")
        again = LineSession(port, "hang")
        assert again.code == RPC_CODE_SUCCESS
        again.close()
    finally:
        server.stop()


def test_through_our_proxy():
    """--through-proxy: sessions through our proxy, one after another."""
    from tests.daemons import our_proxy

    with our_proxy() as (_, proxy_port):
        server = Daemon(
            twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                   "--port", str(proxy_port), "--key", "behind")
        )
        try:
            server.wait_for(r"waiting at proxy 127\.0\.0\.1:%d as behind" % proxy_port)
            for _ in range(2):
                assert run_client("connect", "127.0.0.1", proxy_port, "behind") == {"ok": True}
            ended = (r"tvm_rpc session for a client through proxy 127\.0\.0\.1:%d ended: .* "
                     r"\(key behind, worker \d+," % proxy_port)
            wait_until(lambda: len(re.findall(ended, server.output)) == 2, 30,
                       lambda: f"two session lines in:\n{server.output}")
        finally:
            server.stop()


def test_many_concurrent_real_sessions():
    """One client reactor opens many sessions at once through the tracker."""
    with our_tracker() as (_, tracker_port):
        server, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}",
                               "--key", "many", "--max-sessions", "4")
        try:
            server.wait_for(r"registered many with tracker")
            report = run_client("many", "127.0.0.1", tracker_port, "many", 10)
            assert report["ok"] is True, report
            paths = report["paths"]
            assert [p.rsplit("/", 1)[1] for p in paths] == [f"f{i}" for i in range(10)]
            # Every session had a work directory of its own.
            assert len({p.rsplit("/", 2)[1] for p in paths}) == 10
        finally:
            server.stop()


def test_reregisters_when_the_tracker_returns():
    """When the tracker restarts on its port, the server registers again within seconds."""
    tracker, tracker_port = start_announced(
        "rpc-tracker", twistd("rpc-tracker", "--listen", listen_any("127.0.0.1")))
    server = None
    try:
        server, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}",
                               "--key", "phoenix", "--session-factory", STANDIN)
        server.wait_for(r"registered phoenix with tracker")
        tracker.stop()
        server.wait_for(r"lost tracker 127\.0\.0\.1:%d; reconnecting" % tracker_port)
        tracker = Daemon(twistd("rpc-tracker", "--listen", listen_on(tracker_port)))
        tracker.wait_for(r"rpc-tracker listening on")
        # The new tracker knows nothing; the server's backoff brings it back.
        wait_until(lambda: free_count(tracker_port, "phoenix") == 1, 20,
                   what=lambda: f"registered again; server output:\n{server.output}")
        session = session_via_tracker_key(tracker_port, "phoenix")
        assert session.ask("echo back") == "back"
        session.close()
    finally:
        if server is not None:
            server.stop()
        tracker.stop()


def session_via_tracker_key(tracker_port, key):
    _, port, matchkey = allocate(tracker_port, key)
    session = LineSession(port, matchkey)
    assert session.code == RPC_CODE_SUCCESS
    return session


def test_request_and_run_survives_a_lost_server():
    """request_and_run retries on a server again when the worker dies under it."""
    with our_tracker() as (_, tracker_port):
        server, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}",
                               "--key", "retry", "--init", "tests.server_init_sample")
        try:
            server.wait_for(r"registered retry with tracker")
            report = run_client("retry", "127.0.0.1", tracker_port, "retry")
            assert report == {"ok": True, "result": "finished", "attempts": 2}
            server.wait_for(r"died \(exit code 9, signal None\)")
        finally:
            server.stop()


def test_stop_leaves_nothing_behind():
    """Stopping the server withdraws it from the tracker and ends its fork server and workers."""
    with our_tracker() as (_, tracker_port):
        server, _ = our_server("--tracker", f"127.0.0.1:{tracker_port}",
                               "--key", "bye", "--session-factory", STANDIN)
        try:
            server.wait_for(r"registered bye with tracker")
            fork_server = int(server.wait_for(r"fork server (\d+) ready").group(1))
            session = session_via_tracker_key(tracker_port, "bye")
            worker = int(session.ask("pid"))
        finally:
            server.stop()
        assert session.wait_closed()
        session.close()
        for pid in (fork_server, worker):
            wait_gone(pid)
        assert free_count(tracker_port, "bye") == 0


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc and RLIMIT_NOFILE")
def test_out_of_file_descriptors_recovers():
    """A server at its descriptor limit refuses connections (the shared
    guarded port of tvm_rpc.daemon) and serves again once connections close.
    That it does not spin meanwhile is measured by C{bench/bounds.py fd-cpu}."""
    from tests.daemons import child_env, twistd_with_fd_limit

    args = twistd_with_fd_limit(
        40, "rpc-server", "--listen", listen_any("127.0.0.1"), "--key", "dev", "--in-process",
        "--session-factory", STANDIN, "--handshake-timeout", "60")
    server, port = start_announced("rpc-server", args, env=child_env())
    held = []
    try:
        # 60 connections exceed the 40 descriptors; the rest wait in the
        # listen backlog (50), so no connect blocks.
        for _ in range(60):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT))
            if "out of file descriptors" in server.output:
                break
        server.wait_for(r"out of file descriptors on .*EMFILE")
        for sock in held:
            sock.close()
        held.clear()

        def served():
            try:
                session = LineSession(port, "dev")
                try:
                    return session.code == RPC_CODE_SUCCESS and session.ask("echo ok") == "ok"
                finally:
                    session.close()
            except OSError:
                return False

        wait_until(served, 15, what="the server serving again")
        server.wait_for(r"accepting connections on .* again")
    finally:
        for sock in held:
            sock.close()
        server.stop()
