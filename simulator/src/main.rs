//! `ferrotwin-sim`: generates plant specs, runs them offline with scenarios, and serves them
//! as simulated PLCs on Modbus TCP and OPC UA and as publishers on MQTT.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrotwin_sim::generate::{PlantSize, count_assets, generate};
use ferrotwin_sim::mapping::Mapping;
use ferrotwin_sim::run::{Pace, RunOptions, RunSummary, run};
use ferrotwin_sim::scenario::parse_duration_ms;

#[derive(Debug, Parser)]
#[command(name = "ferrotwin-sim", about = "ferrotwin plant simulator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a generated plant spec to DIR/plant.toml and its Modbus register map to
    /// DIR/mapping.toml.
    Generate {
        #[arg(long, default_value_t = PlantSize::DEMO.sites)]
        sites: u32,
        /// Areas per site.
        #[arg(long, default_value_t = PlantSize::DEMO.areas)]
        areas: u32,
        /// Lines per area.
        #[arg(long, default_value_t = PlantSize::DEMO.lines)]
        lines: u32,
        /// Machines per line.
        #[arg(long, default_value_t = PlantSize::DEMO.machines)]
        machines: u32,
        /// Sensors per machine; 0 keeps each machine type's own 4-6 sensors.
        #[arg(long, default_value_t = 0)]
        sensors_per_machine: u32,
        /// Picks each machine's type; the same seed gives the same spec.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (created if missing).
        #[arg(long)]
        out: PathBuf,
    },
    /// Run DIR/plant.toml (and a scenario) for a stretch of simulated time, write the
    /// ground-truth labels and print a summary.
    Run {
        /// Directory holding plant.toml.
        #[arg(long)]
        plant: PathBuf,
        /// Scenario file scheduling faults.
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Used unless the scenario sets its own.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Simulated time to run: "90s", "10m", "2h".
        #[arg(long = "for", default_value = "10m", value_parser = sim_duration_ms)]
        run_for: u64,
        /// Simulated seconds per wall-clock second (60 = a simulated minute per second).
        #[arg(long, conflicts_with = "fast")]
        speed: Option<f64>,
        /// As fast as possible (the default).
        #[arg(long)]
        fast: bool,
        /// Label file; default DIR/labels.csv.
        #[arg(long)]
        labels: Option<PathBuf>,
    },
    /// Serve DIR/plant.toml on Modbus TCP (one server per line on 127.0.0.1), OPC UA (one
    /// server per site on 127.0.0.1, security None) and MQTT (JSON on ISA-95 topics and
    /// Sparkplug B; speed commands accepted on both), addresses printed and written to
    /// DIR/endpoints.toml; runs in real time until Ctrl-C.
    Serve {
        /// Directory holding plant.toml.
        #[arg(long)]
        plant: PathBuf,
        /// Simulated seconds per wall-clock second.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Publish readings as JSON to the MQTT broker at HOST:PORT; without it, an embedded
        /// broker is started on 127.0.0.1.
        #[arg(long, value_name = "HOST:PORT")]
        mqtt: Option<String>,
        /// MQTT payloads: JSON on ISA-95 topics, Sparkplug B (group = site path joined with
        /// '-', edge node = <area>-<line>, device = machine), or both.
        #[arg(long, value_enum, default_value = "both")]
        mqtt_format: ferrotwin_sim::serve::MqttFormat,
    },
}

fn sim_duration_ms(s: &str) -> Result<u64, String> {
    parse_duration_ms(s)
        .ok_or_else(|| format!("{s:?} is not a duration (a whole number and ms, s, m or h)"))
}

fn print_summary(s: &RunSummary) {
    println!(
        "simulated {:.1} s (seed {}): {} readings",
        s.simulated_ms as f64 / 1000.0,
        s.seed,
        s.readings
    );
    for (property, n) in &s.readings_by_property {
        println!("  {property}: {n}");
    }
    let faults: u64 = s.faults_by_kind.values().sum();
    println!("faults injected: {faults}");
    for (kind, n) in &s.faults_by_kind {
        println!("  {kind}: {n}");
    }
    println!("labels: {}", s.labels_path.display());
}

/// Plants from this many sensors on report their progress even when stderr is not a terminal
/// (a CI log then shows the run is alive).
const PROGRESS_FROM_SENSORS: u64 = 100_000;

/// Streams `mapping` into `file`; with a terminal on stderr or a large plant, prints how many
/// PLC lines are written at most once a second.
fn write_mapping(mapping: &Mapping, file: &Path, sensors: u64) -> std::io::Result<()> {
    let show = std::io::stderr().is_terminal() || sensors >= PROGRESS_FROM_SENSORS;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(file)?);
    let started = Instant::now();
    let mut last = started;
    mapping.write_toml(&mut out, |done, total| {
        if show && (last.elapsed() >= Duration::from_secs(1) || (done == total && last != started))
        {
            last = Instant::now();
            eprintln!(
                "{}: {done}/{total} lines written ({:.1} s)",
                file.display(),
                started.elapsed().as_secs_f64()
            );
        }
    })?;
    out.flush()
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Generate {
            sites,
            areas,
            lines,
            machines,
            sensors_per_machine,
            seed,
            out,
        } => {
            let size = PlantSize {
                sites,
                areas,
                lines,
                machines,
                sensors_per_machine,
            };
            let spec = generate(size, seed);
            spec.validate("generated plant")
                .context("the generator produced an invalid spec")?;
            std::fs::create_dir_all(&out)
                .with_context(|| format!("creating output directory {}", out.display()))?;
            let file = out.join("plant.toml");
            std::fs::write(&file, spec.to_toml())
                .with_context(|| format!("writing {}", file.display()))?;
            // A line too large for one Modbus unit still gets its spec: it can be run and
            // driven in-process, just not served.
            match Mapping::of(&spec) {
                Ok(mapping) => {
                    let file = out.join("mapping.toml");
                    write_mapping(&mapping, &file, size.sensor_count())
                        .with_context(|| format!("writing {}", file.display()))?;
                }
                Err(e) => eprintln!("no mapping.toml: {e}"),
            }
            let c = count_assets(&spec);
            println!(
                "wrote {}: {} sites, {} areas, {} lines, {} machines, {} sensors",
                file.display(),
                c.sites,
                c.areas,
                c.lines,
                c.machines,
                c.sensors
            );
            Ok(())
        }
        Command::Run {
            plant,
            scenario,
            seed,
            run_for,
            speed,
            fast: _,
            labels,
        } => {
            let opts = RunOptions {
                plant_dir: plant,
                scenario,
                seed,
                duration_ms: run_for,
                pace: speed.map_or(Pace::Fast, Pace::Speed),
                labels,
            };
            let summary = run(&opts)
                .with_context(|| format!("running the plant in {}", opts.plant_dir.display()))?;
            print_summary(&summary);
            Ok(())
        }
        Command::Serve {
            plant,
            speed,
            seed,
            mqtt,
            mqtt_format,
        } => {
            let runtime = tokio::runtime::Runtime::new().context("starting the tokio runtime")?;
            runtime
                .block_on(ferrotwin_sim::serve::serve_with(
                    &plant,
                    speed,
                    seed,
                    mqtt.as_deref(),
                    mqtt_format,
                    async {
                        // No Ctrl-C handler (an unusual platform): serve until killed.
                        if tokio::signal::ctrl_c().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    },
                ))
                .with_context(|| format!("serving the plant in {}", plant.display()))
        }
    }
}
