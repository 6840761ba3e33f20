//! The disk guard: every node measures its own free space and asks every other voter for
//! theirs once a second; while any voter is under its reserve (`storage.reserve_bytes`), the
//! node refuses writes that add data with RESOURCE_EXHAUSTED naming that voter, instead of
//! filling a disk until RocksDB's writes fail and that node's Raft stops.
//!
//! Every node keeps its own readings, and they agree within a second or two, so a write is
//! refused wherever it arrives (a follower refuses it before forwarding; a leader checks again
//! what is forwarded to it). One voter under its reserve stops the writes of the whole
//! cluster, as the next ones would fill it. Learners do not count: one with a small disk falls
//! behind instead, and `cluster add` does not promote one under its reserve. Writes that free
//! space or carry no data (history expiry, checkpoints, tenant states) still go through, and
//! reads are never refused. A voter whose
//! reading is older than [`READING_FRESH_FOR`] counts for nothing (it is down or cut off,
//! which is Raft's concern); one that cannot read its own free space counts as under its
//! reserve.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use tokio::sync::watch;

use crate::pb;
use crate::raft::NodeId;
use crate::service::Core;

/// How often a node measures its own free space and asks the other voters for theirs.
pub const DISK_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// How long one voter's answer may take, connecting included.
pub const DISK_ASK_TIMEOUT: Duration = Duration::from_millis(800);
/// A measurement of this node's disk still running after this long (a hung mount) counts as
/// unreadable; no second one starts meanwhile.
pub const DISK_MEASURE_HUNG_AFTER: Duration = Duration::from_secs(3);
/// A reading older than this counts for nothing (its node is down or cut off, or its own
/// check is stuck on a hung disk).
pub const READING_FRESH_FOR: Duration = Duration::from_secs(10);

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    let stat = rustix::fs::statvfs(dir)?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// One node's free space, as last measured or answered.
#[derive(Debug, Clone, Copy)]
pub struct Reading {
    /// Bytes free; `None` when the node could not read it.
    pub free: Option<u64>,
    pub reserve: u64,
    at: Instant,
}

impl Reading {
    fn fresh(&self) -> bool {
        self.at.elapsed() < READING_FRESH_FOR
    }

    fn under(&self) -> bool {
        under(self.free, self.reserve)
    }
}

/// The free bytes a disk space answer reports; `None`: the node cannot read them.
fn reported_free(answer: &pb::DiskSpaceReply) -> Option<u64> {
    (!answer.unreadable).then_some(answer.free_bytes)
}

/// Under a reserve that is on, or unreadable (`free` is `None`) under one.
fn under(free: Option<u64>, reserve: u64) -> bool {
    reserve > 0 && free.is_none_or(|free| free < reserve)
}

/// The last readings, and which nodes are voters.
#[derive(Default)]
struct Readings {
    by_node: BTreeMap<NodeId, Reading>,
    voters: BTreeSet<NodeId>,
}

/// How a node measures its own free space.
enum Probe {
    /// The least free space over these directories: the data directory and the chunk
    /// store's (a mount of its own, possibly).
    Dirs(Vec<PathBuf>),
    /// A stand-in measurement, for tests of what a slow or failing disk does to the guard.
    #[cfg(test)]
    Fn(Box<dyn Fn() -> std::io::Result<u64> + Send + Sync>),
}

/// What [`DiskGuard::measure_in_background`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measuring {
    /// A measurement started.
    Started,
    /// The one in flight is still running, not for long enough to count as hung.
    Running,
    /// The one in flight has run for the guard's hang limit or longer: this node's disk is
    /// recorded as unreadable, and no second measurement starts.
    Hung,
}

/// This node's view of every voter's free space.
pub struct DiskGuard {
    node: NodeId,
    reserve: u64,
    probe: Probe,
    /// A measurement running this long counts as hung ([`DISK_MEASURE_HUNG_AFTER`]).
    hung_after: Duration,
    readings: Mutex<Readings>,
    /// When the measurement in flight started, if one is.
    measuring_since: Mutex<Option<Instant>>,
    /// The last measurement failed or hung (warned once per episode).
    unreadable: AtomicBool,
}

impl DiskGuard {
    /// A guard for node `node` with `reserve` bytes (0: never refuse) over `dirs`.
    pub fn new(node: NodeId, reserve: u64, dirs: Vec<PathBuf>) -> Self {
        Self::with_probe(node, reserve, Probe::Dirs(dirs), DISK_MEASURE_HUNG_AFTER)
    }

    fn with_probe(node: NodeId, reserve: u64, probe: Probe, hung_after: Duration) -> Self {
        Self {
            node,
            reserve,
            probe,
            hung_after,
            readings: Mutex::new(Readings::default()),
            measuring_since: Mutex::new(None),
            unreadable: AtomicBool::new(false),
        }
    }

    /// Measures this node's free space (the least over its directories) and records it; a
    /// failure is recorded as unreadable (under the reserve) and returned.
    pub fn measure(&self) -> std::io::Result<u64> {
        let measured = self.probe();
        self.record(self.node, measured.as_ref().ok().copied(), self.reserve);
        measured
    }

    /// This node's free space (the least over its directories), not recorded.
    fn probe(&self) -> std::io::Result<u64> {
        match &self.probe {
            Probe::Dirs(dirs) => dirs
                .iter()
                .try_fold(u64::MAX, |least, dir| Ok(least.min(free_bytes(dir)?))),
            #[cfg(test)]
            Probe::Fn(f) => f(),
        }
    }

    /// Starts a measurement of this node's disk on a blocking thread and returns without
    /// waiting for it (a hung mount must stall neither the runtime nor the asks), unless one
    /// is still running: then no second one starts, and one running for the hang limit or
    /// longer has this node's disk recorded as unreadable (under its reserve) meanwhile.
    pub fn measure_in_background(self: &Arc<Self>) -> Measuring {
        {
            let mut since = self.measuring_since.lock().expect("lock");
            if let Some(at) = *since {
                if at.elapsed() < self.hung_after {
                    return Measuring::Running;
                }
                if !self.unreadable.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "reading this node's free disk space hangs; counted as under its reserve"
                    );
                }
                self.record(self.node, None, self.reserve);
                return Measuring::Hung;
            }
            *since = Some(Instant::now());
        }
        let guard = self.clone();
        tokio::task::spawn_blocking(move || {
            let measured = guard.probe();
            // Recorded and finished under the lock the hang check takes, so a measurement
            // ending just as it is declared hung leaves one consistent outcome: this one.
            let was = {
                let mut since = guard.measuring_since.lock().expect("lock");
                let free = measured.as_ref().ok().copied();
                guard.record(guard.node, free, guard.reserve);
                *since = None;
                guard.unreadable.swap(measured.is_err(), Ordering::Relaxed)
            };
            match measured {
                Ok(_) if was => tracing::info!("this node's free disk space is readable again"),
                Ok(_) => {}
                Err(e) if !was => tracing::warn!(
                    error = %e,
                    "cannot read this node's free disk space; counted as under its reserve"
                ),
                Err(_) => {}
            }
        });
        Measuring::Started
    }

    /// Records a node's free space (`None`: it could not read it) and reserve.
    pub fn record(&self, node: NodeId, free: Option<u64>, reserve: u64) {
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

    /// This node's own reading, while fresh.
    pub fn local(&self) -> Option<Reading> {
        let readings = self.readings.lock().expect("lock");
        readings
            .by_node
            .get(&self.node)
            .filter(|r| r.fresh())
            .copied()
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

    /// Why writes that add data are refused now: the first voter (by id) whose fresh reading
    /// is under its reserve. Before any membership is known, this node's own reading counts.
    pub fn refusal(&self) -> Option<Refusal> {
        let readings = self.readings.lock().expect("lock");
        let counts = |id: &NodeId| {
            readings.voters.contains(id) || (readings.voters.is_empty() && *id == self.node)
        };
        readings
            .by_node
            .iter()
            .filter(|(id, r)| counts(id) && r.fresh() && r.under())
            .map(|(id, r)| Refusal::new(*id, r))
            .next()
    }

    /// Why this node stores nothing more (its own disk under its reserve), voter or not.
    pub fn local_refusal(&self) -> Option<Refusal> {
        self.local()
            .filter(Reading::under)
            .map(|r| Refusal::new(self.node, &r))
    }
}

/// A node under its reserve: while it is a voter, writes that add data are refused until it
/// has room (and `cluster add` does not make it one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub node: NodeId,
    /// `None`: the node cannot read its free space.
    pub free: Option<u64>,
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

    /// A node's disk as it answered a disk space request, when under its reserve.
    pub fn from_answer(answer: &pb::DiskSpaceReply) -> Option<Self> {
        let free = reported_free(answer);
        under(free, answer.reserve_bytes).then_some(Self {
            node: answer.node,
            free,
            reserve: answer.reserve_bytes,
        })
    }

    /// What is wrong with the node's disk, without what it means for writes.
    pub fn condition(&self) -> String {
        let (node, reserve) = (self.node, self.reserve);
        match self.free {
            Some(free) => format!(
                "node {node} has {free} bytes free on its data directory, under its reserve \
                 of {reserve} bytes (storage.reserve_bytes)"
            ),
            None => format!(
                "node {node} cannot read the free space of its data directory (its reserve: \
                 {reserve} bytes, storage.reserve_bytes)"
            ),
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; writes that add data are refused until it has room (reads, deletions of \
             expired history and checkpoints go on)",
            self.condition()
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
        // The reading this step's measurement left, usually; 0 while unreadable or stale.
        let free = core.disk.local().and_then(|r| r.free).unwrap_or(0);
        core.metrics
            .disk_free_bytes
            .set(crate::metrics::gauge_value(free));
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(DISK_CHECK_INTERVAL) => {}
        }
    }
}

/// Starts a measurement of this node's disk ([`DiskGuard::measure_in_background`]), then asks
/// every other voter, all at once.
async fn step(core: &Arc<Core>) {
    core.disk.measure_in_background();
    let voters = core.voters();
    core.disk
        .set_voters(voters.iter().map(|(id, _)| *id).collect());
    let mut asks: FuturesUnordered<_> = voters
        .into_iter()
        .filter(|(id, _)| *id != core.id)
        .map(|(id, node)| async move {
            let ask = core.peers.disk_space(id, &node.raft_addr, DISK_ASK_TIMEOUT);
            let answer = tokio::time::timeout(DISK_ASK_TIMEOUT, ask).await;
            (id, answer)
        })
        .collect();
    while let Some((id, answer)) = asks.next().await {
        match answer {
            Ok(Ok(a)) if a.node == id => {
                core.disk.record(id, reported_free(&a), a.reserve_bytes);
            }
            Ok(Ok(a)) => tracing::warn!(
                asked = id,
                answered = a.node,
                "a node answered for another's disk space; ignored"
            ),
            Ok(Err(e)) => tracing::debug!(node = id, error = %e, "no disk space answer"),
            Err(_) => tracing::debug!(node = id, "no disk space answer in time"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_refused_while_a_fresh_voter_reading_is_under_its_reserve() {
        let dir = tempfile::tempdir().unwrap();
        let guard = DiskGuard::new(1, 100, vec![dir.path().to_path_buf()]);
        assert_eq!(guard.refusal(), None, "no readings, no refusal");
        guard.record(1, Some(500), 100);
        guard.record(2, Some(100), 100);
        guard.record(3, Some(99), 100);
        guard.set_voters([1, 2, 3].into());
        let why = guard.refusal().expect("node 3 is under its reserve");
        assert_eq!((why.node, why.free, why.reserve), (3, Some(99), 100));
        assert!(
            why.to_string().starts_with("node 3 has 99 bytes free"),
            "{why}"
        );
        assert_eq!(guard.local_refusal(), None, "this node has room");
        // A node no longer a voter counts no more.
        guard.set_voters([1, 2].into());
        assert_eq!(guard.refusal(), None);
        // A node that cannot read its free space counts as under its reserve.
        guard.record(2, None, 100);
        let why = guard.refusal().expect("node 2 cannot read its disk");
        assert!(why.to_string().contains("node 2 cannot read"), "{why}");
        // A reserve of 0 is the guard turned off, even unreadable.
        guard.record(2, None, 0);
        assert_eq!(guard.refusal(), None);
    }

    #[test]
    fn a_learner_guards_its_own_disk_but_stops_no_writes() {
        let guard = DiskGuard::new(1, 100, Vec::new());
        guard.record(1, Some(10), 100);
        // Before any membership is known, this node's own reading counts.
        assert_eq!(guard.refusal().map(|r| r.node), Some(1));
        guard.set_voters([2, 3].into());
        assert_eq!(guard.refusal(), None, "node 1 is a learner");
        assert_eq!(guard.local_refusal().map(|r| r.node), Some(1));
    }

    #[test]
    fn own_measurements_count() {
        let dir = tempfile::tempdir().unwrap();
        let never = DiskGuard::new(1, 0, vec![dir.path().to_path_buf()]);
        assert!(never.measure().unwrap() > 0);
        assert_eq!((never.refusal(), never.local_refusal()), (None, None));
        // A reserve larger than any disk: refused, locally too.
        let always = DiskGuard::new(1, u64::MAX, vec![dir.path().to_path_buf()]);
        always.measure().unwrap();
        always.set_voters([1].into());
        assert_eq!(always.local_refusal().unwrap().node, 1);
        assert!(always.refusal().is_some());
        // A directory that cannot be read: recorded as unreadable, so refused.
        let gone = DiskGuard::new(1, 1, vec![dir.path().join("no-such-dir")]);
        assert!(gone.measure().is_err());
        assert_eq!(gone.local_refusal().unwrap().free, None);
    }

    /// A measurement that hangs (a dead NFS mount, say) neither stalls the caller nor is
    /// doubled, and counts as unreadable, so refused, once it has run for the hang limit; the
    /// guard recovers by itself when it returns.
    #[tokio::test]
    async fn a_hung_measurement_counts_as_unreadable_until_it_returns() {
        let hung_after = Duration::from_millis(100);
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let probe = Probe::Fn(Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
            released
                .lock()
                .unwrap()
                .recv_timeout(Duration::from_secs(30))
                .map_err(std::io::Error::other)?;
            Ok(1_000)
        }));
        let guard = Arc::new(DiskGuard::with_probe(1, 100, probe, hung_after));

        assert_eq!(guard.measure_in_background(), Measuring::Started);
        assert_eq!(guard.measure_in_background(), Measuring::Running);
        assert!(guard.local().is_none(), "nothing measured yet");
        assert_eq!(guard.refusal(), None, "not yet counted as hung");

        tokio::time::sleep(hung_after + Duration::from_millis(20)).await;
        assert_eq!(guard.measure_in_background(), Measuring::Hung);
        let why = guard.refusal().expect("a hung disk is refused");
        assert_eq!((why.node, why.free), (1, None));
        assert_eq!(guard.local_refusal().map(|r| r.free), Some(None));
        assert_eq!(guard.measure_in_background(), Measuring::Hung);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "no second measurement started"
        );

        // The mount answers again: its reading replaces the unreadable one.
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while guard.measuring_since.lock().unwrap().is_some() {
            assert!(Instant::now() < deadline, "the measurement never finished");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(guard.local().and_then(|r| r.free), Some(1_000));
        assert_eq!((guard.refusal(), guard.local_refusal()), (None, None));
        assert!(!guard.unreadable.load(Ordering::SeqCst));
        assert_eq!(guard.measure_in_background(), Measuring::Started);
        release.send(()).unwrap();
        while calls.load(Ordering::SeqCst) < 2 || guard.measuring_since.lock().unwrap().is_some() {
            assert!(
                Instant::now() < deadline,
                "the second measurement never ran"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn a_failed_measurement_counts_as_unreadable() {
        let probe = Probe::Fn(Box::new(|| Err(std::io::Error::other("EIO"))));
        let guard = DiskGuard::with_probe(1, 100, probe, DISK_MEASURE_HUNG_AFTER);
        assert!(guard.measure().is_err());
        assert_eq!(guard.refusal().map(|r| (r.node, r.free)), Some((1, None)));
    }

    #[test]
    fn a_stale_reading_counts_for_nothing() {
        let guard = DiskGuard::new(1, 100, Vec::new());
        guard.set_voters([1, 2].into());
        guard.record(2, Some(0), 100);
        assert!(guard.refusal().is_some(), "refused while fresh");
        let Some(long_ago) = Instant::now().checked_sub(READING_FRESH_FOR * 2) else {
            return; // a machine up for less than that: no instant that old exists
        };
        let mut readings = guard.readings.lock().unwrap();
        readings.by_node.get_mut(&2).unwrap().at = long_ago;
        drop(readings);
        assert_eq!(guard.refusal(), None);
    }
}
