//! The content-addressed chunk store on each node: bulk bytes live here, outside the Raft log
//! and outside snapshots.
//!
//! Layout under the node's data dir:
//! ```text
//! chunks/ab/<64 hex>      a chunk, named by its blake3 (first byte as a fan-out directory)
//! chunks/tmp/             chunks being written (removed at start)
//! chunks/quarantine/      copies that failed verification, kept for inspection
//! ```
//! Writes are verify → write tmp → fsync → rename → fsync dir, so a chunk file that exists is
//! complete and was correct when written. Every read re-hashes the bytes: a copy that no
//! longer matches its address is moved to quarantine and never returned.
//!
//! All functions block on disk IO; async callers run them on the blocking pool.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use prometheus_client::metrics::counter::Counter;

use crate::domain::{hex, Digest, CHUNK_MAX_BYTES};

const TMP_DIR: &str = "tmp";
const QUARANTINE_DIR: &str = "quarantine";
/// Locks that order garbage collection against claims and writes of the same chunk (a chunk
/// maps to one by its first hash byte).
const CHUNK_LOCK_STRIPES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {hash}: the bytes hash to {found}, not to their address")]
    Mismatch { hash: String, found: String },
    #[error("chunk {hash} is {len} bytes, over the limit of {CHUNK_MAX_BYTES}")]
    TooLarge { hash: String, len: usize },
    #[error("chunk {0} is not stored on this node")]
    Missing(String),
    #[error("chunk store IO on {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ChunkError + '_ {
    move |cause| ChunkError::Io {
        path: path.to_path_buf(),
        cause,
    }
}

/// One node's chunk files.
pub struct ChunkStore {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// Corrupt copies found (on read or scrub) since start; the node exports it as
    /// `escrow_chunks_corrupt_found_total`.
    pub corrupt_found: Counter,
    /// Held while a chunk is claimed, written or collected, so that collection cannot remove
    /// a copy an upload has just found present (see [`ChunkStore::remove_if_stale`]).
    locks: Vec<Mutex<()>>,
}

/// Checks chunk bytes against their address: no larger than a chunk may be, and hashing to
/// `hash`.
pub fn verify(hash: &Digest, bytes: &[u8]) -> Result<(), ChunkError> {
    if bytes.len() > CHUNK_MAX_BYTES as usize {
        return Err(ChunkError::TooLarge {
            hash: hex(hash),
            len: bytes.len(),
        });
    }
    let found = blake3::hash(bytes);
    if found.as_bytes() != hash {
        return Err(ChunkError::Mismatch {
            hash: hex(hash),
            found: found.to_hex().to_string(),
        });
    }
    Ok(())
}

impl ChunkStore {
    /// Opens (or creates) the store under `root`, clearing writes a crash interrupted.
    pub fn open(root: &Path) -> Result<Self, ChunkError> {
        let tmp = root.join(TMP_DIR);
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
        let quarantine = root.join(QUARANTINE_DIR);
        std::fs::create_dir_all(&quarantine).map_err(io(&quarantine))?;
        Ok(Self {
            root: root.to_path_buf(),
            tmp_seq: AtomicU64::new(0),
            corrupt_found: Counter::default(),
            locks: (0..CHUNK_LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
        })
    }

    fn lock(&self, hash: &Digest) -> MutexGuard<'_, ()> {
        // The guarded data is `()`: a panic elsewhere leaves nothing inconsistent.
        self.locks[usize::from(hash[0]) % CHUNK_LOCK_STRIPES]
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn path(&self, hash: &Digest) -> PathBuf {
        let h = hex(hash);
        self.root.join(&h[..2]).join(h)
    }

    /// Whether a copy of the chunk is stored (not verified: see [`ChunkStore::get`]).
    pub fn has(&self, hash: &Digest) -> bool {
        self.path(hash).is_file()
    }

    /// Stores a chunk after checking its bytes against its address. Returns false when a copy
    /// was already there (nothing written).
    pub fn put(&self, hash: &Digest, bytes: &[u8]) -> Result<bool, ChunkError> {
        verify(hash, bytes)?;
        let path = self.path(hash);
        let dir = path.parent().expect("chunk paths have a parent");
        if path.is_file() {
            // Count an existing copy only if it is still right (and durable, and fresh for
            // the garbage collector's grace period); a bad one is replaced below. The re-hash
            // runs unlocked; the refresh takes the chunk's lock and counts only if the copy is
            // still there (collection may have removed it meanwhile).
            match self.check(hash) {
                Ok(_) => {
                    let refreshed = {
                        let _guard = self.lock(hash);
                        let present = path.is_file();
                        if present {
                            self.touch(hash);
                        }
                        present
                    };
                    if refreshed {
                        crate::store::fsync_dir(dir).map_err(io(dir))?;
                        return Ok(false);
                    }
                }
                Err(ChunkError::Mismatch { .. }) => self.quarantine(hash)?,
                Err(ChunkError::Missing(_)) => {}
                Err(e) => return Err(e),
            }
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .root
            .join(TMP_DIR)
            .join(format!("{}-{n}", &hex(hash)[..16]));
        {
            let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
            f.write_all(bytes).map_err(io(&tmp))?;
            f.sync_all().map_err(io(&tmp))?;
        }
        {
            // Under the lock, so collection never removes the copy just renamed into place
            // after judging the one it replaced.
            let _guard = self.lock(hash);
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
        }
        crate::store::fsync_dir(dir).map_err(io(dir))?;
        Ok(true)
    }

    /// Reads a chunk and verifies it. A copy that does not match its address is quarantined
    /// and reported as [`ChunkError::Mismatch`]; its bytes are never returned.
    pub fn get(&self, hash: &Digest) -> Result<Vec<u8>, ChunkError> {
        let result = self.read_verified(hash);
        if let Err(ChunkError::Mismatch { .. }) = result {
            self.quarantine(hash)?;
        }
        result
    }

    /// Re-hashes a stored copy without moving it (for reports): its length if it matches.
    pub fn check(&self, hash: &Digest) -> Result<usize, ChunkError> {
        self.read_verified(hash).map(|bytes| bytes.len())
    }

    /// Whether a copy is stored; if so, marks it as recently needed so garbage collection's
    /// grace period starts again (an upload that finds it present is about to reference it).
    pub fn claim(&self, hash: &Digest) -> bool {
        let _guard = self.lock(hash);
        let present = self.has(hash);
        if present {
            self.touch(hash);
        }
        present
    }

    fn touch(&self, hash: &Digest) {
        if let Ok(f) = std::fs::File::options().append(true).open(self.path(hash)) {
            let _ = f.set_modified(std::time::SystemTime::now());
        }
    }

    /// The stored bytes if they hash to their address; moves nothing.
    fn read_verified(&self, hash: &Digest) -> Result<Vec<u8>, ChunkError> {
        let path = self.path(hash);
        let mut bytes = Vec::new();
        match std::fs::File::open(&path) {
            Ok(f) => {
                f.take(u64::from(CHUNK_MAX_BYTES) + 1)
                    .read_to_end(&mut bytes)
                    .map_err(io(&path))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChunkError::Missing(hex(hash)))
            }
            Err(e) => return Err(io(&path)(e)),
        }
        let found = blake3::hash(&bytes);
        if found.as_bytes() != hash {
            return Err(ChunkError::Mismatch {
                hash: hex(hash),
                found: found.to_hex().to_string(),
            });
        }
        Ok(bytes)
    }

    /// Moves a bad copy out of the way so it is neither served nor counted as present.
    pub fn quarantine(&self, hash: &Digest) -> Result<(), ChunkError> {
        let path = self.path(hash);
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let to = self
            .root
            .join(QUARANTINE_DIR)
            .join(format!("{}-{n}", hex(hash)));
        self.corrupt_found.inc();
        tracing::warn!(chunk = %hex(hash), "corrupt chunk copy quarantined");
        match std::fs::rename(&path, &to) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Garbage collection of one chunk: removes it if its copy is still older than `grace` and
    /// `unreferenced()` still says no committed version needs it, both checked now, under the
    /// chunk's lock. A listing taken earlier is only a candidate list: an upload may have
    /// claimed the chunk since (its manifest about to commit), and `claim` and `put` take the
    /// same lock, so they either see the chunk gone (and upload it again) or refresh it first.
    /// Returns whether the chunk was removed. `unreferenced` runs under the lock: it must not
    /// call back into this store.
    pub fn remove_if_stale<E>(
        &self,
        hash: &Digest,
        grace: Duration,
        unreferenced: impl FnOnce() -> Result<bool, E>,
    ) -> Result<bool, E>
    where
        E: From<ChunkError>,
    {
        let path = self.path(hash);
        let _guard = self.lock(hash);
        let modified = match std::fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&path)(e).into()),
        };
        let stale = SystemTime::now()
            .duration_since(modified)
            .is_ok_and(|age| age >= grace);
        if !stale || !unreferenced()? {
            return Ok(false);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(&path)(e).into()),
        }
    }

    /// Every stored chunk with its file's modification time when listed: candidates for
    /// garbage collection, which re-checks each one ([`ChunkStore::remove_if_stale`]).
    pub fn list(&self) -> Result<Vec<(Digest, SystemTime)>, ChunkError> {
        let mut out = Vec::new();
        for fan in std::fs::read_dir(&self.root).map_err(io(&self.root))? {
            let fan = fan.map_err(io(&self.root))?.path();
            let name = fan.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.len() != 2 || !fan.is_dir() {
                continue;
            }
            for entry in std::fs::read_dir(&fan).map_err(io(&fan))? {
                let entry = entry.map_err(io(&fan))?;
                let Some(hash) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| blake3::Hash::from_hex(n).ok())
                else {
                    continue;
                };
                let modified = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .map_err(io(&entry.path()))?;
                out.push((*hash.as_bytes(), modified));
            }
        }
        Ok(out)
    }

    /// The file of a chunk (for tests that damage a copy on purpose).
    pub fn file_of(&self, hash: &Digest) -> PathBuf {
        self.path(hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: bytes that do not match their address are refused on write; a copy damaged on disk
    // is quarantined on read and its bytes are never returned.
    #[test]
    fn chunks_are_verified_on_write_and_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let bytes = b"hello chunk".to_vec();
        let hash = *blake3::hash(&bytes).as_bytes();
        assert!(matches!(
            store.put(&[7; 32], &bytes),
            Err(ChunkError::Mismatch { .. })
        ));
        assert!(!store.has(&[7; 32]));
        assert!(store.put(&hash, &bytes).unwrap());
        assert!(
            !store.put(&hash, &bytes).unwrap(),
            "second put writes nothing"
        );
        assert_eq!(store.get(&hash).unwrap(), bytes);

        let mut damaged = bytes.clone();
        damaged[0] ^= 1;
        std::fs::write(store.file_of(&hash), &damaged).unwrap();
        assert!(matches!(store.get(&hash), Err(ChunkError::Mismatch { .. })));
        assert!(!store.has(&hash), "the bad copy is out of the way");
        assert!(matches!(store.get(&hash), Err(ChunkError::Missing(_))));
        assert_eq!(store.corrupt_found.get(), 1);
        assert_eq!(store.list().unwrap().len(), 0);
    }

    fn age(store: &ChunkStore, hash: &Digest, by: Duration) {
        let f = std::fs::File::options()
            .append(true)
            .open(store.file_of(hash))
            .unwrap();
        f.set_modified(SystemTime::now() - by).unwrap();
    }

    // Goal: garbage collection never removes a chunk an upload found present after the
    // collector listed it (the upload's manifest is about to reference it), nor one that is
    // referenced when it is about to be removed; a stale, unreferenced chunk does go.
    #[test]
    fn collection_rechecks_age_and_references_before_removing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(dir.path()).unwrap();
        let grace = Duration::from_secs(3600);
        let bytes = b"an old chunk".to_vec();
        let hash = *blake3::hash(&bytes).as_bytes();
        store.put(&hash, &bytes).unwrap();
        age(&store, &hash, 2 * grace);
        let listed = store.list().unwrap();
        assert_eq!(listed.len(), 1);
        let age_at_listing = SystemTime::now().duration_since(listed[0].1).unwrap();
        assert!(age_at_listing >= grace, "the listing sees a stale chunk");

        // An upload claims it after the listing: the collector must keep it.
        assert!(store.claim(&hash));
        let asked = std::cell::Cell::new(false);
        let removed = store
            .remove_if_stale(&hash, grace, || {
                asked.set(true);
                Ok::<_, ChunkError>(true)
            })
            .unwrap();
        assert!(!removed && store.has(&hash), "a claimed chunk is kept");
        assert!(!asked.get(), "a fresh chunk needs no reference lookup");

        // Stale again, but referenced by the time the collector looks: kept.
        age(&store, &hash, 2 * grace);
        assert!(!store
            .remove_if_stale(&hash, grace, || Ok::<_, ChunkError>(false))
            .unwrap());
        assert!(store.has(&hash));

        // A lookup that fails removes nothing.
        let failed = store.remove_if_stale(&hash, grace, || {
            Err(ChunkError::Missing("lookup failed".into()))
        });
        assert!(failed.is_err() && store.has(&hash));

        // Stale and unreferenced: removed, once.
        assert!(store
            .remove_if_stale(&hash, grace, || Ok::<_, ChunkError>(true))
            .unwrap());
        assert!(!store.has(&hash));
        assert!(!store
            .remove_if_stale(&hash, grace, || Ok::<_, ChunkError>(true))
            .unwrap());
    }
}
