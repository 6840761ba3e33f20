//! Membership changes and snapshot streaming.
//!
//! Steps:
//! 1. Start 3 nodes that snapshot every 50 entries and keep no log behind the snapshot.
//! 2. Write 300 records so the leader's log is purged past its start.
//! 3. Start node 4 and `cluster add` it: it can only catch up through a streamed snapshot.
//! 4. Check node 4 holds every record, installed a snapshot and never saw entry 1.
//! 5. Remove node 4; adding id 4 again is refused (ids are never reused).

mod common;

use common::*;
use escrow::config::RaftSettings;
use escrow::pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t40_learner_added_after_purge_catches_up_via_snapshot() {
    let raft = RaftSettings {
        snapshot_every_entries: 50,
        log_entries_kept_after_snapshot: 0,
        ..test_raft()
    };
    let cluster = TestCluster::started_and_initialized(3, raft.clone()).await;
    let leader = cluster.wait_leader().await;
    let client = cluster.client();
    let mut last = 0;
    for i in 0..300 {
        last = client
            .put(
                "acme",
                "orders",
                &format!("k{i}"),
                format!("v{i}").into_bytes(),
            )
            .await
            .unwrap();
    }
    cluster.wait_applied(last).await;
    let leader_node = cluster.node(cluster.index_of(leader));
    wait_for("the leader to purge its log start", || async {
        let m = leader_node.raft.metrics().borrow().clone();
        (m.purged.map(|p| p.index).unwrap_or(0) >= 100).then_some(())
    })
    .await;
    let first = leader_node.log_store.first_index().unwrap();
    assert!(
        first.is_none_or(|f| f > 1),
        "the leader still holds entry 1 ({first:?})"
    );

    let ports = node_ports(1)[0];
    let config_path =
        escrow::dev::write_node_files(&cluster.files.dir, 4, ports, &[], &raft).unwrap();
    let config = escrow::config::Config::load(&config_path).unwrap();
    let new_node = escrow::node::start(&config, cluster.faults.clone())
        .await
        .unwrap();
    let member = pb::Member {
        id: 4,
        raft_addr: format!("127.0.0.1:{}", ports.raft),
        client_addr: format!("127.0.0.1:{}", ports.client),
        voter: true,
    };
    let reply = client.add_node(member.clone(), false).await.unwrap();
    assert!(
        reply.members.iter().any(|m| m.id == 4 && m.voter),
        "node 4 is a voter"
    );

    wait_for("node 4 to apply everything", || async {
        (new_node.core.reader.applied_index() >= last).then_some(())
    })
    .await;
    let m = new_node.raft.metrics().borrow().clone();
    // Node 4 saw too few entries to build a snapshot of its own (it snapshots every 50), so
    // its snapshot is the leader's, received over the stream.
    let leader_snapshot = leader_node.raft.metrics().borrow().snapshot;
    assert!(m.snapshot.is_some(), "node 4 installed no snapshot");
    assert!(
        m.snapshot.map(|s| s.index) <= leader_snapshot.map(|s| s.index),
        "node 4's snapshot {:?} is not the leader's {:?}",
        m.snapshot,
        leader_snapshot
    );
    assert!(m.snapshot.map(|s| s.index).unwrap_or(0) >= 100);
    let first = new_node.log_store.first_index().unwrap();
    assert!(
        first.is_none_or(|f| f > 1),
        "node 4 received entry 1 by replication, not snapshot"
    );
    for i in 0..300 {
        let path = escrow::domain::RecordPath::parse("acme", "orders", &format!("k{i}")).unwrap();
        let r = new_node
            .core
            .reader
            .get_record(&path)
            .unwrap()
            .expect("record on node 4");
        assert_eq!(r.value, format!("v{i}").into_bytes());
    }

    // Remove node 4; its id can never come back.
    client.remove_node(4).await.unwrap();
    let err = client.add_node(member, false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
    assert!(err.to_string().contains("never reused"), "{err}");
    // A current member's id is refused too.
    let err = client
        .add_node(
            pb::Member {
                id: 1,
                raft_addr: "127.0.0.1:1".into(),
                client_addr: "127.0.0.1:2".into(),
                voter: true,
            },
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists));
    // Bad addresses are refused before anything changes.
    let err = client
        .add_node(
            pb::Member {
                id: 9,
                raft_addr: "nope".into(),
                client_addr: "127.0.0.1:2".into(),
                voter: true,
            },
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));

    new_node.shutdown().await;
    cluster.shutdown().await;
}
