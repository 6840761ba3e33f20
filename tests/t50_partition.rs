//! Network partition of the leader, through the fault-injecting transport between nodes.
//!
//! Steps:
//! 1. Start and bootstrap 3 nodes; write a few records.
//! 2. Cut every link between the leader and the other two.
//! 3. The majority elects a new leader and keeps accepting writes.
//! 4. Writes sent to the isolated old leader are never acknowledged.
//! 5. Heal: all nodes converge on the same applied index and the same records, and the
//!    unacknowledged writes to the old leader do not appear.

mod common;

use std::time::Duration;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t50_partitioned_leader_acknowledges_nothing_and_majority_continues() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    for i in 0..10 {
        client
            .put("acme", "orders", &format!("before-{i}"), b"v".to_vec())
            .await
            .unwrap();
    }
    let old_leader = cluster.wait_leader().await;
    let old_term = cluster
        .node(cluster.index_of(old_leader))
        .raft
        .metrics()
        .borrow()
        .current_term;
    let others: Vec<u64> = (1..=3).filter(|id| *id != old_leader).collect();
    cluster.faults.isolate(old_leader, &others);

    // Writes to the isolated leader, in the background, each with a short deadline.
    let isolated_client = cluster
        .client_for(cluster.index_of(old_leader))
        .with_deadline(Duration::from_secs(3));
    let isolated_writes = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0..3 {
            let key = format!("isolated-{i}");
            if isolated_client
                .put("acme", "orders", &key, b"lost?".to_vec())
                .await
                .is_ok()
            {
                acked.push(key);
            }
        }
        acked
    });

    // The majority elects a new leader in a higher term.
    let new_leader = cluster
        .wait_new_leader(others[0], old_leader, old_term)
        .await;
    assert!(others.contains(&new_leader));

    let mut majority_cfg = cluster.client_config();
    majority_cfg.endpoints = others
        .iter()
        .map(|id| cluster.node(cluster.index_of(*id)).client_addr.to_string())
        .collect();
    let majority = escrow::client::EscrowClient::new(&majority_cfg).unwrap();
    let mut last = 0;
    for i in 0..20 {
        last = majority
            .put("acme", "orders", &format!("during-{i}"), b"v".to_vec())
            .await
            .expect("the majority side accepts writes");
    }

    let acked_by_isolated = isolated_writes.await.unwrap();
    assert!(
        acked_by_isolated.is_empty(),
        "the isolated old leader acknowledged {acked_by_isolated:?}"
    );

    cluster.faults.heal();
    cluster.wait_applied(last).await;
    let converged = wait_for("all nodes at the same applied index", || async {
        let idx: Vec<u64> = cluster
            .nodes
            .iter()
            .flatten()
            .map(|n| n.core.reader.applied_index())
            .collect();
        idx.iter().all(|i| *i == idx[0]).then_some(idx[0])
    })
    .await;
    assert!(converged >= last);
    for node in cluster.nodes.iter().flatten() {
        for i in 0..20 {
            assert!(
                local_record(node, "orders", &format!("during-{i}")).is_some(),
                "node {} lacks during-{i}",
                node.id
            );
        }
        for i in 0..3 {
            assert!(
                local_record(node, "orders", &format!("isolated-{i}")).is_none(),
                "node {} holds isolated-{i}, which was never acknowledged",
                node.id
            );
        }
    }
    cluster.shutdown().await;
}
