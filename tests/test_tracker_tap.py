"""``twistd rpc-tracker``: options, the service tree and the plugin (real
daemons: ``tests/test_tracker_daemon.py``; the shared listener and guarded
port: ``tests/test_daemon.py``)."""

import re

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.daemon.listening import ListenerService
from tvm_rpc.tracker import tap

pytestmark = pytest.mark.unit


def parse(*args):
    """@return: L{tap.Options} parsed from C{args}."""
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class OptionsTests(SynchronousTestCase):
    """Parsing and validation of the command line."""

    def test_tvms_flags_and_short_help(self):
        """TVM 0.27's rpc_tracker flags parse; -h prints the help."""
        import contextlib
        import io

        options = parse("--host", "127.0.0.1", "--port", "9300", "--port-end", "9310", "--silent")
        self.assertEqual((options["host"], options["port"], options["port-end"]),
                         ("127.0.0.1", 9300, 9310))
        self.assertTrue(options["silent"])
        out = io.StringIO()
        with self.assertRaises(SystemExit), contextlib.redirect_stdout(out):
            parse("-h")
        self.assertIn("-h, --help", out.getvalue())

    def test_defaults(self):
        """TVM's defaults, plus ours."""
        options = parse()
        self.assertEqual(
            (options["host"], options["port"], options["port-end"], options["listen"]),
            ("0.0.0.0", 9190, 9199, []),
        )
        self.assertEqual(
            (options["keepalive-idle"], options["keepalive-interval"], options["keepalive-count"]),
            (30, 10, 3),
        )
        self.assertFalse(options["silent"])
        self.assertEqual(options["backlog"], 1024)

    def test_random_stop_key(self):
        """Without --stop-key each run gets a different, long random key."""
        first, second = parse()["stop-key"], parse()["stop-key"]
        self.assertNotEqual(first, second)
        self.assertGreater(len(first), 16)

    def test_given_values(self):
        """Given values are parsed and coerced."""
        options = parse("--host", "127.0.0.1", "--port", "5000", "--port-end", "5002",
                        "--stop-key", "k", "--silent", "--keepalive-idle", "5")
        self.assertEqual(
            (options["host"], options["port"], options["port-end"], options["stop-key"],
             options["silent"], options["keepalive-idle"]),
            ("127.0.0.1", 5000, 5002, "k", True, 5),
        )

    def test_limit_defaults(self):
        """Every limit has its safe default, and --help shows each one."""
        from tvm_rpc.tracker.limits import TrackerLimits

        self.assertEqual(parse().limits(), TrackerLimits())
        self.assertEqual(
            (TrackerLimits().max_output, TrackerLimits().max_connections_per_address,
             TrackerLimits().idle_timeout, TrackerLimits().max_pending,
             TrackerLimits().max_priority, TrackerLimits().max_keys,
             TrackerLimits().key_idle_timeout),
            (4 << 20, 256, None, 100, 1000, 10_000, 600),
        )
        text = " ".join(str(tap.Options()).split())
        for option, default in (
            ("--max-output", "4194304"), ("--max-connections-per-address", "256"),
            ("--idle-timeout", "off"), ("--max-pending-per-connection", "100"),
            ("--max-priority", "1000"), ("--max-keys", "10000"),
            ("--key-idle-timeout", "600"),
        ):
            self.assertIn(option, text)
            self.assertRegex(text, re.escape(option) + r"=.*?\[default: " + default + r"\]")

    def test_limits_given(self):
        """Given limits reach the TrackerLimits; 'off' turns a timeout off."""
        limits = parse(
            "--max-output", "1048576", "--max-connections-per-address", "9",
            "--idle-timeout", "2.5", "--max-pending-per-connection", "3",
            "--max-priority", "10", "--max-keys", "7", "--key-idle-timeout", "off",
        ).limits()
        self.assertEqual(
            (limits.max_output, limits.max_connections_per_address, limits.idle_timeout,
             limits.max_pending, limits.max_priority, limits.max_keys,
             limits.key_idle_timeout),
            (1 << 20, 9, 2.5, 3, 10.0, 7, None),
        )
        self.assertIsNone(parse("--idle-timeout", "0").limits().idle_timeout)

    def test_limits_rejected(self):
        """Limits out of range are usage errors."""
        for args in (
            ["--max-output", "1000"],
            ["--max-output", "-1"],
            ["--max-connections-per-address", "0"],
            ["--idle-timeout", "-1"],
            ["--idle-timeout", "soon"],
            ["--max-pending-per-connection", "0"],
            ["--max-priority", "inf"],
            ["--max-priority", "nan"],
            ["--max-keys", "0"],
            ["--key-idle-timeout", "-5"],
        ):
            self.assertRaises(usage.UsageError, parse, *args)

    def test_service_uses_the_limits(self):
        """makeService gives the state and factory the parsed limits."""
        top = tap.makeService(parse("--max-keys", "5", "--idle-timeout", "9"),
                              reactor=MemoryReactorClock())
        self.assertEqual(top.state.limits.max_keys, 5)
        self.assertEqual(top.state.scheduler.max_keys, 5)
        self.assertEqual(top.factory.limits.idle_timeout, 9)

    def test_listen_repeatable_with_backlog(self):
        """--listen repeats; our backlog is added where none is given."""
        options = parse("--listen", "tcp:0:interface=127.0.0.1",
                        "--listen", "tcp6:0:interface=\\:\\:1:backlog=7")
        self.assertEqual(
            options["listen"],
            ["tcp:0:interface=127.0.0.1:backlog=1024", "tcp6:0:interface=\\:\\:1:backlog=7"],
        )

    def test_rejected(self):
        """Bad ranges, ports, counts and endpoint strings are usage errors."""
        for args in (
            ["--port", "9000", "--port-end", "9000"],
            ["--port", "9000", "--port-end", "8000"],
            ["--port", "70000"],
            ["--port", "x"],
            ["--keepalive-count", "0"],
            ["--keepalive-idle", "-3"],
            ["--listen", "bogus:1234"],
            ["--listen", "tcp:notaport"],
        ):
            self.assertRaises(usage.UsageError, parse, *args)


class MakeServiceTests(SynchronousTestCase):
    """The service tree and its listeners, on a memory reactor."""

    def test_port_range(self):
        """The first port of the range is bound with a large backlog and announced."""
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--host", "127.0.0.1", "--port", "7000", "--port-end", "7003"),
                              reactor=reactor)
        (child,) = list(top)
        self.assertIsInstance(child, ListenerService)
        self.assertEqual(len(child.candidates), 3)
        with capturedLogs() as events:
            top.privilegedStartService()
            top.startService()
        (server,) = reactor.tcpServers
        self.assertEqual((server[0], server[2], server[3]), (7000, 1024, "127.0.0.1"))
        # MemoryReactor's fake ports report 0.0.0.0 whatever the interface.
        self.assertTrue(
            any(re.fullmatch(r"rpc-tracker listening on [\d.]+:7000", formatEvent(e))
                for e in events)
        )
        self.successResultOf(defer.maybeDeferred(top.stopService))

    def test_listen_endpoints(self):
        """Every --listen endpoint is bound, with our backlog where none is given."""
        reactor = MemoryReactorClock()
        top = tap.makeService(
            parse("--listen", "tcp:7001:interface=127.0.0.1", "--listen", "tcp6:7002"),
            reactor=reactor,
        )
        (child,) = list(top)
        self.assertEqual(len(child.candidates), 2)
        top.privilegedStartService()
        top.startService()
        self.assertEqual(
            sorted((s[0], s[2], s[3]) for s in reactor.tcpServers),
            [(7001, 1024, "127.0.0.1"), (7002, 1024, "::")],
        )

    def test_ipv6_host(self):
        """An IPv6 --host listens on TCP6."""
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--host", "::1", "--port", "7000", "--port-end", "7001"),
                              reactor=reactor)
        top.privilegedStartService()
        self.assertEqual(reactor.tcpServers[0][3], "::1")

    def test_silent(self):
        """--silent drops the tracker's info lines and keeps warnings."""
        from tvm_rpc.daemon.logs import logger, set_silent

        self.addCleanup(set_silent, False)
        log = logger("tvm_rpc.tracker.test")
        tap.makeService(parse("--silent"), reactor=MemoryReactorClock())
        with capturedLogs() as events:
            log.info("quiet {n}", n=1)
            log.warn("loud {n}", n=2)
        self.assertEqual([formatEvent(e) for e in events], ["loud 2"])
        tap.makeService(parse(), reactor=MemoryReactorClock())
        with capturedLogs() as events:
            log.info("quiet {n}", n=3)
        self.assertEqual([formatEvent(e) for e in events], ["quiet 3"])

    def test_stop_callback_stops_reactor_once(self):
        """A correct STOP stops the given reactor; a second stop is harmless."""
        from twisted.internet.error import ReactorNotRunning

        class StrictReactor(MemoryReactorClock):
            """Refuses a second stop, as real reactors do."""

            def stop(self):
                """Stop once. @raise ReactorNotRunning: when already stopped."""
                if self.hasStopped:
                    raise ReactorNotRunning()
                super().stop()

        reactor = StrictReactor()
        top = tap.makeService(parse("--stop-key", "k"), reactor=reactor)
        self.assertTrue(top.factory.check_stop_key("k"))
        self.assertFalse(top.factory.check_stop_key("K"))
        top.factory.on_stop()
        self.assertTrue(reactor.hasStopped)
        top.factory.on_stop()

    def test_plugin_found(self):
        """twistd finds rpc-tracker, with our Options."""
        names = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("rpc-tracker", names)
        self.assertIs(names["rpc-tracker"].options, tap.Options)
