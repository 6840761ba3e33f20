//! Membership changes and snapshot streaming.
//!
//! Steps:
//! 1. Start 3 nodes that snapshot every 50 entries and keep no log behind the snapshot.
//! 2. Write 300 records so the leader's log is purged past its start.
//! 3. Start node 4 and `cluster add` it as a learner: it can only catch up through a streamed
//!    snapshot. The same add without `--learner` then promotes it.
//! 4. Check node 4 holds every record, installed a snapshot and never saw entry 1.
//! 5. Remove node 4; adding id 4 again is refused (ids are never reused).
//!
//! Also: corrupt snapshot streams are refused (t41), a log past its byte bound is
//! snapshotted and purged although its entry count never triggers (t42), entries committed
//! while a snapshot is built are snapshotted without a new write (t46), and a promotion cut
//! short in its joint configuration is finished by the same add sent again, and a removal cut
//! short by the same remove, which an add of the removed node cannot undo (t44), and a
//! sender gives up on a receiver that stops taking frames or never answers (t47).

mod common;

use common::*;
use escrow::config::RaftSettings;
use escrow::node::NodeHandle;
use escrow::pb;
use openraft::ChangeMembers;
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
    let last = cluster
        .put_all_and_wait(
            "orders",
            (0..300).map(|i| (format!("k{i}"), format!("v{i}").into_bytes())),
        )
        .await;
    let leader_node = cluster.node(cluster.index_of(leader));
    // Polled by hand so that a timeout shows where every node's log and snapshot stand.
    let started = std::time::Instant::now();
    while leader_node
        .raft
        .metrics()
        .borrow()
        .purged
        .is_none_or(|p| p.index < 100)
    {
        if started.elapsed() > WAIT {
            let states: Vec<String> = (0..3)
                .map(|i| {
                    let m = cluster.node(i).raft.metrics().borrow().clone();
                    format!(
                        "node {}: {:?} term {} leader {:?} last log {:?} applied {:?} snapshot {:?} purged {:?}",
                        m.id, m.state, m.current_term, m.current_leader, m.last_log_index,
                        m.last_applied.map(|l| l.index), m.snapshot.map(|l| l.index),
                        m.purged.map(|l| l.index)
                    )
                })
                .collect();
            panic!(
                "timed out after {WAIT:?} waiting for leader {leader} to purge its log start: {states:#?}"
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let first = leader_node.log_store.first_index().unwrap();
    assert!(
        first.is_none_or(|f| f > 1),
        "entry 1 is still readable on the leader ({first:?})"
    );

    let (new_node, member) = cluster.start_extra_node(4, &raft).await;
    // First as a learner (as an add cut short before its promotion leaves it), then the same
    // add again promotes it.
    let reply = client.add_node(member.clone(), true).await.unwrap();
    assert!(
        reply.members.iter().any(|m| m.id == 4 && !m.voter),
        "node 4 is a learner: {:?}",
        reply.members
    );
    let err = client.add_node(member.clone(), true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
    let moved = pb::Member {
        client_addr: "127.0.0.1:1".into(),
        ..member.clone()
    };
    let err = client.add_node(moved, false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let reply = client.add_node(member.clone(), false).await.unwrap();
    assert!(
        reply.members.iter().any(|m| m.id == 4 && m.voter),
        "node 4 is a voter: {:?}",
        reply.members
    );
    let err = client.add_node(member.clone(), false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
    assert!(err.to_string().contains("already a voter"), "{err}");

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
        let (_, r) = local_record(&new_node, "orders", &format!("k{i}")).expect("record on node 4");
        assert_eq!(r, format!("v{i}").into_bytes());
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

/// Voter ids of `node`'s effective membership, one set per configuration (two while joint).
fn configs(node: &NodeHandle) -> Vec<Vec<u64>> {
    let m = node.raft.metrics().borrow().membership_config.clone();
    m.membership()
        .get_joint_config()
        .iter()
        .map(|c| c.iter().copied().collect())
        .collect()
}

/// Starts `change` on the leader's Raft itself (no client, which would follow a leader hint
/// to a node the others elect meanwhile) with the final membership entry held, so it stops in
/// `joint`; waits until the other two voters hold `joint`, cuts the leader off, and once the
/// others (with node 4) elected a new leader, checks the old one could not finish and lifts
/// the hold. Returns the new leader's node, still in `joint`, and a client of the majority.
async fn cut_short_in_joint<'a>(
    cluster: &'a TestCluster,
    node4: &'a NodeHandle,
    member4: &pb::Member,
    change: ChangeMembers<u64, escrow::raft::EscrowNode>,
    joint: &[Vec<u64>],
) -> (&'a NodeHandle, escrow::client::EscrowClient) {
    let leader = cluster.wait_leader().await;
    let others: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    // The hold also stops the leader's heartbeats (see `hold_final_membership`), so the others
    // may elect a leader of their own before the cut: the old term is read first.
    let leader_node = cluster.node(cluster.index_of(leader));
    let (next_index, old_term) = {
        let m = leader_node.raft.metrics().borrow().clone();
        (m.last_log_index.unwrap_or(0) + 1, m.current_term)
    };
    cluster.faults.hold_final_membership(Some(next_index));
    let raft = leader_node.raft.clone();
    let started = tokio::spawn(async move {
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            raft.change_membership(change, false),
        )
        .await
    });
    wait_for("the others to hold the joint configuration", || async {
        others
            .iter()
            .all(|id| configs(cluster.node(cluster.index_of(*id))) == joint)
            .then_some(())
    })
    .await;
    cluster.faults.isolate(leader, &[others[0], others[1], 4]);
    let new_leader = cluster.wait_new_leader(others[0], leader, old_term).await;
    assert!(
        !matches!(started.await.unwrap(), Ok(Ok(_))),
        "the cut-off leader cannot finish the change"
    );
    cluster.faults.hold_final_membership(None);
    let new_leader_node = if new_leader == 4 {
        node4
    } else {
        cluster.node(cluster.index_of(new_leader))
    };
    assert_eq!(configs(new_leader_node), joint, "the change was cut short");
    let mut majority = cluster.client_config();
    majority.endpoints = others
        .iter()
        .map(|id| cluster.node(cluster.index_of(*id)).client_addr.to_string())
        .collect();
    majority.endpoints.push(member4.client_addr.clone());
    (
        new_leader_node,
        escrow::client::EscrowClient::new(&majority).unwrap(),
    )
}

// Goal: a promotion cut short in its joint configuration (the leader lost between openraft's
// two membership steps) is finished by the same `cluster add` sent again: node 4 becomes a
// voter in a uniform configuration on every node, and writes reach it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t44_a_promotion_cut_short_in_its_joint_configuration_is_finished_by_the_same_add() {
    let raft = test_raft();
    let cluster = TestCluster::started_and_initialized(3, raft.clone()).await;
    let (new_node, member) = cluster.start_extra_node(4, &raft).await;
    cluster
        .client()
        .add_node(member.clone(), true)
        .await
        .unwrap();

    // The promotion, cut short between openraft's two membership steps, as `cluster add`
    // starts it once the learner caught up.
    let joint = vec![vec![1, 2, 3], vec![1, 2, 3, 4]];
    let (new_leader_node, majority) = cut_short_in_joint(
        &cluster,
        &new_node,
        &member,
        ChangeMembers::AddVoterIds([4].into()),
        &joint,
    )
    .await;

    // An add with other addresses is refused and changes nothing: it would not finish a
    // promotion with addresses the joint configuration does not hold.
    let mut moved = member.clone();
    moved.raft_addr = "127.0.0.1:1".into();
    let refused = wait_for("the add with other addresses to be refused", || async {
        match majority.add_node(moved.clone(), false).await {
            Ok(reply) => panic!("an add with other addresses succeeded: {reply:?}"),
            Err(e) if e.code() == Some(Code::FailedPrecondition) => Some(e),
            // The new leader commits the joint configuration with its first entry.
            Err(_) => None,
        }
    })
    .await;
    assert!(
        refused.to_string().contains("a voter being promoted"),
        "{refused}"
    );
    assert_eq!(
        configs(new_leader_node),
        joint,
        "a refused add changes nothing"
    );

    let reply = wait_for("the repeated add to finish the promotion", || async {
        match majority.add_node(member.clone(), false).await {
            Ok(reply) => Some(reply),
            // Finishing must not be mistaken for adding a voter twice.
            Err(e) if e.code() == Some(Code::AlreadyExists) => panic!("{e}"),
            // The new leader commits the joint configuration with its first entry.
            Err(_) => None,
        }
    })
    .await;
    let voters: Vec<u64> = reply
        .members
        .iter()
        .filter(|m| m.voter)
        .map(|m| m.id)
        .collect();
    assert_eq!(voters, vec![1, 2, 3, 4], "{:?}", reply.members);

    // Heal: every node, the old leader too, ends in the uniform configuration, and a write
    // through the majority reaches node 4.
    cluster.faults.heal();
    let index = majority
        .put(TENANT, "orders", "after-promotion", b"v".to_vec())
        .await
        .unwrap();
    wait_for(
        "every node in the uniform configuration, with the write",
        || async {
            let nodes: Vec<&NodeHandle> =
                (0..3).map(|i| cluster.node(i)).chain([&new_node]).collect();
            nodes
                .iter()
                .all(|n| {
                    configs(n) == vec![vec![1, 2, 3, 4]] && n.core.reader.applied_index() >= index
                })
                .then_some(())
        },
    )
    .await;
    let (_, value) = local_record(&new_node, "orders", "after-promotion").expect("on node 4");
    assert_eq!(value, b"v");
    new_node.shutdown().await;
    cluster.shutdown().await;
}

// Goal: a removal cut short in its joint configuration is not undone by an add of the removed
// node (refused, nothing changes) and is finished by the same `cluster remove` sent again:
// every remaining node ends in the uniform configuration without it, and its id stays retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t44_a_removal_cut_short_is_finished_by_remove_and_not_undone_by_add() {
    let raft = test_raft();
    let cluster = TestCluster::started_and_initialized(3, raft.clone()).await;
    let (node4, member) = cluster.start_extra_node(4, &raft).await;
    let four_voters = vec![vec![1, 2, 3, 4]];
    cluster
        .client()
        .add_node(member.clone(), false)
        .await
        .unwrap();
    wait_for("every node in the four-voter configuration", || async {
        (0..3)
            .map(|i| cluster.node(i))
            .chain([&node4])
            .all(|n| configs(n) == four_voters)
            .then_some(())
    })
    .await;

    // The removal, cut short between openraft's two membership steps.
    let joint = vec![vec![1, 2, 3, 4], vec![1, 2, 3]];
    let (new_leader_node, majority) = cut_short_in_joint(
        &cluster,
        &node4,
        &member,
        ChangeMembers::RemoveVoters([4].into()),
        &joint,
    )
    .await;

    // An add of node 4 would put it back: refused, and the configuration stays as it was.
    let refused = wait_for(
        "the add of the node being removed to be refused",
        || async {
            match majority.add_node(member.clone(), false).await {
                Ok(reply) => panic!("an add undid a removal: {reply:?}"),
                Err(e) if e.code() == Some(Code::FailedPrecondition) => Some(e),
                // The new leader commits the joint configuration with its first entry.
                Err(_) => None,
            }
        },
    )
    .await;
    assert!(
        refused.to_string().contains("cluster remove --id 4"),
        "{refused}"
    );
    assert_eq!(
        configs(new_leader_node),
        joint,
        "a refused add changes nothing"
    );

    // The same remove, sent again, finishes the removal. Node 4 may lead the joint
    // configuration; it then steps down once the change commits, and the answer may be lost
    // with it, so a retry may find node 4 already gone.
    wait_for("the repeated remove to finish the removal", || async {
        match majority.remove_node(4).await {
            Ok(_) => Some(()),
            Err(e) if e.code() == Some(Code::NotFound) => Some(()),
            Err(_) => None,
        }
    })
    .await;

    // Heal: nodes 1-3, the old leader too, end in the uniform configuration without node 4,
    // writes go on, and id 4 stays retired.
    cluster.faults.heal();
    let client = cluster.client();
    let index = client
        .put(TENANT, "orders", "after-removal", b"v".to_vec())
        .await
        .unwrap();
    wait_for(
        "nodes 1-3 in the uniform configuration, with the write",
        || async {
            (0..3)
                .map(|i| cluster.node(i))
                .all(|n| {
                    configs(n) == vec![vec![1, 2, 3]] && n.core.reader.applied_index() >= index
                })
                .then_some(())
        },
    )
    .await;
    let again = client.add_node(member.clone(), false).await.unwrap_err();
    assert_eq!(again.code(), Some(Code::AlreadyExists), "{again}");
    assert!(again.to_string().contains("never reused"), "{again}");
    node4.shutdown().await;
    cluster.shutdown().await;
}

// Goal: a snapshot stream that does not verify is refused before anything is installed, and
// leaves nothing behind: wrong bytes (blake3 mismatch), a gap in the data, a duplicate or
// unsafe file name, files larger than the free disk (refused before a byte is written), a
// sender that stalls past `raft.snapshot_frame_wait_ms`; and a node receives at most
// `SNAPSHOT_RECEIVES_AT_ONCE` streams at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t41_corrupt_snapshot_streams_are_refused() {
    use escrow::service::peer::SNAPSHOT_RECEIVES_AT_ONCE;
    use tokio_stream::StreamExt;
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    const FRAME_WAIT_MS: u64 = escrow::config::SNAPSHOT_FRAME_WAIT_MS_MIN;
    let raft = RaftSettings {
        snapshot_frame_wait_ms: FRAME_WAIT_MS,
        ..test_raft()
    };
    let cluster = TestCluster::started_and_initialized(3, raft).await;
    cluster.put_and_wait("k").await;
    let dir = &cluster.files.dir;
    let target = cluster.node(0);
    let applied_before = target.core.reader.applied_index();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read(dir.join("pki/ca.pem")).unwrap(),
        ))
        .identity(Identity::from_pem(
            std::fs::read(dir.join("pki/node2.pem")).unwrap(),
            std::fs::read(dir.join("pki/node2.key")).unwrap(),
        ));
    let channel = Endpoint::from_shared(format!("https://{}", target.raft_addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut peer = pb::peer_client::PeerClient::with_interceptor(
        channel,
        escrow::raft::network::ForNode::new(target.id),
    );
    let meta = escrow::raft::SnapshotMeta {
        last_log_id: Some(openraft::LogId::new(
            openraft::CommittedLeaderId::new(99, 2),
            10_000,
        )),
        last_membership: Default::default(),
        snapshot_id: "forged".into(),
    };
    let header = |files: Vec<(&str, &[u8])>| pb::SnapshotFrame {
        frame: Some(pb::snapshot_frame::Frame::Header(pb::SnapshotHeader {
            vote_and_meta: escrow::raft::codec::encode(&(
                openraft::Vote::new_committed(99, 2),
                meta.clone(),
            )),
            files: files
                .into_iter()
                .map(|(name, content)| pb::SnapshotFile {
                    name: name.into(),
                    size: content.len() as u64,
                    blake3: blake3::hash(content).as_bytes().to_vec(),
                })
                .collect(),
        })),
    };
    let data = |index: u32, offset: u64, bytes: &[u8]| pb::SnapshotFrame {
        frame: Some(pb::snapshot_frame::Frame::Data(pb::SnapshotData {
            file_index: index,
            offset,
            data: bytes.to_vec(),
        })),
    };
    let cases = vec![
        (
            "flipped byte",
            vec![header(vec![("CURRENT", b"abc")]), data(0, 0, b"abd")],
            Code::DataLoss,
        ),
        (
            "gap in data",
            vec![
                header(vec![("CURRENT", b"abcdef")]),
                data(0, 0, b"abc"),
                data(0, 4, b"ef"),
            ],
            Code::InvalidArgument,
        ),
        (
            "truncated",
            vec![header(vec![("CURRENT", b"abcdef")]), data(0, 0, b"abc")],
            Code::DataLoss,
        ),
        (
            "duplicate name",
            vec![header(vec![("CURRENT", b"a"), ("CURRENT", b"b")])],
            Code::InvalidArgument,
        ),
        (
            "unsafe name",
            vec![header(vec![("../escape", b"a")])],
            Code::InvalidArgument,
        ),
        ("no header", vec![data(0, 0, b"abc")], Code::InvalidArgument),
        (
            // 64 TiB declared: refused before a byte is written.
            "larger than the free disk",
            vec![pb::SnapshotFrame {
                frame: Some(pb::snapshot_frame::Frame::Header(pb::SnapshotHeader {
                    vote_and_meta: escrow::raft::codec::encode(&(
                        openraft::Vote::new_committed(99, 2),
                        meta.clone(),
                    )),
                    files: (0..64)
                        .map(|i| pb::SnapshotFile {
                            name: format!("{i:06}.sst"),
                            size: escrow::service::peer::SNAPSHOT_FILE_BYTES_MAX,
                            blake3: vec![0; 32],
                        })
                        .collect(),
                })),
            }],
            Code::ResourceExhausted,
        ),
    ];
    for (what, frames, code) in cases {
        let err = peer
            .install_snapshot(tokio_stream::iter(frames))
            .await
            .expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        if code == Code::ResourceExhausted {
            assert!(err.message().contains("does not fit"), "{what}: {err:?}");
        }
    }
    // Senders that stop mid-file: as many as a node receives at once hold their slots until
    // the frame wait ends; one more is refused at once.
    let stalled = || {
        let mut peer = peer.clone();
        let frames = vec![header(vec![("CURRENT", b"abcdef")]), data(0, 0, b"abc")];
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let err = peer
                .install_snapshot(tokio_stream::iter(frames).chain(tokio_stream::pending()))
                .await
                .expect_err("a stalled stream");
            (err, started.elapsed())
        })
    };
    let receiving: Vec<_> = (0..SNAPSHOT_RECEIVES_AT_ONCE).map(|_| stalled()).collect();
    wait_for("every stalled stream to be receiving", || async {
        (incoming_dirs(&cluster).len() == SNAPSHOT_RECEIVES_AT_ONCE).then_some(())
    })
    .await;
    let err = peer
        .install_snapshot(tokio_stream::iter(vec![header(vec![("CURRENT", b"a")])]))
        .await
        .expect_err("one stream too many");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("being received"), "{err:?}");
    for task in receiving {
        let (err, took) = tokio::time::timeout(WAIT, task)
            .await
            .expect("a stalled stream is never dropped")
            .unwrap();
        assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
        assert!(err.message().contains("no snapshot frame"), "{err:?}");
        assert!(
            took >= std::time::Duration::from_millis(FRAME_WAIT_MS),
            "refused after {took:?}"
        );
    }
    assert_eq!(
        target.core.reader.applied_index(),
        applied_before,
        "a refused snapshot changed the state"
    );
    let leftovers = incoming_dirs(&cluster);
    assert!(leftovers.is_empty(), "refused transfers left {leftovers:?}");
    assert!(
        !dir.join("node1/escape").exists() && !dir.join("node1/data/snapshots/escape").exists()
    );
    cluster.shutdown().await;
}

/// The snapshot transfers node 0 has on disk.
fn incoming_dirs(cluster: &TestCluster) -> Vec<String> {
    std::fs::read_dir(target_data_dir(cluster, 0).join("snapshots"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("incoming-"))
        .collect()
}

fn target_data_dir(cluster: &TestCluster, i: usize) -> std::path::PathBuf {
    escrow::config::Config::load(&cluster.files.node_configs[i])
        .unwrap()
        .data_dir
}

/// No running node has a snapshot (`when`: the situation, for the message).
fn assert_no_snapshot(cluster: &TestCluster, when: &str) {
    for node in cluster.nodes.iter().flatten() {
        let m = node.raft.metrics().borrow().clone();
        assert_eq!(m.snapshot, None, "node {} snapshotted {when}", m.id);
    }
}

/// `node` holds `big/k0` .. `big/k{count - 1}` with the bytes `value` gives for each.
fn assert_values(node: &NodeHandle, count: usize, value: impl Fn(usize) -> Vec<u8>) {
    for k in 0..count {
        let (_, got) = local_record(node, "big", &format!("k{k}"))
            .unwrap_or_else(|| panic!("node {}: k{k} is missing", node.id));
        assert!(got == value(k), "node {}: k{k} has other bytes", node.id);
    }
}

// Goal: the log's disk space is bounded in bytes, not only in entries (an entry is a batch
// of up to a few MiB). With an entry count that never triggers, every node builds a snapshot
// once the applied log after its last one passes `raft.snapshot_every_log_bytes`, not before
// and not again without new writes, and purges its log behind it down to exactly
// `raft.log_entries_kept_after_snapshot` entries (their bytes stay under the default byte
// bound); every acknowledged write is still there. The bound (64 MiB) is above the log's two
// memtables, so only entries in table files can pass it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t42_a_log_past_its_byte_bound_is_snapshotted_and_purged() {
    use escrow::config::SNAPSHOT_EVERY_LOG_BYTES_MIN;
    const VALUE: usize = escrow::domain::VALUE_LEN_MAX;
    const KEPT: u64 = 20;
    let checks = escrow::workers::snapshots::CHECK_INTERVAL * 3;
    let raft = RaftSettings {
        snapshot_every_entries: 1_000_000,
        snapshot_every_log_bytes: SNAPSHOT_EVERY_LOG_BYTES_MIN,
        log_entries_kept_after_snapshot: KEPT,
        ..test_raft()
    };
    let cluster = TestCluster::started_and_initialized(3, raft).await;
    cluster.wait_leader().await;
    let value = |i: usize| random_bytes(&format!("t42-{i}"), VALUE);
    let big = |range: std::ops::Range<usize>| range.map(move |i| (format!("k{i}"), value(i)));
    // A quarter of the bound: no node snapshots, however often it looks.
    let below = (SNAPSHOT_EVERY_LOG_BYTES_MIN as usize / VALUE) / 4;
    let below_index = cluster.put_all_and_wait("big", big(0..below)).await;
    tokio::time::sleep(checks).await;
    assert_no_snapshot(&cluster, "below the bound");
    // Past the bound, twice over.
    let total = below + 2 * SNAPSHOT_EVERY_LOG_BYTES_MIN as usize / VALUE;
    cluster.put_all_and_wait("big", big(below..total)).await;
    let mut snapshots = Vec::new();
    for i in 0..3 {
        let node = cluster.node(i);
        let snapshot = wait_for("a snapshot by size and a purge behind it", || async {
            let m = node.raft.metrics().borrow().clone();
            match (m.snapshot, m.purged) {
                (Some(s), Some(p)) if s.index > below_index && p.index + KEPT == s.index => {
                    Some(s.index)
                }
                _ => None,
            }
        })
        .await;
        assert_eq!(
            node.log_store.first_index().unwrap(),
            Some(snapshot - KEPT + 1),
            "node {}: the entries readable behind the snapshot at {snapshot}",
            node.id
        );
        assert_values(node, total, value);
        snapshots.push(snapshot);
    }
    // What the snapshots left behind is under the bound: no node builds another, with or
    // without a few small writes.
    tokio::time::sleep(checks).await;
    let last = cluster
        .put_all_and_wait(
            "small",
            (0..3).map(|k| (format!("s{k}"), b"small".to_vec())),
        )
        .await;
    tokio::time::sleep(checks).await;
    for (i, before) in snapshots.into_iter().enumerate() {
        let m = cluster.node(i).raft.metrics().borrow().clone();
        let now = m.snapshot.map(|s| s.index);
        // A node that snapshotted before the last big writes were applied may take one more
        // once (they may still pass the bound); never one past the small writes' index.
        assert!(
            now.is_some_and(|n| n >= before && n < last),
            "node {}: snapshot {now:?} after {before} without new bytes",
            m.id
        );
    }
    cluster.shutdown().await;
}

// Goal: the entry-count bound holds when the writes stop while a snapshot is being built (a
// large store's build takes a while: it hashes new files). Raft's policy looks at the count
// only when its commit index moves, and ignores it during a build, so the entries committed
// meanwhile would stay unsnapshotted and unpurged until the next write; the snapshots worker
// asks for them. Builds are held after their checkpoint, where a large store's hashing holds
// them; every acknowledged write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t46_entries_committed_during_a_slow_build_are_snapshotted_without_new_writes() {
    const EVERY: usize = 20;
    let raft = RaftSettings {
        snapshot_every_entries: EVERY as u64,
        log_entries_kept_after_snapshot: 0,
        ..test_raft()
    };
    let cluster = TestCluster::started_and_initialized(3, raft).await;
    cluster.wait_leader().await;
    let value = |i: usize| format!("v{i}").into_bytes();
    let records = |range: std::ops::Range<usize>| range.map(move |i| (format!("k{i}"), value(i)));
    cluster.faults.hold_snapshot_builds(true);
    // Past the count: every node starts a build, takes its checkpoint and stops there.
    cluster.put_all_and_wait("big", records(0..EVERY + 5)).await;
    tokio::time::sleep(escrow::workers::snapshots::CHECK_INTERVAL).await;
    // Twice the count more, committed during the builds, then no write at all.
    let count = 3 * EVERY + 5;
    let last = cluster
        .put_all_and_wait("big", records(EVERY + 5..count))
        .await;
    assert_no_snapshot(&cluster, "while builds are held");
    cluster.faults.hold_snapshot_builds(false);
    for node in cluster.nodes.iter().flatten() {
        wait_for(
            "a snapshot of every entry and a purge behind it",
            || async {
                let m = node.raft.metrics().borrow().clone();
                (m.snapshot.is_some_and(|s| s.index >= last)
                    && m.purged.is_some_and(|p| p.index >= last))
                .then_some(())
            },
        )
        .await;
        assert_values(node, count, value);
    }
    cluster.shutdown().await;
}

// Goal: the log's byte bounds work from what is on disk, so a node restarted with a log past
// them snapshots and purges without any new write: the applied log past
// `raft.snapshot_every_log_bytes` is snapshotted, and the entries kept behind the snapshot are
// cut to about `raft.log_bytes_kept_after_snapshot` (their count bound never limits here);
// every acknowledged write is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t43_after_a_restart_the_log_byte_bounds_snapshot_and_purge_the_log_on_disk() {
    use escrow::config::SNAPSHOT_EVERY_LOG_BYTES_MIN;
    const VALUE: usize = escrow::domain::VALUE_LEN_MAX;
    const KEPT_BYTES: u64 = 16 << 20;
    // Entries still in the log's memtables (two of 16 MiB at most) are kept uncounted.
    let kept_entries_max = (KEPT_BYTES + (32 << 20)) / VALUE as u64 + 4;
    let kept_entries_min = KEPT_BYTES / VALUE as u64 - 2;
    let raft = RaftSettings {
        snapshot_every_entries: 1_000_000,
        log_entries_kept_after_snapshot: 1_000_000,
        ..test_raft()
    };
    let mut cluster = TestCluster::started_and_initialized(3, raft).await;
    cluster.wait_leader().await;
    let value = |i: usize| random_bytes(&format!("t43-{i}"), VALUE);
    let count = 3 * SNAPSHOT_EVERY_LOG_BYTES_MIN as usize / VALUE / 2;
    let last = cluster
        .put_all_and_wait("big", (0..count).map(|i| (format!("k{i}"), value(i))))
        .await;
    tokio::time::sleep(escrow::workers::snapshots::CHECK_INTERVAL * 2).await;
    assert_no_snapshot(&cluster, "under the default bound");
    for i in 0..3 {
        cluster.stop_node(i).await;
        cluster.edit_node_config(i, |c| {
            c.raft.snapshot_every_log_bytes = SNAPSHOT_EVERY_LOG_BYTES_MIN;
            c.raft.log_bytes_kept_after_snapshot = KEPT_BYTES;
        });
    }
    for i in 0..3 {
        cluster.restart_node(i).await;
    }
    for i in 0..3 {
        let node = cluster.node(i);
        let (snapshot, purged) =
            wait_for("a snapshot by size and a purge by kept bytes", || async {
                let m = node.raft.metrics().borrow().clone();
                match (m.snapshot, m.purged) {
                    (Some(s), Some(p)) if s.index >= last && p.index > 0 => {
                        Some((s.index, p.index))
                    }
                    _ => None,
                }
            })
            .await;
        let kept = snapshot - purged;
        assert!(
            (kept_entries_min..=kept_entries_max).contains(&kept),
            "node {}: {kept} entries of {VALUE} bytes kept behind the snapshot at {snapshot} \
             (bound {KEPT_BYTES} bytes)",
            node.id
        );
        assert_eq!(node.log_store.first_index().unwrap(), Some(purged + 1));
        assert_values(node, count, value);
    }
    cluster.shutdown().await;
}

/// What the fake receiver in t47 does with a snapshot stream.
#[derive(Clone, Copy, Debug)]
enum FakeReceiver {
    /// Takes the header, then no frame again and never answers.
    Stalls,
    /// Takes every frame, then never answers.
    NeverAnswers,
    /// Takes the header, then refuses the transfer.
    Refuses,
}

const FAKE_REFUSAL: &str = "fake receiver: no room for this snapshot";

/// A peer that receives snapshot streams badly (t47); every other RPC is unimplemented.
struct FakePeer {
    behaviour: FakeReceiver,
    /// Data bytes taken from the stream so far.
    taken: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[tonic::async_trait]
impl pb::peer_server::Peer for FakePeer {
    async fn append_entries(
        &self,
        _: tonic::Request<pb::RaftMessage>,
    ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
    async fn vote(
        &self,
        _: tonic::Request<pb::RaftMessage>,
    ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
    async fn install_snapshot(
        &self,
        request: tonic::Request<tonic::Streaming<pb::SnapshotFrame>>,
    ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
        use std::sync::atomic::Ordering;
        let mut stream = request.into_inner();
        let first = stream.message().await?;
        if !matches!(
            first.and_then(|f| f.frame),
            Some(pb::snapshot_frame::Frame::Header(_))
        ) {
            return Err(tonic::Status::invalid_argument(
                "fake receiver: the sender's first frame is not its header",
            ));
        }
        match self.behaviour {
            FakeReceiver::Stalls => {}
            FakeReceiver::NeverAnswers => {
                while let Some(frame) = stream.message().await? {
                    if let Some(pb::snapshot_frame::Frame::Data(d)) = frame.frame {
                        self.taken.fetch_add(d.data.len() as u64, Ordering::SeqCst);
                    }
                }
            }
            FakeReceiver::Refuses => return Err(tonic::Status::resource_exhausted(FAKE_REFUSAL)),
        }
        // Holds the stream (unread, in `Stalls`) until the sender gives up and resets it.
        std::future::pending::<()>().await;
        unreachable!()
    }
    async fn forward(
        &self,
        _: tonic::Request<pb::RaftMessage>,
    ) -> Result<tonic::Response<pb::RaftMessage>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
    async fn has_chunks(
        &self,
        _: tonic::Request<pb::ChunkList>,
    ) -> Result<tonic::Response<pb::ChunkPresence>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
    async fn put_chunk(
        &self,
        _: tonic::Request<pb::ChunkData>,
    ) -> Result<tonic::Response<pb::ChunkAck>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
    async fn get_chunk(
        &self,
        _: tonic::Request<pb::ChunkId>,
    ) -> Result<tonic::Response<pb::ChunkData>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
    async fn disk_space(
        &self,
        _: tonic::Request<pb::DiskSpaceRequest>,
    ) -> Result<tonic::Response<pb::DiskSpaceReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("fake peer"))
    }
}

// Goal: a snapshot transfer has no overall deadline, but a sender never waits forever on a
// receiver that stopped: it gives up when the receiver takes no frame for the frame wait,
// when no answer comes within openraft's install timeout of its last frame, and it reports a
// receiver's refusal in the receiver's words. The real sender (`PeerNetwork::full_snapshot`,
// mutual TLS) streams a 48 MiB snapshot to a fake receiver on a real socket (the real
// receiver's own waits are t41's).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t47_a_snapshot_sender_gives_up_on_a_receiver_that_stops() {
    use escrow::raft::network::{NetworkFactory, PeerClients};
    use escrow::raft::{EscrowNode, Snapshot};
    use escrow::store::{SnapshotDir, SnapshotFileInfo};
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    // The sender's frame wait where the receiver stalls; where it takes every frame, one long
    // enough that a slow machine never trips it.
    const FRAME_WAIT: Duration = Duration::from_secs(1);
    const FRAME_WAIT_LONG: Duration = Duration::from_secs(60);
    const INSTALL_WAIT: Duration = Duration::from_secs(5);
    // Far more than the frames buffered between the reader and the stream, HTTP/2's windows
    // and the sockets' buffers hold, so a receiver that stops reading stops the sender.
    const SNAPSHOT_BYTES: u64 = 48 * 1024 * 1024;
    escrow::node::install_crypto_provider();

    let dir = tempfile::tempdir().unwrap();
    let ca = escrow::pki::Ca::generate().unwrap();
    ca.write(&dir.path().join("ca.pem"), &dir.path().join("ca.key"))
        .unwrap();
    let tls = |name: &str| {
        let (cert, key) = (
            dir.path().join(format!("{name}.pem")),
            dir.path().join(format!("{name}.key")),
        );
        ca.issue_to_files(name, &["127.0.0.1".into()], &cert, &key)
            .unwrap();
        escrow::auth::NodeTls::load(&dir.path().join("ca.pem"), &cert, &key).unwrap()
    };
    let (sender_tls, receiver_tls) = (tls("node1"), tls("node2"));

    let snapshot_dir = dir.path().join("snapshot");
    std::fs::create_dir(&snapshot_dir).unwrap();
    let content = random_bytes("t47", SNAPSHOT_BYTES as usize);
    std::fs::write(snapshot_dir.join("000001.sst"), &content).unwrap();
    let info = SnapshotFileInfo {
        name: "000001.sst".into(),
        size: SNAPSHOT_BYTES,
        blake3: *blake3::hash(&content).as_bytes(),
    };
    drop(content);
    let snapshot = || Snapshot {
        meta: escrow::raft::SnapshotMeta {
            last_log_id: Some(openraft::LogId::new(
                openraft::CommittedLeaderId::new(1, 1),
                100,
            )),
            last_membership: Default::default(),
            snapshot_id: "t47".into(),
        },
        snapshot: Box::new(SnapshotDir {
            path: snapshot_dir.clone(),
            files: vec![info.clone()],
        }),
    };

    let clients = Arc::new(PeerClients::new(
        1,
        sender_tls.peer_client(),
        Default::default(),
    ));
    for behaviour in [
        FakeReceiver::Stalls,
        FakeReceiver::NeverAnswers,
        FakeReceiver::Refuses,
    ] {
        let taken = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tls_config(receiver_tls.peer_server())
                .unwrap()
                .add_service(pb::peer_server::PeerServer::new(FakePeer {
                    behaviour,
                    taken: taken.clone(),
                }))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let node = EscrowNode {
            raft_addr: addr.to_string(),
            client_addr: "127.0.0.1:1".into(),
        };
        let frame_wait = match behaviour {
            FakeReceiver::Stalls => FRAME_WAIT,
            FakeReceiver::NeverAnswers | FakeReceiver::Refuses => FRAME_WAIT_LONG,
        };
        let mut network = NetworkFactory::new(clients.clone(), frame_wait)
            .new_client(2, &node)
            .await;
        let sent = network.full_snapshot(
            openraft::Vote::new_committed(1, 1),
            snapshot(),
            std::future::pending(),
            RPCOption::new(INSTALL_WAIT),
        );
        let err = match tokio::time::timeout(WAIT, sent).await {
            Err(_) => panic!("{behaviour:?}: the sender still waits after {WAIT:?}"),
            Ok(Ok(_)) => panic!("{behaviour:?}: no receiver here installs a snapshot"),
            Ok(Err(e)) => e.to_string(),
        };
        match behaviour {
            FakeReceiver::Stalls => {
                assert!(
                    err.contains("took no snapshot frame for 1000 ms"),
                    "{behaviour:?}: {err}"
                );
            }
            FakeReceiver::NeverAnswers => {
                assert_eq!(
                    taken.load(Ordering::SeqCst),
                    SNAPSHOT_BYTES,
                    "{behaviour:?}: the receiver took every byte before the wait for its answer"
                );
                assert!(
                    err.contains("no answer within 5s of the snapshot's last frame"),
                    "{behaviour:?}: {err}"
                );
            }
            FakeReceiver::Refuses => {
                assert!(err.contains(FAKE_REFUSAL), "{behaviour:?}: {err}");
            }
        }
        server.abort();
    }
}
