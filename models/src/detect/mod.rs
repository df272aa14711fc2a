//! Streaming anomaly detectors: pure algorithms over source-timestamped values (no I/O, no
//! clock, no allocation per reading). The runtime's twins host them; the eval scores them
//! against the simulator's fault labels.
//!
//! Minimal version written by the machine-detector branch: only the contract's shared types
//! and `machine`. The lead merges it with the sensor engineer's (`sensor`, the shared episode
//! tracker).

pub mod machine;

/// Which detector raised an anomaly (event text and eval use `as_str`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DetectorKind {
    Level,
    RateOfChange,
    Stuck,
    Spike,
    Multivariate,
    Health,
    Model,
}

impl DetectorKind {
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
}

/// Start/end of an anomaly episode, with hysteresis (no flapping on noise): Started when the
/// score passes the threshold for the configured on-delay, Ended when it has stayed below a
/// lower release level for the off-delay.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AnomalyTransition {
    Started {
        detector: DetectorKind,
        score: f64,
    },
    Ended {
        detector: DetectorKind,
        peak: f64,
        since: crate::Timestamp,
    },
}

/// Machine state as a detector regime: 0 idle, 1 running, 2 setup, 3 down
/// (`MachineState::code`), `Regime::UNKNOWN` when the machine has not reported a state. A
/// regime change can move a sensor's level (power draw, temperature): detectors must not alarm
/// on that.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct Regime(pub u8);

impl Regime {
    pub const IDLE: Regime = Regime(0);
    pub const RUNNING: Regime = Regime(1);
    pub const SETUP: Regime = Regime(2);
    pub const DOWN: Regime = Regime(3);
    pub const UNKNOWN: Regime = Regime(255);
}

/// Why encoded detector state could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("{what}: the state ends after {len} bytes, {needed} needed")]
    Truncated {
        what: &'static str,
        needed: usize,
        len: usize,
    },
    #[error("{what}: not detector state (magic {found:02x?})")]
    Magic { what: &'static str, found: Vec<u8> },
    #[error("{what}: version {found} is not supported (this build reads version {supported})")]
    Version {
        what: &'static str,
        found: u8,
        supported: u8,
    },
    #[error("{what}: {problem}")]
    Invalid { what: &'static str, problem: String },
}
