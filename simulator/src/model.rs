//! The plant in motion: machine state machines, sensor signal models and random faults, all
//! advanced in simulated time by `PlantSim::step`.
//!
//! Determinism: each machine owns a ChaCha8 stream seeded from the plant seed and a stable
//! (FNV-1a) hash of its path, and draws from it only for its own events, in time order.
//! Per-sample noise is not drawn from a stream but hashed from (sensor key, sample number):
//! it needs no state, costs a few nanoseconds, and makes a sample's noise independent of how
//! `step` calls are spaced. So the same spec and seed give the same readings for any step
//! schedule that does not trigger the catch-up bound.
//!
//! The sensor faults added later (dropout, sensor bias) draw from a second per-machine stream
//! (`MachineSim::sensor_fault_rng`), so adding them left every draw of the first stream, and so
//! the other faults, machine states and counters of a seed, where they were.

use std::collections::HashMap;
use std::f64::consts::TAU;
use std::ops::Range;

use ferrotwin_models::alarm::LimitKind;
use ferrotwin_models::oee::MachineState;
use ferrotwin_models::spec::{AssetKind, PlantSpec, SensorKind, SensorSpec};
use ferrotwin_models::{AssetId, AssetPath, Level, Property, Reading, Timestamp, Value, ValueType};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::scenario::Scenario;

/// A step that jumps further than this many periods emits only the last this-many periods of
/// each sensor; older machine state and counter changes are coalesced into one reading each.
pub const MAX_CATCH_UP_PERIODS: i64 = 10;

/// Mean time between fault starts per machine, in seconds of simulated time.
const OVERHEAT_MEAN_S: f64 = 3600.0;
const SPIKE_MEAN_S: f64 = 1800.0;
const STUCK_MEAN_S: f64 = 6.0 * 3600.0;
const BREAKDOWN_MEAN_S: f64 = 12.0 * 3600.0;
const BEARING_MEAN_S: f64 = 48.0 * 3600.0;
/// Rare enough that a test watching a small plant for minutes seldom sees a sensor vanish.
const DROPOUT_MEAN_S: f64 = 12.0 * 3600.0;
const BIAS_MEAN_S: f64 = 24.0 * 3600.0;
/// A dropout lasts 30 s – 5 min: long enough for every consumer to see the sensor go stale
/// (generated sensors are stale after 3 periods of 1 s).
const DROPOUT_S: (f64, f64) = (30.0, 300.0);
/// A miscalibration lasts 10 min – 1 h.
const BIAS_S: (f64, f64) = (600.0, 3600.0);
/// Bias magnitude as a fraction of the sensor's range: small enough to look plausible (a
/// healthy temperature stays under its high alarm limit), large enough for a detector that
/// compares a sensor with its history or its neighbours to find.
const BIAS_SPAN: (f64, f64) = (0.02, 0.05);
/// Seeds a machine's sensor-fault stream apart from its main stream ("sensflt").
const SENSOR_FAULT_STREAM: u64 = 0x0073_656e_7366_6c74;

const SCRAP_RATE: f64 = 0.02;
const SCRAP_RATE_OVERHEATING: f64 = 0.15;
const SETUP_AFTER_IDLE: f64 = 0.08;
/// Vibration grows to `1 + BEARING_GAIN × wear` times its healthy level; a failing bearing
/// (wear 1) is at 5×, past the alarm limit that healthy machines stay at a third of.
const BEARING_GAIN: f64 = 4.0;
/// A scheduled overheating pushes its temperature this far over the high alarm limit: the
/// middle of the random faults' 4–12, and fixed so a scenario draws nothing from the machine's
/// stream (its random faults stay where they were).
const PLANNED_OVERHEAT_EXCESS: f64 = 8.0;

const NEVER: i64 = i64::MAX;
const US: f64 = 1e6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// A temperature pushed over its high alarm limit for 30–120 s (label on the sensor).
    Overheating,
    /// Vibration rising over hours until the machine breaks down (label on the machine).
    BearingWear,
    /// A sensor repeating its last value for minutes (label on the sensor).
    StuckSensor,
    /// One outlier sample (label on the sensor, `end == start`).
    Spike,
    /// The machine is Down until repaired (label on the machine).
    Breakdown,
    /// The machine's PLC is unreachable: none of its readings arrive for the window (label
    /// on the machine). Only scheduled, never drawn at random.
    NetworkLoss,
    /// A sensor stops reporting for 30 s – 5 min, then resumes (label on the sensor): no
    /// readings at all, so consumers see it go stale; its PLC status bit reads bad.
    Dropout,
    /// A sensor reads its true value plus a constant offset of 2–5 % of its range (sign from
    /// the seed) for 10 min – 1 h, then true again (label on the sensor). A miscalibration:
    /// the values look plausible and the PLC does not flag the sensor.
    SensorBias,
}

impl FaultKind {
    pub const ALL: [FaultKind; 8] = [
        FaultKind::Overheating,
        FaultKind::BearingWear,
        FaultKind::StuckSensor,
        FaultKind::Spike,
        FaultKind::Breakdown,
        FaultKind::NetworkLoss,
        FaultKind::Dropout,
        FaultKind::SensorBias,
    ];

    /// The name used in scenario and label files (`as_str`'s inverse).
    pub fn parse(s: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::Overheating => "overheating",
            FaultKind::BearingWear => "bearing_wear",
            FaultKind::StuckSensor => "stuck_sensor",
            FaultKind::Spike => "spike",
            FaultKind::Breakdown => "breakdown",
            FaultKind::NetworkLoss => "network_loss",
            FaultKind::Dropout => "dropout",
            FaultKind::SensorBias => "sensor_bias",
        }
    }
}

/// Ground truth of one fault; `end` is `None` while it lasts.
#[derive(Debug, Clone, PartialEq)]
pub struct FaultLabel {
    pub asset: AssetPath,
    pub kind: FaultKind,
    pub start: Timestamp,
    pub end: Option<Timestamp>,
}

/// What a machine's PLC knows about its health, for its status registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MachineStatus {
    pub machine: AssetId,
    /// A fault of the machine or one of its sensors that its PLC can know of is in progress:
    /// every kind but `sensor_bias` (a miscalibrated sensor looks healthy to its PLC).
    pub fault_active: bool,
    /// Bit `k`: the machine's `k`-th sensor reads bad (stuck, dropped out, or not reported
    /// during a network loss); sensors past 64 are not represented. A biased sensor does not.
    pub bad_sensors: u64,
    pub run_enabled: bool,
}

/// The simulated plant: every machine and sensor of a spec, with their physical state.
pub struct PlantSim {
    machines: Vec<MachineSim>,
    /// Grouped by machine (`MachineSim::sensors`), in spec order.
    sensors: Vec<SensorSim>,
    machine_paths: Vec<AssetPath>,
    sensor_paths: Vec<AssetPath>,
    faults: Vec<FaultLabel>,
    now: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Model {
    Temperature,
    Vibration,
    Speed,
    Power,
    /// Pressure and flow: a nominal level with noise.
    Level,
    Generic,
}

struct SensorSim {
    id: AssetId,
    model: Model,
    value_type: ValueType,
    period_us: i64,
    next_due: i64,
    last_due: i64,
    lo: f64,
    hi: f64,
    /// Per model: temperature reference (high limit or max), healthy running vibration,
    /// speed setpoint, nominal level; unused for power and generic.
    level: f64,
    /// Generic: sine period in seconds.
    sine_period_s: f64,
    high_limit: f64,
    /// Lag factor for one nominal period.
    alpha: f64,
    tau_s: f64,
    value: f64,
    drift: f64,
    /// Overheating offset on top of the thermal model.
    excess: f64,
    /// While overheating: the value the temperature is pushed to; NaN otherwise.
    fault_target: f64,
    noise_key: u64,
    sample: u64,
    stuck: bool,
    spike: bool,
    /// Dropped out: sampled (its physics goes on) but not reported.
    dropped: bool,
    /// Miscalibration added to what it reports; 0 when calibrated.
    bias: f64,
    last_out: f64,
    /// Speed: the machine's speed setpoint as a fraction of nominal (1.0 = 100 %).
    speed_factor: f64,
}

struct Active {
    sensor: usize,
    until: i64,
    label: usize,
}

/// A scenario's fault, resolved to this plant's indices.
#[derive(Debug, Clone, Copy)]
struct Planned {
    at: i64,
    duration_us: i64,
    kind: FaultKind,
    /// Global sensor index for the sensor kinds; `None` for the machine kinds.
    sensor: Option<usize>,
}

/// A network loss in progress: the machine's readings are held back until `until`.
struct Outage {
    until: i64,
    label: usize,
}

struct MachineSim {
    id: AssetId,
    index: usize,
    rng: ChaCha8Rng,
    sensors: Range<usize>,
    ideal_cycle_ms: f64,
    /// Speed setpoint in percent of nominal: scales the cycle time; 0 stops production.
    speed_pct: u16,
    /// False: the machine is held idle (the run-enable coil); it leaves Down and finishes
    /// setup into idle, and does not run until enabled again.
    run_enabled: bool,
    state: MachineState,
    state_until: i64,
    next_part: i64,
    good: i64,
    scrap: i64,
    wear_since: i64,
    wear_per_us: f64,
    bearing_label: Option<usize>,
    next_bearing: i64,
    next_overheat: i64,
    overheat: Option<Active>,
    next_spike: i64,
    next_stuck: i64,
    stuck: Option<Active>,
    next_breakdown: i64,
    breakdown_label: Option<usize>,
    next_event: i64,
    /// Machine readings older than the catch-up window are coalesced: these say which
    /// properties changed and when last.
    dirty_state: bool,
    dirty_counts: bool,
    dirty_ts: i64,
    window_us: i64,
    /// Multiplies the rate of every fault kind (1.0 = the documented means).
    fault_rate: f64,
    /// False: no fault is drawn at random (`next_*` stay `NEVER`), only `planned` ones happen.
    random_faults: bool,
    /// Scheduled faults in time order; `next_planned` is the first not yet started.
    planned: Vec<Planned>,
    next_planned: usize,
    outage: Option<Outage>,
    /// Draws the random dropouts and biases, and only them (see the module comment).
    sensor_fault_rng: ChaCha8Rng,
    next_dropout: i64,
    dropout: Option<Active>,
    next_bias: i64,
    bias: Option<Active>,
}

/// FNV-1a 64: stable across runs and platforms, unlike std's randomly keyed hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// SplitMix64 finaliser: a counter-based source of 64 random bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Approximately standard normal from 64 bits: the sum of four 16-bit uniforms (Irwin–Hall),
/// centred and scaled to unit variance; bounded to ±3.46, which keeps noise from ever
/// reaching an alarm limit on its own.
fn normal(h: u64) -> f64 {
    let sum = (h & 0xffff) + ((h >> 16) & 0xffff) + ((h >> 32) & 0xffff) + (h >> 48);
    (sum as f64 / 65536.0 - 2.0) * 3f64.sqrt()
}

fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

fn exp_us(rng: &mut ChaCha8Rng, mean_s: f64) -> i64 {
    let u: f64 = rng.random();
    ((-mean_s * (1.0 - u).ln() * US) as i64).max(1000)
}

fn uniform_us(rng: &mut ChaCha8Rng, lo_s: f64, hi_s: f64) -> i64 {
    (rng.random_range(lo_s..hi_s) * US) as i64
}

/// The offset of a scheduled bias on a sensor with `noise_key` starting at `t`: magnitude and
/// sign hashed from both, so a scenario draws nothing from any stream and the same scenario
/// and seed give the same offset.
fn planned_bias(noise_key: u64, t: i64, span: f64) -> f64 {
    let h = mix(noise_key ^ mix(t as u64 ^ SENSOR_FAULT_STREAM));
    let magnitude = span * (BIAS_SPAN.0 + (BIAS_SPAN.1 - BIAS_SPAN.0) * unit(h));
    if h & 1 == 0 { magnitude } else { -magnitude }
}

fn default_range(kind: SensorKind) -> (f64, f64) {
    match kind {
        SensorKind::Temperature => (0.0, 150.0),
        SensorKind::Vibration => (0.0, 50.0),
        SensorKind::Speed => (0.0, 3000.0),
        SensorKind::Pressure => (0.0, 10.0),
        SensorKind::Power | SensorKind::Flow | SensorKind::Generic => (0.0, 100.0),
    }
}

impl SensorSim {
    fn new(id: AssetId, spec: &SensorSpec, noise_key: u64) -> SensorSim {
        let (dlo, dhi) = default_range(spec.kind);
        let (lo, hi) = match (spec.min, spec.max) {
            (Some(lo), Some(hi)) => (lo, hi),
            (Some(lo), None) => (lo, lo + (dhi - dlo)),
            (None, Some(hi)) => (hi - (dhi - dlo), hi),
            (None, None) => (dlo, dhi),
        };
        let span = hi - lo;
        let limit = |kind: LimitKind| {
            spec.alarms
                .iter()
                .filter(|a| a.kind == kind)
                .map(|a| a.limit)
                .reduce(|a, b| match kind {
                    LimitKind::High => a.min(b),
                    LimitKind::Low => a.max(b),
                })
        };
        let (high, low) = (limit(LimitKind::High), limit(LimitKind::Low));
        let (model, tau_s, level) = match spec.kind {
            SensorKind::Temperature => (Model::Temperature, 90.0, high.unwrap_or(hi).min(hi)),
            SensorKind::Vibration => (
                Model::Vibration,
                2.0,
                high.map_or(0.06 * span, |h| 0.3 * (h - lo)),
            ),
            SensorKind::Speed => (Model::Speed, 3.0, lo + 0.6 * span),
            SensorKind::Power => (Model::Power, 1.0, 0.0),
            SensorKind::Pressure | SensorKind::Flow => {
                let nominal = match (low, high) {
                    (Some(l), Some(h)) => (l + h) / 2.0,
                    (Some(l), None) => (lo + 0.6 * span).max(l + 0.25 * span),
                    (None, Some(h)) => lo + 0.6 * (h - lo),
                    (None, None) => lo + 0.6 * span,
                };
                (Model::Level, 2.0, nominal)
            }
            SensorKind::Generic => (Model::Generic, 5.0, lo + 0.5 * span),
        };
        let period_us = i64::try_from(spec.period_ms.saturating_mul(1000)).unwrap_or(i64::MAX / 4);
        SensorSim {
            id,
            model,
            value_type: spec.value_type,
            period_us,
            next_due: 0,
            last_due: 0,
            lo,
            hi,
            level,
            sine_period_s: 300.0 + 1500.0 * unit(mix(noise_key ^ 1)),
            high_limit: high.unwrap_or(f64::NAN),
            alpha: 1.0 - (-(period_us as f64) / US / tau_s).exp(),
            tau_s,
            value: lo,
            drift: 0.0,
            excess: 0.0,
            fault_target: f64::NAN,
            noise_key,
            sample: 0,
            stuck: false,
            spike: false,
            dropped: false,
            bias: 0.0,
            last_out: lo,
            speed_factor: 1.0,
        }
    }

    /// Where the physical quantity settles in this machine state.
    fn target(&self, state: MachineState, wear: f64) -> f64 {
        let span = self.hi - self.lo;
        match self.model {
            Model::Temperature => {
                let frac = match state {
                    MachineState::Running => 0.85,
                    MachineState::Idle => 0.6,
                    MachineState::Setup => 0.55,
                    MachineState::Down => 0.25,
                };
                self.lo + frac * (self.level - self.lo)
            }
            Model::Vibration => {
                let frac = match state {
                    MachineState::Running => 1.0,
                    MachineState::Setup => 0.4,
                    MachineState::Idle => 0.15,
                    MachineState::Down => 0.02,
                };
                self.lo + self.level * frac * (1.0 + BEARING_GAIN * wear)
            }
            Model::Speed => match state {
                // At 100 % exactly `level`, not `lo + (level - lo)`: the same bits as before
                // setpoints existed, so plain runs keep their readings.
                MachineState::Running if self.speed_factor == 1.0 => self.level,
                MachineState::Running => {
                    (self.lo + (self.level - self.lo) * self.speed_factor).min(self.hi)
                }
                _ => self.lo,
            },
            Model::Power => {
                let frac = match state {
                    MachineState::Running => 0.6,
                    MachineState::Idle => 0.15,
                    MachineState::Setup => 0.1,
                    MachineState::Down => 0.02,
                };
                self.lo + frac * span
            }
            Model::Level | Model::Generic => self.level,
        }
    }

    /// Advances the sensor to its due time `t` and returns the value it reports there, and
    /// whether that value is a spike.
    fn sample(&mut self, state: MachineState, wear: f64, t: i64) -> (Value, bool) {
        let dt_us = t - self.last_due;
        self.last_due = t;
        let dt_s = dt_us as f64 / US;
        let alpha = if dt_us == self.period_us {
            self.alpha
        } else {
            1.0 - (-dt_s / self.tau_s).exp()
        };
        let h = mix(self.noise_key ^ self.sample.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        self.sample += 1;
        let n = normal(h);
        let h2 = mix(h);
        let span = self.hi - self.lo;
        self.drift =
            (self.drift * 0.9995 + normal(h2) * 0.0004 * span).clamp(-0.01 * span, 0.01 * span);
        let target = self.target(state, wear);
        self.value += (target - self.value) * alpha;
        let mut v = match self.model {
            Model::Temperature => self.value + self.drift + 0.003 * span * n,
            Model::Vibration => self.value * (1.0 + 0.08 * n),
            Model::Speed if state == MachineState::Running => self.value + 0.002 * span * n,
            // Coasting down: snap to standstill instead of creeping toward it forever.
            Model::Speed if self.value - self.lo < 1e-3 * span => self.lo,
            Model::Speed => self.value,
            Model::Power => self.value + self.drift + 0.015 * span * n,
            Model::Level => self.value + self.drift + 0.01 * span * n,
            Model::Generic => {
                let phase = TAU * unit(self.noise_key);
                let secs = t as f64 / US;
                self.value
                    + 0.2 * span * (TAU * secs / self.sine_period_s + phase).sin()
                    + self.drift
                    + 0.01 * span * n
            }
        };
        if self.fault_target.is_finite() {
            let goal = self.fault_target - self.value;
            self.excess += (goal - self.excess) * (1.0 - (-dt_s / 8.0).exp());
        } else if self.excess != 0.0 {
            // Cools back within seconds: the label ends when the cause does.
            self.excess *= (-dt_s / 6.0).exp();
            if self.excess.abs() < 1e-3 {
                self.excess = 0.0;
            }
        }
        v = (v + self.excess).clamp(self.lo, self.hi);
        // Only while biased: `+ 0.0` would turn a -0.0 into 0.0 and change the bytes.
        if self.bias != 0.0 {
            v = (v + self.bias).clamp(self.lo, self.hi);
        }
        if self.stuck {
            v = self.last_out;
        } else {
            self.last_out = v;
        }
        let spiked = self.spike && !self.stuck;
        self.spike = false;
        if spiked {
            v = (v + span * (0.3 + 0.4 * unit(mix(h2)))).min(self.hi + 0.1 * span);
        }
        let value = match self.value_type {
            ValueType::Float => Value::Float(v),
            ValueType::Int => Value::Int(v.round() as i64),
            ValueType::Bool => Value::Bool(v > self.lo + 0.5 * span),
        };
        (value, spiked)
    }
}

/// Where a machine's events go: readings out, labels into the plant's list.
struct Sink<'a> {
    out: &'a mut Vec<Reading>,
    faults: &'a mut Vec<FaultLabel>,
    machine_path: &'a AssetPath,
    sensor_paths: &'a [AssetPath],
    /// Machine readings before this are coalesced (catch-up).
    cutoff: i64,
}

impl Sink<'_> {
    fn label(&mut self, asset: AssetPath, kind: FaultKind, start: i64, end: Option<i64>) -> usize {
        self.faults.push(FaultLabel {
            asset,
            kind,
            start: Timestamp(start),
            end: end.map(Timestamp),
        });
        self.faults.len() - 1
    }

    fn end_label(&mut self, label: usize, t: i64) {
        self.faults[label].end = Some(Timestamp(t));
    }
}

impl MachineSim {
    fn wear(&self, t: i64) -> f64 {
        if self.bearing_label.is_some() {
            ((t - self.wear_since) as f64 * self.wear_per_us).clamp(0.0, 1.2)
        } else {
            0.0
        }
    }

    /// When the part started at `t` completes; `NEVER` at speed 0. Draws the same from the
    /// machine's stream whatever the speed.
    fn part_done_after(&mut self, t: i64) -> i64 {
        let slowdown: f64 = self.rng.random_range(0.0..0.15);
        if self.speed_pct == 0 {
            return NEVER;
        }
        let factor = f64::from(self.speed_pct) / 100.0;
        let cycle_us =
            ((self.ideal_cycle_ms * 1000.0 * (1.0 + slowdown) / factor) as i64).max(1000);
        t.saturating_add(cycle_us)
    }

    fn refresh_next_event(&mut self) {
        self.next_event = [
            self.state_until,
            self.next_part,
            self.next_overheat,
            self.overheat.as_ref().map_or(NEVER, |a| a.until),
            self.next_spike,
            self.next_stuck,
            self.stuck.as_ref().map_or(NEVER, |a| a.until),
            self.next_breakdown,
            self.next_bearing,
            self.planned.get(self.next_planned).map_or(NEVER, |p| p.at),
            self.outage.as_ref().map_or(NEVER, |o| o.until),
            self.next_dropout,
            self.dropout.as_ref().map_or(NEVER, |a| a.until),
            self.next_bias,
            self.bias.as_ref().map_or(NEVER, |a| a.until),
        ]
        .into_iter()
        .min()
        .unwrap_or(NEVER);
    }

    fn emit_state(&mut self, t: i64, sink: &mut Sink) {
        if t >= sink.cutoff && self.outage.is_none() {
            let v = Value::Int(self.state.code());
            sink.out
                .push(Reading::good(self.id, Property::State, v, Timestamp(t)));
        } else {
            self.dirty_state = true;
            self.dirty_ts = t;
        }
    }

    fn emit_count(&mut self, property: Property, t: i64, sink: &mut Sink) {
        if t >= sink.cutoff && self.outage.is_none() {
            let n = if property == Property::GoodCount {
                self.good
            } else {
                self.scrap
            };
            sink.out.push(Reading::good(
                self.id,
                property,
                Value::Int(n),
                Timestamp(t),
            ));
        } else {
            self.dirty_counts = true;
            self.dirty_ts = t;
        }
    }

    fn flush_dirty(&mut self, sink: &mut Sink) {
        let ts = Timestamp(self.dirty_ts);
        if self.dirty_state {
            let v = Value::Int(self.state.code());
            sink.out
                .push(Reading::good(self.id, Property::State, v, ts));
        }
        if self.dirty_counts {
            sink.out.push(Reading::good(
                self.id,
                Property::GoodCount,
                Value::Int(self.good),
                ts,
            ));
            sink.out.push(Reading::good(
                self.id,
                Property::ScrapCount,
                Value::Int(self.scrap),
                ts,
            ));
        }
        self.dirty_state = false;
        self.dirty_counts = false;
    }

    /// Puts the machine in `state` from `t` for a random dwell; true if the state changed.
    fn begin(&mut self, state: MachineState, t: i64, sensors: &mut [SensorSim]) -> bool {
        let dwell = match state {
            MachineState::Running => {
                (120 * 1_000_000 + exp_us(&mut self.rng, 360.0)).min(1800 * 1_000_000)
            }
            MachineState::Idle => uniform_us(&mut self.rng, 10.0, 60.0),
            MachineState::Setup => uniform_us(&mut self.rng, 120.0, 480.0),
            MachineState::Down => uniform_us(&mut self.rng, 300.0, 1800.0),
        };
        if state == MachineState::Setup {
            // A changeover to another product: new setpoints.
            for s in sensors.iter_mut().filter(|s| s.model == Model::Speed) {
                s.level = s.lo + (s.hi - s.lo) * self.rng.random_range(0.45..0.8);
            }
        }
        self.next_part = if state == MachineState::Running {
            self.part_done_after(t)
        } else {
            NEVER
        };
        let changed = self.state != state;
        self.state = state;
        self.state_until = t + dwell;
        changed
    }

    fn enter(&mut self, state: MachineState, t: i64, sensors: &mut [SensorSim], sink: &mut Sink) {
        if self.begin(state, t, sensors) {
            self.emit_state(t, sink);
        }
    }

    /// Handles the machine event due at `t == self.next_event`.
    fn handle_event(&mut self, t: i64, sensors: &mut [SensorSim], sink: &mut Sink) {
        if self.state_until == t {
            match self.state {
                MachineState::Running => self.enter(MachineState::Idle, t, sensors, sink),
                // Held idle: a new idle dwell, no state change (nothing emitted).
                MachineState::Idle | MachineState::Setup if !self.run_enabled => {
                    self.enter(MachineState::Idle, t, sensors, sink)
                }
                MachineState::Idle if self.rng.random_bool(SETUP_AFTER_IDLE) => {
                    self.enter(MachineState::Setup, t, sensors, sink)
                }
                MachineState::Idle | MachineState::Setup => {
                    self.enter(MachineState::Running, t, sensors, sink)
                }
                MachineState::Down => {
                    // Repaired; a worn bearing is replaced on the way.
                    if let Some(l) = self.breakdown_label.take() {
                        sink.end_label(l, t);
                    }
                    if let Some(l) = self.bearing_label.take() {
                        sink.end_label(l, t);
                    }
                    self.enter(MachineState::Idle, t, sensors, sink);
                }
            }
        } else if self.next_part == t {
            let rate = if self.overheat.is_some() {
                SCRAP_RATE_OVERHEATING
            } else {
                SCRAP_RATE
            };
            if self.rng.random_bool(rate) {
                self.scrap += 1;
                self.emit_count(Property::ScrapCount, t, sink);
            } else {
                self.good += 1;
                self.emit_count(Property::GoodCount, t, sink);
            }
            self.next_part = self.part_done_after(t);
        } else if self.next_overheat == t {
            self.next_overheat = self.next_random(t, OVERHEAT_MEAN_S);
            let hot = |s: &SensorSim| s.model == Model::Temperature && s.high_limit.is_finite();
            let candidates = sensors.iter().filter(|s| hot(s)).count();
            if self.overheat.is_none() && self.state != MachineState::Down && candidates > 0 {
                let nth = self.rng.random_range(0..candidates);
                let (i, s) = sensors
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, s)| hot(s))
                    .nth(nth)
                    .expect("nth < number of candidates");
                s.fault_target = s.high_limit + self.rng.random_range(4.0..12.0);
                let until = t + uniform_us(&mut self.rng, 50.0, 140.0);
                let sensor = self.sensors.start + i;
                let path = sink.sensor_paths[sensor].clone();
                let label = sink.label(path, FaultKind::Overheating, t, None);
                self.overheat = Some(Active {
                    sensor,
                    until,
                    label,
                });
            }
        } else if self.overheat.as_ref().is_some_and(|a| a.until == t) {
            let a = self.overheat.take().expect("checked above");
            sensors[a.sensor - self.sensors.start].fault_target = f64::NAN;
            sink.end_label(a.label, t);
        } else if self.next_spike == t {
            self.next_spike = self.next_random(t, SPIKE_MEAN_S);
            if !sensors.is_empty() {
                let i = self.rng.random_range(0..sensors.len());
                sensors[i].spike = true;
            }
        } else if self.next_stuck == t {
            self.next_stuck = self.next_random(t, STUCK_MEAN_S);
            if self.stuck.is_none() && !sensors.is_empty() {
                let i = self.rng.random_range(0..sensors.len());
                sensors[i].stuck = true;
                let until = t + uniform_us(&mut self.rng, 120.0, 1200.0);
                let sensor = self.sensors.start + i;
                let path = sink.sensor_paths[sensor].clone();
                let label = sink.label(path, FaultKind::StuckSensor, t, None);
                self.stuck = Some(Active {
                    sensor,
                    until,
                    label,
                });
            }
        } else if self.stuck.as_ref().is_some_and(|a| a.until == t) {
            let a = self.stuck.take().expect("checked above");
            sensors[a.sensor - self.sensors.start].stuck = false;
            sink.end_label(a.label, t);
        } else if self.next_breakdown == t {
            self.next_breakdown = self.next_random(t, BREAKDOWN_MEAN_S);
            if self.state != MachineState::Down {
                let path = sink.machine_path.clone();
                self.breakdown_label = Some(sink.label(path, FaultKind::Breakdown, t, None));
                self.enter(MachineState::Down, t, sensors, sink);
            }
        } else if self.next_bearing == t {
            self.next_bearing = self.next_random(t, BEARING_MEAN_S);
            if self.bearing_label.is_none() {
                let to_failure = uniform_us(&mut self.rng, 3600.0, 4.0 * 3600.0);
                self.wear_since = t;
                self.wear_per_us = 1.0 / to_failure as f64;
                let path = sink.machine_path.clone();
                self.bearing_label = Some(sink.label(path, FaultKind::BearingWear, t, None));
                self.next_breakdown = self.next_breakdown.min(t + to_failure);
            }
        } else if self.outage.as_ref().is_some_and(|o| o.until == t) {
            let o = self.outage.take().expect("checked above");
            sink.end_label(o.label, t);
            // Back online: what changed during the loss is reported as of now, the way an
            // adapter reads a PLC's current registers when it reconnects.
            if self.dirty_state || self.dirty_counts {
                self.dirty_ts = t;
            }
        } else if self
            .planned
            .get(self.next_planned)
            .is_some_and(|p| p.at == t)
        {
            let p = self.planned[self.next_planned];
            self.next_planned += 1;
            self.start_planned(p, t, sensors, sink);
        } else if self.next_dropout == t {
            self.next_dropout = self.next_sensor_fault(t, DROPOUT_MEAN_S);
            if self.dropout.is_none() && !sensors.is_empty() {
                let rng = &mut self.sensor_fault_rng;
                let i = rng.random_range(0..sensors.len());
                let until = t + uniform_us(rng, DROPOUT_S.0, DROPOUT_S.1);
                sensors[i].dropped = true;
                self.dropout = Some(self.sensor_fault(i, until, FaultKind::Dropout, t, sink));
            }
        } else if self.dropout.as_ref().is_some_and(|a| a.until == t) {
            let a = self.dropout.take().expect("checked above");
            sensors[a.sensor - self.sensors.start].dropped = false;
            sink.end_label(a.label, t);
        } else if self.next_bias == t {
            self.next_bias = self.next_sensor_fault(t, BIAS_MEAN_S);
            if self.bias.is_none() && !sensors.is_empty() {
                let rng = &mut self.sensor_fault_rng;
                let i = rng.random_range(0..sensors.len());
                let until = t + uniform_us(rng, BIAS_S.0, BIAS_S.1);
                let fraction = rng.random_range(BIAS_SPAN.0..BIAS_SPAN.1);
                let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
                let s = &mut sensors[i];
                s.bias = sign * fraction * (s.hi - s.lo);
                self.bias = Some(self.sensor_fault(i, until, FaultKind::SensorBias, t, sink));
            }
        } else if self.bias.as_ref().is_some_and(|a| a.until == t) {
            let a = self.bias.take().expect("checked above");
            sensors[a.sensor - self.sensors.start].bias = 0.0;
            sink.end_label(a.label, t);
        }
        self.refresh_next_event();
    }

    /// Labels a fault of kind `kind` starting at `t` on the machine's `i`-th sensor.
    fn sensor_fault(
        &self,
        i: usize,
        until: i64,
        kind: FaultKind,
        t: i64,
        sink: &mut Sink,
    ) -> Active {
        let sensor = self.sensors.start + i;
        let path = sink.sensor_paths[sensor].clone();
        let label = sink.label(path, kind, t, None);
        Active {
            sensor,
            until,
            label,
        }
    }

    /// As `next_random`, from the sensor-fault stream.
    fn next_sensor_fault(&mut self, t: i64, mean_s: f64) -> i64 {
        if self.random_faults {
            t + exp_us(&mut self.sensor_fault_rng, mean_s / self.fault_rate)
        } else {
            NEVER
        }
    }

    /// When the next random fault of a kind with mean interval `mean_s` starts after `t`.
    fn next_random(&mut self, t: i64, mean_s: f64) -> i64 {
        if self.random_faults {
            t + exp_us(&mut self.rng, mean_s / self.fault_rate)
        } else {
            NEVER
        }
    }

    /// Starts a scheduled fault at `t`. It happens whatever the machine is doing: a fault of
    /// the same kind in progress on the machine is ended at `t` first. Draws nothing from the
    /// machine's stream except through the state change a breakdown makes.
    fn start_planned(&mut self, p: Planned, t: i64, sensors: &mut [SensorSim], sink: &mut Sink) {
        let until = t.saturating_add(p.duration_us);
        let first = self.sensors.start;
        match (p.kind, p.sensor) {
            (FaultKind::Overheating, Some(sensor)) => {
                if let Some(a) = self.overheat.take() {
                    sensors[a.sensor - first].fault_target = f64::NAN;
                    sink.end_label(a.label, t);
                }
                let s = &mut sensors[sensor - first];
                s.fault_target = s.high_limit + PLANNED_OVERHEAT_EXCESS;
                let path = sink.sensor_paths[sensor].clone();
                let label = sink.label(path, FaultKind::Overheating, t, None);
                self.overheat = Some(Active {
                    sensor,
                    until,
                    label,
                });
            }
            (FaultKind::StuckSensor, Some(sensor)) => {
                if let Some(a) = self.stuck.take() {
                    sensors[a.sensor - first].stuck = false;
                    sink.end_label(a.label, t);
                }
                sensors[sensor - first].stuck = true;
                let path = sink.sensor_paths[sensor].clone();
                let label = sink.label(path, FaultKind::StuckSensor, t, None);
                self.stuck = Some(Active {
                    sensor,
                    until,
                    label,
                });
            }
            // Labelled by `advance` at the sensor's next sample, when the outlier is emitted.
            (FaultKind::Spike, Some(sensor)) => sensors[sensor - first].spike = true,
            (FaultKind::Breakdown, _) => {
                if let Some(l) = self.breakdown_label.take() {
                    sink.end_label(l, t);
                }
                let path = sink.machine_path.clone();
                self.breakdown_label = Some(sink.label(path, FaultKind::Breakdown, t, None));
                self.enter(MachineState::Down, t, sensors, sink);
                self.state_until = until;
            }
            (FaultKind::BearingWear, _) => {
                if let Some(l) = self.bearing_label.take() {
                    sink.end_label(l, t);
                }
                self.wear_since = t;
                self.wear_per_us = 1.0 / p.duration_us.max(1) as f64;
                let path = sink.machine_path.clone();
                self.bearing_label = Some(sink.label(path, FaultKind::BearingWear, t, None));
                self.next_breakdown = self.next_breakdown.min(until);
            }
            (FaultKind::NetworkLoss, _) => {
                if let Some(o) = self.outage.take() {
                    sink.end_label(o.label, t);
                }
                let path = sink.machine_path.clone();
                let label = sink.label(path, FaultKind::NetworkLoss, t, None);
                self.outage = Some(Outage { until, label });
            }
            (FaultKind::Dropout, Some(sensor)) => {
                if let Some(a) = self.dropout.take() {
                    sensors[a.sensor - first].dropped = false;
                    sink.end_label(a.label, t);
                }
                sensors[sensor - first].dropped = true;
                self.dropout = Some(self.sensor_fault(sensor - first, until, p.kind, t, sink));
            }
            (FaultKind::SensorBias, Some(sensor)) => {
                if let Some(a) = self.bias.take() {
                    sensors[a.sensor - first].bias = 0.0;
                    sink.end_label(a.label, t);
                }
                let s = &mut sensors[sensor - first];
                s.bias = planned_bias(s.noise_key, t, s.hi - s.lo);
                self.bias = Some(self.sensor_fault(sensor - first, until, p.kind, t, sink));
            }
            // Sensor kinds without a sensor: `with_scenario` never builds these.
            (
                FaultKind::Overheating
                | FaultKind::StuckSensor
                | FaultKind::Spike
                | FaultKind::Dropout
                | FaultKind::SensorBias,
                None,
            ) => {}
        }
    }

    /// Runs this machine up to `now`: events and sensor samples in time order.
    fn advance(&mut self, now: i64, sensors: &mut [SensorSim], sink: &mut Sink) {
        for s in sensors.iter_mut() {
            let window = MAX_CATCH_UP_PERIODS * s.period_us;
            let oldest = now - window;
            if s.next_due <= oldest {
                let skip = (oldest - s.next_due) / s.period_us + 1;
                s.next_due += skip * s.period_us;
                s.sample += skip as u64;
            }
        }
        loop {
            let due = sensors.iter().map(|s| s.next_due).min().unwrap_or(NEVER);
            let t = self.next_event.min(due);
            if t > now {
                break;
            }
            if (self.dirty_state || self.dirty_counts) && t >= sink.cutoff && self.outage.is_none()
            {
                self.flush_dirty(sink);
            }
            if self.next_event <= due {
                self.handle_event(t, sensors, sink);
                continue;
            }
            let wear = self.wear(t);
            // During a network loss (or a sensor's dropout) the physics goes on but nothing
            // is reported (a spike nobody saw is not labelled either).
            let silent = self.outage.is_some();
            for (i, s) in sensors.iter_mut().enumerate() {
                if s.next_due != t {
                    continue;
                }
                let (value, spiked) = s.sample(self.state, wear, t);
                s.next_due = t + s.period_us;
                if silent || s.dropped {
                    continue;
                }
                sink.out
                    .push(Reading::good(s.id, Property::Value, value, Timestamp(t)));
                if spiked {
                    let path = sink.sensor_paths[self.sensors.start + i].clone();
                    sink.label(path, FaultKind::Spike, t, Some(t));
                }
            }
        }
        if (self.dirty_state || self.dirty_counts) && self.outage.is_none() {
            self.flush_dirty(sink);
        }
    }
}

impl PlantSim {
    /// Builds the simulation of a validated spec, every machine and sensor at rest in its
    /// initial state at `start`.
    pub fn new(spec: &PlantSpec, seed: u64, start: Timestamp) -> PlantSim {
        PlantSim::with_fault_rate(spec, seed, start, 1.0)
    }

    /// As `new`, with every fault `fault_rate` times as frequent (the demo uses more
    /// faults than a real plant so an engineer sees alarms within minutes). Must be > 0.
    pub fn with_fault_rate(
        spec: &PlantSpec,
        seed: u64,
        start: Timestamp,
        fault_rate: f64,
    ) -> PlantSim {
        PlantSim::build(spec, seed, start, fault_rate, true)
    }

    /// As `new`, with the faults `scenario` schedules happening at their time after `start`,
    /// and its random-fault settings. `seed` is used unless the scenario sets its own. The
    /// scenario must have been validated against this spec (`Scenario::from_toml`): a fault
    /// on an asset the spec does not have is skipped.
    pub fn with_scenario(
        spec: &PlantSpec,
        seed: u64,
        start: Timestamp,
        scenario: &Scenario,
    ) -> PlantSim {
        let seed = scenario.seed.unwrap_or(seed);
        let mut sim = PlantSim::build(
            spec,
            seed,
            start,
            scenario.fault_rate,
            scenario.random_faults,
        );
        if scenario.faults.is_empty() {
            return sim;
        }
        let machine_index: HashMap<&AssetPath, usize> = sim
            .machine_paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p, i))
            .collect();
        for f in &scenario.faults {
            let on_sensor = f.asset.level() == Level::Sensor;
            let machine_path = if on_sensor {
                f.asset.parent()
            } else {
                Some(f.asset.clone())
            };
            let Some(&m) = machine_path.as_ref().and_then(|p| machine_index.get(p)) else {
                continue;
            };
            let machine = &mut sim.machines[m];
            let sensor = if on_sensor {
                match machine
                    .sensors
                    .clone()
                    .find(|&i| sim.sensor_paths[i] == f.asset)
                {
                    Some(i) => Some(i),
                    None => continue,
                }
            } else {
                None
            };
            let ms = |ms: u64| i64::try_from(ms.saturating_mul(1000)).unwrap_or(NEVER / 2);
            machine.planned.push(Planned {
                at: start.0.saturating_add(ms(f.at_ms)),
                duration_us: ms(f.duration_ms),
                kind: f.kind,
                sensor,
            });
        }
        for m in &mut sim.machines {
            // Stable: faults at the same time start in file order.
            m.planned.sort_by_key(|p| p.at);
            m.refresh_next_event();
        }
        sim
    }

    fn build(
        spec: &PlantSpec,
        seed: u64,
        start: Timestamp,
        fault_rate: f64,
        random_faults: bool,
    ) -> PlantSim {
        let fault_rate = if fault_rate.is_finite() && fault_rate > 0.0 {
            fault_rate
        } else {
            1.0
        };
        let mut machines: Vec<MachineSim> = Vec::new();
        let mut sensors = Vec::new();
        let mut machine_paths = Vec::new();
        let mut sensor_paths = Vec::new();
        for asset in spec.assets() {
            match asset.kind {
                AssetKind::Machine { spec: mt, .. } => {
                    let rng = ChaCha8Rng::seed_from_u64(mix(
                        seed ^ fnv1a(asset.path.as_str().as_bytes())
                    ));
                    machines.push(MachineSim {
                        id: asset.path.id(),
                        index: machines.len(),
                        rng,
                        sensors: sensors.len()..sensors.len(),
                        ideal_cycle_ms: mt.ideal_cycle_ms,
                        speed_pct: 100,
                        run_enabled: true,
                        state: MachineState::Idle,
                        state_until: NEVER,
                        next_part: NEVER,
                        good: 0,
                        scrap: 0,
                        wear_since: 0,
                        wear_per_us: 0.0,
                        bearing_label: None,
                        next_bearing: NEVER,
                        next_overheat: NEVER,
                        overheat: None,
                        next_spike: NEVER,
                        next_stuck: NEVER,
                        stuck: None,
                        next_breakdown: NEVER,
                        breakdown_label: None,
                        next_event: NEVER,
                        dirty_state: true,
                        dirty_counts: true,
                        dirty_ts: start.0,
                        window_us: 0,
                        fault_rate,
                        random_faults,
                        planned: Vec::new(),
                        next_planned: 0,
                        outage: None,
                        sensor_fault_rng: ChaCha8Rng::seed_from_u64(mix(seed
                            ^ fnv1a(asset.path.as_str().as_bytes())
                            ^ SENSOR_FAULT_STREAM)),
                        next_dropout: NEVER,
                        dropout: None,
                        next_bias: NEVER,
                        bias: None,
                    });
                    machine_paths.push(asset.path);
                }
                AssetKind::Sensor { spec: s, .. } => {
                    let m = machines
                        .last_mut()
                        .expect("a sensor follows its machine in spec.assets()");
                    let key = m.rng.random::<u64>();
                    sensors.push(SensorSim::new(asset.path.id(), &s, key));
                    sensor_paths.push(asset.path);
                    m.sensors.end = sensors.len();
                }
                _ => {}
            }
        }
        for m in &mut machines {
            let own = &mut sensors[m.sensors.clone()];
            m.init(start.0, own);
        }
        PlantSim {
            machines,
            sensors,
            machine_paths,
            sensor_paths,
            faults: Vec::new(),
            now: start.0,
        }
    }

    pub fn sensor_count(&self) -> usize {
        self.sensors.len()
    }

    pub fn machine_count(&self) -> usize {
        self.machines.len()
    }

    /// Simulated time of the last `step` (the start time before the first).
    pub fn now(&self) -> Timestamp {
        Timestamp(self.now)
    }

    /// Advances simulated time to `now` (an earlier `now` is a no-op) and appends every
    /// reading that fell due since the last call, stamped with its due time. Each sensor
    /// reports every `period_ms`; each machine reports its state when it changes and its
    /// cumulative good or scrap count when a part completes. A jump of more than
    /// `MAX_CATCH_UP_PERIODS` periods emits only the last that-many periods per sensor.
    pub fn step(&mut self, now: Timestamp, out: &mut Vec<Reading>) {
        let now = now.0;
        if now < self.now {
            return;
        }
        self.now = now;
        let PlantSim {
            machines,
            sensors,
            machine_paths,
            sensor_paths,
            faults,
            ..
        } = self;
        for m in machines.iter_mut() {
            let mut sink = Sink {
                out: &mut *out,
                faults: &mut *faults,
                machine_path: &machine_paths[m.index],
                sensor_paths,
                cutoff: now - m.window_us,
            };
            let own = &mut sensors[m.sensors.clone()];
            m.advance(now, own, &mut sink);
        }
    }

    /// Sets a machine's speed setpoint in percent of nominal (a PLC's override, 0..=200 on
    /// the Modbus map), from `now()`: the cycle time is divided by `pct / 100` and its speed
    /// sensors (spindle, belt) run towards their setpoint times the same factor. A part in
    /// progress finishes at its old pace, unless production stops (0) or restarts from 0.
    /// Returns false if `machine` is not a machine of this plant.
    pub fn set_speed_pct(&mut self, machine: AssetId, pct: u16) -> bool {
        let Some(m) = self.machines.iter_mut().find(|m| m.id == machine) else {
            return false;
        };
        if m.speed_pct == pct {
            return true;
        }
        m.speed_pct = pct;
        for s in &mut self.sensors[m.sensors.clone()] {
            s.speed_factor = f64::from(pct) / 100.0;
        }
        if m.state == MachineState::Running && (pct == 0 || m.next_part == NEVER) {
            m.next_part = m.part_done_after(self.now);
        }
        m.refresh_next_event();
        true
    }

    /// The run-enable coil of a PLC: false puts the machine in idle at `now()` (a part in
    /// progress is abandoned) and keeps it there; a breakdown still happens and is repaired
    /// into idle. True lets the idle dwell end as usual, then the machine runs again. The
    /// state change is reported at the next `step`. Returns false if `machine` is not a
    /// machine of this plant. A plant whose run enables are never cleared draws exactly what
    /// it drew before the coil existed.
    pub fn set_run_enable(&mut self, machine: AssetId, enabled: bool) -> bool {
        let now = self.now;
        let Some(m) = self.machines.iter_mut().find(|m| m.id == machine) else {
            return false;
        };
        if m.run_enabled == enabled {
            return true;
        }
        m.run_enabled = enabled;
        if !enabled && matches!(m.state, MachineState::Running | MachineState::Setup) {
            let own = &mut self.sensors[m.sensors.clone()];
            m.begin(MachineState::Idle, now, own);
            // Reported by the next `advance` (`flush_dirty`), stamped now.
            m.dirty_state = true;
            m.dirty_ts = now;
        }
        m.refresh_next_event();
        true
    }

    /// A machine's speed setpoint in percent, `None` if `machine` is not one of this plant.
    pub fn speed_pct(&self, machine: AssetId) -> Option<u16> {
        self.machines
            .iter()
            .find(|m| m.id == machine)
            .map(|m| m.speed_pct)
    }

    /// Per machine (spec order) whether a fault is in progress and which sensors read bad.
    pub fn machine_statuses(&self) -> impl Iterator<Item = MachineStatus> + '_ {
        self.machines.iter().map(|m| {
            let all = if m.sensors.len() >= 64 {
                u64::MAX
            } else {
                (1u64 << m.sensors.len()) - 1
            };
            let mut bad = 0u64;
            if m.outage.is_some() {
                bad = all;
            }
            for a in [&m.stuck, &m.dropout].into_iter().flatten() {
                let k = a.sensor - m.sensors.start;
                if k < 64 {
                    bad |= 1 << k;
                }
            }
            MachineStatus {
                machine: m.id,
                fault_active: m.overheat.is_some()
                    || m.stuck.is_some()
                    || m.dropout.is_some()
                    || m.breakdown_label.is_some()
                    || m.bearing_label.is_some()
                    || m.outage.is_some(),
                bad_sensors: bad,
                run_enabled: m.run_enabled,
            }
        })
    }

    /// Each machine's speed setpoint in percent (`set_speed_pct`; 100 until set), in spec
    /// order: what a PLC would report back for its speed override.
    pub fn speed_pcts(&self) -> impl Iterator<Item = (AssetId, u16)> + '_ {
        self.machines.iter().map(|m| (m.id, m.speed_pct))
    }

    /// Ground truth: every fault that has started so far, in order of start per machine.
    pub fn faults(&self) -> &[FaultLabel] {
        &self.faults
    }

    /// `faults()` for the end of a run: faults still in progress end at `now()`.
    pub fn final_labels(&self) -> Vec<FaultLabel> {
        let now = self.now();
        self.faults
            .iter()
            .map(|f| FaultLabel {
                end: Some(f.end.unwrap_or(now)),
                ..f.clone()
            })
            .collect()
    }
}

impl MachineSim {
    fn init(&mut self, start: i64, sensors: &mut [SensorSim]) {
        let longest = sensors
            .iter()
            .map(|s| s.period_us)
            .max()
            .unwrap_or(1_000_000);
        let shortest = sensors
            .iter()
            .map(|s| s.period_us)
            .min()
            .unwrap_or(1_000_000);
        self.window_us = MAX_CATCH_UP_PERIODS * longest;
        // Machines (PLCs) scan out of phase with each other, so a plant's readings spread
        // over the period instead of arriving in one burst.
        let phase_ms = self.rng.random_range(0..(shortest / 1000).max(1));
        for s in sensors.iter_mut() {
            s.next_due = start + phase_ms * 1000;
            s.last_due = s.next_due - s.period_us;
            if s.model == Model::Speed {
                s.level = s.lo + (s.hi - s.lo) * self.rng.random_range(0.45..0.8);
            }
        }
        self.state = if self.rng.random_bool(0.75) {
            MachineState::Running
        } else {
            MachineState::Idle
        };
        let state = self.state;
        self.begin(state, start, sensors);
        for s in sensors.iter_mut() {
            // Start at rest in the initial state: no warm-up transient.
            s.value = s.target(self.state, 0.0);
            s.last_out = s.value;
        }
        self.next_overheat = self.next_random(start, OVERHEAT_MEAN_S);
        self.next_spike = self.next_random(start, SPIKE_MEAN_S);
        self.next_stuck = self.next_random(start, STUCK_MEAN_S);
        self.next_breakdown = self.next_random(start, BREAKDOWN_MEAN_S);
        self.next_bearing = self.next_random(start, BEARING_MEAN_S);
        self.next_dropout = self.next_sensor_fault(start, DROPOUT_MEAN_S);
        self.next_bias = self.next_sensor_fault(start, BIAS_MEAN_S);
        self.refresh_next_event();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use ferrotwin_models::spec::AssetDef;

    use super::*;
    use crate::generate::{PlantSize, generate};
    use crate::scenario::Scenario;

    const START: Timestamp = Timestamp(1_764_000_000_000_000);

    /// Steps `sim` from its current time to `secs` after `START` in steps of `step_ms`.
    fn run(sim: &mut PlantSim, secs: i64, step_ms: i64) -> Vec<Reading> {
        let mut out = Vec::new();
        let end = START.plus_ms(secs * 1000);
        let mut t = sim.now();
        while t < end {
            t = t.plus_ms(step_ms).min(end);
            sim.step(t, &mut out);
        }
        out
    }

    fn demo() -> (PlantSpec, Vec<AssetDef>) {
        let spec = generate(PlantSize::DEMO, 7);
        let assets = spec.assets();
        (spec, assets)
    }

    #[test]
    fn same_seed_gives_identical_readings_and_another_seed_differs() {
        let (spec, _) = demo();
        let a = run(&mut PlantSim::new(&spec, 7, START), 600, 1000);
        let b = run(&mut PlantSim::new(&spec, 7, START), 600, 1000);
        let c = run(&mut PlantSim::new(&spec, 8, START), 600, 1000);
        assert!(a.len() > 600 * 100);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn readings_do_not_depend_on_how_steps_are_spaced() {
        let (spec, _) = demo();
        let mut a = run(&mut PlantSim::new(&spec, 3, START), 600, 1000);
        let mut b = run(&mut PlantSim::new(&spec, 3, START), 600, 170);
        let key = |r: &Reading| (r.asset, r.property, r.source_ts);
        a.sort_by_key(key);
        b.sort_by_key(key);
        assert_eq!(a, b);
    }

    #[test]
    fn readings_are_finite_fit_value_types_and_address_plant_assets() {
        let (spec, assets) = demo();
        let declared: HashMap<AssetId, Option<ValueType>> = assets
            .iter()
            .filter_map(|a| match &a.kind {
                AssetKind::Sensor { spec, .. } => Some((a.path.id(), Some(spec.value_type))),
                AssetKind::Machine { .. } => Some((a.path.id(), None)),
                _ => None,
            })
            .collect();
        let mut sim = PlantSim::new(&spec, 11, START);
        for r in run(&mut sim, 3600, 1000) {
            assert!(r.value.is_finite(), "{r:?}");
            assert!(r.quality.is_good());
            match declared
                .get(&r.asset)
                .expect("reading addresses a machine or sensor")
            {
                Some(vt) => {
                    assert_eq!(r.property, Property::Value);
                    assert_eq!(r.value.value_type(), *vt, "{r:?}");
                }
                None => {
                    assert!(matches!(r.value, Value::Int(_)), "{r:?}");
                    assert_ne!(r.property, Property::Value);
                }
            }
        }
    }

    #[test]
    fn every_sensor_reports_at_its_period_except_while_dropped_out() {
        let (spec, assets) = demo();
        let mut sim = PlantSim::new(&spec, 5, START);
        let mut by_asset: HashMap<AssetId, Vec<i64>> = HashMap::new();
        for r in run(&mut sim, 600, 1000)
            .iter()
            .filter(|r| r.property == Property::Value)
        {
            by_asset.entry(r.asset).or_default().push(r.source_ts.0);
        }
        let final_labels = sim.final_labels();
        let dropouts: Vec<&FaultLabel> = final_labels
            .iter()
            .filter(|f| f.kind == FaultKind::Dropout)
            .collect();
        // Seed 5 drops one sensor out within these 10 minutes; the others report throughout.
        assert_eq!(dropouts.len(), 1, "{dropouts:?}");
        let mut sensors = 0;
        for a in &assets {
            let AssetKind::Sensor { spec: s, .. } = &a.kind else {
                continue;
            };
            sensors += 1;
            let ts = &by_asset[&a.path.id()];
            let period_us = s.period_ms as i64 * 1000;
            let gaps: Vec<(i64, i64)> = dropouts
                .iter()
                .filter(|f| f.asset == a.path)
                .map(|f| (f.start.0, f.end.map_or(i64::MAX, |e| e.0)))
                .collect();
            let silent = |t: i64| gaps.iter().any(|(from, to)| (*from..*to).contains(&t));
            assert!(
                ts.iter().all(|t| !silent(*t)),
                "{} reported while dropped out",
                a.path
            );
            // Due times run on at the period; the ones inside a dropout are missing.
            let due: Vec<i64> = (0..600_000 / s.period_ms as i64)
                .map(|k| ts[0] - (ts[0] - START.0) / period_us * period_us + k * period_us)
                .filter(|t| !silent(*t))
                .collect();
            assert_eq!(*ts, due, "{}", a.path);
            assert!(ts[0] >= START.0 && ts[0] < START.0 + period_us);
        }
        assert_eq!(sensors, sim.sensor_count());
    }

    #[test]
    fn part_counters_never_decrease_and_parts_get_made() {
        let (spec, _) = demo();
        let mut sim = PlantSim::new(&spec, 9, START);
        let mut last: HashMap<(AssetId, Property), i64> = HashMap::new();
        let mut states = 0;
        for r in run(&mut sim, 3600, 1000) {
            match (r.property, r.value) {
                (Property::GoodCount | Property::ScrapCount, Value::Int(n)) => {
                    let prev = last.insert((r.asset, r.property), n).unwrap_or(0);
                    assert!(n >= prev, "{r:?} after {prev}");
                }
                (Property::State, Value::Int(code)) => {
                    assert!(MachineState::from_code(code).is_some());
                    states += 1;
                }
                _ => {}
            }
        }
        let good: i64 = last
            .iter()
            .filter(|(k, _)| k.1 == Property::GoodCount)
            .map(|(_, n)| n)
            .sum();
        let scrap: i64 = last
            .iter()
            .filter(|(k, _)| k.1 == Property::ScrapCount)
            .map(|(_, n)| n)
            .sum();
        assert!(good > 1000, "good {good}");
        assert!(scrap > 0 && scrap * 10 < good, "scrap {scrap} of {good}");
        assert!(
            states > sim.machine_count(),
            "machines change state within an hour"
        );
    }

    #[test]
    fn overheating_pushes_a_temperature_over_its_high_alarm_limit_and_is_labelled() {
        let (spec, assets) = demo();
        let high_limits: HashMap<AssetId, (&AssetPath, f64)> = assets
            .iter()
            .filter_map(|a| match &a.kind {
                AssetKind::Sensor { spec, .. } if spec.kind == SensorKind::Temperature => spec
                    .alarms
                    .iter()
                    .find(|l| l.kind == LimitKind::High)
                    .map(|l| (a.path.id(), (&a.path, l.limit))),
                _ => None,
            })
            .collect();
        let mut sim = PlantSim::new(&spec, 1, START);
        let readings = run(&mut sim, 3 * 3600, 1000);
        let over: Vec<(&AssetPath, Timestamp)> = readings
            .iter()
            .filter_map(|r| {
                let (path, limit) = high_limits.get(&r.asset)?;
                (r.value.as_f64() > *limit).then_some((*path, r.source_ts))
            })
            .collect();
        assert!(
            !over.is_empty(),
            "no temperature crossed its high limit in 3 h"
        );
        let overheats: Vec<&FaultLabel> = sim
            .faults()
            .iter()
            .filter(|f| f.kind == FaultKind::Overheating)
            .collect();
        // Roughly one per machine-hour: 24 machines × 3 h.
        assert!((30..=130).contains(&overheats.len()), "{}", overheats.len());
        for (path, ts) in &over {
            let explained = sim.faults().iter().any(|f| {
                &f.asset == *path
                    && f.start <= *ts
                    && match f.kind {
                        FaultKind::Overheating => f.end.is_none_or(|e| *ts <= e.plus_ms(10_000)),
                        FaultKind::Spike => f.start == *ts,
                        _ => false,
                    }
            });
            let labels: Vec<_> = sim.faults().iter().filter(|f| &f.asset == *path).collect();
            assert!(
                explained,
                "{path} over its limit at {ts} without a fault label: {labels:?}"
            );
        }
        // Each ended episode kept the temperature over the limit for tens of seconds.
        let ended = overheats.iter().filter(|f| f.end.is_some()).count();
        assert!(ended >= overheats.len() - 24);
        assert!(
            over.len() >= ended * 20,
            "{} samples over for {ended} episodes",
            over.len()
        );
    }

    #[test]
    fn far_jump_emits_at_most_ten_periods_per_sensor_and_coalesces_machine_readings() {
        let (spec, _) = demo();
        let mut sim = PlantSim::new(&spec, 2, START);
        let mut out = Vec::new();
        sim.step(START.plus_ms(6 * 3600 * 1000), &mut out);
        let mut per_asset: HashMap<(AssetId, Property), usize> = HashMap::new();
        for r in &out {
            *per_asset.entry((r.asset, r.property)).or_default() += 1;
        }
        let sensor_max = per_asset
            .iter()
            .filter(|(k, _)| k.1 == Property::Value)
            .map(|(_, n)| *n)
            .max();
        assert_eq!(sensor_max, Some(10));
        assert_eq!(
            per_asset
                .iter()
                .filter(|(k, _)| k.1 == Property::Value)
                .count(),
            sim.sensor_count()
        );
        // State and counters: one coalesced reading plus whatever changed in the last window.
        assert!(
            out.len() < sim.sensor_count() * 10 + sim.machine_count() * 30,
            "{}",
            out.len()
        );
        assert!(out.iter().all(|r| r.source_ts <= sim.now()));
    }

    #[test]
    fn stepping_to_an_earlier_or_the_same_time_emits_nothing() {
        let (spec, _) = demo();
        let mut sim = PlantSim::new(&spec, 2, START);
        let mut out = Vec::new();
        sim.step(START.plus_ms(5000), &mut out);
        let n = out.len();
        assert!(n > 0);
        sim.step(START.plus_ms(5000), &mut out);
        sim.step(START.plus_ms(1000), &mut out);
        assert_eq!(out.len(), n);
        assert_eq!(sim.now(), START.plus_ms(5000));
    }

    fn line_plant() -> PlantSpec {
        generate(PlantSize::ONE_LINE, 1)
    }

    const OVEN: &str = "acme/berlin/assembly/line-1/oven-1";

    fn scenario(spec: &PlantSpec, text: &str) -> Scenario {
        Scenario::from_toml(text, std::path::Path::new("test.toml"), spec).expect("valid scenario")
    }

    fn fault(asset: &str, kind: &str, at: &str, duration: &str) -> String {
        format!(
            "[[faults]]\nasset = \"{asset}\"\nkind = \"{kind}\"\nat = \"{at}\"\nduration = \"{duration}\"\n"
        )
    }

    #[test]
    fn scheduled_overheating_is_labelled_at_its_time_and_pushes_the_sensor_over_its_limit() {
        let spec = line_plant();
        let text = format!("version = 1\n{}", fault(OVEN, "overheating", "10m", "2m"));
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        let readings = run(&mut sim, 20 * 60, 1000);
        let sensor = AssetPath::parse(&format!("{OVEN}/zone-1-temp")).expect("valid");
        let label = sim
            .faults()
            .iter()
            .find(|f| f.kind == FaultKind::Overheating && f.start == START.plus_ms(600_000))
            .expect("the scheduled overheating is labelled");
        assert_eq!(label.asset, sensor);
        assert_eq!(label.end, Some(START.plus_ms(720_000)));
        let over: Vec<Timestamp> = readings
            .iter()
            .filter(|r| r.asset == sensor.id() && r.value.as_f64() > 260.0)
            .map(|r| r.source_ts)
            .collect();
        assert!(over.len() >= 60, "{} samples over 260", over.len());
        assert!(
            over.iter()
                .all(|t| *t > START.plus_ms(600_000) && *t < START.plus_ms(750_000)),
            "{over:?}"
        );
    }

    #[test]
    fn without_random_faults_only_the_scheduled_ones_are_labelled() {
        let spec = line_plant();
        let press = "acme/berlin/assembly/line-1/press-1";
        let text = format!(
            "version = 1\nrandom_faults = false\nfault_rate = 50.0\n{}{}{}[[faults]]\nasset = \"{OVEN}/fan-speed\"\nkind = \"spike\"\nat = \"5m\"\n",
            fault(press, "breakdown", "30m", "10m"),
            fault(&format!("{press}/oil-temp"), "stuck_sensor", "1h", "5m"),
            fault(press, "bearing_wear", "2h", "1h"),
        );
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        let readings = run(&mut sim, 4 * 3600, 1000);
        let got: Vec<(&str, FaultKind, i64, Option<i64>)> = sim
            .faults()
            .iter()
            .map(|f| {
                (
                    f.asset.as_str(),
                    f.kind,
                    f.start.millis_since(START),
                    f.end.map(|e| e.millis_since(START)),
                )
            })
            .collect();
        let spike_at = got
            .iter()
            .find(|f| f.1 == FaultKind::Spike)
            .expect("the spike is labelled")
            .2;
        // At the fan sensor's first sample at or after 5 min.
        assert!((300_000..301_000).contains(&spike_at), "{spike_at}");
        let fan = format!("{OVEN}/fan-speed");
        let stuck = format!("{press}/oil-temp");
        assert_eq!(
            got,
            vec![
                (fan.as_str(), FaultKind::Spike, spike_at, Some(spike_at)),
                (press, FaultKind::Breakdown, 1_800_000, Some(2_400_000)),
                (
                    stuck.as_str(),
                    FaultKind::StuckSensor,
                    3_600_000,
                    Some(3_900_000)
                ),
                // Wear ends in a breakdown; the repair replaces the bearing.
                (press, FaultKind::BearingWear, 7_200_000, got[4].3),
                (press, FaultKind::Breakdown, 10_800_000, got[4].3),
            ]
        );
        let repaired = got[4].3.expect("repaired within the hour");
        assert!((10_800_000 + 300_000..=10_800_000 + 1_800_000).contains(&repaired));
        let down = Value::Int(MachineState::Down.code());
        let press_id = AssetPath::parse(press).expect("valid").id();
        assert!(readings.iter().any(|r| r.asset == press_id
            && r.property == Property::State
            && r.value == down
            && r.source_ts == START.plus_ms(1_800_000)));
    }

    #[test]
    fn network_loss_window_has_no_readings_from_the_machine() {
        let spec = line_plant();
        let text = format!("version = 1\n{}", fault(OVEN, "network_loss", "5m", "3m"));
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        let readings = run(&mut sim, 15 * 60, 1000);
        let oven = AssetPath::parse(OVEN).expect("valid");
        let ids: Vec<AssetId> = spec
            .assets()
            .iter()
            .filter(|a| a.path.starts_with(&oven))
            .map(|a| a.path.id())
            .collect();
        let (from, to) = (START.plus_ms(300_000), START.plus_ms(480_000));
        let of_oven = |r: &&Reading| ids.contains(&r.asset);
        assert!(
            !readings
                .iter()
                .filter(of_oven)
                .any(|r| r.source_ts >= from && r.source_ts < to)
        );
        assert!(readings.iter().filter(of_oven).any(|r| r.source_ts < from));
        assert!(readings.iter().filter(of_oven).any(|r| r.source_ts >= to));
        // The other machines keep reporting.
        assert!(
            readings
                .iter()
                .any(|r| !ids.contains(&r.asset) && r.source_ts >= from && r.source_ts < to)
        );
        assert!(sim.faults().contains(&FaultLabel {
            asset: oven,
            kind: FaultKind::NetworkLoss,
            start: from,
            end: Some(to),
        }));
    }

    #[test]
    fn a_scenario_without_faults_runs_like_the_plain_simulation() {
        let spec = line_plant();
        let plain = run(&mut PlantSim::new(&spec, 5, START), 3600, 1000);
        let s = scenario(&spec, "version = 1\n");
        let same = run(
            &mut PlantSim::with_scenario(&spec, 5, START, &s),
            3600,
            1000,
        );
        assert_eq!(plain, same);
        let seeded = scenario(&spec, "version = 1\nseed = 5\n");
        let overridden = run(
            &mut PlantSim::with_scenario(&spec, 99, START, &seeded),
            3600,
            1000,
        );
        assert_eq!(plain, overridden);
    }

    #[test]
    fn final_labels_end_open_faults_at_the_end_of_the_run() {
        let spec = line_plant();
        let text = format!(
            "version = 1\nrandom_faults = false\n{}",
            fault(OVEN, "network_loss", "1m", "1h")
        );
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        run(&mut sim, 120, 1000);
        assert_eq!(sim.faults()[0].end, None);
        assert_eq!(sim.final_labels()[0].end, Some(START.plus_ms(120_000)));
    }

    /// Parts (good + scrap) the machine at `path` made in the readings.
    fn parts_of(readings: &[Reading], id: AssetId) -> i64 {
        let last = |p: Property| {
            readings
                .iter()
                .rev()
                .find(|r| r.asset == id && r.property == p)
                .map_or(0, |r| match r.value {
                    Value::Int(n) => n,
                    _ => 0,
                })
        };
        last(Property::GoodCount) + last(Property::ScrapCount)
    }

    #[test]
    fn speed_setpoint_scales_the_part_rate_and_stops_production_at_zero() {
        let spec = line_plant();
        let press = AssetPath::parse("acme/berlin/assembly/line-1/press-1")
            .expect("valid")
            .id();
        let mut nominal = PlantSim::with_scenario(
            &spec,
            3,
            START,
            &scenario(&spec, "version = 1\nrandom_faults = false\n"),
        );
        let mut fast = PlantSim::with_scenario(
            &spec,
            3,
            START,
            &scenario(&spec, "version = 1\nrandom_faults = false\n"),
        );
        assert!(fast.set_speed_pct(press, 200));
        assert!(!fast.set_speed_pct(AssetPath::parse("acme/nope").expect("valid").id(), 50));
        let a = parts_of(&run(&mut nominal, 4 * 3600, 1000), press);
        let b = parts_of(&run(&mut fast, 4 * 3600, 1000), press);
        assert!(a > 100, "the press makes parts: {a}");
        assert!(b * 10 > a * 17, "200 % makes ~2x the parts: {b} vs {a}");
        // Stopped: the counters stay where they are.
        let mut stopped = PlantSim::with_scenario(
            &spec,
            3,
            START,
            &scenario(&spec, "version = 1\nrandom_faults = false\n"),
        );
        run(&mut stopped, 600, 1000);
        assert!(stopped.set_speed_pct(press, 0));
        let later = run(&mut stopped, 3600, 1000);
        assert!(
            !later
                .iter()
                .any(|r| r.asset == press && r.property == Property::GoodCount)
        );
    }

    #[test]
    fn run_enable_false_holds_the_machine_idle_and_true_lets_it_run_again() {
        let spec = line_plant();
        let press = AssetPath::parse("acme/berlin/assembly/line-1/press-1")
            .expect("valid")
            .id();
        let quiet = scenario(&spec, "version = 1\nrandom_faults = false\n");
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &quiet);
        run(&mut sim, 600, 1000);
        assert!(sim.set_run_enable(press, false));
        assert!(!sim.set_run_enable(AssetPath::parse("acme/nope").expect("valid").id(), false));
        let held = run(&mut sim, 2 * 3600, 1000);
        let states: Vec<i64> = held
            .iter()
            .filter(|r| r.asset == press && r.property == Property::State)
            .map(|r| match r.value {
                Value::Int(n) => n,
                _ => -1,
            })
            .collect();
        assert!(
            states.iter().all(|s| *s == MachineState::Idle.code()),
            "{states:?}"
        );
        assert_eq!(parts_of(&held, press), 0, "no parts while disabled");
        assert!(
            sim.machine_statuses()
                .any(|s| s.machine == press && !s.run_enabled)
        );
        assert!(sim.set_run_enable(press, true));
        let again = run(&mut sim, 4 * 3600, 1000);
        assert!(parts_of(&again, press) > 50, "runs again");
    }

    #[test]
    fn machine_status_marks_a_stuck_sensor_and_a_network_loss_while_they_last() {
        let spec = line_plant();
        let press = "acme/berlin/assembly/line-1/press-1";
        let text = format!(
            "version = 1\nrandom_faults = false\n{}{}",
            fault(&format!("{press}/oil-temp"), "stuck_sensor", "10m", "5m"),
            fault(press, "network_loss", "30m", "5m"),
        );
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        let id = AssetPath::parse(press).expect("valid").id();
        let status = |sim: &PlantSim| {
            sim.machine_statuses()
                .find(|s| s.machine == id)
                .expect("the press")
        };
        run(&mut sim, 9 * 60, 1000);
        assert_eq!(
            (status(&sim).fault_active, status(&sim).bad_sensors),
            (false, 0)
        );
        run(&mut sim, 12 * 60, 1000);
        let stuck = status(&sim);
        assert!(stuck.fault_active);
        assert_eq!(stuck.bad_sensors.count_ones(), 1, "{:b}", stuck.bad_sensors);
        run(&mut sim, 20 * 60, 1000);
        assert_eq!(
            (status(&sim).fault_active, status(&sim).bad_sensors),
            (false, 0)
        );
        run(&mut sim, 32 * 60, 1000);
        let lost = status(&sim);
        let sensors = spec
            .assets()
            .iter()
            .filter(|a| a.path.as_str().starts_with(&format!("{press}/")))
            .count();
        assert!(lost.fault_active);
        assert_eq!(lost.bad_sensors, (1u64 << sensors) - 1);
        run(&mut sim, 40 * 60, 1000);
        assert!(!status(&sim).fault_active);
    }

    /// FNV-1a of the labels of the kinds that existed before dropout and sensor_bias, and of
    /// every machine reading (state, counters: no sensor fault touches them), over 6 h of the
    /// demo plant at seed 1. Pinned from the code before those kinds were added: they draw
    /// from their own stream, so adding them moved nothing of the others.
    #[test]
    fn older_fault_kinds_and_machine_readings_are_what_they_were_before_dropout_and_bias() {
        let (spec, _) = demo();
        let mut sim = PlantSim::new(&spec, 1, START);
        let readings = run(&mut sim, 6 * 3600, 1000);
        let mut text = String::new();
        let older = [
            FaultKind::Overheating,
            FaultKind::BearingWear,
            FaultKind::StuckSensor,
            FaultKind::Spike,
            FaultKind::Breakdown,
            FaultKind::NetworkLoss,
        ];
        for f in sim.faults().iter().filter(|f| older.contains(&f.kind)) {
            text.push_str(&format!(
                "{} {} {} {:?}\n",
                f.asset,
                f.kind.as_str(),
                f.start.0,
                f.end
            ));
        }
        let labels = text.lines().count();
        for r in readings.iter().filter(|r| r.property != Property::Value) {
            text.push_str(&format!(
                "{:?} {:?} {:?} {}\n",
                r.asset, r.property, r.value, r.source_ts.0
            ));
        }
        println!("{labels} labels, hash {:#x}", fnv1a(text.as_bytes()));
        assert_eq!(
            (labels, fnv1a(text.as_bytes())),
            (434, 0x31e5_0644_8c92_2dd4)
        );
    }

    /// Readings of `sensor` as (time, value) in the readings' order.
    fn series(readings: &[Reading], sensor: &AssetPath) -> Vec<(i64, f64)> {
        readings
            .iter()
            .filter(|r| r.asset == sensor.id() && r.property == Property::Value)
            .map(|r| (r.source_ts.0, r.value.as_f64()))
            .collect()
    }

    #[test]
    fn scheduled_dropout_silences_one_sensor_for_its_window_and_marks_it_bad() {
        let spec = line_plant();
        let press = "acme/berlin/assembly/line-1/press-1";
        let oil = AssetPath::parse(&format!("{press}/oil-temp")).expect("valid");
        let text = format!(
            "version = 1\nrandom_faults = false\n{}",
            fault(oil.as_str(), "dropout", "5m", "2m")
        );
        let mut sim = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        let id = AssetPath::parse(press).expect("valid").id();
        let status = |sim: &PlantSim| {
            sim.machine_statuses()
                .find(|s| s.machine == id)
                .expect("the press")
        };
        let mut readings = run(&mut sim, 6 * 60, 1000);
        let during = status(&sim);
        assert!(during.fault_active);
        // oil-temp is the press's first sensor: bit 0.
        assert_eq!(during.bad_sensors, 1);
        readings.extend(run(&mut sim, 10 * 60, 1000));
        assert_eq!(
            (status(&sim).fault_active, status(&sim).bad_sensors),
            (false, 0)
        );
        let (from, to) = (START.plus_ms(300_000).0, START.plus_ms(420_000).0);
        let oil_ts: Vec<i64> = series(&readings, &oil).iter().map(|(t, _)| *t).collect();
        assert!(
            !oil_ts.iter().any(|t| (from..to).contains(t)),
            "silent in the window"
        );
        assert!(oil_ts.iter().any(|t| *t < from) && oil_ts.iter().any(|t| *t >= to));
        // 2 min of 1 s samples missing out of 10 min, nothing else.
        assert_eq!(oil_ts.len(), 600 - 120);
        // The press's other sensors keep reporting through it.
        let vibration = AssetPath::parse(&format!("{press}/vibration")).expect("valid");
        assert!(
            series(&readings, &vibration)
                .iter()
                .any(|(t, _)| (from..to).contains(t))
        );
        assert_eq!(
            sim.faults(),
            [FaultLabel {
                asset: oil,
                kind: FaultKind::Dropout,
                start: Timestamp(from),
                end: Some(Timestamp(to)),
            }]
        );
    }

    #[test]
    fn scheduled_sensor_bias_offsets_one_sensor_by_a_constant_and_its_plc_does_not_flag_it() {
        let spec = line_plant();
        let press = "acme/berlin/assembly/line-1/press-1";
        let pressure = AssetPath::parse(&format!("{press}/hydraulic-pressure")).expect("valid");
        let quiet = "version = 1\nrandom_faults = false\n";
        let text = format!(
            "{quiet}{}",
            fault(pressure.as_str(), "sensor_bias", "5m", "10m")
        );
        let mut biased = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, &text));
        let mut truth = PlantSim::with_scenario(&spec, 3, START, &scenario(&spec, quiet));
        let mut got = run(&mut biased, 10 * 60, 1000);
        let id = AssetPath::parse(press).expect("valid").id();
        let status = biased
            .machine_statuses()
            .find(|s| s.machine == id)
            .expect("the press");
        assert_eq!((status.fault_active, status.bad_sensors), (false, 0));
        got.extend(run(&mut biased, 20 * 60, 1000));
        let want = run(&mut truth, 20 * 60, 1000);
        let (from, to) = (START.plus_ms(300_000).0, START.plus_ms(900_000).0);
        let (a, b) = (series(&got, &pressure), series(&want, &pressure));
        assert_eq!(a.len(), b.len(), "a biased sensor keeps reporting");
        let offsets: Vec<f64> = a
            .iter()
            .zip(&b)
            .filter(|((t, _), _)| (from..to).contains(t))
            .map(|((_, x), (_, y))| x - y)
            .collect();
        assert_eq!(offsets.len(), 600);
        let span = 350.0;
        let offset = offsets[0];
        assert!(
            (0.02 * span..=0.05 * span).contains(&offset.abs()),
            "{offset} is 2-5 % of the range"
        );
        assert!(
            offsets.iter().all(|o| (o - offset).abs() < 1e-9),
            "constant"
        );
        // True outside the window, and every other sensor untouched.
        assert!(
            a.iter()
                .zip(&b)
                .filter(|((t, _), _)| !(from..to).contains(t))
                .all(|(x, y)| x == y)
        );
        let others = |r: &&Reading| r.asset != pressure.id();
        assert!(got.iter().filter(others).eq(want.iter().filter(others)));
        assert_eq!(
            biased.faults(),
            [FaultLabel {
                asset: pressure,
                kind: FaultKind::SensorBias,
                start: Timestamp(from),
                end: Some(Timestamp(to)),
            }]
        );
    }

    #[test]
    fn random_dropouts_and_biases_come_from_the_seed_and_are_labelled_on_sensors() {
        let (spec, assets) = demo();
        let sensors: HashMap<&AssetPath, (f64, f64)> = assets
            .iter()
            .filter_map(|a| match &a.kind {
                AssetKind::Sensor { spec, .. } => {
                    Some((&a.path, (spec.min.unwrap_or(0.0), spec.max.unwrap_or(0.0))))
                }
                _ => None,
            })
            .collect();
        // Ten times the usual rates keeps the run short (debug builds run these tests).
        let often = scenario(&spec, "version = 1\nfault_rate = 10.0\n");
        let mut sim = PlantSim::with_scenario(&spec, 1, START, &often);
        let readings = run(&mut sim, 2 * 3600, 1000);
        let of = |kind| -> Vec<FaultLabel> {
            sim.faults()
                .iter()
                .filter(|f| f.kind == kind)
                .cloned()
                .collect()
        };
        let (dropouts, biases) = (of(FaultKind::Dropout), of(FaultKind::SensorBias));
        // 24 machines × 2 h × 10: about 40 dropouts (one per 12 h each) and 20 biases.
        assert!((20..=70).contains(&dropouts.len()), "{}", dropouts.len());
        assert!((8..=40).contains(&biases.len()), "{}", biases.len());
        for f in dropouts.iter().chain(&biases) {
            assert!(sensors.contains_key(&f.asset), "{f:?} is on a sensor");
            let Some(end) = f.end else { continue };
            let secs = (end.0 - f.start.0) / 1_000_000;
            let (lo, hi) = if f.kind == FaultKind::Dropout {
                DROPOUT_S
            } else {
                BIAS_S
            };
            assert!((lo as i64..=hi as i64).contains(&secs), "{f:?}");
        }
        let mut times: HashMap<AssetId, Vec<i64>> = dropouts
            .iter()
            .map(|f| (f.asset.id(), Vec::new()))
            .collect();
        for r in readings.iter().filter(|r| r.property == Property::Value) {
            if let Some(ts) = times.get_mut(&r.asset) {
                ts.push(r.source_ts.0);
            }
        }
        for f in dropouts.iter().filter(|f| f.end.is_some()) {
            let window = f.start.0..f.end.expect("filtered").0;
            let ts = &times[&f.asset.id()];
            assert!(!ts.iter().any(|t| window.contains(t)), "{f:?}");
            assert!(ts.iter().any(|t| *t >= window.end), "{f:?} resumes");
        }
        // Same seed, same faults.
        let mut again = PlantSim::with_scenario(&spec, 1, START, &often);
        run(&mut again, 2 * 3600, 1000);
        assert_eq!(again.faults(), sim.faults());
        // Scheduled-only runs draw none.
        let quiet = scenario(&spec, "version = 1\nrandom_faults = false\n");
        let mut none = PlantSim::with_scenario(&spec, 1, START, &quiet);
        run(&mut none, 3600, 1000);
        assert!(none.faults().is_empty());
    }

    #[test]
    fn stable_hash_is_fnv1a() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
    }

    /// `cargo test --release -p ferrotwin-sim step_time -- --nocapture` prints the time of
    /// one-second steps of a 100k-sensor plant.
    #[test]
    fn step_time_of_a_100k_sensor_plant() {
        let spec = generate(
            PlantSize {
                sites: 1,
                areas: 10,
                lines: 20,
                machines: 50,
                sensors_per_machine: 10,
            },
            1,
        );
        let built = std::time::Instant::now();
        let mut sim = PlantSim::new(&spec, 1, START);
        let build_ms = built.elapsed().as_secs_f64() * 1e3;
        assert_eq!(sim.sensor_count(), 100_000);
        let mut out = Vec::with_capacity(200_000);
        sim.step(START, &mut out);
        let mut times = Vec::new();
        for s in 1..=5 {
            out.clear();
            let t0 = std::time::Instant::now();
            sim.step(START.plus_ms(s * 1000), &mut out);
            times.push(t0.elapsed().as_secs_f64() * 1e3);
            assert!(out.len() >= 100_000);
        }
        println!(
            "100k sensors: build {build_ms:.0} ms, 1 s steps {times:.1?} ms ({} readings per step)",
            out.len()
        );
    }
}
