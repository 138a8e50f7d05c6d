"""
Remote errors that name their server: a session's engine seen through
L{LocatedEngine}, whose Deferreds fail with
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>}s that end in
C{(on host:port)}.

Both engines make remote errors (the AMP engine from the error box, the TVM
engine from a kException) without knowing the address the session was opened
on; the facade knows it, so the address is added once here, for both.
"""

from twisted.internet.defer import Deferred

from ..protocol.remote_error import RemoteError


class LocatedEngine:
    """
    An engine whose methods' Deferreds name C{address} in the remote errors
    they fail with; everything else passes through unchanged.

    @ivar engine: the wrapped L{ISessionEngine<tvm_rpc.client.engine.ISessionEngine>}.
    @ivar address: C{host:port} of the server, or L{None} while unknown
        (the session sets it after the handshake).
    """

    def __init__(self, engine, address):
        """
        @param engine: the session's engine.
        @param address: C{host:port} of its server.
        """
        self.engine = engine
        self.address = address

    def __getattr__(self, name):
        """@return: the engine's attribute; a method's Deferreds locate their remote errors."""
        value = getattr(self.engine, name)
        if not callable(value):
            return value

        def located(*args, **kwargs):
            """Call the engine's method; its Deferred names the server in remote errors."""
            result = value(*args, **kwargs)
            if isinstance(result, Deferred) and self.address:
                result.addErrback(_locate, self.address)
            return result

        return located


def _locate(failure, address):
    """@return: C{failure}, its remote error naming C{address}."""
    if failure.check(RemoteError):
        failure.value.located(address)
    return failure
