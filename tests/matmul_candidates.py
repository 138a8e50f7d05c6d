"""Candidates for MetaSchedule's runner: schedules of one small matmul, prebuilt.

A candidate is ``C = A @ B`` (float32, square) scheduled one way, compiled for
``llvm`` in this process and exported as a shared library, with
MetaSchedule's C{ArgInfo} of its arguments. They are built here rather than
by MetaSchedule's C{LocalBuilder}, whose worker cannot receive an IRModule in
the 0.27 wheel (pickling it for the worker fails).

Used by L{tests.test_interop_metaschedule} and by the tuning benchmark
(C{bench/tuning_candidates.py}); needs apache-tvm, imported lazily.
"""

import os


def matmul(size):
    """
    @param size: the matrices' side.
    @return: C{(module, args_info)}: the IRModule of C{C = A @ B} (its
        block is named C{"C"}) and MetaSchedule's C{ArgInfo} of C{A, B, C}.
    """
    import tvm
    from tvm import te
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    a = te.placeholder((size, size), "float32", name="A")
    b = te.placeholder((size, size), "float32", name="B")
    k = te.reduce_axis((0, size), name="k")
    c = te.compute((size, size), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="C")
    function = te.create_prim_func([a, b, c])
    return tvm.IRModule({"main": function}), ArgInfo.from_prim_func(function)


def build(size, schedules, directory):
    """
    Build one candidate per schedule.

    @param size: the matrices' side.
    @param schedules: C{(name, schedule)} pairs; C{schedule} changes a
        C{tvm.s_tir.Schedule} of L{matmul}'s module in place.
    @param directory: where the libraries go, each as C{NAME.so}.
    @return: a list of C{(library path, args_info)}, in the order of
        C{schedules}.
    """
    import tvm

    module, args_info = matmul(size)
    built = []
    for name, schedule in schedules:
        sch = tvm.s_tir.Schedule(module)
        schedule(sch)
        path = os.path.join(directory, f"{name}.so")
        tvm.compile(sch.mod, target="llvm").export_library(path)
        built.append((path, args_info))
    return built
