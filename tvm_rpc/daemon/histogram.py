"""A histogram of plain counters, for daemons' metrics.

Observing is a bisect and two adds, with no lock and no import of
C{prometheus_client} (which loads only with C{--http}); a collector turns it
into a Prometheus histogram family at scrape time (L{cumulative}).
"""

from bisect import bisect_left

import attrs


@attrs.define(eq=False)
class Histogram:
    """
    Observations counted into buckets.

    @ivar bounds: the buckets' upper bounds, ascending.
    @ivar counts: per bucket (and one past the last bound) how many
        observations fell in it (not cumulative).
    @ivar total: the sum of all observations.
    """

    bounds: tuple
    counts: list = attrs.field(init=False)
    total: float = attrs.field(init=False, default=0.0)

    def __attrs_post_init__(self):
        """Start with every bucket empty."""
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value):
        """Count one observation of C{value}."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self):
        """How many observations were counted."""
        return sum(self.counts)

    def cumulative(self):
        """
        @return: C{[(bound, count_at_or_below), ...]} with bounds as
            Prometheus writes them (C{"+Inf"} last), for a
            C{HistogramMetricFamily}.
        """
        rows, running = [], 0
        for bound, count in zip(self.bounds + (None,), self.counts):
            running += count
            rows.append(("+Inf" if bound is None else repr(float(bound)), running))
        return rows
