//! `ferrotwin bench apply`: a changed plant applied live to a running plant under a paced
//! load, through the public surface only (`Runtime`, `TwinApi::apply_plant`, a watcher).
//!
//! Printed: how long the apply call took, the time until every new sensor twin applied its
//! first reading, and the largest gap between two applied readings of any untouched sensor
//! while the apply ran, against the load's period (issue 17's target: none beyond it).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferrotwin_models::spec::{AssetKind, LineSpec, PlantSpec};
use ferrotwin_models::{AssetId, IngestSink, PushBackReason, Reading, Timestamp, Value, ValueType};
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::security::Caller;
use ferrotwin_runtime::{Change, Runtime, RuntimeOptions, TwinState};
use ferrotwin_sim::generate::generate;

use super::{percentile, plant_size, rss_bytes, sensor_ids};

pub struct ApplyBench {
    pub sensors: u64,
    pub add: u64,
    pub period_ms: u64,
    /// Add a sensor to every machine type instead of adding lines: every machine of the
    /// plant changes (and its sensors restart with it).
    pub per_type: bool,
}

/// `spec` with one more sensor in each machine type (a copy of its first, renamed).
fn with_a_sensor_per_type(spec: &PlantSpec) -> PlantSpec {
    let mut next = spec.clone();
    for t in next.machine_types.values_mut() {
        if let Some(first) = t.sensors.first() {
            let mut s = first.clone();
            s.name = "added-probe".into();
            t.sensors.push(s);
        }
    }
    next
}

/// `spec` with `lines` more lines in its first area, each a copy of its first line.
fn with_more_lines(spec: &PlantSpec, lines: usize) -> PlantSpec {
    let mut next = spec.clone();
    let area = &mut next.sites[0].areas[0];
    let model: LineSpec = area.lines[0].clone();
    for i in 0..lines {
        let mut l = model.clone();
        l.name = format!("added-{}", i + 1);
        area.lines.push(l);
    }
    next
}

pub(super) fn reading(id: AssetId, vt: ValueType, v: f64) -> Reading {
    let value = match vt {
        ValueType::Float => Value::Float(20.0 + v % 10.0),
        ValueType::Int => Value::Int((v % 10.0) as i64),
        ValueType::Bool => Value::Bool(v as i64 % 2 == 0),
    };
    Reading::good(
        id,
        ferrotwin_models::Property::Value,
        value,
        Timestamp::now(),
    )
}

/// One reading per sensor of `ids` per `period`, spread evenly over the period, and from
/// `late_from` on one per sensor of `late` too (refused as unknown until the apply adds them).
pub(super) fn paced_load(
    sink: &dyn IngestSink,
    ids: &[(AssetId, ValueType)],
    late: &[(AssetId, ValueType)],
    late_on: &AtomicBool,
    period: Duration,
    stop: &AtomicBool,
) -> u64 {
    let mut sent = 0u64;
    let slices = 100u32;
    let slice = period / slices;
    let mut round = 0u64;
    while !stop.load(Ordering::Relaxed) {
        for k in 0..slices as usize {
            let with_late = late_on.load(Ordering::Relaxed);
            let t = Instant::now();
            let mut batch = Vec::new();
            let part = |all: &[(AssetId, ValueType)], batch: &mut Vec<Reading>| {
                let (a, b) = (
                    all.len() * k / slices as usize,
                    all.len() * (k + 1) / slices as usize,
                );
                for &(id, vt) in &all[a..b] {
                    batch.push(reading(id, vt, round as f64));
                }
            };
            part(ids, &mut batch);
            if with_late {
                part(late, &mut batch);
            }
            for chunk in batch.chunks(1024) {
                let mut c = chunk.to_vec();
                loop {
                    match sink.try_push(c) {
                        Ok(()) => break,
                        Err(pb) if pb.why == PushBackReason::Busy => {
                            c = pb.batch;
                            std::thread::sleep(Duration::from_micros(200));
                        }
                        Err(_) => return sent,
                    }
                }
                sent += chunk.len() as u64;
            }
            if let Some(rest) = slice.checked_sub(t.elapsed()) {
                std::thread::sleep(rest);
            }
        }
        round += 1;
    }
    sent
}

pub async fn apply(b: ApplyBench) -> Result<String> {
    let mut out = String::new();
    let spec = generate(plant_size(b.sensors), 1);
    let assets = spec.assets();
    let first_line = assets
        .iter()
        .find(|a| a.kind.level() == ferrotwin_models::Level::Line)
        .map(|a| a.path.clone())
        .ok_or_else(|| anyhow::anyhow!("the generated plant has no line"))?;
    let per_line = assets
        .iter()
        .filter(|a| matches!(a.kind, AssetKind::Sensor { .. }) && a.path.starts_with(&first_line))
        .count()
        .max(1);
    let lines = (b.add as usize).div_ceil(per_line).max(1);
    let next = if b.per_type {
        with_a_sensor_per_type(&spec)
    } else {
        with_more_lines(&spec, lines)
    };
    let ids = sensor_ids(&spec);
    let old: HashSet<AssetId> = ids.iter().map(|(id, _)| *id).collect();
    let added: Vec<(AssetId, ValueType)> = sensor_ids(&next)
        .into_iter()
        .filter(|(id, _)| !old.contains(id))
        .collect();
    let dir = tempfile::tempdir()?;
    let mut opts = RuntimeOptions::default();
    opts.ingest.stale_sweep_ms = 3_600_000;
    // Room for every change of the whole plant for a few seconds: the gap figure is void if
    // the watcher lags.
    opts.ingest.watch_ring = 1 << 21;
    let t0 = Instant::now();
    let rt = Runtime::start(&spec, dir.path(), opts).await?;
    let _ = writeln!(
        out,
        "plant: {} sensors ({} twins), started in {:.1} s; adding {} = {} sensors, one reading per sensor every {} ms",
        ids.len(),
        rt.api().twin_count(),
        t0.elapsed().as_secs_f64(),
        if b.per_type {
            "a sensor to every machine type (every machine changes)".to_string()
        } else {
            format!("{lines} lines")
        },
        added.len(),
        b.period_ms
    );
    let rss0 = rss_bytes();
    // A watcher of the whole plant: each sensor's applied times.
    let mut w = rt.watch(None, false);
    let stop = Arc::new(AtomicBool::new(false));
    let applying = Arc::new(std::sync::Mutex::new(None::<(Timestamp, Timestamp)>));
    let watch = {
        let (stop, applying) = (stop.clone(), applying.clone());
        let added: HashSet<AssetId> = added.iter().map(|(id, _)| *id).collect();
        tokio::spawn(async move {
            let mut last: HashMap<AssetId, i64> = HashMap::new();
            let mut worst_gap = 0i64;
            let mut gaps: Vec<f64> = Vec::new();
            let mut before: Vec<f64> = Vec::new();
            let mut first_new: HashMap<AssetId, i64> = HashMap::new();
            let mut missed = 0u64;
            while !stop.load(Ordering::Relaxed) {
                missed += w.take_missed();
                let Ok(Some(change)) =
                    tokio::time::timeout(Duration::from_millis(100), w.rx.recv()).await
                else {
                    continue;
                };
                let Change::Twin(entry, snap) = change else {
                    continue;
                };
                let TwinState::Sensor(s) = &snap.state else {
                    continue;
                };
                let at = s.server_ts.0;
                if added.contains(&entry.id) {
                    first_new.entry(entry.id).or_insert(at);
                    continue;
                }
                let window = *applying.lock().expect("lock");
                let Some(prev) = last.insert(entry.id, at) else {
                    continue;
                };
                let gap = at - prev;
                match window {
                    // Gaps that overlap the apply.
                    Some((from, to)) if at >= from.0 && prev <= to.0 => {
                        worst_gap = worst_gap.max(gap);
                        gaps.push(gap as f64 / 1000.0);
                    }
                    None => before.push(gap as f64 / 1000.0),
                    _ => {}
                }
            }
            (worst_gap, gaps, before, first_new, missed)
        })
    };
    let late_on = Arc::new(AtomicBool::new(false));
    let period = Duration::from_millis(b.period_ms.max(10));
    let router = rt.ingest();
    let load = {
        let (router, stop, late_on) = (router.clone(), stop.clone(), late_on.clone());
        let (ids, added) = (ids.clone(), added.clone());
        tokio::task::spawn_blocking(move || {
            paced_load(router.as_ref(), &ids, &added, &late_on, period, &stop)
        })
    };
    // Three periods of steady load first.
    tokio::time::sleep(period * 3).await;
    let toml = next.to_toml();
    let api = rt.api();
    let caller = Caller::open(None);
    let version = api
        .plant(&caller, pb::GetPlantRequest { with_spec: false })
        .await?
        .version;
    let from = Timestamp::now();
    *applying.lock().expect("lock") = Some((from, Timestamp(i64::MAX)));
    late_on.store(true, Ordering::Relaxed);
    let t = Instant::now();
    let r = api
        .apply_plant(
            &caller,
            pb::ApplyPlantRequest {
                plant_toml: toml,
                base_version: version,
                dry_run: false,
                by: "bench".into(),
                site_toml: String::new(),
            },
        )
        .await?;
    let took = t.elapsed();
    let to = Timestamp::now();
    *applying.lock().expect("lock") = Some((from, to));
    if !r.applied {
        bail!("the apply changed nothing: {r:?}");
    }
    // Let the new twins take their readings, then stop.
    tokio::time::sleep(period * 3).await;
    stop.store(true, Ordering::Relaxed);
    let sent = load.await?;
    let (worst_gap, mut gaps, mut before, first_new, missed) = watch.await?;
    let _ = writeln!(
        out,
        "apply v{version} → v{}: {} in {:.0} ms (the call); {} readings sent in all",
        r.version,
        r.summary,
        took.as_secs_f64() * 1000.0,
        sent
    );
    let mut live: Vec<f64> = first_new
        .values()
        .map(|&at| (at - from.0).max(0) as f64 / 1000.0)
        .collect();
    let _ = writeln!(
        out,
        "new sensor twins live (first reading applied) after the apply began: {} of {}; p50 {:.0} ms, max {:.0} ms",
        live.len(),
        added.len(),
        percentile(&mut live, 0.5),
        percentile(&mut live, 1.0)
    );
    let _ = writeln!(
        out,
        "untouched sensors during the apply: largest gap between two applied readings {:.0} ms, p99.9 {:.0} ms ({} gaps; period {} ms); before it: largest {:.0} ms, p99.9 {:.0} ms; watcher missed {}",
        worst_gap as f64 / 1000.0,
        percentile(&mut gaps, 0.999),
        gaps.len(),
        b.period_ms,
        percentile(&mut before, 1.0),
        percentile(&mut before, 0.999),
        missed
    );
    let m = rt.metrics();
    let _ = writeln!(
        out,
        "rejected: unknown_asset {} (new ids before the commit), removed_asset {}; push-backs {}; RSS {:.0} → {:.0} MiB",
        m.unknown_asset.load(Ordering::Relaxed),
        m.removed_asset.load(Ordering::Relaxed),
        m.push_backs.load(Ordering::Relaxed),
        rss0 as f64 / 1048576.0,
        rss_bytes() as f64 / 1048576.0
    );
    let check = next
        .assets()
        .iter()
        .filter(|a| matches!(a.kind, AssetKind::Sensor { .. }))
        .count();
    if rt.api().twin_count() < check {
        bail!("the runtime runs fewer twins than the new plant has sensors");
    }
    rt.shutdown().await;
    Ok(out)
}
