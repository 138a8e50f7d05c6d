"""
The fence around Twisted's internals (L{tvm_rpc.twisted_fence}).

On the installed Twisted every probe passes and the fast paths are bound.
With a fenced attribute made missing (the class monkeypatched), its probe
fails, one log line says so, the public path is chosen, and what the
optimisation served -- a session call, a write, the worker's reactor --
still works through it (a relay: ``tests/test_twisted_fence_relay.py``, over
a loopback connection).
"""

import socket

import pytest
from twisted.internet import abstract, epollreactor, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.logger import capturedLogs
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests import test_ampwire
from tests.test_ampwire import PairConnection
from tests.test_session_client import SessionTestBase
from tvm_rpc import lean_amp, twisted_fence
from tvm_rpc.lean_amp import LeanAMP
from tvm_rpc.proxy import splice as splice_module
from tvm_rpc.server import reactor as worker_reactor

pytestmark = pytest.mark.unit

#: Each fenced optimisation: its probe, and a fenced attribute that makes it fail.
FENCES = {
    "write-through and eager reads": (
        twisted_fence.probe_write_buffer, abstract.FileDescriptor, "_writeDisconnecting"),
    "the reactor's read set": (
        twisted_fence.probe_reactor_reads, epollreactor.EPollReactor, "addReader"),
    "AMP's tag counter": (twisted_fence.probe_amp_tags, amp.BoxDispatcher, "_nextTag"),
    "AMP's StartTLS check": (
        twisted_fence.probe_amp_switch, amp.BinaryBoxProtocol, "_startingTLSBuffer"),
    "AMP's TooLong ending": (
        twisted_fence.probe_box_too_long, amp.BinaryBoxProtocol, "_keyLengthLimitExceeded"),
    "the lean worker reactor": (
        twisted_fence.probe_epoll_reactor, epollreactor.EPollReactor, "_doReadOrWrite"),
    "the TLS port label": (twisted_fence.probe_port_type, tcp.Port, "_type"),
}


def _owner(cls, name):
    """@return: the class of C{cls}'s MRO that defines C{name}."""
    return next(klass for klass in cls.__mro__ if name in vars(klass))


class ProbeTests(SynchronousTestCase):
    """The probes on the installed Twisted, and with an attribute gone."""

    def test_every_probe_passes_here(self):
        """On the installed Twisted every optimisation is on."""
        self.assertEqual(set(twisted_fence.decisions), set(FENCES))
        self.assertEqual({name: problem for name, problem in twisted_fence.decisions.items()
                          if problem is not None}, {})
        for flag in ("write_through_ok", "reactor_reads_ok", "amp_tags_ok", "amp_switch_ok",
                     "box_too_long_ok", "lean_reactor_ok", "port_label_ok"):
            self.assertTrue(getattr(twisted_fence, flag), flag)
        for probe, _, _ in FENCES.values():
            self.assertIsNone(probe())

    def test_fast_paths_are_bound_once(self):
        """The fast functions themselves are bound: a call costs what it did before the fence."""
        self.assertIs(lean_amp.idle_socket, twisted_fence._idle_socket)
        self.assertIs(lean_amp.reactor_reading, twisted_fence._reactor_reading)
        self.assertIs(LeanAMP.next_tag, amp.AMP._nextTag)
        self.assertIs(splice_module.write_buffer_empty, twisted_fence._nothing_buffered)
        self.assertIs(worker_reactor.worker_reactor_class(), worker_reactor.WorkerReactor)

    def test_a_missing_attribute_turns_its_optimisation_off(self):
        """Each fenced attribute removed: its probe fails, one log line, the public path."""
        for name, (probe, cls, attribute) in FENCES.items():
            with self.subTest(name):
                owner = _owner(cls, attribute)
                saved = vars(owner)[attribute]
                delattr(owner, attribute)
                try:
                    fast, public = object(), object()
                    with capturedLogs() as events:
                        chosen, passed = twisted_fence.decide(name, probe, fast, public)
                finally:
                    setattr(owner, attribute, saved)
                    twisted_fence.decisions[name] = None
                self.assertFalse(passed)
                self.assertIs(chosen, public)
                self.assertEqual(len(events), 1)
                self.assertIn(name, events[0]["name"])
                self.assertEqual(events[0]["log_level"].name, "warn")
                self.assertIsNone(probe())

    def test_a_probe_that_sees_other_behaviour_fails(self):
        """An attribute that exists but no longer tracks the buffer fails the probe too."""
        self.patch(abstract.FileDescriptor, "write",
                   lambda self, data: abstract.FileDescriptor.writeSequence(self, []))
        self.assertIn("_tempDataLen", twisted_fence.probe_write_buffer())


class PublicWriteTests(SynchronousTestCase):
    """Without write-through, a LeanAMP writes through the transport, in order."""

    def setUp(self):
        self.patch(lean_amp, "idle_socket", twisted_fence._no_idle_socket)
        test_ampwire.WriteThroughTests.setUp(self)

    def test_written_on_the_reactors_turn(self):
        """The bytes wait in the transport for the reactor, then leave in order."""
        self.protocol.emit(b"first ")
        self.protocol.emit(b"second")
        self.assertIn(self.transport, self.reactor.writers)
        self.transport.doWrite()
        self.assertEqual(self.peer.recv(100), b"first second")


class PublicSessionTests(SessionTestBase):
    """A session whose every AMP fence is on the public path still calls and streams."""

    def setUp(self):
        self.patch(LeanAMP, "next_tag", twisted_fence._own_tag)
        self.patch(lean_amp, "idle_socket", twisted_fence._no_idle_socket)
        self.patch(lean_amp, "reactor_reading", twisted_fence._reactor_reading_public)
        self.patch(lean_amp, "amp_switching", twisted_fence._never_switching)
        self.patch(lean_amp, "mark_box_too_long", twisted_fence._leave_box_too_long)
        super().setUp()

    def test_calls(self):
        """Calls, large values by stream (AMP's own tags beside ours) and errors work."""
        self.assertEqual(self.resolve(self.session.call("add", 2, 3)), 5)
        blob = bytes(range(256)) * 1000
        self.assertEqual(self.resolve(self.session.call("echo", blob)), [blob])
        self.failure(self.session.call("boom"), Exception)
        self.assertGreaterEqual(self.client.own_tags, 3)

    def test_own_tags_never_look_like_amps(self):
        """Our tags are C{t<hex>}; AMP's are bare hexadecimal."""
        protocol = amp.AMP()
        self.assertEqual([twisted_fence._own_tag(protocol) for _ in range(2)], [b"t1", b"t2"])
        self.assertEqual(protocol._nextTag(), b"1")

    def test_calls_after_the_end_fail_with_it(self):
        """The connection's end (LeanAMP.stopped_reason) fails later calls at once."""
        self.client.transport.loseConnection()
        self.pump.flush()
        self.assertIsNotNone(self.client.stopped_reason)
        self.failure(self.session.call("add", 1, 2), Exception)


class PublicReadingTests(SynchronousTestCase):
    """The public C{getReaders()} answers whether the reactor reads a transport."""

    def test_reading(self):
        """Not read before C{startReading}, read after, as the fast path also says."""
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        transport = PairConnection(ours, Protocol(), reactor)
        transport.connected = True
        self.addCleanup(transport.connectionLost, Failure(ConnectionDone()))
        self.assertFalse(twisted_fence._reactor_reading_public(transport))
        transport.startReading()
        self.assertTrue(twisted_fence._reactor_reading_public(transport))
        self.assertTrue(twisted_fence._reactor_reading(transport))
        self.assertFalse(twisted_fence._reactor_reading_public(object()))


class PublicReactorTests(SynchronousTestCase):
    """Without the lean loop the worker runs Twisted's own epoll reactor."""

    def test_plain_epoll_reactor(self):
        """C{worker_reactor_class(lean=False)} is C{EPollReactor}, and it runs."""
        cls = worker_reactor.worker_reactor_class(lean=False)
        self.assertIs(cls, epollreactor.EPollReactor)
        reactor = cls()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        fired = []
        reactor.callLater(0, fired.append, "now")
        reactor.callLater(0.01, reactor.stop)
        reactor.run(installSignalHandlers=False)
        self.assertEqual(fired, ["now"])
