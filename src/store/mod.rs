//! The only module that knows RocksDB: the Raft log store, the state-machine store and
//! snapshots. Everything above it works on domain and Raft types.

// openraft's `StorageError` is the error type of the storage traits this module implements;
// boxing it in the helpers would only unbox it again at the trait boundary.
#![allow(clippy::result_large_err)]

mod keys;
pub mod log;
pub mod sm;

pub use log::LogStore;
pub use sm::{
    DeepCheck, NamespaceCheck, RecordAt, SmReader, SnapshotDir, SnapshotFileInfo, StateMachineStore,
};

use std::fs::File;
use std::io;
use std::path::Path;

/// Fsyncs a directory so that renames and new entries in it survive a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or the new, never a
/// mix: write a temporary file beside it, fsync, rename over, fsync the directory.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    // A bare file name's parent is "", which cannot be opened to fsync: that is ".".
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    fsync_dir(dir)
}
