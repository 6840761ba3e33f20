//! Blob garbage collection on every node, on demand: every `BLOB_GC_INTERVAL` it asks the
//! state machine to give back the space of garbage in its blob files when there is enough of
//! it ([`crate::store::sm::SmReader::collect_blob_garbage`]). Values are kept in RocksDB blob
//! files with collection off, so compactions do not rewrite live values; this is what gives
//! back the space of expired history versions.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::service::Core;

/// Pause between two checks (each reads two RocksDB properties unless it has work).
pub const BLOB_GC_INTERVAL: Duration = Duration::from_secs(600);

pub async fn run(core: Arc<Core>, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(BLOB_GC_INTERVAL) => {}
        }
        // Not raced against shutdown: the collection holds the database until it finishes,
        // and the node waits for it rather than leave it running behind a reopen.
        let reader = core.reader.clone();
        let collected = tokio::task::spawn_blocking(move || {
            reader.collect_blob_garbage().map_err(|e| e.to_string())
        });
        match collected.await {
            Ok(Ok(Some(c))) => tracing::info!(
                blob_bytes_before = c.before.bytes,
                garbage_bytes_before = c.before.garbage_bytes,
                blob_bytes_after = c.after.bytes,
                garbage_bytes_after = c.after.garbage_bytes,
                "blob garbage collected"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "blob garbage collection failed"),
            Err(e) => tracing::warn!(error = %e, "blob garbage collection task failed"),
        }
    }
}
