//! Observability over HTTPS: `/metrics` in Prometheus text format with the Raft figures ops
//! watch, `/healthz`, `/readyz`; plaintext HTTP to the same port is refused.
//!
//! Steps:
//! 1. Start and bootstrap 3 nodes; write some records.
//! 2. GET /metrics on the leader over TLS (trusting the cluster CA): term, leader, commit and
//!    applied index, per-follower replication lag and the commit latency histogram are there,
//!    with values that match the cluster's state.
//! 3. /healthz and /readyz answer 200 on a follower without a credential; /metrics takes the
//!    metrics token or the ops token (401 without one or with another).
//! 4. A plaintext request gets no HTTP answer.
//! 5. With the other two nodes stopped, the follower's /readyz answers 503 (no leader), its
//!    /healthz still 200.

mod common;

use std::sync::Arc;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn https_get(ca_pem: &[u8], addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    https_get_as(ca_pem, addr, path, None).await
}

/// [`https_get`] with `Authorization: Bearer TOKEN`.
async fn https_get_as(
    ca_pem: &[u8],
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut tls = tls_connect(ca_pem, addr).await;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = tls.read_to_end(&mut out).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// A TLS connection to the HTTP listener at `addr`, trusting the cluster CA.
async fn tls_connect(
    ca_pem: &[u8],
    addr: std::net::SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("127.0.0.1").unwrap();
    connector.connect(name, tcp).await.unwrap()
}

/// The value of the first sample of `name` (any labels) in a Prometheus text body.
fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t80_metrics_health_and_readiness_over_tls() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let last = cluster
        .put_all_and_wait("orders", (0..20).map(|i| (format!("k{i}"), b"v".to_vec())))
        .await;
    let leader = cluster.wait_leader().await;
    let ca = std::fs::read(cluster.files.dir.join("pki/ca.pem")).unwrap();
    let secret = |name: &str| {
        let text = std::fs::read_to_string(cluster.files.dir.join("secrets").join(name));
        text.unwrap().trim().to_string()
    };
    let scrape = secret("metrics.token");
    let leader_node = cluster.node(cluster.index_of(leader));
    // /metrics names every tenant: it takes the metrics token or the ops token, nothing else.
    let addr = leader_node.http_addr;
    for (token, expect) in [
        (None, "missing credential"),
        (Some("not-the-token"), "invalid credential"),
    ] {
        let (status, body) = https_get_as(&ca, addr, "/metrics", token).await;
        assert_eq!(status, 401, "{token:?}: {body}");
        assert!(body.starts_with(expect), "{token:?}: {body}");
    }
    let (status, _) = https_get_as(&ca, addr, "/metrics", Some(&secret("ops.token"))).await;
    assert_eq!(status, 200, "the ops token reads /metrics");

    let body = wait_for("leader metrics to show the writes", || async {
        let (status, body) =
            https_get_as(&ca, leader_node.http_addr, "/metrics", Some(&scrape)).await;
        assert_eq!(status, 200);
        (sample(&body, "escrow_raft_applied_index")? >= last as f64
            && sample(&body, "escrow_raft_commit_index")? >= last as f64)
            .then_some(body)
    })
    .await;
    assert_eq!(sample(&body, "escrow_raft_leader_id"), Some(leader as f64));
    assert_eq!(sample(&body, "escrow_raft_is_leader"), Some(1.0));
    assert!(sample(&body, "escrow_raft_term").unwrap() >= 1.0);
    assert_eq!(sample(&body, "escrow_raft_voters"), Some(3.0));
    let lag_lines = body
        .lines()
        .filter(|l| l.starts_with("escrow_raft_replication_lag_entries{"))
        .count();
    assert_eq!(lag_lines, 2, "one lag series per follower:\n{body}");
    // Every put on the leader was proposed there, so the histogram counted at least 20.
    assert!(sample(&body, "escrow_raft_commit_latency_seconds_count").unwrap() >= 20.0);
    assert!(body.contains("escrow_raft_commit_latency_seconds_bucket{"));

    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let follower_node = cluster.node(cluster.index_of(follower));
    let (status, body) = https_get(&ca, follower_node.http_addr, "/healthz").await;
    assert_eq!((status, body.trim()), (200, "ok"));
    let (status, body) = https_get(&ca, follower_node.http_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    let (_, body) = https_get_as(&ca, follower_node.http_addr, "/metrics", Some(&scrape)).await;
    assert_eq!(sample(&body, "escrow_raft_is_leader"), Some(0.0));
    // The integrity totals are counters (so `rate()` and `increase()` apply to them), at 0 on
    // a node that found nothing corrupt.
    for name in [
        "escrow_chunks_corrupt_found",
        "escrow_chunks_repaired",
        "escrow_scrub_rounds",
    ] {
        assert!(body.contains(&format!("# TYPE {name} counter")), "{body}");
    }
    assert_eq!(
        sample(&body, "escrow_chunks_corrupt_found_total"),
        Some(0.0)
    );
    assert_eq!(sample(&body, "escrow_chunks_repaired_total"), Some(0.0));

    // Freshness per namespace, on a follower too: the 20 records, written just now, so fresh;
    // the vendor namespace never received anything, so it is stale.
    let acme = |name: &str, body: &str| {
        body.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("namespace=\"acme\""))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let body = wait_for("namespace metrics on a follower", || async {
        let (_, body) = https_get_as(&ca, follower_node.http_addr, "/metrics", Some(&scrape)).await;
        (acme("escrow_namespace_records", &body)? == 20.0).then_some(body)
    })
    .await;
    assert_eq!(acme("escrow_namespace_record_bytes", &body), Some(20.0));
    assert_eq!(acme("escrow_namespace_stale", &body), Some(0.0));
    assert!(
        body.contains("escrow_namespace_stale{node=\"") && body.contains("namespace=\"vendor\"} 1"),
        "{body}"
    );
    assert!(acme("escrow_namespace_last_commit_timestamp_seconds", &body).unwrap() > 1.7e9);
    assert!(body.contains("namespace=\"vendor\""), "{body}");

    // Plaintext HTTP to the TLS port gets no HTTP response.
    let mut tcp = tokio::net::TcpStream::connect(follower_node.http_addr)
        .await
        .unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ =
        tokio::time::timeout(std::time::Duration::from_secs(5), tcp.read_to_end(&mut out)).await;
    assert!(!String::from_utf8_lossy(&out).contains("200 OK"));

    // With the other two nodes stopped, the follower loses its leader: /readyz answers 503
    // and says why, while /healthz still answers 200.
    let follower_addr = follower_node.http_addr;
    // The other follower first: stopped first, the leader could leave the two to elect this
    // follower, which would then stay leader alone.
    let mut cluster = cluster;
    let other = (1..=3).find(|id| *id != follower && *id != leader).unwrap();
    for id in [other, leader] {
        cluster.stop_node(cluster.index_of(id)).await;
    }
    let body = wait_for("the lone follower to say it is not ready", || async {
        let (status, body) = https_get(&ca, follower_addr, "/readyz").await;
        (status == 503).then_some(body)
    })
    .await;
    assert!(body.contains("no leader known"), "{body}");
    let (status, _) = https_get(&ca, follower_addr, "/healthz").await;
    assert_eq!(status, 200);
    cluster.shutdown().await;
}

// Goal: connections that send nothing (a fresh one, or a keep-alive one after its answer) are
// closed after the header read timeout, so idle clients cannot take the listener's connection
// permits and lock out /healthz, /readyz and /metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t81_idle_http_connections_are_closed() {
    use escrow::http::HTTP_HEADER_READ_TIMEOUT;
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let ca = std::fs::read(cluster.files.dir.join("pki/ca.pem")).unwrap();
    let addr = cluster.node(0).http_addr;
    let mut silent = tls_connect(&ca, addr).await;
    let mut kept_alive = tls_connect(&ca, addr).await;
    kept_alive
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let limit = HTTP_HEADER_READ_TIMEOUT + std::time::Duration::from_secs(10);
    for (what, conn) in [("silent", &mut silent), ("kept alive", &mut kept_alive)] {
        let mut out = Vec::new();
        let read = tokio::time::timeout(limit, conn.read_to_end(&mut out)).await;
        assert!(
            read.is_ok(),
            "the {what} connection is still open after {:?}",
            started.elapsed()
        );
        if what == "kept alive" {
            let text = String::from_utf8_lossy(&out);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        }
    }
    assert!(started.elapsed() >= HTTP_HEADER_READ_TIMEOUT - std::time::Duration::from_secs(1));
    // The listener still answers.
    let (status, body) = https_get(&ca, addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    cluster.shutdown().await;
}
