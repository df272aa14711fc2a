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
            // Expected after a change of the machine's sensors (the plan says so): one line
            // per machine would flood the log of a plant-wide change.
            tracing::debug!(
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
                rules: Vec::new(),
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use ferrotwin_models::detect::Regime;
    use ferrotwin_models::rollup::RollUp;
    use ferrotwin_models::spec::{AssetDef, PlantSpec, SensorSpec};
    use proptest::prelude::*;

    use super::*;
    use crate::registry::Registry;

    const MACHINE: &str = "e/s/a/l/m1";
    const TEMP: &str = "e/s/a/l/m1/temp";

    /// One press with two sensors; `temp` has two alarms.
    fn plant() -> Vec<AssetDef> {
        PlantSpec::from_toml(
            r#"
version = 1
enterprise = "e"
[machine_types.press]
ideal_cycle_ms = 1000
[[machine_types.press.sensors]]
name = "temp"
max = 200.0
alarms = [
  { name = "high", kind = "high", limit = 90.0 },
  { name = "low", kind = "low", limit = 10.0 },
]
[[machine_types.press.sensors]]
name = "force"
[[sites]]
name = "s"
[[sites.areas]]
name = "a"
[[sites.areas.lines]]
name = "l"
machines = [{ name = "m1", type = "press" }]
"#,
            "codec test",
        )
        .expect("valid")
        .assets()
    }

    fn def(path: &str) -> AssetDef {
        plant()
            .into_iter()
            .find(|d| d.path.as_str() == path)
            .expect("asset of the plant")
    }

    fn sensor_spec(def: &AssetDef) -> Arc<SensorSpec> {
        match &def.kind {
            AssetKind::Sensor { spec, .. } => spec.clone(),
            _ => panic!("{} is not a sensor", def.path),
        }
    }

    /// `snap` published by the twin of `def`, encoded as the store writes it.
    fn encoded(def: &AssetDef, snap: TwinSnapshot, learned: bool) -> Option<Vec<u8>> {
        let registry = Registry::default();
        let entry = registry.insert(def.clone(), snap, 0);
        snapshot_record(&entry, learned).map(|r| r.encode_to_vec())
    }

    fn decoded(def: &AssetDef, bytes: &[u8], learn: bool) -> TwinSnapshot {
        let r = rec::TwinRecord::decode(bytes).expect("a record");
        decode_snapshot(&def.kind, &r, learn)
    }

    fn ts(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    /// A sensor detector that learned a few minutes of a steady signal, then saw it jump.
    fn trained_sensor_detector(spec: &SensorSpec) -> SensorDetector {
        let mut d = *crate::core::new_sensor_detector(spec).expect("detectors on by default");
        for k in 0..300 {
            let v = if k >= 290 {
                150.0
            } else {
                50.0 + (k % 7) as f64 * 0.1
            };
            d.update(&spec.detect, ts(k * 1_000), v, Regime::RUNNING);
        }
        d
    }

    /// A machine detector's learned state as the record holds it (its scratch buffers are
    /// not state, and not compared).
    fn learned(m: &MachineSnap) -> Vec<u8> {
        let mut bytes = Vec::new();
        if let Some(d) = &m.detector {
            d.encode(&mut bytes);
        }
        bytes
    }

    fn sensor_snapshot(spec: &SensorSpec) -> TwinSnapshot {
        let detector = trained_sensor_detector(spec);
        TwinSnapshot {
            restarts: 2,
            updated: ts(300_500),
            state: TwinState::Sensor(SensorSnap {
                value: Some(Value::Float(150.0)),
                quality: Quality {
                    code: QualityCode::Uncertain,
                    reason: QualityReason::OutOfRange,
                },
                source_ts: ts(299_000),
                server_ts: ts(299_100),
                stats: RunningStats {
                    count: 300,
                    mean: 50.4,
                    m2: 12.5,
                    min: 50.0,
                    max: 150.0,
                },
                alarms: vec![
                    AlarmStatus {
                        state: AlarmState::ActiveUnacked,
                        condition: true,
                        pending_since: None,
                        shelved_until: Some(ts(900_000)),
                        since: ts(299_000),
                    },
                    AlarmStatus {
                        state: AlarmState::ReturnedUnacked,
                        condition: false,
                        pending_since: Some(ts(298_000)),
                        shelved_until: None,
                        since: ts(100_000),
                    },
                ],
                rejected: 4,
                anomaly_score: Some(detector.score()),
                anomalous: detector.active().is_some(),
                detector: Some(Box::new(detector)),
            }),
        }
    }

    #[test]
    fn a_sensor_snapshot_with_alarms_and_learned_detectors_round_trips() {
        let temp = def(TEMP);
        let snap = sensor_snapshot(&sensor_spec(&temp));
        let TwinState::Sensor(s) = &snap.state else {
            unreachable!()
        };
        assert!(s.anomalous, "the spike opened an episode");
        let bytes = encoded(&temp, snap.clone(), true).expect("sensors have records");
        assert_eq!(decoded(&temp, &bytes, true), snap);
    }

    fn machine_snapshot(spec: &ferrotwin_models::spec::MachineType) -> TwinSnapshot {
        let mut detector = *crate::core::new_machine_detector(spec).expect("detectors on");
        // Past its settling and learning (300 s, 3,600 samples): monitoring.
        for k in 0..4_000 {
            let v = [60.0 + (k % 5) as f64 * 0.2, 5.0 + (k % 3) as f64 * 0.1];
            detector.update(&spec.detect, ts(k * 1_000), &v, Regime::RUNNING);
        }
        TwinSnapshot {
            restarts: 1,
            updated: ts(600_000),
            state: TwinState::Machine(MachineSnap {
                rules: Vec::new(),
                tracker: OeeTracker {
                    state: MachineState::Down,
                    state_since: ts(550_000),
                    last_ts: Some(ts(599_000)),
                    time_in_state_ms: [1_000, 500_000, 20_000, 49_000],
                    good_parts: 480,
                    scrap_parts: 12,
                    last_good_counter: Some(10_480),
                    last_scrap_counter: None,
                },
                rollup: RollUp::default(),
                inference: MachineInference {
                    anomaly_score: Some(detector.score()),
                    health: Some(72.5),
                    rul_hours: Some(120.0),
                    rul_low_hours: Some(80.0),
                    rul_high_hours: Some(200.0),
                    model_score: Some(1.25),
                    anomalous: detector.anomalous(),
                },
                detector: Some(Box::new(detector)),
            }),
        }
    }

    fn machine_spec(def: &AssetDef) -> Arc<ferrotwin_models::spec::MachineType> {
        match &def.kind {
            AssetKind::Machine { spec, .. } => spec.clone(),
            _ => panic!("{} is not a machine", def.path),
        }
    }

    #[test]
    fn a_machine_snapshot_with_oee_inference_and_learned_detectors_round_trips() {
        let m1 = def(MACHINE);
        let snap = machine_snapshot(&machine_spec(&m1));
        let bytes = encoded(&m1, snap.clone(), true).expect("machines have records");
        let back = decoded(&m1, &bytes, true);
        assert_eq!((back.restarts, back.updated), (snap.restarts, snap.updated));
        let (TwinState::Machine(back), TwinState::Machine(m)) = (back.state, snap.state) else {
            panic!("a machine decodes as a machine");
        };
        assert!(
            m.inference.anomaly_score.is_some_and(|s| s > 0.0),
            "the detectors learned and score"
        );
        assert_eq!(learned(&back), learned(&m));
        assert_eq!(
            MachineSnap {
                detector: None,
                ..back
            },
            MachineSnap {
                detector: None,
                ..m
            }
        );
    }

    #[test]
    fn a_machines_roll_up_is_not_stored_it_is_rebuilt_from_its_children() {
        let m1 = def(MACHINE);
        let mut snap = machine_snapshot(&machine_spec(&m1));
        let TwinState::Machine(m) = &mut snap.state else {
            unreachable!()
        };
        m.rollup = RollUp {
            machines: 1,
            sensors: 2,
            ..RollUp::default()
        };
        let tracker = m.tracker;
        let bytes = encoded(&m1, snap, true).expect("machines have records");
        let TwinState::Machine(back) = decoded(&m1, &bytes, true).state else {
            panic!("a machine decodes as a machine");
        };
        assert_eq!(back.rollup, RollUp::default());
        assert_eq!(back.tracker, tracker);
    }

    #[test]
    fn a_group_roll_up_has_no_record_and_restores_as_the_initial_state() {
        let line = def("e/s/a/l");
        let snap = TwinSnapshot {
            restarts: 3,
            updated: ts(1_000),
            state: TwinState::Group(RollUp {
                machines: 4,
                running: 3,
                sensors: 12,
                ..RollUp::default()
            }),
        };
        assert_eq!(encoded(&line, snap.clone(), true), None, "derived state");
        assert_eq!(encoded(&line, snap, false), None, "not replicated either");
        let bare = rec::TwinRecord {
            path: line.path.to_string(),
            restarts: 3,
            ..Default::default()
        };
        let back = decode_snapshot(&line.kind, &bare, true);
        assert_eq!(back.state, TwinState::Group(RollUp::default()));
        assert_eq!(back.restarts, 3);
    }

    #[test]
    fn a_replication_record_carries_the_results_without_the_learned_state() {
        let temp = def(TEMP);
        let snap = sensor_snapshot(&sensor_spec(&temp));
        let bytes = encoded(&temp, snap.clone(), false).expect("sensors have records");
        let r = rec::TwinRecord::decode(&*bytes).expect("a record");
        assert!(r.sensor.as_ref().is_some_and(|s| s.detector.is_empty()));
        // A mirror (no learning) shows the site's results as they were published.
        let mirror = decode_snapshot(&temp.kind, &r, false);
        let mut expected = snap;
        if let TwinState::Sensor(s) = &mut expected.state {
            s.detector = None;
        }
        assert_eq!(mirror, expected);
    }

    #[test]
    fn an_unreadable_detector_state_restores_fresh_detectors_and_no_open_anomaly() {
        let temp = def(TEMP);
        let spec = sensor_spec(&temp);
        let bytes = encoded(&temp, sensor_snapshot(&spec), true).expect("record");
        let mut r = rec::TwinRecord::decode(&*bytes).expect("a record");
        if let Some(s) = &mut r.sensor {
            s.detector = vec![0xff; 7];
        }
        let TwinState::Sensor(s) = decode_snapshot(&temp.kind, &r, true).state else {
            panic!("a sensor decodes as a sensor");
        };
        assert_eq!(s.detector, crate::core::new_sensor_detector(&spec));
        assert_eq!((s.anomaly_score, s.anomalous), (None, false));
        assert_eq!(s.value, Some(Value::Float(150.0)), "the rest is restored");
    }

    /// `ferrotwin.store.v1` records as a writer from before the learned state, the
    /// inference results and episode edges wrote them (tags as in store.proto).
    mod older {
        use ferrotwin_proto::store::v1 as rec;

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct TwinRecord {
            #[prost(string, tag = "1")]
            pub path: String,
            #[prost(uint32, tag = "2")]
            pub restarts: u32,
            #[prost(int64, tag = "3")]
            pub updated_us: i64,
            #[prost(message, optional, tag = "10")]
            pub sensor: Option<SensorRecord>,
            #[prost(message, optional, tag = "11")]
            pub machine: Option<MachineRecord>,
        }

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct SensorRecord {
            #[prost(uint32, tag = "1")]
            pub value_kind: u32,
            #[prost(double, tag = "2")]
            pub float_value: f64,
            #[prost(uint32, tag = "4")]
            pub quality_code: u32,
            #[prost(int64, tag = "6")]
            pub source_ts_us: i64,
            #[prost(message, repeated, tag = "13")]
            pub alarms: Vec<rec::AlarmRecord>,
        }

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct MachineRecord {
            #[prost(uint32, tag = "1")]
            pub state: u32,
            #[prost(int64, tag = "2")]
            pub state_since_us: i64,
            #[prost(uint64, tag = "6")]
            pub good_parts: u64,
        }

        #[derive(Clone, PartialEq, prost::Message)]
        pub struct EventRecord {
            #[prost(string, tag = "1")]
            pub path: String,
            #[prost(int64, tag = "2")]
            pub ts_us: i64,
            #[prost(string, tag = "3")]
            pub kind: String,
            #[prost(uint32, tag = "4")]
            pub severity: u32,
            #[prost(string, tag = "6")]
            pub message: String,
        }
    }

    #[test]
    fn an_older_writers_sensor_record_decodes_missing_fields_to_defaults() {
        let temp = def(TEMP);
        let spec = sensor_spec(&temp);
        // Written when the sensor had only its `high` alarm.
        let old = older::TwinRecord {
            path: TEMP.into(),
            restarts: 1,
            updated_us: 5_000_000,
            sensor: Some(older::SensorRecord {
                value_kind: 1,
                float_value: 42.5,
                quality_code: 0,
                source_ts_us: 4_000_000,
                alarms: vec![rec::AlarmRecord {
                    name: "high".into(),
                    state: u32::from(AlarmState::ActiveAcked.code()),
                    condition: true,
                    since_us: 3_000_000,
                    ..Default::default()
                }],
            }),
            machine: None,
        };
        let back = decoded(&temp, &old.encode_to_vec(), true);
        let expected = TwinSnapshot {
            restarts: 1,
            updated: Timestamp(5_000_000),
            state: TwinState::Sensor(SensorSnap {
                value: Some(Value::Float(42.5)),
                quality: Quality {
                    code: QualityCode::Good,
                    reason: QualityReason::None,
                },
                source_ts: Timestamp(4_000_000),
                alarms: vec![
                    AlarmStatus {
                        state: AlarmState::ActiveAcked,
                        condition: true,
                        since: Timestamp(3_000_000),
                        ..AlarmStatus::default()
                    },
                    AlarmStatus::default(),
                ],
                // No learned state: fresh detectors, nothing open.
                detector: crate::core::new_sensor_detector(&spec),
                ..SensorSnap::default()
            }),
        };
        assert_eq!(back, expected);
    }

    #[test]
    fn an_older_writers_machine_record_decodes_missing_fields_to_defaults() {
        let m1 = def(MACHINE);
        let old = older::TwinRecord {
            path: MACHINE.into(),
            machine: Some(older::MachineRecord {
                state: MachineState::Running.code() as u32,
                state_since_us: 7_000_000,
                good_parts: 99,
            }),
            ..Default::default()
        };
        let TwinState::Machine(m) = decoded(&m1, &old.encode_to_vec(), true).state else {
            panic!("a machine decodes as a machine");
        };
        let expected = MachineSnap {
            tracker: OeeTracker {
                state: MachineState::Running,
                state_since: Timestamp(7_000_000),
                good_parts: 99,
                ..OeeTracker::default()
            },
            detector: crate::core::new_machine_detector(&machine_spec(&m1)),
            ..MachineSnap::default()
        };
        assert_eq!(m, expected);
    }

    fn event(kind: EventKind, severity: Severity, episode: Option<EpisodeEdge>) -> Event {
        let mut e = Event::new(
            AssetPath::parse(TEMP).expect("path"),
            ts(1_700_000_000_000),
            kind,
            severity,
            format!("{} {}: «ünïcode» message", kind.as_str(), severity.index()),
        );
        e.alarm = "spike".into();
        e.episode = episode;
        e
    }

    #[test]
    fn events_of_every_kind_severity_and_episode_edge_round_trip() {
        let edges = [None, Some(EpisodeEdge::Start), Some(EpisodeEdge::End)];
        let mut seq = 0;
        for kind in EventKind::ALL {
            for severity in Severity::ALL {
                for episode in edges {
                    seq += 1;
                    let mut e = event(kind, severity, episode);
                    let back = decode_event(seq, &encode_event(&e)).expect("decodes");
                    e.seq = seq;
                    assert_eq!(back, e);
                }
            }
        }
    }

    #[test]
    fn an_older_writers_event_has_no_episode_edge() {
        let old = older::EventRecord {
            path: TEMP.into(),
            ts_us: 1_000,
            kind: "anomaly".into(),
            severity: 2,
            message: "anomaly started: level detector".into(),
        };
        let e = decode_event(9, &old.encode_to_vec()).expect("decodes");
        assert_eq!(
            (e.seq, e.kind, e.severity),
            (9, EventKind::Anomaly, Severity::Medium)
        );
        assert_eq!((e.episode, e.alarm.as_str()), (None, ""));
    }

    #[test]
    fn a_corrupt_event_record_is_an_error_saying_what_is_wrong() {
        let garbage = decode_event(1, &[0x0a, 0xff, 0x01]).expect_err("truncated field");
        assert!(garbage.contains("decode"), "{garbage}");
        let mut r = rec::EventRecord {
            path: TEMP.into(),
            kind: "gossip".into(),
            ..Default::default()
        };
        let kind = decode_event(1, &r.encode_to_vec()).expect_err("unknown kind");
        assert_eq!(kind, "unknown event kind \"gossip\"");
        r.kind = "alarm".into();
        r.path = "e/s/Not A Slug".into();
        let path = decode_event(1, &r.encode_to_vec()).expect_err("bad path");
        assert!(path.contains("\"Not A Slug\""), "{path}");
    }

    #[test]
    fn a_corrupt_history_chunk_is_an_error_saying_what_is_wrong() {
        let uneven = rec::HistoryChunk {
            first_ts_us: 0,
            ts_delta_us: vec![0, 1],
            values: vec![1.0],
            qualities: vec![0, 0],
        };
        let err = decode_chunk(&uneven.encode_to_vec()).expect_err("uneven");
        assert_eq!(err, "chunk has 2 timestamps, 1 values and 2 qualities");
        let overflowing = rec::HistoryChunk {
            first_ts_us: i64::MAX - 1,
            ts_delta_us: vec![0, 5],
            values: vec![1.0, 2.0],
            qualities: vec![0, 0],
        };
        let err = decode_chunk(&overflowing.encode_to_vec()).expect_err("overflow");
        assert!(err.starts_with("timestamp overflows after"), "{err}");
    }

    fn any_ts() -> impl Strategy<Value = Timestamp> {
        any::<i64>().prop_map(Timestamp)
    }

    fn not_nan() -> impl Strategy<Value = f64> {
        any::<f64>().prop_filter("NaN never equals itself", |v| !v.is_nan())
    }

    fn any_alarm() -> impl Strategy<Value = AlarmStatus> {
        (
            proptest::sample::select(AlarmState::ALL.to_vec()),
            any::<bool>(),
            proptest::option::of(any_ts()),
            proptest::option::of(any_ts()),
            any_ts(),
        )
            .prop_map(|(state, condition, pending_since, shelved_until, since)| {
                AlarmStatus {
                    state,
                    condition,
                    pending_since,
                    shelved_until,
                    since,
                }
            })
    }

    /// A published sensor snapshot of `temp` (two alarms), without learned state.
    fn any_sensor_snapshot() -> impl Strategy<Value = TwinSnapshot> {
        let value = prop_oneof![
            Just(None),
            not_nan().prop_map(|v| Some(Value::Float(v))),
            any::<i64>().prop_map(|v| Some(Value::Int(v))),
            any::<bool>().prop_map(|v| Some(Value::Bool(v))),
        ];
        let quality = (
            proptest::sample::select(vec![
                QualityCode::Good,
                QualityCode::Uncertain,
                QualityCode::Bad,
            ]),
            proptest::sample::select(vec![
                QualityReason::None,
                QualityReason::Stale,
                QualityReason::SensorFailure,
                QualityReason::CommFailure,
                QualityReason::OutOfRange,
                QualityReason::NoData,
                QualityReason::ConfigError,
            ]),
        )
            .prop_map(|(code, reason)| Quality { code, reason });
        let stats = (any::<u64>(), not_nan(), not_nan(), not_nan(), not_nan()).prop_map(
            |(count, mean, m2, min, max)| RunningStats {
                count,
                mean,
                m2,
                min,
                max,
            },
        );
        (
            (any::<u32>(), any_ts(), value, quality, any_ts(), any_ts()),
            (
                stats,
                proptest::collection::vec(any_alarm(), 2),
                any::<u64>(),
                proptest::option::of(-1e300f64..1e300),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(
                    (restarts, updated, value, quality, source_ts, server_ts),
                    (stats, alarms, rejected, anomaly_score, anomalous),
                )| TwinSnapshot {
                    restarts,
                    updated,
                    state: TwinState::Sensor(SensorSnap {
                        value,
                        quality,
                        source_ts,
                        server_ts,
                        stats,
                        alarms,
                        rejected,
                        anomaly_score,
                        anomalous,
                        detector: None,
                    }),
                },
            )
    }

    fn any_path() -> impl Strategy<Value = AssetPath> {
        proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,12}", 1..=6)
            .prop_map(|segments| AssetPath::parse(&segments.join("/")).expect("slugs"))
    }

    fn any_event() -> impl Strategy<Value = Event> {
        (
            any::<u64>(),
            any_path(),
            any_ts(),
            proptest::sample::select(EventKind::ALL.to_vec()),
            proptest::sample::select(Severity::ALL.to_vec()),
            any::<String>(),
            any::<String>(),
            proptest::sample::select(vec![None, Some(EpisodeEdge::Start), Some(EpisodeEdge::End)]),
        )
            .prop_map(
                |(seq, asset, ts, kind, severity, alarm, message, episode)| Event {
                    seq,
                    asset,
                    ts,
                    kind,
                    severity,
                    alarm,
                    message,
                    episode,
                },
            )
    }

    proptest! {
        #[test]
        fn any_sensor_snapshot_round_trips_through_its_record(snap in any_sensor_snapshot()) {
            // Without learned state, as replication sends it and a mirror restores it.
            let temp = def(TEMP);
            let bytes = encoded(&temp, snap.clone(), false).expect("sensors have records");
            prop_assert_eq!(decoded(&temp, &bytes, false), snap);
        }

        #[test]
        fn any_event_round_trips_through_its_record(e in any_event()) {
            prop_assert_eq!(decode_event(e.seq, &encode_event(&e)), Ok(e));
        }

        /// The decoders of what replication carries (a peer's bytes): any input is a
        /// value or an error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic_a_record_decoder(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            seq in any::<u64>(),
        ) {
            let _ = decode_event(seq, &bytes);
            let _ = decode_chunk(&bytes);
            if let Ok(r) = rec::TwinRecord::decode(bytes.as_slice()) {
                for d in plant() {
                    let _ = decode_snapshot(&d.kind, &r, true);
                    let _ = decode_snapshot(&d.kind, &r, false);
                }
            }
        }
    }
}
