//! Limits and timings of twins (the `[twins]` section of the runtime config), and the clock
//! rules derived from them that the router applies before a twin does.

/// Limits and timings of twins (the `[twins]` section of the runtime config).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TwinSettings {
    /// Readings whose source timestamp is further ahead of the server clock are rejected.
    pub max_future_skew_ms: i64,
    /// A parent publishes its roll-up at most this often.
    pub rollup_debounce_ms: u64,
    /// Restart budget: at most `max_restarts` restarts of one child within `restart_window_ms`,
    /// then the parent fails too (escalation, as in OTP).
    pub max_restarts: usize,
    pub restart_window_ms: u64,
    /// Readings per history chunk, and the age at which a partial chunk is written anyway.
    pub history_chunk_points: usize,
    pub history_chunk_max_age_ms: i64,
    /// A twin raises at most one `rejected` event per this interval; the others are counted
    /// into the next one.
    pub reject_event_interval_ms: i64,
    /// A reading older than the live value by at most this much is late (history only);
    /// further back, the source's clock went back and the reading is taken as current.
    pub clock_step_back_ms: i64,
    /// Machines run their detectors about this often, in source time.
    pub inference_interval_ms: i64,
}

impl Default for TwinSettings {
    fn default() -> Self {
        TwinSettings {
            max_future_skew_ms: 5_000,
            rollup_debounce_ms: 200,
            max_restarts: 5,
            restart_window_ms: 10_000,
            history_chunk_points: 64,
            history_chunk_max_age_ms: 10_000,
            reject_event_interval_ms: 10_000,
            clock_step_back_ms: 60_000,
            inference_interval_ms: 1_000,
        }
    }
}

/// What a machine state reading's timestamp must satisfy to go on its sample board: the
/// same as the machine twin applies, so a state the twin refuses cannot steer detectors.
#[derive(Debug, Clone, Copy)]
pub struct ClockRules {
    pub max_future_skew_ms: i64,
    pub clock_step_back_ms: i64,
}

impl ClockRules {
    pub fn of(t: &TwinSettings) -> ClockRules {
        ClockRules {
            max_future_skew_ms: t.max_future_skew_ms,
            clock_step_back_ms: t.clock_step_back_ms,
        }
    }
}

impl Default for ClockRules {
    fn default() -> ClockRules {
        ClockRules::of(&TwinSettings::default())
    }
}
