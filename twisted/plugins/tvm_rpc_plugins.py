"""twistd plugins: C{twistd rpc-tracker}, C{twistd rpc-proxy}, C{twistd rpc-server}.

Each ServiceMaker names its C{tap} module lazily, so C{twistd --help} imports
nothing of ours.
"""

from twisted.application.service import ServiceMaker

rpc_tracker = ServiceMaker(
    "TVM RPC tracker",
    "tvm_rpc.tracker.tap",
    "Queue requests for remote devices by key (TVM wire-compatible).",
    "rpc-tracker",
)

rpc_proxy = ServiceMaker(
    "TVM RPC proxy",
    "tvm_rpc.proxy.tap",
    "Pair clients and servers by key and relay their bytes with backpressure (TVM wire-compatible).",
    "rpc-proxy",
)

rpc_server = ServiceMaker(
    "TVM RPC server",
    "tvm_rpc.server.tap",
    "Run uploaded, compiled models for remote clients (TVM wire-compatible handshake).",
    "rpc-server",
)
