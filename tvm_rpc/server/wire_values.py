"""How a session's values cross the wire on the server side.

Arguments arrive decoded by the value codec (L{tvm_rpc.protocol.values}):
L{from_wire} turns them into what functions receive, looking handles up in the
session's handle table and making arrays with its backend. Results go the
other way: L{to_wire} turns whatever a function returned into a value the codec
encodes, adding modules, arrays and functions to the handle table and sending
references to them. Both work on a
L{SessionEnvironment<tvm_rpc.server.environment.SessionEnvironment>}, which
calls them for its own C{from_wire}/C{to_wire}.
"""

import collections.abc

from ..protocol import values
from ..protocol.values import ArrayRef, DLDevice, Handle, HostArray
from . import modules
from .backends import check_device


def from_wire(environment, value):
    """
    Turn a decoded value into what functions receive: handles and array
    references into the objects they name, host arrays into arrays of the
    session's backend, devices into the backend's devices, containers item
    by item. (The decoder already bounded the nesting.)

    @param environment: the session's
        L{SessionEnvironment<tvm_rpc.server.environment.SessionEnvironment>}.
    @param value: a value from L{tvm_rpc.protocol.values.decode}.
    @raise HandleError: for an unknown handle, or one of another kind.
    @raise DeviceError: for a device this server cannot drive.
    """
    if isinstance(value, Handle):
        return environment.get(value.id, value.kind)
    if isinstance(value, ArrayRef):
        return environment.get(value.id, "array")
    if isinstance(value, HostArray):
        array = environment.backend.empty(value.shape, value.dtype, DLDevice(1, 0))
        environment.backend.fill(array, value.data)
        return array
    if isinstance(value, DLDevice):
        return environment.backend.device(check_device(value))
    if isinstance(value, list):
        return [from_wire(environment, item) for item in value]
    if isinstance(value, tuple):
        return tuple(from_wire(environment, item) for item in value)
    if isinstance(value, dict):
        return {key: from_wire(environment, item) for key, item in value.items()}
    return value


def to_wire(environment, value, depth=0):
    """
    Turn a function's result into an encodable value: plain values as they
    are (subclasses of C{str} and C{int} as the plain type), containers item
    by item, modules, arrays and other callables into the handle table as
    references, the backend's devices into L{DLDevice}s, numpy scalars into
    Python numbers.

    @param environment: the session's
        L{SessionEnvironment<tvm_rpc.server.environment.SessionEnvironment>}.
    @param depth: how deep C{value} sits in the result.
    @raise TypeError: for a value that cannot cross the wire, or a result
        nested deeper than the codec's L{tvm_rpc.protocol.values.MAX_DEPTH}.
    """
    if depth > values.MAX_DEPTH:
        raise TypeError("result nested too deeply to send")
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        if isinstance(value, str) and type(value) is not str:
            return str(value)
        if isinstance(value, int) and type(value) not in (int, bool):
            return int(value)
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, (DLDevice, HostArray, ArrayRef, Handle)):
        return value
    # Plain containers first: only other objects need the array backend
    # (which may import TVM's runtime) to be told apart.
    if isinstance(value, list) or (isinstance(value, tuple) and type(value) is not tuple):
        return [to_wire(environment, item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(to_wire(environment, item, depth + 1) for item in value)
    if isinstance(value, dict):
        return {to_wire(environment, key, depth + 1): to_wire(environment, item, depth + 1)
                for key, item in value.items()}
    if modules.is_module(value):
        return Handle("module", environment.add(value))
    if environment.backend.is_array(value):
        return environment.array_ref(environment.add(value))
    device = environment.backend.to_wire_device(value)
    if device is not None:
        return device
    if isinstance(value, collections.abc.Mapping):
        return {to_wire(environment, key, depth + 1): to_wire(environment, item, depth + 1)
                for key, item in value.items()}
    if isinstance(value, collections.abc.Sequence):
        return [to_wire(environment, item, depth + 1) for item in value]
    item = getattr(value, "item", None)
    if callable(item) and type(value).__module__ == "numpy":
        return to_wire(environment, item(), depth + 1)
    if callable(value):
        return Handle("function", environment.add(value))
    raise TypeError(f"cannot send a {type(value).__module__}.{type(value).__qualname__} "
                    "back to the client")
