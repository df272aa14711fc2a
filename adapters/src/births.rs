//! Sparkplug B discovery for `ferrotwin import sparkplug`: listens on a broker to a group's
//! births for a while, asking every node it hears of for a rebirth (NCMD
//! `Node Control/Rebirth`), and reads of each metric its name, datatype and the engineering
//! properties edge nodes commonly carry (`engUnit`, `engLow`, `engHigh`).
//!
//! Bounded: at most `MAX_NODES` nodes, the adapter's per-device metric limit, and the
//! listening time the caller gives.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use ferrotwin_models::ValueType;
use ferrotwin_proto::sparkplug::payload::{Metric, metric, property_value};
use ferrotwin_proto::sparkplug::{DataType, Payload};
use prost::Message;
use rumqttc::{Event, MqttOptions, Packet, QoS};

use crate::sparkplug::{Kind, MAX_METRICS_PER_DEVICE, REBIRTH, is_standard, parse_topic, topic};

/// Nodes a listen takes at most.
pub const MAX_NODES: usize = 1000;

/// A metric of a birth.
#[derive(Debug, Clone, PartialEq)]
pub struct BornMetric {
    pub name: String,
    /// `None`: a datatype a twin cannot hold (String, DataSet, Template, arrays); see `kind`.
    pub value_type: Option<ValueType>,
    pub kind: String,
    pub unit: Option<String>,
    pub range: Option<(f64, f64)>,
}

/// A node's or a device's birth (`device` None: the node's own metrics).
#[derive(Debug, Clone, PartialEq)]
pub struct Birth {
    pub node: String,
    pub device: Option<String>,
    pub metrics: Vec<BornMetric>,
}

/// Where to listen.
#[derive(Debug, Clone)]
pub struct Listen {
    pub host: String,
    pub port: u16,
    pub group: String,
    pub credentials: Option<(String, String)>,
    pub seconds: u64,
}

/// Births heard within `listen.seconds`, node by node (a later birth replaces an earlier one
/// of the same node or device).
pub async fn listen(listen: &Listen) -> Result<Vec<Birth>, String> {
    let id = format!("ferrotwin-import-{}", std::process::id());
    let mut options = MqttOptions::new(id, listen.host.clone(), listen.port);
    options.set_keep_alive(Duration::from_secs(10));
    options.set_clean_session(true);
    options.set_max_packet_size(1 << 20, 1 << 20);
    if let Some((u, p)) = &listen.credentials {
        options.set_credentials(u, p);
    }
    let (client, mut events) = rumqttc::AsyncClient::new(options, 64);
    let filter = format!("spBv1.0/{}/#", listen.group);
    client
        .subscribe(&filter, QoS::AtMostOnce)
        .await
        .map_err(|e| format!("cannot subscribe to {filter}: {e}"))?;
    let at = format!("{}:{}", listen.host, listen.port);
    let end = tokio::time::Instant::now() + Duration::from_secs(listen.seconds);
    let mut births: BTreeMap<(String, Option<String>), Vec<BornMetric>> = BTreeMap::new();
    let mut asked: HashSet<String> = HashSet::new();
    let mut connected = false;
    loop {
        let ev = match tokio::time::timeout_at(end, events.poll()).await {
            Err(_) => break,
            Ok(Ok(ev)) => ev,
            Ok(Err(e)) if !connected => return Err(format!("{at}: {e}")),
            Ok(Err(e)) => return Err(format!("{at}: the connection was lost: {e}")),
        };
        let publish = match ev {
            Event::Incoming(Packet::ConnAck(_)) => {
                connected = true;
                continue;
            }
            Event::Incoming(Packet::Publish(p)) => p,
            _ => continue,
        };
        let Some(t) = parse_topic(&publish.topic) else {
            continue;
        };
        let node = t.node.to_string();
        match t.kind {
            Kind::NBirth | Kind::DBirth => {
                let Ok(payload) = Payload::decode(&publish.payload[..]) else {
                    continue;
                };
                let key = (node.clone(), t.device.map(str::to_string));
                if !births.contains_key(&key) && births.len() >= MAX_NODES * 8 {
                    continue;
                }
                asked.insert(node);
                births.insert(key, born(&payload.metrics));
            }
            Kind::NData | Kind::DData | Kind::NDeath | Kind::DDeath
                if asked.len() < MAX_NODES && asked.insert(node.clone()) =>
            {
                // A node already running: ask it to birth again (once).
                let payload = Payload {
                    metrics: vec![Metric {
                        name: Some(REBIRTH.to_string()),
                        datatype: Some(DataType::Boolean as u32),
                        value: Some(metric::Value::BooleanValue(true)),
                        ..Default::default()
                    }],
                    ..Default::default()
                };
                let cmd = topic(&listen.group, "NCMD", &node, None);
                let _ = client
                    .publish(cmd, QoS::AtMostOnce, false, payload.encode_to_vec())
                    .await;
            }
            _ => {}
        }
    }
    let _ = client.disconnect().await;
    if !connected {
        return Err(format!("{at}: no connection within {} s", listen.seconds));
    }
    Ok(births
        .into_iter()
        .map(|((node, device), metrics)| Birth {
            node,
            device,
            metrics,
        })
        .collect())
}

/// The metrics of a birth a twin may take, standard ones (bdSeq, Node Control/…) left out.
fn born(metrics: &[Metric]) -> Vec<BornMetric> {
    metrics
        .iter()
        .filter_map(|m| {
            let name = m.name.clone()?;
            if is_standard(&name) {
                return None;
            }
            let dt =
                DataType::try_from(m.datatype.unwrap_or(0) as i32).unwrap_or(DataType::Unknown);
            let value_type = match dt {
                DataType::Boolean => Some(ValueType::Bool),
                DataType::Int8
                | DataType::Int16
                | DataType::Int32
                | DataType::Int64
                | DataType::UInt8
                | DataType::UInt16
                | DataType::UInt32
                | DataType::UInt64 => Some(ValueType::Int),
                DataType::Float | DataType::Double => Some(ValueType::Float),
                _ => None,
            };
            let mut unit = None;
            let (mut low, mut high) = (None, None);
            if let Some(props) = &m.properties {
                for (k, v) in props.keys.iter().zip(&props.values) {
                    let number = match &v.value {
                        Some(property_value::Value::FloatValue(f)) => Some(f64::from(*f)),
                        Some(property_value::Value::DoubleValue(f)) => Some(*f),
                        Some(property_value::Value::IntValue(i)) => Some(f64::from(*i as i32)),
                        Some(property_value::Value::LongValue(i)) => Some(*i as i64 as f64),
                        _ => None,
                    };
                    match (k.to_ascii_lowercase().as_str(), &v.value) {
                        (
                            "engunit" | "engunits" | "unit",
                            Some(property_value::Value::StringValue(s)),
                        ) => unit = Some(s.clone()),
                        ("englow" | "low", _) => low = number,
                        ("enghigh" | "high", _) => high = number,
                        _ => {}
                    }
                }
            }
            let range = match (low, high) {
                (Some(l), Some(h)) if l.is_finite() && h.is_finite() && l < h => Some((l, h)),
                _ => None,
            };
            Some(BornMetric {
                name,
                value_type,
                kind: format!("{dt:?}"),
                unit,
                range,
            })
        })
        .take(MAX_METRICS_PER_DEVICE)
        .collect()
}
