//! The ISA-18.2 alarm lifecycle, deadband, acknowledge and shelve through the gRPC API.

use ferrotwin_proto::v1 as pb;
use pb::AlarmState as S;
use tonic::Code;

use crate::common::*;

type Client =
    ferrotwin_proto::v1::twin_service_client::TwinServiceClient<tonic::transport::Channel>;

async fn set_and_wait(site: &Site, c: &Client, v: f64) -> pb::Twin {
    push(site, vec![float(TEMP, v)]).await;
    wait_for(5, "temp value applied", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (float_of(&t) == Some(v)).then_some(t)
        }
    })
    .await
}

async fn ack(c: &mut Client, alarm: &str) -> Result<pb::Alarm, tonic::Status> {
    c.acknowledge_alarm(pb::AcknowledgeAlarmRequest {
        path: TEMP.into(),
        alarm: alarm.into(),
        by: "alice".into(),
        comment: "checked the cooling".into(),
    })
    .await
    .map(|r| r.into_inner().alarm.expect("alarm in answer"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_raises_holds_in_deadband_and_clears_after_ack() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 70.0).await, "high"),
        S::Normal
    );
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 95.0).await, "high"),
        S::ActiveUnacked
    );
    // The press and the line see it in their roll-ups.
    let line = wait_for(5, "line roll-up counts the alarm", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, "acme/berlin/assembly/line-1").await;
            let r = t.rollup.clone().expect("rollup");
            (r.active_alarms == 1).then_some(r)
        }
    })
    .await;
    assert_eq!(
        line.alarms_by_severity[3], 1,
        "one alarm of severity high (index 3)"
    );
    assert_eq!(line.unacked_alarms, 1);

    let a = ack(&mut c, "high").await.expect("ack");
    assert_eq!(pb::AlarmState::try_from(a.state), Ok(S::ActiveAcked));
    // 88 is below the limit but inside the deadband (90 - 5): still active.
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 88.0).await, "high"),
        S::ActiveAcked
    );
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 80.0).await, "high"),
        S::Normal
    );

    let evs = events(&mut c, TEMP).await;
    let alarm_msgs: Vec<&str> = evs
        .iter()
        .filter(|e| e.kind == "alarm")
        .map(|e| e.message.as_str())
        .collect();
    assert_eq!(alarm_msgs.len(), 3, "{alarm_msgs:?}");
    assert!(alarm_msgs[0].contains("raised"), "{alarm_msgs:?}");
    assert!(
        alarm_msgs[1].contains("acknowledged by alice: checked the cooling"),
        "{alarm_msgs:?}"
    );
    assert!(alarm_msgs[2].contains("cleared"), "{alarm_msgs:?}");
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_alarm_returns_to_normal_and_needs_an_ack_and_bad_acks_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    set_and_wait(&site, &c, 95.0).await;
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 50.0).await, "high"),
        S::ReturnedUnacked
    );
    let a = ack(&mut c, "high").await.expect("ack");
    assert_eq!(pb::AlarmState::try_from(a.state), Ok(S::Normal));

    let err = ack(&mut c, "high").await.expect_err("nothing to ack");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err}");
    let err = ack(&mut c, "hihg").await.expect_err("unknown alarm");
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("alarms: high"), "{}", err.message());
    let err = c
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            path: PRESS.into(),
            alarm: "high".into(),
            by: "alice".into(),
            comment: String::new(),
        })
        .await
        .expect_err("machines have no alarms of their own");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = c
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            path: TEMP.into(),
            alarm: "high".into(),
            by: " ".into(),
            comment: String::new(),
        })
        .await
        .expect_err("anonymous ack");
    assert_eq!(err.code(), Code::InvalidArgument);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shelved_alarm_does_not_raise_until_unshelved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    let shelve = |ms: u64| pb::ShelveAlarmRequest {
        path: TEMP.into(),
        alarm: "high".into(),
        duration_ms: ms,
        by: "bob".into(),
    };
    let a = c
        .shelve_alarm(shelve(60_000))
        .await
        .expect("shelve")
        .into_inner()
        .alarm
        .expect("alarm");
    assert!(a.shelved_until_us > 0);
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 95.0).await, "high"),
        S::Normal
    );
    c.shelve_alarm(shelve(0)).await.expect("unshelve");
    assert_eq!(
        alarm_state(&set_and_wait(&site, &c, 96.0).await, "high"),
        S::ActiveUnacked
    );
    site.rt.shutdown().await;
}

/// A press of the test plant whose `temp` is tuned (°F, alarm at 200) and that has no
/// `force` but an `oil` sensor of its own: one type, two shapes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_override_changes_one_machine_and_leaves_its_type_alone() {
    let plant = PLANT.replace(
        r#"machines = [{ name = "press-1", type = "press" }, { name = "oven-1", type = "oven" }]"#,
        r#"[[sites.areas.lines.machines]]
name = "press-1"
type = "press"
[[sites.areas.lines.machines]]
name = "oven-1"
type = "oven"
[[sites.areas.lines.machines]]
name = "press-2"
type = "press"
drop = ["force"]
tune.temp = { unit = "degF", max = 600.0, alarms = [{ name = "high", kind = "high", limit = 200.0, deadband = 5.0, severity = "high" }] }
[[sites.areas.lines.machines.sensors]]
name = "oil"
unit = "bar"
period_ms = 100"#,
    );
    let spec =
        ferrotwin_models::spec::PlantSpec::from_toml(&plant, "override plant").expect("valid");
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_plant_in(&spec, dir.path(), options()).await;
    let mut c = site.client.clone();
    const TEMP2: &str = "acme/berlin/assembly/line-1/press-2/temp";
    const OIL2: &str = "acme/berlin/assembly/line-1/press-2/oil";
    push(
        &site,
        vec![float(TEMP, 150.0), float(TEMP2, 150.0), float(OIL2, 3.5)],
    )
    .await;
    for p in [TEMP, TEMP2, OIL2] {
        let v = if p == OIL2 { 3.5 } else { 150.0 };
        wait_float(&c, p, v, 5, "override plant readings applied").await;
    }
    let (t1, t2) = (get(&mut c, TEMP).await, get(&mut c, TEMP2).await);
    assert_eq!(
        alarm_state(&t1, "high"),
        S::ActiveUnacked,
        "the type's limit 90"
    );
    assert_eq!(
        alarm_state(&t2, "high"),
        S::Normal,
        "press-2's own limit 200"
    );
    let unit = |t: &pb::Twin| t.sensor.as_ref().expect("sensor").unit.clone();
    assert_eq!((unit(&t1).as_str(), unit(&t2).as_str()), ("degC", "degF"));
    assert_eq!(t2.r#type, "press.temp");
    let gone = c
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(
                "acme/berlin/assembly/line-1/press-2/force".into(),
            )),
        })
        .await
        .expect_err("press-2 has no force");
    assert_eq!(gone.code(), Code::NotFound, "{gone:?}");
    push(&site, vec![float(TEMP2, 250.0)]).await;
    wait_float(&c, TEMP2, 250.0, 5, "press-2 temp 250").await;
    assert_eq!(
        alarm_state(&get(&mut c, TEMP2).await, "high"),
        S::ActiveUnacked
    );
    site.rt.shutdown().await;
}
