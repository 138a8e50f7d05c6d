"""An ``--init`` module for the server tests: registers functions, records set-up."""

import time

from tvm_rpc.server import register_func

CALLS = []


@register_func("test.hang", override=True)
def hang(seconds):
    """Sleep C{seconds}: a call that outlives its session's timeout."""
    time.sleep(seconds)
    return seconds


def setup():
    """Called by ``--init tests.server_init_sample:setup``."""
    CALLS.append("setup")
