"""A line-based stand-in session protocol for the server plumbing tests.

It lets the daemon, worker and timeout tests run without the real session
protocol: each line is a command, each answer one line.
"""

import os
import signal
import time

from twisted.protocols.basic import LineOnlyReceiver


class StandinSession(LineOnlyReceiver):
    """Answers ``pid``, ``echo <text>``, ``workroot``; ``crash``, ``segv``, ``hang`` misbehave."""

    delimiter = b"\n"

    def __init__(self, work_root):
        self.work_root = work_root

    def lineReceived(self, line):
        command, _, argument = line.decode("utf-8").partition(" ")
        if command == "pid":
            self.sendLine(str(os.getpid()).encode())
        elif command == "echo":
            self.sendLine(argument.encode())
        elif command == "workroot":
            self.sendLine(self.work_root.encode())
        elif command == "crash":
            os._exit(7)
        elif command == "segv":
            os.kill(os.getpid(), signal.SIGSEGV)
        elif command == "hang":
            time.sleep(3600)
        else:
            self.sendLine(b"?")


def make(work_root, registry=None, *, clock=None, settings=None):
    """@return: a L{StandinSession}."""
    return StandinSession(work_root)
