//! Byte layout of the state-machine keyspace (one column family, so a checkpoint is one
//! consistent point in time).
//!
//! - `0x00 "applied"`            → last applied log id
//! - `0x00 "membership"`         → last applied membership
//! - `0x00 "clock"`              → the leader time of the last timed entry (u64 ms)
//! - `'n' id(u64 BE)`            → a node id that was ever a member (ids are never reused)
//! - `'r' tenant 0x00 leaf id(32)` → the record's head: its collection and key, its latest
//!   version without the value (revision, position, time, seq; live length and Merkle leaf
//!   hash, or tombstone). Keyed by the record's leaf id, so a bucket's records are one key
//!   range and the head is the record's Merkle leaf: a write inserts two keys (head and
//!   history), not three. The value is in its history
//! - `'h' tenant 0x00 collection 0x00 key 0x00 index(u64 BE) position(u32 BE)` → one version of
//!   the record's history, oldest first; `position` orders changes within one log entry
//! - `'x' index(u64 BE) position(u32 BE) history key` → the version at this index and
//!   position replaced the version with that history key: the replacing version's time and
//!   the replaced value's length. In replacement order, so history expiry reads the oldest
//!   replacements first and stops at the cutoff: it never scans history or reads a blob (an
//!   iterator reads the blob of every blob-held value it steps on, so the history key is in
//!   the key, and the value stays far under `sm::BLOB_MIN_BYTES` whatever a record key's
//!   length)
//! - `0x00 "expired_to"`         → the `'x'` key of the last replacement expiry removed (the
//!   next expiry seeks past it, not through the deleted keys before it)
//! - `0x00 "expired_blob_bytes"` → node-local, not replicated: this node's estimate of
//!   blob-held bytes expired that RocksDB may not count as garbage yet (u64)
//! - `'t' tenant`                → tenant registration
//! - `'s' namespace`             → namespace figures (records, bytes, freshness)
//! - `'q' tenant 0x00 source`    → a source stream's applied position
//! - `'A' namespace 0x00 name`   → an artifact's latest version
//! - `'a' namespace 0x00 name 0x00 version(u64 BE)` → one artifact version (its manifest)
//! - `'c' blake3(32)`            → a chunk referenced by some artifact version (its size)
//! - `'l' namespace 0x00 leaf id(32)` → an artifact's Merkle leaf hash (records' leaves are in
//!   their heads; the bucket is the id's first two bytes, so one bucket's leaves are one key
//!   range under each of `'l'` and `'r'`)
//! - `'m' namespace 0x00 level(u8) index(u32 BE)` → a non-empty Merkle tree node
//! - `'d' namespace 0x00 index(u64 BE)` → the buckets one apply call (ending at `index`)
//!   changed since the last checkpoint
//! - `'C' namespace`             → the namespace's leaf count
//! - `'R' namespace`             → the namespace's root and leaf count at the last checkpoint
//! - `'k' index(u64 BE)`         → a checkpoint (all roots at that index)
//! - `0x00 "checkpoints"`        → the indexes of the checkpoints kept, oldest first
//!
//! Tenant, collection and source are validated slugs and keys have no control characters, so
//! the NUL separators are unambiguous and every key of one tenant shares the prefix
//! `'r' tenant 0x00` (resp. `'h' tenant 0x00`).

use crate::domain::{ArtifactName, Digest, RecordPath, SourceId, TenantId};

pub const APPLIED: &[u8] = b"\x00applied";
pub const MEMBERSHIP: &[u8] = b"\x00membership";
pub const CLOCK: &[u8] = b"\x00clock";
pub const EXPIRED_TO: &[u8] = b"\x00expired_to";
/// This node's estimate of blob-held bytes history expiry removed since the last compaction
/// that made RocksDB count them (`SmShared::expired_blob_bytes`). Node-local, not replicated
/// state: each node lowers it after its own compactions.
pub const EXPIRED_BLOB_BYTES: &[u8] = b"\x00expired_blob_bytes";
pub const REPLACED_PREFIX: u8 = b'x';
const NODE_PREFIX: u8 = b'n';
pub const RECORD_PREFIX: u8 = b'r';
pub const HISTORY_PREFIX: u8 = b'h';
pub const TENANT_PREFIX: u8 = b't';
pub const STATS_PREFIX: u8 = b's';
const SOURCE_PREFIX: u8 = b'q';
pub const ARTIFACT_LATEST_PREFIX: u8 = b'A';
pub const ARTIFACT_VERSION_PREFIX: u8 = b'a';
pub const CHUNK_PREFIX: u8 = b'c';
pub const LEAF_PREFIX: u8 = b'l';
pub const NODE_TREE_PREFIX: u8 = b'm';
pub const ROOT_PREFIX: u8 = b'R';
pub const DIRTY_PREFIX: u8 = b'd';
const LEAF_COUNT_PREFIX: u8 = b'C';
const CHECKPOINT_PREFIX: u8 = b'k';
pub const CHECKPOINTS: &[u8] = b"\x00checkpoints";

pub fn node(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(NODE_PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn path_key(prefix: u8, path: &RecordPath, extra: usize) -> Vec<u8> {
    let t = path.tenant.as_str().as_bytes();
    let c = path.collection.as_str().as_bytes();
    let k = path.key.as_str().as_bytes();
    let mut out = Vec::with_capacity(3 + t.len() + c.len() + k.len() + extra);
    out.push(prefix);
    out.extend_from_slice(t);
    out.push(0);
    out.extend_from_slice(c);
    out.push(0);
    out.extend_from_slice(k);
    out
}

/// The head key of the record with leaf id `id` in `tenant`
/// (`integrity::record_leaf_id` of its collection and key).
pub fn record(tenant: &TenantId, id: &Digest) -> Vec<u8> {
    let mut out = ns_prefix(RECORD_PREFIX, tenant.as_str());
    out.extend_from_slice(id);
    out
}

/// The namespace and the `len`-byte rest of a `prefix namespace 0x00 rest` key.
fn split_namespace(prefix: u8, key: &[u8], len: usize) -> Option<(&str, &[u8])> {
    let body = key.strip_prefix(&[prefix])?;
    let split = body.len().checked_sub(len + 1)?;
    if body[split] != 0 {
        return None;
    }
    Some((
        std::str::from_utf8(&body[..split]).ok()?,
        &body[split + 1..],
    ))
}

/// The prefix under which all of one record's history lies.
pub fn history_prefix(path: &RecordPath) -> Vec<u8> {
    let mut out = path_key(HISTORY_PREFIX, path, 13);
    out.push(0);
    out
}

pub fn history(path: &RecordPath, index: u64, position: u32) -> Vec<u8> {
    let mut out = history_prefix(path);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&position.to_be_bytes());
    out
}

/// The key of the replacement by the version at `index`, `position` of the version whose
/// history key is `history_key` (see the module doc).
pub fn replaced(index: u64, position: u32, history_key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(13 + history_key.len());
    out.push(REPLACED_PREFIX);
    out.extend_from_slice(&index.to_be_bytes());
    out.extend_from_slice(&position.to_be_bytes());
    out.extend_from_slice(history_key);
    out
}

/// The replaced version's history key that a replacement key names.
pub fn replaced_history(key: &[u8]) -> Option<&[u8]> {
    let body = key.strip_prefix(&[REPLACED_PREFIX])?;
    body.get(12..).filter(|history| !history.is_empty())
}

/// The position within its log entry a history key holds, if the key is long enough.
pub fn history_position(key: &[u8]) -> Option<u32> {
    let n = key.len().checked_sub(4)?;
    Some(u32::from_be_bytes(key[n..].try_into().ok()?))
}

pub fn tenant(id: &TenantId) -> Vec<u8> {
    let mut out = vec![TENANT_PREFIX];
    out.extend_from_slice(id.as_str().as_bytes());
    out
}

pub fn stats(namespace: &TenantId) -> Vec<u8> {
    let mut out = vec![STATS_PREFIX];
    out.extend_from_slice(namespace.as_str().as_bytes());
    out
}

pub fn source(tenant: &TenantId, source: &SourceId) -> Vec<u8> {
    let mut out = vec![SOURCE_PREFIX];
    out.extend_from_slice(tenant.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(source.as_str().as_bytes());
    out
}

/// The prefix of every key of `kind` (a key prefix byte such as `b'r'`) in one namespace, for
/// the kinds laid out as `kind namespace 0x00 …`: records, leaves, artifacts and their versions.
pub fn in_namespace(kind: u8, namespace: &TenantId) -> Vec<u8> {
    ns_prefix(kind, namespace.as_str())
}

/// The prefix of every artifact's latest-version key in a namespace.
pub fn artifacts_prefix(namespace: &TenantId) -> Vec<u8> {
    in_namespace(ARTIFACT_LATEST_PREFIX, namespace)
}

pub fn artifact_latest(namespace: &TenantId, name: &ArtifactName) -> Vec<u8> {
    let mut out = artifacts_prefix(namespace);
    out.extend_from_slice(name.as_str().as_bytes());
    out
}

pub fn artifact_version(namespace: &TenantId, name: &ArtifactName, version: u64) -> Vec<u8> {
    let mut out = in_namespace(ARTIFACT_VERSION_PREFIX, namespace);
    out.extend_from_slice(name.as_str().as_bytes());
    out.push(0);
    out.extend_from_slice(&version.to_be_bytes());
    out
}

pub fn chunk(hash: &Digest) -> Vec<u8> {
    let mut out = Vec::with_capacity(33);
    out.push(CHUNK_PREFIX);
    out.extend_from_slice(hash);
    out
}

fn ns_prefix(prefix: u8, namespace: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(namespace.len() + 40);
    out.push(prefix);
    out.extend_from_slice(namespace.as_bytes());
    out.push(0);
    out
}

/// The keys of `kind` ([`LEAF_PREFIX`]: artifacts' leaves, [`RECORD_PREFIX`]: record heads)
/// in one bucket: ids starting with the bucket's two bytes.
pub fn bucket_prefix(kind: u8, namespace: &str, bucket: u16) -> Vec<u8> {
    let mut out = ns_prefix(kind, namespace);
    out.extend_from_slice(&bucket.to_be_bytes());
    out
}

pub fn leaf(namespace: &str, id: &Digest) -> Vec<u8> {
    let mut out = ns_prefix(LEAF_PREFIX, namespace);
    out.extend_from_slice(id);
    out
}

pub fn tree_node(namespace: &str, level: u8, index: u32) -> Vec<u8> {
    let mut out = ns_prefix(NODE_TREE_PREFIX, namespace);
    out.push(level);
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// The namespace, level and index a tree-node key names.
pub fn parse_tree_node(key: &[u8]) -> Option<(String, u8, u32)> {
    let (namespace, rest) = split_namespace(NODE_TREE_PREFIX, key, 5)?;
    let index = u32::from_be_bytes(rest[1..].try_into().ok()?);
    Some((namespace.to_string(), rest[0], index))
}

pub fn dirty_buckets(namespace: &str, index: u64) -> Vec<u8> {
    let mut out = ns_prefix(DIRTY_PREFIX, namespace);
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// The namespace a dirty-buckets key belongs to.
pub fn parse_dirty_buckets(key: &[u8]) -> Option<String> {
    split_namespace(DIRTY_PREFIX, key, 8).map(|(namespace, _)| namespace.to_string())
}

pub fn leaf_count(namespace: &str) -> Vec<u8> {
    let mut out = vec![LEAF_COUNT_PREFIX];
    out.extend_from_slice(namespace.as_bytes());
    out
}

pub fn root(namespace: &str) -> Vec<u8> {
    let mut out = vec![ROOT_PREFIX];
    out.extend_from_slice(namespace.as_bytes());
    out
}

/// The namespace a root key belongs to.
pub fn parse_root(key: &[u8]) -> Option<String> {
    String::from_utf8(key.strip_prefix(&[ROOT_PREFIX])?.to_vec()).ok()
}

pub fn checkpoint(index: u64) -> Vec<u8> {
    let mut out = vec![CHECKPOINT_PREFIX];
    out.extend_from_slice(&index.to_be_bytes());
    out
}

/// The smallest key greater than every key starting with `prefix` (for iterator bounds).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0xff; prefix.len() + 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: one tenant's keys can never fall under another tenant's prefix.
    #[test]
    fn tenant_prefixes_do_not_overlap() {
        let id = [7u8; 32];
        let a = record(&TenantId::parse("acme").unwrap(), &id);
        let b = record(&TenantId::parse("acme-corp").unwrap(), &id);
        let prefix_a = b"racme\x00";
        assert!(a.starts_with(prefix_a));
        assert!(!b.starts_with(prefix_a));
        assert!(a.starts_with(&bucket_prefix(RECORD_PREFIX, "acme", 0x0707)));
        assert!(!a.starts_with(&bucket_prefix(RECORD_PREFIX, "acme", 0x0708)));
        let node = tree_node("acme", 3, 0x0102_0304);
        assert!(node.starts_with(b"macme\x00"));
        assert_eq!(
            parse_tree_node(&node),
            Some(("acme".to_string(), 3, 0x0102_0304))
        );
        assert_eq!(parse_tree_node(&node[..node.len() - 1]), None);
        assert_eq!(
            parse_dirty_buckets(&dirty_buckets("acme", 9)),
            Some("acme".to_string())
        );
        assert_eq!(parse_root(&root("acme")), Some("acme".to_string()));
        assert_eq!(parse_root(&leaf_count("acme")), None);
    }

    // Goal: a record's history keys sort by revision and never fall under another record's
    // history prefix.
    #[test]
    fn history_keys_sort_by_revision_and_stay_under_their_record() {
        let p = RecordPath::parse("acme", "c", "k").unwrap();
        let longer = RecordPath::parse("acme", "c", "k2").unwrap();
        assert!(history(&p, 2, 0) < history(&p, 2, 1));
        assert!(history(&p, 2, 9) < history(&p, 10, 0));
        assert!(history(&p, 300, 0).starts_with(&history_prefix(&p)));
        assert!(!history(&longer, 1, 0).starts_with(&history_prefix(&p)));
        assert!(prefix_end(&history_prefix(&p)) > history(&p, u64::MAX, u32::MAX));
        assert_eq!(history_position(&history(&p, 77, 3)), Some(3));
    }

    // Goal: replacement keys sort in log order whatever the history key they carry, and give
    // that history key back.
    #[test]
    fn replacement_keys_sort_in_log_order_and_name_the_replaced_version() {
        let short = history(&RecordPath::parse("acme", "c", "k").unwrap(), 77, 3);
        let long = history(
            &RecordPath::parse("zeta", "c", &"z".repeat(900)).unwrap(),
            1,
            0,
        );
        assert!(replaced(2, 9, &long) < replaced(10, 0, &short));
        assert!(replaced(10, 0, &long) < replaced(10, 1, &short));
        assert_eq!(replaced_history(&replaced(10, 1, &short)), Some(&short[..]));
        assert_eq!(replaced_history(&replaced(10, 1, &[])), None);
        assert_eq!(replaced_history(&short), None);
    }
}
