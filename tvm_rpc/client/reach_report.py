"""
What an operator reads while a daemon cannot reach its tracker or proxy:
one line when a failure streak starts ("cannot reach tracker 127.0.0.1:9190:
connection refused; retrying in 0.5 s"), silence while it lasts, and one
line when the peer is reached again. Used by the server's and the proxy's
tracker links and by the server's C{--through-proxy} link.
"""

import attrs
from twisted.logger import Logger

from .link_errors import connect_reason


@attrs.define(eq=False)
class ReachReport:
    """
    Says once per failure streak that a peer cannot be reached.

    @ivar peer: a printable name of the peer (C{"tracker 127.0.0.1:9190"}).
    @ivar log: the owner's L{Logger}.
    @ivar failing: whether a failure streak is under way.
    """

    peer: str
    log: Logger
    failing: bool = False

    def failed(self, exception, delay):
        """
        A connection attempt failed; the next one is in C{delay} seconds.

        @param exception: why it failed.
        @param delay: seconds until the next attempt.
        """
        if self.failing:
            return
        self.failing = True
        self.log.warn("cannot reach {peer}: {reason}; retrying in {delay:g} s",
                      peer=self.peer, reason=connect_reason(exception), delay=round(delay, 1))

    def reached(self):
        """A connection attempt succeeded: a streak, if any, is over."""
        if self.failing:
            self.failing = False
            self.log.info("reached {peer} again", peer=self.peer)


@attrs.define(eq=False)
class ReportingEndpoint:
    """
    A client endpoint that remembers why its last attempt failed (for a
    L{ReachReport} told by the retry policy) and whose C{repr} names the
    peer, so Twisted's own retry lines name it too.

    @ivar endpoint: the wrapped endpoint.
    @ivar peer: a printable name of the peer.
    @ivar last_failure: the exception of the last failed attempt, or
        L{None} when the last attempt connected.
    """

    endpoint: object
    peer: str
    last_failure: object = None

    def connect(self, factory):
        """@return: the wrapped endpoint's attempt, its outcome noted."""
        attempt = self.endpoint.connect(factory)
        attempt.addCallbacks(self._connected, self._failed)
        return attempt

    def _connected(self, protocol):
        self.last_failure = None
        return protocol

    def _failed(self, failure):
        self.last_failure = failure.value
        return failure

    def __repr__(self):
        """@return: the peer's name, for Twisted's log lines."""
        return f"<{self.peer}>"


def reporting_policy(policy, endpoint, report):
    """
    @param policy: a retry policy (attempt number -> seconds).
    @param endpoint: the L{ReportingEndpoint} the attempts go through.
    @param report: the L{ReachReport} to tell.
    @return: the policy, telling C{report} about each failed connection
        attempt (a registration that failed after connecting is reported
        by its own code).
    """

    def retry_delay(attempt):
        """@return: C{policy}'s delay; a failed connection attempt is reported."""
        delay = policy(attempt)
        if endpoint.last_failure is not None:
            report.failed(endpoint.last_failure, delay)
        return delay

    return retry_delay
