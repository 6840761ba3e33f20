//! Uploading a file as an artifact version and downloading one back (client side).
//!
//! Upload: chunk the file with content-defined chunking (fastcdc), hash each chunk and the
//! whole file (one pass, one chunk in memory), ask the cluster which chunks it lacks, send only
//! those (re-read from the file by offset and re-checked), then commit the manifest. An upload
//! cut short (a disconnect, a leader change, a killed agent) resumes by asking again: chunks
//! already durable are not sent twice.
//!
//! Download: fetch the manifest, read the chunks in order into a temporary file beside the
//! target, verify every chunk against its address and the whole file against its blake3,
//! fsync, and only then rename it into place.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use serde::Serialize;

use crate::client::{ClientError, EscrowClient};
use crate::domain::{
    ChunkRef, Digest, Manifest, ARTIFACT_CHUNKS_MAX, CHUNK_AVG_BYTES, CHUNK_MAX_BYTES,
    CHUNK_MIN_BYTES,
};

/// Chunks sent (or read back) concurrently per file.
pub const CHUNKS_IN_FLIGHT: usize = 4;
/// Read buffer for chunking a file.
const READ_BUFFER_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("cannot read {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("cannot write {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path} changed while it was being uploaded; it will be sent again")]
    Changed { path: PathBuf },
    #[error("{path} needs {chunks} chunks, over the limit of {ARTIFACT_CHUNKS_MAX} per artifact")]
    TooLarge { path: PathBuf, chunks: usize },
    #[error("{0}")]
    Cluster(#[from] ClientError),
    #[error("the cluster sent a bad {what} for {name}: {detail}")]
    Corrupt {
        what: &'static str,
        name: String,
        detail: String,
    },
}

/// A file cut into chunks: the manifest and each chunk's offset in the file.
pub struct ChunkedFile {
    pub manifest: Manifest,
    pub offsets: Vec<u64>,
}

/// Chunks and hashes a file. Blocking; memory stays at one chunk plus the read buffer.
pub fn chunk_file(path: &Path) -> Result<ChunkedFile, TransferError> {
    let read = |cause| TransferError::Read {
        path: path.to_path_buf(),
        cause,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let source_ms = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis() as u64);
    let reader = std::io::BufReader::with_capacity(READ_BUFFER_BYTES, file);
    let mut whole = blake3::Hasher::new();
    let mut chunks = Vec::new();
    let mut offsets = Vec::new();
    let mut size = 0u64;
    for chunk in
        fastcdc::v2020::StreamCDC::new(reader, CHUNK_MIN_BYTES, CHUNK_AVG_BYTES, CHUNK_MAX_BYTES)
    {
        let chunk = chunk.map_err(|e| read(std::io::Error::other(e.to_string())))?;
        whole.update(&chunk.data);
        chunks.push(ChunkRef {
            hash: *blake3::hash(&chunk.data).as_bytes(),
            size: chunk.length as u32,
        });
        offsets.push(chunk.offset);
        size += chunk.length as u64;
        if chunks.len() > ARTIFACT_CHUNKS_MAX {
            return Err(TransferError::TooLarge {
                path: path.to_path_buf(),
                chunks: chunks.len(),
            });
        }
    }
    Ok(ChunkedFile {
        manifest: Manifest {
            size,
            blake3: *whole.finalize().as_bytes(),
            chunks,
            source_ms,
        },
        offsets,
    })
}

/// What an upload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UploadReport {
    pub name: String,
    pub version: u64,
    /// False when the content equalled the latest version (no new version).
    pub changed: bool,
    pub size: u64,
    pub blake3: String,
    pub chunks: usize,
    pub chunks_sent: usize,
    pub bytes_sent: u64,
}

/// Uploads `path` as a new version of `namespace/name` (no new version if unchanged).
pub async fn upload_file(
    client: &EscrowClient,
    namespace: &str,
    name: &str,
    path: &Path,
) -> Result<UploadReport, TransferError> {
    let owned = path.to_path_buf();
    let chunked = tokio::task::spawn_blocking(move || chunk_file(&owned))
        .await
        .map_err(|e| TransferError::Read {
            path: path.to_path_buf(),
            cause: std::io::Error::other(e.to_string()),
        })??;
    upload_chunked(client, namespace, name, path, chunked).await
}

/// Sends the chunks of an already chunked file that the cluster lacks, then commits.
pub async fn upload_chunked(
    client: &EscrowClient,
    namespace: &str,
    name: &str,
    path: &Path,
    chunked: ChunkedFile,
) -> Result<UploadReport, TransferError> {
    let manifest = &chunked.manifest;
    // Each distinct chunk once, with the first offset it appears at.
    let mut first_offset: std::collections::HashMap<Digest, (u64, u32)> = Default::default();
    let mut unique = Vec::new();
    for (c, offset) in manifest.chunks.iter().zip(&chunked.offsets) {
        if first_offset.insert(c.hash, (*offset, c.size)).is_none() {
            unique.push(c.hash);
        }
    }
    let missing = if unique.is_empty() {
        Vec::new()
    } else {
        client.missing_chunks(&unique).await?
    };
    let file = Arc::new(
        std::fs::File::open(path).map_err(|cause| TransferError::Read {
            path: path.to_path_buf(),
            cause,
        })?,
    );
    let sent: Vec<u64> = stream::iter(missing.iter().copied())
        .map(|hash| {
            let known = first_offset.get(&hash).copied();
            let file = file.clone();
            async move {
                let (offset, size) = known.ok_or_else(|| TransferError::Corrupt {
                    what: "missing-chunk list",
                    name: name.to_string(),
                    detail: format!(
                        "it names chunk {} that was not asked about",
                        crate::domain::hex(&hash)
                    ),
                })?;
                let read_path = path.to_path_buf();
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; size as usize];
                    file.read_exact_at(&mut buf, offset).map(|_| buf)
                })
                .await
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|r| r)
                .map_err(|cause| TransferError::Read {
                    path: read_path,
                    cause,
                })?;
                if blake3::hash(&data).as_bytes() != &hash {
                    return Err(TransferError::Changed {
                        path: path.to_path_buf(),
                    });
                }
                client.put_chunk(&hash, data).await?;
                Ok::<u64, TransferError>(u64::from(size))
            }
        })
        .buffer_unordered(CHUNKS_IN_FLIGHT)
        .try_collect()
        .await?;
    let committed = client
        .commit_artifact(
            namespace,
            name,
            crate::service::artifacts::manifest_to_pb(manifest, true),
        )
        .await?;
    Ok(UploadReport {
        name: name.to_string(),
        version: committed.version,
        changed: committed.changed,
        size: manifest.size,
        blake3: crate::domain::hex(&manifest.blake3),
        chunks: manifest.chunks.len(),
        chunks_sent: sent.len(),
        bytes_sent: sent.iter().sum(),
    })
}

/// What a download did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DownloadReport {
    pub name: String,
    pub version: u64,
    pub size: u64,
    pub blake3: String,
    pub chunks: usize,
}

/// Downloads `namespace/name` at `version` (0: the latest) into `out`, verified.
pub async fn download_file(
    client: &EscrowClient,
    namespace: &str,
    name: &str,
    version: u64,
    out: &Path,
) -> Result<DownloadReport, TransferError> {
    let v = client.artifact(namespace, name, version).await?;
    let corrupt = |what, detail: String| TransferError::Corrupt {
        what,
        name: format!("{namespace}/{name} version {}", v.version),
        detail,
    };
    let Some(m) = v.manifest.clone().filter(|_| !v.deleted) else {
        return Err(ClientError::Rpc(tonic::Status::not_found(format!(
            "{namespace}/{name} version {} is a delete",
            v.version
        )))
        .into());
    };
    let expected_whole: Digest = m
        .blake3
        .as_slice()
        .try_into()
        .map_err(|_| corrupt("manifest", "whole-file hash is not 32 bytes".into()))?;
    let write_err = |cause| TransferError::Write {
        path: out.to_path_buf(),
        cause,
    };
    // Whole or not at all: removed unless the whole file verified.
    let mut replacement = crate::store::Replacement::new(out, false).map_err(write_err)?;
    let mut file = std::io::BufWriter::new(replacement.file());
    let mut whole = blake3::Hasher::new();
    let version_no = v.version;
    let mut reads = stream::iter(m.chunks.iter().enumerate())
        .map(|(i, info)| async move {
            let data = client
                .read_chunk(namespace, name, version_no, i as u32)
                .await?;
            Ok::<_, TransferError>((i, info, data.data))
        })
        .buffered(CHUNKS_IN_FLIGHT);
    let result: Result<(), TransferError> = async {
        while let Some(next) = reads.next().await {
            let (i, info, data) = next?;
            if blake3::hash(&data).as_bytes().as_slice() != info.hash.as_slice()
                || data.len() != info.size as usize
            {
                return Err(corrupt(
                    "chunk",
                    format!("chunk {i} does not match its hash"),
                ));
            }
            whole.update(&data);
            file.write_all(&data).map_err(write_err)?;
        }
        if whole.finalize().as_bytes() != &expected_whole {
            return Err(corrupt(
                "file",
                "the whole-file blake3 does not match".into(),
            ));
        }
        file.into_inner().map_err(|e| write_err(e.into_error()))?;
        Ok(())
    }
    .await;
    result?;
    replacement.commit().map_err(write_err)?;
    Ok(DownloadReport {
        name: name.to_string(),
        version: v.version,
        size: m.size,
        blake3: crate::domain::hex(&expected_whole),
        chunks: m.chunks.len(),
    })
}
