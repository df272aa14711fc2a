//! What a twin is now, as readers, the store and replication see it: the snapshot each twin
//! publishes, and a point of a sensor's history. Plain data: no actor, no I/O.

use std::sync::Arc;

use ferrotwin_models::alarm::{AlarmStatus, LimitKind};
use ferrotwin_models::detect::machine::MachineDetector;
use ferrotwin_models::detect::sensor::SensorDetector;
use ferrotwin_models::oee::OeeTracker;
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::rule::RuleRun;
use ferrotwin_models::spec::{AssetKind, MachineType, SensorSpec};
use ferrotwin_models::stats::RunningStats;
use ferrotwin_models::{Quality, QualityCode, Timestamp, Value};

/// Latest state of a twin, as readers and the store see it. Static facts (path, type, spec)
/// live in the registry entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TwinSnapshot {
    pub restarts: u32,
    pub updated: Timestamp,
    pub state: TwinState,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TwinState {
    Sensor(SensorSnap),
    Machine(MachineSnap),
    Group(RollUp),
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SensorSnap {
    pub value: Option<Value>,
    pub quality: Quality,
    pub source_ts: Timestamp,
    pub server_ts: Timestamp,
    pub stats: RunningStats,
    /// Parallel to the sensor spec's `alarms`.
    pub alarms: Vec<AlarmStatus>,
    pub rejected: u64,
    /// Local inference: the latest anomaly score (`None` while detectors are off or warming
    /// up) and whether an anomaly episode is open.
    pub anomaly_score: Option<f64>,
    pub anomalous: bool,
    /// Learned state of the sensor's detectors (`None` when they are off): part of the
    /// snapshot so a restarted or restored twin goes on from what it learned.
    pub detector: Option<Box<SensorDetector>>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct MachineSnap {
    pub tracker: OeeTracker,
    /// Machine itself plus its sensors.
    pub rollup: RollUp,
    pub inference: MachineInference,
    /// Learned state of the machine's detectors (`None` when they are off).
    pub detector: Option<Box<MachineDetector>>,
    /// Each local action rule's state, in the machine's rule order (empty: no rules).
    pub rules: Vec<(Arc<str>, RuleRun)>,
}

/// What the machine's detectors and model publish (each `None` while off or learning).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct MachineInference {
    pub anomaly_score: Option<f64>,
    /// 0..=100.
    pub health: Option<f64>,
    /// Remaining useful life and its band, hours.
    pub rul_hours: Option<f64>,
    pub rul_low_hours: Option<f64>,
    pub rul_high_hours: Option<f64>,
    /// Output of the machine type's ONNX model.
    pub model_score: Option<f64>,
    /// An anomaly episode of the machine is open.
    pub anomalous: bool,
}

impl TwinSnapshot {
    /// State of a twin that has never run.
    pub fn initial(kind: &AssetKind) -> TwinSnapshot {
        let state = match kind {
            AssetKind::Sensor { spec, .. } => TwinState::Sensor(SensorSnap {
                quality: Quality::uncertain(ferrotwin_models::QualityReason::NoData),
                alarms: vec![AlarmStatus::default(); spec.alarms.len()],
                detector: new_sensor_detector(spec),
                ..SensorSnap::default()
            }),
            AssetKind::Machine { spec, .. } => TwinState::Machine(MachineSnap {
                detector: new_machine_detector(spec),
                ..MachineSnap::default()
            }),
            _ => TwinState::Group(RollUp::default()),
        };
        TwinSnapshot {
            restarts: 0,
            updated: Timestamp::ZERO,
            state,
        }
    }

    /// The roll-up this twin contributes to its parent.
    pub fn rollup(&self, kind: &AssetKind) -> RollUp {
        match &self.state {
            TwinState::Sensor(s) => {
                let mut r = RollUp {
                    sensors: 1,
                    worst_quality: s.quality.code,
                    anomalies: u32::from(s.anomalous),
                    ..RollUp::default()
                };
                if let AssetKind::Sensor { spec, .. } = kind {
                    for (a, limit) in s.alarms.iter().zip(&spec.alarms) {
                        if a.state.is_active() {
                            r.count_alarm(limit.severity);
                        }
                        if a.state.is_unacked() {
                            r.unacked_alarms += 1;
                        }
                    }
                }
                r
            }
            TwinState::Machine(m) => m.rollup,
            TwinState::Group(r) => *r,
        }
    }
}

/// A sensor's detectors as its spec sets them, fresh; `None` when they are off.
pub fn new_sensor_detector(spec: &SensorSpec) -> Option<Box<SensorDetector>> {
    spec.detect
        .enabled
        .then(|| Box::new(SensorDetector::new(&spec.detect)))
}

/// A machine's detectors as its type sets them, fresh (the health index measures each
/// sensor's way from its learned baseline to its high alarm limit); `None` when off.
pub fn new_machine_detector(spec: &MachineType) -> Option<Box<MachineDetector>> {
    if !spec.detect.enabled {
        return None;
    }
    let high_limits: Vec<Option<f64>> = spec
        .sensors
        .iter()
        .map(|s| {
            s.alarms
                .iter()
                .filter(|a| a.kind == LimitKind::High)
                .map(|a| a.limit)
                .reduce(f64::min)
        })
        .collect();
    Some(Box::new(MachineDetector::new(&spec.detect, &high_limits)))
}

/// One point of history.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistPoint {
    pub ts: Timestamp,
    pub value: f64,
    pub quality: QualityCode,
}
