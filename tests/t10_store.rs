//! Storage: the openraft conformance suite against the RocksDB stores, and the durability rules.
//!
//! Steps:
//! 1. Run `openraft::testing::Suite` against `LogStore` + `StateMachineStore`.
//! 2. Prove with RocksDB's own WAL-sync counter that append acknowledgements, votes, truncates
//!    that delete entries and purges are fsynced before they return.
//! 3. Reopen the stores and find every acknowledged entry, the vote and the applied state.

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::StoreBuilder;
use openraft::{CommittedLeaderId, EntryPayload, RaftLogReader};

use escrow::domain::{RecordPath, TenantId};
use escrow::ledger::{Command, Outcome};
use escrow::raft::{Entry, LogId, StorageError, TypeConfig, Vote};
use escrow::store::{LogStore, StateMachineStore};

struct RocksBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RocksBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("log"))?;
        let sm = StateMachineStore::open(dir.path())?;
        Ok((dir, log, sm))
    }
}

// Goal: our RocksDB stores satisfy every contract openraft's storage suite checks.
#[test]
fn t10_openraft_storage_suite() {
    openraft::testing::Suite::test_all(RocksBuilder).expect("storage suite");
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// Puts of `k{i}` = `value-k{i}` at indexes `range`, term 1; index 1 registers the tenant
/// the puts write into instead.
fn puts(range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range
        .map(|i| {
            if i == 1 {
                Entry {
                    log_id: log_id(1, 1),
                    payload: EntryPayload::Normal(Command::AddTenant {
                        tenant: TenantId::parse("acme").unwrap(),
                    }),
                }
            } else {
                put_entry(1, i, &format!("k{i}"))
            }
        })
        .collect()
}

/// The live value of a record, if any (tombstones read as absent).
fn live(reader: &escrow::store::SmReader, key: &str) -> Option<Vec<u8>> {
    reader
        .get_record(&RecordPath::parse("acme", "orders", key).unwrap())
        .unwrap()
        .and_then(|v| v.value)
}

/// Applies `commands` as one batch entry at `index` (term 1) and returns their outcomes.
async fn apply_batch(
    sm: &mut StateMachineStore,
    index: u64,
    commands: Vec<Command>,
) -> Vec<Outcome> {
    let mut outcomes = sm
        .apply([Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(Command::Batch(commands)),
        }])
        .await
        .unwrap();
    match outcomes.pop() {
        Some(Outcome::Batch(inner)) => inner,
        other => panic!("expected a batch outcome: {other:?}"),
    }
}

fn put_entry(term: u64, index: u64, key: &str) -> Entry {
    Entry {
        log_id: log_id(term, index),
        payload: EntryPayload::Normal(Command::PutRecord {
            path: RecordPath::parse("acme", "orders", key).unwrap(),
            value: format!("value-{key}").into_bytes(),
        }),
    }
}

// Goal: an append is acknowledged only after a WAL fsync; vote, truncate (of stored entries)
// and purge are synced before they return. RocksDB's `rocksdb.wal.synced` ticker counts real
// fsyncs of the WAL.
#[tokio::test]
async fn t11_writes_are_synced_before_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("log")).unwrap();

    for i in 1..=5 {
        let before = log.wal_syncs();
        log.blocking_append([put_entry(1, i, &format!("k{i}"))])
            .await
            .unwrap();
        assert!(
            log.wal_syncs() > before,
            "append {i} acknowledged without a WAL fsync"
        );
    }

    let before = log.wal_syncs();
    log.save_vote(&Vote::new(2, 1)).await.unwrap();
    assert!(
        log.wal_syncs() > before,
        "save_vote returned without a WAL fsync"
    );

    let before = log.wal_syncs();
    log.truncate(log_id(1, 4)).await.unwrap();
    assert!(
        log.wal_syncs() > before,
        "truncate returned without a WAL fsync"
    );

    let before = log.wal_syncs();
    log.purge(log_id(1, 2)).await.unwrap();
    assert!(
        log.wal_syncs() > before,
        "purge returned without a WAL fsync"
    );

    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
    assert_eq!(state.last_log_id, Some(log_id(1, 3)));
}

// Goal: once an append fsync fails, nothing is acknowledged again, not even appends whose
// own fsync would succeed: after a failed fsync the kernel may have dropped the dirty pages,
// so a later success would not cover the earlier entries (and a leader counts its own appends
// toward a commit from these acknowledgements).
#[tokio::test]
async fn t11_a_failed_fsync_is_never_followed_by_an_acknowledgement() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("log")).unwrap();
    log.blocking_append([put_entry(1, 1, "k1")]).await.unwrap();

    log.fail_next_sync_for_tests();
    let failed = log.blocking_append([put_entry(1, 2, "k2")]).await;
    assert!(
        failed
            .as_ref()
            .is_err_and(|e| e.to_string().contains("injected")),
        "{failed:?}"
    );
    for i in 3..=4 {
        let before = log.wal_syncs();
        let later = log
            .blocking_append([put_entry(1, i, &format!("k{i}"))])
            .await;
        assert!(
            later
                .as_ref()
                .is_err_and(|e| e.to_string().contains("an earlier log fsync failed")),
            "append {i}: {later:?}"
        );
        assert_eq!(
            log.wal_syncs(),
            before,
            "append {i}: no fsync tried after a failure"
        );
    }
}

// Goal: concurrent appends share fsyncs (group commit) and every one is still acknowledged.
#[tokio::test]
async fn t12_group_commit_acknowledges_every_append() {
    let dir = tempfile::tempdir().unwrap();
    let log = LogStore::open(&dir.path().join("log")).unwrap();
    let before = log.wal_syncs();
    let mut tasks = Vec::new();
    for i in 1..=200u64 {
        let mut log = log.clone();
        tasks.push(tokio::spawn(async move {
            log.blocking_append([put_entry(1, i, &format!("k{i}"))])
                .await
                .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let syncs = log.wal_syncs() - before;
    // 200 concurrent appends must share fsyncs: one each would mean no group commit.
    assert!((1..200).contains(&syncs), "syncs = {syncs}");
    eprintln!("200 concurrent appends acknowledged with {syncs} WAL fsyncs");
    let mut reader = log.clone();
    assert_eq!(
        reader.try_get_log_entries(1..=200).await.unwrap().len(),
        200
    );
}

// Goal: a reopened store holds every acknowledged entry, the vote, and the applied state that
// was written atomically with its last-applied index.
#[tokio::test]
async fn t13_reopen_keeps_log_vote_and_state() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut log = LogStore::open(&dir.path().join("log")).unwrap();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        let entries: Vec<Entry> = puts(1..=50);
        log.blocking_append(entries.clone()).await.unwrap();
        log.save_vote(&Vote::new(1, 1)).await.unwrap();
        let outcomes = sm.apply(entries).await.unwrap();
        assert_eq!(outcomes[49], Outcome::Written { revision: 50 });
        let deleted = sm
            .apply([Entry {
                log_id: log_id(1, 51),
                payload: EntryPayload::Normal(Command::DeleteRecord {
                    path: RecordPath::parse("acme", "orders", "k7").unwrap(),
                }),
            }])
            .await
            .unwrap();
        assert_eq!(
            deleted[0],
            Outcome::Deleted {
                revision: 51,
                existed: true
            }
        );
    }
    let mut log = LogStore::open(&dir.path().join("log")).unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    assert_eq!(log.read_vote().await.unwrap(), Some(Vote::new(1, 1)));
    assert_eq!(log.try_get_log_entries(1..=50).await.unwrap().len(), 50);
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1, 51)));
    let reader = sm.reader();
    let k8 = reader
        .get_record(&RecordPath::parse("acme", "orders", "k8").unwrap())
        .unwrap()
        .expect("k8 present");
    assert_eq!(k8.value.as_deref(), Some(&b"value-k8"[..]));
    assert_eq!(k8.revision, 8);
    assert_eq!(live(&reader, "k7"), None, "k7 was deleted");
    let k7 = reader
        .record_history(
            &RecordPath::parse("acme", "orders", "k7").unwrap(),
            None,
            10,
            1 << 20,
        )
        .unwrap();
    assert_eq!(k7.len(), 2, "the put and its tombstone are both in history");
    assert!(k7[0].1.is_tombstone());
    // Tenants are separate keyspaces: the same collection and key under another tenant is empty.
    assert!(reader
        .get_record(&RecordPath::parse("acme-corp", "orders", "k8").unwrap())
        .unwrap()
        .is_none());
}

/// Puts at the indexes of `range`, all in `term`.
fn puts_in_term(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<Entry> {
    range
        .map(|i| put_entry(term, i, &format!("k{i}")))
        .collect()
}

/// The log ids of the indexes of `range`, all in `term`.
fn ids_in_term(term: u64, range: std::ops::RangeInclusive<u64>) -> Vec<LogId> {
    range.map(|i| log_id(term, i)).collect()
}

/// The log ids of every readable entry, in order.
async fn readable_ids(log: &mut LogStore) -> Vec<LogId> {
    let entries = log.try_get_log_entries(0..).await.unwrap();
    entries.iter().map(|e| e.log_id).collect()
}

/// Checks what a log purged up to `purged`, with entries up to `last`, shows: the marker, the
/// last log id, and entries after the marker only.
async fn assert_purged_view(log: &mut LogStore, purged: u64, last: u64) {
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, purged)));
    assert_eq!(state.last_log_id, Some(log_id(1, last)));
    assert_eq!(readable_ids(log).await, ids_in_term(1, purged + 1..=last));
    assert!(log
        .try_get_log_entries(1..=purged)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(log.first_index().unwrap(), Some(purged + 1));
}

/// The (first, last) index ranges of the log's table files, in order.
fn table_ranges(log: &LogStore) -> Vec<(u64, u64)> {
    let mut ranges: Vec<(u64, u64)> = log
        .table_files_for_tests()
        .unwrap()
        .into_iter()
        .map(|(_, first, last)| (first, last))
        .collect();
    ranges.sort();
    ranges
}

// Goal: a purge hides every entry up to its marker at once, and gives back the space of the
// table files that hold purged entries only by dropping them whole (a range tombstone instead
// made RocksDB compact after each purge, reading every purged entry once more); both hold
// across a reopen, a purge behind the marker changes nothing, and a purge past the last entry
// (a snapshot install's) leaves an empty log that goes on from the marker.
#[tokio::test]
async fn t13_purge_drops_whole_table_files_and_hides_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    {
        let mut log = LogStore::open(&path).unwrap();
        // Four table files below level 0 (1-25, 26-50, 51-75, 76-100), 101-110 in the memtable.
        for chunk in 0..4u64 {
            let (first, last) = (chunk * 25 + 1, chunk * 25 + 25);
            log.blocking_append(puts(first..=last)).await.unwrap();
            log.flush_and_compact_for_tests(first, last).unwrap();
        }
        log.blocking_append(puts(101..=110)).await.unwrap();
        assert_eq!(
            table_ranges(&log),
            vec![(1, 25), (26, 50), (51, 75), (76, 100)]
        );
        let files = log.table_files_for_tests().unwrap();
        assert!(
            files.iter().all(|f| f.0 > 0),
            "a file in level 0: {files:?}"
        );

        log.purge(log_id(1, 60)).await.unwrap();
        assert_eq!(
            table_ranges(&log),
            vec![(51, 75), (76, 100)],
            "the files holding purged entries only are gone; 51-60 stay stored, unreadable"
        );
        assert_purged_view(&mut log, 60, 110).await;
    }
    let mut log = LogStore::open(&path).unwrap();
    assert_purged_view(&mut log, 60, 110).await;
    // A purge behind the marker changes nothing, also across a reopen.
    log.purge(log_id(1, 30)).await.unwrap();
    assert_purged_view(&mut log, 60, 110).await;
    drop(log);
    let mut log = LogStore::open(&path).unwrap();
    assert_purged_view(&mut log, 60, 110).await;

    log.purge(log_id(1, 200)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(1, 200)));
    assert_eq!(
        state.last_log_id,
        Some(log_id(1, 200)),
        "stored entries 61-110 are purged"
    );
    assert!(log.try_get_log_entries(0..).await.unwrap().is_empty());
    assert_eq!(log.first_index().unwrap(), None);
    log.blocking_append(vec![put_entry(1, 201, "k201")])
        .await
        .unwrap();
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(1, 201))
    );
    assert_eq!(readable_ids(&mut log).await, vec![log_id(1, 201)]);
}

// Goal: a truncate deletes from its index to the last stored entry, not to the end of the
// index space (such a tombstone overlaps every table file flushed after it); the entries
// rewritten after it read back in their new term, also after a reopen, and a truncate past
// the last entry changes nothing.
#[tokio::test]
async fn t13_truncate_deletes_up_to_the_last_entry_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    let expected: Vec<LogId> = [ids_in_term(1, 1..=5), ids_in_term(2, 6..=8)].concat();
    {
        let mut log = LogStore::open(&path).unwrap();
        log.blocking_append(puts(1..=10)).await.unwrap();
        log.truncate(log_id(1, 6)).await.unwrap();
        log.blocking_append(puts_in_term(2, 6..=8)).await.unwrap();
        log.flush_and_compact_for_tests(1, 10).unwrap();
        // One file, moved down whole: its range ends where the tombstone does.
        assert_eq!(
            table_ranges(&log),
            vec![(1, 11)],
            "the tombstone ends after the last stored entry"
        );
        assert_eq!(readable_ids(&mut log).await, expected);
    }
    let mut log = LogStore::open(&path).unwrap();
    let syncs = log.wal_syncs();
    log.truncate(log_id(2, 20)).await.unwrap();
    assert_eq!(log.wal_syncs(), syncs, "nothing to delete, nothing written");
    assert_eq!(readable_ids(&mut log).await, expected);
    assert_eq!(
        log.get_log_state().await.unwrap().last_log_id,
        Some(log_id(2, 8))
    );
}

// Goal: a leader change's truncate and a later purge together never bring back an entry of the
// old term: the stored old entries past the rewritten ones stay hidden after a purge below them
// (which drops the table files it may), after new entries are appended, after the files are
// compacted together, and after a reopen; the last log id is always a live one.
#[tokio::test]
async fn t13_purge_after_truncate_never_uncovers_old_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("log");
    {
        let mut log = LogStore::open(&path).unwrap();
        // Term 1's entries in two table files below level 0 (1-25, 26-50).
        log.blocking_append(puts(1..=25)).await.unwrap();
        log.flush_and_compact_for_tests(1, 25).unwrap();
        log.blocking_append(puts(26..=50)).await.unwrap();
        log.flush_and_compact_for_tests(26, 50).unwrap();
        // A new leader truncates at 41 and rewrites 41-45; the tombstone and the new entries
        // are flushed to level 0 only, so the old 41-50 stay stored below them.
        log.truncate(log_id(1, 41)).await.unwrap();
        log.blocking_append(puts_in_term(2, 41..=45)).await.unwrap();
        log.flush_for_tests().unwrap();
        let ranges = table_ranges(&log);
        assert!(
            ranges.contains(&(1, 25)) && ranges.contains(&(26, 50)),
            "term 1's files are still stored: {:?}",
            log.table_files_for_tests().unwrap()
        );

        log.purge(log_id(2, 45)).await.unwrap();
        assert!(
            !table_ranges(&log).contains(&(1, 25)),
            "the file of purged entries only is dropped"
        );
        assert!(readable_ids(&mut log).await.is_empty());
        let state = log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(2, 45)), "not term 1's 50");

        log.blocking_append(puts_in_term(2, 46..=47)).await.unwrap();
        assert_eq!(readable_ids(&mut log).await, ids_in_term(2, 46..=47));
        log.flush_and_compact_for_tests(1, 60).unwrap();
        assert_eq!(readable_ids(&mut log).await, ids_in_term(2, 46..=47));
    }
    let mut log = LogStore::open(&path).unwrap();
    assert_eq!(readable_ids(&mut log).await, ids_in_term(2, 46..=47));
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_purged_log_id, Some(log_id(2, 45)));
    assert_eq!(state.last_log_id, Some(log_id(2, 47)));
    assert!(
        log.try_get_log_entries(48..=50).await.unwrap().is_empty(),
        "term 1's 48-50 stay deleted"
    );
}

/// The names of the files in `dir`.
fn file_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// A log entry at `index` (term 1) putting `acme/orders/k{index}` = `value`.
fn put_at(index: u64, value: &[u8]) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(put_order(&format!("k{index}"), value)),
    }
}

/// Appends puts of `value(i)` at indexes 1..=last, 16 to an append.
async fn append_puts(log: &mut LogStore, last: u64, value: impl Fn(u64) -> Vec<u8>) {
    for first in (1..=last).step_by(16) {
        let batch: Vec<Entry> = (first..=last.min(first + 15))
            .map(|i| put_at(i, &value(i)))
            .collect();
        log.blocking_append(batch).await.unwrap();
    }
}

/// Reopens the log in `dir` after checking that table files were written there, and asserts
/// it holds the puts of `value(i)` at 1..=last, byte for byte, and nothing after.
async fn assert_reopened_log_holds(
    dir: &std::path::Path,
    last: u64,
    value: impl Fn(u64) -> Vec<u8>,
) {
    let tables = file_names(dir)
        .iter()
        .filter(|n| n.ends_with(".sst"))
        .count();
    assert!(tables > 0, "the test wrote too little for a memtable flush");
    let mut log = LogStore::open(dir).unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(1, last)));
    let entries = log.try_get_log_entries(1..=last).await.unwrap();
    assert_eq!(entries.len() as u64, last);
    for (i, e) in (1..=last).zip(&entries) {
        assert_eq!(e.log_id, log_id(1, i));
        match &e.payload {
            EntryPayload::Normal(Command::PutRecord { value: v, .. }) => {
                assert!(*v == value(i), "entry {i} came back changed")
            }
            other => panic!("entry {i} came back as {other:?}"),
        }
    }
}

/// The OPTIONS file RocksDB wrote when it opened the database in `dir`.
fn options_at_open(dir: &std::path::Path) -> String {
    file_names(dir)
        .into_iter()
        .find(|n| n.starts_with("OPTIONS-"))
        .map(|n| std::fs::read_to_string(dir.join(n)).unwrap())
        .expect("RocksDB writes an OPTIONS file at open")
}

// Goal: the log writes its write-ahead log over retired files (recycling, for cheaper
// fsyncs); a reopen after that still finds every acknowledged entry, byte for byte, and
// nothing past the last one (a recycled file holds an older log's records after the new tail).
#[tokio::test]
async fn t13_recycled_log_files_lose_nothing_across_reopen() {
    // 72 MiB in entries of 64 KiB: the log's memtable (16 MiB) fills several times, so its
    // write-ahead log files are retired, recycled and written over, and its table files
    // written (with direct I/O where supported), before the reopen.
    const ENTRIES: u64 = 1152;
    let value = |i: u64| -> Vec<u8> {
        let mut v = vec![(i % 251) as u8; 64 * 1024];
        v[..8].copy_from_slice(&i.to_be_bytes());
        v
    };
    let dir = tempfile::tempdir().unwrap();
    let log_dir = dir.path().join("log");
    {
        let mut log = LogStore::open(&log_dir).unwrap();
        // Flushed table files are written with direct I/O wherever the filesystem takes it, so
        // the read-back below covers them there. A probe of its own on the same filesystem
        // agrees with the store's choice, RocksDB got that setting, and the probe left nothing
        // behind.
        assert_eq!(
            log.direct_io(),
            escrow::store::log::direct_io_supported(dir.path())
        );
        let setting = format!("use_direct_io_for_flush_and_compaction={}", log.direct_io());
        assert!(
            options_at_open(&log_dir).contains(&setting),
            "OPTIONS lacks {setting}"
        );
        let probe = log_dir.join(escrow::store::log::DIRECT_IO_PROBE_FILE);
        assert!(!probe.exists(), "the probe left {} behind", probe.display());
        append_puts(&mut log, ENTRIES, value).await;
    }
    let recycled = std::fs::read_to_string(log_dir.join("LOG"))
        .unwrap()
        .contains("to recycle list");
    assert!(
        recycled,
        "the test wrote too little for RocksDB to recycle a log file"
    );
    assert_reopened_log_holds(&log_dir, ENTRIES, value).await;
}

/// A ramfs mounted on a temporary directory (a filesystem without `O_DIRECT`; tmpfs takes it
/// since Linux 6.6), unmounted when dropped. Mounting needs root and the right to mount (a
/// container may deny it even to root): where it is refused, the test says "NOT RUN" on stderr
/// and `None` comes back.
struct Ramfs(tempfile::TempDir);

impl Ramfs {
    fn mount() -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "ramfs", "-o", "mode=0700", "ramfs"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Ramfs(dir)),
            Ok(out) => {
                let why = String::from_utf8_lossy(&out.stderr).trim().to_string();
                eprintln!(
                    "NOT RUN: mounting a ramfs (a filesystem without O_DIRECT) failed: {why}"
                );
                None
            }
            Err(e) => {
                eprintln!("NOT RUN: cannot run mount to mount a ramfs: {e}");
                None
            }
        }
    }

    fn path(&self) -> &std::path::Path {
        self.0.path()
    }
}

impl Drop for Ramfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.path())
            .status();
    }
}

// Goal: on a filesystem without `O_DIRECT` (ramfs), the log and the state machine open with
// buffered flushes and compactions instead of failing, and lose nothing across a reopen.
#[tokio::test]
async fn t13_without_direct_io_the_stores_fall_back_and_lose_nothing() {
    use escrow::store::log::direct_io_supported;
    let Some(ramfs) = Ramfs::mount() else { return };
    let dir = ramfs.path();
    assert!(
        !direct_io_supported(dir),
        "{} takes O_DIRECT here, so it cannot stand for a filesystem without it",
        dir.display()
    );

    // The log: 24 MiB of 64 KiB entries, more than its 16 MiB memtable, then a flush of the
    // rest, so table files are written through the page cache before the reopen.
    const ENTRIES: u64 = 384;
    let value = |i: u64| noise(i, 64 * 1024);
    let log_dir = dir.join("log");
    {
        let mut log = LogStore::open(&log_dir).unwrap();
        assert!(!log.direct_io());
        assert!(options_at_open(&log_dir).contains("use_direct_io_for_flush_and_compaction=false"));
        append_puts(&mut log, ENTRIES, value).await;
        log.flush_for_tests().unwrap();
    }
    assert_reopened_log_holds(&log_dir, ENTRIES, value).await;

    // The state machine: a snapshot flushes its memtable (keys to a table file, the values
    // to a blob file) through the page cache.
    let sm_dir = dir.join("state");
    let big = |i: u64| noise(1_000 + i, 4096);
    {
        let mut sm = StateMachineStore::open(&sm_dir).unwrap();
        sm.apply(puts(1..=20)).await.unwrap();
        let commands = (0..8)
            .map(|i| put_order(&format!("big{i}"), &big(i)))
            .collect();
        apply_batch(&mut sm, 21, commands).await;
        assert_blob_file_in(&build_snapshot(&mut sm).await);
    }
    assert!(newest_sm_options(&sm_dir).contains("use_direct_io_for_flush_and_compaction=false"));
    let sm = StateMachineStore::open(&sm_dir).unwrap();
    let reader = sm.reader();
    for i in 2..=20 {
        assert_eq!(
            live(&reader, &format!("k{i}")),
            Some(format!("value-k{i}").into_bytes())
        );
    }
    for i in 0..8 {
        assert_eq!(live(&reader, &format!("big{i}")), Some(big(i)));
    }
    drop((sm, reader));
}

// Goal: a snapshot built from a checkpoint installs on another store with the same records
// (values kept in blob files included), and survives that store's restart.
#[tokio::test]
async fn t14_snapshot_transfer_carries_records_across_restart() {
    let leader_dir = tempfile::tempdir().unwrap();
    let mut leader = StateMachineStore::open(leader_dir.path()).unwrap();
    let entries: Vec<Entry> = puts(1..=20);
    leader.apply(entries).await.unwrap();
    // A value this long is kept in a RocksDB blob file, which the snapshot must carry too.
    let big = noise(21, 4096);
    apply_batch(&mut leader, 21, vec![put_order("big", &big)]).await;
    let snapshot = build_snapshot(&mut leader).await;
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 21)));
    assert_blob_file_in(&snapshot);
    let (follower_dir, follower) = install_on_new_store(snapshot).await;
    assert_eq!(follower.reader().applied_index(), 21);
    drop(follower);
    let follower = StateMachineStore::open(follower_dir.path()).unwrap();
    let reader = follower.reader();
    assert_eq!(reader.applied_index(), 21);
    assert_eq!(live(&reader, "big"), Some(big), "big from the snapshot");
    for i in 2..=20 {
        assert_eq!(
            live(&reader, &format!("k{i}")),
            Some(format!("value-k{i}").into_bytes()),
            "k{i} from the snapshot"
        );
    }
}

/// Asserts that `snapshot` carries a RocksDB blob file (where values of 256 bytes or more
/// are kept).
fn assert_blob_file_in(snapshot: &escrow::raft::Snapshot) {
    let files = &snapshot.snapshot.files;
    assert!(
        files.iter().any(|f| f.name.ends_with(".blob")),
        "no blob file in {files:?}"
    );
}

/// Builds a snapshot of `sm`.
async fn build_snapshot(sm: &mut StateMachineStore) -> escrow::raft::Snapshot {
    use openraft::RaftSnapshotBuilder;
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .unwrap()
}

/// Installs `snapshot` on a new store in a temporary directory.
async fn install_on_new_store(
    snapshot: escrow::raft::Snapshot,
) -> (tempfile::TempDir, StateMachineStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let meta = snapshot.meta.clone();
    sm.install_snapshot(&meta, snapshot.snapshot).await.unwrap();
    (dir, sm)
}

/// Installs `snapshot` on a new store as one received over the network would be: its files
/// copied into the store's incoming area, their hashes as sent.
async fn receive_on_new_store(
    snapshot: escrow::raft::Snapshot,
) -> (tempfile::TempDir, StateMachineStore, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let incoming = sm.begin_receiving_snapshot().await.unwrap();
    for f in &snapshot.snapshot.files {
        std::fs::copy(
            snapshot.snapshot.path.join(&f.name),
            incoming.path.join(&f.name),
        )
        .unwrap();
    }
    let received = Box::new(escrow::store::SnapshotDir {
        path: incoming.path.clone(),
        files: snapshot.snapshot.files.clone(),
    });
    sm.install_snapshot(&snapshot.meta, received).await.unwrap();
    (dir, sm, incoming.path)
}

/// The bytes of the files in `files` that a snapshot sharing files with `earlier` has to read
/// to hash: every file but the table and blob files `earlier` lists too.
fn bytes_not_shared(
    files: &[escrow::store::SnapshotFileInfo],
    earlier: &[escrow::store::SnapshotFileInfo],
) -> u64 {
    let immutable = |n: &str| n.ends_with(".sst") || n.ends_with(".blob");
    files
        .iter()
        .filter(|f| !(immutable(&f.name) && earlier.iter().any(|e| e.name == f.name)))
        .map(|f| f.size)
        .sum()
}

// Goal: a snapshot reads only the files written since the last one to hash them (a checkpoint
// hard-links the rest, whose hashes are known), and its list of hashes is still exactly what
// hashing every file gives; a follower installing a snapshot reuses the hashes it verified on
// arrival. Hashing every file at every snapshot would read the whole state machine each time.
#[tokio::test]
async fn t14_snapshots_hash_only_the_files_written_since_the_last() {
    use escrow::store::sm::hash_dir;
    let (leader_dir, mut leader) = store_with_tenant().await;
    let mut index = 2;
    for chunk in 0..4u64 {
        let commands = (0..50u64)
            .map(|i| put_order(&format!("k{chunk}-{i}"), &noise(chunk * 50 + i, 4096)))
            .collect();
        leader.apply([timed(index, 2_000, commands)]).await.unwrap();
        index += 1;
    }
    let reader = leader.reader();
    let first = build_snapshot(&mut leader).await;
    let total = |files: &[escrow::store::SnapshotFileInfo]| files.iter().map(|f| f.size).sum();
    let first_total: u64 = total(&first.snapshot.files);
    assert_eq!(
        reader.snapshot_bytes_hashed(),
        first_total,
        "the first snapshot reads every file"
    );
    assert!(first_total > 800_000, "{first_total}");

    leader
        .apply([timed(
            index,
            3_000,
            vec![put_order("late", &noise(999, 4096))],
        )])
        .await
        .unwrap();
    let second = build_snapshot(&mut leader).await;
    let hashed = reader.snapshot_bytes_hashed() - first_total;
    let fresh = hash_dir(&second.snapshot.path, None).unwrap().files;
    assert_eq!(
        second.snapshot.files, fresh,
        "reused hashes are the files' hashes"
    );
    assert_eq!(
        hashed,
        bytes_not_shared(&fresh, &first.snapshot.files),
        "only files the first snapshot does not hold are read"
    );
    assert!(
        hashed * 4 < total(&fresh),
        "{hashed} of {} bytes read",
        total(&fresh)
    );

    // A follower installing a received snapshot reads only the files it must write itself,
    // and leaves nothing of the incoming copy behind.
    let sent = second.snapshot.files.clone();
    let (follower_dir, mut follower, incoming) = receive_on_new_store(second).await;
    assert!(!incoming.exists(), "{} left behind", incoming.display());
    let published = follower.get_current_snapshot().await.unwrap().unwrap();
    let fresh = hash_dir(&published.snapshot.path, None).unwrap().files;
    assert_eq!(published.snapshot.files, fresh);
    assert_eq!(
        follower.reader().snapshot_bytes_hashed(),
        bytes_not_shared(&fresh, &sent)
    );
    assert_eq!(
        live(&follower.reader(), "late"),
        Some(noise(999, 4096)),
        "the installed state serves the last write"
    );
    drop((leader_dir, follower_dir));
}

// Goal: a snapshot is taken when it is built, beside the applies (not when Raft asked for the
// builder, in the task that applies): entries applied in between are in it, its meta names
// exactly the state it holds (an install checks the two agree), and another store installs it
// with every record.
#[tokio::test]
async fn t14_a_snapshot_holds_what_was_applied_until_it_was_built() {
    use openraft::RaftSnapshotBuilder;
    let (_dir, mut leader) = store_with_tenant().await;
    leader
        .apply([timed(2, 2_000, vec![put_order("early", b"1")])])
        .await
        .unwrap();
    let mut builder = leader.get_snapshot_builder().await;
    leader
        .apply([timed(3, 2_000, vec![put_order("late", &noise(3, 4096))])])
        .await
        .unwrap();
    let snapshot = builder.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(1, 3)));
    assert!(
        builder.build_snapshot().await.is_err(),
        "a builder builds once"
    );

    let (_follower_dir, follower) = install_on_new_store(snapshot).await;
    let reader = follower.reader();
    assert_eq!(reader.applied_index(), 3);
    assert_eq!(live(&reader, "early"), Some(b"1".to_vec()));
    assert_eq!(live(&reader, "late"), Some(noise(3, 4096)));
}

// Goal: a snapshot built while entries are being applied names exactly the state it holds
// (an install checks the two agree) and holds every entry up to it, none after. The build is
// held after its checkpoint while applies go on, so entries applied between its checkpoint
// and its publication are certain, not left to timing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t14_a_snapshot_built_during_applies_names_the_state_it_holds() {
    use openraft::RaftSnapshotBuilder;
    // Entries applied after the build's checkpoint while it is held, and at most in all.
    const AFTER_CHECKPOINT: u64 = 20;
    const ENTRIES_MAX: u64 = 20_000;
    let (dir, leader) = store_with_tenant().await;
    let (hold, held) = tokio::sync::watch::channel(true);
    let mut leader = leader.with_snapshot_builds_held(held);
    leader
        .apply([timed(2, 2_000, vec![put_order("k2", &noise(2, 2048))])])
        .await
        .unwrap();
    let mut builder = leader.get_snapshot_builder().await;
    let build = tokio::spawn(async move { builder.build_snapshot().await });
    let mut applied = 2;
    let mut apply_next = async |applied: &mut u64| {
        *applied += 1;
        let key = format!("k{applied}");
        leader
            .apply([timed(
                *applied,
                2_000,
                vec![put_order(&key, &noise(*applied, 2048))],
            )])
            .await
            .unwrap();
    };
    // The build's checkpoint is in place once RocksDB renamed it from `db.tmp` to `db` in
    // the build's `snapshots/tmp-N` directory.
    let snapshots = dir.path().join("snapshots");
    let checkpoint_taken = || {
        std::fs::read_dir(&snapshots)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
            .any(|e| e.path().join("db").is_dir())
    };
    let mut after_checkpoint = 0;
    while after_checkpoint < AFTER_CHECKPOINT && applied < ENTRIES_MAX {
        apply_next(&mut applied).await;
        if checkpoint_taken() {
            after_checkpoint += 1;
        }
    }
    assert_eq!(
        after_checkpoint,
        AFTER_CHECKPOINT,
        "no checkpoint appeared in {} within {ENTRIES_MAX} entries",
        snapshots.display()
    );
    assert!(!build.is_finished(), "a held build finished");
    let applied_while_held = applied;
    hold.send_replace(false);
    let mut after_build = 0;
    while applied < ENTRIES_MAX && after_build < 20 {
        apply_next(&mut applied).await;
        if build.is_finished() {
            after_build += 1;
        }
    }
    let snapshot = build.await.unwrap().unwrap();
    let last = snapshot.meta.last_log_id.expect("a last log id").index;
    assert!(
        last < applied_while_held,
        "the build's checkpoint (at {last}) saw every entry applied while it was held \
         ({applied_while_held}): none was applied between checkpoint and publication"
    );
    let (_follower_dir, follower) = install_on_new_store(snapshot).await;
    let reader = follower.reader();
    assert_eq!(reader.applied_index(), last);
    for i in 2..=applied {
        let key = format!("k{i}");
        let expected = (i <= last).then(|| noise(i, 2048));
        assert_eq!(
            live(&reader, &key),
            expected,
            "{key} in a snapshot at {last}"
        );
    }
}

// Goal: a hash is reused only for a table or blob file that is the very same file (same
// inode) as a known one: a different file with the same name and size (another database's
// numbering, a rewritten copy) is read, and so is a shared file of a kind RocksDB appends to.
#[test]
fn t14_hash_reuse_needs_the_same_file() {
    use escrow::store::sm::{hash_dir, KnownHashes};
    let known_dir = tempfile::tempdir().unwrap();
    std::fs::write(known_dir.path().join("000007.sst"), b"table A").unwrap();
    std::fs::write(known_dir.path().join("MANIFEST-000005"), b"manifest").unwrap();
    let known = hash_dir(known_dir.path(), None).unwrap();
    assert_eq!(known.bytes_hashed, 15);
    let known_hashes = KnownHashes {
        dir: known_dir.path().to_path_buf(),
        files: known.files.clone(),
    };

    let linked = tempfile::tempdir().unwrap();
    for name in ["000007.sst", "MANIFEST-000005"] {
        std::fs::hard_link(known_dir.path().join(name), linked.path().join(name)).unwrap();
    }
    let reused = hash_dir(linked.path(), Some(&known_hashes)).unwrap();
    assert_eq!(reused.files, known.files);
    assert_eq!(
        reused.bytes_hashed, 8,
        "the manifest is read, the table is not"
    );

    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("000007.sst"), b"table B").unwrap();
    let hashed = hash_dir(other.path(), Some(&known_hashes)).unwrap();
    assert_eq!(hashed.bytes_hashed, 7);
    assert_eq!(
        hashed.files[0].blake3,
        *blake3::hash(b"table B").as_bytes(),
        "same name and size, another file: its own hash"
    );
}

// Goal: commands batched into one entry apply in order, see each other's effects, get one
// outcome each, and share the entry's index as revision.
#[tokio::test]
async fn t15_batched_commands_apply_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let path = |k: &str| RecordPath::parse("acme", "orders", k).unwrap();
    let batch = vec![
        Command::AddTenant {
            tenant: TenantId::parse("acme").unwrap(),
        },
        Command::PutRecord {
            path: path("a"),
            value: b"1".to_vec(),
        },
        Command::DeleteRecord { path: path("a") },
        Command::PutRecord {
            path: path("b"),
            value: b"2".to_vec(),
        },
        Command::DeleteRecord {
            path: path("missing"),
        },
        Command::PutRecord {
            path: path("c"),
            value: Vec::new(),
        },
        Command::Batch(Vec::new()),
    ];
    let inner = apply_batch(&mut sm, 1, batch).await;
    assert!(matches!(inner[0], Outcome::Tenant(_)));
    let inner = &inner[1..];
    assert_eq!(inner[0], Outcome::Written { revision: 1 });
    assert_eq!(
        inner[1],
        Outcome::Deleted {
            revision: 1,
            existed: true
        }
    );
    assert_eq!(inner[2], Outcome::Written { revision: 1 });
    assert_eq!(
        inner[3],
        Outcome::Deleted {
            revision: 1,
            existed: false
        }
    );
    assert!(
        matches!(inner[4], Outcome::Rejected { .. }),
        "empty value is rejected"
    );
    assert!(
        matches!(inner[5], Outcome::Rejected { .. }),
        "nested batch is rejected"
    );
    let reader = sm.reader();
    assert_eq!(live(&reader, "a"), None);
    assert_eq!(live(&reader, "b"), Some(b"2".to_vec()));
    assert!(reader.get_record(&path("c")).unwrap().is_none());
}

// Goal: checkpoint commands batched into one entry share its index: it is kept once, holds the
// roots after the last of them, is dropped once CHECKPOINTS_KEPT newer ones exist, and deep
// verify finds every kept checkpoint in order all the while.
#[tokio::test]
async fn t15_batched_checkpoints_share_their_entry_index() {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let path = |k: &str| RecordPath::parse("acme", "orders", k).unwrap();
    let put = |k: &str| Command::PutRecord {
        path: path(k),
        value: b"v".to_vec(),
    };
    let batch = vec![
        Command::AddTenant {
            tenant: TenantId::parse("acme").unwrap(),
        },
        put("a"),
        Command::Checkpoint,
        put("b"),
        Command::Checkpoint,
    ];
    let inner = apply_batch(&mut sm, 1, batch).await;
    assert_eq!(inner[2], Outcome::Checkpoint { index: 1 });
    assert_eq!(inner[4], Outcome::Checkpoint { index: 1 });
    let reader = sm.reader();
    let first = reader.checkpoint(1).unwrap().expect("checkpoint 1");
    assert_eq!(first.roots.len(), 1);
    assert_eq!(
        first.roots[0].1.leaves, 2,
        "the last checkpoint's roots stand"
    );
    assert!(reader
        .deep_check(None)
        .unwrap()
        .checkpoint_faults
        .is_empty());

    let kept = escrow::store::sm::CHECKPOINTS_KEPT as u64;
    for index in 2..=kept + 1 {
        sm.apply([Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(Command::Checkpoint),
        }])
        .await
        .unwrap();
        let check = reader.deep_check(None).unwrap();
        assert!(
            check.checkpoint_faults.is_empty(),
            "after checkpoint {index}: {:?}",
            check.checkpoint_faults
        );
    }
    // The kept-th newer checkpoint drops it, and on the way deep verify never found an index
    // listed twice or listed but already dropped.
    assert!(reader.checkpoint(1).unwrap().is_none());
    assert!(reader.checkpoint(2).unwrap().is_some());
}

// Goal: a node that died between switching to an installed snapshot and republishing it has a
// state machine ahead of both its log and its newest snapshot; at start that stale snapshot is
// dropped (Raft then rebuilds one that connects to the log). A normal restart keeps it.
#[tokio::test]
async fn t16_interrupted_snapshot_install_drops_the_stale_snapshot() {
    let leader_dir = tempfile::tempdir().unwrap();
    let follower_dir = tempfile::tempdir().unwrap();
    let mut leader = StateMachineStore::open(leader_dir.path()).unwrap();
    leader.apply(puts(1..=20)).await.unwrap();
    let snap20 = build_snapshot(&mut leader).await;

    let mut follower = StateMachineStore::open(follower_dir.path()).unwrap();
    follower.apply(puts(1..=5)).await.unwrap();
    build_snapshot(&mut follower).await;
    let meta = snap20.meta.clone();
    follower
        .install_snapshot(&meta, snap20.snapshot)
        .await
        .unwrap();
    drop(follower);
    // Simulate the crash window: the republished snapshot of the installed state is missing.
    let snaps = follower_dir.path().join("snapshots");
    for e in std::fs::read_dir(&snaps).unwrap() {
        let p = e.unwrap().path();
        let meta_bytes = std::fs::read(p.join("meta")).unwrap();
        if meta_bytes
            .windows(meta.snapshot_id.len())
            .any(|w| w == meta.snapshot_id.as_bytes())
        {
            std::fs::remove_dir_all(p).unwrap();
        }
    }
    let mut follower = StateMachineStore::open(follower_dir.path()).unwrap();
    assert_eq!(follower.reader().applied_index(), 20);
    let stale = follower
        .get_current_snapshot()
        .await
        .unwrap()
        .expect("the index-5 snapshot");
    assert_eq!(stale.meta.last_log_id.map(|l| l.index), Some(5));
    // Its log ends at 5 (it had only 5 entries): ahead of the log, so the snapshot goes.
    assert!(follower.reconcile_with_log(5));
    assert!(follower.get_current_snapshot().await.unwrap().is_none());

    // A normal restart (log at or beyond the applied index) keeps its snapshot.
    drop(leader);
    let leader = StateMachineStore::open(leader_dir.path()).unwrap();
    assert!(!leader.reconcile_with_log(20));
}

/// The record `acme/orders/{key}`.
fn order(key: &str) -> RecordPath {
    RecordPath::parse("acme", "orders", key).unwrap()
}

/// A log entry (term 1) carrying `commands` stamped at `at_ms`.
fn timed(index: u64, at_ms: u64, commands: Vec<Command>) -> Entry {
    Entry {
        log_id: log_id(1, index),
        payload: EntryPayload::Normal(Command::Timed { at_ms, commands }),
    }
}

/// Writes `value` to `acme/orders/{key}`.
fn put_order(key: &str, value: &[u8]) -> Command {
    Command::PutRecord {
        path: order(key),
        value: value.to_vec(),
    }
}

// Goal: history expiry removes exactly the versions that were replaced before the cutoff
// (never a record's latest, so a deleted record keeps its tombstone), a later expiry goes on
// from there, and the result is the same whether the entries were applied one by one or
// together in one apply call (replicas batch entries differently, so expiry must read staged
// and stored replacements alike).
#[tokio::test]
async fn t17_history_expiry_is_exact_and_independent_of_batching() {
    let path = order;
    let put = |k: &str, v: &str| put_order(k, v.as_bytes());
    let entries = vec![
        timed(
            1,
            1_000,
            vec![Command::AddTenant {
                tenant: TenantId::parse("acme").unwrap(),
            }],
        ),
        timed(2, 1_000, vec![put("a", "1"), put("b", "1"), put("c", "1")]),
        timed(
            3,
            2_000,
            vec![put("a", "2"), Command::DeleteRecord { path: path("b") }],
        ),
        timed(4, 3_000, vec![put("a", "3")]),
        timed(5, 4_000, vec![Command::ExpireHistory { before_ms: 2_500 }]),
        timed(6, 4_000, vec![put("c", "2")]),
        timed(7, 5_000, vec![Command::ExpireHistory { before_ms: 3_500 }]),
    ];
    let mut results = Vec::new();
    for together in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        let outcomes = if together {
            sm.apply(entries.clone()).await.unwrap()
        } else {
            let mut all = Vec::new();
            for e in entries.clone() {
                all.extend(sm.apply([e]).await.unwrap());
            }
            all
        };
        let expired = |i: usize| match &outcomes[i] {
            Outcome::Batch(o) => o[0].clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            expired(4),
            Outcome::Expired {
                removed: 2,
                more: false
            },
            "a@2 and b@2, together: {together}"
        );
        assert_eq!(
            expired(6),
            Outcome::Expired {
                removed: 1,
                more: false
            },
            "a@3 (replaced at 3,000), not c@2 (replaced at 4,000), together: {together}"
        );
        let reader = sm.reader();
        let revisions = |k: &str| -> Vec<(u64, bool)> {
            reader
                .record_history(&path(k), None, 100, 1 << 20)
                .unwrap()
                .into_iter()
                .map(|(_, v)| (v.revision, v.is_tombstone()))
                .collect()
        };
        let kept = (revisions("a"), revisions("b"), revisions("c"));
        // a@2 was replaced before the first cutoff (by a@3 at 2,000): gone. a@3 was current
        // until 3,000, inside the first period (kept then, so "as of" reads in the period
        // still found it) and before the second cutoff: gone.
        assert_eq!(kept.0, vec![(4, false)]);
        assert_eq!(kept.1, vec![(3, true)], "b keeps its tombstone");
        assert_eq!(
            kept.2,
            vec![(6, false), (2, false)],
            "c@2 was replaced at 4,000, inside the second period"
        );
        assert_eq!(live(&reader, "a"), Some(b"3".to_vec()));
        results.push(kept);
    }
    assert_eq!(results[0], results[1]);
}

/// `len` bytes that do not compress (blake3's output stream for `seed`): values kept in blob
/// files as customer data would be, not shrunk to nothing by LZ4.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_be_bytes())
        .finalize_xof()
        .fill(&mut out);
    out
}

/// A fresh state machine in a temporary directory with tenant `acme` registered (index 1,
/// at 1,000 ms).
async fn store_with_tenant() -> (tempfile::TempDir, StateMachineStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let tenant = Command::AddTenant {
        tenant: TenantId::parse("acme").unwrap(),
    };
    sm.apply([timed(1, 1_000, vec![tenant])]).await.unwrap();
    (dir, sm)
}

/// Expires, entry by entry until done, the versions replaced before `before_ms`; returns the
/// next free index and how many versions went.
async fn expire_all(sm: &mut StateMachineStore, mut index: u64, before_ms: u64) -> (u64, u64) {
    let mut removed = 0;
    loop {
        let outcome = expire_before(sm, index, before_ms).await;
        index += 1;
        match outcome {
            Outcome::Expired { removed: n, more } => {
                removed += n;
                if !more {
                    return (index, removed);
                }
            }
            other => panic!("{other:?}"),
        }
    }
}

/// The newest `OPTIONS-*` file of the state machine's database under `root` (generation 0).
fn newest_sm_options(root: &std::path::Path) -> String {
    let db = root.join("sm").join("0");
    let newest = file_names(&db)
        .iter()
        .filter_map(|n| n.strip_prefix("OPTIONS-")?.parse::<u64>().ok())
        .max()
        .expect("an OPTIONS file");
    std::fs::read_to_string(db.join(format!("OPTIONS-{newest:06}"))).unwrap()
}

// Goal: values (history versions included) live in blob files, and the space of expired
// versions comes back. Expiry's garbage adds up across checks until it is worth a collection
// (here two expiries, each under the threshold alone, with a restart between them: the
// estimate of expired bytes is stored, and a snapshot carries it); the collection leaves
// RocksDB's blob files at about the live values' size, switches collection off again, lowers
// the estimate on disk too, and every live value reads back byte for byte, also after a
// reopen.
#[tokio::test]
async fn t19_expired_history_gives_its_blob_space_back() {
    use escrow::store::sm::BLOB_GC_GARBAGE_PERCENT;
    const RECORDS: u64 = 300;
    const VALUE: usize = 4096;
    let (dir, mut sm) = store_with_tenant().await;
    let value = |round: u64, k: u64| noise(round * RECORDS + k, VALUE);
    let half = RECORDS / 2;
    // Round 1 writes every record at 2,000; round 2 replaces the first half at 3,000 and the
    // second at 3,500; round 3 replaces all at 5,000.
    let round = |index: u64, at_ms: u64, round: u64, keys: std::ops::Range<u64>| {
        let puts = keys
            .map(|k| put_order(&format!("k{k}"), &value(round, k)))
            .collect();
        timed(index, at_ms, puts)
    };
    sm.apply([
        round(2, 2_000, 1, 0..RECORDS),
        round(3, 3_000, 2, 0..half),
        round(4, 3_500, 2, half..RECORDS),
        round(5, 5_000, 3, 0..RECORDS),
    ])
    .await
    .unwrap();
    // A snapshot's checkpoint flushes the memtable: the values land in blob files.
    build_snapshot(&mut sm).await;
    let reader = sm.reader();
    let values = RECORDS * VALUE as u64;
    let all = reader.blob_space().unwrap();
    assert!(
        all.bytes >= 3 * values,
        "three rounds in blob files: {all:?}"
    );
    assert_eq!(
        reader.collect_blob_garbage().unwrap(),
        None,
        "nothing expired, no garbage: no collection"
    );
    // The first half's round-1 versions: a sixth of the blob bytes, under the threshold.
    assert!(100 * (values / 2) < BLOB_GC_GARBAGE_PERCENT * all.bytes);
    let (index, removed) = expire_all(&mut sm, 6, 3_200).await;
    assert_eq!(removed, half);
    assert_eq!(
        reader.collect_blob_garbage().unwrap(),
        None,
        "not yet worth it"
    );
    // The estimate behind that sum survives a restart and travels with a snapshot, whose blob
    // files it describes.
    let expired = reader.expired_blob_bytes();
    assert!(expired >= values / 2, "{expired} bytes expired");
    let (_other_dir, other) = install_on_new_store(build_snapshot(&mut sm).await).await;
    assert_eq!(
        other.reader().expired_blob_bytes(),
        expired,
        "after an install"
    );
    drop((reader, sm));
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let reader = sm.reader();
    assert_eq!(reader.expired_blob_bytes(), expired, "after a restart");
    // The second half's: together a third, over the threshold.
    let (_, removed) = expire_all(&mut sm, index, 3_800).await;
    assert_eq!(removed, RECORDS - half);
    let c = reader
        .collect_blob_garbage()
        .unwrap()
        .expect("the two expiries together are worth a collection");
    assert!(
        c.before.garbage_bytes >= values,
        "both expiries counted as garbage: {c:?}"
    );
    assert!(
        c.after.bytes >= 2 * values && c.after.bytes < 2 * values + values / 2,
        "about the live values (rounds 2 and 3) left: {c:?}"
    );
    assert_eq!(c.after.garbage_bytes, 0, "{c:?}");
    assert_eq!(
        reader.expired_blob_bytes(),
        0,
        "lowered by the compaction that counted it"
    );
    let options = newest_sm_options(dir.path());
    assert!(
        options.contains("enable_blob_garbage_collection=false")
            && !options.contains("enable_blob_garbage_collection=true"),
        "collection is off again"
    );
    let check = |reader: &escrow::store::SmReader| {
        for k in 0..RECORDS {
            let key = format!("k{k}");
            assert_eq!(live(reader, &key), Some(value(3, k)), "{key}");
            let history = reader
                .record_history(&order(&key), None, 10, 1 << 20)
                .unwrap();
            let kept: Vec<_> = history.into_iter().map(|(_, v)| v.value).collect();
            assert_eq!(kept, vec![Some(value(3, k)), Some(value(2, k))], "{key}");
        }
    };
    check(&reader);
    drop((reader, sm));
    let sm = StateMachineStore::open(dir.path()).unwrap();
    check(&sm.reader());
    assert_eq!(sm.reader().expired_blob_bytes(), 0, "lowered on disk too");
}

// Goal: a node stopping while a blob collection runs cuts it short without harm: the
// collection returns, collection is off in RocksDB's OPTIONS file, no collection starts
// after the stop, and after a reopen every live value reads back byte for byte.
#[tokio::test]
async fn t19_stopping_during_a_blob_collection_loses_nothing() {
    const RECORDS: u64 = 2000;
    const VALUE: usize = 4096;
    let (dir, mut sm) = store_with_tenant().await;
    let value = |round: u64, k: u64| noise(round * RECORDS + k, VALUE);
    // Every record written at 2,000 and replaced at 3,000, in entries of 100 puts.
    let mut index = 2;
    for (round, at_ms) in [(1, 2_000), (2, 3_000)] {
        for first in (0..RECORDS).step_by(100) {
            let puts = (first..first + 100)
                .map(|k| put_order(&format!("k{k}"), &value(round, k)))
                .collect();
            sm.apply([timed(index, at_ms, puts)]).await.unwrap();
            index += 1;
        }
    }
    // The snapshot's checkpoint flushes the memtable to table and blob files.
    build_snapshot(&mut sm).await;
    let (_, removed) = expire_all(&mut sm, index, 3_500).await;
    assert_eq!(removed, RECORDS);
    let reader = sm.reader();
    let collecting = {
        let reader = reader.clone();
        std::thread::spawn(move || reader.collect_blob_garbage().map_err(|e| e.to_string()))
    };
    // Give the collection a moment to start its compactions, then stop as shutdown does.
    // (On the development VM the stop lands in the collecting compaction: it returns with
    // the garbage where it was. Should it land before or after, what is asserted still holds.)
    std::thread::sleep(std::time::Duration::from_millis(20));
    reader.stop_background_work();
    collecting.join().unwrap().unwrap();
    assert_eq!(
        reader.collect_blob_garbage().unwrap(),
        None,
        "no collection after the stop"
    );
    let options = newest_sm_options(dir.path());
    assert!(
        !options.contains("enable_blob_garbage_collection=true"),
        "collection is off"
    );
    drop((reader, sm));
    let sm = StateMachineStore::open(dir.path()).unwrap();
    let reader = sm.reader();
    for k in 0..RECORDS {
        let key = format!("k{k}");
        assert_eq!(live(&reader, &key), Some(value(2, k)), "{key}");
    }
}

/// Applies one expiry entry (cutoff 10,000 ms, applied at 20,000) and returns its outcome.
async fn expire_step(sm: &mut StateMachineStore, index: u64) -> Outcome {
    expire_before(sm, index, 10_000).await
}

/// Applies one expiry entry with cutoff `before_ms` (applied at 20,000) and returns its
/// outcome.
async fn expire_before(sm: &mut StateMachineStore, index: u64, before_ms: u64) -> Outcome {
    let entry = timed(index, 20_000, vec![Command::ExpireHistory { before_ms }]);
    let outcomes = sm.apply([entry]).await.unwrap();
    let Outcome::Batch(o) = &outcomes[0] else {
        panic!("{outcomes:?}")
    };
    o[0].clone()
}

// Goal: expiry works in bounded steps that together remove exactly what one unbounded pass
// would: an entry stops at `EXPIRE_VERSIONS_MAX` removals, oldest replacement first, and says
// there is more; the next entry goes on where it stopped; the last says there is no more.
#[tokio::test]
async fn t18_history_expiry_goes_on_where_the_last_entry_stopped() {
    use escrow::ledger::EXPIRE_VERSIONS_MAX;
    let path = order;
    let put = |k: &str, v: String| put_order(k, v.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let mut entries = vec![timed(
        1,
        1_000,
        vec![Command::AddTenant {
            tenant: TenantId::parse("acme").unwrap(),
        }],
    )];
    // "a" and "c" get two versions more than one entry may remove, "b" two versions; each
    // entry writes a, then c, then b.
    let versions = EXPIRE_VERSIONS_MAX as u64 + 2;
    for v in 0..versions {
        let mut commands = vec![put("a", format!("a{v}")), put("c", format!("c{v}"))];
        if v < 2 {
            commands.push(put("b", format!("b{v}")));
        }
        entries.push(timed(2 + v, 2_000, commands));
    }
    sm.apply(entries).await.unwrap();
    let mut index = 2 + versions;
    let mut next_index = || {
        index += 1;
        index
    };
    let count = |sm: &StateMachineStore, k: &str| {
        sm.reader()
            .record_history(&path(k), None, 10_000, 1 << 24)
            .unwrap()
            .len()
    };
    let limit = EXPIRE_VERSIONS_MAX as u64;
    let replaced = 2 * (versions - 1) + 1;

    // The first entry takes the oldest replacements: the second entry's a, c and b, then a
    // and c of each later entry until the limit, ending with an a.
    let first = expire_step(&mut sm, next_index()).await;
    assert_eq!(
        first,
        Outcome::Expired {
            removed: limit,
            more: true,
        }
    );
    let (a_gone, c_gone) = ((limit - 3) / 2 + 2, (limit - 3) / 2 + 1);
    assert_eq!(count(&sm, "a"), (versions - a_gone) as usize);
    assert_eq!(count(&sm, "c"), (versions - c_gone) as usize);
    assert_eq!(count(&sm, "b"), 1);

    let second = expire_step(&mut sm, next_index()).await;
    assert_eq!(
        second,
        Outcome::Expired {
            removed: limit,
            more: true,
        }
    );
    let third = expire_step(&mut sm, next_index()).await;
    assert_eq!(
        third,
        Outcome::Expired {
            removed: replaced - 2 * limit,
            more: false,
        }
    );
    for k in ["a", "b", "c"] {
        assert_eq!(count(&sm, k), 1, "{k} keeps exactly its latest version");
    }
    assert_eq!(
        expire_step(&mut sm, next_index()).await,
        Outcome::Expired {
            removed: 0,
            more: false,
        }
    );
    // After a reopen, a later replacement (stamped 20,000: the clock never goes back) and a
    // later cutoff go on from there.
    drop(sm);
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let i = next_index();
    sm.apply([timed(i, 3_000, vec![put("b", "b2".into())])])
        .await
        .unwrap();
    assert_eq!(
        expire_step(&mut sm, next_index()).await,
        Outcome::Expired {
            removed: 0,
            more: false,
        },
        "replaced at 20,000: inside the period"
    );
    assert_eq!(
        expire_before(&mut sm, next_index(), 30_000).await,
        Outcome::Expired {
            removed: 1,
            more: false,
        }
    );
    assert_eq!(count(&sm, "b"), 1);
}

// Goal: expiry's work follows the versions replaced, not the size of the history: with many
// records never replaced and one replaced, one entry removes the one replaced version and
// says there is no more, and every other record keeps its version. Expiry never reads a
// version it does not remove (one that does not decode is no obstacle; reading values is what
// made expiry slow on blob files), and the list of replacements is empty afterwards.
#[tokio::test]
async fn t19_history_expiry_follows_replacements_not_history() {
    const RECORDS: usize = 5_000;
    let path = order;
    let key = |i: usize| format!("k{i:06}");
    let timed = |index: u64, commands: Vec<Command>| timed(index, 2_000, commands);
    let put = |k: &str, v: &str| put_order(k, v.as_bytes());
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let mut entries = vec![timed(
        1,
        vec![Command::AddTenant {
            tenant: TenantId::parse("acme").unwrap(),
        }],
    )];
    let keys: Vec<String> = (0..RECORDS).map(key).collect();
    for chunk in keys.chunks(1_000) {
        let index = entries.len() as u64 + 1;
        entries.push(timed(index, chunk.iter().map(|k| put(k, "v")).collect()));
    }
    let index = entries.len() as u64 + 1;
    entries.push(timed(index, vec![put("z", "1")]));
    entries.push(timed(index + 1, vec![put("z", "2")]));
    sm.apply(entries).await.unwrap();
    let reader = sm.reader();
    assert_eq!(reader.replacements_listed_for_tests().unwrap(), 1);
    reader.garble_record_for_tests(&path(&key(0))).unwrap();

    assert_eq!(
        expire_step(&mut sm, index + 2).await,
        Outcome::Expired {
            removed: 1,
            more: false,
        },
        "z's replaced version, and nothing else"
    );
    assert_eq!(reader.replacements_listed_for_tests().unwrap(), 0);
    let z = reader
        .record_history(&path("z"), None, 10, 1 << 20)
        .unwrap();
    assert_eq!(z.len(), 1, "z keeps its latest version only");
    for k in [key(1), key(RECORDS / 2), key(RECORDS - 1)] {
        let h = reader.record_history(&path(&k), None, 10, 1 << 20).unwrap();
        assert_eq!(h.len(), 1, "{k} keeps its only version");
    }
}

/// A mirrored change of `acme/orders/{key}` (`None`: a delete) at stream position `seq`.
fn order_change(key: &str, value: Option<&str>, seq: u64) -> escrow::domain::Change {
    escrow::domain::Change {
        collection: escrow::domain::Collection::parse("orders").unwrap(),
        key: escrow::domain::RecordKey::parse(key).unwrap(),
        value: value.map(|v| v.as_bytes().to_vec()),
        seq,
        source_ms: 500,
    }
}

// Goal: a record written several times within one log entry (an ingest batch that puts,
// deletes and puts it again; a client batch that does the same) keeps every version in
// order, its latest value, exact figures and a Merkle tree that adds up; history expiry in
// the same entry, after such writes, removes exactly the versions they replaced; and all of
// it is the same whether the entries were applied one by one or in one call, and after a
// reopen.
#[tokio::test]
async fn t17_a_record_rewritten_within_one_entry_keeps_every_version_in_order() {
    let acme = TenantId::parse("acme").unwrap();
    let put = |k: &str, v: &str| put_order(k, v.as_bytes());
    let delete = |k: &str| Command::DeleteRecord { path: order(k) };
    let entries = vec![
        timed(
            1,
            1_000,
            vec![Command::AddTenant {
                tenant: acme.clone(),
            }],
        ),
        timed(
            2,
            1_000,
            vec![Command::Ingest {
                tenant: acme.clone(),
                source: escrow::domain::SourceId::parse("crm").unwrap(),
                changes: vec![
                    order_change("a", Some("1"), 1),
                    order_change("a", Some("22"), 2),
                    order_change("a", None, 3),
                    order_change("a", Some("333"), 4),
                ],
            }],
        ),
        timed(
            3,
            2_000,
            vec![
                put("b", "1"),
                delete("b"),
                put("b", "22"),
                Command::ExpireHistory { before_ms: 2_500 },
                put("c", "1"),
                put("c", "22"),
            ],
        ),
        timed(4, 3_000, vec![put("a", "4444")]),
        timed(5, 4_000, vec![Command::ExpireHistory { before_ms: 3_500 }]),
    ];
    // (position, revision, value) of each kept version, newest first.
    type Kept = Vec<(u32, u64, Option<Vec<u8>>)>;
    let kept = |reader: &escrow::store::SmReader, k: &str| -> Kept {
        reader
            .record_history(&order(k), None, 100, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|(position, v)| (position, v.revision, v.value))
            .collect()
    };
    let some = |v: &str| Some(v.as_bytes().to_vec());

    // Entry by entry first, looking at the state between entries.
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let reader = sm.reader();
    let mut alone = Vec::new();
    for e in entries[..2].iter().cloned() {
        alone.extend(sm.apply([e]).await.unwrap());
    }
    let Outcome::Batch(ingested) = &alone[1] else {
        panic!("{alone:?}")
    };
    assert_eq!(
        ingested[0],
        Outcome::Ingested {
            revision: 2,
            applied: 4,
            duplicates: 0,
            position: 4,
        }
    );
    assert_eq!(
        kept(&reader, "a"),
        vec![
            (3, 2, some("333")),
            (2, 2, None),
            (1, 2, some("22")),
            (0, 2, some("1")),
        ],
        "four versions at one revision, in the batch's order"
    );
    assert_eq!(reader.replacements_listed_for_tests().unwrap(), 3);
    let stats = reader.stats(&acme).unwrap();
    assert_eq!(
        (stats.records, stats.record_bytes, stats.versions),
        (1, 3, 4)
    );
    for e in entries[2..].iter().cloned() {
        alone.extend(sm.apply([e]).await.unwrap());
    }

    // Then everything in one apply call, as a replica catching up would.
    let dir_together = tempfile::tempdir().unwrap();
    let mut together = StateMachineStore::open(dir_together.path()).unwrap();
    let outcomes = together.apply(entries.clone()).await.unwrap();
    assert_eq!(outcomes, alone, "the same outcomes either way");

    let inner = |i: usize| match &alone[i] {
        Outcome::Batch(o) => o.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(
        inner(2)[3],
        Outcome::Expired {
            removed: 5,
            more: false
        },
        "a's three replaced versions and b's two, which this entry's own writes replaced; \
         not c's, written after the expiry"
    );
    assert_eq!(
        inner(2)[1],
        Outcome::Deleted {
            revision: 3,
            existed: true
        }
    );
    assert_eq!(
        inner(4)[0],
        Outcome::Expired {
            removed: 2,
            more: false
        },
        "c@1 (replaced at 2,000) and a@333 (replaced at 3,000)"
    );

    drop(together);
    let together = StateMachineStore::open(dir_together.path()).unwrap();
    for sm in [&sm, &together] {
        let reader = sm.reader();
        assert_eq!(kept(&reader, "a"), vec![(0, 4, some("4444"))]);
        assert_eq!(kept(&reader, "b"), vec![(2, 3, some("22"))]);
        assert_eq!(kept(&reader, "c"), vec![(4, 3, some("22"))]);
        assert_eq!(live(&reader, "b"), some("22"));
        assert_eq!(reader.replacements_listed_for_tests().unwrap(), 0);
        let stats = reader.stats(&acme).unwrap();
        assert_eq!(
            (stats.records, stats.record_bytes, stats.versions),
            (3, 8, 10),
            "versions counts every version ever written, expired ones included"
        );
        let check = reader.deep_check(None).unwrap();
        for ns in &check.namespaces {
            assert!(ns.faults.is_empty(), "{}: {:?}", ns.namespace, ns.faults);
        }
    }
}

/// Entries in the log of [`log_of_puts`], and the bytes of the value each one puts.
const PUTS: u64 = 200;
const PUT_BYTES: u64 = 32 * 1024;

/// A new log holding entries 1..=[`PUTS`] in term 1, each one put of [`PUT_BYTES`] bytes, all
/// still in the memtable.
async fn log_of_puts() -> (tempfile::TempDir, LogStore) {
    let dir = tempfile::tempdir().unwrap();
    let mut log = LogStore::open(&dir.path().join("log")).unwrap();
    let entries: Vec<Entry> = (1..=PUTS)
        .map(|i| Entry {
            log_id: log_id(1, i),
            payload: EntryPayload::Normal(Command::PutRecord {
                path: RecordPath::parse("acme", "orders", &format!("k{i}")).unwrap(),
                value: vec![i as u8; PUT_BYTES as usize],
            }),
        })
        .collect();
    log.blocking_append(entries).await.unwrap();
    (dir, log)
}

// Goal: the log's size estimate behind snapshots by size (`approximate_bytes_between`) never
// falls short of the entries in a range of indexes by more than rounding, and overshoots by the
// memtable at most: what is in the memtable counts whole, what is in table files counts by
// index.
#[tokio::test]
async fn t15_log_size_estimate_covers_the_entries_in_a_range() {
    let (_dir, log) = log_of_puts().await;
    let total = PUTS * PUT_BYTES;
    // All in the memtable: every range counts it whole, never less than the entries.
    for after in [0, PUTS / 2, PUTS] {
        let est = log.approximate_bytes_between(after, PUTS).unwrap();
        assert!(
            (total..=total + (16 << 20)).contains(&est),
            "in the memtable, after {after}: estimate {est} for {total} bytes of entries"
        );
    }
    // In a table file: the entries in the range, to within 2% and one block.
    log.flush_for_tests().unwrap();
    let ranges = [
        (0, PUTS),
        (PUTS / 4, PUTS),
        (PUTS / 2, PUTS),
        (0, PUTS / 2),
        (PUTS / 4, PUTS / 2),
        (PUTS, PUTS),
        (PUTS, u64::MAX),
        (u64::MAX, u64::MAX),
    ];
    for (after, through) in ranges {
        let est = log.approximate_bytes_between(after, through).unwrap();
        let truth = through.min(PUTS).saturating_sub(after) * PUT_BYTES;
        assert!(
            est.abs_diff(truth) <= truth / 50 + 64 * 1024,
            "in a table file, {after} to {through}: estimate {est} for {truth} bytes of entries"
        );
    }
}

// Goal: the purge point behind `raft.log_bytes_kept_after_snapshot` keeps about the bound's
// worth of the newest entries up to the snapshot and purges the rest (to within the estimate's
// rounding: two entries and 2%); nothing when they fit or are still in the memtable.
#[tokio::test]
async fn t16_purge_point_keeps_about_the_bound_of_the_newest_entries() {
    let (_dir, log) = log_of_puts().await;
    // In the memtable the entries are not counted: nothing to purge yet.
    assert_eq!(log.purge_point_keeping(0, PUTS, 0), None);
    log.flush_for_tests().unwrap();
    // (after, snapshot, bound in entries): entries `upto + 1 ..= snapshot` are kept.
    for (after, snapshot, keep) in [(0, PUTS, 32), (0, 150, 10), (50, 150, 60), (0, 150, 0)] {
        let upto = log
            .purge_point_keeping(after, snapshot, keep * PUT_BYTES)
            .unwrap_or_else(|| panic!("{after}..{snapshot} keeping {keep}: nothing purged"));
        let kept = snapshot - upto;
        assert!(
            upto > after && kept.abs_diff(keep) <= 2 + keep / 50,
            "{after}..{snapshot} keeping {keep} entries: purge up to {upto} keeps {kept}"
        );
        // The lowest such point by the estimate: one entry lower keeps more than the bound.
        assert!(log.approximate_table_bytes(upto, snapshot) <= keep * PUT_BYTES);
        assert!(log.approximate_table_bytes(upto - 1, snapshot) > keep * PUT_BYTES);
    }
    // Entries that fit the bound, or no entries at all, purge nothing.
    assert_eq!(log.purge_point_keeping(0, PUTS, PUTS * PUT_BYTES * 2), None);
    assert_eq!(log.purge_point_keeping(100, 100, 0), None);
    assert_eq!(log.purge_point_keeping(150, 100, 0), None);
    assert_eq!(log.purge_point_keeping(PUTS, u64::MAX, 0), None);
}

// Goal: deep verify names each damaged record, the first `DEEP_CHECK_LEAF_FAULTS_MAX` of them,
// and counts the rest, so a badly damaged store still gets a reply of bounded size; it reads
// the store a namespace at a time, so an undamaged namespace beside it shows no fault, a check
// scoped to one namespace reports that one only, and one scoped to a namespace the store does
// not hold reports none. A record head moved under another record's id is named.
#[tokio::test]
async fn t18_deep_check_names_damaged_records_up_to_its_bound() {
    const MAX: usize = escrow::store::sm::DEEP_CHECK_LEAF_FAULTS_MAX;
    let damaged = MAX + 5;
    let dir = tempfile::tempdir().unwrap();
    let mut sm = StateMachineStore::open(dir.path()).unwrap();
    let reader = sm.reader();
    let path =
        |tenant: &str, i: usize| RecordPath::parse(tenant, "orders", &format!("k{i}")).unwrap();
    let put = |path: RecordPath| Command::PutRecord {
        path,
        value: b"good".to_vec(),
    };
    let tenants = ["acme", "beta"].map(|t| Command::AddTenant {
        tenant: TenantId::parse(t).unwrap(),
    });
    apply_batch(&mut sm, 1, tenants.to_vec()).await;
    let mut index = 1;
    for first in (0..damaged + 10).step_by(500) {
        index += 1;
        let last = (first + 500).min(damaged + 10);
        apply_batch(
            &mut sm,
            index,
            (first..last).map(|i| put(path("acme", i))).collect(),
        )
        .await;
    }
    apply_batch(
        &mut sm,
        index + 1,
        (0..3).map(|i| put(path("beta", i))).collect(),
    )
    .await;
    let faults = |only: Option<&str>| -> Vec<(String, Vec<String>)> {
        let only = only.map(|ns| TenantId::parse(ns).unwrap());
        reader
            .deep_check(only.as_ref())
            .unwrap()
            .namespaces
            .into_iter()
            .map(|ns| {
                (
                    ns.namespace,
                    ns.faults.into_iter().map(|f| f.object).collect(),
                )
            })
            .collect()
    };
    let clean = vec![("acme".to_string(), vec![]), ("beta".to_string(), vec![])];
    assert_eq!(faults(None), clean);

    for i in 0..damaged {
        reader
            .overwrite_record_for_tests(&path("acme", i), b"evil")
            .unwrap();
    }
    let found = faults(None);
    assert_eq!(found.len(), 2, "{found:?}");
    let (ns, acme) = &found[0];
    assert_eq!(ns, "acme");
    assert_eq!(
        acme.len(),
        MAX + 2,
        "the root, {MAX} records, the count of the rest"
    );
    assert_eq!(acme[0], "root (recomputed from stored data)");
    let named: std::collections::BTreeSet<&String> = acme[1..=MAX].iter().collect();
    let damaged_names: std::collections::BTreeSet<String> = (0..damaged)
        .map(|i| format!("record orders/k{i}"))
        .collect();
    assert_eq!(named.len(), MAX, "each damaged record named once");
    assert!(
        named.iter().all(|n| damaged_names.contains(*n)),
        "only damaged records named: {named:?}"
    );
    assert!(
        acme[MAX + 1].starts_with("5 more leaves"),
        "{}",
        acme[MAX + 1]
    );
    assert_eq!(found[1], ("beta".to_string(), vec![]));
    assert_eq!(faults(Some("beta")), vec![("beta".to_string(), vec![])]);
    assert_eq!(faults(Some("nobody")), vec![]);

    // A head under another record's id (its own leaf hash still matches what it holds); the
    // stored tree's buckets disagree too, as the index's leaf moved to another bucket.
    reader
        .misplace_record_head_for_tests(&path("beta", 1))
        .unwrap();
    let found = faults(Some("beta"));
    assert_eq!(found.len(), 1, "{found:?}");
    let beta = &found[0].1;
    assert_eq!(
        beta[..2],
        [
            "root (recomputed from stored data)",
            "record orders/k1 (its head's place)"
        ],
        "{beta:?}"
    );
    assert!(
        beta.len() > 2 && beta[2..].iter().all(|f| f.starts_with("Merkle bucket")),
        "{beta:?}"
    );
}

// Goal: a Merkle key out of place in a damaged store (a leaf key too short to end in an id, a
// tree-node key that is not one) stops the checkpoint's fold with a storage error naming the
// key, never a panic in the apply, and the checkpoint changes nothing.
#[tokio::test]
async fn t18_a_merkle_key_out_of_place_fails_the_checkpoint_naming_it() {
    for (leaf, says) in [(true, "too short"), (false, "out of place")] {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachineStore::open(dir.path()).unwrap();
        let reader = sm.reader();
        let path = RecordPath::parse("acme", "orders", "k1").unwrap();
        let commands = vec![
            Command::AddTenant {
                tenant: TenantId::parse("acme").unwrap(),
            },
            Command::PutRecord {
                path: path.clone(),
                value: b"v".to_vec(),
            },
        ];
        apply_batch(&mut sm, 1, commands).await;
        reader.misplace_merkle_key_for_tests(&path, leaf).unwrap();
        let err = sm
            .apply([Entry {
                log_id: log_id(1, 2),
                payload: EntryPayload::Normal(Command::Checkpoint),
            }])
            .await
            .unwrap_err();
        assert!(err.to_string().contains(says), "leaf {leaf}: {err}");
        assert_eq!(reader.applied_index(), 1, "leaf {leaf}");
        assert!(reader.checkpoint(2).unwrap().is_none(), "leaf {leaf}");
    }
}

/// Live records, their bytes, and the versions `acme/orders/{key}` keeps.
fn record_state(reader: &escrow::store::SmReader, key: &str) -> (u64, u64, usize) {
    let stats = reader.stats(&TenantId::parse("acme").unwrap()).unwrap();
    let history = reader
        .record_history(&order(key), None, 1_000, usize::MAX)
        .unwrap();
    (stats.records, stats.record_bytes, history.len())
}

// Goal: a put finds the head it replaces in the node's memory of recently written heads
// exactly as stored: after rewrites and a delete in separate apply calls, after more keys than
// that memory keeps, and after a snapshot install replaced the database under it. A stale
// head would show as wrong live counts and bytes, and as replaced versions listed under the
// wrong key, so history expiry would leave them.
#[tokio::test]
async fn t17_recently_written_heads_are_read_as_stored() {
    use escrow::store::sm::RECENT_HEADS_PER_GENERATION;
    let (_dir, mut sm) = store_with_tenant().await;
    let reader = sm.reader();
    let mut index = 2;
    let steps = [
        (Some("aa"), (1u64, 2u64, 1usize)),
        (Some("bbbb"), (1, 4, 2)),
        (None, (0, 0, 3)),
        (Some("c"), (1, 1, 4)),
    ];
    for (value, expected) in steps {
        let command = match value {
            Some(v) => put_order("k", v.as_bytes()),
            None => Command::DeleteRecord { path: order("k") },
        };
        sm.apply([timed(index, index * 10, vec![command])])
            .await
            .unwrap();
        index += 1;
        assert_eq!(record_state(&reader, "k"), expected, "after {value:?}");
    }
    assert_eq!(reader.replacements_listed_for_tests().unwrap(), 3);

    // More keys than two generations hold, then a rewrite of the first (long forgotten) and
    // of the last (remembered).
    let keys = 2 * RECENT_HEADS_PER_GENERATION + 10;
    let name = |i: usize| format!("e{i}");
    for first in (0..keys).step_by(4_096) {
        let commands = (first..keys.min(first + 4_096))
            .map(|i| put_order(&name(i), b"1"))
            .collect();
        sm.apply([timed(index, 1_000, commands)]).await.unwrap();
        index += 1;
    }
    let rewrites = vec![
        put_order(&name(0), b"22"),
        put_order(&name(keys - 1), b"22"),
    ];
    sm.apply([timed(index, 2_000, rewrites)]).await.unwrap();
    index += 1;
    let (records, bytes, _) = record_state(&reader, "k");
    assert_eq!((records, bytes), (1 + keys as u64, 1 + keys as u64 + 2));
    assert_eq!(reader.replacements_listed_for_tests().unwrap(), 5);
    let (next, removed) = expire_all(&mut sm, index, 3_000).await;
    index = next;
    assert_eq!(
        removed, 5,
        "every replaced version, found where it was listed"
    );
    assert_eq!(record_state(&reader, &name(0)).2, 1);
    assert_eq!(record_state(&reader, &name(keys - 1)).2, 1);
    assert_eq!(record_state(&reader, "k").2, 1);

    // "k" written here once more, so its head is remembered; then another store's state
    // installed, where "k" is 8 bytes with a history of its own.
    sm.apply([timed(index, 4_000, vec![put_order("k", b"zz")])])
        .await
        .unwrap();
    index += 1;
    let (_other_dir, mut other) = store_with_tenant().await;
    let far = index + 1_000;
    other
        .apply([timed(far, 30_000, vec![put_order("k", b"wwwwwwww")])])
        .await
        .unwrap();
    let snapshot = build_snapshot(&mut other).await;
    sm.install_snapshot(&snapshot.meta, snapshot.snapshot)
        .await
        .unwrap();
    let reader = sm.reader();
    assert_eq!(record_state(&reader, "k"), (1, 8, 1));
    sm.apply([timed(far + 1, 40_000, vec![put_order("k", b"v")])])
        .await
        .unwrap();
    assert_eq!(
        record_state(&reader, "k"),
        (1, 1, 2),
        "the installed head replaced, not the one this store wrote before"
    );
    let (_, removed) = expire_all(&mut sm, far + 2, 50_000).await;
    assert_eq!(removed, 1);
    assert_eq!(record_state(&reader, "k").2, 1);
}
