//! The machine detectors (`ferrotwin_models::detect::machine`) against the simulator's ground
//! truth: runs a generated plant fast in simulated time, feeds each machine's detector once per
//! simulated second with its sensors' latest values and state, and prints
//! - for every bearing wear: when health crossed the alarm level, the lead time before the
//!   breakdown it ended in, and the RUL at that moment;
//! - health and multivariate episodes that overlap no labelled fault (false alarms).
//!
//! (ns per update: `cargo run --release -p ferrotwin-models --example machine_detect_timing`.)
//!
//! `cargo run -p ferrotwin-sim --example machine_detect [hours] [seed]` (debug is fast enough:
//! 48 h of the demo plant in about two minutes; `MDET_TRACE="machine-path from_h to_h"` prints
//! one machine's every evaluation in that window)
//! (default 48 h of the demo plant's random fault mix, seed 1, then a scheduled-only scenario
//! with bearing wear of 2, 3 and 4 h on three machines and every other machine healthy).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use ferrotwin_models::alarm::LimitKind;
use ferrotwin_models::detect::machine::{MachineDetector, MachineDetectorConfig, Rul};
use ferrotwin_models::detect::{AnomalyTransition, DetectorKind, Regime};
use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{AssetId, AssetPath, Property, Reading, Timestamp};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::{FaultKind, FaultLabel, PlantSim};
use ferrotwin_sim::run::RUN_START;
use ferrotwin_sim::scenario::Scenario;

const SEC: i64 = 1_000_000;
const HOUR: f64 = 3.6e9;

struct Machine {
    path: AssetPath,
    detector: MachineDetector,
    values: Vec<f64>,
    /// When each sensor last reported and after how long it is stale.
    seen: Vec<i64>,
    stale_us: Vec<i64>,
    regime: Regime,
    names: Vec<String>,
    /// Lowest health seen, and when.
    min_health: (f64, i64),
    /// Each time a RUL appeared (after none): when, and what it said.
    ruls: Vec<(i64, Rul)>,
    had_rul: bool,
}

/// One episode of one detector on one machine.
#[derive(Debug, Clone)]
struct Episode {
    machine: usize,
    detector: DetectorKind,
    start: i64,
    end: Option<i64>,
    /// Health episodes: health and RUL when it started.
    health: Option<f64>,
    rul: Option<Rul>,
    contributors: [Option<(u16, f64)>; 3],
    peak: f64,
}

struct Plant {
    machines: Vec<Machine>,
    /// Sensor id → (machine, slot); machine id → machine.
    sensors: HashMap<AssetId, (usize, usize)>,
    machine_ids: HashMap<AssetId, usize>,
}

fn plant(spec: &PlantSpec, cfg: &MachineDetectorConfig) -> Plant {
    let assets = spec.assets();
    let mut machines = Vec::new();
    let mut machine_ids = HashMap::new();
    let mut limits: Vec<Vec<Option<f64>>> = Vec::new();
    let mut stale: Vec<Vec<i64>> = Vec::new();
    let mut names: Vec<Vec<String>> = Vec::new();
    let mut sensors = HashMap::new();
    for a in &assets {
        match &a.kind {
            AssetKind::Machine { .. } => {
                machine_ids.insert(a.path.id(), machines.len());
                machines.push(a.path.clone());
                limits.push(Vec::new());
                stale.push(Vec::new());
                names.push(Vec::new());
            }
            AssetKind::Sensor { spec, .. } => {
                let parent = a.path.parent().expect("a sensor has a machine");
                let m = machine_ids[&parent.id()];
                let high = spec
                    .alarms
                    .iter()
                    .filter(|l| l.kind == LimitKind::High)
                    .map(|l| l.limit)
                    .reduce(f64::min);
                sensors.insert(a.path.id(), (m, limits[m].len()));
                limits[m].push(high);
                names[m].push(spec.name.clone());
                let periods = i64::from(spec.stale_after_periods.max(1));
                stale[m].push(spec.period_ms as i64 * 1000 * periods);
            }
            _ => {}
        }
    }
    let machines = machines
        .into_iter()
        .zip(limits)
        .zip(stale)
        .zip(names)
        .map(|(((path, limits), stale_us), names)| Machine {
            path,
            detector: MachineDetector::new(cfg, &limits),
            values: vec![f64::NAN; limits.len()],
            seen: vec![i64::MIN; limits.len()],
            stale_us,
            regime: Regime::UNKNOWN,
            names,
            min_health: (100.0, 0),
            ruls: Vec::new(),
            had_rul: false,
        })
        .collect();
    Plant {
        machines,
        sensors,
        machine_ids,
    }
}

/// Runs `sim` for `hours`, one detector update per machine per simulated second.
fn run(
    sim: &mut PlantSim,
    plant: &mut Plant,
    cfg: &MachineDetectorConfig,
    hours: f64,
) -> Vec<Episode> {
    let mut out: Vec<Reading> = Vec::with_capacity(4096);
    let mut episodes: Vec<Episode> = Vec::new();
    let mut open: HashMap<(usize, DetectorKind), usize> = HashMap::new();
    let seconds = (hours * 3600.0) as i64;
    // MDET_TRACE="path from_h to_h" prints one machine's every evaluation in that window.
    let trace: Option<(String, f64, f64)> = std::env::var("MDET_TRACE").ok().and_then(|t| {
        let mut it = t.split_whitespace();
        Some((
            it.next()?.to_string(),
            it.next()?.parse().ok()?,
            it.next()?.parse().ok()?,
        ))
    });
    for s in 1..=seconds {
        let now = RUN_START.0 + s * SEC;
        out.clear();
        sim.step(Timestamp(now), &mut out);
        for r in &out {
            if let Some(&(m, k)) = plant.sensors.get(&r.asset) {
                if r.property == Property::Value {
                    let machine = &mut plant.machines[m];
                    machine.values[k] = r.value.as_f64();
                    machine.seen[k] = r.source_ts.0;
                }
            } else if let Some(&m) = plant.machine_ids.get(&r.asset)
                && r.property == Property::State
            {
                let code = r.value.as_f64();
                plant.machines[m].regime = if (0.0..=3.0).contains(&code) {
                    Regime(code as u8)
                } else {
                    Regime::UNKNOWN
                };
            }
        }
        for (m, machine) in plant.machines.iter_mut().enumerate() {
            // What the runtime does: a stale sensor is missing.
            let mut values = [f64::NAN; 64];
            for (k, v) in machine.values.iter().enumerate().take(64) {
                if machine.seen[k] != i64::MIN && now - machine.seen[k] <= machine.stale_us[k] {
                    values[k] = *v;
                }
            }
            let n = machine.values.len().min(64);
            let v = machine
                .detector
                .update(cfg, Timestamp(now), &values[..n], machine.regime);
            if let Some((path, from, to)) = &trace
                && machine.path.as_str() == path
                && (*from..*to).contains(&(s as f64 / 3600.0))
            {
                println!(
                    "{:.4} h regime {} score {:.2} health {:?} values {:?} top {:?}",
                    s as f64 / 3600.0,
                    machine.regime.0,
                    v.score,
                    v.health.map(|h| h.round()),
                    &values[..n],
                    v.contributors[0]
                );
            }
            if let Some(r) = v.rul
                && !machine.had_rul
            {
                machine.ruls.push((now, r));
            }
            machine.had_rul = v.rul.is_some();
            if let Some(h) = v.health
                && h < machine.min_health.0
            {
                machine.min_health = (h, now);
            }
            if let Some(&i) = open.get(&(m, DetectorKind::Multivariate)) {
                episodes[i].peak = episodes[i].peak.max(v.score);
            }
            match v.transition {
                Some(AnomalyTransition::Started { detector, .. }) => {
                    open.insert((m, detector), episodes.len());
                    episodes.push(Episode {
                        machine: m,
                        detector,
                        start: now,
                        end: None,
                        health: v.health,
                        rul: v.rul,
                        contributors: v.contributors,
                        peak: v.score,
                    });
                }
                Some(AnomalyTransition::Ended { detector, .. }) => {
                    if let Some(i) = open.remove(&(m, detector)) {
                        episodes[i].end = Some(now);
                    }
                }
                None => {}
            }
        }
    }
    episodes
}

fn overlaps(e: &Episode, f: &FaultLabel, end_of_run: i64, slack: i64) -> bool {
    let (fs, fe) = (f.start.0, f.end.map_or(end_of_run, |t| t.0));
    let (es, ee) = (e.start, e.end.unwrap_or(end_of_run));
    es <= fe + slack && ee >= fs - slack
}

fn report(title: &str, sim: &PlantSim, plant: &Plant, episodes: &[Episode], hours: f64) {
    let labels = sim.final_labels();
    let end = sim.now().0;
    println!("\n== {title}: {} machines, {hours} h", plant.machines.len());
    // Bearing wear → the breakdown it ends in.
    let mut wears = 0;
    let mut flagged = 0;
    let mut leads = Vec::new();
    for w in labels.iter().filter(|f| f.kind == FaultKind::BearingWear) {
        let Some(m) = plant.machine_ids.get(&w.asset.id()).copied() else {
            continue;
        };
        let breakdown = labels
            .iter()
            .filter(|f| {
                f.kind == FaultKind::Breakdown && f.asset == w.asset && f.start.0 >= w.start.0
            })
            .map(|f| f.start.0)
            .min();
        wears += 1;
        let until = breakdown.unwrap_or(end);
        let alarm = episodes.iter().find(|e| {
            e.machine == m
                && e.detector == DetectorKind::Health
                && e.start >= w.start.0
                && e.start <= until
        });
        let wear_h = (until - w.start.0) as f64 / HOUR;
        // Vibration reaches its limit (3.33 × healthy) at wear (1/0.3 − 1)/4 of the way.
        let limit_at = w.start.0 + ((until - w.start.0) as f64 * (1.0 / 0.3 - 1.0) / 4.0) as i64;
        let mut first_rul = String::new();
        if let Some((t, r)) = plant.machines[m]
            .ruls
            .iter()
            .find(|(t, _)| *t >= w.start.0 && *t <= until)
        {
            first_rul = format!(
                "    first RUL at {:.2} h in: {:.2} h [{:.2}, {:.2}]; the vibration limit is {:.2} h \
                 away, the breakdown {:.2} h",
                (t - w.start.0) as f64 / HOUR,
                r.hours,
                r.low_hours,
                r.high_hours,
                (limit_at - t) as f64 / HOUR,
                (until - t) as f64 / HOUR
            );
        }
        match (alarm, breakdown) {
            (Some(a), Some(b)) => {
                flagged += 1;
                let lead = (b - a.start) as f64 / HOUR;
                leads.push((wear_h, lead));
                println!(
                    "  bearing wear {} ({wear_h:.2} h to breakdown): health {:.1} at {:.2} h in, \
                     lead {lead:.2} h, RUL {}",
                    w.asset,
                    a.health.unwrap_or(f64::NAN),
                    (a.start - w.start.0) as f64 / HOUR,
                    a.rul.map_or("none".to_string(), |r| format!(
                        "{:.2} h [{:.2}, {:.2}]",
                        r.hours, r.low_hours, r.high_hours
                    )),
                );
            }
            (None, Some(_)) => {
                println!(
                    "  bearing wear {} ({wear_h:.2} h to breakdown): not flagged",
                    w.asset
                )
            }
            (_, None) => println!(
                "  bearing wear {} still running at the end ({wear_h:.2} h in){}",
                w.asset,
                if alarm.is_some() { ", flagged" } else { "" }
            ),
        }
        if !first_rul.is_empty() {
            println!("{first_rul}");
        }
    }
    println!("  bearing wears: {wears}, flagged before the breakdown: {flagged}");
    let on_machine = |e: &Episode| -> Vec<&FaultLabel> {
        let path = &plant.machines[e.machine].path;
        labels
            .iter()
            .filter(|f| &f.asset == path || f.asset.parent().as_ref() == Some(path))
            .collect()
    };
    let machine_hours = plant.machines.len() as f64 * hours;
    // Health episodes outside every bearing wear (wear start to the end of its repair).
    let mut outside = 0;
    for e in episodes
        .iter()
        .filter(|e| e.detector == DetectorKind::Health)
    {
        let path = &plant.machines[e.machine].path;
        let in_wear = labels.iter().any(|f| {
            f.kind == FaultKind::BearingWear
                && &f.asset == path
                && e.start >= f.start.0
                && e.start <= f.end.map_or(end, |t| t.0)
        });
        if in_wear {
            continue;
        }
        outside += 1;
        let near: Vec<String> = labels
            .iter()
            .filter(|f| {
                (&f.asset == path || f.asset.parent().as_ref() == Some(path))
                    && f.kind != FaultKind::Spike
                    && f.start.0 <= e.start
                    && f.end.map_or(end, |t| t.0) >= e.start - 3600 * SEC
            })
            .map(|f| {
                format!(
                    "{} {}",
                    f.kind.as_str(),
                    f.asset.as_str().rsplit('/').next().unwrap_or("")
                )
            })
            .collect();
        println!(
            "    health episode outside bearing wear: {path} at {:.2} h for {:.2} h; faults in the hour before: {near:?}",
            (e.start - RUN_START.0) as f64 / HOUR,
            (e.end.unwrap_or(end) - e.start) as f64 / HOUR,
        );
    }
    println!("  health episodes outside bearing wear: {outside}");
    // The lowest health of machines without a bearing wear.
    let worn: Vec<&AssetPath> = labels
        .iter()
        .filter(|f| f.kind == FaultKind::BearingWear)
        .map(|f| &f.asset)
        .collect();
    let mut healthy: Vec<(f64, f64, &AssetPath)> = plant
        .machines
        .iter()
        .filter(|m| !worn.contains(&&m.path))
        .map(|m| {
            (
                m.min_health.0,
                (m.min_health.1 - RUN_START.0) as f64 / HOUR,
                &m.path,
            )
        })
        .collect();
    healthy.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (h, at, path) in healthy.iter().take(3) {
        println!("  lowest health without bearing wear: {h:.1} at {at:.2} h on {path}");
    }
    for kind in [DetectorKind::Health, DetectorKind::Multivariate] {
        let all: Vec<&Episode> = episodes.iter().filter(|e| e.detector == kind).collect();
        let mut by_kind: HashMap<&'static str, usize> = HashMap::new();
        let mut false_alarms = 0;
        for e in &all {
            let hit: Vec<&FaultLabel> = on_machine(e)
                .into_iter()
                .filter(|f| overlaps(e, f, end, 120 * SEC))
                .collect();
            if hit.is_empty() {
                false_alarms += 1;
                if false_alarms <= 12 {
                    let machine = &plant.machines[e.machine];
                    let who: Vec<String> = e
                        .contributors
                        .iter()
                        .flatten()
                        .map(|(i, share)| format!("{} {share:.2}", machine.names[*i as usize]))
                        .collect();
                    println!(
                        "    false {}: {} at {:.2} h for {:.0} s, peak {:.1}, {who:?}",
                        kind.as_str(),
                        machine.path,
                        (e.start - RUN_START.0) as f64 / HOUR,
                        (e.end.unwrap_or(end) - e.start) as f64 / SEC as f64,
                        e.peak
                    );
                }
            }
            for f in hit {
                *by_kind.entry(f.kind.as_str()).or_default() += 1;
            }
        }
        let mut kinds: Vec<_> = by_kind.into_iter().collect();
        kinds.sort();
        println!(
            "  {} episodes: {}, overlapping no label: {false_alarms} ({:.3} per machine-hour); \
             labels they overlap: {kinds:?}",
            kind.as_str(),
            all.len(),
            false_alarms as f64 / machine_hours
        );
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let hours: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(48.0);
    let seed: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1);
    let cfg = MachineDetectorConfig::default();

    let spec = generate(PlantSize::DEMO, seed);
    let t0 = Instant::now();
    let mut sim = PlantSim::new(&spec, seed, RUN_START);
    let mut p = plant(&spec, &cfg);
    let episodes = run(&mut sim, &mut p, &cfg, hours);
    report("random fault mix", &sim, &p, &episodes, hours);
    println!("  ({:.1} s wall)", t0.elapsed().as_secs_f64());

    // Scheduled only: bearing wear of 2, 3 and 4 h on three machines, after 6 h of learning;
    // every other machine stays healthy, so any episode on them is a false alarm.
    // Machines with a vibration sensor: bearing wear shows nowhere else.
    let worn: Vec<AssetPath> = p
        .machines
        .iter()
        .filter(|m| m.names.iter().any(|n| n == "vibration"))
        .step_by(4)
        .map(|m| m.path.clone())
        .collect();
    let mut text = String::from("version = 1\nrandom_faults = false\n");
    for (i, h) in [2, 3, 4].into_iter().enumerate() {
        text.push_str(&format!(
            "[[faults]]\nasset = \"{}\"\nkind = \"bearing_wear\"\nat = \"{}h\"\nduration = \"{h}h\"\n",
            worn[i],
            6 + 2 * i
        ));
    }
    let scenario =
        Scenario::from_toml(&text, Path::new("machine_detect.toml"), &spec).expect("valid");
    let mut sim = PlantSim::with_scenario(&spec, seed, RUN_START, &scenario);
    let mut p = plant(&spec, &cfg);
    let hours = 16.0;
    let episodes = run(&mut sim, &mut p, &cfg, hours);
    report(
        "scheduled bearing wear, no other faults",
        &sim,
        &p,
        &episodes,
        hours,
    );
}
