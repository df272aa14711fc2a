//! One-off measurement: MQTT messages per second one adapter ingests. A publisher floods an
//! embedded broker with JSON readings (QoS 1) on topics under one prefix; the adapter pushes
//! into a counting sink. Run: `cargo run --release -p ferrotwin-adapters --example
//! mqtt_ingest_rate [MESSAGES] [json|sparkplug]`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_models::{IngestSink, PushBack, Reading};
use ferrotwin_proto::sparkplug::Payload;
use ferrotwin_proto::sparkplug::payload::{Metric, metric};
use prost::Message;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio_util::sync::CancellationToken;

#[derive(Default)]
struct Counting(AtomicU64);

impl IngestSink for Counting {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        self.0.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let sparkplug = args.get(2).is_some_and(|s| s == "sparkplug");
    let broker = ferrotwin_sim::mqtt::EmbeddedBroker::start().expect("broker");
    let port = broker.addr().port();
    let line = "acme/berlin/assembly/line-1";
    let config = if sparkplug {
        format!(
            "protocol = \"mqtt\"\nname = \"rate\"\nbroker = \"127.0.0.1:{port}\"\n[format]\n\
             type = \"sparkplug\"\ngroup_id = \"acme-berlin\"\n[[format.nodes]]\n\
             node = \"assembly-line-1\"\nline = \"{line}\"\n"
        )
    } else {
        format!(
            "protocol = \"mqtt\"\nname = \"rate\"\nbroker = \"127.0.0.1:{port}\"\n[format]\n\
             type = \"json\"\ntopic_prefixes = [\"{line}\"]\n"
        )
    };
    let config: ConnectionConfig = toml::from_str(&config).expect("config");
    let sink = Arc::new(Counting::default());
    let (events, mut rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let token = CancellationToken::new();
    let mut handle =
        ferrotwin_adapters::start(config, sink.clone(), events, token.clone()).expect("valid");
    while handle.status().snapshot().connects == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // SUBACK

    let mut options = MqttOptions::new("flood", "127.0.0.1", port);
    options.set_inflight(100);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let node_topic = |k: &str, d: Option<&str>| match d {
        Some(d) => format!("spBv1.0/acme-berlin/{k}/assembly-line-1/{d}"),
        None => format!("spBv1.0/acme-berlin/{k}/assembly-line-1"),
    };
    let ts = 1_795_000_000_000_000i64;
    let mut seq = 0u64;
    if sparkplug {
        // The adapter asks for a rebirth on connect; we give births ourselves.
        let p = |seq, metrics| {
            Payload {
                seq: Some(seq),
                timestamp: Some(1),
                metrics,
                ..Default::default()
            }
            .encode_to_vec()
        };
        client
            .publish(
                node_topic("NBIRTH", None),
                QoS::AtLeastOnce,
                false,
                p(0, vec![]),
            )
            .await
            .expect("q");
        let metrics = (0..10)
            .map(|i| Metric {
                name: Some(format!("s{i}/value")),
                alias: Some(i),
                datatype: Some(10),
                value: Some(metric::Value::DoubleValue(1.0)),
                ..Default::default()
            })
            .collect();
        client
            .publish(
                node_topic("DBIRTH", Some("press-1")),
                QoS::AtLeastOnce,
                false,
                p(1, metrics),
            )
            .await
            .expect("q");
        seq = 2;
    }
    let base = sink.0.load(Ordering::Relaxed);
    let start = Instant::now();
    for i in 0..n {
        if sparkplug {
            let p = Payload {
                seq: Some(seq % 256),
                timestamp: Some(1),
                metrics: vec![Metric {
                    alias: Some(i % 10),
                    timestamp: Some((ts / 1000) as u64 + i),
                    value: Some(metric::Value::DoubleValue(i as f64)),
                    ..Default::default()
                }],
                ..Default::default()
            };
            seq += 1;
            client
                .publish(
                    node_topic("DDATA", Some("press-1")),
                    QoS::AtLeastOnce,
                    false,
                    p.encode_to_vec(),
                )
                .await
                .expect("queued");
        } else {
            let topic = format!("{line}/press-1/s{}", i % 10);
            let payload = format!(
                "{{\"value\":{}.5,\"ts_us\":{},\"quality\":\"good\"}}",
                i,
                ts + i as i64
            );
            client
                .publish(topic, QoS::AtLeastOnce, false, payload.into_bytes())
                .await
                .expect("queued");
        }
    }
    let published = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while sink.0.load(Ordering::Relaxed) - base < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = start.elapsed();
    let got = sink.0.load(Ordering::Relaxed) - base;
    let s = handle.status().snapshot();
    println!(
        "{}: {got}/{n} readings in {:.2} s = {:.0} msg/s (publisher done after {:.2} s); status {s:?}",
        if sparkplug { "sparkplug" } else { "json" },
        took.as_secs_f64(),
        got as f64 / took.as_secs_f64(),
        published.as_secs_f64()
    );
    token.cancel();
    if let Some(join) = handle.take_join() {
        let _ = join.await;
    }
    std::process::exit(0);
}
