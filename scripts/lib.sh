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
# Benchmarks measure what production runs: `cargo build --release` (its first build compiles
# RocksDB again, for the release profile).
RELEASE_BIN="$CARGO_TARGET_DIR/${CARGO_BUILD_TARGET:-}/release"

log() { printf '==> %s\n' "$*" >&2; }

# The dev dir escrowd and escrowctl use by default: $ESCROW_DEV_DIR, else
# $XDG_DATA_HOME/escrow/dev, else ~/.local/share/escrow/dev.
dev_dir_default() {
    if [ -n "${ESCROW_DEV_DIR:-}" ]; then echo "$ESCROW_DEV_DIR"
    elif [ -n "${XDG_DATA_HOME:-}" ]; then echo "$XDG_DATA_HOME/escrow/dev"
    else echo "$HOME/.local/share/escrow/dev"; fi
}

# dev_pid_alive PID DIR: whether PID runs `escrowd dev --dir DIR` (checked on its command
# line: a PID file left from before a reboot may name another process by now).
dev_pid_alive() {
    local pid="$1" dir="$2" cmd
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    cmd="$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" || return 1
    [[ "$cmd" == *"/escrowd dev --dir $dir "* ]]
}

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

# Whether bindgen will find a libclang: in $LIBCLANG_PATH, in the linker cache, or where
# Debian's packages put it. ldconfig is looked for in /sbin too: a user's PATH on Debian
# leaves /usr/sbin out, and the check must not fail (and reinstall) for that alone.
# (libclang.so or libclang-N.so, not libclang-cpp.so, a different library.)
have_libclang() {
    local p="${LIBCLANG_PATH:-}" ldconfig d
    if [ -n "$p" ] && [ -f "$p" ]; then return 0; fi
    ldconfig="$(command -v ldconfig || echo /sbin/ldconfig)"
    # Read whole before matching: grep -q stopping early would fail ldconfig under pipefail.
    if "$ldconfig" -p 2>/dev/null | grep -E 'libclang(-[0-9.]+)?\.so' >/dev/null; then return 0; fi
    for d in ${p:+"$p"} /usr/lib/llvm-*/lib /usr/lib/*-linux-gnu; do
        if compgen -G "$d/libclang.so*" >/dev/null || compgen -G "$d/libclang-[0-9]*.so*" >/dev/null; then
            return 0
        fi
    done
    return 1
}

ensure_prereqs() {
    if ! command -v cargo >/dev/null 2>&1; then
        echo "cargo not found: install the Rust toolchain (https://rustup.rs)" >&2
        exit 1
    fi
    local missing=()
    # librocksdb-sys generates its bindings with bindgen, which needs libclang.
    have_libclang || missing+=(libclang-dev clang)
    # RocksDB itself is C++, compiled with $CXX or else `c++` (Debian's clang package does
    # not provide that name; g++ does).
    if [ -z "${CXX:-}" ] && ! command -v c++ >/dev/null 2>&1; then missing+=(g++); fi
    if [ ${#missing[@]} -gt 0 ]; then apt_install "${missing[@]}"; fi
    # protoc comes from the protoc-bin-vendored crate; nothing to install for the main build.
}

# Benchmark helpers.

# stream SEED BYTES: reproducible pseudo-random bytes (AES-CTR keystream). openssl ends on
# SIGPIPE when head has enough, which pipefail would otherwise count as a failure.
stream() {
    { openssl enc -aes-256-ctr -nosalt -pass "pass:$1" -pbkdf2 -iter 1 </dev/zero 2>/dev/null || true; } | head -c "$2"
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }

# start_run_cluster DIR PORT_BASE: a 3-node cluster of `escrowd run` processes on 127.0.0.1
# (files, PKI, token and init from a short `escrowd dev` run). Appends the node PIDs to the
# caller's PIDS and NODE_PIDS arrays (so it must not run in a subshell) and sets CTL to an
# escrowctl command line for it; returns once a leader is elected.
start_run_cluster() {
    local dir="$1" base="$2" dev i
    log "setting up a 3-node escrow cluster on 127.0.0.1:$((base+10))-$((base+32))"
    RUST_LOG=warn "$BIN/escrowd" dev --dir "$dir" --port-base "$base" >"$dir.dev.log" 2>&1 &
    dev=$!
    for _ in $(seq 1 300); do grep -q "Ctrl-C stops" "$dir.dev.log" 2>/dev/null && break; sleep 0.2; done
    kill -TERM "$dev"; wait "$dev" 2>/dev/null || true
    for i in 1 2 3; do
        RUST_LOG=warn "$BIN/escrowd" run --config "$dir/node$i/escrowd.toml" >"$dir.node$i.log" 2>&1 &
        PIDS+=($!); NODE_PIDS+=($!)
    done
    CTL=("$BIN/escrowctl" --config "$dir/escrowctl.toml" --timeout 120)
    for _ in $(seq 1 300); do
        "${CTL[@]}" cluster status --json 2>/dev/null | grep -q '"leader":[1-9]' && break; sleep 0.2
    done
}
