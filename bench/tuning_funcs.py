"""What our rpc-server registers for ``bench/tuning_loop.py`` (``--init bench.tuning_funcs``).

MetaSchedule fills each argument with TVM's global
``tvm.contrib.random.random_fill_for_measure`` (C++, in libtvm_runtime). A
session of our protocol sees only the server's registry, where TVM's
runtime globals are not (found while writing this benchmark), so this module
registers TVM's function there under its own name; the array it receives
is the TVM tensor of the session's TVM backend.

TVM's function is taken at import, in the fork server: the server then
offers every registry function to TVM's clients as a TVM global of the same
name, so from then on that name is this wrapper, which a later lookup would
find (and call itself forever). A TVM client on our server thus fills
through this wrapper too: one Python call around the same C++ function.
"""

import tvm

from tvm_rpc.server import register_func

NAME = "tvm.contrib.random.random_fill_for_measure"

_random_fill = tvm.get_global_func(NAME)


@register_func(NAME, override=True)
def random_fill_for_measure(tensor):
    """Fill C{tensor} (a TVM tensor) with random values by TVM's own function."""
    _random_fill(tensor)
