#!/usr/bin/env bash
# DNS answered by a session server from memory, measured with Debian's dnsperf.
#
#   bash bench/dns.sh [ROSTER_BINARY]     (default target/release/roster)
#
# Starts `roster dev` (1 meta, 1 data, 1 session) in a temporary directory, registers
# SERVICES x INSTANCES persistent instances (`roster register`), asks each service once so the
# session holds it, then:
#
#  1. "alone": dnsperf as fast as it can for DURATION seconds, SRV and A queries spread over
#     every service;
#  2. "beside QUIC clients": the same at a fixed RATE queries/s while `roster bench --config`
#     drives the cluster's QUIC clients (20 publishing connections, 50 subscribers, churn), and a
#     run of that bench without DNS load first, to compare the session server's CPU and the
#     bench's own figures.
#
# Prints queries/s, latency percentiles (from dnsperf -v: one line per query) and the session
# server's CPU in cores over each phase. Bounded: every phase has a time limit, every process
# started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROSTER=${1:-target/release/roster}
SERVICES=${SERVICES:-50}
INSTANCES=${INSTANCES:-10}
DURATION=${DURATION:-10}
RATE=${RATE:-10000}
command -v dnsperf >/dev/null || { echo "needs dnsperf (apt-get install dnsperf)" >&2; exit 1; }
[ -x "$ROSTER" ] || { echo "no $ROSTER: cargo build --release -p roster-cli" >&2; exit 1; }
ROSTER=$(realpath "$ROSTER")

work=$(mktemp -d)
dev_pid=""
cleanup() {
    [ -n "$dev_pid" ] && kill -INT "$dev_pid" 2>/dev/null && wait "$dev_pid" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# No per-source limit: every query here comes from 127.0.0.1.
ROSTER_DNS_QPS_PER_SOURCE=0 "$ROSTER" dev > dev.out 2> dev.err &
dev_pid=$!
for _ in $(seq 1 120); do
    grep -q "^roster dev: dns=" dev.out 2>/dev/null && break
    sleep 0.5
done
dns=$(sed -n 's/^roster dev: dns=\([^ ]*\).*/\1/p' dev.out)
[ -n "$dns" ] || { echo "roster dev did not start:" >&2; cat dev.err >&2; exit 1; }
port=${dns##*:}
session_pid=$(pgrep -f -- "$ROSTER session --id 1 " | head -1)
echo "roster dev: DNS on $dns, session server pid $session_pid"

echo "registering $SERVICES services x $INSTANCES instances"
for s in $(seq 1 "$SERVICES"); do
    for i in $(seq 1 "$INSTANCES"); do
        echo "dns-bench-$s 10.$((s / 256)).$((s % 256)).$i:$((8000 + i)) --id i$i"
    done
done | xargs -P 4 -L 1 "$ROSTER" register >/dev/null
for s in $(seq 1 "$SERVICES"); do
    echo "dns-bench-$s.roster. SRV"
    echo "dns-bench-$s.roster. A"
done > queries.txt
# Each service asked once, so the session holds it and every query below is answered from memory.
while read -r name type; do
    dig @127.0.0.1 -p "$port" +short +time=2 +tries=1 "$name" "$type" >/dev/null
done < queries.txt
answers=$(dig @127.0.0.1 -p "$port" +short "dns-bench-1.roster." SRV | wc -l)
echo "dns-bench-1.roster. SRV answers $answers records"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

# dnsperf -v prints "> NOERROR NAME TYPE LATENCY" per query; percentiles from those.
percentiles() {
    grep '^> ' "$1" | awk '{print $NF}' | sort -g | awk '
        { v[NR] = $1 }
        END {
            if (NR == 0) { print "no answers"; exit }
            printf "p50 %.3f ms, p99 %.3f ms, p99.9 %.3f ms, max %.3f ms (%d answers)\n",
                v[int(NR * 0.5)] * 1000, v[int(NR * 0.99)] * 1000, v[int(NR * 0.999)] * 1000,
                v[NR] * 1000, NR }'
}

phase() {
    local name=$1; shift
    local before after start end
    before=$(cpu_ticks "$session_pid"); start=$(date +%s.%N)
    dnsperf -s 127.0.0.1 -p "$port" -d queries.txt -l "$DURATION" -c 4 -T 1 -q 256 -v "$@" \
        > "dnsperf-$name.out" 2>&1 || true
    after=$(cpu_ticks "$session_pid"); end=$(date +%s.%N)
    echo "== $name"
    grep -E "Queries sent|Queries completed|Queries lost|Queries per second|Average Latency" \
        "dnsperf-$name.out" | sed 's/^ */  /'
    echo "  latency: $(percentiles "dnsperf-$name.out")"
    awk -v t=$((after - before)) -v hz="$hz" -v s="$start" -v e="$end" \
        'BEGIN { printf "  session server CPU: %.2f cores\n", t / hz / (e - s) }'
}

phase alone
phase "alone-at-$RATE" -Q "$RATE"

bench() {
    "$ROSTER" bench --config "$work/.roster/client.toml" --services 100 \
        --instances-per-service 10 --duration 20 > "bench-$1.out" 2> "bench-$1.err" &
    bench_pid=$!
}
echo "== roster bench (QUIC clients) without DNS load"
before=$(cpu_ticks "$session_pid"); start=$(date +%s.%N)
bench quiet
wait "$bench_pid" || true
after=$(cpu_ticks "$session_pid"); end=$(date +%s.%N)
awk -v t=$((after - before)) -v hz="$hz" -v s="$start" -v e="$end" \
    'BEGIN { printf "  session server CPU over the bench: %.2f cores\n", t / hz / (e - s) }'
sed '/^{/,$d' bench-quiet.out

echo "== roster bench (QUIC clients) with $RATE DNS queries/s beside it"
before=$(cpu_ticks "$session_pid"); start=$(date +%s.%N)
bench busy
# The DNS load over the bench's whole run.
dnsperf -s 127.0.0.1 -p "$port" -d queries.txt -l 600 -c 4 -T 1 -q 256 -Q "$RATE" -v \
    > dnsperf-beside.out 2>&1 &
perf_pid=$!
wait "$bench_pid" || true
kill -INT "$perf_pid" 2>/dev/null; wait "$perf_pid" 2>/dev/null || true
after=$(cpu_ticks "$session_pid"); end=$(date +%s.%N)
awk -v t=$((after - before)) -v hz="$hz" -v s="$start" -v e="$end" \
    'BEGIN { printf "  session server CPU over the bench: %.2f cores\n", t / hz / (e - s) }'
echo "  DNS latency meanwhile: $(percentiles dnsperf-beside.out)"
sed '/^{/,$d' bench-busy.out
