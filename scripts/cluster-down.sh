#!/usr/bin/env bash
# Stops the dev cluster started by cluster-up.sh, by the PID in DIR/escrowd.pid (SIGTERM, then
# waits for a clean stop). Usage: scripts/cluster-down.sh [DIR]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
DIR="${1:-$(dev_dir_default)}"
[ -d "$DIR" ] || { echo "no $DIR: nothing to stop"; exit 0; }
DIR="$(cd "$DIR" && pwd)"
PIDFILE="$DIR/escrowd.pid"
[ -f "$PIDFILE" ] || { echo "no $PIDFILE: nothing to stop"; exit 0; }
PID="$(cat "$PIDFILE")"
if ! dev_pid_alive "$PID" "$DIR"; then
    echo "PID $PID is not a running escrowd dev for $DIR (stale PID file); nothing to stop"
else
    kill -TERM "$PID"
    for _ in $(seq 1 150); do kill -0 "$PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$PID" 2>/dev/null; then echo "PID $PID did not stop in 30s; sending SIGKILL" >&2; kill -KILL "$PID"; fi
fi
rm -f "$PIDFILE"
echo "stopped (data kept in $DIR)"
