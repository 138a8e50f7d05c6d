"""The tracker's status: what the status page, C{/api/summary} and the
metrics show, built from the L{TrackerState} when asked (never on the hot
path).

Matchkeys never appear: anyone who can read the page could otherwise take a
device's session (see L{tvm_rpc.tracker.state.Lease.to_json}). Peer-supplied
strings (keys, users, addresses) are returned as they came; whoever renders
them escapes them.
"""

from collections import defaultdict

from .activity import address

#: The most servers and the most waiting requests listed per key (the counts
#: are always whole): 10,000 pending requests would make a page nobody reads.
MAX_LISTED = 50


def _holder(lease):
    """@return: who holds a handed-out server."""
    return {"client": [lease.client_host, lease.client_port], "user": lease.user,
            "priority": lease.priority}


def _via(connection):
    """@return: C{"proxy"} or C{"direct"}: how a server's connection reached the tracker."""
    return "proxy" if connection.via_proxy else "direct"


def key_status(key, queue, leases, now, limit=MAX_LISTED):
    """
    @param key: the device key.
    @param queue: its L{tvm_rpc.tracker.scheduler.KeyQueue}.
    @param leases: its L{tvm_rpc.tracker.state.Lease}s, oldest first.
    @param now: the clock's time.
    @param limit: the most servers of each state and waiting requests listed.
    @return: the key's counts, its servers (free ones first, in the order
        they are handed out, then the held ones, oldest lease first) and its
        waiting requests in the order they are served.
    """
    servers = []
    for offer in queue.offers(limit):
        slot = offer.payload
        servers.append({"host": slot.host, "port": slot.port, "state": "free",
                        "since": slot.since, "for": now - slot.since,
                        "via": _via(slot.connection), "holder": None})
    for lease in leases[:limit]:
        servers.append({"host": lease.host, "port": lease.port, "state": "held",
                        "since": lease.since, "for": now - lease.since,
                        "via": _via(lease.server), "holder": _holder(lease)})
    waiting = [
        {"user": pending.user, "priority": pending.priority,
         "client": [pending.connection.host, pending.connection.port],
         "since": pending.since, "waiting": now - pending.since}
        for pending in queue.waiters(limit)
    ]
    return {"key": key, "free": queue.free, "held": queue.held, "pending": queue.pending,
            "servers": servers, "waiting": waiting}


def event_status(event):
    """@return: an L{tvm_rpc.tracker.activity.Event} as JSON, with its text."""
    return {"at": event.at, "kind": event.kind, "key": event.key, "text": event.text()}


def tracker_status(state, limit=MAX_LISTED):
    """
    @param state: the L{tvm_rpc.tracker.state.TrackerState}.
    @param limit: the most servers and waiting requests listed per key.
    @return: a JSON-able dict: SUMMARY's C{queue_info}, C{server_info} and
        C{leases}, plus C{now}, C{uptime}, C{keys} (per key: counts, servers,
        waiting requests; sorted by key), C{events} (newest first) and
        C{counters}.
    """
    now = state.clock.seconds()
    activity = state.activity
    summary = state.summary()
    by_key = defaultdict(list)
    for lease in state.leases():
        by_key[lease.key].append(lease)
    keys = [key_status(key, queue, by_key.get(key, []), now, limit)
            for key, queue in sorted(state.scheduler.queues(), key=lambda item: item[0])]
    summary.update({
        "now": now,
        "uptime": now - activity.started,
        "keys": keys,
        "events": [event_status(event) for event in reversed(activity.events())],
        "counters": {
            "grants": activity.grants,
            "releases": activity.releases,
            "requests": activity.requests,
            "expired": activity.expired,
            "withdrawn": activity.withdrawn,
            "connections_open": activity.connections_open,
            "connections_total": activity.connections_total,
            "errors": dict(activity.errors),
        },
    })
    return summary


def server_address(server):
    """@return: a listed server's C{host:port}."""
    return address(server["host"], server["port"])
