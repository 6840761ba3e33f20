//! Retention: on the leader, once an hour, proposes `ExpireHistory` with the cutoff
//! `now - mirror.retention_days`, repeating while the state machine reports more expired
//! versions (each entry removes at most `ledger::EXPIRE_VERSIONS_MAX`). The cutoff travels in
//! the command, so every replica removes exactly the same versions.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::ledger::{Command, Outcome};
use crate::service::{now_ms, Core};

/// Pause between two expiry runs.
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
}
