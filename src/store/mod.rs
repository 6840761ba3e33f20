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
/// mix: write a temporary file beside it, fsync, rename over, fsync the directory. A file
/// replaced keeps its permissions; a new one gets the usual ones (0666 less the umask).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let keep = std::fs::metadata(path).ok().map(|m| m.permissions());
    replace_file(path, bytes, None, keep)
}

/// [`write_atomically`] for a secret: the new file is readable by its owner only (created
/// 0600), whatever the file it replaces allowed.
pub fn write_secret_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    replace_file(path, bytes, Some(0o600), None)
}

fn replace_file(
    path: &Path,
    bytes: &[u8],
    create_mode: Option<u32>,
    keep: Option<std::fs::Permissions>,
) -> io::Result<()> {
    use std::io::Write;
    // A bare file name's parent is "", which cannot be opened to fsync: that is ".".
    let dir = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    // A name of its own (created exclusively), so two writers never share a temporary file
    // and an unrelated file is never overwritten.
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(path.file_name().unwrap_or_default());
    tmp_name.push(format!(".{:016x}.tmp", rand::random::<u64>()));
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        if let Some(mode) = create_mode {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(mode);
        }
        let mut f = options.open(&tmp)?;
        if let Some(permissions) = keep {
            f.set_permissions(permissions)?;
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::{write_atomically, write_secret_atomically};
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    // Goal: a replaced file keeps its permissions (customer data saved 0600 stays 0600), a
    // secret is 0600 even over a file that allowed more, no temporary file stays behind, and
    // a file named like the old fixed temporary name is left alone.
    #[test]
    fn replacing_keeps_permissions_and_secrets_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("value.bin");
        std::fs::write(&data, b"old").unwrap();
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o600)).unwrap();
        let unrelated = dir.path().join("value.bin.tmp");
        std::fs::write(&unrelated, b"someone else's").unwrap();
        write_atomically(&data, b"new").unwrap();
        assert_eq!(std::fs::read(&data).unwrap(), b"new");
        assert_eq!(mode(&data), 0o600);
        assert_eq!(std::fs::read(&unrelated).unwrap(), b"someone else's");

        let secret = dir.path().join("ops.token");
        std::fs::write(&secret, b"old").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_secret_atomically(&secret, b"new secret").unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"new secret");
        assert_eq!(mode(&secret), 0o600);

        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["ops.token", "value.bin", "value.bin.tmp"]);
    }
}
