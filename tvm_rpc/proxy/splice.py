"""A zero-copy relay path for two plain TCP sockets on Linux (``splice(2)``).

Once a pair relays between two plain TCP transports, each direction can move
its bytes socket -> pipe -> socket inside the kernel with ``os.splice``
instead of reading them into Python objects and writing them out again.

L{SpliceRelay} takes over from the transports' ordinary read path: it stops
reading from both transports, waits until whatever Twisted still buffers for
them (the handshake reply, bytes sent early or relayed so far) has been
written, then removes both transports from the reactor and registers one
L{_SpliceEnd} per socket with C{addReader}/C{addWriter} (the reactor keeps
one descriptor object per file descriptor, so the end of a socket serves the
direction that reads from it and the one that writes to it).

Per direction (L{_Direction}): while its pipe has room it reads from the
source; bytes moved into the pipe are spliced on to the destination at once;
when the destination would block, the direction waits until it is writable
and reads from the source only until the pipe is full. That is the
backpressure: a direction holds at most one pipe's capacity (L{PIPE_SIZE},
1 MiB, kernel memory rather than the proxy's heap), beside the sockets' own
buffers.

End of file from a source becomes C{shutdown(SHUT_WR)} on the destination
once the pipe is drained (half-close, as on the plain path). An error on a
socket ends the direction reading from it like an end of file (what is in
its pipe is still delivered to the other peer) and drops the direction
writing to it. When both directions are over, both transports are handed
back to Twisted and closed with C{loseConnection}, so the connections end
exactly as on the plain path (pool entries, tracker-mode cleanup, the
relay's C{on_end}).
"""

import errno
import fcntl
import os
import socket
import sys

import attrs
from twisted.internet import tcp
from twisted.internet.interfaces import IReactorFDSet, IReadWriteDescriptor, ISSLTransport
from twisted.logger import Logger
from zope.interface import implementer

from ..twisted_fence import write_buffer_empty

#: Capacity asked for each direction's pipe: the most a direction holds in the
#: proxy (kernel pipe buffers), beside the two sockets' own buffers.
PIPE_SIZE = 1024 * 1024

#: Seconds the hand-over may wait for Twisted's write buffers to drain. While
#: it waits neither peer is read, so a peer that reads only after it finished
#: writing could otherwise wait forever; past this the pair stays on the
#: Twisted relay.
FLUSH_TIMEOUT = 1.0

#: fcntl commands to get and set a pipe's capacity (Linux; not in every
#: Python's fcntl module).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

#: Errors that mean "try again later" on a non-blocking splice.
_WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)

log = Logger(namespace="tvm_rpc.proxy.splice")


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


def open_pipe(size=PIPE_SIZE):
    """
    @param size: the capacity to ask for (the kernel may round it up, or
        refuse above C{/proc/sys/fs/pipe-max-size} for unprivileged users).
    @return: C{(read_fd, write_fd, capacity)} of a new non-blocking pipe.
    """
    read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, size)
    except OSError:
        # A smaller pipe still relays correctly, in smaller steps.
        pass
    try:
        capacity = fcntl.fcntl(write_fd, F_GETPIPE_SZ)
    except OSError:
        capacity = 65536
    return read_fd, write_fd, capacity


@implementer(IReadWriteDescriptor)
@attrs.define(eq=False)
class _SpliceEnd:
    """
    One socket of a spliced pair, as the reactor sees it: reading from it
    feeds the outgoing direction, writing to it drains the incoming one.
    """

    relay: object
    fd: int
    name: str
    outgoing: object = None
    incoming: object = None
    reading: bool = False
    writing: bool = False

    def fileno(self):
        """@return: the socket's file descriptor (-1 once the relay ended)."""
        return self.fd

    def logPrefix(self):
        """@return: the prefix of the reactor's log lines about this socket."""
        return f"splice {self.name}"

    def doRead(self):
        """The socket is readable (or hung up): move bytes into the outgoing pipe."""
        self.outgoing.source_ready()

    def doWrite(self):
        """The socket is writable (or failed): drain the incoming pipe into it."""
        self.incoming.destination_ready()

    def connectionLost(self, reason):
        """The reactor dropped this descriptor (shutting down): end the relay."""
        self.relay.abort()

    def set_reading(self, flag):
        """Start or stop watching the socket for readability."""
        if flag != self.reading and self.fd >= 0:
            self.reading = flag
            if flag:
                self.relay.reactor.addReader(self)
            else:
                self.relay.reactor.removeReader(self)

    def set_writing(self, flag):
        """Start or stop watching the socket for writability."""
        if flag != self.writing and self.fd >= 0:
            self.writing = flag
            if flag:
                self.relay.reactor.addWriter(self)
            else:
                self.relay.reactor.removeWriter(self)


@attrs.define(eq=False)
class _Direction:
    """
    One direction of a spliced pair: C{source} socket -> pipe -> C{destination}.

    @ivar pending: bytes in the pipe, not yet spliced to the destination.
    @ivar source_ended: the source sent end of file or failed.
    @ivar done: nothing more will move in this direction.
    """

    relay: object
    source: _SpliceEnd
    destination: _SpliceEnd
    pipe_read: int
    pipe_write: int
    capacity: int
    pending: int = 0
    source_ended: bool = False
    half_close: bool = True
    done: bool = False
    moved: int = 0

    def source_ready(self):
        """Splice what the source has into the pipe, then on to the destination."""
        if self.done or self.source_ended or self.pending >= self.capacity:
            self.source.set_reading(False)
            return
        try:
            count = os.splice(self.source.fd, self.pipe_write, self.capacity - self.pending,
                              flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno in _WOULD_BLOCK:
                return
            self.relay.socket_failed(self.source, e)
            return
        if count == 0:
            self.relay.log.debug("end of file from {name}", name=self.source.name)
            self.source_ended = True
            self.source.set_reading(False)
        else:
            self.pending += count
        self.destination_ready()

    def destination_ready(self):
        """Splice the pipe into the destination until it would block or is empty."""
        if self.done:
            self.destination.set_writing(False)
            return
        while self.pending:
            try:
                count = os.splice(self.pipe_read, self.destination.fd, self.pending,
                                  flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno in _WOULD_BLOCK:
                    break
                self.relay.socket_failed(self.destination, e)
                return
            if count == 0:
                break
            self.pending -= count
            self.moved += count
        if self.pending:
            # The destination is full: wait until it is writable, and read the
            # source only while the pipe has room (backpressure).
            self.source.set_reading(self.pending < self.capacity and not self.source_ended)
            self.destination.set_writing(True)
            return
        self.destination.set_writing(False)
        if self.source_ended:
            self.finish()
        else:
            self.source.set_reading(True)

    def finish(self):
        """The source ended and the pipe is drained: half-close the destination."""
        if self.done:
            return
        self.done = True
        self.source.set_reading(False)
        self.destination.set_writing(False)
        if self.half_close and self.relay.alive(self.destination):
            _shutdown_write(self.destination.fd)
        self.relay.direction_done()

    def drop(self):
        """The destination failed: nothing more can be delivered this way."""
        if self.done:
            return
        self.done = True
        self.source.set_reading(False)
        self.destination.set_writing(False)
        self.relay.direction_done()


def _shutdown_write(fd):
    """C{shutdown(fd, SHUT_WR)}, ignoring a socket that is already gone."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()


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
        end_a = _SpliceEnd(self, self.a.fileno(), _name(self.a))
        end_b = _SpliceEnd(self, self.b.fileno(), _name(self.b))
        self._ends = [end_a, end_b]
        try:
            for source, destination in ((end_a, end_b), (end_b, end_a)):
                read_fd, write_fd, capacity = open_pipe(self.pipe_size)
                direction = _Direction(self, source, destination, read_fd, write_fd, capacity)
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
                if e.errno in _WOULD_BLOCK:
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
        """@return: bytes spliced so far per direction, C{(a -> b, b -> a)}."""
        return tuple(direction.moved for direction in self._directions)


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
