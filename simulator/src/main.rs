//! `ferrotwin-sim`: generates plant specs (serving simulated PLCs comes later).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferrotwin_sim::generate::{PlantSize, count_assets, generate};

#[derive(Debug, Parser)]
#[command(name = "ferrotwin-sim", about = "ferrotwin plant simulator", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a generated plant spec to DIR/plant.toml.
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
    }
}
