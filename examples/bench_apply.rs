//! State-machine apply benchmark: applies log entries of record puts straight to a
//! `StateMachineStore` (real RocksDB in a temporary directory, real codec, real ledger), with
//! no Raft, network or fsync around it, and prints the wall and CPU time per put.
//!
//! The end-to-end write benchmark (`scripts/bench-vs-etcd.sh`) moves by ±15% from run to run
//! on a shared 2-core VM, so a change to the apply path worth a few percent is invisible
//! there. This one has no network, no other process and no fsync: back-to-back runs agree
//! within about 2% (the VM's own drift still moves it by up to 10% over minutes, so compare
//! two builds in interleaved runs). Run it through `scripts/bench-apply.sh`.
//!
//! Usage: bench_apply [ENTRIES] [PUTS_PER_ENTRY] [VALUE_BYTES]   (defaults 3000, 32, 1024)

use openraft::storage::RaftStateMachine;
use openraft::{CommittedLeaderId, EntryPayload, LogId};
use rand::RngCore;

use escrow::domain::{RecordPath, TenantId};
use escrow::ledger::Command;
use escrow::raft::Entry;
use escrow::store::StateMachineStore;

/// Writers whose keys the puts interleave, as 64 benchmark clients' would.
const WRITERS: u64 = 64;

fn arg(n: usize, default: u64, name: &str) -> anyhow::Result<u64> {
    match std::env::args().nth(n) {
        None => Ok(default),
        Some(a) => match a.parse::<u64>() {
            Ok(v) if v > 0 => Ok(v),
            _ => anyhow::bail!("{name} must be a positive whole number, got {a:?}"),
        },
    }
}

/// This process's user + system CPU time in seconds (from /proc; 0 where there is none).
fn cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) are space-separated; utime and
    // stime are the 12th and 13th of them, in clock ticks (100 per second on Linux).
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let entries = arg(1, 3000, "ENTRIES")?;
    let per_entry = arg(2, 32, "PUTS_PER_ENTRY")?;
    let value_bytes = arg(3, 1024, "VALUE_BYTES")?;
    anyhow::ensure!(
        value_bytes <= escrow::domain::VALUE_LEN_MAX as u64,
        "VALUE_BYTES is at most {}",
        escrow::domain::VALUE_LEN_MAX
    );
    let dir = tempfile::tempdir()?;
    let mut sm = StateMachineStore::open(dir.path())?;
    let log_id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
    sm.apply([Entry {
        log_id: log_id(1),
        payload: EntryPayload::Normal(Command::AddTenant {
            tenant: TenantId::parse("bench")?,
        }),
    }])
    .await?;

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

    let started = std::time::Instant::now();
    let cpu_before = cpu_seconds();
    for entry in batches {
        sm.apply([entry]).await?;
    }
    let wall = started.elapsed().as_secs_f64();
    // RocksDB's background flushes run on their own threads of this process: counted too.
    let cpu = cpu_seconds() - cpu_before;
    let puts = (entries * per_entry) as f64;
    println!(
        "{{\"entries\":{entries},\"puts_per_entry\":{per_entry},\"value_bytes\":{value_bytes},\"us_per_put_wall\":{:.2},\"us_per_put_cpu\":{:.2}}}",
        wall * 1e6 / puts,
        cpu * 1e6 / puts
    );
    Ok(())
}
