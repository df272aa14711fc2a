//! Site → enterprise replication over real gRPC on loopback: state and events arrive, once,
//! whatever dies in between.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ferrotwin_cli::relay::Relay;
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_client::ReplicationServiceClient;
use ferrotwin_runtime::{
    EnterpriseRole, HistoryPolicy, Runtime, RuntimeOptions, SiteReplication, testing,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::common::*;

fn two_dirs() -> (tempfile::TempDir, tempfile::TempDir) {
    (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    )
}

/// Readings `forces` one by one: TEMP alternating between the two values of `temps`
/// (raising and clearing its high alarm: events), FORCE = the index; a pause between them.
async fn churn(site: &Site, forces: std::ops::Range<i32>, temps: (f64, f64), pause_ms: u64) {
    for i in forces {
        let v = if i % 2 == 0 { temps.0 } else { temps.1 };
        push(site, vec![float(TEMP, v), float(FORCE, f64::from(i))]).await;
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
}

fn enterprise_options() -> RuntimeOptions {
    let mut o = options();
    o.enterprise = Some(EnterpriseRole {
        accept: vec!["acme/berlin".into()],
    });
    o
}

fn site_options(enterprise: SocketAddr) -> RuntimeOptions {
    let mut o = options();
    let mut r = SiteReplication::new(format!("http://{enterprise}"));
    r.reconnect_min_ms = 20;
    r.reconnect_max_ms = 200;
    o.replication = Some(r);
    o
}

/// Starts a runtime serving gRPC on `addr` (a port freed a moment ago: retried while the OS
/// still holds it).
async fn start_on(dir: &Path, opts: RuntimeOptions, addr: SocketAddr) -> Site {
    let rt = Runtime::start(&spec(), dir, opts)
        .await
        .expect("runtime starts");
    let listener = wait_for(20, "the port to be free again", || async {
        tokio::net::TcpListener::bind(addr).await.ok()
    })
    .await;
    rt.serve_grpc(listener).expect("serve");
    let client = ferrotwin_proto::v1::twin_service_client::TwinServiceClient::connect(format!(
        "http://{addr}"
    ))
    .await
    .expect("connect");
    Site { rt, client, addr }
}

/// Waits until the site's outbox is empty and everything it staged is acked.
async fn wait_all_acked(site: &Site) {
    wait_for(30, "the enterprise to ack everything", || async {
        if testing::dirty_twins(&site.rt) > 0 {
            testing::nudge_store(&site.rt);
            return None;
        }
        // The flush after this moment has staged every twin that was dirty before it.
        site.rt.store_flushed().await;
        let lag = site
            .rt
            .outbox_lag()
            .expect("a replicating site has an outbox");
        (lag.count == 0 && lag.acked_seq == lag.last_seq).then_some(())
    })
    .await;
}

/// (asset, ts, message) of every event under the site, counted.
async fn event_counts(site: &mut Site) -> HashMap<(String, i64, String), usize> {
    let mut counts = HashMap::new();
    for e in events(&mut site.client, "acme/berlin").await {
        *counts
            .entry((e.path.clone(), e.ts_us, e.message.clone()))
            .or_default() += 1;
    }
    counts
}

fn assert_same_events_once(
    site: &HashMap<(String, i64, String), usize>,
    ent: &HashMap<(String, i64, String), usize>,
) {
    for (k, n) in ent {
        assert_eq!(*n, 1, "event applied {n} times at the enterprise: {k:?}");
    }
    for k in site.keys() {
        assert!(
            ent.contains_key(k),
            "event missing at the enterprise: {k:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_state_and_events_reach_the_enterprise_and_acks_trim_the_outbox() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let site = start_in(sd.path(), site_options(ent.addr)).await;
    push(&site, vec![float(TEMP, 95.0), float(FORCE, 12.5)]).await;
    wait_for(20, "the mirror to show the value and the alarm", || {
        let mut c = ent.client.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (float_of(&t) == Some(95.0) && alarm_state(&t, "high") == pb::AlarmState::ActiveUnacked)
                .then_some(())
        }
    })
    .await;
    wait_for(20, "the alarm event at the enterprise", || {
        let mut c = ent.client.clone();
        async move {
            events(&mut c, TEMP)
                .await
                .iter()
                .any(|e| e.message.contains("raised"))
                .then_some(())
        }
    })
    .await;
    // Roll-ups are computed at the enterprise from the mirrors.
    wait_for(
        20,
        "the line's roll-up at the enterprise to count the alarm",
        || {
            let mut c = ent.client.clone();
            async move {
                let line = get(&mut c, "acme/berlin/assembly/line-1").await;
                line.rollup
                    .is_some_and(|r| r.active_alarms >= 1)
                    .then_some(())
            }
        },
    )
    .await;
    wait_all_acked(&site).await;
    let status = testing::sender(&site.rt).expect("sender");
    assert!(status.connected.load(Ordering::Relaxed));
    assert!(status.bytes_sent.load(Ordering::Relaxed) > 0);
    // Both ends say so over the API; mirrors carry their freshness.
    let mut sc = site.client.clone();
    let s = sc
        .get_replication_status(pb::GetReplicationStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let link = s.link.expect("a site link");
    assert_eq!((s.role.as_str(), link.connected), ("site", true));
    assert_eq!((link.outbox_batches, link.acked_seq), (0, link.last_seq));
    let e = ent
        .client
        .get_replication_status(pb::GetReplicationStatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(e.role, "enterprise");
    assert_eq!(e.sites.len(), 1);
    assert_eq!(e.sites[0].applied_seq, link.acked_seq);
    assert!(e.sites[0].age_ms >= 0);
    assert!(get(&mut ent.client, TEMP).await.mirror_age_ms.is_some());
    // And in the metrics.
    let m = site.rt.render_metrics();
    assert!(m.contains("ferrotwin_outbox_batches 0"), "{m}");
    let m = ent.rt.render_metrics();
    assert!(
        m.contains("ferrotwin_site_sync_age_seconds{site=\"acme/berlin\"}"),
        "{m}"
    );
    assert!(get(&mut sc, TEMP).await.mirror_age_ms.is_none());
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enterprise_down_under_load_then_back_gets_every_event_once_and_the_final_state() {
    let (ed, sd) = two_dirs();
    let ent = start_in(ed.path(), enterprise_options()).await;
    let ent_addr = ent.addr;
    let mut site = start_in(sd.path(), site_options(ent_addr)).await;
    push(&site, vec![float(TEMP, 20.0)]).await;
    wait_all_acked(&site).await;
    ent.rt.shutdown().await;

    // Under load while the enterprise is away: alarms raised and cleared, values moving.
    churn(&site, 0..60, (95.0, 40.0), 5).await;
    push(&site, vec![float(TEMP, 33.0), float(FORCE, 1234.0)]).await;
    wait_float(
        &site.client,
        FORCE,
        1234.0,
        10,
        "the site to apply the last values",
    )
    .await;
    assert!(
        site.rt.outbox_lag().expect("outbox").count > 0,
        "the outbox holds the backlog"
    );

    let mut ent = start_on(ed.path(), enterprise_options(), ent_addr).await;
    wait_all_acked(&site).await;
    assert_eq!(float_of(&get(&mut ent.client, FORCE).await), Some(1234.0));
    assert_eq!(float_of(&get(&mut ent.client, TEMP).await), Some(33.0));
    let site_events = event_counts(&mut site).await;
    let ent_events = event_counts(&mut ent).await;
    assert!(
        site_events.len() >= 60,
        "alarm churn made events: {}",
        site_events.len()
    );
    assert_same_events_once(&site_events, &ent_events);
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_site_resumes_from_the_last_ack_without_loss_or_duplicates() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let site = start_in(sd.path(), site_options(ent.addr)).await;
    churn(&site, 0..20, (95.0, 40.0), 5).await;
    // Power cut mid-stream: no clean shutdown, whatever was not flushed is gone.
    site.rt.abort().await;
    let mut site = start_in(sd.path(), site_options(ent.addr)).await;
    churn(&site, 0..20, (96.0, 41.0), 5).await;
    push(&site, vec![float(FORCE, 77.0)]).await;
    wait_float(
        &ent.client,
        FORCE,
        77.0,
        20,
        "the last value at the enterprise",
    )
    .await;
    wait_all_acked(&site).await;
    assert_same_events_once(
        &event_counts(&mut site).await,
        &event_counts(&mut ent).await,
    );
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_enterprise_restarts_with_everything_it_acked() {
    let (ed, sd) = two_dirs();
    let ent = start_in(ed.path(), enterprise_options()).await;
    let ent_addr = ent.addr;
    let mut site = start_in(sd.path(), site_options(ent_addr)).await;
    churn(&site, 0..20, (95.0, 40.0), 5).await;
    wait_float(
        &site.client,
        FORCE,
        19.0,
        10,
        "the site to apply the last values",
    )
    .await;
    wait_all_acked(&site).await;
    ent.rt.abort().await;
    // Restarted on its data dir and a new port the site does not know: what it has is only
    // what it acked before the kill.
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    assert_eq!(float_of(&get(&mut ent.client, FORCE).await), Some(19.0));
    assert_same_events_once(
        &event_counts(&mut site).await,
        &event_counts(&mut ent).await,
    );
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// A raw client speaking the protocol.
async fn raw_stream(
    ent: SocketAddr,
    site: &str,
    batches: Vec<pb::ReplicateRequest>,
) -> Result<Vec<pb::ReplicateResponse>, tonic::Status> {
    // Claims every batch and event: never rewinds the enterprise.
    raw_stream_claiming(ent, site, u64::MAX, batches).await
}

/// `raw_stream` with a hello that says the site's last batch is `last_seq`.
async fn raw_stream_claiming(
    ent: SocketAddr,
    site: &str,
    last_seq: u64,
    batches: Vec<pb::ReplicateRequest>,
) -> Result<Vec<pb::ReplicateResponse>, tonic::Status> {
    retry_while_stream_busy(|| raw_stream_once(ent, site, last_seq, batches.clone())).await
}

/// One raw stream, no retry.
async fn raw_stream_once(
    ent: SocketAddr,
    site: &str,
    last_seq: u64,
    batches: Vec<pb::ReplicateRequest>,
) -> Result<Vec<pb::ReplicateResponse>, tonic::Status> {
    let mut client = ReplicationServiceClient::connect(format!("http://{ent}"))
        .await
        .expect("connect");
    let mut msgs = vec![pb::ReplicateRequest {
        msg: Some(pb::replicate_request::Msg::Hello(pb::SiteHello {
            protocol_version: 2,
            site: site.into(),
            agent: "test".into(),
            last_seq,
            event_hwm: u64::MAX,
            ..Default::default()
        })),
    }];
    let expected_acks = batches.len();
    msgs.extend(batches);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for m in msgs {
        tx.send(m).await.expect("queue");
    }
    let mut responses = client
        .replicate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while out.len() < expected_acks + 1 {
        match tokio::time::timeout(Duration::from_secs(20), responses.message()).await {
            Ok(Ok(Some(m))) => out.push(m),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err(e),
            Err(_) => panic!("no answer from the enterprise"),
        }
    }
    drop(tx);
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_batch_is_applied_once_and_acked_again() {
    let ed = tempfile::tempdir().expect("dir");
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let answers = raw_stream(
        ent.addr,
        "acme/berlin",
        vec![
            batch_with_event(1, 10, "replayed once"),
            batch_with_event(1, 10, "replayed once"),
            batch_with_event(2, 10, "same event seq in a new batch"),
        ],
    )
    .await
    .expect("stream");
    let acks: Vec<u64> = answers
        .iter()
        .filter_map(|a| match a.msg {
            Some(pb::replicate_response::Msg::Ack(s)) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(acks, vec![1, 1, 2]);
    let evs = events(&mut ent.client, TEMP).await;
    assert_eq!(
        evs.iter().filter(|e| e.message == "replayed once").count(),
        1
    );
    assert!(!evs.iter().any(|e| e.message.contains("same event seq")));
    // A new stream resumes after what was applied.
    let again = raw_stream(ent.addr, "acme/berlin", vec![])
        .await
        .expect("stream");
    match &again[0].msg {
        Some(pb::replicate_response::Msg::Welcome(w)) => assert_eq!(w.last_applied_seq, 2),
        other => panic!("expected a welcome, got {other:?}"),
    }
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_the_enterprise_does_not_accept_is_refused_with_permission_denied() {
    let ed = tempfile::tempdir().expect("dir");
    let ent = start_in(ed.path(), enterprise_options()).await;
    let err = raw_stream(ent.addr, "acme/paris", vec![])
        .await
        .expect_err("refused");
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    assert!(err.message().contains("acme/paris"), "{err}");
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_reset_mid_batch_again_and_again_apply_every_batch_once() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let cable = Relay::to(ent.addr).await.expect("relay");
    let mut site = start_in(sd.path(), site_options(cable.addr)).await;
    for round in 0..6 {
        churn(&site, round * 10..round * 10 + 10, (95.0, 40.0), 3).await;
        // Reset whatever is in flight, then let it reconnect.
        cable.cut();
        tokio::time::sleep(Duration::from_millis(20)).await;
        cable.restore();
    }
    push(&site, vec![float(FORCE, 999.0)]).await;
    wait_all_acked(&site).await;
    wait_float(
        &ent.client,
        FORCE,
        999.0,
        20,
        "the final value at the enterprise",
    )
    .await;
    let status = testing::sender(&site.rt).expect("sender");
    assert!(
        status.connects.load(Ordering::Relaxed) >= 2,
        "the stream was reset and resumed"
    );
    assert_same_events_once(
        &event_counts(&mut site).await,
        &event_counts(&mut ent).await,
    );
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_enterprise_does_not_slow_the_site_and_its_lag_grows_then_shrinks() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let cable = Relay::to(ent.addr).await.expect("relay");
    let site = start_in(sd.path(), site_options(cable.addr)).await;
    push(&site, vec![float(FORCE, 1.0)]).await;
    wait_all_acked(&site).await;
    // A link of a few hundred bytes per second: far below what the site produces.
    cable.throttle(300);
    churn(&site, 0..200, (95.0, 40.0), 2).await;
    // The site applied everything at its own pace...
    wait_float(
        &site.client,
        FORCE,
        199.0,
        10,
        "the site to apply the last value",
    )
    .await;
    // ...while the enterprise is behind: the outbox holds the difference, visibly.
    let backlog = wait_for(10, "a backlog in the outbox", || async {
        testing::nudge_store(&site.rt);
        let lag = site.rt.outbox_lag().expect("outbox");
        (lag.count >= 2 && lag.oldest_unacked_us.is_some()).then_some(lag)
    })
    .await;
    assert!(backlog.bytes > 0);
    assert_ne!(float_of(&get(&mut ent.client, FORCE).await), Some(199.0));
    // The link recovers: the lag shrinks to nothing and the enterprise has it all.
    cable.throttle(0);
    wait_all_acked(&site).await;
    assert_eq!(float_of(&get(&mut ent.client, FORCE).await), Some(199.0));
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

async fn history_len(
    c: &mut ferrotwin_proto::v1::twin_service_client::TwinServiceClient<tonic::transport::Channel>,
    p: &str,
) -> usize {
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
    .points
    .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_replicates_as_each_machine_types_policy_says() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let mut opts = site_options(ent.addr);
    let r = opts.replication.as_mut().expect("replication");
    r.history = HistoryPolicy::StateOnly;
    r.history_by_type.insert("press".into(), HistoryPolicy::Raw);
    let site = start_in(sd.path(), opts).await;
    const ZONE: &str = "acme/berlin/assembly/line-1/oven-1/zone-temp";
    let t0 = now();
    // Sixteen readings each, 10 ms apart in source time: four full chunks of four.
    for i in 0..16 {
        let ts = t0.plus_ms(i * 10);
        push(
            &site,
            vec![
                ferrotwin_models::Reading::good(
                    path(TEMP).id(),
                    ferrotwin_models::Property::Value,
                    ferrotwin_models::Value::Float(20.0 + i as f64),
                    ts,
                ),
                ferrotwin_models::Reading::good(
                    path(ZONE).id(),
                    ferrotwin_models::Property::Value,
                    ferrotwin_models::Value::Float(200.0 + i as f64),
                    ts,
                ),
            ],
        )
        .await;
    }
    wait_for(20, "the press's raw history at the enterprise", || {
        let mut c = ent.client.clone();
        async move { (history_len(&mut c, TEMP).await == 16).then_some(()) }
    })
    .await;
    wait_all_acked(&site).await;
    assert_eq!(
        history_len(&mut ent.client, ZONE).await,
        0,
        "state only for ovens"
    );
    let mut sc = site.client.clone();
    assert_eq!(
        history_len(&mut sc, ZONE).await,
        16,
        "the site keeps its own"
    );
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// The test plant with a second site, `paris`, of the same shape.
fn two_site_spec() -> ferrotwin_models::spec::PlantSpec {
    let text = format!(
        "{PLANT}\n[[sites]]\nname = \"paris\"\n[[sites.areas]]\nname = \"assembly\"\n\
         [[sites.areas.lines]]\nname = \"line-1\"\nmachines = [{{ name = \"press-1\", type = \"press\" }}, \
         {{ name = \"oven-1\", type = \"oven\" }}]\n"
    );
    ferrotwin_models::spec::PlantSpec::from_toml(&text, "two sites").expect("valid")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_enterprise_ranks_machines_of_one_type_across_sites() {
    let full = two_site_spec();
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut eo = options();
    eo.enterprise = Some(EnterpriseRole {
        accept: vec!["acme/berlin".into(), "acme/paris".into()],
    });
    let mut ent = start_plant_in(&full, dirs[0].path(), eo).await;
    let mut sites = Vec::new();
    for (i, name) in ["berlin", "paris"].iter().enumerate() {
        let mut spec = full.clone();
        spec.sites.retain(|s| s.name == *name);
        let site = start_plant_in(&spec, dirs[i + 1].path(), site_options(ent.addr)).await;
        let temp = TEMP.replace("berlin", name);
        push(&site, vec![float(&temp, if i == 0 { 70.0 } else { 90.0 })]).await;
        sites.push(site);
    }
    let ranked = wait_for(20, "both presses ranked at the enterprise", || {
        let mut c = ent.client.clone();
        async move {
            let r = c
                .query(pb::QueryRequest {
                    query: "type = press".into(),
                    order_by: "temp".into(),
                    ..Default::default()
                })
                .await
                .expect("query")
                .into_inner()
                .twins;
            let paths: Vec<String> = r.into_iter().map(|t| t.path).collect();
            (paths
                == [
                    "acme/paris/assembly/line-1/press-1",
                    "acme/berlin/assembly/line-1/press-1",
                ])
            .then_some(paths)
        }
    })
    .await;
    assert_eq!(ranked.len(), 2);
    let asc = ent
        .client
        .query(pb::QueryRequest {
            query: "type = press".into(),
            order_by: "temp".into(),
            ascending: true,
            ..Default::default()
        })
        .await
        .expect("query")
        .into_inner()
        .twins;
    assert_eq!(asc[0].path, "acme/berlin/assembly/line-1/press-1");
    let err = ent
        .client
        .query(pb::QueryRequest {
            query: "type = press".into(),
            order_by: "temp".into(),
            page_token: "acme".into(),
            ..Default::default()
        })
        .await
        .expect_err("no paging of ranked results");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    for s in sites {
        s.rt.shutdown().await;
    }
    ent.rt.shutdown().await;
}

async fn mirrored(ent: &mut Site) -> pb::MirroredSite {
    ent.client
        .get_replication_status(pb::GetReplicationStatusRequest {})
        .await
        .expect("status")
        .into_inner()
        .sites
        .into_iter()
        .find(|s| s.site == "acme/berlin")
        .expect("berlin is mirrored")
}

/// A forger (a peer claiming the site, as on an open loopback enterprise) tries every way
/// to poison the cursors: each is refused, or undone at the real site's hello; the real
/// site's state and events then arrive whole, and the gap is an event at the enterprise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_seq_and_event_jumps_are_refused_or_undone_and_the_real_site_arrives_whole() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let refused = |r: Result<Vec<pb::ReplicateResponse>, tonic::Status>| {
        let e = r.expect_err("refused");
        assert!(
            matches!(
                e.code(),
                tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument
            ),
            "{e}"
        );
        assert!(e.message().contains("refused, nothing applied"), "{e}");
        assert!(e.message().len() < 400, "a bounded message: {e}");
    };
    // The forger's hello says it has batches up to 10.
    let forge = |batch| raw_stream_claiming(ent.addr, "acme/berlin", 10, vec![batch]);
    // A seq at the end of the range; a batch whose predecessor never arrived; an event
    // 10^12 past the one its batch says came before it.
    refused(forge(raw_batch(u64::MAX, 0, 0, &[])).await);
    refused(forge(raw_batch(1, 5, 0, &[])).await);
    refused(forge(raw_batch(1, 0, 1, &[(1_000_000_000_000, "event jump")])).await);
    // Accepted: a forged batch 1 with event 5; then events 6..=100 that never came (a
    // site cannot send again what it lost: reported, not refused); then a skip of seqs.
    forge(raw_batch(1, 0, 0, &[(5, "forged event")]))
        .await
        .expect("a batch that continues the cursor is applied");
    forge(raw_batch(2, 1, 100, &[(101, "after a gap")]))
        .await
        .expect("a gap in the events is applied and reported");
    forge(raw_batch(1000, 2, 101, &[]))
        .await
        .expect("a skip of batches is applied and reported");
    let m = mirrored(&mut ent).await;
    assert_eq!((m.applied_seq, m.event_seq), (1000, 101));
    assert_eq!(m.refused, 3, "{m:?}");
    assert_eq!(m.skipped_batches, 997, "{m:?}");
    assert_eq!(m.event_gaps, 95, "{m:?}");
    let metrics = ent.rt.render_metrics();
    for line in [
        "ferrotwin_replication_batches_total{site=\"acme/berlin\",outcome=\"refused\"} 3",
        "ferrotwin_replication_events_total{site=\"acme/berlin\",outcome=\"never arrived\"} 95",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    // The real site: its hello says it has far less; the enterprise rewinds.
    let mut site = start_in(sd.path(), site_options(ent.addr)).await;
    churn(&site, 0..10, (95.0, 40.0), 5).await;
    push(&site, vec![float(FORCE, 4242.0)]).await;
    wait_all_acked(&site).await;
    wait_float(
        &ent.client,
        FORCE,
        4242.0,
        20,
        "the real value at the enterprise",
    )
    .await;
    let m = mirrored(&mut ent).await;
    assert!(m.rewinds >= 1, "{m:?}");
    assert!(m.applied_seq < 1000, "{m:?}");
    let site_events = event_counts(&mut site).await;
    let ent_events = event_counts(&mut ent).await;
    assert_same_events_once(&site_events, &ent_events);
    let messages: Vec<&str> = ent_events.keys().map(|k| k.2.as_str()).collect();
    assert!(
        !messages.contains(&"event jump"),
        "the event jump was applied"
    );
    assert!(
        messages.iter().any(|m| m.contains("never arrived")),
        "the event gap is an event at the enterprise: {messages:?}"
    );
    assert!(
        messages
            .iter()
            .any(|m| m.contains("reconciled with the site")),
        "the rewind is an event at the enterprise: {messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.contains("rewound to")),
        "the site reported it too: {messages:?}"
    );
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// Hellos for a live site, ten a second from another client, are refused: the site keeps its
/// one stream and its data keeps arriving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_storm_does_not_displace_a_live_site() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let site = start_in(sd.path(), site_options(ent.addr)).await;
    push(&site, vec![float(FORCE, 1.0)]).await;
    wait_float(&ent.client, FORCE, 1.0, 20, "the first value").await;
    let status = testing::sender(&site.rt).expect("sender");
    let connects = status.connects.load(Ordering::Relaxed);
    let mut storm = Vec::new();
    for _ in 0..20 {
        storm.push(tokio::spawn(raw_stream_once(
            ent.addr,
            "acme/berlin",
            u64::MAX,
            Vec::new(),
        )));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for s in storm {
        let e = s
            .await
            .expect("task")
            .expect_err("a second stream is refused");
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e}");
        assert!(
            e.message()
                .contains("already has an open replication stream"),
            "{e}"
        );
    }
    push(&site, vec![float(FORCE, 2.0)]).await;
    wait_float(&ent.client, FORCE, 2.0, 20, "the value after the storm").await;
    assert_eq!(
        status.connects.load(Ordering::Relaxed),
        connects,
        "the site's stream was never displaced"
    );
    assert_eq!(mirrored(&mut ent).await.streams_refused, 20);
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// An enterprise restored from an older copy of its data dir has lost batches the site
/// already trimmed: the site sends a full snapshot, and the gap is an event at the site.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enterprise_restored_from_an_old_copy_gets_a_full_snapshot_and_the_gap_is_reported() {
    let (ed, sd) = two_dirs();
    let old = tempfile::tempdir().expect("dir");
    let ent = start_in(ed.path(), enterprise_options()).await;
    let addr = ent.addr;
    let site = start_in(sd.path(), site_options(addr)).await;
    push(&site, vec![float(FORCE, 1.0)]).await;
    wait_all_acked(&site).await;
    ent.rt.shutdown().await;

    copy_dir(ed.path(), old.path());
    let ent = start_on(ed.path(), enterprise_options(), addr).await;
    churn(&site, 0..6, (95.0, 40.0), 5).await;
    push(&site, vec![float(FORCE, 77.0)]).await;
    wait_all_acked(&site).await;
    ent.rt.shutdown().await;

    // The restore: the enterprise comes back with what it had before the churn.
    let ent = start_on(old.path(), enterprise_options(), addr).await;
    wait_float(
        &ent.client,
        FORCE,
        77.0,
        30,
        "the site's state after the restore",
    )
    .await;
    wait_for(20, "the gap reported at the site", || {
        let mut c = site.client.clone();
        async move {
            events(&mut c, "acme/berlin")
                .await
                .iter()
                .any(|e| e.message.contains("are lost there"))
                .then_some(())
        }
    })
    .await;
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

/// A stream that says hello and then nothing (a half-open link, or an impostor that holds
/// the door) is replaced by the site's own once it has been silent for the live window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_stream_does_not_hold_the_real_site_off() {
    let (ed, sd) = two_dirs();
    let mut ent = start_in(ed.path(), enterprise_options()).await;
    let mut client = ReplicationServiceClient::connect(format!("http://{}", ent.addr))
        .await
        .expect("connect");
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(pb::ReplicateRequest {
        msg: Some(pb::replicate_request::Msg::Hello(pb::SiteHello {
            protocol_version: 2,
            site: "acme/berlin".into(),
            agent: "silent".into(),
            last_seq: u64::MAX,
            event_hwm: u64::MAX,
            ..Default::default()
        })),
    })
    .await
    .expect("hello");
    let mut silent = client
        .replicate(ReceiverStream::new(rx))
        .await
        .expect("the first stream is taken")
        .into_inner();
    assert!(matches!(
        silent.message().await.expect("welcome").and_then(|m| m.msg),
        Some(pb::replicate_response::Msg::Welcome(_))
    ));
    let site = start_in(sd.path(), site_options(ent.addr)).await;
    push(&site, vec![float(FORCE, 31.0)]).await;
    wait_float(
        &ent.client,
        FORCE,
        31.0,
        30,
        "the real site's value past the silent stream",
    )
    .await;
    assert!(mirrored(&mut ent).await.streams_refused >= 1);
    drop(tx);
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// What a twin's snapshot holds that depends on where and when it is read, not on what the
/// site published: the mirror's age, the time it was rendered, and the throughput (parts per
/// hour of accounted time, which grows with the reading's clock).
fn as_published(mut t: pb::Twin) -> pb::Twin {
    t.updated_us = 0;
    t.mirror_age_ms = None;
    if let Some(r) = t.rollup.as_mut() {
        r.throughput_per_h = 0.0;
    }
    t
}

/// Every property a twin publishes reaches its mirror. A machine's mirror stayed `idle` with
/// OEE 0 and no parts while the site's machine ran (parent twins dropped the mirror message),
/// and so its line showed 0 running. Once a change settles, the enterprise's site, area, line,
/// machines and sensors equal the site's (detector state aside: it stays at the site).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_twin_of_a_site_is_mirrored_as_the_site_publishes_it() {
    use ferrotwin_models::{Property, Reading, Timestamp, Value};
    let (ed, sd) = two_dirs();
    let ent = start_in(ed.path(), enterprise_options()).await;
    let site = start_in(sd.path(), site_options(ent.addr)).await;
    const OVEN: &str = "acme/berlin/assembly/line-1/oven-1";
    let at = |secs_ago: i64| Timestamp(now().0 - secs_ago * 1_000_000);
    let int = |p: &str, property: Property, v: i64, ts: Timestamp| {
        Reading::good(path(p).id(), property, Value::Int(v), ts)
    };
    // The press ran 6 s, made 8 good parts and 1 scrap, and went idle (its OEE is settled:
    // idle time is not planned); the oven was set up and runs; the press is too hot (an alarm).
    push(
        &site,
        vec![
            int(PRESS, Property::State, 1, at(10)),
            int(PRESS, Property::GoodCount, 0, at(10)),
            int(PRESS, Property::ScrapCount, 0, at(10)),
            int(OVEN, Property::State, 2, at(9)),
        ],
    )
    .await;
    push(
        &site,
        vec![
            int(PRESS, Property::GoodCount, 8, at(5)),
            int(PRESS, Property::ScrapCount, 1, at(5)),
            int(PRESS, Property::State, 0, at(4)),
            int(OVEN, Property::State, 1, at(3)),
            float(TEMP, 95.0),
            float(FORCE, 12.5),
            Reading::good(path(COUNT).id(), Property::Value, Value::Int(7), now()),
        ],
    )
    .await;
    let paths = [
        "acme/berlin",
        "acme/berlin/assembly",
        "acme/berlin/assembly/line-1",
        PRESS,
        OVEN,
        TEMP,
        FORCE,
        COUNT,
    ];
    let (mut s, mut e) = (site.client.clone(), ent.client.clone());
    // The site's machines carry what was fed (the check is on something real).
    let press = wait_for(30, "the site's press idle with its parts", || {
        let mut s = s.clone();
        async move {
            let t = get(&mut s, PRESS).await;
            let m = t.machine.clone()?;
            (m.state == "idle" && m.good_count == 8).then_some(t)
        }
    })
    .await;
    let m = press.machine.as_ref().expect("machine");
    assert_eq!(m.scrap_count, 1);
    assert!(m.oee.as_ref().is_some_and(|o| o.oee > 0.0), "{m:?}");
    // The site's line has rolled it up (debounced): the running oven, the press's alarm.
    wait_for(30, "the site's line rolled up", || {
        let mut s = s.clone();
        async move {
            let r = get(&mut s, "acme/berlin/assembly/line-1").await.rollup?;
            (r.running == 1 && r.active_alarms == 1 && r.mean_oee.is_some()).then_some(())
        }
    })
    .await;
    // Then every twin at the enterprise as the site has it (compared at the same moment,
    // again until they agree: a change in flight is not yet mirrored).
    let mut last = Vec::new();
    let agreed = async {
        for _ in 0..300 {
            last.clear();
            for p in paths {
                let (at_site, mirror) = (get(&mut s, p).await, get(&mut e, p).await);
                let (at_site, mirror) = (as_published(at_site), as_published(mirror));
                if at_site != mirror {
                    last.push(format!(
                        "{p}:\n  site       {at_site:?}\n  enterprise {mirror:?}"
                    ));
                }
            }
            if last.is_empty() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    }
    .await;
    assert!(agreed, "mirrors differ from the site:\n{}", last.join("\n"));
    // The line at the enterprise counts its running oven as the site's does.
    let line = get(&mut e, "acme/berlin/assembly/line-1").await;
    let r = line.rollup.expect("roll-up");
    assert_eq!((r.machines, r.running), (2, 1), "{r:?}");
    assert!(r.mean_oee.is_some_and(|o| o > 0.0), "{r:?}");
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}
