//! `ferrotwin bench security`: what security costs a caller. The authorisation of one call
//! with a cached token (in process: authenticate + one role check), and `GetTwin` over
//! loopback gRPC per call, plaintext without security against TLS with a token, in one run
//! on the same plant. A benchmark: it prints, it never fails on speed.

use std::fmt::Write;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrotwin_models::AssetPath;
use ferrotwin_proto::v1 as pb;
use ferrotwin_runtime::security::authn::new_service_token;
use ferrotwin_runtime::security::{Credentials, GrantConfig, Role, SecurityConfig, ServiceToken};
use ferrotwin_runtime::{Runtime, RuntimeOptions};
use ferrotwin_sim::generate::{PlantSize, generate};

use crate::client::{Client, Connect, connect};
use crate::pki::Pki;

pub struct SecurityBench {
    /// Sequential GetTwin calls per configuration.
    pub calls: usize,
    /// Concurrent callers (each its own connection) in the throughput run.
    pub concurrency: usize,
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Per-call latencies of `n` sequential GetTwin calls, after a warm-up.
async fn sequential(c: &mut Client, path: &str, n: usize) -> Result<Vec<Duration>> {
    let req = || pb::GetTwinRequest {
        key: Some(pb::get_twin_request::Key::Path(path.to_owned())),
    };
    for _ in 0..200 {
        c.get_twin(req()).await.context("warm-up GetTwin")?;
    }
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.get_twin(req()).await.context("GetTwin")?;
        lat.push(t.elapsed());
    }
    lat.sort();
    Ok(lat)
}

/// Calls per second of `k` callers, each on its own connection, for `per` calls each.
async fn throughput(conn: &Connect, path: &str, k: usize, per: usize) -> Result<f64> {
    let mut clients = Vec::new();
    for _ in 0..k {
        clients.push(connect(conn).await?);
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for mut c in clients {
        let path = path.to_owned();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                c.get_twin(pb::GetTwinRequest {
                    key: Some(pb::get_twin_request::Key::Path(path.clone())),
                })
                .await?;
            }
            Ok::<_, tonic::Status>(())
        }));
    }
    for t in tasks {
        t.await.context("caller task")??;
    }
    Ok((k * per) as f64 / t.elapsed().as_secs_f64())
}

struct Figures {
    p50: Duration,
    p99: Duration,
    max: Duration,
    rate: f64,
}

async fn measure(conn: &Connect, path: &str, b: &SecurityBench) -> Result<Figures> {
    let mut c = connect(conn).await?;
    let lat = sequential(&mut c, path, b.calls).await?;
    let rate = throughput(conn, path, b.concurrency, b.calls / b.concurrency.max(1)).await?;
    Ok(Figures {
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        max: lat.last().copied().unwrap_or_default(),
        rate,
    })
}

pub async fn security(b: SecurityBench) -> Result<String> {
    let spec = generate(
        PlantSize {
            sites: 1,
            areas: 1,
            lines: 2,
            machines: 5,
            sensors_per_machine: 10,
        },
        7,
    );
    let sensor = spec
        .assets()
        .into_iter()
        .rev()
        .find(|a| matches!(a.kind, ferrotwin_models::spec::AssetKind::Sensor { .. }))
        .map(|a| a.path.to_string())
        .context("the plant has sensors")?;
    let dir = tempfile::tempdir()?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench security: GetTwin of {sensor} over loopback, {} sequential calls and {} callers",
        b.calls, b.concurrency
    );

    // Plaintext, security off.
    let plain = Runtime::start(&spec, &dir.path().join("plain"), RuntimeOptions::default()).await?;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    plain.serve_grpc(l)?;
    let open = measure(
        &Connect {
            addr: addr.to_string(),
            ..Default::default()
        },
        &sensor,
        &b,
    )
    .await?;
    plain.shutdown().await;

    // TLS with a service token (argon2 checked once, then cached).
    let pki = Pki::create(&dir.path().join("pki"))?;
    let server = pki.server("server", &["localhost", "127.0.0.1"])?;
    let (token, hash) = new_service_token("bench").map_err(anyhow::Error::msg)?;
    let config = SecurityConfig {
        tls: Some(pki.server_tls(server)),
        tokens: vec![ServiceToken {
            name: "bench".into(),
            hash,
        }],
        grants: vec![GrantConfig {
            subject: "token:bench".into(),
            role: Role::Viewer,
            paths: vec![format!("{}/**", spec.enterprise)],
        }],
        ..Default::default()
    };
    let secured = Runtime::start(
        &spec,
        &dir.path().join("secured"),
        RuntimeOptions {
            security: Some(config),
            ..RuntimeOptions::default()
        },
    )
    .await?;
    // In process: one authorisation as every call makes it (token cached after the first).
    let api = secured.api();
    let path = AssetPath::parse(&sensor).map_err(anyhow::Error::msg)?;
    let creds = Credentials {
        bearer: Some(&token),
        peer_cert: None,
        addr: Some("127.0.0.1:40000".parse()?),
    };
    let first = Instant::now();
    api.authenticate(creds).map_err(anyhow::Error::msg)?;
    let first = first.elapsed();
    let n = 1_000_000u32;
    let t = Instant::now();
    let mut allowed = 0u32;
    for _ in 0..n {
        let c = api.authenticate(creds).map_err(anyhow::Error::msg)?;
        allowed += u32::from(c.can(Role::Viewer, &path));
    }
    let per_call = t.elapsed() / n;
    anyhow::ensure!(allowed == n, "the bench token lost its grant");
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    secured.serve_grpc(l)?;
    let tls = measure(
        &Connect {
            addr: format!("https://{addr}"),
            token: Some(token),
            ca: Some(pki.ca()),
            domain: Some("localhost".into()),
            ..Default::default()
        },
        &sensor,
        &b,
    )
    .await?;
    secured.shutdown().await;

    let _ = writeln!(
        out,
        "authorisation per call, cached token (authenticate + role check on the path): {:.0} ns; first sight of the token (argon2): {:.1} ms",
        per_call.as_nanos(),
        first.as_secs_f64() * 1e3
    );
    for (name, f) in [
        ("plaintext, no security", &open),
        ("TLS + bearer token  ", &tls),
    ] {
        let _ = writeln!(
            out,
            "{name}: per call p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs; {:.0} calls/s with {} callers",
            us(f.p50),
            us(f.p99),
            us(f.max),
            f.rate,
            b.concurrency
        );
    }
    let _ = writeln!(
        out,
        "TLS + token / plaintext: {:.2} of the throughput, {:.2}x the p50 latency",
        tls.rate / open.rate,
        us(tls.p50) / us(open.p50).max(1e-9)
    );
    Ok(out)
}
