//! `ferrotwin bench replication`: a site runtime replicating to an enterprise runtime over
//! real gRPC on loopback, through a TCP relay that counts the bytes on the wire and can cut
//! the link. Every sensor gets one reading a second (a realistic site load). Prints the
//! sustained replication rate, wire bytes per reading, the steady-state lag, and the
//! catch-up after an outage. A benchmark: it prints, it never fails on speed.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrotwin_models::Timestamp;
use ferrotwin_models::{AssetId, Property, Reading, Value, ValueType};
use ferrotwin_sim::generate::{PlantSize, generate};
use tokio::net::TcpListener;

use super::percentile;
use crate::relay::Relay;
use ferrotwin_runtime::{EnterpriseRole, HistoryPolicy, SiteReplication};
use ferrotwin_runtime::{Runtime, RuntimeOptions};

pub struct ReplicationBench {
    pub sensors: u64,
    pub seconds: u64,
    pub outage_seconds: u64,
    pub history: HistoryPolicy,
}

pub async fn replication(b: ReplicationBench) -> Result<String> {
    let size = PlantSize {
        sites: 1,
        areas: 1,
        lines: (b.sensors.div_ceil(100)).clamp(1, 1000) as u32,
        machines: 10,
        sensors_per_machine: 10,
    };
    let spec = generate(size, 1);
    let dir = tempfile::tempdir()?;
    let site_path = format!("{}/{}", spec.enterprise, spec.sites[0].name);
    let ent_opts = RuntimeOptions {
        enterprise: Some(EnterpriseRole {
            accept: vec![site_path.clone()],
        }),
        ..RuntimeOptions::default()
    };
    std::fs::create_dir_all(dir.path().join("e"))?;
    std::fs::create_dir_all(dir.path().join("s"))?;
    let ent = Runtime::start(&spec, &dir.path().join("e"), ent_opts).await?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let ent_addr = l.local_addr()?;
    ent.serve_grpc(l).expect("serve");
    let relay = Relay::to(ent_addr).await?;
    let mut r = SiteReplication::new(format!("http://{}", relay.addr));
    r.history = b.history;
    r.reconnect_max_ms = 1000;
    let site = Runtime::start(
        &spec,
        &dir.path().join("s"),
        RuntimeOptions {
            replication: Some(r),
            ..RuntimeOptions::default()
        },
    )
    .await?;
    let sensors: Vec<(AssetId, ValueType)> = super::sensor_ids(&spec);
    let n = sensors.len();
    // Load: every sensor once a second, in ten slices a second.
    let pushed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let (router, pushed, stop) = (site.ingest(), pushed.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let mut k = 0usize;
            let mut step = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                step += 1;
                let ts = Timestamp::now();
                let slice = n.div_ceil(10);
                let batch: Vec<Reading> = (0..slice)
                    .map(|i| {
                        let (id, vt) = sensors[(k + i) % n];
                        let x = ((step as f64) * 0.1 + i as f64).sin() * 10.0 + 50.0;
                        let value = match vt {
                            ValueType::Float => Value::Float(x),
                            ValueType::Int => Value::Int(x as i64),
                            ValueType::Bool => Value::Bool(x > 50.0),
                        };
                        Reading::good(id, Property::Value, value, ts)
                    })
                    .collect();
                k = (k + slice) % n;
                let len = batch.len() as u64;
                let mut b = batch;
                loop {
                    match router.try_push(b) {
                        Ok(()) => break,
                        Err(back) => {
                            b = back.batch;
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                }
                pushed.fetch_add(len, Ordering::Relaxed);
            }
        })
    };
    site.outbox_lag().context("outbox")?;
    let ent_api = ent.api();
    // The enterprise's view of this site's stream (batches applied, the seq reached).
    let mirror = || {
        ent_api
            .replication_status(&ferrotwin_runtime::security::Caller::open(None))
            .expect("the open caller may read")
            .sites
            .into_iter()
            .find(|s| s.site == site_path)
            .unwrap_or_default()
    };
    let lag_ms = |at: i64| {
        let l = site.outbox_lag().unwrap_or_default();
        l.oldest_unacked_us
            .map_or(0.0, |t| (at - t).max(0) as f64 / 1000.0)
    };
    // Warm up (the first full snapshot), then the steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (up0, down0, p0) = (
        relay.bytes_up(),
        relay.bytes_down(),
        pushed.load(Ordering::Relaxed),
    );
    let b0 = mirror().batches;
    let started = Instant::now();
    let mut lags = Vec::new();
    while started.elapsed() < Duration::from_secs(b.seconds) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        lags.push(lag_ms(Timestamp::now().0));
    }
    let secs = started.elapsed().as_secs_f64();
    let up = relay.bytes_up() - up0;
    let down = relay.bytes_down() - down0;
    let readings = pushed.load(Ordering::Relaxed) - p0;
    let batches = mirror().batches - b0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "replication, {n} sensors at 1 reading/s each, history policy {:?}, {secs:.0} s steady state:",
        b.history
    );
    let _ = writeln!(
        out,
        "  readings {:.0}/s at the site; {:.1} batches/s applied at the enterprise",
        readings as f64 / secs,
        batches as f64 / secs
    );
    let _ = writeln!(
        out,
        "  on the wire (gzip, HTTP/2): {:.0} B/s site→enterprise, {:.0} B/s back; {:.2} bytes per reading",
        up as f64 / secs,
        down as f64 / secs,
        up as f64 / readings.max(1) as f64
    );
    let _ = writeln!(
        out,
        "  lag (age of the oldest unacked batch, sampled every 100 ms): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
        percentile(&mut lags.clone(), 0.5),
        percentile(&mut lags.clone(), 0.99),
        percentile(&mut lags, 1.0)
    );
    if b.outage_seconds > 0 {
        relay.cut();
        tokio::time::sleep(Duration::from_secs(b.outage_seconds)).await;
        let backlog = site.outbox_lag().unwrap_or_default();
        let target = backlog.last_seq;
        let up0 = relay.bytes_up();
        relay.restore();
        let t = Instant::now();
        while mirror().applied_seq < target {
            tokio::time::sleep(Duration::from_millis(20)).await;
            if t.elapsed() > Duration::from_secs(3600) {
                break;
            }
        }
        let catch_up = t.elapsed().as_secs_f64();
        let behind = (target - backlog.acked_seq) as f64;
        let _ = writeln!(
            out,
            "  outage of {} s: backlog {} batches, {} bytes in the outbox; caught up in {catch_up:.1} s ({:.0} batches/s, {:.1} MB/s of outbox, {:.1} MB on the wire) while the load went on",
            b.outage_seconds,
            backlog.count,
            backlog.bytes,
            behind / catch_up,
            backlog.bytes as f64 / catch_up / 1e6,
            (relay.bytes_up() - up0) as f64 / 1e6
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = loader.await;
    site.shutdown().await;
    ent.shutdown().await;
    Ok(out)
}
