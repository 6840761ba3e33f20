//! A 3-node cluster in-process over real TLS sockets: replication, restart, bad input, quorum
//! loss, and the cluster operations' rules.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;
use escrow::domain::{KEY_LEN_MAX, VALUE_LEN_MAX};
use tonic::Code;

// Goal: a write through any node is readable from every node, and survives a restart of all
// nodes; every acknowledged write is still there with its value.
//
// Steps:
// 1. Start and bootstrap 3 nodes.
// 2. Write 60 records, 20 through each node (followers forward to the leader).
// 3. Read every record from every node's local applied state once all caught up.
// 4. Stop all nodes, start them again, read every record linearizably.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t20_writes_through_any_node_are_readable_everywhere_and_survive_restart() {
    let mut cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let mut acked: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
    for node in 0..3 {
        let client = cluster.client_for(node);
        for i in 0..20 {
            let key = format!("n{node}-k{i}");
            let value = format!("value of {key}").into_bytes();
            let revision = client
                .put("acme", "orders", &key, value.clone())
                .await
                .unwrap();
            acked.insert(key, (value, revision));
        }
    }
    let max_revision = acked.values().map(|(_, r)| *r).max().unwrap();
    cluster.wait_applied(max_revision).await;
    for node in 0..3 {
        let client = cluster.client_for(node);
        for (key, (value, revision)) in &acked {
            let got = client.get("acme", "orders", key, true).await.unwrap();
            assert!(got.found, "node {node} lacks {key}");
            assert_eq!(
                &got.value, value,
                "node {node} has a different value for {key}"
            );
            assert_eq!(got.revision, *revision);
        }
    }

    for i in 0..3 {
        cluster.stop_node(i).await;
    }
    for i in 0..3 {
        cluster.restart_node(i).await;
    }
    cluster.wait_leader().await;
    let client = cluster.client();
    let mut lost = 0;
    for (key, (value, _)) in &acked {
        let got = client.get("acme", "orders", key, false).await.unwrap();
        if !got.found || &got.value != value {
            lost += 1;
        }
    }
    assert_eq!(
        lost,
        0,
        "{lost} of {} acknowledged writes lost across a full restart",
        acked.len()
    );
    cluster.shutdown().await;
}

// Goal: a leader replicates its new entries without waiting for its own log flush, and counts
// itself toward a quorum only once that flush is done (vendor/README.md). So while the
// leader's fsyncs are held, writes are acknowledged when both followers have them durable
// (and survive losing the leader), and are not acknowledged when one follower is down.
//
// Steps:
// 1. Start 3 nodes; hold the leader's log fsyncs.
// 2. Write 20 records through the leader: each is acknowledged (both followers flushed it).
// 3. Stop the leader (its hold goes with it); the other two elect a leader and serve all 20.
// 4. Restart it; hold the new leader's fsyncs and stop the third node: a write is not
//    acknowledged within 3 s (the leader and one follower, the leader's copy not durable).
// 5. Release the hold: a write is acknowledged again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t26_leader_counts_itself_only_after_its_own_log_flush() {
    let mut cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let leader = cluster.index_of(cluster.wait_leader().await);
    let hold = cluster.node(leader).log_store.hold_syncs_for_tests();
    let client = cluster
        .client_for(leader)
        .with_deadline(Duration::from_secs(5));
    let mut acked = BTreeMap::new();
    for i in 0..20 {
        let key = format!("held-{i}");
        let value = random_bytes(&key, 512);
        let revision = client
            .put("acme", "orders", &key, value.clone())
            .await
            .unwrap_or_else(|e| panic!("write {key} with the leader's fsync held: {e}"));
        acked.insert(key, (value, revision));
    }

    cluster.stop_node(leader).await;
    drop(hold);
    let new_leader = wait_for("a leader other than the stopped node", || async {
        let i = cluster.index_of(cluster.wait_leader().await);
        (i != leader).then_some(i)
    })
    .await;
    let reader = cluster.client_for(new_leader);
    for (key, (value, revision)) in &acked {
        let got = reader.get("acme", "orders", key, false).await.unwrap();
        assert!(got.found, "acknowledged {key} lost with the leader");
        assert_eq!(&got.value, value, "{key} changed");
        assert_eq!(got.revision, *revision, "{key} has another revision");
    }

    cluster.restart_node(leader).await;
    let new_leader = cluster.index_of(cluster.wait_leader().await);
    let hold = cluster.node(new_leader).log_store.hold_syncs_for_tests();
    let third = (0..3).find(|&i| i != new_leader).unwrap();
    let follower = (0..3).find(|&i| i != new_leader && i != third).unwrap();
    cluster.stop_node(third).await;
    let follower_log = || {
        cluster
            .node(follower)
            .raft
            .metrics()
            .borrow()
            .last_log_index
    };
    let before = follower_log();
    let client = cluster
        .client_for(new_leader)
        .with_deadline(Duration::from_secs(3));
    let result = client
        .put("acme", "orders", "unflushed", b"v".to_vec())
        .await;
    assert!(
        result.is_err(),
        "acknowledged with one durable copy: the leader counted its unflushed log ({result:?})"
    );
    assert!(
        follower_log() > before,
        "the write never reached the follower, so the test shows nothing"
    );
    drop(hold);
    let client = cluster
        .client_for(new_leader)
        .with_deadline(Duration::from_secs(15));
    client
        .put("acme", "orders", "flushed", b"v".to_vec())
        .await
        .expect("a write once the leader's fsync is released");
    cluster.shutdown().await;
}

/// A put that must be refused: what, tenant, key, value, code, message part.
type BadPut = (&'static str, String, String, Vec<u8>, Code, &'static str);

// Goal: bad input gets a clear error with the right code, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t21_bad_input_is_refused_and_changes_nothing() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    let seed = client
        .put("acme", "orders", "seed", b"x".to_vec())
        .await
        .unwrap();
    // Every node has applied the seed before the baseline is read: a follower applying it
    // later would look like a refused request changing its state.
    cluster.wait_applied(seed).await;
    let applied_before: Vec<u64> = (0..3)
        .map(|i| cluster.node(i).core.reader.applied_index())
        .collect();

    // (what, tenant, key, value, expected code, expected message part)
    let cases: Vec<BadPut> = vec![
        (
            "empty key",
            "acme".into(),
            "".into(),
            b"v".to_vec(),
            Code::InvalidArgument,
            "key is empty",
        ),
        (
            "oversized key",
            "acme".into(),
            "k".repeat(KEY_LEN_MAX + 1),
            b"v".to_vec(),
            Code::ResourceExhausted,
            "key is",
        ),
        (
            "empty value",
            "acme".into(),
            "k".into(),
            Vec::new(),
            Code::InvalidArgument,
            "value is empty",
        ),
        (
            "oversized value",
            "acme".into(),
            "k".into(),
            vec![0; VALUE_LEN_MAX + 1],
            Code::ResourceExhausted,
            "value is",
        ),
        (
            "bad tenant",
            "Acme!".into(),
            "k".into(),
            b"v".to_vec(),
            Code::InvalidArgument,
            "tenant id",
        ),
        (
            "empty tenant",
            "".into(),
            "k".into(),
            b"v".to_vec(),
            Code::InvalidArgument,
            "tenant id is empty",
        ),
    ];
    for (what, tenant, key, value, code, message) in cases {
        let err = client
            .put(&tenant, "orders", &key, value)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(code), "{what}: {err}");
        assert!(
            err.to_string().contains(message),
            "{what}: message {err:?} lacks {message:?}"
        );
    }
    let err = client
        .get("acme", "Bad Collection", "k", false)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));

    // A request without its record is malformed.
    let cfg = cluster.client_config();
    let token = escrow::auth::read_token(&cfg.token_file).unwrap();
    let ca = std::fs::read(&cfg.ca).unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("https://{}", cfg.endpoints[0]))
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca)),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut raw = escrow::pb::records_client::RecordsClient::new(channel);
    let req = escrow::pb::PutRequest {
        record: None,
        value: b"v".to_vec(),
    };
    let err = raw.put(with_bearer(req, &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A message over the client port's limit is refused before it is decoded, with the code
    // gRPC gives a message larger than the configured limit (tonic's own is OUT_OF_RANGE).
    let mut big = raw.clone().max_encoding_message_size(usize::MAX);
    let req = escrow::pb::PutRequest {
        record: Some(escrow::pb::RecordRef {
            tenant: "acme".into(),
            collection: "orders".into(),
            key: "k".into(),
        }),
        value: vec![0; escrow::node::CLIENT_MESSAGE_BYTES_MAX + 1],
    };
    let err = big.put(with_bearer(req, &token)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("message length too large"),
        "{err:?}"
    );

    // A write sent after every refusal was answered: a refused request that reached the log
    // anyway sits before it, so every node has applied it by the time it has the barrier.
    use openraft::RaftLogReader;
    let barrier = cluster.put_and_wait("t21-barrier").await;
    for (i, before) in applied_before.into_iter().enumerate() {
        let node = cluster.node(i);
        let mut log = node.log_store.clone();
        let entries = log.try_get_log_entries(before + 1..=barrier).await.unwrap();
        assert_eq!(entries.len() as u64, barrier - before, "node {i}'s log");
        let mut written = Vec::new();
        for entry in entries {
            if let openraft::EntryPayload::Normal(command) = entry.payload {
                record_writes(&command, &mut written);
            }
        }
        // The barrier itself may be there twice (a client retry after a lost answer).
        assert!(
            !written.is_empty() && written.iter().all(|w| w == "acme/orders/t21-barrier"),
            "node {i}: a refused request reached the log: {written:?}"
        );
        assert!(
            local_record(node, "orders", "k").is_none(),
            "node {i}: a refused write is readable"
        );
    }
    cluster.shutdown().await;
}

/// The records `command` writes or deletes, as tenant/collection/key, batches unpacked.
fn record_writes(command: &escrow::ledger::Command, out: &mut Vec<String>) {
    use escrow::ledger::Command;
    match command {
        Command::PutRecord { path, .. } | Command::DeleteRecord { path } => out.push(format!(
            "{}/{}/{}",
            path.tenant.as_str(),
            path.collection.as_str(),
            path.key.as_str()
        )),
        Command::Batch(commands) | Command::Timed { commands, .. } => {
            for c in commands {
                record_writes(c, out);
            }
        }
        _ => {}
    }
}

// Goal: without a quorum, a write fails within its deadline instead of hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t22_write_without_quorum_fails_within_deadline() {
    let mut cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let leader = cluster.wait_leader().await;
    let survivor = cluster.index_of(leader);
    for i in 0..3 {
        if i != survivor {
            cluster.stop_node(i).await;
        }
    }
    // The client allows more than the server's commit timeout, so the answer must come from
    // the node itself: a clear DEADLINE_EXCEEDED, not a hang cut short by the client.
    let deadline = escrow::service::WRITE_COMMIT_TIMEOUT + Duration::from_secs(10);
    let client = cluster.client_for(survivor).with_deadline(deadline);
    let started = Instant::now();
    let result = tokio::time::timeout(
        deadline + Duration::from_secs(10),
        client.put("acme", "orders", "k", b"v".to_vec()),
    )
    .await
    .expect("the write hung past its deadline");
    let err = result.expect_err("a write without quorum must not be acknowledged");
    assert_eq!(
        err.code(),
        Some(Code::DeadlineExceeded),
        "unexpected error {err}"
    );
    assert!(err.to_string().contains("not committed within"), "{err}");
    assert!(
        started.elapsed() < deadline,
        "the node did not answer by itself"
    );
    eprintln!(
        "no-quorum write failed after {:?}: {err}",
        started.elapsed()
    );
    // A client that reaches no node at all says, once its deadline has passed, which endpoint
    // it tried last and why, not only that time ran out: one whose node is stopped (refused at
    // once), and one that takes the connection and never answers (time runs out during the
    // attempt).
    let stopped = cluster.client_config().endpoints[(survivor + 1) % 3].clone();
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    for addr in [stopped, silent.local_addr().unwrap().to_string()] {
        let mut config = cluster.client_config();
        config.endpoints = vec![addr.clone()];
        let client = escrow::client::EscrowClient::new(&config)
            .unwrap()
            .with_deadline(Duration::from_secs(2));
        let err = client
            .put("acme", "orders", "k", b"v".to_vec())
            .await
            .expect_err("no node answers");
        assert_eq!(err.code(), Some(Code::DeadlineExceeded), "{err}");
        assert!(
            err.to_string()
                .contains(&format!("the last, {addr}, said: ")),
            "{err}"
        );
        eprintln!("no node reached: {err}");
    }
    drop(silent);
    cluster.shutdown().await;
}

// Goal: `cluster init` bootstraps only when every node it lists answers at its listed address
// as itself: with one node down it is refused with the reason and nothing is initialized;
// once that node is up, the same init succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t28_init_refuses_a_listed_node_that_does_not_answer() {
    let mut cluster = TestCluster::start(3, test_raft()).await;
    cluster.stop_node(2).await;
    let err = cluster
        .client_for(0)
        .init()
        .await
        .expect_err("init with a listed node down");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("node 3 at") && text.contains("nothing was initialized"),
        "{text}"
    );
    for i in 0..2 {
        assert!(
            !cluster.node(i).raft.is_initialized().await.unwrap(),
            "node {i} was initialized by a refused init"
        );
    }
    cluster.restart_node(2).await;
    cluster
        .client_for(0)
        .init()
        .await
        .expect("init with every node up");
    cluster.wait_leader().await;
    cluster.shutdown().await;
}

// Goal: `cluster status` reports the leader and every node with role, applied index and
// reachability; an unreachable node is reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t23_cluster_status_reports_every_node() {
    let mut cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let leader = cluster.wait_leader().await;
    let revision = cluster.put_and_wait("k").await;
    let status = cluster.client().cluster_status().await.unwrap();
    assert_eq!(status.leader, Some(leader));
    assert_eq!(status.nodes.len(), 3);
    for n in &status.nodes {
        assert!(n.reachable);
        assert_eq!(n.role, "voter");
        assert!(n.applied_index >= revision);
        assert!(n.disk_free_bytes.is_some_and(|free| free > 0), "{n:?}");
        assert_eq!(n.disk_reserve_bytes, Some(TEST_DISK_RESERVE_BYTES));
    }
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    cluster.stop_node(cluster.index_of(follower)).await;
    let status = cluster.client().cluster_status().await.unwrap();
    let down = status.nodes.iter().find(|n| n.id == follower).unwrap();
    assert!(!down.reachable);
    assert_eq!(
        (down.disk_free_bytes, down.disk_reserve_bytes),
        (None, None)
    );
    // Init on an initialized cluster is refused.
    let err = cluster.client().init().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::AlreadyExists), "{err}");
    cluster.shutdown().await;
}

// Goal: values at the size limit replicate to a follower that fell behind (its catch-up
// AppendEntries carry several maximum-size entries) and are served intact there; a client
// whose first endpoint is the stopped node writes through the others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t24_large_values_reach_a_lagging_follower() {
    let mut cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let leader = cluster.wait_leader().await;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let fi = cluster.index_of(follower);
    cluster.stop_node(fi).await;
    let client = cluster.client_trying_first(fi);
    let mut last = 0;
    for i in 0..12u8 {
        let value = vec![i; VALUE_LEN_MAX];
        last = client
            .put("acme", "blobs", &format!("big-{i}"), value)
            .await
            .unwrap();
    }
    cluster.restart_node(fi).await;
    cluster.wait_applied(last).await;
    let node = cluster.node(fi);
    for i in 0..12u8 {
        let (_, got) = local_record(node, "blobs", &format!("big-{i}")).expect("replicated");
        assert_eq!(got.len(), VALUE_LEN_MAX);
        assert!(
            got.iter().all(|b| *b == i),
            "big-{i} corrupted on the follower"
        );
    }
    cluster.shutdown().await;
}

/// Waits until every node refuses writes for a low disk (`refusing`), or none does, its metric
/// saying the same.
async fn wait_disk_refusals(cluster: &TestCluster, refusing: bool) {
    wait_for("every node's view of the members' disks", || async {
        (0..3)
            .all(|i| {
                let core = &cluster.node(i).core;
                core.disk.refusal().is_some() == refusing
                    && core.metrics.writes_refused_low_disk.get() == refusing as i64
            })
            .then_some(())
    })
    .await
}

// Goal: while one voter's free disk space is under its reserve (`storage.reserve_bytes`),
// writes that add data are refused wherever they arrive, with RESOURCE_EXHAUSTED naming that
// node, and change nothing; reads and checkpoints go on; once the voter has room again,
// writes are accepted and every acknowledged write is still there.
//
// Steps:
// 1. Write a record, then restart node 3 with a reserve larger than any disk.
// 2. Once every node has heard, a put and a delete through each node are refused and an
//    artifact upload too; a linearizable read and a checkpoint work; a read through node 3
//    of an artifact whose chunk it lost gets the right bytes and keeps no copy; the refused
//    key is absent.
// 3. Restart node 3 with the guard off: chunk sync brings the lost chunk back, and writes
//    through every node are accepted again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t27_a_member_under_its_disk_reserve_stops_writes_not_reads() {
    use escrow::mirror::artifacts::download_file;
    let mut cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    client
        .put(TENANT, "orders", "before", b"kept".to_vec())
        .await
        .unwrap();
    // An artifact every node holds, to read back from node 3 once it has lost a chunk.
    let work = tempfile::tempdir().unwrap();
    let stored_bytes = random_bytes("t27-stored", 1024 * 1024);
    let chunks = upload_vendor_artifact(&client, work.path(), "stored.bin", &stored_bytes).await;
    wait_for("node 3 to hold every chunk", || async {
        let store = &cluster.node(2).core.chunks;
        chunks.iter().all(|h| store.has(h)).then_some(())
    })
    .await;
    cluster.stop_node(2).await;
    // More than any disk holds (and within TOML's integers).
    cluster.edit_node_config(2, |c| c.storage.reserve_bytes = 1 << 62);
    cluster.restart_node(2).await;
    wait_disk_refusals(&cluster, true).await;

    let refused = |what: &str, e: escrow::client::ClientError| {
        assert_eq!(e.code(), Some(Code::ResourceExhausted), "{what}: {e}");
        assert!(e.is_low_disk(), "{what}: not marked as a low disk: {e}");
        let text = e.to_string();
        assert!(text.starts_with("disk low: "), "{what}: {text}");
        assert!(
            text.contains("node 3 has") && text.contains("storage.reserve_bytes"),
            "{what}: {text}"
        );
    };
    for i in 0..3 {
        let c = cluster.client_for(i);
        let put = c.put(TENANT, "orders", "during", b"x".to_vec()).await;
        refused(&format!("put through node {}", i + 1), put.unwrap_err());
        let delete = c.delete(TENANT, "orders", "before").await;
        refused(
            &format!("delete through node {}", i + 1),
            delete.unwrap_err(),
        );
        let got = c.get(TENANT, "orders", "before", false).await.unwrap();
        assert_eq!(got.value, b"kept".to_vec(), "read through node {}", i + 1);
    }
    let file = work.path().join("app.bin");
    std::fs::write(&file, random_bytes("t27", 300 * 1024)).unwrap();
    let upload = escrow::mirror::artifacts::upload_file(&client, "vendor", "app.bin", &file).await;
    let upload = upload
        .expect_err("an upload while a disk is low")
        .to_string();
    assert!(upload.contains("storage.reserve_bytes"), "{upload}");
    client.checkpoint().await.unwrap();
    // Node 3, under its own reserve, lost a chunk: a read through it gets the right bytes
    // (fetched from a peer and verified) without keeping a copy there.
    let lost = cluster.node(2).core.chunks.file_of(&chunks[0]);
    std::fs::remove_file(&lost).unwrap();
    let back = work.path().join("back.bin");
    download_file(&cluster.client_for(2), "vendor", "stored.bin", 0, &back)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), stored_bytes);
    assert!(
        !cluster.node(2).core.chunks.has(&chunks[0]),
        "a node under its reserve kept a fetched chunk"
    );
    let status = client.cluster_status().await.unwrap();
    let low = status.nodes.iter().find(|n| n.id == 3).unwrap();
    assert_eq!(low.disk_reserve_bytes, Some(1 << 62));
    assert!(low.disk_free_bytes.unwrap() < 1 << 62);
    let absent = client.get(TENANT, "orders", "during", false).await.unwrap();
    assert!(!absent.found, "a refused write changed nothing");

    cluster.stop_node(2).await;
    cluster.edit_node_config(2, |c| c.storage.reserve_bytes = 0);
    cluster.restart_node(2).await;
    wait_disk_refusals(&cluster, false).await;
    // With room again, chunk sync brings the lost chunk back.
    wait_for("node 3 to fetch its lost chunk", || async {
        cluster.node(2).core.chunks.has(&chunks[0]).then_some(())
    })
    .await;
    for i in 0..3 {
        let key = format!("after{i}");
        cluster
            .client_for(i)
            .put(TENANT, "orders", &key, b"y".to_vec())
            .await
            .unwrap();
    }
    let got = client.get(TENANT, "orders", "before", false).await.unwrap();
    assert_eq!(got.value, b"kept".to_vec());
    cluster.shutdown().await;
}
