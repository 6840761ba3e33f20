//! Byte layout of the state-machine keyspace (one column family, so a checkpoint is one
//! consistent point in time).
//!
//! - `0x00 "applied"`            → last applied log id
//! - `0x00 "membership"`         → last applied membership
//! - `'n' id(u64 BE)`            → a node id that was ever a member (ids are never reused)
//! - `'r' tenant 0x00 collection 0x00 key` → latest record version
//!
//! Tenant and collection are validated slugs without NUL, so the separators are unambiguous and
//! every key of one tenant shares the prefix `'r' tenant 0x00`.

use crate::domain::RecordPath;

pub const APPLIED: &[u8] = b"\x00applied";
pub const MEMBERSHIP: &[u8] = b"\x00membership";
const NODE_PREFIX: u8 = b'n';
const RECORD_PREFIX: u8 = b'r';

pub fn node(id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(NODE_PREFIX);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

pub fn record(path: &RecordPath) -> Vec<u8> {
    let t = path.tenant.as_str().as_bytes();
    let c = path.collection.as_str().as_bytes();
    let k = path.key.as_str().as_bytes();
    let mut out = Vec::with_capacity(3 + t.len() + c.len() + k.len());
    out.push(RECORD_PREFIX);
    out.extend_from_slice(t);
    out.push(0);
    out.extend_from_slice(c);
    out.push(0);
    out.extend_from_slice(k);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: one tenant's keys can never fall under another tenant's prefix.
    #[test]
    fn tenant_prefixes_do_not_overlap() {
        let a = record(&RecordPath::parse("acme", "c", "k").unwrap());
        let b = record(&RecordPath::parse("acme-corp", "c", "k").unwrap());
        let prefix_a = b"racme\x00";
        assert!(a.starts_with(prefix_a));
        assert!(!b.starts_with(prefix_a));
    }
}
