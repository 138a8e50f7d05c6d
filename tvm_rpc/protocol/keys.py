"""Device keys, matchkeys and the C{server:}/C{client:} handshake keys."""

import re
import secrets

SERVER_PREFIX = "server:"
CLIENT_PREFIX = "client:"
#: The info key prefix of our proxy's per-server tracker links (not
#: C{server...}, so trackers do not list them as servers).
PROXY_ENTRY_PREFIX = "proxy-entry:"
#: The info key prefix by which a proxy (TVM's and ours) reports itself.
PROXY_INFO_PREFIX = SERVER_PREFIX + "proxy["


def proxy_info_key(keys):
    """@return: the UPDATE_INFO key by which a proxy reports C{keys}, as TVM's."""
    return f"{PROXY_INFO_PREFIX}{','.join(keys)}]"


def is_proxy_info_key(info_key):
    """
    @return: whether an UPDATE_INFO key is a proxy's: its own report
        (C{server:proxy[...]}) or one of our proxy's per-server links.
    """
    return info_key.startswith((PROXY_INFO_PREFIX, PROXY_ENTRY_PREFIX))


def random_matchkey(key):
    """
    Make a fresh matchkey for a device key, shaped as TVM's: C{<key>:<random>}.

    @param key: the device key, which may itself contain C{:}.
    @return: the matchkey.
    """
    return f"{key}:{secrets.randbelow(10**16) / 10**16!r}"


# The random part of a matchkey, ours and TVM's alike: C{repr} or C{str} of
# a float in [0, 1).
_RANDOM_PART = re.compile(r"(:0\.\d{2})\d+(?:e-\d+)?")

#: The handshake option by which our client asks to continue in the worker
#: that served its previous session on that server (see L{resume_token}).
RESUME_OPTION = "resume"
_RESUME_VALUE = re.compile(r"[0-9a-f]{32}")
_RESUME_IN_TEXT = re.compile(r"(-" + RESUME_OPTION + r"=)\S+")


def resume_token():
    """
    @return: a fresh token for a worker kept for its client's next session:
        whoever presents it joins that worker, so it is as secret as a
        matchkey (128 random bits, never logged).
    """
    return secrets.token_hex(16)


def parse_resume_option(options):
    """
    @param options: as returned by L{parse_client_key}.
    @return: the resume token the client presented, or L{None}.
    @raise ValueError: when it is not shaped as L{resume_token} makes them.
    """
    raw = options.get(RESUME_OPTION)
    if raw is None:
        return None
    if not _RESUME_VALUE.fullmatch(raw):
        raise ValueError("bad resume token (not 32 hex digits)")
    return raw


def redact_matchkeys(text):
    """
    Hide the secret part of every matchkey in C{text}, for log lines: a
    matchkey read from a log is a session someone else can take.

    @param text: a matchkey, a handshake key, or any text holding them.
    @return: the text with each matchkey's random part cut after two digits
        (C{rasp:0.12…}) and each resume token hidden (C{-resume=…}).
    """
    return _RESUME_IN_TEXT.sub("\\1\u2026", _RANDOM_PART.sub("\\1\u2026", str(text)))


def split_matchkey(matchkey):
    """
    Split a matchkey into its device key and random part.

    Keys may contain C{:}, so only the last one separates.

    @return: C{(key, random_part)}; C{random_part} is C{""} when absent.
    """
    key, sep, rest = matchkey.rpartition(":")
    if not sep:
        return matchkey, ""
    return key, rest


def parse_client_key(text):
    """
    Parse what a client sends in an RPC handshake.

    @param text: C{client:<matchkey>} optionally followed by options such as
        C{ -timeout=<seconds>}.
    @return: C{(matchkey, options)} where options maps option names (without
        the dash) to their string values.
    @raise ValueError: when C{text} is not a client key.
    """
    if not text.startswith(CLIENT_PREFIX):
        raise ValueError(f"not a client key: {text!r}")
    parts = text[len(CLIENT_PREFIX) :].split(" ")
    options = {}
    for part in parts[1:]:
        if not part:
            continue
        if not part.startswith("-") or "=" not in part:
            raise ValueError(f"bad option {part!r} in client key")
        name, _, value = part[1:].partition("=")
        options[name] = value
    return parts[0], options


def parse_timeout_option(options):
    """
    @param options: as returned by L{parse_client_key}.
    @return: the session timeout in seconds, or L{None} for none (0 means none,
        as in TVM).
    @raise ValueError: when the timeout is not a non-negative number.
    """
    raw = options.get("timeout")
    if raw is None:
        return None
    value = float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"bad timeout {raw!r}")
    return value or None
