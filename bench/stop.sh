#!/usr/bin/env bash
# Stops a server started by bench/start-etcd.sh or bench/start-zookeeper.sh.
#
#   bench/stop.sh PIDFILE [TIMEOUT]
#
# Sends TERM to the pid in PIDFILE, then KILL if it is still there after TIMEOUT seconds
# (default 10). When the pid file sits in the data directory a start script made, that
# directory goes too.
set -euo pipefail

pidfile=${1:?usage: bench/stop.sh PIDFILE [TIMEOUT]}
timeout=${2:-10}
[[ -f $pidfile ]] || { echo "no pid file $pidfile" >&2; exit 1; }
pid=$(<"$pidfile")
[[ $pid =~ ^[0-9]+$ ]] || { echo "$pidfile holds no pid" >&2; exit 1; }
dir=$(cd "$(dirname "$pidfile")" && pwd)
ours=false
[[ -f $dir/.roster-bench-server ]] && ours=true

# Running, and not a zombie (which no signal removes).
alive() {
    local state
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ -n $state && $state != Z && $state != X ]]
}

if alive; then
    # A server from a start script names its data directory on its command line: a pid that
    # has been reused by another process is left alone.
    if $ours && ! tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$dir"; then
        echo "pid $pid is not the server of $dir; not stopping it" >&2
    else
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq $((timeout * 10))); do
            alive || break
            sleep 0.1
        done
        if alive; then
            echo "pid $pid still running after ${timeout} s: KILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
            for _ in $(seq 50); do
                alive || break
                sleep 0.1
            done
        fi
    fi
fi

if $ours; then
    rm -rf "$dir"
else
    rm -f "$pidfile"
fi
