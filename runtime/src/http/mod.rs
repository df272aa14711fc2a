//! The HTTP server: the web browser of the live plant (page shells and embedded static files),
//! the JSON API under `/api/v1` (the same reads as gRPC, answered by the same `TwinApi`
//! functions, converted to JSON in `dto`), live updates over Server-Sent Events (`live`, fed
//! by the `WatchHub` as gRPC `Watch` is), `/healthz` and `/metrics`.
//!
//! Nothing here holds state of its own besides counters and the live-stream budget: every
//! answer is read from the registry and the store when asked.

pub mod api;
pub mod assets;
pub mod dto;
pub mod error;
pub mod live;
pub mod pages;
pub mod signin;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use std::net::SocketAddr;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument as _;

use crate::api::TwinApi;
use crate::security::conn::{ConnLimits, Guarded};
use crate::security::tls::{ServerTls, tls_incoming};
use crate::security::{Caller, Credentials};

/// A client must send a request's headers within this (slow senders are cut off).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request body (a larger one is 413).
pub const MAX_BODY_BYTES: usize = 64 << 10;
/// Of a body whose `Content-Length` is over `MAX_BODY_BYTES`, what is read and discarded
/// before the 413, so a client still writing it reads the answer instead of a broken pipe
/// (at most this much, within `DRAIN_TIME`; a larger one gets the 413 and a closed connection).
const DRAIN_BYTES: u64 = 4 << 20;
const DRAIN_TIME: Duration = Duration::from_secs(2);
/// Time a request's whole body has to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that moves no byte either way for this long is closed (keep-alive between
/// requests, a body that stopped coming; live streams send a keep-alive every 15 s).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest request header block.
const MAX_HEADER_BYTES: usize = 16 << 10;
/// The session cookie of the web page: the bearer token, unreadable by scripts.
pub const SESSION_COOKIE: &str = "ft_token";

/// Open live (SSE) streams at most: each holds a watcher queue and a task. Beyond it a new
/// stream gets 503 and the page retries later.
pub const MAX_LIVE_STREAMS: usize = 256;
/// How long a shutdown waits for open connections (live streams end at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Route classes counted in `/metrics` (small fixed set: never a path).
const ROUTE_CLASSES: [&str; 6] = ["api", "live", "page", "static", "health", "metrics"];
/// Status classes counted in `/metrics`.
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Counters of the HTTP server, rendered after the runtime's in `/metrics`.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: [[AtomicU64; STATUS_CLASSES.len()]; ROUTE_CLASSES.len()],
    pub live_streams: AtomicUsize,
    pub live_refused: AtomicU64,
    pub live_resyncs: AtomicU64,
}

impl HttpMetrics {
    fn count(&self, path: &str, status: u16) {
        let route = if path.starts_with("/api/v1/live") {
            1
        } else if path.starts_with("/api/") {
            0
        } else if path.starts_with("/static/") {
            3
        } else if path == "/healthz" || path == "/readyz" {
            4
        } else if path == "/metrics" {
            5
        } else {
            2
        };
        let class = usize::from((status / 100).clamp(1, 5) - 1);
        self.requests[route][class].fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(s, "# TYPE ferrotwin_http_requests_total counter");
        for (route, row) in ROUTE_CLASSES.iter().zip(&self.requests) {
            for (class, c) in STATUS_CLASSES.iter().zip(row) {
                let _ = writeln!(
                    s,
                    "ferrotwin_http_requests_total{{route=\"{route}\",status=\"{class}\"}} {}",
                    c.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(s, "# TYPE ferrotwin_http_live_streams gauge");
        let _ = writeln!(
            s,
            "ferrotwin_http_live_streams {}",
            self.live_streams.load(Ordering::Relaxed)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_http_live_refused_total counter");
        let _ = writeln!(
            s,
            "ferrotwin_http_live_refused_total {}",
            self.live_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(s, "# TYPE ferrotwin_http_live_resyncs_total counter");
        let _ = writeln!(
            s,
            "ferrotwin_http_live_resyncs_total {}",
            self.live_resyncs.load(Ordering::Relaxed)
        );
    }
}

/// What the handlers read: the API shared with gRPC, the live-stream budget and the
/// shutdown token.
#[derive(Clone)]
pub struct HttpState {
    pub(crate) api: TwinApi,
    pub(crate) metrics: Arc<HttpMetrics>,
    pub(crate) live_slots: Arc<Semaphore>,
    pub(crate) token: CancellationToken,
    /// Served over TLS (cookies are `Secure`, HSTS is sent).
    pub(crate) tls: bool,
}

impl HttpState {
    /// `api` is the runtime's `TwinApi` (`Runtime::api`, with its replication parts, so
    /// mirrors carry their age); `token` ends live streams at shutdown.
    pub fn new(api: TwinApi, token: CancellationToken) -> HttpState {
        HttpState {
            api,
            metrics: Arc::new(HttpMetrics::default()),
            live_slots: Arc::new(Semaphore::new(MAX_LIVE_STREAMS)),
            token,
            tls: false,
        }
    }

    /// Counting into `metrics` (shared by a runtime's HTTP listeners) instead of its own.
    pub fn with_metrics(mut self, metrics: Arc<HttpMetrics>) -> HttpState {
        self.metrics = metrics;
        self
    }

    /// Prometheus text: the runtime's counters, then the HTTP server's.
    pub fn render_metrics(&self) -> String {
        let mut s = self.api.render_metrics();
        self.metrics.render(&mut s);
        s
    }
}

/// A server span per request (OpenTelemetry HTTP conventions: `{method} {http.route}`),
/// child of the client's W3C `traceparent` when it sent one.
async fn trace_request(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    if !crate::telemetry::tracing_on() {
        return next.run(req).await;
    }
    // A method outside HTTP's own is `_OTHER` (span names never come from client input).
    let method = match *req.method() {
        axum::http::Method::GET
        | axum::http::Method::HEAD
        | axum::http::Method::POST
        | axum::http::Method::PUT
        | axum::http::Method::DELETE
        | axum::http::Method::CONNECT
        | axum::http::Method::OPTIONS
        | axum::http::Method::TRACE
        | axum::http::Method::PATCH => req.method().as_str(),
        _ => "_OTHER",
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_owned());
    let span = tracing::info_span!(
        "http",
        otel.name = %match &route {
            Some(r) => format!("{method} {r}"),
            None => method.to_owned(),
        },
        otel.kind = "server",
        http.request.method = %method,
        http.route = route.as_deref(),
        url.path = %req.uri().path(),
        url.scheme = if state.tls { "https" } else { "http" },
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    );
    crate::telemetry::set_remote_parent(&span, req.headers());
    let res = next.run(req).instrument(span.clone()).await;
    let status = res.status().as_u16();
    span.record("http.response.status_code", i64::from(status));
    if status >= 500 {
        span.record("otel.status_code", "error");
        span.record("error.type", status);
    }
    // The span lasts until the body is sent (a live stream's, until the stream ends).
    res.map(|inner| {
        axum::body::Body::new(SpanUntilEnd {
            inner,
            span: Some(span),
        })
    })
}

/// A response body holding its request's span until the body ends or is dropped
/// (`telemetry::end_now`).
struct SpanUntilEnd<B> {
    inner: B,
    span: Option<tracing::Span>,
}

impl<B> SpanUntilEnd<B> {
    fn end(&mut self) {
        if let Some(span) = self.span.take() {
            crate::telemetry::end_now(span);
        }
    }
}

impl<B> Drop for SpanUntilEnd<B> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for SpanUntilEnd<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None | Some(Err(_)))) {
            this.end();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Answers 413 to a body its `Content-Length` declares too large, after draining it (bounded
/// by `DRAIN_BYTES` and `DRAIN_TIME`). A body without a length that grows too large is
/// refused by `DefaultBodyLimit` where a handler reads it.
async fn refuse_oversized(req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n > MAX_BODY_BYTES as u64);
    let Some(n) = declared else {
        return next.run(req).await;
    };
    let mut close = n > DRAIN_BYTES;
    if !close {
        use tokio_stream::StreamExt as _;
        let mut body = req.into_body().into_data_stream();
        let drained = tokio::time::timeout(DRAIN_TIME, async {
            while let Some(chunk) = body.next().await {
                if chunk.is_err() {
                    return false;
                }
            }
            true
        })
        .await;
        close = !matches!(drained, Ok(true));
    }
    let mut res = error::HttpError {
        status: axum::http::StatusCode::PAYLOAD_TOO_LARGE,
        body: dto::ErrorDto {
            error: format!(
                "body: {n} bytes, more than the {MAX_BODY_BYTES} bytes a request may carry"
            ),
            nearest_parent: None,
            position: None,
        },
    }
    .into_response();
    if close {
        res.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    res
}

async fn count_requests(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let res = next.run(req).await;
    state.metrics.count(&path, res.status().as_u16());
    res
}

/// What a connection shows of its client: the address and, over TLS, the verified
/// client certificate (DER).
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    pub cert: Option<Arc<Vec<u8>>>,
}

/// Routes anyone may reach: health, static files, the sign-in page and the API description.
fn is_public(path: &str) -> bool {
    path == "/healthz"
        || path == "/readyz"
        || path.starts_with("/static/")
        || path == "/signin"
        || path == "/signout"
        || path == "/api/v1/openapi.json"
}

/// The session token of a `Cookie` header.
fn session_cookie(req: &Request) -> Option<&str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            (k == SESSION_COOKIE && !v.is_empty()).then_some(v)
        })
}

/// Authenticates every request (bearer header, session cookie or client certificate) and
/// hands the handlers a `Caller`. Unauthenticated: 401 JSON under `/api/` and `/metrics`,
/// the sign-in page elsewhere; public routes pass without a caller.
async fn authenticate(State(state): State<HttpState>, mut req: Request, next: Next) -> Response {
    let peer = req.extensions().get::<Peer>().cloned();
    let addr = peer.as_ref().map(|p| p.addr);
    let path = req.uri().path();
    if !state.api.secured() {
        req.extensions_mut().insert(Caller::open(addr));
        return next.run(req).await;
    }
    // Public routes are served without looking at credentials (a stale session cookie on a
    // static file must not count as a failed sign-in); `/signin` checks its own form.
    if is_public(path) {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::security::bearer_of)
        .or_else(|| session_cookie(&req));
    let creds = Credentials {
        bearer,
        peer_cert: peer
            .as_ref()
            .and_then(|p| p.cert.as_deref().map(Vec::as_slice)),
        addr,
    };
    match state.api.authenticate(creds) {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(e) => {
            if path.starts_with("/api/") || path == "/metrics" {
                let mut r = error::HttpError::from(e).into_response();
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"ferrotwin\""),
                );
                r
            } else {
                signin::redirect_to_signin(req.uri())
            }
        }
    }
}

/// Headers on every answer: no inline script or style, no framing, no sniffing, no referrer;
/// over TLS, HSTS.
async fn security_headers(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if state.tls {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    res
}

/// Every route of the server.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(pages::routes())
        .merge(assets::routes())
        .merge(signin::routes())
        .fallback(pages::fallback)
        // The largest legitimate body is an acknowledgment's JSON with its comment.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(refuse_oversized))
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            security_headers,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), trace_request))
        .with_state(state)
}

/// Serves `router(state)` on `listener` (over TLS with `tls`) until `token` is cancelled,
/// then lets open requests finish for a grace period. Each connection is served by hyper
/// with a header deadline; a TLS handshake has its own (`security::tls`).
pub async fn serve(
    listener: TcpListener,
    mut state: HttpState,
    token: CancellationToken,
    tls: Option<Arc<ServerTls>>,
    limits: Arc<ConnLimits>,
) -> Result<(), std::io::Error> {
    state.tls = tls.is_some();
    let app = router(state);
    let conns = TaskTracker::new();
    match tls {
        Some(tls) => {
            tls.spawn_reload(token.clone());
            let mut incoming =
                tls_incoming(listener, tls, token.clone(), limits, 0, Some(IDLE_TIMEOUT));
            loop {
                let s = tokio::select! {
                    () = token.cancelled() => break,
                    s = incoming.recv() => match s { Some(Ok(s)) => s, _ => break },
                };
                let (tcp, session) = s.get_ref().get_ref();
                let Ok(addr) = tcp.peer_addr() else { continue };
                let cert = session
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| Arc::new(c.as_ref().to_vec()));
                conns.spawn(serve_conn(
                    s,
                    Peer { addr, cert },
                    app.clone(),
                    token.clone(),
                ));
            }
        }
        None => loop {
            let (tcp, addr) = tokio::select! {
                () = token.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "http accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let permit = match limits.admit(addr.ip()) {
                Ok(p) => p,
                Err(why) => {
                    // A clear refusal, never waited for: the socket is new and empty.
                    let body = format!("too many connections: {why}\n");
                    let _ = tcp.try_write(
                        format!(
                            "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\nretry-after: 5\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    );
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            conns.spawn(serve_conn(
                Guarded::new(tcp, permit, 0, Some(IDLE_TIMEOUT)),
                Peer { addr, cert: None },
                app.clone(),
                token.clone(),
            ));
        },
    }
    conns.close();
    // Live streams end with the token; a client that stopped reading a big answer would
    // still hold graceful shutdown forever: drop it after the grace period.
    if tokio::time::timeout(SHUTDOWN_GRACE, conns.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            "http connections still open {SHUTDOWN_GRACE:?} after shutdown; dropping them"
        );
    }
    Ok(())
}

/// One HTTP/1.1 connection: requests go to `app` with the `Peer` in their extensions.
async fn serve_conn<I>(mut io: Guarded<I>, peer: Peer, app: Router, token: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt as _;
    // Requests in progress: the idle limit does not cut a slow answer.
    let busy = Arc::new(AtomicUsize::new(0));
    io.set_busy(busy.clone());
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let answer = app
            .clone()
            .oneshot(req.map(|b| axum::body::Body::new(BodyDeadline::new(b, BODY_TIMEOUT))));
        let busy = Busy::new(busy.clone());
        async move {
            let r = answer.await;
            drop(busy);
            r
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES.max(8192));
    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        () = token.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// One request in progress on a connection, counted while it lives.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn new(count: Arc<AtomicUsize>) -> Busy {
        count.fetch_add(1, Ordering::AcqRel);
        Busy(count)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request body that must arrive whole within its deadline (from the request's start):
/// a client that announces a body and stops sending gets a 400 naming the timeout, not a
/// request held open.
struct BodyDeadline<B> {
    inner: B,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
}

impl<B> BodyDeadline<B> {
    fn new(inner: B, timeout: Duration) -> BodyDeadline<B> {
        BodyDeadline {
            inner,
            deadline: Box::pin(tokio::time::sleep(timeout)),
            timeout,
        }
    }
}

impl<B> axum::body::HttpBody for BodyDeadline<B>
where
    B: axum::body::HttpBody<Data = axum::body::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = axum::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future as _;
        use std::task::Poll;
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(r) => Poll::Ready(r.map(|f| f.map_err(Into::into))),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                    "the request body did not arrive within {:?}",
                    this.timeout
                )
                .into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// HTML-escapes `s` for text and double-quoted attribute values: everything that comes from
/// a plant spec, a PLC or a URL goes through here before it reaches a page.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::escape_html;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            escape_html(r#"<script>alert("x" & 'y')</script>"#),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
        assert_eq!(escape_html("acme/berlin"), "acme/berlin");
    }
}
