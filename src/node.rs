//! Node wiring and lifecycle: a straight list of logged start-up steps, one shutdown channel.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;

use crate::auth::{NodeTls, TokenCheck};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pb;
use crate::raft::network::{Faults, NetworkFactory, PeerClients, PEER_MESSAGE_BYTES_MAX};
use crate::raft::{NodeId, Raft};
use crate::service::artifacts::ArtifactsService;
use crate::service::client::{ClusterService, RecordsService};
use crate::service::integrity::IntegrityService;
use crate::service::peer::PeerService;
use crate::service::tenants::TenantsService;
use crate::service::Core;
use crate::store::{LogStore, StateMachineStore};

/// Most entries in one AppendEntries. Each entry is a batch of up to `BATCH_BYTES_MAX` (or one
/// command at the value limit), so an AppendEntries stays under ~5 MiB: openraft 0.9 gives each
/// one only `heartbeat_interval` to complete, so it must stay small (raise `raft.heartbeat_ms`
/// on slow links).
pub const RAFT_PAYLOAD_ENTRIES_MAX: u64 = 4;

/// The largest single Raft entry the node can build: a batch, or one command at the limits.
const ENTRY_BYTES_MAX: usize = max(
    crate::service::BATCH_BYTES_MAX,
    max(
        crate::domain::VALUE_LEN_MAX,
        crate::domain::INGEST_BYTES_MAX,
    ),
) + ENVELOPE_BYTES_MAX;
/// Encoding overhead of the largest command around its keys and values (names, sequences and
/// lengths of up to `INGEST_CHANGES_MAX` changes).
const ENVELOPE_BYTES_MAX: usize = 1024 * 1024;
const _: () = assert!(crate::domain::INGEST_CHANGES_MAX * 128 <= ENVELOPE_BYTES_MAX);
// A manifest at its chunk limit (32-byte hash + size + framing per chunk) fits an entry, and a
// chunk at its size limit fits a client message.
const _: () = assert!(crate::domain::ARTIFACT_CHUNKS_MAX * 48 <= ENTRY_BYTES_MAX);
const _: () = assert!(crate::domain::CHUNK_MAX_BYTES as usize + 4096 <= CLIENT_MESSAGE_BYTES_MAX);

const fn max(a: usize, b: usize) -> usize {
    if a > b {
        a
    } else {
        b
    }
}
const _: () =
    assert!(RAFT_PAYLOAD_ENTRIES_MAX as usize * ENTRY_BYTES_MAX <= PEER_MESSAGE_BYTES_MAX);
const _: () = assert!(PEER_MESSAGE_BYTES_MAX as u64 <= crate::raft::codec::DECODE_LEN_MAX);
/// Largest client message, in bytes: an ingest batch (or a record value) at its limit plus the
/// envelope.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = max(
    crate::domain::VALUE_LEN_MAX,
    crate::domain::INGEST_BYTES_MAX,
) + ENVELOPE_BYTES_MAX;
/// Concurrent client requests per connection.
const CLIENT_CONCURRENCY_PER_CONNECTION: usize = 256;
/// Shortest interval between two refreshes of the Prometheus gauges.
const METRICS_REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// Time allowed for servers to drain on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// A running node.
pub struct NodeHandle {
    pub id: NodeId,
    pub core: Arc<Core>,
    pub raft: Raft,
    pub log_store: LogStore,
    pub client_addr: SocketAddr,
    pub raft_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Accepted connections with Nagle off: small gRPC replies must not wait for the peer's delayed
/// ACK (a 40 ms stall per reply otherwise), and keepalive on to notice dead peers.
fn incoming(listener: TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(30)))
}

/// Installs rustls' ring provider as the process default (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn raft_config(config: &Config) -> anyhow::Result<openraft::Config> {
    let r = &config.raft;
    let c = openraft::Config {
        cluster_name: config.cluster_name.clone(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_every_entries),
        // Purges behind a snapshot are the snapshots worker's alone (it keeps
        // `log_entries_kept_after_snapshot` entries and about `log_bytes_kept_after_snapshot`
        // bytes, whichever is less), so openraft's policy never schedules one: a second source
        // of purge points could move a pending one backwards (openraft 0.9 compares its
        // policy's point with the last purge done, not with the one pending, and
        // debug-asserts that the pending one never moves back).
        max_in_snapshot_log_to_keep: u64::MAX,
        max_payload_entries: RAFT_PAYLOAD_ENTRIES_MAX,
        // Bounds only the wait for a snapshot's answer once its last frame is sent
        // (`network::SNAPSHOT_INSTALL_WAIT`); the transfer itself has no overall deadline.
        install_snapshot_timeout: crate::raft::network::SNAPSHOT_INSTALL_WAIT.as_millis() as u64,
        ..Default::default()
    };
    Ok(c.validate()?)
}

/// Spawns a background worker that runs on `core` until `shutdown` says stop.
fn spawn_worker<F, Fut>(
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    core: &Arc<Core>,
    shutdown: &watch::Receiver<bool>,
    run: F,
) where
    F: FnOnce(Arc<Core>, watch::Receiver<bool>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tasks.push(tokio::spawn(run(core.clone(), shutdown.clone())));
}

/// Starts a node from its configuration. `faults` is for in-process tests; pass
/// `Default::default()` in production.
pub async fn start(config: &Config, faults: Arc<Faults>) -> anyhow::Result<NodeHandle> {
    install_crypto_provider();
    let id = config.node_id;
    tracing::info!(node = id, cluster = %config.cluster_name, data_dir = %config.data_dir.display(), "starting node");

    let tls = NodeTls::load(&config.tls.ca, &config.tls.cert, &config.tls.key)?;
    let token = TokenCheck::from_file(&config.auth.ops_token_file)?;
    let scrape = crate::http::ScrapeCredentials {
        ops: token.clone(),
        metrics: config
            .auth
            .metrics_token_file
            .as_deref()
            .map(TokenCheck::from_file)
            .transpose()?,
    };
    tracing::info!(node = id, "tls material and credentials loaded");

    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let log_store = LogStore::open(&config.data_dir.join("log"))
        .with_context(|| format!("cannot open the raft log in {}", config.data_dir.display()))?;
    let sm = StateMachineStore::open(&config.data_dir).with_context(|| {
        format!(
            "cannot open the state machine in {}",
            config.data_dir.display()
        )
    })?;
    sm.reconcile_with_log(log_store.last_index()?);
    let sm = sm.with_snapshot_builds_held(faults.snapshot_builds_held());
    let reader = sm.reader();
    let identity = crate::attest::load_or_create_identity(&config.data_dir)?;
    let chunks_dir = config.data_dir.join("chunks");
    let chunks = Arc::new(
        crate::chunks::ChunkStore::open(&chunks_dir).with_context(|| {
            format!(
                "cannot open the chunk store in {}",
                config.data_dir.display()
            )
        })?,
    );
    tracing::info!(node = id, applied = reader.applied_index(), "stores opened");

    let peers = Arc::new(PeerClients::new(id, tls.peer_client(), faults));
    let raft = Raft::new(
        id,
        Arc::new(raft_config(config)?),
        NetworkFactory::new(
            peers.clone(),
            Duration::from_millis(config.raft.snapshot_frame_wait_ms),
        ),
        log_store.clone(),
        sm,
    )
    .await
    .context("cannot start raft")?;
    tracing::info!(node = id, "raft started");

    let metrics = Arc::new(Metrics::new(id, &chunks.corrupt_found));
    let disk = Arc::new(crate::workers::disk::DiskGuard::new(
        id,
        config.storage.reserve_bytes,
        vec![config.data_dir.clone(), chunks_dir],
    ));
    // This node's first reading before any write is served; the voters and their readings
    // come with the disk worker's first step, right after the listeners are up.
    disk.measure().with_context(|| {
        format!(
            "cannot read the free disk space of {}",
            config.data_dir.display()
        )
    })?;
    let proposer = crate::service::Proposer::start(raft.clone());
    let core = Arc::new(Core {
        proposer,
        id,
        cluster_name: config.cluster_name.clone(),
        mirror: config.mirror.clone(),
        raft: raft.clone(),
        reader,
        chunks,
        identity,
        scrub_kick: tokio::sync::Notify::new(),
        chunk_sync_wanted: Default::default(),
        deep_checks: tokio::sync::Semaphore::new(crate::service::DEEP_CHECKS_AT_ONCE),
        snapshot_receives: tokio::sync::Semaphore::new(
            crate::service::peer::SNAPSHOT_RECEIVES_AT_ONCE,
        ),
        snapshot_frame_wait: Duration::from_millis(config.raft.snapshot_frame_wait_ms),
        disk,
        integrity: config.integrity.clone(),
        peers,
        metrics,
        initial_members: config
            .initial_members
            .iter()
            .map(|m| {
                (
                    m.id,
                    crate::raft::EscrowNode {
                        raft_addr: m.raft.clone(),
                        client_addr: m.client.clone(),
                    },
                )
            })
            .collect(),
    });

    let bind = |addr: SocketAddr, what: &'static str| async move {
        TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen for {what} on {addr}"))
    };
    let peer_listener = bind(config.listen.raft, "peers").await?;
    let client_listener = bind(config.listen.client, "clients").await?;
    let http_listener = bind(config.listen.http, "http").await?;
    let raft_addr = peer_listener.local_addr()?;
    let client_addr = client_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let mut tasks = Vec::new();

    let peer_service = tonic::service::interceptor::InterceptedService::new(
        pb::peer_server::PeerServer::new(PeerService { core: core.clone() })
            .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
        crate::service::peer::addressed_here(id),
    );
    let peer_server = Server::builder()
        .tls_config(tls.peer_server())?
        .tcp_nodelay(true)
        .add_service(peer_service)
        .serve_with_incoming_shutdown(incoming(peer_listener), stop(shutdown_rx.clone()));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = peer_server.await {
            tracing::error!(error = %e, "peer server failed");
        }
    }));
    tracing::info!(node = id, addr = %raft_addr, "peer listener (mutual TLS) up");

    let check = move |req| token.check(req);
    let records = tonic::service::interceptor::InterceptedService::new(
        pb::records_server::RecordsServer::new(RecordsService { core: core.clone() })
            .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        check.clone(),
    );
    let artifacts = tonic::service::interceptor::InterceptedService::new(
        pb::artifacts_server::ArtifactsServer::new(ArtifactsService { core: core.clone() })
            .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
            .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        check.clone(),
    );
    // Requests to these three are small; their answers (a deep-verify report, a tenant list)
    // may be larger than a client message, so only what they take in is bounded.
    let integrity = tonic::service::interceptor::InterceptedService::new(
        pb::integrity_server::IntegrityServer::new(IntegrityService { core: core.clone() })
            .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        check.clone(),
    );
    let tenants = tonic::service::interceptor::InterceptedService::new(
        pb::tenants_server::TenantsServer::new(TenantsService { core: core.clone() })
            .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        check.clone(),
    );
    let cluster = tonic::service::interceptor::InterceptedService::new(
        pb::cluster_server::ClusterServer::new(ClusterService { core: core.clone() })
            .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX),
        check,
    );
    let client_server = Server::builder()
        .tls_config(tls.client_server())?
        .tcp_nodelay(true)
        .concurrency_limit_per_connection(CLIENT_CONCURRENCY_PER_CONNECTION)
        .layer(tower::util::MapResponseLayer::new(
            crate::service::oversized_request_is_resource_exhausted,
        ))
        .add_service(records)
        .add_service(artifacts)
        .add_service(tenants)
        .add_service(integrity)
        .add_service(cluster)
        .serve_with_incoming_shutdown(incoming(client_listener), stop(shutdown_rx.clone()));
    tasks.push(tokio::spawn(async move {
        if let Err(e) = client_server.await {
            tracing::error!(error = %e, "client server failed");
        }
    }));
    tracing::info!(node = id, addr = %client_addr, "client listener (TLS) up");

    tasks.push(tokio::spawn(crate::http::serve(
        http_listener,
        tls.http_server()?,
        crate::http::router(core.clone(), scrape),
        shutdown_rx.clone(),
    )));
    tracing::info!(node = id, addr = %http_addr, "http listener (TLS) up");

    let mut raft_metrics = raft.metrics();
    let metrics_core = core.clone();
    let metrics_log = log_store.clone();
    let mut metrics_stop = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        loop {
            {
                let m = raft_metrics.borrow_and_update().clone();
                metrics_core
                    .metrics
                    .update(id, &m, metrics_log.committed_index());
            }
            // Raft metrics change on every append; refreshing gauges at most every
            // METRICS_REFRESH_INTERVAL keeps that work off the write path.
            tokio::select! {
                _ = tokio::time::sleep(METRICS_REFRESH_INTERVAL) => {}
                _ = metrics_stop.wait_for(|s| *s) => return,
            }
            tokio::select! {
                changed = raft_metrics.changed() => if changed.is_err() { return },
                _ = metrics_stop.wait_for(|s| *s) => return,
            }
        }
    }));
    spawn_worker(
        &mut tasks,
        &core,
        &shutdown_rx,
        crate::workers::freshness::run,
    );
    tracing::info!(node = id, "freshness watch started");
    spawn_worker(&mut tasks, &core, &shutdown_rx, crate::workers::disk::run);
    tracing::info!(
        node = id,
        reserve_bytes = config.storage.reserve_bytes,
        "disk guard started"
    );
    spawn_worker(&mut tasks, &core, &shutdown_rx, crate::workers::chunks::run);
    tracing::info!(node = id, "chunk sync started");
    spawn_worker(&mut tasks, &core, &shutdown_rx, crate::workers::scrub::run);
    tracing::info!(
        node = id,
        mb_per_s = config.integrity.scrub_mb_per_s,
        "scrubber started"
    );
    spawn_worker(
        &mut tasks,
        &core,
        &shutdown_rx,
        crate::workers::retention::run,
    );
    tracing::info!(
        node = id,
        days = config.mirror.retention_days,
        "retention worker started"
    );
    spawn_worker(&mut tasks, &core, &shutdown_rx, crate::workers::blobs::run);
    tasks.push(tokio::spawn(crate::workers::snapshots::run(
        raft.clone(),
        log_store.clone(),
        crate::workers::snapshots::LogBounds::of(&config.raft),
        shutdown_rx.clone(),
    )));

    Ok(NodeHandle {
        id,
        core,
        raft,
        log_store,
        client_addr,
        raft_addr,
        http_addr,
        shutdown,
        tasks,
    })
}

impl NodeHandle {
    /// Stops the listeners, then Raft, and waits for the tasks so the stores are closed when
    /// this returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown reported an error");
        }
        // A blob collection (a blocking compaction) would outlive its aborted worker.
        let reader = self.core.reader.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || reader.stop_background_work()).await {
            tracing::warn!(error = %e, "stopping the state machine's background work failed");
        }
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(SHUTDOWN_GRACE, task).await.is_err() {
                abort.abort();
            }
        }
        tracing::info!(node = self.id, "node stopped");
    }
}
