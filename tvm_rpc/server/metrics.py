"""The server's Prometheus metrics, read from its counters at each scrape.

As the tracker's and the proxy's: a custom collector over plain counters
(L{tvm_rpc.server.activity.ServerActivity}), one L{CollectorRegistry} per
server.
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

from ..protocol.flavour import OUR_PROTOCOL, TVM_PROTOCOL
from .activity import SESSION_END_CAUSES, WORKER_EXIT_CAUSES

PREFIX = "tvm_rpc_server"
PROTOCOLS = (OUR_PROTOCOL, TVM_PROTOCOL)


class ServerCollector:
    """
    Collects the metrics of one server.

    @ivar activity: its L{ServerActivity<tvm_rpc.server.activity.ServerActivity>}.
    @ivar registered: returns whether the server is registered with its
        tracker now, or L{None} without C{--tracker}.
    @ivar spare_ready: returns whether a spare worker waits for the next
        session, or L{None} when sessions run in process.
    """

    def __init__(self, activity, registered=None, spare_ready=None):
        """See the class docstring for the parameters."""
        self.activity = activity
        self.registered = registered
        self.spare_ready = spare_ready

    def collect(self):
        """@return: an iterator of the metric families (see C{docs/remote-device.md})."""
        activity = self.activity
        started = CounterMetricFamily(f"{PREFIX}_sessions_started", "Sessions started, by protocol.",
                                      labels=["protocol"])
        active = GaugeMetricFamily(f"{PREFIX}_sessions_active", "Sessions running, by protocol.",
                                   labels=["protocol"])
        received = CounterMetricFamily(f"{PREFIX}_received_bytes",
                                       "Bytes received by ended sessions, by protocol.",
                                       labels=["protocol"])
        sent = CounterMetricFamily(f"{PREFIX}_sent_bytes",
                                   "Bytes sent by ended sessions, by protocol.", labels=["protocol"])
        ended = CounterMetricFamily(f"{PREFIX}_sessions_ended",
                                    "Sessions ended, by protocol and cause.",
                                    labels=["protocol", "cause"])
        durations = HistogramMetricFamily(f"{PREFIX}_session_duration_seconds",
                                          "Seconds ended sessions ran, by protocol.",
                                          labels=["protocol"])
        protocols = sorted(set(PROTOCOLS) | set(activity.started))
        for protocol in protocols:
            started.add_metric([protocol], activity.started[protocol])
            active.add_metric([protocol], activity.active(protocol))
            received.add_metric([protocol], activity.received[protocol])
            sent.add_metric([protocol], activity.sent[protocol])
            for cause in SESSION_END_CAUSES:
                ended.add_metric([protocol, cause], activity.ended[(protocol, cause)])
            histogram = activity.durations.get(protocol)
            if histogram is not None:
                durations.add_metric([protocol], histogram.cumulative(), histogram.total)
        yield from (started, active, ended, durations, received, sent)
        exits = CounterMetricFamily(f"{PREFIX}_worker_exits", "Session workers ended, by cause.",
                                    labels=["cause"])
        for cause in WORKER_EXIT_CAUSES:
            exits.add_metric([cause], activity.worker_exits[cause])
        yield exits
        yield CounterMetricFamily(
            f"{PREFIX}_sessions_in_kept_workers",
            "Sessions run in the worker of the same client's previous session (--keep-worker).",
            value=activity.kept_worker_sessions)
        refused = CounterMetricFamily(f"{PREFIX}_handshakes_refused",
                                      "Connections refused before a session, by reason.",
                                      labels=["reason"])
        for reason, count in sorted(activity.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        if self.registered is not None:
            yield GaugeMetricFamily(f"{PREFIX}_tracker_registered",
                                    "1 while registered with the tracker, else 0.",
                                    value=int(bool(self.registered())))
        if self.spare_ready is not None:
            yield GaugeMetricFamily(f"{PREFIX}_spare_worker_ready",
                                    "1 while a spare worker waits for the next session, else 0.",
                                    value=int(bool(self.spare_ready())))


def server_registry(activity, registered=None, spare_ready=None):
    """@return: a fresh L{CollectorRegistry} holding a L{ServerCollector} (same parameters)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServerCollector(activity, registered, spare_ready))
    return registry
