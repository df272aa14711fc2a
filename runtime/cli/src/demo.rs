//! `ferrotwin demo`: a generated plant of two sites, each a site runtime fed by the simulator
//! (in-process, or over real protocols through the adapters), replicating over gRPC on
//! loopback to an enterprise runtime that mirrors both. Nothing to install.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use ferrotwin_models::Timestamp;
use ferrotwin_models::spec::PlantSpec;
use ferrotwin_sim::driver::{DriveOptions, DriverStats, run_realtime};
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::PlantSim;
use ferrotwin_sim::mqtt::EmbeddedBroker;
use ferrotwin_sim::serve::{MqttFormat, ServeError, ServedPlant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::feeds;
use crate::pki::{Issued, Pki};
use ferrotwin_runtime::security::authn::new_service_token;
use ferrotwin_runtime::security::{GrantConfig, Role as SecRole, SecurityConfig, ServiceToken};
use ferrotwin_runtime::{EnterpriseRole, SiteReplication, SiteTls};
use ferrotwin_runtime::{Runtime, RuntimeOptions};

/// Faults are this many times as frequent as in the simulator's default plant, so that an
/// alarm shows up within a minute or two of starting the demo.
const DEMO_FAULT_RATE: f64 = 20.0;

/// Modbus poll interval of the demo's connections.
const DEMO_POLL_MS: u64 = 500;

/// How the simulator's readings reach the site runtimes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Pushed straight into the ingest router (the fastest path, no network).
    InProcess,
    /// A Modbus TCP server per line, polled by the Modbus adapter.
    Modbus,
    /// Sparkplug B on an embedded MQTT broker (an edge node per line), read by the MQTT
    /// adapter.
    Mqtt,
    /// An OPC UA server per site, subscribed to by the OPC UA adapter.
    Opcua,
    /// Every protocol at once, lines shared out in turn: Modbus, OPC UA, Sparkplug B.
    All,
}

pub struct DemoOptions {
    /// The enterprise's gRPC address (the sites take free ports).
    pub grpc_addr: SocketAddr,
    /// The enterprise's web browser and JSON API (the sites take free ports).
    pub http_addr: SocketAddr,
    /// `None`: a temporary directory, removed at exit.
    pub data_dir: Option<PathBuf>,
    pub seed: u64,
    /// Simulated seconds per second.
    pub speed: f64,
    /// Stop after this long (`None`: until Ctrl-C).
    pub duration: Option<Duration>,
    pub via: Via,
    /// TLS on every listener, mTLS replication, a CA and certificates in `DATA_DIR/pki/`,
    /// a service token per role (printed).
    pub secure: bool,
}

/// The demo's security: one config for every runtime, each site's certificate, the tokens.
struct DemoSecurity {
    config: SecurityConfig,
    ca: PathBuf,
    sites: std::collections::HashMap<String, Issued>,
    tokens: Vec<(&'static str, String)>,
}

/// A CA and certificates in `dir`, a service token per role, grants on the whole plant.
fn demo_security(dir: &Path, site_paths: &[String]) -> Result<DemoSecurity> {
    let pki = Pki::create(dir)?;
    let server = pki.server("server", &["localhost", "127.0.0.1"])?;
    let mut sites = std::collections::HashMap::new();
    for p in site_paths {
        let file = format!("site-{}", p.replace('/', "-"));
        sites.insert(p.clone(), pki.site(&file, p)?);
    }
    let mut tokens = Vec::new();
    let mut config = SecurityConfig {
        tls: Some(pki.server_tls(server)),
        ..SecurityConfig::default()
    };
    for role in ["viewer", "operator", "engineer", "admin"] {
        let (token, hash) = new_service_token(role).map_err(anyhow::Error::msg)?;
        config.tokens.push(ServiceToken {
            name: role.into(),
            hash,
        });
        config.grants.push(GrantConfig {
            subject: format!("token:{role}"),
            role: SecRole::parse(role).expect("a role"),
            paths: vec!["**".into()],
        });
        tokens.push((role, token));
    }
    Ok(DemoSecurity {
        config,
        ca: pki.ca(),
        sites,
        tokens,
    })
}

/// What feeds one site.
enum Feed {
    Driver {
        stop: Arc<AtomicBool>,
        thread: std::thread::JoinHandle<DriverStats>,
    },
    Served {
        stop: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ServeError>>,
    },
}

struct DemoSite {
    path: String,
    rt: Runtime,
    addr: SocketAddr,
    http: SocketAddr,
    feed: Feed,
}

/// `spec` with only the site named `site`.
fn site_spec(spec: &PlantSpec, site: &str) -> PlantSpec {
    let mut s = spec.clone();
    s.sites.retain(|x| x.name == site);
    s
}

async fn serve_on(rt: &Runtime, addr: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another demo running? try --grpc-addr 127.0.0.1:0)")
    })?;
    let bound = listener.local_addr()?;
    rt.serve_grpc(listener)?;
    Ok(bound)
}

async fn serve_http_on(rt: &Runtime, addr: SocketAddr) -> Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("cannot listen on {addr} (is another demo running? try --http-addr 127.0.0.1:0)")
    })?;
    let bound = listener.local_addr()?;
    rt.serve_http(listener)?;
    Ok(bound)
}

pub async fn run(opts: DemoOptions) -> Result<()> {
    let mut spec = generate(PlantSize::DEMO, opts.seed);
    add_oven_rule(&mut spec, opts.via);
    let (dir, _temp) = match &opts.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .with_context(|| format!("cannot create data dir {}", d.display()))?;
            (d.clone(), None)
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("ferrotwin-demo-")
                .tempdir()
                .context("cannot create a temporary data dir")?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    let site_paths: Vec<String> = spec
        .sites
        .iter()
        .map(|s| format!("{}/{}", spec.enterprise, s.name))
        .collect();

    let security = if opts.secure {
        Some(demo_security(&dir.join("pki"), &site_paths)?)
    } else {
        None
    };
    let enterprise = {
        let o = RuntimeOptions {
            enterprise: Some(EnterpriseRole {
                accept: site_paths.clone(),
            }),
            security: security.as_ref().map(|s| s.config.clone()),
            ..RuntimeOptions::default()
        };
        let d = dir.join("enterprise");
        std::fs::create_dir_all(&d)?;
        Runtime::start(&spec, &d, o).await?
    };
    let enterprise_addr = serve_on(&enterprise, opts.grpc_addr).await?;
    let enterprise_http = serve_http_on(&enterprise, opts.http_addr).await?;

    // rumqttd has no shutdown: the broker's threads end with the process.
    let broker = match opts.via {
        Via::Mqtt | Via::All => Some(EmbeddedBroker::start().context("embedded MQTT broker")?),
        _ => None,
    };
    let mut sites = Vec::new();
    for (s, path) in spec.sites.iter().zip(&site_paths) {
        let sspec = site_spec(&spec, &s.name);
        let d = dir.join(&s.name);
        std::fs::create_dir_all(&d)?;
        let mut o = RuntimeOptions {
            security: security.as_ref().map(|s| s.config.clone()),
            ..RuntimeOptions::default()
        };
        let scheme = if security.is_some() { "https" } else { "http" };
        let mut r = SiteReplication::new(format!("{scheme}://{enterprise_addr}"));
        r.site = Some(path.clone());
        if let Some(sec) = &security {
            let cert = &sec.sites[path];
            r.tls = Some(SiteTls {
                ca: sec.ca.clone(),
                cert: cert.cert.clone(),
                key: cert.key.clone(),
                domain: Some("localhost".into()),
            });
        }
        o.replication = Some(r);
        let seed = opts.seed.wrapping_add(sites.len() as u64);
        let (rt, feed) = match opts.via {
            Via::InProcess => {
                let rt = Runtime::start(&sspec, &d, o).await?;
                let feed = drive_in_process(&rt, sspec.clone(), seed, opts.speed)?;
                (rt, feed)
            }
            Via::Modbus => {
                let plant = ServedPlant::start(&sspec, seed, Timestamp::now())
                    .await
                    .context("simulator PLCs")?;
                o.connections = feeds::modbus_connections(&sspec, &plant, DEMO_POLL_MS, |_| true)?;
                let rt = Runtime::start(&sspec, &d, o).await?;
                (rt, serve_plant(plant, opts.speed))
            }
            Via::Mqtt | Via::Opcua | Via::All => {
                let mut plant = ServedPlant::start(&sspec, seed, Timestamp::now())
                    .await
                    .context("simulator PLCs")?;
                // Lines in spec order; `--via all` shares them out in turn.
                let lines: Vec<String> = sspec
                    .assets()
                    .into_iter()
                    .filter(|a| matches!(a.kind, ferrotwin_models::spec::AssetKind::Line { .. }))
                    .map(|a| a.path.to_string())
                    .collect();
                let turn = |line: &str, k: usize| {
                    opts.via != Via::All
                        || lines
                            .iter()
                            .position(|l| l == line)
                            .is_some_and(|i| i % 3 == k)
                };
                if matches!(opts.via, Via::Opcua | Via::All) {
                    plant
                        .serve_opcua(&sspec)
                        .await
                        .context("simulator OPC UA servers")?;
                    o.connections
                        .extend(feeds::opcua_connections(&sspec, &plant, |l| turn(l, 1))?);
                }
                if let Some(broker) = broker.as_ref().map(EmbeddedBroker::addr) {
                    plant
                        .connect_mqtt(
                            &sspec,
                            &broker.ip().to_string(),
                            broker.port(),
                            &format!("demo-sim-{}", s.name),
                            MqttFormat::Sparkplug,
                        )
                        .await
                        .context("simulator MQTT publisher")?;
                    o.connections
                        .extend(feeds::sparkplug_connections(&plant, broker, |l| {
                            turn(l, 2)
                        })?);
                }
                if opts.via == Via::All {
                    o.connections.extend(feeds::modbus_connections(
                        &sspec,
                        &plant,
                        DEMO_POLL_MS,
                        |l| turn(l, 0),
                    )?);
                }
                let rt = Runtime::start(&sspec, &d, o).await?;
                (rt, serve_plant(plant, opts.speed))
            }
        };
        let addr = serve_on(&rt, "127.0.0.1:0".parse().expect("an address")).await?;
        let http = serve_http_on(&rt, "127.0.0.1:0".parse().expect("an address")).await?;
        sites.push(DemoSite {
            path: path.clone(),
            rt,
            addr,
            http,
            feed,
        });
    }

    println!(
        "ferrotwin demo: {} sites, {} twins in all, fed {}, data in {}",
        sites.len(),
        enterprise.api().twin_count(),
        match opts.via {
            Via::InProcess => "in-process by the simulator",
            Via::Modbus => "over Modbus TCP (a simulated PLC per line)",
            Via::Mqtt => "over MQTT Sparkplug B (an edge node per line, embedded broker)",
            Via::Opcua => "over OPC UA (a server per site, subscriptions)",
            Via::All => "over Modbus TCP, OPC UA and Sparkplug B (lines shared out in turn)",
        },
        dir.display()
    );
    let web = if security.is_some() { "https" } else { "http" };
    println!(
        "enterprise gRPC API on {enterprise_addr}{} (mirrors of every site; health and reflection included)",
        if security.is_some() { " over TLS" } else { "" }
    );
    for s in &sites {
        println!(
            "site {} gRPC API on {}, web browser on {web}://{}/ (replicating to the enterprise{})",
            s.path,
            s.addr,
            s.http,
            if security.is_some() { " over mTLS" } else { "" }
        );
    }
    println!(
        "open the web browser of the whole enterprise (every site side by side): {web}://{enterprise_http}/"
    );
    // With security: one line per demo user, and the CA the clients must trust.
    let (tls_args, grpcurl) = match &security {
        Some(sec) => {
            println!(
                "security on: TLS everywhere, CA {} (trust it in your browser or pass it with --ca); sign in with a token:",
                sec.ca.display()
            );
            for (role, token) in &sec.tokens {
                println!("token {role} {token}");
            }
            let admin = &sec.tokens[sec.tokens.len() - 1].1;
            (
                format!(" --ca {} --token {admin}", sec.ca.display()),
                format!(
                    "grpcurl -cacert {} -H 'authorization: Bearer {admin}' {enterprise_addr} list",
                    sec.ca.display()
                ),
            )
        }
        None => (
            String::new(),
            format!("grpcurl -plaintext {enterprise_addr} list"),
        ),
    };
    println!("try (from the repo, `cargo run --release --` in place of `ferrotwin`):");
    println!("  ferrotwin tree --addr {enterprise_addr} --depth 3{tls_args}");
    println!("  ferrotwin replication --addr {enterprise_addr}{tls_args}");
    if let Some(s) = sites.first() {
        println!("  ferrotwin replication --addr {}{tls_args}", s.addr);
        println!("  ferrotwin connections --addr {}{tls_args}", s.addr);
        println!(
            "  ferrotwin watch --addr {} {} --events{tls_args}",
            s.addr, s.path
        );
    }
    println!(
        "  ferrotwin query --addr {enterprise_addr} 'level = sensor and alarm = active'{tls_args}"
    );
    if security.is_some() {
        println!("  ferrotwin whoami --addr {enterprise_addr}{tls_args}");
        println!("  ferrotwin audit --addr {enterprise_addr}{tls_args}");
    }
    println!("  {grpcurl}");
    println!("stop with Ctrl-C (or SIGTERM)");

    let signal = match opts.duration {
        Some(d) => tokio::select! {
            _ = tokio::time::sleep(d) => "the end of --for",
            s = crate::signals::stop_requested() => s,
        },
        None => crate::signals::stop_requested().await,
    };
    let stop = async {
        for s in sites {
            if let Err(e) = stop_feed(&s.path, s.feed).await {
                tracing::warn!(site = %s.path, error = %e, "the simulator's feed did not stop cleanly");
            }
            s.rt.shutdown().await;
        }
        enterprise.shutdown().await;
    };
    crate::signals::clean_stop(signal, stop, crate::signals::CLEAN_STOP_LIMIT).await;
    Ok(())
}

/// The demo's local action: a critical zone temperature stops that oven (its run enable
/// coil). Over Modbus (`--via modbus`) the rule writes the coil; with the other feeds, whose
/// PLCs take no run enable here, it runs dry and records what it would have done.
fn add_oven_rule(spec: &mut PlantSpec, via: Via) {
    use ferrotwin_models::rule::RuleMode;
    let Some(oven) = spec.machine_types.get_mut("oven") else {
        return;
    };
    let mode = if via == Via::Modbus {
        RuleMode::Enabled
    } else {
        RuleMode::DryRun
    };
    oven.rules.push(overheat_stop("*.high", mode));
}

/// `overheat-stop`: a critical `alarm` (a glob) writes `run_enable = false`, with a high event;
/// re-armed when the alarm clears. The demo's ovens and `bench actions` use it.
pub(crate) fn overheat_stop(
    alarm: &str,
    mode: ferrotwin_models::rule::RuleMode,
) -> ferrotwin_models::rule::RuleSpec {
    use ferrotwin_models::rule::{EventAction, RuleSpec, RuleValue, Then, When, WriteAction};
    RuleSpec {
        name: "overheat-stop".into(),
        mode,
        when: When {
            alarm: Some(alarm.into()),
            severity: Some(ferrotwin_models::Severity::Critical),
            ..When::default()
        },
        for_ms: 0,
        only_in_states: Vec::new(),
        then: Then {
            write: Some(WriteAction {
                property: "run_enable".into(),
                value: RuleValue::Bool(false),
            }),
            event: Some(EventAction {
                severity: ferrotwin_models::Severity::High,
                message: "oven stopped: a zone is critically hot".into(),
            }),
        },
        rearm: Default::default(),
        max_firings: None,
    }
}

fn drive_in_process(rt: &Runtime, spec: PlantSpec, seed: u64, speed: f64) -> Result<Feed> {
    let stop = Arc::new(AtomicBool::new(false));
    let router = rt.ingest();
    let start = Timestamp::now();
    let drive = DriveOptions {
        speed,
        ..DriveOptions::default()
    };
    let thread = {
        let stop = stop.clone();
        std::thread::Builder::new()
            .name("sim-driver".into())
            .spawn(move || {
                let mut sim = PlantSim::with_fault_rate(&spec, seed, start, DEMO_FAULT_RATE);
                run_realtime(&mut sim, router.as_ref(), &drive, &stop)
            })
            .context("cannot start the simulator thread")?
    };
    Ok(Feed::Driver { stop, thread })
}

fn serve_plant(mut plant: ServedPlant, speed: f64) -> Feed {
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { plant.run_realtime(speed, token.cancelled()).await });
    Feed::Served { stop, task }
}

async fn stop_feed(site: &str, feed: Feed) -> Result<()> {
    match feed {
        Feed::Driver { stop, thread } => {
            stop.store(true, Ordering::Release);
            let stats = tokio::task::spawn_blocking(move || thread.join())
                .await
                .context("simulator thread")?
                .map_err(|_| anyhow::anyhow!("simulator thread panicked"))?;
            println!(
                "{site}: simulator pushed {} readings in {} batches ({} push-backs)",
                stats.readings, stats.pushed_batches, stats.push_backs
            );
        }
        Feed::Served { stop, task } => {
            stop.cancel();
            task.await
                .context("simulator task")?
                .with_context(|| format!("{site}: simulator"))?;
        }
    }
    Ok(())
}
