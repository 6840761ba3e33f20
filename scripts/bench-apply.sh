#!/usr/bin/env bash
# State-machine apply benchmark (examples/bench_apply.rs): puts applied straight to the RocksDB
# state machine, no Raft, network or fsync, timed per put (wall and CPU, all threads of the
# process, RocksDB's flushes included). Steadier than the end-to-end write benchmark
# (scripts/bench-vs-etcd.sh), so it can show a change to the apply path of a few percent;
# compare two builds in interleaved runs, as the VM's speed drifts. Runs it ROUNDS times and
# prints each run's figures (JSON, one line each). Figures, not a pass/fail test. With `expire`
# after ROUNDS it times history expiry of a store where every key was written twice instead
# (run as root so it can drop the page cache first: expiry on a store larger than memory).
# Usage: scripts/bench-apply.sh [ROUNDS] [expire] [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]
#        (defaults 3, 8000, 32 and 1024)
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
USAGE="usage: $0 [ROUNDS] [expire] [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]"
[ $# -le 5 ] || { echo "$USAGE" >&2; exit 2; }
ROUNDS="${1:-3}"
[[ "$ROUNDS" =~ ^[1-9][0-9]?$ ]] || { echo "ROUNDS must be 1 to 99" >&2; exit 2; }
shift $(( $# > 0 ? 1 : 0 ))
MODE=()
if [ "${1:-}" = expire ]; then MODE=(expire); shift; fi
[ $# -le 3 ] || { echo "$USAGE" >&2; exit 2; }
for a in "$@"; do
    [[ "$a" =~ ^[1-9][0-9]*$ ]] || { echo "ENTRIES, PUTS_PER_ENTRY and VALUE_BYTES must be positive whole numbers, got '$a'" >&2; exit 2; }
done
log "building the apply benchmark (release)"
cargo build --release --example bench_apply --quiet
for _ in $(seq 1 "$ROUNDS"); do
    "$RELEASE_BIN/examples/bench_apply" "${MODE[@]}" "$@"
done
