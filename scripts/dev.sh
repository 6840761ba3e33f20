#!/usr/bin/env bash
# The embedded default: build, then start a 3-node dev cluster on 127.0.0.1 (ports 7410-7432)
# with generated dev PKI and credentials. Ctrl-C stops it; its data survives for the next start.
# Extra arguments go to `escrowd dev` (e.g. --dir DIR, --nodes 5).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"
log "building escrowd and escrowctl"
cargo build --bins --quiet
log "escrowctl is at $BIN/escrowctl (export PATH=\"$BIN:\$PATH\")"
exec "$BIN/escrowd" dev "$@"
