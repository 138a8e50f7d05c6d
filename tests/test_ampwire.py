"""The lean AMP wire helpers: parser, serializer, corked and write-through output."""

import socket

from hypothesis import given
from hypothesis import strategies as st
import pytest
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc import lean_amp
from tvm_rpc.lean_amp import LeanAMP
from tvm_rpc.protocol import ampwire
from tvm_rpc.protocol.ampwire import BoxError, BoxParser

pytestmark = pytest.mark.unit


keys = st.binary(min_size=1, max_size=255)
small_values = st.binary(max_size=300)
boxes = st.dictionaries(keys, small_values, max_size=6)


def parse_all(parser):
    """@return: every complete box the parser has."""
    found = []
    while (box := parser.next_box()) is not None:
        found.append(box)
    return found


class BoxParserTests(SynchronousTestCase):
    """BoxParser reads exactly what AMP's parser reads, however the bytes are split."""

    @given(st.lists(boxes, max_size=5), st.lists(st.integers(0, 4000), max_size=8))
    def test_any_split(self, sent, cuts):
        """Boxes fed in arbitrary pieces come out as AMP parses them."""
        data = b"".join(amp.AmpBox(box).serialize() for box in sent)
        parser = BoxParser()
        got = []
        start = 0
        for cut in sorted(cuts) + [len(data)]:
            cut = min(cut, len(data))
            parser.feed(data[start:cut])
            start = max(start, cut)
            got += parse_all(parser)
        self.assertEqual(got, [dict(box) for box in amp.parseString(data)])

    def test_big_values_in_pieces(self):
        """Boxes of several 64 KiB values split at every kind of boundary."""
        box = {b"a": b"x" * 0xFFFF, b"b": b"y" * 0xFFFF, b"c": b""}
        data = amp.AmpBox(box).serialize() * 3
        for step in (1000, 65535, 65536, 65539, 70000):
            parser = BoxParser()
            got = []
            for start in range(0, len(data), step):
                parser.feed(data[start:start + step])
                got += parse_all(parser)
            self.assertEqual(got, [box] * 3)

    def test_empty_box(self):
        """The terminator alone is an empty box, as for AMP."""
        parser = BoxParser()
        parser.feed(b"\x00\x00\x00")
        self.assertEqual(parse_all(parser), [{}])
        parser.feed(b"\x00")
        self.assertEqual(parse_all(parser), [{}])

    def test_key_too_long(self):
        """A key length above 255 cannot be AMP."""
        parser = BoxParser()
        parser.feed(b"\x01\x00" + b"k" * 256)
        self.assertRaises(BoxError, parser.next_box)


class BuilderTests(SynchronousTestCase):
    """The hand-built boxes are byte for byte what AmpBox.serialize writes."""

    @given(boxes)
    def test_serialize(self, box):
        """serialize() of pairs matches AmpBox.serialize()."""
        self.assertEqual(ampwire.serialize(box.items()), amp.AmpBox(box).serialize())

    def test_serialize_limits(self):
        """Keys and values beyond AMP's limits are refused."""
        self.assertRaises(BoxError, ampwire.serialize, [(b"k" * 256, b"")])
        self.assertRaises(BoxError, ampwire.serialize, [(b"", b"")])
        self.assertRaises(BoxError, ampwire.serialize, [(b"k", b"v" * 0x10000)])


class CountingTransport(StringTransport):
    """A StringTransport that counts its writes."""

    writes = 0

    def write(self, data):
        """Count, then keep the bytes."""
        self.writes += 1
        super().write(data)


class Echo(amp.Command):
    """A command for the tests: answers its text."""

    arguments = [(b"text", amp.Unicode())]
    response = [(b"text", amp.Unicode())]


class EchoProtocol(LeanAMP):
    """A LeanAMP serving Echo."""

    @Echo.responder
    def echo(self, text):
        """@return: the text."""
        return {"text": text}


class PausingProtocol(EchoProtocol):
    """Pauses itself when asked to echo C{pause}."""

    @Echo.responder
    def echo(self, text):
        """@return: the text, after pausing for C{pause}."""
        if text == "pause":
            self.pauseProducing()
        return {"text": text}


def echo_boxes(count, start=1):
    """@return: the bytes of C{count} Echo requests."""
    return b"".join(
        amp.AmpBox(_ask=b"%d" % tag, _command=b"Echo", text=b"t%d" % tag).serialize()
        for tag in range(start, start + count)
    )


class LeanAMPTests(SynchronousTestCase):
    """The protocol: dispatch, corked writes, pausing, a key too long."""

    def setUp(self):
        self.protocol = EchoProtocol()
        self.transport = CountingTransport()
        self.protocol.makeConnection(self.transport)

    def answers(self):
        """@return: the answer boxes written so far."""
        return [dict(box) for box in amp.parseString(self.transport.value())]

    def test_answers_of_one_read_in_one_write(self):
        """Ten requests in one read: ten answers, one write."""
        self.protocol.dataReceived(echo_boxes(10))
        self.assertEqual(self.transport.writes, 1)
        self.assertEqual([box[b"text"] for box in self.answers()],
                         [b"t%d" % tag for tag in range(1, 11)])

    def test_split_requests(self):
        """Requests split over reads are answered when complete."""
        data = echo_boxes(3)
        for byte in range(len(data)):
            self.protocol.dataReceived(data[byte:byte + 1])
        self.assertEqual(len(self.answers()), 3)
        self.assertEqual(self.transport.writes, 3)

    def test_outside_a_read_writes_at_once(self):
        """A command sent outside a read is written at once; its answer fires the Deferred."""
        calling = self.protocol.callRemote(Echo, text="hi")
        self.assertEqual(self.transport.writes, 1)
        self.protocol.dataReceived(amp.AmpBox(_answer=b"1", text=b"back").serialize())
        self.assertEqual(self.successResultOf(calling), {"text": "back"})

    def test_cork_limit(self):
        """Corked answers are written out once they pass CORK_LIMIT."""
        text = b"x" * 60000
        data = b"".join(
            amp.AmpBox(_ask=b"%d" % tag, _command=b"Echo", text=text).serialize()
            for tag in range(4)
        )
        self.protocol.dataReceived(data)
        self.assertEqual(len(self.answers()), 4)
        self.assertEqual(self.transport.writes, 2)

    def test_pause_between_boxes(self):
        """A pause stops the loop after the current box; resuming goes on."""
        protocol = PausingProtocol()
        transport = CountingTransport()
        protocol.makeConnection(transport)
        first = amp.AmpBox(_ask=b"1", _command=b"Echo", text=b"pause").serialize()
        protocol.dataReceived(first + echo_boxes(2, start=2))
        self.assertEqual(len(amp.parseString(transport.value())), 1)
        protocol.resumeProducing()
        self.assertEqual([box[b"_answer"] for box in amp.parseString(transport.value())],
                         [b"1", b"2", b"3"])

    def test_key_too_long(self):
        """A key above 255 bytes closes the connection; outstanding calls fail with TooLong."""
        calling = self.protocol.callRemote(Echo, text="hi")
        self.protocol.dataReceived(b"\x01\x00" + b"k" * 256 + echo_boxes(1))
        self.assertTrue(self.transport.disconnecting)
        self.protocol.dataReceived(echo_boxes(1, start=2))
        self.assertEqual([box for box in self.answers() if b"_answer" in box], [])
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(calling, amp.TooLong)

    def test_nothing_written_after_loss(self):
        """emit() after the connection is gone (no transport) is a no-op, not an error."""
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.protocol.transport = None
        self.protocol.emit(b"late")


class PairConnection(tcp.Connection):
    """A Twisted TCP connection over one end of a socket pair."""

    def getPeer(self):
        """@return: a placeholder address."""
        return IPv4Address("TCP", "127.0.0.1", 2)

    def getHost(self):
        """@return: a placeholder address."""
        return IPv4Address("TCP", "127.0.0.1", 1)


class WriteThroughTests(SynchronousTestCase):
    """Writes go straight to an idle TCP socket, in order with anything queued."""

    def setUp(self):
        self.ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.reactor = MemoryReactor()
        self.protocol = EchoProtocol()
        self.transport = PairConnection(self.ours, self.protocol, self.reactor)
        self.transport.connected = True
        self.addCleanup(self.transport.connectionLost, Failure(ConnectionDone()))
        self.protocol.makeConnection(self.transport)

    def received(self):
        """@return: whatever the peer can read now."""
        self.peer.setblocking(False)
        chunks = []
        while True:
            try:
                chunk = self.peer.recv(1 << 20)
            except BlockingIOError:
                return b"".join(chunks)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)

    def test_idle_socket(self):
        """An idle transport gives its socket; a busy or closing one, or another kind, does not."""
        self.assertIs(lean_amp.idle_socket(self.transport), self.ours)
        self.assertIsNone(lean_amp.idle_socket(StringTransport()))
        self.assertIsNone(lean_amp.idle_socket(None))
        self.transport.write(b"queued")
        self.assertIsNone(lean_amp.idle_socket(self.transport))

    def test_sent_without_the_reactor(self):
        """A box written outside a read is on the wire before the reactor runs."""
        self.protocol.emit(b"box-bytes")
        self.assertEqual(self.received(), b"box-bytes")
        self.assertNotIn(self.transport, self.reactor.writers)

    def test_order_kept_behind_queued_bytes(self):
        """With bytes queued in the transport, later writes queue behind them."""
        self.transport.write(b"first ")
        self.protocol.emit(b"second")
        self.assertEqual(self.received(), b"")
        self.transport.doWrite()
        self.assertEqual(self.received(), b"first second")

    def test_partial_send_queues_the_rest(self):
        """What the socket does not take at once is queued in the transport, in order."""
        self.ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = bytes(range(256)) * (lean_amp.WRITE_THROUGH_LIMIT // 256)
        self.protocol.emit(big)
        self.assertGreater(self.transport._tempDataLen, 0)
        self.assertLess(self.transport._tempDataLen, len(big))
        self.protocol.emit(b"tail")
        got = b""
        while len(got) < len(big) + 4:
            got += self.received()
            self.transport.doWrite()
        self.assertEqual(got, big + b"tail")

    def test_bulk_goes_through_the_transport(self):
        """A write above WRITE_THROUGH_LIMIT is queued in the transport whole."""
        bulk = b"b" * (lean_amp.WRITE_THROUGH_LIMIT + 1)
        self.protocol.emit(bulk)
        self.assertEqual(self.transport._tempDataLen, len(bulk))
        got = b""
        while len(got) < len(bulk):
            self.transport.doWrite()
            got += self.received()
        self.assertEqual(got, bulk)
