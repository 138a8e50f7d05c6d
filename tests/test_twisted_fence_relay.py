"""The proxy's relay with the write-buffer fence down (L{tvm_rpc.twisted_fence}):
over a real loopback connection, so in the system tier; the other fences:
``tests/test_twisted_fence.py``."""

import socket

import pytest
from twisted.internet import epollreactor
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.test_ampwire import PairConnection
from tests.test_splice_relay import Proxy, assert_relays_through_twisted
from tvm_rpc.proxy import splice as splice_module

pytestmark = pytest.mark.system


class PublicRelayTests(SynchronousTestCase):
    """Without the write-buffer fence the proxy relays through Twisted, byte-exact."""

    @pytest.mark.skipif(not splice_module.splice_available(), reason="splice(2) is Linux-only")
    def test_relay(self):
        """The pair is never spliced, and relays byte-exact through Twisted."""
        self.patch(splice_module, "write_buffer_empty", None)
        reactor = epollreactor.EPollReactor()
        self.addCleanup(reactor._poller.close)
        self.addCleanup(reactor.waker.connectionLost, None)
        listener = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(listener.close)
        theirs = socket.create_connection(listener.getsockname())
        self.addCleanup(theirs.close)
        ours, _ = listener.accept()
        transport = PairConnection(ours, Protocol(), reactor)
        transport.connected = True
        self.addCleanup(transport.connectionLost, Failure(ConnectionDone()))
        self.assertFalse(splice_module.can_splice(reactor, transport))
        assert_relays_through_twisted(self, Proxy())
