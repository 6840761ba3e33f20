//! Artifacts and the directory mirror over real 3-node clusters (real chunk stores, real TLS).
//!
//! Steps: mirror a tree (nested folders, a 64 MiB file, 1,000+ small files, a symlink loop and
//! a symlink out of the tree) and download everything back, byte for byte and by hash; change
//! 1 MiB in the middle of the big file and check only its chunks travel and both versions stay
//! readable; delete a file (tombstone, old version kept); bad chunks and manifests are refused
//! with nothing committed; SIGKILL the leader during a large upload; a node added after the
//! mirror ends up with every chunk, verified; SIGTERM to `escrowctl mirror --dir` in the middle
//! of a pass keeps what was escrowed whole and the next run finishes the pass.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use escrow::client::EscrowClient;
use escrow::mirror::artifacts::{download_file, upload_file};
use escrow::mirror::dir::{pass, DirOptions};
use tonic::Code;

const MIB: usize = 1024 * 1024;

fn hash_file(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

/// A tree with nested folders, one big file and `small` small files; returns every regular
/// file's name (relative path) and blake3.
fn build_tree(root: &Path, big_bytes: usize, small: usize) -> HashMap<String, String> {
    let mut files = HashMap::new();
    let mut write = |rel: String, bytes: Vec<u8>| {
        let path = root.join(&rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        files.insert(rel, blake3::hash(&bytes).to_hex().to_string());
        std::fs::write(path, bytes).unwrap();
    };
    write("releases/v1/app.bin".into(), random_bytes("big", big_bytes));
    for i in 0..small {
        let size = 100 + (i * 7919) % 8000;
        write(
            format!("data/d{}/e{}/f{i}.txt", i % 10, i % 3),
            random_bytes(&format!("small-{i}"), size),
        );
    }
    write("empty.txt".into(), Vec::new());
    files
}

fn dir_options(root: &Path, state: &Path, namespace: &str) -> DirOptions {
    DirOptions {
        root: root.to_path_buf(),
        namespace: namespace.to_string(),
        state_file: state.to_path_buf(),
        once: true,
        rescan: Duration::from_secs(600),
    }
}

/// Downloads every artifact of `namespace` into `out` and returns name → blake3 of the bytes.
async fn download_all(
    client: &EscrowClient,
    namespace: &str,
    out: &Path,
) -> HashMap<String, String> {
    let mut got = HashMap::new();
    for a in client.list_artifacts(namespace, false).await.unwrap() {
        let target: PathBuf = out.join(&a.name);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        let r = download_file(client, namespace, &a.name, 0, &target)
            .await
            .unwrap();
        let on_disk = hash_file(&target);
        assert_eq!(r.blake3, on_disk, "{}: report and bytes disagree", a.name);
        got.insert(a.name, on_disk);
    }
    got
}

// Goal: a mirrored tree comes back byte for byte; a 1 MiB change sends only its chunks and
// keeps both versions; deletes are tombstones; bad input commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t45_mirror_tree_round_trip_incremental_and_bad_input() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client().with_deadline(Duration::from_secs(60));
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let state = work.path().join("state.json");
    let files = build_tree(&tree, 64 * MIB, 1_000);
    // Links the agent must not follow: a loop and a way out of the tree.
    std::os::unix::fs::symlink(tree.join("loop-b"), tree.join("loop-a")).unwrap();
    std::os::unix::fs::symlink(tree.join("loop-a"), tree.join("loop-b")).unwrap();
    std::os::unix::fs::symlink("/etc", tree.join("data/escape")).unwrap();

    let options = dir_options(&tree, &state, "vendor");
    let report = pass(&client, &options, &()).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.uploaded as usize, files.len());
    let reasons: HashMap<&str, &str> = report
        .skipped
        .iter()
        .map(|s| (s.path.as_str(), s.reason.as_str()))
        .collect();
    assert!(reasons["loop-a"].contains("loop"), "{reasons:?}");
    assert!(
        reasons["data/escape"].contains("outside the tree"),
        "{reasons:?}"
    );
    eprintln!(
        "first mirror: {} files, {} bytes sent in {} chunks",
        report.files, report.bytes_sent, report.chunks_sent
    );

    let out = work.path().join("out");
    let got = download_all(&client, "vendor", &out).await;
    assert_eq!(got, files, "the escrow holds exactly the tree");

    // A second pass with nothing changed sends nothing.
    let report = pass(&client, &options, &()).await.unwrap();
    assert_eq!((report.uploaded, report.bytes_sent), (0, 0));

    // Change 1 MiB in the middle of the big file.
    let big = tree.join("releases/v1/app.bin");
    let before = hash_file(&big);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all_at(&random_bytes("patch", MIB), 32 * MIB as u64)
            .unwrap();
    }
    let after = hash_file(&big);
    let report = pass(&client, &options, &()).await.unwrap();
    assert_eq!(report.uploaded, 1);
    eprintln!(
        "after a 1 MiB change: {} bytes sent in {} chunks",
        report.bytes_sent, report.chunks_sent
    );
    assert!(
        report.bytes_sent <= 4 * MIB as u64,
        "{} bytes sent",
        report.bytes_sent
    );
    let v1 = out.join("v1.bin");
    let v2 = out.join("v2.bin");
    download_file(&client, "vendor", "releases/v1/app.bin", 1, &v1)
        .await
        .unwrap();
    download_file(&client, "vendor", "releases/v1/app.bin", 2, &v2)
        .await
        .unwrap();
    assert_eq!(hash_file(&v1), before);
    assert_eq!(hash_file(&v2), after);

    // A deleted file becomes a tombstone; its old version stays readable.
    std::fs::remove_file(tree.join("data/d1/e1/f1.txt")).unwrap();
    let report = pass(&client, &options, &()).await.unwrap();
    assert_eq!(report.deleted, 1);
    let latest = client
        .artifact("vendor", "data/d1/e1/f1.txt", 0)
        .await
        .unwrap();
    assert!(latest.deleted);
    let old = out.join("f1-v1.txt");
    download_file(&client, "vendor", "data/d1/e1/f1.txt", 1, &old)
        .await
        .unwrap();
    assert_eq!(hash_file(&old), files["data/d1/e1/f1.txt"]);
    assert!(
        download_file(&client, "vendor", "data/d1/e1/f1.txt", 0, &old)
            .await
            .is_err()
    );

    // Bad input: a chunk whose bytes do not match its hash; a manifest naming a chunk nobody
    // has; a manifest whose whole-file hash is wrong; an unknown namespace. Nothing commits.
    let listed = client.list_artifacts("vendor", true).await.unwrap().len();
    let bytes = b"some chunk".to_vec();
    let err = client
        .put_chunk(&[9u8; 32], bytes.clone())
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let hash = *blake3::hash(&bytes).as_bytes();
    let manifest = |chunk_hash: [u8; 32], whole: [u8; 32]| escrow::pb::Manifest {
        size: bytes.len() as u64,
        blake3: whole.to_vec(),
        chunks: vec![escrow::pb::ChunkInfo {
            hash: chunk_hash.to_vec(),
            size: bytes.len() as u32,
        }],
        source_ms: 0,
    };
    let err = client
        .commit_artifact("vendor", "bad/missing", manifest([5u8; 32], hash))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    client.put_chunk(&hash, bytes.clone()).await.unwrap();
    let err = client
        .commit_artifact("vendor", "bad/whole", manifest(hash, [6u8; 32]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("whole-file"), "{err}");
    let err = upload_file(&client, "nobody", "x.bin", &v1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown tenant"), "{err}");
    let err = client
        .commit_artifact("vendor", "../escape", manifest(hash, hash))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert_eq!(
        client.list_artifacts("vendor", true).await.unwrap().len(),
        listed
    );

    // Freshness of the vendor namespace reflects the artifacts.
    let list = client.tenants(false).await.unwrap();
    let f = list.vendor.unwrap().freshness.unwrap();
    assert!(!f.stale, "{f:?}");

    cluster.shutdown().await;
}

// Goal: a node added after data was mirrored ends up holding every chunk, each verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t47_new_node_fetches_every_chunk() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client().with_deadline(Duration::from_secs(60));
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    build_tree(&tree, 8 * MIB, 50);
    let report = pass(
        &client,
        &dir_options(&tree, &work.path().join("s.json"), TENANT),
        &(),
    )
    .await
    .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    let (new_node, member) = cluster.start_extra_node(4, &test_raft()).await;
    client.add_node(member, false).await.unwrap();
    let reader = new_node.core.reader.clone();
    let referenced = wait_for("node 4 to learn the manifests", || async {
        let refs = reader.referenced_chunks(None, 100_000).unwrap();
        (!refs.is_empty()).then_some(refs)
    })
    .await;
    wait_for("node 4 to hold every chunk", || async {
        referenced
            .iter()
            .all(|c| new_node.core.chunks.has(&c.hash))
            .then_some(())
    })
    .await;
    for c in &referenced {
        let bytes = new_node.core.chunks.get(&c.hash).expect("verified chunk");
        assert_eq!(bytes.len(), c.size as usize);
    }
    eprintln!("node 4 holds all {} chunks, verified", referenced.len());
    new_node.shutdown().await;
    cluster.shutdown().await;
}

// Goal: SIGKILL of the leader during a large upload: the upload completes after the new
// election and the artifact is complete with the right hash.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t46_leader_killed_during_large_upload() {
    init_logs();
    let mut cluster = ProcessCluster::start(3, test_raft());
    let client = cluster.client().with_deadline(Duration::from_secs(60));
    wait_for("nodes to accept init", || async {
        client.init().await.ok()
    })
    .await;
    let leader = wait_for("a leader", || async {
        client.cluster_status().await.ok().and_then(|s| s.leader)
    })
    .await;
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("big.bin");
    let bytes = random_bytes("upload", 96 * MIB);
    let want = blake3::hash(&bytes).to_hex().to_string();
    std::fs::write(&file, &bytes).unwrap();
    drop(bytes);

    let upload = {
        let client = cluster.client().with_deadline(Duration::from_secs(60));
        let file = file.clone();
        tokio::spawn(async move { upload_file(&client, "vendor", "big.bin", &file).await })
    };
    // Kill the leader once the upload is under way (chunks are landing on the nodes).
    let leader_chunks = cluster.dir.path().join(format!("node{leader}/data/chunks"));
    wait_for("chunks to arrive", || async {
        let n = std::fs::read_dir(&leader_chunks)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().len() == 2)
                    .count()
            })
            .unwrap_or(0);
        (n >= 20).then_some(())
    })
    .await;
    assert!(!upload.is_finished(), "the upload finished before the kill");
    cluster.kill((leader - 1) as usize);
    let report = upload
        .await
        .unwrap()
        .expect("the upload survives the leader's death");
    eprintln!("upload after leader kill: {report:?}");
    let out = work.path().join("back.bin");
    let got = download_file(&client, "vendor", "big.bin", 0, &out)
        .await
        .unwrap();
    assert_eq!(got.blake3, want);
    assert_eq!(hash_file(&out), want);
}

// Goal: chunks no committed version references (an upload that never committed) are collected
// only once they are older than the grace period; referenced chunks are never collected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t48_unreferenced_chunks_are_collected_only_after_the_grace_period() {
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("kept.bin");
    std::fs::write(&file, random_bytes("kept", 1024 * 1024)).unwrap();
    upload_file(&client, "vendor", "kept.bin", &file)
        .await
        .unwrap();
    let orphan = random_bytes("orphan", 4096);
    let orphan_hash = *blake3::hash(&orphan).as_bytes();
    client.put_chunk(&orphan_hash, orphan).await.unwrap();

    let node = cluster.node(0);
    let referenced = node.core.reader.referenced_chunks(None, 1000).unwrap();
    wait_for(
        "node 1 to hold the orphan and every referenced chunk",
        || async {
            (node.core.chunks.has(&orphan_hash)
                && referenced.iter().all(|c| node.core.chunks.has(&c.hash)))
            .then_some(())
        },
    )
    .await;
    let gc = escrow::workers::chunks::gc_pass;
    let removed = gc(&node.core, escrow::workers::chunks::CHUNK_GC_GRACE)
        .await
        .unwrap();
    assert_eq!(removed, 0, "nothing is old enough yet");
    assert!(node.core.chunks.has(&orphan_hash));
    let removed = gc(&node.core, Duration::ZERO).await.unwrap();
    assert_eq!(removed, 1, "only the orphan goes");
    assert!(!node.core.chunks.has(&orphan_hash));
    for c in &referenced {
        assert!(
            node.core.chunks.has(&c.hash),
            "a referenced chunk was collected"
        );
    }
    let out = work.path().join("back.bin");
    download_file(&client, "vendor", "kept.bin", 0, &out)
        .await
        .unwrap();
    assert_eq!(std::fs::read(out).unwrap(), std::fs::read(&file).unwrap());
    cluster.shutdown().await;
}

// Goal: SIGTERM in the middle of a directory pass (`escrowctl mirror --dir --once`) stops the
// agent promptly with exit 0 and a report saying the pass was cut short; everything escrowed
// is whole and matches its source file, the state file names only what the escrow holds, and
// the next run mirrors the rest without sending again what is already there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t49_sigterm_mid_pass_keeps_what_was_escrowed_and_the_next_run_finishes() {
    const FILES: usize = 240;
    let cluster = TestCluster::started_and_initialized(3, test_raft()).await;
    let client = cluster.client().with_deadline(Duration::from_secs(60));
    let work = tempfile::tempdir().unwrap();
    let tree = work.path().join("tree");
    let state = work.path().join("state.json");
    let mut source = HashMap::new();
    for i in 0..FILES {
        let bytes = random_bytes(&format!("pass-{i}"), 256 * 1024);
        let name = format!("d{}/f{i:03}.bin", i % 4);
        std::fs::create_dir_all(tree.join(format!("d{}", i % 4))).unwrap();
        std::fs::write(tree.join(&name), &bytes).unwrap();
        source.insert(name, blake3::hash(&bytes).to_hex().to_string());
    }
    let agent = || {
        let mut c = std::process::Command::new(escrowctl_bin());
        c.arg("--config")
            .arg(&cluster.files.client_config)
            .args(["mirror", "--dir"])
            .arg(&tree)
            .args(["--namespace", "vendor", "--once", "--json", "--state"])
            .arg(&state)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        c
    };
    let escrowed = || async {
        client
            .list_artifacts("vendor", false)
            .await
            .unwrap()
            .into_iter()
            .map(|a| {
                let m = a.manifest.expect("a live artifact has a manifest");
                (a.name, escrow::domain::hex_wire(&m.blake3))
            })
            .collect::<HashMap<_, _>>()
    };

    let mut child = agent().spawn().unwrap();
    wait_for("the first files to be escrowed", || async {
        (!escrowed().await.is_empty()).then_some(())
    })
    .await;
    let status = sigterm_and_wait(&mut child, Duration::from_secs(10), "the directory agent");
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(status.success(), "{stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); stderr: {stderr}"));
    assert_eq!(
        report["stopped"], true,
        "the pass finished before SIGTERM: {report}"
    );
    assert_eq!(report["deleted"], 0, "{report}");
    assert_eq!(
        report["failed"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    let uploaded = report["uploaded"].as_u64().unwrap() as usize;
    assert!(uploaded < FILES, "{report}");

    // What the escrow holds is whole: each artifact is a source file, with its hash. Uploads in
    // flight at the stop may have committed without the agent hearing of it, never fewer.
    let held = escrowed().await;
    assert!(
        held.len() >= uploaded && held.len() < FILES,
        "{} held",
        held.len()
    );
    for (name, hash) in &held {
        assert_eq!(
            source.get(name),
            Some(hash),
            "{name}: not the source's bytes"
        );
    }
    // The state file claims nothing the escrow does not hold.
    let saved: serde_json::Value = serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    let claimed = saved["files"].as_object().unwrap();
    assert_eq!(claimed.len(), uploaded, "{saved}");
    for (name, seen) in claimed {
        assert_eq!(
            seen["blake3"].as_str(),
            held.get(name).map(String::as_str),
            "{name}"
        );
    }
    eprintln!(
        "stopped after {uploaded} of {FILES} files ({} escrowed)",
        held.len()
    );

    // The next run finishes the pass: it sends only what is missing.
    let out = agent().output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["stopped"], false, "{report}");
    assert_eq!(
        report["uploaded"].as_u64().unwrap() as usize,
        FILES - held.len(),
        "{report}"
    );
    assert_eq!(
        report["unchanged"].as_u64().unwrap() as usize,
        held.len(),
        "{report}"
    );
    assert_eq!(escrowed().await, source);
    let back = work.path().join("back");
    let got = download_all(&client, "vendor", &back).await;
    assert_eq!(got, source, "downloaded bytes differ from the source");
    cluster.shutdown().await;
}
