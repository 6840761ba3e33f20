//! Merkle roots over a namespace's content: pure functions, no IO. The definitions here are the
//! ones README documents, so that anyone can recompute a root from the data itself.
//!
//! - A namespace (a tenant or `vendor`) has one **leaf** per live record and per live artifact:
//!   - record: id = H(`escrow.leaf.id.v1` ‖ 0x01 ‖ lp(collection) ‖ lp(key)),
//!     hash = H(`escrow.leaf.v1` ‖ 0x01 ‖ lp(collection) ‖ lp(key) ‖ u64(seq) ‖ H(value)),
//!     where seq is the source sequence of the change that wrote the value (0 for a direct put);
//!   - artifact: id = H(`escrow.leaf.id.v1` ‖ 0x02 ‖ lp(name)),
//!     hash = H(`escrow.leaf.v1` ‖ 0x02 ‖ lp(name) ‖ u64(size) ‖ blake3 of the whole file).
//!
//!   H is blake3, lp(x) is x's length as u32 big-endian followed by x, u64 is big-endian. Deleted
//!   records and artifacts have no leaf.
//! - Leaves fall into 65,536 **buckets** by the first two bytes of their id. A bucket's hash is
//!   32 zero bytes when empty, else H(`escrow.bucket.v1` ‖ id₁ ‖ hash₁ ‖ id₂ ‖ hash₂ ‖ …) over
//!   its leaves in id order.
//! - The buckets are the leaves of a complete 16-ary tree of depth 4; a **node** is
//!   H(`escrow.node.v1` ‖ child₀ ‖ … ‖ child₁₅). The namespace **root** is
//!   H(`escrow.root.v1` ‖ lp(namespace) ‖ u64(leaf count) ‖ tree top).
//! - The **cluster root** is H(`escrow.cluster.v1` ‖ lp(ns₁) ‖ root₁ ‖ lp(ns₂) ‖ root₂ ‖ …) over
//!   the namespaces that have at least one leaf, in name order.
//!
//! The state machine maintains these incrementally (a change rehashes one bucket and its 4
//! ancestors); [`namespace_root`] computes the same root from scratch. (A 16-ary tree rather
//! than a binary one: a batch of writes touches a quarter as many nodes, and a node's children
//! are one contiguous key range in the store.)

use std::collections::BTreeMap;

use crate::domain::Digest;

/// Children per tree node.
pub const TREE_ARITY: u32 = 16;
/// Levels of the bucket tree: 16^4 = 65,536 buckets.
pub const TREE_DEPTH: u8 = 4;
/// Buckets per namespace.
pub const BUCKETS: u32 = 1 << 16;
const _: () = assert!(TREE_ARITY.pow(TREE_DEPTH as u32) == BUCKETS);
/// The hash of an empty bucket.
pub const EMPTY_BUCKET: Digest = [0; 32];

fn lp(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u32).to_be_bytes());
    h.update(bytes);
}

/// The leaf id of the record `collection`/`key` (within its namespace).
pub fn record_leaf_id(collection: &str, key: &str) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"escrow.leaf.id.v1");
    h.update(&[1]);
    lp(&mut h, collection.as_bytes());
    lp(&mut h, key.as_bytes());
    *h.finalize().as_bytes()
}

/// The leaf id of the artifact `name` (within its namespace).
pub fn artifact_leaf_id(name: &str) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"escrow.leaf.id.v1");
    h.update(&[2]);
    lp(&mut h, name.as_bytes());
    *h.finalize().as_bytes()
}

/// What a leaf stands for, with the fields its hash covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeafObject<'a> {
    Record {
        collection: &'a str,
        key: &'a str,
        seq: u64,
        value: &'a [u8],
    },
    Artifact {
        name: &'a str,
        size: u64,
        blake3: &'a Digest,
    },
}

impl LeafObject<'_> {
    /// The leaf's position (its id): depends only on which object it is.
    pub fn id(&self) -> Digest {
        match self {
            LeafObject::Record {
                collection, key, ..
            } => record_leaf_id(collection, key),
            LeafObject::Artifact { name, .. } => artifact_leaf_id(name),
        }
    }

    /// The leaf's hash: changes with any byte of the object's content.
    pub fn hash(&self) -> Digest {
        let mut h = blake3::Hasher::new();
        h.update(b"escrow.leaf.v1");
        match self {
            LeafObject::Record {
                collection,
                key,
                seq,
                value,
            } => {
                h.update(&[1]);
                lp(&mut h, collection.as_bytes());
                lp(&mut h, key.as_bytes());
                h.update(&seq.to_be_bytes());
                h.update(blake3::hash(value).as_bytes());
            }
            LeafObject::Artifact { name, size, blake3 } => {
                h.update(&[2]);
                lp(&mut h, name.as_bytes());
                h.update(&size.to_be_bytes());
                h.update(*blake3);
            }
        }
        *h.finalize().as_bytes()
    }

    /// A name for reports: "record C/K" or "artifact N".
    pub fn describe(&self) -> String {
        match self {
            LeafObject::Record {
                collection, key, ..
            } => format!("record {collection}/{key}"),
            LeafObject::Artifact { name, .. } => format!("artifact {name}"),
        }
    }
}

/// The bucket a leaf id falls into.
pub fn bucket_of(id: &Digest) -> u16 {
    u16::from_be_bytes([id[0], id[1]])
}

/// A bucket's hash from its leaves `(id, hash)` in id order.
pub fn bucket_hash<'a>(leaves: impl IntoIterator<Item = (&'a Digest, &'a Digest)>) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"escrow.bucket.v1");
    let mut any = false;
    for (id, hash) in leaves {
        any = true;
        h.update(id);
        h.update(hash);
    }
    if any {
        *h.finalize().as_bytes()
    } else {
        EMPTY_BUCKET
    }
}

/// A tree node's hash from its [`TREE_ARITY`] children in order.
pub fn node_hash(children: &[Digest; TREE_ARITY as usize]) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"escrow.node.v1");
    for c in children {
        h.update(c);
    }
    *h.finalize().as_bytes()
}

/// The hash of an all-empty subtree at each level (0: a bucket, [`TREE_DEPTH`]: the top).
pub fn empty_subtrees() -> [Digest; TREE_DEPTH as usize + 1] {
    let mut out = [EMPTY_BUCKET; TREE_DEPTH as usize + 1];
    for level in 1..=TREE_DEPTH as usize {
        out[level] = node_hash(&[out[level - 1]; TREE_ARITY as usize]);
    }
    out
}

pub fn root_hash(namespace: &str, leaves: u64, top: &Digest) -> Digest {
    let mut h = blake3::Hasher::new();
    h.update(b"escrow.root.v1");
    lp(&mut h, namespace.as_bytes());
    h.update(&leaves.to_be_bytes());
    h.update(top);
    *h.finalize().as_bytes()
}

/// The cluster root over namespace roots (namespaces without leaves are left out by callers).
pub fn cluster_root<'a>(roots: impl IntoIterator<Item = (&'a str, &'a Digest)>) -> Digest {
    let mut sorted: Vec<(&str, &Digest)> = roots.into_iter().collect();
    sorted.sort();
    let mut h = blake3::Hasher::new();
    h.update(b"escrow.cluster.v1");
    for (ns, root) in sorted {
        lp(&mut h, ns.as_bytes());
        h.update(root);
    }
    *h.finalize().as_bytes()
}

/// A namespace's root computed from scratch over its leaves `(id, hash)` (any order).
pub fn namespace_root(namespace: &str, leaves: &BTreeMap<Digest, Digest>) -> Digest {
    let empty = empty_subtrees();
    // Level 0: the non-empty buckets.
    let mut level: BTreeMap<u32, Digest> = BTreeMap::new();
    let mut start = 0;
    let entries: Vec<(&Digest, &Digest)> = leaves.iter().collect();
    while start < entries.len() {
        let b = bucket_of(entries[start].0);
        let mut end = start;
        while end < entries.len() && bucket_of(entries[end].0) == b {
            end += 1;
        }
        level.insert(
            u32::from(b),
            bucket_hash(entries[start..end].iter().copied()),
        );
        start = end;
    }
    for depth in 1..=TREE_DEPTH as usize {
        let mut up: BTreeMap<u32, Digest> = BTreeMap::new();
        for (&i, _) in level.iter() {
            let parent = i / TREE_ARITY;
            if up.contains_key(&parent) {
                continue;
            }
            let mut children = [empty[depth - 1]; TREE_ARITY as usize];
            for (k, child) in children.iter_mut().enumerate() {
                if let Some(h) = level.get(&(parent * TREE_ARITY + k as u32)) {
                    *child = *h;
                }
            }
            up.insert(parent, node_hash(&children));
        }
        level = up;
    }
    let top = level.get(&0).copied().unwrap_or(empty[TREE_DEPTH as usize]);
    root_hash(namespace, leaves.len() as u64, &top)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(key: &str, value: &[u8]) -> (Digest, Digest) {
        let o = LeafObject::Record {
            collection: "c",
            key,
            seq: 0,
            value,
        };
        (o.id(), o.hash())
    }

    // Goal: the root changes with any record's content, does not depend on insertion order,
    // and ids separate records from artifacts and fields from each other.
    #[test]
    fn roots_are_order_free_and_sensitive_to_every_leaf() {
        let leaves: BTreeMap<Digest, Digest> =
            (0..500).map(|i| rec(&format!("k{i}"), b"v")).collect();
        let a = namespace_root("acme", &leaves);
        let reversed: BTreeMap<Digest, Digest> = (0..500)
            .rev()
            .map(|i| rec(&format!("k{i}"), b"v"))
            .collect();
        assert_eq!(a, namespace_root("acme", &reversed));
        assert_ne!(a, namespace_root("acme-2", &leaves));
        let mut changed = leaves.clone();
        let (id, hash) = rec("k7", b"w");
        changed.insert(id, hash);
        assert_ne!(a, namespace_root("acme", &changed));
        let mut fewer = leaves.clone();
        fewer.remove(&rec("k7", b"v").0);
        assert_ne!(a, namespace_root("acme", &fewer));
        // "c"+"ab" and "ca"+"b" are different records.
        let x = LeafObject::Record {
            collection: "c",
            key: "ab",
            seq: 0,
            value: b"",
        };
        let y = LeafObject::Record {
            collection: "ca",
            key: "b",
            seq: 0,
            value: b"",
        };
        assert_ne!(x.id(), y.id());
        let art = LeafObject::Artifact {
            name: "c/k",
            size: 0,
            blake3: &[0; 32],
        };
        assert_ne!(
            art.id(),
            LeafObject::Record {
                collection: "c",
                key: "k",
                seq: 0,
                value: b""
            }
            .id()
        );
        assert_eq!(
            namespace_root("e", &BTreeMap::new()),
            root_hash("e", 0, &empty_subtrees()[TREE_DEPTH as usize])
        );
    }
}
