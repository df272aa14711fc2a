//! The ferrotwin domain: ISA-95 assets, plant spec, readings, events, alarms, OEE and
//! roll-ups. Pure code: no I/O, no async, and no clock read: time is always passed in
//! (`Timestamp::now` is defined here for the crates above, never called here).

pub mod alarm;
pub mod asset;
pub mod change;
pub mod detect;
pub mod event;
pub mod glob;
pub mod oee;
pub mod query;
pub mod reading;
pub mod rollup;
pub mod rule;
pub mod spec;
pub mod stats;
pub mod value;

pub use asset::{AssetId, AssetPath, Level, PathError};
pub use event::{EpisodeEdge, Event, EventKind, Severity};
pub use reading::{
    Accepts, IngestSink, Property, PushBack, PushBackReason, Reading, RecordingSink, RejectReason,
};
pub use value::{Quality, QualityCode, QualityReason, Timestamp, Value, ValueType};
