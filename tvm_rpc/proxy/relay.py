"""The byte relay between a paired client and server, with backpressure both ways.

Each side's transport is registered as a streaming producer on the other
side's transport: when one peer reads slowly and its outgoing buffer in the
proxy passes the transport's C{bufferSize}, Twisted pauses reading from the
other peer until the buffer drains. The proxy therefore holds at most about
two chunks per direction (the buffer limit plus one read), which is the bound
stated in C{docs/proxy.md}.

An end of file from one peer is passed on as a half-close to the other, which
may still answer; a lost connection closes the other side once its buffered
bytes are written.

With C{splice} on (the proxy's default on Linux), a pair of plain TCP
transports is handed to L{tvm_rpc.proxy.splice.SpliceRelay} one reactor turn
after it starts: the bytes then move socket -> pipe -> socket in the kernel,
and the producer coupling above only covers the moment before the hand-over
(and every pair where splicing is unavailable: websockets, TLS, other
platforms).
"""

import attrs
from twisted.logger import Logger
from zope.interface import Attribute, Interface

#: Bytes read per C{recv} and the outgoing buffer limit per side; a pair holds
#: at most about 2 * 2 * RELAY_CHUNK bytes (two directions, limit plus one read).
#: 1 MiB relays about a fifth faster than 256 KiB (fewer reactor turns per byte).
RELAY_CHUNK = 1024 * 1024


class IRelaySide(Interface):
    """One peer of a relay."""

    transport = Attribute(
        "The peer's transport: an IConsumer for bytes sent to the peer and an "
        "IPushProducer that reads from the peer."
    )

    def send(data):
        """Send C{data} to the peer."""

    def finish_sending():
        """Nothing more will be sent: half-close towards the peer once flushed."""

    def close():
        """Close the peer's connection once its buffered bytes are written."""


@attrs.define(eq=False)
class Relay:
    """
    Relays bytes between two L{IRelaySide}s.

    @ivar a: one side.
    @ivar b: the other side.
    @ivar on_end: called once (no arguments) when the relay ends, or L{None}.
    """

    a: object
    b: object
    on_end: object = None
    reactor: object = None
    splice: bool = False
    _reading: set = attrs.field(init=False, factory=set)
    _stopped: bool = attrs.field(init=False, default=False)
    _spliced: object = attrs.field(init=False, default=None)
    # Bytes passed on by received() (the Twisted path), from a and from b.
    _from_a: int = attrs.field(init=False, default=0)
    _from_b: int = attrs.field(init=False, default=0)

    log = Logger()

    def other(self, side):
        """@return: the side that is not C{side}."""
        return self.b if side is self.a else self.a

    def start(self):
        """
        Couple the two transports as each other's streaming producer; with
        C{splice}, plan the hand-over to the kernel for the next reactor turn
        (after the caller passed on what the peers sent early).
        """
        self._reading = {self.a, self.b}
        self._couple()
        if self.splice and self.reactor is not None:
            from .splice import can_splice

            if can_splice(self.reactor, self.a.transport) and can_splice(
                    self.reactor, self.b.transport):
                self.reactor.callLater(0, self._begin_splice)

    def _couple(self):
        """Register each transport as the other's streaming producer."""
        self.a.transport.registerProducer(self.b.transport, True)
        self.b.transport.registerProducer(self.a.transport, True)

    def _begin_splice(self):
        """Hand both sockets to a L{SpliceRelay} unless the pair already began ending."""
        if self._stopped or len(self._reading) != 2:
            return
        from .splice import SpliceRelay

        _unregister(self.a.transport)
        _unregister(self.b.transport)
        self._spliced = SpliceRelay(self.reactor, self.a.transport, self.b.transport,
                                    on_unsupported=self._splice_unsupported)
        self._spliced.start()

    def _splice_unsupported(self):
        """The kernel refused to splice these sockets: relay through Twisted after all."""
        # What the probe moved went out through the transports: Twisted's bytes.
        a_to_b, b_to_a = self._spliced.moved()
        self._from_a += a_to_b
        self._from_b += b_to_a
        self._spliced = None
        if self._stopped:
            return
        self._couple()
        for side in (self.a, self.b):
            side.transport.resumeProducing()

    @property
    def spliced(self):
        """The L{SpliceRelay} carrying this pair, or L{None} on the plain path."""
        return self._spliced

    def received(self, side, data):
        """Bytes arrived from C{side}: pass them to the other side."""
        if self._stopped:
            return
        # Counted per read, never per byte: one int add on the hot path.
        if side is self.a:
            self._from_a += len(data)
            self.b.send(data)
        else:
            self._from_b += len(data)
            self.a.send(data)

    def moved(self):
        """
        @return: bytes relayed so far, C{(a -> b, b -> a)}, by path: under
            C{"twisted"} what L{received} passed on, under C{"splice"}
            (once spliced) what the kernel moved.
        """
        counts = {"twisted": (self._from_a, self._from_b)}
        if self._spliced is not None:
            counts["splice"] = self._spliced.moved()
        return counts

    def read_closed(self, side):
        """
        C{side} sent end of file: unhook it as the other side's producer and
        half-close towards the other side, which may still answer.

        @return: whether both sides have now finished sending.
        """
        if self._stopped or side not in self._reading:
            return not self._reading
        self._reading.discard(side)
        other = self.other(side)
        _unregister(other.transport)
        other.finish_sending()
        return not self._reading

    def lost(self, side):
        """
        C{side}'s connection is gone: close the other side.

        @return: whether this ended the relay (C{False} when it had ended).
        """
        if self._stopped:
            return False
        self._stopped = True
        if self._spliced is not None:
            self._spliced.abort()
        _unregister(self.a.transport)
        _unregister(self.b.transport)
        self.other(side).close()
        if self.on_end is not None:
            try:
                self.on_end()
            except Exception:
                self.log.failure("relay end hook failed")
        return True


def _unregister(transport):
    """Unregister a transport's producer, if any; safe on closed transports."""
    if getattr(transport, "producer", True) is not None:
        try:
            transport.unregisterProducer()
        except Exception:
            Relay.log.failure("unregistering the producer of {transport}", transport=transport)
