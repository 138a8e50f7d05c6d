"""MetaSchedule's ``RPCRunner`` (real apache-tvm) measuring candidates through our tracker.

A small matmul is scheduled three ways and compiled in this process for
``llvm``; MetaSchedule's ``RPCRunner``, given an ``RPCConfig`` that points at
our tracker, requests a server by key for each candidate, uploads it, fills
its arguments with ``tvm.contrib.random.random_fill_for_measure``, times it
with ``runtime.RPCTimeEvaluator`` and removes it, all through TVM's client in
the runner's worker process. The server behind the tracker is TVM's own
``rpc_server`` or ours.

The candidates are built in this process by L{tests.matmul_candidates}, not
by MetaSchedule's ``LocalBuilder`` (see there why).
"""

import pytest

from tests import matmul_candidates
from tests.daemons import free_servers, our_rpc_server, our_tracker, tvm_rpc_server, wait_summary

pytestmark = pytest.mark.system

KEY = "metaschedule"
N = 64
#: Each candidate is one session; the runner gives up on a session after this.
SESSION_TIMEOUT = 30


def _no_schedule(sch):
    """The compute as written: three nested loops."""


def _vectorized(sch):
    """The innermost spatial loop split by 8 and vectorized, the reduction outside it."""
    i, j, k = sch.get_loops(sch.get_sblock("C"))
    j_outer, j_inner = sch.split(j, [None, 8])
    sch.reorder(i, j_outer, k, j_inner)
    sch.vectorize(j_inner)


def _parallel(sch):
    """The outer loop split by 4 and its outer part run in parallel."""
    i, _, _ = sch.get_loops(sch.get_sblock("C"))
    i_outer, _ = sch.split(i, [None, 4])
    sch.parallel(i_outer)


@pytest.fixture(scope="module")
def candidates(tvm, tmp_path_factory):
    """
    Three schedules of ``C = A @ B`` (float32, N x N), compiled for llvm and
    exported; @return: a list of C{(library path, args_info)}.
    """
    schedules = [(f"matmul{variant.__name__}", variant)
                 for variant in (_no_schedule, _vectorized, _parallel)]
    return matmul_candidates.build(N, schedules, str(tmp_path_factory.mktemp("candidates")))


def _tvm_server(tracker_port):
    """TVM's own rpc_server registered with the tracker under L{KEY}."""
    return tvm_rpc_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", KEY)


def _our_server(tracker_port):
    """Our rpc-server registered with the tracker under L{KEY}."""
    return our_rpc_server("--tracker", f"127.0.0.1:{tracker_port}", "--key", KEY)


SERVERS = [
    pytest.param(_tvm_server, id="tvm"),
    pytest.param(_our_server, id="ours"),
]


def run_candidates(rpc_config, candidates):
    """
    Measure C{candidates} with MetaSchedule's RPCRunner; @return: the
    C{RunnerResult}s, in order.
    """
    from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCRunner, RunnerInput

    runner = RPCRunner(
        rpc_config,
        EvaluatorConfig(number=3, repeat=2, min_repeat_ms=0, enable_cpu_cache_flush=False),
    )
    try:
        futures = runner.run([RunnerInput(path, "cpu", info) for path, info in candidates])
        return [future.result() for future in futures]
    finally:
        runner.pool.shutdown()


@pytest.mark.parametrize("server", SERVERS)
def test_rpc_runner_measures_candidates(tvm, candidates, server):
    """Every candidate comes back with run times and no error."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig

    with our_tracker() as (_, tracker_port), server(tracker_port):
        wait_summary(tracker_port, lambda s: free_servers(s, KEY) >= 1, timeout=60)
        config = RPCConfig(
            tracker_host="127.0.0.1",
            tracker_port=tracker_port,
            tracker_key=KEY,
            session_timeout_sec=SESSION_TIMEOUT,
        )
        results = run_candidates(config, candidates)
    assert len(results) == len(candidates)
    for result in results:
        assert result.error_msg is None, result.error_msg
        assert result.run_secs is not None and len(result.run_secs) > 0
        seconds = [float(s) for s in result.run_secs]
        assert all(s > 0 for s in seconds), seconds
