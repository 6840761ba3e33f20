//! Transport security: the peer port admits only cluster-CA certificates, TLS is mandatory on
//! every port, and client services require the credential.
//!
//! Steps:
//! 1. Start and bootstrap a 3-node cluster.
//! 2. Call the peer service with the cluster's own node certificate (control: it works).
//! 3. Call it with a certificate from another CA, and with no certificate: both fail.
//! 4. Plaintext connections to the peer and client ports fail.
//! 5. Client calls without or with a wrong token are UNAUTHENTICATED.
//! 6. A node whose certificate comes from another CA cannot join.

mod common;

use std::time::Duration;

use common::*;
use escrow::pb;
use escrow::raft::network::ForNode;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
use tonic::Code;

/// A Vote request to `endpoint`, naming node `for_node` as the one it is for.
async fn vote_over(endpoint: Endpoint, for_node: u64) -> Result<pb::RaftMessage, String> {
    let channel = match tokio::time::timeout(Duration::from_secs(10), endpoint.connect()).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(format!("connect: {e:?}")),
        Err(_) => return Err("connect timed out".into()),
    };
    let mut client = pb::peer_client::PeerClient::with_interceptor(channel, ForNode::new(for_node));
    match tokio::time::timeout(Duration::from_secs(10), client.vote(stale_vote())).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("rpc: {s:?}")),
        Err(_) => Err("rpc timed out".into()),
    }
}

/// A vote request for a term far behind: harmless, answered with a rejection by a real peer.
fn stale_vote() -> pb::RaftMessage {
    let rpc = openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(0, 99), None);
    pb::RaftMessage {
        payload: escrow::raft::codec::encode(&rpc),
    }
}

/// A read of a record that need not exist: answered (not found is no error) with the token.
fn get_acme_k() -> pb::GetRequest {
    pb::GetRequest {
        record: Some(pb::RecordRef {
            tenant: "acme".into(),
            collection: "c".into(),
            key: "k".into(),
        }),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t30_peer_port_requires_cluster_ca_and_tls_everywhere() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let dir = &cluster.files.dir;
    let ca = std::fs::read(dir.join("pki/ca.pem")).unwrap();
    let raft_addr = cluster.node(0).raft_addr;
    let node0 = cluster.node(0).id;
    let client_addr = cluster.node(0).client_addr;
    let tls = |identity: Option<Identity>| {
        let mut t = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca));
        if let Some(i) = identity {
            t = t.identity(i);
        }
        Endpoint::from_shared(format!("https://{raft_addr}"))
            .unwrap()
            .tls_config(t)
            .unwrap()
    };

    // Control: a cluster certificate gets an answer, so the failures below are about the
    // certificate and nothing else.
    let own = Identity::from_pem(
        std::fs::read(dir.join("pki/node2.pem")).unwrap(),
        std::fs::read(dir.join("pki/node2.key")).unwrap(),
    );
    let reply = vote_over(tls(Some(own.clone())), node0)
        .await
        .expect("a cluster peer is admitted");
    let decoded: Result<openraft::raft::VoteResponse<u64>, openraft::error::RaftError<u64>> =
        escrow::raft::codec::decode(&reply.payload).unwrap();
    assert!(
        !decoded.unwrap().vote_granted,
        "a stale vote must not be granted"
    );

    // A cluster peer's request for another node (an address swapped or reused between nodes)
    // is refused with the reason: node 0 never answers for another node, so its vote and log
    // are never counted twice.
    let other = node0 + 10;
    let err = vote_over(tls(Some(own.clone())), other).await.unwrap_err();
    assert!(
        err.contains("FailedPrecondition")
            && err.contains(&format!("this is node {node0}, not node {other}")),
        "{err}"
    );
    // One naming no node comes from a node of an older build and is answered, so a cluster
    // can be upgraded one node at a time; one naming something else is malformed.
    let channel = tls(Some(own.clone())).connect().await.unwrap();
    let mut unaddressed = pb::peer_client::PeerClient::new(channel);
    unaddressed
        .vote(stale_vote())
        .await
        .expect("a request naming no node is answered");
    let mut bad = tonic::Request::new(stale_vote());
    bad.metadata_mut().insert(
        escrow::raft::network::PEER_TARGET_HEADER,
        "node-one".parse().unwrap(),
    );
    let err = unaddressed.vote(bad).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("is not a node id"), "{err:?}");

    // A certificate from another CA.
    let rogue_ca = escrow::pki::Ca::generate().unwrap();
    let (cert, key) = rogue_ca.issue("rogue", &["127.0.0.1".into()]).unwrap();
    let err = vote_over(tls(Some(Identity::from_pem(cert, key))), node0)
        .await
        .unwrap_err();
    // Refused by TLS, not by the service: the client's own transport fails (the server's
    // alert, or a connection closed or broken first, by timing); a status the peer service
    // sent would carry no transport error as its source.
    let by_tls = |err: &str| {
        err.starts_with("connect") || err.contains("source: Some(tonic::transport::Error")
    };
    assert!(by_tls(&err), "{err}");
    eprintln!("foreign-CA peer refused: {err}");

    // No client certificate at all.
    let err = vote_over(tls(None), node0).await.unwrap_err();
    assert!(by_tls(&err), "{err}");
    eprintln!("certificate-less peer refused: {err}");

    // Plaintext to the TLS ports, each with a call its port answers over TLS (the peer port's
    // Vote above; the client port's Get with the right token, below): both fail.
    let plain = Endpoint::from_shared(format!("http://{raft_addr}")).unwrap();
    let err = vote_over(plain, node0).await.unwrap_err();
    eprintln!("plaintext to the peer port refused: {err}");
    let cfg = cluster.client_config();
    let token = escrow::auth::read_token(&cfg.token_file).unwrap();
    let plain_get = async {
        let channel = Endpoint::from_shared(format!("http://{client_addr}"))
            .unwrap()
            .connect()
            .await
            .map_err(|e| format!("connect: {e:?}"))?;
        pb::records_client::RecordsClient::new(channel)
            .get(with_bearer(get_acme_k(), &token))
            .await
            .map_err(|s| format!("rpc: {s:?}"))
    };
    let err = tokio::time::timeout(Duration::from_secs(10), plain_get)
        .await
        .expect("a plaintext call to the client port ends")
        .unwrap_err();
    eprintln!("plaintext to the client port refused: {err}");

    // Client services: no credential, wrong credential.
    let channel = Endpoint::from_shared(format!("https://{client_addr}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut records = pb::records_client::RecordsClient::new(channel);
    let err = records.get(get_acme_k()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let wrong = with_bearer(get_acme_k(), "wrong-token-wrong-token-wrong");
    assert_eq!(
        records.get(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );
    assert!(
        records.get(with_bearer(get_acme_k(), &token)).await.is_ok(),
        "the right token is accepted"
    );

    // A malformed Raft payload from a real peer is refused as invalid, not a crash.
    let mut peer = pb::peer_client::PeerClient::with_interceptor(
        tls(Some(own)).connect().await.unwrap(),
        ForNode::new(node0),
    );
    let err = peer
        .append_entries(pb::RaftMessage {
            payload: vec![1, 255, 255, 255],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // A forwarded write is checked before it can become an entry: no batch (the leader forms
    // those), nothing bigger than a client message, no batches nested deep enough to overflow
    // the stack, no name its constructor refuses (which would break the key layout).
    use escrow::ledger::Command;
    use escrow::raft::network::ForwardRequest;
    let forward = |payload: Vec<u8>| {
        let mut peer = peer.clone();
        async move { peer.forward(pb::RaftMessage { payload }).await }
    };
    let write = |command: Command| escrow::raft::codec::encode(&ForwardRequest::Write(command));
    let batch = write(Command::Batch(vec![Command::Checkpoint]));
    let err = forward(batch).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("batches are formed by the leader"),
        "{err:?}"
    );
    let err = forward(vec![0; escrow::node::CLIENT_MESSAGE_BYTES_MAX + 1])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let one = write(Command::Batch(vec![Command::Checkpoint]));
    let leaf = write(Command::Checkpoint);
    // `one` is `leaf` with one level of batch in front of the command: repeat that level.
    let head = one.iter().zip(&leaf).take_while(|(a, b)| a == b).count();
    let level = &one[head..one.len() - (leaf.len() - head)];
    let mut deep = one[..head].to_vec();
    for _ in 0..100_000 {
        deep.extend_from_slice(level);
    }
    deep.extend_from_slice(&leaf[head..]);
    let err = forward(deep).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("nested deeper"), "{err:?}");
    let put = write(Command::PutRecord {
        path: escrow::domain::RecordPath::parse("aaaa", "orders", "k").unwrap(),
        value: b"v".to_vec(),
    });
    let at = put.windows(4).position(|w| w == b"aaaa").unwrap();
    let mut bad_tenant = put.clone();
    bad_tenant[at..at + 4].copy_from_slice(b"a/\0a");
    let err = forward(bad_tenant).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("tenant id"), "{err:?}");
    // The node is still up (a stack overflow would have aborted this process) and the
    // cluster goes on.
    cluster.put_and_wait("after-forwards").await;
    cluster.shutdown().await;
}

// Goal: a node holding a certificate from another CA cannot join: `cluster add` refuses it
// with the reason before the membership changes, and it never applies anything. A node added
// under another id than its own or at an address where nothing listens is refused the same
// way, and no refusal spends the id; a node under its disk reserve joins as a learner and is
// not promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t31_node_with_foreign_ca_cannot_join() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    cluster.put_and_wait("k").await;

    // The rogue node lives in its own dir with its own CA (and a copy of the token, to show
    // the certificate alone keeps it out).
    let rogue_dir = tempfile::tempdir().unwrap();
    let ports = node_ports(1)[0];
    let config_path =
        escrow::dev::write_node_files(rogue_dir.path(), 4, ports, &[], &test_raft()).unwrap();
    std::fs::copy(
        cluster.files.dir.join("secrets/ops.token"),
        rogue_dir.path().join("secrets/ops.token"),
    )
    .unwrap();
    let config = escrow::config::Config::load(&config_path).unwrap();
    let rogue = escrow::node::start(&config, Default::default())
        .await
        .unwrap();

    let client = cluster.client().with_deadline(Duration::from_secs(5));
    let member = pb::Member {
        id: 4,
        raft_addr: format!("127.0.0.1:{}", ports.raft),
        client_addr: format!("127.0.0.1:{}", ports.client),
        voter: false,
    };
    // Refused before the membership changes, with the reason, not a deadline.
    let err = client
        .add_node(member, true)
        .await
        .expect_err("adding a node outside the CA must not succeed");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string()
            .contains("cannot be reached over mutual TLS"),
        "{err}"
    );
    eprintln!("adding a node outside the CA refused: {err}");
    assert!(
        !is_member(&cluster, 4).await,
        "a refused add changed the membership"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        rogue.core.reader.applied_index(),
        0,
        "the rogue node received cluster data"
    );
    assert!(rogue.raft.metrics().borrow().current_leader.is_none());
    rogue.shutdown().await;

    // A node of this cluster's CA added under another id than its own is refused too, and
    // neither refusal spent an id: the node is then added under its own id, 4.
    let (node4, member) = cluster.start_extra_node(4, &test_raft()).await;
    let err = client
        .add_node(
            pb::Member {
                id: 5,
                ..member.clone()
            },
            true,
        )
        .await
        .expect_err("a node added under another id than its own");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string().contains("this is node 4, not node 5"),
        "{err}"
    );
    assert!(
        !is_member(&cluster, 5).await,
        "a refused add changed the membership"
    );
    // Nothing listening at the address (a typo): refused as well.
    let nowhere = format!("127.0.0.1:{}", free_ports(1)[0]);
    let err = client
        .add_node(
            pb::Member {
                raft_addr: nowhere,
                ..member.clone()
            },
            true,
        )
        .await
        .expect_err("a node added at an address where nothing listens");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    eprintln!("adding a node at an address where nothing listens refused: {err}");
    // A node under its disk reserve would hold up every write that adds data as a voter: it
    // joins as a learner, and its promotion is refused.
    let (low, low_member) = cluster
        .start_extra_node_with(5, &test_raft(), |c| c.storage.reserve_bytes = 1 << 62)
        .await;
    let err = cluster
        .client()
        .with_deadline(WAIT)
        .add_node(low_member, false)
        .await
        .expect_err("a node under its disk reserve made a voter");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    assert!(
        err.to_string().contains("node 5 has")
            && err.to_string().contains("under its reserve")
            && err.to_string().contains("it stays a learner"),
        "{err}"
    );
    assert!(
        is_member(&cluster, 5).await && !is_voter(&cluster, 5).await,
        "node 5 is a learner"
    );
    client.remove_node(5).await.unwrap();
    low.shutdown().await;
    client
        .with_deadline(WAIT)
        .add_node(member, true)
        .await
        .expect("id 4 is still free");
    assert!(is_member(&cluster, 4).await);
    node4.shutdown().await;
    cluster.shutdown().await;
}

/// The membership the current leader holds (looked up now: leadership may move).
async fn leader_membership(
    cluster: &TestCluster,
) -> openraft::Membership<u64, escrow::raft::EscrowNode> {
    let leader = cluster.node(cluster.index_of(cluster.wait_leader().await));
    let config = leader.raft.metrics().borrow().membership_config.clone();
    config.membership().clone()
}

/// Node `id` is a member (learner or voter) of the current leader's membership.
async fn is_member(cluster: &TestCluster, id: u64) -> bool {
    leader_membership(cluster).await.get_node(&id).is_some()
}

/// Node `id` is a voter in the current leader's membership.
async fn is_voter(cluster: &TestCluster, id: u64) -> bool {
    leader_membership(cluster)
        .await
        .voter_ids()
        .any(|v| v == id)
}
