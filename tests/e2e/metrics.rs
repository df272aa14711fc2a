//! The metric contract (ARCHITECTURE.md "Metrics", `ferrotwin_runtime::METRIC_FAMILIES`),
//! checked on the `/metrics` pages of a site that has every component running (a Modbus
//! PLC, the store, replication, gRPC and HTTP listeners) and of its enterprise:
//! - every family on a page is in the contract, with its kind, and every contract family is
//!   on one of the pages (the table lists no ghosts);
//! - names: `ferrotwin_`, snake case, counters end in `_total` and gauges do not, durations
//!   in seconds and sizes in bytes (named so, and with that unit), never `_ms` or `_us`;
//! - each sample has exactly the family's labels; families that count discards say why
//!   (`reason` or `outcome`);
//! - values are numbers, counters never negative.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use ferrotwin_cli::feeds;
use ferrotwin_models::Timestamp;
use ferrotwin_runtime::telemetry::{Discard, FamilyKind, parse_prometheus};
use ferrotwin_runtime::{EnterpriseRole, METRIC_FAMILIES, SiteReplication};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::mapping::Mapping;
use ferrotwin_sim::serve::ServedPlant;

use crate::common::*;

async fn serve_http(site: &Site) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    site.rt.serve_http(listener).expect("serve http");
    addr
}

async fn page(addr: SocketAddr) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body")
}

/// `# TYPE` lines of a page: family → kind.
fn types(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_once(' '))
        .map(|(n, k)| (n.to_owned(), k.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_of_a_site_and_its_enterprise_keeps_the_contract() {
    let spec = generate(
        PlantSize {
            sites: 1,
            areas: 1,
            lines: 1,
            machines: 1,
            sensors_per_machine: 1,
        },
        5,
    );
    let mapping = Mapping::of(&spec).expect("fits");
    let site_path: String = mapping.lines[0]
        .line
        .split('/')
        .take(2)
        .collect::<Vec<_>>()
        .join("/");
    let ed = tempfile::tempdir().expect("dir");
    let mut eo = options();
    eo.enterprise = Some(EnterpriseRole {
        accept: vec![site_path.clone()],
    });
    let ent = start_plant_in(&spec, ed.path(), eo).await;
    let ent_http = serve_http(&ent).await;
    let plant = ServedPlant::start(&spec, 5, Timestamp::now())
        .await
        .expect("PLC starts");
    let sd = tempfile::tempdir().expect("dir");
    let mut so = options();
    so.connections = feeds::modbus_connections(&spec, &plant, 50, |_| true).expect("configs");
    let mut r = SiteReplication::new(format!("http://{}", ent.addr));
    r.reconnect_min_ms = 20;
    r.reconnect_max_ms = 200;
    so.replication = Some(r);
    let site = start_plant_in(&spec, sd.path(), so).await;
    let site_http = serve_http(&site).await;
    // Wait until values flow and the enterprise has heard from the site: every family has
    // its samples then.
    let pages = wait_for(30, "readings received and the site mirrored", || async {
        let (s, e) = (page(site_http).await, page(ent_http).await);
        let received = parse_prometheus(&s)
            .get("ferrotwin_readings_received_total")
            .and_then(|v| v.first().map(|x| x.1))
            .unwrap_or(0.0);
        let synced = e.contains(&format!(
            "ferrotwin_site_sync_age_seconds{{site=\"{site_path}\"}}"
        )) && !e.contains("+Inf");
        (received > 0.0 && synced).then_some((s, e))
    })
    .await;
    let contract: HashMap<&str, _> = METRIC_FAMILIES.iter().map(|f| (f.name, f)).collect();
    assert_eq!(
        contract.len(),
        METRIC_FAMILIES.len(),
        "a family listed twice"
    );
    let mut seen = BTreeSet::new();
    for (role, text) in [("site", &pages.0), ("enterprise", &pages.1)] {
        let kinds = types(text);
        let samples = parse_prometheus(text);
        for (name, kind) in &kinds {
            let f = contract
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{role}: {name} is not in the metric contract"));
            let want = match f.kind {
                FamilyKind::Counter => "counter",
                FamilyKind::Gauge => "gauge",
            };
            assert_eq!(kind, want, "{role}: {name}: TYPE");
            seen.insert(name.clone());
        }
        for (name, rows) in &samples {
            let f = contract
                .get(name.as_str())
                .unwrap_or_else(|| panic!("{role}: sample of {name}, not in the contract"));
            assert!(
                kinds.contains_key(name),
                "{role}: {name} has no # TYPE line"
            );
            let want: BTreeSet<&str> = f.labels.iter().copied().collect();
            for (labels, v) in rows {
                let got: BTreeSet<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
                assert_eq!(got, want, "{role}: {name}: labels of {labels:?}");
                assert!(!v.is_nan(), "{role}: {name}: NaN");
                if f.kind == FamilyKind::Counter {
                    assert!(*v >= 0.0 && v.is_finite(), "{role}: {name} = {v}");
                }
            }
        }
    }
    for f in METRIC_FAMILIES {
        assert!(
            seen.contains(f.name),
            "{} is in the contract but on neither page",
            f.name
        );
        let n = f.name;
        assert!(n.starts_with("ferrotwin_"), "{n}");
        assert!(
            n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{n}: snake case"
        );
        assert_eq!(
            n.ends_with("_total"),
            f.kind == FamilyKind::Counter,
            "{n}: counters and only counters end in _total"
        );
        let base = n.trim_end_matches("_total");
        assert!(
            !base.ends_with("_ms") && !base.ends_with("_us") && !base.ends_with("_milliseconds"),
            "{n}: base units"
        );
        assert_eq!(base.ends_with("_seconds"), f.unit == "s", "{n}: seconds");
        assert_eq!(base.ends_with("_bytes"), f.unit == "By", "{n}: bytes");
        if f.discard != Discard::No {
            assert!(
                f.labels.contains(&"reason") || f.labels.contains(&"outcome") || {
                    // A family of one kind of discard says why in its name.
                    n.contains("dropped") || n.contains("compacted") || n.contains("refused")
                },
                "{n}: a discard family says why"
            );
        }
        assert!(!f.help.is_empty() && !f.component.is_empty(), "{n}");
    }
    // Both pages as Prometheus's own Python client reads them (a parser we did not write):
    // every contract family is there, with its type.
    prometheus_client_reads(&[&pages.0, &pages.1]);
    // gRPC calls are counted by service and status, once finished.
    let mut c = site.client.clone();
    let _ = get(&mut c, &mapping.lines[0].line).await;
    let missing = c
        .get_twin(ferrotwin_proto::v1::GetTwinRequest {
            key: Some(ferrotwin_proto::v1::get_twin_request::Key::Path(format!(
                "{site_path}/no-such-area"
            ))),
        })
        .await
        .expect_err("no such twin");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let calls = |text: &str, code: &str| {
        parse_prometheus(text)
            .get("ferrotwin_grpc_calls_total")
            .and_then(|rows| {
                rows.iter()
                    .find(|(l, _)| {
                        l.iter()
                            .any(|(k, v)| k == "service" && v == "ferrotwin.v1.TwinService")
                            && l.iter().any(|(k, v)| k == "code" && v == code)
                    })
                    .map(|x| x.1)
            })
            .unwrap_or(0.0)
    };
    let text = page(site_http).await;
    assert!(calls(&text, "OK") >= 1.0, "{text}");
    assert!(calls(&text, "NOT_FOUND") >= 1.0, "{text}");
    site.rt.shutdown().await;
    ent.rt.shutdown().await;
}

/// Parses `pages` with `prometheus_client.parser` (PyPI `prometheus-client`, installed by
/// `.ci/run`) and checks that every family of the contract is on one of them with its kind
/// (the client names a counter without `_total`). Skipped, loudly, without the module off CI.
fn prometheus_client_reads(pages: &[&str]) {
    let Some(python) = python_with("prometheus_client", "prometheus-client") else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let mut seen: HashMap<String, String> = HashMap::new();
    for (i, page) in pages.iter().enumerate() {
        let file = dir.path().join(format!("page-{i}.txt"));
        std::fs::write(&file, page).expect("write");
        let (ok, out) = run_tool(
            &python,
            &[
                "-c",
                "import sys\nfrom prometheus_client.parser import text_string_to_metric_families as f\nfor m in f(open(sys.argv[1]).read()):\n    print(m.name, m.type, len(m.samples))",
                file.to_str().expect("utf-8 path"),
            ],
        );
        assert!(ok, "prometheus_client refused page {i}: {out}");
        for line in out.lines() {
            let mut w = line.split_whitespace();
            if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                seen.insert(name.to_owned(), kind.to_owned());
            }
        }
    }
    for f in METRIC_FAMILIES {
        let (name, want) = match f.kind {
            FamilyKind::Counter => (f.name.trim_end_matches("_total"), "counter"),
            FamilyKind::Gauge => (f.name, "gauge"),
        };
        assert_eq!(
            seen.get(name).map(String::as_str),
            Some(want),
            "{} as prometheus_client reads it",
            f.name
        );
    }
}
