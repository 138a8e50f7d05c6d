"""An ``--init`` module for the server tests: records that it was set up."""

CALLS = []


def setup():
    """Called by ``--init tests.server_init_sample:setup``."""
    CALLS.append("setup")
