//! What every parent twin does for its children: spawn them linked, keep their roll-ups,
//! restart a failed child from its last snapshot within a budget, escalate past it.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

use ferrotwin_models::rollup::RollUp;
use ferrotwin_models::{AssetId, AssetPath};
use ractor::{ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::{STOP_REMOVED, TwinCtx, TwinMsg, spawn_twin};
use crate::registry::TwinEntry;

#[derive(Default)]
pub struct Children {
    by_actor: HashMap<ActorId, Arc<TwinEntry>>,
    rollups: HashMap<AssetId, RollUp>,
    restarts: HashMap<AssetId, VecDeque<Instant>>,
}

impl Children {
    /// Spawns every child of `path` (as the plant says) linked to `myself`.
    pub async fn spawn_all(
        ctx: &Arc<TwinCtx>,
        myself: &ActorRef<TwinMsg>,
        path: &AssetPath,
    ) -> Result<Children, ActorProcessingErr> {
        let mut c = Children::default();
        let plant = ctx.plant();
        for def in plant.children(path) {
            let Some(entry) = ctx.registry.by_path(&def.path) else {
                // A live apply between the plant's swap and its registry change: the
                // apply starts (or has stopped) this child itself.
                tracing::warn!(parent = %path, child = %def.path, "child not in the registry; not started");
                continue;
            };
            c.adopt(ctx, myself, entry).await?;
        }
        Ok(c)
    }

    /// Starts `entry`'s twin as a child of `myself` (at start, and when a live apply adds or
    /// changes a child).
    pub async fn adopt(
        &mut self,
        ctx: &Arc<TwinCtx>,
        myself: &ActorRef<TwinMsg>,
        entry: Arc<TwinEntry>,
    ) -> Result<(), ActorProcessingErr> {
        let actor = spawn_twin(ctx.clone(), entry.clone(), Some(myself.get_cell()), None)
            .await
            .map_err(|e| format!("{}: cannot start child: {e}", entry.path()))?;
        self.rollups
            .insert(entry.id, entry.snapshot().rollup(&entry.def.kind));
        self.by_actor.insert(actor.get_id(), entry);
        Ok(())
    }

    /// `adopt` of the registry's entry at `path`.
    pub async fn adopt_path(
        &mut self,
        ctx: &Arc<TwinCtx>,
        myself: &ActorRef<TwinMsg>,
        path: &AssetPath,
    ) -> Result<(), String> {
        let Some(entry) = ctx.registry.by_path(path) else {
            return Err(format!("{path} is not in the registry"));
        };
        let running = entry.actor().is_some_and(|a| {
            matches!(
                a.get_status(),
                ractor::ActorStatus::Starting
                    | ractor::ActorStatus::Running
                    | ractor::ActorStatus::Upgrading
            )
        });
        if running {
            // Already runs (a crash during the apply restarted it from this entry).
            return Ok(());
        }
        self.adopt(ctx, myself, entry)
            .await
            .map_err(|e| e.to_string())
    }

    /// Reads every child's roll-up again from its current registry entry (after a live
    /// apply rebound this parent: changes its children reported meanwhile went nowhere).
    pub fn refresh(&mut self, ctx: &TwinCtx) {
        for entry in self.by_actor.values() {
            if let Some(now) = ctx.registry.by_path(entry.path())
                && self.rollups.contains_key(&now.id)
            {
                self.rollups
                    .insert(now.id, now.snapshot().rollup(&now.def.kind));
            }
        }
    }

    pub fn rollup(&self) -> RollUp {
        RollUp::of_children(self.rollups.values())
    }

    /// Records a child's roll-up; true if it changed.
    pub fn set(&mut self, id: AssetId, rollup: RollUp) -> bool {
        match self.rollups.get_mut(&id) {
            Some(r) if *r == rollup => false,
            Some(r) => {
                *r = rollup;
                true
            }
            // Not (or no longer) our child: ignore.
            None => false,
        }
    }

    /// Handles a supervision event. A failed child is restarted from the snapshot in its
    /// registry entry; past the budget the error is returned, which fails this parent and
    /// hands the problem to its own parent. True when the children's roll-up changed (a
    /// child removed by a live apply): the caller publishes.
    pub async fn on_supervision(
        &mut self,
        ctx: &Arc<TwinCtx>,
        myself: &ActorRef<TwinMsg>,
        me: &AssetPath,
        evt: SupervisionEvent,
    ) -> Result<bool, ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorFailed(cell, err) => {
                let Some(entry) = self.by_actor.remove(&cell.get_id()) else {
                    return Ok(false);
                };
                entry.set_actor(None);
                // A live apply gave it a new entry (restarted from that one) or removed it
                // (not restarted).
                let entry = if entry.is_retired() {
                    match ctx.registry.by_path(entry.path()) {
                        Some(next) if !next.is_retired() => next,
                        _ => return Ok(self.rollups.remove(&entry.id).is_some()),
                    }
                } else {
                    entry
                };
                let s = &ctx.settings;
                let window = Duration::from_millis(s.restart_window_ms);
                let history = self.restarts.entry(entry.id).or_default();
                let now = Instant::now();
                while history
                    .front()
                    .is_some_and(|t| now.duration_since(*t) > window)
                {
                    history.pop_front();
                }
                if history.len() >= s.max_restarts {
                    tracing::error!(asset = %entry.path(), parent = %me, error = %err,
                        "twin exceeded its restart budget; escalating");
                    return Err(format!(
                        "{me}: child {} failed {} times within {} ms (last: {err}); escalating",
                        entry.path(),
                        history.len() + 1,
                        s.restart_window_ms
                    )
                    .into());
                }
                history.push_back(now);
                tracing::warn!(asset = %entry.path(), error = %err, "twin failed; restarting from its last snapshot");
                let why = err.to_string();
                let span = tracing::info_span!(
                    parent: None,
                    "twin.restart",
                    ferrotwin.asset = %entry.path(),
                    error.type = "panic",
                    ferrotwin.error = %why,
                );
                let actor = spawn_twin(
                    ctx.clone(),
                    entry.clone(),
                    Some(myself.get_cell()),
                    Some(why),
                )
                .instrument(span)
                .await
                .map_err(|e| format!("{}: restart failed: {e}", entry.path()))?;
                self.by_actor.insert(actor.get_id(), entry);
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                if let Some(entry) = self.by_actor.remove(&cell.get_id()) {
                    entry.set_actor(None);
                    if reason.as_deref() == Some(STOP_REMOVED) {
                        return Ok(self.rollups.remove(&entry.id).is_some());
                    }
                }
            }
            _ => {}
        }
        Ok(false)
    }
}
