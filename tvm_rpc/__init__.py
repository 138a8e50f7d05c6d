"""tvm_rpc: Apache TVM's remote-execution system (tracker, proxy, server, client) on Twisted."""

__version__ = "0.1.0"
