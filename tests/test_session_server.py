"""The session responder protocol end to end, in memory, with a minimal AMP client."""

import os
import shutil
import tempfile

import pytest
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol import remote_error, session_commands, values
from tvm_rpc.protocol.streams import chunked, read_stream, receive_value, send_value, write_stream
from tvm_rpc.protocol.values import ArrayRef, DLDevice, HostArray
from tvm_rpc.server.registry import Registry
from tvm_rpc.server.session import SessionProtocol, make_session_protocol, timeout_notice

MODULE = b'''
def double(array):
    array *= 2
    return array

def fail(message):
    raise KeyError(message)
'''


class CommandCalls:
    """Calls from C{self.client} over C{self.pump} (set by the test's C{setUp})."""

    def call(self, command, **kwargs):
        """Call and pump; @return: the answer (fails the test on an error)."""
        results = []
        self.client.callRemote(command, **kwargs).addBoth(results.append)
        self.pump.flush()
        self.assertEqual(len(results), 1)
        if hasattr(results[0], "raiseException"):
            results[0].raiseException()
        return results[0]

    def remote_error(self, command, **kwargs):
        """Call a command that must fail; @return: the RemoteError."""
        failures = []
        self.client.callRemote(command, **kwargs).addErrback(failures.append)
        self.pump.flush()
        self.assertEqual(len(failures), 1)
        return failures[0].trap(remote_error.RemoteError) and failures[0].value


@pytest.mark.unit
class SessionTests(CommandCalls, SynchronousTestCase):
    """Every command through AMP boxes, in memory."""

    def setUp(self):
        """A session over an in-memory connection, with a few global functions."""
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.registry = Registry()
        self.registry.register("echo", lambda *args: list(args))
        self.registry.register("add", lambda a, b: a + b)
        self.registry.register("boom", lambda: 1 / 0)
        self.registry.register("big", lambda n: b"z" * n)
        self.clock = Clock()
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: SessionProtocol(self.root, self.registry, clock=self.clock, backend="numpy"),
            amp.AMP,
        )


    def run_deferred(self, d):
        """Pump until C{d} fires; @return: its result."""
        self.pump.flush()
        return self.successResultOf(d)

    def invoke(self, name=None, *args, function=None):
        """Call a function with encoded args; @return: the decoded result."""
        answer = self.call(session_commands.CallFunction, name=name, function=function,
                           args=values.encode(list(args)))
        return values.decode(self.run_deferred(receive_value(self.client.callRemote, answer)))

    def test_hello(self):
        """Hello names the protocol, version and transfer parameters."""
        answer = self.call(session_commands.Hello, protocol=session_commands.SESSION_PROTOCOL,
                           version=session_commands.SESSION_VERSION)
        self.assertEqual(answer["protocol"], "tvm_rpc-session")
        self.assertEqual(answer["version"], session_commands.SESSION_VERSION)
        self.assertEqual(answer["chunk_size"], session_commands.CHUNK_SIZE)
        self.assertIn("tvm_rpc", answer["implementation"])

    def test_calls_by_name_and_handle(self):
        """Functions are called by global name or by handle."""
        self.assertEqual(self.invoke("add", 2, 40), 42)
        handle = self.call(session_commands.GetFunction, name="echo")["function"]
        self.assertEqual(self.invoke(None, None, 1.5, "s", b"b", {"k": [1]}, function=handle),
                         [None, 1.5, "s", b"b", {"k": [1]}])
        self.assertEqual(self.invoke("tvm_rpc.server.list_functions")[:0], [])

    def test_freed_function_handle(self):
        """A function handle that was called, then freed, is unknown afterwards."""
        handle = self.call(session_commands.GetFunction, name="add")["function"]
        self.assertEqual(self.invoke(None, 1, 2, function=handle), 3)
        self.call(session_commands.Free, handles=[handle])
        error = self.remote_error(session_commands.CallFunction, function=handle,
                                  args=values.encode([1, 2]))
        self.assertEqual(error.short_type_name, "HandleError")
        other = self.call(session_commands.GetFunction, name="add")["function"]
        self.assertNotEqual(other, handle)
        self.assertEqual(self.invoke(None, 5, 6, function=other), 11)

    def test_remote_errors_keep_session_usable(self):
        """
        An exception arrives with its type name and message (no traceback:
        the server's default); the session goes on.
        """
        error = self.remote_error(session_commands.CallFunction, name="boom", args=values.encode([]))
        self.assertEqual(error.type_name, "ZeroDivisionError")
        self.assertIn("division by zero", error.message)
        self.assertEqual(error.traceback_text, "")
        error = self.remote_error(session_commands.GetFunction, name="nothing")
        self.assertEqual(error.short_type_name, "NoSuchFunction")
        error = self.remote_error(session_commands.CallFunction, name="add", args=b"\x01garbage")
        self.assertEqual(error.short_type_name, "CodecError")
        error = self.remote_error(session_commands.CallFunction, name="add", function=1,
                                  args=values.encode([]))
        self.assertIn("exactly one", error.message)
        error = self.remote_error(session_commands.CallFunction, function=999, args=values.encode([]))
        self.assertEqual(error.short_type_name, "HandleError")
        self.assertEqual(self.invoke("add", 1, 1), 2)
        self.assertFalse(self.client.transport.disconnecting)

    def test_many_calls_in_flight(self):
        """Many calls sent before any answer all get their own answers."""
        results = {}
        for i in range(200):
            self.client.callRemote(session_commands.CallFunction, name="add",
                                   args=values.encode([i, i])).addCallback(
                lambda answer, i=i: results.__setitem__(i, values.decode(answer["result"])))
        self.pump.flush()
        self.assertEqual(results, {i: 2 * i for i in range(200)})

    def test_asynchronous_functions(self):
        """Functions returning Deferreds or coroutines answer when done; others go on."""
        from twisted.internet.defer import Deferred

        pending = Deferred()
        second = Deferred()
        self.registry.register("later", lambda: pending)

        async def coroutine(x):
            """Wait for C{second}."""
            return [x, await second]

        self.registry.register("coroutine", coroutine)
        results = []
        self.client.callRemote(session_commands.CallFunction, name="later").addCallback(results.append)
        self.client.callRemote(session_commands.CallFunction, name="coroutine",
                               args=values.encode([1])).addCallback(results.append)
        self.assertEqual(self.invoke("add", 1, 2), 3)
        self.assertEqual(results, [])
        pending.callback(b"done")
        second.callback(b"done")
        self.pump.flush()
        self.assertEqual([values.decode(r["result"]) for r in results], [b"done", [1, b"done"]])
        failing = Deferred()
        self.registry.register("fails", lambda: failing)
        errors = []
        self.client.callRemote(session_commands.CallFunction, name="fails").addErrback(errors.append)
        self.pump.flush()
        failing.errback(OSError("late failure"))
        self.pump.flush()
        self.assertEqual(errors[0].value.type_name, "OSError")

    def test_long_arguments_and_results(self):
        """Values longer than one AMP box travel by stream, both ways."""
        payload = os.urandom(300_000)
        extra = self.run_deferred(send_value(self.client.callRemote, values.encode([payload])))
        self.assertIn("args_stream", extra)
        answer = self.call(session_commands.CallFunction, name="echo", **extra)
        self.assertIsNotNone(answer["result_stream"])
        result = values.decode(self.run_deferred(receive_value(self.client.callRemote, answer)))
        self.assertEqual(result, [payload])
        self.assertEqual(len(self.server.environment.streams), 0)
        self.assertEqual(len(self.invoke("big", 200_000)), 200_000)

    def test_upload_download_streamed(self):
        """A file streams up and down byte-exact; escapes are refused by name."""
        data = os.urandom(1_000_003)
        stream = self.call(session_commands.OpenUpload, path="d/blob.bin", size=len(data))["stream"]
        size = self.run_deferred(write_stream(self.client.callRemote, stream, chunked(data)))
        self.assertEqual(size, len(data))
        self.assertEqual(self.invoke("tvm.rpc.server.listdir", "d"), ["blob.bin"])
        answer = self.call(session_commands.OpenDownload, path="d/blob.bin")
        parts = []
        self.run_deferred(read_stream(self.client.callRemote, answer["stream"], answer["size"],
                                      parts.append))
        self.assertEqual(b"".join(parts), data)
        error = self.remote_error(session_commands.OpenUpload, path="../escape")
        self.assertEqual(error.type_name, "tvm_rpc.server.environment.PathEscapeError")
        self.assertIn("'../escape'", error.message)
        error = self.remote_error(session_commands.OpenDownload, path="/etc/hostname")
        self.assertIn("absolute", error.message)
        self.invoke("tvm.rpc.server.upload", "small.txt", b"hi")
        self.assertEqual(self.invoke("tvm.rpc.server.download", "small.txt"), b"hi")
        self.invoke("tvm.rpc.server.remove", "small.txt")

    def test_cancelled_upload_leaves_nothing(self):
        """Cancelling an upload removes the partial file on the server."""
        stream = self.call(session_commands.OpenUpload, path="c.bin")["stream"]
        self.client.callRemote(session_commands.StreamWrite, stream=stream, data=b"x" * 100)
        self.call(session_commands.StreamClose, stream=stream)
        self.assertEqual(self.invoke("tvm.rpc.server.listdir"), [])

    def test_arrays_and_modules(self):
        """Allocate, fill, run a module function on the handle, read back."""
        import numpy

        answer = self.call(session_commands.Empty, shape=[2, 3], dtype="float32", device_type=1,
                           device_id=0)
        array = answer["array"]
        self.assertEqual(answer["nbytes"], 24)
        host = numpy.arange(6, dtype="float32").reshape(2, 3)
        stream = self.call(session_commands.OpenArrayWrite, array=array)
        self.run_deferred(write_stream(self.client.callRemote, stream["stream"],
                                       chunked(host.tobytes(), 7)))
        self.invoke("tvm.rpc.server.upload", "m.py", MODULE)
        module = self.call(session_commands.LoadModule, path="m.py")
        self.assertEqual(module["kind"], "python")
        double = self.call(session_commands.ModuleGetFunction, module=module["module"],
                           name="double")["function"]
        ref = self.invoke(None, ArrayRef(array, (2, 3), "float32", DLDevice(1, 0)),
                          function=double)
        self.assertIsInstance(ref, ArrayRef)
        self.assertEqual((ref.shape, ref.dtype, ref.device), ((2, 3), "float32", DLDevice(1, 0)))
        answer = self.call(session_commands.OpenArrayRead, array=array)
        self.assertEqual((answer["shape"], answer["dtype"]), ([2, 3], "float32"))
        parts = []
        self.run_deferred(read_stream(self.client.callRemote, answer["stream"], answer["size"],
                                      parts.append))
        self.assertEqual(b"".join(parts), (host * 2).tobytes())
        inline = self.invoke(None, HostArray.from_numpy(host), function=double)
        self.assertIsInstance(inline, ArrayRef)
        fail = self.call(session_commands.ModuleGetFunction, module=module["module"], name="fail")
        error = self.remote_error(session_commands.CallFunction, function=fail["function"],
                                  args=values.encode(["why"]))
        self.assertEqual((error.type_name, error.message), ("KeyError", "'why'"))
        self.call(session_commands.Free, handles=[array, module["module"], 12345])
        error = self.remote_error(session_commands.OpenArrayRead, array=array)
        self.assertEqual(error.short_type_name, "HandleError")

    def test_devices(self):
        """cpu exists; cuda does not on a numpy backend; allocation there fails clearly."""
        self.assertEqual(self.call(session_commands.DeviceExists, device_type=1, device_id=0),
                         {"exists": True, "name": "cpu"})
        self.assertEqual(self.call(session_commands.DeviceExists, device_type=2, device_id=0),
                         {"exists": False, "name": "cuda"})
        self.call(session_commands.DeviceSync, device_type=1, device_id=0)
        error = self.remote_error(session_commands.Empty, shape=[1], dtype="float32", device_type=2,
                                  device_id=0)
        self.assertEqual(error.short_type_name, "DeviceError")

    def test_time_evaluator(self):
        """time_evaluator answers one positive mean per repeat."""
        answer = self.call(session_commands.TimeEvaluator, name="add", args=values.encode([1, 2]),
                           device_type=1, device_id=0, number=5, repeat=3, min_repeat_ms=0.0)
        self.assertEqual(len(answer["results"]), 3)
        self.assertTrue(all(r >= 0 for r in answer["results"]))
        error = self.remote_error(session_commands.TimeEvaluator, name="add", args=values.encode([1, 2]),
                                  device_type=1, device_id=0, number=0, repeat=1,
                                  min_repeat_ms=0.0)
        self.assertEqual(error.short_type_name, "ValueError")

    def test_time_evaluator_checks_tvm_options(self):
        """TVM's options from a client are checked on the server too; good ones are honoured."""
        common = {"name": "add", "args": values.encode([1, 2]), "device_type": 1,
                  "device_id": 0, "number": 2, "repeat": 3, "min_repeat_ms": 0.0}
        for bad in ({"repeats_to_cooldown": 0}, {"cooldown_interval_ms": -1},
                    {"cache_flush_bytes": 1 << 40}, {"limit_zero_time_iterations": -3}):
            error = self.remote_error(session_commands.TimeEvaluator, **common, options=[bad])
            self.assertEqual(error.short_type_name, "ValueError")
            self.assertIn(next(iter(bad)), str(error))
        error = self.remote_error(session_commands.TimeEvaluator, **common, options=[{}, {}])
        self.assertEqual(error.short_type_name, "ValueError")
        answer = self.call(session_commands.TimeEvaluator, **common, options=[{
            "repeats_to_cooldown": 2, "cache_flush_bytes": 4096,
            "limit_zero_time_iterations": 0}])
        self.assertEqual(len(answer["results"]), 3)

    def test_goodbye_and_cleanup(self):
        """Goodbye answers, closes, and the work directory goes away."""
        work = self.server.environment.work_dir.root
        self.assertTrue(os.path.isdir(work))
        self.call(session_commands.Goodbye)
        self.clock.advance(0)
        self.pump.flush()
        self.assertTrue(self.server.environment.closed)
        self.assertFalse(os.path.exists(work))

    def test_chunk_too_large(self):
        """A StreamWrite above the chunk limit is refused (and the stream dropped)."""
        stream = self.call(session_commands.OpenValue, size=100_000)["stream"]
        error = self.remote_error(session_commands.StreamWrite, stream=stream,
                                  data=b"x" * (session_commands.CHUNK_SIZE + 1))
        self.assertIn("exceeds", error.message)


@pytest.mark.unit
class StartTests(SynchronousTestCase):
    """How the plumbing starts a session, and bad peers."""

    def make(self):
        """@return: a session protocol and a StringTransport, not yet connected."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        protocol = make_session_protocol(root, Registry(), clock=Clock(), backend="python")
        transport = StringTransport()
        return protocol, transport

    def test_bytes_before_and_after_start(self):
        """Bytes received with the handshake (passed after makeConnection) are served."""
        protocol, transport = self.make()
        box = amp.AmpBox(_command=b"Hello", _ask=b"1", protocol=b"tvm_rpc-session",
                         version=b"1").serialize()
        protocol.makeConnection(transport)
        protocol.dataReceived(box[:5])
        protocol.dataReceived(box[5:])
        self.assertIn(b"tvm_rpc-session", transport.value())
        self.assertIn(b"_answer", transport.value())
        work = protocol.environment.work_dir.root
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(os.path.exists(work))

    def test_non_amp_peer_refused(self):
        """A TVM RPC packet (first byte not 0) closes the connection at once."""
        protocol, transport = self.make()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x18\x00\x00\x00\x00\x00\x00\x00\x05\x00\x00\x00")
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"\x00\x05hello more bytes that are not AMP" * 10)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_reading_paused_while_answers_wait(self):
        """A full write buffer pauses reading requests; draining resumes it."""
        protocol, transport = self.make()
        protocol.makeConnection(transport)
        self.assertTrue(transport.streaming)
        self.assertIs(transport.producer, protocol)
        hello = amp.AmpBox(_command=b"Hello", _ask=b"1", protocol=b"tvm_rpc-session",
                           version=b"1").serialize()
        transport.producer.pauseProducing()
        self.assertEqual(transport.producerState, "paused")
        protocol.dataReceived(hello)
        self.assertEqual(transport.value(), b"")
        transport.producer.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertIn(b"_answer", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_call_fast_path_matches_amp_dispatch(self):
        """CallFunction's short path answers exactly as AMP's own dispatch does."""
        from twisted.internet.defer import Deferred, fail

        class Generic(SessionProtocol):
            """
            The same protocol with AMP's dispatch for every command: AMP
            decodes the arguments and encodes the answer or error itself.
            """

            ampBoxReceived = amp.AMP.ampBoxReceived

            @session_commands.CallFunction.responder
            def call_function(self, function=None, name=None, args=None, args_stream=None):
                """Call a function through AMP's dispatch."""
                return self._call(function, name, args, args_stream)

        registry = Registry()
        registry.register("add", lambda a, b: a + b)
        registry.register("boom", lambda: 1 / 0)
        registry.register("later", lambda: Deferred())
        registry.register("failed", lambda: fail(OSError("late")))
        registry.register("opaque", lambda: object())
        registry.register("big", lambda: b"x" * 100_000)
        calls = [
            {"name": "add", "args": values.encode([1, 2])},
            {"name": "boom", "args": values.encode([])},
            {"name": "failed"},
            {"name": "opaque"},
            {"name": "big"},
            {"name": "missing"},
            {"function": 12345},
            {"name": "add", "function": 1},
            {"name": "add", "args": b"garbage"},
            {"name": "later"},
        ]
        outputs = []
        for kind in (SessionProtocol, Generic):
            root = tempfile.mkdtemp()
            self.addCleanup(shutil.rmtree, root, True)
            protocol = kind(root, registry, clock=Clock(), backend="python")
            transport = StringTransport()
            protocol.makeConnection(transport)
            for tag, call in enumerate(calls):
                box = session_commands.CallFunction.makeArguments(call, None)
                box[b"_command"] = b"CallFunction"
                box[b"_ask"] = b"%d" % tag
                protocol.dataReceived(box.serialize())
            replies = []
            for reply in amp.parseString(transport.value()):
                reply = dict(reply)
                if b"_error_description" in reply:
                    error = remote_error.RemoteError(reply.pop(b"_error_description").decode())
                    reply["error"] = (error.type_name, error.message)
                replies.append(reply)
            outputs.append(replies)
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(outputs[0], outputs[1])
        self.assertEqual(len(outputs[0]), len(calls) - 1)
        self.assertEqual(values.decode(outputs[0][0][b"result"]), 3)
        self.assertEqual(outputs[0][1]["error"][0], "ZeroDivisionError")
        self.assertEqual(outputs[0][2]["error"], ("OSError", "late"))
        self.assertIn(b"result_stream", outputs[0][4])

    def test_call_with_malformed_arguments(self):
        """A CallFunction whose arguments do not parse is a RemoteError, not a lost session."""
        protocol, transport = self.make()
        protocol.makeConnection(transport)
        protocol.dataReceived(amp.AmpBox(_command=b"CallFunction", _ask=b"1",
                                         function=b"not a number").serialize())
        [reply] = amp.parseString(transport.value())
        self.assertEqual(reply[b"_error_code"], b"REMOTE_ERROR")
        self.assertIn("ValueError", reply[b"_error_description"].decode())
        self.assertFalse(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_unusable_work_root(self):
        """A work root that cannot be created is logged and the connection closed."""
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        blocker = os.path.join(root, "file")
        with open(blocker, "w") as f:
            f.write("not a directory")
        protocol = make_session_protocol(os.path.join(blocker, "sub"), Registry(),
                                         clock=Clock(), backend="python")
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"1", protocol=b"x",
                                         version=b"1").serialize())
        self.assertEqual(transport.value(), b"")
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)

    def test_unknown_command_answered(self):
        """An unknown command gets AMP's unhandled-command error; the session goes on."""
        protocol, transport = self.make()
        protocol.makeConnection(transport)
        protocol.dataReceived(amp.AmpBox(_command=b"Nonsense", _ask=b"7").serialize())
        self.assertIn(b"_error", transport.value())
        self.assertIn(b"UNHANDLED", transport.value())
        transport.clear()
        protocol.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"8", protocol=b"x",
                                         version=b"1").serialize())
        self.assertIn(b"_answer", transport.value())
        self.assertFalse(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))

    def test_malformed_box_closes_and_cleans_up(self):
        """A box that is neither a command nor an answer ends the session, cleanly."""
        protocol, transport = self.make()
        protocol.makeConnection(transport)
        work = protocol.environment.work_dir.root
        protocol.dataReceived(amp.AmpBox(whatever=b"1").serialize())
        self.assertTrue(transport.disconnecting)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(os.path.exists(work))
        self.assertEqual(len(self.flushLoggedErrors(amp.NoEmptyBoxes)), 1)

    def test_key_too_long_closes_and_cleans_up(self):
        """Bytes with an AMP key length above 255 end the session, cleanly and logged."""
        from twisted.logger import globalLogPublisher

        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        protocol, transport = self.make()
        protocol.makeConnection(transport)
        work = protocol.environment.work_dir.root
        protocol.dataReceived(b"\x00\x04_ask\x00\x011\x01\x00" + b"k" * 256)
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(amp.AmpBox(_command=b"Hello", _ask=b"2", protocol=b"x",
                                         version=b"1").serialize())
        self.assertNotIn(b"_answer", transport.value())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertFalse(os.path.exists(work))
        self.assertTrue(any("not AMP boxes" in (event.get("log_format") or "")
                            for event in events))

    def test_timeout_notice_is_a_box(self):
        """The timeout notice reaches a client's SessionEnded responder, unanswered."""
        received = []

        class Client(amp.AMP):
            """A client that only handles SessionEnded."""

            @session_commands.SessionEnded.responder
            def ended(self, code, reason):
                """Record the notice."""
                received.append((code, reason))
                return {}

        client = Client()
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(timeout_notice(2.5))
        self.assertEqual(len(received), 1)
        self.assertEqual(received[0][0], "timeout")
        self.assertIn("2.5 s", received[0][1])
        self.assertEqual(transport.value(), b"")
