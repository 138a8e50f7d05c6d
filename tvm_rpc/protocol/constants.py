"""The numbers of TVM's RPC wire protocols, matched byte for byte."""

import enum
import struct

#: First int32 of every connection to an RPC server or proxy.
RPC_MAGIC = 0xFF271
#: First int32 of every connection to a tracker, echoed back by the tracker.
RPC_TRACKER_MAGIC = 0x2F271

RPC_CODE_SUCCESS = RPC_MAGIC + 0
RPC_CODE_DUPLICATE = RPC_MAGIC + 1
RPC_CODE_MISMATCH = RPC_MAGIC + 2

#: TVM's tracker refuses frames longer than this; so do we.
MAX_TRACKER_FRAME = 1 << 20

#: Little-endian int32, the only integer of the framing and handshakes.
INT32 = struct.Struct("<i")


class TrackerCode(enum.IntEnum):
    """The first element of every tracker request, and the plain replies."""

    FAIL = -1
    SUCCESS = 0
    PING = 1
    STOP = 2
    PUT = 3
    REQUEST = 4
    UPDATE_INFO = 5
    SUMMARY = 6
    GET_PENDING_MATCHKEYS = 7
