//! The ferrotwin runtime: twin actors and supervision, registry, ingest router, store,
//! gRPC API, HTTP server (web browser, JSON API), CLI client, demo and benchmark.

pub mod bench;
pub mod bench_http;
pub mod bench_plc;
pub mod bench_replication;
pub mod cli;
pub mod config;
pub mod connections;
pub mod demo;
pub mod eval;
pub mod feeds;
pub mod grpc;
pub mod http;
pub mod inference;
pub mod metrics;
pub mod registry;
pub mod relay;
pub mod replication;
pub mod router;
pub mod runtime;
pub mod select;
pub mod store;
pub mod twin;
pub mod watch;

pub use runtime::{IngestOptions, Runtime, RuntimeError, RuntimeOptions};
