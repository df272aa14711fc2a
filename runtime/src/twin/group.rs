//! Twins of lines, areas, sites and the enterprise: debounced roll-ups of their children.

use std::sync::Arc;
use std::time::Duration;

use ferrotwin_models::rollup::RollUp;
use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::supervise::Children;
use super::{TwinArgs, TwinCtx};
use crate::core::{TwinMsg, TwinSnapshot, TwinState};
use crate::registry::TwinEntry;
use ferrotwin_models::Timestamp;

pub struct GroupTwin;

pub struct GroupState {
    ctx: Arc<TwinCtx>,
    entry: Arc<TwinEntry>,
    children: Children,
    restarts: u32,
    published: RollUp,
    publish_scheduled: bool,
}

impl Actor for GroupTwin {
    type Msg = TwinMsg;
    type State = GroupState;
    type Arguments = TwinArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<TwinMsg>,
        args: TwinArgs,
    ) -> Result<GroupState, ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            let TwinArgs {
                ctx,
                entry,
                restarted_after,
            } = args;
            let mut restarts = entry.snapshot().restarts;
            if let Some(why) = restarted_after {
                restarts += 1;
                super::machine::record_restart(&ctx, &entry, restarts, &why).await;
            }
            let children = Children::spawn_all(&ctx, &myself, entry.path()).await?;
            let mut state = GroupState {
                ctx,
                entry,
                children,
                restarts,
                published: RollUp::default(),
                publish_scheduled: false,
            };
            state.publish();
            Ok(state)
        })
        .await
    }

    async fn handle(
        &self,
        myself: ActorRef<TwinMsg>,
        msg: TwinMsg,
        state: &mut GroupState,
    ) -> Result<(), ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            let Some(msg) =
                super::answer_as_parent(&state.entry, msg, state.entry.level().as_str())
            else {
                return Ok(());
            };
            match msg {
                TwinMsg::ChildChanged { id, rollup } => {
                    let changed = state.children.set(id, rollup);
                    if changed && !state.publish_scheduled {
                        state.publish_scheduled = true;
                        let debounce = Duration::from_millis(state.ctx.settings.rollup_debounce_ms);
                        myself.send_after(debounce, || TwinMsg::PublishRollUp);
                    }
                }
                TwinMsg::PublishRollUp => {
                    state.publish_scheduled = false;
                    state.publish();
                }
                TwinMsg::Drain => {
                    // Nothing is measured on a line or above: count as rejected.
                    let readings = state.entry.take_inbox();
                    state
                        .ctx
                        .metrics
                        .rejected_unknown_property
                        .fetch_add(readings.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    state.ctx.handled(readings.len());
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
        state: &mut GroupState,
    ) -> Result<(), ActorProcessingErr> {
        // Boxed: an actor's task holds its largest handler future inline for its
        // whole life; boxing keeps an idle twin small, for one allocation per call.
        Box::pin(async move {
            let ctx = state.ctx.clone();
            let path = state.entry.path().clone();
            state
                .children
                .on_supervision(&ctx, &myself, &path, evt)
                .await
        })
        .await
    }
}

impl GroupState {
    fn publish(&mut self) {
        let rollup = self.children.rollup();
        let at = Timestamp::now();
        self.ctx.publish(
            &self.entry,
            TwinSnapshot {
                restarts: self.restarts,
                updated: at,
                state: TwinState::Group(rollup),
            },
        );
        if rollup != self.published {
            self.published = rollup;
            self.ctx.notify_parent(&self.entry, rollup);
        }
    }
}
