"""C{time_evaluator} on the device: timings that exclude the network.

L{time_evaluator} runs a function C{number} x C{repeat} times where it
lives and returns the mean seconds per call of each repeat, what
AutoTVM-style tuning needs. A function of a TVM module is timed by TVM's own
C{time_evaluator} (natively, without Python's call overhead), every option
passed through; any other is timed by L{python_time_evaluator}, which
follows TVM's C++ timer (C{WrapTimeEvaluator} in TVM's
C{src/runtime/timer.cc}) option by option.
"""

import functools
import math
import struct
import time

from ..protocol.evaluator_options import check_time_evaluator

#: The most calls one run grows to: it bounds the growth loop for a function
#: that takes (next to) no time on a coarse clock.
MAX_NUMBER = 1 << 30

#: TVM's growth factor of C{number} between two runs that were too short.
GOLDEN_RATIO = 1.618


def check_parameters(number, repeat, min_repeat_ms, options=None):
    """
    @return: TVM's options, checked (see L{check_time_evaluator}).
    @raise ValueError: naming every bad parameter.
    """
    return check_time_evaluator(number, repeat, min_repeat_ms, options)


def time_evaluator(function, call_args, device, number, repeat, min_repeat_ms, options, *,
                   backend, timer, origin=None, preproc=None, sleep=time.sleep):
    """
    Time C{function(*call_args)} on the device.

    @param call_args: the arguments, as the function receives them.
    @param device: a L{DLDevice<tvm_rpc.protocol.values.DLDevice>} the backend
        accepts (see L{check_device<tvm_rpc.server.backends.check_device>}).
    @param backend: the session's
        L{IArrayBackend<tvm_rpc.server.backends.IArrayBackend>}.
    @param timer: the clock to measure with (seconds).
    @param origin: C{(module, name)} when C{function} comes from a TVM
        module: TVM's own C{time_evaluator} then times it, with every option
        (C{f_preproc} then names a TVM global function).
    @param options: TVM's other options, checked (see L{check_parameters}).
    @param preproc: the function C{options["f_preproc"]} names, resolved by
        the caller, for L{python_time_evaluator}.
    @param sleep: how to wait C{cooldown_interval_ms} (seconds).
    @return: the mean seconds per call of each repeat.
    """
    if origin is not None and backend.name == "tvm":
        module, name = origin
        return tvm_time_evaluator(module, name, backend.device(device), call_args, number,
                                  repeat, min_repeat_ms, options)
    return python_time_evaluator(
        function, call_args, number, repeat, min_repeat_ms, options,
        sync=lambda: backend.sync(device), timer=timer, preproc=preproc, sleep=sleep)


@functools.cache
def _tvm_native_evaluator():
    import tvm

    return tvm.get_global_func("runtime.RPCTimeEvaluator")


def tvm_time_evaluator(module, name, device, call_args, number, repeat, min_repeat_ms,
                       options):
    """
    Time a function of a TVM module with TVM's native evaluator, the packed
    function C{runtime.RPCTimeEvaluator} that C{Module.time_evaluator}
    wraps. Its Python wrapper is skipped: the C{BenchmarkResult} it builds
    computes a median with numpy, which imports C{numpy.ma} (~20 ms of CPU)
    in every freshly forked session worker, and the session only needs the
    raw timings.

    @param module: the TVM module.
    @param name: the function's name in it.
    @param device: TVM's device object.
    @param options: TVM's options, checked (see L{check_parameters}).
    @return: the mean seconds per call of each repeat.
    """
    evaluate = _tvm_native_evaluator()(
        module, name, device.dlpack_device_type(), device.index, number, repeat,
        int(math.ceil(min_repeat_ms)), options["limit_zero_time_iterations"],
        options["cooldown_interval_ms"], options["repeats_to_cooldown"],
        options["cache_flush_bytes"], options["f_preproc"],
    )
    # The raw bytes of `repeat` doubles in the host's order, as TVM's wrapper reads them.
    return list(struct.unpack("@" + "d" * repeat, evaluate(*call_args)))


def python_time_evaluator(function, call_args, number, repeat, min_repeat_ms, options, *,
                          sync, timer, preproc, sleep):
    """
    Time a Python callable as TVM's C++ timer times a packed function.

    One untimed warm-up call; then for each repeat: C{preproc(*call_args)}
    if given; runs of C{number} calls, each preceded by a cache flush of
    C{cache_flush_bytes} (two host buffers that size, one copied onto the
    other) and bracketed by device syncs, until a run lasts
    C{min_repeat_ms} — after a run that measured time, C{number} grows to
    aim at C{min_repeat_ms} (at least x1.618); a run that measured zero
    keeps C{number} and counts towards C{limit_zero_time_iterations}, which
    ends the repeat when reached. C{number} carries over to the next
    repeat. After repeat C{i}, when C{i % repeats_to_cooldown == 0}, sleep
    C{cooldown_interval_ms}.

    @param options: TVM's options, checked (see L{check_parameters}).
    @param sync: waits for the device to finish its work.
    @param preproc: a callable or L{None}.
    @return: the mean seconds per call of each repeat.
    """
    function(*call_args)
    flush_bytes = options["cache_flush_bytes"] // 4 * 4
    flush_source = bytearray(flush_bytes) if flush_bytes else None
    flush_target = bytearray(flush_bytes) if flush_bytes else None
    zero_limit = options["limit_zero_time_iterations"]
    cooldown = options["cooldown_interval_ms"]
    sync()
    results = []
    for index in range(repeat):
        if preproc is not None:
            preproc(*call_args)
        elapsed = 0.0
        zero_runs = 0
        while True:
            if elapsed > 0:
                wanted = min_repeat_ms / (elapsed * 1000 / number) + 1
                number = min(int(max(wanted, number * GOLDEN_RATIO)), MAX_NUMBER)
            if flush_target is not None:
                flush_target[:] = flush_source
            sync()
            start = timer()
            for _ in range(number):
                function(*call_args)
            sync()
            elapsed = max(timer() - start, 0.0)
            if elapsed == 0:
                zero_runs += 1
            if (elapsed * 1000 >= min_repeat_ms or zero_runs >= zero_limit
                    or number >= MAX_NUMBER):
                break
        results.append(elapsed / number)
        if cooldown > 0 and index % options["repeats_to_cooldown"] == 0:
            sleep(cooldown / 1000)
    return results
