//! Per-machine detectors over all of a machine's sensors at once: a multivariate anomaly score
//! (Mahalanobis distance against a learned, shrunk covariance), a health index 0–100 from the
//! slowest degradation towards a high alarm limit, and a remaining useful life from the trend
//! of that health index.
//!
//! The runtime calls [`MachineDetector::update`] about once per second of source time with the
//! latest value of each sensor (NaN when missing, bad or stale) and the machine's regime.
//!
//! What it learns from, and when:
//! - Only while the machine runs (`Regime::RUNNING`, or `Regime::UNKNOWN` for a machine that
//!   reports no state) and `settle_s` after the last regime change: temperatures lag a state
//!   change by minutes, power and vibration jump with it. Other regimes are not scored
//!   (score 0; an open multivariate episode ends after its off-delay).
//! - A changeover (`Regime::SETUP`) may give sensors new setpoints (speeds, feeds) and a
//!   repair (`Regime::DOWN`) replace a worn part: after either, each sensor's reference mean
//!   is re-centred on windows of `recentre_samples` evaluations until two successive windows
//!   agree (at most 6; see `move_mean`), and the sensor is not scored meanwhile. A fault that
//!   persists across a changeover is absorbed there (the health index is not: its baselines
//!   are frozen after learning).
//! - The health index is updated in running `health_settle_s` after a regime change (sooner
//!   than the multivariate score: a lagging temperature reads low, which it ignores).
//! - The first `learn_samples` scored-able samples with every sensor present learn the
//!   covariance of the deviations from the reference means and the health baselines. Afterwards
//!   means and covariance adapt slowly, only on samples that are not anomalous.
//!
//! Only the first [`MAX_SENSORS`] sensors are used; values past them are ignored (a machine's
//! covariance is O(n²) memory and the inverse O(n³) per refactoring).
//!
//! Per update: O(n²) time for n ≤ 32 sensors (a fixed bound), no allocation; every
//! [`REFACTOR_EVERY`] adapted samples an O(n³) Cholesky refactoring.

use serde::{Deserialize, Serialize};

use super::{AnomalyTransition, DecodeError, DetectorKind, Regime};
use crate::Timestamp;

/// Sensors past this many are ignored.
pub const MAX_SENSORS: usize = 32;
/// Adapted samples between two Cholesky refactorings of the covariance: the covariance moves
/// by ~1/`cov_window_samples` per sample, so a minute-old factor is as good as a fresh one.
pub const REFACTOR_EVERY: u32 = 64;

const MAGIC: &[u8; 4] = b"FTMD";
const VERSION: u8 = 1;
const WHAT: &str = "machine detector state";
/// Keeps scores finite whatever the input (a constant sensor that moves has a near-zero
/// variance floor).
const SCORE_MAX: f64 = 1e6;
/// A sensor's variance never goes below (this × its mean)² + `VAR_FLOOR_ABS`: a constant
/// signal must not divide by zero.
const VAR_FLOOR_REL: f64 = 1e-4;
const VAR_FLOOR_ABS: f64 = 1e-12;
/// Per-sample degradation fractions are clamped to this range before smoothing, so a short
/// excursion far past a limit (an overheating) moves the slow indicator no more than a few
/// minutes at the limit would.
const FRACTION_RANGE: (f64, f64) = (-1.0, 1.25);
/// A gap between two health updates (the machine idle, in setup, settling) counts as at most
/// this much time: the indicator smooths running time, not wall time.
const HEALTH_MAX_DT_S: f64 = 60.0;
/// Width of the RUL band in standard errors of the slope (≈ 95 %).
const RUL_BAND_SE: f64 = 2.0;
/// RUL hours are capped here (a finite "practically never").
const RUL_MAX_HOURS: f64 = 1e6;
/// Steps of the reference means are clipped to this many standard deviations once
/// `MIN_LEARNED_FOR_CLIP` samples have given a variance.
const MEAN_CLIP_SD: f64 = 4.0;
/// Two successive re-centring windows agree when their means are this many (per-sample)
/// standard deviations apart at most; window means of noise alone differ by ~0.3.
const RECENTRE_AGREE_SD: f64 = 1.5;
/// Re-centring windows tried before the latest is taken anyway.
const RECENTRE_MAX_WINDOWS: u32 = 6;
const MIN_LEARNED_FOR_CLIP: u32 = 60;
const NONE_TS: i64 = i64::MIN;
const US_PER_S: f64 = 1e6;
const US_PER_H: f64 = 3.6e9;

/// Settings of one machine's detectors. Every default works on the simulator's generated plants
/// without tuning; a non-finite or out-of-range value falls back to its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MachineDetectorConfig {
    pub enabled: bool,
    /// Score line of an anomaly (multivariate and health); scores are normal-equivalent
    /// deviates, so 3 is a one-in-740 tail per sample before the on-delay.
    pub threshold: f64,
    /// An episode ends when the score stays below `release_ratio × threshold` for the off-delay.
    pub release_ratio: f64,
    /// Seconds of source time the score must stay over the threshold to start an episode.
    pub on_delay_s: f64,
    /// Seconds below the release level to end one.
    pub off_delay_s: f64,
    /// Seconds after a regime change before the machine is evaluated (temperatures lag).
    pub settle_s: f64,
    /// Seconds after a regime change before the health index is updated: vibration and power
    /// settle in seconds, and a lagging temperature reads low, which the index ignores.
    pub health_settle_s: f64,
    /// Evaluations (≈ seconds of settled running) that learn the covariance and the health
    /// baselines before anything is scored.
    pub learn_samples: u32,
    /// Evaluations after a changeover that re-centre the reference means, unscored.
    pub recentre_samples: u32,
    /// Window of the slowly adapting reference means, in evaluations.
    pub mean_window_samples: u32,
    /// Window of the slowly adapting covariance after learning, in evaluations.
    pub cov_window_samples: u32,
    /// Ledoit–Wolf style shrinkage of the covariance towards its diagonal, 0..1.
    pub shrinkage: f64,
    /// Health level (0–100) below which a `Health` anomaly is raised.
    pub health_alarm: f64,
    /// Time constant of the health indicator's smoothing, seconds of running time.
    pub health_tau_s: f64,
    /// Forgetting time constant of the RUL trend fit, seconds.
    pub rul_tau_s: f64,
    /// One trend point per this many seconds.
    pub rul_sample_s: f64,
    /// Effective points (weighted) the trend needs before it gives a RUL.
    pub rul_min_points: f64,
    /// Seconds the trend must span before it gives a RUL.
    pub rul_min_span_s: f64,
    /// t-statistic the negative slope must reach (autocorrelation-corrected).
    pub rul_min_t: f64,
}

impl Default for MachineDetectorConfig {
    fn default() -> MachineDetectorConfig {
        MachineDetectorConfig {
            enabled: true,
            threshold: 3.0,
            release_ratio: 0.8,
            on_delay_s: 10.0,
            off_delay_s: 30.0,
            settle_s: 300.0,
            health_settle_s: 30.0,
            learn_samples: 3600,
            recentre_samples: 30,
            mean_window_samples: 1800,
            cov_window_samples: 6 * 3600,
            shrinkage: 0.1,
            health_alarm: 60.0,
            health_tau_s: 600.0,
            rul_tau_s: 900.0,
            rul_sample_s: 60.0,
            rul_min_points: 10.0,
            rul_min_span_s: 1800.0,
            rul_min_t: 3.0,
        }
    }
}

/// The configuration with every value checked: what `update` actually uses.
struct Params {
    threshold: f64,
    release: f64,
    on_us: i64,
    off_us: i64,
    settle_us: i64,
    health_settle_us: i64,
    learn: u32,
    recentre: u32,
    mean_alpha: f64,
    cov_alpha: f64,
    shrinkage: f64,
    health_alarm: f64,
    health_tau_s: f64,
    rul_tau_s: f64,
    rul_sample_us: i64,
    rul_min_points: f64,
    rul_min_span_us: i64,
    rul_min_t: f64,
}

fn positive(v: f64, default: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { default }
}

fn non_negative(v: f64, default: f64) -> f64 {
    if v.is_finite() && v >= 0.0 {
        v
    } else {
        default
    }
}

fn secs_to_us(s: f64) -> i64 {
    // Saturating: a year-long setting stays a valid duration.
    (s * US_PER_S).min(i64::MAX as f64 / 4.0) as i64
}

impl Params {
    fn of(cfg: &MachineDetectorConfig) -> Params {
        let d = MachineDetectorConfig::default();
        let threshold = positive(cfg.threshold, d.threshold);
        let release_ratio =
            if cfg.release_ratio.is_finite() && (0.0..=1.0).contains(&cfg.release_ratio) {
                cfg.release_ratio
            } else {
                d.release_ratio
            };
        let health_alarm =
            if cfg.health_alarm.is_finite() && (0.0..100.0).contains(&cfg.health_alarm) {
                cfg.health_alarm
            } else {
                d.health_alarm
            };
        let shrinkage = if cfg.shrinkage.is_finite() && (0.0..=1.0).contains(&cfg.shrinkage) {
            cfg.shrinkage
        } else {
            d.shrinkage
        };
        Params {
            threshold,
            release: threshold * release_ratio,
            on_us: secs_to_us(non_negative(cfg.on_delay_s, d.on_delay_s)),
            off_us: secs_to_us(non_negative(cfg.off_delay_s, d.off_delay_s)),
            settle_us: secs_to_us(non_negative(cfg.settle_s, d.settle_s)),
            health_settle_us: secs_to_us(non_negative(cfg.health_settle_s, d.health_settle_s)),
            learn: cfg.learn_samples.max(2),
            recentre: cfg.recentre_samples.max(1),
            mean_alpha: 1.0 / f64::from(cfg.mean_window_samples.max(1)),
            cov_alpha: 1.0 / f64::from(cfg.cov_window_samples.max(1)),
            shrinkage,
            health_alarm,
            health_tau_s: positive(cfg.health_tau_s, d.health_tau_s),
            rul_tau_s: positive(cfg.rul_tau_s, d.rul_tau_s),
            rul_sample_us: secs_to_us(positive(cfg.rul_sample_s, d.rul_sample_s)).max(1),
            rul_min_points: non_negative(cfg.rul_min_points, d.rul_min_points).max(3.0),
            rul_min_span_us: secs_to_us(non_negative(cfg.rul_min_span_s, d.rul_min_span_s)),
            rul_min_t: positive(cfg.rul_min_t, d.rul_min_t),
        }
    }
}

/// Remaining useful life: time until the health index reaches 0 on its current trend, with a
/// band from the slope's standard error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rul {
    pub hours: f64,
    pub low_hours: f64,
    pub high_hours: f64,
}

/// One evaluation of a machine.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MachineVerdict {
    /// Multivariate anomaly score, >= 0 and finite; 0 when the machine is not evaluated.
    pub score: f64,
    /// 0..=100; `None` while learning or when no sensor has a high alarm limit.
    pub health: Option<f64>,
    /// `None` until the health trend is significantly downwards.
    pub rul: Option<Rul>,
    pub transition: Option<AnomalyTransition>,
    /// Top sensors (index into `values`, share of the squared distance 0..1), largest first.
    pub contributors: [Option<(u16, f64)>; 3],
}

/// An anomaly episode with hysteresis: the private version until the shared tracker in
/// `detect/mod.rs` exists (the lead unifies them).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Episode {
    active: bool,
    /// Start of the current run over the threshold (inactive) or of the episode (active).
    above_since: i64,
    /// Start of the current run below the release level while active.
    below_since: i64,
    peak: f64,
}

impl Episode {
    const IDLE: Episode = Episode {
        active: false,
        above_since: NONE_TS,
        below_since: NONE_TS,
        peak: 0.0,
    };

    fn step(
        &mut self,
        kind: DetectorKind,
        t: i64,
        score: f64,
        p: &Params,
    ) -> Option<AnomalyTransition> {
        if !self.active {
            if score < p.threshold {
                *self = Episode::IDLE;
                return None;
            }
            if self.above_since == NONE_TS {
                self.above_since = t;
                self.peak = 0.0;
            }
            self.peak = self.peak.max(score);
            if t.saturating_sub(self.above_since) >= p.on_us {
                self.active = true;
                self.below_since = NONE_TS;
                return Some(AnomalyTransition::Started {
                    detector: kind,
                    score,
                });
            }
            return None;
        }
        self.peak = self.peak.max(score);
        if score >= p.release {
            self.below_since = NONE_TS;
            return None;
        }
        if self.below_since == NONE_TS {
            self.below_since = t;
        }
        if t.saturating_sub(self.below_since) >= p.off_us {
            let ended = AnomalyTransition::Ended {
                detector: kind,
                peak: self.peak,
                since: Timestamp(self.above_since),
            };
            *self = Episode::IDLE;
            return Some(ended);
        }
        None
    }
}

/// Exponentially weighted least squares of health against time, kept relative to the latest
/// point (times in hours, ≤ 0) so the sums never lose precision to a large time origin.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Trend {
    /// Time of the latest point (µs); `NONE_TS` before the first.
    last: i64,
    /// Time of the first point.
    first: i64,
    s0: f64,
    s1: f64,
    s2: f64,
    sy: f64,
    sty: f64,
    syy: f64,
    /// Σ w²: for the effective number of points.
    sw2: f64,
}

impl Trend {
    const EMPTY: Trend = Trend {
        last: NONE_TS,
        first: NONE_TS,
        s0: 0.0,
        s1: 0.0,
        s2: 0.0,
        sy: 0.0,
        sty: 0.0,
        syy: 0.0,
        sw2: 0.0,
    };

    fn add(&mut self, t: i64, y: f64, tau_s: f64) {
        if self.last == NONE_TS {
            self.first = t;
        } else {
            let dh = t.saturating_sub(self.last) as f64 / US_PER_H;
            let decay = (-dh * 3600.0 / tau_s).exp();
            // Move the origin to `t` first, then forget.
            self.s2 = self.s2 - 2.0 * dh * self.s1 + dh * dh * self.s0;
            self.s1 -= dh * self.s0;
            self.sty -= dh * self.sy;
            self.s0 *= decay;
            self.s1 *= decay;
            self.s2 *= decay;
            self.sy *= decay;
            self.sty *= decay;
            self.syy *= decay;
            self.sw2 *= decay * decay;
        }
        self.last = t;
        self.s0 += 1.0;
        self.sy += y;
        self.syy += y * y;
        self.sw2 += 1.0;
    }

    /// The RUL from the current fit, if its slope is significantly negative. `inflation`
    /// corrects the slope's variance for the autocorrelation of the smoothed health.
    fn rul(&self, health: f64, inflation: f64, p: &Params) -> Option<Rul> {
        // The smoothed health lags a linear decline by the smoothing's time constant: the
        // machine is that much further down its trend than the indicator shows.
        let lag_h = p.health_tau_s / 3600.0;
        if self.last == NONE_TS || self.s0 <= 0.0 || self.sw2 <= 0.0 {
            return None;
        }
        let n_eff = self.s0 * self.s0 / self.sw2;
        if n_eff < p.rul_min_points || self.last.saturating_sub(self.first) < p.rul_min_span_us {
            return None;
        }
        let sxx = self.s2 - self.s1 * self.s1 / self.s0;
        if sxx.is_nan() || sxx <= 1e-12 {
            return None;
        }
        let b = (self.sty - self.s1 * self.sy / self.s0) / sxx;
        let a = (self.sy - b * self.s1) / self.s0;
        let sse = (self.syy - 2.0 * a * self.sy - 2.0 * b * self.sty
            + a * a * self.s0
            + 2.0 * a * b * self.s1
            + b * b * self.s2)
            .max(0.0);
        let dof = self.s0 - 2.0 * self.sw2 / self.s0;
        if dof.is_nan() || dof <= 0.0 {
            return None;
        }
        let var_b = sse / dof * (self.sw2 / self.s0) / sxx * inflation;
        // A perfectly straight line has se 0: keep a floor so the t-statistic stays finite.
        let se = var_b.sqrt().max(1e-9 * b.abs()).max(1e-12);
        if b.is_nan() || b >= 0.0 || -b / se < p.rul_min_t {
            return None;
        }
        let rate = -b;
        let h = health.max(0.0);
        let cap = |x: f64| {
            if x.is_finite() {
                (x - lag_h).clamp(0.0, RUL_MAX_HOURS)
            } else {
                RUL_MAX_HOURS
            }
        };
        let slow = rate - RUL_BAND_SE * se;
        Some(Rul {
            hours: cap(h / rate),
            low_hours: cap(h / (rate + RUL_BAND_SE * se)),
            high_hours: if slow > 0.0 {
                cap(h / slow)
            } else {
                RUL_MAX_HOURS
            },
        })
    }
}

/// One machine's detectors (see the module doc).
#[derive(Debug, Clone, PartialEq)]
pub struct MachineDetector {
    /// Sensors the machine has (what `new` was given).
    total: usize,
    /// Sensors used: `min(total, MAX_SENSORS)`.
    n: usize,
    /// High alarm limits of the used sensors (finite ones only).
    high: Vec<Option<f64>>,
    last_ts: i64,
    regime: u8,
    regime_since: i64,
    /// A changeover was seen since the last evaluation: re-centre at the next one.
    changeover: bool,
    /// Evaluations since the last re-centre (saturating).
    since_recentre: u32,
    /// Reference means and per-sensor sample counts since the last re-centre.
    mean: Vec<f64>,
    seen: Vec<u32>,
    /// While re-centring: the previous window's mean, if there was one.
    prev: Vec<f64>,
    has_prev: Vec<bool>,
    /// Samples learned so far; `monitoring` once `learn_samples` are.
    learned: u32,
    monitoring: bool,
    /// n×n covariance of the deviations from the reference means (row-major, symmetric).
    cov: Vec<f64>,
    /// n×n lower Cholesky factor of the shrunk covariance (valid while `monitoring`).
    chol: Vec<f64>,
    /// Diagonal of the inverse covariance (derived from `chol`, for the contributions).
    prec_diag: Vec<f64>,
    since_factor: u32,
    score: f64,
    multivariate: Episode,
    /// Health baselines (mean while learning) and smoothed degradation fractions.
    base: Vec<f64>,
    frac: Vec<f64>,
    health: f64,
    health_ts: i64,
    health_episode: Episode,
    trend: Trend,
    rul: Option<Rul>,
    // Scratch (not state, not encoded): allocated once so `update` allocates nothing.
    dev: Vec<f64>,
    y: Vec<f64>,
    w: Vec<f64>,
    present: Vec<bool>,
}

impl MachineDetector {
    /// `high_limits[i]`: the i-th sensor's high alarm limit if it has one (the health
    /// reference). Sensors past [`MAX_SENSORS`] are ignored.
    pub fn new(_cfg: &MachineDetectorConfig, high_limits: &[Option<f64>]) -> MachineDetector {
        let n = high_limits.len().min(MAX_SENSORS);
        let high = high_limits[..n]
            .iter()
            .map(|h| h.filter(|h| h.is_finite()))
            .collect();
        MachineDetector {
            total: high_limits.len(),
            n,
            high,
            last_ts: NONE_TS,
            regime: Regime::UNKNOWN.0,
            regime_since: NONE_TS,
            changeover: false,
            since_recentre: 0,
            mean: vec![0.0; n],
            seen: vec![0; n],
            prev: vec![0.0; n],
            has_prev: vec![false; n],
            learned: 0,
            monitoring: false,
            cov: vec![0.0; n * n],
            chol: vec![0.0; n * n],
            prec_diag: vec![0.0; n],
            since_factor: 0,
            score: 0.0,
            multivariate: Episode::IDLE,
            base: vec![0.0; n],
            frac: vec![0.0; n],
            health: 100.0,
            health_ts: NONE_TS,
            health_episode: Episode::IDLE,
            trend: Trend::EMPTY,
            rul: None,
            dev: vec![0.0; n],
            y: vec![0.0; n],
            w: vec![0.0; n],
            present: vec![false; n],
        }
    }

    /// Sensors the machine was built with (including any past [`MAX_SENSORS`]).
    pub fn sensors(&self) -> usize {
        self.total
    }

    /// Latest multivariate score.
    /// An anomaly episode (multivariate or health) is open.
    pub fn anomalous(&self) -> bool {
        self.multivariate.active || self.health_episode.active
    }

    pub fn score(&self) -> f64 {
        self.score
    }

    fn has_health(&self) -> bool {
        self.monitoring && self.high.iter().any(Option::is_some)
    }

    fn verdict(
        &self,
        transition: Option<AnomalyTransition>,
        contributors: [Option<(u16, f64)>; 3],
    ) -> MachineVerdict {
        MachineVerdict {
            score: self.score,
            health: self.has_health().then_some(self.health),
            rul: if self.has_health() { self.rul } else { None },
            transition,
            contributors,
        }
    }

    /// One evaluation of the machine at `ts` with the latest value of each of its sensors
    /// (NaN = missing) and its regime. A timestamp before the previous one is ignored.
    pub fn update(
        &mut self,
        cfg: &MachineDetectorConfig,
        ts: Timestamp,
        values: &[f64],
        regime: Regime,
    ) -> MachineVerdict {
        if !cfg.enabled {
            return MachineVerdict {
                score: 0.0,
                health: None,
                rul: None,
                transition: None,
                contributors: [None; 3],
            };
        }
        let p = Params::of(cfg);
        let t = ts.0;
        if self.last_ts != NONE_TS && t < self.last_ts {
            return self.verdict(None, [None; 3]);
        }
        if self.last_ts == NONE_TS || regime.0 != self.regime {
            self.regime = regime.0;
            self.regime_since = t;
            // A changeover may set new setpoints, a repair replace a worn part: either can
            // move running levels for good.
            if regime == Regime::SETUP || regime == Regime::DOWN {
                self.changeover = true;
            }
        }
        self.last_ts = t;
        let mut present = 0usize;
        for i in 0..self.n {
            let v = values.get(i).copied().unwrap_or(f64::NAN);
            // Huge finite values would overflow the squares: treat them as missing too.
            if usable(v) {
                present += 1;
            }
        }
        if present == 0 {
            // Nothing to learn or score: the state stays as it was.
            return self.verdict(None, [None; 3]);
        }
        let runs = regime == Regime::RUNNING || regime == Regime::UNKNOWN;
        let since = t.saturating_sub(self.regime_since);
        let mut contributors = [None; 3];
        if runs && since >= p.settle_us {
            contributors = self.evaluate(values, &p);
        } else {
            self.score = 0.0;
        }
        let mut transition = self
            .multivariate
            .step(DetectorKind::Multivariate, t, self.score, &p);
        if self.has_health() && runs && since >= p.health_settle_us {
            self.update_health(t, values, &p);
            // At most one transition per update (the verdict has one slot): the health
            // tracker, slow by nature, waits for the next update when the other moved.
            if transition.is_none() {
                let hs = p.threshold * (100.0 - self.health) / (100.0 - p.health_alarm);
                transition = self.health_episode.step(DetectorKind::Health, t, hs, &p);
            }
        }
        self.verdict(transition, contributors)
    }

    /// The multivariate part of a settled running sample: score, learn or adapt, move the
    /// reference means. Returns the top contributors.
    fn evaluate(&mut self, values: &[f64], p: &Params) -> [Option<(u16, f64)>; 3] {
        if self.changeover {
            self.changeover = false;
            self.since_recentre = 0;
            self.seen.fill(0);
            self.has_prev.fill(false);
        }
        let warm = self.since_recentre >= p.recentre;
        let mut complete = true;
        let mut scored = 0usize;
        for i in 0..self.n {
            let v = values.get(i).copied().unwrap_or(f64::NAN);
            let ok = usable(v) && self.seen[i] >= p.recentre;
            self.present[i] = ok;
            if ok {
                self.dev[i] = v - self.mean[i];
                scored += 1;
            } else {
                self.dev[i] = 0.0;
                complete = false;
            }
        }
        let mut contributors = [None; 3];
        self.score = 0.0;
        if self.monitoring && warm && scored > 0 {
            let q = self.distance();
            self.score = normal_deviate(q, scored);
            contributors = self.contributors();
        }
        let anomalous = self.score >= p.threshold || self.multivariate.active;
        if warm && complete {
            if !self.monitoring {
                self.learn(p);
            } else if !anomalous {
                self.adapt(p);
            }
        }
        if !warm || !self.monitoring || !anomalous {
            for i in 0..self.n {
                let v = values.get(i).copied().unwrap_or(f64::NAN);
                if usable(v) {
                    self.move_mean(i, v, p);
                }
            }
        }
        self.since_recentre = self.since_recentre.saturating_add(1);
        contributors
    }

    /// Moves sensor i's reference mean towards `v`.
    ///
    /// Re-centring: the mean is the average of a window of `recentre_samples`. Once a variance
    /// is known, a window is accepted only when it agrees with the one before (within
    /// `RECENTRE_AGREE_SD`): an outlier or a transient inside one (a spike, the tail of an
    /// overheating) would otherwise become the reference for good. After `RECENTRE_MAX_WINDOWS`
    /// windows the latest is taken whatever it is, so a drifting sensor is scored again.
    ///
    /// Afterwards: a cumulative, then exponentially weighted average, its steps clipped to
    /// `MEAN_CLIP_SD` standard deviations once a variance is known.
    fn move_mean(&mut self, i: usize, v: f64, p: &Params) {
        let known = self.learned >= MIN_LEARNED_FOR_CLIP;
        let sd = self.var_floored(i).sqrt();
        if self.seen[i] < p.recentre {
            self.seen[i] += 1;
            self.mean[i] += (v - self.mean[i]) / f64::from(self.seen[i]);
            if self.seen[i] < p.recentre || !known {
                return;
            }
            let agrees =
                self.has_prev[i] && (self.mean[i] - self.prev[i]).abs() <= RECENTRE_AGREE_SD * sd;
            let patience = p.recentre.saturating_mul(RECENTRE_MAX_WINDOWS);
            if agrees || self.since_recentre >= patience {
                self.has_prev[i] = false;
            } else {
                self.prev[i] = self.mean[i];
                self.has_prev[i] = true;
                self.seen[i] = 0;
            }
            return;
        }
        let mut step = v - self.mean[i];
        if known {
            step = step.clamp(-MEAN_CLIP_SD * sd, MEAN_CLIP_SD * sd);
        }
        self.seen[i] = self.seen[i].saturating_add(1);
        let alpha = (1.0 / f64::from(self.seen[i])).max(p.mean_alpha);
        self.mean[i] += step * alpha;
    }

    fn learn(&mut self, p: &Params) {
        let n = self.n;
        self.learned += 1;
        let k = f64::from(self.learned);
        for i in 0..n {
            for j in 0..=i {
                let c = &mut self.cov[i * n + j];
                *c += (self.dev[i] * self.dev[j] - *c) / k;
                self.cov[j * n + i] = self.cov[i * n + j];
            }
            // `mean` is still the one `dev` was taken from: this is the sample.
            let x = self.dev[i] + self.mean[i];
            self.base[i] += (x - self.base[i]) / k;
        }
        if self.learned >= p.learn {
            self.monitoring = true;
            self.refactor(p);
            self.frac.fill(0.0);
        }
    }

    fn adapt(&mut self, p: &Params) {
        let n = self.n;
        for i in 0..n {
            for j in 0..=i {
                let c = &mut self.cov[i * n + j];
                *c += (self.dev[i] * self.dev[j] - *c) * p.cov_alpha;
                self.cov[j * n + i] = self.cov[i * n + j];
            }
        }
        self.since_factor += 1;
        if self.since_factor >= REFACTOR_EVERY {
            self.refactor(p);
        }
    }

    /// Cholesky factor of the shrunk, floored covariance; more diagonal loading if rounding
    /// made it indefinite, and a diagonal factor as the last resort.
    fn refactor(&mut self, p: &Params) {
        self.since_factor = 0;
        let n = self.n;
        let lambda = p.shrinkage;
        let mut jitter = 0.0;
        let mut factored = false;
        for _ in 0..4 {
            if self.try_cholesky(lambda, jitter) {
                factored = true;
                break;
            }
            jitter = if jitter == 0.0 { 1e-9 } else { jitter * 1e3 };
        }
        if !factored {
            self.chol.fill(0.0);
            for i in 0..n {
                self.chol[i * n + i] = self.var_floored(i).sqrt();
            }
        }
        self.invert_diagonal();
    }

    /// (Σ⁻¹)ᵢᵢ = ‖L⁻¹eᵢ‖²: one triangular solve per sensor, only at refactoring.
    fn invert_diagonal(&mut self) {
        let n = self.n;
        for i in 0..n {
            let mut sum = 0.0;
            for r in 0..n {
                let z = if r < i {
                    0.0
                } else {
                    let mut s = if r == i { 1.0 } else { 0.0 };
                    for k in i..r {
                        s -= self.chol[r * n + k] * self.y[k];
                    }
                    s / self.chol[r * n + r]
                };
                self.y[r] = z;
                sum += z * z;
            }
            self.prec_diag[i] = if sum.is_finite() { sum } else { 0.0 };
        }
    }

    fn var_floored(&self, i: usize) -> f64 {
        let floor = (VAR_FLOOR_REL * self.mean[i]).powi(2) + VAR_FLOOR_ABS;
        let v = self.cov[i * self.n + i];
        if v.is_finite() { v.max(floor) } else { floor }
    }

    fn try_cholesky(&mut self, lambda: f64, jitter: f64) -> bool {
        let n = self.n;
        for i in 0..n {
            for j in 0..=i {
                let sigma = if i == j {
                    self.var_floored(i) * (1.0 + jitter)
                } else {
                    (1.0 - lambda) * self.cov[i * n + j]
                };
                let mut sum = sigma;
                for k in 0..j {
                    sum -= self.chol[i * n + k] * self.chol[j * n + k];
                }
                if i == j {
                    if !sum.is_finite() || sum <= 0.0 {
                        return false;
                    }
                    self.chol[i * n + i] = sum.sqrt();
                } else {
                    self.chol[i * n + j] = sum / self.chol[j * n + j];
                }
            }
        }
        true
    }

    /// Squared Mahalanobis distance of `dev`; leaves L⁻¹dev in `y`.
    fn distance(&mut self) -> f64 {
        let n = self.n;
        let mut q = 0.0;
        for i in 0..n {
            let mut s = self.dev[i];
            for k in 0..i {
                s -= self.chol[i * n + k] * self.y[k];
            }
            let yi = s / self.chol[i * n + i];
            self.y[i] = yi;
            q += yi * yi;
        }
        q
    }

    /// Top three sensors by reconstruction-based contribution (Alcala & Qin 2009):
    /// (Σ⁻¹d)ᵢ² / (Σ⁻¹)ᵢᵢ, how much the squared distance falls when sensor i is replaced by
    /// its best estimate from the others. Unlike dᵢ(Σ⁻¹d)ᵢ it names the faulty sensor of a
    /// single-sensor fault even among strongly correlated ones. Shares are normalised to 1.
    fn contributors(&mut self) -> [Option<(u16, f64)>; 3] {
        let n = self.n;
        for i in (0..n).rev() {
            let mut s = self.y[i];
            for k in i + 1..n {
                s -= self.chol[k * n + i] * self.w[k];
            }
            self.w[i] = s / self.chol[i * n + i];
        }
        let mut total = 0.0;
        for i in 0..n {
            if self.present[i] && self.prec_diag[i] > 0.0 {
                let c = self.w[i] * self.w[i] / self.prec_diag[i];
                self.y[i] = if c.is_finite() { c } else { 0.0 };
            } else {
                self.y[i] = 0.0;
            }
            total += self.y[i];
        }
        let mut top: [Option<(u16, f64)>; 3] = [None; 3];
        if !total.is_finite() || total <= 0.0 {
            return top;
        }
        for i in 0..n {
            let c = self.y[i];
            if c.is_nan() || c <= 0.0 {
                continue;
            }
            let share = c / total;
            let mut entry = Some((i as u16, share));
            for slot in &mut top {
                match (*slot, entry) {
                    (None, _) => {
                        *slot = entry;
                        break;
                    }
                    (Some((_, s)), Some((_, e))) if e > s => {
                        std::mem::swap(slot, &mut entry);
                    }
                    _ => {}
                }
            }
        }
        top
    }

    fn update_health(&mut self, t: i64, values: &[f64], p: &Params) {
        let dt_s = if self.health_ts == NONE_TS {
            0.0
        } else {
            (t.saturating_sub(self.health_ts) as f64 / US_PER_S).min(HEALTH_MAX_DT_S)
        };
        self.health_ts = t;
        let alpha = 1.0 - (-dt_s / p.health_tau_s).exp();
        let mut worst = f64::NEG_INFINITY;
        for i in 0..self.n {
            let Some(limit) = self.high[i] else { continue };
            let span = limit - self.base[i];
            // A machine that runs at its limit has no room to degrade into: skip the sensor.
            if span.is_nan() || span <= 1e-9 * limit.abs().max(1.0) {
                continue;
            }
            let v = values.get(i).copied().unwrap_or(f64::NAN);
            if usable(v) {
                let f = ((v - self.base[i]) / span).clamp(FRACTION_RANGE.0, FRACTION_RANGE.1);
                self.frac[i] += (f - self.frac[i]) * alpha;
            }
            worst = worst.max(self.frac[i]);
        }
        if worst == f64::NEG_INFINITY {
            worst = 0.0;
        }
        self.health = (100.0 * (1.0 - worst)).clamp(0.0, 100.0);
        if self.trend.last == NONE_TS || t.saturating_sub(self.trend.last) >= p.rul_sample_us {
            self.trend.add(t, self.health, p.rul_tau_s);
            // Successive smoothed values are AR(1) with ρ = e^(−Δ/τ): the slope's variance
            // grows by (1 + ρ)/(1 − ρ) over independent points.
            let rho = (-(p.rul_sample_us as f64 / US_PER_S) / p.health_tau_s).exp();
            let inflation = (1.0 + rho) / (1.0 - rho).max(1e-6);
            self.rul = self.trend.rul(self.health, inflation, p);
        }
        if let Some(r) = &mut self.rul {
            // Between trend points the health still moves: keep hours consistent with it.
            if r.hours > 0.0 && self.health <= 0.0 {
                *r = Rul {
                    hours: 0.0,
                    low_hours: 0.0,
                    high_hours: r.high_hours,
                };
            }
        }
    }

    /// The learned state (means, covariance, factor, baselines, trend, episodes), versioned.
    /// About 8·(n² + 9n + 40) bytes for n sensors (lower triangles only).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let n = self.n;
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&(self.total as u32).to_le_bytes());
        let mut limits = 0u32;
        for (i, h) in self.high.iter().enumerate() {
            if h.is_some() {
                limits |= 1 << i;
            }
        }
        out.extend_from_slice(&limits.to_le_bytes());
        for h in self.high.iter().flatten() {
            put_f64(out, *h);
        }
        put_i64(out, self.last_ts);
        out.push(self.regime);
        put_i64(out, self.regime_since);
        out.push(u8::from(self.changeover) | u8::from(self.monitoring) << 1);
        out.extend_from_slice(&self.since_recentre.to_le_bytes());
        out.extend_from_slice(&self.learned.to_le_bytes());
        out.extend_from_slice(&self.since_factor.to_le_bytes());
        for i in 0..n {
            put_f64(out, self.mean[i]);
            out.extend_from_slice(&self.seen[i].to_le_bytes());
            out.push(u8::from(self.has_prev[i]));
            put_f64(out, self.prev[i]);
            put_f64(out, self.base[i]);
            put_f64(out, self.frac[i]);
        }
        for i in 0..n {
            for j in 0..=i {
                put_f64(out, self.cov[i * n + j]);
                put_f64(out, self.chol[i * n + j]);
            }
        }
        put_f64(out, self.score);
        put_episode(out, &self.multivariate);
        put_f64(out, self.health);
        put_i64(out, self.health_ts);
        put_episode(out, &self.health_episode);
        let tr = &self.trend;
        put_i64(out, tr.last);
        put_i64(out, tr.first);
        for v in [tr.s0, tr.s1, tr.s2, tr.sy, tr.sty, tr.syy, tr.sw2] {
            put_f64(out, v);
        }
        match &self.rul {
            None => out.push(0),
            Some(r) => {
                out.push(1);
                put_f64(out, r.hours);
                put_f64(out, r.low_hours);
                put_f64(out, r.high_hours);
            }
        }
    }

    /// Reads what `encode` wrote. The caller checks `sensors()` against the machine's.
    pub fn decode(bytes: &[u8]) -> Result<MachineDetector, DecodeError> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r.take(4)?;
        if magic != MAGIC {
            return Err(DecodeError::Magic {
                what: WHAT,
                found: magic.to_vec(),
            });
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(DecodeError::Version {
                what: WHAT,
                found: version,
                expected: VERSION,
            });
        }
        let total = r.u32()? as usize;
        let limits = r.u32()?;
        let n = total.min(MAX_SENSORS);
        if n < 32 && limits >> n != 0 {
            return Err(invalid(format!(
                "high-limit bits {limits:#x} name sensors past the {n} it has"
            )));
        }
        let mut high = Vec::with_capacity(n);
        for i in 0..n {
            high.push(if limits & (1 << i) != 0 {
                Some(r.finite("high limit")?)
            } else {
                None
            });
        }
        let mut d = MachineDetector::new(&MachineDetectorConfig::default(), &high);
        d.total = total;
        d.last_ts = r.i64()?;
        d.regime = r.u8()?;
        d.regime_since = r.i64()?;
        let flags = r.u8()?;
        if flags > 3 {
            return Err(invalid(format!("flags byte {flags:#x} has unknown bits")));
        }
        d.changeover = flags & 1 != 0;
        d.monitoring = flags & 2 != 0;
        d.since_recentre = r.u32()?;
        d.learned = r.u32()?;
        d.since_factor = r.u32()?;
        for i in 0..n {
            d.mean[i] = r.finite("mean")?;
            d.seen[i] = r.u32()?;
            d.has_prev[i] = match r.u8()? {
                0 => false,
                1 => true,
                other => {
                    return Err(invalid(format!(
                        "re-centring flag {other} is neither 0 nor 1"
                    )));
                }
            };
            d.prev[i] = r.finite("previous window mean")?;
            d.base[i] = r.finite("health baseline")?;
            d.frac[i] = r.finite("degradation fraction")?;
        }
        for i in 0..n {
            for j in 0..=i {
                let c = r.finite("covariance")?;
                d.cov[i * n + j] = c;
                d.cov[j * n + i] = c;
                d.chol[i * n + j] = r.finite("covariance factor")?;
            }
            if d.monitoring && d.chol[i * n + i] <= 0.0 {
                return Err(invalid(format!(
                    "covariance factor diagonal {i} is not positive"
                )));
            }
        }
        d.invert_diagonal();
        d.score = r.finite("score")?;
        d.multivariate = r.episode()?;
        d.health = r.finite("health")?;
        if !(0.0..=100.0).contains(&d.health) {
            return Err(invalid(format!("health {} is outside 0..=100", d.health)));
        }
        d.health_ts = r.i64()?;
        d.health_episode = r.episode()?;
        let last = r.i64()?;
        let first = r.i64()?;
        let mut s = [0.0; 7];
        for v in &mut s {
            *v = r.finite("trend sum")?;
        }
        d.trend = Trend {
            last,
            first,
            s0: s[0],
            s1: s[1],
            s2: s[2],
            sy: s[3],
            sty: s[4],
            syy: s[5],
            sw2: s[6],
        };
        d.rul = match r.u8()? {
            0 => None,
            1 => Some(Rul {
                hours: r.finite("rul")?,
                low_hours: r.finite("rul")?,
                high_hours: r.finite("rul")?,
            }),
            other => return Err(invalid(format!("rul tag {other} is neither 0 nor 1"))),
        };
        if r.at != bytes.len() {
            return Err(invalid(format!(
                "{} bytes left over after the state",
                bytes.len() - r.at
            )));
        }
        Ok(d)
    }
}

/// A value the detectors can use: finite and small enough that its squares stay finite.
fn usable(v: f64) -> bool {
    v.is_finite() && v.abs() < 1e150
}

/// Normal-equivalent deviate of a χ²(k) value (Wilson–Hilferty), ≥ 0 and finite: the same
/// tail probability as `z` standard deviations, so 3 reads the same for any sensor count.
fn normal_deviate(q: f64, k: usize) -> f64 {
    if q.is_nan() {
        return 0.0;
    }
    if q == f64::INFINITY {
        return SCORE_MAX;
    }
    let k = k as f64;
    let c = 2.0 / (9.0 * k);
    let z = ((q / k).cbrt() - (1.0 - c)) / c.sqrt();
    if z.is_finite() {
        z.clamp(0.0, SCORE_MAX)
    } else {
        0.0
    }
}

fn invalid(problem: String) -> DecodeError {
    DecodeError::Invalid {
        what: WHAT,
        problem,
    }
}

fn put_f64(out: &mut Vec<u8>, v: f64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_episode(out: &mut Vec<u8>, e: &Episode) {
    out.push(u8::from(e.active));
    put_i64(out, e.above_since);
    put_i64(out, e.below_since);
    put_f64(out, e.peak);
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], DecodeError> {
        let end = self.at.saturating_add(len);
        let Some(s) = self.bytes.get(self.at..end) else {
            return Err(DecodeError::Truncated {
                what: WHAT,
                needed: end,
                len: self.bytes.len(),
            });
        };
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn finite(&mut self, field: &str) -> Result<f64, DecodeError> {
        let v = f64::from_le_bytes(self.array()?);
        if v.is_finite() {
            Ok(v)
        } else {
            Err(invalid(format!(
                "{field} at byte {} is {v}, not finite",
                self.at - 8
            )))
        }
    }

    fn episode(&mut self) -> Result<Episode, DecodeError> {
        let active = match self.u8()? {
            0 => false,
            1 => true,
            other => return Err(invalid(format!("episode flag {other} is neither 0 nor 1"))),
        };
        Ok(Episode {
            active,
            above_since: self.i64()?,
            below_since: self.i64()?,
            peak: self.finite("episode peak")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000_000;
    const SEC: i64 = 1_000_000;

    /// Deterministic standard normals (SplitMix64 + Box–Muller): no rand in `models`.
    struct Noise(u64);

    impl Noise {
        fn next_u64(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn unit(&mut self) -> f64 {
            ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }

        fn normal(&mut self) -> f64 {
            let (u, v) = (self.unit(), self.unit());
            (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
        }
    }

    fn quick() -> MachineDetectorConfig {
        MachineDetectorConfig {
            learn_samples: 900,
            ..MachineDetectorConfig::default()
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp(T0 + s * SEC)
    }

    /// Three correlated sensors: x1 follows x0, x2 mirrors it.
    fn correlated(noise: &mut Noise) -> [f64; 3] {
        let a = 2.0 * noise.normal();
        [
            50.0 + a,
            20.0 + 0.8 * a + noise.normal(),
            100.0 - 1.5 * a + 0.5 * noise.normal(),
        ]
    }

    fn check_finite(v: &MachineVerdict) {
        assert!(v.score.is_finite() && v.score >= 0.0, "{v:?}");
        if let Some(h) = v.health {
            assert!((0.0..=100.0).contains(&h), "{v:?}");
        }
        if let Some(r) = v.rul {
            assert!(r.hours.is_finite() && r.low_hours.is_finite() && r.high_hours.is_finite());
            assert!(r.low_hours <= r.hours && r.hours <= r.high_hours, "{r:?}");
        }
        for (_, share) in v.contributors.iter().flatten() {
            assert!((0.0..=1.0).contains(share), "{v:?}");
        }
    }

    #[test]
    fn correlated_gaussian_series_raises_no_alarm_over_a_long_run() {
        let cfg = quick();
        let limits = [Some(80.0), None, Some(140.0)];
        let mut d = MachineDetector::new(&cfg, &limits);
        let mut noise = Noise(1);
        let mut over = 0;
        for s in 0..40_000 {
            let v = d.update(&cfg, at(s), &correlated(&mut noise), Regime::RUNNING);
            check_finite(&v);
            assert_eq!(v.transition, None, "at {s} s: {v:?}");
            if v.score >= 3.0 {
                over += 1;
            }
            if s > 2000 {
                assert!(v.health.expect("learned") > 80.0, "{v:?}");
                assert_eq!(v.rul, None, "at {s} s");
            }
        }
        // A 3-sigma-equivalent line: about 0.13 % of Gaussian samples pass it.
        assert!(over < 200, "{over} samples over 3");
    }

    #[test]
    fn shift_in_one_sensor_is_flagged_with_that_sensor_as_top_contributor() {
        let cfg = quick();
        let mut d = MachineDetector::new(&cfg, &[None, None, None]);
        let mut noise = Noise(2);
        for s in 0..2000 {
            d.update(&cfg, at(s), &correlated(&mut noise), Regime::RUNNING);
        }
        let mut started = None;
        for s in 2000..2120 {
            let mut x = correlated(&mut noise);
            x[1] += 8.0;
            let v = d.update(&cfg, at(s), &x, Regime::RUNNING);
            check_finite(&v);
            assert_eq!(v.contributors[0].map(|c| c.0), Some(1), "{v:?}");
            if let Some(AnomalyTransition::Started { detector, score }) = v.transition {
                assert_eq!(detector, DetectorKind::Multivariate);
                assert!(score >= 3.0);
                started.get_or_insert(s);
            }
        }
        let started = started.expect("the shift starts an episode");
        assert!(started <= 2000 + 12, "started at {started}");
        let mut ended = None;
        for s in 2120..2400 {
            let v = d.update(&cfg, at(s), &correlated(&mut noise), Regime::RUNNING);
            if let Some(AnomalyTransition::Ended {
                detector,
                peak,
                since,
            }) = v.transition
            {
                assert_eq!(detector, DetectorKind::Multivariate);
                assert!(peak > 3.0);
                assert_eq!(since, at(2000));
                ended = Some(s);
            }
        }
        assert!(ended.is_some(), "the episode ends once the shift is gone");
    }

    /// One sensor with a high limit of 100 from a baseline of 30 ramps at 10 per hour: it
    /// reaches the limit 7 h after the ramp starts.
    #[test]
    fn slow_ramp_towards_the_limit_lowers_health_and_gives_an_rul_band_around_the_true_time() {
        let cfg = quick();
        let mut d = MachineDetector::new(&cfg, &[Some(100.0), None]);
        let mut noise = Noise(3);
        let ramp_from = 3600;
        let limit_at = ramp_from + 7 * 3600;
        let mut health_alarm = None;
        let mut first_rul = None;
        let mut checked = 0;
        for s in 0..limit_at {
            let rise = (s - ramp_from).max(0) as f64 * 10.0 / 3600.0;
            let x = [30.0 + rise + noise.normal(), 5.0 + noise.normal()];
            let v = d.update(&cfg, at(s), &x, Regime::RUNNING);
            check_finite(&v);
            if s < ramp_from {
                assert_eq!(v.rul, None, "no trend before the ramp, at {s} s");
                continue;
            }
            if let Some(AnomalyTransition::Started {
                detector: DetectorKind::Health,
                ..
            }) = v.transition
            {
                health_alarm.get_or_insert(s);
            }
            let Some(rul) = v.rul else { continue };
            first_rul.get_or_insert(s);
            if s % 600 == 0 && v.health.is_some_and(|h| h < 90.0) {
                let truth = (limit_at - s) as f64 / 3600.0;
                // The smoothing lags the ramp by ~10 min; allow that and 25 %.
                assert!(
                    rul.low_hours <= truth * 1.25 + 0.3 && rul.high_hours >= truth * 0.75 - 0.3,
                    "at {:.2} h before the limit: {rul:?}",
                    truth
                );
                checked += 1;
            }
        }
        let first_rul = first_rul.expect("the ramp gives a RUL");
        assert!(
            first_rul < ramp_from + 3 * 3600,
            "RUL only after {} s",
            first_rul - ramp_from
        );
        assert!(checked >= 20, "{checked} checks");
        // Health 60 = 40 % of the way = 2.8 h into the ramp (+ the smoothing lag).
        let alarm = health_alarm.expect("health falls below the alarm level");
        let h = (alarm - ramp_from) as f64 / 3600.0;
        assert!(
            (2.8..3.3).contains(&h),
            "health alarm {h:.2} h into the ramp"
        );
    }

    #[test]
    fn constant_signals_and_a_single_sample_give_finite_scores() {
        let cfg = quick();
        let limits = [Some(10.0), None, Some(0.0)];
        let mut one = MachineDetector::new(&cfg, &limits);
        check_finite(&one.update(&cfg, at(0), &[5.0, 0.0, 0.0], Regime::RUNNING));
        let mut d = MachineDetector::new(&cfg, &limits);
        for s in 0..3000 {
            let v = d.update(&cfg, at(s), &[5.0, 0.0, 0.0], Regime::RUNNING);
            check_finite(&v);
            assert_eq!(v.score, 0.0, "a constant signal is not anomalous");
        }
        let v = d.update(&cfg, at(3000), &[5.5, 1.0, -1.0], Regime::RUNNING);
        check_finite(&v);
        assert!(v.score > 3.0, "a constant signal that moves is: {v:?}");
        let mut empty = MachineDetector::new(&cfg, &[]);
        for s in 0..2000 {
            let v = empty.update(&cfg, at(s), &[], Regime::RUNNING);
            check_finite(&v);
            assert_eq!(v.health, None);
        }
    }

    #[test]
    fn non_finite_inputs_are_ignored() {
        let cfg = quick();
        let limits = [Some(80.0), None, Some(140.0)];
        let mut plain = MachineDetector::new(&cfg, &limits);
        let mut noisy = MachineDetector::new(&cfg, &limits);
        let mut noise = Noise(4);
        let bad = [f64::NAN, f64::INFINITY, f64::NEG_INFINITY];
        for s in 0..3000 {
            let x = correlated(&mut noise);
            let a = plain.update(&cfg, at(s), &x, Regime::RUNNING);
            // Between two samples (after the first: the first update starts the clock).
            if s > 0 {
                let half = Timestamp(at(s).0 - SEC / 2);
                check_finite(&noisy.update(&cfg, half, &bad, Regime::RUNNING));
                check_finite(&noisy.update(&cfg, half, &[], Regime::RUNNING));
            }
            let b = noisy.update(&cfg, at(s), &x, Regime::RUNNING);
            assert_eq!(a, b, "at {s} s");
        }
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        plain.encode(&mut ea);
        noisy.encode(&mut eb);
        assert_eq!(ea, eb);
        // A partly missing sample is scored on the rest.
        let v = noisy.update(&cfg, at(3000), &[50.0, f64::NAN, 100.0], Regime::RUNNING);
        check_finite(&v);
        assert!(v.score < 3.0, "{v:?}");
    }

    #[test]
    fn changeovers_and_regime_changes_are_not_anomalies() {
        let cfg = quick();
        let mut d = MachineDetector::new(&cfg, &[Some(100.0), None, None]);
        let mut noise = Noise(5);
        let mut s = 0;
        let mut setpoint = 1000.0;
        for cycle in 0..20 {
            for _ in 0..900 {
                let temp = 70.0 + noise.normal();
                let x = [temp, setpoint + 3.0 * noise.normal(), 40.0 + noise.normal()];
                let v = d.update(&cfg, at(s), &x, Regime::RUNNING);
                assert_eq!(v.transition, None, "cycle {cycle} at {s} s: {v:?}");
                s += 1;
            }
            // Idle: everything drops; then a changeover to a new speed.
            for (regime, secs) in [(Regime::IDLE, 60), (Regime::SETUP, 300)] {
                for _ in 0..secs {
                    let x = [50.0 + noise.normal(), 0.0, 5.0 + noise.normal()];
                    let v = d.update(&cfg, at(s), &x, regime);
                    assert_eq!((v.score, v.transition), (0.0, None), "{regime:?}");
                    s += 1;
                }
            }
            setpoint = if cycle % 2 == 0 { 1400.0 } else { 900.0 };
        }
    }

    #[test]
    fn encode_decode_round_trip_continues_identically() {
        let cfg = quick();
        let limits = [Some(80.0), None, Some(140.0)];
        let mut a = MachineDetector::new(&cfg, &limits);
        let mut noise = Noise(6);
        for s in 0..5000 {
            let mut x = correlated(&mut noise);
            x[0] += (s - 3000).max(0) as f64 * 0.01;
            a.update(&cfg, at(s), &x, Regime::RUNNING);
        }
        let mut bytes = Vec::new();
        a.encode(&mut bytes);
        let mut b = MachineDetector::decode(&bytes).expect("decodes what it encoded");
        assert_eq!(b.sensors(), 3);
        for s in 5000..8000 {
            let mut x = correlated(&mut noise);
            x[0] += (s - 3000) as f64 * 0.01;
            let regime = if s % 1000 < 200 {
                Regime::SETUP
            } else {
                Regime::RUNNING
            };
            assert_eq!(
                a.update(&cfg, at(s), &x, regime),
                b.update(&cfg, at(s), &x, regime),
                "at {s} s"
            );
        }
        let (mut ea, mut eb) = (Vec::new(), Vec::new());
        a.encode(&mut ea);
        b.encode(&mut eb);
        assert_eq!(ea, eb);
    }

    #[test]
    fn decode_says_what_is_wrong_with_garbage_and_other_versions() {
        let cfg = quick();
        let mut d = MachineDetector::new(&cfg, &[Some(1.0), None]);
        d.update(&cfg, at(0), &[0.5, 2.0], Regime::RUNNING);
        let mut good = Vec::new();
        d.encode(&mut good);
        assert!(MachineDetector::decode(&good).is_ok());
        assert!(matches!(
            MachineDetector::decode(&[]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            MachineDetector::decode(b"garbage in here"),
            Err(DecodeError::Magic { .. })
        ));
        let mut other = good.clone();
        other[4] = 9;
        let err = MachineDetector::decode(&other).expect_err("version 9");
        assert!(
            matches!(
                err,
                DecodeError::Version {
                    found: 9,
                    expected: 1,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("version 9"), "{err}");
        for len in 0..good.len() {
            assert!(
                MachineDetector::decode(&good[..len]).is_err(),
                "{len} bytes"
            );
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(matches!(
            MachineDetector::decode(&longer),
            Err(DecodeError::Invalid { .. })
        ));
    }

    #[test]
    fn config_reads_toml_with_defaults_for_missing_keys_and_rejects_unknown_ones() {
        let cfg: MachineDetectorConfig =
            toml::from_str("threshold = 4.0\nhealth_alarm = 50.0\n").expect("valid");
        assert_eq!((cfg.threshold, cfg.health_alarm), (4.0, 50.0));
        assert_eq!(cfg.settle_s, MachineDetectorConfig::default().settle_s);
        let err = toml::from_str::<MachineDetectorConfig>("treshold = 4.0").expect_err("misspelt");
        assert!(err.to_string().contains("treshold"), "{err}");
    }

    #[test]
    fn a_spike_while_re_centring_after_a_changeover_leaves_no_lasting_alarm() {
        let cfg = quick();
        let mut d = MachineDetector::new(&cfg, &[None, None]);
        let mut noise = Noise(8);
        let mut s = 0;
        let mut run =
            |d: &mut MachineDetector, secs: i64, level: f64, regime: Regime, spike_at: i64| {
                let mut episodes = 0;
                for k in 0..secs {
                    let mut x = [level + 0.05 * noise.normal(), 40.0 + noise.normal()];
                    if k == spike_at {
                        x[0] += 15.0;
                    }
                    if let Some(AnomalyTransition::Started { .. }) =
                        d.update(&cfg, at(s), &x, regime).transition
                    {
                        episodes += 1;
                    }
                    s += 1;
                }
                episodes
            };
        assert_eq!(run(&mut d, 3000, 15.0, Regime::RUNNING, -1), 0);
        run(&mut d, 300, 0.0, Regime::SETUP, -1);
        // Settled after 300 s, the spike 10 samples into the re-centring window.
        assert_eq!(run(&mut d, 2000, 17.0, Regime::RUNNING, 310), 0);
    }

    #[test]
    fn sensors_past_32_are_ignored() {
        let cfg = quick();
        let limits = vec![None; 40];
        let mut d = MachineDetector::new(&cfg, &limits);
        assert_eq!(d.sensors(), 40);
        let mut noise = Noise(7);
        let mut x = [0.0; 40];
        for s in 0..1500 {
            for v in &mut x {
                *v = noise.normal();
            }
            if s >= 1400 {
                x[39] = 1e6;
                x[3] += 20.0;
            }
            let v = d.update(&cfg, at(s), &x, Regime::RUNNING);
            check_finite(&v);
            for (i, _) in v.contributors.iter().flatten() {
                assert!(*i < 32);
            }
        }
        assert!(d.score() > 3.0, "{}", d.score());
        let mut bytes = Vec::new();
        d.encode(&mut bytes);
        assert_eq!(
            MachineDetector::decode(&bytes).expect("decodes").sensors(),
            40
        );
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::*;

        fn any_value() -> impl Strategy<Value = f64> {
            prop_oneof![
                4 => -1e3..1e3f64,
                1 => Just(f64::NAN),
                1 => Just(f64::INFINITY),
                1 => Just(f64::NEG_INFINITY),
                1 => Just(f64::MAX),
                1 => Just(0.0),
                1 => any::<f64>(),
            ]
        }

        proptest! {
            #[test]
            fn arbitrary_inputs_never_panic_and_give_finite_outputs(
                limits in prop::collection::vec(prop::option::of(any_value()), 0..5),
                steps in prop::collection::vec(
                    (0i64..3_000_000, prop::collection::vec(any_value(), 0..6), 0u8..5),
                    1..400,
                ),
            ) {
                let cfg = MachineDetectorConfig {
                    learn_samples: 20,
                    settle_s: 1.0,
                    recentre_samples: 2,
                    rul_min_span_s: 60.0,
                    rul_sample_s: 1.0,
                    ..MachineDetectorConfig::default()
                };
                let mut d = MachineDetector::new(&cfg, &limits);
                let mut t = T0;
                for (dt, values, regime) in steps {
                    t += dt;
                    let regime = if regime == 4 { Regime::UNKNOWN } else { Regime(regime) };
                    check_finite(&d.update(&cfg, Timestamp(t), &values, regime));
                }
                let mut bytes = Vec::new();
                d.encode(&mut bytes);
                prop_assert!(MachineDetector::decode(&bytes).is_ok());
            }

            #[test]
            fn decode_of_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
                let _ = MachineDetector::decode(&bytes);
            }
        }
    }
}
