//! gRPC services (one per file) and the request core they share.
//!
//! Errors map to gRPC status codes in one place, [`status`]: bad input → INVALID_ARGUMENT or
//! RESOURCE_EXHAUSTED, no leader / lost leadership → UNAVAILABLE, no quorum within the commit
//! timeout → DEADLINE_EXCEEDED, a business rejection → FAILED_PRECONDITION.

pub mod client;
pub mod peer;

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, RaftError};
use tonic::Status;

use crate::domain::{InputError, RecordPath, RecordVersion};
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

/// Everything a request handler needs: the Raft handle, the applied state and the peers.
pub struct Core {
    pub id: NodeId,
    pub cluster_name: String,
    pub raft: Raft,
    pub reader: SmReader,
    pub peers: Arc<PeerClients>,
    pub metrics: Arc<Metrics>,
    pub initial_members: Vec<(NodeId, EscrowNode)>,
}

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

    pub fn no_leader() -> Status {
        Status::unavailable(
            "no leader is elected right now (election in progress or no quorum); retry shortly",
        )
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
        let started = Instant::now();
        let result = tokio::time::timeout(
            WRITE_COMMIT_TIMEOUT,
            self.raft.client_write(command.clone()),
        )
        .await;
        match result {
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the write was not committed within {}s (is a quorum of nodes reachable?); its outcome is unknown",
                WRITE_COMMIT_TIMEOUT.as_secs()
            ))),
            Ok(Ok(resp)) => {
                self.metrics
                    .commit_latency_seconds
                    .observe(started.elapsed().as_secs_f64());
                Ok(resp.data)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                match (may_forward, f.leader_id, f.leader_node) {
                    (true, Some(id), Some(node)) if id != self.id => {
                        match self.peers.forward(id, &node, &ForwardRequest::Write(command)).await? {
                            ForwardReply::Written(o) => Ok(o),
                            ForwardReply::Read { .. } => {
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
            Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e)))) => {
                Err(Status::failed_precondition(e.to_string()))
            }
            Ok(Err(RaftError::Fatal(e))) => Err(status::fatal(e)),
        }
    }

    /// Reads a record. Linearizable reads are confirmed by the leader with a quorum
    /// (ReadIndex); local reads come from this node's applied state.
    pub async fn read(
        &self,
        path: RecordPath,
        linearizable: bool,
        may_forward: bool,
    ) -> Result<(Option<RecordVersion>, u64), Status> {
        if linearizable {
            let confirmed =
                tokio::time::timeout(READ_CONFIRM_TIMEOUT, self.raft.ensure_linearizable()).await;
            match confirmed {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "leadership could not be confirmed with a quorum within {}s",
                        READ_CONFIRM_TIMEOUT.as_secs()
                    )))
                }
                Ok(Ok(_)) => {}
                Ok(Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f)))) => {
                    return match (may_forward, f.leader_id, f.leader_node) {
                        (true, Some(id), Some(node)) if id != self.id => {
                            match self
                                .peers
                                .forward(id, &node, &ForwardRequest::Read(path))
                                .await?
                            {
                                ForwardReply::Read {
                                    version,
                                    read_index,
                                } => Ok((version, read_index)),
                                ForwardReply::Written(_) => {
                                    Err(Status::internal("leader answered a read with a write"))
                                }
                            }
                        }
                        (false, _, _) => Err(Status::unavailable(
                            "leadership moved while the request was forwarded; retry",
                        )),
                        _ => Err(status::no_leader()),
                    };
                }
                Ok(Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e)))) => {
                    return Err(Status::unavailable(e.to_string()))
                }
                Ok(Err(RaftError::Fatal(e))) => return Err(status::fatal(e)),
            }
        }
        let read_index = self.reader.applied_index();
        let version = self.reader.get_record(&path).map_err(status::storage)?;
        Ok((version, read_index))
    }

    /// The current leader as known by this node.
    pub fn leader(&self) -> Option<(NodeId, EscrowNode)> {
        let m = self.raft.metrics().borrow().clone();
        let id = m.current_leader?;
        let node = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, node))
    }
}
