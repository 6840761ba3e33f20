#!/usr/bin/env bash
# Mirror benchmark: escrow vs `rsync -a` (into three local directories, then `sync`) vs
# `restic backup`, on one reproducible tree: 8 x 100 MiB + 2,000 x 112 KiB files (1 GiB) of
# pseudo-random data (AES-CTR keystream from a fixed seed) in nested folders.
#
# For each tool: a first mirror of the tree, then a second after changing 1 MiB in the
# middle of one big file. Prints seconds, MB/s, bytes sent (escrow: chunk bytes sent to the
# cluster; rsync: literal data written x3; restic: data added to its repository), the ratios,
# and the peak RSS of each escrow node. The escrow cluster is three `escrowd run` processes on
# 127.0.0.1 (TLS, mutual TLS, every chunk fsynced on each node). Everything it starts it stops
# by PID. Figures, not a pass/fail test.
# Usage: scripts/bench-mirror.sh [WORK_DIR]   (default: a temp dir, removed afterwards)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
PORT_BASE=17500
BIG_FILES=8
BIG_MIB=100
SMALL_FILES=2000
SMALL_KIB=112

command -v rsync >/dev/null 2>&1 || apt_install rsync
command -v restic >/dev/null 2>&1 || apt_install restic
command -v openssl >/dev/null 2>&1 || apt_install openssl
log "building escrowd and escrowctl"
cargo build --bins --quiet

if [ -n "${1:-}" ]; then WORK="$1"; KEEP=1; mkdir -p "$WORK"; else WORK="$(mktemp -d)"; KEEP=0; fi
PIDS=()
NODE_PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; fi
}
trap cleanup EXIT


TREE="$WORK/tree"
log "building the tree: $BIG_FILES x $BIG_MIB MiB + $SMALL_FILES x $SMALL_KIB KiB"
rm -rf "$TREE"; mkdir -p "$TREE/releases" "$TREE/data"
for i in $(seq 1 "$BIG_FILES"); do
    stream "big-$i" $((BIG_MIB * 1024 * 1024)) >"$TREE/releases/big-$i.bin"
done
stream small $((SMALL_FILES * SMALL_KIB * 1024)) >"$WORK/small.blob"
(cd "$TREE/data" && split -b "${SMALL_KIB}K" -a 4 -d "$WORK/small.blob" f)
rm "$WORK/small.blob"
for f in "$TREE"/data/f*; do
    n="${f##*/f}"; d="$TREE/data/d$((10#$n % 20))/e$((10#$n % 3))"
    mkdir -p "$d"; mv "$f" "$d/"
done
TREE_BYTES=$(du -sb "$TREE" | cut -f1)
MB() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
RATE() { awk -v b="$1" -v s="$2" 'BEGIN { printf "%.1f", (s > 0) ? b / 1e6 / s : 0 }'; }

start_run_cluster "$WORK/escrow" "$PORT_BASE"

escrow_mirror() {
    "${CTL[@]}" mirror --dir "$TREE" --namespace vendor --once --json --state "$WORK/mirror-state.json"
}

# ---- first mirror
log "rsync -a into 3 directories + sync (first)"
t=$(now)
for i in 1 2 3; do rsync -a --stats "$TREE/" "$WORK/rsync$i/" >"$WORK/rsync1-$i.txt"; done
sync
RSYNC1_S=$(since "$t")
RSYNC1_SENT=$(grep -h 'Literal data' "$WORK"/rsync1-*.txt | tr -d ',' | awk '{s += $3} END {printf "%.0f", s}')

log "restic backup (first)"
export RESTIC_PASSWORD=bench RESTIC_REPOSITORY="$WORK/restic"
restic init --quiet >/dev/null
t=$(now)
restic backup --json --quiet "$TREE" >"$WORK/restic1.json"
RESTIC1_S=$(since "$t")
RESTIC1_ADDED=$(grep '"message_type":"summary"' "$WORK/restic1.json" | sed 's/.*"data_added":\([0-9]*\).*/\1/')

log "escrow mirror (first)"
t=$(now)
escrow_mirror >"$WORK/escrow1.json"
ESCROW1_S=$(since "$t")
ESCROW1_SENT=$(sed 's/.*"bytes_sent":\([0-9]*\).*/\1/' "$WORK/escrow1.json")

# ---- change 1 MiB in the middle of one big file, then the second mirror
log "changing 1 MiB in the middle of releases/big-3.bin"
stream patch $((1024 * 1024)) | dd of="$TREE/releases/big-3.bin" bs=1M seek=$((BIG_MIB / 2)) conv=notrunc status=none

t=$(now)
for i in 1 2 3; do rsync -a --stats "$TREE/" "$WORK/rsync$i/" >"$WORK/rsync2-$i.txt"; done
sync
RSYNC2_S=$(since "$t")
RSYNC2_SENT=$(grep -h 'Literal data' "$WORK"/rsync2-*.txt | tr -d ',' | awk '{s += $3} END {printf "%.0f", s}')

t=$(now)
restic backup --json --quiet "$TREE" >"$WORK/restic2.json"
RESTIC2_S=$(since "$t")
RESTIC2_ADDED=$(grep '"message_type":"summary"' "$WORK/restic2.json" | sed 's/.*"data_added":\([0-9]*\).*/\1/')

t=$(now)
escrow_mirror >"$WORK/escrow2.json"
ESCROW2_S=$(since "$t")
ESCROW2_SENT=$(sed 's/.*"bytes_sent":\([0-9]*\).*/\1/' "$WORK/escrow2.json")

# ---- check: the escrow holds the tree (one big file back, by hash)
"${CTL[@]}" artifact get vendor releases/big-3.bin --out "$WORK/back.bin" >/dev/null
cmp -s "$WORK/back.bin" "$TREE/releases/big-3.bin" && CHECK="verified" || CHECK="MISMATCH"

RSS=""
for i in 0 1 2; do
    kb=$(awk '/VmHWM/ {print $2}' "/proc/${NODE_PIDS[$i]}/status")
    RSS+="node$((i+1)) $((kb / 1024)) MiB  "
done

echo
echo "tree: $(MB "$TREE_BYTES") MB ($BIG_FILES x $BIG_MIB MiB + $SMALL_FILES x $SMALL_KIB KiB), page cache warm for every tool"
printf '%-34s %9s %9s %16s\n' "" "seconds" "MB/s" "bytes sent/added"
printf '%-34s %9s %9s %16s\n' "rsync -a x3 + sync, first" "$RSYNC1_S" "$(RATE "$TREE_BYTES" "$RSYNC1_S")" "$RSYNC1_SENT"
printf '%-34s %9s %9s %16s\n' "restic backup, first" "$RESTIC1_S" "$(RATE "$TREE_BYTES" "$RESTIC1_S")" "$RESTIC1_ADDED"
printf '%-34s %9s %9s %16s\n' "escrow mirror (3 nodes), first" "$ESCROW1_S" "$(RATE "$TREE_BYTES" "$ESCROW1_S")" "$ESCROW1_SENT"
printf '%-34s %9s %9s %16s\n' "rsync -a x3 + sync, after 1 MiB" "$RSYNC2_S" "-" "$RSYNC2_SENT"
printf '%-34s %9s %9s %16s\n' "restic backup, after 1 MiB" "$RESTIC2_S" "-" "$RESTIC2_ADDED"
printf '%-34s %9s %9s %16s\n' "escrow mirror, after 1 MiB" "$ESCROW2_S" "-" "$ESCROW2_SENT"
echo
echo "first mirror rate, escrow / rsync: $(awk -v a="$RSYNC1_S" -v b="$ESCROW1_S" 'BEGIN { printf "%.2f", a / b }')x (goal >= 0.5x)"
echo "incremental bytes, escrow / restic: $(awk -v a="$ESCROW2_SENT" -v b="$RESTIC2_ADDED" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 0 }')x (goal < 1x)"
echo "peak RSS: $RSS(goal < 256 MiB each)"
echo "download check of releases/big-3.bin: $CHECK"
