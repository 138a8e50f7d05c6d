"""A server that answers the RPC handshake like Apache TVM's, then sends garbage.

It speaks just enough of TVM's session protocol to open a session (the
handshake with an unmarked ``server:`` key, kReturn to kInitServer, "no such
function" to lookups, a fake pointer to allocations), and answers one request
wrongly, as the C{kind} asks:

- ``code``: a packet with an RPC code TVM does not have (L{BAD_CODE});
- ``type``: a kReturn whose value has an unknown type index (L{BAD_TYPE_INDEX});
- ``length``: a frame header announcing L{HUGE_LENGTH} bytes, then silence;
- ``copyack``: a kCopyAck of L{SHORT_COPY} bytes for a copy of more.

The first three answer the lookup of C{tvm.rpc.server.workpath}; the last
answers kCopyFromRemote. The bytes are built here by hand (not with our
codec), so they are wrong in exactly one way.
"""

import struct

from twisted.internet.protocol import Factory, Protocol

RPC_MAGIC = 0xFF271
#: TVM's RPC codes used here (``rpc_reference.h``).
K_SHUTDOWN, K_INIT_SERVER, K_RETURN, K_COPY_FROM_REMOTE, K_COPY_ACK = 1, 2, 4, 6, 8
K_GET_GLOBAL_FUNC, K_DEV_ALLOC_DATA, K_DEV_ALLOC_DATA_WITH_SCOPE = 9, 13, 17
#: tvm-ffi type indices: None, OpaquePtr, RawStr.
NONE, OPAQUE_PTR, RAW_STR = 0, 4, 8

BAD_CODE = 77
BAD_TYPE_INDEX = 4242
HUGE_LENGTH = 1 << 40
SHORT_COPY = 3
#: The fake data pointer handed out for allocations.
FAKE_POINTER = 0x1000
KINDS = ("code", "type", "length", "copyack")

_U64 = struct.Struct("<Q")
_I32 = struct.Struct("<i")


def frame(body):
    """@return: C{body} framed as TVM frames packets (u64 length, excluding itself)."""
    return _U64.pack(len(body)) + body


def returning(*values):
    """@return: a kReturn packet of C{(type_index, payload bytes)} values."""
    body = _I32.pack(K_RETURN) + _I32.pack(len(values))
    for type_index, payload in values:
        body += _I32.pack(type_index) + payload
    return frame(body)


def looked_up_name(body):
    """@return: the name in a kGetGlobalFunc body (after its code), or L{None}."""
    count, type_index = struct.unpack_from("<ii", body, 4)
    if count != 1 or type_index != RAW_STR:
        return None
    (length,) = _U64.unpack_from(body, 12)
    return body[20:20 + length].decode("utf-8", "replace")


class GarbageServer(Protocol):
    """One connection: the handshake, then packets answered until the garbage is sent."""

    def __init__(self, kind):
        self.kind = kind
        self._buffer = b""
        self._shaken = False

    def dataReceived(self, data):
        self._buffer += data
        while self.transport is not None and self._next():
            pass

    def _next(self):
        """Handle one complete handshake or packet from the buffer; @return: whether it did."""
        buffer = self._buffer
        if not self._shaken:
            if len(buffer) < 8:
                return False
            (length,) = _I32.unpack_from(buffer, 4)
            if len(buffer) < 8 + length:
                return False
            self._buffer = buffer[8 + length:]
            self._shaken = True
            key = b"server:garbage"
            self.transport.write(_I32.pack(RPC_MAGIC) + _I32.pack(len(key)) + key)
            return True
        if len(buffer) < 8:
            return False
        (length,) = _U64.unpack_from(buffer)
        if len(buffer) < 8 + length:
            return False
        body, self._buffer = buffer[8:8 + length], buffer[8 + length:]
        if length:
            self._answer(body)
        return True

    def _answer(self, body):
        (code,) = _I32.unpack_from(body)
        if code == K_SHUTDOWN:
            self.transport.loseConnection()
        elif code == K_GET_GLOBAL_FUNC:
            if looked_up_name(body) == "tvm.rpc.server.workpath" and self.kind != "copyack":
                self._garbage()
            else:
                self.transport.write(returning((OPAQUE_PTR, _U64.pack(0))))
        elif code in (K_DEV_ALLOC_DATA, K_DEV_ALLOC_DATA_WITH_SCOPE):
            self.transport.write(returning((OPAQUE_PTR, _U64.pack(FAKE_POINTER))))
        elif code == K_COPY_FROM_REMOTE and self.kind == "copyack":
            self._garbage()
        else:
            # kInitServer, kFreeHandle, kDevFreeData, kDevStreamSync...: None.
            self.transport.write(returning((NONE, b"")))

    def _garbage(self):
        if self.kind == "code":
            self.transport.write(frame(_I32.pack(BAD_CODE) + bytes(8)))
        elif self.kind == "type":
            self.transport.write(returning((BAD_TYPE_INDEX, bytes(8))))
        elif self.kind == "length":
            self.transport.write(_U64.pack(HUGE_LENGTH) + _I32.pack(K_RETURN) + bytes(60))
        else:
            self.transport.write(frame(_I32.pack(K_COPY_ACK) + bytes(SHORT_COPY)))


def serve_garbage(reactor, kind):
    """
    Listen on 127.0.0.1 (a port the system picks) with a L{GarbageServer} of C{kind}.

    @return: a Deferred of the listening port.
    """
    if kind not in KINDS:
        raise ValueError(f"kind is one of {KINDS}, not {kind!r}")
    from twisted.internet.endpoints import TCP4ServerEndpoint

    factory = Factory.forProtocol(lambda: GarbageServer(kind))
    return TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
