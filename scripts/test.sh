#!/usr/bin/env bash
# The whole test suite on a fresh machine with only Python: builds a virtual
# environment, installs the project with its test and tvm extras (apache-tvm
# from PyPI included), runs pytest, and fails if the interop tests did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${TVM_RPC_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q '.[test,tvm]'
export TVM_RPC_REQUIRE_INTEROP=1
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
report="$(mktemp -d)/junit.xml"
"$venv/bin/python" -m pytest -p no:cacheprovider -q -rs --junitxml="$report" "$@"
"$venv/bin/python" scripts/check_interop.py "$report"
