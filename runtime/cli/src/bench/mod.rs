//! `ferrotwin bench ingest`: drives the real ingest path (router → sensor twin → alarms →
//! history chunks → store writer → watch hub) and prints figures next to a bare tokio
//! channel doing the same hops. A benchmark, not a test: it prints, it never fails on speed.

pub mod actions;
pub mod apply;
pub mod http;
pub mod plc;
pub mod replication;
pub mod security;
pub mod start;
pub mod telemetry;

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use ferrotwin_models::Timestamp;
use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{AssetId, IngestSink, Property, PushBackReason, Reading, Value, ValueType};
use ferrotwin_sim::generate::{PlantSize, generate};
use tokio::sync::{broadcast, mpsc};

use ferrotwin_runtime::TwinState;
use ferrotwin_runtime::{Change, Watcher};
use ferrotwin_runtime::{Runtime, RuntimeOptions};

pub struct IngestBench {
    pub sensors: u64,
    pub seconds: u64,
    /// Local inference on (the default of a plant spec) or off in every twin.
    pub detectors: bool,
}

const BATCH: usize = 4096;

/// This process's resident set (Linux `/proc/self/status`; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub(crate) fn plant_size(sensors: u64) -> PlantSize {
    let machines = sensors.div_ceil(10).max(1);
    let per_line = machines.min(100);
    let lines = machines.div_ceil(per_line);
    let lines_per_area = lines.min(50);
    let areas = lines.div_ceil(lines_per_area);
    PlantSize {
        sites: 1,
        areas: areas as u32,
        lines: lines_per_area as u32,
        machines: per_line as u32,
        sensors_per_machine: 10,
    }
}

/// Every sensor of the plant with its value type (what a load generator writes).
pub(crate) fn sensor_ids(spec: &PlantSpec) -> Vec<(AssetId, ValueType)> {
    spec.assets()
        .iter()
        .filter_map(|a| match &a.kind {
            AssetKind::Sensor { spec, .. } => Some((a.path.id(), spec.value_type)),
            _ => None,
        })
        .collect()
}

/// Latency samples from a watcher, in µs from reading creation to the watcher.
struct WatchStats {
    samples: Arc<std::sync::Mutex<Vec<u64>>>,
    lagged: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

fn spawn_watcher(mut w: Watcher) -> WatchStats {
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(1 << 20)));
    let lagged = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (s, l, st) = (samples.clone(), lagged.clone(), stop.clone());
    tokio::spawn(async move {
        let mut n = 0u64;
        while !st.load(Ordering::Relaxed) {
            l.fetch_add(w.take_missed(), Ordering::Relaxed);
            let Ok(Some(change)) =
                tokio::time::timeout(Duration::from_millis(100), w.rx.recv()).await
            else {
                continue;
            };
            if let Change::Twin(_, snap) = change {
                n += 1;
                if n.is_multiple_of(16)
                    && let TwinState::Sensor(sv) = &snap.state
                    && sv.source_ts.0 > 0
                {
                    let lat = (Timestamp::now().0 - sv.source_ts.0).max(0) as u64;
                    s.lock().expect("samples lock").push(lat);
                }
            }
        }
    });
    WatchStats {
        samples,
        lagged,
        stop,
    }
}

/// The `p` quantile of `v` (sorts it); NaN for no samples. Shared by the benchmarks.
pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Latency samples in µs as ms.
fn as_ms(us: Vec<u64>) -> Vec<f64> {
    us.into_iter().map(|v| v as f64 / 1000.0).collect()
}

/// Pushes batches of one reading per sensor, round robin, for `dur`; `rate` readings/s
/// (None = as fast as the sink takes them). Returns readings accepted.
pub(crate) fn load(
    sink: &dyn IngestSink,
    ids: &[(AssetId, ValueType)],
    dur: Duration,
    rate: Option<f64>,
) -> u64 {
    let start = Instant::now();
    let mut sent = 0u64;
    let mut i = 0usize;
    let mut v = 0.0f64;
    while start.elapsed() < dur {
        if let Some(r) = rate {
            let due = (start.elapsed().as_secs_f64() * r) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(200));
                continue;
            }
        }
        let ts = Timestamp::now();
        let mut batch = Vec::with_capacity(BATCH);
        for _ in 0..BATCH.min(ids.len()) {
            v += 0.01;
            let (id, vt) = ids[i];
            let value = match vt {
                ValueType::Float => Value::Float(20.0 + (v % 10.0)),
                ValueType::Int => Value::Int((v % 10.0) as i64),
                ValueType::Bool => Value::Bool(v % 2.0 > 1.0),
            };
            batch.push(Reading::good(id, Property::Value, value, ts));
            i = (i + 1) % ids.len();
        }
        let n = batch.len() as u64;
        loop {
            match sink.try_push(batch) {
                Ok(()) => break,
                Err(pb) if pb.why == PushBackReason::Busy => {
                    batch = pb.batch;
                    std::thread::yield_now();
                    if start.elapsed() >= dur {
                        return sent;
                    }
                }
                Err(_) => return sent,
            }
        }
        sent += n;
    }
    sent
}

/// The physical limit of the same hops on this machine: a producer thread groups the batch
/// per key and sends each group over a tokio mpsc to one task per sensor, which updates its
/// value and publishes to a broadcast ring (as a twin publishes to the watch hub).
async fn bare_channel_rate(sensors: usize, dur: Duration) -> f64 {
    let (btx, mut brx) = broadcast::channel::<(u32, i64)>(16_384);
    let done = Arc::new(AtomicU64::new(0));
    let mut senders = Vec::with_capacity(sensors);
    for _ in 0..sensors {
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<(u32, f64, i64)>>();
        let btx = btx.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = 0.0;
            while let Some(batch) = rx.recv().await {
                for (k, v, ts) in &batch {
                    last += v;
                    let _ = btx.send((*k, *ts));
                }
                done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            std::hint::black_box(last);
        });
        senders.push(tx);
    }
    // One watcher, as in the ferrotwin run.
    tokio::spawn(async move {
        loop {
            match brx.recv().await {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let senders = Arc::new(senders);
    let s2 = senders.clone();
    let inflight_limit = 1u64 << 20;
    let done2 = done.clone();
    let producer = std::thread::spawn(move || {
        let start = Instant::now();
        let mut sent = 0u64;
        let mut i = 0usize;
        while start.elapsed() < dur {
            if sent - done2.load(Ordering::Relaxed) > inflight_limit {
                std::thread::yield_now();
                continue;
            }
            let mut groups: HashMap<u32, Vec<(u32, f64, i64)>> = HashMap::with_capacity(BATCH);
            for _ in 0..BATCH.min(sensors) {
                groups.entry(i as u32).or_default().push((i as u32, 1.0, 0));
                i = (i + 1) % sensors;
            }
            for (k, g) in groups {
                sent += g.len() as u64;
                let _ = s2[k as usize].send(g);
            }
        }
        start.elapsed()
    });
    let before = done.load(Ordering::Relaxed);
    let elapsed = tokio::task::spawn_blocking(move || producer.join())
        .await
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or(dur);
    let after = done.load(Ordering::Relaxed);
    drop(senders);
    (after - before) as f64 / elapsed.as_secs_f64()
}

/// An actor that does nothing: what ractor itself costs per actor in this build.
struct Idle;

impl ractor::Actor for Idle {
    type Msg = ();
    type State = ();
    type Arguments = ();

    async fn pre_start(
        &self,
        _myself: ractor::ActorRef<()>,
        _args: (),
    ) -> Result<(), ractor::ActorProcessingErr> {
        Ok(())
    }
}

/// RSS per idle ractor actor, spawning `n` of them (`ferrotwin bench actors`). Run in a
/// process of its own: memory freed by one measurement would be reused by the next.
pub async fn bare_actor_bytes(n: usize) -> Result<f64> {
    let before = rss_bytes();
    let mut actors = Vec::with_capacity(n);
    for _ in 0..n {
        actors.push(ractor::Actor::spawn(None, Idle, ()).await?.0);
    }
    let per = (rss_bytes().saturating_sub(before)) as f64 / n as f64;
    for a in &actors {
        a.stop(None);
    }
    Ok(per)
}

pub async fn ingest(b: IngestBench) -> Result<String> {
    let mut out = String::new();
    let idle = std::process::Command::new(std::env::current_exe()?)
        .args(["bench", "actors", "--count"])
        .arg(b.sensors.clamp(1_000, 1_000_000).to_string())
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<f64>()
                .ok()
        })
        .unwrap_or(f64::NAN);
    let size = plant_size(b.sensors);
    let mut spec = generate(size, 1);
    for t in spec.machine_types.values_mut() {
        t.detect.enabled = b.detectors;
        for s in &mut t.sensors {
            s.detect.enabled = b.detectors;
        }
    }
    let dir = tempfile::tempdir()?;
    let rss0 = rss_bytes();
    let t0 = Instant::now();
    let mut opts = RuntimeOptions::default();
    // No reading is late in a benchmark: keep the sweeper out of the figures.
    opts.ingest.stale_sweep_ms = 3_600_000;
    let rt = Runtime::start(&spec, dir.path(), opts).await?;
    let spawn_s = t0.elapsed().as_secs_f64();
    let rss1 = rss_bytes();
    let ids = sensor_ids(&spec);
    let twins = rt.api().twin_count();
    let _ = writeln!(
        out,
        "plant: {} sensor twins, {} twins in all, detectors {}; started in {spawn_s:.1} s",
        ids.len(),
        twins,
        if b.detectors { "on" } else { "off" }
    );
    let _ = writeln!(
        out,
        "memory: RSS {:.0} MiB after start, {:.0} B per twin ({:.2} KiB); an idle ractor actor alone: {:.0} B",
        rss1 as f64 / 1048576.0,
        (rss1 - rss0) as f64 / twins as f64,
        (rss1 - rss0) as f64 / twins as f64 / 1024.0,
        idle
    );

    let dur = Duration::from_secs(b.seconds.max(1));
    // Phase 1: as fast as the runtime takes readings, with one watcher of the whole plant.
    let w = spawn_watcher(rt.watch(None, false));
    let router = rt.ingest();
    let ids = Arc::new(ids);
    let applied0 = rt.metrics().readings_applied.load(Ordering::Relaxed);
    let t = Instant::now();
    let (r2, i2) = (router.clone(), ids.clone());
    let sent = tokio::task::spawn_blocking(move || load(r2.as_ref(), &i2, dur, None)).await?;
    let secs = t.elapsed().as_secs_f64();
    let applied = rt.metrics().readings_applied.load(Ordering::Relaxed) - applied0;
    let max_rate = applied as f64 / secs;
    w.stop.store(true, Ordering::Relaxed);
    let mut lat = as_ms(std::mem::take(
        &mut *w.samples.lock().expect("samples lock"),
    ));
    let _ = writeln!(
        out,
        "max rate: {:.0} readings/s applied ({} pushed in {secs:.1} s, {} push-backs); watcher p50 {:.2} ms p99 {:.2} ms, lagged {}",
        max_rate,
        sent,
        rt.metrics().push_backs.load(Ordering::Relaxed),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        w.lagged.load(Ordering::Relaxed)
    );
    // Let the mailboxes drain before the paced phase.
    while rt.readings_in_flight() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Phase 2: half the max rate, paced: latency from reading creation to a watcher of one
    // line (an engineer's view; the whole-plant watcher's load is phase 1's).
    let half = max_rate / 2.0;
    let assets = spec.assets();
    let line = assets
        .iter()
        .find(|a| a.kind.level() == ferrotwin_models::Level::Line)
        .map(|a| a.path.clone());
    let line_sensors = line.as_ref().map_or(0, |l| {
        assets
            .iter()
            .filter(|a| a.kind.level() == ferrotwin_models::Level::Sensor && a.path.starts_with(l))
            .count()
    });
    let w = spawn_watcher(rt.watch(line, false));
    let (r2, i2) = (router.clone(), ids.clone());
    let t = Instant::now();
    let applied0 = rt.metrics().readings_applied.load(Ordering::Relaxed);
    tokio::task::spawn_blocking(move || load(r2.as_ref(), &i2, dur, Some(half))).await?;
    let secs = t.elapsed().as_secs_f64();
    let applied = rt.metrics().readings_applied.load(Ordering::Relaxed) - applied0;
    w.stop.store(true, Ordering::Relaxed);
    let mut lat = as_ms(std::mem::take(
        &mut *w.samples.lock().expect("samples lock"),
    ));
    let _ = writeln!(
        out,
        "half rate: {:.0} readings/s offered, {:.0} applied; watcher of one line ({line_sensors} sensors) p50 {:.2} ms p99 {:.2} ms ({} samples, lagged {})",
        half,
        applied as f64 / secs,
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.99),
        lat.len(),
        w.lagged.load(Ordering::Relaxed),
    );
    let st = rt.store_stats();
    let _ = writeln!(
        out,
        "store: {} flushes, {} snapshots, {} history chunks, {} events written; last flush {:.1} ms",
        st.flushes.load(Ordering::Relaxed),
        st.snapshots_written.load(Ordering::Relaxed),
        st.chunks_written.load(Ordering::Relaxed),
        st.events_written.load(Ordering::Relaxed),
        st.last_flush_us.load(Ordering::Relaxed) as f64 / 1000.0
    );
    let kinds: Vec<String> = ferrotwin_models::EventKind::ALL
        .iter()
        .zip(&rt.metrics().events)
        .map(|(k, c)| format!("{} {}", k.as_str(), c.load(Ordering::Relaxed)))
        .collect();
    let _ = writeln!(out, "events raised: {}", kinds.join(", "));
    rt.shutdown().await;

    let bare = bare_channel_rate(ids.len(), dur).await;
    let _ = writeln!(
        out,
        "bare tokio mpsc + task, same hops: {:.0} readings/s; ferrotwin reaches {:.1} % of it",
        bare,
        100.0 * max_rate / bare
    );
    Ok(out)
}
