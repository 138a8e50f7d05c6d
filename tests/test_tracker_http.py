"""C{twistd -n rpc-tracker --http} as a real process on loopback: the page,
the JSON and the metrics over HTTP, a fatal bind, and the page in a real
headless Chromium (Debian's C{chromium}, driven over DevTools: see
L{tests.devtools}) that shows a live tracker's servers and queue, updates
itself when a server joins, renders hostile keys as text, and leaves a
screenshot in C{test-artifacts/}.

CI (C{TVM_RPC_REQUIRE_INTEROP=1}, set by C{scripts/test.sh}, which installs
Chromium) fails instead of skipping when Chromium is missing.
"""

import json
import os
import re
import shutil
import socket
import urllib.request

import pytest

from tests.daemons import (
    ROOT,
    Daemon,
    announced_port,
    our_rpc_server,
    our_tracker,
    twistd,
    wait_summary,
)
from tests.devtools import Browser
from tests.test_interop_tracker import RawTrackerPeer, register_fake_server
from tvm_rpc.protocol.constants import TrackerCode

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]

HOST = "127.0.0.1"
HTTP_ANY = f"tcp:0:interface={HOST}"
#: Where the screenshot of the page is kept (gitignored).
ARTIFACTS = ROOT / "test-artifacts"
#: A key that would run a script if the page did not escape it.
HOSTILE_KEY = "<script>document.title='owned'</script>"


def fetch(port, path):
    """@return: C{(content_type, body)} of C{GET path} on C{127.0.0.1:port}."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=10) as response:
        return response.headers["content-type"], response.read()


@pytest.fixture
def tracker():
    """Our tracker with --http on a port the system picks; yields C{(daemon, port, http)}."""
    with our_tracker("--http", HTTP_ANY) as (daemon, port):
        yield daemon, port, announced_port(daemon, "rpc-tracker http")


def test_http_serves_page_json_and_metrics(tracker):
    """The three resources of a live tracker, and the grant and release lines."""
    daemon, port, http = tracker
    server = register_fake_server(port, "rasp", 9090, ["rasp:0.31415926"])
    client = RawTrackerPeer(port)
    try:
        assert client.call([TrackerCode.REQUEST, "rasp", "alice", 1])[0] == 0
        kind, body = fetch(http, "/api/summary")
        assert kind == "application/json"
        status = json.loads(body)
        (rasp,) = status["keys"]
        assert (rasp["key"], rasp["held"], rasp["servers"][0]["holder"]["user"]) == (
            "rasp", 1, "alice")
        kind, body = fetch(http, "/")
        assert kind == "text/html; charset=utf-8"
        assert b"alice @ 127.0.0.1:" in body
        kind, body = fetch(http, "/metrics")
        assert kind.startswith("text/plain")
        assert b'tvm_rpc_tracker_servers{key="rasp",state="held"} 1.0' in body
        assert b"tvm_rpc_tracker_grants_total 1.0" in body
        assert server.call([TrackerCode.PUT, "rasp", [9090, "rasp:0.27182818"], None]) == 0
        daemon.wait_for(r"released rasp server 127\.0\.0\.1:9090 held by 127\.0\.0\.1:\d+ "
                        r"\(user 'alice'\) for [\d.]+ s")
        assert re.search(r"granted rasp server 127\.0\.0\.1:9090 to 127\.0\.0\.1:\d+",
                         daemon.output)
        assert "31415926" not in daemon.output and "27182818" not in daemon.output
    finally:
        client.close()
        server.close()


def test_http_bind_failure_is_fatal():
    """An --http port that cannot be bound stops the tracker with a non-zero exit."""
    with socket.socket() as busy:
        busy.bind((HOST, 0))
        busy.listen(1)
        taken = busy.getsockname()[1]
        daemon = Daemon(twistd("rpc-tracker", "--listen", HTTP_ANY,
                               "--http", f"tcp:{taken}:interface={HOST}"))
        try:
            assert daemon.proc.wait(30) != 0
            assert "rpc-tracker http listening" not in daemon.output
        finally:
            daemon.stop()


def chromium():
    """
    @return: the path of Chromium.
    @raise pytest.fail.Exception: when it is missing and CI requires it.
    """
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "chromium is not installed (scripts/test.sh installs Debian's package)"
        if os.environ.get("TVM_RPC_REQUIRE_INTEROP"):
            pytest.fail(message)
        pytest.skip(message)
    return path


#: Seconds between the page's own refreshes in the browser test (C{?refresh=}).
REFRESH = 1
#: The most refreshes the browser test waits through for a joined server.
MOST_REFRESHES = 60


def test_page_in_headless_chromium(tracker, tmp_path):
    """
    Chromium loads the page of a live tracker once: it shows the servers and
    the queue and a hostile key as text (no script runs: the title stays).
    Then a real C{twistd rpc-server} joins, and the page, never reloaded by
    the test, shows it after refreshing itself (every navigation it makes is
    its meta refresh, as DevTools reports). A screenshot of that page at a
    phone's width is kept.
    """
    _, port, http = tracker
    url = f"http://{HOST}:{http}/?refresh={REFRESH}"
    peers = [register_fake_server(port, "rasp3b", 9091, ["rasp3b:0.1"]),
             register_fake_server(port, HOSTILE_KEY, 9092, [HOSTILE_KEY + ":0.2"])]
    taker, waiter = RawTrackerPeer(port), RawTrackerPeer(port)
    peers += [taker, waiter]
    try:
        assert taker.call([TrackerCode.REQUEST, "rasp3b", "alice", 1])[0] == 0
        waiter.send([TrackerCode.REQUEST, "rasp3b", "bob", 2])
        wait_summary(port, lambda s: s["queue_info"].get("rasp3b", {}).get("pending") == 1)
        with Browser(chromium(), tmp_path / "profile") as page:
            # A phone's viewport: headless windows are never narrower than 500 px.
            page.call("Emulation.setDeviceMetricsOverride", width=412, height=900,
                      deviceScaleFactor=1, mobile=True)
            page.navigate(url)
            before = page.html()
            assert "<title>rpc-tracker</title>" in before
            assert "rasp3b" in before and "alice @ 127.0.0.1:" in before
            assert re.search(r"<td>bob</td><td>127\.0\.0\.1:\d+</td><td>2</td>", before), before
            assert "&lt;script&gt;document.title='owned'&lt;/script&gt;" in before
            assert "phone-lab" not in before

            with our_rpc_server("--tracker", f"{HOST}:{port}", "--key", "phone-lab") as (
                    _, server):
                wait_summary(port, lambda s: s["queue_info"].get("phone-lab", {}).get("free") == 1)
                joined = rf"<td>127\.0\.0\.1:{server}</td><td class=\"free\">free</td>"
                after = page.html()
                refreshes = 0
                while not re.search(joined, after):
                    assert refreshes < MOST_REFRESHES, after
                    asked = page.wait_event("Page.frameRequestedNavigation")
                    assert asked["reason"] == "metaTagRefresh", asked
                    page.wait_event("Page.loadEventFired")
                    refreshes += 1
                    after = page.html()
                assert "phone-lab" in after and "<title>rpc-tracker</title>" in after
                print(f"the page showed the joined server after {refreshes} refresh(es) "
                      f"of its own")
                ARTIFACTS.mkdir(exist_ok=True)
                shot = ARTIFACTS / "tracker-status-phone.png"
                shot.unlink(missing_ok=True)
                shot.write_bytes(page.screenshot())
                assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
                print(f"screenshot of the status page: {shot}")
    finally:
        for peer in peers:
            peer.close()
