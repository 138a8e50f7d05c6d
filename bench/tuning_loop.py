"""A tuner's measuring loop, end to end: N candidates on K devices through a tracker.

Usage (from the repository root, with apache-tvm installed)::

    python bench/tuning_loop.py [--candidates 64] [--devices 1 4] [--number 3]
                                [--repeat 2] [--min-repeat-ms 0] [--session-timeout 30]
                                [--rounds 4] [--tracker client|servers|ours|tvm]
                                [--only CLIENT/SERVERS ...] [--write-docs] [--json FILE]

For a quick look at a few rows, e.g.
``python bench/tuning_loop.py --candidates 16 --rounds 2 --only ours/ours --only tvm/tvm``.

N candidates (``bench/tuning_candidates.py``: schedules of a small matmul,
compiled for llvm in this process) are measured on K devices (K servers
registered under one key) as MetaSchedule measures them, each candidate in
its own session: session via the tracker, upload, load, allocate and
randomly fill the arguments, ``time_evaluator``, clean up. Four rows per K,
client x servers, all in one run:

- **TVM's client + TVM's servers**: MetaSchedule's ``RPCRunner`` as shipped
  (its pool of K worker processes, ``max_workers=K``) on K
  ``python -m tvm.exec.rpc_server`` (``bench/tuning_tvm_runner.py``);
- **our client + TVM's servers**: the same steps with our Deferred client,
  K devices driven concurrently from one reactor in one process, no threads
  (``bench/tuning_our_client.py``, whose docstring lists the steps);
- **our client + our servers**: the same on K ``twistd rpc-server``;
- **TVM's client + our servers**: the ``RPCRunner`` on our servers.

The tracker is the client's own kind by default: TVM's tracker for TVM's
client, ours for ours, in front of either kind of servers (the host side,
tracker and tuning client, changes together; the devices keep whichever
server they run), so the baseline row is TVM's setup as shipped throughout.
``--tracker servers`` puts the servers' own kind in front of them instead,
``--tracker ours|tvm`` the same tracker in front of every row; every
combination gets servers of its own. Our servers register ``tvm.contrib.random.random_fill_for_measure``
for our protocol with ``--init bench.tuning_funcs`` (see there why).

Every row uses the same candidates, evaluator settings (``number``,
``repeat``, ``min_repeat_ms``, no cache flush) and N. The rows take turns:
the candidates are split into ``--rounds`` chunks and each round runs every
row on its chunk (in a rotated order), so the load of this shared machine
moves all rows alike. A row first measures K candidates untimed (TVM's runner
once, as its pool lives on between rounds; ours in each round, as each round
is a fresh process). It reports candidates per second (N over the summed
wall time, from the first request to the last result of each round), the
mean seconds per step of a candidate: session, upload (+ load), alloc (+
fill), run (the evaluator), cleanup (the removes, and for our client the
session's close), and "rest", the time a device's worker spends per
candidate outside these steps (K x wall / N minus the steps: the runner's
dispatch, a tracker connection, TVM's session shutdown); and the CPU time
per candidate of the client and of the K servers. A row whose client cannot
use the servers is reported as failed with the first error, and the run goes
on.

``--write-docs`` replaces the ``Tuning loop`` section of ``docs/benchmarks.md``.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import tuning_candidates, tuning_tvm_runner  # noqa: E402
from bench.common import (  # noqa: E402
    DOCS,
    Daemon,
    child_env,
    free_port,
    free_servers,
    machine_description,
    our_tracker,
    replace_section,
    tvm_tracker,
    twistd,
    wait_summary,
)
from bench.tuning_our_client import WARMED  # noqa: E402
from bench.tuning_report import (  # noqa: E402
    NAMES,
    ROWS,
    docs_body,
    summarize,
    table,
    verdicts,
)

def tracker_of(row, option):
    """
    @param row: C{(client, servers)}.
    @param option: C{--tracker}: C{"client"}, C{"servers"}, C{"ours"} or C{"tvm"}.
    @return: the kind of tracker in front of the row's servers.
    """
    if option == "client":
        return row[0]
    if option == "servers":
        return row[1]
    return option


def _launch(stack, servers, tracker_port, key):
    """
    Start one server of kind C{servers} registering C{key} with the tracker
    (stopped with C{stack}); @return: C{(daemon, the line that says it is up)}.
    """
    where = f"127.0.0.1:{tracker_port}"
    if servers == "tvm":
        port = free_port()
        args = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                "--port", str(port), "--port-end", str(port + 1), "--tracker", where,
                "--key", key]
        ready = r"bind to"
    else:
        args = twistd("rpc-server", "--listen", "tcp:0:interface=127.0.0.1", "--tracker", where,
                      "--key", key, "--silent", "--init", "bench.tuning_funcs")
        ready = r"rpc-server listening on \S+:\d+"
    daemon = Daemon(args)
    stack.callback(daemon.stop)
    return daemon, ready


def start_lab(stack, options):
    """
    Start the trackers and, for each kind of servers, each tracker in front
    of them and each K, K servers under a key of their own, all at once;
    everything is stopped with C{stack}.

    @return: C{(ports, keys, pids)}: tracker kind -> port; C{(servers kind,
        tracker kind, K)} -> key, and -> the servers' process ids.
    """
    combos = sorted({(servers, tracker_of((client, servers), options.tracker))
                     for client, servers in options.only})
    ports, keys, pids, starting = {}, {}, {}, []
    for tracker_kind in sorted({tracker for _, tracker in combos}):
        start = our_tracker if tracker_kind == "ours" else tvm_tracker
        ports[tracker_kind] = stack.enter_context(start())[1]
    for servers, tracker_kind in combos:
        for devices in options.devices:
            key = keys[servers, tracker_kind, devices] = \
                f"tuning-{servers}-{tracker_kind}-{devices}"
            print(f"starting {devices} of {NAMES[servers]} servers behind "
                  f"{NAMES[tracker_kind]} tracker", flush=True)
            launched = [_launch(stack, servers, ports[tracker_kind], key)
                        for _ in range(devices)]
            pids[servers, tracker_kind, devices] = [d.proc.pid for d, _ in launched]
            starting += launched
    for daemon, ready in starting:
        daemon.wait_for(ready, timeout=120)
    return ports, keys, pids


def servers_cpu_seconds(pids):
    """
    @return: the CPU seconds used so far by the servers C{pids} and their
        descendants, including the session processes they reaped.
    """
    total = 0.0
    for pid in pids:
        root = psutil.Process(pid)
        for process in [root] + root.children(recursive=True):
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system + times.children_user + times.children_system
    return total


def run_our_client(tracker_port, key, devices, warm_up, candidates, options, directory,
                   starting):
    """
    Our client on C{candidates}, after C{warm_up} untimed, in a process of
    its own (one reactor).

    @param starting: called once the warm-up is over, before the measure
        starts (the client waits for it).
    @return: its report (see tuning_our_client.main), or C{refused} with why it failed.
    """
    manifest = os.path.join(directory, "manifest.json")
    with open(manifest, "w", encoding="utf-8") as f:
        json.dump(list(warm_up) + list(candidates), f)
    args = [sys.executable, "-m", "bench.tuning_our_client", "--tracker-port", str(tracker_port),
            "--key", key, "--devices", str(devices), "--manifest", manifest,
            "--warm-up", str(len(warm_up)), "--number", str(options.number),
            "--repeat", str(options.repeat), "--min-repeat-ms", str(options.min_repeat_ms),
            "--session-timeout", str(options.session_timeout)]
    limit = options.session_timeout * ((len(warm_up) + len(candidates)) // devices + 4) + 60
    process = subprocess.Popen(args, cwd=ROOT, env=child_env(), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    # Past the limit the client's process group is killed, which ends every read below.
    watchdog = threading.Timer(limit, os.killpg, (process.pid, signal.SIGKILL))
    watchdog.start()
    try:
        first = process.stdout.readline()
        if first.strip() == WARMED.encode():
            starting()
            process.stdin.write(b"go\n")
            process.stdin.flush()
            first = b""
        out, err = process.communicate()
    finally:
        watchdog.cancel()
    lines = (first + out).decode().strip().splitlines()
    if process.returncode != 0 or not lines:
        tail = " ".join(err.decode(errors="replace").strip().splitlines()[-3:])
        return {"refused": f"exit {process.returncode}: {tail}"}
    return json.loads(lines[-1])


def split(candidates, rounds):
    """@return: C{candidates} in C{rounds} consecutive chunks (sizes differing by one at most)."""
    size, extra = divmod(len(candidates), rounds)
    chunks, start = [], 0
    for index in range(rounds):
        end = start + size + (1 if index < extra else 0)
        chunks.append(candidates[start:end])
        start = end
    return [chunk for chunk in chunks if chunk]


def run_all(options, candidates, directory, steps_directory):
    """
    Measure every chosen row for every K, the rows taking turns: the
    candidates are split into C{--rounds} chunks and each round runs every
    row on one chunk (in a rotated order), so a change of the shared
    machine's load touches every row alike.

    @return: C{{(client, servers, K): {"tracker", "outcomes", "walls", "refused"}}}.
    """
    results = {}
    with ExitStack() as stack:
        ports, keys, pids = start_lab(stack, options)
        for devices in options.devices:
            rows = [row for row in ROWS if row in options.only]
            for row in rows:
                results[row + (devices,)] = {"tracker": tracker_of(row, options.tracker),
                                             "outcomes": [],
                                             "walls": [], "refused": None,
                                             "client_cpu": 0.0, "server_cpu": 0.0}
            runners = {}
            try:
                for number, chunk in enumerate(split(candidates, options.rounds)):
                    turn = number % len(rows)
                    for client, servers in rows[turn:] + rows[:turn]:
                        result = results[client, servers, devices]
                        if result["refused"]:
                            continue
                        tracker_kind = tracker_of((client, servers), options.tracker)
                        port = ports[tracker_kind]
                        key = keys[servers, tracker_kind, devices]
                        lab = pids[servers, tracker_kind, devices]
                        wait_summary(port, lambda s: free_servers(s, key) >= devices,
                                     timeout=120)
                        server_cpu = []

                        def starting(lab=lab):
                            server_cpu.append(servers_cpu_seconds(lab))

                        if client == "tvm":
                            report = _tvm_round(runners, (servers, port, key, devices),
                                                candidates[:devices], chunk, options,
                                                steps_directory, starting)
                        else:
                            report = run_our_client(port, key, devices, candidates[:devices],
                                                    chunk, options, directory, starting)
                        if "refused" in report:
                            result["refused"] = report["refused"]
                        else:
                            result["outcomes"] += report["outcomes"]
                            result["walls"].append((len(chunk), report["wall"]))
                            result["client_cpu"] += report["client_cpu"]
                            result["server_cpu"] += servers_cpu_seconds(lab) - server_cpu[0]
                        print(f"  round {number + 1}, K={devices}, {NAMES[client]} client, "
                              f"{NAMES[servers]} servers: " + _line(report), flush=True)
            finally:
                for runner in runners.values():
                    runner.close()
    return results


def _tvm_round(runners, where, warm_up, chunk, options, steps_directory, starting):
    """
    One round of MetaSchedule's runner on C{chunk}, with the row's runner
    made (and warmed up) on its first round.

    @param where: C{(servers kind, tracker port, key, K)}.
    @param starting: called right before the measure.
    @return: the measure's report, or C{refused}.
    """
    servers, port, key, devices = where
    runner = runners.get(servers)
    if runner is None:
        runner = runners[servers] = tuning_tvm_runner.RunnerRow(
            port, key, devices, (options.number, options.repeat, options.min_repeat_ms),
            options.session_timeout, steps_directory)
        runner.warm_up(warm_up)
    if runner.refused:
        return {"refused": runner.refused}
    starting()
    return runner.measure(chunk)


def _line(report):
    """@return: one progress line for one round of a row."""
    if "refused" in report:
        return f"failed: {report['refused']}"
    errors = [o["error"] for o in report["outcomes"] if "error" in o]
    return (f"{len(report['outcomes']) / report['wall']:.1f} candidates/s, {len(errors)} errors"
            + (f" (first: {errors[0]})" if errors else ""))


def parse_args(argv=None):
    """@return: the parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--number", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--min-repeat-ms", type=int, default=0)
    parser.add_argument("--session-timeout", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=4,
                        help="the rows take turns over this many chunks of the candidates")
    parser.add_argument("--tracker", choices=("client", "servers", "ours", "tvm"),
                        default="client",
                        help="the tracker in front of a row's servers: the client's kind "
                             "(default), the servers' kind, or always ours or TVM's")
    parser.add_argument("--only", action="append", metavar="CLIENT/SERVERS",
                        choices=[f"{c}/{s}" for c, s in ROWS],
                        help="measure only these rows (repeatable), e.g. ours/ours")
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--json", metavar="FILE")
    options = parser.parse_args(argv)
    if min([options.candidates, options.rounds] + options.devices) < 1:
        parser.error("--candidates, --rounds and --devices must be at least 1")
    options.only = ([tuple(row.split("/")) for row in options.only] if options.only
                    else list(ROWS))
    return options


def main(argv=None):
    """Build the candidates, measure every row, print and record; @return: the exit status."""
    options = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every daemon's process group is stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started = time.time()
    machine = machine_description()
    with tempfile.TemporaryDirectory() as directory, \
            tempfile.TemporaryDirectory() as steps_directory:
        building = time.perf_counter()
        candidates = tuning_candidates.build(options.candidates, directory)
        print(f"built {len(candidates)} candidates in {time.perf_counter() - building:.1f} s",
              flush=True)
        measured = run_all(options, candidates, directory, steps_directory)
    results = {row: summarize(result, row[2]) for row, result in measured.items()}
    text = table(results, options)
    lines = verdicts(results)
    print()
    print(text)
    print("\n".join(lines))
    if options.json:
        Path(options.json).write_text(json.dumps(
            {"machine": machine,
             "results": [{"client": c, "servers": s, "devices": k, **summary}
                         for (c, s, k), summary in results.items()]}, indent=2),
            encoding="utf-8")
    if options.write_docs:
        replace_section(DOCS, "Tuning loop", docs_body(text, lines, options, machine, started))
        print(f"wrote {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
