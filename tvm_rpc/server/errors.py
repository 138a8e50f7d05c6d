"""The errors a session's environment raises, under the names clients see.

A failed call reaches the client as a
L{RemoteError<tvm_rpc.protocol.remote_error.RemoteError>} whose C{type_name} is the
exception's qualified name, and clients match on it
(C{"tvm_rpc.server.environment.PathEscapeError"}). These errors were born in
C{tvm_rpc.server.environment}; the modules that raise them now sit beside it
(work directory, array backends, module loading), so each keeps that name on
the wire through its C{__module__}, whichever module raises it.
"""

#: The module name every session error carries on the wire.
WIRE_MODULE = "tvm_rpc.server.environment"


class PathEscapeError(PermissionError):
    """A path that would leave the session's work directory."""

    __module__ = WIRE_MODULE


class DeviceError(RuntimeError):
    """A device that does not exist, or that this server cannot drive."""

    __module__ = WIRE_MODULE


class TVMRuntimeMissing(RuntimeError):
    """A TVM-compiled library was loaded on a device without TVM's runtime."""

    __module__ = WIRE_MODULE


class HandleError(LookupError):
    """A handle id that is unknown, freed, or of another kind."""

    __module__ = WIRE_MODULE


class CodeUploadRefused(PermissionError):
    """A module uploaded in the session, on a server that runs only its own functions."""

    __module__ = WIRE_MODULE


def code_upload_refused(action):
    """
    @param action: what was refused (C{"load 'x.so'"}, C{"call NAME (why)"}).
    @return: the L{CodeUploadRefused} a server under C{--no-code-upload} raises.
    """
    return CodeUploadRefused(
        f"refused to {action}: this server does not run uploaded code "
        "(--no-code-upload); only its registered functions and --init modules run"
    )
