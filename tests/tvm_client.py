"""Apache TVM's own client, driven in a child process for the interop tests.

Usage: ``python tests/tvm_client.py MODE ARGS...``; prints one JSON object
(a hung or crashed client then fails its test instead of the test run).

- ``story VIA HOST PORT KEY LIBRARY N M``: TVM's RPC story with ``tvm.rpc``
  (VIA is ``tracker``: request KEY from the tracker at HOST:PORT, or
  ``direct``: connect to HOST:PORT presenting KEY): upload LIBRARY (a dense +
  ReLU layer ``y = relu(x W^T)``, ``x: (1, N)``, ``W: (M, N)``), list, load,
  run on remote tensors, compare with numpy, ``time_evaluator``, download,
  a missing function, a remote exception, a registered function, remove.
- ``hang VIA HOST PORT KEY TIMEOUT SECONDS``: a session with TIMEOUT that
  calls ``test.hang(SECONDS)``.
- ``pid-hang VIA HOST PORT KEY SECONDS``: print the worker's pid
  (``test.pid``), then call ``test.hang(SECONDS)``.
- ``ping VIA HOST PORT KEY``: open a session, call ``test.add(20, 22)``, close.
- ``call VIA HOST PORT KEY FUNCTION ARGS...``: call a global function with
  string arguments and report its result.
- ``limits VIA HOST PORT KEY LIBRARY``: upload 200 KiB, then upload LIBRARY and
  load it (for a server with a small work directory and ``--no-code-upload``).
- ``loaders VIA HOST PORT KEY LIBRARY N M``: upload LIBRARY, then load it through
  TVM's global loaders (``ffi.Module.load_from_file.so``,
  ``ffi.ModuleLoadFromFile``) and run an executable (``rpc.PopenSession``),
  reporting each outcome (a loaded LIBRARY runs on ones: each ``y`` is N).
"""

import json
import sys
import time


def session(via, host, port, key, timeout=0):
    from tvm import rpc

    if via == "tracker":
        return rpc.connect_tracker(host, int(port)).request(
            key, session_timeout=timeout, max_retry=3
        )
    return rpc.connect(host, int(port), key=key, session_timeout=timeout)


def failure(error):
    return {"ok": False, "error_type": type(error).__name__, "message": str(error)}


def story(via, host, port, key, library, n, m):
    import numpy as np
    import tvm

    n, m = int(n), int(m)
    remote = session(via, host, port, key, timeout=120)
    report = {"ok": True}
    remote.upload(library)
    name = library.rsplit("/", 1)[-1]
    report["listed"] = remote.listdir(".")
    module = remote.load_module(name)
    dev = remote.cpu(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, n)).astype("float32")
    w = rng.standard_normal((m, n)).astype("float32")
    x_remote = tvm.runtime.tensor(x, dev)
    w_remote = tvm.runtime.tensor(w, dev)
    y_remote = tvm.runtime.tensor(np.zeros((1, m), "float32"), dev)
    module["dense_relu"](x_remote, w_remote, y_remote)
    expected = np.maximum(x @ w.T, 0)
    report["max_abs_error"] = float(np.abs(y_remote.numpy() - expected).max())
    report["nonzero"] = int((expected > 0).sum())
    timer = module.time_evaluator("dense_relu", dev, number=5, repeat=2)
    report["timings"] = [float(t) for t in timer(x_remote, w_remote, y_remote).results]
    with open(library, "rb") as f:
        report["download_same"] = bytes(remote.download(name)) == f.read()
    try:
        module["no_such_function"]
    except Exception as e:
        report["missing"] = failure(e)
    try:
        remote.get_function("test.fail")("the kernel said no")
    except Exception as e:
        report["remote_error"] = failure(e)
    report["add"] = remote.get_function("test.add")(20, 22)
    try:
        remote.download("../outside")
    except Exception as e:
        report["escape"] = failure(e)
    remote.remove(name)
    remote.remove("no-such-file")
    remote.remove("")
    report["listed_after"] = remote.listdir(".")
    return report


def hang(via, host, port, key, timeout, seconds):
    remote = session(via, host, port, key, timeout=float(timeout))
    try:
        remote.get_function("test.hang")(float(seconds))
    except Exception as e:
        return failure(e)
    return {"ok": True}


def pid_hang(via, host, port, key, seconds):
    remote = session(via, host, port, key, timeout=120)
    print(json.dumps({"pid": remote.get_function("test.pid")()}), flush=True)
    try:
        remote.get_function("test.hang")(float(seconds))
    except Exception as e:
        return failure(e)
    return {"ok": True}


def ping(via, host, port, key):
    started = time.monotonic()
    remote = session(via, host, port, key, timeout=60)
    result = remote.get_function("test.add")(20, 22)
    return {"ok": True, "add": result, "seconds": time.monotonic() - started}


def limits(via, host, port, key, library):
    """Upload past the work directory's limit, then load an uploaded library."""
    remote = session(via, host, port, key, timeout=60)
    report = {"ok": True}
    try:
        remote.upload(bytearray(200 * 1024), "big.bin")
    except Exception as e:
        report["upload"] = failure(e)
    remote.upload(library)
    try:
        remote.load_module(library.rsplit("/", 1)[-1])
    except Exception as e:
        report["load"] = failure(e)
    report["add"] = remote.get_function("test.add")(1, 2)
    return report


def call(via, host, port, key, name, *args):
    remote = session(via, host, port, key, timeout=60)
    return {"ok": True, "result": remote.get_function(name)(*args)}


def loaders(via, host, port, key, library, n, m):
    """Reach uploaded code through TVM's global loaders instead of load_module."""
    import numpy as np
    import tvm

    n, m = int(n), int(m)
    remote = session(via, host, port, key, timeout=60)
    name = library.rsplit("/", 1)[-1]
    remote.upload(library)
    path = remote.get_function("tvm.rpc.server.workpath")(name)
    report = {"ok": True}
    attempts = {
        "load_from_file_so": lambda: remote.get_function("ffi.Module.load_from_file.so")(path, "so"),
        "module_load_from_file": lambda: remote.get_function("ffi.ModuleLoadFromFile")(path),
    }
    for label, attempt in attempts.items():
        try:
            module = attempt()
            dev = remote.cpu(0)
            x = tvm.runtime.tensor(np.ones((1, n), "float32"), dev)
            w = tvm.runtime.tensor(np.ones((m, n), "float32"), dev)
            y = tvm.runtime.tensor(np.zeros((1, m), "float32"), dev)
            module["dense_relu"](x, w, y)
            report[label] = {"ok": True, "y": sorted(set(y.numpy().ravel().tolist()))}
        except Exception as e:
            report[label] = failure(e)
    try:
        remote.get_function("rpc.PopenSession")("/bin/true")
        report["popen"] = {"ok": True}
    except Exception as e:
        report["popen"] = failure(e)
    try:
        # A file outside the work directory, through a global that takes any path.
        remote.get_function("runtime.LoadParamsFromFile")("/etc/hostname")
        report["outside"] = {"ok": True}
    except Exception as e:
        report["outside"] = failure(e)
    return report


MODES = {"call": call, "loaders": loaders, "story": story, "hang": hang, "pid-hang": pid_hang, "ping": ping, "limits": limits}

if __name__ == "__main__":
    try:
        report = MODES[sys.argv[1]](*sys.argv[2:])
    except Exception as e:
        report = failure(e)
    print(json.dumps(report), flush=True)

