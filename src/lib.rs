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

/// Generated protobuf and gRPC types; used only at the edge (the services and `node`,
/// `raft::network`, the client side, and `metrics` for the freshness message).
pub mod pb {
    #![allow(clippy::all, clippy::pedantic)]
    tonic::include_proto!("escrow.v1");
}

/// Parses `program`'s command line. Help and version print as usual; a usage error is one line
/// on stderr (the command-line contract), "PROGRAM: REASON (see PROGRAM --help)", exit code 2.
pub fn parse_args<C: clap::Parser>(program: &str) -> Result<C, std::process::ExitCode> {
    use clap::error::ErrorKind;
    match C::try_parse() {
        Ok(cli) => Ok(cli),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                let _ = e.print();
                Err(std::process::ExitCode::SUCCESS)
            }
            // `escrowctl` or `escrowctl cluster` alone: clap would print the whole help.
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                eprintln!("{program}: a command is required (see {program} --help)");
                Err(std::process::ExitCode::from(2))
            }
            _ => {
                eprintln!("{program}: {} (see {program} --help)", usage_reason(&e));
                Err(std::process::ExitCode::from(2))
            }
        },
    }
}

/// A clap error's reason on one line: its text up to the usage, lines joined, without the
/// "error: " prefix.
fn usage_reason(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .filter(|l| !l.is_empty())
        .collect();
    lines.join("; ").trim_start_matches("error: ").to_string()
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
