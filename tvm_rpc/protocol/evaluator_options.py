"""TVM's C{time_evaluator} parameters: their defaults and their check.

Both ends use L{check_time_evaluator}: the client before it sends a request
(so a mistake fails at once), the server on what it receives (a hostile or
buggy client). TVM's C++ timer (C{WrapTimeEvaluator} in TVM's
C{src/runtime/timer.cc}) takes every count as a C{int}, hence the int32
bound.
"""

import operator

#: TVM's C{time_evaluator} options beyond number, repeat and min_repeat_ms,
#: with TVM's defaults (C{tvm.runtime.Module.time_evaluator}).
TIME_EVALUATOR_OPTIONS = {
    "limit_zero_time_iterations": 100,
    "cooldown_interval_ms": 0,
    "repeats_to_cooldown": 1,
    "cache_flush_bytes": 0,
    "f_preproc": "",
}

#: The smallest value each integer parameter takes.
_LOWEST = {
    "number": 1,
    "repeat": 1,
    "limit_zero_time_iterations": 0,
    "cooldown_interval_ms": 0,
    "repeats_to_cooldown": 1,
    "cache_flush_bytes": 0,
}

_INT32_MAX = (1 << 31) - 1


def _integer(name, value):
    """
    @return: C{value} as an L{int} within C{name}'s bounds, or L{None} when
        it is not one.
    """
    if isinstance(value, bool):
        return None
    try:
        value = operator.index(value)
    except TypeError:
        return None
    return value if _LOWEST[name] <= value <= _INT32_MAX else None


def check_time_evaluator(number, repeat, min_repeat_ms, options=None):
    """
    Check TVM's C{time_evaluator} parameters.

    @param options: TVM's other options by name (see
        L{TIME_EVALUATOR_OPTIONS}); missing ones take their defaults.
    @return: every option of L{TIME_EVALUATOR_OPTIONS}, as plain L{int}s
        and a L{str}.
    @raise ValueError: naming every bad parameter: C{number} or C{repeat}
        below 1, a negative or non-finite C{min_repeat_ms},
        C{repeats_to_cooldown} below 1, any other count negative, an
        integer past int32, an unknown option or a C{f_preproc} that is
        not a string.
    """
    if (not options and type(number) is int and type(repeat) is int
            and type(min_repeat_ms) in (int, float)
            and 1 <= number <= _INT32_MAX and 1 <= repeat <= _INT32_MAX
            and 0 <= min_repeat_ms <= _INT32_MAX):
        # The common request, checked without building the problem list.
        return dict(TIME_EVALUATOR_OPTIONS)
    given = {} if options is None else dict(options)
    unknown = sorted(set(given) - set(TIME_EVALUATOR_OPTIONS))
    checked = {**TIME_EVALUATOR_OPTIONS, **given}
    problems = [f"unknown option {name!r}" for name in unknown]
    for name, value in (("number", number), ("repeat", repeat), *(
            (name, checked[name]) for name in TIME_EVALUATOR_OPTIONS if name in _LOWEST)):
        integer = _integer(name, value)
        if integer is None:
            problems.append(f"{name} must be an integer in [{_LOWEST[name]}, {_INT32_MAX}], "
                            f"not {value!r}")
        elif name in checked:
            checked[name] = integer
    try:
        good_ms = 0 <= float(min_repeat_ms) <= _INT32_MAX
    except (TypeError, ValueError):
        good_ms = False
    if isinstance(min_repeat_ms, bool) or not good_ms:
        problems.append(f"min_repeat_ms must be a number in [0, {_INT32_MAX}], "
                        f"not {min_repeat_ms!r}")
    if not isinstance(checked["f_preproc"], str):
        problems.append(f"f_preproc must be a function name (a string), "
                        f"not {checked['f_preproc']!r}")
    if problems:
        raise ValueError("bad time_evaluator parameters: " + "; ".join(problems))
    return {name: checked[name] for name in TIME_EVALUATOR_OPTIONS}
