//! ISA-18.2 limit alarms as a pure state machine.
//!
//! An `AlarmLimit` is the configured limit (from the plant spec); an `AlarmStatus` is its runtime
//! state, small and `Copy` so it can live in a sensor twin's snapshot and be persisted. The
//! status is driven only by `evaluate`, `acknowledge`, `shelve` and `unshelve`, each given the
//! time: nothing here reads a clock.
//!
//! Evaluation is in two stages. First the raw condition (limit plus deadband) is debounced by the
//! on/off delays into `AlarmStatus::condition`. Then the alarm state is reconciled with that
//! debounced condition. Reconciling a level rather than reacting to edges is what lets a
//! shelved alarm raise on the first evaluation after it is unshelved if the condition is still
//! there.

use std::fmt;

use crate::event::Severity;
use crate::value::Timestamp;

/// Which side of the limit is the abnormal one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitKind {
    High,
    Low,
}

impl LimitKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LimitKind::High => "high",
            LimitKind::Low => "low",
        }
    }
}

impl fmt::Display for LimitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_severity() -> Severity {
    Severity::Medium
}

/// One limit alarm on a sensor, as written in the plant spec (TOML, `deny_unknown_fields`).
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct AlarmLimit {
    /// E.g. `high`, `high-high`; unique per sensor (validated by the spec).
    pub name: String,
    pub kind: LimitKind,
    pub limit: f64,
    /// `>= 0`. A High alarm returns only when the value is below `limit - deadband`, a Low alarm
    /// only when it is above `limit + deadband`.
    #[serde(default)]
    pub deadband: f64,
    /// The condition must hold this long before the alarm raises.
    #[serde(default)]
    pub on_delay_ms: u64,
    /// The condition must be gone this long before the alarm returns.
    #[serde(default)]
    pub off_delay_ms: u64,
    #[serde(default = "default_severity")]
    pub severity: Severity,
}

impl AlarmLimit {
    /// A limit with no deadband, no delays and the default severity (medium), as a spec entry
    /// with only `name`, `kind` and `limit` would give.
    pub fn new(name: impl Into<String>, kind: LimitKind, limit: f64) -> AlarmLimit {
        AlarmLimit {
            name: name.into(),
            kind,
            limit,
            deadband: 0.0,
            on_delay_ms: 0,
            off_delay_ms: 0,
            severity: default_severity(),
        }
    }

    /// Checks the limit itself: finite limit, finite non-negative deadband. The error names the
    /// field; the caller adds where the alarm is (file, sensor, alarm name).
    pub fn validate(&self) -> Result<(), String> {
        if !self.limit.is_finite() {
            return Err(format!("limit: {} is not a finite number", self.limit));
        }
        if !self.deadband.is_finite() || self.deadband < 0.0 {
            return Err(format!(
                "deadband: {} is not a finite number >= 0",
                self.deadband
            ));
        }
        Ok(())
    }

    /// Whether `value` violates the limit, given whether the condition is currently considered
    /// on: the deadband applies only when turning off. A non-finite value never violates.
    pub fn violated(&self, value: f64, currently_on: bool) -> bool {
        match (self.kind, currently_on) {
            (LimitKind::High, false) => value > self.limit,
            (LimitKind::High, true) => value >= self.limit - self.deadband,
            (LimitKind::Low, false) => value < self.limit,
            (LimitKind::Low, true) => value <= self.limit + self.deadband,
        }
    }
}

/// ISA-18.2 alarm state (without the shelved/suppressed overlay, which `AlarmStatus` keeps
/// separately so the underlying state survives shelving).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AlarmState {
    #[default]
    Normal,
    ActiveUnacked,
    ActiveAcked,
    ReturnedUnacked,
}

impl AlarmState {
    /// In `code` order.
    pub const ALL: [AlarmState; 4] = [
        AlarmState::Normal,
        AlarmState::ActiveUnacked,
        AlarmState::ActiveAcked,
        AlarmState::ReturnedUnacked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlarmState::Normal => "normal",
            AlarmState::ActiveUnacked => "active_unacked",
            AlarmState::ActiveAcked => "active_acked",
            AlarmState::ReturnedUnacked => "returned_unacked",
        }
    }

    pub fn parse(s: &str) -> Option<AlarmState> {
        AlarmState::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_active(self) -> bool {
        matches!(self, AlarmState::ActiveUnacked | AlarmState::ActiveAcked)
    }

    pub fn is_unacked(self) -> bool {
        matches!(
            self,
            AlarmState::ActiveUnacked | AlarmState::ReturnedUnacked
        )
    }

    /// Small stable code for persistence (0 normal, 1 active unacked, 2 active acked,
    /// 3 returned unacked).
    pub fn code(self) -> u8 {
        self as u8
    }

    pub fn from_code(code: u8) -> Option<AlarmState> {
        AlarmState::ALL.get(usize::from(code)).copied()
    }
}

impl fmt::Display for AlarmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to an alarm; each becomes an alarm event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmTransition {
    /// Condition came on: -> ActiveUnacked.
    Raised,
    /// Operator acknowledged: ActiveUnacked -> ActiveAcked, or ReturnedUnacked -> Normal.
    Acknowledged,
    /// Condition went away while unacknowledged: ActiveUnacked -> ReturnedUnacked.
    ReturnedToNormal,
    /// Condition went away after acknowledgement: ActiveAcked -> Normal.
    Cleared,
    Shelved,
    Unshelved,
}

impl AlarmTransition {
    pub const ALL: [AlarmTransition; 6] = [
        AlarmTransition::Raised,
        AlarmTransition::Acknowledged,
        AlarmTransition::ReturnedToNormal,
        AlarmTransition::Cleared,
        AlarmTransition::Shelved,
        AlarmTransition::Unshelved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlarmTransition::Raised => "raised",
            AlarmTransition::Acknowledged => "acknowledged",
            AlarmTransition::ReturnedToNormal => "returned_to_normal",
            AlarmTransition::Cleared => "cleared",
            AlarmTransition::Shelved => "shelved",
            AlarmTransition::Unshelved => "unshelved",
        }
    }

    pub fn parse(s: &str) -> Option<AlarmTransition> {
        AlarmTransition::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for AlarmTransition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AckError {
    #[error("alarm is not awaiting acknowledgement (state {state})")]
    NotUnacked { state: &'static str },
}

/// Runtime state of one alarm. Small and `Copy`: it is part of a sensor twin's snapshot and is
/// persisted.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AlarmStatus {
    pub state: AlarmState,
    /// Debounced condition (after the on/off delays).
    pub condition: bool,
    /// The raw condition has differed from `condition` since then (for the delays).
    pub pending_since: Option<Timestamp>,
    pub shelved_until: Option<Timestamp>,
    /// Time of the last `state` change (shelving does not change the state).
    pub since: Timestamp,
}

/// `delay_ms` as microseconds, saturating: a delay beyond ~292k years simply never elapses.
fn delay_micros(delay_ms: u64) -> i64 {
    i64::try_from(delay_ms)
        .unwrap_or(i64::MAX)
        .saturating_mul(1000)
}

impl AlarmStatus {
    /// Feeds one value at `now`. Applies deadband and on/off delays; returns the transition if
    /// there was one. Non-finite values are ignored (no change at all).
    ///
    /// A shelve that has expired (`now >= shelved_until`) ends here: that call returns
    /// `Unshelved` (the condition is still tracked) and a later call raises if the condition is
    /// still on. While shelved the condition is tracked and the alarm may return or clear, but
    /// never raises.
    pub fn evaluate(
        &mut self,
        limit: &AlarmLimit,
        value: f64,
        now: Timestamp,
    ) -> Option<AlarmTransition> {
        if !value.is_finite() {
            return None;
        }
        let unshelved = match self.shelved_until {
            Some(until) if now >= until => {
                self.shelved_until = None;
                true
            }
            _ => false,
        };
        self.debounce(limit, value, now);
        if unshelved {
            return Some(AlarmTransition::Unshelved);
        }
        self.reconcile(now)
    }

    /// Updates the debounced `condition` from one value: a change of the raw condition must
    /// persist for the on (or off) delay, measured between successive `now`s, and any reading
    /// back on the old side restarts the timer.
    fn debounce(&mut self, limit: &AlarmLimit, value: f64, now: Timestamp) {
        let raw = limit.violated(value, self.condition);
        if raw == self.condition {
            self.pending_since = None;
            return;
        }
        let delay_ms = if raw {
            limit.on_delay_ms
        } else {
            limit.off_delay_ms
        };
        let start = *self.pending_since.get_or_insert(now);
        // Time going backwards gives a negative elapsed time: the delay then just has not passed.
        let elapsed_us = now.as_micros().saturating_sub(start.as_micros());
        if elapsed_us >= delay_micros(delay_ms) {
            self.condition = raw;
            self.pending_since = None;
        }
    }

    /// Moves the state to agree with the debounced condition, at most one step.
    fn reconcile(&mut self, now: Timestamp) -> Option<AlarmTransition> {
        let (state, transition) = match (self.state, self.condition) {
            (AlarmState::Normal | AlarmState::ReturnedUnacked, true) if !self.is_shelved(now) => {
                (AlarmState::ActiveUnacked, AlarmTransition::Raised)
            }
            (AlarmState::ActiveUnacked, false) => (
                AlarmState::ReturnedUnacked,
                AlarmTransition::ReturnedToNormal,
            ),
            (AlarmState::ActiveAcked, false) => (AlarmState::Normal, AlarmTransition::Cleared),
            _ => return None,
        };
        self.state = state;
        self.since = now;
        Some(transition)
    }

    /// Operator acknowledges: ActiveUnacked -> ActiveAcked, ReturnedUnacked -> Normal; both
    /// return `Acknowledged` (the new `state` tells which). Any other state is an error and
    /// changes nothing.
    pub fn acknowledge(&mut self, now: Timestamp) -> Result<AlarmTransition, AckError> {
        self.state = match self.state {
            AlarmState::ActiveUnacked => AlarmState::ActiveAcked,
            AlarmState::ReturnedUnacked => AlarmState::Normal,
            state @ (AlarmState::Normal | AlarmState::ActiveAcked) => {
                return Err(AckError::NotUnacked {
                    state: state.as_str(),
                });
            }
        };
        self.since = now;
        Ok(AlarmTransition::Acknowledged)
    }

    /// Shelves the alarm until `until` (replacing any earlier shelve). The alarm state is kept;
    /// see `evaluate` for what shelving suppresses. `now` does not affect the result: a shelve
    /// that has already expired ends at the next `evaluate` like any other.
    pub fn shelve(&mut self, until: Timestamp, _now: Timestamp) -> AlarmTransition {
        self.shelved_until = Some(until);
        AlarmTransition::Shelved
    }

    /// Ends a shelve early. `None` if the alarm was not shelved. An expired shelve that
    /// `evaluate` has not ended yet also counts as shelved here, so its `Unshelved` is reported
    /// exactly once either way.
    pub fn unshelve(&mut self, _now: Timestamp) -> Option<AlarmTransition> {
        self.shelved_until
            .take()
            .map(|_| AlarmTransition::Unshelved)
    }

    pub fn is_shelved(&self, now: Timestamp) -> bool {
        self.shelved_until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::AlarmTransition as T;
    use super::*;

    /// One scripted input, times in milliseconds.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        Value(i64, f64),
        Ack(i64),
        Shelve { at: i64, until: i64 },
        Unshelve(i64),
    }
    use Step::{Ack, Shelve, Unshelve, Value};

    fn values(feed: &[(i64, f64)]) -> Vec<Step> {
        feed.iter().map(|&(ms, v)| Value(ms, v)).collect()
    }

    /// Runs `steps` from a fresh status and returns every transition with its time, and the
    /// final status.
    fn run(limit: &AlarmLimit, steps: &[Step]) -> (Vec<(i64, AlarmTransition)>, AlarmStatus) {
        let mut status = AlarmStatus::default();
        let mut out = Vec::new();
        for &step in steps {
            let (ms, transition) = match step {
                Value(ms, v) => (ms, status.evaluate(limit, v, Timestamp::from_millis(ms))),
                Ack(ms) => (
                    ms,
                    Some(
                        status
                            .acknowledge(Timestamp::from_millis(ms))
                            .expect("scripted acks are valid"),
                    ),
                ),
                Shelve { at, until } => (
                    at,
                    Some(status.shelve(Timestamp::from_millis(until), Timestamp::from_millis(at))),
                ),
                Unshelve(ms) => (ms, status.unshelve(Timestamp::from_millis(ms))),
            };
            out.extend(transition.map(|t| (ms, t)));
        }
        (out, status)
    }

    fn check(
        limit: &AlarmLimit,
        steps: &[Step],
        expected: &[(i64, AlarmTransition)],
        final_state: AlarmState,
    ) {
        let (got, status) = run(limit, steps);
        assert_eq!(got, expected, "transitions for {steps:?}");
        assert_eq!(status.state, final_state, "final state for {steps:?}");
    }

    fn high(limit: f64) -> AlarmLimit {
        AlarmLimit::new("high", LimitKind::High, limit)
    }

    fn low(limit: f64) -> AlarmLimit {
        AlarmLimit::new("low", LimitKind::Low, limit)
    }

    #[test]
    fn raises_when_value_exceeds_high_limit() {
        check(
            &high(100.0),
            &values(&[(0, 50.0), (1, 100.0), (2, 100.5), (3, 120.0)]),
            &[(2, T::Raised)],
            AlarmState::ActiveUnacked,
        );
    }

    #[test]
    fn raises_when_value_falls_below_low_limit() {
        check(
            &low(10.0),
            &values(&[(0, 50.0), (1, 10.0), (2, 9.0), (3, 12.0)]),
            &[(2, T::Raised), (3, T::ReturnedToNormal)],
            AlarmState::ReturnedUnacked,
        );
    }

    #[test]
    fn acked_alarm_clears_when_condition_goes() {
        check(
            &high(100.0),
            &[Value(0, 101.0), Ack(1), Value(2, 101.0), Value(3, 99.0)],
            &[(0, T::Raised), (1, T::Acknowledged), (3, T::Cleared)],
            AlarmState::Normal,
        );
    }

    #[test]
    fn unacked_alarm_returns_then_ack_brings_it_to_normal() {
        check(
            &high(100.0),
            &[Value(0, 101.0), Value(1, 99.0), Ack(2), Value(3, 99.0)],
            &[
                (0, T::Raised),
                (1, T::ReturnedToNormal),
                (2, T::Acknowledged),
            ],
            AlarmState::Normal,
        );
    }

    #[test]
    fn returned_unacked_alarm_raises_again_when_condition_comes_back() {
        check(
            &high(100.0),
            &values(&[(0, 101.0), (1, 99.0), (2, 105.0)]),
            &[(0, T::Raised), (1, T::ReturnedToNormal), (2, T::Raised)],
            AlarmState::ActiveUnacked,
        );
    }

    #[test]
    fn ack_records_time_of_state_change() {
        let (_, status) = run(&high(100.0), &[Value(0, 101.0), Ack(7)]);
        assert_eq!(status.state, AlarmState::ActiveAcked);
        assert_eq!(status.since, Timestamp::from_millis(7));
    }

    #[test]
    fn ack_is_refused_when_nothing_awaits_acknowledgement() {
        let mut status = AlarmStatus::default();
        assert_eq!(
            status.acknowledge(Timestamp::from_millis(1)),
            Err(AckError::NotUnacked { state: "normal" })
        );
        let limit = high(100.0);
        status.evaluate(&limit, 101.0, Timestamp::from_millis(2));
        assert_eq!(
            status.acknowledge(Timestamp::from_millis(3)),
            Ok(T::Acknowledged)
        );
        let before = status;
        let err = status.acknowledge(Timestamp::from_millis(4));
        assert!(matches!(
            err,
            Err(AckError::NotUnacked {
                state: "active_acked"
            })
        ));
        assert_eq!(status, before, "a refused ack changes nothing");
        assert_eq!(
            AckError::NotUnacked { state: "normal" }.to_string(),
            "alarm is not awaiting acknowledgement (state normal)"
        );
    }

    /// Deterministic noise in [-1, 1) (a small LCG), so the test needs no RNG crate.
    fn noise(n: usize) -> Vec<f64> {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                (x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
            })
            .collect()
    }

    /// A signal that hovers at the limit with ±1 of noise, then drops well below it.
    fn hovering_signal() -> Vec<(i64, f64)> {
        let mut feed: Vec<(i64, f64)> = noise(500)
            .into_iter()
            .zip(0_i64..)
            .map(|(n, i)| (i * 100, 100.0 + n))
            .collect();
        feed.push((50_000, 90.0));
        feed
    }

    #[test]
    fn deadband_prevents_flapping_on_a_noisy_signal() {
        let feed = hovering_signal();
        let without = run(&high(100.0), &values(&feed)).0;
        assert!(
            without.len() > 50,
            "without a deadband the noise flaps the alarm ({} transitions)",
            without.len()
        );

        let limit = AlarmLimit {
            deadband: 2.0,
            ..high(100.0)
        };
        let (got, status) = run(&limit, &values(&feed));
        let first_raise = without[0].0;
        assert_eq!(
            got,
            [(first_raise, T::Raised), (50_000, T::ReturnedToNormal)]
        );
        assert_eq!(status.state, AlarmState::ReturnedUnacked);
    }

    #[test]
    fn low_deadband_holds_alarm_until_value_clears_limit_plus_deadband() {
        let limit = AlarmLimit {
            deadband: 1.0,
            ..low(10.0)
        };
        check(
            &limit,
            &values(&[(0, 9.0), (1, 10.5), (2, 11.0), (3, 11.01)]),
            &[(0, T::Raised), (3, T::ReturnedToNormal)],
            AlarmState::ReturnedUnacked,
        );
    }

    #[test]
    fn on_delay_suppresses_a_short_spike() {
        let limit = AlarmLimit {
            on_delay_ms: 2000,
            ..high(100.0)
        };
        check(
            &limit,
            &values(&[
                (0, 50.0),
                (1000, 150.0),
                (2000, 150.0),
                (2500, 50.0),
                (4000, 50.0),
            ]),
            &[],
            AlarmState::Normal,
        );
    }

    #[test]
    fn on_delay_raises_once_condition_held_for_the_whole_delay() {
        let limit = AlarmLimit {
            on_delay_ms: 2000,
            ..high(100.0)
        };
        // The dip at 1500 restarts the timer; the raise comes exactly 2000 ms after 2000.
        check(
            &limit,
            &values(&[
                (0, 150.0),
                (1500, 50.0),
                (2000, 150.0),
                (3000, 150.0),
                (3999, 150.0),
                (4000, 150.0),
            ]),
            &[(4000, T::Raised)],
            AlarmState::ActiveUnacked,
        );
    }

    #[test]
    fn off_delay_holds_alarm_until_condition_gone_for_the_whole_delay() {
        let limit = AlarmLimit {
            off_delay_ms: 1000,
            ..high(100.0)
        };
        check(
            &limit,
            &[
                Value(0, 150.0),
                Ack(100),
                Value(200, 50.0),
                Value(900, 150.0), // back on: the off timer restarts
                Value(1000, 50.0),
                Value(1999, 50.0),
                Value(2000, 50.0),
            ],
            &[(0, T::Raised), (100, T::Acknowledged), (2000, T::Cleared)],
            AlarmState::Normal,
        );
    }

    #[test]
    fn shelving_suppresses_raise_and_expiry_unshelves_then_raises() {
        check(
            &high(100.0),
            &[
                Shelve { at: 0, until: 5000 },
                Value(1000, 150.0),
                Value(4999, 150.0),
                Value(5000, 150.0),
                Value(5100, 150.0),
            ],
            &[(0, T::Shelved), (5000, T::Unshelved), (5100, T::Raised)],
            AlarmState::ActiveUnacked,
        );
    }

    #[test]
    fn shelved_alarm_that_clears_before_expiry_does_not_raise() {
        check(
            &high(100.0),
            &[
                Shelve { at: 0, until: 5000 },
                Value(1000, 150.0),
                Value(2000, 50.0),
                Value(6000, 50.0),
                Value(7000, 50.0),
            ],
            &[(0, T::Shelved), (6000, T::Unshelved)],
            AlarmState::Normal,
        );
    }

    #[test]
    fn shelved_active_alarm_can_still_clear() {
        check(
            &high(100.0),
            &[
                Value(0, 150.0),
                Ack(10),
                Shelve {
                    at: 20,
                    until: 5000,
                },
                Value(30, 50.0),
            ],
            &[
                (0, T::Raised),
                (10, T::Acknowledged),
                (20, T::Shelved),
                (30, T::Cleared),
            ],
            AlarmState::Normal,
        );
    }

    #[test]
    fn manual_unshelve_lets_next_value_raise() {
        check(
            &high(100.0),
            &[
                Shelve {
                    at: 0,
                    until: 60_000,
                },
                Value(1000, 150.0),
                Unshelve(2000),
                Unshelve(2500),
                Value(3000, 150.0),
            ],
            &[(0, T::Shelved), (2000, T::Unshelved), (3000, T::Raised)],
            AlarmState::ActiveUnacked,
        );
    }

    #[test]
    fn is_shelved_until_the_end_time() {
        let mut status = AlarmStatus::default();
        status.shelve(Timestamp::from_millis(100), Timestamp::from_millis(0));
        assert!(status.is_shelved(Timestamp::from_millis(99)));
        assert!(!status.is_shelved(Timestamp::from_millis(100)));
    }

    #[test]
    fn non_finite_values_are_ignored() {
        let limit = AlarmLimit {
            on_delay_ms: 1000,
            ..high(100.0)
        };
        let (got, status) = run(
            &limit,
            &values(&[
                (0, 150.0),
                (500, f64::NAN),
                (1000, f64::INFINITY),
                (1200, f64::NEG_INFINITY),
            ]),
        );
        assert_eq!(got, []);
        assert_eq!(status.pending_since, Some(Timestamp::from_millis(0)));

        let mut active = AlarmStatus::default();
        active.evaluate(&high(100.0), 150.0, Timestamp::from_millis(0));
        let before = active;
        assert_eq!(
            active.evaluate(&high(100.0), f64::NAN, Timestamp::from_millis(1)),
            None
        );
        assert_eq!(active, before);
    }

    #[test]
    fn time_going_backwards_does_not_satisfy_a_delay() {
        let limit = AlarmLimit {
            on_delay_ms: 1000,
            ..high(100.0)
        };
        check(
            &limit,
            &values(&[(5000, 150.0), (1000, 150.0), (5999, 150.0), (6000, 150.0)]),
            &[(6000, T::Raised)],
            AlarmState::ActiveUnacked,
        );
    }

    #[test]
    fn validate_names_the_bad_field() {
        assert_eq!(high(100.0).validate(), Ok(()));
        let err = high(f64::NAN).validate().expect_err("NaN limit is invalid");
        assert!(err.starts_with("limit:"), "{err}");
        for deadband in [-0.5, f64::INFINITY, f64::NAN] {
            let limit = AlarmLimit {
                deadband,
                ..high(100.0)
            };
            let err = limit.validate().expect_err("bad deadband is invalid");
            assert!(err.starts_with("deadband:"), "{err}");
        }
    }

    #[test]
    fn state_codes_and_names_round_trip() {
        for state in AlarmState::ALL {
            assert_eq!(AlarmState::from_code(state.code()), Some(state));
            assert_eq!(AlarmState::parse(state.as_str()), Some(state));
        }
        assert_eq!(AlarmState::from_code(4), None);
        assert_eq!(AlarmState::parse("shelved"), None);
        for t in AlarmTransition::ALL {
            assert_eq!(AlarmTransition::parse(t.as_str()), Some(t));
        }
        assert!(AlarmState::ActiveAcked.is_active() && !AlarmState::ActiveAcked.is_unacked());
        assert!(
            AlarmState::ReturnedUnacked.is_unacked() && !AlarmState::ReturnedUnacked.is_active()
        );
    }

    #[test]
    fn spec_entry_fills_defaults_and_rejects_unknown_keys() {
        let limit: AlarmLimit = toml::from_str("name = \"high\"\nkind = \"high\"\nlimit = 80.0\n")
            .expect("minimal alarm entry parses");
        assert_eq!(limit, high(80.0));
        assert_eq!(limit.severity, Severity::Medium);

        let full: AlarmLimit = toml::from_str(
            "name = \"low-low\"\nkind = \"low\"\nlimit = 2.0\ndeadband = 0.5\n\
             on_delay_ms = 1000\noff_delay_ms = 2000\nseverity = \"critical\"\n",
        )
        .expect("full alarm entry parses");
        assert_eq!(full.kind, LimitKind::Low);
        assert_eq!((full.on_delay_ms, full.off_delay_ms), (1000, 2000));
        assert_eq!(full.severity, Severity::Critical);

        let typo = toml::from_str::<AlarmLimit>(
            "name = \"h\"\nkind = \"high\"\nlimit = 1.0\ndeadbnd = 1.0\n",
        );
        assert!(typo.is_err());
    }
}
