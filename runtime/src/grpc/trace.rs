//! One server span per gRPC call, named and attributed by the OpenTelemetry RPC semantic
//! conventions (`{rpc.service}/{rpc.method}`, kind server, `rpc.system = "grpc"`,
//! `rpc.grpc.status_code`), child of the caller's W3C `traceparent` when it sent one.
//!
//! The status is read from the response headers, where a call that fails before its first
//! message puts it (trailers-only); a call that fails later (a stream cut midway) reports it
//! in trailers the span does not see, and shows OK.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{Request, Response};
use tracing::Instrument as _;

use crate::telemetry;

/// Wraps every service of the server in `RpcSpan`.
#[derive(Clone, Copy, Default)]
pub struct RpcSpanLayer;

impl<S> tower::Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan { inner }
    }
}

#[derive(Clone)]
pub struct RpcSpan<S> {
    inner: S,
}

/// The span of one call of `path` (`/package.Service/Method`).
fn rpc_span(path: &str) -> tracing::Span {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or_default();
    let method = parts.next().unwrap_or_default();
    tracing::info_span!(
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = %service,
        rpc.method = %method,
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        error.type = tracing::field::Empty,
    )
}

/// Status codes the semantic conventions count as a server error.
fn server_error(code: i64) -> bool {
    // UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS
    matches!(code, 2 | 4 | 12 | 13 | 14 | 15)
}

impl<S, B, RB> tower::Service<Request<B>> for RpcSpan<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone that was made ready serves this call (tower's rule); a fresh clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !telemetry::tracing_on() {
            return Box::pin(inner.call(req));
        }
        let span = rpc_span(req.uri().path());
        telemetry::set_remote_parent(&span, req.headers());
        let fut = inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let res = fut.await;
            if let Ok(r) = &res {
                let code = r
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                span.record("rpc.grpc.status_code", code);
                if server_error(code) {
                    span.record("otel.status_code", "error");
                    span.record("error.type", code);
                }
            }
            res
        })
    }
}
