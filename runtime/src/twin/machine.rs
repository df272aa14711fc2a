//! Twin of one machine: state from its state signal, part counters → OEE, the roll-up of
//! its sensors (alarms, worst quality), debounced to its line.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrotwin_models::oee::MachineState;
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::spec::{AssetKind, MachineType};
use ferrotwin_models::{
    Accepts, Event, EventKind, Property, Reading, RejectReason, Severity, Timestamp, Value,
};
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::supervise::Children;
use ferrotwin_models::detect::{DetectorKind, EpisodeTracker, Hysteresis, Regime};

use super::rules::{ActionRequest, MachineRules, Trigger, rules_of};
use super::{RejectThrottle, TwinArgs, TwinCtx, anomaly_event};
use crate::core::{ActionDone, MachineSnap, TwinError, TwinMsg, TwinSnapshot, TwinState};
use crate::inference::{ModelWindow, OnnxModel};
use crate::registry::TwinEntry;
use ferrotwin_models::detect::AnomalyTransition;
use ferrotwin_models::rule::{RuleMode, Step};

pub struct MachineTwin;

/// The alarm a failed rule raises on its machine: `rule:NAME`.
pub const RULE_ALARM: &str = "rule:";

pub struct MachineTwinState {
    ctx: Arc<TwinCtx>,
    entry: Arc<TwinEntry>,
    spec: Arc<MachineType>,
    snap: MachineSnap,
    children: Children,
    restarts: u32,
    published: RollUp,
    publish_scheduled: bool,
    rejects: RejectThrottle,
    /// The sample board's values at an evaluation (allocated once).
    values: Vec<f64>,
    /// The machine type's ONNX model, when it has one that loaded.
    model: Option<MachineModel>,
    /// Its local action rules (`None`: it has none, or it is a mirror: mirrors never act).
    rules: Option<Box<MachineRules>>,
}

/// A machine twin's user model: the shared plan, this twin's window of its inputs, and the
/// episode of its score over the spec's threshold.
struct MachineModel {
    model: Arc<OnnxModel>,
    window: ModelWindow,
    /// Board index of each model input, in the spec's input order.
    inputs: Vec<usize>,
    row: Vec<f64>,
    hysteresis: Hysteresis,
    episode: EpisodeTracker,
    /// Scoring failures not yet logged (logged at most once a minute of source time).
    failures: u64,
    last_log: Timestamp,
}

impl MachineModel {
    fn new(spec: &MachineType, model: Arc<OnnxModel>) -> Option<MachineModel> {
        let ms = spec.model.as_ref()?;
        let inputs = ms
            .inputs
            .iter()
            .map(|name| spec.sensors.iter().position(|s| &s.name == name))
            .collect::<Option<Vec<_>>>()?;
        Some(MachineModel {
            window: ModelWindow::for_spec(ms),
            row: Vec::with_capacity(inputs.len()),
            inputs,
            model,
            hysteresis: Hysteresis {
                threshold: ms.threshold,
                release: ms.threshold * 0.8,
                on_delay_ms: 0,
                off_delay_ms: 30_000,
            },
            episode: EpisodeTracker::new(),
            failures: 0,
            last_log: Timestamp::ZERO,
        })
    }
}

/// Records a restart of a parent twin: counter, log, lifecycle event.
pub(super) async fn record_restart(ctx: &TwinCtx, entry: &TwinEntry, restarts: u32, why: &str) {
    ctx.metrics.restarts.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(asset = %entry.path(), error = %why, "twin restarted");
    ctx.emit(Event::new(
        entry.path().clone(),
        Timestamp::now(),
        EventKind::Lifecycle,
        Severity::Medium,
        format!("twin restarted after a crash (restart {restarts}): {why}"),
    ))
    .await;
}

impl Actor for MachineTwin {
    type Msg = TwinMsg;
    type State = MachineTwinState;
    type Arguments = TwinArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TwinMsg>,
        args: TwinArgs,
    ) -> Result<MachineTwinState, ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            let TwinArgs {
                ctx,
                entry,
                restarted_after,
            } = args;
            let AssetKind::Machine { spec, .. } = &entry.def.kind else {
                return Err(format!("{}: not a machine", entry.path()).into());
            };
            let spec = spec.clone();
            let base = entry.snapshot();
            let snap = match &base.state {
                TwinState::Machine(m) => m.clone(),
                _ => MachineSnap::default(),
            };
            if let (Some(board), Some(_)) = (&entry.board, snap.tracker.last_ts) {
                let clock = crate::core::ClockRules::of(&ctx.settings);
                board.note_state(
                    snap.tracker.state.code(),
                    snap.tracker.state_since,
                    Timestamp::now(),
                    clock,
                );
            }
            let mut restarts = base.restarts;
            if let Some(why) = restarted_after {
                restarts += 1;
                record_restart(&ctx, &entry, restarts, &why).await;
            }
            let children = Children::spawn_all(&ctx, &myself, entry.path()).await?;
            let mut state = MachineTwinState {
                ctx,
                entry,
                spec,
                snap,
                children,
                restarts,
                published: RollUp::default(),
                publish_scheduled: false,
                rejects: RejectThrottle::default(),
                values: Vec::new(),
                model: None,
                rules: None,
            };
            if let Some(m) = state.ctx.model(state.entry.def.kind.type_name()) {
                state.model = MachineModel::new(&state.spec, m);
            }
            state.load_rules();
            state.publish(Timestamp::now(), true);
            state.run_rules(&myself).await;
            Ok(state)
        })
        .await
    }

    async fn handle(
        &self,
        myself: ActorRef<TwinMsg>,
        msg: TwinMsg,
        state: &mut MachineTwinState,
    ) -> Result<(), ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            // A failed rule's alarm (`rule:NAME`) is the machine's own.
            let msg = match msg {
                TwinMsg::Acknowledge {
                    alarm, by, reply, ..
                } if alarm.starts_with(RULE_ALARM) => {
                    let r = state.acknowledge_rule(&alarm, &by).await;
                    let _ = reply.send(r);
                    return Ok(());
                }
                other => other,
            };
            let Some(msg) = super::answer_as_parent(
                &state.entry,
                msg,
                "machine (acknowledge the sensor's alarm)",
            ) else {
                return Ok(());
            };
            match msg {
                TwinMsg::Drain => {
                    let readings = state.entry.take_inbox();
                    state.ctx.handled(readings.len());
                    for r in &readings {
                        state.apply(r).await;
                    }
                    state.publish(Timestamp::now(), false);
                    state.schedule(&myself);
                    state.run_rules(&myself).await;
                }
                TwinMsg::SensorAlarm(a) => {
                    if let Some(rules) = state.rules.as_mut() {
                        if a.acknowledged {
                            rules.acknowledged(&a.sensor, &a.alarm, &mut state.snap.rules);
                        }
                        rules.note_alarm(&a);
                        state.run_rules(&myself).await;
                        state.publish(Timestamp::now(), false);
                    }
                }
                TwinMsg::RuleTick => {
                    if let Some(rules) = state.rules.as_mut() {
                        rules.wake = None;
                        state.run_rules(&myself).await;
                        state.publish(Timestamp::now(), false);
                    }
                }
                TwinMsg::ActionDone(done) => {
                    state.action_done(&myself, *done).await;
                    state.run_rules(&myself).await;
                    state.publish(Timestamp::now(), true);
                }
                TwinMsg::SetRuleMode { rule, mode, reply } => {
                    let r = state.set_rule_mode(&rule, mode);
                    let _ = reply.send(r);
                    state.run_rules(&myself).await;
                    state.publish(Timestamp::now(), true);
                }
                TwinMsg::ChildChanged { id, rollup } => {
                    let changed = state.children.set(id, rollup);
                    if changed {
                        state.schedule(&myself);
                    }
                }
                TwinMsg::Rebind(reply) => {
                    let r = state.rebind(&myself).await;
                    let _ = reply.send(r);
                }
                TwinMsg::Adopt { path, reply } => {
                    let r = state.children.adopt_path(&state.ctx, &myself, &path).await;
                    state.schedule(&myself);
                    let _ = reply.send(r);
                }
                TwinMsg::PublishRollUp => {
                    state.publish_scheduled = false;
                    state.publish(Timestamp::now(), true);
                    if state.rules.as_ref().is_some_and(|r| r.has_query()) {
                        state.run_rules(&myself).await;
                    }
                }
                TwinMsg::Evaluate(at) => {
                    state.evaluate(at).await;
                    state.publish(Timestamp::now(), false);
                    state.schedule(&myself);
                    if let Some(rules) = state.rules.as_mut() {
                        if rules.trigger.at < at {
                            rules.trigger = Trigger { seq: 0, at };
                        }
                        state.run_rules(&myself).await;
                    }
                }
                TwinMsg::Mirror(snap) => {
                    // The site's machine as it published it (an enterprise's mirror): state,
                    // counts, OEE and inference; its line's roll-up follows.
                    if let TwinState::Machine(m) = &snap.state {
                        state.snap = m.clone();
                        state.restarts = snap.restarts;
                        state.publish(snap.updated, true);
                        state.schedule(&myself);
                    }
                }
                _ => {}
            }
            Ok(())
        })
        .await
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<TwinMsg>,
        evt: SupervisionEvent,
        state: &mut MachineTwinState,
    ) -> Result<(), ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            let ctx = state.ctx.clone();
            let path = state.entry.path().clone();
            if state
                .children
                .on_supervision(&ctx, &myself, &path, evt)
                .await?
            {
                state.schedule(&myself);
            }
            Ok(())
        })
        .await
    }
}

impl MachineTwinState {
    async fn reject(&mut self, reason: RejectReason) {
        self.ctx.metrics.count_reject(reason.label());
        let at = Timestamp::now();
        let Some(msg) = self
            .rejects
            .note(&reason, at, self.ctx.settings.reject_event_interval_ms)
        else {
            return;
        };
        tracing::warn!(asset = %self.entry.path(), reason = reason.label(), "machine reading rejected");
        self.ctx
            .emit(Event::new(
                self.entry.path().clone(),
                at,
                EventKind::Rejected,
                Severity::Low,
                msg,
            ))
            .await;
    }

    async fn apply(&mut self, r: &Reading) {
        let now = Timestamp::now();
        let max_skew_ms = self.ctx.settings.max_future_skew_ms;
        if let Err(reason) = r.check(self.entry.path(), Accepts::Machine, now, max_skew_ms) {
            return self.reject(reason).await;
        }
        match r.property {
            Property::State => {
                // A state is what the type's `state_map` (or the default codes, a bool) says
                // the PLC's value means.
                let Some(new) = self
                    .spec
                    .state_code(r.value)
                    .and_then(MachineState::from_code)
                else {
                    let (got, declared) = if self.spec.state_map.is_empty() {
                        ("unknown state code", "state code 0..=3 or a bool")
                    } else {
                        (
                            "a value the type's state_map does not list",
                            "a state_map key",
                        )
                    };
                    return self
                        .reject(RejectReason::WrongType {
                            asset: self.entry.path().clone(),
                            property: r.property,
                            got,
                            declared,
                        })
                        .await;
                };
                let t = &mut self.snap.tracker;
                let old = t.state;
                if t.on_state(new, r.source_ts) {
                    let severity = if new == MachineState::Down {
                        Severity::Medium
                    } else {
                        Severity::Info
                    };
                    let seq = self
                        .ctx
                        .emit(Event::new(
                            self.entry.path().clone(),
                            r.source_ts,
                            EventKind::State,
                            severity,
                            format!("machine {} -> {}", old.as_str(), new.as_str()),
                        ))
                        .await;
                    if let Some(rules) = self.rules.as_mut() {
                        rules.trigger = Trigger {
                            seq,
                            at: r.source_ts,
                        };
                    }
                }
            }
            Property::GoodCount | Property::ScrapCount => {
                // `Reading::check` let through only integer counts >= 0.
                let Value::Int(int) = r.value else {
                    return;
                };
                let Ok(count) = u64::try_from(int) else {
                    return;
                };
                let t = &mut self.snap.tracker;
                if r.property == Property::GoodCount {
                    t.on_good_counter(count, r.source_ts);
                } else {
                    t.on_scrap_counter(count, r.source_ts);
                }
            }
            Property::Value => {}
        }
    }

    /// Runs the machine's detectors on its sensors' latest values (from the sample board) at
    /// source time `at`, in its current state; publishes score, health and RUL, and raises
    /// an event at an episode's start or end naming the sensors that weigh most.
    async fn evaluate(&mut self, at: Timestamp) {
        let Some(board) = &self.entry.board else {
            return;
        };
        board.read(&mut self.values);
        self.run_model(at).await;
        let Some(det) = self.snap.detector.as_mut() else {
            return;
        };
        // The board's state, not the tracker's: the router notes states before delivering,
        // so it holds the state at `at` even while this twin's inbox waits.
        let regime = Regime(
            self.entry
                .board
                .as_ref()
                .map_or(u8::MAX, |b| b.regime_at(at)),
        );
        let v = det.update(&self.spec.detect, at, &self.values, regime);
        let inf = &mut self.snap.inference;
        inf.anomaly_score = Some(v.score);
        inf.health = v.health;
        inf.rul_hours = v.rul.map(|r| r.hours);
        inf.rul_low_hours = v.rul.map(|r| r.low_hours);
        inf.rul_high_hours = v.rul.map(|r| r.high_hours);
        // Multivariate and health episodes may be open at once: anomalous while either is,
        // as the detector (restored with the twin) knows.
        inf.anomalous = det.anomalous();
        let Some(transition) = v.transition else {
            return;
        };
        let contributors = v
            .contributors
            .iter()
            .flatten()
            .filter_map(|(i, share)| {
                let s = self.spec.sensors.get(usize::from(*i))?;
                Some(format!("{} {:.0}%", s.name, share * 100.0))
            })
            .collect::<Vec<_>>()
            .join(", ");
        let ev = anomaly_event(self.entry.path(), transition, at, &contributors);
        let seq = self.ctx.emit(ev).await;
        self.note_anomaly(transition, seq, at);
    }

    /// An anomaly episode of the machine's own opened or closed: what anomaly rules watch.
    fn note_anomaly(&mut self, t: AnomalyTransition, seq: u64, at: Timestamp) {
        if let Some(rules) = self.rules.as_mut() {
            let (detector, open) = match t {
                AnomalyTransition::Started { detector, .. } => (detector, true),
                AnomalyTransition::Ended { detector, .. } => (detector, false),
            };
            rules.note_anomaly(detector, open, Trigger { seq, at });
        }
    }

    /// Feeds the user model this evaluation's inputs (NaN for a missing one empties its
    /// window) and publishes its score when a window is due; a score over the spec's
    /// threshold opens a `model` anomaly episode. A failing model is logged, never fatal.
    async fn run_model(&mut self, at: Timestamp) {
        let Some(m) = self.model.as_mut() else {
            return;
        };
        m.row.clear();
        m.row.extend(
            m.inputs
                .iter()
                .map(|&i| self.values.get(i).copied().unwrap_or(f64::NAN)),
        );
        if !m.window.push(&m.row) {
            return;
        }
        match m.model.score(&m.window) {
            Ok(score) => {
                self.snap.inference.model_score = Some(score);
                if let Some(t) = m
                    .episode
                    .update(&m.hysteresis, at, score, DetectorKind::Model)
                {
                    let ev = anomaly_event(self.entry.path(), t, at, "");
                    let seq = self.ctx.emit(ev).await;
                    self.note_anomaly(t, seq, at);
                }
            }
            Err(e) => {
                m.failures += 1;
                if at.millis_since(m.last_log) >= 60_000 {
                    tracing::warn!(asset = %self.entry.path(), error = %e, failures = m.failures, "machine model failed");
                    m.failures = 0;
                    m.last_log = at;
                }
            }
        }
    }

    /// A live apply replaced this machine's entry: apply what the old inbox holds, fit the
    /// state to the new settings (as a restart would: counters and OEE kept, the detector
    /// only for the same sensors), take the new entry, its settings and model. The sensors
    /// keep running; each finds the new sample board at its next reading.
    async fn rebind(&mut self, myself: &ActorRef<TwinMsg>) -> Result<(), String> {
        let Some(next) = self.ctx.registry.by_path(self.entry.path()) else {
            return Err(format!("{}: removed, not rebound", self.entry.path()));
        };
        if Arc::ptr_eq(&next, &self.entry) {
            return Ok(());
        }
        let AssetKind::Machine { spec, .. } = &next.def.kind else {
            return Err(format!("{}: no longer a machine", next.path()));
        };
        let readings = self.entry.take_inbox();
        self.ctx.handled(readings.len());
        for r in &readings {
            self.apply(r).await;
        }
        self.publish(Timestamp::now(), false);
        let learn = !self.ctx.registry.is_mirrors_only();
        if let Some(record) = crate::store::codec::snapshot_record(&self.entry, true)
            && let TwinState::Machine(m) =
                crate::store::codec::decode_snapshot(&next.def.kind, &record, learn).state
        {
            // The rules' states are not in the record: kept by name (`load_rules`).
            let rules = std::mem::take(&mut self.snap.rules);
            self.snap = m;
            self.snap.rules = rules;
        }
        let names = |t: &MachineType| t.sensors.iter().map(|s| s.name.clone()).collect::<Vec<_>>();
        let same_model = self.spec.model == spec.model
            && names(&self.spec) == names(spec)
            && self.entry.def.kind.type_name() == next.def.kind.type_name();
        self.spec = spec.clone();
        if !same_model {
            // A new model, or its inputs moved: a fresh window (an episode in progress
            // ends with the old model).
            self.model = self
                .ctx
                .model(next.def.kind.type_name())
                .and_then(|m| MachineModel::new(&self.spec, m));
        }
        // The new board took over the old one's values and state log (`apply`).
        self.values.clear();
        self.entry.set_actor(None);
        self.entry = next;
        self.entry.set_actor(Some(myself.clone()));
        self.children.refresh(&self.ctx);
        self.load_rules();
        self.publish(Timestamp::now(), true);
        self.run_rules(myself).await;
        self.entry.kick(myself);
        Ok(())
    }

    fn schedule(&mut self, myself: &ActorRef<TwinMsg>) {
        if !self.publish_scheduled {
            self.publish_scheduled = true;
            let debounce = Duration::from_millis(self.ctx.settings.rollup_debounce_ms);
            myself.send_after(debounce, || TwinMsg::PublishRollUp);
        }
    }

    /// The machine's own contribution plus its sensors'.
    fn rollup(&self, at: Timestamp) -> RollUp {
        let mut t = self.snap.tracker;
        t.advance(at);
        let mut own = RollUp {
            machines: 1,
            running: u32::from(t.state == MachineState::Running),
            worst_health: self.snap.inference.health,
            anomalies: u32::from(self.snap.inference.anomalous),
            ..RollUp::default()
        };
        // A rule whose action failed is an alarm of the machine's own until acknowledged.
        let failed = self.snap.rules.iter().filter(|(_, r)| r.failed).count() as u32;
        own.alarms_by_severity[Severity::High.index()] += failed;
        own.unacked_alarms += failed;
        let accounted_ms: u64 = t.time_in_state_ms.iter().sum();
        if accounted_ms > 0 {
            own.throughput_per_h = t.good_parts as f64 / (accounted_ms as f64 / 3_600_000.0);
            let planned = accounted_ms - t.time_in_state_ms[MachineState::Idle.code() as usize];
            if planned > 0 {
                own.oee_sum = t.oee(self.spec.ideal_cycle_ms).oee;
                own.oee_count = 1;
            }
        }
        own.merge(&self.children.rollup());
        own
    }

    fn publish(&mut self, at: Timestamp, to_parent: bool) {
        self.snap.rollup = self.rollup(at);
        self.ctx.publish(
            &self.entry,
            TwinSnapshot {
                restarts: self.restarts,
                updated: at,
                state: TwinState::Machine(self.snap.clone()),
            },
        );
        if to_parent && self.snap.rollup != self.published {
            self.published = self.snap.rollup;
            self.ctx.notify_parent(&self.entry, self.snap.rollup);
        }
    }
}

/// The rules.
impl MachineTwinState {
    /// Takes the machine's rules (its type's, line's, area's) anew, keeping each one's state
    /// by name. Mirrors run none: an enterprise never acts on a site's line.
    fn load_rules(&mut self) {
        let specs = rules_of(&self.ctx.registry, self.entry.path(), &self.spec.rules);
        let mirror = self.ctx.registry.is_mirrors_only() || self.ctx.actions.is_none();
        let rules = (!specs.is_empty() && !mirror)
            .then(|| MachineRules::new(specs, &self.entry, &self.ctx.registry));
        let (store, path) = (&self.ctx.store, self.entry.path());
        self.snap.rules = rules.as_ref().map_or_else(Vec::new, |r| {
            r.runs(&self.snap.rules, |s| store.rule_mode(path, &s.name, s.mode))
        });
        if let Some(board) = &self.entry.board {
            board.watches_alarms.store(
                rules.as_ref().is_some_and(|r| r.watches_alarms),
                Ordering::Relaxed,
            );
        }
        self.rules = rules.map(Box::new);
    }

    /// Steps every rule on the machine as it is now; fires the ones due, sets the next
    /// timer.
    async fn run_rules(&mut self, myself: &ActorRef<TwinMsg>) {
        let Some(rules) = self.rules.as_deref() else {
            return;
        };
        let now = Timestamp::now();
        let state = self.snap.tracker.state;
        let entry = self.entry.clone();
        let published = || entry.snapshot();
        let mut wake: Option<Timestamp> = None;
        let mut fire = Vec::new();
        let mut limited = Vec::new();
        for i in 0..rules.specs.len() {
            let spec = &rules.specs[i];
            let holds = rules.holds(i, &self.snap, &entry, &published, &self.ctx.registry);
            let allowed = spec.only_in_states.is_empty() || spec.only_in_states.contains(&state);
            let run = &mut self.snap.rules[i].1;
            match run.step(spec, holds, allowed, now) {
                Step::Nothing => {}
                Step::WakeAt(t) => wake = Some(wake.map_or(t, |w| w.min(t))),
                Step::Limited { until } => {
                    wake = Some(wake.map_or(until, |w| w.min(until)));
                    limited.push(i);
                }
                Step::Fire => fire.push(i),
            }
        }
        for i in limited {
            let spec = &rules.specs[i];
            let m = spec.max_firings.expect("limited only with max_firings");
            let ev = Event::new(
                self.entry.path().clone(),
                now,
                EventKind::Action,
                Severity::Medium,
                format!(
                    "rule {} held back: it fired {} times in {} ms (max_firings); {} not done",
                    spec.name,
                    m.count,
                    m.window_ms,
                    spec.describe_action()
                ),
            );
            self.ctx.emit(rule_event(ev, &spec.name)).await;
        }
        for i in fire {
            self.fire(i, now).await;
        }
        let rules = self.rules.as_deref_mut().expect("checked above");
        if let Some(t) = wake
            && rules.wake.is_none_or(|w| t < w || w <= now)
        {
            rules.wake = Some(t);
            let ms = t.millis_since(now).max(1) as u64;
            myself.send_after(Duration::from_millis(ms), || TwinMsg::RuleTick);
        }
    }

    /// Hands rule `i`'s firing to the executor; a full queue (or none) fails it at once.
    async fn fire(&mut self, i: usize, now: Timestamp) {
        let Some(rules) = self.rules.as_deref() else {
            return;
        };
        let spec = &rules.specs[i];
        let run = &self.snap.rules[i].1;
        let req = ActionRequest {
            machine: self.entry.path().clone(),
            rule: self.snap.rules[i].0.clone(),
            write: spec.then.write.clone(),
            event: spec.then.event.clone(),
            dry_run: run.mode == RuleMode::DryRun,
            trigger_seq: rules.trigger.seq,
            trigger: rules.describe(i),
            reading_ts: if rules.trigger.at == Timestamp::ZERO {
                now
            } else {
                rules.trigger.at
            },
            fired: std::time::Instant::now(),
        };
        let refused = match &self.ctx.actions {
            Some(q) => match q.try_send(req) {
                Ok(()) => return,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => format!(
                    "not carried out: the action queue is full ({} waiting)",
                    super::rules::ACTION_QUEUE
                ),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                    "not carried out: the runtime is stopping".to_string()
                }
            },
            None => "not carried out: nothing here acts".to_string(),
        };
        let name = spec.name.clone();
        let ev = Event::new(
            self.entry.path().clone(),
            now,
            EventKind::Action,
            Severity::High,
            format!("rule {name} fired ({}): {refused}", rules.describe(i)),
        );
        self.ctx.emit(rule_event(ev, &name)).await;
        let done = ActionDone {
            rule: name,
            ok: false,
            result: refused,
        };
        self.record_done(done, now).await;
    }

    /// The executor's answer: the rule latches or cools down; a failed action raises the
    /// rule's alarm on the machine.
    async fn action_done(&mut self, myself: &ActorRef<TwinMsg>, done: ActionDone) {
        let now = Timestamp::now();
        if let Some(t) = self.record_done(done, now).await
            && let Some(rules) = self.rules.as_deref_mut()
            && rules.wake.is_none_or(|w| t < w || w <= now)
        {
            rules.wake = Some(t);
            let ms = t.millis_since(now).max(1) as u64;
            myself.send_after(Duration::from_millis(ms), || TwinMsg::RuleTick);
        }
    }

    /// Records an action's end on its rule; the time to look again, if any.
    async fn record_done(&mut self, done: ActionDone, now: Timestamp) -> Option<Timestamp> {
        let rules = self.rules.as_deref()?;
        let i = rules.specs.iter().position(|s| s.name == done.rule)?;
        let was_failed = self.snap.rules[i].1.failed;
        let step = self.snap.rules[i]
            .1
            .done(&rules.specs[i], done.ok, done.result.clone(), now);
        if !done.ok && !was_failed {
            let ev = Event::new(
                self.entry.path().clone(),
                now,
                EventKind::Alarm,
                Severity::High,
                format!(
                    "alarm \"{RULE_ALARM}{}\" raised: the rule's action failed: {}",
                    done.rule, done.result
                ),
            );
            let mut ev = ev;
            ev.alarm = format!("{RULE_ALARM}{}", done.rule);
            self.ctx.emit(ev).await;
        }
        match step {
            Step::WakeAt(t) => Some(t),
            _ => None,
        }
    }

    fn set_rule_mode(&mut self, rule: &str, mode: RuleMode) -> Result<RuleMode, TwinError> {
        let Some((_, run)) = self.snap.rules.iter_mut().find(|(n, _)| **n == *rule) else {
            return Err(TwinError::UnknownRule {
                asset: self.entry.path().clone(),
                rule: rule.to_string(),
                known: super::rules::names(&self.snap.rules),
            });
        };
        let old = run.mode;
        run.set_mode(mode);
        Ok(old)
    }

    /// An operator acknowledged a failed rule's alarm: it clears.
    async fn acknowledge_rule(
        &mut self,
        alarm: &str,
        by: &str,
    ) -> Result<ferrotwin_models::alarm::AlarmStatus, TwinError> {
        let name = &alarm[RULE_ALARM.len()..];
        let Some((_, run)) = self.snap.rules.iter_mut().find(|(n, _)| **n == *name) else {
            return Err(TwinError::UnknownAlarm {
                asset: self.entry.path().clone(),
                alarm: alarm.to_string(),
                known: self
                    .snap
                    .rules
                    .iter()
                    .filter(|(_, r)| r.failed)
                    .map(|(n, _)| format!("{RULE_ALARM}{n}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        };
        let was = run.failed;
        run.failed = false;
        let at = Timestamp::now();
        if was {
            let mut ev = Event::new(
                self.entry.path().clone(),
                at,
                EventKind::Alarm,
                Severity::Info,
                format!("alarm {alarm:?} acknowledged by {by}"),
            );
            ev.alarm = alarm.to_string();
            self.ctx.emit(ev).await;
            self.publish(at, true);
        }
        Ok(ferrotwin_models::alarm::AlarmStatus::default())
    }
}

/// An event about rule `name` (its `alarm` field names the rule).
fn rule_event(mut ev: Event, name: &str) -> Event {
    ev.alarm = name.to_string();
    ev
}
