//! `ferrotwin-sim run`: runs a plant (and optionally a scenario) for a stretch of simulated
//! time into a counting sink, writes the ground-truth labels and sums up what happened.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use ferrotwin_models::spec::{PlantSpec, SpecError};
use ferrotwin_models::{IngestSink, Property, PushBack, Reading, Timestamp};

use crate::driver::{DriveOptions, run_offline, run_realtime};
use crate::labels::{LabelError, write_labels};
use crate::model::{FaultKind, PlantSim};
use crate::scenario::{Scenario, ScenarioError};

/// Simulated start of every run, 2025-01-01T00:00:00Z: fixed, so the same plant, scenario and
/// seed give the same timestamps as well as the same values.
pub const RUN_START: Timestamp = Timestamp(1_735_689_600_000_000);

/// Simulated time per step of an as-fast-as-possible run: the sensors' usual period, so no
/// step hits the catch-up bound.
const FAST_STEP_MS: u64 = 1000;
const MAX_BATCH: usize = 4096;

/// How fast simulated time runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// As fast as the machine can step.
    Fast,
    /// Simulated seconds per wall-clock second (`60.0` = a simulated minute per second).
    Speed(f64),
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Holds `plant.toml`; `labels.csv` is written there unless `labels` says otherwise.
    pub plant_dir: PathBuf,
    pub scenario: Option<PathBuf>,
    /// Used unless the scenario sets its own.
    pub seed: u64,
    pub duration_ms: u64,
    pub pace: Pace,
    pub labels: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    /// The seed the run used (the scenario's if it set one).
    pub seed: u64,
    pub simulated_ms: i64,
    pub readings: u64,
    pub readings_by_property: BTreeMap<Property, u64>,
    /// Labels written per fault kind, every kind present (0 if none happened).
    pub faults_by_kind: BTreeMap<&'static str, u64>,
    pub labels_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{}: cannot read the plant spec", .file.display())]
    ReadPlant {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Plant(#[from] SpecError),
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error(transparent)]
    Labels(#[from] LabelError),
    #[error("speed {0} is not a finite number > 0")]
    Speed(f64),
}

/// Counts the readings it is given per property and never pushes back.
#[derive(Debug, Default)]
pub struct CountingSink {
    counts: [AtomicU64; Property::ALL.len()],
}

impl CountingSink {
    pub fn count(&self, property: Property) -> u64 {
        self.counts[usize::from(property.code())].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        Property::ALL.iter().map(|p| self.count(*p)).sum()
    }
}

impl IngestSink for CountingSink {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        for r in &batch {
            self.counts[usize::from(r.property.code())].fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn load_plant(dir: &Path) -> Result<PlantSpec, RunError> {
    let file = dir.join("plant.toml");
    let text = std::fs::read_to_string(&file).map_err(|source| RunError::ReadPlant {
        file: file.clone(),
        source,
    })?;
    Ok(PlantSpec::from_toml(&text, &file.display().to_string())?)
}

/// Loads the plant and scenario, runs the simulation from `RUN_START` for
/// `opts.duration_ms`, writes the labels (faults still open end at the end of the run).
pub fn run(opts: &RunOptions) -> Result<RunSummary, RunError> {
    if let Pace::Speed(x) = opts.pace
        && !(x.is_finite() && x > 0.0)
    {
        return Err(RunError::Speed(x));
    }
    let spec = load_plant(&opts.plant_dir)?;
    let scenario = match &opts.scenario {
        Some(file) => Scenario::load(file, &spec)?,
        None => Scenario::default(),
    };
    let seed = scenario.seed.unwrap_or(opts.seed);
    let mut sim = PlantSim::with_scenario(&spec, seed, RUN_START, &scenario);
    let sink = CountingSink::default();
    let until = RUN_START.plus_ms(i64::try_from(opts.duration_ms).unwrap_or(i64::MAX));
    match opts.pace {
        Pace::Fast => {
            run_offline(&mut sim, &sink, until, FAST_STEP_MS, MAX_BATCH);
        }
        Pace::Speed(speed) => {
            let wall = Duration::from_secs_f64(opts.duration_ms as f64 / 1000.0 / speed);
            let drive = DriveOptions {
                speed,
                duration: Some(wall),
                max_batch: MAX_BATCH,
                ..DriveOptions::default()
            };
            run_realtime(&mut sim, &sink, &drive, &AtomicBool::new(false));
        }
    }
    let labels = sim.final_labels();
    let labels_path = opts
        .labels
        .clone()
        .unwrap_or_else(|| opts.plant_dir.join("labels.csv"));
    write_labels(&labels_path, &labels)?;
    let mut faults_by_kind: BTreeMap<&'static str, u64> =
        FaultKind::ALL.iter().map(|k| (k.as_str(), 0)).collect();
    for l in &labels {
        *faults_by_kind.entry(l.kind.as_str()).or_default() += 1;
    }
    Ok(RunSummary {
        seed,
        simulated_ms: sim.now().millis_since(RUN_START),
        readings: sink.total(),
        readings_by_property: Property::ALL.iter().map(|p| (*p, sink.count(*p))).collect(),
        faults_by_kind,
        labels_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate::{PlantSize, generate};
    use crate::labels::read_labels;

    /// A directory with plant.toml for one line of three machines (a press, a conveyor and
    /// an oven among them), and how many sensor samples it makes per second.
    fn tiny_plant() -> (tempfile::TempDir, u64) {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = generate(
            PlantSize {
                sites: 1,
                areas: 1,
                lines: 1,
                machines: 3,
                sensors_per_machine: 0,
            },
            1,
        );
        std::fs::write(dir.path().join("plant.toml"), spec.to_toml()).expect("write spec");
        let per_s = spec
            .assets()
            .iter()
            .filter_map(|a| match &a.kind {
                ferrotwin_models::spec::AssetKind::Sensor { spec, .. } => {
                    Some(1000 / spec.period_ms)
                }
                _ => None,
            })
            .sum();
        (dir, per_s)
    }

    fn opts(dir: &Path, scenario: Option<PathBuf>) -> RunOptions {
        RunOptions {
            plant_dir: dir.to_path_buf(),
            scenario,
            seed: 1,
            duration_ms: 30 * 60 * 1000,
            pace: Pace::Fast,
            labels: None,
        }
    }

    #[test]
    fn run_counts_readings_and_writes_the_scheduled_labels_of_a_tiny_plant() {
        let (dir, samples_per_s) = tiny_plant();
        let scenario = dir.path().join("scenario.toml");
        std::fs::write(
            &scenario,
            "version = 1\nseed = 4\nrandom_faults = false\n\
             [[faults]]\nasset = \"acme/berlin/assembly/line-1/oven-1\"\nkind = \"overheating\"\n\
             at = \"10m\"\nduration = \"2m\"\n\
             [[faults]]\nasset = \"acme/berlin/assembly/line-1/press-1\"\nkind = \"breakdown\"\n\
             at = \"25m\"\nduration = \"1h\"\n",
        )
        .expect("write scenario");
        let summary = run(&opts(dir.path(), Some(scenario))).expect("runs");
        assert_eq!(summary.seed, 4);
        assert_eq!(summary.simulated_ms, 30 * 60 * 1000);
        // Every sensor at its period for 30 min.
        assert_eq!(
            summary.readings_by_property[&Property::Value],
            samples_per_s * 1800
        );
        assert_eq!(
            summary.readings,
            summary.readings_by_property.values().sum::<u64>()
        );
        assert_eq!(summary.faults_by_kind["overheating"], 1);
        assert_eq!(summary.faults_by_kind["breakdown"], 1);
        assert_eq!(summary.faults_by_kind.values().sum::<u64>(), 2);
        assert_eq!(summary.labels_path, dir.path().join("labels.csv"));
        let labels = read_labels(&summary.labels_path).expect("labels parse");
        assert_eq!(labels.len(), 2);
        assert_eq!(
            labels[0].asset.as_str(),
            "acme/berlin/assembly/line-1/oven-1/zone-1-temp"
        );
        assert_eq!(labels[0].start, RUN_START.plus_ms(600_000));
        assert_eq!(labels[0].end, Some(RUN_START.plus_ms(720_000)));
        // Still down at the end: the label ends with the run.
        assert_eq!(labels[1].start, RUN_START.plus_ms(1_500_000));
        assert_eq!(labels[1].end, Some(RUN_START.plus_ms(1_800_000)));
    }

    #[test]
    fn bearing_wear_makes_vibration_rise_over_hours_and_is_labelled() {
        let (dir, _) = tiny_plant();
        let spec = crate::serve::load_plant(dir.path()).expect("plant");
        // The first machine with a vibration sensor.
        let vib = spec
            .assets()
            .into_iter()
            .find(|a| a.path.name() == "vibration")
            .expect("a machine type with vibration")
            .path;
        let machine = vib.parent().expect("machine");
        let text = format!(
            "version = 1\nseed = 3\nrandom_faults = false\n[[faults]]\nasset = \"{machine}\"\n\
             kind = \"bearing_wear\"\nat = \"1h\"\nduration = \"6h\"\n"
        );
        let scenario = crate::scenario::Scenario::from_toml(&text, Path::new("wear.toml"), &spec)
            .expect("valid scenario");
        let mut sim = PlantSim::with_scenario(&spec, 3, RUN_START, &scenario);
        let id = vib.id();
        // Mean vibration per simulated hour, 7 hours, stepped a minute at a time.
        let mut hourly = [(0.0, 0u32); 7];
        let mut out = Vec::new();
        for minute in 1..=7 * 60 {
            out.clear();
            sim.step(RUN_START.plus_ms(minute * 60_000), &mut out);
            for r in out.iter().filter(|r| r.asset == id) {
                let h = ((r.source_ts.millis_since(RUN_START) / 3_600_000) as usize).min(6);
                hourly[h].0 += r.value.as_f64();
                hourly[h].1 += 1;
            }
        }
        let mean: Vec<f64> = hourly
            .iter()
            .map(|(s, n)| s / f64::from((*n).max(1)))
            .collect();
        // Healthy in hour 0; then rising hour over hour through the wear.
        assert!(mean[6] > 1.5 * mean[0], "vibration by hour: {mean:?}");
        assert!(
            mean[2] < mean[4] && mean[4] < mean[6],
            "rises over the hours: {mean:?}"
        );
        let file = dir.path().join("labels.csv");
        crate::labels::write_labels(&file, &sim.final_labels()).expect("labels written");
        let labels = read_labels(&file).expect("labels parse");
        let wear = labels
            .iter()
            .find(|l| l.kind == FaultKind::BearingWear)
            .expect("bearing wear labelled");
        assert_eq!(wear.asset, machine);
        assert_eq!(wear.start, RUN_START.plus_ms(3_600_000));
    }

    #[test]
    fn same_plant_and_seed_write_the_same_labels() {
        let (dir, _) = tiny_plant();
        let mut o = opts(dir.path(), None);
        o.duration_ms = 6 * 3600 * 1000;
        let a = run(&o).expect("runs");
        let first = std::fs::read(&a.labels_path).expect("labels");
        o.labels = Some(dir.path().join("again.csv"));
        let b = run(&o).expect("runs");
        assert_eq!(first, std::fs::read(&b.labels_path).expect("labels"));
        assert_eq!(a.readings, b.readings);
        assert!(a.faults_by_kind.values().sum::<u64>() > 0);
    }

    #[test]
    fn run_errors_name_the_missing_or_invalid_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = run(&opts(dir.path(), None)).expect_err("no plant.toml");
        assert!(matches!(err, RunError::ReadPlant { .. }));
        assert_eq!(
            err.to_string(),
            format!(
                "{}: cannot read the plant spec",
                dir.path().join("plant.toml").display()
            )
        );
        let (dir, _) = tiny_plant();
        let missing = dir.path().join("nope.toml");
        let err = run(&opts(dir.path(), Some(missing.clone()))).expect_err("no scenario");
        assert!(
            matches!(err, RunError::Scenario(ScenarioError::Read { ref file, .. }) if *file == missing)
        );
        let mut o = opts(dir.path(), None);
        o.pace = Pace::Speed(0.0);
        assert!(matches!(run(&o), Err(RunError::Speed(_))));
    }

    #[test]
    fn realtime_pace_runs_the_requested_simulated_time() {
        let (dir, samples_per_s) = tiny_plant();
        let mut o = opts(dir.path(), None);
        o.duration_ms = 5_000;
        o.pace = Pace::Speed(50.0);
        let summary = run(&o).expect("runs");
        assert_eq!(summary.simulated_ms, 5_000);
        assert_eq!(
            summary.readings_by_property[&Property::Value],
            samples_per_s * 5
        );
    }
}
