#!/usr/bin/env bash
# Deep-verify benchmark: how fast the nodes re-hash their stored chunks against their addresses
# (`escrowctl verify --deep`), compared with `b3sum` over the same chunk files in the same run.
#
# Stores ~1.1 GiB of pseudo-random artifacts (11 x 100 MiB, AES-CTR keystream from fixed seeds)
# in a 3-node cluster of `escrowd run` processes on 127.0.0.1, then times:
#   - `escrowctl verify --deep`: all three nodes verify at once (each re-hashes its own copy);
#   - `b3sum` over one node's chunk files, and over all three nodes' chunk files.
# Prints bytes, seconds and GB/s, and the ratio of the aggregate rates (goal >= 0.8x b3sum).
# Everything it starts it stops by PID. Figures, not a pass/fail test.
# Usage: scripts/bench-verify.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
PORT_BASE=17600
FILES=11
FILE_MIB=100

command -v b3sum >/dev/null 2>&1 || apt_install b3sum
command -v openssl >/dev/null 2>&1 || apt_install openssl
log "building escrowd and escrowctl"
cargo build --bins --quiet

WORK="$(mktemp -d)"
PIDS=()
NODE_PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ -n "${KEEP_WORK:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

start_run_cluster "$WORK/escrow" "$PORT_BASE"

log "storing $FILES x $FILE_MIB MiB"
mkdir -p "$WORK/src"
for i in $(seq 1 "$FILES"); do
    stream "verify-$i" $((FILE_MIB * 1024 * 1024)) >"$WORK/src/f$i.bin"
    "${CTL[@]}" artifact put vendor "bench/f$i.bin" --file "$WORK/src/f$i.bin" >/dev/null
    rm "$WORK/src/f$i.bin"
done
# Wait until every node holds every chunk (the chunk sync catches followers up).
for _ in $(seq 1 600); do
    "${CTL[@]}" verify --deep --json >"$WORK/warm.json" 2>/dev/null && break; sleep 1
done

chunk_files() { find "$WORK/escrow/node$1/data/chunks" -type f -path '*/[0-9a-f][0-9a-f]/*'; }
NODE_BYTES=$(chunk_files 1 | xargs cat | wc -c)

log "escrowctl verify --deep (all three nodes at once)"
t=$(now)
"${CTL[@]}" verify --deep --json >"$WORK/deep.json"
DEEP_S=$(since "$t")
DEEP_BYTES=$(grep -o '"bytes_hashed":[0-9]*' "$WORK/deep.json" | cut -d: -f2 | awk '{s += $1} END {printf "%.0f", s}')
# (JSON keys come sorted: bytes_hashed, chunks_checked, node, seconds.)
PER_NODE=$(grep -o '"bytes_hashed":[0-9]*,"chunks_checked":[0-9]*,"node":[0-9]*,"seconds":[0-9.e-]*' "$WORK/deep.json" \
    | sed 's/"bytes_hashed":\([0-9]*\),"chunks_checked":\([0-9]*\),"node":\([0-9]*\),"seconds":\(.*\)/node \3: \2 chunks, \1 bytes in \4 s/')

log "b3sum over node 1's chunk files"
t=$(now)
chunk_files 1 | xargs b3sum --no-names >/dev/null
B3_ONE_S=$(since "$t")
log "b3sum over all three nodes' chunk files"
t=$(now)
for i in 1 2 3; do chunk_files "$i"; done | xargs b3sum --no-names >/dev/null
B3_ALL_S=$(since "$t")

GBS() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.2f", (s > 0) ? b / 1e9 / s : 0 }'; }
echo
echo "stored: $NODE_BYTES bytes of chunks per node ($(chunk_files 1 | wc -l) files), page cache warm"
echo "$PER_NODE"
printf '%-44s %14s %9s %8s\n' "" "bytes" "seconds" "GB/s"
printf '%-44s %14s %9s %8s\n' "escrowctl verify --deep (3 nodes at once)" "$DEEP_BYTES" "$DEEP_S" "$(GBS "$DEEP_BYTES" "$DEEP_S")"
printf '%-44s %14s %9s %8s\n' "b3sum, one node's chunk files" "$NODE_BYTES" "$B3_ONE_S" "$(GBS "$NODE_BYTES" "$B3_ONE_S")"
printf '%-44s %14s %9s %8s\n' "b3sum, all three nodes' chunk files" "$((NODE_BYTES * 3))" "$B3_ALL_S" "$(GBS $((NODE_BYTES * 3)) "$B3_ALL_S")"
echo
echo "deep verify / b3sum (same bytes, whole machine): $(awk -v d="$DEEP_BYTES" -v ds="$DEEP_S" -v b=$((NODE_BYTES * 3)) -v bs="$B3_ALL_S" 'BEGIN { printf "%.2f", (d / ds) / (b / bs) }')x (goal >= 0.8x)"
