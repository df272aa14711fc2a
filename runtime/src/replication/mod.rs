//! Site → enterprise replication over gRPC (`ferrotwin.v1.ReplicationService`).
//!
//! A site's store stages what each flush made durable in its outbox (`store::outbox`);
//! `site::run_sender` streams the outbox to the enterprise and trims it up to each ack. The
//! enterprise (`enterprise::EnterpriseReceiver`) applies batches to its mirror twins (the same
//! paths and ids: they come from the same plant spec), dedupes by site seq and site event
//! seq, and acks a seq only once the flush holding its effects and its cursor is on disk.

pub mod enterprise;
pub mod site;

use serde::Deserialize;

pub use crate::store::outbox::HistoryPolicy;

/// Version of the replication protocol this build speaks (`SiteHello.protocol_version`).
pub const PROTOCOL_VERSION: u32 = 1;

/// `[replication]` of a site config: where this site replicates to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteReplication {
    /// The enterprise runtime's gRPC endpoint, e.g. `http://10.0.0.5:50051`.
    pub enterprise: String,
    /// The site of the plant spec this runtime runs (default: the spec's only site).
    #[serde(default)]
    pub site: Option<String>,
    /// Outbox limit; past it twin deltas are compacted into a full snapshot, then the oldest
    /// events are dropped (and reported).
    #[serde(default = "defaults::max_outbox_bytes")]
    pub max_outbox_bytes: u64,
    /// Batches in flight without an ack; the sender waits beyond.
    #[serde(default = "defaults::max_unacked_batches")]
    pub max_unacked_batches: usize,
    /// What of a sensor's history goes to the enterprise, by default. Twin state and events
    /// always go.
    #[serde(default)]
    pub history: HistoryPolicy,
    /// Per machine type (the types of the plant spec): its sensors' policy.
    #[serde(default)]
    pub history_by_type: std::collections::BTreeMap<String, HistoryPolicy>,
    /// Window of `aggregated`.
    #[serde(default = "defaults::aggregate_window_ms")]
    pub aggregate_window_ms: i64,
    /// Reconnect back-off, first and longest delay.
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
}

/// `[enterprise]` of an enterprise config: which sites it accepts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnterpriseRole {
    /// Site paths (`acme/berlin`); a site not listed is refused with PERMISSION_DENIED.
    pub accept: Vec<String>,
}

mod defaults {
    pub fn aggregate_window_ms() -> i64 {
        60_000
    }
    pub fn max_outbox_bytes() -> u64 {
        1 << 30
    }
    pub fn max_unacked_batches() -> usize {
        64
    }
    pub fn reconnect_min_ms() -> u64 {
        200
    }
    pub fn reconnect_max_ms() -> u64 {
        10_000
    }
}

impl SiteReplication {
    pub fn new(enterprise: impl Into<String>) -> SiteReplication {
        SiteReplication {
            enterprise: enterprise.into(),
            site: None,
            max_outbox_bytes: defaults::max_outbox_bytes(),
            max_unacked_batches: defaults::max_unacked_batches(),
            history: HistoryPolicy::default(),
            history_by_type: Default::default(),
            aggregate_window_ms: defaults::aggregate_window_ms(),
            reconnect_min_ms: defaults::reconnect_min_ms(),
            reconnect_max_ms: defaults::reconnect_max_ms(),
        }
    }
}

/// `meta` keys of the enterprise's per-site cursors.
pub(crate) fn cursor_key(site: &str) -> Vec<u8> {
    format!("repl/{site}/seq").into_bytes()
}

pub(crate) fn event_cursor_key(site: &str) -> Vec<u8> {
    format!("repl/{site}/event").into_bytes()
}

pub(crate) fn u64_of(v: Option<Vec<u8>>) -> u64 {
    v.as_deref().and_then(crate::store::seq_of).unwrap_or(0)
}
