//! `ferrotwin import` against servers we did not write: the files it writes run as they are,
//! with every discovered variable live in its twin, and writes checked and confirmed.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use ferrotwin_cli::import::{self, Naming};
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::config::SiteConfig;

use crate::common::{get, python_with, start_plant_in, wait_for};

/// A port of 127.0.0.1 free now (a foreign server binds it next; restarted, it binds it
/// again).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port()
}

/// The foreign server `script` (under tests/foreign) on `port` of 127.0.0.1; its stdout
/// lines after `ready` go to the returned receiver. Its stdin stays open: closing it ends it.
fn foreign_server(
    python: &std::path::Path,
    script: &str,
    port: u16,
) -> (Child, std::sync::mpsc::Receiver<String>) {
    let script = format!("{}/foreign/{script}", env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(python)
        .args([script.as_str(), &port.to_string()])
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
    (child, rx)
}

/// The foreign OPC UA plant (tests/foreign/asyncua_plant.py) on `port`, with its endpoint.
fn foreign_plant(
    python: &std::path::Path,
    port: u16,
) -> (Child, String, std::sync::mpsc::Receiver<String>) {
    let (child, rx) = foreign_server(python, "asyncua_plant.py", port);
    (child, format!("opc.tcp://127.0.0.1:{port}/foreign/"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_opcua_server_runs_as_written_with_every_variable_live_and_checked_writes() {
    let Some(python) = python_with("asyncua", "asyncua") else {
        return;
    };
    let port = free_port();
    let (mut server, endpoint, lines) = foreign_plant(&python, port);
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

    // The server's own Bad (BadSensorFailure on the compressor's pressure): Bad in its twin,
    // with its last value; Good again when the server says so.
    let pressure = "acme-corp/lyon/area-1/utilities/compressor/pressure";
    let quality_is = |code: pb::QualityCode| {
        let c = c.clone();
        move || {
            let mut c = c.clone();
            async move {
                let s = get(&mut c, pressure).await.sensor?;
                (s.quality?.code == code as i32 && s.has_value).then_some(())
            }
        }
    };
    let stdin = server.stdin.as_mut().expect("the server's stdin");
    std::io::Write::write_all(stdin, b"fail\n").expect("to the server");
    wait_for(
        20,
        "the pressure Bad as the server says",
        quality_is(pb::QualityCode::Bad),
    )
    .await;
    std::io::Write::write_all(stdin, b"heal\n").expect("to the server");
    wait_for(
        20,
        "the pressure Good again",
        quality_is(pb::QualityCode::Good),
    )
    .await;

    // Link loss: the server goes away; every tag turns Bad, and Good again once it is back
    // on its port, setpoints included.
    drop(server.stdin.take());
    let _ = server.kill();
    let _ = server.wait();
    wait_for(
        30,
        "the oil temperature Bad while the server is gone",
        || {
            let mut c = c.clone();
            async move {
                let q = get(&mut c, temp).await.sensor?.quality?;
                (q.code == pb::QualityCode::Bad as i32).then_some(())
            }
        },
    )
    .await;
    let (mut server, _, _lines) = foreign_plant(&python, port);
    let back = std::time::Instant::now();
    for (asset, _) in tags.iter().filter(|(_, p)| p == "value") {
        wait_for(60, &format!("{asset} Good again"), || {
            let mut c = c.clone();
            let asset = asset.clone();
            async move {
                let q = get(&mut c, &asset).await.sensor?.quality?;
                (q.code == pb::QualityCode::Good as i32).then_some(())
            }
        })
        .await;
    }
    eprintln!(
        "OPC UA (asyncua): every tag Good {:?} after the server was back",
        back.elapsed()
    );

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

/// The foreign Modbus PLC (tests/foreign/pymodbus_plant.py) on `port`.
fn foreign_modbus(
    python: &std::path::Path,
    port: u16,
) -> (Child, std::sync::mpsc::Receiver<String>) {
    foreign_server(python, "pymodbus_plant.py", port)
}

fn stop(mut child: Child) {
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}

/// `ferrotwin import modbus` of a vendor's register map (CSV) for a PLC we did not write
/// (pymodbus): the config runs as written; every value reads as the PLC holds it (f32 with
/// swapped words, scaled and negative i16, i32, a u32 past 16 bits); an unserved register
/// reads Bad; writes are checked, confirmed or refused by the PLC; every tag recovers after
/// the PLC restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_modbus_register_map_reads_exact_values_writes_and_recovers() {
    let Some(python) = python_with("pymodbus", "pymodbus") else {
        return;
    };
    let port = free_port();
    let (plc, lines) = foreign_modbus(&python, port);
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("plant");
    let source = import::modbus::Source {
        map: concat!(env!("CARGO_MANIFEST_DIR"), "/foreign/pymodbus_plant.csv").into(),
        endpoint: format!("127.0.0.1:{port}"),
        unit_id: 1,
        poll_interval_ms: 200,
    };
    let naming = Naming {
        enterprise: "acme".into(),
        site: "Graz".into(),
    };
    let written = import::modbus::import(&source, &naming, &out, false).expect("the import runs");
    // Wrappers: 4 sensors each, Running/GoodCount/RejectCount their state and counters;
    // the boiler: 4 sensors.
    assert_eq!(
        (
            written.machines,
            written.sensors,
            written.tags,
            written.skipped
        ),
        (3, 12, 18, 0)
    );
    let cfg = SiteConfig::load(&written.site).expect("site.toml loads");
    let spec = cfg.load_plant().expect("plant.toml loads");
    assert_eq!(spec.machine_types.len(), 2, "the two wrappers share a type");
    let site = start_plant_in(&spec, &dir.path().join("data"), cfg.options()).await;
    let c = site.client.clone();
    const A: &str = "acme/graz/packaging/line-3/wrapper-a";
    const B: &str = "acme/graz/packaging/line-3/wrapper-b";
    const BOILER: &str = "acme/graz/boiler-house/boiler-1/boiler";
    let good = |s: &pb::SensorState| {
        s.quality.as_ref().map(|q| q.code) == Some(pb::QualityCode::Good as i32)
    };
    let expected = [
        (format!("{A}/filmtension"), 123.5),
        (format!("{A}/motorcurrent"), 15.7),
        (format!("{A}/speedsetpoint"), 180.0),
        (format!("{A}/enable"), 1.0),
        (format!("{B}/filmtension"), 98.25),
        (format!("{B}/motorcurrent"), 20.3),
        (format!("{B}/speedsetpoint"), 150.0),
        (format!("{BOILER}/supplytemp"), -12.5),
        (format!("{BOILER}/steampressure"), 8.25),
        (format!("{BOILER}/locked"), 7.0),
    ];
    let mut worst: f64 = 0.0;
    for (path, want) in &expected {
        let got = wait_for(30, &format!("{path} Good"), || {
            let mut c = c.clone();
            let path = path.clone();
            async move {
                let t = get(&mut c, &path).await;
                let s = t.sensor.as_ref()?;
                (s.has_value && good(s)).then(|| crate::common::float_of(&t))?
            }
        })
        .await;
        let err = (got - want).abs();
        assert!(err < 1e-9, "{path}: {got}, the PLC holds {want}");
        worst = worst.max(err);
    }
    eprintln!("Modbus: {} values exact to {worst:e}", expected.len());
    // The unserved register: Bad, as the PLC's exception says.
    let spare = format!("{BOILER}/spare");
    wait_for(30, "spare Bad", || {
        let mut c = c.clone();
        let spare = spare.clone();
        async move {
            let q = get(&mut c, &spare).await.sensor?.quality?;
            (q.code == pb::QualityCode::Bad as i32).then_some(())
        }
    })
    .await;
    // Machines: state from the Running bit; the counters count from the twin's first
    // reading (70000 and up on the PLC: a wrong word order would count 65536 a part).
    let a = wait_for(30, "wrapper A running and counting", || {
        let mut c = c.clone();
        async move {
            let m = get(&mut c, A).await.machine?;
            (m.state == "running" && m.good_count >= 2).then_some(m)
        }
    })
    .await;
    assert!(a.good_count < 1000 && a.scrap_count == 0, "{a:?}");
    wait_for(30, "wrapper B idle", || {
        let mut c = c.clone();
        async move {
            let m = get(&mut c, B).await.machine?;
            (m.state == "idle" && m.good_count >= 5).then_some(())
        }
    })
    .await;

    // Writes.
    let write = |path: String, kind: pb::value::Kind| {
        let mut c = c.clone();
        async move {
            c.write_property(pb::WritePropertyRequest {
                path,
                property: "value".into(),
                value: Some(pb::Value { kind: Some(kind) }),
                by: "ann".into(),
            })
            .await
        }
    };
    let started = std::time::Instant::now();
    let ok = write(format!("{A}/speedsetpoint"), pb::value::Kind::Int(250))
        .await
        .expect("written")
        .into_inner();
    eprintln!("Modbus write confirmed in {:?}", started.elapsed());
    assert_eq!(ok.result, "confirmed");
    assert!(wait_line(&lines, "write holding 200 250"), "the PLC saw it");
    let err = write(format!("{A}/speedsetpoint"), pb::value::Kind::Int(400))
        .await
        .expect_err("outside the map's range");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("outside its range 0..=300 ppm"),
        "{err:?}"
    );
    let ok = write(format!("{A}/enable"), pb::value::Kind::Bool(false))
        .await
        .expect("written")
        .into_inner();
    assert_eq!(ok.result, "confirmed");
    assert!(wait_line(&lines, "write coil 0 0"));
    let err = write(format!("{BOILER}/locked"), pb::value::Kind::Int(0))
        .await
        .expect_err("the PLC refuses it");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err:?}");
    assert!(wait_line(&lines, "refused holding 310"));
    let mut cc = c.clone();
    let evs = crate::common::events(&mut cc, &format!("{BOILER}/locked")).await;
    assert!(
        evs.iter()
            .any(|e| e.kind == "write" && e.message.contains("refused")),
        "a refused write is an event: {evs:?}"
    );
    let err = write(format!("{A}/filmtension"), pb::value::Kind::Float(1.0))
        .await
        .expect_err("read only");
    assert!(err.message().contains("no connection writes"), "{err:?}");

    // Link loss: every tag goes Bad, and each is Good again once the PLC is back.
    stop(plc);
    let film = format!("{A}/filmtension");
    wait_for(30, "film tension Bad while the PLC is gone", || {
        let mut c = c.clone();
        let film = film.clone();
        async move {
            let q = get(&mut c, &film).await.sensor?.quality?;
            (q.code == pb::QualityCode::Bad as i32).then_some(())
        }
    })
    .await;
    // Back on its port as soon as the port is free again.
    wait_for(30, "the PLC's port free", || async {
        std::net::TcpListener::bind(("127.0.0.1", port))
            .ok()
            .map(drop)
    })
    .await;
    let (plc, _lines) = foreign_modbus(&python, port);
    let back = std::time::Instant::now();
    for (path, _) in &expected {
        wait_for(30, &format!("{path} Good again"), || {
            let mut c = c.clone();
            let path = path.clone();
            async move { get(&mut c, &path).await.sensor.filter(good).map(|_| ()) }
        })
        .await;
    }
    eprintln!(
        "Modbus: every tag Good {:?} after the PLC was back",
        back.elapsed()
    );
    site.rt.shutdown().await;
    stop(plc);
}
