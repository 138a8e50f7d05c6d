"""One loop of TVM's own client for ``bench/chaos.py``, run as a child process.

Usage (``bench/chaos.py`` starts it)::

    python bench/chaos_tvm_client.py TRACKER_HOST TRACKER_PORT KEY [--watchdog 30]

It imports TVM, prints ``ready``, then waits for a line ``go SECONDS`` on its
standard input and, for that many seconds, repeats one cycle of what a
tuning script does with TVM's client: ``tvm.rpc.connect_tracker(...)`` (once,
and again after a failure), ``request(KEY)``, a call of
``tvm.rpc.server.workpath`` (on every server: TVM's, and ours serving TVM's
protocol), then the session is dropped (TVM's sessions have no ``close``: the
last reference going closes the socket). Each cycle is printed as one JSON
line: ``{"start": t, "end": t, "error": null | "Type: text"}`` in wall-clock
seconds.

TVM's client blocks and cannot be cancelled, so each cycle runs in a thread
the main thread waits for at most C{--watchdog} seconds: a cycle still
unanswered then is printed as ``{"start": t, "hung": true}`` and the process
exits at once with status 3 (the parent starts another loop in its place).
"""

import argparse
import gc
import json
import os
import sys
import threading
import time

#: How long a failed cycle waits before the next one, so a tracker that is
#: down is not hammered by a tight loop.
PAUSE_AFTER_FAILURE = 0.5


def emit(record):
    """Print one JSON line at once."""
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def error_text(error):
    """@return: C{"Type: first line"} of C{error}, at most 200 characters."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:200]


class Loop:
    """TVM's client, one cycle after another, with one tracker session kept between cycles."""

    def __init__(self, host, port, key):
        self.host, self.port, self.key = host, port, key
        self.tracker = None

    def cycle(self, result):
        """One request -> call -> drop; fills C{result} with the outcome."""
        import tvm.rpc

        try:
            if self.tracker is None:
                self.tracker = tvm.rpc.connect_tracker(self.host, self.port)
            session = self.tracker.request(self.key, session_timeout=30, max_retry=5)
            workpath = session.get_function("tvm.rpc.server.workpath")
            if not workpath("chaos"):
                raise AssertionError("tvm.rpc.server.workpath returned nothing")
            del workpath, session
            gc.collect()
            result["error"] = None
        except Exception as error:  # noqa: BLE001 (every failure is a figure)
            result["error"] = error_text(error)
            self.tracker = None
        result["end"] = time.time()


def main():
    """Run the loop; @return: the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("key")
    parser.add_argument("--watchdog", type=float, default=30.0)
    args = parser.parse_args()
    import tvm.rpc  # noqa: F401  (imported before "ready": it takes seconds)

    emit({"ready": True})
    line = sys.stdin.readline().split()
    if len(line) != 2 or line[0] != "go":
        return 2
    deadline = time.monotonic() + float(line[1])
    loop = Loop(args.host, args.port, args.key)
    while time.monotonic() < deadline:
        result = {"start": time.time()}
        worker = threading.Thread(target=loop.cycle, args=(result,), daemon=True)
        worker.start()
        worker.join(args.watchdog)
        if worker.is_alive():
            emit({"start": result["start"], "hung": True})
            os._exit(3)
        emit(result)
        if result["error"]:
            time.sleep(PAUSE_AFTER_FAILURE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
