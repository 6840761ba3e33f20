//! The command-line contract: `escrowctl … --json` prints exactly one JSON document, exit code
//! 0 on success, non-zero with a one-line reason on stderr; the cluster operations through the
//! binary; `escrowd dev` starts a cluster that keeps its data across a restart.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn escrowctl(config: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(escrowctl_bin())
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run escrowctl")
}

/// A failed `escrowctl` run: non-zero exit and a one-line reason containing `part`.
fn assert_refused(out: &std::process::Output, part: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded: {stderr}");
    assert!(stderr.contains(part), "{stderr:?} lacks {part:?}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
}

// Goal: the documented CLI contract holds for status, put, get, delete and bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t70_escrowctl_json_contract_and_exit_codes() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let cfg = cluster.files.client_config.clone();
    let leader = cluster.wait_leader().await;

    let out = escrowctl(&cfg, &["cluster", "status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(doc["leader"], leader);
    let nodes = doc["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for n in nodes {
        for field in ["id", "addr", "role", "applied_index", "reachable"] {
            assert!(!n[field].is_null(), "node lacks {field}: {n}");
        }
        assert_eq!(n["role"], "voter");
    }

    let rec = ["--tenant", "acme", "--collection", "orders", "--key", "o-1"];
    let out = escrowctl(
        &cfg,
        &[
            &["record", "put"][..],
            &rec,
            &["--value", "hello", "--json"],
        ]
        .concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let put: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let revision = put["revision"].as_u64().unwrap();
    assert!(revision > 0);

    let out = escrowctl(&cfg, &[&["record", "get"][..], &rec, &["--json"]].concat());
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["found"], true);
    assert_eq!(got["value"], "hello");
    assert_eq!(got["revision"], revision);
    // A value that is not UTF-8 comes back in JSON as hex.
    let binary = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(binary.path(), [0xFF, 0x00, 0x01]).unwrap();
    let bin = ["--tenant", "acme", "--collection", "orders", "--key", "bin"];
    let file = binary.path().to_str().unwrap();
    let out = escrowctl(
        &cfg,
        &[&["record", "put"][..], &bin, &["--file", file]].concat(),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = escrowctl(&cfg, &[&["record", "get"][..], &bin, &["--json"]].concat());
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (&got["value"], &got["value_hex"]),
        (&serde_json::Value::Null, &serde_json::json!("ff0001"))
    );
    // Without --json the value's bytes exactly, no newline added when piped.
    let out = escrowctl(&cfg, &[&["record", "get"][..], &rec].concat());
    assert!(out.status.success());
    assert_eq!(out.stdout, b"hello");
    // --out with a bare file name writes it, whole, in the working directory.
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(escrowctl_bin())
        .current_dir(work.path())
        .arg("--config")
        .arg(&cfg)
        .args([&["record", "get"][..], &rec, &["--out", "value.bin"]].concat())
        .stdin(Stdio::null())
        .output()
        .expect("run escrowctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.is_empty());
    assert_eq!(
        std::fs::read(work.path().join("value.bin")).unwrap(),
        b"hello"
    );
    let names: Vec<_> = std::fs::read_dir(work.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["value.bin"], "nothing else left behind");

    let out = escrowctl(
        &cfg,
        &[&["record", "delete"][..], &rec, &["--json"]].concat(),
    );
    let del: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(del["existed"], true);
    // Not found: the document on stdout, and exit 1 with the reason, as without --json.
    let out = escrowctl(&cfg, &[&["record", "get"][..], &rec, &["--json"]].concat());
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["found"], false);
    assert_eq!(got["deleted"], true);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not found") && stderr.contains("deleted at revision"),
        "{stderr}"
    );
    let out = escrowctl(&cfg, &[&["record", "get"][..], &rec].concat());
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());

    // Bad input: non-zero exit, one line on stderr naming the problem, nothing on stdout.
    let out = escrowctl(
        &cfg,
        &[
            "record",
            "put",
            "--tenant",
            "Bad Tenant",
            "--collection",
            "c",
            "--key",
            "k",
            "--value",
            "v",
            "--json",
        ],
    );
    assert_refused(&out, "tenant id");
    assert!(out.stdout.is_empty());

    // A usage error (a required flag missing) is one line too, naming the flag, exit code 2.
    let out = escrowctl(&cfg, &["record", "put", "--collection", "c", "--key", "k"]);
    assert_eq!(out.status.code(), Some(2));
    assert_refused(&out, "--tenant");
    assert!(out.stderr.starts_with(b"escrowctl: "));
    assert!(out.stdout.is_empty());

    // No command at all: one line too, not the whole help.
    let out = escrowctl(&cfg, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_refused(&out, "requires a subcommand");

    // A missing config is a clear one-line error.
    let out = escrowctl(
        std::path::Path::new("/nonexistent/escrowctl.toml"),
        &["cluster", "status"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/escrowctl.toml"));

    // The directory agent, artifact download and verify through the CLI.
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), b"alpha").unwrap();
    std::fs::write(tree.join("sub/b.bin"), random_bytes("b", 300_000)).unwrap();
    let state = work.path().join("state.json");
    let run = |args: &[&str]| {
        let out = escrowctl(&cfg, args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("one JSON document")
    };
    let (tree_s, state_s) = (tree.to_str().unwrap(), state.to_str().unwrap());
    let report = run(&[
        "mirror",
        "--dir",
        tree_s,
        "--namespace",
        "vendor",
        "--once",
        "--json",
        "--state",
        state_s,
    ]);
    assert_eq!(report["uploaded"], 2, "{report}");
    let list = run(&["artifact", "list", "vendor", "--json"]);
    let names: Vec<&str> = list["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a.txt", "sub/b.bin"]);
    let back = work.path().join("b.back");
    run(&[
        "artifact",
        "get",
        "vendor",
        "sub/b.bin",
        "--out",
        back.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(std::fs::read(&back).unwrap(), random_bytes("b", 300_000));
    let verified = run(&["verify", "--json"]);
    assert_eq!(verified["ok"], true, "{verified}");
    let against_source = [
        "verify",
        "--against-source",
        tree_s,
        "--tenant",
        "vendor",
        "--json",
    ];
    let source = run(&against_source);
    assert_eq!(source["equal"], true, "{source}");
    std::fs::write(tree.join("a.txt"), b"changed, not mirrored").unwrap();
    let out = escrowctl(&cfg, &against_source);
    assert!(
        !out.status.success(),
        "an unmirrored change must fail the check"
    );
    // It fails because the roots differ, not for another reason: the report says so.
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON report ({e}); stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["equal"], false, "{report}");
    assert_eq!(report["replicas_agree"], true, "{report}");
    cluster.shutdown().await;
}

fn free_port_base() -> u16 {
    // `escrowd dev` puts node N at base+10N .. base+10N+2 (N = 1..3).
    free_port_block(33)
}

fn start_dev(dir: &std::path::Path, base: u16) -> (std::process::Child, Vec<String>) {
    let mut child = Command::new(escrowd_bin())
        .args([
            "dev",
            "--nodes",
            "3",
            "--port-base",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.with_extension("stderr.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = Vec::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            let stderr =
                std::fs::read_to_string(dir.with_extension("stderr.log")).unwrap_or_default();
            panic!("escrowd dev exited early: {lines:?}\n{stderr}");
        }
        let done = line.contains("Ctrl-C stops");
        lines.push(line.trim_end().to_string());
        if done {
            break;
        }
    }
    // Keep draining so later output never hits a closed pipe.
    std::thread::spawn(move || for _ in reader.lines() {});
    (child, lines)
}

// Goal: `escrowd dev` starts a working 3-node cluster, prints how to reach it, stops cleanly
// and resumes its data on the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn t71_escrowd_dev_starts_stops_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_port_base();
    let (mut child, lines) = start_dev(dir.path(), base);
    assert!(
        lines.iter().any(|l| l.contains("escrow dev cluster is up")),
        "{lines:?}"
    );
    let cfg = dir.path().canonicalize().unwrap().join("escrowctl.toml");
    assert!(lines.iter().any(|l| l.contains("ESCROWCTL_CONFIG")));
    assert!(
        lines
            .iter()
            .any(|l| l.contains("escrowctl tenant add acme")),
        "{lines:?}"
    );

    let rec = [
        "--tenant",
        "acme",
        "--collection",
        "orders",
        "--key",
        "dev-1",
    ];
    let put = [&["record", "put"][..], &rec, &["--value", "kept", "--json"]].concat();
    // A tenant must be registered before anything is written into it.
    assert_refused(&escrowctl(&cfg, &put), "unknown tenant");
    let out = escrowctl(&cfg, &["tenant", "add", "acme", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tenant: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(tenant["state"], "active");
    let out = escrowctl(&cfg, &put);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ctrl-C (SIGINT) stops it cleanly: exit status 0.
    let status = signal_and_wait(&mut child, "INT", Duration::from_secs(30), "escrowd dev");
    assert!(status.success(), "escrowd dev after Ctrl-C: {status}");

    // Its CA, node certificates and credentials are files in the dev dir; keys and tokens
    // readable by their owner only.
    use std::os::unix::fs::PermissionsExt;
    for (file, secret) in [
        ("pki/ca.pem", false),
        ("pki/ca.key", true),
        ("pki/node1.pem", false),
        ("pki/node3.key", true),
        ("secrets/ops.token", true),
        ("secrets/metrics.token", true),
    ] {
        let meta =
            std::fs::metadata(dir.path().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert!(meta.len() > 0, "{file} is empty");
        if secret {
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{file} is readable by others"
            );
        }
    }

    // Other ports or another node count would leave the cluster's members unreachable: refused,
    // naming what the dir was created with, and nothing started.
    let out = Command::new(escrowd_bin())
        .args(["dev", "--nodes", "3", "--port-base"])
        .arg((base + 100).to_string())
        .arg("--dir")
        .arg(dir.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("nodes = 3, port_base = {base}")),
        "{stderr}"
    );

    let (mut child, _) = start_dev(dir.path(), base);
    let out = escrowctl(&cfg, &[&["record", "get"][..], &rec, &["--json"]].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["value"], "kept");
    let status = sigterm_and_wait(&mut child, Duration::from_secs(30), "escrowd dev");
    assert!(status.success(), "escrowd dev after SIGTERM: {status}");
}

/// The members (`[{"id", "voter"}]`) an `escrowctl cluster add|remove --json` run printed.
fn members(out: &std::process::Output) -> Vec<(u64, bool)> {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    let mut members: Vec<(u64, bool)> = doc["members"]
        .as_array()
        .expect("a members list")
        .iter()
        .map(|m| (m["id"].as_u64().unwrap(), m["voter"].as_bool().unwrap()))
        .collect();
    members.sort();
    members
}

// Goal: the cluster operations work through the `escrowctl` binary as documented: `cluster
// init` on an initialized cluster is refused; `cluster add` makes a node a learner and then a
// voter; `cluster remove` takes it out; its id is then refused for good.
//
// Steps:
// 1. `cluster init` on a running 3-node cluster: refused, "already initialized".
// 2. Start node 4; `cluster add --learner`: a learner; `cluster add` again: a voter, and
//    `cluster status` lists it as one.
// 3. `cluster remove --id 4`: gone from the members; `cluster add --id 4` again: refused,
//    "never reused".
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t72_cluster_operations_through_escrowctl() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let cfg = cluster.files.client_config.clone();
    cluster.wait_leader().await;

    assert_refused(
        &escrowctl(&cfg, &["cluster", "init"]),
        "already initialized",
    );

    let (node4, member) = cluster.start_extra_node(4, &test_raft()).await;
    let add = |learner: bool| {
        let mut args = vec![
            "cluster",
            "add",
            "--id",
            "4",
            "--raft-addr",
            &member.raft_addr,
            "--client-addr",
            &member.client_addr,
            "--json",
        ];
        if learner {
            args.push("--learner");
        }
        escrowctl(&cfg, &args)
    };
    let voters = [(1, true), (2, true), (3, true)];
    assert_eq!(members(&add(true)), [&voters[..], &[(4, false)]].concat());
    assert_eq!(members(&add(false)), [&voters[..], &[(4, true)]].concat());
    // The node answering may learn the final membership a heartbeat after the leader.
    wait_for("cluster status to list node 4 as a voter", || async {
        let out = escrowctl(&cfg, &["cluster", "status", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value =
            serde_json::from_slice(&out.stdout).expect("one JSON document");
        doc["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == 4 && n["role"] == "voter")
            .then_some(())
    })
    .await;

    let out = escrowctl(&cfg, &["cluster", "remove", "--id", "4", "--json"]);
    assert_eq!(members(&out), voters);
    assert_refused(&add(false), "never reused");
    node4.shutdown().await;
    cluster.shutdown().await;
}
