"""
Connection errors that say where and what: L{CannotReach} names the peer's
address and what was being done ("connecting to the tracker at
127.0.0.1:9190: connection refused"), L{TrackerClosed} a tracker that went
away under a waiting request, and L{connect_reason} puts Twisted's connection
errors into a few plain words (shared with the query tool and the
registration loops).
"""

from twisted.internet import defer, error


class CannotReach(error.ConnectError):
    """
    Connecting to a peer failed. A L{error.ConnectError}, so code that retries
    on connection errors retries on it.

    @ivar doing: what was being done (C{"connecting to the tracker at h:p"}).
    @ivar reason: why it failed, in a few words (C{"connection refused"}).
    @ivar cause: the original exception.
    """

    def __init__(self, doing, cause):
        """
        @param doing: what was being done, naming the peer's address.
        @param cause: the connection error.
        """
        self.reason = connect_reason(cause)
        super().__init__(string=self.reason)
        self.doing = doing
        self.cause = cause

    def __str__(self):
        """@return: C{"<doing>: <reason>"}."""
        return f"{self.doing}: {self.reason}"


class TrackerClosed(error.ConnectionLost):
    """The tracker closed the connection while a request was waiting on it."""

    def __str__(self):
        """@return: the message alone (Twisted's prefix says nothing more)."""
        return str(self.args[0]) if self.args else "the tracker closed the connection"


def connect_reason(exception):
    """
    @param exception: a connection error (or any exception).
    @return: why connecting failed, in a few lower-case words.
    """
    if isinstance(exception, CannotReach):
        return exception.reason
    if isinstance(exception, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exception, error.DNSLookupError):
        return "host name not found"
    if isinstance(exception, (error.TCPTimedOutError, error.TimeoutError, defer.TimeoutError)):
        return "no answer (connection timed out)"
    if isinstance(exception, error.ConnectError):
        detail = exception.args[0] if exception.args else ""
        reason = getattr(detail, "strerror", None) or str(detail or "") or exception.MESSAGE
        return " ".join(reason.split()).rstrip(".").lower()
    text = " ".join(str(exception).split())
    return text or type(exception).__name__


async def reaching(doing, attempt):
    """
    @param doing: what is being done, naming the peer.
    @param attempt: an awaitable connection attempt.
    @return: its result.
    @raise CannotReach: when it fails with a connection error.
    """
    try:
        return await attempt
    # A host name that does not resolve fails with DNSLookupError, which is no ConnectError.
    except (error.ConnectError, error.DNSLookupError) as e:
        if isinstance(e, CannotReach):
            raise
        raise CannotReach(doing, e) from e
