//! What a changed plant changes, said the way an operator reads it: the top-most added and
//! removed subtrees with their sizes, and each changed asset with what changed in it
//! (`alarm high: limit 90 → 85`). Pure: a dry run prints these, a live apply raises one
//! `model` event per line.

use std::collections::{HashMap, HashSet};
use std::fmt::{self, Write as _};

use crate::alarm::AlarmLimit;
use crate::rule::RuleSpec;
use crate::spec::{AssetDef, AssetKind, MachineType, PlantDiff, SensorSpec, SetpointSpec, diff};
use crate::{AssetPath, Level};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeOp {
    Added,
    Removed,
    Changed,
}

impl ChangeOp {
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeOp::Added => "added",
            ChangeOp::Removed => "removed",
            ChangeOp::Changed => "changed",
        }
    }

    /// The mark a dry run prints before the path.
    pub fn mark(self) -> char {
        match self {
            ChangeOp::Added => '+',
            ChangeOp::Removed => '-',
            ChangeOp::Changed => '~',
        }
    }
}

/// One line of a plan: a top-most added or removed subtree, or one changed asset.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub path: AssetPath,
    pub op: ChangeOp,
    /// What it is and what changed, e.g. `machine of type press, 3 sensors` or
    /// `alarm high: limit 90 → 85; unit °C → °F`.
    pub detail: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}  {}", self.op.mark(), self.path, self.detail)
    }
}

/// The plan of going from one plant to another.
#[derive(Debug, Default)]
pub struct PlantChanges {
    /// Every asset: added (parents first), removed (children first), changed.
    pub diff: PlantDiff,
    /// What an operator reads, in path order: top-most added and removed subtrees and each
    /// changed asset whose own settings changed (a machine whose only change is in its
    /// sensors is told by those sensors' lines).
    pub lines: Vec<Change>,
}

impl PlantChanges {
    pub fn is_empty(&self) -> bool {
        self.diff.added.is_empty() && self.diff.removed.is_empty() && self.diff.changed.is_empty()
    }

    /// `+3 −1 ~12` (assets added, removed, changed).
    pub fn summary(&self) -> String {
        format!(
            "+{} −{} ~{}",
            self.diff.added.len(),
            self.diff.removed.len(),
            self.diff.changed.len()
        )
    }
}

/// Plans the change from `old` to `new` (both as `PlantSpec::assets` gives them).
pub fn plan(old: &[AssetDef], new: &[AssetDef]) -> PlantChanges {
    let d = diff(old, new);
    let mut lines = Vec::new();
    let added: HashSet<&AssetPath> = d.added.iter().map(|a| &a.path).collect();
    let removed: HashSet<&AssetPath> = d.removed.iter().collect();
    let old_by_path: HashMap<&AssetPath, &AssetDef> = old.iter().map(|a| (&a.path, a)).collect();
    // Sizes of subtrees, counted once per asset by walking up its ancestors that were added
    // (or removed) too.
    let sizes = |defs: &mut dyn Iterator<Item = &AssetDef>, inside: &HashSet<&AssetPath>| {
        let mut below: HashMap<AssetPath, [usize; 6]> = HashMap::new();
        for a in defs {
            let mut p = a.path.parent();
            while let Some(anc) = p {
                if !inside.contains(&anc) {
                    break;
                }
                below.entry(anc.clone()).or_default()[level_index(a.path.level())] += 1;
                p = anc.parent();
            }
        }
        below
    };
    let added_below = sizes(&mut d.added.iter(), &added);
    for a in &d.added {
        if a.path.parent().is_some_and(|p| added.contains(&p)) {
            continue;
        }
        lines.push(Change {
            path: a.path.clone(),
            op: ChangeOp::Added,
            detail: what(&a.kind, added_below.get(&a.path)),
        });
    }
    let removed_defs: Vec<&AssetDef> = d
        .removed
        .iter()
        .filter_map(|p| old_by_path.get(p).copied())
        .collect();
    let removed_below = sizes(&mut removed_defs.iter().copied(), &removed);
    for a in &removed_defs {
        if a.path.parent().is_some_and(|p| removed.contains(&p)) {
            continue;
        }
        lines.push(Change {
            path: a.path.clone(),
            op: ChangeOp::Removed,
            detail: what(&a.kind, removed_below.get(&a.path)),
        });
    }
    for a in &d.changed {
        let Some(o) = old_by_path.get(&a.path) else {
            continue;
        };
        let detail = describe(&o.kind, &a.kind);
        if !detail.is_empty() {
            lines.push(Change {
                path: a.path.clone(),
                op: ChangeOp::Changed,
                detail,
            });
        }
    }
    lines.sort_by(|a, b| a.path.cmp(&b.path));
    PlantChanges { diff: d, lines }
}

fn level_index(l: Level) -> usize {
    match l {
        Level::Enterprise => 0,
        Level::Site => 1,
        Level::Area => 2,
        Level::Line => 3,
        Level::Machine => 4,
        Level::Sensor => 5,
    }
}

/// `machine of type press, 3 sensors`, `line, 2 machines, 6 sensors`.
fn what(kind: &AssetKind, below: Option<&[usize; 6]>) -> String {
    let mut s = match kind {
        AssetKind::Machine { type_name, .. } => format!("machine of type {type_name}"),
        AssetKind::Sensor { spec, .. } if spec.unit.is_empty() => "sensor".to_string(),
        AssetKind::Sensor { spec, .. } => format!("sensor in {}", spec.unit),
        other => other.level().as_str().to_string(),
    };
    if let Some(n) = below {
        for (i, name) in [(2, "area"), (3, "line"), (4, "machine"), (5, "sensor")] {
            match n[i] {
                0 => {}
                1 => {
                    let _ = write!(s, ", 1 {name}");
                }
                k => {
                    let _ = write!(s, ", {k} {name}s");
                }
            }
        }
    }
    s
}

/// What changed from `old` to `new` at one asset, `; `-separated; empty when nothing of the
/// asset's own settings did (a machine whose sensors alone changed).
pub fn describe(old: &AssetKind, new: &AssetKind) -> String {
    let mut parts = Vec::new();
    match (old, new) {
        (
            AssetKind::Sensor {
                type_name: ot,
                spec: o,
            },
            AssetKind::Sensor {
                type_name: nt,
                spec: n,
            },
        ) => {
            if ot != nt {
                parts.push(format!("type {ot} → {nt}"));
            }
            sensor(o, n, &mut parts);
        }
        (
            AssetKind::Machine {
                type_name: ot,
                spec: o,
            },
            AssetKind::Machine {
                type_name: nt,
                spec: n,
            },
        ) => {
            if ot != nt {
                parts.push(format!("type {ot} → {nt}"));
            }
            machine(o, n, &mut parts);
        }
        (
            AssetKind::Line {
                setpoints: o,
                rules: or,
            },
            AssetKind::Line {
                setpoints: n,
                rules: nr,
            },
        )
        | (
            AssetKind::Area {
                setpoints: o,
                rules: or,
            },
            AssetKind::Area {
                setpoints: n,
                rules: nr,
            },
        ) => {
            setpoints(o, n, &mut parts);
            rules(or, nr, &mut parts);
        }
        (o, n) if o != n => parts.push(format!("{} → {}", o.level().as_str(), n.level().as_str())),
        _ => {}
    }
    parts.join("; ")
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(String::new, |v| v.to_string())
}

fn sensor(o: &SensorSpec, n: &SensorSpec, parts: &mut Vec<String>) {
    if o.unit != n.unit {
        parts.push(format!("unit {:?} → {:?}", o.unit, n.unit));
    }
    if o.value_type != n.value_type {
        parts.push(format!(
            "value type {} → {}",
            o.value_type.as_str(),
            n.value_type.as_str()
        ));
    }
    if o.kind != n.kind {
        parts.push(format!("kind {} → {}", o.kind.as_str(), n.kind.as_str()));
    }
    if (o.min, o.max) != (n.min, n.max) {
        parts.push(format!(
            "range {}..{} → {}..{}",
            opt(o.min),
            opt(o.max),
            opt(n.min),
            opt(n.max)
        ));
    }
    if o.period_ms != n.period_ms {
        parts.push(format!("period {} ms → {} ms", o.period_ms, n.period_ms));
    }
    if o.stale_after_periods != n.stale_after_periods {
        parts.push(format!(
            "stale after {} → {} periods",
            o.stale_after_periods, n.stale_after_periods
        ));
    }
    alarms(&o.alarms, &n.alarms, parts);
    if o.detect != n.detect {
        parts.push("detector settings (it learns again)".to_string());
    }
}

fn alarms(o: &[AlarmLimit], n: &[AlarmLimit], parts: &mut Vec<String>) {
    for a in o {
        match n.iter().find(|b| b.name == a.name) {
            None => parts.push(format!("alarm {} removed", a.name)),
            Some(b) if b == a => {}
            Some(b) => {
                let mut what = Vec::new();
                if a.kind != b.kind {
                    what.push(format!("kind {:?} → {:?}", a.kind, b.kind));
                }
                if a.limit != b.limit {
                    what.push(format!("limit {} → {}", a.limit, b.limit));
                }
                if a.deadband != b.deadband {
                    what.push(format!("deadband {} → {}", a.deadband, b.deadband));
                }
                if a.on_delay_ms != b.on_delay_ms {
                    what.push(format!("on delay {} → {} ms", a.on_delay_ms, b.on_delay_ms));
                }
                if a.off_delay_ms != b.off_delay_ms {
                    what.push(format!(
                        "off delay {} → {} ms",
                        a.off_delay_ms, b.off_delay_ms
                    ));
                }
                if a.severity != b.severity {
                    what.push(format!(
                        "severity {} → {}",
                        a.severity.as_str(),
                        b.severity.as_str()
                    ));
                }
                parts.push(format!("alarm {}: {}", a.name, what.join(", ")));
            }
        }
    }
    for b in n {
        if !o.iter().any(|a| a.name == b.name) {
            parts.push(format!(
                "alarm {} added ({} {})",
                b.name,
                b.kind.as_str(),
                b.limit
            ));
        }
    }
}

/// Rules added, removed and changed, by name.
fn rules(o: &[RuleSpec], n: &[RuleSpec], parts: &mut Vec<String>) {
    for r in n {
        match o.iter().find(|x| x.name == r.name) {
            None => parts.push(format!("rule {} added", r.name)),
            Some(x) if x != r => parts.push(format!("rule {} changed", r.name)),
            Some(_) => {}
        }
    }
    for r in o.iter().filter(|x| !n.iter().any(|r| r.name == x.name)) {
        parts.push(format!("rule {} removed", r.name));
    }
}

fn machine(o: &MachineType, n: &MachineType, parts: &mut Vec<String>) {
    rules(&o.rules, &n.rules, parts);
    if o.ideal_cycle_ms != n.ideal_cycle_ms {
        parts.push(format!(
            "ideal cycle {} ms → {} ms",
            o.ideal_cycle_ms, n.ideal_cycle_ms
        ));
    }
    let names = |t: &MachineType| t.sensors.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
    let (on, nn) = (names(o), names(n));
    if on != nn {
        let mut a: Vec<_> = on.iter().filter(|s| !nn.contains(s)).cloned().collect();
        a.sort();
        let mut b: Vec<_> = nn.iter().filter(|s| !on.contains(s)).cloned().collect();
        b.sort();
        if a.is_empty() && b.is_empty() {
            parts.push("sensor order (the machine detector learns again)".to_string());
        } else {
            parts.push(format!(
                "sensors{}{} (the machine detector learns again)",
                if b.is_empty() {
                    String::new()
                } else {
                    format!(" +{}", b.join(" +"))
                },
                if a.is_empty() {
                    String::new()
                } else {
                    format!(" -{}", a.join(" -"))
                },
            ));
        }
    }
    if o.detect != n.detect {
        parts.push("machine detector settings (it learns again)".to_string());
    }
    if o.model != n.model {
        parts.push(match (&o.model, &n.model) {
            (None, Some(m)) => format!("model {} added", m.file.display()),
            (Some(m), None) => format!("model {} removed", m.file.display()),
            _ => "model settings".to_string(),
        });
    }
    setpoints(&o.setpoints, &n.setpoints, parts);
    if o.state_map != n.state_map {
        parts.push("state map".to_string());
    }
}

fn setpoints(o: &[SetpointSpec], n: &[SetpointSpec], parts: &mut Vec<String>) {
    for a in o {
        match n.iter().find(|b| b.name == a.name) {
            None => parts.push(format!("setpoint {} removed", a.name)),
            Some(b) if b == a => {}
            Some(b) => parts.push(format!(
                "setpoint {}: {} {}..{} {:?} → {} {}..{} {:?}",
                a.name,
                a.value_type.as_str(),
                opt(a.min),
                opt(a.max),
                a.unit,
                b.value_type.as_str(),
                opt(b.min),
                opt(b.max),
                b.unit
            )),
        }
    }
    for b in n {
        if !o.iter().any(|a| a.name == b.name) {
            parts.push(format!("setpoint {} added", b.name));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::PlantSpec;

    const PLANT: &str = r#"
version = 1
enterprise = "acme"

[machine_types.press]
ideal_cycle_ms = 1000
[[machine_types.press.sensors]]
name = "temp"
unit = "C"
min = 0.0
max = 200.0
alarms = [{ name = "high", kind = "high", limit = 90.0 }]
[[machine_types.press.sensors]]
name = "force"
unit = "kN"

[[sites]]
name = "berlin"
[[sites.areas]]
name = "body"
[[sites.areas.lines]]
name = "line-1"
machines = [{ name = "press-1", type = "press" }, { name = "press-2", type = "press" }]
"#;

    fn assets(text: &str) -> Vec<AssetDef> {
        PlantSpec::from_toml(text, "t").expect("valid").assets()
    }

    fn lines(old: &str, new: &str) -> Vec<String> {
        plan(&assets(old), &assets(new))
            .lines
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn the_same_plant_plans_nothing() {
        let p = plan(&assets(PLANT), &assets(PLANT));
        assert!(p.is_empty() && p.lines.is_empty(), "{:?}", p.lines);
    }

    #[test]
    fn a_moved_limit_is_one_line_per_sensor_of_the_type_and_no_machine_line() {
        let new = PLANT.replace("limit = 90.0", "limit = 85.0");
        let p = plan(&assets(PLANT), &assets(&new));
        assert_eq!(
            p.lines.iter().map(ToString::to_string).collect::<Vec<_>>(),
            [
                "~ acme/berlin/body/line-1/press-1/temp  alarm high: limit 90 → 85",
                "~ acme/berlin/body/line-1/press-2/temp  alarm high: limit 90 → 85",
            ]
        );
        // Both machines (their type's Arc differs) and both sensors are changed assets.
        assert_eq!(p.diff.changed.len(), 4, "{}", p.summary());
        assert_eq!(p.summary(), "+0 −0 ~4");
    }

    #[test]
    fn an_added_line_is_one_line_with_its_size_and_a_removed_machine_one_line() {
        let new = PLANT
            .replace(r#", { name = "press-2", type = "press" }"#, "")
            .replace(
                r#"[[sites.areas.lines]]
name = "line-1""#,
                r#"[[sites.areas.lines]]
name = "line-2"
machines = [{ name = "press-9", type = "press" }]
[[sites.areas.lines]]
name = "line-1""#,
            );
        assert_eq!(
            lines(PLANT, &new),
            [
                "- acme/berlin/body/line-1/press-2  machine of type press, 2 sensors",
                "+ acme/berlin/body/line-2  line, 1 machine, 2 sensors",
            ]
        );
    }

    #[test]
    fn a_sensor_added_to_a_type_is_an_added_sensor_and_a_machine_line() {
        let new = PLANT.replace(
            "[[sites]]",
            "[[machine_types.press.sensors]]\nname = \"vib\"\nunit = \"mm/s\"\n\n[[sites]]",
        );
        let l = lines(PLANT, &new);
        assert_eq!(
            l,
            [
                "~ acme/berlin/body/line-1/press-1  sensors +vib (the machine detector learns again)",
                "+ acme/berlin/body/line-1/press-1/vib  sensor in mm/s",
                "~ acme/berlin/body/line-1/press-2  sensors +vib (the machine detector learns again)",
                "+ acme/berlin/body/line-1/press-2/vib  sensor in mm/s",
            ]
        );
    }

    #[test]
    fn every_sensor_setting_and_alarm_edit_is_named() {
        let new = PLANT
            .replace(r#"unit = "C""#, r#"unit = "F""#)
            .replace("max = 200.0", "max = 400.0")
            .replace(
                r#"alarms = [{ name = "high", kind = "high", limit = 90.0 }]"#,
                r#"alarms = [{ name = "hh", kind = "high", limit = 95.0, severity = "high" }]"#,
            );
        let l = lines(PLANT, &new);
        assert_eq!(
            l[0],
            "~ acme/berlin/body/line-1/press-1/temp  unit \"C\" → \"F\"; range 0..200 → 0..400; \
             alarm high removed; alarm hh added (high 95)"
        );
    }
}
