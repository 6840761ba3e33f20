//! Prometheus metrics, refreshed from openraft's metrics channel.

use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use openraft::ServerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::raft::{EscrowNode, NodeId};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FollowerLabel {
    pub follower: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NamespaceLabel {
    pub namespace: String,
}

type F64Gauge = Gauge<f64, AtomicU64>;

/// A count or size as an integer gauge's value (Prometheus gauges are i64; larger saturates).
pub fn gauge_value(v: u64) -> i64 {
    v.min(i64::MAX as u64) as i64
}

/// Per-namespace mirror figures (a tenant or `vendor`), refreshed by the freshness worker.
#[derive(Default)]
pub struct NamespaceMetrics {
    pub records: Family<NamespaceLabel, Gauge>,
    pub record_bytes: Family<NamespaceLabel, Gauge>,
    pub versions: Family<NamespaceLabel, Gauge>,
    pub last_source_timestamp_seconds: Family<NamespaceLabel, F64Gauge>,
    pub last_commit_timestamp_seconds: Family<NamespaceLabel, F64Gauge>,
    pub lag_seconds: Family<NamespaceLabel, F64Gauge>,
    pub silent_seconds: Family<NamespaceLabel, F64Gauge>,
    pub stale: Family<NamespaceLabel, Gauge>,
}

impl NamespaceMetrics {
    /// Sets one namespace's gauges from its freshness report.
    pub fn set(&self, namespace: &str, f: &crate::pb::Freshness) {
        let l = NamespaceLabel {
            namespace: namespace.to_string(),
        };
        let i = gauge_value;
        let s = |ms: u64| ms as f64 / 1000.0;
        self.records.get_or_create(&l).set(i(f.records));
        self.record_bytes.get_or_create(&l).set(i(f.record_bytes));
        self.versions.get_or_create(&l).set(i(f.versions));
        self.last_source_timestamp_seconds
            .get_or_create(&l)
            .set(s(f.last_source_ms));
        self.last_commit_timestamp_seconds
            .get_or_create(&l)
            .set(s(f.last_commit_ms));
        self.lag_seconds.get_or_create(&l).set(s(f.lag_ms));
        self.silent_seconds.get_or_create(&l).set(s(f.silent_ms));
        self.stale.get_or_create(&l).set(f.stale as i64);
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "namespace_records",
            "Live records held per namespace",
            self.records.clone(),
        );
        registry.register(
            "namespace_record_bytes",
            "Bytes of live record values per namespace",
            self.record_bytes.clone(),
        );
        registry.register(
            "namespace_versions",
            "Record versions ever written per namespace (tombstones included)",
            self.versions.clone(),
        );
        registry.register(
            "namespace_last_source_timestamp_seconds",
            "Newest source time a mirrored change carried (0: never)",
            self.last_source_timestamp_seconds.clone(),
        );
        registry.register(
            "namespace_last_commit_timestamp_seconds",
            "Leader time of the last committed change (0: never)",
            self.last_commit_timestamp_seconds.clone(),
        );
        registry.register(
            "namespace_lag_seconds",
            "Commit time minus source time of the last mirrored batch",
            self.lag_seconds.clone(),
        );
        registry.register(
            "namespace_silent_seconds",
            "How long the namespace's source has been silent",
            self.silent_seconds.clone(),
        );
        registry.register(
            "namespace_stale",
            "1 when the source has been silent past mirror.stale_after_s (or never mirrored)",
            self.stale.clone(),
        );
    }
}

/// All node metrics. Gauges are set by [`Metrics::update`] on every Raft metrics change.
pub struct Metrics {
    registry: Mutex<Registry>,
    pub term: Gauge,
    pub leader_id: Gauge,
    pub is_leader: Gauge,
    pub last_log_index: Gauge,
    pub commit_index: Gauge<u64, AtomicU64>,
    pub applied_index: Gauge,
    pub snapshot_index: Gauge,
    pub purged_index: Gauge,
    pub voters: Gauge,
    pub replication_lag_entries: Family<FollowerLabel, Gauge>,
    pub commit_latency_seconds: Histogram,
    pub namespaces: NamespaceMetrics,
    pub chunks_missing: Gauge,
    pub chunks_repaired: Counter,
    pub scrub_rounds: Counter,
    pub disk_free_bytes: Gauge,
    pub writes_refused_low_disk: Gauge,
}

impl Metrics {
    /// The node's metrics; `chunks_corrupt_found` is the chunk store's own counter, exported
    /// as is.
    pub fn new(node_id: NodeId, chunks_corrupt_found: &Counter) -> Self {
        let mut registry = Registry::with_prefix_and_labels(
            "escrow",
            [(
                std::borrow::Cow::Borrowed("node"),
                std::borrow::Cow::Owned(node_id.to_string()),
            )]
            .into_iter(),
        );
        let m = Self {
            registry: Mutex::new(Registry::default()),
            term: Gauge::default(),
            leader_id: Gauge::default(),
            is_leader: Gauge::default(),
            last_log_index: Gauge::default(),
            commit_index: Gauge::default(),
            applied_index: Gauge::default(),
            snapshot_index: Gauge::default(),
            purged_index: Gauge::default(),
            voters: Gauge::default(),
            replication_lag_entries: Family::default(),
            // 100 µs .. ~6.5 s
            commit_latency_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 17)),
            namespaces: NamespaceMetrics::default(),
            chunks_missing: Gauge::default(),
            chunks_repaired: Counter::default(),
            scrub_rounds: Counter::default(),
            disk_free_bytes: Gauge::default(),
            writes_refused_low_disk: Gauge::default(),
        };
        registry.register(
            "disk_free_bytes",
            "Bytes free on this node's data directory (the least, with the chunk store's); 0 while it cannot be read",
            m.disk_free_bytes.clone(),
        );
        registry.register(
            "writes_refused_low_disk",
            "1 while this node refuses writes that add data because a voter's free disk \
             space is under its reserve (storage.reserve_bytes)",
            m.writes_refused_low_disk.clone(),
        );
        registry.register(
            "chunks_repaired",
            "Corrupt chunk copies the scrubber replaced with a verified copy from a peer",
            m.chunks_repaired.clone(),
        );
        registry.register(
            "scrub_rounds",
            "Scrub rounds over every stored chunk completed since start",
            m.scrub_rounds.clone(),
        );
        registry.register(
            "chunks_missing",
            "Referenced chunks this node does not hold yet (after the last sync pass)",
            m.chunks_missing.clone(),
        );
        registry.register(
            "chunks_corrupt_found",
            "Chunk copies found corrupt and quarantined since start",
            chunks_corrupt_found.clone(),
        );
        m.namespaces.register(&mut registry);
        registry.register("raft_term", "Current Raft term", m.term.clone());
        registry.register(
            "raft_leader_id",
            "Leader node id as seen by this node (0: none)",
            m.leader_id.clone(),
        );
        registry.register(
            "raft_is_leader",
            "1 when this node is the leader",
            m.is_leader.clone(),
        );
        registry.register(
            "raft_last_log_index",
            "Index of the last log entry",
            m.last_log_index.clone(),
        );
        registry.register(
            "raft_commit_index",
            "Highest index known committed",
            m.commit_index.clone(),
        );
        registry.register(
            "raft_applied_index",
            "Highest index applied to the state machine",
            m.applied_index.clone(),
        );
        registry.register(
            "raft_snapshot_index",
            "Index covered by the current snapshot",
            m.snapshot_index.clone(),
        );
        registry.register(
            "raft_purged_index",
            "Highest purged log index",
            m.purged_index.clone(),
        );
        registry.register(
            "raft_voters",
            "Voters in the current membership",
            m.voters.clone(),
        );
        registry.register(
            "raft_replication_lag_entries",
            "Leader only: entries each follower is behind the leader's last log index",
            m.replication_lag_entries.clone(),
        );
        registry.register(
            "raft_commit_latency_seconds",
            "Time from proposal to commit and apply, on the node that proposed",
            m.commit_latency_seconds.clone(),
        );
        *m.registry.lock().expect("lock") = registry;
        m
    }

    pub fn update(
        &self,
        node_id: NodeId,
        r: &openraft::RaftMetrics<NodeId, EscrowNode>,
        committed: u64,
    ) {
        let i = gauge_value;
        self.term.set(i(r.current_term));
        self.leader_id.set(i(r.current_leader.unwrap_or(0)));
        self.is_leader
            .set((r.state == ServerState::Leader && r.current_leader == Some(node_id)) as i64);
        let last = r.last_log_index.unwrap_or(0);
        self.last_log_index.set(i(last));
        self.commit_index.set(committed);
        self.applied_index
            .set(i(r.last_applied.map(|l| l.index).unwrap_or(0)));
        self.snapshot_index
            .set(i(r.snapshot.map(|l| l.index).unwrap_or(0)));
        self.purged_index
            .set(i(r.purged.map(|l| l.index).unwrap_or(0)));
        self.voters
            .set(r.membership_config.membership().voter_ids().count() as i64);
        self.replication_lag_entries.clear();
        if let Some(rep) = &r.replication {
            for (id, matched) in rep {
                if *id == node_id {
                    continue;
                }
                let m = matched.map(|l| l.index).unwrap_or(0);
                self.replication_lag_entries
                    .get_or_create(&FollowerLabel {
                        follower: id.to_string(),
                    })
                    .set(i(last.saturating_sub(m)));
            }
        }
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("lock");
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
