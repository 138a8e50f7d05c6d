"""The operator's limits on a session, and what a peer sees when it meets one.

Server side in memory (the session protocol with a plain AMP client); the
client's own bounds through the real session client. A device type that
would crash TVM's runtime on a real worker: ``tests/test_session_processes.py``.
"""

import os
import shutil
import tempfile

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.python import usage
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase

from tests.test_session_client import SessionTestBase
from tests.test_session_server import CommandCalls
from tvm_rpc.client.amp_protocol import make_client_protocol
from tvm_rpc.client.session import start_session
from tvm_rpc.localfiles import open_temporary
from tvm_rpc.protocol import ampwire, remote_error, session_commands, values
from tvm_rpc.protocol.streams import ResultTooLarge
from tvm_rpc.server import tap
from tvm_rpc.server.backends import check_device
from tvm_rpc.server.environment import SessionEnvironment
from tvm_rpc.server.errors import CodeUploadRefused, DeviceError
from tvm_rpc.server.limits import (
    DEFAULT_MAX_BOX_BYTES,
    DEFAULT_MAX_STREAMS,
    DEFAULT_MAX_WORK_DIR_BYTES,
    MIN_MAX_BOX_BYTES,
    SessionSettings,
    WorkDirFull,
    parse_bytes,
)
from tvm_rpc.server.registry import Registry
from tvm_rpc.server.session import SessionProtocol
from tvm_rpc.server.pool import WorkerPool
from tvm_rpc.server.workdir import FileSink

pytestmark = pytest.mark.unit

NAME_MAX = 255


class NoticeClient(amp.AMP):
    """A plain AMP client that records the server's SessionEnded notices."""

    def __init__(self):
        super().__init__()
        self.notices = []

    @session_commands.SessionEnded.responder
    def session_ended(self, code, reason):
        self.notices.append((code, reason))
        return {}


class ServerTestBase(CommandCalls, SynchronousTestCase):
    """A session protocol with the given settings, over iosim, and a plain AMP client."""

    settings = SessionSettings()

    def setUp(self):
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)
        self.registry = Registry()
        self.registry.register("add", lambda a, b: a + b)
        self.registry.register("boom", lambda: 1 / 0)
        self.clock = Clock()
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: SessionProtocol(self.root, self.registry, clock=self.clock,
                                    backend="numpy", settings=self.settings),
            NoticeClient,
        )

    def still_usable(self):
        """The session answers a call and its connection is open."""
        answer = self.call(session_commands.CallFunction, name="add", args=values.encode([2, 3]))
        self.assertEqual(values.decode(answer["result"]), 5)
        self.assertFalse(self.client.transport.disconnecting)

    def upload(self, path, data, size="exact"):
        """Upload C{data} by stream; @return: the RemoteError, or None on success."""
        announced = len(data) if size == "exact" else size
        failures = []
        opened = self.client.callRemote(session_commands.OpenUpload, path=path, size=announced)
        opened.addErrback(failures.append)
        self.pump.flush()
        if failures:
            return failures[0].trap(remote_error.RemoteError) and failures[0].value
        stream = self.successResultOf(opened)["stream"]
        for start in range(0, len(data), session_commands.CHUNK_SIZE):
            writing = self.client.callRemote(session_commands.StreamWrite, stream=stream,
                                             data=data[start:start + session_commands.CHUNK_SIZE])
            writing.addErrback(failures.append)
            self.pump.flush()
            if failures:
                return failures[0].trap(remote_error.RemoteError) and failures[0].value
        self.call(session_commands.StreamFinish, stream=stream)
        return None

    def work_files(self):
        """@return: the names in the session's work directory."""
        return sorted(os.listdir(self.server.environment.work_dir.root))


class DeviceValidationTests(ServerTestBase):
    """Device types TVM does not number never reach its runtime."""

    def test_unknown_device_type_is_a_clear_error(self):
        """Every device command refuses type 999 naming the valid types; the session goes on."""
        for command, kwargs in [
            (session_commands.DeviceExists, {}),
            (session_commands.DeviceSync, {}),
            (session_commands.Empty, {"shape": [2], "dtype": "float32"}),
            (session_commands.TimeEvaluator, {"name": "add", "args": values.encode([1, 2]),
                                      "number": 1, "repeat": 1, "min_repeat_ms": 0.0}),
        ]:
            error = self.remote_error(command, device_type=999, device_id=0, **kwargs)
            self.assertEqual(error.short_type_name, "DeviceError", command)
            self.assertIn("unknown device type 999", error.message)
            self.assertIn("cpu=1", error.message)
            self.assertIn("cuda=2", error.message)
        self.still_usable()

    def test_device_argument_of_a_call(self):
        """A device passed as a call argument is checked before it becomes a device object."""
        error = self.remote_error(session_commands.CallFunction, name="add",
                                  args=values.encode([values.DLDevice(999, 0), 1]))
        self.assertEqual(error.short_type_name, "DeviceError")
        self.still_usable()

    def test_known_types_pass(self):
        """cpu works; a known type this server lacks is 'not available', not 'unknown'."""
        self.assertTrue(self.call(session_commands.DeviceExists, device_type=1, device_id=0)["exists"])
        self.assertFalse(self.call(session_commands.DeviceExists, device_type=2, device_id=0)["exists"])

    @given(st.integers(min_value=0, max_value=(1 << 31) - 1))
    def test_check_device(self, device_type):
        """check_device passes exactly TVM's numbered types."""
        device = values.DLDevice(device_type, 0)
        if device_type in values.DEVICE_NAMES:
            self.assertIs(check_device(device), device)
        else:
            with self.assertRaises(DeviceError):
                check_device(device)


class BoxLimitTests(ServerTestBase):
    """A box above --max-box-bytes ends the session with a notice naming the limit."""

    settings = SessionSettings(max_box_bytes=MIN_MAX_BOX_BYTES)

    def test_unterminated_box(self):
        """A box that never ends is not buffered past the limit."""
        self.still_usable()
        piece = b"\x00\x01k\xff\xff" + b"v" * 0xFFFF
        sent = 0
        # One key after another, never the terminator, until the server gives up.
        while sent <= MIN_MAX_BOX_BYTES + 2 * len(piece) and not self.client.notices:
            self.client.transport.write(piece)
            sent += len(piece)
            self.pump.flush()
        # The session ended: its connection is gone and its environment closed.
        self.assertTrue(self.server.environment.closed)
        self.assertLessEqual(sent, MIN_MAX_BOX_BYTES + 2 * len(piece))
        [(code, reason)] = self.client.notices
        self.assertEqual(code, "limit")
        self.assertIn("--max-box-bytes", reason)
        self.assertIn(str(MIN_MAX_BOX_BYTES), reason)

    def test_chunks_within_the_limit(self):
        """Full stream chunks still pass at the smallest allowed limit."""
        self.assertIsNone(self.upload("blob", os.urandom(2 * session_commands.CHUNK_SIZE + 5)))
        self.assertEqual(self.work_files(), ["blob"])


class ClientSeesBoxLimitTests(SynchronousTestCase):
    """Our client names the limit when the server ends its session for it."""

    def test_session_closed_names_the_limit(self):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        clock = Clock()
        client, server, pump = connectedServerAndClient(
            lambda: SessionProtocol(root, Registry(), clock=clock, backend="numpy",
                                    settings=SessionSettings(max_box_bytes=MIN_MAX_BOX_BYTES)),
            make_client_protocol, clock=clock)
        opening = start_session(client, clock=clock)
        pump.flush()
        session = self.successResultOf(opening)
        for _ in range(MIN_MAX_BOX_BYTES // 0xFFFF + 2):
            if client.lost:
                break
            client.transport.write(b"\x00\x01k\xff\xff" + b"v" * 0xFFFF)
            pump.flush()
        self.assertEqual(client.end_code, "limit")
        failure = self.failureResultOf(session.call("tvm_rpc.server.list_functions"))
        self.assertIn("--max-box-bytes", str(failure.value))
        self.assertTrue(session.closed)


class BoxParserLimitTests(SynchronousTestCase):
    """The parser's bound, byte by byte."""

    @given(st.lists(st.dictionaries(st.binary(min_size=1, max_size=8),
                                    st.binary(max_size=300), max_size=6), max_size=6),
           st.integers(min_value=1, max_value=64))
    def test_limit_keeps_boxes_under_it(self, boxes, piece):
        """Boxes no longer than the limit parse the same with it, however the bytes are split."""
        wire = b"".join(ampwire.serialize(box.items()) for box in boxes)
        longest = max((len(ampwire.serialize(box.items())) for box in boxes), default=2)
        parser = ampwire.BoxParser(max_box_size=longest)
        parsed = []
        for start in range(0, len(wire), piece):
            parser.feed(wire[start:start + piece])
            while (box := parser.next_box()) is not None:
                parsed.append(box)
        self.assertEqual(parsed, boxes)

    @given(st.integers(min_value=8, max_value=4096), st.integers(min_value=1, max_value=512))
    def test_refuses_past_the_limit(self, limit, piece):
        """An endless box is refused within one piece of the limit."""
        parser = ampwire.BoxParser(max_box_size=limit)
        # Key "k", value "v", again and again: never the terminator.
        stream = b"\x00\x01k\x00\x01v" * ((limit + piece) // 6 + 2)
        fed = 0
        with self.assertRaises(ampwire.BoxTooLarge):
            while fed <= limit + piece:
                parser.feed(stream[fed:fed + piece])
                fed += piece
                self.assertIsNone(parser.next_box())
        self.assertLessEqual(fed, limit + piece)


class StreamLimitTests(ServerTestBase):
    """--max-streams: opening one more stream fails, the session goes on."""

    settings = SessionSettings(max_streams=2)

    def test_too_many_streams(self):
        first = self.call(session_commands.OpenUpload, path="a", size=None)["stream"]
        self.call(session_commands.OpenUpload, path="b", size=None)
        error = self.remote_error(session_commands.OpenUpload, path="c", size=None)
        self.assertEqual(error.short_type_name, "TooManyStreams")
        self.assertIn("limit is 2", error.message)
        error = self.remote_error(session_commands.OpenValue, size=10)
        self.assertEqual(error.short_type_name, "TooManyStreams")
        # The refused upload left no temporary file behind.
        self.assertEqual(len(self.work_files()), 2)
        self.call(session_commands.StreamClose, stream=first)
        self.call(session_commands.OpenUpload, path="c", size=None)
        self.still_usable()


class WorkDirLimitTests(ServerTestBase):
    """--max-work-dir-bytes: uploads that would pass it fail and leave nothing."""

    settings = SessionSettings(max_work_dir_bytes=1000)

    def test_announced_upload(self):
        self.assertIsNone(self.upload("a", b"x" * 600))
        error = self.upload("b", b"y" * 600)
        self.assertEqual(error.type_name, "tvm_rpc.server.limits.WorkDirFull")
        self.assertIn("limit of 1000 bytes", error.message)
        self.assertIn("--max-work-dir-bytes", error.message)
        self.assertEqual(self.work_files(), ["a"])
        # Room comes back when files go.
        self.call(session_commands.CallFunction, name="tvm.rpc.server.remove", args=values.encode(["a"]))
        self.assertIsNone(self.upload("b", b"y" * 600))
        self.still_usable()

    def test_unannounced_upload(self):
        """An upload of unknown size fails at the chunk that passes the limit."""
        error = self.upload("a", b"x" * 1500, size=None)
        self.assertEqual(error.short_type_name, "WorkDirFull")
        self.assertEqual(self.work_files(), [])
        self.still_usable()

    def test_inline_upload(self):
        """tvm.rpc.server.upload counts too (and files written by code are measured)."""
        with open(os.path.join(self.server.environment.work_dir.root, "made"), "wb") as f:
            f.write(b"m" * 500)
        error = self.remote_error(session_commands.CallFunction, name="tvm.rpc.server.upload",
                                  args=values.encode(["a", b"x" * 600]))
        self.assertEqual(error.short_type_name, "WorkDirFull")
        self.assertEqual(self.work_files(), ["made"])


class LongNameTests(ServerTestBase):
    """Upload temporary names fit NAME_MAX whatever the final name."""

    def test_longest_name(self):
        name = "n" * NAME_MAX
        self.assertIsNone(self.upload(name, b"data" * 1000))
        self.assertEqual(self.work_files(), [name])
        answer = self.call(session_commands.OpenDownload, path=name)
        self.assertEqual(answer["size"], 4000)

    @given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"),
                   min_size=1, max_size=NAME_MAX).filter(
        lambda name: name not in (".", "..") and len(name.encode("utf-8")) <= NAME_MAX))
    def test_any_legal_name(self, name):
        """Any name the file system takes can be written through a FileSink."""
        directory = tempfile.mkdtemp()
        try:
            target = os.path.join(directory, name)
            temporary, file = open_temporary(target)
            file.close()
            os.unlink(temporary)
            self.assertEqual(os.path.dirname(temporary), directory)
            self.assertLessEqual(len(os.path.basename(temporary).encode()), NAME_MAX)
            sink = FileSink(target, 3)
            sink.write(b"abc")
            self.assertEqual(sink.finish(), 3)
            self.assertEqual(os.listdir(directory), [name])
        finally:
            shutil.rmtree(directory)


class TracebackTests(ServerTestBase):
    """--send-tracebacks: the traceback crosses the wire only when asked for."""

    settings = SessionSettings(send_tracebacks=True)

    def test_tracebacks_when_asked(self):
        for command, kwargs in [(session_commands.CallFunction, {"name": "boom", "args": values.encode([])}),
                                (session_commands.GetFunction, {"name": "nothing"})]:
            error = self.remote_error(command, **kwargs)
            self.assertIn("Traceback", error.traceback_text)
        self.assertIn("<lambda>", self.remote_error(
            session_commands.CallFunction, name="boom", args=values.encode([])).traceback_text)


class DefaultTracebackTests(ServerTestBase):
    """By default an error carries its type and message, never the server's paths."""

    def test_no_tracebacks(self):
        for command, kwargs in [(session_commands.CallFunction, {"name": "boom", "args": values.encode([])}),
                                (session_commands.GetFunction, {"name": "nothing"}),
                                (session_commands.OpenDownload, {"path": "missing"})]:
            error = self.remote_error(command, **kwargs)
            self.assertEqual(error.traceback_text, "")
            self.assertTrue(error.type_name)
            self.assertNotIn(os.path.dirname(session_commands.__file__), str(error))


class NoCodeUploadTests(ServerTestBase):
    """--no-code-upload: uploaded modules are refused; registered functions run."""

    settings = SessionSettings(code_upload=False)

    def test_refused(self):
        self.assertIsNone(self.upload("mod.py", b"def f():\n    return 1\n"))
        self.assertIsNone(self.upload("lib.so", b"\x7fELF"))
        for path in ("mod.py", "lib.so", "lib.tar"):
            error = self.remote_error(session_commands.LoadModule, path=path)
            self.assertEqual(error.short_type_name, "CodeUploadRefused")
            self.assertIn("--no-code-upload", error.message)
        error = self.remote_error(session_commands.CallFunction, name="tvm.rpc.server.load_module",
                                  args=values.encode(["mod.py"]))
        self.assertEqual(error.short_type_name, "CodeUploadRefused")
        self.still_usable()

    def test_check_for_tvms_path(self):
        """The check TVM's protocol path calls before linking a module."""
        environment = SessionEnvironment.create(
            self.root, self.registry, settings=SessionSettings(code_upload=False))
        self.addCleanup(environment.close)
        self.assertRaises(CodeUploadRefused, environment.check_code_upload, "x.tar")
        allowed = SessionEnvironment.create(self.root, self.registry)
        self.addCleanup(allowed.close)
        self.assertIsNone(allowed.check_code_upload("x.tar"))


class ResultLimitTests(SessionTestBase):
    """The client refuses results above its max_result_size without reading them."""

    session_options = {"max_result_size": 100_000}

    def test_too_large_result(self):
        failure = self.failure(self.session.call("big", 200_000), ResultTooLarge)
        self.assertIn("100000", str(failure.value))
        self.assertIn("max_result_size", str(failure.value))
        self.assertEqual(self.count(session_commands.StreamRead), 0)
        # The refused result's stream was released on the server.
        self.assertEqual(len(self.environment.streams), 0)
        self.assertEqual(self.resolve(self.session.call("big", 90_000)), b"z" * 90_000)
        self.assertEqual(self.session.max_result_size, 100_000)

    def test_default(self):
        """Sessions get a default bound unless told otherwise."""
        import attrs

        from tvm_rpc.client.engine import DEFAULT_MAX_RESULT_SIZE
        from tvm_rpc.client.rpc_session import RPCSession

        self.assertEqual(attrs.fields(RPCSession).max_result_size.default,
                         DEFAULT_MAX_RESULT_SIZE)
        self.assertLessEqual(DEFAULT_MAX_RESULT_SIZE, values.MAX_SIZE)


class HostileAnswerTests(SynchronousTestCase):
    """A server announcing a huge result makes the client read nothing."""

    def test_announced_gigabyte(self):
        protocol = make_client_protocol()
        from twisted.internet.testing import StringTransport

        transport = StringTransport()
        protocol.makeConnection(transport)
        clock = Clock()
        opening = start_session(protocol, clock=clock)
        protocol.dataReceived(amp.AmpBox(
            _answer=b"1", protocol=session_commands.SESSION_PROTOCOL.encode(),
            version=str(session_commands.SESSION_VERSION).encode(), implementation=b"evil",
            chunk_size=b"524288", window=b"4", max_inline_value=b"61440").serialize())
        session = self.successResultOf(opening)
        transport.clear()
        calling = session.call("f")
        protocol.dataReceived(ampwire.serialize(
            [(b"_answer", b"2"), (b"result_stream", b"7"), (b"result_size", b"%d" % (1 << 30))]))
        failure = self.failureResultOf(calling, ResultTooLarge)
        self.assertIn(str(1 << 30), str(failure.value))
        sent = transport.value()
        self.assertNotIn(b"StreamRead", sent)
        self.assertIn(b"StreamClose", sent)


class SettingsTests(SynchronousTestCase):
    """The settings value, its JSON form and its validation."""

    def test_defaults(self):
        settings = SessionSettings()
        self.assertEqual(
            (settings.max_box_bytes, settings.max_streams, settings.max_work_dir_bytes,
             settings.send_tracebacks, settings.code_upload),
            (DEFAULT_MAX_BOX_BYTES, DEFAULT_MAX_STREAMS, DEFAULT_MAX_WORK_DIR_BYTES, False, True))

    @given(st.builds(SessionSettings,
                     max_box_bytes=st.integers(MIN_MAX_BOX_BYTES, 1 << 40),
                     max_streams=st.integers(1, 1 << 20),
                     max_work_dir_bytes=st.integers(1, 1 << 50),
                     send_tracebacks=st.booleans(), code_upload=st.booleans()))
    def test_json_round_trip(self, settings):
        self.assertEqual(SessionSettings.from_json(settings.to_json()), settings)

    def test_bad_json(self):
        for text in ['[]', '{"max_streams": 0}', '{"nope": 1}', '{"send_tracebacks": 1}',
                     '{"max_box_bytes": 1000}']:
            self.assertRaises(ValueError, SessionSettings.from_json, text)

    def test_parse_bytes(self):
        self.assertEqual([parse_bytes(t) for t in ("100", "512K", "4GiB", "2 MB", "1t")],
                         [100, 512 << 10, 4 << 30, 2 << 20, 1 << 40])
        for text in ("", "x", "1.5G", "-1", "G", "10 kg"):
            self.assertRaises(ValueError, parse_bytes, text)

    def test_work_dir_full_message(self):
        self.assertEqual(str(WorkDirFull("why")), "why")


class OptionsTests(SynchronousTestCase):
    """The limits as rpc-server options, validated, shown, and passed on."""

    def parse(self, *args):
        options = tap.Options()
        options.parseOptions(list(args))
        return options

    def test_defaults_and_values(self):
        self.assertEqual(self.parse()["session-settings"], SessionSettings())
        settings = self.parse("--max-box-bytes", "2M", "--max-streams", "9",
                              "--max-work-dir-bytes", "1G", "--send-tracebacks",
                              "--no-code-upload")["session-settings"]
        self.assertEqual(settings, SessionSettings(2 << 20, 9, 1 << 30, True, False))

    def test_bad_values(self):
        for args in (["--max-box-bytes", "1000"], ["--max-box-bytes", "lots"],
                     ["--max-streams", "0"], ["--max-work-dir-bytes", "0"]):
            self.assertRaises(usage.UsageError, self.parse, *args)
        try:
            self.parse("--max-box-bytes", "1000")
        except usage.UsageError as e:
            self.assertIn("--max-box-bytes", str(e))

    def test_help(self):
        text = str(tap.Options())
        for option in ("--max-box-bytes", "--max-streams", "--max-work-dir-bytes",
                       "--send-tracebacks", "--no-code-upload"):
            self.assertIn(option, text)

    def test_passed_to_the_worker_pool(self):
        """The fork server's command line carries the settings as one JSON value."""
        from twisted.internet.testing import MemoryReactorClock

        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        options = self.parse("--work-dir", root, "--max-streams", "7", "--no-code-upload")
        service = tap.makeService(options, reactor=MemoryReactorClock())
        pool = service.runner
        self.assertIsInstance(pool, WorkerPool)
        argv = pool.argv(3, 4)
        settings = SessionSettings.from_json(argv[argv.index("--session-settings") + 1])
        self.assertEqual((settings.max_streams, settings.code_upload), (7, False))

    def test_in_process_sessions_get_them(self):
        """--in-process sessions are made with the settings too."""
        from twisted.internet.testing import MemoryReactorClock

        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        options = self.parse("--in-process", "--work-dir", root, "--send-tracebacks")
        service = tap.makeService(options, reactor=MemoryReactorClock())
        session = service.runner.make_protocol()
        self.assertTrue(session.settings.send_tracebacks)
        self.assertTrue(session.send_tracebacks)


class IdleTimeoutTests(SynchronousTestCase):
    """--idle-timeout: a session with no call for that long is ended, and its client told why."""

    def connect(self, idle_timeout):
        root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, root, True)
        clock = Clock()
        client, server, pump = connectedServerAndClient(
            lambda: SessionProtocol(root, Registry(), clock=clock, backend="numpy",
                                    settings=SessionSettings(idle_timeout=idle_timeout)),
            make_client_protocol, clock=clock)
        opening = start_session(client, clock=clock)
        pump.flush()
        return clock, pump, client, self.successResultOf(opening)

    def test_idle_session_ended(self):
        clock, pump, client, session = self.connect(5)
        clock.advance(4)
        names = session.call("tvm_rpc.server.list_functions")
        pump.flush()
        self.successResultOf(names)
        # Counted again from the last message: 4 s more are not 5 s of silence.
        clock.advance(4)
        pump.flush()
        self.assertFalse(session.closed)
        clock.advance(1.1)
        pump.flush()
        self.assertEqual(client.end_code, "idle")
        failure = self.failureResultOf(session.call("tvm_rpc.server.list_functions"))
        self.assertIn("--idle-timeout", str(failure.value))
        self.assertTrue(session.closed)

    def test_off_by_default(self):
        clock, pump, client, session = self.connect(None)
        clock.advance(86400)
        pump.flush()
        self.assertFalse(session.closed)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_option(self):
        from tvm_rpc.server.tap import Options

        options = Options()
        options.parseOptions(["--idle-timeout", "90"])
        self.assertEqual(options["session-settings"].idle_timeout, 90)
        self.assertIsNone(SessionSettings().idle_timeout)
        self.assertRaises(ValueError, SessionSettings, idle_timeout=0)
