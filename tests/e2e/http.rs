//! The HTTP server over 127.0.0.1 with a real HTTP client: the JSON API, the live stream, the
//! page shells, escaping of what comes from the plant spec, and the errors.

use std::time::Duration;

use ferrotwin_models::spec::PlantSpec;
use serde_json::Value as Json;

use crate::common::*;

/// Serves HTTP for `site` on a free port; the base URL.
async fn http(site: &Site) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    site.rt.serve_http(listener).expect("serve");
    format!("http://{addr}")
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

async fn get_json(url: &str) -> (u16, Json) {
    let r = client().get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("json body"))
}

async fn get_text(url: &str) -> (u16, String) {
    let r = client().get(url).send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.text().await.expect("text body"))
}

fn paths(page: &Json) -> Vec<String> {
    page["twins"]
        .as_array()
        .expect("twins")
        .iter()
        .map(|t| t["path"].as_str().expect("path").to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_api_gets_and_browses_twins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    push(&site, vec![float(TEMP, 42.5)]).await;
    wait_float(&site.client, TEMP, 42.5, 10, "temp applied").await;

    let (status, t) = get_json(&format!("{base}/api/v1/twins/{TEMP}")).await;
    assert_eq!(status, 200, "{t}");
    assert_eq!(t["path"], TEMP);
    assert_eq!(t["level"], "sensor");
    assert_eq!(t["name"], "temp");
    assert_eq!(t["sensor"]["value"], 42.5);
    assert_eq!(t["sensor"]["unit"], "degC");
    assert_eq!(t["sensor"]["quality"]["code"], "good");
    assert!(t["sensor"]["source_ts_us"].as_i64().expect("µs") > 0);
    assert_eq!(t["sensor"]["alarms"][0]["name"], "high");
    assert_eq!(t["sensor"]["alarms"][0]["state"], "normal");
    assert_eq!(t["sensor"]["alarms"][0]["severity"], "high");
    assert!(t.get("machine").is_none());

    let (_, press) = get_json(&format!("{base}/api/v1/twins/{PRESS}")).await;
    assert_eq!(press["level"], "machine");
    assert_eq!(press["type"], "press");
    assert!(press["machine"]["oee"].is_object(), "{press}");
    assert!(press["rollup"]["sensors"].as_u64().is_some(), "{press}");

    // Root with its children, then a machine with its sensors; paging.
    let (status, root) = get_json(&format!("{base}/api/v1/browse")).await;
    assert_eq!(status, 200, "{root}");
    assert_eq!(paths(&root), ["acme", "acme/berlin"]);
    assert_eq!(root["next_page_token"], "");
    let (_, m) = get_json(&format!("{base}/api/v1/browse?path={PRESS}&depth=1")).await;
    assert_eq!(paths(&m), [PRESS, COUNT, FORCE, TEMP]);
    let (_, p1) = get_json(&format!("{base}/api/v1/browse?path={PRESS}&page_size=2")).await;
    assert_eq!(paths(&p1).len(), 2);
    let token = p1["next_page_token"].as_str().expect("token").to_string();
    assert!(!token.is_empty());
    let (_, p2) = get_json(&format!(
        "{base}/api/v1/browse?path={PRESS}&page_size=2&page_token={token}"
    ))
    .await;
    assert_eq!(paths(&p2), [FORCE, TEMP]);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_counts_twins_and_metrics_count_http_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let (status, h) = get_json(&format!("{base}/healthz")).await;
    assert_eq!(status, 200);
    assert_eq!(h["status"], "ok");
    assert_eq!(h["twins"], site.rt.api().twin_count());
    assert_eq!(h["role"], "standalone");
    let _ = get_json(&format!("{base}/api/v1/twins/acme/nowhere")).await;
    let r = client()
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("metrics");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/plain")
    );
    let text = r.text().await.expect("text");
    assert!(text.contains("ferrotwin_readings_received_total"), "{text}");
    assert!(
        text.contains("ferrotwin_http_requests_total{route=\"health\",status=\"2xx\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("ferrotwin_http_requests_total{route=\"api\",status=\"4xx\"} 1"),
        "{text}"
    );
    assert!(text.contains("ferrotwin_http_live_streams 0"), "{text}");
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_asset_is_404_naming_the_nearest_parent_in_json_and_html() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let missing = format!("{PRESS}/nope");
    let (status, e) = get_json(&format!("{base}/api/v1/twins/{missing}")).await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["nearest_parent"], PRESS);
    assert!(
        e["error"].as_str().expect("error").contains(&missing),
        "{e}"
    );

    let (status, page) = get_text(&format!("{base}/asset/{missing}")).await;
    assert_eq!(status, 404);
    assert!(page.contains(&missing), "{page}");
    assert!(page.contains(&format!("href=\"/asset/{PRESS}\"")), "{page}");
    // Deeper than any asset can be: the API says the path is malformed, the page still
    // offers the nearest parent.
    let (status, _) = get_json(&format!("{base}/api/v1/twins/{missing}/deeper")).await;
    assert_eq!(status, 400);
    let (status, page) = get_text(&format!("{base}/asset/{missing}/deeper")).await;
    assert_eq!(status, 404);
    assert!(page.contains(&format!("href=\"/asset/{PRESS}\"")), "{page}");

    // A known asset gets the shell with its path.
    let (status, page) = get_text(&format!("{base}/asset/{TEMP}")).await;
    assert_eq!(status, 200);
    assert!(page.contains(&format!("data-path=\"{TEMP}\"")), "{page}");
    let (status, page) = get_text(&format!("{base}/")).await;
    assert_eq!(status, 200);
    assert!(page.contains("data-path=\"\""), "{page}");
    let (status, page) = get_text(&format!("{base}/alarms?path=acme/berlin")).await;
    assert_eq!(status, 200);
    assert!(page.contains("data-view=\"alarms\""), "{page}");
    let (status, _) = get_text(&format!("{base}/overview?path=acme/paris")).await;
    assert_eq!(status, 404);

    // Unknown API routes answer JSON, static files come with a type and a cache policy.
    let (status, e) = get_json(&format!("{base}/api/v1/nothing")).await;
    assert_eq!(status, 404);
    assert!(e["error"].is_string());
    let r = client()
        .get(format!("{base}/static/app.js"))
        .send()
        .await
        .expect("static");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .expect("ascii")
            .starts_with("text/javascript")
    );
    let etag = r.headers()["etag"].clone();
    let again = client()
        .get(format!("{base}/static/app.js"))
        .header("if-none-match", etag)
        .send()
        .await
        .expect("static");
    assert_eq!(again.status().as_u16(), 304);
    let (status, _) = get_text(&format!("{base}/static/nope.js")).await;
    assert_eq!(status, 404);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_400_saying_what_is_wrong() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let bad = |url: String, needle: &'static str| async move {
        let (status, e) = get_json(&url).await;
        assert_eq!(status, 400, "{url}: {e}");
        let msg = e["error"].as_str().expect("error").to_string();
        assert!(
            msg.contains(needle),
            "{url}: {msg:?} should name {needle:?}"
        );
        e
    };
    let e = bad(format!("{base}/api/v1/query?q=value%20%3E"), "query").await;
    assert!(e["position"].as_u64().is_some(), "{e}");
    bad(format!("{base}/api/v1/query"), "q:").await;
    bad(format!("{base}/api/v1/browse?depth=abc"), "depth").await;
    bad(format!("{base}/api/v1/twins/acme/Bad%20Path"), "path").await;
    bad(
        format!("{base}/api/v1/history?path={TEMP}&range=15x"),
        "range",
    )
    .await;
    bad(
        format!("{base}/api/v1/history?path={TEMP}&from=yesterday"),
        "from",
    )
    .await;
    bad(
        format!(
            "{base}/api/v1/history?path={TEMP}&from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z"
        ),
        "range",
    )
    .await;
    bad(format!("{base}/api/v1/history?path={PRESS}"), "sensors").await;
    bad(format!("{base}/api/v1/events?kind=nonsense"), "kind").await;
    bad(format!("{base}/api/v1/alarms?state=loud"), "state").await;
    bad(format!("{base}/api/v1/live?events=maybe"), "events").await;
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_history_events_and_search_round_trip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let t0 = now().0;
    for (i, v) in [10.0, 20.0, 95.0, 30.0].into_iter().enumerate() {
        let mut r = float(TEMP, v);
        r.source_ts = ferrotwin_models::Timestamp(t0 + i as i64 * 1000);
        push(&site, vec![r]).await;
        wait_float(&site.client, TEMP, v, 10, "temp applied").await;
    }
    let (status, q) = get_json(&format!(
        "{base}/api/v1/query?q=level%20%3D%20sensor%20and%20value%20%3E%2025"
    ))
    .await;
    assert_eq!(status, 200, "{q}");
    assert_eq!(paths(&q), [TEMP]);

    let (status, h) = get_json(&format!("{base}/api/v1/history?path={TEMP}&range=15m")).await;
    assert_eq!(status, 200, "{h}");
    let values: Vec<f64> = h["points"]
        .as_array()
        .expect("points")
        .iter()
        .map(|p| p["value"].as_f64().expect("value"))
        .collect();
    assert_eq!(values, [10.0, 20.0, 95.0, 30.0]);
    assert_eq!(h["raw_points"], 4);
    assert_eq!(h["downsampled"], false);
    let (_, h2) = get_json(&format!(
        "{base}/api/v1/history?path={TEMP}&from={}&to={}&max_points=2",
        t0 - 1,
        t0 + 10_000
    ))
    .await;
    assert_eq!(h2["downsampled"], true, "{h2}");
    assert_eq!(h2["points"].as_array().expect("points").len(), 2);
    assert_eq!(h2["points"][1]["max"], 95.0, "{h2}");

    // 95 raised the high alarm and 30 returned it: events of the press, paged by seq.
    let (status, ev) = get_json(&format!("{base}/api/v1/events?path={PRESS}&kind=alarm")).await;
    assert_eq!(status, 200, "{ev}");
    let list = ev["events"].as_array().expect("events");
    assert!(!list.is_empty(), "{ev}");
    assert_eq!(list[0]["path"], TEMP);
    assert_eq!(list[0]["kind"], "alarm");
    let first = list[0]["seq"].as_u64().expect("seq");
    let (_, rest) = get_json(&format!(
        "{base}/api/v1/events?path={PRESS}&kind=alarm&after_seq={first}"
    ))
    .await;
    assert!(
        rest["events"]
            .as_array()
            .expect("events")
            .iter()
            .all(|e| e["seq"].as_u64().expect("seq") > first)
    );

    let (status, s) = get_json(&format!("{base}/api/v1/search?q=PRESS-1%2FT")).await;
    assert_eq!(status, 200, "{s}");
    let hits: Vec<&str> = s["hits"]
        .as_array()
        .expect("hits")
        .iter()
        .map(|h| h["path"].as_str().expect("path"))
        .collect();
    assert_eq!(hits, [TEMP]);
    let (_, s) = get_json(&format!("{base}/api/v1/search?q=e&limit=3")).await;
    assert_eq!(s["hits"].as_array().expect("hits").len(), 3);
    assert_eq!(s["truncated"], true);
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alarm_summary_lists_active_alarms_and_ack_changes_their_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let (_, none) = get_json(&format!("{base}/api/v1/alarms")).await;
    assert_eq!(none["alarms"].as_array().expect("alarms").len(), 0);
    push(&site, vec![float(TEMP, 95.0)]).await;
    let summary = wait_for(10, "alarm listed", || async {
        let (_, s) = get_json(&format!("{base}/api/v1/alarms?path=acme/berlin")).await;
        (s["alarms"].as_array().expect("alarms").len() == 1).then_some(s)
    })
    .await;
    let a = &summary["alarms"][0];
    assert_eq!(a["path"], TEMP);
    assert_eq!(a["name"], "high");
    assert_eq!(a["state"], "active_unacked");
    assert_eq!(a["severity"], "high");
    assert_eq!(a["value"], 95.0);
    assert_eq!(a["unit"], "degC");
    assert_eq!(summary["counts"]["high"], 1);

    let ack = |alarm: &'static str, path: &'static str| {
        let base = base.clone();
        async move {
            let r = client()
                .post(format!("{base}/api/v1/alarms/ack"))
                .json(&serde_json::json!({"path": path, "alarm": alarm, "by": "anna", "comment": "seen"}))
                .send()
                .await
                .expect("ack");
            let status = r.status().as_u16();
            (status, r.json::<Json>().await.expect("json"))
        }
    };
    let (status, st) = ack("high", TEMP).await;
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["state"], "active_acked");
    let (status, e) = ack("high", TEMP).await;
    assert_eq!(status, 409, "{e}");
    let (status, e) = ack("very-high", TEMP).await;
    assert_eq!(status, 404, "{e}");
    let (status, e) = ack("high", "acme/berlin/nowhere").await;
    assert_eq!(status, 404, "{e}");
    assert_eq!(e["nearest_parent"], "acme/berlin");
    let r = client()
        .post(format!("{base}/api/v1/alarms/ack"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("ack");
    assert_eq!(r.status().as_u16(), 400);

    let (_, unacked) = get_json(&format!("{base}/api/v1/alarms?state=unacked")).await;
    assert_eq!(unacked["alarms"].as_array().expect("alarms").len(), 0);
    let (_, active) = get_json(&format!("{base}/api/v1/alarms?state=active")).await;
    assert_eq!(active["alarms"][0]["state"], "active_acked");
    site.rt.shutdown().await;
}

const SCRIPT: &str = "<script>alert(1)</script>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn script_in_a_unit_or_url_is_escaped_in_html_and_intact_in_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plant = PLANT.replace("unit = \"kN\"", &format!("unit = {SCRIPT:?}"));
    let spec = PlantSpec::from_toml(&plant, "xss plant").expect("valid plant");
    let site = start_plant_in(&spec, dir.path(), options()).await;
    let base = http(&site).await;
    push(&site, vec![float(FORCE, 1.0)]).await;
    wait_float(&site.client, FORCE, 1.0, 10, "force applied").await;

    let (_, t) = get_json(&format!("{base}/api/v1/twins/{FORCE}")).await;
    assert_eq!(t["sensor"]["unit"], SCRIPT);
    let (_, b) = get_json(&format!("{base}/api/v1/browse?path={PRESS}")).await;
    assert!(
        b["twins"]
            .as_array()
            .expect("twins")
            .iter()
            .any(|t| t["sensor"]["unit"] == SCRIPT)
    );

    // Every page, and the 404 page echoing a URL that carries the script, escape it.
    let escaped = "&lt;script&gt;alert(1)&lt;/script&gt;";
    for url in [
        format!("{base}/asset/{FORCE}"),
        format!("{base}/asset/{PRESS}/%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
        format!("{base}/alarms?path=acme/%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
        format!("{base}/nowhere/%3Cscript%3Ealert(1)%3C%2Fscript%3E"),
    ] {
        let (_, page) = get_text(&url).await;
        assert!(!page.contains(SCRIPT), "{url}: raw script in {page}");
        if url.contains("%3Cscript") && !url.contains("nowhere") {
            assert!(page.contains(escaped), "{url}: {page}");
        }
    }
    site.rt.shutdown().await;
}

/// Server-Sent Events read from a streaming response: (event name, JSON data).
struct Sse {
    resp: reqwest::Response,
    buf: String,
}

impl Sse {
    async fn open(url: &str) -> Sse {
        let resp = reqwest::Client::new()
            .get(url)
            .send()
            .await
            .expect("live request");
        assert_eq!(resp.status().as_u16(), 200);
        assert!(
            resp.headers()["content-type"]
                .to_str()
                .expect("ascii")
                .starts_with("text/event-stream")
        );
        Sse {
            resp,
            buf: String::new(),
        }
    }

    /// The next message, waiting at most 30 s.
    async fn next(&mut self) -> (String, Json) {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // keep-alive comment
                }
                return (name, serde_json::from_str(&data).expect("json data"));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.resp.chunk())
                .await
                .expect("a live message within 30 s")
                .expect("stream readable")
                .expect("stream open");
            self.buf
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_stream_sends_a_snapshot_then_twin_changes_and_events() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let mut live = Sse::open(&format!("{base}/api/v1/live?path={PRESS}&events=true")).await;
    let (name, snap) = live.next().await;
    assert_eq!(name, "snapshot");
    assert_eq!(paths(&snap), [PRESS, COUNT, FORCE, TEMP]);

    push(&site, vec![float(TEMP, 95.5)]).await;
    let mut saw_event = false;
    let twin = loop {
        let (name, data) = live.next().await;
        match name.as_str() {
            "twin" if data["path"] == TEMP && data["sensor"]["value"] == 95.5 => break data,
            "event" => saw_event |= data["kind"] == "alarm",
            _ => {}
        }
    };
    assert_eq!(twin["sensor"]["alarms"][0]["state"], "active_unacked");
    if !saw_event {
        loop {
            let (name, data) = live.next().await;
            if name == "event" && data["kind"] == "alarm" {
                break;
            }
        }
    }
    let (_, text) = get_text(&format!("{base}/metrics")).await;
    assert!(text.contains("ferrotwin_http_live_streams 1"), "{text}");

    // An explicit list: only those twins, in the snapshot and after.
    let mut list = Sse::open(&format!("{base}/api/v1/live?paths={FORCE},{PRESS}")).await;
    let (_, snap) = list.next().await;
    assert_eq!(paths(&snap), [PRESS, FORCE]);
    push(&site, vec![float(TEMP, 96.0), float(FORCE, 7.0)]).await;
    loop {
        let (name, data) = list.next().await;
        assert_ne!(data["path"], TEMP, "temp is not in the list");
        if name == "twin" && data["path"] == FORCE {
            break;
        }
    }
    let (status, e) = get_json(&format!("{base}/api/v1/live?paths={PRESS},acme/x")).await;
    assert_eq!(status, 404, "{e}");
    site.rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openapi_description_lists_every_route() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let (status, doc) = get_json(&format!("{base}/api/v1/openapi.json")).await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().expect("version").starts_with("3."));
    for route in [
        "/api/v1/twins/{path}",
        "/api/v1/browse",
        "/api/v1/query",
        "/api/v1/history",
        "/api/v1/events",
        "/api/v1/alarms",
        "/api/v1/alarms/ack",
        "/api/v1/search",
        "/api/v1/rules",
        "/api/v1/live",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"][route].is_object(), "{route} missing");
    }
    assert!(doc["components"]["schemas"]["TwinDto"].is_object());
    site.rt.shutdown().await;
}

/// Two HTTP listeners of one runtime count into one set of HTTP counters: a request on one
/// shows on the other's `/metrics` (and their families are exported over OTLP once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_http_listeners_of_one_runtime_share_their_counters() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let (a, b) = (http(&site).await, http(&site).await);
    let api_2xx = |page: &str| {
        page.lines()
            .find_map(|l| {
                l.strip_prefix(r#"ferrotwin_http_requests_total{route="api",status="2xx"} "#)
            })
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("the api 2xx counter")
    };
    let before = api_2xx(&get_text(&format!("{b}/metrics")).await.1);
    for _ in 0..3 {
        let (status, _) = get_json(&format!("{a}/api/v1/twins/{TEMP}")).await;
        assert_eq!(status, 200);
    }
    let after = api_2xx(&get_text(&format!("{b}/metrics")).await.1);
    assert_eq!(
        after - before,
        3,
        "the requests on one listener show on the other"
    );
    site.rt.shutdown().await;
}

/// A live apply tells the watchers it touches which subtree changed: a page's stream gets
/// `event: model` for the machine removed below it, and a gRPC Watch of that machine gets
/// `model_changed` (it watched inside the removed subtree).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_and_live_pages_are_told_which_subtree_changed() {
    use ferrotwin_proto::v1 as pb;
    let dir = tempfile::tempdir().expect("tempdir");
    let site = start_in(dir.path(), options()).await;
    let base = http(&site).await;
    let line = "acme/berlin/assembly/line-1";
    let mut live = Sse::open(&format!("{base}/api/v1/live?path={line}")).await;
    let (name, _) = live.next().await;
    assert_eq!(name, "snapshot");
    let mut watch = site
        .client
        .clone()
        .watch(pb::WatchRequest {
            path: PRESS.into(),
            events: false,
            skip_snapshot: true,
        })
        .await
        .expect("watch")
        .into_inner();
    let without = PLANT.replace(r#"{ name = "press-1", type = "press" }, "#, "");
    site.client
        .clone()
        .apply_plant(pb::ApplyPlantRequest {
            plant_toml: without,
            base_version: 1,
            dry_run: false,
            by: "test".into(),
            site_toml: String::new(),
        })
        .await
        .expect("applied");
    let model = loop {
        let (name, data) = live.next().await;
        if name == "model" {
            break data;
        }
    };
    assert_eq!(model["path"], PRESS);
    assert_eq!(model["op"], "removed");
    assert_eq!(model["version"], 2);
    let item = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let m = watch.message().await.expect("stream").expect("a message");
            if let Some(pb::watch_response::Item::ModelChanged(c)) = m.item {
                break c;
            }
        }
    })
    .await
    .expect("model_changed within 30 s");
    assert_eq!(
        (item.path.as_str(), item.op.as_str(), item.version),
        (PRESS, "removed", 2)
    );
    site.rt.shutdown().await;
}
