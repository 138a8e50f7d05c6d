"""``twistd rpc-server``: options, the service they build, and the plugin."""

import errno
import os

import pytest
from twisted.application.service import IServiceMaker
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.client.registration import TrackerRegistration
from tvm_rpc.server import tap
from tvm_rpc.server.listener import InProcessRunner
from tvm_rpc.server.pool import WorkerPool

pytestmark = pytest.mark.unit

STANDIN = "tests.standin_session:make"


def parse(*args):
    options = tap.Options()
    options.parseOptions(list(args))
    return options


class BusyReactor(MemoryReactorClock):
    """A memory reactor on which some ports are taken."""

    def __init__(self, busy):
        super().__init__()
        self.busy = set(busy)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "in use"))
        return super().listenTCP(port, factory, backlog, interface)


class OptionsTests(SynchronousTestCase):
    """TVM's flags, plus ours, validated together."""

    def test_defaults_are_tvms(self):
        options = parse()
        self.assertEqual(
            (options["host"], options["port"], options["port-end"], options["key"]),
            ("0.0.0.0", 9090, 9199, ""),
        )
        self.assertIsNone(options["tracker"])
        self.assertFalse(options["in-process"])
        self.assertEqual(options["max-sessions"], 1)

    def test_tvms_flags_are_accepted(self):
        """Every flag of TVM 0.27's rpc_server parses, with TVM's meaning."""
        here = os.path.abspath(__file__)
        options = parse("--host", "127.0.0.1", "--port", "9300", "--port-end", "9310",
                        "--tracker", "127.0.0.1:9190", "--key", "k", "--silent",
                        "--custom-addr", "10.0.0.1", "--no-fork", "--load-library", here)
        self.assertEqual(options["libraries"], (here,))
        self.assertTrue(options["no-fork"])
        self.assertFalse(options["in-process"])
        proxied = parse("--through-proxy", "--host", "127.0.0.1", "--port", "9090", "--key", "k")
        self.assertTrue(proxied["through-proxy"])

    def test_short_help(self):
        """-h prints the same help as --help, as TVM's tools do."""
        for flag in ("-h", "--help"):
            with self.assertRaises(SystemExit):
                import contextlib
                import io

                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    parse(flag)
            self.assertIn("--load-library", out.getvalue())

    def test_load_library_is_found_at_start(self):
        """Colon-separated, relative to the current directory, resolved now; a missing file is an error."""
        folder = os.path.dirname(os.path.abspath(__file__))
        first, second = os.path.join(folder, "conftest.py"), os.path.join(folder, "daemons.py")
        old = os.getcwd()
        os.chdir(folder)
        try:
            self.assertEqual(parse("--load-library", "conftest.py:daemons.py")["libraries"],
                             (first, second))
        finally:
            os.chdir(old)
        with self.assertRaises(usage.UsageError) as caught:
            parse("--load-library", f"{first}:no-such-library.so")
        self.assertIn("cannot find library no-such-library.so", str(caught.exception))
        self.assertEqual(parse()["libraries"], ())

    def test_in_process_and_no_fork_exclude_each_other(self):
        with self.assertRaises(usage.UsageError):
            parse("--in-process", "--no-fork")

    def test_tracker_address(self):
        self.assertEqual(
            parse("--tracker", "127.0.0.1:9190", "--key", "k")["tracker"], ("127.0.0.1", 9190)
        )
        self.assertEqual(parse("--tracker", "[::1]:9190", "--key", "k")["tracker"], ("::1", 9190))
        self.assertRaises(usage.UsageError, parse, "--tracker", "127.0.0.1:9190")

    def test_bad_values(self):
        for args in (
            ["--port", "9100", "--port-end", "9100"],
            ["--tracker", "nohost", "--key", "k"],
            ["--tracker", "h:notaport", "--key", "k"],
            ["--port", "70000"],
            ["--handshake-timeout", "0"],
            ["--max-sessions", "0"],
            ["--key", "a b"],
            ["--listen", "nonsense:1"],
            ["--through-proxy", "--tracker", "h:1", "--key", "k"],
            ["--session-factory", "nocolon"],
        ):
            self.assertRaises(usage.UsageError, parse, *args)

    def test_repeatable(self):
        options = parse("--init", "a.b", "--init", "c:d", "--listen", "tcp:0", "--listen", "tcp:1")
        self.assertEqual(options["init"], ["a.b", "c:d"])
        self.assertEqual(options["listen"], ["tcp:0", "tcp:1"])


class MakeServiceTests(SynchronousTestCase):
    """What makeService builds from the options."""

    def make(self, *args, reactor=None):
        reactor = reactor or MemoryReactorClock()
        options = parse("--session-factory", STANDIN, "--host", "127.0.0.1", *args)
        service = tap.makeService(options, reactor)
        self.addCleanup(lambda: service.running and service.stopService())
        return service, reactor

    def test_workers_and_no_registration_by_default(self):
        service, reactor = self.make(
            "--port", "9300", "--port-end", "9301", "--init", "tests.server_init_sample"
        )
        self.assertIsInstance(service.runner, WorkerPool)
        self.assertFalse(service.factory.gate.tracked)
        self.assertIsNone(service.make_registration)
        self.assertTrue(os.path.isdir(service.work_root))
        argv = service.runner.argv(3)
        self.assertEqual(argv[1:3], ["-m", "tvm_rpc.server.worker"])
        for pair in (["--control-fd", "3"], ["--session-factory", STANDIN],
                     ["--init", "tests.server_init_sample"], ["--work-root", service.work_root]):
            index = argv.index(pair[0])
            self.assertEqual(argv[index : index + 2], pair)
        service.privilegedStartService()
        [(port, _, _, interface)] = reactor.tcpServers
        self.assertEqual((port, interface), (9300, "127.0.0.1"))
        self.assertEqual([child.name for child in service], ["listener"])
        service.stopService()
        self.assertFalse(os.path.exists(service.work_root))

    def test_in_process(self):
        service, _ = self.make("--in-process")
        self.assertIsInstance(service.runner, InProcessRunner)

    def test_no_fork_and_libraries_reach_the_fork_server(self):
        here = os.path.abspath(__file__)
        service, _ = self.make("--no-fork", "--load-library", here)
        argv = service.runner.argv(3)
        self.assertIn("--spawn", argv)
        self.assertEqual(argv[argv.index("--load-library") + 1], here)
        service, _ = self.make()
        self.assertNotIn("--spawn", service.runner.argv(3))
        self.assertNotIn("--load-library", service.runner.argv(3))

    def test_silent_reaches_workers(self):
        service, _ = self.make("--silent")
        self.assertIn("--silent", service.runner.argv(3))
        service, _ = self.make()
        self.assertNotIn("--silent", service.runner.argv(3))

    def test_tracker_registration_child(self):
        service, reactor = self.make(
            "--in-process", "--tracker", "127.0.0.1:9190", "--key", "rasp",
            "--port", "9300", "--port-end", "9310", "--custom-addr", "10.1.2.3",
        )
        reactor.busy = set()
        service.startService()
        self.assertEqual([c.name for c in service], ["listener", "registration"])
        child = service.getServiceNamed("registration")
        self.assertIsInstance(child, TrackerRegistration)
        self.assertEqual((child.port, child.custom_addr, child.gate.key), (9300, "10.1.2.3", "rasp"))
        self.assertTrue(service.factory.gate.tracked)
        # The registration connects to the tracker at once.
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 9190))

    def test_first_free_port(self):
        reactor = BusyReactor({9300, 9301})
        service, _ = self.make("--in-process", "--port", "9300", "--port-end", "9303", reactor=reactor)
        service.startService()
        self.assertEqual(service.bound_port, 9302)

    def test_no_free_port_is_fatal(self):
        reactor = BusyReactor({9300, 9301})
        service, _ = self.make("--in-process", "--port", "9300", "--port-end", "9302", reactor=reactor)
        self.assertRaises(CannotListenError, service.privilegedStartService)

    def test_listen_endpoint(self):
        service, reactor = self.make("--in-process", "--listen", "tcp:9400:interface=127.0.0.1")
        service.startService()
        self.assertEqual(reactor.tcpServers[0][0], 9400)
        self.assertEqual(service.bound_port, 9400)

    def test_http_metrics(self):
        """--http adds a metrics listener over the counters the runner and listener share."""
        service, reactor = self.make("--listen", "tcp:9400", "--http", "tcp:9182")
        self.assertIs(service.factory.activity, service.runner.activity)
        service.privilegedStartService()
        self.assertEqual(sorted(p[0] for p in reactor.tcpServers), [9182, 9400])
        [site] = [p[1] for p in reactor.tcpServers if p[0] == 9182]
        registry = site.resource.getStaticEntity(b"metrics").registry
        service.runner.activity.refuse("mismatch")
        self.assertEqual(registry.get_sample_value("tvm_rpc_server_handshakes_refused_total",
                                                   {"reason": "mismatch"}), 1)
        self.assertEqual(registry.get_sample_value("tvm_rpc_server_spare_worker_ready"), 0)
        self.assertIsNone(registry.get_sample_value("tvm_rpc_server_tracker_registered"))
        with self.assertRaises(usage.UsageError):
            parse("--http", "nonsense:1")

    def test_http_metrics_through_proxy(self):
        """With --through-proxy too, the link counts into the same metrics."""
        service, _ = self.make("--in-process", "--through-proxy", "--key", "k",
                               "--http", "tcp:9183")
        self.assertEqual([child.name for child in service], ["http"])
        self.assertIs(service.link.activity, service.runner.activity)

    def test_through_proxy(self):
        """--through-proxy: no listener, a link to the proxy; stopping removes the work root."""
        from tvm_rpc.server.proxied import ProxiedServerService

        service, reactor = self.make("--in-process", "--through-proxy", "--key", "k",
                                     "--port", "9500", "--port-end", "9500")
        self.assertIsInstance(service, ProxiedServerService)
        service.privilegedStartService()
        service.startService()
        # In-process sessions can start at once: the link waits at the proxy at once.
        self.assertEqual([child.name for child in service], ["link"])
        self.assertEqual(reactor.tcpServers, [])
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 9500))
        self.assertTrue(os.path.isdir(service.work_root))
        service.stopService()
        self.assertFalse(os.path.exists(service.work_root))

    def test_init_imported_at_start(self):
        self.make("--in-process", "--init", "tests.server_init_sample:setup")
        import tests.server_init_sample as sample

        self.assertEqual(sample.CALLS, ["setup"])

    def test_bad_init_is_fatal(self):
        self.assertRaises(ImportError, self.make, "--init", "tests.no_such_module_here")


class PluginTests(SynchronousTestCase):
    """``twistd --help`` lists rpc-server."""

    def test_plugin_found(self):
        names = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertIn("rpc-server", names)
        self.assertIsInstance(names["rpc-server"].options(), tap.Options)


class UnixListenTests(SynchronousTestCase):
    """A Unix socket listener has no port to register with a tracker."""

    def test_unix_with_tracker_is_fatal(self):
        import tempfile

        path = os.path.join(tempfile.mkdtemp(), "rpc.sock")
        options = parse("--session-factory", STANDIN, "--in-process", "--listen", f"unix:{path}",
                        "--tracker", "127.0.0.1:9190", "--key", "k")
        from twisted.internet.testing import MemoryReactorClock

        service = tap.makeService(options, MemoryReactorClock())
        self.assertRaises(CannotListenError, service.startService)
        service.stopService()


class OfferWhenReadyTests(SynchronousTestCase):
    """A server offers itself (tracker, proxy) only once a session can start at once."""

    def test_registration_waits_for_the_fork_server(self):
        from twisted.internet import defer

        from tvm_rpc.server.service import SessionHostService

        class Runner:
            def __init__(self):
                self.ready = defer.Deferred()

            def when_ready(self):
                return self.ready

        from twisted.application.service import Service

        runner = Runner()
        host = SessionHostService(runner)
        child = Service()
        child.setName("registration")
        host.startService()
        host.add_when_ready(child)
        self.assertEqual(list(host), [])
        runner.ready.callback(None)
        self.assertEqual(list(host), [child])
        self.assertTrue(child.running)
