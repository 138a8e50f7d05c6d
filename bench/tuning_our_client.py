"""Our client as a tuner's runner: the candidates of ``bench/tuning_loop.py`` on K devices.

Run by ``bench/tuning_loop.py`` in a process of its own (one reactor, no
threads)::

    python -m bench.tuning_our_client --tracker-port P --key KEY --devices K \\
        --manifest candidates.json --number 3 --repeat 2 --min-repeat-ms 0 \\
        --session-timeout 30 [--warm-up K]

It prints L{WARMED} once the warm-up is done and waits for a line on its
standard input; then it prints one JSON object: the wall time of the measured candidates, the
CPU time this process spent on them and, for each one, its device timings
or error and how long each step took.

Each candidate goes through the steps of MetaSchedule's ``RPCRunner``
(``rpc_runner._worker_func`` and its ``default_*`` functions), none skipped;
within a step, requests that do not wait for each other's answers are sent
together (the server answers them in order), which a Deferred client can do
and TVM's blocking one cannot:

1. session: C{TrackerSession.request(key, priority=1, session_timeout=...)}
   (MetaSchedule opens a tracker connection per candidate as well; here one
   tracker connection serves the run) and the device C{cpu(0)};
2. upload: C{session.upload(path, remote_path)}, then
   C{session.load_module(remote_path)};
3. alloc: the remote global C{tvm.contrib.random.random_fill_for_measure}
   looked up and C{session.empty(shape, dtype, dev)} for each argument (sent
   together), then the fill called on each array (sent together;
   C{alloc_repeat} = 1, as the runner's default);
4. run: C{module.time_evaluator("main", dev, number, repeat, min_repeat_ms)}
   made, then per argument set C{dev.sync()} and the evaluator called (the
   call sent right behind the sync);
5. cleanup, always: C{remove(remote_path)}, C{remove(remote_path + ".so")},
   C{remove("")} (sent together; an error from one is ignored, as the
   missing C{.so} is a normal case), then C{session.close()} (TVM's client
   sends its shutdown when the session object is collected).

K coroutines, one per device, take the candidates in order from one queue,
as the runner's K pool workers do; a candidate that fails (or outlives the
session timeout) is reported with its error and the run goes on.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer  # noqa: E402

#: The line printed once the warm-up is over; the measure starts when a line comes back.
WARMED = "warmed"
RANDOM_FILL = "tvm.contrib.random.random_fill_for_measure"
#: The steps timed per candidate, in order.
STEPS = ("session", "upload", "alloc", "run", "cleanup")


def _error_text(failure_or_error):
    """@return: the type and first line of an error, for the report."""
    error = getattr(failure_or_error, "value", failure_or_error)
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _all(deferreds):
    """@return: a Deferred of the results of C{deferreds}, failing with the first failure."""
    return defer.gatherResults(deferreds, consumeErrors=True).addErrback(
        lambda failure: failure.value.subFailure)


async def _cleanup(session, remote_path):
    """MetaSchedule's C{default_cleanup}, then the session's end."""
    if session is None:
        return
    try:
        if remote_path is not None:
            # TVM's server returns None for each; ours says why for the missing
            # ".so" and the work directory itself: those answers are no error here.
            await defer.DeferredList(
                [session.remove(path) for path in (remote_path, remote_path + ".so", "")],
                consumeErrors=True)
    finally:
        await session.close()


async def measure_candidate(tracker, config, path, args_info):
    """
    Measure one candidate the way MetaSchedule's runner does.

    @param config: the parsed command line (key, evaluator settings, timeout).
    @return: a dict with C{run_secs} (or C{error}) and C{steps} (seconds per step).
    """
    steps = {}
    session = remote_path = None
    clock = time.perf_counter
    started = clock()
    try:
        session = await tracker.request(config.key, priority=1,
                                        session_timeout=config.session_timeout)
        device = session.device("cpu", 0)
        steps["session"] = clock() - started

        started = clock()
        remote_path = Path(path).name
        await session.upload(path, remote_path)
        module = await session.load_module(remote_path)
        steps["upload"] = clock() - started

        started = clock()
        looking_up = session.get_function(RANDOM_FILL)
        allocating = [session.empty(shape, dtype, device) for _, dtype, shape in args_info]
        fill = await looking_up
        arguments = await _all(allocating)
        await _all([fill(array) for array in arguments])
        steps["alloc"] = clock() - started

        started = clock()
        evaluator = module.time_evaluator("main", device, number=config.number,
                                          repeat=config.repeat,
                                          min_repeat_ms=config.min_repeat_ms)
        # The server answers in order: the evaluation runs after the sync.
        syncing = device.sync()
        result = await evaluator(*arguments)
        await syncing
        steps["run"] = clock() - started
        outcome = {"run_secs": list(result.results)}
    except defer.CancelledError:
        outcome = {"error": f"timed out after {config.session_timeout} s"}
    except Exception as error:
        outcome = {"error": _error_text(error)}
    finally:
        started = clock()
        try:
            await _cleanup(session, remote_path)
        except Exception as error:
            outcome = {"error": f"cleanup: {_error_text(error)}"}
        steps["cleanup"] = clock() - started
    outcome["steps"] = steps
    return outcome


async def run_candidates(reactor, tracker, config, candidates, devices):
    """
    Measure C{candidates} with C{devices} coroutines taking them in turn.

    @param candidates: C{[(path, args_info)]}.
    @return: the outcomes, in the candidates' order.
    """
    outcomes = [None] * len(candidates)
    queue = iter(enumerate(candidates))

    async def device_loop():
        for index, (path, args_info) in queue:
            measuring = defer.Deferred.fromCoroutine(
                measure_candidate(tracker, config, path, args_info))
            # The runner's future gives up on a candidate after the session
            # timeout; the cancellation lands in measure_candidate, which cleans up.
            measuring.addTimeout(config.session_timeout, reactor)
            outcomes[index] = await measuring

    await defer.gatherResults(
        [defer.Deferred.fromCoroutine(device_loop()) for _ in range(devices)],
        consumeErrors=True)
    return outcomes


async def main(reactor, config):
    """Connect to the tracker, run the warm-up and the measured candidates; print JSON."""
    from tvm_rpc.client import connect_tracker

    with open(config.manifest, encoding="utf-8") as f:
        candidates = [tuple(item) for item in json.load(f)]
    warm_up, measured = candidates[:config.warm_up], candidates[config.warm_up:]
    tracker = await connect_tracker("127.0.0.1", config.tracker_port, reactor=reactor)
    try:
        warm = await run_candidates(reactor, tracker, config, warm_up, config.devices)
        report = {"warm_up": warm}
        if warm and all("error" in outcome for outcome in warm):
            report["refused"] = warm[0]["error"]
        else:
            # The parent samples the servers' CPU between the two parts: wait for its word.
            print(WARMED, flush=True)
            sys.stdin.readline()
            started, cpu = time.perf_counter(), time.process_time()
            report["outcomes"] = await run_candidates(reactor, tracker, config, measured,
                                                      config.devices)
            report["wall"] = time.perf_counter() - started
            report["client_cpu"] = time.process_time() - cpu
    finally:
        await tracker.close()
    print(json.dumps(report))


def parse(argv=None):
    """@return: the parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracker-port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--manifest", required=True,
                        help="JSON list of [library path, args_info]; the first --warm-up "
                             "are the untimed warm-up")
    parser.add_argument("--warm-up", type=int, default=0)
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--repeat", type=int, required=True)
    parser.add_argument("--min-repeat-ms", type=int, required=True)
    parser.add_argument("--session-timeout", type=float, required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    from twisted.internet import task

    arguments = parse()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
