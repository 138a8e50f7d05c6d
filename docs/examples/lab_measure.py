"""Measure one kernel on every device of a key at once, from one process.

Usage (the host needs tvm_rpc, numpy and, to compile the kernel, apache-tvm)::

    python docs/examples/lab_measure.py --tracker tracker.lab:9190 --key rasp
        [--size 64] [--number 10] [--repeat 3] [--session-timeout 60]

It asks the tracker how many servers of the key are free, requests that
many sessions at once (each request is handed a different server), and on
every device concurrently uploads the kernel (a ``--size`` square float32
matmul compiled here for ``llvm``; use a cross target for boards of another
architecture), loads it, copies random inputs, runs it once and checks the
result against numpy, and times it with ``time_evaluator``. One reactor, no
threads: the devices are driven side by side by coroutines. Servers of
either kind may share the key (``twistd rpc-server`` or TVM's
``python -m tvm.exec.rpc_server``): the session API is the same, and the
report says which session protocol each spoke.
"""

import argparse
import os
import tempfile

import numpy as np
from twisted.internet import defer, task

from tvm_rpc.client import connect_tracker


def compile_matmul(size, directory):
    """
    Compile C{C = A @ B} (float32, C{size} x C{size}) for llvm as function ``matmul``.

    @return: the path of the exported library.
    """
    import tvm
    from tvm import te

    a = te.placeholder((size, size), "float32", name="A")
    b = te.placeholder((size, size), "float32", name="B")
    k = te.reduce_axis((0, size), name="k")
    c = te.compute((size, size), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    function = te.create_prim_func([a, b, c]).with_attr("global_symbol", "matmul")
    path = os.path.join(directory, "matmul.so")
    tvm.compile(function, target="llvm").export_library(path)
    return path


async def measure(session, library, size, options):
    """
    Upload, load, check and time the kernel on one session's device.

    @return: a dict describing the device and its timings.
    """
    async with session:
        await session.upload(library, "matmul.so")
        module = await session.load_module("matmul.so")
        device = session.cpu(0)
        rng = np.random.default_rng()
        a_host = rng.standard_normal((size, size), dtype="float32")
        b_host = rng.standard_normal((size, size), dtype="float32")
        a = await session.array(a_host, device)
        b = await session.array(b_host, device)
        c = await session.empty((size, size), "float32", device)
        matmul = module["matmul"]
        await matmul(a, b, c)
        np.testing.assert_allclose(await c.numpy(), a_host @ b_host, rtol=1e-4, atol=1e-4)
        timer = session.time_evaluator(matmul, device, number=options.number,
                                       repeat=options.repeat)
        timings = await timer(a, b, c)
        return {"address": session.address, "protocol": session.protocol,
                "timings": timings}


async def main(reactor, options):
    """Measure on every free device of the key; print one line per device."""
    host, _, port = options.tracker.rpartition(":")
    tracker = await connect_tracker(host, int(port), reactor=reactor)
    try:
        summary = await tracker.summary()
        free = summary["queue_info"].get(options.key, {}).get("free", 0)
        if not free:
            raise SystemExit(f"no free server for key {options.key!r}")
        with tempfile.TemporaryDirectory() as directory:
            library = compile_matmul(options.size, directory)

            async def one_device():
                session = await tracker.request(options.key,
                                                session_timeout=options.session_timeout)
                return await measure(session, library, options.size, options)

            # All requests are in the tracker's queue at once: each gets its own server.
            outcomes = await defer.DeferredList(
                [defer.Deferred.fromCoroutine(one_device()) for _ in range(free)],
                consumeErrors=True)
    finally:
        await tracker.close()
    results = [value for ok, value in outcomes if ok]
    print(f"{options.size}x{options.size} float32 matmul on {len(results)} of {free} devices "
          f"of {options.key!r} (number={options.number}, repeat={options.repeat}):")
    for result in sorted(results, key=lambda r: r["address"] or ""):
        timings = result["timings"]
        print(f"  {result['address']:<22} {result['protocol']:<8} "
              f"mean {timings.mean * 1e3:8.4f} ms  median {timings.median * 1e3:8.4f} ms  "
              f"min {timings.min * 1e3:8.4f} ms")
    for ok, failure in outcomes:
        if not ok:
            print(f"  failed: {failure.type.__name__}: {failure.getErrorMessage()}")
    if len(results) < free:
        raise SystemExit(1)


def parse_args(argv=None):
    """@return: the parsed command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracker", required=True, help="HOST:PORT of the tracker")
    parser.add_argument("--key", required=True)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--number", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--session-timeout", type=float, default=60)
    return parser.parse_args(argv)


if __name__ == "__main__":
    arguments = parse_args()
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor, arguments)))
