//! `ferrotwin`: the runtime (demo, run) and a CLI client of its gRPC API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferrotwin_cli::{bench, client as cli, demo};
use ferrotwin_runtime::Runtime;
use ferrotwin_runtime::config::SiteConfig;

#[derive(Parser)]
#[command(
    name = "ferrotwin",
    version,
    about = "Actor-based digital twin runtime for manufacturing plants"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct Remote {
    /// Address of a running ferrotwin gRPC API.
    #[arg(long, env = "FERROTWIN_ADDR", default_value = "127.0.0.1:50051")]
    addr: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate a plant, drive it with the simulator and serve it over gRPC.
    Demo {
        #[arg(long, default_value = "127.0.0.1:50051")]
        grpc_addr: SocketAddr,
        /// The enterprise's web browser and JSON API.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
        /// Data directory (default: a temporary one, removed at exit).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Simulated seconds per second.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long = "for")]
        for_s: Option<u64>,
        /// How the simulator's readings reach the sites.
        #[arg(long, value_enum, default_value = "in-process")]
        via: demo::Via,
    },
    /// Run a site or an enterprise from a config file (plant spec, data dir, listen address,
    /// PLC connections, replication).
    Run {
        #[arg(long)]
        config: PathBuf,
        /// Checked against the config: a site has no `[enterprise]` section, an enterprise
        /// has one.
        #[arg(long, value_enum, default_value = "site")]
        role: Role,
        /// Web browser, JSON API, /healthz and /metrics (default: the config's `http_addr`,
        /// else 127.0.0.1:8080).
        #[arg(long)]
        http_addr: Option<SocketAddr>,
    },
    /// Show replication: a site's link and outbox, or an enterprise's mirrored sites.
    Replication {
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the asset tree with live values, quality and alarms.
    Tree {
        /// Subtree to print (default: the whole plant).
        #[arg(default_value = "")]
        path: String,
        #[arg(long, default_value_t = 6)]
        depth: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print one twin.
    Get {
        path: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Stream changes (and events) under a path.
    Watch {
        #[arg(default_value = "")]
        path: String,
        /// Also print events.
        #[arg(long)]
        events: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Find twins, e.g. `level = sensor and value > 80`.
    Query {
        expr: String,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        /// Rank by a field, highest first (`-FIELD`: lowest first), e.g. `--rank oee`.
        #[arg(long, allow_hyphen_values = true)]
        rank: Option<String>,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print a sensor's history.
    History {
        path: String,
        #[arg(default_value = "value")]
        property: String,
        /// Seconds back from now.
        #[arg(long, default_value_t = 900)]
        since: u64,
        #[arg(long, default_value_t = 60)]
        max_points: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Print the latest events under a path.
    Events {
        #[arg(default_value = "")]
        path: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[command(flatten)]
        remote: Remote,
    },
    /// Acknowledge an alarm of a sensor.
    Ack {
        path: String,
        alarm: String,
        #[arg(long)]
        by: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Write a setpoint to the PLC, e.g. `write acme/.../press-1 speed_setpoint_pct 120 --by ann`.
    Write {
        path: String,
        property: String,
        value: String,
        #[arg(long)]
        by: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// List the site's PLC connections with their state and counters.
    Connections {
        #[command(flatten)]
        remote: Remote,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Score local inference against the simulator's ground truth: runs a plant as fast as
    /// possible through a real runtime and prints precision, recall and detection delays.
    Eval {
        /// Directory holding `plant.toml` (default: a generated plant of 12 machines).
        #[arg(long)]
        plant: Option<PathBuf>,
        /// Scenario file (scheduled faults, random fault settings, seed).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Simulation seed (a scenario's own seed wins).
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Seed of the generated plant.
        #[arg(long, default_value_t = 7)]
        plant_seed: u64,
        /// Simulated hours.
        #[arg(long, default_value_t = 48.0)]
        hours: f64,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Role {
    Site,
    Enterprise,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// The web browser's targets: first load of the page and the tree, push → SSE latency,
    /// ingest with 0 and N open live clients.
    Http {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        /// Seconds per ingest run (four runs).
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Live (SSE) clients, each watching a line.
        #[arg(long, default_value_t = 50)]
        clients: usize,
    },
    /// Drive the real ingest path and print readings/s, latency to a watcher, RSS per twin.
    Ingest {
        #[arg(long, default_value_t = 100_000)]
        sensors: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Local inference in every twin: on (the plant spec's default) or off.
        #[arg(long, value_enum, default_value = "on")]
        detectors: OnOff,
    },
    /// A site replicating to an enterprise over loopback gRPC: rate, bytes per reading,
    /// lag, catch-up after an outage.
    Replication {
        #[arg(long, default_value_t = 10_000)]
        sensors: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Cut the link this long after the steady state, then measure the catch-up.
        #[arg(long, default_value_t = 30)]
        outage: u64,
        /// raw, aggregated or state-only.
        #[arg(long, default_value = "aggregated")]
        history: String,
    },
    /// Latency from a value changing in a simulated PLC to a gRPC Watch subscriber, over a
    /// real protocol and adapter.
    Plc {
        #[arg(long, value_enum, default_value = "modbus")]
        via: demo::Via,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Modbus poll interval.
        #[arg(long, default_value_t = 100)]
        poll_ms: u64,
        #[arg(long, default_value_t = 4)]
        lines: u32,
    },
    /// Print the RSS in bytes of one idle ractor actor (spawning `count` of them).
    Actors {
        #[arg(long, default_value_t = 100_000)]
        count: usize,
    },
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    match args.cmd {
        Cmd::Demo {
            grpc_addr,
            http_addr,
            data_dir,
            seed,
            speed,
            for_s,
            via,
        } => {
            // The embedded broker logs every readiness probe as an error: quiet in the demo.
            init_tracing("info,sled=warn,rumqttd=off");
            demo::run(demo::DemoOptions {
                grpc_addr,
                http_addr,
                data_dir,
                seed,
                speed,
                duration: for_s.map(Duration::from_secs),
                via,
            })
            .await
        }
        Cmd::Run {
            config,
            role,
            http_addr,
        } => {
            init_tracing("info,sled=warn");
            let cfg = SiteConfig::load(&config)?;
            match (role, cfg.enterprise.is_some()) {
                (Role::Site, true) => anyhow::bail!(
                    "{}: has an [enterprise] section: run it with --role enterprise",
                    config.display()
                ),
                (Role::Enterprise, false) => anyhow::bail!(
                    "{}: an enterprise needs an [enterprise] section listing the sites it accepts",
                    config.display()
                ),
                _ => {}
            }
            let spec = cfg.load_plant()?;
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
            let listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
                .await
                .with_context(|| format!("cannot listen on {}", cfg.grpc_addr))?;
            let http_addr = http_addr.unwrap_or(cfg.http_addr);
            let http = tokio::net::TcpListener::bind(http_addr)
                .await
                .with_context(|| format!("cannot listen on {http_addr} (http_addr)"))?;
            let rt = Runtime::start(&spec, &cfg.data_dir, cfg.options()).await?;
            println!(
                "ferrotwin {}: {} twins, gRPC on {}, web browser on http://{}/",
                match role {
                    Role::Site => "site",
                    Role::Enterprise => "enterprise",
                },
                rt.api().twin_count(),
                listener.local_addr()?,
                http.local_addr()?
            );
            rt.serve_grpc(listener);
            rt.serve_http(http);
            let _ = tokio::signal::ctrl_c().await;
            rt.shutdown().await;
            Ok(())
        }
        Cmd::Tree {
            path,
            depth,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!("{}", cli::tree(&mut c, &path, depth).await?);
            Ok(())
        }
        Cmd::Get { path, remote } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!("{}", cli::get(&mut c, &path).await?);
            Ok(())
        }
        Cmd::Watch {
            path,
            events,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            cli::watch(&mut c, &path, events, None).await
        }
        Cmd::Query {
            expr,
            limit,
            rank,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!(
                "{}",
                cli::query(&mut c, &expr, limit, rank.as_deref()).await?
            );
            Ok(())
        }
        Cmd::History {
            path,
            property,
            since,
            max_points,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!(
                "{}",
                cli::history(&mut c, &path, &property, since, max_points).await?
            );
            Ok(())
        }
        Cmd::Events {
            path,
            limit,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!("{}", cli::events(&mut c, &path, limit).await?);
            Ok(())
        }
        Cmd::Ack {
            path,
            alarm,
            by,
            comment,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!("{}", cli::ack(&mut c, &path, &alarm, &by, &comment).await?);
            Ok(())
        }
        Cmd::Write {
            path,
            property,
            value,
            by,
            remote,
        } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!(
                "{}",
                cli::write(&mut c, &path, &property, &value, &by).await?
            );
            Ok(())
        }
        Cmd::Replication { remote } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!("{}", cli::replication(&mut c).await?);
            Ok(())
        }
        Cmd::Connections { remote } => {
            init_tracing("warn");
            let mut c = cli::connect(&remote.addr).await?;
            print!("{}", cli::connections(&mut c).await?);
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Replication {
                    sensors,
                    seconds,
                    outage,
                    history,
                },
        } => {
            init_tracing("warn,sled=warn");
            let history = match history.as_str() {
                "raw" => ferrotwin_runtime::HistoryPolicy::Raw,
                "aggregated" => ferrotwin_runtime::HistoryPolicy::Aggregated,
                "state-only" => ferrotwin_runtime::HistoryPolicy::StateOnly,
                other => anyhow::bail!("--history {other:?}: raw, aggregated or state-only"),
            };
            let report = bench::replication::replication(bench::replication::ReplicationBench {
                sensors,
                seconds,
                outage_seconds: outage,
                history,
            })
            .await?;
            print!("{report}");
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Plc {
                    via,
                    seconds,
                    poll_ms,
                    lines,
                },
        } => {
            init_tracing("warn,sled=warn,rumqttd=off");
            let report = bench::plc::plc(bench::plc::PlcBench {
                via,
                seconds,
                poll_ms,
                lines,
            })
            .await?;
            print!("{report}");
            Ok(())
        }
        Cmd::Eval {
            plant,
            scenario,
            seed,
            plant_seed,
            hours,
        } => {
            let report = ferrotwin_cli::eval::run(ferrotwin_cli::eval::EvalOptions {
                plant,
                size: ferrotwin_cli::eval::EVAL_SIZE,
                plant_seed,
                scenario,
                seed,
                hours,
                step_ms: 1000,
                sync_ms: 1000,
            })
            .await?;
            print!("{report}");
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Http {
                    sensors,
                    seconds,
                    clients,
                },
        } => {
            init_tracing("warn,sled=warn");
            let report = bench::http::http(bench::http::HttpBench {
                sensors,
                seconds,
                clients,
            })
            .await?;
            print!("{report}");
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Ingest {
                    sensors,
                    seconds,
                    detectors,
                },
        } => {
            init_tracing("warn,sled=warn");
            let report = bench::ingest(bench::IngestBench {
                sensors,
                seconds,
                detectors: detectors == OnOff::On,
            })
            .await?;
            print!("{report}");
            Ok(())
        }
        Cmd::Bench {
            what: BenchCmd::Actors { count },
        } => {
            println!("{:.0}", bench::bare_actor_bytes(count).await?);
            Ok(())
        }
    }
}
