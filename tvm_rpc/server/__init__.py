"""The device side: C{twistd rpc-server}, its sessions and their environment.

User code registers functions that every session can call::

    from tvm_rpc.server import register_func

    @register_func("demo.echo")
    def echo(value):
        return value
"""

from .registry import GLOBAL_REGISTRY, NoSuchFunction, Registry, register_func

__all__ = ["GLOBAL_REGISTRY", "NoSuchFunction", "Registry", "register_func"]
