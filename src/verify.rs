//! Client side of integrity: `escrowctl verify` (replicas against each other, optionally
//! deep, optionally against the source) and `escrowctl attest`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::attest::{Attestation, NodeSignature, Statement, TrustedKeys};
use crate::client::{ClientError, EscrowClient};
use crate::domain::{hex_wire, Digest};
use crate::integrity::{namespace_root, LeafObject};
use crate::mirror::records;
use crate::pb;

/// How long one node may take to answer a roots or attest question.
pub const NODE_QUESTION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one node may take for a deep verification (it re-reads everything it stores).
pub const DEEP_VERIFY_TIMEOUT: Duration = Duration::from_secs(3600);

/// One thing that does not agree: where, what, and expected (the majority, or what consensus
/// applied) against found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Disagreement {
    pub node: u64,
    pub namespace: String,
    pub object: String,
    pub expected: String,
    pub found: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Unchecked {
    pub node: u64,
    pub error: String,
}

/// One node's deep verification figures.
#[derive(Debug, Clone, Serialize)]
pub struct DeepFigures {
    pub node: u64,
    pub chunks_checked: u64,
    pub bytes_hashed: u64,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The checkpoint index the roots were compared at.
    pub index: u64,
    pub nodes_checked: Vec<u64>,
    pub unchecked: Vec<Unchecked>,
    /// Namespace roots agreed by the majority (hex).
    pub roots: BTreeMap<String, String>,
    pub disagreements: Vec<Disagreement>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deep: Vec<DeepFigures>,
    pub ok: bool,
}

/// The value most nodes hold (ties: the smallest, so the choice is stable).
fn majority(values: &BTreeMap<u64, String>) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in values.values() {
        *counts.entry(v.as_str()).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by(|a, b| a.1.cmp(&b.1).then(b.0.cmp(a.0)))
        .map(|(v, _)| v.to_string())
        .unwrap_or_default()
}

/// Compares every node's roots at a fresh checkpoint (and with `deep`, each node's stored
/// bytes against its roots and chunk addresses).
pub async fn verify(
    client: &EscrowClient,
    tenant: Option<&str>,
    deep: bool,
) -> Result<VerifyReport, ClientError> {
    let nodes = client.members().await?;
    let index = client.checkpoint().await?;
    let answers = client
        .integrity_each(
            &nodes,
            NODE_QUESTION_TIMEOUT,
            pb::RootsRequest { index },
            |mut c, req| async move { Ok(c.roots(req).await?.into_inner()) },
        )
        .await;
    let mut unchecked = Vec::new();
    let mut per_ns: BTreeMap<String, BTreeMap<u64, String>> = BTreeMap::new();
    let mut checked = Vec::new();
    let mut cluster_roots: BTreeMap<u64, String> = BTreeMap::new();
    for (id, r) in &answers {
        match r {
            Ok(reply) => {
                checked.push(*id);
                cluster_roots.insert(*id, hex_wire(&reply.cluster_root));
                for root in &reply.roots {
                    per_ns
                        .entry(root.namespace.clone())
                        .or_default()
                        .insert(*id, hex_wire(&root.root));
                }
            }
            Err(e) => unchecked.push(Unchecked {
                node: *id,
                error: e.to_string(),
            }),
        }
    }
    // A namespace a node lacks entirely is "absent" there.
    for values in per_ns.values_mut() {
        for id in &checked {
            values.entry(*id).or_insert_with(|| "absent".into());
        }
    }
    let mut disagreements = Vec::new();
    let mut roots = BTreeMap::new();
    let mut compare = |ns: &str, object: &str, values: &BTreeMap<u64, String>| {
        let expected = majority(values);
        for (node, found) in values {
            if *found != expected {
                disagreements.push(Disagreement {
                    node: *node,
                    namespace: ns.to_string(),
                    object: object.to_string(),
                    expected: expected.clone(),
                    found: found.clone(),
                });
            }
        }
        expected
    };
    for (ns, values) in &per_ns {
        if tenant.is_none_or(|t| t == ns) {
            roots.insert(ns.clone(), compare(ns, "root", values));
        }
    }
    if tenant.is_none() {
        compare("", "cluster root", &cluster_roots);
    }

    let mut figures = Vec::new();
    if deep {
        let namespace = tenant.unwrap_or("").to_string();
        let deep_answers = client
            .integrity_each(
                &nodes,
                DEEP_VERIFY_TIMEOUT,
                pb::DeepVerifyRequest { namespace },
                |mut c, req| async move { Ok(c.deep_verify(req).await?.into_inner()) },
            )
            .await;
        for (id, r) in deep_answers {
            match r {
                Ok(reply) => {
                    figures.push(DeepFigures {
                        node: id,
                        chunks_checked: reply.chunks_checked,
                        bytes_hashed: reply.bytes_hashed,
                        seconds: reply.micros as f64 / 1e6,
                    });
                    for m in reply.mismatches.into_iter().chain(reply.bad_chunks) {
                        disagreements.push(Disagreement {
                            node: id,
                            namespace: m.namespace,
                            object: m.object,
                            expected: m.expected,
                            found: m.found,
                        });
                    }
                }
                Err(e) => {
                    if !unchecked.iter().any(|u| u.node == id) {
                        unchecked.push(Unchecked {
                            node: id,
                            error: e.to_string(),
                        });
                    }
                }
            }
        }
    }
    let ok = disagreements.is_empty() && unchecked.is_empty();
    Ok(VerifyReport {
        index,
        nodes_checked: checked,
        unchecked,
        roots,
        disagreements,
        deep: figures,
        ok,
    })
}

/// Collects every reachable node's signature over the statement of a fresh checkpoint.
pub async fn attest(
    client: &EscrowClient,
    tenant: Option<&str>,
) -> Result<(Attestation, Vec<Unchecked>), String> {
    let nodes = client.members().await.map_err(|e| e.to_string())?;
    let index = client.checkpoint().await.map_err(|e| e.to_string())?;
    let tenant = tenant.unwrap_or("").to_string();
    let answers = client
        .integrity_each(
            &nodes,
            NODE_QUESTION_TIMEOUT,
            pb::AttestRequest { index, tenant },
            |mut c, req| async move { Ok(c.attest(req).await?.into_inner()) },
        )
        .await;
    let mut statement: Option<(String, u64)> = None;
    let mut signatures = Vec::new();
    let mut unchecked = Vec::new();
    for (id, r) in answers {
        match r {
            Ok(reply) => {
                match &statement {
                    None => statement = Some((reply.statement.clone(), id)),
                    Some((s, first)) if *s != reply.statement => {
                        return Err(format!(
                            "nodes {first} and {id} sign different statements at index {index}: their roots disagree (run `escrowctl verify`)"
                        ))
                    }
                    Some(_) => {}
                }
                signatures.push(NodeSignature {
                    node: reply.node,
                    public_key: reply.public_key,
                    signature: reply.signature,
                });
            }
            Err(e) => unchecked.push(Unchecked {
                node: id,
                error: e.to_string(),
            }),
        }
    }
    let majority = nodes.len() / 2 + 1;
    if signatures.len() < majority {
        return Err(format!(
            "only {} of {} nodes signed (a majority is needed): {}",
            signatures.len(),
            nodes.len(),
            unchecked
                .iter()
                .map(|u| format!("node {}: {}", u.node, u.error))
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    let (text, _) = statement.ok_or("no node answered")?;
    let statement: Statement =
        serde_json::from_str(&text).map_err(|e| format!("a node sent a bad statement: {e}"))?;
    Ok((
        Attestation {
            statement,
            signatures,
        },
        unchecked,
    ))
}

/// The nodes' public keys, to keep for checking attestations offline.
pub async fn trusted_keys(client: &EscrowClient) -> Result<TrustedKeys, ClientError> {
    let status = client.cluster_status().await?;
    Ok(TrustedKeys {
        cluster: status.cluster_name,
        keys: status
            .nodes
            .iter()
            .filter(|n| !n.identity_key.is_empty())
            .map(|n| (n.id, n.identity_key.clone()))
            .collect(),
    })
}

/// The root a source tree should have in the escrow: one artifact leaf per regular file, by
/// the same rules the directory agent mirrors by (symlinks and odd names skipped).
pub fn source_root_of_dir(namespace: &str, root: &Path) -> Result<(Digest, u64), String> {
    let root = std::fs::canonicalize(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let (files, _) = crate::mirror::dir::walk(&root).map_err(|e| e.to_string())?;
    let mut leaves = BTreeMap::new();
    for f in &files {
        let mut hasher = blake3::Hasher::new();
        let mut file =
            std::fs::File::open(&f.path).map_err(|e| format!("{}: {e}", f.path.display()))?;
        let size = std::io::copy(&mut file, &mut hasher)
            .map_err(|e| format!("{}: {e}", f.path.display()))?;
        let whole = *hasher.finalize().as_bytes();
        let o = LeafObject::Artifact {
            name: f.name.as_str(),
            size,
            blake3: &whole,
        };
        leaves.insert(o.id(), o.hash());
    }
    Ok((namespace_root(namespace, &leaves), leaves.len() as u64))
}

/// The root a record feed should have in the escrow: the final state of every record the feed
/// touched (its last event's sequence and value; deleted records have no leaf). The feed is
/// read a line at a time, each line to [`records::LINE_BYTES_MAX`] as the agent reads it, and
/// only each record's leaf is kept: memory grows with the records, not with the feed's bytes.
pub fn source_root_of_feed(tenant: &str, feed: &Path) -> Result<(Digest, u64), String> {
    use std::io::{BufRead, Read};
    let at = |e: std::io::Error| format!("{}: {e}", feed.display());
    let mut reader = std::io::BufReader::new(std::fs::File::open(feed).map_err(at)?);
    // (collection, key) -> the last event's leaf (id, hash), None once deleted.
    type FinalState = HashMap<(String, String), Option<(Digest, Digest)>>;
    let mut state: FinalState = HashMap::new();
    let mut previous = 0;
    let mut line = Vec::new();
    for number in 1u64.. {
        line.clear();
        // As the agent reads it: a line too long ends up longer than `feed_line` takes.
        let read = (&mut reader)
            .take(records::LINE_READ_BYTES_MAX)
            .read_until(b'\n', &mut line)
            .map_err(at)?;
        if read == 0 {
            break;
        }
        records::end_line(&mut line);
        let Some(c) = records::feed_line(&line, previous)
            .map_err(|e| format!("{} line {number}: {e}", feed.display()))?
        else {
            continue;
        };
        previous = c.seq;
        let leaf = (!c.delete).then(|| {
            let o = LeafObject::Record {
                collection: &c.collection,
                key: &c.key,
                seq: c.seq,
                value: &c.value,
            };
            (o.id(), o.hash())
        });
        state.insert((c.collection, c.key), leaf);
    }
    let leaves: BTreeMap<Digest, Digest> = state.into_values().flatten().collect();
    Ok((namespace_root(tenant, &leaves), leaves.len() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mirror::records::LINE_BYTES_MAX;

    fn event(key: &str, op: &str, value: &str, seq: u64) -> String {
        let value = if op == "put" {
            format!(r#","value":"{value}""#)
        } else {
            String::new()
        };
        format!(r#"{{"collection":"c","key":"{key}","op":"{op}"{value},"seq":{seq},"time":1}}"#)
    }

    // Goal: the feed's root is its final state's, read a line at a time: a replaced record
    // counts with its last event, a deleted one not at all, blank lines are skipped, and a last
    // line without a newline is read like the others.
    #[test]
    fn a_feed_root_is_its_final_state() {
        let dir = tempfile::tempdir().unwrap();
        let feed = dir.path().join("feed.jsonl");
        let text = [
            event("a", "put", "one", 1),
            String::new(),
            event("b", "put", "two", 2),
            event("a", "put", "three", 3),
            event("b", "delete", "", 4),
            event("c", "put", "four", 5),
        ]
        .join("\n");
        std::fs::write(&feed, text).unwrap();
        let leaf = |key: &str, seq: u64, value: &[u8]| {
            let o = LeafObject::Record {
                collection: "c",
                key,
                seq,
                value,
            };
            (o.id(), o.hash())
        };
        let expected: BTreeMap<_, _> = [leaf("a", 3, b"three"), leaf("c", 5, b"four")].into();
        assert_eq!(
            source_root_of_feed("crm", &feed).unwrap(),
            (namespace_root("crm", &expected), 2)
        );
    }

    // Goal: a line longer than the agent takes is an error naming the line; a line of exactly
    // the limit is read.
    #[test]
    fn a_feed_line_past_the_limit_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let feed = dir.path().join("feed.jsonl");
        let long = "x".repeat(LINE_BYTES_MAX + 1);
        let text = format!(
            "{}\n{}\n{}\n",
            event("a", "put", "one", 1),
            long,
            event("b", "put", "two", 2)
        );
        std::fs::write(&feed, text).unwrap();
        let err = source_root_of_feed("crm", &feed).unwrap_err();
        assert!(err.contains("line 2: longer than"), "{err}");
        // A line of exactly the limit is read (and here refused as no event).
        std::fs::write(&feed, format!("{}\n", "x".repeat(LINE_BYTES_MAX))).unwrap();
        let err = source_root_of_feed("crm", &feed).unwrap_err();
        assert!(err.contains("line 1: not a valid event"), "{err}");
    }
}
