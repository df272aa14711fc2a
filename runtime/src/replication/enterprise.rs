//! The enterprise's side of replication: one stream per site, applied to the mirror twins.
//!
//! Continuous: a batch is applied only when the batch it says it follows
//! (`SiteBatch::after`) is at or below the site's cursor; seqs it skips past the cursor are
//! batches the site no longer has, reported as an event. Its events must be in order and
//! close together; events the enterprise never got are reported as a gap, not refused (a
//! site cannot send again what it lost). Anything malformed is refused whole, never acked and
//! never applied, with an event naming the site and the seqs. A seq at or below the cursor
//! is a resend: acked again, not applied; an event at or below the event cursor is skipped
//! (a site that crashed may stage an event twice). Reconciled: the site's hello says what it
//! has; cursors past it (a forged batch, a site restored from an older data dir) are rewound
//! to it, reported at both ends, and the site sends a full snapshot. One stream per site: a
//! second one is refused while the first was heard from (batches, or heartbeats every 2 s)
//! in the last 6 s, so hello storms and impostors cannot displace a live site; a silent one
//! (half-open) is replaced. Durable before ack: the mirror records, the events and the
//! cursors go out in one store flush, and a seq is acked once that flush is on disk.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetId, AssetPath, Event, EventKind, Property, Severity, Timestamp};
use ferrotwin_proto::store::v1 as rec;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_server::ReplicationService;
use prost::Message;
use tokio::sync::{OwnedMutexGuard, mpsc};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;

use super::{PROTOCOL_VERSION, cursor_key, event_cursor_key, u64_of};
use crate::core::TwinMsg;
use crate::store::codec;
use crate::telemetry;
use crate::twin::TwinCtx;

/// Applied batches whose ack waits for a flush, per stream.
const PENDING_ACKS: usize = 1024;
/// Most batch seqs one batch may say the site skipped (dropped at its outbox limit), and
/// most event seqs between two events of a batch (events of the site's store outside the
/// site stay there). Beyond, the batch is refused: one hostile or corrupt batch cannot move
/// a cursor where the site's later batches would all look like resends (and a forged move
/// within the bound is undone at the site's next hello).
pub const MAX_SEQ_GAP: u64 = 1 << 20;
/// How long a new stream of a site waits for its previous stream to end (a site that
/// reconnects right after its link broke), and for a silent one it replaces to let go.
const PREVIOUS_STREAM_WAIT: Duration = Duration::from_secs(3);
/// A stream heard from (a batch or a heartbeat) within this window is live: a second stream
/// of its site is refused. One silent for longer is taken for half-open and replaced.
const LIVE_WINDOW_US: i64 = 6_000_000;
/// At most one refusal, skip or event-gap event (each) per site in this window (the rest are counted and
/// logged): a peer that sends garbage in a loop cannot flood the event log.
const REPORT_EVERY_US: i64 = 10_000_000;

/// What replication reports about a site, each kind limited on its own.
#[derive(Debug, Clone, Copy)]
enum Report {
    Refused = 0,
    Skipped = 1,
    EventGap = 2,
}

/// The checked events of one batch.
#[derive(Debug, Default)]
struct EventsCheck {
    /// Events to apply, in seq order.
    events: Vec<Event>,
    /// The event cursor after the batch.
    next: u64,
    /// Events at or below the cursor (resends) and outside the site, skipped.
    duplicates: u64,
    foreign: u64,
    /// Site event seqs that never arrived (no dropped range covers them).
    gap: Option<(u64, u64)>,
}

/// What the enterprise knows about one site it accepts.
#[derive(Debug, Default)]
pub struct SiteMirror {
    /// Highest seq applied (queued for the store).
    pub applied_seq: AtomicU64,
    /// Highest seq on the enterprise's disk: what a welcome reports, so a site never trims
    /// what a crash here could still lose.
    pub durable_seq: AtomicU64,
    /// Twin deltas and history chunks for assets outside the site: skipped.
    pub foreign: AtomicU64,
    pub event_seq: AtomicU64,
    /// When a batch of this site was last applied (µs since the epoch; 0 = never).
    pub synced_us: AtomicU64,
    pub batches: AtomicU64,
    pub duplicates: AtomicU64,
    /// Events at or below the event cursor, skipped.
    pub duplicate_events: AtomicU64,
    /// Twin deltas for assets the enterprise's plant does not have.
    pub unknown_twins: AtomicU64,
    /// Batches refused: never acked, never applied.
    pub refused: AtomicU64,
    /// Batch seqs the site said it skipped.
    pub skipped_batches: AtomicU64,
    /// Site event seqs that never arrived, in all.
    pub event_gaps: AtomicU64,
    /// Cursor rewinds to what the site's hello said.
    pub rewinds: AtomicU64,
    /// Streams refused while another of the site was open.
    pub streams_refused: AtomicU64,
    /// When the last event of each `Report` kind was raised for this site (µs since the
    /// epoch).
    last_report_us: [AtomicI64; 3],
    /// One stream per site at a time.
    stream: Arc<tokio::sync::Mutex<()>>,
    /// The current stream's token (cancelled to replace a silent stream).
    current: std::sync::Mutex<Option<CancellationToken>>,
    /// When the current stream was last heard from (µs since the epoch).
    heard_us: AtomicI64,
    /// The site's plant as last applied here (its version and text): an unchanged plant in
    /// a hello is not applied again.
    plant: std::sync::Mutex<Option<(u64, String)>>,
    /// What its last hello said of its fleet template: the version applied, the last error.
    pub fleet: std::sync::Mutex<(u64, String)>,
    /// Why its plant was last not taken (an event is raised when it changes, not at every
    /// hello).
    plant_error: std::sync::Mutex<String>,
}

/// Fleet template versions an enterprise keeps per site.
pub const KEEP_TEMPLATES: usize = 20;

/// What makes a site's plant the enterprise's (given by the runtime: a live apply of the
/// enterprise's plant with the site's put in). Answers what changed, or why it was not
/// applied.
pub type PlantHook = Arc<
    dyn Fn(AssetPath, u64, String) -> Pin<Box<dyn Future<Output = Result<String, String>> + Send>>
        + Send
        + Sync,
>;

/// Most bytes of a site's plant in a hello.
pub const MAX_SITE_PLANT_BYTES: usize = 4 << 20;

pub struct EnterpriseReceiver {
    ctx: Arc<TwinCtx>,
    sites: HashMap<String, Arc<SiteMirror>>,
    /// Set once the runtime's live apply exists; without it sites' plants are not followed.
    plant_hook: std::sync::OnceLock<PlantHook>,
    /// Template pushes one at a time (each takes the next version number).
    pub fleet_lock: tokio::sync::Mutex<()>,
    /// Streams end when the runtime stops, and its shutdown waits for them.
    token: CancellationToken,
    tracker: TaskTracker,
}

impl EnterpriseReceiver {
    /// Accepts the sites of `accept` (each a site of the plant's enterprise: its own plant
    /// arrives with its first hello), with their cursors from the store.
    pub fn new(
        ctx: Arc<TwinCtx>,
        accept: &[String],
        token: CancellationToken,
        tracker: TaskTracker,
    ) -> Result<EnterpriseReceiver, String> {
        let mut sites = HashMap::new();
        for s in accept {
            let path = AssetPath::parse(s).map_err(|e| format!("enterprise.accept: {s:?}: {e}"))?;
            let root = ctx.plant().root.as_ref().map(|r| r.path.clone());
            let is_site = match ctx.registry.by_path(&path) {
                Some(e) => matches!(e.def.kind, AssetKind::Site),
                None => path.depth() == 2 && path.parent() == root,
            };
            if !is_site {
                return Err(format!(
                    "enterprise.accept: {s:?} is not a site of this enterprise"
                ));
            }
            let m = SiteMirror::default();
            let read = |k: Vec<u8>| ctx.store.meta_value(&k).map(u64_of);
            let cursor = read(cursor_key(s)).map_err(|e| e.to_string())?;
            m.applied_seq.store(cursor, Ordering::Relaxed);
            m.durable_seq.store(cursor, Ordering::Relaxed);
            m.event_seq.store(
                read(event_cursor_key(s)).map_err(|e| e.to_string())?,
                Ordering::Relaxed,
            );
            sites.insert(path.as_str().to_owned(), Arc::new(m));
        }
        Ok(EnterpriseReceiver {
            ctx,
            sites,
            plant_hook: std::sync::OnceLock::new(),
            fleet_lock: tokio::sync::Mutex::new(()),
            token,
            tracker,
        })
    }

    /// Each accepted site: desired template version, applied version, its error, whether
    /// its stream is live.
    pub fn fleet_status(&self) -> Vec<(String, u64, u64, String, bool)> {
        let mut out: Vec<_> = self
            .sites
            .iter()
            .map(|(site, m)| {
                let desired = self
                    .ctx
                    .store
                    .newest_template(site)
                    .ok()
                    .flatten()
                    .map_or(0, |t| t.version);
                let (applied, error) = m.fleet.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let live = Timestamp::now().0 - m.heard_us.load(Ordering::Acquire) < LIVE_WINDOW_US
                    && m.current
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .is_some();
                (site.clone(), desired, applied, error, live)
            })
            .collect();
        out.sort();
        out
    }

    /// Whether this enterprise accepts `site`.
    pub fn accepts(&self, site: &str) -> bool {
        self.sites.contains_key(site)
    }

    /// Ends `site`'s stream: its next hello gets its new template.
    pub fn kick(&self, site: &str) {
        if let Some(m) = self.sites.get(site)
            && let Some(t) = m.current.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
        {
            t.cancel();
        }
    }

    /// How sites' plants become the enterprise's (once, at start).
    pub fn set_plant_hook(&self, hook: PlantHook) {
        let _ = self.plant_hook.set(hook);
    }

    /// A site's plant from its hello: applied to the enterprise's plant unless it is the one
    /// applied last; a refusal is an event at the site (or the enterprise, before the site is
    /// known here) and replication goes on (deltas of twins the enterprise lacks are
    /// counted as unknown).
    async fn follow_plant(
        &self,
        site: &AssetPath,
        mirror: &SiteMirror,
        version: u64,
        toml: String,
    ) -> Result<(), String> {
        let Some(hook) = self.plant_hook.get() else {
            return Ok(());
        };
        let same = mirror
            .plant
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(v, t)| *v == version && *t == toml);
        if same {
            return Ok(());
        }
        let outcome = if toml.len() > MAX_SITE_PLANT_BYTES {
            Err(format!(
                "{} bytes, at most {MAX_SITE_PLANT_BYTES}",
                toml.len()
            ))
        } else {
            hook(site.clone(), version, toml.clone()).await
        };
        match outcome {
            Ok(done) => {
                tracing::info!(site = %site, site_plant_version = version, "{done}");
                *mirror.plant.lock().unwrap_or_else(|p| p.into_inner()) = Some((version, toml));
                mirror
                    .plant_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
                Ok(())
            }
            Err(why) => {
                let repeated = {
                    let mut last = mirror.plant_error.lock().unwrap_or_else(|p| p.into_inner());
                    let same = *last == why;
                    last.clone_from(&why);
                    same
                };
                if repeated {
                    return Err(why);
                }
                tracing::warn!(site = %site, site_plant_version = version, error = %why, "site plant not applied");
                let at = if self.ctx.registry.by_path(site).is_some() {
                    site.clone()
                } else {
                    self.ctx
                        .plant()
                        .root
                        .as_ref()
                        .map_or_else(|| site.clone(), |r| r.path.clone())
                };
                self.ctx
                    .emit(Event::new(
                        at,
                        Timestamp::now(),
                        EventKind::Model,
                        Severity::High,
                        format!("the plant {site} sent (its v{version}) was not applied: {why}"),
                    ))
                    .await;
                Err(why)
            }
        }
    }

    /// The accepted site `path` lies in, with its mirror state.
    pub fn site_of(&self, path: &AssetPath) -> Option<&Arc<SiteMirror>> {
        let site: String = path.segments().take(2).collect::<Vec<_>>().join("/");
        self.sites.get(&site)
    }

    /// The mirror twin `id` of `site`; `None` for an asset this enterprise's plant does not
    /// have or one outside the site, each counted in `skipped` (unknown, foreign) for the
    /// caller to add once the batch is applied.
    fn mirror_of(
        &self,
        id: AssetId,
        site: &AssetPath,
        skipped: &mut (u64, u64),
    ) -> Option<Arc<crate::registry::TwinEntry>> {
        let Some(entry) = self.ctx.registry.get(&id) else {
            skipped.0 += 1;
            return None;
        };
        if !entry.path().starts_with(site) {
            skipped.1 += 1;
            return None;
        }
        Some(entry)
    }

    /// The events of `batch` past the site's event cursor, checked: in seq order, each with
    /// a record that decodes, the first no further than `MAX_SEQ_GAP` past the event the
    /// batch says came before it (`events_after`) and each no further than that past the one
    /// before. Events at or below the cursor are resends and events outside the site are
    /// foreign: both counted once the batch is applied, never applied. A gap between the
    /// cursor and `events_after` that no dropped range of the batch covers is not refused
    /// (a site whose events were lost cannot send them again: refusing would stop it for
    /// good) but reported with the batch (`EventsCheck::gap`).
    fn new_events(
        &self,
        site: &AssetPath,
        seq: u64,
        cursor: u64,
        batch: &rec::OutboxBatch,
    ) -> Result<EventsCheck, Status> {
        let after = batch.events_after;
        let bad = |what: String| {
            Status::invalid_argument(format!("batch {seq}: {what}; refused, nothing applied"))
        };
        let mut check = EventsCheck {
            next: cursor,
            ..EventsCheck::default()
        };
        // `events_after` 0: a batch of an outbox written before protocol 2 (no predecessor
        // recorded): its events are bounded from the cursor, or not at all at first contact.
        let mut prev = [after, cursor].into_iter().find(|s| *s > 0);
        let mut last_seen = 0u64;
        for e in &batch.events {
            if e.seq <= last_seen {
                return Err(bad(format!(
                    "event {} comes after event {last_seen}: not in seq order",
                    e.seq
                )));
            }
            last_seen = e.seq;
            if let Some(p) = prev
                && e.seq.saturating_sub(p) > MAX_SEQ_GAP
            {
                return Err(bad(format!(
                    "event {} is {} past event {p} (at most {MAX_SEQ_GAP})",
                    e.seq,
                    e.seq - p
                )));
            }
            prev = Some(e.seq);
            if e.seq <= cursor {
                check.duplicates += 1;
                continue;
            }
            let Some(r) = &e.event else {
                return Err(bad(format!("event {} has no record", e.seq)));
            };
            let mut ev = codec::decode_event(e.seq, &r.encode_to_vec())
                .map_err(|what| bad(format!("event {}: {what}", e.seq)))?;
            check.next = e.seq;
            if !ev.asset.starts_with(site) {
                check.foreign += 1;
                continue;
            }
            ev.seq = 0;
            check.events.push(ev);
        }
        let covered = batch.dropped_events_from > 0
            && batch.dropped_events_from <= cursor + 1
            && batch.dropped_events_to >= after;
        if cursor > 0 && after > cursor && !covered && check.next > cursor {
            check.gap = Some((cursor + 1, after));
        }
        Ok(check)
    }

    /// A refusal or a skip of `site`: logged always, an event at most once per
    /// `REPORT_EVERY_US` (the rest are counted by the caller).
    async fn report(
        &self,
        site: &AssetPath,
        mirror: &SiteMirror,
        kind: Report,
        severity: Severity,
        text: String,
    ) {
        tracing::warn!(site = %site, "{text}");
        let now = Timestamp::now();
        let slot = &mirror.last_report_us[kind as usize];
        let last = slot.load(Ordering::Relaxed);
        if now.0 - last < REPORT_EVERY_US
            || slot
                .compare_exchange(last, now.0, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        self.site_event(site, severity, text).await;
    }

    /// A lifecycle event on `site` (replication's own news about it).
    async fn site_event(&self, site: &AssetPath, severity: Severity, text: String) {
        self.ctx
            .emit(Event::new(
                site.clone(),
                Timestamp::now(),
                EventKind::Lifecycle,
                severity,
                text,
            ))
            .await;
    }

    /// The site's hello says what it has (`last_seq`, `event_hwm`): a cursor past it (a
    /// forged or corrupt batch, or a site restored from an older data dir) is rewound to it,
    /// with an event, so the site's batches after it are applied, not taken for resends.
    /// Returns whether anything was rewound.
    async fn reconcile(
        &self,
        site: &AssetPath,
        mirror: &SiteMirror,
        last_seq: u64,
        event_hwm: u64,
    ) -> bool {
        let mut metas = Vec::new();
        let mut what = Vec::new();
        let applied = mirror.applied_seq.load(Ordering::Acquire);
        if applied > last_seq {
            mirror.applied_seq.store(last_seq, Ordering::Release);
            mirror.durable_seq.fetch_min(last_seq, Ordering::AcqRel);
            metas.push((cursor_key(site.as_str()), last_seq.to_be_bytes().to_vec()));
            what.push(format!(
                "its batch cursor was at {applied}, past the site's last batch {last_seq}"
            ));
        }
        let events = mirror.event_seq.load(Ordering::Acquire);
        if events > event_hwm {
            mirror.event_seq.store(event_hwm, Ordering::Release);
            metas.push((
                event_cursor_key(site.as_str()),
                event_hwm.to_be_bytes().to_vec(),
            ));
            what.push(format!(
                "its event cursor was at {events}, past the site's last event {event_hwm}"
            ));
        }
        if metas.is_empty() {
            return false;
        }
        mirror.rewinds.fetch_add(1, Ordering::Relaxed);
        self.ctx
            .store
            .put_records(Vec::new(), Vec::new(), metas)
            .await;
        let text = format!(
            "replication of {site} reconciled with the site: {}; rewound to what the site has (a forged or corrupt batch, or a site restored from an older data dir); the site sends a full snapshot",
            what.join("; ")
        );
        tracing::warn!(site = %site, "{text}");
        self.site_event(site, Severity::High, text).await;
        true
    }

    /// Applies one batch of `site` that says it follows `after`; returns the store flush its
    /// effects go out with, or `None` for a resend. A batch that does not continue the
    /// cursor exactly, skips too far, does not decode, or whose events leave a gap is
    /// refused whole: nothing of it is applied and it is never acked.
    async fn apply(
        &self,
        site: &AssetPath,
        mirror: &SiteMirror,
        batch_of: (u64, u64),
        site_last: u64,
        bytes: &[u8],
    ) -> Result<Option<u64>, Status> {
        let (seq, after) = batch_of;
        let applied = mirror.applied_seq.load(Ordering::Acquire);
        if seq <= applied {
            mirror.duplicates.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        // The batch must follow something the enterprise has: a predecessor past the cursor
        // means batches in between never arrived (the site resends from the cursor on its
        // next stream). One at or below it (the site resumed after what the enterprise had
        // made durable) continues it; seqs past the cursor it skips are batches the site no
        // longer has.
        if after > applied || seq <= after {
            return Err(Status::failed_precondition(format!(
                "batch {seq} says it follows {after}, but the cursor of {site} is {applied}; refused, nothing applied"
            )));
        }
        let limit = site_last.max(applied).saturating_add(MAX_SEQ_GAP);
        if seq > limit {
            return Err(Status::failed_precondition(format!(
                "batch {seq} is past what the site said it has ({site_last}) by more than {MAX_SEQ_GAP}; refused, nothing applied"
            )));
        }
        let skipped = seq - applied - 1;
        let batch = rec::OutboxBatch::decode(bytes).map_err(|e| {
            Status::invalid_argument(format!("batch {seq}: not an outbox batch: {e}"))
        })?;
        if batch.seq != seq {
            return Err(Status::invalid_argument(format!(
                "batch {seq}: carries outbox seq {}",
                batch.seq
            )));
        }
        let cursor = mirror.event_seq.load(Ordering::Acquire);
        let checked = self.new_events(site, seq, cursor, &batch)?;
        let event_seq = checked.next;
        // Everything is checked before anything is applied: a refused batch leaves no trace.
        let mut mirrors = Vec::with_capacity(batch.twins.len());
        let mut records = Vec::with_capacity(batch.twins.len());
        // (unknown to this plant, outside the site), counted once the batch is applied.
        let mut skipped_assets = (0u64, 0u64);
        for d in &batch.twins {
            let (Ok(id), Some(r)) = (<[u8; 16]>::try_from(d.id.as_slice()), &d.record) else {
                return Err(Status::invalid_argument(format!(
                    "batch {seq}: a twin delta without a 16-byte id or a record"
                )));
            };
            let id = AssetId::from_bytes(id);
            let Some(entry) = self.mirror_of(id, site, &mut skipped_assets) else {
                continue;
            };
            let snap = Arc::new(codec::decode_snapshot(&entry.def.kind, r, false));
            mirrors.push((entry, snap));
            records.push((id, r.encode_to_vec()));
        }
        let mut history = Vec::with_capacity(batch.history.len());
        for h in &batch.history {
            let bad = |what: &str| {
                Status::invalid_argument(format!("batch {seq}: history chunk: {what}"))
            };
            let id = <[u8; 16]>::try_from(h.id.as_slice())
                .map(AssetId::from_bytes)
                .map_err(|_| bad("id is not 16 bytes"))?;
            let property = u8::try_from(h.property)
                .ok()
                .and_then(Property::from_code)
                .ok_or_else(|| bad("unknown property"))?;
            if self.mirror_of(id, site, &mut skipped_assets).is_none() {
                continue;
            }
            let first = codec::decode_chunk(&h.chunk)
                .map_err(|e| bad(&e))?
                .first()
                .map(|p| p.ts);
            if let Some(first) = first {
                history.push((id, property, first, h.chunk.clone()));
            }
        }
        for (entry, snap) in mirrors {
            match entry.actor() {
                Some(a) => {
                    let _ = a.cast(TwinMsg::Mirror(snap));
                }
                // Restarting: it starts from the registry's snapshot.
                None => self.ctx.publish(&entry, (*snap).clone()),
            }
        }
        for ev in checked.events {
            self.ctx.emit(ev).await;
        }
        mirror
            .duplicate_events
            .fetch_add(checked.duplicates, Ordering::Relaxed);
        mirror
            .foreign
            .fetch_add(checked.foreign + skipped_assets.1, Ordering::Relaxed);
        mirror
            .unknown_twins
            .fetch_add(skipped_assets.0, Ordering::Relaxed);
        if skipped > 0 {
            mirror.skipped_batches.fetch_add(skipped, Ordering::Relaxed);
            self.report(
                site,
                mirror,
                Report::Skipped,
                Severity::Medium,
                format!(
                    "site skipped batches {}..={} (it no longer has them: dropped at its outbox limit, or a failed flush); their twin state follows in a full snapshot",
                    applied + 1,
                    seq - 1
                ),
            )
            .await;
        }
        if let Some((from, to)) = checked.gap {
            mirror
                .event_gaps
                .fetch_add(to - from + 1, Ordering::Relaxed);
            self.report(
                site,
                mirror,
                Report::EventGap,
                Severity::High,
                format!(
                    "site events {from}..={to} never arrived (lost at the site or in a restore of either end); events continue after them"
                ),
            )
            .await;
        }
        if batch.dropped_events_from > 0 {
            self.site_event(
                site,
                Severity::High,
                format!(
                    "site outbox was full: events {}..={} were dropped before reaching the enterprise",
                    batch.dropped_events_from, batch.dropped_events_to
                ),
            )
            .await;
        }
        let key = site.as_str();
        let generation = self
            .ctx
            .store
            .put_records(
                records,
                history,
                vec![
                    (cursor_key(key), seq.to_be_bytes().to_vec()),
                    (event_cursor_key(key), event_seq.to_be_bytes().to_vec()),
                ],
            )
            .await;
        mirror.applied_seq.store(seq, Ordering::Release);
        mirror.event_seq.store(event_seq, Ordering::Release);
        mirror.batches.fetch_add(1, Ordering::Relaxed);
        mirror.synced_us.store(
            u64::try_from(Timestamp::now().0).unwrap_or(0),
            Ordering::Relaxed,
        );
        Ok(Some(generation))
    }

    /// The hello a stream must open with, checked: a protocol this build can serve and a
    /// site this enterprise accepts (a refusal is logged). Returns the site, its mirror
    /// state and the hello.
    async fn check_hello(
        &self,
        incoming: &mut Streaming<pb::ReplicateRequest>,
        identity: &SiteIdentity,
    ) -> Result<(AssetPath, Arc<SiteMirror>, pb::SiteHello), Status> {
        let first = incoming
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream ended before the hello"))?;
        let Some(pb::replicate_request::Msg::Hello(hello)) = first.msg else {
            return Err(Status::invalid_argument(
                "the first message must be a hello",
            ));
        };
        if hello.protocol_version < PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "site speaks replication protocol {}, the enterprise needs {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        let site = AssetPath::parse(&hello.site)
            .map_err(|e| Status::invalid_argument(format!("hello.site: {e}")))?;
        if let SiteIdentity::Certified(sites) = identity
            && !sites.iter().any(|s| s == site.as_str())
        {
            tracing::warn!(site = %site, certified = ?sites, "replication refused: the certificate names other sites");
            return Err(Status::permission_denied(format!(
                "the client certificate names {} (SAN URI {}PATH), not {site}",
                if sites.is_empty() {
                    "no site".to_owned()
                } else {
                    sites.join(", ")
                },
                crate::security::authn::SITE_URI_PREFIX
            )));
        }
        let Some(mirror) = self.sites.get(site.as_str()).cloned() else {
            tracing::warn!(site = %site, "replication refused: site not accepted");
            return Err(Status::permission_denied(format!(
                "site {site} is not accepted by this enterprise"
            )));
        };
        Ok((site, mirror, hello))
    }
}

type ReplicateStream = Pin<Box<dyn Stream<Item = Result<pb::ReplicateResponse, Status>> + Send>>;

/// The enterprise's half of one stream: the welcome, acks and the error that ends it.
type ResponseSender = mpsc::Sender<Result<pb::ReplicateResponse, Status>>;

/// Who opened a replication stream.
#[derive(Debug)]
enum SiteIdentity {
    /// Security off: the hello's word is taken (loopback only).
    Unchecked,
    /// The sites the verified client certificate names (SAN URIs `urn:ferrotwin:site:PATH`).
    Certified(Vec<String>),
}

/// The gRPC face of an `EnterpriseReceiver`. With `require_cert`, a stream is accepted only
/// from a verified client certificate that names the site its hello claims.
#[derive(Clone)]
pub struct ReplicationApi {
    receiver: Arc<EnterpriseReceiver>,
    require_cert: bool,
}

impl ReplicationApi {
    pub fn new(receiver: Arc<EnterpriseReceiver>, require_cert: bool) -> ReplicationApi {
        ReplicationApi {
            receiver,
            require_cert,
        }
    }
}

#[tonic::async_trait]
impl ReplicationService for ReplicationApi {
    type ReplicateStream = ReplicateStream;

    /// One site's stream: the handshake answers it; then, on the runtime's tracker, the
    /// receive loop applies its batches and the acker acks them once durable.
    async fn replicate(
        &self,
        req: Request<Streaming<pb::ReplicateRequest>>,
    ) -> Result<Response<ReplicateStream>, Status> {
        let identity = if self.require_cert {
            let certs = req.peer_certs().ok_or_else(|| {
                tracing::warn!(addr = ?req.remote_addr(), "replication refused: no client certificate");
                Status::unauthenticated(
                    "replication needs the site's client certificate (mTLS)",
                )
            })?;
            let der = certs.first().ok_or_else(|| {
                Status::unauthenticated("replication needs the site's client certificate")
            })?;
            SiteIdentity::Certified(
                crate::security::authn::site_uris(der).map_err(Status::unauthenticated)?,
            )
        } else {
            SiteIdentity::Unchecked
        };
        let mut incoming = req.into_inner();
        let (stream, one_stream, responses) =
            SiteStream::handshake(&self.receiver, &mut incoming, &identity).await?;
        self.receiver
            .tracker
            .spawn(stream.run(incoming, one_stream));
        Ok(Response::new(Box::pin(ReceiverStream::new(responses))))
    }
}

/// One accepted stream of a site: what its receive loop and its acker share.
#[derive(Clone)]
struct SiteStream {
    receiver: Arc<EnterpriseReceiver>,
    site: AssetPath,
    mirror: Arc<SiteMirror>,
    /// Cancelled when the runtime stops or a new stream of the site replaces this silent one.
    token: CancellationToken,
    /// The last batch seq the site's hello said it has.
    site_last: u64,
    responses: ResponseSender,
    /// The site's plant from its hello (version, TOML), applied before its first batch.
    plant: Option<(u64, String)>,
}

impl SiteStream {
    /// The handshake: reads the hello, checks it (protocol version, a site this enterprise
    /// accepts), takes the site's one stream: a previous stream heard from within
    /// `LIVE_WINDOW_US` is live and this one is refused (a hello storm cannot displace a live
    /// site); a silent one (half-open) is replaced. It then reconciles the cursors with what
    /// the hello says the site has, and sends the welcome with the
    /// site's highest durable seq, so the site never resumes past what a crash here could
    /// lose. Any failure is the stream's error and nothing was applied. Returns the stream,
    /// the site's one-stream guard (held until the stream ends) and the responses' receiver.
    async fn handshake(
        receiver: &Arc<EnterpriseReceiver>,
        incoming: &mut Streaming<pb::ReplicateRequest>,
        identity: &SiteIdentity,
    ) -> Result<
        (
            SiteStream,
            OwnedMutexGuard<()>,
            mpsc::Receiver<Result<pb::ReplicateResponse, Status>>,
        ),
        Status,
    > {
        let (site, mirror, hello) = receiver.check_hello(incoming, identity).await?;
        // One stream per site: a site that reconnects at once after its link broke waits
        // for its previous stream to end; a second stream of a live site is refused.
        let refuse = |why: String| {
            mirror.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(site = %site, "replication stream refused: {why}");
            Status::unavailable(format!(
                "{site} already has an open replication stream ({why}); a second is refused while it is live; retry later"
            ))
        };
        // A site that reconnects right after its stream ended finds it still letting go.
        let previous =
            tokio::time::timeout(PREVIOUS_STREAM_WAIT, mirror.stream.clone().lock_owned()).await;
        let one_stream = match previous {
            Ok(g) => g,
            Err(_) => {
                let silent_us = Timestamp::now().0 - mirror.heard_us.load(Ordering::Acquire);
                if silent_us < LIVE_WINDOW_US {
                    return Err(refuse(format!("heard {} ms ago", silent_us / 1000)));
                }
                // Silent: half-open, or the site's own broken stream. Replace it.
                if let Some(old) = mirror
                    .current
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                {
                    old.cancel();
                }
                match tokio::time::timeout(PREVIOUS_STREAM_WAIT, mirror.stream.clone().lock_owned())
                    .await
                {
                    Ok(g) => g,
                    Err(_) => return Err(refuse("it did not end when replaced".into())),
                }
            }
        };
        let token = receiver.token.child_token();
        *mirror.current.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
        mirror.heard_us.store(Timestamp::now().0, Ordering::Release);
        let rewound = receiver
            .reconcile(&site, &mirror, hello.last_seq, hello.event_hwm)
            .await;
        let (responses, rx) = mpsc::channel(16);
        let mut error = hello.template_error.clone();
        error.truncate(crate::core::char_floor(
            &error,
            super::MAX_TEMPLATE_ERROR_BYTES,
        ));
        *mirror.fleet.lock().unwrap_or_else(|p| p.into_inner()) = (hello.template_applied, error);
        // The site's fleet template, when it has not applied the newest.
        let template = receiver
            .ctx
            .store
            .newest_template(site.as_str())
            .ok()
            .flatten()
            .filter(|t| t.version != hello.template_applied && t.version != hello.template_refused)
            .map(|t| pb::FleetTemplate {
                version: t.version,
                plant_toml: t.plant_toml,
                site_toml: t.site_toml,
            });
        let sent_template = template.is_some();
        let welcome = pb::ReplicateResponse {
            msg: Some(pb::replicate_response::Msg::Welcome(
                pb::EnterpriseWelcome {
                    protocol_version: PROTOCOL_VERSION,
                    last_applied_seq: mirror.durable_seq.load(Ordering::Acquire),
                    rewound,
                    template,
                },
            )),
        };
        responses
            .send(Ok(welcome))
            .await
            .map_err(|_| Status::cancelled("site went away"))?;
        tracing::info!(site = %site, agent = hello.agent, "replication stream accepted");
        let stream = SiteStream {
            receiver: receiver.clone(),
            site,
            mirror,
            token,
            site_last: hello.last_seq,
            responses,
            // With a template to apply, the site says hello again with its new plant: this
            // one is not taken meanwhile.
            plant: (!hello.plant_toml.is_empty() && !sent_template)
                .then_some((hello.plant_version, hello.plant_toml)),
        };
        Ok((stream, one_stream, rx))
    }

    /// The stream after the handshake: the receive loop, with the acker beside it. Ends
    /// when the receive loop does and the acker has sent what it can; only then does the
    /// site's next stream start (`_one_stream`), and the response stream end.
    async fn run(
        mut self,
        mut incoming: Streaming<pb::ReplicateRequest>,
        _one_stream: OwnedMutexGuard<()>,
    ) {
        // The site's plant first: its batches then find the mirrors it adds. Not taken, the
        // stream ends with the reason (nothing of the site is acked and dropped for want of
        // its twins; the site keeps its outbox and tries again later).
        if let Some((version, toml)) = self.plant.take()
            && let Err(why) = self
                .receiver
                .follow_plant(&self.site, &self.mirror, version, toml)
                .await
        {
            let _ = self
                .responses
                .send(Err(Status::failed_precondition(format!(
                    "the enterprise did not take this site's plant: {}",
                    why.chars().take(900).collect::<String>()
                ))))
                .await;
            return;
        }
        // (seq, the store flush that makes it durable), in the order the batches came.
        let (acks, pending) = mpsc::channel::<(u64, u64)>(PENDING_ACKS);
        let acker = self
            .receiver
            .tracker
            .spawn(self.clone().ack_when_durable(pending));
        self.receive_batches(&mut incoming, acks).await;
        let _ = acker.await;
    }

    /// The acker: acks each seq of `pending`, in arrival order, once the store flush holding
    /// its effects and cursors is on disk (`Store::wait_flushed`), raising the site's durable
    /// seq (what a later welcome reports) just before. A duplicate comes with the flush after
    /// its arrival, so its ack also waits for its first application to be durable. An ack is
    /// never sent ahead of its flush nor out of order. After the receive loop ends it still
    /// acks what it was handed; a stop or a site that is gone
    /// (the send fails) ends it at once, and the seqs it did not ack are resent by the site
    /// and acked then as duplicates.
    async fn ack_when_durable(self, mut pending: mpsc::Receiver<(u64, u64)>) {
        let store = &self.receiver.ctx.store;
        while let Some((seq, generation)) = pending.recv().await {
            tokio::select! {
                () = self.token.cancelled() => return,
                () = store.wait_flushed(generation) => {}
            }
            self.mirror.durable_seq.fetch_max(seq, Ordering::AcqRel);
            let ack = pb::ReplicateResponse {
                msg: Some(pb::replicate_response::Msg::Ack(seq)),
            };
            tokio::select! {
                () = self.token.cancelled() => return,
                sent = self.responses.send(Ok(ack)) => if sent.is_err() { return },
            }
        }
    }

    /// The receive loop: applies each batch in arrival order (`EnterpriseReceiver::apply`:
    /// a seq at or below the site's cursor is a duplicate, counted and not applied; events
    /// at or below its event cursor are skipped) and hands its seq to the acker with the
    /// flush to wait for. A message other than a batch, or a batch that does not decode, ends
    /// the stream with that error; a disconnect or a stop ends it
    /// quietly. A batch applied but not acked before the end is resent by the site and acked
    /// then as a duplicate.
    async fn receive_batches(
        &self,
        incoming: &mut Streaming<pb::ReplicateRequest>,
        acks: mpsc::Sender<(u64, u64)>,
    ) {
        let site = &self.site;
        loop {
            let next = tokio::select! {
                () = self.token.cancelled() => return,
                m = incoming.message() => m,
            };
            let m = match next {
                Ok(Some(m)) => m,
                Ok(None) => return,
                Err(e) => {
                    tracing::info!(site = %site, error = %e, "replication stream ended");
                    return;
                }
            };
            self.mirror
                .heard_us
                .store(Timestamp::now().0, Ordering::Release);
            if let Some(pb::replicate_request::Msg::Heartbeat(_)) = m.msg {
                continue;
            }
            let Some(pb::replicate_request::Msg::Batch(b)) = m.msg else {
                let _ = self.responses.try_send(Err(Status::invalid_argument(
                    "only batches after the hello",
                )));
                return;
            };
            let span = apply_span(site, &b);
            let applied = self
                .receiver
                .apply(
                    site,
                    &self.mirror,
                    (b.seq, b.after),
                    self.site_last,
                    &b.batch,
                )
                .instrument(span.clone())
                .await;
            match &applied {
                Ok(Some(_)) => span.record("ferrotwin.outcome", "applied"),
                Ok(None) => span.record("ferrotwin.outcome", "duplicate"),
                Err(status) => {
                    span.record("otel.status_code", "error");
                    span.record("error.type", tracing::field::debug(status.code()));
                    span.record("ferrotwin.outcome", "refused")
                }
            };
            drop(span);
            match applied {
                Ok(generation) => {
                    // A duplicate is acked once the flush after now is on disk: its
                    // first application may still be on its way there.
                    let g =
                        generation.unwrap_or_else(|| self.receiver.ctx.store.queue_generation());
                    tokio::select! {
                        () = self.token.cancelled() => return,
                        sent = acks.send((b.seq, g)) => if sent.is_err() { return },
                    }
                }
                Err(status) => {
                    self.mirror.refused.fetch_add(1, Ordering::Relaxed);
                    self.receiver
                        .report(
                            site,
                            &self.mirror,
                            Report::Refused,
                            Severity::High,
                            format!("replication batch refused: {}", status.message()),
                        )
                        .await;
                    // Waits for room (acks ahead of it): a refusal is never lost.
                    tokio::select! {
                        () = self.token.cancelled() => {}
                        _ = self.responses.send(Err(status)) => {}
                    }
                    return;
                }
            }
        }
    }
}

/// Freshness of a site's mirrors: ms since its last applied batch (`None`: never synced).
pub fn freshness_ms(mirror: &SiteMirror, at: Timestamp) -> Option<i64> {
    let synced = mirror.synced_us.load(Ordering::Relaxed);
    (synced > 0).then(|| (at.0 - synced as i64) / 1000)
}

/// Mirrors of every site, for status output.
pub fn sites(rx: &EnterpriseReceiver) -> Vec<(String, Arc<SiteMirror>)> {
    let mut v: Vec<_> = rx
        .sites
        .iter()
        .map(|(k, m)| (k.clone(), m.clone()))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// The span of one batch's apply (when spans are exported), child of the site's send span
/// whose `traceparent` the batch carries.
fn apply_span(site: &AssetPath, b: &pb::SiteBatch) -> tracing::Span {
    if !telemetry::tracing_on() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "replication.apply",
        otel.kind = "consumer",
        messaging.system = "ferrotwin",
        messaging.operation.type = "process",
        ferrotwin.site = %site,
        ferrotwin.seq = b.seq as i64,
        ferrotwin.after = b.after as i64,
        messaging.message.body.size = b.batch.len() as i64,
        ferrotwin.outcome = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    telemetry::set_parent_traceparent(&span, &b.traceparent);
    span
}
