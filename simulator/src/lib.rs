//! ferrotwin plant simulator: generates plant specs of any size, runs the plant in simulated
//! time (machine states, part counters, physics-like sensor signals, random faults with
//! ground-truth labels) and drives the readings into an `IngestSink`.
//!
//! Depends on `ferrotwin-models` only: no async runtime. File I/O only where a file is the
//! point: `scenario::Scenario::load`, `labels` and `run`.

pub mod driver;
pub mod generate;
pub mod labels;
pub mod model;
pub mod run;
pub mod scenario;
