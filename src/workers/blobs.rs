//! Blob garbage collection on every node, on demand: about every `BLOB_GC_INTERVAL` it asks
//! the state machine to give back the space of garbage in its blob files when there is enough
//! of it ([`crate::store::sm::SmReader::collect_blob_garbage`]). Values are kept in RocksDB
//! blob files with collection off, so compactions do not rewrite live values; this is what
//! gives back the space of expired history versions.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::watch;

use crate::service::Core;

/// Pause between two checks (a check reads RocksDB properties unless it has work), plus a
/// random part of up to as much again: expiry is replicated, so every node crosses the
/// threshold at about the same time, and their collections had better not all run at once.
pub const BLOB_GC_INTERVAL: Duration = Duration::from_secs(600);

pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let pause = BLOB_GC_INTERVAL + BLOB_GC_INTERVAL.mul_f64(rand::thread_rng().gen::<f64>());
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(pause) => {}
        }
        // Not raced against shutdown: the node's shutdown stops RocksDB's background work,
        // which ends a running collection's compaction.
        let reader = core.reader.clone();
        let collected = tokio::task::spawn_blocking(move || {
            reader.collect_blob_garbage().map_err(|e| e.to_string())
        });
        match collected.await {
            // Other compactions may count new garbage meanwhile: judge by both figures.
            Ok(Ok(Some(c)))
                if c.after.garbage_bytes < c.before.garbage_bytes
                    || c.after.bytes < c.before.bytes =>
            {
                tracing::info!(
                    blob_bytes_before = c.before.bytes,
                    garbage_bytes_before = c.before.garbage_bytes,
                    blob_bytes_after = c.after.bytes,
                    garbage_bytes_after = c.after.garbage_bytes,
                    "blob garbage collected"
                )
            }
            Ok(Ok(Some(c))) => tracing::warn!(
                blob_bytes = c.after.bytes,
                garbage_bytes = c.after.garbage_bytes,
                "blob garbage collection ran but the garbage did not go down (the compaction failed or was stopped; RocksDB's LOG says why)"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "blob garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "blob garbage collection task failed"),
        }
    }
}
