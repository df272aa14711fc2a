//! Sparkplug B host-side state, pure (no I/O, time passed in): per edge node its birth,
//! `bdSeq`, expected `seq` and the alias table of each device and of the node itself, turning
//! NBIRTH/DBIRTH/NDATA/DDATA/NDEATH/DDEATH payloads into `Reading`s.
//!
//! Mapping, two ways that combine:
//! - **Explicit** (config `metrics`, `MetricRule`): one metric of a node (`device` None: a
//!   node metric of NBIRTH/NDATA) or of a device feeds any asset's reading property (writable
//!   too: a sensor value a write may set), or is a writable setpoint. Any naming:
//!   `Temperature`, `Line/Throughput`, `Running`.
//! - **The convention** (config `nodes`, `NodeRule` with a `line`): device `d` is the machine
//!   `<line>/<d>`; its metrics `state`, `good_count`, `scrap_count` are the machine's
//!   properties, `<sensor>/value` is the sensor `<line>/<d>/<sensor>`'s value; metrics listed
//!   as writable are setpoints. An explicit rule wins over the convention for its metric.
//!
//! Anything else (other nodes, devices nobody maps, other metrics) is refused, counted and
//! reported as unmapped: it never creates a twin. The standard metrics (`bdSeq`,
//! `Node Control/*`, `Properties/*`, ...) are taken silently.
//!
//! A setpoint's value as a device reports it (its birth, or its data after a DCMD) is a
//! read-back (`Decoded::echoes`), which confirms or refutes a write; never a reading. A
//! writable reading's good report is both: a reading and a read-back.
//!
//! Sequence: `seq` must grow by one (mod 256) per message of a node from its NBIRTH on. A gap
//! (or data from a node whose birth we have not seen) means we may have missed a birth or
//! data: the node's data is ignored until it births again, and the caller asks for a rebirth
//! (NCMD `Node Control/Rebirth`). NDEATH whose `bdSeq` matches the birth's turns every twin of
//! the node Bad (CommFailure, last value); DDEATH those of the device.

use std::collections::{HashMap, HashSet};

use ferrotwin_models::{
    AssetId, AssetPath, Property, Quality, QualityReason, Reading, Timestamp, Value,
};
use ferrotwin_proto::sparkplug::payload::{Metric, metric, property_value};
use ferrotwin_proto::sparkplug::{DataType, Payload};
use prost::Message;

/// First topic level of Sparkplug B.
pub const NAMESPACE: &str = "spBv1.0";
pub const BD_SEQ: &str = "bdSeq";
pub const REBIRTH: &str = "Node Control/Rebirth";
/// Aliases a device (or a node) may declare. Bounds the memory a hostile birth can take.
pub const MAX_METRICS_PER_DEVICE: usize = 4096;
/// Devices per node (beyond the allowlist they are refused anyway).
pub const MAX_DEVICES_PER_NODE: usize = 1024;

/// Metrics the specification defines for hosts and tools: taken without a mapping, silently.
pub fn is_standard(name: &str) -> bool {
    name == BD_SEQ
        || [
            "Node Control/",
            "Device Control/",
            "Properties/",
            "Node Info/",
            "Device Info/",
        ]
        .iter()
        .any(|p| name.starts_with(p))
}

/// One allowed edge node.
#[derive(Debug, Clone)]
pub struct NodeRule {
    pub node: String,
    /// The convention's line (device `d` = machine `<line>/<d>`); `None`: only the node's
    /// explicit metrics map.
    pub line: Option<AssetPath>,
    /// Allowed devices for the convention; `None` = any device.
    pub devices: Option<HashSet<String>>,
}

/// What a metric feeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Feeds {
    /// A reading property of a twin.
    Reading(AssetId, Property),
    /// A setpoint of an asset, written with DCMD/NCMD; what the device reports of it is a
    /// read-back.
    Setpoint(AssetPath, String),
    /// A reading property that writes set too (a writable sensor value): what the device
    /// reports is both a reading and the read-back of a write.
    Written(AssetPath, Property),
}

impl Feeds {
    /// Where a write of this metric's target goes in the twin's terms, if it takes writes.
    fn write_target(&self) -> Option<(AssetPath, String)> {
        match self {
            Feeds::Setpoint(asset, property) => Some((asset.clone(), property.clone())),
            Feeds::Written(asset, property) => Some((asset.clone(), property.as_str().to_owned())),
            Feeds::Reading(..) => None,
        }
    }

    /// The reading property it feeds, if any.
    fn reading(&self) -> Option<(AssetId, Property)> {
        match self {
            Feeds::Reading(asset, property) => Some((*asset, *property)),
            Feeds::Written(asset, property) => Some((asset.id(), *property)),
            Feeds::Setpoint(..) => None,
        }
    }
}

/// One explicitly mapped metric (config `metrics`).
#[derive(Debug, Clone)]
pub struct MetricRule {
    pub node: String,
    /// `None`: a node metric (NBIRTH/NDATA; written with NCMD).
    pub device: Option<String>,
    pub metric: String,
    pub feeds: Feeds,
}

/// Message kinds of the namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    NBirth,
    NData,
    NDeath,
    DBirth,
    DData,
    DDeath,
    NCmd,
    DCmd,
    State,
}

/// A parsed topic: `spBv1.0/<group>/<kind>/<node>[/<device>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic<'a> {
    pub group: &'a str,
    pub kind: Kind,
    pub node: &'a str,
    pub device: Option<&'a str>,
}

pub fn parse_topic(topic: &str) -> Option<Topic<'_>> {
    let mut it = topic.split('/');
    if it.next()? != NAMESPACE {
        return None;
    }
    let group = it.next()?;
    let kind = match it.next()? {
        "NBIRTH" => Kind::NBirth,
        "NDATA" => Kind::NData,
        "NDEATH" => Kind::NDeath,
        "DBIRTH" => Kind::DBirth,
        "DDATA" => Kind::DData,
        "DDEATH" => Kind::DDeath,
        "NCMD" => Kind::NCmd,
        "DCMD" => Kind::DCmd,
        "STATE" => Kind::State,
        _ => return None,
    };
    let node = it.next()?;
    let device = it.next();
    if it.next().is_some() {
        return None;
    }
    let device_kind = matches!(kind, Kind::DBirth | Kind::DData | Kind::DDeath | Kind::DCmd);
    if device_kind != device.is_some() {
        return None;
    }
    Some(Topic {
        group,
        kind,
        node,
        device,
    })
}

/// `spBv1.0/<group>/<kind>/<node>[/<device>]`.
pub fn topic(group: &str, kind: &str, node: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{NAMESPACE}/{group}/{kind}/{node}/{d}"),
        None => format!("{NAMESPACE}/{group}/{kind}/{node}"),
    }
}

/// What one message produced besides readings.
#[derive(Debug, Default, PartialEq)]
pub struct Decoded {
    pub readings: Vec<Reading>,
    /// Values of setpoints and writable readings as a device reported them (asset,
    /// property, value): read-backs.
    pub echoes: Vec<(AssetPath, String, Value)>,
    /// Metrics or messages refused (unmapped, wrong type, ignored while awaiting a birth).
    pub rejected: u64,
    /// The message could not be used at all (malformed payload, wrong types).
    pub error: Option<String>,
    /// Sources nobody maps (`node`, `node/device`, `node/device/metric`), for `Unmapped`.
    pub unmapped: Vec<String>,
    /// A node whose births we need: ask it to rebirth.
    pub rebirth: Option<String>,
    /// A `seq` gap was found.
    pub seq_gap: bool,
}

#[derive(Debug, Clone)]
struct Slot {
    name: String,
    datatype: u32,
    /// What the metric feeds; `None` for the standard metrics (taken, unused).
    feeds: Option<Feeds>,
    last: Option<Value>,
}

#[derive(Debug, Default)]
struct DeviceState {
    alive: bool,
    slots: Vec<Slot>,
    by_alias: HashMap<u64, usize>,
    by_name: HashMap<String, usize>,
}

impl DeviceState {
    /// The slots of a birth's metrics that `feeds_of` maps (or that are standard), keeping
    /// each metric's last value of `previous` (a death after a rebirth still reports it).
    fn born(
        what: &str,
        payload: &Payload,
        previous: Option<&DeviceState>,
        mut feeds_of: impl FnMut(&str) -> Option<Feeds>,
        out: &mut Decoded,
    ) -> DeviceState {
        let mut d = DeviceState {
            alive: true,
            ..Default::default()
        };
        for m in &payload.metrics {
            let Some(name) = m.name.clone() else {
                out.rejected += 1;
                out.error = Some(format!("{what}: a metric without a name"));
                continue;
            };
            let feeds = feeds_of(&name);
            if feeds.is_none() && !is_standard(&name) {
                // Refused (and reported) when its value is applied below.
                continue;
            }
            let last = previous.and_then(|p| p.by_name.get(&name).and_then(|&i| p.slots[i].last));
            let i = d.slots.len();
            d.slots.push(Slot {
                name: name.clone(),
                datatype: m.datatype.unwrap_or(DataType::Unknown as u32),
                feeds,
                last,
            });
            if let Some(a) = m.alias {
                d.by_alias.insert(a, i);
            }
            d.by_name.insert(name, i);
        }
        d
    }

    /// The datatype and alias of metric `name` as the last birth gave them.
    fn address_of(&self, name: &str) -> Option<(u32, Option<u64>)> {
        let &i = self.by_name.get(name)?;
        let alias = self
            .by_alias
            .iter()
            .find(|(_, s)| **s == i)
            .map(|(a, _)| *a);
        Some((self.slots[i].datatype, alias))
    }
}

#[derive(Debug)]
struct NodeState {
    rule: NodeRule,
    born: bool,
    bd_seq: Option<u64>,
    /// The `seq` the next message must carry.
    next_seq: u8,
    /// The node's own metrics (NBIRTH, NDATA).
    own: DeviceState,
    devices: HashMap<String, DeviceState>,
    /// Explicit rules of this node: (device, metric) → what it feeds.
    explicit: HashMap<(Option<String>, String), Feeds>,
    /// Devices named by explicit rules.
    explicit_devices: HashSet<String>,
    /// When we last asked for a rebirth (µs), to ask again only after `REBIRTH_RETRY_US`.
    rebirth_asked: Option<i64>,
}

impl NodeState {
    fn new(rule: NodeRule) -> NodeState {
        NodeState {
            rule,
            born: false,
            bd_seq: None,
            next_seq: 0,
            own: DeviceState::default(),
            devices: HashMap::new(),
            explicit: HashMap::new(),
            explicit_devices: HashSet::new(),
            rebirth_asked: None,
        }
    }

    /// The machine of `device` by the convention, if the node has a line and allows it.
    fn convention_machine(&self, device: &str) -> Option<AssetPath> {
        let line = self.rule.line.as_ref()?;
        let allowed = self
            .rule
            .devices
            .as_ref()
            .is_none_or(|d| d.contains(device));
        allowed.then(|| line.child(device).ok()).flatten()
    }
}

/// How long to wait for a requested birth before asking again.
pub const REBIRTH_RETRY_US: i64 = 5_000_000;

/// A writable metric's address as the last births gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteAddress {
    pub node: String,
    /// `None`: a node metric (NCMD).
    pub device: Option<String>,
    pub metric: String,
    pub alias: Option<u64>,
    pub datatype: u32,
    /// The metric was in the last birth (its datatype and alias are the device's own).
    pub born: bool,
}

/// The host-side state of one group.
#[derive(Debug)]
pub struct SparkplugState {
    group: String,
    writable: HashSet<String>,
    nodes: HashMap<String, NodeState>,
    /// Explicit setpoints: (asset, property) → (node, device, metric).
    writes: HashMap<(AssetPath, String), (String, Option<String>, String)>,
}

impl SparkplugState {
    /// `rules`: the convention's nodes; `metrics`: explicit mappings (their nodes are allowed
    /// too); `writable`: the convention's setpoint metric names.
    pub fn new(
        group: &str,
        rules: Vec<NodeRule>,
        metrics: Vec<MetricRule>,
        writable: HashSet<String>,
    ) -> SparkplugState {
        let mut nodes: HashMap<String, NodeState> = rules
            .into_iter()
            .map(|rule| (rule.node.clone(), NodeState::new(rule)))
            .collect();
        let mut writes = HashMap::new();
        for m in metrics {
            let n = nodes.entry(m.node.clone()).or_insert_with(|| {
                NodeState::new(NodeRule {
                    node: m.node.clone(),
                    line: None,
                    devices: None,
                })
            });
            if let Some(target) = m.feeds.write_target() {
                writes.insert(target, (m.node.clone(), m.device.clone(), m.metric.clone()));
            }
            if let Some(d) = &m.device {
                n.explicit_devices.insert(d.clone());
            }
            n.explicit.insert((m.device, m.metric), m.feeds);
        }
        SparkplugState {
            group: group.to_string(),
            writable,
            nodes,
            writes,
        }
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// The allowed nodes' ids.
    pub fn node_ids(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Forgets every birth (after a reconnection: we may have missed messages); last values
    /// stay for the Bad readings of a later death.
    pub fn forget_births(&mut self) {
        for n in self.nodes.values_mut() {
            n.born = false;
            n.rebirth_asked = None;
            n.own.alive = false;
            for d in n.devices.values_mut() {
                d.alive = false;
            }
        }
    }

    /// One Bad (CommFailure) reading per metric of every node with a last value, at `now`.
    pub fn all_bad(&self, now: Timestamp, out: &mut Vec<Reading>) {
        for n in self.nodes.values() {
            bad_readings(&n.own, now, out);
            for d in n.devices.values() {
                bad_readings(d, now, out);
            }
        }
    }

    /// Records that a rebirth of `node` was requested at `now`.
    pub fn rebirth_requested(&mut self, node: &str, now: Timestamp) {
        if let Some(n) = self.nodes.get_mut(node) {
            n.rebirth_asked = Some(now.as_micros());
        }
    }

    /// Where a write of `property` of `asset` goes: its explicit metric, else (the
    /// convention) the device metric `property` of the node whose line holds the machine
    /// `asset`.
    pub fn write_address(&self, asset: &AssetPath, property: &str) -> Option<WriteAddress> {
        let (node, device, metric) = match self.writes.get(&(asset.clone(), property.to_owned())) {
            Some(w) => w.clone(),
            None => {
                let device = asset.name();
                let n = self
                    .nodes
                    .values()
                    .find(|n| n.convention_machine(device).as_ref() == Some(asset))?;
                (
                    n.rule.node.clone(),
                    Some(device.to_string()),
                    property.to_string(),
                )
            }
        };
        let n = self.nodes.get(&node)?;
        let state = match &device {
            Some(d) => n.devices.get(d),
            None => Some(&n.own),
        };
        let born = state.and_then(|d| d.address_of(&metric));
        Some(WriteAddress {
            node,
            device,
            metric,
            alias: born.and_then(|(_, a)| a),
            datatype: born.map_or(DataType::UInt16 as u32, |(t, _)| t),
            born: born.is_some(),
        })
    }

    /// Decodes one message of topic `topic` into `out`.
    pub fn handle(&mut self, topic_name: &str, payload: &[u8], now: Timestamp, out: &mut Decoded) {
        let Some(t) = parse_topic(topic_name) else {
            out.rejected += 1;
            out.unmapped.push(topic_name.to_string());
            return;
        };
        if t.group != self.group {
            out.rejected += 1;
            out.unmapped.push(format!("{}/{}", t.group, t.node));
            return;
        }
        // Commands (ours echoed back, or another host's) and host STATE are not data.
        if matches!(t.kind, Kind::NCmd | Kind::DCmd | Kind::State) {
            return;
        }
        let Some(node) = self.nodes.get_mut(t.node) else {
            out.rejected += 1;
            out.unmapped.push(t.node.to_string());
            return;
        };
        let payload = match Payload::decode(payload) {
            Ok(p) => p,
            Err(e) => {
                out.rejected += 1;
                out.error = Some(format!("not a Sparkplug B payload: {e}"));
                return;
            }
        };
        match t.kind {
            Kind::NBirth => node_birth(node, &payload, now, out),
            Kind::NDeath => {
                let bd = bd_seq_of(&payload);
                // A Will from an older session must not kill the current one.
                if node.bd_seq.is_some() && bd.is_some() && bd != node.bd_seq {
                    return;
                }
                node.born = false;
                node.own.alive = false;
                bad_readings(&node.own, now, &mut out.readings);
                for d in node.devices.values_mut() {
                    d.alive = false;
                    bad_readings(d, now, &mut out.readings);
                }
            }
            Kind::NData | Kind::DBirth | Kind::DData | Kind::DDeath => {
                if !node.born {
                    out.rejected += payload.metrics.len().max(1) as u64;
                    ask_rebirth(node, now, out);
                    return;
                }
                if !check_seq(node, &payload) {
                    out.seq_gap = true;
                    out.rejected += payload.metrics.len().max(1) as u64;
                    node.born = false;
                    node.rebirth_asked = None;
                    ask_rebirth(node, now, out);
                    return;
                }
                let device = t.device.unwrap_or_default();
                match t.kind {
                    Kind::NData => {
                        let at = node.rule.node.clone();
                        apply_metrics(&mut node.own, &payload, now, &at, out);
                    }
                    Kind::DBirth => {
                        device_birth(node, device, &self.writable, &payload, now, out);
                    }
                    Kind::DData => {
                        let at = format!("{}/{device}", t.node);
                        let Some(d) = node.devices.get_mut(device).filter(|d| d.alive) else {
                            out.rejected += payload.metrics.len() as u64;
                            out.unmapped.push(at);
                            return;
                        };
                        apply_metrics(d, &payload, now, &at, out);
                    }
                    Kind::DDeath => {
                        if let Some(d) = node.devices.get_mut(device) {
                            d.alive = false;
                            bad_readings(d, now, &mut out.readings);
                        }
                    }
                    _ => {}
                }
            }
            Kind::NCmd | Kind::DCmd | Kind::State => {}
        }
    }
}

fn ask_rebirth(node: &mut NodeState, now: Timestamp, out: &mut Decoded) {
    let due = node
        .rebirth_asked
        .is_none_or(|at| now.as_micros().saturating_sub(at) >= REBIRTH_RETRY_US);
    if due {
        node.rebirth_asked = Some(now.as_micros());
        out.rebirth = Some(node.rule.node.clone());
    }
}

fn check_seq(node: &mut NodeState, payload: &Payload) -> bool {
    match payload.seq {
        Some(s) if s == u64::from(node.next_seq) => {
            node.next_seq = node.next_seq.wrapping_add(1);
            true
        }
        _ => false,
    }
}

fn bd_seq_of(payload: &Payload) -> Option<u64> {
    payload
        .metrics
        .iter()
        .find(|m| m.name.as_deref() == Some(BD_SEQ))
        .and_then(|m| match m.value {
            Some(metric::Value::LongValue(v)) => Some(v),
            Some(metric::Value::IntValue(v)) => Some(u64::from(v)),
            _ => None,
        })
}

fn node_birth(node: &mut NodeState, payload: &Payload, now: Timestamp, out: &mut Decoded) {
    let Some(seq) = payload.seq.filter(|&s| s <= 255) else {
        out.rejected += 1;
        out.error = Some("NBIRTH without a seq in 0..=255".to_string());
        return;
    };
    if payload.metrics.len() > MAX_METRICS_PER_DEVICE {
        out.rejected += payload.metrics.len() as u64;
        out.error = Some(format!(
            "NBIRTH of {}: more than {MAX_METRICS_PER_DEVICE} metrics",
            node.rule.node
        ));
        return;
    }
    node.born = true;
    node.bd_seq = bd_seq_of(payload);
    node.next_seq = (seq as u8).wrapping_add(1);
    node.rebirth_asked = None;
    // A new birth: device births follow and redefine aliases.
    for d in node.devices.values_mut() {
        d.alive = false;
    }
    let what = format!("NBIRTH of {}", node.rule.node);
    let explicit = &node.explicit;
    let mut own = DeviceState::born(
        &what,
        payload,
        Some(&node.own),
        |name| explicit.get(&(None, name.to_string())).cloned(),
        out,
    );
    apply_metrics(&mut own, payload, now, &node.rule.node, out);
    node.own = own;
}

fn device_birth(
    node: &mut NodeState,
    device: &str,
    writable: &HashSet<String>,
    payload: &Payload,
    now: Timestamp,
    out: &mut Decoded,
) {
    let machine = node.convention_machine(device);
    if machine.is_none() && !node.explicit_devices.contains(device) {
        out.rejected += payload.metrics.len() as u64;
        out.unmapped.push(format!("{}/{device}", node.rule.node));
        return;
    }
    if payload.metrics.len() > MAX_METRICS_PER_DEVICE
        || (!node.devices.contains_key(device) && node.devices.len() >= MAX_DEVICES_PER_NODE)
    {
        out.rejected += payload.metrics.len() as u64;
        out.error = Some(format!(
            "DBIRTH of {device}: more than {MAX_METRICS_PER_DEVICE} metrics or \
             {MAX_DEVICES_PER_NODE} devices"
        ));
        return;
    }
    let previous = node.devices.remove(device);
    let explicit = &node.explicit;
    let mut case_mismatch = None;
    let mut d = DeviceState::born(
        &format!("DBIRTH of {device}"),
        payload,
        previous.as_ref(),
        |name| {
            if let Some(f) = explicit.get(&(Some(device.to_string()), name.to_string())) {
                return Some(f.clone());
            }
            let machine = machine.as_ref()?;
            if writable.contains(name) {
                return Some(Feeds::Setpoint(machine.clone(), name.to_string()));
            }
            let feeds = target_of(machine, name);
            // Sparkplug names are case-sensitive: a writable entry that differs only in
            // letter case is a typo worth naming, not just an unmapped metric.
            if feeds.is_none()
                && let Some(listed) = writable.iter().find(|w| w.eq_ignore_ascii_case(name))
            {
                case_mismatch = Some(format!(
                    "DBIRTH of {device}: metric {name:?} differs from writable_metrics entry {listed:?} only in letter case (Sparkplug names are case-sensitive; list it as {name:?})"
                ));
            }
            feeds
        },
        out,
    );
    let at = format!("{}/{device}", node.rule.node);
    apply_metrics(&mut d, payload, now, &at, out);
    if let Some(e) = case_mismatch {
        out.error = Some(e);
    }
    node.devices.insert(device.to_string(), d);
}

/// The convention: what a metric named `name` of the machine at `machine` feeds.
fn target_of(machine: &AssetPath, name: &str) -> Option<Feeds> {
    match name {
        "state" => Some(Feeds::Reading(machine.id(), Property::State)),
        "good_count" => Some(Feeds::Reading(machine.id(), Property::GoodCount)),
        "scrap_count" => Some(Feeds::Reading(machine.id(), Property::ScrapCount)),
        _ => {
            let sensor = name.strip_suffix("/value")?;
            machine
                .child(sensor)
                .ok()
                .map(|p| Feeds::Reading(p.id(), Property::Value))
        }
    }
}

fn bad_readings(d: &DeviceState, now: Timestamp, out: &mut Vec<Reading>) {
    for s in &d.slots {
        if let (Some((asset, property)), Some(value)) =
            (s.feeds.as_ref().and_then(Feeds::reading), s.last)
        {
            out.push(Reading {
                asset,
                property,
                value,
                quality: Quality::bad(QualityReason::CommFailure),
                source_ts: now,
            });
        }
    }
}

/// The values of `payload`'s metrics as `d`'s slots map them; `at` (`node` or
/// `node/device`) names the source in refusals.
fn apply_metrics(
    d: &mut DeviceState,
    payload: &Payload,
    now: Timestamp,
    at: &str,
    out: &mut Decoded,
) {
    for m in &payload.metrics {
        let slot = match (&m.name, m.alias) {
            (Some(name), _) => d.by_name.get(name).copied(),
            (None, Some(alias)) => d.by_alias.get(&alias).copied(),
            (None, None) => None,
        };
        let Some(i) = slot else {
            out.rejected += 1;
            let what = m
                .name
                .clone()
                .unwrap_or_else(|| format!("alias {}", m.alias.unwrap_or_default()));
            out.unmapped.push(format!("{at}/{what}"));
            continue;
        };
        let slot = &mut d.slots[i];
        let Some(feeds) = &slot.feeds else {
            // A standard metric (bdSeq, Node Control/...): not data.
            continue;
        };
        if m.is_null == Some(true) || m.value.is_none() {
            continue;
        }
        let datatype = m.datatype.unwrap_or(slot.datatype);
        let (asset, property) = match feeds {
            Feeds::Setpoint(asset, property) => {
                // The device's report of a setpoint: a read-back, never a reading.
                match metric_value(datatype, m) {
                    Ok(v) => out.echoes.push((asset.clone(), property.clone(), v)),
                    Err(why) => {
                        out.rejected += 1;
                        out.error = Some(format!("{at} {}: {why}", slot.name));
                    }
                }
                continue;
            }
            Feeds::Reading(asset, property) => (*asset, *property),
            Feeds::Written(path, property) => (path.id(), *property),
        };
        let value = match metric_value(datatype, m).and_then(|v| fits(property, v)) {
            Ok(v) => v,
            Err(why) => {
                out.rejected += 1;
                out.error = Some(format!("{at} {}: {why}", slot.name));
                continue;
            }
        };
        let source_ts = m
            .timestamp
            .or(payload.timestamp)
            .and_then(|ms| i64::try_from(ms).ok())
            .and_then(|ms| ms.checked_mul(1000))
            .map_or(now, Timestamp);
        slot.last = Some(value);
        let quality = quality_of(m);
        // A good report of a writable value answers a write too.
        if let Feeds::Written(path, property) = feeds
            && quality.is_good()
        {
            out.echoes
                .push((path.clone(), property.as_str().to_owned(), value));
        }
        out.readings.push(Reading {
            asset,
            property,
            value,
            quality,
            source_ts,
        });
    }
}

/// Counts are integers; a sensor takes any value, a state any value its machine type maps
/// (the twin decides).
fn fits(property: Property, v: Value) -> Result<Value, String> {
    match (property, v) {
        (Property::Value | Property::State, _) | (_, Value::Int(_)) => Ok(v),
        (p, v) => Err(format!("{p} must be an integer, got {v:?}")),
    }
}

/// The `Quality` property (OPC DA code) when present: 192 and up good, 64..192 uncertain,
/// below bad.
fn quality_of(m: &Metric) -> Quality {
    let code = m.properties.as_ref().and_then(|p| {
        let i = p.keys.iter().position(|k| k == "Quality")?;
        match p.values.get(i)?.value {
            Some(property_value::Value::IntValue(v)) => Some(i64::from(v as i32)),
            Some(property_value::Value::LongValue(v)) => Some(v as i64),
            _ => None,
        }
    });
    match code {
        None => Quality::GOOD,
        Some(c) if c >= 192 => Quality::GOOD,
        Some(c) if c >= 64 => Quality::uncertain(QualityReason::SensorFailure),
        Some(_) => Quality::bad(QualityReason::SensorFailure),
    }
}

/// A metric's value as the datatype says (spec 6.4.16: narrow signed ints as two's
/// complement in `int_value`, 64-bit ones in `long_value`).
pub fn metric_value(datatype: u32, m: &Metric) -> Result<Value, String> {
    use metric::Value as V;
    let dt =
        DataType::try_from(datatype as i32).map_err(|_| format!("unknown datatype {datatype}"))?;
    let wrong = || format!("datatype {} with value {:?}", dt.as_str_name(), m.value);
    let v = match (dt, &m.value) {
        (DataType::Int8, Some(V::IntValue(v))) => Value::Int(i64::from(*v as u8 as i8)),
        (DataType::Int16, Some(V::IntValue(v))) => Value::Int(i64::from(*v as u16 as i16)),
        (DataType::Int32, Some(V::IntValue(v))) => Value::Int(i64::from(*v as i32)),
        (DataType::UInt8, Some(V::IntValue(v))) => Value::Int(i64::from(*v as u8)),
        (DataType::UInt16, Some(V::IntValue(v))) => Value::Int(i64::from(*v as u16)),
        (DataType::UInt32, Some(V::IntValue(v))) => Value::Int(i64::from(*v)),
        (DataType::Int64 | DataType::DateTime, Some(V::LongValue(v))) => Value::Int(*v as i64),
        (DataType::UInt64, Some(V::LongValue(v))) => {
            Value::Int(i64::try_from(*v).map_err(|_| format!("UInt64 {v} does not fit an i64"))?)
        }
        // Some clients send narrow unsigned ints in long_value: accept.
        (DataType::UInt8 | DataType::UInt16 | DataType::UInt32, Some(V::LongValue(v))) => {
            Value::Int(i64::try_from(*v).map_err(|_| wrong())?)
        }
        (DataType::Float, Some(V::FloatValue(v))) => Value::Float(f64::from(*v)),
        (DataType::Double, Some(V::DoubleValue(v))) => Value::Float(*v),
        (DataType::Boolean, Some(V::BooleanValue(b))) => Value::Bool(*b),
        _ => return Err(wrong()),
    };
    if !v.is_finite() {
        return Err(format!("{} is not finite", dt.as_str_name()));
    }
    Ok(v)
}

/// A metric carrying `value` as `datatype` (for DCMD).
pub fn set_metric_value(m: &mut Metric, datatype: u32, value: Value) -> Result<(), String> {
    use metric::Value as V;
    let dt = DataType::try_from(datatype as i32).unwrap_or(DataType::Unknown);
    // As the plant spec's checks: a whole float is its integer, 0 and 1 are a bool.
    let whole = match value {
        Value::Int(i) => Some(i),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
        _ => None,
    };
    let int = |lo: i64, hi: i64| match whole {
        Some(i) if (lo..=hi).contains(&i) => Ok(i),
        _ => Err(format!(
            "{value} is not an integer in {lo}..={hi} ({})",
            dt.as_str_name()
        )),
    };
    m.value = Some(match dt {
        DataType::Int8 => V::IntValue(int(i8::MIN.into(), i8::MAX.into())? as i32 as u32),
        DataType::Int16 => V::IntValue(int(i16::MIN.into(), i16::MAX.into())? as i32 as u32),
        DataType::Int32 => V::IntValue(int(i32::MIN.into(), i32::MAX.into())? as i32 as u32),
        DataType::UInt8 => V::IntValue(int(0, u8::MAX.into())? as u32),
        DataType::UInt16 => V::IntValue(int(0, u16::MAX.into())? as u32),
        DataType::UInt32 => V::IntValue(int(0, u32::MAX.into())? as u32),
        DataType::Int64 => V::LongValue(int(i64::MIN, i64::MAX)? as u64),
        DataType::UInt64 => V::LongValue(int(0, i64::MAX)? as u64),
        DataType::Float => V::FloatValue(value.as_f64() as f32),
        DataType::Double => V::DoubleValue(value.as_f64()),
        DataType::Boolean => match (value, whole) {
            (Value::Bool(b), _) => V::BooleanValue(b),
            (_, Some(i @ (0 | 1))) => V::BooleanValue(i == 1),
            (v, _) => return Err(format!("{v} is not a boolean (true, false, 0 or 1)")),
        },
        other => return Err(format!("cannot write a {} metric", other.as_str_name())),
    });
    m.datatype = Some(dt as u32);
    Ok(())
}

#[cfg(test)]
mod tests {
    use ferrotwin_models::QualityCode;
    use ferrotwin_proto::sparkplug::payload::{PropertySet, PropertyValue};
    use proptest::prelude::*;

    use super::*;

    const LINE: &str = "acme/berlin/assembly/line-1";
    const T0: Timestamp = Timestamp(1_735_689_600_000_000);

    fn state() -> SparkplugState {
        SparkplugState::new(
            "acme-berlin",
            vec![NodeRule {
                node: "assembly-line-1".into(),
                line: Some(AssetPath::parse(LINE).expect("path")),
                devices: Some(["press-1".to_string()].into()),
            }],
            vec![],
            ["speed_setpoint_pct".to_string()].into(),
        )
    }

    fn t(kind: &str, device: Option<&str>) -> String {
        topic("acme-berlin", kind, "assembly-line-1", device)
    }

    fn metric(name: Option<&str>, alias: u64, datatype: DataType, value: metric::Value) -> Metric {
        Metric {
            name: name.map(str::to_string),
            alias: Some(alias),
            datatype: name.map(|_| datatype as u32),
            timestamp: Some(1_735_689_601_000),
            value: Some(value),
            ..Default::default()
        }
    }

    fn payload(seq: Option<u64>, metrics: Vec<Metric>) -> Vec<u8> {
        Payload {
            timestamp: Some(1_735_689_601_000),
            seq,
            metrics,
            ..Default::default()
        }
        .encode_to_vec()
    }

    fn nbirth(seq: u64, bd: u64) -> Vec<u8> {
        payload(
            Some(seq),
            vec![metric(
                Some(BD_SEQ),
                0,
                DataType::UInt64,
                metric::Value::LongValue(bd),
            )],
        )
    }

    fn dbirth(seq: u64) -> Vec<u8> {
        payload(
            Some(seq),
            vec![
                metric(
                    Some("state"),
                    2,
                    DataType::Int32,
                    metric::Value::IntValue(1),
                ),
                metric(
                    Some("good_count"),
                    3,
                    DataType::UInt64,
                    metric::Value::LongValue(7),
                ),
                metric(
                    Some("speed_setpoint_pct"),
                    4,
                    DataType::UInt16,
                    metric::Value::IntValue(100),
                ),
                metric(
                    Some("oil-temp/value"),
                    5,
                    DataType::Double,
                    metric::Value::DoubleValue(40.5),
                ),
            ],
        )
    }

    fn ddata(seq: u64, temp: f64) -> Vec<u8> {
        payload(
            Some(seq),
            vec![metric(
                None,
                5,
                DataType::Double,
                metric::Value::DoubleValue(temp),
            )],
        )
    }

    fn run(s: &mut SparkplugState, topic: &str, p: &[u8]) -> Decoded {
        let mut d = Decoded::default();
        s.handle(topic, p, T0, &mut d);
        d
    }

    fn press() -> AssetPath {
        AssetPath::parse(&format!("{LINE}/press-1")).expect("path")
    }

    fn temp() -> AssetId {
        AssetPath::parse(&format!("{LINE}/press-1/oil-temp"))
            .expect("path")
            .id()
    }

    /// A state that has seen NBIRTH (seq 0) and the press's DBIRTH (seq 1).
    fn born() -> SparkplugState {
        let mut s = state();
        run(&mut s, &t("NBIRTH", None), &nbirth(0, 3));
        let d = run(&mut s, &t("DBIRTH", Some("press-1")), &dbirth(1));
        assert_eq!(d.readings.len(), 3, "{d:?}");
        s
    }

    /// An edge node named as its vendor names it: explicit rules map device and node
    /// metrics of any name; the standard ones pass silently, the rest are reported.
    #[test]
    fn explicit_rules_map_foreign_device_and_node_metrics_and_their_setpoints() {
        let path = |p: &str| AssetPath::parse(&format!("{LINE}/{p}")).expect("path");
        let rule = |device: Option<&str>, metric: &str, feeds: Feeds| MetricRule {
            node: "Edge1".into(),
            device: device.map(str::to_string),
            metric: metric.into(),
            feeds,
        };
        let filler = path("filler");
        let mut s = SparkplugState::new(
            "Plant1",
            vec![],
            vec![
                rule(
                    Some("Filler"),
                    "Temperature",
                    Feeds::Reading(path("filler/temp").id(), Property::Value),
                ),
                rule(
                    Some("Filler"),
                    "Running",
                    Feeds::Reading(filler.id(), Property::State),
                ),
                rule(
                    Some("Filler"),
                    "Speed",
                    Feeds::Setpoint(filler.clone(), "speed_setpoint_pct".into()),
                ),
                rule(
                    None,
                    "Line/Throughput",
                    Feeds::Reading(path("filler/throughput").id(), Property::Value),
                ),
                rule(
                    None,
                    "Line/Enable",
                    Feeds::Setpoint(filler.clone(), "run_enable".into()),
                ),
            ],
            HashSet::new(),
        );
        let at = |kind: &str, device: Option<&str>| topic("Plant1", kind, "Edge1", device);
        let m = |name: &str, alias: u64, dt: DataType, v: metric::Value| {
            metric(Some(name), alias, dt, v)
        };
        use metric::Value as V;
        let d = run(
            &mut s,
            &at("NBIRTH", None),
            &payload(
                Some(0),
                vec![
                    m(BD_SEQ, 0, DataType::UInt64, V::LongValue(4)),
                    m(REBIRTH, 1, DataType::Boolean, V::BooleanValue(false)),
                    m(
                        "Properties/Hardware Make",
                        2,
                        DataType::String,
                        V::StringValue("ACME".into()),
                    ),
                    m(
                        "Line/Throughput",
                        3,
                        DataType::Double,
                        V::DoubleValue(120.0),
                    ),
                    m("Line/Enable", 4, DataType::Boolean, V::BooleanValue(true)),
                    m("Line/Other", 5, DataType::Double, V::DoubleValue(1.0)),
                ],
            ),
        );
        assert_eq!(d.readings.len(), 1, "{d:?}");
        assert_eq!(d.readings[0].value, Value::Float(120.0));
        assert_eq!(
            d.echoes,
            vec![(filler.clone(), "run_enable".into(), Value::Bool(true))]
        );
        assert_eq!(
            (d.rejected, d.unmapped.clone(), d.error.clone()),
            (1, vec!["Edge1/Line/Other".to_string()], None)
        );
        let d = run(
            &mut s,
            &at("DBIRTH", Some("Filler")),
            &payload(
                Some(1),
                vec![
                    m("Temperature", 10, DataType::Float, V::FloatValue(80.5)),
                    m("Running", 11, DataType::Boolean, V::BooleanValue(true)),
                    m("Speed", 12, DataType::Float, V::FloatValue(50.0)),
                    m("Extra", 13, DataType::Int32, V::IntValue(1)),
                ],
            ),
        );
        let got: Vec<_> = d.readings.iter().map(|r| (r.property, r.value)).collect();
        assert_eq!(
            got,
            vec![
                (Property::Value, Value::Float(80.5)),
                (Property::State, Value::Bool(true))
            ]
        );
        assert_eq!(
            d.echoes,
            vec![(
                filler.clone(),
                "speed_setpoint_pct".into(),
                Value::Float(50.0)
            )]
        );
        assert_eq!(d.unmapped, vec!["Edge1/Filler/Extra".to_string()]);
        // Data by alias: a reading, a setpoint's read-back and a node metric.
        let d = run(
            &mut s,
            &at("DDATA", Some("Filler")),
            &payload(
                Some(2),
                vec![
                    metric(None, 10, DataType::Float, V::FloatValue(81.0)),
                    metric(None, 12, DataType::Float, V::FloatValue(75.0)),
                ],
            ),
        );
        assert_eq!(d.readings.len(), 1);
        assert_eq!(
            d.echoes,
            vec![(
                filler.clone(),
                "speed_setpoint_pct".into(),
                Value::Float(75.0)
            )]
        );
        let d = run(
            &mut s,
            &at("NDATA", None),
            &payload(
                Some(3),
                vec![
                    metric(None, 3, DataType::Double, V::DoubleValue(118.0)),
                    metric(None, 1, DataType::Boolean, V::BooleanValue(false)),
                ],
            ),
        );
        assert_eq!(d.readings.len(), 1);
        assert_eq!((d.rejected, d.readings[0].value), (0, Value::Float(118.0)));
        // Writes go to the metric by its own name and alias, DCMD or NCMD.
        assert_eq!(
            s.write_address(&filler, "speed_setpoint_pct"),
            Some(WriteAddress {
                node: "Edge1".into(),
                device: Some("Filler".into()),
                metric: "Speed".into(),
                alias: Some(12),
                datatype: DataType::Float as u32,
                born: true,
            })
        );
        let node_write = s.write_address(&filler, "run_enable").expect("mapped");
        assert_eq!(
            (
                node_write.device,
                node_write.metric.as_str(),
                node_write.alias
            ),
            (None, "Line/Enable", Some(4))
        );
        assert_eq!(s.write_address(&filler, "other"), None);
        // A device nobody maps; then the node's death: every mapped reading Bad.
        let d = run(
            &mut s,
            &at("DBIRTH", Some("Capper")),
            &payload(Some(4), vec![]),
        );
        assert_eq!(d.unmapped, vec!["Edge1/Capper".to_string()]);
        let d = run(
            &mut s,
            &at("NDEATH", None),
            &payload(None, vec![m(BD_SEQ, 0, DataType::UInt64, V::LongValue(4))]),
        );
        assert_eq!(d.readings.len(), 3, "{d:?}");
        assert!(
            d.readings
                .iter()
                .all(|r| r.quality.code == QualityCode::Bad)
        );
    }

    /// A writable metric listed with another letter case: the birth says so, naming both.
    #[test]
    fn a_writable_metric_listed_in_another_letter_case_is_named_at_birth() {
        let mut s = SparkplugState::new(
            "acme-berlin",
            vec![NodeRule {
                node: "assembly-line-1".into(),
                line: Some(AssetPath::parse(LINE).expect("path")),
                devices: Some(["press-1".to_string()].into()),
            }],
            vec![],
            ["Speed_Setpoint_Pct".to_string()].into(),
        );
        run(&mut s, &t("NBIRTH", None), &nbirth(0, 3));
        let d = run(&mut s, &t("DBIRTH", Some("press-1")), &dbirth(1));
        let e = d.error.expect("named");
        assert!(
            e.contains("\"speed_setpoint_pct\"")
                && e.contains("\"Speed_Setpoint_Pct\"")
                && e.contains("letter case"),
            "{e}"
        );
    }

    #[test]
    fn births_give_values_and_data_resolves_aliases_to_birth_names() {
        let mut s = state();
        let d = run(&mut s, &t("NBIRTH", None), &nbirth(0, 3));
        assert!(d.readings.is_empty() && d.error.is_none());
        let d = run(&mut s, &t("DBIRTH", Some("press-1")), &dbirth(1));
        let state_reading = d
            .readings
            .iter()
            .find(|r| r.property == Property::State)
            .expect("state");
        assert_eq!(state_reading.asset, press().id());
        assert_eq!(state_reading.value, Value::Int(1));
        assert_eq!(state_reading.source_ts, Timestamp(1_735_689_601_000_000));
        assert!(
            !d.readings
                .iter()
                .any(|r| r.asset == press().id() && r.value == Value::Int(100)),
            "the setpoint is not a reading"
        );
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(2, 41.25));
        assert_eq!(d.readings.len(), 1);
        assert_eq!(d.readings[0].asset, temp());
        assert_eq!(d.readings[0].property, Property::Value);
        assert_eq!(d.readings[0].value, Value::Float(41.25));
        assert!(d.readings[0].quality.is_good());
        assert_eq!(d.rejected, 0);
        assert_eq!(
            s.write_address(&press(), "speed_setpoint_pct"),
            Some(WriteAddress {
                node: "assembly-line-1".into(),
                device: Some("press-1".into()),
                metric: "speed_setpoint_pct".into(),
                alias: Some(4),
                datatype: DataType::UInt16 as u32,
                born: true,
            })
        );
    }

    #[test]
    fn seq_wraps_after_255_without_a_gap() {
        let mut s = born();
        for i in 2..600u64 {
            let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(i % 256, 1.0));
            assert!(!d.seq_gap, "message {i}");
            assert_eq!(d.readings.len(), 1);
        }
    }

    #[test]
    fn seq_gap_asks_for_a_rebirth_and_ignores_data_until_it_comes() {
        let mut s = born();
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(5, 1.0));
        assert!(d.seq_gap);
        assert_eq!(d.rebirth.as_deref(), Some("assembly-line-1"));
        assert!(d.readings.is_empty());
        // Further data is ignored and does not ask again right away.
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(6, 1.0));
        assert!(d.readings.is_empty() && d.rebirth.is_none() && d.rejected == 1);
        // ... but asks again once REBIRTH_RETRY_US passed.
        let mut again = Decoded::default();
        s.handle(
            &t("DDATA", Some("press-1")),
            &ddata(7, 1.0),
            Timestamp(T0.0 + REBIRTH_RETRY_US),
            &mut again,
        );
        assert!(again.rebirth.is_some());
        run(&mut s, &t("NBIRTH", None), &nbirth(0, 3));
        run(&mut s, &t("DBIRTH", Some("press-1")), &dbirth(1));
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(2, 2.0));
        assert_eq!(d.readings.len(), 1, "recovered");
    }

    #[test]
    fn data_before_any_birth_asks_for_one() {
        let mut s = state();
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(9, 1.0));
        assert_eq!(d.rebirth.as_deref(), Some("assembly-line-1"));
        assert!(d.readings.is_empty());
    }

    #[test]
    fn ndeath_with_the_birth_bdseq_turns_every_twin_bad_with_its_last_value() {
        let mut s = born();
        run(&mut s, &t("DDATA", Some("press-1")), &ddata(2, 42.0));
        // A stale Will of an older session changes nothing.
        let d = run(&mut s, &t("NDEATH", None), &nbirth(0, 2));
        assert!(d.readings.is_empty());
        let d = run(&mut s, &t("NDEATH", None), &nbirth(0, 3));
        assert_eq!(d.readings.len(), 3, "state, good_count, oil-temp");
        assert!(d.readings.iter().all(|r| r.quality == Quality::bad(QualityReason::CommFailure)
            && r.source_ts == T0));
        let temp_r = d.readings.iter().find(|r| r.asset == temp()).expect("temp");
        assert_eq!(temp_r.value, Value::Float(42.0));
        // Dead: data is ignored until a birth.
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(3, 1.0));
        assert!(d.readings.is_empty());
    }

    #[test]
    fn ddeath_turns_the_device_bad() {
        let mut s = born();
        let d = run(
            &mut s,
            &t("DDEATH", Some("press-1")),
            &payload(Some(2), vec![]),
        );
        assert_eq!(d.readings.len(), 3);
        assert!(
            d.readings
                .iter()
                .all(|r| r.quality.code == QualityCode::Bad)
        );
        let d = run(&mut s, &t("DDATA", Some("press-1")), &ddata(3, 1.0));
        assert!(d.readings.is_empty() && d.rejected == 1);
    }

    #[test]
    fn unknown_nodes_devices_and_metrics_are_refused_and_reported() {
        let mut s = born();
        let other = topic("acme-berlin", "NBIRTH", "paint-line-9", None);
        let d = run(&mut s, &other, &nbirth(0, 1));
        assert_eq!(
            (d.rejected, d.unmapped.clone()),
            (1, vec!["paint-line-9".to_string()])
        );
        let d = run(&mut s, &t("DBIRTH", Some("robot-7")), &dbirth(2));
        assert!(d.readings.is_empty() && d.rejected == 4);
        assert_eq!(d.unmapped, vec!["assembly-line-1/robot-7".to_string()]);
        let d = run(
            &mut s,
            &t("DDATA", Some("press-1")),
            &payload(
                Some(3),
                vec![metric(
                    None,
                    99,
                    DataType::Double,
                    metric::Value::DoubleValue(1.0),
                )],
            ),
        );
        assert!(d.readings.is_empty() && d.rejected == 1);
        assert_eq!(
            d.unmapped,
            vec!["assembly-line-1/press-1/alias 99".to_string()]
        );
        let d = run(&mut s, "spBv1.0/other-group/NBIRTH/x", &nbirth(0, 1));
        assert_eq!(d.rejected, 1);
    }

    #[test]
    fn wrong_types_nan_and_garbage_are_errors_not_readings() {
        let mut s = born();
        let nan = ddata(2, f64::NAN);
        let d = run(&mut s, &t("DDATA", Some("press-1")), &nan);
        assert!(d.readings.is_empty() && d.error.is_some() && d.rejected == 1);
        let wrong = payload(
            Some(3),
            vec![metric(
                None,
                2,
                DataType::Int32,
                metric::Value::StringValue("x".into()),
            )],
        );
        let d = run(&mut s, &t("DDATA", Some("press-1")), &wrong);
        assert!(d.readings.is_empty() && d.error.is_some());
        let d = run(
            &mut s,
            &t("DDATA", Some("press-1")),
            b"\xff\xff\xff not protobuf",
        );
        assert!(d.error.is_some() && d.rejected == 1);
        let ok = run(&mut s, &t("DDATA", Some("press-1")), &ddata(4, 3.0));
        assert_eq!(ok.readings.len(), 1, "keeps going");
    }

    #[test]
    fn quality_property_and_signed_ints_decode() {
        let mut m = metric(
            Some("x"),
            1,
            DataType::Int8,
            metric::Value::IntValue(0xFFFF_FFFF),
        );
        assert_eq!(metric_value(DataType::Int8 as u32, &m), Ok(Value::Int(-1)));
        m.value = Some(metric::Value::IntValue((-5i32) as u32));
        assert_eq!(metric_value(DataType::Int32 as u32, &m), Ok(Value::Int(-5)));
        m.properties = Some(PropertySet {
            keys: vec!["Quality".into()],
            values: vec![PropertyValue {
                r#type: Some(DataType::Int32 as u32),
                is_null: None,
                value: Some(property_value::Value::IntValue(0)),
            }],
        });
        assert_eq!(quality_of(&m).code, QualityCode::Bad);
        let mut w = Metric::default();
        assert!(set_metric_value(&mut w, DataType::UInt16 as u32, Value::Int(150)).is_ok());
        assert_eq!(w.value, Some(metric::Value::IntValue(150)));
        assert!(set_metric_value(&mut w, DataType::UInt16 as u32, Value::Int(70_000)).is_err());
        assert!(set_metric_value(&mut w, DataType::UInt16 as u32, Value::Float(1.5)).is_err());
        // As the plant spec checks them: a whole float is an int, 0 and 1 a bool.
        assert!(set_metric_value(&mut w, DataType::UInt16 as u32, Value::Float(120.0)).is_ok());
        assert_eq!(w.value, Some(metric::Value::IntValue(120)));
        assert!(set_metric_value(&mut w, DataType::Boolean as u32, Value::Int(0)).is_ok());
        assert_eq!(w.value, Some(metric::Value::BooleanValue(false)));
        assert!(set_metric_value(&mut w, DataType::Boolean as u32, Value::Float(1.0)).is_ok());
        assert_eq!(w.value, Some(metric::Value::BooleanValue(true)));
        let err = set_metric_value(&mut w, DataType::Boolean as u32, Value::Int(2));
        assert_eq!(err, Err("2 is not a boolean (true, false, 0 or 1)".into()));
    }

    #[test]
    fn topics_parse_only_in_the_namespace_shape() {
        assert_eq!(
            parse_topic("spBv1.0/g/DDATA/n/d"),
            Some(Topic {
                group: "g",
                kind: Kind::DData,
                node: "n",
                device: Some("d")
            })
        );
        for bad in [
            "spBv1.0/g/DDATA/n",
            "spBv1.0/g/NDATA/n/d",
            "spBv1.0/g/XDATA/n",
            "spAv1.0/g/NDATA/n",
            "spBv1.0/g/DDATA/n/d/e",
        ] {
            assert_eq!(parse_topic(bad), None, "{bad}");
        }
    }

    /// Valid messages of every kind, for mutation.
    fn valid_messages() -> Vec<(String, Vec<u8>)> {
        vec![
            (t("NBIRTH", None), nbirth(0, 3)),
            (t("DBIRTH", Some("press-1")), dbirth(1)),
            (t("DDATA", Some("press-1")), ddata(2, 1.5)),
            (t("NDEATH", None), nbirth(0, 3)),
            (t("DDEATH", Some("press-1")), payload(Some(3), vec![])),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(kind in 0usize..5, bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut s = born();
            let (topic, _) = &valid_messages()[kind];
            let mut d = Decoded::default();
            s.handle(topic, &bytes, T0, &mut d);
            for r in &d.readings {
                prop_assert!(r.value.is_finite());
            }
        }

        #[test]
        fn mutated_valid_payloads_never_panic(
            edits in proptest::collection::vec((0usize..5, any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..40)
        ) {
            let mut s = state();
            let messages = valid_messages();
            for (which, at, byte, op) in edits {
                let (topic, mut p) = messages[which].clone();
                if !p.is_empty() {
                    let i = at.index(p.len());
                    match op {
                        0 => p[i] = byte,
                        1 => p.insert(i, byte),
                        _ => { p.remove(i); }
                    }
                }
                let mut d = Decoded::default();
                s.handle(&topic, &p, T0, &mut d);
                for r in &d.readings {
                    prop_assert!(r.value.is_finite());
                }
            }
        }
    }
}
