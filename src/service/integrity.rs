//! The integrity service: checkpoints, this node's roots at a checkpoint, deep verification of
//! this node's stored bytes, and signed attestations.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::{status, Core};
use crate::attest::Statement;
use crate::domain::{hex, Checkpoint, TenantId};
use crate::ledger::{Command, Outcome};
use crate::pb;

/// How long a node waits to apply up to a checkpoint before answering.
const CHECKPOINT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Faults (records, trees, checkpoints) one deep-verify reply lists; past it, one more entry
/// per namespace counts that namespace's unlisted faults. A store damaged everywhere (a failed
/// disk) still gets a reply of bounded size that names where the damage is.
pub const DEEP_VERIFY_FAULTS_LISTED_MAX: usize = 10_000;
/// Bad chunk copies one deep-verify reply lists; past it, one more entry counts the rest (a
/// node whose chunk directory was lost would otherwise list every chunk it holds).
pub const DEEP_VERIFY_BAD_CHUNKS_LISTED_MAX: usize = 1_000;

/// The first `max` of `mismatches`, then one entry per namespace (in name order) counting
/// those of it left unlisted, described by `more` (given the count, the bound).
fn listed_within(
    mismatches: impl IntoIterator<Item = pb::ObjectMismatch>,
    max: usize,
    more: impl Fn(u64, usize) -> (String, &'static str, &'static str),
) -> Vec<pb::ObjectMismatch> {
    let mut listed = Vec::new();
    let mut unlisted: std::collections::BTreeMap<String, u64> = Default::default();
    for m in mismatches {
        if listed.len() < max {
            listed.push(m);
        } else {
            *unlisted.entry(m.namespace).or_default() += 1;
        }
    }
    listed.extend(unlisted.into_iter().map(|(namespace, n)| {
        let (object, expected, found) = more(n, max);
        pb::ObjectMismatch {
            namespace,
            object,
            expected: expected.into(),
            found: found.into(),
        }
    }));
    listed
}

pub struct IntegrityService {
    pub core: Arc<Core>,
}

impl IntegrityService {
    /// The checkpoint at `index`, once this node has applied it.
    async fn checkpoint_at(&self, index: u64) -> Result<Checkpoint, Status> {
        self.core
            .raft
            .wait(Some(CHECKPOINT_WAIT))
            .applied_index_at_least(Some(index), "checkpoint")
            .await
            .map_err(|e| {
                Status::unavailable(format!(
                    "node {} has not applied index {index}: {e}",
                    self.core.id
                ))
            })?;
        self.core
            .reader
            .checkpoint(index)
            .map_err(status::storage)?
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no checkpoint at index {index} (not a checkpoint, or dropped; only the newest {} are kept)",
                    crate::store::sm::CHECKPOINTS_KEPT
                ))
            })
    }
}

#[tonic::async_trait]
impl pb::integrity_server::Integrity for IntegrityService {
    async fn checkpoint(
        &self,
        _: Request<pb::CheckpointRequest>,
    ) -> Result<Response<pb::CheckpointReply>, Status> {
        match self.core.write(Command::Checkpoint, true).await? {
            Outcome::Checkpoint { index } => Ok(Response::new(pb::CheckpointReply { index })),
            other => Err(status::rejected(other)),
        }
    }

    async fn roots(
        &self,
        request: Request<pb::RootsRequest>,
    ) -> Result<Response<pb::RootsReply>, Status> {
        let c = self.checkpoint_at(request.into_inner().index).await?;
        Ok(Response::new(pb::RootsReply {
            node: self.core.id,
            index: c.index,
            time_ms: c.time_ms,
            roots: c
                .roots
                .iter()
                .map(|(ns, r)| pb::NamespaceRootInfo {
                    namespace: ns.clone(),
                    root: r.root.to_vec(),
                    leaves: r.leaves,
                })
                .collect(),
            cluster_root: c.cluster_root.to_vec(),
        }))
    }

    async fn deep_verify(
        &self,
        request: Request<pb::DeepVerifyRequest>,
    ) -> Result<Response<pb::DeepVerifyReply>, Status> {
        let only = request.into_inner().namespace;
        let only = if only.is_empty() {
            None
        } else {
            Some(TenantId::parse(&only).map_err(status::input)?)
        };
        let _running = self.core.deep_checks.try_acquire().map_err(|_| {
            Status::resource_exhausted(format!(
                "node {} is already running a deep verify (at most {} at once); try again \
                 when it is done",
                self.core.id,
                super::DEEP_CHECKS_AT_ONCE
            ))
        })?;
        let started = Instant::now();
        let reader = self.core.reader.clone();
        let check = tokio::task::spawn_blocking(move || {
            reader.deep_check(only.as_ref()).map_err(status::storage)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        // Namespace-less faults (the checkpoints span every namespace) go out with an empty one.
        let mismatches = check
            .namespaces
            .iter()
            .flat_map(|ns| ns.faults.iter().map(|f| (ns.namespace.as_str(), f)))
            .chain(check.checkpoint_faults.iter().map(|f| ("", f)))
            .map(|(namespace, f)| pb::ObjectMismatch {
                namespace: namespace.to_string(),
                object: f.object.clone(),
                expected: f.expected.clone(),
                found: f.stored.clone(),
            });
        let mismatches = listed_within(mismatches, DEEP_VERIFY_FAULTS_LISTED_MAX, |n, max| {
            (
                format!("{n} more faults here (not listed; the reply lists {max} at most)"),
                "as maintained",
                "differ",
            )
        });
        // Re-hash every referenced chunk. This only reports; a bad copy wakes the scrubber,
        // which quarantines it and puts a verified copy from a peer in its place.
        let chunks = self.core.chunks.clone();
        let refs = check.chunks;
        let (bad_chunks, checked, bytes) = tokio::task::spawn_blocking(move || {
            let mut bad = Vec::new();
            let mut bytes = 0u64;
            for c in &refs {
                match chunks.check(&c.hash) {
                    Ok(len) => bytes += len as u64,
                    Err(e) => bad.push(pb::ObjectMismatch {
                        namespace: String::new(),
                        object: format!("chunk {}", hex(&c.hash)),
                        expected: hex(&c.hash),
                        found: match e {
                            crate::chunks::ChunkError::Mismatch { found, .. } => found,
                            crate::chunks::ChunkError::Missing(_) => "missing".into(),
                            other => other.to_string(),
                        },
                    }),
                }
            }
            (bad, refs.len() as u64, bytes)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        if !bad_chunks.is_empty() {
            tracing::warn!(
                bad = bad_chunks.len(),
                "deep verify found bad chunk copies; scrubbing now"
            );
            self.core.scrub_kick.notify_one();
        }
        let bad_chunks = listed_within(bad_chunks, DEEP_VERIFY_BAD_CHUNKS_LISTED_MAX, |n, max| {
            (
                format!("{n} more chunks (not listed; the first {max} are)"),
                "matching their addresses",
                "missing or not matching",
            )
        });
        Ok(Response::new(pb::DeepVerifyReply {
            node: self.core.id,
            applied_index: check.applied_index,
            mismatches,
            bad_chunks,
            chunks_checked: checked,
            bytes_hashed: bytes,
            micros: started.elapsed().as_micros() as u64,
        }))
    }

    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestReply>, Status> {
        let req = request.into_inner();
        let tenant = if req.tenant.is_empty() {
            None
        } else {
            Some(TenantId::parse(&req.tenant).map_err(status::input)?)
        };
        let c = self.checkpoint_at(req.index).await?;
        let statement = Statement::from_checkpoint(
            &self.core.cluster_name,
            &c,
            tenant.as_ref().map(TenantId::as_str),
        );
        Ok(Response::new(pb::AttestReply {
            node: self.core.id,
            public_key: hex(self.core.identity.verifying_key().as_bytes()),
            statement: serde_json::to_string(&statement)
                .map_err(|e| Status::internal(e.to_string()))?,
            signature: statement.sign(&self.core.identity),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::listed_within;
    use crate::pb::ObjectMismatch;

    fn mismatch(namespace: &str, object: &str) -> ObjectMismatch {
        ObjectMismatch {
            namespace: namespace.into(),
            object: object.into(),
            expected: "e".into(),
            found: "f".into(),
        }
    }

    fn more(n: u64, max: usize) -> (String, &'static str, &'static str) {
        (format!("{n} more of {max}"), "as maintained", "differ")
    }

    #[test]
    fn a_reply_lists_up_to_its_bound_then_counts_the_rest_per_namespace() {
        let all = || {
            [
                ("b", "1"),
                ("a", "2"),
                ("b", "3"),
                ("", "4"),
                ("b", "5"),
                ("a", "6"),
            ]
            .map(|(ns, o)| mismatch(ns, o))
        };
        // Within the bound: everything, unchanged and in order.
        assert_eq!(listed_within(all(), 6, more), all().to_vec());
        // Past it: the first two, then one count per namespace with unlisted ones, by name.
        let listed = listed_within(all(), 2, more);
        let shown: Vec<(&str, &str)> = listed
            .iter()
            .map(|m| (m.namespace.as_str(), m.object.as_str()))
            .collect();
        assert_eq!(
            shown,
            [
                ("b", "1"),
                ("a", "2"),
                ("", "1 more of 2"),
                ("a", "1 more of 2"),
                ("b", "2 more of 2")
            ]
        );
        assert!(listed[2..]
            .iter()
            .all(|m| m.expected == "as maintained" && m.found == "differ"));
        assert!(listed_within(Vec::new(), 0, more).is_empty());
    }
}
