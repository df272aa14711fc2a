//! The one API layer: every read, acknowledgement, shelve and write, with protobuf messages
//! as arguments and answers. The gRPC service (`grpc`) and the HTTP JSON API and pages
//! (`http`) are thin edges over `TwinApi`: they decode, call one method, encode. A check
//! made here (a limit, a path, who asks) holds for both; nothing below is reached past it.

pub mod actions;
mod admin;
pub mod convert;
pub mod error;
pub mod names;
pub mod prometheus;

use std::sync::Arc;
use std::time::Duration;

use ferrotwin_adapters::{WriteError, WriteRequest};
use ferrotwin_models::query::{FieldValue, Query, Schema, Subject};
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{
    AssetId, AssetPath, Event, EventKind, Property, Severity, Timestamp, Value,
};
use ferrotwin_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use error::{ApiError, ErrorCode};

use crate::connections::Connections;
use crate::core::{TwinMsg, ask};
use crate::registry::TwinEntry;
use crate::replication::enterprise::{EnterpriseReceiver, freshness_ms};
use crate::replication::site::SenderStatus;
use crate::security::{Authenticator, Caller, Credentials, Role};
use crate::store::EventFilter;
use crate::store::audit::{AuditEntry, AuditFilter};
use crate::twin::TwinCtx;
use crate::twin::select::{self, TwinSchema, TwinSubject};
use crate::watch::Watcher;

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
/// Open streams (gRPC Watch and web live streams together) one client may hold: a quarter
/// of either global limit, so one client cannot take them all. A client is its subject with
/// security on, its address without.
pub const MAX_STREAMS_PER_CLIENT: usize = 64;

/// Open streams per client (`MAX_STREAMS_PER_CLIENT`).
#[derive(Debug, Default)]
pub struct StreamSlots(std::sync::Mutex<std::collections::HashMap<String, usize>>);

/// One client's open stream; dropping it gives the slot back.
#[derive(Debug)]
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    client: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut m = self
            .slots
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.client);
            }
        }
    }
}

/// Longest alarm or property name, `by` and comment a client may send (bytes): they end up
/// in events, the store and replication.
pub const MAX_NAME_BYTES: usize = 128;
pub const MAX_COMMENT_BYTES: usize = 1024;
/// Longest shelve: a shelved alarm comes back within a month at the latest.
pub const MAX_SHELVE_MS: u64 = 30 * 24 * 3_600_000;

/// `field` of a request is at most `max` bytes, or INVALID_ARGUMENT naming it (and quoting
/// only a short prefix).
fn bounded(field: &'static str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.len() > max {
        return Err(ApiError::BadArgument(format!(
            "{field}: {} bytes, at most {max} ({:?})",
            s.len(),
            ferrotwin_models::asset::quote_prefix(s)
        )));
    }
    Ok(())
}

#[derive(Clone)]
pub struct TwinApi {
    ctx: Arc<TwinCtx>,
    connections: Arc<Connections>,
    sender: Option<Arc<SenderStatus>>,
    enterprise: Option<Arc<EnterpriseReceiver>>,
    token: CancellationToken,
    auth: Arc<Authenticator>,
    streams: Arc<StreamSlots>,
    listeners: Arc<crate::security::conn::Listeners>,
    /// Live plant changes (none for a runtime that takes none, as `check`'s).
    applier: Option<Arc<crate::apply::Applier>>,
}

impl TwinApi {
    pub(crate) fn new(ctx: Arc<TwinCtx>, connections: Arc<Connections>) -> TwinApi {
        TwinApi {
            applier: None,
            ctx,
            connections,
            sender: None,
            enterprise: None,
            token: CancellationToken::new(),
            auth: Arc::new(Authenticator::open()),
            streams: Arc::new(StreamSlots::default()),
            listeners: Arc::default(),
        }
    }

    /// Live plant changes through `applier`.
    pub(crate) fn with_applier(mut self, applier: Arc<crate::apply::Applier>) -> TwinApi {
        self.applier = Some(applier);
        self
    }

    /// The listeners' connection admission, for the metrics.
    pub(crate) fn with_listeners(
        mut self,
        listeners: Arc<crate::security::conn::Listeners>,
    ) -> TwinApi {
        self.listeners = listeners;
        self
    }

    /// Who callers must prove to be (`Authenticator::open()`: security off).
    pub(crate) fn with_auth(
        mut self,
        auth: Arc<Authenticator>,
        streams: Arc<StreamSlots>,
    ) -> TwinApi {
        self.auth = auth;
        self.streams = streams;
        self
    }

    /// A stream slot of `caller`'s client, or RESOURCE_EXHAUSTED past
    /// `MAX_STREAMS_PER_CLIENT`.
    pub(crate) fn stream_slot(&self, caller: &Caller) -> Result<StreamSlot, ApiError> {
        let client = if caller.is_open() {
            caller.source()
        } else {
            caller.name().to_owned()
        };
        let mut m = self
            .streams
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = m.entry(client.clone()).or_insert(0);
        if *n >= MAX_STREAMS_PER_CLIENT {
            return Err(ApiError::Limit(format!(
                "{client} holds {MAX_STREAMS_PER_CLIENT} open streams, the limit per client; close one"
            )));
        }
        *n += 1;
        Ok(StreamSlot {
            slots: self.streams.clone(),
            client,
        })
    }

    /// The caller `creds` prove, or UNAUTHENTICATED. A refused sign-in is audited (a source
    /// that fails too often is refused without a check, and without a record per try).
    pub fn authenticate(&self, creds: Credentials<'_>) -> Result<Caller, ApiError> {
        if self.auth.is_open() {
            return Ok(Caller::open(creds.addr));
        }
        match self.auth.authenticate(creds) {
            Ok(subject) => Ok(Caller {
                subject,
                addr: creds.addr,
            }),
            Err(e) => {
                self.ctx
                    .metrics
                    .auth_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if matches!(e, crate::security::AuthError::Invalid(_)) {
                    let method = if creds.bearer.is_some() {
                        "bearer token"
                    } else {
                        "client certificate"
                    };
                    self.audit(AuditEntry {
                        subject: "-".into(),
                        source: creds
                            .addr
                            .map_or_else(|| "-".into(), |a| a.ip().to_string()),
                        action: "sign-in",
                        target: method.into(),
                        value: String::new(),
                        result: format!("refused: {e}"),
                    });
                }
                Err(ApiError::Unauthenticated(e.to_string()))
            }
        }
    }

    /// Does the runtime authenticate its callers?
    pub fn secured(&self) -> bool {
        !self.auth.is_open()
    }

    /// Appends an audit record (not waiting for the disk); a failure is logged.
    pub(crate) fn audit(&self, e: AuditEntry) {
        if let Err(err) = self.ctx.store.audit().append(e, false) {
            tracing::error!(error = %err, "audit record could not be written");
        }
    }

    /// `caller` may act as `role` on `path`, or PERMISSION_DENIED (audited).
    pub(crate) fn allow(
        &self,
        caller: &Caller,
        role: Role,
        path: &AssetPath,
        action: &'static str,
    ) -> Result<(), ApiError> {
        if caller.can(role, path) {
            return Ok(());
        }
        self.deny(caller, role, path.as_str(), action)
    }

    fn deny(
        &self,
        caller: &Caller,
        role: Role,
        target: &str,
        action: &'static str,
    ) -> Result<(), ApiError> {
        self.ctx
            .metrics
            .auth_denials
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.audit(AuditEntry {
            subject: caller.name().to_owned(),
            source: caller.source(),
            action: "denied",
            target: format!("{action} {target}"),
            value: String::new(),
            result: format!("refused: needs {role}"),
        });
        Err(ApiError::Denied {
            subject: caller.name().to_owned(),
            role,
            target: target.to_owned(),
        })
    }

    /// `caller` holds `role` on the plant's root (status, connections, audit).
    pub(crate) fn allow_root(
        &self,
        caller: &Caller,
        role: Role,
        action: &'static str,
    ) -> Result<(), ApiError> {
        match self.root() {
            Some(r) if caller.can(role, &r) => Ok(()),
            None if caller.subject.has_role(role) => Ok(()),
            _ => self.deny(caller, role, "the plant", action),
        }
    }

    /// Who an action is recorded as: the authenticated subject; without security, what the
    /// client says (required, as before security existed).
    fn actor_name(caller: &Caller, claimed: String, what: &str) -> Result<String, ApiError> {
        if !caller.is_open() {
            return Ok(caller.name().to_owned());
        }
        bounded("by", &claimed, MAX_NAME_BYTES)?;
        if claimed.trim().is_empty() {
            return Err(ApiError::BadArgument(format!("by: say who {what}")));
        }
        Ok(claimed)
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

    /// The twin a page token names (the last path of the page before), which must exist and
    /// lie in `within`: anything else is not a token this listing gave out.
    /// `limit` of a listing of records (events, audit): 0 = 100, at most `MAX_PAGE`.
    fn record_limit(limit: u32) -> Result<usize, ApiError> {
        match limit as usize {
            0 => Ok(100),
            n if n > MAX_PAGE => Err(ApiError::BadArgument(format!(
                "limit: {n} is above the limit of {MAX_PAGE}"
            ))),
            n => Ok(n),
        }
    }

    fn page_token(
        &self,
        s: &str,
        within: Option<&AssetPath>,
    ) -> Result<Option<AssetPath>, ApiError> {
        if s.is_empty() {
            return Ok(None);
        }
        let foreign = || {
            ApiError::BadArgument(format!(
                "page_token: {:?} is not a token of this listing; give back next_page_token as it came",
                ferrotwin_models::asset::quote_prefix(s)
            ))
        };
        let p = AssetPath::parse(s).map_err(|_| foreign())?;
        if self.ctx.registry.by_path(&p).is_none() || within.is_some_and(|w| !p.starts_with(w)) {
            return Err(foreign());
        }
        Ok(Some(p))
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
    pub async fn twin(
        &self,
        caller: &Caller,
        req: pb::GetTwinRequest,
    ) -> Result<pb::Twin, ApiError> {
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
        self.allow(caller, Role::Viewer, e.path(), "read")?;
        Ok(self.twin_of(&e))
    }

    pub async fn browse_twins(
        &self,
        caller: &Caller,
        req: pb::BrowseRequest,
    ) -> Result<pb::BrowseResponse, ApiError> {
        let root = match self.subtree("path", &req.path)? {
            Some(p) => p,
            None => self
                .ctx
                .plant()
                .root
                .as_ref()
                .map(|r| r.path.clone())
                .ok_or_else(|| ApiError::Unavailable("the plant is empty".into()))?,
        };
        let limit = Self::page(req.page_size)?;
        let after = self.page_token(&req.page_token, Some(&root))?;
        let max_depth = root.depth() + req.depth as usize;
        let (entries, more) = self
            .ctx
            .registry
            .scan(Some(&root), after.as_ref(), limit, |e| {
                e.path().depth() <= max_depth && caller.can_read(e.path())
            });
        let (twins, next_page_token) = self.page_of(&entries, more);
        Ok(pb::BrowseResponse {
            twins,
            next_page_token,
        })
    }

    pub async fn query_twins(
        &self,
        caller: &Caller,
        req: pb::QueryRequest,
    ) -> Result<pb::QueryResponse, ApiError> {
        let q = Query::parse(&req.query).map_err(ApiError::from)?;
        let schema = TwinSchema {
            sensors: self.ctx.registry.sensor_names(),
        };
        q.check(&schema).map_err(ApiError::from)?;
        if !req.order_by.is_empty() && !select::can_rank(&schema, &req.order_by) {
            return Err(ApiError::BadArgument(format!(
                "order_by: {:?} is not a number field to rank by; fields: {}",
                ferrotwin_models::asset::quote_prefix(&req.order_by),
                schema.known()
            )));
        }
        let limit = Self::page(req.page_size)?;
        let after = self.page_token(&req.page_token, None)?;
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
        // Scan in windows: the path index lock is held only to copy a window of entries,
        // and the query (which may read other twins, e.g. a machine's sensors) runs
        // outside it. On a blocking thread: a full-plant query may take a while.
        let ctx = self.ctx.clone();
        let ascending = req.ascending;
        let caller = caller.clone();
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
                            && caller.can_read(e.path())
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
        caller: &Caller,
        req: pb::GetHistoryRequest,
    ) -> Result<pb::GetHistoryResponse, ApiError> {
        let e = self.entry(&Self::parse_path("path", &req.path)?)?;
        self.allow(caller, Role::Viewer, e.path(), "read")?;
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
        caller: &Caller,
        req: pb::ListEventsRequest,
    ) -> Result<pb::ListEventsResponse, ApiError> {
        let prefix = self.subtree("path", &req.path)?;
        if let Some(p) = &prefix
            && !caller.can_read(p)
            && !self.readable_below(caller, p)
        {
            self.allow(caller, Role::Viewer, p, "read")?;
        }
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
        let limit = Self::record_limit(req.limit)?;
        if ferrotwin_proto::v1::Severity::try_from(req.min_severity).is_err() {
            return Err(ApiError::BadArgument(format!(
                "min_severity: {} is not a severity (0 unspecified, 1 info … 5 critical)",
                req.min_severity
            )));
        }
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
            // Events of assets the caller may not read are left out (the cursor still
            // moves past them).
            events: events
                .iter()
                .filter(|e| caller.can_read(&e.asset))
                .map(convert::event)
                .collect(),
            next_after_seq: next,
        })
    }

    pub async fn acknowledge(
        &self,
        caller: &Caller,
        req: pb::AcknowledgeAlarmRequest,
    ) -> Result<pb::AcknowledgeAlarmResponse, ApiError> {
        let by = Self::actor_name(caller, req.by, "acknowledges")?;
        bounded("alarm", &req.alarm, MAX_NAME_BYTES)?;
        bounded("comment", &req.comment, MAX_COMMENT_BYTES)?;
        if req.alarm.is_empty() {
            return Err(ApiError::BadArgument(
                "alarm: name the alarm to acknowledge".into(),
            ));
        }
        let (e, actor) = self.sensor_actor(&req.path)?;
        self.allow(caller, Role::Operator, e.path(), "acknowledge")?;
        let alarm = req.alarm.clone();
        let comment = req.comment.clone();
        let status = ask(
            &actor,
            |reply| TwinMsg::Acknowledge {
                alarm,
                by,
                comment: req.comment,
                reply,
            },
            TWIN_CALL_TIMEOUT,
        )
        .await
        .ok_or_else(|| ApiError::Unavailable(format!("{}: twin did not answer", e.path())))
        .and_then(|r| r.map_err(ApiError::from));
        self.audit_result(
            caller,
            "acknowledge",
            format!("{} {}", e.path(), req.alarm),
            comment,
            &status,
        );
        let status = status?;
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
        caller: &Caller,
        req: pb::WritePropertyRequest,
    ) -> Result<pb::WritePropertyResponse, ApiError> {
        // The write's whole way is one trace: this span, the audit record, the adapter's
        // `adapter.write` and its protocol span (with the PLC's answer).
        let span = tracing::info_span!(
            "twin.write",
            ferrotwin.asset = %req.path,
            ferrotwin.property = %req.property,
            enduser.id = %caller.name(),
            ferrotwin.connection = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            error.type = tracing::field::Empty,
        );
        let written = self
            .write_traced(caller, req)
            .instrument(span.clone())
            .await;
        match &written {
            Ok(r) => {
                span.record("ferrotwin.connection", r.connection.as_str());
            }
            Err(e) => {
                span.record("otel.status_code", "error");
                span.record("error.type", tracing::field::debug(e.code()));
            }
        }
        written
    }

    async fn write_traced(
        &self,
        caller: &Caller,
        req: pb::WritePropertyRequest,
    ) -> Result<pb::WritePropertyResponse, ApiError> {
        let by = Self::actor_name(caller, req.by, "writes")?;
        bounded("property", &req.property, MAX_NAME_BYTES)?;
        let path = Self::parse_path("path", &req.path)?;
        let entry = self.entry(&path)?;
        self.allow(caller, Role::Engineer, &path, "write")?;
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
        // The write is on record before it reaches the PLC, or it does not happen.
        let target = format!("{path}.{}", req.property);
        let intent = AuditEntry {
            subject: caller.name().to_owned(),
            source: caller.source(),
            action: "write",
            target: target.clone(),
            value: value.to_string(),
            result: "requested".into(),
        };
        // The plant spec's range and type, before any PLC sees the write (and after the
        // audit record: a refused attempt is on record too, and an event).
        let kind = &entry.def.kind;
        let refused = refused_by_spec(kind, &path, &req.property, value);
        // What goes to the PLC is what was checked: a whole float for an int property as
        // the int, 0 or 1 for a bool as the bool.
        let value = spec_value(kind, &req.property, value);
        self.audit_intent(intent).await?;
        // Every attempt is an event with its result: the adapters record what a PLC answered
        // (or did not in time); a refusal before any PLC is recorded here.
        let refusal_event = |why: String| {
            Event::new(
                path.clone(),
                Timestamp::now(),
                EventKind::Write,
                Severity::Low,
                format!("{} = {value} by {by} refused: {why}", req.property),
            )
        };
        let written = match refused {
            Some(why) => {
                self.ctx
                    .emit(refusal_event(format!("{why} (plant spec)")))
                    .await;
                Err(ApiError::BadArgument(format!(
                    "{path} {} = {value}: {why} (plant spec); no PLC was written",
                    req.property
                )))
            }
            None => {
                let answer = self
                    .connections
                    .write(WriteRequest {
                        asset: path.clone(),
                        property: req.property.clone(),
                        value,
                        by: by.clone(),
                    })
                    .await;
                if let Err(e) = &answer
                    && !matches!(e, WriteError::Refused { .. } | WriteError::Timeout { .. })
                {
                    self.ctx.emit(refusal_event(e.to_string())).await;
                }
                answer.map_err(ApiError::from)
            }
        };
        self.audit_result(caller, "write", target, value.to_string(), &written);
        let (connection, ack) = written?;
        Ok(pb::WritePropertyResponse {
            connection,
            result: ack.as_str().to_owned(),
        })
    }

    /// Shelves an alarm of a sensor, for `duration_ms` (0 = until unshelved).
    pub async fn shelve(
        &self,
        caller: &Caller,
        req: pb::ShelveAlarmRequest,
    ) -> Result<pb::ShelveAlarmResponse, ApiError> {
        let by = Self::actor_name(caller, req.by, "shelves")?;
        bounded("alarm", &req.alarm, MAX_NAME_BYTES)?;
        if req.duration_ms > MAX_SHELVE_MS {
            return Err(ApiError::BadArgument(format!(
                "duration_ms: {} is longer than the longest shelve, {MAX_SHELVE_MS} ms (30 days)",
                req.duration_ms
            )));
        }
        if req.alarm.is_empty() {
            return Err(ApiError::BadArgument(
                "alarm: name the alarm to shelve".into(),
            ));
        }
        let (e, actor) = self.sensor_actor(&req.path)?;
        self.allow(caller, Role::Operator, e.path(), "shelve")?;
        let until = (req.duration_ms > 0)
            .then(|| Timestamp::now().plus_ms(req.duration_ms.min(i64::MAX as u64) as i64));
        let alarm = req.alarm.clone();
        let status = ask(
            &actor,
            |reply| TwinMsg::Shelve {
                alarm,
                until,
                by,
                reply,
            },
            TWIN_CALL_TIMEOUT,
        )
        .await
        .ok_or_else(|| ApiError::Unavailable(format!("{}: twin did not answer", e.path())))
        .and_then(|r| r.map_err(ApiError::from));
        let asked = if req.duration_ms == 0 {
            "unshelve".to_owned()
        } else {
            format!("{} ms", req.duration_ms)
        };
        self.audit_result(
            caller,
            "shelve",
            format!("{} {}", e.path(), req.alarm),
            asked,
            &status,
        );
        let status = status?;
        Ok(pb::ShelveAlarmResponse {
            alarm: Some(alarm_proto(&e, &req.alarm, &status)),
        })
    }

    /// The site's link to its enterprise, or the enterprise's view of its sites.
    pub fn replication_status(&self, caller: &Caller) -> Result<pb::ReplicationStatus, ApiError> {
        self.allow_root(caller, Role::Viewer, "replication status")?;
        Ok(self.replication_status_unchecked())
    }

    fn replication_status_unchecked(&self) -> pb::ReplicationStatus {
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
                    event_seq: m.event_seq.load(Relaxed),
                    duplicate_events: m.duplicate_events.load(Relaxed),
                    refused: m.refused.load(Relaxed),
                    skipped_batches: m.skipped_batches.load(Relaxed),
                    rewinds: m.rewinds.load(Relaxed),
                    streams_refused: m.streams_refused.load(Relaxed),
                    event_gaps: m.event_gaps.load(Relaxed),
                })
                .collect();
        }
        out
    }

    /// The PLC connections and their counters.
    pub fn connection_list(
        &self,
        caller: &Caller,
    ) -> Result<pb::ListConnectionsResponse, ApiError> {
        self.allow_root(caller, Role::Viewer, "list connections")?;
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
        Ok(pb::ListConnectionsResponse { connections })
    }

    /// The caller and its grants.
    pub fn who_am_i(&self, caller: &Caller) -> pb::WhoAmIResponse {
        pb::WhoAmIResponse {
            subject: caller.name().to_owned(),
            method: caller.subject.method.as_str().to_owned(),
            grants: caller
                .subject
                .grants
                .iter()
                .map(|g| pb::Grant {
                    role: g.role.as_str().to_owned(),
                    paths: g.patterns.clone(),
                })
                .collect(),
        }
    }

    /// A page of the audit log (admin on the plant).
    pub async fn list_audit(
        &self,
        caller: &Caller,
        req: pb::ListAuditRequest,
    ) -> Result<pb::ListAuditResponse, ApiError> {
        self.allow_root(caller, Role::Admin, "read the audit log")?;
        let limit = Self::record_limit(req.limit)?;
        let f = AuditFilter {
            after_seq: req.after_seq,
            limit,
            subject: req.subject,
            action: req.action,
            target: req.target,
            from_us: req.from_us,
            to_us: req.to_us,
        };
        let store = self.ctx.store.clone();
        let records = tokio::task::spawn_blocking(move || store.audit().list(&f))
            .await
            .map_err(|e| ApiError::Unavailable(format!("audit read failed: {e}")))?
            .map_err(|e| ApiError::Unavailable(format!("audit read failed: {e}")))?;
        let next_after_seq = if records.len() == limit {
            records.last().map_or(0, |r| r.seq)
        } else {
            0
        };
        Ok(pb::ListAuditResponse {
            records: records
                .into_iter()
                .map(|r| pb::AuditRecord {
                    seq: r.seq,
                    ts_us: r.ts_us,
                    subject: r.subject,
                    source: r.source,
                    action: r.action,
                    target: r.target,
                    value: r.value,
                    result: r.result,
                    prev_hash: r.prev,
                })
                .collect(),
            next_after_seq,
        })
    }

    /// Checks the audit log's hash chain (admin on the plant).
    pub async fn verify_audit(&self, caller: &Caller) -> Result<pb::VerifyAuditResponse, ApiError> {
        self.allow_root(caller, Role::Admin, "verify the audit log")?;
        let store = self.ctx.store.clone();
        let (records, broken) = tokio::task::spawn_blocking(move || store.audit().verify())
            .await
            .map_err(|e| ApiError::Unavailable(format!("audit read failed: {e}")))?
            .map_err(|e| ApiError::Unavailable(format!("audit read failed: {e}")))?;
        Ok(pb::VerifyAuditResponse {
            records,
            intact: broken.is_none(),
            broken_seq: broken.as_ref().map_or(0, |b| b.seq),
            broken_reason: broken.map(|b| b.what).unwrap_or_default(),
        })
    }

    /// Records what came of an action.
    /// Puts an action's intent on the audit log durably, before the action: no record, no
    /// action (UNAVAILABLE naming why).
    async fn audit_intent(&self, intent: AuditEntry) -> Result<(), ApiError> {
        let action = intent.action;
        let store = self.ctx.store.clone();
        tokio::task::spawn_blocking(move || store.audit().append(intent, true))
            .instrument(tracing::info_span!(
                "audit.append",
                ferrotwin.action = action
            ))
            .await
            .map_err(|e| ApiError::Unavailable(format!("audit: {e}")))?
            .map_err(|e| {
                ApiError::Unavailable(format!(
                    "{action} refused: its audit record cannot be written ({e})"
                ))
            })?;
        Ok(())
    }

    fn audit_result<T>(
        &self,
        caller: &Caller,
        action: &'static str,
        target: String,
        value: String,
        r: &Result<T, ApiError>,
    ) {
        self.audit(AuditEntry {
            subject: caller.name().to_owned(),
            source: caller.source(),
            action,
            target,
            value,
            result: match r {
                Ok(_) => "ok".into(),
                Err(e) => format!("failed: {e}"),
            },
        });
    }
}

/// Live streams and what the edges read without a request message of their own.
impl TwinApi {
    /// Admits a watcher of the subtree at `path` (empty: everything), within `MAX_WATCHERS`.
    pub(crate) fn open_watch(
        &self,
        caller: &Caller,
        path: &str,
        events: bool,
    ) -> Result<(Watcher, Option<AssetPath>, StreamSlot), ApiError> {
        let prefix = self.subtree("path", path)?;
        if let Some(p) = &prefix
            && !caller.can_read(p)
            && !self.readable_below(caller, p)
        {
            self.allow(caller, Role::Viewer, p, "watch")?;
        }
        let slot = self.stream_slot(caller)?;
        if self.ctx.hub.watchers() >= MAX_WATCHERS {
            return Err(ApiError::Limit(format!(
                "{MAX_WATCHERS} watch streams are open, the limit; close one or watch a wider subtree"
            )));
        }
        Ok((self.ctx.hub.subscribe(prefix.clone(), events), prefix, slot))
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
        prometheus::render_runtime(&prometheus::Sources {
            metrics: &self.ctx.metrics,
            inflight: self.ctx.credits.in_flight(),
            store: &self.ctx.store,
            connections: &self.connections,
            sender: self.sender.as_deref(),
            enterprise: self.enterprise.as_deref(),
            listeners: &self.listeners,
        })
    }

    /// The runtime's counters, for a server layer that counts into them.
    pub(crate) fn metrics_handle(&self) -> Arc<crate::core::Metrics> {
        self.ctx.metrics.clone()
    }

    /// Changes a watcher may hold before it is told it lagged.
    pub(crate) fn watch_capacity(&self) -> usize {
        self.ctx.hub.capacity()
    }

    /// Every twin at and below `prefix` that `caller` may read, in path order.
    pub(crate) fn readable_below_entries(
        &self,
        caller: &Caller,
        prefix: Option<&AssetPath>,
    ) -> Vec<Arc<TwinEntry>> {
        self.scan(caller, prefix, usize::MAX, |_| true).0
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
        caller: &Caller,
        prefix: Option<&AssetPath>,
        limit: usize,
        mut keep: impl FnMut(&TwinEntry) -> bool,
    ) -> (Vec<Arc<TwinEntry>>, bool) {
        self.ctx.registry.scan(prefix, None, limit, |e| {
            caller.can_read(e.path()) && keep(e)
        })
    }

    /// Does some twin at or below `p` fall under one of the caller's grants? (A subject
    /// scoped to `acme/berlin/**` may watch `acme` and sees Berlin's twins.)
    fn readable_below(&self, caller: &Caller, p: &AssetPath) -> bool {
        !self
            .ctx
            .registry
            .scan(Some(p), None, 1, |e| caller.can_read(e.path()))
            .0
            .is_empty()
    }

    /// The twin at `path`, if there is one.
    pub(crate) fn find(&self, path: &AssetPath) -> Option<Arc<TwinEntry>> {
        self.ctx.registry.by_path(path)
    }

    /// The plant's root (the enterprise), `None` for an empty plant.
    pub(crate) fn root(&self) -> Option<AssetPath> {
        self.ctx.plant().root.as_ref().map(|r| r.path.clone())
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

    /// PLC connections, and how many are connected now.
    pub fn connection_counts(&self) -> (usize, usize) {
        let all = self.connections.statuses();
        let up = all
            .iter()
            .filter(|(s, ..)| s.link == ferrotwin_adapters::LinkState::Connected)
            .count();
        (all.len(), up)
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

/// `value` coerced to the type the plant spec gives `property` of an asset of `kind` (a
/// sensor's value, a listed setpoint); as it is when the spec says no type.
fn spec_value(kind: &AssetKind, property: &str, value: Value) -> Value {
    let value_type = match kind {
        AssetKind::Sensor { spec, .. } if property == "value" => Some(spec.value_type),
        kind => kind.setpoint(property).map(|s| s.value_type),
    };
    value_type.map_or(value, |t| ferrotwin_models::spec::coerce(value, t))
}

/// Why the plant spec refuses writing `value` to `property` of the asset of `kind` at
/// `path`, if it does: a machine whose type lists setpoints (a line or an area that lists its
/// own) takes these only, of their type, within range; a sensor takes a value of its type
/// within its `min`/`max`, and nothing else.
fn refused_by_spec(
    kind: &AssetKind,
    path: &AssetPath,
    property: &str,
    value: Value,
) -> Option<String> {
    match kind {
        AssetKind::Machine { .. } | AssetKind::Line { .. } | AssetKind::Area { .. } => kind
            .unlisted_setpoint(path, property)
            .or_else(|| kind.setpoint(property)?.refuses(value)),
        AssetKind::Sensor { spec, .. } if property != "value" => Some(format!(
            "a sensor is written through its value, not {property:?} (sensor {:?})",
            spec.name
        )),
        AssetKind::Sensor { spec, .. } => spec.refuses_write(value),
        _ => None,
    }
}
