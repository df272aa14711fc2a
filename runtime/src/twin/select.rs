//! Selecting twins: the query language's `Subject` over a twin's published snapshot.
//!
//! Fields: `path`, `name`, `level`, `type`, `quality` (good/uncertain/bad), `stale`,
//! `value`, `unit`, `kind`, `rejected`, `restarts`; `alarm` (active/returned/normal),
//! `alarms` (active count), `unacked`, `severity` (worst active: info..critical);
//! machines: `state`, `oee`, `availability`, `performance`, `good_count`, `scrap_count`;
//! every level above sensors: `machines`, `running`, `sensors`, `throughput`, `mean_oee`,
//! `worst_health`, `anomalies`; local inference: `anomaly_score`, `anomalous` (sensors and
//! machines), `health`, `rul_hours`, `model_score` (machines).
//! On a machine, any other name is looked up as one of its sensors: `temp > 80`.

use std::borrow::Cow;
use std::sync::Arc;

use ferrotwin_models::alarm::AlarmState;
use ferrotwin_models::query::{FieldKind, FieldValue, Schema, Subject};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{QualityCode, QualityReason, Severity};

use crate::core::{TwinSnapshot, TwinState};
use crate::registry::{Registry, TwinEntry};

pub struct TwinSubject<'a> {
    pub entry: &'a TwinEntry,
    pub snap: Arc<TwinSnapshot>,
    pub registry: &'a Registry,
}

fn quality_word(c: QualityCode) -> &'static str {
    match c {
        QualityCode::Good => "good",
        QualityCode::Uncertain => "uncertain",
        QualityCode::Bad => "bad",
    }
}

impl TwinSubject<'_> {
    fn alarm_word(&self) -> &'static str {
        match &self.snap.state {
            TwinState::Sensor(s) => {
                if s.alarms.iter().any(|a| a.state.is_active()) {
                    "active"
                } else if s
                    .alarms
                    .iter()
                    .any(|a| a.state == AlarmState::ReturnedUnacked)
                {
                    "returned"
                } else {
                    "normal"
                }
            }
            _ => {
                let r = self.snap.rollup(&self.entry.def.kind);
                if r.active_alarms() > 0 {
                    "active"
                } else if r.unacked_alarms > 0 {
                    "returned"
                } else {
                    "normal"
                }
            }
        }
    }
}

impl Subject for TwinSubject<'_> {
    fn field(&self, name: &str) -> Option<FieldValue<'_>> {
        let text = |s: &'static str| Some(FieldValue::Text(Cow::Borrowed(s)));
        let num = |v: f64| Some(FieldValue::Num(v));
        let kind = &self.entry.def.kind;
        let rollup = self.snap.rollup(kind);
        match name {
            "path" => return Some(FieldValue::Text(Cow::Borrowed(self.entry.path().as_str()))),
            "name" => return Some(FieldValue::Text(Cow::Borrowed(self.entry.path().name()))),
            "level" => return text(self.entry.level().as_str()),
            "type" => return Some(FieldValue::Text(Cow::Borrowed(kind.type_name()))),
            "restarts" => return num(f64::from(self.snap.restarts)),
            "alarm" => return text(self.alarm_word()),
            "alarms" => return num(f64::from(rollup.active_alarms())),
            "unacked" => return num(f64::from(rollup.unacked_alarms)),
            "severity" => {
                return rollup
                    .worst_alarm()
                    .map(|s| FieldValue::Num(s.index() as f64));
            }
            "quality" => return text(quality_word(rollup.worst_quality)),
            _ => {}
        }
        match (&self.snap.state, kind) {
            (TwinState::Sensor(s), AssetKind::Sensor { spec, .. }) => match name {
                "value" => s.value.map(|v| FieldValue::Num(v.as_f64())),
                "unit" => Some(FieldValue::Text(Cow::Borrowed(spec.unit.as_str()))),
                "kind" => text(spec.kind.as_str()),
                "stale" => Some(FieldValue::Bool(s.quality.reason == QualityReason::Stale)),
                "rejected" => num(s.rejected as f64),
                "anomaly_score" => s.anomaly_score.map(FieldValue::Num),
                "anomalous" => Some(FieldValue::Bool(s.anomalous)),
                _ => None,
            },
            (state, kind) => {
                let group = match name {
                    "machines" => Some(f64::from(rollup.machines)),
                    "running" => Some(f64::from(rollup.running)),
                    "sensors" => Some(f64::from(rollup.sensors)),
                    "throughput" => Some(rollup.throughput_per_h),
                    "mean_oee" => rollup.mean_oee(),
                    "worst_health" => rollup.worst_health,
                    "anomalies" => Some(f64::from(rollup.anomalies)),
                    _ => None,
                };
                if let Some(v) = group {
                    return num(v);
                }
                let (TwinState::Machine(m), AssetKind::Machine { spec, .. }) = (state, kind) else {
                    return None;
                };
                let o = m.tracker.oee(spec.ideal_cycle_ms);
                match name {
                    "state" => text(m.tracker.state.as_str()),
                    "oee" => num(o.oee),
                    "availability" => num(o.availability),
                    "performance" => num(o.performance),
                    "good_count" => num(m.tracker.good_parts as f64),
                    "scrap_count" => num(m.tracker.scrap_parts as f64),
                    "anomaly_score" => m.inference.anomaly_score.map(FieldValue::Num),
                    "anomalous" => Some(FieldValue::Bool(m.inference.anomalous)),
                    "health" => m.inference.health.map(FieldValue::Num),
                    "rul_hours" => m.inference.rul_hours.map(FieldValue::Num),
                    "model_score" => m.inference.model_score.map(FieldValue::Num),
                    sensor => {
                        let path = self.entry.path().child(sensor).ok()?;
                        let e = self.registry.by_path(&path)?;
                        match &e.snapshot().state {
                            TwinState::Sensor(s) => s.value.map(|v| FieldValue::Num(v.as_f64())),
                            _ => None,
                        }
                    }
                }
            }
        }
    }

    fn ordinal(&self, field: &str, word: &str) -> Option<f64> {
        match field {
            "severity" => Severity::parse(word).map(|s| s.index() as f64),
            _ => None,
        }
    }
}

/// The fields of `TwinSubject`, for `Query::check`: the built-in ones and the names of the
/// plant's sensors (a machine's sensors are fields of the machine).
pub struct TwinSchema {
    pub sensors: Arc<std::collections::HashSet<String>>,
}

const FIELDS: &[(&str, FieldKind)] = &[
    ("path", FieldKind::Text),
    ("name", FieldKind::Text),
    (
        "level",
        FieldKind::Words(&["enterprise", "site", "area", "line", "machine", "sensor"]),
    ),
    ("type", FieldKind::Text),
    ("restarts", FieldKind::Number),
    ("alarm", FieldKind::Words(&["active", "returned", "normal"])),
    ("alarms", FieldKind::Number),
    ("unacked", FieldKind::Number),
    (
        "severity",
        FieldKind::Ranked(&["info", "low", "medium", "high", "critical"]),
    ),
    ("quality", FieldKind::Words(&["good", "uncertain", "bad"])),
    ("value", FieldKind::Number),
    ("unit", FieldKind::Text),
    (
        "kind",
        FieldKind::Words(&[
            "generic",
            "temperature",
            "vibration",
            "speed",
            "power",
            "pressure",
            "flow",
        ]),
    ),
    ("stale", FieldKind::Bool),
    ("rejected", FieldKind::Number),
    ("anomaly_score", FieldKind::Number),
    ("anomalous", FieldKind::Bool),
    ("machines", FieldKind::Number),
    ("running", FieldKind::Number),
    ("sensors", FieldKind::Number),
    ("throughput", FieldKind::Number),
    ("mean_oee", FieldKind::Number),
    ("worst_health", FieldKind::Number),
    ("anomalies", FieldKind::Number),
    (
        "state",
        FieldKind::Words(&["idle", "running", "setup", "down"]),
    ),
    ("oee", FieldKind::Number),
    ("availability", FieldKind::Number),
    ("performance", FieldKind::Number),
    ("good_count", FieldKind::Number),
    ("scrap_count", FieldKind::Number),
    ("health", FieldKind::Number),
    ("rul_hours", FieldKind::Number),
    ("model_score", FieldKind::Number),
];

impl Schema for TwinSchema {
    fn kind_of(&self, field: &str) -> Option<FieldKind> {
        let builtin = FIELDS
            .iter()
            .find(|(name, _)| *name == field)
            .map(|(_, k)| *k);
        match (builtin, self.sensors.contains(field)) {
            // A sensor named like a sensor-only field (`kind`, `stale`): on a machine it is
            // the sensor's value, on a sensor the field; take any literal.
            (Some(k), true) if k != FieldKind::Number => Some(FieldKind::Text),
            (Some(k), _) => Some(k),
            (None, true) => Some(FieldKind::Number),
            (None, false) => None,
        }
    }

    fn known(&self) -> String {
        let mut names: Vec<&str> = FIELDS.iter().map(|(n, _)| *n).collect();
        names.push("or a sensor's name");
        names.join(", ")
    }
}

/// Whether `field` can rank query results (`order_by`): a number or bool field.
pub fn can_rank(schema: &TwinSchema, field: &str) -> bool {
    schema.sensors.contains(field)
        || matches!(
            schema.kind_of(field),
            Some(FieldKind::Number | FieldKind::Ranked(_) | FieldKind::Bool)
        )
}

#[cfg(test)]
mod schema_tests {
    use super::*;
    use ferrotwin_models::query::Query;

    fn check(q: &str) -> Result<(), String> {
        let schema = TwinSchema {
            sensors: Arc::new(["temp".to_owned()].into_iter().collect()),
        };
        Query::parse(q)
            .map_err(|e| e.to_string())?
            .check(&schema)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn nonsense_is_an_error_naming_the_field_and_sense_passes() {
        for ok in [
            "level = machine and oee < 0.6",
            "severity >= high",
            "temp > 80",
            "path ~ acme/** and quality != bad",
            "stale = true or state = running",
            "name = \"press-1\"",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, says) in [
            ("foo = bar", "unknown field \"foo\""),
            (
                "severity >= apocalypse",
                "severity takes a number or one of",
            ),
            ("value > NaN", "value is a number; NaN is not a number"),
            ("value > inf", "value is a number; inf is not a number"),
            (
                "quality = great",
                "quality is one of good, uncertain, bad; found great",
            ),
            ("level < machine", "compares by = or != only"),
            ("stale = 1", "stale is true or false"),
            ("oee ~ acme/**", "not a text field"),
            ("severity >= \"high\"", "severity is a number"),
        ] {
            let e = check(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("{} = 1", "x".repeat(3000));
        let e = check(&long).expect_err("long field");
        assert!(e.len() < 1200, "bounded: {} bytes", e.len());
    }
}
