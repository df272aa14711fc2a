//! Generates plant specs of any size, from a handful of sensors to a million, for demos,
//! tests and benchmarks. The spec is plain `models::spec` data: what the generator writes is
//! what a user could have written by hand.

use std::collections::BTreeMap;

use ferrotwin_models::Severity;
use ferrotwin_models::alarm::{AlarmLimit, LimitKind};
use ferrotwin_models::spec::{
    AreaSpec, LineSpec, MachineInstance, MachineType, PlantSpec, SPEC_VERSION, SensorKind,
    SensorSpec, SiteSpec,
};
use ferrotwin_models::value::ValueType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How big a generated plant is. Counts are per parent: `areas` per site, `lines` per area,
/// `machines` per line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlantSize {
    pub sites: u32,
    pub areas: u32,
    pub lines: u32,
    pub machines: u32,
    /// 0 = each machine type's natural 4–6 sensors; K > 0 pads (with `aux-N` generic sensors)
    /// or truncates every type's sensor list to exactly K.
    pub sensors_per_machine: u32,
}

/// Mean natural sensor count over `MACHINE_TYPES`, used by `PlantSize::sensor_count` when the
/// seed, not the size, decides each machine's type.
const MEAN_NATURAL_SENSORS: u64 = 5;

impl PlantSize {
    /// The `ferrotwin demo` plant: 24 machines, about 120 sensors.
    pub const DEMO: PlantSize = PlantSize {
        sites: 2,
        areas: 2,
        lines: 2,
        machines: 3,
        sensors_per_machine: 0,
    };

    /// One site, area and line with three machines: the smallest plant that shows a line.
    pub const ONE_LINE: PlantSize = PlantSize {
        sites: 1,
        areas: 1,
        lines: 1,
        machines: 3,
        sensors_per_machine: 0,
    };

    pub fn machine_count(&self) -> u64 {
        u64::from(self.sites)
            * u64::from(self.areas)
            * u64::from(self.lines)
            * u64::from(self.machines)
    }

    /// Exact when `sensors_per_machine > 0`. With 0 the seed picks each machine's type, so
    /// this is the expected count (machines × the mean natural count of the types, 5); the
    /// generated spec itself is the exact answer.
    pub fn sensor_count(&self) -> u64 {
        let per_machine = match self.sensors_per_machine {
            0 => MEAN_NATURAL_SENSORS,
            k => u64::from(k),
        };
        self.machine_count() * per_machine
    }
}

const ENTERPRISE: &str = "acme";
const SITE_NAMES: &[&str] = &[
    "berlin",
    "paris",
    "austin",
    "osaka",
    "lyon",
    "turin",
    "porto",
    "krakow",
    "dublin",
    "seattle",
    "monterrey",
    "pune",
];
const AREA_NAMES: &[&str] = &[
    "assembly",
    "machining",
    "paint",
    "packaging",
    "welding",
    "stamping",
    "molding",
    "finishing",
];

/// Names from the list, then `{prefix}-N` (N counts from 1 over all names).
fn name_at(list: &[&str], prefix: &str, i: usize) -> String {
    match list.get(i) {
        Some(n) => (*n).to_string(),
        None => format!("{prefix}-{}", i + 1),
    }
}

fn alarm(
    name: &str,
    kind: LimitKind,
    limit: f64,
    deadband: f64,
    on_delay_ms: u64,
    severity: Severity,
) -> AlarmLimit {
    AlarmLimit {
        name: name.to_string(),
        kind,
        limit,
        deadband,
        on_delay_ms,
        off_delay_ms: 0,
        severity,
    }
}

/// A sensor; `alarms` may be empty. The first sensor of every type is its temperature, so a
/// truncated type keeps the sensor the overheating fault needs.
#[expect(
    clippy::too_many_arguments,
    reason = "a table row: one argument per spec column"
)]
fn sensor(
    name: &str,
    kind: SensorKind,
    unit: &str,
    value_type: ValueType,
    min: f64,
    max: f64,
    period_ms: u64,
    alarms: Vec<AlarmLimit>,
) -> SensorSpec {
    SensorSpec {
        name: name.to_string(),
        kind,
        unit: unit.to_string(),
        value_type,
        min: Some(min),
        max: Some(max),
        period_ms,
        stale_after_periods: 3,
        alarms,
        detect: Default::default(),
    }
}

/// Vibration alarm at the ISO 10816 class II "unacceptable" boundary (11.2 mm/s RMS) or lower
/// for smaller machines: healthy bearings stay well below it, worn ones cross it.
fn vibration(limit: f64) -> SensorSpec {
    use SensorKind::Vibration;
    sensor(
        "vibration",
        Vibration,
        "mm/s",
        ValueType::Float,
        0.0,
        50.0,
        500,
        vec![alarm(
            "high",
            LimitKind::High,
            limit,
            0.5,
            5000,
            Severity::High,
        )],
    )
}

/// The machine types every generated plant defines, in the order the seed picks from.
pub const MACHINE_TYPES: [&str; 5] = ["cnc-mill", "press", "conveyor", "robot-cell", "oven"];

fn machine_type(name: &str) -> MachineType {
    use LimitKind::{High, Low};
    use SensorKind::*;
    use ValueType::{Bool, Float, Int};
    let (description, ideal_cycle_ms, sensors) = match name {
        "cnc-mill" => (
            "5-axis CNC milling centre",
            45_000.0,
            vec![
                sensor(
                    "spindle-temp",
                    Temperature,
                    "degC",
                    Float,
                    0.0,
                    150.0,
                    1000,
                    vec![alarm("high", High, 85.0, 2.0, 2000, Severity::High)],
                ),
                sensor(
                    "spindle-speed",
                    Speed,
                    "rpm",
                    Float,
                    0.0,
                    24_000.0,
                    1000,
                    vec![],
                ),
                vibration(11.2),
                sensor("power", Power, "kW", Float, 0.0, 40.0, 1000, vec![]),
                sensor(
                    "coolant-flow",
                    Flow,
                    "l/min",
                    Float,
                    0.0,
                    60.0,
                    1000,
                    vec![alarm("low", Low, 8.0, 1.0, 3000, Severity::Medium)],
                ),
            ],
        ),
        "press" => (
            "hydraulic stamping press",
            4_000.0,
            vec![
                sensor(
                    "oil-temp",
                    Temperature,
                    "degC",
                    Float,
                    0.0,
                    120.0,
                    1000,
                    vec![alarm("high", High, 70.0, 2.0, 2000, Severity::High)],
                ),
                sensor(
                    "hydraulic-pressure",
                    Pressure,
                    "bar",
                    Float,
                    0.0,
                    350.0,
                    1000,
                    vec![
                        alarm("high", High, 300.0, 5.0, 1000, Severity::Critical),
                        alarm("low", Low, 120.0, 5.0, 2000, Severity::High),
                    ],
                ),
                vibration(11.2),
                sensor("power", Power, "kW", Float, 0.0, 150.0, 1000, vec![]),
                sensor(
                    "stroke-rate",
                    Speed,
                    "1/min",
                    Float,
                    0.0,
                    30.0,
                    1000,
                    vec![],
                ),
            ],
        ),
        "conveyor" => (
            "belt conveyor",
            1_500.0,
            vec![
                sensor(
                    "motor-temp",
                    Temperature,
                    "degC",
                    Float,
                    0.0,
                    130.0,
                    1000,
                    vec![alarm("high", High, 95.0, 2.0, 2000, Severity::Medium)],
                ),
                sensor("belt-speed", Speed, "m/min", Float, 0.0, 60.0, 1000, vec![]),
                vibration(7.1),
                sensor("parts-on-belt", Generic, "", Int, 0.0, 40.0, 1000, vec![]),
            ],
        ),
        "robot-cell" => (
            "6-axis welding robot cell",
            30_000.0,
            vec![
                sensor(
                    "joint-temp",
                    Temperature,
                    "degC",
                    Float,
                    0.0,
                    120.0,
                    1000,
                    vec![alarm("high", High, 80.0, 2.0, 2000, Severity::High)],
                ),
                sensor("power", Power, "kW", Float, 0.0, 20.0, 1000, vec![]),
                vibration(4.5),
                sensor(
                    "air-pressure",
                    Pressure,
                    "bar",
                    Float,
                    0.0,
                    10.0,
                    1000,
                    vec![alarm("low", Low, 4.5, 0.2, 2000, Severity::Medium)],
                ),
                sensor("wire-feed", Speed, "m/min", Float, 0.0, 20.0, 1000, vec![]),
            ],
        ),
        "oven" => (
            "convection curing oven",
            60_000.0,
            vec![
                sensor(
                    "zone-1-temp",
                    Temperature,
                    "degC",
                    Float,
                    0.0,
                    300.0,
                    1000,
                    vec![alarm("high", High, 260.0, 3.0, 2000, Severity::Critical)],
                ),
                sensor(
                    "zone-2-temp",
                    Temperature,
                    "degC",
                    Float,
                    0.0,
                    300.0,
                    1000,
                    vec![alarm("high", High, 260.0, 3.0, 2000, Severity::Critical)],
                ),
                sensor("fan-speed", Speed, "rpm", Float, 0.0, 1800.0, 1000, vec![]),
                sensor("power", Power, "kW", Float, 0.0, 80.0, 1000, vec![]),
                // A Power-kind bool: on while the oven draws more than half its range.
                sensor("heater-on", Power, "", Bool, 0.0, 1.0, 1000, vec![]),
                sensor(
                    "exhaust-flow",
                    Flow,
                    "m3/h",
                    Float,
                    0.0,
                    1200.0,
                    1000,
                    vec![],
                ),
            ],
        ),
        other => unreachable!("machine type {other:?} is not in MACHINE_TYPES"),
    };
    MachineType {
        description: description.to_string(),
        ideal_cycle_ms,
        sensors,
        detect: Default::default(),
        model: None,
    }
}

fn fit_sensors(sensors: &mut Vec<SensorSpec>, k: u32) {
    let k = k as usize;
    sensors.truncate(k);
    let natural = sensors.len();
    for i in natural..k {
        let name = format!("aux-{}", i - natural + 1);
        sensors.push(sensor(
            &name,
            SensorKind::Generic,
            "",
            ValueType::Float,
            0.0,
            100.0,
            1000,
            vec![],
        ));
    }
}

/// Builds a valid plant spec for enterprise `acme`. The seed decides each machine's type; the
/// same size and seed give the same spec.
pub fn generate(size: PlantSize, seed: u64) -> PlantSpec {
    let machine_types: BTreeMap<String, MachineType> = MACHINE_TYPES
        .iter()
        .map(|name| {
            let mut mt = machine_type(name);
            if size.sensors_per_machine > 0 {
                fit_sensors(&mut mt.sensors, size.sensors_per_machine);
            }
            ((*name).to_string(), mt)
        })
        .collect();
    // Its own stream, apart from the simulator's per-machine streams of the same seed.
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6765_6e65_7261_7465);
    let mut sites = Vec::with_capacity(size.sites as usize);
    for s in 0..size.sites as usize {
        let mut areas = Vec::with_capacity(size.areas as usize);
        for a in 0..size.areas as usize {
            let mut lines = Vec::with_capacity(size.lines as usize);
            for l in 0..size.lines {
                // A line mixes types; one instance entry per type with its count keeps even a
                // million-sensor spec a few hundred kilobytes.
                let mut counts = [0u32; MACHINE_TYPES.len()];
                for _ in 0..size.machines {
                    counts[rng.random_range(0..MACHINE_TYPES.len())] += 1;
                }
                let machines = MACHINE_TYPES
                    .iter()
                    .zip(counts)
                    .filter(|(_, n)| *n > 0)
                    .map(|(t, n)| MachineInstance {
                        name: (*t).to_string(),
                        machine_type: (*t).to_string(),
                        count: Some(n),
                    })
                    .collect();
                lines.push(LineSpec {
                    name: format!("line-{}", l + 1),
                    machines,
                });
            }
            areas.push(AreaSpec {
                name: name_at(AREA_NAMES, "area", a),
                lines,
            });
        }
        sites.push(SiteSpec {
            name: name_at(SITE_NAMES, "site", s),
            areas,
        });
    }
    PlantSpec {
        version: SPEC_VERSION,
        enterprise: ENTERPRISE.to_string(),
        machine_types,
        sites,
    }
}

/// How many assets of each level a spec expands to, counted without expanding it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecCounts {
    pub sites: u64,
    pub areas: u64,
    pub lines: u64,
    pub machines: u64,
    pub sensors: u64,
}

/// Counts a valid spec's assets per level (machines of unknown types are skipped, as
/// `PlantSpec::assets` does).
pub fn count_assets(spec: &PlantSpec) -> SpecCounts {
    let mut c = SpecCounts::default();
    for site in &spec.sites {
        c.sites += 1;
        for area in &site.areas {
            c.areas += 1;
            for line in &area.lines {
                c.lines += 1;
                for m in &line.machines {
                    if let Some(mt) = spec.machine_types.get(&m.machine_type) {
                        let n = u64::from(m.count.unwrap_or(1));
                        c.machines += n;
                        c.sensors += n * mt.sensors.len() as u64;
                    }
                }
            }
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(sites: u32, areas: u32, lines: u32, machines: u32, k: u32) -> PlantSize {
        PlantSize {
            sites,
            areas,
            lines,
            machines,
            sensors_per_machine: k,
        }
    }

    #[test]
    fn generated_specs_validate_for_demo_and_other_sizes() {
        for (s, seed) in [
            (PlantSize::DEMO, 1),
            (size(1, 1, 1, 1, 0), 2),
            (size(14, 9, 2, 2, 0), 3),
            (size(1, 2, 3, 7, 1), 4),
            (size(2, 1, 1, 5, 9), 5),
        ] {
            let spec = generate(s, seed);
            spec.validate("generated").expect("generated spec is valid");
            let reparsed =
                PlantSpec::from_toml(&spec.to_toml(), "generated.toml").expect("round-trips");
            assert_eq!(reparsed, spec);
            let c = count_assets(&spec);
            assert_eq!(c.machines, s.machine_count());
            assert_eq!(c.lines, u64::from(s.sites * s.areas * s.lines));
            if s.sensors_per_machine > 0 {
                assert_eq!(c.sensors, s.sensor_count());
            }
            assert_eq!(
                c.sensors as usize,
                spec.assets().iter().filter(|a| a.path.depth() == 6).count()
            );
        }
        let spec = generate(size(14, 9, 1, 1, 0), 1);
        assert_eq!(spec.sites[0].name, "berlin");
        assert_eq!(spec.sites[12].name, "site-13");
        assert_eq!(spec.sites[0].areas[8].name, "area-9");
    }

    #[test]
    fn demo_plant_has_every_machine_type_and_about_five_sensors_per_machine() {
        let spec = generate(PlantSize::DEMO, 7);
        let c = count_assets(&spec);
        assert_eq!(c.machines, 24);
        assert!((96..=144).contains(&c.sensors), "{c:?}");
        for t in MACHINE_TYPES {
            let mt = &spec.machine_types[t];
            assert!((4..=6).contains(&mt.sensors.len()), "{t}");
            assert!(
                mt.sensors
                    .iter()
                    .any(|s| s.kind == SensorKind::Temperature && !s.alarms.is_empty())
            );
        }
        let oven = &spec.machine_types["oven"].sensors[0];
        assert_eq!(oven.alarms[0].limit, 260.0);
        assert_eq!(oven.alarms[0].on_delay_ms, 2000);
    }

    #[test]
    fn same_seed_gives_the_same_spec_and_another_seed_differs() {
        let s = size(2, 2, 3, 8, 0);
        assert_eq!(generate(s, 42), generate(s, 42));
        assert_ne!(generate(s, 42), generate(s, 43));
    }

    #[test]
    fn sensors_per_machine_pads_and_truncates_every_type() {
        let padded = generate(size(1, 1, 1, 5, 8), 1);
        for mt in padded.machine_types.values() {
            assert_eq!(mt.sensors.len(), 8);
            assert_eq!(mt.sensors[0].kind, SensorKind::Temperature);
            assert_eq!(
                mt.sensors[7].name,
                format!("aux-{}", 8 - machine_type_len(mt))
            );
        }
        assert_eq!(padded.machine_types["oven"].sensors[6].name, "aux-1");
        let truncated = generate(size(1, 1, 1, 5, 2), 1);
        for mt in truncated.machine_types.values() {
            assert_eq!(mt.sensors.len(), 2);
            assert_eq!(mt.sensors[0].kind, SensorKind::Temperature);
        }
    }

    fn machine_type_len(mt: &MachineType) -> usize {
        mt.sensors
            .iter()
            .filter(|s| !s.name.starts_with("aux-"))
            .count()
    }

    #[test]
    fn generates_a_million_sensor_spec() {
        let s = size(10, 10, 20, 50, 10);
        assert_eq!(s.sensor_count(), 1_000_000);
        let spec = generate(s, 1);
        spec.validate("generated").expect("valid");
        let c = count_assets(&spec);
        assert_eq!(c.sensors, 1_000_000);
        assert_eq!(c.machines, 100_000);
    }
}
