//! The client library behind `escrowctl` (and the tests): TLS to any of several endpoints, a
//! bearer credential, and retries within one deadline. A request moves on to the next endpoint
//! when one is down and follows the leader hint when a node redirects it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig};
use tonic::{Code, Request, Status};

use crate::domain::Digest;
use crate::node::CLIENT_MESSAGE_BYTES_MAX;
use crate::pb;
use crate::service::{LEADER_HINT, LOW_DISK_HINT};
use crate::transport::{Channels, GrpcChannel, Timeouts};

/// Default deadline for one client operation, retries included.
pub const REQUEST_DEADLINE_DEFAULT: Duration = Duration::from_secs(20);
/// Client channels: a node that vanished without a reset (power loss, partition) is noticed
/// within seconds instead of holding requests until their deadline.
const CLIENT_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(2),
    keep_alive_interval: Duration::from_secs(2),
    keep_alive_timeout: Duration::from_secs(2),
    keep_alive_while_idle: true,
};
/// Deadline for asking one node its status in `cluster status`.
pub const STATUS_PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between rounds over all endpoints.
const RETRY_PAUSE: Duration = Duration::from_millis(150);
/// Endpoints a client config may list.
pub const ENDPOINTS_MAX: usize = 16;

/// `escrowctl.toml`: where the cluster is and how to authenticate.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// Client endpoints as host:port; any one that answers will do.
    pub endpoints: Vec<String>,
    /// The cluster CA certificate (PEM) the nodes' certificates are checked against.
    pub ca: PathBuf,
    /// File holding the bearer token (mode 0600).
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read client config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot read the cluster CA {path} named in the client config: {reason}")]
    Ca { path: PathBuf, reason: String },
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    /// What a node answered. Its text gives the status's own causes (a transport error's),
    /// and the status is not this error's `source`, so a chain printer (`{:#}`) does not
    /// repeat it in tonic's longer form.
    #[error("{}", describe(.0))]
    Rpc(Status),
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Rpc(s)
    }
}

fn describe(s: &Status) -> String {
    let code = match s.code() {
        Code::InvalidArgument => "invalid argument",
        Code::ResourceExhausted if s.metadata().contains_key(LOW_DISK_HINT) => "disk low",
        Code::ResourceExhausted => "too large",
        Code::Unavailable => "unavailable",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::Unauthenticated => "not authenticated",
        Code::PermissionDenied => "permission denied",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::FailedPrecondition => "refused",
        _ => "error",
    };
    format!("{code}: {}", crate::transport::said(s))
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Rpc(s) => Some(s.code()),
            _ => None,
        }
    }

    /// A write refused while a voter's disk is under its reserve: it passes once space is
    /// freed there, so an agent waits and resends.
    pub fn is_low_disk(&self) -> bool {
        matches!(self, ClientError::Rpc(s) if s.metadata().contains_key(LOW_DISK_HINT))
    }
}

impl ClientConfig {
    /// Loads a config file; relative paths in it are relative to the file's directory.
    pub fn load(path: &Path) -> Result<Self, ClientError> {
        let err = |reason: String| ClientError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let mut c: ClientConfig = toml::from_str(&text).map_err(|e| err(e.to_string()))?;
        if c.endpoints.is_empty() || c.endpoints.len() > ENDPOINTS_MAX {
            return Err(err(format!("list 1 to {ENDPOINTS_MAX} endpoints")));
        }
        for e in &c.endpoints {
            crate::config::validate_host_port(e)
                .map_err(|r| err(format!("endpoint {e:?}: {r}")))?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        if c.ca.is_relative() {
            c.ca = base.join(&c.ca);
        }
        if c.token_file.is_relative() {
            c.token_file = base.join(&c.token_file);
        }
        Ok(c)
    }
}

/// Status of one node as `cluster status` reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u64,
    /// The node's ed25519 identity public key (hex), which signs attestations.
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub identity_key: String,
    pub addr: String,
    pub raft_addr: String,
    pub role: String,
    pub state: String,
    pub applied_index: u64,
    pub last_log_index: u64,
    pub term: u64,
    pub reachable: bool,
    /// Bytes free on the node's data directory at its last reading (reachable nodes with a
    /// fresh reading only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_free_bytes: Option<u64>,
    /// The node's `storage.reserve_bytes`: under it, the cluster refuses writes that add data.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_reserve_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The `cluster status --json` document.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_name: String,
    pub leader: Option<u64>,
    pub term: u64,
    pub nodes: Vec<NodeView>,
}

/// Tenant operations (ops role).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TenantOp {
    Add,
    Suspend,
    Resume,
    Show,
}

pub fn record_ref(tenant: &str, collection: &str, key: &str) -> pb::RecordRef {
    pb::RecordRef {
        tenant: tenant.into(),
        collection: collection.into(),
        key: key.into(),
    }
}

/// Client stubs with the message limits the nodes use (records and artifacts carry values and
/// chunks up to `CLIENT_MESSAGE_BYTES_MAX`; a deep-verify report can be larger).
fn records(ch: GrpcChannel) -> pb::records_client::RecordsClient<GrpcChannel> {
    pb::records_client::RecordsClient::new(ch)
        .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
}

fn artifacts(ch: GrpcChannel) -> pb::artifacts_client::ArtifactsClient<GrpcChannel> {
    pb::artifacts_client::ArtifactsClient::new(ch)
        .max_encoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX)
}

fn integrity(ch: GrpcChannel) -> pb::integrity_client::IntegrityClient<GrpcChannel> {
    pb::integrity_client::IntegrityClient::new(ch)
        .max_decoding_message_size(CLIENT_MESSAGE_BYTES_MAX * 8)
}

fn consistency(local: bool) -> i32 {
    if local {
        pb::ReadConsistency::Local as i32
    } else {
        pb::ReadConsistency::Linearizable as i32
    }
}

pub struct EscrowClient {
    endpoints: Vec<String>,
    token: MetadataValue<tonic::metadata::Ascii>,
    channels: Channels,
    preferred: AtomicUsize,
    deadline: Duration,
}

fn retryable(s: &Status) -> bool {
    match s.code() {
        Code::Unavailable => true,
        // A transport failure before the request left surfaces as Unknown with no message
        // from a server; treat it like an unreachable node.
        Code::Unknown => s.message().contains("transport") || s.message().contains("connect"),
        Code::FailedPrecondition => s.metadata().contains_key(LEADER_HINT),
        _ => false,
    }
}

impl EscrowClient {
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        crate::node::install_crypto_provider();
        let ca = crate::auth::read_ca(&config.ca).map_err(|e| ClientError::Ca {
            path: config.ca.clone(),
            reason: e.to_string(),
        })?;
        let token = crate::auth::read_token(&config.token_file)?;
        let token = format!("Bearer {token}")
            .parse()
            .map_err(|_| ClientError::Config {
                path: config.token_file.clone(),
                reason: "token is not valid header text".into(),
            })?;
        Ok(Self {
            endpoints: config.endpoints.clone(),
            token,
            channels: Channels::new(
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)),
                CLIENT_TIMEOUTS,
            ),
            preferred: AtomicUsize::new(0),
            deadline: REQUEST_DEADLINE_DEFAULT,
        })
    }

    /// Sets the deadline for each operation (retries included).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    fn channel(&self, addr: &str) -> Result<GrpcChannel, Status> {
        self.channels
            .get(addr)
            .map_err(|e| Status::invalid_argument(format!("bad endpoint {addr}: {e}")))
    }

    fn request<T>(&self, msg: T, timeout: Duration) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert(crate::auth::AUTHORIZATION, self.token.clone());
        r.set_timeout(timeout);
        r
    }

    /// Runs `op` against the endpoints until one answers, a non-retryable error comes back, or
    /// the deadline passes.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(GrpcChannel, Duration) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let n = self.endpoints.len();
        let mut index = self.preferred.load(Ordering::Relaxed) % n;
        let mut hinted: Option<String> = None;
        let mut tried_in_round = 0usize;
        // The last retryable failure, for the error once the deadline has passed: "no leader"
        // or a TLS failure says more than the deadline alone.
        let mut last: Option<(String, Status)> = None;
        loop {
            let remaining = self.deadline.saturating_sub(started.elapsed());
            if remaining.is_zero() {
                let why = match &last {
                    Some((addr, s)) => format!(
                        "no endpoint succeeded within {:?}; the last, {addr}, said: {}",
                        self.deadline,
                        crate::transport::said(s)
                    ),
                    None => format!("no endpoint answered within {:?}", self.deadline),
                };
                return Err(Status::deadline_exceeded(why).into());
            }
            let addr = hinted
                .take()
                .unwrap_or_else(|| self.endpoints[index].clone());
            let result = match self.channel(&addr) {
                Ok(channel) => op(channel, remaining).await,
                Err(s) => Err(s),
            };
            match result {
                Ok(v) => {
                    if let Some(i) = self.endpoints.iter().position(|e| *e == addr) {
                        self.preferred.store(i, Ordering::Relaxed);
                    }
                    return Ok(v);
                }
                Err(s) if retryable(&s) && started.elapsed() < self.deadline => {
                    if let Some(leader) = s
                        .metadata()
                        .get(LEADER_HINT)
                        .and_then(|v| v.to_str().ok())
                        .filter(|l| *l != addr)
                    {
                        hinted = Some(leader.to_string());
                        continue;
                    }
                    index = (index + 1) % n;
                    // Start later calls at the next endpoint, not at the one that just failed.
                    self.preferred.store(index, Ordering::Relaxed);
                    tried_in_round += 1;
                    if tried_in_round >= n {
                        tried_in_round = 0;
                        tokio::time::sleep(RETRY_PAUSE.min(remaining)).await;
                    }
                    tracing::debug!(endpoint = %addr, error = %s.message(), "retrying on another endpoint");
                    last = Some((addr, s));
                }
                // Time ran out during this attempt (tonic's own timeout is "cancelled"): the
                // loop's deadline error names what this endpoint said. A node's own
                // DEADLINE_EXCEEDED ("not committed within …") passes as it is.
                Err(s)
                    if (retryable(&s) || s.code() == tonic::Code::Cancelled)
                        && started.elapsed() >= self.deadline =>
                {
                    last = Some((addr, s));
                }
                Err(s) => return Err(s.into()),
            }
        }
    }

    /// One unary RPC through [`EscrowClient::call`] (retries, leader hints, deadline): `rpc`
    /// sends a fresh authenticated request built from `msg` on each attempt.
    async fn unary<M, R, F, Fut>(&self, msg: M, rpc: F) -> Result<R, ClientError>
    where
        M: Clone,
        F: Fn(GrpcChannel, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<R>, Status>>,
    {
        self.call(|ch, t| {
            let reply = rpc(ch, self.request(msg.clone(), t));
            async move { Ok(reply.await?.into_inner()) }
        })
        .await
    }

    /// `fut` against one node only, bounded by `timeout` (no retries elsewhere).
    async fn once<R>(
        addr: &str,
        timeout: Duration,
        fut: impl std::future::Future<Output = Result<R, Status>>,
    ) -> Result<R, ClientError> {
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => Ok(r?),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "{addr} did not answer within {timeout:?}"
            ))
            .into()),
        }
    }

    pub async fn put(
        &self,
        tenant: &str,
        collection: &str,
        key: &str,
        value: Vec<u8>,
    ) -> Result<u64, ClientError> {
        let msg = pb::PutRequest {
            record: Some(record_ref(tenant, collection, key)),
            value,
        };
        let reply = self
            .unary(msg, |ch, r| async move { records(ch).put(r).await })
            .await?;
        Ok(reply.revision)
    }

    pub async fn get(
        &self,
        tenant: &str,
        collection: &str,
        key: &str,
        local: bool,
    ) -> Result<pb::GetReply, ClientError> {
        self.get_at(record_ref(tenant, collection, key), local, 0, 0)
            .await
    }

    /// Reads a record as it is now (`revision` and `as_of_ms` 0), at a revision, or as of a
    /// time.
    pub async fn get_at(
        &self,
        record: pb::RecordRef,
        local: bool,
        revision: u64,
        as_of_ms: u64,
    ) -> Result<pb::GetReply, ClientError> {
        let msg = pb::GetRequest {
            record: Some(record),
            consistency: consistency(local),
            revision,
            as_of_ms,
        };
        self.unary(msg, |ch, r| async move { records(ch).get(r).await })
            .await
    }

    /// One page of a record's history, newest first; `before` is the (revision, position) of
    /// the previous page's last version (`None` for the first page).
    pub async fn history(
        &self,
        record: pb::RecordRef,
        local: bool,
        before: Option<(u64, u32)>,
        limit: u32,
    ) -> Result<pb::HistoryReply, ClientError> {
        let (before_revision, before_position) = before.unwrap_or((0, 0));
        let msg = pb::HistoryRequest {
            record: Some(record),
            consistency: consistency(local),
            before_revision,
            before_position,
            limit,
        };
        self.unary(msg, |ch, r| async move { records(ch).history(r).await })
            .await
    }

    pub async fn delete(
        &self,
        tenant: &str,
        collection: &str,
        key: &str,
    ) -> Result<pb::DeleteReply, ClientError> {
        let msg = pb::DeleteRequest {
            record: Some(record_ref(tenant, collection, key)),
        };
        self.unary(msg, |ch, r| async move { records(ch).delete(r).await })
            .await
    }

    /// Sends one batch of changes from a source stream. Safe to retry: changes the cluster
    /// already applied are acknowledged without being applied again.
    pub async fn ingest(
        &self,
        tenant: &str,
        source: &str,
        changes: Vec<pb::Change>,
    ) -> Result<pb::IngestReply, ClientError> {
        let msg = pb::IngestRequest {
            tenant: tenant.into(),
            source: source.into(),
            changes,
        };
        self.unary(msg, |ch, r| async move { records(ch).ingest(r).await })
            .await
    }

    pub async fn source_position(
        &self,
        tenant: &str,
        source: &str,
    ) -> Result<pb::SourcePositionReply, ClientError> {
        let msg = pb::SourcePositionRequest {
            tenant: tenant.into(),
            source: source.into(),
        };
        self.unary(
            msg,
            |ch, r| async move { records(ch).source_position(r).await },
        )
        .await
    }

    /// Which of these chunks are not yet durable on a majority of voters.
    pub async fn missing_chunks(&self, hashes: &[Digest]) -> Result<Vec<Digest>, ClientError> {
        let msg = pb::ChunkList {
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        };
        let reply = self
            .unary(
                msg,
                |ch, r| async move { artifacts(ch).missing_chunks(r).await },
            )
            .await?;
        reply
            .hashes
            .iter()
            .map(|h| {
                <Digest>::try_from(h.as_slice()).map_err(|_| {
                    ClientError::Rpc(Status::internal("the node answered a malformed hash"))
                })
            })
            .collect()
    }

    /// Stores one chunk; durable on a majority of voters when this returns.
    pub async fn put_chunk(&self, hash: &Digest, data: Vec<u8>) -> Result<(), ClientError> {
        let msg = pb::ChunkData {
            hash: hash.to_vec(),
            data,
        };
        self.unary(msg, |ch, r| async move { artifacts(ch).put_chunk(r).await })
            .await?;
        Ok(())
    }

    /// Commits an artifact version whose chunks are all stored.
    pub async fn commit_artifact(
        &self,
        namespace: &str,
        name: &str,
        manifest: pb::Manifest,
    ) -> Result<pb::ArtifactVersion, ClientError> {
        let msg = pb::CommitRequest {
            namespace: namespace.into(),
            name: name.into(),
            manifest: Some(manifest),
        };
        self.unary(msg, |ch, r| async move { artifacts(ch).commit(r).await })
            .await
    }

    pub async fn delete_artifact(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<pb::ArtifactVersion, ClientError> {
        let msg = pb::ArtifactRef {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        };
        self.unary(msg, |ch, r| async move { artifacts(ch).delete(r).await })
            .await
    }

    /// An artifact version with its manifest (version 0: the latest).
    pub async fn artifact(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
    ) -> Result<pb::ArtifactVersion, ClientError> {
        let msg = pb::ArtifactRef {
            namespace: namespace.into(),
            name: name.into(),
            version,
            consistency: consistency(false),
        };
        self.unary(msg, |ch, r| async move { artifacts(ch).get(r).await })
            .await
    }

    /// Every artifact of a namespace (latest versions, no chunk lists), all pages.
    pub async fn list_artifacts(
        &self,
        namespace: &str,
        include_deleted: bool,
    ) -> Result<Vec<pb::ArtifactVersion>, ClientError> {
        let mut out: Vec<pb::ArtifactVersion> = Vec::new();
        loop {
            let msg = pb::ListArtifactsRequest {
                namespace: namespace.into(),
                after: out.last().map(|a| a.name.clone()).unwrap_or_default(),
                limit: 0,
                consistency: consistency(false),
                include_deleted,
            };
            let page = self
                .unary(msg, |ch, r| async move { artifacts(ch).list(r).await })
                .await?;
            out.extend(page.artifacts);
            if !page.truncated {
                return Ok(out);
            }
        }
    }

    /// Chunk `index` of an artifact version (the caller verifies it).
    pub async fn read_chunk(
        &self,
        namespace: &str,
        name: &str,
        version: u64,
        index: u32,
    ) -> Result<pb::ChunkData, ClientError> {
        let msg = pb::ReadChunkRequest {
            namespace: namespace.into(),
            name: name.into(),
            version,
            index,
        };
        self.unary(
            msg,
            |ch, r| async move { artifacts(ch).read_chunk(r).await },
        )
        .await
    }

    /// A tenant operation: "add", "suspend", "resume" or "show".
    pub async fn tenant(&self, op: TenantOp, tenant: &str) -> Result<pb::Tenant, ClientError> {
        let msg = pb::TenantRequest {
            tenant: tenant.into(),
        };
        self.unary(msg, |ch, r| async move {
            let mut c = pb::tenants_client::TenantsClient::new(ch);
            match op {
                TenantOp::Add => c.add(r).await,
                TenantOp::Suspend => c.suspend(r).await,
                TenantOp::Resume => c.resume(r).await,
                TenantOp::Show => c.show(r).await,
            }
        })
        .await
    }

    /// Every tenant and the vendor namespace, with freshness.
    pub async fn tenants(&self, local: bool) -> Result<pb::ListTenantsReply, ClientError> {
        let msg = pb::ListTenantsRequest {
            consistency: consistency(local),
        };
        self.unary(msg, |ch, r| async move {
            pb::tenants_client::TenantsClient::new(ch).list(r).await
        })
        .await
    }

    pub async fn init(&self) -> Result<pb::InitReply, ClientError> {
        self.unary(pb::InitRequest {}, |ch, r| async move {
            pb::cluster_client::ClusterClient::new(ch).init(r).await
        })
        .await
    }

    pub async fn add_node(
        &self,
        member: pb::Member,
        learner_only: bool,
    ) -> Result<pb::AddNodeReply, ClientError> {
        let msg = pb::AddNodeRequest {
            node: Some(member),
            learner_only,
        };
        self.unary(msg, |ch, r| async move {
            pb::cluster_client::ClusterClient::new(ch).add_node(r).await
        })
        .await
    }

    pub async fn remove_node(&self, id: u64) -> Result<pb::RemoveNodeReply, ClientError> {
        self.unary(pb::RemoveNodeRequest { id }, |ch, r| async move {
            pb::cluster_client::ClusterClient::new(ch)
                .remove_node(r)
                .await
        })
        .await
    }

    /// Asks each node (id, client address) the same integrity question at once, directly (no
    /// retries elsewhere), each bounded by `timeout`; one answer per node, in order.
    pub async fn integrity_each<M, T, F, Fut>(
        &self,
        nodes: &[(u64, String)],
        timeout: Duration,
        msg: M,
        rpc: F,
    ) -> Vec<(u64, Result<T, ClientError>)>
    where
        M: Clone,
        F: Fn(pb::integrity_client::IntegrityClient<GrpcChannel>, Request<M>) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let rpc = &rpc;
        futures::future::join_all(nodes.iter().map(|(id, addr)| {
            let req = self.request(msg.clone(), timeout);
            async move {
                let answer = match self.channel(addr) {
                    Ok(ch) => Self::once(addr, timeout, rpc(integrity(ch), req)).await,
                    Err(e) => Err(e.into()),
                };
                (*id, answer)
            }
        }))
        .await
    }

    /// The cluster's members as (id, client address), from one node's status.
    pub async fn members(&self) -> Result<Vec<(u64, String)>, ClientError> {
        Ok(self
            .node_status()
            .await?
            .members
            .into_iter()
            .map(|m| (m.id, m.client_addr))
            .collect())
    }

    /// Proposes a checkpoint (every replica records all roots at its index).
    pub async fn checkpoint(&self) -> Result<u64, ClientError> {
        let reply = self
            .unary(pb::CheckpointRequest {}, |ch, r| async move {
                integrity(ch).checkpoint(r).await
            })
            .await?;
        Ok(reply.index)
    }

    /// One node's own status, asked directly at `addr` (no retries elsewhere).
    pub async fn node_status_at(
        &self,
        addr: &str,
        timeout: Duration,
    ) -> Result<pb::NodeStatusReply, ClientError> {
        let mut client = pb::cluster_client::ClusterClient::new(self.channel(addr)?);
        let req = self.request(pb::NodeStatusRequest {}, timeout);
        Self::once(addr, timeout, async move {
            Ok(client.node_status(req).await?.into_inner())
        })
        .await
    }

    /// Status of any reachable node (with retries over the endpoints).
    pub async fn node_status(&self) -> Result<pb::NodeStatusReply, ClientError> {
        self.unary(pb::NodeStatusRequest {}, |ch, r| async move {
            pb::cluster_client::ClusterClient::new(ch)
                .node_status(r)
                .await
        })
        .await
    }

    /// Asks every member for its own view and assembles the cluster status.
    pub async fn cluster_status(&self) -> Result<ClusterStatus, ClientError> {
        let first = self.node_status().await?;
        let mut members = first.members.clone();
        if members.is_empty() {
            // Not initialized yet: report the configured endpoints.
            members = self
                .endpoints
                .iter()
                .map(|e| pb::Member {
                    id: 0,
                    raft_addr: String::new(),
                    client_addr: e.clone(),
                    voter: false,
                })
                .collect();
        }
        let probes = members.iter().map(|m| async move {
            let r = self
                .node_status_at(&m.client_addr, STATUS_PROBE_TIMEOUT)
                .await;
            (m, r)
        });
        let results = futures::future::join_all(probes).await;
        let mut reports = Vec::new();
        let mut nodes = Vec::new();
        for (m, r) in results {
            // Before `cluster init` the endpoints have no id and no role yet.
            let role = match (m.id, m.voter) {
                (0, _) => "uninitialized",
                (_, true) => "voter",
                (_, false) => "learner",
            }
            .to_string();
            match r {
                Ok(s) => {
                    reports.push(LeaderReport {
                        term: s.term,
                        leader: s.leader,
                        voter: m.voter,
                    });
                    nodes.push(NodeView {
                        identity_key: s.identity_key.clone(),
                        id: s.id,
                        addr: m.client_addr.clone(),
                        raft_addr: m.raft_addr.clone(),
                        role,
                        state: s.state,
                        applied_index: s.applied_index,
                        last_log_index: s.last_log_index,
                        term: s.term,
                        reachable: true,
                        disk_free_bytes: s.disk_free_bytes,
                        disk_reserve_bytes: s.disk_reserve_bytes,
                        error: None,
                    })
                }
                Err(e) => nodes.push(NodeView {
                    identity_key: String::new(),
                    id: m.id,
                    addr: m.client_addr.clone(),
                    raft_addr: m.raft_addr.clone(),
                    role,
                    state: "unknown".into(),
                    applied_index: 0,
                    last_log_index: 0,
                    term: 0,
                    reachable: false,
                    disk_free_bytes: None,
                    disk_reserve_bytes: None,
                    error: Some(e.to_string()),
                }),
            }
        }
        nodes.sort_by_key(|n| n.id);
        let voters = members.iter().filter(|m| m.voter).count();
        let (term, leader) = known_leader(&reports, voters);
        Ok(ClusterStatus {
            cluster_name: first.cluster_name,
            leader,
            term,
            nodes,
        })
    }
}

/// One node's answer for [`known_leader`].
struct LeaderReport {
    term: u64,
    /// The leader it follows in `term`, 0 for none known.
    leader: u64,
    voter: bool,
}

/// The leader known in the newest term among the nodes' reports, and that term; with no
/// leader known, the newest term reported. `voters` is the number of voters in the
/// membership. A node that knows no leader does not hide the one the others follow: without
/// pre-vote, a node cut off from its peers keeps raising its term as a candidate. But once at
/// least half of the voters have moved past that leader's term (an election under way, the
/// old leader cut off and still believing it leads), it can no longer commit and there is no
/// leader to name: the newest term is reported with none. Voters that did not answer and
/// learners (which never campaign) count for neither side.
fn known_leader(reports: &[LeaderReport], voters: usize) -> (u64, Option<u64>) {
    let newest_term = reports.iter().map(|r| r.term).max().unwrap_or(0);
    let Some(known) = reports
        .iter()
        .filter(|r| r.leader != 0)
        .max_by_key(|r| r.term)
    else {
        return (newest_term, None);
    };
    let moved_past = reports
        .iter()
        .filter(|r| r.voter && r.term > known.term)
        .count();
    if voters > 0 && moved_past * 2 >= voters {
        (newest_term, None)
    } else {
        (known.term, Some(known.leader))
    }
}

#[cfg(test)]
mod tests {
    use super::{known_leader, LeaderReport};

    fn voters(reports: &[(u64, u64)]) -> Vec<LeaderReport> {
        reports
            .iter()
            .map(|&(term, leader)| LeaderReport {
                term,
                leader,
                voter: true,
            })
            .collect()
    }

    #[test]
    fn the_leader_is_the_newest_known_one_and_a_leaderless_higher_term_does_not_hide_it() {
        // Node 3 cut off, campaigning in ever higher terms; 1 and 2 follow leader 1 in term 4.
        assert_eq!(
            known_leader(&voters(&[(4, 1), (4, 1), (9, 0)]), 3),
            (4, Some(1))
        );
        // A newer leader beats an old one still believing it leads.
        assert_eq!(
            known_leader(&voters(&[(4, 1), (5, 2), (5, 2)]), 3),
            (5, Some(2))
        );
        // A follower that voted in term 5 but has not heard from the winner yet, and one
        // still in term 4, do not hide leader 2.
        assert_eq!(
            known_leader(&voters(&[(5, 2), (5, 0), (4, 1)]), 3),
            (5, Some(2))
        );
        // Nobody knows a leader: none, and the newest term.
        assert_eq!(known_leader(&voters(&[(4, 0), (6, 0)]), 3), (6, None));
        assert_eq!(known_leader(&[], 0), (0, None));
    }

    #[test]
    fn an_old_leader_half_the_voters_have_left_behind_is_not_named() {
        // Leader 3 cut off in term 4; 1 and 2 are electing a new leader in term 5.
        assert_eq!(
            known_leader(&voters(&[(5, 0), (5, 0), (4, 3)]), 3),
            (5, None)
        );
        // Four voters, two moved past: leader 1 cannot gather the three it needs.
        assert_eq!(
            known_leader(&voters(&[(4, 1), (4, 1), (5, 0), (5, 0)]), 4),
            (5, None)
        );
        // Five voters, two of them unreachable and two cut off and campaigning: leader 1
        // still has its quorum, and those that did not answer do not count against it.
        assert_eq!(
            known_leader(&voters(&[(4, 1), (7, 0), (9, 0)]), 5),
            (4, Some(1))
        );
        // Learners never campaign and do not count; a learner alone still names a leader.
        let learner = |term, leader| LeaderReport {
            term,
            leader,
            voter: false,
        };
        let mut reports = voters(&[(4, 1), (4, 1)]);
        reports.extend([learner(9, 0), learner(9, 0)]);
        assert_eq!(known_leader(&reports, 3), (4, Some(1)));
        assert_eq!(known_leader(&[learner(4, 3)], 3), (4, Some(3)));
    }
}
