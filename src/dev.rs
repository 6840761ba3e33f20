//! The embedded default: a local cluster on loopback with generated dev PKI and credentials.
//! The same file generation serves the tests (with free ports) and `escrowd pki`.
//!
//! Layout of a dev dir:
//! ```text
//! escrowctl.toml               endpoints, CA and token for escrowctl
//! pki/ca.pem, pki/ca.key       the dev cluster CA (key 0600)
//! pki/node<N>.pem, .key        node certificates (SAN: 127.0.0.1, localhost)
//! secrets/ops.token            the ops credential (0600)
//! secrets/metrics.token        reads /metrics and nothing else (0600)
//! node<N>/escrowd.toml         node configs; node<N>/data is the node's data dir
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::client::ClientConfig;
use crate::config::{
    Advertise, AuthFiles, Config, InitialMember, Listen, LogFormat, RaftSettings, StorageSettings,
    TlsFiles,
};
use crate::node::NodeHandle;
use crate::pki::Ca;
use crate::raft::network::Faults;

/// First port of the dev range; node N uses `DEV_PORT_BASE + 10·N + {0: client, 1: raft, 2: http}`
/// (7410-7412 for node 1, 7420-7422 for node 2, ...). All on 127.0.0.1.
pub const DEV_PORT_BASE: u16 = 7400;
/// Largest dev cluster.
pub const DEV_NODES_MAX: usize = 5;
/// How long `escrowd dev` waits for a leader after start.
const DEV_LEADER_WAIT: Duration = Duration::from_secs(30);

/// Ports of one node.
#[derive(Debug, Clone, Copy)]
pub struct NodePorts {
    pub client: u16,
    pub raft: u16,
    pub http: u16,
}

impl NodePorts {
    pub fn dev(port_base: u16, id: u64) -> Self {
        let base = port_base + 10 * id as u16;
        Self {
            client: base,
            raft: base + 1,
            http: base + 2,
        }
    }
}

/// Files written for a cluster.
#[derive(Debug, Clone)]
pub struct ClusterFiles {
    pub dir: PathBuf,
    pub node_configs: Vec<PathBuf>,
    pub client_config: PathBuf,
}

/// The default dev dir: `$ESCROW_DEV_DIR`, else `$XDG_DATA_HOME/escrow/dev`, else
/// `~/.local/share/escrow/dev`.
pub fn default_dev_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("ESCROW_DEV_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(d).join("escrow/dev");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/escrow/dev")
}

fn ensure_ca(dir: &Path) -> anyhow::Result<Ca> {
    let pki = dir.join("pki");
    std::fs::create_dir_all(&pki)?;
    let (cert, key) = (pki.join("ca.pem"), pki.join("ca.key"));
    if cert.exists() && key.exists() {
        return Ok(Ca::load(&cert, &key)?);
    }
    let ca = Ca::generate()?;
    ca.write(&cert, &key)?;
    Ok(ca)
}

/// `dir/secrets/NAME`, a new random token (0600) unless it exists.
fn ensure_token(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let secrets = dir.join("secrets");
    std::fs::create_dir_all(&secrets)?;
    let path = secrets.join(name);
    crate::pki::write_token_unless_present(&path)?;
    Ok(path)
}

/// A dev node's `storage.reserve_bytes`: smaller than a production node's, as a developer's
/// disk often has less to spare, and all dev nodes share it.
pub const DEV_STORAGE_RESERVE_BYTES: u64 = 256 << 20;

/// Writes certificates and the config of node `id` (listening on 127.0.0.1) into `dir`.
pub fn write_node_files(
    dir: &Path,
    id: u64,
    ports: NodePorts,
    initial: &[InitialMember],
    raft: &RaftSettings,
) -> anyhow::Result<PathBuf> {
    let ca = ensure_ca(dir)?;
    let token = ensure_token(dir, "ops.token")?;
    let metrics_token = ensure_token(dir, "metrics.token")?;
    let pki = dir.join("pki");
    let (cert, key) = (
        pki.join(format!("node{id}.pem")),
        pki.join(format!("node{id}.key")),
    );
    if !cert.exists() || !key.exists() {
        ca.issue_to_files(
            &format!("escrow node {id}"),
            &["127.0.0.1".into(), "localhost".into()],
            &cert,
            &key,
        )?;
    }
    let node_dir = dir.join(format!("node{id}"));
    std::fs::create_dir_all(&node_dir)?;
    let ip = "127.0.0.1";
    let config = Config {
        node_id: id,
        cluster_name: "escrow-dev".into(),
        data_dir: node_dir.join("data"),
        listen: Listen {
            client: format!("{ip}:{}", ports.client).parse()?,
            raft: format!("{ip}:{}", ports.raft).parse()?,
            http: format!("{ip}:{}", ports.http).parse()?,
        },
        advertise: Advertise {
            client: format!("{ip}:{}", ports.client),
            raft: format!("{ip}:{}", ports.raft),
        },
        tls: TlsFiles {
            ca: pki.join("ca.pem"),
            cert,
            key,
        },
        auth: AuthFiles {
            ops_token_file: token,
            metrics_token_file: Some(metrics_token),
        },
        initial_members: initial.to_vec(),
        raft: raft.clone(),
        mirror: Default::default(),
        integrity: Default::default(),
        storage: StorageSettings {
            reserve_bytes: DEV_STORAGE_RESERVE_BYTES,
        },
        log_format: LogFormat::Human,
    };
    let path = node_dir.join("escrowd.toml");
    config.validate(&path)?;
    std::fs::write(&path, toml::to_string_pretty(&config)?)?;
    Ok(path)
}

/// Writes a whole cluster's files: CA, node certificates, token, node configs, escrowctl.toml.
/// Existing CA, certificates and token are kept, so a dev dir survives restarts.
pub fn write_cluster_files(
    dir: &Path,
    ports: &[NodePorts],
    raft: &RaftSettings,
) -> anyhow::Result<ClusterFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let initial: Vec<InitialMember> = ports
        .iter()
        .enumerate()
        .map(|(i, p)| InitialMember {
            id: i as u64 + 1,
            raft: format!("127.0.0.1:{}", p.raft),
            client: format!("127.0.0.1:{}", p.client),
        })
        .collect();
    let mut node_configs = Vec::new();
    for (i, p) in ports.iter().enumerate() {
        node_configs.push(write_node_files(&dir, i as u64 + 1, *p, &initial, raft)?);
    }
    let client = ClientConfig {
        endpoints: initial.iter().map(|m| m.client.clone()).collect(),
        ca: dir.join("pki/ca.pem"),
        token_file: dir.join("secrets/ops.token"),
    };
    let client_config = dir.join("escrowctl.toml");
    std::fs::write(&client_config, toml::to_string_pretty(&client)?)?;
    Ok(ClusterFiles {
        dir,
        node_configs,
        client_config,
    })
}

/// Starts every node of `files` in this process.
pub async fn start_nodes(
    files: &ClusterFiles,
    faults: Arc<Faults>,
) -> anyhow::Result<Vec<NodeHandle>> {
    let mut nodes = Vec::new();
    for path in &files.node_configs {
        let config = Config::load(path)?;
        nodes.push(crate::node::start(&config, faults.clone()).await?);
    }
    Ok(nodes)
}

/// The file in a dev dir recording the node count and port base it was created with.
const LAYOUT_FILE: &str = "dev-layout";

/// A dev dir's cluster keeps its members' addresses in its Raft membership, so it must be
/// started with the node count and port base it was created with: other ports would leave the
/// nodes dialling addresses nobody listens on, and more nodes would start outside the cluster.
/// Refuses a start with others than those recorded ([`record_layout`]), naming them.
fn check_layout(dir: &Path, nodes: usize, port_base: u16) -> anyhow::Result<()> {
    let path = dir.join(LAYOUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(recorded) if recorded == layout(nodes, port_base) => Ok(()),
        Ok(recorded) => anyhow::bail!(
            "{} was created with {}; start it with the same --nodes and --port-base, or use another --dir",
            dir.display(),
            recorded.trim().replace('\n', ", ")
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn layout(nodes: usize, port_base: u16) -> String {
    format!("nodes = {nodes}\nport_base = {port_base}\n")
}

/// Records the layout of a cluster that came up, at every start (a first start that failed,
/// say on a busy port, leaves the dir free to start with others).
fn record_layout(dir: &Path, nodes: usize, port_base: u16) -> anyhow::Result<()> {
    let path = dir.join(LAYOUT_FILE);
    crate::store::write_atomically(&path, layout(nodes, port_base).as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// `escrowd dev`: prepare the dir, start the nodes, bootstrap on first start, serve until
/// Ctrl-C, then stop cleanly.
pub async fn run(dir: &Path, nodes: usize, port_base: u16) -> anyhow::Result<()> {
    if !(1..=DEV_NODES_MAX).contains(&nodes) || nodes.is_multiple_of(2) {
        anyhow::bail!("--nodes must be 1, 3 or 5 (an odd number up to {DEV_NODES_MAX})");
    }
    if port_base < 1024 || port_base > 65535 - 10 * (DEV_NODES_MAX as u16 + 1) {
        anyhow::bail!(
            "--port-base must be from 1024 to {}",
            65535 - 10 * (DEV_NODES_MAX as u16 + 1)
        );
    }
    check_layout(dir, nodes, port_base)?;
    let ports: Vec<NodePorts> = (1..=nodes as u64)
        .map(|id| NodePorts::dev(port_base, id))
        .collect();
    let files = write_cluster_files(dir, &ports, &RaftSettings::default())?;
    let handles = start_nodes(&files, Arc::new(Faults::default())).await?;
    record_layout(&files.dir, nodes, port_base)?;
    let first = &handles[0];
    let initialized = first.raft.is_initialized().await?;
    if !initialized {
        let members: std::collections::BTreeMap<_, _> =
            first.core.initial_members.iter().cloned().collect();
        first
            .raft
            .initialize(members)
            .await
            .context("bootstrapping the dev cluster")?;
        tracing::info!(nodes, "dev cluster bootstrapped");
    }
    let leader = first
        .raft
        .wait(Some(DEV_LEADER_WAIT))
        .metrics(|m| m.current_leader.is_some(), "leader elected")
        .await
        .map(|m| m.current_leader)
        .ok()
        .flatten();
    match leader {
        Some(id) => println!("escrow dev cluster is up: {nodes} node(s), leader node {id}"),
        None => println!(
            "escrow dev cluster is up: {nodes} node(s), no leader yet after {}s (see the log; `escrowctl cluster status` shows when one is elected)",
            DEV_LEADER_WAIT.as_secs()
        ),
    }
    println!("  data and config: {}", files.dir.display());
    for h in &handles {
        println!(
            "  node {}: client https://{}  peer https://{} (mTLS)  metrics https://{}/metrics",
            h.id, h.client_addr, h.raft_addr, h.http_addr
        );
    }
    println!(
        "  escrowctl: export ESCROWCTL_CONFIG={}",
        files.client_config.display()
    );
    println!("             escrowctl cluster status");
    println!("             escrowctl tenant add acme");
    println!("             escrowctl record put --tenant acme --collection orders --key o-1 --value hello");
    println!(
        "  metrics: curl --cacert {} -H \"Authorization: Bearer $(cat {})\" https://{}/metrics",
        files.dir.join("pki/ca.pem").display(),
        files.dir.join("secrets/metrics.token").display(),
        handles
            .first()
            .map(|h| h.http_addr.to_string())
            .unwrap_or_default()
    );
    println!("Ctrl-C stops the cluster; its data is kept for the next start.");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
        _ = term.recv() => {}
    }
    println!("stopping…");
    for h in handles {
        h.shutdown().await;
    }
    println!("stopped; data kept in {}", files.dir.display());
    Ok(())
}
