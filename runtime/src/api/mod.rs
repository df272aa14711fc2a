//! The one API layer: every read, acknowledgement, shelve and write, with protobuf messages
//! as arguments and answers. The gRPC service (`grpc`) and the HTTP JSON API and pages
//! (`http`) are thin edges over `TwinApi`: they decode, call one method, encode. A check
//! made here (a limit, a path, who asks) holds for both; nothing below is reached past it.

pub mod convert;
pub mod error;
pub mod names;
pub mod prometheus;
pub mod select;

use std::sync::Arc;
use std::time::Duration;

use ferrotwin_adapters::WriteRequest;
use ferrotwin_models::query::{FieldValue, Query, Subject};
use ferrotwin_models::{AssetId, AssetPath, EventKind, Property, Timestamp};
use ferrotwin_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

pub use error::{ApiError, ErrorCode};

use crate::connections::Connections;
use crate::core::{TwinMsg, ask};
use crate::registry::TwinEntry;
use crate::replication::enterprise::{EnterpriseReceiver, freshness_ms};
use crate::replication::site::SenderStatus;
use crate::store::EventFilter;
use crate::twin::TwinCtx;
use crate::watch::Watcher;
use select::TwinSubject;

const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;
const MAX_HISTORY_POINTS: usize = 100_000;
const DEFAULT_HISTORY_POINTS: usize = 1000;
/// Raw points one history request may read before it is refused (narrow the range).
const MAX_RAW_HISTORY_POINTS: usize = 5_000_000;
const TWIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Entries copied out of the path index per lock while a query scans.
const QUERY_WINDOW: usize = 4096;
/// Open Watch streams at most: each costs a queue and a check on every change.
pub const MAX_WATCHERS: usize = 256;

#[derive(Clone)]
pub struct TwinApi {
    ctx: Arc<TwinCtx>,
    connections: Arc<Connections>,
    sender: Option<Arc<SenderStatus>>,
    enterprise: Option<Arc<EnterpriseReceiver>>,
    token: CancellationToken,
}

impl TwinApi {
    pub(crate) fn new(ctx: Arc<TwinCtx>, connections: Arc<Connections>) -> TwinApi {
        TwinApi {
            ctx,
            connections,
            sender: None,
            enterprise: None,
            token: CancellationToken::new(),
        }
    }

    /// The site role's sender and the enterprise role's receiver, when this runtime has them.
    pub(crate) fn with_replication(
        mut self,
        sender: Option<Arc<SenderStatus>>,
        enterprise: Option<Arc<EnterpriseReceiver>>,
    ) -> TwinApi {
        self.sender = sender;
        self.enterprise = enterprise;
        self
    }

    pub(crate) fn parse_path(field: &'static str, s: &str) -> Result<AssetPath, ApiError> {
        AssetPath::parse(s).map_err(|source| ApiError::BadPath { field, source })
    }

    /// The entry at `path`, or NOT_FOUND naming the nearest existing parent.
    pub(crate) fn entry(&self, path: &AssetPath) -> Result<Arc<TwinEntry>, ApiError> {
        if let Some(e) = self.ctx.registry.by_path(path) {
            return Ok(e);
        }
        let mut p = path.parent();
        while let Some(cur) = p {
            if self.ctx.registry.by_path(&cur).is_some() {
                return Err(ApiError::NotFound {
                    path: path.to_string(),
                    nearest: Some(cur.to_string()),
                });
            }
            p = cur.parent();
        }
        Err(ApiError::NotFound {
            path: path.to_string(),
            nearest: None,
        })
    }

    /// Optional subtree: empty = everything.
    pub(crate) fn subtree(
        &self,
        field: &'static str,
        s: &str,
    ) -> Result<Option<AssetPath>, ApiError> {
        if s.trim_matches('/').is_empty() {
            return Ok(None);
        }
        let p = Self::parse_path(field, s)?;
        self.entry(&p)?;
        Ok(Some(p))
    }

    fn page(size: u32) -> Result<usize, ApiError> {
        match size as usize {
            0 => Ok(DEFAULT_PAGE),
            n if n > MAX_PAGE => Err(ApiError::BadArgument(format!(
                "page_size: {n} is above the limit of {MAX_PAGE}"
            ))),
            n => Ok(n),
        }
    }

    fn page_token(s: &str) -> Result<Option<AssetPath>, ApiError> {
        if s.is_empty() {
            Ok(None)
        } else {
            Self::parse_path("page_token", s).map(Some)
        }
    }

    /// A page of twins and the token of the next page (the last path; empty at the end).
    fn page_of(&self, entries: &[Arc<TwinEntry>], more: bool) -> (Vec<pb::Twin>, String) {
        let next = match (more, entries.last()) {
            (true, Some(e)) => e.path().to_string(),
            _ => String::new(),
        };
        (entries.iter().map(|e| self.twin_of(e)).collect(), next)
    }

    pub(crate) fn twin_of(&self, e: &TwinEntry) -> pb::Twin {
        let mut t = convert::twin(e, &e.snapshot());
        if let Some(m) = self.enterprise.as_ref().and_then(|r| r.site_of(e.path())) {
            t.mirror_age_ms = freshness_ms(m, Timestamp::now());
        }
        t
    }

    fn sensor_actor(
        &self,
        path: &str,
    ) -> Result<(Arc<TwinEntry>, ractor::ActorRef<TwinMsg>), ApiError> {
        let e = self.entry(&Self::parse_path("path", path)?)?;
        let a = e.actor().ok_or_else(|| {
            ApiError::Unavailable(format!("{}: twin is restarting, retry", e.path()))
        })?;
        Ok((e, a))
    }
}

/// The reads and the acknowledgement, with plain arguments: the gRPC service and the HTTP
/// JSON API (`crate::http`) both answer through these.
impl TwinApi {
    pub async fn twin(&self, req: pb::GetTwinRequest) -> Result<pb::Twin, ApiError> {
        let e = match req.key {
            Some(pb::get_twin_request::Key::Path(p)) => {
                self.entry(&Self::parse_path("path", &p)?)?
            }
            Some(pb::get_twin_request::Key::Id(id)) => {
                let uuid = uuid::Uuid::parse_str(&id)
                    .map_err(|e| ApiError::BadArgument(format!("id: {id:?} is not a UUID: {e}")))?;
                self.ctx
                    .registry
                    .get(&AssetId(uuid))
                    .ok_or(ApiError::NotFound {
                        path: format!("id {id}"),
                        nearest: None,
                    })?
            }
            None => return Err(ApiError::BadArgument("give a path or an id".into())),
        };
        Ok(self.twin_of(&e))
    }

    pub async fn browse_twins(
        &self,
        req: pb::BrowseRequest,
    ) -> Result<pb::BrowseResponse, ApiError> {
        let root = match self.subtree("path", &req.path)? {
            Some(p) => p,
            None => self
                .ctx
                .plant
                .root
                .as_ref()
                .map(|r| r.path.clone())
                .ok_or_else(|| ApiError::Unavailable("the plant is empty".into()))?,
        };
        let limit = Self::page(req.page_size)?;
        let after = Self::page_token(&req.page_token)?;
        let max_depth = root.depth() + req.depth as usize;
        let (entries, more) = self
            .ctx
            .registry
            .scan(Some(&root), after.as_ref(), limit, |e| {
                e.path().depth() <= max_depth
            });
        let (twins, next_page_token) = self.page_of(&entries, more);
        Ok(pb::BrowseResponse {
            twins,
            next_page_token,
        })
    }

    pub async fn query_twins(&self, req: pb::QueryRequest) -> Result<pb::QueryResponse, ApiError> {
        let q = Query::parse(&req.query).map_err(ApiError::from)?;
        let limit = Self::page(req.page_size)?;
        let after = Self::page_token(&req.page_token)?;
        let prefix = q
            .pinned_path_glob()
            .and_then(|g| g.literal_prefix())
            .and_then(|p| AssetPath::parse(&p).ok());
        let level = q.pinned_level().map(str::to_string);
        let order_by = (!req.order_by.is_empty()).then(|| req.order_by.clone());
        if order_by.is_some() && !req.page_token.is_empty() {
            return Err(ApiError::BadArgument(
                "page_token: ranked results are a single page (no token)".into(),
            ));
        }
        if let Some(l) = &level
            && ferrotwin_models::Level::parse(l).is_none()
        {
            return Err(ApiError::BadArgument(format!(
                "query: level {l:?} is not a level (enterprise, site, area, line, machine, sensor)"
            )));
        }
        // Scan in windows: the path index lock is held only to copy a window of entries,
        // and the query (which may read other twins, e.g. a machine's sensors) runs
        // outside it. On a blocking thread: a full-plant query may take a while.
        let ctx = self.ctx.clone();
        let ascending = req.ascending;
        let (entries, more) = tokio::task::spawn_blocking(move || {
            let registry = &ctx.registry;
            let mut cursor = after;
            let mut found = Vec::new();
            // Ranked: every match with its key, the top `limit` at the end.
            let mut ranked: Vec<(Option<f64>, Arc<TwinEntry>)> = Vec::new();
            loop {
                let (window, more) =
                    registry.scan(prefix.as_ref(), cursor.as_ref(), QUERY_WINDOW, |e| {
                        level.as_deref().is_none_or(|l| l == e.level().as_str())
                    });
                cursor = window.last().map(|e| e.path().clone());
                for e in window {
                    let hit = q.matches(&TwinSubject {
                        entry: &e,
                        snap: e.snapshot(),
                        registry,
                    });
                    if hit {
                        if let Some(field) = &order_by {
                            let key = TwinSubject {
                                entry: &e,
                                snap: e.snapshot(),
                                registry,
                            }
                            .field(field)
                            .and_then(|v| match v {
                                FieldValue::Num(n) => Some(n),
                                FieldValue::Bool(b) => Some(f64::from(u8::from(b))),
                                FieldValue::Text(_) => None,
                            })
                            .filter(|n| n.is_finite());
                            ranked.push((key, e));
                            continue;
                        }
                        if found.len() == limit {
                            return (found, true);
                        }
                        found.push(e);
                    }
                }
                if !more {
                    if order_by.is_some() {
                        ranked.sort_by(|a, b| match (a.0, b.0) {
                            (Some(x), Some(y)) if ascending => x.total_cmp(&y),
                            (Some(x), Some(y)) => y.total_cmp(&x),
                            (Some(_), None) => std::cmp::Ordering::Less,
                            (None, Some(_)) => std::cmp::Ordering::Greater,
                            (None, None) => std::cmp::Ordering::Equal,
                        });
                        ranked.truncate(limit);
                        return (ranked.into_iter().map(|(_, e)| e).collect(), false);
                    }
                    return (found, false);
                }
            }
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("query failed: {e}")))?;
        let (twins, next_page_token) = self.page_of(&entries, more);
        Ok(pb::QueryResponse {
            twins,
            next_page_token,
        })
    }

    pub async fn history(
        &self,
        req: pb::GetHistoryRequest,
    ) -> Result<pb::GetHistoryResponse, ApiError> {
        let e = self.entry(&Self::parse_path("path", &req.path)?)?;
        if e.level() != ferrotwin_models::Level::Sensor {
            return Err(ApiError::BadArgument(format!(
                "path: {} is a {}; history is recorded for sensors",
                e.path(),
                e.level()
            )));
        }
        let prop_name = if req.property.is_empty() {
            "value"
        } else {
            req.property.as_str()
        };
        let property = Property::parse(prop_name).ok_or_else(|| {
            ApiError::BadArgument(format!(
                "property: {prop_name:?} is not recorded (recorded: value)"
            ))
        })?;
        let to = if req.to_us == 0 {
            Timestamp::now()
        } else {
            Timestamp(req.to_us)
        };
        let from = Timestamp(req.from_us);
        if from > to {
            return Err(ApiError::BadArgument(format!(
                "range: from {from} is after to {to}"
            )));
        }
        let max = match req.max_points as usize {
            0 => DEFAULT_HISTORY_POINTS,
            n if n > MAX_HISTORY_POINTS => {
                return Err(ApiError::BadArgument(format!(
                    "max_points: {n} is above the limit of {MAX_HISTORY_POINTS}"
                )));
            }
            n => n,
        };
        // The twin's unwritten tail first, then the store: a tail flushed in between is
        // then in the store (duplicates are removed), never in neither. A restarting twin
        // has no tail to give; the store still answers.
        let tail = e.tail_points();
        let ctx = self.ctx.clone();
        let id = e.id;
        let mut points = tokio::task::spawn_blocking(move || {
            ctx.store
                .read_history(id, property, from, to, MAX_RAW_HISTORY_POINTS)
        })
        .await
        .map_err(|e| ApiError::Unavailable(format!("history read failed: {e}")))?
        .map_err(ApiError::from)?;
        points.extend(tail.into_iter().filter(|p| p.ts >= from && p.ts <= to));
        points.sort_by_key(|p| p.ts);
        points.dedup_by(|a, b| a.ts == b.ts && a.value.to_bits() == b.value.to_bits());
        let raw = points.len();
        let out = convert::downsample(&points, max);
        Ok(pb::GetHistoryResponse {
            downsampled: out.len() < raw,
            points: out,
            raw_points: raw as u64,
        })
    }

    pub async fn list_events_page(
        &self,
        req: pb::ListEventsRequest,
    ) -> Result<pb::ListEventsResponse, ApiError> {
        let prefix = self.subtree("path", &req.path)?;
        let kind = if req.kind.is_empty() {
            None
        } else {
            Some(EventKind::parse(&req.kind).ok_or_else(|| {
                ApiError::BadArgument(format!(
                    "kind: {:?} is not an event kind (alarm, quality, state, rejected, lifecycle)",
                    req.kind
                ))
            })?)
        };
        let limit = match req.limit as usize {
            0 => 100,
            n if n > MAX_PAGE => {
                return Err(ApiError::BadArgument(format!(
                    "limit: {n} is above the limit of {MAX_PAGE}"
                )));
            }
            n => n,
        };
        let filter = EventFilter {
            prefix,
            after_seq: req.after_seq,
            limit,
            kind,
            min_severity: convert::severity_from(req.min_severity),
        };
        let ctx = self.ctx.clone();
        let (events, next) = tokio::task::spawn_blocking(move || ctx.store.list_events(&filter))
            .await
            .map_err(|e| ApiError::Unavailable(format!("event read failed: {e}")))?
            .map_err(ApiError::from)?;
        Ok(pb::ListEventsResponse {
            events: events.iter().map(convert::event).collect(),
            next_after_seq: next,
        })
    }

    pub async fn acknowledge(
        &self,
        req: pb::AcknowledgeAlarmRequest,
    ) -> Result<pb::AcknowledgeAlarmResponse, ApiError> {
        if req.by.trim().is_empty() {
            return Err(ApiError::BadArgument("by: say who acknowledges".into()));
        }
        if req.alarm.is_empty() {
            return Err(ApiError::BadArgument(
                "alarm: name the alarm to acknowledge".into(),
            ));
        }
        let (e, actor) = self.sensor_actor(&req.path)?;
        let alarm = req.alarm.clone();
        let status = ask(
            &actor,
            |reply| TwinMsg::Acknowledge {
                alarm,
                by: req.by,
                comment: req.comment,
                reply,
            },
            TWIN_CALL_TIMEOUT,
        )
        .await
        .ok_or_else(|| ApiError::Unavailable(format!("{}: twin did not answer", e.path())))?
        .map_err(ApiError::from)?;
        Ok(pb::AcknowledgeAlarmResponse {
            alarm: Some(alarm_proto(&e, &req.alarm, &status)),
        })
    }
}

/// The calls with a side effect, and the status reads.
impl TwinApi {
    /// Writes a property through the connection that maps it; answers with the connection's
    /// name once the PLC (or broker) took the value.
    pub async fn write(
        &self,
        req: pb::WritePropertyRequest,
    ) -> Result<pb::WritePropertyResponse, ApiError> {
        if req.by.trim().is_empty() {
            return Err(ApiError::BadArgument("by: say who writes".into()));
        }
        let path = Self::parse_path("path", &req.path)?;
        self.entry(&path)?;
        if req.property.is_empty() {
            return Err(ApiError::BadArgument(
                "property: name the property to write".into(),
            ));
        }
        let value = req
            .value
            .as_ref()
            .and_then(convert::value_from_proto)
            .ok_or_else(|| ApiError::BadArgument("value: give a float, int or bool".into()))?;
        if !value.is_finite() {
            return Err(ApiError::BadArgument("value: must be finite".into()));
        }
        let connection = self
            .connections
            .write(WriteRequest {
                asset: path,
                property: req.property,
                value,
                by: req.by,
            })
            .await?;
        Ok(pb::WritePropertyResponse { connection })
    }

    /// Shelves an alarm of a sensor, for `duration_ms` (0 = until unshelved).
    pub async fn shelve(
        &self,
        req: pb::ShelveAlarmRequest,
    ) -> Result<pb::ShelveAlarmResponse, ApiError> {
        if req.by.trim().is_empty() {
            return Err(ApiError::BadArgument("by: say who shelves".into()));
        }
        if req.alarm.is_empty() {
            return Err(ApiError::BadArgument(
                "alarm: name the alarm to shelve".into(),
            ));
        }
        let (e, actor) = self.sensor_actor(&req.path)?;
        let until = (req.duration_ms > 0)
            .then(|| Timestamp::now().plus_ms(req.duration_ms.min(i64::MAX as u64) as i64));
        let alarm = req.alarm.clone();
        let status = ask(
            &actor,
            |reply| TwinMsg::Shelve {
                alarm,
                until,
                by: req.by,
                reply,
            },
            TWIN_CALL_TIMEOUT,
        )
        .await
        .ok_or_else(|| ApiError::Unavailable(format!("{}: twin did not answer", e.path())))??;
        Ok(pb::ShelveAlarmResponse {
            alarm: Some(alarm_proto(&e, &req.alarm, &status)),
        })
    }

    /// The site's link to its enterprise, or the enterprise's view of its sites.
    pub fn replication_status(&self) -> pb::ReplicationStatus {
        use std::sync::atomic::Ordering::Relaxed;
        let at = Timestamp::now();
        let mut out = pb::ReplicationStatus {
            role: self.role().into(),
            ..Default::default()
        };
        if let Some(s) = &self.sender {
            let lag = self.ctx.store.outbox().map(|o| o.lag()).unwrap_or_default();
            out.link = Some(pb::SiteLink {
                site: s.site.clone(),
                enterprise: s.enterprise.clone(),
                connected: s.connected.load(Relaxed),
                last_error: s.last_error().unwrap_or_default(),
                outbox_batches: lag.count,
                outbox_bytes: lag.bytes,
                oldest_unacked_age_ms: lag
                    .oldest_unacked_us
                    .map_or(0, |t| (at.0 - t).max(0) / 1000),
                last_seq: lag.last_seq,
                acked_seq: lag.acked_seq,
                batches_sent: s.batches_sent.load(Relaxed),
                bytes_sent: s.bytes_sent.load(Relaxed),
                connects: s.connects.load(Relaxed),
                compacted: lag.compacted,
                dropped_events: lag.dropped_events,
            });
        }
        if let Some(r) = &self.enterprise {
            out.sites = crate::replication::enterprise::sites(r)
                .into_iter()
                .map(|(site, m)| pb::MirroredSite {
                    site,
                    applied_seq: m.applied_seq.load(Relaxed),
                    age_ms: freshness_ms(&m, at).unwrap_or(-1),
                    batches: m.batches.load(Relaxed),
                    duplicates: m.duplicates.load(Relaxed),
                    unknown_twins: m.unknown_twins.load(Relaxed),
                })
                .collect();
        }
        out
    }

    /// The PLC connections and their counters.
    pub fn connection_list(&self) -> pb::ListConnectionsResponse {
        let connections = self
            .connections
            .statuses()
            .into_iter()
            .map(|(s, protocol, endpoint, tags)| pb::Connection {
                name: s.name,
                protocol: protocol.to_owned(),
                endpoint,
                link: s.link.as_str().to_owned(),
                last_error: s.last_error.unwrap_or_default(),
                received: s.received,
                rejected: s.rejected,
                errors: s.errors,
                connects: s.connects,
                writes_ok: s.writes_ok,
                writes_failed: s.writes_failed,
                tags: u32::try_from(tags).unwrap_or(u32::MAX),
            })
            .collect();
        pb::ListConnectionsResponse { connections }
    }
}

/// Live streams and what the edges read without a request message of their own.
impl TwinApi {
    /// Admits a watcher of the subtree at `path` (empty: everything), within `MAX_WATCHERS`.
    pub(crate) fn open_watch(
        &self,
        path: &str,
        events: bool,
    ) -> Result<(Watcher, Option<AssetPath>), ApiError> {
        let prefix = self.subtree("path", path)?;
        if self.ctx.hub.watchers() >= MAX_WATCHERS {
            return Err(ApiError::Limit(format!(
                "{MAX_WATCHERS} watch streams are open, the limit; close one or watch a wider subtree"
            )));
        }
        Ok((self.ctx.hub.subscribe(prefix.clone(), events), prefix))
    }

    /// A watcher of the twins at most `max_depth` deep below `prefix` (the web's live
    /// streams, which keep their own limit).
    pub(crate) fn watch_within(
        &self,
        prefix: Option<AssetPath>,
        max_depth: usize,
        events: bool,
    ) -> Watcher {
        self.ctx
            .hub
            .subscribe_within(prefix, Some(max_depth), events)
    }

    /// Prometheus text of everything the runtime counts (`prometheus::render_runtime`).
    pub fn render_metrics(&self) -> String {
        prometheus::render_runtime(
            &self.ctx.metrics,
            &self.ctx.store,
            &self.connections,
            self.enterprise.as_deref(),
        )
    }

    /// Changes a watcher may hold before it is told it lagged.
    pub(crate) fn watch_capacity(&self) -> usize {
        self.ctx.hub.capacity()
    }

    /// Every twin at and below `prefix` (everything when `None`), in path order.
    pub fn entries_below(&self, prefix: Option<&AssetPath>) -> Vec<Arc<TwinEntry>> {
        self.ctx.registry.scan(prefix, None, usize::MAX, |_| true).0
    }

    /// Up to `limit` twins at and below `prefix` that `keep` selects, in path order, and
    /// whether more matched. Scans the path index: call it off the async threads for big
    /// subtrees.
    pub(crate) fn scan(
        &self,
        prefix: Option<&AssetPath>,
        limit: usize,
        keep: impl FnMut(&TwinEntry) -> bool,
    ) -> (Vec<Arc<TwinEntry>>, bool) {
        self.ctx.registry.scan(prefix, None, limit, keep)
    }

    /// The twin at `path`, if there is one.
    pub(crate) fn find(&self, path: &AssetPath) -> Option<Arc<TwinEntry>> {
        self.ctx.registry.by_path(path)
    }

    /// The plant's root (the enterprise), `None` for an empty plant.
    pub(crate) fn root(&self) -> Option<&AssetPath> {
        self.ctx.plant.root.as_ref().map(|r| &r.path)
    }

    /// `site` (replicating to an enterprise), `enterprise` or `standalone`.
    pub fn role(&self) -> &'static str {
        if self.enterprise.is_some() {
            "enterprise"
        } else if self.sender.is_some() {
            "site"
        } else {
            "standalone"
        }
    }

    pub fn twin_count(&self) -> usize {
        self.ctx.registry.len()
    }

    /// Cancelled when the runtime stops: streams end with it.
    pub(crate) fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    pub(crate) fn set_token(&mut self, token: CancellationToken) {
        self.token = token;
    }
}

fn alarm_proto(
    e: &TwinEntry,
    name: &str,
    status: &ferrotwin_models::alarm::AlarmStatus,
) -> pb::Alarm {
    match &e.def.kind {
        ferrotwin_models::spec::AssetKind::Sensor { spec, .. } => spec
            .alarms
            .iter()
            .find(|a| a.name == name)
            .map(|l| convert::alarm(l, status))
            .unwrap_or_default(),
        _ => pb::Alarm::default(),
    }
}
