"""
L{LeanAMP}: an L{AMP<twisted.protocols.amp.AMP>} that parses fast and writes once.

Its receive loop uses L{tvm_rpc.protocol.ampwire.BoxParser}, and its writes
are I{corked} while received data is handled: the answers to every box of
one read leave in one write. A write of up to L{WRITE_THROUGH_LIMIT} bytes
also goes straight to the socket when the TCP transport has nothing
buffered (see L{tvm_rpc.twisted_fence.idle_socket}), instead of waiting for
the reactor's next turn; anything that cannot be sent at once goes to the transport as usual,
so ordering, flow control and producers are unchanged. Both ends of a
session (L{tvm_rpc.client.session}, L{tvm_rpc.server.session}) speak it.
"""

from twisted.logger import Logger
from twisted.protocols import amp

from .protocol.ampwire import BoxError, BoxParser
from .twisted_fence import (
    amp_switching,
    idle_socket,
    mark_box_too_long,
    next_tag,
    reactor_reading,
)

log = Logger()

#: Corked bytes that are written out even while received data is still being
#: handled, so a read full of requests for big answers never piles them up.
CORK_LIMIT = 64 * 1024
#: Longest write sent straight to an idle socket. Bigger ones (bulk data)
#: gain nothing from it and go through the transport, which sends them in
#: slices without copying what the socket did not take.
WRITE_THROUGH_LIMIT = 64 * 1024


def write_now(transport, data):
    """
    Write C{data} straight to the socket of C{transport} when it is a plain
    TCP transport with nothing buffered and C{data} is at most
    L{WRITE_THROUGH_LIMIT} bytes; what the socket does not take (or all of
    it, otherwise) goes through the transport, so ordering is kept.
    """
    sock = idle_socket(transport) if len(data) <= WRITE_THROUGH_LIMIT else None
    if sock is not None:
        try:
            sent = sock.send(data)
        except OSError:
            # EAGAIN, or an error the transport reports on its own write.
            sent = 0
        if sent >= len(data):
            return
        data = data[sent:]
    transport.write(data)


class LeanAMP(amp.AMP):
    """
    L{amp.AMP} with a faster receive loop and corked, write-through output.

    Received bytes are parsed by a L{BoxParser}; each box goes to
    C{ampBoxReceived} (as a plain C{dict}; subclasses may serve some boxes
    themselves and hand the rest to L{LeanAMP.ampBoxReceived}, which gives
    AMP an L{amp.AmpBox}). While a read is being handled, everything this
    protocol sends (L{emit}, and AMP's own C{sendBox}) is collected and
    written once when the read is done, or when L{CORK_LIMIT} bytes have
    gathered; outside a read, a write goes out at once. The parser honours
    C{pauseProducing} between boxes, like AMP's.

    A key length above AMP's limit closes the connection, as AMP does
    (outstanding commands fail with L{amp.TooLong}); so does a box above
    the parser's C{max_box_size}, when one is set (see L{refuse_boxes}).
    """

    #: How many reads in a row may be taken straight from the socket, right
    #: after this protocol's own writes, while L{_awaiting_answers} says
    #: answers are due (0, the default: never); see L{read_eagerly}.
    eager_reads = 0

    #: C{next_tag()}: a new C{_ask} tag for a box this protocol builds itself
    #: (AMP's own counter, so the tags of C{callRemote} never collide).
    next_tag = next_tag

    #: The L{Failure} this protocol stopped receiving boxes with (the
    #: connection's end), which outstanding commands failed with; L{None}
    #: while boxes are received.
    stopped_reason = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._parser = BoxParser()
        self._corked = None
        self._corked_size = 0
        self._unparsable = False
        self._eager_left = self.eager_reads
        self._reading_eagerly = False

    def dataReceived(self, data):
        """Parse and handle every complete box; write the answers once."""
        if self.innerProtocol is not None:
            self.innerProtocol.dataReceived(data)
            return
        outermost = self._corked is None
        if outermost:
            # The reactor delivered these bytes: it had its turn.
            self._eager_left = self.eager_reads
        self._receive(data)
        if outermost:
            self.read_eagerly()

    def _receive(self, data):
        """Parse and handle the boxes of C{data}; write the answers once."""
        if self._unparsable:
            return
        parser = self._parser
        if data:
            parser.feed(data)
        outermost = self._corked is None
        if outermost:
            self._corked = []
            self._corked_size = 0
        try:
            while not self.paused:
                try:
                    box = parser.next_box()
                except BoxError as e:
                    self._unparsable = True
                    mark_box_too_long(self)
                    self.refuse_boxes(e)
                    return
                if box is None:
                    return
                self.ampBoxReceived(box)
        finally:
            if outermost:
                self._flush_cork()
                self._corked = None

    def refuse_boxes(self, error):
        """
        Bytes that this protocol will not parse arrived (not AMP, or a box
        above the parser's C{max_box_size}): log it and close the connection.
        Subclasses may tell the peer first.

        @param error: the L{BoxError}.
        """
        log.warn("closing {peer}: its bytes are not AMP boxes we accept ({why})",
                 peer=self._peer(), why=str(error))
        self.transport.loseConnection()

    def _awaiting_answers(self):
        """@return: whether answers to this protocol's requests are due (subclasses say)."""
        return False

    def read_eagerly(self):
        """
        Handle answers that are already waiting on the socket, without
        waiting for the reactor's next turn.

        When the peer answers faster than this process gets back to its
        reactor (client and server on one CPU: sending a request runs the
        server at once), the answer is already there when the write returns.
        This reads it at once, up to L{eager_reads} times before the reactor
        delivers data again, so timers and other connections still get their
        turn. It reads only a plain TCP socket with nothing queued for
        writing, that the reactor is reading too, and only outside the
        handling of received data; nothing waiting (C{EAGAIN}), an error or
        the end of the stream simply stop it: the reactor sees those itself.

        Call it only after a write whose answer's handler is already
        registered (AMP's own C{callRemote} registers after sending).
        """
        if self._reading_eagerly or self._corked is not None:
            return
        self._reading_eagerly = True
        try:
            while (self._eager_left > 0 and not self._unparsable and not self.paused
                   and self.innerProtocol is None and self._awaiting_answers()):
                transport = self.transport
                sock = idle_socket(transport)
                if sock is None or not reactor_reading(transport):
                    return
                try:
                    data = sock.recv(transport.bufferSize)
                except OSError:
                    return
                if not data:
                    return
                self._eager_left -= 1
                self._receive(data)
        finally:
            self._reading_eagerly = False

    def _peer(self):
        """@return: the peer's address as text, for log lines."""
        try:
            return str(self.transport.getPeer())
        except Exception:
            return "?"

    def stopReceivingBoxes(self, reason):
        """Remember why boxes stopped (see L{stopped_reason}); AMP fails its commands."""
        self.stopped_reason = reason
        super().stopReceivingBoxes(reason)

    def ampBoxReceived(self, box):
        """Hand a box to AMP's dispatch (answers, errors, commands)."""
        super().ampBoxReceived(amp.AmpBox(box))

    def sendBox(self, box):
        """Send an L{amp.AmpBox} through L{emit} (AMP's checks first)."""
        if amp_switching(self):
            return super().sendBox(box)
        if self.transport is None:
            raise amp.ConnectionLost()
        self.emit(box.serialize())

    def emit(self, data):
        """
        Write the bytes of whole boxes: corked while a read is handled,
        otherwise at once (straight to an idle socket when possible).
        Nothing is written once the connection is gone.
        """
        corked = self._corked
        if corked is not None:
            corked.append(data)
            self._corked_size += len(data)
            if self._corked_size >= CORK_LIMIT:
                self._flush_cork()
        else:
            self._write_now(data)

    def _flush_cork(self):
        """Write what is corked, if anything."""
        corked = self._corked
        if corked:
            self._corked = []
            self._corked_size = 0
            self._write_now(corked[0] if len(corked) == 1 else b"".join(corked))

    def _write_now(self, data):
        """Send C{data} on an idle socket, the rest (or all) through the transport."""
        if self.transport is not None:
            write_now(self.transport, data)
