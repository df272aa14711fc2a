//! ferrotwin plant simulator: generates plant specs of any size, runs the plant in simulated
//! time (machine states, part counters, physics-like sensor signals, random faults with
//! ground-truth labels) and drives the readings into an `IngestSink`.
//!
//! Serves the plant on Modbus TCP (`mapping`, `modbus`, `serve`): one tokio-modbus server per
//! line; and on MQTT: JSON on ISA-95 topics (`mqtt`) and Sparkplug B (`sparkplug`, one edge
//! node per line), to a given broker or an embedded rumqttd, taking speed commands back.
//! Depends on `ferrotwin-models` and, for the Sparkplug B messages, `ferrotwin-proto` among our
//! crates (never on the runtime); tokio is used only by `modbus`, `mqtt`, `sparkplug` and `serve`, the model and driver stay synchronous. File I/O only
//! where a file is the point: `scenario::Scenario::load`, `labels`, `run` and `serve`.

pub mod driver;
pub mod generate;
pub mod labels;
pub mod mapping;
pub mod modbus;
pub mod model;
pub mod mqtt;
pub mod opcua;
pub mod run;
pub mod scenario;
pub mod score;
pub mod serve;
pub mod sparkplug;
