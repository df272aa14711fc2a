//! Plant spec: asset types and the instance tree, in TOML, validated once.
//!
//! ```toml
//! version = 1
//! enterprise = "acme"
//!
//! [machine_types.press]
//! ideal_cycle_ms = 4000
//! [[machine_types.press.sensors]]
//! name = "force"
//! unit = "kN"
//! [[machine_types.press.sensors]]
//! name = "temp"
//! unit = "degC"
//! min = 0.0
//! max = 150.0
//! period_ms = 1000
//! alarms = [{ name = "high", kind = "high", limit = 90.0, deadband = 2.0, severity = "high" }]
//! # Optional: anomaly detector settings, any subset (the rest keep their defaults).
//! detect = { level_z = 10.0, spike = false }
//! # Optional: what a write may set. A type that lists setpoints takes writes to these only,
//! # of their type and within their range, checked before any PLC sees them.
//! [[machine_types.press.setpoints]]
//! name = "speed_setpoint_pct"
//! value_type = "int"
//! min = 0.0
//! max = 150.0
//! unit = "%"
//!
//! [[sites]]
//! name = "berlin"
//! [[sites.areas]]
//! name = "assembly"
//! [[sites.areas.lines]]
//! name = "line-1"
//! machines = [{ name = "press", type = "press", count = 3 }]   # press-1 .. press-3
//! [[sites.areas.lines]]
//! name = "line-2"
//! [[sites.areas.lines.machines]]      # one press unlike its type (`MachineInstance`):
//! name = "press-7"
//! type = "press"
//! drop = ["force"]                    # sensors it lacks
//! tune.temp = { unit = "degF", max = 600.0 }   # a sensor changed on it only
//! [[sites.areas.lines.machines.sensors]]      # and sensors of its own
//! name = "oil"
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::sync::Arc;

use serde::Deserialize;

use crate::alarm::AlarmLimit;
use crate::asset::{AssetPath, Level, is_slug};
use crate::detect::machine::MachineDetectorConfig;
use crate::detect::sensor::SensorDetectorConfig;
use crate::oee::MachineState;
use crate::rule::RuleSpec;
use crate::value::{Value, ValueType};

/// The spec format version this code reads.
pub const SPEC_VERSION: u32 = 1;

/// What a sensor measures; drives the simulator's signal model and the UI's formatting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SensorKind {
    #[default]
    Generic,
    Temperature,
    Vibration,
    Speed,
    Power,
    Pressure,
    Flow,
}

impl SensorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SensorKind::Generic => "generic",
            SensorKind::Temperature => "temperature",
            SensorKind::Vibration => "vibration",
            SensorKind::Speed => "speed",
            SensorKind::Power => "power",
            SensorKind::Pressure => "pressure",
            SensorKind::Flow => "flow",
        }
    }
}

fn default_period_ms() -> u64 {
    1000
}
fn default_stale_periods() -> u32 {
    3
}
fn default_value_type() -> ValueType {
    ValueType::Float
}

/// A sensor of a machine type.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SensorSpec {
    pub name: String,
    #[serde(default)]
    pub kind: SensorKind,
    #[serde(default)]
    pub unit: String,
    #[serde(default = "default_value_type")]
    pub value_type: ValueType,
    /// Expected range; a value outside it is applied with quality Uncertain (out of range).
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// Expected sampling period of the source.
    #[serde(default = "default_period_ms")]
    pub period_ms: u64,
    /// The twin turns Uncertain (stale) after this many periods without a reading.
    #[serde(default = "default_stale_periods")]
    pub stale_after_periods: u32,
    #[serde(default)]
    pub alarms: Vec<AlarmLimit>,
    /// Anomaly detector settings; absent means the defaults, which are not written back.
    #[serde(default, skip_serializing_if = "is_default_detect")]
    pub detect: SensorDetectorConfig,
}

fn is_default_detect(cfg: &SensorDetectorConfig) -> bool {
    *cfg == SensorDetectorConfig::default()
}

impl SensorSpec {
    /// Why `value` may not be written to this sensor's value (a tag marked writable), if it
    /// may not: its value type, and its `min`/`max` as the range a write must be within.
    pub fn refuses_write(&self, value: Value) -> Option<String> {
        write_refusal(
            &self.name,
            self.value_type,
            (self.min, self.max),
            &self.unit,
            value,
        )
    }

    pub fn stale_after_ms(&self) -> u64 {
        self.period_ms
            .saturating_mul(u64::from(self.stale_after_periods))
    }
}

/// A property a write may set on a machine of a type: its type and range, checked before
/// any PLC sees the write.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SetpointSpec {
    pub name: String,
    #[serde(default = "default_value_type")]
    pub value_type: ValueType,
    /// The range a write must be within (inclusive); none for a bool.
    pub min: Option<f64>,
    pub max: Option<f64>,
    #[serde(default)]
    pub unit: String,
}

impl SetpointSpec {
    /// Why `value` may not be written to this setpoint, if it may not. A whole float is an
    /// int and 0 or 1 a bool here, as a command line or a JSON client writes them.
    pub fn refuses(&self, value: Value) -> Option<String> {
        write_refusal(
            &self.name,
            self.value_type,
            (self.min, self.max),
            &self.unit,
            value,
        )
    }
}

/// `value` as a property of `value_type` takes it, where a command line or a JSON client
/// may write it otherwise: a whole float as an int, 0 or 1 as a bool; any other value as
/// it is. What the write checks judge, and what goes to the PLC.
pub fn coerce(value: Value, value_type: ValueType) -> Value {
    match (value, value_type) {
        (Value::Float(f), ValueType::Int) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
            Value::Int(f as i64)
        }
        (Value::Int(i @ (0 | 1)), ValueType::Bool) => Value::Bool(i == 1),
        (v, _) => v,
    }
}

/// Why `value` may not be written to `name`, which holds `value_type` within `range`
/// (inclusive, either bound optional) in `unit`: the one check of a setpoint's and of a
/// writable sensor's writes.
fn write_refusal(
    name: &str,
    value_type: ValueType,
    range: (Option<f64>, Option<f64>),
    unit: &str,
    value: Value,
) -> Option<String> {
    let value = coerce(value, value_type);
    if !value.fits(value_type) {
        let a = |t: ValueType| match t {
            ValueType::Int => "an int",
            ValueType::Float => "a float",
            ValueType::Bool => "a bool",
        };
        return Some(format!(
            "{} where {name} takes {}",
            a(value.value_type()),
            a(value_type)
        ));
    }
    if !value.is_finite() {
        return Some("not a finite number".into());
    }
    if value_type == ValueType::Bool {
        return None;
    }
    let v = value.as_f64();
    let unit = if unit.is_empty() {
        String::new()
    } else {
        format!(" {unit}")
    };
    match range {
        (Some(lo), Some(hi)) if !(lo..=hi).contains(&v) => {
            Some(format!("outside its range {lo}..={hi}{unit}"))
        }
        (Some(lo), None) if v < lo => Some(format!("below its minimum {lo}{unit}")),
        (None, Some(hi)) if v > hi => Some(format!("above its maximum {hi}{unit}")),
        _ => None,
    }
}

/// A machine type: the sensors every machine of the type has, and its ideal cycle time.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineType {
    #[serde(default)]
    pub description: String,
    /// Ideal time per part, for OEE performance.
    pub ideal_cycle_ms: f64,
    #[serde(default)]
    pub sensors: Vec<SensorSpec>,
    /// Machine detector settings (multivariate score, health, RUL); absent means the
    /// defaults, which are not written back.
    #[serde(default, skip_serializing_if = "is_default_machine_detect")]
    pub detect: MachineDetectorConfig,
    /// A user's ONNX model every machine of the type runs over its sensors (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelSpec>,
    /// What a write may set (none listed: writes are checked by their connection only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setpoints: Vec<SetpointSpec>,
    /// The PLC's own state values, as text (`"true"`, `"7"`), to machine states. Empty: the
    /// codes 0..=3 (idle, running, setup, down), and a bool (true running, false idle).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub state_map: BTreeMap<String, MachineState>,
    /// Local action rules every machine of the type runs (`crate::rule`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
}

impl MachineType {
    /// The state code (`MachineState::code`) a PLC's state `value` means for this type;
    /// `None` when it means none (the twin then refuses the reading).
    pub fn state_code(&self, value: Value) -> Option<i64> {
        if self.state_map.is_empty() {
            return match value {
                Value::Int(code) => MachineState::from_code(code).map(MachineState::code),
                Value::Bool(running) => Some(if running {
                    MachineState::Running.code()
                } else {
                    MachineState::Idle.code()
                }),
                // A whole float is its integer (PLCs send REALs).
                Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => {
                    MachineState::from_code(f as i64).map(MachineState::code)
                }
                Value::Float(_) => None,
            };
        }
        let key = match value {
            Value::Int(i) => i.to_string(),
            Value::Bool(b) => b.to_string(),
            // A whole float is its integer ("3.0" is "3"), as PLCs send REALs.
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => (f as i64).to_string(),
            Value::Float(f) => f.to_string(),
        };
        self.state_map.get(&key).map(|s| s.code())
    }

    pub fn setpoint(&self, name: &str) -> Option<&SetpointSpec> {
        self.setpoints.iter().find(|s| s.name == name)
    }
}

fn is_default_machine_detect(cfg: &MachineDetectorConfig) -> bool {
    *cfg == MachineDetectorConfig::default()
}

/// Longest window a machine model may ask for, in samples per input: the window is held per
/// machine twin, so this bounds memory (with [`MAX_MODEL_INPUTS`]: 1 MiB of f32 per twin).
pub const MAX_MODEL_WINDOW: usize = 4096;
/// Most sensors a machine model may take as inputs.
pub const MAX_MODEL_INPUTS: usize = 64;
/// Longest evaluation interval of a machine model, in samples (one day at one per second).
pub const MAX_MODEL_EVERY: u32 = 86_400;

fn default_model_every() -> u32 {
    1
}
fn default_model_threshold() -> f64 {
    3.0
}

/// A user-supplied ONNX model on a machine type (run by `runtime::inference`):
///
/// ```toml
/// [machine_types.press.model]
/// file = "models/press_score.onnx"   # relative to the plant spec file's directory
/// inputs = ["temp", "force"]         # sensors of the type, in the model's input order
/// window = 16                        # samples per input the model sees
/// every = 1                          # evaluate every N samples
/// threshold = 3.0                    # score above it: anomalous
/// ```
///
/// The model takes one f32 tensor `[1, window, inputs.len()]` (oldest sample first) and
/// returns one value.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// The ONNX file, relative to the directory of the plant spec file.
    pub file: std::path::PathBuf,
    /// Sensor names of the machine type, in the order of the model's last input axis.
    pub inputs: Vec<String>,
    /// Samples per input in the model's window.
    pub window: usize,
    /// The model is evaluated every `every` samples once the window is full.
    #[serde(default = "default_model_every")]
    pub every: u32,
    /// A score above this is anomalous.
    #[serde(default = "default_model_threshold")]
    pub threshold: f64,
}

impl ModelSpec {
    /// Problems of this model on machine type `mt`, each prefixed with `at` (the type).
    fn check(&self, at: &str, mt: &MachineType, problems: &mut Vec<String>) {
        let at = format!("{at}: model");
        if self.file.as_os_str().is_empty() {
            problems.push(format!("{at}: file is empty"));
        }
        if self.inputs.is_empty() || self.inputs.len() > MAX_MODEL_INPUTS {
            problems.push(format!(
                "{at}: inputs must name 1 to {MAX_MODEL_INPUTS} sensors, got {}",
                self.inputs.len()
            ));
        }
        let mut seen = HashSet::new();
        for input in &self.inputs {
            if !mt.sensors.iter().any(|s| &s.name == input) {
                let known: Vec<&str> = mt.sensors.iter().map(|s| s.name.as_str()).collect();
                problems.push(format!(
                    "{at}: input {input:?} is not a sensor of the type (sensors: {})",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ));
            } else if !seen.insert(input.as_str()) {
                problems.push(format!("{at}: input {input:?} is listed twice"));
            }
        }
        if self.window == 0 || self.window > MAX_MODEL_WINDOW {
            problems.push(format!(
                "{at}: window must be between 1 and {MAX_MODEL_WINDOW} samples, got {}",
                self.window
            ));
        }
        if self.every == 0 || self.every > MAX_MODEL_EVERY {
            problems.push(format!(
                "{at}: every must be between 1 and {MAX_MODEL_EVERY} samples, got {}",
                self.every
            ));
        }
        if !self.threshold.is_finite() {
            problems.push(format!(
                "{at}: threshold must be finite, got {}",
                self.threshold
            ));
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct MachineInstance {
    pub name: String,
    #[serde(rename = "type")]
    pub machine_type: String,
    /// With `count = N`, N machines named `{name}-1` .. `{name}-N`.
    pub count: Option<u32>,
    /// Sensors of the type this machine does not have.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drop: Vec<String>,
    /// Changes to sensors of the type on this machine only (unit, range, period, alarms),
    /// by sensor name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tune: BTreeMap<String, SensorTune>,
    /// Sensors this machine has beyond its type's (a dropped name may come back here with
    /// another spec).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sensors: Vec<SensorSpec>,
}

/// What an instance changes of one of its type's sensors; an absent field keeps the type's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SensorTune {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_after_periods: Option<u32>,
    /// Replaces the type's alarms on this sensor (`[]`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarms: Option<Vec<AlarmLimit>>,
    /// Replaces the type's detector settings on this sensor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detect: Option<SensorDetectorConfig>,
}

impl SensorTune {
    fn apply(&self, s: &mut SensorSpec) {
        if let Some(unit) = &self.unit {
            s.unit.clone_from(unit);
        }
        if self.min.is_some() {
            s.min = self.min;
        }
        if self.max.is_some() {
            s.max = self.max;
        }
        if let Some(p) = self.period_ms {
            s.period_ms = p;
        }
        if let Some(p) = self.stale_after_periods {
            s.stale_after_periods = p;
        }
        if let Some(alarms) = &self.alarms {
            s.alarms.clone_from(alarms);
        }
        if let Some(detect) = &self.detect {
            s.detect = detect.clone();
        }
    }
}

impl MachineInstance {
    /// An instance of `machine_type` with nothing of its own.
    pub fn new(name: impl Into<String>, machine_type: impl Into<String>) -> MachineInstance {
        MachineInstance {
            name: name.into(),
            machine_type: machine_type.into(),
            count: None,
            drop: Vec::new(),
            tune: BTreeMap::new(),
            sensors: Vec::new(),
        }
    }

    /// How many sensors this instance of `mt` has (its type's, less the dropped, plus its
    /// own).
    pub fn sensor_count(&self, mt: &MachineType) -> usize {
        mt.sensors
            .iter()
            .filter(|s| !self.drop.contains(&s.name))
            .count()
            + self.sensors.len()
    }

    /// Whether this instance changes its type (drops, tunes or adds sensors).
    pub fn overrides(&self) -> bool {
        !(self.drop.is_empty() && self.tune.is_empty() && self.sensors.is_empty())
    }

    /// Its type as this instance has it: `mt` without the dropped sensors, with the tuned
    /// ones changed and the added ones after the type's. Problems (a name the type does not
    /// have, an added name the type keeps) go to `problems`, prefixed with `at`.
    fn effective(&self, at: &str, mt: &MachineType, problems: &mut Vec<String>) -> MachineType {
        let has = |name: &str| mt.sensors.iter().any(|s| s.name == name);
        let names = || {
            mt.sensors
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        for name in &self.drop {
            if !has(name) {
                problems.push(format!(
                    "{at}: drop: type {:?} has no sensor {name:?} (its sensors: {})",
                    self.machine_type,
                    names()
                ));
            }
        }
        for name in self.tune.keys() {
            if !has(name) {
                problems.push(format!(
                    "{at}: tune: type {:?} has no sensor {name:?} (its sensors: {}); add one under sensors",
                    self.machine_type,
                    names()
                ));
            } else if self.drop.contains(name) {
                problems.push(format!("{at}: tune: sensor {name:?} is dropped"));
            }
        }
        // The type's model was made for its inputs as the type has them.
        let inputs = mt.model.as_ref().map_or(&[][..], |m| &m.inputs[..]);
        for (name, t) in &self.tune {
            let same_unit = mt.sensors.iter().find(|s| s.name == *name).map(|s| &s.unit);
            if inputs.contains(name) && t.unit.is_some() && t.unit.as_ref() != same_unit {
                problems.push(format!(
                    "{at}: tune: {name:?} is an input of type {:?}'s model, made for its unit; its unit cannot change here",
                    self.machine_type
                ));
            }
        }
        for s in &self.sensors {
            if inputs.contains(&s.name) {
                problems.push(format!(
                    "{at}: sensors: {:?} is an input of type {:?}'s model; it cannot be replaced here",
                    s.name, self.machine_type
                ));
            }
        }
        for s in &self.sensors {
            if has(&s.name) && !self.drop.contains(&s.name) {
                problems.push(format!(
                    "{at}: sensors: {:?} is a sensor of type {:?} already; tune it, or drop it to replace it",
                    s.name, self.machine_type
                ));
            }
        }
        let mut eff = mt.clone();
        eff.sensors.retain(|s| !self.drop.contains(&s.name));
        for s in &mut eff.sensors {
            if let Some(t) = self.tune.get(&s.name) {
                t.apply(s);
            }
        }
        eff.sensors.extend(self.sensors.iter().cloned());
        eff
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct LineSpec {
    pub name: String,
    /// What a write may set on the line itself (a line speed the line PLC hands to its
    /// machines), checked as a machine type's setpoints are.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setpoints: Vec<SetpointSpec>,
    /// Local action rules every machine of the line runs, besides its type's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub machines: Vec<MachineInstance>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AreaSpec {
    pub name: String,
    /// What a write may set on the area itself, as a line's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setpoints: Vec<SetpointSpec>,
    /// Local action rules every machine of the area runs, besides its type's and line's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleSpec>,
    #[serde(default)]
    pub lines: Vec<LineSpec>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSpec {
    pub name: String,
    #[serde(default)]
    pub areas: Vec<AreaSpec>,
}

/// The plant spec file as written.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlantSpec {
    pub version: u32,
    pub enterprise: String,
    #[serde(default)]
    pub machine_types: BTreeMap<String, MachineType>,
    #[serde(default)]
    pub sites: Vec<SiteSpec>,
}

/// Longest sampling period a sensor may declare (one day).
pub const MAX_PERIOD_MS: u64 = 86_400_000;

/// Most assets a plant may have; bigger specs are refused instead of exhausting memory.
pub const MAX_ASSETS: usize = 5_000_000;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("{source_name}: not a valid plant spec: {message}")]
    Syntax {
        source_name: String,
        message: String,
    },
    #[error(
        "{source_name}: spec version {found} is not supported (this build reads version {SPEC_VERSION})"
    )]
    Version { source_name: String, found: u32 },
    #[error("{source_name}: {} problem(s):\n{}", .problems.len(), Problems(.problems))]
    Invalid {
        source_name: String,
        problems: Vec<String>,
    },
}

struct Problems<'a>(&'a [String]);
impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "  {p}")?;
        }
        Ok(())
    }
}

/// What a concrete asset is. Types are shared (`Arc`): a million sensors of one type hold
/// one copy of its config.
#[derive(Debug, Clone, PartialEq)]
pub enum AssetKind {
    Enterprise,
    Site,
    /// An area, with the setpoints a write may set on it (shared by nobody: areas are few).
    Area {
        setpoints: Arc<[SetpointSpec]>,
        /// Rules the machines below run.
        rules: Arc<[RuleSpec]>,
    },
    Line {
        setpoints: Arc<[SetpointSpec]>,
        rules: Arc<[RuleSpec]>,
    },
    Machine {
        type_name: Arc<str>,
        spec: Arc<MachineType>,
    },
    Sensor {
        type_name: Arc<str>,
        spec: Arc<SensorSpec>,
    },
}

impl AssetKind {
    pub fn level(&self) -> Level {
        match self {
            AssetKind::Enterprise => Level::Enterprise,
            AssetKind::Site => Level::Site,
            AssetKind::Area { .. } => Level::Area,
            AssetKind::Line { .. } => Level::Line,
            AssetKind::Machine { .. } => Level::Machine,
            AssetKind::Sensor { .. } => Level::Sensor,
        }
    }

    /// What a write may set on this asset and is checked against: its type's setpoints (a
    /// machine), its own (a line, an area); none for the other levels.
    pub fn setpoints(&self) -> &[SetpointSpec] {
        match self {
            AssetKind::Machine { spec, .. } => &spec.setpoints,
            AssetKind::Line { setpoints, .. } | AssetKind::Area { setpoints, .. } => setpoints,
            _ => &[],
        }
    }

    /// The setpoint `name` of those, if listed.
    pub fn setpoint(&self, name: &str) -> Option<&SetpointSpec> {
        self.setpoints().iter().find(|s| s.name == name)
    }

    /// Why a write to `property` of this asset (at `path`) is refused whatever its value:
    /// it lists setpoints (its type's, its own), and not this one. `None` when it lists none
    /// (the connection's tag and the PLC check the write), and at the other levels.
    pub fn unlisted_setpoint(&self, path: &AssetPath, property: &str) -> Option<String> {
        let setpoints = self.setpoints();
        if setpoints.is_empty() || self.setpoint(property).is_some() {
            return None;
        }
        let owner = match self {
            AssetKind::Machine { type_name, .. } => format!("machine type {type_name:?}"),
            other => format!("{} {path}", other.level().as_str()),
        };
        let names: Vec<&str> = setpoints.iter().map(|s| s.name.as_str()).collect();
        Some(format!(
            "{owner} has no setpoint {property:?} (its setpoints: {})",
            names.join(", ")
        ))
    }

    /// Asset type name: the machine type for machines and their sensors
    /// (`press` / `press.temp`), the level name otherwise.
    pub fn type_name(&self) -> &str {
        match self {
            AssetKind::Machine { type_name, .. } | AssetKind::Sensor { type_name, .. } => type_name,
            other => other.level().as_str(),
        }
    }
}

/// One concrete asset of the plant.
#[derive(Debug, Clone, PartialEq)]
pub struct AssetDef {
    pub path: AssetPath,
    pub kind: AssetKind,
}

/// A machine type shared by all its instances: name, type, and each sensor's type name and spec.
type SharedType = (Arc<str>, Arc<MachineType>, Vec<(Arc<str>, Arc<SensorSpec>)>);

impl PlantSpec {
    /// Parses and validates. `source_name` (usually the file path) prefixes every error.
    pub fn from_toml(text: &str, source_name: &str) -> Result<PlantSpec, SpecError> {
        let spec: PlantSpec = toml::from_str(text).map_err(|e| SpecError::Syntax {
            source_name: source_name.to_string(),
            message: e.to_string(),
        })?;
        if spec.version != SPEC_VERSION {
            return Err(SpecError::Version {
                source_name: source_name.to_string(),
                found: spec.version,
            });
        }
        spec.validate(source_name)?;
        Ok(spec)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a plant spec always serialises to TOML")
    }

    /// Checks names, types, ranges and alarm limits; every problem names the asset path (or
    /// the type) and the field.
    pub fn validate(&self, source_name: &str) -> Result<(), SpecError> {
        let mut problems = Vec::new();
        if !is_slug(&self.enterprise) {
            problems.push(format!(
                "enterprise: name {:?} is not a slug",
                self.enterprise
            ));
        }
        for (tname, mt) in &self.machine_types {
            let at = format!("machine type {tname:?}");
            if !is_slug(tname) {
                problems.push(format!("{at}: name is not a slug"));
            }
            check_type(&at, mt, &mut problems);
        }
        let known = self
            .machine_types
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ");
        let mut sites = HashSet::new();
        let mut total = 1usize;
        for site in &self.sites {
            let sp = format!("{}/{}", self.enterprise, site.name);
            check_name(&mut problems, &sp, &site.name, &mut sites);
            let mut areas = HashSet::new();
            for area in &site.areas {
                let ap = format!("{sp}/{}", area.name);
                check_name(&mut problems, &ap, &area.name, &mut areas);
                check_setpoints(&ap, &area.setpoints, &[], &mut problems);
                crate::rule::check_names(&ap, &area.rules, &mut problems);
                let mut lines = HashSet::new();
                for line in &area.lines {
                    let lp = format!("{ap}/{}", line.name);
                    check_name(&mut problems, &lp, &line.name, &mut lines);
                    check_setpoints(&lp, &line.setpoints, &[], &mut problems);
                    crate::rule::check_names(&lp, &line.rules, &mut problems);
                    let mut machines = HashSet::new();
                    for m in &line.machines {
                        let mp = format!("{lp}/{}", m.name);
                        match self.machine_types.get(&m.machine_type) {
                            None => problems.push(format!(
                                "{mp}: unknown machine type {:?} (defined: {})",
                                m.machine_type,
                                if known.is_empty() { "none" } else { &known }
                            )),
                            Some(mt) => {
                                // The line's and area's rules, against this machine's type.
                                for r in line.rules.iter().chain(&area.rules) {
                                    r.check(&mp, Some(mt), &mut problems);
                                }
                                let inherited = line.rules.len() + area.rules.len();
                                if mt.rules.len() + inherited > crate::rule::MAX_RULES_PER_MACHINE {
                                    problems.push(format!(
                                        "{mp}: {} rules (its type's, line's and area's), more than {}",
                                        mt.rules.len() + inherited,
                                        crate::rule::MAX_RULES_PER_MACHINE
                                    ));
                                }
                                let mut sensors = mt.sensors.len();
                                if m.overrides() {
                                    // The machines the overrides shape, as they are named.
                                    let at = match m.count {
                                        Some(n) if n > 1 => format!("{mp}-{{1..{n}}}"),
                                        Some(_) => format!("{mp}-1"),
                                        None => mp.clone(),
                                    };
                                    let eff = m.effective(&at, mt, &mut problems);
                                    check_type(&at, &eff, &mut problems);
                                    sensors = eff.sensors.len();
                                }
                                let n = m.count.unwrap_or(1) as usize;
                                total = total.saturating_add(n.saturating_mul(1 + sensors));
                            }
                        }
                        if m.count == Some(0) {
                            problems.push(format!("{mp}: count must be at least 1"));
                        }
                        match m.count {
                            None => check_name(&mut problems, &mp, &m.name, &mut machines),
                            Some(n) if n as usize > MAX_ASSETS => problems.push(format!(
                                "{mp}: count {n} is above the limit of {MAX_ASSETS} assets"
                            )),
                            Some(n) => {
                                for i in 1..=n {
                                    let name = format!("{}-{i}", m.name);
                                    check_name(
                                        &mut problems,
                                        &format!("{lp}/{name}"),
                                        &name,
                                        &mut machines,
                                    );
                                }
                            }
                        }
                        if problems.len() > 100 {
                            break;
                        }
                    }
                    total += 1;
                }
                total += 1;
            }
            total += 1;
        }
        if total > MAX_ASSETS {
            problems.push(format!(
                "plant has {total} assets, more than the limit of {MAX_ASSETS}"
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            problems.truncate(100);
            Err(SpecError::Invalid {
                source_name: source_name.to_string(),
                problems,
            })
        }
    }

    /// Every asset of the plant, parents before children. The spec must be valid.
    pub fn assets(&self) -> Vec<AssetDef> {
        let types: HashMap<&str, SharedType> = self
            .machine_types
            .iter()
            .map(|(name, mt)| {
                let sensors = mt
                    .sensors
                    .iter()
                    .map(|s| (Arc::from(format!("{name}.{}", s.name)), Arc::new(s.clone())))
                    .collect();
                (
                    name.as_str(),
                    (Arc::from(name.as_str()), Arc::new(mt.clone()), sensors),
                )
            })
            .collect();
        let path = |s: &str| AssetPath::parse(s).expect("a validated spec has valid paths");
        let mut out = Vec::new();
        let ent = path(&self.enterprise);
        out.push(AssetDef {
            path: ent.clone(),
            kind: AssetKind::Enterprise,
        });
        for site in &self.sites {
            let sp = child(&ent, &site.name);
            out.push(AssetDef {
                path: sp.clone(),
                kind: AssetKind::Site,
            });
            for area in &site.areas {
                let ap = child(&sp, &area.name);
                out.push(AssetDef {
                    path: ap.clone(),
                    kind: AssetKind::Area {
                        setpoints: area.setpoints.clone().into(),
                        rules: area.rules.clone().into(),
                    },
                });
                for line in &area.lines {
                    let lp = child(&ap, &line.name);
                    out.push(AssetDef {
                        path: lp.clone(),
                        kind: AssetKind::Line {
                            setpoints: line.setpoints.clone().into(),
                            rules: line.rules.clone().into(),
                        },
                    });
                    for m in &line.machines {
                        let Some((tname, mt, sensors)) = types.get(m.machine_type.as_str()) else {
                            continue;
                        };
                        // An instance with overrides has a type of its own (shared by its
                        // `count` machines); its untouched sensors keep the type's specs.
                        let own;
                        let (mt, sensors) = if m.overrides() {
                            let eff = m.effective("", mt, &mut Vec::new());
                            let own_sensors = eff
                                .sensors
                                .iter()
                                .map(|s| match sensors.iter().find(|(_, t)| **t == *s) {
                                    Some(same) => same.clone(),
                                    None => (
                                        Arc::from(format!("{tname}.{}", s.name)),
                                        Arc::new(s.clone()),
                                    ),
                                })
                                .collect::<Vec<_>>();
                            own = (Arc::new(eff), own_sensors);
                            (&own.0, &own.1)
                        } else {
                            (mt, sensors)
                        };
                        let names: Vec<String> = match m.count {
                            None => vec![m.name.clone()],
                            Some(n) => (1..=n).map(|i| format!("{}-{i}", m.name)).collect(),
                        };
                        for name in names {
                            let mp = child(&lp, &name);
                            out.push(AssetDef {
                                path: mp.clone(),
                                kind: AssetKind::Machine {
                                    type_name: tname.clone(),
                                    spec: mt.clone(),
                                },
                            });
                            for (stype, s) in sensors {
                                out.push(AssetDef {
                                    path: child(&mp, &s.name),
                                    kind: AssetKind::Sensor {
                                        type_name: stype.clone(),
                                        spec: s.clone(),
                                    },
                                });
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

fn child(parent: &AssetPath, name: &str) -> AssetPath {
    parent
        .child(name)
        .expect("a validated spec has valid paths")
}

/// The checks of a list of setpoints (of a machine type, a line or an area; `sensors`: the
/// names they may not take), prefixed with `at`.
fn check_setpoints(
    at: &str,
    setpoints: &[SetpointSpec],
    sensors: &[&str],
    problems: &mut Vec<String>,
) {
    let mut setpoint_names = HashSet::new();
    for sp in setpoints {
        let at = format!("{at}: setpoint {:?}", sp.name);
        if !is_slug(&sp.name) {
            problems.push(format!(
                "{at}: name is not a slug ([a-z0-9][a-z0-9_-]*, as a tag's property names it)"
            ));
        }
        if !setpoint_names.insert(sp.name.as_str()) {
            problems.push(format!("{at}: defined twice"));
        }
        if sensors.contains(&sp.name.as_str()) {
            problems.push(format!("{at}: a sensor has the same name"));
        }
        if crate::reading::Property::parse(&sp.name).is_some() {
            problems.push(format!(
                "{at}: {} is a property connections feed, not a setpoint",
                sp.name
            ));
        }
        match (sp.value_type, sp.min, sp.max) {
            (ValueType::Bool, None, None) => {}
            (ValueType::Bool, _, _) => {
                problems.push(format!("{at}: a bool setpoint has no min or max"))
            }
            (_, Some(lo), Some(hi)) if !(lo.is_finite() && hi.is_finite() && lo <= hi) => problems
                .push(format!(
                    "{at}: min {lo} must be at most max {hi}, both finite"
                )),
            (_, Some(v), None) | (_, None, Some(v)) if !v.is_finite() => {
                problems.push(format!("{at}: min/max must be finite"))
            }
            _ => {}
        }
    }
}

/// The checks of one machine type (or an instance's effective type), prefixed with `at`.
fn check_type(at: &str, mt: &MachineType, problems: &mut Vec<String>) {
    if !(mt.ideal_cycle_ms.is_finite() && mt.ideal_cycle_ms > 0.0) {
        problems.push(format!(
            "{at}: ideal_cycle_ms must be a positive number, got {}",
            mt.ideal_cycle_ms
        ));
    }
    if let Some(model) = &mt.model {
        model.check(at, mt, problems);
    }
    // A key is how a PLC value reads as text: an integer as written (`5`, `-2`, no
    // leading zeros), `true` or `false`. Any other key could never match.
    for key in mt.state_map.keys() {
        let canonical = key == "true"
            || key == "false"
            || key.parse::<i64>().is_ok_and(|i| i.to_string() == *key);
        if !canonical {
            problems.push(format!(
                "{at}: state_map: key {key:?} is no PLC value as we read it (an integer such as \"5\", or \"true\" / \"false\")"
            ));
        }
    }
    let sensors: Vec<&str> = mt.sensors.iter().map(|s| s.name.as_str()).collect();
    check_setpoints(at, &mt.setpoints, &sensors, problems);
    crate::rule::check_names(at, &mt.rules, problems);
    for r in &mt.rules {
        r.check(at, Some(mt), problems);
    }
    let mut seen = HashSet::new();
    for s in &mt.sensors {
        let at = format!("{at}: sensor {:?}", s.name);
        if !is_slug(&s.name) {
            problems.push(format!("{at}: name is not a slug"));
        }
        if !seen.insert(s.name.as_str()) {
            problems.push(format!("{at}: defined twice"));
        }
        if s.period_ms == 0 || s.period_ms > MAX_PERIOD_MS {
            problems.push(format!(
                "{at}: period_ms must be between 1 and {MAX_PERIOD_MS} (one day)"
            ));
        }
        if s.stale_after_periods > 1000 {
            problems.push(format!("{at}: stale_after_periods must be at most 1000"));
        }
        if s.stale_after_periods == 0 {
            problems.push(format!("{at}: stale_after_periods must be > 0"));
        }
        match (s.min, s.max) {
            (Some(lo), Some(hi)) if !(lo.is_finite() && hi.is_finite() && lo < hi) => problems
                .push(format!(
                    "{at}: min {lo} must be below max {hi}, both finite"
                )),
            (Some(v), None) | (None, Some(v)) if !v.is_finite() => {
                problems.push(format!("{at}: min/max must be finite"))
            }
            _ => {}
        }
        for problem in s.detect.problems() {
            problems.push(format!("{at}: {problem}"));
        }
        let mut alarm_names = HashSet::new();
        for a in &s.alarms {
            if !alarm_names.insert(a.name.as_str()) {
                problems.push(format!("{at}: alarm {:?} defined twice", a.name));
            }
            if let Err(e) = a.validate() {
                problems.push(format!("{at}: alarm {:?}: {e}", a.name));
            }
            if s.value_type == ValueType::Bool && a.limit.fract() != 0.0 {
                problems.push(format!(
                    "{at}: alarm {:?}: limit {} on a bool sensor",
                    a.name, a.limit
                ));
            }
        }
    }
}

fn check_name(problems: &mut Vec<String>, at: &str, name: &str, seen: &mut HashSet<String>) {
    if !is_slug(name) {
        problems.push(format!(
            "{at}: name {name:?} is not a slug ([a-z0-9][a-z0-9_-]*)"
        ));
    } else if !seen.insert(name.to_string()) {
        problems.push(format!("{at}: defined twice"));
    }
}

impl PlantSpec {
    /// The machine types `site` uses (by name).
    fn types_of(site: &SiteSpec) -> std::collections::BTreeSet<&str> {
        site.areas
            .iter()
            .flat_map(|a| &a.lines)
            .flat_map(|l| &l.machines)
            .map(|m| m.machine_type.as_str())
            .collect()
    }

    /// This plant cut to one site (by name) and the machine types it uses: what a site sends
    /// its enterprise. `None` when the plant has no such site.
    pub fn site_subset(&self, site: &str) -> Option<PlantSpec> {
        let s = self.sites.iter().find(|x| x.name == site)?;
        let used = Self::types_of(s);
        Some(PlantSpec {
            version: self.version,
            enterprise: self.enterprise.clone(),
            machine_types: self
                .machine_types
                .iter()
                .filter(|(n, _)| used.contains(n.as_str()))
                .map(|(n, t)| (n.clone(), t.clone()))
                .collect(),
            sites: vec![s.clone()],
        })
    }

    /// This plant with `site`'s one site put in (replacing its former self) and its machine
    /// types added. Refused: another enterprise, not exactly one site, or a machine type of
    /// the same name that another site uses with another definition.
    pub fn with_site(&self, site: &PlantSpec) -> Result<PlantSpec, String> {
        if site.enterprise != self.enterprise {
            return Err(format!(
                "the site's plant is of enterprise {:?}, this one {:?}",
                site.enterprise, self.enterprise
            ));
        }
        let [one] = site.sites.as_slice() else {
            return Err(format!(
                "a site's plant holds its own site only ({} sites sent)",
                site.sites.len()
            ));
        };
        let mut merged = self.clone();
        merged.sites.retain(|s| s.name != one.name);
        for (name, t) in &site.machine_types {
            if let Some(existing) = merged.machine_types.get(name)
                && existing != t
                && let Some(other) = merged
                    .sites
                    .iter()
                    .find(|s| Self::types_of(s).contains(name.as_str()))
            {
                return Err(format!(
                    "machine type {name:?} of site {} differs from the one site {} uses: give one of them another name",
                    one.name, other.name
                ));
            }
            merged.machine_types.insert(name.clone(), t.clone());
        }
        merged.sites.push(one.clone());
        Ok(merged)
    }
}

/// Difference between two expansions of a plant: what to start, stop and re-type. Cold start
/// is the diff of the spec against an empty plant.
#[derive(Debug, Default, PartialEq)]
pub struct PlantDiff {
    pub added: Vec<AssetDef>,
    pub removed: Vec<AssetPath>,
    /// Same path, different kind or config.
    pub changed: Vec<AssetDef>,
}

pub fn diff(old: &[AssetDef], new: &[AssetDef]) -> PlantDiff {
    let old_by_path: HashMap<&AssetPath, &AssetDef> = old.iter().map(|a| (&a.path, a)).collect();
    let new_paths: HashSet<&AssetPath> = new.iter().map(|a| &a.path).collect();
    let mut d = PlantDiff::default();
    for a in new {
        match old_by_path.get(&a.path) {
            None => d.added.push(a.clone()),
            Some(o) if o.kind != a.kind => d.changed.push(a.clone()),
            Some(_) => {}
        }
    }
    // Children before parents, so a subtree is stopped from the leaves up.
    for a in old.iter().rev() {
        if !new_paths.contains(&a.path) {
            d.removed.push(a.path.clone());
        }
    }
    d
}

#[cfg(test)]
mod site_tests {
    use super::*;

    const TWO: &str = r#"
version = 1
enterprise = "acme"
[machine_types.press]
ideal_cycle_ms = 1000
[[machine_types.press.sensors]]
name = "temp"
[machine_types.oven]
ideal_cycle_ms = 60000
[[machine_types.oven.sensors]]
name = "zone"
[[sites]]
name = "berlin"
[[sites.areas]]
name = "a"
[[sites.areas.lines]]
name = "l"
machines = [{ name = "p", type = "press" }]
[[sites]]
name = "lyon"
[[sites.areas]]
name = "a"
[[sites.areas.lines]]
name = "l"
machines = [{ name = "o", type = "oven" }]
"#;

    #[test]
    fn a_site_subset_holds_its_site_and_the_types_it_uses_and_merges_back() {
        let plant = PlantSpec::from_toml(TWO, "t").expect("valid");
        let lyon = plant.site_subset("lyon").expect("lyon");
        assert_eq!(lyon.sites.len(), 1);
        assert_eq!(lyon.machine_types.keys().collect::<Vec<_>>(), ["oven"]);
        lyon.validate("lyon").expect("a valid plant of its own");
        assert!(plant.site_subset("paris").is_none());
        // An enterprise with no site yet takes it whole; the same again changes nothing.
        let empty =
            PlantSpec::from_toml("version = 1\nenterprise = \"acme\"\n", "e").expect("valid");
        let merged = empty.with_site(&lyon).expect("merged");
        assert_eq!(merged.with_site(&lyon).expect("again"), merged);
        let both = merged
            .with_site(&plant.site_subset("berlin").expect("berlin"))
            .expect("both");
        assert_eq!(both.sites.len(), 2);
        // A type of the same name that another site uses differently is refused.
        let mut odd = plant.site_subset("berlin").expect("berlin");
        odd.machine_types
            .insert("oven".into(), odd.machine_types["press"].clone());
        odd.sites[0].areas[0].lines[0].machines[0].machine_type = "oven".into();
        let err = both.with_site(&odd).expect_err("conflict");
        assert!(
            err.contains(
                "machine type \"oven\" of site berlin differs from the one site lyon uses"
            ),
            "{err}"
        );
        let other = PlantSpec::from_toml(&TWO.replace("acme", "umbrella"), "t").expect("valid");
        assert!(
            empty
                .with_site(&other.site_subset("lyon").expect("lyon"))
                .is_err()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SMALL: &str = r#"
version = 1
enterprise = "acme"

[machine_types.press]
ideal_cycle_ms = 4000
[[machine_types.press.sensors]]
name = "temp"
kind = "temperature"
unit = "degC"
min = 0.0
max = 150.0
alarms = [{ name = "high", kind = "high", limit = 90.0, deadband = 2.0, severity = "high" }]
[[machine_types.press.sensors]]
name = "force"
unit = "kN"

[[sites]]
name = "berlin"
[[sites.areas]]
name = "assembly"
[[sites.areas.lines]]
name = "line-1"
machines = [{ name = "press", type = "press", count = 2 }, { name = "hydro", type = "press" }]
"#;

    #[test]
    fn expands_instances_parents_first() {
        let spec = PlantSpec::from_toml(SMALL, "small.toml").expect("valid");
        let assets = spec.assets();
        let paths: Vec<&str> = assets.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(paths[0], "acme");
        assert!(paths.contains(&"acme/berlin/assembly/line-1/press-2/force"));
        assert!(paths.contains(&"acme/berlin/assembly/line-1/hydro/temp"));
        assert_eq!(assets.len(), 1 + 1 + 1 + 1 + 3 * 3);
        for (i, a) in assets.iter().enumerate() {
            if let Some(parent) = a.path.parent() {
                assert!(
                    paths[..i].contains(&parent.as_str()),
                    "{} before its parent",
                    a.path
                );
            }
            assert_eq!(a.kind.level(), a.path.level());
        }
    }

    #[test]
    fn unknown_machine_type_names_the_asset_and_the_known_types() {
        let text = SMALL.replace(r#"type = "press" }]"#, r#"type = "pres" }]"#);
        let err = PlantSpec::from_toml(&text, "plant.toml").expect_err("invalid");
        let msg = err.to_string();
        assert!(
            msg.contains(
                r#"acme/berlin/assembly/line-1/hydro: unknown machine type "pres" (defined: press)"#
            ),
            "{msg}"
        );
    }

    #[test]
    fn rejects_bad_names_duplicates_versions_and_unknown_keys() {
        let dup = SMALL.replace(r#"name = "hydro""#, r#"name = "press-1""#);
        let msg = PlantSpec::from_toml(&dup, "p")
            .expect_err("dup")
            .to_string();
        assert!(
            msg.contains("acme/berlin/assembly/line-1/press-1: defined twice"),
            "{msg}"
        );
        let bad = SMALL.replace(r#"name = "line-1""#, r#"name = "Line 1""#);
        let msg = PlantSpec::from_toml(&bad, "p")
            .expect_err("bad")
            .to_string();
        assert!(msg.contains("is not a slug"), "{msg}");
        let v2 = SMALL.replace("version = 1", "version = 2");
        assert!(matches!(
            PlantSpec::from_toml(&v2, "p"),
            Err(SpecError::Version { found: 2, .. })
        ));
        let typo = SMALL.replace("ideal_cycle_ms", "ideal_cycle");
        assert!(matches!(
            PlantSpec::from_toml(&typo, "p"),
            Err(SpecError::Syntax { .. })
        ));
    }

    #[test]
    fn sensor_without_detect_settings_gets_the_defaults_and_writes_none_back() {
        let spec = PlantSpec::from_toml(SMALL, "small.toml").expect("valid");
        let temp = &spec.machine_types["press"].sensors[0];
        assert_eq!(temp.detect, SensorDetectorConfig::default());
        let text = spec.to_toml();
        assert!(!text.contains("detect"), "{text}");
        assert_eq!(PlantSpec::from_toml(&text, "again").expect("valid"), spec);
    }

    #[test]
    fn detect_settings_parse_partially_and_round_trip() {
        let text = SMALL.replace(
            r#"name = "force""#,
            "name = \"force\"\ndetect = { level_z = 12.0, spike = false }",
        );
        let spec = PlantSpec::from_toml(&text, "p").expect("valid");
        let force = &spec.machine_types["press"].sensors[1];
        assert_eq!(force.detect.level_z, 12.0);
        assert!(!force.detect.spike);
        assert_eq!(
            force.detect.threshold,
            SensorDetectorConfig::default().threshold
        );
        let again = PlantSpec::from_toml(&spec.to_toml(), "again").expect("valid");
        assert_eq!(again, spec);
    }

    #[test]
    fn bad_detect_settings_name_the_type_sensor_and_field() {
        let text = SMALL.replace(
            r#"name = "force""#,
            "name = \"force\"\ndetect = { level_alpha = 2.0, release = 5.0 }",
        );
        let msg = PlantSpec::from_toml(&text, "p")
            .expect_err("invalid")
            .to_string();
        assert!(
            msg.contains(r#"machine type "press": sensor "force": detect.level_alpha must be in (0, 1], got 2"#),
            "{msg}"
        );
        assert!(msg.contains("detect.release must be"), "{msg}");
        let typo = SMALL.replace(
            r#"name = "force""#,
            "name = \"force\"\ndetect = { levl_z = 1.0 }",
        );
        assert!(matches!(
            PlantSpec::from_toml(&typo, "p"),
            Err(SpecError::Syntax { .. })
        ));
    }

    #[test]
    fn diff_of_spec_against_empty_adds_everything_and_removal_goes_leaves_first() {
        let spec = PlantSpec::from_toml(SMALL, "p").expect("valid");
        let all = spec.assets();
        let d = diff(&[], &all);
        assert_eq!(d.added.len(), all.len());
        let d = diff(&all, &all[..4]);
        assert_eq!(d.removed.len(), all.len() - 4);
        assert_eq!(d.removed[0], all[all.len() - 1].path);
    }

    const MODEL: &str = r#"
[machine_types.press.model]
file = "models/press.onnx"
inputs = ["force", "temp"]
window = 16
"#;

    /// SMALL with `model` (TOML text of a `[machine_types.press.model]` table) added after
    /// the press's sensors.
    fn with_model(model: &str) -> String {
        SMALL.replace("\n[[sites]]", &format!("{model}\n[[sites]]"))
    }

    #[test]
    fn machine_type_model_parses_with_defaults_and_round_trips() {
        let spec = PlantSpec::from_toml(&with_model(MODEL), "p").expect("valid");
        let model = spec.machine_types["press"].model.as_ref().expect("model");
        assert_eq!(model.file, std::path::Path::new("models/press.onnx"));
        assert_eq!(model.inputs, ["force", "temp"]);
        assert_eq!((model.window, model.every, model.threshold), (16, 1, 3.0));
        let again = PlantSpec::from_toml(&spec.to_toml(), "again").expect("round trip");
        assert_eq!(again, spec);
    }

    /// `SMALL` with setpoints on the press type.
    fn with_setpoints(setpoints: &str) -> String {
        SMALL.replace("[[sites]]", &format!("{setpoints}\n[[sites]]"))
    }

    const SETPOINTS: &str = r#"
[[machine_types.press.setpoints]]
name = "speed_setpoint_pct"
value_type = "int"
min = 0.0
max = 150.0
unit = "%"
[[machine_types.press.setpoints]]
name = "run_enable"
value_type = "bool"
[[machine_types.press.setpoints]]
name = "pressure_bar"
max = 250.0
"#;

    #[test]
    fn setpoints_refuse_values_outside_their_range_or_of_another_type() {
        let spec = PlantSpec::from_toml(&with_setpoints(SETPOINTS), "p").expect("valid");
        let press = &spec.machine_types["press"];
        let speed = press.setpoint("speed_setpoint_pct").expect("listed");
        assert_eq!(speed.refuses(Value::Int(150)), None);
        assert_eq!(speed.refuses(Value::Int(0)), None);
        assert_eq!(
            speed.refuses(Value::Int(151)).as_deref(),
            Some("outside its range 0..=150 %")
        );
        assert_eq!(
            speed.refuses(Value::Float(12.5)).as_deref(),
            Some("a float where speed_setpoint_pct takes an int")
        );
        assert_eq!(speed.refuses(Value::Float(120.0)), None);
        assert!(speed.refuses(Value::Float(151.0)).is_some());
        let run = press.setpoint("run_enable").expect("listed");
        assert_eq!(run.refuses(Value::Bool(false)), None);
        assert_eq!(run.refuses(Value::Int(1)), None);
        assert!(run.refuses(Value::Int(2)).is_some());
        let pressure = press.setpoint("pressure_bar").expect("listed");
        assert_eq!(pressure.value_type, ValueType::Float);
        assert_eq!(pressure.refuses(Value::Int(-5)), None);
        assert_eq!(
            pressure.refuses(Value::Float(f64::NAN)).as_deref(),
            Some("not a finite number")
        );
        assert_eq!(
            pressure.refuses(Value::Float(250.5)).as_deref(),
            Some("above its maximum 250")
        );
        assert!(press.setpoint("temp").is_none());
        // Written back as read.
        let again = PlantSpec::from_toml(&spec.to_toml(), "again").expect("valid");
        assert_eq!(again.machine_types["press"].setpoints, press.setpoints);
    }

    #[test]
    fn a_machine_state_is_what_the_type_says_a_plc_value_means() {
        let spec = PlantSpec::from_toml(SMALL, "p").expect("valid");
        let plain = &spec.machine_types["press"];
        // Default: the codes 0..=3, whole floats as codes, a bool as running or idle.
        assert_eq!(plain.state_code(Value::Int(3)), Some(3));
        assert_eq!(plain.state_code(Value::Int(4)), None);
        assert_eq!(plain.state_code(Value::Float(1.0)), Some(1));
        assert_eq!(plain.state_code(Value::Float(1.5)), None);
        assert_eq!(plain.state_code(Value::Bool(true)), Some(1));
        assert_eq!(plain.state_code(Value::Bool(false)), Some(0));
        // A PLC's own codes: only those listed mean a state.
        let text = SMALL.replace(
            "[[machine_types.press.sensors]]\nname = \"temp\"",
            "state_map = { \"0\" = \"down\", \"5\" = \"running\", \"7\" = \"setup\", \"9\" = \"idle\" }\n[[machine_types.press.sensors]]\nname = \"temp\"",
        );
        let spec = PlantSpec::from_toml(&text, "p").expect("valid");
        let mapped = &spec.machine_types["press"];
        assert_eq!(mapped.state_code(Value::Int(5)), Some(1));
        assert_eq!(mapped.state_code(Value::Float(7.0)), Some(2));
        assert_eq!(mapped.state_code(Value::Int(0)), Some(3));
        assert_eq!(mapped.state_code(Value::Int(1)), None);
        assert_eq!(mapped.state_code(Value::Bool(true)), None);
        let again = PlantSpec::from_toml(&spec.to_toml(), "again").expect("valid");
        assert_eq!(again.machine_types["press"].state_map, mapped.state_map);
        let bad = text.replace("\"idle\" }", "\"sleeping\" }");
        assert!(PlantSpec::from_toml(&bad, "p").is_err());
        for key in ["05", "5.0", "TRUE", "run"] {
            let bad = text.replace("\"9\" = ", &format!("\"{key}\" = "));
            let msg = PlantSpec::from_toml(&bad, "p").expect_err(key).to_string();
            assert!(msg.contains("state_map") && msg.contains(key), "{msg}");
        }
    }

    #[test]
    fn setpoints_that_cannot_be_checked_are_refused_at_load() {
        for (text, says) in [
            (
                "[[machine_types.press.setpoints]]\nname = \"run\"\nvalue_type = \"bool\"\nmax = 1.0",
                "a bool setpoint has no min or max",
            ),
            (
                "[[machine_types.press.setpoints]]\nname = \"s\"\nmin = 5.0\nmax = 1.0",
                "min 5 must be at most max 1",
            ),
            (
                "[[machine_types.press.setpoints]]\nname = \"temp\"",
                "a sensor has the same name",
            ),
            (
                "[[machine_types.press.setpoints]]\nname = \"s\"\n[[machine_types.press.setpoints]]\nname = \"s\"",
                "defined twice",
            ),
        ] {
            let msg = PlantSpec::from_toml(&with_setpoints(text), "p")
                .expect_err(says)
                .to_string();
            assert!(msg.contains("setpoint") && msg.contains(says), "{msg}");
        }
    }

    #[test]
    fn spec_without_model_parses_and_writes_no_model() {
        let spec = PlantSpec::from_toml(SMALL, "p").expect("valid");
        assert_eq!(spec.machine_types["press"].model, None);
        assert!(!spec.to_toml().contains("model"), "{}", spec.to_toml());
    }

    #[test]
    fn model_input_that_is_not_a_sensor_names_the_type_and_the_sensor() {
        let text = with_model(&MODEL.replace(r#""temp"]"#, r#""tmp"]"#));
        let msg = PlantSpec::from_toml(&text, "p")
            .expect_err("unknown input")
            .to_string();
        assert!(
            msg.contains(
                r#"machine type "press": model: input "tmp" is not a sensor of the type (sensors: temp, force)"#
            ),
            "{msg}"
        );
    }

    #[test]
    fn model_window_every_threshold_and_inputs_out_of_bounds_are_refused() {
        for (from, to, expect) in [
            (
                "window = 16",
                "window = 0",
                "window must be between 1 and 4096 samples, got 0",
            ),
            ("window = 16", "window = 5000", "got 5000"),
            (
                "window = 16",
                "window = 16\nevery = 0",
                "every must be between 1",
            ),
            (
                "window = 16",
                "window = 16\nthreshold = nan",
                "threshold must be finite",
            ),
            (
                r#"["force", "temp"]"#,
                "[]",
                "inputs must name 1 to 64 sensors, got 0",
            ),
            (
                r#"["force", "temp"]"#,
                r#"["temp", "temp"]"#,
                r#"input "temp" is listed twice"#,
            ),
            ("window = 16", "window = 16\nwindows = 3", "unknown field"),
        ] {
            let text = with_model(&MODEL.replace(from, to));
            let msg = PlantSpec::from_toml(&text, "p").expect_err(to).to_string();
            assert!(msg.contains(expect), "{to}: {msg}");
        }
    }

    /// SMALL's line with one more press that drops `force`, tunes `temp` and adds `oil`.
    fn with_override(instance: &str) -> String {
        SMALL.replace(
            r#"machines = [{ name = "press", type = "press", count = 2 }, { name = "hydro", type = "press" }]"#,
            &format!(
                r#"machines = [{{ name = "press", type = "press", count = 2 }}, {{ name = "hydro", type = "press" }}]
[[sites.areas.lines]]
name = "line-2"
[[sites.areas.lines.machines]]
{instance}"#
            ),
        )
    }

    const OVERRIDE: &str = r#"name = "old"
type = "press"
drop = ["force"]
tune.temp = { unit = "degF", max = 300.0, alarms = [] }
[[sites.areas.lines.machines.sensors]]
name = "oil"
unit = "bar"
min = 0.0
max = 10.0"#;

    #[test]
    fn an_instance_drops_tunes_and_adds_sensors_without_a_type_of_its_own() {
        let spec = PlantSpec::from_toml(&with_override(OVERRIDE), "p").expect("valid");
        let assets = spec.assets();
        let find = |p: &str| assets.iter().find(|a| a.path.as_str() == p);
        let old = "acme/berlin/assembly/line-2/old";
        assert!(find(&format!("{old}/force")).is_none(), "force is dropped");
        let Some(AssetKind::Sensor {
            type_name,
            spec: temp,
        }) = find(&format!("{old}/temp")).map(|a| &a.kind)
        else {
            panic!("old/temp is a sensor");
        };
        assert_eq!(&**type_name, "press.temp");
        assert_eq!(
            (temp.unit.as_str(), temp.min, temp.max),
            ("degF", Some(0.0), Some(300.0))
        );
        assert!(temp.alarms.is_empty());
        let Some(AssetKind::Sensor { spec: oil, .. }) =
            find(&format!("{old}/oil")).map(|a| &a.kind)
        else {
            panic!("old/oil is a sensor");
        };
        assert_eq!((oil.unit.as_str(), oil.max), ("bar", Some(10.0)));
        let Some(AssetKind::Machine {
            type_name,
            spec: mt,
        }) = find(old).map(|a| &a.kind)
        else {
            panic!("old is a machine");
        };
        assert_eq!(&**type_name, "press", "queries by type still find it");
        let names: Vec<&str> = mt.sensors.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["temp", "oil"]);
        // The other presses keep the type, sharing its specs.
        let Some(AssetKind::Sensor {
            spec: hydro_temp, ..
        }) = find("acme/berlin/assembly/line-1/hydro/temp").map(|a| &a.kind)
        else {
            panic!("hydro/temp");
        };
        let Some(AssetKind::Sensor {
            spec: press_temp, ..
        }) = find("acme/berlin/assembly/line-1/press-1/temp").map(|a| &a.kind)
        else {
            panic!("press-1/temp");
        };
        assert!(Arc::ptr_eq(hydro_temp, press_temp));
        assert_eq!(hydro_temp.unit, "degC");
        assert!(find("acme/berlin/assembly/line-1/hydro/force").is_some());
        // Written back as read.
        let again = PlantSpec::from_toml(&spec.to_toml(), "again").expect("round trip");
        assert_eq!(again, spec);
    }

    #[test]
    fn an_override_of_a_sensor_the_type_lacks_or_a_bad_result_names_the_machine() {
        for (from, to, expect) in [
            (
                r#"drop = ["force"]"#,
                r#"drop = ["forse"]"#,
                r#"acme/berlin/assembly/line-2/old: drop: type "press" has no sensor "forse" (its sensors: temp, force)"#,
            ),
            (
                "tune.temp = {",
                "tune.tmp = {",
                r#"tune: type "press" has no sensor "tmp""#,
            ),
            (
                r#"drop = ["force"]"#,
                r#"drop = ["temp"]"#,
                r#"acme/berlin/assembly/line-2/old: tune: sensor "temp" is dropped"#,
            ),
            (
                r#"name = "oil""#,
                r#"name = "temp""#,
                r#"sensors: "temp" is a sensor of type "press" already; tune it, or drop it to replace it"#,
            ),
            (
                "max = 300.0",
                "max = -1.0",
                r#"acme/berlin/assembly/line-2/old: sensor "temp": min 0 must be below max -1"#,
            ),
            (
                r#"name = "oil""#,
                r#"name = "Oil""#,
                r#"acme/berlin/assembly/line-2/old: sensor "Oil": name is not a slug"#,
            ),
        ] {
            let text = with_override(&OVERRIDE.replace(from, to));
            let msg = PlantSpec::from_toml(&text, "p").expect_err(to).to_string();
            assert!(msg.contains(expect), "{to}: {msg}");
        }
    }

    #[test]
    fn overrides_of_counted_machines_apply_to_each_and_name_them() {
        let counted = OVERRIDE.replace(r#"name = "old""#, "name = \"old\"\ncount = 2");
        let spec = PlantSpec::from_toml(&with_override(&counted), "p").expect("valid");
        let assets = spec.assets();
        let mt = |p: &str| match &assets.iter().find(|a| a.path.as_str() == p).expect(p).kind {
            AssetKind::Machine { spec, .. } => spec.clone(),
            _ => panic!("{p} is a machine"),
        };
        let (one, two) = (
            mt("acme/berlin/assembly/line-2/old-1"),
            mt("acme/berlin/assembly/line-2/old-2"),
        );
        assert!(
            Arc::ptr_eq(&one, &two),
            "one effective type for the counted machines"
        );
        assert_eq!(one.sensors.len(), 2);
        let msg = PlantSpec::from_toml(
            &with_override(&counted.replace(r#"drop = ["force"]"#, r#"drop = ["forse"]"#)),
            "p",
        )
        .expect_err("forse")
        .to_string();
        assert!(
            msg.contains(r#"acme/berlin/assembly/line-2/old-{1..2}: drop: type "press" has no sensor "forse""#),
            "{msg}"
        );
    }

    #[test]
    fn a_model_input_keeps_its_unit_and_its_spec() {
        let with_model = |instance: &str| {
            with_override(instance).replace("\n[[sites]]", &format!("{MODEL}\n[[sites]]"))
        };
        let msg = PlantSpec::from_toml(
            &with_model(&OVERRIDE.replace(r#"drop = ["force"]"#, "")),
            "p",
        )
        .expect_err("temp is an input")
        .to_string();
        assert!(
            msg.contains(r#"tune: "temp" is an input of type "press"'s model, made for its unit"#),
            "{msg}"
        );
        let replaced = OVERRIDE
            .replace(r#"drop = ["force"]"#, r#"drop = ["temp"]"#)
            .replace(
                "tune.temp = { unit = \"degF\", max = 300.0, alarms = [] }",
                "",
            )
            .replace(r#"name = "oil""#, r#"name = "temp""#);
        let msg = PlantSpec::from_toml(&with_model(&replaced), "p")
            .expect_err("temp replaced")
            .to_string();
        assert!(
            msg.contains(
                r#"sensors: "temp" is an input of type "press"'s model; it cannot be replaced here"#
            ),
            "{msg}"
        );
        // Its limits may change.
        let limits = OVERRIDE
            .replace(r#"drop = ["force"]"#, "")
            .replace("unit = \"degF\", ", "");
        PlantSpec::from_toml(&with_model(&limits), "p").expect("limits of an input may change");
    }

    #[test]
    fn dropping_a_model_input_is_refused_at_the_machine() {
        let text = with_override(OVERRIDE).replace("\n[[sites]]", &format!("{MODEL}\n[[sites]]"));
        let msg = PlantSpec::from_toml(&text, "p")
            .expect_err("force is an input")
            .to_string();
        assert!(
            msg.contains(r#"acme/berlin/assembly/line-2/old: model: input "force" is not a sensor of the type"#),
            "{msg}"
        );
    }

    #[test]
    fn lines_and_areas_list_setpoints_checked_as_a_types_are() {
        let text = SMALL.replace(
            "[[sites.areas.lines]]\nname = \"line-1\"\n",
            "setpoints = [{ name = \"hall_temp_sp\", min = 15.0, max = 30.0, unit = \"degC\" }]\n\
             [[sites.areas.lines]]\nname = \"line-1\"\n\
             setpoints = [{ name = \"line_speed_pct\", value_type = \"int\", min = 0.0, max = 120.0 }]\n",
        );
        let spec = PlantSpec::from_toml(&text, "p").expect("valid");
        let assets = spec.assets();
        let kind = |p: &str| &assets.iter().find(|a| a.path.as_str() == p).expect(p).kind;
        let line = kind("acme/berlin/assembly/line-1");
        assert_eq!(line.level(), Level::Line);
        assert_eq!(line.setpoints()[0].name, "line_speed_pct");
        assert_eq!(
            line.setpoints()[0].refuses(Value::Int(130)).as_deref(),
            Some("outside its range 0..=120")
        );
        assert_eq!(kind("acme/berlin/assembly").setpoints()[0].unit, "degC");
        assert!(kind("acme/berlin").setpoints().is_empty());
        let again = PlantSpec::from_toml(&spec.to_toml(), "again").expect("round trip");
        assert_eq!(again, spec);
        for (from, to, expect) in [
            (
                "name = \"line_speed_pct\"",
                "name = \"state\"",
                "acme/berlin/assembly/line-1: setpoint \"state\": state is a property connections feed, not a setpoint",
            ),
            (
                "min = 15.0, max = 30.0",
                "min = 35.0, max = 30.0",
                "acme/berlin/assembly: setpoint \"hall_temp_sp\": min 35 must be at most max 30",
            ),
        ] {
            let msg = PlantSpec::from_toml(&text.replace(from, to), "p")
                .expect_err(to)
                .to_string();
            assert!(msg.contains(expect), "{to}: {msg}");
        }
    }
}
