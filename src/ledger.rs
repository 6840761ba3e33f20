//! The replicated state machine's logic: `apply(command) -> (mutations, outcome)`.
//!
//! Deterministic and IO-free: no clock, no randomness, no RocksDB. Time comes from the leader,
//! stamped into [`Command::Timed`], and the store makes it monotonic before it reaches here. The
//! store feeds `apply` a read view and writes the returned mutations together with the
//! last-applied index in one atomic batch. Business rejections (unknown tenant, suspended
//! tenant, invalid input) are returned as [`Outcome::Rejected`] values, identical on every
//! replica; they never panic, never fail the apply, and change nothing.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::domain::{
    validate_changes, validate_value, ArtifactName, ArtifactVersion, Change, Manifest,
    NamespaceStats, RecordPath, RecordVersion, SourceId, SourcePosition, TenantId, TenantInfo,
    TenantState,
};

/// Batches inside batches a decoder accepts: an entry's batch and one level more (which
/// [`apply`] refuses: "batches do not nest"). Bytes from a peer that nest deeper are a decode
/// error before the deeper level is read, so they cannot overflow the stack (two bytes per
/// level would otherwise abort the node in a few kilobytes).
pub const BATCH_NESTING_MAX: u8 = 2;

std::thread_local! {
    /// Batches being decoded on this thread, outermost included.
    static BATCH_DEPTH: std::cell::Cell<u8> = const { std::cell::Cell::new(0) };
}

/// Decodes the members of a [`Command::Batch`], [`Command::Timed`] or [`Outcome::Batch`],
/// refusing one nested deeper than [`BATCH_NESTING_MAX`].
fn batch_members<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    /// Leaves the level however the decode ends.
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            BATCH_DEPTH.with(|d| d.set(d.get().saturating_sub(1)));
        }
    }
    let depth = BATCH_DEPTH.with(|d| d.get());
    if depth >= BATCH_NESTING_MAX {
        return Err(serde::de::Error::custom(format!(
            "batches nested deeper than {BATCH_NESTING_MAX} levels"
        )));
    }
    BATCH_DEPTH.with(|d| d.set(depth + 1));
    let _level = Level;
    Vec::<T>::deserialize(d)
}

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
    Batch(#[serde(deserialize_with = "batch_members")] Vec<Command>),
    /// Like `Batch`, stamped with the proposing leader's clock (ms since the Unix epoch). The
    /// store applies `max(at_ms, previous time)` so time never runs backwards across leaders.
    Timed {
        at_ms: u64,
        #[serde(deserialize_with = "batch_members")]
        commands: Vec<Command>,
    },
    /// Registers a tenant; its records, artifacts and figures live under its id only.
    AddTenant {
        tenant: TenantId,
    },
    /// Suspends a tenant (writes refused, data kept) or makes it active again.
    SetTenantState {
        tenant: TenantId,
        state: TenantState,
    },
    /// A batch of mirrored changes from one source stream. Changes at or below the stream's
    /// applied position are acknowledged without being applied again, so an agent that retries
    /// (after a crash or a leader change) neither loses nor duplicates a change.
    Ingest {
        tenant: TenantId,
        source: SourceId,
        changes: Vec<Change>,
    },
    /// Commits an artifact version. Proposed only once every chunk is durable on a majority
    /// and the manifest was verified against them. Content equal to the latest version's adds
    /// no version.
    PutArtifact {
        namespace: TenantId,
        name: ArtifactName,
        manifest: Manifest,
    },
    /// Adds a tombstone version to an artifact; earlier versions stay readable.
    DeleteArtifact {
        namespace: TenantId,
        name: ArtifactName,
    },
    /// Records every namespace's Merkle root at this entry's index (for verify and attest).
    Checkpoint,
    /// Drops the record versions that a newer version of the same record replaced before
    /// `before_ms` (the retention period has passed; a record's latest version stays), oldest
    /// replacement first, at most [`EXPIRE_VERSIONS_MAX`] per entry. Each entry goes on where
    /// the previous one stopped.
    ExpireHistory {
        before_ms: u64,
    },
}

/// Record versions one [`Command::ExpireHistory`] entry removes at most; the retention worker
/// proposes the next entry while one says there is more, so no single entry holds up the
/// state machine for long.
pub const EXPIRE_VERSIONS_MAX: usize = 1000;

impl Command {
    /// Whether applying it stores more data (a record or artifact version, a tombstone, a
    /// tenant): those are refused while a voter's disk is under its reserve
    /// ([`crate::workers::disk`]). Expiry frees space; checkpoints and tenant states add a
    /// few bytes that an operator may need while a disk is low.
    pub fn adds_data(&self) -> bool {
        match self {
            Command::PutRecord { .. }
            | Command::DeleteRecord { .. }
            | Command::AddTenant { .. }
            | Command::Ingest { .. }
            | Command::PutArtifact { .. }
            | Command::DeleteArtifact { .. } => true,
            Command::Batch(commands) | Command::Timed { commands, .. } => {
                commands.iter().any(Command::adds_data)
            }
            Command::SetTenantState { .. }
            | Command::Checkpoint
            | Command::ExpireHistory { .. } => false,
        }
    }

    /// Bytes this command adds to a batch, for bounding entry sizes.
    pub fn size_hint(&self) -> usize {
        match self {
            Command::PutRecord { path, value } => value.len() + path.key.as_str().len() + 128,
            Command::DeleteRecord { path } => path.key.as_str().len() + 128,
            Command::Batch(cmds) | Command::Timed { commands: cmds, .. } => {
                cmds.iter().map(Command::size_hint).sum()
            }
            Command::AddTenant { .. } | Command::SetTenantState { .. } => 128,
            Command::Ingest { changes, .. } => changes
                .iter()
                .map(|c| c.key.as_str().len() + c.value.as_ref().map_or(0, Vec::len) + 128)
                .sum(),
            Command::PutArtifact { name, manifest, .. } => {
                name.as_str().len() + manifest.chunks.len() * 48 + 256
            }
            Command::DeleteArtifact { name, .. } => name.as_str().len() + 128,
            Command::Checkpoint => 64,
            Command::ExpireHistory { .. } => 64,
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
        kind: Rejection,
        reason: String,
    },
    /// The outcomes of a [`Command::Batch`] or [`Command::Timed`], in order.
    Batch(#[serde(deserialize_with = "batch_members")] Vec<Outcome>),
    /// A tenant after the command.
    Tenant(TenantInfo),
    /// An ingest batch: `applied` changes were new, `duplicates` had been applied before.
    /// `revision` is the commit index that holds the batch's changes (the earlier one when
    /// everything was a duplicate); `position` is the stream's applied position now.
    Ingested {
        revision: u64,
        applied: u64,
        duplicates: u64,
        position: u64,
    },
    /// An artifact's version after a put or delete; `changed` is false when the content
    /// equalled the latest version (put) or the artifact was absent already (delete).
    Artifact {
        version: u64,
        revision: u64,
        changed: bool,
    },
    /// Roots were recorded at this index.
    Checkpoint {
        index: u64,
    },
    /// Expired record versions removed; `more`: the entry stopped at its limit with more
    /// versions past the cutoff left for the next one.
    Expired {
        removed: u64,
        more: bool,
    },
}

/// Why a command was refused, so the edge can pick the right status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rejection {
    /// The command's content is invalid (re-checked in the state machine).
    Invalid,
    /// It names a tenant that does not exist.
    UnknownTenant,
    /// It would create something that exists already.
    AlreadyExists,
    /// The current state does not allow it (a suspended tenant, a nested batch).
    Refused,
}

/// A change for the store to write, in the same batch as the new last-applied index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    /// A new version of a record: becomes the latest and joins the record's history.
    PutRecord {
        path: RecordPath,
        version: RecordVersion,
        /// The record had a live value before this version (its Merkle leaf exists).
        replaced_live: bool,
    },
    PutTenant(TenantInfo),
    PutStats {
        namespace: TenantId,
        stats: NamespaceStats,
    },
    PutSource {
        tenant: TenantId,
        source: SourceId,
        position: SourcePosition,
    },
    /// A new artifact version: becomes the latest; its chunks become referenced.
    PutArtifact {
        namespace: TenantId,
        name: ArtifactName,
        version: ArtifactVersion,
        /// The artifact had a live version before this one (its Merkle leaf exists).
        replaced_live: bool,
    },
    /// Record all roots as they are after the preceding changes.
    Checkpoint,
    /// Remove one past version from a record's history, and its entry in the store's list
    /// of replaced versions.
    DeleteVersion(ExpiredVersion),
}

/// What `apply` may read of the current state.
pub trait LedgerView {
    type Error;
    /// The length of a record's live value: `None` when the record is absent or deleted.
    fn record_len(&self, path: &RecordPath) -> Result<Option<u64>, Self::Error>;
    fn tenant(&self, id: &TenantId) -> Result<Option<TenantInfo>, Self::Error>;
    fn stats(&self, namespace: &TenantId) -> Result<NamespaceStats, Self::Error>;
    fn source(&self, tenant: &TenantId, source: &SourceId) -> Result<SourcePosition, Self::Error>;
    /// The latest version of an artifact, tombstones included.
    fn artifact(
        &self,
        namespace: &TenantId,
        name: &ArtifactName,
    ) -> Result<Option<ArtifactVersion>, Self::Error>;
    /// Up to `limit` record versions that a newer version replaced before `before_ms`, in the
    /// order they were replaced, starting after the last one an earlier expiry removed; and
    /// whether more are left past the limit. Implementations treat a `limit` below 1 as 1.
    fn expirable_versions(&self, before_ms: u64, limit: usize) -> Result<Expirable, Self::Error>;
}

/// A record version to remove, as the store names it: the key under which it listed the
/// replacement, which names the replaced version too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpiredVersion(pub Vec<u8>);

/// What [`LedgerView::expirable_versions`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expirable {
    pub versions: Vec<ExpiredVersion>,
    /// More versions past the cutoff are left for the next entry.
    pub more: bool,
}

/// Where and when a command is applied.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// The log index of the entry carrying the command.
    pub index: u64,
    /// The leader's time for the entry (monotonic), ms since the Unix epoch.
    pub time_ms: u64,
}

fn reject(kind: Rejection, reason: impl Into<String>) -> (Vec<Mutation>, Outcome) {
    (
        Vec::new(),
        Outcome::Rejected {
            kind,
            reason: reason.into(),
        },
    )
}

/// Whether writes into `namespace` are allowed: the vendor namespace always, a tenant only when
/// registered and active.
fn writable<V: LedgerView>(
    view: &V,
    namespace: &TenantId,
) -> Result<Result<(), (Rejection, String)>, V::Error> {
    if namespace.is_vendor() {
        return Ok(Ok(()));
    }
    Ok(match view.tenant(namespace)? {
        None => Err((
            Rejection::UnknownTenant,
            format!(
                "unknown tenant {:?} (register it with `escrowctl tenant add {}`)",
                namespace.as_str(),
                namespace.as_str()
            ),
        )),
        Some(t) if t.state == TenantState::Suspended => Err((
            Rejection::Refused,
            format!(
                "tenant {:?} is suspended; writes are refused",
                namespace.as_str()
            ),
        )),
        Some(_) => Ok(()),
    })
}

/// Record changes within one command: reads see the command's own earlier writes, and the
/// namespace figures are updated as versions are added.
struct RecordWriter<'v, V: LedgerView> {
    view: &'v V,
    stamp: Stamp,
    stats: NamespaceStats,
    /// Live value length per record touched so far (`None`: absent or deleted).
    latest: HashMap<RecordPath, Option<u64>>,
    mutations: Vec<Mutation>,
}

impl<'v, V: LedgerView> RecordWriter<'v, V> {
    fn new(view: &'v V, namespace: &TenantId, stamp: Stamp) -> Result<Self, V::Error> {
        Ok(Self {
            view,
            stamp,
            stats: view.stats(namespace)?,
            latest: HashMap::new(),
            mutations: Vec::new(),
        })
    }

    fn live_len(&mut self, path: &RecordPath) -> Result<Option<u64>, V::Error> {
        if let Some(len) = self.latest.get(path) {
            return Ok(*len);
        }
        let len = self.view.record_len(path)?;
        self.latest.insert(path.clone(), len);
        Ok(len)
    }

    /// Adds a version; a delete of a record that is absent (or already deleted) adds nothing
    /// and returns false.
    fn change(
        &mut self,
        path: &RecordPath,
        value: Option<Vec<u8>>,
        seq: u64,
    ) -> Result<bool, V::Error> {
        let live_len = self.live_len(path)?;
        if value.is_none() && live_len.is_none() {
            return Ok(false);
        }
        // Saturating: figures read back from the store never wrap (nor panic the apply) if
        // they ever drifted; every replica computes the same.
        if let Some(len) = live_len {
            self.stats.records = self.stats.records.saturating_sub(1);
            self.stats.record_bytes = self.stats.record_bytes.saturating_sub(len);
        }
        if let Some(v) = &value {
            self.stats.records += 1;
            self.stats.record_bytes += v.len() as u64;
        }
        self.stats.versions += 1;
        self.stats.last_commit_ms = self.stamp.time_ms;
        let version = RecordVersion {
            revision: self.stamp.index,
            time_ms: self.stamp.time_ms,
            seq,
            value,
        };
        self.latest
            .insert(path.clone(), version.value.as_ref().map(|v| v.len() as u64));
        self.mutations.push(Mutation::PutRecord {
            path: path.clone(),
            version,
            replaced_live: live_len.is_some(),
        });
        Ok(true)
    }

    fn finish(mut self, namespace: &TenantId) -> Vec<Mutation> {
        self.mutations.push(Mutation::PutStats {
            namespace: namespace.clone(),
            stats: self.stats,
        });
        self.mutations
    }
}

/// Applies one command. [`Command::Batch`] and [`Command::Timed`] are unrolled by the store,
/// which applies each inner command in order so later ones see earlier ones' effects; one
/// reaching this function is nested and is rejected.
pub fn apply<V: LedgerView>(
    view: &V,
    stamp: Stamp,
    command: &Command,
) -> Result<(Vec<Mutation>, Outcome), V::Error> {
    match command {
        Command::PutRecord { path, value } => {
            // Inputs were validated at the edge; re-checking here keeps a bad entry (an old
            // binary, a bug) from ever reaching the store, with the same answer everywhere.
            if let Err(e) = validate_value(value) {
                return Ok(reject(Rejection::Invalid, e.to_string()));
            }
            if let Err((kind, reason)) = writable(view, &path.tenant)? {
                return Ok(reject(kind, reason));
            }
            let mut w = RecordWriter::new(view, &path.tenant, stamp)?;
            w.change(path, Some(value.clone()), 0)?;
            Ok((
                w.finish(&path.tenant),
                Outcome::Written {
                    revision: stamp.index,
                },
            ))
        }
        Command::DeleteRecord { path } => {
            if let Err((kind, reason)) = writable(view, &path.tenant)? {
                return Ok(reject(kind, reason));
            }
            let mut w = RecordWriter::new(view, &path.tenant, stamp)?;
            let existed = w.change(path, None, 0)?;
            let mutations = if existed {
                w.finish(&path.tenant)
            } else {
                Vec::new()
            };
            Ok((
                mutations,
                Outcome::Deleted {
                    revision: stamp.index,
                    existed,
                },
            ))
        }
        Command::Batch(_) | Command::Timed { .. } => {
            Ok(reject(Rejection::Refused, "batches do not nest"))
        }
        Command::AddTenant { tenant } => {
            if tenant.is_vendor() {
                return Ok(reject(
                    Rejection::Invalid,
                    format!(
                        "{:?} is the shared vendor namespace, not a tenant",
                        tenant.as_str()
                    ),
                ));
            }
            if view.tenant(tenant)?.is_some() {
                return Ok(reject(
                    Rejection::AlreadyExists,
                    format!("tenant {:?} already exists", tenant.as_str()),
                ));
            }
            let info = TenantInfo {
                id: tenant.clone(),
                state: TenantState::Active,
                created_index: stamp.index,
                created_ms: stamp.time_ms,
            };
            Ok((
                vec![Mutation::PutTenant(info.clone())],
                Outcome::Tenant(info),
            ))
        }
        Command::SetTenantState { tenant, state } => match view.tenant(tenant)? {
            None => Ok(reject(
                Rejection::UnknownTenant,
                format!("unknown tenant {:?}", tenant.as_str()),
            )),
            Some(mut info) => {
                info.state = *state;
                Ok((
                    vec![Mutation::PutTenant(info.clone())],
                    Outcome::Tenant(info),
                ))
            }
        },
        Command::Ingest {
            tenant,
            source,
            changes,
        } => {
            if let Err(e) = validate_changes(changes) {
                return Ok(reject(Rejection::Invalid, e.to_string()));
            }
            if let Err((kind, reason)) = writable(view, tenant)? {
                return Ok(reject(kind, reason));
            }
            let mut position = view.source(tenant, source)?;
            let mut w = RecordWriter::new(view, tenant, stamp)?;
            let (mut applied, mut duplicates) = (0u64, 0u64);
            let mut newest_source_ms = 0;
            for c in changes {
                if c.seq <= position.last_seq {
                    duplicates += 1;
                    continue;
                }
                let path = RecordPath {
                    tenant: tenant.clone(),
                    collection: c.collection.clone(),
                    key: c.key.clone(),
                };
                w.change(&path, c.value.clone(), c.seq)?;
                position.last_seq = c.seq;
                newest_source_ms = newest_source_ms.max(c.source_ms);
                applied += 1;
            }
            if applied == 0 {
                return Ok((
                    Vec::new(),
                    Outcome::Ingested {
                        revision: position.revision,
                        applied,
                        duplicates,
                        position: position.last_seq,
                    },
                ));
            }
            position.revision = stamp.index;
            position.last_source_ms = position.last_source_ms.max(newest_source_ms);
            w.stats.last_source_ms = w.stats.last_source_ms.max(newest_source_ms);
            w.stats.last_commit_ms = stamp.time_ms;
            w.stats.last_lag_ms = stamp.time_ms.saturating_sub(newest_source_ms);
            let mut mutations = w.finish(tenant);
            mutations.push(Mutation::PutSource {
                tenant: tenant.clone(),
                source: source.clone(),
                position: position.clone(),
            });
            Ok((
                mutations,
                Outcome::Ingested {
                    revision: stamp.index,
                    applied,
                    duplicates,
                    position: position.last_seq,
                },
            ))
        }
        Command::PutArtifact {
            namespace,
            name,
            manifest,
        } => {
            if let Err(e) = manifest.validate() {
                return Ok(reject(Rejection::Invalid, e.to_string()));
            }
            if let Err((kind, reason)) = writable(view, namespace)? {
                return Ok(reject(kind, reason));
            }
            put_artifact(view, stamp, namespace, name, Some(manifest.clone()))
        }
        Command::DeleteArtifact { namespace, name } => {
            if let Err((kind, reason)) = writable(view, namespace)? {
                return Ok(reject(kind, reason));
            }
            put_artifact(view, stamp, namespace, name, None)
        }
        Command::ExpireHistory { before_ms } => {
            let Expirable { versions, more } =
                view.expirable_versions(*before_ms, EXPIRE_VERSIONS_MAX)?;
            let removed = versions.len() as u64;
            Ok((
                versions.into_iter().map(Mutation::DeleteVersion).collect(),
                Outcome::Expired { removed, more },
            ))
        }
        Command::Checkpoint => Ok((
            vec![Mutation::Checkpoint],
            Outcome::Checkpoint { index: stamp.index },
        )),
    }
}

/// Adds an artifact version (a tombstone for `None`) unless it would not change anything.
fn put_artifact<V: LedgerView>(
    view: &V,
    stamp: Stamp,
    namespace: &TenantId,
    name: &ArtifactName,
    manifest: Option<Manifest>,
) -> Result<(Vec<Mutation>, Outcome), V::Error> {
    let latest = view.artifact(namespace, name)?;
    let live = latest.as_ref().and_then(|v| v.manifest.as_ref());
    let replaced_live = live.is_some();
    let same = match (live, &manifest) {
        (Some(old), Some(new)) => old.blake3 == new.blake3 && old.size == new.size,
        (None, None) => true,
        _ => false,
    };
    if same {
        let (version, revision) = latest.map_or((0, 0), |v| (v.version, v.revision));
        return Ok((
            Vec::new(),
            Outcome::Artifact {
                version,
                revision,
                changed: false,
            },
        ));
    }
    let mut stats = view.stats(namespace)?;
    if let Some(old) = live {
        stats.artifacts = stats.artifacts.saturating_sub(1);
        stats.artifact_bytes = stats.artifact_bytes.saturating_sub(old.size);
    }
    if let Some(new) = &manifest {
        stats.artifacts += 1;
        stats.artifact_bytes += new.size;
        stats.last_source_ms = stats.last_source_ms.max(new.source_ms);
        stats.last_lag_ms = stamp.time_ms.saturating_sub(new.source_ms);
    }
    stats.last_commit_ms = stamp.time_ms;
    let version = ArtifactVersion {
        version: latest.map_or(0, |v| v.version) + 1,
        revision: stamp.index,
        time_ms: stamp.time_ms,
        manifest,
    };
    let outcome = Outcome::Artifact {
        version: version.version,
        revision: stamp.index,
        changed: true,
    };
    Ok((
        vec![
            Mutation::PutArtifact {
                namespace: namespace.clone(),
                name: name.clone(),
                version,
                replaced_live,
            },
            Mutation::PutStats {
                namespace: namespace.clone(),
                stats,
            },
        ],
        outcome,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Collection, RecordKey};
    use std::collections::HashMap;

    // Goal: bytes from a peer that nest batches deeply are a decode error, not a stack
    // overflow that aborts the node; what the node itself builds (and one level more, which
    // apply refuses) still decodes, and the depth is back to zero after an error.
    #[test]
    fn deeply_nested_batches_are_a_decode_error() {
        use crate::raft::codec::{decode, encode};
        let leaf = encode(&Command::Checkpoint);
        let one = encode(&Command::Batch(vec![Command::Checkpoint]));
        // The bytes one level of `Batch` adds in front of its member.
        let level = &one[1..one.len() - (leaf.len() - 1)];
        let nested = |levels: usize| {
            let mut bytes = vec![one[0]];
            for _ in 0..levels {
                bytes.extend_from_slice(level);
            }
            bytes.extend_from_slice(&leaf[1..]);
            bytes
        };
        assert_eq!(
            decode::<Command>(&nested(2)).unwrap(),
            Command::Batch(vec![Command::Batch(vec![Command::Checkpoint])])
        );
        for levels in [3, 100_000] {
            let err = decode::<Command>(&nested(levels)).unwrap_err();
            assert!(err.to_string().contains("nested deeper"), "{err}");
        }
        let timed = Command::Timed {
            at_ms: 1,
            commands: vec![Command::Batch(vec![Command::Checkpoint])],
        };
        assert_eq!(decode::<Command>(&encode(&timed)).unwrap(), timed);
        let outcome = Outcome::Batch(vec![Outcome::Batch(vec![Outcome::Nothing])]);
        assert_eq!(decode::<Outcome>(&encode(&outcome)).unwrap(), outcome);
        let deep = Outcome::Batch(vec![outcome]);
        assert!(decode::<Outcome>(&encode(&deep)).is_err());
    }

    /// An in-memory view that applies mutations, so tests can chain commands.
    #[derive(Default)]
    struct MapView {
        records: HashMap<RecordPath, RecordVersion>,
        tenants: HashMap<TenantId, TenantInfo>,
        stats: HashMap<TenantId, NamespaceStats>,
        sources: HashMap<(TenantId, SourceId), SourcePosition>,
        artifacts: HashMap<(TenantId, ArtifactName), ArtifactVersion>,
    }

    impl LedgerView for MapView {
        type Error = std::convert::Infallible;
        fn record_len(&self, path: &RecordPath) -> Result<Option<u64>, Self::Error> {
            Ok(self
                .records
                .get(path)
                .and_then(|v| v.value.as_ref())
                .map(|v| v.len() as u64))
        }
        fn tenant(&self, id: &TenantId) -> Result<Option<TenantInfo>, Self::Error> {
            Ok(self.tenants.get(id).cloned())
        }
        fn stats(&self, ns: &TenantId) -> Result<NamespaceStats, Self::Error> {
            Ok(self.stats.get(ns).cloned().unwrap_or_default())
        }
        fn source(&self, t: &TenantId, s: &SourceId) -> Result<SourcePosition, Self::Error> {
            Ok(self
                .sources
                .get(&(t.clone(), s.clone()))
                .cloned()
                .unwrap_or_default())
        }
        fn artifact(
            &self,
            ns: &TenantId,
            name: &ArtifactName,
        ) -> Result<Option<ArtifactVersion>, Self::Error> {
            Ok(self.artifacts.get(&(ns.clone(), name.clone())).cloned())
        }
        fn expirable_versions(&self, _: u64, _: usize) -> Result<Expirable, Self::Error> {
            // History lives in the store; its expiry is tested against RocksDB (t10).
            Ok(Expirable::default())
        }
    }

    impl MapView {
        fn run(&mut self, index: u64, command: &Command) -> (usize, Outcome) {
            let stamp = Stamp {
                index,
                time_ms: 1_000 * index,
            };
            let (mutations, outcome) = apply(self, stamp, command).unwrap();
            let n = mutations.len();
            for m in mutations {
                match m {
                    Mutation::PutRecord { path, version, .. } => {
                        self.records.insert(path, version);
                    }
                    Mutation::PutTenant(t) => {
                        self.tenants.insert(t.id.clone(), t);
                    }
                    Mutation::PutStats { namespace, stats } => {
                        self.stats.insert(namespace, stats);
                    }
                    Mutation::PutSource {
                        tenant,
                        source,
                        position,
                    } => {
                        self.sources.insert((tenant, source), position);
                    }
                    Mutation::PutArtifact {
                        namespace,
                        name,
                        version,
                        ..
                    } => {
                        self.artifacts.insert((namespace, name), version);
                    }
                    Mutation::Checkpoint | Mutation::DeleteVersion(_) => {}
                }
            }
            (n, outcome)
        }
    }

    fn path(key: &str) -> RecordPath {
        RecordPath::parse("acme", "orders", key).unwrap()
    }

    fn acme() -> TenantId {
        TenantId::parse("acme").unwrap()
    }

    fn change(key: &str, value: Option<&str>, seq: u64) -> Change {
        Change {
            collection: Collection::parse("orders").unwrap(),
            key: RecordKey::parse(key).unwrap(),
            value: value.map(|v| v.as_bytes().to_vec()),
            seq,
            source_ms: 500 * seq,
        }
    }

    // Goal: writes need a registered, active tenant; a put stamps index and time; a delete
    // leaves a tombstone and reports whether the record existed; an invalid value is rejected
    // as a value, not an error, and changes nothing.
    #[test]
    fn records_need_an_active_tenant_and_keep_tombstones() {
        let mut view = MapView::default();
        let put = |k: &str, v: &str| Command::PutRecord {
            path: path(k),
            value: v.as_bytes().to_vec(),
        };
        let (n, o) = view.run(1, &put("a", "v"));
        assert_eq!(n, 0);
        assert!(matches!(o, Outcome::Rejected { reason, .. } if reason.contains("unknown tenant")));

        let (_, o) = view.run(2, &Command::AddTenant { tenant: acme() });
        assert!(matches!(o, Outcome::Tenant(_)));
        let (_, o) = view.run(3, &Command::AddTenant { tenant: acme() });
        assert!(matches!(o, Outcome::Rejected { reason, .. } if reason.contains("already exists")));
        let (_, o) = view.run(
            4,
            &Command::AddTenant {
                tenant: TenantId::vendor(),
            },
        );
        assert!(matches!(o, Outcome::Rejected { .. }));

        assert_eq!(
            view.run(7, &put("a", "v")).1,
            Outcome::Written { revision: 7 }
        );
        let v = view.records[&path("a")].clone();
        assert_eq!((v.revision, v.time_ms), (7, 7_000));
        assert_eq!(view.stats[&acme()].records, 1);

        let (n, o) = view.run(8, &Command::DeleteRecord { path: path("a") });
        assert!(n > 0);
        assert_eq!(
            o,
            Outcome::Deleted {
                revision: 8,
                existed: true
            }
        );
        assert!(view.records[&path("a")].is_tombstone());
        assert_eq!(view.stats[&acme()].records, 0);
        assert_eq!(view.stats[&acme()].versions, 2);
        let (n, o) = view.run(9, &Command::DeleteRecord { path: path("a") });
        assert_eq!(n, 0);
        assert_eq!(
            o,
            Outcome::Deleted {
                revision: 9,
                existed: false
            }
        );

        let (n, o) = view.run(10, &put("c", ""));
        assert_eq!(n, 0);
        assert!(matches!(o, Outcome::Rejected { .. }));

        view.run(
            11,
            &Command::SetTenantState {
                tenant: acme(),
                state: TenantState::Suspended,
            },
        );
        let (n, o) = view.run(12, &put("d", "v"));
        assert_eq!(n, 0);
        assert!(matches!(o, Outcome::Rejected { reason, .. } if reason.contains("suspended")));
    }

    // Goal: artifact versions count up per name; unchanged content adds no version; a delete
    // is a tombstone; the namespace figures follow.
    #[test]
    fn artifact_versions_count_up_and_skip_unchanged_content() {
        use crate::domain::ChunkRef;
        let mut view = MapView::default();
        let ns = TenantId::vendor();
        let name = ArtifactName::parse("app/app.bin").unwrap();
        let manifest = |b: u8, size: u32| Manifest {
            size: u64::from(size),
            blake3: [b; 32],
            chunks: vec![ChunkRef {
                hash: [b; 32],
                size,
            }],
            source_ms: 0,
        };
        let put = |m| Command::PutArtifact {
            namespace: ns.clone(),
            name: name.clone(),
            manifest: m,
        };
        let (_, o) = view.run(3, &put(manifest(1, 10)));
        assert_eq!(
            o,
            Outcome::Artifact {
                version: 1,
                revision: 3,
                changed: true
            }
        );
        let (n, o) = view.run(4, &put(manifest(1, 10)));
        assert_eq!(n, 0);
        assert_eq!(
            o,
            Outcome::Artifact {
                version: 1,
                revision: 3,
                changed: false
            }
        );
        let (_, o) = view.run(5, &put(manifest(2, 20)));
        assert_eq!(
            o,
            Outcome::Artifact {
                version: 2,
                revision: 5,
                changed: true
            }
        );
        assert_eq!(view.stats[&ns].artifact_bytes, 20);
        let del = Command::DeleteArtifact {
            namespace: ns.clone(),
            name: name.clone(),
        };
        let (_, o) = view.run(6, &del);
        assert_eq!(
            o,
            Outcome::Artifact {
                version: 3,
                revision: 6,
                changed: true
            }
        );
        assert_eq!(
            (view.stats[&ns].artifacts, view.stats[&ns].artifact_bytes),
            (0, 0)
        );
        let (n, _) = view.run(7, &del);
        assert_eq!(n, 0, "deleting a deleted artifact adds nothing");
        let mut bad = manifest(3, 10);
        bad.size = 11;
        assert!(matches!(view.run(8, &put(bad)).1, Outcome::Rejected { .. }));
        let other = Command::PutArtifact {
            namespace: TenantId::parse("nobody").unwrap(),
            name: name.clone(),
            manifest: manifest(4, 10),
        };
        assert!(matches!(view.run(9, &other).1, Outcome::Rejected { .. }));
    }

    // Goal: an ingest batch applied twice (an agent retrying) applies each change once; an
    // overlapping batch applies only the new tail; a bad batch changes nothing.
    #[test]
    fn ingest_is_idempotent_per_source_position() {
        let mut view = MapView::default();
        view.run(1, &Command::AddTenant { tenant: acme() });
        let source = SourceId::parse("crm").unwrap();
        let batch = |changes: Vec<Change>| Command::Ingest {
            tenant: acme(),
            source: source.clone(),
            changes,
        };
        let first = batch(vec![
            change("a", Some("1"), 1),
            change("a", Some("2"), 2),
            change("b", Some("x"), 3),
        ]);
        let (_, o) = view.run(5, &first);
        assert_eq!(
            o,
            Outcome::Ingested {
                revision: 5,
                applied: 3,
                duplicates: 0,
                position: 3
            }
        );
        assert_eq!(view.stats[&acme()].versions, 3);
        assert_eq!(view.stats[&acme()].last_source_ms, 1_500);
        assert_eq!(view.stats[&acme()].last_lag_ms, 5_000 - 1_500);

        let (n, o) = view.run(6, &first);
        assert_eq!(n, 0, "a retried batch writes nothing");
        assert_eq!(
            o,
            Outcome::Ingested {
                revision: 5,
                applied: 0,
                duplicates: 3,
                position: 3
            }
        );

        let (_, o) = view.run(
            7,
            &batch(vec![change("b", Some("y"), 3), change("b", None, 4)]),
        );
        assert_eq!(
            o,
            Outcome::Ingested {
                revision: 7,
                applied: 1,
                duplicates: 1,
                position: 4
            }
        );
        assert!(view.records[&path("b")].is_tombstone());
        assert_eq!(view.stats[&acme()].records, 1);

        for bad in [
            batch(vec![change("c", Some("1"), 9), change("c", Some("2"), 9)]),
            batch(vec![change("c", Some(""), 10)]),
            batch(Vec::new()),
            Command::Ingest {
                tenant: TenantId::parse("nobody").unwrap(),
                source: source.clone(),
                changes: vec![change("c", Some("1"), 10)],
            },
        ] {
            let (n, o) = view.run(8, &bad);
            assert_eq!(n, 0);
            assert!(matches!(o, Outcome::Rejected { .. }), "{o:?}");
        }
        assert_eq!(view.sources[&(acme(), source)].last_seq, 4);
    }
}
