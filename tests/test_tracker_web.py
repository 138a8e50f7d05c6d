"""The tracker's status (what the page, the JSON and the metrics show), its
HTML page, its Prometheus metrics and its HTTP resources, all in memory on a
fake clock; and the C{--http} option of C{twistd rpc-tracker}."""

import json
from html.parser import HTMLParser

from hypothesis import given, settings, strategies as st
import pytest

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from tests.test_tracker_protocol import PUT, REQUEST, UPDATE_INFO, TrackerTestCase
from tvm_rpc.daemon.listening import ListenerService
from tvm_rpc.tracker import tap
from tvm_rpc.tracker.metrics import tracker_registry
from tvm_rpc.tracker.page import duration, render_page
from tvm_rpc.tracker.status import tracker_status
from tvm_rpc.tracker.web import tracker_web_root

pytestmark = pytest.mark.unit

#: Every tag the page may contain; anything else came from a peer's string.
PAGE_TAGS = {"html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3",
             "p", "main", "div", "section", "span", "table", "tr", "th", "td", "ol", "li",
             "time", "footer", "a"}


class PageParser(HTMLParser):
    """Collects the tags and the text of a page."""

    def __init__(self):
        """Start empty."""
        super().__init__(convert_charrefs=True)
        self.tags = set()
        self.text = []
        self.meta = []

    def handle_starttag(self, tag, attrs):
        """Note a tag (and a meta tag's attributes)."""
        self.tags.add(tag)
        if tag == "meta":
            self.meta.append(dict(attrs))

    def handle_data(self, data):
        """Note a text node."""
        self.text.append(data)


def parse_page(html):
    """@return: a L{PageParser} fed C{html} (bytes)."""
    parser = PageParser()
    parser.feed(html.decode("utf-8"))
    parser.close()
    return parser


def get(root, path, args=None):
    """
    Render C{path} (a list of segments) of the resource tree C{root}.

    @return: C{(request, body)}.
    """
    request = DummyRequest(path)
    request.args = args or {}
    resource = root
    segments = list(path)
    while segments and not getattr(resource, "isLeaf", False):
        resource = resource.getChildWithDefault(segments.pop(0), request)
    body = resource.render(request)
    return request, body


class LabTestCase(TrackerTestCase):
    """A small lab on the fake clock: free, held and waiting, direct and via a proxy."""

    def build_lab(self):
        """
        rasp: two servers (one free, one held by alice), bob and carol waiting
        (carol at a higher priority); jetson: one server behind a proxy.
        """
        self.rasp_a = self.peer("10.0.0.2")
        self.rasp_a.ask([UPDATE_INFO, {"key": "server:rasp", "addr": [None, 9090]}])
        self.rasp_a.ask([PUT, "rasp", [9090, "rasp:0.1111111111"], None])
        self.clock.advance(5)
        self.alice = self.peer("10.0.1.1")
        self.alice.send([REQUEST, "rasp", "alice", 1])
        self.clock.advance(10)
        self.bob, self.carol = self.peer("10.0.1.2"), self.peer("10.0.1.3")
        self.bob.send([REQUEST, "rasp", "bob", 1])
        self.clock.advance(1)
        self.carol.send([REQUEST, "rasp", "carol", 3])
        self.clock.advance(2)
        self.rasp_b = self.peer("10.0.0.3")
        self.rasp_b.send([REQUEST, "none", "", 1])
        self.proxy = self.peer("10.0.0.9")
        self.proxy.ask([UPDATE_INFO, {"key": "proxy-entry:jetson", "addr": [None, 9190]}])
        self.proxy.ask([PUT, "jetson", [9190, "jetson:0.2222222222"], None])
        self.clock.advance(4)


class StatusTests(LabTestCase):
    """The status dict."""

    def test_servers_queue_and_events(self):
        """Servers per key (state, since, holder, via), waiting requests in
        service order with their waiting time, events newest first."""
        self.build_lab()
        status = tracker_status(self.state)
        keys = {entry["key"]: entry for entry in status["keys"]}
        self.assertEqual(sorted(keys), ["jetson", "none", "rasp"])
        rasp = keys["rasp"]
        self.assertEqual((rasp["free"], rasp["held"], rasp["pending"]), (0, 1, 2))
        (held,) = rasp["servers"]
        self.assertEqual((held["host"], held["port"], held["state"], held["via"]),
                         ("10.0.0.2", 9090, "held", "direct"))
        self.assertEqual(held["for"], 17)
        self.assertEqual(held["holder"]["user"], "alice")
        self.assertEqual(held["holder"]["client"][0], "10.0.1.1")
        self.assertEqual([(w["user"], w["priority"], w["waiting"]) for w in rasp["waiting"]],
                         [("carol", 3, 6), ("bob", 1, 7)])
        (jetson,) = keys["jetson"]["servers"]
        self.assertEqual((jetson["state"], jetson["via"], jetson["for"], jetson["holder"]),
                         ("free", "proxy", 4, None))
        self.assertEqual([e["kind"] for e in status["events"]], ["join", "grant", "join"])
        self.assertIn("granted rasp server 10.0.0.2:9090", status["events"][1]["text"])
        self.assertEqual(status["counters"]["grants"], 1)
        self.assertEqual(status["counters"]["connections_open"], 6)
        # SUMMARY's fields are there too, as TVM's consumers read them.
        self.assertEqual(status["queue_info"]["rasp"], {"free": 0, "pending": 2})
        self.assertEqual(len(status["leases"]), 1)

    def test_no_matchkey_anywhere(self):
        """Neither the JSON, the page nor the metrics carry a matchkey."""
        self.build_lab()
        root = tracker_web_root(self.state)
        outputs = [json.dumps(tracker_status(self.state)).encode(),
                   render_page(tracker_status(self.state)),
                   get(root, [b"api", b"summary"])[1], get(root, [b"metrics"])[1]]
        for output in outputs:
            self.assertNotIn(b"1111111111", output)
            self.assertNotIn(b"2222222222", output)

    def test_lists_are_bounded_counts_are_not(self):
        """Past the limit, servers and waiting requests are cut; counts stay whole."""
        server = self.peer("10.0.0.2")
        for i in range(5):
            server.ask([PUT, "k", [9000 + i, f"k:{i}"], None])
        for i in range(4):
            self.peer().send([REQUEST, "j", f"u{i}", i])
        status = tracker_status(self.state, limit=2)
        keys = {entry["key"]: entry for entry in status["keys"]}
        self.assertEqual([s["port"] for s in keys["k"]["servers"]], [9000, 9001])
        self.assertEqual(keys["k"]["free"], 5)
        self.assertEqual([w["user"] for w in keys["j"]["waiting"]], ["u3", "u2"])
        self.assertEqual(keys["j"]["pending"], 4)
        page = parse_page(render_page(tracker_status(self.state, limit=2)))
        self.assertIn("and 3 more", page.text)
        self.assertIn("and 2 more waiting", page.text)


class PageTests(LabTestCase):
    """The HTML page."""

    def test_page_shows_the_lab(self):
        """Keys, servers, holders, the queue and the events are on the page."""
        self.build_lab()
        page = parse_page(render_page(tracker_status(self.state)))
        text = page.text
        for expected in ("rasp", "10.0.0.2:9090", "held", "jetson", "10.0.0.9:9190", "proxy",
                         "carol", "bob", "17 s", "6.0 s", "7.0 s"):
            self.assertIn(expected, text)
        self.assertTrue(any(t.startswith("alice @ 10.0.1.1:") for t in text))
        self.assertTrue(any("granted rasp server 10.0.0.2:9090" in t for t in text))
        self.assertLessEqual(page.tags, PAGE_TAGS)

    def test_refresh_and_viewport(self):
        """A meta refresh by default (none when off) and a phone-width viewport."""
        page = parse_page(render_page(tracker_status(self.state)))
        self.assertIn({"http-equiv": "refresh", "content": "5"}, page.meta)
        self.assertIn({"name": "viewport", "content": "width=device-width, initial-scale=1"},
                      page.meta)
        page = parse_page(render_page(tracker_status(self.state), refresh=None))
        self.assertFalse(any("http-equiv" in m for m in page.meta))

    def test_hostile_strings_are_escaped(self):
        """A key, user and custom address holding markup show as text, never as tags."""
        key, user = "<script>alert(1)</script>", "<img src=x onerror=alert(2)>"
        server = self.peer("10.0.0.2")
        server.ask([PUT, key, [9000, key + ":0.5"], "<b>host</b>"])
        self.peer().send([REQUEST, key, user, 1])
        self.peer().send([REQUEST, key, user, 1])
        html = render_page(tracker_status(self.state))
        page = parse_page(html)
        self.assertLessEqual(page.tags, PAGE_TAGS)
        self.assertNotIn(b"<script>", html)
        self.assertNotIn(b"<img", html)
        self.assertIn(key, page.text)
        self.assertIn(user, page.text)
        self.assertIn("<b>host</b>:9000", page.text)

    def test_counts_line(self):
        """The counts read "1 key", "2 keys"."""
        self.peer("10.0.0.2").ask([PUT, "rasp", [9000, "rasp:0.5"], None])
        text = parse_page(render_page(tracker_status(self.state))).text
        self.assertTrue(any(t.startswith("1 key \u00b7 1 free") for t in text), text)
        self.peer("10.0.0.3").ask([PUT, "jetson", [9000, "jetson:0.5"], None])
        text = parse_page(render_page(tracker_status(self.state))).text
        self.assertTrue(any(t.startswith("2 keys \u00b7 2 free") for t in text), text)

    def test_durations(self):
        """Durations read short at every scale."""
        self.assertEqual([duration(s) for s in (0.25, 42, 600, 9000, 400000)],
                         ["0.2 s", "42 s", "10 min", "2.5 h", "4.6 d"])


@settings(max_examples=50)
@given(st.text(min_size=1, max_size=30), st.text(max_size=30))
def test_any_key_and_user_render_as_text(key, user):
    """Whatever a peer calls its key and its user, the page has only its own
    tags and shows both strings as text."""
    case = LabTestCase()
    case.setUp()
    server = case.peer("10.0.0.2")
    server.ask([PUT, key, [9000, "m:0.5"], None])
    case.peer().send([REQUEST, key, user, 1])
    case.peer().send([REQUEST, key, user, 1])
    page = parse_page(render_page(tracker_status(case.state)))
    assert page.tags <= PAGE_TAGS
    joined = "".join(page.text)
    # The parser normalises carriage returns; compare what survives that.
    assert key.replace("\r", "\n") in joined.replace("\r", "\n")
    if user.strip():
        assert user.replace("\r", "\n") in joined.replace("\r", "\n")


class MetricsTests(LabTestCase):
    """The Prometheus text at /metrics."""

    def scrape(self, state=None):
        """@return: C{{sample name and labels: value}} of one scrape."""
        root = tracker_web_root(state or self.state)
        request, body = get(root, [b"metrics"])
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain"))
        samples = {}
        for family in text_string_to_metric_families(body.decode("utf-8")):
            for sample in family.samples:
                labels = tuple(sorted(sample.labels.items()))
                samples[(sample.name, labels)] = sample.value
        return samples

    def test_metrics_of_the_lab(self):
        """Servers per key and state, pending, grants, waits, connections, errors."""
        self.build_lab()
        bad = self.peer("10.6.6.6")
        bad.protocol.dataReceived(b"\x00\x00\x00\x00")
        bad.lose()
        samples = self.scrape()
        servers = "tvm_rpc_tracker_servers"
        self.assertEqual(samples[(servers, (("key", "rasp"), ("state", "held")))], 1)
        self.assertEqual(samples[(servers, (("key", "rasp"), ("state", "free")))], 0)
        self.assertEqual(samples[(servers, (("key", "jetson"), ("state", "free")))], 1)
        self.assertEqual(samples[("tvm_rpc_tracker_pending_requests", (("key", "rasp"),))], 2)
        self.assertEqual(samples[("tvm_rpc_tracker_grants_total", ())], 1)
        self.assertEqual(samples[("tvm_rpc_tracker_requests_total", ())], 4)
        self.assertEqual(samples[("tvm_rpc_tracker_wait_seconds_count", ())], 1)
        self.assertEqual(samples[("tvm_rpc_tracker_wait_seconds_bucket", (("le", "+Inf"),))], 1)
        self.assertEqual(samples[("tvm_rpc_tracker_wait_seconds_bucket", (("le", "0.001"),))], 1)
        self.assertEqual(samples[("tvm_rpc_tracker_connections", ())], 6)
        self.assertEqual(samples[("tvm_rpc_tracker_connections_accepted_total", ())], 7)
        self.assertEqual(
            samples[("tvm_rpc_tracker_connection_errors_total", (("reason", "bad_frame"),))], 1)
        self.assertEqual(samples[("tvm_rpc_tracker_keys", ())], 3)

    def test_registries_are_per_tracker(self):
        """Two trackers in one process keep their metrics apart."""
        self.build_lab()
        other = LabTestCase()
        other.setUp()
        self.assertEqual(self.scrape()[("tvm_rpc_tracker_grants_total", ())], 1)
        self.assertEqual(self.scrape(other.state)[("tvm_rpc_tracker_grants_total", ())], 0)
        self.assertIsNot(tracker_registry(self.state), tracker_registry(self.state))


class ResourceTests(LabTestCase):
    """The HTTP resources: content types, security headers, the refresh knob."""

    def header(self, request, name):
        """@return: the one value of header C{name}."""
        return request.responseHeaders.getRawHeaders(name)[0]

    def test_page_resource(self):
        """/ is the HTML page with a policy that forbids scripts."""
        self.build_lab()
        request, body = get(tracker_web_root(self.state), [b""])
        self.assertEqual(self.header(request, b"content-type"), b"text/html; charset=utf-8")
        policy = self.header(request, b"content-security-policy")
        self.assertIn(b"default-src 'none'", policy)
        self.assertNotIn(b"script-src", policy)
        self.assertEqual(self.header(request, b"x-content-type-options"), b"nosniff")
        self.assertTrue(body.startswith(b"<!DOCTYPE html>"))
        self.assertIn(b"rasp", body)

    def test_refresh_argument(self):
        """?refresh=N changes the period (capped), 0 turns it off, junk is ignored."""
        root = tracker_web_root(self.state)
        for value, expected in ((b"30", b'content="30"'), (b"99999", b'content="3600"'),
                                (b"x", b'content="5"')):
            _, body = get(root, [b""], {b"refresh": [value]})
            self.assertIn(expected, body)
        _, body = get(root, [b""], {b"refresh": [b"0"]})
        self.assertNotIn(b"http-equiv", body)

    def test_json_resource(self):
        """/api/summary is the status as JSON, with no raw "<" in it."""
        self.build_lab()
        self.peer("10.0.0.4").ask([PUT, "<k>", [1, "<k>:1"], None])
        request, body = get(tracker_web_root(self.state), [b"api", b"summary"])
        self.assertEqual(self.header(request, b"content-type"), b"application/json")
        self.assertNotIn(b"<", body)
        status = json.loads(body)
        self.assertEqual({entry["key"] for entry in status["keys"]},
                         {"rasp", "jetson", "none", "<k>"})
        self.assertEqual(status["queue_info"]["rasp"], {"free": 0, "pending": 2})


class HttpOptionTests(SynchronousTestCase):
    """C{--http} on the command line and in the service tree."""

    def test_off_by_default(self):
        """Without --http there is no HTTP listener."""
        options = tap.Options()
        options.parseOptions([])
        self.assertEqual(options["http"], [])
        top = tap.makeService(options, reactor=MemoryReactorClock())
        self.assertEqual([child.name for child in top], ["listener"])

    def test_http_listener(self):
        """--http (repeatable) adds a listener that binds every endpoint."""
        options = tap.Options()
        options.parseOptions(["--http", "tcp:7180:interface=127.0.0.1", "--http", "tcp:7181"])
        reactor = MemoryReactorClock()
        top = tap.makeService(options, reactor=reactor)
        http = top.getServiceNamed("http")
        self.assertIsInstance(http, ListenerService)
        top.privilegedStartService()
        self.assertEqual(sorted((s[0], s[3]) for s in reactor.tcpServers if s[0] != 9190),
                         [(7180, "127.0.0.1"), (7181, "")])

    def test_activity_lines_option(self):
        """--activity-lines-per-second sets the state's line budget (100 by default)."""
        for args, rate in (([], 100), (["--activity-lines-per-second", "7"], 7)):
            options = tap.Options()
            options.parseOptions(args)
            top = tap.makeService(options, reactor=MemoryReactorClock())
            self.assertEqual(top.state.activity.budget.rate, rate)
        self.assertRaises(usage.UsageError, tap.Options().parseOptions,
                          ["--activity-lines-per-second", "0"])

    def test_bad_http_endpoint(self):
        """An --http that is no endpoint string is a usage error."""
        for value in ("bogus:1", "tcp:notaport"):
            self.assertRaises(usage.UsageError, tap.Options().parseOptions, ["--http", value])
