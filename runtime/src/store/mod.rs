//! The embedded store (sled): twin snapshots, history chunks with retention, events.
//!
//! One writer thread does group commit: every `flush_interval_ms` it takes the dirty twins'
//! snapshots from the registry, the queued history chunks and events, writes them in one
//! batch per tree and flushes. Queued bytes are bounded by a semaphore: a twin that would
//! exceed it waits (back-pressure to the router), nothing is dropped.
//!
//! Keys (all big-endian so that sled's order is time order):
//! - `snapshots`: asset id (16) → `TwinRecord`
//! - `history-D` (one tree per UTC day D since the epoch, by the chunk's first timestamp):
//!   asset id (16) ‖ property (1) ‖ chunk first ts µs (8) ‖ uniquifier (4) → `HistoryChunk`. Retention drops
//!   whole day trees: no per-chunk index, no per-chunk delete.
//! - `events`: seq (8) → `EventRecord`
//! - `meta`: "meta" → `Meta` (format version); "plant" → `PlantRecord` (the plant it runs)
//! - `outbox` (when replication is on, see `outbox`): outbox seq (8) → `OutboxBatch`

pub mod audit;
pub mod codec;
pub mod outbox;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferrotwin_models::{AssetId, AssetPath, Event, EventKind, Property, Severity, Timestamp};
use ferrotwin_proto::store::v1 as rec;
use prost::Message;
use tokio::sync::Semaphore;

use crate::core::HistPoint;
use crate::registry::{Registry, TwinEntry};

/// `meta` key of the `PlantRecord`.
const PLANT_KEY: &[u8] = b"plant";

/// `meta` keys of a site's fleet templates: this prefix, then the version (8 bytes,
/// big-endian: sled's order is version order).
fn template_prefix(site: &str) -> Vec<u8> {
    format!("fleet/{site}/").into_bytes()
}

/// On-disk format version of this build. Bump on an incompatible change of keys or records.
pub const STORE_FORMAT: u32 = 1;

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Group commit interval of history and events: at most this much is lost on a crash.
    #[serde(default = "defaults::flush_interval_ms")]
    pub flush_interval_ms: u64,
    /// Twin snapshots (latest value, alarm states, counters) are written at most this often
    /// (rounded up to a flush): each is a sled insert, and every twin changes all the time.
    #[serde(default = "defaults::snapshot_interval_ms")]
    pub snapshot_interval_ms: u64,
    /// History older than this is deleted (the enterprise keeps the long history).
    #[serde(default = "defaults::history_retention_hours")]
    pub history_retention_hours: u64,
    /// Events older than this are deleted.
    #[serde(default = "defaults::event_retention_hours")]
    pub event_retention_hours: u64,
    /// Most bytes of history and events waiting for the writer; twins wait beyond it.
    #[serde(default = "defaults::max_queued_bytes")]
    pub max_queued_bytes: usize,
    /// Most twin snapshots written per flush (each is a sled insert, ~10 µs). Beyond it the
    /// rest stay dirty for the next flush, oldest first: under heavy load a twin's state on
    /// disk lags by (dirty twins / this) flush intervals instead of the writer falling behind.
    #[serde(default = "defaults::max_snapshots_per_flush")]
    pub max_snapshots_per_flush: usize,
    /// Audit records older than this are deleted (0 = kept for ever).
    #[serde(default = "defaults::audit_retention_days")]
    pub audit_retention_days: u64,
    /// Audit records kept at most; the oldest are deleted beyond it.
    #[serde(default = "defaults::max_audit_records")]
    pub max_audit_records: u64,
}

mod defaults {
    pub fn flush_interval_ms() -> u64 {
        200
    }
    pub fn snapshot_interval_ms() -> u64 {
        1000
    }
    pub fn history_retention_hours() -> u64 {
        24 * 7
    }
    pub fn event_retention_hours() -> u64 {
        24 * 30
    }
    pub fn max_queued_bytes() -> usize {
        64 << 20
    }
    pub fn max_snapshots_per_flush() -> usize {
        20_000
    }
    pub fn audit_retention_days() -> u64 {
        400
    }
    pub fn max_audit_records() -> u64 {
        10_000_000
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            flush_interval_ms: defaults::flush_interval_ms(),
            snapshot_interval_ms: defaults::snapshot_interval_ms(),
            history_retention_hours: defaults::history_retention_hours(),
            event_retention_hours: defaults::event_retention_hours(),
            max_queued_bytes: defaults::max_queued_bytes(),
            max_snapshots_per_flush: defaults::max_snapshots_per_flush(),
            audit_retention_days: defaults::audit_retention_days(),
            max_audit_records: defaults::max_audit_records(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data dir {dir}: cannot open the store: {source}")]
    Open { dir: PathBuf, source: sled::Error },
    #[error("data dir {dir}: {what}")]
    NotOurs { dir: PathBuf, what: String },
    #[error(
        "data dir {dir}: store format {found} is not supported by this build (reads format {STORE_FORMAT})"
    )]
    Format { dir: PathBuf, found: u32 },
    #[error("data dir {dir}: tree {tree:?}: record {key} is corrupt: {what}")]
    Corrupt {
        dir: PathBuf,
        tree: &'static str,
        key: String,
        what: String,
    },
    #[error("data dir {dir}: {source}")]
    Io { dir: PathBuf, source: sled::Error },
    #[error("the range holds more than {max_raw} raw points; narrow it")]
    TooMuchHistory { max_raw: usize },
}

/// Filter of `list_events`.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub prefix: Option<AssetPath>,
    pub after_seq: u64,
    pub limit: usize,
    pub kind: Option<EventKind>,
    pub min_severity: Severity,
}

/// Most records scanned by one `list_events` call before it returns a continuation.
const MAX_EVENT_SCAN: usize = 200_000;

#[derive(Default, Clone)]
struct Queue {
    /// (day partition, key, chunk)
    history: Vec<(i64, Vec<u8>, Vec<u8>)>,
    events: Vec<(u64, Vec<u8>)>,
    /// Snapshot records given as such (mirrors of another site's twins): (id, record).
    records: Vec<(Vec<u8>, Vec<u8>)>,
    /// `meta` entries written after everything else of the flush (replication cursors).
    meta: Vec<(Vec<u8>, Vec<u8>)>,
    bytes: usize,
}

/// One flush's sled batches, one per tree (history: one per day partition).
#[derive(Default)]
struct TreeBatches {
    snapshots: sled::Batch,
    history: std::collections::BTreeMap<i64, sled::Batch>,
    events: sled::Batch,
    meta: sled::Batch,
    /// Twin snapshots encoded from the registry (mirror records not included).
    snapshots_encoded: u64,
}

impl TreeBatches {
    fn of_snapshots(dirty: &[Arc<TwinEntry>]) -> TreeBatches {
        let mut batches = TreeBatches::default();
        for e in dirty {
            if let Some(bytes) = codec::encode_snapshot(e) {
                batches.snapshots.insert(e.id.as_bytes().as_slice(), bytes);
                batches.snapshots_encoded += 1;
            }
        }
        batches
    }

    fn add_queue(&mut self, q: &Queue) {
        for (day, k, v) in &q.history {
            self.history
                .entry(*day)
                .or_default()
                .insert(k.as_slice(), v.as_slice());
        }
        for (seq, v) in &q.events {
            self.events.insert(&seq.to_be_bytes(), v.as_slice());
        }
        for (id, r) in &q.records {
            self.snapshots.insert(id.as_slice(), r.as_slice());
        }
        for (k, v) in &q.meta {
            self.meta.insert(k.as_slice(), v.as_slice());
        }
    }
}

/// What one flush staged for the outbox (see `Store::stage_outbox`).
struct StagedOutbox {
    batches: Vec<outbox::Prepared>,
    /// The batches are a full snapshot (the outbox's pending flag was taken).
    full: bool,
    /// Events recovered at open that these batches carry.
    recovered: Vec<rec::OutboxEvent>,
}

/// What a flush took and did not write, for `Store::put_back`.
#[derive(Default)]
struct Unwritten {
    snapshots: Vec<Arc<TwinEntry>>,
    queue: Option<Arc<Queue>>,
    outbox: Option<StagedOutbox>,
}

/// Writer statistics (for metrics and the benchmark).
#[derive(Debug, Default)]
pub struct StoreStats {
    pub flushes: AtomicU64,
    pub snapshots_written: AtomicU64,
    pub chunks_written: AtomicU64,
    pub events_written: AtomicU64,
    pub write_errors: AtomicU64,
    pub last_flush_us: AtomicU64,
}

pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    snapshots: sled::Tree,
    /// Open day partitions of history, by day since the epoch.
    history: Mutex<std::collections::BTreeMap<i64, sled::Tree>>,
    events: sled::Tree,
    cfg: StoreConfig,
    queue: Mutex<Queue>,
    /// What the writer took from `queue` and has not finished writing: readers look at
    /// queue, then this, then sled, so a record is always visible somewhere.
    in_flight: Mutex<Option<Arc<Queue>>>,
    room: Semaphore,
    next_seq: AtomicU64,
    chunk_counter: std::sync::atomic::AtomicU32,
    /// Event seqs below this are durably reserved (see `put_event`).
    seq_reserved: AtomicU64,
    meta: sled::Tree,
    /// The hash-chained audit log (`audit`).
    audit: audit::AuditLog,
    wake: Condvar,
    wake_lock: Mutex<bool>,
    stopping: AtomicBool,
    aborting: AtomicBool,
    /// The replication outbox, once `enable_outbox` was called.
    outbox: std::sync::OnceLock<outbox::Outbox>,
    /// Events on disk that the outbox may not hold (see `enable_outbox`), staged with the
    /// next flush.
    outbox_recovery: Mutex<Vec<rec::OutboxEvent>>,
    /// Only twins and events of this subtree go to the outbox (the replicated site).
    outbox_site: Mutex<Option<AssetPath>>,
    /// Number of the flush the queue goes out with; a flush publishes it on `flushed` once
    /// durable.
    queue_gen: AtomicU64,
    flushed: tokio::sync::watch::Sender<u64>,
    pub stats: StoreStats,
}

/// Most events `enable_outbox` re-stages; older ones past the outbox's mark are reported to
/// the enterprise as a dropped range.
const MAX_RECOVERY_EVENTS: usize = 100_000;

/// How long `open` waits for a store that another runtime of this process (or a process
/// that is exiting) is still closing: sled holds a file lock until its last handle is gone,
/// and a runtime stopped a moment ago may still be dropping it on another thread.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// `meta` key of a rule's run-time mode: `rule-mode\0MACHINE\0RULE`.
fn rule_mode_key(machine: &AssetPath, rule: &str) -> Vec<u8> {
    format!("rule-mode\0{machine}\0{rule}").into_bytes()
}

fn open_db(dir: &Path) -> sled::Result<sled::Db> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .open()
        {
            Err(sled::Error::Io(e))
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.to_string().contains("could not acquire lock") =>
            {
                if std::time::Instant::now() >= deadline {
                    return Err(sled::Error::Io(e));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`. A directory that holds something other than a
    /// ferrotwin store, or a store of another format, is an error naming the directory:
    /// never a silent empty start.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<Store, StoreError> {
        let dir = dir.to_path_buf();
        let existing_files = std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0);
        let db = open_db(&dir).map_err(|source| StoreError::Open {
            dir: dir.clone(),
            source,
        })?;
        let io = |source| StoreError::Io {
            dir: dir.clone(),
            source,
        };
        let meta = db.open_tree("meta").map_err(io)?;
        match meta.get("meta").map_err(io)? {
            None if existing_files > 0 && db.was_recovered() && has_data(&db) => {
                return Err(StoreError::NotOurs {
                    dir,
                    what: "holds a sled database that is not a ferrotwin store (no meta record)"
                        .into(),
                });
            }
            None => {
                let m = rec::Meta {
                    format: STORE_FORMAT,
                    created_by: format!("ferrotwin {}", env!("CARGO_PKG_VERSION")),
                };
                meta.insert("meta", m.encode_to_vec()).map_err(io)?;
                db.flush().map_err(io)?;
            }
            Some(bytes) => {
                let m = rec::Meta::decode(&*bytes).map_err(|e| StoreError::Corrupt {
                    dir: dir.clone(),
                    tree: "meta",
                    key: "meta".into(),
                    what: e.to_string(),
                })?;
                if m.format != STORE_FORMAT {
                    return Err(StoreError::Format {
                        dir,
                        found: m.format,
                    });
                }
            }
        }
        let snapshots = db.open_tree("snapshots").map_err(io)?;
        let mut history = std::collections::BTreeMap::new();
        for name in db.tree_names() {
            if let Some(day) = std::str::from_utf8(&name)
                .ok()
                .and_then(|n| n.strip_prefix(HISTORY_TREE_PREFIX))
                .and_then(|d| d.parse::<i64>().ok())
            {
                history.insert(day, db.open_tree(&name).map_err(io)?);
            }
        }
        let events = db.open_tree("events").map_err(io)?;
        // Seqs are streamed to watchers before they are durable; after a crash, start past
        // every seq that may have been handed out, never reuse one.
        let after_events = match events.last().map_err(io)? {
            Some((k, _)) => seq_of(&k).unwrap_or(0) + 1,
            None => 1,
        };
        let reserved = meta
            .get(SEQ_RESERVED_KEY)
            .map_err(io)?
            .and_then(|v| seq_of(&v))
            .unwrap_or(0);
        let next_seq = after_events.max(reserved);
        let room = Semaphore::new(cfg.max_queued_bytes);
        let audit = audit::AuditLog::open(&db, meta.clone(), &dir).map_err(io)?;
        Ok(Store {
            dir,
            db,
            snapshots,
            history: Mutex::new(history),
            events,
            cfg,
            queue: Mutex::new(Queue::default()),
            in_flight: Mutex::new(None),
            room,
            next_seq: AtomicU64::new(next_seq),
            // Start where an earlier run is unlikely to have been, so a restart does not
            // reuse (id, ts, uniquifier) of a chunk written before it.
            chunk_counter: std::sync::atomic::AtomicU32::new(Timestamp::now().0 as u32),
            seq_reserved: AtomicU64::new(next_seq),
            meta,
            audit,
            wake: Condvar::new(),
            wake_lock: Mutex::new(false),
            stopping: AtomicBool::new(false),
            aborting: AtomicBool::new(false),
            outbox: std::sync::OnceLock::new(),
            outbox_recovery: Mutex::new(Vec::new()),
            outbox_site: Mutex::new(None),
            queue_gen: AtomicU64::new(1),
            flushed: tokio::sync::watch::channel(0).0,
            stats: StoreStats::default(),
        })
    }

    /// Turns the replication outbox on (before the writer starts): from now on every flush
    /// also stages what it wrote for the enterprise. Events on disk past the outbox's
    /// high-water mark (a crash between the two writes) are staged again.
    pub fn enable_outbox(
        &self,
        max_bytes: u64,
        site: Option<AssetPath>,
    ) -> Result<&outbox::Outbox, StoreError> {
        *self
            .outbox_site
            .lock()
            .expect("site lock is never poisoned") = site;
        if let Some(o) = self.outbox.get() {
            return Ok(o);
        }
        let ob = outbox::Outbox::open(
            &self.db,
            self.meta.clone(),
            max_bytes,
            self.last_event_seq(),
        )
        .map_err(|e| StoreError::Corrupt {
            dir: self.dir.clone(),
            tree: "outbox",
            key: String::new(),
            what: e.to_string(),
        })?;
        let hwm = ob.event_hwm();
        let mut recovery = Vec::new();
        for kv in self.events.range((hwm + 1).to_be_bytes()..) {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            let (Some(seq), Ok(event)) = (seq_of(&k), rec::EventRecord::decode(&*v)) else {
                continue;
            };
            recovery.push(rec::OutboxEvent {
                seq,
                event: Some(event),
            });
        }
        if recovery.len() > MAX_RECOVERY_EVENTS {
            let cut = recovery.len() - MAX_RECOVERY_EVENTS;
            let range = (recovery[0].seq, recovery[cut - 1].seq);
            tracing::error!(
                from = range.0,
                to = range.1,
                "more events than the outbox re-stages after a crash; the oldest are reported dropped"
            );
            ob.note_dropped(range);
            recovery.drain(..cut);
        }
        if !recovery.is_empty() {
            tracing::info!(
                events = recovery.len(),
                "outbox: re-staging events written before a crash"
            );
        }
        *self
            .outbox_recovery
            .lock()
            .expect("recovery lock is never poisoned") = recovery;
        Ok(self.outbox.get_or_init(|| ob))
    }

    /// The audit log.
    pub fn audit(&self) -> &audit::AuditLog {
        &self.audit
    }

    pub fn outbox(&self) -> Option<&outbox::Outbox> {
        self.outbox.get()
    }

    /// Every snapshot on disk, decoded. A corrupt record is an error naming it.
    pub fn load_snapshots(&self) -> Result<HashMap<AssetId, rec::TwinRecord>, StoreError> {
        let mut out = HashMap::new();
        for kv in self.snapshots.iter() {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            let corrupt = |what: String| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "snapshots",
                key: hex(&k),
                what,
            };
            let id: [u8; 16] = (*k)
                .try_into()
                .map_err(|_| corrupt(format!("key has {} bytes, expected 16", k.len())))?;
            let r = rec::TwinRecord::decode(&*v).map_err(|e| corrupt(e.to_string()))?;
            out.insert(AssetId::from_bytes(id), r);
        }
        Ok(out)
    }

    /// The stored snapshot of one twin (a live apply re-adding an asset resumes it).
    pub fn snapshot_record(&self, id: &AssetId) -> Result<Option<rec::TwinRecord>, StoreError> {
        let Some(v) = self
            .snapshots
            .get(id.as_bytes())
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?
        else {
            return Ok(None);
        };
        rec::TwinRecord::decode(&*v)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "snapshots",
                key: hex(id.as_bytes()),
                what: e.to_string(),
            })
    }

    async fn reserve(&self, bytes: usize) {
        let n = u32::try_from(bytes.min(self.cfg.max_queued_bytes)).unwrap_or(u32::MAX);
        // Closed only by `abort`: then nothing will be written anyway.
        if let Ok(p) = self.room.acquire_many(n).await {
            p.forget();
        }
    }

    /// Queues a history chunk of one property; waits while the queue is full.
    pub async fn append_history(&self, id: AssetId, property: Property, points: &[HistPoint]) {
        let Some(first) = points.first() else {
            return;
        };
        let value = codec::encode_chunk(points);
        // A uniquifier after the time: two chunks may start at the same source time (a
        // source that repeats timestamps, a replay); neither may overwrite the other.
        let mut key = history_key(id, property, first.ts);
        key.extend_from_slice(
            &self
                .chunk_counter
                .fetch_add(1, Ordering::Relaxed)
                .to_be_bytes(),
        );
        let bytes = key.len() + value.len();
        self.reserve(bytes).await;
        let mut q = self.queue.lock().expect("queue lock is never poisoned");
        q.bytes += bytes;
        q.history.push((day_of(first.ts), key, value));
    }

    /// Assigns the event its sequence number and queues it; waits while the queue is full.
    pub async fn put_event(&self, event: &mut Event) {
        let value = codec::encode_event(event);
        self.reserve(value.len() + 8).await;
        let mut q = self.queue.lock().expect("queue lock is never poisoned");
        // Seq assigned under the queue lock so the queue is in seq order.
        event.seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        if event.seq >= self.seq_reserved.load(Ordering::Relaxed) {
            // Once per SEQ_BLOCK events: make the next block durable before using it.
            let upto = event.seq + SEQ_BLOCK;
            let durable = self
                .meta
                .insert(SEQ_RESERVED_KEY, &upto.to_be_bytes())
                .and_then(|_| self.meta.flush().map(|_| ()));
            match durable {
                Ok(()) => self.seq_reserved.store(upto, Ordering::Relaxed),
                Err(e) => {
                    tracing::error!(error = %e, "cannot reserve event seqs; a crash may reuse some")
                }
            }
        }
        q.bytes += value.len() + 8;
        q.events.push((event.seq, value));
    }

    /// Queues snapshot records as they are (a mirror's state from its site) and `meta`
    /// entries written after them in the same flush; returns the flush they go out with
    /// (see `wait_flushed`). Waits while the queue is full.
    pub async fn put_records(
        &self,
        records: Vec<(AssetId, Vec<u8>)>,
        history: Vec<(AssetId, Property, Timestamp, Vec<u8>)>,
        meta: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> u64 {
        let bytes: usize = records.iter().map(|(_, r)| 16 + r.len()).sum::<usize>()
            + history.iter().map(|h| 29 + h.3.len()).sum::<usize>()
            + meta.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
        self.reserve(bytes).await;
        let mut q = self.queue.lock().expect("queue lock is never poisoned");
        q.bytes += bytes;
        for (id, property, first, chunk) in history {
            let mut key = history_key(id, property, first);
            key.extend_from_slice(
                &self
                    .chunk_counter
                    .fetch_add(1, Ordering::Relaxed)
                    .to_be_bytes(),
            );
            q.history.push((day_of(first), key, chunk));
        }
        q.records.extend(
            records
                .into_iter()
                .map(|(id, r)| (id.as_bytes().to_vec(), r)),
        );
        q.meta.extend(meta);
        self.queue_gen.load(Ordering::Acquire)
    }

    /// The flush that what is queued now goes out with.
    pub fn queue_generation(&self) -> u64 {
        self.queue_gen.load(Ordering::Acquire)
    }

    /// Waits until flush `generation` (or a later one) is durable. Nudges the writer.
    pub async fn wait_flushed(&self, generation: u64) {
        let mut rx = self.flushed.subscribe();
        self.nudge();
        let _ = rx.wait_for(|g| *g >= generation).await;
    }

    /// Writes a `meta` value durably (flushed before it returns). Blocking.
    pub fn put_meta(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        self.meta.insert(key, value).map_err(io)?;
        self.meta.flush().map_err(io)?;
        Ok(())
    }

    /// A site's fleet templates, oldest first (an enterprise).
    pub fn templates(&self, site: &str) -> Result<Vec<rec::SiteTemplateRecord>, StoreError> {
        self.meta
            .scan_prefix(template_prefix(site))
            .map(|kv| self.template_of(kv))
            .collect()
    }

    /// A site's newest fleet template (`None` before the first push): one record read, not
    /// every version kept (a hello asks this).
    pub fn newest_template(
        &self,
        site: &str,
    ) -> Result<Option<rec::SiteTemplateRecord>, StoreError> {
        self.meta
            .scan_prefix(template_prefix(site))
            .next_back()
            .map(|kv| self.template_of(kv))
            .transpose()
    }

    fn template_of(
        &self,
        kv: sled::Result<(sled::IVec, sled::IVec)>,
    ) -> Result<rec::SiteTemplateRecord, StoreError> {
        let (k, v) = kv.map_err(|source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        })?;
        rec::SiteTemplateRecord::decode(&*v).map_err(|e| StoreError::Corrupt {
            dir: self.dir.clone(),
            tree: "meta",
            key: String::from_utf8_lossy(&k).into_owned(),
            what: e.to_string(),
        })
    }

    /// Keeps a new template version of `site`, and at most `keep` versions in all (the
    /// oldest go). Blocking.
    pub fn put_template(
        &self,
        site: &str,
        t: &rec::SiteTemplateRecord,
        keep: usize,
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        let mut key = template_prefix(site);
        key.extend_from_slice(&t.version.to_be_bytes());
        self.meta.insert(key, t.encode_to_vec()).map_err(io)?;
        let keys: Vec<sled::IVec> = self
            .meta
            .scan_prefix(template_prefix(site))
            .keys()
            .collect::<Result<_, _>>()
            .map_err(io)?;
        for old in keys.iter().take(keys.len().saturating_sub(keep)) {
            self.meta.remove(old).map_err(io)?;
        }
        self.meta.flush().map_err(io)?;
        Ok(())
    }

    /// A rule's mode as switched at run time (`SetRuleMode`), if it still applies: it was
    /// switched away from `spec_mode`, the mode the plant spec gives the rule now. A spec that
    /// changed the rule's mode since is the newer word: it wins, and the switch is forgotten.
    pub fn rule_mode(
        &self,
        machine: &AssetPath,
        rule: &str,
        spec_mode: ferrotwin_models::rule::RuleMode,
    ) -> Option<ferrotwin_models::rule::RuleMode> {
        let key = rule_mode_key(machine, rule);
        let v = self.meta.get(&key).ok()??;
        let kept = std::str::from_utf8(&v)
            .ok()
            .and_then(|v| v.split_once('>'))
            .filter(|(from, _)| *from == spec_mode.as_str())
            .and_then(|(_, to)| ferrotwin_models::rule::RuleMode::parse(to));
        if kept.is_none() {
            // Overruled by the spec (or unreadable): forgotten, so that a spec going back to
            // the old mode does not bring the old switch back.
            let _ = self.meta.remove(&key);
        }
        kept
    }

    /// Keeps a run-time switch of a rule's mode across restarts (durably; blocking); switched
    /// back to the spec's mode, the record goes.
    pub fn put_rule_mode(
        &self,
        machine: &AssetPath,
        rule: &str,
        spec_mode: ferrotwin_models::rule::RuleMode,
        mode: ferrotwin_models::rule::RuleMode,
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        let key = rule_mode_key(machine, rule);
        if mode == spec_mode {
            self.meta.remove(key).map_err(io)?;
        } else {
            self.meta
                .insert(key, format!("{spec_mode}>{mode}").as_bytes())
                .map_err(io)?;
        }
        self.meta.flush().map_err(io)?;
        Ok(())
    }

    /// A `meta` value (replication cursors); `None` if absent.
    pub fn meta_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        self.meta
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })
    }

    /// The plant this data dir last ran (`None` before the first start that records it).
    pub fn load_plant(&self) -> Result<Option<rec::PlantRecord>, StoreError> {
        let Some(bytes) = self.meta_value(PLANT_KEY)? else {
            return Ok(None);
        };
        rec::PlantRecord::decode(bytes.as_slice())
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "meta",
                key: "plant".into(),
                what: e.to_string(),
            })
    }

    /// Records the plant durably (flushed before it returns: a live apply writes it before
    /// it changes any twin). Blocking: call it off the async threads.
    pub fn save_plant(&self, r: &rec::PlantRecord) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        self.meta.insert(PLANT_KEY, r.encode_to_vec()).map_err(io)?;
        self.meta.flush().map_err(io)?;
        Ok(())
    }

    /// Highest sequence number assigned so far (0 if none).
    pub fn last_event_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Starts the writer thread. It runs until `stop` is called.
    pub fn start_writer(self: &Arc<Self>, registry: Arc<Registry>) -> std::thread::JoinHandle<()> {
        let store = self.clone();
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || store.writer_loop(&registry))
            .expect("spawning the store writer thread")
    }

    fn writer_loop(&self, registry: &Registry) {
        let interval = Duration::from_millis(self.cfg.flush_interval_ms.max(1));
        let mut last_retention = Instant::now();
        let snapshot_every = Duration::from_millis(self.cfg.snapshot_interval_ms);
        let mut last_snapshots = Instant::now();
        loop {
            {
                let guard = self.wake_lock.lock().expect("wake lock is never poisoned");
                let (mut woken, _) = self
                    .wake
                    .wait_timeout_while(guard, interval, |w| !*w)
                    .expect("wake lock is never poisoned");
                *woken = false;
            }
            if self.aborting.load(Ordering::Acquire) {
                return;
            }
            let stopping = self.stopping.load(Ordering::Acquire);
            if stopping {
                // A clean stop writes everything, past the per-flush snapshot budget.
                let mut rounds = 0;
                while registry.dirty_len() > 0 && rounds < 10_000 {
                    if let Err(e) = self.flush_once(registry, true) {
                        tracing::error!(error = %e, "final store flush failed");
                        break;
                    }
                    rounds += 1;
                }
            }
            let snapshots = stopping || last_snapshots.elapsed() >= snapshot_every;
            if snapshots {
                last_snapshots = Instant::now();
            }
            if let Err(e) = self.flush_once(registry, snapshots) {
                self.stats.write_errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "store flush failed; retrying at the next interval");
            }
            if last_retention.elapsed() > Duration::from_secs(60) {
                last_retention = Instant::now();
                if let Err(e) = self.apply_retention(Timestamp::now()) {
                    tracing::warn!(error = %e, "history retention sweep failed");
                }
                let (days, max) = (self.cfg.audit_retention_days, self.cfg.max_audit_records);
                if let Err(e) = self.audit.apply_retention(Timestamp::now(), days, max) {
                    tracing::warn!(error = %e, "audit retention sweep failed");
                }
            }
            if stopping {
                return;
            }
        }
    }

    /// Writes everything dirty or queued now, then flushes sled to disk. On an error nothing
    /// of the round is lost: it is put back (`put_back`) and retried by the next flush.
    pub fn flush_once(&self, registry: &Registry, snapshots: bool) -> Result<(), StoreError> {
        let started = Instant::now();
        let dirty = self.take_dirty_within_budget(registry, snapshots);
        // The queue's mirror records go in after the registry's snapshots: for the same twin
        // they win.
        let mut batches = TreeBatches::of_snapshots(&dirty);
        let (q, generation) = self.take_queue();
        batches.add_queue(&q);
        // A span per flush that writes something (an idle store flushes 5 times a second).
        let idle = dirty.is_empty()
            && q.history.is_empty()
            && q.events.is_empty()
            && q.records.is_empty()
            && q.meta.is_empty();
        let span = if crate::telemetry::tracing_on() && !idle {
            tracing::info_span!(
                parent: None,
                "store.flush",
                ferrotwin.snapshots = tracing::field::Empty,
                ferrotwin.chunks = tracing::field::Empty,
                ferrotwin.events = tracing::field::Empty,
                ferrotwin.bytes = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
                error.type = tracing::field::Empty,
                ferrotwin.error = tracing::field::Empty,
            )
        } else {
            tracing::Span::none()
        };
        let _entered = span.enter();
        let staged = self
            .outbox
            .get()
            .map(|ob| self.stage_outbox(ob, registry, &dirty, &q, snapshots));
        let batches_staged = staged.as_ref().map_or(&[][..], |s| s.batches.as_slice());
        let snapshots_written = batches.snapshots_encoded;
        if let Err(e) = self.write_trees(batches, batches_staged) {
            span.record("otel.status_code", "error");
            span.record("error.type", "write");
            span.record("ferrotwin.error", tracing::field::display(&e));
            self.put_back(
                registry,
                Unwritten {
                    snapshots: dirty,
                    queue: Some(q),
                    outbox: staged,
                },
            );
            self.done_writing();
            return Err(e);
        }
        if let (Some(ob), Some(staged)) = (self.outbox.get(), staged) {
            ob.commit(staged.batches);
        }
        self.done_writing();
        self.release_durable(&q, generation);
        self.count_flush(&q, snapshots_written, started);
        Ok(())
    }

    /// The dirty twins whose snapshots this flush writes: none outside a snapshot round, at
    /// most `max_snapshots_per_flush` (oldest first) in one; the rest are put back at once,
    /// so they keep their place ahead of twins dirtied during this flush.
    fn take_dirty_within_budget(
        &self,
        registry: &Registry,
        snapshots: bool,
    ) -> Vec<Arc<TwinEntry>> {
        if !snapshots {
            return Vec::new();
        }
        let mut dirty = registry.take_dirty();
        if dirty.len() > self.cfg.max_snapshots_per_flush {
            let rest = dirty.split_off(self.cfg.max_snapshots_per_flush);
            self.put_back(
                registry,
                Unwritten {
                    snapshots: rest,
                    ..Unwritten::default()
                },
            );
        }
        dirty
    }

    /// Takes the whole queue for this flush and returns it with the flush's number. Until
    /// `done_writing`, readers find it in `in_flight`, so a record is always visible somewhere.
    fn take_queue(&self) -> (Arc<Queue>, u64) {
        let mut queue = self.queue.lock().expect("queue lock is never poisoned");
        let q = Arc::new(std::mem::take(&mut *queue));
        // Taken under the queue lock: whatever was queued before is in this flush.
        let generation = self.queue_gen.fetch_add(1, Ordering::AcqRel);
        *self
            .in_flight
            .lock()
            .expect("in-flight lock is never poisoned") = Some(q.clone());
        (q, generation)
    }

    /// Applies one flush's batches, tree by tree, then flushes sled to disk.
    fn write_trees(
        &self,
        batches: TreeBatches,
        staged: &[outbox::Prepared],
    ) -> Result<(), StoreError> {
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        self.snapshots.apply_batch(batches.snapshots).map_err(io)?;
        for (day, batch) in batches.history {
            self.partition(day)?.apply_batch(batch).map_err(io)?;
        }
        self.events.apply_batch(batches.events).map_err(io)?;
        if let Some(ob) = self.outbox.get()
            && !staged.is_empty()
        {
            ob.apply(ob.stage(staged)).map_err(|e| match e {
                outbox::OutboxError::Io(source) => io(source),
                other => StoreError::Corrupt {
                    dir: self.dir.clone(),
                    tree: "outbox",
                    key: String::new(),
                    what: other.to_string(),
                },
            })?;
        }
        // Last: a cursor on disk means what it counts is on disk too.
        self.meta.apply_batch(batches.meta).map_err(io)?;
        self.db.flush().map_err(io)?;
        Ok(())
    }

    /// The one place what a flush took but did not write goes back, so that the next flush
    /// writes it and nothing is lost: dirty twins ahead of those dirtied since; queued
    /// chunks, events, records and cursors at the queue's front, their bytes still reserved;
    /// the outbox's dropped-event report, its pending full snapshot and the events recovered
    /// at open, to be staged again. `in_flight` is left alone: the caller clears it after
    /// (readers look at the queue first, so the put-back queue is never out of sight).
    fn put_back(&self, registry: &Registry, unwritten: Unwritten) {
        if let (Some(ob), Some(staged)) = (self.outbox.get(), unwritten.outbox) {
            ob.abandon(staged.batches);
            if staged.full {
                ob.set_full_pending();
            }
            let mut r = self
                .outbox_recovery
                .lock()
                .expect("recovery lock is never poisoned");
            let newer = std::mem::replace(&mut *r, staged.recovered);
            r.extend(newer);
        }
        if !unwritten.snapshots.is_empty() {
            registry.requeue_dirty(unwritten.snapshots);
        }
        if let Some(failed) = unwritten.queue {
            let failed = Arc::unwrap_or_clone(failed);
            let mut queue = self.queue.lock().expect("queue lock is never poisoned");
            let newer = std::mem::take(&mut *queue);
            queue.history = failed.history;
            queue.history.extend(newer.history);
            queue.events = failed.events;
            queue.events.extend(newer.events);
            queue.records = failed.records;
            queue.records.extend(newer.records);
            queue.meta = failed.meta;
            queue.meta.extend(newer.meta);
            queue.bytes = failed.bytes + newer.bytes;
        }
    }

    /// The flush is over (written or put back): readers no longer look at what it took.
    fn done_writing(&self) {
        *self
            .in_flight
            .lock()
            .expect("in-flight lock is never poisoned") = None;
    }

    /// `q` is on disk: its bytes leave the queue's bound, and waiters on flush `generation`
    /// (replication acks) are woken.
    fn release_durable(&self, q: &Queue, generation: u64) {
        self.room
            .add_permits(q.bytes.min(self.cfg.max_queued_bytes));
        self.flushed.send_replace(generation);
    }

    fn count_flush(&self, q: &Queue, snapshots_written: u64, started: Instant) {
        let span = tracing::Span::current();
        if !span.is_none() {
            span.record("ferrotwin.snapshots", snapshots_written as i64);
            span.record("ferrotwin.chunks", q.history.len() as i64);
            span.record("ferrotwin.events", q.events.len() as i64);
            span.record("ferrotwin.bytes", q.bytes as i64);
        }
        self.stats.flushes.fetch_add(1, Ordering::Relaxed);
        self.stats
            .snapshots_written
            .fetch_add(snapshots_written, Ordering::Relaxed);
        self.stats
            .chunks_written
            .fetch_add(q.history.len() as u64, Ordering::Relaxed);
        self.stats
            .events_written
            .fetch_add(q.events.len() as u64, Ordering::Relaxed);
        self.stats
            .last_flush_us
            .store(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// The outbox batches of one flush: the twins whose snapshots it writes (every twin when
    /// a full snapshot is due), the events it writes and any events recovered at open.
    /// What it took (the full-snapshot flag, the recovered events) is put back if the flush
    /// fails.
    fn stage_outbox(
        &self,
        ob: &outbox::Outbox,
        registry: &Registry,
        dirty: &[Arc<TwinEntry>],
        q: &Queue,
        snapshots: bool,
    ) -> StagedOutbox {
        // A full snapshot goes with a snapshot round (it encodes every twin).
        let full = snapshots && ob.take_full_pending();
        let all;
        let twins_of: &[Arc<TwinEntry>] = if full {
            all = registry.all();
            &all
        } else {
            dirty
        };
        let site = self
            .outbox_site
            .lock()
            .expect("site lock is never poisoned")
            .clone();
        let in_site = |p: &str| {
            site.as_ref()
                .is_none_or(|s| p == s.as_str() || p.starts_with(&format!("{s}/")))
        };
        let twins = twins_of
            .iter()
            .filter(|e| in_site(e.path().as_str()))
            .filter_map(|e| {
                // Without learned detector state: it stays at the site.
                codec::snapshot_record(e, false).map(|r| rec::TwinDelta {
                    id: e.id.as_bytes().to_vec(),
                    record: Some(r),
                })
            })
            .collect();
        let recovered = std::mem::take(
            &mut *self
                .outbox_recovery
                .lock()
                .expect("recovery lock is never poisoned"),
        );
        let mut events = recovered.clone();
        for (seq, v) in &q.events {
            match rec::EventRecord::decode(v.as_slice()) {
                // Events outside the site (e.g. of the enterprise twin) stay local.
                Ok(event) if !in_site(&event.path) => {}
                Ok(event) => events.push(rec::OutboxEvent {
                    seq: *seq,
                    event: Some(event),
                }),
                Err(e) => tracing::error!(seq, error = %e, "event record does not decode"),
            }
        }
        let history = ob.history_of(&q.history);
        StagedOutbox {
            batches: ob.prepare(twins, events, history, full, Timestamp::now().0),
            full,
            recovered,
        }
    }

    /// Asks the writer for a flush now (and waits for nothing).
    pub fn nudge(&self) {
        *self.wake_lock.lock().expect("wake lock is never poisoned") = true;
        self.wake.notify_one();
    }

    /// Ends the writer after one final flush.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
        self.nudge();
    }

    /// Ends the writer without writing what it holds (crash tests).
    pub fn abort(&self) {
        self.aborting.store(true, Ordering::Release);
        self.room.close();
        self.nudge();
    }

    /// Visits what is not on disk yet: the queue, then what the writer is writing. In that
    /// order a record moving from one to the other (and on to sled) is seen at least once.
    fn each_unwritten(&self, mut f: impl FnMut(&Queue)) {
        f(&self.queue.lock().expect("queue lock is never poisoned"));
        let writing = self
            .in_flight
            .lock()
            .expect("in-flight lock is never poisoned")
            .clone();
        if let Some(q) = writing {
            f(&q);
        }
    }

    /// The history tree of `day`, opened on first use.
    fn partition(&self, day: i64) -> Result<sled::Tree, StoreError> {
        let mut parts = self.history.lock().expect("history lock is never poisoned");
        if let Some(t) = parts.get(&day) {
            return Ok(t.clone());
        }
        let t = self
            .db
            .open_tree(format!("{HISTORY_TREE_PREFIX}{day}"))
            .map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
        parts.insert(day, t.clone());
        Ok(t)
    }

    /// Drops the history day partitions that lie wholly before `now - retention` (so history
    /// is kept between `retention` and `retention` + 1 day) and the events older than their
    /// retention (at most `MAX_EVENTS_PER_SWEEP` per call). Returns (days, events) removed.
    pub fn apply_retention(&self, now: Timestamp) -> Result<(usize, usize), StoreError> {
        let days = self.drop_old_history(now)?;
        let cutoff = now.0 - (self.cfg.event_retention_hours as i64) * 3_600_000_000;
        let mut events = 0;
        for kv in self.events.iter().take(MAX_EVENTS_PER_SWEEP) {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            let ts = rec::EventRecord::decode(&*v).map_or(i64::MIN, |r| r.ts_us);
            if ts >= cutoff {
                break;
            }
            self.events.remove(k).map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            events += 1;
        }
        Ok((days, events))
    }

    fn drop_old_history(&self, now: Timestamp) -> Result<usize, StoreError> {
        let cutoff = now.0 - (self.cfg.history_retention_hours as i64) * 3_600_000_000;
        let mut parts = self.history.lock().expect("history lock is never poisoned");
        let old: Vec<i64> = parts
            .keys()
            .copied()
            .filter(|d| (d + 1) * DAY_US <= cutoff)
            .collect();
        for d in &old {
            parts.remove(d);
            self.db
                .drop_tree(format!("{HISTORY_TREE_PREFIX}{d}"))
                .map_err(|source| StoreError::Io {
                    dir: self.dir.clone(),
                    source,
                })?;
        }
        Ok(old.len())
    }

    /// Stored history of one property in `[from, to]`, in time order.
    /// Refuses (`TooMuchHistory`) once more than `max_raw` points would be read.
    pub fn read_history(
        &self,
        id: AssetId,
        property: Property,
        from: Timestamp,
        to: Timestamp,
        max_raw: usize,
    ) -> Result<Vec<HistPoint>, StoreError> {
        let mut prefix = Vec::with_capacity(17);
        prefix.extend_from_slice(id.as_bytes());
        prefix.push(property.code());
        let io = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        let end = history_key(id, property, Timestamp(to.0.saturating_add(1)));
        let from_key = history_key(id, property, from);
        let parts: Vec<(i64, sled::Tree)> = self
            .history
            .lock()
            .expect("history lock is never poisoned")
            .range(..=day_of(to))
            .map(|(d, t)| (*d, t.clone()))
            .collect();
        // A chunk that starts before `from` may reach into the range: find the last one
        // before `from` (in `from`'s day or the newest earlier day that has one).
        let mut earlier: Option<Vec<u8>> = None;
        for (_, t) in parts.iter().rev().filter(|(d, _)| *d <= day_of(from)) {
            if let Some((_, v)) = t
                .range(prefix.clone()..from_key.clone())
                .next_back()
                .transpose()
                .map_err(io)?
            {
                earlier = Some(v.to_vec());
                break;
            }
        }
        let mut out = Vec::new();
        // Queued and in-flight chunks first (see `in_flight` for why this order).
        let mut pending: Vec<Vec<u8>> = Vec::new();
        self.each_unwritten(|q| {
            for (_, k, v) in &q.history {
                if k.starts_with(&prefix) {
                    pending.push(v.clone());
                }
            }
        });
        for v in pending {
            let points = codec::decode_chunk(&v).map_err(|what| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "history",
                key: "(queued)".into(),
                what,
            })?;
            out.extend(points.into_iter().filter(|p| p.ts >= from && p.ts <= to));
        }
        let stored = parts
            .iter()
            .filter(|(d, _)| *d >= day_of(from))
            .map(|(_, t)| t.range(from_key.clone()..end.clone()));
        for kv in earlier
            .into_iter()
            .map(|v| Ok((sled::IVec::from(&[][..]), sled::IVec::from(v))))
            .chain(stored.flatten())
        {
            let (k, v) = kv.map_err(io)?;
            let points = codec::decode_chunk(&v).map_err(|what| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "history",
                key: hex(&k),
                what,
            })?;
            out.extend(points.into_iter().filter(|p| p.ts >= from && p.ts <= to));
            if out.len() > max_raw {
                return Err(StoreError::TooMuchHistory { max_raw });
            }
        }
        out.sort_by_key(|p| p.ts);
        out.dedup_by(|a, b| a.ts == b.ts && a.value.to_bits() == b.value.to_bits());
        Ok(out)
    }

    /// Stored events matching `filter`, in seq order. Returns them and the seq to continue
    /// after (0 = nothing more).
    pub fn list_events(&self, filter: &EventFilter) -> Result<(Vec<Event>, u64), StoreError> {
        let start = filter.after_seq.saturating_add(1).to_be_bytes();
        let limit = filter.limit.max(1);
        // Queued and in-flight events first (see `in_flight` for why this order); they are
        // all newer than what is on disk.
        let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
        self.each_unwritten(|q| {
            pending.extend(
                q.events
                    .iter()
                    .filter(|(seq, _)| *seq > filter.after_seq)
                    .cloned(),
            );
        });
        let (mut out, next) = self.list_stored_events(filter, &start, limit)?;
        if next != 0 {
            return Ok((out, next));
        }
        pending.sort_by_key(|(seq, _)| *seq);
        pending.dedup_by_key(|(seq, _)| *seq);
        let last_stored = out.last().map_or(filter.after_seq, |e| e.seq);
        for (seq, v) in pending {
            if seq <= last_stored || out.iter().any(|e| e.seq == seq) {
                continue;
            }
            let ev = codec::decode_event(seq, &v).map_err(|what| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "events",
                key: format!("{seq} (queued)"),
                what,
            })?;
            if Self::event_matches(filter, &ev) {
                out.push(ev);
                if out.len() == limit {
                    return Ok((out, seq));
                }
            }
        }
        Ok((out, 0))
    }

    fn event_matches(filter: &EventFilter, ev: &Event) -> bool {
        filter
            .prefix
            .as_ref()
            .is_none_or(|p| ev.asset.starts_with(p))
            && filter.kind.is_none_or(|k| k == ev.kind)
            && ev.severity >= filter.min_severity
    }

    fn list_stored_events(
        &self,
        filter: &EventFilter,
        start: &[u8; 8],
        limit: usize,
    ) -> Result<(Vec<Event>, u64), StoreError> {
        let mut out = Vec::new();
        for (scanned, kv) in self.events.range(*start..).enumerate() {
            let (k, v) = kv.map_err(|source| StoreError::Io {
                dir: self.dir.clone(),
                source,
            })?;
            let seq = seq_of(&k).unwrap_or(0);
            if scanned >= MAX_EVENT_SCAN {
                return Ok((out, seq - 1));
            }
            let ev = codec::decode_event(seq, &v).map_err(|what| StoreError::Corrupt {
                dir: self.dir.clone(),
                tree: "events",
                key: seq.to_string(),
                what,
            })?;
            if !Self::event_matches(filter, &ev) {
                continue;
            }
            out.push(ev);
            if out.len() == limit {
                return Ok((out, seq));
            }
        }
        Ok((out, 0))
    }
}

/// Whether any tree of a sled database holds a record.
fn has_data(db: &sled::Db) -> bool {
    db.tree_names()
        .iter()
        .any(|name| db.open_tree(name).map(|t| !t.is_empty()).unwrap_or(true))
}

const HISTORY_TREE_PREFIX: &str = "history-";
const SEQ_RESERVED_KEY: &str = "seq_reserved";
const SEQ_BLOCK: u64 = 10_000;
const MAX_EVENTS_PER_SWEEP: usize = 100_000;
const DAY_US: i64 = 86_400_000_000;

fn day_of(ts: Timestamp) -> i64 {
    ts.0.div_euclid(DAY_US)
}

fn ts_key(ts: Timestamp) -> [u8; 8] {
    // Offset so negative times sort before positive ones.
    ((ts.0 as u64) ^ (1 << 63)).to_be_bytes()
}

fn history_key(id: AssetId, property: Property, ts: Timestamp) -> Vec<u8> {
    let mut k = Vec::with_capacity(25);
    k.extend_from_slice(id.as_bytes());
    k.push(property.code());
    k.extend_from_slice(&ts_key(ts));
    k
}

/// A big-endian u64 key or value (event and outbox seqs, cursors).
pub(crate) fn seq_of(k: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(k.try_into().ok()?))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use ferrotwin_models::QualityCode;

    use super::*;

    #[test]
    fn refuses_a_store_of_another_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path(), StoreConfig::default()).expect("open");
            let meta = s.db.open_tree("meta").expect("meta");
            let m = rec::Meta {
                format: 99,
                created_by: "future".into(),
            };
            meta.insert("meta", m.encode_to_vec()).expect("insert");
            s.db.flush().expect("flush");
        }
        let err = Store::open(dir.path(), StoreConfig::default())
            .err()
            .expect("must fail");
        assert!(matches!(err, StoreError::Format { found: 99, .. }), "{err}");
    }

    #[test]
    fn a_corrupt_data_dir_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let _s = Store::open(dir.path(), StoreConfig::default()).expect("open");
        }
        for entry in std::fs::read_dir(dir.path()).expect("read dir") {
            let p = entry.expect("entry").path();
            if p.is_file() {
                std::fs::write(&p, b"garbage that is not a sled file").expect("write");
            }
        }
        let err = Store::open(dir.path(), StoreConfig::default())
            .err()
            .expect("must fail");
        assert!(
            err.to_string().contains(&dir.path().display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn history_chunks_read_back_across_days_and_whole_old_days_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path(), StoreConfig::default()).expect("open"));
        let registry = Registry::default();
        let id = AssetPath::parse("a/b/c/d/e/f").expect("path").id();
        let day_ms = DAY_US / 1000;
        // Three chunks of 10 points, 100 ms apart; the second straddles midnight.
        let starts = [day_ms - 2_000, day_ms - 50, day_ms + 1_000];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        rt.block_on(async {
            for (c, start) in starts.iter().enumerate() {
                let pts: Vec<HistPoint> = (0..10)
                    .map(|i| HistPoint {
                        ts: Timestamp::from_millis(start + i * 10),
                        value: (c * 10) as f64 + i as f64,
                        quality: QualityCode::Good,
                    })
                    .collect();
                store.append_history(id, Property::Value, &pts).await;
            }
        });
        let read = |from: i64, to: i64| {
            store
                .read_history(
                    id,
                    Property::Value,
                    Timestamp::from_millis(from),
                    Timestamp::from_millis(to),
                    usize::MAX,
                )
                .expect("read")
        };
        // Queued (not yet written) chunks are visible too.
        assert_eq!(read(0, 2 * day_ms).len(), 30);
        store.flush_once(&registry, true).expect("flush");
        let pts = read(day_ms, day_ms + 1_050);
        // 5 points of the straddling chunk after midnight, 6 of the third.
        assert_eq!(pts.len(), 11, "{pts:?}");
        assert_eq!(pts.first().map(|p| p.value), Some(15.0));
        assert_eq!(pts.last().map(|p| p.value), Some(25.0));
        let dropped = store
            .apply_retention(Timestamp::from_millis(day_ms + 7 * 24 * 3_600_000 + 1))
            .expect("retention");
        assert_eq!(dropped, (1, 0), "day 0 is wholly past the retention window");
        assert_eq!(read(0, 2 * day_ms).len(), 10, "day 1 kept");
    }

    /// sled does not fail on demand, so the failure path is driven step by step: a flush
    /// takes its round, something newer is queued meanwhile, the round is put back; the next
    /// flush must write all of it, older first, as the one full snapshot the outbox owed.
    #[test]
    fn a_failed_flush_puts_its_round_back_ahead_of_what_came_since() {
        use ferrotwin_models::Level;
        use ferrotwin_sim::generate::{PlantSize, generate};

        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig::default();
        let room = cfg.max_queued_bytes;
        let store = Store::open(dir.path(), cfg).expect("open");
        let registry = Registry::default();
        for def in generate(PlantSize::ONE_LINE, 1).assets() {
            let snap = crate::core::TwinSnapshot::initial(&def.kind);
            registry.insert(def, snap, 0);
        }
        // Only sensors and machines are stored (roll-ups are rebuilt at start).
        let twins: Vec<_> = registry
            .all()
            .into_iter()
            .filter(|e| matches!(e.level(), Level::Sensor | Level::Machine))
            .collect();
        for e in &twins {
            registry.publish(e, e.snapshot());
        }
        let ob = store.enable_outbox(1 << 30, None).expect("outbox");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("rt");
        let event = |n: i64| {
            let mut e = Event::new(
                AssetPath::parse("acme").expect("path"),
                Timestamp::from_millis(n),
                EventKind::Lifecycle,
                Severity::Info,
                format!("event {n}"),
            );
            rt.block_on(store.put_event(&mut e));
            e.seq
        };
        let older = event(1);

        let dirty = store.take_dirty_within_budget(&registry, true);
        assert_eq!(dirty.len(), twins.len());
        let (q, _) = store.take_queue();
        let staged = store.stage_outbox(ob, &registry, &dirty, &q, true);
        assert!(staged.full);
        let newer = event(2);
        store.put_back(
            &registry,
            Unwritten {
                snapshots: dirty,
                queue: Some(q),
                outbox: Some(staged),
            },
        );
        store.done_writing();
        assert_eq!(registry.dirty_len(), twins.len());

        store.flush_once(&registry, true).expect("flush");
        assert_eq!(registry.dirty_len(), 0);
        assert_eq!(
            store.room.available_permits(),
            room,
            "queued bytes released once"
        );
        let (on_disk, _) = store
            .list_events(&EventFilter {
                limit: 10,
                ..EventFilter::default()
            })
            .expect("events");
        let seqs: Vec<u64> = on_disk.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [older, newer]);
        let batches = ob.read_after(0, usize::MAX).expect("outbox");
        let batch = rec::OutboxBatch::decode(batches[0].1.as_slice()).expect("decodes");
        assert!(
            batch.full_snapshot_id > 0,
            "the full snapshot is still owed"
        );
        assert_eq!(batch.twins.len(), twins.len());
        let staged_seqs: Vec<u64> = batches
            .iter()
            .flat_map(|(_, v)| {
                rec::OutboxBatch::decode(v.as_slice())
                    .expect("decodes")
                    .events
            })
            .map(|e| e.seq)
            .collect();
        assert_eq!(staged_seqs, [older, newer]);
    }

    /// Templates keep their version order, the newest is read alone, past `keep` the
    /// oldest go, and a site's prefix does not reach a site whose name begins the same.
    #[test]
    fn fleet_templates_keep_the_newest_versions_per_site() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), StoreConfig::default()).expect("open");
        let t = |version: u64| rec::SiteTemplateRecord {
            version,
            plant_toml: format!("v{version}"),
            ..Default::default()
        };
        assert_eq!(store.newest_template("acme/ly").expect("read"), None);
        for v in 1..=300 {
            store.put_template("acme/ly", &t(v), 3).expect("kept");
        }
        store.put_template("acme/lyon", &t(1), 3).expect("kept");
        let kept: Vec<u64> = store
            .templates("acme/ly")
            .expect("read")
            .iter()
            .map(|t| t.version)
            .collect();
        assert_eq!(kept, [298, 299, 300], "in order (256 sorts after 255)");
        assert_eq!(
            store
                .newest_template("acme/ly")
                .expect("read")
                .map(|t| t.version),
            Some(300)
        );
        assert_eq!(store.templates("acme/lyon").expect("read").len(), 1);
    }
}
