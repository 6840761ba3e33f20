//! Client-facing services: records and cluster operations. Every input is validated here, at
//! the edge, before it becomes a command.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use tonic::{Request, Response, Status};

use super::{status, Core};
use crate::config::{validate_host_port, BOOTSTRAP_VOTERS_ALLOWED};
use crate::domain::{
    validate_changes, validate_node_id, validate_value, Change, Collection, RecordKey, RecordPath,
    RecordVersion, SourceId, TenantId, INGEST_CHANGES_MAX,
};
use crate::ledger::{Command, Outcome};
use crate::pb;
use crate::raft::{EscrowNode, NodeId};
use crate::store::RecordAt;

/// Versions one history page returns at most.
pub const HISTORY_PAGE_MAX: usize = 1000;
/// Value bytes one history page returns at most (beyond its first version), so a page fits
/// in one client message.
pub const HISTORY_PAGE_BYTES_MAX: usize = 2 * 1024 * 1024;
const _: () = assert!(
    HISTORY_PAGE_BYTES_MAX + HISTORY_PAGE_MAX * 64 <= crate::node::CLIENT_MESSAGE_BYTES_MAX
);
/// How long `cluster add` waits for a new learner to catch up before giving up.
pub const LEARNER_CATCH_UP_TIMEOUT: Duration = Duration::from_secs(600);
/// How long `cluster add` waits for a new node to answer over the peer port before it changes
/// the membership (longer than a peer connection's connect timeout).
pub const NEW_MEMBER_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

fn record_path(r: Option<pb::RecordRef>) -> Result<RecordPath, Status> {
    let r =
        r.ok_or_else(|| Status::invalid_argument("record (tenant, collection, key) is required"))?;
    RecordPath::parse(&r.tenant, &r.collection, &r.key).map_err(status::input)
}

fn tenant_and_source(tenant: &str, source: &str) -> Result<(TenantId, SourceId), Status> {
    Ok((
        TenantId::parse(tenant).map_err(status::input)?,
        SourceId::parse(source).map_err(status::input)?,
    ))
}

/// Converts wire changes into domain changes, naming the first bad one by position.
fn changes(raw: Vec<pb::Change>) -> Result<Vec<Change>, Status> {
    if raw.len() > INGEST_CHANGES_MAX {
        return Err(Status::resource_exhausted(format!(
            "{} changes in one batch, over the limit of {INGEST_CHANGES_MAX}",
            raw.len()
        )));
    }
    let mut out = Vec::with_capacity(raw.len());
    for (i, c) in raw.into_iter().enumerate() {
        let at = |e: crate::domain::InputError| {
            let s = status::input(e);
            Status::new(
                s.code(),
                format!("change {i} (seq {}): {}", c.seq, s.message()),
            )
        };
        let value = match (c.delete, c.value.is_empty()) {
            (true, true) => None,
            (true, false) => {
                return Err(Status::invalid_argument(format!(
                    "change {i} (seq {}): a delete carries no value",
                    c.seq
                )))
            }
            (false, _) => Some(c.value.clone()),
        };
        out.push(Change {
            collection: Collection::parse(&c.collection).map_err(at)?,
            key: RecordKey::parse(&c.key).map_err(at)?,
            value,
            seq: c.seq,
            source_ms: c.source_ms,
        });
    }
    validate_changes(&out).map_err(status::input)?;
    Ok(out)
}

fn version_reply(position: u32, v: RecordVersion) -> pb::RecordVersion {
    pb::RecordVersion {
        position,
        revision: v.revision,
        time_ms: v.time_ms,
        deleted: v.value.is_none(),
        value: v.value.unwrap_or_default(),
    }
}

pub struct RecordsService {
    pub core: Arc<Core>,
}

#[tonic::async_trait]
impl pb::records_server::Records for RecordsService {
    async fn put(
        &self,
        request: Request<pb::PutRequest>,
    ) -> Result<Response<pb::PutReply>, Status> {
        let req = request.into_inner();
        let path = record_path(req.record)?;
        validate_value(&req.value).map_err(status::input)?;
        match self
            .core
            .write(
                Command::PutRecord {
                    path,
                    value: req.value,
                },
                true,
            )
            .await?
        {
            Outcome::Written { revision } => Ok(Response::new(pb::PutReply { revision })),
            other => Err(status::rejected(other)),
        }
    }

    async fn get(
        &self,
        request: Request<pb::GetRequest>,
    ) -> Result<Response<pb::GetReply>, Status> {
        let req = request.into_inner();
        let path = record_path(req.record)?;
        let at = match (req.revision, req.as_of_ms) {
            (0, 0) => None,
            (r, 0) => Some(RecordAt::Revision(r)),
            (0, t) => Some(RecordAt::Time(t)),
            _ => {
                return Err(Status::invalid_argument(
                    "give either a revision or an as-of time, not both",
                ))
            }
        };
        let linearizable = req.consistency != pb::ReadConsistency::Local as i32;
        let read_index = self.core.read_barrier(linearizable, true).await?;
        let reader = &self.core.reader;
        let version = match at {
            None => reader.get_record(&path),
            Some(at) => reader.get_record_at(&path, at),
        }
        .map_err(status::storage)?;
        Ok(Response::new(match version {
            Some(v) => {
                let v = version_reply(0, v);
                pb::GetReply {
                    found: !v.deleted,
                    value: v.value,
                    revision: v.revision,
                    read_index,
                    deleted: v.deleted,
                    time_ms: v.time_ms,
                }
            }
            None => pb::GetReply {
                found: false,
                read_index,
                ..Default::default()
            },
        }))
    }

    async fn delete(
        &self,
        request: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteReply>, Status> {
        let path = record_path(request.into_inner().record)?;
        match self
            .core
            .write(Command::DeleteRecord { path }, true)
            .await?
        {
            Outcome::Deleted { revision, existed } => {
                Ok(Response::new(pb::DeleteReply { revision, existed }))
            }
            other => Err(status::rejected(other)),
        }
    }

    async fn history(
        &self,
        request: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryReply>, Status> {
        let req = request.into_inner();
        let path = record_path(req.record)?;
        let limit = match req.limit as usize {
            0 => HISTORY_PAGE_MAX,
            n => n.min(HISTORY_PAGE_MAX),
        };
        let linearizable = req.consistency != pb::ReadConsistency::Local as i32;
        let read_index = self.core.read_barrier(linearizable, true).await?;
        let versions = self
            .core
            .reader
            .record_history(
                &path,
                (req.before_revision != 0).then_some((req.before_revision, req.before_position)),
                limit,
                HISTORY_PAGE_BYTES_MAX,
            )
            .map_err(status::storage)?;
        Ok(Response::new(pb::HistoryReply {
            versions: versions
                .into_iter()
                .map(|(position, v)| version_reply(position, v))
                .collect(),
            read_index,
        }))
    }

    async fn ingest(
        &self,
        request: Request<pb::IngestRequest>,
    ) -> Result<Response<pb::IngestReply>, Status> {
        let req = request.into_inner();
        let (tenant, source) = tenant_and_source(&req.tenant, &req.source)?;
        let changes = changes(req.changes)?;
        let command = Command::Ingest {
            tenant,
            source,
            changes,
        };
        match self.core.write(command, true).await? {
            Outcome::Ingested {
                revision,
                applied,
                duplicates,
                position,
            } => Ok(Response::new(pb::IngestReply {
                revision,
                applied,
                duplicates,
                position,
            })),
            other => Err(status::rejected(other)),
        }
    }

    async fn source_position(
        &self,
        request: Request<pb::SourcePositionRequest>,
    ) -> Result<Response<pb::SourcePositionReply>, Status> {
        let req = request.into_inner();
        let (tenant, source) = tenant_and_source(&req.tenant, &req.source)?;
        self.core.read_barrier(true, true).await?;
        let p = self
            .core
            .reader
            .source_position(&tenant, &source)
            .map_err(status::storage)?;
        Ok(Response::new(pb::SourcePositionReply {
            position: p.last_seq,
            last_source_ms: p.last_source_ms,
            revision: p.revision,
        }))
    }
}

pub struct ClusterService {
    pub core: Arc<Core>,
}

/// What `cluster add` does for a node, given the membership the leader holds.
#[derive(Debug, PartialEq, Eq)]
enum AddPlan {
    /// Not a member: add it as a learner (then promote it unless the add is learner-only).
    AddLearner,
    /// A learner already (an earlier add ended before its promotion): wait for it to catch
    /// up, then promote it.
    PromoteLearner,
    /// A voter of the new half of a joint configuration whose old half it is not in: a
    /// promotion cut short between openraft's two membership steps. Finish it.
    FinishPromotion,
}

/// Decides what an add of node `id` at `node`'s addresses does, or why it is refused. An add
/// never changes a member's addresses, and never undoes a removal cut short in its joint
/// configuration (only `cluster remove` again finishes that).
fn plan_add(
    membership: &openraft::Membership<NodeId, EscrowNode>,
    id: NodeId,
    node: &EscrowNode,
    learner_only: bool,
) -> Result<AddPlan, Status> {
    let Some(existing) = membership.get_node(&id) else {
        return Ok(AddPlan::AddLearner);
    };
    let configs = membership.get_joint_config();
    let in_old = configs.first().is_some_and(|c| c.contains(&id));
    let in_new = configs.last().is_some_and(|c| c.contains(&id));
    match (in_old, in_new) {
        (true, true) => {
            return Err(Status::already_exists(format!(
                "node {id} is already a voter in this cluster"
            )))
        }
        (true, false) => {
            return Err(Status::failed_precondition(format!(
                "node {id} is being removed: the cluster is in a joint configuration that \
                 leaves it out (a removal cut short); `cluster remove --id {id}` finishes it"
            )))
        }
        _ => {}
    }
    if existing != node {
        let what = if in_new {
            "a voter being promoted"
        } else {
            "a learner"
        };
        return Err(Status::failed_precondition(format!(
            "node {id} is {what} with raft address {} and client address {}; an add with \
             other addresses cannot promote it (remove it and add a new id)",
            existing.raft_addr, existing.client_addr
        )));
    }
    match (in_new, learner_only) {
        (true, true) => Err(Status::already_exists(format!(
            "node {id} is already a voter in this cluster (its promotion was cut short: \
             the same add without --learner finishes it)"
        ))),
        (true, false) => Ok(AddPlan::FinishPromotion),
        (false, true) => Err(Status::already_exists(format!(
            "node {id} is already a learner in this cluster"
        ))),
        (false, false) => Ok(AddPlan::PromoteLearner),
    }
}

fn members_of(m: &openraft::Membership<NodeId, EscrowNode>) -> Vec<pb::Member> {
    let voters: BTreeSet<NodeId> = m.voter_ids().collect();
    m.nodes()
        .map(|(id, node)| pb::Member {
            id: *id,
            raft_addr: node.raft_addr.clone(),
            client_addr: node.client_addr.clone(),
            voter: voters.contains(id),
        })
        .collect()
}

impl ClusterService {
    fn require_leader(&self) -> Result<(), Status> {
        let m = self.core.raft.metrics().borrow().clone();
        if m.current_leader == Some(self.core.id) && m.state == ServerState::Leader {
            return Ok(());
        }
        Err(status::not_leader(
            self.core.leader().as_ref().map(|(id, n)| (*id, n)),
        ))
    }

    /// Asks node `id` at `node`'s peer port for its disk reading, which names it, before a
    /// membership change (or the first one, at init); the error says why the node is not fit,
    /// for the caller to add what it left unchanged. An address where nothing answers, a node
    /// whose certificate is not from this cluster's CA (or that does not take this node's), or
    /// a node configured with another id (it refuses a request for another,
    /// `peer::addressed_here`) is refused with the reason. Unchecked, such a node became a
    /// learner nothing could reach, and its id was spent.
    async fn ask_member(
        &self,
        id: NodeId,
        node: &EscrowNode,
    ) -> Result<pb::DiskSpaceReply, String> {
        let addr = &node.raft_addr;
        // The outer bound covers the connect too (`grpc-timeout` starts once connected).
        let ask = self
            .core
            .peers
            .disk_space(id, addr, NEW_MEMBER_PROBE_TIMEOUT);
        let reply = match tokio::time::timeout(NEW_MEMBER_PROBE_TIMEOUT, ask).await {
            Ok(Ok(reply)) => reply,
            Err(_) => {
                return Err(format!(
                    "node {id} at {addr} did not answer within {}s (is it running, and is the \
                     address right?)",
                    NEW_MEMBER_PROBE_TIMEOUT.as_secs()
                ))
            }
            // A transport failure carries its cause as the status's source.
            Ok(Err(e)) if std::error::Error::source(&e).is_some() => {
                return Err(format!(
                    "node {id} at {addr} cannot be reached over mutual TLS (is it running, is \
                     the address right, and does it run with a certificate from this \
                     cluster's CA?): {}",
                    crate::transport::said(&e)
                ))
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "node {id} at {addr} answered {:?}: {}",
                    e.code(),
                    e.message()
                ))
            }
        };
        // A node of this build refuses a request for another id before answering
        // (`addressed_here`); one of an older build answers, naming itself.
        if reply.node != id {
            return Err(format!(
                "the node at {addr} is node {} (its config's node_id), not {id}",
                reply.node
            ));
        }
        Ok(reply)
    }

    /// Waits until the leader has replicated to `id` at least up to `index` (the entry that
    /// added it). openraft's own blocking add counts a learner within its lag threshold as
    /// caught up even when nothing reached it, so the check is made here on the matched index.
    async fn wait_caught_up(&self, id: NodeId, index: u64) -> Result<(), Status> {
        let mut metrics = self.core.raft.metrics();
        let deadline = tokio::time::Instant::now() + LEARNER_CATCH_UP_TIMEOUT;
        loop {
            {
                let m = metrics.borrow_and_update();
                if m.state != ServerState::Leader {
                    return Err(Status::unavailable(format!(
                        "leadership changed while node {id} was catching up; it stays a learner, retry the add to promote it"
                    )));
                }
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&id).copied().flatten());
                if matched.is_some_and(|l| l.index >= index) {
                    return Ok(());
                }
            }
            match tokio::time::timeout_at(deadline, metrics.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(status::fatal("raft stopped")),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "node {id} did not catch up within {}s; it stays a learner (the same add again promotes it once it has caught up)",
                        LEARNER_CATCH_UP_TIMEOUT.as_secs()
                    )))
                }
            }
        }
    }

    fn membership_reply(&self) -> Vec<pb::Member> {
        let m = self.core.raft.metrics().borrow().clone();
        members_of(m.membership_config.membership())
    }

    fn change_error(e: RaftError<NodeId, ClientWriteError<NodeId, EscrowNode>>) -> Status {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                Status::unavailable("leadership changed during the membership change; retry")
            }
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                Status::failed_precondition(e.to_string())
            }
            RaftError::Fatal(e) => status::fatal(e),
        }
    }
}

#[tonic::async_trait]
impl pb::cluster_server::Cluster for ClusterService {
    async fn init(
        &self,
        _request: Request<pb::InitRequest>,
    ) -> Result<Response<pb::InitReply>, Status> {
        let members = &self.core.initial_members;
        if members.is_empty() {
            return Err(Status::failed_precondition(
                "this node's config has no initial_members; init a node that lists the initial cluster",
            ));
        }
        // Already initialized says more than a voter count (a one-node `escrowd dev` cluster
        // bootstraps itself with one voter).
        if self
            .core
            .raft
            .is_initialized()
            .await
            .map_err(status::fatal)?
        {
            return Err(Status::already_exists("the cluster is already initialized"));
        }
        if !BOOTSTRAP_VOTERS_ALLOWED.contains(&members.len()) {
            return Err(Status::invalid_argument(format!(
                "a cluster bootstraps with {BOOTSTRAP_VOTERS_ALLOWED:?} voters, the config lists {}",
                members.len()
            )));
        }
        // Every other listed node must answer at its listed address as itself: a cluster is
        // never born with a voter nobody can reach or one answering for another. (This node
        // is not asked: reaching its own advertised address may need a hairpin route the
        // others do not.) Every failure is reported at once.
        let asks = members
            .iter()
            .filter(|(id, _)| *id != self.core.id)
            .map(|(id, node)| self.ask_member(*id, node));
        let unfit: Vec<String> = futures::future::join_all(asks)
            .await
            .into_iter()
            .filter_map(Result::err)
            .collect();
        if !unfit.is_empty() {
            return Err(Status::failed_precondition(format!(
                "nothing was initialized: {}; start every node initial_members lists, check \
                 the addresses and node ids, then init again",
                unfit.join("; ")
            )));
        }
        let map: BTreeMap<NodeId, EscrowNode> = members.iter().cloned().collect();
        match self.core.raft.initialize(map).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(Status::already_exists("the cluster is already initialized"))
            }
            Err(RaftError::APIError(InitializeError::NotInMembers(e))) => {
                return Err(Status::invalid_argument(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => return Err(status::fatal(e)),
        }
        Ok(Response::new(pb::InitReply {
            members: members
                .iter()
                .map(|(id, n)| pb::Member {
                    id: *id,
                    raft_addr: n.raft_addr.clone(),
                    client_addr: n.client_addr.clone(),
                    voter: true,
                })
                .collect(),
        }))
    }

    async fn node_status(
        &self,
        _request: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusReply>, Status> {
        let m = self.core.raft.metrics().borrow().clone();
        let state = match m.state {
            ServerState::Leader => "leader",
            ServerState::Follower => "follower",
            ServerState::Candidate => "candidate",
            ServerState::Learner => "learner",
            ServerState::Shutdown => "shutdown",
        };
        let disk = self.core.disk.local();
        let initialized = m.membership_config.membership().nodes().next().is_some();
        Ok(Response::new(pb::NodeStatusReply {
            id: self.core.id,
            state: state.into(),
            term: m.current_term,
            leader: m.current_leader.unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: m.last_applied.map(|l| l.index).unwrap_or(0),
            snapshot_index: m.snapshot.map(|l| l.index).unwrap_or(0),
            purged_index: m.purged.map(|l| l.index).unwrap_or(0),
            members: members_of(m.membership_config.membership()),
            initialized,
            cluster_name: self.core.cluster_name.clone(),
            identity_key: crate::domain::hex(self.core.identity.verifying_key().as_bytes()),
            disk_free_bytes: disk.and_then(|r| r.free),
            disk_reserve_bytes: disk.map(|r| r.reserve),
        }))
    }

    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::AddNodeReply>, Status> {
        let req = request.into_inner();
        let member = req.node.ok_or_else(|| {
            Status::invalid_argument("node (id, raft_addr, client_addr) is required")
        })?;
        let id = validate_node_id(member.id).map_err(status::input)?;
        for (what, addr) in [
            ("raft_addr", &member.raft_addr),
            ("client_addr", &member.client_addr),
        ] {
            validate_host_port(addr)
                .map_err(|r| Status::invalid_argument(format!("{what} {addr:?}: {r}")))?;
        }
        self.require_leader()?;
        let (current, last_log_index) = {
            let m = self.core.raft.metrics().borrow().clone();
            (m.membership_config.clone(), m.last_log_index.unwrap_or(0))
        };
        let node = EscrowNode {
            raft_addr: member.raft_addr,
            client_addr: member.client_addr,
        };
        // The entry the node must have before it gets a vote: the one that added it, or for a
        // learner added earlier (whose add ended before its promotion), everything the leader
        // holds now; none for a promotion cut short between the joint and the final config
        // (a leader change, a deadline), which only needs finishing.
        let plan = plan_add(current.membership(), id, &node, req.learner_only)?;
        let finishing = matches!(plan, AddPlan::FinishPromotion);
        let caught_up_at = match plan {
            AddPlan::FinishPromotion => {
                tracing::info!(node = id, "finishing the promotion of node");
                None
            }
            AddPlan::PromoteLearner => {
                tracing::info!(
                    node = id,
                    "learner already a member; waiting for it to catch up"
                );
                Some(last_log_index)
            }
            AddPlan::AddLearner => {
                if self
                    .core
                    .reader
                    .node_ever_member(id)
                    .map_err(status::storage)?
                {
                    return Err(Status::already_exists(format!(
                        "node id {id} was used before in this cluster; node ids are never reused, pick a new one"
                    )));
                }
                self.ask_member(id, &node).await.map_err(|why| {
                    Status::failed_precondition(format!("{why}; the membership is unchanged"))
                })?;
                tracing::info!(node = id, "adding learner");
                let added = self
                    .core
                    .raft
                    .add_learner(id, node.clone(), false)
                    .await
                    .map_err(Self::change_error)?;
                Some(added.log_id.index)
            }
        };
        if let Some(index) = caught_up_at {
            self.wait_caught_up(id, index).await?;
        }
        if !req.learner_only {
            // A voter under its disk reserve holds up every write that adds data (the disk
            // guard), so a learner is promoted only with room, read once it has caught up. A
            // promotion already in its joint configuration is finished whatever the disk.
            if !finishing {
                let stays = "it stays a learner (the same add again promotes it)";
                let reply = self
                    .ask_member(id, &node)
                    .await
                    .map_err(|why| Status::failed_precondition(format!("{why}; {stays}")))?;
                if let Some(low) = crate::workers::disk::Refusal::from_answer(&reply) {
                    return Err(Status::failed_precondition(format!(
                        "{}: as a voter it would hold up every write that adds data; give it \
                         room first; {stays}",
                        low.condition()
                    )));
                }
            }
            tracing::info!(node = id, "promoting learner to voter");
            self.core
                .raft
                .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                .await
                .map_err(Self::change_error)?;
        }
        Ok(Response::new(pb::AddNodeReply {
            members: self.membership_reply(),
        }))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::RemoveNodeReply>, Status> {
        let id = validate_node_id(request.into_inner().id).map_err(status::input)?;
        self.require_leader()?;
        let current = self.core.raft.metrics().borrow().membership_config.clone();
        let membership = current.membership();
        if membership.get_node(&id).is_none() {
            return Err(Status::not_found(format!("node {id} is not a member")));
        }
        let is_voter = membership.voter_ids().any(|v| v == id);
        if is_voter && membership.voter_ids().count() == 1 {
            return Err(Status::failed_precondition("cannot remove the last voter"));
        }
        let change = if is_voter {
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        tracing::info!(node = id, voter = is_voter, "removing node");
        self.core
            .raft
            .change_membership(change, false)
            .await
            .map_err(Self::change_error)?;
        Ok(Response::new(pb::RemoveNodeReply {
            members: self.membership_reply(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    fn node(n: u64) -> EscrowNode {
        EscrowNode {
            raft_addr: format!("10.0.0.{n}:7411"),
            client_addr: format!("10.0.0.{n}:7410"),
        }
    }

    /// A membership of `configs` (one: uniform, two: joint) whose nodes are `members`.
    fn membership(configs: &[&[u64]], members: &[u64]) -> openraft::Membership<NodeId, EscrowNode> {
        openraft::Membership::new(
            configs
                .iter()
                .map(|c| c.iter().copied().collect())
                .collect(),
            members
                .iter()
                .map(|n| (*n, node(*n)))
                .collect::<BTreeMap<_, _>>(),
        )
    }

    /// The plan for an add of node `id` at its own addresses, or the code it is refused with.
    fn plan(
        m: &openraft::Membership<NodeId, EscrowNode>,
        id: u64,
        learner_only: bool,
    ) -> Result<AddPlan, Code> {
        plan_add(m, id, &node(id), learner_only).map_err(|s| s.code())
    }

    #[test]
    fn an_add_plans_by_where_the_node_stands() {
        let uniform = membership(&[&[1, 2, 3]], &[1, 2, 3, 4]);
        assert_eq!(plan(&uniform, 5, false), Ok(AddPlan::AddLearner));
        assert_eq!(plan(&uniform, 5, true), Ok(AddPlan::AddLearner));
        assert_eq!(plan(&uniform, 4, false), Ok(AddPlan::PromoteLearner));
        assert_eq!(plan(&uniform, 4, true), Err(Code::AlreadyExists));
        assert_eq!(plan(&uniform, 2, false), Err(Code::AlreadyExists));
        assert_eq!(plan(&uniform, 2, true), Err(Code::AlreadyExists));

        // Node 4's promotion cut short between the joint and the final configuration.
        let promoting = membership(&[&[1, 2, 3], &[1, 2, 3, 4]], &[1, 2, 3, 4]);
        assert_eq!(plan(&promoting, 4, false), Ok(AddPlan::FinishPromotion));
        let refused = plan_add(&promoting, 4, &node(4), true).unwrap_err();
        assert_eq!(refused.code(), Code::AlreadyExists);
        assert!(
            refused.message().contains("without --learner"),
            "{refused:?}"
        );
        // A voter of both halves is a voter, not a promotion to finish.
        assert_eq!(plan(&promoting, 1, false), Err(Code::AlreadyExists));
    }

    #[test]
    fn an_add_never_changes_a_members_addresses() {
        let elsewhere = EscrowNode {
            raft_addr: "10.9.9.9:7411".into(),
            client_addr: node(4).client_addr,
        };
        let learner = membership(&[&[1, 2, 3]], &[1, 2, 3, 4]);
        let promoting = membership(&[&[1, 2, 3], &[1, 2, 3, 4]], &[1, 2, 3, 4]);
        for (m, what) in [
            (&learner, "a learner"),
            (&promoting, "a voter being promoted"),
        ] {
            for learner_only in [false, true] {
                let refused = plan_add(m, 4, &elsewhere, learner_only).unwrap_err();
                assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
                assert!(refused.message().contains(what), "{refused:?}");
                assert!(refused.message().contains("10.0.0.4:7411"), "{refused:?}");
            }
        }
    }

    #[test]
    fn an_add_does_not_undo_a_removal_cut_short() {
        // Node 4's removal cut short: the old half has it, the new half does not.
        let removing = membership(&[&[1, 2, 3, 4], &[1, 2, 3]], &[1, 2, 3, 4]);
        for learner_only in [false, true] {
            let refused = plan_add(&removing, 4, &node(4), learner_only).unwrap_err();
            assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
            assert!(
                refused.message().contains("cluster remove --id 4"),
                "{refused:?}"
            );
        }
        // Other members and new nodes are planned as usual meanwhile.
        assert_eq!(plan(&removing, 2, false), Err(Code::AlreadyExists));
        assert_eq!(plan(&removing, 5, false), Ok(AddPlan::AddLearner));
    }
}
