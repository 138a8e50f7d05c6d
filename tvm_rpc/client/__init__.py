"""The Deferred-based client: tracker sessions, and RPC sessions on our servers and on TVM's."""

from ..protocol.tracker_commands import Allocation, TrackerError
from .tracker import (
    TrackerClientFactory,
    TrackerClientProtocol,
    TrackerSession,
    connect_tracker,
)
from .devices import Device
from .remote import RemoteArray, RemoteFunction, RemoteModule, TimeEvaluatorResult
from ..protocol.remote_error import RemoteError
from .rpc_session import RPCSession
from .session_errors import ProtocolMismatch, SessionClosed, SessionTimeout

__all__ = [
    "Allocation",
    "TrackerClientFactory",
    "TrackerClientProtocol",
    "TrackerError",
    "TrackerSession",
    "connect_tracker",
]
__all__ += ["Device", "ProtocolMismatch", "RPCSession", "RemoteArray", "RemoteError",
            "RemoteFunction", "RemoteModule", "SessionClosed", "SessionTimeout",
            "TimeEvaluatorResult"]
from .connect import (
    DuplicateKey,
    HandshakeError,
    KeyMismatch,
    NotAnRpcServer,
    RequestFailed,
    connect,
)

__all__ += ["DuplicateKey", "HandshakeError", "KeyMismatch", "NotAnRpcServer",
            "RequestFailed", "connect"]
from .link_errors import CannotReach, TrackerClosed
from .waiting import WaitProgress

__all__ += ["CannotReach", "TrackerClosed", "WaitProgress"]
