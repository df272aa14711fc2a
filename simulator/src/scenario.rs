//! Scenario files: a versioned TOML file that schedules faults on a plant's assets at given
//! simulated times and sets how random faults are drawn. Parsed and checked against the plant
//! spec once (`Scenario::from_toml`); `PlantSim::with_scenario` then runs it.
//!
//! ```toml
//! version = 1
//! seed = 7              # optional, overrides --seed
//! random_faults = true  # keep the random faults drawn from the seed (default true)
//! fault_rate = 1.0      # multiplier of the random fault rates (default 1.0)
//! [[faults]]
//! asset = "acme/berlin/assembly/line-1/oven-1"
//! kind = "overheating"
//! at = "10m"            # simulated time after the start
//! duration = "2m"       # every kind but spike
//! [[faults]]
//! asset = "acme/berlin/assembly/line-1/oven-1/fan-speed"
//! kind = "dropout"      # or sensor_bias: both on a sensor
//! at = "1h"
//! duration = "3m"
//! ```
//!
//! Kinds: overheating (a machine or a temperature sensor with a high limit), stuck_sensor,
//! spike, dropout, sensor_bias (a sensor), bearing_wear, breakdown, network_loss (a machine).
//! A scheduled sensor_bias's offset (2–5 % of the sensor's range, either sign) is hashed
//! from the seed, the sensor and its start time.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrotwin_models::alarm::LimitKind;
use ferrotwin_models::spec::{AssetKind, PlantSpec, SensorKind, SensorSpec};
use ferrotwin_models::{AssetPath, Level};
use serde::Deserialize;
use toml::Spanned;

use crate::model::FaultKind;

/// The scenario file version this build reads.
pub const SCENARIO_VERSION: i64 = 1;

/// A validated scenario: every fault names an asset of the plant it was checked against.
#[derive(Debug, Clone, PartialEq)]
pub struct Scenario {
    /// Overrides the run's seed when set.
    pub seed: Option<u64>,
    /// False: only the scheduled faults happen.
    pub random_faults: bool,
    /// Multiplies the rate of every random fault kind; finite and > 0.
    pub fault_rate: f64,
    /// In file order.
    pub faults: Vec<ScheduledFault>,
}

impl Default for Scenario {
    /// What a run without a scenario file does: random faults at their documented rates.
    fn default() -> Scenario {
        Scenario {
            seed: None,
            random_faults: true,
            fault_rate: 1.0,
            faults: Vec::new(),
        }
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduledFault {
    /// The asset the fault acts on and is labelled on: a sensor for overheating, stuck_sensor,
    /// spike, dropout and sensor_bias (an overheating written on a machine is resolved to the machine's first
    /// temperature sensor with a high alarm limit), a machine for the other kinds.
    pub asset: AssetPath,
    pub kind: FaultKind,
    /// Simulated time after the start of the run.
    pub at_ms: u64,
    /// 0 for a spike (one sample); > 0 otherwise. For bearing_wear, the time to failure.
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("{}: cannot read the scenario", .file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a valid scenario: {message}", .file.display())]
    Syntax { file: PathBuf, message: String },
    #[error("{}: version: missing (this build reads `version = {SCENARIO_VERSION}`)", .file.display())]
    MissingVersion { file: PathBuf },
    #[error(
        "{}: version: {found} is not supported (this build reads version {SCENARIO_VERSION})",
        .file.display()
    )]
    Version { file: PathBuf, found: String },
    #[error("{}: fault_rate: {value} is not a finite number > 0", .file.display())]
    FaultRate { file: PathBuf, value: f64 },
    #[error("{}:{line}: faults[{index}].{field}: {problem}", .file.display())]
    Fault {
        file: PathBuf,
        line: usize,
        index: usize,
        field: &'static str,
        problem: FaultProblem,
    },
}

/// What is wrong with one field of one `[[faults]]` entry.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FaultProblem {
    #[error("unknown fault kind {0:?} (known: {known})", known = known_kinds())]
    UnknownKind(String),
    #[error(
        "{0:?} is not a duration (a whole number and a unit, ms, s, m or h: \"90s\", \"10m\", \"2h\")"
    )]
    BadDuration(String),
    #[error("missing (every kind but spike lasts for a duration)")]
    MissingDuration,
    #[error("{0:?} is not longer than zero")]
    ZeroDuration(String),
    #[error("a spike is one sample and has no duration")]
    SpikeDuration,
    #[error("{path:?} is not an asset path: {error}")]
    BadPath { path: String, error: String },
    #[error("{path:?} is not in the plant (nearest existing parent: {nearest})")]
    UnknownAsset { path: String, nearest: String },
    #[error("{path} is a {level}; {kind} needs {needs}")]
    WrongLevel {
        path: AssetPath,
        level: Level,
        kind: &'static str,
        needs: &'static str,
    },
    #[error("{path} has no temperature sensor with a high alarm limit to overheat")]
    NothingToOverheat { path: AssetPath },
}

fn known_kinds() -> String {
    FaultKind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Parses a simulated duration: a whole number and a unit, `ms`, `s`, `m` or `h` (`"90s"`,
/// `"10m"`, `"2h"`). `None` if it is not one or overflows.
pub fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let scale = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(scale)
}

#[derive(Deserialize)]
struct Versioned {
    version: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    #[expect(
        dead_code,
        reason = "checked through `Versioned` before the full parse"
    )]
    version: i64,
    seed: Option<u64>,
    #[serde(default = "yes")]
    random_faults: bool,
    #[serde(default = "one")]
    fault_rate: f64,
    #[serde(default)]
    faults: Vec<Spanned<RawFault>>,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFault {
    asset: Spanned<String>,
    kind: Spanned<String>,
    at: Spanned<String>,
    duration: Option<Spanned<String>>,
}

/// What a scenario needs to know of each asset of the plant.
enum Target {
    /// A machine and its first temperature sensor with a high alarm limit, if any.
    Machine {
        hot: Option<AssetPath>,
    },
    Sensor {
        hot: bool,
    },
    /// Enterprise, site, area or line: exists, but no fault acts on it.
    Other,
}

fn is_hot(s: &SensorSpec) -> bool {
    s.kind == SensorKind::Temperature && s.alarms.iter().any(|a| a.kind == LimitKind::High)
}

fn targets(spec: &PlantSpec) -> HashMap<AssetPath, Target> {
    let mut out = HashMap::new();
    let mut machine: Option<AssetPath> = None;
    for a in spec.assets() {
        match &a.kind {
            AssetKind::Machine { .. } => {
                machine = Some(a.path.clone());
                out.insert(a.path, Target::Machine { hot: None });
            }
            AssetKind::Sensor { spec: s, .. } => {
                let hot = is_hot(s);
                if hot
                    && let Some(Target::Machine { hot: first @ None }) =
                        machine.as_ref().and_then(|m| out.get_mut(m))
                {
                    *first = Some(a.path.clone());
                }
                out.insert(a.path, Target::Sensor { hot });
            }
            _ => {
                out.insert(a.path, Target::Other);
            }
        }
    }
    out
}

fn line_of(text: &str, offset: usize) -> usize {
    text.get(..offset)
        .map_or(1, |t| t.matches('\n').count() + 1)
}

impl Scenario {
    /// Reads and validates `file` against `spec`.
    pub fn load(file: &Path, spec: &PlantSpec) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(file).map_err(|source| ScenarioError::Read {
            file: file.to_path_buf(),
            source,
        })?;
        Scenario::from_toml(&text, file, spec)
    }

    /// Parses `text` (read from `file`, which names it in errors) and checks every fault
    /// against `spec`: the asset exists and is of the level the kind acts on, the kind is
    /// known, the times are durations. Stops at the first problem.
    pub fn from_toml(text: &str, file: &Path, spec: &PlantSpec) -> Result<Scenario, ScenarioError> {
        let syntax = |e: toml::de::Error| ScenarioError::Syntax {
            file: file.to_path_buf(),
            message: e.to_string(),
        };
        // The version first, so a newer file fails on its version, not on a new field.
        let versioned: Versioned = toml::from_str(text).map_err(syntax)?;
        match versioned.version {
            None => {
                return Err(ScenarioError::MissingVersion {
                    file: file.to_path_buf(),
                });
            }
            Some(toml::Value::Integer(SCENARIO_VERSION)) => {}
            Some(other) => {
                return Err(ScenarioError::Version {
                    file: file.to_path_buf(),
                    found: other.to_string(),
                });
            }
        }
        let raw: RawScenario = toml::from_str(text).map_err(syntax)?;
        if !(raw.fault_rate.is_finite() && raw.fault_rate > 0.0) {
            return Err(ScenarioError::FaultRate {
                file: file.to_path_buf(),
                value: raw.fault_rate,
            });
        }
        let targets = if raw.faults.is_empty() {
            HashMap::new()
        } else {
            targets(spec)
        };
        let mut faults = Vec::with_capacity(raw.faults.len());
        for (index, f) in raw.faults.iter().enumerate() {
            let entry_line = line_of(text, f.span().start);
            let f = f.get_ref();
            let fail = |field: &'static str, span: Option<std::ops::Range<usize>>, problem| {
                ScenarioError::Fault {
                    file: file.to_path_buf(),
                    line: span.map_or(entry_line, |s| line_of(text, s.start)),
                    index,
                    field,
                    problem,
                }
            };
            let kind = FaultKind::parse(f.kind.get_ref()).ok_or_else(|| {
                fail(
                    "kind",
                    Some(f.kind.span()),
                    FaultProblem::UnknownKind(f.kind.get_ref().clone()),
                )
            })?;
            let at_ms = parse_duration_ms(f.at.get_ref()).ok_or_else(|| {
                fail(
                    "at",
                    Some(f.at.span()),
                    FaultProblem::BadDuration(f.at.get_ref().clone()),
                )
            })?;
            let duration_ms = match (&f.duration, kind) {
                (None, FaultKind::Spike) => 0,
                (Some(d), FaultKind::Spike) => {
                    return Err(fail(
                        "duration",
                        Some(d.span()),
                        FaultProblem::SpikeDuration,
                    ));
                }
                (None, _) => return Err(fail("duration", None, FaultProblem::MissingDuration)),
                (Some(d), _) => match parse_duration_ms(d.get_ref()) {
                    None => {
                        return Err(fail(
                            "duration",
                            Some(d.span()),
                            FaultProblem::BadDuration(d.get_ref().clone()),
                        ));
                    }
                    Some(0) => {
                        return Err(fail(
                            "duration",
                            Some(d.span()),
                            FaultProblem::ZeroDuration(d.get_ref().clone()),
                        ));
                    }
                    Some(ms) => ms,
                },
            };
            let asset = resolve_asset(&f.asset, kind, &targets)
                .map_err(|problem| fail("asset", Some(f.asset.span()), problem))?;
            faults.push(ScheduledFault {
                asset,
                kind,
                at_ms,
                duration_ms,
            });
        }
        Ok(Scenario {
            seed: raw.seed,
            random_faults: raw.random_faults,
            fault_rate: raw.fault_rate,
            faults,
        })
    }
}

/// The asset a fault of `kind` written on `written` acts on.
fn resolve_asset(
    written: &Spanned<String>,
    kind: FaultKind,
    targets: &HashMap<AssetPath, Target>,
) -> Result<AssetPath, FaultProblem> {
    let text = written.get_ref();
    let path = AssetPath::parse(text).map_err(|e| FaultProblem::BadPath {
        path: text.clone(),
        error: e.to_string(),
    })?;
    let Some(target) = targets.get(&path) else {
        let mut nearest = path.parent();
        while let Some(p) = nearest.as_ref().filter(|p| !targets.contains_key(*p)) {
            nearest = p.parent();
        }
        return Err(FaultProblem::UnknownAsset {
            path: text.clone(),
            nearest: nearest.map_or_else(|| "none".to_string(), |p| p.to_string()),
        });
    };
    let wrong = |needs| FaultProblem::WrongLevel {
        path: path.clone(),
        level: path.level(),
        kind: kind.as_str(),
        needs,
    };
    match (kind, target) {
        (FaultKind::Overheating, Target::Machine { hot: Some(sensor) }) => Ok(sensor.clone()),
        (FaultKind::Overheating, Target::Sensor { hot: true }) => Ok(path),
        (FaultKind::Overheating, Target::Machine { hot: None } | Target::Sensor { hot: false }) => {
            Err(FaultProblem::NothingToOverheat { path })
        }
        (FaultKind::Overheating, Target::Other) => Err(wrong("a machine or a temperature sensor")),
        (
            FaultKind::StuckSensor | FaultKind::Spike | FaultKind::Dropout | FaultKind::SensorBias,
            Target::Sensor { .. },
        ) => Ok(path),
        (
            FaultKind::StuckSensor | FaultKind::Spike | FaultKind::Dropout | FaultKind::SensorBias,
            _,
        ) => Err(wrong("a sensor")),
        (
            FaultKind::BearingWear | FaultKind::Breakdown | FaultKind::NetworkLoss,
            Target::Machine { .. },
        ) => Ok(path),
        (FaultKind::BearingWear | FaultKind::Breakdown | FaultKind::NetworkLoss, _) => {
            Err(wrong("a machine"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{PlantSize, generate};

    /// One line with a press, a conveyor and an oven (seed 1 picks one of each).
    fn plant() -> PlantSpec {
        generate(
            PlantSize {
                sites: 1,
                areas: 1,
                lines: 1,
                machines: 3,
                sensors_per_machine: 0,
            },
            1,
        )
    }

    const OVEN: &str = "acme/berlin/assembly/line-1/oven-1";

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::from_toml(text, Path::new("s.toml"), &plant())
    }

    fn error(text: &str) -> String {
        parse(text).expect_err("scenario is invalid").to_string()
    }

    fn one_fault(asset: &str, kind: &str, at: &str, duration: &str) -> String {
        format!(
            "version = 1\n[[faults]]\nasset = \"{asset}\"\nkind = \"{kind}\"\nat = \"{at}\"\n{duration}"
        )
    }

    #[test]
    fn parses_a_scenario_and_resolves_a_machine_overheating_to_its_first_hot_sensor() {
        let s = parse(&format!(
            "version = 1\nseed = 7\nrandom_faults = false\nfault_rate = 2.5\n\
             [[faults]]\nasset = \"{OVEN}\"\nkind = \"overheating\"\nat = \"10m\"\nduration = \"2m\"\n\
             [[faults]]\nasset = \"{OVEN}/fan-speed\"\nkind = \"spike\"\nat = \"90s\"\n\
             [[faults]]\nasset = \"{OVEN}\"\nkind = \"network_loss\"\nat = \"2h\"\nduration = \"500ms\"\n"
        ))
        .expect("valid");
        assert_eq!(s.seed, Some(7));
        assert!(!s.random_faults);
        assert_eq!(s.fault_rate, 2.5);
        let path = |p: &str| AssetPath::parse(p).expect("valid path");
        assert_eq!(
            s.faults,
            vec![
                ScheduledFault {
                    asset: path(&format!("{OVEN}/zone-1-temp")),
                    kind: FaultKind::Overheating,
                    at_ms: 600_000,
                    duration_ms: 120_000,
                },
                ScheduledFault {
                    asset: path(&format!("{OVEN}/fan-speed")),
                    kind: FaultKind::Spike,
                    at_ms: 90_000,
                    duration_ms: 0,
                },
                ScheduledFault {
                    asset: path(OVEN),
                    kind: FaultKind::NetworkLoss,
                    at_ms: 7_200_000,
                    duration_ms: 500,
                },
            ]
        );
    }

    #[test]
    fn omitted_settings_keep_random_faults_at_their_rate() {
        let s = parse("version = 1\n").expect("valid");
        assert_eq!(s, Scenario::default());
    }

    #[test]
    fn unknown_asset_names_file_line_fault_and_nearest_existing_parent() {
        let text = one_fault(
            "acme/berlin/assembly/line-9/oven-1",
            "breakdown",
            "1m",
            "duration = \"1m\"",
        );
        assert_eq!(
            error(&text),
            "s.toml:3: faults[0].asset: \"acme/berlin/assembly/line-9/oven-1\" is not in the plant \
             (nearest existing parent: acme/berlin/assembly)"
        );
        let text = one_fault("other/x", "breakdown", "1m", "duration = \"1m\"");
        assert_eq!(
            error(&text),
            "s.toml:3: faults[0].asset: \"other/x\" is not in the plant (nearest existing parent: none)"
        );
    }

    #[test]
    fn unknown_kind_lists_the_known_kinds() {
        let text = one_fault(OVEN, "overheat", "1m", "duration = \"1m\"");
        assert_eq!(
            error(&text),
            "s.toml:4: faults[0].kind: unknown fault kind \"overheat\" (known: overheating, \
             bearing_wear, stuck_sensor, spike, breakdown, network_loss, dropout, sensor_bias)"
        );
    }

    #[test]
    fn bad_durations_name_the_field() {
        let text = one_fault(OVEN, "breakdown", "10 minutes", "duration = \"1m\"");
        assert_eq!(
            error(&text),
            "s.toml:5: faults[0].at: \"10 minutes\" is not a duration (a whole number and a unit, \
             ms, s, m or h: \"90s\", \"10m\", \"2h\")"
        );
        let text = one_fault(OVEN, "breakdown", "1m", "duration = \"1.5h\"");
        assert_eq!(
            error(&text),
            "s.toml:6: faults[0].duration: \"1.5h\" is not a duration (a whole number and a unit, \
             ms, s, m or h: \"90s\", \"10m\", \"2h\")"
        );
        let text = one_fault(OVEN, "breakdown", "1m", "");
        assert_eq!(
            error(&text),
            "s.toml:2: faults[0].duration: missing (every kind but spike lasts for a duration)"
        );
        let text = one_fault(OVEN, "breakdown", "1m", "duration = \"0s\"");
        assert_eq!(
            error(&text),
            "s.toml:6: faults[0].duration: \"0s\" is not longer than zero"
        );
    }

    #[test]
    fn a_kind_on_the_wrong_level_says_what_it_needs() {
        let text = one_fault(OVEN, "stuck_sensor", "1m", "duration = \"1m\"");
        assert_eq!(
            error(&text),
            format!("s.toml:3: faults[0].asset: {OVEN} is a machine; stuck_sensor needs a sensor")
        );
        let text = one_fault(
            &format!("{OVEN}/fan-speed"),
            "overheating",
            "1m",
            "duration = \"1m\"",
        );
        assert_eq!(
            error(&text),
            format!(
                "s.toml:3: faults[0].asset: {OVEN}/fan-speed has no temperature sensor with a \
                 high alarm limit to overheat"
            )
        );
    }

    #[test]
    fn version_and_unknown_fields_are_checked() {
        assert_eq!(
            error("version = 2\n"),
            "s.toml: version: 2 is not supported (this build reads version 1)"
        );
        assert_eq!(
            error("seed = 1\n"),
            "s.toml: version: missing (this build reads `version = 1`)"
        );
        let err = parse("version = 1\nrandom_fault = false\n").expect_err("typo");
        assert!(matches!(err, ScenarioError::Syntax { .. }), "{err}");
        assert!(err.to_string().contains("random_fault"), "{err}");
        assert_eq!(
            error("version = 1\nfault_rate = 0.0\n"),
            "s.toml: fault_rate: 0 is not a finite number > 0"
        );
    }

    #[test]
    fn durations_take_whole_numbers_with_a_unit() {
        assert_eq!(parse_duration_ms("90s"), Some(90_000));
        assert_eq!(parse_duration_ms("10m"), Some(600_000));
        assert_eq!(parse_duration_ms("2h"), Some(7_200_000));
        assert_eq!(parse_duration_ms("250ms"), Some(250));
        for bad in [
            "",
            "10",
            "m",
            "1.5h",
            "-1s",
            "10 m",
            "1d",
            "99999999999999999999h",
        ] {
            assert_eq!(parse_duration_ms(bad), None, "{bad:?}");
        }
    }
}
