"""The proxy's Prometheus metrics, read from its pool and activity at each scrape.

As the tracker's (L{tvm_rpc.tracker.metrics}): a custom collector over plain
counters, so the relay's hot path never touches a metric object, and one
L{CollectorRegistry} per proxy.
"""

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "tvm_rpc_proxy"


class ProxyCollector:
    """
    Collects the metrics of one proxy.

    @ivar pool: the proxy's L{tvm_rpc.proxy.pairing.PairingPool} (its
        C{activity} holds the counters).
    """

    def __init__(self, pool):
        """@param pool: the L{tvm_rpc.proxy.pairing.PairingPool}."""
        self.pool = pool

    def collect(self):
        """@return: an iterator of the metric families (see C{docs/proxy.md})."""
        activity = self.pool.activity
        servers_by_key, clients = self.pool.waiting_by_role()
        servers = GaugeMetricFamily(f"{PREFIX}_servers_waiting",
                                    "Servers waiting for a client, by key.", labels=["key"])
        for key, count in sorted(servers_by_key.items()):
            servers.add_metric([key], count)
        yield servers
        yield GaugeMetricFamily(f"{PREFIX}_clients_waiting", "Clients waiting for a server.",
                                value=clients)
        yield _by_label(CounterMetricFamily, "pairs", "Pairs made, by path.", "path",
                        activity.pairs, ("tcp", "websocket"))
        yield GaugeMetricFamily(f"{PREFIX}_pairs_active", "Pairs relaying now.",
                                value=len(activity.active))
        yield _by_label(CounterMetricFamily, "pairs_ended", "Pairs ended, by reason.",
                        "reason", activity.ended, ("closed", "lost"))
        relayed = CounterMetricFamily(
            f"{PREFIX}_relayed_bytes",
            "Bytes relayed, by direction and relay (twisted, or splice: the kernel's).",
            labels=["direction", "relay"])
        for (direction, relay), count in sorted(activity.bytes_relayed().items()):
            relayed.add_metric([direction, relay], count)
        yield relayed
        yield _by_label(CounterMetricFamily, "handshakes_refused",
                        "Connections refused, by reason.", "reason", activity.refused, ())
        yield GaugeMetricFamily(f"{PREFIX}_connections", "Open connections.",
                                value=activity.connections_open)
        yield CounterMetricFamily(f"{PREFIX}_connections_accepted", "Connections accepted.",
                                  value=activity.connections_total)


def _by_label(family, name, documentation, label, counts, always):
    """
    @param counts: a mapping of label value to count.
    @param always: label values shown even at zero (so a rate has a start).
    @return: a metric family of C{counts} under one label.
    """
    metric = family(f"{PREFIX}_{name}", documentation, labels=[label])
    for value in sorted(set(always) | set(counts)):
        metric.add_metric([value], counts.get(value, 0))
    return metric


def proxy_registry(pool):
    """@return: a fresh L{CollectorRegistry} holding a L{ProxyCollector} of C{pool}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(pool))
    return registry
