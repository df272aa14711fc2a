//! Readings and the `IngestSink` boundary that adapters and the simulator push into.

use std::fmt;

use crate::asset::{AssetId, AssetPath};
use crate::value::{Quality, Timestamp, Value, ValueType};

/// Which property of a twin a reading sets. Sensor twins take `Value`; machine twins take
/// their state signal and cumulative part counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Property {
    Value,
    /// Machine state code, see `oee::MachineState::from_code`.
    State,
    /// Cumulative count of good parts (a PLC counter: it only grows, or resets to 0).
    GoodCount,
    /// Cumulative count of scrapped parts.
    ScrapCount,
}

impl Property {
    pub const ALL: [Property; 4] = [
        Property::Value,
        Property::State,
        Property::GoodCount,
        Property::ScrapCount,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Property::Value => "value",
            Property::State => "state",
            Property::GoodCount => "good_count",
            Property::ScrapCount => "scrap_count",
        }
    }

    pub fn parse(s: &str) -> Option<Property> {
        Property::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Small stable code used in storage keys.
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(c: u8) -> Option<Property> {
        Property::ALL.get(usize::from(c)).copied()
    }
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One value from a source. Fixed-size and `Copy`: a batch of readings is one allocation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub asset: AssetId,
    pub property: Property,
    pub value: Value,
    pub quality: Quality,
    pub source_ts: Timestamp,
}

impl Reading {
    pub fn good(asset: AssetId, property: Property, value: Value, source_ts: Timestamp) -> Reading {
        Reading {
            asset,
            property,
            value,
            quality: Quality::GOOD,
            source_ts,
        }
    }
}

/// What an asset takes: a sensor its value, of its declared type; a machine its state code
/// and its part counters, as integers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepts {
    Sensor(ValueType),
    Machine,
}

impl Reading {
    /// The one validation of a reading before a twin applies it, in this order: a property
    /// the asset has, a finite value, of the declared type and range, a source timestamp at
    /// most `max_future_skew_ms` ahead of `now`. The first failure is the reason.
    pub fn check(
        &self,
        asset: &AssetPath,
        accepts: Accepts,
        now: Timestamp,
        max_future_skew_ms: i64,
    ) -> Result<(), RejectReason> {
        let property = self.property;
        let wrong_type = |got: &'static str, declared: &'static str| RejectReason::WrongType {
            asset: asset.clone(),
            property,
            got,
            declared,
        };
        match (accepts, property) {
            (Accepts::Sensor(_), Property::Value) => {}
            (Accepts::Machine, Property::State | Property::GoodCount | Property::ScrapCount) => {}
            (Accepts::Sensor(_), _) | (Accepts::Machine, Property::Value) => {
                return Err(RejectReason::UnknownProperty {
                    asset: asset.clone(),
                    property,
                    level: match accepts {
                        Accepts::Sensor(_) => "sensor",
                        Accepts::Machine => "machine",
                    },
                });
            }
        }
        if !self.value.is_finite() {
            return Err(RejectReason::NotFinite {
                asset: asset.clone(),
                property,
            });
        }
        match accepts {
            Accepts::Sensor(declared) if !self.value.fits(declared) => {
                return Err(wrong_type(
                    self.value.value_type().as_str(),
                    declared.as_str(),
                ));
            }
            Accepts::Sensor(_) => {}
            Accepts::Machine => match (property, self.value) {
                // What a state value means is the machine type's (`MachineType::state_code`).
                (Property::State, _) => {}
                (_, Value::Int(n)) if n < 0 => {
                    return Err(wrong_type("negative count", "count >= 0"));
                }
                (_, Value::Int(_)) => {}
                (_, other) => return Err(wrong_type(other.value_type().as_str(), "int")),
            },
        }
        let ahead_ms = self.source_ts.millis_since(now);
        if ahead_ms > max_future_skew_ms {
            return Err(RejectReason::FromTheFuture {
                asset: asset.clone(),
                property,
                ts: self.source_ts,
                ahead_ms,
                max_skew_ms: max_future_skew_ms,
            });
        }
        Ok(())
    }
}

/// Why a reading was not applied. Counted per reason and raised as an event on the asset.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RejectReason {
    #[error("{asset}: {property}: value is not finite")]
    NotFinite {
        asset: AssetPath,
        property: Property,
    },
    #[error("{asset}: {property}: value type {got} does not fit declared type {declared}")]
    WrongType {
        asset: AssetPath,
        property: Property,
        got: &'static str,
        declared: &'static str,
    },
    #[error(
        "{asset}: {property}: source timestamp {ts} is {ahead_ms} ms in the future (allowed skew {max_skew_ms} ms)"
    )]
    FromTheFuture {
        asset: AssetPath,
        property: Property,
        ts: Timestamp,
        ahead_ms: i64,
        max_skew_ms: i64,
    },
    #[error("{asset}: property {property} does not exist on a {level}")]
    UnknownProperty {
        asset: AssetPath,
        property: Property,
        level: &'static str,
    },
}

impl RejectReason {
    /// Short label for metrics (a small fixed set).
    pub fn label(&self) -> &'static str {
        match self {
            RejectReason::NotFinite { .. } => "not_finite",
            RejectReason::WrongType { .. } => "wrong_type",
            RejectReason::FromTheFuture { .. } => "future_timestamp",
            RejectReason::UnknownProperty { .. } => "unknown_property",
        }
    }
}

/// The runtime did not take a batch. The batch comes back untouched.
#[derive(Debug)]
pub struct PushBack {
    pub batch: Vec<Reading>,
    pub why: PushBackReason,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushBackReason {
    /// In-flight work is at its limit: retry the same batch shortly (the source should pause
    /// polling its PLC rather than buffer without bound).
    Busy,
    /// The runtime is shutting down; do not retry.
    Closed,
}

/// Where adapters and the simulator's in-process driver push readings. Non-blocking: a sink
/// either takes the batch or hands it back with `PushBack`, it never waits or buffers without
/// bound. The runtime's ingest router implements it; so do test recorders.
pub trait IngestSink: Send + Sync + 'static {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack>;
}

/// A sink that keeps what it is given, up to a limit, for tests of sources.
#[derive(Debug, Default)]
pub struct RecordingSink {
    pub limit: usize,
    readings: std::sync::Mutex<Vec<Reading>>,
}

impl RecordingSink {
    pub fn with_limit(limit: usize) -> RecordingSink {
        RecordingSink {
            limit,
            readings: std::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn take(&self) -> Vec<Reading> {
        std::mem::take(
            &mut *self
                .readings
                .lock()
                .expect("recorder lock is never poisoned"),
        )
    }
}

impl IngestSink for RecordingSink {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        let mut r = self
            .readings
            .lock()
            .expect("recorder lock is never poisoned");
        if r.len() + batch.len() > self.limit {
            return Err(PushBack {
                batch,
                why: PushBackReason::Busy,
            });
        }
        r.extend_from_slice(&batch);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: Timestamp = Timestamp(1_700_000_000_000_000);

    fn check(
        accepts: Accepts,
        property: Property,
        value: Value,
        ahead_ms: i64,
    ) -> Option<&'static str> {
        let asset = AssetPath::parse("acme/plant/area/line/m1/temp").expect("path");
        let r = Reading::good(asset.id(), property, value, NOW.plus_ms(ahead_ms));
        r.check(&asset, accepts, NOW, 5_000)
            .err()
            .map(|e| e.label())
    }

    #[test]
    fn sensors_take_finite_values_of_their_type_from_the_near_past() {
        let float = Accepts::Sensor(ValueType::Float);
        assert_eq!(check(float, Property::Value, Value::Float(1.5), 0), None);
        assert_eq!(
            check(float, Property::Value, Value::Int(3), -60_000),
            None,
            "scaled int"
        );
        assert_eq!(
            check(float, Property::Value, Value::Float(f64::NAN), 0),
            Some("not_finite")
        );
        assert_eq!(
            check(float, Property::Value, Value::Bool(true), 0),
            Some("wrong_type")
        );
        assert_eq!(
            check(float, Property::Value, Value::Float(1.0), 5_001),
            Some("future_timestamp")
        );
        assert_eq!(
            check(float, Property::State, Value::Int(1), 0),
            Some("unknown_property")
        );
        let int = Accepts::Sensor(ValueType::Int);
        assert_eq!(
            check(int, Property::Value, Value::Float(1.0), 0),
            Some("wrong_type")
        );
    }

    #[test]
    fn machines_take_counts_as_integers_and_leave_states_to_their_type() {
        let m = Accepts::Machine;
        assert_eq!(check(m, Property::State, Value::Int(3), 0), None);
        // What a state value means is the machine type's (`MachineType::state_code`).
        assert_eq!(check(m, Property::State, Value::Bool(true), 0), None);
        assert_eq!(
            check(m, Property::State, Value::Float(f64::NAN), 0),
            Some("not_finite")
        );
        assert_eq!(check(m, Property::GoodCount, Value::Int(0), 0), None);
        assert_eq!(
            check(m, Property::ScrapCount, Value::Int(-1), 0),
            Some("wrong_type")
        );
        assert_eq!(
            check(m, Property::GoodCount, Value::Float(2.0), 0),
            Some("wrong_type")
        );
        assert_eq!(
            check(m, Property::State, Value::Float(f64::NAN), 0),
            Some("not_finite")
        );
        assert_eq!(
            check(m, Property::Value, Value::Float(1.0), 0),
            Some("unknown_property")
        );
        assert_eq!(
            check(m, Property::State, Value::Int(1), 10_000),
            Some("future_timestamp")
        );
    }
}
