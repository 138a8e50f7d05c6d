"""The call path's boxes are byte for byte what AMP itself writes and reads for CallFunction."""

from hypothesis import given
from hypothesis import strategies as st
import pytest
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.trial.unittest import SynchronousTestCase

from tvm_rpc.protocol import calls
from tvm_rpc.protocol.ampwire import BoxError
from tvm_rpc.protocol.remote_error import RemoteError, RemoteErrorLocator
from tvm_rpc.protocol.session_commands import CallFunction

pytestmark = pytest.mark.unit


tags = st.integers(1, 2**40).map(lambda counter: b"%x" % counter)
optional_ints = st.none() | st.integers(-(2**70), 2**70)
optional_bytes = st.none() | st.binary(max_size=2000)
optional_names = st.none() | st.text(max_size=40)


def amp_box(command_box, **keys):
    """@return: the bytes of C{command_box} (an L{amp.AmpBox}) with C{keys} added."""
    for key, value in keys.items():
        command_box[key.encode("ascii")] = value
    return command_box.serialize()


def parsed(data):
    """@return: the one box in C{data}, as AMP parses it."""
    [box] = amp.parseString(data)
    return box


class RequestTests(SynchronousTestCase):
    """request_box() and parse_request() against AMP's makeArguments and parseArguments."""

    @given(tags, optional_bytes, optional_ints, optional_names, optional_ints)
    def test_request_box(self, tag, args, function, name, args_stream):
        """request_box() writes what callRemote(CallFunction, ...) writes."""
        objects = {"args": args, "function": function, "name": name, "args_stream": args_stream}
        expected = amp_box(CallFunction.makeArguments(objects, None),
                           _command=b"CallFunction", _ask=tag)
        encoded_name = None if name is None else name.encode("utf-8")
        self.assertEqual(calls.request_box(tag, args, function, encoded_name, args_stream),
                         expected)

    @given(tags, optional_bytes, optional_ints, optional_names, optional_ints)
    def test_parse_request(self, tag, args, function, name, args_stream):
        """parse_request() reads what AMP's parseArguments reads."""
        objects = {"args": args, "function": function, "name": name, "args_stream": args_stream}
        box = parsed(amp_box(CallFunction.makeArguments(objects, None),
                             _command=b"CallFunction", _ask=tag))
        expected = CallFunction.parseArguments(amp.AmpBox(box), None)
        self.assertEqual(
            calls.parse_request(box),
            (expected["function"], expected["name"], expected["args"], expected["args_stream"]))

    @given(tags, optional_bytes, optional_ints, optional_names, optional_ints, st.booleans())
    def test_handle_call(self, tag, args, function, name, args_stream, asked):
        """handle_call() reads a handle and inline arguments exactly when nothing else is there."""
        objects = {"args": args, "function": function, "name": name, "args_stream": args_stream}
        box = amp.AmpBox(CallFunction.makeArguments(objects, None), _command=b"CallFunction")
        if asked:
            box[b"_ask"] = tag
        box = parsed(box.serialize())
        common = (asked and args is not None and function is not None
                  and name is None and args_stream is None)
        if common:
            self.assertEqual(calls.handle_call(box), (function, args))
            self.assertEqual(calls.parse_request(box), (function, None, args, None))
        else:
            self.assertIsNone(calls.handle_call(box))

    def test_request_limits(self):
        """Values too long for one AMP value are refused before anything is sent."""
        self.assertRaises(BoxError, calls.request_box, b"1", b"x" * 0x10000)
        self.assertRaises(BoxError, calls.request_box, b"1", b"", None, b"n" * 0x10000)
        longest = parsed(calls.request_box(b"1", b"x" * 0xFFFF))
        self.assertEqual(len(longest[b"args"]), 0xFFFF)

    def test_bad_integer(self):
        """An integer that does not parse is a ValueError, as for AMP."""
        box = {b"_command": b"CallFunction", b"function": b"not a number"}
        self.assertRaises(ValueError, calls.parse_request, box)
        self.assertRaises(ValueError, CallFunction.parseArguments, box, None)


class AnswerTests(SynchronousTestCase):
    """answer_box() and parse_answer() against AMP's makeResponse and parseResponse."""

    @given(tags, st.binary(max_size=2000))
    def test_answer_box(self, tag, result):
        """answer_box() writes what AMP's dispatch writes for an inline result."""
        expected = amp_box(CallFunction.makeResponse({"result": result}, None),
                           _answer=tag)
        self.assertEqual(calls.answer_box(tag, result), expected)

    @given(tags, st.integers(-(2**70), 2**70), st.integers(-(2**70), 2**70))
    def test_streamed_answer_box(self, tag, result_stream, result_size):
        """streamed_answer_box() writes what AMP's dispatch writes for a streamed result."""
        objects = {"result_stream": result_stream, "result_size": result_size}
        expected = amp_box(CallFunction.makeResponse(objects, None), _answer=tag)
        self.assertEqual(calls.streamed_answer_box(tag, result_stream, result_size), expected)

    @given(tags, optional_bytes, optional_ints, optional_ints)
    def test_parse_answer(self, tag, result, result_stream, result_size):
        """parse_answer() reads what AMP's parseResponse reads."""
        objects = {"result": result, "result_stream": result_stream, "result_size": result_size}
        box = parsed(amp_box(CallFunction.makeResponse(objects, None), _answer=tag))
        expected = CallFunction.parseResponse(amp.AmpBox(box), None)
        self.assertEqual(calls.parse_answer(box), expected)

    def test_answer_limits(self):
        """A result too long for one AMP value is refused."""
        self.assertRaises(BoxError, calls.answer_box, b"7", b"x" * 0x10000)
        self.assertEqual(len(parsed(calls.answer_box(b"7", b"x" * 0xFFFF))[b"result"]), 0xFFFF)


class Raising(RemoteErrorLocator, amp.AMP):
    """An AMP peer with the server's error locator; its CallFunction raises what it is told."""

    error = None

    @CallFunction.responder
    def call_function(self, function=None, name=None, args=None, args_stream=None):
        """Raise the error set on the class."""
        raise self.error


class ErrorTests(SynchronousTestCase):
    """error_box() and error_of() against AMP's own dispatch and callRemote."""

    @given(tags, st.text(max_size=50), st.text(max_size=200), st.text(max_size=200))
    def test_error_box(self, tag, type_name, message, traceback_text):
        """error_box() writes what AMP's dispatch writes for a declared RemoteError."""
        error = RemoteError(type_name, message, traceback_text)
        peer = Raising()
        peer.error = error
        transport = StringTransport()
        peer.makeConnection(transport)
        peer.dataReceived(amp_box(amp.AmpBox(), _command=b"CallFunction", _ask=tag))
        self.assertEqual(calls.error_box(tag, error), transport.value())

    def error_from_call_remote(self, box):
        """@return: the exception callRemote(CallFunction) fails with when C{box} answers it."""
        peer = amp.AMP()
        peer.makeConnection(StringTransport())
        failures = []
        peer.callRemote(CallFunction, name="f").addErrback(failures.append)
        peer.dataReceived(amp.AmpBox(box, _error=b"1").serialize())
        [failure] = failures
        return failure.value

    def test_error_of_remote_error(self):
        """A REMOTE_ERROR answer becomes the RemoteError callRemote gives."""
        error = RemoteError("builtins.KeyError", "'x'", "Traceback ...")
        box = parsed(calls.error_box(b"1", error))
        expected = self.error_from_call_remote(box)
        got = calls.error_of(box)
        self.assertIs(type(got), type(expected))
        self.assertEqual(
            (got.type_name, got.message, got.traceback_text),
            (expected.type_name, expected.message, expected.traceback_text))
        self.assertEqual((got.type_name, got.message), ("builtins.KeyError", "'x'"))

    def test_error_of_unknown_code(self):
        """An undeclared error code becomes AMP's UnknownRemoteError, as with callRemote."""
        box = {b"_error_code": b"UNKNOWN", b"_error_description": b"Unknown Error \xff"}
        expected = self.error_from_call_remote(box)
        got = calls.error_of(box)
        self.assertIs(type(got), amp.UnknownRemoteError)
        self.assertIs(type(expected), amp.UnknownRemoteError)
        self.assertEqual(got.args, expected.args)
