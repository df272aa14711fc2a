//! MQTT adapter (3.1.1 or 5, rumqttc): subscribes to a broker and turns JSON or Sparkplug B
//! payloads into readings; writes go back as JSON command topics or Sparkplug DCMDs.
//!
//! ```toml
//! [[connections]]
//! protocol = "mqtt"
//! name = "berlin-mqtt"
//! broker = "127.0.0.1:1883"
//! # client_id = "ferrotwin-berlin-mqtt"   protocol_version = "3.1.1"   keep_alive_s = 30
//! # username = "..."   password_file = "/run/secrets/mqtt"   write_timeout_ms = 5000
//! # tls = { ca = "ca.pem", cert = "client.pem", key = "client-key.pem" }   # cert/key optional
//! [connections.format]
//! type = "sparkplug"
//! group_id = "acme-berlin"
//! writable_metrics = ["speed_setpoint_pct"]
//! [[connections.format.nodes]]
//! node = "assembly-line-1"                  # edge node id
//! line = "acme/berlin/assembly/line-1"      # device d = machine <line>/<d>
//! devices = ["press-1", "conveyor-1"]       # allowlist; omitted: any device (whose tags
//!                                           # `targets()` cannot list: not writable)
//! ```
//! `protocol_version = "5"` speaks MQTT 5 (same behaviour). Sparkplug: the adapter subscribes
//! to the whole group, so nodes, devices and metrics nobody mapped are counted as rejected and
//! reported as `Unmapped`; mapping rule: see `sparkplug`. JSON instead:
//! ```toml
//! [connections.format]
//! type = "json"
//! # Topic == asset path under these prefixes (the simulator's naming): a sensor's value on
//! # the sensor's path, machine properties on `<machine>/state|good_count|scrap_count`.
//! topic_prefixes = ["acme/berlin/assembly/line-1"]
//! [[connections.format.tags]]                # explicit tags, on any topic
//! topic = "plant/press1/temp"
//! asset = "acme/berlin/assembly/line-1/press-1/oil-temp"
//! property = "value"
//! [[connections.format.tags]]                # a write: `{"value": 150}` on the topic,
//! asset = "acme/berlin/assembly/line-1/press-1"   # default `<asset>/set/<property>`
//! property = "speed_setpoint_pct"
//! writable = true
//! ```
//! JSON payload, by default `{"value": 12.5, "ts_us": 1735689600000000, "quality": "good"}`
//! (`ts_us` and `quality` optional; `reason` with a non-good quality), as the simulator
//! publishes; `[format.payload]` (`JsonPayload`) maps another device's fields, time unit
//! and quality words.
//!
//! Flow: a poller task owns rumqttc's event loop and hands events over a bounded channel
//! (`BROKER_EVENT_QUEUE`); while the sink pushes back we stop taking them, the channel fills,
//! the poller stops polling and TCP pushes back on the broker. After a connection error the poller
//! waits a `Backoff` delay before polling again (rumqttc reconnects on the next poll); on every
//! CONNACK we subscribe again (clean session) and, for Sparkplug, ask each node to rebirth.
//!
//! Writes are published at QoS 1. After the broker's PUBACK a write is `Confirmed` when the
//! device reports the written value (a setpoint on its `readback_topic`, a writable value on
//! its own topic, a Sparkplug metric in its data) within `readback_timeout_ms`, refused when
//! it reports only another, `Unconfirmed` when it reports nothing good.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use ferrotwin_models::{
    AssetId, AssetPath, Property, Quality, QualityReason, Reading, Timestamp, Value,
};
use ferrotwin_proto::sparkplug::Payload;
use ferrotwin_proto::sparkplug::payload::Metric;
use prost::Message;
use rumqttc::{Event, Outgoing, Packet, QoS};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::AdapterIo;
use crate::backoff::Backoff;
use crate::config::{ConfigError, TagKind, TagTarget, check_connection};
use crate::push::push_batch;
use crate::sparkplug::{self, Decoded, Feeds, MetricRule, NodeRule, SparkplugState};
use crate::status::{AdapterEvent, AdapterEventKind, AdapterStatus, LinkState};
use crate::write::{WriteAck, WriteCommand, WriteError, WriteRequest};

/// Broker events waiting for the adapter task (see the module docs for the push-back).
pub const BROKER_EVENT_QUEUE: usize = 256;
/// Requests waiting in rumqttc's channel (publishes of writes, subscriptions). Full: a write
/// is answered `Busy`.
pub const REQUEST_QUEUE: usize = 64;
/// Messages decoded into one batch before it is pushed.
pub const MESSAGES_PER_BATCH: usize = 256;
/// Largest MQTT packet taken or sent: bounds what one message can make us allocate.
pub const MAX_PACKET_BYTES: usize = 1 << 20;
/// Sources (topics, nodes) remembered for `Unmapped` throttling and `TagFailed` changes.
/// Beyond it new ones are counted but not evented: a flood of random topics cannot grow us.
pub const MAX_TRACKED_SOURCES: usize = 4096;
/// An unmapped source is reported once, then at most this often with its count.
pub const UNMAPPED_EVERY: Duration = Duration::from_secs(60);
/// The JSON command topic of a writable tag without its own: `<asset>/set/<property>`.
pub const COMMAND_INFIX: &str = "set";

mod defaults {
    pub fn protocol_version() -> String {
        "3.1.1".to_string()
    }
    pub fn keep_alive_s() -> u64 {
        30
    }
    pub fn write_timeout_ms() -> u64 {
        5_000
    }
    pub fn readback_timeout_ms() -> u64 {
        3_000
    }
    pub fn reconnect_min_ms() -> u64 {
        200
    }
    pub fn reconnect_max_ms() -> u64 {
        10_000
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    pub name: String,
    /// `host:port` (`mqtt://` optional).
    pub broker: String,
    /// Default `ferrotwin-<name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// "3.1.1" (or "4") or "5".
    #[serde(default = "defaults::protocol_version")]
    pub protocol_version: String,
    #[serde(default = "defaults::keep_alive_s")]
    pub keep_alive_s: u64,
    #[serde(default)]
    pub username: Option<String>,
    /// The password in the config file (prefer `password_file`). Never logged.
    #[serde(default)]
    pub password: Option<Secret>,
    /// A file holding the password (a mounted secret), read at each connect; trailing
    /// whitespace is ignored.
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// TLS to the broker (`mqtts`): the CA its certificate chains to, and optionally a client
    /// certificate.
    #[serde(default)]
    pub tls: Option<MqttTls>,
    /// How long a write waits for the broker's PUBACK.
    #[serde(default = "defaults::write_timeout_ms")]
    pub write_timeout_ms: u64,
    /// After the PUBACK, how long a write waits for the device to report the setpoint back
    /// (Sparkplug: its DDATA/NDATA of the metric; JSON: the tag's `readback_topic`): the
    /// written value confirms it, another value refutes it, nothing leaves it `unconfirmed`.
    /// 0: no read-back (every write answered `unconfirmed` at its PUBACK).
    #[serde(default = "defaults::readback_timeout_ms")]
    pub readback_timeout_ms: u64,
    #[serde(default = "defaults::reconnect_min_ms")]
    pub reconnect_min_ms: u64,
    #[serde(default = "defaults::reconnect_max_ms")]
    pub reconnect_max_ms: u64,
    pub format: PayloadFormat,
}

/// A secret from a config file: its `Debug` never shows it.
#[derive(Clone, PartialEq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<redacted>\"")
    }
}

/// `tls = { ca = ..., cert = ..., key = ... }` of an MQTT connection (the broker's name is
/// the host of `broker`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTls {
    /// PEM CA certificate(s) the broker's certificate must chain to.
    pub ca: std::path::PathBuf,
    /// PEM client certificate and key, for a broker that requires one.
    #[serde(default)]
    pub cert: Option<std::path::PathBuf>,
    #[serde(default)]
    pub key: Option<std::path::PathBuf>,
}

impl MqttTls {
    /// rustls's client config of these files (ring), read now.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        let certs = |p: &std::path::Path| {
            CertificateDer::pem_file_iter(p)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{}: {e}", p.display()))
        };
        for c in certs(&self.ca)? {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", self.ca.display()))?;
        }
        let b = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots);
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => {
                let key =
                    PrivateKeyDer::from_pem_file(k).map_err(|e| format!("{}: {e}", k.display()))?;
                b.with_client_auth_cert(certs(c)?, key)
                    .map_err(|e| format!("{}: {e}", c.display()))
            }
            (None, None) => Ok(b.with_no_client_auth()),
            _ => Err("tls: give both cert and key, or neither".into()),
        }
    }

    fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [Some(&mut self.ca), self.cert.as_mut(), self.key.as_mut()]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum PayloadFormat {
    Json(JsonFormat),
    Sparkplug(SparkplugFormat),
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonFormat {
    #[serde(default)]
    pub topic_prefixes: Vec<String>,
    #[serde(default)]
    pub tags: Vec<JsonTag>,
    /// Where the value, time and quality are in a payload (default: our convention).
    #[serde(default)]
    pub payload: JsonPayload,
}

/// Where a JSON payload keeps its value, source time and quality: each a field name
/// (`"v"`) or a JSON pointer (`"/data/value"`). The defaults are `{"value", "ts_us",
/// "quality", "reason"}`, what the simulator publishes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonPayload {
    #[serde(default = "JsonPayload::default_value")]
    pub value: String,
    /// The source time's field (absent from a payload: the time it arrived).
    #[serde(default = "JsonPayload::default_timestamp")]
    pub timestamp: String,
    /// `"s"`, `"ms"`, `"us"` (numbers, seconds may have decimals), `"rfc3339"` (a string such
    /// as `2026-12-03T18:35:51.250Z`) or `"auto"` (a string is RFC 3339; a number is seconds,
    /// ms or µs by its size). Default: `"us"` for `ts_us`, else `"auto"`.
    #[serde(default)]
    pub timestamp_unit: Option<TimestampUnit>,
    #[serde(default = "JsonPayload::default_quality")]
    pub quality: String,
    /// A device's quality words or codes (as text: `"192"`, `"true"`, `"OK"`) to `good`,
    /// `uncertain` or `bad`; a value not listed is refused. Empty: the words `good`,
    /// `uncertain`, `bad` (any case).
    #[serde(default)]
    pub quality_map: std::collections::BTreeMap<String, QualityWord>,
    #[serde(default = "JsonPayload::default_reason")]
    pub reason: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimestampUnit {
    S,
    Ms,
    Us,
    Rfc3339,
    Auto,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QualityWord {
    Good,
    Uncertain,
    Bad,
}

impl Default for JsonPayload {
    fn default() -> Self {
        JsonPayload {
            value: Self::default_value(),
            timestamp: Self::default_timestamp(),
            timestamp_unit: None,
            quality: Self::default_quality(),
            quality_map: Default::default(),
            reason: Self::default_reason(),
        }
    }
}

impl JsonPayload {
    fn default_value() -> String {
        "value".into()
    }
    fn default_timestamp() -> String {
        "ts_us".into()
    }
    fn default_quality() -> String {
        "quality".into()
    }
    fn default_reason() -> String {
        "reason".into()
    }

    fn unit(&self) -> TimestampUnit {
        self.timestamp_unit.unwrap_or(if self.timestamp == "ts_us" {
            TimestampUnit::Us
        } else {
            TimestampUnit::Auto
        })
    }

    /// What is wrong with the field names (empty, or a pointer that is not one).
    fn problems(&self) -> Option<String> {
        for (what, f) in [
            ("value", &self.value),
            ("timestamp", &self.timestamp),
            ("quality", &self.quality),
            ("reason", &self.reason),
        ] {
            if f.is_empty() {
                return Some(format!("payload.{what}: name a field or a JSON pointer"));
            }
        }
        None
    }
}

/// The field `at` (a name, or a JSON pointer when it starts with `/`) of `json`.
fn field<'a>(json: &'a serde_json::Value, at: &str) -> Option<&'a serde_json::Value> {
    if at.starts_with('/') {
        json.pointer(at)
    } else {
        json.get(at)
    }
    .filter(|v| !v.is_null())
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JsonTag {
    /// Reading properties (`value`, `state`, …): the topic the value arrives on (default:
    /// the simulator's naming). Setpoints: the command topic (default
    /// `<asset>/set/<property>`).
    #[serde(default)]
    pub topic: Option<String>,
    pub asset: String,
    pub property: String,
    #[serde(default)]
    pub writable: bool,
    /// A writable reading property (a sensor's value a write may set): where writes go
    /// (default `<asset>/set/<property>`). Its reports on `topic` confirm or refute them.
    #[serde(default)]
    pub command_topic: Option<String>,
    /// Writable setpoints: the topic where the device reports the setpoint's value (the
    /// same payload layout), which confirms or refutes a write. Without it a write is
    /// `unconfirmed`.
    #[serde(default)]
    pub readback_topic: Option<String>,
}

impl JsonTag {
    /// A tag of a reading property (its `topic` is where values arrive), not a setpoint.
    fn is_reading(&self) -> bool {
        Property::parse(&self.property).is_some()
    }

    /// Where a write goes: a setpoint's topic, a writable reading's command topic; `None`
    /// for a read-only tag.
    fn command(&self) -> Option<String> {
        let default = || format!("{}/{COMMAND_INFIX}/{}", self.asset, self.property);
        match (self.writable, self.is_reading()) {
            (false, _) => None,
            (true, true) => Some(self.command_topic.clone().unwrap_or_else(default)),
            (true, false) => Some(self.topic.clone().unwrap_or_else(default)),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugFormat {
    pub group_id: String,
    /// Nodes mapped by the naming convention (see `sparkplug`).
    #[serde(default)]
    pub nodes: Vec<SparkplugNode>,
    /// The convention's device metrics that the adapter writes with DCMD (setpoints; their
    /// reports are read-backs, never readings).
    #[serde(default)]
    pub writable_metrics: Vec<String>,
    /// Metrics mapped one by one, whatever their names.
    #[serde(default)]
    pub metrics: Vec<SparkplugMetric>,
}

/// One metric of an edge node or of one of its devices, and what it feeds:
/// ```toml
/// [[connections.format.metrics]]
/// node = "Edge1"
/// device = "Filler"            # omitted: a node metric (NBIRTH/NDATA, written with NCMD)
/// metric = "Temperature"
/// asset = "acme/berlin/bottling/line-1/filler/temp"
/// property = "value"           # default; or state, good_count, scrap_count
/// # writable = true            # a setpoint: property is its name (speed_setpoint_pct)
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugMetric {
    pub node: String,
    #[serde(default)]
    pub device: Option<String>,
    pub metric: String,
    pub asset: String,
    #[serde(default = "SparkplugMetric::default_property")]
    pub property: String,
    #[serde(default)]
    pub writable: bool,
}

impl SparkplugMetric {
    fn default_property() -> String {
        Property::Value.as_str().to_owned()
    }

    /// `node/metric` or `node/device/metric`, as events name it.
    pub fn address(&self) -> String {
        match &self.device {
            Some(d) => format!("{}/{d}/{}", self.node, self.metric),
            None => format!("{}/{}", self.node, self.metric),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SparkplugNode {
    pub node: String,
    pub line: String,
    #[serde(default)]
    pub devices: Option<Vec<String>>,
}

/// Splits `HOST:PORT`.
pub fn parse_broker(s: &str) -> Option<(String, u16)> {
    let s = s.strip_prefix("mqtt://").unwrap_or(s);
    let (host, port) = s.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = port.parse::<u16>().ok().filter(|&p| p != 0)?;
    crate::valid_host(host).then(|| (host.to_string(), port))
}

/// A topic level without MQTT wildcards or separators.
fn is_topic_level(s: &str) -> bool {
    !s.is_empty() && !s.contains(['/', '+', '#', '\0'])
}

/// The simulator's topic of a reading property of `asset`.
fn default_topic(asset: &str, property: &str) -> String {
    if property == Property::Value.as_str() {
        asset.to_string()
    } else {
        format!("{asset}/{property}")
    }
}

impl MqttConfig {
    /// Resolves relative file names against `base` (the config file's folder).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(f) = &mut self.password_file
            && f.is_relative()
        {
            *f = base.join(&*f);
        }
        if let Some(t) = &mut self.tls {
            t.resolve_paths(base);
        }
    }

    fn err(&self, what: impl Into<String>) -> ConfigError {
        ConfigError::Connection {
            connection: self.name.clone(),
            what: what.into(),
        }
    }

    fn is_v5(&self) -> bool {
        matches!(self.protocol_version.as_str(), "5" | "5.0")
    }

    pub fn client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("ferrotwin-{}", self.name))
    }

    /// Validates the connection and returns its tags; the JSON tags with their topics.
    fn checked(&self) -> Result<(Vec<TagTarget>, Vec<String>), ConfigError> {
        match self.protocol_version.as_str() {
            "3.1.1" | "4" | "5" | "5.0" => {}
            v => {
                return Err(self.err(format!(
                    "protocol_version {v:?}: expected \"3.1.1\" or \"5\""
                )));
            }
        }
        if parse_broker(&self.broker).is_none() {
            return Err(self.err(format!("broker {:?} is not HOST:PORT", self.broker)));
        }
        if self.keep_alive_s == 0 || self.keep_alive_s > 65_535 {
            return Err(self.err("keep_alive_s must be 1..=65535"));
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            return Err(self.err("password without username"));
        }
        if self.password.is_some() && self.password_file.is_some() {
            return Err(self.err("give password or password_file, not both"));
        }
        if let Some(t) = &self.tls {
            t.client_config()
                .map_err(|e| self.err(format!("tls: {e}")))?;
        }
        let mut targets = Vec::new();
        let mut topics = Vec::new();
        match &self.format {
            PayloadFormat::Json(j) => {
                if j.tags.is_empty() && j.topic_prefixes.is_empty() {
                    return Err(self.err("format json needs tags or topic_prefixes"));
                }
                if let Some(why) = j.payload.problems() {
                    return Err(self.err(why));
                }
                for p in &j.topic_prefixes {
                    if p.is_empty() || !p.split('/').all(is_topic_level) {
                        return Err(self.err(format!(
                            "topic prefix {p:?} must be topic levels without wildcards"
                        )));
                    }
                }
                for t in &j.tags {
                    let topic = match (t.is_reading(), t.command()) {
                        (false, Some(command)) => command,
                        _ => t
                            .topic
                            .clone()
                            .unwrap_or_else(|| default_topic(&t.asset, &t.property)),
                    };
                    let bad_topic = |t: &str| t.is_empty() || !t.split('/').all(is_topic_level);
                    if bad_topic(&topic) {
                        return Err(ConfigError::Tag {
                            connection: self.name.clone(),
                            tag: topic,
                            what: "not a topic without wildcards".to_string(),
                        });
                    }
                    // The tag's other topics: each where it belongs, without wildcards.
                    let misplaced = match (&t.command_topic, &t.readback_topic) {
                        (Some(_), _) if !t.writable => {
                            Some("command_topic: only a writable tag has one")
                        }
                        (Some(_), _) if !t.is_reading() => {
                            Some("command_topic: a setpoint's topic is its command topic")
                        }
                        (Some(c), _) if bad_topic(c) => {
                            Some("command_topic: not a topic without wildcards")
                        }
                        (_, Some(_)) if !t.writable => {
                            Some("readback_topic: only a writable tag has one")
                        }
                        (_, Some(_)) if t.is_reading() => Some(
                            "readback_topic: a writable reading is confirmed by what arrives on its own topic",
                        ),
                        (_, Some(r)) if bad_topic(r) => {
                            Some("readback_topic: not a topic without wildcards")
                        }
                        _ => None,
                    };
                    if let Some(what) = misplaced {
                        return Err(ConfigError::Tag {
                            connection: self.name.clone(),
                            tag: topic,
                            what: what.to_string(),
                        });
                    }
                    targets.push(TagTarget::parse(
                        &self.name,
                        &topic,
                        &t.asset,
                        &t.property,
                        t.writable,
                    )?);
                    topics.push(topic);
                }
                // A command topic we also listen on would bring our own command back as a
                // reading or a read-back: a write "confirmed" with no device involved.
                let heard: HashSet<&str> = j
                    .tags
                    .iter()
                    .zip(&topics)
                    .filter(|(t, _)| t.is_reading())
                    .map(|(_, topic)| topic.as_str())
                    .chain(j.tags.iter().filter_map(|t| t.readback_topic.as_deref()))
                    .collect();
                for t in &j.tags {
                    let Some(command) = t.command() else {
                        continue;
                    };
                    let under_prefix =
                        under_prefixes(&command, &j.topic_prefixes) && !is_command_topic(&command);
                    if heard.contains(command.as_str()) || under_prefix {
                        return Err(ConfigError::Tag {
                            connection: self.name.clone(),
                            tag: command,
                            what: "this command topic is one the connection reads (a tag's topic, a readback_topic, or under a topic prefix without a /set/ level): our own command would come back as the device's answer".into(),
                        });
                    }
                }
            }
            PayloadFormat::Sparkplug(s) => {
                if !is_topic_level(&s.group_id) {
                    return Err(self.err(format!(
                        "group_id {:?} must be one topic level without wildcards",
                        s.group_id
                    )));
                }
                if s.nodes.is_empty() && s.metrics.is_empty() {
                    return Err(self.err("format sparkplug needs nodes or metrics"));
                }
                let mut seen_metrics = HashSet::new();
                for m in &s.metrics {
                    let address = m.address();
                    let err = |what: String| ConfigError::Tag {
                        connection: self.name.clone(),
                        tag: address.clone(),
                        what,
                    };
                    if !is_topic_level(&m.node) {
                        return Err(err(format!("node {:?} must be one topic level", m.node)));
                    }
                    if let Some(d) = &m.device
                        && !is_topic_level(d)
                    {
                        return Err(err(format!("device {d:?} must be one topic level")));
                    }
                    if m.metric.is_empty() {
                        return Err(err("metric: name the metric".into()));
                    }
                    if !seen_metrics.insert((&m.node, &m.device, &m.metric)) {
                        return Err(err("this metric is mapped twice".into()));
                    }
                    targets.push(TagTarget::parse(
                        &self.name,
                        &address,
                        &m.asset,
                        &m.property,
                        m.writable,
                    )?);
                }
                let mut seen = HashSet::new();
                for n in &s.nodes {
                    if !is_topic_level(&n.node) || !seen.insert(&n.node) {
                        return Err(self.err(format!(
                            "node {:?} must be one topic level, listed once",
                            n.node
                        )));
                    }
                    let line = AssetPath::parse(&n.line).map_err(|e| ConfigError::Tag {
                        connection: self.name.clone(),
                        tag: n.node.clone(),
                        what: format!("line {:?}: {e}", n.line),
                    })?;
                    for d in n.devices.iter().flatten() {
                        let address = format!("{}/{d}", n.node);
                        let machine = format!("{}/{d}", line.as_str());
                        for p in [Property::State, Property::GoodCount, Property::ScrapCount] {
                            targets.push(TagTarget::parse(
                                &self.name,
                                &format!("{address}/{}", p.as_str()),
                                &machine,
                                p.as_str(),
                                false,
                            )?);
                        }
                        for w in &s.writable_metrics {
                            targets.push(TagTarget::parse(
                                &self.name,
                                &format!("{address}/{w}"),
                                &machine,
                                w,
                                true,
                            )?);
                        }
                    }
                }
            }
        }
        check_connection(&self.name, &targets)?;
        Ok((targets, topics))
    }

    /// The validated tags of this connection. Sparkplug: the machine properties and writable
    /// metrics of every listed device (sensors appear with the births, by the naming rule);
    /// JSON: the explicit tags (topics under a prefix map by the naming rule).
    pub fn targets(&self) -> Result<Vec<TagTarget>, ConfigError> {
        self.checked().map(|(t, _)| t)
    }
}

/// A JSON payload's value, quality and source time (`now` without one), where `layout`
/// says they are. The value is `None` when the payload has none (or `null`) and its quality
/// is not good: a device saying it has no valid value (the twin keeps its last one, Bad).
pub fn decode_json(
    payload: &[u8],
    now: Timestamp,
    layout: &JsonPayload,
) -> Result<(Option<Value>, Quality, Timestamp), String> {
    let json: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("not JSON: {e}"))?;
    if !json.is_object() {
        return Err("not a JSON object".into());
    }
    let reason = match field(&json, &layout.reason) {
        None => QualityReason::None,
        Some(serde_json::Value::String(r)) => QualityReason::parse(r),
        Some(r) => return Err(format!("{} {r} is not a string", layout.reason)),
    };
    let word = match field(&json, &layout.quality) {
        None => QualityWord::Good,
        Some(q) => {
            let text = match q {
                serde_json::Value::String(s) => s.clone(),
                // 192.0 is the code 192.
                serde_json::Value::Number(n)
                    if n.as_f64()
                        .is_some_and(|f| f.fract() == 0.0 && f.abs() < 1e15) =>
                {
                    (n.as_f64().unwrap_or_default() as i64).to_string()
                }
                other => other.to_string(),
            };
            if layout.quality_map.is_empty() {
                match text.to_ascii_lowercase().as_str() {
                    "good" => QualityWord::Good,
                    "uncertain" => QualityWord::Uncertain,
                    "bad" => QualityWord::Bad,
                    _ => {
                        return Err(format!(
                            "{} {q} is not good, uncertain or bad (a device's own words or codes go in payload.quality_map)",
                            layout.quality
                        ));
                    }
                }
            } else {
                let found = layout.quality_map.get(&text).or_else(|| {
                    layout
                        .quality_map
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case(&text))
                        .map(|(_, w)| w)
                });
                *found.ok_or_else(|| {
                    format!(
                        "{} {q} is not in payload.quality_map ({})",
                        layout.quality,
                        layout
                            .quality_map
                            .keys()
                            .map(String::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?
            }
        }
    };
    let quality = match word {
        QualityWord::Good => Quality::GOOD,
        QualityWord::Uncertain => Quality::uncertain(reason),
        QualityWord::Bad => Quality::bad(reason),
    };
    let value = match field(&json, &layout.value) {
        Some(serde_json::Value::Bool(b)) => Some(Value::Bool(*b)),
        Some(serde_json::Value::Number(n)) => Some(match n.as_i64() {
            Some(i) => Value::Int(i),
            None => match n.as_f64() {
                // u64 above i64::MAX, or a float (always finite in JSON).
                Some(f) if n.is_f64() && f.is_finite() => Value::Float(f),
                _ => return Err(format!("{} {n} does not fit an i64 or f64", layout.value)),
            },
        }),
        Some(other) => {
            return Err(format!("{} {other} is not a number or bool", layout.value));
        }
        None if word != QualityWord::Good => None,
        None => return Err(format!("no {:?} (and its quality is good)", layout.value)),
    };
    let source_ts = match field(&json, &layout.timestamp) {
        None => now,
        Some(t) => source_time(t, layout.unit())
            .map_err(|why| format!("{} {t}: {why}", layout.timestamp))?,
    };
    Ok((value, quality, source_ts))
}

/// A source time in `unit`.
fn source_time(t: &serde_json::Value, unit: TimestampUnit) -> Result<Timestamp, String> {
    use TimestampUnit as U;
    let rfc3339 = |s: &str| {
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|d| Timestamp(d.timestamp_micros()))
            .map_err(|e| format!("not an RFC 3339 time ({e})"))
    };
    match (t, unit) {
        (serde_json::Value::String(s), U::Rfc3339 | U::Auto) => rfc3339(s),
        (serde_json::Value::Number(n), U::S | U::Ms | U::Us | U::Auto) => {
            let v = n
                .as_f64()
                .filter(|v| v.is_finite())
                .ok_or("not a finite number")?;
            // By size, a small number is an uptime or a counter, not a time: say so rather
            // than date readings in 1970.
            if unit == U::Auto && v < 946_684_800.0 {
                return Err(
                    "before the year 2000 by its size (an uptime or a counter?): set timestamp_unit"
                        .into(),
                );
            }
            let unit = match unit {
                // Seconds until about the year 5138, ms until about 5138 too: by the size.
                U::Auto if v.abs() < 1e11 => U::S,
                U::Auto if v.abs() < 1e14 => U::Ms,
                U::Auto => U::Us,
                u => u,
            };
            let us = match unit {
                U::S => v * 1e6,
                U::Ms => v * 1e3,
                _ => v,
            };
            if us.abs() > 9.0e18 {
                return Err("out of range".into());
            }
            Ok(Timestamp(us.round() as i64))
        }
        (_, U::Rfc3339) => Err("not a string (timestamp_unit is rfc3339)".into()),
        _ => Err("not a number or an RFC 3339 string".into()),
    }
}

/// The reading a topic under a prefix feeds, by the simulator's naming; `None` for anything
/// else (commands below a machine, deeper or shallower topics).
pub fn topic_rule(topic: &str) -> Option<(AssetId, Property)> {
    let (parent, last) = topic.rsplit_once('/')?;
    if let Some(p) = Property::parse(last).filter(|&p| p != Property::Value) {
        let machine = AssetPath::parse(parent).ok()?;
        return (machine.depth() == 5).then(|| (machine.id(), p));
    }
    let sensor = AssetPath::parse(topic).ok()?;
    (sensor.depth() == 6).then(|| (sensor.id(), Property::Value))
}

/// Whether `topic` lies under one of `prefixes` (the naming rule maps it).
fn under_prefixes(topic: &str, prefixes: &[String]) -> bool {
    prefixes.iter().any(|p| {
        topic
            .strip_prefix(p.as_str())
            .is_some_and(|r| r.starts_with('/'))
    })
}

/// Whether `topic` has a command level (`…/set/…`): a write's topic, never data.
fn is_command_topic(topic: &str) -> bool {
    topic.contains(&format!("/{COMMAND_INFIX}/"))
}

/// How payloads turn into readings.
#[expect(
    clippy::large_enum_variant,
    reason = "one decoder per connection, built once and never moved on the hot path"
)]
enum Decoder {
    Json {
        exact: HashMap<String, (AssetId, Property)>,
        prefixes: Vec<String>,
        /// (asset, property) → command topic.
        commands: HashMap<(AssetPath, String), String>,
        /// Read-back topic → the setpoint it reports.
        readbacks: HashMap<String, (AssetPath, String)>,
        /// A writable reading's topic → its target: its values are read-backs of writes too.
        written: HashMap<String, (AssetPath, String)>,
        /// Last value per target, for the Bad readings of a link loss. Bounded by the mapped
        /// tags plus `MAX_TRACKED_SOURCES` for prefix-mapped ones.
        last: HashMap<(AssetId, Property), Value>,
        /// Where a payload's fields are.
        layout: JsonPayload,
    },
    Sparkplug(SparkplugState),
}

impl Decoder {
    fn filters(&self) -> Vec<String> {
        match self {
            Decoder::Json {
                exact,
                prefixes,
                readbacks,
                ..
            } => exact
                .keys()
                .chain(readbacks.keys())
                .cloned()
                .chain(prefixes.iter().map(|p| format!("{p}/#")))
                .collect(),
            // The whole group: data of nodes or devices nobody listed is then counted and
            // reported as unmapped (a gap in the config) instead of passing unseen.
            Decoder::Sparkplug(s) => vec![format!("{}/{}/#", sparkplug::NAMESPACE, s.group())],
        }
    }
}

/// A publish on its way: waiting for rumqttc to give it a packet id, then the PUBACK.
struct Pending {
    /// `None` for our own publishes (rebirth requests), kept to match ids in order.
    write: Option<InFlight>,
    pkid: Option<u16>,
    deadline: Instant,
}

/// A write published and not yet answered: before its PUBACK (in `Pending`), then while
/// waiting for its read-back (`Adapter::confirming`).
struct InFlight {
    req: WriteRequest,
    reply: tokio::sync::oneshot::Sender<Result<WriteAck, WriteError>>,
    /// The device reports this setpoint (a read-back may come).
    readback: bool,
    /// The last value the device reported since the write left.
    seen: Option<Value>,
    /// The device reported the written value (possibly before the PUBACK came).
    confirmed: bool,
    sent: Instant,
}

/// Whether a reported value is the written one: numbers by value (an int written, a
/// float32 reported), within float32 precision; a bool as 0/1.
fn same_value(written: Value, reported: Value) -> bool {
    let (a, b) = (written.as_f64(), reported.as_f64());
    a == b || (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0)
}

/// `Unmapped` events: once per source, then at most every `UNMAPPED_EVERY` with the count.
#[derive(Default)]
struct UnmappedThrottle {
    sources: HashMap<String, (Instant, u64)>,
}

impl UnmappedThrottle {
    /// The event to send now, if any.
    fn report(&mut self, source: String, at: Instant) -> Option<(String, u64)> {
        if let Some((_, pending)) = self.sources.get_mut(&source) {
            *pending += 1;
            return None;
        }
        if self.sources.len() >= MAX_TRACKED_SOURCES {
            return None;
        }
        self.sources.insert(source.clone(), (at, 0));
        Some((source, 1))
    }

    fn due(&mut self, at: Instant) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for (s, (sent, pending)) in &mut self.sources {
            if *pending > 0 && at.duration_since(*sent) >= UNMAPPED_EVERY {
                out.push((s.clone(), *pending));
                *pending = 0;
                *sent = at;
            }
        }
        out
    }
}

struct Adapter {
    name: String,
    endpoint: String,
    io: AdapterIo,
    client: Client,
    decoder: Decoder,
    connected: bool,
    failing: HashSet<String>,
    unmapped: UnmappedThrottle,
    pending: VecDeque<Pending>,
    /// Writes acknowledged by the broker, waiting for their read-back (at most
    /// `MAX_PENDING_WRITES`: the write queue's bound, plus those before their PUBACK).
    confirming: Vec<(InFlight, Instant)>,
    write_timeout: Duration,
    readback_timeout: Duration,
    batch: Vec<Reading>,
}

/// The adapter task: see the module docs.
/// `_targets` are `config.targets()`; the task derives its routes from `config` again, since
/// JSON tags need their topics and Sparkplug sensors come from the births.
pub async fn run(config: MqttConfig, _targets: Vec<TagTarget>, io: AdapterIo) {
    let decoder = match build_decoder(&config) {
        Ok(x) => x,
        Err(e) => {
            // `start` validated the config: only a changed file could get here.
            io.status.set_link(LinkState::Stopped, Some(e.to_string()));
            return;
        }
    };
    let Some((host, port)) = parse_broker(&config.broker) else {
        io.status.set_link(
            LinkState::Stopped,
            Some(format!("broker {:?}", config.broker)),
        );
        return;
    };
    let (tx, mut rx) = mpsc::channel(BROKER_EVENT_QUEUE);
    let poller_token = io.token.child_token();
    let backoff = Backoff::new(config.reconnect_min_ms, config.reconnect_max_ms);
    let keep_alive = Duration::from_secs(config.keep_alive_s);
    let password = match (&config.password, &config.password_file) {
        (Some(p), _) => p.0.clone(),
        (None, Some(f)) => match std::fs::read_to_string(f) {
            Ok(p) => p.trim_end().to_owned(),
            Err(e) => {
                io.status.set_link(
                    LinkState::Stopped,
                    Some(format!("password_file {}: {e}", f.display())),
                );
                return;
            }
        },
        (None, None) => String::new(),
    };
    let credentials = config.username.clone().map(|u| (u, password));
    let transport = match config.tls.as_ref().map(MqttTls::client_config) {
        None => None,
        Some(Ok(c)) => Some(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(std::sync::Arc::new(c)),
        )),
        Some(Err(e)) => {
            io.status
                .set_link(LinkState::Stopped, Some(format!("tls: {e}")));
            return;
        }
    };
    let (client, poller) = if config.is_v5() {
        let mut options = rumqttc::v5::MqttOptions::new(config.client_id(), host.clone(), port);
        options.set_keep_alive(keep_alive);
        options.set_clean_start(true);
        options.set_max_packet_size(Some(MAX_PACKET_BYTES as u32));
        if let Some((u, p)) = credentials {
            options.set_credentials(u, p);
        }
        if let Some(t) = transport.clone() {
            options.set_transport(t);
        }
        options.set_network_options(no_delay());
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, REQUEST_QUEUE);
        let attempts = Attempts::new(&config.name, &host, port);
        let poller = tokio::spawn(poll_broker_v5(
            eventloop,
            tx,
            poller_token.clone(),
            backoff,
            attempts,
        ));
        (Client::V5(client), poller)
    } else {
        let mut options = rumqttc::MqttOptions::new(config.client_id(), host.clone(), port);
        options.set_keep_alive(keep_alive);
        options.set_clean_session(true);
        options.set_max_packet_size(MAX_PACKET_BYTES, MAX_PACKET_BYTES);
        if let Some((u, p)) = credentials {
            options.set_credentials(u, p);
        }
        if let Some(t) = transport {
            options.set_transport(t);
        }
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, REQUEST_QUEUE);
        eventloop.set_network_options(no_delay());
        let attempts = Attempts::new(&config.name, &host, port);
        let poller = tokio::spawn(poll_broker(
            eventloop,
            tx,
            poller_token.clone(),
            backoff,
            attempts,
        ));
        (Client::V4(client), poller)
    };
    let mut a = Adapter {
        name: config.name.clone(),
        endpoint: format!("{host}:{port}"),
        client,
        decoder,
        connected: false,
        failing: HashSet::new(),
        unmapped: UnmappedThrottle::default(),
        pending: VecDeque::new(),
        confirming: Vec::new(),
        write_timeout: Duration::from_millis(config.write_timeout_ms),
        readback_timeout: Duration::from_millis(config.readback_timeout_ms),
        batch: Vec::new(),
        io,
    };
    a.io.status.set_link(LinkState::Connecting, None);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let token = a.io.token.clone();
    loop {
        tokio::select! {
            () = token.cancelled() => break,
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                a.handle(ev).await;
                // Take what else is waiting into the same batch.
                for _ in 1..MESSAGES_PER_BATCH {
                    match rx.try_recv() {
                        Ok(ev) => a.handle(ev).await,
                        Err(_) => break,
                    }
                }
                if !a.flush().await {
                    break;
                }
            }
            cmd = a.io.writes.recv() => {
                if let Some(cmd) = cmd {
                    a.start_write(cmd).await;
                }
            }
            _ = tick.tick() => a.on_tick().await,
        }
    }
    poller_token.cancel();
    a.client.try_disconnect();
    for p in a.pending.drain(..) {
        if let Some(w) = p.write {
            let _ = w.reply.send(Err(WriteError::Stopped {
                connection: a.name.clone(),
            }));
        }
    }
    // The broker has these: whether the device applied them, nobody will see now.
    for (w, _) in a.confirming.drain(..) {
        let _ = w.reply.send(Ok(WriteAck::Unconfirmed));
    }
    let _ = poller.await;
    a.io.status.set_link(LinkState::Stopped, None);
}

/// Socket options of every broker connection: no Nagle. A command (or an ack) is one small
/// packet; held back until the broker's delayed ACK it costs a write 40 ms and more.
fn no_delay() -> rumqttc::NetworkOptions {
    let mut n = rumqttc::NetworkOptions::new();
    n.set_tcp_nodelay(true);
    n
}

fn build_decoder(config: &MqttConfig) -> Result<Decoder, ConfigError> {
    let (targets, topics) = config.checked()?;
    Ok(match &config.format {
        PayloadFormat::Json(j) => {
            let mut exact = HashMap::new();
            let mut commands = HashMap::new();
            let mut written = HashMap::new();
            // `checked` gives one target and one topic per tag, in order.
            for ((t, topic), tag) in targets.iter().zip(&topics).zip(&j.tags) {
                match t.kind {
                    TagKind::Reading(p) => {
                        exact.insert(topic.clone(), (t.asset.id(), p));
                        if let Some(command) = tag.command() {
                            let target = (t.asset.clone(), p.as_str().to_owned());
                            commands.insert(target.clone(), command);
                            written.insert(topic.clone(), target);
                        }
                    }
                    TagKind::Setpoint(ref s) => {
                        commands.insert((t.asset.clone(), s.clone()), topic.clone());
                    }
                }
            }
            let readbacks = j
                .tags
                .iter()
                .filter_map(|t| {
                    let topic = t.readback_topic.clone()?;
                    let asset = AssetPath::parse(&t.asset).ok()?;
                    Some((topic, (asset, t.property.clone())))
                })
                .collect();
            Decoder::Json {
                exact,
                prefixes: j.topic_prefixes.clone(),
                commands,
                written,
                readbacks,
                last: HashMap::new(),
                layout: j.payload.clone(),
            }
        }
        PayloadFormat::Sparkplug(s) => {
            let rules = s
                .nodes
                .iter()
                .map(|n| {
                    Ok(NodeRule {
                        node: n.node.clone(),
                        line: Some(
                            AssetPath::parse(&n.line).map_err(|e| config.err(e.to_string()))?,
                        ),
                        devices: n.devices.as_ref().map(|d| d.iter().cloned().collect()),
                    })
                })
                .collect::<Result<Vec<_>, ConfigError>>()?;
            // `checked` validated each metric's target: they are the first targets, in order.
            let metrics = s
                .metrics
                .iter()
                .zip(&targets)
                .map(|(m, t)| MetricRule {
                    node: m.node.clone(),
                    device: m.device.clone(),
                    metric: m.metric.clone(),
                    feeds: match &t.kind {
                        TagKind::Reading(p) if t.writable => Feeds::Written(t.asset.clone(), *p),
                        TagKind::Reading(p) => Feeds::Reading(t.asset.id(), *p),
                        TagKind::Setpoint(name) => Feeds::Setpoint(t.asset.clone(), name.clone()),
                    },
                })
                .collect();
            let writable = s.writable_metrics.iter().cloned().collect();
            Decoder::Sparkplug(SparkplugState::new(&s.group_id, rules, metrics, writable))
        }
    })
}

/// What the adapter takes from a broker, whichever the protocol version.
#[derive(Debug)]
enum BrokerEvent {
    ConnAck,
    Publish {
        topic: String,
        payload: Vec<u8>,
    },
    /// Our publish left with this packet id.
    Sent(u16),
    PubAck(u16),
    /// The connection failed (rumqttc reconnects on the next poll).
    Lost(String),
}

const QOS_V5: rumqttc::v5::mqttbytes::QoS = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;

/// The client half, MQTT 3.1.1 or 5.
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

impl Client {
    /// Queues a QoS 1 publish without waiting (the poller may itself be waiting for us).
    fn try_publish(&self, topic: String, payload: Vec<u8>) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(topic, QOS_V5, false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    fn try_subscribe_many(&self, filters: Vec<String>) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| rumqttc::SubscribeFilter::new(f, QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe_many(
                    filters
                        .into_iter()
                        .map(|f| rumqttc::v5::mqttbytes::v5::Filter::new(f, QOS_V5)),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Best effort: the poller stops right after.
    fn try_disconnect(&self) {
        match self {
            Client::V4(c) => drop(c.try_disconnect()),
            Client::V5(c) => drop(c.try_disconnect()),
        }
    }
}

/// The `adapter.connect` span of the attempt in progress: rumqttc connects inside a poll, so
/// an attempt runs from the first poll while not connected to its ConnAck or its error.
struct Attempts {
    connection: String,
    endpoint: String,
    open: Option<tracing::Span>,
    connected: bool,
}

impl Attempts {
    fn new(connection: &str, host: &str, port: u16) -> Self {
        Attempts {
            connection: connection.to_owned(),
            endpoint: format!("{host}:{port}"),
            open: None,
            connected: false,
        }
    }

    fn before_poll(&mut self) {
        if !self.connected && self.open.is_none() {
            self.open = Some(crate::connect_span(
                &self.connection,
                "mqtt",
                &self.endpoint,
            ));
        }
    }

    fn after_poll(&mut self, ev: Option<&BrokerEvent>) {
        let outcome = match ev {
            Some(BrokerEvent::ConnAck) => Ok(()),
            Some(BrokerEvent::Lost(why)) => Err(why.clone()),
            _ => return,
        };
        self.connected = outcome.is_ok();
        if let Some(span) = self.open.take() {
            crate::connect_outcome(&span, &outcome);
        }
    }
}

/// Hands `ev` to the adapter and, after an error, waits a backoff delay; false: stop.
async fn forward(
    ev: Option<BrokerEvent>,
    tx: &mpsc::Sender<BrokerEvent>,
    token: &CancellationToken,
    backoff: &mut Backoff,
) -> bool {
    let Some(ev) = ev else {
        return true;
    };
    let lost = matches!(ev, BrokerEvent::Lost(_));
    if matches!(ev, BrokerEvent::ConnAck) {
        backoff.reset();
    }
    if tx.send(ev).await.is_err() {
        return false;
    }
    if lost {
        tokio::select! {
            () = token.cancelled() => return false,
            () = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
    true
}

/// Owns rumqttc's (3.1.1) event loop: forwards the events the adapter needs (waiting while it
/// is busy) and, after an error, waits a backoff delay before the next poll (which
/// reconnects).
async fn poll_broker(
    mut eventloop: rumqttc::EventLoop,
    tx: mpsc::Sender<BrokerEvent>,
    token: CancellationToken,
    mut backoff: Backoff,
    mut attempts: Attempts,
) {
    loop {
        attempts.before_poll();
        let ev = tokio::select! {
            () = token.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        let ev = match ev {
            Ok(Event::Incoming(Packet::ConnAck(_))) => Some(BrokerEvent::ConnAck),
            Ok(Event::Incoming(Packet::Publish(p))) => Some(BrokerEvent::Publish {
                topic: p.topic,
                payload: p.payload.to_vec(),
            }),
            Ok(Event::Incoming(Packet::PubAck(a))) => Some(BrokerEvent::PubAck(a.pkid)),
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => Some(BrokerEvent::Sent(pkid)),
            Ok(_) => None,
            Err(e) => Some(BrokerEvent::Lost(e.to_string())),
        };
        attempts.after_poll(ev.as_ref());
        if !forward(ev, &tx, &token, &mut backoff).await {
            return;
        }
    }
}

/// `poll_broker` for MQTT 5.
async fn poll_broker_v5(
    mut eventloop: rumqttc::v5::EventLoop,
    tx: mpsc::Sender<BrokerEvent>,
    token: CancellationToken,
    mut backoff: Backoff,
    mut attempts: Attempts,
) {
    use rumqttc::v5::Event as E5;
    use rumqttc::v5::mqttbytes::v5::Packet as P5;
    loop {
        attempts.before_poll();
        let ev = tokio::select! {
            () = token.cancelled() => return,
            ev = eventloop.poll() => ev,
        };
        let ev = match ev {
            Ok(E5::Incoming(P5::ConnAck(_))) => Some(BrokerEvent::ConnAck),
            // MQTT 5 topics are UTF-8 (a broker forwards nothing else).
            Ok(E5::Incoming(P5::Publish(p))) => Some(BrokerEvent::Publish {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
            }),
            Ok(E5::Incoming(P5::PubAck(a))) => Some(BrokerEvent::PubAck(a.pkid)),
            Ok(E5::Outgoing(Outgoing::Publish(pkid))) => Some(BrokerEvent::Sent(pkid)),
            Ok(_) => None,
            Err(e) => Some(BrokerEvent::Lost(e.to_string())),
        };
        attempts.after_poll(ev.as_ref());
        if !forward(ev, &tx, &token, &mut backoff).await {
            return;
        }
    }
}

impl Adapter {
    async fn event(&self, asset: Option<AssetPath>, kind: AdapterEventKind) {
        let ev = AdapterEvent {
            connection: self.name.clone(),
            asset,
            at: Timestamp::now(),
            kind,
        };
        // Events are never dropped: wait for room (a closed channel means nobody listens).
        let _ = self.io.events.send(ev).await;
    }

    async fn handle(&mut self, ev: BrokerEvent) {
        match ev {
            BrokerEvent::ConnAck => self.on_connected().await,
            BrokerEvent::Publish { topic, payload } => {
                self.on_message(&topic, &payload).await;
            }
            BrokerEvent::Sent(pkid) => {
                if let Some(p) = self.pending.iter_mut().find(|p| p.pkid.is_none()) {
                    p.pkid = Some(pkid);
                }
            }
            BrokerEvent::PubAck(pkid) => {
                let Some(i) = self.pending.iter().position(|p| p.pkid == Some(pkid)) else {
                    return;
                };
                let p = self.pending.remove(i).expect("index from position");
                if let Some(w) = p.write {
                    if w.confirmed {
                        self.answer(w.req, w.reply, Ok(WriteAck::Confirmed)).await;
                    } else if w.readback && !self.readback_timeout.is_zero() {
                        let deadline = Instant::now() + self.readback_timeout;
                        self.confirming.push((w, deadline));
                    } else {
                        self.answer(w.req, w.reply, Ok(WriteAck::Unconfirmed)).await;
                    }
                }
            }
            BrokerEvent::Lost(e) => self.on_link_error(e).await,
        }
    }

    async fn on_connected(&mut self) {
        self.connected = true;
        AdapterStatus::add(&self.io.status.connects, 1);
        self.io.status.set_link(LinkState::Connected, None);
        self.event(
            None,
            AdapterEventKind::Connected {
                endpoint: self.endpoint.clone(),
            },
        )
        .await;
        if let Err(e) = self.client.try_subscribe_many(self.decoder.filters()) {
            AdapterStatus::add(&self.io.status.errors, 1);
            tracing::warn!(connection = %self.name, error = %e, "cannot subscribe");
        }
        if let Decoder::Sparkplug(s) = &mut self.decoder {
            // We may have missed births while away: ask every node for them.
            s.forget_births();
            let nodes: Vec<String> = s.node_ids().map(str::to_string).collect();
            for n in nodes {
                self.request_rebirth(&n);
            }
        }
    }

    /// NCMD `Node Control/Rebirth` = true to `node`.
    fn request_rebirth(&mut self, node: &str) {
        let Decoder::Sparkplug(s) = &mut self.decoder else {
            return;
        };
        let t = Timestamp::now();
        s.rebirth_requested(node, t);
        let payload = Payload {
            timestamp: u64::try_from(t.as_millis()).ok(),
            metrics: vec![Metric {
                name: Some(sparkplug::REBIRTH.to_string()),
                timestamp: u64::try_from(t.as_millis()).ok(),
                datatype: Some(ferrotwin_proto::sparkplug::DataType::Boolean as u32),
                value: Some(ferrotwin_proto::sparkplug::payload::metric::Value::BooleanValue(true)),
                ..Default::default()
            }],
            ..Default::default()
        };
        let topic = sparkplug::topic(s.group(), "NCMD", node, None);
        match self.client.try_publish(topic, payload.encode_to_vec()) {
            Ok(()) => self.pending.push_back(Pending {
                write: None,
                pkid: None,
                deadline: Instant::now() + self.write_timeout,
            }),
            Err(e) => {
                AdapterStatus::add(&self.io.status.errors, 1);
                tracing::warn!(connection = %self.name, node, error = %e, "cannot request a rebirth");
            }
        }
    }

    async fn on_link_error(&mut self, error: String) {
        AdapterStatus::add(&self.io.status.errors, 1);
        if !self.connected {
            self.io
                .status
                .set_link(LinkState::Disconnected, Some(error));
            return;
        }
        self.connected = false;
        tracing::warn!(connection = %self.name, error = %error, "broker connection lost");
        crate::disconnect_span(&self.name, "mqtt", &self.endpoint, &error);
        self.io
            .status
            .set_link(LinkState::Disconnected, Some(error.clone()));
        self.event(None, AdapterEventKind::Disconnected { reason: error })
            .await;
        let t = Timestamp::now();
        match &mut self.decoder {
            Decoder::Json { last, .. } => {
                for (&(asset, property), &value) in last.iter() {
                    self.batch.push(Reading {
                        asset,
                        property,
                        value,
                        quality: Quality::bad(QualityReason::CommFailure),
                        source_ts: t,
                    });
                }
            }
            Decoder::Sparkplug(s) => {
                s.all_bad(t, &mut self.batch);
                s.forget_births();
            }
        }
        for p in self.pending.drain(..) {
            if let Some(w) = p.write {
                AdapterStatus::add(&self.io.status.writes_failed, 1);
                let _ = w.reply.send(Err(WriteError::NotConnected {
                    connection: self.name.clone(),
                }));
            }
        }
        // The broker took these: with the link gone no read-back can come.
        for (w, _) in std::mem::take(&mut self.confirming) {
            self.answer(w.req, w.reply, Ok(WriteAck::Unconfirmed)).await;
        }
    }

    async fn on_message(&mut self, topic: &str, payload: &[u8]) {
        let t = Timestamp::now();
        match &mut self.decoder {
            Decoder::Json {
                exact,
                prefixes,
                last,
                layout,
                readbacks,
                written,
                ..
            } => {
                let mut echo = written.get(topic).cloned();
                if let Some((asset, property)) = readbacks.get(topic) {
                    let (asset, property) = (asset.clone(), property.clone());
                    match decode_json(payload, t, layout) {
                        // Only a good report of a value answers a write.
                        Ok((Some(v), q, _)) if q.is_good() => {
                            self.recovered(topic).await;
                            self.on_readback(&asset, &property, v).await;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            AdapterStatus::add(&self.io.status.rejected, 1);
                            self.failed(topic, e).await;
                        }
                    }
                    return;
                }
                let target = exact.get(topic).copied().or_else(|| {
                    under_prefixes(topic, prefixes)
                        .then(|| topic_rule(topic))
                        .flatten()
                });
                let Some((asset, property)) = target else {
                    // Commands under a prefix are ours or another writer's, not data.
                    if !is_command_topic(topic) {
                        AdapterStatus::add(&self.io.status.rejected, 1);
                        self.unmapped(topic.to_string()).await;
                    }
                    return;
                };
                let decoded = decode_json(payload, t, layout).and_then(|(value, quality, ts)| {
                    // Only a good report of a value answers a write.
                    if value.is_none() || !quality.is_good() {
                        echo = None;
                    }
                    // No value (a device's "no valid value"): its last one, with the quality.
                    let value = match value {
                        Some(v) => v,
                        None => *last
                            .get(&(asset, property))
                            .ok_or("quality not good and no value, before any value of this tag")?,
                    };
                    // Counts are integers; a state is what its machine type maps (the twin).
                    if matches!(property, Property::GoodCount | Property::ScrapCount)
                        && !matches!(value, Value::Int(_))
                    {
                        return Err(format!("{property} must be an integer, got {value:?}"));
                    }
                    Ok((value, quality, ts))
                });
                match decoded {
                    Ok((value, quality, source_ts)) => {
                        if last.len() < exact.len() + MAX_TRACKED_SOURCES
                            || last.contains_key(&(asset, property))
                        {
                            last.insert((asset, property), value);
                        }
                        self.batch.push(Reading {
                            asset,
                            property,
                            value,
                            quality,
                            source_ts,
                        });
                        self.recovered(topic).await;
                        if let Some((asset, property)) = echo {
                            self.on_readback(&asset, &property, value).await;
                        }
                    }
                    Err(e) => {
                        AdapterStatus::add(&self.io.status.rejected, 1);
                        self.failed(topic, e).await;
                    }
                }
            }
            Decoder::Sparkplug(s) => {
                let mut d = Decoded {
                    readings: std::mem::take(&mut self.batch),
                    ..Default::default()
                };
                s.handle(topic, payload, t, &mut d);
                self.batch = std::mem::take(&mut d.readings);
                AdapterStatus::add(&self.io.status.rejected, d.rejected);
                if d.seq_gap {
                    AdapterStatus::add(&self.io.status.errors, 1);
                    tracing::warn!(connection = %self.name, topic, "sparkplug seq gap: rebirth requested");
                }
                if let Some(node) = d.rebirth {
                    self.request_rebirth(&node);
                }
                for u in d.unmapped {
                    self.unmapped(u).await;
                }
                for (asset, property, value) in d.echoes {
                    self.on_readback(&asset, &property, value).await;
                }
                match d.error {
                    Some(e) => self.failed(topic, e).await,
                    None => self.recovered(topic).await,
                }
            }
        }
    }

    async fn unmapped(&mut self, source: String) {
        if let Some((source, count)) = self.unmapped.report(source, Instant::now()) {
            self.event(None, AdapterEventKind::Unmapped { source, count })
                .await;
        }
    }

    async fn failed(&mut self, tag: &str, error: String) {
        tracing::debug!(connection = %self.name, tag, error = %error, "message refused");
        if self.failing.len() < MAX_TRACKED_SOURCES && self.failing.insert(tag.to_string()) {
            self.event(
                None,
                AdapterEventKind::TagFailed {
                    tag: tag.to_string(),
                    error,
                },
            )
            .await;
        }
    }

    async fn recovered(&mut self, tag: &str) {
        if self.failing.remove(tag) {
            self.event(
                None,
                AdapterEventKind::TagRecovered {
                    tag: tag.to_string(),
                },
            )
            .await;
        }
    }

    /// Pushes the batch; false when the adapter must stop (cancelled, sink closed).
    async fn flush(&mut self) -> bool {
        if self.batch.is_empty() {
            return true;
        }
        let batch = std::mem::take(&mut self.batch);
        let n = batch.len() as u64;
        match push_batch(&*self.io.sink, batch, &self.io.token).await {
            Ok(()) => {
                AdapterStatus::add(&self.io.status.received, n);
                true
            }
            Err(_) => false,
        }
    }

    async fn on_tick(&mut self) {
        let at = Instant::now();
        for (source, count) in self.unmapped.due(at) {
            self.event(None, AdapterEventKind::Unmapped { source, count })
                .await;
        }
        while self.pending.front().is_some_and(|p| p.deadline <= at) {
            let p = self.pending.pop_front().expect("front checked");
            if let Some(w) = p.write {
                let timeout_ms = self.write_timeout.as_millis() as u64;
                let err = WriteError::Timeout {
                    connection: self.name.clone(),
                    timeout_ms,
                };
                self.write_failed(w.req, w.reply, err).await;
            }
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.confirming)
            .into_iter()
            .partition(|(_, deadline)| *deadline <= at);
        self.confirming = waiting;
        for (w, _) in due {
            // Another value reported and never the written one: the device holds another.
            let answer = match w.seen {
                Some(v) => Err(WriteError::Refused {
                    connection: self.name.clone(),
                    error: format!(
                        "the device reports {} = {v}, not {}, {} ms after the write",
                        w.req.property,
                        w.req.value,
                        w.sent.elapsed().as_millis()
                    ),
                }),
                None => Ok(WriteAck::Unconfirmed),
            };
            self.answer(w.req, w.reply, answer).await;
        }
    }

    /// The device reported `value` for the setpoint `property` of `asset`: it confirms the
    /// writes of that value and is remembered by the others (to refute them at their
    /// deadline if the written value never comes).
    async fn on_readback(&mut self, asset: &AssetPath, property: &str, value: Value) {
        let matches = |w: &InFlight| w.req.asset == *asset && w.req.property == property;
        for p in &mut self.pending {
            if let Some(w) = p.write.as_mut().filter(|w| matches(w)) {
                if same_value(w.req.value, value) {
                    w.confirmed = true;
                } else {
                    w.seen = Some(value);
                }
            }
        }
        let mut done = Vec::new();
        let mut i = 0;
        while i < self.confirming.len() {
            let w = &mut self.confirming[i].0;
            if matches(w) && same_value(w.req.value, value) {
                done.push(self.confirming.swap_remove(i).0);
                continue;
            }
            if matches(w) {
                w.seen = Some(value);
            }
            i += 1;
        }
        for w in done {
            self.answer(w.req, w.reply, Ok(WriteAck::Confirmed)).await;
        }
    }

    /// Answers a write, counts it and records its event.
    async fn answer(
        &mut self,
        req: WriteRequest,
        reply: tokio::sync::oneshot::Sender<Result<WriteAck, WriteError>>,
        answer: Result<WriteAck, WriteError>,
    ) {
        let counter = match answer {
            Ok(WriteAck::Confirmed) => &self.io.status.writes_ok,
            Ok(WriteAck::Unconfirmed) => &self.io.status.writes_unconfirmed,
            Err(_) => &self.io.status.writes_failed,
        };
        AdapterStatus::add(counter, 1);
        let outcome = answer.clone().map_err(|e| e.to_string());
        let _ = reply.send(answer);
        self.event(
            Some(req.asset.clone()),
            AdapterEventKind::Written {
                property: req.property,
                value: req.value.to_string(),
                by: req.by,
                outcome,
            },
        )
        .await;
    }

    async fn write_failed(
        &mut self,
        req: WriteRequest,
        reply: tokio::sync::oneshot::Sender<Result<WriteAck, WriteError>>,
        err: WriteError,
    ) {
        self.answer(req, reply, Err(err)).await;
    }

    /// Publishes the write (QoS 1); its answer comes with the PUBACK.
    async fn start_write(&mut self, cmd: WriteCommand) {
        let WriteCommand { req, reply, span } = cmd;
        if !self.connected {
            let err = WriteError::NotConnected {
                connection: self.name.clone(),
            };
            return self.write_failed(req, reply, err).await;
        }
        let bad = |why: String| WriteError::BadValue {
            asset: req.asset.clone(),
            property: req.property.clone(),
            value: req.value.to_string(),
            why,
        };
        let not_writable = || WriteError::NotWritable {
            asset: req.asset.clone(),
            property: req.property.clone(),
        };
        if self.pending.len() + self.confirming.len() >= crate::MAX_PENDING_WRITES {
            let err = WriteError::Busy {
                connection: self.name.clone(),
            };
            return self.write_failed(req, reply, err).await;
        }
        let mut readback = false;
        let message = match &self.decoder {
            Decoder::Json {
                commands,
                readbacks,
                written,
                ..
            } => match commands.get(&(req.asset.clone(), req.property.clone())) {
                None => Err(not_writable()),
                Some(topic) => {
                    readback = readbacks
                        .values()
                        .chain(written.values())
                        .any(|(a, p)| *a == req.asset && *p == req.property);
                    let value = match req.value {
                        Value::Int(i) => serde_json::Value::from(i),
                        Value::Bool(b) => serde_json::Value::from(b),
                        Value::Float(f) => match serde_json::Number::from_f64(f) {
                            Some(n) => serde_json::Value::Number(n),
                            None => {
                                let err = bad("not finite".to_string());
                                return self.write_failed(req, reply, err).await;
                            }
                        },
                    };
                    let body = serde_json::json!({ "value": value, "ts_us": Timestamp::now().as_micros() });
                    Ok((topic.clone(), body.to_string().into_bytes()))
                }
            },
            Decoder::Sparkplug(s) => match s.write_address(&req.asset, &req.property) {
                None => Err(not_writable()),
                Some(addr) => {
                    // A metric of the device's birth is reported back when it changes.
                    readback = addr.born;
                    let t = u64::try_from(Timestamp::now().as_millis()).ok();
                    let mut m = Metric {
                        name: Some(addr.metric.clone()),
                        alias: addr.alias,
                        timestamp: t,
                        ..Default::default()
                    };
                    match sparkplug::set_metric_value(&mut m, addr.datatype, req.value) {
                        Err(why) => Err(bad(why)),
                        Ok(()) => {
                            let payload = Payload {
                                timestamp: t,
                                metrics: vec![m],
                                ..Default::default()
                            };
                            let kind = if addr.device.is_some() {
                                "DCMD"
                            } else {
                                "NCMD"
                            };
                            let topic = sparkplug::topic(
                                s.group(),
                                kind,
                                &addr.node,
                                addr.device.as_deref(),
                            );
                            Ok((topic, payload.encode_to_vec()))
                        }
                    }
                }
            },
        };
        let (topic, payload) = match message {
            Ok(m) => m,
            Err(e) => return self.write_failed(req, reply, e).await,
        };
        let publish = tracing::info_span!(
            parent: &span,
            "mqtt.publish",
            otel.kind = "producer",
            messaging.system = "mqtt",
            messaging.operation.type = "send",
            messaging.destination.name = %topic,
            messaging.message.body.size = payload.len() as i64,
        );
        let published = publish.in_scope(|| self.client.try_publish(topic, payload));
        match published {
            Ok(()) => self.pending.push_back(Pending {
                write: Some(InFlight {
                    req,
                    reply,
                    readback,
                    seen: None,
                    confirmed: false,
                    sent: Instant::now(),
                }),
                pkid: None,
                deadline: Instant::now() + self.write_timeout,
            }),
            Err(_) => {
                let err = WriteError::Busy {
                    connection: self.name.clone(),
                };
                self.write_failed(req, reply, err).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::config::ConnectionConfig;

    const NOW: Timestamp = Timestamp(1_735_689_600_000_000);

    fn parse(text: &str) -> Result<ConnectionConfig, toml::de::Error> {
        #[derive(Deserialize)]
        struct File {
            connections: Vec<ConnectionConfig>,
        }
        toml::from_str::<File>(text).map(|mut f| f.connections.remove(0))
    }

    const SPARKPLUG: &str = r#"
        [[connections]]
        protocol = "mqtt"
        name = "berlin-mqtt"
        broker = "127.0.0.1:1883"
        [connections.format]
        type = "sparkplug"
        group_id = "acme-berlin"
        writable_metrics = ["speed_setpoint_pct"]
        [[connections.format.nodes]]
        node = "assembly-line-1"
        line = "acme/berlin/assembly/line-1"
        devices = ["press-1", "conveyor-1"]
    "#;

    #[test]
    fn sparkplug_config_lists_machine_tags_and_writable_setpoints() {
        let c = parse(SPARKPLUG).expect("valid");
        assert_eq!(c.name(), "berlin-mqtt");
        let targets = c.targets().expect("valid");
        assert_eq!(targets.len(), 2 * 4);
        let press = AssetPath::parse("acme/berlin/assembly/line-1/press-1").expect("path");
        assert!(targets.iter().any(|t| t.asset == press
            && t.writable
            && t.kind == TagKind::Setpoint("speed_setpoint_pct".into())));
    }

    #[test]
    fn json_config_defaults_topics_and_refuses_wildcards() {
        // The struct itself: tests stay valid whatever other protocols join the enum.
        let m: MqttConfig = toml::from_str(
            r#"
            name = "json"
            broker = "localhost:1883"
            [format]
            type = "json"
            topic_prefixes = ["acme/berlin"]
            [[format.tags]]
            asset = "acme/berlin/a/l/m"
            property = "speed_setpoint_pct"
            writable = true
            [[format.tags]]
            asset = "acme/berlin/a/l/m"
            property = "state"
        "#,
        )
        .expect("valid");
        let (_, topics) = m.checked().expect("valid");
        assert_eq!(
            topics,
            [
                "acme/berlin/a/l/m/set/speed_setpoint_pct",
                "acme/berlin/a/l/m/state"
            ]
        );
        let mut bad = m.clone();
        if let PayloadFormat::Json(j) = &mut bad.format {
            j.topic_prefixes = vec!["acme/#".into()];
        }
        assert!(bad.checked().is_err());
    }

    #[test]
    fn a_writable_reading_reads_on_its_topic_and_writes_on_its_command_topic() {
        let tag = |extra: &str| {
            toml::from_str::<MqttConfig>(&format!(
                r#"
                name = "json"
                broker = "localhost:1883"
                [format]
                type = "json"
                [[format.tags]]
                asset = "acme/berlin/a/l/m/sp"
                property = "value"
                writable = true
                {extra}
            "#
            ))
            .expect("parses")
        };
        let (targets, topics) = tag("").checked().expect("valid");
        assert_eq!(
            topics,
            ["acme/berlin/a/l/m/sp"],
            "read where a sensor reads"
        );
        assert!(targets[0].writable);
        let PayloadFormat::Json(j) = &tag("").format else {
            panic!("json")
        };
        assert_eq!(
            j.tags[0].command().as_deref(),
            Some("acme/berlin/a/l/m/sp/set/value")
        );
        for (extra, why) in [
            (
                r#"readback_topic = "dev/sp/rb""#,
                "a writable reading is confirmed by what arrives on its own topic",
            ),
            (
                r#"command_topic = "dev/+/cmd""#,
                "command_topic: not a topic without wildcards",
            ),
            (
                r#"command_topic = "acme/berlin/a/l/m/sp""#,
                "this command topic is one the connection reads",
            ),
        ] {
            let err = tag(extra).checked().expect_err(extra).to_string();
            assert!(err.contains(why), "{extra}: {err}");
        }
        let setpoint = tag(r#"command_topic = "dev/sp/cmd""#).format.clone();
        let PayloadFormat::Json(mut j) = setpoint else {
            panic!("json")
        };
        j.tags[0].asset = "acme/berlin/a/l/m".into();
        j.tags[0].property = "speed_setpoint_pct".into();
        let mut m = tag("");
        m.format = PayloadFormat::Json(j);
        let err = m.checked().expect_err("a setpoint").to_string();
        assert!(
            err.contains("a setpoint's topic is its command topic"),
            "{err}"
        );
    }

    #[test]
    fn protocol_versions_are_3_1_1_or_5_and_unknown_keys_fail() {
        let text = SPARKPLUG.replace("broker =", "protocol_version = \"5\"\nbroker =");
        assert!(parse(&text).expect("parses").targets().is_ok());
        let text = SPARKPLUG.replace("broker =", "protocol_version = \"3.1\"\nbroker =");
        let e = parse(&text)
            .expect("parses")
            .targets()
            .expect_err("refused");
        assert!(e.to_string().contains("expected \"3.1.1\" or \"5\""), "{e}");
        assert!(parse(&SPARKPLUG.replace("broker =", "brokr = \"x\"\nbroker =")).is_err());
        let no_port = SPARKPLUG.replace("127.0.0.1:1883", "localhost");
        assert!(parse(&no_port).expect("parses").targets().is_err());
    }

    fn ours() -> JsonPayload {
        JsonPayload::default()
    }

    #[test]
    fn json_payloads_decode_like_the_simulator_writes_them() {
        let (v, q, ts) = decode_json(
            br#"{"value": 12.5, "ts_us": 5, "quality": "good"}"#,
            NOW,
            &ours(),
        )
        .expect("valid");
        assert_eq!(
            (v, q, ts),
            (Some(Value::Float(12.5)), Quality::GOOD, Timestamp(5))
        );
        let (v, _, ts) = decode_json(br#"{"value": 3}"#, NOW, &ours()).expect("valid");
        assert_eq!((v, ts), (Some(Value::Int(3)), NOW));
        let (v, q, _) = decode_json(
            br#"{"value": true, "quality": "bad", "reason": "communication failure"}"#,
            NOW,
            &ours(),
        )
        .expect("valid");
        assert_eq!(
            (v, q),
            (
                Some(Value::Bool(true)),
                Quality::bad(QualityReason::CommFailure)
            )
        );
        // No valid value, and the device says so: the quality alone.
        let (v, q, _) =
            decode_json(br#"{"value": null, "quality": "BAD"}"#, NOW, &ours()).expect("valid");
        assert_eq!((v, q), (None, Quality::bad(QualityReason::None)));
        for bad in [
            &br#"{"value": null}"#[..],
            br#"{"value": "1"}"#,
            br#"{"ts_us": 1}"#,
            br#"{"value": 1, "ts_us": "yesterday"}"#,
            br#"{"value": 1, "quality": "great"}"#,
            br#"{"value": 18446744073709551615}"#,
            br#"[1]"#,
            b"\xff",
        ] {
            assert!(
                decode_json(bad, NOW, &ours()).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Another device's naming: fields by name or JSON pointer, times in s, ms, µs or RFC
    /// 3339 (or told apart by size), quality codes through a map.
    #[test]
    fn json_payloads_of_other_devices_decode_by_their_layout() {
        let layout: JsonPayload = toml::from_str(
            r#"
value = "/data/v"
timestamp = "t"
quality = "q"
quality_map = { "192" = "good", "64" = "uncertain", "0" = "bad", "true" = "good" }
"#,
        )
        .expect("a layout");
        let at_ms = 1_735_689_600_123_i64;
        let us = Timestamp(at_ms * 1000);
        for (payload, want) in [
            (
                format!(r#"{{"data": {{"v": 21.5}}, "t": {at_ms}, "q": 192.0}}"#),
                (Some(Value::Float(21.5)), Quality::GOOD, us),
            ),
            (
                r#"{"data": {"v": 7}, "t": 1735689600.123, "q": 64}"#.to_string(),
                (
                    Some(Value::Int(7)),
                    Quality::uncertain(QualityReason::None),
                    us,
                ),
            ),
            (
                r#"{"data": {"v": 7}, "t": "2025-01-01T01:00:00.123+01:00", "q": true}"#
                    .to_string(),
                (
                    Some(Value::Int(7)),
                    Quality::GOOD,
                    Timestamp(1_735_689_600_123_000),
                ),
            ),
            (
                r#"{"data": {"v": null}, "t": 1735689600123000, "q": 0}"#.to_string(),
                (None, Quality::bad(QualityReason::None), us),
            ),
        ] {
            assert_eq!(
                decode_json(payload.as_bytes(), NOW, &layout).expect(&payload),
                want,
                "{payload}"
            );
        }
        // A code the map does not list, and a value where the layout has none: refused,
        // naming the field.
        let e = decode_json(br#"{"data": {"v": 1}, "q": 3}"#, NOW, &layout).expect_err("3");
        assert!(e.contains("q 3 is not in payload.quality_map"), "{e}");
        let e = decode_json(br#"{"v": 1, "q": 192}"#, NOW, &layout).expect_err("no value");
        assert!(e.contains("/data/v"), "{e}");
        // An explicit unit wins over the size.
        let secs: JsonPayload =
            toml::from_str("timestamp = \"ts\"\ntimestamp_unit = \"s\"").expect("a layout");
        let (_, _, ts) = decode_json(br#"{"value": 1, "ts": 5}"#, NOW, &secs).expect("valid");
        assert_eq!(ts, Timestamp(5_000_000));
        // By size, a small number is no time.
        let auto: JsonPayload = toml::from_str("timestamp = \"t\"").expect("a layout");
        for t in ["0", "-5", "86400"] {
            let p = format!(r#"{{"value": 1, "t": {t}}}"#);
            let e = decode_json(p.as_bytes(), NOW, &auto).expect_err(t);
            assert!(e.contains("set timestamp_unit"), "{e}");
        }
        let e = decode_json(br#"{"value": 1, "ts": "5"}"#, NOW, &secs).expect_err("a string");
        assert!(e.starts_with("ts \"5\""), "{e}");
    }

    #[test]
    fn prefix_topics_map_by_the_simulator_naming() {
        let m = AssetPath::parse("acme/berlin/a/l/press-1").expect("path");
        assert_eq!(
            topic_rule("acme/berlin/a/l/press-1/state"),
            Some((m.id(), Property::State))
        );
        let s = AssetPath::parse("acme/berlin/a/l/press-1/oil-temp").expect("path");
        assert_eq!(
            topic_rule("acme/berlin/a/l/press-1/oil-temp"),
            Some((s.id(), Property::Value))
        );
        assert_eq!(
            topic_rule("acme/berlin/a/l/press-1/set/speed_setpoint_pct"),
            None
        );
        assert_eq!(topic_rule("acme/berlin/a/l"), None);
        assert_eq!(topic_rule("Acme/BAD PATH/a/l/m/x"), None);
    }

    #[test]
    fn unmapped_sources_are_reported_once_then_once_a_minute_with_the_count() {
        let mut u = UnmappedThrottle::default();
        let t0 = Instant::now();
        assert_eq!(u.report("x".into(), t0), Some(("x".into(), 1)));
        assert_eq!(u.report("x".into(), t0), None);
        assert_eq!(u.report("x".into(), t0), None);
        assert!(u.due(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(u.due(t0 + UNMAPPED_EVERY), vec![("x".to_string(), 2)]);
        assert!(u.due(t0 + UNMAPPED_EVERY * 3).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn json_decoder_takes_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok((v, _, _)) = decode_json(&bytes, NOW, &ours()) {
                prop_assert!(v.is_none_or(Value::is_finite));
            }
        }

        #[test]
        fn json_decoder_takes_mutated_valid_payloads(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..8)
        ) {
            let mut p = br#"{"value": 12.5, "ts_us": 1735689600000000, "quality": "bad", "reason": "stale"}"#.to_vec();
            for (at, byte, op) in edits {
                if p.is_empty() { break; }
                let i = at.index(p.len());
                match op {
                    0 => p[i] = byte,
                    1 => p.insert(i, byte),
                    _ => { p.remove(i); }
                }
            }
            if let Ok((v, _, _)) = decode_json(&p, NOW, &ours()) {
                prop_assert!(v.is_none_or(Value::is_finite));
            }
        }
    }
}
