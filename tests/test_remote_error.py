"""Responders' errors reach the peer as RemoteError boxes, wrapped once by RemoteErrorLocator."""

import pytest
from twisted.internet.defer import fail
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol import calls
from tvm_rpc.protocol.remote_error import REMOTE_ERROR_CODE, RemoteError, RemoteErrorLocator
from tvm_rpc.protocol.session_commands import (
    Free,
    GetFunction,
    LoadModule,
    OpenDownload,
    OpenValue,
)


pytestmark = pytest.mark.unit


class Failing(RemoteErrorLocator, amp.AMP):
    """Responders that fail in each way a responder can."""

    @GetFunction.responder
    def get_function(self, name):
        """Raise at once."""
        raise KeyError(name)

    @OpenDownload.responder
    def open_download(self, path):
        """Fail later, through a Deferred."""
        return fail(PermissionError(f"no access to {path}"))

    @Free.responder
    def free(self, handles):
        """Raise a RemoteError of its own (passed on as it is)."""
        raise RemoteError("somewhere.Else", "passed on", "")

    @LoadModule.responder
    def load_module(self, path):
        """Answer what the response cannot serialize (an AMP error, not ours)."""
        return {}

    @OpenValue.responder
    def open_value(self, size):
        """Answer."""
        return {"stream": size}


def answer_to(box, send_tracebacks=False):
    """@return: what a L{Failing} peer writes when it receives C{box}, and its transport."""
    peer = Failing()
    peer.send_tracebacks = send_tracebacks
    transport = StringTransport()
    peer.makeConnection(transport)
    peer.dataReceived(box.serialize())
    return transport.value(), transport


def error_box(tag, error):
    """@return: the bytes of AMP's box for a declared RemoteError C{error}."""
    return amp.AmpBox(_error=tag, _error_code=REMOTE_ERROR_CODE,
                      _error_description=error.wire_description().encode("utf-8")).serialize()


class RemoteErrorLocatorTests(SynchronousTestCase):
    """The error boxes, byte for byte."""

    def test_raised(self):
        """An exception raised by a responder is a RemoteError with its type and message."""
        written, transport = answer_to(amp.AmpBox(_command=b"GetFunction", _ask=b"1", name=b"f"))
        error = RemoteError("KeyError", "'f'", "")
        self.assertEqual(written, error_box(b"1", error))
        self.assertEqual(written, calls.error_box(b"1", error))
        self.assertFalse(transport.disconnecting)

    def test_failed_later(self):
        """A Deferred that fails gives the same kind of box."""
        written, _ = answer_to(amp.AmpBox(_command=b"OpenDownload", _ask=b"2", path=b"x"))
        error = RemoteError("PermissionError", "no access to x", "")
        self.assertEqual(written, error_box(b"2", error))

    def test_remote_error_passed_on(self):
        """A RemoteError raised by a responder is sent as it is."""
        written, _ = answer_to(amp.AmpBox(_command=b"Free", _ask=b"3", handles=b""))
        self.assertEqual(written, error_box(b"3", RemoteError("somewhere.Else", "passed on", "")))

    def test_tracebacks(self):
        """With send_tracebacks, the error carries the responder's traceback."""
        written, _ = answer_to(amp.AmpBox(_command=b"GetFunction", _ask=b"1", name=b"f"),
                               send_tracebacks=True)
        [box] = amp.parseString(written)
        error = RemoteError(box[b"_error_description"].decode("utf-8"))
        self.assertEqual((error.type_name, error.message), ("KeyError", "'f'"))
        self.assertIn("get_function", error.traceback_text)
        self.assertIn("raise KeyError(name)", error.traceback_text)

    def test_amp_errors_stay_amp_errors(self):
        """
        Arguments that do not parse and an answer that cannot be serialized
        are AMP's unknown errors (and close the connection), as without the
        locator.
        """
        for box in [amp.AmpBox(_command=b"OpenValue", _ask=b"4", size=b"not a number"),
                    amp.AmpBox(_command=b"LoadModule", _ask=b"5", path=b"m.py")]:
            written, transport = answer_to(box)
            [reply] = amp.parseString(written)
            self.assertEqual(reply[b"_error_code"], amp.UNKNOWN_ERROR_CODE)
            self.assertEqual(reply[b"_error_description"], b"Unknown Error")
            self.assertTrue(transport.disconnecting)
        self.flushLoggedErrors()

    def test_answers_untouched(self):
        """A responder that answers is answered as by AMP."""
        written, _ = answer_to(amp.AmpBox(_command=b"OpenValue", _ask=b"6", size=b"7"))
        self.assertEqual(written, amp.AmpBox(_answer=b"6", stream=b"7").serialize())

    def test_unknown_command(self):
        """A command without a responder is AMP's unhandled-command error."""
        written, _ = answer_to(amp.AmpBox(_command=b"Nothing", _ask=b"7"))
        [reply] = amp.parseString(written)
        self.assertEqual(reply[b"_error_code"], amp.UNHANDLED_ERROR_CODE)


class ReadableTests(SynchronousTestCase):
    """What a user reads: one line, the traceback apart, the server named."""

    def test_str_is_one_line(self):
        """str() is C{Type: message}, whitespace folded, without the traceback."""
        error = RemoteError("builtins.FileNotFoundError",
                            "no file 'model.so'\n in the work directory", "Traceback ...\n")
        self.assertEqual(str(error), "FileNotFoundError: no file 'model.so' in the work directory")
        self.assertEqual(error.traceback_text, "Traceback ...\n")
        self.assertIn("Traceback ...", repr(error))

    def test_located(self):
        """located() names the server once; str() ends with it."""
        error = RemoteError("FileNotFoundError", "no file 'model.so' in the work directory", "")
        self.assertIs(error.located("127.0.0.1:9091"), error)
        error.located("10.0.0.1:1")
        self.assertEqual(str(error), "FileNotFoundError: no file 'model.so' in the work directory"
                                     " (on 127.0.0.1:9091)")

    def test_wire_description_round_trips(self):
        """The wire keeps the JSON form: RemoteError(description) rebuilds all three parts."""
        error = RemoteError("a.B", "message", "trace")
        again = RemoteError(error.wire_description())
        self.assertEqual((again.type_name, again.message, again.traceback_text),
                         ("a.B", "message", "trace"))
        self.assertIsNone(again.address)


class LocatedEngineTests(SynchronousTestCase):
    """The session's engine names its server in the remote errors of its Deferreds."""

    def test_failures_name_the_address(self):
        """A Deferred's RemoteError gains the address; other values and errors pass through."""
        from twisted.internet.defer import fail, succeed

        from tvm_rpc.client.located_engine import LocatedEngine

        class Engine:
            protocol_name = "amp"

            def download(self, path):
                return fail(RemoteError("FileNotFoundError", f"no file {path!r}", ""))

            def call(self):
                return succeed(3)

            def remove(self, path):
                return fail(ValueError(path))

        engine = LocatedEngine(Engine(), "127.0.0.1:9091")
        self.assertEqual(engine.protocol_name, "amp")
        self.assertEqual(self.successResultOf(engine.call()), 3)
        self.assertEqual(str(self.failureResultOf(engine.download("m.so"), RemoteError).value),
                         "FileNotFoundError: no file 'm.so' (on 127.0.0.1:9091)")
        self.failureResultOf(engine.remove("x"), ValueError)
