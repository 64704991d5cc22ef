#!/usr/bin/env bash
# Runs the `roster bench` workload against Roster (clusters 1/1/1 and 3/3/2), etcd and ZooKeeper
# at one scale, one after the other on this machine, and writes a table of the figures.
#
#   bench/compare.sh [--workload rollout|classic] [--scale 10000|100000] [--ttl S] [--no-build]
#
#   --workload rollout  (default) subscribers watch before the load, as during a rollout
#                       (`roster bench --subscribe-first`); --scale 10000: 100 services x 100
#                       instances -> bench/results-rollout.md; --scale 100000: 100 services x
#                       1,000 instances -> bench/results-rollout-100000.md (and .jsonl)
#   --workload classic  subscribers watch after the load; --scale 10000: 100 x 100 ->
#                       bench/results.md; --scale 100000: 1000 x 100 -> bench/results-100000.md
#   --ttl S             etcd's lease TTL and ZooKeeper's session timeout, seconds (default 10)
#   --only NAMES        run only these targets (comma-separated: roster,roster-332,etcd,zookeeper)
#   --no-build          use the roster binary already in target/release
#   --table-only        only write the table again, from the results .jsonl
#
# Every other parameter is `roster bench`'s default: 20 registering connections, 50 subscribers
# watching 100 services each, 200 changes/s for 10 s, a holder of 100 instances killed. etcd and ZooKeeper run
# on 127.0.0.1 with their data in temporary directories (bench/start-*.sh) and are stopped after
# their run. Needs: cargo and protoc (Debian: protobuf-compiler, libprotobuf-dev) to build; etcd-server,
# etcd-client, zookeeper and jq.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
scale=10000
workload=rollout
ttl=10
only=roster,roster-332,etcd,zookeeper
build=true
measure=true
while (($#)); do
    case $1 in
        --scale) scale=${2:?--scale needs a value}; shift 2 ;;
        --scale=*) scale=${1#--scale=}; shift ;;
        --workload) workload=${2:?--workload needs a value}; shift 2 ;;
        --ttl) ttl=${2:?--ttl needs a value}; shift 2 ;;
        --only) only=${2:?--only needs a value}; shift 2 ;;
        --no-build) build=false; shift ;;
        --table-only) measure=false; shift ;;
        -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
case $workload:$scale in
    classic:10000) services=100 per_service=100 suffix="" ;;
    classic:100000) services=1000 per_service=100 suffix="-100000" ;;
    rollout:10000) services=100 per_service=100 suffix="-rollout" ;;
    rollout:100000) services=100 per_service=1000 suffix="-rollout-100000" ;;
    *) echo "--workload is rollout or classic, --scale 10000 or 100000" >&2; exit 2 ;;
esac
extra=()
if [[ $workload == rollout ]]; then extra=(--subscribe-first); fi
wanted() { [[ ",$only," == *",$1,"* ]]; }
results_md=$here/results$suffix.md
results_jsonl=$here/results$suffix.jsonl

started=$SECONDS
if $measure; then
    for tool in jq etcd etcdctl java; do
        command -v "$tool" >/dev/null || {
            echo "$tool not found (apt-get install jq etcd-server etcd-client zookeeper)" >&2
            exit 1
        }
    done

    work=$(mktemp -d -t roster-compare.XXXXXX)
    pidfiles=()
    cleanup() {
        local f
        for f in "${pidfiles[@]}"; do
            if [[ -f $f ]]; then "$here/stop.sh" "$f" >/dev/null 2>&1 || true; fi
        done
        rm -rf "$work"
    }
    trap cleanup EXIT

    if $build; then
        echo "building roster (release, --features peers)" >&2
        (cd "$root" && cargo build --release --quiet -p roster-cli --features peers)
    fi
    # A copy, so that another build in the tree cannot swap the binary between two runs.
    cp "$root/target/release/roster" "$work/roster"
    roster=$work/roster

    : >"$results_jsonl"
    common=(--json --services "$services" --instances-per-service "$per_service" "${extra[@]}")

    # run NAME ARGS...: one `roster bench`, its JSON line appended to the results (or an error
    # object when it fails).
    run() {
        local name=$1
        shift
        local t0=$SECONDS
        echo "== $name" >&2
        if "$roster" bench "${common[@]}" "$@" >"$work/out.json" 2>"$work/err.log"; then
            cat "$work/out.json" >>"$results_jsonl"
            echo "   done in $((SECONDS - t0)) s" >&2
        else
            echo "   failed after $((SECONDS - t0)) s:" >&2
            tail -n 20 "$work/err.log" >&2
            jq -cn --arg target "$name" --arg error "$(tail -n 5 "$work/err.log")" \
                '{target: $target, error: $error}' >>"$results_jsonl"
        fi
    }

    # with_server START NAME ARGS...: starts a server, runs the bench against it, stops it.
    with_server() {
        local start=$1 name=$2 endpoint pidfile
        shift 2
        if ! read -r endpoint pidfile < <("$here/$start"); then
            jq -cn --arg target "$name" '{target: $target, error: "the server did not start"}' \
                >>"$results_jsonl"
            return
        fi
        pidfiles+=("$pidfile")
        run "$name" --endpoint "$endpoint" --server-pid "$(<"$pidfile")" --ttl "$ttl" "$@"
        "$here/stop.sh" "$pidfile" >&2
    }

    if wanted roster; then run "roster 1/1/1" --target roster --cluster 1/1/1; fi
    if wanted roster-332; then run "roster 3/3/2" --target roster --cluster 3/3/2; fi
    if wanted etcd; then with_server start-etcd.sh etcd --target etcd; fi
    if wanted zookeeper; then with_server start-zookeeper.sh zookeeper --target zookeeper; fi
fi

# The table: one column per target, one row per figure.
jq -rs --arg scale "$scale" --arg suffix "$suffix" --arg date "$(date -u -r "$results_jsonl" +%Y-%m-%d)" \
    --arg cpu "$(nproc) cores, $(awk -F': *' '/^model name/ {print $2; exit}' /proc/cpuinfo)" '
    def fixed(d): if . == null then "–" else ((. * pow(10; d) | round) / pow(10; d) | tostring) end;
    def row(name; f): "| \(name) | " + (map(if .error then "failed" else f end) | join(" | ")) + " |";
    . as $all
    | ($all | map(select(.error == null)) | first // {}) as $one
    | [
        "# roster bench: Roster, etcd and ZooKeeper at \($scale) instances\(if $one.parameters.subscribe_first then ", subscribers watching first" else "" end)",
        "",
        "\($date), one machine (\($cpu)); every server and client on it. Workload: \($one.parameters.services // "?") services × \($one.parameters.instances_per_service // "?") instances registered by \($one.parameters.connections // "?") connections; \($one.parameters.subscribers // "?") subscribers watching \($one.parameters.watch_services // "?") services each; churn of \($one.parameters.rate // "?") changes/s for \($one.parameters.duration_seconds // "?") s; a holder of \($one.parameters.failure_instances // "?") instances killed with SIGKILL. Made by `bench/compare.sh`; the raw reports are in `results\($suffix).jsonl`.",
        "",
        "| | " + (map(.target) | join(" | ")) + " |",
        "|---|" + (map("---:") | join("|")) + "|",
        row("registration /s"; .initial_load.per_second | fixed(0)),
        row("convergence s"; .subscribe.convergence_seconds | fixed(3)),
        row("notify p50 ms"; .churn.latency_ms.p50 | fixed(1)),
        row("notify p99 ms"; .churn.latency_ms.p99 | fixed(1)),
        row("notify max ms"; .churn.latency_ms.max | fixed(1)),
        row("churn seconds (10 s asked)"; .churn.seconds | fixed(1)),
        row("push bytes / notification"; .churn.push_bytes_per_notification | fixed(0)),
        row("server CPU ms / change"; .churn.server_cpu_ms_per_change | fixed(2)),
        row("failure detection s"; .failure.detect_seconds | fixed(2)),
        row("server RSS total MiB"; .server_rss_kib_total | if . == null then null else . / 1024 end | fixed(1)),
        row("server bytes / instance"; .server_bytes_per_instance | fixed(0)),
        row("server CPU s"; [.servers[].cpu_seconds // empty] | if length == 0 then null else add end | fixed(1)),
        row("notifications seen (subscribe, churn, failure)";
            "\(.subscribe.notifications_seen)/\(.subscribe.notifications_expected), \(.churn.notifications_seen)/\(.churn.notifications_expected), \(.failure.notifications_seen)/\(.failure.notifications_expected)"),
        row("churn errors"; .churn.errors | tostring),
        row("instances seen removed, never unregistered"; .spurious_removals | tostring),
        row("client reconnects"; .clients.reconnects | if . == null then "–" else tostring end),
        "",
        "Failure detection is the time from the SIGKILL until every watcher saw none of the instances of the holder: for etcd it follows from the lease TTL, for ZooKeeper from the session timeout (both in the column heads), for Roster from the idle timeout of its client transport plus the client grace (`--client-grace-ms`, 1 s). Server RSS and CPU are read from /proc at the end of the run and cover every server process of the target (a JVM for ZooKeeper); CPU covers the whole run, the initial load included."
      ]
    | .[]' "$results_jsonl" >"$results_md"

echo "wrote $results_md and $results_jsonl in $((SECONDS - started)) s" >&2
cat "$results_md"
