//! End-to-end tests: a real runtime (actors, sled store, gRPC over loopback) driven from
//! outside. One test binary with modules.

mod actions;
mod alarms;
mod api;
mod apply;
mod browser;
mod common;
mod hostile;
mod http;
mod import;
mod inference;
mod ingest;
mod metrics;
mod plc;
mod recovery;
mod replication;
mod security;
mod supervision;
