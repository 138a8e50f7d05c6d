"""TVM's client as a tuner's runner: MetaSchedule's ``RPCRunner`` for ``bench/tuning_loop.py``.

The runner is TVM's, as shipped: its pool of K worker processes
(C{max_workers=K}), its C{_worker_func} and its C{default_*} steps
(create session, upload module, alloc argument, run evaluator, cleanup).
The only addition is a stopwatch: each step is passed to the runner as a
function (C{f_create_session=...}, the runner's documented hook) that calls
TVM's default step unchanged and notes how long it took; the cleanup step
then appends the candidate's timings as one JSON line to a file of its
worker in the directory named by C{$TUNING_LOOP_STEPS}. That costs a few
microseconds and one small file write per candidate, next to steps of
milliseconds.
"""

import json
import os
import threading
import time

#: The environment variable naming the directory the workers write their timings to.
STEPS_DIRECTORY = "TUNING_LOOP_STEPS"

#: The timings of the candidate this worker process is measuring.
_current = {}


def _timed(step, function, *args):
    """@return: C{function(*args)}, its duration noted as C{step} of the current candidate."""
    started = time.perf_counter()
    try:
        return function(*args)
    finally:
        _current[step] = time.perf_counter() - started


def create_session(rpc_config):
    """TVM's C{default_create_session}, timed: a new candidate starts here."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner

    _current.clear()
    return _timed("session", rpc_runner.default_create_session, rpc_config)


def upload_module(session, local_path, remote_path):
    """TVM's C{default_upload_module} (upload, then C{load_module}), timed."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner

    return _timed("upload", rpc_runner.default_upload_module, session, local_path, remote_path)


def alloc_argument(session, device, args_info, alloc_repeat):
    """TVM's C{default_alloc_argument} (empty + C{random_fill_for_measure} per argument), timed."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner

    return _timed("alloc", rpc_runner.default_alloc_argument, session, device, args_info,
                  alloc_repeat)


def run_evaluator(session, rt_mod, device, evaluator_config, repeated_args):
    """TVM's C{default_run_evaluator} (C{time_evaluator}, then sync and call per set), timed."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner

    return _timed("run", rpc_runner.default_run_evaluator, session, rt_mod, device,
                  evaluator_config, repeated_args)


def cleanup(session, remote_path):
    """TVM's C{default_cleanup} (three removes), timed; then the candidate's timings are written."""
    from tvm.s_tir.meta_schedule.runner import rpc_runner

    try:
        _timed("cleanup", rpc_runner.default_cleanup, session, remote_path)
    finally:
        record = {"remote_path": remote_path, "steps": dict(_current)}
        path = os.path.join(os.environ[STEPS_DIRECTORY], f"{os.getpid()}.jsonl")
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        _current.clear()


def read_steps(directory):
    """
    @return: remote path (a candidate's file name) -> its step timings, from
        every worker's file in C{directory}.
    """
    steps = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                steps[record["remote_path"]] = record["steps"]
    return steps


def client_cpu_seconds():
    """
    @return: the CPU seconds used so far by TVM's client: this process (the
        runner's threads) and the pool's workers, its children running
        C{tvm.exec.popen_worker} (the daemons' own workers are their
        children, not ours).
    """
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children():
        try:
            if "tvm.exec.popen_worker" in " ".join(child.cmdline()):
                total += sum(child.cpu_times()[:2])
        except psutil.NoSuchProcess:
            pass
    return total


def _outcome(result):
    """@return: a C{RunnerResult} as a dict: C{run_secs}, or C{error} (its first lines)."""
    if result.error_msg is not None:
        lines = [line for line in result.error_msg.splitlines() if line.strip()]
        return {"error": " ".join(lines[:3])}
    return {"run_secs": [float(s) for s in result.run_secs]}


class RunnerRow:
    """
    MetaSchedule's C{RPCRunner} on K devices, kept across the rounds of a run
    (a tuner keeps its runner too): its pool starts once.

    @ivar refused: the first error when every warm-up candidate failed, else L{None}.
    """

    def __init__(self, tracker_port, key, devices, evaluator, session_timeout,
                 steps_directory):
        """
        Make the runner (its pool starts one worker for its own check).

        @param evaluator: C{(number, repeat, min_repeat_ms)}.
        @param steps_directory: the directory the workers write their timings
            to, emptied before each measure (all rows may share it: they run
            one at a time).
        """
        from tvm.s_tir.meta_schedule.runner import EvaluatorConfig, RPCConfig, RPCRunner

        number, repeat, min_repeat_ms = evaluator
        # The pool's workers inherit the environment: where to write, and this tree on the path.
        os.environ[STEPS_DIRECTORY] = steps_directory
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        os.environ["PYTHONPATH"] = os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.devices = devices
        self.session_timeout = session_timeout
        self.steps_directory = steps_directory
        self.refused = None
        self._runner = RPCRunner(
            RPCConfig(tracker_host="127.0.0.1", tracker_port=tracker_port, tracker_key=key,
                      session_timeout_sec=session_timeout),
            EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=min_repeat_ms,
                            enable_cpu_cache_flush=False),
            f_create_session=create_session,
            f_upload_module=upload_module,
            f_alloc_argument=alloc_argument,
            f_run_evaluator=run_evaluator,
            f_cleanup=cleanup,
            max_workers=devices,
        )

    def _run(self, candidates):
        """@return: the outcomes of C{candidates}, in order (see L{_outcome})."""
        from tvm.s_tir.meta_schedule.arg_info import ArgInfo
        from tvm.s_tir.meta_schedule.runner import RunnerInput

        futures = self._runner.run(
            [RunnerInput(path, "cpu", [ArgInfo.from_json(info) for info in args_info])
             for path, args_info in candidates])
        # The runner's futures wait without a limit: past this one a watchdog
        # stops the pool (killing its workers), which fails what is left.
        limit = self.session_timeout * (len(futures) // self.devices + 2)
        watchdog = threading.Timer(limit, self._runner.pool.shutdown)
        watchdog.start()
        try:
            return [_outcome(future.result()) for future in futures]
        finally:
            watchdog.cancel()

    def warm_up(self, candidates):
        """
        Run C{candidates} untimed (the pool starts its workers); set
        L{refused} when every one failed.

        @return: their outcomes.
        """
        outcomes = self._run(candidates)
        if outcomes and all("error" in o for o in outcomes):
            self.refused = outcomes[0]["error"]
        return outcomes

    def measure(self, candidates):
        """
        @return: a dict: C{outcomes} (per candidate: C{run_secs} or C{error},
            and C{steps}), C{wall} (seconds from C{run()} to the last result)
            and C{client_cpu} (see L{client_cpu_seconds}).
        """
        for name in os.listdir(self.steps_directory):
            os.remove(os.path.join(self.steps_directory, name))
        cpu = client_cpu_seconds()
        started = time.perf_counter()
        outcomes = self._run(candidates)
        wall = time.perf_counter() - started
        cpu = client_cpu_seconds() - cpu
        steps = read_steps(self.steps_directory)
        for (path, _), outcome in zip(candidates, outcomes):
            outcome["steps"] = steps.get(os.path.basename(path), {})
        return {"outcomes": outcomes, "wall": wall, "client_cpu": cpu}

    def close(self):
        """Stop the runner's pool (its worker processes)."""
        self._runner.pool.shutdown()
