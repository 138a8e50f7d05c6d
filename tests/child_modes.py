"""The C{main} of the test scripts run as child processes: C{python SCRIPT MODE ARGS...}.

Each such script (L{tests.interop_client}, L{tests.tvm_engine_client},
L{tests.tvm_server_driver}) names its modes, coroutines taking the reactor
and the remaining arguments; the chosen one runs in one reactor run and its
result is printed last, as one JSON line, for the test to read.
L{dense_relu_arguments} is the seed story's arguments, shared by the two
clients' story modes.
"""

import json
import sys

from twisted.internet import defer, task
from twisted.python.failure import Failure


def report(value):
    """Print C{value} as one JSON line, at once (the test reads line by line)."""
    sys.stdout.write(json.dumps(value) + "\n")
    sys.stdout.flush()


async def dense_relu_arguments(session, device, n, m):
    """
    The seed story's arguments on C{device}: x (1 x n) and w (m x n), random
    with a fixed seed, and an empty float32 y (1 x m).

    @return: C{(x, w, x_remote, w_remote, y_remote)}, the first two numpy arrays.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, n)).astype("float32")
    w = rng.standard_normal((m, n)).astype("float32")
    x_remote = await session.array(x, device)
    w_remote = await session.array(w, device)
    y_remote = await session.empty((1, m), "float32", device)
    return x, w, x_remote, w_remote, y_remote


def dispatch(modes, describe_failure=None, argv=None):
    """
    Run the mode C{argv[1]} names with the arguments after it, print its
    result with L{report} and exit (L{task.react}).

    @param modes: coroutine functions by mode name, each called as
        C{mode(reactor, *arguments)}.
    @param describe_failure: turns a mode's L{Failure} into the result to
        print instead; without it an error ends the script with a traceback
        and a non-zero exit.
    @param argv: the command line; L{sys.argv} when L{None}.
    """
    mode, *arguments = (sys.argv if argv is None else argv)[1:]

    def main(reactor):
        async def run():
            try:
                result = await modes[mode](reactor, *arguments)
            except Exception:
                if describe_failure is None:
                    raise
                result = describe_failure(Failure())
            report(result)

        return defer.Deferred.fromCoroutine(run())

    task.react(main)
