"""Functions our rpc-server registers for ``bench/session.py`` (``--init bench.session_funcs``).

``rpc.test.addone`` mirrors the Python function of the same name that TVM's
server registers (``tvm/rpc/testing.py``), so both sides time the same call.
"""

from tvm_rpc.server import register_func


@register_func("rpc.test.addone", override=True)
def addone(x):
    """@return: C{x + 1}."""
    return x + 1
