#!/usr/bin/env bash
# The whole test suite on a fresh machine with only Python: builds a virtual
# environment, installs the project with its test and tvm extras (apache-tvm
# from PyPI included) and Chromium, runs pytest, and fails if the interop
# tests did not run.
set -euo pipefail
cd "$(dirname "$0")/.."
# The tracker's status page is tested in a real headless browser: Debian's
# Chromium, installed when missing on CI or as root (a fresh CI machine is
# Debian with its mirrors reachable). As another user, install it first: with
# TVM_RPC_REQUIRE_INTEROP (set below) the test fails without it.
if ! command -v chromium >/dev/null 2>&1 && { [ "${CI:-}" = true ] || [ "$(id -u)" = 0 ]; }; then
    echo "installing Debian's chromium for the status page test"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
venv="${TVM_RPC_VENV:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q '.[test,tvm]'
export TVM_RPC_REQUIRE_INTEROP=1
export HYPOTHESIS_PROFILE="${HYPOTHESIS_PROFILE:-ci}"
report="$(mktemp -d)/junit.xml"
"$venv/bin/python" -m pytest -p no:cacheprovider -q -rs --junitxml="$report" "$@"
"$venv/bin/python" scripts/check_interop.py "$report"
