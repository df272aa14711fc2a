//! The Modbus adapter against the simulator's real Modbus TCP server on 127.0.0.1.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_adapters::modbus::ModbusConfig;
use ferrotwin_adapters::{
    AdapterEvent, AdapterEventKind, AdapterHandle, ConnectionConfig, WriteAck, WriteError,
    WriteRequest,
};
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{
    AssetId, AssetPath, IngestSink, Property, PushBack, PushBackReason, Quality, QualityCode,
    QualityReason, Reading, Value,
};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::mapping::{Mapping, WordOrder};
use ferrotwin_sim::modbus::{LineRegisters, serve_line};
use ferrotwin_sim::model::{MachineStatus, PlantSim};
use ferrotwin_sim::run::RUN_START;
use ferrotwin_sim::serve::ServedPlant;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const PRESS: &str = "acme/berlin/assembly/line-1/press-1";

/// Keeps every batch, up to a bound (then pushes back).
#[derive(Default)]
struct BatchSink {
    batches: Mutex<Vec<Vec<Reading>>>,
}

impl IngestSink for BatchSink {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        let mut b = self.batches.lock().expect("not poisoned");
        if b.len() >= 100_000 {
            return Err(PushBack {
                batch,
                why: PushBackReason::Busy,
            });
        }
        b.push(batch);
        Ok(())
    }
}

impl BatchSink {
    fn batches(&self) -> Vec<Vec<Reading>> {
        self.batches.lock().expect("not poisoned").clone()
    }

    fn count(&self) -> usize {
        self.batches.lock().expect("not poisoned").len()
    }

    /// Readings of (asset, property) in arrival order.
    fn of(&self, asset: AssetId, property: Property) -> Vec<Reading> {
        self.batches()
            .into_iter()
            .flatten()
            .filter(|r| r.asset == asset && r.property == property)
            .collect()
    }
}

fn spec() -> PlantSpec {
    generate(PlantSize::ONE_LINE, 1)
}

fn id(path: &str) -> AssetId {
    AssetPath::parse(path).expect("valid path").id()
}

/// The press's first sensor (it has a status bit 0).
fn first_sensor_of_press(mapping: &Mapping) -> String {
    mapping.lines[0]
        .tags
        .iter()
        .find(|t| t.property == "value" && t.asset.starts_with(&format!("{PRESS}/")))
        .expect("the press has sensors")
        .asset
        .clone()
}

fn config_for(mapping: &Mapping, addr: SocketAddr) -> ModbusConfig {
    let mut c = ModbusConfig::from_sim_mapping(
        "line-1-plc",
        &addr.to_string(),
        &mapping.to_toml(),
        &mapping.lines[0].line,
    )
    .expect("the simulator's mapping is valid input");
    c.poll_interval_ms = 50;
    c.timeout_ms = 500;
    c
}

struct Running {
    handle: AdapterHandle,
    sink: Arc<BatchSink>,
    events: mpsc::Receiver<AdapterEvent>,
    token: CancellationToken,
}

fn start(config: ModbusConfig) -> Running {
    let sink = Arc::new(BatchSink::default());
    let (tx, events) = mpsc::channel(1024);
    let token = CancellationToken::new();
    let handle = ferrotwin_adapters::start(
        ConnectionConfig::Modbus(config),
        Arc::clone(&sink) as Arc<dyn IngestSink>,
        tx,
        token.clone(),
    )
    .expect("valid config");
    Running {
        handle,
        sink,
        events,
        token,
    }
}

impl Running {
    async fn stop(mut self) {
        self.token.cancel();
        let join = self.handle.take_join().expect("joined once");
        tokio::time::timeout(WAIT, join)
            .await
            .expect("stops when cancelled")
            .expect("no panic");
    }

    /// The next event matching `pred` (earlier ones are skipped).
    async fn event(&mut self, pred: impl Fn(&AdapterEventKind) -> bool) -> AdapterEvent {
        tokio::time::timeout(WAIT, async {
            loop {
                let e = self.events.recv().await.expect("adapter running");
                if pred(&e.kind) {
                    return e;
                }
            }
        })
        .await
        .expect("event within the wait")
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(WAIT, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what} within {WAIT:?}"));
}

/// Steps `plant` one simulated second every 20 ms (50x real time) until aborted.
fn step_in_background(plant: Arc<Mutex<ServedPlant>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut t = RUN_START;
        loop {
            t = t.plus_ms(1000);
            plant.lock().expect("not poisoned").step_to(t);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
}

async fn served(order: WordOrder) -> (Arc<Mutex<ServedPlant>>, Mapping, SocketAddr) {
    let spec = spec();
    let plant = ServedPlant::start_with_word_order(&spec, 5, RUN_START, order)
        .await
        .expect("servers start");
    let addr = plant.lines()[0].addr;
    let mut mapping = Mapping::of(&spec).expect("fits");
    mapping.set_word_order(order);
    (Arc::new(Mutex::new(plant)), mapping, addr)
}

#[tokio::test]
async fn every_polled_tag_reaches_the_sink_once_per_poll_and_values_move() {
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let config = config_for(&mapping, addr);
    let polled: HashSet<(AssetId, Property)> = config
        .tags
        .iter()
        .filter_map(|t| Some((id(&t.asset), Property::parse(&t.property)?)))
        .collect();
    let mut run = start(config);
    run.event(|k| matches!(k, AdapterEventKind::Connected { .. }))
        .await;
    let sensor = id(&first_sensor_of_press(&mapping));
    let sink = Arc::clone(&run.sink);
    wait_until("a sensor value that moves", || {
        let values: HashSet<u64> = sink
            .of(sensor, Property::Value)
            .iter()
            .map(|r| r.value.as_f64().to_bits())
            .collect();
        values.len() >= 3
    })
    .await;
    for batch in sink.batches() {
        let got: HashSet<(AssetId, Property)> =
            batch.iter().map(|r| (r.asset, r.property)).collect();
        assert_eq!(batch.len(), polled.len(), "one reading per tag per poll");
        assert_eq!(got, polled);
        assert!(batch.iter().all(|r| r.quality == Quality::GOOD));
        assert!(
            batch
                .iter()
                .all(|r| r.source_ts.as_micros() > RUN_START.as_micros())
        );
    }
    let press_state = sink.of(id(PRESS), Property::State);
    assert!(matches!(press_state[0].value, Value::Int(0..=3)));
    assert!(matches!(
        sink.of(sensor, Property::Value)[0].value,
        Value::Float(_)
    ));
    let status = run.handle.status().snapshot();
    assert_eq!(status.connects, 1);
    assert!(status.received >= 3 * polled.len() as u64);
    run.stop().await;
    stepper.abort();
}

#[tokio::test]
async fn a_tag_at_a_bad_address_fails_its_group_while_the_others_flow() {
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let mut config = config_for(&mapping, addr);
    let ghost = format!("{PRESS}/ghost");
    let mut bad = config.tags[0].clone();
    bad.asset = ghost.clone();
    bad.property = "value".into();
    bad.register = ferrotwin_adapters::modbus::RegisterKind::Input;
    bad.address = 60_000;
    bad.data_type = ferrotwin_adapters::modbus::DataType::F32;
    bad.writable = false;
    bad.bad_when = None;
    config.tags.push(bad);
    let mut run = start(config);
    let failed = run
        .event(|k| matches!(k, AdapterEventKind::TagFailed { .. }))
        .await;
    let AdapterEventKind::TagFailed { tag, error } = &failed.kind else {
        unreachable!("matched above")
    };
    assert_eq!(tag, "input 60000..=60001");
    assert!(error.contains("IllegalDataAddress"), "{error}");
    assert_eq!(
        failed.asset.as_ref().map(AssetPath::as_str),
        Some(ghost.as_str())
    );
    let sensor = id(&first_sensor_of_press(&mapping));
    let sink = Arc::clone(&run.sink);
    wait_until("other tags keep flowing", || {
        sink.of(sensor, Property::Value)
            .iter()
            .filter(|r| r.quality.is_good())
            .count()
            >= 5
    })
    .await;
    let ghosts = sink.of(id(&ghost), Property::Value);
    assert!(!ghosts.is_empty());
    assert!(
        ghosts
            .iter()
            .all(|r| r.quality == Quality::bad(QualityReason::ConfigError))
    );
    // On the change only: one TagFailed however many polls fail.
    let polls = sink.count();
    wait_until("more polls", || sink.count() >= polls + 5).await;
    while let Ok(e) = run.events.try_recv() {
        assert!(
            !matches!(e.kind, AdapterEventKind::TagFailed { .. }),
            "{e:?}"
        );
    }
    assert!(run.handle.status().snapshot().errors >= 5);
    run.stop().await;
    stepper.abort();
}

/// A line's PLC served from an image the test fills, bound to `addr` (retrying while the OS
/// still holds the port).
async fn serve_image_on(
    addr: SocketAddr,
    mapping: &Mapping,
) -> (Arc<LineRegisters>, JoinHandle<()>) {
    let registers = Arc::new(LineRegisters::new(&mapping.lines[0]).expect("valid line"));
    let listener = tokio::time::timeout(WAIT, async {
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => return l,
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await
    .expect("the port is free again");
    let served = Arc::clone(&registers);
    let task = tokio::spawn(async move {
        let _ = serve_line(listener, served).await;
    });
    (registers, task)
}

/// Fills `registers` with ten seconds of the simulation of `spec`.
fn fill(registers: &LineRegisters, spec: &PlantSpec) -> PlantSim {
    let mut sim = PlantSim::new(spec, 9, RUN_START);
    let mut out = Vec::new();
    for s in 1..=10 {
        sim.step(RUN_START.plus_ms(s * 1000), &mut out);
    }
    registers.update_from(&out);
    sim
}

#[tokio::test]
async fn link_loss_reads_comm_failure_and_a_new_plc_on_the_port_is_picked_up() {
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let mut run = start(config_for(&mapping, addr));
    run.event(|k| matches!(k, AdapterEventKind::Connected { .. }))
        .await;
    let sensor = id(&first_sensor_of_press(&mapping));
    let sink = Arc::clone(&run.sink);
    wait_until("values", || sink.of(sensor, Property::Value).len() >= 3).await;
    // The PLC goes away: its servers and open connections end with it.
    stepper.abort();
    let _ = stepper.await;
    drop(
        Arc::try_unwrap(plant)
            .unwrap_or_else(|_| panic!("the stepper held the only other reference")),
    );
    let lost = run
        .event(|k| matches!(k, AdapterEventKind::Disconnected { .. }))
        .await;
    assert_eq!(lost.asset, None);
    wait_until("a CommFailure reading", || {
        sink.of(sensor, Property::Value)
            .iter()
            .any(|r| r.quality == Quality::bad(QualityReason::CommFailure))
    })
    .await;
    let readings = sink.of(sensor, Property::Value);
    let at = readings
        .iter()
        .position(|r| r.quality.code == QualityCode::Bad)
        .expect("found above");
    assert_eq!(readings[at].value, readings[at - 1].value, "the last value");
    let before = run.handle.status().snapshot();
    assert_eq!(before.connects, 1);
    // A PLC on the same port again.
    let (registers, server) = serve_image_on(addr, &mapping).await;
    fill(&registers, &spec());
    run.event(|k| matches!(k, AdapterEventKind::Connected { .. }))
        .await;
    wait_until("good values again", || {
        sink.of(sensor, Property::Value)
            .last()
            .is_some_and(|r| r.quality.is_good())
    })
    .await;
    assert_eq!(run.handle.status().snapshot().connects, 2);
    run.stop().await;
    server.abort();
}

#[tokio::test]
async fn a_set_status_bit_turns_its_sensor_bad_and_clearing_it_good() {
    let spec = spec();
    let mapping = Mapping::of(&spec).expect("fits");
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = probe.local_addr().expect("bound");
    drop(probe);
    let (registers, server) = serve_image_on(addr, &mapping).await;
    fill(&registers, &spec);
    let run = start(config_for(&mapping, addr));
    let sensor = id(&first_sensor_of_press(&mapping));
    let sink = Arc::clone(&run.sink);
    wait_until("good values", || {
        sink.of(sensor, Property::Value)
            .last()
            .is_some_and(|r| r.quality.is_good())
    })
    .await;
    let status = |bad_sensors| MachineStatus {
        machine: id(PRESS),
        fault_active: bad_sensors != 0,
        bad_sensors,
        run_enabled: true,
    };
    registers.update_status(&status(1));
    wait_until("the stuck sensor reads bad", || {
        sink.of(sensor, Property::Value)
            .last()
            .is_some_and(|r| r.quality == Quality::bad(QualityReason::SensorFailure))
    })
    .await;
    // Its neighbours do not.
    let others: Vec<Reading> = sink
        .batches()
        .last()
        .expect("a poll")
        .iter()
        .filter(|r| r.asset != sensor)
        .copied()
        .collect();
    assert!(others.iter().all(|r| r.quality.is_good()));
    registers.update_status(&status(0));
    wait_until("good again", || {
        sink.of(sensor, Property::Value)
            .last()
            .is_some_and(|r| r.quality.is_good())
    })
    .await;
    run.stop().await;
    server.abort();
}

#[tokio::test]
async fn writes_reach_the_simulated_machine_and_the_plcs_refusal_comes_back() {
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let mut run = start(config_for(&mapping, addr));
    run.event(|k| matches!(k, AdapterEventKind::Connected { .. }))
        .await;
    let press = AssetPath::parse(PRESS).expect("valid");
    let req = |property: &str, value| WriteRequest {
        asset: press.clone(),
        property: property.into(),
        value,
        by: "operator-7".into(),
    };
    assert_eq!(
        run.handle
            .write(req("speed_setpoint_pct", Value::Int(150)))
            .await,
        Ok(WriteAck::Confirmed)
    );
    let written = run
        .event(|k| matches!(k, AdapterEventKind::Written { .. }))
        .await;
    assert_eq!(
        written.kind,
        AdapterEventKind::Written {
            property: "speed_setpoint_pct".into(),
            value: "150".into(),
            by: "operator-7".into(),
            outcome: Ok(WriteAck::Confirmed),
        }
    );
    assert_eq!(written.asset.as_ref(), Some(&press));
    let p = Arc::clone(&plant);
    wait_until("the simulation applies the setpoint", || {
        p.lock().expect("not poisoned").sim().speed_pct(press.id()) == Some(150)
    })
    .await;
    // Out of the PLC's range: the PLC refuses, naming the exception.
    let err = run
        .handle
        .write(req("speed_setpoint_pct", Value::Int(999)))
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, WriteError::Refused { error, .. } if error.contains("IllegalDataValue")),
        "{err}"
    );
    // Not a u16: refused before the PLC.
    let err = run
        .handle
        .write(req("speed_setpoint_pct", Value::Float(-3.0)))
        .await
        .expect_err("bad value");
    assert!(matches!(err, WriteError::BadValue { .. }), "{err}");
    let err = run
        .handle
        .write(req("state", Value::Int(1)))
        .await
        .expect_err("not writable");
    assert!(matches!(err, WriteError::NotWritable { .. }), "{err}");
    // The run-enable coil holds the press idle.
    assert_eq!(
        run.handle
            .write(req("run_enable", Value::Bool(false)))
            .await,
        Ok(WriteAck::Confirmed)
    );
    let sink = Arc::clone(&run.sink);
    let polls = sink.count();
    wait_until("the press reads idle for a while", || {
        let b = sink.batches();
        b.len() > polls + 20
            && b[b.len() - 10..].iter().all(|batch| {
                batch.iter().any(|r| {
                    r.asset == press.id()
                        && r.property == Property::State
                        && r.value == Value::Int(0)
                })
            })
    })
    .await;
    let status = run.handle.status().snapshot();
    assert_eq!((status.writes_ok, status.writes_failed), (2, 2));
    run.stop().await;
    stepper.abort();
}

#[tokio::test]
async fn a_low_word_first_plc_decodes_to_the_simulated_values() {
    let (plant, mapping, addr) = served(WordOrder::LittleEndian).await;
    // One step only: the registers hold these readings for the whole test.
    let readings = plant
        .lock()
        .expect("not poisoned")
        .step_to(RUN_START.plus_ms(30_000))
        .to_vec();
    let mut expected: HashMap<(AssetId, Property), Value> = HashMap::new();
    for r in readings {
        expected.insert((r.asset, r.property), r.value);
    }
    let run = start(config_for(&mapping, addr));
    let sink = Arc::clone(&run.sink);
    wait_until("a poll", || sink.count() >= 1).await;
    let batch = sink.batches().remove(0);
    let mut compared = 0;
    for r in &batch {
        if let Some(v) = expected.get(&(r.asset, r.property)) {
            let want = match v {
                Value::Float(f) => Value::Float(f64::from(*f as f32)),
                other => *other,
            };
            assert_eq!(r.value, want, "{:?}", r.property);
            compared += 1;
        }
    }
    assert!(compared >= 5, "{compared} values compared");
    run.stop().await;
}

#[tokio::test]
async fn a_connection_reads_a_line_from_the_simulators_mapping_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mapping = Mapping::of(&spec()).expect("fits");
    let file = dir.path().join("mapping.toml");
    std::fs::write(&file, mapping.to_toml()).expect("written");
    let text = format!(
        "protocol = \"modbus\"\nname = \"line-1-plc\"\nendpoint = \"127.0.0.1:1502\"\n\
         mapping_file = {:?}\nline = {:?}\n",
        file.display().to_string(),
        mapping.lines[0].line
    );
    let config: ConnectionConfig = toml::from_str(&text).expect("parses");
    let targets = config.targets().expect("valid");
    let machines = mapping.lines[0]
        .tags
        .iter()
        .filter(|t| t.property == "state")
        .count();
    let sensors = mapping.lines[0]
        .tags
        .iter()
        .filter(|t| t.property == "value")
        .count();
    // state, good, scrap, setpoint, run_enable per machine; a value per sensor.
    assert_eq!(targets.len(), 5 * machines + sensors);
    let wrong = text.replace(&mapping.lines[0].line, "acme/nope");
    let err = toml::from_str::<ConnectionConfig>(&wrong)
        .expect("parses")
        .targets()
        .expect_err("no such line");
    assert!(err.to_string().contains("acme/nope"), "{err}");
}

/// A TCP proxy in front of `upstream` that stops forwarding (keeping connections open, as
/// a hung PLC does) while `frozen` is set, and counts the requests it forwards.
async fn freezable_proxy(
    upstream: SocketAddr,
    frozen: Arc<std::sync::atomic::AtomicBool>,
    forwarded: Arc<std::sync::atomic::AtomicUsize>,
) -> (SocketAddr, JoinHandle<()>) {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("binds");
    let addr = listener.local_addr().expect("bound");
    let task = tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let frozen = Arc::clone(&frozen);
            let forwarded = Arc::clone(&forwarded);
            tokio::spawn(async move {
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let mut buf = [0u8; 1024];
                let mut back = [0u8; 1024];
                loop {
                    // Requests and answers alternate: forward one request, then its answer.
                    let Ok(n @ 1..) = cr.read(&mut buf).await else {
                        return;
                    };
                    if frozen.load(Ordering::SeqCst) {
                        // Swallow it and every later byte: the connection hangs.
                        while let Ok(1..) = cr.read(&mut buf).await {}
                        return;
                    }
                    if sw.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    let Ok(m @ 1..) = sr.read(&mut back).await else {
                        return;
                    };
                    if cw.write_all(&back[..m]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_plc_that_stops_answering_times_out_into_comm_failure_and_writes_time_out() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let frozen = Arc::new(AtomicBool::new(false));
    let forwarded = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (proxy, proxy_task) = freezable_proxy(addr, Arc::clone(&frozen), forwarded).await;
    let mut config = config_for(&mapping, proxy);
    // One poll at connect, the next far away: the write below meets an idle link.
    config.poll_interval_ms = 60_000;
    config.timeout_ms = 300;
    let mut run = start(config);
    run.event(|k| matches!(k, AdapterEventKind::Connected { .. }))
        .await;
    let sink = Arc::clone(&run.sink);
    wait_until("the first poll", || sink.count() >= 1).await;
    frozen.store(true, Ordering::SeqCst);
    let press = AssetPath::parse(PRESS).expect("valid");
    let err = run
        .handle
        .write(WriteRequest {
            asset: press,
            property: "speed_setpoint_pct".into(),
            value: Value::Int(120),
            by: "operator-7".into(),
        })
        .await
        .expect_err("no answer");
    assert_eq!(
        err,
        WriteError::Timeout {
            connection: "line-1-plc".into(),
            timeout_ms: 300
        }
    );
    run.event(|k| matches!(k, AdapterEventKind::Disconnected { .. }))
        .await;
    wait_until("CommFailure readings of the last values", || {
        let b = sink.batches();
        b.len() >= 2
            && b[1].len() == b[0].len()
            && b[1].iter().zip(&b[0]).all(|(bad, last)| {
                bad.quality == Quality::bad(QualityReason::CommFailure) && bad.value == last.value
            })
    })
    .await;
    frozen.store(false, Ordering::SeqCst);
    run.event(|k| matches!(k, AdapterEventKind::Connected { .. }))
        .await;
    wait_until("good values again", || {
        sink.batches()
            .last()
            .is_some_and(|b| b.iter().all(|r| r.quality.is_good()))
    })
    .await;
    run.stop().await;
    proxy_task.abort();
    stepper.abort();
}

/// Refuses every batch while `closed`.
struct GateSink {
    closed: std::sync::atomic::AtomicBool,
    inner: BatchSink,
}

impl IngestSink for GateSink {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        if self.closed.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(PushBack {
                batch,
                why: PushBackReason::Busy,
            });
        }
        self.inner.try_push(batch)
    }
}

#[tokio::test]
async fn while_the_sink_pushes_back_the_plc_is_not_read_and_nothing_is_lost() {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let forwarded = Arc::new(AtomicUsize::new(0));
    let (proxy, proxy_task) = freezable_proxy(
        addr,
        Arc::new(AtomicBool::new(false)),
        Arc::clone(&forwarded),
    )
    .await;
    let config = config_for(&mapping, proxy);
    let sink = Arc::new(GateSink {
        closed: AtomicBool::new(true),
        inner: BatchSink::default(),
    });
    let (tx, mut events) = mpsc::channel(64);
    let token = CancellationToken::new();
    let mut handle = ferrotwin_adapters::start(
        ConnectionConfig::Modbus(config),
        Arc::clone(&sink) as Arc<dyn IngestSink>,
        tx,
        token.clone(),
    )
    .expect("valid");
    let connected = tokio::time::timeout(WAIT, events.recv())
        .await
        .expect("an event")
        .expect("running");
    assert!(matches!(connected.kind, AdapterEventKind::Connected { .. }));
    wait_until("the first poll", || forwarded.load(Ordering::SeqCst) >= 1).await;
    // Ten poll intervals of push-back: the one poll's batch waits, no request goes out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = forwarded.load(Ordering::SeqCst);
    assert!(
        during <= 4,
        "{during} requests while pushed back (one poll's groups)"
    );
    assert_eq!(sink.inner.count(), 0);
    sink.closed.store(false, Ordering::SeqCst);
    wait_until("polling resumes", || sink.inner.count() >= 3).await;
    let first = sink.inner.batches().remove(0);
    assert!(!first.is_empty() && first.iter().all(|r| r.quality.is_good()));
    assert!(
        handle.status().snapshot().overruns >= 1,
        "the held poll overran"
    );
    token.cancel();
    if let Some(join) = handle.take_join() {
        let _ = join.await;
    }
    proxy_task.abort();
    stepper.abort();
}

#[tokio::test]
async fn values_outside_min_max_read_uncertain_and_still_arrive() {
    let (plant, mapping, addr) = served(WordOrder::BigEndian).await;
    let stepper = step_in_background(Arc::clone(&plant));
    let mut config = config_for(&mapping, addr);
    let sensor = first_sensor_of_press(&mapping);
    let tag = config
        .tags
        .iter_mut()
        .find(|t| t.asset == sensor && t.property == "value")
        .expect("imported");
    // Below any value the sensor reads once the simulation runs.
    tag.max = Some(-1e6);
    let run = start(config);
    let sink = Arc::clone(&run.sink);
    wait_until("an out-of-range reading", || {
        sink.of(id(&sensor), Property::Value)
            .iter()
            .any(|r| r.quality == Quality::uncertain(QualityReason::OutOfRange))
    })
    .await;
    let last = sink.batches().pop().expect("polled");
    assert!(
        last.iter()
            .filter(|r| r.asset != id(&sensor))
            .all(|r| r.quality.is_good())
    );
    run.stop().await;
    stepper.abort();
}
