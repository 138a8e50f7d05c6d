"""TVM's rpc_server flags on a real ``twistd rpc-server`` (``--no-fork``,
``--load-library``), its per-session log line, its quiet default log and the
rotation of its log file (``--log-size``, ``--log-keep``).

Each test starts real daemons on loopback and drives them with our client
(``tests/interop_client.py``) and TVM's (``tests/tvm_client.py``) in child
processes.
"""

import re
import shutil
import subprocess

import pytest

from tests.daemons import (
    Daemon,
    free_servers,
    our_proxy,
    our_tracker,
    twistd,
    wait_summary,
    wait_until,
)
from tests.test_interop_server import our_server, run_client
from tests.test_interop_tvm_client import tvm_client

pytestmark = pytest.mark.system

INIT = ("--init", "tests.server_init_sample")


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """A tiny shared library built with the system's C compiler."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.fail("a C compiler (cc) is needed to build the --load-library test library")
    folder = tmp_path_factory.mktemp("library")
    source = folder / "answer.c"
    source.write_text("int tvm_rpc_test_answer(void) { return 42; }\n")
    path = folder / "libanswer.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(path), str(source)], check=True,
                   timeout=60)
    return str(path)


def both_clients(port, name, *args, tvm=None):
    """@return: the results of calling C{name} with our client and with TVM's."""
    ours = run_client("call", "127.0.0.1", port, "dev", name, *args)
    assert ours["ok"] is True, ours
    results = [ours["result"]]
    if tvm is not None:
        theirs = tvm_client("call", "direct", "127.0.0.1", port, "dev", name, *args)
        assert theirs["ok"] is True, theirs
        results.append(theirs["result"])
    return results


def test_no_fork_spawns_each_worker(tvm):
    """
    TVM's --no-fork: each session still runs in its own worker process, and
    that worker is a fresh interpreter (spawned with its own command line),
    not a fork of the fork server; for both session protocols.
    """
    daemon, port = our_server("--key", "dev", "--no-fork", *INIT)
    try:
        pids = both_clients(port, "test.pid", tvm=tvm)
        lines = both_clients(port, "test.cmdline", tvm=tvm)
        daemon.wait_for(r"fork server \d+ ready \(workers spawned, --no-fork\)")
    finally:
        daemon.stop()
    assert daemon.proc.pid not in pids and len(set(pids)) == 2, pids
    for line in lines:
        assert "tvm_rpc.server.worker --spare-fd" in line, line


def test_forked_workers_by_default():
    """Without --no-fork the worker is a fork: the fork server's command line."""
    daemon, port = our_server("--key", "dev", *INIT)
    try:
        [line] = both_clients(port, "test.cmdline")
        daemon.wait_for(r"fork server \d+ ready \(workers forked; --no-fork spawns them")
    finally:
        daemon.stop()
    assert "tvm_rpc.server.worker --control-fd" in line, line


@pytest.mark.parametrize("mode", [(), ("--no-fork",), ("--in-process",)])
def test_load_library_in_every_session(tvm, library, mode):
    """--load-library maps the library into the process that serves each session."""
    daemon, port = our_server("--key", "dev", "--load-library", library, *mode, *INIT)
    try:
        results = both_clients(port, "test.mapped", library,
                               tvm=None if mode == ("--in-process",) else tvm)
    finally:
        daemon.stop()
    assert results and all(result is True for result in results), results


def test_missing_library_stops_the_server_at_start(tmp_path):
    """A --load-library file that is not there is named at start, before any session."""
    daemon = Daemon(twistd("rpc-server", "--listen", "tcp:0:interface=127.0.0.1",
                           "--load-library", str(tmp_path / "missing.so")))
    try:
        daemon.wait_for(r"cannot find library .*missing\.so", 60)
        assert daemon.proc.wait(60) != 0
    finally:
        daemon.stop()


#: The session line: protocol, peer, how it ended, key, worker, duration, bytes.
SESSION_LINE = (r"(?P<protocol>tvm_rpc|tvm) session for 127\.0\.0\.1:\d+ ended: (?P<how>[^(]+) "
                r"\(key dev, worker (?P<pid>\d+), (?P<seconds>[\d.]+)s, (?P<received>\d+) bytes in, "
                r"(?P<sent>\d+) bytes out\)")
#: What Twisted logs of its own, which the default level leaves out.
TWISTED_INTERNALS = ("[-]", "connection established", "Main loop terminated",
                     "Starting factory", "Stopping factory")


def test_one_line_per_session_for_both_protocols(tvm):
    """Each session leaves one line with its fields, and Twisted's internals stay out."""
    daemon, port = our_server("--key", "dev", *INIT)
    try:
        [our_pid, tvm_pid] = both_clients(port, "test.pid", tvm=tvm)
        ours = daemon.wait_for(SESSION_LINE.replace("(?P<protocol>tvm_rpc|tvm)", "tvm_rpc"))
        theirs = daemon.wait_for(SESSION_LINE.replace("(?P<protocol>tvm_rpc|tvm)", "tvm"))
    finally:
        daemon.stop()
    assert int(ours["pid"]) == our_pid and int(theirs["pid"]) == tvm_pid
    for line in (ours, theirs):
        # The handshake alone is more than 16 bytes each way, and the call more.
        assert int(line["received"]) > 16 and int(line["sent"]) > 16, line.group(0)
        assert float(line["seconds"]) >= 0
        assert line["how"] in ("the client went away", "closed"), line.group(0)
    session_lines = [line for line in daemon.lines if "session" in line]
    assert len(session_lines) == 2, "\n".join(session_lines)
    for text in TWISTED_INTERNALS:
        assert text not in daemon.output, daemon.output


def test_no_internals_from_tracker_proxy_and_registering_servers():
    """
    A tracker, a proxy in tracker mode and two servers registering with them
    (one directly, one through the proxy): after a session on each,
    no daemon's output holds Twisted's own lines (its factories log under our
    namespaces, so only C{noisy = False} keeps them out).
    """
    with our_tracker() as (tracker, tracker_port):
        with our_proxy("--tracker", f"127.0.0.1:{tracker_port}") as (proxy, proxy_port):
            servers = [
                Daemon(twistd("rpc-server", "--listen", "tcp:0:interface=127.0.0.1",
                              "--tracker", f"127.0.0.1:{tracker_port}", "--key", "dev")),
                Daemon(twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                              "--port", str(proxy_port), "--key", "dev")),
            ]
            try:
                wait_summary(tracker_port, lambda summary: free_servers(summary, "dev") >= 2,
                             timeout=60)
                # Two at once: the tracker grants both servers.
                report = run_client("many", "127.0.0.1", tracker_port, "dev", 2)
                assert report["ok"] is True and len(report["paths"]) == 2, report
                servers[0].wait_for(r"tvm_rpc session for 127\.0\.0\.1:\d+ ended")
                servers[1].wait_for(r"tvm_rpc session for a client through proxy .* ended")
            finally:
                for server in servers:
                    server.stop()
    for daemon in (tracker, proxy, *servers):
        for text in TWISTED_INTERNALS:
            assert text not in daemon.output, daemon.output


def test_verbose_shows_more():
    """--verbose lets Twisted's lines and the session's start (a debug line) through."""
    daemon, port = our_server("--key", "dev", "--verbose", *INIT)
    try:
        both_clients(port, "test.add", "1", "2")
        daemon.wait_for(r"tvm_rpc session for 127\.0\.0\.1:\d+ \(timeout None\)")
        daemon.wait_for(SESSION_LINE)
        daemon.wait_for(r"connection established")
    finally:
        daemon.stop()


def log_files(folder):
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("server.log"))


def test_log_keep_bounds_the_rotated_files(tmp_path):
    """--log-size rotates twistd's --logfile; only --log-keep rotated files stay."""
    logfile = tmp_path / "server.log"
    daemon = Daemon([*twistd()[:3], "-n", f"--logfile={logfile}", "--pidfile=", "rpc-server",
                     "--listen", "tcp:0:interface=127.0.0.1", "--key", "dev", *INIT,
                     "--log-size", "100", "--log-keep", "2"])
    try:
        def announced():
            for path in tmp_path.iterdir():
                match = re.search(r"rpc-server listening on \S+:(\d+)", path.read_text())
                if match:
                    return int(match.group(1))
            return None

        port = wait_until(announced, 60, "the listening line in the log files")
        # Each session writes a line longer than --log-size: one rotation each.
        for _ in range(4):
            assert run_client("call", "127.0.0.1", port, "dev", "test.add", "1", "2")["ok"]
        wait_until(lambda: len(re.findall(SESSION_LINE, "".join(
            (tmp_path / name).read_text() for name in log_files(tmp_path)))) >= 2, 60,
            "two session lines in the kept files")
    finally:
        daemon.stop()
    assert log_files(tmp_path) == ["server.log", "server.log.1", "server.log.2"], \
        log_files(tmp_path)


def test_one_line_per_session_in_process():
    """--in-process sessions leave the same line, served 'in process'."""
    daemon, port = our_server("--key", "dev", "--in-process", *INIT)
    try:
        both_clients(port, "test.add", "1", "2")
        line = daemon.wait_for(r"tvm_rpc session for 127\.0\.0\.1:\d+ ended: closed \(key dev, "
                               r"in process, [\d.]+s, (\d+) bytes in, (\d+) bytes out\)")
    finally:
        daemon.stop()
    assert int(line.group(1)) > 16 and int(line.group(2)) > 16, line.group(0)
