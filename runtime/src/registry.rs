//! Registry of live twins: id → entry for O(1) routing, path index for prefix browsing.
//!
//! An entry outlives the actor it names: a crashed twin is restarted into the same entry, so
//! its latest published snapshot, pending counter and route survive the crash. Routing a
//! reading is one hash lookup here; it never walks the asset tree.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use ferrotwin_models::spec::{AssetDef, AssetKind};
use ferrotwin_models::{AssetId, AssetPath, Level, Reading, Timestamp};
use ractor::ActorRef;

use crate::core::ClockRules;
use crate::core::HistPoint;
use crate::core::{TwinMsg, TwinSnapshot};

/// One asset known to the runtime.
pub struct TwinEntry {
    pub id: AssetId,
    pub def: AssetDef,
    actor: Mutex<Option<ActorRef<TwinMsg>>>,
    /// Readings routed here and not yet taken by the twin. The router appends; the twin
    /// takes them all on `TwinMsg::Drain`. Under load one message carries every reading
    /// that arrived while the twin was busy. Bounded by `MAX_INBOX_PER_TWIN`; it survives
    /// a crash of the twin (the restarted twin drains it).
    inbox: Mutex<Vec<Reading>>,
    /// Readings in `inbox`, readable without its lock (the router's room check).
    queued: AtomicU32,
    /// A `Drain` is on its way (or being handled): the router need not send another.
    scheduled: AtomicBool,
    /// Wall-clock µs of the last reading routed here (staleness sweeper).
    pub last_seen_us: AtomicI64,
    /// Set by the twin when it turned stale, cleared on the next reading.
    pub stale: AtomicBool,
    snapshot: Mutex<Arc<TwinSnapshot>>,
    dirty: AtomicBool,
    /// A sensor's readings not yet written as a history chunk. Here rather than in the
    /// actor so that a crash does not lose them and readers need not ask the twin.
    pub tail: Mutex<HistTail>,
    /// Machines: the latest value of each of its sensors, written by the sensor twins, read
    /// by the machine's detectors (no message per reading). `None` for other levels.
    pub board: Option<Box<SampleBoard>>,
}

/// A machine's sample board: its sensors write their latest value here (in the machine
/// type's sensor order) and the machine reads them all at each evaluation. The sensor whose
/// reading crosses the next evaluation instant (source time) sends the machine one
/// `Evaluate`: detectors run about once per `interval` of source time, at any ingest rate.
pub struct SampleBoard {
    /// f64 bits; NaN = no usable value (none yet, bad, stale).
    values: Box<[AtomicU64]>,
    /// The machine's recent states as sensor detectors read them (their regime): a twin
    /// still applying older readings while the router notes newer states must find the
    /// state at its reading's time, even across a few quick changes.
    regime: Mutex<RegimeLog>,
    /// Source time (µs) at or after which the next evaluation is due.
    next_eval_us: AtomicI64,
    /// Bit `i`: sensor `i` wrote since the last evaluation (the first 64 sensors).
    fresh: AtomicU64,
    /// `fresh` when every sensor wrote.
    all: u64,
}

impl SampleBoard {
    pub fn new(sensors: usize) -> SampleBoard {
        SampleBoard {
            values: (0..sensors)
                .map(|_| AtomicU64::new(f64::NAN.to_bits()))
                .collect(),
            regime: Mutex::new(RegimeLog::default()),
            next_eval_us: AtomicI64::new(i64::MIN),
            fresh: AtomicU64::new(0),
            all: if sensors >= 64 {
                u64::MAX
            } else {
                (1u64 << sensors) - 1
            },
        }
    }

    /// Records sensor `index`'s value (NaN = unusable). Returns true when the caller should
    /// send the machine an `Evaluate` for `ts`: once the due instant has passed and every
    /// sensor wrote since the last evaluation (so the machine sees one instant, not a mix of
    /// this reading and its siblings' previous ones), or one interval later regardless (a
    /// sensor that stopped reporting must not stop the evaluations). One writer wins.
    pub fn write(&self, index: usize, value: f64, ts: Timestamp, interval_us: i64) -> bool {
        if let Some(slot) = self.values.get(index) {
            slot.store(value.to_bits(), Ordering::Relaxed);
        }
        let bit = if index < 64 { 1u64 << index } else { 0 };
        let fresh = self.fresh.fetch_or(bit, Ordering::AcqRel) | bit;
        let due = self.next_eval_us.load(Ordering::Relaxed);
        // A source clock that stepped back far would otherwise stop evaluations until it
        // caught up again: take its time as the new schedule.
        let stepped_back = due != i64::MIN && due - ts.0 > interval_us.saturating_mul(10);
        let complete = fresh & self.all == self.all;
        let overdue = ts.0 >= due.saturating_add(interval_us);
        let due_now = stepped_back || overdue || (ts.0 >= due && complete);
        if !due_now {
            return false;
        }
        self.next_eval_us
            .compare_exchange(
                due,
                ts.0.saturating_add(interval_us),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok_and(|_| {
                // Only the bits this evaluation saw: a sibling's write that landed since
                // counts for the next one.
                self.fresh.fetch_and(!fresh, Ordering::AcqRel);
                true
            })
    }

    /// The latest value of every sensor, into `out` (cleared first).
    pub fn read(&self, out: &mut Vec<f64>) {
        out.clear();
        out.extend(
            self.values
                .iter()
                .map(|v| f64::from_bits(v.load(Ordering::Relaxed))),
        );
    }

    /// Records a machine state reading (code 0..=3; others ignored) at source time `ts`,
    /// under the machine twin's own clock rules: from further ahead of `now` than the skew
    /// allows, ignored (the twin refuses it too); older than the current state's start,
    /// ignored as late, unless by more than the step-back limit (the source's clock went
    /// back: taken as current, as the twin does).
    pub fn note_state(&self, code: i64, ts: Timestamp, now: Timestamp, clock: ClockRules) {
        let Ok(code) = u8::try_from(code) else {
            return;
        };
        if code > 3 || ts.millis_since(now) > clock.max_future_skew_ms {
            return;
        }
        let mut log = self.regime.lock().expect("regime lock is never poisoned");
        if let Some((cur, since)) = log.current() {
            if ts < since && since.millis_since(ts) <= clock.clock_step_back_ms {
                return;
            }
            if ts < since {
                // The source's clock went back: what was noted after it is void.
                log.clear();
            } else if cur == code {
                return;
            }
        }
        log.push(code, ts);
    }

    /// The machine's state code at source time `ts` (255 = unknown): the newest noted state
    /// that began at or before `ts`.
    pub fn regime_at(&self, ts: Timestamp) -> u8 {
        self.regime
            .lock()
            .expect("regime lock is never poisoned")
            .at(ts)
    }
}

/// The last few state changes of a machine, oldest first (bounded: `REGIME_LOG`).
#[derive(Default)]
struct RegimeLog {
    changes: std::collections::VecDeque<(u8, Timestamp)>,
}

const REGIME_LOG: usize = 8;

impl RegimeLog {
    fn current(&self) -> Option<(u8, Timestamp)> {
        self.changes.back().copied()
    }

    fn clear(&mut self) {
        self.changes.clear();
    }

    fn push(&mut self, code: u8, since: Timestamp) {
        if self.changes.len() == REGIME_LOG {
            self.changes.pop_front();
        }
        self.changes.push_back((code, since));
    }

    fn at(&self, ts: Timestamp) -> u8 {
        self.changes
            .iter()
            .rev()
            .find(|(_, since)| *since <= ts)
            // Before the oldest change kept: unknown (detectors keep that regime apart).
            .map_or(u8::MAX, |(code, _)| *code)
    }
}

/// The unwritten end of a sensor's history.
#[derive(Debug, Default)]
pub struct HistTail {
    pub points: Vec<HistPoint>,
    /// Server time the first of `points` arrived (chunk age is server time: a source clock
    /// far behind must not turn every reading into a chunk of its own).
    pub since: Timestamp,
}

impl TwinEntry {
    pub fn path(&self) -> &AssetPath {
        &self.def.path
    }

    pub fn level(&self) -> Level {
        self.def.kind.level()
    }

    pub fn actor(&self) -> Option<ActorRef<TwinMsg>> {
        self.actor
            .lock()
            .expect("entry lock is never poisoned")
            .clone()
    }

    /// Sends `msg` to the twin's actor; false if there is none (restarting) or it is gone.
    pub fn send(&self, msg: TwinMsg) -> bool {
        self.actor
            .lock()
            .expect("entry lock is never poisoned")
            .as_ref()
            .is_some_and(|a| a.cast(msg).is_ok())
    }

    pub fn set_actor(&self, actor: Option<ActorRef<TwinMsg>>) {
        *self.actor.lock().expect("entry lock is never poisoned") = actor;
    }

    /// Readings waiting in the inbox.
    pub fn inbox_len(&self) -> usize {
        self.queued.load(Ordering::Acquire) as usize
    }

    /// Appends readings; true if the twin must be told (no `Drain` is on its way).
    pub fn deliver(&self, readings: &[Reading]) -> bool {
        let mut inbox = self.inbox.lock().expect("inbox lock is never poisoned");
        inbox.extend_from_slice(readings);
        self.queued.store(inbox.len() as u32, Ordering::Release);
        drop(inbox);
        !self.scheduled.swap(true, Ordering::AcqRel)
    }

    /// Takes every waiting reading. Clears `scheduled` first, so readings delivered after
    /// the take send a new `Drain`: none is left behind.
    pub fn take_inbox(&self) -> Vec<Reading> {
        self.scheduled.store(false, Ordering::Release);
        let mut inbox = self.inbox.lock().expect("inbox lock is never poisoned");
        self.queued.store(0, Ordering::Release);
        std::mem::take(&mut *inbox)
    }

    /// After a (re)start: if readings wait, tell the new actor.
    ///
    /// A `Drain` that was in the dead actor's mailbox is lost with it, and `scheduled` may
    /// still say one is on its way: reset it first, then schedule anew if readings wait.
    /// (A delivery racing with this either sees `scheduled` false and sends its own
    /// `Drain`, or left its readings in the inbox before the check below.)
    pub fn kick(&self, actor: &ActorRef<TwinMsg>) {
        self.scheduled.store(false, Ordering::Release);
        if self.inbox_len() > 0 && !self.scheduled.swap(true, Ordering::AcqRel) {
            let _ = actor.cast(TwinMsg::Drain);
        }
    }

    /// A `Drain` could not be sent (no actor, or a dead one): the next delivery or the
    /// restart's `kick` must send one.
    pub fn unschedule(&self) {
        self.scheduled.store(false, Ordering::Release);
    }

    /// A copy of the unwritten history tail.
    pub fn tail_points(&self) -> Vec<HistPoint> {
        self.tail
            .lock()
            .expect("tail lock is never poisoned")
            .points
            .clone()
    }

    /// The latest state the twin published.
    pub fn snapshot(&self) -> Arc<TwinSnapshot> {
        self.snapshot
            .lock()
            .expect("entry lock is never poisoned")
            .clone()
    }

    /// Stale threshold of a sensor, 0 for other levels.
    pub fn stale_after_ms(&self) -> u64 {
        match &self.def.kind {
            AssetKind::Sensor { spec, .. } => spec.stale_after_ms(),
            _ => 0,
        }
    }
}

/// Hasher for asset ids: they are UUID v5 (SHA-1 output), already uniformly random, so the
/// first 8 bytes are the hash. SipHash over 16 bytes per reading was a visible share of the
/// router's time.
#[derive(Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8).take(1) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }

    fn write_usize(&mut self, _len: usize) {
        // Slice length prefix: always 16 for an id, carries no information.
    }
}

pub type IdMap<V> = HashMap<AssetId, V, std::hash::BuildHasherDefault<IdHasher>>;

/// Stripes of the id map: the router takes a read lock per batch, spawns take write locks.
const SHARDS: usize = 16;

#[derive(Default)]
pub struct Registry {
    by_id: [RwLock<IdMap<Arc<TwinEntry>>>; SHARDS],
    by_path: RwLock<BTreeMap<AssetPath, Arc<TwinEntry>>>,
    /// Entries whose snapshot changed since the store writer last took them.
    dirty: Mutex<Vec<Arc<TwinEntry>>>,
    /// Enterprise role: mirrors are persisted from their site's records (in replication
    /// order, with the cursor), never from what the actors publish, which may lag behind.
    mirrors_only: std::sync::atomic::AtomicBool,
}

fn shard(id: &AssetId) -> usize {
    // The last byte: independent of the bytes `IdHasher` uses.
    usize::from(id.as_bytes()[15]) % SHARDS
}

impl Registry {
    /// Adds (or replaces) the entry of an asset with its initial snapshot.
    pub fn insert(&self, def: AssetDef, snapshot: TwinSnapshot, now_us: i64) -> Arc<TwinEntry> {
        let id = def.path.id();
        let board = match &def.kind {
            AssetKind::Machine { spec, .. } => Some(Box::new(SampleBoard::new(spec.sensors.len()))),
            _ => None,
        };
        let entry = Arc::new(TwinEntry {
            id,
            def,
            actor: Mutex::new(None),
            inbox: Mutex::new(Vec::new()),
            queued: AtomicU32::new(0),
            scheduled: AtomicBool::new(false),
            last_seen_us: AtomicI64::new(now_us),
            stale: AtomicBool::new(false),
            snapshot: Mutex::new(Arc::new(snapshot)),
            dirty: AtomicBool::new(false),
            tail: Mutex::new(HistTail::default()),
            board,
        });
        self.by_id[shard(&id)]
            .write()
            .expect("registry lock is never poisoned")
            .insert(id, entry.clone());
        self.by_path
            .write()
            .expect("registry lock is never poisoned")
            .insert(entry.path().clone(), entry.clone());
        entry
    }

    pub fn remove(&self, path: &AssetPath) -> Option<Arc<TwinEntry>> {
        let e = self
            .by_path
            .write()
            .expect("registry lock is never poisoned")
            .remove(path)?;
        self.by_id[shard(&e.id)]
            .write()
            .expect("registry lock is never poisoned")
            .remove(&e.id);
        Some(e)
    }

    pub fn get(&self, id: &AssetId) -> Option<Arc<TwinEntry>> {
        self.by_id[shard(id)]
            .read()
            .expect("registry lock is never poisoned")
            .get(id)
            .cloned()
    }

    pub fn by_path(&self, path: &AssetPath) -> Option<Arc<TwinEntry>> {
        self.by_path
            .read()
            .expect("registry lock is never poisoned")
            .get(path)
            .cloned()
    }

    pub fn len(&self) -> usize {
        self.by_path
            .read()
            .expect("registry lock is never poisoned")
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` on each id → entry map shard under its read lock (the router groups a batch
    /// per shard this way, one lock per shard per batch).
    pub fn with_shard<R>(&self, i: usize, f: impl FnOnce(&IdMap<Arc<TwinEntry>>) -> R) -> R {
        f(&self.by_id[i]
            .read()
            .expect("registry lock is never poisoned"))
    }

    pub const SHARDS: usize = SHARDS;

    pub fn shard_of(id: &AssetId) -> usize {
        shard(id)
    }

    /// Entries at or below `prefix` (all when `None`), in path order, strictly after `after`,
    /// at most `limit`, keeping those `keep` accepts. Returns the entries and whether more remain.
    pub fn scan(
        &self,
        prefix: Option<&AssetPath>,
        after: Option<&AssetPath>,
        limit: usize,
        mut keep: impl FnMut(&TwinEntry) -> bool,
    ) -> (Vec<Arc<TwinEntry>>, bool) {
        let map = self
            .by_path
            .read()
            .expect("registry lock is never poisoned");
        let start = match (after, prefix) {
            (Some(a), _) => Bound::Excluded(a.clone()),
            (None, Some(p)) => Bound::Included(p.clone()),
            (None, None) => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for (path, e) in map.range((start, Bound::Unbounded)) {
            if let Some(p) = prefix {
                // Paths sort so that a subtree is contiguous after its root, except that
                // "a/b-x" sorts between "a/b" and "a/b/c"; skip those, stop past the subtree.
                if !path.starts_with(p) {
                    if path.as_str().starts_with(p.as_str()) {
                        continue;
                    }
                    break;
                }
            }
            if keep(e) {
                if out.len() == limit {
                    return (out, true);
                }
                out.push(e.clone());
            }
        }
        (out, false)
    }

    /// Publishes a twin's new state and queues it for the store.
    pub fn publish(&self, entry: &Arc<TwinEntry>, snapshot: Arc<TwinSnapshot>) {
        *entry.snapshot.lock().expect("entry lock is never poisoned") = snapshot;
        // Roll-ups of lines and above are derived, rebuilt from children at start: not stored.
        if !matches!(entry.level(), Level::Sensor | Level::Machine)
            || self.mirrors_only.load(Ordering::Relaxed)
        {
            return;
        }
        if !entry.dirty.swap(true, Ordering::AcqRel) {
            self.dirty
                .lock()
                .expect("dirty lock is never poisoned")
                .push(entry.clone());
        }
    }

    /// Enterprise role: published snapshots are not queued for the store (see `mirrors_only`).
    pub fn set_mirrors_only(&self) {
        self.mirrors_only.store(true, Ordering::Relaxed);
    }

    /// Takes every dirty entry, clearing the flags first so a concurrent publish re-queues.
    pub fn take_dirty(&self) -> Vec<Arc<TwinEntry>> {
        let v = std::mem::take(&mut *self.dirty.lock().expect("dirty lock is never poisoned"));
        for e in &v {
            e.dirty.store(false, Ordering::Release);
        }
        v
    }

    /// Puts entries taken by `take_dirty` back, ahead of newer ones (they were not written).
    pub fn requeue_dirty(&self, entries: Vec<Arc<TwinEntry>>) {
        let mut dirty = self.dirty.lock().expect("dirty lock is never poisoned");
        let newer = std::mem::take(&mut *dirty);
        for e in entries {
            if !e.dirty.swap(true, Ordering::AcqRel) {
                dirty.push(e);
            }
        }
        dirty.extend(newer);
    }

    pub fn dirty_len(&self) -> usize {
        self.dirty
            .lock()
            .expect("dirty lock is never poisoned")
            .len()
    }

    /// Every entry (for sweeps); a copy of the Arcs, taken under one lock.
    pub fn all(&self) -> Vec<Arc<TwinEntry>> {
        self.by_path
            .read()
            .expect("registry lock is never poisoned")
            .values()
            .cloned()
            .collect()
    }

    pub fn children_of(&self, path: &AssetPath) -> Vec<Arc<TwinEntry>> {
        let depth = path.depth() + 1;
        self.scan(Some(path), None, usize::MAX, |e| e.path().depth() == depth)
            .0
    }
}
