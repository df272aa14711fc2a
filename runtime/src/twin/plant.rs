//! The supervisor above the enterprise twin: when a failure escalates all the way up, it
//! restarts the whole tree from the snapshots, with a growing pause, instead of leaving the
//! site without twins.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::{TwinCtx, spawn_twin};
use crate::registry::TwinEntry;

pub struct PlantSupervisor;

pub enum PlantMsg {
    /// Start the root twin again (after the back-off).
    Respawn(String),
}

pub struct PlantState {
    ctx: Arc<TwinCtx>,
    root: Arc<TwinEntry>,
    failures: u32,
}

/// Longest pause between two restarts of the whole tree.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Actor for PlantSupervisor {
    type Msg = PlantMsg;
    type State = PlantState;
    type Arguments = (Arc<TwinCtx>, Arc<TwinEntry>);

    async fn pre_start(
        &self,
        myself: ActorRef<PlantMsg>,
        (ctx, root): (Arc<TwinCtx>, Arc<TwinEntry>),
    ) -> Result<PlantState, ActorProcessingErr> {
        Box::pin(async move {
            spawn_twin(ctx.clone(), root.clone(), Some(myself.get_cell()), None).await?;
            Ok(PlantState {
                ctx,
                root,
                failures: 0,
            })
        })
        .await
    }

    async fn handle(
        &self,
        myself: ActorRef<PlantMsg>,
        msg: PlantMsg,
        state: &mut PlantState,
    ) -> Result<(), ActorProcessingErr> {
        let PlantMsg::Respawn(why) = msg;
        Box::pin(async move {
            match spawn_twin(
                state.ctx.clone(),
                state.root.clone(),
                Some(myself.get_cell()),
                Some(why.clone()),
            )
            .await
            {
                Ok(_) => tracing::warn!(asset = %state.root.path(), "twin tree restarted"),
                Err(e) => {
                    tracing::error!(error = %e, "restarting the twin tree failed; retrying");
                    state.schedule(&myself, why);
                }
            }
        })
        .await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PlantMsg>,
        evt: SupervisionEvent,
        state: &mut PlantState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(_, err) = evt {
            state.root.set_actor(None);
            state.ctx.metrics.restarts.fetch_add(1, Ordering::Relaxed);
            tracing::error!(asset = %state.root.path(), error = %err,
                "a failure escalated to the top of the twin tree; restarting the tree");
            state.schedule(&myself, err.to_string());
        }
        Ok(())
    }
}

impl PlantState {
    fn schedule(&mut self, myself: &ActorRef<PlantMsg>, why: String) {
        self.failures += 1;
        let pause = Duration::from_millis(100u64 << self.failures.min(9)).min(MAX_BACKOFF);
        myself.send_after(pause, move || PlantMsg::Respawn(why));
    }
}
