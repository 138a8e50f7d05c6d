"""Chaos soak: clients keep cycling while servers, the proxy and the tracker are killed.

Usage (from the repository root, with apache-tvm installed)::

    python bench/chaos.py [--seconds 120] [--warmup 5] [--loops 32] [--tvm-loops 4]
                          [--direct 6] [--proxied 3] [--worker-kills 0.25] [--seed N]
                          [--write-docs] [--json FILE]

On loopback it starts our tracker (``twistd rpc-tracker``), our proxy in
tracker mode (``twistd rpc-proxy --tracker ... --web-port 0``) and, all under
one key: ``--direct`` of our servers registered with the tracker
(``twistd rpc-server --tracker ... --key K``), ``--proxied`` of ours behind the
proxy (``--through-proxy``) and one of TVM's (``python -m tvm.exec.rpc_server
--tracker ... --key K``). Two of the direct servers and one behind the proxy
are never killed (the controls: their memory and descriptors are compared
from start to end).

Two kinds of client loops run at once, each doing request -> call -> close
(the call is ``tvm.rpc.server.workpath``, which every server has):

- ``--loops`` coroutines of our Deferred client on one reactor in this
  process (``connect_tracker``, ``TrackerSession.request(K, timeout=20)``,
  ``get_function``, ``close``); it is served by every server too, ours (our
  session protocol) and TVM's (TVM's own, through the client's TVM engine);
- ``--tvm-loops`` loops of TVM's own client (``tvm.rpc.connect_tracker(...)
  .request(K)``), one child process each (``bench/chaos_tvm_client.py``): it
  is served by every server, ours (which speak TVM's protocol to TVM's
  clients) and TVM's.

Every cycle has a 30 s watchdog: one without an answer by then counts as hung
(ours are cancelled and the loop goes on; a TVM loop that hangs is replaced
by a new process).

After a warm-up (loops without chaos), the loops stop, the daemons settle
and their process trees' RSS and descriptors are taken ("start"). Then, for
``--seconds``, the loops run while a chaos thread kills (SIGKILL, the whole
process group) a random server other than the controls every 2-6 s and
restarts it on the same port 0.3-2 s later (or, for ``--worker-kills`` of the
picks of one of our servers, kills the worker serving a session on it
instead); once, at 35 % of the run, it
kills the tracker and restarts it on its port 1 s later, and once, at 65 %, the
proxy. Everyone registers again by themselves: the script checks the logs
(each live server of ours logs ``registered`` again, the proxy reports itself
and its servers again). Daemons are sampled every 0.5 s (peak).

At the end the chaos stops, the loops end, and after a settle period the
tracker's SUMMARY must list every live server free, no request pending and
no lease; each of our servers must be back to its idle process count (the
server, its fork server, a spare worker); no process of a killed daemon may
be left. Then "end" is sampled.

A failed cycle is classified by time: inside a restart window (from the
tracker's or proxy's kill to 10 s after it is back), "server killed" (a
connection-type error while a server was killed during the cycle, +-1 s), or
unexplained. ``--write-docs`` writes the ``## Chaos`` section of
``docs/benchmarks.md``.
"""

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from bench.common import (  # noqa: E402
    DOCS,
    MiB,
    Daemon,
    child_env,
    free_port,
    machine_description,
    machine_markdown,
    replace_section,
    shown_command_line,
    tree_fds,
    tree_rss,
    twistd,
)
from tests.daemons import tracker_summary  # noqa: E402
from tvm_rpc.server.pool import KEEP_WORKER_SECONDS  # noqa: E402

HOST = "127.0.0.1"
KEY = "chaos"
WATCHDOG = 30.0
#: Seconds after a restarted tracker or proxy is back during which failures
#: are put down to its restart.
WINDOW_AFTER = 10.0
#: A failure within this many seconds of a server kill (during the cycle) is
#: put down to the kill.
KILL_SLACK = 1.0
#: How long a failed loop of ours waits before its next cycle.
PAUSE_AFTER_FAILURE = 0.5
#: Error types that a server dying under a session (or just before) produces.
CONNECTION_ERRORS = {
    "SessionClosed", "SessionLostAtStart", "ConnectionLost", "ConnectionDone",
    "ConnectionRefusedError", "RequestFailed", "NotAnRpcServer", "KeyMismatch",
    "TVMError", "RuntimeError", "ConnectionResetError", "OSError",
}


def now():
    """Wall-clock seconds (shared with the TVM client processes)."""
    return time.time()


class Managed:
    """
    A daemon the run starts, kills and restarts; keeps the figures of each
    of its instances (processes).

    @ivar role: ``tracker``, ``proxy``, ``direct``, ``proxied`` or ``tvm``.
    @ivar control: never killed by the chaos (tracker and proxy are killed once).
    @ivar instances: one dict per process started: pid, started, rss/fds figures.
    """

    def __init__(self, name, role, args, ready, control=False):
        self.name, self.role, self._args, self._ready = name, role, args, ready
        self.control = control
        self.daemon = None
        self.instances = []
        self.outputs = []
        self.lock = threading.Lock()
        self.down_since = None
        self.killed_pids = []

    def launch(self):
        """Start a new process (without waiting for it)."""
        self.daemon = Daemon(self._args, env=child_env())
        self.outputs.append(self.daemon)
        self.instances.append({"pid": self.daemon.proc.pid, "started": now(),
                               "peak_rss": 0, "peak_fds": 0})

    def wait_ready(self, timeout=60):
        """Wait for the ready line of the current process."""
        self.daemon.wait_for(self._ready, timeout)
        self.instances[-1]["ready"] = now()
        self.down_since = None

    @property
    def alive(self):
        """Whether the current process runs."""
        return self.daemon is not None and self.daemon.proc.poll() is None

    def kill(self):
        """
        SIGKILL the current process group; remember every process of its tree
        (workers run in process groups of their own and must end by themselves).

        @return: the time of the kill.
        """
        pid = self.daemon.proc.pid
        try:
            tree = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
            self.killed_pids += [(p.pid, p.create_time()) for p in tree]
        except psutil.NoSuchProcess:
            pass
        when = now()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.daemon.proc.wait()
        self.down_since = when
        self.instances[-1]["killed"] = when
        return when

    def sample(self):
        """Update the current instance's peaks; @return: C{(rss, fds)} or L{None}."""
        if not self.alive:
            return None
        pid = self.daemon.proc.pid
        try:
            rss, fds = tree_rss(pid), tree_fds(pid)
        except psutil.NoSuchProcess:
            return None
        with self.lock:
            current = self.instances[-1]
            current["peak_rss"] = max(current["peak_rss"], rss)
            current["peak_fds"] = max(current["peak_fds"], fds)
        return rss, fds

    def processes(self):
        """@return: how many processes the current process tree has."""
        try:
            return 1 + len(psutil.Process(self.daemon.proc.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            return 0

    def position(self):
        """@return: a mark of how far this daemon's output has gone (for L{lines_after})."""
        if not self.outputs:
            return (0, 0)
        return (len(self.outputs) - 1, len(self.outputs[-1].lines))

    def lines_after(self, text, position):
        """@return: how many output lines after C{position} contain C{text}."""
        first, offset = position
        count = 0
        for index, daemon in enumerate(self.outputs[first:], first):
            lines = list(daemon.lines)[offset if index == first else 0:]
            count += sum(1 for line in lines if text in line)
        return count

    def full_matchkeys(self):
        """
        @return: the output lines (of every process it ran) that show a
            matchkey in full (more than the two digits of its random part
            that log lines may keep).
        """
        pattern = re.compile(rf"{re.escape(KEY)}:0\.\d{{3,}}")
        return [line for daemon in self.outputs for line in list(daemon.lines)
                if pattern.search(line)]

    def survivors(self):
        """@return: pids of killed process trees that still run."""
        left = []
        for pid, created in self.killed_pids:
            try:
                if psutil.Process(pid).create_time() == created:
                    left.append(pid)
            except psutil.NoSuchProcess:
                pass
        return left

    def stop(self):
        """Stop the current process group, and any survivor of a killed one."""
        if self.daemon is not None:
            self.daemon.stop()
        for pid in self.survivors():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Lab:
    """The daemons of one run and what happened to them."""

    def __init__(self, options):
        self.options = options
        self.tracker_port = free_port()
        self.proxy_port = free_port()
        tracker_addr = f"{HOST}:{self.tracker_port}"
        self.tracker = Managed(
            "tracker", "tracker",
            twistd("rpc-tracker", "--host", HOST, "--port", str(self.tracker_port),
                   "--port-end", str(self.tracker_port + 1)),
            r"rpc-tracker listening on")
        self.proxy = Managed(
            "proxy", "proxy",
            twistd("rpc-proxy", "--host", HOST, "--port", str(self.proxy_port),
                   "--port-end", str(self.proxy_port + 1), "--web-port", "0",
                   "--tracker", tracker_addr),
            r"rpc-proxy listening on")
        self.servers = []
        for number in range(options.direct):
            port = free_port()
            self.servers.append(Managed(
                f"direct-{number}", "direct",
                twistd("rpc-server", "--host", HOST, "--port", str(port),
                       "--port-end", str(port + 1), "--tracker", tracker_addr, "--key", KEY),
                rf"registered {KEY} with", control=number < 2))
        for number in range(options.proxied):
            self.servers.append(Managed(
                f"proxied-{number}", "proxied",
                twistd("rpc-server", "--through-proxy", "--host", HOST,
                       "--port", str(self.proxy_port), "--key", KEY),
                r"waiting at proxy", control=number < 1))
        port = free_port()
        self.servers.append(Managed(
            "tvm", "tvm",
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(port),
             "--port-end", str(port + 1), "--tracker", tracker_addr, "--key", KEY],
            r"bind to"))
        self.events = []
        self.windows = []
        self.reregistered = []
        self.restart_failures = []
        self.downtimes = []
        self.worker_kills_tried = 0

    @property
    def daemons(self):
        return [self.tracker, self.proxy, *self.servers]

    def start(self):
        """Start everything and wait until each is ready."""
        self.tracker.launch()
        self.tracker.wait_ready()
        self.proxy.launch()
        self.proxy.wait_ready()
        for server in self.servers:
            server.launch()
        for server in self.servers:
            server.wait_ready(90)

    def stop(self):
        """Stop every process group started (the daemons', and survivors of killed ones)."""
        for daemon in reversed(self.daemons):
            try:
                daemon.stop()
            except Exception as error:  # noqa: BLE001 (go on stopping the others)
                print(f"stopping {daemon.name}: {error}", file=sys.stderr)

    def live_servers(self):
        return [server for server in self.servers if server.alive]

    def restart(self, managed, delay):
        """Kill C{managed}, start it again after C{delay} s; @return: C{(killed, ready)}."""
        killed = managed.kill()
        self.events.append((killed, "kill", managed.name))
        time.sleep(delay)
        for attempt in range(3):
            managed.launch()
            try:
                managed.wait_ready(90)
                break
            except AssertionError as error:
                self.restart_failures.append((now(), managed.name, str(error)[-300:]))
                managed.daemon.stop()
                time.sleep(1)
        ready = now()
        self.events.append((ready, "ready", managed.name))
        self.downtimes.append((managed.name, ready - killed))
        return killed, ready

    def restart_core(self, managed):
        """Restart the tracker or the proxy, open its window, and check re-registration."""
        marks = {daemon.name: daemon.position() for daemon in self.daemons}
        # Peers being restarted register anyway once they are up: only those
        # up at the restart (and not killed since) are watched.
        marks["up"] = {server.name: len(server.instances) for server in self.live_servers()
                       if server.down_since is None}
        killed, ready = self.restart(managed, 1.0)
        self.windows.append((managed.name, killed, ready + WINDOW_AFTER))
        threading.Thread(target=self._watch_reregistration, args=(managed, marks, ready),
                         daemon=True).start()

    def _watch_reregistration(self, restarted, marks, ready, timeout=30.0):
        """
        Wait until the logs show every live peer registered again after the
        restart of C{restarted}: after the tracker's, each direct server logs
        ``registered``, the proxy reports itself and registers its servers again;
        after the proxy's, each server behind it waits there again and the proxy
        registers them with the tracker.
        """
        def pending():
            waiting = []
            live = [s for s in self.live_servers()
                    if marks["up"].get(s.name) == len(s.instances)]
            proxied = [s for s in live if s.role == "proxied"]
            if restarted is self.tracker:
                if self.proxy.lines_after("reported server:proxy", marks["proxy"]) < 1:
                    waiting.append("proxy's own report")
                for server in live:
                    if server.role == "direct" and server.lines_after(
                            f"registered {KEY} with", marks[server.name]) < 1:
                        waiting.append(server.name)
            else:
                for server in proxied:
                    if server.lines_after("waiting at proxy", marks[server.name]) < 1:
                        waiting.append(server.name)
            registered = self.proxy.lines_after(f"registered {KEY} behind the proxy",
                                                marks["proxy"])
            if registered < len(proxied):
                waiting.append(f"proxy registered {registered} of {len(proxied)} "
                               f"servers behind it")
            return waiting

        deadline = ready + timeout
        while True:
            waiting = pending()
            if not waiting or now() > deadline:
                break
            time.sleep(0.2)
        self.reregistered.append((restarted.name, now() - ready, waiting))

    def kill_worker(self, server, within=5.0):
        """
        SIGKILL the worker serving a session on C{server} (a process of its
        tree with an established TCP connection: the spare worker has none),
        waiting up to C{within} s for a session to be running.

        @return: whether one was killed.
        """
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            try:
                tree = psutil.Process(server.daemon.proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                return False
            for process in tree:
                try:
                    if any(c.status == psutil.CONN_ESTABLISHED
                           for c in process.net_connections(kind="tcp")):
                        process.kill()
                        self.events.append((now(), "kill", f"{server.name}/worker"))
                        return True
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.02)
        return False

    def chaos(self, started, seconds, rng, stop, worker_share=0.25):
        """
        The chaos thread: server kills at random (each restarted by a thread
        of its own, so kills do not wait for restarts), now and then a worker
        in the middle of its session instead, and the tracker and the proxy
        once each.
        """
        core = [(started + 0.35 * seconds, self.tracker), (started + 0.65 * seconds, self.proxy)]
        victims = [server for server in self.servers if not server.control]
        restarts = []
        end = started + seconds - 6
        while not stop.is_set() and now() < end:
            if core and now() >= core[0][0]:
                self.restart_core(core.pop(0)[1])
            else:
                victim = rng.choice(victims)
                busy = victim.role != "tvm" and victim.alive and victim.down_since is None
                if busy and rng.random() < worker_share:
                    self.worker_kills_tried += 1
                    self.kill_worker(victim)
                elif victim.alive and victim.down_since is None:
                    victim.down_since = now()
                    thread = threading.Thread(target=self.restart,
                                              args=(victim, rng.uniform(0.3, 2.0)), daemon=True)
                    thread.start()
                    restarts.append(thread)
            pause = rng.uniform(2.0, 6.0)
            if core:
                pause = min(pause, max(0.0, core[0][0] - now()))
            stop.wait(pause)
        while core and not stop.is_set():
            if now() >= core[0][0]:
                self.restart_core(core.pop(0)[1])
            else:
                stop.wait(0.1)
        for thread in restarts:
            thread.join(120)


class Sampler:
    """Samples every daemon's process tree (RSS and descriptors) every C{interval} s."""

    def __init__(self, lab, interval=0.5):
        self.lab, self.interval = lab, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            for daemon in self.lab.daemons:
                daemon.sample()
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join(10)


def snapshot(lab, label):
    """Record C{label} (``start`` or ``end``) RSS, descriptors, processes of each daemon now."""
    for daemon in lab.daemons:
        figures = daemon.sample()
        if figures is not None:
            daemon.instances[-1][f"{label}_rss"], daemon.instances[-1][f"{label}_fds"] = figures
            daemon.instances[-1][f"{label}_processes"] = daemon.processes()


# --- our client's loops, on a reactor running in a thread of its own ---


class Hung(Exception):
    """A cycle without an answer within the watchdog's time."""


async def our_cycle(tracker):
    """One request -> call -> close with our client."""
    session = await tracker.request(KEY, session_timeout=WATCHDOG, timeout=20)
    try:
        workpath = await session.get_function("tvm.rpc.server.workpath")
        if not await workpath("chaos"):
            raise AssertionError("tvm.rpc.server.workpath returned nothing")
    finally:
        await session.close()


def error_name(error):
    """@return: the error's type name (a remote error's remote type)."""
    name = type(error).__name__
    type_name = getattr(error, "type_name", None)
    return f"{name}({type_name})" if type_name else name


async def our_loop(reactor, tracker_port, deadline, records, number):
    """Cycle until C{deadline} (monotonic); append one record per cycle to C{records}."""
    from twisted.internet import defer

    from tvm_rpc.client import connect_tracker

    tracker = None
    try:
        while time.monotonic() < deadline:
            start = now()
            record = {"client": "ours", "loop": number, "start": start}

            async def attempt():
                nonlocal tracker
                if tracker is None:
                    tracker = await connect_tracker(HOST, tracker_port, reactor=reactor)
                await our_cycle(tracker)

            cycle = defer.Deferred.fromCoroutine(attempt())

            def hung(result, seconds):
                raise Hung(f"no answer in {seconds:g} s")

            cycle.addTimeout(WATCHDOG, reactor, onTimeoutCancel=hung)
            try:
                await cycle
                record["outcome"] = "ok"
            except Hung:
                record["outcome"] = "hung"
            except Exception as error:  # noqa: BLE001 (every failure is a figure)
                record["outcome"] = "failed"
                record["error"] = error_name(error)
                record["text"] = str(error)[:200]
            record["end"] = now()
            records.append(record)
            if record["outcome"] in ("failed", "hung"):
                await defer.Deferred(lambda d: None).addTimeout(
                    PAUSE_AFTER_FAILURE, reactor, onTimeoutCancel=lambda *a: None)
    finally:
        if tracker is not None:
            try:
                await tracker.close()
            except Exception:  # noqa: BLE001 (the tracker may be gone)
                pass


def run_our_loops(reactor, tracker_port, loops, seconds, records):
    """Run C{loops} loops for C{seconds}; blocks this (non-reactor) thread until they end."""
    from twisted.internet import defer, threads

    deadline = time.monotonic() + seconds

    def start():
        return defer.gatherResults(
            [defer.Deferred.fromCoroutine(our_loop(reactor, tracker_port, deadline, records, n))
             for n in range(loops)], consumeErrors=True)

    threads.blockingCallFromThread(reactor, start)


class LogCounter:
    """Counts our client's log events at warning level and above, by format."""

    def __init__(self):
        self.counts = Counter()

    def __call__(self, event):
        from twisted.logger import LogLevel

        if event.get("log_level", LogLevel.info) >= LogLevel.warn:
            text = event.get("log_format") or ""
            if "attempt {n}" in text:
                text = "request retried another server (session on a server failed)"
            self.counts[text[:100]] += 1


# --- TVM's client loops, one child process each ---


class TvmLoops:
    """C{count} loops of TVM's own client in child processes (``bench/chaos_tvm_client.py``)."""

    def __init__(self, count, tracker_port):
        self.count, self.tracker_port = count, tracker_port
        self.records = []
        self.replaced = 0
        self._procs = []
        self._lock = threading.Lock()
        self._deadline = None

    def _spawn(self):
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "chaos_tvm_client.py"), HOST,
             str(self.tracker_port), KEY, "--watchdog", str(WATCHDOG)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=child_env(), start_new_session=True, text=True)
        line = proc.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"TVM's client loop did not start: {line!r}")
        return proc

    def prepare(self):
        """Start the processes (TVM's import takes seconds) without starting the loops."""
        self._procs = [self._spawn() for _ in range(self.count)]

    def go(self, seconds):
        """Start every loop for C{seconds}; a reader thread per process collects its records."""
        self._deadline = time.monotonic() + seconds
        self._threads = []
        for proc in self._procs:
            self._start(proc)

    def _start(self, proc):
        proc.stdin.write(f"go {max(0.0, self._deadline - time.monotonic()):.1f}\n")
        proc.stdin.flush()
        thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read(self, proc):
        for line in proc.stdout:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            record["client"] = "tvm"
            if record.get("hung"):
                record["outcome"], record["end"] = "hung", record["start"] + WATCHDOG
            else:
                record["outcome"] = "failed" if record.get("error") else "ok"
                if record.get("error"):
                    record["text"] = record["error"]
                    record["error"] = "tvm:" + record["error"].split(":", 1)[0]
            with self._lock:
                self.records.append(record)
        proc.wait()
        if proc.returncode == 3 and time.monotonic() < self._deadline - 5:
            with self._lock:
                self.replaced += 1
            replacement = self._spawn()
            self._procs.append(replacement)
            self._start(replacement)

    def join(self, timeout):
        """Wait for every loop to end (at most C{timeout} s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(t.is_alive() for t in self._threads):
            time.sleep(0.2)

    def stop(self):
        """Stop every process this started (each in its own process group)."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()


# --- the end state ---


def settle(lab, timeout=60.0):
    """
    Wait until the tracker lists every live server free, nothing pending and
    no lease, and each of our servers is back to its idle process count.

    @return: C{(seconds taken, problems left)}; problems is empty when leak-free.
    """
    started = time.monotonic()
    expected = len(lab.live_servers())
    problems = ["not checked"]
    while time.monotonic() - started < timeout:
        problems = []
        try:
            summary = tracker_summary(lab.tracker_port)
        except (OSError, AssertionError) as error:
            problems = [f"SUMMARY failed: {error}"]
            time.sleep(0.5)
            continue
        queue = summary["queue_info"].get(KEY, {})
        if queue.get("free", 0) != expected:
            problems.append(f"{queue.get('free', 0)} of {expected} live servers free")
        if queue.get("pending", 0):
            problems.append(f"{queue['pending']} requests pending")
        leases = [lease for lease in summary.get("leases", []) if lease.get("key") == KEY]
        if leases:
            problems.append(f"{len(leases)} leases left")
        for server in lab.live_servers():
            if server.role in ("direct", "proxied"):
                count = server.processes()
                if count != lab.idle_processes:
                    problems.append(f"{server.name} has {count} processes "
                                    f"(idle: {lab.idle_processes})")
        if not problems:
            break
        time.sleep(0.5)
    return time.monotonic() - started, problems


def classify(records, lab):
    """
    Put each failed cycle in a class: its restart window, a server kill, or unexplained.

    @return: a dict class -> Counter of error names, a dict class -> (first,
        last) time a cycle of it ended, and the list of unexplained records.
    """
    kills = [when for when, what, name in lab.events
             if what == "kill" and name not in ("tracker", "proxy")]
    classes = defaultdict(Counter)
    spans = {}
    unexplained = []
    for record in records:
        if record["outcome"] not in ("failed", "hung"):
            continue
        error = record.get("error") or "hung"
        if record["outcome"] == "hung":
            name = "hung"
        else:
            name = _failure_class(record, error, lab, kills)
        classes[name][error] += 1
        low, high = spans.get(name, (record["end"], record["end"]))
        spans[name] = (min(low, record["end"]), max(high, record["end"]))
        if name == "unexplained":
            unexplained.append(record)
    return classes, spans, unexplained


def _failure_class(record, error, lab, kills):
    """@return: the class of one failed cycle (see L{classify})."""
    start, end = record["start"], record["end"]
    window = next((name for name, low, high in lab.windows if low <= end <= high), None)
    if window:
        return f"in the {window} restart window"
    base = error.split("(", 1)[0].replace("tvm:", "")
    if base in CONNECTION_ERRORS and any(
            start - KILL_SLACK <= when <= end + KILL_SLACK for when in kills):
        return "server killed during the cycle"
    return "unexplained"


# --- report ---


def fmt_mib(value):
    return "-" if value is None else f"{value / MiB:.1f}"


def daemon_rows(lab):
    """@return: Markdown rows: each daemon's RSS and descriptors at start, peak and end."""
    rows = ["| daemon | restarts | RSS start / peak / end (MiB) | end vs start | "
            "fds start / peak / end | end vs start | processes start / end |",
            "|---|---|---|---|---|---|---|"]
    flags = []
    for daemon in lab.daemons:
        first, last = daemon.instances[0], daemon.instances[-1]
        restarts = len(daemon.instances) - 1
        peak_rss = max(i["peak_rss"] for i in daemon.instances)
        peak_fds = max(i["peak_fds"] for i in daemon.instances)
        start_rss, start_fds = first.get("start_rss"), first.get("start_fds")
        end_rss, end_fds = last.get("end_rss"), last.get("end_fds")
        if restarts:
            rss_change = fds_change = "restarted: fresh process"
        else:
            rss_growth = (end_rss - start_rss) / start_rss if start_rss and end_rss else None
            fds_growth = (end_fds - start_fds) / start_fds if start_fds and end_fds else None
            rss_change = "-" if rss_growth is None else f"{rss_growth:+.1%}"
            fds_change = "-" if fds_growth is None else f"{fds_growth:+.1%}"
            for what, growth in (("RSS", rss_growth), ("fds", fds_growth)):
                if growth is not None and abs(growth) > 0.10:
                    flags.append(f"{daemon.name}: {what} {growth:+.1%} from start to end")
                    if what == "RSS":
                        rss_change += " **(>10 %)**"
                    else:
                        fds_change += " **(>10 %)**"
        name = daemon.name + (" (control)" if daemon.control else "")
        rows.append(
            f"| {name} | {restarts} | {fmt_mib(start_rss)} / {fmt_mib(peak_rss)} / "
            f"{fmt_mib(end_rss)} | {rss_change} | {start_fds or '-'} / {peak_fds} / "
            f"{end_fds or '-'} | {fds_change} | {first.get('start_processes', '-')} / "
            f"{last.get('end_processes', '-')} |")
    return rows, flags


def report(lab, records, classes, spans, unexplained, settle_figures, tvm_loops,
           log_counts, options, machine, started, orphans):
    """@return: the Markdown body of the ``Chaos`` section, and whether every target was met."""
    by_client = defaultdict(Counter)
    for record in records:
        by_client[record["client"]][record["outcome"]] += 1
    hung = sum(c["hung"] for c in by_client.values())
    kills = Counter(name for _, what, name in lab.events if what == "kill")
    settle_seconds, problems = settle_figures
    downtimes = defaultdict(list)
    for name, seconds in lab.downtimes:
        downtimes[name.split("-")[0]].append(seconds)
    rows, flags = daemon_rows(lab)
    outside = sum(sum(counter.values()) for name, counter in classes.items()
                  if name == "unexplained")
    lines = [
        f"Measured by `python bench/chaos.py {options.command_line}` at "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started))}, on loopback:",
        "",
        *machine_markdown(machine),
        "",
        f"Our tracker, our proxy in tracker mode, and {len(lab.servers)} servers under one key: "
        f"{options.direct} of ours registered with the tracker, {options.proxied} of ours "
        f"behind the proxy (`--through-proxy`), one of TVM's (`python -m tvm.exec.rpc_server`). "
        f"Controls never killed: "
        f"{', '.join(s.name for s in lab.servers if s.control)}. "
        f"{options.loops} loops of our client (coroutines on one reactor) and "
        f"{options.tvm_loops} of TVM's (`tvm.rpc.connect_tracker(...).request(key)`, a process "
        f"each) do request -> `tvm.rpc.server.workpath` -> close for {options.seconds:g} s "
        f"after a {options.warmup:g} s warm-up, while a server other than the controls is "
        f"killed (SIGKILL to its process group) every 2-6 s and restarted on its port "
        f"0.3-2 s later, the tracker once at 35 % and the proxy once at 65 % (killed, back "
        f"on their port 1 s later).",
        "",
        "Both clients are served by every server: ours speak TVM's protocol to TVM's "
        "client, and our client speaks TVM's own protocol to TVM's server.",
        "",
        "| client | cycles | ok | failed | hung (> 30 s) |",
        "|---|---|---|---|---|",
    ]
    for client, counts in sorted(by_client.items()):
        total = sum(counts.values())
        lines.append(f"| {'ours' if client == 'ours' else 'TVM'} | {total} | {counts['ok']} | "
                     f"{counts['failed']} | {counts['hung']} |")
    killed = ", ".join(f"{name} x{count}" for name, count in sorted(kills.items()))
    windows = "; ".join(f"{name} {low - started:.1f}-{high - started:.1f} s"
                        for name, low, high in lab.windows)
    back = "; ".join(f"{role} median {statistics.median(times):.1f} s, max {max(times):.1f} s"
                     for role, times in sorted(downtimes.items()))
    again = "; ".join(
        f"after the {name} restart, every peer within {seconds:.1f} s" if not waiting
        else f"after the {name} restart, still waiting after {seconds:.0f} s: "
             f"{', '.join(waiting)}"
        for name, seconds, waiting in lab.reregistered)
    lines += [
        "",
        f"Chaos: {sum(kills.values())} kills ({killed}; `/worker`: the worker serving a "
        f"session, not the server; {lab.worker_kills_tried} worker kills tried, each waiting "
        f"up to 5 s for a session to run). Restart windows run from the kill to {WINDOW_AFTER:g} s "
        f"after the daemon is back: {windows}. Back after a kill (from SIGKILL to the "
        f"restarted daemon's ready line: registered with the tracker, waiting at the proxy, "
        f"or listening for TVM's): {back}. Registered again (logs): {again}.",
        "",
        "Failures by class and error (a failure is put in a window when it ended inside one; "
        "\"server killed\" when a connection-type error ended a cycle during which "
        f"(±{KILL_SLACK:g} s) a server or worker was killed):",
        "",
        "| class | failures | ended between (s into the run) | by error |",
        "|---|---|---|---|",
    ]
    for name in sorted(classes):
        counter = classes[name]
        low, high = spans[name]
        lines.append(f"| {name} | {sum(counter.values())} | {low - started:.1f}-"
                     f"{high - started:.1f} | "
                     + ", ".join(f"`{e}` {c}" for e, c in counter.most_common()) + " |")
    if not classes:
        lines.append("| (none) | 0 | | |")
    if log_counts:
        lines += ["", "Our client's warnings during the run: " + "; ".join(
            f"{text} x{count}" for text, count in log_counts.most_common(5)) + "."]
    if tvm_loops.replaced:
        lines += ["", f"TVM's client loops replaced after a hang: {tvm_loops.replaced}."]
    exposed = {daemon.name: daemon.full_matchkeys() for daemon in lab.daemons
               if daemon.role != "tvm"}
    exposed = {name: found for name, found in exposed.items() if found}
    if exposed:
        lines += ["", "Matchkeys logged in full (robustness.md: never): " + "; ".join(
            f"{name} {len(found)} lines, e.g. `{found[0].split(' ', 1)[-1][:160]}`"
            for name, found in exposed.items()) + "."]
    leaked = "none" if not problems else "; ".join(problems)
    lines += [
        "",
        f"End state, {settle_seconds:.1f} s after the loops ended: leaked servers / leftovers: "
        f"{leaked}; processes of killed daemons left running: "
        f"{', '.join(orphans) if orphans else 'none'}.",
        "",
        "Each daemon's whole process tree (start: idle after the warm-up; end: idle after the "
        "settle; peak: sampled every 0.5 s during the run, over all its processes). A restarted "
        "daemon's end is a fresh process, so only those never restarted are compared:",
        "",
        *rows,
        "",
        "RSS sums the processes of a tree, so pages a session's worker shares with the fork "
        "server it was forked from count twice: a server's peak (about +98 MiB) is one "
        "session's worker alive, not growth.",
    ]
    if lab.restart_failures:
        lines += ["", "Restarts that failed first: " + "; ".join(
            f"{name} at {when - started:.1f} s" for when, name, _ in lab.restart_failures)]
    targets = [
        ("0 hung", hung == 0, f"{hung}"),
        ("0 leaked", not problems and not orphans, leaked if not orphans else "orphans"),
        ("failures only during the tracker/proxy restarts", outside == 0,
         f"{outside} unexplained outside the windows; "
         f"{sum(classes.get('server killed during the cycle', Counter()).values())} "
         f"put down to server kills"),
        ("RSS and fds back to start ±10 % (daemons never restarted)", not flags,
         "; ".join(flags) or "all within"),
    ]
    lines += ["", "Against issue 9's targets:", ""]
    for name, ok, detail in targets:
        lines.append(f"- {name}: {'met' if ok else 'NOT met'} ({detail})")
    return "\n".join(lines), all(ok for _, ok, _ in targets), unexplained


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="chaos run length (120)")
    parser.add_argument("--warmup", type=float, default=5.0, help="loops before the chaos (5)")
    parser.add_argument("--loops", type=int, default=32, help="loops of our client (32)")
    parser.add_argument("--tvm-loops", type=int, default=4, help="loops of TVM's client (4)")
    parser.add_argument("--direct", type=int, default=6,
                        help="our servers registered with the tracker (6; 2 are controls)")
    parser.add_argument("--proxied", type=int, default=3,
                        help="our servers behind the proxy (3; 1 is a control)")
    parser.add_argument("--worker-kills", type=float, default=0.25,
                        help="share of the chaos's picks of one of our servers that kill "
                             "the worker serving a session instead of the server (0.25)")
    parser.add_argument("--seed", type=int, default=None, help="the chaos's random seed")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the figures into docs/benchmarks.md (## Chaos)")
    parser.add_argument("--json", help="also write the raw records to this file")
    options = parser.parse_args(argv)
    if options.direct < 3 or options.proxied < 2:
        parser.error("at least 3 direct and 2 proxied servers (controls are never killed)")
    options.command_line = shown_command_line(argv)
    if options.seed is None:
        options.seed = random.randrange(1 << 30)
    return options


def main(argv=None):
    """Run the chaos soak; @return: 0 when every target was met, 1 otherwise."""
    options = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    machine = machine_description()
    print("machine: " + "; ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    print(f"seed {options.seed}", flush=True)
    rng = random.Random(options.seed)

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner

    log_counter = LogCounter()
    globalLogBeginner.beginLoggingTo([log_counter], redirectStandardIO=False)
    reactor_thread = threading.Thread(target=reactor.run,
                                      kwargs={"installSignalHandlers": False}, daemon=True)
    reactor_thread.start()

    lab = Lab(options)
    tvm_loops = TvmLoops(options.tvm_loops, lab.tracker_port)
    records = []
    stop_chaos = threading.Event()
    try:
        lab.start()
        print(f"{len(lab.daemons)} daemons ready", flush=True)
        tvm_loops.prepare()
        warmup = []
        run_our_loops(reactor, lab.tracker_port, options.loops, options.warmup, warmup)
        print(f"warm-up: {len(warmup)} cycles, "
              f"{Counter(r['outcome'] for r in warmup)}", flush=True)
        # The warm-up's last sessions may have left their workers kept for
        # our client's next session: idle is once they are retired.
        time.sleep(KEEP_WORKER_SECONDS + 1)
        lab.idle_processes = Counter(
            s.processes() for s in lab.servers if s.role != "tvm").most_common(1)[0][0]
        settle_seconds, problems = settle(lab)
        print(f"idle after {settle_seconds:.1f} s: {problems or 'ok'}", flush=True)
        snapshot(lab, "start")
        log_counter.counts.clear()
        with Sampler(lab):
            started = now()
            chaos = threading.Thread(target=lab.chaos,
                                     args=(started, options.seconds, rng, stop_chaos,
                                           options.worker_kills),
                                     daemon=True)
            chaos.start()
            tvm_loops.go(options.seconds)
            run_our_loops(reactor, lab.tracker_port, options.loops, options.seconds, records)
            stop_chaos.set()
            chaos.join(120)
            tvm_loops.join(WATCHDOG + 15)
            records += tvm_loops.records
            print(f"run: {len(records)} cycles, {Counter(r['outcome'] for r in records)}",
                  flush=True)
            settle_figures = settle(lab)
            print(f"settled after {settle_figures[0]:.1f} s: {settle_figures[1] or 'ok'}",
                  flush=True)
            time.sleep(2.0)
            snapshot(lab, "end")
        orphans = [f"{d.name}: {pid}" for d in lab.daemons for pid in d.survivors()]
        classes, spans, unexplained = classify(records, lab)
        body, met, unexplained = report(lab, records, classes, spans, unexplained,
                                        settle_figures, tvm_loops, log_counter.counts,
                                        options, machine, started, orphans)
    finally:
        stop_chaos.set()
        tvm_loops.stop()
        lab.stop()
        reactor.callFromThread(reactor.stop)
        reactor_thread.join(10)
    print()
    print(body)
    for record in unexplained[:20]:
        print(f"unexplained at {record['start'] - started:.1f}-{record['end'] - started:.1f} s: "
              f"{record['client']} {record.get('error')}: {record.get('text', '')}")
    for when, what, name in lab.events:
        print(f"event {when - started:7.2f} s {what} {name}")
    if options.json:
        Path(options.json).write_text(json.dumps(
            {"started": started, "records": records, "events": lab.events,
             "windows": lab.windows}, indent=1), encoding="utf-8")
    if options.write_docs:
        replace_section(DOCS, "Chaos", body)
        print(f"wrote {DOCS}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
