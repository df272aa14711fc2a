//! Domain ↔ `ferrotwin.v1` protobuf, as plain functions (the orphan rule forbids `From`
//! between two other crates' types). The API layer answers in these messages; the twins,
//! the registry and the router never see them.

use ferrotwin_models::alarm::{AlarmLimit, AlarmState, AlarmStatus};
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{Event, Level, QualityCode, Severity, Value};
use ferrotwin_proto::v1 as pb;

use crate::core::HistPoint;
use crate::core::{TwinSnapshot, TwinState};
use crate::registry::TwinEntry;

pub fn level(l: Level) -> pb::Level {
    match l {
        Level::Enterprise => pb::Level::Enterprise,
        Level::Site => pb::Level::Site,
        Level::Area => pb::Level::Area,
        Level::Line => pb::Level::Line,
        Level::Machine => pb::Level::Machine,
        Level::Sensor => pb::Level::Sensor,
    }
}

pub fn quality_code(c: QualityCode) -> pb::QualityCode {
    match c {
        QualityCode::Good => pb::QualityCode::Good,
        QualityCode::Uncertain => pb::QualityCode::Uncertain,
        QualityCode::Bad => pb::QualityCode::Bad,
    }
}

pub fn severity(s: Severity) -> pb::Severity {
    match s {
        Severity::Info => pb::Severity::Info,
        Severity::Low => pb::Severity::Low,
        Severity::Medium => pb::Severity::Medium,
        Severity::High => pb::Severity::High,
        Severity::Critical => pb::Severity::Critical,
    }
}

/// `SEVERITY_UNSPECIFIED` means "no minimum".
pub fn severity_from(s: i32) -> Severity {
    match pb::Severity::try_from(s).unwrap_or(pb::Severity::Unspecified) {
        pb::Severity::Unspecified | pb::Severity::Info => Severity::Info,
        pb::Severity::Low => Severity::Low,
        pb::Severity::Medium => Severity::Medium,
        pb::Severity::High => Severity::High,
        pb::Severity::Critical => Severity::Critical,
    }
}

pub fn alarm_state(s: AlarmState) -> pb::AlarmState {
    match s {
        AlarmState::Normal => pb::AlarmState::Normal,
        AlarmState::ActiveUnacked => pb::AlarmState::ActiveUnacked,
        AlarmState::ActiveAcked => pb::AlarmState::ActiveAcked,
        AlarmState::ReturnedUnacked => pb::AlarmState::ReturnedUnacked,
    }
}

pub fn value(v: Value) -> pb::Value {
    pb::Value {
        kind: Some(match v {
            Value::Float(f) => pb::value::Kind::Float(f),
            Value::Int(i) => pb::value::Kind::Int(i),
            Value::Bool(b) => pb::value::Kind::Bool(b),
        }),
    }
}

/// The domain value of `v`; `None` when it holds no value.
pub fn value_from_proto(v: &pb::Value) -> Option<Value> {
    match v.kind? {
        pb::value::Kind::Float(f) => Some(Value::Float(f)),
        pb::value::Kind::Int(i) => Some(Value::Int(i)),
        pb::value::Kind::Bool(b) => Some(Value::Bool(b)),
    }
}

pub fn alarm(limit: &AlarmLimit, status: &AlarmStatus) -> pb::Alarm {
    pb::Alarm {
        name: limit.name.clone(),
        state: alarm_state(status.state) as i32,
        severity: severity(limit.severity) as i32,
        kind: limit.kind.as_str().to_string(),
        limit: limit.limit,
        deadband: limit.deadband,
        since_us: status.since.0,
        shelved_until_us: status.shelved_until.map_or(0, |t| t.0),
        on_delay_ms: limit.on_delay_ms,
        off_delay_ms: limit.off_delay_ms,
    }
}

pub fn rollup(r: &RollUp) -> pb::RollUp {
    pb::RollUp {
        machines: r.machines,
        running: r.running,
        sensors: r.sensors,
        throughput_per_h: r.throughput_per_h,
        mean_oee: r.mean_oee(),
        alarms_by_severity: r.alarms_by_severity.to_vec(),
        active_alarms: r.active_alarms(),
        unacked_alarms: r.unacked_alarms,
        worst_quality: quality_code(r.worst_quality) as i32,
        worst_health: r.worst_health,
        anomalies: r.anomalies,
    }
}

pub fn twin(entry: &TwinEntry, snap: &TwinSnapshot) -> pb::Twin {
    let mut t = pb::Twin {
        id: entry.id.to_string(),
        path: entry.path().to_string(),
        level: level(entry.level()) as i32,
        r#type: entry.def.kind.type_name().to_string(),
        name: entry.path().name().to_string(),
        restarts: snap.restarts,
        updated_us: snap.updated.0,
        ..Default::default()
    };
    match (&snap.state, &entry.def.kind) {
        (TwinState::Sensor(s), AssetKind::Sensor { spec, .. }) => {
            t.sensor = Some(pb::SensorState {
                value: s.value.map(value),
                has_value: s.value.is_some(),
                quality: Some(pb::Quality {
                    code: quality_code(s.quality.code) as i32,
                    reason: s.quality.reason.as_str().to_string(),
                }),
                source_ts_us: s.source_ts.0,
                server_ts_us: s.server_ts.0,
                unit: spec.unit.clone(),
                kind: spec.kind.as_str().to_string(),
                stats: Some(pb::Stats {
                    count: s.stats.count,
                    mean: s.stats.mean,
                    stddev: s.stats.stddev(),
                    min: s.stats.min,
                    max: s.stats.max,
                }),
                alarms: spec
                    .alarms
                    .iter()
                    .zip(&s.alarms)
                    .map(|(l, a)| alarm(l, a))
                    .collect(),
                rejected: s.rejected,
                anomaly_score: s.anomaly_score,
                anomalous: s.anomalous,
            });
        }
        (TwinState::Machine(m), AssetKind::Machine { spec, .. }) => {
            let tr = &m.tracker;
            let o = tr.oee(spec.ideal_cycle_ms);
            t.machine = Some(pb::MachineState {
                state: tr.state.as_str().to_string(),
                state_since_us: tr.state_since.0,
                oee: Some(pb::Oee {
                    availability: o.availability,
                    performance: o.performance,
                    quality: o.quality,
                    oee: o.oee,
                }),
                good_count: tr.good_parts,
                scrap_count: tr.scrap_parts,
                ideal_cycle_ms: spec.ideal_cycle_ms,
                anomaly_score: m.inference.anomaly_score,
                health: m.inference.health,
                rul_hours: m.inference.rul_hours,
                rul_low_hours: m.inference.rul_low_hours,
                rul_high_hours: m.inference.rul_high_hours,
                model_score: m.inference.model_score,
                anomalous: m.inference.anomalous,
            });
            t.rollup = Some(rollup(&m.rollup));
        }
        (TwinState::Group(r), _) => t.rollup = Some(rollup(r)),
        _ => {}
    }
    t
}

pub fn event(e: &Event) -> pb::Event {
    pb::Event {
        seq: e.seq,
        path: e.asset.to_string(),
        ts_us: e.ts.0,
        kind: e.kind.as_str().to_string(),
        severity: severity(e.severity) as i32,
        alarm: e.alarm.clone(),
        message: e.message.clone(),
        episode: e
            .episode
            .map(|x| x.as_str().to_string())
            .unwrap_or_default(),
    }
}

pub fn point(p: &HistPoint) -> pb::HistoryPoint {
    pb::HistoryPoint {
        ts_us: p.ts.0,
        value: p.value,
        min: p.value,
        max: p.value,
        count: 1,
        quality: quality_code(p.quality) as i32,
    }
}

/// Downsamples `points` (time-ordered) into at most `max` equal-time buckets: mean, min,
/// max, count and the worst quality of each, stamped at the bucket's first point.
pub fn downsample(points: &[HistPoint], max: usize) -> Vec<pb::HistoryPoint> {
    if points.len() <= max || max == 0 {
        return points.iter().map(point).collect();
    }
    let (first, last) = (points[0].ts.0, points[points.len() - 1].ts.0);
    let width = ((last - first) / max as i64).max(1) + 1;
    let mut out: Vec<pb::HistoryPoint> = Vec::with_capacity(max);
    let mut bucket = i64::MIN;
    let mut sum = 0.0;
    for p in points {
        let b = (p.ts.0 - first) / width;
        if b != bucket || out.is_empty() {
            if let Some(last) = out.last_mut() {
                last.value = sum / f64::from(last.count);
            }
            bucket = b;
            sum = 0.0;
            out.push(pb::HistoryPoint {
                ts_us: p.ts.0,
                value: 0.0,
                min: p.value,
                max: p.value,
                count: 0,
                quality: quality_code(p.quality) as i32,
            });
        }
        let cur = out.last_mut().expect("pushed above");
        sum += p.value;
        cur.count += 1;
        cur.min = cur.min.min(p.value);
        cur.max = cur.max.max(p.value);
        cur.quality = cur.quality.max(quality_code(p.quality) as i32);
    }
    if let Some(last) = out.last_mut() {
        last.value = sum / f64::from(last.count);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotwin_models::Timestamp;

    #[test]
    fn downsampling_keeps_extremes_and_counts() {
        let pts: Vec<HistPoint> = (0..1000)
            .map(|i| HistPoint {
                ts: Timestamp::from_millis(i),
                value: if i == 500 { 1e6 } else { i as f64 },
                quality: if i == 5 {
                    QualityCode::Bad
                } else {
                    QualityCode::Good
                },
            })
            .collect();
        let out = downsample(&pts, 100);
        assert!(out.len() <= 100, "{}", out.len());
        assert_eq!(out.iter().map(|p| p.count).sum::<u32>(), 1000);
        assert!(out.iter().any(|p| p.max == 1e6));
        assert_eq!(out[0].quality, pb::QualityCode::Bad as i32);
        assert_eq!(downsample(&pts[..50], 100).len(), 50);
    }
}
