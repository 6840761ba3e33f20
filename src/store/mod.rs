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
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Fsyncs a directory so that renames and new entries in it survive a crash.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `bytes` so that a crash leaves the old content or the new, never a
/// mix ([`Replacement`]).
pub fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut replacement = Replacement::new(path, false)?;
    replacement.file().write_all(bytes)?;
    replacement.commit()
}

/// A temporary file of a [`Replacement`] unwritten this long is taken as left by a crash and
/// removed when the same file is next replaced. A writer usually touches its file far more
/// often; one that writes nothing for longer (a download waiting out a cluster outage) while
/// another replaces the same file finds its temporary file gone: its commit fails with a
/// message saying so, and the target stays as the other writer left it.
pub const STALE_TMP_AGE: std::time::Duration = std::time::Duration::from_secs(3600);
/// Directory entries looked at for stale temporary files per replacement, so that writing
/// into a huge directory stays cheap; a stale file beyond them may stay while the directory
/// holds more entries than this.
const STALE_TMP_SCAN_MAX: usize = 10_000;
/// Random characters in a temporary file's name (`.NAME.<these>.tmp`).
const TMP_RANDOM_CHARS: usize = 16;
/// One process looks for stale temporary files of the same target at most this often: a
/// mirror agent saves its state file after every batch, and a scan of a directory of 10,000
/// entries takes milliseconds. Far under [`STALE_TMP_AGE`], so a leftover still goes soon
/// after it turns stale.
const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(600);
/// Targets whose last sweep one process remembers; beyond this it forgets the older ones
/// (and may sweep them again sooner).
const SWEPT_TARGETS_MAX: usize = 1024;

/// When each target was last swept by this process.
static LAST_SWEEPS: std::sync::Mutex<std::collections::BTreeMap<PathBuf, std::time::Instant>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// Whether `target` is due for a sweep ([`SWEEP_INTERVAL`]); if so, records it as swept now.
fn sweep_due(target: &Path) -> bool {
    let mut last = LAST_SWEEPS.lock().unwrap_or_else(|e| e.into_inner());
    sweep_due_in(&mut last, target, std::time::Instant::now())
}

/// [`sweep_due`] on a given record of sweeps, at `now`.
fn sweep_due_in(
    last: &mut std::collections::BTreeMap<PathBuf, std::time::Instant>,
    target: &Path,
    now: std::time::Instant,
) -> bool {
    if last
        .get(target)
        .is_some_and(|at| now.duration_since(*at) < SWEEP_INTERVAL)
    {
        return false;
    }
    if last.len() >= SWEPT_TARGETS_MAX {
        last.retain(|_, at| now.duration_since(*at) < SWEEP_INTERVAL);
        if last.len() >= SWEPT_TARGETS_MAX {
            last.clear();
        }
    }
    last.insert(target.to_path_buf(), now);
    true
}

/// Removes the temporary files of [`Replacement`]s of `dir/name` (`.NAME.<16 random
/// alphanumerics>.tmp`, regular files) untouched for [`STALE_TMP_AGE`]. Best effort: errors
/// leave files where they are.
fn sweep_stale_tmp(dir: &Path, name: &std::ffi::OsStr) {
    let Some(name) = name.to_str() else {
        return;
    };
    let prefix = format!(".{name}.");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.take(STALE_TMP_SCAN_MAX).flatten() {
        let file_name = entry.file_name();
        let Some(tag) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .and_then(|rest| rest.strip_suffix(".tmp"))
        else {
            continue;
        };
        // Exactly what `Replacement::new` names.
        if tag.len() != TMP_RANDOM_CHARS || !tag.bytes().all(|b| b.is_ascii_alphanumeric()) {
            continue;
        }
        // Not following links: a symlink named like a temporary file is left alone.
        let stale = entry
            .metadata()
            .ok()
            .filter(|m| m.is_file())
            .and_then(|m| m.modified().ok())
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age >= STALE_TMP_AGE);
        if stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A whole-or-nothing write of a file: the bytes go to a temporary file beside it
/// (`tempfile`: a name of its own, created exclusively, removed when dropped), which
/// [`Replacement::commit`] syncs, renames over the file and makes durable with a sync of the
/// directory. A file replaced keeps its permissions, a new one gets the usual ones (0666 less
/// the umask), and a secret is readable by its owner only (created 0600), whatever the file
/// it replaces allowed. A symlink's target is replaced, not the link; a target that is not a
/// regular file (a device such as /dev/stdout, a FIFO) is written directly. A temporary file
/// a crash left behind (nothing removed it) is removed when the same file is next replaced,
/// once it has been untouched for [`STALE_TMP_AGE`] (looked for at most every
/// [`SWEEP_INTERVAL`] per target and process).
pub struct Replacement(Target);

enum Target {
    /// Written in place: a target that is not a regular file.
    Direct(File),
    /// The temporary file, the file it replaces and their directory.
    Swap {
        tmp: tempfile::NamedTempFile,
        target: PathBuf,
        dir: PathBuf,
    },
}

impl Replacement {
    pub fn new(path: &Path, secret: bool) -> io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let existing = std::fs::metadata(path).ok();
        if existing.as_ref().is_some_and(|m| !m.is_file()) {
            let file = std::fs::OpenOptions::new().write(true).open(path)?;
            return Ok(Self(Target::Direct(file)));
        }
        // Absolute, so a bare file name has a directory to sync; a symlink resolved to the file
        // it names.
        let target = match existing {
            Some(_) => std::fs::canonicalize(path)?,
            None => std::path::absolute(path)?,
        };
        let dir = target.parent().unwrap_or(Path::new("/")).to_path_buf();
        std::fs::create_dir_all(&dir)?;
        let name = target.file_name().unwrap_or_default();
        if sweep_due(&target) {
            sweep_stale_tmp(&dir, name);
        }
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(name);
        prefix.push(".");
        let keep = !secret && existing.is_some();
        let permissions = match (secret, existing) {
            (true, _) => std::fs::Permissions::from_mode(0o600),
            (false, Some(m)) => m.permissions(),
            (false, None) => std::fs::Permissions::from_mode(0o666),
        };
        let tmp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".tmp")
            .rand_bytes(TMP_RANDOM_CHARS)
            .permissions(permissions.clone())
            .tempfile_in(&dir)?;
        // Created with the mode less the umask; a replaced file keeps its exact permissions.
        if keep {
            tmp.as_file().set_permissions(permissions)?;
        }
        Ok(Self(Target::Swap { tmp, target, dir }))
    }

    /// Where the bytes go.
    pub fn file(&mut self) -> &mut File {
        match &mut self.0 {
            Target::Direct(file) => file,
            Target::Swap { tmp, .. } => tmp.as_file_mut(),
        }
    }

    /// Makes the new content the file's, durably.
    pub fn commit(self) -> io::Result<()> {
        let Target::Swap { tmp, target, dir } = self.0 else {
            return Ok(());
        };
        tmp.as_file().sync_all()?;
        let tmp_path = tmp.path().to_path_buf();
        if let Err(e) = tmp.persist(&target) {
            if e.error.kind() == io::ErrorKind::NotFound && !tmp_path.exists() {
                return Err(io::Error::new(
                    e.error.kind(),
                    format!(
                        "{} was not replaced: its temporary file {} was removed (taken as \
                         left by a crash after {} minutes unwritten)",
                        target.display(),
                        tmp_path.display(),
                        STALE_TMP_AGE.as_secs() / 60
                    ),
                ));
            }
            return Err(e.error);
        }
        fsync_dir(&dir)
    }
}

#[cfg(test)]
mod tests {
    use super::write_atomically;
    use crate::auth::write_secret_file;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &std::path::Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Lets the next replacement of `path` sweep, as if [`super::SWEEP_INTERVAL`] had passed.
    fn forget_sweep(path: &std::path::Path) {
        let target = std::fs::canonicalize(path).unwrap();
        super::LAST_SWEEPS.lock().unwrap().remove(&target);
    }

    /// The names in `dir`, sorted.
    fn names_in(dir: &std::path::Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
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
        write_secret_file(&secret, b"new secret").unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), b"new secret");
        assert_eq!(mode(&secret), 0o600);

        // A new file gets what any new file gets here (0666 less the umask).
        let fresh = dir.path().join("fresh.bin");
        let plain = dir.path().join("plain.bin");
        write_atomically(&fresh, b"new").unwrap();
        std::fs::write(&plain, b"new").unwrap();
        assert_eq!(mode(&fresh), mode(&plain));

        assert_eq!(
            names_in(dir.path()),
            [
                "fresh.bin",
                "ops.token",
                "plain.bin",
                "value.bin",
                "value.bin.tmp"
            ]
        );
    }

    // Goal: a symlink stays a link and its target is replaced; a target that is not a regular
    // file (here /dev/null through a link) is written to, never replaced.
    #[test]
    fn links_are_followed_and_devices_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.bin");
        std::fs::write(&data, b"old").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&data, &link).unwrap();
        write_atomically(&link, b"new").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
        assert_eq!(std::fs::read(&data).unwrap(), b"new");

        let null = dir.path().join("null");
        std::os::unix::fs::symlink("/dev/null", &null).unwrap();
        write_atomically(&null, b"gone").unwrap();
        assert!(std::fs::symlink_metadata(&null).unwrap().is_symlink());
        assert!(!std::fs::metadata("/dev/null").unwrap().is_file());
    }

    // Goal: a temporary file a crash left behind is removed when the same file is next
    // replaced, once stale; a fresh one (a writer at work), another file's, and files only
    // named alike are left alone.
    #[test]
    fn stale_temporary_files_of_the_same_target_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        let old = std::time::SystemTime::now() - super::STALE_TMP_AGE * 2;
        let create = |name: &str, stale: bool| {
            let f = std::fs::File::create(at(name)).unwrap();
            if stale {
                f.set_modified(old).unwrap();
            }
        };
        create(".data.bin.0123456789abcDEF.tmp", true);
        create(".data.bin.fedcba9876543210.tmp", false);
        create(".other.bin.0123456789abcdef.tmp", true);
        create(".data.bin.notes.tmp", true);
        create(".data.bin.0123456789abcdef.tmp.keep", true);
        create(".data.bin.0123456789-bcdef.tmp", true);
        create(".data.bin.0123456789abcde.tmp", true);
        // A link and a directory named like a temporary file are never removed, nor is what
        // the link points to.
        create("old-target", true);
        std::os::unix::fs::symlink(at("old-target"), at(".data.bin.1111111111111111.tmp")).unwrap();
        std::fs::create_dir(at(".data.bin.2222222222222222.tmp")).unwrap();
        std::fs::File::open(at(".data.bin.2222222222222222.tmp"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        write_atomically(&at("data.bin"), b"new").unwrap();
        assert_eq!(
            names_in(dir.path()),
            vec![
                ".data.bin.0123456789-bcdef.tmp",
                ".data.bin.0123456789abcde.tmp",
                ".data.bin.0123456789abcdef.tmp.keep",
                ".data.bin.1111111111111111.tmp",
                ".data.bin.2222222222222222.tmp",
                ".data.bin.fedcba9876543210.tmp",
                ".data.bin.notes.tmp",
                ".other.bin.0123456789abcdef.tmp",
                "data.bin",
                "old-target",
            ]
        );
    }

    // Goal: a file saved over and over (a mirror agent's state) costs one directory scan per
    // interval, not one per save; the next sweep after the interval removes the leftover.
    #[test]
    fn one_target_is_swept_at_most_once_per_interval() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("state.json");
        write_atomically(&data, b"1").unwrap();
        let leftover = dir.path().join(".state.json.0123456789abcdef.tmp");
        std::fs::File::create(&leftover)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - super::STALE_TMP_AGE * 2)
            .unwrap();
        write_atomically(&data, b"2").unwrap();
        assert!(leftover.exists(), "swept again within the interval");
        forget_sweep(&data);
        write_atomically(&data, b"3").unwrap();
        assert!(!leftover.exists(), "not swept once the interval passed");
        assert_eq!(std::fs::read(&data).unwrap(), b"3");
    }

    // Goal: a process replacing ever new files remembers a bounded number of them, and a
    // target is due again once the interval passed.
    #[test]
    fn the_sweep_record_stays_bounded() {
        let mut last = std::collections::BTreeMap::new();
        let start = std::time::Instant::now();
        let at = |i: usize| std::path::PathBuf::from(format!("/d/f{i}"));
        for i in 0..super::SWEPT_TARGETS_MAX + 10 {
            assert!(super::sweep_due_in(&mut last, &at(i), start));
            assert!(last.len() <= super::SWEPT_TARGETS_MAX);
        }
        let newest = at(super::SWEPT_TARGETS_MAX + 9);
        assert!(!super::sweep_due_in(&mut last, &newest, start));
        let later = start + super::SWEEP_INTERVAL;
        assert!(super::sweep_due_in(&mut last, &newest, later));
        assert!(!super::sweep_due_in(&mut last, &newest, later));
    }

    // Goal: a writer stalled past the age whose temporary file another replacement swept
    // fails at its commit with a message saying why, and the other writer's content stays.
    #[test]
    fn a_writer_whose_temporary_file_was_swept_fails_and_leaves_the_target() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.bin");
        std::fs::write(&data, b"old").unwrap();
        let mut stalled = super::Replacement::new(&data, false).unwrap();
        stalled.file().write_all(b"first").unwrap();
        let super::Target::Swap { tmp, .. } = &stalled.0 else {
            panic!("a regular file is replaced through a temporary file");
        };
        let tmp = tmp.path().to_path_buf();
        std::fs::File::options()
            .write(true)
            .open(&tmp)
            .unwrap()
            .set_modified(std::time::SystemTime::now() - super::STALE_TMP_AGE * 2)
            .unwrap();
        // As if the interval between two sweeps of the same target had passed.
        forget_sweep(&data);
        write_atomically(&data, b"second").unwrap();
        assert!(!tmp.exists());
        let err = stalled.commit().unwrap_err();
        assert!(err.to_string().contains("was removed"), "{err}");
        assert_eq!(std::fs::read(&data).unwrap(), b"second");
    }
}
