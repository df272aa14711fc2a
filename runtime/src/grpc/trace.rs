//! Every gRPC call counted by service and status (`ferrotwin_grpc_calls_total`), and, with
//! tracing on, one server span per call, named and attributed by the OpenTelemetry RPC semantic
//! conventions (`{rpc.service}/{rpc.method}`, kind server, `rpc.system = "grpc"`,
//! `rpc.grpc.status_code`), child of the caller's W3C `traceparent` when it sent one.
//!
//! The span lasts as long as the call: it ends with the response body, so a stream's span
//! covers the stream. The status is read from the response headers, where a call that fails
//! before its first message puts it (trailers-only), or else from the trailers at the end of
//! the body (a stream cut midway with an error). A body dropped before its end (the client
//! went away) records `CANCELLED`; so does tonic for a call whose `grpc-timeout` ran out,
//! which is counted as `DEADLINE_EXCEEDED`, as gRPC names it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

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

/// When a call whose request carries `grpc-timeout` (gRPC over HTTP/2: at most 8 digits and
/// a unit, `H` `M` `S` `m` `u` `n`) runs out; `None` without one, or with a malformed one.
fn deadline_of(h: &HeaderMap, from: Instant) -> Option<Instant> {
    let v = h.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let d = match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    from.checked_add(d)
}

/// A call in progress: where its status goes once known. Dropped before that (the client
/// reset the stream, the server stopped), it counts as CANCELLED; past its deadline, as
/// DEADLINE_EXCEEDED.
struct Call {
    metrics: Arc<Metrics>,
    service: usize,
    /// With tracing on; `None` too once finished.
    span: Option<tracing::Span>,
    finished: bool,
    /// From the request's `grpc-timeout`.
    deadline: Option<Instant>,
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
        // Cancelled at or past the caller's deadline (tonic's own timeout says CANCELLED):
        // the deadline is what ended it.
        let code = if code == 1 && self.deadline.is_some_and(|d| Instant::now() >= d) {
            4
        } else {
            code
        };
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
        let deadline = deadline_of(req.headers(), Instant::now());
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
            deadline,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_timeout_gives_the_deadline_and_a_call_cancelled_past_it_counts_as_deadline_exceeded()
    {
        let now = Instant::now();
        let header = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", v.parse().expect("a header value"));
            h
        };
        assert_eq!(
            deadline_of(&header("250m"), now),
            Some(now + Duration::from_millis(250))
        );
        assert_eq!(
            deadline_of(&header("2S"), now),
            Some(now + Duration::from_secs(2))
        );
        assert_eq!(
            deadline_of(&header("1H"), now),
            Some(now + Duration::from_secs(3600))
        );
        for bad in ["", "m", "123456789m", "10x", "-5S", "1.5S"] {
            assert_eq!(deadline_of(&header(bad), now), None, "{bad:?}");
        }
        assert_eq!(deadline_of(&HeaderMap::new(), now), None);

        let metrics = Arc::new(Metrics::default());
        let count =
            |code: usize| metrics.grpc_calls[0][code].load(std::sync::atomic::Ordering::Relaxed);
        let call = |deadline| Call {
            metrics: metrics.clone(),
            service: 0,
            span: None,
            finished: false,
            deadline,
        };
        // Dropped past its deadline: DEADLINE_EXCEEDED; before it, or without one: CANCELLED.
        drop(call(Some(now)));
        drop(call(Some(Instant::now() + Duration::from_secs(60))));
        drop(call(None));
        assert_eq!((count(4), count(1)), (1, 2));
        // tonic's own timeout answers CANCELLED: past the deadline it is the deadline.
        call(Some(now)).finish(1);
        assert_eq!(count(4), 2);
        // Another status stays as it is.
        call(Some(now)).finish(0);
        assert_eq!(count(0), 1);
    }
}
