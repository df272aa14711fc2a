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
    pub(crate) last_seen_us: AtomicI64,
    /// Set by the twin when it turned stale, cleared on the next reading.
    pub(crate) stale: AtomicBool,
    snapshot: Mutex<Arc<TwinSnapshot>>,
    dirty: AtomicBool,
    /// A sensor's readings not yet written as a history chunk. Here rather than in the
    /// actor so that a crash does not lose them and readers need not ask the twin.
    pub(crate) tail: Mutex<HistTail>,
    /// Machines: the latest value of each of its sensors, written by the sensor twins, read
    /// by the machine's detectors (no message per reading). `None` for other levels.
    pub(crate) board: Option<Box<SampleBoard>>,
    /// A live apply removed this asset or replaced its entry: nothing is delivered here any
    /// more (set under the inbox lock, so a delivery either landed before it or sees it).
    retired: AtomicBool,
}

/// What a delivery to an inbox did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Appended, and the twin must be told (no `Drain` is on its way).
    Tell,
    /// Appended; a `Drain` is on its way already.
    Queued,
    /// Not appended: the entry was retired by a live apply (look the id up again).
    Retired,
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
    /// The machine runs rules that watch its sensors' alarms: the sensor twins tell it of
    /// every alarm change (`TwinMsg::SensorAlarm`). Set by the machine's twin.
    pub(crate) watches_alarms: AtomicBool,
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
            watches_alarms: AtomicBool::new(false),
            all: if sensors >= 64 {
                u64::MAX
            } else {
                (1u64 << sensors) - 1
            },
        }
    }

    /// Takes over what `old` (the board of the same machine before a live apply changed its
    /// type) holds: each sensor's latest value by `map` (old index → new index), the machine's
    /// recent states and the next evaluation's time, so detectors and models go on.
    pub fn take_over(&self, old: &SampleBoard, map: &[(usize, usize)]) {
        for &(from, to) in map {
            if let (Some(v), Some(slot)) = (old.values.get(from), self.values.get(to)) {
                slot.store(v.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
        let log = old.regime.lock().expect("regime lock is never poisoned");
        let mut mine = self.regime.lock().expect("regime lock is never poisoned");
        mine.changes = log.changes.clone();
        mine.forgot = log.forgot;
        self.next_eval_us
            .store(old.next_eval_us.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// Records sensor `index`'s value (NaN = unusable). Returns true when the caller should
    /// send the machine an `Evaluate` for `ts`: once the due instant has passed and every
    /// sensor wrote since the last evaluation (so the machine sees one instant, not a mix of
    /// this reading and its siblings' previous ones), or one interval later regardless (a
    /// sensor that stopped reporting must not stop the evaluations). One writer wins.
    pub fn write(&self, index: usize, value: f64, ts: Timestamp, interval_us: i64) -> bool {
        // Three steps (each a function so that a test can interleave two writers between
        // them, as concurrent ones may): mark the sensor, find the evaluation due, claim it.
        let fresh = self.mark(index, value);
        self.due(fresh, ts, interval_us)
            .is_some_and(|due| self.claim(due, fresh, ts, interval_us))
    }

    /// Stores sensor `index`'s value and marks it fresh; returns the sensors fresh as this
    /// writer sees them.
    fn mark(&self, index: usize, value: f64) -> u64 {
        if let Some(slot) = self.values.get(index) {
            slot.store(value.to_bits(), Ordering::Relaxed);
        }
        let bit = if index < 64 { 1u64 << index } else { 0 };
        self.fresh.fetch_or(bit, Ordering::AcqRel) | bit
    }

    /// The schedule as this writer found it, if an evaluation is due at `ts` given the
    /// sensors `fresh` saw.
    fn due(&self, fresh: u64, ts: Timestamp, interval_us: i64) -> Option<i64> {
        let due = self.next_eval_us.load(Ordering::Relaxed);
        // A source clock that stepped back far would otherwise stop evaluations until it
        // caught up again: take its time as the new schedule.
        let stepped_back =
            due != i64::MIN && due.saturating_sub(ts.0) > interval_us.saturating_mul(10);
        let complete = fresh & self.all == self.all;
        let overdue = ts.0 >= due.saturating_add(interval_us);
        (stepped_back || overdue || (ts.0 >= due && complete)).then_some(due)
    }

    /// Moves the schedule on from `due` unless another writer already did: one writer wins.
    fn claim(&self, due: i64, fresh: u64, ts: Timestamp, interval_us: i64) -> bool {
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
    /// Older changes were let go (the log was full).
    forgot: bool,
}

const REGIME_LOG: usize = 8;

impl RegimeLog {
    fn current(&self) -> Option<(u8, Timestamp)> {
        self.changes.back().copied()
    }

    fn clear(&mut self) {
        self.changes.clear();
        self.forgot = false;
    }

    fn push(&mut self, code: u8, since: Timestamp) {
        if self.changes.len() == REGIME_LOG {
            self.changes.pop_front();
            self.forgot = true;
        }
        self.changes.push_back((code, since));
    }

    fn at(&self, ts: Timestamp) -> u8 {
        match self.changes.iter().rev().find(|(_, since)| *since <= ts) {
            Some((code, _)) => *code,
            // Before the first state noted: unknown (detectors keep that regime apart).
            None if !self.forgot => u8::MAX,
            // Before the oldest change kept, and older ones were let go: the state then is
            // no longer known (`Regime::LATE`: not judged).
            None => 254,
        }
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

    pub(crate) fn actor(&self) -> Option<ActorRef<TwinMsg>> {
        self.actor
            .lock()
            .expect("entry lock is never poisoned")
            .clone()
    }

    /// Sends `msg` to the twin's actor; false if there is none (restarting) or it is gone.
    pub(crate) fn send(&self, msg: TwinMsg) -> bool {
        self.actor
            .lock()
            .expect("entry lock is never poisoned")
            .as_ref()
            .is_some_and(|a| a.cast(msg).is_ok())
    }

    pub(crate) fn set_actor(&self, actor: Option<ActorRef<TwinMsg>>) {
        *self.actor.lock().expect("entry lock is never poisoned") = actor;
    }

    /// Readings waiting in the inbox.
    pub(crate) fn inbox_len(&self) -> usize {
        self.queued.load(Ordering::Acquire) as usize
    }

    /// Appends readings, unless the entry is retired.
    pub(crate) fn deliver(&self, readings: &[Reading]) -> Delivery {
        let mut inbox = self.inbox.lock().expect("inbox lock is never poisoned");
        if self.retired.load(Ordering::Acquire) {
            return Delivery::Retired;
        }
        inbox.extend_from_slice(readings);
        self.queued.store(inbox.len() as u32, Ordering::Release);
        drop(inbox);
        if self.scheduled.swap(true, Ordering::AcqRel) {
            Delivery::Queued
        } else {
            Delivery::Tell
        }
    }

    /// A live apply removed this asset or gave it a new entry: deliveries from now on are
    /// refused (`Delivery::Retired`); what the inbox holds stays for the twin's last drain.
    pub(crate) fn retire(&self) {
        let _inbox = self.inbox.lock().expect("inbox lock is never poisoned");
        self.retired.store(true, Ordering::Release);
    }

    pub(crate) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    /// Takes every waiting reading. Clears `scheduled` first, so readings delivered after
    /// the take send a new `Drain`: none is left behind.
    pub(crate) fn take_inbox(&self) -> Vec<Reading> {
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
    pub(crate) fn kick(&self, actor: &ActorRef<TwinMsg>) {
        self.scheduled.store(false, Ordering::Release);
        if self.inbox_len() > 0 && !self.scheduled.swap(true, Ordering::AcqRel) {
            let _ = actor.cast(TwinMsg::Drain);
        }
    }

    /// A `Drain` could not be sent (no actor, or a dead one): the next delivery or the
    /// restart's `kick` must send one.
    pub(crate) fn unschedule(&self) {
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
    /// The names of every sensor (a machine's sensors are query fields), computed at the
    /// first query after an insert.
    sensor_names: Mutex<Option<Arc<std::collections::HashSet<String>>>>,
    /// `sensor_names` holds a computed set (an insert must clear it).
    sensor_names_cached: AtomicBool,
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
            retired: AtomicBool::new(false),
        });
        self.by_id[shard(&id)]
            .write()
            .expect("registry lock is never poisoned")
            .insert(id, entry.clone());
        self.by_path
            .write()
            .expect("registry lock is never poisoned")
            .insert(entry.path().clone(), entry.clone());
        // Only once a query computed the names (never during a start's million inserts).
        if entry.level() == Level::Sensor {
            self.forget_sensor_names();
        }
        entry
    }

    /// Takes the entry of `path` out of both indexes (a live apply removed the asset);
    /// the caller retires it.
    pub fn remove(&self, path: &AssetPath) -> Option<Arc<TwinEntry>> {
        let entry = self
            .by_path
            .write()
            .expect("registry lock is never poisoned")
            .remove(path)?;
        let mut shard = self.by_id[shard(&entry.id)]
            .write()
            .expect("registry lock is never poisoned");
        // Only if it is still this entry (an insert may have replaced it since).
        if shard.get(&entry.id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
            shard.remove(&entry.id);
        }
        drop(shard);
        self.forget_sensor_names();
        Some(entry)
    }

    /// Sensor names change with the plant: the next query computes them again.
    fn forget_sensor_names(&self) {
        if self.sensor_names_cached.load(Ordering::Acquire) {
            *self
                .sensor_names
                .lock()
                .expect("registry lock is never poisoned") = None;
            self.sensor_names_cached.store(false, Ordering::Release);
        }
    }

    /// The names sensors have anywhere in the plant.
    pub fn sensor_names(&self) -> Arc<std::collections::HashSet<String>> {
        let mut cached = self
            .sensor_names
            .lock()
            .expect("registry lock is never poisoned");
        self.sensor_names_cached.store(true, Ordering::Release);
        cached
            .get_or_insert_with(|| {
                Arc::new(
                    self.by_path
                        .read()
                        .expect("registry lock is never poisoned")
                        .values()
                        .filter(|e| e.level() == Level::Sensor)
                        .map(|e| e.path().name().to_owned())
                        .collect(),
                )
            })
            .clone()
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

    /// An enterprise's registry: its twins are mirrors (detectors do not learn).
    pub fn is_mirrors_only(&self) -> bool {
        self.mirrors_only.load(Ordering::Relaxed)
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
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use proptest::prelude::*;

    use super::*;

    const INTERVAL_US: i64 = 1_000_000;

    fn at_ms(ms: i64) -> Timestamp {
        Timestamp::from_millis(ms)
    }

    /// A board of `sensors` whose first evaluation happened at `t0_ms` (the first write of
    /// all is due: nothing was evaluated yet).
    fn evaluated_at(sensors: usize, t0_ms: i64) -> SampleBoard {
        let board = SampleBoard::new(sensors);
        assert!(board.write(0, 1.0, at_ms(t0_ms), INTERVAL_US));
        board
    }

    #[test]
    fn the_writer_completing_the_set_past_the_due_instant_evaluates_once() {
        let board = evaluated_at(3, 10_000);
        // Due at 11 s. Before it, even a complete set waits.
        assert!(!board.write(0, 1.0, at_ms(10_400), INTERVAL_US));
        assert!(!board.write(1, 1.0, at_ms(10_500), INTERVAL_US));
        assert!(!board.write(2, 1.0, at_ms(10_999), INTERVAL_US));
        // Past it: the first writer with every sensor written since the last evaluation.
        assert!(board.write(1, 2.0, at_ms(11_000), INTERVAL_US));
        // The next ones (the same instant, or a bit later) do not evaluate again.
        assert!(!board.write(2, 2.0, at_ms(11_000), INTERVAL_US));
        assert!(!board.write(0, 2.0, at_ms(11_100), INTERVAL_US));
        let mut values = Vec::new();
        board.read(&mut values);
        assert_eq!(values, [2.0, 2.0, 2.0]);
    }

    #[test]
    fn past_the_due_instant_an_incomplete_set_waits_for_the_missing_sensor() {
        let board = evaluated_at(3, 10_000);
        assert!(!board.write(0, 1.0, at_ms(11_000), INTERVAL_US));
        assert!(!board.write(1, 1.0, at_ms(11_200), INTERVAL_US));
        assert!(
            board.write(2, 1.0, at_ms(11_300), INTERVAL_US),
            "set complete"
        );
    }

    #[test]
    fn a_sensor_that_stopped_delays_evaluations_by_one_interval_but_does_not_stop_them() {
        let board = evaluated_at(3, 10_000);
        // Sensor 2 is silent; 0 and 1 write every 100 ms for five seconds.
        let mut evaluations = Vec::new();
        for k in 1..=50 {
            let t = 10_000 + k * 100;
            for i in 0..2 {
                if board.write(i, 1.0, at_ms(t), INTERVAL_US) {
                    evaluations.push(t);
                }
            }
        }
        // Due at 11 s, overdue (evaluated without sensor 2) at 12 s; then due at 13 s,
        // overdue at 14 s.
        assert_eq!(evaluations, [12_000, 14_000]);
    }

    #[test]
    fn a_source_clock_that_stepped_back_far_is_taken_as_the_new_schedule() {
        let board = evaluated_at(2, 100_000);
        // Back by less than ten intervals: waits for the schedule (due at 101 s).
        assert!(!board.write(0, 1.0, at_ms(92_000), INTERVAL_US));
        assert!(!board.write(1, 1.0, at_ms(92_000), INTERVAL_US));
        // Further back: evaluated at once, and the schedule follows the new clock.
        assert!(board.write(0, 1.0, at_ms(90_000), INTERVAL_US));
        assert!(
            !board.write(1, 1.0, at_ms(90_000), INTERVAL_US),
            "once per step back"
        );
        assert!(!board.write(0, 1.0, at_ms(90_900), INTERVAL_US));
        assert!(board.write(1, 1.0, at_ms(91_000), INTERVAL_US), "due again");
    }

    #[test]
    fn a_reading_from_the_dawn_of_time_is_a_step_back_not_an_overflow() {
        let board = evaluated_at(2, 100_000);
        // `due - ts` overflowed here (a panic in debug builds) for a PLC's garbage timestamp.
        assert!(board.write(0, 1.0, Timestamp(i64::MIN + 1), INTERVAL_US));
    }

    #[test]
    fn of_two_writers_that_both_found_the_evaluation_due_one_claims_it() {
        let board = evaluated_at(2, 10_000);
        // Both sensors write at 12 s (overdue) and check the schedule before either claims.
        let (seen_by_0, seen_by_1) = (board.mark(0, 1.0), board.mark(1, 1.0));
        let due_0 = board.due(seen_by_0, at_ms(12_000), INTERVAL_US);
        let due_1 = board.due(seen_by_1, at_ms(12_000), INTERVAL_US);
        assert_eq!((due_0, due_1), (Some(11_000_000), Some(11_000_000)));
        assert!(board.claim(11_000_000, seen_by_0, at_ms(12_000), INTERVAL_US));
        assert!(!board.claim(11_000_000, seen_by_1, at_ms(12_000), INTERVAL_US));
    }

    #[test]
    fn one_writer_wins_among_concurrent_writers() {
        // Every round, each thread writes its sensor at the same source time, two intervals
        // after the previous round (overdue for all): exactly one may evaluate per round.
        // The threads spin to start each round together, so that their writes overlap.
        const WRITERS: usize = 2;
        const ROUNDS: usize = 20_000;
        let board = evaluated_at(WRITERS, 0);
        let wins: Vec<AtomicUsize> = (0..ROUNDS).map(|_| AtomicUsize::new(0)).collect();
        let arrived = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for i in 0..WRITERS {
                let (board, wins, arrived) = (&board, &wins, &arrived);
                s.spawn(move || {
                    for (round, won) in wins.iter().enumerate() {
                        arrived.fetch_add(1, Ordering::AcqRel);
                        let mut spins = 0u32;
                        while arrived.load(Ordering::Acquire) < WRITERS * (round + 1) {
                            spins += 1;
                            if spins.is_multiple_of(1024) {
                                // Fewer free cores than threads: let the others arrive.
                                std::thread::yield_now();
                            }
                            std::hint::spin_loop();
                        }
                        let ts = at_ms((round as i64 + 1) * 2_000);
                        if board.write(i, round as f64, ts, INTERVAL_US) {
                            won.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        let wrong: Vec<(usize, usize)> = wins
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .enumerate()
            .filter(|(_, n)| *n != 1)
            .collect();
        assert!(wrong.is_empty(), "(round, evaluations) not one: {wrong:?}");
    }

    #[test]
    fn a_siblings_write_during_an_evaluation_counts_for_the_next_one() {
        let board = evaluated_at(3, 10_000);
        // At 12 s sensor 0 finds the evaluation overdue; sensor 2 writes between its marking
        // and its claim (as a concurrent write may).
        let seen_by_0 = board.mark(0, 1.0);
        let seen_by_2 = board.mark(2, 1.0);
        let due = board
            .due(seen_by_0, at_ms(12_000), INTERVAL_US)
            .expect("overdue");
        assert!(board.claim(due, seen_by_0, at_ms(12_000), INTERVAL_US));
        assert_eq!(
            board.due(seen_by_2, at_ms(12_000), INTERVAL_US),
            None,
            "evaluated already"
        );
        // Due at 13 s: sensor 2 already wrote for it, so 1 and 0 complete the set.
        assert!(!board.write(1, 1.0, at_ms(13_000), INTERVAL_US));
        assert!(
            board.write(0, 1.0, at_ms(13_000), INTERVAL_US),
            "sensor 2's write counted for this evaluation"
        );
    }

    const CLOCK: ClockRules = ClockRules {
        max_future_skew_ms: 5_000,
        clock_step_back_ms: 60_000,
    };

    const RUNNING: i64 = 1;
    const SETUP: i64 = 2;
    const DOWN: i64 = 3;
    const UNKNOWN: u8 = u8::MAX;

    /// Notes `code` at `ts_ms` with the server clock at the same time.
    fn note(board: &SampleBoard, code: i64, ts_ms: i64) {
        board.note_state(code, at_ms(ts_ms), at_ms(ts_ms), CLOCK);
    }

    #[test]
    fn regime_is_the_newest_state_at_or_before_the_time_and_unknown_before_any() {
        let board = SampleBoard::new(1);
        assert_eq!(board.regime_at(at_ms(1_000)), UNKNOWN, "nothing noted");
        note(&board, RUNNING, 1_000);
        note(&board, DOWN, 2_000);
        assert_eq!(board.regime_at(at_ms(999)), UNKNOWN);
        assert_eq!(board.regime_at(at_ms(1_000)), RUNNING as u8);
        assert_eq!(board.regime_at(at_ms(1_999)), RUNNING as u8);
        assert_eq!(board.regime_at(at_ms(2_000)), DOWN as u8);
        assert_eq!(board.regime_at(at_ms(50_000)), DOWN as u8);
    }

    #[test]
    fn a_reading_older_than_the_states_still_remembered_is_late_not_unknown() {
        let board = SampleBoard::new(1);
        for i in 0..=REGIME_LOG as i64 {
            note(
                &board,
                if i % 2 == 0 { RUNNING } else { DOWN },
                1_000 * (i + 1),
            );
        }
        assert_eq!(board.regime_at(at_ms(1_500)), 254, "its state was let go");
        assert_eq!(
            board.regime_at(at_ms(1_000 * (REGIME_LOG as i64 + 1))),
            RUNNING as u8
        );
    }

    #[test]
    fn a_state_from_further_ahead_than_the_skew_allows_is_ignored() {
        let board = SampleBoard::new(1);
        let now = at_ms(100_000);
        board.note_state(RUNNING, at_ms(105_001), now, CLOCK);
        assert_eq!(board.regime_at(at_ms(200_000)), UNKNOWN);
        board.note_state(DOWN, at_ms(105_000), now, CLOCK);
        assert_eq!(
            board.regime_at(at_ms(200_000)),
            DOWN as u8,
            "at the limit: taken"
        );
    }

    #[test]
    fn a_late_state_is_ignored() {
        let board = SampleBoard::new(1);
        note(&board, RUNNING, 100_000);
        // Older than the current state's start, within the step-back limit: late.
        board.note_state(DOWN, at_ms(99_000), at_ms(100_500), CLOCK);
        assert_eq!(board.regime_at(at_ms(99_500)), UNKNOWN);
        assert_eq!(board.regime_at(at_ms(100_500)), RUNNING as u8);
    }

    #[test]
    fn a_source_clock_that_stepped_back_clears_the_log() {
        let board = SampleBoard::new(1);
        note(&board, RUNNING, 100_000);
        note(&board, DOWN, 200_000);
        // Further back than the step-back limit from the current state's start.
        note(&board, SETUP, 139_999);
        assert_eq!(board.regime_at(at_ms(139_999)), SETUP as u8);
        assert_eq!(
            board.regime_at(at_ms(250_000)),
            SETUP as u8,
            "the down state noted before the step back is void"
        );
        assert_eq!(
            board.regime_at(at_ms(120_000)),
            UNKNOWN,
            "the running state too"
        );
    }

    #[test]
    fn the_log_keeps_the_last_eight_changes_and_ignores_repeats_and_unknown_codes() {
        let board = SampleBoard::new(1);
        // Ten changes, one a second, alternating running and down, with a repeat and an
        // invalid code in between (neither takes a place in the log).
        for k in 0..10 {
            let code = if k % 2 == 0 { RUNNING } else { DOWN };
            note(&board, code, k * 1_000);
            note(&board, code, k * 1_000 + 500);
            note(&board, 7, k * 1_000 + 600);
        }
        assert_eq!(REGIME_LOG, 8);
        // The first two changes (0 s, 1 s) fell out: before the oldest kept, no longer
        // known (late).
        assert_eq!(board.regime_at(at_ms(0)), 254);
        assert_eq!(board.regime_at(at_ms(1_999)), 254);
        assert_eq!(board.regime_at(at_ms(2_000)), RUNNING as u8);
        assert_eq!(board.regime_at(at_ms(3_000)), DOWN as u8);
        assert_eq!(board.regime_at(at_ms(9_999)), DOWN as u8);
    }

    /// A write of the property test: a sensor, and a step in source time (ms; negative
    /// steps within the step-back limit, and now and then a far step back).
    fn any_write(sensors: usize) -> impl Strategy<Value = (usize, i64)> {
        (
            0..sensors,
            prop_oneof![
                16 => 0i64..700,
                2 => 1_000i64..5_000,
                2 => -5_000i64..0,
                1 => -60_000i64..-9_000,
            ],
        )
    }

    proptest! {
        #[test]
        fn evaluations_keep_the_schedule_for_any_sequence_of_writes(
            (sensors, writes) in (1usize..6).prop_flat_map(|n| {
                (Just(n), proptest::collection::vec(any_write(n), 1..300))
            }),
        ) {
            // The rules of `write`, as a reference: evaluations are at least an interval
            // apart unless the clock stepped back far; one is due once every sensor wrote
            // past the due instant, and at any write an interval after that.
            let board = SampleBoard::new(sensors);
            let mut t = 1_000_000i64;
            let mut last: Option<i64> = None;
            let mut written = vec![false; sensors];
            for (i, step_ms) in writes {
                t += step_ms * 1000;
                let evaluated = board.write(i, 1.0, Timestamp(t), INTERVAL_US);
                written[i] = true;
                let Some(prev) = last else {
                    prop_assert!(evaluated, "the first write evaluates");
                    last = Some(t);
                    written.fill(false);
                    continue;
                };
                let due = prev + INTERVAL_US;
                let stepped_back = due - t > 10 * INTERVAL_US;
                let overdue = t >= due + INTERVAL_US;
                let complete = t >= due && written.iter().all(|w| *w);
                prop_assert_eq!(
                    evaluated,
                    stepped_back || overdue || complete,
                    "write of sensor {} at {} after an evaluation at {} (written {:?})",
                    i, t, prev, written
                );
                if evaluated {
                    prop_assert!(stepped_back || t - prev >= INTERVAL_US);
                    last = Some(t);
                    written.fill(false);
                }
            }
        }

        #[test]
        fn regime_at_is_the_newest_state_noted_at_or_before_the_time(
            notes in proptest::collection::vec(
                (
                    0i64..5,
                    prop_oneof![
                        6 => 0i64..20_000,
                        2 => -5_000i64..0,
                        1 => -120_000i64..-55_000,
                    ],
                ),
                1..40,
            ),
            queries in proptest::collection::vec(
                (
                    any::<proptest::sample::Index>(),
                    prop_oneof![2 => Just(0i64), 1 => -1i64..=1, 2 => -30_000i64..30_000],
                ),
                1..20,
            ),
        ) {
            // Reference: the changes noted, oldest first. An invalid code is ignored; a
            // state older than the current one's start is late (ignored), or past the
            // step-back limit, a new start; a repeat of the current state is no change.
            let board = SampleBoard::new(1);
            let mut log: Vec<(i64, i64)> = Vec::new();
            let mut noted_at = Vec::new();
            let mut t = 0i64;
            for (code, step_ms) in notes {
                t += step_ms;
                noted_at.push(t);
                note(&board, code, t);
                if code > 3 {
                    continue;
                }
                match log.last().copied() {
                    Some((_, since)) if t < since && since - t <= CLOCK.clock_step_back_ms => {}
                    Some((_, since)) if t < since => log = vec![(code, t)],
                    Some((cur, _)) if cur == code => {}
                    _ => log.push((code, t)),
                }
            }
            // Changes let go of (the reference log restarts at a far step back, as the
            // board's does).
            let forgot = log.len() > REGIME_LOG;
            let kept = &log[log.len().saturating_sub(REGIME_LOG)..];
            // Around the times noted: at them, a millisecond either side, and further off.
            for (i, offset) in queries {
                let q = noted_at[i.index(noted_at.len())] + offset;
                let expected = kept
                    .iter()
                    .rev()
                    .find(|(_, since)| *since <= q)
                    .map_or(if forgot { 254 } else { UNKNOWN }, |(code, _)| *code as u8);
                prop_assert_eq!(board.regime_at(at_ms(q)), expected, "at {} of {:?}", q, kept);
            }
        }
    }
}

/// The smallest plant the runtime's unit tests need: enterprise `e`, site `s`, area `a`, line
/// `l`, one machine `m1` of type `m` with the given sensors, in a registry of initial
/// snapshots and no actors.
#[cfg(test)]
pub(crate) mod fixture {
    use std::sync::Arc;

    use ferrotwin_models::spec::{AssetDef, PlantSpec};

    use super::Registry;
    use crate::core::TwinSnapshot;

    pub(crate) fn one_machine(sensors: &[&str]) -> (Vec<AssetDef>, Arc<Registry>) {
        let sensors: Vec<String> = sensors
            .iter()
            .map(|s| format!("{{ name = \"{s}\" }}"))
            .collect();
        let assets = PlantSpec::from_toml(
            &format!(
                r#"
version = 1
enterprise = "e"
[machine_types.m]
ideal_cycle_ms = 1000
sensors = [{}]
[[sites]]
name = "s"
[[sites.areas]]
name = "a"
[[sites.areas.lines]]
name = "l"
machines = [{{ name = "m1", type = "m" }}]
"#,
                sensors.join(", ")
            ),
            "test plant",
        )
        .expect("the test plant is valid")
        .assets();
        let registry = Arc::new(Registry::default());
        for def in &assets {
            registry.insert(def.clone(), TwinSnapshot::initial(&def.kind), 0);
        }
        (assets, registry)
    }
}
