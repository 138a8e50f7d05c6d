"""The tracker's Prometheus metrics, read from its state at each scrape.

A custom collector rather than live metric objects: the hot path only bumps
the plain counters of L{tvm_rpc.tracker.activity.TrackerActivity}, and a
scrape turns them (and the queues) into metric families. Each tracker gets
its own L{CollectorRegistry}, so several trackers (or tests) in one process
do not collide.
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

PREFIX = "tvm_rpc_tracker"


class TrackerCollector:
    """
    Collects the metrics of one L{tvm_rpc.tracker.state.TrackerState}.

    @ivar state: the state read at each scrape.
    """

    def __init__(self, state):
        """@param state: the L{tvm_rpc.tracker.state.TrackerState}."""
        self.state = state

    def collect(self):
        """@return: an iterator of the metric families (see C{docs/tracker.md})."""
        state = self.state
        activity = state.activity
        servers = GaugeMetricFamily(
            f"{PREFIX}_servers", "Servers registered, by key and state (free or held).",
            labels=["key", "state"])
        pending = GaugeMetricFamily(
            f"{PREFIX}_pending_requests", "Requests waiting for a server, by key.",
            labels=["key"])
        queues = state.scheduler.queues()
        for key, queue in queues:
            servers.add_metric([key, "free"], queue.free)
            servers.add_metric([key, "held"], queue.held)
            pending.add_metric([key], queue.pending)
        yield servers
        yield pending
        yield GaugeMetricFamily(f"{PREFIX}_keys", "Device keys listed.", value=len(queues))
        yield CounterMetricFamily(f"{PREFIX}_requests", "Requests received.",
                                  value=activity.requests)
        yield CounterMetricFamily(f"{PREFIX}_grants", "Servers handed out to requests.",
                                  value=activity.grants)
        yield CounterMetricFamily(f"{PREFIX}_releases",
                                  "Handed-out servers free again or gone.",
                                  value=activity.releases)
        ended = CounterMetricFamily(f"{PREFIX}_requests_unanswered",
                                    "Waiting requests that left unanswered, by reason.",
                                    labels=["reason"])
        ended.add_metric(["expired"], activity.expired)
        ended.add_metric(["withdrawn"], activity.withdrawn)
        yield ended
        waits = activity.wait_times
        yield HistogramMetricFamily(
            f"{PREFIX}_wait_seconds", "Seconds a granted request waited for its server.",
            buckets=waits.cumulative(),
            sum_value=waits.total)
        yield GaugeMetricFamily(f"{PREFIX}_connections", "Open connections.",
                                value=activity.connections_open)
        yield CounterMetricFamily(f"{PREFIX}_connections_accepted",
                                  "Connections accepted.", value=activity.connections_total)
        errors = CounterMetricFamily(
            f"{PREFIX}_connection_errors",
            "Connections closed or refused for a fault, by reason.", labels=["reason"])
        for reason, count in sorted(activity.errors.items()):
            errors.add_metric([reason], count)
        yield errors


def tracker_registry(state):
    """@return: a fresh L{CollectorRegistry} holding a L{TrackerCollector} of C{state}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrackerCollector(state))
    return registry
