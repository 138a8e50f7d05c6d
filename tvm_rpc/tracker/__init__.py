"""The RPC tracker: a TVM wire-compatible queue of devices by key.

L{scheduler} and L{state} are pure (no reactor, no transports); L{protocol} is
the thin Twisted adapter; L{listen} binds and guards the listening sockets;
L{tap} is ``twistd rpc-tracker``.
"""
