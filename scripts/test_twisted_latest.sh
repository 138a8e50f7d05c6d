#!/usr/bin/env bash
# The fast test tier (tests marked "unit": no apache-tvm, no real daemon)
# against the newest Twisted release, in a virtual environment of its own
# without apache-tvm. The fence around Twisted's internals
# (tvm_rpc/twisted_fence.py) is probed there too, so a release that breaks
# one of its optimisations fails here before anyone upgrades. When the newest
# release is the one scripts/test.sh installed, this proves nothing new that
# day; it runs anyway, to catch the next release.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TVM_RPC_TWISTED_LATEST_VENV:-.venv-twisted-latest}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q --upgrade twisted '.[test]'
"$venv/bin/python" -c 'import twisted; print(f"unit tier on Twisted {twisted.__version__}")'
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
"$venv/bin/python" -m pytest -p no:cacheprovider -q -m unit "$@"
# The fence's relay fallback needs a loopback connection (system tier), but
# it is the fence's: run it on the newest Twisted too.
"$venv/bin/python" -m pytest -p no:cacheprovider -q tests/test_twisted_fence_relay.py
