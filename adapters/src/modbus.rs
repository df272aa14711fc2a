//! Modbus TCP adapter: polls one PLC (one unit on one endpoint) with tokio-modbus and turns
//! its registers into `Reading`s; writes setpoints back.
//!
//! - Tags are grouped once at start into poll groups: contiguous blocks per register kind,
//!   neighbours merged while the hole between them is at most `max_gap` registers (reading a
//!   few unused registers is cheaper than another round trip), split at the per-request
//!   maximum. Each poll sends one request per group and pushes every tag's value (changed or
//!   not: twins judge staleness by arrival) in one batch.
//! - A Modbus exception fails only its group: its tags read Bad (`ConfigError` for
//!   IllegalDataAddress, a mapping error; `SensorFailure` otherwise) with their last value,
//!   one `TagFailed` per group on the change, `TagRecovered` when it reads again.
//! - A timeout or transport error is link loss: the connection may hold a late answer that
//!   would be taken for the next request's, so it is dropped. Tags that had a value read
//!   Bad(`CommFailure`), `Disconnected`, reconnect with backoff, `Connected`.
//! - Polls start every `poll_interval_ms` from the start of the previous one; one that
//!   overruns skips the missed starts (counted in `overruns`) instead of bunching them.
//!   While the sink pushes back the poll's batch waits and nothing is read (writes wait in
//!   their bounded queue too).
//! - A merged group also reads the unmapped registers between its tags: a PLC that has no
//!   register there answers IllegalDataAddress for the whole group (set `max_gap = 0`).
//! - A tag with `bad_when` reads Bad(`SensorFailure`) while that bit of a PLC status word is
//!   set (the simulator's per-machine sensor-status word); values outside `min`/`max` read
//!   Uncertain(`OutOfRange`).
//!
//! The simulator's `mapping.toml` is valid input (`mapping_file` + `line`, or
//! `ModbusConfig::from_sim_mapping`): its shape is parsed here, the simulator crate is not a
//! dependency.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use ferrotwin_models::{
    AssetPath, Property, Quality, QualityReason, Reading, Timestamp, Value, ValueType,
};
use serde::Deserialize;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_modbus::ExceptionCode;
use tokio_modbus::client::{Client, Context, Reader, Writer};

use crate::AdapterIo;
use crate::backoff::Backoff;
use crate::config::{ConfigError, TagKind, TagTarget, check_connection};
use crate::push::{NotDelivered, push_batch};
use crate::status::{AdapterEvent, AdapterEventKind, AdapterStatus, LinkState};
use crate::write::{WriteAck, WriteCommand, WriteError};
use tracing::Instrument as _;

/// Most registers one read may ask for (Modbus application protocol 6.3/6.4).
pub const MAX_REGISTERS_PER_READ: u16 = 125;
/// Most coils or discrete inputs one read may ask for (6.1/6.2).
pub const MAX_BITS_PER_READ: u16 = 2000;
/// The simulator's mapping format this adapter reads.
pub const SIM_MAPPING_VERSION: u32 = 1;

const RECONNECT_BASE_MS: u64 = 200;
const RECONNECT_MAX_MS: u64 = 10_000;

mod defaults {
    pub fn unit_id() -> u8 {
        1
    }
    pub fn poll_interval_ms() -> u64 {
        1000
    }
    pub fn timeout_ms() -> u64 {
        1000
    }
    pub fn max_gap() -> u16 {
        8
    }
    pub fn max_registers() -> u16 {
        super::MAX_REGISTERS_PER_READ
    }
    pub fn max_bits() -> u16 {
        super::MAX_BITS_PER_READ
    }
    pub fn scale() -> f64 {
        1.0
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    Coil,
    DiscreteInput,
    Holding,
    Input,
}

impl RegisterKind {
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::DiscreteInput)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RegisterKind::Coil => "coil",
            RegisterKind::DiscreteInput => "discrete_input",
            RegisterKind::Holding => "holding",
            RegisterKind::Input => "input",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    U16,
    I16,
    U32,
    I32,
    F32,
    /// A coil or discrete input.
    Bool,
}

impl DataType {
    /// The name a config gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::F32 => "f32",
            DataType::Bool => "bool",
        }
    }

    /// Registers (bits for `Bool`) the value takes.
    pub fn words(self) -> u16 {
        match self {
            DataType::U16 | DataType::I16 | DataType::Bool => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
        }
    }
}

/// Order of the two registers of a 32-bit value; each register is high byte first, as
/// Modbus sends every register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word at the lower address.
    #[default]
    BigEndian,
    /// Low word at the lower address.
    LittleEndian,
}

impl WordOrder {
    fn join(self, w: [u16; 2]) -> u32 {
        let (hi, lo) = match self {
            WordOrder::BigEndian => (w[0], w[1]),
            WordOrder::LittleEndian => (w[1], w[0]),
        };
        (u32::from(hi) << 16) | u32::from(lo)
    }

    fn split(self, v: u32) -> [u16; 2] {
        let (hi, lo) = ((v >> 16) as u16, v as u16);
        match self {
            WordOrder::BigEndian => [hi, lo],
            WordOrder::LittleEndian => [lo, hi],
        }
    }
}

/// A bit of a PLC status word: the tag reads Bad(`SensorFailure`) while it is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusBit {
    /// `holding` or `input`.
    pub register: RegisterKind,
    pub address: u16,
    /// 0..=15, 0 = least significant.
    pub bit: u8,
}

/// One tag: the fields of the simulator's `mapping::TagMap` plus `offset`, `min`, `max`.
/// Engineering value = raw × `scale` + `offset`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusTag {
    pub asset: String,
    pub property: String,
    pub register: RegisterKind,
    pub address: u16,
    pub data_type: DataType,
    #[serde(default)]
    pub word_order: WordOrder,
    #[serde(default = "defaults::scale")]
    pub scale: f64,
    #[serde(default)]
    pub offset: f64,
    #[serde(default)]
    pub writable: bool,
    /// Engineering values below read Uncertain(`OutOfRange`); writes below are refused.
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    #[serde(default)]
    pub bad_when: Option<StatusBit>,
    /// What the value is reported as: `bool` data reads as bool, a sensor's `value` as
    /// float, machine properties as int, unless set here (an int sensor served as f32).
    #[serde(default)]
    pub value_type: Option<ValueType>,
}

impl ModbusTag {
    /// How events and errors name the tag: `holding 12`.
    pub fn label(&self) -> String {
        format!("{} {}", self.register.as_str(), self.address)
    }
}

/// `protocol = "modbus"`: one Modbus TCP unit.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModbusConfig {
    pub name: String,
    /// `host:port`.
    pub endpoint: String,
    #[serde(default = "defaults::unit_id")]
    pub unit_id: u8,
    #[serde(default = "defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// Per request (and per connection attempt).
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Unused registers a poll group may read to join two tags into one request.
    #[serde(default = "defaults::max_gap")]
    pub max_gap: u16,
    /// 2..=125.
    #[serde(default = "defaults::max_registers")]
    pub max_registers_per_request: u16,
    /// 1..=2000.
    #[serde(default = "defaults::max_bits")]
    pub max_bits_per_request: u16,
    /// The simulator's `mapping.toml`: the tags of `line` are added to `tags`. Read when the
    /// connection is validated and again when its task starts.
    #[serde(default)]
    pub mapping_file: Option<PathBuf>,
    #[serde(default)]
    pub line: Option<String>,
    #[serde(default)]
    pub tags: Vec<ModbusTag>,
}

/// The shape of the simulator's `mapping.toml`; keys this adapter does not use are ignored.
#[derive(Debug, Deserialize)]
struct SimMapping {
    version: u32,
    lines: Vec<SimLine>,
}

#[derive(Debug, Deserialize)]
struct SimLine {
    line: String,
    #[serde(default)]
    unit_id: Option<u8>,
    tags: Vec<ModbusTag>,
}

impl ModbusConfig {
    /// A connection polling `line` of the simulator's `mapping.toml` text at `endpoint`
    /// (the file's endpoints are placeholders; the real ones are in `endpoints.toml`), with
    /// default timing. Imports the tags that feed a reading property or are writable; the
    /// status words are polled through the `bad_when` of the tags they describe, and
    /// `fault_active` (no reading property takes it) is left out.
    pub fn from_sim_mapping(
        name: &str,
        endpoint: &str,
        mapping_toml: &str,
        line: &str,
    ) -> Result<ModbusConfig, ConfigError> {
        let (unit_id, tags) = import_line(name, mapping_toml, line)?;
        Ok(ModbusConfig {
            name: name.to_owned(),
            endpoint: endpoint.to_owned(),
            unit_id: unit_id.unwrap_or_else(defaults::unit_id),
            poll_interval_ms: defaults::poll_interval_ms(),
            timeout_ms: defaults::timeout_ms(),
            max_gap: defaults::max_gap(),
            max_registers_per_request: defaults::max_registers(),
            max_bits_per_request: defaults::max_bits(),
            mapping_file: None,
            line: None,
            tags,
        })
    }

    fn err(&self, what: impl Into<String>) -> ConfigError {
        ConfigError::Connection {
            connection: self.name.clone(),
            what: what.into(),
        }
    }

    /// `tags` plus those imported from `mapping_file`.
    pub fn resolved_tags(&self) -> Result<Vec<ModbusTag>, ConfigError> {
        let mut tags = self.tags.clone();
        match (&self.mapping_file, &self.line) {
            (None, None) => {}
            (Some(file), Some(line)) => {
                let text = std::fs::read_to_string(file)
                    .map_err(|e| self.err(format!("mapping_file {}: {e}", file.display())))?;
                let (_, imported) = import_line(&self.name, &text, line)
                    .map_err(|e| self.err(format!("mapping_file {}: {e}", file.display())))?;
                tags.extend(imported);
            }
            (Some(_), None) => return Err(self.err("mapping_file needs line")),
            (None, Some(_)) => return Err(self.err("line needs mapping_file")),
        }
        Ok(tags)
    }

    /// Validates the connection and every tag; the targets in `resolved_tags` order.
    pub fn targets(&self) -> Result<Vec<TagTarget>, ConfigError> {
        Ok(self.validated()?.1)
    }

    fn validated(&self) -> Result<(Vec<ModbusTag>, Vec<TagTarget>), ConfigError> {
        if !(2..=MAX_REGISTERS_PER_READ).contains(&self.max_registers_per_request) {
            return Err(self.err(format!(
                "max_registers_per_request {} is not in 2..={MAX_REGISTERS_PER_READ}",
                self.max_registers_per_request
            )));
        }
        if !(1..=MAX_BITS_PER_READ).contains(&self.max_bits_per_request) {
            return Err(self.err(format!(
                "max_bits_per_request {} is not in 1..={MAX_BITS_PER_READ}",
                self.max_bits_per_request
            )));
        }
        if self.poll_interval_ms == 0 || self.timeout_ms == 0 {
            return Err(self.err("poll_interval_ms and timeout_ms must be > 0"));
        }
        let port_ok = self.endpoint.rsplit_once(':').is_some_and(|(host, port)| {
            crate::valid_host(host) && port.parse::<u16>().is_ok_and(|p| p != 0)
        });
        if !port_ok {
            return Err(self.err(format!(
                "endpoint {:?} is not HOST:PORT (a DNS name or an IP address, no spaces)",
                self.endpoint
            )));
        }
        let tags = self.resolved_tags()?;
        let mut targets = Vec::with_capacity(tags.len());
        for t in &tags {
            let label = t.label();
            check_tag(t).map_err(|what| ConfigError::Tag {
                connection: self.name.clone(),
                tag: label.clone(),
                what,
            })?;
            targets.push(TagTarget::parse(
                &self.name,
                &label,
                &t.asset,
                &t.property,
                t.writable,
            )?);
        }
        check_connection(&self.name, &targets)?;
        Ok((tags, targets))
    }
}

fn import_line(
    name: &str,
    mapping_toml: &str,
    line: &str,
) -> Result<(Option<u8>, Vec<ModbusTag>), ConfigError> {
    let err = |what: String| ConfigError::Connection {
        connection: name.to_owned(),
        what,
    };
    let mapping: SimMapping =
        toml::from_str(mapping_toml).map_err(|e| err(format!("simulator mapping: {e}")))?;
    if mapping.version != SIM_MAPPING_VERSION {
        return Err(err(format!(
            "simulator mapping version {} is not {SIM_MAPPING_VERSION}",
            mapping.version
        )));
    }
    let known: Vec<&str> = mapping.lines.iter().map(|l| l.line.as_str()).collect();
    let Some(l) = mapping.lines.iter().find(|l| l.line == line) else {
        return Err(err(format!(
            "simulator mapping has no line {line:?} (lines: {})",
            known.join(", ")
        )));
    };
    let tags = l
        .tags
        .iter()
        .filter(|t| t.writable || Property::parse(&t.property).is_some())
        .cloned()
        .collect();
    Ok((l.unit_id, tags))
}

/// What `TagTarget::parse` cannot know: the Modbus side of a tag.
fn check_tag(t: &ModbusTag) -> Result<(), String> {
    if t.register.is_bit() != (t.data_type == DataType::Bool) {
        return Err(if t.register.is_bit() {
            format!(
                "a {} holds one bit: its data_type is bool, not {}",
                t.register.as_str(),
                t.data_type.as_str()
            )
        } else {
            format!(
                "data_type bool is for coils and discrete inputs; a {} register holds u16, i16, \
                 u32, i32 or f32",
                t.register.as_str()
            )
        });
    }
    if t.writable && !matches!(t.register, RegisterKind::Holding | RegisterKind::Coil) {
        return Err("only holding registers and coils are writable".into());
    }
    if u32::from(t.address) + u32::from(t.data_type.words()) > 1 << 16 {
        return Err("runs past address 65535".into());
    }
    if !(t.scale.is_finite() && t.scale != 0.0 && t.offset.is_finite()) {
        return Err("scale must be finite and not 0, offset finite".into());
    }
    if let (Some(lo), Some(hi)) = (t.min, t.max)
        && (lo.is_nan() || hi.is_nan() || lo > hi)
    {
        return Err(format!("min {lo} is above max {hi}"));
    }
    if let Some(b) = t.bad_when
        && (b.register.is_bit() || b.bit > 15)
    {
        return Err("bad_when names a bit 0..=15 of a holding or input register".into());
    }
    Ok(())
}

/// One request of a poll: `count` registers (or bits) of `register` from `start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollGroup {
    pub register: RegisterKind,
    pub start: u16,
    pub count: u16,
}

impl PollGroup {
    /// `input 12..=19`, as events name the group.
    pub fn label(&self) -> String {
        format!(
            "{} {}..={}",
            self.register.as_str(),
            self.start,
            u32::from(self.start) + u32::from(self.count) - 1
        )
    }

    fn contains(&self, register: RegisterKind, address: u16, len: u16) -> bool {
        register == self.register
            && address >= self.start
            && u32::from(address) + u32::from(len) <= u32::from(self.start) + u32::from(self.count)
    }
}

/// The requests that read `spans` (register, address, length): sorted by kind and
/// address, a span joined to the group before it when the hole between them is at most
/// `max_gap` and the group stays within `max_registers` (`max_bits` for coils and discrete
/// inputs). Every span must fit one request.
pub fn poll_groups(
    spans: &[(RegisterKind, u16, u16)],
    max_gap: u16,
    max_registers: u16,
    max_bits: u16,
) -> Vec<PollGroup> {
    let sorted: BTreeSet<(RegisterKind, u16, u16)> = spans.iter().copied().collect();
    let mut groups: Vec<PollGroup> = Vec::new();
    for (register, address, len) in sorted {
        let limit = u32::from(if register.is_bit() {
            max_bits
        } else {
            max_registers
        });
        let end = u32::from(address) + u32::from(len);
        if let Some(g) = groups.last_mut()
            && g.register == register
        {
            let g_end = u32::from(g.start) + u32::from(g.count);
            let gap = u32::from(address).saturating_sub(g_end);
            let span = end.max(g_end) - u32::from(g.start);
            if gap <= u32::from(max_gap) && span <= limit {
                g.count = span as u16;
                continue;
            }
        }
        groups.push(PollGroup {
            register,
            start: address,
            count: len,
        });
    }
    groups
}

/// The raw number in `words` (one or two registers in address order) as `data_type`.
pub fn decode(words: &[u16], data_type: DataType, order: WordOrder) -> Option<f64> {
    let pair = || Some([*words.first()?, *words.get(1)?]);
    Some(match data_type {
        DataType::U16 | DataType::Bool => f64::from(*words.first()?),
        DataType::I16 => f64::from(*words.first()? as i16),
        DataType::U32 => f64::from(order.join(pair()?)),
        DataType::I32 => f64::from(order.join(pair()?) as i32),
        DataType::F32 => f64::from(f32::from_bits(order.join(pair()?))),
    })
}

/// The registers that hold engineering value `value` in `tag`, or why it does not fit.
pub fn encode(tag: &ModbusTag, value: Value) -> Result<Vec<u16>, String> {
    let v = value.as_f64();
    if !v.is_finite() {
        return Err("not a finite number".into());
    }
    if tag.min.is_some_and(|lo| v < lo) || tag.max.is_some_and(|hi| v > hi) {
        return Err(format!(
            "outside {}..={}",
            tag.min.map_or("".into(), |x| x.to_string()),
            tag.max.map_or("".into(), |x| x.to_string())
        ));
    }
    let raw = (v - tag.offset) / tag.scale;
    let int = |lo: f64, hi: f64| {
        let r = raw.round();
        if r < lo || r > hi {
            Err(format!(
                "raw {r} does not fit {:?} ({lo}..={hi})",
                tag.data_type
            ))
        } else {
            Ok(r)
        }
    };
    Ok(match tag.data_type {
        DataType::U16 => vec![int(0.0, f64::from(u16::MAX))? as u16],
        DataType::I16 => vec![int(f64::from(i16::MIN), f64::from(i16::MAX))? as i16 as u16],
        DataType::U32 => tag
            .word_order
            .split(int(0.0, f64::from(u32::MAX))? as u32)
            .to_vec(),
        DataType::I32 => tag
            .word_order
            .split(int(f64::from(i32::MIN), f64::from(i32::MAX))? as i32 as u32)
            .to_vec(),
        DataType::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err("does not fit f32".into());
            }
            tag.word_order.split((raw as f32).to_bits()).to_vec()
        }
        DataType::Bool => vec![u16::from(raw != 0.0)],
    })
}

/// A polled tag, resolved.
#[derive(Debug)]
struct Polled {
    tag: ModbusTag,
    asset: AssetPath,
    property: Property,
    group: usize,
    /// Offset of the tag in its group's answer.
    at: usize,
    /// Group and offset of its status word.
    status: Option<(usize, usize, u8)>,
}

/// Everything fixed at start.
#[derive(Debug)]
struct Plan {
    groups: Vec<PollGroup>,
    polled: Vec<Polled>,
    /// Per group: indices into `polled`.
    members: Vec<Vec<usize>>,
    /// The writable tags by (asset, property).
    writable: HashMap<(AssetPath, String), ModbusTag>,
}

impl Plan {
    fn build(config: &ModbusConfig) -> Result<Plan, ConfigError> {
        let (tags, targets) = config.validated()?;
        let mut spans = Vec::new();
        let mut writable = HashMap::new();
        let mut readable = Vec::new();
        for (tag, target) in tags.into_iter().zip(targets) {
            if target.writable {
                writable.insert(
                    (target.asset.clone(), target.property_name().to_owned()),
                    tag.clone(),
                );
            }
            // A setpoint has no reading property: written, never polled.
            let TagKind::Reading(property) = target.kind else {
                continue;
            };
            spans.push((tag.register, tag.address, tag.data_type.words()));
            if let Some(b) = tag.bad_when {
                spans.push((b.register, b.address, 1));
            }
            readable.push((tag, target.asset, property));
        }
        let groups = poll_groups(
            &spans,
            config.max_gap,
            config.max_registers_per_request,
            config.max_bits_per_request,
        );
        let find = |register, address, len| {
            groups
                .iter()
                .position(|g| g.contains(register, address, len))
                .map(|i| (i, usize::from(address - groups[i].start)))
                .expect("every span is in a group")
        };
        let mut members = vec![Vec::new(); groups.len()];
        let polled: Vec<Polled> = readable
            .into_iter()
            .enumerate()
            .map(|(i, (tag, asset, property))| {
                let (group, at) = find(tag.register, tag.address, tag.data_type.words());
                members[group].push(i);
                let status = tag.bad_when.map(|b| {
                    let (g, a) = find(b.register, b.address, 1);
                    (g, a, b.bit)
                });
                Polled {
                    tag,
                    asset,
                    property,
                    group,
                    at,
                    status,
                }
            })
            .collect();
        Ok(Plan {
            groups,
            polled,
            members,
            writable,
        })
    }
}

/// One group's answer.
#[derive(Debug)]
enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
    Exception(ExceptionCode),
}

impl Answer {
    fn words(&self, at: usize, n: usize) -> Option<Vec<u16>> {
        match self {
            Answer::Words(w) => w.get(at..at + n).map(<[u16]>::to_vec),
            Answer::Bits(b) => b.get(at).map(|b| vec![u16::from(*b)]),
            Answer::Exception(_) => None,
        }
    }
}

/// Why the poll loop of one connection ended.
enum Ended {
    Cancelled,
    SinkClosed,
    Lost(String),
}

/// What the adapter keeps between polls.
struct Adapter {
    name: String,
    endpoint: String,
    unit_id: u8,
    poll_interval: Duration,
    timeout: Duration,
    plan: Plan,
    /// Last value per polled tag.
    last: Vec<Option<Value>>,
    /// Per group: the exception it failed with, while it fails.
    failing: Vec<Option<ExceptionCode>>,
}

/// The deepest asset holding every one of `paths` (`None` if they share nothing).
fn common_ancestor<'a>(mut paths: impl Iterator<Item = &'a AssetPath>) -> Option<AssetPath> {
    let mut common = paths.next()?.clone();
    for p in paths {
        while !p.starts_with(&common) {
            common = common.parent()?;
        }
    }
    Some(common)
}

/// What a tag's values are reported as.
fn value_type_of(tag: &ModbusTag, property: Property) -> ValueType {
    match (tag.value_type, tag.data_type, property) {
        (Some(t), _, _) => t,
        (None, DataType::Bool, _) => ValueType::Bool,
        (None, _, Property::Value) => ValueType::Float,
        (None, _, _) => ValueType::Int,
    }
}

/// A zero of the type a tag reads as, for a failing tag never read.
fn zero_of(p: &Polled) -> Value {
    match value_type_of(&p.tag, p.property) {
        ValueType::Bool => Value::Bool(false),
        ValueType::Float => Value::Float(0.0),
        ValueType::Int => Value::Int(0),
    }
}

impl Adapter {
    /// Engineering value and quality of a polled tag from its group's answer.
    fn value_of(&self, p: &Polled, answers: &[Answer]) -> Option<(Value, Quality)> {
        let words = answers[p.group].words(p.at, usize::from(p.tag.data_type.words()))?;
        let raw = decode(&words, p.tag.data_type, p.tag.word_order)?;
        let eng = raw * p.tag.scale + p.tag.offset;
        if !eng.is_finite() {
            return None;
        }
        let value = match value_type_of(&p.tag, p.property) {
            ValueType::Bool => Value::Bool(eng != 0.0),
            ValueType::Float => Value::Float(eng),
            ValueType::Int => Value::Int(eng.round() as i64),
        };
        let bad = p.status.is_some_and(|(g, at, bit)| {
            answers[g]
                .words(at, 1)
                .is_some_and(|w| w[0] & (1 << bit) != 0)
        });
        let quality = if bad {
            Quality::bad(QualityReason::SensorFailure)
        } else if p.tag.min.is_some_and(|lo| eng < lo) || p.tag.max.is_some_and(|hi| eng > hi) {
            Quality::uncertain(QualityReason::OutOfRange)
        } else {
            Quality::GOOD
        };
        Some((value, quality))
    }

    /// The readings of one poll and the group events it causes.
    fn readings(
        &mut self,
        answers: &[Answer],
        ts: Timestamp,
    ) -> (Vec<Reading>, Vec<(Option<AssetPath>, AdapterEventKind)>) {
        let mut batch = Vec::with_capacity(self.plan.polled.len());
        let mut events = Vec::new();
        for (g, answer) in answers.iter().enumerate() {
            let members = &self.plan.members[g];
            let asset = || common_ancestor(members.iter().map(|&i| &self.plan.polled[i].asset));
            let label = self.plan.groups[g].label();
            match (answer, self.failing[g]) {
                (Answer::Exception(e), was) => {
                    if was != Some(*e) {
                        events.push((
                            asset(),
                            AdapterEventKind::TagFailed {
                                tag: label,
                                error: format!("Modbus exception {e:?}: {e}"),
                            },
                        ));
                    }
                    self.failing[g] = Some(*e);
                }
                (_, Some(_)) => {
                    events.push((asset(), AdapterEventKind::TagRecovered { tag: label }));
                    self.failing[g] = None;
                }
                (_, None) => {}
            }
        }
        for (i, p) in self.plan.polled.iter().enumerate() {
            let (value, quality) = match &answers[p.group] {
                Answer::Exception(e) => {
                    let reason = if *e == ExceptionCode::IllegalDataAddress {
                        QualityReason::ConfigError
                    } else {
                        QualityReason::SensorFailure
                    };
                    (
                        self.last[i].unwrap_or_else(|| zero_of(p)),
                        Quality::bad(reason),
                    )
                }
                _ => match self.value_of(p, answers) {
                    Some((v, q)) => {
                        self.last[i] = Some(v);
                        (v, q)
                    }
                    None => (
                        self.last[i].unwrap_or_else(|| zero_of(p)),
                        Quality::bad(QualityReason::SensorFailure),
                    ),
                },
            };
            batch.push(Reading {
                asset: p.asset.id(),
                property: p.property,
                value,
                quality,
                source_ts: ts,
            });
        }
        (batch, events)
    }

    /// One request per group. `Err`: the link is lost.
    async fn poll(&self, ctx: &mut Context) -> Result<Vec<Answer>, String> {
        let mut answers = Vec::with_capacity(self.plan.groups.len());
        for g in &self.plan.groups {
            let answer = match g.register {
                RegisterKind::Holding => self
                    .timed(g, ctx.read_holding_registers(g.start, g.count))
                    .await?
                    .map(Answer::Words),
                RegisterKind::Input => self
                    .timed(g, ctx.read_input_registers(g.start, g.count))
                    .await?
                    .map(Answer::Words),
                RegisterKind::Coil => self
                    .timed(g, ctx.read_coils(g.start, g.count))
                    .await?
                    .map(Answer::Bits),
                RegisterKind::DiscreteInput => self
                    .timed(g, ctx.read_discrete_inputs(g.start, g.count))
                    .await?
                    .map(Answer::Bits),
            };
            answers.push(answer.unwrap_or_else(Answer::Exception));
        }
        Ok(answers)
    }

    async fn timed<T>(
        &self,
        g: &PollGroup,
        request: impl Future<Output = tokio_modbus::Result<T>>,
    ) -> Result<Result<T, ExceptionCode>, String> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(format!("reading {}: {e}", g.label())),
            Err(_) => Err(format!(
                "reading {}: no answer within {} ms",
                g.label(),
                self.timeout.as_millis()
            )),
        }
    }

    /// Carries out one write. `Err`: the link is lost (the command was answered).
    async fn write(
        &self,
        ctx: &mut Context,
        cmd: WriteCommand,
        io: &AdapterIo,
    ) -> Result<(), String> {
        let WriteCommand { req, reply, span } = cmd;
        let Some(tag) = self
            .plan
            .writable
            .get(&(req.asset.clone(), req.property.clone()))
        else {
            AdapterStatus::add(&io.status.writes_failed, 1);
            let _ = reply.send(Err(WriteError::NotWritable {
                asset: req.asset,
                property: req.property,
            }));
            return Ok(());
        };
        let words = match encode(tag, req.value) {
            Ok(w) => w,
            Err(why) => {
                AdapterStatus::add(&io.status.writes_failed, 1);
                let _ = reply.send(Err(WriteError::BadValue {
                    asset: req.asset,
                    property: req.property,
                    value: req.value.to_string(),
                    why,
                }));
                return Ok(());
            }
        };
        let request = async {
            match (tag.register, words.as_slice()) {
                (RegisterKind::Coil, [w]) => ctx.write_single_coil(tag.address, *w != 0).await,
                (_, [w]) => ctx.write_single_register(tag.address, *w).await,
                (_, ws) => ctx.write_multiple_registers(tag.address, ws).await,
            }
        };
        let function = match (tag.register, words.len()) {
            (RegisterKind::Coil, 1) => "write_single_coil",
            (_, 1) => "write_single_register",
            _ => "write_multiple_registers",
        };
        let pdu = tracing::info_span!(
            parent: &span,
            "modbus.write",
            otel.kind = "client",
            modbus.function = function,
            modbus.address = i64::from(tag.address),
            modbus.unit_id = i64::from(self.unit_id),
            modbus.words = words.len() as i64,
            ferrotwin.plc_answer = tracing::field::Empty,
        );
        let (answer, lost) = match tokio::time::timeout(self.timeout, request)
            .instrument(pdu.clone())
            .await
        {
            Ok(Ok(Ok(()))) => (Ok(WriteAck::Confirmed), None),
            Ok(Ok(Err(e))) => (
                Err(WriteError::Refused {
                    connection: self.name.clone(),
                    error: format!("{}: Modbus exception {e:?}: {e}", tag.label()),
                }),
                None,
            ),
            Ok(Err(e)) => (
                Err(WriteError::NotConnected {
                    connection: self.name.clone(),
                }),
                Some(format!("writing {}: {e}", tag.label())),
            ),
            Err(_) => (
                Err(WriteError::Timeout {
                    connection: self.name.clone(),
                    timeout_ms: self.timeout.as_millis() as u64,
                }),
                Some(format!(
                    "writing {}: no answer within {} ms",
                    tag.label(),
                    self.timeout.as_millis()
                )),
            ),
        };
        let counter = if answer.is_ok() {
            &io.status.writes_ok
        } else {
            &io.status.writes_failed
        };
        AdapterStatus::add(counter, 1);
        pdu.record(
            "ferrotwin.plc_answer",
            tracing::field::display(match &answer {
                Ok(ack) => ack.to_string(),
                Err(e) => e.to_string(),
            }),
        );
        // Only what reached the PLC is an event; a link failure is the Disconnected event.
        let event = match (&answer, &lost) {
            (_, Some(_)) => None,
            (Ok(ack), None) => Some(Ok(*ack)),
            (Err(e), None) => Some(Err(e.to_string())),
        };
        let _ = reply.send(answer);
        if let Some(outcome) = event {
            let kind = AdapterEventKind::Written {
                property: req.property.clone(),
                value: req.value.to_string(),
                by: req.by.clone(),
                outcome,
            };
            emit(io, &self.name, Some(req.asset.clone()), kind).await;
        }
        lost.map_or(Ok(()), Err)
    }

    async fn connect(&self) -> Result<Context, String> {
        let attempt = async {
            let stream = tokio::net::TcpStream::connect(&self.endpoint).await?;
            stream.set_nodelay(true)?;
            Ok::<_, std::io::Error>(tokio_modbus::client::tcp::attach_slave(
                stream,
                tokio_modbus::Slave(self.unit_id),
            ))
        };
        match tokio::time::timeout(self.timeout, attempt).await {
            Ok(Ok(ctx)) => Ok(ctx),
            Ok(Err(e)) => Err(format!("connecting to {}: {e}", self.endpoint)),
            Err(_) => Err(format!(
                "connecting to {}: no answer within {} ms",
                self.endpoint,
                self.timeout.as_millis()
            )),
        }
    }

    /// Polls and serves writes on one connection until it fails or the adapter stops.
    async fn serve_connection(&mut self, ctx: &mut Context, io: &mut AdapterIo) -> Ended {
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                biased;
                () = io.token.cancelled() => return Ended::Cancelled,
                Some(cmd) = io.writes.recv() => {
                    if let Err(why) = self.write(ctx, cmd, io).await {
                        return Ended::Lost(why);
                    }
                }
                _ = tick.tick() => {
                    let started = Instant::now();
                    let answers = match self.poll(ctx).await {
                        Ok(a) => a,
                        Err(why) => return Ended::Lost(why),
                    };
                    let (batch, events) = self.readings(&answers, Timestamp::now());
                    let failed = self.failing.iter().filter(|f| f.is_some()).count();
                    AdapterStatus::add(&io.status.errors, failed as u64);
                    for (asset, kind) in events {
                        emit(io, &self.name, asset, kind).await;
                    }
                    let n = batch.len() as u64;
                    match push_batch(&*io.sink, batch, &io.token).await {
                        Ok(()) => AdapterStatus::add(&io.status.received, n),
                        Err(NotDelivered::Cancelled) => return Ended::Cancelled,
                        Err(NotDelivered::SinkClosed) => return Ended::SinkClosed,
                    }
                    if started.elapsed() > self.poll_interval {
                        AdapterStatus::add(&io.status.overruns, 1);
                    }
                }
            }
        }
    }

    /// After link loss: every tag that had a value reads Bad(CommFailure) with it.
    fn comm_failure(&self) -> Vec<Reading> {
        let ts = Timestamp::now();
        self.plan
            .polled
            .iter()
            .zip(&self.last)
            .filter_map(|(p, last)| {
                last.map(|value| Reading {
                    asset: p.asset.id(),
                    property: p.property,
                    value,
                    quality: Quality::bad(QualityReason::CommFailure),
                    source_ts: ts,
                })
            })
            .collect()
    }
}

/// Sends an event, waiting for room (events are never dropped) unless the adapter stops.
async fn emit(io: &AdapterIo, name: &str, asset: Option<AssetPath>, kind: AdapterEventKind) {
    let event = AdapterEvent {
        connection: name.to_owned(),
        asset,
        at: Timestamp::now(),
        kind,
    };
    tokio::select! {
        () = io.token.cancelled() => {}
        // Closed: nobody records events any more; the adapter goes on.
        _ = io.events.send(event) => {}
    }
}

/// Waits `delay`, answering writes with `NotConnected`; true if cancelled.
async fn wait_disconnected(io: &mut AdapterIo, name: &str, delay: Duration) -> bool {
    let sleep = tokio::time::sleep(delay);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            () = io.token.cancelled() => return true,
            () = &mut sleep => return false,
            Some(cmd) = io.writes.recv() => {
                AdapterStatus::add(&io.status.writes_failed, 1);
                let _ = cmd.reply.send(Err(WriteError::NotConnected {
                    connection: name.to_owned(),
                }));
            }
        }
    }
}

/// The adapter task: connect, poll, reconnect, until `io.token` is cancelled.
pub async fn run(config: ModbusConfig, targets: Vec<TagTarget>, io: AdapterIo) {
    let span =
        tracing::info_span!("modbus", connection = %config.name, endpoint = %config.endpoint);
    run_connection(config, targets, io).instrument(span).await;
}

async fn run_connection(config: ModbusConfig, _targets: Vec<TagTarget>, mut io: AdapterIo) {
    // `targets` were validated by `start`; the plan needs the tags themselves, so the
    // config (and its mapping file) is resolved again.
    let plan = match Plan::build(&config) {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, connection = %config.name, "modbus adapter cannot start");
            io.status.set_link(LinkState::Stopped, Some(e.to_string()));
            return;
        }
    };
    let mut adapter = Adapter {
        name: config.name.clone(),
        endpoint: config.endpoint.clone(),
        unit_id: config.unit_id,
        poll_interval: Duration::from_millis(config.poll_interval_ms),
        timeout: Duration::from_millis(config.timeout_ms),
        last: vec![None; plan.polled.len()],
        failing: vec![None; plan.groups.len()],
        plan,
    };
    let mut backoff = Backoff::new(RECONNECT_BASE_MS, RECONNECT_MAX_MS);
    loop {
        if io.token.is_cancelled() {
            break;
        }
        let span = crate::connect_span(&adapter.name, "modbus", &adapter.endpoint);
        let connected = adapter.connect().instrument(span.clone()).await;
        crate::connect_outcome(&span, &connected);
        drop(span);
        let mut ctx = match connected {
            Ok(ctx) => ctx,
            Err(why) => {
                tracing::debug!(error = %why, connection = %adapter.name, "modbus connect failed");
                AdapterStatus::add(&io.status.errors, 1);
                let state = if io.status.link() == LinkState::Connecting {
                    LinkState::Connecting
                } else {
                    LinkState::Disconnected
                };
                io.status.set_link(state, Some(why));
                if wait_disconnected(&mut io, &adapter.name, backoff.next_delay()).await {
                    break;
                }
                continue;
            }
        };
        backoff.reset();
        AdapterStatus::add(&io.status.connects, 1);
        io.status.set_link(LinkState::Connected, None);
        tracing::info!(connection = %adapter.name, endpoint = %adapter.endpoint, "modbus connected");
        let kind = AdapterEventKind::Connected {
            endpoint: adapter.endpoint.clone(),
        };
        emit(&io, &adapter.name, None, kind).await;
        let ended = adapter.serve_connection(&mut ctx, &mut io).await;
        // A clean goodbye is a courtesy: the PLC may be gone already.
        let _ = tokio::time::timeout(adapter.timeout, ctx.disconnect()).await;
        let why = match ended {
            Ended::Cancelled | Ended::SinkClosed => break,
            Ended::Lost(why) => why,
        };
        tracing::warn!(error = %why, connection = %adapter.name, "modbus link lost");
        crate::disconnect_span(&adapter.name, "modbus", &adapter.endpoint, &why);
        AdapterStatus::add(&io.status.errors, 1);
        io.status
            .set_link(LinkState::Disconnected, Some(why.clone()));
        let batch = adapter.comm_failure();
        let kind = AdapterEventKind::Disconnected { reason: why };
        emit(&io, &adapter.name, None, kind).await;
        if push_batch(&*io.sink, batch, &io.token).await.is_err() {
            break;
        }
        if wait_disconnected(&mut io, &adapter.name, backoff.next_delay()).await {
            break;
        }
    }
    io.status.set_link(LinkState::Stopped, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tag(register: RegisterKind, address: u16, data_type: DataType) -> ModbusTag {
        ModbusTag {
            asset: "acme/s/a/l/m".into(),
            property: "state".into(),
            register,
            address,
            data_type,
            word_order: WordOrder::BigEndian,
            scale: 1.0,
            offset: 0.0,
            writable: false,
            min: None,
            max: None,
            bad_when: None,
            value_type: None,
        }
    }

    #[test]
    fn decodes_32_bit_values_in_both_word_orders() {
        let v: f32 = -1234.5;
        let b = v.to_bits();
        let (hi, lo) = ((b >> 16) as u16, b as u16);
        assert_eq!(
            decode(&[hi, lo], DataType::F32, WordOrder::BigEndian),
            Some(f64::from(v))
        );
        assert_eq!(
            decode(&[lo, hi], DataType::F32, WordOrder::LittleEndian),
            Some(f64::from(v))
        );
        assert_eq!(
            decode(&[0x0001, 0x0002], DataType::U32, WordOrder::BigEndian),
            Some(65538.0)
        );
        assert_eq!(
            decode(&[0x0002, 0x0001], DataType::U32, WordOrder::LittleEndian),
            Some(65538.0)
        );
        assert_eq!(
            decode(&[0xffff, 0xfffe], DataType::I32, WordOrder::BigEndian),
            Some(-2.0)
        );
        assert_eq!(
            decode(&[0xfffe, 0xffff], DataType::I32, WordOrder::LittleEndian),
            Some(-2.0)
        );
        assert_eq!(
            decode(&[0xffff], DataType::I16, WordOrder::BigEndian),
            Some(-1.0)
        );
        assert_eq!(
            decode(&[0xffff], DataType::U16, WordOrder::BigEndian),
            Some(65535.0)
        );
        assert_eq!(decode(&[1], DataType::F32, WordOrder::BigEndian), None);
    }

    #[test]
    fn encode_inverts_scale_and_offset_and_refuses_what_does_not_fit() {
        let mut t = tag(RegisterKind::Holding, 0, DataType::I16);
        t.scale = 0.1;
        t.offset = 10.0;
        assert_eq!(encode(&t, Value::Float(5.0)), Ok(vec![(-50i16) as u16]));
        t.max = Some(20.0);
        assert!(encode(&t, Value::Float(25.0)).is_err());
        let mut u = tag(RegisterKind::Holding, 0, DataType::U16);
        assert!(encode(&u, Value::Int(-1)).is_err());
        assert!(encode(&u, Value::Int(70_000)).is_err());
        assert!(encode(&u, Value::Float(f64::NAN)).is_err());
        u.data_type = DataType::U32;
        u.word_order = WordOrder::LittleEndian;
        assert_eq!(encode(&u, Value::Int(65538)), Ok(vec![2, 1]));
        u.data_type = DataType::F32;
        let w = encode(&u, Value::Float(1.5)).expect("fits");
        assert_eq!(
            decode(&w, DataType::F32, WordOrder::LittleEndian),
            Some(1.5)
        );
    }

    #[test]
    fn neighbours_within_max_gap_share_a_request() {
        use RegisterKind::*;
        let groups = poll_groups(
            &[
                (Input, 0, 2),
                (Input, 2, 2),
                (Input, 10, 2), // hole of 6: merged
                (Input, 30, 1), // hole of 18: own group
                (Holding, 0, 1),
                (Coil, 0, 1),
                (Coil, 5, 1),
            ],
            8,
            125,
            2000,
        );
        assert_eq!(
            groups,
            vec![
                PollGroup {
                    register: Coil,
                    start: 0,
                    count: 6
                },
                PollGroup {
                    register: Holding,
                    start: 0,
                    count: 1
                },
                PollGroup {
                    register: Input,
                    start: 0,
                    count: 12
                },
                PollGroup {
                    register: Input,
                    start: 30,
                    count: 1
                },
            ]
        );
        assert_eq!(groups[2].label(), "input 0..=11");
    }

    #[test]
    fn groups_split_at_the_per_request_maximum_without_cutting_a_value() {
        let spans: Vec<(RegisterKind, u16, u16)> =
            (0..100).map(|i| (RegisterKind::Input, i * 2, 2)).collect();
        let groups = poll_groups(&spans, 8, 125, 2000);
        assert_eq!(groups.len(), 2);
        assert_eq!((groups[0].start, groups[0].count), (0, 124));
        assert_eq!((groups[1].start, groups[1].count), (124, 76));
        let groups = poll_groups(&spans, 8, 10, 2000);
        assert_eq!(groups.len(), 20);
        assert!(groups.iter().all(|g| g.count == 10));
        let bits: Vec<_> = (0..3000).map(|i| (RegisterKind::Coil, i, 1)).collect();
        let groups = poll_groups(&bits, 0, 125, 2000);
        assert_eq!(
            groups.iter().map(|g| g.count).collect::<Vec<_>>(),
            vec![2000, 1000]
        );
    }

    fn config(tags: &str) -> Result<ModbusConfig, toml::de::Error> {
        toml::from_str(&format!(
            "name = \"plc\"\nendpoint = \"127.0.0.1:502\"\n{tags}"
        ))
    }

    #[test]
    fn config_refuses_bad_tags_naming_connection_and_tag() {
        let bad = [
            "[[tags]]\nasset = \"acme/s/a/l/m\"\nproperty = \"state\"\nregister = \"coil\"\naddress = 3\ndata_type = \"u16\"\n",
            "[[tags]]\nasset = \"acme/s/a/l/m\"\nproperty = \"state\"\nregister = \"input\"\naddress = 3\ndata_type = \"u16\"\nwritable = true\n",
            "[[tags]]\nasset = \"acme/s/a/l/m\"\nproperty = \"state\"\nregister = \"input\"\naddress = 3\ndata_type = \"u16\"\nscale = 0.0\n",
            "[[tags]]\nasset = \"acme/s/a/l/m\"\nproperty = \"state\"\nregister = \"input\"\naddress = 3\ndata_type = \"u16\"\nmin = 5.0\nmax = 1.0\n",
            "[[tags]]\nasset = \"acme/s/a/l/m\"\nproperty = \"speed\"\nregister = \"input\"\naddress = 3\ndata_type = \"u16\"\n",
        ];
        for t in bad {
            let err = config(t).expect("parses").targets().expect_err(t);
            let msg = err.to_string();
            assert!(msg.contains("\"plc\"") && msg.contains("3"), "{msg}");
        }
        assert!(
            config("max_registers_per_request = 126\n")
                .expect("parses")
                .targets()
                .is_err()
        );
        assert!(config("typo = 1\n").is_err(), "unknown keys are refused");
        // A coil read as a u16: the message says what a coil takes, in the config's words.
        let msg = config(bad[0])
            .expect("parses")
            .targets()
            .expect_err("a coil is a bit")
            .to_string();
        assert!(
            msg.contains("a coil holds one bit: its data_type is bool, not u16"),
            "{msg}"
        );
        // Endpoints a connect could never use are refused at start, not at every retry.
        for endpoint in ["plc 1:502", "plc:0", "10.0.0.5 :502", ":502", "plc:http"] {
            let c: ModbusConfig =
                toml::from_str(&format!("name = \"plc\"\nendpoint = \"{endpoint}\"\n"))
                    .expect("parses");
            let msg = c.targets().expect_err(endpoint).to_string();
            assert!(msg.contains("is not HOST:PORT"), "{endpoint}: {msg}");
        }
        for endpoint in ["plc-1.hall2.local:502", "10.0.0.5:5020", "[::1]:502"] {
            let c: ModbusConfig =
                toml::from_str(&format!("name = \"plc\"\nendpoint = \"{endpoint}\"\n"))
                    .expect("parses");
            assert!(c.targets().is_ok(), "{endpoint}");
        }
        let ok = config(
            "[[tags]]\nasset = \"acme/s/a/l/m\"\nproperty = \"state\"\nregister = \"holding\"\naddress = 0\ndata_type = \"u16\"\n",
        )
        .expect("parses");
        assert_eq!(ok.targets().expect("valid").len(), 1);
    }
}
