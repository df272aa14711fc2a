//! The `ferrotwin` binary as an operator runs it: the demo, the CLI client against it,
//! `kill -9` of the process followed by a restart on the same data dir, and SIGTERM (the
//! clean stop of containers and systemd). (History across a
//! crash is covered in-process by `tests/e2e/recovery.rs`.)

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;

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
