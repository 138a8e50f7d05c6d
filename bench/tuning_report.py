"""The figures and the text of ``bench/tuning_loop.py``: rows summed up, the table, the docs.

Pure functions over what the run measured (no daemons, no clients), so the
report's shape can change without touching the measuring.
"""

import statistics
import time

from bench import tuning_candidates
from bench.common import machine_markdown, shown_command_line
from bench.tuning_our_client import STEPS

#: (client, servers) of every row, in the order they are reported.
ROWS = (("tvm", "tvm"), ("ours", "tvm"), ("ours", "ours"), ("tvm", "ours"))
NAMES = {"tvm": "TVM's", "ours": "our"}
#: Candidates/s over the baseline (TVM's client and servers) each row must reach.
TARGETS = {4: {("ours", "tvm"): 2.0, ("ours", "ours"): 3.0},
           1: {("ours", "tvm"): 1.0, ("ours", "ours"): 1.0}}


def summarize(result, devices):
    """@return: a row's figures: candidates/s (and per round), mean steps, rest, errors."""
    if result["refused"] or not result["walls"]:
        return {"refused": result["refused"] or "not measured", "tracker": result["tracker"]}
    outcomes = result["outcomes"]
    count = sum(n for n, _ in result["walls"])
    wall = sum(w for _, w in result["walls"])
    errors = [o["error"] for o in outcomes if "error" in o]
    steps = {}
    for step in STEPS:
        values = [o["steps"][step] for o in outcomes if "error" not in o and step in o["steps"]]
        steps[step] = statistics.fmean(values) if values else None
    measured = [v for v in steps.values() if v is not None]
    device_times = [min(o["run_secs"]) for o in outcomes if "run_secs" in o]
    return {
        "tracker": result["tracker"],
        "candidates": count,
        "candidates_per_s": count / wall,
        "per_round": [n / w for n, w in result["walls"]],
        "steps": steps,
        "rest": devices * wall / count - sum(measured),
        "client_cpu": result["client_cpu"] / count,
        "server_cpu": result["server_cpu"] / count,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "device_median_ms": statistics.median(device_times) * 1e3 if device_times else None,
    }


def _ms(seconds):
    """@return: C{seconds} as milliseconds for a table cell, or a dash."""
    return "-" if seconds is None else f"{seconds * 1e3:.1f}"


def table(results, options):
    """@return: the Markdown table of every row measured."""
    lines = [
        "| K | client | servers (tracker) | candidates/s | per round "
        "| vs TVM's client + servers | session | upload | alloc | run | cleanup | rest "
        "| client CPU | servers' CPU | errors |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for devices in options.devices:
        base = results.get(("tvm", "tvm", devices), {})
        for client, servers in ROWS:
            summary = results.get((client, servers, devices))
            if summary is None:
                continue
            who = f"| {devices} | {NAMES[client]} | {NAMES[servers]} ({NAMES[summary['tracker']]}) "
            if "refused" in summary:
                lines.append(who + f"| failed: {summary['refused']} |" + " |" * 11)
                continue
            ratio = (f"{summary['candidates_per_s'] / base['candidates_per_s']:.2f}x"
                     if "candidates_per_s" in base else "-")
            steps = " | ".join(_ms(summary["steps"][step]) for step in STEPS)
            rounds = ", ".join(f"{rate:.0f}" for rate in summary["per_round"])
            lines.append(who + f"| {summary['candidates_per_s']:.1f} | {rounds} | {ratio} "
                         f"| {steps} "
                         f"| {_ms(summary['rest'])} | {_ms(summary['client_cpu'])} "
                         f"| {_ms(summary['server_cpu'])} | {summary['errors']} |")
    return "\n".join(lines)


def verdicts(results):
    """@return: Markdown lines: which targets this run met."""
    lines = []
    for devices, targets in TARGETS.items():
        base = results.get(("tvm", "tvm", devices), {})
        for (client, servers), wanted in targets.items():
            row = results.get((client, servers, devices))
            label = f"{NAMES[client]} client + {NAMES[servers]} servers, K={devices}, " \
                    f"at least {wanted:g}x TVM's candidates/s"
            if row is None or "candidates_per_s" not in base:
                lines.append(f"- {label}: not measured")
            elif "refused" in row:
                lines.append(f"- {label}: NOT met (the row failed: {row['refused']})")
            else:
                ratio = row["candidates_per_s"] / base["candidates_per_s"]
                verdict = "met" if ratio >= wanted and not row["errors"] else "NOT met"
                lines.append(f"- {label}: {verdict} ({ratio:.2f}x"
                             + (f", {row['errors']} errors" if row["errors"] else "") + ")")
    return lines


#: What the docs say of each C{--tracker} choice.
_TRACKERS = {
    "client": "Each client has its own kind of tracker in front of the servers (TVM's "
              "client: TVM's tracker; ours: ours), so the baseline is TVM's setup as "
              "shipped and the others change the host side (client and tracker), the "
              "devices (servers) or both.",
    "servers": "Each kind of servers has its own kind of tracker in front of it.",
    "ours": "Our tracker is in front of every row.",
    "tvm": "TVM's tracker is in front of every row.",
}


def docs_body(text, lines, options, machine, started):
    """@return: the C{Tuning loop} section of the benchmarks page."""
    return "\n".join([
        f"`{' '.join(['python bench/tuning_loop.py', shown_command_line()]).strip()}` "
        f"(finished {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{time.time() - started:.0f} s in all).",
        "",
        f"{options.candidates} candidates, {tuning_candidates.describe()}, "
        f"measured on K devices (K servers under one key) as MetaSchedule does, each in "
        f"its own session: request via the tracker, upload, load, allocate and randomly "
        f"fill the three arguments, `time_evaluator` (number={options.number}, "
        f"repeat={options.repeat}, min_repeat_ms={options.min_repeat_ms}, no cache "
        f"flush), remove and close. TVM's client is MetaSchedule's `RPCRunner` as "
        f"shipped (its pool of K worker processes, its default steps, timed by "
        f"wrappers); our client runs the same steps on one reactor, sending a step's "
        f"independent requests together (the list is in `bench/tuning_our_client.py`). "
        f"{_TRACKERS[options.tracker]} The rows take turns: the candidates are split "
        f"into {options.rounds} rounds and every row measures each round's candidates "
        f"(in a rotated order), so the shared machine's load moves them alike; each "
        f"row first measures K candidates untimed (TVM's runner once: its pool lives "
        f"on between rounds; ours once per round, in a fresh process). "
        f"candidates/s is N over the summed wall time of the rounds (*per round*: each "
        f"round's own figure); the steps are mean "
        f"milliseconds per candidate, and *rest* is the time a device's worker spends "
        f"per candidate outside them (K x wall / N minus the steps: the runner's "
        f"dispatch, TVM's tracker connection per candidate, TVM's session shutdown). "
        f"The CPU columns are CPU milliseconds per candidate: the client's (our "
        f"client's process; TVM's: this process and its runner's pool workers) and the "
        f"K servers' (their process trees, the session processes they reaped included; "
        f"the trackers are not counted).",
        "",
        text,
        "",
        "Targets (issue 11) in this run:",
        "",
        *lines,
        "",
        "Measured on:",
        "",
        *machine_markdown(machine),
    ])
