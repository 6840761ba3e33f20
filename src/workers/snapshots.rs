//! Snapshots by log size on every node. openraft 0.9's policy counts entries only
//! (`raft.snapshot_every_entries`), and an entry is a batch of up to a few MiB, so the log
//! between two snapshots could grow to tens of GiB before the next one. About every
//! [`CHECK_INTERVAL`] this worker estimates the bytes of the applied entries the log holds
//! after the last snapshot ([`LogStore::approximate_bytes_between`]) and asks Raft for a
//! snapshot once they reach `raft.snapshot_every_log_bytes`. The snapshot is built and the log
//! purged behind it exactly as for the entry count. Reads the log's on-disk layout, so it works
//! the same after a restart.

use std::time::Duration;

use tokio::sync::watch;

use crate::raft::Raft;
use crate::store::LogStore;

/// Pause between two estimates of the log's size (each reads in-memory RocksDB metadata).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest wait for a requested snapshot before the size is estimated again (a snapshot of a
/// large store hashes its new files, which can take a while; Raft ignores a second request
/// while the first is being built).
const SNAPSHOT_WAIT_MAX: Duration = Duration::from_secs(300);

pub async fn run(raft: Raft, log: LogStore, limit_bytes: u64, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
        let (snapshot, applied) = {
            let m = raft.metrics();
            let m = m.borrow();
            (
                m.snapshot.map_or(0, |l| l.index),
                m.last_applied.map_or(0, |l| l.index),
            )
        };
        // Nothing applied since the last snapshot: a new one would hold the same state.
        if applied <= snapshot {
            continue;
        }
        // Only what a snapshot now would cover: an unapplied tail (a leader catching up
        // after a stretch without quorum) would otherwise ask again at every small apply.
        let bytes = match log.approximate_bytes_between(snapshot, applied) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::warn!(error = %e, "cannot estimate the log's size; the snapshot by size waits for the next check");
                continue;
            }
        };
        if bytes < limit_bytes {
            continue;
        }
        // Raft ignores the request while a snapshot is being built.
        tracing::info!(
            log_bytes = bytes,
            limit_bytes,
            after_index = snapshot,
            applied,
            "log past its size bound since the last snapshot; building one"
        );
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
