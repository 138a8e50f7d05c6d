"""Count the handles a TVM server hands out and those freed, from the session's bytes.

L{HandleCount} reads both directions of one session of TVM's protocol (the
handshake, then frames; decoded with our codec, L{tvm_rpc.protocol.tvm_packets}
and L{tvm_rpc.protocol.tvm_values}) and pairs each reply with its request (TVM
answers strictly in order). It counts, per server pointer:

- handles acquired: a non-null kGetGlobalFunc result; a Function, Module,
  Tensor object or other object returned by kCallFunc; released by kFreeHandle;
- data acquired: a kDevAllocData[WithScope] result; released by kDevFreeData.

L{counting_relay} puts one between a client and a server on loopback.

This counts what crosses the wire, which is what a client controls: TVM's
server offers no count of its live handles, and a handle the client never
frees stays held by the server's session until it ends.
"""

import struct
from collections import Counter

from twisted.internet import defer
from twisted.protocols import portforward

from tvm_rpc.protocol import tvm_packets as packets
from tvm_rpc.protocol.tvm_values import OpaquePtr, call_return, decode_seq

#: TVM's type indices of kCallFunc results that are values, not handles (Str, Bytes).
_VALUE_OBJECTS = (65, 66)
_STATIC_OBJECT_BEGIN = 64
_I32 = struct.Struct("<i")
#: A bound on any one packet the relay decodes (the story's are small).
_MAX_PACKET = 1 << 30


class _Direction:
    """One direction's bytes: the handshake (two i32 and a key), then frames."""

    def __init__(self):
        self._handshake = bytearray()
        self._frames = None

    def feed(self, data):
        """@return: the C{(code, body)} packets C{data} completes."""
        if self._frames is not None:
            return self._frames.feed(data)
        self._handshake += data
        if len(self._handshake) < 8:
            return []
        (length,) = _I32.unpack_from(self._handshake, 4)
        if len(self._handshake) < 8 + length:
            return []
        rest = bytes(self._handshake[8 + length:])
        self._frames = packets.FrameDecoder(_MAX_PACKET)
        return self._frames.feed(rest)


def _pointer(value):
    """@return: the pointer in a decoded value (an L{OpaquePtr} or an int), else 0."""
    if isinstance(value, OpaquePtr):
        return value.value
    return value if type(value) is int else 0


class HandleCount:
    """What one session's server handed out and what was freed."""

    def __init__(self):
        self._client = _Direction()
        self._server = _Direction()
        self._pending = []
        self.handles = Counter()
        self.data = Counter()
        self.handles_acquired = 0
        self.data_acquired = 0
        self.unmatched = 0
        self.shutdown = False

    def from_client(self, data):
        """Read bytes the client sent."""
        for code, body in self._client.feed(data):
            if code == packets.SHUTDOWN:
                self.shutdown = True
                continue
            self._pending.append(code)
            if code == packets.FREE_HANDLE:
                self.handles[_pointer(decode_seq(body)[0][0])] -= 1
            elif code == packets.DEV_FREE_DATA:
                self.data[_pointer(decode_seq(body)[0][1])] -= 1

    def from_server(self, data):
        """Read bytes the server sent."""
        for code, body in self._server.feed(data):
            if code == packets.SHUTDOWN:
                continue
            if not self._pending:
                self.unmatched += 1
                continue
            request = self._pending.pop(0)
            if code == packets.RETURN:
                self._returned(request, decode_seq(body)[0])

    def _returned(self, request, items):
        """Count what the reply C{items} to C{request} handed out."""
        if request == packets.GET_GLOBAL_FUNC:
            self._acquire(self.handles, _pointer(items[0]), "handles_acquired")
        elif request in (packets.DEV_ALLOC_DATA, packets.DEV_ALLOC_DATA_WITH_SCOPE):
            self._acquire(self.data, _pointer(items[0]), "data_acquired")
        elif request == packets.CALL_FUNC:
            type_index, value, tensor_object = call_return(items)
            if tensor_object is not None:
                self._acquire(self.handles, tensor_object, "handles_acquired")
            elif type_index >= _STATIC_OBJECT_BEGIN and type_index not in _VALUE_OBJECTS:
                self._acquire(self.handles, _pointer(value), "handles_acquired")

    def _acquire(self, counter, pointer, total):
        if pointer:
            counter[pointer] += 1
            setattr(self, total, getattr(self, total) + 1)

    def report(self):
        """@return: the counts, for a JSON report (held: pointer -> count, nonzero only)."""
        return {
            "handles_acquired": self.handles_acquired,
            "data_acquired": self.data_acquired,
            "handles_held": {hex(p): n for p, n in self.handles.items() if n},
            "data_held": {hex(p): n for p, n in self.data.items() if n},
            "unmatched": self.unmatched + len(self._pending),
            "shutdown": self.shutdown,
        }


class _CountingClient(portforward.ProxyClient):
    """The relay's side towards the server."""

    def dataReceived(self, data):
        self.peer.factory.counts.from_server(data)
        super().dataReceived(data)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        done = self.factory.server.factory.done
        if not done.called:
            done.callback(None)


class _CountingClientFactory(portforward.ProxyClientFactory):
    protocol = _CountingClient


class _CountingServer(portforward.ProxyServer):
    """The relay's side towards the client."""

    clientProtocolFactory = _CountingClientFactory

    def dataReceived(self, data):
        self.factory.counts.from_client(data)
        super().dataReceived(data)


class CountingRelay(portforward.ProxyFactory):
    """
    Relays one session to C{host}:C{port} and counts its handles.

    @ivar counts: the L{HandleCount}.
    @ivar done: fires once the server's side of the relay is closed.
    @ivar listening: the listening port, once L{counting_relay} started it
        (C{port} is the server's).
    """

    protocol = _CountingServer

    def __init__(self, host, port):
        super().__init__(host, port)
        self.counts = HandleCount()
        self.done = defer.Deferred()
        self.listening = None


async def counting_relay(reactor, host, port):
    """@return: a L{CountingRelay} to C{host}:C{port}, listening on 127.0.0.1."""
    from twisted.internet.endpoints import TCP4ServerEndpoint

    relay = CountingRelay(host, port)
    relay.listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(relay)
    return relay
