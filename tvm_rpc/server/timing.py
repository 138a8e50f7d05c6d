"""C{time_evaluator} on the device: timings that exclude the network.

L{time_evaluator} runs a function C{number} x C{repeat} times where it
lives and returns the mean seconds per call of each run, what AutoTVM-style
tuning needs. A function of a TVM module is timed by TVM's own
C{time_evaluator} (natively, without Python's call overhead); any other is
timed here, the device synced around each run.
"""

import math


def check_parameters(number, repeat, min_repeat_ms):
    """
    @raise ValueError: for C{number} or C{repeat} below 1 or a negative
        C{min_repeat_ms}.
    """
    if number < 1 or repeat < 1 or not min_repeat_ms >= 0:
        raise ValueError(
            f"time_evaluator needs number >= 1, repeat >= 1, min_repeat_ms >= 0; got "
            f"{number}, {repeat}, {min_repeat_ms}"
        )


def time_evaluator(function, call_args, device, number, repeat, min_repeat_ms, *,
                   backend, timer, origin=None):
    """
    Time C{function(*call_args)} on the device: one warm-up call, then
    C{repeat} runs of C{number} calls each, the device synced around each
    run. When a run is shorter than C{min_repeat_ms}, C{number} grows and the
    run is redone.

    @param call_args: the arguments, as the function receives them.
    @param device: a L{DLDevice<tvm_rpc.protocol.values.DLDevice>} the backend
        accepts (see L{check_device<tvm_rpc.server.backends.check_device>}).
    @param backend: the session's
        L{IArrayBackend<tvm_rpc.server.backends.IArrayBackend>}.
    @param timer: the clock to measure with (seconds).
    @param origin: C{(module, name)} when C{function} comes from a TVM
        module: TVM's own C{time_evaluator} then times it.
    @return: the mean seconds per call of each run.
    @raise ValueError: for bad counts (see L{check_parameters}).
    """
    check_parameters(number, repeat, min_repeat_ms)
    if origin is not None and backend.name == "tvm":
        module, name = origin
        evaluator = module.time_evaluator(
            name, backend.device(device), number=number, repeat=repeat,
            min_repeat_ms=int(math.ceil(min_repeat_ms)),
        )
        return [float(seconds) for seconds in evaluator(*call_args).results]
    backend.sync(device)
    function(*call_args)
    results = []
    for _ in range(repeat):
        while True:
            backend.sync(device)
            start = timer()
            for _ in range(number):
                function(*call_args)
            backend.sync(device)
            elapsed = timer() - start
            if elapsed * 1000 >= min_repeat_ms or number >= 1 << 30:
                break
            # As TVM does: aim straight at min_repeat_ms, growing at least 1.618x.
            wanted = number * 10 if elapsed <= 0 else number * min_repeat_ms / (elapsed * 1000)
            number = min(max(math.ceil(wanted), math.ceil(number * 1.618)), 1 << 30)
        results.append(elapsed / number)
    return results
