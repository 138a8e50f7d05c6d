"""``twistd rpc-proxy``'s command line and service, and its tracker registration."""

import json

import pytest
import attrs
from twisted.application.service import IServiceMaker
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol.constants import INT32, RPC_TRACKER_MAGIC
from tvm_rpc.protocol.framing import FrameDecoder, encode_frame
from tvm_rpc.proxy import tap
from tvm_rpc.proxy.pairing import PairingPool
from tvm_rpc.protocol.keys import PROXY_ENTRY_PREFIX, proxy_info_key
from tvm_rpc.proxy.registration import ProxyRegistration

pytestmark = pytest.mark.unit


class BusyPortsReactor(MemoryReactorClock):
    """A memory reactor on which some TCP ports are already taken."""

    def __init__(self, busy):
        super().__init__()
        self.busy = set(busy)

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


def parse(*argv):
    options = tap.Options()
    options.parseOptions(list(argv))
    return options


class TuningTests(SynchronousTestCase):
    """L{tvm_rpc.proxy.tuning}."""

    def test_thresholds(self):
        from tvm_rpc.proxy.tuning import MAX_MMAP_THRESHOLD, allocator_thresholds

        self.assertEqual(allocator_thresholds(256 * 1024), (4 << 20, 16 << 20))
        self.assertEqual(allocator_thresholds(4 << 20), (16 << 20, 64 << 20))
        self.assertEqual(allocator_thresholds(64 << 20)[0], MAX_MMAP_THRESHOLD)

    def test_trim_after_pairs_end(self):
        from twisted.internet.task import Clock

        from tvm_rpc.proxy.tuning import AllocatorTuning

        clock = Clock()
        calls = []
        tuning = AllocatorTuning(1 << 20, clock, trim=lambda: calls.append(clock.seconds()))
        tuning.pair_ended()
        self.assertEqual(clock.getDelayedCalls(), [])
        tuning.startService()
        tuning.pair_ended()
        tuning.pair_ended()
        clock.advance(1)
        self.assertEqual(calls, [1.0])
        tuning.pair_ended()
        tuning.stopService()
        clock.advance(5)
        self.assertEqual(calls, [1.0])
        self.assertEqual(tuning.trims, 1)

    def test_release_free_memory(self):
        import platform

        from tvm_rpc.proxy.tuning import release_free_memory

        self.assertEqual(release_free_memory(), platform.libc_ver()[0] == "glibc")

    def test_tune(self):
        import sys

        from tvm_rpc.proxy.tuning import tune_allocator

        applied = tune_allocator(256 * 1024)
        if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
            import platform

            if platform.libc_ver()[0] == "glibc":
                self.assertEqual(applied, (4 << 20, 16 << 20))


class OptionsTests(SynchronousTestCase):
    """L{tap.Options}."""

    def test_defaults_are_tvms(self):
        options = parse()
        self.assertEqual(options["host"], "127.0.0.1")
        self.assertEqual((options["port"], options["port-end"]), (9090, 9199))
        self.assertEqual(options["web-port"], 8888)
        self.assertEqual(options["timeout-client"], 600)
        self.assertEqual(options["timeout-server"], 600)
        self.assertIsNone(options["tracker-address"])
        self.assertEqual(options["listen"], [])

    def test_flags(self):
        options = parse("--host", "0.0.0.0", "--port", "9000", "--port-end", "9010",
                        "--web-port", "0", "--tracker", "tracker.lab:9190",
                        "--timeout-client", "5", "--timeout-server", "7.5",
                        "--handshake-timeout", "2", "--listen", "tcp:0",
                        "--listen", "unix:/tmp/x.sock")
        self.assertEqual(options["tracker-address"], ("tracker.lab", 9190))
        self.assertEqual(options["timeout-server"], 7.5)
        self.assertEqual(options["listen"], ["tcp:0", "unix:/tmp/x.sock"])
        self.assertEqual(parse("--tracker", "[::1]:9190")["tracker-address"], ("::1", 9190))

    def test_example_rpc_is_tvms_flag_refused_clearly(self):
        """TVM's --example-rpc parses; on, it stops at start as TVM 0.27's wheel does."""
        self.assertEqual(parse("--example-rpc", "")["example-rpc"], "")
        # Every flag of TVM 0.27's rpc_proxy parses.
        options = parse("--host", "127.0.0.1", "--port", "9300", "--port-end", "9310",
                        "--web-port", "0", "--tracker", "127.0.0.1:9190", "--example-rpc", "")
        self.assertEqual(options["tracker-address"], ("127.0.0.1", 9190))
        with self.assertRaises(usage.UsageError) as caught:
            parse("--example-rpc", "1")
        self.assertIn("web RPC example", str(caught.exception))

    def test_short_help(self):
        import contextlib
        import io

        out = io.StringIO()
        with self.assertRaises(SystemExit), contextlib.redirect_stdout(out):
            parse("-h")
        self.assertIn("--example-rpc", out.getvalue())

    def test_bad_values(self):
        for argv in (["--port", "9100", "--port-end", "9100"],
                     ["--port", "70000"],
                     ["--tracker", "nohost"],
                     ["--tracker", "host:notaport"],
                     ["--timeout-client", "0"],
                     ["--handshake-timeout", "-1"],
                     ["--listen", "bogus:thing"],
                     ["--relay-buffer", "10"],
                     ["--tracker", "127.0.0.1:9190", "--listen", "unix:/tmp/proxy.sock"]):
            self.assertRaises(usage.UsageError, parse, *argv)


class MakeServiceTests(SynchronousTestCase):
    """L{tap.makeService}."""

    def test_plugin(self):
        """twistd finds rpc-proxy (beside the other two daemons), with our Options."""
        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker)}
        self.assertLessEqual({"rpc-tracker", "rpc-proxy", "rpc-server"}, set(makers))
        self.assertIs(makers["rpc-proxy"].options, tap.Options)

    def test_plain_children(self):
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--web-port", "0", "--port", "9300", "--port-end", "9302"),
                              reactor)
        self.assertEqual([s.name for s in top], ["allocator", "rpc"])
        self.assertFalse(top.pool.tracker_mode)
        top.privilegedStartService()
        top.startService()
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers], [(9300, "127.0.0.1")])
        self.assertEqual(top.listener.port_number(), 9300)
        self.successResultOf(defer.maybeDeferred(top.stopService))

    def test_http_metrics(self):
        """--http (repeatable) adds a metrics listener sharing the pool's counters."""
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--web-port", "0", "--listen", "tcp:9300",
                                    "--http", "tcp:9180:interface=127.0.0.1",
                                    "--http", "tcp:9181"), reactor)
        self.assertEqual([s.name for s in top], ["allocator", "rpc", "http"])
        top.privilegedStartService()
        top.startService()
        self.assertEqual(sorted(p[0] for p in reactor.tcpServers), [9180, 9181, 9300])
        registry = reactor.tcpServers[-1][1].resource.getStaticEntity(b"metrics").registry
        top.pool.activity.connection_opened()
        self.assertEqual(registry.get_sample_value("tvm_rpc_proxy_connections"), 1)
        self.successResultOf(defer.maybeDeferred(top.stopService))
        with self.assertRaises(usage.UsageError):
            parse("--http", "nonsense:1")

    def test_first_free_port(self):
        reactor = BusyPortsReactor({9300, 9301})
        top = tap.makeService(parse("--web-port", "0", "--port", "9300", "--port-end", "9303"),
                              reactor)
        top.privilegedStartService()
        self.assertEqual([p[0] for p in reactor.tcpServers], [9302])

    def test_no_free_port_is_fatal(self):
        reactor = BusyPortsReactor({9300, 9301})
        top = tap.makeService(parse("--web-port", "0", "--port", "9300", "--port-end", "9302"),
                              reactor)
        self.assertRaises(CannotListenError, top.privilegedStartService)

    def test_listen_endpoints(self):
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--web-port", "0", "--listen", "tcp:9400:interface=127.0.0.1",
                                    "--listen", "tcp:9401"), reactor)
        top.privilegedStartService()
        self.assertEqual([p[0] for p in reactor.tcpServers], [9400, 9401])

    def test_web_and_tracker(self):
        reactor = MemoryReactorClock()
        top = tap.makeService(parse("--web-port", "9500", "--host", "127.0.0.1",
                                    "--tracker", "127.0.0.1:9190"), reactor)
        self.assertEqual([s.name for s in top], ["allocator", "rpc", "web", "tracker"])
        self.assertTrue(top.pool.tracker_mode)
        self.assertIs(top.pool.observer, top.getServiceNamed("tracker"))
        top.privilegedStartService()
        self.assertEqual([(p[0], p[3]) for p in reactor.tcpServers],
                         [(9090, "127.0.0.1"), (9500, "127.0.0.1")])
        top.startService()
        self.assertEqual([(c[0], c[1]) for c in reactor.tcpClients], [("127.0.0.1", 9190)])


class WithoutAutobahnTests(SynchronousTestCase):
    """autobahn is the [web] extra: a proxy without it serves everything but the websocket."""

    def setUp(self):
        real = tap.importlib.util.find_spec
        self.patch(tap.importlib.util, "find_spec",
                   lambda name, *a: None if name == "autobahn" else real(name, *a))

    def test_default_web_port_skipped_with_a_warning(self):
        from twisted.logger import capturedLogs, formatEvent

        options = parse("--port", "9300", "--port-end", "9302")
        self.assertEqual(options["web-port"], 8888)
        with capturedLogs() as events:
            top = tap.makeService(options, MemoryReactorClock())
        self.assertEqual([s.name for s in top], ["allocator", "rpc"])
        self.assertIn("pip install 'tvm_rpc[web]'", " ".join(formatEvent(e) for e in events))

    def test_explicit_web_port_refused_clearly(self):
        error = self.assertRaises(usage.UsageError, parse, "--web-port", "8888")
        self.assertIn("pip install 'tvm_rpc[web]'", str(error))
        self.assertEqual(parse("--web-port", "0")["web-port"], 0)


@attrs.define(eq=False)
class FakeTracker:
    """
    Plays a tracker for the registration over in-memory transports.

    @ivar connections: per connection: its transport, decoder, the messages
        it sent and its pending matchkeys.
    """

    connections: list = attrs.field(factory=list)
    handed_out: set = attrs.field(factory=set)

    def connect(self, factory):
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        entry = {"transport": transport, "protocol": protocol, "messages": [],
                 "decoder": FrameDecoder(expect_magic=True), "pending": []}
        self.connections.append(entry)
        protocol.dataReceived(INT32.pack(RPC_TRACKER_MAGIC))
        self.serve(entry)
        return defer.succeed(protocol)

    def serve(self, entry):
        """Answer what one connection sent."""
        data = entry["transport"].value()
        entry["transport"].clear()
        for message in entry["decoder"].feed(data):
            entry["messages"].append(message)
            code = message[0]
            if code == 3:
                entry["pending"].append(message[2][1])
                reply = 0
            elif code == 7:
                reply = [k for k in entry["pending"] if k not in self.handed_out]
            else:
                reply = 0
            entry["protocol"].dataReceived(encode_frame(reply))

    def serve_all(self):
        """Answer every open connection until none has anything more to say."""
        while any(e["transport"].value() for e in self.open()):
            for entry in self.open():
                self.serve(entry)

    def open(self):
        return [e for e in self.connections if not e["transport"].disconnecting]

    def close(self, entry):
        entry["transport"].loseConnection()
        entry["protocol"].connectionLost(None)


class FakePeer:
    """A connection waiting in the pool."""

    def accept(self, key):
        self.accepted = key

    def join(self, partner):
        pass

    def refuse(self, code, reason):
        self.refused = code


class RegistrationTests(SynchronousTestCase):
    """L{ProxyRegistration} against a scripted tracker."""

    def setUp(self):
        self.clock = MemoryReactorClock()
        self.tracker = FakeTracker()
        self.pool = PairingPool(self.clock, tracker_mode=True)
        self.registration = ProxyRegistration(self.tracker, self.pool, self.clock, lambda: 9090)
        self.pool.observer = self.registration
        self.registration.startService()

    def info_keys(self):
        """@return: the proxy's own UPDATE_INFO keys, in the order sent."""
        keys = []
        for entry in self.tracker.connections:
            for message in entry["messages"]:
                if message[0] == 5 and message[1]["key"].startswith("server:proxy"):
                    keys.append(message[1]["key"])
        return keys

    def test_reports_proxy_and_puts_each_server(self):
        self.tracker.serve_all()
        self.assertEqual(self.info_keys(), ["server:proxy[]"])
        self.pool.arrive(FakePeer(), "server:rasp")
        self.pool.arrive(FakePeer(), "server:jetson")
        self.tracker.serve_all()
        links = self.tracker.open()[1:]
        self.assertEqual(len(links), 2)
        self.assertEqual(links[0]["messages"][0],
                         [5, {"key": PROXY_ENTRY_PREFIX + "rasp", "addr": [None, 9090]}])
        put = links[0]["messages"][1]
        self.assertEqual(put[:2], [3, "rasp"])
        self.assertEqual(put[2], [9090, self.pool.offers()[0].matchkey])
        self.assertIsNone(put[3])
        self.assertEqual(self.info_keys()[-1], proxy_info_key(["jetson", "rasp"]))
        self.assertEqual(proxy_info_key(["a", "b"]), "server:proxy[a,b]")

    def test_server_leaving_closes_its_link(self):
        peer = FakePeer()
        self.pool.arrive(peer, "server:rasp")
        self.tracker.serve_all()
        link = self.tracker.connections[1]
        self.pool.leave(peer)
        self.assertTrue(link["transport"].disconnecting)
        self.tracker.serve_all()
        self.assertEqual(self.info_keys()[-1], "server:proxy[]")
        self.assertEqual(self.registration.links(), 0)

    def test_pairing_closes_the_link(self):
        self.pool.arrive(FakePeer(), "server:rasp")
        self.tracker.serve_all()
        link = self.tracker.connections[1]
        matchkey = self.pool.offers()[0].matchkey
        client = FakePeer()
        self.assertEqual(self.pool.arrive(client, f"client:{matchkey}"), "paired")
        self.assertTrue(link["transport"].disconnecting)

    def test_unused_matchkey_renewed_with_real_key(self):
        self.pool.arrive(FakePeer(), "server:my:key")
        self.tracker.serve_all()
        link = self.tracker.connections[1]
        first = self.pool.offers()[0].matchkey
        self.tracker.handed_out.add(first)
        for _ in range(4):
            self.clock.advance(2)
            self.tracker.serve_all()
        second = self.pool.offers()[0].matchkey
        self.assertNotEqual(first, second)
        puts = [m for m in link["messages"] if m[0] == 3]
        self.assertEqual([p[1] for p in puts], ["my:key", "my:key"])
        self.assertEqual([p[2][1] for p in puts], [first, second])
        self.assertTrue(second.startswith("my:key:"))

    def test_pending_matchkey_not_renewed(self):
        self.pool.arrive(FakePeer(), "server:rasp")
        self.tracker.serve_all()
        first = self.pool.offers()[0].matchkey
        for _ in range(6):
            self.clock.advance(2)
            self.tracker.serve_all()
        self.assertEqual(self.pool.offers()[0].matchkey, first)

    def test_tracker_restart_reregisters(self):
        self.pool.arrive(FakePeer(), "server:rasp")
        self.tracker.serve_all()
        first = self.pool.offers()[0].matchkey
        for entry in list(self.tracker.open()):
            self.tracker.close(entry)
        self.assertEqual(self.tracker.open(), [])
        self.clock.advance(10)
        self.tracker.serve_all()
        self.assertEqual(len(self.tracker.open()), 2)
        second = self.pool.offers()[0].matchkey
        self.assertNotEqual(first, second)
        puts = [m for e in self.tracker.open() for m in e["messages"] if m[0] == 3]
        self.assertEqual([p[2][1] for p in puts], [second])
        self.assertEqual(self.info_keys()[-1], "server:proxy[rasp]")

    def test_stop_closes_everything(self):
        self.pool.arrive(FakePeer(), "server:rasp")
        self.tracker.serve_all()
        self.registration.stopService()
        self.assertEqual(self.tracker.open(), [])


def test_frames_are_json():
    """The fake tracker decodes exactly what the registration encodes."""
    assert json.loads(encode_frame([5, {"key": "x"}])[4:]) == [5, {"key": "x"}]
