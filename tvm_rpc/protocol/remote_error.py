"""
The remote-error type: an exception raised on the other end of a session.

Every exception a server-side responder raises reaches the client as a
L{RemoteError} (a declared AMP error, code L{REMOTE_ERROR_CODE}), so the
session stays usable after it.
"""

import json

from twisted.protocols import amp
from twisted.python.failure import Failure

#: The AMP error code of a L{RemoteError}.
REMOTE_ERROR_CODE = b"REMOTE_ERROR"
_REMOTE_ERROR_LIMIT = 60 * 1024


class RemoteError(Exception):
    """
    An exception raised on the other end of a session.

    On the wire the three parts travel as one JSON description (AMP carries
    only a description string). AMP rebuilds the exception by calling
    C{RemoteError(description)}; that form is recognised and unpacked.

    @ivar type_name: the remote exception's qualified type name
        (e.g. C{"builtins.PermissionError"}).
    @ivar message: C{str(exception)} on the remote end.
    @ivar traceback_text: the remote traceback, formatted; C{""} when the
        server does not send tracebacks (its default).
    @ivar address: C{host:port} of the server that raised it, when the
        client knows it (set by the session), else L{None}.
    """

    address = None

    def __init__(self, type_name, message=None, traceback_text=None):
        """
        @param type_name: the remote type name, or a whole wire description
            (then the other two are omitted).
        """
        if message is None and traceback_text is None:
            type_name, message, traceback_text = self._unpack(type_name)
        self.type_name = str(type_name)
        self.message = "" if message is None else str(message)
        self.traceback_text = "" if traceback_text is None else str(traceback_text)
        super().__init__(self.type_name, self.message, self.traceback_text)

    @staticmethod
    def _unpack(description):
        """Split a wire description; a foreign one becomes an unknown error."""
        try:
            parts = json.loads(description)
            return str(parts["type"]), str(parts["message"]), str(parts["traceback"])
        except (ValueError, TypeError, KeyError):
            return "tvm_rpc.UnknownRemoteError", str(description), ""

    @classmethod
    def from_exception(cls, exception, traceback_text=""):
        """
        @param exception: a local exception (or a L{RemoteError} to pass on).
        @param traceback_text: its formatted traceback.
        @return: the L{RemoteError} describing it.
        """
        if isinstance(exception, RemoteError):
            return exception
        kind = type(exception)
        module = kind.__module__
        name = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
        return cls(name, str(exception), traceback_text)

    @property
    def short_type_name(self):
        """The type name without its module (C{"PermissionError"})."""
        return self.type_name.rsplit(".", 1)[-1]

    def __str__(self):
        """
        One readable line, C{Type: message (on host:port)}: what a user sees
        in a traceback or a log line (the remote traceback stays in
        C{traceback_text}).
        """
        where = f" (on {self.address})" if self.address else ""
        return f"{self.short_type_name}: {' '.join(self.message.split())}{where}"

    def wire_description(self):
        """
        The wire description: JSON of type, message and traceback, shortened
        (the traceback keeps its end, the message its start) to fit in one
        AMP value.
        """
        message, traceback_text = self.message, self.traceback_text
        while True:
            text = json.dumps(
                {"type": self.type_name[:1024], "message": message, "traceback": traceback_text},
                ensure_ascii=False,
            )
            if len(text.encode("utf-8", "replace")) <= _REMOTE_ERROR_LIMIT:
                return text
            if len(traceback_text) > 64:
                traceback_text = "...\n" + traceback_text[len(traceback_text) // 2:]
            else:
                traceback_text = ""
                message = message[: len(message) // 2] + "..."

    def __repr__(self):
        """@return: the type name, message and traceback."""
        return (f"RemoteError({self.type_name!r}, {self.message!r}, "
                f"{self.traceback_text!r})")

    def located(self, address):
        """
        @param address: C{host:port} of the server the error came from.
        @return: this error, naming C{address} when it names no server yet.
        """
        if self.address is None and address:
            self.address = address
        return self


def as_remote_error(failure, tracebacks=False):
    """
    An errback for responders: any failure becomes a L{RemoteError} with the
    exception's type name and message (so AMP sends it as a declared error
    and the session stays usable).

    @param failure: a L{twisted.python.failure.Failure}.
    @param tracebacks: whether the error carries the formatted traceback too;
        off by default, as it shows the peer the server's code and paths.
    @return: a Failure wrapping the L{RemoteError}.
    """
    if failure.check(RemoteError):
        return failure
    text = failure.getTraceback(elideFrameworkCode=True) if tracebacks else ""
    return Failure(RemoteError.from_exception(failure.value, text))


class RemoteErrorLocator:
    """
    Mix into an L{amp.AMP} subclass (before it) so that every failure of
    one of its responders reaches the peer as a L{RemoteError}: the
    exception's type name and message, and its traceback only when the
    protocol's C{send_tracebacks} is C{True}. The session stays usable.

    Errors are wrapped once, around each responder that
    L{locateResponder} finds, so responders raise whatever they raise. A
    box whose arguments do not parse and an answer that cannot be
    serialized stay AMP's own errors (an unknown error that closes the
    connection), as before the responder runs.

    @ivar send_tracebacks: whether remote errors carry tracebacks; off by
        default, as they show the peer the server's code and paths.
    """

    send_tracebacks = False

    def locateResponder(self, name):
        """
        @param name: the command's name (C{bytes}).
        @return: AMP's responder for it, its failures turned into
            L{RemoteError}s; or L{None} when there is none.
        """
        responder = super().locateResponder(name)
        if responder is None:
            return None

        def respond(box):
            """Answer C{box}; the responder's failures become L{RemoteError}s."""
            return responder(box).addErrback(self._remote_error)

        return respond

    def _remote_error(self, failure):
        """
        @param failure: the failure of a responder, after AMP's check for
            declared errors.
        @return: the failure AMP sends as a declared L{RemoteError}.
        """
        if failure.check(amp.RemoteAmpError):
            if failure.value.errorCode == REMOTE_ERROR_CODE:
                # AMP describes a declared error by str(); the wire wants the JSON.
                local = failure.value.local
                if local is not None and local.check(RemoteError):
                    return Failure(amp.RemoteAmpError(
                        REMOTE_ERROR_CODE, local.value.wire_description(), local=local))
                return failure
        elif failure.check(amp.BadLocalReturn):
            return failure
        error = as_remote_error(failure, self.send_tracebacks is True)
        return Failure(amp.RemoteAmpError(REMOTE_ERROR_CODE, error.value.wire_description(),
                                          local=error))
