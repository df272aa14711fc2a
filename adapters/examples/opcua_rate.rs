//! How many monitored-item updates per second one OPC UA adapter takes from one simulator
//! server: `cargo run --release -p ferrotwin-adapters --example opcua_rate [SENSORS] [SPEED]`.
//!
//! Serves a one-site plant of about SENSORS sensors (default 3000), stepped every 100 ms with
//! simulated time running SPEED times as fast as the wall clock (default 10: every sensor has
//! new samples at every step), subscribes to every sensor's `value` and counts what reaches
//! the sink over 10 s, after a warm-up.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrotwin_adapters::{ConnectionConfig, LinkState};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{IngestSink, PushBack, Reading, Timestamp};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::serve::ServedPlant;
use tokio_util::sync::CancellationToken;

/// Counts and drops.
#[derive(Default)]
struct Counter(AtomicU64);

impl IngestSink for Counter {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let sensors: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3000);
    let speed: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10.0);
    let per_machine = 30;
    let machines = sensors.div_ceil(per_machine).max(1);
    let spec = generate(
        PlantSize {
            sites: 1,
            areas: 1,
            lines: machines.div_ceil(10),
            machines: machines.min(10),
            sensors_per_machine: per_machine,
        },
        1,
    );
    let start = Timestamp::now();
    let mut plant = ServedPlant::start(&spec, 1, start).await.expect("starts");
    plant.serve_opcua(&spec).await.expect("OPC UA starts");
    let endpoint = plant.opcua().expect("serving").sites()[0].endpoint.clone();
    let offered = Arc::new(AtomicU64::new(0));
    let stepper = tokio::spawn({
        let offered = Arc::clone(&offered);
        async move {
            let wall = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let t = Timestamp(start.0 + (wall.elapsed().as_micros() as f64 * speed) as i64);
                let n = plant
                    .step_to(t)
                    .iter()
                    .filter(|r| r.property == ferrotwin_models::Property::Value)
                    .count();
                offered.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
    });
    let mut text = format!(
        "protocol = \"opcua\"\nname = \"rate\"\nendpoint = \"{endpoint}\"\ntimeout_ms = 10000\n"
    );
    let mut items = 0;
    for a in spec.assets() {
        if matches!(a.kind, AssetKind::Sensor { .. }) {
            items += 1;
            text += &format!(
                "[[tags]]\nnode_id = \"ns=2;s={0}/value\"\nasset = \"{0}\"\n",
                a.path
            );
        }
    }
    let config: ConnectionConfig = toml::from_str(&text).expect("valid config");
    let sink = Arc::new(Counter::default());
    let (events, mut rx) = tokio::sync::mpsc::channel::<ferrotwin_adapters::AdapterEvent>(
        ferrotwin_adapters::EVENT_QUEUE,
    );
    tokio::spawn(async move {
        while let Some(e) = rx.recv().await {
            if !matches!(e.kind, ferrotwin_adapters::AdapterEventKind::Written { .. }) {
                eprintln!("event: {:?}", e.kind);
            }
        }
    });
    let token = CancellationToken::new();
    let mut handle =
        ferrotwin_adapters::start(config, sink.clone(), events, token.clone()).expect("valid");
    let t0 = Instant::now();
    while handle.status().link() != LinkState::Connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if t0.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "not connected within 60 s: {:?}",
                handle.status().snapshot()
            );
            std::process::exit(1);
        }
    }
    // Until every item has sent its first value.
    while sink.0.load(Ordering::Relaxed) < items {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if t0.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "no values from every item within 60 s: {:?}",
                handle.status().snapshot()
            );
            std::process::exit(1);
        }
    }
    let setup = t0.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (got0, off0, w0) = (
        sink.0.load(Ordering::Relaxed),
        offered.load(Ordering::Relaxed),
        Instant::now(),
    );
    tokio::time::sleep(Duration::from_secs(10)).await;
    let secs = w0.elapsed().as_secs_f64();
    let got = (sink.0.load(Ordering::Relaxed) - got0) as f64 / secs;
    let off = (offered.load(Ordering::Relaxed) - off0) as f64 / secs;
    println!(
        "{items} monitored items, sim speed {speed}x: connect + first value of every item {setup:.2?}; \
         server produced {off:.0} sensor values/s, adapter received {got:.0} updates/s"
    );
    token.cancel();
    if let Some(join) = handle.take_join() {
        let _ = join.await;
    }
    stepper.abort();
}
