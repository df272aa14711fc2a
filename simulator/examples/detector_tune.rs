//! Tuning harness for the sensor detectors: runs a small generated plant through `PlantSim`
//! as fast as it goes, feeds every sensor reading to its `SensorDetector` (regime = its
//! machine's latest state) and scores the episodes against the ground truth.
//!
//! ```text
//! cargo run --release -p ferrotwin-sim --example detector_tune -- [hours] [sim_seed] [plant_seed] [toml overrides]
//! cargo run --release -p ferrotwin-sim --example detector_tune -- 24 1 7 'level_z = 6.0'
//! ```
//! The optional last argument is TOML for `SensorDetectorConfig` (any subset of its keys),
//! applied to every sensor; without it the defaults are scored.

use std::collections::{BTreeMap, HashMap};

use ferrotwin_models::detect::sensor::{SensorDetector, SensorDetectorConfig};
use ferrotwin_models::detect::{AnomalyTransition, Regime};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetId, AssetPath, Property, Timestamp};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::PlantSim;
use ferrotwin_sim::score::{Detection, ScoreWindow, matches, score};

const START: Timestamp = Timestamp(1_764_000_000_000_000);

struct Tracked {
    path: AssetPath,
    kind: String,
    machine: usize,
    det: SensorDetector,
    open: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: u64| -> anyhow::Result<u64> {
        Ok(match args.get(i) {
            Some(s) => s.parse()?,
            None => default,
        })
    };
    let hours = arg(0, 24)?;
    let sim_seed = arg(1, 1)?;
    let plant_seed = arg(2, 7)?;
    let cfg: SensorDetectorConfig = match args.get(3) {
        Some(t) => toml::from_str(t)?,
        None => SensorDetectorConfig::default(),
    };
    let problems = cfg.problems();
    anyhow::ensure!(problems.is_empty(), "bad settings: {problems:?}");

    let size = PlantSize {
        sites: 1,
        areas: 1,
        lines: 2,
        machines: 4,
        sensors_per_machine: 0,
    };
    let spec = generate(size, plant_seed);
    let mut machines: HashMap<AssetId, usize> = HashMap::new();
    let mut sensors: HashMap<AssetId, Tracked> = HashMap::new();
    for a in spec.assets() {
        match &a.kind {
            AssetKind::Machine { .. } => {
                let n = machines.len();
                machines.insert(a.path.id(), n);
            }
            AssetKind::Sensor { type_name, .. } => {
                sensors.insert(
                    a.path.id(),
                    Tracked {
                        path: a.path.clone(),
                        kind: type_name.to_string(),
                        machine: machines.len() - 1,
                        det: SensorDetector::new(&cfg),
                        open: None,
                    },
                );
            }
            _ => {}
        }
    }
    // TRACE=path,from_s,to_s prints that sensor's readings and scores in that window.
    let trace: Option<(String, i64, i64)> = std::env::var("TRACE").ok().and_then(|t| {
        let mut it = t.split(',');
        Some((
            it.next()?.to_string(),
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        ))
    });
    let mut regimes = vec![Regime::UNKNOWN; machines.len()];
    let mut sim = PlantSim::new(&spec, sim_seed, START);
    let end = START.plus_ms(i64::try_from(hours)? * 3_600_000);
    let mut out = Vec::new();
    let mut detections: Vec<Detection> = Vec::new();
    let mut readings = 0u64;
    let wall = std::time::Instant::now();
    let mut t = START;
    while t < end {
        t = t.plus_ms(10_000).min(end);
        out.clear();
        sim.step(t, &mut out);
        for r in &out {
            match r.property {
                Property::State => {
                    if let Some(&m) = machines.get(&r.asset) {
                        regimes[m] = Regime(u8::try_from(r.value.as_f64() as i64).unwrap_or(255));
                    }
                }
                Property::Value => {
                    let Some(s) = sensors.get_mut(&r.asset) else {
                        continue;
                    };
                    readings += 1;
                    let v = s
                        .det
                        .update(&cfg, r.source_ts, r.value.as_f64(), regimes[s.machine]);
                    if let Some((p, from, to)) = &trace {
                        let at = (r.source_ts.0 - START.0) / 1_000_000;
                        if s.path.as_str() == p && (*from..=*to).contains(&at) {
                            println!(
                                "{at} {:?} {} score {:.2} {:?}",
                                regimes[s.machine],
                                r.value.as_f64(),
                                v.score,
                                v.transition
                            );
                        }
                    }
                    match v.transition {
                        Some(AnomalyTransition::Started { detector, .. }) => {
                            s.open = Some(detections.len());
                            detections.push(Detection {
                                asset: s.path.clone(),
                                detector: detector.as_str().to_string(),
                                start: r.source_ts,
                                end: None,
                                contributors: Vec::new(),
                            });
                        }
                        Some(AnomalyTransition::Ended { .. }) => {
                            if let Some(i) = s.open.take() {
                                detections[i].end = Some(r.source_ts);
                            }
                        }
                        None => {}
                    }
                }
                _ => {}
            }
        }
    }
    let elapsed = wall.elapsed();
    let labels = sim.final_labels();
    let window = ScoreWindow {
        start: START,
        end,
        machines: machines.len(),
    };
    let report = score(&labels, &detections, window);
    println!(
        "plant seed {plant_seed}, sim seed {sim_seed}: {} machines, {} sensors, {hours} h simulated, \
         {readings} readings in {:.1} s wall",
        machines.len(),
        sensors.len(),
        elapsed.as_secs_f64()
    );
    println!("{report}");

    // Where the false alarms come from and which labels were missed, to guide tuning.
    let kind_of: HashMap<&AssetPath, &str> = sensors
        .values()
        .map(|s| (&s.path, s.kind.as_str()))
        .collect();
    let mut fa: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut examples = Vec::new();
    for d in &detections {
        if !labels.iter().any(|l| matches(l, d, end)) {
            let k = kind_of.get(&d.asset).copied().unwrap_or("?").to_string();
            *fa.entry((d.detector.clone(), k)).or_default() += 1;
            if examples.len() < 12 {
                examples.push(format!(
                    "  {} {} at +{} s",
                    d.asset,
                    d.detector,
                    (d.start.0 - START.0) / 1_000_000
                ));
            }
        }
    }
    println!("false alarms by detector and sensor type: {fa:?}");
    for e in &examples {
        println!("{e}");
    }
    let mut missed: BTreeMap<(String, String), usize> = BTreeMap::new();
    for l in &labels {
        if !l.kind.is_detector_job() || detections.iter().any(|d| matches(l, d, end)) {
            continue;
        }
        let k = kind_of
            .get(&l.asset)
            .copied()
            .unwrap_or("machine")
            .to_string();
        *missed.entry((l.kind.as_str().to_string(), k)).or_default() += 1;
        if std::env::var_os("MISSED").is_some() {
            println!(
                "  missed {} {} at +{} s for {} s",
                l.asset,
                l.kind.as_str(),
                (l.start.0 - START.0) / 1_000_000,
                (l.end.unwrap_or(end).0 - l.start.0) / 1_000_000
            );
        }
    }
    println!("missed labels by kind and sensor type: {missed:?}");
    Ok(())
}
