"""
The packets of TVM's own session protocol: framing, codes and builders.

A frame is C{u64 packet_nbytes} (little-endian, not counting itself) and the
packet: C{i32 RPCCode} and a body (C{reference/tvm_session_protocol.md}
section 2). L{FrameDecoder} cuts a byte stream into packets incrementally,
refusing a packet longer than its bound before buffering it; the builders
return one C{bytes} per packet, ready for one write.

Sans-IO: nothing here reads or writes a socket.
"""

import struct

from .tvm_values import TensorDesc, encode_seq

#: The protocol version both ends must send in kInitServer (unchanged since
#: 2021; TVM's pre-FFI peers, up to 0.20, send the same).
PROTOCOL_VERSION = "0.8.0"

# RPCCode (src/runtime/rpc/minrpc/rpc_reference.h).
NONE = 0
SHUTDOWN = 1
INIT_SERVER = 2
CALL_FUNC = 3
RETURN = 4
EXCEPTION = 5
COPY_FROM_REMOTE = 6
COPY_TO_REMOTE = 7
COPY_ACK = 8
GET_GLOBAL_FUNC = 9
FREE_HANDLE = 10
DEV_SET_DEVICE = 11
DEV_GET_ATTR = 12
DEV_ALLOC_DATA = 13
DEV_FREE_DATA = 14
DEV_STREAM_SYNC = 15
COPY_AMONG_REMOTE = 16
DEV_ALLOC_DATA_WITH_SCOPE = 17
DEV_CREATE_STREAM = 18
DEV_FREE_STREAM = 19
DEV_SET_STREAM = 20
DEV_GET_CURRENT_STREAM = 21

#: Names of the codes, for error messages.
CODE_NAMES = {
    value: "k" + "".join(part.title() for part in name.split("_"))
    for name, value in dict(globals()).items()
    if type(value) is int and name.isupper()
}

#: kDevGetAttr's attribute kind that asks whether a device exists.
ATTR_EXIST = 0
#: Bytes a copy packet adds to its data, besides C{8 * ndim} (TVM's
#: C{RemoteCopyCalculatePacketOverheadSize}).
COPY_OVERHEAD = 44

_U64 = struct.Struct("<Q")
_HEAD = struct.Struct("<Qi")
_CALL_HEAD = struct.Struct("<QiQ")

#: The kShutdown packet (it gets no reply).
SHUTDOWN_PACKET = _HEAD.pack(4, SHUTDOWN)


class TVMPacketError(ValueError):
    """Bytes that are not a valid packet stream of TVM's session protocol."""


def packet(code, body=b""):
    """@return: the frame of a packet of C{code} with C{body}."""
    return _HEAD.pack(len(body) + 4, code) + body


def init_server(version=PROTOCOL_VERSION, args=()):
    """@return: kInitServer with the protocol version and session constructor args."""
    raw = version.encode("ascii")
    return packet(INIT_SERVER, _U64.pack(len(raw)) + raw + encode_seq(list(args)))


def call_func(handle, args):
    """@return: kCallFunc of the function at C{handle} with C{args} (a list)."""
    seq = encode_seq(args)
    return _CALL_HEAD.pack(len(seq) + 12, CALL_FUNC, handle) + seq


def syscall(code, args):
    """@return: the packet of a syscall (kGetGlobalFunc and up) with C{args}."""
    return packet(code, encode_seq(args))


def copy_to_remote(desc, data):
    """
    @param desc: the L{TensorDesc} of the destination (its C{byte_offset}
        says where C{data} goes).
    @param data: the bytes to write.
    @return: kCopyToRemote (answered by kReturn C{[None]}).
    """
    head = desc.encode()
    return b"".join((_HEAD.pack(len(head) + len(data) + 12, COPY_TO_REMOTE), head,
                     _U64.pack(len(data)), data))


def copy_from_remote(desc, nbytes):
    """@return: kCopyFromRemote of C{nbytes} from C{desc} (answered by kCopyAck)."""
    return packet(COPY_FROM_REMOTE, desc.encode() + _U64.pack(nbytes))


def copy_packet_size(desc, nbytes):
    """@return: C{packet_nbytes} of a copy of C{nbytes} for C{desc} (what TVM bounds)."""
    return COPY_OVERHEAD + 8 * len(desc.shape) + nbytes


class FrameDecoder:
    """
    Cuts a byte stream into packets.

    @ivar max_packet: the longest C{packet_nbytes} accepted.
    @ivar skip_oversize: whether a longer packet is skipped (its bytes
        dropped as they come, never kept) instead of being an error.
    """

    __slots__ = ("max_packet", "skip_oversize", "_buffer", "_need", "_skip")

    def __init__(self, max_packet, skip_oversize=False):
        """
        @param max_packet: the longest C{packet_nbytes} accepted.
        @param skip_oversize: see L{skip_oversize}.
        """
        self.max_packet = max_packet
        self.skip_oversize = skip_oversize
        self._buffer = bytearray()
        self._need = None
        self._skip = 0

    def feed(self, data):
        """
        Take C{data} and return the packets it completes.

        @return: a list of C{(code, body)}, C{body} a C{bytes} (zero-length
            keep-alive frames are skipped). With L{skip_oversize}, a packet
            longer than L{max_packet} gives C{(None, its length)} as soon as
            its length is read, and its bytes are dropped.
        @raise TVMPacketError: for a packet longer than L{max_packet} (its
            length is checked before its bytes are kept) unless skipped, or
            one too short to hold a code. The decoder is unusable afterwards.
        """
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buffer = self._buffer
        buffer += data
        packets = []
        while True:
            need = self._need
            if need is None:
                if len(buffer) < 8:
                    break
                (need,) = _U64.unpack_from(buffer)
                if need == 0:
                    del buffer[:8]
                    continue
                if need > self.max_packet:
                    if not self.skip_oversize:
                        raise TVMPacketError(
                            f"a packet of {need} bytes, more than the bound of {self.max_packet}")
                    packets.append((None, need))
                    dropped = min(need, len(buffer) - 8)
                    del buffer[:8 + dropped]
                    self._skip = need - dropped
                    if self._skip:
                        break
                    continue
                if need < 4:
                    raise TVMPacketError(f"a packet of {need} bytes cannot hold its code")
                del buffer[:8]
                self._need = need
            if len(buffer) < need:
                break
            (code,) = struct.unpack_from("<i", buffer)
            packets.append((code, bytes(buffer[4:need])))
            del buffer[:need]
            self._need = None
        return packets

    @property
    def buffered(self):
        """Bytes held of the packet being received."""
        return len(self._buffer)


__all__ = [
    "CODE_NAMES",
    "FrameDecoder",
    "PROTOCOL_VERSION",
    "SHUTDOWN_PACKET",
    "TVMPacketError",
    "TensorDesc",
    "call_func",
    "copy_from_remote",
    "copy_packet_size",
    "copy_to_remote",
    "encode_seq",
    "init_server",
    "packet",
    "syscall",
]
