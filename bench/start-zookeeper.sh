#!/usr/bin/env bash
# Starts a standalone ZooKeeper (Debian package zookeeper) on 127.0.0.1 for
# `roster bench --target zookeeper`, with its data in a new temporary directory, and waits until
# it serves.
#
#   bench/start-zookeeper.sh [PORT]   PORT: the client port; default a free one
#
# Prints one line, "127.0.0.1:PORT PIDFILE". The pid file holds the server's (the JVM's) pid, for
# `roster bench --server-pid`; `bench/stop.sh PIDFILE` stops the server and removes its data.
#
# The server keeps ZooKeeper's defaults (tickTime 2000 ms, so sessions of 4 to 40 s; the heap of
# upstream zkServer.sh, 1000 MB) except: no limit on connections from one address (the bench
# opens more than the default 60), no admin HTTP server (it would take port 8080), and the
# `srvr` four-letter word allowed, to see that it serves.
set -euo pipefail

jar=/usr/share/java/zookeeper.jar
[[ -f $jar ]] || { echo "$jar not found (apt-get install zookeeper)" >&2; exit 1; }
command -v java >/dev/null || { echo "java not found" >&2; exit 1; }

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

dir=$(mktemp -d -t roster-bench-zookeeper.XXXXXX)
touch "$dir/.roster-bench-server"
mkdir "$dir/data"
cat >"$dir/zoo.cfg" <<EOF
tickTime=2000
dataDir=$dir/data
clientPort=$port
clientPortAddress=127.0.0.1
maxClientCnxns=0
admin.enableServer=false
4lw.commands.whitelist=srvr
EOF

# Logging through slf4j-simple, to the log file, when Debian ships it.
classpath=$jar
[[ -f /usr/share/java/slf4j-simple.jar ]] && classpath+=:/usr/share/java/slf4j-simple.jar
java -Xmx1000m -cp "$classpath" \
    -Dorg.slf4j.simpleLogger.defaultLogLevel=warn \
    -Dzookeeper.jmx.log4j.disable=true \
    org.apache.zookeeper.server.ZooKeeperServerMain "$dir/zoo.cfg" \
    </dev/null >"$dir/zookeeper.log" 2>&1 &
pid=$!
echo "$pid" >"$dir/zookeeper.pid"

# `srvr` answers with the server's mode once it serves.
serving() {
    local reply
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf srvr >&3
    reply=$(timeout 2 cat <&3 || true)
    exec 3<&-
    [[ $reply == *"Mode:"* ]]
}

for _ in $(seq 600); do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "ZooKeeper exited; its log:" >&2
        tail -n 30 "$dir/zookeeper.log" >&2
        exit 1
    fi
    if serving 2>/dev/null; then
        echo "127.0.0.1:$port $dir/zookeeper.pid"
        exit 0
    fi
    sleep 0.1
done
echo "ZooKeeper did not serve within 60 s; its log:" >&2
tail -n 30 "$dir/zookeeper.log" >&2
kill -KILL "$pid" 2>/dev/null || true
exit 1
