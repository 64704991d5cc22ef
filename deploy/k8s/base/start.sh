#!/bin/sh
# Starts one Roster server inside a Kubernetes pod:
#
#   start.sh meta|data|session [more roster flags...]
#
# It works out what depends on the pod -- the server id, the address other servers dial it at, the
# meta addresses, and for a meta node how it enters the group -- exports them as ROSTER_* variables
# and execs `roster ROLE`. Every other setting comes from the environment the manifests set
# (ROSTER_LISTEN, ROSTER_HTTP, ROSTER_TLS_DIR, ...; `roster ROLE --help` lists them all). A
# ROSTER_ID or ROSTER_ADVERTISE already set is kept.
#
# Inputs:
#   POD_NAME, POD_NAMESPACE, POD_IP  from the downward API
#   CLUSTER_DOMAIN                   the cluster's DNS domain (default cluster.local)
#   META_SERVICE, META_PORT          meta StatefulSet pods are META_SERVICE-0, -1, ... behind the
#                                    headless Service of the same name; their QUIC port
#   META_BOOTSTRAP                   meta pods 0..N-1 are the initial voters of a new group
#   META_REPLICAS                    how many meta pods (from 0) data and session servers are given
#   DATA_SERVICE, DATA_PORT          the same for the data StatefulSet
#   SESSION_SERVICE, SESSION_PORT    the headless Service clients resolve to every session server
#   ROSTER_RUN_DIR                   if set, cluster.toml and client.toml are written there, so that
#                                    `kubectl exec POD -- roster cluster status` and `roster ls` work
#                                    (with ROSTER_CLUSTER_CONFIG / ROSTER_CLIENT_CONFIG pointing there)
#   ROSTER_BIN                       the roster binary (default: roster on PATH)
#
# Server certificates are checked against the name a server is dialed by, so every address here is
# a DNS name that the node certificate must cover (see docs/OPERATIONS.md): meta and data servers
# advertise POD.SERVICE.NAMESPACE.svc.CLUSTER_DOMAIN, their stable StatefulSet names. Session
# servers advertise their pod IP: clients reach them through the session Service name instead.

set -eu

log() { printf 'start.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

[ $# -ge 1 ] || die "usage: start.sh meta|data|session [roster flags...]"
role=$1
shift

: "${POD_NAME:?POD_NAME must be set (downward API metadata.name)}"
: "${POD_NAMESPACE:?POD_NAMESPACE must be set (downward API metadata.namespace)}"
: "${CLUSTER_DOMAIN:=cluster.local}"
: "${META_SERVICE:=roster-meta}"
: "${META_PORT:=7100}"
: "${META_BOOTSTRAP:=3}"
: "${META_REPLICAS:=$META_BOOTSTRAP}"
: "${DATA_SERVICE:=roster-data}"
: "${DATA_PORT:=7200}"
: "${SESSION_SERVICE:=roster-session}"
: "${SESSION_PORT:=7300}"
: "${ROSTER_BIN:=roster}"

is_count() {
    case $1 in '' | *[!0-9]*) return 1 ;; esac
}
for n in "$META_BOOTSTRAP" "$META_REPLICAS"; do
    if ! is_count "$n" || [ "$n" -lt 1 ]; then
        die "META_BOOTSTRAP and META_REPLICAS must be counts >= 1, not '$n'"
    fi
done

# The StatefulSet ordinal at the end of the pod name: roster-meta-2 -> 2.
ordinal() {
    o=${POD_NAME##*-}
    is_count "$o" || die "pod name '$POD_NAME' does not end in a StatefulSet ordinal"
    echo "$o"
}

svc_host() { # POD SERVICE
    echo "$1.$2.$POD_NAMESPACE.svc.$CLUSTER_DOMAIN"
}

meta_addr() { # ORDINAL
    echo "$(svc_host "$META_SERVICE-$1" "$META_SERVICE"):$META_PORT"
}

# The first COUNT meta addresses, comma-separated; with "ids", as ID=ADDR pairs (id = ordinal + 1).
meta_list() { # COUNT [ids]
    list='' i=0
    while [ "$i" -lt "$1" ]; do
        item=$(meta_addr "$i")
        [ "${2:-}" = ids ] && item="$((i + 1))=$item"
        list="${list:+$list,}$item"
        i=$((i + 1))
    done
    echo "$list"
}

# The address of another meta pod that already belongs to a group (reports a cluster id), if any.
# Asks each node for its own view, so a group that has lost its quorum is still found.
find_group() { # SELF_ORDINAL
    count=$META_REPLICAS
    [ "$META_BOOTSTRAP" -gt "$count" ] && count=$META_BOOTSTRAP
    i=0
    while [ "$i" -lt "$count" ]; do
        if [ "$i" -ne "$1" ]; then
            addr=$(meta_addr "$i")
            answer=$("$ROSTER_BIN" cluster status --local --json --meta "$addr" \
                --tls-dir "${ROSTER_TLS_DIR:-/etc/roster/tls}" 2>/dev/null) || answer=''
            case $answer in
            *'"cluster_id": "'[!\"]*)
                echo "$addr"
                return 0
                ;;
            esac
        fi
        i=$((i + 1))
    done
    return 1
}

write_configs() {
    [ -n "${ROSTER_RUN_DIR:-}" ] || return 0
    mkdir -p "$ROSTER_RUN_DIR"
    tls=${ROSTER_TLS_DIR:-/etc/roster/tls}
    metas=$(meta_list "$META_REPLICAS" | sed 's/[^,]*/"&"/g; s/,/, /g')
    printf 'meta = [%s]\ntls-dir = "%s"\n' "$metas" "$tls" >"$ROSTER_RUN_DIR/cluster.toml"
    printf 'sessions = ["%s.%s.svc.%s:%s"]\nca = "%s/ca.pem"\n' \
        "$SESSION_SERVICE" "$POD_NAMESPACE" "$CLUSTER_DOMAIN" "$SESSION_PORT" "$tls" \
        >"$ROSTER_RUN_DIR/client.toml"
    # Operator commands in the pod present the cluster's admin token (the Secret roster-admin-token).
    if [ -n "${ROSTER_ADMIN_TOKEN_FILE:-}" ]; then
        printf 'token-file = "%s"\n' "$ROSTER_ADMIN_TOKEN_FILE" >>"$ROSTER_RUN_DIR/client.toml"
    fi
}

case $role in
meta)
    ord=$(ordinal)
    : "${ROSTER_ID:=$((ord + 1))}"
    : "${ROSTER_ADVERTISE:=$(meta_addr "$ord")}"
    unset ROSTER_BOOTSTRAP ROSTER_JOIN
    # How this node enters the group. Both flags are ignored by a node that has state on disk (it
    # recovers), so they are always given. A node without state joins a group that exists -- also
    # an initial voter whose volume was lost: bootstrapping it again would found a second cluster
    # that the others refuse. Only when no group answers do the initial voters bootstrap (the
    # lowest id creates the group, the others wait for it); a pod added by scaling out joins
    # through meta pod 0, retrying until the group answers.
    if via=$(find_group "$ord"); then
        export ROSTER_JOIN="$via"
        entry="join via $via"
    elif [ "$ord" -lt "$META_BOOTSTRAP" ]; then
        ROSTER_BOOTSTRAP=$(meta_list "$META_BOOTSTRAP" ids)
        export ROSTER_BOOTSTRAP
        entry="bootstrap $ROSTER_BOOTSTRAP"
    else
        ROSTER_JOIN=$(meta_addr 0)
        export ROSTER_JOIN
        entry="join via $ROSTER_JOIN"
    fi
    ;;
data)
    ord=$(ordinal)
    : "${ROSTER_ID:=$((ord + 1))}"
    : "${ROSTER_ADVERTISE:=$(svc_host "$POD_NAME" "$DATA_SERVICE"):$DATA_PORT}"
    ROSTER_META=$(meta_list "$META_REPLICAS")
    export ROSTER_META
    entry="meta $ROSTER_META"
    ;;
session)
    # Session servers run in a Deployment: no ordinal, so the id is the pod name's CRC-32 plus one
    # (1 .. 2^32). It is stable across container restarts of the pod. Two live pods colliding is
    # about as likely as n^2 / 2^33 for n pods (1 in a million for 90 pods); set ROSTER_ID yourself
    # where that matters.
    if [ -z "${ROSTER_ID:-}" ]; then
        crc=$(printf '%s' "$POD_NAME" | cksum | cut -d ' ' -f 1)
        ROSTER_ID=$((crc + 1))
    fi
    if [ -z "${ROSTER_ADVERTISE:-}" ]; then
        : "${POD_IP:?POD_IP must be set (downward API status.podIP)}"
        case $POD_IP in
        *:*) ROSTER_ADVERTISE="[$POD_IP]:$SESSION_PORT" ;;
        *) ROSTER_ADVERTISE="$POD_IP:$SESSION_PORT" ;;
        esac
    fi
    ROSTER_META=$(meta_list "$META_REPLICAS")
    export ROSTER_META
    entry="meta $ROSTER_META"
    ;;
*)
    die "unknown role '$role': expected meta, data or session"
    ;;
esac

export ROSTER_ID ROSTER_ADVERTISE
write_configs
log "$role id=$ROSTER_ID advertise=$ROSTER_ADVERTISE $entry"
exec "$ROSTER_BIN" "$role" "$@"
