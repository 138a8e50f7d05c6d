"""A zero-copy relay path for two plain TCP sockets on Linux (C{splice(2)}).

Once a pair relays between two plain TCP transports, each direction can move
its bytes socket -> pipe -> socket inside the kernel with C{os.splice}
instead of reading them into Python objects and writing them out again.

This module decides and performs the hand-over. L{can_splice} tells whether a
transport qualifies. L{SpliceRelay} takes over from the transports' ordinary
read path: it stops reading from both transports, waits until whatever
Twisted still buffers for them (the handshake reply, bytes sent early or
relayed so far) has been written, then removes both transports from the
reactor and registers one L{SpliceEnd} per socket with
C{addReader}/C{addWriter}; the bytes then move in two L{SpliceDirection}s
(L{tvm_rpc.proxy.splice_directions}: pipes, backpressure, half-close).

An error on a socket ends the direction reading from it like an end of file
(what is in its pipe is still delivered to the other peer) and drops the
direction writing to it. When both directions are over, both transports are
handed back to Twisted and closed with C{loseConnection}, so the connections
end exactly as on the plain path (pool entries, tracker-mode cleanup, the
relay's C{on_end}). Where the kernel refuses the first splice, or Twisted's
buffers do not drain in time, the pair goes back to the plain path instead.
"""

import errno
import os
import socket
import sys

import attrs
from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, ISSLTransport
from twisted.logger import Logger

from ..twisted_fence import write_buffer_empty
from .splice_directions import PIPE_SIZE, WOULD_BLOCK, SpliceDirection, SpliceEnd, open_pipe

#: Seconds the hand-over may wait for Twisted's write buffers to drain. While
#: it waits neither peer is read, so a peer that reads only after it finished
#: writing could otherwise wait forever; past this the pair stays on the
#: Twisted relay.
FLUSH_TIMEOUT = 1.0

def splice_available():
    """@return: whether this platform has C{os.splice} (Linux, Python >= 3.10)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


def can_splice(reactor, transport):
    """
    @param reactor: the reactor the relay runs on.
    @param transport: one side's transport.
    @return: whether C{transport} is a plain TCP connection (no TLS, no
        websocket shim) on a reactor whose descriptors can be swapped, on a
        platform with C{os.splice}, under a Twisted whose write buffers the
        hand-over can see (L{tvm_rpc.twisted_fence.write_buffer_empty}).
    """
    if write_buffer_empty is None:
        return False
    if not splice_available() or not IReactorFDSet.providedBy(reactor):
        return False
    if not isinstance(transport, tcp.Connection) or ISSLTransport.providedBy(transport):
        return False
    if getattr(transport, "TLS", False) or getattr(transport, "disconnecting", True):
        return False
    sock = transport.getHandle()
    return (isinstance(sock, socket.socket) and sock.type == socket.SOCK_STREAM
            and sock.family in (socket.AF_INET, socket.AF_INET6))


@attrs.define(eq=False)
class SpliceRelay:
    """
    Relays two plain TCP transports with C{splice(2)}, driven by C{reactor}.

    @ivar reactor: an L{IReactorFDSet}.
    @ivar a: one side's transport (a L{tcp.Connection}).
    @ivar b: the other side's transport.
    @ivar on_started: called once the kernel relays (no arguments), or L{None}.
    @ivar on_unsupported: called when the kernel relay cannot take the pair:
        the first splice is refused (C{EINVAL}) before any byte moved that
        way, or Twisted's write buffers did not drain within
        C{flush_timeout} seconds. The caller then relays on the plain path
        with the transports reading again. L{None} to close both instead.
    @ivar state: C{"new"}, C{"flushing"}, C{"splicing"}, C{"ended"}.
    """

    reactor: object
    a: object
    b: object
    on_started: object = None
    on_unsupported: object = None
    pipe_size: int = PIPE_SIZE
    flush_timeout: float = FLUSH_TIMEOUT
    state: str = "new"
    _flush_timer: object = attrs.field(init=False, default=None)
    _ends: list = attrs.field(init=False, factory=list)
    _directions: list = attrs.field(init=False, factory=list)
    _failed: set = attrs.field(init=False, factory=set)

    log = Logger()

    def start(self):
        """Stop reading both transports and splice once their buffers are written."""
        self.state = "flushing"
        for transport in (self.a, self.b):
            transport.stopReading()
        self._flush_timer = self.reactor.callLater(self.flush_timeout, self._flush_timed_out)
        self._check_flushed()

    def _flush_timed_out(self):
        """The buffers did not drain in time: stay on the Twisted relay."""
        self._flush_timer = None
        if self.state != "flushing":
            return
        self.log.info("{a} <-> {b}: buffers not drained in {timeout} s, relaying through "
                      "Twisted", a=_name(self.a), b=_name(self.b), timeout=self.flush_timeout)
        for transport in (self.a, self.b):
            if isinstance(transport.producer, _FlushWaiter):
                transport.unregisterProducer()
        self.state = "ended"
        if self.on_unsupported is not None:
            self.on_unsupported()
        else:
            self.a.loseConnection()
            self.b.loseConnection()

    def _cancel_flush_timer(self):
        """Cancel the hand-over's timeout, if pending."""
        if self._flush_timer is not None and self._flush_timer.active():
            self._flush_timer.cancel()
        self._flush_timer = None

    def _check_flushed(self):
        """Switch to splicing when both transports have written everything."""
        if self.state != "flushing":
            return
        for transport in (self.a, self.b):
            transport.stopReading()
            if transport.disconnecting or transport.disconnected:
                # Leave the ending to Twisted's path (connectionLost ends the relay).
                self.state = "ended"
                self._cancel_flush_timer()
                return
        waiting = [t for t in (self.a, self.b) if not write_buffer_empty(t)]
        if waiting:
            transport = waiting[0]
            if transport.producer is None:
                transport.registerProducer(_FlushWaiter(self, transport), False)
            return
        self._switch()

    def _switch(self):
        """Take both sockets out of Twisted's read/write path and splice."""
        self._cancel_flush_timer()
        for transport in (self.a, self.b):
            transport.stopReading()
            transport.stopWriting()
        end_a = SpliceEnd(self, self.a.fileno(), _name(self.a))
        end_b = SpliceEnd(self, self.b.fileno(), _name(self.b))
        self._ends = [end_a, end_b]
        try:
            for source, destination in ((end_a, end_b), (end_b, end_a)):
                read_fd, write_fd, capacity = open_pipe(self.pipe_size)
                direction = SpliceDirection(self, source, destination, read_fd, write_fd, capacity)
                source.outgoing = direction
                destination.incoming = direction
                self._directions.append(direction)
        except OSError as e:
            self.log.warn("no pipe for splicing ({error}): relaying through Twisted", error=e)
            self._give_back(unsupported=True)
            return
        # Probe: the first splice of each direction says whether the kernel
        # splices these sockets at all, before anything is registered.
        for direction in self._directions:
            try:
                count = os.splice(direction.source.fd, direction.pipe_write, direction.capacity,
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except OSError as e:
                if e.errno in WOULD_BLOCK:
                    continue
                if e.errno == errno.EINVAL:
                    self.log.info("splice refused here: relaying through Twisted")
                    self._give_back(unsupported=True)
                    return
                self.state = "splicing"
                self.socket_failed(direction.source, e)
                return
            if count == 0:
                direction.source_ended = True
            direction.pending += count
        self.state = "splicing"
        self.log.info("splicing {a} <-> {b} (pipes of {capacity} bytes)",
                       a=end_a.name, b=end_b.name, capacity=self._directions[0].capacity)
        if self.on_started is not None:
            self.on_started()
        for direction in list(self._directions):
            if self.state == "splicing":
                direction.destination_ready()

    def _give_back(self, unsupported):
        """
        Hand the sockets back to Twisted, delivering what the probe already
        moved into a pipe through the transports.
        """
        self.state = "ended"
        for direction in self._directions:
            data = b""
            while direction.pending:
                try:
                    chunk = os.read(direction.pipe_read, direction.pending)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
                direction.pending -= len(chunk)
            direction.moved += len(data)
            if data:
                transport = self.b if direction.destination is self._ends[1] else self.a
                transport.write(data)
        self._close_pipes()
        self._ends = []
        if unsupported and self.on_unsupported is not None:
            self.on_unsupported()
        else:
            self.a.loseConnection()
            self.b.loseConnection()

    def alive(self, end):
        """@return: whether C{end}'s socket has not failed."""
        return end not in self._failed

    def socket_failed(self, end, error):
        """
        C{end}'s socket failed (reset, broken pipe): what reads from it ends
        as on end of file, what writes to it is dropped.
        """
        if self.state != "splicing":
            return
        self.log.info("relay socket {name} failed: {error}", name=end.name, error=error)
        self._failed.add(end)
        end.set_reading(False)
        end.set_writing(False)
        for direction in list(self._directions):
            if direction.destination is end:
                direction.drop()
            elif direction.source is end and not direction.done:
                direction.source_ended = True
                direction.half_close = False
                if self.state == "splicing":
                    direction.destination_ready()

    def direction_done(self):
        """One direction finished: end the relay once both have."""
        if all(direction.done for direction in self._directions):
            self._end()

    def abort(self):
        """End now (the reactor is shutting down or a descriptor was dropped)."""
        if self.state == "splicing":
            self._end()
        elif self.state in ("new", "flushing"):
            self.state = "ended"
            self._cancel_flush_timer()

    def _end(self):
        """Unregister the ends, close the pipes and let Twisted close both connections."""
        if self.state == "ended":
            return
        self.state = "ended"
        for end in self._ends:
            end.set_reading(False)
            end.set_writing(False)
            end.fd = -1
        self._close_pipes()
        for transport in (self.a, self.b):
            transport.loseConnection()

    def _close_pipes(self):
        """Close every pipe descriptor this relay opened."""
        for direction in self._directions:
            fds, direction.pipe_read, direction.pipe_write = (
                (direction.pipe_read, direction.pipe_write), -1, -1)
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def moved(self):
        """
        @return: bytes moved so far per direction, C{(a -> b, b -> a)}
            (C{(0, 0)} before the switch).
        """
        # Fewer than two directions when the switch failed to open a pipe.
        counts = [direction.moved for direction in self._directions] + [0, 0]
        return counts[0], counts[1]

    @property
    def failed(self):
        """Whether a socket of the pair failed (reset, broken pipe) while splicing."""
        return bool(self._failed)


@attrs.define(eq=False)
class _FlushWaiter:
    """A pull producer on a transport whose buffer is draining: told when it is empty."""

    relay: SpliceRelay
    transport: object

    def resumeProducing(self):
        """The transport wrote its buffer (or this was just registered): check again."""
        if write_buffer_empty(self.transport) or self.transport.disconnecting:
            self.transport.unregisterProducer()
            self.relay._check_flushed()

    def stopProducing(self):
        """The connection went away while flushing."""
        self.relay.abort()


def _name(transport):
    """@return: the transport's peer as text, for logs."""
    try:
        peer = transport.getPeer()
        return f"{peer.host}:{peer.port}"
    except Exception:
        return repr(transport)
