//! Shared helpers: a small plant, a runtime on a temp dir with gRPC on 127.0.0.1:0, a client,
//! and condition waits with timeouts (never fixed sleeps).

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetPath, Property, PushBackReason, Reading, Timestamp, Value};
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;
use ferrotwin_runtime::{Runtime, RuntimeOptions};
use tonic::transport::Channel;

/// One line with one press (temp with a high alarm, force) and one oven.
pub const PLANT: &str = r#"
version = 1
enterprise = "acme"

[machine_types.press]
ideal_cycle_ms = 1000
[[machine_types.press.sensors]]
name = "temp"
kind = "temperature"
unit = "degC"
min = -50.0
max = 300.0
period_ms = 100
alarms = [{ name = "high", kind = "high", limit = 90.0, deadband = 5.0, severity = "high" }]
[[machine_types.press.sensors]]
name = "force"
unit = "kN"
period_ms = 100
[[machine_types.press.sensors]]
name = "count"
value_type = "int"
period_ms = 100

[machine_types.oven]
ideal_cycle_ms = 60000
[[machine_types.oven.sensors]]
name = "zone-temp"
unit = "degC"
period_ms = 100

[[sites]]
name = "berlin"
[[sites.areas]]
name = "assembly"
[[sites.areas.lines]]
name = "line-1"
machines = [{ name = "press-1", type = "press" }, { name = "oven-1", type = "oven" }]
"#;

pub const TEMP: &str = "acme/berlin/assembly/line-1/press-1/temp";
pub const FORCE: &str = "acme/berlin/assembly/line-1/press-1/force";
pub const COUNT: &str = "acme/berlin/assembly/line-1/press-1/count";
pub const PRESS: &str = "acme/berlin/assembly/line-1/press-1";

/// A generated plant of two lines of two machines: one PLC (one Modbus server and one
/// connection) per line.
pub const TWO_LINES: ferrotwin_sim::generate::PlantSize = ferrotwin_sim::generate::PlantSize {
    sites: 1,
    areas: 1,
    lines: 2,
    machines: 2,
    sensors_per_machine: 0,
};

pub fn spec() -> PlantSpec {
    PlantSpec::from_toml(PLANT, "test plant").expect("test plant is valid")
}

/// Options for tests: fast flushes, small history chunks, fast staleness sweeps.
pub fn options() -> RuntimeOptions {
    let mut o = RuntimeOptions::default();
    o.store.flush_interval_ms = 20;
    o.store.snapshot_interval_ms = 20;
    o.twins.history_chunk_points = 4;
    o.twins.rollup_debounce_ms = 20;
    o.ingest.stale_sweep_ms = 50;
    o
}

pub struct Site {
    pub rt: Runtime,
    pub client: TwinServiceClient<Channel>,
    pub addr: std::net::SocketAddr,
}

pub async fn start_in(dir: &Path, opts: RuntimeOptions) -> Site {
    start_plant_in(&spec(), dir, opts).await
}

pub async fn start_plant_in(spec: &PlantSpec, dir: &Path, opts: RuntimeOptions) -> Site {
    let rt = Runtime::start(spec, dir, opts)
        .await
        .expect("runtime starts");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.serve_grpc(listener).expect("serve");
    let client = TwinServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("connect");
    Site { rt, client, addr }
}

pub fn path(s: &str) -> AssetPath {
    AssetPath::parse(s).expect("test path")
}

pub fn now() -> Timestamp {
    Timestamp::now()
}

pub fn float(p: &str, v: f64) -> Reading {
    Reading::good(path(p).id(), Property::Value, Value::Float(v), now())
}

/// Pushes readings through the real router, waiting while it pushes back. A closed router
/// fails the test at once (waiting would never end).
pub async fn push(site: &Site, readings: Vec<Reading>) {
    let router = site.rt.ingest();
    let mut batch = readings;
    loop {
        match router.try_push(batch) {
            Ok(()) => return,
            Err(pb) if pb.why == PushBackReason::Busy => {
                batch = pb.batch;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(pb) => panic!(
                "the router refused {} readings: {:?}",
                pb.batch.len(),
                pb.why
            ),
        }
    }
}

/// Waits until the runtime's first PLC connection satisfies `ok` (its link, its counters).
pub async fn wait_first_connection(
    client: &TwinServiceClient<Channel>,
    what: &str,
    ok: impl Fn(&pb::Connection) -> bool,
) {
    wait_for(20, what, || {
        let mut c = client.clone();
        let ok = &ok;
        async move {
            let l = c
                .list_connections(pb::ListConnectionsRequest {})
                .await
                .ok()?
                .into_inner();
            ok(l.connections.first()?).then_some(())
        }
    })
    .await;
}

/// Waits until `check` returns Some, polling, at most `secs` seconds.
pub async fn wait_for<T, F, Fut>(secs: u64, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn get(client: &mut TwinServiceClient<Channel>, p: &str) -> pb::Twin {
    client
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(p.to_string())),
        })
        .await
        .expect("get_twin")
        .into_inner()
}

/// Waits until the twin at `p` holds the float `v`, at most `secs` seconds.
pub async fn wait_float(
    client: &TwinServiceClient<Channel>,
    p: &str,
    v: f64,
    secs: u64,
    what: &str,
) {
    wait_for(secs, what, || {
        let mut c = client.clone();
        async move { (float_of(&get(&mut c, p).await) == Some(v)).then_some(()) }
    })
    .await;
}

pub fn float_of(t: &pb::Twin) -> Option<f64> {
    match t.sensor.as_ref()?.value.as_ref()?.kind.as_ref()? {
        pb::value::Kind::Float(f) => Some(*f),
        pb::value::Kind::Int(i) => Some(*i as f64),
        pb::value::Kind::Bool(b) => Some(f64::from(u8::from(*b))),
    }
}

pub fn alarm_state(t: &pb::Twin, name: &str) -> pb::AlarmState {
    let a = t
        .sensor
        .as_ref()
        .and_then(|s| s.alarms.iter().find(|a| a.name == name))
        .expect("alarm exists");
    pb::AlarmState::try_from(a.state).expect("known state")
}

/// Events under `path`, all of them.
pub async fn events(client: &mut TwinServiceClient<Channel>, p: &str) -> Vec<pb::Event> {
    client
        .list_events(pb::ListEventsRequest {
            path: p.to_string(),
            limit: 10_000,
            ..Default::default()
        })
        .await
        .expect("list_events")
        .into_inner()
        .events
}

/// A raw batch `seq` that says it follows `after`, its events following site event
/// `events_after`, with lifecycle events (seq, message) on TEMP.
pub fn raw_batch(
    seq: u64,
    after: u64,
    events_after: u64,
    evs: &[(u64, &str)],
) -> pb::ReplicateRequest {
    use prost::Message as _;
    let b = ferrotwin_proto::store::v1::OutboxBatch {
        seq,
        created_us: now().0,
        events_after,
        events: evs
            .iter()
            .map(|(s, m)| ferrotwin_proto::store::v1::OutboxEvent {
                seq: *s,
                event: Some(ferrotwin_proto::store::v1::EventRecord {
                    path: TEMP.into(),
                    ts_us: now().0,
                    kind: "lifecycle".into(),
                    severity: 0,
                    alarm: String::new(),
                    message: (*m).into(),
                    episode: 0,
                }),
            })
            .collect(),
        ..Default::default()
    };
    pb::ReplicateRequest {
        msg: Some(pb::replicate_request::Msg::Batch(pb::SiteBatch {
            seq,
            batch: b.encode_to_vec(),
            after,
            traceparent: String::new(),
        })),
    }
}

/// A replication batch `seq` (following `seq - 1`) carrying one lifecycle event `event_seq`
/// on TEMP.
pub fn batch_with_event(seq: u64, event_seq: u64, message: &str) -> pb::ReplicateRequest {
    raw_batch(seq, seq.saturating_sub(1), 0, &[(event_seq, message)])
}

/// A tool found on PATH, or `None` with a loud skip (a failure on CI, where `.ci/run`
/// installs it).
pub fn tool(name: &str, install: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{name} is missing on CI: .ci/run must install it ({install})"
        );
        eprintln!("skipped: {name} not found; install it with `{install}`");
    }
    found
}

/// Python 3 with the module `module` (PyPI `package`, installed by `.ci/run`), or `None` with
/// a loud skip (a failure on CI).
pub fn python_with(module: &str, package: &str) -> Option<std::path::PathBuf> {
    let python = tool("python3", "apt-get install -y python3")?;
    let has_module = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .status()
        .is_ok_and(|s| s.success());
    if !has_module {
        assert!(
            std::env::var_os("CI").is_none(),
            "{module} is missing on CI: .ci/run must install it (pip install {package})"
        );
        eprintln!("skipped: {module} not found; pip install {package}");
        return None;
    }
    Some(python)
}

pub fn run_tool(cmd: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .expect("tool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs `attempt` again, up to 10 times 500 ms apart, while the enterprise refuses it because
/// the site's previous replication stream is still letting go (as a site's sender retries;
/// a loaded machine may take longer than the enterprise's 3 s wait).
pub async fn retry_while_stream_busy<T, F, Fut>(mut attempt: F) -> Result<T, tonic::Status>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, tonic::Status>>,
{
    for _ in 0..10 {
        match attempt().await {
            Err(e)
                if e.code() == tonic::Code::Unavailable
                    && e.message()
                        .contains("already has an open replication stream") =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            r => return r,
        }
    }
    attempt().await
}

/// Debian's mosquitto, started on a free loopback port with the config `conf` (the port is
/// filled in); killed on drop.
pub struct Mosquitto {
    child: std::process::Child,
    pub port: u16,
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn mosquitto(bin: &Path, dir: &Path, conf: &str) -> Mosquitto {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("addr").port()
    };
    let file = dir.join("mosquitto.conf");
    std::fs::write(&file, format!("listener {port} 127.0.0.1\n{conf}")).expect("conf");
    let child = std::process::Command::new(bin)
        .arg("-c")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("mosquitto.log")).expect("log"))
        .spawn()
        .expect("mosquitto starts");
    let m = Mosquitto { child, port };
    wait_for(20, "mosquitto to listen", || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
    })
    .await;
    m
}
