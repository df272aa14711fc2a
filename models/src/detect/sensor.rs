//! One sensor's anomaly detector: four small streaming detectors on its readings, combined
//! into one score and one episode at a time.
//!
//! - **level**: z-score of the value against an EWMA mean and an EWMA variance. The variance
//!   is learned per regime (a machine's vibration is quieter idle than running); the mean
//!   restarts at every regime change, after the sensor has settled, since a state change moves
//!   levels (power, speed) and a changeover brings new setpoints.
//! - **rate_of_change**: an EWMA of the sample-to-sample difference against its learned spread.
//! - **stuck**: a run of identical values, scored by how unlikely the run is given how often
//!   the sensor repeats itself in this regime (learned): a sensor that is always constant, or
//!   is constant in a state (speed at standstill), never alarms there.
//! - **spike**: one sample far from the median of its neighbours (robust z with the median
//!   absolute deviation of the 8 samples around it) while the next sample is back. A step
//!   or a ramp is not a spike, so it is judged one sample late.
//!
//! Each raw statistic is scaled so its own alarm line (`level_z`, `rate_z`, ...) lands on
//! `threshold`; the combined score is the largest. No score is given during a regime's
//! warm-up (`warmup_samples` readings in that regime) or while the sensor settles after a
//! regime change (`settle_samples` readings); stuck and spike scoring go on while settling,
//! since neither a step nor a ramp look like them.

use super::{
    AnomalyTransition, DecodeError, DetectorKind, EpisodeTracker, Hysteresis, Reader, Regime,
};
use crate::value::Timestamp;

/// Samples around a spike candidate: the candidate, 7 before it and 1 after it.
pub const SPIKE_WINDOW: usize = 9;

/// Scores are capped here: finite, and a single absurd reading cannot make a peak that
/// dwarfs everything after it.
const MAX_SCORE: f64 = 1e6;

/// Readings of larger magnitude are ignored like non-finite ones: no sensor reads that, and
/// below it every squared difference the detectors form stays finite.
pub const MAX_MAGNITUDE: f64 = 1e150;

/// Per sensor detector settings (`[machine_types.T.sensors.detect]` in the plant spec).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SensorDetectorConfig {
    pub enabled: bool,
    /// The score at which an episode starts (every detector's alarm line maps here).
    pub threshold: f64,
    /// An episode ends once the score stays under this for `off_delay_ms`.
    pub release: f64,
    pub on_delay_ms: u64,
    pub off_delay_ms: u64,
    /// Readings in a regime before the level and rate detectors score in it.
    pub warmup_samples: u32,
    /// Readings after a regime change before the level and rate detectors score again.
    pub settle_samples: u32,
    pub level: bool,
    /// Weight of a new reading in the level's mean.
    pub level_alpha: f64,
    /// Weight of a new level change in the level's trend; 0 = no trend (plain EWMA).
    pub level_trend_alpha: f64,
    /// Weight of a new squared deviation in the level's variance.
    pub level_var_alpha: f64,
    /// The z-score that is anomalous.
    pub level_z: f64,
    pub rate: bool,
    /// Weight of a new difference in the smoothed rate.
    pub rate_alpha: f64,
    pub rate_z: f64,
    pub stuck: bool,
    /// Shortest run of identical readings that can be stuck.
    pub stuck_min_samples: u32,
    /// How unlikely (as -ln of its probability) a run must be to be stuck: 18.4 is 1e-8.
    pub stuck_surprise: f64,
    pub spike: bool,
    /// The robust z-score (against the neighbours' median absolute deviation) of a spike.
    pub spike_z: f64,
}

impl Default for SensorDetectorConfig {
    fn default() -> SensorDetectorConfig {
        SensorDetectorConfig {
            enabled: true,
            threshold: 3.0,
            release: 2.0,
            on_delay_ms: 0,
            off_delay_ms: 30_000,
            warmup_samples: 120,
            settle_samples: 20,
            level: true,
            level_alpha: 0.1,
            level_trend_alpha: 0.0,
            level_var_alpha: 0.005,
            level_z: 8.0,
            rate: true,
            rate_alpha: 0.3,
            rate_z: 7.0,
            stuck: true,
            stuck_min_samples: 10,
            stuck_surprise: 18.4,
            spike: true,
            spike_z: 10.0,
        }
    }
}

impl SensorDetectorConfig {
    /// Every problem of the settings, each naming its field (`detect.level_alpha: ...`).
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let mut positive = |name: &str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                p.push(format!("detect.{name} must be a positive number, got {v}"));
            }
        };
        positive("threshold", self.threshold);
        positive("level_z", self.level_z);
        positive("rate_z", self.rate_z);
        positive("spike_z", self.spike_z);
        positive("stuck_surprise", self.stuck_surprise);
        if !(self.release.is_finite() && self.release >= 0.0 && self.release < self.threshold) {
            p.push(format!(
                "detect.release must be at least 0 and below threshold {}, got {}",
                self.threshold, self.release
            ));
        }
        if !(self.level_trend_alpha.is_finite() && (0.0..=1.0).contains(&self.level_trend_alpha)) {
            p.push(format!(
                "detect.level_trend_alpha must be in [0, 1], got {}",
                self.level_trend_alpha
            ));
        }
        for (name, v) in [
            ("level_alpha", self.level_alpha),
            ("level_var_alpha", self.level_var_alpha),
            ("rate_alpha", self.rate_alpha),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 1.0) {
                p.push(format!("detect.{name} must be in (0, 1], got {v}"));
            }
        }
        for (name, v, max) in [
            ("warmup_samples", self.warmup_samples, 100_000),
            ("settle_samples", self.settle_samples, 10_000),
            ("stuck_min_samples", self.stuck_min_samples, 1_000_000),
        ] {
            if v > max {
                p.push(format!("detect.{name} must be at most {max}, got {v}"));
            }
        }
        if self.stuck_min_samples < 2 {
            p.push("detect.stuck_min_samples must be at least 2".to_string());
        }
        const DAY_MS: u64 = 86_400_000;
        for (name, v) in [
            ("on_delay_ms", self.on_delay_ms),
            ("off_delay_ms", self.off_delay_ms),
        ] {
            if v > DAY_MS {
                p.push(format!(
                    "detect.{name} must be at most {DAY_MS} (one day), got {v}"
                ));
            }
        }
        p
    }

    fn hysteresis(&self) -> Hysteresis {
        Hysteresis {
            threshold: self.threshold,
            release: self.release,
            on_delay_ms: self.on_delay_ms,
            off_delay_ms: self.off_delay_ms,
        }
    }
}

/// What one reading did to the detector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SensorVerdict {
    /// Combined anomaly score (the largest detector score), finite and >= 0.
    pub score: f64,
    pub transition: Option<AnomalyTransition>,
}

/// Learned state of one sensor's detectors: fixed size, no heap.
#[derive(Debug, Clone, PartialEq)]
pub struct SensorDetector {
    /// Last readings, `SPIKE_WINDOW` of them once full; `ring_pos` is the next slot.
    ring: [f64; SPIKE_WINDOW],
    ring_len: u8,
    ring_pos: u8,
    regime: u8,
    /// Readings left before the level and rate detectors score after a regime change.
    settle_left: u16,
    /// Readings seen per regime, saturating at `u16::MAX`.
    regime_n: [u16; Regime::SLOTS],
    /// Level variance per regime.
    level_var: [f64; Regime::SLOTS],
    /// How often a reading repeats the previous one, per regime.
    repeat_p: [f32; Regime::SLOTS],
    /// Level mean of this regime epoch; `level_live` false until it is seeded after settling.
    level_mean: f64,
    /// Level change per reading (Holt's trend).
    level_trend: f64,
    level_live: bool,
    /// The last reading the level and rate took in (spikes are left out).
    accepted: f64,
    accepted_set: bool,
    rate: f64,
    rate_var: f64,
    rate_n: u32,
    /// Mean absolute sample-to-sample difference, over all regimes: the sensor's noise.
    noise: f64,
    /// Differences `noise` learned from.
    noise_n: u32,
    /// Identical readings in a row (1 = the last differs from the one before).
    run: u32,
    score: f64,
    /// The detector behind `score`.
    top: DetectorKind,
    episode: EpisodeTracker,
}

const VERSION: u8 = 1;
const ENCODED_LEN: usize = 1
    + 8 * SPIKE_WINDOW
    + 4
    + 2
    + 2 * Regime::SLOTS
    + 8 * Regime::SLOTS
    + 4 * Regime::SLOTS
    + 8 * 2
    + 1
    + 8
    + 1
    + 8 * 2
    + 4
    + 8
    + 4
    + 4
    + 8
    + 1
    + EpisodeTracker::ENCODED_LEN;

/// Weight of a new value in the long-run statistics (noise, rate spread, repeat rate) once
/// warmed up: about the last 500 readings.
const SLOW_ALPHA: f64 = 1.0 / 512.0;
/// Weight of a reading in the repeat rate once warmed up: about the last 4096 readings, so a
/// stuck fault of minutes that slipped in barely moves it.
const REPEAT_ALPHA: f64 = 1.0 / 4096.0;

impl SensorDetector {
    pub fn new(_cfg: &SensorDetectorConfig) -> SensorDetector {
        SensorDetector {
            ring: [0.0; SPIKE_WINDOW],
            ring_len: 0,
            ring_pos: 0,
            regime: Regime::UNKNOWN.0,
            settle_left: 0,
            regime_n: [0; Regime::SLOTS],
            level_var: [0.0; Regime::SLOTS],
            // Assume constant until shown otherwise: no stuck alarm before it is learned.
            repeat_p: [1.0; Regime::SLOTS],
            level_mean: 0.0,
            level_trend: 0.0,
            level_live: false,
            accepted: 0.0,
            accepted_set: false,
            rate: 0.0,
            rate_var: 0.0,
            rate_n: 0,
            noise: 0.0,
            noise_n: 0,
            run: 0,
            score: 0.0,
            top: DetectorKind::Level,
            episode: EpisodeTracker::new(),
        }
    }

    /// Latest combined anomaly score.
    pub fn score(&self) -> f64 {
        self.score
    }

    /// The detector of the episode in progress, if any.
    pub fn active(&self) -> Option<DetectorKind> {
        self.episode.active()
    }

    /// The most recent reading (`None` before the first).
    fn last(&self) -> Option<f64> {
        (self.ring_len > 0).then(|| self.ring[self.back(1)])
    }

    /// Ring index of the reading `k` back (1 = the latest).
    fn back(&self, k: usize) -> usize {
        (usize::from(self.ring_pos) + SPIKE_WINDOW - k) % SPIKE_WINDOW
    }

    /// Feeds one reading of the sensor at its source time `ts`, while its machine is in
    /// `regime`. A non-finite `v` (or one beyond `MAX_MAGNITUDE`) is ignored: state
    /// unchanged, last score returned.
    pub fn update(
        &mut self,
        cfg: &SensorDetectorConfig,
        ts: Timestamp,
        v: f64,
        regime: Regime,
    ) -> SensorVerdict {
        if v.is_nan() || v.abs() > MAX_MAGNITUDE || regime == Regime::LATE {
            return SensorVerdict {
                score: self.score,
                transition: None,
            };
        }
        if !cfg.enabled {
            self.score = 0.0;
            let transition = self
                .episode
                .update(&cfg.hysteresis(), ts, 0.0, DetectorKind::Level);
            return SensorVerdict {
                score: 0.0,
                transition,
            };
        }
        let slot = regime.slot();
        let first = self.ring_len == 0;
        if !first && regime.0 != self.regime {
            self.settle_left = u16::try_from(cfg.settle_samples).unwrap_or(u16::MAX);
            self.level_live = false;
        }
        self.regime = regime.0;
        let n = self.regime_n[slot];
        self.regime_n[slot] = n.saturating_add(1);
        let warmed = u32::from(n) >= cfg.warmup_samples;

        let mut best = (0.0f64, DetectorKind::Level);
        let mut offer = |score: f64, kind: DetectorKind| {
            if score > best.0 {
                best = (score, kind);
            }
        };
        let scale = |z: f64, line: f64| (z / line * cfg.threshold).clamp(0.0, MAX_SCORE);

        // Stuck: judged before the noise statistics learn from this reading.
        let repeat = self.last() == Some(v);
        self.run = if repeat {
            self.run.saturating_add(1)
        } else {
            1
        };
        let mut stuck_score = 0.0;
        if cfg.stuck && warmed && self.run >= cfg.stuck_min_samples {
            // A sensor that never repeated still gets a finite surprise per repeat.
            let p = f64::from(self.repeat_p[slot]).clamp(0.01, 1.0);
            let surprise = f64::from(self.run - 1) * -p.ln();
            stuck_score = scale(surprise, cfg.stuck_surprise);
            offer(stuck_score, DetectorKind::Stuck);
        }
        // Learn the repeat rate from every reading (a sensor constant for long stretches must
        // learn that it is), except from a run already judged stuck and from a transient
        // (a spindle coasting to standstill is not how it behaves once stopped).
        if stuck_score < cfg.release && self.settle_left == 0 {
            let a = (1.0 / (f64::from(n) + 1.0)).max(REPEAT_ALPHA);
            let p = f64::from(self.repeat_p[slot]);
            self.repeat_p[slot] = (p + a * (f64::from(u8::from(repeat)) - p)) as f32;
        }

        // Spike: the previous reading against its neighbours, now that the next one is in.
        self.push(v);
        let mut outlier = false;
        // Spikes are judged once the noise is known: an integer sensor's first few readings
        // may all be equal.
        if usize::from(self.ring_len) == SPIKE_WINDOW && self.noise_n >= cfg.warmup_samples {
            let z = self.spike_z(cfg.spike_z);
            // Even half a spike is kept out of the level and rate: a lone outlier would
            // otherwise show as a level jump too, and be learned as noise.
            outlier = z >= cfg.spike_z / 2.0;
            if cfg.spike {
                offer(scale(z, cfg.spike_z), DetectorKind::Spike);
            }
        }
        // Level and rate judge the previous reading too, once it is known not to be a spike.
        if self.ring_len >= 2 && !outlier {
            let c = self.ring[self.back(2)];
            let diff = self.accepted_set.then_some(c - self.accepted);
            self.accepted = c;
            self.accepted_set = true;
            if let Some(d) = diff {
                // A stuck run is not the sensor's noise.
                if self.run < cfg.stuck_min_samples {
                    let a = learn_rate(u16::try_from(self.noise_n).unwrap_or(u16::MAX));
                    self.noise += a * (d.abs() - self.noise);
                    self.noise_n = self.noise_n.saturating_add(1);
                }
                // Followed through transients too: it seeds the level's trend after settling.
                self.rate += cfg.rate_alpha * (d - self.rate);
                if self.settle_left == 0 {
                    if cfg.rate && warmed && self.rate_n >= cfg.warmup_samples {
                        let sd = self
                            .rate_var
                            .sqrt()
                            .max(self.noise_floor() * cfg.rate_alpha);
                        let z = if sd > 0.0 { self.rate.abs() / sd } else { 0.0 };
                        offer(scale(z, cfg.rate_z), DetectorKind::RateOfChange);
                    }
                    let a = learn_rate(u16::try_from(self.rate_n).unwrap_or(u16::MAX));
                    let sq = winsorised(self.rate * self.rate, self.rate_var, self.rate_n);
                    self.rate_var += a * (sq - self.rate_var);
                    self.rate_n = self.rate_n.saturating_add(1);
                }
            }

            if self.settle_left > 0 {
                self.settle_left -= 1;
            } else if !self.level_live {
                self.level_mean = c;
                // A temperature still drifting after a state change goes on drifting.
                self.level_trend = if cfg.level_trend_alpha > 0.0 {
                    self.rate
                } else {
                    0.0
                };
                self.level_live = true;
            } else {
                let forecast = self.level_mean + self.level_trend;
                let dev = c - forecast;
                let var = self.level_var[slot];
                if cfg.level && warmed {
                    let sd = var.sqrt().max(self.noise_floor());
                    let z = if sd > 0.0 { dev.abs() / sd } else { 0.0 };
                    offer(scale(z, cfg.level_z), DetectorKind::Level);
                }
                // Holt's linear trend: a slow drift (a machine warming up) is followed, not
                // flagged; an acceleration (overheating) still is.
                let mean = forecast + cfg.level_alpha * dev;
                self.level_trend +=
                    cfg.level_trend_alpha * (mean - self.level_mean - self.level_trend);
                self.level_mean = mean;
                let a = if warmed {
                    cfg.level_var_alpha
                } else {
                    learn_rate(n).max(cfg.level_var_alpha)
                };
                let sq = winsorised(dev * dev, var, u32::from(n));
                self.level_var[slot] = var + a * (sq - var);
            }
        }

        let (score, kind) = best;
        let score = if score.is_finite() { score } else { 0.0 };
        self.score = score;
        self.top = kind;
        let transition = self.episode.update(&cfg.hysteresis(), ts, score, kind);
        SensorVerdict { score, transition }
    }

    fn push(&mut self, v: f64) {
        self.ring[usize::from(self.ring_pos)] = v;
        self.ring_pos = ((usize::from(self.ring_pos) + 1) % SPIKE_WINDOW) as u8;
        if usize::from(self.ring_len) < SPIKE_WINDOW {
            self.ring_len += 1;
        }
    }

    /// A scale under which no deviation is judged: half the sensor's typical step (for a
    /// Gaussian the mean absolute difference is 1.13 σ), so an integer sensor's ±1 is noise.
    fn noise_floor(&self) -> f64 {
        0.5 * self.noise
    }

    /// Robust z of the reading before the latest against the 8 others of the window, 0 if
    /// the latest is off too (a step or a ramp, not a spike).
    fn spike_z(&self, line: f64) -> f64 {
        let cand = self.ring[self.back(2)];
        let latest = self.ring[self.back(1)];
        let mut others = [0.0f64; SPIKE_WINDOW - 1];
        for (k, back) in (1..=SPIKE_WINDOW).filter(|&b| b != 2).enumerate() {
            others[k] = self.ring[self.back(back)];
        }
        let med = median8(&mut others);
        for o in &mut others {
            *o = (*o - med).abs();
        }
        let mad = median8(&mut others);
        // The whole typical step as the floor: 8 samples can show a MAD well under the noise.
        let sd = (1.4826 * mad)
            .max(self.noise)
            .max(1e-12 * (1.0 + med.abs()));
        let z = (cand - med).abs() / sd;
        let back = (latest - med).abs() / sd;
        if z.is_finite() && back < line / 2.0 && back < z / 4.0 {
            z
        } else {
            0.0
        }
    }

    /// Appends the learned state (versioned, fixed length).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(ENCODED_LEN);
        out.push(VERSION);
        for v in self.ring {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&[self.ring_len, self.ring_pos, self.regime, 0]);
        out.extend_from_slice(&self.settle_left.to_le_bytes());
        for n in self.regime_n {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for v in self.level_var {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for p in self.repeat_p {
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&self.level_mean.to_le_bytes());
        out.extend_from_slice(&self.level_trend.to_le_bytes());
        out.push(u8::from(self.level_live));
        out.extend_from_slice(&self.accepted.to_le_bytes());
        out.push(u8::from(self.accepted_set));
        out.extend_from_slice(&self.rate.to_le_bytes());
        out.extend_from_slice(&self.rate_var.to_le_bytes());
        out.extend_from_slice(&self.rate_n.to_le_bytes());
        out.extend_from_slice(&self.noise.to_le_bytes());
        out.extend_from_slice(&self.noise_n.to_le_bytes());
        out.extend_from_slice(&self.run.to_le_bytes());
        out.extend_from_slice(&self.score.to_le_bytes());
        out.push(self.top.code());
        self.episode.encode(out);
    }

    /// Restores what `encode` wrote; refuses other versions, lengths and impossible values.
    pub fn decode(bytes: &[u8]) -> Result<SensorDetector, DecodeError> {
        let mut r = Reader::new(bytes, "sensor detector", VERSION, ENCODED_LEN)?;
        let mut ring = [0.0; SPIKE_WINDOW];
        for v in &mut ring {
            *v = r.f64("ring")?;
        }
        let ring_len = r.u8()?;
        let ring_pos = r.u8()?;
        if usize::from(ring_len) > SPIKE_WINDOW || usize::from(ring_pos) >= SPIKE_WINDOW {
            return Err(r.bad(
                "ring",
                format!(
                    "length {ring_len} / position {ring_pos} outside a window of {SPIKE_WINDOW}"
                ),
            ));
        }
        let regime = r.u8()?;
        r.u8()?;
        let settle_left = r.u16()?;
        let mut regime_n = [0u16; Regime::SLOTS];
        for n in &mut regime_n {
            *n = r.u16()?;
        }
        let mut level_var = [0.0; Regime::SLOTS];
        for v in &mut level_var {
            *v = r.f64_nonneg("level_var")?;
        }
        let mut repeat_p = [0.0f32; Regime::SLOTS];
        for p in &mut repeat_p {
            *p = f32::from_le_bytes([r.u8()?, r.u8()?, r.u8()?, r.u8()?]);
            if !(0.0..=1.0).contains(p) {
                return Err(r.bad("repeat_p", format!("{p} is not a probability")));
            }
        }
        let level_mean = r.f64("level_mean")?;
        let level_trend = r.f64("level_trend")?;
        let level_live = r.bool("level_live")?;
        let accepted = r.f64("accepted")?;
        let accepted_set = r.bool("accepted_set")?;
        let rate = r.f64("rate")?;
        let rate_var = r.f64_nonneg("rate_var")?;
        let rate_n = r.u32()?;
        let noise = r.f64_nonneg("noise")?;
        let noise_n = r.u32()?;
        let run = r.u32()?;
        let score = r.f64_nonneg("score")?;
        let code = r.u8()?;
        let top = DetectorKind::from_code(code)
            .ok_or_else(|| r.bad("top", format!("unknown detector code {code}")))?;
        let episode = EpisodeTracker::decode(&mut r)?;
        Ok(SensorDetector {
            ring,
            ring_len,
            ring_pos,
            regime,
            settle_left,
            regime_n,
            level_var,
            repeat_p,
            level_mean,
            level_trend,
            level_live,
            accepted,
            accepted_set,
            rate,
            rate_var,
            rate_n,
            noise,
            noise_n,
            run,
            score,
            top,
            episode,
        })
    }
}

/// Weight of the n-th value in a long-run statistic: a plain mean while few values are in,
/// then an EWMA over about the last 512.
fn learn_rate(n: u16) -> f64 {
    (1.0 / (f64::from(n) + 1.0)).max(SLOW_ALPHA)
}

/// A squared deviation clipped at 16 times the variance learned so far (4 σ), once there is
/// one: an anomaly must not teach the detector that anomalies are normal.
fn winsorised(sq: f64, var: f64, n: u32) -> f64 {
    if n >= 8 && var > 0.0 {
        sq.min(16.0 * var)
    } else {
        sq
    }
}

/// Median of 8 values (mean of the middle two); sorts them in place.
fn median8(a: &mut [f64; SPIKE_WINDOW - 1]) -> f64 {
    // Insertion sort: 8 finite values, no allocation, faster than the general sort here.
    for i in 1..a.len() {
        let mut j = i;
        while j > 0 && a[j - 1] > a[j] {
            a.swap(j - 1, j);
            j -= 1;
        }
    }
    0.5 * (a[3] + a[4])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic noise in [-1, 1) (SplitMix64), like a sensor's.
    fn noise(i: u64) -> f64 {
        let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // Sum of four uniforms: bell-shaped, bounded.
        let u = |k: u32| ((z >> (16 * k)) & 0xffff) as f64 / 65536.0;
        (u(0) + u(1) + u(2) + u(3)) / 2.0 - 1.0
    }

    fn ts(i: u64) -> Timestamp {
        Timestamp::from_millis(i as i64 * 1000)
    }

    /// Runs `f(i)` for `n` one-second samples; returns the transitions with their index.
    fn run(
        det: &mut SensorDetector,
        cfg: &SensorDetectorConfig,
        range: std::ops::Range<u64>,
        f: impl Fn(u64) -> (f64, Regime),
    ) -> Vec<(u64, AnomalyTransition)> {
        range
            .filter_map(|i| {
                let (v, r) = f(i);
                let verdict = det.update(cfg, ts(i), v, r);
                assert!(verdict.score.is_finite() && verdict.score >= 0.0);
                verdict.transition.map(|t| (i, t))
            })
            .collect()
    }

    const RUN: Regime = Regime(1);

    fn noisy(i: u64) -> (f64, Regime) {
        (50.0 + 0.5 * noise(i), RUN)
    }

    fn started(tr: &[(u64, AnomalyTransition)]) -> Vec<(u64, DetectorKind)> {
        tr.iter()
            .filter_map(|(i, t)| match t {
                AnomalyTransition::Started { detector, .. } => Some((*i, *detector)),
                AnomalyTransition::Ended { .. } => None,
            })
            .collect()
    }

    #[test]
    fn pure_noise_raises_no_alarm_over_a_simulated_day() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        let tr = run(&mut det, &cfg, 0..86_400, noisy);
        assert!(tr.is_empty(), "{tr:?}");
    }

    #[test]
    fn step_is_found_by_the_level_detector_at_once() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..3600, noisy);
        let tr = run(&mut det, &cfg, 3600..3700, |i| (noisy(i).0 + 10.0, RUN));
        let s = started(&tr);
        assert_eq!(s.len(), 1, "{tr:?}");
        assert!(s[0].0 <= 3601, "{s:?}");
        assert!(
            matches!(s[0].1, DetectorKind::Level | DetectorKind::RateOfChange),
            "{s:?}"
        );
    }

    #[test]
    fn fast_ramp_is_found_and_a_slow_drift_is_not() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..3600, noisy);
        // 2 units/s: four noise spans a second.
        let tr = run(&mut det, &cfg, 3600..3620, |i| {
            (noisy(i).0 + 2.0 * (i - 3600) as f64, RUN)
        });
        assert_eq!(started(&tr).len(), 1, "{tr:?}");
        assert!(started(&tr)[0].0 <= 3610, "{tr:?}");
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..3600, noisy);
        // 0.001 units/s: 3.6 units over an hour, much slower than the noise.
        let tr = run(&mut det, &cfg, 3600..7200, |i| {
            (noisy(i).0 + 0.001 * (i - 3600) as f64, RUN)
        });
        assert!(tr.is_empty(), "{tr:?}");
    }

    #[test]
    fn stuck_value_is_found_within_the_minimum_run_and_ends_when_it_moves_again() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..3600, noisy);
        let frozen = noisy(3599).0;
        let tr = run(&mut det, &cfg, 3600..3900, |_| (frozen, RUN));
        let s = started(&tr);
        assert_eq!(
            s,
            vec![(
                3600 + u64::from(cfg.stuck_min_samples) - 2,
                DetectorKind::Stuck
            )]
        );
        let tr = run(&mut det, &cfg, 3900..4000, noisy);
        assert!(
            tr.iter().any(|(_, t)| matches!(
                t,
                AnomalyTransition::Ended {
                    detector: DetectorKind::Stuck,
                    ..
                }
            )),
            "{tr:?}"
        );
    }

    #[test]
    fn a_reading_whose_regime_is_no_longer_known_is_not_judged() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..3600, noisy);
        let frozen = noisy(3599).0;
        let before = det.clone();
        let tr = run(&mut det, &cfg, 3600..3900, |_| (frozen, Regime::LATE));
        assert!(tr.is_empty(), "{tr:?}");
        assert_eq!(det, before, "nothing learned from it either");
    }

    #[test]
    fn constant_sensor_never_alarms_and_neither_does_one_constant_only_when_stopped() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        assert!(run(&mut det, &cfg, 0..20_000, |_| (7.0, RUN)).is_empty());
        // Speed: noisy while running, exactly 0 while idle (regime 0), switching every 10 min.
        let mut det = SensorDetector::new(&cfg);
        let speed = |i: u64| {
            if (i / 600).is_multiple_of(2) {
                (1500.0 + 3.0 * noise(i), RUN)
            } else {
                (0.0, Regime(0))
            }
        };
        let tr = run(&mut det, &cfg, 0..20_000, speed);
        assert!(tr.is_empty(), "{tr:?}");
    }

    #[test]
    fn single_outlier_is_a_spike_one_sample_late() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..600, noisy);
        let tr = run(&mut det, &cfg, 600..700, |i| {
            let (v, r) = noisy(i);
            (if i == 650 { v + 30.0 } else { v }, r)
        });
        assert_eq!(started(&tr), vec![(651, DetectorKind::Spike)], "{tr:?}");
    }

    #[test]
    fn regime_change_moving_the_level_is_not_an_anomaly() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        // Power: 60 running, 15 idle, with a one-second lag, alternating every 5 minutes.
        let power = |i: u64| {
            let running = (i / 300).is_multiple_of(2);
            let since = i % 300;
            let (target, from) = if running { (60.0, 15.0) } else { (15.0, 60.0) };
            let v = if i >= 300 {
                target + (from - target) * (-(since as f64)).exp()
            } else {
                target
            };
            (v + noise(i), if running { RUN } else { Regime(0) })
        };
        let tr = run(&mut det, &cfg, 0..36_000, power);
        assert!(tr.is_empty(), "{tr:?}");
    }

    #[test]
    fn noisy_score_around_the_threshold_gives_one_episode_not_many() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..3600, noisy);
        // Alternating far and near: the score keeps crossing the threshold.
        let tr = run(&mut det, &cfg, 3600..3660, |i| {
            (
                noisy(i).0 + if i.is_multiple_of(2) { 40.0 } else { 0.0 },
                RUN,
            )
        });
        assert_eq!(started(&tr).len(), 1, "{tr:?}");
    }

    #[test]
    fn non_finite_readings_are_ignored() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..600, noisy);
        let before = det.clone();
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let verdict = det.update(&cfg, ts(600), v, RUN);
            assert_eq!(verdict.transition, None);
        }
        assert_eq!(det, before);
    }

    #[test]
    fn encode_decode_round_trips_and_garbage_is_refused() {
        let cfg = SensorDetectorConfig::default();
        let mut det = SensorDetector::new(&cfg);
        run(&mut det, &cfg, 0..700, noisy);
        run(&mut det, &cfg, 700..720, |_| (3.0, RUN));
        assert!(det.active().is_some());
        let mut bytes = Vec::new();
        det.encode(&mut bytes);
        assert_eq!(bytes.len(), ENCODED_LEN);
        let back = SensorDetector::decode(&bytes).expect("own encoding");
        assert_eq!(back, det);

        assert!(matches!(
            SensorDetector::decode(&[]),
            Err(DecodeError::Empty { .. })
        ));
        let mut wrong = bytes.clone();
        wrong[0] = 99;
        assert!(matches!(
            SensorDetector::decode(&wrong),
            Err(DecodeError::Version { found: 99, .. })
        ));
        assert!(matches!(
            SensorDetector::decode(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Length { .. })
        ));
        let mut nan = bytes.clone();
        nan[1..9].copy_from_slice(&f64::NAN.to_le_bytes());
        let err = SensorDetector::decode(&nan).expect_err("NaN in the ring");
        assert!(err.to_string().contains("ring"), "{err}");
        let mut pos = bytes;
        pos[1 + 8 * SPIKE_WINDOW + 1] = 200;
        assert!(SensorDetector::decode(&pos).is_err());
    }

    #[test]
    fn disabled_detector_scores_zero() {
        let cfg = SensorDetectorConfig {
            enabled: false,
            ..SensorDetectorConfig::default()
        };
        let mut det = SensorDetector::new(&cfg);
        let tr = run(&mut det, &cfg, 0..100, |i| {
            (if i == 50 { 1e9 } else { 1.0 }, RUN)
        });
        assert!(tr.is_empty());
        assert_eq!(det.score(), 0.0);
    }

    #[test]
    fn state_stays_small() {
        assert!(
            std::mem::size_of::<SensorDetector>() <= 320,
            "{}",
            std::mem::size_of::<SensorDetector>()
        );
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn any_value() -> impl Strategy<Value = f64> {
            prop_oneof![
                4 => -1e6f64..1e6,
                1 => Just(f64::NAN),
                1 => Just(f64::INFINITY),
                1 => Just(f64::NEG_INFINITY),
                1 => Just(f64::MAX),
                1 => Just(f64::MIN),
                1 => Just(0.0),
                1 => any::<f64>(),
            ]
        }

        proptest! {
            #[test]
            fn any_sequence_keeps_scores_finite_and_state_decodable(
                values in proptest::collection::vec((any_value(), 0u8..6, -5i64..2000), 1..400),
            ) {
                let cfg = SensorDetectorConfig { warmup_samples: 5, ..SensorDetectorConfig::default() };
                let mut det = SensorDetector::new(&cfg);
                let mut t = 0i64;
                for (v, regime, dt) in values {
                    t += dt;
                    let regime = if regime == 5 { Regime::UNKNOWN } else { Regime(regime) };
                    let verdict = det.update(&cfg, Timestamp::from_millis(t), v, regime);
                    prop_assert!(verdict.score.is_finite() && verdict.score >= 0.0);
                    prop_assert!(det.score().is_finite());
                }
                let mut bytes = Vec::new();
                det.encode(&mut bytes);
                prop_assert_eq!(SensorDetector::decode(&bytes).expect("own encoding"), det);
            }

            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
                let _ = SensorDetector::decode(&bytes);
            }
        }
    }
}
