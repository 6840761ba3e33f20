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
//! Usage: bench_apply [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]   (defaults 8000, 32, 1024)

use anyhow::{bail, ensure, Context};
use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rand::RngCore;

use escrow::domain::{RecordPath, TenantId, VALUE_LEN_MAX};
use escrow::ledger::{Command, Outcome};
use escrow::raft::Entry;
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

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    ensure!(
        args.len() <= 3,
        "usage: bench_apply [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]"
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
    let prebuilt = entries
        .checked_mul(per_entry * value_bytes)
        .filter(|b| *b <= PREBUILT_BYTES_MAX)
        .with_context(|| {
            format!("ENTRIES x PUTS_PER_ENTRY x VALUE_BYTES is at most {PREBUILT_BYTES_MAX} bytes")
        })?;
    let dir = tempfile::tempdir()?;
    let mut sm = StateMachineStore::open(dir.path())?;
    let log_id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
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

    // Build every entry first so only applying is timed. Random values, so compression in
    // flushes sees what real data would roughly give it.
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
            log_id: log_id(2 + i),
            payload: EntryPayload::Normal(Command::Timed {
                at_ms: 1_000 + i,
                commands,
            }),
        });
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
