//! Streaming anomaly detectors: what the twins run on every reading (sensor detectors) and on
//! every machine evaluation (machine detectors), and the pieces they share: which detector
//! spoke ([`DetectorKind`]), anomaly episodes with hysteresis ([`EpisodeTracker`]), the
//! machine state as a regime ([`Regime`]) and the versioned state codec ([`DecodeError`]).
//!
//! Every detector is a pure streaming algorithm: no I/O, no clock (time is the readings'
//! source timestamps), no allocation per update, O(1) time and memory per update, and the
//! same inputs give the same outputs. Non-finite inputs are ignored, never learned.
//!
//! Scores are dimensionless and comparable: each detector scales its raw statistic so that
//! its own alarm line lands on the configured `threshold` (3 by default), so `score > 3`
//! reads "anomalous" whichever detector produced it.

pub mod machine;
pub mod sensor;

use crate::value::Timestamp;

/// Which detector raised an anomaly (event text and evaluation use `as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DetectorKind {
    /// The value left its learned level (EWMA mean/variance z-score).
    #[default]
    Level,
    /// The value moves faster than it learned to.
    RateOfChange,
    /// A sensor that normally varies repeats the same value.
    Stuck,
    /// One sample far off its neighbours.
    Spike,
    Multivariate,
    Health,
    Model,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 7] = [
        DetectorKind::Level,
        DetectorKind::RateOfChange,
        DetectorKind::Stuck,
        DetectorKind::Spike,
        DetectorKind::Multivariate,
        DetectorKind::Health,
        DetectorKind::Model,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DetectorKind::Level => "level",
            DetectorKind::RateOfChange => "rate_of_change",
            DetectorKind::Stuck => "stuck",
            DetectorKind::Spike => "spike",
            DetectorKind::Multivariate => "multivariate",
            DetectorKind::Health => "health",
            DetectorKind::Model => "model",
        }
    }

    /// `as_str`'s inverse.
    pub fn parse(s: &str) -> Option<DetectorKind> {
        DetectorKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// Stable code in encoded detector state.
    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<DetectorKind> {
        DetectorKind::ALL.get(usize::from(code)).copied()
    }
}

/// Start/end of an anomaly episode, with hysteresis (no flapping on noise): `Started` when
/// the score passes the threshold for the configured on-delay, `Ended` when it has stayed
/// below a lower release level for the off-delay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnomalyTransition {
    Started {
        detector: DetectorKind,
        score: f64,
    },
    Ended {
        detector: DetectorKind,
        /// Highest score of the episode.
        peak: f64,
        /// When the episode started.
        since: Timestamp,
    },
}

/// Machine state as a detector regime: 0 idle, 1 running, 2 setup, 3 down
/// (`MachineState::code`), `Regime::UNKNOWN` when the machine has not reported a state. A
/// regime change can move a sensor's level (power draw, temperature): detectors must not
/// alarm on that.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Regime(pub u8);

impl Regime {
    pub const IDLE: Regime = Regime(0);
    pub const RUNNING: Regime = Regime(1);
    pub const SETUP: Regime = Regime(2);
    pub const DOWN: Regime = Regime(3);
    pub const UNKNOWN: Regime = Regime(255);
    /// The machine's state at the reading's time is no longer known: the reading is older
    /// than the state changes its machine still remembers (its twin lags far behind). Not
    /// judged: a run of an idle machine's constant values judged in another regime would be
    /// a false stuck alarm.
    pub const LATE: Regime = Regime(254);
    /// Regimes a detector keeps apart: the four machine states, and everything else.
    pub const SLOTS: usize = 5;

    /// Index of the regime's learned statistics: the state code for the four machine
    /// states, the last slot for unknown (and codes no state has).
    pub fn slot(self) -> usize {
        match self.0 {
            c @ 0..=3 => usize::from(c),
            _ => Regime::SLOTS - 1,
        }
    }
}

/// Why encoded detector state cannot be restored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: encoded state is empty")]
    Empty { what: &'static str },
    #[error("{what}: encoded state version {found} is not supported (this build reads {expected})")]
    Version {
        what: &'static str,
        found: u8,
        expected: u8,
    },
    #[error("{what}: encoded state is {found} bytes, expected {expected}")]
    Length {
        what: &'static str,
        found: usize,
        expected: usize,
    },
    #[error("{what}: field {field}: {problem}")]
    Field {
        what: &'static str,
        field: &'static str,
        problem: String,
    },
    #[error("{what}: the state ends after {len} bytes, {needed} needed")]
    Truncated {
        what: &'static str,
        needed: usize,
        len: usize,
    },
    #[error("{what}: not detector state (magic {found:02x?})")]
    Magic { what: &'static str, found: Vec<u8> },
    #[error("{what}: {problem}")]
    Invalid { what: &'static str, problem: String },
}

/// When an episode starts and ends: `threshold` and `release` on the score scale
/// (`release < threshold` is the hysteresis band), delays in source time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hysteresis {
    pub threshold: f64,
    pub release: f64,
    pub on_delay_ms: u64,
    pub off_delay_ms: u64,
}

/// The episode state machine every detector shares: at most one episode at a time, named by
/// the detector whose score started it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EpisodeTracker {
    /// Source time since the score is at or over the threshold (not active), `i64::MIN` if not.
    above_since: i64,
    /// Source time since the score is under the release level (active), `i64::MIN` if not.
    below_since: i64,
    /// Start of the active episode, `i64::MIN` when none.
    started: i64,
    peak: f64,
    detector: DetectorKind,
}

const NONE_TS: i64 = i64::MIN;

impl EpisodeTracker {
    pub fn new() -> EpisodeTracker {
        EpisodeTracker {
            above_since: NONE_TS,
            below_since: NONE_TS,
            started: NONE_TS,
            peak: 0.0,
            detector: DetectorKind::Level,
        }
    }

    /// The detector of the episode in progress, if any.
    pub fn active(&self) -> Option<DetectorKind> {
        (self.started != NONE_TS).then_some(self.detector)
    }

    /// Feeds one score at `ts`; `detector` is the one that produced it (named in `Started`).
    /// A non-finite score counts as 0. Time going backwards counts as no time passing.
    pub fn update(
        &mut self,
        h: &Hysteresis,
        ts: Timestamp,
        score: f64,
        detector: DetectorKind,
    ) -> Option<AnomalyTransition> {
        let score = if score.is_finite() { score } else { 0.0 };
        let ts = ts.0;
        let held = |since: i64, delay_ms: u64| {
            let delay_us = i64::try_from(delay_ms.saturating_mul(1000)).unwrap_or(i64::MAX);
            ts.saturating_sub(since) >= delay_us
        };
        if self.started == NONE_TS {
            if score < h.threshold {
                self.above_since = NONE_TS;
                return None;
            }
            if self.above_since == NONE_TS || self.above_since > ts {
                self.above_since = ts;
            }
            if !held(self.above_since, h.on_delay_ms) {
                return None;
            }
            self.started = ts;
            self.above_since = NONE_TS;
            self.below_since = NONE_TS;
            self.peak = score;
            self.detector = detector;
            return Some(AnomalyTransition::Started { detector, score });
        }
        self.peak = self.peak.max(score);
        if score >= h.release {
            self.below_since = NONE_TS;
            return None;
        }
        if self.below_since == NONE_TS || self.below_since > ts {
            self.below_since = ts;
        }
        if !held(self.below_since, h.off_delay_ms) {
            return None;
        }
        let ended = AnomalyTransition::Ended {
            detector: self.detector,
            peak: self.peak,
            since: Timestamp(self.started),
        };
        *self = EpisodeTracker::new();
        Some(ended)
    }

    pub(crate) const ENCODED_LEN: usize = 8 * 4 + 1;

    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        for v in [self.above_since, self.below_since, self.started] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.peak.to_le_bytes());
        out.push(self.detector.code());
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<EpisodeTracker, DecodeError> {
        let above_since = r.i64()?;
        let below_since = r.i64()?;
        let started = r.i64()?;
        let peak = r.f64_nonneg("episode peak")?;
        let code = r.u8()?;
        let detector = DetectorKind::from_code(code)
            .ok_or_else(|| r.bad("episode detector", format!("unknown detector code {code}")))?;
        Ok(EpisodeTracker {
            above_since,
            below_since,
            started,
            peak,
            detector,
        })
    }
}

/// Reads fixed-size little-endian fields from encoded state whose length was checked.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    /// Checks the version byte and the total length.
    pub(crate) fn new(
        bytes: &'a [u8],
        what: &'static str,
        version: u8,
        len: usize,
    ) -> Result<Reader<'a>, DecodeError> {
        let Some(&found) = bytes.first() else {
            return Err(DecodeError::Empty { what });
        };
        if found != version {
            return Err(DecodeError::Version {
                what,
                found,
                expected: version,
            });
        }
        if bytes.len() != len {
            return Err(DecodeError::Length {
                what,
                found: bytes.len(),
                expected: len,
            });
        }
        Ok(Reader {
            bytes,
            pos: 1,
            what,
        })
    }

    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        // The length was checked against the layout in `new`; a short read means the layout
        // and its length constant disagree, a bug caught by the round-trip tests.
        let end = (self.pos + N).min(self.bytes.len());
        a[..end - self.pos].copy_from_slice(&self.bytes[self.pos..end]);
        self.pos = end;
        a
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()[0])
    }

    pub(crate) fn bool(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(self.bad(field, format!("{b} is not a bool"))),
        }
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()))
    }

    pub(crate) fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take()))
    }

    pub(crate) fn f64(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        let v = f64::from_le_bytes(self.take());
        if v.is_finite() {
            Ok(v)
        } else {
            Err(self.bad(field, format!("{v} is not finite")))
        }
    }

    pub(crate) fn f64_nonneg(&mut self, field: &'static str) -> Result<f64, DecodeError> {
        let v = self.f64(field)?;
        if v >= 0.0 {
            Ok(v)
        } else {
            Err(self.bad(field, format!("{v} is negative")))
        }
    }

    pub(crate) fn bad(&self, field: &'static str, problem: String) -> DecodeError {
        DecodeError::Field {
            what: self.what,
            field,
            problem,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Hysteresis = Hysteresis {
        threshold: 3.0,
        release: 2.0,
        on_delay_ms: 2000,
        off_delay_ms: 5000,
    };

    fn feed(t: &mut EpisodeTracker, scores: &[f64]) -> Vec<(usize, AnomalyTransition)> {
        scores
            .iter()
            .enumerate()
            .filter_map(|(i, &s)| {
                t.update(
                    &H,
                    Timestamp::from_millis(i as i64 * 1000),
                    s,
                    DetectorKind::Spike,
                )
                .map(|tr| (i, tr))
            })
            .collect()
    }

    #[test]
    fn episode_starts_after_the_on_delay_and_ends_after_the_off_delay() {
        let mut t = EpisodeTracker::new();
        let mut scores = vec![0.0, 4.0, 4.0, 4.0, 5.0];
        scores.extend([1.0; 10]);
        let tr = feed(&mut t, &scores);
        assert_eq!(tr.len(), 2, "{tr:?}");
        assert_eq!(
            tr[0],
            (
                3,
                AnomalyTransition::Started {
                    detector: DetectorKind::Spike,
                    score: 4.0
                }
            )
        );
        assert_eq!(
            tr[1],
            (
                10,
                AnomalyTransition::Ended {
                    detector: DetectorKind::Spike,
                    peak: 5.0,
                    since: Timestamp::from_millis(3000)
                }
            )
        );
        assert_eq!(t.active(), None);
    }

    #[test]
    fn score_wavering_between_release_and_threshold_does_not_flap() {
        let mut t = EpisodeTracker::new();
        let scores: Vec<f64> = (0..200)
            .map(|i| match i {
                0..4 => 4.0,
                _ if i % 2 == 0 => 3.5,
                _ => 2.1,
            })
            .collect();
        let tr = feed(&mut t, &scores);
        assert_eq!(tr.len(), 1, "one start, no end: {tr:?}");
        // Under the threshold but over release between the dips: never starts.
        let mut t = EpisodeTracker::new();
        let scores: Vec<f64> = (0..200)
            .map(|i| if i % 3 == 0 { 3.5 } else { 2.5 })
            .collect();
        assert!(feed(&mut t, &scores).is_empty());
    }

    #[test]
    fn regime_slots_separate_states_and_lump_unknown_codes() {
        assert_eq!(Regime(1).slot(), 1);
        assert_eq!(Regime::UNKNOWN.slot(), Regime::SLOTS - 1);
        assert_eq!(Regime(9).slot(), Regime::SLOTS - 1);
    }

    #[test]
    fn detector_names_round_trip() {
        for k in DetectorKind::ALL {
            assert_eq!(DetectorKind::parse(k.as_str()), Some(k));
            assert_eq!(DetectorKind::from_code(k.code()), Some(k));
        }
    }
}
