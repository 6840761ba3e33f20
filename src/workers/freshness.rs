//! The staleness watch: refreshes every namespace's freshness gauges and warns when a source
//! falls silent past `mirror.stale_after_s` (a vendor that silently stops mirroring is the
//! classic escrow failure).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::domain::{TenantId, TenantState};
use crate::service::tenants::freshness;
use crate::service::{now_ms, Core};

/// How often the watch looks at every namespace.
pub const FRESHNESS_INTERVAL: Duration = Duration::from_secs(5);

/// Runs until shutdown.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    // Whether each namespace was stale at the previous step, to warn once per transition.
    let mut stale: BTreeMap<String, bool> = BTreeMap::new();
    loop {
        if let Err(e) = step(&core, &mut stale) {
            tracing::warn!(error = %e, "freshness watch could not read the state machine");
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(FRESHNESS_INTERVAL) => {}
        }
    }
}

fn step(core: &Core, previous: &mut BTreeMap<String, bool>) -> Result<(), String> {
    let reader = &core.reader;
    let now = now_ms();
    let mut namespaces: Vec<(TenantId, bool)> = reader
        .tenants()
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|t| (t.id, t.state == TenantState::Active))
        .collect();
    namespaces.push((TenantId::vendor(), true));
    for (id, active) in namespaces {
        let stats = reader.stats(&id).map_err(|e| e.to_string())?;
        let f = freshness(&stats, core.mirror.stale_after_s, now);
        core.metrics.namespaces.set(id.as_str(), &f);
        // Only a source that mirrored before and went quiet is news; a namespace never
        // mirrored into shows as stale in status and metrics without repeating it in the log.
        let silent = active && f.stale && stats.last_commit_ms > 0;
        let was = previous
            .insert(id.as_str().to_string(), silent)
            .unwrap_or(false);
        if silent && !was {
            tracing::warn!(
                namespace = id.as_str(),
                silent_s = f.silent_ms / 1000,
                stale_after_s = core.mirror.stale_after_s,
                "mirror source silent past its bound: the escrow is going stale"
            );
        } else if !silent && was {
            tracing::info!(namespace = id.as_str(), "mirror source active again");
        }
    }
    Ok(())
}
