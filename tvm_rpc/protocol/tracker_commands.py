"""The tracker's command vocabulary: TVM's JSON frames, declared once.

Tracker commands encode onto TVM's JSON frames, so real TVM peers understand
them. Each command is a frozen attrs class that knows its wire message
(L{_Command.to_message} / L{_Command.from_message}) and its reply
(L{_Command.encode_result} / L{_Command.decode_result}). A message that does not fit
its command raises L{BadMessage} (a protocol violation: the receiver
closes the connection); a well-formed FAIL reply raises L{TrackerError}.
"""

import math
from typing import ClassVar

import attrs

from .constants import TrackerCode


class BadMessage(ValueError):
    """A message or reply that breaks the protocol."""


class TrackerError(Exception):
    """The tracker answered FAIL."""


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite_number(value):
    """Whether C{value} is a number a float can hold (JSON allows Infinity and huge ints)."""
    if not _is_number(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _port(value):
    """A port as TVM's servers send it: an int, or a string of digits (cpp_rpc)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if not _is_int(value) or not 0 <= value <= 65535:
        raise BadMessage(f"bad port {value!r}")
    return value


def _string(value, what):
    if not isinstance(value, str):
        raise BadMessage(f"{what} must be a string, not {value!r}")
    return value


def _expect_success(value):
    if value == TrackerCode.SUCCESS and _is_int(value):
        return None
    if value == TrackerCode.FAIL and _is_int(value):
        raise TrackerError("tracker answered FAIL")
    raise BadMessage(f"unexpected reply {value!r}")


class _Command:
    """
    Shared behaviour: the argument count check, the plain 0 reply, and the
    message of a command without arguments (C{[code]}).

    C{arity} is the (lowest, highest) length of the message, code included;
    a highest of L{None} accepts any extra elements, which TVM's tracker
    ignores for the commands that take no arguments (it answers C{[1, "x"]}
    as a PING).
    """

    code: ClassVar[TrackerCode]
    arity: ClassVar[tuple] = (1, None)

    @classmethod
    def check_arity(cls, message):
        low, high = cls.arity
        if len(message) < low or (high is not None and len(message) > high):
            most = "any number of" if high is None else f"{low - 1} to {high - 1}"
            raise BadMessage(
                f"{cls.code.name} takes {most} arguments, got {len(message) - 1}"
            )

    def to_message(self):
        """@return: the command as a JSON value (a list that starts with its code)."""
        return [int(self.code)]

    @classmethod
    def from_message(cls, message):
        """
        @param message: a decoded frame whose first element is C{cls.code}.
        @return: the command.
        @raise BadMessage: when the message does not fit the command.
        """
        cls.check_arity(message)
        return cls()

    @staticmethod
    def encode_result(result):
        """@return: the reply as a JSON value (plain success)."""
        return int(TrackerCode.SUCCESS)

    @staticmethod
    def decode_result(value):
        """@raise TrackerError: on FAIL. @raise BadMessage: on anything else."""
        return _expect_success(value)


@attrs.frozen
class Ping(_Command):
    """Liveness check: C{[PING]} -> C{0}."""

    code: ClassVar = TrackerCode.PING


@attrs.frozen
class Stop(_Command):
    """Stop the tracker if the key matches: C{[STOP, key]} -> C{0} or C{-1}."""

    code: ClassVar = TrackerCode.STOP
    arity: ClassVar = (2, 2)
    stop_key: str

    def to_message(self):
        return [int(self.code), self.stop_key]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        return cls(_string(message[1], "stop key"))

    @staticmethod
    def encode_result(result):
        """@param result: whether the tracker stops."""
        return int(TrackerCode.SUCCESS if result else TrackerCode.FAIL)


@attrs.frozen
class Put(_Command):
    """
    Offer a free server: C{[PUT, key, [port, matchkey], custom_addr]} -> C{0}.

    TVM's servers send 3 or 4 elements, the port as an int or a string, and a
    custom address that is a string or null.
    """

    code: ClassVar = TrackerCode.PUT
    arity: ClassVar = (3, 4)
    key: str
    port: int
    matchkey: str
    custom_addr: "str | None" = None

    def to_message(self):
        return [int(self.code), self.key, [self.port, self.matchkey], self.custom_addr]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        key = _string(message[1], "key")
        address = message[2]
        if not isinstance(address, list) or len(address) != 2:
            # The shape only: the value may hold a matchkey, and this ends up in logs.
            shape = (f"a list of {len(address)}" if isinstance(address, list)
                     else type(address).__name__)
            raise BadMessage(f"PUT wants [port, matchkey], got {shape}")
        custom = message[3] if len(message) == 4 else None
        if custom is not None:
            custom = _string(custom, "custom address")
        return cls(key, _port(address[0]), _string(address[1], "matchkey"), custom)


@attrs.frozen
class Allocation:
    """What a request obtains: where the server is and the matchkey to present."""

    host: str
    port: int
    matchkey: str


@attrs.frozen
class Request(_Command):
    """
    Ask for a server: C{[REQUEST, key, user, priority, options?]}.

    Answered, when a server is free, by C{[0, [host, port, matchkey]]}. The
    optional fifth element is ours (TVM's tracker ignores it):
    C{{"timeout": seconds}} makes the tracker answer C{[-1, reason]} when no
    server came in time.
    """

    code: ClassVar = TrackerCode.REQUEST
    arity: ClassVar = (4, 5)
    key: str
    user: str = ""
    priority: float = 1
    timeout: "float | None" = None

    def to_message(self):
        message = [int(self.code), self.key, self.user, self.priority]
        if self.timeout is not None:
            message.append({"timeout": self.timeout})
        return message

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        key = _string(message[1], "key")
        user = message[2]
        if user is None:
            user = ""
        user = _string(user, "user")
        priority = message[3]
        if not _is_finite_number(priority):
            raise BadMessage(f"bad priority {priority!r}")
        timeout = None
        if len(message) == 5 and message[4] is not None:
            options = message[4]
            if not isinstance(options, dict):
                raise BadMessage(f"request options must be an object, not {options!r}")
            timeout = options.get("timeout")
            if timeout is not None and (not _is_finite_number(timeout) or not timeout > 0):
                raise BadMessage(f"bad request timeout {timeout!r}")
        return cls(key, user, priority, timeout)

    @staticmethod
    def encode_result(result):
        """
        @param result: an L{Allocation}, or a L{str} saying why the request failed.
        """
        if isinstance(result, Allocation):
            return [int(TrackerCode.SUCCESS), [result.host, result.port, result.matchkey]]
        return [int(TrackerCode.FAIL), str(result)]

    @staticmethod
    def decode_result(value):
        """@return: an L{Allocation}. @raise TrackerError: when the request failed."""
        if not isinstance(value, list) or len(value) != 2:
            raise BadMessage(f"unexpected reply to REQUEST {value!r}")
        code, body = value
        if code == TrackerCode.FAIL:
            raise TrackerError(str(body))
        if code != TrackerCode.SUCCESS or not isinstance(body, list) or len(body) != 3:
            raise BadMessage(f"unexpected reply to REQUEST {value!r}")
        host, port, matchkey = body
        return Allocation(_string(host, "host"), _port(port), _string(matchkey, "matchkey"))


@attrs.frozen
class UpdateInfo(_Command):
    """
    Describe this connection: C{[UPDATE_INFO, {"key": ..., "addr": [host, port]}]}.

    The info object is kept whole (TVM merges it into the connection's info);
    a null host in C{addr} is replaced by the peer's address by the tracker.
    C{addr} is required: TVM's tracker reads it unconditionally and closes
    the connection of an info without it.
    """

    code: ClassVar = TrackerCode.UPDATE_INFO
    arity: ClassVar = (2, 2)
    info: dict = attrs.field(eq=False)

    def to_message(self):
        return [int(self.code), self.info]

    @classmethod
    def from_message(cls, message):
        cls.check_arity(message)
        info = message[1]
        if not isinstance(info, dict):
            raise BadMessage(f"UPDATE_INFO wants an object, got {info!r}")
        if "key" in info:
            _string(info["key"], "info key")
        if "addr" not in info:
            raise BadMessage("UPDATE_INFO without addr")
        addr = info["addr"]
        if not isinstance(addr, list) or len(addr) != 2:
            raise BadMessage(f"bad addr {addr!r}"[:200])
        if addr[0] is not None:
            _string(addr[0], "addr host")
        _port(addr[1])
        return cls(info)


@attrs.frozen
class Summary(_Command):
    """The tracker's state: C{[SUMMARY]} -> C{[0, {"queue_info": ..., "server_info": ...}]}."""

    code: ClassVar = TrackerCode.SUMMARY

    @staticmethod
    def encode_result(result):
        return [int(TrackerCode.SUCCESS), result]

    @staticmethod
    def decode_result(value):
        if (
            not isinstance(value, list)
            or len(value) != 2
            or value[0] != TrackerCode.SUCCESS
            or not isinstance(value[1], dict)
        ):
            raise BadMessage(f"unexpected reply to SUMMARY {value!r}")
        return value[1]


@attrs.frozen
class GetPendingMatchkeys(_Command):
    """This connection's matchkeys not yet handed out: C{[7]} -> C{[matchkey, ...]}."""

    code: ClassVar = TrackerCode.GET_PENDING_MATCHKEYS

    @staticmethod
    def encode_result(result):
        return list(result)

    @staticmethod
    def decode_result(value):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadMessage(f"unexpected reply to GET_PENDING_MATCHKEYS {value!r}")
        return value


TRACKER_COMMANDS = {
    command.code: command
    for command in (Ping, Stop, Put, Request, UpdateInfo, Summary, GetPendingMatchkeys)
}


def parse_tracker_message(message):
    """
    Turn a decoded frame into a tracker command.

    @param message: a JSON value from L{tvm_rpc.protocol.framing.FrameDecoder}.
    @return: an instance of one of L{TRACKER_COMMANDS}.
    @raise BadMessage: for anything else (unknown code, wrong shape).
    """
    if not isinstance(message, list) or not message:
        raise BadMessage(f"message must be a non-empty array, got {message!r}"[:200])
    code = message[0]
    if not _is_int(code) or code not in TRACKER_COMMANDS:
        raise BadMessage(f"unknown tracker code {code!r}"[:200])
    return TRACKER_COMMANDS[code].from_message(message)
