//! The replication outbox: what the enterprise must get, durable before it is sent.
//!
//! The store writer stages one `OutboxBatch` per flush that wrote something (the twin
//! snapshots it wrote and the events it wrote), under the next outbox sequence number, in the
//! same flush as the data itself. A sender reads batches after the enterprise's last ack and
//! trims up to each new ack.
//!
//! Limits: at `max_bytes` the oldest batches lose their twin deltas (kept: their events) and
//! the next flush stages a full snapshot of every twin, so the enterprise's state is never
//! wrong, only coarser. If events alone pass the limit the oldest are dropped, never
//! silently: the next batch carries the dropped range.
//!
//! Crash: a batch and the data it describes reach disk in the same flush; a crash before it
//! can keep one without the other. On open the outbox re-stages every event the store holds
//! past the outbox's high-water mark and a full snapshot, so nothing acked is lost and at
//! worst something is sent twice (the enterprise dedupes events by their site seq and twin
//! state is idempotent).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use std::collections::HashMap;

use ferrotwin_models::{AssetId, QualityCode};
use ferrotwin_proto::store::v1 as rec;
use prost::Message;

use crate::core::HistPoint;
use crate::store::{codec, seq_of};

/// How much of a sensor's history a site replicates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryPolicy {
    /// Every reading, in the chunks the site stores.
    Raw,
    /// One point per `aggregate_window_ms`: the window's mean at its last reading's time,
    /// with the window's worst quality (min, max and last are not carried).
    #[default]
    Aggregated,
    /// No history: the enterprise mirrors the live state and the events only.
    StateOnly,
}

/// `meta` key: highest event seq the outbox has ever held (trimmed or not).
const EVENT_HWM_KEY: &str = "outbox-event-hwm";
/// `meta` key: the next outbox seq (seqs continue past anything trimmed).
const NEXT_SEQ_KEY: &str = "outbox-next-seq";
/// Twins per full-snapshot batch: a 100k-twin plant is ten keys, not one 20 MB value.
pub const FULL_SNAPSHOT_CHUNK: usize = 10_000;
/// After a compaction the outbox is at most this share of its limit.
const COMPACT_TO: f64 = 0.9;

/// Where the outbox stands, for the API and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OutboxLag {
    /// Batches not acked yet.
    pub count: u64,
    pub bytes: u64,
    /// Creation time of the oldest batch not acked (µs since the epoch).
    pub oldest_unacked_us: Option<i64>,
    /// Highest seq staged.
    pub last_seq: u64,
    /// Highest seq the enterprise acked.
    pub acked_seq: u64,
    /// Batches that lost their twin deltas at the limit, since start.
    pub compacted: u64,
    /// Events dropped at the limit, since start.
    pub dropped_events: u64,
    /// The limit on `bytes` (past it, the oldest batches are compacted, then dropped).
    pub limit_bytes: u64,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    bytes: u64,
    created_us: i64,
    has_twins: bool,
    /// Highest event seq in the batch (0 = none).
    max_event: u64,
}

#[derive(Debug, Default)]
struct State {
    held: BTreeMap<u64, Held>,
    bytes: u64,
    next_seq: u64,
    acked: u64,
    event_hwm: u64,
    next_full_id: u64,
    /// Events dropped at the limit and not reported in a batch yet.
    dropped: Option<(u64, u64)>,
    compacted: u64,
    dropped_events: u64,
}

/// A batch encoded by `prepare`, written by the caller, then `commit`ted.
#[derive(Debug)]
pub struct Prepared {
    pub seq: u64,
    pub bytes: Vec<u8>,
    held: Held,
    dropped: Option<(u64, u64)>,
}

/// Which history goes out (see `replication::HistoryPolicy`).
#[derive(Debug, Default)]
pub struct HistorySettings {
    pub default: HistoryPolicy,
    /// Sensors whose policy is not the default.
    pub by_sensor: HashMap<AssetId, HistoryPolicy>,
    pub window_ms: i64,
}

pub struct Outbox {
    tree: sled::Tree,
    history: std::sync::RwLock<HistorySettings>,
    meta: sled::Tree,
    state: Mutex<State>,
    max_bytes: AtomicU64,
    /// The next flush stages every twin (after a start or a compaction).
    full_pending: AtomicBool,
    /// Last committed seq, for the sender to wait on.
    committed: tokio::sync::watch::Sender<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox: {0}")]
    Io(#[from] sled::Error),
    #[error("outbox: batch {seq} is corrupt: {what}")]
    Corrupt { seq: u64, what: String },
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

fn seq_of_key(k: &[u8]) -> Result<u64, OutboxError> {
    seq_of(k).ok_or_else(|| OutboxError::Corrupt {
        seq: 0,
        what: format!("key of {} bytes", k.len()),
    })
}

impl Outbox {
    /// Opens the outbox tree of `db`. `last_event_seq`: the store's highest event seq, from
    /// which a first-time outbox starts (older events are not replicated).
    pub fn open(
        db: &sled::Db,
        meta: sled::Tree,
        max_bytes: u64,
        last_event_seq: u64,
    ) -> Result<Outbox, OutboxError> {
        let tree = db.open_tree("outbox")?;
        let mut st = State {
            next_seq: 1,
            next_full_id: 1,
            ..State::default()
        };
        for kv in tree.iter() {
            let (k, v) = kv?;
            let seq = seq_of_key(&k)?;
            let b = rec::OutboxBatch::decode(&*v).map_err(|e| OutboxError::Corrupt {
                seq,
                what: e.to_string(),
            })?;
            let held = held_of(&b, v.len());
            st.event_hwm = st.event_hwm.max(held.max_event);
            st.next_full_id = st.next_full_id.max(b.full_snapshot_id + 1);
            st.bytes += held.bytes;
            st.held.insert(seq, held);
            st.next_seq = seq + 1;
        }
        match meta.get(EVENT_HWM_KEY)? {
            Some(v) => {
                let hwm = seq_of(&v).unwrap_or(0);
                st.event_hwm = st.event_hwm.max(hwm);
            }
            None if st.held.is_empty() => {
                // First use on this store: replicate from now on.
                st.event_hwm = last_event_seq;
                meta.insert(EVENT_HWM_KEY, &last_event_seq.to_be_bytes())?;
            }
            None => {}
        }
        // Seqs continue past anything trimmed: the enterprise dedupes by seq.
        if let Some(v) = meta.get(NEXT_SEQ_KEY)? {
            let n = seq_of(&v).unwrap_or(1);
            st.next_seq = st.next_seq.max(n);
        }
        // Everything before the first batch held was acked (trim removes only acked ones).
        st.acked = st
            .held
            .keys()
            .next()
            .map_or(st.next_seq - 1, |first| first - 1);
        let (committed, _) = tokio::sync::watch::channel(st.next_seq - 1);
        Ok(Outbox {
            tree,
            history: std::sync::RwLock::new(HistorySettings {
                default: HistoryPolicy::StateOnly,
                ..HistorySettings::default()
            }),
            meta,
            state: Mutex::new(st),
            max_bytes: AtomicU64::new(max_bytes.max(1)),
            // A start re-sends the whole state once: cheap next to a wrong mirror.
            full_pending: AtomicBool::new(true),
            committed,
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("outbox lock is never poisoned")
    }

    /// Sets which history is replicated (before the writer starts).
    pub fn set_history(&self, settings: HistorySettings) {
        *self.history.write().expect("policy lock is never poisoned") = settings;
    }

    /// The outbox form of the history chunks of one flush, each as its sensor's policy says:
    /// `(key, chunk)` as the store queues them.
    pub fn history_of(&self, chunks: &[(i64, Vec<u8>, Vec<u8>)]) -> Vec<rec::OutboxChunk> {
        let h = self.history.read().expect("policy lock is never poisoned");
        let mut out = Vec::new();
        for (_, key, chunk) in chunks {
            let (Some(id), Some(&property)) = (key.get(..16), key.get(16)) else {
                continue;
            };
            let id16: [u8; 16] = id.try_into().expect("16 bytes");
            let policy = h
                .by_sensor
                .get(&AssetId::from_bytes(id16))
                .copied()
                .unwrap_or(h.default);
            let chunk = match policy {
                HistoryPolicy::StateOnly => continue,
                HistoryPolicy::Raw => chunk.clone(),
                HistoryPolicy::Aggregated => match aggregate(chunk, h.window_ms) {
                    Some(c) => c,
                    None => continue,
                },
            };
            out.push(rec::OutboxChunk {
                id: id.to_vec(),
                property: u32::from(property),
                chunk,
            });
        }
        out
    }

    /// Highest event seq the outbox holds or held: the store re-stages events past it.
    pub fn event_hwm(&self) -> u64 {
        self.state().event_hwm
    }

    /// Whether the next flush must stage every twin; clears the flag.
    pub fn take_full_pending(&self) -> bool {
        self.full_pending.swap(false, Ordering::AcqRel)
    }

    /// Puts the flag back after a failed flush.
    pub fn set_full_pending(&self) {
        self.full_pending.store(true, Ordering::Release);
    }

    /// Encodes the batches of one flush: `twins` (split in chunks when `full`), `events`
    /// (seq, record). Nothing is written: the caller writes `Prepared::bytes` under
    /// `key(seq)` with its flush and calls `commit` once it is durable.
    pub fn prepare(
        &self,
        twins: Vec<rec::TwinDelta>,
        events: Vec<rec::OutboxEvent>,
        history: Vec<rec::OutboxChunk>,
        full: bool,
        now_us: i64,
    ) -> Vec<Prepared> {
        let mut st = self.state();
        let dropped = st.dropped.take();
        if twins.is_empty() && events.is_empty() && history.is_empty() && dropped.is_none() && !full
        {
            return Vec::new();
        }
        let full_id = if full {
            st.next_full_id += 1;
            st.next_full_id - 1
        } else {
            0
        };
        let mut out = Vec::new();
        let mut twins = twins.into_iter().peekable();
        let mut events = Some(events);
        let mut history = Some(history);
        let mut dropped = dropped;
        loop {
            let chunk: Vec<_> = twins.by_ref().take(FULL_SNAPSHOT_CHUNK).collect();
            let evs = events.take().unwrap_or_default();
            let d = dropped.take();
            let b = rec::OutboxBatch {
                seq: st.next_seq,
                created_us: now_us,
                twins: chunk,
                events: evs,
                full_snapshot_id: full_id,
                dropped_events_from: d.map_or(0, |d| d.0),
                dropped_events_to: d.map_or(0, |d| d.1),
                history: history.take().unwrap_or_default(),
                events_after: st.event_hwm,
            };
            st.next_seq += 1;
            let bytes = b.encode_to_vec();
            out.push(Prepared {
                seq: b.seq,
                held: held_of(&b, bytes.len()),
                bytes,
                dropped: d,
            });
            if twins.peek().is_none() {
                break;
            }
        }
        out
    }

    /// Writes `prepared` into `batch` (the caller applies it before its flush).
    pub fn stage(&self, prepared: &[Prepared]) -> sled::Batch {
        let mut batch = sled::Batch::default();
        for p in prepared {
            batch.insert(&key(p.seq), p.bytes.as_slice());
        }
        batch
    }

    pub fn apply(&self, batch: sled::Batch) -> Result<(), OutboxError> {
        self.tree.apply_batch(batch)?;
        Ok(())
    }

    /// `prepared` is on disk: hold it, wake the sender, compact if over the limit.
    pub fn commit(&self, prepared: Vec<Prepared>) {
        let Some(last) = prepared.last().map(|p| p.seq) else {
            return;
        };
        {
            let mut st = self.state();
            for p in prepared {
                st.bytes += p.held.bytes;
                st.event_hwm = st.event_hwm.max(p.held.max_event);
                st.held.insert(p.seq, p.held);
            }
        }
        let _ = self.meta.insert(NEXT_SEQ_KEY, &(last + 1).to_be_bytes());
        self.committed.send_replace(last);
        if let Err(e) = self.enforce_limit() {
            tracing::error!(error = %e, "outbox compaction failed; retrying at the next flush");
        }
    }

    /// A failed flush: whatever `prepared` reported as dropped is reported again next time.
    pub fn abandon(&self, prepared: Vec<Prepared>) {
        let mut st = self.state();
        for p in prepared {
            if let Some(d) = p.dropped {
                st.dropped = Some(merge_range(st.dropped, d));
            }
            // The batch may have reached the tree before the flush failed: its content is
            // staged again with the retry, so this copy must not be sent (nor be left
            // untrimmable). If the removal fails too, a restart finds it, holds it and sends
            // it once more; the enterprise's dedupe by event seq and idempotent twin state
            // take that.
            if let Err(e) = self.tree.remove(key(p.seq)) {
                tracing::warn!(seq = p.seq, error = %e, "outbox: cannot remove a batch of a failed flush");
            }
        }
    }

    /// Batches after `after`, in order, up to about `max_bytes` (at least one).
    pub fn read_after(
        &self,
        after: u64,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, OutboxError> {
        let mut out = Vec::new();
        let mut total = 0usize;
        // Only what a completed flush made durable: the writer puts a batch in the tree
        // before its flush, and a batch sent before it is on disk could be lost in a crash
        // and its seq reused.
        let last = self.committed();
        if after >= last {
            return Ok(out);
        }
        for kv in self.tree.range(key(after.saturating_add(1))..=key(last)) {
            let (k, v) = kv?;
            let seq = seq_of_key(&k)?;
            if !out.is_empty() && total + v.len() > max_bytes {
                break;
            }
            total += v.len();
            out.push((seq, v.to_vec()));
        }
        Ok(out)
    }

    /// Highest seq a completed flush made durable.
    pub fn committed(&self) -> u64 {
        *self.committed.borrow()
    }

    /// Events that can no longer be sent (seq range): reported with the next batch.
    pub fn note_dropped(&self, range: (u64, u64)) {
        let mut st = self.state();
        st.dropped = Some(merge_range(st.dropped, range));
        st.dropped_events += range.1.saturating_sub(range.0) + 1;
    }

    /// The enterprise has everything up to `seq` durably: forget it.
    pub fn trim_to(&self, seq: u64) -> Result<(), OutboxError> {
        let mut st = self.state();
        if seq <= st.acked {
            return Ok(());
        }
        let gone: Vec<u64> = st.held.range(..=seq).map(|(s, _)| *s).collect();
        // The high-water mark first: a crash between the two never lowers it (the hello
        // reports it, and a lower one would make the enterprise rewind and apply again).
        let hwm = gone
            .iter()
            .filter_map(|s| st.held.get(s))
            .map(|h| h.max_event)
            .max()
            .unwrap_or(0);
        self.raise_event_hwm(hwm)?;
        let mut batch = sled::Batch::default();
        for s in &gone {
            batch.remove(&key(*s));
        }
        self.tree.apply_batch(batch)?;
        for s in gone {
            if let Some(h) = st.held.remove(&s) {
                st.bytes -= h.bytes;
            }
        }
        st.acked = seq;
        Ok(())
    }

    /// Persists `hwm` as the highest event seq the outbox held, if it is higher.
    fn raise_event_hwm(&self, hwm: u64) -> Result<(), OutboxError> {
        if hwm == 0 {
            return Ok(());
        }
        let prev = self
            .meta
            .get(EVENT_HWM_KEY)?
            .and_then(|v| seq_of(&v))
            .unwrap_or(0);
        if hwm > prev {
            self.meta.insert(EVENT_HWM_KEY, &hwm.to_be_bytes())?;
        }
        Ok(())
    }

    /// Waits until a batch after `after` is committed.
    pub async fn wait_after(&self, after: u64) {
        let mut rx = self.committed.subscribe();
        let _ = rx.wait_for(|last| *last > after).await;
    }

    pub fn lag(&self) -> OutboxLag {
        let st = self.state();
        OutboxLag {
            count: st.held.len() as u64,
            bytes: st.bytes,
            oldest_unacked_us: st.held.values().next().map(|h| h.created_us),
            last_seq: st.next_seq - 1,
            acked_seq: st.acked,
            compacted: st.compacted,
            dropped_events: st.dropped_events,
            limit_bytes: self.max_bytes.load(Ordering::Relaxed),
        }
    }

    /// Over the limit: strip twin deltas from the oldest batches (and ask for a full
    /// snapshot), then, if events alone are too many, drop the oldest batches whole and
    /// remember their event range for the next batch.
    fn enforce_limit(&self) -> Result<(), OutboxError> {
        let max = self.max_bytes.load(Ordering::Relaxed);
        let mut st = self.state();
        if st.bytes <= max {
            return Ok(());
        }
        let target = (max as f64 * COMPACT_TO) as u64;
        let with_twins: Vec<u64> = st
            .held
            .iter()
            .filter(|(_, h)| h.has_twins)
            .map(|(s, _)| *s)
            .collect();
        for seq in with_twins {
            if st.bytes <= target {
                break;
            }
            let Some(v) = self.tree.get(key(seq))? else {
                continue;
            };
            let mut b = rec::OutboxBatch::decode(&*v).map_err(|e| OutboxError::Corrupt {
                seq,
                what: e.to_string(),
            })?;
            b.twins.clear();
            b.history.clear();
            b.full_snapshot_id = 0;
            let bytes = b.encode_to_vec();
            self.tree.insert(key(seq), bytes.as_slice())?;
            let held = held_of(&b, bytes.len());
            if let Some(old) = st.held.insert(seq, held) {
                st.bytes = st.bytes - old.bytes + held.bytes;
            }
            st.compacted += 1;
            self.full_pending.store(true, Ordering::Release);
        }
        while st.bytes > target {
            let Some((&seq, _)) = st.held.iter().next() else {
                break;
            };
            if let Some(h) = st.held.get(&seq) {
                self.raise_event_hwm(h.max_event)?;
            }
            let Some(v) = self.tree.remove(key(seq))? else {
                st.held.remove(&seq);
                continue;
            };
            let b = rec::OutboxBatch::decode(&*v).map_err(|e| OutboxError::Corrupt {
                seq,
                what: e.to_string(),
            })?;
            if let (Some(first), Some(last)) = (b.events.first(), b.events.last()) {
                st.dropped = Some(merge_range(st.dropped, (first.seq, last.seq)));
                st.dropped_events += b.events.len() as u64;
                tracing::error!(
                    from = first.seq,
                    to = last.seq,
                    "outbox full of events: dropped the oldest (reported to the enterprise)"
                );
            }
            if b.dropped_events_from > 0 {
                st.dropped = Some(merge_range(
                    st.dropped,
                    (b.dropped_events_from, b.dropped_events_to),
                ));
            }
            if let Some(h) = st.held.remove(&seq) {
                st.bytes -= h.bytes;
            }
            // The enterprise can never get it now: count it as acked.
            st.acked = st.acked.max(seq);
            self.full_pending.store(true, Ordering::Release);
        }
        Ok(())
    }
}

fn held_of(b: &rec::OutboxBatch, bytes: usize) -> Held {
    Held {
        bytes: bytes as u64,
        created_us: b.created_us,
        has_twins: !b.twins.is_empty() || !b.history.is_empty(),
        max_event: b.events.iter().map(|e| e.seq).max().unwrap_or(0),
    }
}

/// One point per `window_ms` of the chunk: the window's mean at its last reading's time,
/// with its worst quality. `None` for a chunk that does not decode.
fn aggregate(chunk: &[u8], window_ms: i64) -> Option<Vec<u8>> {
    let points = codec::decode_chunk(chunk).ok()?;
    let window_us = window_ms.max(1).saturating_mul(1000);
    let mut out: Vec<HistPoint> = Vec::new();
    let (mut sum, mut n, mut window) = (0.0, 0u32, None::<i64>);
    let mut last = None::<HistPoint>;
    let flush = |sum: f64, n: u32, last: Option<HistPoint>, out: &mut Vec<HistPoint>| {
        if let Some(mut p) = last
            && n > 0
        {
            p.value = sum / f64::from(n);
            out.push(p);
        }
    };
    for p in points {
        let w = p.ts.0.div_euclid(window_us);
        if window.is_some_and(|x| x != w) {
            flush(sum, n, last, &mut out);
            (sum, n, last) = (0.0, 0, None);
        }
        window = Some(w);
        sum += p.value;
        n += 1;
        let worst = last.map_or(p.quality, |l| worst_quality(l.quality, p.quality));
        last = Some(HistPoint {
            quality: worst,
            ..p
        });
    }
    flush(sum, n, last, &mut out);
    (!out.is_empty()).then(|| codec::encode_chunk(&out))
}

fn worst_quality(a: QualityCode, b: QualityCode) -> QualityCode {
    let rank = |q: QualityCode| match q {
        QualityCode::Good => 0,
        QualityCode::Uncertain => 1,
        QualityCode::Bad => 2,
    };
    if rank(a) >= rank(b) { a } else { b }
}

fn merge_range(a: Option<(u64, u64)>, b: (u64, u64)) -> (u64, u64) {
    match a {
        None => b,
        Some(a) => (a.0.min(b.0), a.1.max(b.1)),
    }
}

#[cfg(test)]
mod tests {

    use ferrotwin_models::{AssetPath, Event, EventKind, Level, Severity, Timestamp};
    use ferrotwin_sim::generate::{PlantSize, generate};

    use super::*;
    use crate::core::TwinSnapshot;
    use crate::registry::Registry;
    use crate::store::{Store, StoreConfig};

    fn plant_registry() -> Registry {
        let registry = Registry::default();
        for def in generate(PlantSize::ONE_LINE, 1).assets() {
            let snap = TwinSnapshot::initial(&def.kind);
            registry.insert(def, snap, 0);
        }
        registry
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt")
    }

    async fn event(store: &Store, n: i64) -> u64 {
        let mut e = Event::new(
            AssetPath::parse("acme").expect("path"),
            Timestamp::from_millis(n),
            EventKind::Lifecycle,
            Severity::Info,
            format!("event {n}"),
        );
        store.put_event(&mut e).await;
        e.seq
    }

    fn batches(ob: &Outbox, after: u64) -> Vec<rec::OutboxBatch> {
        ob.read_after(after, usize::MAX)
            .expect("read")
            .into_iter()
            .map(|(_, v)| rec::OutboxBatch::decode(v.as_slice()).expect("decodes"))
            .collect()
    }

    fn mark_all_dirty(registry: &Registry) {
        for e in registry.all() {
            if matches!(e.level(), Level::Sensor | Level::Machine) {
                registry.publish(&e, e.snapshot());
            }
        }
    }

    #[test]
    fn a_flush_stages_its_twins_and_events_in_order_and_trim_forgets_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
        let registry = plant_registry();
        let ob = store.enable_outbox(1 << 30, None).expect("outbox");
        // The first snapshot round after a start is a full snapshot.
        store.flush_once(&registry, true).expect("flush");
        let first = batches(ob, 0);
        assert_eq!(first.len(), 1);
        assert!(first[0].full_snapshot_id > 0);
        let twins = registry
            .all()
            .iter()
            .filter(|e| matches!(e.level(), Level::Sensor | Level::Machine))
            .count();
        assert_eq!(first[0].twins.len(), twins);

        let seqs = rt().block_on(async { [event(&store, 1).await, event(&store, 2).await] });
        let one = registry
            .all()
            .into_iter()
            .find(|e| e.level() == Level::Sensor)
            .expect("a sensor");
        registry.publish(&one, one.snapshot());
        store.flush_once(&registry, true).expect("flush");
        let second = batches(ob, first[0].seq);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].full_snapshot_id, 0);
        assert_eq!(second[0].twins.len(), 1, "only the twin that changed");
        assert_eq!(
            second[0].events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            seqs
        );
        // Nothing written: nothing staged.
        store.flush_once(&registry, true).expect("flush");
        assert_eq!(ob.lag().count, 2);

        ob.trim_to(first[0].seq).expect("trim");
        let lag = ob.lag();
        assert_eq!((lag.count, lag.acked_seq, lag.last_seq), (1, 1, 2));
        assert_eq!(batches(ob, 0).len(), 1);
    }

    #[test]
    fn reopening_keeps_unacked_batches_and_never_reuses_a_seq() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = plant_registry();
        {
            let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
            let ob = store.enable_outbox(1 << 30, None).expect("outbox");
            store.flush_once(&registry, true).expect("flush");
            rt().block_on(event(&store, 1));
            store.flush_once(&registry, true).expect("flush");
            ob.trim_to(2).expect("trim");
            rt().block_on(event(&store, 2));
            store.flush_once(&registry, true).expect("flush");
            assert_eq!(ob.lag().last_seq, 3);
        }
        let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
        let ob = store.enable_outbox(1 << 30, None).expect("outbox");
        let lag = ob.lag();
        assert_eq!((lag.count, lag.acked_seq, lag.last_seq), (1, 2, 3));
        store.flush_once(&registry, true).expect("flush");
        let after = batches(ob, 3);
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].seq, 4, "seqs continue");
        assert!(
            after[0].full_snapshot_id > 0,
            "a start sends the whole state once"
        );
        assert!(
            after[0].events.is_empty(),
            "the event was in batch 3 already"
        );
    }

    #[test]
    fn unflushed_batches_are_not_read_and_each_batch_names_the_event_before_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
        let registry = plant_registry();
        let ob = store.enable_outbox(1 << 30, None).expect("outbox");
        store.flush_once(&registry, true).expect("flush");
        assert_eq!(ob.committed(), 1);
        // A batch staged but not yet committed (a flush in progress) is not read.
        let p = ob.prepare(Vec::new(), Vec::new(), Vec::new(), true, 0);
        ob.apply(ob.stage(&p)).expect("apply");
        assert_eq!(ob.read_after(0, usize::MAX).expect("read").len(), 1);
        ob.commit(p);
        assert_eq!(ob.read_after(0, usize::MAX).expect("read").len(), 2);
        // Each batch says which event came before it, so the enterprise sees any gap.
        let first = rt().block_on(event(&store, 1));
        store.flush_once(&registry, false).expect("flush");
        let second = rt().block_on(event(&store, 1));
        store.flush_once(&registry, false).expect("flush");
        let next = batches(ob, 2);
        assert_eq!(next.len(), 2);
        assert_eq!(next[0].events[0].seq, first);
        assert_eq!(
            next[1].events_after, first,
            "follows the event staged before it"
        );
        assert_eq!(next[1].events[0].seq, second);
    }

    #[test]
    fn events_on_disk_without_their_batch_are_staged_again_on_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let registry = plant_registry();
        let seq = {
            let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
            store.enable_outbox(1 << 30, None).expect("outbox");
            store.flush_once(&registry, true).expect("flush");
            let seq = rt().block_on(event(&store, 1));
            store.flush_once(&registry, false).expect("flush");
            // A crash that kept the event but lost its outbox batch.
            let tree = store.db.open_tree("outbox").expect("tree");
            let last = tree.last().expect("read").expect("a batch");
            tree.remove(last.0).expect("remove");
            store.db.flush().expect("flush");
            seq
        };
        let store = Store::open(dir.path(), StoreConfig::default()).expect("reopen");
        let ob = store.enable_outbox(1 << 30, None).expect("outbox");
        store.flush_once(&registry, true).expect("flush");
        let staged: Vec<u64> = batches(ob, 0)
            .iter()
            .flat_map(|b| b.events.iter().map(|e| e.seq))
            .collect();
        assert_eq!(staged, vec![seq]);
    }

    #[test]
    fn at_the_limit_twin_deltas_go_first_then_events_are_dropped_and_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
        let registry = plant_registry();
        let ob = store.enable_outbox(1 << 30, None).expect("outbox");
        store.flush_once(&registry, true).expect("flush");
        let full = ob.lag().bytes;
        // Room for about one full snapshot and a half.
        ob.max_bytes.store(full * 3 / 2, Ordering::Relaxed);
        mark_all_dirty(&registry);
        rt().block_on(event(&store, 1));
        store.flush_once(&registry, true).expect("flush");
        let lag = ob.lag();
        assert!(lag.bytes <= full * 3 / 2, "{lag:?} full {full}");
        assert!(lag.compacted >= 1, "{lag:?}");
        assert_eq!(lag.dropped_events, 0);
        let held = batches(ob, 0);
        assert!(
            held.iter().flat_map(|b| &b.events).count() == 1,
            "the event survives compaction"
        );
        // The next snapshot round is a full snapshot again.
        store.flush_once(&registry, true).expect("flush");
        assert!(
            batches(ob, 0)
                .iter()
                .any(|b| b.full_snapshot_id > 0 && !b.twins.is_empty())
        );

        // Now a limit below what the events alone take.
        ob.trim_to(ob.lag().last_seq).expect("trim");
        ob.max_bytes.store(1, Ordering::Relaxed);
        let seqs = rt().block_on(async { [event(&store, 2).await, event(&store, 3).await] });
        store.flush_once(&registry, false).expect("flush");
        assert_eq!(ob.lag().dropped_events, 2);
        ob.max_bytes.store(1 << 30, Ordering::Relaxed);
        rt().block_on(event(&store, 4));
        store.flush_once(&registry, false).expect("flush");
        let next = batches(ob, 0);
        let reported = next.last().expect("a batch");
        assert_eq!(
            (reported.dropped_events_from, reported.dropped_events_to),
            (seqs[0], seqs[1])
        );
    }
}

#[cfg(test)]
mod aggregate_tests {
    use ferrotwin_models::Timestamp;

    use super::*;

    #[test]
    fn aggregation_keeps_one_mean_per_window_with_its_worst_quality() {
        let p = |ms: i64, v: f64, q: QualityCode| HistPoint {
            ts: Timestamp::from_millis(ms),
            value: v,
            quality: q,
        };
        let chunk = codec::encode_chunk(&[
            p(0, 1.0, QualityCode::Good),
            p(400, 3.0, QualityCode::Uncertain),
            p(1_000, 10.0, QualityCode::Good),
            p(1_900, 20.0, QualityCode::Good),
            p(2_500, 7.0, QualityCode::Bad),
        ]);
        let out =
            codec::decode_chunk(&aggregate(&chunk, 1_000).expect("aggregates")).expect("decodes");
        assert_eq!(
            out,
            vec![
                p(400, 2.0, QualityCode::Uncertain),
                p(1_900, 15.0, QualityCode::Good),
                p(2_500, 7.0, QualityCode::Bad),
            ]
        );
        assert!(aggregate(b"not a chunk", 1_000).is_none());
    }
}
