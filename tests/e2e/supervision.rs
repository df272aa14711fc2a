//! A crashed twin is restarted by its parent from its last state; siblings never stop; past
//! the restart budget the failure escalates to the grandparent.

use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::testing;
use ractor::ActorId;

use crate::common::*;

fn actor_id(site: &Site, p: &str) -> Option<ActorId> {
    testing::actor_id(&site.rt, &path(p))
}

fn crash(site: &Site, p: &str) {
    assert!(testing::crash(&site.rt, &path(p)), "{p}: twin is running");
}

async fn wait_restarted(site: &Site, p: &str, old: Option<ActorId>) -> ActorId {
    wait_for(10, "twin restarted", || async {
        actor_id(site, p).filter(|id| Some(*id) != old)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_sensor_restarts_with_its_last_value_and_alarm_and_siblings_keep_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    push(&site, vec![float(TEMP, 97.0), float(FORCE, 5.0)]).await;
    wait_for(5, "alarm active", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (alarm_state(&t, "high") == pb::AlarmState::ActiveUnacked).then_some(())
        }
    })
    .await;
    let before_temp = actor_id(&site, TEMP);
    let siblings = [FORCE, COUNT, PRESS].map(|p| actor_id(&site, p));

    crash(&site, TEMP);
    wait_restarted(&site, TEMP, before_temp).await;

    let t = get(&mut c, TEMP).await;
    assert_eq!(float_of(&t), Some(97.0), "last value kept");
    assert_eq!(
        alarm_state(&t, "high"),
        pb::AlarmState::ActiveUnacked,
        "alarm state kept"
    );
    assert_eq!(t.restarts, 1);
    assert_eq!(
        [FORCE, COUNT, PRESS].map(|p| actor_id(&site, p)),
        siblings,
        "siblings and parent never stopped"
    );
    // The restarted twin works: the alarm clears through it.
    push(&site, vec![float(TEMP, 20.0)]).await;
    wait_for(5, "alarm returned", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (alarm_state(&t, "high") == pb::AlarmState::ReturnedUnacked).then_some(())
        }
    })
    .await;
    let evs = events(&mut c, TEMP).await;
    assert!(
        evs.iter()
            .any(|e| e.kind == "lifecycle" && e.message.contains("restarted after a crash")),
        "{evs:?}"
    );
    assert_eq!(
        site.rt
            .metrics()
            .restarts
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_its_restart_budget_a_failure_escalates_and_the_grandparent_restarts_the_subtree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.twins.max_restarts = 2;
    opts.twins.restart_window_ms = 60_000;
    let site = start_in(dir.path(), opts).await;
    let mut c = site.client.clone();
    push(&site, vec![float(FORCE, 7.0)]).await;
    wait_float(&c, FORCE, 7.0, 5, "force applied").await;
    let press = actor_id(&site, PRESS);
    let oven = actor_id(&site, "acme/berlin/assembly/line-1/oven-1");
    let mut temp = actor_id(&site, TEMP);
    for _ in 0..2 {
        crash(&site, TEMP);
        temp = Some(wait_restarted(&site, TEMP, temp).await);
    }
    assert_eq!(
        actor_id(&site, PRESS),
        press,
        "within budget the machine is untouched"
    );
    // Third crash within the window: the press gives up and fails; the line restarts it.
    crash(&site, TEMP);
    wait_restarted(&site, PRESS, press).await;
    let p = wait_for(10, "press restarted and published", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, PRESS).await;
            (t.restarts == 1).then_some(t)
        }
    })
    .await;
    assert_eq!(p.level, pb::Level::Machine as i32);
    // Its sensors came back from their snapshots, the sibling machine was never touched.
    wait_restarted(&site, FORCE, None).await;
    assert_eq!(float_of(&get(&mut c, FORCE).await), Some(7.0));
    assert_eq!(actor_id(&site, "acme/berlin/assembly/line-1/oven-1"), oven);
    push(&site, vec![float(FORCE, 8.0)]).await;
    wait_float(&c, FORCE, 8.0, 5, "force applied after subtree restart").await;
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_that_arrive_while_a_twin_restarts_are_applied_after_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    for round in 0..5 {
        let before = actor_id(&site, FORCE);
        crash(&site, FORCE);
        // Pushed while the twin is dying or restarting: must wait in its inbox, not vanish
        // or wedge the inbox.
        push(&site, vec![float(FORCE, f64::from(round))]).await;
        wait_restarted(&site, FORCE, before).await;
        let v = f64::from(round) + 0.5;
        push(&site, vec![float(FORCE, v)]).await;
        wait_float(&c, FORCE, v, 5, "value after restart applied").await;
    }
    assert_eq!(get(&mut c, FORCE).await.restarts, 5);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_that_escalates_to_the_enterprise_restarts_the_whole_tree() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    push(&site, vec![float(TEMP, 42.0)]).await;
    wait_float(&c, TEMP, 42.0, 5, "temp applied").await;
    let root = actor_id(&site, "acme");
    let temp = actor_id(&site, TEMP);
    crash(&site, "acme");
    wait_restarted(&site, "acme", root).await;
    wait_restarted(&site, TEMP, temp).await;
    assert_eq!(
        float_of(&get(&mut c, TEMP).await),
        Some(42.0),
        "state survives"
    );
    push(&site, vec![float(TEMP, 43.0)]).await;
    wait_float(&c, TEMP, 43.0, 5, "ingest works after the tree restart").await;
    let evs = events(&mut c, "acme").await;
    assert!(
        evs.iter()
            .any(|e| e.path == "acme" && e.kind == "lifecycle"),
        "{evs:?}"
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_unwritten_history_tail_survives_a_twin_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    // Fewer readings than a chunk (4 in tests): they sit in the tail.
    for v in [1.0, 2.0, 3.0] {
        push(&site, vec![float(FORCE, v)]).await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    wait_float(&c, FORCE, 3.0, 5, "last value").await;
    let before = actor_id(&site, FORCE);
    crash(&site, FORCE);
    wait_restarted(&site, FORCE, before).await;
    push(&site, vec![float(FORCE, 4.0)]).await;
    let h = wait_for(5, "history with the tail from before the crash", || {
        let mut c = c.clone();
        async move {
            let h = c
                .get_history(pb::GetHistoryRequest {
                    path: FORCE.into(),
                    ..Default::default()
                })
                .await
                .expect("history")
                .into_inner();
            (h.raw_points == 4).then_some(h)
        }
    })
    .await;
    let values: Vec<f64> = h.points.iter().map(|p| p.value).collect();
    assert_eq!(values, vec![1.0, 2.0, 3.0, 4.0]);
    assert_eq!(get(&mut c, FORCE).await.restarts, 1);
    site.rt.shutdown().await;
}
