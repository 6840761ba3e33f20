//! The record-feed mirror agent (`escrowctl mirror --records`) as a real process against a
//! real 3-node cluster.
//!
//! Steps: SIGKILL the agent in the middle of a feed and restart it: every event is applied
//! exactly once (history per key compared with the source); a malformed line, an oversized
//! record and an unknown tenant stop the feed with a one-line reason and nothing after them
//! applied; a following agent picks up lines appended later and stops cleanly on SIGTERM, and
//! stops with an error on a line that never ends (t79).

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use escrow::client::{record_ref, EscrowClient};

const KEYS: u64 = 50;

fn event(seq: u64) -> String {
    let key = format!("k{}", seq % KEYS);
    if seq.is_multiple_of(7) {
        format!(
            r#"{{"collection":"orders","key":"{key}","op":"delete","seq":{seq},"time":{}}}"#,
            1_700_000_000_000u64 + seq
        )
    } else {
        format!(
            r#"{{"collection":"orders","key":"{key}","op":"put","value":"v{seq}","seq":{seq},"time":"2026-11-22T10:00:00Z"}}"#
        )
    }
}

fn write_feed(path: &Path, seqs: std::ops::RangeInclusive<u64>) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    let mut text = String::new();
    for seq in seqs {
        text.push_str(&event(seq));
        text.push('\n');
    }
    f.write_all(text.as_bytes()).unwrap();
}

fn agent(config: &Path, feed: &Path, state: &Path, tenant: &str, extra: &[&str]) -> Command {
    let mut c = Command::new(escrowctl_bin());
    c.arg("--config")
        .arg(config)
        .args(["mirror", "--records"])
        .arg(feed)
        .args(["--tenant", tenant, "--source", "crm", "--state"])
        .arg(state)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// A new feed of `lines` events in `work` and a following agent (`--json`, no `--once`) on it:
/// the feed, its state file and the running agent.
fn follow_new_feed(
    config: &Path,
    work: &Path,
    lines: u64,
) -> (PathBuf, PathBuf, std::process::Child) {
    let feed = work.join("feed.jsonl");
    let state = work.join("state.json");
    write_feed(&feed, 1..=lines);
    let child = agent(config, &feed, &state, TENANT, &["--json"])
        .spawn()
        .unwrap();
    (feed, state, child)
}

/// Per key, the source's versions (value or None for a delete) in order, for seqs `1..=n`.
fn expected(n: u64) -> BTreeMap<String, Vec<Option<String>>> {
    let mut out: BTreeMap<String, Vec<Option<String>>> = BTreeMap::new();
    let mut live: BTreeMap<String, bool> = BTreeMap::new();
    for seq in 1..=n {
        let key = format!("k{}", seq % KEYS);
        if seq.is_multiple_of(7) {
            // A delete of a record that is absent or already deleted leaves no version.
            if live.get(&key).copied().unwrap_or(false) {
                out.entry(key.clone()).or_default().push(None);
            }
            live.insert(key, false);
        } else {
            out.entry(key.clone())
                .or_default()
                .push(Some(format!("v{seq}")));
            live.insert(key, true);
        }
    }
    out
}

/// Per key, the escrow's versions oldest first.
async fn escrowed(client: &EscrowClient) -> BTreeMap<String, Vec<Option<String>>> {
    let mut out = BTreeMap::new();
    for k in 0..KEYS {
        let key = format!("k{k}");
        let mut versions: Vec<escrow::pb::RecordVersion> = Vec::new();
        loop {
            let before = versions.last().map(|v| (v.revision, v.position));
            // Small pages, so paging through versions that share a revision is exercised.
            let page = client
                .history(record_ref(TENANT, "orders", &key), false, before, 7)
                .await
                .unwrap();
            if page.versions.is_empty() {
                break;
            }
            versions.extend(page.versions);
        }
        versions.reverse();
        if !versions.is_empty() {
            out.insert(
                key,
                versions
                    .into_iter()
                    .map(|v| (!v.deleted).then(|| String::from_utf8(v.value).unwrap()))
                    .collect(),
            );
        }
    }
    out
}

fn state_offset(state: &Path) -> u64 {
    std::fs::read(state)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["offset"].as_u64())
        .unwrap_or(0)
}

// Goal: an agent killed in the middle of a feed and restarted applies every event exactly once:
// the escrow's history per key equals the source's, and a rerun (even without its state file)
// applies nothing more.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t75_agent_restart_mid_feed_applies_every_event_once() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let cfg = cluster.files.client_config.clone();
    let work = tempfile::tempdir().unwrap();
    let feed = work.path().join("feed.jsonl");
    let state = work.path().join("state.json");
    const N: u64 = 12_000;
    write_feed(&feed, 1..=N);
    let feed_len = std::fs::metadata(&feed).unwrap().len();

    // Small batches so the feed takes long enough to be killed in the middle.
    let mut child = agent(
        &cfg,
        &feed,
        &state,
        TENANT,
        &["--once", "--batch", "8", "--quiet"],
    )
    .spawn()
    .unwrap();
    let started = Instant::now();
    while state_offset(&state) < feed_len / 4 {
        assert!(child.try_wait().unwrap().is_none(), "agent ended early");
        assert!(started.elapsed() < WAIT, "agent made no progress");
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL: no chance to flush or checkpoint
    child.wait().unwrap();
    let killed_at = state_offset(&state);
    assert!(killed_at < feed_len, "the agent was killed mid-feed");
    eprintln!("agent killed at byte {killed_at} of {feed_len}");

    let out = agent(&cfg, &feed, &state, TENANT, &["--once", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["position"], N);
    assert_eq!(state_offset(&state), feed_len);

    let client = cluster.client();
    assert_eq!(source_position(&client, TENANT, "crm").await, N);
    let want = expected(N);
    let got = escrowed(&client).await;
    assert_eq!(got.len(), want.len());
    for (key, versions) in &want {
        assert_eq!(got.get(key), Some(versions), "history of {key}");
    }

    // Rerun without the state file: it rereads everything and the cluster applies nothing.
    std::fs::remove_file(&state).unwrap();
    let out = agent(&cfg, &feed, &state, TENANT, &["--once", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["applied"], 0);
    assert_eq!(report["duplicates"], N);
    assert_eq!(escrowed(&client).await, got);

    cluster.shutdown().await;
}

// Goal: bad feeds stop with a one-line reason naming the line, the valid lines before it are
// applied, and nothing after it; an unknown tenant applies nothing at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t76_bad_feeds_stop_cleanly_and_apply_nothing_after() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let cfg = cluster.files.client_config.clone();
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();

    let big = "x".repeat(escrow::domain::VALUE_LEN_MAX + 1);
    let cases = [
        (
            "malformed",
            "{\"collection\":\"orders\",\"key\":".to_string(),
            "not a valid event",
        ),
        (
            "oversize",
            format!(
                r#"{{"collection":"orders","key":"big","op":"put","value":"{big}","seq":11,"time":1}}"#
            ),
            "over the limit",
        ),
        (
            "order",
            r#"{"collection":"orders","key":"k1","op":"put","value":"v","seq":3,"time":1}"#
                .to_string(),
            "does not increase",
        ),
    ];
    for (i, (name, bad_line, why)) in cases.iter().enumerate() {
        let tenant = format!("bad-{name}");
        add_tenant(&client, &tenant).await;
        let feed = work.path().join(format!("{name}.jsonl"));
        write_feed(&feed, 1..=10);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&feed)
            .unwrap();
        writeln!(f, "{bad_line}").unwrap();
        drop(f);
        write_feed(&feed, 12..=20);
        let state = work.path().join(format!("state-{i}.json"));
        let out = agent(&cfg, &feed, &state, &tenant, &["--once"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name}: the agent must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.trim_end().lines().count(), 1, "{name}: {stderr}");
        assert!(stderr.contains("line 11"), "{name}: {stderr}");
        assert!(stderr.contains(why), "{name}: {stderr}");
        let position = source_position(&client, &tenant, "crm").await;
        assert_eq!(
            position, 10,
            "{name}: lines before the bad one are applied, none after"
        );
        let t = client
            .tenant(escrow::client::TenantOp::Show, &tenant)
            .await
            .unwrap();
        let versions = t.freshness.unwrap().versions;
        assert_eq!(
            versions as usize,
            expected(10).values().map(Vec::len).sum::<usize>()
        );
    }

    // An unknown tenant: refused with a clear reason, nothing applied anywhere.
    let feed = work.path().join("ok.jsonl");
    write_feed(&feed, 1..=5);
    let out = agent(
        &cfg,
        &feed,
        &work.path().join("s.json"),
        "nobody",
        &["--once"],
    )
    .output()
    .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("unknown tenant"), "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");

    cluster.shutdown().await;
}

// Goal: without --once the agent follows the feed like `tail -f`: lines appended later (also a
// line written in two pieces) are applied, and SIGTERM stops it cleanly with a summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t77_following_agent_picks_up_appended_lines() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let cfg = cluster.files.client_config.clone();
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();
    let (feed, state, mut child) = follow_new_feed(&cfg, work.path(), 10);
    let position = || async { source_position(&client, TENANT, "crm").await };
    wait_for("the first lines", || async {
        (position().await == 10).then_some(())
    })
    .await;

    write_feed(&feed, 11..=30);
    // Half a line, a pause, then the rest: the agent must not take the half as a bad line.
    let line = event(31);
    let (head, tail) = line.split_at(line.len() / 2);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&feed)
        .unwrap();
    f.write_all(head.as_bytes()).unwrap();
    f.flush().unwrap();
    std::thread::sleep(escrow::mirror::records::FOLLOW_POLL * 3);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the agent stopped on a half line"
    );
    writeln!(f, "{tail}").unwrap();
    drop(f);
    wait_for("the appended lines", || async {
        (position().await == 31).then_some(())
    })
    .await;

    sigterm_and_wait(&mut child, Duration::from_secs(30), "the following agent");
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["position"], 31);
    assert_eq!(report["lines"], 31);
    assert_eq!(
        state_offset(&state),
        std::fs::metadata(&feed).unwrap().len()
    );

    cluster.shutdown().await;
}

// Goal: a following agent fed a line that never ends (here 2 MiB pieces without a newline,
// each under the line limit, together over it) stops with an error naming the line, instead of
// holding ever more of it in memory; everything before it stays applied and checkpointed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t79_a_line_that_never_ends_stops_a_following_agent() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let cfg = cluster.files.client_config.clone();
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();
    let (feed, state, mut child) = follow_new_feed(&cfg, work.path(), 10);
    wait_for("the first lines", || async {
        (source_position(&client, TENANT, "crm").await == 10).then_some(())
    })
    .await;
    let before = std::fs::metadata(&feed).unwrap().len();
    let piece = vec![b'x'; 2 * 1024 * 1024];
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(&feed)
        .unwrap();
    let mut written = 0;
    while written <= escrow::mirror::records::LINE_BYTES_MAX {
        f.write_all(&piece).unwrap();
        f.flush().unwrap();
        written += piece.len();
        std::thread::sleep(escrow::mirror::records::FOLLOW_POLL * 3);
    }
    drop(f);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept following a line of {written} bytes");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("line 11"), "{stderr}");
    assert!(stderr.contains("longer than"), "{stderr}");
    assert_eq!(source_position(&client, TENANT, "crm").await, 10);
    assert_eq!(
        state_offset(&state),
        before,
        "the state stops before the line"
    );
    cluster.shutdown().await;
}

// Goal: SIGTERM ends a following agent promptly even while it cannot reach the cluster and is
// retrying a batch (it used to retry on, deaf to the signal): exit 0 with a summary, and
// nothing checkpointed that the cluster did not acknowledge.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t78_sigterm_stops_an_agent_retrying_an_unreachable_cluster() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let work = tempfile::tempdir().unwrap();
    let mut config = escrow::client::ClientConfig::load(&cluster.files.client_config).unwrap();
    config.endpoints = vec![format!("127.0.0.1:{}", free_ports(1)[0])];
    let cfg = work.path().join("escrowctl.toml");
    std::fs::write(&cfg, toml::to_string(&config).unwrap()).unwrap();
    let (_feed, state, mut child) = follow_new_feed(&cfg, work.path(), 10);
    // Long enough for the first ingest to fail and the agent to be retrying.
    std::thread::sleep(Duration::from_secs(3));
    assert!(child.try_wait().unwrap().is_none(), "the agent gave up");
    let status = sigterm_and_wait(&mut child, Duration::from_secs(10), "the retrying agent");
    let out = child.wait_with_output().unwrap();
    assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["applied"], 0, "{report}");
    assert_eq!(report["batches"], 0, "{report}");
    assert_eq!(
        state_offset(&state),
        0,
        "nothing acknowledged, nothing checkpointed"
    );
    cluster.shutdown().await;
}
