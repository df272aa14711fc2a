//! Traces, asserted on the spans themselves: one process-wide subscriber exports every span
//! to memory (its own test binary, so no other test runs with spans on), and each test finds
//! its spans by the trace id it started or by its own attributes.
//!
//! - A `WriteProperty` with the caller's `traceparent` is one trace: the gRPC server span
//!   (child of the caller's), `twin.write`, `audit.append`, `adapter.write` and the Modbus
//!   request, with the PLC's answer.
//! - A replicated batch: the enterprise's `replication.apply` is the child of the site's
//!   `replication.send`, across two runtimes over real gRPC.
//!
//! - A connection's life: connect attempts with their outcome, a loss with its reason (Modbus
//!   and MQTT).
//!
//! The wire-level check (a real `ferrotwin` process exporting OTLP to a collector) is in
//! `runtime/cli/tests/process.rs`.

#[allow(dead_code, unused_imports)]
#[path = "../e2e/common.rs"]
mod common;

use std::sync::OnceLock;

use common::*;
use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_cli::feeds;
use ferrotwin_models::Timestamp;
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::{EnterpriseRole, RuntimeOptions, SiteReplication};
use ferrotwin_sim::generate::generate;
use ferrotwin_sim::mapping::Mapping;
use ferrotwin_sim::mqtt::EmbeddedBroker;
use ferrotwin_sim::serve::ServedPlant;
use opentelemetry::trace::{SpanId, SpanKind, Status, TraceId, TracerProvider as _};
use opentelemetry::{Key, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt as _;

/// Every span of this process, in memory.
fn spans() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<InMemorySpanExporter> = OnceLock::new();
    EXPORTER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        // The filter the export has in production (`Telemetry::layer`).
        let subscriber = tracing_subscriber::registry().with(
            tracing_opentelemetry::layer()
                .with_tracer(provider.tracer("ferrotwin-tests"))
                .with_filter(ferrotwin_runtime::telemetry::export_filter()),
        );
        tracing::subscriber::set_global_default(subscriber).expect("the only subscriber");
        ferrotwin_runtime::telemetry::set_tracing_on(true);
        // The provider lives as long as the process.
        std::mem::forget(provider);
        exporter
    })
}

fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
    s.attributes
        .iter()
        .find(|kv| kv.key == Key::from(key.to_owned()))
        .map(|kv| &kv.value)
}

fn attr_str(s: &SpanData, key: &str) -> String {
    attr(s, key)
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

/// Waits until `find` picks what it needs out of the finished spans.
async fn wait_spans<T>(what: &str, mut find: impl FnMut(&[SpanData]) -> Option<T>) -> T {
    wait_for(30, what, || {
        let all = spans().get_finished_spans().expect("spans");
        let found = find(&all);
        async move { found }
    })
    .await
}

fn one<'a>(all: &'a [SpanData], trace: TraceId, name: &str) -> Option<&'a SpanData> {
    all.iter()
        .find(|s| s.span_context.trace_id() == trace && s.name == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_property_is_one_trace_from_the_callers_span_to_the_modbus_plcs_answer() {
    write_trace(Plc::Modbus, "4bf92f3577b34da6a3ce929d0e0e4736").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_property_is_one_trace_from_the_callers_span_to_the_opcua_servers_answer() {
    write_trace(Plc::OpcUa, "6bf92f3577b34da6a3ce929d0e0e4738").await;
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Plc {
    Modbus,
    OpcUa,
}

/// A traced write to a simulated PLC, its spans asserted; `trace` is the caller's trace id.
async fn write_trace(plc: Plc, trace: &str) {
    spans();
    let mut spec: PlantSpec = generate(TWO_LINES, 3);
    // Without the plant spec's setpoint ranges: the refused write below is the PLC's answer
    // (one the spec refuses never reaches an adapter).
    for t in spec.machine_types.values_mut() {
        t.setpoints.clear();
    }
    let mut plant = ServedPlant::start(&spec, 5, Timestamp::now())
        .await
        .expect("PLCs start");
    let mapping = Mapping::of(&spec).expect("fits");
    let mut opts = options();
    opts.connections = match plc {
        Plc::Modbus => feeds::modbus_connections(&spec, &plant, 50, |_| true).expect("configs"),
        Plc::OpcUa => {
            plant
                .serve_opcua(&spec)
                .await
                .expect("OPC UA servers start");
            feeds::opcua_connections(&spec, &plant, |_| true).expect("configs")
        }
    };
    let dir = tempfile::tempdir().expect("dir");
    let site = start_plant_in(&spec, dir.path(), opts).await;
    let machine = mapping.lines[0]
        .tags
        .iter()
        .find(|t| t.property == "value")
        .and_then(|t| ferrotwin_models::AssetPath::parse(&t.asset).ok())
        .and_then(|p| p.parent())
        .expect("a machine")
        .to_string();
    let caller_trace = TraceId::from_hex(trace).expect("hex");
    let protocol_span = match plc {
        Plc::Modbus => "modbus.write",
        Plc::OpcUa => "opcua.write",
    };
    let caller_span = SpanId::from_hex("00f067aa0ba902b7").expect("hex");
    let write = |pct: i64| {
        let mut req = tonic::Request::new(pb::WritePropertyRequest {
            path: machine.clone(),
            property: "speed_setpoint_pct".into(),
            value: Some(pb::Value {
                kind: Some(pb::value::Kind::Int(pct)),
            }),
            by: "ann".into(),
        });
        req.metadata_mut().insert(
            "traceparent",
            format!("00-{caller_trace}-{caller_span}-01")
                .parse()
                .expect("ascii"),
        );
        req
    };
    let mut c = site.client.clone();
    // Until the PLC's connection is up, a write is refused as not connected.
    let written = wait_for(30, "a write the PLC takes", || {
        let mut c = c.clone();
        let req = write(120);
        async move { c.write_property(req).await.ok() }
    })
    .await
    .into_inner();
    let (rpc, write_span, audit, adapter, modbus) = wait_spans("the write's spans", |all| {
        let adapter = all.iter().find(|s| {
            s.span_context.trace_id() == caller_trace
                && s.name == "adapter.write"
                && attr_str(s, "ferrotwin.plc_answer") == "confirmed"
        })?;
        let write_span = all
            .iter()
            .find(|s| s.span_context.span_id() == adapter.parent_span_id)?;
        let rpc = all
            .iter()
            .find(|s| s.span_context.span_id() == write_span.parent_span_id)?;
        let audit = all.iter().find(|s| {
            s.name == "audit.append" && s.parent_span_id == write_span.span_context.span_id()
        })?;
        let modbus = all.iter().find(|s| {
            s.name == protocol_span && s.parent_span_id == adapter.span_context.span_id()
        })?;
        Some((
            rpc.clone(),
            write_span.clone(),
            audit.clone(),
            adapter.clone(),
            modbus.clone(),
        ))
    })
    .await;
    // The gRPC server span: named and attributed by the RPC conventions, the caller's child.
    assert_eq!(rpc.name, "ferrotwin.v1.TwinService/WriteProperty");
    assert_eq!(rpc.span_kind, SpanKind::Server);
    assert_eq!(rpc.parent_span_id, caller_span);
    assert!(rpc.parent_span_is_remote);
    assert_eq!(attr_str(&rpc, "rpc.system"), "grpc");
    assert_eq!(attr_str(&rpc, "rpc.service"), "ferrotwin.v1.TwinService");
    assert_eq!(attr_str(&rpc, "rpc.method"), "WriteProperty");
    assert_eq!(attr(&rpc, "rpc.grpc.status_code"), Some(&Value::I64(0)));
    // The twin's write, with what and who.
    assert_eq!(write_span.name, "twin.write");
    assert_eq!(attr_str(&write_span, "ferrotwin.asset"), machine);
    assert_eq!(
        attr_str(&write_span, "ferrotwin.property"),
        "speed_setpoint_pct"
    );
    assert_eq!(
        attr_str(&write_span, "ferrotwin.connection"),
        written.connection
    );
    // The audit record is written before the PLC is.
    assert!(audit.end_time <= adapter.start_time);
    // The adapter's way to the PLC and the PLC's answer.
    assert_eq!(adapter.span_kind, SpanKind::Client);
    assert_eq!(attr_str(&adapter, "ferrotwin.value"), "120");
    match plc {
        Plc::Modbus => {
            assert_eq!(attr_str(&adapter, "network.protocol.name"), "modbus");
            assert_eq!(
                attr_str(&modbus, "modbus.function"),
                "write_single_register"
            );
            assert_eq!(attr_str(&modbus, "ferrotwin.plc_answer"), "confirmed");
        }
        Plc::OpcUa => {
            assert_eq!(attr_str(&adapter, "network.protocol.name"), "opcua");
            // The server's answer, and the read of the variable's data type before it (once
            // per session: the first write's trace has it).
            assert_eq!(attr_str(&modbus, "opcua.status_code"), "Good");
            assert_eq!(attr_str(&modbus, "opcua.service"), "Write");
            let all = spans().get_finished_spans().expect("spans");
            assert!(
                all.iter().any(|s| s.name == "opcua.read"
                    && attr_str(s, "opcua.attribute") == "DataType"
                    && s.span_context.trace_id() == caller_trace),
                "no data type read in the write's trace"
            );
        }
    }
    for s in [&write_span, &audit, &adapter, &modbus] {
        assert_eq!(s.span_context.trace_id(), caller_trace, "{}", s.name);
    }
    // A write the tag cannot take: the refusal is on the adapter's span, as an error.
    let mut refused_hex = trace.to_owned();
    refused_hex.replace_range(..1, "7");
    let refused_trace = TraceId::from_hex(&refused_hex).expect("hex");
    let mut req = write(99_999);
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{refused_trace}-{caller_span}-01")
            .parse()
            .expect("ascii"),
    );
    let err = c.write_property(req).await.expect_err("refused");
    let (rpc, adapter) = wait_spans("the refused write's spans", |all| {
        Some((
            one(all, refused_trace, "ferrotwin.v1.TwinService/WriteProperty")?.clone(),
            one(all, refused_trace, "adapter.write")?.clone(),
        ))
    })
    .await;
    assert_eq!(
        attr(&rpc, "rpc.grpc.status_code"),
        Some(&Value::I64(err.code() as i64))
    );
    assert!(
        matches!(adapter.status, Status::Error { .. }),
        "{adapter:?}"
    );
    let answer = attr_str(&adapter, "ferrotwin.plc_answer");
    assert!(answer != "confirmed" && !answer.is_empty(), "{answer}");
    assert!(
        ["bad_value", "refused"].contains(&attr_str(&adapter, "error.type").as_str()),
        "{adapter:?}"
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replicated_batch_is_applied_in_the_trace_of_its_send() {
    spans();
    let ed = tempfile::tempdir().expect("dir");
    let mut eo = options();
    eo.enterprise = Some(EnterpriseRole {
        accept: vec!["acme/berlin".into()],
    });
    let ent = start_in(ed.path(), eo).await;
    let sd = tempfile::tempdir().expect("dir");
    let mut so: RuntimeOptions = options();
    let mut r = SiteReplication::new(format!("http://{}", ent.addr));
    r.reconnect_min_ms = 20;
    r.reconnect_max_ms = 200;
    so.replication = Some(r);
    let site = start_in(sd.path(), so).await;
    push(&site, vec![float(TEMP, 21.5)]).await;
    let (send, apply) = wait_spans("a batch's send and apply", |all| {
        all.iter()
            .filter(|s| {
                s.name == "replication.apply"
                    && attr_str(s, "ferrotwin.site") == "acme/berlin"
                    && attr_str(s, "ferrotwin.outcome") == "applied"
            })
            .find_map(|apply| {
                let send = all.iter().find(|s| {
                    s.name == "replication.send" && s.span_context.span_id() == apply.parent_span_id
                })?;
                Some((send.clone(), apply.clone()))
            })
    })
    .await;
    assert_eq!(send.span_kind, SpanKind::Producer);
    assert_eq!(apply.span_kind, SpanKind::Consumer);
    assert_eq!(
        send.span_context.trace_id(),
        apply.span_context.trace_id(),
        "one trace across the two runtimes"
    );
    assert!(apply.parent_span_is_remote);
    assert_eq!(attr(&send, "ferrotwin.seq"), attr(&apply, "ferrotwin.seq"));
    // The enterprise serves the call that carried the batch under the RPC conventions too;
    // its span lasts as long as the stream, which ends with the site.
    site.rt.shutdown().await;
    let stream = wait_spans("the replication stream's server span", |all| {
        all.iter()
            .find(|s| {
                s.name == "ferrotwin.v1.ReplicationService/Replicate"
                    && s.span_kind == SpanKind::Server
                    && s.start_time <= apply.start_time
                    && s.end_time >= apply.end_time
            })
            .cloned()
    })
    .await;
    // The site went away: its stream ended (OK) or was reset (CANCELLED), whichever the
    // enterprise saw first.
    assert!(
        [Some(&Value::I64(0)), Some(&Value::I64(1))]
            .contains(&attr(&stream, "rpc.grpc.status_code")),
        "{stream:?}"
    );
    // A stream the enterprise ends with an error after its first answer (a refused batch):
    // the status is in the trailers, and the span has it.
    let trace = TraceId::from_hex("9bf92f3577b34da6a3ce929d0e0e4740").expect("hex");
    let code = retry_while_stream_busy(|| refused_stream(ent.addr, trace))
        .await
        .expect_err("refused");
    assert!(
        matches!(
            code.code(),
            tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
        ),
        "{code}"
    );
    // (An attempt refused while the site's stream let go is in the same trace, with its
    // own status: the refused batch's span is the one with the batch's.)
    wait_spans("the refused stream's span", |all| {
        all.iter()
            .find(|s| {
                s.span_context.trace_id() == trace
                    && s.name == "ferrotwin.v1.ReplicationService/Replicate"
                    && attr(s, "rpc.grpc.status_code") == Some(&Value::I64(code.code() as i64))
            })
            .cloned()
    })
    .await;
    ent.rt.shutdown().await;
}

/// A replication stream in trace `trace` whose hello is answered and whose batch (a seq at the
/// end of the range) is refused: the error is what the stream ends with.
async fn refused_stream(ent: std::net::SocketAddr, trace: TraceId) -> Result<(), tonic::Status> {
    use ferrotwin_proto::v1::replication_service_client::ReplicationServiceClient;
    let mut client = ReplicationServiceClient::connect(format!("http://{ent}"))
        .await
        .expect("connect");
    let msgs = vec![
        pb::ReplicateRequest {
            msg: Some(pb::replicate_request::Msg::Hello(pb::SiteHello {
                protocol_version: 2,
                site: "acme/berlin".into(),
                agent: "test".into(),
                last_seq: 10,
                event_hwm: u64::MAX,
                ..Default::default()
            })),
        },
        raw_batch(u64::MAX, 0, 0, &[]),
    ];
    // The stream stays open until the enterprise ends it.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    for m in msgs {
        tx.send(m).await.expect("queue");
    }
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace}-20f067aa0ba902b9-01")
            .parse()
            .expect("ascii"),
    );
    let mut answers = client.replicate(req).await?.into_inner();
    loop {
        match tokio::time::timeout(std::time::Duration::from_secs(20), answers.message()).await {
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no answer from the enterprise"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_request_is_a_server_span_named_by_its_route_in_the_callers_trace() {
    spans();
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    site.rt.serve_http(listener).expect("serve http");
    let trace = TraceId::from_hex("8bf92f3577b34da6a3ce929d0e0e4739").expect("hex");
    let parent = SpanId::from_hex("10f067aa0ba902b8").expect("hex");
    let client = reqwest::Client::new();
    for path in [
        format!("/api/v1/twins/{PRESS}"),
        "/api/v1/twins/acme/nowhere".into(),
    ] {
        let r = client
            .get(format!("http://{addr}{path}"))
            .header("traceparent", format!("00-{trace}-{parent}-01"))
            .send()
            .await
            .expect("GET");
        assert!(r.status().as_u16() == 200 || r.status().as_u16() == 404);
    }
    let got = wait_spans("the two requests' spans", |all| {
        let mine: Vec<SpanData> = all
            .iter()
            .filter(|s| s.span_context.trace_id() == trace)
            .cloned()
            .collect();
        (mine.len() >= 2).then_some(mine)
    })
    .await;
    for s in &got {
        assert_eq!(s.name, "GET /api/v1/twins/{*path}");
        assert_eq!(s.span_kind, SpanKind::Server);
        assert_eq!(s.parent_span_id, parent);
        assert_eq!(attr_str(s, "http.request.method"), "GET");
        assert_eq!(attr_str(s, "http.route"), "/api/v1/twins/{*path}");
        assert_eq!(attr_str(s, "url.scheme"), "http");
    }
    let mut codes: Vec<i64> = got
        .iter()
        .filter_map(|s| match attr(s, "http.response.status_code") {
            Some(Value::I64(c)) => Some(*c),
            _ => None,
        })
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, vec![200, 404]);
    // A client error is not the server's: no error status.
    assert!(
        got.iter()
            .all(|s| !matches!(s.status, Status::Error { .. }))
    );
    // A live stream's span lasts as long as the stream: past its first event, until the
    // client goes away.
    let live_trace = TraceId::from_hex("8bf92f3577b34da6a3ce929d0e0e4741").expect("hex");
    let mut r = client
        .get(format!("http://{addr}/api/v1/live?path={PRESS}"))
        .header("traceparent", format!("00-{live_trace}-{parent}-01"))
        .send()
        .await
        .expect("GET live");
    assert_eq!(r.status().as_u16(), 200);
    let first = tokio::time::timeout(std::time::Duration::from_secs(20), r.chunk())
        .await
        .expect("a first event in time")
        .expect("a chunk")
        .expect("not the end");
    assert!(!first.is_empty());
    let seen = std::time::SystemTime::now();
    drop(r);
    let live = wait_spans("the live stream's span", |all| {
        one(all, live_trace, "GET /api/v1/live").cloned()
    })
    .await;
    assert!(live.end_time >= seen, "{live:?}");
    site.rt.shutdown().await;
}

/// The spans of `connection` named `name`, oldest first.
fn of_connection(all: &[SpanData], name: &str, connection: &str) -> Vec<SpanData> {
    let mut mine: Vec<SpanData> = all
        .iter()
        .filter(|s| s.name == name && attr_str(s, "ferrotwin.connection") == connection)
        .cloned()
        .collect();
    mine.sort_by_key(|s| s.start_time);
    mine
}

/// A Modbus connection's life as spans: its connect attempt, the loss when its PLC goes off the
/// network (with the reason), the failed attempts while it is away, and the connect after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_modbus_connections_connects_loss_and_reconnect_attempts_are_spans() {
    spans();
    let spec: PlantSpec = generate(TWO_LINES, 3);
    let mut plant = ServedPlant::start(&spec, 5, Timestamp::now())
        .await
        .expect("PLCs start");
    let mut opts = options();
    opts.connections = feeds::modbus_connections(&spec, &plant, 50, |_| true).expect("configs");
    // Names of this test's own (the other tests of this process serve the same plant).
    let mut watched = None;
    for c in &mut opts.connections {
        if let ConnectionConfig::Modbus(m) = c {
            m.name = format!("life-{}", m.name);
            m.timeout_ms = 500;
            let line = plant
                .lines()
                .iter()
                .position(|l| l.addr.to_string() == m.endpoint);
            if let (None, Some(i)) = (&watched, line) {
                watched = Some((i, m.name.clone(), m.endpoint.clone()));
            }
        }
    }
    let (line, name, endpoint) = watched.expect("a line's connection");
    let dir = tempfile::tempdir().expect("dir");
    let site = start_plant_in(&spec, dir.path(), opts).await;
    let first = wait_spans("the first connect", |all| {
        of_connection(all, "adapter.connect", &name)
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(attr_str(&first, "ferrotwin.outcome"), "connected");
    // A root: no caller, and not the child of the connection's task span.
    assert_eq!(first.parent_span_id, SpanId::INVALID, "{first:?}");
    assert_eq!(attr_str(&first, "network.protocol.name"), "modbus");
    assert_eq!(attr_str(&first, "server.address"), endpoint);
    assert_eq!(first.span_kind, SpanKind::Client);
    assert!(!matches!(first.status, Status::Error { .. }));
    assert!(plant.stop_line(line));
    let lost = wait_spans("the loss", |all| {
        of_connection(all, "adapter.disconnect", &name)
            .into_iter()
            .next()
    })
    .await;
    assert!(matches!(lost.status, Status::Error { .. }), "{lost:?}");
    assert_eq!(attr_str(&lost, "error.type"), "link_lost");
    assert_eq!(lost.parent_span_id, SpanId::INVALID, "{lost:?}");
    assert!(!attr_str(&lost, "ferrotwin.outcome").is_empty());
    // Attempts while the PLC is away fail, each one a span with its error.
    let failed = wait_spans("a failed reconnect attempt", |all| {
        of_connection(all, "adapter.connect", &name)
            .into_iter()
            .find(|s| s.start_time >= lost.start_time && matches!(s.status, Status::Error { .. }))
    })
    .await;
    assert_eq!(attr_str(&failed, "error.type"), "connect");
    assert_ne!(attr_str(&failed, "ferrotwin.outcome"), "connected");
    plant.restart_line(line).await.expect("the PLC is back");
    wait_spans("the reconnect", |all| {
        of_connection(all, "adapter.connect", &name)
            .into_iter()
            .find(|s| {
                s.start_time > failed.start_time && attr_str(s, "ferrotwin.outcome") == "connected"
            })
    })
    .await;
    site.rt.shutdown().await;
}

/// An MQTT connection's attempts are spans too (rumqttc connects inside its poll): a broker
/// that is not there fails each attempt with its error; one that is answers with a connect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_connect_attempts_are_spans_with_their_outcome() {
    spans();
    let spec: PlantSpec = generate(TWO_LINES, 3);
    // rumqttd has no shutdown: the broker's threads end with the test process.
    let broker = EmbeddedBroker::start().expect("broker");
    // A port nobody listens on (bound, then let go).
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let lines: Vec<String> = spec
        .assets()
        .into_iter()
        .filter(|a| matches!(a.kind, ferrotwin_models::spec::AssetKind::Line { .. }))
        .map(|a| a.path.to_string())
        .collect();
    assert!(lines.len() >= 2, "{lines:?}");
    let mut opts = options();
    // A line each: a setpoint is written by one connection only.
    for (name, addr, line) in [
        ("mqtt-there", broker.addr(), &lines[0]),
        ("mqtt-absent", nobody, &lines[1]),
    ] {
        let mut c = feeds::json_connection(name, &spec, addr, |l| l == line).expect("config");
        if let ConnectionConfig::Mqtt(m) = &mut c {
            m.reconnect_min_ms = 50;
            m.reconnect_max_ms = 200;
        }
        opts.connections.push(c);
    }
    let dir = tempfile::tempdir().expect("dir");
    let site = start_plant_in(&spec, dir.path(), opts).await;
    let there = wait_spans("the broker's connect", |all| {
        of_connection(all, "adapter.connect", "mqtt-there")
            .into_iter()
            .next()
    })
    .await;
    assert_eq!(attr_str(&there, "ferrotwin.outcome"), "connected");
    assert_eq!(attr_str(&there, "network.protocol.name"), "mqtt");
    assert_eq!(
        attr_str(&there, "server.address"),
        broker.addr().to_string()
    );
    let absent = wait_spans("two failed attempts", |all| {
        let tried = of_connection(all, "adapter.connect", "mqtt-absent");
        (tried.len() >= 2).then_some(tried)
    })
    .await;
    for s in &absent {
        assert!(matches!(s.status, Status::Error { .. }), "{s:?}");
        assert_eq!(attr_str(s, "error.type"), "connect");
    }
    site.rt.shutdown().await;
}
