#!/usr/bin/env bash
# The Python client's checks: `mypy --strict` on the package and its pytest suite, against the
# `roster` binary of this workspace (ROSTER_BIN, default target/debug/roster; build it first).
# Installs the package and its test tools into a virtual environment (target/python-venv, from
# PyPI), and Debian's python3-venv where the machine lacks it.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd ../.. && pwd)
venv=${ROSTER_PYTHON_VENV:-$root/target/python-venv}
export ROSTER_BIN=${ROSTER_BIN:-$root/target/debug/roster}

python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
    || { echo "clients/python: needs Python 3.11 or later" >&2; exit 1; }
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        command -v apt-get >/dev/null || { echo "clients/python: python3 -m venv does not work here" >&2; exit 1; }
        echo "clients/python: installing Debian's python3-venv" >&2
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends python3-venv
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/pip" install -q --disable-pip-version-check -e '.[test]'
[ -x "$ROSTER_BIN" ] || { echo "clients/python: no roster binary at $ROSTER_BIN (cargo build -p roster-cli)" >&2; exit 1; }

echo "== clients/python: mypy --strict (the package, its tests and bench.py)"
"$venv/bin/mypy" --strict roster_client tests bench.py
echo "== clients/python: pytest"
# pytest exits 5 when it collects no test: that fails here too.
"$venv/bin/python" -m pytest -q
