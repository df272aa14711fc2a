//! `ferrotwin import` against servers we did not write: the files it writes run as they are,
//! with every discovered variable live in its twin, and writes checked and confirmed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use ferrotwin_cli::import::{self, Naming};
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::config::SiteConfig;

use crate::common::{get, python_with, start_plant_in, wait_for};

/// The foreign plant server (tests/foreign/asyncua_plant.py) on a free port; its stdout
/// lines after `ready` go to the returned receiver.
fn foreign_plant(python: &std::path::Path) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/foreign/asyncua_plant.py");
    let mut child = Command::new(python)
        .args([script, &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("python starts");
    let out = BufReader::new(child.stdout.take().expect("stdout"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let ready = rx
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the server says ready");
    assert!(ready.starts_with("ready"), "{ready}");
    (child, format!("opc.tcp://127.0.0.1:{port}/foreign/"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_opcua_server_runs_as_written_with_every_variable_live_and_checked_writes() {
    let Some(python) = python_with("asyncua", "asyncua") else {
        return;
    };
    let (mut server, endpoint, lines) = foreign_plant(&python);
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("lyon");
    let source = import::opcua::Source {
        endpoint: endpoint.clone(),
        user: None,
        timeout_ms: 5000,
    };
    let naming = Naming {
        enterprise: "ACME Corp".into(),
        site: "Lyon".into(),
    };
    let written = import::opcua::import(&source, &naming, &out, false)
        .await
        .expect("the import runs");
    assert_eq!(
        (
            written.machines,
            written.sensors,
            written.tags,
            written.skipped
        ),
        (3, 8, 12, 3)
    );
    let site_text = std::fs::read_to_string(&written.site).expect("site.toml");
    for skipped in ["Press_01/Serial", "Compressor/Curve (", "Double[]"] {
        assert!(
            site_text.contains(skipped),
            "{skipped} not named:\n{site_text}"
        );
    }
    // A second import into the same directory does not overwrite it.
    let again = import::opcua::import(&source, &naming, &out, false).await;
    assert!(
        again
            .err()
            .expect("refused")
            .to_string()
            .contains("--force"),
        "an existing plant.toml is kept"
    );

    // The files as written, started as `ferrotwin run` starts them (data dir and listeners
    // aside).
    let cfg = SiteConfig::load(&written.site).expect("site.toml loads");
    let spec = cfg.load_plant().expect("plant.toml loads");
    let site = start_plant_in(&spec, &dir.path().join("data"), cfg.options()).await;
    let mut c = site.client.clone();
    let tags: Vec<(String, String)> = cfg.connections[0]
        .targets()
        .expect("tags")
        .iter()
        .map(|t| (t.asset.to_string(), t.property_name().to_string()))
        .collect();
    assert_eq!(tags.len(), 12);
    // Every sensor twin has a Good value of the server's (moving ones move).
    for (asset, property) in tags.iter().filter(|(_, p)| p == "value") {
        wait_for(30, &format!("{asset} live"), || {
            let mut c = c.clone();
            let asset = asset.clone();
            async move {
                let s = get(&mut c, &asset).await.sensor?;
                (s.has_value && s.quality?.code == pb::QualityCode::Good as i32).then_some(())
            }
        })
        .await;
        assert_eq!(property, "value");
    }
    let temp = "acme-corp/lyon/hall-2/line-a/press-01/oiltemp";
    let first = crate::common::float_of(&get(&mut c, temp).await).expect("a value");
    wait_for(20, "the oil temperature moving", || {
        let mut c = c.clone();
        async move { crate::common::float_of(&get(&mut c, temp).await).filter(|v| *v > first) }
    })
    .await;
    // Units as the server declares them (ranges: the writes below).
    let s = get(&mut c, temp).await.sensor.expect("a sensor");
    assert_eq!(s.unit, "degC");
    // Machines: running from the `Running` bool, counting from `PartsGood`.
    for press in ["press-01", "press-02"] {
        let path = format!("acme-corp/lyon/hall-2/line-a/{press}");
        wait_for(30, &format!("{press} running and counting"), || {
            let mut c = c.clone();
            let path = path.clone();
            async move {
                let m = get(&mut c, &path).await.machine?;
                (m.state == "running" && m.good_count > 0).then_some(())
            }
        })
        .await;
    }

    // Writes: within the server's EURange, confirmed, and the server sees it.
    let write = |path: &'static str, kind: pb::value::Kind| {
        let mut c = c.clone();
        async move {
            c.write_property(pb::WritePropertyRequest {
                path: path.into(),
                property: "value".into(),
                value: Some(pb::Value { kind: Some(kind) }),
                by: "ann".into(),
            })
            .await
        }
    };
    let speed = "acme-corp/lyon/hall-2/line-a/press-01/speedsp";
    let started = std::time::Instant::now();
    let ok = write(speed, pb::value::Kind::Int(120))
        .await
        .expect("written")
        .into_inner();
    eprintln!("OPC UA write confirmed in {:?}", started.elapsed());
    assert_eq!(ok.result, "confirmed");
    let seen = wait_line(&lines, "Press_01.SpeedSP 120");
    assert!(seen, "the server saw the write");
    wait_for(20, "the written setpoint in its twin", || {
        let mut c = c.clone();
        async move { (crate::common::float_of(&get(&mut c, speed).await)? == 120.0).then_some(()) }
    })
    .await;
    // Outside the EURange: refused before the server sees anything.
    let err = write(speed, pb::value::Kind::Int(500))
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("outside its range 0..=150 %"),
        "{err:?}"
    );
    // A bool where the variable is an int: refused too.
    let err = write(speed, pb::value::Kind::Bool(true))
        .await
        .expect_err("refused");
    assert!(
        err.message().contains("a bool where speedsp takes an int"),
        "{err:?}"
    );
    // A writable bool of a machine without any range.
    let enable = "acme-corp/lyon/area-1/utilities/compressor/enable";
    let ok = write(enable, pb::value::Kind::Bool(false))
        .await
        .expect("written")
        .into_inner();
    assert_eq!(ok.result, "confirmed");
    assert!(wait_line(&lines, "Compressor.Enable False"));
    // A read-only variable is not writable.
    let err = write(temp, pb::value::Kind::Float(50.0))
        .await
        .expect_err("refused");
    assert!(err.message().contains("no connection writes"), "{err:?}");
    assert!(!wait_line_for(
        &lines,
        "500",
        std::time::Duration::from_millis(300)
    ));

    site.rt.shutdown().await;
    drop(server.stdin.take());
    let _ = server.kill();
    let _ = server.wait();
}

/// Whether the server prints a line containing `what` within 10 s.
fn wait_line(lines: &std::sync::mpsc::Receiver<String>, what: &str) -> bool {
    wait_line_for(lines, what, std::time::Duration::from_secs(10))
}

fn wait_line_for(
    lines: &std::sync::mpsc::Receiver<String>,
    what: &str,
    limit: std::time::Duration,
) -> bool {
    let end = std::time::Instant::now() + limit;
    while let Some(left) = end.checked_duration_since(std::time::Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(l) if l.contains(what) => return true,
            Ok(_) => {}
            Err(_) => return false,
        }
    }
    false
}

/// `ferrotwin import sparkplug` listening to an edge node that is not ours (pysparkplug on
/// Debian's mosquitto): every metric of its births becomes a twin property, and the site
/// config runs as written with every metric live once the node births again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_sparkplug_group_runs_as_written_with_every_metric_live() {
    let (Some(broker_bin), Some(python)) = (
        crate::common::tool("mosquitto", "apt-get install -y mosquitto"),
        python_with("pysparkplug", "pysparkplug"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let broker = crate::common::mosquitto(&broker_bin, dir.path(), "allow_anonymous true\n").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/foreign/sparkplug_edge.py");
    let node = |log: &str| {
        Command::new(&python)
            .args([script, "127.0.0.1", &broker.port.to_string(), "60"])
            .stdin(Stdio::piped())
            .stdout(std::fs::File::create(dir.path().join(log)).expect("log"))
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the edge node starts")
    };
    let out = dir.path().join("plant1");
    let source = import::sparkplug::Source {
        broker: format!("mqtt://127.0.0.1:{}", broker.port),
        group: "Plant1".into(),
        user: None,
        seconds: 6,
    };
    let naming = Naming {
        enterprise: "acme".into(),
        site: "hamburg".into(),
    };
    let listening = tokio::spawn({
        let (source, naming, out) = (source.clone(), naming.clone(), out.clone());
        async move { import::sparkplug::import(&source, &naming, &out, false).await }
    });
    // The node births while the import listens (it does not answer rebirth requests).
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut first = node("edge-1.log");
    let written = listening.await.expect("joined").expect("the import runs");
    drop(first.stdin.take());
    let _ = first.wait();
    // Filler: Temperature, Speed (sensors), Running (state); Serial (Int32) a sensor too;
    // the node's own Line/Throughput and Line/Enable: sensors of a machine named Edge1.
    assert_eq!(
        (written.machines, written.sensors, written.tags),
        (2, 5, 6),
        "{}",
        std::fs::read_to_string(&written.site).unwrap_or_default()
    );
    let cfg = SiteConfig::load(&written.site).expect("site.toml loads");
    let spec = cfg.load_plant().expect("plant.toml loads");
    let site = start_plant_in(&spec, &dir.path().join("data"), cfg.options()).await;
    crate::common::wait_first_connection(&site.client, "the adapter connected", |c| {
        c.link == "connected"
    })
    .await;
    let mut second = node("edge-2.log");
    let c = site.client.clone();
    for asset in [
        "acme/hamburg/plant1/edge1/filler/temperature",
        "acme/hamburg/plant1/edge1/filler/speed",
        "acme/hamburg/plant1/edge1/filler/serial",
        "acme/hamburg/plant1/edge1/edge1/line-throughput",
        "acme/hamburg/plant1/edge1/edge1/line-enable",
    ] {
        wait_for(30, &format!("{asset} live"), || {
            let mut c = c.clone();
            async move {
                let s = get(&mut c, asset).await.sensor?;
                (s.has_value && s.quality?.code == pb::QualityCode::Good as i32).then_some(())
            }
        })
        .await;
    }
    let filler = "acme/hamburg/plant1/edge1/filler";
    wait_for(30, "the filler running", || {
        let mut c = c.clone();
        async move { (get(&mut c, filler).await.machine?.state == "running").then_some(()) }
    })
    .await;
    site.rt.shutdown().await;
    drop(second.stdin.take());
    let _ = second.wait();
}
