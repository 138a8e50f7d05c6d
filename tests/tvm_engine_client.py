"""Our client on one of TVM's own servers, in a child process (one reactor run each).

Usage: ``python tests/tvm_engine_client.py MODE HOST PORT ARGS...``; prints one JSON object.

- ``story HOST PORT LIBRARY N M``: connect directly, upload LIBRARY (a dense +
  ReLU layer ``y = relu(x W^T)``, ``x: (1, N)``, ``W: (M, N)``), load it, run it
  on device arrays, read back, time it with TVM's options, and the verbs
  around it (download, remove, listdir, workpath, system_lib, device queries).
- ``chunks HOST PORT COUNT``: copy COUNT float32 to the device and back
  (on a server with a packet limit), report whether they match and the limit.
- ``errors HOST PORT``: a missing function, a remote exception, a download
  longer than the session's max_result_size; the session stays usable after each.
"""

from tests.child_modes import dense_relu_arguments, dispatch
from tvm_rpc.client import connect


def describe(error):
    return {"type": type(error).__name__, "type_name": getattr(error, "type_name", None),
            "message": str(getattr(error, "message", error))}


async def story_mode(reactor, host, port, library, n, m):
    import numpy as np

    n, m = int(n), int(m)
    report = {}
    session = await connect(host, int(port), reactor=reactor)
    async with session:
        report["protocol"] = session.protocol
        report["uploaded"] = await session.upload(library, "dense_relu.so")
        with open(library, "rb") as source:
            report["download_matches"] = await session.download("dense_relu.so") == source.read()
        module = await session.load_module("dense_relu.so")
        device = session.cpu(0)
        report["cpu_exists"] = await device.exists()
        report["cuda_exists"] = await session.cuda(0).exists()
        await device.sync()
        x, w, x_remote, w_remote, y_remote = await dense_relu_arguments(session, device, n, m)
        function = await module.get_function("dense_relu")
        await function(x_remote, w_remote, y_remote)
        y = await y_remote.numpy()
        report["max_abs_error"] = float(np.max(np.abs(y - np.maximum(x @ w.T, 0))))
        report["nonzero"] = int(np.count_nonzero(y))
        report["w_back_equal"] = bool(np.array_equal(await w_remote.numpy(), w))
        evaluator = session.time_evaluator(function, device, number=5, repeat=3,
                                           min_repeat_ms=1, cooldown_interval_ms=1,
                                           repeats_to_cooldown=2)
        timing = await evaluator(x_remote, w_remote, y_remote)
        report["timings"] = list(timing.results)
        lazy = module.time_evaluator("dense_relu", device, number=2, repeat=2)
        report["lazy_timings"] = list((await lazy(x_remote, w_remote, y_remote)).results)
        report["workpath"] = await session.workpath("x")
        report["addone"] = await session.call("testing.echo", 41)
        report["echo_text"] = await session.call("testing.echo", "hé")
        report["system_lib"] = type(await session.system_lib()).__name__
        await session.remove("dense_relu.so")
        try:
            await session.listdir(".")
        except Exception as e:
            report["listdir_error"] = describe(e)
    report["closed"] = session.closed
    return report


async def errors_mode(reactor, host, port):
    report = {}
    session = await connect(host, int(port), reactor=reactor)
    async with session:
        for label, call in [
            ("missing", lambda: session.get_function("no.such.function")),
            ("exception", lambda: session.call("tvm.rpc.server.load_module", "missing.so")),
        ]:
            try:
                await call()
                report[label] = None
            except Exception as e:
                report[label] = describe(e)
        report["after"] = await session.call("testing.echo", 7)
    small = await connect(host, int(port), reactor=reactor, max_result_size=1000)
    async with small:
        await small.upload(b"x" * 5000, "big.bin")
        try:
            await small.download("big.bin")
            report["too_large"] = None
        except Exception as e:
            report["too_large"] = describe(e)
        report["after_too_large"] = await small.call("testing.echo", 8)
    return report


async def chunks_mode(reactor, host, port, count):
    import numpy as np

    session = await connect(host, int(port), reactor=reactor)
    async with session:
        host_data = np.arange(int(count), dtype="float32")
        array = await session.array(host_data)
        back = await array.numpy()
        return {"equal": bool((back == host_data).all()),
                "limit": session._engine._max_packet}


if __name__ == "__main__":
    dispatch({"story": story_mode, "errors": errors_mode, "chunks": chunks_mode})
