//! Logs and the OpenTelemetry export of a `ferrotwin` process: text or JSON lines on stderr
//! (`--log-format`), filtered by `RUST_LOG` or the command's default, plus the OTLP layer
//! when one is configured (`ferrotwin_runtime::telemetry`).
//!
//! A JSON line is one object: `timestamp` (RFC 3339, UTC), `level`, `target`, `message`, the
//! event's own fields, `span` (the innermost span's name) and, inside an exported trace,
//! `trace_id` and `span_id`, so a log line leads to its trace. Secrets are never fields of
//! an event (tokens, passwords and keys are not logged anywhere).

use std::io::Write as _;
use std::sync::OnceLock;

use ferrotwin_runtime::telemetry::Telemetry;
use opentelemetry::trace::TraceContextExt as _;
use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::Layer;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Context, SubscriberExt as _};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The log filter a command starts from when `RUST_LOG` is not set: `base`, sled at warn,
/// and without async-opcua's certificate complaints. It logs ERRORs for every secure channel
/// and session whose own certificate is missing, which with security `None` (no certificate
/// needed) is every connection attempt. With security on, the adapter checks its certificate
/// files at start, and a session that cannot be made is the connection's own error (link
/// state, event, log line). `RUST_LOG` shows them again.
pub fn default_filter(base: &str) -> String {
    format!(
        "{base},sled=warn,opcua_core::comms::secure_channel=off,\
         opcua_crypto::certificate_store=off,opcua_client::session::client=off"
    )
}

/// Installs the process's subscriber: logs in `format` filtered by `RUST_LOG` (else
/// `default_filter`), and `telemetry`'s span export when it is on.
pub fn init(default_filter: &str, format: LogFormat, telemetry: &Telemetry) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let logs = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => JsonLines::new(std::io::stderr).boxed(),
    };
    // The filter applies to the logs only: the export has its own (our crates' spans at info
    // and above, `telemetry::export_filter`), whatever `RUST_LOG` says about log lines. While
    // exporting, the logs see the exported spans too (not their events), so a warning inside
    // a traced call carries its trace id under `RUST_LOG=warn`.
    let logs = logs.with_filter(log_filter(filter, telemetry.is_on()));
    let registry = tracing_subscriber::registry().with(logs);
    match telemetry.layer() {
        Some(otel) => {
            let _ = registry.with(otel).try_init();
        }
        None => {
            let _ = registry.try_init();
        }
    }
}

/// What the log lines take: `RUST_LOG`'s events and spans and, while `exporting`, the spans
/// the export takes (so a line inside one has its trace id, whatever the level of spans
/// `RUST_LOG` shows).
pub fn log_filter<S>(
    env: tracing_subscriber::EnvFilter,
    exporting: bool,
) -> Box<dyn tracing_subscriber::layer::Filter<S> + Send + Sync>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    use tracing_subscriber::filter::FilterExt;
    if exporting {
        let spans = tracing_subscriber::filter::filter_fn(|m| m.is_span())
            .and(ferrotwin_runtime::telemetry::export_filter());
        FilterExt::boxed(env.or(spans))
    } else {
        FilterExt::boxed(env)
    }
}

/// Log lines as JSON objects with the trace and span ids of the span they happen in.
pub struct JsonLines<W> {
    writer: W,
    dispatch: OnceLock<tracing::dispatcher::WeakDispatch>,
}

impl<W> JsonLines<W> {
    pub fn new(writer: W) -> Self {
        JsonLines {
            writer,
            dispatch: OnceLock::new(),
        }
    }
}

struct Fields<'a>(&'a mut Map<String, Value>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_owned(), Value::from(format!("{value:?}")));
    }
}

impl<S, W> Layer<S> for JsonLines<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + 'static,
{
    fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
        let _ = self.dispatch.set(subscriber.downgrade());
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = Map::new();
        line.insert(
            "timestamp".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)),
        );
        line.insert("level".into(), Value::from(meta.level().as_str()));
        line.insert("target".into(), Value::from(meta.target()));
        let mut fields = Map::new();
        event.record(&mut Fields(&mut fields));
        // The message first, then the fields (a field named like ours keeps its own key).
        if let Some(m) = fields.remove("message") {
            line.insert("message".into(), m);
        }
        for (k, v) in fields {
            line.entry(k).or_insert(v);
        }
        if let Some(span) = ctx.event_span(event) {
            line.insert("span".into(), Value::from(span.name()));
            let cx = self
                .dispatch
                .get()
                .and_then(tracing::dispatcher::WeakDispatch::upgrade)
                .and_then(|d| tracing_opentelemetry::get_otel_context(&span.id(), &d));
            if let Some(cx) = cx {
                let sc = cx.span().span_context().clone();
                if sc.is_valid() {
                    line.insert("trace_id".into(), Value::from(sc.trace_id().to_string()));
                    line.insert("span_id".into(), Value::from(sc.span_id().to_string()));
                }
            }
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        let _ = self.writer.make_writer().write_all(text.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("buf").extend_from_slice(b);
            Ok(b.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        /// What was written, and each line as JSON.
        fn lines(&self) -> (String, Vec<Value>) {
            let text = String::from_utf8(self.0.lock().expect("buf").clone()).expect("utf-8");
            let lines = text
                .lines()
                .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
                .collect();
            (text, lines)
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;

        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    #[test]
    fn a_json_line_carries_the_trace_and_span_ids_of_its_span() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry()
            .with(JsonLines::new(buf.clone()))
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(answer = 42, "outside");
            let span = tracing::info_span!("work");
            span.in_scope(|| tracing::warn!(token_name = "x", "inside"));
        });
        let spans = exporter.get_finished_spans().expect("spans");
        drop(provider.shutdown());
        let (text, lines) = buf.lines();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "outside");
        assert_eq!(lines[0]["answer"], 42);
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["level"], "WARN");
        assert_eq!(lines[1]["span"], "work");
        assert_eq!(spans.len(), 1);
        assert_eq!(
            lines[1]["trace_id"],
            spans[0].span_context.trace_id().to_string()
        );
        assert_eq!(
            lines[1]["span_id"],
            spans[0].span_context.span_id().to_string()
        );
    }

    /// `RUST_LOG=warn` hides info spans from the logs, not from the export: a warning inside
    /// an exported info span still carries its trace id, and the info line outside is gone.
    #[test]
    fn a_warning_under_rust_log_warn_carries_the_trace_id_of_its_info_span() {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let buf = Buf::default();
        let subscriber = tracing_subscriber::registry()
            .with(
                JsonLines::new(buf.clone())
                    .with_filter(log_filter(tracing_subscriber::EnvFilter::new("warn"), true)),
            )
            .with(
                tracing_opentelemetry::layer()
                    .with_tracer(provider.tracer("t"))
                    .with_filter(ferrotwin_runtime::telemetry::export_filter()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("work");
            span.in_scope(|| tracing::warn!("inside"));
        });
        let spans = exporter.get_finished_spans().expect("spans");
        drop(provider.shutdown());
        let (text, lines) = buf.lines();
        assert_eq!(lines.len(), 1, "{text}");
        assert_eq!(lines[0]["message"], "inside");
        assert_eq!(spans.len(), 1);
        assert_eq!(
            lines[0]["trace_id"],
            spans[0].span_context.trace_id().to_string()
        );
    }
}
