//! The replicated state machine's logic: `apply(command) -> (mutations, outcome)`.
//!
//! Deterministic and IO-free: no clock, no randomness, no RocksDB. The store feeds it a read
//! view and writes the returned mutations together with the last-applied index in one atomic
//! batch. Business rejections are returned as [`Outcome::Rejected`] values, identical on every
//! replica; they never panic and never fail the apply.

use serde::{Deserialize, Serialize};

use crate::domain::{validate_value, RecordPath, RecordVersion};

/// A command carried by the Raft log. Variants are only ever appended, never reordered or
/// removed, so that old log entries keep decoding (the log encoding carries a format version).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    PutRecord {
        path: RecordPath,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    DeleteRecord {
        path: RecordPath,
    },
    /// Concurrent client commands carried by one log entry (one fsync for all of them),
    /// applied in order; each gets its own outcome. Batches do not nest.
    Batch(Vec<Command>),
}

impl Command {
    /// Bytes this command adds to a batch, for bounding entry sizes.
    pub fn size_hint(&self) -> usize {
        match self {
            Command::PutRecord { path, value } => value.len() + path.key.as_str().len() + 128,
            Command::DeleteRecord { path } => path.key.as_str().len() + 128,
            Command::Batch(cmds) => cmds.iter().map(Command::size_hint).sum(),
        }
    }
}

/// The result of applying one log entry, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Outcome {
    /// Blank and membership entries produce nothing for a client.
    #[default]
    Nothing,
    Written {
        revision: u64,
    },
    Deleted {
        revision: u64,
        existed: bool,
    },
    /// A business rejection: the entry was applied as a no-op on every replica.
    Rejected {
        reason: String,
    },
    /// The outcomes of a [`Command::Batch`], in order.
    Batch(Vec<Outcome>),
}

/// A change for the store to write, in the same batch as the new last-applied index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    PutRecord {
        path: RecordPath,
        version: RecordVersion,
    },
    DeleteRecord {
        path: RecordPath,
    },
}

/// What `apply` may read of the current state.
pub trait LedgerView {
    type Error;
    fn record(&self, path: &RecordPath) -> Result<Option<RecordVersion>, Self::Error>;
}

/// Applies one command at log index `index`. A [`Command::Batch`] is unrolled by the caller,
/// which applies each inner command in order so later ones see earlier ones' effects; a batch
/// reaching this function is nested and is rejected.
pub fn apply<V: LedgerView>(
    view: &V,
    index: u64,
    command: &Command,
) -> Result<(Vec<Mutation>, Outcome), V::Error> {
    match command {
        Command::PutRecord { path, value } => {
            // Inputs were validated at the edge; re-checking here keeps a bad entry (an old
            // binary, a bug) from ever reaching the store, with the same answer everywhere.
            if let Err(e) = validate_value(value) {
                return Ok((
                    Vec::new(),
                    Outcome::Rejected {
                        reason: e.to_string(),
                    },
                ));
            }
            let version = RecordVersion {
                revision: index,
                value: value.clone(),
            };
            Ok((
                vec![Mutation::PutRecord {
                    path: path.clone(),
                    version,
                }],
                Outcome::Written { revision: index },
            ))
        }
        Command::Batch(_) => Ok((
            Vec::new(),
            Outcome::Rejected {
                reason: "batches do not nest".into(),
            },
        )),
        Command::DeleteRecord { path } => {
            let existed = view.record(path)?.is_some();
            let mutations = if existed {
                vec![Mutation::DeleteRecord { path: path.clone() }]
            } else {
                Vec::new()
            };
            Ok((
                mutations,
                Outcome::Deleted {
                    revision: index,
                    existed,
                },
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapView(HashMap<RecordPath, RecordVersion>);

    impl LedgerView for MapView {
        type Error = std::convert::Infallible;
        fn record(&self, path: &RecordPath) -> Result<Option<RecordVersion>, Self::Error> {
            Ok(self.0.get(path).cloned())
        }
    }

    fn path(key: &str) -> RecordPath {
        RecordPath::parse("acme", "orders", key).unwrap()
    }

    // Goal: a put stamps the commit index as revision; a delete reports whether the record
    // existed; an invalid value is rejected as a value, not an error.
    #[test]
    fn apply_is_deterministic_and_rejects_by_value() {
        let mut view = MapView(HashMap::new());
        let (m, o) = apply(
            &view,
            7,
            &Command::PutRecord {
                path: path("a"),
                value: b"v".to_vec(),
            },
        )
        .unwrap();
        assert_eq!(o, Outcome::Written { revision: 7 });
        let Mutation::PutRecord { version, .. } = &m[0] else {
            panic!("expected a put")
        };
        assert_eq!(version.revision, 7);
        view.0.insert(path("a"), version.clone());

        let (m, o) = apply(&view, 8, &Command::DeleteRecord { path: path("a") }).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(
            o,
            Outcome::Deleted {
                revision: 8,
                existed: true
            }
        );
        let (m, o) = apply(&view, 9, &Command::DeleteRecord { path: path("b") }).unwrap();
        assert!(m.is_empty());
        assert_eq!(
            o,
            Outcome::Deleted {
                revision: 9,
                existed: false
            }
        );

        let (m, o) = apply(
            &view,
            10,
            &Command::PutRecord {
                path: path("c"),
                value: Vec::new(),
            },
        )
        .unwrap();
        assert!(m.is_empty());
        assert!(matches!(o, Outcome::Rejected { .. }));
    }
}
