"""An ``--init`` module for the server tests: registers functions, records set-up."""

import os
import time

from tvm_rpc.server import register_func

CALLS = []


@register_func("test.hang", override=True)
def hang(seconds):
    """Sleep C{seconds}: a call that outlives its session's timeout."""
    time.sleep(seconds)
    return seconds


@register_func("test.crash", override=True)
def crash(code):
    """End the worker process at once, as a crash in user code would."""
    os._exit(code)


def setup():
    """Called by ``--init tests.server_init_sample:setup``."""
    CALLS.append("setup")


@register_func("test.fail", override=True)
def fail(text):
    """Raise C{ValueError(text)}: a remote exception whose text the client must see."""
    raise ValueError(text)


@register_func("test.add", override=True)
def add(a, b):
    """@return: C{a + b}."""
    return a + b


@register_func("test.pid", override=True)
def pid():
    """@return: the worker's process id (to kill it in the middle of a call)."""
    return os.getpid()


@register_func("test.start_child", override=True)
def start_child():
    """Start a child process that outlives the call (and a thread that spins); @return: its pid."""
    import subprocess
    import threading

    def spin():
        while True:
            pass

    threading.Thread(target=spin, daemon=True).start()
    return subprocess.Popen(["sleep", "300"]).pid


#: What test.hold keeps alive in the worker, for good.
HELD = []


@register_func("test.hold", override=True)
def hold(size):
    """Keep C{size} bytes resident in the worker for its whole life (a leak)."""
    HELD.append(b"x" * size)
    return len(HELD)


@register_func("test.mapped", override=True)
def mapped(path):
    """
    @return: whether the shared library C{path} is mapped into the worker
        (still mapped after its file was removed, too: C{path (deleted)}).
    """
    with open("/proc/self/maps") as maps:
        return any(line.rstrip().removesuffix(" (deleted)").endswith(path) for line in maps)


@register_func("test.cmdline", override=True)
def cmdline():
    """@return: the worker's command line (a spawned worker's is its own)."""
    with open("/proc/self/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


# The global functions of the session behaviour suite (tests/session_behaviour.py).
register_func("add", add, override=True)
register_func("boom", lambda: 1 / 0, override=True)
