"""The daemons' shared plumbing (L{tvm_rpc.daemon}): option coercers and the
address parser, the listening options, the ``--silent`` switch, the listener
service and the listening port that survives running out of descriptors.

Each daemon's own tests check that it uses these (its flags, its
``listening on`` line, its real-process EMFILE test)."""

import errno
import os
import re
import sys

import pytest
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.daemon import listening as daemon_listening
from tvm_rpc.daemon import logs as daemon_logs
from tvm_rpc.daemon import options as daemon_options
from tvm_rpc.daemon import ports as daemon_ports
from tvm_rpc.daemon.listening import ListenerService
from tvm_rpc.daemon.ports import GuardedTCPPort

pytestmark = pytest.mark.unit


class BusyReactor(MemoryReactorClock):
    """A memory reactor on which some TCP ports are taken."""

    def __init__(self, busy=(), refused=()):
        """
        @param busy: ports whose bind fails with EADDRINUSE.
        @param refused: ports whose bind fails with EACCES.
        """
        super().__init__()
        self.busy = set(busy)
        self.refused = set(refused)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        """Fail for busy or refused ports, else listen in memory."""
        for ports, code in ((self.busy, errno.EADDRINUSE), (self.refused, errno.EACCES)):
            if port in ports:
                raise CannotListenError(interface, port, OSError(code, os.strerror(code)))
        return super().listenTCP(port, factory, backlog, interface)


class CoercerTests(SynchronousTestCase):
    """Option coercers and the C{HOST:PORT} parser."""

    def test_port_number(self):
        """0..65535 are ports; anything else is a ValueError."""
        self.assertEqual([daemon_options.port_number(v) for v in ("0", "9190", 65535)], [0, 9190, 65535])
        for bad in ("-1", "65536", "x", "1.5"):
            self.assertRaises(ValueError, daemon_options.port_number, bad)

    def test_positive_int(self):
        """Only integers above zero."""
        self.assertEqual(daemon_options.positive_int("3"), 3)
        for bad in ("0", "-2", "x"):
            self.assertRaises(ValueError, daemon_options.positive_int, bad)

    def test_positive_float(self):
        """Only finite numbers above zero."""
        self.assertEqual(daemon_options.positive_float("0.5"), 0.5)
        for bad in ("0", "-1", "inf", "nan", "x"):
            self.assertRaises(ValueError, daemon_options.positive_float, bad)

    def test_parse_address(self):
        """C{HOST:PORT}, IPv6 in brackets or bare before the last colon."""
        self.assertEqual(daemon_options.parse_address("127.0.0.1:9190"), ("127.0.0.1", 9190))
        self.assertEqual(daemon_options.parse_address("tracker.lab:1"), ("tracker.lab", 1))
        self.assertEqual(daemon_options.parse_address("[::1]:9190"), ("::1", 9190))
        self.assertEqual(daemon_options.parse_address("::1:9190"), ("::1", 9190))
        for bad in ("nohost", ":9190", "h:notaport", "h:70000", "[]:1", ""):
            with self.assertRaises(ValueError) as raised:
                daemon_options.parse_address(bad, "--tracker")
            self.assertIn("--tracker must be HOST:PORT", str(raised.exception))

    def test_with_backlog(self):
        """C{backlog=} is added to stream endpoints that lack one, and only there."""
        self.assertEqual(daemon_listening.with_backlog("tcp:0", 7), "tcp:0:backlog=7")
        self.assertEqual(daemon_listening.with_backlog("TCP6:0", 7), "TCP6:0:backlog=7")
        self.assertEqual(daemon_listening.with_backlog("unix:/x", 7), "unix:/x:backlog=7")
        self.assertEqual(daemon_listening.with_backlog("tcp:0:backlog=3", 7), "tcp:0:backlog=3")
        self.assertEqual(daemon_listening.with_backlog("systemd:domain=INET:index=0", 7),
                         "systemd:domain=INET:index=0")


class ExampleOptions(daemon_options.ListenOptions, usage.Options):
    """A daemon's options built from the shared parts."""

    optParameters = daemon_options.listen_parameters("10.0.0.1", 5000, 5010)

    def postOptions(self):
        """Check the listening flags."""
        self.check_listen()


class ListenOptionsTests(SynchronousTestCase):
    """L{daemon_options.ListenOptions} and L{daemon_options.listen_parameters}."""

    def parse(self, *args):
        """@return: L{ExampleOptions} parsed from C{args}."""
        options = ExampleOptions()
        options.parseOptions(list(args))
        return options

    def test_defaults(self):
        """The daemon's defaults; no endpoint."""
        options = self.parse()
        self.assertEqual((options["host"], options["port"], options["port-end"], options["listen"]),
                         ("10.0.0.1", 5000, 5010, []))

    def test_listen_repeatable(self):
        """--listen repeats, in order, unchanged."""
        options = self.parse("--listen", "tcp:0", "--listen", "unix:/tmp/x.sock")
        self.assertEqual(options["listen"], ["tcp:0", "unix:/tmp/x.sock"])

    def test_rejected(self):
        """Empty ranges, bad ports and bad endpoint strings are usage errors."""
        for args in (["--port", "5000", "--port-end", "5000"],
                     ["--port", "5000", "--port-end", "4000"],
                     ["--port", "70000"],
                     ["--port-end", "x"],
                     ["--listen", "bogus:1"],
                     ["--listen", "tcp:notaport"]):
            self.assertRaises(usage.UsageError, self.parse, *args)

    def test_no_range_needed(self):
        """A daemon that connects out may skip the range check."""
        options = ExampleOptions()
        options.update({"port": 5000, "port-end": 5000})
        options.check_listen(port_range=False)
        self.assertRaises(usage.UsageError, options.check_listen)


def test_ssl_without_tls_support_names_the_extra(monkeypatch):
    """--listen ssl:... without pyOpenSSL says which extra to install."""
    import twisted.internet

    monkeypatch.setitem(sys.modules, "OpenSSL", None)
    monkeypatch.setitem(sys.modules, "twisted.internet.ssl", None)
    monkeypatch.delattr(twisted.internet, "ssl", raising=False)
    with pytest.raises(usage.UsageError) as raised:
        ExampleOptions().parseOptions(["--listen", "ssl:0:privateKey=key.pem"])
    message = str(raised.value)
    assert "needs TLS support" in message
    assert "[tls]" in message and "twisted[tls]" in message


class SilentTests(SynchronousTestCase):
    """The C{--silent} switch."""

    def test_silent(self):
        """Silent drops info lines of filtered loggers, keeps warnings and the
        unfiltered lines; switching back lets info through again."""
        self.addCleanup(daemon_logs.set_silent, False)
        log = daemon_logs.logger("tvm_rpc.test")
        loud = daemon_logs.unfiltered_logger("tvm_rpc.test")
        daemon_logs.set_silent(True)
        with capturedLogs() as events:
            log.info("quiet {n}", n=1)
            log.warn("loud {n}", n=2)
            loud.info("announced {n}", n=3)
        self.assertEqual([formatEvent(e) for e in events], ["loud 2", "announced 3"])
        daemon_logs.set_silent(False)
        with capturedLogs() as events:
            log.info("quiet {n}", n=4)
        self.assertEqual([formatEvent(e) for e in events], ["quiet 4"])

    def test_daemon_logs_modules_share_the_switch(self):
        """The server's C{logs} module is this switch (the tracker imports it directly)."""
        from tvm_rpc.server import logs as server_logs

        for module in (server_logs,):
            self.assertIs(module.set_silent, daemon_logs.set_silent)
            self.assertIs(module.logger, daemon_logs.logger)


class FakeEndpoint:
    """An endpoint that fails with a given errno, or listens on a fake port."""

    def __init__(self, code=None, port=1):
        """@param code: the errno to fail with, or L{None} to succeed on C{port}."""
        self.code = code
        self.port = port

    def listen(self, factory):
        """@return: a Deferred: the failure, or a fake listening port."""
        if self.code is not None:
            return defer.fail(CannotListenError("127.0.0.1", self.port, OSError(self.code, "x")))
        reactor = MemoryReactorClock()
        return defer.succeed(reactor.listenTCP(self.port, factory, 50, "127.0.0.1"))


class ListenerServiceTests(SynchronousTestCase):
    """First free port of a range; every other failure is fatal."""

    def test_skips_ports_in_use(self):
        """A port in use is skipped for the next candidate."""
        service = ListenerService(
            [FakeEndpoint(errno.EADDRINUSE, 1), FakeEndpoint(None, 2)], Factory(), "rpc-test"
        )
        service.privilegedStartService()
        self.assertEqual(service.port.getHost().port, 2)

    def test_none_free_is_fatal(self):
        """No candidate free: CannotListenError."""
        service = ListenerService([FakeEndpoint(errno.EADDRINUSE, p) for p in (1, 2)], Factory(),
                                  "rpc-test")
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_other_errors_are_fatal(self):
        """A failure other than 'in use' is fatal at once."""
        service = ListenerService(
            [FakeEndpoint(errno.EACCES, 1), FakeEndpoint(None, 2)], Factory(), "rpc-test"
        )
        self.assertRaises(CannotListenError, service.privilegedStartService)


class FakeListeningSocket:
    """A listening socket whose accept() replays scripted outcomes."""

    def __init__(self, outcomes):
        """@param outcomes: sockets to return or errnos to raise, in order."""
        self.outcomes = list(outcomes)
        self.accepted = []

    def accept(self):
        """@return: the next scripted socket. @raise OSError: a scripted errno (EAGAIN when done)."""
        outcome = self.outcomes.pop(0) if self.outcomes else errno.EAGAIN
        if isinstance(outcome, int):
            raise OSError(outcome, os.strerror(outcome))
        self.accepted.append(outcome)
        return outcome, ("127.0.0.1", 5555)

    def fileno(self):
        """@return: an invalid descriptor (never polled)."""
        return -1

    def getsockname(self):
        """@return: a plausible local address."""
        return ("127.0.0.1", 9190)


class FakeClientSocket:
    """An accepted socket that only records being closed."""

    closed = False

    def close(self):
        """Remember being closed."""
        self.closed = True


class GuardedPortTests(SynchronousTestCase):
    """Running out of descriptors pauses the port instead of spinning."""

    def make_port(self, outcomes):
        """@return: C{(port, reactor, addresses built)} for a port over a scripted socket."""
        reactor = MemoryReactorClock()
        built = []

        class Recorder(Factory):
            """Records the addresses it is asked to build protocols for."""
            def buildProtocol(self, addr):
                """Record C{addr}; refuse the connection."""
                built.append(addr)
                return None

        port = GuardedTCPPort(0, Recorder(), 50, "127.0.0.1", reactor)
        port.socket = FakeListeningSocket(outcomes)
        port.connected = True
        port.startReading()
        return port, reactor, built

    def test_emfile_pauses_and_resumes(self):
        """EMFILE stops reading for the backoff, logged once, then reading resumes."""
        port, reactor, built = self.make_port([errno.EMFILE])
        with capturedLogs() as events:
            port.doRead()
            self.assertNotIn(port, reactor.readers)
            self.assertEqual(len(reactor.getDelayedCalls()), 1)
            port.doRead()
            reactor.advance(port.backoff)
        self.assertIn(port, reactor.readers)
        warnings = [formatEvent(e) for e in events if "out of file descriptors" in formatEvent(e)]
        self.assertEqual(len(warnings), 1)

    def test_backlog_shed_with_reserve(self):
        """With the reserve, waiting connections are accepted and closed at once."""
        waiting = [FakeClientSocket(), FakeClientSocket()]
        port, reactor, built = self.make_port([errno.EMFILE] + waiting)
        port._take_reserve()
        try:
            port.doRead()
            self.assertTrue(all(s.closed for s in waiting))
            self.assertEqual(port._refused, 2)
            self.assertIsNotNone(port._reserve)
        finally:
            port._release_reserve()

    def test_recovery_logged_once(self):
        """The first accept after an episode logs the recovery once."""
        client = FakeClientSocket()
        port, reactor, built = self.make_port([errno.ENFILE])
        with capturedLogs() as events:
            port.doRead()
            reactor.advance(port.backoff)
            port.socket.outcomes = [client]
            port.doRead()
        self.assertEqual(len(built), 1)
        self.assertTrue(client.closed)
        text = [formatEvent(e) for e in events]
        self.assertEqual(sum("again" in t for t in text), 1)

    def test_transient_errors_skipped(self):
        """ECONNABORTED skips one connection and accepting goes on."""
        port, reactor, built = self.make_port([errno.ECONNABORTED, FakeClientSocket()])
        port.doRead()
        self.assertEqual(len(built), 1)
        self.assertIn(port, reactor.readers)


class ListenerServiceFactoryTests(SynchronousTestCase):
    """L{daemon_listening.listener_service} from a daemon's listening options."""

    def start(self, reactor, **kwargs):
        """@return: the started listener and the log lines of its start."""
        options = dict(host="127.0.0.1", port=9300, port_end=9303)
        options.update(kwargs)
        listener = daemon_listening.listener_service(reactor, Factory(), "rpc-test", **options)
        with capturedLogs() as events:
            listener.privilegedStartService()
            listener.startService()
        self.addCleanup(lambda: listener.running and listener.stopService())
        return listener, [formatEvent(e) for e in events]

    def test_first_free_port(self):
        """Busy ports are skipped; the first free one is bound, announced, once."""
        reactor = BusyReactor(busy={9300, 9301})
        listener, lines = self.start(reactor)
        self.assertEqual([(p[0], p[2], p[3]) for p in reactor.tcpServers],
                         [(9302, daemon_listening.DEFAULT_BACKLOG, "127.0.0.1")])
        self.assertEqual(listener.port_number(), 9302)
        self.assertEqual(len([line for line in lines if "listening on" in line]), 1)
        self.assertTrue(any(re.fullmatch(r"rpc-test listening on [\d.]+:9302", line)
                            for line in lines))

    def test_none_free(self):
        """No free port in the range is fatal, and says which range."""
        reactor = BusyReactor(busy={9300, 9301})
        listener = daemon_listening.listener_service(reactor, Factory(), "rpc-test", host="127.0.0.1",
                                           port=9300, port_end=9302)
        with self.assertRaises(CannotListenError) as raised:
            listener.privilegedStartService()
        self.assertIn("9300..9301", str(raised.exception))

    def test_empty_range_fatal(self):
        """An empty range is fatal too (not an IndexError)."""
        listener = daemon_listening.listener_service(MemoryReactorClock(), Factory(), "rpc-test",
                                           host="127.0.0.1", port=9300, port_end=9300)
        self.assertRaises(CannotListenError, listener.privilegedStartService)

    def test_other_error_fatal(self):
        """A bind failure other than 'in use' is fatal at once."""
        reactor = BusyReactor(refused={9300})
        listener = daemon_listening.listener_service(reactor, Factory(), "rpc-test", host="127.0.0.1",
                                           port=9300, port_end=9303)
        self.assertRaises(CannotListenError, listener.privilegedStartService)
        self.assertEqual(reactor.tcpServers, [])

    def test_ipv6_host(self):
        """An IPv6 host listens on that interface."""
        reactor = MemoryReactorClock()
        self.start(reactor, host="::1")
        self.assertEqual(reactor.tcpServers[0][3], "::1")

    def test_every_endpoint(self):
        """Every --listen endpoint binds, with our backlog where none is given."""
        reactor = MemoryReactorClock()
        listener, lines = self.start(
            reactor, listen=["tcp:9400:interface=127.0.0.1", "tcp:9401:backlog=5"], backlog=77)
        self.assertEqual([(p[0], p[2]) for p in reactor.tcpServers], [(9400, 77), (9401, 5)])
        self.assertEqual(len(listener.ports), 2)
        self.assertEqual(len([line for line in lines if "listening on" in line]), 2)

    def test_endpoint_in_use_fatal(self):
        """An --listen endpoint whose address is in use is fatal (no skipping)."""
        reactor = BusyReactor(busy={9401})
        listener = daemon_listening.listener_service(
            reactor, Factory(), "rpc-test", host="127.0.0.1", port=9300, port_end=9303,
            listen=["tcp:9400", "tcp:9401"])
        self.assertRaises(CannotListenError, listener.privilegedStartService)

    def test_unix_announced_and_no_tcp_port(self):
        """A UNIX listener is announced by its path and has no TCP port number."""
        reactor = MemoryReactorClock()
        listener, lines = self.start(reactor, listen=["unix:/tmp/rpc-test.sock"])
        self.assertIsNone(listener.port_number())
        self.assertIn("rpc-test listening on unix:/tmp/rpc-test.sock", lines)

    def test_bind_once_and_stop(self):
        """Both start hooks bind once; stopping closes every port and allows a restart."""
        reactor = MemoryReactorClock()
        listener = daemon_listening.listener_service(reactor, Factory(), "rpc-test", host="127.0.0.1",
                                           port=9300, port_end=9303)
        parent = MultiService()
        listener.setServiceParent(parent)
        parent.privilegedStartService()
        parent.startService()
        self.assertEqual(len(reactor.tcpServers), 1)
        self.assertIsNotNone(listener.port)
        self.successResultOf(defer.maybeDeferred(parent.stopService))
        self.assertEqual(listener.ports, [])
        self.assertIsNone(listener.port)
        self.assertIsNone(listener.port_number())
        parent.startService()
        self.assertEqual(listener.port_number(), 9300)
        self.assertEqual(len(reactor.tcpServers), 2)

    def test_unguarded_on_memory_reactor(self):
        """Reactors without file descriptors get the listen calls unchanged."""
        reactor = MemoryReactorClock()
        guarded = daemon_ports.GuardedListenReactor(reactor)
        port = guarded.listenTCP(1, Factory(), 9, "127.0.0.1")
        (listened,) = reactor.tcpServers
        self.assertEqual((listened[0], listened[2], listened[3]), (1, 9, "127.0.0.1"))
        self.assertNotIsInstance(port, GuardedTCPPort)
        self.assertEqual(guarded.seconds, reactor.seconds)


class DescribePeerTests(SynchronousTestCase):
    """L{tvm_rpc.transport.peer_label}."""

    def test_peers(self):
        """TCP peers as host:port, UNIX peers by their address, no peer as given."""
        from tvm_rpc.transport import peer_label
        from twisted.internet.address import IPv4Address, UNIXAddress
        from twisted.internet.testing import StringTransport

        self.assertEqual(
            peer_label(StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 5))),
            "10.0.0.1:5")
        unix = StringTransport(peerAddress=UNIXAddress(b"/tmp/x.sock"))
        self.assertEqual(peer_label(unix), str(UNIXAddress(b"/tmp/x.sock")))

        class Gone:
            def getPeer(self):
                raise OSError("closed")

        self.assertEqual(peer_label(Gone()), "unknown peer")
        self.assertEqual(peer_label(Gone(), unknown="?"), "?")
