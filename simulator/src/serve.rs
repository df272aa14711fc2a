//! `ferrotwin-sim serve`: the plant on Modbus TCP, OPC UA and MQTT. One `modbus::serve_line`
//! server per line and one OPC UA server per site (`opcua`) on 127.0.0.1 (ports chosen by the
//! OS), a simulation stepped in real time whose readings update the register images and the
//! OPC UA variables and are published as JSON on MQTT (`mqtt`: to the broker given, or to an
//! embedded one), and setpoints written by clients applied to the machines.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetId, AssetPath, Reading, Timestamp};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::mapping::{Mapping, MappingError};
use crate::modbus::{LineMapError, LineRegisters, serve_line};
use crate::model::PlantSim;
use crate::mqtt::{EmbeddedBroker, MqttError, MqttPublisher, Topics, parse_endpoint};
use crate::opcua::{OpcUaError, OpcUaPlant};

/// Wall-clock time between simulation steps: registers are at most this stale.
pub const STEP_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}: cannot read the plant spec", .file.display())]
    ReadPlant {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Plant(#[from] ferrotwin_models::spec::SpecError),
    #[error(transparent)]
    Mapping(#[from] MappingError),
    #[error(transparent)]
    LineMap(#[from] LineMapError),
    #[error("line {line}: cannot bind a Modbus server on 127.0.0.1")]
    Bind {
        line: String,
        #[source]
        source: io::Error,
    },
    #[error("{}: cannot write the endpoints", .file.display())]
    WriteEndpoints {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("speed {0} is not a finite number > 0")]
    Speed(f64),
    #[error(transparent)]
    Mqtt(#[from] MqttError),
    #[error(transparent)]
    OpcUa(#[from] OpcUaError),
    #[error("a Modbus server stopped accepting connections")]
    ServerEnded {
        #[source]
        source: io::Error,
    },
}

/// Speed setpoints written over any protocol other than Modbus (whose register images keep
/// their own), applied at the next step. Coalesced to the latest per machine, so bounded by
/// the number of machines however fast clients write.
#[derive(Debug, Clone, Default)]
pub struct SetpointInbox(Arc<std::sync::Mutex<std::collections::BTreeMap<AssetId, u16>>>);

impl SetpointInbox {
    /// Records `pct` for `machine`; the simulation checks the machine and the range when it
    /// applies it (`PlantSim::set_speed_pct`).
    pub fn write(&self, machine: AssetId, pct: u16) {
        self.0
            .lock()
            .expect("setpoint lock is never poisoned")
            .insert(machine, pct);
    }

    fn take(&self) -> std::collections::BTreeMap<AssetId, u16> {
        std::mem::take(&mut *self.0.lock().expect("setpoint lock is never poisoned"))
    }
}

/// One line's PLC being served.
pub struct ServedLine {
    pub line: String,
    pub addr: SocketAddr,
    pub registers: Arc<LineRegisters>,
}

/// A simulated plant with a Modbus server per line. Dropping it stops the servers.
pub struct ServedPlant {
    sim: PlantSim,
    lines: Vec<ServedLine>,
    /// Which line serves an asset's readings.
    line_of: HashMap<AssetId, usize>,
    readings: Vec<Reading>,
    per_line: Vec<Vec<Reading>>,
    servers: JoinSet<io::Result<()>>,
    mqtt: Option<MqttOut>,
    opcua: Option<OpcUaPlant>,
    setpoints: SetpointInbox,
}

/// Where the plant's readings go on MQTT.
struct MqttOut {
    endpoint: String,
    publisher: MqttPublisher,
    topics: Topics,
}

pub fn load_plant(dir: &Path) -> Result<PlantSpec, ServeError> {
    let file = dir.join("plant.toml");
    let text = std::fs::read_to_string(&file).map_err(|source| ServeError::ReadPlant {
        file: file.clone(),
        source,
    })?;
    Ok(PlantSpec::from_toml(&text, &file.display().to_string())?)
}

impl ServedPlant {
    /// Binds and starts one server per line of `spec` (on a tokio runtime), the simulation at
    /// `start` with `seed`.
    pub async fn start(
        spec: &PlantSpec,
        seed: u64,
        start: Timestamp,
    ) -> Result<ServedPlant, ServeError> {
        let mapping = Mapping::of(spec)?;
        let mut lines = Vec::new();
        let mut line_of = HashMap::new();
        let mut servers = JoinSet::new();
        for (i, map) in mapping.lines.iter().enumerate() {
            let registers = Arc::new(LineRegisters::new(map)?);
            for t in &map.tags {
                let id = AssetPath::parse(&t.asset)
                    .expect("LineRegisters::new checked the paths")
                    .id();
                line_of.insert(id, i);
            }
            let listener =
                TcpListener::bind("127.0.0.1:0")
                    .await
                    .map_err(|source| ServeError::Bind {
                        line: map.line.clone(),
                        source,
                    })?;
            let addr = listener.local_addr().map_err(|source| ServeError::Bind {
                line: map.line.clone(),
                source,
            })?;
            servers.spawn(serve_line(listener, Arc::clone(&registers)));
            lines.push(ServedLine {
                line: map.line.clone(),
                addr,
                registers,
            });
        }
        // The images hold zeros until the first `step_to` (`run_realtime` takes it at once).
        Ok(ServedPlant {
            sim: PlantSim::new(spec, seed, start),
            per_line: (0..lines.len()).map(|_| Vec::new()).collect(),
            lines,
            line_of,
            readings: Vec::new(),
            servers,
            mqtt: None,
            opcua: None,
            setpoints: SetpointInbox::default(),
        })
    }

    pub fn lines(&self) -> &[ServedLine] {
        &self.lines
    }

    pub fn sim(&self) -> &PlantSim {
        &self.sim
    }

    /// Where OPC UA and MQTT servers put the setpoints their clients write.
    pub fn setpoints(&self) -> SetpointInbox {
        self.setpoints.clone()
    }

    /// From now on `run_realtime` publishes every step's readings with `publisher` (connected
    /// to `endpoint`, which `endpoints_toml` lists).
    pub fn publish_mqtt(&mut self, spec: &PlantSpec, endpoint: String, publisher: MqttPublisher) {
        self.mqtt = Some(MqttOut {
            endpoint,
            publisher,
            topics: Topics::of(spec),
        });
    }

    /// Starts an OPC UA server per site of `spec` (the plant this was started with); from the
    /// next `step_to` on they serve its readings, and their setpoint writes are applied.
    pub async fn serve_opcua(&mut self, spec: &PlantSpec) -> Result<(), ServeError> {
        self.serve_opcua_on(spec, &[]).await
    }

    /// `serve_opcua` with the servers bound to `addrs` (`OpcUaPlant::start_on`), replacing
    /// any running ones.
    pub async fn serve_opcua_on(
        &mut self,
        spec: &PlantSpec,
        addrs: &[SocketAddr],
    ) -> Result<(), ServeError> {
        if let Some(old) = self.opcua.take() {
            old.shutdown().await;
        }
        self.opcua = Some(OpcUaPlant::start_on(spec, self.setpoints(), addrs).await?);
        Ok(())
    }

    /// The OPC UA servers, once `serve_opcua` started them.
    pub fn opcua(&self) -> Option<&OpcUaPlant> {
        self.opcua.as_ref()
    }

    pub fn opcua_mut(&mut self) -> Option<&mut OpcUaPlant> {
        self.opcua.as_mut()
    }

    /// `endpoints.toml`: the address of each line's server, each site's OPC UA server and the
    /// MQTT broker's.
    pub fn endpoints_toml(&self) -> String {
        let mut out = String::from("version = 1\n");
        for l in &self.lines {
            let _ = write!(
                out,
                "\n[[modbus]]\nline = {:?}\nendpoint = \"{}\"\n",
                l.line, l.addr
            );
        }
        for s in self.opcua.iter().flat_map(OpcUaPlant::sites) {
            let _ = write!(
                out,
                "\n[[opcua]]\nsite = {:?}\nendpoint = {:?}\n",
                s.site, s.endpoint
            );
        }
        if let Some(m) = &self.mqtt {
            let _ = write!(out, "\n[mqtt]\nendpoint = {:?}\n", m.endpoint);
        }
        out
    }

    /// Applies the setpoints clients wrote, advances the simulation to `t` and writes what it
    /// read into the register images. Returns the readings of the step.
    pub fn step_to(&mut self, t: Timestamp) -> &[Reading] {
        for l in &self.lines {
            for w in l.registers.take_setpoint_writes() {
                self.sim.set_speed_pct(w.machine, w.pct);
            }
        }
        for (machine, pct) in self.setpoints.take() {
            self.sim.set_speed_pct(machine, pct);
        }
        self.readings.clear();
        self.sim.step(t, &mut self.readings);
        for r in &self.readings {
            if let Some(&i) = self.line_of.get(&r.asset) {
                self.per_line[i].push(*r);
            }
        }
        for (l, batch) in self.lines.iter().zip(&mut self.per_line) {
            l.registers.update_from(batch);
            batch.clear();
        }
        if let Some(o) = &mut self.opcua {
            o.update(&self.readings, &self.sim, t);
        }
        &self.readings
    }

    /// Steps the simulation every `STEP_INTERVAL`, simulated time running `speed` times as
    /// fast as the wall clock, until `shutdown` completes or a server fails. With MQTT, each
    /// step's readings are published before the next step: a broker that cannot keep up slows
    /// the steps down (the registers then update less often) rather than filling memory.
    pub async fn run_realtime(
        &mut self,
        speed: f64,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        if !(speed.is_finite() && speed > 0.0) {
            return Err(ServeError::Speed(speed));
        }
        let wall_start = tokio::time::Instant::now();
        let sim_start = self.sim.now();
        let mut tick = tokio::time::interval(STEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    let micros = wall_start.elapsed().as_micros() as f64 * speed;
                    self.step_to(Timestamp(sim_start.0.saturating_add(micros as i64)));
                    if let Some(m) = &self.mqtt {
                        tokio::select! {
                            () = &mut shutdown => break,
                            sent = m.publisher.publish(&self.readings, &m.topics) => {
                                sent?;
                            }
                        }
                    }
                }
                Some(ended) = self.servers.join_next() => {
                    // A server only ends when accepting fails: the PLC is gone.
                    let source = match ended {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => io::Error::other("server ended"),
                        Err(e) => io::Error::other(e),
                    };
                    return Err(ServeError::ServerEnded { source });
                }
            }
        }
        if let Some(m) = self.mqtt.take() {
            m.publisher.disconnect().await;
        }
        Ok(())
    }
}

/// What `ferrotwin-sim serve` does: loads DIR/plant.toml, starts the servers, connects to the
/// MQTT broker at `mqtt` (`HOST:PORT`) or, without one, starts an embedded broker on
/// 127.0.0.1, prints `modbus <line> <addr>` per line, `opcua <site> <endpoint>` per site and
/// `mqtt <addr>`, writes the same to DIR/endpoints.toml, runs until `shutdown`.
pub async fn serve(
    plant_dir: &Path,
    speed: f64,
    seed: u64,
    mqtt: Option<&str>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(ServeError::Speed(speed));
    }
    let spec = load_plant(plant_dir)?;
    // Wall-clock time: a runtime fed by these servers takes the source timestamps as they
    // are (at `--speed` above 1 they run ahead of the clock, and a runtime rejects readings
    // further ahead than its allowed skew).
    let mut plant = ServedPlant::start(&spec, seed, wall_clock_now()).await?;
    plant.serve_opcua(&spec).await?;
    // The embedded broker runs until the process exits (rumqttd has no shutdown).
    let (host, port) = match mqtt {
        Some(endpoint) => parse_endpoint(endpoint)?,
        None => {
            let broker = EmbeddedBroker::start()?;
            (broker.addr().ip().to_string(), broker.addr().port())
        }
    };
    let client_id = format!("ferrotwin-sim-{}-{seed}", std::process::id());
    let publisher = MqttPublisher::connect(&host, port, &client_id).await?;
    let endpoint = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    for l in plant.lines() {
        println!("modbus {} {}", l.line, l.addr);
    }
    for s in plant.opcua().iter().flat_map(|o| o.sites()) {
        println!("opcua {} {}", s.site, s.endpoint);
    }
    println!("mqtt {endpoint}");
    plant.publish_mqtt(&spec, endpoint, publisher);
    let file = plant_dir.join("endpoints.toml");
    std::fs::write(&file, plant.endpoints_toml())
        .map_err(|source| ServeError::WriteEndpoints { file, source })?;
    plant.run_realtime(speed, shutdown).await
}

/// Now, from the system clock (the simulation itself reads no clock).
pub fn wall_clock_now() -> Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    Timestamp(i64::try_from(micros).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use ferrotwin_models::{Property, Value};
    use tokio_modbus::ExceptionCode;
    use tokio_modbus::client::{Context, Reader, Writer};

    use super::*;
    use crate::generate::{PlantSize, generate};
    use crate::mapping::{RegisterKind, SPEED_SETPOINT, TagMap};
    use crate::modbus::{decode_f32, decode_u32};
    use crate::run::RUN_START;

    /// One line of three machines (a press, a conveyor, an oven).
    fn line_plant() -> PlantSpec {
        generate(PlantSize::ONE_LINE, 1)
    }

    async fn started() -> (ServedPlant, Mapping, Context) {
        let spec = line_plant();
        let plant = ServedPlant::start(&spec, 5, RUN_START)
            .await
            .expect("servers start");
        let client = tokio_modbus::client::tcp::connect(plant.lines()[0].addr)
            .await
            .expect("connects");
        (plant, Mapping::of(&spec).expect("fits"), client)
    }

    fn find<'a>(m: &'a Mapping, asset_ends: &str, property: &str) -> &'a TagMap {
        m.lines[0]
            .tags
            .iter()
            .find(|t| t.asset.ends_with(asset_ends) && t.property == property)
            .expect("tag in the mapping")
    }

    /// The last value of `property` of the asset at `path` in `readings`.
    fn last(readings: &[Reading], path: &str, property: Property) -> Option<Value> {
        let id = AssetPath::parse(path).expect("valid").id();
        readings
            .iter()
            .rev()
            .find(|r| r.asset == id && r.property == property)
            .map(|r| r.value)
    }

    #[tokio::test]
    async fn client_reads_state_and_sensor_float_the_simulation_produced() {
        let (mut plant, mapping, mut client) = started().await;
        let state_tag = find(&mapping, "press-1", "state");
        let temp_tag = mapping.lines[0]
            .tags
            .iter()
            .find(|t| t.property == "value" && t.asset.starts_with(&state_tag.asset))
            .expect("the press has sensors")
            .clone();
        let mut all = Vec::new();
        for s in 0..=5 {
            all.extend_from_slice(plant.step_to(RUN_START.plus_ms(s * 1000)));
        }
        let state = client
            .read_holding_registers(state_tag.address, 1)
            .await
            .expect("transport")
            .expect("no exception");
        let expected = last(&all, &state_tag.asset, Property::State).expect("state reported");
        assert_eq!(Value::Int(i64::from(state[0])), expected);
        let words = client
            .read_input_registers(temp_tag.address, 2)
            .await
            .expect("transport")
            .expect("no exception");
        let got = decode_f32([words[0], words[1]]);
        let expected = last(&all, &temp_tag.asset, Property::Value).expect("sensor sampled");
        assert_eq!(got, expected.as_f64() as f32);
        assert!(got != 0.0, "a real value, not the empty image");
        // Values move: after another minute the float is the newest sample's.
        let later = plant.step_to(RUN_START.plus_ms(65_000)).to_vec();
        let words = client
            .read_input_registers(temp_tag.address, 2)
            .await
            .expect("transport")
            .expect("no exception");
        let newest = last(&later, &temp_tag.asset, Property::Value).expect("sampled");
        assert_eq!(decode_f32([words[0], words[1]]), newest.as_f64() as f32);
        // Counters decode as u32, high word first.
        let good = find(&mapping, "press-1", "good_count");
        let words = client
            .read_input_registers(good.address, 2)
            .await
            .expect("transport")
            .expect("no exception");
        let mut everything = all;
        everything.extend(later);
        let expected = last(&everything, &good.asset, Property::GoodCount).expect("counted");
        assert_eq!(
            Value::Int(i64::from(decode_u32([words[0], words[1]]))),
            expected
        );
    }

    #[tokio::test]
    async fn out_of_range_read_is_illegal_data_address_and_the_server_keeps_serving() {
        let (plant, _, mut client) = started().await;
        let line = &plant.lines()[0];
        let inputs = {
            let m = Mapping::of(&line_plant()).expect("fits");
            m.lines[0].input_registers as u16
        };
        let err = client
            .read_input_registers(inputs - 1, 2)
            .await
            .expect("transport");
        assert_eq!(err, Err(ExceptionCode::IllegalDataAddress));
        let err = client
            .read_holding_registers(60_000, 1)
            .await
            .expect("transport");
        assert_eq!(err, Err(ExceptionCode::IllegalDataAddress));
        let err = client.read_input_registers(0, 0).await.expect("transport");
        assert_eq!(err, Err(ExceptionCode::IllegalDataValue));
        // Same connection, and a second client, still served.
        let ok = client
            .read_input_registers(0, inputs)
            .await
            .expect("transport");
        assert_eq!(ok.map(|w| w.len()), Ok(usize::from(inputs)));
        let mut other = tokio_modbus::client::tcp::connect(line.addr)
            .await
            .expect("connects");
        assert!(
            other
                .read_holding_registers(0, 2)
                .await
                .expect("transport")
                .is_ok()
        );
    }

    #[tokio::test]
    async fn unserved_functions_are_illegal_function() {
        let (_plant, _, mut client) = started().await;
        assert_eq!(
            client.read_coils(0, 1).await.expect("transport"),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            client.write_single_coil(0, true).await.expect("transport"),
            Err(ExceptionCode::IllegalFunction)
        );
        assert!(
            client
                .read_holding_registers(0, 1)
                .await
                .expect("transport")
                .is_ok()
        );
    }

    #[tokio::test]
    async fn setpoint_write_speeds_the_machine_up_and_bad_writes_are_refused() {
        let (mut plant, mapping, mut client) = started().await;
        let press = find(&mapping, "press-1", "state").asset.clone();
        let setpoint = find(&mapping, "press-1", SPEED_SETPOINT);
        let state = find(&mapping, "press-1", "state");
        assert_eq!(setpoint.register, RegisterKind::Holding);
        assert_eq!(
            client
                .read_holding_registers(setpoint.address, 1)
                .await
                .expect("transport"),
            Ok(vec![100])
        );
        assert_eq!(
            client
                .write_single_register(setpoint.address, 999)
                .await
                .expect("transport"),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            client
                .write_single_register(state.address, 1)
                .await
                .expect("transport"),
            Err(ExceptionCode::IllegalDataValue)
        );
        // All or nothing: the state register in the range refuses the whole write.
        assert_eq!(
            client
                .write_multiple_registers(state.address, &[0, 150])
                .await
                .expect("transport"),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            client
                .write_single_register(60_000, 100)
                .await
                .expect("transport"),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            client
                .read_holding_registers(setpoint.address, 1)
                .await
                .expect("transport"),
            Ok(vec![100])
        );
        assert_eq!(
            client
                .write_multiple_registers(setpoint.address, &[200])
                .await
                .expect("transport"),
            Ok(())
        );
        assert_eq!(
            client
                .read_holding_registers(setpoint.address, 1)
                .await
                .expect("transport"),
            Ok(vec![200])
        );
        // The same plant and seed without the write, for comparison.
        let mut nominal = ServedPlant::start(&line_plant(), 5, RUN_START)
            .await
            .expect("starts");
        let parts = |p: &mut ServedPlant| {
            let mut all = Vec::new();
            for s in 0..=4 * 3600 {
                all.extend_from_slice(p.step_to(RUN_START.plus_ms(s * 1000)));
            }
            let n = |prop| match last(&all, &press, prop) {
                Some(Value::Int(n)) => n,
                _ => 0,
            };
            n(Property::GoodCount) + n(Property::ScrapCount)
        };
        let fast = parts(&mut plant);
        let slow = parts(&mut nominal);
        assert!(slow > 100, "the press makes parts: {slow}");
        assert!(
            fast * 10 > slow * 17,
            "200 % makes ~2x the parts: {fast} vs {slow}"
        );
    }

    #[tokio::test]
    async fn endpoints_toml_lists_every_line_with_its_port() {
        let plant = ServedPlant::start(&line_plant(), 1, RUN_START)
            .await
            .expect("starts");
        let text = plant.endpoints_toml();
        let value: toml::Value = toml::from_str(&text).expect("valid TOML");
        let entries = value["modbus"].as_array().expect("array");
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0]["endpoint"].as_str(),
            Some(plant.lines()[0].addr.to_string().as_str())
        );
        assert_ne!(plant.lines()[0].addr.port(), 0);
    }

    /// The three-machine plant in DIR/plant.toml.
    fn plant_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("plant.toml"), line_plant().to_toml()).expect("written");
        dir
    }

    /// DIR/endpoints.toml, parsed.
    fn endpoints(dir: &Path) -> toml::Value {
        let text = std::fs::read_to_string(dir.join("endpoints.toml")).expect("written");
        toml::from_str(&text).expect("valid TOML")
    }

    /// Subscribes to `acme/#` at `endpoint` and returns the first message: (topic, payload).
    async fn first_message(endpoint: &str) -> (String, Vec<u8>) {
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let (host, port) = crate::mqtt::parse_endpoint(endpoint).expect("HOST:PORT");
        let (client, mut eventloop) =
            AsyncClient::new(MqttOptions::new("serve-test-sub", host, port), 10);
        client
            .subscribe("acme/#", QoS::AtLeastOnce)
            .await
            .expect("queued");
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Event::Incoming(Packet::Publish(p)) =
                    eventloop.poll().await.expect("subscriber connected")
                {
                    return (p.topic.clone(), p.payload.to_vec());
                }
            }
        })
        .await
        .expect("a message within 10 s")
    }

    /// Runs `serve` at 60x until a subscriber at the MQTT endpoint of endpoints.toml received
    /// a message; returns the endpoint, the message and the file.
    async fn serve_until_a_message(mqtt: Option<&str>) -> (String, (String, Vec<u8>), toml::Value) {
        let dir = plant_dir();
        let mut got = None;
        let run = serve(dir.path(), 60.0, 1, mqtt, async {
            // The file is written before the shutdown future is first polled.
            let file = endpoints(dir.path());
            let endpoint = file["mqtt"]["endpoint"]
                .as_str()
                .expect("an MQTT endpoint")
                .to_string();
            let message = first_message(&endpoint).await;
            got = Some((endpoint, message, file));
        });
        tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .expect("within 20 s")
            .expect("serves");
        got.expect("a message arrived")
    }

    fn assert_a_reading(topic: &str, payload: &[u8]) {
        assert!(topic.starts_with("acme/berlin/"), "{topic}");
        let depth = topic.split('/').count();
        assert!(depth == 6, "a sensor or machine property topic: {topic}");
        let json: serde_json::Value = serde_json::from_slice(payload).expect("JSON");
        assert!(
            json["value"].is_number() || json["value"].is_boolean(),
            "{json}"
        );
        assert!(json["ts_us"].as_i64().expect("ts_us") >= RUN_START.as_micros());
        assert_eq!(json["quality"], "good");
    }

    #[tokio::test]
    async fn serve_without_mqtt_starts_an_embedded_broker_and_publishes_to_it() {
        let (endpoint, (topic, payload), file) = serve_until_a_message(None).await;
        assert!(endpoint.starts_with("127.0.0.1:"), "{endpoint}");
        assert_eq!(file["modbus"].as_array().map(Vec::len), Some(1));
        assert_eq!(file["opcua"].as_array().map(Vec::len), Some(1));
        assert_a_reading(&topic, &payload);
    }

    #[tokio::test]
    async fn serve_with_mqtt_publishes_to_that_broker() {
        let broker = crate::mqtt::EmbeddedBroker::start().expect("broker starts");
        let addr = broker.addr().to_string();
        let (endpoint, (topic, payload), file) = serve_until_a_message(Some(&addr)).await;
        assert_eq!(endpoint, addr);
        assert_eq!(file["modbus"].as_array().map(Vec::len), Some(1));
        assert_eq!(file["opcua"].as_array().map(Vec::len), Some(1));
        assert_a_reading(&topic, &payload);
    }

    #[tokio::test]
    async fn serve_with_an_unreachable_mqtt_broker_fails() {
        let dir = plant_dir();
        let err = serve(dir.path(), 1.0, 1, Some("127.0.0.1:1"), async {})
            .await
            .expect_err("nothing listens on port 1");
        assert!(matches!(err, ServeError::Mqtt(_)), "{err}");
        let err = serve(dir.path(), 1.0, 1, Some("no-port"), async {})
            .await
            .expect_err("not HOST:PORT");
        assert!(matches!(err, ServeError::Mqtt(_)), "{err}");
    }

    #[tokio::test]
    async fn serve_without_a_plant_names_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = serve(dir.path(), 1.0, 1, None, async {})
            .await
            .expect_err("no plant");
        assert!(matches!(err, ServeError::ReadPlant { .. }));
        let err = serve(dir.path(), 0.0, 1, None, async {})
            .await
            .expect_err("bad speed");
        assert!(matches!(err, ServeError::Speed(_)));
    }
}
