//! The state machine in RocksDB, and its snapshots.
//!
//! Layout under the node's data dir:
//! ```text
//! sm/CURRENT            the generation in use (written tmp + fsync + rename + fsync dir)
//! sm/<generation>/      the state-machine database
//! snapshots/<id>/db/    a RocksDB checkpoint (hard links), the snapshot's data
//! snapshots/<id>/meta   snapshot meta and the blake3 of every file in db/
//! snapshots/incoming-*/ a snapshot being received from the leader
//! ```
//! Each `apply` writes its mutations and the new last-applied log id in one batch. Installing a
//! snapshot moves the received checkpoint into a new generation, checks it, then switches
//! `sm/CURRENT`: a crash at any point leaves either the old or the new state, never a mix.
//! Snapshots are files streamed in bounded frames; none is ever held whole in memory.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use openraft::storage::RaftStateMachine;
use openraft::{AnyError, EntryPayload, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use rocksdb::checkpoint::Checkpoint as DbCheckpoint;
use rocksdb::{Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};

use super::{fsync_dir, keys};
use crate::domain::hex;
use crate::domain::{
    ArtifactName, ArtifactVersion, Checkpoint, ChunkRef, Collection, Digest, NamespaceRoot,
    NamespaceStats, RecordKey, RecordPath, RecordVersion, SourceId, SourcePosition, TenantId,
    TenantInfo,
};
use crate::integrity::{self, TreeFault};
use crate::ledger::{self, Command, LedgerView, Mutation, Outcome, Stamp};
use crate::raft::codec;
use crate::raft::{
    Entry, LogId, NodeId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};

const SM_DIR: &str = "sm";
const SNAPSHOTS_DIR: &str = "snapshots";
const CURRENT_FILE: &str = "CURRENT";
const SNAPSHOT_META_FILE: &str = "meta";
const SNAPSHOT_DB_DIR: &str = "db";
/// Snapshots kept on disk: the newest may be replaced while an older one is still streaming.
const SNAPSHOTS_KEPT: usize = 2;
/// Read buffer when hashing snapshot files.
const HASH_BUFFER_BYTES: usize = 1024 * 1024;
/// Level-0 files that start a compaction (RocksDB's default is 4). Record keys are spread
/// over the whole key range (leaf ids, record paths), and while the store's table data is
/// small every level-0 compaction goes straight to the bottom level and rewrites all of it;
/// merging twice as many files at once halves that work. Over ten 10 s runs at 64 clients on
/// one dev cluster: 4.4 s of compaction CPU on three nodes against 9.0–9.3 s. Point reads
/// check up to this many level-0 files, bloom filters first.
const L0_COMPACTION_TRIGGER: i32 = 8;
/// Values of at least this many bytes are kept in RocksDB blob files, out of the LSM tree.
const BLOB_MIN_BYTES: u64 = 256;
/// On-demand blob garbage collection runs once RocksDB knows at least this share (percent) of
/// the blob bytes to be garbage: a collection rewrites every live value once, so each byte it
/// rewrites gives back at least a third of a byte. When a check finds less, the blob files hold
/// less than 4/3 of the live values plus the garbage RocksDB has not met yet; during a
/// collection, one more copy of the live values exists beside the old files until the
/// compaction ends, and the two snapshots kept on disk hold hard links to the blob files of
/// their time.
pub const BLOB_GC_GARBAGE_PERCENT: u64 = 25;
/// `blob_garbage_collection_age_cutoff` while a collection runs: every blob file is eligible.
const BLOB_GC_AGE_CUTOFF_ALL: &str = "1.0";

/// One file of a snapshot with its size and blake3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFileInfo {
    pub name: String,
    pub size: u64,
    pub blake3: [u8; 32],
}

/// One namespace in a [`DeepCheck`]: what disagrees with what it derives from. The root
/// recomputed from the stored data against the maintained leaf index's (what consensus
/// applied) first, then each leaf that differs, then the stored tree's faults
/// ([`integrity::audit_tree`]), the leaf count, and the recorded root against the newest
/// checkpoint's.
#[derive(Debug, Clone)]
pub struct NamespaceCheck {
    pub namespace: String,
    pub faults: Vec<TreeFault>,
}

/// What [`SmReader::deep_check`] found, at one applied index.
#[derive(Debug, Clone)]
pub struct DeepCheck {
    pub applied_index: u64,
    pub namespaces: Vec<NamespaceCheck>,
    /// Stored checkpoints that do not add up by themselves ([`integrity::audit_checkpoint`]),
    /// every kept one; checked only when no namespace scopes the check, as they span all.
    pub checkpoint_faults: Vec<TreeFault>,
    /// Every chunk referenced at that index.
    pub chunks: Vec<ChunkRef>,
}

/// Which past version of a record to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordAt {
    /// The newest version at or below this revision.
    Revision(u64),
    /// The newest version committed at or before this time (ms since the Unix epoch).
    Time(u64),
}

/// A snapshot's data: a directory holding a RocksDB checkpoint of the state machine.
pub struct SnapshotDir {
    pub path: PathBuf,
    pub files: Vec<SnapshotFileInfo>,
}

impl fmt::Debug for SnapshotDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "SnapshotDir({}, {} files)",
            self.path.display(),
            self.files.len()
        )
    }
}

#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta,
    files: Vec<SnapshotFileInfo>,
}

fn sm_err(e: impl fmt::Display) -> StorageError {
    StorageIOError::read_state_machine(AnyError::error(e.to_string())).into()
}

fn snap_err(e: impl fmt::Display) -> StorageError {
    StorageIOError::write_snapshot(None, AnyError::error(e.to_string())).into()
}

/// Hashes already known for the files of a directory (an earlier snapshot's, or a received
/// snapshot's, verified on arrival), which [`hash_dir`] reuses for the files it shares.
pub struct KnownHashes {
    pub dir: PathBuf,
    pub files: Vec<SnapshotFileInfo>,
}

/// A checkpoint directory's files with their sizes and blake3 hashes, and how many bytes were
/// read to hash them.
pub struct HashedDir {
    pub files: Vec<SnapshotFileInfo>,
    pub bytes_hashed: u64,
}

/// Whether RocksDB never changes a file of this name once written: table and blob files
/// (the MANIFEST is appended to, CURRENT and OPTIONS are replaced).
fn immutable_db_file(name: &str) -> bool {
    name.ends_with(".sst") || name.ends_with(".blob")
}

/// Whether `a` and `b` are one file (two hard links to the same inode).
#[cfg(unix)]
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

#[cfg(not(unix))]
fn same_file(_: &std::fs::Metadata, _: &std::fs::Metadata) -> bool {
    false
}

/// Lists the files of a checkpoint directory with their sizes and blake3 hashes. A table or
/// blob file that is the same file (a hard link to the same inode) as one of `known`'s gets
/// its known hash without being read: a checkpoint hard-links the live files, so consecutive
/// snapshots share all but the files written in between, and hashing every file at every
/// snapshot would cost a read of the whole state machine. The known file is still linked from
/// its directory when compared, so its inode cannot have been reused for another file.
pub fn hash_dir(dir: &Path, known: Option<&KnownHashes>) -> std::io::Result<HashedDir> {
    let known_files: HashMap<&str, &SnapshotFileInfo> = known
        .map(|k| k.files.iter().map(|f| (f.name.as_str(), f)).collect())
        .unwrap_or_default();
    let reusable = |name: &str, meta: &std::fs::Metadata| -> Option<SnapshotFileInfo> {
        let info = known_files
            .get(name)
            .filter(|info| immutable_db_file(name) && info.size == meta.len())?;
        let known_meta = std::fs::metadata(known?.dir.join(name)).ok()?;
        same_file(meta, &known_meta).then(|| (*info).clone())
    };
    let mut files = Vec::new();
    let mut bytes_hashed = 0u64;
    let mut buf = vec![0u8; HASH_BUFFER_BYTES];
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()?;
    names.sort();
    for name in names {
        let name = name
            .into_string()
            .map_err(|n| std::io::Error::other(format!("non-UTF-8 file name {n:?}")))?;
        let path = dir.join(&name);
        let meta = std::fs::metadata(&path)?;
        if !meta.is_file() {
            return Err(std::io::Error::other(format!(
                "unexpected non-file {name} in snapshot"
            )));
        }
        if let Some(info) = reusable(&name, &meta) {
            files.push(info);
            continue;
        }
        let mut file = std::fs::File::open(&path)?;
        let mut hasher = blake3::Hasher::new();
        let mut size = 0u64;
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            size += n as u64;
        }
        bytes_hashed += size;
        files.push(SnapshotFileInfo {
            name,
            size,
            blake3: *hasher.finalize().as_bytes(),
        });
    }
    Ok(HashedDir {
        files,
        bytes_hashed,
    })
}

fn open_sm_db(path: &Path) -> Result<DB, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // Values (a record version, an artifact manifest) go to blob files: compactions then move
    // keys and blob references, not every value at every level. Garbage collection is off
    // here and runs on demand ([`SmReader::collect_blob_garbage`]): left on, RocksDB relocates
    // the live blobs of its oldest files in every compaction, garbage or not.
    opts.set_enable_blob_files(true);
    opts.set_min_blob_size(BLOB_MIN_BYTES);
    opts.set_blob_compression_type(rocksdb::DBCompressionType::Lz4);
    opts.set_enable_blob_gc(false);
    // Flushes and compactions write with direct I/O where the filesystem takes it, as the
    // log's do; reads, compaction inputs included, stay buffered (`use_direct_reads` off).
    let _ = std::fs::create_dir_all(path);
    opts.set_use_direct_io_for_flush_and_compaction(super::log::direct_io_supported(path));
    // Merkle maintenance looks up many keys that do not exist (empty subtrees, new leaves):
    // bloom filters answer those without reading blocks.
    let mut block = rocksdb::BlockBasedOptions::default();
    block.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&block);
    opts.set_level_zero_file_num_compaction_trigger(L0_COMPACTION_TRIGGER);
    opts.set_memtable_whole_key_filtering(true);
    opts.set_memtable_prefix_bloom_ratio(0.1);
    DB::open(&opts, path)
}

/// Space in the state machine's blob files, as RocksDB knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobSpace {
    /// Bytes of all live blob files.
    pub bytes: u64,
    /// Bytes of those files no key refers to any more. RocksDB learns of garbage when a
    /// compaction drops a reference (a deleted or overwritten key meets its older version).
    pub garbage_bytes: u64,
}

/// What one on-demand blob garbage collection found and left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobCollection {
    pub before: BlobSpace,
    pub after: BlobSpace,
}

/// Blob garbage collection switched on for as long as this lives; dropping it switches it off
/// again, also when the collection in between failed (left on, every automatic compaction
/// would move the live values it meets, garbage or not).
struct BlobCollectionOn<'a> {
    db: &'a DB,
}

impl<'a> BlobCollectionOn<'a> {
    fn switch_on(db: &'a DB) -> Result<Self, StorageError> {
        // Guard first: RocksDB may apply an option in memory and then fail to record it.
        let on = Self { db };
        db.set_options(&[
            ("enable_blob_garbage_collection", "true"),
            ("blob_garbage_collection_age_cutoff", BLOB_GC_AGE_CUTOFF_ALL),
        ])
        .map_err(sm_err)?;
        Ok(on)
    }
}

impl Drop for BlobCollectionOn<'_> {
    fn drop(&mut self) {
        let off = [("enable_blob_garbage_collection", "false")];
        if let Err(e) = self
            .db
            .set_options(&off)
            .or_else(|_| self.db.set_options(&off))
        {
            tracing::error!(error = %e, "cannot switch blob garbage collection off; it may stay on until the node restarts");
        }
    }
}

fn blob_space(db: &DB) -> Result<BlobSpace, StorageError> {
    let read = |name: &str| -> Result<u64, StorageError> {
        Ok(db.property_int_value(name).map_err(sm_err)?.unwrap_or(0))
    };
    Ok(BlobSpace {
        bytes: read("rocksdb.live-blob-file-size")?,
        garbage_bytes: read("rocksdb.live-blob-file-garbage-size")?,
    })
}

/// State-machine writes skip RocksDB's WAL: the Raft log is the write-ahead log. After a crash
/// the state machine is at its last memtable flush (its last-applied index is in the same
/// batches, so it is consistent) and Raft re-applies the rest from the log. The log is only
/// purged up to a snapshot, and a snapshot's checkpoint flushes the memtable first, so the
/// entries to re-apply are always still there.
fn sm_write_options() -> rocksdb::WriteOptions {
    let mut wo = rocksdb::WriteOptions::default();
    wo.disable_wal(true);
    wo
}

/// Read options that end an iterator after the last key starting with `prefix`.
fn bounded_to(prefix: &[u8]) -> rocksdb::ReadOptions {
    let mut opts = rocksdb::ReadOptions::default();
    opts.set_iterate_upper_bound(keys::prefix_end(prefix));
    opts
}

/// Every key starting with `prefix`, with its value, in key order, read with `it` (seeked to
/// `prefix` here, so one iterator can serve several prefixes).
fn read_prefix(
    it: &mut rocksdb::DBRawIterator<'_>,
    prefix: &[u8],
) -> Result<Vec<KeyValue>, StorageError> {
    let mut out = Vec::new();
    for_each_with(it, prefix, |k, v| {
        out.push((k.to_vec(), v.to_vec()));
        Ok(())
    })?;
    Ok(out)
}

/// Calls `f` with every key starting with `prefix` and its value, in key order, read with `it`
/// (seeked to `prefix` here).
fn for_each_with(
    it: &mut rocksdb::DBRawIterator<'_>,
    prefix: &[u8],
    mut f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    it.seek(prefix);
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        if !k.starts_with(prefix) {
            break;
        }
        f(k, v)?;
        it.next();
    }
    it.status().map_err(sm_err)
}

/// A raw iterator over the keys that start with `prefix`, positioned at the first such key at
/// or after `from` (pass `prefix` itself to start at the beginning).
fn iter_within<'a>(db: &'a DB, prefix: &[u8], from: &[u8]) -> rocksdb::DBRawIterator<'a> {
    let mut it = db.raw_iterator_opt(bounded_to(prefix));
    it.seek(from);
    it
}

fn read_applied(db: &DB) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let applied = match db.get(keys::APPLIED).map_err(sm_err)? {
        None => None,
        Some(b) => codec::decode::<Option<LogId>>(&b).map_err(sm_err)?,
    };
    let membership = match db.get(keys::MEMBERSHIP).map_err(sm_err)? {
        None => StoredMembership::default(),
        Some(b) => codec::decode(&b).map_err(sm_err)?,
    };
    Ok((applied, membership))
}

/// State shared by the state machine (owned by Raft) and the readers (gRPC services).
pub struct SmShared {
    root: PathBuf,
    db: RwLock<Arc<DB>>,
    generation: Mutex<u64>,
    applied: Mutex<(Option<LogId>, StoredMembership)>,
    applied_index: AtomicU64,
    /// The applied index at which the set of referenced chunks last grew (an artifact version
    /// was applied, a snapshot installed, or the store opened).
    chunk_refs_index: AtomicU64,
    current_snapshot: Mutex<Option<PublishedSnapshot>>,
    snapshot_seq: AtomicU64,
    incoming_seq: AtomicU64,
    /// Held by a snapshot install throughout and by a snapshot builder while it takes its
    /// checkpoint, so a builder never flushes a database an install is switching away from.
    checkpoint_gate: tokio::sync::Mutex<()>,
    /// Bytes read to hash snapshot files since the store opened (files shared with an earlier
    /// snapshot are not read again).
    snapshot_bytes_hashed: AtomicU64,
    /// Encoded bytes of blob-held history versions expired on this node since the last
    /// compaction that made RocksDB count them ([`SmReader::collect_blob_garbage`]). An
    /// estimate: blob files hold them compressed, and a version expired before its first flush
    /// never reached one. Kept in the database too ([`keys::EXPIRED_BLOB_BYTES`]: written in
    /// the batch of each expiry that adds to it and after the compaction that lowers it), so
    /// a restart keeps it, and a snapshot install takes the sender's, which describes the
    /// blob files it installs. The lock is held while the figure is changed and stored, so
    /// memory and database agree (a crash may still lose a lowered figure written outside an
    /// apply before its flush: one compaction too many). Lock order: `db`, then this.
    expired_blob_bytes: Mutex<u64>,
    /// Held by the running blob collection: two at once would switch collection off under
    /// each other.
    blob_collection: Mutex<()>,
    /// Set at node shutdown: no blob collection starts after it.
    stopping: AtomicBool,
}

impl SmShared {
    /// Whether a blob collection holds [`SmShared::blob_collection`] right now.
    fn collection_running(&self) -> bool {
        matches!(
            self.blob_collection.try_lock(),
            Err(std::sync::TryLockError::WouldBlock)
        )
    }

    fn db(&self) -> Arc<DB> {
        self.db.read().expect("sm db lock poisoned").clone()
    }
}

/// Read access to the applied state for services. Cheap to clone.
#[derive(Clone)]
pub struct SmReader {
    shared: Arc<SmShared>,
}

impl SmReader {
    /// The latest version of a record, tombstones included.
    pub fn get_record(&self, path: &RecordPath) -> Result<Option<RecordVersion>, StorageError> {
        let db = self.shared.db();
        // One snapshot for both reads: the head and the history entry it points to.
        let snap = db.snapshot();
        let head = match snapshot_decoded::<RecordHead>(&snap, &head_key(path))? {
            Some(head) => head.checked(path)?,
            None => return Ok(None),
        };
        if head.live.is_none() {
            return Ok(Some(head.tombstone()));
        }
        match snapshot_decoded(&snap, &head.history_key(path))? {
            Some(version) => Ok(Some(version)),
            None => Err(sm_err(format!(
                "record {}/{}/{} points at revision {} which is not in its history",
                path.tenant.as_str(),
                path.collection.as_str(),
                path.key.as_str(),
                head.revision
            ))),
        }
    }

    /// The record as it was at `revision` (the newest version at or below it), or as it was at
    /// time `as_of_ms` (the newest version committed at or before it).
    pub fn get_record_at(
        &self,
        path: &RecordPath,
        at: RecordAt,
    ) -> Result<Option<RecordVersion>, StorageError> {
        let db = self.shared.db();
        let prefix = keys::history_prefix(path);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_lower_bound(prefix.clone());
        let upper = match at {
            RecordAt::Revision(r) => keys::history(path, r, u32::MAX),
            RecordAt::Time(_) => keys::prefix_end(&prefix),
        };
        let mut it = db.raw_iterator_opt(opts);
        it.seek_for_prev(&upper);
        while it.valid() {
            let (Some(key), Some(value)) = (it.key(), it.value()) else {
                break;
            };
            if !key.starts_with(&prefix) {
                break;
            }
            let version: RecordVersion = codec::decode(value).map_err(sm_err)?;
            let fits = match at {
                RecordAt::Revision(r) => version.revision <= r,
                RecordAt::Time(t) => version.time_ms <= t,
            };
            if fits {
                return Ok(Some(version));
            }
            it.prev();
        }
        it.status().map_err(sm_err)?;
        Ok(None)
    }

    /// A record's versions, newest first, each with its position within its log entry,
    /// strictly before `before` = (revision, position) in history order (`None`: from the
    /// newest): at most `limit` of them and, beyond the first, at most `bytes_max` bytes of
    /// values.
    pub fn record_history(
        &self,
        path: &RecordPath,
        before: Option<(u64, u32)>,
        limit: usize,
        bytes_max: usize,
    ) -> Result<Vec<(u32, RecordVersion)>, StorageError> {
        let db = self.shared.db();
        let prefix = keys::history_prefix(path);
        let mut opts = rocksdb::ReadOptions::default();
        opts.set_iterate_lower_bound(prefix.clone());
        let upper = match before {
            None => keys::prefix_end(&prefix),
            Some((revision, position)) => keys::history(path, revision, position),
        };
        opts.set_iterate_upper_bound(upper);
        let mut it = db.raw_iterator_opt(opts);
        it.seek_to_last();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        while it.valid() && out.len() < limit {
            if let (Some(key), Some(value)) = (it.key(), it.value()) {
                let position =
                    keys::history_position(key).ok_or_else(|| sm_err("malformed history key"))?;
                let version: RecordVersion = codec::decode(value).map_err(sm_err)?;
                bytes += version.value.as_ref().map_or(0, Vec::len);
                if !out.is_empty() && bytes > bytes_max {
                    break;
                }
                out.push((position, version));
            }
            it.prev();
        }
        it.status().map_err(sm_err)?;
        Ok(out)
    }

    /// An artifact's latest version (`version` 0) or a given one; tombstones included.
    pub fn artifact(
        &self,
        namespace: &TenantId,
        name: &ArtifactName,
        version: u64,
    ) -> Result<Option<ArtifactVersion>, StorageError> {
        let key = if version == 0 {
            keys::artifact_latest(namespace, name)
        } else {
            keys::artifact_version(namespace, name, version)
        };
        get_decoded(&self.shared.db(), &key)
    }

    /// A namespace's artifacts (latest versions, tombstones included) in name order, after
    /// `after` (exclusive), at most `limit`.
    pub fn artifacts(
        &self,
        namespace: &TenantId,
        after: Option<&ArtifactName>,
        limit: usize,
    ) -> Result<Vec<(ArtifactName, ArtifactVersion)>, StorageError> {
        let db = self.shared.db();
        let prefix = keys::artifacts_prefix(namespace);
        let start = match after {
            Some(name) => {
                let mut start = keys::artifact_latest(namespace, name);
                start.push(0);
                start
            }
            None => prefix.clone(),
        };
        let mut it = iter_within(&db, &prefix, &start);
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            if let (Some(key), Some(value)) = (it.key(), it.value()) {
                let name = std::str::from_utf8(&key[prefix.len()..])
                    .ok()
                    .and_then(|n| ArtifactName::parse(n).ok())
                    .ok_or_else(|| sm_err("malformed artifact key"))?;
                out.push((name, codec::decode(value).map_err(sm_err)?));
            }
            it.next();
        }
        it.status().map_err(sm_err)?;
        Ok(out)
    }

    /// Chunks referenced by any artifact version, in hash order after `after`, at most `limit`.
    pub fn referenced_chunks(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> Result<Vec<ChunkRef>, StorageError> {
        let db = self.shared.db();
        let prefix = [keys::CHUNK_PREFIX];
        let start = match after {
            Some(h) => {
                let mut start = keys::chunk(h);
                start.push(0);
                start
            }
            None => prefix.to_vec(),
        };
        let mut it = iter_within(&db, &prefix, &start);
        let mut out = Vec::new();
        while it.valid() && out.len() < limit {
            if let (Some(key), Some(value)) = (it.key(), it.value()) {
                let hash: Digest = key[1..]
                    .try_into()
                    .map_err(|_| sm_err("malformed chunk key"))?;
                let size: [u8; 4] = value
                    .try_into()
                    .map_err(|_| sm_err("malformed chunk size"))?;
                out.push(ChunkRef {
                    hash,
                    size: u32::from_be_bytes(size),
                });
            }
            it.next();
        }
        it.status().map_err(sm_err)?;
        Ok(out)
    }

    /// Whether any artifact version references this chunk.
    pub fn chunk_referenced(&self, hash: &Digest) -> Result<bool, StorageError> {
        Ok(self
            .shared
            .db()
            .get_pinned(keys::chunk(hash))
            .map_err(sm_err)?
            .is_some())
    }

    /// Whether writes are waiting for a checkpoint to fold them into the Merkle trees (their
    /// buckets are marked dirty and not yet rehashed).
    pub fn merkle_pending(&self) -> Result<bool, StorageError> {
        let db = self.shared.db();
        let prefix = [keys::DIRTY_PREFIX];
        let it = iter_within(&db, &prefix, &prefix);
        let pending = it.valid();
        it.status().map_err(sm_err)?;
        Ok(pending)
    }

    /// A checkpoint recorded at `index` (None if there was none or it was dropped).
    pub fn checkpoint(&self, index: u64) -> Result<Option<Checkpoint>, StorageError> {
        get_decoded(&self.shared.db(), &keys::checkpoint(index))
    }

    /// Recomputes every namespace's Merkle leaves and root (or only `only`'s) from the stored
    /// records and artifacts, from one consistent view of the database, and compares them with
    /// the maintained ones. Also returns the chunks referenced at that point: all of them, or
    /// with `only`, those its artifact versions reference. Reads one namespace at a time, its
    /// records and leaves as a stream in leaf-id order (see [`deep_check_namespace`]).
    pub fn deep_check(&self, only: Option<&TenantId>) -> Result<DeepCheck, StorageError> {
        let db = self.shared.db();
        let snap = db.snapshot();
        let applied: Option<LogId> = snapshot_decoded(&snap, keys::APPLIED)?.flatten();
        // The newest checkpoint: what attestations sign and replicas compare.
        let kept: Vec<u64> = snapshot_decoded(&snap, keys::CHECKPOINTS)?.unwrap_or_default();
        let newest: Option<Checkpoint> = match kept.last() {
            Some(&index) => Some(
                snapshot_decoded(&snap, &keys::checkpoint(index))?
                    .ok_or_else(|| sm_err(format!("checkpoint {index} is listed but absent")))?,
            ),
            None => None,
        };
        let mut checkpoint_faults = Vec::new();
        if only.is_none() {
            if kept.windows(2).any(|w| w[0] >= w[1]) {
                checkpoint_faults.push(TreeFault::new(
                    "list of kept checkpoints (ascending, each once)",
                    "ascending",
                    format!("{kept:?}"),
                ));
            }
            for &index in &kept {
                // The newest was read above; the older ones only here.
                let faults = if Some(&index) == kept.last() {
                    newest
                        .as_ref()
                        .map(|c| integrity::audit_checkpoint(index, c))
                } else {
                    snapshot_decoded::<Checkpoint>(&snap, &keys::checkpoint(index))?
                        .map(|c| integrity::audit_checkpoint(index, &c))
                };
                match faults {
                    Some(faults) => checkpoint_faults.extend(faults),
                    None => checkpoint_faults.push(TreeFault::new(
                        format!("checkpoint {index} (listed as kept)"),
                        "present",
                        "absent",
                    )),
                }
            }
        }
        let mut namespaces = Vec::new();
        for ns in namespaces_stored(&snap, only, newest.as_ref())? {
            namespaces.push(deep_check_namespace(&snap, &ns, newest.as_ref())?);
        }
        let mut chunks = Vec::new();
        if let Some(ns) = only {
            // The namespace's own chunks: those its artifact versions (history included)
            // reference, each once.
            let mut seen = BTreeSet::new();
            let prefix = keys::in_namespace(keys::ARTIFACT_VERSION_PREFIX, ns);
            for_each_under(&snap, &prefix, |_, v| {
                let version: ArtifactVersion = codec::decode(v).map_err(sm_err)?;
                for c in version.manifest.into_iter().flat_map(|m| m.chunks) {
                    if seen.insert(c.hash) {
                        chunks.push(c);
                    }
                }
                Ok(())
            })?;
        } else {
            for_each_under(&snap, &[keys::CHUNK_PREFIX], |k, v| {
                let hash: Digest = k[1..].try_into().map_err(sm_err)?;
                let size: [u8; 4] = v.try_into().map_err(sm_err)?;
                chunks.push(ChunkRef {
                    hash,
                    size: u32::from_be_bytes(size),
                });
                Ok(())
            })?;
        }
        Ok(DeepCheck {
            applied_index: applied.map_or(0, |l| l.index),
            namespaces,
            checkpoint_faults,
            chunks,
        })
    }

    /// Test hook: overwrites a record's stored value under the state machine, bypassing Raft
    /// and the Merkle index, as disk corruption or tampering would. Never called by the node.
    #[doc(hidden)]
    pub fn overwrite_record_for_tests(
        &self,
        path: &RecordPath,
        value: &[u8],
    ) -> Result<(), StorageError> {
        let db = self.shared.db();
        let head = get_decoded::<RecordHead>(&db, &head_key(path))?
            .ok_or_else(|| sm_err("no such record"))?
            .checked(path)?;
        let key = head.history_key(path);
        let mut version: RecordVersion =
            get_decoded(&db, &key)?.ok_or_else(|| sm_err("no such version"))?;
        version.value = Some(value.to_vec());
        db.put(key, codec::encode(&version)).map_err(sm_err)
    }

    /// Test hook: moves a record's head to the key of another record's id, bypassing Raft and
    /// the Merkle index, as a damaged store could. Never called by the node. Nothing should
    /// be applied to this store afterwards: its applies' memory of recently written heads
    /// (`RecentHeads`) does not see the move.
    #[doc(hidden)]
    pub fn misplace_record_head_for_tests(&self, path: &RecordPath) -> Result<(), StorageError> {
        let db = self.shared.db();
        let from = head_key(path);
        let head = db
            .get(&from)
            .map_err(sm_err)?
            .ok_or_else(|| sm_err("no such record"))?;
        let elsewhere = integrity::record_leaf_id(path.collection.as_str(), "elsewhere");
        let mut batch = WriteBatch::default();
        batch.delete(&from);
        batch.put(keys::record(&path.tenant, &elsewhere), head);
        db.write(batch).map_err(sm_err)
    }

    /// Test hook: replaces the stored bytes of a record's latest version with bytes that do
    /// not decode, bypassing Raft, as disk corruption would. Never called by the node.
    #[doc(hidden)]
    pub fn garble_record_for_tests(&self, path: &RecordPath) -> Result<(), StorageError> {
        let db = self.shared.db();
        let head = get_decoded::<RecordHead>(&db, &head_key(path))?
            .ok_or_else(|| sm_err("no such record"))?
            .checked(path)?;
        db.put(head.history_key(path), [0xFF]).map_err(sm_err)
    }

    /// Test hook: how many replaced versions the store lists for history expiry. Never called
    /// by the node.
    #[doc(hidden)]
    pub fn replacements_listed_for_tests(&self) -> Result<usize, StorageError> {
        let db = self.shared.db();
        let prefix = [keys::REPLACED_PREFIX];
        let listed = read_prefix(&mut db.raw_iterator_opt(bounded_to(&prefix)), &prefix)?;
        Ok(listed.len())
    }

    /// Test hook: flips a byte of the first stored Merkle node at `level` in `namespace`,
    /// bypassing Raft, as disk corruption or a bug in the tree's upkeep would, and returns the
    /// node's index. Never called by the node.
    #[doc(hidden)]
    pub fn corrupt_tree_node_for_tests(
        &self,
        namespace: &TenantId,
        level: u8,
    ) -> Result<u32, StorageError> {
        let db = self.shared.db();
        let prefix = keys::tree_node(namespace.as_str(), level, 0);
        let prefix = &prefix[..prefix.len() - 4];
        let it = iter_within(&db, prefix, prefix);
        let (Some(key), Some(value)) = (it.key(), it.value()) else {
            return Err(sm_err(format!("no tree node at level {level}")));
        };
        let (key, mut value) = (key.to_vec(), value.to_vec());
        value[0] ^= 1;
        let (_, _, index) = keys::parse_tree_node(&key).ok_or_else(|| sm_err("bad node key"))?;
        drop(it);
        db.put(key, value).map_err(sm_err)?;
        Ok(index)
    }

    /// Test hook: writes a Merkle key out of place beside `path`'s record, bypassing Raft, as
    /// a damaged store could: with `leaf`, a leaf key in its bucket too short to end in an id;
    /// otherwise a tree-node key one byte longer than its bucket's. Never called by the node.
    #[doc(hidden)]
    pub fn misplace_merkle_key_for_tests(
        &self,
        path: &RecordPath,
        leaf: bool,
    ) -> Result<(), StorageError> {
        let ns = path.tenant.as_str();
        let id = integrity::record_leaf_id(path.collection.as_str(), path.key.as_str());
        let bucket = integrity::bucket_of(&id);
        let mut key = if leaf {
            keys::bucket_prefix(keys::LEAF_PREFIX, ns, bucket)
        } else {
            keys::tree_node(ns, 0, u32::from(bucket))
        };
        key.push(0xFF);
        self.shared.db().put(key, [0u8; 32]).map_err(sm_err)
    }

    /// Test hook: flips a byte of the cluster root stored in checkpoint `index`, bypassing
    /// Raft, as disk corruption would. Never called by the node.
    #[doc(hidden)]
    pub fn corrupt_checkpoint_for_tests(&self, index: u64) -> Result<(), StorageError> {
        let db = self.shared.db();
        let key = keys::checkpoint(index);
        let mut checkpoint: Checkpoint =
            get_decoded(&db, &key)?.ok_or_else(|| sm_err(format!("no checkpoint {index}")))?;
        checkpoint.cluster_root[0] ^= 1;
        db.put(key, codec::encode(&checkpoint)).map_err(sm_err)
    }

    pub fn tenant(&self, id: &TenantId) -> Result<Option<TenantInfo>, StorageError> {
        get_decoded(&self.shared.db(), &keys::tenant(id))
    }

    /// Every registered tenant, in id order.
    pub fn tenants(&self) -> Result<Vec<TenantInfo>, StorageError> {
        let db = self.shared.db();
        let prefix = [keys::TENANT_PREFIX];
        let mut it = iter_within(&db, &prefix, &prefix);
        let mut out = Vec::new();
        while it.valid() {
            if let Some(value) = it.value() {
                out.push(codec::decode(value).map_err(sm_err)?);
            }
            it.next();
        }
        it.status().map_err(sm_err)?;
        Ok(out)
    }

    /// A namespace's figures (zero when nothing was written yet).
    pub fn stats(&self, namespace: &TenantId) -> Result<NamespaceStats, StorageError> {
        Ok(get_decoded(&self.shared.db(), &keys::stats(namespace))?.unwrap_or_default())
    }

    /// A source stream's applied position (zero when it never sent anything).
    pub fn source_position(
        &self,
        tenant: &TenantId,
        source: &SourceId,
    ) -> Result<SourcePosition, StorageError> {
        Ok(get_decoded(&self.shared.db(), &keys::source(tenant, source))?.unwrap_or_default())
    }

    /// Bytes read to hash snapshot files since the store opened.
    pub fn snapshot_bytes_hashed(&self) -> u64 {
        self.shared.snapshot_bytes_hashed.load(Ordering::Relaxed)
    }

    /// The last applied log index (0 before anything was applied).
    pub fn applied_index(&self) -> u64 {
        self.shared.applied_index.load(Ordering::Acquire)
    }

    /// The applied index at which the set of referenced chunks last grew.
    pub fn chunk_refs_index(&self) -> u64 {
        self.shared.chunk_refs_index.load(Ordering::Acquire)
    }

    /// Space in the state machine's blob files.
    pub fn blob_space(&self) -> Result<BlobSpace, StorageError> {
        blob_space(&self.shared.db())
    }

    /// Bytes of blob-held versions history expiry removed that RocksDB may not count as
    /// garbage yet ([`SmShared::expired_blob_bytes`], an estimate).
    pub fn expired_blob_bytes(&self) -> u64 {
        *self.shared.expired_blob_bytes.lock().expect("lock")
    }

    /// At node shutdown, once Raft has stopped: no blob collection starts any more, and a
    /// running one is cut short by stopping RocksDB's background work (after a flush), so the
    /// database closes without waiting for a full compaction. Blocks for that flush. Only
    /// then: with background work stopped, applies still queued in Raft's state-machine
    /// worker stay in the memtable and are applied again from the log at the next start.
    pub fn stop_background_work(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if self.shared.collection_running() {
            self.shared.db().cancel_all_background_work(true);
        }
    }

    /// Gives back the space of garbage in blob files, if there is enough of it: run off the
    /// async workers (it compacts the whole state machine, and twice when history expiry left
    /// garbage RocksDB has not met yet). Returns what it found and left, or None when it did
    /// not collect (or another collection is running).
    ///
    /// 1. If history expiry removed blob-held versions worth [`BLOB_GC_GARBAGE_PERCENT`] of
    ///    the blob bytes since the last such compaction (an estimate, see
    ///    [`SmShared::expired_blob_bytes`]), a compaction without collection walks the key
    ///    tree (keys and blob references only) so that RocksDB counts that garbage.
    /// 2. If RocksDB then knows of garbage worth that share, collection is switched on for
    ///    every blob file, a full compaction moves the live values to new files, and
    ///    collection is switched off again ([`BlobCollectionOn`]; it is off at open too, should
    ///    the node stop in between). Files left holding garbage only are deleted.
    ///
    /// RocksDB's manual compaction reports no error through this crate's API: a compaction
    /// that failed shows as garbage that did not go down.
    pub fn collect_blob_garbage(&self) -> Result<Option<BlobCollection>, StorageError> {
        let _one_at_a_time = match self.shared.blob_collection.try_lock() {
            Ok(guard) => guard,
            // A collection that panicked left nothing to undo (the switch has its own guard).
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => return Ok(None),
        };
        if self.shared.stopping.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let db = self.shared.db();
        let due = |garbage: u64, total: u64| {
            garbage > 0
                && garbage.saturating_mul(100) >= total.saturating_mul(BLOB_GC_GARBAGE_PERCENT)
        };
        let mut compact = rocksdb::CompactOptions::default();
        compact.set_exclusive_manual_compaction(false);
        let expired = self.expired_blob_bytes();
        if due(expired, blob_space(&db)?.bytes) {
            db.compact_range_opt::<&[u8], &[u8]>(None, None, &compact);
            self.lower_expired_blob_bytes(&db, expired);
        }
        let before = blob_space(&db)?;
        if !due(before.garbage_bytes, before.bytes) {
            return Ok(None);
        }
        {
            let _on = BlobCollectionOn::switch_on(&db)?;
            // Optimized: the last pass leaves alone the bottom files this compaction wrote,
            // whose blobs it has just moved.
            compact.set_bottommost_level_compaction(
                rocksdb::BottommostLevelCompaction::ForceOptimized,
            );
            db.compact_range_opt::<&[u8], &[u8]>(None, None, &compact);
        }
        let after = blob_space(&db)?;
        Ok(Some(BlobCollection { before, after }))
    }

    /// After the compaction that made RocksDB count `counted` expired bytes as garbage: lowers
    /// the estimate by them and stores it, flushed (one small table file next to a full
    /// compaction), unless a snapshot install replaced the database meanwhile (its estimate is
    /// the sender's). A failure costs at most one compaction too many after a restart.
    fn lower_expired_blob_bytes(&self, db: &Arc<DB>, counted: u64) {
        let stored = {
            let current = self.shared.db.read().expect("sm db lock poisoned");
            if !Arc::ptr_eq(&current, db) {
                return;
            }
            let mut estimate = self.shared.expired_blob_bytes.lock().expect("lock");
            *estimate = estimate.saturating_sub(counted);
            db.put_opt(
                keys::EXPIRED_BLOB_BYTES,
                codec::encode(&*estimate),
                &sm_write_options(),
            )
        };
        // Outside the locks: an apply adding to the estimate meanwhile stores its own figure
        // after this one, and the flush persists whichever is newest.
        if let Err(e) = stored.and_then(|()| db.flush()) {
            tracing::warn!(error = %e, "cannot store the lowered expired blob bytes estimate; a restart may compact once more than needed");
        }
    }

    /// Whether `id` was ever a member (voter or learner) of this cluster.
    pub fn node_ever_member(&self, id: NodeId) -> Result<bool, StorageError> {
        Ok(self
            .shared
            .db()
            .get(keys::node(id))
            .map_err(sm_err)?
            .is_some())
    }

    /// A fresh directory for receiving a snapshot from the leader.
    pub fn incoming_snapshot_dir(&self) -> std::io::Result<PathBuf> {
        let n = self.shared.incoming_seq.fetch_add(1, Ordering::Relaxed);
        let dir = self
            .shared
            .root
            .join(SNAPSHOTS_DIR)
            .join(format!("incoming-{n}"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)?;
        }
        std::fs::create_dir_all(dir.join(SNAPSHOT_DB_DIR))?;
        Ok(dir.join(SNAPSHOT_DB_DIR))
    }
}

/// Leaf faults deep verify lists per namespace; past it, one more fault counts the rest, so a
/// store with many damaged leaves does not make a reply that grows with them (the stored
/// tree's faults are bounded by its size, at most one per bucket and node).
pub const DEEP_CHECK_LEAF_FAULTS_MAX: usize = 1_000;

/// A raw iterator over the keys of `snap` that start with `prefix`, at the first of them.
fn snapshot_iter<'a>(snap: &'a rocksdb::Snapshot<'_>, prefix: &[u8]) -> rocksdb::DBRawIterator<'a> {
    let mut it = snap.raw_iterator_opt(bounded_to(prefix));
    it.seek(prefix);
    it
}

/// Calls `f` with every key under `prefix` and its value, in key order, from `snap`.
fn for_each_under(
    snap: &rocksdb::Snapshot<'_>,
    prefix: &[u8],
    f: impl FnMut(&[u8], &[u8]) -> Result<(), StorageError>,
) -> Result<(), StorageError> {
    // `for_each_with` seeks to the prefix itself.
    for_each_with(&mut snap.raw_iterator_opt(bounded_to(prefix)), prefix, f)
}

/// The leaf id ending a key of an iterator bounded to `prefix` (`what`: the key's kind, for
/// the error): the key is the prefix and the id, nothing else.
fn id_after(prefix: &[u8], key: &[u8], what: &str) -> Result<Digest, StorageError> {
    key.strip_prefix(prefix)
        .and_then(|id| id.try_into().ok())
        .ok_or_else(|| sm_err(format!("malformed {what} key")))
}

/// The namespaces anything is stored for (records, artifacts, leaves, tree nodes, changed
/// buckets, roots) or the newest checkpoint names; with `only`, that one if it is among them.
/// Each namespace's keys are skipped with one seek, not read.
fn namespaces_stored(
    snap: &rocksdb::Snapshot<'_>,
    only: Option<&TenantId>,
    newest: Option<&Checkpoint>,
) -> Result<BTreeSet<String>, StorageError> {
    let mut names = BTreeSet::new();
    for kind in [
        keys::RECORD_PREFIX,
        keys::ARTIFACT_LATEST_PREFIX,
        keys::LEAF_PREFIX,
        keys::NODE_TREE_PREFIX,
        keys::DIRTY_PREFIX,
    ] {
        let within = only.map_or_else(|| vec![kind], |ns| keys::in_namespace(kind, ns));
        let mut it = snapshot_iter(snap, &within);
        while let Some(k) = it.key() {
            let malformed = || sm_err(format!("malformed key {:?}", String::from_utf8_lossy(k)));
            // `kind namespace 0x00 …`: the next seek goes past every key of the namespace.
            let end = k[1..].iter().position(|b| *b == 0).ok_or_else(malformed)? + 1;
            let ns = std::str::from_utf8(&k[1..end]).map_err(|_| malformed())?;
            names.insert(ns.to_string());
            it.seek(keys::prefix_end(&k[..=end]));
        }
        it.status().map_err(sm_err)?;
    }
    match only {
        Some(ns) => {
            if snap.get(keys::root(ns.as_str())).map_err(sm_err)?.is_some() {
                names.insert(ns.as_str().to_string());
            }
        }
        None => for_each_under(snap, &[keys::ROOT_PREFIX], |k, _| {
            names.insert(keys::parse_root(k).ok_or_else(|| sm_err("malformed root key"))?);
            Ok(())
        })?,
    }
    names.extend(
        newest
            .iter()
            .flat_map(|c| c.roots.iter().map(|(ns, _)| ns))
            .filter(|ns| only.is_none_or(|only| only.as_str() == ns.as_str()))
            .cloned(),
    );
    Ok(names)
}

/// Deep-checks one namespace. Its record heads and its artifacts' maintained leaves are read
/// as two streams in leaf-id order, its artifacts' latest versions (one per artifact, without
/// history) into memory, and merged by id into the two trees built bucket by bucket
/// ([`integrity::LeafTreeBuilder`]); each leaf whose two sides differ is a fault (the first
/// [`DEEP_CHECK_LEAF_FAULTS_MAX`], then a count). Then the stored tree, the leaf count and the
/// newest checkpoint's root are audited against them.
fn deep_check_namespace(
    snap: &rocksdb::Snapshot<'_>,
    ns: &str,
    newest: Option<&Checkpoint>,
) -> Result<NamespaceCheck, StorageError> {
    let tenant =
        TenantId::parse(ns).map_err(|e| sm_err(format!("namespace {ns:?} in a key: {e}")))?;
    // Artifacts by leaf id: their latest versions are keyed by name.
    let mut artifacts: BTreeMap<Digest, (Digest, String)> = BTreeMap::new();
    let artifacts_prefix = keys::artifacts_prefix(&tenant);
    for_each_under(snap, &artifacts_prefix, |k, v| {
        let name = String::from_utf8_lossy(&k[artifacts_prefix.len()..]);
        let version: ArtifactVersion = codec::decode(v).map_err(sm_err)?;
        if let Some(m) = &version.manifest {
            let o = integrity::LeafObject::Artifact {
                name: &name,
                size: m.size,
                blake3: &m.blake3,
            };
            artifacts.insert(o.id(), (o.hash(), o.describe()));
        }
        Ok(())
    })?;
    let records_prefix = keys::in_namespace(keys::RECORD_PREFIX, &tenant);
    let mut records = snapshot_iter(snap, &records_prefix);
    let leaves_prefix = keys::in_namespace(keys::LEAF_PREFIX, &tenant);
    let mut leaves = snapshot_iter(snap, &leaves_prefix);
    let mut artifacts = artifacts.into_iter().peekable();
    let mut recomputed_tree = integrity::LeafTreeBuilder::default();
    let mut maintained_tree = integrity::LeafTreeBuilder::default();
    let mut leaf_faults = Vec::new();
    let mut unlisted: u64 = 0;
    loop {
        let record_id = records
            .key()
            .map(|k| id_after(&records_prefix, k, "record"))
            .transpose()?;
        let leaf_id = leaves
            .key()
            .map(|k| id_after(&leaves_prefix, k, "leaf"))
            .transpose()?;
        let artifact_id = artifacts.peek().map(|(id, _)| *id);
        let Some(id) = [record_id, leaf_id, artifact_id]
            .into_iter()
            .flatten()
            .min()
        else {
            break;
        };
        // This id's two sides: what consensus maintained, and what the stored data
        // recomputes to with the object's description. Where sources share an id, the
        // artifact's and the leaf index's side count, as they did when the sides were maps
        // filled records first.
        let mut maintained: Option<Digest> = None;
        let mut recomputed: Option<(Digest, String)> = None;
        // Set here only for a head stored under another record's id (named as such, not as
        // a leaf difference); otherwise from the two sides below.
        let mut fault = None;
        if record_id == Some(id) {
            let head: RecordHead =
                codec::decode(records.value().unwrap_or_default()).map_err(sm_err)?;
            let path = head.path(&tenant);
            let own = integrity::record_leaf_id(path.collection.as_str(), path.key.as_str());
            if own != id {
                // Its leaf belongs elsewhere, so nothing here recomputes to what the index
                // holds under this id, and the roots differ.
                maintained = head.live.as_ref().map(|live| live.leaf);
                fault = Some(TreeFault::new(
                    format!(
                        "record {}/{} (its head's place)",
                        path.collection.as_str(),
                        path.key.as_str()
                    ),
                    format!("under leaf {}", hex(&own)),
                    format!("under leaf {}", hex(&id)),
                ));
            } else if let Some(live) = &head.live {
                maintained = Some(live.leaf);
                // A live record whose value is missing from its history reads as empty, so
                // its leaf disagrees with the index and deep verify names it.
                let version: Option<RecordVersion> =
                    snapshot_decoded(snap, &head.history_key(&path))?;
                let value = version.and_then(|v| v.value).unwrap_or_default();
                let o = integrity::LeafObject::Record {
                    collection: path.collection.as_str(),
                    key: path.key.as_str(),
                    seq: head.seq,
                    value: &value,
                };
                recomputed = Some((o.hash(), o.describe()));
            }
            records.next();
        }
        if leaf_id == Some(id) {
            let hash: Digest = leaves
                .value()
                .unwrap_or_default()
                .try_into()
                .map_err(sm_err)?;
            maintained = Some(hash);
            leaves.next();
        }
        if artifact_id == Some(id) {
            recomputed = artifacts.next().map(|(_, leaf)| leaf);
        }
        if let Some(hash) = maintained {
            maintained_tree.push(id, hash);
        }
        if let Some((hash, _)) = &recomputed {
            recomputed_tree.push(id, *hash);
        }
        let fault = fault.or_else(|| match (maintained, recomputed) {
            (Some(m), Some((r, what))) if m != r => Some(TreeFault::new(what, hex(&m), hex(&r))),
            (None, Some((r, what))) => Some(TreeFault::new(what, "absent", hex(&r))),
            (Some(m), None) => Some(TreeFault::new(
                format!("leaf {}", hex(&id)),
                hex(&m),
                "absent",
            )),
            _ => None,
        });
        if let Some(fault) = fault {
            if leaf_faults.len() < DEEP_CHECK_LEAF_FAULTS_MAX {
                leaf_faults.push(fault);
            } else {
                unlisted += 1;
            }
        }
    }
    records.status().map_err(sm_err)?;
    leaves.status().map_err(sm_err)?;
    let recomputed_root = recomputed_tree.finish().root(ns);
    let index_tree = maintained_tree.finish();
    let maintained_root = index_tree.root(ns);
    let mut faults = Vec::new();
    if recomputed_root != maintained_root {
        faults.push(TreeFault::new(
            "root (recomputed from stored data)",
            hex(&maintained_root),
            hex(&recomputed_root),
        ));
    }
    faults.extend(leaf_faults);
    if unlisted > 0 {
        faults.push(TreeFault::new(
            format!(
                "{unlisted} more leaves (not listed; the first {DEEP_CHECK_LEAF_FAULTS_MAX} are)"
            ),
            "as maintained",
            "differ",
        ));
    }
    // The stored tree: nodes as of the last checkpoint, the buckets changed since, and the
    // root that checkpoint recorded.
    let mut tree = integrity::StoredTree::default();
    for_each_under(
        snap,
        &keys::in_namespace(keys::NODE_TREE_PREFIX, &tenant),
        |k, v| {
            let (_, level, index) =
                keys::parse_tree_node(k).ok_or_else(|| sm_err("malformed tree-node key"))?;
            let hash: Digest = v.try_into().map_err(sm_err)?;
            tree.nodes.insert((level, index), hash);
            Ok(())
        },
    )?;
    for_each_under(
        snap,
        &keys::in_namespace(keys::DIRTY_PREFIX, &tenant),
        |_, v| {
            let buckets: Vec<u16> = codec::decode(v).map_err(sm_err)?;
            tree.dirty.extend(buckets);
            Ok(())
        },
    )?;
    tree.root = snapshot_decoded(snap, &keys::root(ns))?;
    faults.extend(integrity::audit_tree(ns, &index_tree, &tree));
    let count: u64 = snapshot_decoded(snap, &keys::leaf_count(ns))?.unwrap_or(0);
    if count != index_tree.leaves {
        faults.push(TreeFault::new(
            "leaf count (against the leaves)",
            index_tree.leaves.to_string(),
            count.to_string(),
        ));
    }
    if let Some(checkpoint) = newest {
        let recorded = tree.root.filter(|r| r.leaves > 0);
        let signed = checkpoint
            .roots
            .iter()
            .find(|(name, _)| name == ns)
            .map(|(_, r)| *r);
        if recorded != signed {
            let show = |r: Option<NamespaceRoot>| {
                r.map_or("absent".to_string(), |r| {
                    format!("{} ({} leaves)", hex(&r.root), r.leaves)
                })
            };
            faults.push(TreeFault::new(
                format!(
                    "root in checkpoint {} (against the recorded root)",
                    checkpoint.index
                ),
                show(recorded),
                show(signed),
            ));
        }
    }
    Ok(NamespaceCheck {
        namespace: ns.to_string(),
        faults,
    })
}

/// The value at `key` in `snap`, decoded.
fn snapshot_decoded<T: serde::de::DeserializeOwned>(
    snap: &rocksdb::Snapshot<'_>,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    match snap.get(key).map_err(sm_err)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(sm_err)?)),
    }
}

fn get_decoded<T: serde::de::DeserializeOwned>(
    db: &DB,
    key: &[u8],
) -> Result<Option<T>, StorageError> {
    match db.get_pinned(key).map_err(sm_err)? {
        None => Ok(None),
        Some(bytes) => Ok(Some(codec::decode(&bytes).map_err(sm_err)?)),
    }
}

/// The stored [`SmShared::expired_blob_bytes`] (0 if none). An unreadable figure reads as 0
/// with a warning: it only decides when to compact, so it never stops a start or an install.
fn stored_expired_blob_bytes(db: &DB) -> u64 {
    get_decoded(db, keys::EXPIRED_BLOB_BYTES).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read the expired blob bytes estimate; starting it from 0");
        None
    })
    .unwrap_or(0)
}

/// The state machine handed to openraft.
pub struct StateMachineStore {
    shared: Arc<SmShared>,
    /// Tests' hold on snapshot builds ([`crate::raft::network::Faults::hold_snapshot_builds`]).
    builds_held: Option<tokio::sync::watch::Receiver<bool>>,
    recent_heads: RecentHeads,
}

impl StateMachineStore {
    /// Opens (or creates) the state machine under `root`, finishing or discarding any snapshot
    /// install a crash interrupted.
    pub fn open(root: &Path) -> Result<Self, StorageError> {
        let sm_dir = root.join(SM_DIR);
        let snaps_dir = root.join(SNAPSHOTS_DIR);
        std::fs::create_dir_all(&sm_dir).map_err(sm_err)?;
        std::fs::create_dir_all(&snaps_dir).map_err(sm_err)?;
        let generation: u64 = match std::fs::read_to_string(sm_dir.join(CURRENT_FILE)) {
            Ok(s) => s
                .trim()
                .parse()
                .map_err(|e| sm_err(format!("corrupt {SM_DIR}/{CURRENT_FILE}: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => return Err(sm_err(e)),
        };
        // Anything but the current generation is a leftover of an interrupted install.
        for entry in std::fs::read_dir(&sm_dir).map_err(sm_err)? {
            let entry = entry.map_err(sm_err)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name != CURRENT_FILE && name != generation.to_string() {
                let _ = std::fs::remove_dir_all(entry.path());
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let db = open_sm_db(&sm_dir.join(generation.to_string())).map_err(sm_err)?;
        let applied = read_applied(&db)?;
        let expired_blob_bytes = stored_expired_blob_bytes(&db);

        // Load the newest complete snapshot; drop partial ones.
        let mut current: Option<PublishedSnapshot> = None;
        let mut max_seq = 0u64;
        for entry in std::fs::read_dir(&snaps_dir).map_err(sm_err)? {
            let entry = entry.map_err(sm_err)?;
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let stored = std::fs::read(path.join(SNAPSHOT_META_FILE))
                .ok()
                .and_then(|b| codec::decode::<StoredSnapshot>(&b).ok());
            match stored {
                Some(s) if !name.starts_with("incoming-") && !name.starts_with("tmp-") => {
                    if let Some(seq) = name.rsplit('-').next().and_then(|s| s.parse().ok()) {
                        max_seq = max_seq.max(seq);
                    }
                    let newer = current
                        .as_ref()
                        .is_none_or(|(m, _, _)| m.last_log_id < s.meta.last_log_id);
                    if newer {
                        current = Some((s.meta, path.join(SNAPSHOT_DB_DIR), s.files));
                    }
                }
                _ => {
                    let _ = std::fs::remove_dir_all(&path);
                }
            }
        }
        let applied_index = applied.0.map(|l| l.index).unwrap_or(0);
        Ok(Self {
            shared: Arc::new(SmShared {
                root: root.to_path_buf(),
                db: RwLock::new(Arc::new(db)),
                generation: Mutex::new(generation),
                applied: Mutex::new(applied),
                applied_index: AtomicU64::new(applied_index),
                chunk_refs_index: AtomicU64::new(applied_index),
                current_snapshot: Mutex::new(current),
                snapshot_seq: AtomicU64::new(max_seq + 1),
                incoming_seq: AtomicU64::new(0),
                checkpoint_gate: tokio::sync::Mutex::new(()),
                snapshot_bytes_hashed: AtomicU64::new(0),
                expired_blob_bytes: Mutex::new(expired_blob_bytes),
                blob_collection: Mutex::new(()),
                stopping: AtomicBool::new(false),
            }),
            builds_held: None,
            recent_heads: RecentHeads::default(),
        })
    }

    /// Snapshot builds wait after their checkpoint while `held` says `true` (in-process tests;
    /// production never holds).
    pub fn with_snapshot_builds_held(self, held: tokio::sync::watch::Receiver<bool>) -> Self {
        Self {
            builds_held: Some(held),
            ..self
        }
    }

    /// Called at start with the Raft log's last index, before Raft opens. If the state machine
    /// is ahead of the log (a snapshot install switched generations and the node died before
    /// it republished that state as its snapshot), the newest snapshot on disk is behind the
    /// state and would not connect to the log once Raft purges up to the applied index. It is
    /// dropped, so Raft rebuilds a snapshot from the state machine. Returns whether it dropped.
    pub fn reconcile_with_log(&self, log_last_index: u64) -> bool {
        let applied = self.shared.applied_index.load(Ordering::Acquire);
        let mut current = self.shared.current_snapshot.lock().expect("lock");
        let snapshot_index = current
            .as_ref()
            .and_then(|(m, _, _)| m.last_log_id)
            .map(|l| l.index)
            .unwrap_or(0);
        if log_last_index < applied && snapshot_index < applied && current.is_some() {
            tracing::warn!(
                applied,
                log_last_index,
                snapshot_index,
                "state machine is ahead of the log and its snapshot (interrupted snapshot install); rebuilding the snapshot"
            );
            *current = None;
            return true;
        }
        false
    }

    pub fn reader(&self) -> SmReader {
        SmReader {
            shared: self.shared.clone(),
        }
    }
}

/// A checkpoint taken, not yet hashed and published.
struct PendingSnapshot {
    tmp: PathBuf,
    seq: u64,
    meta: SnapshotMeta,
    /// A directory sharing files with the checkpoint, and their hashes.
    known: Option<KnownHashes>,
}

type PublishedSnapshot = (SnapshotMeta, PathBuf, Vec<SnapshotFileInfo>);

/// Takes a RocksDB checkpoint of `db` (a memtable flush plus hard links: fast); its meta
/// names the applied log id and membership the checkpoint holds.
fn take_checkpoint(
    shared: &SmShared,
    db: &DB,
    snapshot_id: Option<String>,
    known: Option<KnownHashes>,
) -> Result<PendingSnapshot, StorageError> {
    let seq = shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
    let tmp = shared.root.join(SNAPSHOTS_DIR).join(format!("tmp-{seq}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(snap_err)?;
    }
    std::fs::create_dir_all(&tmp).map_err(snap_err)?;
    DbCheckpoint::new(db)
        .and_then(|c| c.create_checkpoint(tmp.join(SNAPSHOT_DB_DIR)))
        .map_err(snap_err)?;
    // Read from the checkpoint itself: applies may go on while it is taken.
    let (last_log_id, membership) = checkpoint_applied_state(&tmp.join(SNAPSHOT_DB_DIR))?;
    let index = last_log_id.map(|l| l.index).unwrap_or(0);
    let term = last_log_id.map(|l| l.leader_id.term).unwrap_or(0);
    let meta = SnapshotMeta {
        last_log_id,
        last_membership: membership,
        snapshot_id: snapshot_id.unwrap_or_else(|| format!("{term}-{index}-{seq}")),
    };
    Ok(PendingSnapshot {
        tmp,
        seq,
        meta,
        known,
    })
}

/// Table files a read-only open of a checkpoint keeps open (it reads two small keys).
const CHECKPOINT_READ_OPEN_FILES: i32 = 16;

/// The applied log id and membership a checkpoint holds, read from the checkpoint itself.
fn checkpoint_applied_state(dir: &Path) -> Result<(Option<LogId>, StoredMembership), StorageError> {
    let mut opts = Options::default();
    opts.set_max_open_files(CHECKPOINT_READ_OPEN_FILES);
    opts.set_skip_stats_update_on_db_open(true);
    let db = DB::open_for_read_only(&opts, dir, false).map_err(snap_err)?;
    read_applied(&db)
}

/// [`publish_snapshot`] on a blocking thread: it reads every file of the checkpoint.
async fn publish_snapshot_blocking(
    shared: Arc<SmShared>,
    pending: PendingSnapshot,
) -> Result<PublishedSnapshot, StorageError> {
    tokio::task::spawn_blocking(move || publish_snapshot(&shared, pending))
        .await
        .map_err(snap_err)?
}

/// Hashes a checkpoint's files, writes its meta, publishes it as the current snapshot and
/// drops the oldest ones. Reads every file once: run it off the async workers.
fn publish_snapshot(
    shared: &SmShared,
    pending: PendingSnapshot,
) -> Result<PublishedSnapshot, StorageError> {
    let PendingSnapshot {
        tmp,
        seq,
        meta,
        known,
    } = pending;
    let hashed = hash_dir(&tmp.join(SNAPSHOT_DB_DIR), known.as_ref()).map_err(snap_err)?;
    let files = hashed.files;
    let total: u64 = files.iter().map(|f| f.size).sum();
    shared
        .snapshot_bytes_hashed
        .fetch_add(hashed.bytes_hashed, Ordering::Relaxed);
    tracing::info!(
        snapshot_id = %meta.snapshot_id,
        files = files.len(),
        bytes = total,
        bytes_hashed = hashed.bytes_hashed,
        "snapshot files hashed"
    );
    let stored = StoredSnapshot {
        meta: meta.clone(),
        files: files.clone(),
    };
    write_file_synced(&tmp.join(SNAPSHOT_META_FILE), &codec::encode(&stored)).map_err(snap_err)?;
    let snaps_dir = shared.root.join(SNAPSHOTS_DIR);
    let final_dir = snaps_dir.join(format!("snap-{seq}"));
    std::fs::rename(&tmp, &final_dir).map_err(snap_err)?;
    fsync_dir(&snaps_dir).map_err(snap_err)?;
    let db_path = final_dir.join(SNAPSHOT_DB_DIR);
    {
        let mut current = shared.current_snapshot.lock().expect("lock");
        // Snapshots may finish out of order; never replace a newer one.
        if current
            .as_ref()
            .is_none_or(|(m, _, _)| m.last_log_id <= meta.last_log_id)
        {
            *current = Some((meta.clone(), db_path.clone(), files.clone()));
        }
    }
    remove_old_snapshots(shared, &final_dir);
    Ok((meta, db_path, files))
}

fn remove_old_snapshots(shared: &SmShared, keep: &Path) {
    let snaps_dir = shared.root.join(SNAPSHOTS_DIR);
    let Ok(entries) = std::fs::read_dir(&snaps_dir) else {
        return;
    };
    let current = shared
        .current_snapshot
        .lock()
        .expect("lock")
        .as_ref()
        .map(|(_, p, _)| p.clone());
    let mut complete: Vec<(u64, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let seq = name.strip_prefix("snap-")?.parse().ok()?;
            Some((seq, e.path()))
        })
        .collect();
    complete.sort();
    let excess = complete.len().saturating_sub(SNAPSHOTS_KEPT);
    for (_, path) in complete.into_iter().take(excess) {
        if keep.starts_with(&path) || current.as_ref().is_some_and(|c| c.starts_with(&path)) {
            continue;
        }
        let _ = std::fs::remove_dir_all(path);
    }
}

fn write_file_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Encoded values staged in the current apply batch (None: deleted), read before the database
/// so that commands in one `apply` call see each other.
type Pending = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// What a record's `'r'` key holds: its latest version without the value, stored under the
/// record's Merkle leaf id (`keys::record`). It names its record, points into the history, and
/// is the record's leaf. The value is stored once, in the record's history at (revision,
/// position), so a write adds its bytes once.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecordHead {
    collection: Collection,
    key: RecordKey,
    revision: u64,
    position: u32,
    time_ms: u64,
    seq: u64,
    /// `None` for a tombstone.
    live: Option<LiveHead>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LiveHead {
    /// The value's length.
    len: u64,
    /// The record's Merkle leaf hash.
    leaf: Digest,
}

/// What a `'x'` key (`keys::replaced`, which names both versions) holds, for history expiry
/// to remove the replaced version without reading history.
#[derive(Debug, Serialize, Deserialize)]
struct Replaced {
    /// When it was replaced: the replacing version's time.
    time_ms: u64,
    /// The replaced version's value length (0 for a tombstone), for the blob-garbage estimate.
    value_len: u64,
}

/// Record heads an apply call reads, by key: the ledger reads a record's head before a write
/// and the store again to list the version it replaces. The database does not change until
/// the call's batch is written, and staged heads are found in the pending changes first.
type HeadCache = RefCell<Heads>;

#[derive(Default)]
struct Heads {
    /// Read during this apply call, decoded.
    call: HashMap<Vec<u8>, Option<RecordHead>>,
    /// Written by this node's recent apply calls.
    recent: RecentHeads,
}

/// How many record heads one generation of [`RecentHeads`] holds at most.
pub const RECENT_HEADS_PER_GENERATION: usize = 65_536;
/// How many bytes of keys and encoded heads one generation of [`RecentHeads`] holds at most
/// (a head carries its record's key, up to 1 KiB).
pub const RECENT_HEADS_BYTES_PER_GENERATION: usize = 12 << 20;

/// The record heads this node's last apply calls wrote, encoded as stored (`None`: deleted),
/// so a put that replaces a record written lately reads no table file for its head. Only the
/// state-machine task touches it, and only after the batch that wrote them is in the
/// database; an install replaces the database and empties it. Two generations: when the
/// newer is full (by count or bytes) it becomes the older and the older is dropped, so at
/// most 131,072 heads or 24 MiB of keys and heads are kept, plus the two maps' tables
/// (about 9 MB, computed from their slot size). Measured once: 28 MB of resident memory in
/// all for 131,072 heads with their keys (106 bytes together).
#[derive(Default)]
struct RecentHeads {
    newer: HashMap<Box<[u8]>, Option<Box<[u8]>>>,
    /// Bytes of keys and heads inserted into `newer` (a replaced head still counts).
    newer_bytes: usize,
    older: HashMap<Box<[u8]>, Option<Box<[u8]>>>,
}

impl RecentHeads {
    fn get(&self, key: &[u8]) -> Option<&Option<Box<[u8]>>> {
        self.newer.get(key).or_else(|| self.older.get(key))
    }

    /// Keeps `head` (trimmed to its length: an encoded head has spare capacity) as the one
    /// stored at `key`.
    fn insert(&mut self, key: Vec<u8>, head: Option<Vec<u8>>) {
        let bytes = key.len() + head.as_ref().map_or(0, Vec::len);
        if self.newer.len() >= RECENT_HEADS_PER_GENERATION
            || self.newer_bytes + bytes > RECENT_HEADS_BYTES_PER_GENERATION
        {
            let empty = HashMap::with_capacity(RECENT_HEADS_PER_GENERATION);
            self.older = std::mem::replace(&mut self.newer, empty);
            self.newer_bytes = 0;
        } else if self.newer.capacity() == 0 {
            self.newer.reserve(RECENT_HEADS_PER_GENERATION);
        }
        self.newer_bytes += bytes;
        self.newer
            .insert(key.into_boxed_slice(), head.map(Vec::into_boxed_slice));
    }
}

/// The value this apply call staged at `key`, decoded: None if it staged nothing there,
/// `Some(Ok(None))` if it staged a delete.
fn staged_decoded<T: serde::de::DeserializeOwned>(
    pending: &Pending,
    key: &[u8],
) -> Option<Result<Option<T>, StorageError>> {
    pending.get(key).map(|v| {
        v.as_deref()
            .map(|b| codec::decode(b).map_err(sm_err))
            .transpose()
    })
}

/// The head stored at `key` as this apply call sees it: staged, else cached, else read.
fn staged_head(
    db: &DB,
    pending: &Pending,
    cache: &HeadCache,
    key: &[u8],
) -> Result<Option<RecordHead>, StorageError> {
    if let Some(staged) = staged_decoded(pending, key) {
        return staged;
    }
    let head: Option<RecordHead> = {
        let heads = cache.borrow();
        if let Some(head) = heads.call.get(key) {
            return Ok(head.clone());
        }
        match heads.recent.get(key) {
            Some(stored) => stored
                .as_deref()
                .map(|b| codec::decode(b).map_err(sm_err))
                .transpose()?,
            None => get_decoded(db, key)?,
        }
    };
    cache.borrow_mut().call.insert(key.to_vec(), head.clone());
    Ok(head)
}

/// The head key of the record at `path`.
fn head_key(path: &RecordPath) -> Vec<u8> {
    keys::record(
        &path.tenant,
        &integrity::record_leaf_id(path.collection.as_str(), path.key.as_str()),
    )
}

impl RecordHead {
    /// This head, read from [`head_key`]`(path)`, if it names `path`: two records sharing a
    /// leaf id (a blake3 collision) would be an error, never a wrong answer.
    fn checked(self, path: &RecordPath) -> Result<Self, StorageError> {
        if self.collection != path.collection || self.key != path.key {
            return Err(sm_err(format!(
                "record {}/{}/{} shares its leaf id with {}/{}",
                path.tenant.as_str(),
                path.collection.as_str(),
                path.key.as_str(),
                self.collection.as_str(),
                self.key.as_str()
            )));
        }
        Ok(self)
    }

    fn history_key(&self, path: &RecordPath) -> Vec<u8> {
        keys::history(path, self.revision, self.position)
    }

    /// The record this head names, in `tenant`.
    fn path(&self, tenant: &TenantId) -> RecordPath {
        RecordPath {
            tenant: tenant.clone(),
            collection: self.collection.clone(),
            key: self.key.clone(),
        }
    }

    fn tombstone(&self) -> RecordVersion {
        RecordVersion {
            revision: self.revision,
            time_ms: self.time_ms,
            seq: self.seq,
            value: None,
        }
    }
}

struct BatchView<'a> {
    db: &'a DB,
    pending: &'a Pending,
    /// Tenants read from the database during this apply call (the database does not change
    /// until the call's batch is written; staged tenant changes are found in `pending` first).
    tenants: &'a RefCell<HashMap<TenantId, Option<TenantInfo>>>,
    /// Stored bytes of the blob-held versions history expiry chose to remove in this call.
    expired_blob_bytes: &'a Cell<u64>,
    heads: &'a HeadCache,
}

impl BatchView<'_> {
    fn get<T: serde::de::DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, StorageError> {
        staged_decoded(self.pending, key).unwrap_or_else(|| get_decoded(self.db, key))
    }
}

type KeyValue = (Vec<u8>, Vec<u8>);

/// The database merged with the staged changes of the current apply call, in key order:
/// staged values win, staged deletes hide. Expiry must see exactly this (replicas group
/// entries into apply calls differently; the merged view is the same for all of them).
struct MergedScan<'a> {
    it: rocksdb::DBRawIterator<'a>,
    pending: &'a Pending,
    next_pending: Option<Vec<u8>>,
    upper: Vec<u8>,
}

impl<'a> MergedScan<'a> {
    /// The keys starting with `prefix`, from the first at or after `from`.
    fn new(db: &'a DB, pending: &'a Pending, prefix: &[u8], from: &[u8]) -> Self {
        let mut scan = Self {
            it: db.raw_iterator_opt(bounded_to(prefix)),
            pending,
            next_pending: None,
            upper: keys::prefix_end(prefix),
        };
        scan.seek(from);
        scan
    }

    fn seek(&mut self, key: &[u8]) {
        self.it.seek(key);
        self.next_pending = self
            .pending
            .range(key.to_vec()..self.upper.clone())
            .next()
            .map(|(k, _)| k.clone());
    }

    fn advance_pending(&mut self, after: &[u8]) {
        let mut range = self.pending.range(after.to_vec()..self.upper.clone());
        self.next_pending = match range.next() {
            Some((k, _)) if k.as_slice() == after => range.next().map(|(k, _)| k.clone()),
            other => other.map(|(k, _)| k.clone()),
        };
    }

    fn next(&mut self) -> Result<Option<KeyValue>, StorageError> {
        loop {
            let db_key = if self.it.valid() {
                self.it.key().map(<[u8]>::to_vec)
            } else {
                self.it.status().map_err(sm_err)?;
                None
            };
            let take_pending = match (&db_key, &self.next_pending) {
                (None, None) => return Ok(None),
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(d), Some(p)) => p <= d,
            };
            if take_pending {
                let key = self.next_pending.clone().expect("checked above");
                if db_key.as_deref() == Some(key.as_slice()) {
                    self.it.next();
                }
                self.advance_pending(&key);
                match self.pending.get(&key) {
                    Some(Some(v)) => return Ok(Some((key, v.clone()))),
                    _ => continue,
                }
            }
            let key = db_key.expect("checked above");
            let value = self.it.value().map(<[u8]>::to_vec).unwrap_or_default();
            self.it.next();
            return Ok(Some((key, value)));
        }
    }
}

impl LedgerView for BatchView<'_> {
    type Error = StorageError;
    fn expirable_versions(
        &self,
        before_ms: u64,
        limit: usize,
    ) -> Result<ledger::Expirable, StorageError> {
        let limit = limit.max(1);
        let mut found = ledger::Expirable::default();
        let prefix = [keys::REPLACED_PREFIX];
        // The cursor's own key went with the version it listed, so the scan starts past it.
        let start: Option<Vec<u8>> = self.get(keys::EXPIRED_TO)?;
        let start = start.unwrap_or_else(|| prefix.to_vec());
        let mut scan = MergedScan::new(self.db, self.pending, &prefix, &start);
        // Replacements are in log order and the leader's clock is monotonic in it, so the
        // first one at or after the cutoff ends the expirable ones.
        while let Some((key, value)) = scan.next()? {
            let replaced: Replaced = codec::decode(&value).map_err(sm_err)?;
            if replaced.time_ms >= before_ms {
                break;
            }
            if found.versions.len() >= limit {
                found.more = true;
                break;
            }
            found.versions.push(ledger::ExpiredVersion(key));
            if replaced.value_len >= BLOB_MIN_BYTES {
                let bytes = &self.expired_blob_bytes;
                bytes.set(bytes.get() + replaced.value_len);
            }
        }
        Ok(found)
    }
    fn record_len(&self, path: &RecordPath) -> Result<Option<u64>, StorageError> {
        Ok(
            match staged_head(self.db, self.pending, self.heads, &head_key(path))? {
                Some(head) => head.checked(path)?.live.map(|l| l.len),
                None => None,
            },
        )
    }
    fn tenant(&self, id: &TenantId) -> Result<Option<TenantInfo>, StorageError> {
        let key = keys::tenant(id);
        if self.pending.contains_key(&key) {
            return self.get(&key);
        }
        if let Some(cached) = self.tenants.borrow().get(id) {
            return Ok(cached.clone());
        }
        let info: Option<TenantInfo> = get_decoded(self.db, &key)?;
        self.tenants.borrow_mut().insert(id.clone(), info.clone());
        Ok(info)
    }
    fn stats(&self, namespace: &TenantId) -> Result<NamespaceStats, StorageError> {
        Ok(self.get(&keys::stats(namespace))?.unwrap_or_default())
    }
    fn source(&self, tenant: &TenantId, source: &SourceId) -> Result<SourcePosition, StorageError> {
        Ok(self.get(&keys::source(tenant, source))?.unwrap_or_default())
    }
    fn artifact(
        &self,
        namespace: &TenantId,
        name: &ArtifactName,
    ) -> Result<Option<ArtifactVersion>, StorageError> {
        self.get(&keys::artifact_latest(namespace, name))
    }
}

/// Everything one `apply` call stages: the write batch, the overlay later commands read, and
/// the position counter that orders record versions within one log entry. Every state write
/// goes through [`Staged::put`]/[`Staged::delete`] so that later commands of the same call read
/// it: replicas group entries into calls differently and must still see the same state.
struct Staged {
    /// Every key this apply call writes (None: deleted), in key order: the overlay later
    /// commands read through and, at the end, the write batch (one write per key however often
    /// the call rewrote it).
    pending: Pending,
    position: u32,
    /// Per namespace: buckets marked dirty in this apply call, and the leaf-count change.
    dirty: BTreeMap<String, (BTreeSet<u16>, i64)>,
    /// An artifact version referencing chunks was applied (the chunk sync has work).
    chunk_refs_added: bool,
    /// Tenant registrations read during this call (every write checks its tenant).
    tenants: RefCell<HashMap<TenantId, Option<TenantInfo>>>,
    /// See [`BatchView::expired_blob_bytes`].
    expired_blob_bytes: Cell<u64>,
    heads: HeadCache,
}

impl Staged {
    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.pending.insert(key, None);
    }

    /// The write batch of everything staged, and the recent heads with this batch's record
    /// heads added (to keep once the batch is written).
    fn into_batch(self) -> (WriteBatch, RecentHeads) {
        let mut batch = WriteBatch::default();
        let mut recent = self.heads.into_inner().recent;
        for (key, value) in self.pending {
            match &value {
                Some(value) => batch.put(&key, value),
                None => batch.delete(&key),
            }
            if key.first() == Some(&keys::RECORD_PREFIX) {
                recent.insert(key, value);
            }
        }
        (batch, recent)
    }

    /// The current value of a key: staged in this apply, else in the database.
    fn get(&self, db: &DB, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        match self.pending.get(key) {
            Some(v) => Ok(v.clone()),
            None => Ok(db.get(key).map_err(sm_err)?),
        }
    }

    /// Every key under `prefix` with its current value, staged changes applied.
    fn scan(&self, db: &DB, prefix: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StorageError> {
        self.overlay(&mut db.raw_iterator_opt(bounded_to(prefix)), prefix)
    }

    /// Notes that the Merkle leaf `id` changed (`existed`: whether it was present before,
    /// `exists`: whether it is now; the ledger knows both) and marks its bucket dirty;
    /// [`Staged::persist_dirty`] writes the marks in the same batch, so the tree is rehashed at
    /// the next checkpoint whatever happens in between. The leaf itself is the caller's to
    /// stage: a record's is in its head, an artifact's is [`Staged::set_artifact_leaf`].
    fn mark_leaf(&mut self, namespace: &str, id: &Digest, existed: bool, exists: bool) {
        if !self.dirty.contains_key(namespace) {
            self.dirty.insert(namespace.to_string(), Default::default());
        }
        let entry = self.dirty.get_mut(namespace).expect("inserted above");
        entry.0.insert(integrity::bucket_of(id));
        entry.1 += i64::from(exists) - i64::from(existed);
    }

    /// Sets or removes an artifact's Merkle leaf (`hash`: `None` once it is deleted).
    fn set_artifact_leaf(
        &mut self,
        namespace: &str,
        id: &Digest,
        hash: Option<Digest>,
        existed: bool,
    ) {
        self.mark_leaf(namespace, id, existed, hash.is_some());
        let key = keys::leaf(namespace, id);
        match hash {
            Some(h) => self.put(key, h.to_vec()),
            None if existed => self.delete(key),
            None => {}
        }
    }

    /// Writes each namespace's leaf-count change since the last call and returns the buckets
    /// marked dirty since then (the marks are taken).
    fn settle_counts(&mut self, db: &DB) -> Result<BTreeMap<String, BTreeSet<u16>>, StorageError> {
        let mut marked = BTreeMap::new();
        for (namespace, (buckets, delta)) in std::mem::take(&mut self.dirty) {
            if delta != 0 {
                let key = keys::leaf_count(&namespace);
                let count: u64 = match self.get(db, &key)? {
                    Some(v) => codec::decode(&v).map_err(sm_err)?,
                    None => 0,
                };
                let count = count
                    .checked_add_signed(delta)
                    .ok_or_else(|| sm_err("Merkle leaf count went negative"))?;
                self.put(key, codec::encode(&count));
            }
            marked.insert(namespace, buckets);
        }
        Ok(marked)
    }

    /// Writes the leaf counts and the dirty buckets of this apply call: one key per namespace
    /// per call (`index`: the newest entry applied, which makes the key unique), not one per
    /// bucket, so each write touches as few state keys as possible.
    fn persist_dirty(&mut self, db: &DB, index: u64) -> Result<(), StorageError> {
        for (namespace, buckets) in self.settle_counts(db)? {
            if !buckets.is_empty() {
                let buckets: Vec<u16> = buckets.into_iter().collect();
                self.put(
                    keys::dirty_buckets(&namespace, index),
                    codec::encode(&buckets),
                );
            }
        }
        Ok(())
    }

    /// The keys under `prefix` with their current values (staged changes applied), read with
    /// `it` (one iterator reused across calls).
    fn overlay(
        &self,
        it: &mut rocksdb::DBRawIterator<'_>,
        prefix: &[u8],
    ) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, StorageError> {
        let mut out: BTreeMap<_, _> = read_prefix(it, prefix)?.into_iter().collect();
        for (k, v) in self
            .pending
            .range(prefix.to_vec()..keys::prefix_end(prefix))
        {
            match v {
                Some(v) => out.insert(k.clone(), v.clone()),
                None => out.remove(k),
            };
        }
        Ok(out)
    }

    /// Rehashes every bucket changed since the last checkpoint and their ancestors, and
    /// updates the namespace roots. Runs at checkpoints only, so writes pay just for their
    /// leaves: buckets and each node's children are contiguous key ranges, read in key order
    /// with one iterator per pass.
    fn flush_merkle(&mut self, db: &DB) -> Result<(), StorageError> {
        let mut marked = self.settle_counts(db)?;
        let empty = integrity::empty_subtrees();
        for (k, v) in self.scan(db, &[keys::DIRTY_PREFIX])? {
            let namespace = keys::parse_dirty_buckets(&k)
                .ok_or_else(|| sm_err("malformed dirty-bucket key"))?;
            let buckets: Vec<u16> = codec::decode(&v).map_err(sm_err)?;
            marked.entry(namespace).or_default().extend(buckets);
            self.delete(k);
        }
        for (namespace, buckets) in marked {
            let mut level_hashes: BTreeMap<u32, Digest> = BTreeMap::new();
            {
                let mut it = db.raw_iterator();
                for &bucket in &buckets {
                    // The bucket's leaves, by id: the live records' heads and the artifacts'
                    // leaves (an id is one or the other).
                    let mut leaves: BTreeMap<Digest, Digest> = BTreeMap::new();
                    for kind in [keys::RECORD_PREFIX, keys::LEAF_PREFIX] {
                        let prefix = keys::bucket_prefix(kind, &namespace, bucket);
                        for (k, v) in self.overlay(&mut it, &prefix)? {
                            let id: Digest = *k
                                .last_chunk()
                                .ok_or_else(|| sm_err(format!("leaf key {k:02x?} too short")))?;
                            let hash = if kind == keys::RECORD_PREFIX {
                                let head: RecordHead = codec::decode(&v).map_err(sm_err)?;
                                match head.live {
                                    Some(live) => live.leaf,
                                    None => continue,
                                }
                            } else {
                                v.as_slice().try_into().map_err(sm_err)?
                            };
                            leaves.insert(id, hash);
                        }
                    }
                    level_hashes.insert(u32::from(bucket), integrity::bucket_hash(leaves.iter()));
                }
            }
            for (&i, hash) in &level_hashes {
                self.set_node(&namespace, 0, i, *hash, &empty[0]);
            }
            for level in 1..=integrity::TREE_DEPTH {
                let arity = integrity::TREE_ARITY;
                let parents: BTreeSet<u32> = level_hashes.keys().map(|i| i / arity).collect();
                let mut next = BTreeMap::new();
                let mut it = db.raw_iterator();
                for &p in &parents {
                    // The children: the empty subtree, overlaid by the stored nodes (one key
                    // range) and by this apply's staged nodes, which include the level below,
                    // just computed (`set_node`).
                    let mut children = [empty[level as usize - 1]; integrity::TREE_ARITY as usize];
                    let first = keys::tree_node(&namespace, level - 1, p * arity);
                    let end = keys::tree_node(&namespace, level - 1, (p + 1) * arity);
                    // Where a stored node key falls among the children; a key that does not
                    // (a damaged store) is an error, not a panic in the apply.
                    let slot = |key: &[u8]| -> Result<usize, StorageError> {
                        let bad = || sm_err(format!("tree node key {key:02x?} out of place"));
                        let (_, _, index) = keys::parse_tree_node(key).ok_or_else(bad)?;
                        index
                            .checked_sub(p * arity)
                            .filter(|i| *i < arity)
                            .map(|i| i as usize)
                            .ok_or_else(bad)
                    };
                    it.seek(&first);
                    while it.valid() {
                        match (it.key(), it.value()) {
                            (Some(k), Some(v)) if k < end.as_slice() => {
                                children[slot(k)?] = v.try_into().map_err(sm_err)?;
                            }
                            _ => break,
                        }
                        it.next();
                    }
                    it.status().map_err(sm_err)?;
                    for (k, v) in self.pending.range(first.clone()..end.clone()) {
                        children[slot(k)?] = match v {
                            Some(v) => v.as_slice().try_into().map_err(sm_err)?,
                            None => empty[level as usize - 1],
                        };
                    }
                    next.insert(p, integrity::node_hash(&children));
                }
                drop(it);
                for (&p, hash) in &next {
                    self.set_node(&namespace, level, p, *hash, &empty[level as usize]);
                }
                level_hashes = next;
            }
            let top = level_hashes
                .get(&0)
                .copied()
                .unwrap_or(empty[integrity::TREE_DEPTH as usize]);
            let leaves: u64 = match self.get(db, &keys::leaf_count(&namespace))? {
                Some(v) => codec::decode(&v).map_err(sm_err)?,
                None => 0,
            };
            let root = NamespaceRoot {
                root: integrity::root_hash(&namespace, leaves, &top),
                leaves,
            };
            self.put(keys::root(&namespace), codec::encode(&root));
        }
        Ok(())
    }

    fn set_node(&mut self, namespace: &str, level: u8, index: u32, hash: Digest, empty: &Digest) {
        let key = keys::tree_node(namespace, level, index);
        if hash == *empty {
            self.delete(key);
        } else {
            self.put(key, hash.to_vec());
        }
    }

    /// Every namespace root, staged changes applied.
    fn roots(&self, db: &DB) -> Result<Vec<(String, NamespaceRoot)>, StorageError> {
        self.scan(db, &[keys::ROOT_PREFIX])?
            .into_iter()
            .map(|(k, v)| {
                let ns = keys::parse_root(&k).ok_or_else(|| sm_err("malformed root key"))?;
                Ok((ns, codec::decode::<NamespaceRoot>(&v).map_err(sm_err)?))
            })
            .filter(|r| !matches!(r, Ok((_, root)) if root.leaves == 0))
            .collect()
    }

    /// Records a checkpoint of all roots at `stamp`, keeping the newest [`CHECKPOINTS_KEPT`].
    fn checkpoint(&mut self, db: &DB, stamp: Stamp) -> Result<(), StorageError> {
        self.flush_merkle(db)?;
        let roots = self.roots(db)?;
        let cluster_root = integrity::cluster_root(&roots);
        let checkpoint = Checkpoint {
            index: stamp.index,
            time_ms: stamp.time_ms,
            roots,
            cluster_root,
        };
        self.put(keys::checkpoint(stamp.index), codec::encode(&checkpoint));
        let mut kept: Vec<u64> = match self.get(db, keys::CHECKPOINTS)? {
            Some(v) => codec::decode(&v).map_err(sm_err)?,
            None => Vec::new(),
        };
        // Checkpoint commands batched into one entry share its index: the last one's roots
        // stand (they include everything before it in the entry), listed once.
        if kept.last() != Some(&stamp.index) {
            kept.push(stamp.index);
        }
        while kept.len() > CHECKPOINTS_KEPT {
            let old = kept.remove(0);
            self.delete(keys::checkpoint(old));
        }
        self.put(keys::CHECKPOINTS.to_vec(), codec::encode(&kept));
        Ok(())
    }
}

/// Checkpoints kept in the state machine (older ones are dropped as new ones are recorded).
pub const CHECKPOINTS_KEPT: usize = 64;

/// Applies one command through the ledger and stages its mutations.
fn apply_command(
    db: &DB,
    staged: &mut Staged,
    stamp: Stamp,
    command: &Command,
) -> Result<Outcome, StorageError> {
    let view = BatchView {
        db,
        pending: &staged.pending,
        tenants: &staged.tenants,
        expired_blob_bytes: &staged.expired_blob_bytes,
        heads: &staged.heads,
    };
    let (mutations, outcome) = ledger::apply(&view, stamp, command)?;
    for m in mutations {
        match m {
            Mutation::PutRecord {
                path,
                version,
                replaced_live,
            } => {
                let id = integrity::record_leaf_id(path.collection.as_str(), path.key.as_str());
                let live = version.value.as_deref().map(|value| LiveHead {
                    len: value.len() as u64,
                    leaf: integrity::LeafObject::Record {
                        collection: path.collection.as_str(),
                        key: path.key.as_str(),
                        seq: version.seq,
                        value,
                    }
                    .hash(),
                });
                staged.mark_leaf(path.tenant.as_str(), &id, replaced_live, live.is_some());
                let head_key = keys::record(&path.tenant, &id);
                let previous = staged_head(db, &staged.pending, &staged.heads, &head_key)?;
                let head = RecordHead {
                    collection: path.collection.clone(),
                    key: path.key.clone(),
                    revision: version.revision,
                    position: staged.position,
                    time_ms: version.time_ms,
                    seq: version.seq,
                    live,
                };
                staged.position += 1;
                // History expiry later in this apply call reads the staged replacement,
                // exactly as a replica that applied this entry in an earlier call reads the
                // stored one.
                if let Some(previous) = previous {
                    let previous = previous.checked(&path)?;
                    let replaced = Replaced {
                        time_ms: version.time_ms,
                        value_len: previous.live.as_ref().map_or(0, |l| l.len),
                    };
                    let key =
                        keys::replaced(head.revision, head.position, &previous.history_key(&path));
                    staged.put(key, codec::encode(&replaced));
                }
                staged.put(head.history_key(&path), codec::encode(&version));
                staged.put(head_key, codec::encode(&head));
            }
            Mutation::PutTenant(info) => staged.put(keys::tenant(&info.id), codec::encode(&info)),
            Mutation::PutStats { namespace, stats } => {
                staged.put(keys::stats(&namespace), codec::encode(&stats))
            }
            Mutation::PutSource {
                tenant,
                source,
                position,
            } => staged.put(keys::source(&tenant, &source), codec::encode(&position)),
            Mutation::Checkpoint => staged.checkpoint(db, stamp)?,
            Mutation::DeleteVersion(ledger::ExpiredVersion(replaced)) => {
                let history = keys::replaced_history(&replaced)
                    .ok_or_else(|| sm_err("malformed replacement key"))?;
                staged.delete(history.to_vec());
                staged.put(keys::EXPIRED_TO.to_vec(), codec::encode(&replaced));
                staged.delete(replaced);
            }
            Mutation::PutArtifact {
                namespace,
                name,
                version,
                replaced_live,
            } => {
                let hash = version.manifest.as_ref().map(|m| {
                    integrity::LeafObject::Artifact {
                        name: name.as_str(),
                        size: m.size,
                        blake3: &m.blake3,
                    }
                    .hash()
                });
                let id = integrity::artifact_leaf_id(name.as_str());
                staged.set_artifact_leaf(namespace.as_str(), &id, hash, replaced_live);
                if let Some(m) = &version.manifest {
                    for c in &m.chunks {
                        staged.put(keys::chunk(&c.hash), c.size.to_be_bytes().to_vec());
                    }
                    staged.chunk_refs_added = true;
                }
                let encoded = codec::encode(&version);
                staged.put(
                    keys::artifact_version(&namespace, &name, version.version),
                    encoded.clone(),
                );
                staged.put(keys::artifact_latest(&namespace, &name), encoded);
            }
        }
    }
    Ok(outcome)
}

/// Applies a list of commands in order, each seeing the previous ones' effects.
fn apply_commands(
    db: &DB,
    staged: &mut Staged,
    stamp: Stamp,
    commands: &[Command],
) -> Result<Outcome, StorageError> {
    let mut outcomes = Vec::with_capacity(commands.len());
    for command in commands {
        outcomes.push(apply_command(db, staged, stamp, command)?);
    }
    Ok(Outcome::Batch(outcomes))
}

/// Builds a snapshot on a blocking thread while applies go on
/// ([`take_checkpoint_beside_applies`]): the meta is read from the checkpoint, so it names
/// exactly the state the checkpoint holds (some entries later than when Raft asked for the
/// builder, which Raft takes as it takes any snapshot). Taking the checkpoint in the
/// state-machine task held every apply for its flush: about 25–240 ms per node at each snapshot
/// under a 64-client load, on all nodes at once.
pub struct SnapshotBuilder {
    shared: Arc<SmShared>,
    used: bool,
    held: Option<tokio::sync::watch::Receiver<bool>>,
}

/// Takes a checkpoint of the database while applies go on, and reads the applied state it
/// holds from the checkpoint itself, so meta and content agree whatever was applied meanwhile;
/// the current snapshot is the one whose hashes it may reuse. Holds the checkpoint gate
/// throughout, so no install switches the database meanwhile.
fn take_checkpoint_beside_applies(shared: &SmShared) -> Result<PendingSnapshot, StorageError> {
    let _no_install = shared.checkpoint_gate.blocking_lock();
    let db = shared.db();
    let known = shared
        .current_snapshot
        .lock()
        .expect("lock")
        .as_ref()
        .map(|(_, dir, files)| KnownHashes {
            dir: dir.clone(),
            files: files.clone(),
        });
    take_checkpoint(shared, &db, None, known)
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        if std::mem::replace(&mut self.used, true) {
            return Err(snap_err("snapshot builder used twice"));
        }
        let shared = self.shared.clone();
        let pending = tokio::task::spawn_blocking(move || take_checkpoint_beside_applies(&shared))
            .await
            .map_err(snap_err)??;
        if let Some(held) = &mut self.held {
            // A closed sender (its faults dropped) holds nothing.
            let _ = held.wait_for(|held| !held).await;
        }
        let shared = self.shared.clone();
        let (meta, path, files) =
            tokio::task::spawn_blocking(move || publish_snapshot(&shared, pending))
                .await
                .map_err(snap_err)??;
        tracing::info!(snapshot_id = %meta.snapshot_id, files = files.len(), "snapshot built");
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotDir { path, files }),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok(self.shared.applied.lock().expect("lock").clone())
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let db = self.shared.db();
        let mut staged = Staged {
            pending: BTreeMap::new(),
            tenants: RefCell::default(),
            dirty: BTreeMap::new(),
            chunk_refs_added: false,
            expired_blob_bytes: Cell::new(0),
            heads: RefCell::new(Heads {
                call: HashMap::new(),
                recent: std::mem::take(&mut self.recent_heads),
            }),
            position: 0,
        };
        let mut clock: u64 = get_decoded(&db, keys::CLOCK)?.unwrap_or(0);
        let clock_before = clock;
        let mut outcomes = Vec::new();
        let (mut last_applied, mut membership) = self.shared.applied.lock().expect("lock").clone();
        for entry in entries {
            // Broken invariant check: the applied index only moves forward (openraft's storage
            // suite applies with gaps, so strictly increasing is the contract).
            if let Some(prev) = last_applied {
                if entry.log_id.index <= prev.index {
                    return Err(StorageIOError::apply(
                        entry.log_id,
                        AnyError::error(format!(
                            "apply going backwards: last applied {prev}, next {}",
                            entry.log_id
                        )),
                    )
                    .into());
                }
            }
            staged.position = 0;
            let outcome = match &entry.payload {
                EntryPayload::Blank => Outcome::Nothing,
                EntryPayload::Normal(command) => {
                    // The leader's clock, made monotonic: a new leader whose clock is behind
                    // never stamps a change earlier than one already committed. Commands
                    // without a stamp take the time of the last stamped entry.
                    if let Command::Timed { at_ms, .. } = command {
                        clock = clock.max(*at_ms);
                    }
                    let stamp = Stamp {
                        index: entry.log_id.index,
                        time_ms: clock,
                    };
                    match command {
                        Command::Timed { commands, .. } | Command::Batch(commands) => {
                            apply_commands(&db, &mut staged, stamp, commands)?
                        }
                        command => apply_command(&db, &mut staged, stamp, command)?,
                    }
                }
                EntryPayload::Membership(m) => {
                    for (id, _) in m.nodes() {
                        staged.put(keys::node(*id), Vec::new());
                    }
                    membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    staged.put(keys::MEMBERSHIP.to_vec(), codec::encode(&membership));
                    Outcome::Nothing
                }
            };
            last_applied = Some(entry.log_id);
            outcomes.push(outcome);
        }
        if let Some(last) = last_applied {
            staged.persist_dirty(&db, last.index)?;
        }
        if clock != clock_before {
            staged.put(keys::CLOCK.to_vec(), codec::encode(&clock));
        }
        staged.put(keys::APPLIED.to_vec(), codec::encode(&last_applied));
        let staged_chunk_refs = staged.chunk_refs_added;
        let expired_blob_bytes = staged.expired_blob_bytes.get();
        // Held through the write when this batch adds to the estimate, so no compaction
        // lowers it in between (this task owns the database: no install runs meanwhile).
        let estimate = (expired_blob_bytes > 0).then(|| {
            let guard = self.shared.expired_blob_bytes.lock().expect("lock");
            let total = guard.saturating_add(expired_blob_bytes);
            staged.put(keys::EXPIRED_BLOB_BYTES.to_vec(), codec::encode(&total));
            (guard, total)
        });
        let (batch, recent_heads) = staged.into_batch();
        db.write_opt(batch, &sm_write_options())
            .map_err(|e| StorageIOError::write_state_machine(&e))?;
        self.recent_heads = recent_heads;
        let index = last_applied.map(|l| l.index).unwrap_or(0);
        *self.shared.applied.lock().expect("lock") = (last_applied, membership);
        self.shared.applied_index.store(index, Ordering::Release);
        if staged_chunk_refs {
            self.shared.chunk_refs_index.store(index, Ordering::Release);
        }
        if let Some((mut guard, total)) = estimate {
            *guard = total;
        }
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            shared: self.shared.clone(),
            used: false,
            held: self.builds_held.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotDir>, StorageError> {
        let path = self.reader().incoming_snapshot_dir().map_err(snap_err)?;
        Ok(Box::new(SnapshotDir {
            path,
            files: Vec::new(),
        }))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<SnapshotDir>,
    ) -> Result<(), StorageError> {
        // The installed database has heads of its own, whether or not the install succeeds.
        self.recent_heads = RecentHeads::default();
        let shared = self.shared.clone();
        let _no_checkpoint = shared.checkpoint_gate.lock().await;
        let sm_dir = self.shared.root.join(SM_DIR);
        let new_generation = *self.shared.generation.lock().expect("lock") + 1;
        let target = sm_dir.join(new_generation.to_string());
        if target.exists() {
            std::fs::remove_dir_all(&target).map_err(snap_err)?;
        }
        // A snapshot received over the network sits in our own incoming area: its files are
        // hard-linked into the new generation and stay, as they arrived and were verified,
        // under the incoming directory until the installed state is republished, which takes
        // their hashes from there ([`KnownHashes`]). Any other directory (another store's
        // snapshot) is copied and left intact.
        let snaps_dir = self.shared.root.join(SNAPSHOTS_DIR);
        let owned = snapshot
            .path
            .parent()
            .filter(|p| p.parent() == Some(snaps_dir.as_path()))
            .and_then(|p| p.file_name())
            .is_some_and(|n| n.to_string_lossy().starts_with("incoming-"));
        std::fs::create_dir_all(&target).map_err(snap_err)?;
        for entry in std::fs::read_dir(&snapshot.path).map_err(snap_err)? {
            let entry = entry.map_err(snap_err)?;
            let to = target.join(entry.file_name());
            if !(owned && std::fs::hard_link(entry.path(), &to).is_ok()) {
                std::fs::copy(entry.path(), &to).map_err(snap_err)?;
                std::fs::File::open(&to)
                    .and_then(|f| f.sync_all())
                    .map_err(snap_err)?;
            }
        }
        fsync_dir(&target).map_err(snap_err)?;
        fsync_dir(&sm_dir).map_err(snap_err)?;
        let db = open_sm_db(&target).map_err(snap_err)?;
        // Assert right after reading: the checkpoint is at the index its meta claims.
        let (applied, membership) = read_applied(&db)?;
        if applied != meta.last_log_id {
            drop(db);
            let _ = std::fs::remove_dir_all(&target);
            return Err(snap_err(format!(
                "snapshot {} claims last log id {:?} but holds {:?}",
                meta.snapshot_id, meta.last_log_id, applied
            )));
        }
        db.flush().map_err(snap_err)?;
        super::write_atomically(
            &sm_dir.join(CURRENT_FILE),
            new_generation.to_string().as_bytes(),
        )
        .map_err(snap_err)?;

        let db = Arc::new(db);
        let old = {
            let mut current = self.shared.db.write().expect("lock");
            // The sender's estimate, for the blob files installed with it; set with the switch,
            // so a collection on the old generation cannot lower it.
            *self.shared.expired_blob_bytes.lock().expect("lock") = stored_expired_blob_bytes(&db);
            std::mem::replace(&mut *current, db.clone())
        };
        let old_generation = std::mem::replace(
            &mut *self.shared.generation.lock().expect("lock"),
            new_generation,
        );
        *self.shared.applied.lock().expect("lock") = (applied, membership);
        let index = applied.map(|l| l.index).unwrap_or(0);
        self.shared.applied_index.store(index, Ordering::Release);
        // The snapshot may reference chunks this node has never seen.
        self.shared.chunk_refs_index.store(index, Ordering::Release);
        // A blob collection running on the old generation stops here instead of rewriting a
        // database nobody will use again (after a flush, as dropping it would do).
        if self.shared.collection_running() {
            old.cancel_all_background_work(true);
        }
        // The old generation is deleted once no reader holds it; otherwise at next start.
        if let Ok(old_db) = Arc::try_unwrap(old) {
            drop(old_db);
            let _ = std::fs::remove_dir_all(sm_dir.join(old_generation.to_string()));
        }
        // Keep the installed state as this node's current snapshot, so it can serve it on.
        // Files the checkpoint links again are the received ones where they were linked.
        let known = Some(KnownHashes {
            dir: snapshot.path.clone(),
            files: snapshot.files.clone(),
        });
        let pending = take_checkpoint(&self.shared, &db, Some(meta.snapshot_id.clone()), known)?;
        let published = publish_snapshot_blocking(self.shared.clone(), pending).await;
        if owned {
            if let Some(incoming) = snapshot.path.parent() {
                let _ = std::fs::remove_dir_all(incoming);
            }
        }
        published?;
        tracing::info!(snapshot_id = %meta.snapshot_id, generation = new_generation, "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        let current = self.shared.current_snapshot.lock().expect("lock").clone();
        Ok(current.map(|(meta, path, files)| Snapshot {
            meta,
            snapshot: Box::new(SnapshotDir { path, files }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the applies' memory of recent heads stays within its bounds by count and by
    // bytes, forgets the oldest first, and always finds the newest head written at a key.
    #[test]
    fn recent_heads_keep_within_their_bounds_and_the_newest_head() {
        let head = |b: u8| Some(vec![b; 92]);
        let found = |recent: &RecentHeads, key: &[u8]| recent.get(key).cloned().flatten();

        // Long keys: the byte bound rotates first.
        let mut recent = RecentHeads::default();
        let key = |i: usize| [vec![b'k'; 1_000], i.to_be_bytes().to_vec()].concat();
        let n = 3 * RECENT_HEADS_BYTES_PER_GENERATION / 1_100;
        for i in 0..n {
            recent.insert(key(i), head(1));
            assert!(recent.newer_bytes <= RECENT_HEADS_BYTES_PER_GENERATION);
        }
        let bytes: usize = recent
            .newer
            .iter()
            .chain(&recent.older)
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()))
            .sum();
        assert!(bytes <= 2 * RECENT_HEADS_BYTES_PER_GENERATION, "{bytes}");
        assert_eq!(
            found(&recent, &key(n - 1)),
            head(1).map(Vec::into_boxed_slice)
        );
        assert_eq!(recent.get(&key(0)), None, "the oldest forgotten");

        // Short keys: the count bound; a head rewritten across a rotation is found as
        // rewritten, also once it has moved to the older generation.
        let mut recent = RecentHeads::default();
        recent.insert(b"a".to_vec(), head(1));
        for i in 1..RECENT_HEADS_PER_GENERATION {
            recent.insert(i.to_be_bytes().to_vec(), None);
        }
        recent.insert(b"a".to_vec(), head(2));
        assert_eq!(recent.newer.len(), 1, "rotated");
        assert_eq!(found(&recent, b"a"), head(2).map(Vec::into_boxed_slice));
        for i in 0..RECENT_HEADS_PER_GENERATION {
            recent.insert(
                (i + RECENT_HEADS_PER_GENERATION).to_be_bytes().to_vec(),
                None,
            );
        }
        assert!(recent.newer.len() <= RECENT_HEADS_PER_GENERATION);
        assert!(recent.older.len() <= RECENT_HEADS_PER_GENERATION);
        assert_eq!(found(&recent, b"a"), head(2).map(Vec::into_boxed_slice));
        assert_eq!(recent.get(&1usize.to_be_bytes()), None);
        assert_eq!(recent.get(b"gone"), None);
    }
}
