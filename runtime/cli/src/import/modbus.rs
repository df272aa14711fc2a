//! `ferrotwin import modbus MAP.csv --endpoint HOST:PORT --out DIR`: a Modbus PLC cannot say
//! what it holds, so its register map, as vendors hand it over (a spreadsheet saved as
//! CSV), says it instead. One row per value, a header row naming the columns (any order,
//! any letter case, spaces and `_` ignored; unknown columns such as a description are
//! skipped):
//!
//! | column       | required | meaning                                                        |
//! |--------------|----------|----------------------------------------------------------------|
//! | `Machine`    | yes      | `Area/Line/Machine` in the plant's own words (fewer parts: `area-1`, `line-1`) |
//! | `Name`       | yes      | the value's name (`FilmTension`, `Running`, `GoodCount`)       |
//! | `Register`   | yes      | `holding` (`hr`, `4x`), `input` (`ir`, `3x`), `coil` (`0x`), `discrete_input` (`di`, `1x`) |
//! | `Address`    | yes      | 0-based protocol address of its first register                 |
//! | `Type`       | no       | `u16` (default for registers), `i16`, `u32`, `i32`, `f32`, `bool` (bits); `float`, `int16`, `dint`, … |
//! | `WordOrder`  | no       | `big_endian` (default: high word first) or `little_endian`     |
//! | `Scale`, `Offset` | no  | engineering value = raw × scale + offset (1 and 0)             |
//! | `Unit`, `Min`, `Max` | no | unit and range of the sensor                                 |
//! | `Access`     | no       | `R` (default) or `RW`: writable (holding registers and coils); a write-only `W` row is refused |
//!
//! Vendors' other names for the columns are read too (`Data Type`, `R/W`, `Scaling`,
//! `Byte Order`, `Tag Name`, `Equipment`, …: `column_of`); columns read under no name are
//! listed in the site config's header. Rows become machines and sensors as every import does (`Plant::build`): a `Running` bit
//! is the machine's state, `GoodCount`/`RejectCount` integers its counters. Every problem of
//! the file is reported with its line and column, and nothing is written.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ferrotwin_adapters::modbus::{DataType, RegisterKind, WordOrder};
use ferrotwin_models::ValueType;

use super::{Address, Found, FoundMachine, Mapped, Naming, Plant, Signal, Written, quoted};

/// Most rows a map may have (a bigger file is refused, not cut).
const MAX_ROWS: usize = 100_000;

/// Where a value is in the PLC and how its registers read.
#[derive(Debug, Clone, PartialEq)]
pub struct Register {
    pub register: RegisterKind,
    pub address: u16,
    pub data_type: DataType,
    pub word_order: WordOrder,
    pub scale: f64,
    pub offset: f64,
    /// What the twin holds (the adapter reports a sensor's value as float unless told).
    pub value_type: ValueType,
}

/// The PLC the site config will poll.
#[derive(Debug, Clone)]
pub struct Source {
    pub map: std::path::PathBuf,
    pub endpoint: String,
    pub unit_id: u8,
    pub poll_interval_ms: u64,
}

impl Source {
    fn connection_toml(&self, name: &str) -> String {
        format!(
            "[[connections]]\nprotocol = \"modbus\"\nname = {}\nendpoint = {}\nunit_id = {}\n\
             poll_interval_ms = {}\n\
             # Read only the mapped registers: a PLC answers IllegalDataAddress for a request\n\
             # that touches a register it does not have, failing every tag of that request.\n\
             # Raise it (fewer requests) once you know the PLC serves the holes.\n\
             max_gap = 0\n",
            quoted(name),
            quoted(&self.endpoint),
            self.unit_id,
            self.poll_interval_ms
        )
    }
}

/// Reads `source.map` and writes `out`/plant.toml and `out`/site.toml.
pub fn import(source: &Source, naming: &Naming, out: &Path, force: bool) -> Result<Written> {
    let bytes = std::fs::read(&source.map)
        .with_context(|| format!("cannot read the register map {}", source.map.display()))?;
    // Spreadsheets on Windows save "CSV" in their ANSI code page: read what is not UTF-8 as
    // Latin-1 (a `°C` stays `°C`).
    let text = String::from_utf8(bytes)
        .unwrap_or_else(|e| e.into_bytes().iter().map(|&b| char::from(b)).collect());
    let found = read_map(&text, &source.map.display().to_string())?;
    let plant = Plant::build(found, naming)?;
    let name = super::slug(&format!("{}-modbus", naming.site));
    super::write(
        out,
        force,
        &format!(
            "{} (register map) for {}",
            source.map.display(),
            source.endpoint
        ),
        &plant,
        &source.connection_toml(&name),
        tag_toml,
    )
}

/// The machines of a register map; `origin` names the file in errors.
pub fn read_map(text: &str, origin: &str) -> Result<Found> {
    // Spreadsheets set to a decimal comma save with `;` between cells.
    let header = text.lines().next().unwrap_or("");
    let delimiter = if header.contains(';') && !header.contains(',') {
        b';'
    } else {
        b','
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .flexible(true)
        .delimiter(delimiter)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .with_context(|| format!("{origin}: no header row"))?
        .clone();
    let mut col: HashMap<&'static str, usize> = HashMap::new();
    let mut unread = Vec::new();
    for (i, h) in headers.iter().enumerate() {
        match column_of(h) {
            Some(c) => {
                col.entry(c).or_insert(i);
            }
            None if h.is_empty() => {}
            None => unread.push(h.to_string()),
        }
    }
    let missing: Vec<&str> = ["machine", "name", "register", "address"]
        .into_iter()
        .filter(|c| !col.contains_key(*c))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{origin}: the header row has no column {} (it has: {})",
            missing.join(", "),
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    }
    let mut machines: Vec<FoundMachine> = Vec::new();
    // (containers, name) → index in `machines`: a map of many rows finds its machine at once.
    let mut index: HashMap<(Vec<String>, String), usize> = HashMap::new();
    let mut problems = Vec::new();
    for (i, record) in reader.records().enumerate() {
        if i >= MAX_ROWS {
            bail!("{origin}: more than {MAX_ROWS} rows");
        }
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                problems.push(format!("{origin}: {e}"));
                continue;
            }
        };
        let line = record.position().map_or(i as u64 + 2, |p| p.line());
        if record.iter().all(str::is_empty) {
            continue;
        }
        let cells = Cells {
            col: &col,
            record: &record,
        };
        match row(&cells) {
            Ok((within, machine, signal)) => match index.entry((within, machine)) {
                std::collections::hash_map::Entry::Occupied(at) => {
                    machines[*at.get()].signals.push(signal)
                }
                std::collections::hash_map::Entry::Vacant(at) => {
                    let (within, name) = at.key().clone();
                    at.insert(machines.len());
                    machines.push(FoundMachine {
                        within,
                        name,
                        signals: vec![signal],
                    });
                }
            },
            Err((column, what)) => problems.push(format!("{origin}:{line}: {column}: {what}")),
        }
    }
    if !problems.is_empty() {
        let n = problems.len();
        problems.truncate(20);
        bail!(
            "the register map has {n} problem(s), nothing was written:\n  {}",
            problems.join("\n  ")
        );
    }
    let mut notes = Vec::new();
    // Modicon numbering (40101 = holding register 100) read as a protocol address would
    // poll the wrong registers; say so where such addresses appear.
    let modicon = machines
        .iter()
        .flat_map(|m| &m.signals)
        .filter(|s| match &s.address {
            Address::Modbus(r) => match r.register {
                RegisterKind::Holding => (40_001..=49_999).contains(&r.address),
                RegisterKind::Input => (30_001..=39_999).contains(&r.address),
                _ => false,
            },
            _ => false,
        })
        .count();
    if modicon > 0 {
        notes.push(format!(
            "{modicon} row(s) of {origin} have holding addresses in 40001..49999 or input addresses in 30001..39999: if the map numbers registers the Modicon way (40101 = holding register 100), give the 0-based protocol addresses instead"
        ));
    }
    if !unread.is_empty() {
        notes.push(format!(
            "columns of {origin} not read: {} (only Machine, Name, Register, Address, Type, WordOrder, Scale, Offset, Unit, Min, Max, Access and their usual other names are)",
            unread.join(", ")
        ));
    }
    Ok(Found {
        machines,
        notes,
        ..Found::default()
    })
}

/// The column a header names, by its usual names in vendors' maps (letter case, spaces,
/// `_`, `/` and `-` ignored); `None` for a column this import does not read.
fn column_of(header: &str) -> Option<&'static str> {
    let h: String = header
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    Some(match h.as_str() {
        "machine" | "asset" | "equipment" | "device" => "machine",
        "name" | "tag" | "tagname" | "signal" | "variable" => "name",
        "register" | "registertype" | "table" | "function" => "register",
        "address" | "addr" | "registeraddress" | "startaddress" => "address",
        "type" | "datatype" | "dtype" | "format" | "dataformat" => "type",
        "wordorder" | "byteorder" | "swap" | "wordswap" | "endianness" | "endian" => "wordorder",
        "scale" | "scaling" | "factor" | "gain" | "multiplier" => "scale",
        "offset" | "bias" => "offset",
        "unit" | "units" | "eu" | "engineeringunit" | "engineeringunits" => "unit",
        "min" | "minimum" | "low" | "rangelow" | "eulow" => "min",
        "max" | "maximum" | "high" | "rangehigh" | "euhigh" => "max",
        "access" | "rw" | "readwrite" | "accessmode" => "access",
        "description" | "comment" | "comments" | "notes" => "description",
        _ => return None,
    })
}

type RowError = (&'static str, String);

/// A row's cells by normalised column name.
struct Cells<'a> {
    col: &'a HashMap<&'static str, usize>,
    record: &'a csv::StringRecord,
}

impl<'a> Cells<'a> {
    /// The cell of `column`; empty when the map has no such column.
    fn get(&self, column: &str) -> &'a str {
        self.col
            .get(column)
            .and_then(|&i| self.record.get(i))
            .unwrap_or("")
    }
}

/// One row: the machine's containers and name, and the signal.
fn row(cells: &Cells<'_>) -> Result<(Vec<String>, String, Signal), RowError> {
    let get = |c: &str| cells.get(c);
    let machine = get("machine");
    let mut parts: Vec<String> = machine
        .split('/')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(String::from)
        .collect();
    let Some(machine) = parts.pop() else {
        return Err(("Machine", "empty".into()));
    };
    if parts.len() > 2 {
        return Err((
            "Machine",
            format!(
                "{:?} has {} parts; at most Area/Line/Machine",
                get("machine"),
                parts.len() + 1
            ),
        ));
    }
    let name = get("name");
    if name.is_empty() {
        return Err(("Name", "empty".into()));
    }
    let register = match get("register")
        .to_ascii_lowercase()
        .replace([' ', '-'], "_")
        .as_str()
    {
        "holding" | "holding_register" | "holding_registers" | "hr" | "4x" => RegisterKind::Holding,
        "input" | "input_register" | "input_registers" | "ir" | "3x" => RegisterKind::Input,
        "coil" | "coils" | "co" | "0x" => RegisterKind::Coil,
        "discrete_input" | "discrete_inputs" | "discrete" | "di" | "1x" => {
            RegisterKind::DiscreteInput
        }
        other => {
            return Err((
                "Register",
                format!("{other:?} is no register kind (holding, input, coil, discrete_input)"),
            ));
        }
    };
    let address: u16 = get("address").parse().map_err(|_| {
        (
            "Address",
            format!(
                "{:?} is not a 0-based register address (0..=65535)",
                get("address")
            ),
        )
    })?;
    let data_type = match get("type").to_ascii_lowercase().as_str() {
        "" if register.is_bit() => DataType::Bool,
        "" | "u16" | "uint16" | "word" | "uint" => DataType::U16,
        "i16" | "int16" | "int" | "short" => DataType::I16,
        "u32" | "uint32" | "dword" | "udint" => DataType::U32,
        "i32" | "int32" | "dint" | "long" => DataType::I32,
        "f32" | "float" | "float32" | "real" => DataType::F32,
        "bool" | "bit" | "boolean" => DataType::Bool,
        other => {
            return Err((
                "Type",
                format!(
                    "{other:?} is no data type this import reads (u16, i16, u32, i32, f32, bool)"
                ),
            ));
        }
    };
    if register.is_bit() != (data_type == DataType::Bool) {
        return Err((
            "Type",
            format!(
                "a {} holds {}, not {}",
                register.as_str(),
                if register.is_bit() {
                    "a bool"
                } else {
                    "register values (u16, i16, u32, i32, f32)"
                },
                data_type.as_str()
            ),
        ));
    }
    if u32::from(address) + u32::from(data_type.words()) > 65_536 {
        return Err((
            "Address",
            format!(
                "{} at {address} runs past register 65535",
                data_type.as_str()
            ),
        ));
    }
    let word_order = match get("wordorder")
        .to_ascii_lowercase()
        .replace([' ', '-'], "_")
        .as_str()
    {
        "" | "big_endian" | "big" | "high_first" | "abcd" | "no" | "false" => WordOrder::BigEndian,
        "little_endian" | "little" | "low_first" | "swapped" | "cdab" | "yes" | "true" => {
            WordOrder::LittleEndian
        }
        other => {
            return Err((
                "WordOrder",
                format!("{other:?} is no word order (big_endian, little_endian)"),
            ));
        }
    };
    let number = |column: &'static str, key: &str| -> Result<Option<f64>, RowError> {
        match get(key) {
            "" => Ok(None),
            text => match text.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(Some(v)),
                _ => Err((column, format!("{text:?} is not a finite number"))),
            },
        }
    };
    let scale = number("Scale", "scale")?.unwrap_or(1.0);
    if scale == 0.0 {
        return Err(("Scale", "0 would make every value 0".into()));
    }
    let offset = number("Offset", "offset")?.unwrap_or(0.0);
    let range = match (number("Min", "min")?, number("Max", "max")?) {
        (Some(lo), Some(hi)) if lo < hi => Some((lo, hi)),
        (None, None) => None,
        (lo, hi) => {
            return Err((
                "Min",
                format!("a range needs both Min and Max, Min below Max (got {lo:?}, {hi:?})"),
            ));
        }
    };
    let writable = match get("access")
        .to_ascii_lowercase()
        .replace([' ', '/'], "")
        .as_str()
    {
        "" | "r" | "ro" | "read" | "readonly" => false,
        "rw" | "readwrite" => true,
        "w" | "wo" | "write" | "writeonly" => {
            return Err((
                "Access",
                "a write-only register is not imported (no value to read): map it by hand as a setpoint of its machine (README, Setpoints)".into(),
            ));
        }
        other => return Err(("Access", format!("{other:?} is not R or RW"))),
    };
    if writable && !matches!(register, RegisterKind::Holding | RegisterKind::Coil) {
        return Err((
            "Access",
            format!(
                "a {} cannot be written (only holding registers and coils)",
                register.as_str()
            ),
        ));
    }
    let value_type = match data_type {
        DataType::Bool => ValueType::Bool,
        DataType::F32 => ValueType::Float,
        _ if scale.fract() != 0.0 || offset.fract() != 0.0 => ValueType::Float,
        _ => ValueType::Int,
    };
    Ok((
        parts,
        machine,
        Signal {
            name: name.to_string(),
            value_type,
            unit: get("unit").to_string(),
            range,
            writable,
            address: Address::Modbus(Register {
                register,
                address,
                data_type,
                word_order,
                scale,
                offset,
                value_type,
            }),
        },
    ))
}

fn tag_toml(t: &Mapped) -> String {
    let Address::Modbus(r) = &t.address else {
        unreachable!("a Modbus import maps registers only")
    };
    let mut s = format!(
        "\n[[connections.tags]]   # {}\nasset = {}\nproperty = \"{}\"\nregister = \"{}\"\n\
         address = {}\ndata_type = \"{}\"\n",
        t.source.replace('\n', " "),
        quoted(&t.asset),
        t.property,
        r.register.as_str(),
        r.address,
        r.data_type.as_str()
    );
    if r.data_type.words() == 2 && r.word_order == WordOrder::LittleEndian {
        s.push_str("word_order = \"little_endian\"\n");
    }
    if r.scale != 1.0 {
        s.push_str(&format!("scale = {:?}\n", r.scale));
    }
    if r.offset != 0.0 {
        s.push_str(&format!("offset = {:?}\n", r.offset));
    }
    // A sensor's value is reported as float unless the tag says otherwise.
    if t.property == "value" && r.value_type == ValueType::Int {
        s.push_str("value_type = \"int\"\n");
    }
    if t.writable {
        s.push_str("writable = true\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
Machine,Name,Register,Address,Type,WordOrder,Scale,Offset,Unit,Min,Max,Access,Description
Packaging/Line 3/Wrapper_A,FilmTension,holding,100,f32,little_endian,,,N,0,500,R,\"Film tension, unwinder\"
Packaging/Line 3/Wrapper_A,MotorCurrent,input,10,i16,,0.1,,A,,,R,
Packaging/Line 3/Wrapper_A,Running,discrete_input,0,bool,,,,,,,R,
Packaging/Line 3/Wrapper_A,SpeedSetpoint,HR,200,uint16,,,,ppm,0,300,RW,
Boiler,SupplyTemp,holding,300,int16,,0.1,,degC,-50,150,R,
";

    #[test]
    fn a_register_map_gives_machines_signals_and_registers() {
        let found = read_map(MAP, "map.csv").expect("valid map");
        assert_eq!(found.machines.len(), 2);
        let wrapper = &found.machines[0];
        assert_eq!(
            (wrapper.within.as_slice(), wrapper.name.as_str()),
            (
                &["Packaging".to_string(), "Line 3".to_string()][..],
                "Wrapper_A"
            )
        );
        assert_eq!(wrapper.signals.len(), 4);
        let film = &wrapper.signals[0];
        assert_eq!(
            (film.value_type, film.range, film.unit.as_str()),
            (ValueType::Float, Some((0.0, 500.0)), "N")
        );
        let Address::Modbus(r) = &film.address else {
            panic!("modbus")
        };
        assert_eq!(
            (r.register, r.address, r.data_type, r.word_order),
            (
                RegisterKind::Holding,
                100,
                DataType::F32,
                WordOrder::LittleEndian
            )
        );
        let current = &wrapper.signals[1];
        assert_eq!(current.value_type, ValueType::Float, "scaled: a float");
        let sp = &wrapper.signals[3];
        assert!(sp.writable);
        assert_eq!(sp.value_type, ValueType::Int);
        assert!(found.machines[1].within.is_empty());
    }

    #[test]
    fn every_bad_cell_is_named_by_line_and_column_and_nothing_is_read() {
        let bad = MAP
            .replace("holding,100,f32", "holdings,100,f32")
            .replace("input,10,i16", "input,10,float64")
            .replace(
                "discrete_input,0,bool,,,,,,,R",
                "discrete_input,0,bool,,,,,,,RW",
            )
            .replace("HR,200,uint16", "HR,70000,uint16")
            .replace("-50,150", "150,-50");
        let msg = read_map(&bad, "map.csv").expect_err("bad map").to_string();
        for expect in [
            "5 problem(s), nothing was written",
            "map.csv:2: Register: \"holdings\" is no register kind",
            "map.csv:3: Type: \"float64\" is no data type",
            "map.csv:4: Access: a discrete_input cannot be written",
            "map.csv:5: Address: \"70000\" is not a 0-based register address",
            "map.csv:6: Min: a range needs both Min and Max, Min below Max",
        ] {
            assert!(msg.contains(expect), "{expect}: {msg}");
        }
        let msg = read_map("Name,Register\nx,holding\n", "m.csv")
            .expect_err("no columns")
            .to_string();
        assert!(
            msg.contains(
                "m.csv: the header row has no column machine, address (it has: Name, Register)"
            ),
            "{msg}"
        );
        let msg = read_map(
            &MAP.replace("discrete_input,0,bool", "discrete_input,0,u16"),
            "m.csv",
        )
        .expect_err("a bit as u16")
        .to_string();
        assert!(
            msg.contains("m.csv:4: Type: a discrete_input holds a bool, not u16"),
            "{msg}"
        );
    }

    #[test]
    fn usual_column_names_are_read_and_unknown_ones_named() {
        let map = "\
Equipment,Tag Name,Register,Address,Data Type,Byte Order,Scaling,R/W,Colour
Press,Force,4x,10,float,swapped,0.5,RW,red
";
        let found = read_map(map, "m.csv").expect("valid");
        let s = &found.machines[0].signals[0];
        let Address::Modbus(r) = &s.address else {
            panic!("modbus")
        };
        assert_eq!(
            (r.data_type, r.word_order, r.scale, s.writable),
            (DataType::F32, WordOrder::LittleEndian, 0.5, true)
        );
        assert_eq!(found.notes.len(), 1);
        assert!(
            found.notes[0].contains("not read: Colour"),
            "{:?}",
            found.notes
        );
        let msg = read_map(&map.replace(",RW,", ",W,"), "m.csv")
            .expect_err("write-only")
            .to_string();
        assert!(
            msg.contains("m.csv:2: Access: a write-only register is not imported"),
            "{msg}"
        );
    }

    #[test]
    fn a_semicolon_separated_map_reads_as_well() {
        let found = read_map(
            "Machine;Name;Register;Address;Scale\nPress;Temp;input;3;0.1\n",
            "m.csv",
        )
        .expect("valid");
        assert_eq!(found.machines[0].signals[0].name, "Temp");
        assert_eq!(found.machines[0].signals[0].value_type, ValueType::Float);
        assert!(found.notes.is_empty(), "{:?}", found.notes);
        let modicon = read_map(
            "Machine,Name,Register,Address\nPress,Temp,holding,40101\n",
            "m.csv",
        )
        .expect("valid, with a note");
        assert!(
            modicon.notes[0].contains("1 row(s) of m.csv have holding addresses in 40001..49999"),
            "{:?}",
            modicon.notes
        );
    }
}
