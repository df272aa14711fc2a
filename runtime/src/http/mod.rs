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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::api::TwinApi;

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
        } else if path == "/healthz" {
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
        }
    }

    /// Prometheus text: the runtime's counters, then the HTTP server's.
    pub fn render_metrics(&self) -> String {
        let mut s = self.api.render_metrics();
        self.metrics.render(&mut s);
        s
    }
}

async fn count_requests(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let res = next.run(req).await;
    state.metrics.count(&path, res.status().as_u16());
    res
}

/// Every route of the server.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .merge(api::routes())
        .merge(pages::routes())
        .merge(assets::routes())
        .fallback(pages::fallback)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Serves `router(state)` on `listener` until `token` is cancelled, then lets open requests
/// finish for a grace period.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    token: CancellationToken,
) -> Result<(), std::io::Error> {
    let app = router(state);
    let stop = token.clone();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        stop.cancelled().await;
    });
    // Live streams end with the token; a client that stopped reading a big answer would
    // still hold graceful shutdown forever: drop it after the grace period.
    tokio::select! {
        r = server => r,
        _ = async {
            token.cancelled().await;
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } => {
            tracing::warn!("http connections still open {SHUTDOWN_GRACE:?} after shutdown; dropping them");
            Ok(())
        }
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
