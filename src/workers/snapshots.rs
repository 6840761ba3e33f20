//! The log's disk space, on every node. openraft 0.9 snapshots by a count of entries
//! (`raft.snapshot_every_entries`), and an entry is a batch of up to a few MiB, so the log
//! could grow to tens of GiB between two snapshots. About every [`CHECK_INTERVAL`] this worker:
//! - estimates the bytes of the applied entries after the last snapshot
//!   ([`LogStore::approximate_bytes_between`]) and asks Raft for a snapshot once they reach
//!   `raft.snapshot_every_log_bytes`;
//! - asks for one too once `raft.snapshot_every_entries` entries are applied after the last
//!   snapshot. Raft's own policy checks the count only when its commit index moves, and
//!   ignores it while a build runs; a build is slow on a large store (it hashes new files),
//!   so when the writes stop before it ends, the entries committed meanwhile would wait,
//!   unsnapshotted and unpurged, for the next write;
//! - purges the log behind the last snapshot, keeping `raft.log_entries_kept_after_snapshot`
//!   entries and about `raft.log_bytes_kept_after_snapshot` bytes of them
//!   ([`LogStore::purge_point_keeping`]), whichever is less, for followers a little behind
//!   (one further behind catches up through the snapshot). It is the only source of such
//!   purges (`node::raft_config` turns openraft's policy off). A leader's Raft purges once no
//!   replication reads the entries, a follower's at once.
//!
//! It reads the log's on-disk layout, so it works the same after a restart.

use std::time::Duration;

use tokio::sync::watch;

use crate::config::RaftSettings;
use crate::raft::Raft;
use crate::store::LogStore;

/// Pause between two estimates of the log's size (each reads in-memory RocksDB metadata).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for a requested snapshot before the log is looked at again (a snapshot of a
/// large store hashes its new files, which can take a while; Raft ignores a second request
/// while the first is being built).
const SNAPSHOT_WAIT_MAX: Duration = Duration::from_secs(300);

/// The log's bounds this worker keeps, from the `raft` settings.
#[derive(Debug, Clone, Copy)]
pub struct LogBounds {
    /// `raft.snapshot_every_entries`: applied entries after the last snapshot.
    pub snapshot_every_entries: u64,
    /// `raft.snapshot_every_log_bytes`: their bytes.
    pub snapshot_every_bytes: u64,
    /// `raft.log_entries_kept_after_snapshot`: entries kept behind it.
    pub kept_entries: u64,
    /// `raft.log_bytes_kept_after_snapshot`: bytes of those.
    pub kept_bytes: u64,
}

impl LogBounds {
    pub fn of(raft: &RaftSettings) -> Self {
        Self {
            snapshot_every_entries: raft.snapshot_every_entries,
            snapshot_every_bytes: raft.snapshot_every_log_bytes,
            kept_entries: raft.log_entries_kept_after_snapshot,
            kept_bytes: raft.log_bytes_kept_after_snapshot,
        }
    }
}

/// The index to purge up to behind the snapshot at `snapshot` (`purged`: the last purge), if
/// any: the later of the points keeping `bounds.kept_entries` entries and about
/// `bounds.kept_bytes` bytes. The byte search starts at the count's point, as nothing before
/// it is kept anyway.
fn purge_point(log: &LogStore, bounds: LogBounds, purged: u64, snapshot: u64) -> Option<u64> {
    let by_count = snapshot.saturating_sub(bounds.kept_entries).max(purged);
    log.purge_point_keeping(by_count, snapshot, bounds.kept_bytes)
        .or(Some(by_count))
        .filter(|&upto| upto > purged)
}

pub async fn run(
    raft: Raft,
    log: LogStore,
    bounds: LogBounds,
    mut shutdown: watch::Receiver<bool>,
) {
    // The last purge asked for: Raft keeps it pending until no replication reads the entries,
    // and logs every request, so each point is asked for once.
    let mut purge_asked = 0;
    // The snapshot index when a snapshot was last asked for: asking again before a new one
    // exists (a build past SNAPSHOT_WAIT_MAX) is logged at debug level only.
    let mut snapshot_asked_after = None;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        let (snapshot, purged, applied) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.snapshot.map_or(0, |l| l.index),
                m.purged.map_or(0, |l| l.index),
                m.last_applied.map_or(0, |l| l.index),
            )
        };
        if let Some(upto) = purge_point(&log, bounds, purged, snapshot) {
            if upto > purge_asked {
                tracing::info!(
                    upto,
                    snapshot,
                    kept_entries = bounds.kept_entries,
                    kept_bytes = bounds.kept_bytes,
                    "purging the log behind the snapshot"
                );
                if raft.trigger().purge_log(upto).await.is_err() {
                    tracing::warn!("cannot ask Raft for a purge; it has stopped");
                    return;
                }
                purge_asked = upto;
            }
        }
        // Nothing applied since the last snapshot: a new one would hold the same state.
        if applied <= snapshot {
            continue;
        }
        if applied - snapshot >= bounds.snapshot_every_entries {
            // Usually Raft's policy asked at the same count already (a second request is
            // ignored while the first is built): debug level.
            tracing::debug!(
                entries = applied - snapshot,
                limit_entries = bounds.snapshot_every_entries,
                after_index = snapshot,
                "applied entries since the last snapshot past their bound; asking for one"
            );
        } else {
            // Only what a snapshot now would cover: an unapplied tail (a leader catching up
            // after a stretch without quorum) would otherwise ask again at every small apply.
            let bytes = match log.approximate_bytes_between(snapshot, applied) {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot estimate the log's size; the snapshot by size waits for the next check");
                    continue;
                }
            };
            if bytes < bounds.snapshot_every_bytes {
                continue;
            }
            if snapshot_asked_after.replace(snapshot) == Some(snapshot) {
                tracing::debug!(
                    after_index = snapshot,
                    "log still past its size bound; asking for the snapshot again"
                );
            } else {
                tracing::info!(
                    log_bytes = bytes,
                    limit_bytes = bounds.snapshot_every_bytes,
                    after_index = snapshot,
                    applied,
                    "log past its size bound since the last snapshot; building one"
                );
            }
        }
        // Raft ignores the request while a snapshot is being built.
        if let Err(e) = raft.trigger().snapshot().await {
            tracing::warn!(error = %e, "cannot ask Raft for a snapshot; it has stopped");
            return;
        }
        // Give the build a chance to finish before the estimate is taken again, so one
        // oversized log asks once, not every second while the snapshot is built.
        let mut metrics = raft.metrics();
        let built = metrics.wait_for(|m| m.snapshot.map_or(0, |l| l.index) > snapshot);
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::timeout(SNAPSHOT_WAIT_MAX, built) => {}
        }
    }
}
