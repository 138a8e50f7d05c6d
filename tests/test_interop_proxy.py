"""Our proxy with the real apache-tvm: TVM's servers behind it, TVM's clients,
TVM's tracker and query tool, as real processes on loopback."""

import re
import subprocess
import sys
import time

import pytest

from daemons import (
    Daemon,
    child_env,
    our_proxy,
    our_tracker,
    tvm_proxy,
    tvm_rpc_server_through,
    tvm_tracker,
    twistd,
    wait_until,
)
from tvm_rpc.protocol.keys import redact_matchkeys

pytestmark = pytest.mark.system

KEY = "interop-dev"


def tvm_server_through(port, key=KEY):
    """TVM's server connecting out to a proxy, stopped (whole group) at the end."""
    return tvm_rpc_server_through(port, key)


def wait_free(tvm, tracker_port, key, want, timeout=30):
    """Wait until the tracker's summary shows C{want} free servers for C{key}."""
    last = [None]

    def reached():
        summary = last[0] = tvm.rpc.connect_tracker("127.0.0.1", tracker_port).summary()
        return summary if summary["queue_info"].get(key, {}).get("free", 0) == want else None

    return wait_until(reached, timeout, what=lambda: f"{want} free (last: {last[0]})")


def use_session(session):
    """Round-trip a blob and call a server function through the relay."""
    blob = bytes(range(256)) * 4096
    session.upload(bytearray(blob), "blob.bin")
    assert bytes(session.download("blob.bin")) == blob
    workpath = session.get_function("tvm.rpc.server.workpath")
    assert workpath("blob.bin").endswith("blob.bin")


def test_tvm_server_behind_our_proxy_reached_through_our_tracker(tvm):
    with our_tracker() as (tracker, tracker_port), \
         our_proxy("--tracker", f"127.0.0.1:{tracker_port}") as (proxy, proxy_port), \
         tvm_server_through(proxy_port) as server:
        proxy.wait_for(f"presented 'server:{KEY}'", timeout=60)
        wait_free(tvm, tracker_port, KEY, 1)
        # Our query tool counts the key served behind the proxy (TVM's drops its row).
        text = subprocess.run(
            [sys.executable, "-m", "tvm_rpc.query", "--host", "127.0.0.1",
             "--port", str(tracker_port)],
            capture_output=True, text=True, timeout=60, env=child_env(),
        ).stdout
        assert f"server:proxy[{KEY}]" in text, text
        rows = [line.split() for line in text.splitlines() if line.startswith(KEY + " ")]
        assert rows == [[KEY, "1", "1", "0"]], text
        client = tvm.rpc.connect_tracker("127.0.0.1", tracker_port)
        for _ in range(2):
            session = client.request(KEY, session_timeout=60)
            use_session(session)
            del session
            # TVM's server reconnects to the proxy after each session.
            wait_free(tvm, tracker_port, KEY, 1)
        assert server.proc.poll() is None


def test_tvm_tracker_lists_our_proxy_and_forgets_a_leaving_server(tvm):
    with tvm_tracker() as (tracker, tracker_port), \
         our_proxy("--tracker", f"127.0.0.1:{tracker_port}") as (proxy, proxy_port):
        with tvm_server_through(proxy_port):
            proxy.wait_for(f"presented 'server:{KEY}'", timeout=60)
            summary = wait_free(tvm, tracker_port, KEY, 1)
            assert {"key": f"server:proxy[{KEY}]", "addr": ["127.0.0.1", proxy_port]} in \
                summary["server_info"]
            text = subprocess.run(
                [sys.executable, "-m", "tvm.exec.query_rpc_tracker", "--host", "127.0.0.1",
                 "--port", str(tracker_port)],
                capture_output=True, text=True, timeout=60, env=child_env(),
            ).stdout
            assert f"server:proxy[{KEY}]" in text, text
            session = tvm.rpc.connect_tracker("127.0.0.1", tracker_port).request(KEY)
            use_session(session)
            del session
            wait_free(tvm, tracker_port, KEY, 1)
        # The server is gone: its entry leaves TVM's tracker at once.
        started = time.monotonic()
        summary = wait_free(tvm, tracker_port, KEY, 0, timeout=10)
        assert time.monotonic() - started < 5
        assert {"key": "server:proxy[]", "addr": ["127.0.0.1", proxy_port]} in \
            summary["server_info"]


def test_tvm_client_and_server_paired_by_key(tvm):
    with our_proxy() as (proxy, proxy_port), \
         tvm_server_through(proxy_port, "plain-dev"):
        proxy.wait_for("presented 'server:plain-dev'", timeout=60)
        session = tvm.rpc.connect("127.0.0.1", proxy_port, key="plain-dev", session_timeout=60)
        use_session(session)
        del session
        proxy.wait_for("presented 'client:plain-dev -timeout=60'")


def test_unused_matchkey_renewed_under_the_real_key(tvm):
    """
    A client takes the matchkey from TVM's tracker and never comes: the proxy
    renews it under the server's real key, and the next client gets the server.
    """
    import json
    import socket
    import struct

    key = "renew:dev"
    with tvm_tracker() as (tracker, tracker_port), \
         our_proxy("--tracker", f"127.0.0.1:{tracker_port}") as (proxy, proxy_port), \
         tvm_server_through(proxy_port, key):
        proxy.wait_for(f"presented 'server:{key}'", timeout=60)
        wait_free(tvm, tracker_port, key, 1)
        with socket.create_connection(("127.0.0.1", tracker_port), timeout=30) as greedy:
            greedy.sendall(struct.pack("<i", 0x2F271))
            assert struct.unpack("<i", greedy.recv(4))[0] == 0x2F271
            body = json.dumps([4, key, "greedy", 1]).encode()
            greedy.sendall(struct.pack("<i", len(body)) + body)
            (length,) = struct.unpack("<i", greedy.recv(4))
            reply = json.loads(greedy.recv(length))
            assert reply[0] == 0 and reply[1][2].startswith(key + ":")
            stale = reply[1][2]
            # Logged with its secret part cut (a matchkey in a log is a stolen session).
            proxy.wait_for(re.escape(f"matchkey {redact_matchkeys(stale)} of {key} was "
                                     "handed out but never used"), timeout=30)
            assert stale not in proxy.output
            summary = wait_free(tvm, tracker_port, key, 1, timeout=30)
            assert set(summary["queue_info"]) == {key}
            session = tvm.rpc.connect_tracker("127.0.0.1", tracker_port).request(key)
            use_session(session)
            del session


#: Our client, run in a child process: two sessions through the tracker, each
#: round-tripping a blob; prints a JSON line.
OUR_CLIENT = """
import json, sys
from twisted.internet import defer, task
from tvm_rpc.client import connect_tracker

async def main(reactor, host, port, key):
    tracker = await connect_tracker(host, int(port), reactor=reactor)
    blob = bytes(range(256)) * 4096
    for _ in range(2):
        session = await tracker.request(key, session_timeout=60, timeout=60)
        async with session:
            await session.upload(blob, "blob.bin")
            back = await session.download("blob.bin")
            path = await session.workpath("blob.bin")
        assert back == blob and path.endswith("blob.bin"), path
    await tracker.close()
    print(json.dumps({"ok": True}))

task.react(lambda reactor, *args: defer.Deferred.fromCoroutine(main(reactor, *args)),
           sys.argv[1:])
"""


@pytest.mark.parametrize("kind", ["tvm", "ours"])
def test_our_server_behind_a_proxy_reached_through_its_tracker(tvm, kind):
    """
    Our server (``--through-proxy``) behind TVM's proxy registered with TVM's
    tracker, and behind our proxy registered with our tracker, reached by our
    client through the tracker, twice (the server reconnects after a session).
    """
    key = f"ours-behind-{kind}"
    tracker_of = {"tvm": tvm_tracker, "ours": our_tracker}[kind]
    proxy_of = {"tvm": tvm_proxy, "ours": our_proxy}[kind]
    with tracker_of() as (tracker, tracker_port), \
         proxy_of("--tracker", f"127.0.0.1:{tracker_port}") as (proxy, proxy_port):
        server = Daemon(twistd("rpc-server", "--through-proxy", "--host", "127.0.0.1",
                               "--port", str(proxy_port), "--key", key))
        try:
            server.wait_for(r"waiting at proxy 127\.0\.0\.1:%d as %s" % (proxy_port, key))
            wait_free(tvm, tracker_port, key, 1)
            completed = subprocess.run(
                [sys.executable, "-c", OUR_CLIENT, "127.0.0.1", str(tracker_port), key],
                capture_output=True, text=True, timeout=120, env=child_env(),
            )
            assert '{"ok": true}' in completed.stdout, completed.stdout + completed.stderr
        finally:
            server.stop()
