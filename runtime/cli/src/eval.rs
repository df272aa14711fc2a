//! `ferrotwin eval`: scores local inference against the simulator's ground truth.
//!
//! A plant (a generated one, or `--plant DIR/plant.toml`) runs in the simulator as fast as
//! the runtime takes its readings, through the real ingest path (router → sensor twins →
//! machine twins with their detectors → events in the store). Simulated time ends at the
//! wall clock's now, so no reading is "from the future". The runtime is kept in step with the
//! simulation: after every `sync` of simulated time the driver waits until the twins took
//! every reading, so a machine's detectors see its sensors at nearly one instant (in a live
//! plant they arrive together anyway). The anomaly events are then read back from the store,
//! paired into episodes and matched with the labels (`ferrotwin_sim::score`).

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetPath, EpisodeEdge, EventKind, Reading, Timestamp};
use ferrotwin_sim::driver::{DriverStats, push_all};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::PlantSim;
use ferrotwin_sim::scenario::Scenario;
use ferrotwin_sim::score::{Detection, ScoreWindow, score};

use ferrotwin_runtime::EventFilter;
use ferrotwin_runtime::{Runtime, RuntimeOptions};

pub struct EvalOptions {
    /// Directory with `plant.toml`; `None` generates `size` with `plant_seed`.
    pub plant: Option<PathBuf>,
    pub size: PlantSize,
    pub plant_seed: u64,
    pub scenario: Option<PathBuf>,
    /// Seed of the simulation (a scenario's own seed wins).
    pub seed: u64,
    pub hours: f64,
    /// Simulated time per driver step.
    pub step_ms: i64,
    /// Simulated time between waits for the runtime to catch up.
    pub sync_ms: i64,
}

/// Generated plant of the default eval: 2 lines of 6 machines, every machine type.
pub const EVAL_SIZE: PlantSize = PlantSize {
    sites: 1,
    areas: 1,
    lines: 2,
    machines: 6,
    sensors_per_machine: 0,
};

pub async fn run(opts: EvalOptions) -> Result<String> {
    let (spec, plant_text) = match &opts.plant {
        Some(dir) => {
            let file = dir.join("plant.toml");
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let spec = PlantSpec::from_toml(&text, &file.display().to_string())?;
            (spec, file.display().to_string())
        }
        None => (
            generate(opts.size, opts.plant_seed),
            format!("generated (plant seed {})", opts.plant_seed),
        ),
    };
    let scenario = match &opts.scenario {
        Some(f) => Scenario::load(f, &spec)?,
        None => Scenario::default(),
    };
    let seed = scenario.seed.unwrap_or(opts.seed);
    let span_us = (opts.hours * 3_600e6) as i64;
    anyhow::ensure!(span_us > 0, "--hours must be > 0");
    // End at now (whole seconds): readings must not be from the future.
    let end = Timestamp(Timestamp::now().0 / 1_000_000 * 1_000_000);
    let start = Timestamp(end.0 - span_us);
    let sim = PlantSim::with_scenario(&spec, seed, start, &scenario);

    let dir = tempfile::tempdir()?;
    let mut ropts = RuntimeOptions::default();
    // The simulation runs days in minutes: history and events of days ago are the run.
    ropts.store.history_retention_hours = ropts
        .store
        .history_retention_hours
        .max(opts.hours.ceil() as u64 + 24);
    ropts.store.event_retention_hours = ropts
        .store
        .event_retention_hours
        .max(opts.hours.ceil() as u64 + 24);
    // A minutes-long simulated outage of a sensor is seconds of wall time here: the
    // staleness sweeper (wall clock) would see nothing, and must not see what is not there.
    ropts.plant_dir = opts.plant.clone();
    let rt = Runtime::start(&spec, dir.path(), ropts).await?;

    let wall = Instant::now();
    let step_ms = opts.step_ms;
    let sync_ms = opts.sync_ms;
    let (sim, readings) = drive(&rt, sim, end, step_ms, sync_ms).await?;
    let labels = sim.final_labels();
    let elapsed = wall.elapsed();
    let detections = anomaly_episodes(&rt).await?;
    let machines = spec
        .assets()
        .iter()
        .filter(|a| a.path.level() == ferrotwin_models::Level::Machine)
        .count();
    let report = score(
        &labels,
        &detections,
        ScoreWindow {
            start,
            end,
            machines,
        },
    );
    rt.shutdown().await;

    let mut out = String::new();
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "ferrotwin eval: plant {plant_text}, {machines} machines; scenario {}; simulation seed {seed}; {:.1} simulated hours",
        opts.scenario
            .as_ref()
            .map_or("none (default random fault mix)".to_string(), |f| f
                .display()
                .to_string()),
        opts.hours
    );
    let _ = writeln!(
        out,
        "{readings} readings in {:.1} s wall ({:.0} readings/s, {:.0}x real time); {} anomaly episodes, {} labels",
        elapsed.as_secs_f64(),
        readings as f64 / elapsed.as_secs_f64(),
        span_us as f64 / 1e6 / elapsed.as_secs_f64(),
        detections.len(),
        labels.len()
    );
    let _ = write!(out, "{report}");
    Ok(out)
}

/// Runs `sim` from its current time to `end` into `rt` as fast as the runtime takes the
/// readings, in steps of `step_ms` of simulated time, waiting every `sync_ms` until the twins
/// took every reading (so the twins of one machine stay within `sync_ms` of each other).
/// Returns the sim (for its labels) and the readings pushed.
pub async fn drive(
    rt: &Runtime,
    mut sim: PlantSim,
    end: Timestamp,
    step_ms: i64,
    sync_ms: i64,
) -> Result<(PlantSim, u64)> {
    let router = rt.ingest();
    let credits = rt.ingest_credits();
    let step_ms = step_ms.max(1);
    let sync_us = sync_ms.max(step_ms) * 1000;
    let out = tokio::task::spawn_blocking(move || {
        let never = AtomicBool::new(false);
        let mut stats = DriverStats::default();
        let mut buf: Vec<Reading> = Vec::new();
        let mut t = sim.now();
        let mut next_sync = t.0 + sync_us;
        let mut total = 0u64;
        while t < end {
            t = t.plus_ms(step_ms).min(end);
            sim.step(t, &mut buf);
            total += buf.len() as u64;
            if push_all(&*router, &mut buf, 4096, &never, &mut stats).is_err() {
                return (sim, total, false);
            }
            if t.0 >= next_sync || t >= end {
                next_sync = t.0 + sync_us;
                while credits.in_flight() > 0 {
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        }
        (sim, total, true)
    })
    .await?;
    let (sim, total, complete) = out;
    anyhow::ensure!(
        complete,
        "the runtime closed its ingest after {total} readings, before the run's end"
    );
    Ok((sim, total))
}

/// Anomaly events of the store (after the twins' last evaluations landed), paired into
/// episodes per (asset, detector).
pub async fn anomaly_episodes(rt: &Runtime) -> Result<Vec<Detection>> {
    // Readings taken by twins may still be in a handler, and an evaluation or two on its way
    // to a machine: let them land, then wait for the store to hold their events.
    rt.settle().await;
    let mut open: std::collections::HashMap<(AssetPath, String), usize> = Default::default();
    let mut out: Vec<Detection> = Vec::new();
    let mut after_seq = 0;
    loop {
        let (events, next) = rt.events(&EventFilter {
            prefix: None,
            after_seq,
            limit: 10_000,
            kind: Some(EventKind::Anomaly),
            min_severity: ferrotwin_models::Severity::Info,
        })?;
        for e in &events {
            let key = (e.asset.clone(), e.alarm.clone());
            if e.episode == Some(EpisodeEdge::Start) {
                // A second start of an open episode (a restart replayed it): one episode.
                if open.contains_key(&key) {
                    continue;
                }
                open.insert(key, out.len());
                out.push(Detection {
                    asset: e.asset.clone(),
                    detector: e.alarm.clone(),
                    start: e.ts,
                    end: None,
                    contributors: Vec::new(),
                });
            } else if e.episode == Some(EpisodeEdge::End)
                && let Some(i) = open.remove(&key)
            {
                out[i].end = Some(e.ts);
            }
        }
        if events.is_empty() || next <= after_seq {
            break;
        }
        after_seq = next;
    }
    Ok(out)
}
