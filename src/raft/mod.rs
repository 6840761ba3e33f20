//! openraft type configuration, the node address type, the wire codec and the peer network.

pub mod codec;
pub mod network;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ledger::{Command, Outcome};
use crate::store::SnapshotDir;

pub type NodeId = u64;

/// Where to reach a node: its peer (Raft, mutual TLS) and client (TLS + credential) endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EscrowNode {
    pub raft_addr: String,
    pub client_addr: String,
}

impl fmt::Display for EscrowNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "raft={} client={}", self.raft_addr, self.client_addr)
    }
}

openraft::declare_raft_types!(
    /// The escrow's Raft types: commands and outcomes from `ledger`, snapshots as directories.
    pub TypeConfig:
        D = Command,
        R = Outcome,
        NodeId = NodeId,
        Node = EscrowNode,
        SnapshotData = SnapshotDir,
);

pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, EscrowNode>;
pub type StoredMembership = openraft::StoredMembership<NodeId, EscrowNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
