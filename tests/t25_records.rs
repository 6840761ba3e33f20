//! Tenants and versioned records over a real 3-node cluster.
//!
//! Steps: register and list tenants; write, delete and rewrite a record and read its history,
//! a given revision and "as of" a time, from every node; ingest a batch twice and check it was
//! applied once; suspend and resume a tenant; bad input and unknown tenants change nothing;
//! freshness figures follow the source.

mod common;

use std::time::Duration;

use common::*;
use escrow::client::{record_ref, EscrowClient, TenantOp};
use escrow::pb;
use tonic::Code;

fn change(key: &str, value: Option<&str>, seq: u64, source_ms: u64) -> pb::Change {
    pb::Change {
        collection: "orders".into(),
        key: key.into(),
        delete: value.is_none(),
        value: value.map(|v| v.as_bytes().to_vec()).unwrap_or_default(),
        seq,
        source_ms,
    }
}

async fn history(client: &EscrowClient, key: &str, local: bool) -> Vec<pb::RecordVersion> {
    client
        .history(record_ref(TENANT, "orders", key), local, None, 0)
        .await
        .unwrap()
        .versions
}

// Goal: every change is a version stamped with its commit index and a monotonic leader time;
// deletes are tombstones; latest, a given revision and "as of" a time all read back right, on
// every node; tenants gate writes and report their figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t25_versioned_records_and_tenants() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();

    // Tenants: the registered one is listed, with the vendor namespace beside it; it has never
    // been mirrored into, so it is stale.
    let list = client.tenants(false).await.unwrap();
    assert_eq!(list.tenants.len(), 1);
    assert_eq!(list.tenants[0].id, TENANT);
    assert_eq!(list.tenants[0].state, "active");
    assert!(list.tenants[0].freshness.as_ref().unwrap().stale);
    assert_eq!(list.vendor.as_ref().unwrap().id, "vendor");
    let dup = client.tenant(TenantOp::Add, TENANT).await.unwrap_err();
    assert_eq!(dup.code(), Some(Code::AlreadyExists), "{dup}");
    for bad in ["Bad_ID", "-x", "vendor"] {
        let err = client.tenant(TenantOp::Add, bad).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument), "{bad}: {err}");
    }
    let err = client
        .put("nobody", "orders", "k", b"v".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(err.to_string().contains("unknown tenant"), "{err}");

    // Versions: put, put, delete, put.
    let r1 = client
        .put(TENANT, "orders", "k", b"one".to_vec())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r2 = client
        .put(TENANT, "orders", "k", b"two".to_vec())
        .await
        .unwrap();
    let r3 = client.delete(TENANT, "orders", "k").await.unwrap().revision;
    let r4 = client
        .put(TENANT, "orders", "k", b"four".to_vec())
        .await
        .unwrap();
    assert!(r1 < r2 && r2 < r3 && r3 < r4);

    // Every node, read linearizably through itself (a follower asks the leader for its read
    // index), has the same history right after the writes were acknowledged.
    let mut reference = None;
    for i in 0..3 {
        let versions = history(&cluster.client_for(i), "k", false).await;
        let revisions: Vec<u64> = versions.iter().map(|v| v.revision).collect();
        assert_eq!(revisions, vec![r4, r3, r2, r1], "node {i}");
        assert!(versions[1].deleted && versions[1].value.is_empty());
        assert_eq!(versions[0].value, b"four");
        assert!(
            versions.windows(2).all(|w| w[0].time_ms >= w[1].time_ms),
            "times run backwards: {versions:?}"
        );
        match &reference {
            None => reference = Some(versions),
            Some(r) => assert_eq!(r, &versions, "node {i} disagrees"),
        }
    }
    let versions = reference.unwrap();
    let t1 = versions[3].time_ms;

    let at = |revision, as_of_ms| {
        client.get_at(record_ref(TENANT, "orders", "k"), false, revision, as_of_ms)
    };
    let got = at(r2, 0).await.unwrap();
    assert!(got.found);
    assert_eq!(got.value, b"two");
    let got = at(r3, 0).await.unwrap();
    assert!(!got.found && got.deleted);
    assert_eq!(got.revision, r3);
    let got = at(r3 + (r4 - r3) / 2, 0).await.unwrap();
    assert!(
        got.deleted,
        "between the delete and the next put it is deleted"
    );
    let got = at(0, t1).await.unwrap();
    assert_eq!(got.value, b"one", "as of the first version's time");
    assert!(
        !at(0, t1 - 1).await.unwrap().found,
        "before anything existed"
    );
    let err = at(r2, t1).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert_eq!(at(0, 0).await.unwrap().value, b"four");

    // An ingest batch sent twice (an agent retrying) is applied once.
    let now = escrow::service::now_ms();
    let batch = vec![
        change("a", Some("1"), 1, now - 5_000),
        change("a", Some("2"), 2, now - 5_000),
        change("b", Some("x"), 3, now - 4_000),
        change("b", None, 4, now - 4_000),
    ];
    let first = client.ingest(TENANT, "crm", batch.clone()).await.unwrap();
    assert_eq!((first.applied, first.duplicates, first.position), (4, 0, 4));
    let again = client.ingest(TENANT, "crm", batch.clone()).await.unwrap();
    assert_eq!((again.applied, again.duplicates, again.position), (0, 4, 4));
    assert_eq!(again.revision, first.revision);
    assert_eq!(history(&client, "a", false).await.len(), 2);
    assert_eq!(history(&client, "b", false).await.len(), 2);
    assert_eq!(source_position(&client, TENANT, "crm").await, 4);

    // Bad batches are refused whole: nothing of them is applied.
    let bad_order = vec![
        change("c", Some("1"), 6, now),
        change("c", Some("2"), 5, now),
    ];
    let err = client.ingest(TENANT, "crm", bad_order).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let big = "x".repeat(escrow::domain::VALUE_LEN_MAX + 1);
    let oversize = vec![
        change("c", Some("ok"), 5, now),
        change("c", Some(&big), 6, now),
    ];
    let err = client.ingest(TENANT, "crm", oversize).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted), "{err}");
    let err = client
        .ingest("nobody", "crm", vec![change("c", Some("1"), 5, now)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert!(history(&client, "c", false).await.is_empty());
    assert_eq!(source_position(&client, TENANT, "crm").await, 4);

    // Freshness follows the source: fresh now, with the lag the batch had.
    let t = client.tenant(TenantOp::Show, TENANT).await.unwrap();
    let f = t.freshness.unwrap();
    assert!(!f.stale, "{f:?}");
    assert_eq!(f.last_source_ms, now - 4_000);
    assert!(f.lag_ms >= 4_000, "{f:?}");
    assert_eq!(f.records, 2, "k and a are live; b was deleted: {f:?}");
    assert_eq!(f.versions, 4 + 4);

    // A suspended tenant refuses writes and keeps serving reads; resumed, it writes again.
    client.tenant(TenantOp::Suspend, TENANT).await.unwrap();
    let err = client
        .put(TENANT, "orders", "k", b"five".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let err = client
        .ingest(TENANT, "crm", vec![change("c", Some("1"), 5, now)])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert_eq!(at(0, 0).await.unwrap().value, b"four");
    let t = client.tenant(TenantOp::Resume, TENANT).await.unwrap();
    assert_eq!(t.state, "active");
    client
        .put(TENANT, "orders", "k", b"five".to_vec())
        .await
        .unwrap();

    cluster.shutdown().await;
}
