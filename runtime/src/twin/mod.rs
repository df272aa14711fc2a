//! Twin actors: one ractor actor per asset, linked parent → child so the supervision tree is
//! the ISA-95 tree.
//!
//! ractor's defaults work against us and are overridden here: an `Err` from `handle` stops
//! an actor, so bad input is counted and evented, never returned; the default supervisor
//! handling stops the parent when a child dies, so every parent restarts its failed children
//! (from the snapshot in the registry) within a budget and escalates past it.

pub mod group;
pub mod machine;
pub mod plant;
pub mod sensor;
pub mod supervise;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrotwin_models::alarm::AlarmStatus;
use ferrotwin_models::alarm::LimitKind;
use ferrotwin_models::detect::AnomalyTransition;
use ferrotwin_models::detect::machine::MachineDetector;
use ferrotwin_models::detect::sensor::SensorDetector;
use ferrotwin_models::oee::OeeTracker;
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::spec::{AssetDef, AssetKind, MachineType, SensorSpec};
use ferrotwin_models::stats::RunningStats;
use ferrotwin_models::{
    AssetId, AssetPath, Event, EventKind, Level, Quality, Severity, Timestamp, Value,
};
use ractor::{Actor, ActorCell, ActorRef, RpcReplyPort, SpawnErr};

use crate::metrics::Metrics;
use crate::registry::{Registry, TwinEntry};
use crate::router::Credits;
use crate::store::Store;
use crate::watch::WatchHub;

/// Wall clock in µs since the epoch: the runtime's `server_ts`.
pub fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp(i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

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

/// The plant's shape: children of each asset, for spawning and restarting subtrees.
#[derive(Default)]
pub struct Plant {
    children: HashMap<AssetPath, Vec<AssetDef>>,
    pub root: Option<AssetDef>,
}

impl Plant {
    pub fn new(assets: &[AssetDef]) -> Plant {
        let mut p = Plant::default();
        for a in assets {
            match a.path.parent() {
                Some(parent) => p.children.entry(parent).or_default().push(a.clone()),
                None => p.root = Some(a.clone()),
            }
        }
        p
    }

    pub fn children(&self, path: &AssetPath) -> &[AssetDef] {
        self.children.get(path).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// What every twin shares.
pub struct TwinCtx {
    pub registry: Arc<Registry>,
    pub store: Arc<Store>,
    pub hub: Arc<WatchHub>,
    pub plant: Arc<Plant>,
    pub settings: TwinSettings,
    pub metrics: Arc<Metrics>,
    /// The router's in-flight budget (readings sent to twins and not yet handled).
    pub credits: Credits,
    /// Users' ONNX models by machine type (the types whose model loaded).
    pub models: HashMap<String, Arc<crate::inference::OnnxModel>>,
}

impl TwinCtx {
    /// A twin took `n` readings from its inbox: return them to the router's budget.
    pub fn handled(&self, n: usize) {
        self.credits.0.fetch_sub(n, Ordering::AcqRel);
        self.metrics
            .readings_applied
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Persists an event (assigning its seq) and streams it to watchers. Never drops it:
    /// waits for room in the store's queue instead.
    pub async fn emit(&self, mut event: Event) {
        self.store.put_event(&mut event).await;
        self.metrics.count_event(event.kind);
        self.hub.event(Arc::new(event));
    }

    /// Publishes a new snapshot: registry (readers, store writer) and watchers.
    pub fn publish(&self, entry: &Arc<TwinEntry>, snapshot: TwinSnapshot) {
        let snapshot = Arc::new(snapshot);
        self.registry.publish(entry, snapshot.clone());
        self.hub.twin(entry.clone(), snapshot);
    }

    /// Tells `entry`'s parent that this child's roll-up changed.
    pub fn notify_parent(&self, entry: &TwinEntry, rollup: RollUp) {
        let Some(parent) = entry.path().parent() else {
            return;
        };
        if let Some(actor) = self.registry.by_path(&parent).and_then(|p| p.actor()) {
            // A parent that is gone (restarting) re-reads its children's snapshots on start.
            let _ = actor.cast(TwinMsg::ChildChanged {
                id: entry.id,
                rollup,
            });
        }
    }
}

/// Rejected readings become at most one event per twin per interval, carrying the count of
/// the ones in between: a PLC sending garbage at 100 Hz must not flood the event log.
#[derive(Debug, Default)]
pub struct RejectThrottle {
    unreported: u32,
    last_event: Timestamp,
}

impl RejectThrottle {
    /// Counts a rejection and says whether to raise an event now, with its message.
    pub fn note(
        &mut self,
        reason: &ferrotwin_models::RejectReason,
        now: Timestamp,
        interval_ms: i64,
    ) -> Option<String> {
        if self.last_event != Timestamp::ZERO && now.millis_since(self.last_event) < interval_ms {
            self.unreported += 1;
            return None;
        }
        let mut msg = format!("reading rejected: {reason}");
        if self.unreported > 0 {
            msg.push_str(&format!(
                " ({} more rejected since the last such event)",
                self.unreported
            ));
        }
        self.unreported = 0;
        self.last_event = now;
        Some(msg)
    }
}

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

/// The event of an anomaly episode's start or end (`alarm` names the detector; the message
/// starts with `eval::ANOMALY_STARTED` / `ANOMALY_ENDED`, which the eval pairs), at the
/// source time of the reading or evaluation that decided it. `contributors` (machines) names
/// the sensors that weigh most in the score.
pub fn anomaly_event(
    asset: &AssetPath,
    t: AnomalyTransition,
    at: Timestamp,
    contributors: &str,
) -> Event {
    let (detector, severity, mut message) = match t {
        AnomalyTransition::Started { detector, score } => (
            detector,
            Severity::Medium,
            format!(
                "{}: {} detector, score {score:.2}",
                crate::eval::ANOMALY_STARTED,
                detector.as_str()
            ),
        ),
        AnomalyTransition::Ended {
            detector,
            peak,
            since,
        } => (
            detector,
            Severity::Info,
            format!(
                "{}: {} detector, peak score {peak:.2}, lasted {:.0} s (since {since})",
                crate::eval::ANOMALY_ENDED,
                detector.as_str(),
                at.millis_since(since).max(0) as f64 / 1000.0
            ),
        ),
    };
    if !contributors.is_empty() {
        message.push_str("; contributors: ");
        message.push_str(contributors);
    }
    let mut ev = Event::new(asset.clone(), at, EventKind::Anomaly, severity, message);
    ev.alarm = detector.as_str().to_string();
    ev
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

/// Messages of every twin kind. One enum so the registry routes to any twin by id; each
/// actor handles the variants of its kind and counts the rest as misrouted.
pub enum TwinMsg {
    /// Readings wait in the twin's registry inbox: take and apply them.
    Drain,
    /// A child's roll-up changed.
    ChildChanged { id: AssetId, rollup: RollUp },
    /// Debounce timer: publish the roll-up to the parent now.
    PublishRollUp,
    /// Sweeper: no reading since the stale threshold.
    CheckStale(Timestamp),
    /// Machines: evaluate the detectors on the sample board, at this source time.
    Evaluate(Timestamp),
    Acknowledge {
        alarm: String,
        by: String,
        comment: String,
        reply: RpcReplyPort<Result<AlarmStatus, TwinError>>,
    },
    Shelve {
        alarm: String,
        until: Option<Timestamp>,
        by: String,
        reply: RpcReplyPort<Result<AlarmStatus, TwinError>>,
    },
    /// Write the history tail now (clean shutdown).
    FlushHistory(RpcReplyPort<()>),
    /// Enterprise role: the state of this twin's original at its site (replication).
    /// Sensors and machines take it as their own; roll-ups follow as usual.
    Mirror(Arc<TwinSnapshot>),
    /// Panic inside the handler, as a bug would (tests of supervision).
    Crash,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TwinError {
    #[error("{asset}: no alarm named {alarm:?} (alarms: {known})")]
    UnknownAlarm {
        asset: AssetPath,
        alarm: String,
        known: String,
    },
    #[error("{asset}: alarm {alarm:?}: {source}")]
    Ack {
        asset: AssetPath,
        alarm: String,
        source: ferrotwin_models::alarm::AckError,
    },
    #[error("{asset}: a {level} has no alarms")]
    NoAlarms {
        asset: AssetPath,
        level: &'static str,
    },
}

/// Arguments of every twin actor.
pub struct TwinArgs {
    pub ctx: Arc<TwinCtx>,
    pub entry: Arc<TwinEntry>,
    /// Set when this start is a restart after a crash: the failure text.
    pub restarted_after: Option<String>,
}

/// Answers the messages every parent twin (machine and above) treats alike: it has no
/// alarms of its own and no history. Gives back the messages that are its own business.
pub(crate) fn answer_as_parent(
    entry: &TwinEntry,
    msg: TwinMsg,
    alarms_at: &'static str,
) -> Option<TwinMsg> {
    match msg {
        TwinMsg::Acknowledge { reply, .. } | TwinMsg::Shelve { reply, .. } => {
            let _ = reply.send(Err(TwinError::NoAlarms {
                asset: entry.path().clone(),
                level: alarms_at,
            }));
            None
        }
        TwinMsg::FlushHistory(reply) => {
            let _ = reply.send(());
            None
        }
        TwinMsg::CheckStale(_) | TwinMsg::Mirror(_) => None,
        TwinMsg::Crash => panic!("{}: crash requested (test hook)", entry.path()),
        own => Some(own),
    }
}

/// Stop reason that marks a deliberate removal: the parent does not restart the child.
pub const STOP_REMOVED: &str = "removed";

/// Spawns the twin of `entry` (linked to `supervisor` when given) and records the actor in
/// the registry entry.
pub async fn spawn_twin(
    ctx: Arc<TwinCtx>,
    entry: Arc<TwinEntry>,
    supervisor: Option<ActorCell>,
    restarted_after: Option<String>,
) -> Result<ActorRef<TwinMsg>, SpawnErr> {
    let args = TwinArgs {
        ctx,
        entry: entry.clone(),
        restarted_after,
    };
    let actor = match (&entry.def.kind, supervisor) {
        (AssetKind::Sensor { .. }, Some(sup)) => {
            Actor::spawn_linked(None, sensor::SensorTwin, args, sup)
                .await?
                .0
        }
        (AssetKind::Sensor { .. }, None) => Actor::spawn(None, sensor::SensorTwin, args).await?.0,
        (AssetKind::Machine { .. }, Some(sup)) => {
            Actor::spawn_linked(None, machine::MachineTwin, args, sup)
                .await?
                .0
        }
        (AssetKind::Machine { .. }, None) => {
            Actor::spawn(None, machine::MachineTwin, args).await?.0
        }
        (_, Some(sup)) => {
            Actor::spawn_linked(None, group::GroupTwin, args, sup)
                .await?
                .0
        }
        (_, None) => Actor::spawn(None, group::GroupTwin, args).await?.0,
    };
    entry.set_actor(Some(actor.clone()));
    entry.kick(&actor);
    Ok(actor)
}

/// Asks every running twin of `level` to write its history tail, many at a time, and
/// returns once each answered (or `timeout` passed for it). The answer comes after the
/// twin handled everything queued before the question: also a barrier for its mailbox.
pub async fn flush_all(registry: &Registry, level: Level, timeout: Duration) {
    let actors: Vec<_> = registry
        .all()
        .into_iter()
        .filter(|e| e.level() == level)
        .filter_map(|e| e.actor())
        .collect();
    for chunk in actors.chunks(10_000) {
        let mut set = tokio::task::JoinSet::new();
        for a in chunk {
            let a = a.clone();
            set.spawn(async move { ask(&a, TwinMsg::FlushHistory, timeout).await });
        }
        while set.join_next().await.is_some() {}
    }
}

/// Asks a twin and waits at most `timeout` for the answer.
pub async fn ask<R: Send + 'static>(
    actor: &ActorRef<TwinMsg>,
    msg: impl FnOnce(RpcReplyPort<R>) -> TwinMsg,
    timeout: Duration,
) -> Option<R> {
    match actor.call(msg, Some(timeout)).await {
        Ok(ractor::rpc::CallResult::Success(r)) => Some(r),
        _ => None,
    }
}
