"""Our client against TVM's own servers, driven in a child process (one reactor run each).

Usage: ``python tests/tvm_server_driver.py MODE ARGS...``; prints one JSON
object last (earlier lines are progress marks for the test to wait on).

- ``story VIA HOST PORT KEY LIBRARY N M``: the seed story (VIA is ``direct``:
  connect to HOST:PORT presenting KEY; ``tracker``: request KEY from the
  tracker at HOST:PORT; ``run``: the same with ``request_and_run``) on a
  dense + ReLU layer ``y = relu(x W^T)``.
- ``many HOST PORT KEY COUNT LIBRARY N M``: COUNT sessions requested from the
  tracker at once, then the story on all of them at once.
- ``errors HOST PORT KEY``: a missing function and a remote exception, then
  the session still works.
- ``long HOST PORT KEY LIBRARY N M TIMEOUT``: a session with TIMEOUT whose
  time_evaluator runs for ever; prints ``{"calling": true}`` once it is sent.
- ``garbage KIND HOST PORT KEY``: a session on a server of garbage (see
  L{tvm_garbage}) beside a good one on HOST:PORT.
- ``count HOST PORT KEY LIBRARY N M``: the story, cancelled calls and remote
  errors through a relay that counts the handles TVM's server hands out and
  the ones freed (see L{tvm_handle_count}).
- ``relay HOST PORT``: only that relay, for another client; prints
  ``{"relay": PORT}``, then the counts once the session ended.
"""

from twisted.internet import defer
from twisted.python.failure import Failure

from tests.child_modes import dispatch, report

#: Seconds any one step may take before the driver gives up and reports it.
STEP = 60
#: Calls per repeat that keep a dense layer of a few microseconds busy for hours
#: (TVM's timer takes an int32, which the client checks before sending).
FOREVER = 2**31 - 1


def describe(failure):
    """@return: the JSON report of a failure (of the first one, for a gathered list)."""
    if isinstance(failure.value, defer.FirstError):
        return describe(failure.value.subFailure)
    return {"ok": False, "error_type": type(failure.value).__name__,
            "error_types": [cls.__name__ for cls in type(failure.value).__mro__],
            "message": str(failure.value)}


def bounded(deferred, reactor, seconds=STEP):
    """@return: C{deferred}, cancelled (L{defer.TimeoutError}) after C{seconds}."""
    return deferred.addTimeout(seconds, reactor)


async def outcome(deferred):
    """@return: C{("ok", result)} or C{("failed", describe(failure))}, never raising."""
    try:
        return "ok", await deferred
    except Exception:
        return "failed", describe(Failure())


def progress(**mark):
    """Print a progress line the test waits for."""
    report(mark)


async def open_session(reactor, via, host, port, key, session_timeout=60):
    """@return: C{(session, tracker or None)}, opened directly or through a tracker."""
    from tvm_rpc.client import connect, connect_tracker

    if via == "tracker":
        tracker = await bounded(connect_tracker(host, int(port), reactor=reactor), reactor)
        session = await bounded(
            tracker.request(key, session_timeout=session_timeout, timeout=STEP), reactor)
        return session, tracker
    return await bounded(connect(host, int(port), key, session_timeout, reactor=reactor),
                         reactor), None


async def story(reactor, session, library, n, m):
    """
    Upload C{library}, load it, run it on device arrays, check it against
    numpy and time it (TVM's defaults, then a few of its other options).

    @return: the report.
    """
    import numpy as np

    n, m = int(n), int(m)
    await bounded(session.upload(library, "dense_relu.so"), reactor)
    module = await bounded(session.load_module("dense_relu.so"), reactor)
    device = session.cpu(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, n)).astype("float32")
    w = rng.standard_normal((m, n)).astype("float32")
    x_remote = await bounded(session.array(x, device), reactor)
    w_remote = await bounded(session.array(w, device), reactor)
    y_remote = await bounded(session.empty((1, m), "float32", device), reactor)
    function = await bounded(module.get_function("dense_relu"), reactor)
    await bounded(function(x_remote, w_remote, y_remote), reactor)
    y = await bounded(y_remote.numpy(), reactor)
    plain = session.time_evaluator(function, device, number=5, repeat=2)
    timing = await bounded(plain(x_remote, w_remote, y_remote), reactor)
    tuned = session.time_evaluator(
        function, device, number=3, repeat=3, min_repeat_ms=1,
        limit_zero_time_iterations=10, cooldown_interval_ms=1, repeats_to_cooldown=2)
    state, tuned_timing = await outcome(bounded(tuned(x_remote, w_remote, y_remote), reactor))
    return {
        "ok": True,
        "protocol": session.protocol,
        "address": session.address,
        "max_abs_error": float(np.max(np.abs(y - np.maximum(x @ w.T, 0)))),
        "nonzero": int(np.count_nonzero(y)),
        "timings": [float(t) for t in timing.results],
        "tuned_timings": ([float(t) for t in tuned_timing.results] if state == "ok"
                          else tuned_timing),
    }


async def story_mode(reactor, via, host, port, key, library, n, m):
    if via == "run":
        return await run_mode(reactor, host, port, key, library, n, m)
    session, tracker = await open_session(reactor, via, host, port, key)
    try:
        return await story(reactor, session, library, n, m)
    finally:
        await bounded(session.close(), reactor)
        if tracker is not None:
            await tracker.close()


async def run_mode(reactor, host, port, key, library, n, m):
    """The story as the function of C{request_and_run} (which closes the session)."""
    from tvm_rpc.client import connect_tracker

    tracker = await bounded(connect_tracker(host, int(port), reactor=reactor), reactor)
    try:
        return await bounded(tracker.request_and_run(
            key, lambda session: defer.Deferred.fromCoroutine(
                story(reactor, session, library, n, m)), session_timeout=60), reactor)
    finally:
        await tracker.close()


async def many_mode(reactor, host, port, key, count, library, n, m):
    from tvm_rpc.client import connect_tracker

    tracker = await bounded(connect_tracker(host, int(port), reactor=reactor), reactor)
    sessions = []
    try:
        requests = [bounded(tracker.request(key, session_timeout=120, timeout=STEP), reactor)
                    for _ in range(int(count))]
        sessions = await defer.gatherResults(requests, consumeErrors=True)
        progress(sessions=len(sessions))
        stories = [defer.Deferred.fromCoroutine(story(reactor, session, library, n, m))
                   for session in sessions]
        return {"ok": True, "stories": await defer.gatherResults(stories, consumeErrors=True)}
    finally:
        for session in sessions:
            await bounded(session.close(), reactor)
        await tracker.close()


async def errors_mode(reactor, host, port, key):
    session, _ = await open_session(reactor, "direct", host, port, key)
    try:
        report = {"ok": True, "protocol": session.protocol}
        _, report["missing"] = await outcome(
            bounded(session.get_function("no.such.function"), reactor))
        _, report["missing_call"] = await outcome(
            bounded(session.call("no.such.function", 1), reactor))
        # A builtin of tvm-ffi that raises the exception it is told to.
        _, report["raised"] = await outcome(bounded(
            session.call("testing.test_raise_error", "ValueError", "raised on purpose"), reactor))
        _, report["after"] = await outcome(
            bounded(session.call("tvm.rpc.server.workpath", "after"), reactor))
        return report
    finally:
        await bounded(session.close(), reactor)


async def long_mode(reactor, host, port, key, library, n, m, session_timeout):
    """A time_evaluator that never ends on its own; the test ends it."""
    session, _ = await open_session(reactor, "direct", host, port, key, float(session_timeout))
    n, m = int(n), int(m)
    await bounded(session.upload(library, "dense_relu.so"), reactor)
    module = await bounded(session.load_module("dense_relu.so"), reactor)
    device = session.cpu(0)
    arrays = [await bounded(session.empty(shape, "float32", device), reactor)
              for shape in ((1, n), (m, n), (1, m))]
    function = await bounded(module.get_function("dense_relu"), reactor)
    started = reactor.seconds()
    running = session.time_evaluator(function, device, number=FOREVER, repeat=1)(*arrays)
    progress(calling=True)
    state, result = await outcome(bounded(running, reactor))
    report = result if state == "failed" else {"ok": True}
    report["elapsed"] = reactor.seconds() - started
    report["closed"] = session.closed
    state, later = await outcome(bounded(session.call("tvm.rpc.server.workpath", "x"), reactor))
    report["later"] = later
    await bounded(session.when_closed(), reactor)
    return report


async def garbage_mode(reactor, kind, host, port, key):
    from tests.tvm_garbage import serve_garbage

    listening = await serve_garbage(reactor, kind)
    bad_port = listening.getHost().port
    good, _ = await open_session(reactor, "direct", host, port, key)
    try:
        state, bad = await outcome(open_session(reactor, "direct", "127.0.0.1", bad_port, "g"))
        report = {"ok": True, "opened": state}
        if state == "failed":
            report["bad"] = bad
        else:
            bad = bad[0]
            report["protocol"] = bad.protocol
            workpath = bounded(good.call("tvm.rpc.server.workpath", "during"), reactor)
            if kind == "copyack":
                state, array = await outcome(bounded(bad.empty((4,), "float32"), reactor))
                trigger = bounded(array.numpy(), reactor) if state == "ok" else defer.fail(
                    RuntimeError(f"empty() failed: {array}"))
            else:
                trigger = bounded(bad.call("tvm.rpc.server.workpath", "x"), reactor)
            _, report["bad"] = await outcome(trigger)
            _, report["during"] = await outcome(workpath)
            report["bad_closed"] = bad.closed
            if bad.closed:
                _, report["bad_later"] = await outcome(
                    bounded(bad.call("tvm.rpc.server.workpath", "y"), reactor))
            else:
                # A session that goes on (skipping an answer too long to keep) is closed here.
                _, report["bad_close"] = await outcome(bounded(bad.close(), reactor))
            await outcome(bounded(bad.when_closed(), reactor))
        _, report["after"] = await outcome(
            bounded(good.call("tvm.rpc.server.workpath", "after"), reactor))
        return report
    finally:
        await bounded(good.close(), reactor)
        await listening.stopListening()


async def count_mode(reactor, host, port, key, library, n, m):
    from tests.tvm_handle_count import counting_relay

    relay = await counting_relay(reactor, host, int(port))
    try:
        session, _ = await open_session(reactor, "direct", "127.0.0.1",
                                        relay.listening.getHost().port, key)
        report = await story(reactor, session, library, n, m)
        module = await bounded(session.load_module("dense_relu.so"), reactor)
        # Calls cancelled in flight: whatever they made on the server must be freed.
        for pending in (session.get_function("tvm.rpc.server.workpath"),
                        module.get_function("dense_relu"),
                        session.empty((8, 8), "float32"),
                        session.load_module("dense_relu.so")):
            pending.cancel()
            await outcome(pending)
        _, report["missing"] = await outcome(
            bounded(session.get_function("no.such.function"), reactor))
        _, report["raised"] = await outcome(bounded(
            session.call("testing.test_raise_error", "ValueError", "raised on purpose"), reactor))
        _, report["missing_in_module"] = await outcome(
            bounded(module.get_function("no_such_kernel"), reactor))
        await bounded(session.close(), reactor)
        await bounded(relay.done, reactor)
        report.update(relay.counts.report())
        return report
    finally:
        await relay.listening.stopListening()


async def relay_mode(reactor, host, port):
    """Only the counting relay (for TVM's own client): prints its port, then the counts."""
    from tests.tvm_handle_count import counting_relay

    relay = await counting_relay(reactor, host, int(port))
    progress(relay=relay.listening.getHost().port)
    try:
        await bounded(relay.done, reactor, 120)
    finally:
        await relay.listening.stopListening()
    return {"ok": True, **relay.counts.report()}


MODES = {
    "relay": relay_mode,
    "story": story_mode,
    "many": many_mode,
    "errors": errors_mode,
    "long": long_mode,
    "garbage": garbage_mode,
    "count": count_mode,
}


if __name__ == "__main__":
    dispatch(MODES, describe)
