"""The tracker's limits: what one peer, or one address, may make it hold.

Every limit has a safe default here and a C{twistd rpc-tracker} option in
L{tvm_rpc.tracker.tap}; C{docs/robustness.md} says what happens when each is
hit.
"""

import attrs

MiB = 1 << 20


@attrs.frozen
class TrackerLimits:
    """
    The bounds the tracker enforces.

    @ivar max_output: bytes of replies one connection may have waiting beyond
        its transport's buffer (which is when the tracker stops reading from
        it); one more reply closes the connection.
    @ivar max_connections_per_address: open connections from one IP address;
        more are closed at once. Non-IP peers (UNIX sockets) are not counted.
    @ivar greeting_timeout: seconds a new connection has to send the magic,
        or L{None} for no limit.
    @ivar idle_timeout: seconds a connection that holds nothing (no waiting
        request, no free or handed-out server, no server info) may stay
        silent after the magic, or L{None} for no limit.
    @ivar max_pending: waiting requests on one connection; one more closes
        it.
    @ivar max_free: free servers on one connection; one more closes it.
    @ivar max_priority: requests asking for more are queued at this priority.
    @ivar max_keys: keys listed at once (see
        L{tvm_rpc.tracker.scheduler.Scheduler}).
    @ivar key_idle_timeout: seconds a key nobody uses stays listed, or
        L{None} for ever (TVM's behaviour).
    @ivar activity_lines_per_second: grant, release and other activity lines
        logged per second at most (the rest are summed up), or L{None}.
    """

    max_output: int = 4 * MiB
    max_connections_per_address: int = 256
    greeting_timeout: "float | None" = 60.0
    idle_timeout: "float | None" = None
    max_pending: int = 100
    max_free: int = 10_000
    max_priority: float = 1000
    max_keys: int = 10_000
    key_idle_timeout: "float | None" = 600.0
    activity_lines_per_second: "int | None" = 100
