"""TVM's own client against TVM's rpc_server and against ours, in one run (``bench/session.py``).

One tracker (ours), two servers behind it under different keys: TVM's
``python -m tvm.exec.rpc_server`` and ``twistd rpc-server``. TVM's client
(``tvm.rpc.connect_tracker(...).request(key)``) measures both the same way,
one measure at a time, the two servers taking turns inside each measure (each
open, each blob move, each of L{ROUNDS} rounds of calls or evaluator round
trips) so a change in the machine's load shifts both alike:

- session open via the tracker: ``request(key)``, then the session is dropped
  (the next request also waits for the server to register again, as in a
  tuning loop); p50 and p90;
- upload and download of a blob (MB/s, best of two);
- a trivial call, ``testing.add_one``: a C++ global of TVM's FFI library,
  so it is on every server that runs TVM's runtime and measures the RPC path
  alone (no Python on the server side of the call); p50 round trip, in each
  placement of ``bench/session.py``;
- a ``time_evaluator`` round trip, MetaSchedule's measuring step: a tiny add
  kernel is uploaded and loaded once per session, then each round trip is
  ``mod.time_evaluator("add", dev, number=1, repeat=1)(a, b, c)`` (create the
  remote evaluator, run it, free it), timed on the client's wall clock; p50.

A server that refuses TVM's client (ours, until issue 8's bridge lands) or
fails mid-run is reported as refused with the error, and the run goes on with
the other server.
"""

import gc
import os
import statistics
import tempfile
import sys
import time

from bench.common import (
    free_servers,
    our_rpc_server,
    our_tracker,
    percentile,
    tvm_rpc_server,
    wait_summary,
)

SERVERS = (("tvm", "bench-tvm"), ("ours", "bench-ours"))
TRIVIAL_CALL = "testing.add_one"
ADD_LENGTH = 256
#: The repeated measures (calls, evaluator round trips) run in this many
#: rounds, the servers taking turns between rounds.
ROUNDS = 5


def compile_add(directory):
    """
    Compile ``C = A + B`` (float32, L{ADD_LENGTH}) for llvm as function ``add``.

    @return: the path of the exported library in C{directory}.
    """
    import tvm
    from tvm import te

    a = te.placeholder((ADD_LENGTH,), "float32", name="A")
    b = te.placeholder((ADD_LENGTH,), "float32", name="B")
    c = te.compute((ADD_LENGTH,), lambda i: a[i] + b[i], name="C")
    function = te.create_prim_func([a, b, c]).with_attr("global_symbol", "add")
    path = os.path.join(directory, "add.so")
    tvm.compile(function, target="llvm").export_library(path)
    return path


def _error_line(error):
    """@return: the first non-empty line of an error's text, with its type."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    # TVM wraps a remote error: its first line is "RPCError: Error caught from RPC call:".
    if text.rstrip().endswith(":") and len(lines) > 1:
        text = f"{text} {lines[1].strip()}"
    return f"{type(error).__name__}: {text}"


class _Run:
    """
    The measures of one run: which servers are still measured, their
    figures, and why any was dropped.

    @ivar figures: server name -> measure name -> list of seconds (or a dict
        of them per placement).
    @ivar refused: server name -> the error that ended its measures.
    """

    def __init__(self, tracker, keys, pids):
        self.tracker = tracker
        self.keys = keys
        self.pids = pids
        self.figures = {name: {} for name in keys}
        self.refused = {}
        self.sessions = {}

    def live(self):
        """@return: the servers still measured, in turn order."""
        return [name for name in self.keys if name not in self.refused]

    def each(self, step, *args):
        """
        Run C{step(self, name, *args)} for each live server; a server whose
        step raises is dropped from the run with the error.
        """
        for name in self.live():
            try:
                step(self, name, *args)
            except Exception as error:
                self.refused[name] = _error_line(error)
                self.sessions.pop(name, None)
                print(f"{name}: dropped from the run: {self.refused[name]}", file=sys.stderr)
                gc.collect()

    def request(self, name):
        """@return: a new session of server C{name}, asked for once (no retries)."""
        return self.tracker.request(self.keys[name], max_retry=1)


def _open_session(run, name, library):
    """Open the session that the data, call and evaluator measures use."""
    import numpy as np
    import tvm

    session = run.request(name)
    session.upload(library, "add.so")
    module = session.load_module("add.so")
    device = session.cpu(0)
    arrays = [tvm.runtime.tensor(np.full(ADD_LENGTH, v, "float32"), device)
              for v in (1.0, 2.0, 0.0)]
    run.sessions[name] = {"session": session, "module": module, "device": device,
                          "arrays": arrays, "call": session.get_function(TRIVIAL_CALL)}


def _rounds(total):
    """@return: C{total} split into L{ROUNDS} counts (fewer when C{total} is small)."""
    rounds = max(1, min(ROUNDS, total))
    return [total // rounds + (1 if i < total % rounds else 0) for i in range(rounds)]


def _warm_up(run, name):
    """One untimed session with one call."""
    session = run.request(name)
    session.get_function(TRIVIAL_CALL)(1)
    del session
    gc.collect()


def _open_once(run, name):
    """Time one session open via the tracker, then drop the session."""
    started = time.perf_counter()
    session = run.request(name)
    run.figures[name]["open"].append(time.perf_counter() - started)
    del session
    gc.collect()


def _move_blob(run, name, blob):
    """Time one upload and one download of C{blob}, then remove it."""
    session = run.sessions[name]["session"]
    figures = run.figures[name]
    started = time.perf_counter()
    session.upload(bytearray(blob), "blob")
    figures["upload"].append(time.perf_counter() - started)
    started = time.perf_counter()
    back = session.download("blob")
    figures["download"].append(time.perf_counter() - started)
    if len(back) != len(blob):
        raise AssertionError(f"downloaded {len(back)} bytes of {len(blob)}")
    del back
    session.remove("blob")


def _warm_calls(run, name):
    """Untimed calls first, as on the other side of C{bench/session.py}."""
    call = run.sessions[name]["call"]
    for i in range(200):
        call(i)


def _calls(run, name, count, label, where, place):
    """Time C{count} more sequential trivial calls with the processes placed at C{where}."""
    call = run.sessions[name]["call"]
    place(run.pids[name], where)
    try:
        times = run.figures[name]["call"][label]
        for i in range(count):
            started = time.perf_counter()
            if call(i) != i + 1:
                raise AssertionError(f"{TRIVIAL_CALL}({i}) answered wrong")
            times.append(time.perf_counter() - started)
    finally:
        place(run.pids[name], None)


def _evaluations(run, name, count):
    """Time C{count} more C{time_evaluator} round trips of the add kernel; check its result."""
    state = run.sessions[name]
    module, device, arrays = state["module"], state["device"], state["arrays"]
    times = run.figures[name]["evaluator"]
    for _ in range(count):
        started = time.perf_counter()
        costs = module.time_evaluator("add", device, number=1, repeat=1)(*arrays)
        times.append(time.perf_counter() - started)
        if not costs.results or costs.results[0] <= 0:
            raise AssertionError(f"time_evaluator gave {costs.results}")
    if not (arrays[2].numpy() == 3.0).all():
        raise AssertionError("the add kernel computed a wrong result")


def measure(args, blob, placements, place):
    """
    Start the tracker and both servers, measure with TVM's client.

    @param args: the parsed command line of C{bench/session.py}.
    @param blob: the bytes to upload and download.
    @param placements: C{[(label, where)]} for the call measure.
    @param place: C{place(server_pid, where)}, as in C{bench/session.py}.
    @return: C{(figures, refused)}: server name -> measures, and server name
        -> the error that ended its measures.
    """
    import tvm.rpc

    keys = dict(SERVERS)
    with tempfile.TemporaryDirectory() as directory, \
            our_tracker() as (_, tracker_port), \
            tvm_rpc_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", keys["tvm"]) \
            as (tvm_daemon, _), \
            our_rpc_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", keys["ours"],
                           "--silent") as (our_daemon, _):
        with open(compile_add(directory), "rb") as f:
            library = bytearray(f.read())
        wait_summary(tracker_port,
                     lambda s: all(free_servers(s, key) for key in keys.values()), timeout=60)
        tracker = tvm.rpc.connect_tracker("127.0.0.1", tracker_port)
        run = _Run(tracker, keys, {"tvm": tvm_daemon.proc.pid, "ours": our_daemon.proc.pid})

        # One untimed session each first: start-up is not measured, and a
        # server that refuses TVM's client is found here.
        run.each(_warm_up)
        for name in run.live():
            run.figures[name]["open"] = []
        for _ in range(args.opens):
            run.each(_open_once)
        run.each(_open_session, library)
        for name in run.live():
            run.figures[name].update(upload=[], download=[], call={}, evaluator=[])
        for _ in range(2):
            run.each(_move_blob, blob)
        run.each(_warm_calls)
        for label, where in placements:
            for name in run.live():
                run.figures[name]["call"][label] = []
            for count in _rounds(args.calls):
                run.each(_calls, count, label, where, place)
        for count in _rounds(args.evaluations):
            run.each(_evaluations, count)
        run.sessions.clear()
        gc.collect()
        tracker.close()
    return run.figures, run.refused


def summarize(figures, size):
    """@return: the headline numbers of one server's figures (measured ones only)."""
    summary = {}
    if figures.get("open"):
        summary["open_p50_ms"] = statistics.median(figures["open"]) * 1000
        summary["open_p90_ms"] = percentile(figures["open"], 0.9) * 1000
    if figures.get("upload"):
        summary["upload_mb_s"] = size / min(figures["upload"]) / 1e6
    if figures.get("download"):
        summary["download_mb_s"] = size / min(figures["download"]) / 1e6
    for label, calls in figures.get("call", {}).items():
        if calls:
            summary[f"call_p50_ms/{label}"] = statistics.median(calls) * 1000
    if figures.get("evaluator"):
        summary["evaluator_p50_ms"] = statistics.median(figures["evaluator"]) * 1000
    return summary


ROWS = [
    ("session open via tracker, p50 (ms)", "open_p50_ms", "lower"),
    ("session open via tracker, p90 (ms)", "open_p90_ms", "lower"),
    ("upload {mib} MiB (MB/s)", "upload_mb_s", "higher"),
    ("download {mib} MiB (MB/s)", "download_mb_s", "higher"),
    ("trivial call `" + TRIVIAL_CALL + "`, p50 (ms), {placement}", "call_p50_ms", "lower"),
    ("`time_evaluator` round trip, p50 (ms)", "evaluator_p50_ms", "lower"),
]


def rows(placement_labels):
    """@return: C{(label, key, better)} of every row, call rows once per placement."""
    measured = []
    for label, name, better in ROWS:
        if name == "call_p50_ms":
            measured += [(label.replace("{placement}", placement), f"{name}/{placement}", better)
                         for placement in placement_labels]
        else:
            measured.append((label, name, better))
    return measured


def cost_ratio(ours, tvms, better):
    """
    @return: how much more ours costs than TVM's server on a row: ours/TVM's
        for a time, TVM's/ours for a throughput (1.10 = 10% worse).
    """
    return ours / tvms if better == "lower" else tvms / ours


def _cell(value, refused):
    """@return: a table cell: the figure, or why there is none."""
    if value is not None:
        return f"{value:,.3f}"
    return "refused" if refused else "-"


def table(summaries, refused, args, placement_labels):
    """@return: the Markdown table, TVM's server next to ours, and any refusal below it."""
    tvms, ours = summaries.get("tvm", {}), summaries.get("ours", {})
    lines = [
        "| measure (TVM's client) | TVM's server | our server "
        "| ours:TVM cost (<= 1.10 meets the target) |",
        "|---|---:|---:|---:|",
    ]
    for label, name, better in rows(placement_labels):
        text = label.format(mib=args.blob_mib)
        mine = ours.get(name)
        theirs = tvms.get(name)
        theirs_cell = _cell(theirs, "tvm" in refused)
        mine_cell = _cell(mine, "ours" in refused)
        ratio = (f"{cost_ratio(mine, theirs, better):,.2f}x"
                 if mine is not None and theirs is not None else "-")
        lines.append(f"| {text} | {theirs_cell} | {mine_cell} | {ratio} |")
    for name, error in refused.items():
        server = "TVM's server" if name == "tvm" else "Our server"
        lines.append("")
        lines.append(f"{server}: refused: {error}")
    return "\n".join(lines)


def targets(summaries, refused, placement_labels, mib):
    """
    @param mib: the blob's size in MiB, for the row labels.
    @return: Markdown lines saying which of issue 8's targets this run met.
    """
    tvms, ours = summaries.get("tvm", {}), summaries.get("ours", {})
    if refused:
        return [f"- not measured: {', '.join(sorted(refused))} refused TVM's client"]
    ratios = [(cost_ratio(ours[name], tvms[name], better), label.format(mib=mib))
              for label, name, better in rows(placement_labels)
              if name in ours and name in tvms]
    over = [f"{label}: {ratio:.2f}x" for ratio, label in ratios if ratio > 1.10]
    within = "met" if not over else f"NOT met ({'; '.join(over)})"
    faster = "met" if ours["open_p50_ms"] < tvms["open_p50_ms"] else "NOT met"
    return [
        f"- ours within 1.1x of TVM's server on every row: {within}",
        f"- session open faster than TVM's server (p50): {faster}",
    ]
