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

use std::collections::{BTreeMap, BTreeSet};

use crate::domain::{Checkpoint, Digest, NamespaceRoot};

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

/// The cluster root over namespace roots, as a checkpoint lists them (namespaces without
/// leaves are left out by callers; any order).
pub fn cluster_root(roots: &[(String, NamespaceRoot)]) -> Digest {
    let mut sorted: Vec<(&str, &Digest)> =
        roots.iter().map(|(ns, r)| (ns.as_str(), &r.root)).collect();
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
    LeafTree::new(leaves).root(namespace)
}

/// The tree over a namespace's leaves, built from scratch: what the stored tree should be.
#[derive(Debug, Clone)]
pub struct LeafTree {
    /// Every non-empty bucket and node by (level, index): level 0 are the buckets, level
    /// [`TREE_DEPTH`] the top. (The state machine stores exactly these; empty ones are implied.)
    pub nodes: BTreeMap<(u8, u32), Digest>,
    /// The number of leaves.
    pub leaves: u64,
}

impl LeafTree {
    /// The tree over `leaves` `(id, hash)`.
    pub fn new(leaves: &BTreeMap<Digest, Digest>) -> Self {
        let mut tree = LeafTreeBuilder::default();
        for (id, hash) in leaves {
            tree.push(*id, *hash);
        }
        tree.finish()
    }

    /// The namespace root over this tree.
    pub fn root(&self, namespace: &str) -> Digest {
        let top = self
            .nodes
            .get(&(TREE_DEPTH, 0))
            .copied()
            .unwrap_or(empty_subtrees()[TREE_DEPTH as usize]);
        root_hash(namespace, self.leaves, &top)
    }
}

/// Builds a [`LeafTree`] from leaves given in ascending id order, holding one bucket's leaves
/// at a time: memory grows with the non-empty buckets (at most [`BUCKETS`]), not the leaves.
#[derive(Debug, Default)]
pub struct LeafTreeBuilder {
    nodes: BTreeMap<(u8, u32), Digest>,
    bucket: Option<(u32, Vec<(Digest, Digest)>)>,
    leaves: u64,
}

impl LeafTreeBuilder {
    /// Adds a leaf; its id must be greater than every id added before.
    pub fn push(&mut self, id: Digest, hash: Digest) {
        let b = u32::from(bucket_of(&id));
        match &mut self.bucket {
            Some((open, leaves)) if *open == b => {
                debug_assert!(leaves.last().is_none_or(|(last, _)| *last < id));
                leaves.push((id, hash));
            }
            _ => {
                self.close_bucket();
                self.bucket = Some((b, vec![(id, hash)]));
            }
        }
        self.leaves += 1;
    }

    fn close_bucket(&mut self) {
        if let Some((b, leaves)) = self.bucket.take() {
            debug_assert!(!self.nodes.contains_key(&(0, b)), "bucket {b} reopened");
            let hash = bucket_hash(leaves.iter().map(|(id, hash)| (id, hash)));
            self.nodes.insert((0, b), hash);
        }
    }

    /// The tree over the leaves added.
    pub fn finish(mut self) -> LeafTree {
        self.close_bucket();
        let mut nodes = self.nodes;
        let empty = empty_subtrees();
        for level in 1..=TREE_DEPTH {
            let parents: BTreeSet<u32> = nodes
                .range((level - 1, 0)..=(level - 1, u32::MAX))
                .map(|(&(_, i), _)| i / TREE_ARITY)
                .collect();
            for p in parents {
                let hash = node_hash(&children_of(&nodes, level, p, &empty));
                nodes.insert((level, p), hash);
            }
        }
        LeafTree {
            nodes,
            leaves: self.leaves,
        }
    }
}

/// The children of node `(level, index)` among `nodes`, empty subtrees where absent.
fn children_of(
    nodes: &BTreeMap<(u8, u32), Digest>,
    level: u8,
    index: u32,
    empty: &[Digest; TREE_DEPTH as usize + 1],
) -> [Digest; TREE_ARITY as usize] {
    let below = level - 1;
    let mut children = [empty[below as usize]; TREE_ARITY as usize];
    let first = index * TREE_ARITY;
    for (&(_, i), hash) in nodes.range((below, first)..(below, first + TREE_ARITY)) {
        children[(i - first) as usize] = *hash;
    }
    children
}

/// A namespace's Merkle tree as the state machine stores it between checkpoints.
#[derive(Debug, Clone, Default)]
pub struct StoredTree {
    /// The non-empty buckets and nodes by (level, index), as of the last checkpoint.
    pub nodes: BTreeMap<(u8, u32), Digest>,
    /// Buckets whose leaves changed since the last checkpoint: their stored hashes are older
    /// than their leaves, so only they may differ from them.
    pub dirty: BTreeSet<u16>,
    /// The root and leaf count recorded at the last checkpoint (none before the first).
    pub root: Option<NamespaceRoot>,
}

/// One place where stored integrity data (a leaf, the tree, a root, a checkpoint) disagrees
/// with what it is derived from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeFault {
    pub object: String,
    /// What the level below (the leaves, the children, the top node) says it should be.
    pub expected: String,
    pub stored: String,
}

impl TreeFault {
    pub fn new(
        object: impl Into<String>,
        expected: impl Into<String>,
        stored: impl Into<String>,
    ) -> Self {
        Self {
            object: object.into(),
            expected: expected.into(),
            stored: stored.into(),
        }
    }
}

/// Checks a namespace's stored tree against the tree over its current leaves: every bucket not
/// changed since the last checkpoint against its leaves, every node against its stored
/// children, and the recorded root against the top node (and, when nothing changed since, its
/// leaf count against the leaves). A root recomputed from the leaves alone cannot see a fault
/// confined to the tree (a wrong bucket or node hash), and every replica would share one a bug
/// in the tree's maintenance made; this check does see them.
pub fn audit_tree(namespace: &str, leaves: &LeafTree, tree: &StoredTree) -> Vec<TreeFault> {
    let empty = empty_subtrees();
    let mut faults = Vec::new();
    // A node outside the tree (corrupt key) is a fault, and left out of the arithmetic below.
    let mut nodes = BTreeMap::new();
    for (&(level, index), hash) in &tree.nodes {
        let width = (level <= TREE_DEPTH).then(|| TREE_ARITY.pow(u32::from(TREE_DEPTH - level)));
        match width {
            Some(width) if index < width => {
                nodes.insert((level, index), *hash);
            }
            _ => faults.push(TreeFault {
                object: format!("Merkle node {index} at level {level} (outside the tree)"),
                expected: "absent".into(),
                stored: crate::domain::hex(hash),
            }),
        }
    }
    let stored = |level: u8, index: u32| {
        nodes
            .get(&(level, index))
            .copied()
            .unwrap_or(empty[level as usize])
    };
    let buckets: BTreeSet<u32> = leaves
        .nodes
        .range((0, 0)..=(0, u32::MAX))
        .chain(nodes.range((0, 0)..=(0, u32::MAX)))
        .map(|(&(_, i), _)| i)
        .collect();
    for b in buckets {
        let dirty = u16::try_from(b).is_ok_and(|b| tree.dirty.contains(&b));
        let expected = leaves.nodes.get(&(0, b)).copied().unwrap_or(EMPTY_BUCKET);
        if !dirty && stored(0, b) != expected {
            faults.push(TreeFault {
                object: format!("Merkle bucket {b:#06x} (against its leaves)"),
                expected: crate::domain::hex(&expected),
                stored: crate::domain::hex(&stored(0, b)),
            });
        }
    }
    for level in 1..=TREE_DEPTH {
        let parents: BTreeSet<u32> = nodes
            .range((level - 1, 0)..=(level - 1, u32::MAX))
            .map(|(&(_, i), _)| i / TREE_ARITY)
            .chain(
                nodes
                    .range((level, 0)..=(level, u32::MAX))
                    .map(|(&(_, i), _)| i),
            )
            .collect();
        for p in parents {
            let expected = node_hash(&children_of(&nodes, level, p, &empty));
            if stored(level, p) != expected {
                faults.push(TreeFault {
                    object: format!("Merkle node {p} at level {level} (against its children)"),
                    expected: crate::domain::hex(&expected),
                    stored: crate::domain::hex(&stored(level, p)),
                });
            }
        }
    }
    let top = stored(TREE_DEPTH, 0);
    match &tree.root {
        Some(root) => {
            let expected = root_hash(namespace, root.leaves, &top);
            if root.root != expected {
                faults.push(TreeFault {
                    object: "recorded root (against the tree's top)".into(),
                    expected: crate::domain::hex(&expected),
                    stored: crate::domain::hex(&root.root),
                });
            }
            if tree.dirty.is_empty() && root.leaves != leaves.leaves {
                faults.push(TreeFault {
                    object: "recorded leaf count (against the leaves)".into(),
                    expected: leaves.leaves.to_string(),
                    stored: root.leaves.to_string(),
                });
            }
        }
        None if !nodes.is_empty() => faults.push(TreeFault {
            object: "recorded root (against the tree's top)".into(),
            expected: crate::domain::hex(&root_hash(namespace, leaves.leaves, &top)),
            stored: "absent".into(),
        }),
        None => {}
    }
    faults
}

/// Checks a stored checkpoint against itself: it is stored under its own index, lists each
/// namespace once, in name order and only with leaves (as recorded), and its cluster root is
/// the one over its namespace roots, which is what attestations sign. Whether those namespace
/// roots match the state is for [`audit_tree`] and the caller (the newest checkpoint only: the
/// state has moved on since the older ones).
pub fn audit_checkpoint(at: u64, checkpoint: &Checkpoint) -> Vec<TreeFault> {
    let mut faults = Vec::new();
    if checkpoint.index != at {
        faults.push(TreeFault {
            object: format!("checkpoint {at} index (against its key)"),
            expected: at.to_string(),
            stored: checkpoint.index.to_string(),
        });
    }
    for pair in checkpoint.roots.windows(2) {
        if pair[0].0 >= pair[1].0 {
            faults.push(TreeFault {
                object: format!("checkpoint {at} namespace order"),
                expected: format!("{:?} before {:?}", pair[1].0, pair[0].0),
                stored: format!("{:?} before {:?}", pair[0].0, pair[1].0),
            });
        }
    }
    for (ns, root) in &checkpoint.roots {
        if root.leaves == 0 {
            faults.push(TreeFault {
                object: format!("checkpoint {at} root of {ns:?} (a namespace without leaves)"),
                expected: "absent".into(),
                stored: crate::domain::hex(&root.root),
            });
        }
    }
    let expected = cluster_root(&checkpoint.roots);
    if checkpoint.cluster_root != expected {
        faults.push(TreeFault {
            object: format!("cluster root in checkpoint {at} (against its namespace roots)"),
            expected: crate::domain::hex(&expected),
            stored: crate::domain::hex(&checkpoint.cluster_root),
        });
    }
    faults
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

    // Goal: the tree audit passes a tree built from its leaves and names exactly what is wrong
    // in one that is not: a bucket out of step with its leaves (unless the bucket changed
    // since the checkpoint), a node out of step with its children, a root out of step with
    // the top, a leaf count that does not match.
    #[test]
    fn tree_audit_finds_faults_confined_to_the_tree() {
        let leaves: BTreeMap<Digest, Digest> =
            (0..300).map(|i| rec(&format!("k{i}"), b"v")).collect();
        let tree = LeafTree::new(&leaves);
        let good = StoredTree {
            nodes: tree.nodes.clone(),
            dirty: BTreeSet::new(),
            root: Some(NamespaceRoot {
                root: namespace_root("acme", &leaves),
                leaves: leaves.len() as u64,
            }),
        };
        assert_eq!(audit_tree("acme", &tree, &good), vec![]);
        assert_eq!(
            audit_tree(
                "acme",
                &LeafTree::new(&BTreeMap::new()),
                &StoredTree::default()
            ),
            vec![]
        );

        // A leaf changed since the checkpoint: its bucket is dirty, so nothing is wrong yet.
        let (id, _) = rec("k5", b"v");
        let mut changed = leaves.clone();
        changed.insert(id, [9; 32]);
        let mut dirty = good.clone();
        dirty.dirty.insert(bucket_of(&id));
        assert_eq!(audit_tree("acme", &LeafTree::new(&changed), &dirty), vec![]);
        // The same change without the dirty mark is a stale bucket.
        let faults = audit_tree("acme", &LeafTree::new(&changed), &good);
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert!(faults[0].object.starts_with("Merkle bucket"), "{faults:?}");

        // A node whose stored hash is wrong: named, and so is its parent, whose stored hash
        // no longer matches its children.
        let mut bad_node = good.clone();
        let (&(level, index), _) = bad_node.nodes.range((2, 0)..=(2, u32::MAX)).next().unwrap();
        bad_node.nodes.insert((level, index), [1; 32]);
        let faults = audit_tree("acme", &tree, &bad_node);
        let objects: Vec<&str> = faults.iter().map(|f| f.object.as_str()).collect();
        assert_eq!(faults.len(), 2, "{faults:?}");
        assert!(objects[0].contains(&format!("node {index} at level 2")));
        assert!(objects[1].contains(&format!("node {} at level 3", index / TREE_ARITY)));

        // A missing bucket (a node deleted as if empty) is found against its leaves.
        let mut missing = good.clone();
        let (&first, _) = missing.nodes.iter().next().unwrap();
        missing.nodes.remove(&first);
        assert!(audit_tree("acme", &tree, &missing)
            .iter()
            .any(|f| f.object.starts_with("Merkle bucket")
                && f.stored == crate::domain::hex(&EMPTY_BUCKET)));

        // Root and leaf count.
        let mut bad_root = good.clone();
        bad_root.root.as_mut().unwrap().root = [2; 32];
        assert_eq!(audit_tree("acme", &tree, &bad_root).len(), 1);
        assert_eq!(
            audit_tree("acme-2", &tree, &good).len(),
            1,
            "the root names its namespace"
        );
        let mut bad_count = good.clone();
        bad_count.root.as_mut().unwrap().leaves += 1;
        let faults = audit_tree("acme", &tree, &bad_count);
        assert!(
            faults
                .iter()
                .any(|f| f.object.starts_with("recorded leaf count")),
            "{faults:?}"
        );
        // Nodes a corrupt key put outside the tree are named, not a panic.
        let mut outside = good.clone();
        outside.nodes.insert((0, u32::MAX), [3; 32]);
        outside.nodes.insert((1, 1 << 28), [3; 32]);
        outside.nodes.insert((TREE_DEPTH + 1, 0), [3; 32]);
        let faults = audit_tree("acme", &tree, &outside);
        assert_eq!(faults.len(), 3, "{faults:?}");
        assert!(faults
            .iter()
            .all(|f| f.object.ends_with("(outside the tree)")));
        let mut no_root = good.clone();
        no_root.root = None;
        assert_eq!(audit_tree("acme", &tree, &no_root)[0].stored, "absent");
    }

    // Goal: a checkpoint that does not add up (its cluster root, its order, its key) is named;
    // one recorded as the node records them passes.
    #[test]
    fn checkpoint_audit_names_what_does_not_add_up() {
        let root = |b: u8, leaves: u64| NamespaceRoot {
            root: [b; 32],
            leaves,
        };
        let roots = vec![
            ("acme".to_string(), root(1, 3)),
            ("vendor".to_string(), root(2, 1)),
        ];
        let good = Checkpoint {
            index: 42,
            time_ms: 7,
            cluster_root: cluster_root(&roots),
            roots,
        };
        assert_eq!(audit_checkpoint(42, &good), vec![]);
        assert_eq!(
            audit_checkpoint(
                0,
                &Checkpoint {
                    cluster_root: cluster_root(&[]),
                    ..Checkpoint::default()
                }
            ),
            vec![]
        );

        let objects = |c: &Checkpoint, at: u64| -> Vec<String> {
            audit_checkpoint(at, c)
                .into_iter()
                .map(|f| f.object)
                .collect()
        };
        let mut flipped = good.clone();
        flipped.cluster_root[0] ^= 1;
        assert_eq!(
            objects(&flipped, 42),
            vec!["cluster root in checkpoint 42 (against its namespace roots)"]
        );
        // A namespace root changed after the fact no longer adds up to the signed cluster root.
        let mut changed = good.clone();
        changed.roots[1].1.root[0] ^= 1;
        assert_eq!(objects(&changed, 42).len(), 1);
        assert_eq!(
            objects(&good, 41),
            vec!["checkpoint 41 index (against its key)"]
        );
        let mut reordered = good.clone();
        reordered.roots.reverse();
        assert_eq!(
            objects(&reordered, 42),
            vec!["checkpoint 42 namespace order"]
        );
        let mut empty = good.clone();
        empty.roots[0].1.leaves = 0;
        empty.cluster_root = cluster_root(&empty.roots);
        assert_eq!(
            objects(&empty, 42),
            vec!["checkpoint 42 root of \"acme\" (a namespace without leaves)"]
        );
    }
}
