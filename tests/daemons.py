"""Start and stop real daemons (ours and TVM's) on loopback for tests and benchmarks.

Every process is started in its own process group and stopped by killing that
group, since TVM's daemons run their service in a child process.
"""

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The tracker's framing integer and magic, as TVM sends them (kept here so
#: this module imports nothing of ours: benchmarks run it against TVM alone).
_INT32 = struct.Struct("<i")
_TRACKER_MAGIC = 0x2F271
_TRACKER_SUMMARY = 6


def free_port(host="127.0.0.1"):
    """@return: a TCP port that was free a moment ago on C{host}."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def child_env(**extra):
    """The environment for a child: our source tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Daemon:
    """A child process whose output is collected line by line."""

    def __init__(self, args, env=None, cwd=None):
        self.args = args
        self.lines = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env or child_env(),
            cwd=cwd,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for raw in self.proc.stdout:
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self):
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern, timeout=30):
        """
        Wait until a line matches C{pattern}.

        @return: the match.
        @raise AssertionError: on timeout or if the process exits first.
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    m = regex.search(line)
                    if m:
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{pattern!r} not seen from {self.args!r}; output:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.2))

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the whole process group, forcefully if it lingers."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        self._reader.join(5)


@contextmanager
def running(args, ready, timeout=60, env=None, cwd=None):
    """Run C{args} until the block ends, once a line matches C{ready}."""
    daemon = Daemon(args, env=env, cwd=cwd)
    try:
        daemon.wait_for(ready, timeout)
        yield daemon
    finally:
        daemon.stop()


def wait_until(predicate, timeout=30, what="condition", interval=0.1):
    """
    Wait until C{predicate()} returns a true value, asking again every
    C{interval} seconds: the one bounded poll of state the tests use.

    @return: that value.
    @raise AssertionError: when C{timeout} seconds pass first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what} "
                                 f"not reached within {timeout}s")
        time.sleep(interval)


def gone(pid):
    """
    @return: whether process C{pid} no longer runs: it does not exist, or is
        a zombie (an orphan whose reaper, PID 1 in some containers, may never
        reap it).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The state follows the command name, which is in parentheses.
            return f.read().rpartition(")")[2].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def twistd(*args):
    """The command line of C{twistd -n}, logging to stdout, with no pid file."""
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()",
            "-n", "--logfile=-", "--pidfile=", *args]


def twistd_with_fd_limit(limit, *args):
    """The command line of C{twistd -n} that first lowers RLIMIT_NOFILE to C{limit}."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (%d, %d)); "
            "from twisted.scripts.twistd import run; run()" % (limit, limit))
    args = twistd(*args)
    args[1:3] = ["-c", code]
    return args


def listen_any(host):
    """@return: the C{--listen} endpoint of port 0 (the system picks a free one) on C{host}."""
    if ":" in host:
        return "tcp6:0:interface=" + host.replace(":", "\\:")
    return f"tcp:0:interface={host}"


def announced_port(daemon, name, timeout=60):
    """@return: the port that C{daemon} announced for C{name} (C{"rpc-tracker http"})."""
    return int(daemon.wait_for(rf"{name} listening on \S+:(\d+)", timeout).group(1))


def start_announced(name, args, env=None):
    """
    Start our daemon C{name} (its C{args} listen on port 0) and read the port
    it announces (no race for a port picked in advance).

    @return: C{(daemon, port)}; the caller stops the daemon.
    """
    daemon = Daemon(args, env=env)
    try:
        port = announced_port(daemon, name)
    except BaseException:
        daemon.stop()
        raise
    return daemon, port


def listen_on(port, host="127.0.0.1"):
    """@return: the C{--listen} endpoint of C{port} on C{host}, to restart a daemon where it was."""
    return listen_any(host).replace(":0:", f":{port}:", 1)


@contextmanager
def announced(name, args, env=None):
    """
    Run our daemon C{name} listening on port 0 and read the port it announces
    (no race for a port picked in advance); yields C{(daemon, port)}.
    """
    daemon, port = start_announced(name, args, env)
    try:
        yield daemon, port
    finally:
        daemon.stop()


@contextmanager
def our_tracker(*extra, host="127.0.0.1"):
    """Our tracker on a port the system picks; yields C{(daemon, port)}."""
    with announced("rpc-tracker", twistd("rpc-tracker", "--listen", listen_any(host), *extra)) \
            as (daemon, port):
        yield daemon, port


#: What a daemon prints when the port picked for it was taken meanwhile:
#: TVM's daemons (tracker, proxy, server) and ours (twistd's fatal bind).
BIND_FAILED = r"cannot bind to any port in|CannotListenError|Couldn't listen"


@contextmanager
def on_free_port(make_args, ready, host="127.0.0.1", attempts=5, env=None, timeout=60):
    """
    Run a daemon on a port picked free in advance, picking again (up to
    C{attempts} times) when another process took it first and the daemon
    exits on the failed bind.

    For daemons that cannot listen on port 0 and announce the port: TVM's
    (its server reports the port it was given to the tracker, its tracker and
    proxy take a range) and our proxy's websocket port (0 turns it off).

    @param make_args: called with the port; @return: the command line.
    @param ready: the pattern of the line that says the daemon serves.
    @return: a context manager yielding C{(daemon, port)}.
    """
    for attempt in range(1, attempts + 1):
        port = free_port(host)
        daemon = Daemon(make_args(port), env=env)
        try:
            daemon.wait_for(ready, timeout)
        except AssertionError:
            daemon.stop()
            if attempt < attempts and re.search(BIND_FAILED, daemon.output):
                continue
            raise
        break
    try:
        yield daemon, port
    finally:
        daemon.stop()


@contextmanager
def tvm_tracker(host="127.0.0.1"):
    """TVM's tracker on a free port; yields C{(daemon, port)}."""
    def args(port):
        return [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host,
                "--port", str(port), "--port-end", str(port + 1)]

    with on_free_port(args, r"bind to \S+:\d+", host) as (daemon, port):
        yield daemon, port


@contextmanager
def our_proxy(*extra, host="127.0.0.1", env=None):
    """
    Our proxy on a port the system picks, websocket off unless C{--web-port}
    is in C{extra}; yields C{(daemon, port)}.
    """
    # --host still names the interface of the websocket port, when there is one.
    args = twistd("rpc-proxy", "--host", host, "--listen", listen_any(host))
    if "--web-port" not in extra:
        args += ["--web-port", "0"]
    with announced("rpc-proxy", args + list(extra), env=env) as (daemon, port):
        yield daemon, port


@contextmanager
def tvm_proxy(*extra, host="127.0.0.1"):
    """TVM's proxy on a free port with its web port off; yields C{(daemon, port)}."""
    def args(port):
        return [sys.executable, "-m", "tvm.exec.rpc_proxy", "--host", host,
                "--port", str(port), "--port-end", str(port + 1), "--web-port", "0", *extra]

    # Logged once the port listens and the handler runs (the bind line comes before listen()).
    with on_free_port(args, r"RPCProxy: Websock port bind to", host) as (daemon, port):
        yield daemon, port


@contextmanager
def tvm_rpc_server(*extra, host="127.0.0.1"):
    """
    TVM's rpc_server on a free port (pass C{--tracker}, C{--key} in C{extra});
    yields C{(daemon, port)} once it listens.
    """
    def args(port):
        return [sys.executable, "-m", "tvm.exec.rpc_server", "--host", host,
                "--port", str(port), "--port-end", str(port + 1), *extra]

    with on_free_port(args, r"bind to \S+:\d+", host) as (daemon, port):
        # TVM logs "bind to" before listen(): connect only once it listens.
        wait_listening(port)
        yield daemon, port


@contextmanager
def tvm_rpc_server_through(proxy_port, key, *extra, host="127.0.0.1"):
    """
    TVM's rpc_server connecting out to the proxy at C{host}:C{proxy_port} as
    C{key} (C{--through-proxy}); yields the L{Daemon} at once (TVM's server
    logs nothing when it reaches the proxy: wait on the proxy's log).
    """
    daemon = Daemon([sys.executable, "-m", "tvm.exec.rpc_server", "--host", host,
                     "--port", str(proxy_port), "--through-proxy", "--key", key, *extra])
    try:
        yield daemon
    finally:
        daemon.stop()


@contextmanager
def our_rpc_server(*extra, host="127.0.0.1", env=None):
    """
    Our rpc-server (C{twistd -n rpc-server}) on a port the system picks;
    yields C{(daemon, port)} once it listens.
    """
    args = twistd("rpc-server", "--listen", listen_any(host), *extra)
    with announced("rpc-server", args, env=env) as (daemon, port):
        yield daemon, port


def listening_ports():
    """
    @return: the TCP ports in the LISTEN state on this machine (from
        C{/proc/net/tcp} and C{tcp6}; no connection made, which a server
        with a listen backlog of 1 would notice).
    """
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A":
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(port, timeout=30):
    """
    Wait until TCP C{port} listens (TVM's server logs "bind to" before it
    calls listen(): a connection in between is refused).
    """
    wait_until(lambda: port in listening_ports(), timeout, what=f"a listener on port {port}")


def recv_exactly(sock, size):
    """
    Read exactly C{size} bytes from C{sock}.

    @raise ConnectionError: when the peer closes first.
    """
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)


def stream_to_slow_reader(sender, reader, block, total, on_pause=None):
    """
    Send C{total} bytes (C{block} again and again) on C{sender} from a thread,
    as fast as they go, then shut its sending side; read them on C{reader},
    more slowly: a 2 ms pause every 64 reads (rate pacing, so the reader
    stays the slower side), where C{on_pause} is called (to sample memory).
    Both sockets get 256 KiB buffers, so little of the stream hides in them.

    @return: C{(received, sent)}: the bytes read, and whether the sender
        finished within 60 s of the last read.
    """
    for sock in (sender, reader):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)

    def send():
        view = memoryview(block)
        for _ in range(total // len(block)):
            sender.sendall(view)
        sender.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    received = reads = 0
    while received < total:
        chunk = reader.recv(256 * 1024)
        assert chunk, f"end of file after {received} of {total} bytes"
        received += len(chunk)
        reads += 1
        if reads % 64 == 0:
            time.sleep(0.002)
            if on_pause is not None:
                on_pause()
    thread.join(60)
    return received, not thread.is_alive()


def tracker_summary(port, host="127.0.0.1"):
    """Ask a tracker (ours or TVM's) for its summary over a raw socket, in TVM's framing."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(_INT32.pack(_TRACKER_MAGIC))
        assert recv_exactly(sock, 4) == _INT32.pack(_TRACKER_MAGIC)
        body = json.dumps([_TRACKER_SUMMARY]).encode()
        sock.sendall(_INT32.pack(len(body)) + body)
        (length,) = _INT32.unpack(recv_exactly(sock, 4))
        code, summary = json.loads(recv_exactly(sock, length))
        assert code == 0
        return summary


def wait_summary(port, predicate, timeout=30, host="127.0.0.1"):
    """Poll the tracker until C{predicate(summary)} holds; @return: the summary."""
    last = [None]

    def probe():
        try:
            last[0] = tracker_summary(port, host)
        except (OSError, AssertionError):
            last[0] = None
            return None
        return last[0] if predicate(last[0]) else None

    return wait_until(probe, timeout, what=lambda: f"the wanted summary (last: {last[0]})")


def free_servers(summary, key):
    """@return: how many servers of C{key} the tracker C{summary} counts as free."""
    return summary["queue_info"].get(key, {}).get("free", 0)
