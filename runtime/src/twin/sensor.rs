//! Live twin of one sensor: value, quality, timestamps, running stats, limit alarms,
//! staleness and the history tail not yet written as a chunk.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use ferrotwin_models::alarm::{AlarmLimit, AlarmTransition, LimitKind};
use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::spec::{AssetKind, SensorSpec};
use ferrotwin_models::{
    Accepts, Event, EventKind, Property, Quality, QualityCode, QualityReason, Reading,
    RejectReason, Severity, Timestamp,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};

use ferrotwin_models::detect::Regime;

use super::{RejectThrottle, TwinArgs, TwinCtx, anomaly_event};
use crate::core::HistPoint;
use crate::core::{SensorAlarm, SensorSnap, TwinError, TwinMsg, TwinSnapshot, TwinState};
use crate::registry::TwinEntry;

pub struct SensorTwin;

pub struct SensorState {
    ctx: Arc<TwinCtx>,
    entry: Arc<TwinEntry>,
    spec: Arc<SensorSpec>,
    snap: SensorSnap,
    restarts: u32,
    last_rollup: RollUp,
    rejects: RejectThrottle,
    /// The machine's entry (its sample board) and this sensor's index on it.
    machine: Option<(Arc<TwinEntry>, usize)>,
}

impl Actor for SensorTwin {
    type Msg = TwinMsg;
    type State = SensorState;
    type Arguments = TwinArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<TwinMsg>,
        args: TwinArgs,
    ) -> Result<SensorState, ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            let TwinArgs {
                ctx,
                entry,
                restarted_after,
            } = args;
            let AssetKind::Sensor { spec, .. } = &entry.def.kind else {
                return Err(format!("{}: not a sensor", entry.path()).into());
            };
            let spec = spec.clone();
            let base = entry.snapshot();
            let (snap, restarts) = match &base.state {
                TwinState::Sensor(s) => (s.clone(), base.restarts),
                _ => (SensorSnap::default(), 0),
            };
            let machine = machine_board(&ctx, &entry);
            let mut state = SensorState {
                machine,
                last_rollup: base.rollup(&entry.def.kind),
                ctx,
                entry,
                spec,
                snap,
                restarts,
                rejects: RejectThrottle::default(),
            };
            if let Some(why) = restarted_after {
                state.restarts += 1;
                state.ctx.metrics.restarts.fetch_add(1, Ordering::Relaxed);
                let msg = format!(
                    "twin restarted after a crash (restart {}): {why}",
                    state.restarts
                );
                tracing::warn!(asset = %state.entry.path(), error = %why, "sensor twin restarted");
                state
                    .ctx
                    .emit(Event::new(
                        state.entry.path().clone(),
                        Timestamp::now(),
                        EventKind::Lifecycle,
                        Severity::Medium,
                        msg,
                    ))
                    .await;
                state.publish(Timestamp::now());
            }
            Ok(state)
        })
        .await
    }

    async fn handle(
        &self,
        _myself: ActorRef<TwinMsg>,
        msg: TwinMsg,
        state: &mut SensorState,
    ) -> Result<(), ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            match msg {
                TwinMsg::Drain => {
                    let readings = state.entry.take_inbox();
                    // The readings left the bounded inbox: return their credits now, so a
                    // panic while applying them cannot leak the router's budget.
                    state.ctx.handled(readings.len());
                    state.apply(&readings).await;
                }
                TwinMsg::CheckStale(at) => state.check_stale(at).await,
                TwinMsg::Mirror(snap) => {
                    if let TwinState::Sensor(s) = &snap.state {
                        state.snap = s.clone();
                        state.restarts = snap.restarts;
                        state.publish(snap.updated);
                    }
                }
                TwinMsg::Acknowledge {
                    alarm,
                    by,
                    comment,
                    reply,
                } => {
                    let r = state.acknowledge(&alarm, &by, &comment).await;
                    let _ = reply.send(r);
                }
                TwinMsg::Shelve {
                    alarm,
                    until,
                    by,
                    reply,
                } => {
                    let r = state.shelve(&alarm, until, &by).await;
                    let _ = reply.send(r);
                }
                TwinMsg::FlushHistory(reply) => {
                    state.flush_tail().await;
                    let _ = reply.send(());
                }
                TwinMsg::Crash => panic!("{}: crash requested (test hook)", state.entry.path()),
                TwinMsg::Rebind(reply) => {
                    let _ = reply.send(Err(format!(
                        "{}: a changed sensor restarts, it is not rebound",
                        state.entry.path()
                    )));
                }
                TwinMsg::Adopt { path, reply } => {
                    let _ = reply.send(Err(format!(
                        "{}: a sensor has no children (asked to adopt {path})",
                        state.entry.path()
                    )));
                }
                TwinMsg::SetRuleMode { rule, reply, .. } => {
                    let _ = reply.send(Err(TwinError::UnknownRule {
                        asset: state.entry.path().clone(),
                        rule,
                        known: "none: rules run on machines".into(),
                    }));
                }
                TwinMsg::ChildChanged { .. }
                | TwinMsg::PublishRollUp
                | TwinMsg::Evaluate(_)
                | TwinMsg::SensorAlarm(_)
                | TwinMsg::RuleTick
                | TwinMsg::ActionDone(_) => {
                    tracing::warn!(asset = %state.entry.path(), "sensor twin got a parent-only message");
                }
            }
            Ok(())
        })
        .await
    }
}

impl SensorState {
    fn check(&self, r: &Reading, now: Timestamp) -> Result<(), RejectReason> {
        r.check(
            self.entry.path(),
            Accepts::Sensor(self.spec.value_type),
            now,
            self.ctx.settings.max_future_skew_ms,
        )
    }

    async fn apply(&mut self, readings: &[Reading]) {
        let now = Timestamp::now();
        let mut touched = false;
        let rejected_before = self.snap.rejected;
        // Points of this drain, appended to the entry's tail in one lock below.
        let mut tail: Vec<HistPoint> = Vec::with_capacity(readings.len());
        for r in readings {
            if let Err(reason) = self.check(r, now) {
                self.reject(reason, now).await;
                continue;
            }
            let v = r.value.as_f64();
            let mut quality = r.quality;
            let out_of_range =
                self.spec.min.is_some_and(|lo| v < lo) || self.spec.max.is_some_and(|hi| v > hi);
            if out_of_range && quality.is_good() {
                quality = Quality::uncertain(QualityReason::OutOfRange);
            }
            tail.push(HistPoint {
                ts: r.source_ts,
                value: v,
                quality: quality.code,
            });
            // The live value is the link-loss marker (Bad, CommFailure: stamped by the
            // adapter when the link went, not by the source). The first value from the source
            // after it is current even when its own time is older: an unchanged setpoint comes
            // back with the time it was last written, and waiting for a newer one would keep
            // the twin Bad while its PLC answers again. (An adapter pushes in order: nothing
            // from before the loss comes after the marker.)
            let after_link_loss = self.snap.quality.code == QualityCode::Bad
                && self.snap.quality.reason == QualityReason::CommFailure
                && r.quality.reason != QualityReason::CommFailure;
            if r.source_ts < self.snap.source_ts && !after_link_loss {
                let behind_ms = self.snap.source_ts.millis_since(r.source_ts);
                if behind_ms <= self.ctx.settings.clock_step_back_ms {
                    // Late reading: kept in history, the live value stays the newer one.
                    continue;
                }
                // Far behind the live value: the source's clock went back (NTP step, a
                // replaced PLC). Holding on to the "newer" value would freeze the twin.
                self.ctx
                    .emit(Event::new(
                        self.entry.path().clone(),
                        now,
                        EventKind::Quality,
                        Severity::Low,
                        format!(
                            "source clock went back {behind_ms} ms (from {} to {}); value taken as current",
                            self.snap.source_ts, r.source_ts
                        ),
                    ))
                    .await;
            }
            touched = true;
            let usable = if quality.code == QualityCode::Bad {
                f64::NAN
            } else {
                v
            };
            self.put_on_board(usable, r.source_ts);
            self.set_quality(quality, r.source_ts).await;
            self.snap.value = Some(r.value);
            self.snap.source_ts = r.source_ts;
            self.snap.server_ts = now;
            self.snap.stats.push(v);
            if quality.code != QualityCode::Bad {
                self.evaluate_alarms(v, r.source_ts).await;
                self.detect(v, r.source_ts).await;
            }
        }
        self.entry.stale.store(false, Ordering::Relaxed);
        // Publish before writing history: the store may make us wait for room, watchers
        // and readers must not wait with it. (The tail may pass a chunk's size within one
        // drain; the chunk is then that much larger.)
        if touched || self.snap.rejected != rejected_before {
            self.publish(now);
        }
        let full = {
            let mut t = self.entry.tail.lock().expect("tail lock is never poisoned");
            if t.points.is_empty() {
                t.since = now;
            }
            t.points.extend_from_slice(&tail);
            !t.points.is_empty()
                && (t.points.len() >= self.ctx.settings.history_chunk_points
                    || now.millis_since(t.since) > self.ctx.settings.history_chunk_max_age_ms)
        };
        if full {
            self.flush_tail().await;
        }
    }

    /// Runs the sensor's detectors on a current, usable value (never NaN/inf: `check` refused
    /// those) in its machine's regime; an episode's start or end becomes an event.
    async fn detect(&mut self, v: f64, at: Timestamp) {
        self.follow_machine();
        let Some(det) = self.snap.detector.as_mut() else {
            return;
        };
        let regime = self
            .machine
            .as_ref()
            .and_then(|(m, _)| m.board.as_ref())
            .map_or(Regime::UNKNOWN, |b| Regime(b.regime_at(at)));
        let verdict = det.update(&self.spec.detect, at, v, regime);
        self.snap.anomaly_score = Some(verdict.score);
        self.snap.anomalous = det.active().is_some();
        if let Some(t) = verdict.transition {
            let ev = anomaly_event(self.entry.path(), t, at, "");
            self.ctx.emit(ev).await;
        }
    }

    async fn set_quality(&mut self, q: Quality, at: Timestamp) {
        let old = self.snap.quality;
        if old == q {
            return;
        }
        self.snap.quality = q;
        // Quality events for what an engineer must see: bad data and staleness, and the
        // recovery from them. Range excursions are the alarms' business; the first value
        // after start-up is not news.
        let noteworthy =
            |x: Quality| x.code == QualityCode::Bad || x.reason == QualityReason::Stale;
        if old.reason != QualityReason::NoData && (noteworthy(old) || noteworthy(q)) {
            let severity = if q.code == QualityCode::Bad {
                Severity::High
            } else {
                Severity::Low
            };
            self.ctx
                .emit(Event::new(
                    self.entry.path().clone(),
                    at,
                    EventKind::Quality,
                    severity,
                    format!("quality {old} -> {q}"),
                ))
                .await;
        }
    }

    async fn evaluate_alarms(&mut self, v: f64, at: Timestamp) {
        for i in 0..self.spec.alarms.len() {
            let limit = &self.spec.alarms[i];
            if let Some(t) = self.snap.alarms[i].evaluate(limit, v, at) {
                let msg = describe(limit, t, Some(v), &self.spec.unit);
                let ev = alarm_event(self.entry.path(), limit, t, at, msg);
                let seq = self.ctx.emit(ev).await;
                self.tell_machine(i, seq, at, false);
            }
        }
    }

    /// Tells the machine of an alarm's change when its rules watch alarms.
    fn tell_machine(&mut self, i: usize, seq: u64, at: Timestamp, acknowledged: bool) {
        self.follow_machine();
        let Some((machine, _)) = &self.machine else {
            return;
        };
        let watches = machine
            .board
            .as_ref()
            .is_some_and(|b| b.watches_alarms.load(Ordering::Relaxed));
        if !watches {
            return;
        }
        let limit = &self.spec.alarms[i];
        machine.send(TwinMsg::SensorAlarm(Box::new(SensorAlarm {
            sensor: self.spec.name.clone(),
            alarm: limit.name.clone(),
            state: self.snap.alarms[i].state,
            severity: limit.severity,
            seq,
            at,
            acknowledged,
        })));
    }

    async fn reject(&mut self, reason: RejectReason, now: Timestamp) {
        self.snap.rejected += 1;
        self.ctx.metrics.count_reject(reason.label());
        let Some(msg) = self
            .rejects
            .note(&reason, now, self.ctx.settings.reject_event_interval_ms)
        else {
            return;
        };
        tracing::warn!(asset = %self.entry.path(), reason = reason.label(), "reading rejected");
        self.ctx
            .emit(Event::new(
                self.entry.path().clone(),
                now,
                EventKind::Rejected,
                Severity::Low,
                msg,
            ))
            .await;
    }

    async fn check_stale(&mut self, at: Timestamp) {
        let last_us = self.entry.last_seen_us.load(Ordering::Relaxed);
        let stale_ms = i64::try_from(self.spec.stale_after_ms()).unwrap_or(i64::MAX / 1000);
        if at.0.saturating_sub(last_us) < stale_ms.saturating_mul(1000) {
            // A reading came in after the sweeper looked: not stale, let it look again.
            self.entry.stale.store(false, Ordering::Relaxed);
            return;
        }
        if self.snap.quality.reason == QualityReason::Stale {
            return;
        }
        if self.snap.quality.code == QualityCode::Bad {
            self.entry.stale.store(true, Ordering::Relaxed);
            return;
        }
        self.entry.stale.store(true, Ordering::Relaxed);
        self.put_on_board(f64::NAN, self.snap.source_ts);
        self.set_quality(Quality::uncertain(QualityReason::Stale), at)
            .await;
        self.flush_tail().await;
        self.publish(at);
    }

    /// Puts the sensor's latest value (NaN = unusable) on its machine's sample board, and
    /// asks the machine to evaluate when this reading is the first past its due time.
    fn put_on_board(&mut self, value: f64, ts: Timestamp) {
        self.follow_machine();
        let Some((machine, index)) = &self.machine else {
            return;
        };
        let Some(board) = &machine.board else {
            return;
        };
        let interval_us = self.ctx.settings.inference_interval_ms.saturating_mul(1000);
        if board.write(*index, value, ts, interval_us) {
            machine.send(TwinMsg::Evaluate(ts));
        }
    }

    /// A live apply gave the machine a new entry (a new sample board, maybe another place
    /// on it): find it again. One atomic load when nothing changed.
    fn follow_machine(&mut self) {
        if self.machine.as_ref().is_some_and(|(m, _)| m.is_retired()) {
            self.machine = machine_board(&self.ctx, &self.entry);
        }
    }

    fn alarm_index(&self, name: &str) -> Result<usize, TwinError> {
        self.spec
            .alarms
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| TwinError::UnknownAlarm {
                asset: self.entry.path().clone(),
                alarm: name.to_string(),
                known: self
                    .spec
                    .alarms
                    .iter()
                    .map(|a| a.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    async fn acknowledge(
        &mut self,
        name: &str,
        by: &str,
        comment: &str,
    ) -> Result<ferrotwin_models::alarm::AlarmStatus, TwinError> {
        let i = self.alarm_index(name)?;
        let at = Timestamp::now();
        let t = self.snap.alarms[i]
            .acknowledge(at)
            .map_err(|source| TwinError::Ack {
                asset: self.entry.path().clone(),
                alarm: name.to_string(),
                source,
            })?;
        let limit = &self.spec.alarms[i];
        let mut msg = format!("{} by {by}", describe(limit, t, None, &self.spec.unit));
        if !comment.is_empty() {
            msg.push_str(&format!(": {comment}"));
        }
        let ev = alarm_event(self.entry.path(), limit, t, at, msg);
        let seq = self.ctx.emit(ev).await;
        self.tell_machine(i, seq, at, true);
        self.publish(at);
        Ok(self.snap.alarms[i])
    }

    async fn shelve(
        &mut self,
        name: &str,
        until: Option<Timestamp>,
        by: &str,
    ) -> Result<ferrotwin_models::alarm::AlarmStatus, TwinError> {
        let i = self.alarm_index(name)?;
        let at = Timestamp::now();
        let t = match until {
            Some(u) => Some(self.snap.alarms[i].shelve(u, at)),
            None => self.snap.alarms[i].unshelve(at),
        };
        if let Some(t) = t {
            let limit = &self.spec.alarms[i];
            let msg = match until {
                Some(u) => format!("alarm {:?} shelved until {u} by {by}", limit.name),
                None => format!("alarm {:?} unshelved by {by}", limit.name),
            };
            let ev = alarm_event(self.entry.path(), limit, t, at, msg);
            let seq = self.ctx.emit(ev).await;
            self.tell_machine(i, seq, at, false);
            self.publish(at);
        }
        Ok(self.snap.alarms[i])
    }

    /// Writes the tail as a chunk. The points leave the tail only once they are queued in
    /// the store, so a reader (tail first, then store) always finds them somewhere, and a
    /// crash in between leaves them in the tail (written again; readers drop duplicates).
    async fn flush_tail(&mut self) {
        let points = self.entry.tail_points();
        if points.is_empty() {
            return;
        }
        self.ctx
            .store
            .append_history(self.entry.id, Property::Value, &points)
            .await;
        let mut t = self.entry.tail.lock().expect("tail lock is never poisoned");
        let n = points.len().min(t.points.len());
        t.points.drain(..n);
        t.since = Timestamp::now();
    }

    fn publish(&mut self, at: Timestamp) {
        let snapshot = TwinSnapshot {
            restarts: self.restarts,
            updated: at,
            state: TwinState::Sensor(self.snap.clone()),
        };
        let rollup = snapshot.rollup(&self.entry.def.kind);
        self.ctx.publish(&self.entry, snapshot);
        if rollup != self.last_rollup {
            self.last_rollup = rollup;
            self.ctx.notify_parent(&self.entry, rollup);
        }
    }
}

/// The sensor's machine (when its parent is one) and the sensor's index on its board.
fn machine_board(ctx: &TwinCtx, entry: &TwinEntry) -> Option<(Arc<TwinEntry>, usize)> {
    let machine = ctx.registry.by_path(&entry.path().parent()?)?;
    let AssetKind::Machine { spec, .. } = &machine.def.kind else {
        return None;
    };
    let name = entry.path().name();
    let index = spec.sensors.iter().position(|s| s.name == name)?;
    Some((machine, index))
}

fn describe(limit: &AlarmLimit, t: AlarmTransition, value: Option<f64>, unit: &str) -> String {
    let side = match limit.kind {
        LimitKind::High => "above",
        LimitKind::Low => "below",
    };
    match (t, value) {
        (AlarmTransition::Raised, Some(v)) => format!(
            "alarm {:?} raised: {v:.3} {unit} {side} limit {} {unit}",
            limit.name, limit.limit
        ),
        (AlarmTransition::ReturnedToNormal, Some(v)) => format!(
            "alarm {:?} returned to normal (unacknowledged): {v:.3} {unit}",
            limit.name
        ),
        (AlarmTransition::Cleared, Some(v)) => {
            format!("alarm {:?} cleared: {v:.3} {unit}", limit.name)
        }
        (t, _) => format!("alarm {:?} {}", limit.name, t.as_str()),
    }
}

fn alarm_event(
    asset: &ferrotwin_models::AssetPath,
    limit: &AlarmLimit,
    t: AlarmTransition,
    at: Timestamp,
    message: String,
) -> Event {
    let severity = match t {
        AlarmTransition::Raised => limit.severity,
        _ => Severity::Info,
    };
    let mut ev = Event::new(asset.clone(), at, EventKind::Alarm, severity, message);
    ev.alarm = limit.name.clone();
    ev
}
