//! The scrubber: re-reads every stored chunk at a throttled rate, round after round. A copy
//! that no longer matches its address is quarantined (never served), counted in
//! `escrow_chunks_corrupt_found_total`, logged, and replaced with a copy fetched from a peer and
//! verified before it is stored.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::chunks::ChunkError;
use crate::domain::hex;
use crate::service::Core;

/// Runs until shutdown: a round, then a pause (or a kick from deep verify), and again.
pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    let rate = core.integrity.scrub_mb_per_s.max(1) as f64 * 1e6;
    let pause = Duration::from_secs(core.integrity.scrub_pause_s);
    loop {
        let listed = {
            let chunks = core.chunks.clone();
            tokio::task::spawn_blocking(move || chunks.list()).await
        };
        let hashes = match listed {
            Ok(Ok(list)) => list,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "scrubber cannot list the chunk store");
                Vec::new()
            }
            Err(e) => {
                tracing::warn!(error = %e, "scrubber task failed");
                Vec::new()
            }
        };
        for (hash, _) in hashes {
            if *shutdown.borrow() {
                return;
            }
            let chunks = core.chunks.clone();
            let checked =
                tokio::task::spawn_blocking(move || chunks.get(&hash).map(|b| b.len())).await;
            let bytes = match checked {
                Ok(Ok(len)) => len,
                Ok(Err(ChunkError::Mismatch { found, .. })) => {
                    // `get` quarantined it already; fetch a verified copy from a peer.
                    tracing::warn!(chunk = %hex(&hash), found = %found, "scrub: corrupt chunk copy; repairing from a peer");
                    match core.chunk_anywhere(hash).await {
                        Ok(f) if f.kept => {
                            core.metrics.chunks_repaired.inc();
                            tracing::info!(chunk = %hex(&hash), "scrub: chunk repaired from a peer");
                            f.bytes.len()
                        }
                        Ok(f) => {
                            tracing::warn!(chunk = %hex(&hash), "scrub: a good copy was fetched but not kept, as this node's disk is under its reserve; chunk sync fetches it once there is room");
                            core.chunk_sync_wanted
                                .store(true, std::sync::atomic::Ordering::Relaxed);
                            f.bytes.len()
                        }
                        Err(e) => {
                            tracing::error!(chunk = %hex(&hash), error = %e.message(), "scrub: no good copy of a corrupt chunk could be fetched");
                            0
                        }
                    }
                }
                // Removed since the listing (garbage collection): nothing to do.
                Ok(Err(ChunkError::Missing(_))) => 0,
                Ok(Err(e)) => {
                    tracing::warn!(chunk = %hex(&hash), error = %e, "scrub: cannot read chunk");
                    0
                }
                Err(e) => {
                    tracing::warn!(error = %e, "scrubber task failed");
                    0
                }
            };
            // Throttle: this chunk's share of a second at the configured rate.
            let wait = Duration::from_secs_f64(bytes as f64 / rate);
            tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        core.metrics.scrub_rounds.inc();
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = core.scrub_kick.notified() => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
