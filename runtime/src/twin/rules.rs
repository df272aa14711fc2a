//! A machine's local action rules, evaluated in its twin on the changes that matter: an
//! alarm of one of its sensors (`TwinMsg::SensorAlarm`), its own anomaly episodes, health
//! and state, its publishes (query rules), and a rule's own timers (`TwinMsg::RuleTick`).
//! A firing leaves as an `ActionRequest` on the bounded action queue; the executor
//! (`api::actions`) writes through the manual write path and answers with
//! `TwinMsg::ActionDone`. The rules' life is `ferrotwin_models::rule::RuleRun`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use ferrotwin_models::alarm::AlarmState;
use ferrotwin_models::detect::DetectorKind;
use ferrotwin_models::rule::{Condition, EventAction, RuleMode, RuleRun, RuleSpec, WriteAction};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetPath, Severity, Timestamp};

use crate::core::{MachineSnap, SensorAlarm, TwinSnapshot, TwinState};
use crate::registry::{Registry, TwinEntry};

/// Room in the action queue between the twins and the executor. A firing that finds it
/// full is not carried out: it fails (an event and the rule's alarm), the twin never waits.
pub const ACTION_QUEUE: usize = 1024;

/// A rule's firing on its way to the executor.
#[derive(Debug)]
pub struct ActionRequest {
    pub machine: AssetPath,
    pub rule: Arc<str>,
    pub write: Option<WriteAction>,
    pub event: Option<EventAction>,
    pub dry_run: bool,
    /// The seq of the event that completed the condition (0: a change with no event of
    /// its own, such as a health figure or a query over values).
    pub trigger_seq: u64,
    /// What held, in words.
    pub trigger: String,
    /// Source time of the reading that completed the condition.
    pub reading_ts: Timestamp,
    /// When the twin fired.
    pub fired: Instant,
}

/// What made the last evaluation: the trigger of a firing it makes.
#[derive(Debug, Clone, Default)]
pub struct Trigger {
    pub seq: u64,
    pub at: Timestamp,
}

/// A machine's rules and what their conditions watch.
pub struct MachineRules {
    pub specs: Vec<RuleSpec>,
    conds: Vec<Condition>,
    /// Alarms its sensors have in a state other than normal, by (sensor, alarm).
    alarms: HashMap<(String, String), (AlarmState, Severity)>,
    /// The machine-level detectors with an open episode.
    open: Vec<DetectorKind>,
    /// The last change, a firing's trigger.
    pub trigger: Trigger,
    /// The earliest timer set and not yet due (one at a time is enough: each tick looks at
    /// every rule and sets the next).
    pub wake: Option<Timestamp>,
    /// Whether any rule watches alarms (the sensors tell the machine only then).
    pub watches_alarms: bool,
}

/// The rules a machine at `path` of type `type_rules` runs: its type's, then its line's and
/// its area's (from the registry), in that order.
pub fn rules_of(registry: &Registry, path: &AssetPath, type_rules: &[RuleSpec]) -> Vec<RuleSpec> {
    let mut out = type_rules.to_vec();
    let mut at = path.parent();
    while let Some(p) = at {
        if let Some(e) = registry.by_path(&p)
            && let AssetKind::Line { rules, .. } | AssetKind::Area { rules, .. } = &e.def.kind
        {
            out.extend(rules.iter().cloned());
        }
        at = p.parent();
    }
    out
}

impl MachineRules {
    /// The rules of `specs` (checked at load: a condition that does not parse is left out,
    /// and logged) with what the sensors below `entry` report now.
    pub fn new(specs: Vec<RuleSpec>, entry: &TwinEntry, registry: &Registry) -> MachineRules {
        let mut kept = Vec::with_capacity(specs.len());
        let mut conds = Vec::with_capacity(specs.len());
        for s in specs {
            match s.condition() {
                Ok(c) => {
                    kept.push(s);
                    conds.push(c);
                }
                Err(e) => {
                    tracing::error!(asset = %entry.path(), rule = %s.name, error = %e, "rule left out");
                }
            }
        }
        let watches_alarms = conds.iter().any(|c| matches!(c, Condition::Alarm { .. }));
        let mut alarms = HashMap::new();
        if watches_alarms && let AssetKind::Machine { spec, .. } = &entry.def.kind {
            for s in &spec.sensors {
                let Some(e) = registry.by_path(
                    &entry
                        .path()
                        .child(&s.name)
                        .unwrap_or_else(|_| entry.path().clone()),
                ) else {
                    continue;
                };
                if let TwinState::Sensor(snap) = &e.snapshot().state {
                    for (limit, status) in s.alarms.iter().zip(&snap.alarms) {
                        if status.state != AlarmState::Normal {
                            alarms.insert(
                                (s.name.clone(), limit.name.clone()),
                                (status.state, limit.severity),
                            );
                        }
                    }
                }
            }
        }
        MachineRules {
            specs: kept,
            conds,
            alarms,
            open: Vec::new(),
            trigger: Trigger::default(),
            wake: None,
            watches_alarms,
        }
    }

    /// Each rule's state, carried over by name from `old` (a restart's snapshot, a rebind);
    /// new ones in the mode `stored` says it was switched to at run time, else in the spec's.
    pub fn runs(
        &self,
        old: &[(Arc<str>, RuleRun)],
        stored: impl Fn(&RuleSpec) -> Option<RuleMode>,
    ) -> Vec<(Arc<str>, RuleRun)> {
        self.specs
            .iter()
            .map(|s| {
                old.iter()
                    .find(|(n, _)| **n == *s.name)
                    .cloned()
                    .unwrap_or_else(|| {
                        let mode = stored(s).unwrap_or(s.mode);
                        (Arc::from(s.name.as_str()), RuleRun::new(mode))
                    })
            })
            .collect()
    }

    /// Notes a sensor's alarm change; says whether a rule watches it.
    pub fn note_alarm(&mut self, a: &SensorAlarm) -> bool {
        let key = (a.sensor.clone(), a.alarm.clone());
        if a.state == AlarmState::Normal {
            self.alarms.remove(&key);
        } else {
            self.alarms.insert(key, (a.state, a.severity));
        }
        let watched = self
            .conds
            .iter()
            .any(|c| c.names_alarm(&a.sensor, &a.alarm));
        if watched {
            self.trigger = Trigger {
                seq: a.seq,
                at: a.at,
            };
        }
        watched
    }

    /// The rules an acknowledgment of `sensor.alarm` re-arms.
    pub fn acknowledged(&self, sensor: &str, alarm: &str, runs: &mut [(Arc<str>, RuleRun)]) {
        for ((spec, cond), (_, run)) in self.specs.iter().zip(&self.conds).zip(runs) {
            if cond.names_alarm(sensor, alarm) {
                run.acknowledged(spec);
            }
        }
    }

    /// Notes an anomaly episode of a machine detector opening or closing.
    pub fn note_anomaly(&mut self, detector: DetectorKind, open: bool, trigger: Trigger) {
        self.open.retain(|d| *d != detector);
        if open {
            self.open.push(detector);
        }
        self.trigger = trigger;
    }

    /// Whether rule `i`'s condition holds for the machine now (`snap`: its state as last
    /// published, for query rules).
    pub fn holds(
        &self,
        i: usize,
        machine: &MachineSnap,
        entry: &TwinEntry,
        published: &dyn Fn() -> Arc<TwinSnapshot>,
        registry: &Registry,
    ) -> bool {
        match &self.conds[i] {
            Condition::Alarm {
                sensor,
                alarm,
                state,
                severity,
            } => self.alarms.iter().any(|((s, a), (st, sev))| {
                sensor.as_deref().is_none_or(|x| x == s)
                    && alarm.as_deref().is_none_or(|x| x == a)
                    && state.matches(*st)
                    && sev >= severity
            }),
            Condition::Anomaly(None) => machine.inference.anomalous || !self.open.is_empty(),
            Condition::Anomaly(Some(d)) => self.open.contains(d),
            Condition::HealthBelow(h) => machine.inference.health.is_some_and(|x| x < *h),
            Condition::Query(q) => q.matches(&super::select::TwinSubject {
                entry,
                snap: published(),
                registry,
            }),
        }
    }

    /// What rule `i` watches, in words (for its firing's record).
    pub fn describe(&self, i: usize) -> String {
        self.conds[i].describe()
    }

    pub fn has_query(&self) -> bool {
        self.conds.iter().any(|c| matches!(c, Condition::Query(_)))
    }
}

/// Names of `specs`, for an error naming the ones a machine has.
pub fn names(runs: &[(Arc<str>, RuleRun)]) -> String {
    if runs.is_empty() {
        return "none".into();
    }
    runs.iter()
        .map(|(n, _)| n.as_ref())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks every machine's rules against what runs: a query must name fields a machine has,
/// and an enabled rule that writes needs a connection that writes its property
/// (`writes`). Every problem names machine, rule and property.
pub fn check_all(
    registry: &Registry,
    writes: &dyn Fn(&AssetPath, &str) -> bool,
) -> Result<(), Vec<String>> {
    use ferrotwin_models::query::Query;
    let mut problems = Vec::new();
    if registry.is_mirrors_only() {
        return Ok(());
    }
    let mut seen_types = std::collections::HashSet::new();
    for e in registry.all() {
        let AssetKind::Machine { spec, type_name } = &e.def.kind else {
            continue;
        };
        let specs = rules_of(registry, e.path(), &spec.rules);
        if specs.is_empty() {
            continue;
        }
        let schema = super::select::TwinSchema {
            sensors: Arc::new(spec.sensors.iter().map(|s| s.name.clone()).collect()),
        };
        for r in &specs {
            // A type's query is checked once per type (the same text for every machine).
            if let Some(q) = &r.when.query
                && seen_types.insert((type_name.to_string(), r.name.clone()))
                && let Err(err) = Query::parse(q).and_then(|q| {
                    q.check(&schema)?;
                    Ok(q)
                })
            {
                problems.push(format!(
                    "{}: rule {:?}: when.query: {err}",
                    e.path(),
                    r.name
                ));
            }
            // Dry-run and disabled rules write nothing: they start without a writer (and
            // are enabled only where one exists).
            if r.mode != RuleMode::Enabled {
                continue;
            }
            if let Some(w) = &r.then.write
                && !writes(e.path(), &w.property)
            {
                problems.push(format!(
                    "{}: rule {:?} writes {:?}, which no connection writes (map it in a writable tag, or set the rule's mode to \"disabled\")",
                    e.path(),
                    r.name,
                    w.property
                ));
            }
            if problems.len() >= 20 {
                problems.push("… (more left out)".into());
                return Err(problems);
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}
