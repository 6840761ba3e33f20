#!/usr/bin/env bash
# PKI for a real deployment without its own CA: a cluster CA (kept if present), one certificate
# per node (server and client use), an ops token and a metrics token (reads /metrics only), all
# under OUT (keys and tokens mode 0600).
# Usage: scripts/pki.sh OUT 1=node1.example.org,10.0.0.1 2=node2.example.org 3=node3.example.org
# Keep OUT/ca.key offline once the certificates are issued.
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
[ $# -ge 2 ] || { sed -n '2,5p' "$0" >&2; exit 2; }
ensure_prereqs
# OUT is relative to the caller's directory, not the clone's (keys must not land in the clone).
OUT="$(realpath -m -- "$1")"; shift
cd "$ROOT"
cargo build --bins --quiet
args=()
for n in "$@"; do args+=(--node "$n"); done
"$BIN/escrowd" pki --out "$OUT" "${args[@]}"
