//! Machine state and OEE (overall equipment effectiveness) math.
//!
//! `oee` is the textbook formula; `OeeTracker` turns a machine's PLC signals (a state code and
//! two cumulative part counters) into the time and counts the formula needs. Time is passed in.

use std::fmt;

use crate::value::Timestamp;

/// What a machine is doing, from its PLC state signal.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    /// No demand: not counted as planned production time.
    #[default]
    Idle,
    Running,
    /// Changeover: planned time the machine does not produce.
    Setup,
    /// Unplanned stop.
    Down,
}

impl MachineState {
    /// In `code` order.
    pub const ALL: [MachineState; 4] = [
        MachineState::Idle,
        MachineState::Running,
        MachineState::Setup,
        MachineState::Down,
    ];

    /// The PLC state code: 0 idle, 1 running, 2 setup, 3 down; anything else is `None`.
    pub fn from_code(code: i64) -> Option<MachineState> {
        MachineState::ALL.get(usize::try_from(code).ok()?).copied()
    }

    pub fn code(self) -> i64 {
        self as i64
    }

    /// Position in `ALL` and in `OeeTracker::time_in_state_ms`.
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Idle => "idle",
            MachineState::Running => "running",
            MachineState::Setup => "setup",
            MachineState::Down => "down",
        }
    }

    pub fn parse(s: &str) -> Option<MachineState> {
        MachineState::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// OEE and its three factors, each in `0.0..=1.0`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Oee {
    pub availability: f64,
    pub performance: f64,
    pub quality: f64,
    pub oee: f64,
}

/// `num / den` clamped to `0.0..=1.0`; `0.0` for a zero denominator.
fn ratio(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        (num / den).clamp(0.0, 1.0)
    } else {
        0.0
    }
}

/// The OEE formula.
///
/// - availability = `run_ms / planned_ms`
/// - performance = `ideal_cycle_ms * total_parts / run_ms`
/// - quality = `good_parts / total_parts` (1.0 when no parts were made)
/// - oee = availability × performance × quality
///
/// Each factor is clamped to `0.0..=1.0` (inconsistent inputs such as `run_ms > planned_ms` or
/// more parts than the ideal cycle allows saturate at 1.0). Zero denominators give 0.0
/// availability or performance, and a non-finite or negative ideal cycle gives 0.0
/// performance: the result is never NaN.
pub fn oee(
    planned_ms: u64,
    run_ms: u64,
    ideal_cycle_ms: f64,
    total_parts: u64,
    good_parts: u64,
) -> Oee {
    let availability = ratio(run_ms as f64, planned_ms as f64);
    let performance = if ideal_cycle_ms.is_finite() && ideal_cycle_ms > 0.0 {
        ratio(ideal_cycle_ms * total_parts as f64, run_ms as f64)
    } else {
        0.0
    };
    let quality = if total_parts == 0 {
        1.0
    } else {
        ratio(good_parts as f64, total_parts as f64)
    };
    Oee {
        availability,
        performance,
        quality,
        oee: availability * performance * quality,
    }
}

/// Accumulates a machine's time per state and its part counts from PLC signals, for OEE.
///
/// Part counters from the PLC are cumulative and may reset to 0: a counter below the last one
/// seen is taken as the parts made since the reset. The first counter value seen only sets the
/// baseline: parts made before we started watching are not ours.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OeeTracker {
    pub state: MachineState,
    /// When the current state began.
    pub state_since: Timestamp,
    /// Time accounted up to (whole milliseconds after the first signal, so sub-millisecond
    /// remainders carry over instead of being lost).
    pub last_ts: Option<Timestamp>,
    /// Indexed by `MachineState::index` (= `code`).
    pub time_in_state_ms: [u64; 4],
    pub good_parts: u64,
    pub scrap_parts: u64,
    pub last_good_counter: Option<u64>,
    pub last_scrap_counter: Option<u64>,
}

/// Parts since the `last` counter value, and remembers `counter`.
fn count_since(last: &mut Option<u64>, counter: u64) -> u64 {
    let parts = match *last {
        None => 0,
        Some(prev) if counter >= prev => counter - prev,
        // The PLC counter was reset (or wrapped): everything it shows is new.
        Some(_) => counter,
    };
    *last = Some(counter);
    parts
}

impl OeeTracker {
    /// Accounts the time since `last_ts` to the current state, then switches to `state`.
    /// Returns true if the state changed. The first signal ever seen starts the clock (and the
    /// current state) at `now`.
    pub fn on_state(&mut self, state: MachineState, now: Timestamp) -> bool {
        self.advance(now);
        let changed = state != self.state;
        if changed {
            self.state = state;
            self.state_since = now;
        }
        changed
    }

    /// A cumulative good-part counter value. Also accounts time up to `now`.
    pub fn on_good_counter(&mut self, counter: u64, now: Timestamp) {
        self.advance(now);
        let parts = count_since(&mut self.last_good_counter, counter);
        self.good_parts = self.good_parts.saturating_add(parts);
    }

    /// A cumulative scrap-part counter value. Also accounts time up to `now`.
    pub fn on_scrap_counter(&mut self, counter: u64, now: Timestamp) {
        self.advance(now);
        let parts = count_since(&mut self.last_scrap_counter, counter);
        self.scrap_parts = self.scrap_parts.saturating_add(parts);
    }

    /// Accounts the elapsed time up to `now` to the current state (no state change). The first
    /// call only starts the clock (and the current state) at `now`; time going backwards
    /// accounts nothing.
    pub fn advance(&mut self, now: Timestamp) {
        let Some(last) = self.last_ts else {
            self.last_ts = Some(now);
            self.state_since = now;
            return;
        };
        let elapsed_us = now.as_micros().saturating_sub(last.as_micros());
        let elapsed_ms = u64::try_from(elapsed_us / 1000).unwrap_or(0);
        if elapsed_ms == 0 {
            return;
        }
        let slot = &mut self.time_in_state_ms[self.state.index()];
        *slot = slot.saturating_add(elapsed_ms);
        self.last_ts = Some(last.plus_ms(i64::try_from(elapsed_ms).unwrap_or(i64::MAX)));
    }

    /// Milliseconds accounted to `state` so far.
    pub fn time_in(&self, state: MachineState) -> u64 {
        self.time_in_state_ms[state.index()]
    }

    /// Planned production time: Running + Setup + Down (Idle means no demand and is excluded).
    pub fn planned_ms(&self) -> u64 {
        [
            MachineState::Running,
            MachineState::Setup,
            MachineState::Down,
        ]
        .into_iter()
        .fold(0u64, |sum, s| sum.saturating_add(self.time_in(s)))
    }

    pub fn total_parts(&self) -> u64 {
        self.good_parts.saturating_add(self.scrap_parts)
    }

    /// OEE over everything accounted so far (call `advance` first to include time up to now):
    /// planned time = Running + Setup + Down, run time = Running.
    pub fn oee(&self, ideal_cycle_ms: f64) -> Oee {
        oee(
            self.planned_ms(),
            self.time_in(MachineState::Running),
            ideal_cycle_ms,
            self.total_parts(),
            self.good_parts,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::MachineState::{Down, Idle, Running, Setup};
    use super::*;

    const MIN: i64 = 60_000;

    fn at(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() < 1e-3
    }

    /// One PLC signal, time in milliseconds.
    #[derive(Debug, Clone, Copy)]
    enum Signal {
        State(i64, MachineState),
        Good(i64, u64),
        Scrap(i64, u64),
        Advance(i64),
    }
    use Signal::{Advance, Good, Scrap, State};

    fn check(signals: &[Signal]) -> OeeTracker {
        let mut t = OeeTracker::default();
        for &s in signals {
            match s {
                State(ms, state) => {
                    t.on_state(state, at(ms));
                }
                Good(ms, c) => t.on_good_counter(c, at(ms)),
                Scrap(ms, c) => t.on_scrap_counter(c, at(ms)),
                Advance(ms) => t.advance(at(ms)),
            }
        }
        t
    }

    #[test]
    fn textbook_shift_gives_known_factors() {
        // 480 min planned, 47 min down, ideal cycle 1 s, 19 271 parts of which 18 848 good.
        let run_ms = 433 * 60_000;
        let o = oee(480 * 60_000, run_ms, 1000.0, 19_271, 18_848);
        assert!(close(o.availability, 0.902), "{o:?}");
        assert!(close(o.performance, 19_271.0 / 25_980.0), "{o:?}");
        assert!(close(o.quality, 0.978), "{o:?}");
        assert!(close(o.oee, 0.654), "{o:?}");
        assert!(close(o.oee, o.availability * o.performance * o.quality));
    }

    #[test]
    fn tracker_reproduces_textbook_shift_from_signals() {
        let t = check(&[
            State(0, Idle),
            Good(0, 5_000), // parts from before we watched: baseline only
            Scrap(0, 40),
            State(30 * MIN, Running),
            State(230 * MIN, Down),
            State(277 * MIN, Running),
            Good(510 * MIN, 5_000 + 18_848),
            Scrap(510 * MIN, 40 + 423),
            State(510 * MIN, Idle),
            Advance(600 * MIN),
        ]);
        assert_eq!(t.time_in(Running), 433 * 60_000);
        assert_eq!(t.time_in(Down), 47 * 60_000);
        assert_eq!(t.time_in(Idle), 120 * 60_000);
        assert_eq!(t.planned_ms(), 480 * 60_000);
        assert_eq!((t.good_parts, t.scrap_parts), (18_848, 423));
        let o = t.oee(1000.0);
        assert_eq!(o, oee(480 * 60_000, 433 * 60_000, 1000.0, 19_271, 18_848));
    }

    #[test]
    fn performance_is_capped_at_one() {
        let o = oee(1000, 1000, 10.0, 500, 500);
        assert_eq!(o.performance, 1.0);
        assert_eq!(o.oee, 1.0);
    }

    #[test]
    fn zero_inputs_give_zero_not_nan() {
        let o = oee(0, 0, 1000.0, 0, 0);
        assert_eq!(
            o,
            Oee {
                availability: 0.0,
                performance: 0.0,
                quality: 1.0,
                oee: 0.0
            }
        );
        for ideal in [f64::NAN, f64::INFINITY, -1.0, 0.0] {
            let o = oee(1000, 500, ideal, 10, 9);
            assert_eq!(o.performance, 0.0, "ideal cycle {ideal}");
            assert!(!o.oee.is_nan());
        }
        let o = OeeTracker::default().oee(1000.0);
        assert!(!o.availability.is_nan() && !o.performance.is_nan() && !o.oee.is_nan());
    }

    #[test]
    fn first_counter_value_is_only_a_baseline() {
        let t = check(&[Good(0, 1_234), Scrap(0, 56)]);
        assert_eq!((t.good_parts, t.scrap_parts), (0, 0));
        let t = check(&[Good(0, 1_234), Good(1, 1_240), Good(2, 1_240)]);
        assert_eq!(t.good_parts, 6);
        assert_eq!(t.last_good_counter, Some(1_240));
    }

    #[test]
    fn counter_reset_counts_parts_since_the_reset() {
        let t = check(&[
            Good(0, 100),
            Good(1, 150), // +50
            Good(2, 3),   // PLC reset, then 3 made
            Good(3, 10),  // +7
            Scrap(0, 9),
            Scrap(1, 0), // reset, none made
            Scrap(2, 2), // +2
        ]);
        assert_eq!(t.good_parts, 60);
        assert_eq!(t.scrap_parts, 2);
    }

    #[test]
    fn time_is_accounted_to_the_state_it_was_spent_in() {
        let mut t = OeeTracker::default();
        assert!(t.on_state(Running, at(1_000)));
        assert_eq!(t.state_since, at(1_000));
        assert!(
            !t.on_state(Running, at(3_000)),
            "same state is not a change"
        );
        assert_eq!(t.state_since, at(1_000));
        assert!(t.on_state(Setup, at(4_000)));
        t.advance(at(4_500));
        assert!(t.on_state(Down, at(5_000)));
        assert!(t.on_state(Idle, at(5_250)));
        assert_eq!(t.time_in_state_ms, [0, 3_000, 1_000, 250]);
        assert_eq!(t.state, Idle);
        assert_eq!(t.state_since, at(5_250));
    }

    #[test]
    fn first_state_starts_the_clock_even_when_unchanged() {
        let mut t = OeeTracker::default();
        assert!(!t.on_state(Idle, at(10_000)), "idle is already the default");
        assert_eq!(t.state_since, at(10_000));
        t.on_state(Running, at(12_000));
        assert_eq!(t.time_in(Idle), 2_000);
    }

    #[test]
    fn time_going_backwards_accounts_nothing() {
        let t = check(&[
            State(10_000, Running),
            Advance(5_000),
            Advance(11_000),
            State(9_000, Down),
            Advance(12_000),
        ]);
        assert_eq!(t.time_in(Running), 1_000);
        assert_eq!(t.time_in(Down), 1_000);
        assert_eq!(t.last_ts, Some(at(12_000)));
    }

    #[test]
    fn sub_millisecond_steps_are_not_lost() {
        let mut t = OeeTracker::default();
        t.on_state(Running, Timestamp(0));
        for i in 1..=4_000 {
            t.advance(Timestamp(i * 600)); // every 0.6 ms
        }
        assert_eq!(t.time_in(Running), 2_400);
    }

    #[test]
    fn state_codes_and_names_round_trip() {
        for s in MachineState::ALL {
            assert_eq!(MachineState::from_code(s.code()), Some(s));
            assert_eq!(MachineState::parse(s.as_str()), Some(s));
        }
        assert_eq!(MachineState::from_code(-1), None);
        assert_eq!(MachineState::from_code(4), None);
        assert_eq!(MachineState::parse("stopped"), None);
    }
}
