"""The tracker's status page: one small HTML document, rendered on the server.

Built with L{twisted.web.template} tags, which escape every string they are
given: keys, users and addresses come from peers, and one may register a key
such as C{<script>}. No external assets (a lab may be offline), no script:
a meta refresh reloads the page. Laid out to be read on a phone.
"""

import time

from twisted.web.template import Tag, flattenString, tags

from .status import server_address

#: Seconds between reloads of the page.
DEFAULT_REFRESH = 5

STYLE = """
body{font:15px/1.4 system-ui,-apple-system,sans-serif;margin:0;padding:0 .8em 2em;
color:#1d1d1f;background:#fafafa}
header{position:sticky;top:0;background:#fafafa;padding:.6em 0;border-bottom:1px solid #ddd}
h1{font-size:1.3em;margin:0}h2{font-size:1.1em;margin:1.2em 0 .3em}
.meta{color:#555;font-size:.9em;margin:.2em 0 0}
.key{background:#fff;border:1px solid #ddd;border-radius:8px;padding:.2em .8em .6em;
margin:.8em 0}
.key h2{display:flex;flex-wrap:wrap;gap:.2em .8em;align-items:baseline;margin:.4em 0}
.counts{font-weight:normal;font-size:.85em;color:#555}
.name{overflow-wrap:anywhere}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{text-align:left;padding:.25em .5em .25em 0;border-bottom:1px solid #eee;
white-space:nowrap}
th{color:#555;font-weight:600}
td.holder{white-space:normal;overflow-wrap:anywhere}
.free{color:#0a7c2f;font-weight:600}.held{color:#b25c00;font-weight:600}
.none{color:#777;font-style:italic;margin:.3em 0}
ol.events{list-style:none;padding:0;margin:0;font-size:.9em}
ol.events li{padding:.2em 0;border-bottom:1px solid #eee;word-break:break-word}
time{color:#555;font-variant-numeric:tabular-nums;margin-right:.5em}
footer{margin-top:1.5em;font-size:.85em;color:#555}
"""


def duration(seconds):
    """@return: C{seconds} in a short human form: C{"4 s"}, C{"3 min"}, C{"2.5 h"}."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def clock_time(at):
    """@return: the UTC time of day of C{at} (seconds since the epoch)."""
    return time.strftime("%H:%M:%S", time.gmtime(at))


def _address(pair):
    """@return: C{[host, port]} as C{host:port} (C{host} alone without a port)."""
    host, port = pair
    return host if port is None else f"{host}:{port}"


def _holder(server):
    """@return: who holds a server, as text (C{""} when it is free)."""
    holder = server["holder"]
    if holder is None:
        return ""
    user = holder["user"]
    who = _address(holder["client"])
    return f"{user} @ {who}" if user else who


def _servers(entry):
    """@return: the table of a key's servers, or a line saying there is none."""
    if not entry["servers"]:
        return tags.p("no server registered", class_="none")
    rows = [tags.tr(tags.th("server"), tags.th("state"), tags.th("for"),
                    tags.th("held by"), tags.th("via"))]
    for server in entry["servers"]:
        rows.append(tags.tr(
            tags.td(server_address(server)),
            tags.td(server["state"], class_=server["state"]),
            tags.td(duration(server["for"])),
            tags.td(_holder(server), class_="holder"),
            tags.td(server["via"]),
            class_="server",
        ))
    listed = len(entry["servers"])
    total = entry["free"] + entry["held"]
    more = [] if listed >= total else [tags.p(f"and {total - listed} more", class_="none")]
    return [tags.div(tags.table(rows), class_="scroll"), more]


def _queue(entry):
    """@return: the table of a key's waiting requests, or nothing when none waits."""
    if not entry["waiting"]:
        return []
    rows = [tags.tr(tags.th("#"), tags.th("user"), tags.th("client"),
                    tags.th("priority"), tags.th("waiting"))]
    for place, pending in enumerate(entry["waiting"], 1):
        rows.append(tags.tr(
            tags.td(str(place)),
            tags.td(pending["user"]),
            tags.td(_address(pending["client"])),
            tags.td(f"{pending['priority']:g}"),
            tags.td(duration(pending["waiting"])),
            class_="waiting",
        ))
    listed = len(entry["waiting"])
    more = ([] if listed >= entry["pending"]
            else [tags.p(f"and {entry['pending'] - listed} more waiting", class_="none")])
    return [tags.h3("queue", class_="counts"), tags.div(tags.table(rows), class_="scroll"),
            more]


def _key(entry):
    """@return: the section of one key."""
    counts = f"{entry['free']} free \u00b7 {entry['held']} held \u00b7 {entry['pending']} waiting"
    return tags.section(
        tags.h2(tags.span(entry["key"], class_="name"), tags.span(counts, class_="counts")),
        _servers(entry),
        _queue(entry),
        class_="key",
    )


def _events(status):
    """@return: the list of recent events, newest first."""
    if not status["events"]:
        return tags.p("nothing yet", class_="none")
    return tags.ol(
        [tags.li(tags.time(clock_time(event["at"])), event["text"], class_=event["kind"])
         for event in status["events"]],
        class_="events",
    )


def page(status, refresh=DEFAULT_REFRESH):
    """
    @param status: the dict of L{tvm_rpc.tracker.status.tracker_status}.
    @param refresh: seconds between reloads, or L{None} for none.
    @return: the page as a L{twisted.web.template.Tag} tree.
    """
    keys = status["keys"]
    totals = {name: sum(entry[name] for entry in keys) for name in ("free", "held", "pending")}
    noun = "key" if len(keys) == 1 else "keys"
    summary = (f"{len(keys)} {noun} \u00b7 {totals['free']} free \u00b7 {totals['held']} held "
               f"\u00b7 {totals['pending']} waiting \u00b7 up {duration(status['uptime'])}")
    updated = f"updated {clock_time(status['now'])} UTC"
    if refresh:
        updated += f", refreshes every {refresh:g} s"
    head = [
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.title("rpc-tracker"),
        tags.style(STYLE),
    ]
    if refresh:
        head.insert(1, tags.meta(**{"http-equiv": "refresh", "content": f"{refresh:g}"}))
    body = tags.body(
        tags.header(tags.h1("rpc-tracker"), tags.p(summary, class_="meta"),
                    tags.p(updated, class_="meta")),
        # twisted.web.template.tags predates <main>.
        Tag("main")(
            tags.div([_key(entry) for entry in keys] if keys
                     else tags.p("no key yet", class_="none"), id="keys"),
            tags.h2("Recent events"),
            tags.div(_events(status), id="events"),
        ),
        tags.footer(tags.a("JSON", href="api/summary"), " \u00b7 ",
                    tags.a("metrics", href="metrics")),
    )
    return tags.html(tags.head(head), body, lang="en")


def render_page(status, refresh=DEFAULT_REFRESH):
    """
    @return: the page as UTF-8 bytes, doctype included.
    @raise RuntimeError: if the tags did not flatten at once (they hold no
        Deferred, so they always do).
    """
    result = []
    flattenString(None, page(status, refresh)).addBoth(result.append)
    if not result:
        raise RuntimeError("the status page did not render at once")
    if not isinstance(result[0], bytes):
        result[0].raiseException()
    return b"<!DOCTYPE html>\n" + result[0]
