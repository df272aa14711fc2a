//! The tools around the runtime library, behind the `ferrotwin` binary: the CLI client of the
//! gRPC API, the demo (simulator + two sites + an enterprise), the detectors' eval against the
//! simulator's labels, the benchmarks, and what they share (feeds from the simulator's servers,
//! a TCP relay that can cut a link). Everything here drives a runtime only through
//! `ferrotwin_runtime`'s public surface.

pub mod bench;
pub mod client;
pub mod demo;
pub mod eval;
pub mod feeds;
pub mod import;
pub mod logging;
pub mod pki;
pub mod relay;
pub mod run;
pub mod signals;
