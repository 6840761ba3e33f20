#!/usr/bin/env bash
# Starts the dev cluster in the background, records its PID in DIR/escrowd.pid and waits until
# it serves. Usage: scripts/cluster-up.sh [DIR] [extra escrowd dev args]
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
DIR="${1:-$(dev_dir_default)}"
shift || true
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"
PIDFILE="$DIR/escrowd.pid"
if [ -f "$PIDFILE" ] && dev_pid_alive "$(cat "$PIDFILE")" "$DIR"; then
    echo "already running with PID $(cat "$PIDFILE")"; exit 0
fi
cargo build --bins --quiet
nohup "$BIN/escrowd" dev --dir "$DIR" "$@" >"$DIR/escrowd.log" 2>&1 &
echo $! >"$PIDFILE"
for _ in $(seq 1 300); do
    if grep -q "Ctrl-C stops" "$DIR/escrowd.log" 2>/dev/null; then
        grep -v "^[0-9]\{4\}-" "$DIR/escrowd.log" | sed -n '/cluster is up/,/Ctrl-C/p'
        echo "PID $(cat "$PIDFILE"); stop with scripts/cluster-down.sh $DIR"
        exit 0
    fi
    if ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
        echo "escrowd dev exited; see $DIR/escrowd.log" >&2; tail -5 "$DIR/escrowd.log" >&2; exit 1
    fi
    sleep 0.2
done
echo "escrowd dev did not come up within 60s; see $DIR/escrowd.log" >&2
exit 1
