//! Continuity Escrow node library. See README.md for the architecture and code map.
//!
//! Dependency order (imports flow downwards only):
//! `domain`, `ledger` (pure) → `raft` (types, codec, network) → `store` (RocksDB) →
//! `service`, `http`, `metrics` → `node` → `dev`, `client`, binaries.

pub mod attest;
pub mod auth;
pub mod bench;
pub mod chunks;
pub mod client;
pub mod config;
pub mod dev;
pub mod domain;
pub mod http;
pub mod integrity;
pub mod ledger;
pub mod metrics;
pub mod mirror;
pub mod node;
pub mod pki;
pub mod raft;
pub mod service;
pub mod store;
pub mod transport;
pub mod verify;
pub mod workers;

/// Generated protobuf and gRPC types; used only at the edge (`service`, `raft::network`,
/// `client`).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("escrow.v1");
}

/// Sets up `tracing` output: human-readable or JSON, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing(json: bool) {
    init_tracing_with(json, "info,openraft=warn");
}

/// Like [`init_tracing`] with another default filter (tests keep their output quiet).
pub fn init_tracing_with(json: bool, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
