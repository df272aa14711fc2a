//! Local inference end to end: a simulated plant runs accelerated through a real runtime
//! (router → sensor twins → machine twins with their detectors → events in the store → gRPC).

use std::path::Path;

use ferrotwin_cli::eval::{anomaly_episodes, drive};
use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{Level, Timestamp};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::{FaultKind, PlantSim};
use ferrotwin_sim::scenario::Scenario;

use ferrotwin_runtime::{TwinState, testing};

use crate::common::{get, now, options, start_plant_in, wait_for};

const HOUR_US: i64 = 3_600_000_000;

fn machines(spec: &PlantSpec) -> Vec<String> {
    spec.assets()
        .into_iter()
        .filter(|a| a.path.level() == Level::Machine)
        .filter(|a| matches!(&a.kind, AssetKind::Machine { .. }))
        .map(|a| a.path.to_string())
        .collect()
}

fn under(asset: &str, machine: &str) -> bool {
    asset == machine || asset.starts_with(&format!("{machine}/"))
}

/// One line of three machines; the first one's bearing wears out over 8 simulated hours
/// from 1 h after the start. No random faults: the others are healthy.
fn bearing_plant() -> (PlantSpec, Scenario, Vec<String>) {
    let spec = generate(PlantSize::ONE_LINE, 7);
    let ms = machines(&spec);
    let text = format!(
        "version = 1\nrandom_faults = false\n[[faults]]\nasset = \"{}\"\nkind = \"bearing_wear\"\nat = \"1h\"\nduration = \"8h\"\n",
        ms[0]
    );
    let scenario =
        Scenario::from_toml(&text, Path::new("bearing.toml"), &spec).expect("scenario is valid");
    (spec, scenario, ms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wearing_bearing_lowers_health_sets_rul_and_raises_an_anomaly_before_the_failure() {
    let (spec, scenario, ms) = bearing_plant();
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_plant_in(&spec, dir.path(), options()).await;
    // Simulated time ends 3 h before the breakdown (which comes 9 h after the start): the
    // wear is well on its way, the bearing has not failed yet.
    let end = Timestamp(now().0 / 1_000_000 * 1_000_000);
    let failure = Timestamp(end.0 + 3 * HOUR_US);
    let start = Timestamp(failure.0 - 9 * HOUR_US);
    let sim = PlantSim::with_scenario(&spec, 7, start, &scenario);
    let (sim, readings) = drive(&site.rt, sim, end, 1000, 1000).await.expect("drive");
    assert!(readings > 100_000, "the plant produced {readings} readings");
    let label = sim
        .final_labels()
        .into_iter()
        .find(|l| l.kind == FaultKind::BearingWear)
        .expect("the scenario's bearing wear is labelled");
    assert_eq!(label.asset.as_str(), ms[0]);

    let episodes = anomaly_episodes(&site.rt).await.expect("events");
    let worn: Vec<_> = episodes
        .iter()
        .filter(|d| under(d.asset.as_str(), &ms[0]))
        .collect();
    let first = worn
        .iter()
        .map(|d| d.start)
        .min()
        .expect("the worn machine raised an anomaly");
    // Raised by the wear (not a warm-up false alarm before it began), before the failure.
    assert!(
        first >= label.start && first < failure,
        "anomaly at {first}; the wear began at {}, the failure is at {failure}",
        label.start
    );
    for healthy in &ms[1..] {
        let raised: Vec<_> = episodes
            .iter()
            .filter(|d| under(d.asset.as_str(), healthy))
            .map(|d| format!("{} {} at {}", d.asset, d.detector, d.start))
            .collect();
        assert!(
            raised.is_empty(),
            "healthy machine {healthy} raised anomalies: {raised:?}"
        );
    }

    let mut client = site.client.clone();
    let worn_twin = get(&mut client, &ms[0]).await;
    let m = worn_twin.machine.expect("machine state");
    let health = m.health.expect("health is known after hours of running");
    assert!(health < 80.0, "health of the worn machine is {health}");
    let rul = m
        .rul_hours
        .expect("RUL is set on a clear degradation trend");
    assert!(rul.is_finite() && rul >= 0.0, "RUL {rul} h");
    eprintln!(
        "worn machine at 3 h before failure: health {health:.1}, RUL {rul:.2} h [{:?}, {:?}], first anomaly {:.2} h before failure",
        m.rul_low_hours,
        m.rul_high_hours,
        (failure.0 - first.0) as f64 / HOUR_US as f64
    );
    let healthy_twin = get(&mut client, &ms[1]).await;
    let h = healthy_twin
        .machine
        .expect("machine state")
        .health
        .expect("health of the healthy machine");
    assert!(h > health, "healthy {h} vs worn {health}");
    // Roll-up: the line shows the worst health below it.
    let line = ms[0].rsplit_once('/').expect("machine has a line").0;
    let worst = get(&mut client, line)
        .await
        .rollup
        .expect("line roll-up")
        .worst_health
        .expect("line knows its worst health");
    assert!(
        (worst - health).abs() < 1.0,
        "line worst {worst}, machine {health}"
    );
    site.rt.shutdown().await;
}

/// Encoded learned state of a machine twin's detectors, as its snapshot holds it.
fn learned(site: &crate::common::Site, machine: &str) -> Vec<u8> {
    let snapshot =
        testing::snapshot(&site.rt, &crate::common::path(machine)).expect("machine is known");
    let TwinState::Machine(m) = &snapshot.state else {
        panic!("{machine} is not a machine twin");
    };
    let mut bytes = Vec::new();
    m.detector
        .as_ref()
        .expect("machine detectors are on by default")
        .encode(&mut bytes);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_machine_twin_keeps_what_its_detectors_learned() {
    let spec = generate(PlantSize::ONE_LINE, 7);
    let ms = machines(&spec);
    let scenario = Scenario {
        random_faults: false,
        ..Scenario::default()
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_plant_in(&spec, dir.path(), options()).await;
    let end = Timestamp(now().0 / 1_000_000 * 1_000_000);
    let start = Timestamp(end.0 - 6 * HOUR_US);
    let sim = PlantSim::with_scenario(&spec, 7, start, &scenario);
    drive(&site.rt, sim, end, 1000, 1000).await.expect("drive");
    // Six hours of running: the detectors learned and the health index is known.
    // `drive` returns once every reading is taken; the sensors' last drains may still send
    // the machine an `Evaluate`. Wait until those landed, then compare what the twin knows
    // before and after.
    site.rt.settle().await;
    let before = learned(&site, &ms[0]);
    let mut client = site.client.clone();
    let health = get(&mut client, &ms[0])
        .await
        .machine
        .expect("machine")
        .health;
    assert!(health.is_some(), "health after six hours");

    // A crash: the parent restarts the twin from its last published snapshot.
    assert!(
        testing::crash(&site.rt, &crate::common::path(&ms[0])),
        "machine twin runs"
    );
    wait_for(10, "machine twin restarted", || async {
        let t = get(&mut client.clone(), &ms[0]).await;
        (t.restarts == 1).then_some(())
    })
    .await;
    assert_eq!(learned(&site, &ms[0]), before, "state after a crash");
    let after_crash = get(&mut client, &ms[0]).await.machine.expect("machine");
    assert_eq!(after_crash.health, health, "health after a crash");

    // A clean stop and start on the same data dir: restored from the store.
    site.rt.shutdown().await;
    let site = start_plant_in(&spec, dir.path(), options()).await;
    assert_eq!(learned(&site, &ms[0]), before, "state after a restart");
    let mut client = site.client.clone();
    let restored = get(&mut client, &ms[0]).await.machine.expect("machine");
    assert_eq!(restored.health, health, "health after a restart");
    site.rt.shutdown().await;
}

/// A press whose type names the in-repo ONNX model `window_score.onnx` (16 samples of 3
/// inputs → the largest |z| of the newest sample against the 15 before it).
fn model_plant(model_file: &str) -> PlantSpec {
    let text = format!(
        r#"
version = 1
enterprise = "acme"
[machine_types.press]
ideal_cycle_ms = 1000
[[machine_types.press.sensors]]
name = "temp"
[[machine_types.press.sensors]]
name = "force"
[[machine_types.press.sensors]]
name = "speed"
[machine_types.press.model]
file = "{model_file}"
inputs = ["temp", "force", "speed"]
window = 16
threshold = 3.0
[[sites]]
name = "berlin"
[[sites.areas]]
name = "assembly"
[[sites.areas.lines]]
name = "line-1"
machines = [{{ name = "press-1", type = "press" }}]
"#
    );
    PlantSpec::from_toml(&text, "model plant").expect("model plant is valid")
}

fn models_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../runtime/tests/models")
}

const PRESS_1: &str = "acme/berlin/assembly/line-1/press-1";

/// Pushes one reading per sensor of press-1 at `ts` and waits until the three twins hold it.
async fn press_round(site: &crate::common::Site, ts: Timestamp, temp: f64) {
    let rs = [("temp", temp), ("force", 5.0), ("speed", 100.0)].map(|(s, v)| {
        ferrotwin_models::Reading::good(
            crate::common::path(&format!("{PRESS_1}/{s}")).id(),
            ferrotwin_models::Property::Value,
            ferrotwin_models::Value::Float(v),
            ts,
        )
    });
    crate::common::push(site, rs.to_vec()).await;
    wait_for(10, "the round applied", || async move {
        ["temp", "force", "speed"]
            .iter()
            .all(|s| {
                let snapshot =
                    testing::snapshot(&site.rt, &crate::common::path(&format!("{PRESS_1}/{s}")))
                        .expect("sensor");
                matches!(&snapshot.state, TwinState::Sensor(x) if x.source_ts == ts)
            })
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_types_onnx_model_scores_its_sensor_window_and_raises_a_model_anomaly() {
    let spec = model_plant("window_score.onnx");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.plant_dir = Some(models_dir());
    let site = start_plant_in(&spec, dir.path(), opts).await;
    assert!(
        site.rt.model_errors().is_empty(),
        "{:?}",
        site.rt.model_errors()
    );
    let t0 = Timestamp(now().0 - 120_000_000);
    // A flat window scores about 0; one step in temp scores far above the threshold.
    for k in 0..20 {
        press_round(&site, Timestamp(t0.0 + k * 1_000_000), 50.0).await;
    }
    let mut client = site.client.clone();
    let flat = wait_for(10, "a model score", || {
        let mut c = client.clone();
        async move { get(&mut c, PRESS_1).await.machine?.model_score }
    })
    .await;
    assert!(flat < 3.0, "flat window scored {flat}");
    // The newest sample is scored against the 15 before it: the step's own round.
    press_round(&site, Timestamp(t0.0 + 20 * 1_000_000), 80.0).await;
    let stepped = wait_for(10, "the step's score", || {
        let mut c = client.clone();
        async move {
            get(&mut c, PRESS_1)
                .await
                .machine?
                .model_score
                .filter(|s| *s > 3.0)
        }
    })
    .await;
    assert!(stepped.is_finite(), "step scored {stepped}");
    let ev = wait_for(10, "a model anomaly event", || {
        let mut c = client.clone();
        async move {
            crate::common::events(&mut c, PRESS_1)
                .await
                .into_iter()
                .find(|e| e.kind == "anomaly" && e.alarm == "model")
        }
    })
    .await;
    assert!(ev.message.contains("model detector"), "{}", ev.message);
    assert_eq!(get(&mut client, PRESS_1).await.path, PRESS_1);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_of_the_wrong_shape_is_an_error_naming_file_type_and_shapes_and_the_machine_runs_without_it()
 {
    let spec = model_plant("bad_input_rank.onnx");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.plant_dir = Some(models_dir());
    let site = start_plant_in(&spec, dir.path(), opts).await;
    assert_eq!(
        site.rt.model_errors().len(),
        1,
        "{:?}",
        site.rt.model_errors()
    );
    let err = &site.rt.model_errors()[0];
    for part in ["bad_input_rank.onnx", "\"press\"", "[16, 3]", "[1, 16, 3]"] {
        assert!(err.contains(part), "{part:?} missing in: {err}");
    }
    let t0 = Timestamp(now().0 - 60_000_000);
    for k in 0..3 {
        press_round(&site, Timestamp(t0.0 + k * 1_000_000), 50.0).await;
    }
    let mut client = site.client.clone();
    let m = get(&mut client, PRESS_1).await.machine.expect("machine");
    assert_eq!(m.model_score, None);
    site.rt.shutdown().await;

    // A missing file: an error of its own, and the runtime still starts.
    let spec = model_plant("no-such-model.onnx");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.plant_dir = Some(models_dir());
    let site = start_plant_in(&spec, dir.path(), opts).await;
    assert!(
        site.rt.model_errors().len() == 1
            && site.rt.model_errors()[0].contains("no-such-model.onnx"),
        "{:?}",
        site.rt.model_errors()
    );
    site.rt.shutdown().await;
}
