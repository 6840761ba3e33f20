//! `escrowctl`: the command line for ops, the vendor, the board and customers.
//!
//! Every command that reports something takes `--json` and then prints exactly one JSON
//! document on stdout. Exit code 0 means success; otherwise a one-line reason goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use escrow::client::{record_ref, ClientConfig, EscrowClient, TenantOp};
use serde_json::json;

/// The same allocator as the node (mimalloc): the bench and mirror agents allocate per request.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Deadline for the operation in seconds, retries included. Default: 20, and for
    /// `cluster add` the node's whole catch-up time (a learner is promoted only once it has
    /// caught up, which can take a snapshot's transfer).
    #[arg(long, global = true, value_parser = clap::value_parser!(u64).range(1..=TIMEOUT_MAX_SECS))]
    timeout: Option<u64>,
    #[command(subcommand)]
    command: Cmd,
}

/// `--timeout` when not given, except for `cluster add`.
const TIMEOUT_DEFAULT_SECS: u64 = 20;
/// The longest `--timeout` taken: a day.
const TIMEOUT_MAX_SECS: u64 = 24 * 3600;
/// `cluster add` waits the leader's catch-up limit and this much more for the promotion.
const ADD_TIMEOUT_MARGIN: Duration = Duration::from_secs(30);

#[derive(Subcommand)]
enum Cmd {
    /// Cluster operations.
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Records of a tenant collection.
    #[command(subcommand)]
    Record(RecordCmd),
    /// Artifacts: versioned files in a namespace (a tenant or "vendor").
    #[command(subcommand)]
    Artifact(ArtifactCmd),
    /// Tenants (ops): register, suspend, resume, show, list.
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Freshness of every tenant and the vendor namespace.
    Status {
        /// Serve from the answering node's applied state (may be stale).
        #[arg(long)]
        local: bool,
    },
    /// The mirror agent: keeps the escrow current from the vendor side.
    Mirror(MirrorArgs),
    /// Compare every replica's Merkle roots at a common checkpoint (exit 1 on any
    /// disagreement or an unreachable node).
    Verify {
        /// Only this tenant (or "vendor").
        #[arg(long)]
        tenant: Option<String>,
        /// Also make every node re-hash its stored records and chunks.
        #[arg(long)]
        deep: bool,
        /// Compare the escrow with the source instead: a directory (as mirrored with --dir)
        /// or a record feed file (as mirrored with --records); needs --tenant.
        #[arg(long, requires = "tenant")]
        against_source: Option<PathBuf>,
    },
    /// A signed attestation of the roots (every node signs), or check one offline.
    Attest {
        #[command(subcommand)]
        cmd: Option<AttestCmd>,
        /// Only this tenant's root.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Load generators.
    #[command(subcommand)]
    Bench(BenchCmd),
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Bootstrap the cluster with the nodes' configured initial members (3 or 5 voters); every
    /// listed node must be up and answer at its listed address as itself.
    Init,
    /// Leader, members, roles, applied indexes, reachability.
    Status,
    /// Add a node as learner, wait until it caught up, then promote it to voter. The same add
    /// for a node that is a learner already (`--learner` earlier, or an add cut short before
    /// its promotion) waits for it to catch up and promotes it.
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
    /// Read a record (linearizable unless --local): the latest version, the one at a
    /// revision, or the one as of a time.
    Get {
        #[command(flatten)]
        record: RecordRef,
        /// The version at this revision (the newest at or below it).
        #[arg(long, conflicts_with = "as_of")]
        revision: Option<u64>,
        /// The version as of this time (RFC 3339, e.g. 2026-11-22T10:00:00Z).
        #[arg(long)]
        as_of: Option<String>,
        /// Serve from the answering node's applied state (may be stale).
        #[arg(long)]
        local: bool,
        /// Write the value to this file instead of stdout (whole or not at all: written
        /// beside it, synced, then renamed over it). On stdout the value's bytes are written
        /// as stored, with a newline added only when stdout is a terminal.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete a record (a tombstone version; history is kept).
    Delete {
        #[command(flatten)]
        record: RecordRef,
    },
    /// A record's versions, newest first, deletes included.
    History {
        #[command(flatten)]
        record: RecordRef,
        /// At most this many versions.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only versions older than this revision (for paging).
        #[arg(long, default_value_t = 0)]
        before: u64,
        /// Serve from the answering node's applied state (may be stale).
        #[arg(long)]
        local: bool,
    },
}

#[derive(Subcommand)]
enum ArtifactCmd {
    /// Upload a file as a new version (only chunks the cluster lacks are sent).
    Put {
        namespace: String,
        name: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// Download a version (default: the latest), verified chunk by chunk and as a whole.
    Get {
        namespace: String,
        name: String,
        #[arg(long)]
        version: Option<u64>,
        #[arg(long)]
        out: PathBuf,
    },
    /// A namespace's artifacts with their latest versions.
    List {
        namespace: String,
        /// Include artifacts whose latest version is a delete.
        #[arg(long)]
        deleted: bool,
    },
    /// Add a delete (tombstone) version; earlier versions stay readable.
    Delete { namespace: String, name: String },
}

#[derive(Subcommand)]
enum AttestCmd {
    /// Check an attestation offline against trusted keys (no cluster needed).
    Verify {
        file: PathBuf,
        /// Trusted keys, as `escrowctl attest keys` prints them.
        #[arg(long)]
        keys: PathBuf,
        /// Accept fewer signatures than trusted keys, at least 1 (default: every trusted key
        /// must sign).
        #[arg(long)]
        min_signatures: Option<usize>,
    },
    /// Print the nodes' public keys as a trusted-keys file.
    Keys,
}

#[derive(Subcommand)]
enum TenantCmd {
    /// Register a tenant (a slug: lowercase letters, digits, '-').
    Add { tenant: String },
    /// Every tenant with its state and freshness.
    List,
    /// One tenant with its state and freshness.
    Show { tenant: String },
    /// Refuse writes into a tenant; everything held stays readable.
    Suspend { tenant: String },
    /// Accept writes into a suspended tenant again.
    Resume { tenant: String },
}

#[derive(Args)]
struct MirrorArgs {
    /// Follow a feed of change events (one JSON object per line; "-" for stdin).
    #[arg(long, requires = "tenant", conflicts_with = "dir")]
    records: Option<PathBuf>,
    /// The tenant the record feed belongs to.
    #[arg(long)]
    tenant: Option<String>,
    /// Mirror a directory tree as artifacts.
    #[arg(long, requires = "namespace")]
    dir: Option<PathBuf>,
    /// The namespace (a tenant or "vendor") for --dir.
    #[arg(long)]
    namespace: Option<String>,
    /// Name of this source stream (sequences are counted per tenant and source).
    #[arg(long, default_value = "records")]
    source: String,
    /// Where the agent checkpoints its position. Default: under $XDG_STATE_HOME (or
    /// ~/.local/state)/escrow/.
    #[arg(long)]
    state: Option<PathBuf>,
    /// Read to the end (or do one pass) and exit instead of following.
    #[arg(long)]
    once: bool,
    /// Changes per batch.
    #[arg(long, default_value_t = 512)]
    batch: usize,
    /// No progress display.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Concurrent puts: throughput and p50/p99/max latency. Against escrow it writes into
    /// tenant `bench`, registering it if missing: point it at a dev or test cluster. Fails
    /// when no put succeeded.
    Put {
        #[arg(long, default_value_t = 16)]
        clients: usize,
        #[arg(long, default_value_t = 1024)]
        value_size: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Write the byte `x` repeated instead of random bytes (how runs before 2026-11-23
        /// measured; compresses to almost nothing in the state machine).
        #[arg(long)]
        compressible: bool,
        /// Write keys no earlier run wrote (a random run prefix), so every put is a first
        /// write; by default keys repeat across runs and later runs replace earlier values.
        #[arg(long)]
        new_keys: bool,
        /// Drive an etcd cluster at these endpoints instead (needs the etcd-bench feature).
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// CA certificate for etcd endpoints served over TLS (https://).
        #[arg(long)]
        etcd_ca: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match escrow::parse_args::<Cli>("escrowctl") {
        Ok(cli) => cli,
        Err(code) => return code,
    };
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
    let result = rt.block_on(run(cli));
    // A read of stdin (a record feed from a pipe) cannot be cancelled: do not wait for it.
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
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
    if let Cmd::Attest {
        cmd:
            Some(AttestCmd::Verify {
                file,
                keys,
                min_signatures,
            }),
        ..
    } = &cli.command
    {
        // Offline: no cluster, no client config.
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("cannot read {}: {e}", p.display()))
        };
        let doc: escrow::attest::Attestation = serde_json::from_slice(&read(file)?)
            .map_err(|e| anyhow::anyhow!("{} is not an attestation: {e}", file.display()))?;
        let trusted: escrow::attest::TrustedKeys = serde_json::from_slice(&read(keys)?)
            .map_err(|e| anyhow::anyhow!("{} is not a trusted-keys file: {e}", keys.display()))?;
        escrow::attest::verify(&doc, &trusted, *min_signatures)?;
        print(
            cli.json,
            json!({ "valid": true, "index": doc.statement.index, "signatures": doc.signatures.len(), "cluster_root": doc.statement.cluster_root }),
            format!(
                "valid: {} signatures over cluster {} at index {}",
                doc.signatures.len(),
                doc.statement.cluster,
                doc.statement.index
            ),
        );
        return Ok(());
    }
    let config = client_config(&cli)?;
    let timeout = match (cli.timeout, &cli.command) {
        (Some(secs), _) => Duration::from_secs(secs),
        (None, Cmd::Cluster(ClusterCmd::Add { .. })) => {
            escrow::service::client::LEARNER_CATCH_UP_TIMEOUT + ADD_TIMEOUT_MARGIN
        }
        (None, _) => Duration::from_secs(TIMEOUT_DEFAULT_SECS),
    };
    let client = EscrowClient::new(&config)?.with_deadline(timeout);
    match &cli.command {
        Cmd::Cluster(ClusterCmd::Init) => {
            let r = client.init().await?;
            let ids: Vec<u64> = r.members.iter().map(|m| m.id).collect();
            print(
                cli.json,
                json!({ "initialized": true, "members": members_json(&r.members) }),
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
                let refused = if n.role == "voter" {
                    ": writes refused"
                } else {
                    ""
                };
                let disk = match (n.disk_free_bytes, n.disk_reserve_bytes) {
                    (Some(free), Some(reserve)) if free < reserve => format!(
                        "  disk {} free, UNDER ITS RESERVE of {}{refused}",
                        gib(free),
                        gib(reserve),
                    ),
                    (Some(free), _) => format!("  disk {} free", gib(free)),
                    (None, Some(reserve)) if reserve > 0 => {
                        format!("  disk UNREADABLE{refused}")
                    }
                    _ => String::new(),
                };
                human.push_str(&format!(
                    "  node {:<3} {:<22} {:<8} {:<10} applied {:<8} {}{disk}\n",
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
            let doc = json!({ "added": id, "members": members_json(&r.members) });
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
                json!({ "removed": id, "members": members_json(&r.members) }),
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
        Cmd::Record(RecordCmd::Get {
            record,
            local,
            out,
            revision,
            as_of,
        }) => {
            let as_of_ms = match as_of {
                Some(t) => escrow::domain::parse_rfc3339_ms(t)
                    .map_err(|e| anyhow::anyhow!("--as-of {e}"))?,
                None => 0,
            };
            let r = client
                .get_at(
                    record_ref(&record.tenant, &record.collection, &record.key),
                    *local,
                    revision.unwrap_or(0),
                    as_of_ms,
                )
                .await?;
            if !r.found {
                if cli.json {
                    println!(
                        "{}",
                        json!({ "found": false, "deleted": r.deleted, "revision": r.revision, "read_index": r.read_index })
                    );
                    // And exit 1 with the reason, as without --json.
                }
                anyhow::bail!(
                    "not found: {}/{}/{}{}",
                    record.tenant,
                    record.collection,
                    record.key,
                    if r.deleted {
                        format!(" (deleted at revision {})", r.revision)
                    } else {
                        String::new()
                    }
                );
            }
            if let Some(path) = out {
                // Whole or not at all: a reader of `path` never sees part of the value.
                escrow::store::write_atomically(path, &r.value)
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
            }
            if cli.json {
                let mut doc = json!({ "found": true, "revision": r.revision, "time": format_ms(r.time_ms), "time_ms": r.time_ms, "read_index": r.read_index, "size": r.value.len() });
                add_value_json(&mut doc, &r.value);
                println!("{doc}");
            } else if out.is_none() {
                use std::io::{IsTerminal, Write};
                let mut stdout = std::io::stdout().lock();
                stdout.write_all(&r.value)?;
                // The bytes exactly as stored when piped; in a terminal, the prompt on a line
                // of its own.
                if stdout.is_terminal() && !r.value.ends_with(b"\n") {
                    stdout.write_all(b"\n")?;
                }
                stdout.flush()?;
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
        Cmd::Record(RecordCmd::History {
            record,
            limit,
            before,
            local,
        }) => {
            let r = client
                .history(
                    record_ref(&record.tenant, &record.collection, &record.key),
                    *local,
                    (*before != 0).then_some((*before, 0)),
                    *limit,
                )
                .await?;
            let versions: Vec<_> = r
                .versions
                .iter()
                .map(|v| {
                    let mut doc = json!({
                        "revision": v.revision,
                        "time": format_ms(v.time_ms),
                        "time_ms": v.time_ms,
                        "deleted": v.deleted,
                        "size": v.value.len(),
                        "value": null,
                    });
                    if !v.deleted {
                        add_value_json(&mut doc, &v.value);
                    }
                    doc
                })
                .collect();
            let human = r
                .versions
                .iter()
                .map(|v| {
                    format!(
                        "revision {:<10} {}  {}",
                        v.revision,
                        format_ms(v.time_ms),
                        if v.deleted {
                            "deleted".to_string()
                        } else {
                            format!("{} bytes", v.value.len())
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                cli.json,
                json!({ "versions": versions, "read_index": r.read_index }),
                if human.is_empty() {
                    "no versions".into()
                } else {
                    human
                },
            );
        }
        Cmd::Tenant(TenantCmd::List) => {
            let r = client.tenants(false).await?;
            let docs: Vec<_> = r.tenants.iter().map(tenant_json).collect();
            let human = r
                .tenants
                .iter()
                .chain(r.vendor.iter())
                .map(tenant_line)
                .collect::<Vec<_>>()
                .join("\n");
            print(
                cli.json,
                json!({ "tenants": docs, "read_index": r.read_index }),
                human,
            );
        }
        Cmd::Tenant(cmd) => {
            let (op, tenant) = match cmd {
                TenantCmd::Add { tenant } => (TenantOp::Add, tenant),
                TenantCmd::Show { tenant } => (TenantOp::Show, tenant),
                TenantCmd::Suspend { tenant } => (TenantOp::Suspend, tenant),
                TenantCmd::Resume { tenant } => (TenantOp::Resume, tenant),
                TenantCmd::List => unreachable!("handled above"),
            };
            let t = client.tenant(op, tenant).await?;
            print(cli.json, tenant_json(&t), tenant_line(&t));
        }
        Cmd::Status { local } => {
            let r = client.tenants(*local).await?;
            let all: Vec<&escrow::pb::Tenant> = r.tenants.iter().chain(r.vendor.iter()).collect();
            let stale: Vec<&str> = all
                .iter()
                .filter(|t| t.state != "suspended" && t.freshness.as_ref().is_some_and(|f| f.stale))
                .map(|t| t.id.as_str())
                .collect();
            let doc = json!({
                "namespaces": all.iter().map(|t| tenant_json(t)).collect::<Vec<_>>(),
                "stale": stale,
                "stale_after_s": r.stale_after_s,
                "read_index": r.read_index,
            });
            let mut human = all
                .iter()
                .map(|t| tenant_line(t))
                .collect::<Vec<_>>()
                .join("\n");
            if !stale.is_empty() {
                human.push_str(&format!(
                    "\nWARNING: silent for more than {}s: {}",
                    r.stale_after_s,
                    stale.join(", ")
                ));
            }
            print(cli.json, doc, human);
        }
        Cmd::Mirror(args) => mirror(&client, args, cli.json).await?,
        Cmd::Verify {
            tenant,
            against_source: Some(source),
            ..
        } => {
            let tenant = tenant.clone().unwrap_or_default();
            escrow::domain::TenantId::parse(&tenant)?;
            let (tenant_for, source_path) = (tenant.clone(), source.clone());
            let (source_root, source_leaves) = tokio::task::spawn_blocking(move || {
                if source_path.is_dir() {
                    escrow::verify::source_root_of_dir(&tenant_for, &source_path)
                } else {
                    escrow::verify::source_root_of_feed(&tenant_for, &source_path)
                }
            })
            .await?
            .map_err(|e| anyhow::anyhow!(e))?;
            let report = escrow::verify::verify(&client, Some(&tenant), false).await?;
            let empty = escrow::domain::hex(&escrow::integrity::namespace_root(
                &tenant,
                &Default::default(),
            ));
            let escrow_root = report.roots.get(&tenant).cloned().unwrap_or(empty);
            let source_root = escrow::domain::hex(&source_root);
            let equal = source_root == escrow_root && report.ok;
            print(
                cli.json,
                json!({ "tenant": tenant, "index": report.index, "source_root": source_root, "source_leaves": source_leaves, "escrow_root": escrow_root, "equal": equal, "replicas_agree": report.ok }),
                format!(
                    "{tenant}: source root {source_root} ({source_leaves} objects), escrow root {escrow_root} at index {}: {}",
                    report.index,
                    if equal { "EQUAL" } else { "DIFFERENT" }
                ),
            );
            if !equal {
                anyhow::bail!(
                    "the escrow of {tenant} does not equal the source{}",
                    if report.ok {
                        ""
                    } else {
                        " (and the replicas disagree)"
                    }
                );
            }
        }
        Cmd::Verify { tenant, deep, .. } => {
            let report = escrow::verify::verify(&client, tenant.as_deref(), *deep).await?;
            let mut human = format!(
                "checkpoint {}: {} nodes checked, {} namespaces",
                report.index,
                report.nodes_checked.len(),
                report.roots.len()
            );
            for d in &report.deep {
                human.push_str(&format!(
                    "\n  node {}: re-hashed {} chunks, {} bytes in {:.2}s",
                    d.node, d.chunks_checked, d.bytes_hashed, d.seconds
                ));
            }
            for d in &report.disagreements {
                human.push_str(&format!(
                    "\n  DISAGREES node {} {} {}: expected {} found {}",
                    d.node, d.namespace, d.object, d.expected, d.found
                ));
            }
            for u in &report.unchecked {
                human.push_str(&format!("\n  UNCHECKED node {}: {}", u.node, u.error));
            }
            print(cli.json, serde_json::to_value(&report)?, human);
            if !report.ok {
                anyhow::bail!(
                    "verification failed: {} disagreements, {} nodes could not be checked",
                    report.disagreements.len(),
                    report.unchecked.len()
                );
            }
        }
        Cmd::Attest {
            cmd: Some(AttestCmd::Keys),
            ..
        } => {
            let keys = escrow::verify::trusted_keys(&client).await?;
            println!("{}", serde_json::to_string_pretty(&keys)?);
        }
        Cmd::Attest {
            cmd: Some(AttestCmd::Verify { .. }),
            ..
        } => unreachable!("handled before connecting"),
        Cmd::Attest { cmd: None, tenant } => {
            if let Some(t) = tenant {
                escrow::domain::TenantId::parse(t)?;
            }
            let (doc, unchecked) = escrow::verify::attest(&client, tenant.as_deref())
                .await
                .map_err(|e| anyhow::anyhow!(e))?;
            for u in &unchecked {
                eprintln!("escrowctl: node {} did not sign: {}", u.node, u.error);
            }
            // The document is JSON in both modes: it is meant to be kept and checked.
            if cli.json {
                println!("{}", serde_json::to_string(&doc)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            }
        }
        Cmd::Artifact(ArtifactCmd::Put {
            namespace,
            name,
            file,
        }) => {
            let r = escrow::mirror::artifacts::upload_file(&client, namespace, name, file).await?;
            print(
                cli.json,
                serde_json::to_value(&r)?,
                format!(
                    "{namespace}/{name} version {}{}: {} bytes, {} of {} chunks sent ({} bytes)",
                    r.version,
                    if r.changed { "" } else { " (unchanged)" },
                    r.size,
                    r.chunks_sent,
                    r.chunks,
                    r.bytes_sent
                ),
            );
        }
        Cmd::Artifact(ArtifactCmd::Get {
            namespace,
            name,
            version,
            out,
        }) => {
            let r = escrow::mirror::artifacts::download_file(
                &client,
                namespace,
                name,
                version.unwrap_or(0),
                out,
            )
            .await?;
            print(
                cli.json,
                serde_json::to_value(&r)?,
                format!(
                    "{namespace}/{name} version {} → {} ({} bytes, blake3 {} verified)",
                    r.version,
                    out.display(),
                    r.size,
                    r.blake3
                ),
            );
        }
        Cmd::Artifact(ArtifactCmd::List { namespace, deleted }) => {
            let list = client.list_artifacts(namespace, *deleted).await?;
            let docs: Vec<_> = list
                .iter()
                .map(|a| {
                    let m = a.manifest.clone().unwrap_or_default();
                    json!({
                        "name": a.name,
                        "version": a.version,
                        "revision": a.revision,
                        "time": format_ms(a.time_ms),
                        "deleted": a.deleted,
                        "size": m.size,
                        "blake3": if a.deleted { String::new() } else { escrow::domain::hex_wire(&m.blake3) },
                    })
                })
                .collect();
            let human = list
                .iter()
                .map(|a| {
                    format!(
                        "{:<50} v{:<5} {:>14} {}",
                        a.name,
                        a.version,
                        if a.deleted {
                            "deleted".to_string()
                        } else {
                            format!("{} B", a.manifest.as_ref().map_or(0, |m| m.size))
                        },
                        format_ms(a.time_ms)
                    )
                })
                .collect::<Vec<_>>()
                .join("\n");
            print(
                cli.json,
                json!({ "namespace": namespace, "artifacts": docs }),
                human,
            );
        }
        Cmd::Artifact(ArtifactCmd::Delete { namespace, name }) => {
            let r = client.delete_artifact(namespace, name).await?;
            print(
                cli.json,
                json!({ "version": r.version, "changed": r.changed }),
                format!("{namespace}/{name} deleted as version {}", r.version),
            );
        }
        Cmd::Bench(BenchCmd::Put {
            clients,
            value_size,
            seconds,
            compressible,
            new_keys,
            etcd,
            etcd_ca,
        }) => {
            let spec = escrow::bench::BenchSpec {
                clients: *clients,
                value_bytes: *value_size,
                duration: Duration::from_secs(*seconds),
                compressible: *compressible,
                new_keys: *new_keys,
            };
            let report = if etcd.is_empty() {
                escrow::bench::run_escrow(&config, &spec, timeout).await?
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
            // Figures with a few failed puts are still figures (counted in `errors`); a run in
            // which no put succeeded measured nothing.
            if report.ops == 0 {
                anyhow::bail!(
                    "no put succeeded ({} failed): check the cluster with `escrowctl cluster status`",
                    report.errors
                );
            }
            if report.errors > 0 {
                eprintln!(
                    "escrowctl: warning: {} of {} puts failed",
                    report.errors,
                    report.errors + report.ops
                );
            }
        }
    }
    Ok(())
}

/// A record value in a JSON document: `value` as text when it is UTF-8; otherwise `value` is
/// null and `value_hex` holds the bytes.
fn add_value_json(doc: &mut serde_json::Value, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => doc["value"] = json!(text),
        Err(_) => {
            doc["value"] = serde_json::Value::Null;
            doc["value_hex"] = json!(escrow::domain::hex_bytes(bytes));
        }
    }
}

/// Bytes as GiB with one decimal, for people.
fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// A membership as `cluster init`, `add` and `remove` print it: `[{"id", "voter"}]`.
fn members_json(members: &[escrow::pb::Member]) -> Vec<serde_json::Value> {
    members
        .iter()
        .map(|m| json!({ "id": m.id, "voter": m.voter }))
        .collect()
}

/// ms since the Unix epoch as RFC 3339 text ("never" for 0).
fn format_ms(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

fn tenant_json(t: &escrow::pb::Tenant) -> serde_json::Value {
    let f = t.freshness.unwrap_or_default();
    json!({
        "id": t.id,
        "state": t.state,
        "created_index": t.created_index,
        "records": f.records,
        "record_bytes": f.record_bytes,
        "versions": f.versions,
        "last_source": format_ms(f.last_source_ms),
        "last_source_ms": f.last_source_ms,
        "last_commit": format_ms(f.last_commit_ms),
        "last_commit_ms": f.last_commit_ms,
        "lag_ms": f.lag_ms,
        "silent_ms": f.silent_ms,
        "stale": f.stale,
    })
}

fn tenant_line(t: &escrow::pb::Tenant) -> String {
    let f = t.freshness.unwrap_or_default();
    format!(
        "{:<20} {:<9} records {:<8} bytes {:<12} last source {}  lag {} ms{}",
        t.id,
        t.state,
        f.records,
        f.record_bytes,
        format_ms(f.last_source_ms),
        f.lag_ms,
        if f.stale { "  STALE" } else { "" }
    )
}

/// The default state file of a feed: one per tenant and source.
fn default_state_file(tenant: &str, source: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("escrow")
        .join(format!("mirror-records-{tenant}-{source}.json"))
}

struct Bar(indicatif::ProgressBar);

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

impl escrow::mirror::records::Progress for Bar {
    fn update(&self, r: &escrow::mirror::records::FeedReport) {
        self.0.set_message(format!(
            "{} lines, {} applied, {} duplicates, position {}",
            r.lines, r.applied, r.duplicates, r.position
        ));
        self.0.tick();
    }
}

async fn mirror(client: &EscrowClient, args: &MirrorArgs, json_out: bool) -> anyhow::Result<()> {
    use escrow::mirror::records::{run_feed, FeedOptions, Progress};
    use std::io::IsTerminal;
    if let Some(dir) = &args.dir {
        return mirror_dir(client, args, dir, json_out).await;
    }
    let Some(feed) = &args.records else {
        anyhow::bail!("give --records FILE|- --tenant T (or --dir DIR --namespace NS)");
    };
    let tenant = args.tenant.clone().unwrap_or_default();
    escrow::domain::TenantId::parse(&tenant)?;
    escrow::domain::SourceId::parse(&args.source)?;
    let options = FeedOptions {
        feed: (feed.as_os_str() != "-").then(|| feed.clone()),
        state_file: args
            .state
            .clone()
            .unwrap_or_else(|| default_state_file(&tenant, &args.source)),
        tenant,
        source: args.source.clone(),
        once: args.once,
        batch_changes: args.batch,
    };
    let show_bar = !args.quiet && !json_out && std::io::stderr().is_terminal();
    let bar: Box<dyn Progress> = if show_bar {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(Duration::from_millis(200));
        Box::new(Bar(pb))
    } else {
        Box::new(())
    };
    let report = run_feed(client, &options, bar.as_ref(), stop_signal()).await?;
    drop(bar);
    print(
        json_out,
        serde_json::to_value(&report)?,
        format!(
            "{} lines read, {} changes applied, {} duplicates skipped, position {}",
            report.lines, report.applied, report.duplicates, report.position
        ),
    );
    Ok(())
}

struct DirBar(indicatif::ProgressBar);

impl escrow::mirror::dir::DirProgress for DirBar {
    fn pass_started(&self, _files: u64, bytes: u64) {
        self.0.set_length(bytes);
        self.0.set_position(0);
    }
    fn file_done(&self, bytes: u64) {
        self.0.inc(bytes);
    }
}

impl Drop for DirBar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

async fn stop_signal() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn mirror_dir(
    client: &EscrowClient,
    args: &MirrorArgs,
    dir: &std::path::Path,
    json_out: bool,
) -> anyhow::Result<()> {
    use escrow::mirror::dir::{run_dir, DirOptions, DirProgress};
    use std::io::IsTerminal;
    let namespace = args.namespace.clone().unwrap_or_default();
    escrow::domain::TenantId::parse(&namespace)?;
    let root = std::fs::canonicalize(dir)
        .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", dir.display()))?;
    let state_file = args.state.clone().unwrap_or_else(|| {
        let key = blake3::hash(root.to_string_lossy().as_bytes()).to_hex();
        default_state_file(&namespace, &format!("dir-{}", &key[..16]))
    });
    let options = DirOptions {
        root,
        namespace,
        state_file,
        once: args.once,
        rescan: escrow::mirror::dir::RESCAN_DEFAULT,
    };
    let show_bar = !args.quiet && !json_out && std::io::stderr().is_terminal();
    let bar: Box<dyn DirProgress> = if show_bar {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {bytes}/{total_bytes} {bytes_per_sec} {wide_bar} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Box::new(DirBar(pb))
    } else {
        Box::new(())
    };
    let report = run_dir(client, &options, bar.as_ref(), stop_signal())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    drop(bar);
    for s in &report.skipped {
        if !json_out {
            eprintln!("skipped {}: {}", s.path, s.reason);
        }
    }
    print(
        json_out,
        serde_json::to_value(&report)?,
        format!(
            "{}{} files ({} bytes): {} new versions, {} unchanged, {} deleted; sent {} chunks ({} bytes); {} skipped, {} failed",
            if report.stopped {
                "stopped before the pass finished (the next run goes on): "
            } else {
                ""
            },
            report.files,
            report.bytes,
            report.uploaded,
            report.unchanged,
            report.deleted,
            report.chunks_sent,
            report.bytes_sent,
            report.skipped.len(),
            report.failed.len()
        ),
    );
    if let Some(f) = report.failed.first() {
        anyhow::bail!(
            "{} files could not be mirrored; first: {}: {}",
            report.failed.len(),
            f.path,
            f.reason
        );
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
