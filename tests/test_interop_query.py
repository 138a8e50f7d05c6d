"""The query tool and the tracker client against the real apache-tvm.

The pure renderer is compared with TVM's own ``TrackerSession.text_summary``
(called on a stub whose ``summary()`` returns the generated dict); the command
line is compared byte for byte with ``python -m tvm.exec.query_rpc_tracker`` on
TVM's tracker with TVM's ``rpc_server`` registered; and our client allocates that
server through TVM's tracker.
"""

import json
import re
import subprocess
import sys
import types
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from daemons import child_env, tvm_rpc_server, tvm_tracker, wait_until
from tvm_rpc.client.summary_text import text_summary

HOST = "127.0.0.1"

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]

plain_keys = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_.", min_size=1, max_size=12
)
addresses = st.tuples(
    st.sampled_from(["127.0.0.1", "10.0.0.2", "192.168.1.10", "::1"]),
    st.integers(min_value=1, max_value=65535),
).map(list)
counts = st.fixed_dictionaries({
    "free": st.integers(min_value=0, max_value=20),
    "pending": st.integers(min_value=0, max_value=20),
})


def tvm_text_summary(tvm, summary):
    """TVM's own C{TrackerSession.text_summary}, run on a stub session."""
    stub = types.SimpleNamespace(summary=lambda: summary)
    return tvm.rpc.client.TrackerSession.text_summary(stub)


@st.composite
def summaries(draw, served_keys=None):
    """
    A tracker summary: queue rows for some keys, server entries for some keys
    (known to the queue or not).

    @param served_keys: the strategy for the key part of server entries
        (after ``server:``); plain keys when L{None}.
    """
    keys = draw(st.lists(plain_keys, max_size=6, unique=True))
    queue_info = {key: draw(counts) for key in keys}
    pool = st.sampled_from(keys) | plain_keys if keys else plain_keys
    served = served_keys if served_keys is not None else pool
    server_info = [
        {"key": "server:" + draw(served), "addr": draw(addresses)}
        for _ in range(draw(st.integers(min_value=0, max_value=6)))
    ]
    return {"queue_info": queue_info, "server_info": server_info}


def parse_rows(text):
    """
    The Queue Status rows of a text summary.

    @return: the part before "Queue Status", the title line and
        C{{key: (total, free, pending)}}.
    """
    head, queue = text.split("Queue Status\n")
    lines = queue.splitlines()
    separator, title = lines[0], lines[1]
    assert set(separator) == {"-"} and lines[2] == separator and lines[-1] == separator
    rows = {}
    for line in lines[3:-1]:
        key, total, free, pending = line.split()
        rows[key] = (int(total), int(free), int(pending))
    return head, title, rows


@given(summary=summaries())
def test_text_summary_equals_tvm(tvm, summary):
    """Without proxy entries or keys holding ':', ours is TVM's text exactly."""
    assert text_summary(summary) == tvm_text_summary(tvm, summary)


def proxy_or_colon_keys(keys):
    """Server-entry keys (after ``server:``) that TVM counts wrongly."""
    colon = st.tuples(keys, keys).map(lambda pair: f"{pair[0]}:{pair[1]}")
    proxy = st.lists(keys, min_size=1, max_size=3, unique=True).map(
        lambda listed: "proxy[" + ",".join(listed) + "]"
    )
    return colon | proxy


@st.composite
def tricky_summaries(draw):
    """Summaries whose server entries include proxies and keys holding ':'."""
    keys = draw(st.lists(plain_keys, min_size=1, max_size=5, unique=True))
    colon_keys = [f"{a}:{b}" for a, b in zip(keys, reversed(keys)) if a != b]
    known = st.sampled_from(keys + colon_keys)
    served = known | proxy_or_colon_keys(st.sampled_from(keys))
    summary = draw(summaries(served_keys=served))
    for key in keys + colon_keys:
        summary["queue_info"].setdefault(key, draw(counts))
    return summary


def expected_totals(summary):
    """Servers per key, counted independently of the code under test."""
    totals = Counter()
    for item in summary["server_info"]:
        served = item["key"][len("server:"):]
        match = re.fullmatch(r"proxy\[(.*)\]", served)
        for key in (match.group(1).split(",") if match else [served]):
            totals[key] += 1
    return totals


@given(summary=tricky_summaries())
def test_text_summary_differs_from_tvm_only_in_the_documented_ways(tvm, summary):
    """
    With proxy entries and keys holding ':', the server list and the layout are
    TVM's; totals count a proxy entry toward each listed key and a key with
    ':' whole; rows of keys TVM does not miscount are TVM's.
    """
    ours = text_summary(summary)
    theirs = tvm_text_summary(tvm, summary)
    our_head, our_title, our_rows = parse_rows(ours)
    their_head, their_title, their_rows = parse_rows(theirs)
    assert our_head == their_head
    assert our_title == their_title

    totals = expected_totals(summary)
    queue_info = summary["queue_info"]
    shown = {k for k, v in queue_info.items() if totals[k] or v["pending"]}
    assert set(our_rows) == shown
    for key in shown:
        assert our_rows[key] == (totals[key], queue_info[key]["free"],
                                 queue_info[key]["pending"])

    tvm_totals = Counter(item["key"].split(":")[1] for item in summary["server_info"])
    for key, row in their_rows.items():
        if tvm_totals[key] == totals[key]:
            assert our_rows[key] == row
        else:
            assert our_rows.get(key) != row


def test_proxy_rows_hidden_by_tvm_are_shown(tvm):
    """The concrete case the issue names: TVM drops the proxied keys' rows."""
    summary = {
        "queue_info": {"a": {"free": 1, "pending": 0}, "b": {"free": 1, "pending": 0}},
        "server_info": [{"key": "server:proxy[a,b]", "addr": [HOST, 9090]}],
    }
    theirs = tvm_text_summary(tvm, summary)
    ours = text_summary(summary)
    assert "a   " not in theirs.split("Queue Status")[1]
    assert "a   1      1     0      \n" in ours
    assert "b   1      1     0      \n" in ours
    assert ours.replace("a   1      1     0      \nb   1      1     0      \n", "") == theirs


def run_query_tool(module, port, *extra):
    """Run a query tool as a process; @return: the completed process."""
    return subprocess.run(
        [sys.executable, "-m", module, "--host", HOST, "--port", str(port), *extra],
        stdin=subprocess.DEVNULL, capture_output=True, env=child_env(), timeout=90,
    )


def wait_for_free(port, key, timeout=60):
    """Poll our query tool's --json until C{key} has a free server."""
    last = [None]

    def free():
        done = last[0] = run_query_tool("tvm_rpc.query", port, "--json")
        if done.returncode == 0:
            summary = json.loads(done.stdout)
            if summary["queue_info"].get(key, {}).get("free"):
                return summary
        return None

    return wait_until(free, timeout, interval=0.3, what=lambda: (
        f"{key} free ({last[0].stdout!r} {last[0].stderr!r})"))


def test_query_tool_matches_tvm_on_tvm_tracker_with_tvm_server(tvm):
    """
    TVM's tracker with TVM's rpc_server registered: our query tool prints the
    same bytes as TVM's, then our client allocates that server through TVM's
    tracker.
    """
    with tvm_tracker() as (_, tracker_port):
        with tvm_rpc_server("--tracker", f"{HOST}:{tracker_port}", "--key", "interopq",
                            host=HOST) as (_, server_port):
            summary = wait_for_free(tracker_port, "interopq")
            assert {"key": "server:interopq", "addr": [HOST, server_port]} in \
                summary["server_info"]

            ours = run_query_tool("tvm_rpc.query", tracker_port)
            theirs = run_query_tool("tvm.exec.query_rpc_tracker", tracker_port)
            assert theirs.returncode == 0, theirs.stderr
            assert ours.returncode == 0, ours.stderr
            assert ours.stderr == b""
            assert ours.stdout == theirs.stdout
            assert b"server:interopq" in ours.stdout

            leases = run_query_tool("tvm_rpc.query", tracker_port, "--leases")
            assert leases.returncode == 0
            assert b"reports no leases" in leases.stdout

            allocated = allocate_with_our_client(tracker_port, "interopq")
            assert (allocated.host, allocated.port) == (HOST, server_port)
            assert allocated.matchkey.startswith("interopq:")


def allocate_with_our_client(tracker_port, key):
    """
    Run our client in a child process (the global reactor cannot be restarted
    in this one): connect, allocate C{key}, print the allocation as JSON.
    """
    script = (
        "import json, sys\n"
        "from twisted.internet import defer, task\n"
        "from tvm_rpc.client import connect_tracker\n"
        "async def go(reactor):\n"
        "    session = await connect_tracker(sys.argv[1], int(sys.argv[2]), reactor=reactor)\n"
        "    await session.ping()\n"
        "    got = await session.allocate(sys.argv[3], priority=2, timeout=30)\n"
        "    await session.close()\n"
        "    print(json.dumps([got.host, got.port, got.matchkey]))\n"
        "task.react(lambda r: defer.Deferred.fromCoroutine(go(r)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, HOST, str(tracker_port), key],
        stdin=subprocess.DEVNULL, capture_output=True, env=child_env(), timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    host, port, matchkey = json.loads(done.stdout)
    from tvm_rpc.client import Allocation

    return Allocation(host, port, matchkey)
