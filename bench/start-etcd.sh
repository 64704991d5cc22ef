#!/usr/bin/env bash
# Starts a one-member etcd (Debian package etcd-server) on 127.0.0.1 for
# `roster bench --target etcd`, with its data in a new temporary directory, and waits until it
# answers.
#
#   bench/start-etcd.sh [PORT]        PORT: the client port; default a free one
#
# Prints one line, "127.0.0.1:PORT PIDFILE". The pid file holds the server's pid (for
# `roster bench --server-pid`); `bench/stop.sh PIDFILE` stops the server and removes its data.
# The server runs with etcd's defaults apart from its addresses.
set -euo pipefail

command -v etcd >/dev/null || { echo "etcd not found (apt-get install etcd-server)" >&2; exit 1; }
command -v etcdctl >/dev/null || { echo "etcdctl not found (apt-get install etcd-client)" >&2; exit 1; }

# A port nothing listens on: tried at random, taken if a connection to it is refused.
free_port() {
    local p
    for p in $(shuf -i 20000-45000 -n 100); do
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}

port=${1:-$(free_port)}
peer_port=$(free_port)
while [[ $peer_port == "$port" ]]; do peer_port=$(free_port); done

dir=$(mktemp -d -t roster-bench-etcd.XXXXXX)
touch "$dir/.roster-bench-server"
etcd --name bench --data-dir "$dir/data" \
    --listen-client-urls "http://127.0.0.1:$port" \
    --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "bench=http://127.0.0.1:$peer_port" \
    --initial-cluster-state new \
    --logger zap --log-outputs stderr \
    </dev/null >"$dir/etcd.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/etcd.pid"

for _ in $(seq 300); do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "etcd exited; its log:" >&2
        tail -n 30 "$dir/etcd.log" >&2
        exit 1
    fi
    if ETCDCTL_API=3 etcdctl --endpoints "127.0.0.1:$port" --command-timeout=1s \
        endpoint health >/dev/null 2>&1; then
        echo "127.0.0.1:$port $dir/etcd.pid"
        exit 0
    fi
    sleep 0.1
done
echo "etcd did not answer within 30 s; its log:" >&2
tail -n 30 "$dir/etcd.log" >&2
kill -KILL "$pid" 2>/dev/null || true
exit 1
