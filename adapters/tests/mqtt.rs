//! The MQTT adapter against the simulator's real publisher on an embedded broker: JSON and
//! Sparkplug B readings, seq gaps and rebirths, deaths, garbage, broker loss, write-back.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_adapters::{
    AdapterEvent, AdapterEventKind, AdapterHandle, ConnectionConfig, WriteAck, WriteRequest,
};
use ferrotwin_models::{
    AssetId, AssetPath, Property, QualityReason, Reading, RecordingSink, Timestamp, Value,
};
use ferrotwin_proto::sparkplug::Payload;
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::mqtt::{CommandStats, EmbeddedBroker};
use ferrotwin_sim::serve::{MqttFormat, ServeError, ServedPlant};
use ferrotwin_sim::sparkplug::Layout;
use prost::Message;
use rumqttc::{AsyncClient, MqttOptions, QoS};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

/// The simulated one-line plant publishing on MQTT at 60x, in a task.
struct Plant {
    stop: Option<oneshot::Sender<()>>,
    run: Option<JoinHandle<(ServedPlant, Result<(), ServeError>)>>,
    commands: Arc<CommandStats>,
    layout: Layout,
}

impl Plant {
    async fn start(broker: &EmbeddedBroker, format: MqttFormat, client: &str) -> Plant {
        let spec = generate(PlantSize::ONE_LINE, 1);
        let mut plant = ServedPlant::start(&spec, 5, Timestamp::now())
            .await
            .expect("plant starts");
        plant
            .connect_mqtt(&spec, "127.0.0.1", broker.addr().port(), client, format)
            .await
            .expect("publisher connects");
        let commands = plant.command_stats();
        let layout = plant
            .sparkplug_layout()
            .cloned()
            .unwrap_or_else(|| Layout::of(&spec));
        let (stop, stopped) = oneshot::channel::<()>();
        let run = tokio::spawn(async move {
            let r = plant
                .run_realtime(60.0, async {
                    let _ = stopped.await;
                })
                .await;
            (plant, r)
        });
        Plant {
            stop: Some(stop),
            run: Some(run),
            commands,
            layout,
        }
    }

    /// Stops cleanly (Sparkplug DDEATHs and NDEATH) and applies pending setpoints.
    async fn stop(&mut self) -> ServedPlant {
        let _ = self.stop.take().expect("running").send(());
        let (mut plant, r) = self.run.take().expect("running").await.expect("no panic");
        r.expect("served");
        let now = plant.sim().now();
        plant.step_to(now);
        plant
    }

    fn line(&self) -> &AssetPath {
        &self.layout.nodes[0].line
    }

    fn machine(&self, i: usize) -> &AssetPath {
        &self.layout.nodes[0].devices[i].machine
    }

    /// Ids of every sensor of the plant (from its Sparkplug names).
    fn sensors(&self) -> HashSet<AssetId> {
        self.layout.nodes[0]
            .devices
            .iter()
            .flat_map(|d| {
                d.metrics.iter().filter_map(|m| {
                    let sensor = m.name.strip_suffix("/value")?;
                    Some(d.machine.child(sensor).expect("path").id())
                })
            })
            .collect()
    }
}

struct Adapter {
    handle: AdapterHandle,
    sink: Arc<RecordingSink>,
    events: Arc<Mutex<Vec<AdapterEvent>>>,
    token: CancellationToken,
    /// Every reading taken from the sink so far.
    seen: Vec<Reading>,
}

impl Adapter {
    fn start(toml_text: &str) -> Adapter {
        let config: ConnectionConfig = toml::from_str(toml_text).expect("config parses");
        let sink = Arc::new(RecordingSink::with_limit(1_000_000));
        let (tx, mut rx) = mpsc::channel(ferrotwin_adapters::EVENT_QUEUE);
        let events = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&events);
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                log.lock().expect("events").push(e);
            }
        });
        let token = CancellationToken::new();
        let sink_dyn: Arc<dyn ferrotwin_models::IngestSink> = sink.clone();
        let handle =
            ferrotwin_adapters::start(config, sink_dyn, tx, token.clone()).expect("valid config");
        Adapter {
            handle,
            sink,
            events,
            token,
            seen: Vec::new(),
        }
    }

    /// Takes readings from the sink until `cond` holds on the new ones (those since the
    /// last call), at most `WAIT`.
    async fn readings_until(
        &mut self,
        what: &str,
        mut cond: impl FnMut(&[Reading]) -> bool,
    ) -> Vec<Reading> {
        let mut new = Vec::new();
        let done = tokio::time::timeout(WAIT, async {
            loop {
                new.extend(self.sink.take());
                if cond(&new) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        self.seen.extend_from_slice(&new);
        assert!(
            done.is_ok(),
            "{what} within {WAIT:?}; status {:?}; events {:?}",
            self.handle.status().snapshot(),
            self.events.lock().expect("events")
        );
        new
    }

    async fn until(&self, what: &str, mut cond: impl FnMut(&Adapter) -> bool) {
        let done = tokio::time::timeout(WAIT, async {
            while !cond(self) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            done.is_ok(),
            "{what} within {WAIT:?}; status {:?}; events {:?}",
            self.handle.status().snapshot(),
            self.events.lock().expect("events")
        );
    }

    fn has_event(&self, f: impl Fn(&AdapterEventKind) -> bool) -> bool {
        self.events
            .lock()
            .expect("events")
            .iter()
            .any(|e| f(&e.kind))
    }

    async fn stop(mut self) {
        self.token.cancel();
        let join = self.handle.take_join().expect("joined once");
        tokio::time::timeout(WAIT, join)
            .await
            .expect("stops")
            .expect("no panic");
    }
}

fn json_config(
    name: &str,
    port: u16,
    prefix: &str,
    writable_machine: Option<&AssetPath>,
) -> String {
    let mut text = format!(
        r#"
        protocol = "mqtt"
        name = "{name}"
        broker = "127.0.0.1:{port}"
        reconnect_min_ms = 50
        reconnect_max_ms = 200
        [format]
        type = "json"
        topic_prefixes = ["{prefix}"]
        "#
    );
    if let Some(m) = writable_machine {
        text.push_str(&format!(
            "[[format.tags]]\nasset = \"{}\"\nproperty = \"speed_setpoint_pct\"\nwritable = true\n",
            m.as_str()
        ));
    }
    text
}

fn sparkplug_config(name: &str, port: u16, plant: &Plant) -> String {
    let node = &plant.layout.nodes[0];
    let devices: Vec<String> = node.devices.iter().map(|d| format!("{:?}", d.id)).collect();
    format!(
        r#"
        protocol = "mqtt"
        name = "{name}"
        broker = "127.0.0.1:{port}"
        [format]
        type = "sparkplug"
        group_id = "{}"
        writable_metrics = ["speed_setpoint_pct"]
        [[format.nodes]]
        node = "{}"
        line = "{}"
        devices = [{}]
        "#,
        node.group,
        node.id,
        node.line.as_str(),
        devices.join(", ")
    )
}

async fn raw_client(broker: &EmbeddedBroker, id: &str) -> (AsyncClient, JoinHandle<()>) {
    let (client, mut eventloop) =
        AsyncClient::new(MqttOptions::new(id, "127.0.0.1", broker.addr().port()), 100);
    let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    (client, driver)
}

fn machine_ids(plant: &Plant) -> HashSet<AssetId> {
    plant.layout.nodes[0]
        .devices
        .iter()
        .map(|d| d.machine.id())
        .collect()
}

#[tokio::test]
async fn json_readings_of_the_simulator_reach_the_sink() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Json, "json-sim").await;
    let mut a = Adapter::start(&json_config(
        "json-in",
        broker.addr().port(),
        plant.line().as_str(),
        None,
    ));
    let sensors = plant.sensors();
    let machines = machine_ids(&plant);
    let got = a
        .readings_until("a float sensor value and a machine state", |rs| {
            rs.iter()
                .any(|r| sensors.contains(&r.asset) && matches!(r.value, Value::Float(_)))
                && rs
                    .iter()
                    .any(|r| machines.contains(&r.asset) && r.property == Property::State)
        })
        .await;
    assert!(got.iter().all(|r| r.quality.is_good()));
    assert!(
        got.iter()
            .all(|r| sensors.contains(&r.asset) || machines.contains(&r.asset))
    );
    assert!(a.has_event(|k| matches!(k, AdapterEventKind::Connected { .. })));
    assert_eq!(a.handle.status().snapshot().rejected, 0);
    a.stop().await;
    plant.stop().await;
}

#[tokio::test]
async fn sparkplug_readings_reach_the_sink_with_aliases_resolved() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Sparkplug, "sp-sim").await;
    let mut a = Adapter::start(&sparkplug_config("sp-in", broker.addr().port(), &plant));
    let sensors = plant.sensors();
    let machines = machine_ids(&plant);
    // Data arrives by alias only: values of sensors mean the aliases resolved.
    let got = a
        .readings_until("every sensor reported", |rs| {
            let seen: HashSet<AssetId> = rs.iter().map(|r| r.asset).collect();
            sensors.iter().all(|s| seen.contains(s))
        })
        .await;
    assert!(
        got.iter()
            .all(|r| sensors.contains(&r.asset) || machines.contains(&r.asset))
    );
    assert!(
        got.iter()
            .any(|r| machines.contains(&r.asset) && matches!(r.value, Value::Int(_)))
    );
    let s = a.handle.status().snapshot();
    // Data that came before the requested births is refused (counted in `rejected`); nothing
    // is unmapped or malformed.
    assert!(
        !a.has_event(|k| matches!(
            k,
            AdapterEventKind::Unmapped { .. } | AdapterEventKind::TagFailed { .. }
        )),
        "{:?}",
        a.events.lock().expect("events")
    );
    assert!(s.received as usize >= got.len());
    // The adapter asked for the births it had missed.
    assert!(CommandStats::get(&plant.commands.applied) >= 1);
    a.stop().await;
    plant.stop().await;
}

#[tokio::test]
async fn seq_gap_requests_a_rebirth_and_the_adapter_recovers() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Sparkplug, "gap-sim").await;
    let mut a = Adapter::start(&sparkplug_config("gap-in", broker.addr().port(), &plant));
    a.readings_until("first readings", |rs| !rs.is_empty())
        .await;
    let rebirths_before = CommandStats::get(&plant.commands.applied);
    let node = &plant.layout.nodes[0];
    let (client, driver) = raw_client(&broker, "gap-maker").await;
    let stray = Payload {
        seq: Some(77),
        metrics: vec![],
        ..Default::default()
    };
    let topic =
        ferrotwin_sim::sparkplug::topic(&node.group, "DDATA", &node.id, Some(&node.devices[0].id));
    // Twice: one of them is out of sequence whatever the node's seq is.
    for _ in 0..2 {
        client
            .publish(
                topic.clone(),
                QoS::AtLeastOnce,
                false,
                stray.encode_to_vec(),
            )
            .await
            .expect("queued");
    }
    a.until("a seq gap counted", |a| {
        a.handle.status().snapshot().errors >= 1
    })
    .await;
    let stats = Arc::clone(&plant.commands);
    a.until("the node reborn on request", |_| {
        CommandStats::get(&stats.applied) > rebirths_before
    })
    .await;
    a.sink.take();
    a.readings_until("readings again after the rebirth", |rs| rs.len() >= 10)
        .await;
    driver.abort();
    a.stop().await;
    plant.stop().await;
}

#[tokio::test]
async fn ndeath_turns_the_node_twins_bad_with_their_last_values() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Sparkplug, "death-sim").await;
    let mut a = Adapter::start(&sparkplug_config("death-in", broker.addr().port(), &plant));
    let machines = machine_ids(&plant);
    a.readings_until("every machine's state", |rs| {
        let seen: HashSet<AssetId> = rs
            .iter()
            .filter(|r| r.property == Property::State)
            .map(|r| r.asset)
            .collect();
        machines.iter().all(|m| seen.contains(m))
    })
    .await;
    plant.stop().await;
    let bad = a
        .readings_until("Bad readings for every machine", |rs| {
            let bad: HashSet<AssetId> = rs
                .iter()
                .filter(|r| r.quality.reason == QualityReason::CommFailure)
                .map(|r| r.asset)
                .collect();
            machines.iter().all(|m| bad.contains(m))
        })
        .await;
    for r in bad
        .iter()
        .filter(|r| r.quality.reason == QualityReason::CommFailure)
    {
        let last_good = a
            .seen
            .iter()
            .rev()
            .find(|x| x.asset == r.asset && x.property == r.property && x.quality.is_good())
            .expect("had a value");
        assert_eq!(r.value, last_good.value, "the last value stays");
    }
    a.stop().await;
}

#[tokio::test]
async fn garbage_payloads_are_counted_and_the_adapter_keeps_going() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Both, "garbage-sim").await;
    let port = broker.addr().port();
    let mut json = Adapter::start(&json_config(
        "garbage-json",
        port,
        plant.line().as_str(),
        None,
    ));
    let mut sp = Adapter::start(&sparkplug_config("garbage-sp", port, &plant));
    json.readings_until("json readings", |rs| !rs.is_empty())
        .await;
    sp.readings_until("sparkplug readings", |rs| !rs.is_empty())
        .await;
    let (client, driver) = raw_client(&broker, "vandal").await;
    let sensor_topic = plant
        .sensors()
        .into_iter()
        .next()
        .map(|_| {
            let d = &plant.layout.nodes[0].devices[0];
            let s = d
                .metrics
                .iter()
                .find_map(|m| m.name.strip_suffix("/value"))
                .expect("sensor");
            format!("{}/{s}", d.machine.as_str())
        })
        .expect("a sensor");
    let node = &plant.layout.nodes[0];
    for (topic, payload) in [
        (sensor_topic.clone(), b"{not json".to_vec()),
        (sensor_topic.clone(), br#"{"value": "hot"}"#.to_vec()),
        (
            format!("{}/nonsense/deep/topic", plant.line().as_str()),
            br#"{"value": 1}"#.to_vec(),
        ),
        (
            ferrotwin_sim::sparkplug::topic(&node.group, "NBIRTH", "stranger-node", None),
            b"\x01\x02".to_vec(),
        ),
    ] {
        client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .expect("queued");
    }
    json.until("garbage counted and evented", |a| {
        a.handle.status().snapshot().rejected >= 3
            && a.has_event(|k| matches!(k, AdapterEventKind::TagFailed { .. }))
            && a.has_event(|k| matches!(k, AdapterEventKind::Unmapped { .. }))
    })
    .await;
    sp.until("the stranger node refused", |a| {
        a.handle.status().snapshot().rejected >= 1
            && a.has_event(|k| matches!(k, AdapterEventKind::Unmapped { source, .. } if source == "stranger-node"))
    })
    .await;
    json.sink.take();
    json.readings_until("json readings go on", |rs| rs.len() >= 5)
        .await;
    sp.sink.take();
    sp.readings_until("sparkplug readings go on", |rs| rs.len() >= 5)
        .await;
    // The simulator publishes the sensor again: the tag recovers.
    json.until("the tag recovered", |a| {
        a.has_event(|k| matches!(k, AdapterEventKind::TagRecovered { tag } if *tag == sensor_topic))
    })
    .await;
    driver.abort();
    json.stop().await;
    sp.stop().await;
    plant.stop().await;
}

#[tokio::test]
async fn writes_via_dcmd_and_json_change_the_simulated_machine_speed() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Both, "write-sim").await;
    let port = broker.addr().port();
    let press = plant.machine(0).clone();
    let conveyor = plant.machine(1).clone();
    let mut sp = Adapter::start(&sparkplug_config("write-sp", port, &plant));
    let mut json = Adapter::start(&json_config(
        "write-json",
        port,
        plant.line().as_str(),
        Some(&conveyor),
    ));
    // Sparkplug writes need the birth's alias and datatype; JSON needs the connection.
    sp.readings_until("sparkplug births", |rs| !rs.is_empty())
        .await;
    json.readings_until("json connected", |rs| !rs.is_empty())
        .await;
    let write = |asset: &AssetPath, pct: i64| WriteRequest {
        asset: asset.clone(),
        property: "speed_setpoint_pct".into(),
        value: Value::Int(pct),
        by: "test".into(),
    };
    let stats = Arc::clone(&plant.commands);
    let before = CommandStats::get(&stats.applied);
    // The simulated edge node reports the setpoint back: confirmed. The JSON command has
    // no read-back topic: the broker's PUBACK is all there is.
    assert_eq!(
        sp.handle.write(write(&press, 150)).await,
        Ok(WriteAck::Confirmed)
    );
    assert_eq!(
        json.handle.write(write(&conveyor, 40)).await,
        Ok(WriteAck::Unconfirmed)
    );
    // Out of the tag's range (UInt16) before anything is sent.
    let err = sp
        .handle
        .write(write(&press, 70_000))
        .await
        .expect_err("refused");
    assert!(
        matches!(err, ferrotwin_adapters::WriteError::BadValue { .. }),
        "{err}"
    );
    // Not a writable tag of that connection.
    assert!(json.handle.write(write(&press, 10)).await.is_err());
    sp.until("both commands applied by the simulator", |_| {
        CommandStats::get(&stats.applied) >= before + 2
    })
    .await;
    assert!(sp.has_event(|k| matches!(
        k,
        AdapterEventKind::Written {
            outcome: Ok(WriteAck::Confirmed),
            ..
        }
    )));
    assert_eq!(sp.handle.status().snapshot().writes_ok, 1);
    assert_eq!(sp.handle.status().snapshot().writes_failed, 1);
    let served = plant.stop().await;
    assert_eq!(served.sim().speed_pct(press.id()), Some(150));
    assert_eq!(served.sim().speed_pct(conveyor.id()), Some(40));
    sp.stop().await;
    json.stop().await;
}

/// A TCP forwarder to the broker that the test can cut and restore on the same port.
struct Cable {
    port: u16,
    tasks: tokio::task::JoinSet<()>,
}

impl Cable {
    async fn plug(port: u16, broker: std::net::SocketAddr) -> Cable {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("binds");
        let port = listener.local_addr().expect("addr").port();
        let mut tasks = tokio::task::JoinSet::new();
        let conns = Arc::new(Mutex::new(tokio::task::JoinSet::new()));
        let held = Arc::clone(&conns);
        tasks.spawn(async move {
            let _held = held;
            while let Ok((mut inbound, _)) = listener.accept().await {
                conns.lock().expect("conns").spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(broker).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Cable { port, tasks }
    }

    /// Drops the listener and every connection through it.
    async fn cut(mut self) -> u16 {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.port
    }
}

#[tokio::test]
async fn broker_loss_turns_readings_bad_then_the_adapter_reconnects() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Json, "loss-sim").await;
    let cable = Cable::plug(0, broker.addr()).await;
    let mut a = Adapter::start(&json_config(
        "loss-in",
        cable.port,
        plant.line().as_str(),
        None,
    ));
    a.readings_until("readings", |rs| rs.len() >= 10).await;
    let port = cable.cut().await;
    let bad = a
        .readings_until("Bad readings", |rs| {
            rs.iter()
                .any(|r| r.quality.reason == QualityReason::CommFailure)
        })
        .await;
    assert!(
        bad.iter()
            .filter(|r| !r.quality.is_good())
            .all(|r| r.quality.reason == QualityReason::CommFailure)
    );
    a.until("Disconnected", |a| {
        a.has_event(|k| matches!(k, AdapterEventKind::Disconnected { .. }))
    })
    .await;
    let _cable = Cable::plug(port, broker.addr()).await;
    let back = std::time::Instant::now();
    a.until("connected again", |a| {
        a.handle.status().snapshot().connects >= 2
    })
    .await;
    a.sink.take();
    a.readings_until("good readings again", |rs| {
        rs.iter().filter(|r| r.quality.is_good()).count() >= 5
    })
    .await;
    eprintln!(
        "MQTT JSON: good readings {:?} after the broker was back",
        back.elapsed()
    );
    a.stop().await;
    plant.stop().await;
}

/// `config` speaking MQTT 5 to the broker's v5 listener.
fn over_mqtt5(config: &str, broker: &EmbeddedBroker) -> String {
    config
        .replace(
            &format!("127.0.0.1:{}", broker.addr().port()),
            &format!("127.0.0.1:{}", broker.addr_v5().port()),
        )
        .replace("broker =", "protocol_version = \"5\"\n        broker =")
}

#[tokio::test]
async fn mqtt5_adapters_read_json_and_sparkplug_and_write_a_dcmd() {
    let broker = EmbeddedBroker::start().expect("broker");
    let mut plant = Plant::start(&broker, MqttFormat::Both, "v5-sim").await;
    let port = broker.addr().port();
    let press = plant.machine(0).clone();
    let mut json = Adapter::start(&over_mqtt5(
        &json_config("v5-json", port, plant.line().as_str(), None),
        &broker,
    ));
    let mut sp = Adapter::start(&over_mqtt5(
        &sparkplug_config("v5-sp", port, &plant),
        &broker,
    ));
    let sensors = plant.sensors();
    json.readings_until("json sensor values over MQTT 5", |rs| {
        rs.iter().any(|r| sensors.contains(&r.asset))
    })
    .await;
    sp.readings_until("sparkplug sensor values over MQTT 5", |rs| {
        rs.iter().any(|r| sensors.contains(&r.asset))
    })
    .await;
    let stats = Arc::clone(&plant.commands);
    let before = CommandStats::get(&stats.applied);
    sp.handle
        .write(WriteRequest {
            asset: press.clone(),
            property: "speed_setpoint_pct".into(),
            value: Value::Int(175),
            by: "test".into(),
        })
        .await
        .expect("DCMD acked over MQTT 5");
    sp.until("the command applied", |_| {
        CommandStats::get(&stats.applied) > before
    })
    .await;
    let served = plant.stop().await;
    assert_eq!(served.sim().speed_pct(press.id()), Some(175));
    json.stop().await;
    sp.stop().await;
}

/// A sink that pushes back until opened.
struct Gate {
    open: std::sync::atomic::AtomicBool,
    inner: RecordingSink,
}

impl ferrotwin_models::IngestSink for Gate {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), ferrotwin_models::PushBack> {
        if !self.open.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(ferrotwin_models::PushBack {
                batch,
                why: ferrotwin_models::PushBackReason::Busy,
            });
        }
        self.inner.try_push(batch)
    }
}

#[tokio::test]
async fn a_sink_pushing_back_holds_the_adapter_and_loses_nothing() {
    const N: usize = 5_000;
    let broker = EmbeddedBroker::start().expect("broker");
    let prefix = "acme/berlin/assembly/line-1";
    let config: ConnectionConfig =
        toml::from_str(&json_config("gate-in", broker.addr().port(), prefix, None))
            .expect("config");
    let gate = Arc::new(Gate {
        open: std::sync::atomic::AtomicBool::new(true),
        inner: RecordingSink::with_limit(usize::MAX),
    });
    let (tx, mut rx) = mpsc::channel::<AdapterEvent>(ferrotwin_adapters::EVENT_QUEUE);
    tokio::spawn(async move { while rx.recv().await.is_some() {} });
    let token = CancellationToken::new();
    let sink: Arc<dyn ferrotwin_models::IngestSink> = gate.clone();
    let mut handle = ferrotwin_adapters::start(config, sink, tx, token.clone()).expect("valid");
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("flood", "127.0.0.1", broker.addr().port()),
        100,
    );
    let acks = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&acks);
    let driver = tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            if let rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)) = ev {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let topic = format!("{prefix}/press-1/oil-temp");
    let publish = |value: String| {
        let client = client.clone();
        let topic = topic.clone();
        async move {
            client
                .publish(
                    topic,
                    QoS::AtLeastOnce,
                    false,
                    format!("{{\"value\": {value}}}").into_bytes(),
                )
                .await
                .expect("queued");
        }
    };
    // Probe until a value gets through: the adapter's subscription is in place.
    tokio::time::timeout(WAIT, async {
        loop {
            publish("-1.5".into()).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
            if !gate.inner.take().is_empty() {
                return;
            }
        }
    })
    .await
    .expect("the adapter subscribed");
    gate.open.store(false, std::sync::atomic::Ordering::Relaxed);
    let probes = acks.load(std::sync::atomic::Ordering::Relaxed);
    let received_before = handle.status().snapshot().received;
    for i in 0..N {
        publish(format!("{i}.5")).await;
    }
    tokio::time::timeout(WAIT, async {
        while acks.load(std::sync::atomic::Ordering::Relaxed) < probes + N {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the broker took every publish");
    // At most the probes still on their way passed the gate before it shut.
    assert!(handle.status().snapshot().received <= received_before + probes as u64);
    gate.open.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut values = HashSet::new();
    tokio::time::timeout(WAIT, async {
        while values.len() < N {
            for r in gate.inner.take() {
                if let Value::Float(v) = r.value
                    && v >= 0.0
                {
                    values.insert(v as usize);
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("all {N} values after opening, got {}", values.len()));
    driver.abort();
    token.cancel();
    if let Some(join) = handle.take_join() {
        let _ = join.await;
    }
}

/// A device that is its own: a raw client that applies every command to one value and
/// reports it on its own topic. JSON: `{"value": X}` on `dev/oven/sp`, commands on
/// `dev/oven/sp/cmd`. Sparkplug: node `N` of group `G` with the node metric `Oven/SP`
/// (Double), answering NCMDs with NDATA and a rebirth request with its NBIRTH.
async fn own_device(broker: &EmbeddedBroker) -> JoinHandle<()> {
    use ferrotwin_proto::sparkplug::payload::{Metric, metric};
    let (client, mut eventloop) = AsyncClient::new(
        MqttOptions::new("own-device", "127.0.0.1", broker.addr().port()),
        100,
    );
    client
        .subscribe("dev/oven/sp/cmd", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    client
        .subscribe("spBv1.0/G/NCMD/N", QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    let double = |name: &str, v: f64| Metric {
        name: Some(name.into()),
        datatype: Some(10), // Double
        value: Some(metric::Value::DoubleValue(v)),
        ..Default::default()
    };
    tokio::spawn(async move {
        let mut value = 180.0;
        let mut seq = 0u64;
        loop {
            let p = match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => p,
                Ok(_) => continue,
                Err(_) => return,
            };
            let (topic, body) = if p.topic == "dev/oven/sp/cmd" {
                let json: serde_json::Value = serde_json::from_slice(&p.payload).expect("json");
                let asked = json["value"].as_f64().expect("a number");
                if asked == 999.0 {
                    // The device cannot: it says it has no valid value.
                    let body = br#"{"value": null, "quality": "bad"}"#.to_vec();
                    let _ = client
                        .publish("dev/oven/sp", QoS::AtLeastOnce, false, body)
                        .await;
                    continue;
                }
                value = asked;
                (
                    "dev/oven/sp",
                    format!(r#"{{"value": {value}}}"#).into_bytes(),
                )
            } else {
                let cmd = Payload::decode(&p.payload[..]).expect("a payload");
                let rebirth = cmd
                    .metrics
                    .iter()
                    .any(|m| m.name.as_deref() == Some("Node Control/Rebirth"));
                if rebirth {
                    seq = 0;
                } else {
                    for m in &cmd.metrics {
                        if let Some(metric::Value::DoubleValue(v)) = m.value {
                            value = v;
                        }
                    }
                    seq = (seq + 1) % 256;
                }
                let mut metrics = vec![double("Oven/SP", value)];
                if rebirth {
                    metrics.push(Metric {
                        name: Some("bdSeq".into()),
                        datatype: Some(8), // Int64
                        value: Some(metric::Value::LongValue(0)),
                        ..Default::default()
                    });
                }
                let out = Payload {
                    seq: Some(seq),
                    metrics,
                    ..Default::default()
                };
                let topic = if rebirth {
                    "spBv1.0/G/NBIRTH/N"
                } else {
                    "spBv1.0/G/NDATA/N"
                };
                (topic, out.encode_to_vec())
            };
            let _ = client.publish(topic, QoS::AtLeastOnce, false, body).await;
        }
    })
}

/// A sensor's value mapped as a writable tag (not a setpoint): the write goes to the
/// device's command topic (JSON) or as an NCMD of the metric (Sparkplug), and the value the
/// device then reports on its own topic is both the twin's reading and the write's
/// confirmation.
#[tokio::test]
async fn a_writable_sensor_value_is_written_and_confirmed_by_its_own_reports() {
    let broker = EmbeddedBroker::start().expect("broker");
    let device = own_device(&broker).await;
    let port = broker.addr().port();
    let sensor = AssetPath::parse("acme/b/a/l/oven/zone-sp").expect("path");
    let mut json = Adapter::start(&format!(
        r#"
        protocol = "mqtt"
        name = "own-json"
        broker = "127.0.0.1:{port}"
        readback_timeout_ms = 1000
        [format]
        type = "json"
        [[format.tags]]
        topic = "dev/oven/sp"
        command_topic = "dev/oven/sp/cmd"
        asset = "{sensor}"
        property = "value"
        writable = true
        "#
    ));
    let mut sp = Adapter::start(&format!(
        r#"
        protocol = "mqtt"
        name = "own-sp"
        broker = "127.0.0.1:{port}"
        readback_timeout_ms = 3000
        [format]
        type = "sparkplug"
        group_id = "G"
        [[format.metrics]]
        node = "N"
        metric = "Oven/SP"
        asset = "{sensor}"
        writable = true
        "#
    ));
    // The Sparkplug adapter asks for a rebirth on connecting: the birth brings the value.
    sp.readings_until("the node's birth", |rs| {
        rs.iter().any(|r| r.value == Value::Float(180.0))
    })
    .await;
    let write = |v: f64| WriteRequest {
        asset: sensor.clone(),
        property: "value".into(),
        value: Value::Float(v),
        by: "test".into(),
    };
    // JSON: connected once the adapter subscribed (its status says so).
    json.until("json connected", |a| {
        a.handle.status().snapshot().link == ferrotwin_adapters::LinkState::Connected
    })
    .await;
    assert_eq!(
        json.handle.write(write(200.0)).await,
        Ok(WriteAck::Confirmed)
    );
    // A report without a valid value answers nothing, even with the written value as the
    // last one: after the read-back time, unconfirmed.
    assert_eq!(
        json.handle.write(write(999.0)).await,
        Ok(WriteAck::Unconfirmed)
    );
    let st = json.handle.status().snapshot();
    assert_eq!(
        (st.writes_ok, st.writes_unconfirmed, st.writes_failed),
        (1, 1, 0),
        "counted by what the device did"
    );
    json.readings_until("the reported value as a reading", |rs| {
        rs.iter()
            .any(|r| r.asset == sensor.id() && r.value.as_f64() == 200.0)
    })
    .await;
    assert_eq!(sp.handle.write(write(210.0)).await, Ok(WriteAck::Confirmed));
    sp.readings_until("the NDATA as a reading", |rs| {
        rs.iter()
            .any(|r| r.asset == sensor.id() && r.value.as_f64() == 210.0)
    })
    .await;
    // An integer is written as the metric's Double.
    assert_eq!(
        sp.handle
            .write(WriteRequest {
                value: Value::Int(205),
                ..write(0.0)
            })
            .await,
        Ok(WriteAck::Confirmed)
    );
    device.abort();
    json.stop().await;
    sp.stop().await;
}
