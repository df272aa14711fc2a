//! Domain ↔ on-disk records (prost messages of `ferrotwin.store.v1`). The records are the
//! versioned format; domain types are never serialised directly.

use ferrotwin_models::alarm::{AlarmState, AlarmStatus};
use ferrotwin_models::detect::machine::MachineDetector;
use ferrotwin_models::detect::sensor::SensorDetector;
use ferrotwin_models::oee::{MachineState, OeeTracker};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::stats::RunningStats;
use ferrotwin_models::{
    AssetPath, EpisodeEdge, Event, EventKind, Quality, QualityCode, QualityReason, Severity,
    Timestamp, Value,
};
use ferrotwin_proto::store::v1 as rec;
use prost::Message;

use super::HistPoint;
use crate::core::{MachineInference, MachineSnap, SensorSnap, TwinSnapshot, TwinState};
use crate::registry::TwinEntry;

fn quality_code(c: QualityCode) -> u32 {
    match c {
        QualityCode::Good => 0,
        QualityCode::Uncertain => 1,
        QualityCode::Bad => 2,
    }
}

fn quality_from(c: u32) -> QualityCode {
    match c {
        0 => QualityCode::Good,
        1 => QualityCode::Uncertain,
        _ => QualityCode::Bad,
    }
}

fn opt_ts(v: Option<Timestamp>) -> (i64, bool) {
    v.map_or((0, false), |t| (t.0, true))
}

/// Record of a twin's published snapshot, encoded; `None` for roll-up twins (derived state).
pub fn encode_snapshot(entry: &TwinEntry) -> Option<Vec<u8>> {
    snapshot_record(entry, true).map(|r| r.encode_to_vec())
}

/// Record of a twin's published snapshot; `None` for roll-up twins (derived state).
/// `learned`: with the detectors' learned state (the store), or without (replication
/// deltas: mirrors show results only, and it would multiply the bytes on the wire).
pub fn snapshot_record(entry: &TwinEntry, learned: bool) -> Option<rec::TwinRecord> {
    let snap = entry.snapshot();
    let mut r = rec::TwinRecord {
        path: entry.path().to_string(),
        restarts: snap.restarts,
        updated_us: snap.updated.0,
        ..Default::default()
    };
    let AssetKind::Sensor { spec, .. } = &entry.def.kind else {
        if let TwinState::Machine(m) = &snap.state {
            let t = &m.tracker;
            let (last_ts_us, has_last_ts) = opt_ts(t.last_ts);
            r.machine = Some(rec::MachineRecord {
                state: t.state.code() as u32,
                state_since_us: t.state_since.0,
                last_ts_us,
                has_last_ts,
                time_in_state_ms: t.time_in_state_ms.to_vec(),
                good_parts: t.good_parts,
                scrap_parts: t.scrap_parts,
                last_good_counter: t.last_good_counter.unwrap_or(0),
                has_last_good: t.last_good_counter.is_some(),
                last_scrap_counter: t.last_scrap_counter.unwrap_or(0),
                has_last_scrap: t.last_scrap_counter.is_some(),
                detector: m
                    .detector
                    .as_ref()
                    .filter(|_| learned)
                    .map_or_else(Vec::new, |d| {
                        let mut v = Vec::new();
                        d.encode(&mut v);
                        v
                    }),
                anomaly_score: m.inference.anomaly_score,
                health: m.inference.health,
                rul_hours: m.inference.rul_hours,
                rul_low_hours: m.inference.rul_low_hours,
                rul_high_hours: m.inference.rul_high_hours,
                model_score: m.inference.model_score,
                anomalous: m.inference.anomalous,
            });
            return Some(r);
        }
        return None;
    };
    let TwinState::Sensor(s) = &snap.state else {
        return None;
    };
    let (value_kind, float_value, int_value) = match s.value {
        None => (0, 0.0, 0),
        Some(Value::Float(v)) => (1, v, 0),
        Some(Value::Int(v)) => (2, 0.0, v),
        Some(Value::Bool(v)) => (3, 0.0, i64::from(v)),
    };
    r.sensor = Some(rec::SensorRecord {
        value_kind,
        float_value,
        int_value,
        quality_code: quality_code(s.quality.code),
        quality_reason: s.quality.reason.as_str().to_string(),
        source_ts_us: s.source_ts.0,
        server_ts_us: s.server_ts.0,
        stats_count: s.stats.count,
        stats_mean: s.stats.mean,
        stats_m2: s.stats.m2,
        stats_min: s.stats.min,
        stats_max: s.stats.max,
        alarms: s
            .alarms
            .iter()
            .zip(&spec.alarms)
            .map(|(a, limit)| {
                let (pending_since_us, has_pending) = opt_ts(a.pending_since);
                let (shelved_until_us, has_shelved) = opt_ts(a.shelved_until);
                rec::AlarmRecord {
                    name: limit.name.clone(),
                    state: u32::from(a.state.code()),
                    condition: a.condition,
                    pending_since_us,
                    has_pending,
                    shelved_until_us,
                    has_shelved,
                    since_us: a.since.0,
                }
            })
            .collect(),
        rejected: s.rejected,
        detector: s
            .detector
            .as_ref()
            .filter(|_| learned)
            .map_or_else(Vec::new, |d| {
                let mut v = Vec::new();
                d.encode(&mut v);
                v
            }),
        anomaly_score: s.anomaly_score,
        anomalous: s.anomalous,
    });
    Some(r)
}

/// Learned detector state from a record: `None` when there is none, or (logged, with the
/// asset and the reason) when it cannot be read or no longer fits the spec: the twin then
/// learns again rather than not starting.
fn restore_detector<D>(
    path: &str,
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> Result<D, ferrotwin_models::detect::DecodeError>,
    fits: impl Fn(&D) -> bool,
) -> Option<Box<D>> {
    if bytes.is_empty() {
        return None;
    }
    match decode(bytes) {
        Ok(d) if fits(&d) => Some(Box::new(d)),
        Ok(_) => {
            tracing::warn!(
                asset = path,
                "detector state does not fit the spec's sensors; learning again"
            );
            None
        }
        Err(e) => {
            tracing::warn!(asset = path, error = %e, "detector state unreadable; learning again");
            None
        }
    }
}

/// Rebuilds a twin's snapshot from its record. Alarms are matched by name against the
/// current spec, so a spec that gained or lost an alarm restores the rest.
///
/// `learn` (a site's own twins): the detectors come back with what they learned, or fresh
/// when the record has none that fits; an anomaly is open only if the restored detector
/// says so. Without (an enterprise's mirrors, which never run detectors): no detector, and
/// the published results as the site sent them.
pub fn decode_snapshot(kind: &AssetKind, r: &rec::TwinRecord, learn: bool) -> TwinSnapshot {
    let mut snap = TwinSnapshot::initial(kind);
    snap.restarts = r.restarts;
    snap.updated = Timestamp(r.updated_us);
    match (&mut snap.state, kind, &r.sensor, &r.machine) {
        (TwinState::Sensor(s), AssetKind::Sensor { spec, .. }, Some(sr), _) => {
            *s = SensorSnap {
                value: match sr.value_kind {
                    1 => Some(Value::Float(sr.float_value)),
                    2 => Some(Value::Int(sr.int_value)),
                    3 => Some(Value::Bool(sr.int_value != 0)),
                    _ => None,
                },
                quality: Quality {
                    code: quality_from(sr.quality_code),
                    reason: QualityReason::parse(&sr.quality_reason),
                },
                source_ts: Timestamp(sr.source_ts_us),
                server_ts: Timestamp(sr.server_ts_us),
                stats: RunningStats {
                    count: sr.stats_count,
                    mean: sr.stats_mean,
                    m2: sr.stats_m2,
                    min: sr.stats_min,
                    max: sr.stats_max,
                },
                alarms: spec
                    .alarms
                    .iter()
                    .map(|limit| {
                        sr.alarms
                            .iter()
                            .find(|a| a.name == limit.name)
                            .map(|a| AlarmStatus {
                                state: u8::try_from(a.state)
                                    .ok()
                                    .and_then(AlarmState::from_code)
                                    .unwrap_or_default(),
                                condition: a.condition,
                                pending_since: a
                                    .has_pending
                                    .then_some(Timestamp(a.pending_since_us)),
                                shelved_until: a
                                    .has_shelved
                                    .then_some(Timestamp(a.shelved_until_us)),
                                since: Timestamp(a.since_us),
                            })
                            .unwrap_or_default()
                    })
                    .collect(),
                rejected: sr.rejected,
                anomaly_score: sr.anomaly_score.filter(|v| v.is_finite()),
                anomalous: sr.anomalous,
                detector: None,
            };
            if learn {
                let restored =
                    restore_detector(&r.path, &sr.detector, SensorDetector::decode, |_| true)
                        .filter(|_| spec.detect.enabled);
                if restored.is_none() {
                    s.anomaly_score = None;
                }
                s.anomalous = restored.as_ref().is_some_and(|d| d.active().is_some());
                s.detector = restored.or_else(|| crate::core::new_sensor_detector(spec));
            }
        }
        (TwinState::Machine(m), AssetKind::Machine { spec, .. }, _, Some(mr)) => {
            let mut time_in_state_ms = [0u64; 4];
            for (t, v) in time_in_state_ms.iter_mut().zip(&mr.time_in_state_ms) {
                *t = *v;
            }
            *m = MachineSnap {
                tracker: OeeTracker {
                    state: MachineState::from_code(i64::from(mr.state)).unwrap_or_default(),
                    state_since: Timestamp(mr.state_since_us),
                    last_ts: mr.has_last_ts.then_some(Timestamp(mr.last_ts_us)),
                    time_in_state_ms,
                    good_parts: mr.good_parts,
                    scrap_parts: mr.scrap_parts,
                    last_good_counter: mr.has_last_good.then_some(mr.last_good_counter),
                    last_scrap_counter: mr.has_last_scrap.then_some(mr.last_scrap_counter),
                },
                rollup: Default::default(),
                inference: MachineInference {
                    anomaly_score: mr.anomaly_score.filter(|v| v.is_finite()),
                    health: mr.health.filter(|v| v.is_finite()),
                    rul_hours: mr.rul_hours.filter(|v| v.is_finite()),
                    rul_low_hours: mr.rul_low_hours.filter(|v| v.is_finite()),
                    rul_high_hours: mr.rul_high_hours.filter(|v| v.is_finite()),
                    model_score: mr.model_score.filter(|v| v.is_finite()),
                    anomalous: mr.anomalous,
                },
                detector: None,
            };
            if learn {
                let restored = restore_detector(
                    &r.path,
                    &mr.detector,
                    MachineDetector::decode,
                    // A type that gained or lost sensors starts learning again.
                    |d: &MachineDetector| d.sensors() == spec.sensors.len(),
                )
                .filter(|_| spec.detect.enabled);
                let inf = &mut m.inference;
                if restored.is_none() {
                    *inf = MachineInference {
                        model_score: inf.model_score,
                        ..MachineInference::default()
                    };
                }
                inf.anomalous = restored.as_ref().is_some_and(|d| d.anomalous());
                m.detector = restored.or_else(|| crate::core::new_machine_detector(spec));
            }
        }
        _ => {}
    }
    snap
}

pub fn encode_chunk(points: &[HistPoint]) -> Vec<u8> {
    let first = points.first().map_or(0, |p| p.ts.0);
    let mut prev = first;
    let mut c = rec::HistoryChunk {
        first_ts_us: first,
        ts_delta_us: Vec::with_capacity(points.len()),
        values: Vec::with_capacity(points.len()),
        qualities: Vec::with_capacity(points.len()),
    };
    for p in points {
        c.ts_delta_us.push(p.ts.0 - prev);
        prev = p.ts.0;
        c.values.push(p.value);
        c.qualities.push(quality_code(p.quality) as u8);
    }
    c.encode_to_vec()
}

pub fn decode_chunk(bytes: &[u8]) -> Result<Vec<HistPoint>, String> {
    let c = rec::HistoryChunk::decode(bytes).map_err(|e| e.to_string())?;
    if c.ts_delta_us.len() != c.values.len() || c.values.len() != c.qualities.len() {
        return Err(format!(
            "chunk has {} timestamps, {} values and {} qualities",
            c.ts_delta_us.len(),
            c.values.len(),
            c.qualities.len()
        ));
    }
    let mut ts = c.first_ts_us;
    // Chunks also arrive from other sites (replication): a delta that overflows is an
    // error, not a panic.
    c.ts_delta_us
        .iter()
        .zip(&c.values)
        .zip(&c.qualities)
        .map(|((d, v), q)| {
            ts = ts
                .checked_add(*d)
                .ok_or_else(|| format!("timestamp overflows after {ts} + {d}"))?;
            Ok(HistPoint {
                ts: Timestamp(ts),
                value: *v,
                quality: quality_from(u32::from(*q)),
            })
        })
        .collect()
}

pub fn encode_event(e: &Event) -> Vec<u8> {
    rec::EventRecord {
        path: e.asset.to_string(),
        ts_us: e.ts.0,
        kind: e.kind.as_str().to_string(),
        severity: e.severity.index() as u32,
        alarm: e.alarm.clone(),
        message: e.message.clone(),
        episode: EpisodeEdge::code(e.episode),
    }
    .encode_to_vec()
}

pub fn decode_event(seq: u64, bytes: &[u8]) -> Result<Event, String> {
    let r = rec::EventRecord::decode(bytes).map_err(|e| e.to_string())?;
    Ok(Event {
        seq,
        asset: AssetPath::parse(&r.path).map_err(|e| e.to_string())?,
        ts: Timestamp(r.ts_us),
        kind: EventKind::parse(&r.kind)
            .ok_or_else(|| format!("unknown event kind {:?}", r.kind))?,
        severity: Severity::ALL
            .get(r.severity as usize)
            .copied()
            .unwrap_or(Severity::Critical),
        alarm: r.alarm,
        message: r.message,
        episode: EpisodeEdge::from_code(r.episode),
    })
}
