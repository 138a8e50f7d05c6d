"""Helpers shared by the benchmarks: daemons, memory sampling, percentiles, docs.

Benchmarks are scripts, not tests: they start our daemons and TVM's on
loopback (through L{tests.daemons}, so every daemon runs in its own process
group and is stopped with it), sample each daemon's whole process tree with
psutil, and write their figures into C{docs/benchmarks.md}.
"""

import os
import platform
import re
import resource
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.daemons import (  # noqa: E402  (needs the repository root on sys.path)
    Daemon,
    child_env,
    free_port,
    free_servers,
    our_rpc_server,
    our_tracker,
    running,
    tvm_rpc_server,
    tvm_tracker,
    twistd,
    wait_summary,
)

__all__ = [
    "Daemon", "child_env", "free_port", "our_tracker", "running", "tvm_tracker", "twistd",
    "free_servers", "our_rpc_server", "tvm_rpc_server", "wait_summary",
    "ROOT", "DOCS", "MiB", "raise_fd_limit", "tree_rss", "tree_fds", "tree_cpu_seconds",
    "TreeSampler",
    "self_cpu_seconds", "percentile", "latency_stats", "fmt_ms", "machine_description",
    "machine_markdown", "replace_section", "shown_command_line",
]

DOCS = ROOT / "docs" / "benchmarks.md"
MiB = 1 << 20


def raise_fd_limit(wanted):
    """
    Raise this process's soft limit on open files towards C{wanted} (never
    above the hard limit); children started afterwards inherit it.

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def _tree(pid):
    """@return: the process C{pid} and all its descendants, as psutil objects."""
    root = psutil.Process(pid)
    try:
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return [root]


def tree_rss(pid):
    """@return: the summed resident set size, in bytes, of C{pid} and its descendants."""
    total = 0
    for proc in _tree(pid):
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def tree_fds(pid):
    """@return: the open file descriptors of C{pid} and its descendants, summed."""
    total = 0
    for proc in _tree(pid):
        try:
            total += proc.num_fds()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def tree_cpu_seconds(pid):
    """@return: user + system CPU seconds used so far by C{pid} and its live descendants."""
    total = 0.0
    for proc in _tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def self_cpu_seconds():
    """@return: user + system CPU seconds used so far by this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class TreeSampler:
    """
    Samples the RSS of a process tree from a background thread and keeps the
    peak since the last L{reset}.

    @ivar peak: the highest RSS seen, in bytes.
    @ivar last: the most recent sample, in bytes.
    """

    def __init__(self, pid, interval=0.05):
        """
        @param pid: the root of the process tree (a daemon's process group leader).
        @param interval: seconds between samples.
        """
        self.pid = pid
        self.interval = interval
        self.peak = self.last = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        """Sample until stopped or until the process is gone."""
        while not self._stop.is_set():
            try:
                rss = tree_rss(self.pid)
            except psutil.NoSuchProcess:
                return
            with self._lock:
                self.last = rss
                self.peak = max(self.peak, rss)
            self._stop.wait(self.interval)

    def reset(self):
        """Start a new peak from the current sample."""
        rss = tree_rss(self.pid)
        with self._lock:
            self.last = self.peak = rss

    def take_peak(self):
        """@return: the peak since the last reset, including a sample taken now."""
        try:
            rss = tree_rss(self.pid)
        except psutil.NoSuchProcess:
            rss = 0
        with self._lock:
            self.peak = max(self.peak, rss)
            return self.peak

    def __enter__(self):
        """Take a first sample and start the sampling thread."""
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        """Stop the sampling thread."""
        self._stop.set()
        self._thread.join(5)


def percentile(values, fraction):
    """
    The C{fraction} quantile of C{values} by linear interpolation between
    closest ranks.

    @param values: numbers, in any order.
    @param fraction: between 0 and 1 (0.99 for p99).
    @return: the quantile, or C{None} when C{values} is empty.
    """
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def latency_stats(seconds):
    """
    @param seconds: latencies in seconds.
    @return: a dict with C{n} and C{p50}, C{p99}, C{max} in milliseconds (C{None} when empty).
    """
    if not seconds:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    return {
        "n": len(seconds),
        "p50": percentile(seconds, 0.50) * 1e3,
        "p99": percentile(seconds, 0.99) * 1e3,
        "max": max(seconds) * 1e3,
    }


def fmt_ms(value):
    """Format milliseconds for a table: three significant decimals, or a dash."""
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cpu_model():
    """@return: the CPU model name from /proc/cpuinfo, or what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution):
    """@return: the installed version of C{distribution}, or C{"not installed"}."""
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:
        return "not installed"


def machine_description():
    """@return: a dict describing this machine and the software measured."""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "twisted": _version("twisted"),
        "apache-tvm": _version("apache-tvm"),
        "load_average": tuple(round(x, 2) for x in os.getloadavg()),
    }


def machine_markdown(machine):
    """@return: the Markdown lines describing C{machine} (from L{machine_description})."""
    return [
        f"- CPUs (`nproc`): {machine['nproc']}, model: {machine['cpu']}",
        f"- memory: {machine['memory_gib']} GiB; OS: {machine['os']}",
        f"- Python {machine['python']}, Twisted {machine['twisted']}, "
        f"apache-tvm {machine['apache-tvm']}",
        f"- load average when the run started: {' / '.join(map(str, machine['load_average']))} "
        "(the machine is shared, so figures move between runs)",
    ]


def replace_section(path, heading, body):
    """
    Replace the level-2 section C{heading} of the Markdown file C{path} with
    C{body}, or append it when absent; other sections are left untouched.

    @param heading: the heading text without the C{## } prefix.
    @param body: the section's text below its heading.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text, encoding="utf-8")


def shown_command_line(argv=None):
    """
    @return: the benchmark's arguments as they go into the docs, without
        C{--json FILE} (a local path says nothing about how figures were made).
    """
    shown, words = [], iter(argv if argv is not None else sys.argv[1:])
    for word in words:
        if word == "--json":
            next(words, None)
        elif not word.startswith("--json="):
            shown.append(word)
    return " ".join(shown)

