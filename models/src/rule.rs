//! Local action rules: what a machine does by itself when its alarms, anomalies, health or a
//! predicate over it say so, with no one and nothing upstream in the loop.
//!
//! ```toml
//! [[machine_types.oven.rules]]
//! name = "overheat-stop"
//! mode = "enabled"                       # enabled | dry-run | disabled (switchable at run time)
//! when = { alarm = "*.high", severity = "critical" }   # or { anomaly = "any" },
//!                                        # { health_below = 40 }, { query = "zone-1-temp > 250" }
//! for_ms = 0                             # the condition must hold this long first
//! only_in_states = ["running", "setup"]  # interlock: the machine states it may act in
//! then = { write = { property = "run_enable", value = false }, event = { severity = "high" } }
//! rearm = "cleared"                      # "cleared" | "acknowledged" | { cooldown_ms = 60000 }
//! max_firings = { count = 3, window_ms = 600000 }
//! ```
//!
//! Rules are written on a machine type (every machine of it has them), on a line or on an
//! area (every machine below has them). They are evaluated by the machine's twin on the
//! changes that matter (an alarm of one of its sensors, its own anomaly episodes, health and
//! state, its publishes for a query), never by polling.
//!
//! A rule's life ([`RuleRun`]): **armed** → (condition holds, `for_ms` passed, interlock
//! open, under `max_firings`) → **firing** (its action on its way; nothing re-triggers it) →
//! **latched** until it re-arms: `cleared` once the condition no longer holds,
//! `acknowledged` once an operator acknowledged a matching alarm, or **cooling down** for
//! `cooldown_ms`. Re-armed, it fires again if the condition still holds: a machine an operator
//! restarts while still overheating is stopped again. A readings its own write causes finds
//! the rule firing or latched, so a rule's write never re-triggers it. Past `max_firings` in
//! its window the rule is **limited** until the oldest firing leaves the window.
//!
//! Pure: the caller passes the time and says whether the condition holds.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::alarm::AlarmState;
use crate::detect::DetectorKind;
use crate::event::Severity;
use crate::oee::MachineState;
use crate::query::Query;
use crate::spec::{MachineType, SetpointSpec};
use crate::value::{Timestamp, Value};

/// Longest `for_ms` and cooldown: a day.
pub const MAX_DELAY_MS: u64 = 86_400_000;
/// Most firings a `max_firings` may allow per window (the window's record is that long).
pub const MAX_FIRINGS_COUNT: u32 = 1000;
/// Most rules one machine may have (its type's, its line's and its area's together).
pub const MAX_RULES_PER_MACHINE: usize = 32;

/// How a rule runs; switchable at run time through the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuleMode {
    /// Fires and acts.
    #[default]
    Enabled,
    /// Fires and records what it would have done; writes nothing.
    DryRun,
    /// Never fires.
    Disabled,
}

impl RuleMode {
    pub const ALL: [RuleMode; 3] = [RuleMode::Enabled, RuleMode::DryRun, RuleMode::Disabled];

    pub fn as_str(self) -> &'static str {
        match self {
            RuleMode::Enabled => "enabled",
            RuleMode::DryRun => "dry-run",
            RuleMode::Disabled => "disabled",
        }
    }

    pub fn parse(s: &str) -> Option<RuleMode> {
        RuleMode::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

impl fmt::Display for RuleMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which alarms of a matching sensor count: active ones (acknowledged or not), or
/// unacknowledged ones (active, or returned and waiting for an acknowledgment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AlarmWhen {
    #[default]
    Active,
    Unacked,
}

impl AlarmWhen {
    pub fn matches(self, state: AlarmState) -> bool {
        match self {
            AlarmWhen::Active => state.is_active(),
            AlarmWhen::Unacked => matches!(
                state,
                AlarmState::ActiveUnacked | AlarmState::ReturnedUnacked
            ),
        }
    }
}

/// The condition, as written: exactly one of `alarm`, `anomaly`, `health_below`, `query`.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    /// `sensor.alarm` of one of the machine's sensors; either side may be `*` (`*.high`,
    /// `zone-1-temp.*`, `*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alarm: Option<String>,
    /// With `alarm`: which states count (default active).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AlarmWhen>,
    /// With `alarm`: the least severity that counts (default any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub severity: Option<Severity>,
    /// An anomaly episode of the machine's own detectors is open: `any`, `multivariate`,
    /// `health` or `model`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anomaly: Option<String>,
    /// The machine's health index (0..=100) is below this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_below: Option<f64>,
    /// A query-language predicate over the machine (its fields, its sensors by name):
    /// `zone-1-temp > 250 and state = running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// A value a rule writes.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RuleValue {
    Bool(bool),
    Int(i64),
    Float(f64),
}

impl RuleValue {
    pub fn value(self) -> Value {
        match self {
            RuleValue::Bool(b) => Value::Bool(b),
            RuleValue::Int(i) => Value::Int(i),
            RuleValue::Float(f) => Value::Float(f),
        }
    }
}

/// Write `value` to the machine's `property` through the connection that maps it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WriteAction {
    pub property: String,
    pub value: RuleValue,
}

/// Raise an event of the rule's own severity (its message, or the rule's name).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EventAction {
    pub severity: Severity,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// What a firing does: a write, an event, or both.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Then {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write: Option<WriteAction>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<EventAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RearmOn {
    /// Once the condition no longer holds.
    Cleared,
    /// Once an operator acknowledged a matching alarm (alarm rules only).
    Acknowledged,
}

/// When a rule that fired may fire again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Rearm {
    On(RearmOn),
    Cooldown { cooldown_ms: u64 },
}

impl Default for Rearm {
    fn default() -> Rearm {
        Rearm::On(RearmOn::Cleared)
    }
}

impl fmt::Display for Rearm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rearm::On(RearmOn::Cleared) => f.write_str("cleared"),
            Rearm::On(RearmOn::Acknowledged) => f.write_str("acknowledged"),
            Rearm::Cooldown { cooldown_ms } => write!(f, "cooldown {cooldown_ms} ms"),
        }
    }
}

/// At most `count` firings in any `window_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MaxFirings {
    pub count: u32,
    pub window_ms: u64,
}

/// A rule as the plant spec writes it.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    /// The mode a start gives it (the API may switch it while running).
    #[serde(default, skip_serializing_if = "is_enabled")]
    pub mode: RuleMode,
    pub when: When,
    /// The condition must hold this long before the rule fires.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub for_ms: u64,
    /// Interlock: fire only while the machine is in one of these states (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only_in_states: Vec<MachineState>,
    pub then: Then,
    #[serde(default)]
    pub rearm: Rearm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_firings: Option<MaxFirings>,
}

fn is_enabled(m: &RuleMode) -> bool {
    *m == RuleMode::Enabled
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The condition, checked and ready to evaluate.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    Alarm {
        sensor: Option<String>,
        alarm: Option<String>,
        state: AlarmWhen,
        severity: Severity,
    },
    /// `None`: any of the machine's detectors.
    Anomaly(Option<DetectorKind>),
    HealthBelow(f64),
    Query(Query),
}

/// The machine-level detectors an `anomaly` condition may name.
const MACHINE_DETECTORS: [DetectorKind; 3] = [
    DetectorKind::Multivariate,
    DetectorKind::Health,
    DetectorKind::Model,
];

impl Condition {
    /// Whether a sensor `sensor`'s alarm `alarm` is one this condition watches.
    pub fn names_alarm(&self, sensor: &str, alarm: &str) -> bool {
        match self {
            Condition::Alarm {
                sensor: s,
                alarm: a,
                ..
            } => {
                s.as_deref().is_none_or(|s| s == sensor) && a.as_deref().is_none_or(|a| a == alarm)
            }
            _ => false,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Condition::Alarm {
                sensor,
                alarm,
                state,
                severity,
            } => {
                let s = sensor.as_deref().unwrap_or("*");
                let a = alarm.as_deref().unwrap_or("*");
                let which = match state {
                    AlarmWhen::Active => "active",
                    AlarmWhen::Unacked => "unacknowledged",
                };
                if *severity > Severity::Info {
                    format!("alarm {s}.{a} {which}, {severity} or worse")
                } else {
                    format!("alarm {s}.{a} {which}")
                }
            }
            Condition::Anomaly(None) => "an anomaly episode open".into(),
            Condition::Anomaly(Some(d)) => format!("a {} anomaly episode open", d.as_str()),
            Condition::HealthBelow(h) => format!("health below {h}"),
            Condition::Query(q) => format!("query {q}"),
        }
    }
}

impl RuleSpec {
    /// The condition, or what is wrong with `when`.
    pub fn condition(&self) -> Result<Condition, String> {
        let w = &self.when;
        let given = [
            w.alarm.is_some(),
            w.anomaly.is_some(),
            w.health_below.is_some(),
            w.query.is_some(),
        ]
        .into_iter()
        .filter(|g| *g)
        .count();
        if given != 1 {
            return Err(format!(
                "when: give exactly one of alarm, anomaly, health_below, query (got {given})"
            ));
        }
        if w.alarm.is_none() && (w.state.is_some() || w.severity.is_some()) {
            return Err("when: state and severity go with alarm".into());
        }
        if let Some(pattern) = &w.alarm {
            let Some((sensor, alarm)) = pattern.rsplit_once('.').or(if pattern == "*" {
                Some(("*", "*"))
            } else {
                None
            }) else {
                return Err(format!(
                    "when.alarm: {pattern:?} is not sensor.alarm (either side may be *)"
                ));
            };
            if sensor.is_empty() || alarm.is_empty() {
                return Err(format!("when.alarm: {pattern:?} is not sensor.alarm"));
            }
            let any = |s: &str| (s != "*").then(|| s.to_owned());
            return Ok(Condition::Alarm {
                sensor: any(sensor),
                alarm: any(alarm),
                state: w.state.unwrap_or_default(),
                severity: w.severity.unwrap_or_default(),
            });
        }
        if let Some(d) = &w.anomaly {
            if d == "any" {
                return Ok(Condition::Anomaly(None));
            }
            return MACHINE_DETECTORS
                .into_iter()
                .find(|k| k.as_str() == d)
                .map(|k| Condition::Anomaly(Some(k)))
                .ok_or_else(|| {
                    format!(
                        "when.anomaly: {d:?} is no machine detector (any, multivariate, health, model)"
                    )
                });
        }
        if let Some(h) = w.health_below {
            if !(h.is_finite() && h > 0.0 && h <= 100.0) {
                return Err(format!(
                    "when.health_below: {h} is outside the health index's 0..=100"
                ));
            }
            return Ok(Condition::HealthBelow(h));
        }
        let text = w.query.as_deref().unwrap_or_default();
        Query::parse(text)
            .map(Condition::Query)
            .map_err(|e| format!("when.query: {e}"))
    }

    /// The checks of this rule for machines of type `mt` (`setpoints`: what a write to the
    /// machine may set, none listed: any), each problem prefixed with `at`.
    pub fn check(&self, at: &str, mt: Option<&MachineType>, problems: &mut Vec<String>) {
        let at = format!("{at}: rule {:?}", self.name);
        if !crate::asset::is_slug(&self.name) {
            problems.push(format!("{at}: name is not a slug"));
        }
        let condition = match self.condition() {
            Ok(c) => Some(c),
            Err(e) => {
                problems.push(format!("{at}: {e}"));
                None
            }
        };
        if let (
            Some(Condition::Alarm {
                sensor,
                alarm,
                severity,
                ..
            }),
            Some(mt),
        ) = (&condition, mt)
        {
            let found = mt.sensors.iter().any(|s| {
                sensor.as_deref().is_none_or(|n| n == s.name)
                    && s.alarms.iter().any(|a| {
                        alarm.as_deref().is_none_or(|n| n == a.name) && a.severity >= *severity
                    })
            });
            if !found {
                problems.push(format!(
                    "{at}: when.alarm: no sensor of the machine has an alarm {:?} of severity {severity} or worse",
                    self.when.alarm.as_deref().unwrap_or_default()
                ));
            }
        }
        if matches!(self.rearm, Rearm::On(RearmOn::Acknowledged))
            && !matches!(condition, Some(Condition::Alarm { .. }) | None)
        {
            problems.push(format!(
                "{at}: rearm = \"acknowledged\" needs an alarm condition (nothing else is acknowledged)"
            ));
        }
        if self.for_ms > MAX_DELAY_MS {
            problems.push(format!(
                "{at}: for_ms {} is longer than a day ({MAX_DELAY_MS})",
                self.for_ms
            ));
        }
        if let Rearm::Cooldown { cooldown_ms } = self.rearm
            && cooldown_ms > MAX_DELAY_MS
        {
            problems.push(format!(
                "{at}: rearm.cooldown_ms {cooldown_ms} is longer than a day ({MAX_DELAY_MS})"
            ));
        }
        if let Some(m) = self.max_firings
            && (m.count == 0 || m.count > MAX_FIRINGS_COUNT || m.window_ms == 0)
        {
            problems.push(format!(
                "{at}: max_firings: count must be 1..={MAX_FIRINGS_COUNT} and window_ms above 0 (got {} in {} ms)",
                m.count, m.window_ms
            ));
        }
        if self.then.write.is_none() && self.then.event.is_none() {
            problems.push(format!("{at}: then: give a write, an event, or both"));
        }
        if let Some(w) = &self.then.write {
            let value = w.value.value();
            if !value.is_finite() {
                problems.push(format!("{at}: then.write.value must be finite"));
            }
            if let Some(mt) = mt {
                check_write(&at, w, &mt.setpoints, problems);
            }
        }
    }

    /// One line on what the rule does.
    pub fn describe_action(&self) -> String {
        let mut parts = Vec::new();
        if let Some(w) = &self.then.write {
            parts.push(format!("write {} = {}", w.property, w.value.value()));
        }
        if let Some(e) = &self.then.event {
            parts.push(format!("raise a {} event", e.severity));
        }
        parts.join(" and ")
    }
}

/// A rule's write against the machine's setpoints (none listed: the connection checks it).
fn check_write(at: &str, w: &WriteAction, setpoints: &[SetpointSpec], problems: &mut Vec<String>) {
    if setpoints.is_empty() {
        return;
    }
    match setpoints.iter().find(|s| s.name == w.property) {
        None => problems.push(format!(
            "{at}: then.write.property {:?} is no setpoint of the machine (its setpoints: {})",
            w.property,
            setpoints
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        Some(sp) => {
            if let Some(why) = sp.refuses(w.value.value()) {
                problems.push(format!("{at}: then.write.value: {why}"));
            }
        }
    }
}

/// Checks a list of rules of one owner (a machine type, a line, an area) for names used
/// twice; each rule's own checks are `RuleSpec::check`.
pub fn check_names(at: &str, rules: &[RuleSpec], problems: &mut Vec<String>) {
    let mut seen = std::collections::HashSet::new();
    for r in rules {
        if !seen.insert(r.name.as_str()) {
            problems.push(format!("{at}: rule {:?} is defined twice", r.name));
        }
    }
}

/// Where a rule is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Phase {
    #[default]
    Armed,
    /// The condition holds, since `since`; it fires once it held `for_ms`.
    Pending {
        since: Timestamp,
    },
    /// Its action is on its way (since `since`): nothing re-triggers it.
    Firing {
        since: Timestamp,
    },
    /// Fired; waits for its re-arm (the condition clearing, an acknowledgment).
    Latched,
    CoolingDown {
        until: Timestamp,
    },
    /// `max_firings` reached; re-armed at `until`.
    Limited {
        until: Timestamp,
    },
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Armed => "armed",
            Phase::Pending { .. } => "pending",
            Phase::Firing { .. } => "firing",
            Phase::Latched => "latched",
            Phase::CoolingDown { .. } => "cooling-down",
            Phase::Limited { .. } => "limited",
        }
    }
}

/// What the caller does after a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    Nothing,
    /// Fire now: carry out the action (or record it, in dry-run).
    Fire,
    /// Look again at this time (a `for_ms`, a cooldown or a window ending).
    WakeAt(Timestamp),
    /// It would fire, but `max_firings` is reached: say so once; look again at `until`.
    Limited {
        until: Timestamp,
    },
}

/// A rule's state on one machine: phase, mode, firings. Kept in the machine's snapshot, so
/// a restarted twin goes on from it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RuleRun {
    pub phase: Phase,
    pub mode: RuleMode,
    /// Firings since start (dry-run ones too).
    pub firings: u64,
    /// Firings `max_firings` held back.
    pub limited: u64,
    pub last_fired: Option<Timestamp>,
    /// What the last firing did or would have done, and the PLC's answer.
    pub last_result: String,
    /// The last firing's action failed (the rule's alarm is up until it fires well or an
    /// operator acknowledges it).
    pub failed: bool,
    /// The firings inside `max_firings`' window (at most its count).
    recent: VecDeque<Timestamp>,
}

impl RuleRun {
    pub fn new(mode: RuleMode) -> RuleRun {
        RuleRun {
            mode,
            ..RuleRun::default()
        }
    }

    /// Steps the rule at `now`: `holds` says whether its condition holds, `allowed` whether
    /// the interlock (the machine's state) lets it act.
    pub fn step(&mut self, rule: &RuleSpec, holds: bool, allowed: bool, now: Timestamp) -> Step {
        if self.mode == RuleMode::Disabled {
            if !matches!(self.phase, Phase::Firing { .. }) {
                self.phase = Phase::Armed;
            }
            return Step::Nothing;
        }
        if let Phase::CoolingDown { until } | Phase::Limited { until } = self.phase {
            if now < until {
                return Step::WakeAt(until);
            }
            self.phase = Phase::Armed;
        }
        match self.phase {
            Phase::Firing { .. } => Step::Nothing,
            Phase::Latched => {
                if !holds && rule.rearm == Rearm::On(RearmOn::Cleared) {
                    self.phase = Phase::Armed;
                }
                Step::Nothing
            }
            Phase::Pending { since } => {
                if !holds {
                    self.phase = Phase::Armed;
                    return Step::Nothing;
                }
                let due = since.plus_ms(rule.for_ms as i64);
                if now < due {
                    return Step::WakeAt(due);
                }
                if allowed {
                    self.fire(rule, now)
                } else {
                    Step::Nothing
                }
            }
            Phase::Armed => {
                if !holds {
                    return Step::Nothing;
                }
                if rule.for_ms > 0 {
                    self.phase = Phase::Pending { since: now };
                    return Step::WakeAt(now.plus_ms(rule.for_ms as i64));
                }
                if allowed {
                    self.fire(rule, now)
                } else {
                    Step::Nothing
                }
            }
            Phase::CoolingDown { .. } | Phase::Limited { .. } => Step::Nothing,
        }
    }

    fn fire(&mut self, rule: &RuleSpec, now: Timestamp) -> Step {
        if let Some(max) = rule.max_firings {
            let window = i64::try_from(max.window_ms).unwrap_or(i64::MAX);
            while self
                .recent
                .front()
                .is_some_and(|t| now.millis_since(*t) >= window)
            {
                self.recent.pop_front();
            }
            if self.recent.len() >= max.count as usize {
                let until = self.recent[0].plus_ms(window);
                self.phase = Phase::Limited { until };
                self.limited += 1;
                return Step::Limited { until };
            }
            self.recent.push_back(now);
        }
        self.phase = Phase::Firing { since: now };
        self.firings += 1;
        self.last_fired = Some(now);
        Step::Fire
    }

    /// The firing's action ended at `now` (`ok`: it did what it should, `result`: what it
    /// did): latched or cooling down until the rule re-arms.
    pub fn done(&mut self, rule: &RuleSpec, ok: bool, result: String, now: Timestamp) -> Step {
        self.failed = !ok;
        self.last_result = result;
        if !matches!(self.phase, Phase::Firing { .. }) {
            return Step::Nothing;
        }
        match rule.rearm {
            Rearm::Cooldown { cooldown_ms } => {
                let until = now.plus_ms(i64::try_from(cooldown_ms).unwrap_or(i64::MAX));
                self.phase = Phase::CoolingDown { until };
                Step::WakeAt(until)
            }
            Rearm::On(_) => {
                self.phase = Phase::Latched;
                Step::Nothing
            }
        }
    }

    /// An operator acknowledged an alarm the rule watches: a rule that re-arms on
    /// acknowledgment re-arms.
    pub fn acknowledged(&mut self, rule: &RuleSpec) {
        if rule.rearm == Rearm::On(RearmOn::Acknowledged) && self.phase == Phase::Latched {
            self.phase = Phase::Armed;
        }
    }

    /// A mode switched at run time; a disabled rule is re-armed.
    pub fn set_mode(&mut self, mode: RuleMode) {
        self.mode = mode;
        if mode == RuleMode::Disabled && !matches!(self.phase, Phase::Firing { .. }) {
            self.phase = Phase::Armed;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(extra: &str) -> RuleSpec {
        let text = format!(
            "name = \"stop\"\nwhen = {{ alarm = \"*.high\" }}\nthen = {{ write = {{ property = \"run_enable\", value = false }} }}\n{extra}"
        );
        toml::from_str(&text).expect("a rule")
    }

    fn t(ms: i64) -> Timestamp {
        Timestamp(ms * 1000)
    }

    #[test]
    fn fires_once_then_latches_until_the_condition_clears() {
        let r = rule("");
        let mut run = RuleRun::new(RuleMode::Enabled);
        assert_eq!(run.step(&r, false, true, t(0)), Step::Nothing);
        assert_eq!(run.step(&r, true, true, t(1)), Step::Fire);
        // Its own write's effects find it firing, then latched.
        assert_eq!(run.step(&r, true, true, t(2)), Step::Nothing);
        assert_eq!(run.done(&r, true, "ok".into(), t(3)), Step::Nothing);
        assert_eq!(run.phase, Phase::Latched);
        assert_eq!(run.step(&r, true, true, t(4)), Step::Nothing);
        assert_eq!(run.step(&r, false, true, t(5)), Step::Nothing);
        assert_eq!(run.phase, Phase::Armed);
        assert_eq!(run.step(&r, true, true, t(6)), Step::Fire);
        assert_eq!(run.firings, 2);
    }

    #[test]
    fn for_ms_waits_and_a_clearing_condition_resets_it() {
        let r = rule("for_ms = 100");
        let mut run = RuleRun::new(RuleMode::Enabled);
        assert_eq!(run.step(&r, true, true, t(0)), Step::WakeAt(t(100)));
        assert_eq!(run.step(&r, true, true, t(50)), Step::WakeAt(t(100)));
        assert_eq!(run.step(&r, false, true, t(60)), Step::Nothing);
        assert_eq!(run.step(&r, true, true, t(70)), Step::WakeAt(t(170)));
        assert_eq!(run.step(&r, true, true, t(170)), Step::Fire);
    }

    #[test]
    fn the_interlock_holds_it_until_the_machine_is_in_an_allowed_state() {
        let r = rule("only_in_states = [\"running\"]");
        let mut run = RuleRun::new(RuleMode::Enabled);
        assert_eq!(run.step(&r, true, false, t(0)), Step::Nothing);
        assert_eq!(run.phase, Phase::Armed);
        assert_eq!(run.step(&r, true, true, t(1)), Step::Fire);
    }

    #[test]
    fn cooldown_fires_again_while_the_condition_holds_and_max_firings_limits() {
        let r = rule("rearm = { cooldown_ms = 10 }\nmax_firings = { count = 2, window_ms = 1000 }");
        let mut run = RuleRun::new(RuleMode::Enabled);
        assert_eq!(run.step(&r, true, true, t(0)), Step::Fire);
        assert_eq!(run.done(&r, true, "ok".into(), t(1)), Step::WakeAt(t(11)));
        assert_eq!(run.step(&r, true, true, t(5)), Step::WakeAt(t(11)));
        assert_eq!(run.step(&r, true, true, t(11)), Step::Fire);
        run.done(&r, true, "ok".into(), t(12));
        assert_eq!(
            run.step(&r, true, true, t(22)),
            Step::Limited { until: t(1000) }
        );
        assert_eq!(run.limited, 1);
        assert_eq!(run.step(&r, true, true, t(500)), Step::WakeAt(t(1000)));
        assert_eq!(run.step(&r, true, true, t(1000)), Step::Fire);
        assert_eq!(run.firings, 3);
    }

    #[test]
    fn acknowledged_rearms_only_on_an_acknowledgment() {
        let r = rule("rearm = \"acknowledged\"");
        let mut run = RuleRun::new(RuleMode::Enabled);
        assert_eq!(run.step(&r, true, true, t(0)), Step::Fire);
        run.done(&r, false, "refused".into(), t(1));
        assert!(run.failed);
        assert_eq!(run.step(&r, false, true, t(2)), Step::Nothing);
        assert_eq!(run.phase, Phase::Latched);
        run.acknowledged(&r);
        assert_eq!(run.step(&r, true, true, t(3)), Step::Fire);
    }

    #[test]
    fn disabled_never_fires_and_dry_run_fires_as_enabled() {
        let r = rule("");
        let mut run = RuleRun::new(RuleMode::Disabled);
        assert_eq!(run.step(&r, true, true, t(0)), Step::Nothing);
        run.set_mode(RuleMode::DryRun);
        assert_eq!(run.step(&r, true, true, t(1)), Step::Fire);
    }

    #[test]
    fn conditions_parse_and_bad_ones_say_what_is_wrong() {
        let c = rule("").condition().expect("valid");
        assert!(c.names_alarm("zone-1-temp", "high"));
        assert!(!c.names_alarm("zone-1-temp", "low"));
        let mut r = rule("");
        r.when = When {
            anomaly: Some("spike".into()),
            ..When::default()
        };
        assert!(
            r.condition()
                .expect_err("refused")
                .contains("no machine detector")
        );
        r.when = When {
            health_below: Some(40.0),
            query: Some("x > 1".into()),
            ..When::default()
        };
        assert!(r.condition().expect_err("refused").contains("exactly one"));
        r.when = When {
            query: Some("temp >".into()),
            ..When::default()
        };
        assert!(
            r.condition()
                .expect_err("refused")
                .starts_with("when.query")
        );
        r.when = When {
            alarm: Some("high".into()),
            ..When::default()
        };
        assert!(r.condition().expect_err("refused").contains("sensor.alarm"));
    }

    #[test]
    fn rearm_and_mode_read_as_written() {
        let r = rule("mode = \"dry-run\"\nrearm = { cooldown_ms = 5 }");
        assert_eq!(r.mode, RuleMode::DryRun);
        assert_eq!(r.rearm, Rearm::Cooldown { cooldown_ms: 5 });
        assert_eq!(
            rule("rearm = \"acknowledged\"").rearm.to_string(),
            "acknowledged"
        );
        let again: RuleSpec = toml::from_str(&toml::to_string(&r).expect("ser")).expect("de");
        assert_eq!(again, r);
    }
}
