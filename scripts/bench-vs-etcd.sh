#!/usr/bin/env bash
# Write benchmark, escrow vs etcd 3.4, in one run with one harness (`escrowctl bench put`):
# a 3-node escrow dev cluster and a 3-node etcd cluster on 127.0.0.1, 1 KiB values at 1, 16
# and 64 concurrent clients. Prints both and the ratio, then stops everything it started (by
# PID). Figures, not a pass/fail test.
# Usage: scripts/bench-vs-etcd.sh [SECONDS_PER_RUN]   (default 10)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
SECONDS_PER_RUN="${1:-10}"
VALUE=1024
CLIENTS="1 16 64"
ETCD_PORT=23790
ESCROW_PORT_BASE=17400

command -v etcd >/dev/null 2>&1 || apt_install etcd-server
# etcd-client's build script needs protoc.
command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler
log "building escrowd and escrowctl (with the etcd-bench feature)"
cargo build --bins --features etcd-bench --quiet

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

log "starting etcd $(etcd --version | head -1 | awk '{print $3}') x3 on 127.0.0.1:$((ETCD_PORT+1))-$((ETCD_PORT+3))"
INITIAL=""
for i in 1 2 3; do INITIAL+="e$i=http://127.0.0.1:$((ETCD_PORT+10+i)),"; done
INITIAL="${INITIAL%,}"
ETCD_ENDPOINTS=""
for i in 1 2 3; do
    etcd --name "e$i" --data-dir "$WORK/etcd$i" \
        --listen-client-urls "http://127.0.0.1:$((ETCD_PORT+i))" \
        --advertise-client-urls "http://127.0.0.1:$((ETCD_PORT+i))" \
        --listen-peer-urls "http://127.0.0.1:$((ETCD_PORT+10+i))" \
        --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_PORT+10+i))" \
        --initial-cluster "$INITIAL" --initial-cluster-state new \
        --initial-cluster-token escrow-bench >"$WORK/etcd$i.log" 2>&1 &
    PIDS+=($!)
    ETCD_ENDPOINTS+="http://127.0.0.1:$((ETCD_PORT+i)),"
done
ETCD_ENDPOINTS="${ETCD_ENDPOINTS%,}"

log "starting escrow dev cluster x3 on 127.0.0.1:$((ESCROW_PORT_BASE+10))-$((ESCROW_PORT_BASE+32))"
RUST_LOG=warn "$BIN/escrowd" dev --dir "$WORK/escrow" --port-base "$ESCROW_PORT_BASE" >"$WORK/escrow.log" 2>&1 &
PIDS+=($!)
CTL=("$BIN/escrowctl" --config "$WORK/escrow/escrowctl.toml")

for _ in $(seq 1 300); do
    if grep -q "Ctrl-C stops" "$WORK/escrow.log" 2>/dev/null \
        && curl -sf "http://127.0.0.1:$((ETCD_PORT+1))/health" | grep -q true; then
        break
    fi
    sleep 0.2
done
"${CTL[@]}" cluster status >/dev/null
curl -sf "http://127.0.0.1:$((ETCD_PORT+1))/health" | grep -q true || { echo "etcd did not come up" >&2; tail "$WORK/etcd1.log" >&2; exit 1; }

echo
echo "value ${VALUE} B, ${SECONDS_PER_RUN} s per run, 3 nodes each on loopback, $(nproc) cores"
printf '%-8s | %-32s | %-32s | %s\n' clients "escrow writes/s (p50/p99 ms)" "etcd writes/s (p50/p99 ms)" "escrow/etcd"
for c in $CLIENTS; do
    e=$("${CTL[@]}" bench put --clients "$c" --value-size "$VALUE" --seconds "$SECONDS_PER_RUN" --json)
    d=$("${CTL[@]}" bench put --clients "$c" --value-size "$VALUE" --seconds "$SECONDS_PER_RUN" --etcd "$ETCD_ENDPOINTS" --json)
    python3 - "$c" "$e" "$d" <<'PY'
import json, sys
c, e, d = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
f = lambda r: f"{r['ops_per_sec']:>8.0f} ({r['p50_ms']:.2f}/{r['p99_ms']:.2f}, max {r['max_ms']:.0f})"
ratio = e['ops_per_sec'] / d['ops_per_sec'] if d['ops_per_sec'] else float('inf')
print(f"{c:<8} | {f(e):<32} | {f(d):<32} | {ratio:.2f}x  (errors {e['errors']}/{d['errors']})")
PY
done
