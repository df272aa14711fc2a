//! Roll-up math: what a line, area, site or enterprise twin says about everything below it.

use crate::event::Severity;
use crate::value::QualityCode;

/// Aggregate of a subtree. Parents hold one per child and merge them; merging is
/// associative so a parent never needs its grandchildren.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RollUp {
    pub machines: u32,
    pub running: u32,
    pub sensors: u32,
    /// Good parts per hour over the subtree (sum).
    pub throughput_per_h: f64,
    /// Sum and count of machine OEE figures, for the mean.
    pub oee_sum: f64,
    pub oee_count: u32,
    /// Active alarms by severity (index = `Severity::index`).
    pub alarms_by_severity: [u32; 5],
    /// Unacknowledged alarms (active or returned).
    pub unacked_alarms: u32,
    pub worst_quality: QualityCode,
    /// Lowest machine health (0..=100) below; `None` when no machine reports one.
    pub worst_health: Option<f64>,
    /// Sensors and machines below with an open anomaly episode.
    pub anomalies: u32,
}

impl RollUp {
    pub fn merge(&mut self, other: &RollUp) {
        self.machines += other.machines;
        self.running += other.running;
        self.sensors += other.sensors;
        self.throughput_per_h += other.throughput_per_h;
        self.oee_sum += other.oee_sum;
        self.oee_count += other.oee_count;
        for (a, b) in self
            .alarms_by_severity
            .iter_mut()
            .zip(other.alarms_by_severity)
        {
            *a += b;
        }
        self.unacked_alarms += other.unacked_alarms;
        self.worst_quality = self.worst_quality.max(other.worst_quality);
        self.worst_health = match (self.worst_health, other.worst_health) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.anomalies += other.anomalies;
    }

    pub fn of_children<'a>(children: impl IntoIterator<Item = &'a RollUp>) -> RollUp {
        let mut r = RollUp::default();
        for c in children {
            r.merge(c);
        }
        r
    }

    pub fn mean_oee(&self) -> Option<f64> {
        (self.oee_count > 0).then(|| self.oee_sum / f64::from(self.oee_count))
    }

    pub fn active_alarms(&self) -> u32 {
        self.alarms_by_severity.iter().sum()
    }

    pub fn count_alarm(&mut self, severity: Severity) {
        self.alarms_by_severity[severity.index()] += 1;
    }

    /// Most severe active alarm, if any.
    pub fn worst_alarm(&self) -> Option<Severity> {
        Severity::ALL
            .into_iter()
            .rev()
            .find(|s| self.alarms_by_severity[s.index()] > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_sums_counts_and_keeps_worst_quality() {
        let mut a = RollUp {
            machines: 2,
            running: 1,
            oee_sum: 1.2,
            oee_count: 2,
            throughput_per_h: 100.0,
            ..RollUp::default()
        };
        a.count_alarm(Severity::Low);
        let mut b = RollUp {
            machines: 1,
            oee_sum: 0.3,
            oee_count: 1,
            worst_quality: QualityCode::Uncertain,
            ..RollUp::default()
        };
        b.count_alarm(Severity::Critical);
        let r = RollUp::of_children([&a, &b]);
        assert_eq!(r.machines, 3);
        assert_eq!(r.active_alarms(), 2);
        assert_eq!(r.worst_alarm(), Some(Severity::Critical));
        assert_eq!(r.worst_quality, QualityCode::Uncertain);
        assert!((r.mean_oee().expect("has oee") - 0.5).abs() < 1e-12);
        assert_eq!(RollUp::default().mean_oee(), None);
    }
}
