//! `ferrotwin import`: a plant spec and a site config from what a PLC server or an edge node
//! says about itself, written so that `ferrotwin run --config DIR/site.toml` runs them as
//! they are.
//!
//! Each protocol's discovery (`opcua`, `sparkplug`; for Modbus, which cannot be asked, a
//! register map in CSV: `modbus`) gives `Found`: machines (where signals
//! live), each with its place in the server's own hierarchy and its signals. `Plant::build`
//! places them in the ISA-95 tree and turns every signal into a twin property:
//! - a bool named like `Running` (not writable) is the machine's `state`;
//! - an integer named like `GoodCount` / `ScrapCount` its `good_count` / `scrap_count`;
//! - anything else a scalar can hold is a sensor (its value), with the unit and range the
//!   server declares; a writable one stays writable (its writes are checked against that
//!   range before any PLC sees them);
//! - what a twin cannot hold (text, arrays, structures) is listed in the site config's
//!   header, never silently dropped.
//!
//! Machines with the same signals (names, types, units, ranges) share one machine type.

pub mod modbus;
pub mod opcua;
pub mod sparkplug;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ferrotwin_models::ValueType;
use ferrotwin_models::spec::{
    AreaSpec, LineSpec, MachineInstance, MachineType, PlantSpec, SPEC_VERSION, SensorSpec, SiteSpec,
};

/// A machine as a discovery found it.
#[derive(Debug, Clone)]
pub struct FoundMachine {
    /// Its containers in the source's hierarchy, outermost first (folders of an OPC UA
    /// server; group and edge node of Sparkplug).
    pub within: Vec<String>,
    pub name: String,
    pub signals: Vec<Signal>,
}

/// One readable (maybe writable) value of a machine.
#[derive(Debug, Clone)]
pub struct Signal {
    pub name: String,
    pub value_type: ValueType,
    pub unit: String,
    pub range: Option<(f64, f64)>,
    pub writable: bool,
    /// Where the connection finds it (a node id, a Sparkplug metric).
    pub address: Address,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Address {
    OpcUa(String),
    Modbus(modbus::Register),
    Sparkplug {
        node: String,
        device: Option<String>,
        metric: String,
    },
}

/// What a discovery found: machines, and what it could not take (with why).
#[derive(Debug, Clone, Default)]
pub struct Found {
    pub machines: Vec<FoundMachine>,
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
    /// The source reports a value only when it changes (Sparkplug): a flat value is not a
    /// dead sensor (a dead node is told by its death certificate), so every sensor's period
    /// is `SETPOINT_PERIOD_MS`.
    pub by_exception: bool,
}

/// Names of the plant's top two levels (the source rarely says them).
#[derive(Debug, Clone)]
pub struct Naming {
    pub enterprise: String,
    pub site: String,
}

/// One tag of the connection: a signal's address and the twin property it feeds.
#[derive(Debug, Clone)]
pub struct Mapped {
    pub address: Address,
    pub asset: String,
    pub property: &'static str,
    pub writable: bool,
    /// Where the signal was, in the source's words (for the comment beside the tag).
    pub source: String,
}

/// The plant spec and the tags that feed it.
pub struct Plant {
    pub spec: PlantSpec,
    pub tags: Vec<Mapped>,
    pub skipped: Vec<String>,
    pub notes: Vec<String>,
}

/// Most machines an import writes (a bigger source is cut, and the note says so).
const MAX_MACHINES: usize = 10_000;
/// A sensor that nothing updates for this many periods turns stale; imported sensors read
/// every `period_ms` (1 s) unless writable: a setpoint moves seldom (an hour).
const SETPOINT_PERIOD_MS: u64 = 3_600_000;

impl Plant {
    pub fn build(found: Found, naming: &Naming) -> Result<Plant> {
        let enterprise = slug(&naming.enterprise);
        let site = slug(&naming.site);
        let mut notes = found.notes;
        let mut skipped = found.skipped;
        let by_exception = found.by_exception;
        let mut machines = found.machines;
        if machines.len() > MAX_MACHINES {
            notes.push(format!(
                "{} machines found, the first {MAX_MACHINES} imported",
                machines.len()
            ));
            machines.truncate(MAX_MACHINES);
        }
        // area -> line -> [(machine name, type)], in the order found.
        let mut tree: Vec<(String, Vec<Line>)> = Vec::new();
        let mut types: BTreeMap<String, MachineType> = BTreeMap::new();
        let mut tags = Vec::new();
        let mut machine_names: HashMap<(String, String), HashSet<String>> = HashMap::new();
        for m in machines {
            let (area, line) = place(&m.within);
            let area_at = match tree.iter().position(|(a, _)| *a == area) {
                Some(i) => i,
                None => {
                    tree.push((area.clone(), Vec::new()));
                    tree.len() - 1
                }
            };
            let lines = &mut tree[area_at].1;
            let line_at = match lines.iter().position(|(l, _)| *l == line) {
                Some(i) => i,
                None => {
                    lines.push((line.clone(), Vec::new()));
                    lines.len() - 1
                }
            };
            let taken = machine_names
                .entry((area.clone(), line.clone()))
                .or_default();
            let name = unique(&slug(&m.name), taken);
            let path = format!("{enterprise}/{site}/{area}/{line}/{name}");
            let source = m
                .within
                .iter()
                .chain(std::iter::once(&m.name))
                .cloned()
                .collect::<Vec<_>>()
                .join("/");
            let mut mt = MachineType {
                description: format!("imported from {source}"),
                ideal_cycle_ms: 1000.0,
                sensors: Vec::new(),
                detect: Default::default(),
                model: None,
                setpoints: Vec::new(),
                state_map: BTreeMap::new(),
                rules: Vec::new(),
            };
            let mut sensor_names = HashSet::new();
            let mut fed: HashSet<&'static str> = HashSet::new();
            for s in m.signals {
                let at = format!("{source}/{}", s.name);
                if let Some(property) = machine_property(&s)
                    && fed.insert(property)
                {
                    tags.push(Mapped {
                        address: s.address,
                        asset: path.clone(),
                        property,
                        writable: false,
                        source: at,
                    });
                    continue;
                }
                let sensor = unique(&slug(&s.name), &mut sensor_names);
                mt.sensors.push(SensorSpec {
                    name: sensor.clone(),
                    kind: Default::default(),
                    unit: s.unit.clone(),
                    value_type: s.value_type,
                    min: s.range.map(|r| r.0),
                    max: s.range.map(|r| r.1),
                    period_ms: if s.writable || by_exception {
                        SETPOINT_PERIOD_MS
                    } else {
                        1000
                    },
                    stale_after_periods: 3,
                    alarms: Vec::new(),
                    detect: Default::default(),
                });
                tags.push(Mapped {
                    address: s.address,
                    asset: format!("{path}/{sensor}"),
                    property: "value",
                    writable: s.writable,
                    source: at,
                });
            }
            if mt.sensors.is_empty() && fed.is_empty() {
                skipped.push(format!("{source}: no signal a twin can hold"));
                continue;
            }
            let type_name = type_for(&m.name, mt, &mut types);
            tree[area_at].1[line_at].1.push((name, type_name));
        }
        if tags.is_empty() {
            bail!(
                "nothing to import: no variable or metric a twin can hold{}",
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!(" (skipped: {})", skipped.join("; "))
                }
            );
        }
        let spec = PlantSpec {
            version: SPEC_VERSION,
            enterprise,
            machine_types: types,
            sites: vec![SiteSpec {
                name: site,
                areas: tree
                    .into_iter()
                    .map(|(area, lines)| AreaSpec {
                        name: area,
                        setpoints: Vec::new(),
                        rules: Vec::new(),
                        lines: lines
                            .into_iter()
                            .map(|(line, machines)| LineSpec {
                                name: line,
                                setpoints: Vec::new(),
                                rules: Vec::new(),
                                machines: machines
                                    .into_iter()
                                    .map(|(name, machine_type)| {
                                        MachineInstance::new(name, machine_type)
                                    })
                                    .collect(),
                            })
                            .collect(),
                    })
                    .collect(),
            }],
        };
        Ok(Plant {
            spec,
            tags,
            skipped,
            notes,
        })
    }
}

/// A line's name and its machines (name, type), in the order found.
type Line = (String, Vec<(String, String)>);

/// Area and line of a machine found within `within` (outermost first): its container is
/// the line, the one above it the area; missing levels are `area-1` / `line-1`.
fn place(within: &[String]) -> (String, String) {
    let n = within.len();
    let line = n
        .checked_sub(1)
        .map(|i| slug(&within[i]))
        .unwrap_or_else(|| "line-1".into());
    let area = n
        .checked_sub(2)
        .map(|i| slug(&within[i]))
        .unwrap_or_else(|| "area-1".into());
    (area, line)
}

/// The machine property a signal is by its name and type, if it is one.
fn machine_property(s: &Signal) -> Option<&'static str> {
    let norm: String = s
        .name
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    match (s.value_type, norm.as_str()) {
        (ValueType::Bool, "running" | "isrunning" | "machinerunning") if !s.writable => {
            Some("state")
        }
        (
            ValueType::Int,
            "goodcount" | "goodparts" | "partsgood" | "okcount" | "okparts" | "partsok",
        ) if !s.writable => Some("good_count"),
        (
            ValueType::Int,
            "scrapcount" | "scrapparts" | "partsscrap" | "rejectcount" | "rejects" | "nokcount"
            | "partsnok",
        ) if !s.writable => Some("scrap_count"),
        _ => None,
    }
}

/// The type for a machine named `machine` with type `mt`: an existing type with the same
/// signals, else a new one named after the machine (trailing numbers dropped).
fn type_for(machine: &str, mt: MachineType, types: &mut BTreeMap<String, MachineType>) -> String {
    let same = |a: &MachineType| a.sensors == mt.sensors;
    if let Some((name, _)) = types.iter().find(|(_, t)| same(t)) {
        return name.clone();
    }
    let base = slug(machine);
    let base = base.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '_');
    let base = if base.is_empty() { "machine" } else { base };
    let mut taken: HashSet<String> = types.keys().cloned().collect();
    let name = unique(base, &mut taken);
    types.insert(name.clone(), mt);
    name
}

/// `s` as a slug: lower-case ASCII letters and digits, `-` for anything else, no leading,
/// trailing or doubled `-`, at most 64 bytes; `x` when nothing is left.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    let mut out = out.trim_end_matches('-').to_string();
    out.truncate(ferrotwin_models::asset::MAX_SEGMENT_LEN - 4);
    let out = out.trim_end_matches('-').to_string();
    if out.is_empty() { "x".into() } else { out }
}

/// `base`, or `base-2`, `base-3`, … : the first not in `taken` (then taken).
fn unique(base: &str, taken: &mut HashSet<String>) -> String {
    let mut name = base.to_string();
    let mut i = 2;
    while taken.contains(&name) {
        name = format!("{base}-{i}");
        i += 1;
    }
    taken.insert(name.clone());
    name
}

/// A TOML string literal.
pub fn quoted(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// What the written files hold (for the command's summary line).
pub struct Written {
    pub plant: PathBuf,
    pub site: PathBuf,
    pub machines: usize,
    pub sensors: usize,
    pub tags: usize,
    pub skipped: usize,
}

/// Writes `DIR/plant.toml` and `DIR/site.toml` (refusing to replace them unless `force`):
/// the header says where they came from and what to edit; `connection` is the site
/// config's `[[connections]]` entry, without its tags, which follow from `plant`.
pub fn write(
    dir: &Path,
    force: bool,
    origin: &str,
    plant: &Plant,
    connection: &str,
    tag: impl Fn(&Mapped) -> String,
) -> Result<Written> {
    let plant_path = dir.join("plant.toml");
    let site_path = dir.join("site.toml");
    for p in [&plant_path, &site_path] {
        if p.exists() && !force {
            bail!(
                "{} exists: import into another --out directory, or add --force to replace it",
                p.display()
            );
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let spec_text = plant.spec.to_toml();
    // What we write must read back as a valid plant, or it is our bug: say so, write nothing.
    PlantSpec::from_toml(&spec_text, "the imported plant spec")
        .context("the imported plant spec does not validate (a bug of the import)")?;
    let machines: usize = plant
        .spec
        .sites
        .iter()
        .flat_map(|s| &s.areas)
        .flat_map(|a| &a.lines)
        .map(|l| l.machines.len())
        .sum();
    let mut head = String::new();
    let _ = writeln!(head, "# Imported by `ferrotwin import` from {origin}");
    let _ = writeln!(
        head,
        "# on {}. It runs as it is: ferrotwin run --config {}",
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        site_path.display()
    );
    let mut plant_text = head.clone();
    plant_text.push_str(
        "#\n# Edit before production:\n\
         # - names: each is a slug of the source's name; rename freely, then rename the same\n\
         #   asset paths in site.toml's tags.\n\
         # - ideal_cycle_ms of each machine type (1000 here: OEE's performance depends on it).\n\
         # - period_ms of slow sensors: a sensor the source does not update for 3 periods turns\n\
         #   stale (writable ones: an hour). min/max come from the source's ranges (EURange):\n\
         #   outside them a reading is Uncertain and a write is refused.\n\
         # - alarms: none are imported; add limits per sensor (see README, plant spec).\n\n",
    );
    plant_text.push_str(&spec_text);
    let mut site_text = head;
    site_text.push_str(
        "#\n# Edit before production: data_dir, the listen addresses, and a [security] section\n\
         # for anything beyond this machine (README, Security). Writable tags are marked\n\
         # writable = true: writes reach the PLC (checked against the plant spec's ranges).\n",
    );
    if !plant.notes.is_empty() {
        site_text.push_str("#\n# Notes:\n");
        for n in &plant.notes {
            let _ = writeln!(site_text, "# - {n}");
        }
    }
    if !plant.skipped.is_empty() {
        site_text.push_str("#\n# Not imported (no twin property holds them):\n");
        for n in &plant.skipped {
            let _ = writeln!(site_text, "# - {n}");
        }
    }
    site_text.push_str(
        "\nversion = 1\nplant = \"plant.toml\"\ndata_dir = \"data\"\n\
         grpc_addr = \"127.0.0.1:50051\"\nhttp_addr = \"127.0.0.1:8080\"\n\n",
    );
    site_text.push_str(connection);
    for t in &plant.tags {
        site_text.push_str(&tag(t));
    }
    std::fs::write(&plant_path, plant_text)
        .with_context(|| format!("cannot write {}", plant_path.display()))?;
    std::fs::write(&site_path, site_text)
        .with_context(|| format!("cannot write {}", site_path.display()))?;
    Ok(Written {
        plant: plant_path,
        site: site_path,
        machines,
        sensors: plant.tags.iter().filter(|t| t.property == "value").count(),
        tags: plant.tags.len(),
        skipped: plant.skipped.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(name: &str, vt: ValueType, writable: bool) -> Signal {
        Signal {
            name: name.into(),
            value_type: vt,
            unit: String::new(),
            range: None,
            writable,
            address: Address::OpcUa(format!("ns=2;s={name}")),
        }
    }

    #[test]
    fn slugs_of_foreign_names() {
        assert_eq!(slug("Hall 2"), "hall-2");
        assert_eq!(slug("Press_01 (A)"), "press-01-a");
        assert_eq!(slug("--Temp°C--"), "temp-c");
        assert_eq!(slug("ÄÖÜ"), "x");
        assert_eq!(slug(&"a".repeat(100)).len(), 60);
    }

    #[test]
    fn machines_are_placed_typed_and_their_signals_mapped() {
        let m = |within: &[&str], name: &str, signals: Vec<Signal>| FoundMachine {
            within: within.iter().map(|s| s.to_string()).collect(),
            name: name.into(),
            signals,
        };
        let press = || {
            vec![
                signal("Temperature", ValueType::Float, false),
                signal("Running", ValueType::Bool, false),
                signal("PartsGood", ValueType::Int, false),
                signal("Speed SP", ValueType::Int, true),
            ]
        };
        let found = Found {
            machines: vec![
                m(&["Plant", "Hall 2", "Line A"], "Press 01", press()),
                m(&["Plant", "Hall 2", "Line A"], "Press 02", press()),
                m(
                    &[],
                    "Oven",
                    vec![signal("Zone1.Temp", ValueType::Float, false)],
                ),
            ],
            skipped: vec!["Press 01/Serial (String)".into()],
            notes: Vec::new(),
            by_exception: false,
        };
        let plant = Plant::build(
            found,
            &Naming {
                enterprise: "ACME".into(),
                site: "Lyon".into(),
            },
        )
        .expect("a plant");
        let spec = &plant.spec;
        assert_eq!(spec.enterprise, "acme");
        assert_eq!(
            spec.machine_types.len(),
            2,
            "{:?}",
            spec.machine_types.keys()
        );
        let press = &spec.machine_types["press"];
        let names: Vec<&str> = press.sensors.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["temperature", "speed-sp"]);
        assert_eq!(press.sensors[1].period_ms, SETPOINT_PERIOD_MS);
        let find = |asset: &str, property: &str| {
            plant
                .tags
                .iter()
                .find(|t| t.asset == asset && t.property == property)
                .unwrap_or_else(|| panic!("no tag {asset} {property}: {:?}", plant.tags))
                .clone()
        };
        assert!(!find("acme/lyon/hall-2/line-a/press-01", "state").writable);
        find("acme/lyon/hall-2/line-a/press-02", "good_count");
        assert!(find("acme/lyon/hall-2/line-a/press-01/speed-sp", "value").writable);
        find("acme/lyon/area-1/line-1/oven/zone1-temp", "value");
        assert_eq!(plant.tags.len(), 9);
        // It reads back as a valid plant with every tagged asset in it.
        let text = spec.to_toml();
        let back = PlantSpec::from_toml(&text, "t").expect("valid");
        let paths: HashSet<String> = back.assets().iter().map(|a| a.path.to_string()).collect();
        for t in &plant.tags {
            assert!(paths.contains(&t.asset), "{} missing", t.asset);
        }
    }

    #[test]
    fn a_source_without_any_usable_signal_is_an_error_naming_what_was_skipped() {
        let found = Found {
            machines: Vec::new(),
            skipped: vec!["Robot/Program (String)".into()],
            notes: Vec::new(),
            by_exception: false,
        };
        let err = Plant::build(
            found,
            &Naming {
                enterprise: "e".into(),
                site: "s".into(),
            },
        )
        .err()
        .expect("an error")
        .to_string();
        assert!(err.contains("Robot/Program (String)"), "{err}");
    }
}
