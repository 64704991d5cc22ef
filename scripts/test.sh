#!/usr/bin/env bash
# The whole test suite, on a Debian or Ubuntu machine with a Rust toolchain and nothing else:
# installs what the tests need and the machine lacks (Debian's `prometheus`, which one test runs
# to scrape a cluster, and `dnsutils`, whose `dig` asks the session servers' DNS), then runs `cargo test --workspace`, the Python client's checks
# (clients/python/run-tests.sh) and the web console's browser tests (console/run-tests.sh:
# Debian's chromium, driven headless), both against the binary cargo just built. Extra arguments
# go to `cargo test`.
#
# Tests that need more than that are `#[ignore]`d and listed as ignored, not passed: the network
# partition test needs root and iproute2 (`cargo test -p roster-cli --test meta_partition --
# --ignored`; `.ci/run` runs it where it can).
set -euo pipefail
cd "$(dirname "$0")/.."

# install_debian PACKAGE WHY WITHOUT_APT: installs a Debian package, or explains what is missing.
install_debian() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: $3" >&2
        exit 1
    fi
    echo "scripts/test.sh: installing Debian's $1 ($2)" >&2
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo=sudo; fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "$1"
}

if [ -z "${ROSTER_TEST_PROMETHEUS:-}" ] && ! command -v prometheus >/dev/null 2>&1; then
    install_debian prometheus "a test scrapes a cluster with it" \
        "a test needs Prometheus: install it, or set ROSTER_TEST_PROMETHEUS to its binary"
fi
if ! command -v dig >/dev/null 2>&1; then
    install_debian dnsutils "tests ask the session servers' DNS with dig" \
        "the DNS tests need dig (Debian's dnsutils, or bind-utils): install it"
fi

cargo test --workspace --locked "$@"
bash clients/python/run-tests.sh
bash console/run-tests.sh
