//! `ferrotwin bench plc`: the latency from a value changing in a simulated PLC to a gRPC
//! `Watch` subscriber of its twin, over a real protocol and adapter, and the values/s the
//! adapters delivered. The plant is stepped by the benchmark, so the wall time at which each
//! value appeared in the PLC is known exactly. A benchmark: it prints, it never fails.

use ferrotwin_models::Timestamp;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::mqtt::EmbeddedBroker;
use ferrotwin_sim::serve::{MqttFormat, ServedPlant};
use tokio::net::TcpListener;

use super::percentile;
use crate::demo::Via;
use crate::feeds;
use ferrotwin_runtime::{Runtime, RuntimeOptions};

pub struct PlcBench {
    pub via: Via,
    pub seconds: u64,
    /// Modbus poll interval.
    pub poll_ms: u64,
    pub lines: u32,
}

pub async fn plc(b: PlcBench) -> Result<String> {
    let spec = generate(
        PlantSize {
            sites: 1,
            areas: 1,
            lines: b.lines.max(1),
            machines: 5,
            sensors_per_machine: 0,
        },
        1,
    );
    let mut plant = ServedPlant::start(&spec, 3, Timestamp::now()).await?;
    let mut opts = RuntimeOptions::default();
    let _broker;
    opts.connections = match b.via {
        Via::Modbus => feeds::modbus_connections(&spec, &plant, b.poll_ms, |_| true)?,
        Via::Mqtt => {
            let broker = EmbeddedBroker::start().context("broker")?;
            let addr = broker.addr();
            _broker = broker;
            plant
                .connect_mqtt(
                    &spec,
                    "127.0.0.1",
                    addr.port(),
                    "bench",
                    MqttFormat::Sparkplug,
                )
                .await?;
            feeds::sparkplug_connections(&plant, addr, |_| true)?
        }
        Via::Opcua => {
            plant.serve_opcua(&spec).await?;
            feeds::opcua_connections(&spec, &plant, |_| true)?
        }
        Via::InProcess | Via::All => {
            anyhow::bail!("bench plc measures one protocol: --via modbus, opcua or mqtt")
        }
    };
    let dir = tempfile::tempdir()?;
    let rt = Runtime::start(&spec, dir.path(), opts).await?;
    let l = TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    rt.serve_grpc(l).expect("serve");
    // value bits per sensor → wall time the PLC first held it.
    let appeared: Arc<Mutex<HashMap<(String, u64), i64>>> = Arc::default();
    let paths: HashMap<ferrotwin_models::AssetId, String> = spec
        .assets()
        .iter()
        .filter(|a| a.kind.level() == ferrotwin_models::Level::Sensor)
        .map(|a| (a.path.id(), a.path.to_string()))
        .collect();
    let mut client = TwinServiceClient::connect(format!("http://{addr}")).await?;
    let mut stream = client
        .watch(pb::WatchRequest {
            path: String::new(),
            events: false,
            skip_snapshot: true,
        })
        .await?
        .into_inner();
    let samples: Arc<Mutex<Vec<f64>>> = Arc::default();
    let watcher = {
        let (appeared, samples) = (appeared.clone(), samples.clone());
        tokio::spawn(async move {
            // A change of value, not a repeat: Modbus delivers every value at every poll.
            let mut last: HashMap<String, u64> = HashMap::new();
            while let Ok(Some(m)) = stream.message().await {
                let at = Timestamp::now().0;
                let Some(pb::watch_response::Item::Change(t)) = m.item else {
                    continue;
                };
                let Some(v) = t.sensor.as_ref().and_then(|s| s.value.as_ref()) else {
                    continue;
                };
                // Floats only: ints and bools repeat, and a repeat cannot be told apart.
                let Some(pb::value::Kind::Float(x)) = v.kind else {
                    continue;
                };
                if last.insert(t.path.clone(), x.to_bits()) == Some(x.to_bits()) {
                    continue;
                }
                // Modbus carries an f32.
                let seen = appeared.lock().expect("not poisoned");
                let when = seen
                    .get(&(t.path.clone(), x.to_bits()))
                    .or_else(|| seen.get(&(t.path.clone(), f64::from(x as f32).to_bits())));
                if let Some(w) = when {
                    samples
                        .lock()
                        .expect("not poisoned")
                        .push((at - w) as f64 / 1000.0);
                }
            }
        })
    };
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut served = 0u64;
    let mut previous: HashMap<ferrotwin_models::AssetId, u64> = HashMap::new();
    while started.elapsed() < Duration::from_secs(b.seconds) {
        tick.tick().await;
        let step = plant.tick(Timestamp::now()).await?.to_vec();
        let at = Timestamp::now().0;
        let mut a = appeared.lock().expect("not poisoned");
        for r in step {
            let ferrotwin_models::Value::Float(x) = r.value else {
                continue;
            };
            if let Some(p) = paths.get(&r.asset) {
                if previous.insert(r.asset, x.to_bits()) == Some(x.to_bits()) {
                    continue;
                }
                served += 1;
                a.insert((p.clone(), x.to_bits()), at);
                a.insert((p.clone(), f64::from(x as f32).to_bits()), at);
            }
        }
        // Bounded: forget values older than a few seconds.
        if a.len() > 2_000_000 {
            a.clear();
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let received: u64 = rt
        .api()
        .connection_list(&ferrotwin_runtime::security::Caller::open(None))
        .expect("the open caller may list")
        .connections
        .iter()
        .map(|c| c.received)
        .sum();
    watcher.abort();
    let mut lat = samples.lock().expect("not poisoned").clone();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench plc via {:?}: {} sensors on {} lines, {secs:.0} s{}",
        b.via,
        paths.len(),
        b.lines,
        if b.via == Via::Modbus {
            format!(", poll every {} ms", b.poll_ms)
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "  simulator changed {:.0} float values/s; adapters delivered {:.0} values/s (all kinds, repeats included)",
        served as f64 / secs,
        received as f64 / secs
    );
    let _ = writeln!(
        out,
        "  PLC value change → gRPC Watch subscriber ({} samples): p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms",
        lat.len(),
        percentile(&mut lat, 0.5),
        percentile(&mut lat, 0.9),
        percentile(&mut lat, 0.99)
    );
    rt.shutdown().await;
    Ok(out)
}
