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
                TwinMsg::ChildChanged { id, rollup } if state.children.set(id, rollup) => {
                    state.schedule(&myself);
                }
                TwinMsg::Rebind(reply) => {
                    let r = match state.ctx.registry.by_path(state.entry.path()) {
                        Some(next) => {
                            state.refuse_inbox();
                            state.entry.set_actor(None);
                            state.entry = next;
                            state.entry.set_actor(Some(myself.clone()));
                            state.children.refresh(&state.ctx);
                            state.publish();
                            Ok(())
                        }
                        None => Err(format!("{}: removed, not rebound", state.entry.path())),
                    };
                    let _ = reply.send(r);
                }
                TwinMsg::Adopt { path, reply } => {
                    let r = state.children.adopt_path(&state.ctx, &myself, &path).await;
                    state.schedule(&myself);
                    let _ = reply.send(r);
                }
                TwinMsg::PublishRollUp => {
                    state.publish_scheduled = false;
                    state.publish();
                }
                TwinMsg::Drain => state.refuse_inbox(),
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

impl GroupState {
    /// Nothing is measured on a line or above: readings routed here count as rejected.
    fn refuse_inbox(&self) {
        let readings = self.entry.take_inbox();
        self.ctx
            .metrics
            .rejected_unknown_property
            .fetch_add(readings.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.ctx.handled(readings.len());
    }

    /// Publishes the roll-up a debounce from now (once for a burst of changes).
    fn schedule(&mut self, myself: &ActorRef<TwinMsg>) {
        if !self.publish_scheduled {
            self.publish_scheduled = true;
            let debounce = Duration::from_millis(self.ctx.settings.rollup_debounce_ms);
            myself.send_after(debounce, || TwinMsg::PublishRollUp);
        }
    }

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

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use ferrotwin_models::AssetPath;
    use tokio::time::{Instant, timeout};

    use super::*;
    use crate::core::{Credits, Metrics, TwinSettings};
    use crate::store::{Store, StoreConfig};
    use crate::twin::{Plant, spawn_twin};
    use crate::watch::{Change, WatchHub, Watcher};

    const LINE: &str = "e/s/a/l";

    fn path(p: &str) -> AssetPath {
        AssetPath::parse(p).expect("path")
    }

    /// The twins' context for one line with one machine of one sensor (no store writer:
    /// nothing here waits for the disk).
    fn ctx(dir: &std::path::Path) -> Arc<TwinCtx> {
        let (assets, registry) = crate::registry::fixture::one_machine(&["a"]);
        Arc::new(TwinCtx {
            registry,
            store: Arc::new(Store::open(dir, StoreConfig::default()).expect("store")),
            hub: Arc::new(WatchHub::new(64)),
            plant: std::sync::RwLock::new(Arc::new(Plant::new(&assets))),
            settings: TwinSettings::default(),
            metrics: Arc::new(Metrics::default()),
            credits: Credits(Arc::new(AtomicUsize::new(0))),
            models: std::sync::RwLock::default(),
            actions: None,
        })
    }

    /// The next roll-up the line publishes within `within` (of paused time), if any.
    async fn next_publish(w: &mut Watcher, within: Duration) -> Option<RollUp> {
        match timeout(within, w.rx.recv()).await {
            Ok(Some(Change::Twin(_, snap))) => match snap.state {
                TwinState::Group(r) => Some(r),
                _ => panic!("a line publishes a roll-up"),
            },
            Ok(_) => panic!("the watch ended"),
            Err(_) => None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_child_changes_is_published_once_a_debounce_after_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ctx = ctx(dir.path());
        let debounce = Duration::from_millis(ctx.settings.rollup_debounce_ms);
        let line = ctx.registry.by_path(&path(LINE)).expect("line");
        let machine = ctx.registry.by_path(&path("e/s/a/l/m1")).expect("machine");
        let mut w = ctx.hub.subscribe_within(Some(path(LINE)), Some(4), false);
        let actor = spawn_twin(ctx.clone(), line, None, None)
            .await
            .expect("line starts");
        // Start-up publishes, then quiet.
        while next_publish(&mut w, Duration::from_secs(1)).await.is_some() {}

        let changed = |sensors| RollUp {
            machines: 1,
            sensors,
            ..RollUp::default()
        };
        let first = Instant::now();
        actor
            .cast(TwinMsg::ChildChanged {
                id: machine.id,
                rollup: changed(10),
            })
            .expect("line runs");
        assert_eq!(next_publish(&mut w, debounce * 3 / 4).await, None);
        actor
            .cast(TwinMsg::ChildChanged {
                id: machine.id,
                rollup: changed(20),
            })
            .expect("line runs");
        let published = next_publish(&mut w, debounce)
            .await
            .expect("published within a debounce of the second change");
        assert_eq!(
            Instant::now() - first,
            debounce,
            "one debounce after the first change, not after the last"
        );
        assert_eq!(published.sensors, 20, "with the latest change");
        assert_eq!(
            next_publish(&mut w, debounce * 5).await,
            None,
            "the burst is published once"
        );
        actor.stop(None);
    }
}
