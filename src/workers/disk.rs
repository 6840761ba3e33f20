//! The disk guard: every node measures its own free space and asks every other member for
//! theirs once a second; while any member is under its reserve (`storage.reserve_bytes`), the
//! cluster refuses writes that add data with RESOURCE_EXHAUSTED naming that node, instead of
//! filling a disk until RocksDB's writes fail and the node's Raft stops.
//!
//! Every node refuses on the same readings, so a write is refused wherever it arrives (a
//! follower does not forward it first). Writes that free space or carry no data (history
//! expiry, checkpoints, tenant states) still go through, and reads are never refused. A member
//! that has not answered for [`READING_FRESH_FOR`] counts for nothing here: an unreachable node
//! is Raft's concern, not the disk guard's.

use std::collections::BTreeMap;
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

/// This node's view of every member's free space.
pub struct DiskGuard {
    node: NodeId,
    reserve: u64,
    /// The data directory and the chunk store's directory (a mount of its own, possibly).
    dirs: Vec<PathBuf>,
    readings: Mutex<BTreeMap<NodeId, Reading>>,
}

impl DiskGuard {
    /// A guard for node `node` with `reserve` bytes (0: never refuse) over `dirs`.
    pub fn new(node: NodeId, reserve: u64, dirs: Vec<PathBuf>) -> Self {
        Self {
            node,
            reserve,
            dirs,
            readings: Mutex::new(BTreeMap::new()),
        }
    }

    /// This node's reserve, `storage.reserve_bytes`.
    pub fn reserve(&self) -> u64 {
        self.reserve
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
        self.readings.lock().expect("lock").insert(node, reading);
    }

    /// Forgets the readings of nodes that are no longer members.
    pub fn retain(&self, members: &[NodeId]) {
        self.readings
            .lock()
            .expect("lock")
            .retain(|id, _| *id == self.node || members.contains(id));
    }

    /// Why writes that add data are refused now: the first member (by id) whose fresh
    /// reading is under its reserve.
    pub fn refusal(&self) -> Option<String> {
        let readings = self.readings.lock().expect("lock");
        readings
            .iter()
            .find(|(_, r)| r.at.elapsed() < READING_FRESH_FOR && r.free < r.reserve)
            .map(|(id, r)| describe(*id, r))
    }

    /// Why this node refuses to store more (its own disk under its reserve).
    pub fn local_refusal(&self) -> Option<String> {
        let readings = self.readings.lock().expect("lock");
        readings
            .get(&self.node)
            .filter(|r| r.free < r.reserve)
            .map(|r| describe(self.node, r))
    }
}

fn describe(node: NodeId, r: &Reading) -> String {
    format!(
        "node {node} has {} bytes free on its data directory, under its reserve of {} bytes \
         (storage.reserve_bytes); writes that add data are refused until space is freed \
         there (reads, deletions of expired history and checkpoints go on)",
        r.free, r.reserve
    )
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
    let members: Vec<_> = {
        let m = core.raft.metrics().borrow().clone();
        m.membership_config
            .membership()
            .nodes()
            .map(|(id, node)| (*id, node.clone()))
            .collect()
    };
    core.disk
        .retain(&members.iter().map(|(id, _)| *id).collect::<Vec<_>>());
    let mut asks: FuturesUnordered<_> = members
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
        let why = guard.refusal().expect("node 3 is under its reserve");
        assert!(why.starts_with("node 3 has 99 bytes free"), "{why}");
        assert_eq!(guard.local_refusal(), None, "this node has room");
        // A node no longer a member counts no more.
        guard.retain(&[1, 2]);
        assert_eq!(guard.refusal(), None);
        // This node's own reading, under a reserve of 0: never refused.
        let never = DiskGuard::new(1, 0, vec![dir.path().to_path_buf()]);
        assert!(never.measure().unwrap() > 0);
        assert_eq!((never.refusal(), never.local_refusal()), (None, None));
        // A reserve larger than any disk: refused, locally too.
        let always = DiskGuard::new(1, u64::MAX, vec![dir.path().to_path_buf()]);
        always.measure().unwrap();
        assert!(always.local_refusal().unwrap().starts_with("node 1 has"));
        assert!(always.refusal().is_some());
    }

    #[test]
    fn a_stale_reading_counts_for_nothing() {
        let guard = DiskGuard::new(1, 100, Vec::new());
        guard.record(2, 0, 100);
        let Some(long_ago) = Instant::now().checked_sub(READING_FRESH_FOR * 2) else {
            return; // a machine up for less than that: no instant that old exists
        };
        guard.readings.lock().unwrap().get_mut(&2).unwrap().at = long_ago;
        assert_eq!(guard.refusal(), None);
    }
}
