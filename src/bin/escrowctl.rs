//! `escrowctl`: the command line for ops, the vendor, the board and customers.
//!
//! Every command that reports something takes `--json` and then prints exactly one JSON
//! document on stdout. Exit code 0 means success; otherwise a one-line reason goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use escrow::client::{ClientConfig, EscrowClient};
use serde_json::json;

#[derive(Parser)]
#[command(name = "escrowctl", version, about = "Continuity escrow command line")]
struct Cli {
    /// Client config (endpoints, CA, token). Default: $ESCROWCTL_CONFIG, else the dev dir's
    /// escrowctl.toml.
    #[arg(long, global = true, env = "ESCROWCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Print one JSON document on stdout.
    #[arg(long, global = true)]
    json: bool,
    /// Deadline for the operation in seconds, retries included.
    #[arg(long, global = true, default_value_t = 20)]
    timeout: u64,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Cluster operations.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Records of a tenant collection.
    #[command(subcommand)]
    Record(RecordCmd),
    /// Load generators.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Bootstrap the cluster with the nodes' configured initial members (3 or 5 voters).
    Init,
    /// Leader, members, roles, applied indexes, reachability.
    Status,
    /// Add a node as learner, wait until it caught up, then promote it to voter.
    Add {
        #[arg(long)]
        id: u64,
        /// The new node's peer address host:port.
        #[arg(long)]
        raft_addr: String,
        /// The new node's client address host:port.
        #[arg(long)]
        client_addr: String,
        /// Keep it a learner (no vote).
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the membership. Its id is never used again.
    Remove {
        #[arg(long)]
        id: u64,
    },
}

#[derive(Args, Clone)]
struct RecordRef {
    #[arg(long)]
    tenant: String,
    #[arg(long)]
    collection: String,
    #[arg(long)]
    key: String,
}

#[derive(Subcommand)]
enum RecordCmd {
    /// Write a record (value from --value or --file).
    Put {
        #[command(flatten)]
        record: RecordRef,
        #[arg(long, conflicts_with = "file")]
        value: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Read a record (linearizable unless --local).
    Get {
        #[command(flatten)]
        record: RecordRef,
        /// Serve from the answering node's applied state (may be stale).
        #[arg(long)]
        local: bool,
        /// Write the value to this file instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete a record.
    Delete {
        #[command(flatten)]
        record: RecordRef,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Concurrent puts: throughput and p50/p99/max latency.
    Put {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Drive an etcd cluster at these endpoints instead (needs the etcd-bench feature).
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// CA certificate for etcd endpoints served over TLS (https://).
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    escrow::init_tracing(false);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("escrowctl: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("escrowctl: {}", format!("{e:#}").replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

fn client_config(cli: &Cli) -> anyhow::Result<ClientConfig> {
    let path = cli
        .config
        .clone()
        .unwrap_or_else(|| escrow::dev::default_dev_dir().join("escrowctl.toml"));
    if !path.exists() {
        anyhow::bail!(
            "no client config at {} (start a dev cluster with `escrowd dev`, or pass --config / set ESCROWCTL_CONFIG)",
            path.display()
        );
    }
    Ok(ClientConfig::load(&path)?)
}

fn print(json: bool, doc: serde_json::Value, human: String) {
    if json {
        println!("{doc}");
    } else {
        println!("{human}");
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = client_config(&cli)?;
    let client = EscrowClient::new(&config)?.with_deadline(Duration::from_secs(cli.timeout.max(1)));
    match &cli.command {
        Cmd::Cluster(ClusterCmd::Init) => {
            let r = client.init().await?;
            let ids: Vec<u64> = r.members.iter().map(|m| m.id).collect();
            print(
                cli.json,
                json!({ "initialized": true, "members": ids }),
                format!("cluster initialized with voters {ids:?}"),
            );
        }
        Cmd::Cluster(ClusterCmd::Status) => {
            let s = client.cluster_status().await?;
            let mut human = format!(
                "cluster {}  leader {}  term {}\n",
                s.cluster_name,
                s.leader
                    .map(|l| l.to_string())
                    .unwrap_or_else(|| "none".into()),
                s.term
            );
            for n in &s.nodes {
                human.push_str(&format!(
                    "  node {:<3} {:<22} {:<8} {:<10} applied {:<8} {}\n",
                    n.id,
                    n.addr,
                    n.role,
                    n.state,
                    n.applied_index,
                    if n.reachable {
                        "reachable".to_string()
                    } else {
                        format!("UNREACHABLE ({})", n.error.clone().unwrap_or_default())
                    }
                ));
            }
            print(
                cli.json,
                serde_json::to_value(&s)?,
                human.trim_end().to_string(),
            );
        }
        Cmd::Cluster(ClusterCmd::Add {
            id,
            raft_addr,
            client_addr,
            learner,
        }) => {
            let member = escrow::pb::Member {
                id: *id,
                raft_addr: raft_addr.clone(),
                client_addr: client_addr.clone(),
                voter: !learner,
            };
            let r = client.add_node(member, *learner).await?;
            let doc = json!({ "added": id, "members": r.members.iter().map(|m| json!({"id": m.id, "voter": m.voter})).collect::<Vec<_>>() });
            print(
                cli.json,
                doc,
                format!(
                    "node {id} added as {}",
                    if *learner { "learner" } else { "voter" }
                ),
            );
        }
        Cmd::Cluster(ClusterCmd::Remove { id }) => {
            let r = client.remove_node(*id).await?;
            let ids: Vec<u64> = r.members.iter().map(|m| m.id).collect();
            print(
                cli.json,
                json!({ "removed": id, "members": ids }),
                format!("node {id} removed; members {ids:?}"),
            );
        }
        Cmd::Record(RecordCmd::Put {
            record,
            value,
            file,
        }) => {
            let bytes = match (value, file) {
                (Some(v), None) => v.clone().into_bytes(),
                (None, Some(f)) => {
                    let meta = std::fs::metadata(f)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", f.display()))?;
                    if meta.len() > escrow::domain::VALUE_LEN_MAX as u64 {
                        anyhow::bail!(
                            "{} is {} bytes, over the record limit of {} bytes (store large files as artifacts)",
                            f.display(),
                            meta.len(),
                            escrow::domain::VALUE_LEN_MAX
                        );
                    }
                    std::fs::read(f)?
                }
                _ => anyhow::bail!("give the value with --value or --file"),
            };
            let revision = client
                .put(&record.tenant, &record.collection, &record.key, bytes)
                .await?;
            print(
                cli.json,
                json!({ "revision": revision }),
                format!("written at revision {revision}"),
            );
        }
        Cmd::Record(RecordCmd::Get { record, local, out }) => {
            let r = client
                .get(&record.tenant, &record.collection, &record.key, *local)
                .await?;
            if !r.found {
                if cli.json {
                    println!("{}", json!({ "found": false, "read_index": r.read_index }));
                    return Ok(());
                }
                anyhow::bail!(
                    "not found: {}/{}/{}",
                    record.tenant,
                    record.collection,
                    record.key
                );
            }
            if let Some(path) = out {
                std::fs::write(path, &r.value)?;
            }
            if cli.json {
                let value = String::from_utf8(r.value.clone()).ok();
                println!(
                    "{}",
                    json!({ "found": true, "revision": r.revision, "read_index": r.read_index, "size": r.value.len(), "value": value })
                );
            } else if out.is_none() {
                use std::io::Write;
                std::io::stdout().write_all(&r.value)?;
            }
        }
        Cmd::Record(RecordCmd::Delete { record }) => {
            let r = client
                .delete(&record.tenant, &record.collection, &record.key)
                .await?;
            print(
                cli.json,
                json!({ "revision": r.revision, "existed": r.existed }),
                format!(
                    "deleted at revision {} ({})",
                    r.revision,
                    if r.existed { "existed" } else { "was absent" }
                ),
            );
        }
        Cmd::Bench(BenchCmd::Put {
            clients,
            value_size,
            seconds,
            etcd,
            etcd_ca,
        }) => {
            let spec = escrow::bench::BenchSpec {
                clients: *clients,
                value_bytes: *value_size,
                duration: Duration::from_secs((*seconds).max(1)),
            };
            let report = if etcd.is_empty() {
                escrow::bench::run_escrow(&config, &spec).await?
            } else {
                let ca = match etcd_ca {
                    Some(path) => Some(
                        std::fs::read(path)
                            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
                    ),
                    None => None,
                };
                run_etcd(etcd, ca, &spec).await?
            };
            print(cli.json, serde_json::to_value(&report)?, report.line());
        }
    }
    Ok(())
}

#[cfg(feature = "etcd-bench")]
async fn run_etcd(
    endpoints: &[String],
    ca: Option<Vec<u8>>,
    spec: &escrow::bench::BenchSpec,
) -> anyhow::Result<escrow::bench::BenchReport> {
    escrow::bench::run_etcd(endpoints, ca, spec).await
}

#[cfg(not(feature = "etcd-bench"))]
async fn run_etcd(
    _: &[String],
    _: Option<Vec<u8>>,
    _: &escrow::bench::BenchSpec,
) -> anyhow::Result<escrow::bench::BenchReport> {
    anyhow::bail!("this escrowctl was built without the etcd-bench feature (scripts/bench-vs-etcd.sh builds it)")
}
