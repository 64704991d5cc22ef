#!/usr/bin/env bash
# The web console's browser tests: Playwright for Python driving Debian's headless chromium
# against clusters of the workspace's `roster` binary (ROSTER_BIN, default target/debug/roster;
# build it first). Screenshots of every page go to ROSTER_CONSOLE_OUT (default
# target/console-tests). Installs Playwright and pytest into a virtual environment
# (target/console-venv, from PyPI; Playwright's own browser downloads are never used), and
# Debian's chromium and python3-venv where the machine lacks them.
set -euo pipefail
cd "$(dirname "$0")"
root=$(cd .. && pwd)
venv=${ROSTER_CONSOLE_VENV:-$root/target/console-venv}
export ROSTER_BIN=${ROSTER_BIN:-$root/target/debug/roster}
export ROSTER_CONSOLE_OUT=${ROSTER_CONSOLE_OUT:-$root/target/console-tests}
# Never let Playwright fetch a browser of its own.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

apt_install() {
    command -v apt-get >/dev/null || { echo "console: $* missing and no apt-get to install it" >&2; exit 1; }
    echo "console: installing Debian's $*" >&2
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$@"
}

if [ -z "${ROSTER_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
    apt_install chromium
fi
if [ ! -x "$venv/bin/python" ]; then
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
        rm -rf "$venv"
        apt_install python3-venv
        python3 -m venv "$venv"
    fi
fi
"$venv/bin/pip" install -q --disable-pip-version-check -r requirements.txt
[ -x "$ROSTER_BIN" ] || { echo "console: no roster binary at $ROSTER_BIN (cargo build -p roster-cli)" >&2; exit 1; }

mkdir -p "$ROSTER_CONSOLE_OUT"
echo "== console: browser tests (screenshots in $ROSTER_CONSOLE_OUT)"
"$venv/bin/python" -m pytest -q "$@"
