//! The disk guard: every node measures its own free space and asks every other member for
//! theirs once a second; while any member is under its reserve (`storage.reserve_bytes`), the
//! cluster refuses writes that add data with RESOURCE_EXHAUSTED naming that node, instead of
//! filling a disk until RocksDB's writes fail and the node's Raft stops.
//!
//! Every node refuses on the same readings, so a write is refused wherever it arrives (a
//! follower does not forward it first). Only voters count: a learner being added with a small
//! disk does not stop the cluster's writes (it only falls behind). Writes that free space or carry no data (history
//! expiry, checkpoints, tenant states) still go through, and reads are never refused. A member
//! that has not answered for [`READING_FRESH_FOR`] counts for nothing here: an unreachable node
//! is Raft's concern, not the disk guard's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use crate::raft::NodeId;
use crate::service::Core;

/// How often a node measures its own free space and asks the other members for theirs.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one member's answer may take.
pub const DISK_ASK_TIMEOUT: Duration = Duration::from_millis(800);
/// A reading older than this counts for nothing (its node is down or cut off).
pub const READING_FRESH_FOR: Duration = Duration::from_secs(10);

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// One member's free space, as last measured or answered.
#[derive(Debug, Clone, Copy)]
struct Reading {
    free: u64,
    reserve: u64,
    at: Instant,
}

/// The last readings, and which nodes are voters.
#[derive(Default)]
struct Readings {
    by_node: BTreeMap<NodeId, Reading>,
    voters: BTreeSet<NodeId>,
}

/// This node's view of every voter's free space.
pub struct DiskGuard {
    node: NodeId,
    reserve: u64,
    /// The data directory and the chunk store's directory (a mount of its own, possibly).
    dirs: Vec<PathBuf>,
    readings: Mutex<Readings>,
}

impl DiskGuard {
    /// A guard for node `node` with `reserve` bytes (0: never refuse) over `dirs`.
    pub fn new(node: NodeId, reserve: u64, dirs: Vec<PathBuf>) -> Self {
        Self {
            node,
            reserve,
            dirs,
            readings: Mutex::new(Readings::default()),
        }
    }

    /// This node's reserve, `storage.reserve_bytes`.
    pub fn reserve(&self) -> u64 {
        self.reserve
    }

    /// This node's free bytes at its last reading (0 before the first).
    pub fn local_free(&self) -> u64 {
        let readings = self.readings.lock().expect("lock");
        readings.by_node.get(&self.node).map_or(0, |r| r.free)
    }

    /// Measures this node's free space (the least over its directories) and records it.
    pub fn measure(&self) -> std::io::Result<u64> {
        let mut free = u64::MAX;
        for dir in &self.dirs {
            free = free.min(free_bytes(dir)?);
        }
        self.record(self.node, free, self.reserve);
        Ok(free)
    }

    /// Records a member's answer.
    pub fn record(&self, node: NodeId, free: u64, reserve: u64) {
        let reading = Reading {
            free,
            reserve,
            at: Instant::now(),
        };
        self.readings
            .lock()
            .expect("lock")
            .by_node
            .insert(node, reading);
    }

    /// Sets the voters whose readings count, and forgets other nodes' readings (this node's
    /// own is kept: it still guards its own disk).
    pub fn set_voters(&self, voters: BTreeSet<NodeId>) {
        let mut readings = self.readings.lock().expect("lock");
        readings
            .by_node
            .retain(|id, _| *id == self.node || voters.contains(id));
        readings.voters = voters;
    }

    /// Why writes that add data are refused now: the first member (by id) whose fresh
    /// reading is under its reserve.
    pub fn refusal(&self) -> Option<Refusal> {
        let readings = self.readings.lock().expect("lock");
        readings
            .by_node
            .iter()
            .filter(|(id, _)| readings.voters.contains(id))
            .find(|(_, r)| r.at.elapsed() < READING_FRESH_FOR && r.free < r.reserve)
            .map(|(id, r)| Refusal::new(*id, r))
    }

    /// Why this node refuses to store more (its own disk under its reserve).
    pub fn local_refusal(&self) -> Option<Refusal> {
        let readings = self.readings.lock().expect("lock");
        readings
            .by_node
            .get(&self.node)
            .filter(|r| r.free < r.reserve)
            .map(|r| Refusal::new(self.node, r))
    }
}

/// A member under its reserve: writes that add data are refused until it has room.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub node: NodeId,
    pub free: u64,
    pub reserve: u64,
}

impl Refusal {
    fn new(node: NodeId, r: &Reading) -> Self {
        Self {
            node,
            free: r.free,
            reserve: r.reserve,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "node {} has {} bytes free on its data directory, under its reserve of {} bytes \
             (storage.reserve_bytes); writes that add data are refused until space is freed \
             there (reads, deletions of expired history and checkpoints go on)",
            self.node, self.free, self.reserve
        )
    }
}

/// Runs until shutdown.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    let mut refusing = false;
    loop {
        step(&core).await;
        let why = core.disk.refusal();
        if why.is_some() != refusing {
            refusing = why.is_some();
            match &why {
                Some(why) => tracing::warn!(reason = %why, "refusing writes: a disk is low"),
                None => tracing::info!("disk space back above every reserve; writes accepted"),
            }
        }
        core.metrics.writes_refused_low_disk.set(refusing as i64);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(DISK_CHECK_INTERVAL) => {}
        }
    }
}

/// Measures this node and asks every other member, all at once.
async fn step(core: &Core) {
    match core.disk.measure() {
        Ok(free) => {
            core.metrics
                .disk_free_bytes
                .set(free.min(i64::MAX as u64) as i64);
        }
        Err(e) => tracing::warn!(error = %e, "cannot read this node's free disk space"),
    }
    let voters: Vec<_> = {
        let m = core.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        membership
            .voter_ids()
            .filter_map(|id| Some((id, membership.get_node(&id)?.clone())))
            .collect()
    };
    core.disk
        .set_voters(voters.iter().map(|(id, _)| *id).collect());
    let mut asks: FuturesUnordered<_> = voters
        .into_iter()
        .filter(|(id, _)| *id != core.id)
        .map(|(id, node)| async move {
            (
                id,
                core.peers
                    .disk_space(id, &node.raft_addr, DISK_ASK_TIMEOUT)
                    .await,
            )
        })
        .collect();
    while let Some((id, answer)) = asks.next().await {
        match answer {
            Ok(a) if a.node == id => core.disk.record(id, a.free_bytes, a.reserve_bytes),
            Ok(a) => tracing::warn!(
                asked = id,
                answered = a.node,
                "a node answered for another's disk space; ignored"
            ),
            Err(e) => tracing::debug!(node = id, error = %e, "no disk space answer"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_while_a_fresh_reading_is_under_its_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let guard = DiskGuard::new(1, 100, vec![dir.path().to_path_buf()]);
        assert_eq!(guard.refusal(), None, "no readings, no refusal");
        guard.record(1, 500, 100);
        guard.record(2, 100, 100);
        guard.record(3, 99, 100);
        guard.set_voters([1, 2].into());
        assert_eq!(guard.refusal(), None, "node 3 is no voter (a learner)");
        guard.record(3, 99, 100);
        guard.set_voters([1, 2, 3].into());
        let why = guard.refusal().expect("node 3 is under its reserve");
        assert_eq!((why.node, why.free, why.reserve), (3, 99, 100));
        assert!(
            why.to_string().starts_with("node 3 has 99 bytes free"),
            "{why}"
        );
        assert_eq!(guard.local_refusal(), None, "this node has room");
        // A node no longer a voter counts no more.
        guard.set_voters([1, 2].into());
        assert_eq!(guard.refusal(), None);
        // This node's own reading, under a reserve of 0: never refused.
        let never = DiskGuard::new(1, 0, vec![dir.path().to_path_buf()]);
        assert!(never.measure().unwrap() > 0);
        assert_eq!((never.refusal(), never.local_refusal()), (None, None));
        // A reserve larger than any disk: refused, locally too.
        let always = DiskGuard::new(1, u64::MAX, vec![dir.path().to_path_buf()]);
        always.measure().unwrap();
        always.set_voters([1].into());
        assert_eq!(always.local_refusal().unwrap().node, 1);
        assert!(always.refusal().is_some());
    }

    #[test]
    fn a_stale_reading_counts_for_nothing() {
        let guard = DiskGuard::new(1, 100, Vec::new());
        guard.set_voters([1, 2].into());
        guard.record(2, 0, 100);
        let Some(long_ago) = Instant::now().checked_sub(READING_FRESH_FOR * 2) else {
            return; // a machine up for less than that: no instant that old exists
        };
        let mut readings = guard.readings.lock().unwrap();
        readings.by_node.get_mut(&2).unwrap().at = long_ago;
        drop(readings);
        assert_eq!(guard.refusal(), None);
    }
}
