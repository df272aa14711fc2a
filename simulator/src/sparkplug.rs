//! The plant as Sparkplug B edge nodes (Eclipse Sparkplug 3.0, payloads of
//! `ferrotwin_proto::sparkplug`), beside the JSON topics of `mqtt`.
//!
//! Naming: the group id is the site's path with `-` between segments (`acme/berlin` →
//! `acme-berlin`); each line is an edge node (its virtual PLC) named `<area>-<line>`; each
//! machine is a device named as the machine. A device's metrics: `state` (Int32),
//! `good_count` and `scrap_count` (UInt64), `speed_setpoint_pct` (UInt16, writable) and one
//! `<sensor>/value` per sensor (Double; Int64 and Boolean for the sensors that report ints
//! and bools, so the value keeps its type). Every metric has an alias, unique within its node.
//!
//! Each node has its own MQTT connection (the Will is per connection): NDEATH with the
//! session's `bdSeq` as the Will; NBIRTH (`bdSeq`, `Node Control/Rebirth`) and a DBIRTH per
//! device with every metric, name and alias, at connection, after a reconnection and on a
//! rebirth request; then a DDATA per device and step with aliases only. `seq` counts 0..=255
//! per node over NBIRTH, DBIRTH, DDATA and DDEATH and wraps; an NBIRTH starts again at 0.
//! Metric timestamps are the readings' source times in ms; a reading that is not Good carries
//! a `Quality` property (OPC DA code: 192 good, 64 uncertain, 0 bad). Clean shutdown
//! publishes a DDEATH per device and then the NDEATH.
//!
//! Commands: NCMD `Node Control/Rebirth` = true republishes the node's births; DCMD
//! `speed_setpoint_pct` (by name or alias, any integer type, 0..=200) sets the machine's speed.
//! We publish and subscribe at QoS 1 (the spec suggests 0 for data): see `mqtt`.

use std::collections::HashMap;

use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{
    AssetId, AssetPath, Property, QualityCode, Reading, Timestamp, Value, ValueType,
};
use ferrotwin_proto::sparkplug::payload::{
    Metric, PropertySet, PropertyValue, metric, property_value,
};
use ferrotwin_proto::sparkplug::{DataType, Payload};
use prost::Message;
use rumqttc::LastWill;

use crate::mapping::SPEED_SETPOINT;
use crate::mqtt::{MAX_SPEED_PCT, MqttError, MqttPublisher, QOS};

/// First topic level of every Sparkplug B message.
pub const NAMESPACE: &str = "spBv1.0";
/// Node metric: the birth/death sequence of the node's MQTT session.
pub const BD_SEQ: &str = "bdSeq";
/// Node metric: writing true asks the node to republish its births.
pub const REBIRTH: &str = "Node Control/Rebirth";
const BD_SEQ_ALIAS: u64 = 0;
const REBIRTH_ALIAS: u64 = 1;
/// Device metric aliases start here (the node's own metrics come first).
const FIRST_DEVICE_ALIAS: u64 = 2;

/// The group id of a site: its path segments joined with `-`.
pub fn group_id(site: &AssetPath) -> String {
    site.segments().collect::<Vec<_>>().join("-")
}

/// The edge node id of a line: `<area>-<line>`, unique within the site.
pub fn node_id(line: &AssetPath) -> String {
    let segments: Vec<&str> = line.segments().collect();
    segments[segments.len().saturating_sub(2)..].join("-")
}

/// `spBv1.0/<group>/<kind>/<node>[/<device>]`.
pub fn topic(group: &str, kind: &str, node: &str, device: Option<&str>) -> String {
    match device {
        Some(d) => format!("{NAMESPACE}/{group}/{kind}/{node}/{d}"),
        None => format!("{NAMESPACE}/{group}/{kind}/{node}"),
    }
}

/// One metric of a device.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricDef {
    pub name: String,
    pub alias: u64,
    pub datatype: DataType,
    /// The reading it carries; `None` for the setpoint (written, not read).
    pub reads: Option<(AssetId, Property)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceDef {
    pub id: String,
    pub machine: AssetPath,
    pub metrics: Vec<MetricDef>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeDef {
    pub group: String,
    pub id: String,
    pub line: AssetPath,
    pub devices: Vec<DeviceDef>,
}

/// The Sparkplug names and aliases of a plant.
#[derive(Debug, Clone)]
pub struct Layout {
    pub nodes: Vec<NodeDef>,
    /// (asset, property) → (node, device, metric) indices.
    slots: HashMap<(AssetId, Property), (usize, usize, usize)>,
}

impl Layout {
    pub fn of(spec: &PlantSpec) -> Layout {
        let mut nodes: Vec<NodeDef> = Vec::new();
        let mut node_of_line: HashMap<AssetPath, usize> = HashMap::new();
        let mut device_of_machine: HashMap<AssetPath, (usize, usize)> = HashMap::new();
        let mut next_alias: Vec<u64> = Vec::new();
        for a in spec.assets() {
            match &a.kind {
                AssetKind::Machine { .. } => {
                    let Some(line) = a.path.parent() else {
                        continue;
                    };
                    let Some(site) = line.parent().and_then(|area| area.parent()) else {
                        continue;
                    };
                    let n = *node_of_line.entry(line.clone()).or_insert_with(|| {
                        nodes.push(NodeDef {
                            group: group_id(&site),
                            id: node_id(&line),
                            line: line.clone(),
                            devices: Vec::new(),
                        });
                        next_alias.push(FIRST_DEVICE_ALIAS);
                        nodes.len() - 1
                    });
                    let id = a.path.id();
                    let mut metric = |name: &str, datatype, reads| {
                        let alias = next_alias[n];
                        next_alias[n] += 1;
                        MetricDef {
                            name: name.to_string(),
                            alias,
                            datatype,
                            reads,
                        }
                    };
                    let metrics = vec![
                        metric("state", DataType::Int32, Some((id, Property::State))),
                        metric(
                            "good_count",
                            DataType::UInt64,
                            Some((id, Property::GoodCount)),
                        ),
                        metric(
                            "scrap_count",
                            DataType::UInt64,
                            Some((id, Property::ScrapCount)),
                        ),
                        metric(SPEED_SETPOINT, DataType::UInt16, None),
                    ];
                    nodes[n].devices.push(DeviceDef {
                        id: a.path.name().to_string(),
                        machine: a.path.clone(),
                        metrics,
                    });
                    device_of_machine.insert(a.path.clone(), (n, nodes[n].devices.len() - 1));
                }
                AssetKind::Sensor { spec: s, .. } => {
                    let Some(&(n, d)) = a.path.parent().and_then(|m| device_of_machine.get(&m))
                    else {
                        continue;
                    };
                    let datatype = match s.value_type {
                        ValueType::Float => DataType::Double,
                        ValueType::Int => DataType::Int64,
                        ValueType::Bool => DataType::Boolean,
                    };
                    let alias = next_alias[n];
                    next_alias[n] += 1;
                    nodes[n].devices[d].metrics.push(MetricDef {
                        name: format!("{}/value", a.path.name()),
                        alias,
                        datatype,
                        reads: Some((a.path.id(), Property::Value)),
                    });
                }
                _ => {}
            }
        }
        let mut slots = HashMap::new();
        for (n, node) in nodes.iter().enumerate() {
            for (d, device) in node.devices.iter().enumerate() {
                for (m, metric) in device.metrics.iter().enumerate() {
                    if let Some(key) = metric.reads {
                        slots.insert(key, (n, d, m));
                    }
                }
            }
        }
        Layout { nodes, slots }
    }

    /// Where a reading goes: (node, device, metric) indices.
    pub fn locate(&self, r: &Reading) -> Option<(usize, usize, usize)> {
        self.slots.get(&(r.asset, r.property)).copied()
    }
}

/// Sets a metric's value: the datatype says which field (spec 6.4.16; signed ints as two's
/// complement).
pub fn set_value(m: &mut Metric, datatype: DataType, value: Value) {
    use metric::Value as V;
    m.value = Some(match (datatype, value) {
        (DataType::Boolean, v) => V::BooleanValue(v.as_f64() != 0.0),
        (DataType::Float, v) => V::FloatValue(v.as_f64() as f32),
        (DataType::Double, v) => V::DoubleValue(v.as_f64()),
        (
            DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32,
            v,
        ) => V::IntValue(as_int(v) as i32 as u32),
        (_, v) => V::LongValue(as_int(v) as u64),
    });
}

fn as_int(v: Value) -> i64 {
    match v {
        Value::Int(i) => i,
        Value::Float(f) => f as i64,
        Value::Bool(b) => i64::from(b),
    }
}

/// OPC DA quality codes, the usual Sparkplug `Quality` property.
fn quality_code(q: QualityCode) -> u32 {
    match q {
        QualityCode::Good => 192,
        QualityCode::Uncertain => 64,
        QualityCode::Bad => 0,
    }
}

fn ms(t: Timestamp) -> u64 {
    u64::try_from(t.as_millis()).unwrap_or(0)
}

/// A metric's latest value as the births report it.
#[derive(Debug, Clone, Copy)]
struct Latest {
    value: Value,
    quality: QualityCode,
    at: Timestamp,
}

fn metric_of(def: &MetricDef, latest: Option<Latest>, with_name: bool) -> Metric {
    let mut m = Metric {
        alias: Some(def.alias),
        ..Default::default()
    };
    if with_name {
        m.name = Some(def.name.clone());
        m.datatype = Some(def.datatype as u32);
    }
    match latest {
        Some(l) => {
            m.timestamp = Some(ms(l.at));
            set_value(&mut m, def.datatype, l.value);
            if l.quality != QualityCode::Good {
                m.properties = Some(PropertySet {
                    keys: vec!["Quality".to_string()],
                    values: vec![PropertyValue {
                        r#type: Some(DataType::Int32 as u32),
                        is_null: None,
                        value: Some(property_value::Value::IntValue(quality_code(l.quality))),
                    }],
                });
            }
        }
        None => m.is_null = Some(true),
    }
    m
}

/// The NDEATH (and Will) of a session: only `bdSeq`, no `seq`.
pub fn ndeath_payload(bd_seq: u64, now: Timestamp) -> Vec<u8> {
    Payload {
        timestamp: Some(ms(now)),
        metrics: vec![Metric {
            name: Some(BD_SEQ.to_string()),
            datatype: Some(DataType::UInt64 as u32),
            value: Some(metric::Value::LongValue(bd_seq)),
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

/// One edge node's connection and sequence state.
struct EdgeNode {
    publisher: MqttPublisher,
    seq: u8,
    bd_seq: u64,
    /// Per device, per metric.
    latest: Vec<Vec<Option<Latest>>>,
    born: bool,
}

impl EdgeNode {
    fn next_seq(&mut self) -> u64 {
        let s = self.seq;
        self.seq = self.seq.wrapping_add(1);
        u64::from(s)
    }
}

/// What a command asks of the simulation.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Rebirth { node: usize },
    Speed { machine: AssetId, pct: u16 },
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SparkplugCommandError {
    #[error("{topic}: not an NCMD or DCMD of one of our nodes")]
    Topic { topic: String },
    #[error("{topic}: not a Sparkplug B payload: {why}")]
    Payload { topic: String, why: String },
    #[error("{topic}: metric {metric} is not writable here")]
    Metric { topic: String, metric: String },
    #[error("{topic}: {metric} = {value} (expected {expected})")]
    Value {
        topic: String,
        metric: String,
        value: String,
        expected: String,
    },
}

/// Where the nodes' connections send the commands they receive: node `i` as client number
/// `first_client + i`.
pub struct CommandRoute {
    pub first_client: usize,
    pub inbound: tokio::sync::mpsc::Sender<crate::mqtt::Inbound>,
    pub stats: std::sync::Arc<crate::mqtt::CommandStats>,
}

/// The plant's Sparkplug B edge nodes, connected.
pub struct SparkplugOut {
    layout: Layout,
    nodes: Vec<EdgeNode>,
    /// Client numbers of the nodes' connections on the inbound channel: `first_client + i`.
    first_client: usize,
    /// DDATA under construction, per node and device.
    scratch: Vec<Vec<Vec<Metric>>>,
}

impl SparkplugOut {
    /// Connects one client per edge node (Will = NDEATH, subscribed to its NCMD and DCMDs),
    /// messages going to `inbound` tagged `first_client + node index`. Births follow with
    /// `birth_all`.
    pub async fn connect(
        spec: &PlantSpec,
        host: &str,
        port: u16,
        client_prefix: &str,
        now: Timestamp,
        commands: CommandRoute,
    ) -> Result<SparkplugOut, MqttError> {
        let CommandRoute {
            first_client,
            inbound,
            stats,
        } = commands;
        let layout = Layout::of(spec);
        let mut nodes = Vec::new();
        for (i, def) in layout.nodes.iter().enumerate() {
            // One session per process run: bdSeq 0 (rumqttc keeps the Will, and so the
            // bdSeq, across its own reconnections).
            let bd_seq = 0;
            let will = LastWill::new(
                topic(&def.group, "NDEATH", &def.id, None),
                ndeath_payload(bd_seq, now),
                QOS,
                false,
            );
            let session = crate::mqtt::Session {
                will: Some(will),
                subscriptions: vec![
                    topic(&def.group, "NCMD", &def.id, None),
                    topic(&def.group, "DCMD", &def.id, Some("+")),
                ],
                inbound: Some((first_client + i, inbound.clone(), stats.clone())),
            };
            let client_id = format!("{client_prefix}-{}-{}", def.group, def.id);
            let publisher = MqttPublisher::connect_with(host, port, &client_id, session).await?;
            nodes.push(EdgeNode {
                publisher,
                seq: 0,
                bd_seq,
                latest: def
                    .devices
                    .iter()
                    .map(|d| vec![None; d.metrics.len()])
                    .collect(),
                born: false,
            });
        }
        Ok(SparkplugOut {
            layout,
            nodes,
            first_client,
            scratch: Vec::new(),
        })
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The node whose connection is client number `client`.
    pub fn node_of_client(&self, client: usize) -> Option<usize> {
        client
            .checked_sub(self.first_client)
            .filter(|&n| n < self.nodes.len())
    }

    /// NBIRTH and every DBIRTH of `node`; `speed` gives a machine's current setpoint.
    pub async fn birth(
        &mut self,
        node: usize,
        now: Timestamp,
        speed: impl Fn(AssetId) -> Option<u16>,
    ) -> Result<(), MqttError> {
        let def = &self.layout.nodes[node];
        let n = &mut self.nodes[node];
        n.seq = 0;
        let nbirth = Payload {
            timestamp: Some(ms(now)),
            seq: Some(n.next_seq()),
            metrics: vec![
                Metric {
                    name: Some(BD_SEQ.to_string()),
                    alias: Some(BD_SEQ_ALIAS),
                    timestamp: Some(ms(now)),
                    datatype: Some(DataType::UInt64 as u32),
                    value: Some(metric::Value::LongValue(n.bd_seq)),
                    ..Default::default()
                },
                Metric {
                    name: Some(REBIRTH.to_string()),
                    alias: Some(REBIRTH_ALIAS),
                    timestamp: Some(ms(now)),
                    datatype: Some(DataType::Boolean as u32),
                    value: Some(metric::Value::BooleanValue(false)),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        n.publisher
            .publish_to(
                topic(&def.group, "NBIRTH", &def.id, None),
                nbirth.encode_to_vec(),
            )
            .await?;
        for (d, device) in def.devices.iter().enumerate() {
            let metrics = device
                .metrics
                .iter()
                .enumerate()
                .map(|(m, md)| {
                    let latest = match md.reads {
                        Some(_) => n.latest[d][m],
                        None => speed(device.machine.id()).map(|pct| Latest {
                            value: Value::Int(i64::from(pct)),
                            quality: QualityCode::Good,
                            at: now,
                        }),
                    };
                    metric_of(md, latest, true)
                })
                .collect();
            let dbirth = Payload {
                timestamp: Some(ms(now)),
                seq: Some(n.next_seq()),
                metrics,
                ..Default::default()
            };
            n.publisher
                .publish_to(
                    topic(&def.group, "DBIRTH", &def.id, Some(&device.id)),
                    dbirth.encode_to_vec(),
                )
                .await?;
        }
        n.born = true;
        Ok(())
    }

    /// Updates what the next births report, publishing nothing.
    pub fn remember<'a>(&mut self, readings: impl IntoIterator<Item = &'a Reading>) {
        for r in readings {
            if let Some((n, d, m)) = self.layout.locate(r) {
                self.nodes[n].latest[d][m] = Some(Latest {
                    value: r.value,
                    quality: r.quality.code,
                    at: r.source_ts,
                });
            }
        }
    }

    /// Births of every node.
    pub async fn birth_all(
        &mut self,
        now: Timestamp,
        speed: impl Fn(AssetId) -> Option<u16>,
    ) -> Result<(), MqttError> {
        for i in 0..self.nodes.len() {
            self.birth(i, now, &speed).await?;
        }
        Ok(())
    }

    /// A DDATA per device with readings in `readings` (aliases only), per node in order.
    /// Returns how many messages went out.
    pub async fn publish(
        &mut self,
        readings: &[Reading],
        now: Timestamp,
    ) -> Result<usize, MqttError> {
        let mut sent = 0;
        // One pass over the step's readings, into [node][device] metric lists.
        self.scratch.resize_with(self.layout.nodes.len(), Vec::new);
        for (scratch, def) in self.scratch.iter_mut().zip(&self.layout.nodes) {
            scratch.resize_with(def.devices.len(), Vec::new);
        }
        for r in readings {
            let Some((n, d, m)) = self.layout.locate(r) else {
                continue;
            };
            let latest = Latest {
                value: r.value,
                quality: r.quality.code,
                at: r.source_ts,
            };
            self.nodes[n].latest[d][m] = Some(latest);
            let def = &self.layout.nodes[n].devices[d].metrics[m];
            self.scratch[n][d].push(metric_of(def, Some(latest), false));
        }
        for (node, (n, scratch)) in self.nodes.iter_mut().zip(&mut self.scratch).enumerate() {
            let def = &self.layout.nodes[node];
            for (d, metrics) in scratch.iter_mut().enumerate() {
                if metrics.is_empty() {
                    continue;
                }
                let metrics = std::mem::take(metrics);
                // Before the birth there is no alias table to refer to: values only update
                // what the birth will report.
                if !n.born {
                    continue;
                }
                let ddata = Payload {
                    timestamp: Some(ms(now)),
                    seq: Some(n.next_seq()),
                    metrics,
                    ..Default::default()
                };
                n.publisher
                    .publish_to(
                        topic(&def.group, "DDATA", &def.id, Some(&def.devices[d].id)),
                        ddata.encode_to_vec(),
                    )
                    .await?;
                sent += 1;
            }
        }
        Ok(sent)
    }

    /// A DDATA of one device's setpoint (after a command changed it).
    pub async fn publish_setpoint(
        &mut self,
        machine: AssetId,
        pct: u16,
        now: Timestamp,
    ) -> Result<(), MqttError> {
        for (node, def) in self.layout.nodes.iter().enumerate() {
            for device in &def.devices {
                if device.machine.id() != machine {
                    continue;
                }
                let Some(md) = device.metrics.iter().find(|m| m.name == SPEED_SETPOINT) else {
                    continue;
                };
                let n = &mut self.nodes[node];
                let latest = Latest {
                    value: Value::Int(i64::from(pct)),
                    quality: QualityCode::Good,
                    at: now,
                };
                let ddata = Payload {
                    timestamp: Some(ms(now)),
                    seq: Some(n.next_seq()),
                    metrics: vec![metric_of(md, Some(latest), false)],
                    ..Default::default()
                };
                return n
                    .publisher
                    .publish_to(
                        topic(&def.group, "DDATA", &def.id, Some(&device.id)),
                        ddata.encode_to_vec(),
                    )
                    .await;
            }
        }
        Ok(())
    }

    /// What an NCMD or DCMD that arrived on node `node`'s connection asks.
    pub fn command(
        &self,
        node: usize,
        topic_name: &str,
        payload: &[u8],
    ) -> Result<Command, SparkplugCommandError> {
        let def = &self.layout.nodes[node];
        let topic_err = || SparkplugCommandError::Topic {
            topic: topic_name.to_string(),
        };
        let parts: Vec<&str> = topic_name.split('/').collect();
        let (kind, device) = match parts.as_slice() {
            [ns, g, kind, n] if *ns == NAMESPACE && *g == def.group && *n == def.id => {
                (*kind, None)
            }
            [ns, g, kind, n, d] if *ns == NAMESPACE && *g == def.group && *n == def.id => {
                (*kind, Some(*d))
            }
            _ => return Err(topic_err()),
        };
        let payload = Payload::decode(payload).map_err(|e| SparkplugCommandError::Payload {
            topic: topic_name.to_string(),
            why: e.to_string(),
        })?;
        let metric_err = |m: &Metric| SparkplugCommandError::Metric {
            topic: topic_name.to_string(),
            metric: m
                .name
                .clone()
                .unwrap_or_else(|| format!("alias {}", m.alias.unwrap_or_default())),
        };
        let Some(m) = payload.metrics.first() else {
            return Err(SparkplugCommandError::Payload {
                topic: topic_name.to_string(),
                why: "no metric".to_string(),
            });
        };
        match (kind, device) {
            ("NCMD", None) => {
                let is_rebirth = m.name.as_deref() == Some(REBIRTH)
                    || (m.name.is_none() && m.alias == Some(REBIRTH_ALIAS));
                if !is_rebirth {
                    return Err(metric_err(m));
                }
                match m.value {
                    Some(metric::Value::BooleanValue(true)) => Ok(Command::Rebirth { node }),
                    _ => Err(SparkplugCommandError::Value {
                        topic: topic_name.to_string(),
                        metric: REBIRTH.to_string(),
                        value: format!("{:?}", m.value),
                        expected: "boolean true".to_string(),
                    }),
                }
            }
            ("DCMD", Some(device)) => {
                let dev = def
                    .devices
                    .iter()
                    .find(|d| d.id == device)
                    .ok_or_else(topic_err)?;
                let md = dev
                    .metrics
                    .iter()
                    .find(|md| match &m.name {
                        Some(name) => *name == md.name,
                        None => m.alias == Some(md.alias),
                    })
                    .filter(|md| md.name == SPEED_SETPOINT)
                    .ok_or_else(|| metric_err(m))?;
                let pct = match m.value {
                    Some(metric::Value::IntValue(v)) => Some(u64::from(v)),
                    Some(metric::Value::LongValue(v)) => Some(v),
                    _ => None,
                }
                .filter(|&v| v <= u64::from(MAX_SPEED_PCT));
                match pct {
                    Some(pct) => Ok(Command::Speed {
                        machine: dev.machine.id(),
                        pct: pct as u16,
                    }),
                    None => Err(SparkplugCommandError::Value {
                        topic: topic_name.to_string(),
                        metric: md.name.clone(),
                        value: format!("{:?}", m.value),
                        expected: format!("an integer 0..={MAX_SPEED_PCT}"),
                    }),
                }
            }
            _ => Err(topic_err()),
        }
    }

    /// Clean shutdown: a DDEATH per device, the NDEATH, then DISCONNECT (the broker then
    /// discards the Will).
    pub async fn shutdown(mut self, now: Timestamp) {
        for (node, def) in self.layout.nodes.iter().enumerate() {
            let n = &mut self.nodes[node];
            for device in &def.devices {
                let ddeath = Payload {
                    timestamp: Some(ms(now)),
                    seq: Some(n.next_seq()),
                    ..Default::default()
                };
                let _ = n
                    .publisher
                    .publish_to(
                        topic(&def.group, "DDEATH", &def.id, Some(&device.id)),
                        ddeath.encode_to_vec(),
                    )
                    .await;
            }
            let _ = n
                .publisher
                .publish_to(
                    topic(&def.group, "NDEATH", &def.id, None),
                    ndeath_payload(n.bd_seq, now),
                )
                .await;
            n.publisher.disconnect_in_place().await;
        }
    }

    /// Drops every node's connection without DISCONNECT, as a crash would (tests of the Will).
    pub fn abort(self) {
        for n in self.nodes {
            n.publisher.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::time::Duration;

    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet};

    use super::*;
    use crate::generate::{PlantSize, generate};
    use crate::model::PlantSim;
    use crate::mqtt::{CommandStats, EmbeddedBroker, Inbound};
    use crate::run::RUN_START;

    fn line_plant() -> PlantSpec {
        generate(PlantSize::ONE_LINE, 1)
    }

    /// A client subscribed to `filter`, SUBACK received.
    async fn subscriber(
        broker: &EmbeddedBroker,
        id: &str,
        filter: &str,
    ) -> (AsyncClient, EventLoop) {
        let addr = broker.addr();
        let mut options = MqttOptions::new(id, addr.ip().to_string(), addr.port());
        options.set_keep_alive(Duration::from_secs(30));
        let (client, mut eventloop) = AsyncClient::new(options, 100);
        client.subscribe(filter, QOS).await.expect("queued");
        tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                if let Event::Incoming(Packet::SubAck(_)) =
                    eventloop.poll().await.expect("subscriber connected")
                {
                    return;
                }
            }
        })
        .await
        .expect("SUBACK within 5 s");
        (client, eventloop)
    }

    /// Messages until `done` says so (or 10 s pass): (topic, payload) in arrival order.
    async fn receive_until(
        eventloop: &mut EventLoop,
        mut done: impl FnMut(&[(String, Payload)]) -> bool,
    ) -> Vec<(String, Payload)> {
        let mut got = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while !done(&got) {
                if let Event::Incoming(Packet::Publish(p)) =
                    eventloop.poll().await.expect("subscriber connected")
                {
                    let payload = Payload::decode(&p.payload[..]).expect("a Sparkplug payload");
                    got.push((p.topic.clone(), payload));
                }
            }
        })
        .await;
        got
    }

    fn kind(topic: &str) -> &str {
        topic.split('/').nth(2).expect("spBv1.0/group/kind/...")
    }

    async fn connected(
        broker: &EmbeddedBroker,
        spec: &PlantSpec,
    ) -> (SparkplugOut, tokio::sync::mpsc::Receiver<Inbound>) {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let out = SparkplugOut::connect(
            spec,
            "127.0.0.1",
            broker.addr().port(),
            "sp-test",
            RUN_START,
            CommandRoute {
                first_client: 1,
                inbound: tx,
                stats: Arc::new(CommandStats::default()),
            },
        )
        .await
        .expect("nodes connect");
        (out, rx)
    }

    #[test]
    fn names_follow_the_plant() {
        let spec = line_plant();
        let layout = Layout::of(&spec);
        assert_eq!(layout.nodes.len(), 1);
        let node = &layout.nodes[0];
        assert_eq!(node.group, "acme-berlin");
        assert_eq!(node.id, format!("{}", node_id(&node.line)));
        assert_eq!(node.devices.len(), 3);
        let mut aliases = std::collections::HashSet::new();
        for d in &node.devices {
            assert_eq!(d.id, d.machine.name());
            for m in &d.metrics {
                assert!(
                    aliases.insert(m.alias),
                    "alias {} unique in the node",
                    m.alias
                );
            }
            let names: Vec<&str> = d.metrics.iter().map(|m| m.name.as_str()).collect();
            for n in ["state", "good_count", "scrap_count", "speed_setpoint_pct"] {
                assert!(names.contains(&n), "{n} in {names:?}");
            }
            assert!(names.iter().any(|n| n.ends_with("/value")));
        }
    }

    #[tokio::test]
    async fn births_come_first_and_data_aliases_resolve_to_birth_names_with_seq_wrapping() {
        let broker = EmbeddedBroker::start().expect("broker starts");
        let (_c, mut sub) = subscriber(&broker, "sp-sub", "spBv1.0/#").await;
        let spec = line_plant();
        let (mut out, _rx) = connected(&broker, &spec).await;
        let mut sim = PlantSim::new(&spec, 3, RUN_START);
        out.birth_all(RUN_START, |m| sim.speed_pct(m))
            .await
            .expect("births");
        let mut readings = Vec::new();
        let mut published = 1 + 3;
        let mut sent_readings = Vec::new();
        let mut s = 1;
        // Enough messages for seq to wrap past 255.
        while published < 300 {
            readings.clear();
            sim.step(RUN_START.plus_ms(s * 1000), &mut readings);
            published += out.publish(&readings, sim.now()).await.expect("published");
            sent_readings.extend_from_slice(&readings);
            s += 1;
        }
        let got = receive_until(&mut sub, |g| g.len() >= published).await;
        assert_eq!(got.len(), published);
        assert_eq!(kind(&got[0].0), "NBIRTH");
        assert!(got[1..4].iter().all(|(t, _)| kind(t) == "DBIRTH"));
        assert!(got[4..].iter().all(|(t, _)| kind(t) == "DDATA"));
        let nbirth = &got[0].1;
        assert_eq!(nbirth.seq, Some(0));
        let names: Vec<_> = nbirth
            .metrics
            .iter()
            .filter_map(|m| m.name.clone())
            .collect();
        assert_eq!(names, vec![BD_SEQ.to_string(), REBIRTH.to_string()]);

        // seq: +1 per message of the node, wrapping after 255.
        for (i, (t, p)) in got.iter().enumerate() {
            assert_eq!(p.seq, Some((i % 256) as u64), "{t} #{i}");
        }

        // Every DDATA metric: alias only, known from that device's DBIRTH, a timestamp.
        let mut births: HashMap<String, HashMap<u64, (String, u32)>> = HashMap::new();
        for (t, p) in &got[1..4] {
            let device = t.rsplit('/').next().expect("device").to_string();
            let table = p
                .metrics
                .iter()
                .map(|m| {
                    (
                        m.alias.expect("alias"),
                        (m.name.clone().expect("name"), m.datatype.expect("datatype")),
                    )
                })
                .collect();
            births.insert(device, table);
        }
        let layout = out.layout().clone();
        let mut resolved = 0;
        for (t, p) in &got[4..] {
            let device = t.rsplit('/').next().expect("device");
            let table = &births[device];
            for m in &p.metrics {
                assert!(m.name.is_none(), "data by alias only");
                let (name, datatype) = &table[&m.alias.expect("alias")];
                assert!(m.timestamp.is_some());
                if name == "state" {
                    assert_eq!(*datatype, DataType::Int32 as u32);
                    assert!(matches!(m.value, Some(metric::Value::IntValue(_))));
                }
                resolved += 1;
            }
        }
        assert_eq!(resolved, sent_readings.len(), "every reading went out once");
        // One reading's value and time arrive as sent.
        let last = sent_readings
            .iter()
            .rev()
            .find(|r| r.property == Property::Value && matches!(r.value, Value::Float(_)))
            .expect("a float sensor reading");
        let (n, d, m) = layout.locate(last).expect("in the layout");
        let def = &layout.nodes[n].devices[d];
        let alias = def.metrics[m].alias;
        let seen = got
            .iter()
            .rev()
            .filter(|(t, _)| t.ends_with(&format!("/{}", def.id)) && kind(t) == "DDATA")
            .flat_map(|(_, p)| p.metrics.iter())
            .find(|x| x.alias == Some(alias))
            .expect("sent");
        assert_eq!(
            seen.value,
            Some(metric::Value::DoubleValue(last.value.as_f64()))
        );
        assert_eq!(seen.timestamp, Some(last.source_ts.as_millis() as u64));
        out.shutdown(sim.now()).await;
    }

    #[tokio::test]
    async fn clean_shutdown_publishes_ddeaths_then_ndeath_with_the_birth_bdseq() {
        let broker = EmbeddedBroker::start().expect("broker starts");
        let (_c, mut sub) = subscriber(&broker, "sp-sub2", "spBv1.0/#").await;
        let spec = line_plant();
        let (mut out, _rx) = connected(&broker, &spec).await;
        out.birth_all(RUN_START, |_| Some(100))
            .await
            .expect("births");
        out.shutdown(RUN_START).await;
        let got = receive_until(&mut sub, |g| g.iter().any(|(t, _)| kind(t) == "NDEATH")).await;
        let kinds: Vec<&str> = got.iter().map(|(t, _)| kind(t)).collect();
        assert_eq!(
            kinds,
            [
                "NBIRTH", "DBIRTH", "DBIRTH", "DBIRTH", "DDEATH", "DDEATH", "DDEATH", "NDEATH"
            ]
        );
        let bd = |p: &Payload| {
            p.metrics
                .iter()
                .find(|m| m.name.as_deref() == Some(BD_SEQ))
                .and_then(|m| m.value.clone())
        };
        assert_eq!(bd(&got[0].1), bd(&got[7].1));
        assert!(bd(&got[7].1).is_some());
        assert_eq!(got[7].1.seq, None, "NDEATH has no seq");
    }

    #[tokio::test]
    async fn dropped_connection_makes_the_broker_publish_the_ndeath_will() {
        let broker = EmbeddedBroker::start().expect("broker starts");
        let (_c, mut sub) = subscriber(&broker, "sp-sub3", "spBv1.0/+/NDEATH/#").await;
        let spec = line_plant();
        let (mut out, _rx) = connected(&broker, &spec).await;
        out.birth_all(RUN_START, |_| Some(100))
            .await
            .expect("births");
        out.abort();
        let got = receive_until(&mut sub, |g| !g.is_empty()).await;
        assert_eq!(got.len(), 1, "the Will arrived");
        let (t, p) = &got[0];
        assert_eq!(kind(t), "NDEATH");
        assert_eq!(p.metrics[0].name.as_deref(), Some(BD_SEQ));
        assert_eq!(p.metrics[0].value, Some(metric::Value::LongValue(0)));
    }

    #[tokio::test]
    async fn commands_parse_by_name_or_alias_and_bad_ones_are_refused() {
        let broker = EmbeddedBroker::start().expect("broker starts");
        let spec = line_plant();
        let (out, _rx) = connected(&broker, &spec).await;
        let node = &out.layout().nodes[0];
        let dev = &node.devices[0];
        let sp = dev
            .metrics
            .iter()
            .find(|m| m.name == SPEED_SETPOINT)
            .expect("setpoint");
        let dcmd = topic(&node.group, "DCMD", &node.id, Some(&dev.id));
        let ncmd = topic(&node.group, "NCMD", &node.id, None);
        let payload = |m: Metric| {
            Payload {
                metrics: vec![m],
                ..Default::default()
            }
            .encode_to_vec()
        };
        let by_name = payload(Metric {
            name: Some(SPEED_SETPOINT.into()),
            value: Some(metric::Value::IntValue(150)),
            ..Default::default()
        });
        assert_eq!(
            out.command(0, &dcmd, &by_name),
            Ok(Command::Speed {
                machine: dev.machine.id(),
                pct: 150
            })
        );
        let by_alias = payload(Metric {
            alias: Some(sp.alias),
            value: Some(metric::Value::LongValue(0)),
            ..Default::default()
        });
        assert_eq!(
            out.command(0, &dcmd, &by_alias),
            Ok(Command::Speed {
                machine: dev.machine.id(),
                pct: 0
            })
        );
        let rebirth = payload(Metric {
            name: Some(REBIRTH.into()),
            value: Some(metric::Value::BooleanValue(true)),
            ..Default::default()
        });
        assert_eq!(
            out.command(0, &ncmd, &rebirth),
            Ok(Command::Rebirth { node: 0 })
        );
        let too_fast = payload(Metric {
            name: Some(SPEED_SETPOINT.into()),
            value: Some(metric::Value::IntValue(201)),
            ..Default::default()
        });
        assert!(matches!(
            out.command(0, &dcmd, &too_fast),
            Err(SparkplugCommandError::Value { .. })
        ));
        let state = payload(Metric {
            name: Some("state".into()),
            value: Some(metric::Value::IntValue(1)),
            ..Default::default()
        });
        assert!(matches!(
            out.command(0, &dcmd, &state),
            Err(SparkplugCommandError::Metric { .. })
        ));
        assert!(matches!(
            out.command(0, &dcmd, b"\xff\xff garbage"),
            Err(SparkplugCommandError::Payload { .. })
        ));
        let stranger = topic(&node.group, "DCMD", &node.id, Some("no-such-machine"));
        assert!(matches!(
            out.command(0, &stranger, &by_name),
            Err(SparkplugCommandError::Topic { .. })
        ));
        out.abort();
    }
}
