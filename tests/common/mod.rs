//! Shared test harness: clusters of real nodes on loopback with a test CA, either in-process
//! (real RocksDB, real TLS, real gRPC sockets) or as `escrowd` processes.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use escrow::client::{ClientConfig, EscrowClient};
use escrow::config::{Config, RaftSettings};
use escrow::dev::{ClusterFiles, NodePorts};
use escrow::node::NodeHandle;
use escrow::raft::network::Faults;

/// The live record `acme/<collection>/<key>` as `node` has applied it (a local read, no
/// Raft): its revision and value, `None` if absent or deleted.
pub fn local_record(node: &NodeHandle, collection: &str, key: &str) -> Option<(u64, Vec<u8>)> {
    let path = escrow::domain::RecordPath::parse("acme", collection, key).unwrap();
    let v = node.core.reader.get_record(&path).unwrap()?;
    Some((v.revision, v.value?))
}

/// Deterministic pseudo-random bytes (blake3 in XOF mode), fast enough for large files.
pub fn random_bytes(seed: &str, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(seed.as_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// The tenant the test clusters register at start.
pub const TENANT: &str = "acme";

/// Uploads `bytes` as the artifact `vendor/{name}` (through a file in `dir`) and returns the
/// hashes of its chunks, in order.
pub async fn upload_vendor_artifact(
    client: &EscrowClient,
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Vec<[u8; 32]> {
    let file = dir.join(name);
    std::fs::write(&file, bytes).unwrap();
    escrow::mirror::artifacts::upload_file(client, "vendor", name, &file)
        .await
        .unwrap();
    let version = client.artifact("vendor", name, 0).await.unwrap();
    version
        .manifest
        .unwrap()
        .chunks
        .iter()
        .map(|c| c.hash.as_slice().try_into().unwrap())
        .collect()
}

/// `msg` as a request carrying `authorization: Bearer {token}`, for raw gRPC clients.
pub fn with_bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// Registers a tenant (it must not exist yet).
pub async fn add_tenant(client: &EscrowClient, tenant: &str) {
    client
        .tenant(escrow::client::TenantOp::Add, tenant)
        .await
        .unwrap_or_else(|e| panic!("add tenant {tenant}: {e}"));
}

/// A source stream's applied position in the cluster.
pub async fn source_position(client: &EscrowClient, tenant: &str, source: &str) -> u64 {
    client
        .source_position(tenant, source)
        .await
        .unwrap()
        .position
}

/// Upper bound for any "wait until" in tests: far above normal, so a failure means a bug.
pub const WAIT: Duration = Duration::from_secs(60);

pub fn init_logs() {
    escrow::init_tracing_with(false, "warn,openraft=off");
}

/// Ports tests listen on: below Linux's ephemeral range (32768+), so an outgoing connection
/// (whose source port the kernel takes from that range) can never grab a port between the
/// check here and the node binding it.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// The next unused offset into [`TEST_PORTS`] for this test binary (starting at a random
/// point, so parallel binaries do not walk the same ports). Ports handed out are never handed
/// out again by this binary, even after their listener closed.
fn take_ports(n: u16) -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = TEST_PORTS.end - TEST_PORTS.start;
    let _ = NEXT.compare_exchange(
        0,
        (std::process::id() as u16).wrapping_mul(7919) % (span / 2) + 1,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    let offset = NEXT.fetch_add(n, Ordering::SeqCst) % (span - n);
    TEST_PORTS.start + offset
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Picks `n` distinct free loopback ports.
pub fn free_ports(n: usize) -> Vec<u16> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let port = take_ports(1);
        if bindable(port) {
            out.push(port);
        }
    }
    out
}

/// Reserves `n` consecutive free ports and returns the first.
pub fn free_port_block(n: u16) -> u16 {
    loop {
        let start = take_ports(n);
        if (start..start + n).all(bindable) {
            return start;
        }
    }
}

pub fn node_ports(n: usize) -> Vec<NodePorts> {
    let p = free_ports(3 * n);
    (0..n)
        .map(|i| NodePorts {
            client: p[3 * i],
            raft: p[3 * i + 1],
            http: p[3 * i + 2],
        })
        .collect()
}

/// Raft timing for tests: the defaults, which hold up on a loaded 2-core machine.
pub fn test_raft() -> RaftSettings {
    RaftSettings::default()
}

/// Polls `f` until it returns `Some`, or panics with `what` after [`WAIT`].
pub async fn wait_for<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if started.elapsed() > WAIT {
            panic!("timed out after {WAIT:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `storage.reserve_bytes` of test nodes: the guard is on, but a test machine with little
/// disk to spare still runs these clusters (`escrowd dev`'s 256 MiB would refuse every write
/// there; t71, which starts `escrowd dev` itself, keeps that).
pub const TEST_DISK_RESERVE_BYTES: u64 = 16 << 20;

/// A dev cluster's files for `n` nodes on free ports, with the test disk reserve.
fn cluster_files(dir: &Path, n: usize, raft: &RaftSettings) -> ClusterFiles {
    let files = escrow::dev::write_cluster_files(dir, &node_ports(n), raft).unwrap();
    for path in &files.node_configs {
        edit_config(path, |c| c.storage.reserve_bytes = TEST_DISK_RESERVE_BYTES);
    }
    files
}

/// Loads the node config at `path`, changes it with `edit` and writes it back.
fn edit_config(path: &Path, edit: impl FnOnce(&mut Config)) {
    let mut config = Config::load(path).unwrap();
    edit(&mut config);
    std::fs::write(path, toml::to_string(&config).unwrap()).unwrap();
}

/// An in-process cluster: every node has its own RocksDB, TLS listeners and sockets.
pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub files: ClusterFiles,
    pub nodes: Vec<Option<NodeHandle>>,
    pub faults: Arc<Faults>,
}

impl TestCluster {
    /// Writes files for `n` nodes and starts them (not yet initialized).
    pub async fn start(n: usize, raft: RaftSettings) -> Self {
        init_logs();
        let dir = tempfile::tempdir().unwrap();
        let files = cluster_files(dir.path(), n, &raft);
        let faults = Arc::new(Faults::default());
        let nodes = escrow::dev::start_nodes(&files, faults.clone())
            .await
            .unwrap()
            .into_iter()
            .map(Some)
            .collect();
        Self {
            dir,
            files,
            nodes,
            faults,
        }
    }

    /// Starts `n` nodes and bootstraps them through the client API, waits for a leader, and
    /// registers the tenant [`TENANT`] that most tests write into.
    pub async fn started_and_initialized(n: usize, raft: RaftSettings) -> Self {
        let c = Self::start(n, raft).await;
        c.client().init().await.unwrap();
        c.wait_leader().await;
        add_tenant(&c.client(), TENANT).await;
        c
    }

    pub fn client_config(&self) -> ClientConfig {
        ClientConfig::load(&self.files.client_config).unwrap()
    }

    pub fn client(&self) -> EscrowClient {
        EscrowClient::new(&self.client_config()).unwrap()
    }

    /// A client that only knows node `i` (0-based).
    pub fn client_for(&self, i: usize) -> EscrowClient {
        let mut c = self.client_config();
        c.endpoints = vec![c.endpoints[i].clone()];
        EscrowClient::new(&c).unwrap()
    }

    /// A client that knows every node and tries node `i` (0-based) first.
    pub fn client_trying_first(&self, i: usize) -> EscrowClient {
        let mut c = self.client_config();
        let first = c.endpoints.remove(i);
        c.endpoints.insert(0, first);
        EscrowClient::new(&c).unwrap()
    }

    pub fn node(&self, i: usize) -> &NodeHandle {
        self.nodes[i].as_ref().expect("node is running")
    }

    /// Waits until a running node reports a leader that all running nodes agree on.
    pub async fn wait_leader(&self) -> u64 {
        wait_for("an agreed leader", || async {
            let leaders: Vec<Option<u64>> = self
                .nodes
                .iter()
                .flatten()
                .map(|n| n.raft.metrics().borrow().current_leader)
                .collect();
            let first = leaders.first().copied().flatten()?;
            leaders.iter().all(|l| *l == Some(first)).then_some(first)
        })
        .await
    }

    /// Writes `acme/orders/key` = "v" through any node and waits until every running node
    /// applied it; returns its revision.
    pub async fn put_and_wait(&self, key: &str) -> u64 {
        self.put_all_and_wait("orders", [(key.to_string(), b"v".to_vec())])
            .await
    }

    /// Writes `acme/<collection>/<key>` = value for each pair, one after the other, through
    /// any node, and waits until every running node applied the last; returns its revision
    /// (0 when there was none).
    pub async fn put_all_and_wait(
        &self,
        collection: &str,
        records: impl IntoIterator<Item = (String, Vec<u8>)>,
    ) -> u64 {
        let client = self.client();
        let mut last = 0;
        for (key, value) in records {
            last = client.put(TENANT, collection, &key, value).await.unwrap();
        }
        self.wait_applied(last).await;
        last
    }

    /// Starts node `id` with this cluster's CA and fault injection, not yet a member: the
    /// returned member (a voter) is what `cluster add` takes.
    pub async fn start_extra_node(
        &self,
        id: u64,
        raft: &RaftSettings,
    ) -> (NodeHandle, escrow::pb::Member) {
        self.start_extra_node_with(id, raft, |_| {}).await
    }

    /// [`Self::start_extra_node`] with its config changed by `edit` first.
    pub async fn start_extra_node_with(
        &self,
        id: u64,
        raft: &RaftSettings,
        edit: impl FnOnce(&mut Config),
    ) -> (NodeHandle, escrow::pb::Member) {
        let ports = node_ports(1)[0];
        let config_path =
            escrow::dev::write_node_files(&self.files.dir, id, ports, &[], raft).unwrap();
        edit_config(&config_path, |c| {
            c.storage.reserve_bytes = TEST_DISK_RESERVE_BYTES;
            edit(c)
        });
        let config = Config::load(&config_path).unwrap();
        let node = escrow::node::start(&config, self.faults.clone())
            .await
            .unwrap();
        let member = escrow::pb::Member {
            id,
            raft_addr: format!("127.0.0.1:{}", ports.raft),
            client_addr: format!("127.0.0.1:{}", ports.client),
            voter: true,
        };
        (node, member)
    }

    /// Waits until node `observer` follows a leader other than `old_leader` in a term after
    /// `old_term`; returns that leader.
    pub async fn wait_new_leader(&self, observer: u64, old_leader: u64, old_term: u64) -> u64 {
        wait_for("a new leader", || async {
            let m = self
                .node(self.index_of(observer))
                .raft
                .metrics()
                .borrow()
                .clone();
            match m.current_leader {
                Some(l) if l != old_leader && m.current_term > old_term => Some(l),
                _ => None,
            }
        })
        .await
    }

    /// Index (0-based) of the node with id `id`.
    pub fn index_of(&self, id: u64) -> usize {
        (id - 1) as usize
    }

    /// Waits until every running node applied at least `index`.
    pub async fn wait_applied(&self, index: u64) {
        wait_for(&format!("all nodes applied {index}"), || async {
            self.nodes
                .iter()
                .flatten()
                .all(|n| n.core.reader.applied_index() >= index)
                .then_some(())
        })
        .await
    }

    pub async fn stop_node(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.shutdown().await;
        }
    }

    pub async fn restart_node(&mut self, i: usize) {
        assert!(self.nodes[i].is_none(), "node {i} is running");
        let config = Config::load(&self.files.node_configs[i]).unwrap();
        self.nodes[i] = Some(
            escrow::node::start(&config, self.faults.clone())
                .await
                .unwrap(),
        );
    }

    /// Changes node `i`'s config file (read at its next restart).
    pub fn edit_node_config(&self, i: usize, edit: impl FnOnce(&mut Config)) {
        edit_config(&self.files.node_configs[i], edit);
    }

    pub async fn shutdown(mut self) {
        for i in 0..self.nodes.len() {
            self.stop_node(i).await;
        }
    }
}

/// A cluster of `escrowd run` processes.
pub struct ProcessCluster {
    pub dir: tempfile::TempDir,
    pub files: ClusterFiles,
    pub children: Vec<Option<Child>>,
}

pub fn escrowd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_escrowd"))
}

pub fn escrowctl_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_escrowctl"))
}

fn spawn_node(config: &Path, log: &Path) -> Child {
    let log = std::fs::File::create(log).unwrap();
    Command::new(escrowd_bin())
        .arg("run")
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info,openraft=error")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn escrowd")
}

impl ProcessCluster {
    pub fn start(n: usize, raft: RaftSettings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let files = cluster_files(dir.path(), n, &raft);
        let children = files
            .node_configs
            .iter()
            .enumerate()
            .map(|(i, c)| {
                Some(spawn_node(
                    c,
                    &dir.path().join(format!("node{}.log", i + 1)),
                ))
            })
            .collect();
        Self {
            dir,
            files,
            children,
        }
    }

    pub fn client(&self) -> EscrowClient {
        EscrowClient::new(&ClientConfig::load(&self.files.client_config).unwrap()).unwrap()
    }

    /// SIGKILL: no clean shutdown, no flush.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn restart(&mut self, i: usize) {
        assert!(self.children[i].is_none());
        let log = self.dir.path().join(format!("node{}.restarted.log", i + 1));
        self.children[i] = Some(spawn_node(&self.files.node_configs[i], &log));
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("node{}.log", i + 1)))
            .unwrap_or_default()
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sends SIGTERM to `child` and waits for it to exit, at most `limit` (then kills it and fails
/// the test, naming `what`).
pub fn sigterm_and_wait(
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    signal_and_wait(child, "TERM", limit, what)
}

/// [`sigterm_and_wait`] with another signal (`signal` as `kill -s` takes it: "INT" is Ctrl-C).
pub fn signal_and_wait(
    child: &mut Child,
    signal: &str,
    limit: Duration,
    what: &str,
) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-s", signal, &child.id().to_string()])
        .status()
        .unwrap();
    let signalled = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if signalled.elapsed() > limit {
            let _ = child.kill();
            panic!("{what} did not stop within {limit:?} of SIG{signal}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
