//! Crash and restart on the same data dir: twins, active alarms, events and history come
//! back. A clean shutdown also keeps the unflushed history tail.

use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrotwin_proto::v1 as pb;

use crate::common::*;

async fn history(c: &mut Client, p: &str) -> pb::GetHistoryResponse {
    c.get_history(pb::GetHistoryRequest {
        path: p.into(),
        property: String::new(),
        from_us: 0,
        to_us: 0,
        max_points: 0,
    })
    .await
    .expect("history")
    .into_inner()
}

type Client =
    ferrotwin_proto::v1::twin_service_client::TwinServiceClient<tonic::transport::Channel>;

/// Waits until the store writer has completed two more flushes (so everything published
/// before the call is on disk).
async fn flushed(site: &Site) {
    let stats = site.rt.store_stats();
    let n = stats.flushes.load(Ordering::Relaxed);
    wait_for(10, "two store flushes", || async move {
        (stats.flushes.load(Ordering::Relaxed) >= n + 2).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_twins_alarms_events_and_history_come_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    // 9 readings: two full chunks of 4 are written, one stays in the tail.
    for i in 0..9 {
        push(&site, vec![float(TEMP, 60.0 + f64::from(i) * 5.0)]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t = wait_for(5, "alarm raised at 100", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (float_of(&t) == Some(100.0)).then_some(t)
        }
    })
    .await;
    assert_eq!(alarm_state(&t, "high"), pb::AlarmState::ActiveUnacked);
    flushed(&site).await;
    let events_before = events(&mut c, TEMP).await.len();
    assert!(events_before >= 1);
    site.rt.abort().await;

    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    let t = get(&mut c, TEMP).await;
    assert_eq!(float_of(&t), Some(100.0), "last value restored");
    assert_eq!(
        alarm_state(&t, "high"),
        pb::AlarmState::ActiveUnacked,
        "active alarm restored"
    );
    let line = wait_for(5, "roll-up rebuilt from restored twins", || {
        let mut c = c.clone();
        async move {
            let r = get(&mut c, "acme/berlin/assembly/line-1")
                .await
                .rollup
                .expect("rollup");
            (r.active_alarms == 1).then_some(r)
        }
    })
    .await;
    assert_eq!(line.unacked_alarms, 1);
    assert_eq!(
        events(&mut c, TEMP).await.len(),
        events_before,
        "events restored"
    );
    let h = history(&mut c, TEMP).await;
    // The two written chunks survive; the unwritten tail of one reading is what a crash loses.
    assert_eq!(h.raw_points, 8, "{h:?}");
    assert_eq!(h.points.first().map(|p| p.value), Some(60.0));
    // New events continue the sequence instead of overwriting.
    push(&site, vec![float(TEMP, 10.0)]).await;
    let evs = wait_for(5, "new event after restart", || {
        let mut c = c.clone();
        async move {
            let e = events(&mut c, TEMP).await;
            (e.len() > events_before).then_some(e)
        }
    })
    .await;
    let seqs: Vec<u64> = evs.iter().map(|e| e.seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_keeps_every_reading_of_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    for i in 0..9 {
        push(&site, vec![float(FORCE, f64::from(i))]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    wait_float(&c, FORCE, 8.0, 5, "last force value").await;
    assert_eq!(
        history(&mut c, FORCE).await.raw_points,
        9,
        "chunks plus the live tail"
    );
    site.rt.shutdown().await;

    let site = start_in(dir.path(), options()).await;
    let mut c = site.client.clone();
    let h = history(&mut c, FORCE).await;
    assert_eq!(h.raw_points, 9);
    assert_eq!(
        h.points.iter().map(|p| p.value).collect::<Vec<_>>(),
        (0..9).map(f64::from).collect::<Vec<_>>()
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_that_is_not_a_store_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("conf"), b"this is not sled").expect("write");
    std::fs::write(dir.path().join("db"), vec![0xAB; 4096]).expect("write");
    let err = ferrotwin_runtime::Runtime::start(&spec(), dir.path(), options())
        .await
        .err()
        .expect("must refuse");
    let msg = err.to_string();
    assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_shutdown_writes_every_snapshot_past_the_per_flush_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.store.max_snapshots_per_flush = 1;
    opts.store.flush_interval_ms = 60_000;
    let site = start_in(dir.path(), opts.clone()).await;
    let c = site.client.clone();
    push(
        &site,
        vec![
            float(TEMP, 1.0),
            float(FORCE, 2.0),
            float("acme/berlin/assembly/line-1/oven-1/zone-temp", 3.0),
        ],
    )
    .await;
    wait_float(&c, FORCE, 2.0, 5, "values applied").await;
    site.rt.shutdown().await;
    let site = start_in(dir.path(), opts).await;
    let mut c = site.client.clone();
    assert_eq!(float_of(&get(&mut c, TEMP).await), Some(1.0));
    assert_eq!(float_of(&get(&mut c, FORCE).await), Some(2.0));
    assert_eq!(
        float_of(&get(&mut c, "acme/berlin/assembly/line-1/oven-1/zone-temp").await),
        Some(3.0)
    );
    site.rt.shutdown().await;
}
