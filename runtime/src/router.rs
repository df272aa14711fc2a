//! Ingest router: the runtime's `IngestSink`. Groups a batch by target twin and sends each
//! twin one `Apply` message. One hash lookup per reading; never walks the asset tree.
//!
//! Bounds: a twin holds at most `MAX_PENDING_PER_TWIN` unhandled `Apply` messages, and the
//! runtime at most `max_inflight_readings` readings in mailboxes. A batch that would exceed
//! either is handed back untouched (`PushBack::Busy`): the source pauses, nothing is dropped
//! and no mailbox grows without limit.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ferrotwin_models::{AssetId, IngestSink, PushBack, PushBackReason, Reading};

use crate::metrics::Metrics;
use crate::registry::{Registry, TwinEntry};
use crate::twin::TwinMsg;

/// `Apply` messages a twin may have queued. A twin that is this far behind pushes back on
/// the whole batch that targets it.
pub const MAX_PENDING_PER_TWIN: u32 = 8;

pub struct IngestRouter {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
    closed: AtomicBool,
}

/// Releases in-flight credits when a twin has handled its readings.
#[derive(Clone)]
pub struct Credits(pub Arc<AtomicUsize>);

impl IngestRouter {
    pub fn new(
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        inflight: Credits,
        max_inflight: usize,
    ) -> IngestRouter {
        IngestRouter {
            registry,
            metrics,
            inflight: inflight.0,
            max_inflight: max_inflight.max(1),
            closed: AtomicBool::new(false),
        }
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Pushes, waiting (asynchronously) while the runtime pushes back.
    pub async fn push(&self, mut batch: Vec<Reading>) -> Result<(), PushBack> {
        loop {
            match self.try_push(batch) {
                Ok(()) => return Ok(()),
                Err(PushBack {
                    batch: b,
                    why: PushBackReason::Busy,
                }) => {
                    batch = b;
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl IngestSink for IngestRouter {
    fn try_push(&self, batch: Vec<Reading>) -> Result<(), PushBack> {
        if self.closed.load(Ordering::Acquire) {
            return Err(PushBack {
                batch,
                why: PushBackReason::Closed,
            });
        }
        let n = batch.len();
        if n == 0 {
            return Ok(());
        }
        if self.inflight.load(Ordering::Relaxed) + n > self.max_inflight {
            self.metrics.push_backs.fetch_add(1, Ordering::Relaxed);
            return Err(PushBack {
                batch,
                why: PushBackReason::Busy,
            });
        }
        // Group by target. A batch usually holds one reading per sensor, so the map holds
        // one small Vec per target.
        let mut groups: HashMap<AssetId, (Arc<TwinEntry>, Vec<Reading>)> =
            HashMap::with_capacity(n.min(4096));
        let mut unknown = 0u64;
        for r in &batch {
            if let Some((_, v)) = groups.get_mut(&r.asset) {
                v.push(*r);
                continue;
            }
            match self.registry.get(&r.asset) {
                Some(e) => {
                    groups.insert(r.asset, (e, vec![*r]));
                }
                None => unknown += 1,
            }
        }
        if groups
            .values()
            .any(|(e, _)| e.pending.load(Ordering::Relaxed) >= MAX_PENDING_PER_TWIN)
        {
            self.metrics.push_backs.fetch_add(1, Ordering::Relaxed);
            return Err(PushBack {
                batch,
                why: PushBackReason::Busy,
            });
        }
        if unknown > 0 {
            self.metrics
                .unknown_asset
                .fetch_add(unknown, Ordering::Relaxed);
            tracing::debug!(count = unknown, "readings for unknown assets refused");
        }
        self.metrics
            .readings_received
            .fetch_add(n as u64, Ordering::Relaxed);
        self.metrics.batches_routed.fetch_add(1, Ordering::Relaxed);
        let now_us = crate::twin::now().0;
        for (_, (entry, readings)) in groups {
            let Some(actor) = entry.actor() else {
                // Between crash and restart: the reading has nowhere to go yet. Count it
                // as unknown rather than hold it.
                self.metrics
                    .unknown_asset
                    .fetch_add(readings.len() as u64, Ordering::Relaxed);
                continue;
            };
            let k = readings.len();
            entry.pending.fetch_add(1, Ordering::AcqRel);
            entry.pending_readings.fetch_add(k as u32, Ordering::AcqRel);
            entry.last_seen_us.store(now_us, Ordering::Relaxed);
            self.inflight.fetch_add(k, Ordering::AcqRel);
            if actor.cast(TwinMsg::Apply(readings)).is_err() {
                entry.pending.fetch_sub(1, Ordering::AcqRel);
                entry.pending_readings.fetch_sub(k as u32, Ordering::AcqRel);
                self.inflight.fetch_sub(k, Ordering::AcqRel);
                self.metrics
                    .unknown_asset
                    .fetch_add(k as u64, Ordering::Relaxed);
            }
        }
        Ok(())
    }
}
