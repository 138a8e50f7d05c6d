"""The errors a client session fails with, whatever protocol engine is under it."""

from twisted.internet.error import ConnectionLost


class SessionClosed(ConnectionLost):
    """
    The session is over: closed by the client, the server, or a lost
    connection (a L{ConnectionLost}, so code that retries on lost
    connections treats it alike).
    """


class SessionTimeout(SessionClosed):
    """The server ended the session because its C{-timeout} ran out."""


class ProtocolMismatch(Exception):
    """
    The peer did not open the session as expected: no answer, or a refusal,
    to our C{Hello} (not a tvm_rpc session server, or another version) or to
    TVM's C{kInitServer} (on one of TVM's servers).
    """


class SessionLostAtStart(ProtocolMismatch, SessionClosed):
    """
    The connection was lost after the handshake, before the session's
    opening (our C{Hello}, TVM's C{kInitServer}) was answered: the server
    died in between (or the peer is not a session server). A L{SessionClosed}, so callers that retry lost connections
    (C{request()}) try another server.
    """


__all__ = ["ProtocolMismatch", "SessionClosed", "SessionLostAtStart", "SessionTimeout"]
