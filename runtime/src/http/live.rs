//! Live updates for a page over Server-Sent Events, fed by the same `WatchHub` as gRPC
//! `Watch`, scoped to what the page shows: a node and its children (`path`), or an explicit
//! list (`paths`).
//!
//! Messages (`event:` name, JSON `data:`):
//! - `snapshot` `{twins: [Twin]}`: the scope now; first on every stream and after `resync`.
//! - `twin` `Twin`: a twin of the scope changed (at most `MAX_UPDATES_PER_S` per twin).
//! - `event` `Event`: an event of the watched subtree (`events=true`).
//! - `resync` `{skipped, events_after_seq}`: this stream fell behind and lost changes; a fresh
//!   `snapshot` follows. Events after `events_after_seq` may be missing: read `/api/v1/events`.
//!
//! A slow browser never slows the twins: the hub drops changes for a full watcher queue
//! (then this stream resyncs), and changes of one twin are coalesced to the latest.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Extension, Query, State};
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use ferrotwin_models::AssetPath;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};

use super::HttpState;
use super::dto::{self, ErrorDto, TwinDto};
use super::error::HttpError;
use crate::api::{ApiError, TwinApi, convert};
use crate::core::TwinSnapshot;
use crate::registry::TwinEntry;
use crate::security::Caller;
use crate::watch::{Change, Watcher};

/// Updates per twin per second a client gets at most; changes in between are coalesced to the
/// latest (a page cannot show more, and a busy sensor would otherwise fill the stream).
pub const MAX_UPDATES_PER_S: u64 = 5;
const MIN_UPDATE_INTERVAL: Duration = Duration::from_millis(1000 / MAX_UPDATES_PER_S);
/// How often coalesced changes are checked for being due.
const FLUSH_TICK: Duration = Duration::from_millis(50);
/// SSE messages buffered per client; when full, this stream stops draining its watcher, whose
/// queue then fills and the hub drops for it (then: resync).
const STREAM_BUFFER: usize = 256;
/// Twins an explicit `paths` list may name.
const MAX_PATHS: usize = 1000;
/// A comment this often keeps proxies and the browser from timing out an idle stream.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct LiveParams {
    /// Watch this node and its children (empty = the root). Ignored when `paths` is given.
    path: Option<String>,
    /// Comma-separated list of twins to watch instead (at most 1000).
    paths: Option<String>,
    /// Also stream the events of the watched subtree (`true`/`false`, default false).
    events: Option<String>,
}

/// `snapshot` message.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SnapshotMsg {
    pub twins: Vec<TwinDto>,
}

/// `resync` message: the stream fell behind; a `snapshot` follows.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResyncMsg {
    pub skipped: u64,
    /// Seq of the last event this stream delivered (0 if none).
    pub events_after_seq: u64,
}

/// `model` message: a live apply changed the plant at `path` (re-fetch it).
#[derive(Debug, Serialize, ToSchema)]
pub struct ModelMsg {
    pub version: u64,
    pub path: String,
    /// "added", "removed" or "changed".
    pub op: &'static str,
    pub detail: String,
}

/// What one stream shows.
enum Scope {
    /// A node and its children.
    Children(AssetPath),
    List(HashSet<AssetPath>),
}

impl Scope {
    fn holds(&self, p: &AssetPath) -> bool {
        match self {
            Scope::Children(root) => {
                p == root || (p.depth() == root.depth() + 1 && p.starts_with(root))
            }
            Scope::List(set) => set.contains(p),
        }
    }

    /// The subtree the hub must offer this stream: the deepest common ancestor.
    fn prefix(&self) -> Option<AssetPath> {
        match self {
            Scope::Children(root) => Some(root.clone()),
            Scope::List(set) => {
                let mut it = set.iter();
                let mut common = it.next()?.clone();
                for p in it {
                    while !p.starts_with(&common) {
                        common = common.parent()?;
                    }
                }
                Some(common)
            }
        }
    }

    /// The deepest twin the scope shows (deeper changes are not offered to the stream).
    fn max_depth(&self) -> usize {
        match self {
            Scope::Children(root) => root.depth() + 1,
            Scope::List(set) => set.iter().map(AssetPath::depth).max().unwrap_or(0),
        }
    }

    fn snapshot(&self, api: &TwinApi, caller: &Caller) -> Vec<TwinDto> {
        let entries = match self {
            Scope::Children(root) => {
                let depth = root.depth() + 1;
                api.scan(caller, Some(root), usize::MAX, |e| {
                    e.path().depth() <= depth
                })
                .0
            }
            Scope::List(set) => {
                let mut v: Vec<_> = set
                    .iter()
                    .filter(|p| caller.can_read(p))
                    .filter_map(|p| api.find(p))
                    .collect();
                v.sort_by(|a, b| a.path().cmp(b.path()));
                v
            }
        };
        entries.iter().map(|e| dto::twin(&api.twin_of(e))).collect()
    }
}

fn scope_of(api: &TwinApi, q: &LiveParams) -> Result<Scope, HttpError> {
    if let Some(list) = q.paths.as_deref().filter(|l| !l.trim().is_empty()) {
        let mut set = HashSet::new();
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let path = TwinApi::parse_path("paths", p)?;
            api.entry(&path)?;
            set.insert(path);
        }
        if set.len() > MAX_PATHS {
            return Err(HttpError::bad_request(format!(
                "paths: {} twins, more than the limit of {MAX_PATHS}; watch their parent instead",
                set.len()
            )));
        }
        return Ok(Scope::List(set));
    }
    let root = match api.subtree("path", q.path.as_deref().unwrap_or_default())? {
        Some(p) => p,
        None => api
            .root()
            .ok_or_else(|| ApiError::Unavailable("the plant is empty".into()))?,
    };
    Ok(Scope::Children(root))
}

/// Decrements the live-stream gauge when the stream's task ends.
struct LiveGauge(Arc<super::HttpMetrics>);

impl Drop for LiveGauge {
    fn drop(&mut self) {
        self.0.live_streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Server-Sent Events of a page's scope: `snapshot`, then `twin`, `event`, `resync`.
#[utoipa::path(get, path = "/api/v1/live", params(LiveParams),
    responses(
        (status = 200, description = "text/event-stream: `snapshot` (SnapshotMsg), `twin` (TwinDto), `event` (EventDto), `resync` (ResyncMsg)", content_type = "text/event-stream"),
        (status = 400, body = ErrorDto), (status = 404, body = ErrorDto),
        (status = 503, description = "too many open live streams (256); retry later", body = ErrorDto)))]
pub async fn live(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<LiveParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    match open(s, caller, q).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn open(
    s: HttpState,
    caller: Caller,
    q: Result<Query<LiveParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, HttpError> {
    let Query(q) = q?;
    let scope = scope_of(&s.api, &q)?;
    let events = match q.events.as_deref().map(str::trim) {
        None | Some("") | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(v) => {
            return Err(HttpError::bad_request(format!(
                "events: {v:?} is not true or false"
            )));
        }
    };
    let slot = s.api.stream_slot(&caller)?;
    let Ok(permit) = s.live_slots.clone().try_acquire_owned() else {
        s.metrics.live_refused.fetch_add(1, Ordering::Relaxed);
        let mut r = HttpError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: ErrorDto {
                error: format!(
                    "{} live streams are open, the limit; retry later",
                    super::MAX_LIVE_STREAMS
                ),
                nearest_parent: None,
                position: None,
            },
        }
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("5"));
        return Ok(r);
    };
    let sub = s
        .api
        .watch_within(scope.prefix(), scope.max_depth(), events);
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    s.metrics.live_streams.fetch_add(1, Ordering::Relaxed);
    let gauge = LiveGauge(s.metrics.clone());
    let token = s.token.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let _slot = slot;
        let _gauge = gauge;
        tokio::select! {
            _ = token.cancelled() => {}
            _ = forward(s, caller, scope, sub, tx) => {}
        }
    });
    Ok(Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response())
}

type Tx = mpsc::Sender<Result<SseEvent, Infallible>>;

async fn send<T: Serialize>(tx: &Tx, name: &'static str, data: &T) -> bool {
    match SseEvent::default().event(name).json_data(data) {
        Ok(ev) => tx.send(Ok(ev)).await.is_ok(),
        // Our DTOs always serialize; if one did not, skipping it beats ending the stream.
        Err(e) => {
            tracing::warn!(error = %e, message = name, "live message not serializable");
            true
        }
    }
}

/// Snapshot, then changes of the scope, coalesced per twin; resync after a lag. Returns when
/// the client is gone.
async fn forward(s: HttpState, caller: Caller, scope: Scope, mut sub: Watcher, tx: Tx) {
    let snapshot = |api: &TwinApi| SnapshotMsg {
        twins: scope.snapshot(api, &caller),
    };
    if !send(&tx, "snapshot", &snapshot(&s.api)).await {
        return;
    }
    let mut last_event_seq = 0u64;
    let mut last_sent: HashMap<AssetPath, Instant> = HashMap::new();
    let mut pending: HashMap<AssetPath, (Arc<TwinEntry>, Arc<TwinSnapshot>)> = HashMap::new();
    let mut tick = tokio::time::interval(FLUSH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let missed = sub.take_missed();
        if missed > 0 {
            sub.clear();
            pending.clear();
            s.metrics.live_resyncs.fetch_add(1, Ordering::Relaxed);
            let msg = ResyncMsg {
                skipped: missed,
                events_after_seq: last_event_seq,
            };
            if !send(&tx, "resync", &msg).await || !send(&tx, "snapshot", &snapshot(&s.api)).await {
                return;
            }
            continue;
        }
        tokio::select! {
            change = sub.rx.recv() => match change {
                None => return,
                Some(Change::Twin(e, snap)) => {
                    let path = e.path();
                    if !scope.holds(path) || !caller.can_read(path) {
                        continue;
                    }
                    let due = last_sent
                        .get(path)
                        .is_none_or(|t| t.elapsed() >= MIN_UPDATE_INTERVAL);
                    if due {
                        pending.remove(path);
                        last_sent.insert(path.clone(), Instant::now());
                        if !send(&tx, "twin", &dto::twin(&convert::twin(&e, &snap))).await {
                            return;
                        }
                    } else {
                        pending.insert(path.clone(), (e, snap));
                    }
                }
                Some(Change::Event(ev)) => {
                    last_event_seq = ev.seq;
                    if !caller.can_read(&ev.asset) {
                        continue;
                    }
                    if !send(&tx, "event", &dto::event(&convert::event(&ev))).await {
                        return;
                    }
                }
                Some(Change::Model(m)) => {
                    if !caller.can_read(&m.path) {
                        continue;
                    }
                    let msg = ModelMsg {
                        version: m.version,
                        path: m.path.to_string(),
                        op: m.op,
                        detail: m.detail.clone(),
                    };
                    if !send(&tx, "model", &msg).await {
                        return;
                    }
                }
            },
            _ = tick.tick(), if !pending.is_empty() => {
                let due: Vec<AssetPath> = pending
                    .keys()
                    .filter(|p| last_sent.get(*p).is_none_or(|t| t.elapsed() >= MIN_UPDATE_INTERVAL))
                    .cloned()
                    .collect();
                for p in due {
                    if let Some((e, snap)) = pending.remove(&p) {
                        last_sent.insert(p, Instant::now());
                        if !send(&tx, "twin", &dto::twin(&convert::twin(&e, &snap))).await {
                            return;
                        }
                    }
                }
            }
        }
    }
}
