"""
TVM's own RPC server with ``tvm.rpc.server.GetCRTMaxPacketSize`` registered
(as microTVM-style devices have it), for the chunking interop test.

Usage: ``python tests/tvm_packet_limit_server.py PORT LIMIT``; prints
``listening on PORT`` once TVM's server listens, then serves until killed.
"""

import sys
import time


def register_limit(limit):
    """@return: a server init callback registering the packet limit (run in TVM's worker)."""

    def register():
        import tvm

        tvm.register_global_func(
            "tvm.rpc.server.GetCRTMaxPacketSize", lambda: limit, override=True)

    return register


if __name__ == "__main__":
    import tvm.rpc

    port, limit = int(sys.argv[1]), int(sys.argv[2])
    # Returns once TVM's worker process has bound the port.
    server = tvm.rpc.Server("127.0.0.1", port, port + 1,
                            server_init_callback=register_limit(limit))
    print(f"listening on {server.port}", flush=True)
    while True:
        time.sleep(3600)
