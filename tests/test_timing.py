"""The Python timer of time_evaluator (tvm_rpc.server.timing) and the check of its options.

The timer follows TVM's C++ timer (WrapTimeEvaluator, src/runtime/timer.cc);
these tests drive it with a fake clock that moves only when the timed
function runs, so every count and every duration is exact.
"""

import pytest
from hypothesis import given, strategies as st

from tvm_rpc.protocol.evaluator_options import TIME_EVALUATOR_OPTIONS, check_time_evaluator
from tvm_rpc.server import timing

pytestmark = pytest.mark.unit


class Device:
    """A fake device: counts the syncs; a fake clock that the work advances."""

    def __init__(self, costs):
        """
        @param costs: the seconds each call of the timed function takes, in
            turn (the last one repeats).
        """
        self.now = 0.0
        self.costs = list(costs)
        self.calls = 0
        self.events = []

    def timer(self):
        """@return: the fake time."""
        return self.now

    def work(self, *args):
        """The timed function: advances the clock by the next cost."""
        self.now += self.costs[min(self.calls, len(self.costs) - 1)]
        self.calls += 1

    def run(self, number, repeat, min_repeat_ms=0, **options):
        """@return: the per-repeat means of timing L{work} with these parameters."""
        checked = check_time_evaluator(number, repeat, min_repeat_ms, options)
        preproc = None
        if checked["f_preproc"]:
            def preproc(*args):
                self.events.append(("preproc", args, self.calls))
        return timing.python_time_evaluator(
            self.work, ("a", "b"), number, repeat, min_repeat_ms, checked,
            sync=lambda: None, timer=self.timer, preproc=preproc,
            sleep=lambda seconds: self.events.append(("sleep", seconds, self.calls)))


def test_number_by_repeat_after_one_warm_up():
    """Without min_repeat_ms: one warm-up call, then number calls per repeat."""
    device = Device([0.001])
    assert device.run(3, 2) == pytest.approx([0.001, 0.001])
    assert device.calls == 1 + 3 * 2


def test_min_repeat_ms_grows_number_as_tvm_does():
    """A short run grows number to min_repeat_ms / per-call + 1 (at least x1.618), kept after."""
    device = Device([0.001])
    assert device.run(1, 2, min_repeat_ms=10) == pytest.approx([0.001, 0.001])
    # Repeat 1: 1 call (1 ms), then int(max(10 / 1 + 1, 1.618)) = 11 calls (11 ms).
    # Repeat 2 keeps number = 11: one run of 11 calls is long enough.
    assert device.calls == 1 + (1 + 11) + 11


def test_zero_time_runs_are_bounded_by_limit_zero_time_iterations():
    """A run that measures zero keeps number; the limit ends the repeat."""
    device = Device([0.0])
    assert device.run(2, 1, min_repeat_ms=5, limit_zero_time_iterations=7) == [0.0]
    assert device.calls == 1 + 7 * 2
    device = Device([0.0])
    assert device.run(2, 3, min_repeat_ms=5, limit_zero_time_iterations=0) == [0.0] * 3
    assert device.calls == 1 + 3 * 2


def test_zero_then_measurable_grows_only_after_measuring():
    """Zero runs do not grow number; the first measured run does."""
    device = Device([0.0, 0.0, 0.0, 0.002])
    assert device.run(1, 1, min_repeat_ms=4) == pytest.approx([0.002])
    # Warm-up (0), run 1 (0), run 2 (0), run 3 (2 ms: too short), then
    # int(max(4 / 2 + 1, 1.618)) = 3 calls of 2 ms.
    assert device.calls == 1 + 3 + 3


def test_cooldown_every_repeats_to_cooldown_repeats():
    """TVM sleeps after repeat i when i % repeats_to_cooldown == 0."""
    device = Device([0.001])
    device.run(2, 5, cooldown_interval_ms=30, repeats_to_cooldown=2)
    # After repeats 0, 2 and 4 (calls so far: warm-up + 2 per repeat).
    assert device.events == [("sleep", 0.03, 3), ("sleep", 0.03, 7), ("sleep", 0.03, 11)]


def test_no_cooldown_by_default():
    """cooldown_interval_ms=0 never sleeps."""
    device = Device([0.001])
    device.run(1, 4, repeats_to_cooldown=3)
    assert device.events == []


def test_preproc_before_each_repeat_with_the_arguments():
    """f_preproc runs before each repeat (not before each grown run), given the arguments."""
    device = Device([0.001])
    device.run(1, 2, min_repeat_ms=3, f_preproc="note")
    # Repeat 1: run of 1, then int(max(3 / 1 + 1, 1.618)) = 4; repeat 2: one run of 4.
    assert device.events == [("preproc", ("a", "b"), 1), ("preproc", ("a", "b"), 1 + 1 + 4)]


def test_cache_flush_copies_a_buffer_before_each_run(monkeypatch):
    """cache_flush_bytes: a buffer that size (rounded down to int32s) is rewritten before each run."""
    sizes = []
    made = bytearray

    class Spy(bytearray):
        def __setitem__(self, key, value):
            sizes.append(len(value))
            super().__setitem__(key, value)

    monkeypatch.setattr(timing, "bytearray", lambda size: Spy(made(size)), raising=False)
    device = Device([0.001])
    device.run(1, 3, cache_flush_bytes=4099)
    assert sizes == [4096] * 3
    sizes.clear()
    Device([0.001]).run(1, 3)
    assert sizes == []


@given(
    costs=st.lists(st.sampled_from([0.0, 1e-4, 0.003]), min_size=1, max_size=6),
    number=st.integers(1, 4),
    repeat=st.integers(1, 4),
    min_repeat_ms=st.sampled_from([0, 0.5, 2, 50]),
    limit=st.integers(0, 5),
)
def test_always_ends_with_one_result_per_repeat(costs, number, repeat, min_repeat_ms, limit):
    """Whatever the clock says, the timer ends, with one non-negative mean per repeat."""
    device = Device(costs)
    results = device.run(number, repeat, min_repeat_ms, limit_zero_time_iterations=limit)
    assert len(results) == repeat
    assert all(result >= 0 for result in results)


@pytest.mark.parametrize("parameters, named", [
    ((0, 1, 0, {}), "number"),
    ((1, 0, 0, {}), "repeat"),
    ((1, 1, -1, {}), "min_repeat_ms"),
    ((1, 1, float("nan"), {}), "min_repeat_ms"),
    ((1, 1, 0, {"limit_zero_time_iterations": -1}), "limit_zero_time_iterations"),
    ((1, 1, 0, {"cooldown_interval_ms": -5}), "cooldown_interval_ms"),
    ((1, 1, 0, {"repeats_to_cooldown": 0}), "repeats_to_cooldown"),
    ((1, 1, 0, {"cache_flush_bytes": 1 << 31}), "cache_flush_bytes"),
    ((1, 1, 0, {"cache_flush_bytes": 1.5}), "cache_flush_bytes"),
    ((1, 1, 0, {"f_preproc": 3}), "f_preproc"),
    ((True, 1, 0, {}), "number"),
    ((1, 1, 0, {"flush": 1}), "'flush'"),
])
def test_bad_parameters_are_named(parameters, named):
    """Each bad parameter is refused with a ValueError that names it."""
    number, repeat, min_repeat_ms, options = parameters
    with pytest.raises(ValueError, match=named):
        check_time_evaluator(number, repeat, min_repeat_ms, options)


def test_every_bad_parameter_is_named_at_once():
    """One ValueError lists all the problems."""
    with pytest.raises(ValueError) as raised:
        check_time_evaluator(0, 0, 0, {"repeats_to_cooldown": 0, "cooldown_interval_ms": -1})
    for name in ("number", "repeat", "repeats_to_cooldown", "cooldown_interval_ms"):
        assert name in str(raised.value)


def test_defaults_fill_in():
    """Missing options take TVM's defaults; the answer has plain ints and a str."""
    assert check_time_evaluator(1, 1, 0) == TIME_EVALUATOR_OPTIONS
    checked = check_time_evaluator(1, 1, 0, {"cache_flush_bytes": 8})
    assert checked["cache_flush_bytes"] == 8 and type(checked["cache_flush_bytes"]) is int
