//! The Modbus register map of a plant, derived from the spec alone (same spec, same map):
//! one virtual PLC, so one Modbus TCP server, per line; `mapping.toml` is what an adapter
//! reads to poll it.
//!
//! Layout of a line, machines in spec order (`PlantSpec::assets`), `i` the machine's index
//! in its line:
//! - holding registers: `2i` = `state` (u16: 0 idle, 1 running, 2 setup, 3 down; read-only),
//!   `2i + 1` = `speed_setpoint_pct` (u16, 0..=200, default 100; writable);
//!   then, after every machine's pair, `2n + i` = `status` (u16, read-only; `n` machines in
//!   the line): bit `k` is set while the machine's `k`-th sensor (spec order) reads bad:
//!   stuck (a `stuck_sensor` fault) or not reported at all (its `dropout`, or the machine's
//!   `network_loss`); a `sensor_bias` sets no bit (a miscalibration looks healthy). Only the first 16 sensors of a machine have a bit; a sensor's `value` tag names its bit
//!   in `bad_when`, so an adapter can turn that tag Bad;
//! - input registers, one block per machine in the same order: `good_count` and
//!   `scrap_count` (u32, two registers each), then per sensor in spec order its `value`
//!   (IEEE-754 f32, two registers; a sensor declared int or bool says so in `value_type`);
//! - coils: `i` = `run_enable` (bool, writable, default true): false puts the machine in idle
//!   and keeps it there (no parts) until set true again (`PlantSim::set_run_enable`);
//! - discrete inputs: `i` = `fault_active` (bool): true while any fault of the machine or of
//!   its sensors is in progress (overheating, bearing wear, stuck sensor, dropout, breakdown,
//!   network loss; a spike is a single sample and never shows, a sensor bias is invisible
//!   to the PLC).
//!
//! The status words sit after the machines' pairs (not in each machine's block) and bits in
//! their own address spaces, so every address of the first layout is unchanged: a
//! `mapping.toml` written before them still parses and still addresses the same values
//! (the new `LineMap` counts and `bad_when` default to empty), hence version 1 still.
//!
//! 32-bit values are big-endian in both senses by default: the high word first (at the lower
//! address), each word high byte first as Modbus sends every register; `word_order =
//! "little_endian"` puts the low word first (`Mapping::set_word_order`, for testing adapters
//! against both). Counters wrap at 2^32 like a PLC's. Scale is 1 everywhere for now:
//! engineering value = raw × scale.

use std::collections::HashSet;
use std::io::{self, Write};

use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{AssetPath, Property, ValueType};
use serde::{Deserialize, Serialize};

pub const MAPPING_VERSION: u32 = 1;

/// Where `mapping.toml` says a line's endpoint is before `serve` binds it: the real port is
/// chosen at bind time and written to `endpoints.toml`.
pub const ENDPOINT_PLACEHOLDER: &str = "127.0.0.1:0";

/// The tag name of the writable speed override (not a reading `Property`: nothing reports it).
pub const SPEED_SETPOINT: &str = "speed_setpoint_pct";

/// Highest value `speed_setpoint_pct` accepts.
pub const MAX_SPEED_PCT: u16 = 200;

/// The tag name of a machine's run-enable coil.
pub const RUN_ENABLE: &str = "run_enable";

/// The tag name of a machine's sensor-status word.
pub const STATUS: &str = "status";

/// The tag name of a machine's fault discrete input.
pub const FAULT_ACTIVE: &str = "fault_active";

/// Sensors of a machine that have a bit in its status word.
pub const STATUS_BITS: usize = 16;

/// Registers a Modbus unit can address (16-bit addresses).
const ADDRESS_SPACE: usize = 1 << 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    Holding,
    Input,
    Coil,
    DiscreteInput,
}

impl RegisterKind {
    /// The name in `mapping.toml` (serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            RegisterKind::Holding => "holding",
            RegisterKind::Input => "input",
            RegisterKind::Coil => "coil",
            RegisterKind::DiscreteInput => "discrete_input",
        }
    }

    /// Coils and discrete inputs hold bits, the others 16-bit words.
    pub fn is_bit(self) -> bool {
        matches!(self, RegisterKind::Coil | RegisterKind::DiscreteInput)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    U16,
    U32,
    F32,
    /// A coil or discrete input.
    Bool,
}

impl DataType {
    /// The name in `mapping.toml` (serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::U16 => "u16",
            DataType::U32 => "u32",
            DataType::F32 => "f32",
            DataType::Bool => "bool",
        }
    }

    /// Registers (or bits, for `Bool`) the value takes.
    pub fn words(self) -> u16 {
        match self {
            DataType::U16 | DataType::Bool => 1,
            DataType::U32 | DataType::F32 => 2,
        }
    }
}

/// Order of the two words of a 32-bit value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrder {
    /// High word at the lower address.
    BigEndian,
    /// Low word at the lower address.
    LittleEndian,
}

impl WordOrder {
    /// The name in `mapping.toml` (serde's).
    pub fn as_str(self) -> &'static str {
        match self {
            WordOrder::BigEndian => "big_endian",
            WordOrder::LittleEndian => "little_endian",
        }
    }

    /// The two registers of `v` in address order.
    pub fn split(self, v: u32) -> [u16; 2] {
        let (hi, lo) = ((v >> 16) as u16, v as u16);
        match self {
            WordOrder::BigEndian => [hi, lo],
            WordOrder::LittleEndian => [lo, hi],
        }
    }

    /// `split`'s inverse.
    pub fn join(self, words: [u16; 2]) -> u32 {
        let (hi, lo) = match self {
            WordOrder::BigEndian => (words[0], words[1]),
            WordOrder::LittleEndian => (words[1], words[0]),
        };
        (u32::from(hi) << 16) | u32::from(lo)
    }
}

/// A bit of a status word that says a tag reads bad.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusBit {
    pub register: RegisterKind,
    pub address: u16,
    /// 0 = least significant.
    pub bit: u8,
}

/// One value a line's PLC serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TagMap {
    /// The machine or sensor.
    pub asset: String,
    /// A reading property (`state`, `good_count`, `scrap_count`, `value`) or
    /// `speed_setpoint_pct`.
    pub property: String,
    pub register: RegisterKind,
    pub address: u16,
    pub data_type: DataType,
    pub word_order: WordOrder,
    pub scale: f64,
    #[serde(default)]
    pub writable: bool,
    /// The tag reads bad while this bit is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bad_when: Option<StatusBit>,
    /// The sensor's declared value type when it is not a float (its register still holds
    /// an f32): an adapter reports `Value::Int`/`Value::Bool` for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_type: Option<ValueType>,
}

/// The register map of one line's PLC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineMap {
    pub line: String,
    /// `ENDPOINT_PLACEHOLDER` until served; see `endpoints.toml`.
    pub endpoint: String,
    pub unit_id: u8,
    pub holding_registers: u32,
    pub input_registers: u32,
    #[serde(default)]
    pub coils: u32,
    #[serde(default)]
    pub discrete_inputs: u32,
    pub tags: Vec<TagMap>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mapping {
    pub version: u32,
    pub lines: Vec<LineMap>,
}

#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    #[error(
        "line {line}: needs {registers} input registers, a Modbus unit addresses {ADDRESS_SPACE} \
         (split the line or use fewer sensors per machine)"
    )]
    LineTooLarge { line: String, registers: usize },
}

fn tag(asset: &AssetPath, property: &str, register: RegisterKind, address: usize) -> TagMap {
    let data_type = match (register, property) {
        (RegisterKind::Holding, _) => DataType::U16,
        (RegisterKind::Input, "value") => DataType::F32,
        (RegisterKind::Input, _) => DataType::U32,
        (RegisterKind::Coil | RegisterKind::DiscreteInput, _) => DataType::Bool,
    };
    TagMap {
        asset: asset.as_str().to_string(),
        property: property.to_string(),
        register,
        address: u16::try_from(address).expect("checked against ADDRESS_SPACE"),
        data_type,
        word_order: WordOrder::BigEndian,
        scale: 1.0,
        writable: property == SPEED_SETPOINT || property == RUN_ENABLE,
        bad_when: None,
        value_type: None,
    }
}

/// Appends the status words, coils and discrete inputs of a finished line (see the module
/// comment) and links each sensor's value to its status bit.
fn add_machine_bits(line: &mut LineMap) {
    let machines: Vec<String> = line
        .tags
        .iter()
        .filter(|t| t.property == Property::State.as_str())
        .map(|t| t.asset.clone())
        .collect();
    let n = machines.len();
    let index: std::collections::HashMap<&str, usize> = machines
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut sensors_seen = vec![0usize; n];
    for t in &mut line.tags {
        if t.property != Property::Value.as_str() {
            continue;
        }
        let Some(&m) = t
            .asset
            .rsplit_once('/')
            .and_then(|(machine, _)| index.get(machine))
        else {
            continue;
        };
        let k = sensors_seen[m];
        sensors_seen[m] += 1;
        if k < STATUS_BITS {
            t.bad_when = Some(StatusBit {
                register: RegisterKind::Holding,
                address: u16::try_from(2 * n + m).expect("3n fits: n <= 65536 / 4"),
                bit: k as u8,
            });
        }
    }
    for (i, m) in machines.iter().enumerate() {
        let path = AssetPath::parse(m).expect("tags of a validated spec");
        line.tags
            .push(tag(&path, STATUS, RegisterKind::Holding, 2 * n + i));
        line.tags
            .push(tag(&path, RUN_ENABLE, RegisterKind::Coil, i));
        line.tags
            .push(tag(&path, FAULT_ACTIVE, RegisterKind::DiscreteInput, i));
    }
    line.holding_registers = 3 * n as u32;
    line.coils = n as u32;
    line.discrete_inputs = n as u32;
}

/// A TOML basic string: quoted, with `"`, `\\` and control characters escaped.
fn write_toml_str(out: &mut impl Write, s: &str) -> io::Result<()> {
    out.write_all(b"\"")?;
    let mut rest = s;
    while let Some(i) = rest.find(|c: char| c == '"' || c == '\\' || c.is_control()) {
        out.write_all(&rest.as_bytes()[..i])?;
        let c = rest[i..].chars().next().expect("found at i");
        match c {
            '"' => out.write_all(b"\\\"")?,
            '\\' => out.write_all(b"\\\\")?,
            c => write!(out, "\\u{:04X}", u32::from(c))?,
        }
        rest = &rest[i + c.len_utf8()..];
    }
    out.write_all(rest.as_bytes())?;
    out.write_all(b"\"")
}

/// A TOML float: always with a fraction or exponent (`1.0`, not `1`, which is an integer).
fn write_toml_f64(out: &mut impl Write, v: f64) -> io::Result<()> {
    if v.is_nan() {
        out.write_all(b"nan")
    } else if v.is_infinite() {
        out.write_all(if v > 0.0 { b"inf" } else { b"-inf" })
    } else {
        // Debug prints the shortest text that reads back to the same bits, with a `.0` or
        // an exponent.
        write!(out, "{v:?}")
    }
}

/// One tag as an inline table on its own line, an element of its line's `tags` array.
fn write_tag(out: &mut impl Write, t: &TagMap) -> io::Result<()> {
    out.write_all(b"  { asset = ")?;
    write_toml_str(out, &t.asset)?;
    out.write_all(b", property = ")?;
    write_toml_str(out, &t.property)?;
    write!(
        out,
        ", register = \"{}\", address = {}, data_type = \"{}\", word_order = \"{}\", scale = ",
        t.register.as_str(),
        t.address,
        t.data_type.as_str(),
        t.word_order.as_str()
    )?;
    write_toml_f64(out, t.scale)?;
    if t.writable {
        out.write_all(b", writable = true")?;
    }
    if let Some(b) = t.bad_when {
        write!(
            out,
            ", bad_when = {{ register = \"{}\", address = {}, bit = {} }}",
            b.register.as_str(),
            b.address,
            b.bit
        )?;
    }
    if let Some(v) = t.value_type {
        write!(out, ", value_type = \"{}\"", v.as_str())?;
    }
    out.write_all(b" },\n")
}

impl Mapping {
    /// The map of a validated spec. Fails only if a line has more registers than a Modbus
    /// unit can address.
    pub fn of(spec: &PlantSpec) -> Result<Mapping, MappingError> {
        let mut lines: Vec<LineMap> = Vec::new();
        // Next free holding and input address of the current line.
        let (mut holding, mut input) = (0usize, 0usize);
        let finish = |line: &mut LineMap, holding: usize, input: usize| {
            if holding.max(input) > ADDRESS_SPACE {
                return Err(MappingError::LineTooLarge {
                    line: line.line.clone(),
                    registers: holding.max(input),
                });
            }
            line.holding_registers = holding as u32;
            line.input_registers = input as u32;
            add_machine_bits(line);
            Ok(())
        };
        for asset in spec.assets() {
            let mut value_type = None;
            let words = match asset.kind {
                AssetKind::Line { .. } => {
                    if let Some(last) = lines.last_mut() {
                        finish(last, holding, input)?;
                    }
                    lines.push(LineMap {
                        line: asset.path.as_str().to_string(),
                        endpoint: ENDPOINT_PLACEHOLDER.to_string(),
                        unit_id: 1,
                        holding_registers: 0,
                        input_registers: 0,
                        coils: 0,
                        discrete_inputs: 0,
                        tags: Vec::new(),
                    });
                    (holding, input) = (0, 0);
                    continue;
                }
                AssetKind::Machine { .. } => {
                    vec![
                        (Property::State.as_str(), RegisterKind::Holding),
                        (SPEED_SETPOINT, RegisterKind::Holding),
                        (Property::GoodCount.as_str(), RegisterKind::Input),
                        (Property::ScrapCount.as_str(), RegisterKind::Input),
                    ]
                }
                AssetKind::Sensor { spec: s, .. } => {
                    value_type = (s.value_type != ValueType::Float).then_some(s.value_type);
                    vec![(Property::Value.as_str(), RegisterKind::Input)]
                }
                _ => continue,
            };
            let line = lines.last_mut().expect("machines follow their line");
            for (property, register) in words {
                // Stop counting addresses past the space (error at `finish`), so a huge
                // line cannot overflow `u16::try_from`.
                let next = match register {
                    RegisterKind::Holding => &mut holding,
                    _ => &mut input,
                };
                let mut t = tag(&asset.path, property, register, (*next).min(0xffff));
                t.value_type = value_type;
                *next += usize::from(t.data_type.words());
                if *next <= ADDRESS_SPACE {
                    line.tags.push(t);
                }
            }
        }
        if let Some(last) = lines.last_mut() {
            finish(last, holding, input)?;
        }
        Ok(Mapping {
            version: MAPPING_VERSION,
            lines,
        })
    }

    /// `mapping.toml`'s text (`write_toml` into memory).
    pub fn to_toml(&self) -> String {
        let mut out = Vec::new();
        self.write_toml(&mut out, |_, _| {})
            .expect("writing into a Vec cannot fail");
        String::from_utf8(out).expect("the writer writes UTF-8 only")
    }

    /// Writes `mapping.toml` to `out` a line at a time, calling `progress(done, total)` after
    /// each PLC line. A million-sensor map is ~150 MB of text: building it as one string
    /// through `toml::to_string` (a document tree first) took 6 GB, this takes nothing
    /// beyond the `Mapping`. One tag per text line as an inline table, so `grep` on a sensor
    /// path shows its whole tag; `from_toml` reads it back into the same `Mapping`.
    pub fn write_toml(
        &self,
        out: &mut impl Write,
        mut progress: impl FnMut(usize, usize),
    ) -> io::Result<()> {
        writeln!(
            out,
            "# Modbus register map written by ferrotwin-sim: one PLC (Modbus TCP server) per \
             line.\n# 32-bit values: high word first (word_order = \"big_endian\"); value = raw \
             * scale.\n# endpoint {ENDPOINT_PLACEHOLDER:?} is assigned by `ferrotwin-sim serve` \
             (see endpoints.toml).\nversion = {}",
            self.version
        )?;
        for (i, line) in self.lines.iter().enumerate() {
            out.write_all(b"\n[[lines]]\nline = ")?;
            write_toml_str(out, &line.line)?;
            out.write_all(b"\nendpoint = ")?;
            write_toml_str(out, &line.endpoint)?;
            writeln!(
                out,
                "\nunit_id = {}\nholding_registers = {}\ninput_registers = {}\ncoils = {}\n\
                 discrete_inputs = {}\ntags = [",
                line.unit_id,
                line.holding_registers,
                line.input_registers,
                line.coils,
                line.discrete_inputs
            )?;
            for t in &line.tags {
                write_tag(out, t)?;
            }
            out.write_all(b"]\n")?;
            progress(i + 1, self.lines.len());
        }
        Ok(())
    }

    /// Serves (and describes) every 32-bit value with `order`.
    pub fn set_word_order(&mut self, order: WordOrder) {
        for t in self.lines.iter_mut().flat_map(|l| &mut l.tags) {
            t.word_order = order;
        }
    }

    pub fn from_toml(text: &str) -> Result<Mapping, toml::de::Error> {
        toml::from_str(text)
    }

    /// Every tag once: no two tags of a line share a register.
    pub fn is_consistent(&self) -> bool {
        self.lines.iter().all(|line| {
            let mut used = HashSet::new();
            line.tags.iter().all(|t| {
                (0..t.data_type.words())
                    .all(|w| used.insert((t.register, u32::from(t.address) + u32::from(w))))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::generate::{PlantSize, generate};

    fn plant() -> PlantSpec {
        generate(
            PlantSize {
                sites: 1,
                areas: 2,
                lines: 2,
                machines: 3,
                sensors_per_machine: 0,
            },
            3,
        )
    }

    #[test]
    fn mapping_is_deterministic_and_covers_every_sensor_once() {
        let spec = plant();
        let a = Mapping::of(&spec).expect("fits");
        assert_eq!(a, Mapping::of(&spec).expect("fits"));
        assert_eq!(a.to_toml(), Mapping::of(&spec).expect("fits").to_toml());
        assert_eq!(a.lines.len(), 4);
        assert!(a.is_consistent());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for t in a.lines.iter().flat_map(|l| &l.tags) {
            if t.property == "value" {
                *seen.entry(t.asset.as_str()).or_default() += 1;
                assert_eq!(t.data_type, DataType::F32);
                assert_eq!(t.register, RegisterKind::Input);
            }
        }
        let sensors: Vec<String> = spec
            .assets()
            .into_iter()
            .filter(|a| matches!(a.kind, AssetKind::Sensor { .. }))
            .map(|a| a.path.as_str().to_string())
            .collect();
        assert_eq!(seen.len(), sensors.len());
        assert!(sensors.iter().all(|s| seen.get(s.as_str()) == Some(&1)));
    }

    #[test]
    fn machine_block_is_state_and_setpoint_then_counters_and_sensors() {
        let m = Mapping::of(&plant()).expect("fits");
        let line = &m.lines[0];
        let first = &line.tags[0].asset;
        let of_first: Vec<(&str, RegisterKind, u16)> = line
            .tags
            .iter()
            .filter(|t| t.asset == *first)
            .map(|t| (t.property.as_str(), t.register, t.address))
            .collect();
        assert_eq!(
            of_first,
            vec![
                ("state", RegisterKind::Holding, 0),
                (SPEED_SETPOINT, RegisterKind::Holding, 1),
                ("good_count", RegisterKind::Input, 0),
                ("scrap_count", RegisterKind::Input, 2),
                (STATUS, RegisterKind::Holding, 6),
                (RUN_ENABLE, RegisterKind::Coil, 0),
                (FAULT_ACTIVE, RegisterKind::DiscreteInput, 0),
            ]
        );
        // The first sensor follows the counters.
        let sensor = line
            .tags
            .iter()
            .find(|t| t.property == "value")
            .expect("machines have sensors");
        assert_eq!((sensor.address, sensor.asset.starts_with(first)), (4, true));
        let machines = line.tags.iter().filter(|t| t.property == "state").count() as u32;
        assert_eq!(machines, 3);
        assert_eq!(line.holding_registers, 3 * machines);
        assert_eq!((line.coils, line.discrete_inputs), (machines, machines));
    }

    #[test]
    fn each_sensor_value_names_its_bit_in_its_machines_status_word() {
        let m = Mapping::of(&plant()).expect("fits");
        let line = &m.lines[0];
        let status_of = |machine: &str| {
            line.tags
                .iter()
                .find(|t| t.asset == machine && t.property == STATUS)
                .map(|t| t.address)
                .expect("every machine has a status word")
        };
        let mut bits: HashMap<&str, Vec<u8>> = HashMap::new();
        for t in line.tags.iter().filter(|t| t.property == "value") {
            let machine = t.asset.rsplit_once('/').expect("a sensor path").0;
            let b = t.bad_when.expect("few sensors: every one has a bit");
            assert_eq!(
                (b.register, b.address),
                (RegisterKind::Holding, status_of(machine))
            );
            bits.entry(machine).or_default().push(b.bit);
        }
        assert!(!bits.is_empty());
        for v in bits.values() {
            assert_eq!(*v, (0..v.len() as u8).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_mapping_written_before_bits_and_status_words_still_parses() {
        let old = r#"
version = 1
[[lines]]
line = "acme/berlin/a/l1"
endpoint = "127.0.0.1:0"
unit_id = 1
holding_registers = 2
input_registers = 4
[[lines.tags]]
asset = "acme/berlin/a/l1/press-1"
property = "state"
register = "holding"
address = 0
data_type = "u16"
word_order = "big_endian"
scale = 1.0
"#;
        let m = Mapping::from_toml(old).expect("old files parse");
        assert_eq!((m.lines[0].coils, m.lines[0].discrete_inputs), (0, 0));
        assert_eq!(m.lines[0].tags[0].bad_when, None);
    }

    #[test]
    fn word_orders_split_and_join() {
        let v = 0x1234_5678;
        assert_eq!(WordOrder::BigEndian.split(v), [0x1234, 0x5678]);
        assert_eq!(WordOrder::LittleEndian.split(v), [0x5678, 0x1234]);
        for o in [WordOrder::BigEndian, WordOrder::LittleEndian] {
            assert_eq!(o.join(o.split(v)), v);
        }
    }

    #[test]
    fn mapping_toml_round_trips() {
        let m = Mapping::of(&plant()).expect("fits");
        let text = m.to_toml();
        assert!(text.contains("word_order = \"big_endian\""));
        assert_eq!(Mapping::from_toml(&text).expect("parses"), m);
        // What serde's own writer makes of it reads back the same too.
        let serde_text = toml::to_string(&m).expect("serializes");
        assert_eq!(Mapping::from_toml(&serde_text).expect("parses"), m);
    }

    #[test]
    fn streamed_toml_reads_back_every_field_and_reports_progress_per_line() {
        let mut m = Mapping::of(&plant()).expect("fits");
        m.set_word_order(WordOrder::LittleEndian);
        let line = &mut m.lines[1];
        line.endpoint = "127.0.0.1:5020".to_string();
        line.unit_id = 7;
        line.tags[0].asset = "odd \"quoted\" \\ name\ttab é".to_string();
        line.tags[0].scale = 0.1;
        line.tags[1].scale = 1e-7;
        line.tags[2].scale = -250.0;
        line.tags[3].value_type = Some(ValueType::Bool);
        line.tags[4].value_type = Some(ValueType::Int);
        assert!(line.tags.iter().any(|t| t.writable));
        assert!(line.tags.iter().any(|t| t.bad_when.is_some()));
        let mut calls = Vec::new();
        let mut out = Vec::new();
        m.write_toml(&mut out, |done, total| calls.push((done, total)))
            .expect("writes");
        assert_eq!(calls, vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(Mapping::from_toml(&text).expect("parses"), m);
        // One tag per text line.
        let tags: usize = m.lines.iter().map(|l| l.tags.len()).sum();
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("  { asset = "))
                .count(),
            tags
        );
    }

    #[test]
    fn a_line_beyond_the_address_space_is_an_error() {
        let spec = generate(
            PlantSize {
                sites: 1,
                areas: 1,
                lines: 1,
                machines: 200,
                sensors_per_machine: 200,
            },
            1,
        );
        let err = Mapping::of(&spec).expect_err("80,800 input registers do not fit");
        assert!(matches!(
            err,
            MappingError::LineTooLarge {
                registers: 80_800,
                ..
            }
        ));
    }
}
