"""The candidates of ``bench/tuning_loop.py``: N schedules of one small matmul, prebuilt.

Each candidate is ``C = A @ B`` (float32, L{SIZE} x L{SIZE}) scheduled one
way, built by L{tests.matmul_candidates} (compiled for ``llvm`` in this
process, as the MetaSchedule interop test builds its own), with the C{ArgInfo}
of its arguments as JSON.

The schedules are the product of four choices (64 in all), all
single-threaded so that K servers on a small machine do not fight over
thread pools: a tile of the row loop, a vectorized tile of the column loop,
a tile of the reduction, and two loop orders. More than 64 candidates reuse
the schedules in turn (each candidate still is its own file).
"""

import functools
import itertools

from tests import matmul_candidates

#: The matrices' side.
SIZE = 64
ROW_TILES = (1, 2, 4, 8)
#: 1: the column loop is not split; otherwise split by this and vectorized.
COLUMN_VECTORS = (1, 4, 8, 16)
REDUCTION_TILES = (1, 4)
#: Where the reduction's outer loop goes relative to the column tiles.
ORDERS = ("k-inside", "k-outside")

SCHEDULES = tuple(itertools.product(ROW_TILES, COLUMN_VECTORS, REDUCTION_TILES, ORDERS))


def _schedule(choice, sch):
    """
    Schedule L{tests.matmul_candidates.matmul}'s block C{"C"} in place.

    @param choice: one of L{SCHEDULES}.
    @param sch: a C{tvm.s_tir.Schedule} of the matmul.
    """
    row_tile, column_vector, reduction_tile, order = choice
    i, j, k = sch.get_loops(sch.get_sblock("C"))
    i_outer, i_inner = sch.split(i, [None, row_tile])
    j_outer, j_inner = sch.split(j, [None, column_vector])
    k_outer, k_inner = sch.split(k, [None, reduction_tile])
    if order == "k-inside":
        sch.reorder(i_outer, j_outer, i_inner, k_outer, k_inner, j_inner)
    else:
        sch.reorder(i_outer, k_outer, j_outer, i_inner, k_inner, j_inner)
    if column_vector > 1:
        sch.vectorize(j_inner)


def build(count, directory):
    """
    Build C{count} candidates into C{directory}.

    @return: a list of C{(library path, args_info)}, C{args_info} as
        MetaSchedule's JSON (C{[["TENSOR", "float32", [64, 64]], ...]}).
    """
    schedules = [(f"candidate{index:04d}",
                  functools.partial(_schedule, SCHEDULES[index % len(SCHEDULES)]))
                 for index in range(count)]
    return [(path, [info.as_json() for info in args_info])
            for path, args_info in matmul_candidates.build(SIZE, schedules, directory)]


def describe():
    """@return: one sentence naming the kernel and its schedules, for the docs."""
    return (f"`C = A @ B` (float32, {SIZE}x{SIZE}), scheduled {len(SCHEDULES)} ways "
            f"(row tile {ROW_TILES} x vectorized column tile {COLUMN_VECTORS} x "
            f"reduction tile {REDUCTION_TILES} x two loop orders), single-threaded")
