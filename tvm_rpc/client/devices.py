"""
Devices of a session: TVM's device names and numbers, and L{Device}.

L{resolve_device_type} reads TVM's device names (with its older aliases,
L{DEVICE_ALIASES}) and numbers. L{Device} is a device of the remote end bound
to its session, what users pass wherever a device is expected; on the wire it
travels as a L{DLDevice<tvm_rpc.protocol.values.DLDevice>}.
L{SessionDevices} gives a session its C{device()}, C{cpu()}, C{cuda()}, ...
"""

import attrs

from ..protocol import values

#: TVM's device names, including its older aliases, to device type numbers.
DEVICE_ALIASES = {
    **values.DEVICE_TYPES,
    "llvm": 1,
    "stackvm": 1,
    "c": 1,
    "gpu": 2,
    "nvptx": 2,
    "cl": 4,
    "mtl": 8,
    "mps": 8,
    "wgpu": 15,
}


def resolve_device_type(dev_type):
    """
    @param dev_type: TVM's device type number, or a name (C{"cpu"},
        C{"cuda"}, C{"cl"}, ...), optionally with an index (C{"cuda:1"}).
    @return: C{(device_type, index or None)}.
    @raise ValueError: for an unknown name or a bad number.
    """
    if isinstance(dev_type, bool):
        raise ValueError(f"bad device type {dev_type!r}")
    if isinstance(dev_type, int):
        if not 0 < dev_type < 1 << 31:
            raise ValueError(f"bad device type number {dev_type}")
        return dev_type, None
    if isinstance(dev_type, str):
        name, _, index = dev_type.strip().partition(":")
        if name not in DEVICE_ALIASES:
            raise ValueError(
                f"unknown device type {dev_type!r}; known: {', '.join(sorted(DEVICE_ALIASES))}"
            )
        if index:
            try:
                return DEVICE_ALIASES[name], int(index)
            except ValueError:
                raise ValueError(f"bad device index in {dev_type!r}") from None
        return DEVICE_ALIASES[name], None
    raise ValueError(f"a device type is a name or a number, not {type(dev_type).__name__}")


@attrs.frozen(eq=False)
class Device:
    """
    A device of the remote end, by TVM's numbering (cpu=1, cuda=2, ...).

    Pass it wherever a device is expected (C{empty}, C{array},
    C{time_evaluator}, function arguments).

    @ivar session: the L{RPCSession<tvm_rpc.client.session.RPCSession>}.
    @ivar device_type: TVM's device type number.
    @ivar index: the device index.
    """

    session: object = attrs.field(repr=False)
    device_type: int
    index: int = 0

    @property
    def name(self):
        """TVM's name of the device type (C{"cpu"}, C{"cuda"}, ...)."""
        return values.DEVICE_NAMES.get(self.device_type, f"device{self.device_type}")

    def to_wire(self):
        """@return: the L{tvm_rpc.protocol.values.DLDevice} the codec carries."""
        return values.DLDevice(self.device_type, self.index)

    def exists(self):
        """@return: a Deferred firing with whether the device exists on the server."""
        return self.session._device_exists(self)

    def sync(self):
        """@return: a Deferred firing once the device finished its queued work."""
        return self.session._device_sync(self)

    def __eq__(self, other):
        if isinstance(other, Device):
            return (other.session, other.device_type, other.index) == (
                self.session, self.device_type, self.index)
        return NotImplemented

    def __hash__(self):
        return hash((id(self.session), self.device_type, self.index))

    def __str__(self):
        return f"remote {self.name}({self.index})"



def _device_shortcut(dev_type, what):
    """
    @param dev_type: TVM's device name.
    @param what: the device's name for the docstring.
    @return: a method C{session.<name>(index=0)} giving that device of the session.
    """

    def shortcut(self, index=0):
        return self.device(dev_type, index)

    shortcut.__doc__ = f"@return: the remote {what} device C{{index}}."
    return shortcut


class SessionDevices:
    """
    The device verbs of L{RPCSession<tvm_rpc.client.rpc_session.RPCSession>}.

    A mixin: the session provides C{_own(thing)}, which checks that a device
    belongs to it.
    """

    __slots__ = ()

    def device(self, dev_type, index=0):
        """
        @param dev_type: a name (C{"cpu"}, C{"cuda"}, C{"cl"}, C{"cuda:1"},
            ...) or TVM's device type number.
        @param index: the device index (unless the name carries one).
        @return: a L{Device} of this session (no round trip; see
            L{Device.exists}).
        """
        device_type, named_index = resolve_device_type(dev_type)
        return Device(self, device_type, index if named_index is None else named_index)

    def cpu(self, index=0):
        """@return: the remote C{cpu(index)}."""
        return self.device("cpu", index)

    cuda = _device_shortcut("cuda", "CUDA")
    cl = _device_shortcut("opencl", "OpenCL")
    vulkan = _device_shortcut("vulkan", "Vulkan")
    metal = _device_shortcut("metal", "Metal")
    rocm = _device_shortcut("rocm", "ROCm")
    ext_dev = _device_shortcut("ext_dev", "extension")
    hexagon = _device_shortcut("hexagon", "Hexagon")
    webgpu = _device_shortcut("webgpu", "WebGPU")

    def _device(self, device):
        """Normalise a device argument (None means cpu(0))."""
        if device is None:
            return self.cpu(0)
        if isinstance(device, Device):
            return self._own(device)
        if isinstance(device, values.DLDevice):
            return Device(self, device.device_type, device.index)
        return self.device(device)


__all__ = ["DEVICE_ALIASES", "Device", "SessionDevices", "resolve_device_type"]
