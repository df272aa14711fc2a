//! `ferrotwin`: the runtime (demo, run) and a CLI client of its gRPC API.

use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use ferrotwin_cli::logging::{self, LogFormat};
use ferrotwin_cli::{bench, client as cli, demo, run};
use ferrotwin_runtime::telemetry::{Telemetry, TelemetryConfig};

mod args;

use args::{Args, BenchCmd, Cmd, FleetCmd, OnOff};

fn init_tracing(default: &str, format: LogFormat) {
    logging::init(default, format, &Telemetry::off());
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let log_format = args.log_format;
    match args.cmd {
        Cmd::Demo {
            grpc_addr,
            http_addr,
            data_dir,
            seed,
            speed,
            for_s,
            via,
            secure,
        } => {
            // The embedded broker logs every readiness probe as an error: quiet in the demo.
            let telemetry = Telemetry::from_env(&TelemetryConfig {
                service_name: Some("ferrotwin-demo".into()),
                ..TelemetryConfig::default()
            })?;
            logging::init(
                &logging::default_filter("info,rumqttd=off"),
                log_format,
                &telemetry,
            );
            let done = demo::run(demo::DemoOptions {
                grpc_addr,
                http_addr,
                data_dir,
                seed,
                speed,
                duration: for_s.map(Duration::from_secs),
                via,
                secure,
            })
            .await;
            shutdown(telemetry).await;
            done
        }
        Cmd::Run {
            config,
            role,
            http_addr,
        } => {
            let telemetry = Telemetry::from_env(&run::telemetry_config(&config))?;
            logging::init(&logging::default_filter("info"), log_format, &telemetry);
            let done = run::run(&config, role, http_addr).await;
            shutdown(telemetry).await;
            done
        }
        Cmd::Import { source } => {
            // The OPC UA client's own warnings about a session we end on purpose are noise.
            let filter = logging::default_filter("warn") + ",opcua_client=error";
            init_tracing(&filter, log_format);
            import(source).await
        }
        Cmd::Check { config } => {
            init_tracing(&logging::default_filter("warn"), log_format);
            run::check(&config).await
        }
        Cmd::Tree {
            path,
            depth,
            remote,
        } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::tree(&mut c, &path, depth).await?);
            Ok(())
        }
        Cmd::Get { path, remote } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::get(&mut c, &path).await?);
            Ok(())
        }
        Cmd::Watch {
            path,
            events,
            remote,
        } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            cli::watch(&mut c, &path, events, None).await
        }
        Cmd::Query {
            expr,
            limit,
            rank,
            remote,
        } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
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
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
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
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
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
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::ack(&mut c, &path, &alarm, &by, &comment).await?);
            Ok(())
        }
        Cmd::Fleet { what } => {
            init_tracing("warn", log_format);
            match what {
                FleetCmd::Push {
                    site,
                    dir,
                    by,
                    remote,
                } => {
                    let plant = std::fs::read_to_string(dir.join("plant.toml"))
                        .with_context(|| format!("reading {}", dir.join("plant.toml").display()))?;
                    let site_toml = match std::fs::read_to_string(dir.join("site.toml")) {
                        Ok(t) => t,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                        Err(e) => {
                            return Err(anyhow::anyhow!(
                                "reading {}: {e}",
                                dir.join("site.toml").display()
                            ));
                        }
                    };
                    let mut c = cli::connect(&remote.connect()).await?;
                    print!(
                        "{}",
                        cli::fleet_push(&mut c, &site, plant, site_toml, &by).await?
                    );
                }
                FleetCmd::Status { remote } => {
                    let mut c = cli::connect(&remote.connect()).await?;
                    print!("{}", cli::fleet_status(&mut c).await?);
                }
                FleetCmd::Rollback {
                    site,
                    to,
                    by,
                    remote,
                } => {
                    let mut c = cli::connect(&remote.connect()).await?;
                    print!("{}", cli::fleet_rollback(&mut c, &site, to, &by).await?);
                }
            }
            Ok(())
        }
        Cmd::Rules {
            path,
            set,
            by,
            remote,
        } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            let path = path.unwrap_or_default();
            let out = match set {
                Some(set) => cli::set_rule_mode(&mut c, &path, &set, &by).await?,
                None => cli::rules(&mut c, &path).await?,
            };
            print!("{out}");
            Ok(())
        }
        Cmd::Plant { show, remote } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::plant(&mut c, show).await?);
            Ok(())
        }
        Cmd::Apply {
            plant,
            site,
            dry_run,
            expect_version,
            by,
            remote,
        } => {
            init_tracing("warn", log_format);
            let text = std::fs::read_to_string(&plant)
                .with_context(|| format!("reading {}", plant.display()))?;
            let site = match &site {
                Some(f) => Some(
                    std::fs::read_to_string(f)
                        .with_context(|| format!("reading {}", f.display()))?,
                ),
                None => None,
            };
            let mut c = cli::connect(&remote.connect()).await?;
            print!(
                "{}",
                cli::apply(&mut c, &text, site.as_deref(), dry_run, expect_version, &by).await?
            );
            Ok(())
        }
        Cmd::Write {
            path,
            property,
            value,
            by,
            remote,
        } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!(
                "{}",
                cli::write(&mut c, &path, &property, &value, &by).await?
            );
            Ok(())
        }
        Cmd::Replication { remote } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::replication(&mut c).await?);
            Ok(())
        }
        Cmd::Connections { remote } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::connections(&mut c).await?);
            Ok(())
        }
        Cmd::Whoami { remote } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            print!("{}", cli::whoami(&mut c).await?);
            Ok(())
        }
        Cmd::Audit {
            verify,
            after,
            limit,
            subject,
            action,
            target,
            remote,
        } => {
            init_tracing("warn", log_format);
            let mut c = cli::connect(&remote.connect()).await?;
            if verify.is_some() {
                print!("{}", cli::audit_verify(&mut c).await?);
            } else {
                let req = ferrotwin_proto::v1::ListAuditRequest {
                    after_seq: after,
                    limit,
                    subject,
                    action,
                    target,
                    ..Default::default()
                };
                print!("{}", cli::audit(&mut c, req).await?);
            }
            Ok(())
        }
        Cmd::Token { name } => {
            let (token, hash) = ferrotwin_runtime::security::authn::new_service_token(&name)
                .map_err(anyhow::Error::msg)?;
            println!("token {token}");
            println!("[[security.tokens]]\nname = \"{name}\"\nhash = \"{hash}\"");
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
            init_tracing(&logging::default_filter("warn"), log_format);
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
            init_tracing(&logging::default_filter("warn,rumqttd=off"), log_format);
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
            what: BenchCmd::Security { calls, concurrency },
        } => {
            init_tracing(&logging::default_filter("warn"), log_format);
            let report =
                bench::security::security(bench::security::SecurityBench { calls, concurrency })
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
            init_tracing(&logging::default_filter("warn"), log_format);
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
                BenchCmd::Start {
                    sensors,
                    runs,
                    phase_dir,
                },
        } => {
            init_tracing(&logging::default_filter("warn"), log_format);
            let report = match phase_dir {
                Some(dir) => bench::start::phase(sensors, &dir).await?,
                None => {
                    tokio::task::spawn_blocking(move || bench::start::start(sensors, runs))
                        .await??
                }
            };
            print!("{report}");
            Ok(())
        }
        Cmd::Bench {
            what: BenchCmd::Actions { sensors, firings },
        } => {
            init_tracing(&logging::default_filter("warn"), log_format);
            let report =
                bench::actions::actions(bench::actions::ActionsBench { sensors, firings }).await?;
            print!("{report}");
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Apply {
                    sensors,
                    add,
                    period_ms,
                    per_type,
                },
        } => {
            init_tracing(&logging::default_filter("warn"), log_format);
            let report = bench::apply::apply(bench::apply::ApplyBench {
                sensors,
                add,
                period_ms,
                per_type,
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
            init_tracing(&logging::default_filter("warn"), log_format);
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
            what:
                BenchCmd::Telemetry {
                    sensors,
                    seconds,
                    rounds,
                    ratio,
                    writes,
                },
        } => {
            // Installs its own subscriber (the export is switched on and off).
            let report = bench::telemetry::telemetry(bench::telemetry::TelemetryBench {
                sensors,
                seconds,
                rounds,
                ratio,
                writes,
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

/// Flushes the OTLP exporters last (their export runs on this runtime's workers: off them).
async fn shutdown(telemetry: Telemetry) {
    if telemetry.is_on() {
        let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
    }
}

async fn import(source: args::ImportSource) -> Result<()> {
    use ferrotwin_cli::import;
    let (written, out) = match source {
        args::ImportSource::Opcua {
            endpoint,
            user,
            password_file,
            timeout_ms,
            out,
        } => {
            let src = import::opcua::Source {
                endpoint,
                user: user.zip(password_file),
                timeout_ms,
            };
            let naming = import::Naming {
                enterprise: out.enterprise.clone(),
                site: out.site.clone(),
            };
            (
                import::opcua::import(&src, &naming, &out.out, out.force).await?,
                out,
            )
        }
        args::ImportSource::Modbus {
            map,
            endpoint,
            unit_id,
            poll_interval_ms,
            out,
        } => {
            let src = import::modbus::Source {
                map,
                endpoint,
                unit_id,
                poll_interval_ms,
            };
            let naming = import::Naming {
                enterprise: out.enterprise.clone(),
                site: out.site.clone(),
            };
            (
                import::modbus::import(&src, &naming, &out.out, out.force)?,
                out,
            )
        }
        args::ImportSource::Sparkplug {
            broker,
            group,
            listen_s,
            user,
            password_file,
            out,
        } => {
            let src = import::sparkplug::Source {
                broker,
                group,
                user: user.zip(password_file),
                seconds: listen_s,
            };
            let naming = import::Naming {
                enterprise: out.enterprise.clone(),
                site: out.site.clone(),
            };
            (
                import::sparkplug::import(&src, &naming, &out.out, out.force).await?,
                out,
            )
        }
    };
    println!(
        "imported {} machine(s), {} sensor(s), {} tag(s){}: {} and {}",
        written.machines,
        written.sensors,
        written.tags,
        if written.skipped > 0 {
            format!(" ({} not importable, listed in site.toml)", written.skipped)
        } else {
            String::new()
        },
        written.plant.display(),
        written.site.display()
    );
    run::check(&written.site).await?;
    println!(
        "run it: ferrotwin run --config {}",
        out.out.join("site.toml").display()
    );
    Ok(())
}
