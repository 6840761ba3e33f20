//! `escrowctl mirror --dir DIR --namespace NS`: keeps a namespace equal to a directory tree.
//!
//! Each pass walks the tree without following symlinks, uploads new or changed files as new
//! artifact versions (only chunks the cluster lacks travel), and turns files that disappeared
//! into tombstone versions; escrowed history is never deleted. Artifact names are the files'
//! paths relative to the root, '/'-separated; a name that does not validate, a symlink (which
//! might point outside the tree or into a loop) and anything that is not a regular file are
//! skipped and reported, never followed. A local state file caches (size, mtime, blake3) per
//! file so unchanged files are not re-read; losing it costs only re-hashing.
//!
//! Without `--once` the agent watches the tree (notify) and runs a pass shortly after changes,
//! plus a full rescan every `rescan` as a safety net for missed events.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};

use super::artifacts::upload_file;
use crate::client::EscrowClient;
use crate::domain::ArtifactName;

/// Files uploaded at once.
pub const FILES_IN_FLIGHT: usize = 8;
/// Quiet time after a file-system event before a pass starts (changes come in bursts).
pub const EVENT_DEBOUNCE: Duration = Duration::from_millis(500);
/// The longest a pass waits for events to settle: a tree that changes without pause is still
/// mirrored this often.
pub const EVENT_SETTLE_MAX: Duration = Duration::from_secs(30);
/// Default interval of the full rescan in follow mode.
pub const RESCAN_DEFAULT: Duration = Duration::from_secs(600);
/// File-system events queued between passes. An event only says "something changed" (each
/// pass walks the whole tree), so when the queue is full the next ones are dropped: a burst of
/// a million writes during a long pass costs no memory.
const EVENTS_QUEUED_MAX: usize = 64;
/// Uploads between two saves of the state file.
const STATE_SAVE_EVERY: usize = 64;
const STATE_VERSION: u32 = 1;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Seen {
    size: u64,
    mtime_ns: i128,
    blake3: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct DirState {
    version: u32,
    namespace: String,
    root: PathBuf,
    files: BTreeMap<String, Seen>,
}

impl DirState {
    fn load(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice::<DirState>(&bytes)
            .ok()
            .filter(|s| s.version == STATE_VERSION)
    }

    fn save(&self, path: &Path) -> std::io::Result<()> {
        crate::store::write_atomically(path, &serde_json::to_vec(self).expect("state serialises"))
    }
}

#[derive(Debug, Clone)]
pub struct DirOptions {
    pub root: PathBuf,
    pub namespace: String,
    pub state_file: PathBuf,
    pub once: bool,
    pub rescan: Duration,
}

/// A path the agent did not mirror, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
    /// A directory that could not be read: what is escrowed under it is not "gone".
    #[serde(skip)]
    pub dir: bool,
}

/// What a pass (or all passes of a run) did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DirReport {
    pub namespace: String,
    pub passes: u64,
    pub files: u64,
    pub bytes: u64,
    /// Files that became a new version.
    pub uploaded: u64,
    pub unchanged: u64,
    /// Files gone from the tree, escrowed as tombstones.
    pub deleted: u64,
    pub chunks_sent: u64,
    pub bytes_sent: u64,
    pub skipped: Vec<Skipped>,
    /// Files that could not be mirrored in the last pass (retried on the next).
    pub failed: Vec<Skipped>,
    /// A stop request cut the last pass short: what was uploaded is kept (and recorded in the
    /// state file); the rest, and the tombstones of files gone, wait for the next run.
    pub stopped: bool,
}

/// Progress callbacks.
pub trait DirProgress: Sync {
    fn pass_started(&self, _files: u64, _bytes: u64) {}
    fn file_done(&self, _bytes: u64) {}
}

impl DirProgress for () {}

/// A regular file found by [`walk`].
pub struct Entry {
    pub name: ArtifactName,
    pub path: PathBuf,
    pub size: u64,
    pub mtime_ns: i128,
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    meta.modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Linux's "too many levels of symbolic links" (std has no stable ErrorKind for it).
const ELOOP: i32 = 40;

/// Why a symlink is not followed, in the words an operator needs.
fn describe_symlink(root: &Path, path: &Path) -> String {
    match std::fs::canonicalize(path) {
        Err(e) if e.raw_os_error() == Some(ELOOP) => "a symlink loop (not followed)".into(),
        Err(_) => "a dangling symlink (not followed)".into(),
        Ok(target) if !target.starts_with(root) => format!(
            "a symlink to {} outside the tree (not followed)",
            target.display()
        ),
        Ok(_) => "a symlink (symlinks are not followed; mirror the file it points to)".into(),
    }
}

/// Walks the tree (no symlinks followed), returning regular files and what was skipped.
pub fn walk(root: &Path) -> std::io::Result<(Vec<Entry>, Vec<Skipped>)> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if dir != root => {
                let rel = dir.strip_prefix(root).unwrap_or(&dir);
                skipped.push(Skipped {
                    path: rel.display().to_string(),
                    reason: format!("cannot read the directory: {e}"),
                    dir: true,
                });
                continue;
            }
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path)?;
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let shown = rel.display().to_string();
            if meta.file_type().is_symlink() {
                skipped.push(Skipped {
                    path: shown,
                    reason: describe_symlink(root, &path),
                    dir: false,
                });
            } else if meta.is_dir() {
                dirs.push(path);
            } else if meta.is_file() {
                let name = rel
                    .to_str()
                    .ok_or_else(|| "the name is not UTF-8".to_string())
                    .and_then(|n| ArtifactName::parse(n).map_err(|e| e.to_string()));
                match name {
                    Ok(name) => files.push(Entry {
                        name,
                        path,
                        size: meta.len(),
                        mtime_ns: mtime_ns(&meta),
                    }),
                    Err(reason) => skipped.push(Skipped {
                        path: shown,
                        reason,
                        dir: false,
                    }),
                }
            } else {
                skipped.push(Skipped {
                    path: shown,
                    reason: "not a regular file or directory".into(),
                    dir: false,
                });
            }
        }
    }
    files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((files, skipped))
}

/// One pass: upload what changed, tombstone what disappeared.
pub async fn pass(
    client: &EscrowClient,
    options: &DirOptions,
    progress: &dyn DirProgress,
) -> Result<DirReport, String> {
    let mut never = super::Stop::new(std::future::pending());
    pass_until(client, options, progress, &mut never).await
}

/// [`pass`], unless a stop request ends it early ([`DirReport::stopped`]), with the state of
/// what was uploaded saved.
pub async fn pass_until<F: std::future::Future<Output = ()>>(
    client: &EscrowClient,
    options: &DirOptions,
    progress: &dyn DirProgress,
    stop: &mut super::Stop<F>,
) -> Result<DirReport, String> {
    let stopped = || DirReport {
        namespace: options.namespace.clone(),
        passes: 1,
        stopped: true,
        ..Default::default()
    };
    let root = std::fs::canonicalize(&options.root)
        .map_err(|e| format!("cannot open {}: {e}", options.root.display()))?;
    if !root.is_dir() {
        return Err(format!("{} is not a directory", root.display()));
    }
    let mut state = DirState::load(&options.state_file)
        .filter(|s| s.namespace == options.namespace && s.root == root)
        .unwrap_or_else(|| DirState {
            version: STATE_VERSION,
            namespace: options.namespace.clone(),
            root: root.clone(),
            files: BTreeMap::new(),
        });
    let walk_root = root.clone();
    let Some(walked) = stop
        .until(tokio::task::spawn_blocking(move || walk(&walk_root)))
        .await
    else {
        return Ok(stopped());
    };
    let (files, skipped) = walked
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot walk {}: {e}", root.display()))?;
    let Some(listed) = stop
        .until(client.list_artifacts(&options.namespace, false))
        .await
    else {
        return Ok(stopped());
    };
    let escrowed: HashMap<String, String> = listed
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter_map(|a| {
            let m = a.manifest?;
            Some((a.name, crate::domain::hex_wire(&m.blake3)))
        })
        .collect();
    let mut report = DirReport {
        namespace: options.namespace.clone(),
        passes: 1,
        files: files.len() as u64,
        bytes: files.iter().map(|f| f.size).sum(),
        skipped,
        ..Default::default()
    };
    progress.pass_started(report.files, report.bytes);

    // Files whose size and mtime match the cache and whose hash the escrow already holds need
    // not even be read.
    let (unchanged, changed): (Vec<&Entry>, Vec<&Entry>) = files.iter().partition(|f| {
        state.files.get(f.name.as_str()).is_some_and(|seen| {
            seen.size == f.size
                && seen.mtime_ns == f.mtime_ns
                && escrowed.get(f.name.as_str()) == Some(&seen.blake3)
        })
    });
    report.unchanged = unchanged.len() as u64;
    for f in &unchanged {
        progress.file_done(f.size);
    }
    let mut uploads = stream::iter(changed)
        .map(|f| async move {
            let result = upload_file(client, &options.namespace, f.name.as_str(), &f.path).await;
            (f, result)
        })
        .buffer_unordered(FILES_IN_FLIGHT);
    let mut since_save = 0;
    while let Some(Some((f, result))) = stop.until(uploads.next()).await {
        progress.file_done(f.size);
        match result {
            Ok(r) => {
                if r.changed {
                    report.uploaded += 1;
                } else {
                    report.unchanged += 1;
                }
                report.chunks_sent += r.chunks_sent as u64;
                report.bytes_sent += r.bytes_sent;
                state.files.insert(
                    f.name.as_str().to_string(),
                    Seen {
                        size: f.size,
                        mtime_ns: f.mtime_ns,
                        blake3: r.blake3,
                    },
                );
                since_save += 1;
                if since_save >= STATE_SAVE_EVERY {
                    since_save = 0;
                    let _ = state.save(&options.state_file);
                }
            }
            Err(e) => report.failed.push(Skipped {
                path: f.name.as_str().to_string(),
                reason: e.to_string(),
                dir: false,
            }),
        }
    }
    drop(uploads);
    report.stopped = stop.requested();

    // Files gone from the tree become tombstones (earlier versions stay escrowed), unless the
    // pass was stopped. A path that was skipped this pass is not "gone".
    let present: std::collections::HashSet<&str> = files
        .iter()
        .map(|f| f.name.as_str())
        .chain(report.skipped.iter().map(|s| s.path.as_str()))
        .collect();
    let unreadable: Vec<String> = report
        .skipped
        .iter()
        .filter(|s| s.dir)
        .map(|s| format!("{}/", s.path))
        .collect();
    let gone: Vec<&String> = escrowed
        .keys()
        .filter(|name| {
            !report.stopped
                && !present.contains(name.as_str())
                && !unreadable.iter().any(|d| name.starts_with(d.as_str()))
        })
        .collect();
    for name in gone {
        let Some(deleted) = stop
            .until(client.delete_artifact(&options.namespace, name))
            .await
        else {
            report.stopped = true;
            break;
        };
        match deleted {
            Ok(_) => {
                report.deleted += 1;
                state.files.remove(name);
            }
            Err(e) => report.failed.push(Skipped {
                path: name.clone(),
                reason: e.to_string(),
                dir: false,
            }),
        }
    }
    state
        .save(&options.state_file)
        .map_err(|e| format!("cannot save {}: {e}", options.state_file.display()))?;
    Ok(report)
}

/// Why a following directory agent woke up.
enum Woke {
    /// The file watcher saw changes.
    Changes,
    /// Time for the full rescan.
    Rescan,
    /// The file watcher is gone.
    WatcherGone,
}

/// Runs passes until `once` is done or `stop` resolves. Returns the last pass's report with
/// the pass count of the run.
pub async fn run_dir(
    client: &EscrowClient,
    options: &DirOptions,
    progress: &dyn DirProgress,
    stop: impl std::future::Future<Output = ()>,
) -> Result<DirReport, String> {
    let mut stop = super::Stop::new(stop);
    let mut report = pass_until(client, options, progress, &mut stop).await?;
    if options.once || report.stopped {
        return Ok(report);
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(EVENTS_QUEUED_MAX);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // Full: the events queued already start the next pass.
        let _ = tx.try_send(event);
    })
    .map_err(|e| format!("cannot watch {}: {e}", options.root.display()))?;
    use notify::Watcher;
    watcher
        .watch(&options.root, notify::RecursiveMode::Recursive)
        .map_err(|e| format!("cannot watch {}: {e}", options.root.display()))?;
    let mut passes = report.passes;
    loop {
        let woke = stop
            .until(async {
                tokio::select! {
                    event = rx.recv() => if event.is_some() { Woke::Changes } else { Woke::WatcherGone },
                    _ = tokio::time::sleep(options.rescan) => Woke::Rescan,
                }
            })
            .await;
        match woke {
            None => return Ok(report),
            Some(Woke::WatcherGone) => return Err("the file watcher stopped".into()),
            Some(Woke::Rescan) => {}
            Some(Woke::Changes) => {
                // Let a burst of changes settle (at most EVENT_SETTLE_MAX), then take it in
                // one pass.
                let settle = tokio::time::timeout(EVENT_SETTLE_MAX, async {
                    loop {
                        tokio::select! {
                            more = rx.recv() => if more.is_none() { break },
                            _ = tokio::time::sleep(EVENT_DEBOUNCE) => break,
                        }
                    }
                });
                if stop.until(settle).await.is_none() {
                    return Ok(report);
                }
            }
        }
        match pass_until(client, options, progress, &mut stop).await {
            Ok(r) => {
                passes += 1;
                report = DirReport { passes, ..r };
                if report.stopped {
                    return Ok(report);
                }
                if !report.failed.is_empty() {
                    tracing::warn!(
                        failed = report.failed.len(),
                        "some files were not mirrored; retrying on the next pass"
                    );
                }
            }
            Err(e) => tracing::warn!(error = %e, "mirror pass failed; retrying on the next"),
        }
    }
}
