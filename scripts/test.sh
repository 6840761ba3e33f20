#!/usr/bin/env bash
# The full test suite: prerequisites, formatting and lint checks, then every unit and
# integration test (real RocksDB, real TLS, real sockets, real processes).
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ensure_prereqs
cd "$ROOT"

start=$(date +%s)
if cargo fmt --version >/dev/null 2>&1; then
    log "cargo fmt --check (this crate; vendor/ is upstream code, kept as published)"
    cargo fmt -- --check
fi
if cargo clippy --version >/dev/null 2>&1; then
    log "cargo clippy --all-targets -- -D warnings"
    cargo clippy --all-targets --quiet -- -D warnings
fi
log "cargo test --all-targets"
cargo test --all-targets --no-fail-fast 2>&1
log "test suite done in $(( $(date +%s) - start ))s"
