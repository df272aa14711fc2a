//! The JSON API under `/api/v1`: get, browse, query, history, events, alarms (summary and
//! acknowledge), search, plus `/healthz`, `/metrics` and the OpenAPI description. Reads go
//! through the same `TwinApi` functions as gRPC; parameters are parsed here so that a bad one
//! is named in the 400 answer.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferrotwin_models::alarm::AlarmState;
use ferrotwin_models::spec::AssetKind;
use ferrotwin_models::{AssetPath, Level, Timestamp};
use ferrotwin_proto::v1 as pb;
use serde::Deserialize;
use utoipa::{IntoParams, OpenApi};

use super::HttpState;
use super::dto::{self, ErrorDto};
use super::error::HttpError;
use crate::api::{ApiError, convert};
use crate::core::TwinState;
use crate::security::Caller;

/// Alarms one summary lists at most (`truncated` says when more matched).
const MAX_ALARMS: usize = 10_000;
const DEFAULT_ALARMS: usize = 1000;
/// Search hits at most: the box under the tree shows a short list.
const MAX_SEARCH_HITS: usize = 100;
const DEFAULT_SEARCH_HITS: usize = 20;
/// History range when neither `from` nor `range` is given.
const DEFAULT_RANGE_US: i64 = 3_600_000_000;

type Answer<T> = Result<Json<T>, HttpError>;

/// Parameters arrive as text so that a bad number is named in the answer (axum's own
/// rejection would say only that the query string failed).
fn num<T: std::str::FromStr>(field: &str, v: &Option<String>) -> Result<Option<T>, HttpError>
where
    T::Err: std::fmt::Display,
{
    match v.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(s) => s
            .parse()
            .map(Some)
            .map_err(|e| HttpError::bad_request(format!("{field}: {s:?} is not valid: {e}"))),
    }
}

fn flag(field: &str, v: &Option<String>) -> Result<bool, HttpError> {
    match v.as_deref().map(str::trim) {
        None | Some("") | Some("false") | Some("0") => Ok(false),
        Some("true") | Some("1") => Ok(true),
        Some(s) => Err(HttpError::bad_request(format!(
            "{field}: {s:?} is not true or false"
        ))),
    }
}

/// A time: µs since the Unix epoch, or RFC 3339 (`2026-11-25T10:00:00Z`).
fn time(field: &str, v: &Option<String>) -> Result<Option<Timestamp>, HttpError> {
    let Some(s) = v.as_deref().map(str::trim).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    if let Ok(us) = s.parse::<i64>() {
        return Ok(Some(Timestamp(us)));
    }
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| Some(Timestamp(t.timestamp_micros())))
        .map_err(|e| {
            HttpError::bad_request(format!(
                "{field}: {s:?} is neither µs since the epoch nor an RFC 3339 time: {e}"
            ))
        })
}

/// A span like `15m`, `1h`, `24h`, `7d`, `30s`, in µs.
pub fn range_us(field: &str, s: &str) -> Result<i64, HttpError> {
    let bad = || {
        HttpError::bad_request(format!(
            "{field}: {s:?} is not a range (a positive number and s, m, h or d: 15m, 1h, 24h)"
        ))
    };
    let s = s.trim();
    let split = s.len().checked_sub(1).ok_or_else(bad)?;
    let (n, unit) = s.split_at(split);
    let n: i64 = n.parse().map_err(|_| bad())?;
    let unit_us: i64 = match unit {
        "s" => 1_000_000,
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        _ => return Err(bad()),
    };
    if n <= 0 {
        return Err(bad());
    }
    n.checked_mul(unit_us).ok_or_else(bad)
}

pub fn routes() -> Router<HttpState> {
    Router::new()
        .route("/api/v1/twins/{*path}", get(get_twin))
        .route("/api/v1/browse", get(browse))
        .route("/api/v1/query", get(query))
        .route("/api/v1/history", get(history))
        .route("/api/v1/events", get(events))
        .route("/api/v1/alarms", get(alarms))
        .route("/api/v1/alarms/ack", post(ack))
        .route("/api/v1/search", get(search))
        .route("/api/v1/rules", get(rules))
        .route("/api/v1/live", get(super::live::live))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The twin at `path`.
#[utoipa::path(get, path = "/api/v1/twins/{path}",
    params(("path" = String, Path, description = "Asset path, e.g. acme/berlin/assembly/line-1")),
    responses(
        (status = 200, body = dto::TwinDto),
        (status = 400, description = "malformed path", body = ErrorDto),
        (status = 404, description = "no such asset; `nearest_parent` names the nearest existing one", body = ErrorDto),
    ))]
async fn get_twin(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    Path(path): Path<String>,
) -> Answer<dto::TwinDto> {
    let t = s
        .api
        .twin(
            &caller,
            pb::GetTwinRequest {
                key: Some(pb::get_twin_request::Key::Path(path)),
            },
        )
        .await?;
    Ok(Json(dto::twin(&t)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct BrowseParams {
    /// Asset path; empty = the root (enterprise).
    path: Option<String>,
    /// Levels below `path` (default 1: its children; 0 = only itself).
    depth: Option<String>,
    /// Default 1000, at most 10000.
    page_size: Option<String>,
    /// `next_page_token` of the previous page.
    page_token: Option<String>,
}

/// `path` and its descendants down to `depth`, depth-first, parents first.
#[utoipa::path(get, path = "/api/v1/browse", params(BrowseParams),
    responses((status = 200, body = dto::TwinPage), (status = 400, body = ErrorDto), (status = 404, body = ErrorDto)))]
async fn browse(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<BrowseParams>, QueryRejection>,
) -> Answer<dto::TwinPage> {
    let Query(q) = q?;
    let r = s
        .api
        .browse_twins(
            &caller,
            pb::BrowseRequest {
                path: q.path.unwrap_or_default(),
                depth: num("depth", &q.depth)?.unwrap_or(1),
                page_size: num("page_size", &q.page_size)?.unwrap_or(0),
                page_token: q.page_token.unwrap_or_default(),
            },
        )
        .await?;
    Ok(Json(dto::TwinPage {
        twins: r.twins.iter().map(dto::twin).collect(),
        next_page_token: r.next_page_token,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct QueryParams {
    /// The query, e.g. `level = sensor and value > 80`.
    q: Option<String>,
    /// Rank by this numeric field (highest first unless `ascending`); one page.
    order_by: Option<String>,
    ascending: Option<String>,
    page_size: Option<String>,
    page_token: Option<String>,
}

/// Twins matching a query of the query language.
#[utoipa::path(get, path = "/api/v1/query", params(QueryParams),
    responses((status = 200, body = dto::TwinPage),
        (status = 400, description = "the parser's message and `position`", body = ErrorDto)))]
async fn query(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<QueryParams>, QueryRejection>,
) -> Answer<dto::TwinPage> {
    let Query(q) = q?;
    let text = q.q.unwrap_or_default();
    if text.trim().is_empty() {
        return Err(HttpError::bad_request(
            "q: give a query, e.g. `level = sensor and alarm = active`",
        ));
    }
    let r = s
        .api
        .query_twins(
            &caller,
            pb::QueryRequest {
                query: text,
                page_size: num("page_size", &q.page_size)?.unwrap_or(0),
                page_token: q.page_token.unwrap_or_default(),
                order_by: q.order_by.unwrap_or_default(),
                ascending: flag("ascending", &q.ascending)?,
            },
        )
        .await?;
    Ok(Json(dto::TwinPage {
        twins: r.twins.iter().map(dto::twin).collect(),
        next_page_token: r.next_page_token,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct HistoryParams {
    /// Sensor path.
    path: Option<String>,
    /// Default "value".
    property: Option<String>,
    /// Start: µs since the epoch or RFC 3339. Default: `to` minus `range`.
    from: Option<String>,
    /// End: µs since the epoch or RFC 3339. Default: now.
    to: Option<String>,
    /// Span before `to` when `from` is not given: 15m, 1h, 24h, ... (default 1h).
    range: Option<String>,
    /// Default 1000, at most 100000; more points are downsampled into buckets.
    max_points: Option<String>,
}

/// Recorded values of a sensor, downsampled to `max_points`.
#[utoipa::path(get, path = "/api/v1/history", params(HistoryParams),
    responses((status = 200, body = dto::HistoryDto), (status = 400, body = ErrorDto), (status = 404, body = ErrorDto)))]
async fn history(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<HistoryParams>, QueryRejection>,
) -> Answer<dto::HistoryDto> {
    let Query(q) = q?;
    let path = q.path.unwrap_or_default();
    if path.trim().is_empty() {
        return Err(HttpError::bad_request("path: name the sensor"));
    }
    let to = time("to", &q.to)?.unwrap_or_else(Timestamp::now);
    let range = q.range.as_deref().filter(|r| !r.trim().is_empty());
    let from = match (time("from", &q.from)?, range) {
        (Some(_), Some(_)) => {
            return Err(HttpError::bad_request(
                "range: give either from or range, not both",
            ));
        }
        (Some(f), None) => f,
        (None, Some(r)) => Timestamp(to.0.saturating_sub(range_us("range", r)?)),
        (None, None) => Timestamp(to.0.saturating_sub(DEFAULT_RANGE_US)),
    };
    let r = s
        .api
        .history(
            &caller,
            pb::GetHistoryRequest {
                path,
                property: q.property.unwrap_or_default(),
                from_us: from.0,
                to_us: to.0,
                max_points: num("max_points", &q.max_points)?.unwrap_or(0),
            },
        )
        .await?;
    Ok(Json(dto::history(&r, from.0, to.0)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct EventParams {
    /// Subtree; empty = everything.
    path: Option<String>,
    /// alarm, quality, state, rejected, lifecycle, connection, write, anomaly, model or
    /// action; empty = any.
    kind: Option<String>,
    /// Only events after this seq (paging: the previous `next_after_seq`).
    after_seq: Option<String>,
    /// Default 100, at most 10000.
    limit: Option<String>,
    /// info, low, medium, high or critical; empty = any.
    min_severity: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct RulesParams {
    /// A machine, or any asset above machines (empty: the plant's root).
    path: Option<String>,
    /// Most rules in the answer (default 1000, at most 10000).
    limit: Option<String>,
}

/// The local action rules of the machines at and below `path`: mode, phase, last firing.
#[utoipa::path(get, path = "/api/v1/rules", params(RulesParams),
    responses((status = 200, body = dto::RulePage), (status = 400, body = ErrorDto), (status = 404, body = ErrorDto)))]
async fn rules(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<RulesParams>, QueryRejection>,
) -> Answer<dto::RulePage> {
    let Query(q) = q?;
    let r = s
        .api
        .list_rules(
            &caller,
            pb::ListRulesRequest {
                path: q.path.unwrap_or_default(),
                limit: num("limit", &q.limit)?.unwrap_or(0),
            },
        )
        .await?;
    Ok(Json(dto::RulePage {
        rules: r.rules.iter().map(dto::rule).collect(),
        truncated: r.truncated,
    }))
}

/// Recorded events of a subtree, oldest first.
#[utoipa::path(get, path = "/api/v1/events", params(EventParams),
    responses((status = 200, body = dto::EventPage), (status = 400, body = ErrorDto), (status = 404, body = ErrorDto)))]
async fn events(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<EventParams>, QueryRejection>,
) -> Answer<dto::EventPage> {
    let Query(q) = q?;
    let min_severity = match q.min_severity.as_deref().map(str::trim) {
        None | Some("") => pb::Severity::Unspecified,
        Some(v) => match ferrotwin_models::Severity::parse(v) {
            Some(sev) => convert::severity(sev),
            None => {
                return Err(HttpError::bad_request(format!(
                    "min_severity: {v:?} is not a severity (info, low, medium, high, critical)"
                )));
            }
        },
    };
    let r = s
        .api
        .list_events_page(
            &caller,
            pb::ListEventsRequest {
                path: q.path.unwrap_or_default(),
                after_seq: num("after_seq", &q.after_seq)?.unwrap_or(0),
                limit: num("limit", &q.limit)?.unwrap_or(0),
                kind: q.kind.unwrap_or_default(),
                min_severity: min_severity as i32,
            },
        )
        .await?;
    Ok(Json(dto::EventPage {
        events: r.events.iter().map(dto::event).collect(),
        next_after_seq: r.next_after_seq,
    }))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct AlarmParams {
    /// Subtree; empty = the whole plant.
    path: Option<String>,
    /// `all` (default: every alarm not normal), `active` (active, acked or not) or
    /// `unacked` (active or returned, not acknowledged).
    state: Option<String>,
    /// Default 1000, at most 10000.
    limit: Option<String>,
}

/// Which alarm states the summary lists.
#[derive(Clone, Copy)]
enum AlarmFilter {
    All,
    Active,
    Unacked,
}

impl AlarmFilter {
    fn keeps(self, s: AlarmState) -> bool {
        match self {
            AlarmFilter::All => s != AlarmState::Normal,
            AlarmFilter::Active => matches!(s, AlarmState::ActiveUnacked | AlarmState::ActiveAcked),
            AlarmFilter::Unacked => {
                matches!(s, AlarmState::ActiveUnacked | AlarmState::ReturnedUnacked)
            }
        }
    }
}

fn severity_rank(s: &str) -> u8 {
    match s {
        "critical" => 4,
        "high" => 3,
        "medium" => 2,
        "low" => 1,
        _ => 0,
    }
}

/// Alarms of a subtree that are not normal, most severe first, then newest first, with
/// counts by severity.
#[utoipa::path(get, path = "/api/v1/alarms", params(AlarmParams),
    responses((status = 200, body = dto::AlarmSummary), (status = 400, body = ErrorDto), (status = 404, body = ErrorDto)))]
async fn alarms(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<AlarmParams>, QueryRejection>,
) -> Answer<dto::AlarmSummary> {
    let Query(q) = q?;
    let filter = match q.state.as_deref().map(str::trim) {
        None | Some("") | Some("all") => AlarmFilter::All,
        Some("active") => AlarmFilter::Active,
        Some("unacked") => AlarmFilter::Unacked,
        Some(v) => {
            return Err(HttpError::bad_request(format!(
                "state: {v:?} is not an alarm filter (active, unacked, all)"
            )));
        }
    };
    let limit = match num::<usize>("limit", &q.limit)? {
        None | Some(0) => DEFAULT_ALARMS,
        Some(n) if n > MAX_ALARMS => {
            return Err(HttpError::bad_request(format!(
                "limit: {n} is above the limit of {MAX_ALARMS}"
            )));
        }
        Some(n) => n,
    };
    let prefix = s
        .api
        .subtree("path", q.path.as_deref().unwrap_or_default())?;
    let api = s.api.clone();
    let caller = caller.clone();
    // A scan of every sensor below: on a blocking thread (the whole plant may be 100,000).
    let mut found = tokio::task::spawn_blocking(move || {
        let (sensors, _) = api.scan(&caller, prefix.as_ref(), usize::MAX, |e| {
            e.level() == Level::Sensor
        });
        let mut found = Vec::new();
        for e in sensors {
            let AssetKind::Sensor { spec, .. } = &e.def.kind else {
                continue;
            };
            let snap = e.snapshot();
            let TwinState::Sensor(st) = &snap.state else {
                continue;
            };
            for (limit, status) in spec.alarms.iter().zip(&st.alarms) {
                if !filter.keeps(status.state) {
                    continue;
                }
                let a = dto::alarm(&convert::alarm(limit, status));
                let value = st.value.map(|v| match v {
                    ferrotwin_models::Value::Float(f) => dto::ValueDto::Float(f),
                    ferrotwin_models::Value::Int(i) => dto::ValueDto::Int(i),
                    ferrotwin_models::Value::Bool(b) => dto::ValueDto::Bool(b),
                });
                let shown = st.value.map(|v| v.to_string()).unwrap_or_default();
                found.push(dto::ActiveAlarmDto {
                    path: e.path().to_string(),
                    message: format!(
                        "{} {}: value {shown} {}, limit {} {}",
                        e.path().name(),
                        a.name,
                        spec.unit,
                        a.limit,
                        spec.unit
                    ),
                    name: a.name,
                    state: a.state,
                    severity: a.severity,
                    since_us: a.since_us,
                    value,
                    unit: spec.unit.clone(),
                });
            }
        }
        found
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("alarm scan failed: {e}")))?;
    found.sort_by(|a, b| {
        severity_rank(&b.severity)
            .cmp(&severity_rank(&a.severity))
            .then(b.since_us.cmp(&a.since_us))
            .then(a.path.cmp(&b.path))
    });
    let mut counts = dto::SeverityCounts::default();
    for a in &found {
        counts.add(&a.severity);
    }
    let truncated = found.len() > limit;
    found.truncate(limit);
    Ok(Json(dto::AlarmSummary {
        alarms: found,
        counts,
        truncated,
    }))
}

/// Acknowledges an alarm of a sensor; answers its new status.
#[utoipa::path(post, path = "/api/v1/alarms/ack", request_body = dto::AckRequest,
    responses((status = 200, body = dto::AlarmDto),
        (status = 400, body = ErrorDto),
        (status = 404, description = "no such asset or alarm", body = ErrorDto),
        (status = 409, description = "the alarm cannot be acknowledged in its state", body = ErrorDto)))]
async fn ack(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    body: Result<Json<dto::AckRequest>, JsonRejection>,
) -> Answer<dto::AlarmDto> {
    let Json(req) = body?;
    let r = s
        .api
        .acknowledge(
            &caller,
            pb::AcknowledgeAlarmRequest {
                path: req.path,
                alarm: req.alarm,
                by: req.by,
                comment: req.comment,
            },
        )
        .await?;
    Ok(Json(dto::alarm(&r.alarm.unwrap_or_default())))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct SearchParams {
    /// Text the path or name contains (case-insensitive).
    q: Option<String>,
    /// Default 20, at most 100.
    limit: Option<String>,
}

/// Assets whose path contains `q`, in path order.
#[utoipa::path(get, path = "/api/v1/search", params(SearchParams),
    responses((status = 200, body = dto::SearchResult), (status = 400, body = ErrorDto)))]
async fn search(
    State(s): State<HttpState>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<SearchParams>, QueryRejection>,
) -> Answer<dto::SearchResult> {
    let Query(q) = q?;
    let text = q.q.unwrap_or_default().trim().to_lowercase();
    if text.is_empty() {
        return Err(HttpError::bad_request("q: give the text to search for"));
    }
    let limit = match num::<usize>("limit", &q.limit)? {
        None | Some(0) => DEFAULT_SEARCH_HITS,
        Some(n) => n.min(MAX_SEARCH_HITS),
    };
    let api = s.api.clone();
    let (hits, truncated) = tokio::task::spawn_blocking(move || {
        // Paths are lowercase slugs already; the text was lowercased above.
        api.scan(&caller, None, limit, |e| e.path().as_str().contains(&text))
    })
    .await
    .map_err(|e| ApiError::Unavailable(format!("search failed: {e}")))?;
    Ok(Json(dto::SearchResult {
        hits: hits
            .iter()
            .map(|e| dto::SearchHit {
                path: e.path().to_string(),
                name: e.path().name().to_string(),
                level: e.level().as_str().to_string(),
            })
            .collect(),
        truncated,
    }))
}

/// 200 with the twin count while the runtime serves.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = dto::Health)))]
async fn healthz(State(s): State<HttpState>) -> Json<dto::Health> {
    Json(dto::Health {
        status: "ok".into(),
        twins: s.api.twin_count(),
        role: s.api.role().to_string(),
    })
}

/// 200 when the runtime takes traffic (it serves only once started: store open, twins
/// restored, roles' tasks running), 503 while it stops.
#[utoipa::path(get, path = "/readyz", responses((status = 200, body = dto::Ready), (status = 503, body = dto::Ready)))]
async fn readyz(State(s): State<HttpState>) -> Response {
    let stopping = s.token.is_cancelled();
    let (connections, connections_up) = s.api.connection_counts();
    let body = dto::Ready {
        ready: !stopping,
        stopping,
        twins: s.api.twin_count(),
        role: s.api.role().to_string(),
        connections,
        connections_up,
    };
    let status = if stopping {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", responses((status = 200, body = String, content_type = "text/plain")))]
async fn metrics(State(s): State<HttpState>, Extension(caller): Extension<Caller>) -> Response {
    if let Err(e) = s
        .api
        .allow_root(&caller, crate::security::Role::Viewer, "metrics")
    {
        return HttpError::from(e).into_response();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.render_metrics(),
    )
        .into_response()
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ferrotwin HTTP API",
        description = "Reads of the live plant (the same as the gRPC TwinService), alarms, live updates (SSE)."
    ),
    paths(
        get_twin,
        browse,
        query,
        history,
        events,
        alarms,
        ack,
        search,
        rules,
        super::live::live,
        healthz,
        readyz,
        metrics
    ),
    components(schemas(
        dto::TwinDto,
        dto::TwinPage,
        dto::EventPage,
        dto::HistoryDto,
        dto::AlarmSummary,
        dto::AlarmDto,
        dto::AckRequest,
        dto::SearchResult,
        dto::RulePage,
        dto::RuleDto,
        dto::ErrorDto,
        dto::Health,
        super::live::SnapshotMsg,
        super::live::ResyncMsg
    ))
)]
struct ApiDoc;

/// The OpenAPI description of this API, generated from the handlers' annotations.
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI description is plain data and serializes")
}

async fn openapi() -> Response {
    static DOC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOC.get_or_init(openapi_json).clone(),
    )
        .into_response()
}

/// The deepest existing asset on the way to `path` (which may be malformed or unknown):
/// tries ever shorter prefixes of its segments. `None` when not even the first one exists.
pub fn nearest_existing(s: &HttpState, path: &str) -> Option<Arc<crate::registry::TwinEntry>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    (1..=segs.len()).rev().find_map(|n| {
        AssetPath::parse(&segs[..n].join("/"))
            .ok()
            .and_then(|p| s.api.find(&p))
    })
}
