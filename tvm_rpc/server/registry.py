"""The registry of global functions a session can call by name.

Functions registered with L{register_func} are visible in every session
the server runs (TVM's C{tvm.register_func} counterpart). Modules named with
C{twistd rpc-server --init MODULE[:CALLABLE]} are imported at start-up and
register their functions through it::

    from tvm_rpc.server import register_func

    @register_func("demo.add")
    def add(a, b):
        return a + b
"""

import attrs


class NoSuchFunction(LookupError):
    """No function has the name asked for."""


@attrs.define
class Registry:
    """Global functions by name."""

    _functions: dict = attrs.field(factory=dict)

    def register(self, name, function=None, *, override=False):
        """
        Register a function under C{name}.

        Usable as C{register(name, f)}, as a decorator C{@register(name)}, or
        as a bare decorator C{@register} (the function's own name is used).

        @param override: replace an existing registration instead of failing.
        @return: the function (so decorators leave it usable locally).
        @raise ValueError: when C{name} is taken and C{override} is false.
        @raise TypeError: when C{function} is not callable.
        """
        if callable(name) and function is None:
            return self.register(name.__name__, name, override=override)
        if not isinstance(name, str) or not name:
            raise TypeError(f"function names are non-empty strings, not {name!r}")
        if function is None:
            return lambda f: self.register(name, f, override=override)
        if not callable(function):
            raise TypeError(f"cannot register {function!r} under {name!r}: not callable")
        if name in self._functions and not override:
            raise ValueError(f"a function named {name!r} is already registered")
        self._functions[name] = function
        return function

    def unregister(self, name):
        """Remove C{name}; unknown names are ignored."""
        self._functions.pop(name, None)

    def get(self, name):
        """
        @return: the function registered under C{name}.
        @raise NoSuchFunction: when there is none.
        """
        try:
            return self._functions[name]
        except KeyError:
            raise NoSuchFunction(f"no global function named {name!r} on this server") from None

    def names(self):
        """@return: the registered names, sorted."""
        return sorted(self._functions)

    def __contains__(self, name):
        """@return: whether a function is registered under C{name}."""
        return name in self._functions


#: The process-wide registry every session consults.
GLOBAL_REGISTRY = Registry()


def register_func(name, function=None, *, override=False):
    """
    Register a global function in L{GLOBAL_REGISTRY}; see L{Registry.register}.

    @return: the function, or a decorator when C{function} is omitted.
    """
    return GLOBAL_REGISTRY.register(name, function, override=override)
