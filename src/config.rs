//! One validated node configuration (TOML). Every field has a doc comment and, where a sensible
//! one exists, a default. Secrets are never inlined: the config names files holding them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::raft::{EscrowNode, NodeId};

/// Bootstrap sizes `cluster init` accepts: an odd number of voters that survives 1 or 2 failures.
pub const BOOTSTRAP_VOTERS_ALLOWED: [usize; 2] = [3, 5];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("config {path} is not valid for escrowd: {}", .cause.message())]
    Parse {
        path: PathBuf,
        cause: Box<toml::de::Error>,
    },
    #[error("config {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// Addresses this node listens on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// Client gRPC (TLS + credential): records, cluster operations.
    pub client: SocketAddr,
    /// Peer gRPC (mutual TLS with the cluster CA): Raft, snapshots, forwarding.
    pub raft: SocketAddr,
    /// HTTPS: /metrics, /healthz, /readyz.
    pub http: SocketAddr,
}

/// Addresses other nodes and clients use to reach this node (host:port; the host must be in
/// the node certificate's subject alternative names).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advertise {
    pub client: String,
    pub raft: String,
}

/// TLS files. The key file must be readable by its owner only.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// The cluster CA certificate (PEM): peers must present a certificate it issued.
    pub ca: PathBuf,
    /// This node's certificate (PEM), valid for server and client authentication.
    pub cert: PathBuf,
    /// This node's private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// Client credentials.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFiles {
    /// File holding the ops bearer token (mode 0600).
    pub ops_token_file: PathBuf,
    /// File holding a bearer token that reads `/metrics` and nothing else (mode 0600), for
    /// the monitoring system; without it only the ops token reads `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_token_file: Option<PathBuf>,
}

/// One member of the initial cluster, as `cluster init` bootstraps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitialMember {
    pub id: NodeId,
    pub raft: String,
    pub client: String,
}

/// Default of `raft.snapshot_every_log_bytes`.
pub const SNAPSHOT_EVERY_LOG_BYTES_DEFAULT: u64 = 1 << 30;
/// Least `raft.snapshot_every_log_bytes`: the log's size is an estimate that may run over by
/// its memtables' size (up to two of 16 MiB), so a bound near that would snapshot whenever the
/// memtables fill, whatever the log after the snapshot holds.
pub const SNAPSHOT_EVERY_LOG_BYTES_MIN: u64 = 64 << 20;
/// Default of `raft.log_bytes_kept_after_snapshot`.
pub const LOG_BYTES_KEPT_AFTER_SNAPSHOT_DEFAULT: u64 = 256 << 20;
/// Least `raft.log_bytes_kept_after_snapshot`: a value meant in MiB but written in bytes would
/// purge the log up to every snapshot, so any follower a little behind (or restarting) would
/// need a whole snapshot to catch up.
pub const LOG_BYTES_KEPT_AFTER_SNAPSHOT_MIN: u64 = 16 << 20;

/// Least `raft.snapshot_frame_wait_ms`. A frame counts once it has arrived whole, and frames
/// are 1 MiB, so the wait is a least transfer rate (1 MiB per wait): 10 s still passes a
/// 1 Mbit/s link; an abandoned transfer starts over from nothing.
pub const SNAPSHOT_FRAME_WAIT_MS_MIN: u64 = 10_000;

/// Raft timing and log compaction.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaftSettings {
    /// Leader heartbeat interval, ms.
    pub heartbeat_ms: u64,
    /// Election timeout lower bound, ms (must exceed the heartbeat).
    pub election_timeout_min_ms: u64,
    /// Election timeout upper bound, ms.
    pub election_timeout_max_ms: u64,
    /// Build a snapshot after this many applied entries since the last one.
    pub snapshot_every_entries: u64,
    /// Build a snapshot, too, once the log after the last one holds about this many bytes
    /// (checked every `workers::snapshots::CHECK_INTERVAL`): an entry is a batch of up to a
    /// few MiB, so a count of entries alone leaves the log's disk space unbounded.
    pub snapshot_every_log_bytes: u64,
    /// Log entries kept behind the snapshot for followers that are only a little behind.
    pub log_entries_kept_after_snapshot: u64,
    /// At most about this many bytes of those kept entries (in table files; checked every
    /// `workers::snapshots::CHECK_INTERVAL`): the older ones are purged too, and a follower
    /// further behind catches up through the snapshot. At least 16 MiB.
    pub log_bytes_kept_after_snapshot: u64,
    /// A snapshot stream being received is abandoned (and its files removed) when no frame
    /// arrives for this long, ms: a sender that stalls holds disk space and one of the
    /// node's few transfer slots. A frame (1 MiB) must cross the slowest link between two
    /// nodes within it. The sender likewise abandons a stream whose receiver takes no frame
    /// for this long (which includes the receiver syncing a finished file to disk). At least
    /// 10,000.
    pub snapshot_frame_wait_ms: u64,
}

impl Default for RaftSettings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 100,
            election_timeout_min_ms: 500,
            election_timeout_max_ms: 1000,
            snapshot_every_entries: 20_000,
            snapshot_every_log_bytes: SNAPSHOT_EVERY_LOG_BYTES_DEFAULT,
            log_entries_kept_after_snapshot: 5_000,
            log_bytes_kept_after_snapshot: LOG_BYTES_KEPT_AFTER_SNAPSHOT_DEFAULT,
            snapshot_frame_wait_ms: 60_000,
        }
    }
}

/// Mirroring: how the node judges freshness.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MirrorSettings {
    /// A namespace whose source has been silent longer than this (seconds) is flagged stale,
    /// in status and metrics, with a warning in the log: a vendor that silently stops
    /// mirroring is the classic escrow failure.
    pub stale_after_s: u64,
    /// Record versions are kept this many days; older ones are dropped, except each record's
    /// latest version (a record is never lost to retention, only its past).
    pub retention_days: u64,
}

impl Default for MirrorSettings {
    fn default() -> Self {
        Self {
            stale_after_s: 3600,
            retention_days: 730,
        }
    }
}

/// Integrity: the background scrubber.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntegritySettings {
    /// How fast the scrubber re-reads stored chunks, MB/s (it shares the disk with serving).
    pub scrub_mb_per_s: u64,
    /// Pause between two scrub rounds over every stored chunk, seconds.
    pub scrub_pause_s: u64,
}

impl Default for IntegritySettings {
    fn default() -> Self {
        Self {
            scrub_mb_per_s: 16,
            scrub_pause_s: 600,
        }
    }
}

/// Storage: how much disk a node keeps free.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageSettings {
    /// Bytes that stay free on the data directory's filesystem: while any voter has less,
    /// the cluster refuses writes that add data (RESOURCE_EXHAUSTED naming the node) instead
    /// of filling the disk until the node's Raft stops. 0 turns the guard off.
    pub reserve_bytes: u64,
}

/// The default reserve of a node: room for RocksDB's compactions and a few seconds of writes
/// after the last reading.
pub const STORAGE_RESERVE_BYTES_DEFAULT: u64 = 1 << 30;

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            reserve_bytes: STORAGE_RESERVE_BYTES_DEFAULT,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// A node's whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This node's id, ≥ 1, unique in the cluster and never reused.
    pub node_id: NodeId,
    /// Name shared by all nodes of one cluster (shown in status and metrics).
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// Where this node keeps its Raft log, state machine and snapshots.
    pub data_dir: PathBuf,
    pub listen: Listen,
    pub advertise: Advertise,
    pub tls: TlsFiles,
    pub auth: AuthFiles,
    /// Members `cluster init` bootstraps; the same list on every initial node. Empty on a node
    /// that joins later through `cluster add`.
    #[serde(default)]
    pub initial_members: Vec<InitialMember>,
    #[serde(default)]
    pub raft: RaftSettings,
    #[serde(default)]
    pub mirror: MirrorSettings,
    #[serde(default)]
    pub integrity: IntegritySettings,
    #[serde(default)]
    pub storage: StorageSettings,
    /// Log format: "human" or "json".
    #[serde(default)]
    pub log_format: LogFormat,
}

fn default_cluster_name() -> String {
    "escrow".into()
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
        let mut config: Config = toml::from_str(&text).map_err(|cause| ConfigError::Parse {
            path: path.to_path_buf(),
            cause: Box::new(cause),
        })?;
        config.resolve_paths(path);
        config.validate(path)?;
        Ok(config)
    }

    /// Makes relative paths (data dir, TLS files, token file) relative to the config file's
    /// directory, not to wherever the node was started from: started elsewhere, a voter would
    /// otherwise open a fresh, empty data dir and vote without its log.
    fn resolve_paths(&mut self, path: &Path) {
        // The directory the file is named in (a symlinked config's own directory, not its
        // target's), made absolute.
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        for p in [
            &mut self.data_dir,
            &mut self.tls.ca,
            &mut self.tls.cert,
            &mut self.tls.key,
            &mut self.auth.ops_token_file,
        ]
        .into_iter()
        .chain(self.auth.metrics_token_file.as_mut())
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        if self.node_id == 0 {
            return Err(invalid("node_id must be ≥ 1".into()));
        }
        crate::domain::TenantId::parse(&self.cluster_name)
            .map_err(|e| invalid(format!("cluster_name: {e}")))?;
        for addr in [&self.advertise.client, &self.advertise.raft] {
            validate_host_port(addr).map_err(|r| invalid(format!("advertise {addr:?}: {r}")))?;
        }
        let r = &self.raft;
        if r.heartbeat_ms == 0 || r.election_timeout_min_ms <= r.heartbeat_ms.saturating_mul(2) {
            return Err(invalid(
                "raft.election_timeout_min_ms must exceed twice raft.heartbeat_ms".into(),
            ));
        }
        if r.election_timeout_max_ms <= r.election_timeout_min_ms {
            return Err(invalid(
                "raft.election_timeout_max_ms must exceed raft.election_timeout_min_ms".into(),
            ));
        }
        if r.snapshot_every_entries == 0 {
            return Err(invalid("raft.snapshot_every_entries must be ≥ 1".into()));
        }
        if r.snapshot_every_log_bytes < SNAPSHOT_EVERY_LOG_BYTES_MIN {
            return Err(invalid(format!(
                "raft.snapshot_every_log_bytes must be ≥ {SNAPSHOT_EVERY_LOG_BYTES_MIN} (64 MiB)"
            )));
        }
        if r.log_bytes_kept_after_snapshot < LOG_BYTES_KEPT_AFTER_SNAPSHOT_MIN {
            return Err(invalid(format!(
                "raft.log_bytes_kept_after_snapshot must be ≥ {LOG_BYTES_KEPT_AFTER_SNAPSHOT_MIN} (16 MiB)"
            )));
        }
        if r.snapshot_frame_wait_ms < SNAPSHOT_FRAME_WAIT_MS_MIN {
            return Err(invalid(format!(
                "raft.snapshot_frame_wait_ms must be ≥ {SNAPSHOT_FRAME_WAIT_MS_MIN}"
            )));
        }
        if self.integrity.scrub_mb_per_s == 0 {
            return Err(invalid("integrity.scrub_mb_per_s must be ≥ 1".into()));
        }
        if self.mirror.retention_days == 0 {
            return Err(invalid("mirror.retention_days must be ≥ 1".into()));
        }
        if self.mirror.stale_after_s == 0 {
            return Err(invalid("mirror.stale_after_s must be ≥ 1".into()));
        }
        let mut ids = std::collections::BTreeSet::new();
        for m in &self.initial_members {
            if m.id == 0 || !ids.insert(m.id) {
                return Err(invalid(format!(
                    "initial_members: id {} is zero or listed twice",
                    m.id
                )));
            }
            validate_host_port(&m.raft)
                .map_err(|r| invalid(format!("initial member {}: {r}", m.id)))?;
            validate_host_port(&m.client)
                .map_err(|r| invalid(format!("initial member {}: {r}", m.id)))?;
        }
        if !self.initial_members.is_empty() && !ids.contains(&self.node_id) {
            return Err(invalid(
                "initial_members must include this node's own node_id".into(),
            ));
        }
        Ok(())
    }

    pub fn self_node(&self) -> EscrowNode {
        EscrowNode {
            raft_addr: self.advertise.raft.clone(),
            client_addr: self.advertise.client.clone(),
        }
    }
}

/// Checks `host:port` with a non-empty host and a port ≥ 1.
pub fn validate_host_port(addr: &str) -> Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| "expected host:port".to_string())?;
    // What a URI takes as its host without reading it differently: a DNS name or IPv4
    // address, or an IPv6 address in brackets (`[::1]:7411`, as `::1:7411` is ambiguous).
    let host_ok = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
        None => {
            !host.is_empty()
                && host.len() <= 253
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
        }
    };
    if !host_ok {
        return Err(format!(
            "host {host:?} is not a DNS name, an IPv4 address or an IPv6 address in brackets \
             (such as [::1])"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: an address is refused unless a URI reads its host and port as written, since it
    // is committed into the membership (`cluster add`) and dialled by every node.
    #[test]
    fn addresses_are_host_port_as_a_uri_reads_them() {
        for good in [
            "127.0.0.1:7411",
            "node-1.escrow.example:7411",
            "localhost:1",
            "[::1]:65535",
            "[fe80::1]:7410",
        ] {
            assert_eq!(validate_host_port(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("::1:7411", "in brackets"),
            ("a@b:7411", "not a DNS name"),
            ("host/path:7411", "not a DNS name"),
            ("ho st:7411", "not a DNS name"),
            ("[nope]:7411", "in brackets"),
            (":7411", "not a DNS name"),
            ("127.0.0.1", "host:port"),
            ("127.0.0.1:0", "from 1 to 65535"),
            ("127.0.0.1:65536", "from 1 to 65535"),
            ("127.0.0.1:x", "from 1 to 65535"),
        ] {
            let err = validate_host_port(bad).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    /// A dev node's config as `escrowd dev` writes it, loaded back.
    fn dev_config(dir: &Path) -> (Config, PathBuf) {
        let ports = crate::dev::NodePorts::dev(crate::dev::DEV_PORT_BASE, 1);
        let path =
            crate::dev::write_node_files(dir, 1, ports, &[], &RaftSettings::default()).unwrap();
        (Config::load(&path).unwrap(), path)
    }

    /// A `raft` byte bound (`key`, read by `field`) has `default`, takes `min` and refuses one
    /// byte less with a message naming the limit, from a struct and from the file (there
    /// written as `bad`, a value meant in MiB).
    fn assert_raft_minimum(
        key: &str,
        field: fn(&mut RaftSettings) -> &mut u64,
        default: u64,
        min: u64,
        bad: u64,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, path) = dev_config(dir.path());
        assert_eq!(*field(&mut config.raft), default);
        *field(&mut config.raft) = min;
        config.validate(&path).unwrap();
        *field(&mut config.raft) = min - 1;
        let err = config.validate(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("raft.{key} must be ≥ {min}")),
            "{err}"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let (from, to) = (format!("{key} = {default}\n"), format!("{key} = {bad}\n"));
        assert!(text.contains(&from), "{text}");
        std::fs::write(&path, text.replace(&from, &to)).unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.contains(&format!("raft.{key} must be ≥ {min}")),
            "{err}"
        );
    }

    #[test]
    fn raft_bounds_under_their_minimums_are_refused_with_the_limit() {
        assert_raft_minimum(
            "snapshot_every_log_bytes",
            |r| &mut r.snapshot_every_log_bytes,
            SNAPSHOT_EVERY_LOG_BYTES_DEFAULT,
            SNAPSHOT_EVERY_LOG_BYTES_MIN,
            1024,
        );
        assert_raft_minimum(
            "log_bytes_kept_after_snapshot",
            |r| &mut r.log_bytes_kept_after_snapshot,
            LOG_BYTES_KEPT_AFTER_SNAPSHOT_DEFAULT,
            LOG_BYTES_KEPT_AFTER_SNAPSHOT_MIN,
            256,
        );
        assert_raft_minimum(
            "snapshot_frame_wait_ms",
            |r| &mut r.snapshot_frame_wait_ms,
            RaftSettings::default().snapshot_frame_wait_ms,
            SNAPSHOT_FRAME_WAIT_MS_MIN,
            10,
        );
    }

    /// The commented example configs in `cluster/` are valid configs, with the defaults.
    #[test]
    fn the_example_cluster_configs_load() {
        for n in 1..=3 {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("cluster/node{n}.toml"));
            let config = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
            let defaults = RaftSettings::default();
            assert_eq!(
                config.raft.snapshot_every_log_bytes,
                defaults.snapshot_every_log_bytes
            );
            assert_eq!(
                config.raft.snapshot_every_entries,
                defaults.snapshot_every_entries
            );
            assert_eq!(
                config.raft.log_entries_kept_after_snapshot,
                defaults.log_entries_kept_after_snapshot
            );
            assert_eq!(
                config.raft.log_bytes_kept_after_snapshot,
                defaults.log_bytes_kept_after_snapshot
            );
            assert_eq!(
                config.raft.snapshot_frame_wait_ms,
                defaults.snapshot_frame_wait_ms
            );
            assert_eq!(config.storage.reserve_bytes, STORAGE_RESERVE_BYTES_DEFAULT);
        }
    }

    // Goal: relative paths in a node config are taken from the config file's directory, so a
    // node started from anywhere opens its own data dir and keys; absolute ones stay.
    #[test]
    fn relative_paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, _) = dev_config(dir.path());
        let ca = config.tls.ca.clone();
        config.data_dir = "data".into();
        config.tls.cert = "pki/node.pem".into();
        config.tls.key = "../keys/node.key".into();
        config.auth.ops_token_file = "secrets/ops.token".into();
        config.auth.metrics_token_file = Some("secrets/metrics.token".into());
        let etc = dir.path().join("etc");
        std::fs::create_dir(&etc).unwrap();
        let path = etc.join("node.toml");
        std::fs::write(&path, toml::to_string_pretty(&config).unwrap()).unwrap();
        let base = std::path::absolute(&etc).unwrap();
        let loaded = Config::load(&path).unwrap();
        assert_eq!(loaded.data_dir, base.join("data"));
        assert_eq!(loaded.tls.cert, base.join("pki/node.pem"));
        assert_eq!(loaded.tls.key, base.join("../keys/node.key"));
        assert_eq!(loaded.auth.ops_token_file, base.join("secrets/ops.token"));
        assert_eq!(
            loaded.auth.metrics_token_file,
            Some(base.join("secrets/metrics.token"))
        );
        assert!(ca.is_absolute());
        assert_eq!(loaded.tls.ca, ca);
    }

    #[test]
    fn a_heartbeat_too_large_to_double_is_refused_not_overflowed() {
        let dir = tempfile::tempdir().unwrap();
        let (mut config, path) = dev_config(dir.path());
        config.raft.heartbeat_ms = u64::MAX;
        let err = config.validate(&path).unwrap_err().to_string();
        assert!(err.contains("election_timeout_min_ms"), "{err}");
    }
}
