//! gRPC services (one per file) and the request core they share.
//!
//! Errors map to gRPC status codes in one place, [`status`]: bad input → INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED, no leader / lost leadership → UNAVAILABLE, no quorum within the commit
//! timeout → DEADLINE_EXCEEDED, a business rejection → FAILED_PRECONDITION.

pub mod artifacts;
pub mod client;
pub mod integrity;
pub mod peer;
pub mod tenants;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot};
use tonic::Status;

use crate::domain::InputError;
use crate::ledger::{Command, Outcome};
use crate::metrics::Metrics;
use crate::raft::network::{ForwardReply, ForwardRequest, PeerClients};
use crate::raft::{EscrowNode, NodeId, Raft};
use crate::store::SmReader;

/// How long a write may wait for a quorum before the client gets DEADLINE_EXCEEDED. The write
/// may still commit later: the error says its outcome is unknown.
pub const WRITE_COMMIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a linearizable read may wait to confirm leadership with a quorum.
pub const READ_CONFIRM_TIMEOUT: Duration = Duration::from_secs(5);
/// Metadata key naming the leader's client address when a request is redirected.
pub const LEADER_HINT: &str = "x-escrow-leader";
/// Metadata key marking a write refused because a voter's disk is under its reserve (a
/// RESOURCE_EXHAUSTED that passes once space is freed, unlike a size limit); its value is the
/// node's id.
pub const LOW_DISK_HINT: &str = "x-escrow-low-disk";
/// Commands one log entry carries at most.
pub const BATCH_COMMANDS_MAX: usize = 1024;
/// Bytes of commands one log entry carries at most (a single larger command goes alone). With
/// `node::RAFT_PAYLOAD_ENTRIES_MAX` entries per AppendEntries this keeps replication messages
/// under `raft::network::PEER_MESSAGE_BYTES_MAX`.
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Commands waiting to be batched; beyond it writers wait (within their deadline).
const PROPOSAL_QUEUE_DEPTH: usize = 16 * 1024;

/// What became of a proposed command.
#[derive(Clone)]
enum Proposed {
    Done(Outcome),
    /// This node is not the leader; the caller forwards the command itself.
    NotLeader(Option<NodeId>, Option<EscrowNode>),
    Failed(Status),
}

type Proposal = (Command, oneshot::Sender<Proposed>);

/// Groups concurrent client commands into one Raft entry each round.
///
/// openraft appends one entry per `client_write`, and every entry costs each replica a fixed
/// amount of work (an fsync, a peer RPC, an apply), so unbatched writes would pay it once per
/// write. Batching here makes the Raft log carry one entry (one fsync per replica) for every
/// group of writes that arrived while the previous group was being committed.
pub struct Proposer {
    tx: mpsc::Sender<Proposal>,
}

impl Proposer {
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE_DEPTH);
        tokio::spawn(run_proposer(raft, rx));
        Self { tx }
    }
}

async fn run_proposer(raft: Raft, mut rx: mpsc::Receiver<Proposal>) {
    let mut carry: Option<Proposal> = None;
    loop {
        let first = match carry.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        let (commands, waiters) = drain_batch(first, &mut rx, &mut carry);
        if commands.is_empty() {
            continue;
        }
        // One batch in flight: while it commits, new commands queue and form the next batch,
        // so one fsync carries many writes under load. A second batch in flight made both
        // smaller and cost more CPU per write without adding writes/s, as the node is CPU-bound
        // at that load (README, Benchmarks). The batch is proposed from this
        // task, not a spawned one: the next batch then starts the moment this one is answered,
        // instead of waiting behind every task the answers woke (README, Benchmarks).
        let count = waiters.len();
        // A panic while proposing fails this batch's writers, not every later write.
        let answers = std::panic::AssertUnwindSafe(propose(&raft, commands))
            .catch_unwind()
            .await
            .unwrap_or_else(|_| {
                tracing::error!("proposing a batch panicked; its writes failed");
                vec![Proposed::Failed(Status::internal("proposing the write failed")); count]
            });
        for (waiter, answer) in waiters.into_iter().zip(answers) {
            let _ = waiter.send(answer);
        }
    }
}

/// Takes `first` and whatever else is queued, up to [`BATCH_COMMANDS_MAX`] commands and
/// [`BATCH_BYTES_MAX`] bytes; the command that would overflow the bytes is left in `carry`.
fn drain_batch(
    first: Proposal,
    rx: &mut mpsc::Receiver<Proposal>,
    carry: &mut Option<Proposal>,
) -> (Vec<Command>, Vec<oneshot::Sender<Proposed>>) {
    let mut commands = Vec::new();
    let mut waiters = Vec::new();
    let mut bytes = 0usize;
    let mut next = Some(first);
    while let Some((command, waiter)) = next.take() {
        // A writer that gave up (deadline) is not proposed at all.
        if !waiter.is_closed() {
            let size = command.size_hint();
            if !commands.is_empty() && bytes + size > BATCH_BYTES_MAX {
                *carry = Some((command, waiter));
                break;
            }
            bytes += size;
            commands.push(command);
            waiters.push(waiter);
        }
        if commands.len() < BATCH_COMMANDS_MAX {
            next = rx.try_recv().ok();
        }
    }
    (commands, waiters)
}

/// Proposes one batch and returns one answer per command: its outcome, or the failure they
/// all share.
async fn propose(raft: &Raft, commands: Vec<Command>) -> Vec<Proposed> {
    let count = commands.len();
    // The leader stamps its clock here (the state machine itself has no clock); a proposal on
    // a node that is not the leader fails and is forwarded unstamped.
    let command = Command::Timed {
        at_ms: now_ms(),
        commands,
    };
    let shared = match raft.client_write(command).await {
        Ok(resp) => match resp.data {
            Outcome::Batch(outcomes) if outcomes.len() == count => {
                return outcomes.into_iter().map(Proposed::Done).collect();
            }
            _ => Proposed::Failed(Status::internal(
                "batch outcome does not match its commands",
            )),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Proposed::NotLeader(f.leader_id, f.leader_node)
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Proposed::Failed(Status::failed_precondition(e.to_string()))
        }
        Err(RaftError::Fatal(e)) => Proposed::Failed(status::fatal(&e)),
    };
    vec![shared; count]
}

/// How tonic's decoder words its refusal of a request message over the service's limit.
const TONIC_DECODE_LIMIT_MESSAGE: &str = "Error, decoded message length too large";

/// Gives a request message over the decoding limit RESOURCE_EXHAUSTED, the code gRPC assigns a
/// message larger than the configured limit and the one this API answers for every size limit;
/// tonic's decoder answers it OUT_OF_RANGE. Its message (sizes found and allowed) is kept. Such a
/// refusal is answered trailers-only, so its status is in the response's headers; every other
/// response passes unchanged.
pub fn oversized_request_is_resource_exhausted<B>(
    mut response: tonic::codegen::http::Response<B>,
) -> tonic::codegen::http::Response<B> {
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    if status.code() != tonic::Code::OutOfRange
        || !status.message().starts_with(TONIC_DECODE_LIMIT_MESSAGE)
    {
        return response;
    }
    if let Err(e) = Status::resource_exhausted(status.message()).add_header(response.headers_mut())
    {
        tracing::warn!(error = %e, "cannot rewrite an oversized request's status");
    }
    response
}

/// The wall clock in ms since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Everything a request handler needs: the Raft handle, the applied state and the peers.
pub struct Core {
    pub id: NodeId,
    pub cluster_name: String,
    pub mirror: crate::config::MirrorSettings,
    pub raft: Raft,
    pub reader: SmReader,
    pub chunks: Arc<crate::chunks::ChunkStore>,
    /// Wakes the scrubber for a round now (deep verify found a bad copy).
    pub scrub_kick: tokio::sync::Notify,
    /// Asks chunk sync for a pass as soon as this node's disk has room (a scrub repair that
    /// could not keep its copy).
    pub chunk_sync_wanted: std::sync::atomic::AtomicBool,
    pub integrity: crate::config::IntegritySettings,
    /// Signs attestations; its public key is in the node's status.
    pub identity: ed25519_dalek::SigningKey,
    pub peers: Arc<PeerClients>,
    pub metrics: Arc<Metrics>,
    pub initial_members: Vec<(NodeId, EscrowNode)>,
    pub proposer: Proposer,
    /// Deep checks running on this node, [`DEEP_CHECKS_AT_ONCE`] at most: each reads the whole
    /// store and re-hashes every chunk it references.
    pub deep_checks: tokio::sync::Semaphore,
    /// Snapshot streams being received, [`peer::SNAPSHOT_RECEIVES_AT_ONCE`] at most.
    pub snapshot_receives: tokio::sync::Semaphore,
    /// `raft.snapshot_frame_wait_ms`: the longest wait for a snapshot stream's next frame.
    pub snapshot_frame_wait: std::time::Duration,
    /// Every voter's free disk space against its reserve: writes that add data are refused
    /// while one is under it.
    pub disk: Arc<crate::workers::disk::DiskGuard>,
}

/// Deep checks one node runs at once; another asked meanwhile is refused, not queued.
pub const DEEP_CHECKS_AT_ONCE: usize = 1;

pub mod status {
    //! The one table from errors to gRPC status codes.
    use super::*;

    pub fn input(e: InputError) -> Status {
        if e.is_too_large() {
            Status::resource_exhausted(e.to_string())
        } else {
            Status::invalid_argument(e.to_string())
        }
    }

    /// A business rejection from the state machine, or an outcome the handler did not expect.
    pub fn rejected(outcome: Outcome) -> Status {
        use crate::ledger::Rejection;
        match outcome {
            Outcome::Rejected { kind, reason } => match kind {
                Rejection::Invalid => Status::invalid_argument(reason),
                Rejection::UnknownTenant => Status::not_found(reason),
                Rejection::AlreadyExists => Status::already_exists(reason),
                Rejection::Refused => Status::failed_precondition(reason),
            },
            other => Status::internal(format!("unexpected outcome {other:?}")),
        }
    }

    pub fn no_leader() -> Status {
        Status::unavailable(
            "no leader is elected right now (election in progress or no quorum); retry shortly",
        )
    }

    /// A write refused while a voter's disk is under its reserve: RESOURCE_EXHAUSTED with
    /// [`LOW_DISK_HINT`], so agents wait and resend instead of giving up.
    pub fn low_disk(refusal: crate::workers::disk::Refusal) -> Status {
        let mut s = Status::resource_exhausted(refusal.to_string());
        s.metadata_mut().insert(
            LOW_DISK_HINT,
            refusal.node.to_string().parse().expect("digits"),
        );
        s
    }

    pub fn storage(e: impl std::fmt::Display) -> Status {
        Status::internal(format!("storage error: {e}"))
    }

    pub fn fatal(e: impl std::fmt::Display) -> Status {
        Status::unavailable(format!("this node's Raft has stopped: {e}"))
    }

    /// Redirect to the leader: the client library follows the hint by itself.
    pub fn not_leader(leader: Option<(NodeId, &EscrowNode)>) -> Status {
        match leader {
            None => no_leader(),
            Some((id, node)) => {
                let mut s = Status::failed_precondition(format!(
                    "not the leader; the leader is node {id} at {}",
                    node.client_addr
                ));
                if let Ok(v) = node.client_addr.parse() {
                    s.metadata_mut().insert(LEADER_HINT, v);
                }
                s
            }
        }
    }
}

impl Core {
    /// Proposes `command`; on a follower, relays it to the leader (one hop at most).
    pub async fn write(&self, command: Command, may_forward: bool) -> Result<Outcome, Status> {
        if command.adds_data() {
            if let Some(refusal) = self.disk.refusal() {
                return Err(status::low_disk(refusal));
            }
        }
        let started = Instant::now();
        let (tx, rx) = oneshot::channel();
        let proposed = async {
            let stopped = || status::fatal("the proposer has stopped");
            self.proposer
                .tx
                .send((command.clone(), tx))
                .await
                .map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())
        };
        match tokio::time::timeout(WRITE_COMMIT_TIMEOUT, proposed).await {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the write was not committed within {}s (is a quorum of nodes reachable?); its outcome is unknown",
                WRITE_COMMIT_TIMEOUT.as_secs()
            ))),
            Ok(Err(status)) | Ok(Ok(Proposed::Failed(status))) => Err(status),
            Ok(Ok(Proposed::Done(outcome))) => {
                self.metrics
                    .commit_latency_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(outcome)
            }
            Ok(Ok(Proposed::NotLeader(leader_id, leader_node))) => {
                match (may_forward, leader_id, leader_node) {
                    (true, Some(id), Some(node)) if id != self.id => {
                        match self.peers.forward(id, &node, &ForwardRequest::Write(command)).await? {
                            ForwardReply::Written(o) => Ok(o),
                            ForwardReply::ReadIndex(_) => {
                                Err(Status::internal("leader answered a write with a read"))
                            }
                        }
                    }
                    (false, _, _) => Err(Status::unavailable(
                        "leadership moved while the request was forwarded; retry",
                    )),
                    _ => Err(status::no_leader()),
                }
            }
        }
    }

    /// Makes the following local reads linearizable and returns the index they are served at.
    ///
    /// On the leader: ReadIndex (`ensure_linearizable`, confirmed with a quorum). On a
    /// follower: asks the leader for its read index (one hop), then waits until this node has
    /// applied up to it. With `linearizable` false, the node's applied index as is.
    pub async fn read_barrier(&self, linearizable: bool, may_forward: bool) -> Result<u64, Status> {
        if !linearizable {
            return Ok(self.reader.applied_index());
        }
        let confirmed =
            tokio::time::timeout(READ_CONFIRM_TIMEOUT, self.raft.ensure_linearizable()).await;
        let leader_index = match confirmed {
            Err(_) => {
                return Err(Status::deadline_exceeded(format!(
                    "leadership could not be confirmed with a quorum within {}s",
                    READ_CONFIRM_TIMEOUT.as_secs()
                )))
            }
            Ok(Ok(_)) => return Ok(self.reader.applied_index()),
            Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                match (may_forward, f.leader_id, f.leader_node) {
                    (true, Some(id), Some(node)) if id != self.id => {
                        match self
                            .peers
                            .forward(id, &node, &ForwardRequest::ReadIndex)
                            .await?
                        {
                            ForwardReply::ReadIndex(index) => index,
                            ForwardReply::Written(_) => {
                                return Err(Status::internal("leader answered a read with a write"))
                            }
                        }
                    }
                    (false, _, _) => {
                        return Err(Status::unavailable(
                            "leadership moved while the request was forwarded; retry",
                        ))
                    }
                    _ => return Err(status::no_leader()),
                }
            }
            Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                return Err(Status::unavailable(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => return Err(status::fatal(e)),
        };
        self.raft
            .wait(Some(READ_CONFIRM_TIMEOUT))
            .applied_index_at_least(Some(leader_index), "linearizable read")
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "this node did not catch up with the leader's read index {leader_index}: {e}"
                ))
            })?;
        Ok(self.reader.applied_index())
    }

    /// The voters of the current membership, with their addresses.
    pub fn voters(&self) -> Vec<(NodeId, EscrowNode)> {
        let metrics = self.raft.metrics();
        let membership = metrics.borrow();
        let membership = membership.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| Some((id, membership.get_node(&id)?.clone())))
            .collect()
    }

    /// The current leader as known by this node.
    pub fn leader(&self) -> Option<(NodeId, EscrowNode)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }
}
