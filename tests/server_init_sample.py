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
