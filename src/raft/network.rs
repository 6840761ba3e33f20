//! The Raft network over tonic with mutual TLS, plus request forwarding to the leader.
//!
//! One HTTP/2 channel per peer address, shared by replication, votes, snapshots and forwarding.
//! [`Faults`] lets in-process tests cut links between nodes (a partition) or hold back the
//! second step of a membership change without touching sockets; production never sets it.

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{
    Fatal, NetworkError, RPCError, RaftError, RemoteError, ReplicationClosed, StreamingError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tonic::transport::ClientTlsConfig;

use super::codec;
use super::{EscrowNode, NodeId, Snapshot, TypeConfig, Vote};
use crate::ledger::{Command, Outcome};
use crate::pb;
use crate::transport::{Channels, GrpcChannel, Timeouts};

/// Bytes per snapshot data frame: bounds memory on both ends of a snapshot stream.
pub const SNAPSHOT_FRAME_BYTES: usize = 1024 * 1024;
/// Frames buffered between the file reader and the gRPC stream.
const SNAPSHOT_FRAMES_IN_FLIGHT: usize = 4;
/// Largest peer message, in bytes: a batch of Raft entries with values at their size limit.
pub const PEER_MESSAGE_BYTES_MAX: usize = 96 * 1024 * 1024;
/// Deadline of one chunk RPC between nodes (a chunk is at most 2 MiB).
const CHUNK_RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Peer channels: connect within 3 s; a connection unanswered for 15 s (a ping every 10 s) is
/// dropped. Only in-flight connections are pinged: Raft's heartbeats keep the ones in use busy.
const PEER_TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(3),
    keep_alive_interval: Duration::from_secs(10),
    keep_alive_timeout: Duration::from_secs(5),
    keep_alive_while_idle: false,
};
/// Deadline for a forwarded client request, beyond the leader's own commit timeout.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a snapshot's receiver may take, once the sender has handed its last frame to the
/// stream, to take the frames still buffered, sync, verify and install it, and answer. The
/// transfer itself has no overall deadline (a large state machine over a slow link takes as
/// long as it takes): it must only keep moving, one frame at least every
/// `raft.snapshot_frame_wait_ms`, on both ends (the sender's wait includes the receiver
/// syncing a finished file, as the receiver reads no frame meanwhile).
pub const SNAPSHOT_INSTALL_WAIT: Duration = Duration::from_secs(600);
/// How long a snapshot sender whose stream was closed waits for the receiver's answer, which
/// says why (a refusal is answered as the stream closes).
const SNAPSHOT_REFUSAL_GRACE: Duration = Duration::from_secs(1);

/// gRPC metadata naming the node a peer request is for ([`ForNode`]). A node refuses requests
/// for another (`service::peer::addressed_here`): without it, a node whose address the
/// membership lists for another node (addresses swapped or reused) would answer for that node,
/// and its one vote and log would be counted twice.
pub const PEER_TARGET_HEADER: &str = "x-escrow-peer-target";

/// Adds [`PEER_TARGET_HEADER`] to every request of a peer client.
#[derive(Clone)]
pub struct ForNode(tonic::metadata::AsciiMetadataValue);

impl ForNode {
    pub fn new(target: NodeId) -> Self {
        Self(tonic::metadata::AsciiMetadataValue::from(target))
    }
}

impl tonic::service::Interceptor for ForNode {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        request
            .metadata_mut()
            .insert(PEER_TARGET_HEADER, self.0.clone());
        Ok(request)
    }
}

/// A peer client whose requests name the node they are for.
pub type PeerClient = pb::peer_client::PeerClient<
    tonic::service::interceptor::InterceptedService<GrpcChannel, ForNode>,
>;

/// Injected link failures between in-process nodes (tests only).
#[derive(Debug)]
pub struct Faults {
    blocked: RwLock<HashSet<(NodeId, NodeId)>>,
    /// Drop every AppendEntries that carries a uniform (not joint) membership entry at this
    /// log index or later; `u64::MAX` holds nothing.
    hold_final_membership_from: AtomicU64,
    /// `true`: every snapshot build waits, checkpoint taken, before it publishes.
    hold_snapshot_builds: tokio::sync::watch::Sender<bool>,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            blocked: RwLock::default(),
            hold_final_membership_from: AtomicU64::new(u64::MAX),
            hold_snapshot_builds: tokio::sync::watch::Sender::new(false),
        }
    }
}

impl Faults {
    /// Cuts every link between `node` and each of `others`, both directions.
    pub fn isolate(&self, node: NodeId, others: &[NodeId]) {
        let mut blocked = self.blocked.write().expect("lock");
        for &o in others {
            blocked.insert((node, o));
            blocked.insert((o, node));
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.blocked.write().expect("lock").clear();
    }

    pub fn is_blocked(&self, from: NodeId, to: NodeId) -> bool {
        self.blocked.read().expect("lock").contains(&(from, to))
    }

    /// From now on (`Some(index)`: the leader's next log index), an AppendEntries carrying a
    /// uniform membership entry at `index` or later is dropped whole: a voter change stops in
    /// its joint configuration, as when the leader fails between openraft's two steps. The
    /// leader keeps retrying that entry, so the followers hear no heartbeats from it either
    /// and elect another leader after an election timeout. Membership entries before `index`
    /// pass, so a new leader can still bring a node up to date. `None` ends the hold.
    pub fn hold_final_membership(&self, from: Option<u64>) {
        self.hold_final_membership_from
            .store(from.unwrap_or(u64::MAX), Ordering::SeqCst);
    }

    /// While `true`, every snapshot build of the nodes started with these faults stops after
    /// its checkpoint, before it hashes and publishes: a build as slow as a large store's, so
    /// entries commit while it runs.
    pub fn hold_snapshot_builds(&self, held: bool) {
        self.hold_snapshot_builds.send_replace(held);
    }

    /// What a node's snapshot builds wait on ([`Faults::hold_snapshot_builds`]).
    pub fn snapshot_builds_held(&self) -> tokio::sync::watch::Receiver<bool> {
        self.hold_snapshot_builds.subscribe()
    }

    fn drops(&self, rpc: &AppendEntriesRequest<TypeConfig>) -> bool {
        let from = self.hold_final_membership_from.load(Ordering::SeqCst);
        // Production never holds: no look at the entries on its replication path.
        if from == u64::MAX {
            return false;
        }
        rpc.entries.iter().any(|e| {
            matches!(&e.payload, openraft::EntryPayload::Membership(m)
                if e.log_id.index >= from && m.get_joint_config().len() == 1)
        })
    }
}

/// A client request relayed from a follower to the leader over the peer channel.
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardRequest {
    Write(Command),
    /// "Confirm leadership with a quorum and tell me your applied index": a follower then
    /// serves a linearizable read once it has applied up to that index.
    ReadIndex,
}

/// The leader's answer to a [`ForwardRequest`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ForwardReply {
    Written(Outcome),
    ReadIndex(u64),
}

/// Peer channels, shared by the Raft network and the forwarding path.
pub struct PeerClients {
    own_id: NodeId,
    channels: Channels,
    faults: Arc<Faults>,
}

impl PeerClients {
    pub fn new(own_id: NodeId, tls: ClientTlsConfig, faults: Arc<Faults>) -> Self {
        Self {
            own_id,
            channels: Channels::new(tls, PEER_TIMEOUTS),
            faults,
        }
    }

    fn client(&self, target: NodeId, addr: &str) -> Result<PeerClient, Unreachable> {
        if self.faults.is_blocked(self.own_id, target) {
            return Err(Unreachable::new(&std::io::Error::other(format!(
                "link {} -> {target} cut by fault injection",
                self.own_id
            ))));
        }
        let channel = self
            .channels
            .get(addr)
            .map_err(|e| Unreachable::new(&std::io::Error::other(e)))?;
        Ok(
            pb::peer_client::PeerClient::with_interceptor(channel, ForNode::new(target))
                .max_decoding_message_size(PEER_MESSAGE_BYTES_MAX)
                .max_encoding_message_size(PEER_MESSAGE_BYTES_MAX),
        )
    }

    /// Which of `hashes` the peer stores.
    pub async fn has_chunks(
        &self,
        target: NodeId,
        addr: &str,
        hashes: &[crate::domain::Digest],
    ) -> Result<Vec<bool>, tonic::Status> {
        let mut client = self
            .client(target, addr)
            .map_err(|e| tonic::Status::unavailable(format!("node {target} unreachable: {e}")))?;
        let mut req = tonic::Request::new(pb::ChunkList {
            hashes: hashes.iter().map(|h| h.to_vec()).collect(),
        });
        req.set_timeout(CHUNK_RPC_TIMEOUT);
        let present = client.has_chunks(req).await?.into_inner().present;
        if present.len() != hashes.len() {
            return Err(tonic::Status::internal(format!(
                "node {target} answered {} presence flags for {} chunks",
                present.len(),
                hashes.len()
            )));
        }
        Ok(present)
    }

    /// The peer's free disk space and reserve ([`crate::workers::disk`]).
    pub async fn disk_space(
        &self,
        target: NodeId,
        addr: &str,
        timeout: std::time::Duration,
    ) -> Result<pb::DiskSpaceReply, tonic::Status> {
        let mut client = self
            .client(target, addr)
            .map_err(|e| tonic::Status::unavailable(format!("node {target} unreachable: {e}")))?;
        let mut req = tonic::Request::new(pb::DiskSpaceRequest {});
        req.set_timeout(timeout);
        Ok(client.disk_space(req).await?.into_inner())
    }

    /// Stores a chunk on the peer (it verifies and fsyncs before answering).
    pub async fn put_chunk(
        &self,
        target: NodeId,
        addr: &str,
        hash: &crate::domain::Digest,
        data: Vec<u8>,
    ) -> Result<(), tonic::Status> {
        let mut client = self
            .client(target, addr)
            .map_err(|e| tonic::Status::unavailable(format!("node {target} unreachable: {e}")))?;
        let mut req = tonic::Request::new(pb::ChunkData {
            hash: hash.to_vec(),
            data,
        });
        req.set_timeout(CHUNK_RPC_TIMEOUT);
        client.put_chunk(req).await?;
        Ok(())
    }

    /// Fetches a chunk from the peer; the caller verifies it.
    pub async fn get_chunk(
        &self,
        target: NodeId,
        addr: &str,
        hash: &crate::domain::Digest,
    ) -> Result<Vec<u8>, tonic::Status> {
        let mut client = self
            .client(target, addr)
            .map_err(|e| tonic::Status::unavailable(format!("node {target} unreachable: {e}")))?;
        let mut req = tonic::Request::new(pb::ChunkId {
            hash: hash.to_vec(),
        });
        req.set_timeout(CHUNK_RPC_TIMEOUT);
        Ok(client.get_chunk(req).await?.into_inner().data)
    }

    /// Relays a client request to the leader; gRPC errors pass through unchanged.
    pub async fn forward(
        &self,
        leader: NodeId,
        leader_node: &EscrowNode,
        request: &ForwardRequest,
    ) -> Result<ForwardReply, tonic::Status> {
        let mut client = self
            .client(leader, &leader_node.raft_addr)
            .map_err(|e| tonic::Status::unavailable(format!("leader {leader} unreachable: {e}")))?;
        let mut req = tonic::Request::new(pb::RaftMessage {
            payload: codec::encode(request),
        });
        req.set_timeout(FORWARD_TIMEOUT);
        let reply = client.forward(req).await?.into_inner();
        codec::decode(&reply.payload)
            .map_err(|e| tonic::Status::internal(format!("bad forward reply from leader: {e}")))
    }
}

/// Creates per-target network clients for openraft.
#[derive(Clone)]
pub struct NetworkFactory {
    clients: Arc<PeerClients>,
    snapshot_frame_wait: Duration,
}

impl NetworkFactory {
    /// `snapshot_frame_wait` (`raft.snapshot_frame_wait_ms`): the longest a snapshot stream to
    /// a peer may wait for the peer to take its next frame.
    pub fn new(clients: Arc<PeerClients>, snapshot_frame_wait: Duration) -> Self {
        Self {
            clients,
            snapshot_frame_wait,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &EscrowNode) -> PeerNetwork {
        PeerNetwork {
            target,
            addr: node.raft_addr.clone(),
            clients: self.clients.clone(),
            snapshot_frame_wait: self.snapshot_frame_wait,
        }
    }
}

pub struct PeerNetwork {
    target: NodeId,
    addr: String,
    clients: Arc<PeerClients>,
    snapshot_frame_wait: Duration,
}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, EscrowNode, RaftError<NodeId, E>>;

fn status_to_rpc<E: std::error::Error>(status: tonic::Status) -> RPCError<NodeId, EscrowNode, E> {
    match status.code() {
        // FailedPrecondition: the address reached another node (`peer::addressed_here`), so
        // the target is unreachable there; openraft backs off instead of retrying at once.
        tonic::Code::Unavailable | tonic::Code::FailedPrecondition => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

impl PeerNetwork {
    async fn unary<Req, Resp>(
        &mut self,
        kind: RpcKind,
        rpc: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr>
    where
        Req: Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let mut client = self
            .clients
            .client(self.target, &self.addr)
            .map_err(RPCError::Unreachable)?;
        let mut req = tonic::Request::new(pb::RaftMessage {
            payload: codec::encode(rpc),
        });
        req.set_timeout(option.hard_ttl());
        let reply = match kind {
            RpcKind::Append => client.append_entries(req).await,
            RpcKind::Vote => client.vote(req).await,
        }
        .map_err(status_to_rpc)?
        .into_inner();
        let result: Result<Resp, RaftError<NodeId>> =
            codec::decode(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

enum RpcKind {
    Append,
    Vote,
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        if self.clients.faults.drops(&rpc) {
            return Err(RPCError::Unreachable(Unreachable::new(
                &std::io::Error::other("final membership entry held back by fault injection"),
            )));
        }
        self.unary(RpcKind::Append, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        self.unary(RpcKind::Vote, &rpc, &option).await
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: Snapshot,
        cancel: impl Future<Output = ReplicationClosed> + Send + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<NodeId>, StreamingError<TypeConfig, Fatal<NodeId>>> {
        let mut client = self
            .clients
            .client(self.target, &self.addr)
            .map_err(StreamingError::Unreachable)?;
        let header = pb::SnapshotHeader {
            vote_and_meta: codec::encode(&(vote, snapshot.meta.clone())),
            files: snapshot
                .snapshot
                .files
                .iter()
                .map(|f| pb::SnapshotFile {
                    name: f.name.clone(),
                    size: f.size,
                    blake3: f.blake3.to_vec(),
                })
                .collect(),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_FRAMES_IN_FLIGHT);
        let dir = snapshot.snapshot.path.clone();
        let files = snapshot.snapshot.files.clone();
        let frame_wait = self.snapshot_frame_wait;
        let mut reader = tokio::spawn(async move {
            // A frame the stream has not taken within `frame_wait`: the receiver stopped
            // reading (HTTP/2 flow control holds the stream), so the transfer is abandoned.
            let send = |frame| {
                let tx = tx.clone();
                async move {
                    match tokio::time::timeout(
                        frame_wait,
                        tx.send(pb::SnapshotFrame { frame: Some(frame) }),
                    )
                    .await
                    {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(_)) => Err(std::io::Error::other("snapshot stream closed")),
                        Err(_) => Err(std::io::Error::other(format!(
                            "the receiver took no snapshot frame for {} ms \
                             (raft.snapshot_frame_wait_ms); transfer abandoned",
                            frame_wait.as_millis()
                        ))),
                    }
                }
            };
            // Open every file before sending anything: a newer snapshot may prune this one
            // while it streams, and an open file stays readable after it is unlinked.
            let mut opened = Vec::with_capacity(files.len());
            for info in &files {
                opened.push(tokio::fs::File::open(dir.join(&info.name)).await?);
            }
            send(pb::snapshot_frame::Frame::Header(header)).await?;
            stream_files(opened, send).await
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        // No grpc-timeout: the whole transfer has no deadline (see SNAPSHOT_INSTALL_WAIT), and
        // `option` (openraft's install_snapshot_timeout) bounds only the wait for the answer.
        let call = client.install_snapshot(tonic::Request::new(stream));
        tokio::pin!(call);
        tokio::pin!(cancel);
        fn network<E: std::error::Error + 'static>(
            e: &E,
        ) -> StreamingError<TypeConfig, Fatal<NodeId>> {
            StreamingError::Network(NetworkError::new(e))
        }
        let reply = tokio::select! {
            closed = &mut cancel => {
                reader.abort();
                return Err(StreamingError::Closed(closed));
            }
            // Answered before the last frame was sent: refused (a receiver answers only once
            // the stream has ended).
            r = &mut call => {
                reader.abort();
                r
            }
            read = &mut reader => {
                match read {
                    Ok(Ok(())) => {}
                    // The stream ends short of its declared files (cancelled when `call` is
                    // dropped, or ended cleanly first), and the receiver refuses it: every
                    // declared file must arrive whole and match its blake3. A receiver that
                    // refused first (out of slots or disk, a bad frame) closed the stream, and
                    // its answer says why better than the closed stream does.
                    Ok(Err(e)) => {
                        if let Ok(Err(status)) =
                            tokio::time::timeout(SNAPSHOT_REFUSAL_GRACE, &mut call).await
                        {
                            return Err(network(&status));
                        }
                        return Err(network(&e));
                    }
                    Err(e) => return Err(network(&e)),
                }
                // openraft's install_snapshot_timeout: SNAPSHOT_INSTALL_WAIT (node::raft_config).
                let install_wait = option.hard_ttl();
                tokio::select! {
                    closed = &mut cancel => return Err(StreamingError::Closed(closed)),
                    r = tokio::time::timeout(install_wait, &mut call) => r.map_err(|_| {
                        network(&std::io::Error::other(format!(
                            "no answer within {install_wait:?} of the snapshot's last frame"
                        )))
                    })?,
                }
            }
        };
        let reply = reply.map_err(|s| network(&s))?.into_inner();
        let result: Result<SnapshotResponse<NodeId>, Fatal<NodeId>> =
            codec::decode(&reply.payload).map_err(|e| network(&e))?;
        result.map_err(|e| StreamingError::RemoteError(RemoteError::new(self.target, e)))
    }
}

async fn stream_files<F, Fut>(files: Vec<tokio::fs::File>, send: F) -> Result<(), std::io::Error>
where
    F: Fn(pb::snapshot_frame::Frame) -> Fut,
    Fut: Future<Output = Result<(), std::io::Error>>,
{
    for (index, mut file) in files.into_iter().enumerate() {
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; SNAPSHOT_FRAME_BYTES];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            buf.truncate(n);
            send(pb::snapshot_frame::Frame::Data(pb::SnapshotData {
                file_index: index as u32,
                offset,
                data: buf,
            }))
            .await?;
            offset += n as u64;
        }
    }
    Ok(())
}
