"""The kernel side of a spliced relay: pipes, socket ends, one direction's loop.

L{tvm_rpc.proxy.splice.SpliceRelay} hands a pair of plain TCP sockets to the
kernel; what moves the bytes is here. Each socket is one L{SpliceEnd}, the
descriptor the reactor watches (the reactor keeps one descriptor object per
file descriptor, so the end of a socket serves the direction that reads from
it and the one that writes to it). Each direction is one L{SpliceDirection}:
source socket -> pipe -> destination socket with C{os.splice}, never through
Python objects.

While its pipe has room a direction reads from the source; bytes moved into
the pipe are spliced on to the destination at once; when the destination
would block, the direction waits until it is writable and reads from the
source only until the pipe is full. That is the backpressure: a direction
holds at most one pipe's capacity (L{PIPE_SIZE}, 1 MiB, kernel memory rather
than the proxy's heap), beside the sockets' own buffers. End of file from a
source becomes C{shutdown(SHUT_WR)} on the destination once the pipe is
drained (half-close, as on the plain path).

Both talk to their relay (L{SpliceRelay<tvm_rpc.proxy.splice.SpliceRelay>})
through its C{reactor}, C{log}, C{alive}, C{socket_failed},
C{direction_done} and C{abort}.
"""

import errno
import fcntl
import os
import socket

import attrs
from twisted.internet.interfaces import IReadWriteDescriptor
from zope.interface import implementer

#: Capacity asked for each direction's pipe: the most a direction holds in the
#: proxy (kernel pipe buffers), beside the two sockets' own buffers.
PIPE_SIZE = 1024 * 1024

#: fcntl commands to get and set a pipe's capacity (Linux; not in every
#: Python's fcntl module).
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)

#: Errors that mean "try again later" on a non-blocking splice.
WOULD_BLOCK = (errno.EAGAIN, errno.EWOULDBLOCK)


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
class SpliceEnd:
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
            reactor = self.relay.reactor
            (reactor.addReader if flag else reactor.removeReader)(self)

    def set_writing(self, flag):
        """Start or stop watching the socket for writability."""
        if flag != self.writing and self.fd >= 0:
            self.writing = flag
            reactor = self.relay.reactor
            (reactor.addWriter if flag else reactor.removeWriter)(self)


@attrs.define(eq=False)
class SpliceDirection:
    """
    One direction of a spliced pair: C{source} socket -> pipe -> C{destination}.

    @ivar pending: bytes in the pipe, not yet spliced to the destination.
    @ivar source_ended: the source sent end of file or failed.
    @ivar done: nothing more will move in this direction.
    """

    relay: object
    source: SpliceEnd
    destination: SpliceEnd
    pipe_read: int
    pipe_write: int
    capacity: int
    pending: int = 0
    source_ended: bool = False
    half_close: bool = True
    done: bool = False
    moved: int = 0

    def _splice(self, from_fd, to_fd, length, end):
        """
        One non-blocking C{os.splice} of up to C{length} bytes.

        @param end: the socket end a failure of this call is blamed on.
        @return: the bytes moved (0 at end of file), L{None} when the call
            would block, or -1 when C{end} failed (the relay is told).
        """
        try:
            return os.splice(from_fd, to_fd, length,
                             flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in WOULD_BLOCK:
                return None
            self.relay.socket_failed(end, e)
            return -1

    def source_ready(self):
        """Splice what the source has into the pipe, then on to the destination."""
        if self.done or self.source_ended or self.pending >= self.capacity:
            self.source.set_reading(False)
            return
        count = self._splice(self.source.fd, self.pipe_write, self.capacity - self.pending,
                             self.source)
        if count is None or count < 0:
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
            count = self._splice(self.pipe_read, self.destination.fd, self.pending,
                                 self.destination)
            if count is None or count == 0:
                break
            if count < 0:
                return
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
        self.half_close = False
        self.finish()


def _shutdown_write(fd):
    """C{shutdown(fd, SHUT_WR)}, ignoring a socket that is already gone."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.detach()
