"""Tracker load benchmark: our tracker against TVM's, in the same run.

Usage::

    python bench/tracker_load.py [--quick] [--duration S] [--sweep 1x1,8x32,...]
                                 [--sweep-runs N] [--scale-servers N] [--scale-pending N]
                                 [--scale-runs N]
                                 [--write-docs] [--json FILE]

For each tracker (ours: C{twistd -n rpc-tracker}; TVM's: C{python -m
tvm.exec.rpc_tracker}), started fresh on loopback:

1. B{idle SUMMARY}: the round trip of SUMMARY on an idle tracker.
2. B{sweep}: S fake servers (raw sockets speaking the tracker protocol:
   UPDATE_INFO, then PUT with a fresh matchkey) and C clients, each keeping one
   REQUEST outstanding. When a client is answered, the server that owns the
   matchkey re-PUTs a fresh one at once and the client sends its next REQUEST:
   one request -> re-put cycle. Reported: cycles/s over the measurement
   window, p50/p99 latency from REQUEST to answer as the client sees it
   (queueing included when C > S), peak RSS of the tracker's whole process
   tree, and the tracker's and the driver's CPU use.
3. B{scale}: 1,000 servers and 10,000 clients whose REQUESTs wait. Each server
   PUTs a fresh matchkey, holds the request it is handed for about C{--hold}
   seconds (a session), then PUTs again; each answered client asks again at
   once, so about 10,000 requests stay pending. Reported: the latency from a
   server's PUT to the answer reaching the waiting client (what a freed server
   costs), answers/s, and peak RSS. A tracker that cannot take the load within
   C{--setup-timeout} seconds is reported as such.

The driver is one asyncio event loop in this process, on plain protocols with
one write per message and TCP_NODELAY (asyncio's default), so it stays cheap;
its CPU use is printed so a saturated driver shows.
"""

import argparse
import asyncio
import contextlib
import gc
import json
import os
import random
import signal
import struct
import sys
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402  (the line above makes bench/ importable)
    DOCS,
    MiB,
    TreeSampler,
    fmt_ms,
    latency_stats,
    machine_description,
    machine_markdown,
    our_tracker,
    raise_fd_limit,
    replace_section,
    self_cpu_seconds,
    shown_command_line,
    tree_cpu_seconds,
    tvm_tracker,
)

HOST = "127.0.0.1"
TRACKER_MAGIC = 0x2F271
PING, PUT, REQUEST, UPDATE_INFO, SUMMARY = 1, 3, 4, 5, 6
INT32 = struct.Struct("<i")
MAGIC_BYTES = INT32.pack(TRACKER_MAGIC)
FAKE_SERVER_PORT = 9090



def our_loaded_tracker():
    """
    Our tracker with the per-address connection cap raised: every simulated
    server and client of this benchmark connects from 127.0.0.1 (11,000
    connections in the scale run), where a lab's come from many addresses.
    """
    return our_tracker("--max-connections-per-address", "100000")


TRACKERS = {"ours": our_loaded_tracker, "tvm": tvm_tracker}


class BenchError(Exception):
    """The tracker broke the protocol or the run could not proceed."""


def frame(message):
    """@return: C{message} as one tracker frame: int32 length, then UTF-8 JSON."""
    body = json.dumps(message).encode("utf-8")
    return INT32.pack(len(body)) + body


class TrackerPeer(asyncio.Protocol):
    """
    One connection to a tracker: sends the magic, checks its echo, then
    frames JSON messages. Replies go to C{on_reply} when set (the hot paths),
    otherwise to the oldest waiting L{call}.
    """

    def __init__(self):
        """A peer not yet connected; C{ready} fires once the magic is echoed."""
        self.transport = None
        self.on_reply = None
        self._buffer = bytearray()
        self._greeted = False
        self._waiting = deque()
        self.ready = asyncio.get_running_loop().create_future()
        self.closed = False

    def connection_made(self, transport):
        """Send the tracker magic."""
        self.transport = transport
        transport.write(MAGIC_BYTES)

    def data_received(self, data):
        """Check the magic echo, then decode every complete frame and deliver it."""
        buffer = self._buffer
        buffer += data
        if not self._greeted:
            if len(buffer) < 4:
                return
            if bytes(buffer[:4]) != MAGIC_BYTES:
                self._fail(BenchError(f"bad magic echo {bytes(buffer[:4])!r}"))
                return
            del buffer[:4]
            self._greeted = True
            self.ready.set_result(self)
        position, end = 0, len(buffer)
        while end - position >= 4:
            (size,) = INT32.unpack_from(buffer, position)
            if end - position - 4 < size:
                break
            value = json.loads(buffer[position + 4:position + 4 + size])
            position += 4 + size
            if self.on_reply is not None:
                self.on_reply(value)
            elif self._waiting:
                self._waiting.popleft().set_result(value)
            else:
                self._fail(BenchError(f"unexpected reply {value!r}"))
                return
        if position:
            del buffer[:position]

    def _fail(self, error):
        """Fail whoever waits with C{error} and drop the connection."""
        if not self.ready.done():
            self.ready.set_exception(error)
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_exception(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc):
        """Mark the peer closed and fail whoever still waits."""
        self.closed = True
        self._fail(BenchError(f"tracker closed the connection ({exc})"))

    def send(self, message):
        """Send one message as a single frame in one write."""
        self.transport.write(frame(message))

    def call(self, message):
        """Send C{message}; @return: a future of the reply."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        self.send(message)
        return waiter

    def close(self):
        """Close the connection (no-op when already closed)."""
        if self.transport is not None and not self.closed:
            self.transport.close()


async def connect(port, timeout=30.0):
    """Open a greeted L{TrackerPeer} to the tracker on C{port}."""
    loop = asyncio.get_running_loop()
    _, peer = await asyncio.wait_for(loop.create_connection(TrackerPeer, HOST, port), timeout)
    await asyncio.wait_for(peer.ready, timeout)
    return peer


async def connect_many(port, count, deadline):
    """
    Open C{count} greeted peers one after another (TVM's tracker listens with
    a backlog of 1, so parallel connects would measure SYN retries instead of
    the tracker).

    @return: the peers opened before C{deadline} (a C{time.monotonic()} value).
    """
    peers = []
    for _ in range(count):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            peers.append(await connect(port, timeout=left))
        except (asyncio.TimeoutError, OSError, BenchError):
            break
    return peers


async def summary(peer):
    """@return: the SUMMARY payload from C{peer}."""
    reply = await peer.call([SUMMARY])
    if not (isinstance(reply, list) and reply[0] == 0):
        raise BenchError(f"bad SUMMARY reply {reply!r}")
    return reply[1]


async def idle_summary(port, samples):
    """
    Time C{samples} sequential SUMMARY round trips on one connection to an
    idle tracker.

    @return: L{latency_stats} in milliseconds.
    """
    peer = await connect(port)
    try:
        await summary(peer)
        latencies = []
        for _ in range(samples):
            started = time.perf_counter()
            await summary(peer)
            latencies.append(time.perf_counter() - started)
        return latency_stats(latencies)
    finally:
        peer.close()


class FakeServer:
    """A server as the tracker sees it: UPDATE_INFO once, then PUTs of fresh matchkeys."""

    def __init__(self, run, index, peer):
        """Serve C{run} as server number C{index} over C{peer}."""
        self.run = run
        self.index = index
        self.peer = peer
        self.count = 0
        peer.on_reply = self._on_reply

    async def register(self):
        """Send UPDATE_INFO as TVM's server does."""
        self.peer.on_reply = None
        info = {"key": f"server:{self.run.key}", "addr": [None, FAKE_SERVER_PORT + self.index]}
        reply = await self.peer.call([UPDATE_INFO, info])
        if reply != 0:
            raise BenchError(f"UPDATE_INFO answered {reply!r}")
        self.peer.on_reply = self._on_reply

    def put(self):
        """PUT a fresh matchkey and remember when."""
        if not self.run.running or self.peer.closed:
            return
        self.count += 1
        matchkey = f"{self.run.key}:{self.index}.{self.count}"
        self.run.owners[matchkey] = (self, time.perf_counter())
        self.peer.send([PUT, self.run.key, [FAKE_SERVER_PORT + self.index, matchkey], None])

    def _on_reply(self, value):
        """Count anything but SUCCESS as an error of the run."""
        if value != 0:
            self.run.errors.append(f"PUT answered {value!r}")


class Client:
    """A client that keeps one REQUEST outstanding and asks again once answered."""

    def __init__(self, run, peer):
        """Ask for C{run}'s key over C{peer}."""
        self.run = run
        self.peer = peer
        self.sent = None
        peer.on_reply = self._on_reply

    def request(self):
        """Send a REQUEST and remember when."""
        if not self.run.running or self.peer.closed:
            return
        self.sent = time.perf_counter()
        self.peer.transport.write(self.run.request_frame)

    def _on_reply(self, value):
        """Record the answer, release the server it names and ask again."""
        now = time.perf_counter()
        run = self.run
        try:
            code, (_, _, matchkey) = value
        except (TypeError, ValueError):
            run.errors.append(f"REQUEST answered {value!r}")
            return
        owner = run.owners.pop(matchkey, None)
        if code != 0 or owner is None:
            run.errors.append(f"REQUEST answered {value!r}")
            return
        server, put_at = owner
        run.answered(now, now - self.sent, now - put_at)
        run.release(server)
        self.request()


class LoadRun:
    """
    The shared state of one load run: the key, who owns which matchkey, and
    the latencies of the answers that fall inside the measurement window.
    """

    def __init__(self, key, hold=0.0):
        """
        @param key: the device key used by every peer of the run.
        @param hold: mean seconds a server holds a request before its re-PUT
            (0: re-PUT at once); each hold is drawn from [0.5, 1.5] x C{hold}.
        """
        self.key = key
        self.hold = hold
        # Every REQUEST of a run is the same frame: encode it once.
        self.request_frame = frame([REQUEST, key, "bench", 1])
        self.owners = {}
        self.errors = []
        self.running = True
        self.window = None
        self.answers = 0
        self.request_latencies = []
        self.put_latencies = []
        self._timers = []
        self._loop = asyncio.get_running_loop()

    def answered(self, now, request_latency, put_latency):
        """Record an answer if it arrived inside the window."""
        if self.window is not None and self.window[0] <= now <= self.window[1]:
            self.answers += 1
            self.request_latencies.append(request_latency)
            self.put_latencies.append(put_latency)

    def release(self, server):
        """The session on C{server} is over, now or after its hold time."""
        if self.hold:
            delay = self.hold * random.uniform(0.5, 1.5)
            self._timers.append(self._loop.call_later(delay, server.put))
            if len(self._timers) > 4096:
                self._timers = [t for t in self._timers if not t.cancelled()
                                and t.when() > self._loop.time()]
        else:
            server.put()

    def stop(self):
        """Stop issuing messages and cancel pending re-PUTs."""
        self.running = False
        for timer in self._timers:
            timer.cancel()


async def loop_lag(duration, tick=0.005):
    """
    Sleep in C{tick} steps for C{duration} seconds and record how late each
    wake-up is: the driver's own event-loop lag, which inflates every latency
    it measures.

    @return: the lags in seconds.
    """
    lags = []
    end = time.perf_counter() + duration
    while True:
        before = time.perf_counter()
        if before >= end:
            return lags
        await asyncio.sleep(tick)
        lags.append(max(0.0, time.perf_counter() - before - tick))


def settle_garbage():
    """
    Collect, then freeze what the set-up allocated, so the driver's garbage
    collector does not walk thousands of long-lived peers during a window
    (its pauses would be counted as tracker latency).
    """
    gc.collect()
    gc.freeze()


@contextlib.contextmanager
def cpu_meter(pid):
    """Measure the tracker tree's and this driver's CPU use over a block."""
    result = {}
    tracker_before, driver_before, started = tree_cpu_seconds(pid), self_cpu_seconds(), time.perf_counter()
    yield result
    elapsed = time.perf_counter() - started
    result["tracker_cpu"] = 100 * (tree_cpu_seconds(pid) - tracker_before) / elapsed
    result["driver_cpu"] = 100 * (self_cpu_seconds() - driver_before) / elapsed


async def load_cycle(port, pid, sampler, servers, clients, duration, warmup):
    """
    The sweep scenario: C{servers} fake servers, C{clients} clients, re-PUT at once.

    @return: a dict of figures.
    """
    run = LoadRun(f"load-s{servers}-c{clients}-{random.randrange(1 << 30)}")
    deadline = time.monotonic() + 60
    server_peers = await connect_many(port, servers, deadline)
    client_peers = await connect_many(port, clients, deadline)
    peers = server_peers + client_peers
    try:
        if len(server_peers) < servers or len(client_peers) < clients:
            raise BenchError(f"only {len(peers)} of {servers + clients} connections opened")
        fakes = [FakeServer(run, i, p) for i, p in enumerate(server_peers)]
        for fake in fakes:
            await fake.register()
        drivers = [Client(run, p) for p in client_peers]
        settle_garbage()
        sampler.reset()
        for fake in fakes:
            fake.put()
        for client in drivers:
            client.request()
        await asyncio.sleep(warmup)
        with cpu_meter(pid) as cpu:
            start = time.perf_counter()
            run.window = (start, start + duration)
            lags = await loop_lag(duration)
        run.stop()
        if run.errors:
            raise BenchError(f"{len(run.errors)} protocol errors, first: {run.errors[0]}")
        stats = latency_stats(run.request_latencies)
        return {
            "servers": servers, "clients": clients,
            "cycles_per_s": run.answers / duration,
            "p50_ms": stats["p50"], "p99_ms": stats["p99"],
            "peak_rss_mib": sampler.take_peak() / MiB,
            "driver_lag_p99_ms": latency_stats(lags)["p99"],
            **cpu,
        }
    finally:
        run.stop()
        for peer in peers:
            peer.close()
        gc.unfreeze()
        await asyncio.sleep(0.2)


async def scale(port, pid, sampler, servers, pending, duration, hold, setup_timeout):
    """
    The scale scenario: C{pending} waiting clients, C{servers} servers that
    hold each request for about C{hold} seconds.

    @return: a dict of figures, with C{"failed"} set when the tracker could not
        take the load within C{setup_timeout} seconds.
    """
    run = LoadRun("scale", hold=hold)
    setup_started = time.monotonic()
    deadline = setup_started + setup_timeout
    monitor = await connect(port)
    server_peers = await connect_many(port, servers, deadline)
    client_peers = []
    peers = [monitor] + server_peers
    result = {"servers": servers, "pending_target": pending}
    try:
        if len(server_peers) < servers:
            result["failed"] = (f"only {len(server_peers)} of {servers} server connections "
                                f"opened in {setup_timeout:.0f} s")
            return result
        fakes = [FakeServer(run, i, p) for i, p in enumerate(server_peers)]
        for fake in fakes:
            await fake.register()
        client_peers = await connect_many(port, pending, deadline)
        peers += client_peers
        drivers = [Client(run, p) for p in client_peers]
        for client in drivers:
            client.request()
        queued = 0
        while time.monotonic() < deadline:
            queued = (await summary(monitor))["queue_info"].get("scale", {}).get("pending", 0)
            if queued >= pending:
                break
            await asyncio.sleep(0.2)
        result["setup_s"] = time.monotonic() - setup_started
        if len(client_peers) < pending or queued < pending:
            result["failed"] = (f"{len(client_peers)} of {pending} client connections opened, "
                                f"{queued} requests pending after {setup_timeout:.0f} s")
            return result
        sampler.reset()
        result["rss_loaded_mib"] = sampler.take_peak() / MiB
        settle_garbage()
        # Spread the first PUTs over one hold time, as sessions would end.
        for fake in fakes:
            run.release(fake)
        await asyncio.sleep(hold)
        with cpu_meter(pid) as cpu:
            start = time.perf_counter()
            run.window = (start, start + duration)
            lags = await loop_lag(duration)
        # SUMMARY under load is timed after the window: each one is a large
        # reply that holds the tracker's loop, which would weigh on the
        # dispatch latencies measured above.
        summaries = []
        for _ in range(5):
            began = time.perf_counter()
            state = await summary(monitor)
            summaries.append(time.perf_counter() - began)
        run.stop()
        if run.errors:
            raise BenchError(f"{len(run.errors)} protocol errors, first: {run.errors[0]}")
        stats = latency_stats(run.put_latencies)
        result.update({
            "answers_per_s": run.answers / duration,
            "p50_ms": stats["p50"], "p99_ms": stats["p99"], "max_ms": stats["max"],
            "pending_seen": state["queue_info"].get("scale", {}).get("pending"),
            "summary_p50_ms": latency_stats(summaries)["p50"],
            "driver_lag_p99_ms": latency_stats(lags)["p99"],
            "peak_rss_mib": sampler.take_peak() / MiB,
            **cpu,
        })
        return result
    finally:
        run.stop()
        for peer in peers:
            peer.close()
        gc.unfreeze()
        await asyncio.sleep(0.5)


def run_tracker(kind, options):
    """
    Start a fresh tracker of C{kind} and run every phase against it.

    @return: the figures for that tracker.
    """
    figures = {"sweep": []}
    with TRACKERS[kind]() as (daemon, port):
        pid = daemon.proc.pid
        with TreeSampler(pid) as sampler:
            time.sleep(0.5)
            figures["idle_rss_mib"] = sampler.take_peak() / MiB
            figures["idle_summary"] = asyncio.run(idle_summary(port, options.summary_samples))
            print(f"[{kind}] idle: RSS {figures['idle_rss_mib']:.1f} MiB, SUMMARY p50 "
                  f"{fmt_ms(figures['idle_summary']['p50'])} ms", flush=True)
            for servers, clients in options.sweep:
                runs = []
                for _ in range(options.sweep_runs):
                    load = os.getloadavg()[0]
                    row = asyncio.run(load_cycle(port, pid, sampler, servers, clients,
                                                 options.duration, options.warmup))
                    row["load"] = load
                    runs.append(row)
                    print(f"[{kind}] S={servers} C={clients}: {row['cycles_per_s']:.0f} "
                          f"cycles/s, p50 {fmt_ms(row['p50_ms'])} ms, p99 "
                          f"{fmt_ms(row['p99_ms'])} ms, RSS {row['peak_rss_mib']:.1f} MiB, CPU "
                          f"tracker {row['tracker_cpu']:.0f}% driver {row['driver_cpu']:.0f}%, driver lag "
                          f"p99 {fmt_ms(row['driver_lag_p99_ms'])} ms, load {load:.1f}",
                          flush=True)
                # The run with the median rate stands for the configuration.
                row = dict(sorted(runs, key=lambda r: r["cycles_per_s"])[len(runs) // 2])
                row["all_cycles_per_s"] = [r["cycles_per_s"] for r in runs]
                figures["sweep"].append(row)
    if options.scale_servers:
        figures["scale_runs"] = []
        for _ in range(options.scale_runs):
            # A fresh tracker, so earlier runs do not weigh on the scale figures.
            with TRACKERS[kind]() as (daemon, port):
                with TreeSampler(daemon.proc.pid) as sampler:
                    row = asyncio.run(scale(port, daemon.proc.pid, sampler,
                                            options.scale_servers, options.scale_pending,
                                            options.scale_duration, options.hold,
                                            options.setup_timeout))
            figures["scale_runs"].append(row)
            if "failed" in row:
                print(f"[{kind}] scale: FAILED: {row['failed']}", flush=True)
            else:
                print(f"[{kind}] scale {row['servers']} servers / {row['pending_target']} pending: "
                      f"PUT->answer p50 {fmt_ms(row['p50_ms'])} ms p99 {fmt_ms(row['p99_ms'])} ms, "
                      f"{row['answers_per_s']:.0f} answers/s, peak RSS "
                      f"{row['peak_rss_mib']:.1f} MiB, setup {row['setup_s']:.1f} s, driver lag "
                      f"p99 {fmt_ms(row['driver_lag_p99_ms'])} ms", flush=True)
        figures["scale"] = median_run(figures["scale_runs"])
    gc.collect()
    return figures


def rate(row):
    """@return: a row's cycles/s, with every run's rate in brackets when there were several."""
    if not row or row.get("cycles_per_s") is None:
        return "-"
    text = f"{row['cycles_per_s']:.0f}"
    every = row.get("all_cycles_per_s", [])
    if len(every) > 1:
        text += " (" + ", ".join(f"{value:.0f}" for value in every) + ")"
    return text


def median_run(runs):
    """
    @return: the run whose p99 is the median of the successful runs (the
        upper median for an even count), or the first failed run when none
        succeeded.
    """
    done = sorted((r for r in runs if "failed" not in r), key=lambda r: r["p99_ms"])
    if not done:
        return runs[0]
    return done[len(done) // 2]


def ratio(ours, theirs):
    """@return: C{ours / theirs} formatted, or a dash when undefined."""
    if not ours or not theirs:
        return "-"
    return f"{ours / theirs:.1f}x"


def report(results, options, machine):
    """@return: the Markdown body of the "Tracker" section."""
    ours, tvm = results.get("ours"), results.get("tvm")
    lines = [
        f"Measured by `python bench/tracker_load.py {options.command_line}`: our tracker "
        "(`twistd -n rpc-tracker`) and TVM's (`python -m tvm.exec.rpc_tracker`) in the same "
        "run, each fresh on 127.0.0.1, driven by one asyncio process over real sockets. RSS is "
        "the tracker's whole process tree (TVM's runs its service in a child process). CPU is "
        "% of one core over the measurement window.",
        "",
        f"Finished at {time.strftime('%Y-%m-%d %H:%M %Z')}: sweep windows of {options.duration:g} s "
        f"after {options.warmup:g} s warm-up.",
        "",
        "### Idle tracker",
        "",
        "| tracker | SUMMARY p50 (ms) | SUMMARY p99 (ms) | idle RSS (MiB) |",
        "|---|---|---|---|",
    ]
    for kind, figures in results.items():
        idle = figures["idle_summary"]
        lines.append(f"| {kind} | {fmt_ms(idle['p50'])} | {fmt_ms(idle['p99'])} | "
                     f"{figures['idle_rss_mib']:.1f} |")
    lines += [
        "",
        "### Request -> re-put cycles (S servers, C clients)",
        "",
        "Latency is REQUEST to answer as the client sees it (with C > S it includes the wait "
        "for a free server). With several runs per configuration the row is the run with the "
        "median rate (the upper one of two), and the rates of all runs follow in brackets. The last column is the "
        "machine's 1-minute load average when the row's run started (2 cores: above 2, other "
        "processes were competing for them).",
        "",
        "| S | C | ours cycles/s | TVM cycles/s | ratio | ours p50 / p99 (ms) | "
        "TVM p50 / p99 (ms) | ours peak RSS (MiB) | TVM peak RSS (MiB) | "
        "CPU ours / TVM / driver (%) | load avg ours / TVM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ours_rows = {(r["servers"], r["clients"]): r for r in (ours or {}).get("sweep", [])}
    tvm_rows = {(r["servers"], r["clients"]): r for r in (tvm or {}).get("sweep", [])}
    for config in sorted(set(ours_rows) | set(tvm_rows)):
        row = ours_rows.get(config, {"servers": config[0], "clients": config[1],
                                     "cycles_per_s": None, "p50_ms": None, "p99_ms": None,
                                     "peak_rss_mib": 0, "tracker_cpu": 0, "driver_cpu": 0})
        other = tvm_rows.get(config, {})
        lines.append(
            f"| {row['servers']} | {row['clients']} | {rate(row)} | {rate(other)} | "
            f"{ratio(row['cycles_per_s'], other.get('cycles_per_s'))} | "
            f"{fmt_ms(row['p50_ms'])} / {fmt_ms(row['p99_ms'])} | "
            f"{fmt_ms(other.get('p50_ms'))} / {fmt_ms(other.get('p99_ms'))} | "
            f"{row['peak_rss_mib']:.1f} | {other.get('peak_rss_mib', 0):.1f} | "
            f"{row['tracker_cpu']:.0f} / {other.get('tracker_cpu', 0):.0f} / "
            f"{row['driver_cpu']:.0f} | {row.get('load', 0):.1f} / {other.get('load', 0):.1f} |")
    if not options.scale_servers:
        lines += ["", "### Against issue 2's targets", ""] + targets(results)
        return "\n".join(lines) + "\n"
    lines += [
        "",
        f"### Scale: {options.scale_servers} servers, {options.scale_pending} pending requests",
        "",
        f"Each server holds the request it is handed for {options.hold:g} s on average, then "
        "PUTs a fresh matchkey; each answered client asks again at once. Latency is from a "
        f"server's PUT to the answer reaching a waiting client, over {options.scale_duration:g} s. "
        "The driver's own event-loop lag (how late its 5 ms sleeps wake up during the window) is "
        "shown beside it: on a loaded machine it bounds what the p99 can show.",
        "",
        "| tracker | PUT->answer p50 (ms) | p99 (ms) | max (ms) | answers/s | pending seen | "
        "SUMMARY under load p50 (ms) | peak RSS (MiB) | set-up (s) | driver loop lag p99 (ms) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, figures in results.items():
        runs = figures.get("scale_runs", [])
        for number, row in enumerate(runs, 1):
            name = kind if len(runs) == 1 else f"{kind} (run {number})"
            if "failed" in row:
                lines.append(f"| {name} | did not cope: {row['failed']} | | | | | | | | |")
                continue
            lines.append(
                f"| {name} | {fmt_ms(row['p50_ms'])} | {fmt_ms(row['p99_ms'])} | "
                f"{fmt_ms(row['max_ms'])} | {row['answers_per_s']:.0f} | {row['pending_seen']} | "
                f"{fmt_ms(row['summary_p50_ms'])} | {row['peak_rss_mib']:.1f} | "
                f"{row['setup_s']:.1f} | {fmt_ms(row['driver_lag_p99_ms'])} |")
    lines += ["", "### Against issue 2's targets", ""]
    if options.scale_runs > 1:
        lines += [f"The scale figures below are those of the run with the median p99 of "
                  f"{options.scale_runs}.", ""]
    lines += targets(results)
    return "\n".join(lines) + "\n"


def targets(results):
    """@return: Markdown lines stating, plainly, each target and whether it was met."""
    ours, tvm = results.get("ours", {}), results.get("tvm", {})
    lines = []
    tvm_rows = {(r["servers"], r["clients"]): r for r in tvm.get("sweep", [])}
    for row in ours.get("sweep", []):
        key = (row["servers"], row["clients"])
        if key not in [(1, 1), (8, 32)] or key not in tvm_rows:
            continue
        got = row["cycles_per_s"] / max(tvm_rows[key]["cycles_per_s"], 1e-9)
        lines.append(f"- cycles/s at S={key[0]}, C={key[1]} >= 20x TVM's: {got:.1f}x "
                     f"({'met' if got >= 20 else 'NOT met'})")
    row = ours.get("scale")
    if row and "failed" not in row:
        lines.append(f"- {row['servers']} servers / {row['pending_target']} pending: p99 < 5 ms: "
                     f"{fmt_ms(row['p99_ms'])} ms ({'met' if row['p99_ms'] < 5 else 'NOT met'}); "
                     f"RSS < 100 MB: {row['peak_rss_mib'] * MiB / 1e6:.0f} MB "
                     f"({'met' if row['peak_rss_mib'] * MiB < 100e6 else 'NOT met'})")
    elif row:
        lines.append(f"- scale scenario: ours did not cope: {row['failed']}")
    if "idle_summary" in ours:
        p50 = ours["idle_summary"]["p50"]
        lines.append(f"- idle SUMMARY < 1 ms: p50 {fmt_ms(p50)} ms "
                     f"({'met' if p50 < 1 else 'NOT met'})")
    return lines


def parse_sweep(text):
    """Parse C{"1x1,8x32"} into C{[(1, 1), (8, 32)]}."""
    pairs = []
    for item in text.split(","):
        servers, _, clients = item.strip().partition("x")
        pairs.append((int(servers), int(clients)))
    return pairs


def parse_args(argv):
    """@return: the parsed command line, with the C{--quick} defaults applied."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: short windows, small sweep and scale")
    parser.add_argument("--trackers", default="ours,tvm",
                        help="which trackers to run, comma-separated (ours,tvm)")
    parser.add_argument("--duration", type=float, help="seconds per sweep window (3)")
    parser.add_argument("--warmup", type=float, help="seconds before each window (0.5)")
    parser.add_argument("--sweep", type=parse_sweep,
                        help="SxC pairs, comma-separated (1x1,8x8,8x32,32x32)")
    parser.add_argument("--sweep-runs", type=int,
                        help="runs per sweep configuration; the median run is reported (1)")
    parser.add_argument("--summary-samples", type=int, help="idle SUMMARY samples (100)")
    parser.add_argument("--scale-servers", type=int, help="servers in the scale run (1000; 0 skips)")
    parser.add_argument("--scale-pending", type=int, help="pending requests in the scale run (10000)")
    parser.add_argument("--scale-duration", type=float, help="seconds of the scale window (10)")
    parser.add_argument("--scale-runs", type=int,
                        help="scale runs per tracker, each on a fresh tracker (1)")
    parser.add_argument("--hold", type=float, help="mean seconds a server holds a request (1)")
    parser.add_argument("--setup-timeout", type=float,
                        help="seconds allowed to set the scale run up (60)")
    parser.add_argument("--write-docs", action="store_true",
                        help=f"write the figures into {DOCS.relative_to(DOCS.parent.parent)}")
    parser.add_argument("--json", help="also write the raw figures to this file")
    options = parser.parse_args(argv)
    defaults = dict(duration=3.0, warmup=0.5, sweep_runs=1, sweep=[(1, 1), (8, 8), (8, 32), (32, 32)],
                    summary_samples=100, scale_servers=1000, scale_pending=10000,
                    scale_duration=10.0, scale_runs=1, hold=1.0, setup_timeout=60.0)
    if options.quick:
        defaults.update(duration=1.0, warmup=0.3, sweep=[(1, 1), (8, 32)], summary_samples=20,
                        scale_servers=100, scale_pending=1000, scale_duration=2.0, hold=0.5,
                        setup_timeout=20.0)
    for name, value in defaults.items():
        if getattr(options, name) is None:
            setattr(options, name, value)
    options.command_line = shown_command_line(argv)
    options.trackers = [t.strip() for t in options.trackers.split(",") if t.strip()]
    unknown = set(options.trackers) - set(TRACKERS)
    if unknown:
        parser.error(f"unknown trackers: {', '.join(sorted(unknown))}")
    return options


def main(argv=None):
    """Run the benchmark; @return: the exit status."""
    options = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every daemon's process group is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    raise_fd_limit(options.scale_servers + options.scale_pending + 1024)
    machine = machine_description()
    print("machine: " + "; ".join(f"{k}={v}" for k, v in machine.items()), flush=True)
    results = {}
    for kind in options.trackers:
        results[kind] = run_tracker(kind, options)
    body = report(results, options, machine)
    print()
    print(body)
    if options.json:
        Path(options.json).write_text(json.dumps({"machine": machine, "results": results},
                                                 indent=2), encoding="utf-8")
    if options.write_docs:
        replace_section(DOCS, "Machine", "\n".join(machine_markdown(machine)))
        replace_section(DOCS, "Tracker", body)
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
