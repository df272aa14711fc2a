//! The ferrotwin runtime library: a running site or enterprise (twin actors and their
//! supervision, registry, ingest router, store, replication), served over gRPC and HTTP.
//!
//! The public surface is a small façade: start and stop a `Runtime`, its configuration, what
//! it counts, and the API it serves. Everything else is private and layered bottom-up (see
//! `LAYERS` and ARCHITECTURE.md); tests that need to reach inside use `testing`.

// Layer 0: shared plain types and the users' models, importing nothing of this crate.
mod core;
mod inference;
pub mod security;
pub mod telemetry;
// 1
mod registry;
// 2
mod store;
mod watch;
// 3
mod router;
mod twin;
// 4
mod connections;
mod replication;
// 5
mod apply;
// 6
mod api;
// 7: the edges
mod grpc;
mod http;
// 8: wiring
mod runtime;
// 9: the config file that becomes `RuntimeOptions`, and what tests may reach
pub mod config;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(test)]
mod layers;

/// The modules of this crate, bottom layer first. A module may import only modules of
/// lower layers (`layers::no_module_imports_a_higher_layer` checks every `crate::` path).
pub const LAYERS: &[&[&str]] = &[
    &["core", "inference", "security", "telemetry"],
    &["registry"],
    &["store", "watch"],
    &["router", "twin"],
    &["connections", "replication"],
    &["apply"],
    &["api"],
    &["grpc", "http"],
    &["runtime"],
    &["config", "testing"],
];

/// The metric contract: every family of `/metrics` and of the OTLP export.
pub use api::prometheus::FAMILIES as METRIC_FAMILIES;
pub use api::{ApiError, ErrorCode, TwinApi, names};

/// The API's limits per client and per request.
pub mod api_limits {
    pub use crate::api::{
        MAX_COMMENT_BYTES, MAX_NAME_BYTES, MAX_SHELVE_MS, MAX_STREAMS_PER_CLIENT, MAX_WATCHERS,
    };
}
pub use core::{
    Credits, MachineInference, MachineSnap, Metrics, SensorSnap, TwinSettings, TwinSnapshot,
    TwinState,
};
pub use inference::{ModelError, ModelWindow, OnnxModel};
pub use replication::{EnterpriseRole, HistoryPolicy, SiteReplication, SiteTls};
pub use runtime::{IngestOptions, Runtime, RuntimeError, RuntimeOptions};
pub use store::outbox::OutboxLag;
pub use store::{EventFilter, StoreConfig, StoreError, StoreStats};
pub use watch::{Change, Watcher};
