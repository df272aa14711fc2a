//! Scores anomaly detections against the simulator's ground truth (`FaultLabel`s): pure, so
//! the tuning harness, tests and evaluation runs share one definition of "detected".
//!
//! **Matching rule.** A detection matches a label when
//! - it starts within `[label.start - 10 s, label.end + 60 s]` (`EARLY_US`, `GRACE_US`; a
//!   label still open ends at the window's end), and
//! - its asset is the label's asset, or the label's machine (a machine-level detection of a
//!   sensor fault), or, for a machine-level label, one of the machine's sensors; a detection
//!   whose `contributors` name the label's asset matches too.
//!
//! A label is **detected** when at least one detection matches it; its **delay** is the
//! start of the earliest matching detection minus the label's start (0 if the detection came
//! early). **Lead time** (bearing wear only) is the failure (the label's end: the breakdown
//! that ends the wear) minus the earliest matching detection. A detection that matches no
//! label at all is a **false alarm**; one that matches a label of any kind (a breakdown
//! included) is true.
//!
//! **Precision per kind.** A true detection counts for one kind: that of its best label
//! (a counted kind first, then one on the detection's own asset, then the closest start). A
//! false alarm has no label, so it counts against the kind its detector most often finds in
//! the run (the majority kind of that detector's true detections); false alarms of a detector
//! that found nothing count only in the overall precision.
//!
//! **Overall** sums the kinds detectors are for: overheating, stuck_sensor, spike,
//! bearing_wear and sensor_bias (`FaultKind::is_detector_job`). Breakdown, dropout and
//! network_loss are shown in the table, marked as not a detector's job (the machine state
//! and staleness report them), and left out of the overall recall; detections matching them
//! are still true. Overall precision is true detections over all detections.

use std::collections::HashMap;
use std::fmt;

use ferrotwin_models::{AssetPath, Level, Timestamp};

use crate::model::{FaultKind, FaultLabel};

/// A detection may start this long before its label (detectors see the first faulty samples
/// a little before the label's own timestamp when sampling and faults are out of phase).
pub const EARLY_US: i64 = 10_000_000;
/// A detection starting up to this long after a label ended still belongs to it (a fault's
/// effect fades after its cause: a cooling temperature, a stuck sensor's jump back).
pub const GRACE_US: i64 = 60_000_000;

/// One anomaly episode a detector reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Detection {
    pub asset: AssetPath,
    /// `DetectorKind::as_str` of the detector that started it.
    pub detector: String,
    pub start: Timestamp,
    pub end: Option<Timestamp>,
    /// Assets a machine-level detection blames (its top sensors).
    pub contributors: Vec<AssetPath>,
}

/// The run the labels and detections come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreWindow {
    pub start: Timestamp,
    pub end: Timestamp,
    pub machines: usize,
}

impl ScoreWindow {
    pub fn machine_days(&self) -> f64 {
        let days = (self.end.0.saturating_sub(self.start.0)).max(0) as f64 / 86_400e6;
        days * self.machines as f64
    }
}

impl FaultKind {
    /// Whether finding this fault is an anomaly detector's job (counted in the overall
    /// score); breakdown, dropout and network loss are reported by state and staleness.
    pub fn is_detector_job(self) -> bool {
        matches!(
            self,
            FaultKind::Overheating
                | FaultKind::StuckSensor
                | FaultKind::Spike
                | FaultKind::BearingWear
                | FaultKind::SensorBias
        )
    }
}

/// Scores of one fault kind, or of all counted kinds (`kind == None`).
#[derive(Debug, Clone, PartialEq)]
pub struct KindScore {
    pub kind: Option<FaultKind>,
    pub labels: usize,
    pub detected: usize,
    /// True detections counted for this kind.
    pub true_detections: usize,
    /// False alarms counted against this kind.
    pub false_alarms: usize,
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    pub f1: Option<f64>,
    /// Detection delay over the detected labels, seconds of simulated time.
    pub median_delay_s: Option<f64>,
    pub p90_delay_s: Option<f64>,
    /// Bearing wear: time from detection to failure, seconds.
    pub median_lead_s: Option<f64>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ScoreReport {
    /// One row per kind with labels or detections, in `FaultKind::ALL` order.
    pub kinds: Vec<KindScore>,
    /// The counted kinds together (see the module doc).
    pub overall: KindScore,
    pub detections: usize,
    pub false_alarms: usize,
    pub machine_days: f64,
    pub false_alarms_per_machine_day: f64,
}

impl ScoreReport {
    pub fn kind(&self, kind: FaultKind) -> Option<&KindScore> {
        self.kinds.iter().find(|k| k.kind == Some(kind))
    }
}

fn machine_of(p: &AssetPath) -> Option<AssetPath> {
    match p.level() {
        Level::Sensor => p.parent(),
        Level::Machine => Some(p.clone()),
        _ => None,
    }
}

/// Whether `d` matches `l` (the module doc's rule); `open_end` ends a label still open.
pub fn matches(l: &FaultLabel, d: &Detection, open_end: Timestamp) -> bool {
    let end = l.end.unwrap_or(open_end).0;
    let in_time = d.start.0 >= l.start.0.saturating_sub(EARLY_US)
        && d.start.0 <= end.saturating_add(GRACE_US);
    if !in_time {
        return false;
    }
    let own = d.asset == l.asset;
    let machine_of_sensor_label =
        l.asset.level() == Level::Sensor && l.asset.parent().as_ref() == Some(&d.asset);
    let sensor_of_machine_label =
        l.asset.level() == Level::Machine && d.asset.parent().as_ref() == Some(&l.asset);
    own || machine_of_sensor_label || sensor_of_machine_label || d.contributors.contains(&l.asset)
}

/// Scores `detections` against `labels` over `run` (see the module doc for the rules).
pub fn score(labels: &[FaultLabel], detections: &[Detection], run: ScoreWindow) -> ScoreReport {
    // Labels by machine: a detection is only compared with its own machine's labels.
    let mut by_machine: HashMap<AssetPath, Vec<usize>> = HashMap::new();
    for (i, l) in labels.iter().enumerate() {
        if let Some(m) = machine_of(&l.asset) {
            by_machine.entry(m).or_default().push(i);
        }
    }
    let mut first_hit: Vec<Option<i64>> = vec![None; labels.len()];
    // Per detection: the kind it counts for, None for a false alarm.
    let mut counted_for: Vec<Option<FaultKind>> = Vec::with_capacity(detections.len());
    for d in detections {
        let mut best: Option<(usize, (bool, bool, i64))> = None;
        let candidates = machine_of(&d.asset)
            .and_then(|m| by_machine.get(&m))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut check = |i: usize| {
            let l = &labels[i];
            if !matches(l, d, run.end) {
                return;
            }
            let hit = &mut first_hit[i];
            *hit = Some(hit.map_or(d.start.0, |h: i64| h.min(d.start.0)));
            let rank = (
                !l.kind.is_detector_job(),
                d.asset != l.asset,
                (d.start.0 - l.start.0).saturating_abs(),
            );
            if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                best = Some((i, rank));
            }
        };
        for &i in candidates {
            check(i);
        }
        // Contributors may name another machine's assets.
        for c in &d.contributors {
            let Some(m) = machine_of(c) else { continue };
            if machine_of(&d.asset).as_ref() == Some(&m) {
                continue;
            }
            for &i in by_machine.get(&m).map(Vec::as_slice).unwrap_or(&[]) {
                check(i);
            }
        }
        counted_for.push(best.map(|(i, _)| labels[i].kind));
    }

    // Each detector's majority kind, for attributing its false alarms.
    let mut found: HashMap<&str, HashMap<FaultKind, usize>> = HashMap::new();
    for (d, k) in detections.iter().zip(&counted_for) {
        if let Some(k) = k {
            *found
                .entry(d.detector.as_str())
                .or_default()
                .entry(*k)
                .or_default() += 1;
        }
    }
    let majority = |detector: &str| -> Option<FaultKind> {
        let counts = found.get(detector)?;
        FaultKind::ALL
            .into_iter()
            .filter_map(|k| counts.get(&k).map(|&n| (n, k)))
            // Ties go to the kind first in `ALL`: `max_by_key` keeps the last maximum.
            .rev()
            .max_by_key(|(n, _)| *n)
            .map(|(_, k)| k)
    };
    let mut tp: HashMap<FaultKind, usize> = HashMap::new();
    let mut fa: HashMap<FaultKind, usize> = HashMap::new();
    let mut false_alarms = 0;
    for (d, k) in detections.iter().zip(&counted_for) {
        match k {
            Some(k) => *tp.entry(*k).or_default() += 1,
            None => {
                false_alarms += 1;
                if let Some(k) = majority(&d.detector) {
                    *fa.entry(k).or_default() += 1;
                }
            }
        }
    }

    let row = |kind: Option<FaultKind>, tp: usize, fa: usize| {
        let mut delays = Vec::new();
        let mut leads = Vec::new();
        let mut n = 0;
        for (l, hit) in labels.iter().zip(&first_hit) {
            let wanted = match kind {
                Some(k) => l.kind == k,
                None => l.kind.is_detector_job(),
            };
            if !wanted {
                continue;
            }
            n += 1;
            if let Some(h) = hit {
                delays.push((h - l.start.0).max(0) as f64 / 1e6);
                if l.kind == FaultKind::BearingWear {
                    let failure = l.end.unwrap_or(run.end).0;
                    leads.push((failure - h).max(0) as f64 / 1e6);
                }
            }
        }
        let detected = delays.len();
        let recall = (n > 0).then(|| detected as f64 / n as f64);
        let precision = (tp + fa > 0).then(|| tp as f64 / (tp + fa) as f64);
        let f1 = match (precision, recall) {
            (Some(p), Some(r)) if p + r > 0.0 => Some(2.0 * p * r / (p + r)),
            (Some(_), Some(_)) => Some(0.0),
            _ => None,
        };
        KindScore {
            kind,
            labels: n,
            detected,
            true_detections: tp,
            false_alarms: fa,
            precision,
            recall,
            f1,
            median_delay_s: percentile(&mut delays, 0.5),
            p90_delay_s: percentile(&mut delays, 0.9),
            median_lead_s: percentile(&mut leads, 0.5),
        }
    };
    let kinds = FaultKind::ALL
        .into_iter()
        .map(|k| {
            row(
                Some(k),
                tp.get(&k).copied().unwrap_or(0),
                fa.get(&k).copied().unwrap_or(0),
            )
        })
        .filter(|r| r.labels > 0 || r.true_detections > 0 || r.false_alarms > 0)
        .collect();
    let true_total = detections.len() - false_alarms;
    let overall = row(None, true_total, false_alarms);
    let machine_days = run.machine_days();
    ScoreReport {
        kinds,
        overall,
        detections: detections.len(),
        false_alarms,
        machine_days,
        false_alarms_per_machine_day: if machine_days > 0.0 {
            false_alarms as f64 / machine_days
        } else {
            0.0
        },
    }
}

/// Nearest-rank percentile (`q` in 0..=1) of `v`, sorting it; `None` when empty.
fn percentile(v: &mut [f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    Some(v[rank - 1])
}

/// A table cell: the value with `.1` decimals and unit `.2`, or `-`.
struct Opt(Option<f64>, usize, &'static str);
impl fmt::Display for Opt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self.0 {
            Some(v) => format!("{v:.p$}{}", self.2, p = self.1),
            None => "-".to_string(),
        };
        write!(f, "{text:>w$}", w = f.width().unwrap_or(0))
    }
}

impl fmt::Display for ScoreReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<14} {:>6} {:>8} {:>6} {:>6} {:>9} {:>6} {:>6} {:>9} {:>9} {:>9}",
            "kind",
            "labels",
            "detected",
            "true",
            "false",
            "precision",
            "recall",
            "F1",
            "delay p50",
            "delay p90",
            "lead p50"
        )?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, k: &KindScore| {
            writeln!(
                f,
                "{:<14} {:>6} {:>8} {:>6} {:>6} {:>9} {:>6} {:>6} {:>9} {:>9} {:>9}",
                name,
                k.labels,
                k.detected,
                k.true_detections,
                k.false_alarms,
                Opt(k.precision, 3, ""),
                Opt(k.recall, 3, ""),
                Opt(k.f1, 3, ""),
                Opt(k.median_delay_s, 1, "s"),
                Opt(k.p90_delay_s, 1, "s"),
                Opt(k.median_lead_s, 0, "s"),
            )
        };
        for k in &self.kinds {
            let kind = k.kind.expect("kind rows have a kind");
            let name = if kind.is_detector_job() {
                kind.as_str().to_string()
            } else {
                format!("{}*", kind.as_str())
            };
            line(f, &name, k)?;
        }
        line(f, "overall", &self.overall)?;
        writeln!(
            f,
            "* not a detector's job (state, staleness): not in overall recall; detections matching it are true"
        )?;
        write!(
            f,
            "{} detections, {} false alarms: {:.2} per machine-day over {:.2} machine-days",
            self.detections,
            self.false_alarms,
            self.false_alarms_per_machine_day,
            self.machine_days
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_000_000_000_000;
    const M: &str = "acme/berlin/assembly/line-1/press-1";

    fn p(s: &str) -> AssetPath {
        AssetPath::parse(s).expect("test path")
    }

    fn label(asset: &str, kind: FaultKind, start_s: i64, end_s: i64) -> FaultLabel {
        FaultLabel {
            asset: p(asset),
            kind,
            start: Timestamp(T0 + start_s * 1_000_000),
            end: Some(Timestamp(T0 + end_s * 1_000_000)),
        }
    }

    fn det(asset: &str, detector: &str, start_s: i64) -> Detection {
        Detection {
            asset: p(asset),
            detector: detector.to_string(),
            start: Timestamp(T0 + start_s * 1_000_000),
            end: None,
            contributors: Vec::new(),
        }
    }

    fn window() -> ScoreWindow {
        ScoreWindow {
            start: Timestamp(T0),
            end: Timestamp(T0 + 86_400_000_000),
            machines: 2,
        }
    }

    #[test]
    fn detection_matches_from_ten_seconds_before_to_a_minute_after_the_label() {
        let l = label(&format!("{M}/temp"), FaultKind::Overheating, 1000, 1100);
        let end = window().end;
        let at = |s| det(&format!("{M}/temp"), "level", s);
        assert!(!matches(&l, &at(989), end));
        assert!(matches(&l, &at(990), end));
        assert!(matches(&l, &at(1160), end));
        assert!(!matches(&l, &at(1161), end));
    }

    #[test]
    fn sensor_label_matches_its_sensor_and_machine_but_not_a_sibling_sensor() {
        let l = label(&format!("{M}/temp"), FaultKind::StuckSensor, 1000, 1300);
        let end = window().end;
        assert!(matches(&l, &det(&format!("{M}/temp"), "stuck", 1005), end));
        assert!(matches(&l, &det(M, "multivariate", 1005), end));
        assert!(!matches(
            &l,
            &det(&format!("{M}/power"), "level", 1005),
            end
        ));
        let mut blamed = det("acme/berlin/assembly/line-1/press-2", "multivariate", 1005);
        assert!(!matches(&l, &blamed, end));
        blamed.contributors.push(p(&format!("{M}/temp")));
        assert!(matches(&l, &blamed, end));
    }

    #[test]
    fn machine_label_matches_any_sensor_of_the_machine() {
        let l = label(M, FaultKind::BearingWear, 0, 7200);
        let end = window().end;
        assert!(matches(
            &l,
            &det(&format!("{M}/vibration"), "level", 3000),
            end
        ));
        assert!(matches(&l, &det(M, "health", 3000), end));
        assert!(!matches(
            &l,
            &det(
                "acme/berlin/assembly/line-1/press-2/vibration",
                "level",
                3000
            ),
            end
        ));
    }

    #[test]
    fn score_counts_recall_delays_lead_time_and_false_alarms() {
        let temp = format!("{M}/temp");
        let labels = vec![
            label(&temp, FaultKind::Overheating, 100, 200),
            label(&temp, FaultKind::Overheating, 1000, 1100),
            label(&temp, FaultKind::Spike, 5000, 5000),
            label(M, FaultKind::BearingWear, 10_000, 20_000),
            label(M, FaultKind::Breakdown, 20_000, 21_000),
        ];
        let detections = vec![
            det(&temp, "level", 110),
            det(&temp, "level", 1030),
            det(&temp, "level", 1040), // same label again: true, not a second detection
            det(&temp, "level", 3000), // false alarm, counted against overheating
            det(&temp, "spike", 5001),
            det(&format!("{M}/vibration"), "health", 16_400), // 3600 s before the failure
            // Matches the breakdown and, in its grace, the wear: counts for the wear.
            det(&format!("{M}/power"), "level", 20_010),
        ];
        let r = score(&labels, &detections, window());
        let oh = r.kind(FaultKind::Overheating).expect("row");
        assert_eq!((oh.labels, oh.detected), (2, 2));
        assert_eq!((oh.true_detections, oh.false_alarms), (3, 1));
        assert_eq!(oh.precision, Some(0.75));
        assert_eq!(oh.median_delay_s, Some(10.0));
        assert_eq!(oh.p90_delay_s, Some(30.0));
        let bw = r.kind(FaultKind::BearingWear).expect("row");
        assert_eq!(bw.median_lead_s, Some(3600.0));
        assert_eq!(bw.true_detections, 2);
        let bd = r.kind(FaultKind::Breakdown).expect("row");
        assert_eq!((bd.labels, bd.detected, bd.true_detections), (1, 1, 0));
        assert_eq!(r.false_alarms, 1);
        assert_eq!(r.overall.labels, 4);
        assert_eq!(r.overall.detected, 4);
        assert_eq!(r.overall.recall, Some(1.0));
        assert_eq!(r.overall.precision, Some(6.0 / 7.0));
        assert_eq!(r.false_alarms_per_machine_day, 0.5);
        let table = r.to_string();
        assert!(table.contains("breakdown*"), "{table}");
        assert!(table.contains("overall"), "{table}");
    }

    #[test]
    fn missed_labels_lower_recall_and_no_detections_leave_precision_undefined() {
        let labels = vec![label(&format!("{M}/temp"), FaultKind::Spike, 10, 10)];
        let r = score(&labels, &[], window());
        let s = r.kind(FaultKind::Spike).expect("row");
        assert_eq!(
            (s.recall, s.precision, s.median_delay_s),
            (Some(0.0), None, None)
        );
        assert_eq!(r.false_alarms_per_machine_day, 0.0);
    }
}
