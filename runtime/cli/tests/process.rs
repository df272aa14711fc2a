//! The `ferrotwin` binary as an operator runs it: the demo, the CLI client against it,
//! `kill -9` of the process followed by a restart on the same data dir, and SIGTERM (the
//! clean stop of containers and systemd). (History across a
//! crash is covered in-process by `tests/e2e/recovery.rs`.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;
use opentelemetry_proto::tonic as otlp;
use otlp::collector::metrics::v1::metrics_service_server::{MetricsService, MetricsServiceServer};
use otlp::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use otlp::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use otlp::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

const BIN: &str = env!("CARGO_BIN_EXE_ferrotwin");

/// A demo process with the lines it prints, killed when dropped (also when a test fails
/// midway).
struct Demo(Child, std::sync::mpsc::Receiver<String>);

impl Demo {
    /// `kill -9`, as a power cut would.
    fn kill(mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A started demo: the enterprise's gRPC address (the CLI talks to it) and each site's.
struct Addrs {
    enterprise: String,
    sites: Vec<String>,
}

/// Starts `ferrotwin demo` on a free port and returns it with the addresses it printed.
fn start_demo(data_dir: &std::path::Path) -> (Demo, Addrs) {
    start_demo_with(data_dir, &[])
}

/// `start_demo` with more environment variables.
fn start_demo_with(data_dir: &std::path::Path, env: &[(&str, String)]) -> (Demo, Addrs) {
    let mut child = Command::new(BIN)
        .args([
            "demo",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(data_dir)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("demo starts");
    let stdout = child.stdout.take().expect("stdout");
    // Lines are read on their own thread (which keeps draining stdout so the demo never
    // blocks on a full pipe); the wait for the addresses has a deadline even if none comes.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let address = |s: &str| {
        let word = s.split_whitespace().next().expect("address");
        word.trim_end_matches(',').to_string()
    };
    let mut enterprise = None;
    let mut sites = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(line) = rx.recv_timeout(left) else {
            break;
        };
        // The enterprise mirrors both sites; the sites' lines follow it, then the browser's.
        if let Some(rest) = line.strip_prefix("enterprise gRPC API on ") {
            enterprise = Some(address(rest));
        } else if let Some((_, rest)) = line
            .strip_prefix("site ")
            .and_then(|l| l.split_once(" gRPC API on "))
        {
            sites.push(address(rest));
        } else if line.starts_with("open the web browser")
            && let Some(enterprise) = enterprise.take()
        {
            return (Demo(child, rx), Addrs { enterprise, sites });
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the demo did not print its addresses within 60 s");
}

fn cli(args: &[&str], addr: &str) -> String {
    let out = Command::new(BIN)
        .args(args)
        .args(["--addr", addr])
        .output()
        .expect("cli runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A site's replication link: its outbox's last staged seq and the enterprise's last ack.
async fn link(addr: &str) -> pb::SiteLink {
    let mut c = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    c.get_replication_status(pb::GetReplicationStatusRequest {})
        .await
        .expect("replication status")
        .into_inner()
        .link
        .expect("a site replicates")
}

/// The plant the runtime at `addr` runs, as TOML.
async fn plant_toml(addr: &str) -> String {
    let mut c = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    c.get_plant(pb::GetPlantRequest { with_spec: true })
        .await
        .expect("get_plant")
        .into_inner()
        .plant_toml
}

async fn events(addr: &str) -> Vec<pb::Event> {
    let mut c = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    c.list_events(pb::ListEventsRequest {
        limit: 10_000,
        ..Default::default()
    })
    .await
    .expect("events")
    .into_inner()
    .events
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_serves_the_cli_and_survives_kill_9_with_its_events_and_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (demo, addrs) = start_demo(dir.path());
    let addr = addrs.enterprise.clone();
    assert_eq!(addrs.sites.len(), 2, "berlin and paris");

    let tree = cli(&["tree", "--depth", "6"], &addr);
    assert!(tree.starts_with("acme [enterprise]"), "{tree}");
    assert!(
        tree.contains("berlin [site]") && tree.contains("paris [site]"),
        "{tree}"
    );
    let sensor = "acme/berlin/assembly/line-1";
    assert!(
        tree.lines().count() > 100,
        "every sensor is listed:\n{tree}"
    );
    let q = cli(&["query", "level = machine"], &addr);
    assert!(q.contains("24 twin(s)"), "{q}");
    let got = cli(&["get", sensor], &addr);
    assert!(got.contains("[line]"), "{got}");

    // Let state events accumulate and be flushed, then note them and a sensor's history.
    let before = wait_for(30, "events from the running plant", || {
        let addr = addr.clone();
        async move {
            let e = events(&addr).await;
            (e.len() >= 3).then_some(e)
        }
    })
    .await;
    let mut c = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let machine = before
        .iter()
        .find(|e| e.kind == "state")
        .map(|e| e.path.clone())
        .expect("a machine changed state");
    let sensors = c
        .browse(pb::BrowseRequest {
            path: machine.clone(),
            depth: 1,
            ..Default::default()
        })
        .await
        .expect("browse")
        .into_inner()
        .twins;
    let sensor_path = sensors
        .iter()
        .find(|t| t.level == pb::Level::Sensor as i32)
        .map(|t| t.path.clone())
        .expect("machine has sensors");
    // What the restart checks must be on the enterprise's disk before the kill. Once the
    // enterprise shows the events and the sensor's value, the batches that carried them are
    // at or below each site's last staged seq; a site's acked seq passes a batch only once
    // the enterprise's flush holding its effects is durable.
    wait_for(30, "the sensor's value at the enterprise", || {
        let mut c = c.clone();
        let key = Some(pb::get_twin_request::Key::Path(sensor_path.clone()));
        async move {
            let t = c.get_twin(pb::GetTwinRequest { key }).await.ok()?;
            t.into_inner().sensor.filter(|s| s.has_value).map(|_| ())
        }
    })
    .await;
    for site in &addrs.sites {
        let staged = link(site).await.last_seq;
        wait_for(
            30,
            "the site's batches acked by the enterprise",
            || async move { (link(site).await.acked_seq >= staged).then_some(()) },
        )
        .await;
    }

    demo.kill();

    let (demo, addrs) = start_demo(dir.path());
    let addr = addrs.enterprise;
    let after = events(&addr).await;
    for e in before.iter().take(3) {
        assert!(
            after
                .iter()
                .any(|a| a.seq == e.seq && a.message == e.message),
            "event #{} survived the kill",
            e.seq
        );
    }
    let max_before = before.iter().map(|e| e.seq).max().unwrap_or(0);
    let mut c2 = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    let t = c2
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(sensor_path.clone())),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(
        t.sensor.is_some_and(|s| s.has_value),
        "restored with a value"
    );
    // New events continue after every seq handed out before the kill.
    let newer = wait_for(30, "an event after the restart", || {
        let addr = addr.clone();
        async move {
            let e = events(&addr).await;
            e.into_iter().find(|e| e.seq > max_before)
        }
    })
    .await;
    assert!(newer.seq > max_before);
    demo.kill();
}

/// A sensor with a value at the site `addr`: its path, value and source time.
async fn a_sensor_reading(addr: &str) -> (String, f64, i64) {
    let c = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    wait_for(30, "a sensor with a value at the site", || {
        let mut c = c.clone();
        async move {
            let q = c
                .query(pb::QueryRequest {
                    query: "level = sensor".into(),
                    page_size: 50,
                    ..Default::default()
                })
                .await
                .ok()?
                .into_inner();
            q.twins.into_iter().find_map(|t| {
                let s = t.sensor?;
                let v = match s.value?.kind? {
                    pb::value::Kind::Float(f) => f,
                    pb::value::Kind::Int(i) => i as f64,
                    pb::value::Kind::Bool(b) => f64::from(u8::from(b)),
                };
                s.has_value.then_some((t.path, v, s.source_ts_us))
            })
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_cleanly_and_the_restart_has_every_reading_it_had() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut demo, addrs) = start_demo(dir.path());
    // A reading the site holds in its twin's history tail (not yet in a chunk on disk):
    // only a clean stop writes it.
    let (path, value, ts) = a_sensor_reading(&addrs.sites[0]).await;
    let pid = demo.0.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(90);
    let exit = loop {
        if let Some(status) = demo.0.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running 90 s after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "exit status after SIGTERM: {exit}");
    let mut lines = Vec::new();
    while let Ok(line) = demo.1.recv_timeout(Duration::from_secs(10)) {
        lines.push(line);
    }
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("SIGTERM: stopping cleanly")),
        "{lines:?}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with("stopped cleanly in")),
        "{lines:?}"
    );
    drop(demo);

    let (demo, addrs) = start_demo(dir.path());
    let mut c = TwinServiceClient::connect(format!("http://{}", addrs.sites[0]))
        .await
        .expect("connect");
    let points = c
        .get_history(pb::GetHistoryRequest {
            path: path.clone(),
            property: "value".into(),
            from_us: ts,
            to_us: ts,
            max_points: 10,
        })
        .await
        .expect("history")
        .into_inner()
        .points;
    assert!(
        points.iter().any(|p| p.ts_us == ts && p.value == value),
        "{path} at {ts} ({value}) is in the history after the restart: {points:?}"
    );
    demo.kill();
}

/// `ferrotwin apply` against a running site as an operator runs it: a dry run prints the
/// change and applies nothing, the apply moves the version on, `ferrotwin plant` shows who
/// applied it, and the new line's twins run at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_a_changed_plant_to_a_running_site() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (demo, addrs) = start_demo(dir.path());
    let site = &addrs.sites[0];
    assert!(
        cli(&["plant"], site).starts_with("plant version 1 (applied "),
        "a fresh data dir runs its plant file as version 1"
    );
    let toml = plant_toml(site).await;
    let machine_type = toml
        .lines()
        .find_map(|l| l.strip_prefix("[machine_types."))
        .and_then(|rest| rest.split([']', '.']).next())
        .expect("a machine type")
        .to_owned();
    // A new line in the spec's last area.
    let changed = format!(
        "{toml}\n[[sites.areas.lines]]\nname = \"line-new\"\n\n[[sites.areas.lines.machines]]\nname = \"m-new\"\ntype = \"{machine_type}\"\n"
    );
    let file = dir.path().join("changed.toml");
    std::fs::write(&file, changed).expect("write");
    let file = file.to_str().expect("utf-8 path");
    let dry = cli(&["apply", file, "--dry-run", "--by", "ops"], site);
    assert!(
        dry.lines()
            .any(|l| l.starts_with("+ ") && l.contains("/line-new  line, 1 machine")),
        "{dry}"
    );
    assert!(dry.contains("dry run: nothing applied"), "{dry}");
    assert!(cli(&["plant"], site).starts_with("plant version 1 "));
    let done = cli(&["apply", file, "--by", "ops"], site);
    assert!(done.contains("applied: plant version 1 → 2"), "{done}");
    let shown = cli(&["plant"], site);
    assert!(
        shown.starts_with("plant version 2 (applied ") && shown.contains(" by ops)"),
        "{shown}"
    );
    let new_line = dry
        .lines()
        .find(|l| l.contains("/line-new"))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("the new line's path")
        .to_owned();
    let tree = cli(&["tree", &new_line, "--depth", "2"], site);
    assert!(tree.contains("m-new"), "{tree}");
    // Applying the same file again changes nothing.
    let again = cli(&["apply", file, "--by", "ops"], site);
    assert!(again.contains("nothing to change"), "{again}");
    demo.kill();
}

/// `ferrotwin fleet` against a demo's enterprise: a template pushed for a site (its own plant
/// with a line more) is applied by that site live, and `fleet status` says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_pushes_a_fleet_template_that_its_site_applies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (demo, addrs) = start_demo(dir.path());
    let site_addr = &addrs.sites[0];
    let site = link(site_addr).await.site;
    let before = cli(&["fleet", "status"], &addrs.enterprise);
    assert!(
        before.contains(&format!("{site}  desired v0  applied v0  no template")),
        "{before}"
    );
    let toml = plant_toml(site_addr).await;
    let plant = ferrotwin_models::spec::PlantSpec::from_toml(&toml, "site plant").expect("valid");
    let name = site.rsplit('/').next().expect("a site name");
    let mut own = plant.site_subset(name).expect("its own site");
    let mut line = own.sites[0].areas[0].lines[0].clone();
    line.name = "line-fleet".into();
    own.sites[0].areas[0].lines.push(line);
    let tdir = dir.path().join("template");
    std::fs::create_dir_all(&tdir).expect("dir");
    std::fs::write(tdir.join("plant.toml"), own.to_toml()).expect("write");
    let pushed = cli(
        &[
            "fleet",
            "push",
            "--site",
            &site,
            tdir.to_str().expect("utf-8"),
            "--by",
            "ops",
        ],
        &addrs.enterprise,
    );
    assert!(pushed.contains("template v1 kept"), "{pushed}");
    wait_for(60, "the site applies its template", || async {
        cli(&["fleet", "status"], &addrs.enterprise)
            .contains(&format!("{site}  desired v1  applied v1  up to date"))
            .then_some(())
    })
    .await;
    let area = format!("{site}/{}", own.sites[0].areas[0].name);
    let tree = cli(&["tree", &area, "--depth", "1"], site_addr);
    assert!(tree.contains("line-fleet"), "{tree}");
    demo.kill();
}

/// `ferrotwin check` as a plant-config CI job runs it: a good config exits 0 with a summary,
/// a connection tag naming an asset the plant lacks exits 1 naming it; nothing is served and
/// no PLC is contacted (the endpoint is unreachable on purpose).
#[test]
fn check_passes_a_good_config_and_names_what_is_wrong_in_a_bad_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("plant.toml"),
        r#"
version = 1
enterprise = "acme"
[machine_types.press]
ideal_cycle_ms = 1000
[[machine_types.press.sensors]]
name = "temp"
[[sites]]
name = "berlin"
[[sites.areas]]
name = "a"
[[sites.areas.lines]]
name = "l"
machines = [{ name = "p", type = "press" }]
"#,
    )
    .expect("plant");
    let config = |asset: &str| {
        format!(
            r#"
version = 1
plant = "plant.toml"
data_dir = "data"
[[connections]]
protocol = "modbus"
name = "line"
endpoint = "192.0.2.1:502"
[[connections.tags]]
asset = "{asset}"
property = "value"
register = "input"
address = 0
data_type = "f32"
"#
        )
    };
    let good = dir.path().join("good.toml");
    std::fs::write(&good, config("acme/berlin/a/l/p/temp")).expect("good");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .expect("check runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("ok: 6 twins, 1 PLC connection(s)"), "{text}");
    assert!(
        !dir.path().join("data").exists(),
        "check writes no data dir"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, config("acme/berlin/a/l/p/pressure")).expect("bad");
    let out = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .expect("check runs");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("acme/berlin/a/l/p/pressure"), "{err}");
}

/// An OTLP collector: the trace and metrics services of the `opentelemetry-proto`
/// definitions, keeping every request it gets.
#[derive(Clone, Default)]
struct Collector {
    spans: std::sync::Arc<std::sync::Mutex<Vec<otlp::trace::v1::ResourceSpans>>>,
    metrics: std::sync::Arc<std::sync::Mutex<Vec<otlp::metrics::v1::ResourceMetrics>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.spans
            .lock()
            .expect("spans")
            .extend(req.into_inner().resource_spans);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics
            .lock()
            .expect("metrics")
            .extend(req.into_inner().resource_metrics);
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

fn resource_attr(r: Option<&otlp::resource::v1::Resource>, key: &str) -> Option<String> {
    r?.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
            otlp::common::v1::any_value::Value::StringValue(s) => Some(s.clone()),
            _ => None,
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_exports_the_span_of_a_traced_call_and_its_metrics_to_an_otlp_collector() {
    let (collector, at) = start_collector(None).await;
    let dir = tempfile::tempdir().expect("dir");
    let (demo, addrs) = start_demo_with(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{at}")),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300".into()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment.name=test".into(),
            ),
        ],
    );
    let mut c = TwinServiceClient::connect(format!("http://{}", addrs.enterprise))
        .await
        .expect("connect");
    let trace_hex = "0af7651916cd43dd8448eb211c80319c";
    let parent_hex = "b7ad6b7169203331";
    let mut req = tonic::Request::new(pb::BrowseRequest::default());
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_hex}-{parent_hex}-01")
            .parse()
            .expect("ascii"),
    );
    c.browse(req).await.expect("browse");
    let (span, resource) = wait_for(30, "the call's span at the collector", || {
        let got = collector
            .spans
            .lock()
            .expect("spans")
            .iter()
            .find_map(|rs| {
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| &ss.spans)
                    .find_map(|s| {
                        (hex(&s.trace_id) == trace_hex).then(|| (s.clone(), rs.resource.clone()))
                    })
            });
        async move { got }
    })
    .await;
    assert_eq!(span.name, "ferrotwin.v1.TwinService/Browse");
    assert_eq!(hex(&span.parent_span_id), parent_hex);
    assert_eq!(
        span.kind,
        otlp::trace::v1::span::SpanKind::Server as i32,
        "{span:?}"
    );
    assert_eq!(
        resource_attr(resource.as_ref(), "service.name").as_deref(),
        Some("ferrotwin-demo")
    );
    assert_eq!(
        resource_attr(resource.as_ref(), "deployment.environment.name").as_deref(),
        Some("test")
    );
    // The `/metrics` families, over OTLP: readings received, per runtime of the demo.
    let points = wait_for(30, "readings received at the collector", || {
        let got = collector
            .metrics
            .lock()
            .expect("metrics")
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == "ferrotwin_readings_received")
            .filter_map(|m| match m.data.as_ref()? {
                otlp::metrics::v1::metric::Data::Sum(s) => Some(s.data_points.clone()),
                _ => None,
            })
            .flatten()
            .filter(|p| {
                matches!(
                    p.value,
                    Some(otlp::metrics::v1::number_data_point::Value::AsDouble(v)) if v > 0.0
                )
            })
            .collect::<Vec<_>>();
        async move { (!got.is_empty()).then_some(got) }
    })
    .await;
    assert!(
        points
            .iter()
            .all(|p| p.attributes.iter().any(|kv| kv.key == "ferrotwin.node")),
        "{points:?}"
    );
    drop(demo);
}

/// A collector on 127.0.0.1 (over TLS with `tls`), and its address.
async fn start_collector(
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> (Collector, std::net::SocketAddr) {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let at = listener.local_addr().expect("addr");
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        server = server.tls_config(tls).expect("TLS");
    }
    let c = collector.clone();
    tokio::spawn(
        server
            .add_service(TraceServiceServer::new(c.clone()))
            .add_service(MetricsServiceServer::new(c))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    (collector, at)
}

/// A collector behind TLS (`https://`, its private CA named by
/// `OTEL_EXPORTER_OTLP_CERTIFICATE`) gets a traced call's span.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_demo_exports_over_tls_to_a_collector_whose_ca_it_is_given() {
    let certs = tempfile::tempdir().expect("dir");
    let pki = ferrotwin_cli::pki::Pki::create(certs.path()).expect("a CA");
    let server = pki
        .server("collector", &["localhost"])
        .expect("a certificate");
    let identity = tonic::transport::Identity::from_pem(
        std::fs::read(&server.cert).expect("cert"),
        std::fs::read(&server.key).expect("key"),
    );
    let (collector, at) = start_collector(Some(
        tonic::transport::ServerTlsConfig::new().identity(identity),
    ))
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let (demo, addrs) = start_demo_with(
        dir.path(),
        &[
            // The traces' own endpoint only (so no metrics export at all).
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                format!("https://localhost:{}", at.port()),
            ),
            (
                "OTEL_EXPORTER_OTLP_CERTIFICATE",
                pki.ca().display().to_string(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    );
    let mut c = TwinServiceClient::connect(format!("http://{}", addrs.enterprise))
        .await
        .expect("connect");
    let trace_hex = "1af7651916cd43dd8448eb211c80319d";
    let mut req = tonic::Request::new(pb::BrowseRequest::default());
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_hex}-b7ad6b7169203332-01")
            .parse()
            .expect("ascii"),
    );
    c.browse(req).await.expect("browse");
    wait_for(30, "the call's span at the TLS collector", || {
        let got = collector.spans.lock().expect("spans").iter().any(|rs| {
            rs.scope_spans
                .iter()
                .flat_map(|ss| &ss.spans)
                .any(|s| hex(&s.trace_id) == trace_hex)
        });
        async move { got.then_some(()) }
    })
    .await;
    drop(demo);
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
