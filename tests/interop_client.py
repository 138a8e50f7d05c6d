"""Our client, driven in a child process for the interop tests (one reactor run each).

Usage: ``python tests/interop_client.py MODE ARGS...``; prints one JSON object.

- ``connect HOST PORT KEY``: open a session directly and report how it went.
- ``pymodule HOST PORT KEY SOURCE``: upload a ``.py`` module, load it, call it.
- ``hang HOST PORT KEY TIMEOUT``: call ``test.hang`` in a session with a timeout.
- ``load HOST PORT KEY FILE``: print the worker's pid and work path, then
  upload FILE and load it as a module.
- ``upload HOST PORT KEY NAME``: upload bytes under NAME, list, download.
- ``many TRACKER_HOST TRACKER_PORT KEY COUNT``: COUNT sessions at once from one
  reactor, each asking its work path.
- ``retry TRACKER_HOST TRACKER_PORT KEY``: ``request_and_run`` whose first
  attempt crashes its worker; the second must finish.
- ``device TRACKER_HOST TRACKER_PORT KEY PROBE``: request a session by key,
  call a global function, upload and download bytes, copy an array there and
  back, then upload PROBE (a ``.py`` module) and report what its ``probe()``
  returns (what the worker can import).
- ``tvm-globals HOST PORT KEY LIBRARY``: TVM's global functions on our server:
  fill a device array with ``tvm.contrib.random.random_fill_for_measure``,
  count the names ``list_functions`` gives with and without TVM's, then
  upload LIBRARY and load it through ``ffi.Module.load_from_file.so``.
- ``story TRACKER_HOST TRACKER_PORT KEY LIBRARY N M``: the TVM docs' story:
  request a server by key, upload LIBRARY (a dense + ReLU layer ``y = relu(x W^T)``
  with ``x: (1, N)``, ``W: (M, N)``), load it, run it on device arrays, read
  the result back and time it, once more with TVM's other time_evaluator
  options (cooldown, cache flush, ``f_preproc``), and once with an unknown
  ``f_preproc``.
"""

from twisted.internet import defer

from tests.child_modes import dense_relu_arguments, dispatch, report


def describe(failure):
    return {"ok": False, "error_type": type(failure.value).__name__, "message": str(failure.value)}


async def connect_mode(reactor, host, port, key):
    from tvm_rpc.client.connect import connect

    try:
        session = await connect(host, int(port), key, reactor=reactor)
    except Exception:
        from twisted.python.failure import Failure

        return describe(Failure())
    await session.close()
    return {"ok": True}


async def call_mode(reactor, host, port, key, name, *args):
    """Call a global function with string arguments; report its result."""
    from tvm_rpc.client.connect import connect

    session = await connect(host, int(port), key, reactor=reactor)
    try:
        function = await session.get_function(name)
        return {"ok": True, "result": await function(*args)}
    finally:
        await session.close()


async def story_mode(reactor, tracker_host, tracker_port, key, library, n, m):
    import numpy as np

    from tvm_rpc.client import connect_tracker

    n, m = int(n), int(m)
    tracker = await connect_tracker(tracker_host, int(tracker_port), reactor=reactor)
    session = await tracker.request(key, priority=1, session_timeout=60)
    try:
        await session.upload(library, "dense_relu.so")
        module = await session.load_module("dense_relu.so")
        device = session.cpu(0)
        x, w, x_remote, w_remote, y_remote = await dense_relu_arguments(session, device, n, m)
        function = module.get_function("dense_relu")
        if isinstance(function, defer.Deferred):
            function = await function
        await function(x_remote, w_remote, y_remote)
        y = await y_remote.numpy()
        expected = np.maximum(x @ w.T, 0)
        evaluator = session.time_evaluator(function, device, number=5, repeat=2)
        timing = await evaluator(x_remote, w_remote, y_remote)
        # TVM's other options, which the server passes to TVM's own timer.
        tuned = session.time_evaluator(
            function, device, number=2, repeat=4, min_repeat_ms=1, cooldown_interval_ms=2,
            repeats_to_cooldown=2, cache_flush_bytes=1 << 20,
            f_preproc="cache_flush_cpu_non_first_arg")
        tuned_timing = await tuned(x_remote, w_remote, y_remote)
        try:
            await session.time_evaluator(function, device, f_preproc="no.such.preproc")(
                x_remote, w_remote, y_remote)
            unknown_preproc = None
        except Exception as error:
            unknown_preproc = str(error)
        return {
            "ok": True,
            "max_abs_error": float(np.max(np.abs(y - expected))),
            "nonzero": int(np.count_nonzero(y)),
            "timings": [float(t) for t in timing.results],
            "mean": float(timing.mean),
            "options_timings": [float(t) for t in tuned_timing.results],
            "unknown_preproc": unknown_preproc,
        }
    finally:
        await session.close()
        await tracker.close()


async def pymodule_mode(reactor, host, port, key, source):
    from tvm_rpc.client.connect import connect

    session = await connect(host, int(port), key, reactor=reactor)
    try:
        await session.upload(source, "plain.py")
        module = await session.load_module("plain.py")
        add = module.get_function("add")
        if isinstance(add, defer.Deferred):
            add = await add
        loaded = module.get_function("loaded_modules")
        if isinstance(loaded, defer.Deferred):
            loaded = await loaded
        return {"ok": True, "sum": await add(2, 40), "modules": await loaded()}
    finally:
        await session.close()


async def hang_mode(reactor, host, port, key, timeout):
    from twisted.python.failure import Failure

    from tvm_rpc.client.connect import connect

    session = await connect(host, int(port), key, float(timeout), reactor=reactor)
    started = reactor.seconds()
    try:
        function = await session.get_function("test.hang")
        await function(3600)
    except Exception:
        report = describe(Failure())
        report["elapsed"] = reactor.seconds() - started
        return report
    return {"ok": True}


async def load_mode(reactor, host, port, key, path):
    """Print the worker's pid, then upload C{path} and load it (it may never load)."""
    from tvm_rpc.client.connect import connect

    session = await connect(host, int(port), key, reactor=reactor)
    workpath = await session.get_function("tvm.rpc.server.workpath")
    pid_of = await session.get_function("test.pid")
    report({"pid": await pid_of(), "workpath": await workpath("")})
    await session.upload(path)
    await session.load_module(path.rsplit("/", 1)[-1])
    return {"ok": True}


async def upload_mode(reactor, host, port, key, name):
    """Upload bytes under C{name}, list and read them back."""
    from tvm_rpc.client.connect import connect

    session = await connect(host, int(port), key, reactor=reactor)
    data = bytes(range(256)) * 64
    await session.upload(data, name)
    listed = await session.listdir(".")
    back = await session.download(name)
    await session.close()
    return {"ok": True, "listed": name in listed, "same": bytes(back) == data}


async def device_mode(reactor, tracker_host, tracker_port, key, probe):
    import numpy as np

    from tvm_rpc.client import connect_tracker

    tracker = await connect_tracker(tracker_host, int(tracker_port), reactor=reactor)
    session = await tracker.request(key, priority=1, session_timeout=60)
    try:
        workpath = await session.get_function("tvm.rpc.server.workpath")
        data = bytes(range(256)) * 64
        await session.upload(data, "blob.bin")
        back = await session.download("blob.bin")
        values = np.arange(12, dtype="float32").reshape(3, 4)
        remote = await session.array(values, session.cpu(0))
        returned = await remote.numpy()
        await session.upload(probe, "probe.py")
        module = await session.load_module("probe.py")
        function = module.get_function("probe")
        if isinstance(function, defer.Deferred):
            function = await function
        return {
            "ok": True,
            "workpath": await workpath("blob.bin"),
            "same": bytes(back) == data,
            "array_same": bool(np.array_equal(np.asarray(returned), values)),
            "probe": await function(),
        }
    finally:
        await session.close()
        await tracker.close()


async def many_mode(reactor, tracker_host, tracker_port, key, count):
    from tvm_rpc.client import connect_tracker

    tracker = await connect_tracker(tracker_host, int(tracker_port), reactor=reactor)

    async def one(index):
        session = await tracker.request(key, timeout=60)
        try:
            workpath = await session.get_function("tvm.rpc.server.workpath")
            return index, await workpath(f"f{index}")
        finally:
            await session.close()

    try:
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(one(i)) for i in range(int(count))], consumeErrors=True
        )
    finally:
        await tracker.close()
    return {"ok": True, "paths": [path for _, path in sorted(results)]}


async def retry_mode(reactor, tracker_host, tracker_port, key):
    from tvm_rpc.client import connect_tracker

    tracker = await connect_tracker(tracker_host, int(tracker_port), reactor=reactor)
    attempts = []

    async def work(session):
        attempts.append(await (await session.get_function("tvm.rpc.server.workpath"))(""))
        if len(attempts) == 1:
            await (await session.get_function("test.crash"))(9)
        return "finished"

    try:
        result = await tracker.request_and_run(
            key, lambda session: defer.Deferred.fromCoroutine(work(session)), max_retry=2
        )
    finally:
        await tracker.close()
    return {"ok": True, "result": result, "attempts": len(attempts)}


async def tvm_globals_mode(reactor, host, port, key, library):
    import numpy as np

    from tvm_rpc.client.connect import connect

    session = await connect(host, int(port), key, reactor=reactor)
    report = {"ok": True}
    try:
        remote = await session.array(np.zeros((64,), "float32"), session.cpu(0))
        fill = await session.get_function("tvm.contrib.random.random_fill_for_measure")
        await fill(remote)
        report["filled"] = int(np.count_nonzero(np.asarray(await remote.numpy())))
        listing = await session.get_function("tvm_rpc.server.list_functions")
        report["ours"] = len(await listing())
        report["all"] = len(await listing(True))
        try:
            await (await session.get_function("no.such.function"))()
        except Exception as e:
            report["missing"] = {"error_type": type(e).__name__, "message": str(e)}
        name = library.rsplit("/", 1)[-1]
        with open(library, "rb") as f:
            await session.upload(f.read(), name)
        path = await (await session.get_function("tvm.rpc.server.workpath"))(name)
        try:
            loader = await session.get_function("ffi.Module.load_from_file.so")
            module = await loader(path, "so")
            report["load"] = {"ok": True, "type": type(module).__name__}
        except Exception as e:
            report["load"] = {"ok": False, "error_type": type(e).__name__, "message": str(e)}
    finally:
        await session.close()
    return report


if __name__ == "__main__":
    dispatch({
        "retry": retry_mode,
        "many": many_mode,
        "device": device_mode,
        "connect": connect_mode,
        "call": call_mode,
        "story": story_mode,
        "pymodule": pymodule_mode,
        "hang": hang_mode,
        "load": load_mode,
        "upload": upload_mode,
        "tvm-globals": tvm_globals_mode,
    })
