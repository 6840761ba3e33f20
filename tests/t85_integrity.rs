//! Integrity over real 3-node clusters: Merkle roots, cross-replica and deep verification,
//! scrub and repair, signed attestations, and source-against-escrow roots.
//!
//! Steps: mixed writes give identical roots on every replica, and any single change moves the
//! root; a flipped byte in one chunk file on one node is reported for exactly that node and
//! chunk, repaired by the scrubber, and never served; a record value corrupted under one node's
//! store is reported for that node and tenant; attestations verify offline and fail when
//! changed; the source's root equals the escrow's after a mirror and differs after an
//! unmirrored change; the leader's periodic checkpoint runs only when writes wait for one;
//! deep verify audits the stored tree and every kept checkpoint.

mod common;

use std::time::Duration;

use common::*;
use escrow::client::EscrowClient;
use escrow::mirror::artifacts::{download_file, upload_file};
use escrow::verify::{
    attest, source_root_of_dir, source_root_of_feed, trusted_keys, verify, VerifyReport,
};

async fn mixed_writes(client: &EscrowClient, dir: &std::path::Path) {
    for i in 0..50 {
        client
            .put(
                TENANT,
                "orders",
                &format!("k{i}"),
                format!("v{i}").into_bytes(),
            )
            .await
            .unwrap();
    }
    for i in 0..10 {
        client
            .delete(TENANT, "orders", &format!("k{i}"))
            .await
            .unwrap();
    }
    let file = dir.join("app.bin");
    std::fs::write(&file, random_bytes("app", 3 * 1024 * 1024)).unwrap();
    upload_file(client, "vendor", "app.bin", &file)
        .await
        .unwrap();
}

/// Overwrites `TENANT/orders/{key}`'s stored value on one node, bypassing Raft.
fn corrupt_record(node: &escrow::node::NodeHandle, key: &str) {
    let path = escrow::domain::RecordPath::parse(TENANT, "orders", key).unwrap();
    node.core
        .reader
        .overwrite_record_for_tests(&path, b"evil")
        .unwrap();
}

/// A 3-node cluster holding `count` records `TENANT/orders/k{i}` = "good", applied everywhere.
async fn cluster_with_orders(count: usize) -> (TestCluster, EscrowClient) {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    cluster
        .put_all_and_wait(
            "orders",
            (0..count).map(|i| (format!("k{i}"), b"good".to_vec())),
        )
        .await;
    let client = cluster.client();
    (cluster, client)
}

/// Damage the replicas' compared roots do not show: plain verify passes and deep verify fails.
/// Returns both reports.
async fn seen_by_deep_verify_only(client: &EscrowClient) -> (VerifyReport, VerifyReport) {
    let shallow = verify(client, None, false).await.unwrap();
    assert!(
        shallow.ok,
        "the roots replicas compare did not change, so comparing them cannot see it: {shallow:?}"
    );
    let deep = verify(client, None, true).await.unwrap();
    assert!(!deep.ok);
    (shallow, deep)
}

/// A 3-node cluster holding [`mixed_writes`]; the temporary dir holds the uploaded file.
async fn cluster_with_mixed_writes() -> (TestCluster, EscrowClient, tempfile::TempDir) {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();
    mixed_writes(&client, work.path()).await;
    (cluster, client, work)
}

// Goal: the leader's periodic checkpoint folds writes nobody verified into the Merkle trees:
// it is due after writes, records the roots a verification then reports, takes every dirty
// mark, and is skipped while nothing is pending.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t90_periodic_checkpoint_runs_only_when_writes_wait() {
    use escrow::workers::retention::checkpoint_if_pending;
    let (cluster, client, _work) = cluster_with_mixed_writes().await;
    let leader = cluster.node(cluster.index_of(cluster.wait_leader().await));
    let reader = &leader.core.reader;
    assert!(reader.merkle_pending().unwrap(), "writes left dirty marks");

    let index = checkpoint_if_pending(&leader.core)
        .await
        .expect("a checkpoint is due after writes");
    let checkpoint = reader.checkpoint(index).unwrap().expect("it is recorded");
    assert!(
        !reader.merkle_pending().unwrap(),
        "it took every dirty mark"
    );
    assert_eq!(
        checkpoint_if_pending(&leader.core).await,
        None,
        "nothing pending, none taken"
    );

    let report = verify(&client, None, true).await.unwrap();
    assert!(report.ok, "{report:?}");
    let recorded: std::collections::BTreeMap<String, String> = checkpoint
        .roots
        .iter()
        .map(|(ns, r)| (ns.clone(), escrow::domain::hex(&r.root)))
        .collect();
    assert_eq!(
        recorded, report.roots,
        "nothing changed since, so the roots agree"
    );
    assert!(recorded.contains_key(TENANT) && recorded.contains_key("vendor"));
    cluster.shutdown().await;
}

// Goal: roots are identical on all replicas after mixed writes, match a from-scratch
// recomputation (deep), and change when any single record or artifact changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t85_roots_agree_across_replicas_and_move_with_any_change() {
    let (cluster, client, work) = cluster_with_mixed_writes().await;

    let report = verify(&client, None, true).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.nodes_checked.len(), 3);
    assert!(report.roots.contains_key(TENANT) && report.roots.contains_key("vendor"));
    let tenant_root = report.roots[TENANT].clone();
    let vendor_root = report.roots["vendor"].clone();

    // One record changes: only that tenant's root moves.
    client
        .put(TENANT, "orders", "k20", b"changed".to_vec())
        .await
        .unwrap();
    let report = verify(&client, None, false).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_ne!(report.roots[TENANT], tenant_root);
    assert_eq!(report.roots["vendor"], vendor_root);
    // One byte of an artifact changes: the vendor root moves.
    let file = work.path().join("app.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[1_000_000] ^= 1;
    std::fs::write(&file, &bytes).unwrap();
    upload_file(&client, "vendor", "app.bin", &file)
        .await
        .unwrap();
    let report = verify(&client, Some("vendor"), false).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_ne!(report.roots["vendor"], vendor_root);
    cluster.shutdown().await;
}

// Goal: a node runs one deep check at a time (each reads the whole store and re-hashes its chunks): a
// second one asked meanwhile is refused with a reason, reported as that node unchecked, and
// the next one after it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t85_a_node_runs_one_deep_check_at_a_time() {
    let (cluster, client) = cluster_with_orders(20).await;
    let busy = cluster.node(0);
    let running = busy.core.deep_checks.try_acquire().unwrap();
    let report = verify(&client, None, true).await.unwrap();
    assert!(!report.ok, "{report:?}");
    assert_eq!(report.unchecked.len(), 1, "{report:?}");
    assert_eq!(report.unchecked[0].node, busy.id);
    assert!(
        report.unchecked[0]
            .error
            .contains("already running a deep verify"),
        "{report:?}"
    );
    assert!(report.disagreements.is_empty(), "{report:?}");
    drop(running);
    let report = verify(&client, None, true).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.deep.len(), 3, "{report:?}");
    cluster.shutdown().await;
}

// Goal: a flipped byte in one chunk file on one replica is reported by `verify --deep` for
// exactly that node and chunk, the scrubber repairs it, a second verify is clean, and readers
// never get the corrupt bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t86_flipped_chunk_byte_is_reported_repaired_and_never_served() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();
    let bytes = random_bytes("data", 4 * 1024 * 1024);
    let chunks = upload_vendor_artifact(&client, work.path(), "data.bin", &bytes).await;
    let victim = cluster.node(1);
    wait_for("node 2 to hold every chunk", || async {
        chunks
            .iter()
            .all(|h| victim.core.chunks.has(h))
            .then_some(())
    })
    .await;

    let flip = |hash: &[u8; 32]| {
        let path = victim.core.chunks.file_of(hash);
        let mut b = std::fs::read(&path).unwrap();
        b[17] ^= 0x40;
        std::fs::write(&path, b).unwrap();
    };
    flip(&chunks[1]);
    let report = verify(&client, None, true).await.unwrap();
    assert!(!report.ok);
    assert_eq!(report.disagreements.len(), 1, "{:?}", report.disagreements);
    let d = &report.disagreements[0];
    assert_eq!(d.node, victim.id);
    assert_eq!(
        d.object,
        format!("chunk {}", escrow::domain::hex(&chunks[1]))
    );

    wait_for("the scrubber to repair the chunk", || async {
        victim.core.chunks.check(&chunks[1]).is_ok().then_some(())
    })
    .await;
    let report = verify(&client, None, true).await.unwrap();
    assert!(report.ok, "{report:?}");
    assert!(victim.core.chunks.corrupt_found.get() >= 1);

    // A reader asking the damaged node directly gets the right bytes.
    flip(&chunks[2]);
    let out = work.path().join("back.bin");
    let victim_client = cluster.client_for(1);
    download_file(&victim_client, "vendor", "data.bin", 0, &out)
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    cluster.shutdown().await;
}

// Goal: a record value corrupted under one replica's store (bypassing Raft) is reported as a
// root mismatch for that node and tenant, naming the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t87_corrupted_record_is_reported_for_its_node_and_tenant() {
    let (cluster, client) = cluster_with_orders(20).await;
    assert!(verify(&client, None, true).await.unwrap().ok);
    let victim = cluster.node(2);
    corrupt_record(victim, "k7");
    let report = verify(&client, None, true).await.unwrap();
    assert!(!report.ok);
    assert!(!report.disagreements.is_empty());
    for d in &report.disagreements {
        assert_eq!(d.node, victim.id, "{d:?}");
        assert_eq!(d.namespace, TENANT, "{d:?}");
    }
    assert!(
        report
            .disagreements
            .iter()
            .any(|d| d.object == "record orders/k7"),
        "{:?}",
        report.disagreements
    );
    cluster.shutdown().await;
}

// Goal: deep verification checks the stored Merkle tree itself, not only the leaves: a node
// corrupted in one replica's tree, with the roots it recorded unchanged (so the replicas still
// agree), is named for that node with its parent, and no other node is blamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t92_deep_verify_checks_the_stored_tree_not_only_the_leaves() {
    let (cluster, client) = cluster_with_orders(40).await;
    let clean = verify(&client, None, true).await.unwrap();
    assert!(clean.ok, "{clean:?}");

    let victim = cluster.node(1);
    let tenant = escrow::domain::TenantId::parse(TENANT).unwrap();
    let index = victim
        .core
        .reader
        .corrupt_tree_node_for_tests(&tenant, 1)
        .unwrap();
    let (_, deep) = seen_by_deep_verify_only(&client).await;
    for d in &deep.disagreements {
        assert_eq!(d.node, victim.id, "{d:?}");
        assert_eq!(d.namespace, TENANT, "{d:?}");
    }
    let objects: Vec<&str> = deep
        .disagreements
        .iter()
        .map(|d| d.object.as_str())
        .collect();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert!(
        objects[0].contains(&format!("node {index} at level 1")),
        "{objects:?}"
    );
    assert!(
        objects[1].contains(&format!("node {} at level 2", index / 16)),
        "{objects:?}"
    );
    cluster.shutdown().await;
}

// Goal: deep verification checks the checkpoints a node keeps, older ones included: a cluster
// root that no longer adds up to its checkpoint's namespace roots on one replica is named
// there, for that checkpoint; plain verify, which compares the newest checkpoint, cannot see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t93_deep_verify_checks_kept_checkpoints_add_up() {
    let (cluster, client) = cluster_with_orders(20).await;
    let older = verify(&client, None, true).await.unwrap();
    assert!(older.ok, "{older:?}");

    let victim = cluster.node(2);
    victim
        .core
        .reader
        .corrupt_checkpoint_for_tests(older.index)
        .unwrap();
    let (shallow, deep) = seen_by_deep_verify_only(&client).await;
    assert!(
        shallow.index > older.index,
        "a newer checkpoint was compared"
    );
    let faults: Vec<(u64, &str, &str)> = deep
        .disagreements
        .iter()
        .map(|d| (d.node, d.namespace.as_str(), d.object.as_str()))
        .collect();
    let object = format!(
        "cluster root in checkpoint {} (against its namespace roots)",
        older.index
    );
    assert_eq!(faults, vec![(victim.id, "", object.as_str())]);
    // Scoped to one tenant, deep verify leaves checkpoints (which span every namespace) alone.
    let scoped = verify(&client, Some(TENANT), true).await.unwrap();
    assert!(scoped.ok, "{scoped:?}");
    cluster.shutdown().await;
}

// Goal: deep verification scoped to one tenant checks that tenant only: its records and
// leaves, and just the chunks its artifact versions reference (none for a records-only
// tenant); damage in another tenant does not show up in it, and does in that tenant's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t91_deep_verify_of_one_tenant_checks_that_tenant_only() {
    let (cluster, client, _work) = cluster_with_mixed_writes().await;
    let chunks_checked = |report: &escrow::verify::VerifyReport| -> Vec<u64> {
        report.deep.iter().map(|d| d.chunks_checked).collect()
    };

    let all = verify(&client, None, true).await.unwrap();
    assert!(all.ok, "{all:?}");
    let every_chunk = chunks_checked(&all);
    assert_eq!(every_chunk.len(), 3);
    assert!(every_chunk.iter().all(|n| *n > 0 && *n == every_chunk[0]));
    let records_only = verify(&client, Some(TENANT), true).await.unwrap();
    assert!(records_only.ok, "{records_only:?}");
    assert_eq!(
        chunks_checked(&records_only),
        vec![0, 0, 0],
        "no artifacts, no chunks"
    );
    let vendor = verify(&client, Some("vendor"), true).await.unwrap();
    assert!(vendor.ok, "{vendor:?}");
    assert_eq!(
        chunks_checked(&vendor),
        every_chunk,
        "vendor holds every chunk"
    );

    let victim = cluster.node(2);
    corrupt_record(victim, "k20");
    let vendor = verify(&client, Some("vendor"), true).await.unwrap();
    assert!(
        vendor.ok,
        "another tenant's damage is not in vendor's report: {vendor:?}"
    );
    let tenant = verify(&client, Some(TENANT), true).await.unwrap();
    assert!(!tenant.ok);
    assert!(
        tenant
            .disagreements
            .iter()
            .any(|d| d.node == victim.id && d.object == "record orders/k20"),
        "{:?}",
        tenant.disagreements
    );
    cluster.shutdown().await;
}

// Goal: an attestation signed by every node verifies offline with the nodes' keys (also one
// scoped to a tenant), and `escrowctl attest verify` fails on any change.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t88_attestations_verify_offline_and_fail_when_changed() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    client
        .put(TENANT, "orders", "k", b"v".to_vec())
        .await
        .unwrap();
    let keys = trusted_keys(&client).await.unwrap();
    assert_eq!(keys.keys.len(), 3);
    let (doc, unchecked) = attest(&client, None).await.unwrap();
    assert!(unchecked.is_empty());
    assert_eq!(doc.signatures.len(), 3);
    escrow::attest::verify(&doc, &keys, None).unwrap();
    let (scoped, _) = attest(&client, Some(TENANT)).await.unwrap();
    assert_eq!(
        scoped.statement.roots.keys().collect::<Vec<_>>(),
        vec![TENANT]
    );
    assert_eq!(
        scoped.statement.roots[TENANT].root,
        doc.statement.roots[TENANT].root
    );
    escrow::attest::verify(&scoped, &keys, None).unwrap();

    // The offline CLI check, on the files a customer would keep.
    let work = tempfile::tempdir().unwrap();
    let doc_file = work.path().join("attestation.json");
    let keys_file = work.path().join("keys.json");
    std::fs::write(&doc_file, serde_json::to_vec(&doc).unwrap()).unwrap();
    std::fs::write(&keys_file, serde_json::to_vec(&keys).unwrap()).unwrap();
    let check = |file: &std::path::Path| {
        std::process::Command::new(escrowctl_bin())
            .args(["attest", "verify"])
            .arg(file)
            .arg("--keys")
            .arg(&keys_file)
            .env("ESCROWCTL_CONFIG", "/nonexistent/not-needed.toml")
            .output()
            .unwrap()
    };
    let out = check(&doc_file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(std::fs::read(&doc_file).unwrap()).unwrap();
    let tenant_root = &doc.statement.roots[TENANT].root;
    let flipped = if tenant_root.starts_with('0') {
        "1"
    } else {
        "0"
    };
    let tampered = text.replacen(
        tenant_root.as_str(),
        &format!("{flipped}{}", &tenant_root[1..]),
        1,
    );
    assert_ne!(tampered, text);
    let bad = work.path().join("tampered.json");
    std::fs::write(&bad, tampered).unwrap();
    let out = check(&bad);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("does not match"), "{stderr}");
    cluster.shutdown().await;
}

// Goal: the root the source computes equals the escrow's after a mirror (a tree and a record
// feed), and differs after a change at the source that was not mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t89_source_root_equals_escrow_root_until_an_unmirrored_change() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();

    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("a/b")).unwrap();
    for i in 0..30 {
        std::fs::write(
            tree.join(format!("a/b/f{i}")),
            random_bytes(&format!("f{i}"), 1000 + i * 97),
        )
        .unwrap();
    }
    std::fs::write(tree.join("big.bin"), random_bytes("big", 2 * 1024 * 1024)).unwrap();
    let options = escrow::mirror::dir::DirOptions {
        root: tree.clone(),
        namespace: "vendor".into(),
        state_file: work.path().join("dir-state.json"),
        once: true,
        rescan: Duration::from_secs(600),
    };
    escrow::mirror::dir::pass(&client, &options, &())
        .await
        .unwrap();
    let escrow_root =
        || async { verify(&client, None, false).await.unwrap().roots["vendor"].clone() };
    let (source, leaves) = source_root_of_dir("vendor", &tree).unwrap();
    assert_eq!(leaves, 31);
    assert_eq!(escrow::domain::hex(&source), escrow_root().await);
    std::fs::write(tree.join("a/b/f3"), b"changed at the source").unwrap();
    let (source, _) = source_root_of_dir("vendor", &tree).unwrap();
    assert_ne!(escrow::domain::hex(&source), escrow_root().await);

    add_tenant(&client, "crm").await;
    let feed = work.path().join("feed.jsonl");
    let mut text = String::new();
    for seq in 1..=40u64 {
        let key = format!("c{}", seq % 9);
        if seq % 5 == 0 {
            text.push_str(&format!(
                r#"{{"collection":"contacts","key":"{key}","op":"delete","seq":{seq},"time":1}}"#
            ));
        } else {
            text.push_str(&format!(
                r#"{{"collection":"contacts","key":"{key}","op":"put","value":"v{seq}","seq":{seq},"time":1}}"#
            ));
        }
        text.push('\n');
    }
    std::fs::write(&feed, &text).unwrap();
    let feed_options = escrow::mirror::records::FeedOptions {
        feed: Some(feed.clone()),
        tenant: "crm".into(),
        source: "crm".into(),
        state_file: work.path().join("feed-state.json"),
        once: true,
        batch_changes: 7,
    };
    escrow::mirror::records::run_feed(&client, &feed_options, &(), std::future::pending())
        .await
        .unwrap();
    let crm_root =
        || async { verify(&client, Some("crm"), false).await.unwrap().roots["crm"].clone() };
    let (source, _) = source_root_of_feed("crm", &feed).unwrap();
    assert_eq!(escrow::domain::hex(&source), crm_root().await);
    std::fs::write(
        &feed,
        format!(
            "{text}{}\n",
            r#"{"collection":"contacts","key":"c1","op":"put","value":"late","seq":41,"time":1}"#
        ),
    )
    .unwrap();
    let (source, _) = source_root_of_feed("crm", &feed).unwrap();
    assert_ne!(escrow::domain::hex(&source), crm_root().await);
    cluster.shutdown().await;
}
