//! The gRPC API from a client's point of view.

use std::time::Duration;

use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::testing;
use tonic::Code;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browse_from_the_root_with_depth_six_reaches_every_sensor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = start_in(dir.path(), options()).await;
    let resp = site
        .client
        .browse(pb::BrowseRequest {
            path: String::new(),
            depth: 6,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("browse")
        .into_inner();
    let sensors: Vec<&pb::Twin> = resp
        .twins
        .iter()
        .filter(|t| t.level == pb::Level::Sensor as i32)
        .collect();
    assert_eq!(sensors.len(), 4);
    assert_eq!(resp.twins.len(), 1 + 1 + 1 + 1 + 2 + 4);
    assert_eq!(resp.twins[0].path, "acme");
    assert!(resp.next_page_token.is_empty());
    // Depth 1 from the line: the line and its two machines.
    let resp = site
        .client
        .browse(pb::BrowseRequest {
            path: "acme/berlin/assembly/line-1".into(),
            depth: 1,
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .expect("browse")
        .into_inner();
    assert_eq!(resp.twins.len(), 3);
    // Paging: pages of 3 cover the whole tree once.
    let mut token = String::new();
    let mut seen = Vec::new();
    loop {
        let page = site
            .client
            .browse(pb::BrowseRequest {
                path: "acme".into(),
                depth: 6,
                page_size: 3,
                page_token: token.clone(),
            })
            .await
            .expect("browse page")
            .into_inner();
        assert!(page.twins.len() <= 3);
        seen.extend(page.twins.into_iter().map(|t| t.path));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 10);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_twin_by_path_and_id_and_unknown_path_is_not_found() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = start_in(dir.path(), options()).await;
    push(&site, vec![float(TEMP, 42.5)]).await;
    let mut c = site.client.clone();
    let t = wait_for(5, "temp value", || {
        let mut c = c.clone();
        async move {
            let t = get(&mut c, TEMP).await;
            (float_of(&t) == Some(42.5)).then_some(t)
        }
    })
    .await;
    assert_eq!(t.level, pb::Level::Sensor as i32);
    assert_eq!(t.r#type, "press.temp");
    let s = t.sensor.as_ref().expect("sensor state");
    assert_eq!(s.unit, "degC");
    assert!(s.server_ts_us >= s.source_ts_us);
    let by_id = c
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Id(t.id.clone())),
        })
        .await
        .expect("by id")
        .into_inner();
    assert_eq!(by_id.path, TEMP);

    let err = c
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path(
                "acme/berlin/assembly/line-1/press-9".into(),
            )),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message()
            .contains("nearest existing parent: acme/berlin/assembly/line-1"),
        "{}",
        err.message()
    );
    let err = c
        .get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Path("acme/Berlin".into())),
        })
        .await
        .expect_err("bad path");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("\"Berlin\""), "{}", err.message());
    site.client = c;
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_filters_by_level_property_and_a_malformed_query_names_the_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = start_in(dir.path(), options()).await;
    push(&site, vec![float(TEMP, 85.0), float(FORCE, 12.0)]).await;
    let mut c = site.client.clone();
    wait_float(&c, FORCE, 12.0, 5, "values applied").await;
    let q = |text: &str| pb::QueryRequest {
        query: text.into(),
        ..Default::default()
    };
    let hot = c
        .query(q("level = sensor and value > 80"))
        .await
        .expect("query")
        .into_inner();
    assert_eq!(
        hot.twins
            .iter()
            .map(|t| t.path.as_str())
            .collect::<Vec<_>>(),
        vec![TEMP]
    );
    // A machine answers for its sensors by name.
    let m = c
        .query(q("type = press and temp > 80"))
        .await
        .expect("query")
        .into_inner();
    assert_eq!(m.twins.len(), 1);
    assert_eq!(m.twins[0].path, PRESS);
    let globbed = c
        .query(q(r#"path ~ "acme/berlin/**/oven-*/*""#))
        .await
        .expect("query")
        .into_inner();
    assert_eq!(globbed.twins.len(), 1);

    let err = c.query(q("value >> 3")).await.expect_err("syntax error");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("position 7"), "{}", err.message());
    let err = c
        .query(q("level = sensr"))
        .await
        .expect_err("unknown level");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("level is one of") && err.message().contains("found sensr"),
        "{}",
        err.message()
    );
    let err = c
        .get_history(pb::GetHistoryRequest {
            path: PRESS.into(),
            ..Default::default()
        })
        .await
        .expect_err("machines have no recorded history");
    assert_eq!(err.code(), Code::InvalidArgument);
    site.client = c;
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_sends_a_snapshot_then_a_change_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = start_in(dir.path(), options()).await;
    let mut stream = site
        .client
        .watch(pb::WatchRequest {
            path: PRESS.into(),
            events: true,
            skip_snapshot: false,
        })
        .await
        .expect("watch")
        .into_inner();
    let mut snapshot = 0;
    loop {
        let item = tokio::time::timeout(Duration::from_secs(5), stream.message())
            .await
            .expect("snapshot in time")
            .expect("stream ok")
            .expect("stream open");
        match item.item {
            Some(pb::watch_response::Item::Snapshot(_)) => snapshot += 1,
            Some(pb::watch_response::Item::SnapshotEnd(end)) => {
                assert_eq!(end.twins, snapshot);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(snapshot, 4, "press and its three sensors");
    push(&site, vec![float(TEMP, 61.0)]).await;
    let change = tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let item = stream
                .message()
                .await
                .expect("stream ok")
                .expect("stream open");
            if let Some(pb::watch_response::Item::Change(t)) = item.item
                && t.path == TEMP
            {
                return t;
            }
        }
    })
    .await
    .expect("a change within 1 s");
    assert_eq!(float_of(&change), Some(61.0));
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{}", site.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "ferrotwin.v1.TwinService".into(),
        })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(
        resp.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_each_service_an_enterprise_serves() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.enterprise = Some(ferrotwin_runtime::EnterpriseRole {
        accept: vec!["acme/berlin".into()],
    });
    let ent = start_in(dir.path(), opts).await;
    let sd = tempfile::tempdir().expect("tempdir");
    let site = start_in(sd.path(), options()).await;
    let check = |addr: std::net::SocketAddr, service: &'static str| async move {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .map(|r| r.into_inner().status)
    };
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    for service in [
        "",
        "ferrotwin.v1.TwinService",
        "ferrotwin.v1.ReplicationService",
    ] {
        assert_eq!(
            check(ent.addr, service).await.expect(service),
            serving,
            "{service:?}"
        );
    }
    // A site does not receive replication: its health knows no such service.
    let err = check(site.addr, "ferrotwin.v1.ReplicationService")
        .await
        .expect_err("not a service of a site");
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_that_falls_behind_is_told_it_lagged_and_gets_a_fresh_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = options();
    opts.ingest.watch_ring = 16;
    let site = start_in(dir.path(), opts).await;
    // A client with a tiny HTTP/2 window: it cannot take more than a few messages ahead.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", site.addr))
        .expect("uri")
        .initial_stream_window_size(Some(2048))
        .initial_connection_window_size(Some(2048))
        .connect()
        .await
        .expect("connect");
    let mut slow = ferrotwin_proto::v1::twin_service_client::TwinServiceClient::new(channel);
    let mut stream = slow
        .watch(pb::WatchRequest {
            path: PRESS.into(),
            events: false,
            skip_snapshot: true,
        })
        .await
        .expect("watch")
        .into_inner();
    // The client reads nothing while far more changes than its queue, the stream buffer and
    // the HTTP/2 window hold go by; the twins never wait for it.
    // Each reading applied before the next is sent: one published change per reading, however
    // loaded the machine is (the twin would otherwise coalesce a burst into a few changes).
    let force = path(FORCE);
    for i in 0..3000 {
        push(&site, vec![float(FORCE, f64::from(i))]).await;
        let applied = || {
            matches!(&testing::snapshot(&site.rt, &force).expect("force twin").state,
                ferrotwin_runtime::TwinState::Sensor(s)
                    if s.value == Some(ferrotwin_models::Value::Float(f64::from(i))))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !applied() {
            assert!(
                std::time::Instant::now() < deadline,
                "reading {i} not applied in 10 s"
            );
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
    }
    let mut c = site.client.clone();
    wait_for(
        10,
        "last value applied without waiting for the watcher",
        || {
            let mut c = c.clone();
            async move { (float_of(&get(&mut c, FORCE).await) == Some(2999.0)).then_some(()) }
        },
    )
    .await;
    let mut lagged = false;
    let mut resynced = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let Ok(item) = tokio::time::timeout(Duration::from_secs(2), stream.message()).await else {
            break;
        };
        match item.expect("stream ok").expect("stream open").item {
            Some(pb::watch_response::Item::Lagged(l)) => {
                assert!(l.skipped > 0);
                lagged = true;
            }
            Some(pb::watch_response::Item::Snapshot(_)) if lagged => resynced += 1,
            Some(pb::watch_response::Item::SnapshotEnd(_)) if lagged => break,
            _ => {}
        }
    }
    assert!(lagged, "the watcher was told it lagged");
    assert_eq!(
        resynced, 4,
        "a fresh snapshot of the press subtree followed"
    );
    assert_eq!(float_of(&get(&mut c, FORCE).await), Some(2999.0));
    site.rt.shutdown().await;
}
