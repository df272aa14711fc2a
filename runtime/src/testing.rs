//! What the end-to-end tests reach inside a running runtime for, and nothing more: a twin's
//! published snapshot and actor, a crash on demand (the supervision tests), the store
//! writer's and the replication sender's state. Tools and applications use `Runtime` and
//! `TwinApi` instead.

use std::sync::Arc;

use ferrotwin_models::AssetPath;

pub use crate::replication::site::SenderStatus;

use crate::Runtime;
use crate::core::{TwinMsg, TwinSnapshot};

/// The snapshot the twin at `path` published last.
pub fn snapshot(rt: &Runtime, path: &AssetPath) -> Option<Arc<TwinSnapshot>> {
    rt.registry().by_path(path).map(|e| e.snapshot())
}

/// The actor running the twin at `path` now (`None` while it restarts).
pub fn actor_id(rt: &Runtime, path: &AssetPath) -> Option<ractor::ActorId> {
    rt.registry()
        .by_path(path)
        .and_then(|e| e.actor())
        .map(|a| a.get_id())
}

/// Makes the twin at `path` panic in its handler, as a bug would. False when it has no
/// running actor.
pub fn crash(rt: &Runtime, path: &AssetPath) -> bool {
    rt.registry()
        .by_path(path)
        .is_some_and(|e| e.send(TwinMsg::Crash))
}

/// Twins whose snapshot changed since the store last wrote it.
pub fn dirty_twins(rt: &Runtime) -> usize {
    rt.registry().dirty_len()
}

/// Asks the store writer to flush now instead of at its next interval.
pub fn nudge_store(rt: &Runtime) {
    rt.store().nudge();
}

/// A site's replication sender (`None` without replication).
pub fn sender(rt: &Runtime) -> Option<Arc<SenderStatus>> {
    rt.sender()
}
