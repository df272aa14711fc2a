//! Bad input is rejected with a reason, counted and evented; the twin keeps running.
//! Staleness and push-back.

use std::sync::atomic::Ordering;

use ferrotwin_models::{Property, PushBackReason, Quality, QualityReason, Reading, Value};
use ferrotwin_proto::v1 as pb;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_wrong_type_and_future_readings_are_rejected_counted_and_evented() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.twins.reject_event_interval_ms = 0;
    let site = start_in(dir.path(), opts).await;
    let c = site.client.clone();
    let id = path(TEMP).id();
    let count_id = path(COUNT).id();
    push(
        &site,
        vec![
            Reading::good(id, Property::Value, Value::Float(f64::NAN), now()),
            Reading::good(id, Property::Value, Value::Bool(true), now()),
            Reading::good(count_id, Property::Value, Value::Float(1.5), now()),
            Reading::good(
                id,
                Property::Value,
                Value::Float(20.0),
                now().plus_ms(3_600_000),
            ),
            Reading::good(id, Property::State, Value::Int(1), now()),
            Reading::good(
                path("acme/nowhere").id(),
                Property::Value,
                Value::Float(1.0),
                now(),
            ),
        ],
    )
    .await;
    let m = site.rt.metrics();
    wait_for(5, "rejections counted", || async move {
        (m.rejected_total() == 5).then_some(())
    })
    .await;
    assert_eq!(m.rejected_not_finite.load(Ordering::Relaxed), 1);
    assert_eq!(m.rejected_wrong_type.load(Ordering::Relaxed), 2);
    assert_eq!(m.rejected_future.load(Ordering::Relaxed), 1);
    assert_eq!(m.rejected_unknown_property.load(Ordering::Relaxed), 1);
    assert_eq!(m.unknown_asset.load(Ordering::Relaxed), 1);

    // The twin keeps running and takes the next good value.
    push(&site, vec![float(TEMP, 21.5)]).await;
    let t = wait_for(5, "good value after garbage", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (float_of(&t) == Some(21.5)).then_some(t)
        }
    })
    .await;
    assert_eq!(t.sensor.as_ref().expect("sensor").rejected, 4);
    let evs = wait_for(5, "rejection events stored", || {
        let mut c = c.clone();
        async move {
            let e: Vec<pb::Event> = events(&mut c, TEMP)
                .await
                .into_iter()
                .filter(|e| e.kind == "rejected")
                .collect();
            (e.len() == 4).then_some(e)
        }
    })
    .await;
    let text: Vec<&str> = evs.iter().map(|e| e.message.as_str()).collect();
    assert!(
        text.iter()
            .any(|m| m.contains("value is not finite") && m.contains(TEMP)),
        "{text:?}"
    );
    assert!(
        text.iter()
            .any(|m| m.contains("value type bool does not fit declared type float")),
        "{text:?}"
    );
    assert!(text.iter().any(|m| m.contains("in the future")), "{text:?}");
    assert!(
        text.iter()
            .any(|m| m.contains("property state does not exist on a sensor")),
        "{text:?}"
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sensor_without_readings_turns_stale_and_recovers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    push(&site, vec![float(FORCE, 3.0)]).await;
    // Period 100 ms × 3: stale after 300 ms without a reading.
    let q = wait_for(10, "force turns stale", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, FORCE).await;
            let q = t.sensor.and_then(|s| s.quality).expect("quality");
            (q.reason == "stale").then_some(q)
        }
    })
    .await;
    assert_eq!(q.code, pb::QualityCode::Uncertain as i32);
    let evs = events(&mut c, FORCE).await;
    assert!(
        evs.iter()
            .any(|e| e.kind == "quality" && e.message.contains("stale")),
        "{evs:?}"
    );
    push(&site, vec![float(FORCE, 4.0)]).await;
    wait_for(5, "force good again", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, FORCE).await;
            (t.sensor.and_then(|s| s.quality).expect("quality").code
                == pb::QualityCode::Good as i32)
                .then_some(())
        }
    })
    .await;
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_batch_passes_when_idle_and_a_closed_router_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.ingest.max_inflight_readings = 8;
    let site = start_in(dir.path(), opts).await;
    let batch: Vec<Reading> = (0..9).map(|i| float(FORCE, f64::from(i))).collect();
    // Nothing in flight: a batch above the whole budget is slow, not refused forever.
    site.rt
        .ingest()
        .try_push(batch.clone())
        .expect("taken when idle");
    let router = site.rt.ingest();
    site.rt.shutdown().await;
    let err = router.try_push(batch).expect_err("closed");
    assert_eq!(err.why, PushBackReason::Closed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_readings_is_counted_in_full_but_raises_one_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let c = site.client.clone();
    let id = path(TEMP).id();
    let garbage: Vec<Reading> = (0..100)
        .map(|_| Reading::good(id, Property::Value, Value::Float(f64::INFINITY), now()))
        .collect();
    push(&site, garbage).await;
    let t = wait_for(5, "all rejections counted", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (t.sensor.as_ref().expect("sensor").rejected == 100).then_some(t)
        }
    })
    .await;
    assert_eq!(t.sensor.expect("sensor").rejected, 100);
    let mut c = c.clone();
    let rejected: Vec<pb::Event> = events(&mut c, TEMP)
        .await
        .into_iter()
        .filter(|e| e.kind == "rejected")
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_reading_goes_to_history_but_a_clock_step_back_is_taken_as_current() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let c = site.client.clone();
    let id = path(FORCE).id();
    let t0 = now();
    let at = |ms: i64, v: f64| Reading::good(id, Property::Value, Value::Float(v), t0.plus_ms(ms));
    push(&site, vec![at(0, 1.0)]).await;
    push(&site, vec![at(-500, 2.0)]).await; // late by 0.5 s
    push(&site, vec![at(-3_600_000, 3.0)]).await; // an hour back: the clock stepped
    let t = wait_for(5, "clock step taken as current", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, FORCE).await;
            (float_of(&t) == Some(3.0)).then_some(t)
        }
    })
    .await;
    assert_eq!(
        t.sensor.expect("sensor").source_ts_us,
        t0.plus_ms(-3_600_000).0
    );
    let mut c = c.clone();
    let evs = events(&mut c, FORCE).await;
    assert!(
        evs.iter()
            .any(|e| e.message.contains("source clock went back")),
        "{evs:?}"
    );
    let h = c
        .get_history(pb::GetHistoryRequest {
            path: FORCE.into(),
            from_us: t0.plus_ms(-7_200_000).0,
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    let values: Vec<f64> = h.points.iter().map(|p| p.value).collect();
    assert_eq!(values, vec![3.0, 2.0, 1.0], "all three kept, in time order");
    site.rt.shutdown().await;
}

/// After a link loss (the adapter's Bad CommFailure marker, stamped when the link went) the
/// first value from the source is current even with an older source time: an unchanged
/// setpoint comes back with the time it was last written. Before the fix such a twin stayed
/// Bad until its source time was a minute behind (the clock-step rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_link_loss_the_first_value_is_current_even_with_its_older_source_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let c = site.client.clone();
    let id = path(FORCE).id();
    let t0 = now();
    let written = t0.plus_ms(-2_000);
    push(
        &site,
        vec![Reading::good(
            id,
            Property::Value,
            Value::Float(55.0),
            written,
        )],
    )
    .await;
    let lost = Reading {
        asset: id,
        property: Property::Value,
        value: Value::Float(55.0),
        quality: Quality::bad(QualityReason::CommFailure),
        source_ts: t0,
    };
    push(&site, vec![lost]).await;
    wait_for(5, "the twin Bad after the link loss", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, FORCE).await;
            (t.sensor?.quality?.code == pb::QualityCode::Bad as i32).then_some(())
        }
    })
    .await;
    // Back: the same value with the time it was written, before the marker.
    push(
        &site,
        vec![Reading::good(
            id,
            Property::Value,
            Value::Float(55.0),
            written,
        )],
    )
    .await;
    let t = wait_for(5, "the twin Good again", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, FORCE).await;
            (t.sensor.as_ref()?.quality.as_ref()?.code == pb::QualityCode::Good as i32).then_some(t)
        }
    })
    .await;
    assert_eq!(t.sensor.expect("sensor").source_ts_us, written.0);
    site.rt.shutdown().await;
}

/// A machine's state from a PLC's boolean (true running, false idle) or from the PLC's own
/// codes by its type's `state_map`; a code the map does not list is refused, counted and
/// evented, and the state stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_state_comes_from_a_bool_or_the_types_state_map() {
    const OVEN: &str = "acme/berlin/assembly/line-1/oven-1";
    let text = PLANT.replace(
        "[machine_types.oven]\nideal_cycle_ms = 60000",
        "[machine_types.oven]\nideal_cycle_ms = 60000\nstate_map = { \"5\" = \"running\", \"9\" = \"idle\", \"13\" = \"down\" }",
    );
    let spec = ferrotwin_models::spec::PlantSpec::from_toml(&text, "mapped").expect("valid");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.twins.reject_event_interval_ms = 0;
    let site = start_plant_in(&spec, dir.path(), opts).await;
    let state = |p: &str, v: Value| Reading::good(path(p).id(), Property::State, v, now());
    let wait_state = |p: &'static str, want: &'static str| {
        let c = site.client.clone();
        async move {
            wait_for(20, want, || {
                let mut c = c.clone();
                async move {
                    let m = get(&mut c, p).await.machine?;
                    (m.state == want).then_some(())
                }
            })
            .await;
        }
    };
    push(&site, vec![state(PRESS, Value::Bool(true))]).await;
    wait_state(PRESS, "running").await;
    push(&site, vec![state(PRESS, Value::Bool(false))]).await;
    wait_state(PRESS, "idle").await;
    push(&site, vec![state(OVEN, Value::Int(5))]).await;
    wait_state(OVEN, "running").await;
    push(&site, vec![state(OVEN, Value::Float(13.0))]).await;
    wait_state(OVEN, "down").await;
    // Code 1 means running by default, not for this oven: refused with a reason.
    let before = site
        .rt
        .metrics()
        .rejected_wrong_type
        .load(Ordering::Relaxed);
    push(&site, vec![state(OVEN, Value::Int(1))]).await;
    let mut c = site.client.clone();
    let ev = wait_for(20, "the refusal evented", || {
        let mut c = c.clone();
        async move {
            events(&mut c, OVEN)
                .await
                .into_iter()
                .find(|e| e.kind == "rejected" && e.message.contains("state_map"))
        }
    })
    .await;
    assert!(ev.message.contains("state"), "{}", ev.message);
    assert!(
        site.rt
            .metrics()
            .rejected_wrong_type
            .load(Ordering::Relaxed)
            > before
    );
    assert_eq!(
        get(&mut c, OVEN).await.machine.expect("a machine").state,
        "down"
    );
    site.rt.shutdown().await;
}
