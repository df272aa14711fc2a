//! OpenTelemetry: traces and metrics exported over OTLP/gRPC, W3C trace context in and out.
//!
//! Off, and free, unless an OTLP endpoint is configured: `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! the per-signal `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._METRICS_ENDPOINT`) or the config
//! file's `[telemetry] otlp_endpoint`. The standard variables win over the file:
//! `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` (+ `_ARG`),
//! `OTEL_METRIC_EXPORT_INTERVAL`, `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_TRACES_EXPORTER=none`,
//! `OTEL_METRICS_EXPORTER=none` and `OTEL_SDK_DISABLED=true` behave as the specification says.
//!
//! Spans are `tracing` spans; the `tracing-opentelemetry` layer (`Telemetry::layer`) turns
//! them into OpenTelemetry spans. Integer fields are given as `i64`: the layer records an
//! unsigned field as its debug text, and the conventions want numbers. Incoming W3C `traceparent`s become their parents
//! (`set_remote_parent`); outgoing ones are `traceparent_of` (the replication batch carries
//! one). Metrics: every family of the `/metrics` page (`METRIC_FAMILIES`, the written
//! contract) is also an observable OpenTelemetry instrument, read from that page's samples at
//! each export (`register_metrics`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::{Resource, metrics::SdkMeterProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Whether spans are exported (a tracing layer is installed); cheap to ask on hot paths.
static TRACING_ON: AtomicBool = AtomicBool::new(false);

/// Whether an OpenTelemetry layer takes spans (set by `Telemetry::layer` and by tests that
/// install their own). Hot paths (ingest batches) make spans only then.
pub fn tracing_on() -> bool {
    TRACING_ON.load(Ordering::Relaxed)
}

static METRICS_ON: AtomicBool = AtomicBool::new(false);

/// Whether metrics are exported over OTLP (a runtime then registers its instruments).
pub fn metrics_on() -> bool {
    METRICS_ON.load(Ordering::Relaxed)
}

/// Tells hot paths that spans are taken (tests install their own layer and say so).
pub fn set_tracing_on(on: bool) {
    TRACING_ON.store(on, Ordering::Relaxed);
}

/// `[telemetry]` of the config file. Every field is overridden by its `OTEL_*` variable.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// OTLP/gRPC endpoint of a collector (`http://collector:4317`); none: no export.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the resource (default `ferrotwin`).
    #[serde(default)]
    pub service_name: Option<String>,
    /// Share of new traces kept (0..=1; a caller's sampled `traceparent` is always followed).
    #[serde(default)]
    pub sample_ratio: Option<f64>,
    /// Most ingest batch spans per second (0: none). Default `DEFAULT_INGEST_SPANS_PER_S`.
    #[serde(default)]
    pub ingest_spans_per_s: Option<u32>,
}

/// Default cap on ingest batch spans per second: a trace of ingest at any load, never one
/// span per reading.
pub const DEFAULT_INGEST_SPANS_PER_S: u32 = 10;

impl TelemetryConfig {
    /// What a config file can get wrong: the ratio's range, the endpoint's form.
    pub fn validate(&self) -> Result<(), TelemetryError> {
        if let Some(r) = self.sample_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(TelemetryError::BadRatio(r));
        }
        if let Some(e) = &self.otlp_endpoint {
            let ok = (e.starts_with("http://") || e.starts_with("https://"))
                && e.parse::<axum::http::Uri>()
                    .is_ok_and(|u| u.host().is_some_and(|h| !h.is_empty()));
            if !ok {
                return Err(TelemetryError::BadEndpoint(e.clone()));
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("telemetry: sample_ratio {0} is not between 0 and 1")]
    BadRatio(f64),
    #[error(
        "telemetry: otlp_endpoint {:?} is not an http:// or https:// address (e.g. http://collector:4317)",
        redact_userinfo(.0)
    )]
    BadEndpoint(String),
    #[error("telemetry: OTEL_EXPORTER_OTLP_CERTIFICATE {path}: {message}")]
    Certificate { path: String, message: String },
    #[error("telemetry: OTLP {signal} exporter: {message}")]
    Exporter {
        signal: &'static str,
        message: String,
    },
}

/// The exporters of one process; `shutdown` flushes them (the clean stop calls it last).
pub struct Telemetry {
    traces: Option<SdkTracerProvider>,
    metrics: Option<SdkMeterProvider>,
    ingest_spans_per_s: u32,
}

/// `endpoint` without the user and password it may carry (`https://user:key@host`).
fn redact_userinfo(endpoint: &str) -> String {
    match (endpoint.find("://"), endpoint.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &endpoint[..scheme], &endpoint[at + 1..])
        }
        _ => endpoint.to_owned(),
    }
}

/// The TLS of an `https://` collector: the system's roots, and the CA file
/// `OTEL_EXPORTER_OTLP_CERTIFICATE` names (a private collector's CA).
fn collector_tls() -> Result<tonic::transport::ClientTlsConfig, TelemetryError> {
    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
    if let Some(path) = env("OTEL_EXPORTER_OTLP_CERTIFICATE") {
        let pem = std::fs::read(&path).map_err(|e| TelemetryError::Certificate {
            path: path.clone(),
            message: e.to_string(),
        })?;
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
    }
    Ok(tls)
}

/// An exporter builder pointed at its collector: the file's endpoint where no variable names
/// one (the exporter prefers what it is given over the variables), TLS for `https://`.
fn to_collector<B>(
    mut b: B,
    signal_var: &str,
    config: &TelemetryConfig,
) -> Result<B, TelemetryError>
where
    B: opentelemetry_otlp::WithExportConfig + opentelemetry_otlp::WithTonicConfig,
{
    if env(signal_var).is_none()
        && env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
        && let Some(e) = &config.otlp_endpoint
    {
        b = b.with_endpoint(e.clone());
    }
    if uses_https(signal_var, config.otlp_endpoint.as_deref()) {
        b = b.with_tls_config(collector_tls()?);
    }
    Ok(b)
}

/// Whether the endpoint an exporter will use (its signal's variable, the shared one, or the
/// file's) is `https://`.
fn uses_https(signal_var: &str, file: Option<&str>) -> bool {
    env(signal_var)
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
        .or_else(|| file.map(str::to_owned))
        .is_some_and(|e| e.trim().to_ascii_lowercase().starts_with("https://"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn env_is(name: &str, value: &str) -> bool {
    env(name).is_some_and(|v| v.trim().eq_ignore_ascii_case(value))
}

impl Telemetry {
    /// No export (the default of every command but `run` and `demo`, and of tests).
    pub fn off() -> Telemetry {
        Telemetry {
            traces: None,
            metrics: None,
            ingest_spans_per_s: 0,
        }
    }

    /// Builds the OTLP exporters the environment and `config` ask for; must run inside a
    /// tokio runtime (the gRPC channel's worker is a tokio task). Nothing is connected here:
    /// a collector that is down costs dropped exports, counted by the SDK, never a start.
    pub fn from_env(config: &TelemetryConfig) -> Result<Telemetry, TelemetryError> {
        config.validate()?;
        // A signal exports when an endpoint is named for it: its own variable, the shared one
        // or the file's (only `..._TRACES_ENDPOINT` set: no metrics to a default localhost).
        let named = |signal_var: &str| {
            env(signal_var).is_some()
                || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
                || config.otlp_endpoint.is_some()
        };
        let configured = named("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            || named("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT");
        if !configured || env_is("OTEL_SDK_DISABLED", "true") {
            return Ok(Telemetry::off());
        }
        let resource = {
            let mut b = Resource::builder();
            if env("OTEL_SERVICE_NAME").is_none() {
                b = b.with_service_name(
                    config
                        .service_name
                        .clone()
                        .unwrap_or_else(|| "ferrotwin".into()),
                );
            }
            b.with_attribute(KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION").to_string(),
            ))
            .build()
        };
        let traces = if env_is("OTEL_TRACES_EXPORTER", "none")
            || !named("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        {
            None
        } else {
            let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
            let b = to_collector(b, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", config)?;
            let exporter = b.build().map_err(|e| TelemetryError::Exporter {
                signal: "traces",
                message: e.to_string(),
            })?;
            let mut p = SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(resource.clone());
            if env("OTEL_TRACES_SAMPLER").is_none()
                && let Some(r) = config.sample_ratio
            {
                p = p.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                    r,
                ))));
            }
            let p = p.build();
            opentelemetry::global::set_tracer_provider(p.clone());
            Some(p)
        };
        let metrics = if env_is("OTEL_METRICS_EXPORTER", "none")
            || !named("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT")
        {
            None
        } else {
            let b = opentelemetry_otlp::MetricExporter::builder().with_tonic();
            let b = to_collector(b, "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", config)?;
            let exporter = b.build().map_err(|e| TelemetryError::Exporter {
                signal: "metrics",
                message: e.to_string(),
            })?;
            let p = SdkMeterProvider::builder()
                .with_periodic_exporter(exporter)
                .with_resource(resource)
                .build();
            opentelemetry::global::set_meter_provider(p.clone());
            METRICS_ON.store(true, Ordering::Relaxed);
            Some(p)
        };
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        Ok(Telemetry {
            traces,
            metrics,
            ingest_spans_per_s: config
                .ingest_spans_per_s
                .unwrap_or(DEFAULT_INGEST_SPANS_PER_S),
        })
    }

    /// Whether anything is exported.
    pub fn is_on(&self) -> bool {
        self.traces.is_some() || self.metrics.is_some()
    }

    /// `layer` with a switch: spans are exported only while `on` holds (a benchmark compares
    /// export on and off in one process; a filtered layer cannot be swapped in later).
    pub fn layer_switched<S>(
        &self,
        on: Arc<AtomicBool>,
    ) -> Option<impl tracing_subscriber::Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        use tracing_subscriber::filter::FilterExt as _;
        let provider = self.traces.as_ref()?;
        set_ingest_spans_per_s(self.ingest_spans_per_s);
        // Dynamic: a plain `filter_fn`'s answer is cached per callsite at its first use.
        let switch =
            tracing_subscriber::filter::dynamic_filter_fn(move |_, _| on.load(Ordering::Relaxed));
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("ferrotwin"))
                .with_threads(false)
                .with_location(false)
                .with_filter(export_filter().and(switch)),
        )
    }

    /// The tracing layer that exports spans (none when traces are off): our crates' spans
    /// at info and above, and the events inside them. Nothing of other crates: their debug
    /// and trace events (h2 and hyper log every frame) would cost each call hundreds of µs.
    /// Installing it tells the hot paths (`tracing_on`).
    pub fn layer<S>(&self) -> Option<impl tracing_subscriber::Layer<S> + use<S>>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::Layer as _;
        let provider = self.traces.as_ref()?;
        set_tracing_on(true);
        set_ingest_spans_per_s(self.ingest_spans_per_s);
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("ferrotwin"))
                .with_threads(false)
                .with_location(false)
                .with_filter(export_filter()),
        )
    }

    /// Flushes and stops the exporters (bounded by the SDK's export timeout).
    pub fn shutdown(self) {
        set_tracing_on(false);
        METRICS_ON.store(false, Ordering::Relaxed);
        if let Some(t) = self.traces {
            let _ = t.shutdown();
        }
        if let Some(m) = self.metrics {
            let _ = m.shutdown();
        }
    }
}

/// What the span export takes: our crates at info and above.
pub fn export_filter() -> tracing_subscriber::filter::Targets {
    tracing_subscriber::filter::Targets::new()
        .with_target("ferrotwin_runtime", tracing::Level::INFO)
        .with_target("ferrotwin_adapters", tracing::Level::INFO)
        .with_target("ferrotwin_cli", tracing::Level::INFO)
}

struct HeaderExtractor<'a>(&'a axum::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(axum::http::HeaderName::as_str).collect()
    }
}

struct OneHeader<'a>(&'a str);

impl Extractor for OneHeader<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[derive(Default)]
struct TraceparentOut(Option<String>);

impl Injector for TraceparentOut {
    fn set(&mut self, key: &str, value: String) {
        if key == "traceparent" {
            self.0 = Some(value);
        }
    }
}

/// Ends `span` now, however long ago its work last entered it: the export takes a span's
/// end time from its last exit, so a span held until a response body ends (a server span
/// whose handler returned at the first message of a stream) is entered once more here.
pub fn end_now(span: tracing::Span) {
    span.in_scope(|| {});
}

/// Makes the W3C `traceparent` (and `tracestate`) of `headers` the parent of `span`, when
/// there is a valid one. A malformed header is ignored (the span starts its own trace).
pub fn set_remote_parent(span: &tracing::Span, headers: &axum::http::HeaderMap) {
    if !tracing_on() || !headers.contains_key("traceparent") {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Makes the W3C `traceparent` string the parent of `span` (a replication batch's).
pub fn set_parent_traceparent(span: &tracing::Span, traceparent: &str) {
    if !tracing_on() || traceparent.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&OneHeader(traceparent));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The W3C `traceparent` of `span` (empty when spans are not exported or it is not sampled).
pub fn traceparent_of(span: &tracing::Span) -> String {
    if !tracing_on() {
        return String::new();
    }
    let cx: Context = span.context();
    let mut out = TraceparentOut::default();
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0.unwrap_or_default()
}

/// Trace and span id (hex) of `span`, for log lines; none outside any exported trace.
pub fn ids_of(span: &tracing::Span) -> Option<(String, String)> {
    if !tracing_on() || span.is_none() {
        return None;
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid()
        .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
}

/// An anomaly episode as one span from its start to its end (spans with times of their own
/// are built with the OpenTelemetry API: a `tracing` span starts when it is made). Recorded
/// when the episode ends, on `tracer` (the global provider's when `tracing_on`).
pub fn record_episode<T: opentelemetry::trace::Tracer>(
    tracer: &T,
    asset: &str,
    detector: &str,
    peak: f64,
    started: std::time::SystemTime,
    ended: std::time::SystemTime,
) {
    use opentelemetry::trace::{Span as _, SpanKind};
    let mut span = tracer
        .span_builder("anomaly.episode")
        .with_kind(SpanKind::Internal)
        .with_start_time(started)
        .with_attributes([
            KeyValue::new("ferrotwin.asset", asset.to_owned()),
            KeyValue::new("ferrotwin.detector", detector.to_owned()),
            KeyValue::new("ferrotwin.peak_score", peak),
        ])
        .start(tracer);
    span.end_with_timestamp(ended);
}

static INGEST_SPANS_PER_S: AtomicU64 = AtomicU64::new(DEFAULT_INGEST_SPANS_PER_S as u64);

fn set_ingest_spans_per_s(n: u32) {
    INGEST_SPANS_PER_S.store(u64::from(n), Ordering::Relaxed);
}

/// Admits at most `INGEST_SPANS_PER_S` batch spans per second across the process: ingest is
/// never traced per reading, and at any rate a trace shows what one batch costs.
pub struct SpanBudget {
    window: Mutex<(Instant, u64)>,
}

impl Default for SpanBudget {
    fn default() -> Self {
        SpanBudget {
            window: Mutex::new((Instant::now(), 0)),
        }
    }
}

impl SpanBudget {
    /// Whether one more span fits this second's budget (always false when spans are off).
    pub fn admit(&self) -> bool {
        if !tracing_on() {
            return false;
        }
        let cap = INGEST_SPANS_PER_S.load(Ordering::Relaxed);
        let Ok(mut w) = self.window.try_lock() else {
            return false;
        };
        let now = Instant::now();
        if now.duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 < cap {
            w.1 += 1;
            true
        } else {
            false
        }
    }
}

/// How an instrument of a family is read: what its Prometheus samples mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FamilyKind {
    /// Monotonic; Prometheus name ends in `_total`.
    Counter,
    Gauge,
}

/// What a family says about input that was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// Not a discard family.
    No,
    /// Discarded by design (a policy, a limit doing its job): labelled `reason`/`outcome`.
    Intentional,
    /// Discarded because something is wrong (bad input, a fault): labelled `reason`/`outcome`.
    Fault,
}

/// One metric family of the written contract (ARCHITECTURE.md "Metrics"): its Prometheus
/// name, kind, unit (UCUM, as OpenTelemetry wants it), the component that keeps it, its
/// labels, whether it counts discards, and what it counts.
#[derive(Debug, Clone, Copy)]
pub struct MetricFamily {
    pub name: &'static str,
    pub kind: FamilyKind,
    pub unit: &'static str,
    pub component: &'static str,
    pub labels: &'static [&'static str],
    pub discard: Discard,
    pub help: &'static str,
}

/// Parsed samples of the `/metrics` page: family → (labels, value).
pub type Samples = HashMap<String, Vec<(Vec<(String, String)>, f64)>>;

/// Parses the Prometheus text we write (no escapes inside label values but `\"`).
pub fn parse_prometheus(text: &str) -> Samples {
    let mut out: Samples = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (head, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match head.split_once('{') {
            None => (head, Vec::new()),
            Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
        };
        out.entry(name.to_owned())
            .or_default()
            .push((labels, value));
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.push((key.trim_start_matches(',').trim().to_owned(), value));
        rest = &after[end..];
    }
    out
}

/// What a runtime's OTLP metric callbacks render: its page until `clear` (the runtime's stop),
/// nothing after, holding nothing of the runtime then (the SDK keeps callbacks as long as
/// its provider, the process).
#[derive(Clone, Default)]
pub struct MetricPage(Arc<Mutex<Option<RenderFn>>>);

type RenderFn = Arc<dyn Fn() -> String + Send + Sync>;

impl MetricPage {
    pub fn new(render: impl Fn() -> String + Send + Sync + 'static) -> MetricPage {
        MetricPage(Arc::new(Mutex::new(Some(Arc::new(render)))))
    }

    /// The page now (empty once cleared).
    pub fn render(&self) -> String {
        let f = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        f.map(|f| f()).unwrap_or_default()
    }

    /// Drops the render function and what it holds.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

/// Registers every family of `families` as an observable OpenTelemetry instrument of the
/// global meter provider, each read from `render`'s samples (rendered at most once per
/// export) and attributed `ferrotwin.node = node` (a process may run several runtimes: the
/// demo runs three). The Prometheus label set of a sample becomes its attributes; counters
/// lose their `_total`.
pub fn register_metrics(
    families: impl Iterator<Item = &'static MetricFamily>,
    node: &str,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) {
    let node = KeyValue::new("ferrotwin.node", node.to_owned());
    let meter = opentelemetry::global::meter("ferrotwin");
    let cache: Arc<Mutex<(Option<Instant>, Arc<Samples>)>> =
        Arc::new(Mutex::new((None, Arc::new(Samples::new()))));
    let samples = move || -> Arc<Samples> {
        let mut c = cache.lock().unwrap_or_else(|p| p.into_inner());
        if c.0.is_none_or(|t| t.elapsed() > Duration::from_millis(500)) {
            *c = (Some(Instant::now()), Arc::new(parse_prometheus(&render())));
        }
        Arc::clone(&c.1)
    };
    let samples = Arc::new(samples);
    for f in families {
        let node = node.clone();
        let attrs = move |labels: &[(String, String)]| -> Vec<KeyValue> {
            labels
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .chain(std::iter::once(node.clone()))
                .collect()
        };
        let samples = Arc::clone(&samples);
        match f.kind {
            FamilyKind::Counter => {
                let name = f.name.trim_end_matches("_total");
                meter
                    .f64_observable_counter(name)
                    .with_unit(f.unit)
                    .with_description(f.help)
                    .with_callback(move |o| {
                        for (labels, v) in samples().get(f.name).into_iter().flatten() {
                            o.observe(*v, &attrs(labels));
                        }
                    })
                    .build();
            }
            FamilyKind::Gauge => {
                meter
                    .f64_observable_gauge(f.name)
                    .with_unit(f.unit)
                    .with_description(f.help)
                    .with_callback(move |o| {
                        for (labels, v) in samples().get(f.name).into_iter().flatten() {
                            o.observe(*v, &attrs(labels));
                        }
                    })
                    .build();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_parses_with_labels_and_escapes() {
        let s = parse_prometheus(
            "# TYPE a_total counter\na_total 3\nb{x=\"1\",y=\"q\\\"z\"} 2.5\nbad line\n",
        );
        assert_eq!(s["a_total"], vec![(vec![], 3.0)]);
        assert_eq!(
            s["b"],
            vec![(
                vec![("x".into(), "1".into()), ("y".into(), "q\"z".into())],
                2.5
            )]
        );
        assert!(!s.contains_key("bad"));
    }

    #[test]
    fn no_endpoint_means_no_export() {
        // The test process has no OTEL_* endpoint.
        if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
            return;
        }
        let t = Telemetry::from_env(&TelemetryConfig::default()).expect("off");
        assert!(!t.is_on());
    }

    #[test]
    fn an_endpoint_that_is_no_url_is_refused() {
        for bad in ["collector:4317", "http://", "ftp://x:1", "http://a b:1"] {
            let cfg = TelemetryConfig {
                otlp_endpoint: Some(bad.into()),
                ..TelemetryConfig::default()
            };
            let e = cfg
                .validate()
                .err()
                .unwrap_or_else(|| panic!("{bad} passed"));
            assert!(e.to_string().contains("otlp_endpoint"), "{e}");
        }
        let good = TelemetryConfig {
            otlp_endpoint: Some("https://collector.plant:4317".into()),
            ..TelemetryConfig::default()
        };
        assert!(good.validate().is_ok());
        // A refused endpoint's message never shows the user and key it carries.
        let secret = TelemetryConfig {
            otlp_endpoint: Some("https://ops:s3cr3t@collector plant:4317".into()),
            ..TelemetryConfig::default()
        };
        let e = secret
            .validate()
            .expect_err("a space in the host")
            .to_string();
        assert!(!e.contains("s3cr3t") && !e.contains("ops:"), "{e}");
        assert!(e.contains("collector plant:4317"), "{e}");
    }

    /// An `https://` collector's exporter builds with our TLS (system roots): a runtime
    /// pointed at one starts.
    #[tokio::test]
    async fn an_https_collector_gets_an_exporter() {
        let b = opentelemetry_otlp::SpanExporter::builder().with_tonic();
        let cfg = TelemetryConfig {
            otlp_endpoint: Some("https://localhost:4317".into()),
            ..TelemetryConfig::default()
        };
        // (Unless a variable names another endpoint: the variables win.)
        if env("OTEL_EXPORTER_OTLP_ENDPOINT").is_none()
            && env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_none()
        {
            let b = to_collector(b, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &cfg).expect("TLS");
            assert!(b.build().is_ok());
        }
    }

    #[test]
    fn an_anomaly_episode_is_one_span_from_its_start_to_its_end() {
        use opentelemetry::trace::TracerProvider as _;
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let t0 = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t1 = t0 + Duration::from_secs(95);
        record_episode(&provider.tracer("t"), "acme/b/l/m", "spectral", 4.5, t0, t1);
        let spans = exporter.get_finished_spans().expect("spans");
        assert_eq!(spans.len(), 1);
        let s = &spans[0];
        assert_eq!(s.name, "anomaly.episode");
        assert_eq!((s.start_time, s.end_time), (t0, t1));
        assert!(
            s.attributes.iter().any(
                |kv| kv.key.as_str() == "ferrotwin.detector" && kv.value.as_str() == "spectral"
            )
        );
    }

    #[test]
    fn a_ratio_outside_0_1_is_refused() {
        let cfg = TelemetryConfig {
            sample_ratio: Some(1.5),
            ..TelemetryConfig::default()
        };
        let e = Telemetry::from_env(&cfg).err().expect("refused");
        assert!(e.to_string().contains("sample_ratio 1.5"), "{e}");
    }
}
