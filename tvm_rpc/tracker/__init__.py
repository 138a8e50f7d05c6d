"""The RPC tracker: a TVM wire-compatible queue of devices by key.

L{scheduler} and L{state} are pure (no reactor, no transports); L{limits}
holds every bound the tracker enforces and its default; L{protocol} is the
thin Twisted adapter; L{tap} is C{twistd rpc-tracker} (the listening sockets
are bound and guarded by L{tvm_rpc.daemon.listening}).
"""
