//! Hourly upkeep on the leader:
//! - Retention: proposes `ExpireHistory` with the cutoff `now - mirror.retention_days`, entry
//!   after entry while one says there is more (each removes at most
//!   `ledger::EXPIRE_VERSIONS_MAX`, the oldest replacements first, going on where the last
//!   one stopped). A run proposes at most `ENTRIES_PER_RUN_MAX` entries; the next run goes on
//!   from there. The cutoff travels in the command and where to go on is replicated state,
//!   so every replica removes exactly the same versions.
//! - A checkpoint, if writes are waiting for one. Writes only mark their Merkle buckets dirty;
//!   a checkpoint rehashes them. Without this, a cluster nobody verifies would pile up dirty
//!   marks and pay for all of them in the next checkpoint's single apply.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::ledger::{Command, Outcome};
use crate::service::{now_ms, Core};

/// Pause between two upkeep runs (expiry, then a checkpoint if one is due).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(3600);
/// Entries one run proposes at most (the rest waits for the next run).
const ENTRIES_PER_RUN_MAX: usize = 100;

pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
        }
        let leader = core.raft.metrics().borrow().current_leader == Some(core.id);
        if !leader {
            continue;
        }
        expire_history(&core).await;
        checkpoint_if_pending(&core).await;
    }
}

/// Proposes expiry of the versions past the retention period, entry by entry, until one
/// finds no more or the run has proposed `ENTRIES_PER_RUN_MAX`.
async fn expire_history(core: &Core) {
    let retention_ms = core.mirror.retention_days.saturating_mul(24 * 3600 * 1000);
    let before_ms = now_ms().saturating_sub(retention_ms);
    let mut removed = 0;
    for _ in 0..ENTRIES_PER_RUN_MAX {
        match core
            .write(Command::ExpireHistory { before_ms }, false)
            .await
        {
            Ok(Outcome::Expired { removed: n, more }) => {
                removed += n;
                if !more {
                    break;
                }
            }
            Ok(other) => {
                tracing::warn!(outcome = ?other, "unexpected outcome of history expiry");
                break;
            }
            Err(e) => {
                tracing::warn!(error = %e.message(), "history expiry not committed; next run retries");
                break;
            }
        }
    }
    if removed > 0 {
        tracing::info!(
            removed,
            before_ms,
            "record versions past the retention period removed"
        );
    }
}

/// Proposes a checkpoint when writes are waiting to be folded into the Merkle trees; returns
/// the new checkpoint's index, or None when none was due or it did not commit (logged; the
/// next run retries).
pub async fn checkpoint_if_pending(core: &Core) -> Option<u64> {
    match core.reader.merkle_pending() {
        Ok(false) => return None,
        Ok(true) => {}
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether a checkpoint is due; next run retries");
            return None;
        }
    }
    match core.write(Command::Checkpoint, false).await {
        Ok(Outcome::Checkpoint { index }) => {
            tracing::info!(index, "periodic checkpoint recorded");
            Some(index)
        }
        Ok(other) => {
            tracing::warn!(outcome = ?other, "unexpected outcome of a checkpoint");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e.message(), "periodic checkpoint not committed; next run retries");
            None
        }
    }
}
