//! Fan-out of twin changes and events to watchers (gRPC `Watch`, the benchmark).
//!
//! Each watcher registers the subtree it watches and gets a bounded queue of its own: a
//! change is offered only to the watchers whose subtree holds it, so a watcher of one line
//! costs nothing for the rest of the plant. Twins never wait: `try_send` on a full queue
//! counts the change as missed, and the watcher, seeing the count, tells its client it
//! lagged and resyncs from a fresh snapshot (the coalesced latest value of every asset).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ferrotwin_models::{AssetPath, Event};
use tokio::sync::mpsc;

use crate::registry::TwinEntry;
use crate::twin::TwinSnapshot;

#[derive(Clone)]
pub enum Change {
    Twin(Arc<TwinEntry>, Arc<TwinSnapshot>),
    Event(Arc<Event>),
}

/// Default queue per watcher.
pub const WATCH_RING: usize = 16_384;

struct Sub {
    id: u64,
    prefix: Option<AssetPath>,
    /// Twin changes deeper than this are not offered (a page shows a node and its
    /// children: its sensors' changes would only fill its queue). Events are.
    max_depth: Option<usize>,
    events: bool,
    tx: mpsc::Sender<Change>,
    missed: Arc<AtomicU64>,
}

pub struct WatchHub {
    subs: RwLock<Vec<Sub>>,
    /// `subs.len()`, read without the lock on every publish.
    count: AtomicUsize,
    next_id: AtomicU64,
    capacity: usize,
}

/// One watcher's end. Unsubscribes when dropped.
pub struct Watcher {
    hub: Arc<WatchHub>,
    id: u64,
    pub rx: mpsc::Receiver<Change>,
    missed: Arc<AtomicU64>,
}

impl Watcher {
    /// Changes missed since the last call because the queue was full (then resync).
    pub fn take_missed(&self) -> u64 {
        self.missed.swap(0, Ordering::AcqRel)
    }

    /// Drops everything queued (before a resync).
    pub fn clear(&mut self) {
        while self.rx.try_recv().is_ok() {}
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        let mut subs = self.hub.subs.write().expect("watch lock is never poisoned");
        subs.retain(|s| s.id != self.id);
        self.hub.count.store(subs.len(), Ordering::Release);
    }
}

impl WatchHub {
    pub fn new(capacity: usize) -> WatchHub {
        WatchHub {
            subs: RwLock::new(Vec::new()),
            count: AtomicUsize::new(0),
            next_id: AtomicU64::new(1),
            capacity: capacity.max(16),
        }
    }

    /// Watches `prefix` (everything when `None`); `events` also delivers events.
    pub fn subscribe(self: &Arc<Self>, prefix: Option<AssetPath>, events: bool) -> Watcher {
        self.subscribe_within(prefix, None, events)
    }

    /// As `subscribe`, offering twin changes only down to path depth `max_depth`.
    pub fn subscribe_within(
        self: &Arc<Self>,
        prefix: Option<AssetPath>,
        max_depth: Option<usize>,
        events: bool,
    ) -> Watcher {
        let (tx, rx) = mpsc::channel(self.capacity);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let missed = Arc::new(AtomicU64::new(0));
        let mut subs = self.subs.write().expect("watch lock is never poisoned");
        subs.push(Sub {
            id,
            prefix,
            max_depth,
            events,
            tx,
            missed: missed.clone(),
        });
        self.count.store(subs.len(), Ordering::Release);
        Watcher {
            hub: self.clone(),
            id,
            rx,
            missed,
        }
    }

    fn offer(&self, path: &AssetPath, is_event: bool, change: impl Fn() -> Change) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let subs = self.subs.read().expect("watch lock is never poisoned");
        let depth = path.depth();
        for s in subs.iter() {
            if (is_event && !s.events)
                || (!is_event && s.max_depth.is_some_and(|d| depth > d))
                || s.prefix.as_ref().is_some_and(|p| !path.starts_with(p))
            {
                continue;
            }
            if s.tx.try_send(change()).is_err() {
                s.missed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    pub fn twin(&self, entry: Arc<TwinEntry>, snapshot: Arc<TwinSnapshot>) {
        let path = entry.path().clone();
        self.offer(&path, false, || {
            Change::Twin(entry.clone(), snapshot.clone())
        });
    }

    pub fn event(&self, event: Arc<Event>) {
        self.offer(&event.asset, true, || Change::Event(event.clone()));
    }

    /// Queue length of each watcher.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn watchers(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}
