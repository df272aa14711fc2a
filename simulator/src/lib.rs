//! ferrotwin plant simulator: generates plant specs of any size, runs the plant in simulated
//! time (machine states, part counters, physics-like sensor signals, random faults with
//! ground-truth labels) and drives the readings into an `IngestSink`.
//!
//! Depends on `ferrotwin-models` only: no async runtime, no I/O except in the binary.

pub mod driver;
pub mod generate;
pub mod model;
