//! SIGKILL of the leader process under concurrent writes: no acknowledged write is lost.
//!
//! Steps:
//! 1. Start 3 `escrowd run` processes and bootstrap them.
//! 2. Start 8 writers with unique keys; each records the writes acknowledged to it. Half of
//!    them write 1 KiB values, which the state machine keeps in blob files, the rest short
//!    ones, kept inline.
//! 3. After a while, SIGKILL the leader process (no shutdown, no flush).
//! 4. A new leader is elected; writers keep going through the surviving nodes.
//! 5. Stop the writers, restart the killed node, and read every acknowledged write back:
//!    zero lost, counted and asserted.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

/// Length of the odd writers' values: well over the state machine's blob threshold (256).
const BLOB_HELD_VALUE_BYTES: usize = 1024;

/// A write the cluster acknowledged: key and value.
type Acked = (String, Vec<u8>);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t60_leader_sigkill_under_load_loses_no_acknowledged_write() {
    kill_leader_under_load(test_raft(), false).await;
}

// Goal: the same, with snapshots every 50 entries and no log kept behind them, so the killed
// node restarts with a purged log and a state machine that lost its unflushed tail (it has no
// WAL of its own): what it lost must come back from its snapshot and the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t61_leader_sigkill_after_log_purges_loses_no_acknowledged_write() {
    kill_leader_under_load(
        escrow::config::RaftSettings {
            snapshot_every_entries: 50,
            log_entries_kept_after_snapshot: 0,
            ..test_raft()
        },
        true,
    )
    .await;
}

/// `expect_purge`: wait until the leader has purged its log before killing it, so the restart
/// really starts from a purged log.
async fn kill_leader_under_load(raft: escrow::config::RaftSettings, expect_purge: bool) {
    init_logs();
    let mut cluster = ProcessCluster::start(3, raft);
    let client = cluster.client();
    wait_for("nodes to accept init", || async {
        client.init().await.ok()
    })
    .await;
    wait_for("a leader", || async {
        client.cluster_status().await.ok().and_then(|s| s.leader)
    })
    .await;
    add_tenant(&client, TENANT).await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..8 {
        let client = cluster.client().with_deadline(Duration::from_secs(15));
        let (stop, acked, failed) = (stop.clone(), acked.clone(), failed.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("w{w}-{i}");
                let mut value = format!("value {w}/{i}").into_bytes();
                if w % 2 == 1 {
                    value.resize(BLOB_HELD_VALUE_BYTES, b'.');
                }
                match client.put("acme", "orders", &key, value.clone()).await {
                    Ok(_) => acked.lock().unwrap().push((key, value)),
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
        }));
    }

    wait_for("writes before the kill", || async {
        (acked.lock().unwrap().len() >= 200).then_some(())
    })
    .await;
    // Node id N's client address is client_addrs[N - 1].
    let client_addrs: Vec<String> = cluster
        .files
        .node_configs
        .iter()
        .map(|p| escrow::config::Config::load(p).unwrap().advertise.client)
        .collect();
    // The leader is read right before the kill, not at the start: leadership can move under
    // load. The node killed is one that says it leads after its purge (if asked for).
    let old_leader = loop {
        let leader = wait_for("a leader", || async {
            client.cluster_status().await.ok().and_then(|s| s.leader)
        })
        .await;
        let leader_addr = &client_addrs[(leader - 1) as usize];
        if expect_purge {
            let purged = wait_for("the leader to purge its log", || async {
                client
                    .node_status_at(leader_addr, Duration::from_secs(2))
                    .await
                    .ok()
                    .filter(|s| s.purged_index > 0)
                    .map(|s| s.purged_index)
            })
            .await;
            eprintln!("leader {leader} purged its log up to {purged}");
        }
        let status = client
            .node_status_at(leader_addr, Duration::from_secs(2))
            .await;
        if status.is_ok_and(|s| s.leader == leader) {
            break leader;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let before_kill = acked.lock().unwrap().len();
    cluster.kill((old_leader - 1) as usize);

    let killed_addr = client_addrs[(old_leader - 1) as usize].clone();
    let survivors: Vec<&String> = client_addrs
        .iter()
        .filter(|addr| **addr != killed_addr)
        .collect();
    let new_leader = wait_for("a new leader among the survivors", || async {
        for addr in &survivors {
            if let Ok(s) = client.node_status_at(addr, Duration::from_secs(1)).await {
                if s.leader != 0 && s.leader != old_leader {
                    return Some(s.leader);
                }
            }
        }
        None
    })
    .await;
    wait_for("writes after the new election", || async {
        (acked.lock().unwrap().len() >= before_kill + 200).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    cluster.restart((old_leader - 1) as usize);
    let acked = acked.lock().unwrap().clone();
    let reader = cluster.client().with_deadline(Duration::from_secs(30));
    let mut lost = Vec::new();
    for (key, value) in &acked {
        let got = reader.get("acme", "orders", key, false).await.unwrap();
        if !got.found || got.value != *value {
            lost.push(key.clone());
        }
    }
    // The killed node's state machine (no WAL of its own) must be rebuilt from its Raft log
    // and the leader: read every acknowledged write from its local applied state.
    let mut local_cfg = escrow::client::ClientConfig::load(&cluster.files.client_config).unwrap();
    local_cfg.endpoints = vec![killed_addr.clone()];
    let local = escrow::client::EscrowClient::new(&local_cfg).unwrap();
    let target = wait_for("the killed node to come back", || async {
        reader
            .node_status_at(survivors[0], Duration::from_secs(2))
            .await
            .ok()
            .map(|s| s.applied_index)
    })
    .await;
    wait_for("the killed node to catch up", || async {
        local
            .node_status_at(&killed_addr, Duration::from_secs(2))
            .await
            .ok()
            .filter(|s| s.applied_index >= target)
    })
    .await;
    let mut lost_on_restarted = 0;
    for (key, value) in &acked {
        let got = local.get("acme", "orders", key, true).await.unwrap();
        if !got.found || got.value != *value {
            lost_on_restarted += 1;
        }
    }
    assert_eq!(
        lost_on_restarted, 0,
        "the restarted node misses acknowledged writes"
    );
    eprintln!(
        "killed leader {old_leader}, new leader {new_leader}; acknowledged {} writes ({before_kill} before the kill), {} failed or unacknowledged, {} lost",
        acked.len(),
        failed.load(Ordering::Relaxed),
        lost.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}
