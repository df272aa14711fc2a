//! `ferrotwin bench actions`: local actions under ingest load. A generated plant of
//! `--sensors` takes one reading per sensor per second; one more line holds a bench oven
//! whose rule stops it on a critical zone temperature by writing its run enable coil to a
//! simulated Modbus PLC (the only tag of its connection). The bench heats the zone (in-process
//! readings), waits for the rule's `action` event, cools it, and again.
//!
//! Printed: the latency from the reading that completed the alarm (after its on-delay; the
//! alarm event's time is that reading's source time) to the PLC's acknowledgment of the
//! write (the action event's time), p50/p99/max over the firings, and the ingest rate that
//! went on meanwhile.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_models::rule::RuleMode;
use ferrotwin_models::spec::{LineSpec, MachineInstance};
use ferrotwin_models::{AssetId, AssetPath, EventKind, Property, Reading, Timestamp, Value};
use ferrotwin_runtime::{Change, Runtime, RuntimeOptions};
use ferrotwin_sim::generate::generate;
use ferrotwin_sim::serve::ServedPlant;

use super::apply::paced_load;
use super::{percentile, plant_size, sensor_ids};

pub struct ActionsBench {
    pub sensors: u64,
    pub firings: u64,
}

const ON_DELAY_MS: u64 = 200;

pub async fn actions(b: ActionsBench) -> Result<String> {
    let mut out = String::new();
    let mut spec = generate(plant_size(b.sensors), 1);
    let load_ids = sensor_ids(&spec);
    // The bench oven: the catalogue's oven, a short on-delay, the stop rule.
    let mut oven = spec.machine_types["oven"].clone();
    for s in &mut oven.sensors {
        for a in &mut s.alarms {
            a.on_delay_ms = ON_DELAY_MS;
        }
    }
    oven.rules.push(crate::demo::overheat_stop(
        "zone-1-temp.high",
        RuleMode::Enabled,
    ));
    spec.machine_types.insert("bench-oven".into(), oven);
    let bench_line = LineSpec {
        name: "bench-ovens".into(),
        setpoints: Vec::new(),
        rules: Vec::new(),
        machines: vec![MachineInstance::new("oven-1", "bench-oven")],
    };
    spec.sites[0].areas[0].lines.push(bench_line.clone());
    // The PLC serves the bench line only.
    let mut served = spec.clone();
    served.sites.truncate(1);
    served.sites[0].areas.truncate(1);
    served.sites[0].areas[0].lines = vec![bench_line];
    let plant = ServedPlant::start(&served, 1, Timestamp::now()).await?;
    let mut conns = crate::feeds::modbus_connections(&served, &plant, 1000, |_| true)?;
    for c in &mut conns {
        if let ConnectionConfig::Modbus(m) = c {
            m.tags.retain(|t| t.property == "run_enable");
        }
    }
    let s = &spec.sites[0];
    let machine = AssetPath::parse(&format!(
        "{}/{}/{}/bench-ovens/oven-1",
        spec.enterprise, s.name, s.areas[0].name
    ))?;
    let zone: AssetId = machine.child("zone-1-temp")?.id();
    let dir = tempfile::tempdir()?;
    let mut opts = RuntimeOptions::default();
    opts.ingest.stale_sweep_ms = 3_600_000;
    opts.connections = conns;
    let t0 = Instant::now();
    let rt = Runtime::start(&spec, dir.path(), opts).await?;
    let _ = writeln!(
        out,
        "plant: {} sensors under load (one reading per sensor per second) + a bench oven on a simulated Modbus PLC; started in {:.1} s; alarm on-delay {ON_DELAY_MS} ms",
        load_ids.len(),
        t0.elapsed().as_secs_f64()
    );
    let mut w = rt.watch(Some(machine.clone()), true);
    let stop = Arc::new(AtomicBool::new(false));
    let router = rt.ingest();
    let load = {
        let (stop, router) = (stop.clone(), router.clone());
        std::thread::spawn(move || {
            paced_load(
                router.as_ref(),
                &load_ids,
                &[],
                &AtomicBool::new(false),
                Duration::from_secs(1),
                &stop,
            )
        })
    };
    // How late a task that asks to wake every 5 ms wakes: the async threads' lag.
    let lag = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut late_ms = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                tokio::time::sleep(Duration::from_millis(5)).await;
                late_ms.push((t.elapsed().as_secs_f64() - 0.005) * 1000.0);
            }
            late_ms
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let applied0 = rt.metrics().readings_applied.load(Ordering::Relaxed);
    let backs0 = rt.metrics().push_backs.load(Ordering::Relaxed);
    let run0 = Instant::now();
    let push = |v: f64| {
        let r = Reading::good(zone, Property::Value, Value::Float(v), Timestamp::now());
        let _ = router.try_push(vec![r]);
    };
    let mut alarm_ts: HashMap<u64, i64> = HashMap::new();
    let mut lat_ms = Vec::new();
    let mut answer_ms = Vec::new();
    let mut failed = 0u64;
    for _ in 0..b.firings {
        // Hot until the rule acts: a reading every 20 ms.
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut fired = None;
        while fired.is_none() && Instant::now() < deadline {
            push(290.0);
            let until = Instant::now() + Duration::from_millis(20);
            while let Ok(Some(c)) = tokio::time::timeout_at(until.into(), w.rx.recv()).await {
                let Change::Event(e) = c else { continue };
                match e.kind {
                    EventKind::Alarm if e.message.contains("raised") => {
                        alarm_ts.insert(e.seq, e.ts.0);
                    }
                    EventKind::Action if e.message.contains("fired") => {
                        fired = Some(e);
                        break;
                    }
                    _ => {}
                }
            }
        }
        let Some(e) = fired else {
            bail!("the rule did not fire within 20 s");
        };
        if !e.message.contains("PLC confirmed") {
            failed += 1;
        }
        let seq: u64 = e
            .message
            .split("(event ")
            .nth(1)
            .and_then(|s| s.split(')').next())
            .and_then(|s| s.parse().ok())
            .context("the action event names its trigger")?;
        let from = alarm_ts
            .get(&seq)
            .copied()
            .context("the trigger alarm was seen")?;
        lat_ms.push((e.ts.0 - from) as f64 / 1000.0);
        if let Some(f) = e
            .message
            .split("ms from the reading, ")
            .nth(1)
            .and_then(|s| s.split(" ms").next())
            .and_then(|s| s.parse::<f64>().ok())
        {
            answer_ms.push(f);
        }
        // Cool down until the alarm returns (the rule re-arms), then a pause.
        for _ in 0..10 {
            push(200.0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = run0.elapsed().as_secs_f64();
    let applied = rt.metrics().readings_applied.load(Ordering::Relaxed) - applied0;
    stop.store(true, Ordering::Relaxed);
    let _ = load.join();
    let mut late_ms = lag.await.unwrap_or_default();
    let n = lat_ms.len();
    let _ = writeln!(
        out,
        "{n} firings in {secs:.1} s ({failed} not confirmed); ingest meanwhile {:.0} readings/s applied, {} batches pushed back",
        applied as f64 / secs,
        rt.metrics().push_backs.load(Ordering::Relaxed) - backs0
    );
    let _ = writeln!(
        out,
        "reading that completed the alarm → PLC's acknowledgment of the rule's write: {}",
        spread_ms(&mut lat_ms)
    );
    if !answer_ms.is_empty() {
        let _ = writeln!(
            out,
            "  of which firing → PLC's answer (the executor's write over Modbus): {}",
            spread_ms(&mut answer_ms)
        );
    }
    if !late_ms.is_empty() {
        let _ = writeln!(
            out,
            "async threads' lag (a 5 ms timer's lateness): {}",
            spread_ms(&mut late_ms)
        );
    }
    rt.shutdown().await;
    Ok(out)
}

/// `p50 … ms, p99 … ms, max … ms` of `v`.
fn spread_ms(v: &mut [f64]) -> String {
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(v, 0.50),
        percentile(v, 0.99),
        v.iter().copied().fold(0.0, f64::max)
    )
}
