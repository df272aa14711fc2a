//! `ferrotwin-sim serve`: the plant on Modbus TCP, OPC UA and MQTT. One `modbus::serve_line`
//! server per line and one OPC UA server per site (`opcua`) on 127.0.0.1 (ports chosen by the
//! OS), a simulation stepped in real time whose readings update the register images and the
//! OPC UA variables and are published on MQTT as JSON (`mqtt`) and Sparkplug B (`sparkplug`),
//! to the broker given or to an embedded one, and setpoints written by clients (Modbus
//! registers, OPC UA writes, JSON commands, Sparkplug DCMDs) applied to the machines.

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

use crate::mapping::{Mapping, MappingError, WordOrder};
use crate::modbus::{LineMapError, LineRegisters, serve_line};
use crate::model::PlantSim;
use crate::mqtt::{
    CommandStats, EmbeddedBroker, INBOUND_QUEUE, Inbound, MqttError, MqttPublisher,
    SPEED_COMMAND_FILTER, Session, Topics, parse_endpoint, parse_json_command,
};
use crate::opcua::{OpcUaError, OpcUaPlant};
use crate::sparkplug::{Command, CommandRoute, SparkplugOut};

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

/// Which MQTT payloads `serve` publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MqttFormat {
    /// JSON on ISA-95 topics.
    Json,
    /// Sparkplug B, one edge node per line.
    Sparkplug,
    /// Both, side by side.
    Both,
}

impl MqttFormat {
    fn json(self) -> bool {
        matches!(self, MqttFormat::Json | MqttFormat::Both)
    }

    fn sparkplug(self) -> bool {
        matches!(self, MqttFormat::Sparkplug | MqttFormat::Both)
    }
}

/// Client number of the JSON publisher on the inbound channel; Sparkplug nodes follow.
const JSON_CLIENT: usize = 0;

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
    /// The line's server task; `None` while the PLC is off the network (`stop_line`).
    server: Option<tokio::task::AbortHandle>,
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
    sparkplug: Option<SparkplugOut>,
    /// Commands from MQTT clients (JSON and Sparkplug), bounded by `INBOUND_QUEUE`.
    inbound_tx: tokio::sync::mpsc::Sender<Inbound>,
    inbound: tokio::sync::mpsc::Receiver<Inbound>,
    commands: Arc<CommandStats>,
    /// Machine path → id, for JSON commands.
    machines: HashMap<String, AssetId>,
    opcua: Option<OpcUaPlant>,
    setpoints: SetpointInbox,
    /// The latest reading of every (asset, property) served: what a late subscriber (a
    /// Sparkplug birth) reports.
    latest: HashMap<(AssetId, ferrotwin_models::Property), Reading>,
    /// The broker when only Sparkplug B is published (JSON's `MqttOut` names it otherwise).
    mqtt_endpoint: Option<String>,
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
        ServedPlant::start_with_word_order(spec, seed, start, WordOrder::BigEndian).await
    }

    /// As `start`, every 32-bit value served with `order` (for testing adapters against a
    /// low-word-first PLC; `Mapping::of(spec)` with `set_word_order(order)` describes it).
    pub async fn start_with_word_order(
        spec: &PlantSpec,
        seed: u64,
        start: Timestamp,
        order: WordOrder,
    ) -> Result<ServedPlant, ServeError> {
        let sim = PlantSim::new(spec, seed, start);
        ServedPlant::start_sim(spec, sim, start, order).await
    }

    /// As `start`, the faults of `scenario` happening at their times after `start`.
    pub async fn start_with_scenario(
        spec: &PlantSpec,
        seed: u64,
        start: Timestamp,
        scenario: &crate::scenario::Scenario,
    ) -> Result<ServedPlant, ServeError> {
        let sim = PlantSim::with_scenario(spec, seed, start, scenario);
        ServedPlant::start_sim(spec, sim, start, WordOrder::BigEndian).await
    }

    async fn start_sim(
        spec: &PlantSpec,
        sim: PlantSim,
        start: Timestamp,
        order: WordOrder,
    ) -> Result<ServedPlant, ServeError> {
        let mut mapping = Mapping::of(spec)?;
        mapping.set_word_order(order);
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
            let server = servers.spawn(serve_line(listener, Arc::clone(&registers)));
            lines.push(ServedLine {
                line: map.line.clone(),
                addr,
                registers,
                server: Some(server),
            });
        }
        let machines = spec
            .assets()
            .into_iter()
            .filter(|a| matches!(a.kind, ferrotwin_models::spec::AssetKind::Machine { .. }))
            .map(|a| (a.path.as_str().to_string(), a.path.id()))
            .collect();
        let (inbound_tx, inbound) = tokio::sync::mpsc::channel(INBOUND_QUEUE);
        // The first step fills the images before anyone can connect and read zeros.
        let mut plant = ServedPlant {
            sparkplug: None,
            inbound_tx,
            inbound,
            commands: Arc::default(),
            machines,
            mqtt_endpoint: None,
            sim,
            per_line: (0..lines.len()).map(|_| Vec::new()).collect(),
            lines,
            line_of,
            readings: Vec::new(),
            servers,
            mqtt: None,
            opcua: None,
            setpoints: SetpointInbox::default(),
            latest: HashMap::new(),
        };
        plant.step_to(start);
        Ok(plant)
    }

    pub fn lines(&self) -> &[ServedLine] {
        &self.lines
    }

    /// Takes line `i`'s PLC off the network, as a cut cable or a powered-down PLC would: its
    /// server and open connections end; the simulation goes on. False if there is no such
    /// line or it is already off.
    pub fn stop_line(&mut self, i: usize) -> bool {
        match self.lines.get_mut(i).and_then(|l| l.server.take()) {
            Some(server) => {
                server.abort();
                true
            }
            None => false,
        }
    }

    /// Puts line `i`'s PLC back on its address (waiting up to 10 s while the OS still holds
    /// the port) with the register image it had.
    pub async fn restart_line(&mut self, i: usize) -> Result<(), ServeError> {
        let Some(l) = self.lines.get_mut(i) else {
            return Ok(());
        };
        if l.server.is_some() {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(l.addr).await {
                Ok(listener) => break listener,
                Err(source) if tokio::time::Instant::now() > deadline => {
                    return Err(ServeError::Bind {
                        line: l.line.clone(),
                        source,
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        l.server = Some(
            self.servers
                .spawn(serve_line(listener, Arc::clone(&l.registers))),
        );
        Ok(())
    }

    pub fn sim(&self) -> &PlantSim {
        &self.sim
    }

    /// The readings of the latest step (the first is taken by `start`).
    pub fn last_step(&self) -> &[Reading] {
        &self.readings
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

    /// Connects to the MQTT broker at `host:port` and, from now on, publishes in `format`
    /// (`endpoint` is what `endpoints_toml` lists): JSON through a client subscribed to the
    /// JSON speed commands, Sparkplug B through one client per line, births sent here.
    pub async fn connect_mqtt(
        &mut self,
        spec: &PlantSpec,
        host: &str,
        port: u16,
        client_prefix: &str,
        format: MqttFormat,
    ) -> Result<(), MqttError> {
        let endpoint = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        if format.json() {
            let session = Session {
                will: None,
                subscriptions: vec![SPEED_COMMAND_FILTER.to_string()],
                inbound: Some((JSON_CLIENT, self.inbound_tx.clone(), self.commands.clone())),
            };
            let publisher =
                MqttPublisher::connect_with(host, port, &format!("{client_prefix}-json"), session)
                    .await?;
            self.publish_mqtt(spec, endpoint.clone(), publisher);
        }
        if format.sparkplug() {
            let now = self.sim.now();
            let mut out = SparkplugOut::connect(
                spec,
                host,
                port,
                client_prefix,
                now,
                CommandRoute {
                    first_client: JSON_CLIENT + 1,
                    inbound: self.inbound_tx.clone(),
                    stats: self.commands.clone(),
                },
            )
            .await?;
            // Births report every value served so far (a machine's state is only read when
            // it changes).
            out.remember(self.latest.values());
            let sim = &self.sim;
            out.birth_all(now, |m| sim.speed_pct(m)).await?;
            self.sparkplug = Some(out);
            if self.mqtt.is_none() {
                self.mqtt_endpoint = Some(endpoint);
            }
        }
        Ok(())
    }

    /// Counts of the commands MQTT clients sent.
    pub fn command_stats(&self) -> Arc<CommandStats> {
        Arc::clone(&self.commands)
    }

    /// The Sparkplug naming of this plant, when publishing Sparkplug B.
    pub fn sparkplug_layout(&self) -> Option<&crate::sparkplug::Layout> {
        self.sparkplug.as_ref().map(SparkplugOut::layout)
    }

    /// Handles one command or reconnection from an MQTT client; bad commands are counted and
    /// logged, never fatal.
    async fn handle_inbound(&mut self, msg: Inbound) -> Result<(), MqttError> {
        let now = self.sim.now();
        match msg {
            Inbound::Message {
                client: JSON_CLIENT,
                topic,
                payload,
            } => match parse_json_command(&topic, &payload, &self.machines) {
                Ok((machine, pct)) => {
                    self.setpoints.write(machine, pct);
                    CommandStats::count(&self.commands.applied);
                }
                Err(e) => {
                    CommandStats::count(&self.commands.rejected);
                    eprintln!("mqtt command refused: {e}");
                }
            },
            Inbound::Message {
                client,
                topic,
                payload,
            } => {
                let Some(out) = self.sparkplug.as_mut() else {
                    return Ok(());
                };
                let Some(node) = out.node_of_client(client) else {
                    return Ok(());
                };
                match out.command(node, &topic, &payload) {
                    Ok(Command::Rebirth { node }) => {
                        let sim = &self.sim;
                        out.birth(node, now, |m| sim.speed_pct(m)).await?;
                        CommandStats::count(&self.commands.applied);
                    }
                    Ok(Command::Speed { machine, pct }) => {
                        self.setpoints.write(machine, pct);
                        out.publish_setpoint(machine, pct, now).await?;
                        CommandStats::count(&self.commands.applied);
                    }
                    Err(e) => {
                        CommandStats::count(&self.commands.rejected);
                        eprintln!("sparkplug command refused: {e}");
                    }
                }
            }
            Inbound::Reconnected { client } => {
                if let Some(out) = self.sparkplug.as_mut()
                    && let Some(node) = out.node_of_client(client)
                {
                    // The host may have missed anything since: births again (spec: a node
                    // births on every new connection).
                    let sim = &self.sim;
                    out.birth(node, now, |m| sim.speed_pct(m)).await?;
                }
            }
        }
        Ok(())
    }

    /// Publishes `readings` in every format connected (JSON, Sparkplug DDATA).
    async fn publish_step(&mut self) -> Result<(), MqttError> {
        if let Some(m) = &self.mqtt {
            m.publisher.publish(&self.readings, &m.topics).await?;
        }
        if let Some(out) = self.sparkplug.as_mut() {
            out.publish(&self.readings, self.sim.now()).await?;
        }
        Ok(())
    }

    /// One step driven by the caller instead of `run_realtime`: applies the commands MQTT
    /// clients sent since the last tick, steps to `t`, publishes the step on MQTT. Returns
    /// the step's readings.
    pub async fn tick(&mut self, t: Timestamp) -> Result<&[Reading], ServeError> {
        while let Ok(msg) = self.inbound.try_recv() {
            self.handle_inbound(msg).await?;
        }
        self.step_to(t);
        self.publish_step().await?;
        Ok(&self.readings)
    }

    /// Stops MQTT: Sparkplug DDEATHs and NDEATHs, then every client disconnects.
    pub async fn stop_mqtt(&mut self) {
        if let Some(out) = self.sparkplug.take() {
            out.shutdown(self.sim.now()).await;
        }
        if let Some(m) = self.mqtt.take() {
            m.publisher.disconnect().await;
        }
    }

    /// Drops the MQTT connections without DISCONNECT, as a crash would: the broker publishes
    /// the Sparkplug nodes' Wills (NDEATH).
    pub fn abort_mqtt(&mut self) {
        if let Some(out) = self.sparkplug.take() {
            out.abort();
        }
        if let Some(m) = self.mqtt.take() {
            m.publisher.abort();
        }
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
        let endpoint = self
            .mqtt
            .as_ref()
            .map(|m| &m.endpoint)
            .or(self.mqtt_endpoint.as_ref());
        if let Some(endpoint) = endpoint {
            let _ = write!(out, "\n[mqtt]\nendpoint = {endpoint:?}\n");
            if let Some(out_sp) = &self.sparkplug {
                let mut groups: Vec<&str> = out_sp
                    .layout()
                    .nodes
                    .iter()
                    .map(|n| n.group.as_str())
                    .collect();
                groups.dedup();
                let _ = write!(
                    out,
                    "# Sparkplug B: group id = site path joined with '-', edge node = \
                     <area>-<line>, device = machine\nsparkplug_groups = {groups:?}\n"
                );
                for n in &out_sp.layout().nodes {
                    let _ = write!(
                        out,
                        "\n[[mqtt.sparkplug_nodes]]\ngroup = {:?}\nnode = {:?}\nline = {:?}\n",
                        n.group,
                        n.id,
                        n.line.as_str()
                    );
                }
            }
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
            for w in l.registers.take_run_enable_writes() {
                self.sim.set_run_enable(w.machine, w.enabled);
            }
        }
        for (machine, pct) in self.setpoints.take() {
            self.sim.set_speed_pct(machine, pct);
        }
        self.readings.clear();
        self.sim.step(t, &mut self.readings);
        for r in &self.readings {
            self.latest.insert((r.asset, r.property), *r);
        }
        for r in &self.readings {
            if let Some(&i) = self.line_of.get(&r.asset) {
                self.per_line[i].push(*r);
            }
        }
        for (l, batch) in self.lines.iter().zip(&mut self.per_line) {
            l.registers.update_from(batch);
            batch.clear();
        }
        for status in self.sim.machine_statuses() {
            if let Some(&i) = self.line_of.get(&status.machine) {
                self.lines[i].registers.update_status(&status);
            }
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
        let mut load = StepLoad::default();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                _ = tick.tick() => {
                    let began = std::time::Instant::now();
                    let micros = wall_start.elapsed().as_micros() as f64 * speed;
                    self.step_to(Timestamp(sim_start.0.saturating_add(micros as i64)));
                    tokio::select! {
                        () = &mut shutdown => break,
                        sent = self.publish_step() => sent?,
                    }
                    load.add(began.elapsed(), self.readings.len());
                }
                Some(msg) = self.inbound.recv() => {
                    tokio::select! {
                        () = &mut shutdown => break,
                        done = self.handle_inbound(msg) => done?,
                    }
                }
                Some(ended) = self.servers.join_next() => {
                    // Taken off the network on purpose (`stop_line`).
                    if ended.as_ref().is_err_and(tokio::task::JoinError::is_cancelled) {
                        continue;
                    }
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
        self.stop_mqtt().await;
        eprintln!("{load}");
        Ok(())
    }
}

/// How long `run_realtime`'s steps (simulation, registers, MQTT publishing) took against
/// `STEP_INTERVAL`: the plant is served in real time while steps rarely overrun it. A few
/// counters, printed when serving ends.
#[derive(Debug, Default)]
struct StepLoad {
    steps: u64,
    overruns: u64,
    readings: u64,
    busy: Duration,
    longest: Duration,
}

impl StepLoad {
    fn add(&mut self, took: Duration, readings: usize) {
        self.steps += 1;
        self.readings += readings as u64;
        self.busy += took;
        self.longest = self.longest.max(took);
        if took > STEP_INTERVAL {
            self.overruns += 1;
        }
    }
}

impl std::fmt::Display for StepLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mean_ms = self.busy.as_secs_f64() * 1e3 / self.steps.max(1) as f64;
        write!(
            f,
            "steps: {} of {} ms, {} took longer; mean {mean_ms:.1} ms, longest {:.1} ms; \
             {} readings ({:.0} per second of stepping)",
            self.steps,
            STEP_INTERVAL.as_millis(),
            self.overruns,
            self.longest.as_secs_f64() * 1e3,
            self.readings,
            self.readings as f64 / self.busy.as_secs_f64().max(1e-9)
        )
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
    serve_with(plant_dir, speed, seed, mqtt, MqttFormat::Both, shutdown).await
}

/// `serve` publishing MQTT in `format`.
pub async fn serve_with(
    plant_dir: &Path,
    speed: f64,
    seed: u64,
    mqtt: Option<&str>,
    format: MqttFormat,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    if !(speed.is_finite() && speed > 0.0) {
        return Err(ServeError::Speed(speed));
    }
    let spec = load_plant(plant_dir)?;
    // Wall-clock time: a runtime fed by these servers takes the source timestamps as they
    // are (at `--speed` above 1 they run ahead of the clock, and a runtime rejects readings
    // further ahead than its allowed skew).
    let mut plant = ServedPlant::start(&spec, seed, Timestamp::now()).await?;
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
    plant
        .connect_mqtt(&spec, &host, port, &client_id, format)
        .await?;
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
    let file = plant_dir.join("endpoints.toml");
    std::fs::write(&file, plant.endpoints_toml())
        .map_err(|source| ServeError::WriteEndpoints { file, source })?;
    plant.run_realtime(speed, shutdown).await
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
        // `start` took the first step.
        let mut all = plant.readings.clone();
        for s in 1..=5 {
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
            client
                .masked_write_register(0, 0xffff, 0)
                .await
                .expect("transport"),
            Err(ExceptionCode::IllegalFunction)
        );
        assert_eq!(
            client
                .read_write_multiple_registers(0, 1, 1, &[100])
                .await
                .expect("transport"),
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
    async fn run_enable_coil_idles_the_machine_and_bits_past_the_image_are_refused() {
        let (mut plant, mapping, mut client) = started().await;
        let coil = find(&mapping, "press-1", crate::mapping::RUN_ENABLE);
        let fault = find(&mapping, "press-1", crate::mapping::FAULT_ACTIVE);
        let status = find(&mapping, "press-1", crate::mapping::STATUS);
        let state = find(&mapping, "press-1", "state");
        assert_eq!(coil.register, RegisterKind::Coil);
        assert_eq!(
            client.read_coils(0, 3).await.expect("transport"),
            Ok(vec![true; 3])
        );
        plant.step_to(RUN_START.plus_ms(1000));
        assert_eq!(
            client
                .read_discrete_inputs(fault.address, 1)
                .await
                .expect("transport"),
            Ok(vec![false])
        );
        assert_eq!(
            client
                .read_holding_registers(status.address, 1)
                .await
                .expect("transport"),
            Ok(vec![0])
        );
        assert_eq!(
            client.read_coils(2, 2).await.expect("transport"),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            client.read_discrete_inputs(0, 0).await.expect("transport"),
            Err(ExceptionCode::IllegalDataValue)
        );
        assert_eq!(
            client.write_single_coil(3, false).await.expect("transport"),
            Err(ExceptionCode::IllegalDataAddress)
        );
        assert_eq!(
            client
                .write_single_coil(coil.address, false)
                .await
                .expect("transport"),
            Ok(())
        );
        for s in 2..=3600 {
            plant.step_to(RUN_START.plus_ms(s * 1000));
        }
        assert_eq!(
            client
                .read_holding_registers(state.address, 1)
                .await
                .expect("transport"),
            Ok(vec![0]),
            "held idle"
        );
        assert_eq!(
            client
                .write_multiple_coils(0, &[true, true, true])
                .await
                .expect("transport"),
            Ok(())
        );
    }

    #[tokio::test]
    async fn a_little_endian_plant_serves_the_low_word_first() {
        let spec = line_plant();
        let mut plant =
            ServedPlant::start_with_word_order(&spec, 5, RUN_START, WordOrder::LittleEndian)
                .await
                .expect("starts");
        let mut client = tokio_modbus::client::tcp::connect(plant.lines()[0].addr)
            .await
            .expect("connects");
        let mapping = Mapping::of(&spec).expect("fits");
        let temp = mapping.lines[0]
            .tags
            .iter()
            .find(|t| t.property == "value")
            .expect("a sensor")
            .clone();
        let mut all = Vec::new();
        for s in 0..=5 {
            all.extend_from_slice(plant.step_to(RUN_START.plus_ms(s * 1000)));
        }
        let words = client
            .read_input_registers(temp.address, 2)
            .await
            .expect("transport")
            .expect("no exception");
        let expected = last(&all, &temp.asset, Property::Value).expect("sampled");
        let got = f32::from_bits(WordOrder::LittleEndian.join([words[0], words[1]]));
        assert_eq!(got, expected.as_f64() as f32);
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

    /// A plant publishing both MQTT formats to `broker`, running at 60x in a task; stop it
    /// with the sender and get it back from the handle.
    async fn running_with_mqtt(
        broker: &crate::mqtt::EmbeddedBroker,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<(ServedPlant, Result<(), ServeError>)>,
        Arc<CommandStats>,
        crate::sparkplug::Layout,
    ) {
        let spec = line_plant();
        let mut plant = ServedPlant::start(&spec, 5, RUN_START)
            .await
            .expect("starts");
        plant
            .connect_mqtt(
                &spec,
                "127.0.0.1",
                broker.addr().port(),
                "cmd-test",
                MqttFormat::Both,
            )
            .await
            .expect("connects");
        let stats = plant.command_stats();
        let layout = plant.sparkplug_layout().expect("sparkplug").clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(async move {
            let r = plant
                .run_realtime(60.0, async {
                    let _ = stopped.await;
                })
                .await;
            (plant, r)
        });
        (stop, run, stats, layout)
    }

    async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while !cond() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{what} within 20 s"));
    }

    #[tokio::test]
    async fn dcmd_and_json_commands_set_machine_speeds_and_bad_commands_are_counted() {
        use ferrotwin_proto::sparkplug::Payload;
        use ferrotwin_proto::sparkplug::payload::{Metric, metric};
        use prost::Message;
        use rumqttc::{AsyncClient, MqttOptions, QoS};
        let broker = crate::mqtt::EmbeddedBroker::start().expect("broker starts");
        let (stop, run, stats, layout) = running_with_mqtt(&broker).await;
        let (client, mut eventloop) = AsyncClient::new(
            MqttOptions::new("commander", "127.0.0.1", broker.addr().port()),
            10,
        );
        let driver = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
        let node = &layout.nodes[0];
        let (press, conveyor) = (&node.devices[0], &node.devices[1]);
        let dcmd = Payload {
            metrics: vec![Metric {
                name: Some("speed_setpoint_pct".into()),
                value: Some(metric::Value::IntValue(150)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let topic = crate::sparkplug::topic(&node.group, "DCMD", &node.id, Some(&press.id));
        client
            .publish(topic.clone(), QoS::AtLeastOnce, false, dcmd.encode_to_vec())
            .await
            .expect("queued");
        client
            .publish(
                format!("{}/set/speed_setpoint_pct", conveyor.machine.as_str()),
                QoS::AtLeastOnce,
                false,
                br#"{"value": 40}"#.to_vec(),
            )
            .await
            .expect("queued");
        // Garbage on both command paths.
        client
            .publish(topic, QoS::AtLeastOnce, false, b"\x08\xff\xff".to_vec())
            .await
            .expect("queued");
        client
            .publish(
                format!("{}/set/speed_setpoint_pct", conveyor.machine.as_str()),
                QoS::AtLeastOnce,
                false,
                br#"{"value": "fast"}"#.to_vec(),
            )
            .await
            .expect("queued");
        client
            .publish(
                "acme/berlin/x/y/nobody/set/speed_setpoint_pct",
                QoS::AtLeastOnce,
                false,
                br#"{"value": 50}"#.to_vec(),
            )
            .await
            .expect("queued");
        let get = |c: &std::sync::atomic::AtomicU64| CommandStats::get(c);
        wait_for("2 applied, 3 refused", || {
            get(&stats.applied) == 2 && get(&stats.rejected) == 3
        })
        .await;
        stop.send(()).expect("running");
        let (mut plant, result) = run.await.expect("no panic");
        result.expect("served");
        // Commands wait in the inbox for the next step.
        plant.step_to(plant.sim().now());
        assert_eq!(plant.sim().speed_pct(press.machine.id()), Some(150));
        assert_eq!(plant.sim().speed_pct(conveyor.machine.id()), Some(40));
        assert_eq!(
            plant.sim().speed_pct(node.devices[2].machine.id()),
            Some(100)
        );
        driver.abort();
    }

    #[tokio::test]
    async fn ncmd_rebirth_republishes_nbirth_and_dbirths() {
        use ferrotwin_proto::sparkplug::Payload;
        use ferrotwin_proto::sparkplug::payload::{Metric, metric};
        use prost::Message;
        use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
        let broker = crate::mqtt::EmbeddedBroker::start().expect("broker starts");
        let (stop, run, stats, layout) = running_with_mqtt(&broker).await;
        let node = &layout.nodes[0];
        let (client, mut eventloop) = AsyncClient::new(
            MqttOptions::new("host-app", "127.0.0.1", broker.addr().port()),
            10,
        );
        client
            .subscribe(
                format!("spBv1.0/{}/+/{}/#", node.group, node.id),
                QoS::AtLeastOnce,
            )
            .await
            .expect("queued");
        let mut subscribed = false;
        let mut births = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match eventloop.poll().await.expect("connected") {
                    Event::Incoming(Packet::SubAck(_)) => {
                        subscribed = true;
                        let rebirth = Payload {
                            metrics: vec![Metric {
                                name: Some(crate::sparkplug::REBIRTH.into()),
                                value: Some(metric::Value::BooleanValue(true)),
                                ..Default::default()
                            }],
                            ..Default::default()
                        };
                        client
                            .publish(
                                crate::sparkplug::topic(&node.group, "NCMD", &node.id, None),
                                QoS::AtLeastOnce,
                                false,
                                rebirth.encode_to_vec(),
                            )
                            .await
                            .expect("queued");
                    }
                    Event::Incoming(Packet::Publish(p)) if subscribed => {
                        let kind = p.topic.split('/').nth(2).unwrap_or_default().to_string();
                        let seq = Payload::decode(&p.payload[..]).expect("payload").seq;
                        // The DBIRTHs of the node's first birth may still be arriving when
                        // the subscription starts: a birth sequence begins with an NBIRTH.
                        if kind == "DBIRTH" && births.is_empty() {
                            continue;
                        }
                        if kind.ends_with("BIRTH") {
                            births.push((kind, seq));
                        }
                        if births.len() == 4 {
                            return;
                        }
                    }
                    _ => {}
                }
            }
        })
        .await
        .expect("a rebirth within 20 s");
        assert_eq!(
            births,
            vec![
                ("NBIRTH".to_string(), Some(0)),
                ("DBIRTH".to_string(), Some(1)),
                ("DBIRTH".to_string(), Some(2)),
                ("DBIRTH".to_string(), Some(3)),
            ]
        );
        assert_eq!(CommandStats::get(&stats.applied), 1);
        stop.send(()).expect("running");
        run.await.expect("no panic").1.expect("served");
    }

    #[tokio::test]
    async fn endpoints_toml_names_the_sparkplug_group_and_nodes() {
        let broker = crate::mqtt::EmbeddedBroker::start().expect("broker starts");
        let spec = line_plant();
        let mut plant = ServedPlant::start(&spec, 5, RUN_START)
            .await
            .expect("starts");
        plant
            .connect_mqtt(
                &spec,
                "127.0.0.1",
                broker.addr().port(),
                "ep-test",
                MqttFormat::Sparkplug,
            )
            .await
            .expect("connects");
        let value: toml::Value = toml::from_str(&plant.endpoints_toml()).expect("valid TOML");
        assert_eq!(
            value["mqtt"]["endpoint"].as_str(),
            Some(broker.addr().to_string().as_str())
        );
        let node = &value["mqtt"]["sparkplug_nodes"][0];
        assert_eq!(node["group"].as_str(), Some("acme-berlin"));
        assert!(
            node["line"]
                .as_str()
                .expect("line")
                .starts_with("acme/berlin/")
        );
        plant.stop_mqtt().await;
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
