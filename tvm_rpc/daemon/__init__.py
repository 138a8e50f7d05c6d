"""What the three daemons (tracker, server, proxy) share around their protocols.

This package is on the ground floor: L{tvm_rpc.tracker}, L{tvm_rpc.server}
and L{tvm_rpc.proxy} all import it, so that none of them imports another
daemon's package. It is not sans-IO (that is L{tvm_rpc.protocol}'s job).
Import from the topic modules:

  - L{tvm_rpc.daemon.options}: option coercers and the listening flags;
  - L{tvm_rpc.daemon.logs}: the C{--silent} switch and its loggers;
  - L{tvm_rpc.daemon.ports}: listening ports that survive running out of file
    descriptors;
  - L{tvm_rpc.daemon.listening}: binding the listening ports (first free port
    of a range, or every endpoint) and announcing them;
  - L{tvm_rpc.daemon.http}: a daemon's HTTP port (C{--http}) and its
    C{/metrics} resource.
"""
