//! A changed plant applied to a running site over gRPC (`ApplyPlant`): under ingest load, with
//! a stale base, removing a machine with an active alarm, a moved limit, a tag on a removed
//! asset, and across restarts (the record wins over an unchanged file, an edited file is the
//! next version).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use ferrotwin_adapters::ConnectionConfig;
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::testing;

use crate::common::*;

const OVEN_TEMP: &str = "acme/berlin/assembly/line-1/oven-1/zone-temp";
const OVEN: &str = "acme/berlin/assembly/line-1/oven-1";

/// `PLANT` with a second line of one press, a door sensor added to the oven type and the
/// press temperature's alarm limit moved.
fn grown() -> String {
    PLANT
        .replace("limit = 90.0", "limit = 91.0")
        .replace(
            "[[sites]]",
            "[[machine_types.oven.sensors]]\nname = \"door\"\nvalue_type = \"bool\"\nperiod_ms = 100\n\n[[sites]]",
        )
        .replace(
            r#"machines = [{ name = "press-1", type = "press" }, { name = "oven-1", type = "oven" }]"#,
            r#"machines = [{ name = "press-1", type = "press" }, { name = "oven-1", type = "oven" }]
[[sites.areas.lines]]
name = "line-2"
machines = [{ name = "press-2", type = "press" }]"#,
        )
}

/// `PLANT` without press-1.
fn without_press() -> String {
    PLANT.replace(r#"{ name = "press-1", type = "press" }, "#, "")
}

async fn apply(
    site: &Site,
    plant: &str,
    base: u64,
    dry_run: bool,
) -> Result<pb::ApplyPlantResponse, tonic::Status> {
    site.client
        .clone()
        .apply_plant(pb::ApplyPlantRequest {
            plant_toml: plant.to_owned(),
            base_version: base,
            dry_run,
            by: "test".into(),
            site_toml: String::new(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn version(site: &Site) -> u64 {
    site.client
        .clone()
        .get_plant(pb::GetPlantRequest { with_spec: false })
        .await
        .expect("get_plant")
        .into_inner()
        .version
}

fn count_of(t: &pb::Twin) -> u64 {
    t.sensor
        .as_ref()
        .and_then(|s| s.stats.as_ref())
        .map_or(0, |s| s.count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_under_ingest_load_loses_no_reading_and_pauses_no_untouched_twin() {
    let dir = tempfile::tempdir().expect("dir");
    let site = Arc::new(start_in(dir.path(), options()).await);
    let temp_actor = testing::actor_id(&site.rt, &path(TEMP)).expect("temp runs");
    let force_actor = testing::actor_id(&site.rt, &path(FORCE)).expect("force runs");
    let press_actor = testing::actor_id(&site.rt, &path(PRESS)).expect("press runs");
    let oven_actor = testing::actor_id(&site.rt, &path(OVEN)).expect("oven runs");
    let zone_actor = testing::actor_id(&site.rt, &path(OVEN_TEMP)).expect("zone-temp runs");
    // A steady load while the apply runs: on a changed sensor (TEMP: restarted on a new
    // entry, its readings in flight redirected) and on unchanged sensors of changed machines
    // (FORCE under the press, zone-temp under the oven: never stopped).
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let load = {
        let (site, stop, sent) = (site.clone(), stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Acquire) {
                i += 1;
                push(
                    &site,
                    vec![
                        float(TEMP, i as f64 % 50.0),
                        float(FORCE, i as f64),
                        float(OVEN_TEMP, i as f64),
                    ],
                )
                .await;
                sent.store(i, Ordering::Release);
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
        })
    };
    wait_for(10, "the load runs", || async {
        (sent.load(Ordering::Acquire) > 20).then_some(())
    })
    .await;
    let plan = apply(&site, &grown(), 1, true).await.expect("dry run");
    assert!(!plan.applied);
    assert_eq!(plan.version, 1);
    let lines: Vec<String> = plan
        .changes
        .iter()
        .map(|c| format!("{} {} {}", c.op, c.path, c.detail))
        .collect();
    assert_eq!(
        lines,
        [
            "changed acme/berlin/assembly/line-1/oven-1 sensors +door (the machine detector learns again)",
            "added acme/berlin/assembly/line-1/oven-1/door sensor",
            "changed acme/berlin/assembly/line-1/press-1/temp alarm high: limit 90 → 91",
            "added acme/berlin/assembly/line-2 line, 1 machine, 3 sensors",
        ]
    );
    site.client
        .clone()
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(
                "acme/berlin/assembly/line-2".into(),
            )),
        })
        .await
        .expect_err("a dry run changes nothing");
    let done = apply(&site, &grown(), 1, false).await.expect("applied");
    assert!(done.applied);
    assert_eq!(done.version, 2);
    assert_eq!(version(&site).await, 2);
    // Let the load go on a little after the apply, then stop it and let everything settle.
    let after = sent.load(Ordering::Acquire) + 20;
    wait_for(10, "the load goes on", || async {
        (sent.load(Ordering::Acquire) > after).then_some(())
    })
    .await;
    stop.store(true, Ordering::Release);
    load.await.expect("load task");
    tokio::time::timeout(std::time::Duration::from_secs(60), site.rt.settle())
        .await
        .expect("every reading handled (no credit left behind)");
    assert_eq!(site.rt.readings_in_flight(), 0, "no credit leaked");
    let pushed = sent.load(Ordering::Acquire);
    let mut c = site.client.clone();
    assert_eq!(
        count_of(&get(&mut c, TEMP).await),
        pushed,
        "every reading of the changed temp applied, across its restart"
    );
    assert_eq!(count_of(&get(&mut c, FORCE).await), pushed);
    assert_eq!(
        count_of(&get(&mut c, OVEN_TEMP).await),
        pushed,
        "every reading of the oven's unchanged sensor applied across its machine's change"
    );
    assert_ne!(
        testing::actor_id(&site.rt, &path(TEMP)),
        Some(temp_actor),
        "the changed sensor restarted"
    );
    assert_eq!(
        testing::actor_id(&site.rt, &path(FORCE)),
        Some(force_actor),
        "an unchanged sensor of a changed machine never stopped"
    );
    assert_eq!(testing::actor_id(&site.rt, &path(PRESS)), Some(press_actor));
    assert_eq!(
        testing::actor_id(&site.rt, &path(OVEN)),
        Some(oven_actor),
        "the changed oven took its new settings in the same actor"
    );
    assert_eq!(
        testing::actor_id(&site.rt, &path(OVEN_TEMP)),
        Some(zone_actor),
        "the changed oven's unchanged sensor never stopped"
    );
    // The new twins run and take readings at once.
    let door = "acme/berlin/assembly/line-1/oven-1/door";
    let new_temp = "acme/berlin/assembly/line-2/press-2/temp";
    push(&site, vec![float(new_temp, 42.0)]).await;
    wait_float(&site.client, new_temp, 42.0, 10, "the new press's temp").await;
    let d = get(&mut c, door).await;
    assert_eq!(d.level, pb::Level::Sensor as i32);
    let oven = get(&mut c, OVEN).await;
    assert_eq!(oven.rollup.as_ref().map(|r| r.sensors), Some(2), "{oven:?}");
    let metrics = site.rt.render_metrics();
    for reason in ["unknown_asset", "removed_asset"] {
        assert!(
            metrics.contains(&format!(
                "ferrotwin_readings_rejected_total{{reason=\"{reason}\"}} 0"
            )),
            "{reason}: {metrics}"
        );
    }
    // One model event per plan line.
    let model: Vec<pb::Event> = events(&mut c, "acme")
        .await
        .into_iter()
        .filter(|e| e.kind == "model")
        .collect();
    assert_eq!(model.len(), 4, "{model:?}");
    assert!(
        model.iter().any(|e| e.path == "acme/berlin/assembly/line-2"
            && e.message
                .contains("plant v2 by test: added line, 1 machine")),
        "{model:?}"
    );
    Arc::into_inner(site)
        .expect("one owner")
        .rt
        .shutdown()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_made_against_another_version_is_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let err = apply(&site, &grown(), 0, false).await.expect_err("no base");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("base_version"), "{err}");
    apply(&site, &grown(), 1, false).await.expect("first apply");
    let err = apply(&site, &without_press(), 1, false)
        .await
        .expect_err("stale");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(
        err.message().contains("at version 2") && err.message().contains("against version 1"),
        "{err}"
    );
    let mut c = site.client.clone();
    get(&mut c, TEMP).await;
    // On the audit log: the apply, and the refusal.
    let audit = c
        .list_audit(pb::ListAuditRequest {
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("audit")
        .into_inner()
        .records;
    let applies: Vec<String> = audit
        .iter()
        .filter(|r| r.action == "apply")
        .map(|r| format!("{} {}", r.value, r.result))
        .collect();
    assert!(
        applies
            .iter()
            .any(|a| a.starts_with("v1 → v2: +6 −0 ~3;") && a.ends_with(" ok")),
        "{applies:?}"
    );
    assert!(
        applies
            .iter()
            .any(|a| a.contains("failed: the plant is at version 2")),
        "{applies:?}"
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_machine_with_an_active_alarm_stops_it_and_a_re_add_resumes_it() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    push(&site, vec![float(TEMP, 95.0)]).await;
    let mut c = site.client.clone();
    wait_for(10, "the alarm raised", || {
        let mut c = c.clone();
        async move {
            (alarm_state(&get(&mut c, TEMP).await, "high") == pb::AlarmState::ActiveUnacked)
                .then_some(())
        }
    })
    .await;
    let line = "acme/berlin/assembly/line-1";
    wait_for(10, "the line counts it", || {
        let mut c = c.clone();
        async move { (get(&mut c, line).await.rollup?.active_alarms == 1).then_some(()) }
    })
    .await;
    let done = apply(&site, &without_press(), 1, false)
        .await
        .expect("applied");
    assert_eq!(
        done.changes
            .iter()
            .map(|c| format!("{} {} {}", c.op, c.path, c.detail))
            .collect::<Vec<_>>(),
        ["removed acme/berlin/assembly/line-1/press-1 machine of type press, 3 sensors"]
    );
    let err = c
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(TEMP.into())),
        })
        .await
        .expect_err("gone");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    wait_for(10, "the line drops the removed machine", || {
        let mut c = c.clone();
        async move {
            let r = get(&mut c, line).await.rollup?;
            (r.active_alarms == 0 && r.machines == 1 && r.sensors == 1).then_some(())
        }
    })
    .await;
    // Its events stay, under its line.
    let ev = events(&mut c, line)
        .await
        .into_iter()
        .find(|e| e.kind == "model" && e.path == PRESS)
        .expect("a model event");
    assert!(
        ev.message
            .contains("active alarms that went with it: temp: high active_unacked"),
        "{}",
        ev.message
    );
    assert_eq!(ev.severity, pb::Severity::Medium as i32);
    // A reading for it now is refused as for any unknown asset, and counted.
    push(&site, vec![float(TEMP, 1.0)]).await;
    assert!(
        site.rt
            .render_metrics()
            .contains("ferrotwin_readings_rejected_total{reason=\"unknown_asset\"} 1")
    );
    // Put back: it resumes where it was (value, alarm), as a restart would.
    apply(&site, PLANT, 2, false).await.expect("re-added");
    let t = get(&mut c, TEMP).await;
    assert_eq!(float_of(&t), Some(95.0));
    assert_eq!(alarm_state(&t, "high"), pb::AlarmState::ActiveUnacked);
    push(&site, vec![float(TEMP, 96.0)]).await;
    wait_float(&site.client, TEMP, 96.0, 10, "the re-added twin runs").await;
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_limit_applies_to_the_next_reading_and_survives_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    push(&site, vec![float(TEMP, 80.0)]).await;
    wait_float(&site.client, TEMP, 80.0, 10, "80 applied").await;
    let mut c = site.client.clone();
    assert_eq!(
        alarm_state(&get(&mut c, TEMP).await, "high"),
        pb::AlarmState::Normal
    );
    let lowered = PLANT.replace("limit = 90.0", "limit = 70.0");
    let done = apply(&site, &lowered, 1, false).await.expect("applied");
    assert_eq!(
        done.changes
            .iter()
            .map(|c| format!("{} {}", c.path, c.detail))
            .collect::<Vec<_>>(),
        [format!("{TEMP} alarm high: limit 90 → 70")]
    );
    // The restarted sensor kept its value and statistics (fitted as a restart fits them).
    let t = get(&mut c, TEMP).await;
    assert_eq!(float_of(&t), Some(80.0));
    assert_eq!(count_of(&t), 1, "{t:?}");
    push(&site, vec![float(TEMP, 80.5)]).await;
    wait_for(10, "the alarm raised at the new limit", || {
        let mut c = c.clone();
        async move {
            (alarm_state(&get(&mut c, TEMP).await, "high") == pb::AlarmState::ActiveUnacked)
                .then_some(())
        }
    })
    .await;
    let alarm = get(&mut c, TEMP)
        .await
        .sensor
        .expect("sensor")
        .alarms
        .into_iter()
        .find(|a| a.name == "high")
        .expect("high");
    assert_eq!(alarm.limit, 70.0);
    site.rt.shutdown().await;

    // A restart with the file unchanged since it was taken runs the applied version.
    let site = start_in(dir.path(), options()).await;
    assert_eq!(version(&site).await, 2);
    let mut c = site.client.clone();
    let limit = |t: pb::Twin| {
        t.sensor
            .expect("sensor")
            .alarms
            .into_iter()
            .find(|a| a.name == "high")
            .expect("high")
            .limit
    };
    assert_eq!(limit(get(&mut c, TEMP).await), 70.0);
    site.rt.shutdown().await;

    // A restart with an edited file takes the file, as the next version.
    let edited = ferrotwin_models::spec::PlantSpec::from_toml(
        &PLANT.replace("limit = 90.0", "limit = 60.0"),
        "edited",
    )
    .expect("valid");
    let site = start_plant_in(&edited, dir.path(), options()).await;
    assert_eq!(version(&site).await, 3);
    let mut c = site.client.clone();
    assert_eq!(limit(get(&mut c, TEMP).await), 60.0);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apply_that_removes_an_asset_a_tag_maps_is_refused_whole() {
    let text = format!(
        r#"protocol = "modbus"
name = "press-plc"
endpoint = "127.0.0.1:1"
[[tags]]
asset = "{TEMP}"
property = "value"
register = "holding"
address = 1
data_type = "u16"
"#
    );
    let mut opts = options();
    opts.connections = vec![toml::from_str::<ConnectionConfig>(&text).expect("a config")];
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), opts).await;
    let err = apply(&site, &without_press(), 1, false)
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message().contains("press-plc")
            && err.message().contains(TEMP)
            && err.message().contains("no such asset"),
        "{err}"
    );
    assert_eq!(version(&site).await, 1);
    let mut c = site.client.clone();
    get(&mut c, TEMP).await;
    site.rt.shutdown().await;
}

/// A machine whose type changes keeps its actor, its state and counters, and its sensors
/// keep running; the next readings count on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_machine_type_keeps_each_machines_state_counters_and_sensors() {
    use ferrotwin_models::{Property, Reading, Timestamp, Value};
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let at = |secs_ago: i64| Timestamp(now().0 - secs_ago * 1_000_000);
    let int = |property: Property, v: i64, ts: Timestamp| {
        Reading::good(path(PRESS).id(), property, Value::Int(v), ts)
    };
    push(
        &site,
        vec![
            int(Property::State, 1, at(10)),
            int(Property::GoodCount, 0, at(10)),
            int(Property::GoodCount, 5, at(5)),
        ],
    )
    .await;
    let mut c = site.client.clone();
    let good = |t: pb::Twin| t.machine.map(|m| (m.state, m.good_count));
    wait_for(10, "five good parts", || {
        let mut c = c.clone();
        async move { (good(get(&mut c, PRESS).await) == Some(("running".into(), 5))).then_some(()) }
    })
    .await;
    let press = testing::actor_id(&site.rt, &path(PRESS)).expect("runs");
    let force = testing::actor_id(&site.rt, &path(FORCE)).expect("runs");
    let faster = PLANT.replacen("ideal_cycle_ms = 1000", "ideal_cycle_ms = 800", 1);
    let done = apply(&site, &faster, 1, false).await.expect("applied");
    assert_eq!(
        done.changes
            .iter()
            .map(|c| format!("{} {}", c.path, c.detail))
            .collect::<Vec<_>>(),
        [format!("{PRESS} ideal cycle 1000 ms → 800 ms")]
    );
    let m = get(&mut c, PRESS).await.machine.expect("machine");
    assert_eq!(
        (m.state.as_str(), m.good_count, m.ideal_cycle_ms),
        ("running", 5, 800.0)
    );
    assert_eq!(testing::actor_id(&site.rt, &path(PRESS)), Some(press));
    assert_eq!(testing::actor_id(&site.rt, &path(FORCE)), Some(force));
    push(&site, vec![int(Property::GoodCount, 7, at(1))]).await;
    wait_for(10, "the rebound machine counts on", || {
        let mut c = c.clone();
        async move { (good(get(&mut c, PRESS).await) == Some(("running".into(), 7))).then_some(()) }
    })
    .await;
    push(&site, vec![float(FORCE, 3.5)]).await;
    wait_float(&site.client, FORCE, 3.5, 10, "its sensor runs").await;
    site.rt.shutdown().await;
}

/// An enterprise's plant must keep every site it accepts: a change that drops one is
/// refused whole (its batches would be acked and thrown away).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enterprise_refuses_a_plant_without_a_site_it_accepts() {
    let dir = tempfile::tempdir().expect("dir");
    let mut opts = options();
    opts.enterprise = Some(ferrotwin_runtime::EnterpriseRole {
        accept: vec!["acme/berlin".into()],
    });
    let ent = start_in(dir.path(), opts).await;
    let moved = PLANT.replace(r#"name = "berlin""#, r#"name = "munich""#);
    let err = apply(&ent, &moved, 1, false).await.expect_err("refused");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(
        err.message()
            .contains("enterprise.accept names acme/berlin"),
        "{err}"
    );
    // A change that keeps it applies to the mirrors as to any twins.
    let grown = apply(&ent, &grown(), 1, false).await.expect("applied");
    assert_eq!(grown.version, 2);
    let mut c = ent.client.clone();
    get(&mut c, "acme/berlin/assembly/line-2/press-2/temp").await;
    ent.rt.shutdown().await;
}

/// The enterprise's plant lists no site: its mirrors come from the plant the site sends with
/// its hello, and follow the site's live changes (a new line shows at the enterprise with
/// its values, a removed machine goes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enterprise_mirrors_what_its_site_sends_and_follows_its_live_changes() {
    let (ed, sd) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let ent = bare_enterprise(ed.path(), &["acme/berlin"]).await;
    let site = start_in(sd.path(), replicating_to(ent.addr)).await;
    let value_at = |p: &'static str| {
        let c = ent.client.clone();
        async move {
            let mut c = c;
            let t = c
                .get_twin(pb::GetTwinRequest {
                    key: Some(pb::get_twin_request::Key::Path(p.into())),
                })
                .await
                .ok()?
                .into_inner();
            float_of(&t)
        }
    };
    push(&site, vec![float(TEMP, 42.0)]).await;
    wait_for(30, "the site's twin mirrored at the enterprise", || async {
        (value_at(TEMP).await == Some(42.0)).then_some(())
    })
    .await;
    // A live change at the site: a new line, press-1 gone.
    let changed = grown().replace(r#"{ name = "press-1", type = "press" }, "#, "");
    apply(&site, &changed, 1, false)
        .await
        .expect("applied at the site");
    const NEW_TEMP: &str = "acme/berlin/assembly/line-2/press-2/temp";
    push(&site, vec![float(NEW_TEMP, 7.5)]).await;
    wait_for(30, "the new line mirrored with its value", || async {
        (value_at(NEW_TEMP).await == Some(7.5)).then_some(())
    })
    .await;
    wait_for(30, "press-1 gone at the enterprise", || async {
        value_at(TEMP).await.is_none().then_some(())
    })
    .await;
    let v = ent
        .client
        .clone()
        .get_plant(pb::GetPlantRequest { with_spec: false })
        .await
        .expect("plant")
        .into_inner();
    assert_eq!(
        v.version, 3,
        "the site's first plant, then its change: {v:?}"
    );
    assert!(v.applied_by.starts_with("site acme/berlin"), "{v:?}");
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// Fleet templates: the enterprise keeps a template per site; a connected site applies it at
/// once, an offline one on its first connection; a template the site refuses leaves it on its
/// version with its error shown at the enterprise; a rollback brings the earlier one back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_templates_reach_their_sites_online_or_later_and_roll_back() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let ent = bare_enterprise(dirs[0].path(), &["acme/berlin", "acme/lyon"]).await;
    let site_opts = || replicating_to(ent.addr);
    let berlin = start_in(dirs[1].path(), site_opts()).await;
    let push_template = |site: &'static str, plant: String, site_toml: String| {
        let c = ent.client.clone();
        async move {
            let mut c = c;
            c.push_template(pb::PushTemplateRequest {
                site: site.into(),
                plant_toml: plant,
                site_toml,
                by: "ops".into(),
            })
            .await
            .map(tonic::Response::into_inner)
        }
    };
    let status = |site: &'static str| {
        let c = ent.client.clone();
        async move {
            let mut c = c;
            c.fleet_status(pb::FleetStatusRequest {})
                .await
                .expect("fleet status")
                .into_inner()
                .sites
                .into_iter()
                .find(|s| s.site == site)
                .expect("an accepted site")
        }
    };
    // Online: applied at once.
    let v = push_template("acme/berlin", grown(), String::new())
        .await
        .expect("pushed");
    assert_eq!((v.version, v.new_version), (1, true));
    wait_for(30, "berlin applies template 1", || async {
        let s = status("acme/berlin").await;
        (s.desired == 1 && s.applied == 1 && s.error.is_empty()).then_some(())
    })
    .await;
    let mut bc = berlin.client.clone();
    get(&mut bc, "acme/berlin/assembly/line-2/press-2/temp").await;
    // Offline: pending until the site connects.
    push_template(
        "acme/lyon",
        grown().replace(r#"name = "berlin""#, r#"name = "lyon""#),
        String::new(),
    )
    .await
    .expect("pushed");
    let s = status("acme/lyon").await;
    assert_eq!((s.desired, s.applied, s.connected), (1, 0, false), "{s:?}");
    // Lyon starts from nothing but its site (what a config without a plant file runs).
    let bare_lyon = ferrotwin_models::spec::PlantSpec::from_toml(
        "version = 1\nenterprise = \"acme\"\n[[sites]]\nname = \"lyon\"\n",
        "lyon, bare",
    )
    .expect("valid");
    let mut lo = site_opts();
    if let Some(r) = lo.replication.as_mut() {
        r.site = Some("acme/lyon".into());
    }
    let lyon = start_plant_in(&bare_lyon, dirs[2].path(), lo).await;
    wait_for(30, "lyon applies its template on connecting", || async {
        (status("acme/lyon").await.applied == 1).then_some(())
    })
    .await;
    let mut lc = lyon.client.clone();
    get(&mut lc, "acme/lyon/assembly/line-2/press-2/temp").await;
    // Its new twins are mirrored at the enterprise too (its next hello carried its plant).
    let ec = ent.client.clone();
    wait_for(30, "lyon's twins mirrored", || {
        let mut ec = ec.clone();
        async move {
            ec.get_twin(pb::GetTwinRequest {
                key: Some(pb::get_twin_request::Key::Path(
                    "acme/lyon/assembly/line-2/press-2/temp".into(),
                )),
            })
            .await
            .ok()
            .map(|_| ())
        }
    })
    .await;
    // Refused by the site: a connection tagging an asset its plant lacks.
    let bad_site = String::from(
        "version = 1\n[[connections]]\nprotocol = \"modbus\"\nname = \"ghost-plc\"\nendpoint = \"127.0.0.1:1\"\n[[connections.tags]]\nasset = \"acme/berlin/assembly/line-9/m/t\"\nproperty = \"value\"\nregister = \"holding\"\naddress = 1\ndata_type = \"u16\"\n",
    );
    push_template("acme/berlin", grown(), bad_site)
        .await
        .expect("kept");
    let refused = wait_for(30, "berlin refuses template 2", || async {
        let s = status("acme/berlin").await;
        (s.desired == 2 && !s.error.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(refused.applied, 1, "it stays on template 1: {refused:?}");
    assert!(
        refused.error.contains("ghost-plc") && refused.error.contains("line-9"),
        "{refused:?}"
    );
    // Refused once, not sent again: the site replicates on (no reconnect storm).
    let sender = testing::sender(&berlin.rt).expect("a sender");
    let connects = sender.connects.load(Ordering::Relaxed);
    push(&berlin, vec![float(FORCE, 31.0)]).await;
    let ec = ent.client.clone();
    wait_for(30, "berlin replicates after the refusal", || {
        let mut ec = ec.clone();
        async move { (float_of(&get(&mut ec, FORCE).await) == Some(31.0)).then_some(()) }
    })
    .await;
    assert!(
        sender.connects.load(Ordering::Relaxed) <= connects + 2,
        "reconnects after the refusal: {} then {}",
        connects,
        sender.connects.load(Ordering::Relaxed)
    );
    // Rolled back to 1 (a new version 3 with 1's content): applied, the error gone.
    let back = ent
        .client
        .clone()
        .rollback_template(pb::RollbackTemplateRequest {
            site: "acme/berlin".into(),
            to_version: 1,
            by: "ops".into(),
        })
        .await
        .expect("rolled back")
        .into_inner();
    assert_eq!(back.version, 3);
    wait_for(30, "berlin applies template 3", || async {
        let s = status("acme/berlin").await;
        (s.applied == 3 && s.error.is_empty()).then_some(())
    })
    .await;
    lyon.rt.shutdown().await;
    berlin.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// A site's plant the enterprise cannot take (a machine type another site defines
/// otherwise): its stream ends with the reason, one event says it, and nothing of the site is
/// acked and dropped for want of its twins (its outbox keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_plant_the_enterprise_cannot_take_stops_its_stream_and_loses_nothing() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let ent = bare_enterprise(dirs[0].path(), &["acme/berlin", "acme/lyon"]).await;
    let site_opts = || replicating_to(ent.addr);
    let berlin = start_in(dirs[1].path(), site_opts()).await;
    push(&berlin, vec![float(TEMP, 12.0)]).await;
    let ec0 = ent.client.clone();
    wait_for(30, "berlin mirrored", || {
        let mut c = ec0.clone();
        async move {
            let t = c
                .get_twin(pb::GetTwinRequest {
                    key: Some(pb::get_twin_request::Key::Path(TEMP.into())),
                })
                .await
                .ok()?
                .into_inner();
            (float_of(&t) == Some(12.0)).then_some(())
        }
    })
    .await;
    let lyon_plant = ferrotwin_models::spec::PlantSpec::from_toml(
        &PLANT
            .replace(r#"name = "berlin""#, r#"name = "lyon""#)
            .replacen("ideal_cycle_ms = 1000", "ideal_cycle_ms = 999", 1),
        "lyon",
    )
    .expect("valid");
    let lyon = start_plant_in(&lyon_plant, dirs[2].path(), site_opts()).await;
    const LYON_TEMP: &str = "acme/lyon/assembly/line-1/press-1/temp";
    push(&lyon, vec![float(LYON_TEMP, 5.0)]).await;
    let sender = testing::sender(&lyon.rt).expect("a sender");
    wait_for(30, "lyon told why", || async {
        sender
            .last_error()
            .filter(|e| e.contains("did not take this site's plant") && e.contains("machine type"))
            .map(|_| ())
    })
    .await;
    assert_eq!(
        sender.acked_seq.load(Ordering::Relaxed),
        0,
        "nothing of lyon acked (and so dropped)"
    );
    let mut ec = ent.client.clone();
    let refusals: Vec<pb::Event> = events(&mut ec, "acme")
        .await
        .into_iter()
        .filter(|e| e.kind == "model" && e.message.contains("acme/lyon sent"))
        .collect();
    assert_eq!(
        refusals.len(),
        1,
        "one event, not one per retry: {refusals:?}"
    );
    lyon.rt.shutdown().await;
    berlin.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// An enterprise whose plant lists no site, accepting `accept`.
async fn bare_enterprise(dir: &std::path::Path, accept: &[&str]) -> Site {
    let bare = ferrotwin_models::spec::PlantSpec::from_toml(
        "version = 1\nenterprise = \"acme\"\n",
        "enterprise plant",
    )
    .expect("valid");
    let mut eo = options();
    eo.enterprise = Some(ferrotwin_runtime::EnterpriseRole {
        accept: accept.iter().map(|s| (*s).to_owned()).collect(),
    });
    start_plant_in(&bare, dir, eo).await
}

/// Options of a site replicating to `enterprise`, reconnecting fast.
fn replicating_to(enterprise: std::net::SocketAddr) -> ferrotwin_runtime::RuntimeOptions {
    let mut so = options();
    let mut r = ferrotwin_runtime::SiteReplication::new(format!("http://{enterprise}"));
    r.reconnect_min_ms = 20;
    r.reconnect_max_ms = 200;
    so.replication = Some(r);
    so
}
