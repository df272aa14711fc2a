//! Real PLCs into real twins: the simulator's Modbus TCP servers → the Modbus adapter (wired
//! from the runtime's connection config) → twins → gRPC; link loss; write-back.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_adapters::modbus::ModbusConfig;
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_models::{AssetId, AssetPath};
use ferrotwin_proto::v1 as pb;
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::mapping::Mapping;
use ferrotwin_sim::serve::{ServedPlant, wall_clock_now};
use tokio::task::JoinHandle;

use crate::common::*;

/// Two lines of two machines: one PLC (one Modbus server and one connection) per line.
const TWO_LINES: PlantSize = PlantSize {
    sites: 1,
    areas: 1,
    lines: 2,
    machines: 2,
    sensors_per_machine: 0,
};

struct Rig {
    plant: Arc<Mutex<ServedPlant>>,
    /// Every value the simulator served, per sensor, as the f32 its register holds.
    served: Arc<Mutex<HashMap<AssetId, HashSet<u64>>>>,
    stepper: JoinHandle<()>,
    site: Site,
    mapping: Mapping,
    _dir: tempfile::TempDir,
}

async fn rig() -> Rig {
    let spec: PlantSpec = generate(TWO_LINES, 3);
    let plant = ServedPlant::start(&spec, 5, wall_clock_now())
        .await
        .expect("PLCs start");
    let mapping = Mapping::of(&spec).expect("fits");
    let mut opts = options();
    for (i, l) in mapping.lines.iter().enumerate() {
        let mut c = ModbusConfig::from_sim_mapping(
            &format!("line-{i}-plc"),
            &plant.lines()[i].addr.to_string(),
            &mapping.to_toml(),
            &l.line,
        )
        .expect("the simulator's mapping is valid input");
        c.poll_interval_ms = 50;
        c.timeout_ms = 500;
        opts.connections.push(ConnectionConfig::Modbus(c));
    }
    let served: Arc<Mutex<HashMap<AssetId, HashSet<u64>>>> = Arc::default();
    record(&served, plant.last_step());
    let plant = Arc::new(Mutex::new(plant));
    let stepper = {
        let (plant, served) = (plant.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                {
                    let mut p = plant.lock().expect("not poisoned");
                    record(&served, p.step_to(wall_clock_now()));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let dir = tempfile::tempdir().expect("dir");
    let site = start_plant_in(&spec, dir.path(), opts).await;
    Rig {
        plant,
        served,
        stepper,
        site,
        mapping,
        _dir: dir,
    }
}

fn record(served: &Mutex<HashMap<AssetId, HashSet<u64>>>, readings: &[ferrotwin_models::Reading]) {
    let mut s = served.lock().expect("not poisoned");
    for r in readings {
        let v = f64::from(r.value.as_f64() as f32);
        s.entry(r.asset).or_default().insert(v.to_bits());
    }
}

impl Rig {
    /// The first sensor (value tag) of line `i`.
    fn sensor(&self, i: usize) -> String {
        self.mapping.lines[i]
            .tags
            .iter()
            .find(|t| t.property == "value")
            .expect("a sensor")
            .asset
            .clone()
    }

    /// The first machine of line `i`.
    fn machine(&self, i: usize) -> String {
        AssetPath::parse(&self.sensor(i))
            .expect("valid")
            .parent()
            .expect("a machine")
            .to_string()
    }

    fn was_served(&self, sensor: &str, v: f64) -> bool {
        let id = AssetPath::parse(sensor).expect("valid").id();
        self.served
            .lock()
            .expect("not poisoned")
            .get(&id)
            .is_some_and(|s| s.contains(&v.to_bits()))
    }

    async fn stop(self) {
        self.stepper.abort();
        self.site.rt.shutdown().await;
    }
}

fn quality(t: &pb::Twin) -> (pb::QualityCode, String) {
    let q = t
        .sensor
        .as_ref()
        .and_then(|s| s.quality.clone())
        .unwrap_or_default();
    (
        pb::QualityCode::try_from(q.code).unwrap_or_default(),
        q.reason,
    )
}

fn source_ts(t: &pb::Twin) -> i64 {
    t.sensor.as_ref().map_or(0, |s| s.source_ts_us)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_plc_values_reach_the_twins_and_the_grpc_api() {
    let rig = rig().await;
    let sensor = rig.sensor(0);
    let mut c = rig.site.client.clone();
    // Until a sensor's first sample its register holds the PLC's boot value (0); then the
    // twin shows what the simulation served.
    let twin = wait_for(20, "a simulated value in the twin", || {
        let (mut c, sensor, rig) = (c.clone(), sensor.clone(), &rig);
        async move {
            let t = get(&mut c, &sensor).await;
            let v = float_of(&t)?;
            (quality(&t).0 == pb::QualityCode::Good && v != 0.0 && rig.was_served(&sensor, v))
                .then_some(t)
        }
    })
    .await;
    let age_ms = (now().0 - source_ts(&twin)) / 1000;
    assert!(age_ms < 60_000, "source time is the PLC's, {age_ms} ms old");
    // The connections say what they do.
    let list = c
        .list_connections(pb::ListConnectionsRequest {})
        .await
        .expect("list")
        .into_inner()
        .connections;
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|l| l.protocol == "modbus" && l.tags > 0));
    wait_for(20, "both connections connected and reading", || {
        let mut c = c.clone();
        async move {
            let l = c
                .list_connections(pb::ListConnectionsRequest {})
                .await
                .ok()?
                .into_inner()
                .connections;
            l.iter()
                .all(|l| l.link == "connected" && l.received > 0)
                .then_some(())
        }
    })
    .await;
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plc_that_goes_away_turns_its_twins_bad_and_back_while_the_other_line_flows() {
    let rig = rig().await;
    let (lost, other) = (rig.sensor(0), rig.sensor(1));
    let c = rig.site.client.clone();
    for s in [&lost, &other] {
        wait_for(20, "good values on both lines", || {
            let (mut c, s) = (c.clone(), s.clone());
            async move { (quality(&get(&mut c, &s).await).0 == pb::QualityCode::Good).then_some(()) }
        })
        .await;
    }
    assert!(rig.plant.lock().expect("not poisoned").stop_line(0));
    let cut = now().0;
    wait_for(20, "the lost line's twin to turn bad", || {
        let (mut c, s) = (c.clone(), lost.clone());
        async move {
            let (code, reason) = quality(&get(&mut c, &s).await);
            (code == pb::QualityCode::Bad && reason.contains("communication")).then_some(())
        }
    })
    .await;
    // The other PLC's values keep coming, good.
    wait_for(20, "fresh values from the other line", || {
        let (mut c, s) = (c.clone(), other.clone());
        async move {
            let t = get(&mut c, &s).await;
            (quality(&t).0 == pb::QualityCode::Good && source_ts(&t) > cut).then_some(())
        }
    })
    .await;
    let line = AssetPath::parse(&rig.machine(0))
        .expect("valid")
        .parent()
        .expect("line")
        .to_string();
    wait_for(20, "a disconnected event on the line", || {
        let (mut c, line) = (c.clone(), line.clone());
        async move {
            events(&mut c, &line)
                .await
                .iter()
                .any(|e| e.kind == "connection" && e.message.contains("disconnected"))
                .then_some(())
        }
    })
    .await;
    let restart = {
        let mut p = rig.plant.lock().expect("not poisoned");
        // Not awaited under the lock: restart_line binds, which needs no stepping.
        let fut = p.restart_line(0);
        futures_lite_block(fut)
    };
    restart.expect("the PLC comes back on its port");
    let back = now().0;
    wait_for(20, "the lost line's twin good again", || {
        let (mut c, s) = (c.clone(), lost.clone());
        async move {
            let t = get(&mut c, &s).await;
            (quality(&t).0 == pb::QualityCode::Good && source_ts(&t) > back).then_some(())
        }
    })
    .await;
    rig.stop().await;
}

/// Runs a future that does not need the runtime's other tasks to progress (a bind loop) to
/// completion on this thread.
fn futures_lite_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setpoints_written_over_grpc_reach_the_simulated_machine() {
    let rig = rig().await;
    let machine = rig.machine(0);
    let machine_id = AssetPath::parse(&machine).expect("valid").id();
    let mut c = rig.site.client.clone();
    wait_for(20, "the connection up", || {
        let mut c = c.clone();
        async move {
            let l = c
                .list_connections(pb::ListConnectionsRequest {})
                .await
                .ok()?
                .into_inner()
                .connections;
            l.iter().all(|l| l.link == "connected").then_some(())
        }
    })
    .await;
    let write = |property: &str, value: pb::value::Kind| pb::WritePropertyRequest {
        path: machine.clone(),
        property: property.into(),
        value: Some(pb::Value { kind: Some(value) }),
        by: "ann".into(),
    };
    let r = c
        .write_property(write("speed_setpoint_pct", pb::value::Kind::Int(150)))
        .await
        .expect("written")
        .into_inner();
    assert_eq!(r.connection, "line-0-plc");
    wait_for(20, "the simulated machine at 150 %", || {
        let plant = rig.plant.clone();
        async move {
            (plant
                .lock()
                .expect("not poisoned")
                .sim()
                .speed_pct(machine_id)
                == Some(150))
            .then_some(())
        }
    })
    .await;
    // Stopping the machine over the run-enable coil shows in its next state reading.
    c.write_property(write("run_enable", pb::value::Kind::Bool(false)))
        .await
        .expect("written");
    wait_for(30, "the machine twin idle", || {
        let (mut c, m) = (c.clone(), machine.clone());
        async move {
            let t = get(&mut c, &m).await;
            (t.machine.as_ref()?.state == "idle").then_some(())
        }
    })
    .await;
    // Refusals come back with the reason.
    let err = c
        .write_property(write("speed_setpoint_pct", pb::value::Kind::Int(999)))
        .await
        .expect_err("out of range");
    assert!(
        matches!(
            err.code(),
            tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
        ),
        "{err}"
    );
    let err = c
        .write_property(write("state", pb::value::Kind::Int(1)))
        .await
        .expect_err("not writable");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let err = c
        .write_property(pb::WritePropertyRequest {
            path: "acme/nowhere".into(),
            ..write("speed_setpoint_pct", pb::value::Kind::Int(100))
        })
        .await
        .expect_err("no such asset");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    // Every write is an event with who wrote it.
    let evs = events(&mut c, &machine).await;
    let writes: Vec<_> = evs.iter().filter(|e| e.kind == "write").collect();
    assert!(
        writes
            .iter()
            .any(|e| e.message.contains("speed_setpoint_pct = 150") && e.message.contains("ann")),
        "{writes:?}"
    );
    rig.stop().await;
}
