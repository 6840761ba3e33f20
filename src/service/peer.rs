//! The peer service: Raft RPCs, snapshot receiving and forwarded client requests. Reachable
//! only through the mutual-TLS listener, so every caller holds a cluster-CA certificate.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use super::Core;
use crate::ledger::Command;
use crate::pb;
use crate::raft::codec;
use crate::raft::network::{ForwardReply, ForwardRequest, PEER_TARGET_HEADER};
use crate::raft::{NodeId, Snapshot, SnapshotMeta, Vote};
use crate::store::{SnapshotDir, SnapshotFileInfo};

/// Most files a snapshot may declare: a checkpoint has a handful of SSTs plus metadata files.
pub const SNAPSHOT_FILES_MAX: usize = 100_000;
/// Largest declared snapshot file, in bytes.
pub const SNAPSHOT_FILE_BYTES_MAX: u64 = 1 << 40;
/// Snapshot streams a node receives at once; one more is refused (the sender retries).
/// A leader sends a follower one at a time; a second covers a new leader's stream starting
/// before the old one's has ended.
pub const SNAPSHOT_RECEIVES_AT_ONCE: usize = 2;
/// Disk space a received snapshot must leave free on the node's filesystem: the log and the
/// state machine go on writing while it arrives.
pub const SNAPSHOT_DISK_RESERVE_BYTES: u64 = 256 * 1024 * 1024;

/// Refuses a snapshot whose declared files (`total` bytes) would not fit on the filesystem of
/// `dir` with [`SNAPSHOT_DISK_RESERVE_BYTES`] to spare, before anything is written: the sender
/// is told why, and this node's disk does not fill up with a transfer that cannot finish.
fn check_snapshot_fits(dir: &Path, total: u64) -> Result<(), Status> {
    let free = crate::workers::disk::free_bytes(dir).map_err(|e| {
        Status::internal(format!("cannot read free space of {}: {e}", dir.display()))
    })?;
    if total.saturating_add(SNAPSHOT_DISK_RESERVE_BYTES) > free {
        return Err(Status::resource_exhausted(format!(
            "a snapshot of {total} bytes does not fit: {free} bytes free under {}, of which \
             {SNAPSHOT_DISK_RESERVE_BYTES} stay in reserve",
            dir.display()
        )));
    }
    Ok(())
}

pub struct PeerService {
    pub core: Arc<Core>,
}

/// The peer listener's check that a request is for this node ([`PEER_TARGET_HEADER`]): one
/// for another is refused with `FailedPrecondition` and why, so the sender's log shows the
/// misrouting and its Raft never counts this node's answer for another. A request naming no
/// node comes from a node of an older build (before 2026-11-25) and is answered, so a
/// cluster can be upgraded one node at a time; a warning is logged once.
pub fn addressed_here(
    own: NodeId,
) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    let warned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    move |request: Request<()>| {
        let Some(value) = request.metadata().get(PEER_TARGET_HEADER) else {
            if !warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::warn!(
                    "a peer request names no target node (a node of an older build); answered"
                );
            }
            return Ok(request);
        };
        let target = value
            .to_str()
            .ok()
            .and_then(|t| t.parse::<NodeId>().ok())
            .ok_or_else(|| {
                Status::invalid_argument(format!("{PEER_TARGET_HEADER} is not a node id"))
            })?;
        if target != own {
            return Err(Status::failed_precondition(format!(
                "this is node {own}, not node {target}: the sender was given an address for \
                 node {target} that reaches node {own} (in its membership, or in a cluster add \
                 or initial_members; check the addresses in cluster status and each node's \
                 node_id)"
            )));
        }
        Ok(request)
    }
}

fn decode<T: serde::de::DeserializeOwned>(msg: &pb::RaftMessage) -> Result<T, Status> {
    codec::decode(&msg.payload).map_err(|e| Status::invalid_argument(format!("bad payload: {e}")))
}

fn reply<T: serde::Serialize>(value: &T) -> Response<pb::RaftMessage> {
    Response::new(pb::RaftMessage {
        payload: codec::encode(value),
    })
}

#[tonic::async_trait]
impl pb::peer_server::Peer for PeerService {
    async fn append_entries(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = decode(request.get_ref())?;
        let result = self.core.raft.append_entries(rpc).await;
        Ok(reply(&result))
    }

    async fn vote(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let rpc = decode(request.get_ref())?;
        let result = self.core.raft.vote(rpc).await;
        Ok(reply(&result))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotFrame>>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        let _receiving = self.core.snapshot_receives.try_acquire().map_err(|_| {
            let status = Status::resource_exhausted(format!(
                "{SNAPSHOT_RECEIVES_AT_ONCE} snapshot streams are being received already; try later"
            ));
            tracing::warn!(error = %status.message(), "snapshot refused");
            status
        })?;
        let mut stream = request.into_inner();
        let dir = self
            .core
            .reader
            .incoming_snapshot_dir()
            .map_err(|e| Status::internal(format!("cannot create snapshot dir: {e}")))?;
        let answer = match receive_snapshot(&mut stream, &dir, self.core.snapshot_frame_wait).await
        {
            Ok((vote, meta, files)) => {
                tracing::info!(snapshot_id = %meta.snapshot_id, files = files.len(), "snapshot received and verified");
                let snapshot = Snapshot {
                    meta,
                    snapshot: Box::new(SnapshotDir {
                        path: dir.clone(),
                        files,
                    }),
                };
                let result = self.core.raft.install_full_snapshot(vote, snapshot).await;
                Ok(reply(&result))
            }
            Err(status) => {
                tracing::warn!(error = %status.message(), "snapshot rejected");
                Err(status)
            }
        };
        // Refused, dropped as stale by openraft (without an error), or installed (its files
        // moved away): in every case nothing of the transfer may stay behind.
        if let Some(incoming) = dir.parent() {
            let _ = tokio::fs::remove_dir_all(incoming).await;
        }
        answer
    }

    async fn forward(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        // No bigger than a client could have sent the follower, so it fits one entry.
        let len = request.get_ref().payload.len();
        if len > crate::node::CLIENT_MESSAGE_BYTES_MAX {
            return Err(Status::resource_exhausted(format!(
                "forwarded request of {len} bytes, over the client message limit of {} bytes",
                crate::node::CLIENT_MESSAGE_BYTES_MAX
            )));
        }
        let forwarded: ForwardRequest = decode(request.get_ref())?;
        let answer = match forwarded {
            ForwardRequest::Write(Command::Batch(_) | Command::Timed { .. }) => {
                return Err(Status::invalid_argument(
                    "a forwarded write is one client command; batches are formed by the leader",
                ));
            }
            ForwardRequest::Write(command) => {
                ForwardReply::Written(self.core.write(command, false).await?)
            }
            ForwardRequest::ReadIndex => {
                ForwardReply::ReadIndex(self.core.read_barrier(true, false).await?)
            }
        };
        Ok(reply(&answer))
    }

    async fn has_chunks(
        &self,
        request: Request<pb::ChunkList>,
    ) -> Result<Response<pb::ChunkPresence>, Status> {
        let hashes = super::artifacts::digests(&request.into_inner().hashes)?;
        let chunks = self.core.chunks.clone();
        let present = tokio::task::spawn_blocking(move || {
            // Present copies are about to be referenced by an upload: restart their GC grace.
            hashes.iter().map(|h| chunks.claim(h)).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ChunkPresence { present }))
    }

    async fn put_chunk(
        &self,
        request: Request<pb::ChunkData>,
    ) -> Result<Response<pb::ChunkAck>, Status> {
        let req = request.into_inner();
        let hash = super::artifacts::digest(&req.hash)?;
        if let Some(refusal) = self.core.disk.local_refusal() {
            return Err(super::status::low_disk(refusal));
        }
        self.core.store_chunk(hash, req.data).await?;
        Ok(Response::new(pb::ChunkAck {}))
    }

    async fn disk_space(
        &self,
        _: Request<pb::DiskSpaceRequest>,
    ) -> Result<Response<pb::DiskSpaceReply>, Status> {
        // The disk worker's last reading: answering never waits on the disk.
        let reading = self.core.disk.local().ok_or_else(|| {
            Status::unavailable("this node has no fresh reading of its free disk space")
        })?;
        Ok(Response::new(pb::DiskSpaceReply {
            node: self.core.id,
            free_bytes: reading.free.unwrap_or(0),
            reserve_bytes: reading.reserve,
            unreadable: reading.free.is_none(),
        }))
    }

    async fn get_chunk(
        &self,
        request: Request<pb::ChunkId>,
    ) -> Result<Response<pb::ChunkData>, Status> {
        let hash = super::artifacts::digest(&request.into_inner().hash)?;
        let data = self.core.local_chunk(hash).await?;
        Ok(Response::new(pb::ChunkData {
            hash: hash.to_vec(),
            data,
        }))
    }
}

fn safe_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

struct OpenFile {
    file: tokio::fs::File,
    hasher: blake3::Hasher,
    written: u64,
}

async fn finish_file(
    dir: &Path,
    info: &SnapshotFileInfo,
    open: Option<OpenFile>,
) -> Result<(), Status> {
    let (mut file, hash, written) = match open {
        Some(o) => (o.file, o.hasher.finalize(), o.written),
        None => (
            tokio::fs::File::create(dir.join(&info.name))
                .await
                .map_err(|e| Status::internal(e.to_string()))?,
            blake3::hash(b""),
            0,
        ),
    };
    if written != info.size {
        return Err(Status::data_loss(format!(
            "snapshot file {} ended at {written} bytes, declared {}",
            info.name, info.size
        )));
    }
    if hash.as_bytes() != &info.blake3 {
        return Err(Status::data_loss(format!(
            "snapshot file {} does not match its blake3",
            info.name
        )));
    }
    file.flush()
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    file.sync_all()
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
    Ok(())
}

/// The stream's next frame, or its end; a sender silent for `wait` is dropped.
async fn next_frame(
    stream: &mut Streaming<pb::SnapshotFrame>,
    wait: Duration,
) -> Result<Option<Result<pb::SnapshotFrame, Status>>, Status> {
    tokio::time::timeout(wait, stream.next())
        .await
        .map_err(|_| {
            Status::deadline_exceeded(format!(
                "no snapshot frame for {} ms (raft.snapshot_frame_wait_ms); transfer abandoned",
                wait.as_millis()
            ))
        })
}

/// Receives a snapshot stream into `dir`, verifying order, sizes and every file's blake3.
async fn receive_snapshot(
    stream: &mut Streaming<pb::SnapshotFrame>,
    dir: &Path,
    frame_wait: Duration,
) -> Result<(Vote, SnapshotMeta, Vec<SnapshotFileInfo>), Status> {
    let first = next_frame(stream, frame_wait)
        .await?
        .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
    let Some(pb::snapshot_frame::Frame::Header(header)) = first.frame else {
        return Err(Status::invalid_argument(
            "a snapshot stream starts with its header",
        ));
    };
    let (vote, meta): (Vote, SnapshotMeta) = codec::decode(&header.vote_and_meta)
        .map_err(|e| Status::invalid_argument(format!("bad snapshot header: {e}")))?;
    if header.files.len() > SNAPSHOT_FILES_MAX {
        return Err(Status::resource_exhausted("too many snapshot files"));
    }
    let mut files = Vec::with_capacity(header.files.len());
    let mut names = std::collections::HashSet::new();
    for f in header.files {
        if !names.insert(f.name.clone()) {
            return Err(Status::invalid_argument(format!(
                "snapshot file {:?} is listed twice",
                f.name
            )));
        }
        let blake3: [u8; 32] = f
            .blake3
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("a snapshot file hash is 32 bytes"))?;
        if !safe_file_name(&f.name) || f.size > SNAPSHOT_FILE_BYTES_MAX {
            return Err(Status::invalid_argument(format!(
                "snapshot file {:?} has an unsafe name or size",
                f.name
            )));
        }
        files.push(SnapshotFileInfo {
            name: f.name,
            size: f.size,
            blake3,
        });
    }
    let total = files.iter().fold(0u64, |t, f| t.saturating_add(f.size));
    check_snapshot_fits(dir, total)?;
    let mut current: usize = 0;
    let mut open: Option<OpenFile> = None;
    while let Some(frame) = next_frame(stream, frame_wait).await? {
        let frame = frame?;
        let Some(pb::snapshot_frame::Frame::Data(data)) = frame.frame else {
            return Err(Status::invalid_argument(
                "only data frames may follow the header",
            ));
        };
        let index = data.file_index as usize;
        if index < current || index >= files.len() {
            return Err(Status::invalid_argument("snapshot frames out of order"));
        }
        while current < index {
            finish_file(dir, &files[current], open.take()).await?;
            current += 1;
        }
        let info = &files[current];
        if open.is_none() {
            let file = tokio::fs::File::create(dir.join(&info.name))
                .await
                .map_err(|e| Status::internal(e.to_string()))?;
            open = Some(OpenFile {
                file,
                hasher: blake3::Hasher::new(),
                written: 0,
            });
        }
        let o = open.as_mut().expect("opened above");
        if data.offset != o.written || o.written + data.data.len() as u64 > info.size {
            return Err(Status::invalid_argument(format!(
                "snapshot file {} frame at offset {} does not continue at {}",
                info.name, data.offset, o.written
            )));
        }
        o.hasher.update(&data.data);
        o.file
            .write_all(&data.data)
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        o.written += data.data.len() as u64;
    }
    while current < files.len() {
        finish_file(dir, &files[current], open.take()).await?;
        current += 1;
    }
    crate::store::fsync_dir(dir).map_err(|e| Status::internal(e.to_string()))?;
    Ok((vote, meta, files))
}
