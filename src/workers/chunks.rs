//! Chunk sync: makes this node hold every chunk its committed artifact versions reference
//! (a new node, a lagging follower, a node that installed a snapshot), fetching each missing
//! one from a peer and verifying it; and collects chunks no version references once they are
//! older than the grace period (an upload that never committed).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::stream::{self, StreamExt};
use tokio::sync::watch;

use crate::domain::Digest;
use crate::service::Core;

/// Pause between checks for new chunk references.
pub const CHUNK_SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// After a pass that left chunks missing (no peer had them, or none answered), the next pass
/// runs this much later.
pub const CHUNK_SYNC_RETRY: Duration = Duration::from_secs(30);
/// A full pass runs at least this often even when nothing changed, as a safety net.
pub const CHUNK_SYNC_SAFETY_PASS: Duration = Duration::from_secs(600);
/// Referenced chunks read from the state machine per step.
const SYNC_PAGE: usize = 1024;
/// Chunks fetched from peers at once.
const FETCHES_IN_FLIGHT: usize = 4;
/// How often unreferenced chunks are looked for.
pub const CHUNK_GC_INTERVAL: Duration = Duration::from_secs(600);
/// An unreferenced chunk younger than this is kept: it may belong to an upload whose manifest
/// has not committed yet.
pub const CHUNK_GC_GRACE: Duration = Duration::from_secs(24 * 3600);

/// Runs until shutdown.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    // A pass reads every referenced chunk's presence, so it runs only when references were
    // added (not on every applied write), when the last pass left some missing, or rarely as a
    // safety net.
    let mut synced_refs: Option<u64> = None;
    let mut missing = 0usize;
    let mut last_pass = tokio::time::Instant::now();
    let mut last_gc = tokio::time::Instant::now();
    loop {
        let refs = core.reader.chunk_refs_index();
        // Fetching onto a disk under its reserve would fill it: the pass waits for room.
        let due = (synced_refs != Some(refs)
            || (missing > 0 && last_pass.elapsed() >= CHUNK_SYNC_RETRY)
            || last_pass.elapsed() >= CHUNK_SYNC_SAFETY_PASS
            || core.chunk_sync_wanted.load(Ordering::Relaxed))
            && core.disk.local_refusal().is_none();
        if due {
            core.chunk_sync_wanted.store(false, Ordering::Relaxed);
            match sync_pass(&core).await {
                Ok(m) => {
                    missing = m;
                    core.metrics.chunks_missing.set(m as i64);
                    synced_refs = Some(refs);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "chunk sync pass failed; retrying later");
                    synced_refs = Some(refs);
                    missing = missing.max(1);
                }
            }
            last_pass = tokio::time::Instant::now();
        }
        if last_gc.elapsed() >= CHUNK_GC_INTERVAL {
            if let Err(e) = gc_pass(&core, CHUNK_GC_GRACE).await {
                tracing::warn!(error = %e, "chunk garbage collection failed");
            }
            last_gc = tokio::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(CHUNK_SYNC_INTERVAL) => {}
        }
    }
}

/// One pass over every referenced chunk; returns how many are still missing here.
pub async fn sync_pass(core: &Arc<Core>) -> Result<usize, String> {
    let mut after: Option<Digest> = None;
    let mut missing_after = 0usize;
    loop {
        let page = core
            .reader
            .referenced_chunks(after.as_ref(), SYNC_PAGE)
            .map_err(|e| e.to_string())?;
        let Some(last) = page.last() else {
            return Ok(missing_after);
        };
        after = Some(last.hash);
        let chunks = core.chunks.clone();
        let hashes: Vec<Digest> = page.iter().map(|c| c.hash).collect();
        let missing: Vec<Digest> = tokio::task::spawn_blocking(move || {
            hashes.into_iter().filter(|h| !chunks.has(h)).collect()
        })
        .await
        .map_err(|e| e.to_string())?;
        let results: Vec<bool> = stream::iter(missing)
            .map(|hash| async move {
                // A disk gone under its reserve mid-pass takes no more (a fetch would then
                // only verify the bytes, not keep them).
                if core.disk.local_refusal().is_some() {
                    return false;
                }
                match core.chunk_anywhere(hash).await {
                    // Not kept: the disk went under its reserve during the fetch.
                    Ok(fetched) => fetched.kept,
                    Err(e) => {
                        tracing::debug!(chunk = %crate::domain::hex(&hash), error = %e.message(), "chunk not fetched yet");
                        false
                    }
                }
            })
            .buffer_unordered(FETCHES_IN_FLIGHT)
            .collect()
            .await;
        let fetched = results.iter().filter(|ok| **ok).count();
        missing_after += results.len() - fetched;
        if fetched > 0 {
            tracing::info!(fetched, "fetched missing chunks from peers");
        }
        if page.len() < SYNC_PAGE {
            return Ok(missing_after);
        }
    }
}

/// Removes chunks no version references that are older than `grace` ([`CHUNK_GC_GRACE`] in
/// the node); returns how many were removed.
pub async fn gc_pass(core: &Arc<Core>, grace: std::time::Duration) -> Result<usize, String> {
    let chunks = core.chunks.clone();
    let reader = core.reader.clone();
    let removed = tokio::task::spawn_blocking(move || -> Result<usize, String> {
        let now = SystemTime::now();
        let mut removed = 0;
        for (hash, listed) in chunks.list().map_err(|e| e.to_string())? {
            // The listing only picks candidates; `remove_if_stale` checks age and references
            // again under the chunk's lock, so an upload that claimed it since keeps it.
            if now.duration_since(listed).is_ok_and(|age| age >= grace) {
                let unreferenced =
                    || -> anyhow::Result<bool> { Ok(!reader.chunk_referenced(&hash)?) };
                if chunks
                    .remove_if_stale(&hash, grace, unreferenced)
                    .map_err(|e| e.to_string())?
                {
                    removed += 1;
                }
            }
        }
        Ok(removed)
    })
    .await
    .map_err(|e| e.to_string())??;
    if removed > 0 {
        tracing::info!(removed, "unreferenced chunks collected");
    }
    Ok(removed)
}
