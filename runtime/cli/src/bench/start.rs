//! `ferrotwin bench start`: how long a generated plant of `--sensors` takes to start on an
//! empty data dir, to stop cleanly, and to start again from its data dir (restore), with the
//! resident memory after each start. Each phase runs in a child process of its own (this
//! binary, `--phase`), so one phase's freed memory is not counted in the next one's RSS.
//!
//! The empty start is followed by one reading per sensor (every twin then has state to
//! restore) and the clean stop; the restore start by the same reading round and a clean stop.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrotwin_models::{AssetId, IngestSink, ValueType};
use ferrotwin_runtime::{Runtime, RuntimeOptions};
use ferrotwin_sim::driver::{DriverStats, push_all};
use ferrotwin_sim::generate::generate;

use super::apply::reading;
use super::{percentile, plant_size, rss_bytes, sensor_ids};

/// What one phase measured (a child prints it as one line: start s, RSS bytes, stop s,
/// twins).
#[derive(Debug, Clone, Copy)]
struct Phase {
    start_s: f64,
    rss: u64,
    stop_s: f64,
    twins: u64,
}

/// Longest wait for one reading per sensor to be applied.
const APPLY_WAIT: Duration = Duration::from_secs(600);

/// One phase in this process: start on `dir` (empty or restored), a reading per sensor,
/// the clean stop. Printed for the parent.
pub async fn phase(sensors: u64, dir: &Path) -> Result<String> {
    let spec = generate(plant_size(sensors), 1);
    let mut opts = RuntimeOptions::default();
    opts.ingest.stale_sweep_ms = 3_600_000;
    let t0 = Instant::now();
    let rt = Runtime::start(&spec, dir, opts).await?;
    let start_s = t0.elapsed().as_secs_f64();
    let rss = rss_bytes();
    let twins = rt.api().twin_count() as u64;
    let ids = sensor_ids(&spec);
    let router = rt.ingest();
    let applied0 = rt.metrics().readings_applied.load(Ordering::Relaxed);
    tokio::task::spawn_blocking(move || one_round(router.as_ref(), &ids)).await??;
    let ids = spec
        .assets()
        .iter()
        .filter(|a| a.kind.level() == ferrotwin_models::Level::Sensor)
        .count();
    let deadline = Instant::now() + APPLY_WAIT;
    while rt.metrics().readings_applied.load(Ordering::Relaxed) - applied0 < ids as u64 {
        if Instant::now() > deadline {
            bail!("one reading per sensor was not applied within {APPLY_WAIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t1 = Instant::now();
    rt.shutdown().await;
    let stop_s = t1.elapsed().as_secs_f64();
    Ok(format!("{start_s} {rss} {stop_s} {twins}\n"))
}

/// One reading per sensor, in batches, waiting while the runtime pushes back.
fn one_round(sink: &dyn IngestSink, ids: &[(AssetId, ValueType)]) -> Result<()> {
    let mut readings: Vec<_> = ids.iter().map(|&(id, vt)| reading(id, vt, 1.0)).collect();
    push_all(
        sink,
        &mut readings,
        4096,
        &AtomicBool::new(false),
        &mut DriverStats::default(),
    )
    .map_err(|_| anyhow::anyhow!("the runtime closed its ingest"))
}

fn run_phase(sensors: u64, dir: &Path) -> Result<Phase> {
    let out = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "start", "--sensors"])
        .arg(sensors.to_string())
        .arg("--phase-dir")
        .arg(dir)
        .output()
        .context("running a phase")?;
    if !out.status.success() {
        bail!(
            "a phase failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let f: Vec<f64> = text
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let [start_s, rss, stop_s, twins] = f[..] else {
        bail!("a phase printed {text:?}");
    };
    Ok(Phase {
        start_s,
        rss: rss as u64,
        stop_s,
        twins: twins as u64,
    })
}

/// `runs` rounds of (empty start → stop → restore → stop), each phase in its own process;
/// medians and every run.
pub fn start(sensors: u64, runs: u32) -> Result<String> {
    let mut out = String::new();
    let (mut empty, mut restored) = (Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let dir = tempfile::tempdir()?;
        empty.push(run_phase(sensors, dir.path())?);
        restored.push(run_phase(sensors, dir.path())?);
    }
    let twins = empty[0].twins;
    let _ = writeln!(
        out,
        "plant: {} sensors, {twins} twins (every asset an actor), detectors on; {} run(s), each phase in a fresh process",
        sensors,
        empty.len()
    );
    let med = |v: &[Phase], f: fn(&Phase) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        percentile(&mut x, 0.5)
    };
    for (name, v) in [("empty start", &empty), ("restore", &restored)] {
        let rss = med(v, |p| p.rss as f64);
        let _ = writeln!(
            out,
            "{name:<12} {:>7.2} s   RSS {:>7.0} MiB ({:.2} KiB per twin)   clean stop after it {:>6.2} s   [runs: {}]",
            med(v, |p| p.start_s),
            rss / 1048576.0,
            rss / twins as f64 / 1024.0,
            med(v, |p| p.stop_s),
            v.iter()
                .map(|p| format!("{:.2}/{:.2} s", p.start_s, p.stop_s))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(out)
}
