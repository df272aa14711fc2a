//! The gRPC API: `ferrotwin.v1.TwinService`, plus `grpc.health.v1` and server reflection
//! (v1 and v1alpha, so every grpcurl lists our services without the .proto files).

pub mod convert;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_adapters::{WriteError, WriteRequest};
use ferrotwin_models::query::{FieldValue, Query, QueryError, Subject};
use ferrotwin_models::{AssetId, AssetPath, EventKind, PathError, Property, Timestamp};
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_server::ReplicationServiceServer;
use ferrotwin_proto::v1::twin_service_server::{TwinService, TwinServiceServer};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use crate::connections::Connections;
use crate::registry::TwinEntry;
use crate::replication::enterprise::{EnterpriseReceiver, ReplicationApi, freshness_ms};
use crate::replication::site::SenderStatus;
use crate::select::TwinSubject;
use crate::store::{EventFilter, StoreError};
use crate::twin::{TwinCtx, TwinError, TwinMsg, ask, now};
use crate::watch::{Change, Watcher};

/// Largest request we decode.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest replication message (one outbox batch: a full-snapshot chunk of 10,000 twins is
/// a few MB).
pub const MAX_BATCH_BYTES: usize = 64 << 20;
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;
const MAX_HISTORY_POINTS: usize = 100_000;
const DEFAULT_HISTORY_POINTS: usize = 1000;
/// Raw points one history request may read before it is refused (narrow the range).
const MAX_RAW_HISTORY_POINTS: usize = 5_000_000;
/// Messages buffered per Watch stream (besides the watcher's queue, at most as many).
const WATCH_STREAM_BUFFER: usize = 1024;
const TWIN_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a shutdown waits for open gRPC connections to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Entries copied out of the path index per lock while a query scans.
const QUERY_WINDOW: usize = 4096;
/// Open Watch streams at most: each costs a queue and a check on every change.
const MAX_WATCHERS: usize = 256;

/// Everything the API can refuse, mapped to a gRPC status in one place (`status`).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {source}")]
    BadPath {
        field: &'static str,
        source: PathError,
    },
    #[error("{0}")]
    BadArgument(String),
    #[error("no asset at {path}{}", nearest.as_ref().map(|n| format!(" (nearest existing parent: {n})")).unwrap_or_default())]
    NotFound {
        path: String,
        nearest: Option<String>,
    },
    #[error(transparent)]
    BadQuery(#[from] QueryError),
    #[error(transparent)]
    Twin(#[from] TwinError),
    #[error("{0}")]
    Unavailable(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

impl ApiError {
    pub fn status(&self) -> Status {
        let msg = self.to_string();
        match self {
            ApiError::BadPath { .. } | ApiError::BadArgument(_) | ApiError::BadQuery(_) => {
                Status::invalid_argument(msg)
            }
            ApiError::NotFound { .. } => Status::not_found(msg),
            ApiError::Twin(TwinError::UnknownAlarm { .. }) => Status::not_found(msg),
            ApiError::Twin(TwinError::Ack { .. }) => Status::failed_precondition(msg),
            ApiError::Twin(TwinError::NoAlarms { .. }) => Status::invalid_argument(msg),
            ApiError::Unavailable(_) => Status::unavailable(msg),
            ApiError::Store(StoreError::TooMuchHistory { .. }) => Status::resource_exhausted(msg),
            ApiError::Store(_) => Status::internal(msg),
            ApiError::Write(w) => match w {
                WriteError::NotWritable { .. } | WriteError::Refused { .. } => {
                    Status::failed_precondition(msg)
                }
                WriteError::BadValue { .. } => Status::invalid_argument(msg),
                WriteError::NotConnected { .. } | WriteError::Stopped { .. } => {
                    Status::unavailable(msg)
                }
                WriteError::Busy { .. } => Status::resource_exhausted(msg),
                WriteError::Timeout { .. } => Status::deadline_exceeded(msg),
            },
        }
    }
}

impl ApiError {
    /// The HTTP status of this error (the JSON API, `crate::http`): the same classes as
    /// `status` gives gRPC.
    pub fn http_status(&self) -> u16 {
        match self {
            ApiError::BadPath { .. } | ApiError::BadArgument(_) | ApiError::BadQuery(_) => 400,
            ApiError::NotFound { .. } | ApiError::Twin(TwinError::UnknownAlarm { .. }) => 404,
            ApiError::Twin(TwinError::Ack { .. }) => 409,
            ApiError::Twin(TwinError::NoAlarms { .. }) => 400,
            ApiError::Unavailable(_) => 503,
            // The caller can narrow the range: a request error, not ours.
            ApiError::Store(StoreError::TooMuchHistory { .. }) => 400,
            ApiError::Store(_) => 500,
            ApiError::Write(w) => match w {
                WriteError::NotWritable { .. } | WriteError::Refused { .. } => 409,
                WriteError::BadValue { .. } => 400,
                WriteError::NotConnected { .. } | WriteError::Stopped { .. } => 503,
                WriteError::Busy { .. } => 429,
                WriteError::Timeout { .. } => 504,
            },
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        e.status()
    }
}

#[derive(Clone)]
pub struct TwinApi {
    ctx: Arc<TwinCtx>,
    connections: Arc<Connections>,
    sender: Option<Arc<SenderStatus>>,
    enterprise: Option<Arc<EnterpriseReceiver>>,
    token: CancellationToken,
}

impl TwinApi {
    pub fn new(ctx: Arc<TwinCtx>, connections: Arc<Connections>) -> TwinApi {
        TwinApi {
            ctx,
            connections,
            sender: None,
            enterprise: None,
            token: CancellationToken::new(),
        }
    }

    /// The twins' shared context (registry, store, watch hub).
    pub(crate) fn ctx(&self) -> &Arc<TwinCtx> {
        &self.ctx
    }

    /// The site role's sender and the enterprise role's receiver, when this runtime has them.
    pub fn with_replication(
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

    fn token(s: &str) -> Result<Option<AssetPath>, ApiError> {
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
            t.mirror_age_ms = freshness_ms(m, now());
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
        let after = Self::token(&req.page_token)?;
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
        let after = Self::token(&req.page_token)?;
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
            now()
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

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl TwinService for TwinApi {
    async fn get_twin(
        &self,
        req: Request<pb::GetTwinRequest>,
    ) -> Result<Response<pb::Twin>, Status> {
        Ok(Response::new(self.twin(req.into_inner()).await?))
    }

    async fn browse(
        &self,
        req: Request<pb::BrowseRequest>,
    ) -> Result<Response<pb::BrowseResponse>, Status> {
        Ok(Response::new(self.browse_twins(req.into_inner()).await?))
    }

    async fn query(
        &self,
        req: Request<pb::QueryRequest>,
    ) -> Result<Response<pb::QueryResponse>, Status> {
        Ok(Response::new(self.query_twins(req.into_inner()).await?))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let req = req.into_inner();
        let prefix = self.subtree("path", &req.path)?;
        if self.ctx.hub.watchers() >= MAX_WATCHERS {
            return Err(Status::resource_exhausted(format!(
                "{MAX_WATCHERS} watch streams are open, the limit; close one or watch a wider subtree"
            )));
        }
        let (tx, rx) = mpsc::channel(WATCH_STREAM_BUFFER.min(self.ctx.hub.capacity()));
        let sub = self.ctx.hub.subscribe(prefix.clone(), req.events);
        let ctx = self.ctx.clone();
        let token = self.token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = token.cancelled() => {}
                _ = forward_changes(ctx, sub, tx, prefix, !req.skip_snapshot) => {}
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_history(
        &self,
        req: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        Ok(Response::new(self.history(req.into_inner()).await?))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        Ok(Response::new(
            self.list_events_page(req.into_inner()).await?,
        ))
    }

    async fn acknowledge_alarm(
        &self,
        req: Request<pb::AcknowledgeAlarmRequest>,
    ) -> Result<Response<pb::AcknowledgeAlarmResponse>, Status> {
        Ok(Response::new(self.acknowledge(req.into_inner()).await?))
    }

    async fn write_property(
        &self,
        req: Request<pb::WritePropertyRequest>,
    ) -> Result<Response<pb::WritePropertyResponse>, Status> {
        let req = req.into_inner();
        if req.by.trim().is_empty() {
            return Err(ApiError::BadArgument("by: say who writes".into()).into());
        }
        let path = Self::parse_path("path", &req.path)?;
        self.entry(&path)?;
        if req.property.is_empty() {
            return Err(
                ApiError::BadArgument("property: name the property to write".into()).into(),
            );
        }
        let value = req
            .value
            .as_ref()
            .and_then(convert::value_from_proto)
            .ok_or_else(|| ApiError::BadArgument("value: give a float, int or bool".into()))?;
        if !value.is_finite() {
            return Err(ApiError::BadArgument("value: must be finite".into()).into());
        }
        let connection = self
            .connections
            .write(WriteRequest {
                asset: path,
                property: req.property,
                value,
                by: req.by,
            })
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::WritePropertyResponse { connection }))
    }

    async fn get_replication_status(
        &self,
        _req: Request<pb::GetReplicationStatusRequest>,
    ) -> Result<Response<pb::ReplicationStatus>, Status> {
        let at = now();
        let mut out = pb::ReplicationStatus {
            role: "standalone".into(),
            ..Default::default()
        };
        if let Some(s) = &self.sender {
            use std::sync::atomic::Ordering::Relaxed;
            let lag = self.ctx.store.outbox().map(|o| o.lag()).unwrap_or_default();
            out.role = "site".into();
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
            use std::sync::atomic::Ordering::Relaxed;
            out.role = "enterprise".into();
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
        Ok(Response::new(out))
    }

    async fn list_connections(
        &self,
        _req: Request<pb::ListConnectionsRequest>,
    ) -> Result<Response<pb::ListConnectionsResponse>, Status> {
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
        Ok(Response::new(pb::ListConnectionsResponse { connections }))
    }

    async fn shelve_alarm(
        &self,
        req: Request<pb::ShelveAlarmRequest>,
    ) -> Result<Response<pb::ShelveAlarmResponse>, Status> {
        let req = req.into_inner();
        if req.by.trim().is_empty() {
            return Err(ApiError::BadArgument("by: say who shelves".into()).into());
        }
        if req.alarm.is_empty() {
            return Err(ApiError::BadArgument("alarm: name the alarm to shelve".into()).into());
        }
        let (e, actor) = self.sensor_actor(&req.path)?;
        let until = (req.duration_ms > 0)
            .then(|| now().plus_ms(req.duration_ms.min(i64::MAX as u64) as i64));
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
        .ok_or_else(|| ApiError::Unavailable(format!("{}: twin did not answer", e.path())))?
        .map_err(ApiError::from)?;
        Ok(Response::new(pb::ShelveAlarmResponse {
            alarm: Some(alarm_proto(&e, &req.alarm, &status)),
        }))
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

/// Streams a snapshot of the subtree, then its changes. A watcher that falls behind its
/// queue is told so and gets a fresh snapshot: twins never wait for it.
async fn forward_changes(
    ctx: Arc<TwinCtx>,
    mut sub: Watcher,
    tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    prefix: Option<AssetPath>,
    snapshot: bool,
) {
    use pb::watch_response::Item;
    let send = |item: Item| {
        let tx = tx.clone();
        async move {
            tx.send(Ok(pb::WatchResponse { item: Some(item) }))
                .await
                .is_ok()
        }
    };
    let mut last_event_seq = 0u64;
    let send_snapshot = || async {
        let (entries, _) = ctx
            .registry
            .scan(prefix.as_ref(), None, usize::MAX, |_| true);
        let n = entries.len() as u32;
        for e in entries {
            if !send(Item::Snapshot(convert::twin(&e, &e.snapshot()))).await {
                return false;
            }
        }
        send(Item::SnapshotEnd(pb::SnapshotEnd { twins: n })).await
    };
    if snapshot && !send_snapshot().await {
        return;
    }
    loop {
        let missed = sub.take_missed();
        if missed > 0 {
            sub.clear();
            let lag = pb::Lagged {
                skipped: missed,
                events_after_seq: last_event_seq,
            };
            if !send(Item::Lagged(lag)).await || !send_snapshot().await {
                return;
            }
            continue;
        }
        let Some(change) = sub.rx.recv().await else {
            return;
        };
        let item = match change {
            Change::Twin(e, s) => Item::Change(convert::twin(&e, &s)),
            Change::Event(ev) => {
                last_event_seq = ev.seq;
                Item::Event(convert::event(&ev))
            }
        };
        if !send(item).await {
            return;
        }
    }
}

/// Serves the API, health and reflection on `listener` until `token` is cancelled.
pub async fn serve(
    mut api: TwinApi,
    replication: Option<ReplicationApi>,
    listener: TcpListener,
    token: CancellationToken,
) -> Result<(), String> {
    api.token = token.clone();
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<TwinServiceServer<TwinApi>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferrotwin_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ferrotwin_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    // Keep-alives end half-open connections (a site whose link died keeps no stream open).
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(TwinServiceServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
        .add_optional_service(replication.map(|r| {
            ReplicationServiceServer::new(r)
                .accept_compressed(CompressionEncoding::Gzip)
                .send_compressed(CompressionEncoding::Gzip)
                .max_decoding_message_size(MAX_BATCH_BYTES)
        }))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            token.clone().cancelled_owned(),
        );
    // Graceful shutdown waits for open connections; a client that stopped reading would
    // hold it forever. Give them a grace period, then drop them.
    tokio::select! {
        r = server => r.map_err(|e| e.to_string()),
        _ = async {
            token.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("grpc connections still open {SHUTDOWN_GRACE:?} after shutdown; dropping them");
            Ok(())
        }
    }
}
