#!/usr/bin/env bash
# Shared set-up for the project's scripts: strict mode, the fixed cargo target dir (outside the
# clone, so CI and later builds on the same machine are warm) and prerequisites a fresh machine
# lacks. Source it; do not run it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/escrow-target}"
# An explicit --target (the host's own triple) keeps build-time dependencies apart from the
# program's: without it `cargo clippy` (check mode) and `cargo build` hash the host crates
# differently and each recompiles RocksDB's C++ (~15 min on 2 cores) for itself.
if command -v rustc >/dev/null 2>&1; then
    export CARGO_BUILD_TARGET="${CARGO_BUILD_TARGET:-$(rustc -vV | sed -n 's/^host: //p')}"
fi
BIN="$CARGO_TARGET_DIR/${CARGO_BUILD_TARGET:-}/debug"

log() { printf '==> %s\n' "$*" >&2; }

# Runs apt-get as root (directly, or through sudo when available).
apt_install() {
    local sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "need root to install: $* (run: apt-get install -y $*)" >&2; exit 1
        fi
    fi
    log "installing $*"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

ensure_prereqs() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install the Rust toolchain (https://rustup.rs)" >&2
        exit 1
    fi
    # librocksdb-sys generates its bindings with bindgen, which needs libclang.
    if ! ldconfig -p 2>/dev/null | grep -Eq 'libclang(-[0-9.]+)?\.so'; then
        apt_install libclang-dev clang
    fi
    # protoc comes from the protoc-bin-vendored crate; nothing to install for the main build.
}
