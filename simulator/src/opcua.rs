//! The plant on OPC UA: one async-opcua server per site on 127.0.0.1 (port chosen by the
//! OS), security policy None with anonymous users, updated from each simulation step.
//!
//! Address space, in the namespace `NAMESPACE_URI`: under Objects a folder per asset from the
//! enterprise down to the sensors, each with the asset path as its string node id; a
//! variable per property with node id `<asset path>/<property>`, so an adapter maps tags
//! without browsing:
//! - sensors: `value` (Double; Int64 or Boolean for int and bool sensors) with an
//!   `EngineeringUnits` property when the spec gives a unit;
//! - machines: `state` (Int32, `oee::MachineState` codes), `good_count` and `scrap_count`
//!   (Int64, cumulative), and the writable `speed_setpoint_pct` (UInt16, 0..=200; a write
//!   out of range is answered `BadOutOfRange`, a good one goes to the `SetpointInbox` and is
//!   applied at the next step, after which the variable shows it).
//!
//! Every value carries the simulated reading's source timestamp. Status is Good, except while
//! a machine's PLC is unreachable (a `network_loss` fault): its variables keep their last
//! value with `BadCommunicationError` (source timestamp = the start of the loss) and writes to
//! it are refused the same way, until the loss ends. A stuck sensor stays Good: a real PLC
//! does not know its sensor repeats itself; finding that out is the twin's job.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{
    AssetId, AssetPath, Level, Property, Quality, QualityCode, QualityReason, Reading, Timestamp,
    Value, ValueType,
};
use opcua::server::address_space::{AccessLevel, ReferenceDirection, VariableBuilder};
use opcua::server::diagnostics::NamespaceMetadata;
use opcua::server::node_manager::memory::{SimpleNodeManager, simple_node_manager};
use opcua::server::{ANONYMOUS_USER_TOKEN_ID, ServerBuilder, ServerEndpoint, ServerHandle};
use opcua::types::{
    DataTypeId, DataValue, DateTime, EUInformation, ExtensionObject, NodeId, NumericRange,
    ObjectId, QualifiedName, ReferenceTypeId, StatusCode, VariableTypeId, Variant,
};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::mapping::{MAX_SPEED_PCT, SPEED_SETPOINT};
use crate::model::{FaultKind, PlantSim};
use crate::serve::SetpointInbox;

/// The namespace of the plant's nodes (index 2 on our servers: 0 is OPC UA's, 1 the
/// server's own).
pub const NAMESPACE_URI: &str = "urn:ferrotwin:sim";

/// The property an `EngineeringUnits` node hangs under (OPC UA Part 8).
const EU_PROPERTY: &str = "EngineeringUnits";

/// UNECE units namespace of `EUInformation`; we carry the spec's unit text as display name
/// and no numeric code (`-1`: unknown), which OPC UA allows.
const EU_NAMESPACE: &str = "http://www.opcfoundation.org/UA/units/un/cefact";

/// Monitored items one subscription may hold. The async-opcua default (1000) is below a
/// line's worth of sensors in the larger generated plants.
const MAX_MONITORED_ITEMS_PER_SUB: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum OpcUaError {
    #[error("site {site}: cannot bind an OPC UA server on 127.0.0.1")]
    Bind {
        site: String,
        #[source]
        source: std::io::Error,
    },
    #[error("site {site}: OPC UA server configuration refused: {what}")]
    Build { site: String, what: String },
}

/// The string node id of `property` of the asset at `path` (what an adapter's `node_id`
/// names as `ns=2;s=<this>`).
pub fn node_id_text(path: &AssetPath, property: &str) -> String {
    format!("{path}/{property}")
}

/// OPC UA time (100 ns ticks since 1601) of a ferrotwin timestamp (µs since 1970).
pub fn to_ua_time(t: Timestamp) -> DateTime {
    /// Ticks from 1601-01-01 to 1970-01-01.
    const UNIX_EPOCH_TICKS: i64 = 116_444_736_000_000_000;
    DateTime::from(
        t.0.saturating_mul(10)
            .saturating_add(UNIX_EPOCH_TICKS)
            .max(0),
    )
}

/// One site's server.
pub struct SiteServer {
    /// The site's asset path (`acme/berlin`).
    pub site: String,
    pub addr: SocketAddr,
    /// `opc.tcp://127.0.0.1:PORT/`
    pub endpoint: String,
    handle: ServerHandle,
    nodes: Arc<SimpleNodeManager>,
    run: Option<JoinHandle<Result<(), String>>>,
}

impl SiteServer {
    /// Stops accepting, closes the sessions and waits until the server task has ended (its
    /// port is free again then).
    async fn stop(&mut self) {
        self.handle.cancel();
        if let Some(run) = self.run.take() {
            let _ = run.await;
        }
    }
}

/// How a property's values are typed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WireType {
    Double,
    Int64,
    Int32,
    Boolean,
    UInt16,
}

impl WireType {
    fn data_type(self) -> DataTypeId {
        match self {
            WireType::Double => DataTypeId::Double,
            WireType::Int64 => DataTypeId::Int64,
            WireType::Int32 => DataTypeId::Int32,
            WireType::Boolean => DataTypeId::Boolean,
            WireType::UInt16 => DataTypeId::UInt16,
        }
    }

    fn variant(self, v: Value) -> Variant {
        match self {
            WireType::Double => Variant::Double(v.as_f64()),
            WireType::Int64 => Variant::Int64(match v {
                Value::Int(n) => n,
                other => other.as_f64() as i64,
            }),
            WireType::Int32 => Variant::Int32(match v {
                Value::Int(n) => i32::try_from(n).unwrap_or(i32::MAX),
                other => other.as_f64() as i32,
            }),
            WireType::Boolean => Variant::Boolean(v.as_f64() != 0.0),
            WireType::UInt16 => Variant::UInt16(v.as_f64().clamp(0.0, 65_535.0) as u16),
        }
    }
}

/// One served variable.
struct Slot {
    site: usize,
    node: NodeId,
    wire: WireType,
    /// The value last served, and its source timestamp.
    last: Option<(Variant, Timestamp)>,
}

/// A machine's variables, for network losses and the setpoint.
struct MachineSlots {
    id: AssetId,
    /// Its own variables and its sensors' `value`s.
    slots: Vec<usize>,
    setpoint: usize,
    /// Shared with the setpoint's write callback: writes are refused while true.
    unreachable: Arc<AtomicBool>,
}

/// The OPC UA face of a `ServedPlant`: the servers, and where each reading goes.
pub struct OpcUaPlant {
    sites: Vec<SiteServer>,
    slots: Vec<Slot>,
    by_reading: HashMap<(AssetId, Property), usize>,
    machines: Vec<MachineSlots>,
    machine_index: HashMap<AssetId, usize>,
    /// `PlantSim::faults` seen so far (the list only grows).
    faults_seen: usize,
    /// Network losses in progress: (fault label index, machine index).
    outages: Vec<(usize, usize)>,
    /// Values to set, per site, reused between steps.
    per_site: Vec<Vec<(NodeId, DataValue)>>,
}

impl OpcUaPlant {
    /// Binds and starts one server per site of `spec` on 127.0.0.1 (ports chosen by the OS);
    /// setpoint writes go to `setpoints`. Values are empty (`BadWaitingForInitialData`) until
    /// the first `update`.
    pub async fn start(spec: &PlantSpec, setpoints: SetpointInbox) -> Result<Self, OpcUaError> {
        Self::start_on(spec, setpoints, &[]).await
    }

    /// `start`, the server of the `i`th site bound to `addrs[i]` (port 0: chosen by the OS);
    /// sites past the end of `addrs` on 127.0.0.1:0. Tests bring a stopped server back on
    /// its old port with it.
    pub async fn start_on(
        spec: &PlantSpec,
        setpoints: SetpointInbox,
        addrs: &[SocketAddr],
    ) -> Result<Self, OpcUaError> {
        let assets = spec.assets();
        let mut sites = Vec::new();
        let mut slots = Vec::new();
        let mut by_reading = HashMap::new();
        let mut machines: Vec<MachineSlots> = Vec::new();
        let mut machine_index = HashMap::new();
        let enterprise = assets
            .iter()
            .find(|a| a.path.level() == Level::Enterprise)
            .map(|a| a.path.clone());
        for site in assets.iter().filter(|a| a.path.level() == Level::Site) {
            let bind = addrs
                .get(sites.len())
                .copied()
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
            let (server, listener, endpoint, handle, nodes, ns) =
                build_server(&site.path, bind).await?;
            let addr = listener.local_addr().map_err(|source| OpcUaError::Bind {
                site: site.path.to_string(),
                source,
            })?;
            let site_index = sites.len();
            {
                let mut space = nodes.address_space().write();
                let objects: NodeId = ObjectId::ObjectsFolder.into();
                let node = |path: &AssetPath| NodeId::new(ns, path.as_str());
                if let Some(e) = &enterprise {
                    space.add_folder(
                        &node(e),
                        QualifiedName::new(ns, e.name()),
                        e.name(),
                        &objects,
                    );
                }
                for a in assets.iter().filter(|a| a.path.starts_with(&site.path)) {
                    let parent = a
                        .path
                        .parent()
                        .map_or_else(|| objects.clone(), |p| node(&p));
                    space.add_folder(
                        &node(&a.path),
                        QualifiedName::new(ns, a.path.name()),
                        a.path.name(),
                        &parent,
                    );
                    let mut add = |property: &str, wire: WireType, writable: bool| {
                        let id = NodeId::new(ns, node_id_text(&a.path, property));
                        let mut v =
                            VariableBuilder::new(&id, QualifiedName::new(ns, property), property)
                                .data_type(wire.data_type())
                                .access_level(AccessLevel::CURRENT_READ)
                                .user_access_level(AccessLevel::CURRENT_READ);
                        if writable {
                            v = v.writable();
                        }
                        // `build` drops a builder's references: they are given to `insert`.
                        let mut var = v.build();
                        var.set_data_value(DataValue {
                            status: Some(StatusCode::BadWaitingForInitialData),
                            ..Default::default()
                        });
                        let type_def: NodeId = VariableTypeId::BaseDataVariableType.into();
                        space.insert(
                            var,
                            Some(&[
                                (
                                    &node(&a.path),
                                    &ReferenceTypeId::Organizes,
                                    ReferenceDirection::Inverse,
                                ),
                                (
                                    &type_def,
                                    &ReferenceTypeId::HasTypeDefinition,
                                    ReferenceDirection::Forward,
                                ),
                            ]),
                        );
                        slots.push(Slot {
                            site: site_index,
                            node: id.clone(),
                            wire,
                            last: None,
                        });
                        (slots.len() - 1, id)
                    };
                    match &a.kind {
                        AssetKind::Machine { .. } => {
                            let id = a.path.id();
                            let mut own = Vec::new();
                            for (p, wire) in [
                                (Property::State, WireType::Int32),
                                (Property::GoodCount, WireType::Int64),
                                (Property::ScrapCount, WireType::Int64),
                            ] {
                                let (slot, _) = add(p.as_str(), wire, false);
                                by_reading.insert((id, p), slot);
                                own.push(slot);
                            }
                            let (setpoint, node_id) = add(SPEED_SETPOINT, WireType::UInt16, true);
                            own.push(setpoint);
                            let unreachable = Arc::new(AtomicBool::new(false));
                            nodes.inner().add_write_callback(
                                node_id,
                                setpoint_writer(id, setpoints.clone(), Arc::clone(&unreachable)),
                            );
                            machine_index.insert(id, machines.len());
                            machines.push(MachineSlots {
                                id,
                                slots: own,
                                setpoint,
                                unreachable,
                            });
                        }
                        AssetKind::Sensor { spec: sensor, .. } => {
                            let wire = match sensor.value_type {
                                ValueType::Float => WireType::Double,
                                ValueType::Int => WireType::Int64,
                                ValueType::Bool => WireType::Boolean,
                            };
                            let (slot, var) = add(Property::Value.as_str(), wire, false);
                            by_reading.insert((a.path.id(), Property::Value), slot);
                            if let Some(m) =
                                a.path.parent().and_then(|m| machine_index.get(&m.id()))
                            {
                                machines[*m].slots.push(slot);
                            }
                            if !sensor.unit.is_empty() {
                                let eu = NodeId::new(
                                    ns,
                                    node_id_text(&a.path, &format!("value/{EU_PROPERTY}")),
                                );
                                let info = EUInformation {
                                    namespace_uri: EU_NAMESPACE.into(),
                                    unit_id: -1,
                                    display_name: sensor.unit.as_str().into(),
                                    description: sensor.unit.as_str().into(),
                                };
                                VariableBuilder::new(
                                    &eu,
                                    QualifiedName::new(0, EU_PROPERTY),
                                    EU_PROPERTY,
                                )
                                .data_type(DataTypeId::EUInformation)
                                .value(Variant::from(ExtensionObject::from_message(info)))
                                .access_level(AccessLevel::CURRENT_READ)
                                .user_access_level(AccessLevel::CURRENT_READ)
                                .property_of(var)
                                .has_type_definition(VariableTypeId::PropertyType)
                                .insert(&mut *space);
                            }
                        }
                        _ => {}
                    }
                }
            }
            let run = tokio::spawn(server.run_with(listener));
            sites.push(SiteServer {
                site: site.path.to_string(),
                addr,
                endpoint,
                handle,
                nodes,
                run: Some(run),
            });
        }
        Ok(OpcUaPlant {
            per_site: (0..sites.len()).map(|_| Vec::new()).collect(),
            sites,
            slots,
            by_reading,
            machines,
            machine_index,
            faults_seen: 0,
            outages: Vec::new(),
        })
    }

    pub fn sites(&self) -> &[SiteServer] {
        &self.sites
    }

    /// Serves one step: network losses that began or ended, the setpoints `sim` now runs
    /// at, and `readings` (each with its source timestamp and quality).
    pub fn update(&mut self, readings: &[Reading], sim: &PlantSim, now: Timestamp) {
        self.track_outages(sim);
        for (i, (id, pct)) in sim.speed_pcts().enumerate() {
            // Machines are in spec order in both; the index check keeps a mismatch harmless.
            let Some(m) = self.machines.get(i).filter(|m| m.id == id) else {
                continue;
            };
            let slot = &self.slots[m.setpoint];
            let v = Variant::UInt16(pct);
            if slot.last.as_ref().map(|l| &l.0) != Some(&v)
                && !m.unreachable.load(Ordering::Relaxed)
            {
                self.set(m.setpoint, v, now, StatusCode::Good);
            }
        }
        for r in readings {
            let Some(&slot) = self.by_reading.get(&(r.asset, r.property)) else {
                continue;
            };
            let v = self.slots[slot].wire.variant(r.value);
            self.set(slot, v, r.source_ts, status_of(r.quality));
        }
        self.flush();
    }

    /// Stops every server and waits for them to end (dropping the plant only signals them).
    pub async fn shutdown(mut self) {
        for s in &mut self.sites {
            s.stop().await;
        }
    }

    /// Stops the server of site `index` and waits for it to end; its port is free again
    /// then. For tests of a PLC that goes away.
    pub async fn stop_site(&mut self, index: usize) {
        if let Some(s) = self.sites.get_mut(index) {
            s.stop().await;
        }
    }

    fn set(&mut self, slot: usize, v: Variant, ts: Timestamp, status: StatusCode) {
        let s = &mut self.slots[slot];
        s.last = Some((v.clone(), ts));
        self.per_site[s.site].push((
            s.node.clone(),
            DataValue {
                value: Some(v),
                status: Some(status),
                source_timestamp: Some(to_ua_time(ts)),
                server_timestamp: Some(DateTime::now()),
                ..Default::default()
            },
        ));
    }

    /// Marks the machines of network losses that began since the last step Bad, and those
    /// of losses that ended Good again, with their last values.
    fn track_outages(&mut self, sim: &PlantSim) {
        let faults = sim.faults();
        for (label, f) in faults.iter().enumerate().skip(self.faults_seen) {
            if f.kind != FaultKind::NetworkLoss || f.end.is_some() {
                continue;
            }
            if let Some(&m) = self.machine_index.get(&f.asset.id()) {
                self.outages.push((label, m));
                self.machines[m].unreachable.store(true, Ordering::Relaxed);
                self.restatus(m, f.start, StatusCode::BadCommunicationError);
            }
        }
        self.faults_seen = faults.len();
        let mut i = 0;
        while i < self.outages.len() {
            let (label, m) = self.outages[i];
            if let Some(end) = faults.get(label).and_then(|f| f.end) {
                self.outages.swap_remove(i);
                self.machines[m].unreachable.store(false, Ordering::Relaxed);
                self.restatus(m, end, StatusCode::Good);
            } else {
                i += 1;
            }
        }
    }

    /// Serves machine `m`'s last values again with `status`, stamped `at`.
    fn restatus(&mut self, m: usize, at: Timestamp, status: StatusCode) {
        for k in 0..self.machines[m].slots.len() {
            let slot = self.machines[m].slots[k];
            let s = &self.slots[slot];
            let v = s.last.as_ref().map(|l| l.0.clone());
            self.per_site[s.site].push((
                s.node.clone(),
                DataValue {
                    value: v,
                    status: Some(status),
                    source_timestamp: Some(to_ua_time(at)),
                    server_timestamp: Some(DateTime::now()),
                    ..Default::default()
                },
            ));
        }
    }

    fn flush(&mut self) {
        for (site, values) in self.sites.iter().zip(&mut self.per_site) {
            if values.is_empty() {
                continue;
            }
            // Only fails for a node id the address space lacks, which `start` made.
            let _ = site.nodes.set_values(
                site.handle.subscriptions(),
                values.iter().map(|(id, v)| (id, None, v.clone())),
            );
            values.clear();
        }
    }
}

impl Drop for OpcUaPlant {
    fn drop(&mut self) {
        // The server tasks notice and end on their own (after closing their sessions).
        for s in &self.sites {
            s.handle.cancel();
        }
    }
}

/// The OPC UA status of a reading's quality.
fn status_of(q: Quality) -> StatusCode {
    match (q.code, q.reason) {
        (QualityCode::Good, _) => StatusCode::Good,
        (QualityCode::Uncertain, QualityReason::Stale) => StatusCode::UncertainLastUsableValue,
        (QualityCode::Uncertain, QualityReason::OutOfRange) => {
            StatusCode::UncertainEngineeringUnitsExceeded
        }
        (QualityCode::Uncertain, _) => StatusCode::Uncertain,
        (QualityCode::Bad, QualityReason::SensorFailure) => StatusCode::BadSensorFailure,
        (QualityCode::Bad, QualityReason::CommFailure) => StatusCode::BadCommunicationError,
        (QualityCode::Bad, QualityReason::ConfigError) => StatusCode::BadConfigurationError,
        (QualityCode::Bad, QualityReason::OutOfRange) => StatusCode::BadOutOfRange,
        (QualityCode::Bad, _) => StatusCode::Bad,
    }
}

/// The write callback of a machine's `speed_setpoint_pct`.
fn setpoint_writer(
    machine: AssetId,
    setpoints: SetpointInbox,
    unreachable: Arc<AtomicBool>,
) -> impl Fn(DataValue, &NumericRange) -> StatusCode + Send + Sync + 'static {
    move |value, range| {
        if *range != NumericRange::None {
            return StatusCode::BadIndexRangeInvalid;
        }
        if unreachable.load(Ordering::Relaxed) {
            return StatusCode::BadCommunicationError;
        }
        // The server checked the type against the variable's UInt16 before calling us.
        match value.value {
            Some(Variant::UInt16(pct)) if pct <= MAX_SPEED_PCT => {
                setpoints.write(machine, pct);
                StatusCode::Good
            }
            Some(Variant::UInt16(_)) => StatusCode::BadOutOfRange,
            _ => StatusCode::BadTypeMismatch,
        }
    }
}

type Built = (
    opcua::server::Server,
    TcpListener,
    String,
    ServerHandle,
    Arc<SimpleNodeManager>,
    u16,
);

/// Builds (does not start) the server of the site at `site` and binds its listener: the
/// listener first, since the endpoint descriptions the server hands out carry its port.
async fn build_server(site: &AssetPath, bind: SocketAddr) -> Result<Built, OpcUaError> {
    let bind_err = |source| OpcUaError::Bind {
        site: site.to_string(),
        source,
    };
    let build_err = |what: String| OpcUaError::Build {
        site: site.to_string(),
        what,
    };
    let listener = TcpListener::bind(bind).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    let endpoint = format!("opc.tcp://{addr}/");
    // Security None needs no certificate, but the crate still opens a PKI folder: keep it out
    // of the working directory.
    let pki = std::env::temp_dir().join("ferrotwin-sim-opcua-pki");
    let mut builder = ServerBuilder::new()
        .application_name(format!("ferrotwin-sim {site}"))
        .application_uri(format!("urn:ferrotwin:sim:{site}"))
        .product_uri("urn:ferrotwin:sim")
        .host(addr.ip().to_string())
        .port(addr.port())
        .pki_dir(pki)
        .create_sample_keypair(false)
        .discovery_urls(vec![endpoint.clone()])
        .add_endpoint(
            "none",
            ServerEndpoint::new_none("/", &[ANONYMOUS_USER_TOKEN_ID.to_string()]),
        )
        .diagnostics_enabled(false)
        .with_node_manager(simple_node_manager(
            NamespaceMetadata {
                namespace_uri: NAMESPACE_URI.to_owned(),
                ..Default::default()
            },
            "ferrotwin-sim",
        ));
    let limits = builder.limits_mut();
    limits.subscriptions.max_monitored_items_per_sub = MAX_MONITORED_ITEMS_PER_SUB;
    // The crate's defaults (arrays of 1000, messages of 320 KiB) cut off a Read or Browse of
    // a large site.
    limits.max_array_length = 100_000;
    limits.max_message_size = 16 << 20;
    limits.max_chunk_count = 256;
    let (server, handle) = builder.build().map_err(build_err)?;
    let nodes = handle
        .node_managers()
        .get_of_type::<SimpleNodeManager>()
        .ok_or_else(|| build_err("the plant's node manager is missing".into()))?;
    let ns = handle
        .get_namespace_index(NAMESPACE_URI)
        .ok_or_else(|| build_err(format!("namespace {NAMESPACE_URI} is not registered")))?;
    Ok((server, listener, endpoint, handle, nodes, ns))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use opcua::client::{ClientBuilder, DataChangeCallback, IdentityToken, Session};
    use opcua::crypto::SecurityPolicy;
    use opcua::types::{
        AttributeId, BrowseDescription, BrowseDirection, BrowseResultMask, Identifier,
        MessageSecurityMode, MonitoredItemCreateRequest, ReadValueId, TimestampsToReturn,
        WriteValue,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::generate::{PlantSize, generate};
    use crate::run::RUN_START;
    use crate::scenario::Scenario;
    use crate::serve::ServedPlant;

    const SITE: &str = "acme/berlin";
    const PRESS: &str = "acme/berlin/assembly/line-1/press-1";

    fn line_plant() -> PlantSpec {
        generate(PlantSize::ONE_LINE, 1)
    }

    async fn served() -> ServedPlant {
        let spec = line_plant();
        let mut plant = ServedPlant::start(&spec, 5, RUN_START)
            .await
            .expect("servers start");
        plant.serve_opcua(&spec).await.expect("OPC UA starts");
        plant.step_to(RUN_START);
        plant
    }

    fn endpoint(plant: &ServedPlant) -> String {
        plant.opcua().expect("serving").sites()[0].endpoint.clone()
    }

    /// An anonymous session over security None, connected.
    async fn connect(endpoint: &str) -> Arc<Session> {
        let mut client = ClientBuilder::new()
            .application_name("ferrotwin-sim test")
            .application_uri("urn:ferrotwin:sim-test")
            .pki_dir(std::env::temp_dir().join("ferrotwin-sim-test-pki"))
            .create_sample_keypair(false)
            .trust_server_certs(true)
            .session_retry_limit(3)
            .client()
            .expect("valid client config");
        let (session, event_loop) = client
            .connect_to_matching_endpoint(
                (
                    endpoint,
                    SecurityPolicy::None.to_str(),
                    MessageSecurityMode::None,
                ),
                IdentityToken::Anonymous,
            )
            .await
            .expect("the server lists its endpoint");
        event_loop.spawn();
        tokio::time::timeout(Duration::from_secs(10), session.wait_for_connection())
            .await
            .expect("connected within 10 s");
        session
    }

    fn plant_node(path: &str, property: &str) -> NodeId {
        NodeId::new(2, format!("{path}/{property}"))
    }

    /// Every node below Objects in our namespace, by forward hierarchical references.
    async fn browse_all(session: &Session) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut todo: Vec<NodeId> = vec![ObjectId::ObjectsFolder.into()];
        while let Some(node) = todo.pop() {
            let desc = BrowseDescription {
                node_id: node,
                browse_direction: BrowseDirection::Forward,
                reference_type_id: ReferenceTypeId::HierarchicalReferences.into(),
                include_subtypes: true,
                node_class_mask: 0,
                result_mask: BrowseResultMask::All as u32,
            };
            let results = session.browse(&[desc], 1000, None).await.expect("browses");
            for r in results[0].references.iter().flatten() {
                let id = &r.node_id.node_id;
                if id.namespace != 2 {
                    continue;
                }
                if let Identifier::String(s) = &id.identifier
                    && found.insert(s.as_ref().to_owned())
                {
                    todo.push(id.clone());
                }
            }
        }
        found
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn browsing_finds_every_machine_and_sensor_with_units() {
        let plant = served().await;
        let session = connect(&endpoint(&plant)).await;
        let found = browse_all(&session).await;
        let spec = line_plant();
        for a in spec.assets() {
            let p = a.path.as_str();
            match &a.kind {
                AssetKind::Machine { .. } => {
                    assert!(found.contains(p), "{p} in {found:?}");
                    for prop in ["state", "good_count", "scrap_count", SPEED_SETPOINT] {
                        assert!(found.contains(&format!("{p}/{prop}")), "{p}/{prop}");
                    }
                }
                AssetKind::Sensor { spec: s, .. } => {
                    assert!(found.contains(&format!("{p}/value")), "{p}/value");
                    if !s.unit.is_empty() {
                        assert!(found.contains(&format!("{p}/value/{EU_PROPERTY}")));
                    }
                }
                _ => assert!(found.contains(p), "{p}"),
            }
        }
        // The unit reads back as EUInformation.
        let (sensor, unit) = spec
            .assets()
            .into_iter()
            .find_map(|a| match a.kind {
                AssetKind::Sensor { spec, .. } if !spec.unit.is_empty() => {
                    Some((a.path, spec.unit.clone()))
                }
                _ => None,
            })
            .expect("a sensor with a unit");
        let eu = session
            .read(
                &[ReadValueId::new_value(plant_node(
                    sensor.as_str(),
                    &format!("value/{EU_PROPERTY}"),
                ))],
                TimestampsToReturn::Neither,
                0.0,
            )
            .await
            .expect("reads");
        let Some(Variant::ExtensionObject(obj)) = &eu[0].value else {
            panic!("not an extension object: {:?}", eu[0]);
        };
        let info = obj.inner_as::<EUInformation>().expect("EUInformation");
        assert_eq!(info.display_name.text.as_ref(), unit);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscription_receives_changing_values_with_the_simulated_source_timestamps() {
        let mut plant = served().await;
        let session = connect(&endpoint(&plant)).await;
        let sensor = line_plant()
            .assets()
            .into_iter()
            .find(|a| a.path.as_str().starts_with(PRESS) && a.path.level() == Level::Sensor)
            .expect("the press has sensors")
            .path;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sub = session
            .create_subscription(
                Duration::from_millis(100),
                30,
                10,
                0,
                0,
                true,
                DataChangeCallback::new(move |dv, _| {
                    let _ = tx.send(dv);
                }),
            )
            .await
            .expect("subscribes");
        let created = session
            .create_monitored_items(
                sub,
                TimestampsToReturn::Both,
                vec![MonitoredItemCreateRequest::from(plant_node(
                    sensor.as_str(),
                    "value",
                ))],
            )
            .await
            .expect("creates");
        assert!(created[0].result.status_code.is_good());
        let mut sent = HashMap::new();
        let mut got = Vec::new();
        let mut t = RUN_START;
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tokio::time::timeout(Duration::from_secs(20), async {
            while got.len() < 3 {
                tick.tick().await;
                t = t.plus_ms(1000);
                for r in plant.step_to(t) {
                    if r.asset == sensor.id() {
                        sent.insert(to_ua_time(r.source_ts).ticks(), r.value.as_f64());
                    }
                }
                while let Ok(dv) = rx.try_recv() {
                    if dv.value.is_some() {
                        got.push(dv);
                    }
                }
            }
        })
        .await
        .expect("three values within 20 s");
        let values: BTreeSet<u64> = got
            .iter()
            .map(|dv| match dv.value {
                Some(Variant::Double(v)) => v.to_bits(),
                ref other => panic!("not a double: {other:?}"),
            })
            .collect();
        assert!(values.len() >= 2, "values change: {got:?}");
        for dv in &got {
            // Good, perhaps with the overflow bit: a queue of one keeps the newest value.
            assert!(dv.status().is_good(), "{}", dv.status());
            let ts = dv.source_timestamp.expect("source timestamp");
            let Some(Variant::Double(v)) = dv.value else {
                unreachable!()
            };
            assert_eq!(sent.get(&ts.ticks()), Some(&v), "the value sampled at {ts}");
        }
    }

    fn write_pct(node: NodeId, v: Variant) -> WriteValue {
        WriteValue {
            node_id: node,
            attribute_id: AttributeId::Value as u32,
            index_range: NumericRange::None,
            value: DataValue::value_only(v),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn setpoint_write_changes_the_machine_and_bad_writes_get_status_codes() {
        let mut plant = served().await;
        let session = connect(&endpoint(&plant)).await;
        let node = plant_node(PRESS, SPEED_SETPOINT);
        let press = AssetPath::parse(PRESS).expect("valid").id();
        let speed = |p: &ServedPlant| p.sim().speed_pcts().find(|m| m.0 == press).map(|m| m.1);
        assert_eq!(speed(&plant), Some(100));
        let results = session
            .write(&[
                write_pct(node.clone(), Variant::UInt16(201)),
                write_pct(node.clone(), Variant::Int32(150)),
                write_pct(plant_node(PRESS, "state"), Variant::Int32(1)),
                write_pct(plant_node(PRESS, "nothing"), Variant::UInt16(1)),
            ])
            .await
            .expect("answered");
        assert_eq!(results[0], StatusCode::BadOutOfRange);
        assert!(results[1].is_bad(), "wrong type: {}", results[1]);
        assert!(results[2].is_bad(), "read-only: {}", results[2]);
        assert_eq!(results[3], StatusCode::BadNodeIdUnknown);
        plant.step_to(RUN_START.plus_ms(1000));
        assert_eq!(speed(&plant), Some(100), "nothing applied");
        let results = session
            .write(&[write_pct(node.clone(), Variant::UInt16(150))])
            .await
            .expect("answered");
        assert_eq!(results, vec![StatusCode::Good]);
        plant.step_to(RUN_START.plus_ms(2000));
        assert_eq!(speed(&plant), Some(150));
        let read = session
            .read(
                &[ReadValueId::new_value(node)],
                TimestampsToReturn::Both,
                0.0,
            )
            .await
            .expect("reads");
        assert_eq!(read[0].value, Some(Variant::UInt16(150)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn network_loss_serves_last_values_bad_until_it_ends() {
        let spec = line_plant();
        let text = format!(
            "version = 1\nrandom_faults = false\n[[faults]]\nasset = \"{PRESS}\"\nkind = \"network_loss\"\nat = \"10s\"\nduration = \"10s\"\n"
        );
        let scenario = Scenario::from_toml(&text, std::path::Path::new("t.toml"), &spec)
            .expect("valid scenario");
        let mut sim = PlantSim::with_scenario(&spec, 3, RUN_START, &scenario);
        let mut ua = OpcUaPlant::start(&spec, SetpointInbox::default())
            .await
            .expect("starts");
        let session = connect(&ua.sites()[0].endpoint.clone()).await;
        let mut out = Vec::new();
        let mut step = |ua: &mut OpcUaPlant, s: i64| {
            out.clear();
            sim.step(RUN_START.plus_ms(s * 1000), &mut out);
            ua.update(&out, &sim, sim.now());
        };
        let state = ReadValueId::new_value(plant_node(PRESS, "state"));
        let setpoint = plant_node(PRESS, SPEED_SETPOINT);
        let read = async |node: &ReadValueId| {
            session
                .read(std::slice::from_ref(node), TimestampsToReturn::Both, 0.0)
                .await
                .expect("reads")
                .remove(0)
        };
        step(&mut ua, 5);
        let before = read(&state).await;
        assert_eq!(before.status(), StatusCode::Good);
        step(&mut ua, 15);
        let during = read(&state).await;
        assert_eq!(during.status(), StatusCode::BadCommunicationError);
        assert_eq!(during.value, before.value, "the last value, kept");
        assert_eq!(
            during.source_timestamp,
            Some(to_ua_time(RUN_START.plus_ms(10_000)))
        );
        let refused = session
            .write(&[write_pct(setpoint, Variant::UInt16(50))])
            .await
            .expect("answered");
        assert_eq!(refused, vec![StatusCode::BadCommunicationError]);
        step(&mut ua, 25);
        assert_eq!(read(&state).await.status(), StatusCode::Good);
        ua.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn garbage_gets_an_error_message_and_the_server_keeps_serving() {
        let plant = served().await;
        let addr = plant.opcua().expect("serving").sites()[0].addr;
        let mut raw = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connects");
        raw.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("sent");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), raw.read_to_end(&mut answer))
            .await
            .expect("the server answers and closes within 10 s")
            .expect("reads");
        assert_eq!(&answer[..4], b"ERRF", "an OPC UA error message: {answer:?}");
        let code = u32::from_le_bytes(answer[8..12].try_into().expect("4 bytes"));
        assert!(StatusCode::from(code).is_bad(), "{code:#x}");
        // Others are still served.
        let session = connect(&endpoint(&plant)).await;
        let read = session
            .read(
                &[ReadValueId::new_value(plant_node(PRESS, SPEED_SETPOINT))],
                TimestampsToReturn::Both,
                0.0,
            )
            .await
            .expect("reads");
        assert_eq!(read[0].value, Some(Variant::UInt16(100)));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn endpoints_list_the_site_server_and_shutdown_frees_its_port() {
        let mut plant = served().await;
        let value: toml::Value = toml::from_str(&plant.endpoints_toml()).expect("valid TOML");
        let entries = value["opcua"].as_array().expect("[[opcua]]");
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0]["site"].as_str(), Some(SITE));
        let addr = plant.opcua().expect("serving").sites()[0].addr;
        assert_eq!(
            entries[0]["endpoint"].as_str(),
            Some(format!("opc.tcp://{addr}/").as_str())
        );
        plant.opcua_mut().expect("serving").stop_site(0).await;
        std::net::TcpListener::bind(addr).expect("the port is free again");
    }
}
