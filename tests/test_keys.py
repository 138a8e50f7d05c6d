"""Matchkeys and their redaction in log lines (pure logic, property tests)."""

from hypothesis import given
from hypothesis import strategies as st
import pytest

from tvm_rpc.protocol.keys import random_matchkey, redact_matchkeys, split_matchkey

# Device keys as labs name them (a key that itself holds ``:0.123...`` would be cut too).
pytestmark = pytest.mark.unit


keys = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyzABC_-:."), min_size=1, max_size=30)


@given(keys)
def test_redaction_hides_the_random_part(key):
    """A redacted matchkey keeps its device key, never its random part."""
    matchkey = random_matchkey(key)
    _, secret = split_matchkey(matchkey)
    for text in (matchkey, f"client:{matchkey} -timeout=3", f"presented '{matchkey}'"):
        redacted = redact_matchkeys(text)
        assert key in redacted
        if len(secret) > 6:
            assert secret not in redacted


@given(st.floats(min_value=0, max_value=1, exclude_max=True))
def test_tvm_matchkeys_redacted_too(random):
    """TVM's matchkeys (str of a float) are cut as ours are."""
    secret = str(random)
    if len(secret) > 6 and "e" not in secret:
        assert secret not in redact_matchkeys(f"rasp:{secret}")


def test_text_without_matchkeys_unchanged():
    for text in ("rasp", "server:rasp", "client:dev -timeout=10", "a:b:c"):
        assert redact_matchkeys(text) == text


def test_proxy_stale_renewal_logs_no_matchkey():
    """The proxy's log line for a renewed, never-used matchkey hides its secret part."""
    from twisted.logger import Logger, capturedLogs, formatEvent

    from tvm_rpc.proxy.registration import _WaitingServer

    class Offer:
        key = "board"

    class Pool:
        renewed = []

        def renew(self, offer):
            self.renewed.append(offer)

    class Owner:
        log = Logger()
        pool = Pool()

    matchkey = random_matchkey("board")
    with capturedLogs() as events:
        _WaitingServer(Owner(), Offer()).renew_stale(matchkey)
    text = " ".join(formatEvent(event) for event in events)
    assert "board" in text and split_matchkey(matchkey)[1] not in text
    assert Pool.renewed


@given(keys, st.booleans())
def test_resume_token_round_trip_and_redaction(key, timeout):
    """
    Our client's handshake key carries a resume token the server reads back
    exactly; a log line of that key never shows it.
    """
    from tvm_rpc.protocol.flavour import client_key
    from tvm_rpc.protocol.keys import parse_client_key, parse_resume_option, resume_token
    from tvm_rpc.server.listener import read_client_key

    token = resume_token()
    text = client_key(key, 5 if timeout else None, token)
    _, options = parse_client_key(text)
    assert parse_resume_option(options) == token
    assert read_client_key(text)[3] == token
    assert token not in redact_matchkeys(text)
    assert read_client_key(client_key(key))[3] is None


@pytest.mark.parametrize("bad", ["", "x" * 32, "0" * 31, "0" * 33, "A" * 32, "../" * 11])
def test_bad_resume_token_is_a_bad_key(bad):
    """A token not shaped as ours makes the key bad (the server refuses it, cleanly)."""
    from tvm_rpc.server.listener import read_client_key

    with pytest.raises(ValueError, match="resume token"):
        read_client_key(f"client:k -resume={bad} -tvm_rpc=1")
