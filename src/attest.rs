//! Node identities and signed attestations.
//!
//! Each node has an ed25519 identity key, generated on first start into `identity.key` under
//! its data dir (hex seed, mode 0600); its public key shows in `cluster status`. An attestation
//! is a statement (cluster, checkpoint index, leader time, roots, cluster root) and each node's
//! signature over its canonical bytes: `escrow.attestation.v1\n` followed by the statement as
//! compact JSON with fields in declaration order and roots sorted by namespace. Checking one
//! needs no cluster: only the document and the nodes' public keys.

use std::collections::BTreeMap;
use std::path::Path;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::domain::{hex, Checkpoint};

const IDENTITY_FILE: &str = "identity.key";
const SIGNING_CONTEXT: &[u8] = b"escrow.attestation.v1\n";

#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("identity key {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Loads the node's identity key, creating it on first start.
pub fn load_or_create_identity(data_dir: &Path) -> Result<SigningKey, AttestError> {
    let path = data_dir.join(IDENTITY_FILE);
    let err = |reason: String| AttestError::Identity {
        path: path.display().to_string(),
        reason,
    };
    if path.exists() {
        let raw = crate::auth::read_secret_file(&path).map_err(|e| err(e.to_string()))?;
        let text = String::from_utf8(raw).map_err(|_| err("not UTF-8".into()))?;
        let seed = parse_hex32(text.trim()).map_err(err)?;
        return Ok(SigningKey::from_bytes(&seed));
    }
    let seed: [u8; 32] = rand::random();
    let key = SigningKey::from_bytes(&seed);
    crate::auth::write_secret_file(&path, hex(&seed).as_bytes()).map_err(|e| err(e.to_string()))?;
    Ok(key)
}

pub fn parse_hex32(text: &str) -> Result<[u8; 32], String> {
    blake3::Hash::from_hex(text)
        .map(|h| *h.as_bytes())
        .map_err(|_| {
            format!(
                "{:?} is not 64 hex digits",
                text.chars().take(80).collect::<String>()
            )
        })
}

/// One namespace's root in a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatementRoot {
    pub root: String,
    pub leaves: u64,
}

/// What every node signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Statement {
    pub cluster: String,
    /// The log index of the checkpoint the roots were recorded at.
    pub index: u64,
    /// The leader's time on that checkpoint, ms since the Unix epoch.
    pub time_ms: u64,
    /// "all", or "tenant:<id>" for a statement about one tenant.
    pub scope: String,
    pub roots: BTreeMap<String, StatementRoot>,
    pub cluster_root: String,
}

impl Statement {
    /// The statement for a checkpoint: all namespaces, or only `tenant` (whose root is then
    /// listed even when empty, so a customer sees "nothing held" signed too).
    pub fn from_checkpoint(cluster: &str, c: &Checkpoint, tenant: Option<&str>) -> Self {
        let mut roots: BTreeMap<String, StatementRoot> = c
            .roots
            .iter()
            .filter(|(ns, _)| tenant.is_none_or(|t| t == ns))
            .map(|(ns, r)| {
                (
                    ns.clone(),
                    StatementRoot {
                        root: hex(&r.root),
                        leaves: r.leaves,
                    },
                )
            })
            .collect();
        if let Some(t) = tenant {
            roots.entry(t.to_string()).or_insert_with(|| StatementRoot {
                root: hex(&crate::integrity::namespace_root(t, &BTreeMap::new())),
                leaves: 0,
            });
        }
        Self {
            cluster: cluster.to_string(),
            index: c.index,
            time_ms: c.time_ms,
            scope: tenant.map_or_else(|| "all".to_string(), |t| format!("tenant:{t}")),
            roots,
            cluster_root: hex(&c.cluster_root),
        }
    }

    /// The bytes a node signs.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut out = SIGNING_CONTEXT.to_vec();
        out.extend_from_slice(&serde_json::to_vec(self).expect("a statement serialises"));
        out
    }

    pub fn sign(&self, key: &SigningKey) -> String {
        crate::domain::hex_bytes(&key.sign(&self.signing_bytes()).to_bytes())
    }
}

fn parse_hex64(text: &str) -> Result<[u8; 64], String> {
    if text.len() != 128 || !text.is_ascii() {
        return Err("a signature is 128 hex digits".into());
    }
    let mut out = [0u8; 64];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .map_err(|_| "a signature is 128 hex digits".to_string())?;
    }
    Ok(out)
}

/// One node's signature in an attestation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSignature {
    pub node: u64,
    pub public_key: String,
    pub signature: String,
}

/// The document `escrowctl attest` prints and `attest verify` checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    pub statement: Statement,
    pub signatures: Vec<NodeSignature>,
}

/// The trusted public keys, node id → hex key (`escrowctl attest keys` prints this file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKeys {
    pub cluster: String,
    pub keys: BTreeMap<u64, String>,
}

/// Checks an attestation offline: every signature must come from a trusted key and match
/// this statement exactly, and at least `required` trusted keys must have signed (`None`: all
/// of them; `escrowctl attest` itself needs a majority, so a lower bound lets a statement taken
/// while a node was down be checked too).
pub fn verify(
    doc: &Attestation,
    trusted: &TrustedKeys,
    required: Option<usize>,
) -> Result<(), AttestError> {
    let bad = |m: String| Err(AttestError::Invalid(m));
    let trusted_count = trusted.keys.len();
    if trusted_count == 0 {
        return bad("the trusted-keys file lists no keys".into());
    }
    let required = required.unwrap_or(trusted_count);
    if required == 0 || required > trusted_count {
        return bad(format!(
            "{required} signatures required, but it must be 1 to the {trusted_count} trusted keys"
        ));
    }
    if doc.statement.cluster != trusted.cluster {
        return bad(format!(
            "the statement is about cluster {:?}, the keys are for {:?}",
            doc.statement.cluster, trusted.cluster
        ));
    }
    let bytes = doc.statement.signing_bytes();
    let mut signed: BTreeMap<u64, bool> = BTreeMap::new();
    for s in &doc.signatures {
        let Some(expected) = trusted.keys.get(&s.node) else {
            return bad(format!("node {} is not among the trusted keys", s.node));
        };
        if !expected.eq_ignore_ascii_case(&s.public_key) {
            return bad(format!(
                "node {} signed with key {}, not its trusted key {expected}",
                s.node, s.public_key
            ));
        }
        let key = parse_hex32(expected)
            .and_then(|k| VerifyingKey::from_bytes(&k).map_err(|e| e.to_string()))
            .map_err(|e| AttestError::Invalid(format!("trusted key of node {}: {e}", s.node)))?;
        let sig = parse_hex64(&s.signature)
            .map_err(|e| AttestError::Invalid(format!("signature of node {}: {e}", s.node)))?;
        if key.verify(&bytes, &Signature::from_bytes(&sig)).is_err() {
            return bad(format!(
                "the signature of node {} does not match the statement (changed or forged)",
                s.node
            ));
        }
        if signed.insert(s.node, true).is_some() {
            return bad(format!("node {} signed twice", s.node));
        }
    }
    let missing: Vec<String> = trusted
        .keys
        .keys()
        .filter(|id| !signed.contains_key(id))
        .map(u64::to_string)
        .collect();
    if signed.len() < required {
        return bad(format!(
            "{} of the {required} signatures required; no signature from node(s) {}",
            signed.len(),
            missing.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::NamespaceRoot;

    fn signed(keys: &[(u64, SigningKey)]) -> (Attestation, TrustedKeys) {
        let c = Checkpoint {
            index: 42,
            time_ms: 1_795_000_000_000,
            roots: vec![(
                "acme".into(),
                NamespaceRoot {
                    root: [7; 32],
                    leaves: 3,
                },
            )],
            cluster_root: [9; 32],
        };
        let statement = Statement::from_checkpoint("prod", &c, None);
        let signatures = keys
            .iter()
            .map(|(id, k)| NodeSignature {
                node: *id,
                public_key: hex(k.verifying_key().as_bytes()),
                signature: statement.sign(k),
            })
            .collect();
        let trusted = TrustedKeys {
            cluster: "prod".into(),
            keys: keys
                .iter()
                .map(|(id, k)| (*id, hex(k.verifying_key().as_bytes())))
                .collect(),
        };
        (
            Attestation {
                statement,
                signatures,
            },
            trusted,
        )
    }

    // Goal: a good attestation verifies; any changed field, a missing signature, or a
    // signature by an unknown key fails.
    #[test]
    fn attestations_fail_on_any_change() {
        let keys: Vec<(u64, SigningKey)> = (1..=3)
            .map(|i| (i, SigningKey::from_bytes(&[i as u8; 32])))
            .collect();
        let (doc, trusted) = signed(&keys);
        verify(&doc, &trusted, None).unwrap();

        let mut changed = doc.clone();
        changed.statement.roots.get_mut("acme").unwrap().leaves = 4;
        assert!(verify(&changed, &trusted, None).is_err());
        let mut changed = doc.clone();
        changed.statement.index += 1;
        assert!(verify(&changed, &trusted, None).is_err());
        let mut changed = doc.clone();
        changed.signatures[1].signature.replace_range(0..2, "00");
        assert!(verify(&changed, &trusted, None).is_err());

        let mut missing = doc.clone();
        missing.signatures.pop();
        let err = verify(&missing, &trusted, None).unwrap_err();
        assert!(
            err.to_string().contains("no signature from node(s) 3"),
            "{err}"
        );
        verify(&missing, &trusted, Some(2)).unwrap();
        assert!(verify(&missing, &trusted, Some(3)).is_err());

        let stranger = SigningKey::from_bytes(&[99; 32]);
        let mut foreign = doc.clone();
        foreign.signatures[0] = NodeSignature {
            node: 1,
            public_key: hex(stranger.verifying_key().as_bytes()),
            signature: doc.statement.sign(&stranger),
        };
        assert!(verify(&foreign, &trusted, Some(1)).is_err());
        let mut extra = doc.clone();
        extra.signatures.push(NodeSignature {
            node: 9,
            public_key: hex(stranger.verifying_key().as_bytes()),
            signature: doc.statement.sign(&stranger),
        });
        assert!(verify(&extra, &trusted, Some(1)).is_err());

        // Nothing trusted, or no signature required, proves nothing: refused.
        let unsigned = Attestation {
            signatures: Vec::new(),
            ..doc.clone()
        };
        let err = verify(&unsigned, &trusted, Some(0)).unwrap_err();
        assert!(err.to_string().contains("must be 1 to the 3"), "{err}");
        assert!(verify(&doc, &trusted, Some(4)).is_err());
        let nobody = TrustedKeys {
            keys: Default::default(),
            ..trusted.clone()
        };
        let err = verify(&unsigned, &nobody, None).unwrap_err();
        assert!(err.to_string().contains("lists no keys"), "{err}");
    }

    // Goal: the identity key survives a restart and is written owner-only.
    #[test]
    fn identity_is_created_once_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create_identity(dir.path()).unwrap();
        let b = load_or_create_identity(dir.path()).unwrap();
        assert_eq!(a.verifying_key(), b.verifying_key());
        let mode = std::fs::metadata(dir.path().join(IDENTITY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }
}
