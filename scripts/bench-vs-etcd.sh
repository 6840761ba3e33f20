#!/usr/bin/env bash
# Write benchmark, escrow vs etcd 3.4, in one run with one harness (`escrowctl bench put`):
# a 3-node escrow dev cluster and two 3-node etcd clusters (plaintext as Debian ships it, and
# with TLS/mTLS like escrow) on 127.0.0.1, 1 KiB values at 1, 16 and 64 concurrent clients.
# Prints all three and the ratios, and for each the CPU time per write of the servers (from
# /proc) and of the load generator, then stops everything it started (by PID). Figures, not a
# pass/fail test. With ROUNDS > 1 each point runs that many times, the three systems taking
# turns (round 1: escrow, etcd, etcd+tls; round 2 starts with etcd, round 3 with etcd+tls, and
# so on, so none always runs first), and the table shows each figure's median over the rounds
# (max included) with the range of the per-round ratios: this VM's speed drifts by ±20%
# within minutes, so one round can favour either side.
# Values are random bytes, different for every put (customer data does not compress to
# nothing); COMPRESSIBLE=1 writes the byte `x` repeated instead, as runs before 2026-11-23 did.
# Keys repeat across runs and points (`w<client>-<n>`), so a run rewrites the keys earlier runs
# wrote as far as they got; NEW_KEYS=1 gives every run keys of its own (all first writes).
# Usage: [COMPRESSIBLE=1] [NEW_KEYS=1] scripts/bench-vs-etcd.sh [SECONDS_PER_RUN] [ROUNDS]
#        (defaults 10 and 1)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
SECONDS_PER_RUN="${1:-10}"
ROUNDS="${2:-1}"
case "${COMPRESSIBLE:-0}" in
    0) VALUE_KIND="random bytes"; BENCH_ARGS=() ;;
    1) VALUE_KIND="the byte x repeated"; BENCH_ARGS=(--compressible) ;;
    *) echo "COMPRESSIBLE must be 0 or 1" >&2; exit 2 ;;
esac
case "${NEW_KEYS:-0}" in
    0) KEY_KIND="keys repeating across runs" ;;
    1) KEY_KIND="new keys every run"; BENCH_ARGS+=(--new-keys) ;;
    *) echo "NEW_KEYS must be 0 or 1" >&2; exit 2 ;;
esac
[[ "$SECONDS_PER_RUN" =~ ^[1-9][0-9]*$ ]] || { echo "SECONDS_PER_RUN must be a positive whole number" >&2; exit 2; }
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "ROUNDS must be 1 to 99" >&2; exit 2; }
VALUE=1024
CLIENTS="1 16 64"
ETCD_PORT=23790
ETCD_TLS_PORT=23890
ESCROW_PORT_BASE=17400

command -v etcd >/dev/null 2>&1 || apt_install etcd-server
# etcd-client's build script needs protoc.
command -v protoc >/dev/null 2>&1 || apt_install protobuf-compiler
log "building escrowd and escrowctl, release, with the etcd-bench feature"
cargo build --release --bins --features etcd-bench --quiet
BIN="$RELEASE_BIN"

WORK="$(mktemp -d)"
# The three clusters keep everything written (no compaction of etcd's history, escrow's log
# purged only after snapshots): whole `10 3` runs with random values peaked at 8.6 and 9.3 GB
# on 2026-11-23 (the filesystem's used space, sampled every 10 s), so 350 MB per second of run
# time and round, plus 1 GB of margin. A full disk kills etcd mid-run.
DISK_NEEDED_MB=$((350 * SECONDS_PER_RUN * ROUNDS + 1024))
DISK_FREE_MB=$(df --output=avail -BM "$WORK" | tail -1 | tr -dc '0-9')
if (( DISK_FREE_MB < DISK_NEEDED_MB )); then
    echo "only ${DISK_FREE_MB} MB free under $WORK; this run needs about ${DISK_NEEDED_MB} MB" >&2
    rmdir "$WORK"
    exit 1
fi
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# start_etcd NAME BASE_PORT SCHEME: a 3-node etcd cluster on 127.0.0.1 with client ports
# BASE+1..3 and peer ports BASE+11..13. Sets ENDPOINTS; records the PIDs in PIDS (so it must
# not run in a subshell).
start_etcd() {
    local name="$1" base="$2" scheme="$3"; shift 3
    local initial="" endpoints="" i
    for i in 1 2 3; do initial+="$name$i=$scheme://127.0.0.1:$((base+10+i)),"; done
    for i in 1 2 3; do
        local tls=()
        if [ "$scheme" = https ]; then
            # Server-only TLS on the client port (escrow's clients use a token, not a
            # certificate: etcd would demand one whenever --trusted-ca-file is set), mTLS
            # between peers as escrow's nodes have.
            tls=(--cert-file "$PKI/node$i.pem" --key-file "$PKI/node$i.key"
                 --peer-cert-file "$PKI/node$i.pem" --peer-key-file "$PKI/node$i.key"
                 --peer-trusted-ca-file "$PKI/ca.pem" --peer-client-cert-auth)
        fi
        etcd --name "$name$i" --data-dir "$WORK/$name$i" \
            --listen-client-urls "$scheme://127.0.0.1:$((base+i))" \
            --advertise-client-urls "$scheme://127.0.0.1:$((base+i))" \
            --listen-peer-urls "$scheme://127.0.0.1:$((base+10+i))" \
            --initial-advertise-peer-urls "$scheme://127.0.0.1:$((base+10+i))" \
            --initial-cluster "${initial%,}" --initial-cluster-state new \
            --initial-cluster-token "escrow-bench-$name" "${tls[@]}" >"$WORK/$name$i.log" 2>&1 &
        PIDS+=($!)
        endpoints+="$scheme://127.0.0.1:$((base+i)),"
    done
    ENDPOINTS="${endpoints%,}"
}

# Certificates for the TLS etcd cluster (server + client use, as escrow's nodes have).
PKI="$WORK/etcd-pki"
"$BIN/escrowd" pki --out "$PKI" --node 1=127.0.0.1,localhost --node 2=127.0.0.1,localhost \
    --node 3=127.0.0.1,localhost >/dev/null

log "starting etcd $(etcd --version | head -1 | awk '{print $3}') x3 plaintext on 127.0.0.1:$((ETCD_PORT+1))-$((ETCD_PORT+3)) and x3 with TLS/mTLS on :$((ETCD_TLS_PORT+1))-$((ETCD_TLS_PORT+3))"
start_etcd e "$ETCD_PORT" http
ETCD_ENDPOINTS="$ENDPOINTS"
ETCD_PIDS=("${PIDS[@]: -3}")
start_etcd t "$ETCD_TLS_PORT" https
ETCD_TLS_ENDPOINTS="$ENDPOINTS"
ETCD_TLS_PIDS=("${PIDS[@]: -3}")

log "starting escrow dev cluster x3 on 127.0.0.1:$((ESCROW_PORT_BASE+10))-$((ESCROW_PORT_BASE+32))"
RUST_LOG=warn "$BIN/escrowd" dev --dir "$WORK/escrow" --port-base "$ESCROW_PORT_BASE" >"$WORK/escrow.log" 2>&1 &
PIDS+=($!)
ESCROW_PID=$!
CTL=("$BIN/escrowctl" --config "$WORK/escrow/escrowctl.toml")

# CPU time (user + system, in clock ticks) the given processes have used so far.
HZ=$(getconf CLK_TCK)
ticks() {
    local total=0 pid
    for pid in "$@"; do
        if [[ ! -r "/proc/$pid/stat" ]]; then
            echo "server process $pid exited during the run ($(df -h --output=avail "$WORK" | tail -1 | tr -d ' ') free under $WORK)" >&2
            return 1
        fi
        total=$((total + $(awk '{print $14 + $15}' "/proc/$pid/stat")))
    done
    echo "$total"
}
# measure "SERVER_PIDS" BENCH_COMMAND...: runs the bench and prints its JSON report with the
# CPU time per write of the servers and of the load generator added (µs).
measure() {
    local pids=($1) before after out
    shift
    before=$(ticks "${pids[@]}")
    out=$( { TIMEFORMAT='%U %S'; time "$@"; } 2>"$WORK/bench.time" ) || {
        cat "$WORK/bench.time" >&2; return 1; }
    after=$(ticks "${pids[@]}")
    python3 - "$out" "$before" "$after" "$HZ" "$WORK/bench.time" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
before, after, hz = (int(a) for a in sys.argv[2:5])
user, system = (float(x) for x in open(sys.argv[5]).read().split()[-2:])
ops = max(r["ops"], 1)
r["server_cpu_us_per_write"] = (after - before) / hz * 1e6 / ops
r["client_cpu_us_per_write"] = (user + system) * 1e6 / ops
print(json.dumps(r))
PY
}

for _ in $(seq 1 300); do
    if grep -q "Ctrl-C stops" "$WORK/escrow.log" 2>/dev/null \
        && curl -sf "http://127.0.0.1:$((ETCD_PORT+1))/health" | grep -q true \
        && curl -sf --cacert "$PKI/ca.pem" "https://127.0.0.1:$((ETCD_TLS_PORT+1))/health" | grep -q true; then
        break
    fi
    sleep 0.2
done
"${CTL[@]}" cluster status >/dev/null
curl -sf "http://127.0.0.1:$((ETCD_PORT+1))/health" | grep -q true || { echo "etcd did not come up" >&2; tail "$WORK/etcd1.log" >&2; exit 1; }

echo
echo "value ${VALUE} B (${VALUE_KIND}; ${KEY_KIND}), ${SECONDS_PER_RUN} s per run, ${ROUNDS} round(s) per point (medians), 3 nodes each on loopback, $(nproc) cores"
echo "escrow: TLS to clients, mTLS between nodes; etcd: plaintext; etcd+tls: TLS to clients, mTLS between peers"
# RocksDB chooses hardware or software CRC32C when it is compiled (.cargo/config.toml); its LOG
# line reflects SSE4.2 only (the 3-way path also needs PCLMUL, checked with `nm` once).
echo "escrow's RocksDB: $(grep -h -m1 -o 'Fast CRC32 supported: .*' "$WORK"/escrow/node1/data/log/LOG 2>/dev/null || echo 'CRC32C implementation unknown (no LOG line)')"
printf '%-7s | %-30s | %-30s | %-30s | %s\n' clients "escrow w/s (p50/p99, max ms)" "etcd w/s (p50/p99, max ms)" "etcd+tls w/s (p50/p99, max ms)" "escrow/etcd, escrow/etcd+tls"
for c in $CLIENTS; do
    run=("${CTL[@]}" bench put --clients "$c" --value-size "$VALUE" --seconds "$SECONDS_PER_RUN" --json "${BENCH_ARGS[@]}")
    es=() ds=() ts=()
    for round in $(seq 0 $((ROUNDS - 1))); do
        for turn in 0 1 2; do
            case $(( (round + turn) % 3 )) in
                0) es+=("$(measure "$ESCROW_PID" "${run[@]}")") ;;
                1) ds+=("$(measure "${ETCD_PIDS[*]}" "${run[@]}" --etcd "$ETCD_ENDPOINTS")") ;;
                2) ts+=("$(measure "${ETCD_TLS_PIDS[*]}" "${run[@]}" --etcd "$ETCD_TLS_ENDPOINTS" --etcd-ca "$PKI/ca.pem")") ;;
            esac
        done
    done
    python3 - "$c" "$ROUNDS" "${es[@]}" "${ds[@]}" "${ts[@]}" <<'PY'
import json, statistics, sys
c, n = sys.argv[1], int(sys.argv[2])
runs = [json.loads(a) for a in sys.argv[3:]]
es, ds, ts = runs[:n], runs[n:2 * n], runs[2 * n:]
def med(rs):
    # Each figure's median over the rounds; errors are summed.
    m = {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], (int, float))}
    m["errors"] = sum(r["errors"] for r in rs)
    return m
e, d, t = med(es), med(ds), med(ts)
f = lambda r: f"{r['ops_per_sec']:>7.0f} ({r['p50_ms']:.2f}/{r['p99_ms']:.2f}, {r['max_ms']:.0f})"
ratio = lambda a, b: a['ops_per_sec'] / b['ops_per_sec'] if b['ops_per_sec'] else float('inf')
errors = f"errors {e['errors']}/{d['errors']}/{t['errors']}"
if n > 1:
    rd = sorted(ratio(a, b) for a, b in zip(es, ds))
    rt = sorted(ratio(a, b) for a, b in zip(es, ts))
    errors += f"; per round {rd[0]:.2f}-{rd[-1]:.2f}x, {rt[0]:.2f}-{rt[-1]:.2f}x"
print(f"{c:<7} | {f(e):<30} | {f(d):<30} | {f(t):<30} | {ratio(e, d):.2f}x, {ratio(e, t):.2f}x  ({errors})")
cpu = lambda r: f"{r['server_cpu_us_per_write']:.0f} + {r['client_cpu_us_per_write']:.0f}"
print(f"{'':<7} | cpu/write {cpu(e):<20} | cpu/write {cpu(d):<20} | cpu/write {cpu(t):<20} | (µs: servers + load generator)")
PY
done
