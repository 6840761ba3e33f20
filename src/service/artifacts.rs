//! Artifacts: chunk replication between chunk stores and the client service for uploading and
//! downloading artifact versions.
//!
//! Bulk bytes never enter the Raft log. A chunk is stored (verified, fsynced) on the node that
//! receives it and pushed to the other voters; `PutChunk` answers once a majority of voters
//! hold it. `Commit` re-reads every chunk of the manifest on the receiving node (fetching any it
//! lacks), checks each chunk and the whole-file blake3, makes sure every chunk is on a
//! majority, and only then proposes the manifest through Raft. Nodes missing chunks of a
//! committed version fetch them from peers in the background (`workers::chunks`).

use std::collections::HashSet;
use std::sync::Arc;

use futures::stream::{FuturesUnordered, StreamExt};
use tonic::{Request, Response, Status};

use super::{status, Core};
use crate::chunks::ChunkError;
use crate::domain::{
    digest_from_bytes, ArtifactName, ArtifactVersion, ChunkRef, Digest, Manifest, TenantId,
    ARTIFACT_CHUNKS_MAX,
};
use crate::ledger::{Command, Outcome};
use crate::pb;
use crate::raft::{EscrowNode, NodeId};

/// Artifacts one `List` page returns at most.
pub const LIST_PAGE_MAX: usize = 1000;

pub fn digest(bytes: &[u8]) -> Result<Digest, Status> {
    digest_from_bytes("chunk hash", bytes).map_err(status::input)
}

/// Parses a list of digests, at most one manifest's worth.
pub fn digests(list: &[Vec<u8>]) -> Result<Vec<Digest>, Status> {
    if list.len() > ARTIFACT_CHUNKS_MAX {
        return Err(Status::resource_exhausted(format!(
            "{} chunk hashes in one request, over the limit of {ARTIFACT_CHUNKS_MAX}",
            list.len()
        )));
    }
    list.iter().map(|h| digest(h)).collect()
}

fn chunk_status(e: ChunkError) -> Status {
    match e {
        ChunkError::Mismatch { .. } => Status::invalid_argument(e.to_string()),
        ChunkError::TooLarge { .. } => Status::resource_exhausted(e.to_string()),
        ChunkError::Missing(_) => Status::not_found(e.to_string()),
        ChunkError::Io { .. } => status::storage(e),
    }
}

fn join_error(e: tokio::task::JoinError) -> Status {
    Status::internal(format!("blocking task failed: {e}"))
}

pub fn manifest_to_pb(m: &Manifest, with_chunks: bool) -> pb::Manifest {
    pb::Manifest {
        size: m.size,
        blake3: m.blake3.to_vec(),
        chunks: if with_chunks {
            m.chunks
                .iter()
                .map(|c| pb::ChunkInfo {
                    hash: c.hash.to_vec(),
                    size: c.size,
                })
                .collect()
        } else {
            Vec::new()
        },
        source_ms: m.source_ms,
    }
}

pub fn manifest_from_pb(m: pb::Manifest) -> Result<Manifest, Status> {
    if m.chunks.len() > ARTIFACT_CHUNKS_MAX {
        return Err(Status::resource_exhausted(format!(
            "the manifest lists {} chunks, over the limit of {ARTIFACT_CHUNKS_MAX}",
            m.chunks.len()
        )));
    }
    let manifest = Manifest {
        size: m.size,
        blake3: digest_from_bytes("artifact blake3", &m.blake3).map_err(status::input)?,
        chunks: m
            .chunks
            .iter()
            .map(|c| {
                Ok(ChunkRef {
                    hash: digest(&c.hash)?,
                    size: c.size,
                })
            })
            .collect::<Result<_, Status>>()?,
        source_ms: m.source_ms,
    };
    manifest.validate().map_err(status::input)?;
    Ok(manifest)
}

fn version_to_pb(
    namespace: &TenantId,
    name: &ArtifactName,
    v: &ArtifactVersion,
    with_chunks: bool,
) -> pb::ArtifactVersion {
    pb::ArtifactVersion {
        namespace: namespace.as_str().to_string(),
        name: name.as_str().to_string(),
        version: v.version,
        revision: v.revision,
        time_ms: v.time_ms,
        deleted: v.manifest.is_none(),
        manifest: v.manifest.as_ref().map(|m| manifest_to_pb(m, with_chunks)),
        changed: false,
    }
}

/// Reads every chunk of `manifest` from the local store in order, checking each chunk and the
/// whole-file hash. Blocking; one chunk in memory at a time.
fn verify_local(chunks: &crate::chunks::ChunkStore, manifest: &Manifest) -> Result<(), Status> {
    let mut hasher = blake3::Hasher::new();
    for (i, c) in manifest.chunks.iter().enumerate() {
        let bytes = chunks.get(&c.hash).map_err(chunk_status)?;
        if bytes.len() != c.size as usize {
            return Err(Status::invalid_argument(format!(
                "chunk {i} is {} bytes, the manifest says {}",
                bytes.len(),
                c.size
            )));
        }
        hasher.update(&bytes);
    }
    let found = hasher.finalize();
    if found.as_bytes() != &manifest.blake3 {
        return Err(Status::invalid_argument(format!(
            "the chunks hash to {}, not to the manifest's whole-file blake3 {}",
            found.to_hex(),
            crate::domain::hex(&manifest.blake3)
        )));
    }
    Ok(())
}

/// A verified chunk, and whether this node holds a copy of it now.
pub struct Fetched {
    pub bytes: Vec<u8>,
    /// False when it came from a peer and this node's disk is under its reserve.
    pub kept: bool,
}

impl Core {
    /// Other voters with their addresses, and the majority of all voters.
    fn voter_peers(&self) -> (bool, Vec<(NodeId, EscrowNode)>, usize) {
        let voters = self.voters();
        let majority = voters.len() / 2 + 1;
        let self_votes = voters.iter().any(|(id, _)| *id == self.id);
        let peers = voters
            .into_iter()
            .filter(|(id, _)| *id != self.id)
            .collect();
        (self_votes, peers, majority)
    }

    /// Stores a chunk in this node's store (verified, fsynced).
    pub async fn store_chunk(&self, hash: Digest, data: Vec<u8>) -> Result<bool, Status> {
        let chunks = self.chunks.clone();
        tokio::task::spawn_blocking(move || chunks.put(&hash, &data))
            .await
            .map_err(join_error)?
            .map_err(chunk_status)
    }

    /// This node's verified copy of a chunk.
    pub async fn local_chunk(&self, hash: Digest) -> Result<Vec<u8>, Status> {
        let chunks = self.chunks.clone();
        tokio::task::spawn_blocking(move || chunks.get(&hash))
            .await
            .map_err(join_error)?
            .map_err(chunk_status)
    }

    /// A verified copy of a chunk: this node's, or else one fetched from a peer and stored
    /// here, except on a disk under its reserve ([`Fetched::kept`] false).
    pub async fn chunk_anywhere(&self, hash: Digest) -> Result<Fetched, Status> {
        match self.local_chunk(hash).await {
            Ok(bytes) => return Ok(Fetched { bytes, kept: true }),
            Err(s)
                if s.code() == tonic::Code::NotFound
                    || s.code() == tonic::Code::InvalidArgument => {}
            Err(s) => return Err(s),
        }
        let peers: Vec<(NodeId, EscrowNode)> = {
            let watch = self.raft.metrics();
            let metrics = watch.borrow();
            metrics
                .membership_config
                .membership()
                .nodes()
                .filter(|(id, _)| **id != self.id)
                .map(|(id, node)| (*id, node.clone()))
                .collect()
        };
        let mut last = Status::not_found(format!(
            "chunk {} is on no reachable node",
            crate::domain::hex(&hash)
        ));
        for (id, node) in &peers {
            match self.peers.get_chunk(*id, &node.raft_addr, &hash).await {
                Ok(bytes) => match self.keep_fetched_chunk(hash, &bytes).await {
                    Ok(kept) => return Ok(Fetched { bytes, kept }),
                    Err(e) => {
                        tracing::warn!(peer = id, chunk = %crate::domain::hex(&hash), error = %e.message(), "peer sent a bad chunk");
                        last = e;
                    }
                },
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Keeps a copy of a chunk fetched from a peer, which the store verifies against its
    /// address first; on a disk under its reserve ([`crate::workers::disk`]) the bytes are
    /// only verified, not kept (`false`), so a read or a repair never fills it.
    async fn keep_fetched_chunk(&self, hash: Digest, bytes: &[u8]) -> Result<bool, Status> {
        if self.disk.local_refusal().is_none() {
            return self.store_chunk(hash, bytes.to_vec()).await.map(|_| true);
        }
        crate::chunks::verify(&hash, bytes).map_err(chunk_status)?;
        Ok(false)
    }

    /// Stores a chunk here and on other voters; returns once a majority of voters hold it.
    /// Pushes to the remaining voters continue in the background.
    pub async fn replicate_chunk(&self, hash: Digest, data: Vec<u8>) -> Result<(), Status> {
        if let Some(refusal) = self.disk.refusal() {
            return Err(status::low_disk(refusal));
        }
        self.store_chunk(hash, data.clone()).await?;
        let (self_votes, peers, majority) = self.voter_peers();
        let mut copies = usize::from(self_votes);
        if copies >= majority {
            return Ok(());
        }
        let data = Arc::new(data);
        let mut pushes: FuturesUnordered<_> = peers
            .into_iter()
            .map(|(id, node)| {
                let peers = self.peers.clone();
                let data = data.clone();
                async move {
                    peers
                        .put_chunk(id, &node.raft_addr, &hash, (*data).clone())
                        .await
                        .map_err(|e| (id, e))
                }
            })
            .collect();
        let mut failures = Vec::new();
        while let Some(result) = pushes.next().await {
            match result {
                Ok(()) => copies += 1,
                Err((id, e)) => failures.push(format!("node {id}: {}", e.message())),
            }
            if copies >= majority {
                if !pushes.is_empty() {
                    tokio::spawn(async move { while pushes.next().await.is_some() {} });
                }
                return Ok(());
            }
        }
        Err(Status::unavailable(format!(
            "chunk {} reached {copies} of the {majority} voters needed: {}",
            crate::domain::hex(&hash),
            failures.join("; ")
        )))
    }

    /// How many voters hold each chunk (unreachable voters count as not holding it).
    pub async fn chunk_copies(&self, hashes: &[Digest]) -> Result<(Vec<usize>, usize), Status> {
        let (self_votes, peers, majority) = self.voter_peers();
        let mut counts = if self_votes {
            let chunks = self.chunks.clone();
            let hashes = hashes.to_vec();
            tokio::task::spawn_blocking(move || {
                hashes
                    .iter()
                    .map(|h| usize::from(chunks.claim(h)))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(join_error)?
        } else {
            vec![0; hashes.len()]
        };
        let answers = futures::future::join_all(
            peers
                .iter()
                .map(|(id, node)| self.peers.has_chunks(*id, &node.raft_addr, hashes)),
        )
        .await;
        for answer in answers.into_iter().flatten() {
            for (count, present) in counts.iter_mut().zip(answer) {
                *count += usize::from(present);
            }
        }
        Ok((counts, majority))
    }
}

pub struct ArtifactsService {
    pub core: Arc<Core>,
}

fn parse_ref(namespace: &str, name: &str) -> Result<(TenantId, ArtifactName), Status> {
    Ok((
        TenantId::parse(namespace).map_err(status::input)?,
        ArtifactName::parse(name).map_err(status::input)?,
    ))
}

impl ArtifactsService {
    /// The version from this node's state, confirming with the leader only when it is not
    /// (yet) here: versions never change once committed, so a local hit is always right.
    async fn version(
        &self,
        namespace: &TenantId,
        name: &ArtifactName,
        version: u64,
        linearizable: bool,
    ) -> Result<ArtifactVersion, Status> {
        let reader = &self.core.reader;
        if version == 0 || !linearizable {
            self.core.read_barrier(linearizable, true).await?;
        }
        let mut found = reader
            .artifact(namespace, name, version)
            .map_err(status::storage)?;
        if found.is_none() && version != 0 && linearizable {
            self.core.read_barrier(true, true).await?;
            found = reader
                .artifact(namespace, name, version)
                .map_err(status::storage)?;
        }
        found.ok_or_else(|| {
            Status::not_found(format!(
                "no artifact {}/{}{}",
                namespace.as_str(),
                name.as_str(),
                if version == 0 {
                    String::new()
                } else {
                    format!(" version {version}")
                }
            ))
        })
    }

    async fn write(
        &self,
        namespace: TenantId,
        name: ArtifactName,
        command: Command,
    ) -> Result<Response<pb::ArtifactVersion>, Status> {
        match self.core.write(command, true).await? {
            Outcome::Artifact {
                version,
                revision,
                changed,
            } => {
                let v = self
                    .core
                    .reader
                    .artifact(&namespace, &name, version)
                    .map_err(status::storage)?;
                let mut reply = match v {
                    Some(v) => version_to_pb(&namespace, &name, &v, false),
                    None => pb::ArtifactVersion {
                        namespace: namespace.as_str().into(),
                        name: name.as_str().into(),
                        version,
                        revision,
                        deleted: true,
                        ..Default::default()
                    },
                };
                reply.changed = changed;
                Ok(Response::new(reply))
            }
            other => Err(status::rejected(other)),
        }
    }
}

#[tonic::async_trait]
impl pb::artifacts_server::Artifacts for ArtifactsService {
    async fn missing_chunks(
        &self,
        request: Request<pb::ChunkList>,
    ) -> Result<Response<pb::ChunkList>, Status> {
        let hashes = digests(&request.into_inner().hashes)?;
        let (copies, majority) = self.core.chunk_copies(&hashes).await?;
        Ok(Response::new(pb::ChunkList {
            hashes: hashes
                .iter()
                .zip(copies)
                .filter(|(_, n)| *n < majority)
                .map(|(h, _)| h.to_vec())
                .collect(),
        }))
    }

    async fn put_chunk(
        &self,
        request: Request<pb::ChunkData>,
    ) -> Result<Response<pb::ChunkAck>, Status> {
        let req = request.into_inner();
        let hash = digest(&req.hash)?;
        self.core.replicate_chunk(hash, req.data).await?;
        Ok(Response::new(pb::ChunkAck {}))
    }

    async fn commit(
        &self,
        request: Request<pb::CommitRequest>,
    ) -> Result<Response<pb::ArtifactVersion>, Status> {
        let req = request.into_inner();
        let (namespace, name) = parse_ref(&req.namespace, &req.name)?;
        let manifest = manifest_from_pb(
            req.manifest
                .ok_or_else(|| Status::invalid_argument("the manifest is required"))?,
        )?;
        // Refused before fetching missing chunks onto a disk that has no room (a voter's,
        // or this node's even as a learner).
        let disk = &self.core.disk;
        if let Some(refusal) = disk.refusal().or_else(|| disk.local_refusal()) {
            return Err(status::low_disk(refusal));
        }
        // Every chunk here, verified, and the whole-file hash right, before anything commits.
        let mut unique: Vec<Digest> = Vec::new();
        let mut seen = HashSet::new();
        for c in &manifest.chunks {
            if seen.insert(c.hash) {
                unique.push(c.hash);
            }
        }
        for hash in &unique {
            // Not kept: this node's disk went under its reserve meanwhile.
            if !self.core.chunks.has(hash) && !self.core.chunk_anywhere(*hash).await?.kept {
                let refusal = self.core.disk.local_refusal();
                return Err(refusal.map(status::low_disk).unwrap_or_else(|| {
                    Status::unavailable("a chunk could not be kept here; retry")
                }));
            }
        }
        let chunks = self.core.chunks.clone();
        let to_verify = manifest.clone();
        tokio::task::spawn_blocking(move || verify_local(&chunks, &to_verify))
            .await
            .map_err(join_error)??;
        // Durable on a majority: push any chunk that is short of it from the local copy.
        let (copies, majority) = self.core.chunk_copies(&unique).await?;
        for (hash, n) in unique.iter().zip(copies) {
            if n < majority {
                let bytes = self.core.local_chunk(*hash).await?;
                self.core.replicate_chunk(*hash, bytes).await?;
            }
        }
        let command = Command::PutArtifact {
            namespace: namespace.clone(),
            name: name.clone(),
            manifest,
        };
        self.write(namespace, name, command).await
    }

    async fn delete(
        &self,
        request: Request<pb::ArtifactRef>,
    ) -> Result<Response<pb::ArtifactVersion>, Status> {
        let req = request.into_inner();
        let (namespace, name) = parse_ref(&req.namespace, &req.name)?;
        let command = Command::DeleteArtifact {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        self.write(namespace, name, command).await
    }

    async fn get(
        &self,
        request: Request<pb::ArtifactRef>,
    ) -> Result<Response<pb::ArtifactVersion>, Status> {
        let req = request.into_inner();
        let (namespace, name) = parse_ref(&req.namespace, &req.name)?;
        let linearizable = req.consistency != pb::ReadConsistency::Local as i32;
        let v = self
            .version(&namespace, &name, req.version, linearizable)
            .await?;
        Ok(Response::new(version_to_pb(&namespace, &name, &v, true)))
    }

    async fn list(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsReply>, Status> {
        let req = request.into_inner();
        let namespace = TenantId::parse(&req.namespace).map_err(status::input)?;
        let after = if req.after.is_empty() {
            None
        } else {
            Some(ArtifactName::parse(&req.after).map_err(status::input)?)
        };
        let limit = match req.limit as usize {
            0 => LIST_PAGE_MAX,
            n => n.min(LIST_PAGE_MAX),
        };
        let linearizable = req.consistency != pb::ReadConsistency::Local as i32;
        self.core.read_barrier(linearizable, true).await?;
        let mut artifacts = Vec::new();
        let mut cursor = after;
        let mut truncated = false;
        // Skipping tombstones may take more than one page of the store.
        loop {
            let page = self
                .core
                .reader
                .artifacts(&namespace, cursor.as_ref(), limit)
                .map_err(status::storage)?;
            let full = page.len() == limit;
            for (name, v) in page {
                cursor = Some(name.clone());
                if v.manifest.is_none() && !req.include_deleted {
                    continue;
                }
                artifacts.push(version_to_pb(&namespace, &name, &v, false));
                if artifacts.len() == limit {
                    truncated = true;
                    break;
                }
            }
            if truncated || !full {
                break;
            }
        }
        Ok(Response::new(pb::ListArtifactsReply {
            artifacts,
            truncated,
        }))
    }

    async fn read_chunk(
        &self,
        request: Request<pb::ReadChunkRequest>,
    ) -> Result<Response<pb::ChunkData>, Status> {
        let req = request.into_inner();
        let (namespace, name) = parse_ref(&req.namespace, &req.name)?;
        if req.version == 0 {
            return Err(Status::invalid_argument(
                "read chunks of an explicit version (Get returns the latest's number)",
            ));
        }
        let v = self.version(&namespace, &name, req.version, true).await?;
        let manifest = v.manifest.ok_or_else(|| {
            Status::not_found(format!(
                "{}/{} version {} is a delete",
                namespace.as_str(),
                name.as_str(),
                req.version
            ))
        })?;
        let chunk = manifest.chunks.get(req.index as usize).ok_or_else(|| {
            Status::out_of_range(format!(
                "chunk index {} is past the {} chunks of this version",
                req.index,
                manifest.chunks.len()
            ))
        })?;
        // Verified on read; a corrupt or missing local copy is replaced from a peer first.
        let data = self.core.chunk_anywhere(chunk.hash).await?.bytes;
        Ok(Response::new(pb::ChunkData {
            hash: chunk.hash.to_vec(),
            data,
        }))
    }
}
