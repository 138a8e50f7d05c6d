"""The session client (RPCSession and the remote objects) against the real session server, in memory."""

import array
import gc
import io
import math
import os
import random
import shutil
import socket
import tempfile

import numpy
from hypothesis import given
from hypothesis import strategies as st
import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from tests.session_behaviour import MODULE, SessionBehaviour
from tvm_rpc.client import amp_engine, host_arrays
from tvm_rpc.client.amp_engine import AMPEngine
from tvm_rpc.client.amp_protocol import make_client_protocol
from tvm_rpc.client.devices import Device
from tvm_rpc.client.engine import ISessionEngine
from tvm_rpc.client.host_arrays import host_array, unpack
from tvm_rpc.client.remote import RemoteFunction, TimeEvaluatorResult
from tvm_rpc.client.rpc_session import CLOSE_TIMEOUT, RPCSession
from tvm_rpc.client.session import HELLO_TIMEOUT, open_session, start_session
from tvm_rpc.client.session_errors import (
    ProtocolMismatch,
    SessionClosed,
    SessionLostAtStart,
    SessionTimeout,
)
from tvm_rpc.protocol import session_commands, values
from tvm_rpc.protocol.evaluator_options import TIME_EVALUATOR_OPTIONS
from tvm_rpc.protocol.remote_error import RemoteError
from tvm_rpc.server.environment import SessionEnvironment
from tvm_rpc.server.limits import SessionSettings
from tvm_rpc.server.registry import Registry
from tvm_rpc.server.session import SessionProtocol, timeout_notice

pytestmark = pytest.mark.unit


def _fill(target, value):
    target[...] = value


def _scale(source, target, factor):
    target[...] = source * factor


class FakeTimer:
    """A timer for the server's time_evaluator: returns the given instants in turn."""

    def __init__(self, instants):
        self._instants = iter(instants)

    def __call__(self):
        return next(self._instants)


class SessionTestBase(SynchronousTestCase):
    """A client RPCSession connected in memory to a real SessionProtocol."""

    timer_instants = ()
    #: The server's session settings.
    settings = SessionSettings()
    #: Keyword arguments for start_session (client options).
    session_options = {}

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.registry = Registry()
        self.registry.register("add", lambda a, b: a + b)
        self.registry.register("echo", lambda *args: list(args))
        self.registry.register("boom", lambda: 1 / 0)
        self.registry.register("fill", _fill)
        self.registry.register("scale", _scale)
        self.registry.register("total", lambda source: float(source.sum()))
        self.registry.register("apply", lambda function, value: function(value))
        self.registry.register("make_adder", lambda n: (lambda x: x + n))
        self.registry.register("noop", lambda *args: None)
        self.registry.register("big", lambda n: b"z" * n)
        self.clock = Clock()
        environment = SessionEnvironment.create(
            self.root, self.registry, backend_name="numpy", settings=self.settings,
            **({"timer": FakeTimer(self.timer_instants)} if self.timer_instants else {}),
        )
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: SessionProtocol(self.root, self.registry, clock=self.clock,
                                    environment=environment),
            make_client_protocol,
            clock=self.clock,
        )
        self.commands_seen = []
        receive = self.server.ampBoxReceived

        def spy(box):
            self.commands_seen.append(box.get(b"_command"))
            return receive(box)

        self.server.ampBoxReceived = spy
        opening = start_session(self.client, clock=self.clock, **self.session_options)
        self.pump.flush()
        self.session = self.successResultOf(opening)

    def resolve(self, deferred):
        """Pump until C{deferred} fires; @return: its result (fails the test on an error)."""
        self.pump.flush()
        return self.successResultOf(deferred)

    def failure(self, deferred, *types):
        """Pump until C{deferred} fails; @return: the Failure."""
        self.pump.flush()
        return self.failureResultOf(deferred, *types)

    @property
    def environment(self):
        """The server's session environment."""
        return self.server.environment

    def count(self, command):
        """@return: how many C{command} boxes the server received."""
        return self.commands_seen.count(command.__name__.encode())


class OpeningTests(SessionTestBase):
    """The Hello exchange."""

    def test_session_opened(self):
        """start_session gives an RPCSession with the server's transfer parameters."""
        self.assertIsInstance(self.session, RPCSession)
        self.assertEqual(self.session.chunk_size, session_commands.CHUNK_SIZE)
        self.assertEqual(self.session.window, session_commands.WINDOW)
        self.assertIn("tvm_rpc", self.session.server_implementation)
        self.assertFalse(self.session.closed)
        self.assertEqual(self.count(session_commands.Hello), 1)

    def test_engine(self):
        """The session runs on an AMPEngine (behind LocatedEngine), a whole ISessionEngine."""
        engine = self.session._engine.engine
        self.assertIsInstance(engine, AMPEngine)
        self.assertTrue(verifyObject(ISessionEngine, engine))
        self.assertEqual(self.session.protocol, "tvm_rpc")
        self.assertIs(self.session.connection, engine.connection)


class InMemorySessionTests(SessionBehaviour, SessionTestBase):
    """
    The session behaviours (L{SessionBehaviour}) with client and server on
    in-memory transports; C{tests/test_session_forked.py} runs them against a
    real server. What only memory shows (commands counted, the server's
    state) is checked on top.
    """

    def session_dir(self):
        return self.environment.work_dir.root

    def server_root(self):
        return self.root

    def connected(self):
        return not self.client.lost

    def test_module_time_evaluator(self):
        """The function is looked up once, lazily."""
        super().test_module_time_evaluator()
        self.assertEqual(self.count(session_commands.ModuleGetFunction), 1)

    def test_close(self):
        """The server's environment is closed after one Goodbye."""
        super().test_close()
        self.assertTrue(self.environment.closed)
        self.assertEqual(self.count(session_commands.Goodbye), 1)


class HelloFailureTests(SynchronousTestCase):
    """A peer that is not a tvm_rpc session server gives ProtocolMismatch, never a hang."""

    def setUp(self):
        self.clock = Clock()
        self.protocol = make_client_protocol()
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.opening = start_session(self.protocol, clock=self.clock)

    def test_silent_peer(self):
        """No answer within the Hello timeout: mismatch, connection closed."""
        self.assertNoResult(self.opening)
        self.clock.advance(HELLO_TIMEOUT)
        failure = self.failureResultOf(self.opening, ProtocolMismatch)
        self.assertIn("not a tvm_rpc session server", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_wrong_protocol(self):
        """An answer naming another protocol or version: mismatch, connection closed."""
        answer = amp.AmpBox(
            _answer=b"1", protocol=b"other", version=b"7", implementation=b"x",
            chunk_size=b"100", window=b"2", max_inline_value=b"100",
        )
        self.protocol.dataReceived(answer.serialize())
        failure = self.failureResultOf(self.opening, ProtocolMismatch)
        self.assertIn("'other' version 7", str(failure.value))
        self.assertTrue(self.transport.disconnecting)

    def test_peer_closes(self):
        """
        The peer closes instead of answering: a mismatch that is also a lost
        session (the server may have died after the handshake), so
        request() tries another server.
        """
        self.protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(self.opening, ProtocolMismatch)
        self.assertIsInstance(failure.value, SessionClosed)
        self.assertIsInstance(failure.value, SessionLostAtStart)
        self.assertIn("lost before the answer", str(failure.value))

    def test_cancel(self):
        """Cancelling the opening closes the connection."""
        self.opening.cancel()
        self.failureResultOf(self.opening, CancelledError)
        self.assertTrue(self.transport.disconnecting)


class CarrierTests(SynchronousTestCase):
    """open_session: how connect() hands a handshaken connection over."""

    def test_switch_and_rest(self):
        """The carrier switches to a session protocol given the early bytes."""
        switched = []

        class Carrier:
            def switch_to(self, protocol, rest=b""):
                switched.append((protocol, rest))
                protocol.makeConnection(StringTransport())
                if rest:
                    protocol.dataReceived(rest)

        answer = amp.AmpBox(
            _answer=b"1", protocol=session_commands.SESSION_PROTOCOL.encode(),
            version=str(session_commands.SESSION_VERSION).encode(), implementation=b"test",
            chunk_size=b"1000", window=b"4", max_inline_value=b"1000",
        ).serialize()
        opening = open_session(Carrier(), b"", reactor=Clock(), session_timeout=7,
                               address="h:1")
        protocol, _ = switched[0]
        protocol.dataReceived(answer)
        session = self.successResultOf(opening)
        self.assertIs(session.connection, protocol)
        self.assertEqual(session.protocol, "tvm_rpc")
        self.assertEqual((session.address, session.session_timeout), ("h:1", 7))
        self.assertEqual((session.chunk_size, session.window), (1000, 4))


class FunctionTests(SessionTestBase):
    """Global functions, calls, errors, handles."""

    def test_values_round_trip(self):
        """Plain values of every kind come back as sent."""
        sent = [None, True, -7, 2.5, "é", b"\x00\xff", [1, [2]], (3, 4), {"k": {1: b"v"}}]
        self.assertEqual(self.resolve(self.session.call("echo", *sent)), sent)

    def test_large_arguments_and_result(self):
        """Arguments and results beyond the inline limit travel through streams."""
        blob = bytes(range(256)) * 1000
        self.assertEqual(self.resolve(self.session.call("echo", blob)), [blob])
        self.assertEqual(self.count(session_commands.OpenValue), 1)
        self.assertGreater(self.count(session_commands.StreamRead), 0)

    def test_small_call_large_result(self):
        """A result beyond the inline limit is read from its stream and released."""
        big = self.resolve(self.session.get_function("big"))
        self.assertEqual(self.resolve(big(300_000)), b"z" * 300_000)
        self.assertEqual(self.count(session_commands.OpenValue), 0)
        self.assertGreater(self.count(session_commands.StreamRead), 0)
        self.assertEqual(len(self.environment.streams), 0)

    def test_unknown_function(self):
        """get_function of a missing name fails with RemoteError naming NoSuchFunction."""
        failure = self.failure(self.session.get_function("missing"), RemoteError)
        self.assertIn("NoSuchFunction", failure.value.type_name)
        self.assertIn("missing", failure.value.message)

    def test_many_calls_in_flight(self):
        """Many calls sent before any answer all complete, each with its own result."""
        add = self.resolve(self.session.get_function("add"))
        calls = [add(i, 1000) for i in range(100)]
        for call in calls:
            self.assertNoResult(call)
        self.pump.flush()
        self.assertEqual([self.successResultOf(call) for call in calls],
                         [i + 1000 for i in range(100)])

    def test_function_arguments_and_results(self):
        """RemoteFunctions pass as arguments; functions returned become RemoteFunctions."""
        add_five = self.resolve(self.session.call("make_adder", 5))
        self.assertIsInstance(add_five, RemoteFunction)
        self.assertEqual(self.resolve(add_five(1)), 6)
        self.assertEqual(self.resolve(self.session.call("apply", add_five, 10)), 15)

    def test_released_when_collected(self):
        """A RemoteFunction that is garbage-collected releases its handle (a Free)."""
        function = self.resolve(self.session.get_function("add"))
        handles = len(self.environment)
        del function
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.count(session_commands.Free), 1)
        self.assertEqual(len(self.environment), handles - 1)

    def test_releases_batched(self):
        """Handles dropped together go out in Free commands of at most FREE_BATCH ids."""
        self.patch(amp_engine, "FREE_BATCH", 3)
        functions = [self.resolve(self.session.get_function("add")) for _ in range(7)]
        handles = len(self.environment)
        del functions
        gc.collect()
        self.pump.flush()
        self.assertEqual(self.count(session_commands.Free), 3)
        self.assertEqual(len(self.environment), handles - 7)

    def test_close_releases(self):
        """close() on a handle releases it once."""
        function = self.resolve(self.session.get_function("add"))
        handles = len(self.environment)
        function.close()
        function.close()
        self.assertTrue(function.closed)
        self.failureResultOf(function(1, 2), ValueError)
        self.pump.flush()
        self.assertEqual(len(self.environment), handles - 1)
        self.assertEqual(self.count(session_commands.Free), 1)

    def test_foreign_handle_refused(self):
        """A handle of another session is refused locally."""
        other = RPCSession(AMPEngine(make_client_protocol(), self.clock))
        stranger = RemoteFunction(other, "x", handle=99)
        failure = self.failure(self.session.call("apply", stranger, 1), ValueError)
        self.assertIn("another session", str(failure.value))


class ManySessionsTests(SynchronousTestCase):
    """Several sessions share one clock (one reactor), their calls interleaved."""

    def test_interleaved(self):
        """Calls on three sessions, all in flight at once, each get their own answers."""
        clock = Clock()
        registry = Registry()
        registry.register("tag", lambda tag, i: f"{tag}:{i}")
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        pumps, sessions = [], []
        for _ in range(3):
            client, server, pump = connectedServerAndClient(
                lambda: SessionProtocol(root, registry, clock=clock, backend="python"),
                make_client_protocol, clock=clock,
            )
            opening = start_session(client, clock=clock)
            pump.flush()
            pumps.append(pump)
            sessions.append(self.successResultOf(opening))
        calls = [(n, i, session.call("tag", f"s{n}", i))
                 for i in range(20) for n, session in enumerate(sessions)]
        for _ in range(50):
            for pump in pumps:
                pump.pump()
        for n, i, call in calls:
            self.assertEqual(self.successResultOf(call), f"s{n}:{i}")
        for session in sessions:
            session.close()
        for pump in pumps:
            pump.flush()
        self.assertTrue(all(session.closed for session in sessions))


class FileTests(SessionTestBase):
    """Uploads and downloads in chunks, bounded, cancellable."""

    SIZE = 5 * 1024 * 1024 + 123

    def setUp(self):
        super().setUp()
        self.blob = random.Random(3).randbytes(self.SIZE)
        self.local = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.local, True)

    def record_writes(self, io):
        """@return: the list of byte counts C{io} sends per pump step."""
        sizes = []
        original = io.getOutBuffer

        def counting():
            data = original()
            sizes.append(len(data or b""))
            return data

        io.getOutBuffer = counting
        return sizes

    def chunk_sizes(self):
        """Record the length of every StreamWrite chunk the server receives."""
        chunks = []
        receive = self.server.ampBoxReceived

        def spy(box):
            if box.get(b"_command") == b"StreamWrite":
                chunks.append(sum(len(value) for key, value in box.items()
                                  if key == b"data" or key.startswith(b"data.")))
            return receive(box)

        self.server.ampBoxReceived = spy
        return chunks

    def bound(self):
        """The most bytes one side may have in flight on one transfer, with framing."""
        return self.session.window * (self.session.chunk_size + 200)

    def test_upload_download_round_trip(self):
        """Bytes uploaded in bounded chunks come back byte-exact."""
        chunks = self.chunk_sizes()
        sent = self.record_writes(self.pump.clientIO)
        size = self.resolve(self.session.upload(self.blob, "data/blob.bin"))
        self.assertEqual(size, self.SIZE)
        self.assertEqual(len(chunks), math.ceil(self.SIZE / self.session.chunk_size))
        self.assertLessEqual(max(chunks), self.session.chunk_size)
        self.assertLessEqual(max(sent), self.bound())
        with open(os.path.join(self.environment.work_dir.root, "data", "blob.bin"), "rb") as f:
            self.assertEqual(f.read(), self.blob)

        received = self.record_writes(self.pump.serverIO)
        self.assertEqual(self.resolve(self.session.download("data/blob.bin")), self.blob)
        self.assertLessEqual(max(received), self.bound())
        self.assertEqual(len(self.environment.streams), 0)

    def test_transfers_and_calls_interleave(self):
        """Calls answer while an upload and a download are under way on the same session."""
        self.resolve(self.session.upload(self.blob, "first.bin"))
        uploading = self.session.upload(self.blob, "second.bin")
        downloading = self.session.download("first.bin")
        calls = [self.session.call("add", i, i) for i in range(10)]
        self.pump.pump()
        self.pump.pump()
        self.pump.pump()
        self.assertEqual([self.successResultOf(call) for call in calls],
                         [2 * i for i in range(10)])
        self.assertNoResult(uploading)
        self.assertNoResult(downloading)
        self.assertEqual(self.resolve(uploading), self.SIZE)
        self.assertEqual(self.successResultOf(downloading), self.blob)

    def test_cancel_upload(self):
        """Cancelling an upload stops it; the server keeps no file and no stream."""
        uploading = self.session.upload(self.blob, "big.bin")
        for _ in range(4):
            self.pump.pump()
        self.assertNoResult(uploading)
        uploading.cancel()
        self.failure(uploading, CancelledError)
        self.assertEqual(os.listdir(self.environment.work_dir.root), [])
        self.assertEqual(len(self.environment.streams), 0)
        self.assertLess(self.count(session_commands.StreamWrite),
                        math.ceil(self.SIZE / self.session.chunk_size))
        self.assertEqual(self.resolve(self.session.call("add", 2, 2)), 4)

    def test_cancel_download_to_file(self):
        """Cancelling a download leaves no local file and releases the server's stream."""
        self.resolve(self.session.upload(self.blob, "big.bin"))
        target = os.path.join(self.local, "out.bin")
        downloading = self.session.download("big.bin", local_path=target)
        for _ in range(4):
            self.pump.pump()
        self.assertNoResult(downloading)
        downloading.cancel()
        self.failure(downloading, CancelledError)
        self.assertEqual(os.listdir(self.local), [])
        self.assertEqual(len(self.environment.streams), 0)

    def test_cancel_before_open_answer(self):
        """A transfer cancelled before its stream opens closes the stream when it does."""
        uploading = self.session.upload(b"x" * 100, "small.bin")
        uploading.cancel()
        self.failureResultOf(uploading, CancelledError)
        self.pump.flush()
        self.assertEqual(len(self.environment.streams), 0)
        self.assertEqual(os.listdir(self.environment.work_dir.root), [])

    def test_upload_bytes_needs_target(self):
        """Bytes without a target path are refused locally."""
        self.failureResultOf(self.session.upload(b"abc"), ValueError)


class ModuleTests(SessionTestBase):
    """Loading a .py module and calling its functions."""

    def setUp(self):
        super().setUp()
        self.resolve(self.session.upload(MODULE, "lib/mod.py"))
        self.module = self.resolve(self.session.load_module("lib/mod.py"))

    def test_lazy_function_resolves_once(self):
        """Concurrent first calls of a lazy function share one lookup."""
        lazy = self.module["double"]
        self.assertIsNone(lazy.handle)
        calls = [lazy(i) for i in range(5)]
        self.pump.flush()
        self.assertEqual([self.successResultOf(call) for call in calls], [0, 2, 4, 6, 8])
        self.assertEqual(self.count(session_commands.ModuleGetFunction), 1)
        self.assertIsNotNone(lazy.handle)

    def test_lazy_lookup_failure_then_retry(self):
        """A lazy function naming nothing fails each call with a RemoteError."""
        missing = self.module["absent"]
        self.failure(missing(1), RemoteError)
        self.failure(missing(1), RemoteError)
        self.assertEqual(self.count(session_commands.ModuleGetFunction), 2)

class DeviceTests(SessionTestBase):
    """Devices by name and number."""

    def test_names_and_numbers(self):
        """Names, aliases, 'type:index' and TVM's numbers all resolve."""
        self.assertEqual(self.session.device("cuda", 1).device_type, 2)
        self.assertEqual(self.session.device("cuda:3").index, 3)
        self.assertEqual(self.session.device(4).name, "opencl")
        self.assertEqual(self.session.cl(), self.session.device("opencl"))
        self.assertEqual(self.session.device("llvm"), self.session.cpu(0))
        self.assertEqual(self.session.cuda(2), Device(self.session, 2, 2))
        self.assertRaises(ValueError, self.session.device, "abacus")
        self.assertRaises(ValueError, self.session.device, 0)

    def test_exists(self):
        """cpu exists; cuda does not on a numpy-backed server."""
        self.assertTrue(self.resolve(self.session.cpu().exists()))
        self.assertFalse(self.resolve(self.session.cuda().exists()))
        self.assertIsNone(self.resolve(self.session.cpu().sync()))

    def test_errors_wait_for_errbacks(self):
        """Errors answered before the caller looks do not cost the connection."""
        calls = [self.session.cuda().sync(), self.session.call("boom"),
                 self.resolve(self.session.get_function("boom"))()]
        self.pump.flush()
        self.assertFalse(self.client.lost)
        for call in calls:
            self.failureResultOf(call, RemoteError)
        self.assertTrue(self.resolve(self.session.cpu().exists()))


class ArrayTests(SessionTestBase):
    """Remote arrays: allocate, fill, pass, read back."""

    def test_big_array_in_chunks(self):
        """An array of several chunks round-trips byte-exact."""
        host = numpy.random.default_rng(1).standard_normal((512, 700)).astype("float64")
        remote_array = self.resolve(self.session.array(host))
        self.assertEqual(self.count(session_commands.StreamWrite),
                         math.ceil(host.nbytes / self.session.chunk_size))
        self.assertGreater(self.count(session_commands.StreamWrite), 1)
        numpy.testing.assert_array_equal(self.resolve(remote_array.numpy()), host)
        self.assertEqual(len(self.environment.streams), 0)

    def test_empty_filled_by_function(self):
        """Destination-passing: a remote function writes into an empty array."""
        out = self.resolve(self.session.empty((2, 3), "int32", self.session.cpu(0)))
        self.resolve(self.session.call("fill", out, 7))
        numpy.testing.assert_array_equal(self.resolve(out.numpy()), numpy.full((2, 3), 7))
        source = self.resolve(self.session.array(numpy.ones(4, dtype="float32")))
        target = self.resolve(self.session.empty(4, "float32"))
        scale = self.resolve(self.session.get_function("scale"))
        self.resolve(scale(source, target, 2.5))
        self.assertEqual(self.resolve(target.tolist()), [2.5] * 4)

    def test_host_arrays_as_arguments(self):
        """A numpy array argument is sent inline and arrives as an array."""
        self.assertEqual(self.resolve(self.session.call("total", numpy.arange(5.0))), 10.0)

    def test_copyfrom(self):
        """copyfrom converts to the array's dtype and checks the shape."""
        target = self.resolve(self.session.empty((2, 2), "float32"))
        self.assertIs(self.resolve(target.copyfrom([[1, 2], [3, 4]])), target)
        self.assertEqual(self.resolve(target.tolist()), [[1.0, 2.0], [3.0, 4.0]])
        self.failure(target.copyfrom(numpy.zeros((4, 1))), ValueError)
        self.failure(target.copyfrom([1, 2, 3]), ValueError)

    def test_bad_dtype_and_closed(self):
        """A bad dtype fails locally; a closed array is released on the server."""
        self.failureResultOf(self.session.empty((2,), "complex7"), ValueError)
        target = self.resolve(self.session.empty((2,), "float32"))
        handles = len(self.environment)
        target.close()
        self.pump.flush()
        self.assertEqual(len(self.environment), handles - 1)


class TimeEvaluatorTests(SessionTestBase):
    """time_evaluator statistics, from a server timer that is under the test's control."""

    # Start/stop pairs of three repeats (the warm-up call is not timed).
    timer_instants = (0.0, 0.004, 1.0, 1.006, 2.0, 2.002)

    def test_statistics(self):
        """The result carries per-repeat means and their statistics."""
        evaluator = self.session.time_evaluator("noop", self.session.cpu(0), number=2, repeat=3)
        result = self.resolve(evaluator(1, 2))
        self.assertIsInstance(result, TimeEvaluatorResult)
        for got, expected in zip(result.results, (0.002, 0.003, 0.001)):
            self.assertAlmostEqual(got, expected)
        self.assertAlmostEqual(result.mean, 0.002)
        self.assertAlmostEqual(result.median, 0.002)
        self.assertAlmostEqual(result.min, 0.001)
        self.assertAlmostEqual(result.max, 0.003)
        self.assertAlmostEqual(result.std, math.sqrt(2 / 3) * 0.001)
        self.assertIn("mean (ms)", str(result))

    def test_bad_parameters(self):
        """number or repeat below 1 are refused at once."""
        self.assertRaises(ValueError, self.session.time_evaluator, "noop", "cpu", number=0)
        self.assertRaises(ValueError, self.session.time_evaluator, "noop", "cpu", repeat=0)

    def test_bad_options_refused_at_once(self):
        """TVM's options are checked on the client before anything is sent."""
        for bad in ({"repeats_to_cooldown": 0}, {"cooldown_interval_ms": -1},
                    {"cache_flush_bytes": -4}, {"limit_zero_time_iterations": -1},
                    {"f_preproc": None}):
            with self.assertRaises(ValueError) as raised:
                self.session.time_evaluator("noop", "cpu", **bad)
            self.assertIn(next(iter(bad)), str(raised.exception))
        self.assertEqual(self.count(session_commands.TimeEvaluator), 0)


class TimeEvaluatorOptionsTests(SessionTestBase):
    """TVM's time_evaluator options, honoured by our server for a Python function."""

    # Warm-up is untimed; then start/stop pairs of four repeats of one call.
    timer_instants = (0.0, 0.001, 1.0, 1.002, 2.0, 2.003, 3.0, 3.004)

    def setUp(self):
        super().setUp()
        self.preprocessed = []
        self.registry.register("note", lambda *args: self.preprocessed.append(args))
        self.sleeps = []
        self.environment.sleep = self.sleeps.append
        self.boxes = []
        receive = self.server.ampBoxReceived

        def keep(box):
            self.boxes.append(dict(box))
            return receive(box)

        self.server.ampBoxReceived = keep

    def time_evaluator_box(self):
        """@return: the one TimeEvaluator box the server received."""
        [box] = [box for box in self.boxes if box.get(b"_command") == b"TimeEvaluator"]
        return box

    def test_options_reach_the_server(self):
        """Cooldown, repeats_to_cooldown, f_preproc and cache flush act on the server."""
        evaluator = self.session.time_evaluator(
            "noop", "cpu", number=1, repeat=4, cooldown_interval_ms=7, repeats_to_cooldown=3,
            cache_flush_bytes=1024, f_preproc="note")
        result = self.resolve(evaluator(5, 6))
        for got, expected in zip(result.results, (0.001, 0.002, 0.003, 0.004)):
            self.assertAlmostEqual(got, expected)
        self.assertEqual(self.preprocessed, [(5, 6)] * 4)
        self.assertEqual(self.sleeps, [0.007, 0.007])
        [sent] = session_commands.TimeEvaluator.parseArguments(
            amp.AmpBox(self.time_evaluator_box()), None)["options"]
        self.assertEqual(sent, {"cooldown_interval_ms": 7, "repeats_to_cooldown": 3,
                                "cache_flush_bytes": 1024, "f_preproc": "note",
                                "limit_zero_time_iterations": None})

    def test_defaults_are_not_sent(self):
        """TVM's defaults stay off the wire: the request is what older servers know."""
        self.resolve(self.session.time_evaluator("noop", "cpu", number=1, repeat=4)())
        box = self.time_evaluator_box()
        self.assertNotIn(b"options", box)
        for option in TIME_EVALUATOR_OPTIONS:
            self.assertNotIn(option.encode(), box)
        self.assertEqual(self.sleeps, [])

    def test_unknown_preproc(self):
        """An f_preproc that names no function fails the evaluation, naming it."""
        failure = self.failure(
            self.session.time_evaluator("noop", "cpu", f_preproc="no.such.flush")(), RemoteError)
        self.assertEqual(failure.value.short_type_name, "ValueError")
        self.assertIn("no.such.flush", str(failure.value))
        self.assertEqual(self.preprocessed, [])


class TimeEvaluatorFunctionTests(SessionTestBase):
    """time_evaluator of a RemoteFunction."""

    timer_instants = (10.0, 10.5)

    def test_remote_function(self):
        """A RemoteFunction handle is timed by handle."""
        noop = self.resolve(self.session.get_function("noop"))
        result = self.resolve(self.session.time_evaluator(noop, "cpu", number=5)())
        self.assertEqual(len(result.results), 1)
        self.assertAlmostEqual(result.mean, 0.1)


class ClosingTests(SessionTestBase):
    """Ending sessions: close(), async with, lost connections, server notices."""

    def test_async_with(self):
        """async with closes the session on the way out, also after an error."""

        async def use():
            async with self.session as session:
                return await session.call("add", 20, 22)

        self.assertEqual(self.resolve(Deferred.fromCoroutine(use())), 42)
        self.assertTrue(self.client.lost)

        async def fail_inside():
            async with self.session:
                raise KeyError("inside")

        self.failure(Deferred.fromCoroutine(fail_inside()), KeyError)

    def test_unanswered_close(self):
        """A server that never answers Goodbye is dropped after the close timeout."""
        closing = self.session.close()
        self.assertNoResult(closing)
        self.clock.advance(CLOSE_TIMEOUT)
        self.pump.flush(advanceClock=False)
        self.successResultOf(closing)

    def test_connection_lost(self):
        """Outstanding calls fail with SessionClosed (a ConnectionLost) when the connection goes."""
        calling = self.session.call("add", 1, 2)
        self.client.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(calling, SessionClosed)
        self.assertIsInstance(failure.value, ConnectionLost)
        self.assertTrue(self.session.closed)
        self.successResultOf(self.session.when_closed())

    def test_dropped_session_closes(self):
        """A session garbage-collected without close() closes its connection."""
        self.session = None
        gc.collect()
        self.pump.flush()
        self.assertTrue(self.client.lost)
        self.assertTrue(self.environment.closed)


class SessionEndedTests(SynchronousTestCase):
    """The server's SessionEnded notice turns into SessionTimeout."""

    def test_timeout_notice(self):
        """Outstanding calls fail with SessionTimeout carrying the server's sentence."""
        protocol = make_client_protocol()
        protocol.makeConnection(StringTransport())
        session = RPCSession(AMPEngine(protocol, Clock()))
        calling = session.call("slow")
        protocol.dataReceived(timeout_notice(5))
        protocol.connectionLost(Failure(ConnectionDone()))
        failure = self.failureResultOf(calling, SessionTimeout)
        self.assertIn("timed out after 5 s", str(failure.value))
        self.failureResultOf(session.call("again"), SessionTimeout)


class RawAnswerTests(SynchronousTestCase):
    """Call answers read from raw boxes (the quick path) as callRemote would read them."""

    def setUp(self):
        self.protocol = make_client_protocol()
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self.clock = Clock()
        self.session = RPCSession(AMPEngine(self.protocol, self.clock))

    def answer(self, **fields):
        """Feed the answer box to call 1."""
        self.protocol.dataReceived(amp.AmpBox(**fields).serialize())

    def sent(self):
        """@return: the boxes written since the last call, and forget them."""
        boxes = amp.parse(io.BytesIO(self.transport.value()))
        self.transport.clear()
        return boxes

    def test_cancelled_call_closes_its_result_stream(self):
        """The late answer of a cancelled call carries a stream: it is closed on the server."""
        calling = self.session.call("big")
        calling.cancel()
        self.failureResultOf(calling, CancelledError)
        self.transport.clear()
        self.answer(_answer=b"1", result_stream=b"7", result_size=b"123456")
        [box] = self.sent()
        self.assertEqual((box[b"_command"], box[b"stream"]), (b"StreamClose", b"7"))

    def test_cancelled_call_releases_returned_handles(self):
        """The late answer of a cancelled call carries handles: they are freed."""
        calling = self.session.call("make")
        calling.cancel()
        self.failureResultOf(calling, CancelledError)
        self.transport.clear()
        self.answer(_answer=b"1", result=values.encode(
            [values.Handle("function", 5), values.Handle("module", 6)]))
        self.clock.advance(0)
        [box] = self.sent()
        self.assertEqual(box[b"_command"], b"Free")
        self.assertEqual(sorted(amp.ListOf(amp.Integer()).fromString(box[b"handles"])), [5, 6])

    def test_cancelled_general_call_closes_its_result_stream(self):
        """The same through the general call path (AMP's callRemote)."""
        calling = Deferred.fromCoroutine(self.session._call("big", []))
        calling.cancel()
        self.failureResultOf(calling, CancelledError)
        self.transport.clear()
        self.answer(_answer=b"1", result_stream=b"9", result_size=b"10")
        [box] = self.sent()
        self.assertEqual((box[b"_command"], box[b"stream"]), (b"StreamClose", b"9"))

    def test_late_answer_that_does_not_decode_is_logged(self):
        """A cancelled call's late answer with a bad value is logged; the session goes on."""
        calling = self.session.call("f")
        calling.cancel()
        self.failureResultOf(calling, CancelledError)
        self.answer(_answer=b"1", result=b"\x01garbage")
        self.assertEqual(len(self.flushLoggedErrors(values.CodecError)), 1)
        again = self.session.call("f")
        self.answer(_answer=b"2", result=values.encode(3))
        self.assertEqual(self.successResultOf(again), 3)

    def test_request_box(self):
        """The request is a CallFunction box naming the callee and carrying encoded args."""
        self.session.call("demo.f", 1, "x")
        box = amp.parse(io.BytesIO(self.transport.value()))[0]
        self.assertEqual(box[b"_command"], b"CallFunction")
        self.assertEqual(box[b"name"], b"demo.f")
        self.assertEqual(values.decode(box[b"args"]), [1, "x"])

    def test_declared_error(self):
        """A REMOTE_ERROR answer becomes a RemoteError with its parts."""
        calling = self.session.call("f")
        error = RemoteError("pkg.Oops", "bad", "Traceback...")
        self.answer(_error=b"1", _error_code=b"REMOTE_ERROR",
                    _error_description=error.wire_description().encode())
        failure = self.failureResultOf(calling, RemoteError)
        self.assertEqual((failure.value.type_name, failure.value.message,
                          failure.value.traceback_text), ("pkg.Oops", "bad", "Traceback..."))

    def test_cancelled_call_ignores_its_answer(self):
        """A cancelled call fails with CancelledError; its late answer is dropped, calls go on."""
        calling = self.session.call("f")
        calling.cancel()
        self.failureResultOf(calling, CancelledError)
        later = self.session.call("g")
        self.answer(_answer=b"1", result=values.encode("late"))
        self.answer(_answer=b"2", result=values.encode("fine"))
        self.assertEqual(self.successResultOf(later), "fine")
        self.assertFalse(self.transport.disconnecting)

    def test_answer_with_bad_value(self):
        """An answer whose value does not decode fails that call only."""
        calling = self.session.call("f")
        self.answer(_answer=b"1", result=b"\x01garbage")
        self.failureResultOf(calling, values.CodecError)
        again = self.session.call("f")
        self.answer(_answer=b"2", result=values.encode([1, None]))
        self.assertEqual(self.successResultOf(again), [1, None])

    def test_calls_after_loss_fail_at_once(self):
        """Once the connection is gone, a new call fails with SessionClosed without writing."""
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.transport.clear()
        self.failureResultOf(self.session.call("f"), SessionClosed)
        self.failureResultOf(self.protocol.call_function(values.encode([]), lambda box: None,
                                                         name="f"), SessionClosed)
        self.assertEqual(self.transport.value(), b"")

    def test_undeclared_error(self):
        """Another error code becomes AMP's UnknownRemoteError; the connection stays."""
        calling = self.session.call("f")
        self.answer(_error=b"1", _error_code=b"WEIRD", _error_description=b"odd")
        failure = self.failureResultOf(calling, amp.UnknownRemoteError)
        self.assertIn("odd", str(failure.value))
        self.assertFalse(self.transport.disconnecting)


class _ReadingReactor:
    """Just enough of a reactor for a real TCP transport: it says which descriptors it reads."""

    def __init__(self):
        self._reads = set()


def _socket_transport(sock, protocol, reactor):
    """@return: a real TCP transport on C{sock} (a socket pair's end: no addresses)."""
    from twisted.internet import address, tcp

    class PairConnection(tcp.Connection):
        """A TCP transport whose addresses are made up (a socket pair has none)."""

        def getPeer(self):
            """@return: a stand-in address."""
            return address.IPv4Address("TCP", "127.0.0.1", 2)

        getHost = getPeer

    transport = PairConnection(sock, protocol, reactor)
    transport.connected = True
    return transport


class EagerReadTests(SynchronousTestCase):
    """
    Answers already waiting on a real socket are read right after the
    request is written (LeanAMP.read_eagerly), within the protocol's budget.
    The peer's answers are written before the call, so nothing depends on timing.
    """

    def setUp(self):
        ours, self.peer = socket.socketpair()
        self.addCleanup(self.peer.close)
        self.addCleanup(ours.close)
        self.reactor = _ReadingReactor()
        self.protocol = make_client_protocol()
        self.transport = _socket_transport(ours, self.protocol, self.reactor)
        self.reactor._reads.add(ours.fileno())
        self.protocol.makeConnection(self.transport)
        self.session = RPCSession(AMPEngine(self.protocol, Clock()))

    def answer(self, tag, value):
        """Make the peer send the answer to call C{tag} (it waits in our socket)."""
        self.peer.sendall(amp.AmpBox(_answer=b"%d" % tag, result=values.encode(value)).serialize())

    def requests(self):
        """@return: the boxes the peer received."""
        self.peer.setblocking(False)
        try:
            return amp.parse(io.BytesIO(self.peer.recv(65536)))
        except BlockingIOError:
            return []

    def test_answer_waiting_is_read_at_once(self):
        """A call whose answer is already on the socket is answered before call() returns."""
        self.answer(1, "early")
        calling = self.session.call("f", 1)
        self.assertEqual(self.successResultOf(calling), "early")
        [request] = self.requests()
        self.assertEqual(request[b"name"], b"f")

    def test_budget(self):
        """Past the budget, answers wait for the reactor to deliver data, which renews it."""
        self.protocol.eager_reads = 1
        self.protocol.dataReceived(b"")
        self.answer(1, "one")
        self.assertEqual(self.successResultOf(self.session.call("f")), "one")
        self.answer(2, "two")
        second = self.session.call("f")
        self.assertNoResult(second)
        self.protocol.dataReceived(self.transport.socket.recv(65536))
        self.assertEqual(self.successResultOf(second), "two")
        self.answer(3, "three")
        self.assertEqual(self.successResultOf(self.session.call("f")), "three")

    def test_chained_calls(self):
        """A call made while an answer is handled is sent with the others, then read eagerly."""
        self.answer(1, 1)
        made = []

        def next_call(result):
            self.answer(2, result + 1)
            made.append(self.session.call("f", result))
            return result

        self.session.call("f", 0).addCallback(next_call)
        self.assertEqual(self.successResultOf(made[0]), 2)
        self.assertEqual(len(self.requests()), 2)

    def test_not_while_paused_or_unwatched(self):
        """Nothing is read when the reactor is not reading the socket or the budget is zero."""
        self.reactor._reads.clear()
        self.answer(1, "late")
        calling = self.session.call("f")
        self.assertNoResult(calling)
        self.reactor._reads.add(self.transport.fileno())
        self.protocol.eager_reads = 0
        self.protocol.dataReceived(b"")
        self.assertNoResult(calling)
        self.protocol.dataReceived(self.transport.socket.recv(65536))
        self.assertEqual(self.successResultOf(calling), "late")

    def test_end_of_stream_left_to_the_reactor(self):
        """A peer that closed gives nothing eagerly; the call waits for connectionLost."""
        self.peer.shutdown(socket.SHUT_WR)
        calling = self.session.call("f")
        self.assertNoResult(calling)
        self.protocol.connectionLost(Failure(ConnectionDone()))
        self.failureResultOf(calling, SessionClosed)


class HostArrayTests(SynchronousTestCase):
    """Host data to array bytes, with and without numpy."""

    def without_numpy(self):
        """Make the helpers behave as if numpy were not installed."""
        self.patch(host_arrays, "_numpy", lambda: None)

    def test_fallback_lists(self):
        """Nested lists pack as numpy would, with numpy's default dtypes."""
        self.without_numpy()
        ints = host_array([[1, 2], [3, 4]])
        self.assertEqual((ints.shape, ints.dtype), ((2, 2), "int64"))
        self.assertEqual(ints.data, numpy.array([[1, 2], [3, 4]]).tobytes())
        floats = host_array([1, 2.5], "float32")
        self.assertEqual(floats.data, numpy.array([1, 2.5], "float32").tobytes())
        self.assertEqual(host_array([True, False]).dtype, "bool")
        self.assertRaises(ValueError, host_array, [[1, 2], [3]])
        self.assertRaises(ValueError, host_array, ["a"])
        self.assertRaises(ValueError, host_array, [1], "bfloat16")

    def test_bytes_and_array_module(self):
        """Bytes default to uint8 (or take a dtype and shape); array.array keeps its type."""
        self.without_numpy()
        raw = host_array(b"\x01\x00\x02\x00", "int16")
        self.assertEqual((raw.shape, raw.dtype), ((2,), "int16"))
        self.assertEqual(host_array(b"abcd", shape=(2, 2)).shape, (2, 2))
        self.assertRaises(ValueError, host_array, b"abc", "int16")
        floats = host_array(array.array("f", [1.0, 2.0]))
        self.assertEqual(floats.dtype, "float32")
        self.assertEqual(unpack(floats.data, floats.shape, "float32"), [1.0, 2.0])

    def test_numpy_byte_order(self):
        """Big-endian numpy data is sent little-endian, under TVM's dtype name."""
        swapped = host_array(numpy.array([1, 258], dtype=">i4"))
        self.assertEqual((swapped.dtype, swapped.data),
                         ("int32", numpy.array([1, 258], dtype="<i4").tobytes()))
        self.assertEqual(host_array(numpy.zeros((2, 3)), "float32", (3, 2)).shape, (3, 2))

    def test_unpack_shapes(self):
        """unpack rebuilds nested lists, and a scalar for shape ()."""
        data = numpy.arange(6, dtype="int32").tobytes()
        self.assertEqual(unpack(data, (2, 3), "int32"), [[0, 1, 2], [3, 4, 5]])
        self.assertEqual(unpack(numpy.float64(2.5).tobytes(), (), "float64"), 2.5)
        self.assertRaises(ValueError, unpack, data, (7,), "int32")

    @given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=50),
           st.sampled_from(["int32", "int64", "float64"]))
    def test_fallback_matches_numpy(self, items, dtype):
        """The pure-Python packing gives numpy's bytes, and unpack inverts it."""
        numpy_bytes = host_array(items, dtype).data
        self.without_numpy()
        try:
            fallback = host_array(items, dtype)
        finally:
            self.patch(host_arrays, "_numpy", lambda: numpy)
        self.assertEqual(fallback.data, numpy_bytes)
        self.assertEqual(unpack(fallback.data, fallback.shape, dtype), items)


class TimeEvaluatorResultTests(SynchronousTestCase):
    """The statistics agree with numpy's (TVM's BenchmarkResult)."""

    @given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=30))
    def test_matches_numpy(self, results):
        """mean, median, min, max and std as numpy computes them."""
        result = TimeEvaluatorResult(results)
        for name, function in [("mean", numpy.mean), ("median", numpy.median),
                               ("min", numpy.min), ("max", numpy.max), ("std", numpy.std)]:
            self.assertAlmostEqual(getattr(result, name), float(function(results)), places=9)

    def test_empty(self):
        """A result needs timings."""
        self.assertRaises(ValueError, TimeEvaluatorResult, [])


class KeepWorkerTests(SessionTestBase):
    """Goodbye asks the server to keep its worker; a token answered reaches C{on_kept}."""

    def setUp(self):
        self.kept = []
        self.session_options = {"on_kept": lambda *token: self.kept.append(token)}
        super().setUp()
        self.asked = []

        def keeper(keep):
            self.asked.append(keep)
            return {"token": "t" * 32, "keep_for": 5.0} if keep else {}

        self.server.keeper = keeper

    def test_kept(self):
        """The client asks, the server answers a token, the client remembers it."""
        self.resolve(self.session.close())
        self.assertEqual(self.asked, [True])
        self.assertEqual(self.kept, [("t" * 32, 5.0)])
        self.assertTrue(self.server.kept)

    def test_server_that_keeps_nothing(self):
        """A server (or runner) without a keeper answers nothing more; the close is the same."""
        self.server.keeper = None
        self.resolve(self.session.close())
        self.assertEqual(self.kept, [])
        self.assertFalse(self.server.kept)
        self.assertTrue(self.client.lost)

    def test_client_that_does_not_ask(self):
        """Without on_kept the client does not ask: the worker is not kept."""
        self.session._engine.engine.on_kept = None
        self.resolve(self.session.close())
        self.assertEqual(self.asked, [False])
        self.assertFalse(self.server.kept)
