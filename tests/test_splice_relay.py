"""The splice relay path (L{tvm_rpc.proxy.splice}) over real loopback sockets.

Each test runs the proxy's factory on a private epoll reactor (never the
global one) listening on 127.0.0.1 port 0, and drives plain non-blocking
sockets as the client and the server from the same loop, so the tests are
single-threaded and bounded. Checked: byte-exact relaying both ways for
hypothesis-chosen sizes and chunkings, half-close, a slow reader (the
sender is held back and the proxy holds nothing in user space), peer death
closing both sides and cleaning up, and the fall-backs to the plain relay.
"""

import errno
import os
import random
import socket
import struct
import time

import pytest
from hypothesis import given, settings, strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol.constants import RPC_CODE_SUCCESS
from tvm_rpc.protocol.handshake import encode_handshake, encode_reply
from tvm_rpc.proxy import splice as splice_module
from tvm_rpc.proxy import splice_directions
from tvm_rpc.proxy.pairing import PairingPool
from tvm_rpc.proxy.protocol import ProxyFactory
from tvm_rpc.proxy.tap import Options, makeService

pytestmark = [
    pytest.mark.system,
    pytest.mark.skipif(not splice_module.splice_available(), reason="splice(2) is Linux-only"),
]

MiB = 1024 * 1024
#: Seconds any single wait in these tests may take before it fails.
WAIT = 30.0


class Peer:
    """
    A non-blocking client or server socket driven by the test loop.

    @ivar outgoing: chunks still to send, each with one C{send} call.
    @ivar received: bytes read so far.
    @ivar eof: the proxy half-closed (or closed) towards this peer.
    @ivar failed: the connection was reset.
    """

    def __init__(self, port, key, early=b""):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setblocking(False)
        self.key = key
        self.outgoing = [encode_handshake(key) + early]
        self.sent = 0
        self.received = bytearray()
        self.eof = False
        self.failed = False
        self.shutdown_after = False
        self.reading = True

    def queue(self, data, chunking=()):
        """Queue C{data} cut at the sizes in C{chunking} (the rest in one piece)."""
        view = memoryview(data)
        for size in chunking:
            if not view:
                break
            self.outgoing.append(bytes(view[:size]))
            view = view[size:]
        if view:
            self.outgoing.append(bytes(view))

    def step(self):
        """Send what the socket takes and read what is there."""
        while self.outgoing and not self.failed:
            chunk = self.outgoing[0]
            try:
                sent = self.sock.send(chunk)
            except BlockingIOError:
                break
            except OSError:
                self.failed = True
                break
            self.sent += sent
            if sent == len(chunk):
                self.outgoing.pop(0)
            else:
                self.outgoing[0] = chunk[sent:]
                break
        if not self.outgoing and self.shutdown_after and not self.failed:
            self.shutdown_after = False
            self.sock.shutdown(socket.SHUT_WR)
        while self.reading and not self.eof:
            try:
                data = self.sock.recv(MiB)
            except BlockingIOError:
                break
            except OSError:
                self.failed = self.eof = True
                break
            if not data:
                self.eof = True
            self.received += data

    def close(self):
        """Close the socket."""
        self.sock.close()

    def reset(self):
        """Close with a reset (SO_LINGER 0), as a crashed peer's kernel would."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Proxy:
    """The proxy factory on a private epoll reactor, with the peers it serves."""

    def __init__(self, splice=True, chunk_size=256 * 1024):
        from twisted.internet.epollreactor import EPollReactor

        self.reactor = EPollReactor()
        self.pool = PairingPool(self.reactor, timeout_client=WAIT, timeout_server=WAIT)
        self.ended = []
        self.protocols = []
        self.factory = ProxyFactory(self.pool, self.reactor, chunk_size=chunk_size,
                                    on_relay_end=lambda: self.ended.append(True),
                                    splice=splice)
        build = self.factory.buildProtocol

        def build_and_keep(addr):
            protocol = build(addr)
            self.protocols.append(protocol)
            return protocol

        self.factory.buildProtocol = build_and_keep
        self.port = self.reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.peers = []

    def peer(self, key, early=b""):
        """Connect a peer presenting C{key}."""
        peer = Peer(self.port.getHost().port, key, early)
        self.peers.append(peer)
        return peer

    def pump(self, done, what):
        """Run the reactor and the peers until C{done()} holds; fail after L{WAIT} s."""
        deadline = time.monotonic() + WAIT
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.reactor.iterate(0.001)
            for peer in self.peers:
                peer.step()

    def pair(self, key="k", early_server=b"", early_client=b""):
        """@return: C{(server, client)} peers paired under C{key}, replies consumed."""
        server = self.peer("server:" + key, early_server)
        self.pump(lambda: len(self.protocols) >= 1 and self.protocols[-1].state == "waiting",
                  "the server to wait")
        client = self.peer("client:" + key, early_client)
        replies = {server: encode_reply(RPC_CODE_SUCCESS, "client:" + key),
                   client: encode_reply(RPC_CODE_SUCCESS, "server:" + key)}
        self.pump(lambda: all(len(p.received) >= len(r) for p, r in replies.items()),
                  "both pairing replies")
        for peer, reply in replies.items():
            assert bytes(peer.received[:len(reply)]) == reply
            del peer.received[:len(reply)]
        return server, client

    def relay(self):
        """@return: the relay of the latest pair."""
        return self.protocols[-1]._relay

    def wait_spliced(self):
        """Run until the latest pair is handed to the kernel; @return: its L{SpliceRelay}."""
        self.pump(lambda: self.relay().spliced is not None
                  and self.relay().spliced.state == "splicing", "the splice hand-over")
        return self.relay().spliced

    def close(self):
        """Close the peers, stop listening and release the private reactor."""
        for peer in self.peers:
            peer.close()
        self.port.stopListening()
        for _ in range(20):
            self.reactor.iterate(0)
        for selectable in self.reactor.removeAll():
            selectable.connectionLost(None)
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()


def open_fds():
    """@return: the number of this process's open file descriptors."""
    return len(os.listdir("/proc/self/fd"))


chunkings = st.lists(st.integers(min_value=1, max_value=300_000), max_size=6)


class SpliceRelayTests(SynchronousTestCase):
    """The splice path end to end, on real loopback sockets."""

    @settings(max_examples=12, deadline=None)
    @given(up_size=st.integers(0, 3 * MiB), down_size=st.integers(0, 3 * MiB),
           up_chunks=chunkings, down_chunks=chunkings,
           early=st.binary(max_size=2000), seed=st.integers(0, 2**32 - 1))
    def test_byte_exact_both_ways(self, up_size, down_size, up_chunks, down_chunks, early,
                                  seed):
        """
        Whatever the sizes and chunking, each side receives exactly what the
        other sent (early bytes first), then end of file; the pair ends once.
        """
        rng = random.Random(seed)
        up, down = rng.randbytes(up_size), rng.randbytes(down_size)
        proxy = Proxy()
        try:
            server, client = proxy.pair(early_client=early)
            spliced = proxy.wait_spliced()
            client.queue(up, up_chunks)
            server.queue(down, down_chunks)
            client.shutdown_after = server.shutdown_after = True
            proxy.pump(lambda: server.eof and client.eof, "both ends of file")
            self.assertEqual(bytes(server.received), early + up)
            self.assertEqual(bytes(client.received), down)
            self.assertEqual(spliced.moved(), (up_size, down_size)
                             if spliced.a is proxy.protocols[1].transport
                             else (down_size, up_size))
            proxy.pump(lambda: proxy.ended, "the relay's end")
            self.assertEqual(proxy.ended, [True])
            self.assertEqual([p.state for p in proxy.protocols], ["closed", "closed"])
        finally:
            proxy.close()

    def test_half_close_lets_the_other_side_answer(self):
        """
        A client that sends its request and shuts down writing still gets
        the server's answer; the server sees end of file first.
        """
        proxy = Proxy()
        try:
            server, client = proxy.pair()
            proxy.wait_spliced()
            request = os.urandom(700_000)
            client.queue(request)
            client.shutdown_after = True
            proxy.pump(lambda: server.eof, "end of file at the server")
            self.assertEqual(bytes(server.received), request)
            self.assertFalse(client.eof)
            self.assertEqual(proxy.ended, [])
            answer = os.urandom(900_000)
            server.queue(answer)
            server.shutdown_after = True
            proxy.pump(lambda: client.eof, "end of file at the client")
            self.assertEqual(bytes(client.received), answer)
            proxy.pump(lambda: proxy.ended, "the relay's end")
            self.assertEqual(proxy.pool.waiting(), 0)
        finally:
            proxy.close()

    def test_slow_reader_holds_the_sender_back(self):
        """
        While the reader does not read, the sender is blocked after a bounded
        amount (socket buffers plus one pipe), the proxy holds nothing in
        user space, and everything arrives once the reader reads.
        """
        proxy = Proxy()
        try:
            server, client = proxy.pair()
            for peer in (server, client):
                peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
            spliced = proxy.wait_spliced()
            server.reading = False
            total = 128 * MiB
            block = os.urandom(MiB)
            for _ in range(total // MiB):
                client.outgoing.append(block)
            stalled = [0, -1]

            def sender_stalled():
                if client.sent == stalled[1]:
                    stalled[0] += 1
                else:
                    stalled[:] = [0, client.sent]
                return stalled[0] >= 200

            proxy.pump(sender_stalled, "the sender to be held back")
            in_flight = client.sent - len(server.received)
            self.assertLess(in_flight, 48 * MiB)
            self.assertLess(client.sent, total)
            for direction in spliced._directions:
                self.assertLessEqual(direction.pending, direction.capacity)
                self.assertLessEqual(direction.capacity, splice_directions.PIPE_SIZE)
            for protocol in proxy.protocols:
                self.assertTrue(splice_module.write_buffer_empty(protocol.transport))
            server.reading = True
            received = 0
            expected = total
            while received < expected:
                proxy.pump(lambda: len(server.received) >= MiB or
                           (received + len(server.received) >= expected), "more bytes")
                whole = len(server.received) // MiB * MiB or len(server.received)
                chunk = bytes(server.received[:whole])
                del server.received[:whole]
                self.assertEqual(chunk, block * (len(chunk) // MiB))
                received += len(chunk)
            self.assertEqual(received, total)
        finally:
            proxy.close()

    def test_peer_death_closes_both_sides_and_cleans_up(self):
        """
        A peer reset in the middle of a stream: the other peer is closed,
        the relay ends once, no pool entry stays and the pipes are closed.
        """
        proxy = Proxy()
        try:
            before = open_fds()
            server, client = proxy.pair()
            proxy.wait_spliced()
            client.queue(os.urandom(2 * MiB))
            server.reading = False
            proxy.pump(lambda: client.sent > MiB, "some bytes on the way")
            client.reset()
            proxy.peers.remove(client)
            server.reading = True
            proxy.pump(lambda: server.eof, "the server's connection to close")
            proxy.pump(lambda: proxy.ended, "the relay's end")
            self.assertEqual(proxy.ended, [True])
            self.assertEqual([p.state for p in proxy.protocols], ["closed", "closed"])
            self.assertEqual(proxy.pool.waiting(), 0)
            server.close()
            proxy.peers.remove(server)
            for _ in range(20):
                proxy.reactor.iterate(0)
            # Both proxy-side sockets, the two pipes per pair, and the peers are gone.
            self.assertLessEqual(open_fds(), before)
            # The same key pairs again: nothing of the old pair is left in the pool.
            server, client = proxy.pair()
            proxy.wait_spliced()
            client.queue(b"again")
            proxy.pump(lambda: len(server.received) == 5, "the new pair to relay")
        finally:
            proxy.close()

    def test_refused_splice_falls_back_to_the_plain_relay(self):
        """
        When the kernel refuses the first splice (EINVAL), the pair is relayed
        through Twisted after all, byte-exact both ways, and ends normally.
        """
        def refuse(*args, **kwargs):
            raise OSError(errno.EINVAL, "splice refused")

        self.patch(splice_module.os, "splice", refuse)
        proxy = Proxy()
        try:
            server, client = proxy.pair(early_client=b"early")
            self.assertIsNone(proxy.relay().spliced)
            proxy.pump(lambda: proxy.relay()._spliced is None and
                       not _stopped_reading(proxy), "the fall-back")
            up, down = os.urandom(3 * MiB), os.urandom(MiB)
            client.queue(up)
            server.queue(down)
            client.shutdown_after = server.shutdown_after = True
            proxy.pump(lambda: server.eof and client.eof, "both ends of file")
            self.assertEqual(bytes(server.received), b"early" + up)
            self.assertEqual(bytes(client.received), down)
            proxy.pump(lambda: proxy.ended, "the relay's end")
        finally:
            proxy.close()

    def test_no_splice_relays_through_twisted(self):
        """With C{splice=False} the pair never leaves Twisted's read path."""
        assert_relays_through_twisted(self, Proxy(splice=False))


def assert_relays_through_twisted(test, proxy):
    """A pair on C{proxy} is relayed byte-exact without being spliced; C{proxy} is closed."""
    try:
        server, client = proxy.pair()
        data = os.urandom(MiB)
        client.queue(data)
        client.shutdown_after = True
        proxy.pump(lambda: server.eof, "end of file at the server")
        test.assertEqual(bytes(server.received), data)
        test.assertIsNone(proxy.relay().spliced)
    finally:
        proxy.close()


def _stopped_reading(proxy):
    """@return: whether some proxy-side transport is not in the reactor's readers."""
    readers = proxy.reactor.getReaders()
    return any(p.transport not in readers for p in proxy.protocols)


class EligibilityTests(SynchronousTestCase):
    """Which transports and reactors the splice path takes."""

    def test_only_plain_tcp_on_a_descriptor_reactor(self):
        """In-memory transports and a bare clock never splice."""
        self.assertFalse(splice_module.can_splice(Clock(), StringTransport()))
        from twisted.internet.epollreactor import EPollReactor

        reactor = EPollReactor()
        try:
            self.assertFalse(splice_module.can_splice(reactor, StringTransport()))
        finally:
            reactor.waker.connectionLost(None)
            reactor._poller.close()

    def test_open_pipe_capacity(self):
        """Pipes get the asked capacity where the system allows it, and are closed after."""
        read_fd, write_fd, capacity = splice_directions.open_pipe(splice_directions.PIPE_SIZE)
        try:
            self.assertGreaterEqual(capacity, 4096)
            self.assertLessEqual(capacity, max(splice_directions.PIPE_SIZE, 65536))
        finally:
            os.close(read_fd)
            os.close(write_fd)


class FakeTCP:
    """
    Just enough of a Twisted TCP transport for the hand-over's bookkeeping:
    a write buffer, reading on or off, a producer slot.
    """

    def __init__(self, pending=b""):
        self.dataBuffer = pending
        self.offset = 0
        self._tempDataLen = 0
        self.producer = None
        self.reading = True
        self.disconnecting = self.disconnected = False

    def stopReading(self):
        self.reading = False

    def registerProducer(self, producer, streaming):
        assert self.producer is None
        self.producer = producer
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self):
        self.producer = None

    def getPeer(self):
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 1)

    def loseConnection(self):
        self.disconnecting = True


class HandOverTests(SynchronousTestCase):
    """The wait for Twisted's buffers before the kernel takes over."""

    def test_buffers_that_do_not_drain_leave_the_pair_on_the_twisted_relay(self):
        """
        A peer that does not read keeps its buffer full: after the flush
        timeout the hand-over gives up, unhooks its waiter and falls back.
        """
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        stuck, idle = FakeTCP(pending=b"reply"), FakeTCP()
        fallbacks = []
        relay = splice_module.SpliceRelay(reactor, stuck, idle,
                                          on_unsupported=lambda: fallbacks.append(True))
        relay.start()
        self.assertEqual(relay.state, "flushing")
        self.assertFalse(stuck.reading or idle.reading)
        self.assertIsInstance(stuck.producer, splice_module._FlushWaiter)
        reactor.advance(splice_module.FLUSH_TIMEOUT / 2)
        self.assertEqual(fallbacks, [])
        reactor.advance(splice_module.FLUSH_TIMEOUT)
        self.assertEqual(fallbacks, [True])
        self.assertIsNone(stuck.producer)
        self.assertEqual(relay.state, "ended")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_ending_while_flushing_cancels_the_timeout(self):
        """A pair that ends during the hand-over leaves no timer and no fallback."""
        from twisted.internet.testing import MemoryReactorClock

        reactor = MemoryReactorClock()
        stuck, idle = FakeTCP(pending=b"reply"), FakeTCP()
        fallbacks = []
        relay = splice_module.SpliceRelay(reactor, stuck, idle,
                                          on_unsupported=lambda: fallbacks.append(True))
        relay.start()
        relay.abort()
        self.assertEqual(relay.state, "ended")
        self.assertEqual(reactor.getDelayedCalls(), [])
        reactor.advance(10)
        self.assertEqual(fallbacks, [])


class OptionTests(SynchronousTestCase):
    """The C{--no-splice} switch of C{twistd rpc-proxy}."""

    def test_splice_by_default_and_no_splice_flag(self):
        """The factory splices unless C{--no-splice} is given."""
        for argv, expected in (([], True), (["--no-splice"], False)):
            options = Options()
            options.parseOptions(["--web-port", "0", *argv])
            top = makeService(options, reactor=Clock())
            factory = top.getServiceNamed("rpc").factory
            self.assertEqual(factory.splice, expected)



def test_daemon_splices_by_default_and_closes_pairs_on_peer_death():
    """
    ``twistd rpc-proxy`` (default options) hands a TCP pair to the kernel
    relay: bytes arrive exactly both ways with a half-close in between, and
    a peer that dies closes its partner; the same keys pair again afterwards.
    """
    from daemons import our_proxy

    def connect(port, key):
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        sock.sendall(encode_handshake(key))
        return sock

    def recv_exactly(sock, size):
        data = bytearray()
        while len(data) < size:
            chunk = sock.recv(size - len(data))
            assert chunk, f"closed after {len(data)} of {size} bytes"
            data += chunk
        return bytes(data)

    def pair(port, key):
        server = connect(port, "server:" + key)
        client = connect(port, "client:" + key)
        for sock, partner in ((server, "client:" + key), (client, "server:" + key)):
            reply = encode_reply(RPC_CODE_SUCCESS, partner)
            assert recv_exactly(sock, len(reply)) == reply
        return server, client

    with our_proxy() as (daemon, port):
        server, client = pair(port, "d")
        daemon.wait_for(r"splicing")
        up, down = os.urandom(3 * MiB + 17), os.urandom(2 * MiB + 5)
        client.sendall(up)
        client.shutdown(socket.SHUT_WR)
        assert recv_exactly(server, len(up)) == up
        assert server.recv(1) == b""
        server.sendall(down)
        server.close()
        assert recv_exactly(client, len(down)) == down
        assert client.recv(1) == b""
        client.close()

        server, client = pair(port, "d")
        client.sendall(b"x" * 1000)
        assert recv_exactly(server, 1000) == b"x" * 1000
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        try:
            assert server.recv(1) == b""
        except ConnectionResetError:
            pass
        server.close()
        server, client = pair(port, "d")
        client.sendall(b"again")
        assert recv_exactly(server, 5) == b"again"
        server.close()
        client.close()
