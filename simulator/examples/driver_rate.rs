//! Readings per second of the in-process driver (`driver::run_offline`) on a 100k-sensor
//! plant into a sink that takes everything. Pin it to one core for the one-core figure:
//! `cargo build --release -p ferrotwin-sim --example driver_rate &&
//! taskset -c 0 target/release/examples/driver_rate [simulated seconds]`.

use std::time::Instant;

use ferrotwin_sim::driver::run_offline;
use ferrotwin_sim::generate::{PlantSize, generate};
use ferrotwin_sim::model::PlantSim;
use ferrotwin_sim::run::{CountingSink, RUN_START};

fn main() {
    let seconds: i64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let size = PlantSize {
        sites: 1,
        areas: 10,
        lines: 20,
        machines: 50,
        sensors_per_machine: 10,
    };
    let spec = generate(size, 1);
    let built = Instant::now();
    let mut sim = PlantSim::new(&spec, 1, RUN_START);
    let build_s = built.elapsed().as_secs_f64();
    let sink = CountingSink::default();
    let started = Instant::now();
    let stats = run_offline(
        &mut sim,
        &sink,
        RUN_START.plus_ms(seconds * 1000),
        1000,
        4096,
    );
    let wall = started.elapsed().as_secs_f64();
    println!(
        "{} sensors: built in {build_s:.2} s; {seconds} simulated s in {wall:.2} s: {} readings, \
         {:.2} M readings/s, {} batches",
        sim.sensor_count(),
        stats.readings,
        stats.readings as f64 / wall / 1e6,
        stats.pushed_batches
    );
}
