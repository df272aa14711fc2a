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
pub mod rules;
pub mod select;
pub mod sensor;
pub mod supervise;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferrotwin_models::detect::AnomalyTransition;
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::spec::{AssetDef, AssetKind};
use ferrotwin_models::{AssetPath, EpisodeEdge, Event, EventKind, Level, Severity, Timestamp};
use ractor::{Actor, ActorCell, ActorRef, SpawnErr};

use crate::core::{Credits, Metrics, TwinError, TwinMsg, TwinSettings, TwinSnapshot, ask};
use crate::inference::OnnxModel;
use crate::registry::{Registry, TwinEntry};
use crate::store::Store;
use crate::watch::WatchHub;

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
    /// The shape of the tree: a live apply swaps it (read it with `plant()`).
    pub plant: RwLock<Arc<Plant>>,
    pub settings: TwinSettings,
    pub metrics: Arc<Metrics>,
    /// The router's in-flight budget (readings sent to twins and not yet handled).
    pub credits: Credits,
    /// Users' ONNX models by machine type (the types whose model loaded); a live apply
    /// swaps them with the plant.
    pub models: RwLock<Arc<HashMap<String, Arc<OnnxModel>>>>,
    /// Where machines' rule firings go (`None`: nothing here acts, e.g. an enterprise's
    /// mirrors).
    pub actions: Option<tokio::sync::mpsc::Sender<rules::ActionRequest>>,
}

impl TwinCtx {
    /// The plant's shape as it is now.
    pub fn plant(&self) -> Arc<Plant> {
        self.plant.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The model machines of `type_name` run, if it loaded.
    pub fn model(&self, type_name: &str) -> Option<Arc<OnnxModel>> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(type_name)
            .cloned()
    }

    /// A live apply's new shape and models: twins started from now on follow them.
    pub fn set_plant(&self, plant: Arc<Plant>, models: HashMap<String, Arc<OnnxModel>>) {
        *self.plant.write().unwrap_or_else(|p| p.into_inner()) = plant;
        *self.models.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(models);
    }

    /// A twin took `n` readings from its inbox: return them to the router's budget.
    pub fn handled(&self, n: usize) {
        self.credits.0.fetch_sub(n, Ordering::AcqRel);
        self.metrics
            .readings_applied
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Persists an event (assigning its seq) and streams it to watchers; returns its seq.
    /// Never drops it: waits for room in the store's queue instead.
    pub async fn emit(&self, mut event: Event) -> u64 {
        self.store.put_event(&mut event).await;
        self.metrics.count_event(event.kind);
        let seq = event.seq;
        self.hub.event(Arc::new(event));
        seq
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

/// The event of an anomaly episode's start or end (`alarm` names the detector, `episode` the
/// edge, by which the eval pairs them), at the source time of the reading or evaluation that
/// decided it. `contributors` (machines) names
/// the sensors that weigh most in the score.
pub fn anomaly_event(
    asset: &AssetPath,
    t: AnomalyTransition,
    at: Timestamp,
    contributors: &str,
) -> Event {
    let (detector, edge, severity, mut message) = match t {
        AnomalyTransition::Started { detector, score } => (
            detector,
            EpisodeEdge::Start,
            Severity::Medium,
            format!(
                "anomaly started: {} detector, score {score:.2}",
                detector.as_str()
            ),
        ),
        AnomalyTransition::Ended {
            detector,
            peak,
            since,
        } => {
            if crate::telemetry::tracing_on() {
                let time = |t: Timestamp| {
                    std::time::UNIX_EPOCH
                        + std::time::Duration::from_micros(u64::try_from(t.0).unwrap_or(0))
                };
                crate::telemetry::record_episode(
                    &opentelemetry::global::tracer("ferrotwin"),
                    &asset.to_string(),
                    detector.as_str(),
                    peak,
                    time(since),
                    time(at),
                );
            }
            (
                detector,
                EpisodeEdge::End,
                Severity::Info,
                format!(
                    "anomaly ended: {} detector, peak score {peak:.2}, lasted {:.0} s (since {since})",
                    detector.as_str(),
                    at.millis_since(since).max(0) as f64 / 1000.0
                ),
            )
        }
    };
    if !contributors.is_empty() {
        message.push_str("; contributors: ");
        message.push_str(contributors);
    }
    let mut ev = Event::new(asset.clone(), at, EventKind::Anomaly, severity, message);
    ev.alarm = detector.as_str().to_string();
    ev.episode = Some(edge);
    ev
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
        TwinMsg::CheckStale(_) => None,
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
