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
