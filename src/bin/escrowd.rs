//! `escrowd`: the escrow node.
//!
//! - `escrowd dev [--dir DIR] [--nodes 3]`: local cluster on loopback with dev PKI.
//! - `escrowd run --config FILE`: one production node.
//! - `escrowd pki --out DIR --node ID=NAME[,NAME…] …`: a CA, node certificates, an ops token
//!   and a metrics token
//!   for a real deployment without its own CA.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use escrow::config::{Config, LogFormat};

/// mimalloc: the node allocates per request and per write, and glibc malloc took ~9% of a
/// loaded node's CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "escrowd", version, about = "Continuity escrow node")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a local dev cluster on 127.0.0.1 (ports 7410-7452) with generated PKI.
    Dev {
        /// Data and config dir (default: $ESCROW_DEV_DIR or ~/.local/share/escrow/dev).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Number of nodes: 1, 3 or 5.
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// First port of the range: node N listens on BASE+10N (client), +1 (peer), +2 (http).
        #[arg(long, default_value_t = escrow::dev::DEV_PORT_BASE)]
        port_base: u16,
        /// Log as JSON lines instead of human-readable text.
        #[arg(long)]
        log_json: bool,
    },
    /// Run one node from its config file.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Generate a cluster CA (kept if present), node certificates, an ops token and a metrics
    /// token.
    Pki {
        /// Output dir; the CA key and token are written mode 0600.
        #[arg(long)]
        out: PathBuf,
        /// A node as ID=NAME[,NAME…]: names are DNS names or IP addresses for its certificate.
        #[arg(long = "node", required = true)]
        nodes: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = match escrow::parse_args::<Cli>("escrowd") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
    let result = match cli.command {
        Cmd::Dev {
            dir,
            nodes,
            port_base,
            log_json,
        } => {
            escrow::init_tracing(log_json);
            let dir = dir.unwrap_or_else(escrow::dev::default_dev_dir);
            runtime().and_then(|rt| rt.block_on(escrow::dev::run(&dir, nodes, port_base)))
        }
        Cmd::Run { config } => Config::load(&config)
            .map_err(Into::into)
            .and_then(|config| {
                escrow::init_tracing(config.log_format == LogFormat::Json);
                runtime().and_then(|rt| rt.block_on(run(config)))
            }),
        Cmd::Pki { out, nodes } => pki(&out, &nodes),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("escrowd: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let node = escrow::node::start(&config, Arc::new(Default::default())).await?;
    tracing::info!(node = node.id, client = %node.client_addr, "node ready; SIGTERM or Ctrl-C stops it");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    node.shutdown().await;
    Ok(())
}

fn pki(out: &std::path::Path, nodes: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let (ca_cert, ca_key) = (out.join("ca.pem"), out.join("ca.key"));
    let ca = if ca_cert.exists() {
        escrow::pki::Ca::load(&ca_cert, &ca_key)?
    } else {
        let ca = escrow::pki::Ca::generate()?;
        ca.write(&ca_cert, &ca_key)?;
        println!(
            "wrote {} and {} (keep the key offline)",
            ca_cert.display(),
            ca_key.display()
        );
        ca
    };
    for spec in nodes {
        let (id, names) = spec
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--node {spec:?}: expected ID=NAME[,NAME…]"))?;
        let id: u64 = id
            .parse()
            .ok()
            .filter(|i| *i > 0)
            .ok_or_else(|| anyhow::anyhow!("--node {spec:?}: the id is a number ≥ 1"))?;
        let names: Vec<String> = names
            .split(',')
            .filter(|n| !n.is_empty())
            .map(String::from)
            .collect();
        if names.is_empty() {
            anyhow::bail!("--node {spec:?}: name at least one DNS name or IP address");
        }
        let (cert, key) = (
            out.join(format!("node{id}.pem")),
            out.join(format!("node{id}.key")),
        );
        ca.issue_to_files(&format!("escrow node {id}"), &names, &cert, &key)?;
        println!("wrote {} and {}", cert.display(), key.display());
    }
    for name in ["ops.token", "metrics.token"] {
        let token = out.join(name);
        if escrow::pki::write_token_unless_present(&token)? {
            println!("wrote {}", token.display());
        }
    }
    Ok(())
}
