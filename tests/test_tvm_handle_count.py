"""The handle counter of the TVM-server fault tests, on byte streams built by hand.

It must see a leak when there is one, or the balance it reports in
``test_interop_tvm_servers_faults.py`` would prove nothing.
"""

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.tvm_garbage import K_GET_GLOBAL_FUNC, OPAQUE_PTR, RAW_STR, frame, returning
from tests.tvm_handle_count import HandleCount

pytestmark = pytest.mark.unit

_U64 = struct.Struct("<Q")
K_CALL_FUNC, K_EXCEPTION, K_FREE_HANDLE, K_DEV_FREE_DATA = 3, 5, 10, 14
K_DEV_ALLOC_DATA_WITH_SCOPE, K_SHUTDOWN, INT, DEVICE, DLTENSOR = 17, 1, 1, 6, 7
MODULE, TENSOR, STR = 73, 70, 65


def handshake(key):
    return struct.pack("<ii", 0xFF271, len(key)) + key


def request(code, body=b""):
    return frame(struct.pack("<i", code) + body)


def seq(*values):
    return struct.pack("<i", len(values)) + b"".join(
        struct.pack("<i", index) + payload for index, payload in values)


def pointer(value):
    return OPAQUE_PTR, _U64.pack(value)


def integer(value):
    return INT, struct.pack("<q", value)


def lookup(name):
    raw = name.encode()
    return request(K_GET_GLOBAL_FUNC, seq((RAW_STR, _U64.pack(len(raw)) + raw)))


def free_handle(handle):
    return request(K_FREE_HANDLE, seq(pointer(handle)))


def free_data(data):
    return request(K_DEV_FREE_DATA, seq((DEVICE, struct.pack("<ii", 1, 0)), pointer(data)))


def tensor(data):
    desc = struct.pack("<QiiiBBH", data, 1, 0, 1, 2, 32, 1) + struct.pack("<q", 4) + _U64.pack(0)
    return DLTENSOR, desc


#: A session: a lookup, a module, a tensor and an allocation handed out,
#: a missing function, a remote exception and a string result that are not.
CLIENT_START = handshake(b"client:k") + b"".join((
    request(2, _U64.pack(5) + b"0.8.0" + seq()),
    lookup("f"), lookup("missing"), request(K_CALL_FUNC, _U64.pack(0x10) + seq()),
    request(K_CALL_FUNC, _U64.pack(0x10) + seq()), request(K_DEV_ALLOC_DATA_WITH_SCOPE, seq()),
    request(K_CALL_FUNC, _U64.pack(0x10) + seq()), request(K_CALL_FUNC, _U64.pack(0x10) + seq()),
))
SERVER = handshake(b"server:k") + b"".join((
    returning((0, b"")),
    returning(pointer(0x10)), returning(pointer(0)),
    returning(integer(MODULE), pointer(0x20)),
    returning(integer(TENSOR), tensor(0x99), pointer(0x30)),
    returning(pointer(0x40)),
    frame(struct.pack("<i", K_EXCEPTION) + seq((RAW_STR, _U64.pack(4) + b"oops"))),
    returning(integer(STR), (RAW_STR, _U64.pack(2) + b"hi")),
))
FREES = {"f": free_handle(0x10), "module": free_handle(0x20), "tensor": free_handle(0x30),
         "data": free_data(0x40)}


def run(client, server, cut=None):
    count = HandleCount()
    for stream, feed in ((client, count.from_client), (server, count.from_server)):
        pieces = [stream] if cut is None else [stream[i:i + cut] for i in range(0, len(stream), cut)]
        for piece in pieces:
            feed(piece)
    return count.report()


def test_balanced():
    client = CLIENT_START + b"".join(FREES.values()) + request(K_SHUTDOWN)
    freed = returning((0, b"")) * len(FREES)
    assert run(client, SERVER + freed) == {
        "handles_acquired": 3, "data_acquired": 1, "handles_held": {}, "data_held": {},
        "unmatched": 0, "shutdown": True}


def test_each_leak_is_seen():
    held = {"f": ("handles_held", "0x10"), "module": ("handles_held", "0x20"),
            "tensor": ("handles_held", "0x30"), "data": ("data_held", "0x40")}
    for leaked, (field, name) in held.items():
        client = CLIENT_START + b"".join(v for k, v in FREES.items() if k != leaked)
        report = run(client, SERVER)
        assert report[field] == {name: 1}, leaked
        assert report["shutdown"] is False


def test_unanswered_request_is_unmatched():
    assert run(CLIENT_START + lookup("late"), SERVER)["unmatched"] == 1


@given(st.integers(min_value=1, max_value=64))
def test_any_cut(cut):
    client = CLIENT_START + b"".join(FREES.values())
    assert run(client, SERVER, cut) == run(client, SERVER)
