//! Fan-out of twin changes and events to watchers (gRPC `Watch`, the benchmark).
//!
//! Each watcher registers the subtree it watches and gets a bounded queue of its own: a
//! change is offered only to the watchers whose subtree holds it, so a watcher of one line
//! costs nothing for the rest of the plant. Twins never wait: `try_send` on a full queue
//! counts the change as missed, and the watcher, seeing the count, tells its client it
//! lagged and resyncs from a fresh snapshot (the coalesced latest value of every asset).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use ferrotwin_models::{AssetPath, Event};
use tokio::sync::mpsc;

use crate::core::TwinSnapshot;
use crate::registry::TwinEntry;

#[derive(Clone)]
pub enum Change {
    Twin(Arc<TwinEntry>, Arc<TwinSnapshot>),
    Event(Arc<Event>),
    /// A live apply changed the plant at this path: clients re-browse it.
    Model(Arc<ModelChange>),
}

/// One line of an applied plant change, as watchers are told of it.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelChange {
    pub version: u64,
    pub path: AssetPath,
    /// "added", "removed" or "changed".
    pub op: &'static str,
    pub detail: String,
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

/// The watchers, with an index by subtree: a change is offered to the watchers of its own
/// path and its ancestors (a handful of lookups), not checked against every watcher, so 50
/// open pages cost the twins about what one does.
#[derive(Default)]
struct Subs {
    list: Vec<Sub>,
    /// Subtree path → indexes into `list`; `everything`: watchers of the whole plant.
    by_prefix: HashMap<String, Vec<usize>>,
    everything: Vec<usize>,
}

/// Up to this many watchers a plain scan is cheaper than the index's lookups.
const SCAN_AT_MOST: usize = 8;

impl Subs {
    fn reindex(&mut self) {
        self.by_prefix.clear();
        self.everything.clear();
        for (i, s) in self.list.iter().enumerate() {
            match &s.prefix {
                Some(p) => self.by_prefix.entry(p.to_string()).or_default().push(i),
                None => self.everything.push(i),
            }
        }
    }
}

pub struct WatchHub {
    subs: RwLock<Subs>,
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
        subs.list.retain(|s| s.id != self.id);
        subs.reindex();
        self.hub.count.store(subs.list.len(), Ordering::Release);
    }
}

impl WatchHub {
    pub fn new(capacity: usize) -> WatchHub {
        WatchHub {
            subs: RwLock::new(Subs::default()),
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
        subs.list.push(Sub {
            id,
            prefix,
            max_depth,
            events,
            tx,
            missed: missed.clone(),
        });
        subs.reindex();
        self.count.store(subs.list.len(), Ordering::Release);
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
        let deliver = |s: &Sub| {
            if (is_event && !s.events) || (!is_event && s.max_depth.is_some_and(|d| depth > d)) {
                return;
            }
            if s.tx.try_send(change()).is_err() {
                s.missed.fetch_add(1, Ordering::AcqRel);
            }
        };
        if subs.list.len() <= SCAN_AT_MOST {
            for s in &subs.list {
                if s.prefix.as_ref().is_none_or(|p| path.starts_with(p)) {
                    deliver(s);
                }
            }
            return;
        }
        for &i in &subs.everything {
            deliver(&subs.list[i]);
        }
        // The path itself and each ancestor: every subtree that holds it.
        let p = path.as_str();
        let ends = p
            .char_indices()
            .filter(|&(_, c)| c == '/')
            .map(|(i, _)| i)
            .chain(std::iter::once(p.len()));
        for end in ends {
            if let Some(idx) = subs.by_prefix.get(&p[..end]) {
                for &i in idx {
                    deliver(&subs.list[i]);
                }
            }
        }
    }

    pub fn twin(&self, entry: Arc<TwinEntry>, snapshot: Arc<TwinSnapshot>) {
        let path = entry.path().clone();
        self.offer(&path, false, || {
            Change::Twin(entry.clone(), snapshot.clone())
        });
    }

    /// Offers a plant change to every watcher whose subtree holds its path or lies under it
    /// (a watcher inside a removed subtree hears of it), events or not, at any depth. Rare:
    /// a plain scan.
    pub fn model(&self, change: Arc<ModelChange>) {
        if self.count.load(Ordering::Acquire) == 0 {
            return;
        }
        let subs = self.subs.read().expect("watch lock is never poisoned");
        for s in &subs.list {
            let touches = s
                .prefix
                .as_ref()
                .is_none_or(|p| change.path.starts_with(p) || p.starts_with(&change.path));
            if touches && s.tx.try_send(Change::Model(change.clone())).is_err() {
                s.missed.fetch_add(1, Ordering::AcqRel);
            }
        }
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

#[cfg(test)]
mod tests {
    use ferrotwin_models::{EventKind, Severity, Timestamp};

    use super::*;

    fn event(path: &str) -> Arc<Event> {
        Arc::new(Event::new(
            AssetPath::parse(path).expect("path"),
            Timestamp(1),
            EventKind::Lifecycle,
            Severity::Info,
            "x",
        ))
    }

    /// With more watchers than a scan serves, the index offers a change to exactly the
    /// watchers whose subtree holds it (a path boundary is a `/`: `a/b` does not hold `a/bc`).
    #[test]
    fn the_subtree_index_offers_a_change_to_exactly_the_watchers_that_hold_it() {
        let hub = Arc::new(WatchHub::new(64));
        let prefixes = [
            None,
            Some("acme"),
            Some("acme/b"),
            Some("acme/bc"),
            Some("acme/b/area"),
            Some("acme/b/area/line-1"),
            Some("acme/b/area/line-10"),
            Some("acme/x"),
            Some("acme/b/area/line-1/m-1"),
            Some("acme/b/area/line-1/m-1/temp"),
        ];
        let mut ws: Vec<(Option<&str>, Watcher)> = prefixes
            .iter()
            .map(|p| {
                let prefix = p.map(|p| AssetPath::parse(p).expect("prefix"));
                (*p, hub.subscribe(prefix, true))
            })
            .collect();
        assert!(ws.len() > SCAN_AT_MOST);
        hub.event(event("acme/b/area/line-1/m-1/temp"));
        for (p, w) in &mut ws {
            let got = w.rx.try_recv().is_ok();
            let want = !matches!(p, Some("acme/bc" | "acme/b/area/line-10" | "acme/x"));
            assert_eq!(got, want, "watcher of {p:?}");
        }
        // A plant change: to the watchers above it and inside it, not beside it.
        hub.model(Arc::new(ModelChange {
            version: 2,
            path: AssetPath::parse("acme/b/area/line-1").expect("path"),
            op: "removed",
            detail: "line".into(),
        }));
        for (p, w) in &mut ws {
            let got = matches!(w.rx.try_recv(), Ok(Change::Model(_)));
            let want = !matches!(p, Some("acme/bc" | "acme/b/area/line-10" | "acme/x"));
            assert_eq!(got, want, "watcher of {p:?}");
        }
        // A watcher dropped: the others keep their places.
        let (_, gone) = ws.remove(1);
        drop(gone);
        hub.event(event("acme/x/y"));
        for (p, w) in &mut ws {
            let got = w.rx.try_recv().is_ok();
            assert_eq!(got, matches!(p, None | Some("acme/x")), "watcher of {p:?}");
        }
    }
}
