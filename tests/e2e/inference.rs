//! Local inference end to end: a simulated plant runs accelerated through a real runtime
//! (router → sensor twins → machine twins with their detectors → events in the store → gRPC).

use std::path::Path;

use ferrotwin_models::spec::{AssetKind, PlantSpec};
use ferrotwin_models::{Level, Timestamp};
use ferrotwin_runtime::eval::{anomaly_episodes, drive};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::{FaultKind, PlantSim};
use ferrotwin_sim::scenario::Scenario;

use ferrotwin_runtime::twin::{TwinMsg, TwinState};

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
    let entry = site
        .rt
        .registry
        .by_path(&crate::common::path(machine))
        .expect("machine is known");
    let TwinState::Machine(m) = &entry.snapshot().state else {
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
    // Let the last evaluation land, then compare what the twin knows before and after.
    let (site_ref, m0) = (&site, ms[0].as_str());
    let before = wait_for(10, "evaluations to settle", || async move {
        let a = learned(site_ref, m0);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        (learned(site_ref, m0) == a).then_some(a)
    })
    .await;
    let mut client = site.client.clone();
    let health = get(&mut client, &ms[0])
        .await
        .machine
        .expect("machine")
        .health;
    assert!(health.is_some(), "health after six hours");

    // A crash: the parent restarts the twin from its last published snapshot.
    let old = site
        .rt
        .registry
        .by_path(&crate::common::path(&ms[0]))
        .and_then(|e| e.actor())
        .expect("machine twin runs");
    old.cast(TwinMsg::Crash).expect("cast");
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
