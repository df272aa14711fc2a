//! Real PLCs into real twins: the simulator's Modbus TCP servers and MQTT publishers (JSON
//! and Sparkplug B, on an embedded broker) → the adapters wired from the runtime's
//! connection config → twins → gRPC; link loss; write-back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_cli::feeds;
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetId, AssetPath, Timestamp};
use ferrotwin_proto::v1 as pb;
use ferrotwin_sim::generate::generate;
use ferrotwin_sim::mapping::Mapping;
use ferrotwin_sim::mqtt::EmbeddedBroker;
use ferrotwin_sim::serve::{MqttFormat, ServedPlant};
use tokio::task::JoinHandle;

use crate::common::*;

/// How the plant reaches the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Feed {
    Modbus,
    OpcUa,
    Json,
    Sparkplug,
}

struct Rig {
    plant: Arc<tokio::sync::Mutex<ServedPlant>>,
    /// Every value the simulator served, per sensor, as the f32 its register holds.
    served: Arc<Mutex<HashMap<AssetId, HashSet<u64>>>>,
    stepper: JoinHandle<()>,
    site: Site,
    mapping: Mapping,
    spec: PlantSpec,
    /// The embedded broker's port (MQTT feeds).
    broker_port: Option<u16>,
    _dir: tempfile::TempDir,
}

async fn rig(feed: Feed) -> Rig {
    rig_with(feed, |_| {}, |_, _| {}).await
}

/// A rig whose plant spec `plant` changes before the PLCs start, and whose connections
/// `connect` changes before the runtime starts.
async fn rig_with(
    feed: Feed,
    plant: impl FnOnce(&mut PlantSpec),
    connect: impl FnOnce(&PlantSpec, &mut Vec<ConnectionConfig>),
) -> Rig {
    let mut spec: PlantSpec = generate(TWO_LINES, 3);
    plant(&mut spec);
    let mut plant = ServedPlant::start(&spec, 5, Timestamp::now())
        .await
        .expect("PLCs start");
    let mapping = Mapping::of(&spec).expect("fits");
    let mut opts = options();
    let mut broker_port = None;
    opts.connections = match feed {
        Feed::Modbus => {
            let mut c = feeds::modbus_connections(&spec, &plant, 50, |_| true).expect("configs");
            for c in &mut c {
                if let ConnectionConfig::Modbus(m) = c {
                    m.timeout_ms = 500;
                }
            }
            c
        }
        Feed::OpcUa => {
            plant
                .serve_opcua(&spec)
                .await
                .expect("OPC UA servers start");
            feeds::opcua_connections(&spec, &plant, |_| true).expect("configs")
        }
        Feed::Json | Feed::Sparkplug => {
            // rumqttd has no shutdown: the broker's threads end with the test process.
            let broker = EmbeddedBroker::start().expect("broker");
            broker_port = Some(broker.addr().port());
            let format = if feed == Feed::Json {
                MqttFormat::Json
            } else {
                MqttFormat::Sparkplug
            };
            plant
                .connect_mqtt(&spec, "127.0.0.1", broker.addr().port(), "sim", format)
                .await
                .expect("publisher connects");
            if feed == Feed::Json {
                vec![
                    feeds::json_connection("plant-json", &spec, broker.addr(), |_| true)
                        .expect("config"),
                ]
            } else {
                feeds::sparkplug_connections(&plant, broker.addr(), |_| true).expect("configs")
            }
        }
    };
    connect(&spec, &mut opts.connections);
    let served: Arc<Mutex<HashMap<AssetId, HashSet<u64>>>> = Arc::default();
    record(&served, plant.last_step());
    let plant = Arc::new(tokio::sync::Mutex::new(plant));
    let stepper = {
        let (plant, served) = (plant.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                {
                    let mut p = plant.lock().await;
                    let step = p.tick(Timestamp::now()).await.expect("the plant steps");
                    record(&served, step);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let dir = tempfile::tempdir().expect("dir");
    let site = start_plant_in(&spec, dir.path(), opts).await;
    Rig {
        plant,
        served,
        stepper,
        site,
        mapping,
        spec,
        broker_port,
        _dir: dir,
    }
}

fn record(served: &Mutex<HashMap<AssetId, HashSet<u64>>>, readings: &[ferrotwin_models::Reading]) {
    let mut s = served.lock().expect("not poisoned");
    for r in readings {
        // Modbus serves an f32, MQTT the f64 itself.
        let v = r.value.as_f64();
        let e = s.entry(r.asset).or_default();
        e.insert(v.to_bits());
        e.insert(f64::from(v as f32).to_bits());
    }
}

impl Rig {
    /// The first sensor (value tag) of line `i`.
    fn sensor(&self, i: usize) -> String {
        self.mapping.lines[i]
            .tags
            .iter()
            .find(|t| t.property == "value")
            .expect("a sensor")
            .asset
            .clone()
    }

    /// The first machine of line `i`.
    fn machine(&self, i: usize) -> String {
        AssetPath::parse(&self.sensor(i))
            .expect("valid")
            .parent()
            .expect("a machine")
            .to_string()
    }

    fn was_served(&self, sensor: &str, v: f64) -> bool {
        let id = AssetPath::parse(sensor).expect("valid").id();
        self.served
            .lock()
            .expect("not poisoned")
            .get(&id)
            .is_some_and(|s| s.contains(&v.to_bits()))
    }

    async fn stop(self) {
        self.stepper.abort();
        self.site.rt.shutdown().await;
    }
}

fn quality(t: &pb::Twin) -> (pb::QualityCode, String) {
    let q = t
        .sensor
        .as_ref()
        .and_then(|s| s.quality.clone())
        .unwrap_or_default();
    (
        pb::QualityCode::try_from(q.code).unwrap_or_default(),
        q.reason,
    )
}

type Client = pb::twin_service_client::TwinServiceClient<tonic::transport::Channel>;

/// Waits until the sensor at `s` reads Bad for a communication failure.
async fn wait_comm_failure(c: &Client, s: &str, secs: u64, what: &str) {
    wait_for(secs, what, || {
        let mut c = c.clone();
        async move {
            let (code, reason) = quality(&get(&mut c, s).await);
            (code == pb::QualityCode::Bad && reason.contains("communication")).then_some(())
        }
    })
    .await;
}

/// Waits until the sensor at `s` reads Good with a source time after `since_us`.
async fn wait_good_since(c: &Client, s: &str, since_us: i64, secs: u64, what: &str) {
    wait_for(secs, what, || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, s).await;
            (quality(&t).0 == pb::QualityCode::Good && source_ts(&t) > since_us).then_some(())
        }
    })
    .await;
}

fn source_ts(t: &pb::Twin) -> i64 {
    t.sensor.as_ref().map_or(0, |s| s.source_ts_us)
}

/// Waits until the first sensor of line `i` shows a value the plant served, good.
async fn wait_served_value(rig: &Rig, i: usize) -> pb::Twin {
    let sensor = rig.sensor(i);
    let c = rig.site.client.clone();
    // Until a sensor's first sample a PLC register holds its boot value (0); then the twin
    // shows what the simulation served.
    wait_for(20, "a simulated value in the twin", || {
        let (mut c, sensor) = (c.clone(), sensor.clone());
        async move {
            let t = get(&mut c, &sensor).await;
            let v = float_of(&t)?;
            (quality(&t).0 == pb::QualityCode::Good && v != 0.0 && rig.was_served(&sensor, v))
                .then_some(t)
        }
    })
    .await
}

async fn connections(c: &mut Client) -> Vec<pb::Connection> {
    c.list_connections(pb::ListConnectionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .connections
}

async fn wait_connected(rig: &Rig) {
    let c = rig.site.client.clone();
    wait_for(20, "every connection connected and reading", || {
        let mut c = c.clone();
        async move {
            connections(&mut c)
                .await
                .iter()
                .all(|l| l.link == "connected" && l.received > 0)
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_plc_values_reach_the_twins_and_the_grpc_api() {
    let rig = rig(Feed::Modbus).await;
    for line in 0..2 {
        let twin = wait_served_value(&rig, line).await;
        let age_ms = (now().0 - source_ts(&twin)) / 1000;
        assert!(age_ms < 60_000, "source time is the PLC's, {age_ms} ms old");
    }
    let list = connections(&mut rig.site.client.clone()).await;
    assert_eq!(list.len(), 2, "a connection per line's PLC");
    assert!(list.iter().all(|l| l.protocol == "modbus" && l.tags > 0));
    wait_connected(&rig).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opcua_subscription_values_reach_the_twins_with_source_timestamps() {
    let rig = rig(Feed::OpcUa).await;
    for line in 0..2 {
        let twin = wait_served_value(&rig, line).await;
        let age_ms = (now().0 - source_ts(&twin)) / 1000;
        assert!(age_ms < 60_000, "the server's source time, {age_ms} ms old");
    }
    let list = connections(&mut rig.site.client.clone()).await;
    assert_eq!(list.len(), 1, "one connection per site server");
    assert_eq!(list[0].protocol, "opcua");
    wait_connected(&rig).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_opcua_server_that_goes_away_turns_its_twins_bad_and_back() {
    let rig = rig(Feed::OpcUa).await;
    let sensor = rig.sensor(0);
    wait_served_value(&rig, 0).await;
    let c = rig.site.client.clone();
    let addrs: Vec<std::net::SocketAddr> = {
        let mut p = rig.plant.lock().await;
        let o = p.opcua_mut().expect("serving OPC UA");
        let addrs = o.sites().iter().map(|s| s.addr).collect();
        o.stop_site(0).await;
        addrs
    };
    wait_comm_failure(&c, &sensor, 30, "the twins bad").await;
    rig.plant
        .lock()
        .await
        .serve_opcua_on(&rig.spec, &addrs)
        .await
        .expect("the server comes back on its port");
    let back = now().0;
    wait_good_since(&c, &sensor, back, 30, "the twins good again").await;
    eprintln!(
        "OPC UA: good again {} ms after the server was back",
        (now().0 - back) / 1000
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_json_values_reach_the_twins() {
    let rig = rig(Feed::Json).await;
    wait_served_value(&rig, 0).await;
    wait_served_value(&rig, 1).await;
    wait_connected(&rig).await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sparkplug_values_reach_the_twins_with_aliases_resolved() {
    let rig = rig(Feed::Sparkplug).await;
    wait_served_value(&rig, 0).await;
    wait_served_value(&rig, 1).await;
    let list = connections(&mut rig.site.client.clone()).await;
    assert_eq!(list.len(), 1, "one connection per Sparkplug group");
    assert_eq!(list[0].protocol, "mqtt");
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plc_that_goes_away_turns_its_twins_bad_and_back_while_the_other_line_flows() {
    let rig = rig(Feed::Modbus).await;
    let (lost, other) = (rig.sensor(0), rig.sensor(1));
    let c = rig.site.client.clone();
    for s in [&lost, &other] {
        wait_for(20, "good values on both lines", || {
            let (mut c, s) = (c.clone(), s.clone());
            async move { (quality(&get(&mut c, &s).await).0 == pb::QualityCode::Good).then_some(()) }
        })
        .await;
    }
    assert!(rig.plant.lock().await.stop_line(0));
    let cut = now().0;
    wait_comm_failure(&c, &lost, 20, "the lost line's twin to turn bad").await;
    // The other PLC's values keep coming, good.
    wait_good_since(&c, &other, cut, 20, "fresh values from the other line").await;
    let line = AssetPath::parse(&rig.machine(0))
        .expect("valid")
        .parent()
        .expect("line")
        .to_string();
    wait_for(20, "a disconnected event on the line", || {
        let (mut c, line) = (c.clone(), line.clone());
        async move {
            events(&mut c, &line)
                .await
                .iter()
                .any(|e| e.kind == "connection" && e.message.contains("disconnected"))
                .then_some(())
        }
    })
    .await;
    // A write while the PLC is away is refused before any PLC, and on record as an event.
    let mut writer = c.clone();
    let machine = rig.machine(0);
    let err = writer
        .write_property(write(
            &machine,
            "speed_setpoint_pct",
            pb::value::Kind::Int(80),
        ))
        .await
        .expect_err("not connected");
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
    let refused = events(&mut writer, &machine)
        .await
        .into_iter()
        .find(|e| e.kind == "write" && e.message.contains("speed_setpoint_pct = 80"))
        .expect("the refused write is an event");
    assert!(refused.message.contains("refused"), "{}", refused.message);
    rig.plant
        .lock()
        .await
        .restart_line(0)
        .await
        .expect("the PLC comes back on its port");
    let back = now().0;
    wait_good_since(&c, &lost, back, 20, "the lost line's twin good again").await;
    eprintln!(
        "Modbus: good again {} ms after the PLC was back",
        (now().0 - back) / 1000
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sparkplug_node_that_dies_turns_its_twins_bad_and_its_rebirth_brings_them_back() {
    let rig = rig(Feed::Sparkplug).await;
    let sensor = rig.sensor(0);
    wait_served_value(&rig, 0).await;
    let c = rig.site.client.clone();
    // The edge node's connection drops without a goodbye: the broker sends its NDEATH Will.
    rig.plant.lock().await.abort_mqtt();
    wait_comm_failure(&c, &sensor, 20, "the node's twins bad").await;
    // The node comes back: new births, values flow again.
    let port = rig.broker_port.expect("an MQTT feed");
    rig.plant
        .lock()
        .await
        .connect_mqtt(
            &rig.spec,
            "127.0.0.1",
            port,
            "sim-again",
            MqttFormat::Sparkplug,
        )
        .await
        .expect("reconnects");
    let back = now().0;
    wait_good_since(&c, &sensor, back, 20, "the node's twins good again").await;
    eprintln!(
        "Sparkplug: good again {} ms after the node was back",
        (now().0 - back) / 1000
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setpoints_written_over_grpc_reach_the_simulated_machine() {
    let rig = rig(Feed::Modbus).await;
    let machine = rig.machine(0);
    let machine_id = AssetPath::parse(&machine).expect("valid").id();
    let mut c = rig.site.client.clone();
    wait_connected(&rig).await;
    let r = c
        .write_property(write(
            &machine,
            "speed_setpoint_pct",
            pb::value::Kind::Int(150),
        ))
        .await
        .expect("written")
        .into_inner();
    assert_eq!(
        r.connection,
        feeds::line_connection_name(&rig.mapping.lines[0].line)
    );
    wait_speed(&rig, machine_id, 150).await;
    // Stopping the machine over the run-enable coil shows in its next state reading.
    c.write_property(write(&machine, "run_enable", pb::value::Kind::Bool(false)))
        .await
        .expect("written");
    wait_for(30, "the machine twin idle", || {
        let (mut c, m) = (c.clone(), machine.clone());
        async move {
            let t = get(&mut c, &m).await;
            (t.machine.as_ref()?.state == "idle").then_some(())
        }
    })
    .await;
    // Refusals come back with the reason. Outside the plant spec's range or type, or a
    // property the type lists no setpoint for: refused before the PLC sees it (its speed
    // stays), on record as an event.
    let speed_before = rig.plant.lock().await.sim().speed_pct(machine_id);
    for (property, value, says) in [
        (
            "speed_setpoint_pct",
            pb::value::Kind::Int(999),
            "outside its range 0..=200 %",
        ),
        (
            "speed_setpoint_pct",
            pb::value::Kind::Bool(true),
            "a bool where speed_setpoint_pct takes an int",
        ),
        (
            "speed_setpoint_pct",
            pb::value::Kind::Int(-1),
            "outside its range",
        ),
        (
            "spindle_rpm",
            pb::value::Kind::Int(100),
            "has no setpoint \"spindle_rpm\"",
        ),
    ] {
        refused_by_spec(&c, &machine, property, value, says).await;
    }
    assert_eq!(
        rig.plant.lock().await.sim().speed_pct(machine_id),
        speed_before,
        "a refused write reached the PLC"
    );
    let refused: Vec<_> = events(&mut c, &machine)
        .await
        .into_iter()
        .filter(|e| e.kind == "write" && e.message.contains("(plant spec)"))
        .collect();
    assert_eq!(refused.len(), 4, "{refused:?}");
    let err = c
        .write_property(write(&machine, "state", pb::value::Kind::Int(1)))
        .await
        .expect_err("not writable");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("no setpoint \"state\""), "{err}");
    let err = c
        .write_property(write(
            "acme/nowhere",
            "speed_setpoint_pct",
            pb::value::Kind::Int(100),
        ))
        .await
        .expect_err("no such asset");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    // Every write is an event with who wrote it.
    let evs = events(&mut c, &machine).await;
    let writes: Vec<_> = evs.iter().filter(|e| e.kind == "write").collect();
    assert!(
        writes
            .iter()
            .any(|e| e.message.contains("speed_setpoint_pct = 150") && e.message.contains("ann")),
        "{writes:?}"
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setpoints_written_over_grpc_reach_the_machine_over_json_sparkplug_and_opcua() {
    // The simulated Sparkplug node reports a changed setpoint back and an OPC UA server
    // answers the write itself: confirmed. A JSON command has no read-back topic here.
    let cases = [
        (Feed::Json, 140, "unconfirmed"),
        (Feed::Sparkplug, 60, "confirmed"),
        (Feed::OpcUa, 170, "confirmed"),
    ];
    for (feed, pct, result) in cases {
        let rig = rig(feed).await;
        let machine = rig.machine(1);
        let machine_id = AssetPath::parse(&machine).expect("valid").id();
        wait_served_value(&rig, 1).await;
        let mut c = rig.site.client.clone();
        let r = c
            .write_property(write(
                &machine,
                "speed_setpoint_pct",
                pb::value::Kind::Int(pct),
            ))
            .await
            .unwrap_or_else(|e| panic!("{feed:?}: written: {e}"))
            .into_inner();
        assert_eq!(r.result, result, "{feed:?}");
        wait_speed(&rig, machine_id, pct as u16).await;
        rig.stop().await;
    }
}

/// Writes `value` to `property` of `path` and asserts the plant spec refused it, saying
/// `says`, before any PLC.
async fn refused_by_spec(
    c: &Client,
    path: &str,
    property: &str,
    value: pb::value::Kind,
    says: &str,
) {
    let err = c
        .clone()
        .write_property(write(path, property, value))
        .await
        .expect_err("refused by the plant spec");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains(says), "{says}: {err}");
    assert!(err.message().contains("no PLC was written"), "{err}");
}

fn write(path: &str, property: &str, value: pb::value::Kind) -> pb::WritePropertyRequest {
    pb::WritePropertyRequest {
        path: path.into(),
        property: property.into(),
        value: Some(pb::Value { kind: Some(value) }),
        by: "ann".into(),
    }
}

async fn wait_speed(rig: &Rig, machine: AssetId, pct: u16) {
    wait_for(20, "the simulated machine at the new speed", || async {
        (rig.plant.lock().await.sim().speed_pct(machine) == Some(pct)).then_some(())
    })
    .await;
}

/// A line's own setpoint (a line speed its PLC hands to the machines): written on the line's
/// path, checked against the line's setpoints in the plant spec, sent by the connection's
/// tag. Here the line PLC's register is the first machine's speed register.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_setpoint_is_checked_by_the_line_spec_and_reaches_its_plc() {
    use ferrotwin_models::spec::SetpointSpec;
    let rig = rig_with(
        Feed::Modbus,
        |spec| {
            spec.sites[0].areas[0].lines[0].setpoints = vec![SetpointSpec {
                name: "line_speed_pct".into(),
                value_type: ferrotwin_models::ValueType::Int,
                min: Some(0.0),
                max: Some(120.0),
                unit: "%".into(),
            }];
        },
        |spec, connections| {
            let line = spec.assets()[3].path.to_string();
            let ConnectionConfig::Modbus(m) = &mut connections[0] else {
                panic!("modbus")
            };
            let mut tag = m
                .resolved_tags()
                .expect("tags")
                .into_iter()
                .find(|t| t.property == "speed_setpoint_pct" && t.asset.starts_with(&line))
                .expect("a speed register on line 1");
            tag.asset = line;
            tag.property = "line_speed_pct".into();
            m.tags.push(tag);
        },
    )
    .await;
    let line = rig.spec.assets()[3].path.to_string();
    assert!(line.ends_with("line-1"), "{line}");
    let machine = rig.machine(0);
    assert!(machine.starts_with(&line), "{machine} on {line}");
    let machine_id = AssetPath::parse(&machine).expect("valid").id();
    let mut c = rig.site.client.clone();
    wait_connected(&rig).await;
    let r = c
        .write_property(write(&line, "line_speed_pct", pb::value::Kind::Int(90)))
        .await
        .expect("written")
        .into_inner();
    assert_eq!(r.result, "confirmed");
    wait_speed(&rig, machine_id, 90).await;
    for (property, value, says) in [
        (
            "line_speed_pct",
            pb::value::Kind::Int(130),
            "outside its range 0..=120 %",
        ),
        (
            "line_speed",
            pb::value::Kind::Int(50),
            "has no setpoint \"line_speed\" (its setpoints: line_speed_pct)",
        ),
    ] {
        refused_by_spec(&c, &line, property, value, says).await;
    }
    assert_eq!(rig.plant.lock().await.sim().speed_pct(machine_id), Some(90));
    rig.stop().await;
}

/// A writable tag on a machine whose type lists its setpoints, for a property it does not
/// list: the start fails naming the connection, the asset, the property and what the type
/// takes (a write there could never be checked against the plant spec).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writable_tag_its_machine_type_lists_no_setpoint_for_is_refused_at_start() {
    let mut spec: PlantSpec = generate(TWO_LINES, 3);
    let machine = spec
        .assets()
        .into_iter()
        .find(|a| matches!(a.kind, ferrotwin_models::spec::AssetKind::Machine { .. }))
        .expect("a machine")
        .path
        .to_string();
    let dir = tempfile::tempdir().expect("dir");
    let msg = refused_at_start(&spec, dir.path(), &machine, "spindle_rpm", true).await;
    for part in [
        "odd-plc",
        machine.as_str(),
        "no setpoint \"spindle_rpm\"",
        "speed_setpoint_pct",
    ] {
        assert!(msg.contains(part), "{part} in {msg}");
    }
    // A machine's reported state is no setpoint: its writes could never be taken.
    let err = refused_at_start(&spec, dir.path(), &machine, "state", true).await;
    assert!(
        err.contains("state is what the machine reports, not a setpoint"),
        "{err}"
    );
    // A line: no readings; a setpoint it does not list when it lists some.
    spec.sites[0].areas[0].lines[0].setpoints = vec![ferrotwin_models::spec::SetpointSpec {
        name: "line_speed_pct".into(),
        value_type: ferrotwin_models::ValueType::Int,
        min: None,
        max: None,
        unit: String::new(),
    }];
    let line = spec.assets()[3].path.to_string();
    for (property, writable, says) in [
        ("value", false, "a line holds no readings (value)"),
        (
            "line_speed",
            true,
            "has no setpoint \"line_speed\" (its setpoints: line_speed_pct)",
        ),
    ] {
        let err = refused_at_start(&spec, dir.path(), &line, property, writable).await;
        assert!(err.contains(says), "{says}: {err}");
    }
}

/// Why the runtime of `spec` does not start with one Modbus tag on `property` of `asset`.
async fn refused_at_start(
    spec: &PlantSpec,
    dir: &std::path::Path,
    asset: &str,
    property: &str,
    writable: bool,
) -> String {
    let text = format!(
        r#"protocol = "modbus"
name = "odd-plc"
endpoint = "127.0.0.1:1"
[[tags]]
asset = "{asset}"
property = "{property}"
register = "holding"
address = 900
data_type = "u16"
writable = {writable}
"#
    );
    let mut opts = options();
    opts.connections = vec![toml::from_str::<ConnectionConfig>(&text).expect("a config")];
    ferrotwin_runtime::Runtime::start(spec, dir, opts)
        .await
        .err()
        .expect("refused at start")
        .to_string()
}

/// A device that is not ours, on topics of its own, publishing JSON of its own shape through
/// Debian's `mosquitto_pub`: the value at a JSON pointer, the time in ms or RFC 3339, quality
/// words of its own mapped. A null value with a fault turns the twin Bad, keeping its value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_json_device_maps_by_its_payload_layout() {
    let Some(publ) = tool("mosquitto_pub", "apt-get install -y mosquitto-clients") else {
        return;
    };
    // rumqttd has no shutdown: the broker's threads end with the test process.
    let broker = EmbeddedBroker::start().expect("broker");
    let text = format!(
        r#"protocol = "mqtt"
name = "edge-json"
broker = "{}"
[format]
type = "json"
[[format.tags]]
topic = "factory/hall2/PressA/oilTemp"
asset = "{TEMP}"
property = "value"
[[format.tags]]
topic = "factory/hall2/PressA/strokes"
asset = "{COUNT}"
property = "value"
[format.payload]
value = "/reading/val"
timestamp = "time"
quality = "status"
quality_map = {{ "OK" = "good", "SENSOR_FAULT" = "bad", "DRIFT" = "uncertain" }}
"#,
        broker.addr()
    );
    let mut o = options();
    o.connections = vec![toml::from_str::<ConnectionConfig>(&text).expect("a config")];
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), o).await;
    wait_first_connection(&site.client, "the adapter connected", |c| {
        c.link == "connected"
    })
    .await;
    let port = broker.addr().port().to_string();
    let publish = |topic: &'static str, payload: String| {
        let (p, port) = (publ.clone(), port.clone());
        async move {
            let (ok, out) = tokio::task::spawn_blocking(move || {
                run_tool(
                    &p,
                    &[
                        "-h",
                        "127.0.0.1",
                        "-p",
                        &port,
                        "-q",
                        "1",
                        "-t",
                        topic,
                        "-m",
                        &payload,
                    ],
                )
            })
            .await
            .expect("mosquitto_pub");
            assert!(ok, "{out}");
        }
    };
    let mut c = site.client.clone();
    let sensor = |t: &pb::Twin| t.sensor.clone().expect("a sensor");
    // A value three seconds old, its time in ms: the twin has it with that source time.
    let t_ms = now().0 / 1000 - 3000;
    publish(
        "factory/hall2/PressA/oilTemp",
        format!(r#"{{"reading": {{"val": 71.25}}, "time": {t_ms}, "status": "OK"}}"#),
    )
    .await;
    wait_float(&c, TEMP, 71.25, 20, "the device's value").await;
    let t = get(&mut c, TEMP).await;
    let s = sensor(&t);
    assert_eq!(s.source_ts_us, t_ms * 1000);
    assert_eq!(
        s.quality.as_ref().map(|q| q.code),
        Some(pb::QualityCode::Good as i32)
    );
    // No valid value and a fault: Bad, the last value kept.
    publish(
        "factory/hall2/PressA/oilTemp",
        format!(
            r#"{{"reading": {{"val": null}}, "time": {}, "status": "SENSOR_FAULT"}}"#,
            t_ms + 1000
        ),
    )
    .await;
    let t = wait_for(20, "the sensor Bad", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (t.sensor.as_ref()?.quality.as_ref()?.code == pb::QualityCode::Bad as i32).then_some(t)
        }
    })
    .await;
    assert_eq!(float_of(&t), Some(71.25));
    assert_eq!(sensor(&t).source_ts_us, (t_ms + 1000) * 1000);
    // An int with an RFC 3339 time and a drift: Uncertain.
    publish(
        "factory/hall2/PressA/strokes",
        r#"{"reading": {"val": 4711}, "time": "2025-06-01T10:00:00.250+02:00", "status": "DRIFT"}"#
            .to_string(),
    )
    .await;
    wait_float(&c, COUNT, 4711.0, 20, "the device's count").await;
    let t = get(&mut c, COUNT).await;
    let s = sensor(&t);
    assert_eq!(s.source_ts_us, 1_748_764_800_250_000);
    assert_eq!(
        s.quality.as_ref().map(|q| q.code),
        Some(pb::QualityCode::Uncertain as i32)
    );
    // A status the map does not list: refused and counted, the twin untouched.
    publish(
        "factory/hall2/PressA/strokes",
        r#"{"reading": {"val": 1}, "status": "MAINTENANCE"}"#.to_string(),
    )
    .await;
    wait_first_connection(&c, "the refusal counted", |c| c.rejected >= 1).await;
    assert_eq!(float_of(&get(&mut c, COUNT).await), Some(4711.0));
    site.rt.shutdown().await;
}

/// An edge node that is not ours (pysparkplug on paho-mqtt, through Debian's mosquitto),
/// named as its vendor names it, mapped metric by metric: a device metric to a sensor, a
/// boolean to the machine's state, a node metric to another sensor; a metric nobody maps is
/// reported. Writes: confirmed when the device reports the value back, refused when it
/// reports another, unconfirmed when it reports nothing; each one an event with its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_sparkplug_edge_node_maps_metric_by_metric_and_writes_are_read_back() {
    let (Some(broker_bin), Some(python)) = (
        tool("mosquitto", "apt-get install -y mosquitto"),
        python_with("pysparkplug", "pysparkplug"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let broker = mosquitto(&broker_bin, dir.path(), "allow_anonymous true\n").await;
    let text = format!(
        r#"protocol = "mqtt"
name = "edge1"
broker = "127.0.0.1:{port}"
readback_timeout_ms = 1500
[format]
type = "sparkplug"
group_id = "Plant1"
[[format.metrics]]
node = "Edge1"
device = "Filler"
metric = "Temperature"
asset = "{TEMP}"
[[format.metrics]]
node = "Edge1"
device = "Filler"
metric = "Running"
asset = "{PRESS}"
property = "state"
[[format.metrics]]
node = "Edge1"
device = "Filler"
metric = "Speed"
asset = "{PRESS}"
property = "speed_setpoint_pct"
writable = true
[[format.metrics]]
node = "Edge1"
metric = "Line/Throughput"
asset = "{FORCE}"
[[format.metrics]]
node = "Edge1"
metric = "Line/Enable"
asset = "{PRESS}"
property = "run_enable"
writable = true
"#,
        port = broker.port
    );
    let mut o = options();
    o.connections = vec![toml::from_str::<ConnectionConfig>(&text).expect("a config")];
    let site = start_in(&dir.path().join("data"), o).await;
    wait_first_connection(&site.client, "the adapter connected", |c| {
        c.link == "connected"
    })
    .await;
    // The node births after we listen (it does not answer rebirth requests).
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/foreign/sparkplug_edge.py");
    let mut node = std::process::Command::new(&python)
        .args([script, "127.0.0.1", &broker.port.to_string(), "60"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(dir.path().join("edge.log")).expect("log"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the edge node starts");
    let mut c = site.client.clone();
    // Temperature steps 20.5 + n, throughput 120 + n: both live, with the node's times.
    let temp = wait_for(30, "the device metric in its sensor", || {
        let mut c = c.clone();
        async move { float_of(&get(&mut c, TEMP).await).filter(|v| *v > 21.0) }
    })
    .await;
    assert_eq!(temp.fract(), 0.5, "{temp}");
    let force = wait_for(20, "the node metric in its sensor", || {
        let mut c = c.clone();
        async move { float_of(&get(&mut c, FORCE).await).filter(|v| *v > 120.0) }
    })
    .await;
    assert_eq!(force.fract(), 0.0, "{force}");
    let press = get(&mut c, PRESS).await;
    assert_eq!(press.machine.expect("a machine").state, "running");
    let write = |value: pb::value::Kind, property: &'static str| {
        let mut c = c.clone();
        async move {
            c.write_property(pb::WritePropertyRequest {
                path: PRESS.into(),
                property: property.into(),
                value: Some(pb::Value { kind: Some(value) }),
                by: "ann".into(),
            })
            .await
        }
    };
    let started = std::time::Instant::now();
    let ok = write(pb::value::Kind::Int(75), "speed_setpoint_pct")
        .await
        .expect("taken")
        .into_inner();
    eprintln!("confirmed write in {:?}", started.elapsed());
    assert_eq!(
        (ok.connection.as_str(), ok.result.as_str()),
        ("edge1", "confirmed")
    );
    // Above what the device takes: it reports the value it keeps.
    let err = write(pb::value::Kind::Int(150), "speed_setpoint_pct")
        .await
        .expect_err("refused");
    assert!(
        err.message()
            .contains("the device reports speed_setpoint_pct = 75"),
        "{err:?}"
    );
    // A node metric that the device takes silently: unconfirmed after the read-back timeout.
    let r = write(pb::value::Kind::Bool(false), "run_enable")
        .await
        .expect("sent")
        .into_inner();
    assert_eq!(r.result, "unconfirmed");
    let writes = wait_for(20, "the three write events", || {
        let mut c = c.clone();
        async move {
            let e = events(&mut c, PRESS).await;
            let writes: Vec<String> = e
                .into_iter()
                .filter(|e| e.kind == "write")
                .map(|e| e.message)
                .collect();
            (writes.len() >= 3).then_some(writes)
        }
    })
    .await;
    for want in [
        "speed_setpoint_pct = 75 written by ann through edge1: confirmed",
        "speed_setpoint_pct = 150 by ann through edge1 refused",
        "run_enable = false sent by ann through edge1: unconfirmed",
    ] {
        assert!(
            writes.iter().any(|e| e.contains(want)),
            "{want} in {writes:?}"
        );
    }
    // The device's metric nobody maps (Serial) is counted, and reported once.
    wait_first_connection(&site.client, "the unmapped metric counted", |x| {
        x.rejected > 0
    })
    .await;
    let all = events(&mut c, "acme/berlin/assembly/line-1").await;
    assert!(
        all.iter().any(|e| e
            .message
            .contains("Edge1/Filler/Serial refused: no tag maps it")),
        "{all:?}"
    );
    drop(node.stdin.take());
    let _ = node.wait();
    let log = std::fs::read_to_string(dir.path().join("edge.log")).expect("log");
    assert!(
        log.contains("dcmd Speed = 75") && log.contains("ncmd Line/Enable = False"),
        "{log}"
    );
    site.rt.shutdown().await;
}

/// A device that is not ours (paho-mqtt, through Debian's mosquitto) whose zone setpoint is a
/// sensor a write may set: its reports on its own topic are the twin's readings and the
/// read-back of a write sent to its command topic. A value it takes is confirmed; one it
/// ignores is refused by what it goes on reporting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_json_device_confirms_or_refutes_a_written_sensor_value_by_its_reports() {
    let (Some(broker_bin), Some(python)) = (
        tool("mosquitto", "apt-get install -y mosquitto"),
        python_with("paho.mqtt", "paho-mqtt"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    // With the broker's Nagle on (mosquitto's default) each hop of a write and its read-back
    // may wait for a delayed ACK: 50 ms where 5 ms would do (README, MQTT JSON).
    let broker = mosquitto(
        &broker_bin,
        dir.path(),
        "allow_anonymous true\nset_tcp_nodelay true\n",
    )
    .await;
    const ZONE: &str = "acme/berlin/assembly/line-1/oven-1/zone-temp";
    let text = format!(
        r#"protocol = "mqtt"
name = "oven-json"
broker = "127.0.0.1:{port}"
readback_timeout_ms = 1500
[format]
type = "json"
[[format.tags]]
topic = "factory/hall2/Oven1/zoneSP"
command_topic = "factory/hall2/Oven1/zoneSP/set"
asset = "{ZONE}"
property = "value"
writable = true
[format.payload]
value = "/reading/val"
timestamp = "time"
quality = "status"
quality_map = {{ "OK" = "good" }}
"#,
        port = broker.port
    );
    let mut o = options();
    o.connections = vec![toml::from_str::<ConnectionConfig>(&text).expect("a config")];
    let site = start_in(&dir.path().join("data"), o).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/foreign/json_device.py");
    let mut device = std::process::Command::new(&python)
        .args([script, "127.0.0.1", &broker.port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(dir.path().join("device.log")).expect("log"))
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .expect("the device starts");
    let c = site.client.clone();
    wait_float(&c, ZONE, 180.0, 30, "the device's reported setpoint").await;
    let set = |v: f64| {
        let mut c = c.clone();
        async move {
            c.write_property(write(ZONE, "value", pb::value::Kind::Float(v)))
                .await
        }
    };
    let started = std::time::Instant::now();
    let ok = set(200.0).await.expect("taken").into_inner();
    eprintln!(
        "MQTT JSON (paho): written value confirmed in {:?}",
        started.elapsed()
    );
    assert_eq!(ok.result, "confirmed");
    wait_float(&c, ZONE, 200.0, 10, "the new value as a reading").await;
    // Above what the device takes: it goes on reporting 200.
    let err = set(300.0).await.expect_err("refused by the device");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(
        err.message().contains("the device reports value = 200"),
        "{err:?}"
    );
    drop(device.stdin.take());
    let _ = device.wait();
    let log = std::fs::read_to_string(dir.path().join("device.log")).expect("log");
    assert!(log.contains("cmd 200") && log.contains("cmd 300"), "{log}");
    site.rt.shutdown().await;
}

/// The site's `[[connections]]` of `lines` (the simulator's Modbus map in `map`, one
/// connection per line at its endpoint), as a site config's text, line 2 polled every
/// `line2_poll_ms`.
fn modbus_site_toml(
    map: &std::path::Path,
    mapping: &Mapping,
    configs: &[ConnectionConfig],
    line2_poll_ms: u64,
) -> String {
    let mut text = String::from("version = 1\n");
    for (i, (l, c)) in mapping.lines.iter().zip(configs).enumerate() {
        let ConnectionConfig::Modbus(m) = c else {
            panic!("modbus configs")
        };
        let poll = if i == 1 { line2_poll_ms } else { 50 };
        text.push_str(&format!(
            "\n[[connections]]\nprotocol = \"modbus\"\nname = \"{}\"\nendpoint = \"{}\"\npoll_interval_ms = {poll}\ntimeout_ms = 500\nmapping_file = \"{}\"\nline = \"{}\"\n",
            m.name,
            m.endpoint,
            map.display(),
            l.line
        ));
    }
    text
}

/// A live apply with a site config: the connection whose settings changed restarts, the
/// other keeps running untouched (its counters go on), and values flow on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_changed_live_restarts_only_it() {
    let map_dir = tempfile::tempdir().expect("dir");
    let map = map_dir.path().join("mapping.toml");
    let text = std::sync::Mutex::new(String::new());
    let r = rig_with(
        Feed::Modbus,
        |_| {},
        |spec, configs| {
            let mapping = Mapping::of(spec).expect("fits");
            std::fs::write(&map, mapping.to_toml()).expect("map");
            let t = modbus_site_toml(&map, &mapping, configs, 50);
            let mut table: toml::Table = toml::from_str(&t).expect("site toml");
            *configs = table
                .remove("connections")
                .expect("connections")
                .try_into()
                .expect("configs");
            *text.lock().expect("lock") = modbus_site_toml(&map, &mapping, configs, 80);
        },
    )
    .await;
    let changed_toml = text.into_inner().expect("lock");
    let list = |c: Client| async move {
        let mut c = c;
        c.list_connections(pb::ListConnectionsRequest {})
            .await
            .expect("connections")
            .into_inner()
            .connections
    };
    wait_for(20, "both lines polled", || {
        let c = r.site.client.clone();
        async move {
            let l = list(c).await;
            (l.len() == 2 && l.iter().all(|c| c.link == "connected" && c.received > 20))
                .then_some(())
        }
    })
    .await;
    let before = list(r.site.client.clone()).await;
    let done = r
        .site
        .client
        .clone()
        .apply_plant(pb::ApplyPlantRequest {
            plant_toml: r.spec.to_toml(),
            base_version: 1,
            dry_run: false,
            by: "test".into(),
            site_toml: changed_toml,
        })
        .await
        .expect("applied")
        .into_inner();
    assert!(done.applied && done.changes.is_empty(), "{done:?}");
    assert_eq!(
        done.connections
            .iter()
            .map(|c| format!("{} {}", c.op, c.name))
            .collect::<Vec<_>>(),
        [format!("changed {}", before[1].name)]
    );
    let after = list(r.site.client.clone()).await;
    assert_eq!(after[0].name, before[0].name);
    assert!(
        after[0].received >= before[0].received && after[0].connects == before[0].connects,
        "the unchanged connection went on: {:?} then {:?}",
        before[0],
        after[0]
    );
    assert!(
        after[1].received < before[1].received,
        "the changed connection restarted (its counters anew): {:?} then {:?}",
        before[1],
        after[1]
    );
    wait_for(20, "the restarted line polls again", || {
        let c = r.site.client.clone();
        async move {
            let l = list(c).await;
            (l[1].link == "connected" && l[1].received > 20).then_some(())
        }
    })
    .await;
    r.stepper.abort();
    r.site.rt.shutdown().await;
}
