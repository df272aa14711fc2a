//! The ferrotwin domain: ISA-95 assets, plant spec, readings, events, alarms, OEE and
//! roll-ups. Pure code: no I/O, no clock, no async. Time is always passed in.

pub mod alarm;
pub mod asset;
pub mod detect;
pub mod event;
pub mod glob;
pub mod oee;
pub mod query;
pub mod reading;
pub mod rollup;
pub mod spec;
pub mod stats;
pub mod value;

pub use asset::{AssetId, AssetPath, Level, PathError};
pub use event::{Event, EventKind, Severity};
pub use reading::{
    IngestSink, Property, PushBack, PushBackReason, Reading, RecordingSink, RejectReason,
};
pub use value::{Quality, QualityCode, QualityReason, Timestamp, Value, ValueType};
