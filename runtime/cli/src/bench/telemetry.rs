//! `ferrotwin bench telemetry`: what the OpenTelemetry export costs, in one process, export
//! off and on in alternating rounds (so drift of the machine hits both alike):
//! - ingest: readings/s applied with spans exported to a real OTLP/gRPC collector at the
//!   sampling ratio `--ratio` (1 % by default) against no export at all;
//! - `WriteProperty` over loopback gRPC to a simulated Modbus PLC: per-call latency with
//!   every call traced (the caller sends a sampled `traceparent`) against no export.
//!
//! The collector is in this process (the collector's trace service from the
//! `opentelemetry-proto` definitions over a socket): it counts what it receives. Export off
//! means the export layer's filter takes nothing and no hot path makes a span. A benchmark:
//! it prints, it never fails.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Result;
use ferrotwin_models::Timestamp;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;
use ferrotwin_runtime::telemetry::{Telemetry, TelemetryConfig, set_tracing_on};
use ferrotwin_runtime::{Runtime, RuntimeOptions};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::serve::ServedPlant;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{Layer as _, Registry};

use super::{load, percentile, plant_size, sensor_ids};
use crate::feeds;

pub struct TelemetryBench {
    pub sensors: u64,
    /// Seconds of ingest per round.
    pub seconds: u64,
    /// Rounds of each (off, on, off, on, ...).
    pub rounds: u32,
    /// Sampling ratio of new traces while the export is on.
    pub ratio: f64,
    /// Sequential writes per round.
    pub writes: usize,
}

/// Counts the spans an OTLP exporter sends.
#[derive(Clone, Default)]
struct Sink {
    spans: Arc<AtomicU64>,
    requests: Arc<AtomicU64>,
    /// Spans by name.
    names: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.spans.fetch_add(n as u64, Ordering::Relaxed);
        let mut names = self.names.lock().unwrap_or_else(|p| p.into_inner());
        for s in req
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            *names.entry(s.name.clone()).or_default() += 1;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

pub async fn telemetry(b: TelemetryBench) -> Result<String> {
    let mut out = String::new();
    let sink = Sink::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let collector = listener.local_addr()?;
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(sink.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let telemetry = Telemetry::from_env(&TelemetryConfig {
        otlp_endpoint: Some(format!("http://{collector}")),
        service_name: Some("ferrotwin-bench".into()),
        sample_ratio: Some(b.ratio),
        ingest_spans_per_s: None,
    })?;
    // The export layer is there all along, as in a process that exports; off, its filter
    // takes nothing (and no hot path makes a span: `tracing_on` is false).
    let switch = Arc::new(AtomicBool::new(false));
    let layer = telemetry
        .layer_switched::<Registry>(switch.clone())
        .ok_or_else(|| anyhow::anyhow!("traces are off (OTEL_TRACES_EXPORTER=none?)"))?;
    tracing_subscriber::registry()
        .with(layer)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_filter(tracing_subscriber::EnvFilter::new("warn,sled=warn")),
        )
        .try_init()?;
    let export = |on: bool| -> Result<()> {
        switch.store(on, Ordering::Relaxed);
        set_tracing_on(on);
        Ok(())
    };
    let _ = writeln!(
        out,
        "bench telemetry: OTLP/gRPC to an in-process collector, sampling {:.1} % of new traces while on; {} rounds of each, alternating",
        b.ratio * 100.0,
        b.rounds
    );

    // Ingest.
    let mut spec = generate(plant_size(b.sensors), 1);
    for t in spec.machine_types.values_mut() {
        t.detect.enabled = false;
        for s in &mut t.sensors {
            s.detect.enabled = false;
        }
    }
    let dir = tempfile::tempdir()?;
    let mut opts = RuntimeOptions::default();
    opts.ingest.stale_sweep_ms = 3_600_000;
    let rt = Runtime::start(&spec, dir.path(), opts).await?;
    let ids = Arc::new(sensor_ids(&spec));
    let router = rt.ingest();
    let dur = Duration::from_secs(b.seconds.max(1));
    let (mut off, mut on) = (Vec::new(), Vec::new());
    // A warm-up round first (twins' first readings, allocations): not counted.
    let (r2, i2) = (router.clone(), ids.clone());
    tokio::task::spawn_blocking(move || load(r2.as_ref(), &i2, dur, None)).await?;
    let spans0 = sink.spans.load(Ordering::Relaxed);
    for round in 0..b.rounds.max(1) * 2 {
        let exporting = round % 2 == 1;
        export(exporting)?;
        while rt.readings_in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let applied0 = rt.metrics().readings_applied.load(Ordering::Relaxed);
        let t = Instant::now();
        let (r2, i2) = (router.clone(), ids.clone());
        tokio::task::spawn_blocking(move || load(r2.as_ref(), &i2, dur, None)).await?;
        let rate = (rt.metrics().readings_applied.load(Ordering::Relaxed) - applied0) as f64
            / t.elapsed().as_secs_f64();
        if exporting { &mut on } else { &mut off }.push(rate);
    }
    export(false)?;
    rt.shutdown().await;
    let (off_med, on_med) = (percentile(&mut off, 0.5), percentile(&mut on, 0.5));
    let _ = writeln!(
        out,
        "ingest, {} sensor twins: export off {:.0} readings/s, on {:.0} readings/s (medians of {} rounds of {} s): {:+.1} %; rounds off {:?}, on {:?}",
        ids.len(),
        off_med,
        on_med,
        off.len(),
        b.seconds,
        (on_med / off_med - 1.0) * 100.0,
        off.iter().map(|r| *r as u64).collect::<Vec<_>>(),
        on.iter().map(|r| *r as u64).collect::<Vec<_>>(),
    );

    // WriteProperty.
    let wspec = generate(
        PlantSize {
            sites: 1,
            areas: 1,
            lines: 1,
            machines: 2,
            sensors_per_machine: 0,
        },
        1,
    );
    let plant = ServedPlant::start(&wspec, 3, Timestamp::now()).await?;
    let opts = RuntimeOptions {
        connections: feeds::modbus_connections(&wspec, &plant, 200, |_| true)?,
        ..RuntimeOptions::default()
    };
    let wdir = tempfile::tempdir()?;
    let rt = Runtime::start(&wspec, wdir.path(), opts).await?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    rt.serve_grpc(l)?;
    let mut client = TwinServiceClient::connect(format!("http://{addr}")).await?;
    let machine = wspec
        .assets()
        .iter()
        .find(|a| a.kind.level() == ferrotwin_models::Level::Machine)
        .map(|a| a.path.to_string())
        .ok_or_else(|| anyhow::anyhow!("no machine"))?;
    let call = |n: u64, sampled: bool| {
        let mut req = tonic::Request::new(pb::WritePropertyRequest {
            path: machine.clone(),
            property: "speed_setpoint_pct".into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Int(80 + (n % 40) as i64)),
            }),
            by: "bench".into(),
        });
        let traceparent = format!(
            "00-{:032x}-{:016x}-{}",
            u128::from(n) + 1,
            n + 1,
            if sampled { "01" } else { "00" }
        );
        if let Ok(v) = traceparent.parse() {
            req.metadata_mut().insert("traceparent", v);
        }
        req
    };
    // Until the PLC's connection is up.
    let deadline = Instant::now() + Duration::from_secs(30);
    while client.write_property(call(0, false)).await.is_err() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the PLC connection did not come up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut n = 1u64;
    // Warm-up (the connection's first writes, the store's first audit records): not counted.
    for _ in 0..b.writes {
        n += 1;
        client.write_property(call(n, false)).await?;
    }
    // Three modes in turn: no export; export on and the caller's trace not sampled (what
    // most calls cost at a low ratio); export on and every call sampled.
    let (mut w_off, mut w_unsampled, mut w_on) = (Vec::new(), Vec::new(), Vec::new());
    let wspans0 = sink.spans.load(Ordering::Relaxed);
    for round in 0..b.rounds.max(1) * 3 {
        let mode = round % 3;
        export(mode > 0)?;
        for _ in 0..b.writes {
            n += 1;
            let t = Instant::now();
            client.write_property(call(n, mode == 2)).await?;
            let us = t.elapsed().as_secs_f64() * 1e6;
            [&mut w_off, &mut w_unsampled, &mut w_on][mode as usize].push(us);
        }
        // Let the exporter send what it holds (its queue is bounded: past it, spans are
        // dropped, not waited for).
        if mode == 2 {
            tokio::time::sleep(Duration::from_secs(6)).await;
        }
    }
    export(false)?;
    rt.shutdown().await;
    let spans = sink.spans.load(Ordering::Relaxed);
    let (p50_off, p50_un, p50_on) = (
        percentile(&mut w_off, 0.5),
        percentile(&mut w_unsampled, 0.5),
        percentile(&mut w_on, 0.5),
    );
    let (p99_off, p99_un, p99_on) = (
        percentile(&mut w_off, 0.99),
        percentile(&mut w_unsampled, 0.99),
        percentile(&mut w_on, 0.99),
    );
    let _ = writeln!(
        out,
        "WriteProperty over loopback gRPC to a Modbus PLC, {} calls each: off p50 {:.0} µs p99 {:.0} µs; export on, not sampled p50 {:.0} µs p99 {:.0} µs ({:+.0} µs); sampled p50 {:.0} µs p99 {:.0} µs ({:+.0} µs)",
        w_off.len(),
        p50_off,
        p99_off,
        p50_un,
        p99_un,
        p50_un - p50_off,
        p50_on,
        p99_on,
        p50_on - p50_off
    );
    let _ = writeln!(
        out,
        "collector received {} spans in {} requests ({} during ingest, {} during the writes: {:.1} per sampled write)",
        spans,
        sink.requests.load(Ordering::Relaxed),
        wspans0 - spans0,
        spans - wspans0,
        (spans - wspans0) as f64 / w_on.len().max(1) as f64
    );
    let _ = writeln!(
        out,
        "spans by name: {:?}",
        sink.names.lock().unwrap_or_else(|p| p.into_inner())
    );
    drop(plant);
    let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    Ok(out)
}
