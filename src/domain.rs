//! Plain domain types and input validation. No IO, no gRPC, no RocksDB.
//!
//! Every value that arrives from outside (network, CLI, files) passes through one of the
//! constructors here before it reaches the ledger, so the ledger can rely on its invariants.
//! Decoding (a peer's message, a log entry, a stored value) goes through the same
//! constructors: the names are `#[serde(try_from = "String")]`.

use serde::{Deserialize, Serialize};

/// Longest tenant id, in bytes. Tenant ids are slugs so they are safe in paths, metric labels
/// and URLs.
pub const TENANT_ID_LEN_MAX: usize = 63;
/// Longest collection name, in bytes.
pub const COLLECTION_LEN_MAX: usize = 63;
/// Longest record key, in bytes.
pub const KEY_LEN_MAX: usize = 1024;
/// Largest record value, in bytes. Bulk content belongs in artifacts (chunked, outside the log).
pub const VALUE_LEN_MAX: usize = 1024 * 1024;
/// The shared namespace for the vendor's own software.
pub const VENDOR_NAMESPACE: &str = "vendor";

/// Why an input was refused. Each message names the field, the value's problem and the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} is {len} bytes, over the limit of {max} bytes")]
    TooLarge {
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{field} {value:?} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl InputError {
    /// Oversized inputs map to RESOURCE_EXHAUSTED, the rest to INVALID_ARGUMENT.
    pub fn is_too_large(&self) -> bool {
        matches!(self, InputError::TooLarge { .. })
    }
}

/// Validates a slug: lowercase ASCII letters, digits and '-', starting and ending with a letter
/// or digit. The caller's `extra` characters are also allowed inside.
fn validate_slug(
    field: &'static str,
    value: &str,
    max: usize,
    extra: &[u8],
) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty { field });
    }
    if value.len() > max {
        return Err(InputError::TooLarge {
            field,
            len: value.len(),
            max,
        });
    }
    let bytes = value.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes
        .iter()
        .all(|&b| alnum(b) || b == b'-' || extra.contains(&b))
    {
        return Err(InputError::Invalid {
            field,
            value: value.chars().take(80).collect(),
            reason: "only lowercase letters, digits and '-' are allowed",
        });
    }
    if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(InputError::Invalid {
            field,
            value: value.to_string(),
            reason: "must start and end with a lowercase letter or digit",
        });
    }
    Ok(())
}

/// `TryFrom<String>` through the type's `parse`, which `#[serde(try_from = "String")]` calls
/// when a name is decoded.
macro_rules! parsed_from_string {
    ($($name:ident),*) => {$(
        impl TryFrom<String> for $name {
            type Error = InputError;

            fn try_from(value: String) -> Result<Self, InputError> {
                Self::parse(&value)
            }
        }
    )*};
}
parsed_from_string!(TenantId, Collection, RecordKey, SourceId, ArtifactName);

/// One beneficiary customer. All its data lives under this id and nowhere else.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct TenantId(String);

impl TenantId {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        validate_slug("tenant id", value, TENANT_ID_LEN_MAX, &[])?;
        Ok(Self(value.to_string()))
    }

    /// The shared namespace of the vendor's own software: always present, never registered.
    pub fn vendor() -> Self {
        Self(VENDOR_NAMESPACE.to_string())
    }

    pub fn is_vendor(&self) -> bool {
        self.0 == VENDOR_NAMESPACE
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A collection of records inside a tenant.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Collection(String);

impl Collection {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        validate_slug("collection", value, COLLECTION_LEN_MAX, b"_.")?;
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A record key: UTF-8 text without control characters, at most [`KEY_LEN_MAX`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct RecordKey(String);

impl RecordKey {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        if value.is_empty() {
            return Err(InputError::Empty { field: "key" });
        }
        if value.len() > KEY_LEN_MAX {
            return Err(InputError::TooLarge {
                field: "key",
                len: value.len(),
                max: KEY_LEN_MAX,
            });
        }
        if value.chars().any(char::is_control) {
            return Err(InputError::Invalid {
                field: "key",
                value: value.chars().take(80).collect(),
                reason: "control characters are not allowed",
            });
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Checks a record value against the size limit. Empty values are refused: a delete is the way
/// to say "nothing here".
pub fn validate_value(value: &[u8]) -> Result<(), InputError> {
    if value.is_empty() {
        return Err(InputError::Empty { field: "value" });
    }
    if value.len() > VALUE_LEN_MAX {
        return Err(InputError::TooLarge {
            field: "value",
            len: value.len(),
            max: VALUE_LEN_MAX,
        });
    }
    Ok(())
}

/// The full address of one record.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RecordPath {
    pub tenant: TenantId,
    pub collection: Collection,
    pub key: RecordKey,
}

impl RecordPath {
    pub fn parse(tenant: &str, collection: &str, key: &str) -> Result<Self, InputError> {
        Ok(Self {
            tenant: TenantId::parse(tenant)?,
            collection: Collection::parse(collection)?,
            key: RecordKey::parse(key)?,
        })
    }
}

/// A stored record version as the ledger sees it. Every change is one version; a delete is a
/// tombstone version (`value: None`) so history shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordVersion {
    /// The commit index of the write that produced this version.
    pub revision: u64,
    /// The leader's time when the change was committed (ms since the Unix epoch), made
    /// monotonic by the state machine.
    pub time_ms: u64,
    /// The source sequence of the mirrored change that wrote this version (0: a direct write).
    pub seq: u64,
    /// The value, or `None` for a delete.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
}

impl RecordVersion {
    pub fn is_tombstone(&self) -> bool {
        self.value.is_none()
    }
}

/// Longest source stream id, in bytes.
pub const SOURCE_ID_LEN_MAX: usize = 128;
/// Changes one ingest batch carries at most.
pub const INGEST_CHANGES_MAX: usize = 4096;
/// Bytes of keys and values one ingest batch carries at most. One value at the record limit
/// always fits.
pub const INGEST_BYTES_MAX: usize = 2 * VALUE_LEN_MAX;

/// The lifecycle of a tenant as far as mirroring is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TenantState {
    /// The vendor mirrors into it.
    Active,
    /// Writes are refused; everything held stays readable.
    Suspended,
}

impl TenantState {
    pub fn as_str(self) -> &'static str {
        match self {
            TenantState::Active => "active",
            TenantState::Suspended => "suspended",
        }
    }
}

/// A registered tenant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TenantInfo {
    pub id: TenantId,
    pub state: TenantState,
    /// Commit index and leader time of the registration.
    pub created_index: u64,
    pub created_ms: u64,
}

/// Figures kept per namespace (a tenant or `vendor`), updated by every apply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceStats {
    /// Live (not deleted) records and the bytes of their values.
    pub records: u64,
    pub record_bytes: u64,
    /// Versions ever written, tombstones included.
    pub versions: u64,
    /// The newest source time any mirrored change carried (0: none yet).
    pub last_source_ms: u64,
    /// The leader time of the last committed change (0: none yet).
    pub last_commit_ms: u64,
    /// How far the last committed batch was behind its source: commit time - source time.
    pub last_lag_ms: u64,
    /// Live (not deleted) artifacts and the bytes of their latest versions.
    pub artifacts: u64,
    pub artifact_bytes: u64,
}

/// A source stream's position: the highest source sequence the cluster has applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourcePosition {
    pub last_seq: u64,
    pub last_source_ms: u64,
    /// The commit index of the batch that moved the position last.
    pub revision: u64,
}

/// One stream of changes from the vendor side (one agent feed). Validated like a slug, plus
/// '_', '.' and ':' inside.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct SourceId(String);

impl SourceId {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        validate_slug("source id", value, SOURCE_ID_LEN_MAX, b"_.:")?;
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One mirrored change of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub collection: Collection,
    pub key: RecordKey,
    /// The new value, or `None` for a delete.
    #[serde(with = "serde_bytes")]
    pub value: Option<Vec<u8>>,
    /// The position of this change in its source stream; strictly increasing within a stream.
    pub seq: u64,
    /// When the change happened at the source (ms since the Unix epoch).
    pub source_ms: u64,
}

/// Checks an ingest batch's shape: non-empty, within limits, values valid and sequences
/// strictly increasing.
pub fn validate_changes(changes: &[Change]) -> Result<(), InputError> {
    if changes.is_empty() {
        return Err(InputError::Empty { field: "changes" });
    }
    if changes.len() > INGEST_CHANGES_MAX {
        return Err(InputError::TooLarge {
            field: "changes (count)",
            len: changes.len(),
            max: INGEST_CHANGES_MAX,
        });
    }
    let bytes: usize = changes
        .iter()
        .map(|c| c.key.as_str().len() + c.value.as_ref().map_or(0, Vec::len))
        .sum();
    if bytes > INGEST_BYTES_MAX {
        return Err(InputError::TooLarge {
            field: "changes (bytes)",
            len: bytes,
            max: INGEST_BYTES_MAX,
        });
    }
    let mut previous = None;
    for c in changes {
        if let Some(v) = &c.value {
            validate_value(v)?;
        }
        if c.seq == 0 {
            return Err(InputError::Invalid {
                field: "source sequence",
                value: "0".into(),
                reason: "sequences start at 1",
            });
        }
        if previous.is_some_and(|p| c.seq <= p) {
            return Err(InputError::Invalid {
                field: "source sequence",
                value: c.seq.to_string(),
                reason: "sequences must strictly increase within a batch",
            });
        }
        previous = Some(c.seq);
    }
    Ok(())
}

/// A blake3 digest: the address of a chunk, the hash of a whole artifact.
pub type Digest = [u8; 32];

/// Content-defined chunking sizes (fastcdc 2020). A change of N bytes in a file re-sends about
/// N plus one average chunk on each side.
pub const CHUNK_MIN_BYTES: u32 = 128 * 1024;
pub const CHUNK_AVG_BYTES: u32 = 512 * 1024;
pub const CHUNK_MAX_BYTES: u32 = 2 * 1024 * 1024;
/// Chunks one artifact version lists at most: bounds the manifest (a Raft entry) to well under
/// 1 MiB; at the average chunk size that is 8 GiB per artifact.
pub const ARTIFACT_CHUNKS_MAX: usize = 16 * 1024;
/// Longest artifact name, in bytes.
pub const ARTIFACT_NAME_LEN_MAX: usize = 1024;

/// An artifact's name inside its namespace: a relative path of '/'-separated components, each
/// non-empty, not "." or "..", without control characters or backslashes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct ArtifactName(String);

impl ArtifactName {
    pub fn parse(value: &str) -> Result<Self, InputError> {
        let field = "artifact name";
        if value.is_empty() {
            return Err(InputError::Empty { field });
        }
        if value.len() > ARTIFACT_NAME_LEN_MAX {
            return Err(InputError::TooLarge {
                field,
                len: value.len(),
                max: ARTIFACT_NAME_LEN_MAX,
            });
        }
        let invalid = |reason| InputError::Invalid {
            field,
            value: value.chars().take(80).collect(),
            reason,
        };
        if value.chars().any(|c| c.is_control() || c == '\\') {
            return Err(invalid(
                "control characters and backslashes are not allowed",
            ));
        }
        if value.starts_with('/') {
            return Err(invalid("must be relative (no leading '/')"));
        }
        if value
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        {
            return Err(invalid(
                "path components must be non-empty and not '.' or '..'",
            ));
        }
        Ok(Self(value.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One chunk of an artifact: its blake3 address and its length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    pub hash: Digest,
    pub size: u32,
}

/// What an artifact version holds: its chunks in order, its size and whole-file blake3.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub size: u64,
    pub blake3: Digest,
    pub chunks: Vec<ChunkRef>,
    /// When the content changed at the source (ms since the Unix epoch; 0: unknown).
    pub source_ms: u64,
}

impl Manifest {
    /// Checks the manifest's shape: chunk count and sizes within limits, sizes adding up.
    pub fn validate(&self) -> Result<(), InputError> {
        if self.chunks.len() > ARTIFACT_CHUNKS_MAX {
            return Err(InputError::TooLarge {
                field: "manifest (chunks)",
                len: self.chunks.len(),
                max: ARTIFACT_CHUNKS_MAX,
            });
        }
        let mut total = 0u64;
        for c in &self.chunks {
            if c.size == 0 || c.size > CHUNK_MAX_BYTES {
                return Err(InputError::Invalid {
                    field: "chunk size",
                    value: c.size.to_string(),
                    reason: "chunks are 1 byte to CHUNK_MAX_BYTES (2 MiB)",
                });
            }
            total += u64::from(c.size);
        }
        if total != self.size {
            return Err(InputError::Invalid {
                field: "manifest size",
                value: self.size.to_string(),
                reason: "does not equal the sum of its chunk sizes",
            });
        }
        Ok(())
    }
}

/// One version of an artifact. Versions count from 1 per (namespace, name); a delete is a
/// tombstone version (`manifest: None`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactVersion {
    pub version: u64,
    /// Commit index and leader time of the version.
    pub revision: u64,
    pub time_ms: u64,
    pub manifest: Option<Manifest>,
}

/// One namespace's Merkle root as the state machine maintains it (see `integrity`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceRoot {
    pub root: Digest,
    /// Live records and artifacts (leaves).
    pub leaves: u64,
}

/// Every namespace's root at one log index, recorded by a checkpoint entry: identical on every
/// replica, so nodes can be compared (and can sign) at exactly the same point.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub index: u64,
    /// The leader time stamped on the checkpoint entry.
    pub time_ms: u64,
    /// Namespaces with at least one leaf, in name order.
    pub roots: Vec<(String, NamespaceRoot)>,
    pub cluster_root: Digest,
}

/// Hex text of a digest.
pub fn hex(digest: &Digest) -> String {
    blake3::Hash::from_bytes(*digest).to_hex().to_string()
}

/// Lowercase hex text of any bytes.
pub fn hex_bytes(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Hex text of a digest in wire form (raw bytes), or "" when it is not 32 bytes.
pub fn hex_wire(bytes: &[u8]) -> String {
    Digest::try_from(bytes).map(|d| hex(&d)).unwrap_or_default()
}

/// RFC 3339 text (e.g. `2026-11-22T10:00:00Z`) to ms since the Unix epoch.
pub fn parse_rfc3339_ms(text: &str) -> Result<u64, String> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{text:?} is not RFC 3339 (e.g. 2026-11-22T10:00:00Z): {e}"))?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{text:?} is before 1970"))
}

/// Parses a digest from 32 raw bytes (wire form).
pub fn digest_from_bytes(field: &'static str, bytes: &[u8]) -> Result<Digest, InputError> {
    bytes.try_into().map_err(|_| InputError::Invalid {
        field,
        value: format!("{} bytes", bytes.len()),
        reason: "a blake3 digest is 32 bytes",
    })
}

/// Node ids are never reused; 0 means "none" in wire formats, so real ids start at 1.
pub fn validate_node_id(id: u64) -> Result<u64, InputError> {
    if id == 0 {
        return Err(InputError::Invalid {
            field: "node id",
            value: "0".into(),
            reason: "node ids start at 1",
        });
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a name decoded from bytes (a peer's message, a log entry, a stored value) obeys
    // the same rules as one parsed from a request, in the log's encoding and in JSON alike.
    #[test]
    fn decoded_names_pass_their_constructors() {
        use crate::raft::codec::{decode, encode};
        let good = RecordPath::parse("acme", "orders", "k/1").unwrap();
        assert_eq!(decode::<RecordPath>(&encode(&good)).unwrap(), good);
        let bad = RecordPath {
            tenant: TenantId("a/\0b".into()),
            collection: Collection("orders".into()),
            key: RecordKey("k".into()),
        };
        let err = decode::<RecordPath>(&encode(&bad)).unwrap_err();
        assert!(err.to_string().contains("tenant id"), "{err}");
        let json = serde_json::to_string(&bad).unwrap();
        assert!(serde_json::from_str::<RecordPath>(&json).is_err());
        for (bad, what) in [
            (encode(&Collection("Orders".into())), "collection"),
            (encode(&RecordKey("k\n".into())), "key"),
            (encode(&RecordKey(String::new())), "key"),
        ] {
            let err = match what {
                "collection" => decode::<Collection>(&bad).map(|_| ()).unwrap_err(),
                _ => decode::<RecordKey>(&bad).map(|_| ()).unwrap_err(),
            };
            assert!(err.to_string().contains(what), "{err}");
        }
        assert!(decode::<SourceId>(&encode(&SourceId("a b".into()))).is_err());
        assert!(decode::<ArtifactName>(&encode(&ArtifactName("a\\b".into()))).is_err());
        assert_eq!(
            decode::<TenantId>(&encode(&TenantId::vendor())).unwrap(),
            TenantId::vendor()
        );
    }

    // Goal: the tenant id rules that keep tenants apart in keys, paths and labels hold.
    #[test]
    fn tenant_ids_are_bounded_slugs() {
        assert!(TenantId::parse("acme-corp").is_ok());
        assert!(TenantId::parse("a").is_ok());
        assert!(TenantId::parse(&"a".repeat(TENANT_ID_LEN_MAX)).is_ok());
        assert!(matches!(
            TenantId::parse(&"a".repeat(TENANT_ID_LEN_MAX + 1)),
            Err(InputError::TooLarge { .. })
        ));
        for bad in [
            "",
            "Acme",
            "acme/corp",
            "-acme",
            "acme-",
            "ac me",
            "a\0b",
            "..",
            "é",
        ] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    // Goal: artifact names stay relative paths that cannot climb out of their namespace.
    #[test]
    fn artifact_names_are_confined_relative_paths() {
        assert!(ArtifactName::parse("releases/v1.2/app.tar.gz").is_ok());
        assert!(ArtifactName::parse("a b/ü.txt").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a//b",
            "a/./b",
            "a/",
            "a\\b",
            "a\nb",
        ] {
            assert!(ArtifactName::parse(bad).is_err(), "{bad:?} accepted");
        }
        let m = Manifest {
            size: 3,
            blake3: [0; 32],
            chunks: vec![
                ChunkRef {
                    hash: [1; 32],
                    size: 2,
                },
                ChunkRef {
                    hash: [2; 32],
                    size: 1,
                },
            ],
            source_ms: 0,
        };
        assert!(m.validate().is_ok());
        assert!(Manifest {
            size: 4,
            ..m.clone()
        }
        .validate()
        .is_err());
    }

    // Goal: keys and values have named limits and clear errors.
    #[test]
    fn keys_and_values_are_limited() {
        assert!(RecordKey::parse("invoices/2026/0001.json").is_ok());
        assert!(RecordKey::parse("").is_err());
        assert!(RecordKey::parse("a\nb").is_err());
        let err = RecordKey::parse(&"k".repeat(KEY_LEN_MAX + 1)).unwrap_err();
        assert!(err.is_too_large());
        assert!(err.to_string().contains("1024"), "{err}");
        assert!(validate_value(b"x").is_ok());
        assert!(validate_value(b"").is_err());
        assert!(validate_value(&vec![0; VALUE_LEN_MAX + 1])
            .unwrap_err()
            .is_too_large());
        assert!(Collection::parse("orders_v2.archive").is_ok());
        assert!(Collection::parse("Orders").is_err());
    }
}
