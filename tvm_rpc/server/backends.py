"""Array backends: where a session's arrays live, behind one declared interface.

A session holds its arrays through an L{IArrayBackend}, chosen once
per process by L{select_backend}:

  - L{TVMBackend}: TVM tensors on any device TVM's runtime drives (so
    compiled TVM functions take them directly), when TVM's runtime imports;
  - L{NumpyBackend}: numpy arrays on the cpu, when numpy imports;
  - L{PythonBackend}: L{PythonArray} (a bytearray with a shape
    and a dtype) on the cpu, always. The server needs none of numpy or TVM.

Devices go by TVM's numbering; a device type TVM does not number is refused
by L{check_device} before TVM's runtime sees it (it would crash).
"""

import attrs
from zope.interface import Attribute, Interface, implementer

from ..protocol import values
from ..protocol.values import DLDevice
from .errors import DeviceError


class IArrayBackend(Interface):
    """Where a session's arrays live and how their bytes are reached."""

    name = Attribute('The backend\'s name: C{"tvm"}, C{"numpy"} or C{"python"}.')

    def device(device):
        """
        @param device: a L{DLDevice}.
        @return: the device object functions receive.
        @raise DeviceError: for a device this backend cannot drive.
        """

    def exists(device):
        """@return: whether the L{DLDevice} C{device} exists."""

    def sync(device):
        """Wait until C{device} has finished its queued work."""

    def to_wire_device(device):
        """@return: the L{DLDevice} of a device object, or L{None} if it is not one."""

    def is_array(value):
        """@return: whether C{value} is an array of this backend."""

    def empty(shape, dtype, device):
        """
        @return: a new zero-filled array.
        @raise DeviceError: on a device this backend cannot drive.
        """

    def describe(array):
        """@return: C{(shape, dtype, DLDevice)} of an array."""

    def host_bytes(array):
        """@return: the array's bytes in C order (a bytes-like, possibly a view)."""

    def writable_view(array):
        """@return: a writable byte view of the array's memory, or L{None} when it has none."""

    def fill(array, data):
        """Copy C{data} (exactly the array's size) into the array."""

    def piecewise(array):
        """
        @return: whether the array can be written and read a byte range at a
            time with L{write_at} and L{read_at} (arrays without a host view).
        """

    def write_at(array, offset, data):
        """Copy C{data} into the array at byte C{offset} (only when L{piecewise})."""

    def read_at(array, offset, length):
        """@return: C{length} bytes of the array at byte C{offset} (only when L{piecewise})."""


_VALID_DEVICE_TYPES = ", ".join(f"{name}={number}" for name, number in values.DEVICE_TYPES.items())


def check_device(device):
    """
    Refuse a device type TVM does not number, before TVM's runtime sees it
    (its runtime crashes the process on an unknown device type).

    @param device: a L{DLDevice}.
    @return: C{device}.
    @raise DeviceError: for an unknown device type, naming the valid ones.
    """
    if device.device_type not in values.DEVICE_NAMES:
        raise DeviceError(
            f"unknown device type {device.device_type}: valid device types are "
            f"{_VALID_DEVICE_TYPES}"
        )
    return device


@attrs.define(eq=False)
class PythonArray:
    """
    An array without numpy: raw C-order bytes with a shape, a dtype, a device.

    Functions of C{.py} modules receive these when neither TVM nor numpy is
    installed on the device; C{memoryview(array.data).cast(fmt, shape)}
    gives typed access.
    """

    shape: tuple
    dtype: str
    data: bytearray
    device: DLDevice = attrs.field(factory=lambda: DLDevice(1, 0))

    @property
    def nbytes(self):
        """The size in bytes."""
        return len(self.data)


@implementer(IArrayBackend)
class PythonBackend:
    """Arrays as L{PythonArray}; only the cpu exists."""

    name = "python"

    def device(self, device):
        """@param device: a L{DLDevice}. @return: the device object functions receive."""
        self._check(device)
        return device

    def _check(self, device):
        """@raise DeviceError: unless C{device} is the cpu."""
        if device.device_type != values.DEVICE_TYPES["cpu"]:
            raise DeviceError(
                f"device {device} is not available: only cpu exists on a server "
                "without TVM's runtime"
            )

    def exists(self, device):
        """@return: whether C{device} exists."""
        return device.device_type == values.DEVICE_TYPES["cpu"]

    def sync(self, device):
        """Wait for the device (nothing to wait for on the cpu)."""
        self._check(device)

    def to_wire_device(self, device):
        """@return: the L{DLDevice} of a device object, or L{None} if it is not one."""
        return device if isinstance(device, DLDevice) else None

    def is_array(self, value):
        """@return: whether C{value} is an array of this backend."""
        return isinstance(value, PythonArray)

    def empty(self, shape, dtype, device):
        """@return: a new zero-filled array."""
        self._check(device)
        return PythonArray(tuple(shape), dtype, bytearray(values.array_nbytes(shape, dtype)), device)

    def describe(self, array):
        """@return: C{(shape, dtype, DLDevice)}."""
        return array.shape, array.dtype, array.device

    def host_bytes(self, array):
        """@return: the array's bytes in C order (a bytes-like, possibly a view)."""
        return memoryview(array.data)

    def writable_view(self, array):
        """@return: a writable byte view of the array, or L{None} when it has none."""
        return memoryview(array.data)

    def fill(self, array, data):
        """Copy C{data} (exactly the array's size) into the array."""
        array.data[:] = data

    def piecewise(self, array):
        """
        @return: whether the array can be written and read a byte range at a
            time with L{write_at} / L{read_at} (arrays without a host view,
            e.g. on a GPU); L{False} here, as every array has a host view.
        """
        return False

    def write_at(self, array, offset, data):
        """Copy C{data} into the array at byte C{offset} (through its host view)."""
        self.writable_view(array)[offset:offset + len(data)] = data

    def read_at(self, array, offset, length):
        """@return: C{length} bytes of the array at byte C{offset} (a view)."""
        return self.host_bytes(array)[offset:offset + length]


@implementer(IArrayBackend)
class NumpyBackend(PythonBackend):
    """Arrays as numpy arrays; only the cpu exists."""

    name = "numpy"

    def __init__(self):
        """Import numpy (raising L{ImportError} when it is missing)."""
        import numpy

        self._numpy = numpy

    def _dtype(self, dtype):
        """@return: the numpy dtype of C{dtype}. @raise DeviceError: when numpy has none."""
        values.dtype_itemsize(dtype)
        try:
            return self._numpy.dtype(dtype)
        except TypeError:
            raise DeviceError(f"dtype {dtype!r} needs TVM's runtime on this device") from None

    def is_array(self, value):
        """@return: whether C{value} is a numpy array."""
        return isinstance(value, self._numpy.ndarray)

    def empty(self, shape, dtype, device):
        """@return: a new zero-filled numpy array on the cpu."""
        self._check(device)
        return self._numpy.zeros(tuple(shape), dtype=self._dtype(dtype))

    def describe(self, array):
        """@return: C{(shape, dtype, DLDevice)}."""
        return tuple(array.shape), str(array.dtype), DLDevice(1, 0)

    def _bytes_view(self, array):
        """@return: a byte view of a C-contiguous array (no copy)."""
        return memoryview(array.reshape(-1).view(self._numpy.uint8))

    def host_bytes(self, array):
        """@return: the array's bytes in C order (a view when already contiguous)."""
        return self._bytes_view(self._numpy.ascontiguousarray(array))

    def writable_view(self, array):
        """@return: a writable byte view, or L{None} for a non-contiguous or read-only array."""
        if not array.flags["C_CONTIGUOUS"] or not array.flags["WRITEABLE"]:
            return None
        return self._bytes_view(array)

    def fill(self, array, data):
        """Copy C{data} into the array."""
        array[...] = self._numpy.frombuffer(data, dtype=array.dtype).reshape(array.shape)


@implementer(IArrayBackend)
class TVMBackend(PythonBackend):
    """Arrays as TVM tensors on any device TVM's runtime drives."""

    name = "tvm"

    def __init__(self):
        """Import TVM's runtime and numpy (raising L{ImportError} when missing)."""
        import numpy
        import tvm.runtime

        self._numpy = numpy
        self._runtime = tvm.runtime

    def device(self, device):
        """
        @return: TVM's device object for C{device}.
        @raise DeviceError: for a device type TVM does not number.
        """
        check_device(device)
        return self._runtime.device(device.device_type, device.index)

    def exists(self, device):
        """@return: whether TVM's runtime reports C{device} as present."""
        try:
            return bool(self.device(device).exist)
        except Exception:
            return False

    def _existing(self, device):
        """@return: TVM's device object. @raise DeviceError: when it does not exist."""
        tvm_device = self.device(device)
        if not tvm_device.exist:
            raise DeviceError(f"device {device} does not exist on this server")
        return tvm_device

    def sync(self, device):
        """Wait for the device's queued work."""
        self._existing(device).sync()

    def to_wire_device(self, device):
        """@return: the L{DLDevice} of a TVM device object, or L{None}."""
        if isinstance(device, self._runtime.Device):
            return DLDevice(device.dlpack_device_type(), device.index)
        return None

    def is_array(self, value):
        """@return: whether C{value} is a TVM tensor."""
        return isinstance(value, self._runtime.Tensor)

    def empty(self, shape, dtype, device):
        """@return: a new TVM tensor on C{device}. @raise DeviceError: when it does not exist."""
        values.dtype_itemsize(dtype)
        return self._runtime.empty(tuple(shape), dtype, self._existing(device))

    def describe(self, array):
        """@return: C{(shape, dtype, DLDevice)}."""
        return tuple(array.shape), str(array.dtype), self.to_wire_device(array.device)

    def _host_view(self, array):
        """A numpy view of a cpu tensor's memory (DLPack, no copy), or L{None}."""
        if array.device.dlpack_device_type() != values.DEVICE_TYPES["cpu"]:
            return None
        try:
            view = self._numpy.from_dlpack(array)
        except Exception:
            return None
        return view if view.flags["C_CONTIGUOUS"] else None

    def host_bytes(self, array):
        """@return: the tensor's bytes in C order (a view for cpu tensors, else a copy)."""
        view = self._host_view(array)
        if view is None:
            view = self._numpy.ascontiguousarray(array.numpy())
        return memoryview(view.reshape(-1).view(self._numpy.uint8))

    def writable_view(self, array):
        """@return: a writable byte view of a cpu tensor, or L{None}."""
        view = self._host_view(array)
        if view is None or not view.flags["WRITEABLE"]:
            return None
        return memoryview(view.reshape(-1).view(self._numpy.uint8))

    def piecewise(self, array):
        """@return: whether byte-range views of the tensor can be made (TVM's C{_create_view})."""
        return hasattr(array, "_create_view")

    def _byte_range(self, array, offset, length):
        """A uint8 view of C{length} bytes at C{offset} of the tensor, on its device."""
        return array._create_view((length,), "uint8", relative_byte_offset=offset)

    def write_at(self, array, offset, data):
        """Copy C{data} into the tensor at byte C{offset} (any device, no staging)."""
        chunk = self._numpy.frombuffer(data, dtype=self._numpy.uint8)
        self._byte_range(array, offset, len(chunk)).copyfrom(chunk)

    def read_at(self, array, offset, length):
        """@return: C{length} bytes of the tensor at byte C{offset} (any device)."""
        return memoryview(self._byte_range(array, offset, length).numpy())

    def fill(self, array, data):
        """Copy C{data} into the tensor (any device)."""
        shape, dtype = tuple(array.shape), str(array.dtype)
        if "x" in dtype:
            raise DeviceError(f"cannot fill an array of dtype {dtype!r} from host bytes")
        # numpy has no bfloat16: TVM's copyfrom takes its bits as uint16.
        host_dtype = "uint16" if dtype == "bfloat16" else dtype
        array.copyfrom(self._numpy.frombuffer(data, dtype=host_dtype).reshape(shape))


_BACKENDS = {"tvm": TVMBackend, "numpy": NumpyBackend, "python": PythonBackend}
_chosen = {}


def select_backend(preference="auto"):
    """
    Choose (and import, once per process) an array backend.

    @param preference: C{"tvm"}, C{"numpy"}, C{"python"}, or C{"auto"} (the
        first of those that imports).
    @return: the backend object.
    @raise ImportError: when a named backend cannot be imported.
    @raise ValueError: for an unknown name.
    """
    if preference in _chosen:
        return _chosen[preference]
    if preference == "auto":
        for name in ("tvm", "numpy"):
            try:
                backend = select_backend(name)
                break
            except ImportError:
                continue
        else:
            backend = select_backend("python")
    elif preference in _BACKENDS:
        backend = _BACKENDS[preference]()
    else:
        raise ValueError(f"unknown array backend {preference!r}")
    _chosen[preference] = backend
    return backend
