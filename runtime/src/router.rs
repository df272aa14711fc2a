//! Ingest router: the runtime's `IngestSink`. Groups a batch by target twin, appends each
//! group to the twin's registry inbox and sends the twin a `Drain` only if none is on its way.
//! One hash lookup per reading; it never walks the asset tree.
//!
//! Bounds: a twin's inbox holds at most `MAX_INBOX_PER_TWIN` readings, and all inboxes
//! together at most `max_inflight_readings`. A batch that would exceed either is handed back
//! untouched (`PushBack::Busy`): the source pauses, nothing is dropped and no mailbox or inbox
//! grows without limit. Under load a twin gets one message for everything that arrived while
//! it was busy, so the actor hop is paid per drain, not per reading.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{IngestSink, Property, PushBack, PushBackReason, Reading, Timestamp};

use crate::core::TwinMsg;
use crate::core::{ClockRules, Credits, Metrics};
use crate::registry::{Delivery, Registry, TwinEntry};

/// Readings a twin's inbox may hold. A twin that is this far behind pushes back on the
/// whole batch that targets it.
pub const MAX_INBOX_PER_TWIN: usize = 1024;

pub struct IngestRouter {
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    inflight: Arc<AtomicUsize>,
    max_inflight: usize,
    closed: AtomicBool,
    /// The twins' clock rules (`TwinSettings`), for machine states noted on sample boards.
    clock: ClockRules,
    /// Batch spans, a few per second at most (never one per reading).
    spans: crate::telemetry::SpanBudget,
}

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
            clock: ClockRules::default(),
            spans: crate::telemetry::SpanBudget::default(),
        }
    }

    pub fn with_clock_rules(mut self, clock: ClockRules) -> IngestRouter {
        self.clock = clock;
        self
    }

    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
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
        let _span = self.spans.admit().then(|| {
            tracing::info_span!(parent: None, "ingest.batch", ferrotwin.readings = n as i64)
                .entered()
        });
        // A batch larger than the whole budget still passes when nothing is in flight, so an
        // oversized batch is slow rather than refused forever.
        let inflight = self.inflight.load(Ordering::Relaxed);
        if inflight > 0 && inflight + n > self.max_inflight {
            self.metrics.push_backs.fetch_add(1, Ordering::Relaxed);
            return Err(PushBack {
                batch,
                why: PushBackReason::Busy,
            });
        }
        // Pass 1: find every target (one registry shard lock per shard touched) and check
        // room, so a batch that is pushed back is untouched. No grouping: the inbox coalesces
        // readings of one twin, and only the first delivery sends a message.
        let mut by_shard: [Vec<u32>; Registry::SHARDS] = Default::default();
        for (i, r) in batch.iter().enumerate() {
            by_shard[Registry::shard_of(&r.asset)].push(i as u32);
        }
        let mut targets: Vec<Option<Arc<TwinEntry>>> = vec![None; n];
        let mut unknown = 0u64;
        let mut full = false;
        for (shard, idx) in by_shard.iter().enumerate() {
            if idx.is_empty() {
                continue;
            }
            self.registry.with_shard(shard, |map| {
                for &i in idx {
                    match map.get(&batch[i as usize].asset) {
                        Some(e) => {
                            full |= e.inbox_len() >= MAX_INBOX_PER_TWIN;
                            targets[i as usize] = Some(e.clone());
                        }
                        None => unknown += 1,
                    }
                }
            });
        }
        if full {
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
        let accepted = n - unknown as usize;
        self.metrics
            .readings_received
            .fetch_add(accepted as u64, Ordering::Relaxed);
        self.metrics.batches_routed.fetch_add(1, Ordering::Relaxed);
        self.inflight.fetch_add(accepted, Ordering::AcqRel);
        let now_us = Timestamp::now().0;
        // Machine states go on the machine's sample board before any reading is delivered:
        // a sensor twin draining a reading of this batch must judge it in the state the
        // machine was in at that instant, not in the one its twin has applied so far.
        // (A PLC's own state values mean a state by the machine type's `state_map`, as the
        // twin reads them; one that means none is refused there.)
        for (r, target) in batch.iter().zip(&targets) {
            if r.property == Property::State
                && let Some(entry) = target
                && let Some(board) = &entry.board
                && let AssetKind::Machine { spec, .. } = &entry.def.kind
                && let Some(code) = spec.state_code(r.value)
            {
                board.note_state(code, r.source_ts, Timestamp(now_us), self.clock);
            }
        }
        // Pass 2: deliver, in batch order (a twin sees its readings in source order).
        let mut removed = 0usize;
        for (r, target) in batch.iter().zip(targets) {
            let Some(mut entry) = target else { continue };
            loop {
                entry.last_seen_us.store(now_us, Ordering::Relaxed);
                match entry.deliver(std::slice::from_ref(r)) {
                    // With no actor (between a crash and its restart) the readings wait in
                    // the inbox; the restarted twin drains them.
                    Delivery::Tell => {
                        if !entry.send(TwinMsg::Drain) {
                            entry.unschedule();
                        }
                    }
                    Delivery::Queued => {}
                    // A live apply replaced the entry since pass 1 (the reading goes to the
                    // new one) or removed the asset (counted; its credit comes back).
                    Delivery::Retired => match self.registry.get(&r.asset) {
                        Some(next) if !Arc::ptr_eq(&next, &entry) => {
                            entry = next;
                            continue;
                        }
                        _ => removed += 1,
                    },
                }
                break;
            }
        }
        if removed > 0 {
            self.inflight.fetch_sub(removed, Ordering::AcqRel);
            self.metrics
                .removed_asset
                .fetch_add(removed as u64, Ordering::Relaxed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use ferrotwin_models::{AssetPath, Property, Timestamp, Value};

    use super::*;

    /// A registry of one line with one machine and two sensors, and no actors: nothing
    /// drains, so what the router holds is exactly what it accepted.
    fn router(max_inflight: usize) -> (IngestRouter, Arc<Registry>) {
        let (_, registry) = crate::registry::fixture::one_machine(&["a", "b"]);
        let metrics = Arc::new(Metrics::default());
        let credits = Credits(Arc::new(AtomicUsize::new(0)));
        (
            IngestRouter::new(registry.clone(), metrics, credits, max_inflight),
            registry,
        )
    }

    fn reading(path: &str) -> Reading {
        let id = AssetPath::parse(path).expect("path").id();
        Reading::good(
            id,
            Property::Value,
            Value::Float(1.0),
            Timestamp::from_millis(1),
        )
    }

    #[test]
    fn a_batch_beyond_the_inflight_budget_comes_back_untouched() {
        let (r, _) = router(8);
        let five: Vec<Reading> = (0..5).map(|_| reading("e/s/a/l/m1/a")).collect();
        r.try_push(five.clone()).expect("within budget");
        assert_eq!(r.inflight(), 5);
        let err = r.try_push(five.clone()).expect_err("over budget");
        assert_eq!(err.why, PushBackReason::Busy);
        assert_eq!(err.batch, five);
        assert_eq!(r.inflight(), 5, "nothing of the refused batch was taken");
    }

    #[test]
    fn a_full_twin_inbox_pushes_back_the_whole_batch() {
        let (r, registry) = router(1 << 20);
        let full: Vec<Reading> = (0..MAX_INBOX_PER_TWIN)
            .map(|_| reading("e/s/a/l/m1/a"))
            .collect();
        r.try_push(full).expect("fills the inbox");
        let mixed = vec![reading("e/s/a/l/m1/b"), reading("e/s/a/l/m1/a")];
        let err = r.try_push(mixed).expect_err("a is full");
        assert_eq!(err.why, PushBackReason::Busy);
        let b = registry
            .by_path(&AssetPath::parse("e/s/a/l/m1/b").expect("path"))
            .expect("entry");
        assert_eq!(b.inbox_len(), 0, "b got nothing of the refused batch");
    }

    #[test]
    fn readings_for_unknown_assets_are_counted_and_the_rest_delivered() {
        let (r, registry) = router(100);
        r.try_push(vec![reading("e/s/a/l/m1/a"), reading("e/s/a/l/nope")])
            .expect("taken");
        assert_eq!(r.metrics.unknown_asset.load(Ordering::Relaxed), 1);
        let a = registry
            .by_path(&AssetPath::parse("e/s/a/l/m1/a").expect("path"))
            .expect("entry");
        assert_eq!(a.inbox_len(), 1);
    }

    #[test]
    fn a_reading_for_a_retired_entry_goes_to_its_successor_or_is_counted_as_removed() {
        let (r, registry) = router(100);
        let a = registry
            .by_path(&AssetPath::parse("e/s/a/l/m1/a").expect("path"))
            .expect("entry");
        // Replaced: the new entry of the same path takes it.
        let next = registry.insert(a.def.clone(), a.snapshot().as_ref().clone(), 0);
        a.retire();
        r.try_push(vec![reading("e/s/a/l/m1/a")]).expect("taken");
        assert_eq!((a.inbox_len(), next.inbox_len()), (0, 1));
        // Retired and not replaced (removed while the reading was on its way): counted,
        // and its credit returned.
        next.retire();
        r.try_push(vec![reading("e/s/a/l/m1/a")]).expect("taken");
        assert_eq!(r.metrics.removed_asset.load(Ordering::Relaxed), 1);
        assert_eq!(r.inflight(), 1, "only the reading next holds is in flight");
        // Gone from the registry: unknown, as any asset the plant does not have.
        registry.remove(next.path()).expect("there");
        r.try_push(vec![reading("e/s/a/l/m1/a")]).expect("taken");
        assert_eq!(r.metrics.unknown_asset.load(Ordering::Relaxed), 1);
    }
}
