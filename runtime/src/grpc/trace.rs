//! Every gRPC call counted by service and status (`ferrotwin_grpc_calls_total`), and, with
//! tracing on, one server span per call, named and attributed by the OpenTelemetry RPC semantic
//! conventions (`{rpc.service}/{rpc.method}`, kind server, `rpc.system = "grpc"`,
//! `rpc.grpc.status_code`), child of the caller's W3C `traceparent` when it sent one.
//!
//! The span lasts as long as the call: it ends with the response body, so a stream's span
//! covers the stream. The status is read from the response headers, where a call that fails
//! before its first message puts it (trailers-only), or else from the trailers at the end of
//! the body (a stream cut midway with an error). A body dropped before its end (the client
//! went away) records `CANCELLED`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{HeaderMap, Request, Response};
use hyper::body::{Body, Frame, SizeHint};
use tokio_util::either::Either;
use tracing::Instrument as _;

use crate::core::Metrics;
use crate::core::metrics::{GRPC_SERVICES, grpc_service_index};
use crate::telemetry;

/// Wraps every service of the server in `RpcSpan`, counting into `Metrics::grpc_calls`.
#[derive(Clone)]
pub struct RpcSpanLayer(pub Arc<Metrics>);

impl<S> tower::Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> RpcSpan<S> {
        RpcSpan {
            inner,
            metrics: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcSpan<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The span of one call of `path` (`/package.Service/Method`). A service this server does
/// not have is named `_OTHER` (span names come from a fixed set, never from client input).
fn rpc_span(path: &str, service_index: usize) -> tracing::Span {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = if service_index < GRPC_SERVICES.len() - 1 {
        (
            parts.next().unwrap_or_default(),
            parts
                .next()
                .filter(|m| m.len() <= 64 && m.bytes().all(|b| b.is_ascii_alphanumeric()))
                .unwrap_or("_OTHER"),
        )
    } else {
        ("_OTHER", "_OTHER")
    };
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

/// The status a response's headers or trailers carry, if any.
fn grpc_status(h: &HeaderMap) -> Option<i64> {
    h.get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i64>().ok())
}

/// A call in progress: where its status goes once known. Dropped before that (the client
/// reset the stream, a `grpc-timeout` ran out, the server stopped), it counts as CANCELLED.
struct Call {
    metrics: Arc<Metrics>,
    service: usize,
    /// With tracing on; `None` too once finished.
    span: Option<tracing::Span>,
    finished: bool,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.finish(1);
    }
}

impl Call {
    /// Counts the call and records its status on its span (once).
    fn finish(&mut self, code: i64) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        self.metrics.count_grpc_call(self.service, code);
        if let Some(span) = self.span.take() {
            span.record("rpc.grpc.status_code", code);
            if server_error(code) {
                span.record("otel.status_code", "error");
                span.record("error.type", code);
            }
            // At the body's end (the handler may have returned long before).
            telemetry::end_now(span);
        }
    }
}

/// A response body that holds its call until the body ends (the span stays open as long),
/// and takes the status its trailers carry. Dropped before its end (the client went away),
/// its call counts as CANCELLED.
pub struct TracedBody<RB> {
    inner: RB,
    /// `None` once the status is known.
    call: Option<Call>,
}

impl<RB> TracedBody<RB> {
    fn finish(&mut self, code: i64) {
        if let Some(mut call) = self.call.take() {
            call.finish(code);
        }
    }
}

impl<RB> Body for TracedBody<RB>
where
    RB: Body + Unpin,
{
    type Data = RB::Data;
    type Error = RB::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.call.is_some() {
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                        this.finish(code);
                    }
                }
                // The body failed: the client sees a reset, not a status.
                Poll::Ready(Some(Err(_))) => this.finish(2),
                // Ended without trailers: nothing says otherwise.
                Poll::Ready(None) => this.finish(0),
                Poll::Pending => {}
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B, RB> tower::Service<Request<B>> for RpcSpan<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    RB: Body + Unpin,
{
    type Response = Response<TracedBody<RB>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // The clone that was made ready serves this call (tower's rule); a fresh clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let service = grpc_service_index(req.uri().path());
        let span = telemetry::tracing_on().then(|| {
            let span = rpc_span(req.uri().path(), service);
            telemetry::set_remote_parent(&span, req.headers());
            span
        });
        let fut = match &span {
            Some(span) => Either::Left(inner.call(req).instrument(span.clone())),
            None => Either::Right(inner.call(req)),
        };
        // Made before the handler runs: a call dropped while it waits still counts.
        let mut call = Call {
            metrics: self.metrics.clone(),
            service,
            span,
            finished: false,
        };
        Box::pin(async move {
            let res = match fut.await {
                Ok(res) => res,
                Err(e) => {
                    // The service failed outside gRPC (the connection answers with a reset).
                    call.finish(2);
                    return Err(e);
                }
            };
            // Trailers-only: the status is in the headers and the body carries nothing more.
            let call = match grpc_status(res.headers()) {
                Some(code) => {
                    call.finish(code);
                    None
                }
                None => Some(call),
            };
            Ok(res.map(|inner| TracedBody { inner, call }))
        })
    }
}
