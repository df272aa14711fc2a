//! Generates plant specs of any size, from a handful of sensors to a million, for demos,
//! tests and benchmarks. The spec is plain `models::spec` data: what the generator writes is
//! what a user could have written by hand.

use std::collections::BTreeMap;

use ferrotwin_models::Severity;
use ferrotwin_models::alarm::{AlarmLimit, LimitKind};
use ferrotwin_models::spec::{
    AreaSpec, LineSpec, MachineInstance, MachineType, PlantSpec, SPEC_VERSION, SensorKind,
    SensorSpec, SetpointSpec, SiteSpec,
};
use ferrotwin_models::value::ValueType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

// Rows aligned in columns read as a table; rustfmt would spread each over eight lines.
#[rustfmt::skip]
mod catalogue;
use catalogue::CATALOGUE;

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

/// A machine type of the catalogue.
struct MachineTypeRow {
    name: &'static str,
    description: &'static str,
    ideal_cycle_ms: f64,
    sensors: &'static [SensorRow],
    /// In any order across sensors; a sensor's alarms keep their order here.
    alarms: &'static [AlarmRow],
}

/// A sensor of a catalogue machine type, in `SensorSpec`'s terms.
struct SensorRow {
    name: &'static str,
    kind: SensorKind,
    unit: &'static str,
    value_type: ValueType,
    min: f64,
    max: f64,
    period_ms: u64,
}

/// A limit alarm on the catalogue sensor named `sensor`, in `AlarmLimit`'s terms. It returns
/// as soon as the value is back past the deadband (no off-delay).
struct AlarmRow {
    sensor: &'static str,
    name: &'static str,
    kind: LimitKind,
    limit: f64,
    deadband: f64,
    on_delay_ms: u64,
    severity: Severity,
}

impl SensorRow {
    fn to_spec(&self, alarms: Vec<AlarmLimit>) -> SensorSpec {
        SensorSpec {
            name: self.name.to_string(),
            kind: self.kind,
            unit: self.unit.to_string(),
            value_type: self.value_type,
            min: Some(self.min),
            max: Some(self.max),
            period_ms: self.period_ms,
            stale_after_periods: 3,
            alarms,
            detect: Default::default(),
        }
    }
}

impl AlarmRow {
    fn to_limit(&self) -> AlarmLimit {
        AlarmLimit {
            name: self.name.to_string(),
            kind: self.kind,
            limit: self.limit,
            deadband: self.deadband,
            on_delay_ms: self.on_delay_ms,
            off_delay_ms: 0,
            severity: self.severity,
        }
    }
}

/// The machine types every generated plant defines, in the order the seed picks from.
pub const MACHINE_TYPES: [&str; CATALOGUE.len()] = catalogue_names();

const fn catalogue_names() -> [&'static str; CATALOGUE.len()] {
    let mut names = [""; CATALOGUE.len()];
    let mut i = 0;
    // A const fn cannot use `for`.
    while i < names.len() {
        names[i] = CATALOGUE[i].name;
        i += 1;
    }
    names
}

fn machine_type(name: &str) -> MachineType {
    let Some(row) = CATALOGUE.iter().find(|t| t.name == name) else {
        unreachable!("machine type {name:?} is not in MACHINE_TYPES")
    };
    let sensors = row
        .sensors
        .iter()
        .map(|s| {
            let alarms = row.alarms.iter().filter(|a| a.sensor == s.name);
            s.to_spec(alarms.map(AlarmRow::to_limit).collect())
        })
        .collect();
    MachineType {
        description: row.description.to_string(),
        ideal_cycle_ms: row.ideal_cycle_ms,
        sensors,
        detect: Default::default(),
        model: None,
        // What the simulated PLCs take (`mapping`): the speed, 0..=200 % of nominal (writes
        // outside it are refused before they reach one), and the run enable coil.
        setpoints: vec![
            SetpointSpec {
                name: "speed_setpoint_pct".into(),
                value_type: ValueType::Int,
                min: Some(0.0),
                max: Some(200.0),
                unit: "%".into(),
            },
            SetpointSpec {
                name: crate::mapping::RUN_ENABLE.into(),
                value_type: ValueType::Bool,
                min: None,
                max: None,
                unit: String::new(),
            },
        ],
        state_map: Default::default(),
        rules: Vec::new(),
    }
}

/// What `sensors_per_machine` pads a type with, named `aux-1`, `aux-2`, … in place of `aux`.
const AUX_SENSOR: SensorRow = SensorRow {
    name: "aux",
    kind: SensorKind::Generic,
    unit: "",
    value_type: ValueType::Float,
    min: 0.0,
    max: 100.0,
    period_ms: 1000,
};

fn fit_sensors(sensors: &mut Vec<SensorSpec>, k: u32) {
    let k = k as usize;
    sensors.truncate(k);
    let natural = sensors.len();
    for i in natural..k {
        sensors.push(SensorSpec {
            name: format!("aux-{}", i - natural + 1),
            ..AUX_SENSOR.to_spec(vec![])
        });
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
                        count: Some(n),
                        ..MachineInstance::new(*t, *t)
                    })
                    .collect();
                lines.push(LineSpec {
                    name: format!("line-{}", l + 1),
                    setpoints: Vec::new(),
                    rules: Vec::new(),
                    machines,
                });
            }
            areas.push(AreaSpec {
                name: name_at(AREA_NAMES, "area", a),
                setpoints: Vec::new(),
                rules: Vec::new(),
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
                        c.sensors += n * m.sensor_count(mt) as u64;
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

    #[test]
    fn every_catalogue_alarm_is_on_a_sensor_of_its_type() {
        // An alarm row is matched to its sensor by name: a misspelt name would drop it silently.
        for row in &CATALOGUE {
            for alarm in row.alarms {
                assert!(
                    row.sensors.iter().any(|s| s.name == alarm.sensor),
                    "{}: alarm {:?} is on {:?}, not a sensor of the type",
                    row.name,
                    alarm.name,
                    alarm.sensor
                );
            }
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
