//! The Raft log, vote, committed index and purge marker in RocksDB.
//!
//! Durability rules (each covered by a test in `tests/t10_store.rs`):
//! - `append` makes entries readable before it returns, and fires the flush callback only after
//!   the write-ahead log holding them was fsynced. A dedicated syncer thread coalesces the syncs
//!   of concurrent appends (group commit), so one fsync can acknowledge many batches.
//! - `save_vote`, `purge` and a `truncate` that deletes anything write with `sync = true`
//!   before returning (a truncate past the last stored entry has nothing to write), on a
//!   blocking thread so the fsync does not hold the runtime's worker.
//!
//! A purge writes its marker and nothing else in the write path: reads start after the
//! marker, and the table files holding only purged entries are dropped whole
//! (`DeleteFilesInRange`). A range tombstone instead made RocksDB compact after every purge,
//! reading each purged entry once more to drop it and rewriting the kept ones it overlapped.
//! Purged entries stay on disk, unreadable, where a file also holds kept ones (dropped by a
//! later purge), in level 0 or the memtable (dropped once flushed and moved below level 0, at
//! 4 level-0 files) or in a file being compacted (the next purge): a bounded amount, about the
//! memtables, 3 level-0 files and one file per level.
//!
//! Flushes and compactions write their table files with direct I/O where the filesystem
//! allows it ([`direct_io_supported`]): entries are read back from tables rarely (a follower
//! catching up, a restart; applying reads them from the memtable), so copying every flushed
//! byte through the page cache was wasted CPU. Reads, compaction inputs included, stay buffered.
//!
//! Keys are big-endian log indexes so RocksDB's byte order is log order.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, OptionalSend, RaftLogReader, StorageIOError};
use rocksdb::statistics::Ticker;
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::raft::codec;
use crate::raft::{Entry, LogId, StorageError, TypeConfig, Vote};

const CF_ENTRIES: &str = "entries";
const CF_META: &str = "meta";
const KEY_VOTE: &[u8] = b"vote";
const KEY_COMMITTED: &[u8] = b"committed";
const KEY_LAST_PURGED: &[u8] = b"last_purged";

/// Appends waiting for one fsync at most; beyond it `append` waits for the syncer (backpressure).
const SYNC_QUEUE_DEPTH_MAX: usize = 4096;
/// Retired write-ahead log files RocksDB keeps to write the next ones over. Syncing a file
/// written in place needs no filesystem journal commit, where an appended file does (its size
/// and newly allocated blocks are metadata): on this project's ext4 VM the fdatasync behind
/// every acknowledged append fell from a median of 300–340 µs to about 205 µs under load.
const WAL_FILES_RECYCLED: usize = 4;
/// Memtable of the entries column family. A write-ahead log file is retired (and recycled)
/// once the memtables it holds are flushed, so this also sets how soon after start recycling
/// begins and how large each log file is.
const ENTRIES_MEMTABLE_BYTES: usize = 16 * 1024 * 1024;
/// Total size of the live write-ahead logs before RocksDB flushes the column family holding
/// the oldest (the small `meta` family would otherwise keep old files alive).
const WAL_TOTAL_BYTES_MAX: u64 = 64 * 1024 * 1024;
/// Block size and offset of the direct I/O probe's write. RocksDB aligns its direct writes to
/// the device's logical block size (512 bytes or a multiple), so a filesystem that takes a
/// 512-byte block at offset 512 takes RocksDB's writes too; one that needs more fails the
/// probe and the log stays on buffered I/O.
const DIRECT_IO_PROBE_BLOCK: usize = 512;
/// The probe's file in the log directory, removed right after.
pub const DIRECT_IO_PROBE_FILE: &str = ".direct-io-probe";

/// Whether files in `dir` take `O_DIRECT` writes at the finest alignment RocksDB may use.
/// RocksDB refuses to open a database with direct I/O on a filesystem without `O_DIRECT`, and
/// fails every flush (stopping writes) where the open works but the writes are refused, so the
/// log turns direct I/O on only after this probe wrote one block.
#[cfg(target_os = "linux")]
pub fn direct_io_supported(dir: &Path) -> bool {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let path = dir.join(DIRECT_IO_PROBE_FILE);
    let result = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .and_then(|file| {
            // An aligned block inside a buffer twice its size: no unsafe allocation needed.
            let buf = vec![0u8; 2 * DIRECT_IO_PROBE_BLOCK];
            let start = (DIRECT_IO_PROBE_BLOCK - buf.as_ptr() as usize % DIRECT_IO_PROBE_BLOCK)
                % DIRECT_IO_PROBE_BLOCK;
            file.write_all_at(
                &buf[start..start + DIRECT_IO_PROBE_BLOCK],
                DIRECT_IO_PROBE_BLOCK as u64,
            )
        });
    let _ = std::fs::remove_file(&path);
    match result {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "direct I/O unavailable; flushes and compactions here go through the page cache");
            false
        }
    }
}

/// Direct I/O is used on Linux only.
#[cfg(not(target_os = "linux"))]
pub fn direct_io_supported(_dir: &Path) -> bool {
    false
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn key_index(key: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = key.try_into().map_err(|_| {
        StorageIOError::read_logs(AnyError::error(format!(
            "log key of {} bytes, expected 8",
            key.len()
        )))
    })?;
    Ok(u64::from_be_bytes(bytes))
}

/// The index of the entry `iter` is on, None when it is on none (after checking it did not
/// stop on an error).
fn index_at(
    iter: &rocksdb::DBRawIteratorWithThreadMode<'_, DB>,
) -> Result<Option<u64>, StorageError> {
    match iter.key() {
        Some(key) => Ok(Some(key_index(key)?)),
        None => {
            iter.status().map_err(|e| StorageIOError::read_logs(&e))?;
            Ok(None)
        }
    }
}

type SyncRequest = LogFlushed<TypeConfig>;

/// A gate in front of the syncer's fsync, closed only by [`LogStore::hold_syncs_for_tests`].
#[derive(Default)]
struct SyncGate {
    held: Mutex<bool>,
    opened: Condvar,
    /// Set by [`LogStore::fail_next_sync_for_tests`]: the next fsync reports a failure.
    fail_next: std::sync::atomic::AtomicBool,
}

impl SyncGate {
    fn set_held(&self, held: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        self.opened.notify_all();
    }

    fn take_injected_failure(&self) -> bool {
        self.fail_next.swap(false, Ordering::SeqCst)
    }

    fn wait_open(&self) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            held = self.opened.wait(held).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// Holds a log store's fsyncs (and so its append acknowledgements) until dropped.
pub struct SyncHold(Arc<SyncGate>);

impl Drop for SyncHold {
    fn drop(&mut self) {
        self.0.set_held(false);
    }
}

struct Inner {
    db: Arc<DB>,
    opts: Options,
    syncer: Option<std_mpsc::SyncSender<SyncRequest>>,
    syncer_thread: Option<JoinHandle<()>>,
    sync_gate: Arc<SyncGate>,
    committed_index: AtomicU64,
    /// The first index after the purge marker (0 before any purge): reads start here.
    unpurged_from: AtomicU64,
    direct_io: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the channel ends the syncer after it has flushed what it holds; joining it
        // makes sure the database is really closed when the last handle goes away. A test's
        // hold on the syncs ends here, or the join would wait for it.
        self.sync_gate.set_held(false);
        self.syncer.take();
        if let Some(thread) = self.syncer_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Handle to the log database. Cheap to clone; clones share one database and one syncer.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl LogStore {
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The statistics let tests prove that acknowledgements follow real WAL fsyncs, and let
        // operators see sync counts; their cost is a few atomic increments per write.
        opts.enable_statistics();
        opts.set_max_total_wal_size(WAL_TOTAL_BYTES_MAX);
        // Recycling keeps RocksDB's default recovery mode (point in time); RocksDB turns it off
        // only for the modes it cannot serve.
        opts.set_recycle_log_file_num(WAL_FILES_RECYCLED);
        // Table file writes bypass the page cache (reads and the write-ahead log do not: its
        // fsync is the acknowledgement path). Under a 64-client load this cut the node's CPU
        // per write by about a sixth once the log had flushed a few times (README, Benchmarks).
        let direct_io = direct_io_supported(dir);
        opts.set_use_direct_io_for_flush_and_compaction(direct_io);
        // Entries are small and purged after each snapshot: compressing them is wasted CPU.
        let cfs = [CF_ENTRIES, CF_META].into_iter().map(|name| {
            let mut cf = Options::default();
            if name == CF_ENTRIES {
                cf.set_write_buffer_size(ENTRIES_MEMTABLE_BYTES);
            }
            cf.set_compression_type(rocksdb::DBCompressionType::None);
            ColumnFamilyDescriptor::new(name, cf)
        });
        let db =
            DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| StorageIOError::write_logs(&e))?;
        let db = Arc::new(db);
        let (tx, rx) = std_mpsc::sync_channel::<SyncRequest>(SYNC_QUEUE_DEPTH_MAX);
        let sync_db = db.clone();
        let sync_gate = Arc::new(SyncGate::default());
        let gate = sync_gate.clone();
        let thread = std::thread::Builder::new()
            .name("raft-log-sync".into())
            .spawn(move || run_syncer(sync_db, rx, &gate))
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let store = Self {
            inner: Arc::new(Inner {
                db,
                opts,
                syncer: Some(tx),
                syncer_thread: Some(thread),
                sync_gate,
                committed_index: AtomicU64::new(0),
                unpurged_from: AtomicU64::new(0),
                direct_io,
            }),
        };
        let purged: Option<LogId> = store.get_meta(KEY_LAST_PURGED)?;
        if let Some(purged) = purged {
            store
                .inner
                .unpurged_from
                .store(purged.index + 1, Ordering::SeqCst);
        }
        Ok(store)
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db()
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// The highest log index Raft reported as committed (0 before any).
    pub fn committed_index(&self) -> u64 {
        self.inner.committed_index.load(Ordering::Relaxed)
    }

    /// Test hook: holds this store's append fsyncs, and so its flush callbacks, until the
    /// returned guard is dropped (appended entries stay readable). Lets tests show what a
    /// cluster acknowledges while one node's log is not yet durable.
    pub fn hold_syncs_for_tests(&self) -> SyncHold {
        self.inner.sync_gate.set_held(true);
        SyncHold(self.inner.sync_gate.clone())
    }

    /// Test hook: the next append fsync reports a failure (as a failing disk would), so tests
    /// can show that the appends it covers, and every later one, are never acknowledged.
    pub fn fail_next_sync_for_tests(&self) {
        self.inner.sync_gate.fail_next.store(true, Ordering::SeqCst);
    }

    /// Test hook: writes the entries' memtable to a level-0 table file.
    pub fn flush_for_tests(&self) -> Result<(), StorageError> {
        self.db()
            .flush_cf(self.cf(CF_ENTRIES))
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    /// Test hook: [`Self::flush_for_tests`], then compacts the entries `first..=last` (that
    /// file, when it holds exactly them) to the bottom level, so tests can lay entries out in
    /// table files of known ranges.
    pub fn flush_and_compact_for_tests(&self, first: u64, last: u64) -> Result<(), StorageError> {
        self.flush_for_tests()?;
        self.db().compact_range_cf(
            self.cf(CF_ENTRIES),
            Some(index_key(first)),
            Some(index_key(last)),
        );
        Ok(())
    }

    /// Test hook: the table files holding entries, as (level, first index, last index) each,
    /// purged entries included.
    pub fn table_files_for_tests(&self) -> Result<Vec<(i32, u64, u64)>, StorageError> {
        let files = self
            .db()
            .live_files()
            .map_err(|e| StorageIOError::read_logs(&e))?;
        files
            .into_iter()
            .filter(|f| f.column_family_name == CF_ENTRIES)
            .map(|f| {
                let index = |key: Option<Vec<u8>>| -> Result<u64, StorageError> {
                    key_index(&key.unwrap_or_default())
                };
                Ok((f.level, index(f.start_key)?, index(f.end_key)?))
            })
            .collect()
    }

    /// Whether flushes and compactions write with direct I/O ([`direct_io_supported`]).
    pub fn direct_io(&self) -> bool {
        self.inner.direct_io
    }

    /// How many times RocksDB fsynced the write-ahead log since open.
    pub fn wal_syncs(&self) -> u64 {
        self.inner.opts.get_ticker_count(Ticker::WalFileSynced)
    }

    fn write_synced(&self, batch: WriteBatch) -> Result<(), rocksdb::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        self.db().write_opt(batch, &wo)
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError> {
        let raw = self
            .db()
            .get_cf(self.cf(CF_META), key)
            .map_err(|e| StorageIOError::read(&e))?;
        match raw {
            None => Ok(None),
            Some(bytes) => Ok(Some(
                codec::decode(&bytes).map_err(|e| StorageIOError::read(&e))?,
            )),
        }
    }

    /// The first index reads may return: the one after the purge marker.
    fn unpurged_from(&self) -> u64 {
        self.inner.unpurged_from.load(Ordering::SeqCst)
    }

    /// An iterator over the entries from `start`, or from the first after the purge marker if
    /// that is later. The iterator is created before the marker is read: a purge raises the
    /// marker before it drops files, so the files this iterator sees hold every entry after
    /// the marker it reads, and a read racing a purge can end up with fewer entries at the
    /// front, never with a gap.
    fn entries_from(&self, start: u64) -> rocksdb::DBRawIteratorWithThreadMode<'_, DB> {
        let mut iter = self.db().raw_iterator_cf(self.cf(CF_ENTRIES));
        iter.seek(index_key(start.max(self.unpurged_from())));
        iter
    }

    /// An iterator on the last entry stored, purged or not (on none when the log is empty).
    fn last_entry(&self) -> rocksdb::DBRawIteratorWithThreadMode<'_, DB> {
        let mut iter = self.db().raw_iterator_cf(self.cf(CF_ENTRIES));
        iter.seek_to_last();
        iter
    }

    /// The index of the last entry stored, purged or not, from its key alone.
    fn last_entry_index(&self) -> Result<Option<u64>, StorageError> {
        index_at(&self.last_entry())
    }

    /// The log id of the last entry stored, purged or not.
    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let iter = self.last_entry();
        match iter.value() {
            Some(value) => {
                let entry: Entry =
                    codec::decode(value).map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(Some(entry.log_id))
            }
            None => {
                iter.status().map_err(|e| StorageIOError::read_logs(&e))?;
                Ok(None)
            }
        }
    }

    /// The purge marker and the last log id (the last entry after the marker, else the marker).
    fn log_state(&self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.get_meta(KEY_LAST_PURGED)?;
        // A purged entry may still be stored (see the module doc): the last log id is the last
        // entry only when it comes after the marker.
        let last_log_id = match (self.last_entry_log_id()?, last_purged) {
            (Some(entry), Some(purged)) if entry.index <= purged.index => Some(purged),
            (entry, purged) => entry.or(purged),
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id,
        })
    }

    /// The last index in the log, purged or not (0 when empty).
    pub fn last_index(&self) -> Result<u64, StorageError> {
        Ok(self.log_state()?.last_log_id.map(|l| l.index).unwrap_or(0))
    }

    /// The first index in the log after the purge marker, for tests and status.
    pub fn first_index(&self) -> Result<Option<u64>, StorageError> {
        index_at(&self.entries_from(0))
    }

    /// About how many bytes the stored entries in `after + 1 ..= through` take in table files
    /// (RocksDB's estimate from the files' indexes; entries are stored uncompressed). Entries
    /// still in the memtables are not counted. Reads only the files' metadata.
    pub fn approximate_table_bytes(&self, after: u64, through: u64) -> u64 {
        if after >= through {
            return 0;
        }
        // The end is exclusive; at u64::MAX it leaves out that index, which is never a real one.
        let (start, end) = (index_key(after + 1), index_key(through.saturating_add(1)));
        // rust-rocksdb drops the error RocksDB may report here (only for invalid arguments,
        // which these are not), so a failure would read as 0 bytes: no snapshot by size at
        // that check, and a purge point no later than the true one (never too much purged).
        self.db()
            .get_approximate_sizes_cf(self.cf(CF_ENTRIES), &[rocksdb::Range::new(&start, &end)])
            .first()
            .copied()
            .unwrap_or(0)
    }

    /// About how many bytes the stored entries in `after + 1 ..= through` take: their table
    /// files' share ([`LogStore::approximate_table_bytes`]) plus the whole memtables, which may
    /// also hold entries outside the range. So the figure may exceed the truth by up to the
    /// memtables' size (`ENTRIES_MEMTABLE_BYTES` each: the active one and one being flushed),
    /// never fall short of it by more than the estimate's rounding.
    pub fn approximate_bytes_between(&self, after: u64, through: u64) -> Result<u64, StorageError> {
        let memtables = self
            .db()
            .property_int_value_cf(
                self.cf(CF_ENTRIES),
                rocksdb::properties::CUR_SIZE_ALL_MEM_TABLES,
            )
            .map_err(|e| StorageIOError::read_logs(&e))?
            .unwrap_or(0);
        Ok(self
            .approximate_table_bytes(after, through)
            .saturating_add(memtables))
    }

    /// The lowest index `upto` in `after ..= through` such that the entries in
    /// `upto + 1 ..= through` take at most `keep_bytes` of table files: a purge up to it keeps
    /// about `keep_bytes` of entries up to `through`. None when the entries after `after`
    /// already fit. Entries still in the memtables are not counted (they are the newest, so
    /// at most that much more is kept). A binary search over the estimate, which falls as
    /// `upto` rises: about 64 estimates for the whole index space, each reading metadata only.
    pub fn purge_point_keeping(&self, after: u64, through: u64, keep_bytes: u64) -> Option<u64> {
        if self.approximate_table_bytes(after, through) <= keep_bytes {
            return None;
        }
        // Invariant: more than `keep_bytes` after `low`, at most that after `high`.
        let (mut low, mut high) = (after, through);
        while high - low > 1 {
            let mid = low + (high - low) / 2;
            if self.approximate_table_bytes(mid, through) <= keep_bytes {
                high = mid;
            } else {
                low = mid;
            }
        }
        Some(high)
    }

    /// Runs `write` on a blocking thread: a synced write (and a purge's file drops) would
    /// otherwise hold the runtime's worker thread, and every task queued on it, for the
    /// fsync. Raft awaits the result, so the order of log operations is unchanged.
    async fn blocking<T: Send + 'static>(
        &self,
        write: impl FnOnce(&LogStore) -> Result<T, StorageError> + Send + 'static,
    ) -> Result<T, StorageError> {
        let store = self.clone();
        // The caller's span (the Raft core's, naming the node) for what the write logs.
        let span = tracing::Span::current();
        tokio::task::spawn_blocking(move || span.in_scope(|| write(&store)))
            .await
            .map_err(|e| StorageIOError::write_logs(&e))?
    }
}

fn run_syncer(db: Arc<DB>, rx: std_mpsc::Receiver<SyncRequest>, gate: &SyncGate) {
    let mut failed: Option<String> = None;
    while let Ok(first) = rx.recv() {
        gate.wait_open();
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        // Every request in `waiting` was queued after its entries were written, so one WAL
        // fsync started now covers all of them. After a failed fsync every later one fails
        // too: the kernel may have dropped the dirty pages, so a later "success" would not
        // cover the earlier entries (and a leader counts its own appends from these results).
        let result = match &failed {
            Some(e) => Err(format!("an earlier log fsync failed: {e}")),
            None => {
                let synced = if gate.take_injected_failure() {
                    Err("fsync failure injected by a test".to_string())
                } else {
                    db.flush_wal(true).map_err(|e| e.to_string())
                };
                if let Err(e) = &synced {
                    failed = Some(e.clone());
                }
                synced
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "raft log fsync failed; the node cannot acknowledge writes");
        }
        for callback in waiting {
            callback.log_io_completed(result.clone().map_err(std::io::Error::other));
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&i) => Some(i + 1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let mut out = Vec::new();
        let mut iter = self.entries_from(start);
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            let index = key_index(key)?;
            if end.is_some_and(|end| index >= end) {
                break;
            }
            let entry: Entry =
                codec::decode(value).map_err(|e| StorageIOError::read_log_at_index(index, &e))?;
            // Assert right after reading: the stored key and the entry agree.
            if entry.log_id.index != index {
                return Err(StorageIOError::read_log_at_index(
                    index,
                    AnyError::error(format!(
                        "entry under key {index} carries index {}",
                        entry.log_id.index
                    )),
                )
                .into());
            }
            out.push(entry);
            iter.next();
        }
        iter.status().map_err(|e| StorageIOError::read_logs(&e))?;
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        self.log_state()
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        let encoded = codec::encode(vote);
        self.blocking(move |log| {
            let mut batch = WriteBatch::default();
            batch.put_cf(log.cf(CF_META), KEY_VOTE, encoded);
            log.write_synced(batch)
                .map_err(|e| StorageIOError::write_vote(&e).into())
        })
        .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        self.get_meta(KEY_VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.inner.committed_index.store(c.index, Ordering::Relaxed);
        }
        // Not synced: the committed index is a hint that speeds up restart; Raft recomputes it.
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), KEY_COMMITTED, codec::encode(&committed));
        self.db()
            .write(batch)
            .map_err(|e| StorageIOError::write(&e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.get_meta::<Option<LogId>>(KEY_COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let cf = self.cf(CF_ENTRIES);
        for entry in entries {
            batch.put_cf(cf, index_key(entry.log_id.index), codec::encode(&entry));
        }
        // Written (and so readable) now; durable once the syncer's fsync completes.
        self.db()
            .write(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        let syncer = self
            .inner
            .syncer
            .as_ref()
            .expect("the syncer lives as long as the store");
        syncer.send(callback).map_err(|_| {
            StorageIOError::write_logs(AnyError::error("the log syncer thread has stopped"))
        })?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |log| log.truncate_synced(log_id)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.blocking(move |log| log.purge_synced(log_id)).await
    }
}

impl LogStore {
    fn truncate_synced(&self, log_id: LogId) -> Result<(), StorageError> {
        // The tombstone ends after the last stored entry: one reaching to the end of the index
        // space would overlap every table file flushed after it, turning the log's trivial
        // moves into compactions until it reached the bottom level.
        let last = match self.last_entry_index()? {
            Some(last) if last >= log_id.index => last,
            _ => {
                tracing::debug!(
                    from = log_id.index,
                    "log truncate past the last stored entry: nothing to delete"
                );
                return Ok(());
            }
        };
        let mut batch = WriteBatch::default();
        // delete_range's end is exclusive; u64::MAX itself can never be a real index.
        batch.delete_range_cf(
            self.cf(CF_ENTRIES),
            index_key(log_id.index),
            index_key(last.saturating_add(1)),
        );
        self.write_synced(batch)
            .map_err(|e| StorageIOError::write_logs(&e).into())
    }

    fn purge_synced(&self, log_id: LogId) -> Result<(), StorageError> {
        // Raft never purges backwards; a marker moved back would expose stored purged entries
        // after a restart, with gaps where their files were dropped.
        if log_id.index < self.unpurged_from() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.put_cf(self.cf(CF_META), KEY_LAST_PURGED, codec::encode(&log_id));
        self.write_synced(batch)
            .map_err(|e| StorageIOError::write_logs(&e))?;
        self.inner
            .unpurged_from
            .fetch_max(log_id.index + 1, Ordering::SeqCst);
        // The space: table files below level 0 whose keys all lie in [0, purged], both ends
        // included. Their entries are unreadable already, so a failure costs disk, not data.
        if let Err(e) = self.db().delete_file_in_range_cf(
            self.cf(CF_ENTRIES),
            index_key(0),
            index_key(log_id.index),
        ) {
            tracing::warn!(error = %e, purged = log_id.index, "cannot drop the purged log's table files; they stay on disk until a later purge");
        }
        Ok(())
    }
}
