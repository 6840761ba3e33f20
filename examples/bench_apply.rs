//! State-machine apply benchmark: applies log entries of record puts straight to a
//! `StateMachineStore` (real RocksDB in a temporary directory, real codec, real ledger), with
//! no Raft, network or fsync around it, and prints the wall and CPU time per put.
//!
//! The end-to-end write benchmark (`scripts/bench-vs-etcd.sh`) moves by ±15% from run to run
//! on a shared 2-core VM, so a change to the apply path worth a few percent is invisible
//! there. This one has no network, no other process and no fsync, so back-to-back runs agree
//! within a few percent; the VM's own drift still moves it by more over minutes, so compare
//! two builds in interleaved runs. Run it through `scripts/bench-apply.sh`.
//!
//! With `expire` first, it then times history expiry instead: every key is written a second
//! time (its CPU time per put printed too: the write that replaces a version), a snapshot
//! flushes the memtable to table and blob files, the page cache is dropped if the process
//! may (root; otherwise it says so), and expiry entries remove every first version,
//! `ledger::EXPIRE_VERSIONS_MAX` per entry, as the retention worker's would.
//! It prints the wall and CPU time per removed version and the slowest entry: an expiry entry
//! is applied in line with writes, so that is how long it holds them up.
//!
//! Usage: bench_apply [expire] [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]
//!        (defaults 8000, 32, 1024)

use anyhow::{bail, ensure, Context};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, RaftSnapshotBuilder};
use rand::RngCore;

use escrow::domain::{RecordPath, TenantId, VALUE_LEN_MAX};
use escrow::ledger::{Command, Outcome};
use escrow::raft::{Entry, LogId};
use escrow::service::{BATCH_BYTES_MAX, BATCH_COMMANDS_MAX};
use escrow::store::StateMachineStore;

/// The node's allocator, so the figures are the node's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Writers whose keys the puts interleave, as 64 benchmark clients' would.
const WRITERS: u64 = 64;
/// All entries are built before timing starts: their values together may take at most this.
const PREBUILT_BYTES_MAX: u64 = 4 << 30;
/// Clock ticks per second of /proc's CPU times (USER_HZ, 100 on Linux).
const PROC_TICKS_PER_SECOND: f64 = 100.0;

fn arg(args: &[String], n: usize, default: u64, name: &str) -> anyhow::Result<u64> {
    match args.get(n) {
        None => Ok(default),
        Some(a) => match a.parse::<u64>() {
            Ok(v) if v > 0 => Ok(v),
            _ => bail!("{name} must be a positive whole number, got {a:?}"),
        },
    }
}

/// This process's user + system CPU time in seconds, all threads (RocksDB's flushes too).
fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which may hold spaces) are space-separated; utime and
    // stime are the 12th and 13th of them.
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| -> anyhow::Result<f64> {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .context("malformed /proc/self/stat")
    };
    Ok((ticks(11)? + ticks(12)?) / PROC_TICKS_PER_SECOND)
}

fn is_rejected(outcome: &Outcome) -> bool {
    match outcome {
        Outcome::Rejected { .. } => true,
        Outcome::Batch(all) => all.iter().any(is_rejected),
        _ => false,
    }
}

fn log_id(index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

/// The puts of `entries` entries of `per_entry` puts each, random values, starting at log
/// index `first` and leader time `first_ms` (1 ms per entry). Keys cycle through the writers'
/// sequences, so a second call with the same sizes writes the same keys again.
fn put_entries(
    entries: u64,
    per_entry: u64,
    value_bytes: u64,
    first: u64,
    first_ms: u64,
) -> anyhow::Result<Vec<Entry>> {
    // Random values, so compression in flushes sees what real data would roughly give it.
    let mut rng = rand::thread_rng();
    let mut next_seq = vec![0u64; WRITERS as usize];
    let mut batches = Vec::with_capacity(entries as usize);
    for i in 0..entries {
        let mut commands = Vec::with_capacity(per_entry as usize);
        for j in 0..per_entry {
            let writer = ((i * per_entry + j) % WRITERS) as usize;
            next_seq[writer] += 1;
            let mut value = vec![0u8; value_bytes as usize];
            rng.fill_bytes(&mut value);
            let key = format!("w{writer}-{}", next_seq[writer]);
            commands.push(Command::PutRecord {
                path: RecordPath::parse("bench", "kv", &key)?,
                value,
            });
        }
        batches.push(Entry {
            log_id: log_id(first + i),
            payload: EntryPayload::Normal(Command::Timed {
                at_ms: first_ms + i,
                commands,
            }),
        });
    }
    Ok(batches)
}

/// Drops the page cache (after a sync) so reads come from the disk; false if not allowed.
fn drop_page_cache() -> bool {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Applies `entries` one by one, as Raft hands committed entries over; fails if any put was
/// rejected.
async fn apply_puts(sm: &mut StateMachineStore, entries: Vec<Entry>) -> anyhow::Result<()> {
    for entry in entries {
        let outcome = sm.apply([entry]).await?;
        ensure!(
            !outcome.iter().any(is_rejected),
            "some puts were not written"
        );
    }
    Ok(())
}

/// Applies one expiry entry at `index` with cutoff `before_ms`; returns the versions it
/// removed and whether there is more to remove.
async fn expire_once(
    sm: &mut StateMachineStore,
    index: u64,
    before_ms: u64,
) -> anyhow::Result<(u64, bool)> {
    let entry = Entry {
        log_id: log_id(index),
        payload: EntryPayload::Normal(Command::ExpireHistory { before_ms }),
    };
    match sm.apply([entry]).await?.as_slice() {
        [Outcome::Expired { removed, more }] => Ok((*removed, *more)),
        other => bail!("expiry gave {other:?}"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let expire = args.first().is_some_and(|a| a == "expire");
    if expire {
        args.remove(0);
    }
    ensure!(
        args.len() <= 3,
        "usage: bench_apply [expire] [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]"
    );
    let entries = arg(&args, 0, 8000, "ENTRIES")?;
    let per_entry = arg(&args, 1, 32, "PUTS_PER_ENTRY")?;
    let value_bytes = arg(&args, 2, 1024, "VALUE_BYTES")?;
    ensure!(
        value_bytes <= VALUE_LEN_MAX as u64,
        "VALUE_BYTES is at most {VALUE_LEN_MAX}"
    );
    ensure!(
        per_entry <= BATCH_COMMANDS_MAX as u64 && per_entry * value_bytes <= BATCH_BYTES_MAX as u64,
        "an entry holds at most {BATCH_COMMANDS_MAX} puts and {BATCH_BYTES_MAX} bytes of values, \
         as the node's proposer makes them"
    );
    // `expire` builds its second round of puts before timing too.
    let rounds = if expire { 2 } else { 1 };
    let prebuilt = entries
        .checked_mul(per_entry * value_bytes)
        .filter(|b| b.saturating_mul(rounds) <= PREBUILT_BYTES_MAX)
        .with_context(|| {
            format!(
                "ENTRIES x PUTS_PER_ENTRY x VALUE_BYTES is at most {} bytes",
                PREBUILT_BYTES_MAX / rounds
            )
        })?;
    let dir = tempfile::tempdir()?;
    let mut sm = StateMachineStore::open(dir.path())?;
    let registered = sm
        .apply([Entry {
            log_id: log_id(1),
            payload: EntryPayload::Normal(Command::AddTenant {
                tenant: TenantId::parse("bench")?,
            }),
        }])
        .await?;
    ensure!(
        matches!(registered.as_slice(), [Outcome::Tenant(_)]),
        "registering the tenant gave {registered:?}"
    );

    // Build every entry first so only applying is timed.
    let batches = put_entries(entries, per_entry, value_bytes, 2, 1_000)?;
    if expire {
        return bench_expiry(sm, batches, entries, per_entry, value_bytes).await;
    }
    let mut outcomes = Vec::with_capacity(entries as usize);
    let started = std::time::Instant::now();
    let cpu_before = cpu_seconds()?;
    for entry in batches {
        outcomes.extend(sm.apply([entry]).await?);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu_before;
    // Only now (untimed): every put must have been written, or the figures mean nothing.
    ensure!(
        outcomes.len() == entries as usize && !outcomes.iter().any(is_rejected),
        "some puts were not written"
    );
    let puts = (entries * per_entry) as f64;
    println!(
        "{{\"entries\":{entries},\"puts_per_entry\":{per_entry},\"value_bytes\":{value_bytes},\"value_bytes_total\":{prebuilt},\"us_per_put_wall\":{:.2},\"us_per_put_cpu\":{:.2}}}",
        wall * 1e6 / puts,
        cpu * 1e6 / puts
    );
    Ok(())
}

/// The `expire` mode: see the module doc.
async fn bench_expiry(
    mut sm: StateMachineStore,
    first: Vec<Entry>,
    entries: u64,
    per_entry: u64,
    value_bytes: u64,
) -> anyhow::Result<()> {
    let second_ms = 1_000 + entries;
    let second = put_entries(entries, per_entry, value_bytes, 2 + entries, second_ms)?;
    apply_puts(&mut sm, first).await?;
    // The second round replaces every version of the first: timed too, as the write a
    // replacement costs.
    let cpu_before = cpu_seconds()?;
    apply_puts(&mut sm, second).await?;
    let replace_cpu = cpu_seconds()? - cpu_before;
    sm.get_snapshot_builder().await.build_snapshot().await?;
    let cold = drop_page_cache();
    if !cold {
        eprintln!("cannot drop the page cache (not root?): the store's files may be in memory");
    }
    // Every second version was written before this cutoff, so every first version goes.
    let before_ms = second_ms + entries;
    let mut index = 2 + 2 * entries;
    let (mut removed, mut entries_applied, mut slowest) = (0u64, 0u64, 0f64);
    let started = std::time::Instant::now();
    let cpu_before = cpu_seconds()?;
    loop {
        let t = std::time::Instant::now();
        let (n, more) = expire_once(&mut sm, index, before_ms).await?;
        slowest = slowest.max(t.elapsed().as_secs_f64());
        removed += n;
        entries_applied += 1;
        index += 1;
        if !more {
            break;
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds()? - cpu_before;
    ensure!(
        removed == entries * per_entry,
        "expected {} versions removed, got {removed}",
        entries * per_entry
    );
    println!(
        "{{\"mode\":\"expire\",\"puts\":{},\"value_bytes\":{value_bytes},\"us_per_replacing_put_cpu\":{:.2},\"page_cache_dropped\":{cold},\"removed\":{removed},\"expiry_entries\":{entries_applied},\"us_per_removed_wall\":{:.2},\"us_per_removed_cpu\":{:.2},\"slowest_entry_ms\":{:.1}}}",
        2 * entries * per_entry,
        replace_cpu * 1e6 / (entries * per_entry) as f64,
        wall * 1e6 / removed.max(1) as f64,
        cpu * 1e6 / removed.max(1) as f64,
        slowest * 1e3
    );
    Ok(())
}
