//! Cost of the machine detectors: ns per `MachineDetector::update` past learning, and the size
//! of the encoded state, for 8 and 32 sensors.
//! `cargo run --release -p ferrotwin-models --example machine_detect_timing [8|32]`

use std::hint::black_box;
use std::time::Instant;

use ferrotwin_models::Timestamp;
use ferrotwin_models::detect::Regime;
use ferrotwin_models::detect::machine::{MachineDetector, MachineDetectorConfig};

const SEC: i64 = 1_000_000;

fn main() {
    let cfg = MachineDetectorConfig::default();
    // A sensor count as the argument measures only that one (for `perf stat`: on a shared
    // machine wall time per update is inflated by other processes, CPU time is not).
    let only: Option<usize> = std::env::args().nth(1).and_then(|s| s.parse().ok());
    for n in [8usize, 32] {
        if only.is_some_and(|o| o != n) {
            continue;
        }
        let limits: Vec<Option<f64>> = (0..n).map(|i| (i % 2 == 0).then_some(100.0)).collect();
        let mut d = MachineDetector::new(&cfg, &limits);
        let mut values = vec![0.0; n];
        let mut x: u64 = 1;
        let mut step = |d: &mut MachineDetector, s: i64, values: &mut [f64]| {
            for v in values.iter_mut() {
                x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                *v = 50.0 + ((x >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 4.0;
            }
            black_box(d.update(&cfg, Timestamp(s * SEC), values, Regime::RUNNING));
        };
        // Past learning: the figure is for the monitoring path.
        for s in 0..5000 {
            step(&mut d, s, &mut values);
        }
        let updates = 1_000_000 / n as i64 * 8;
        let t0 = Instant::now();
        for s in 5000..5000 + updates {
            step(&mut d, s, &mut values);
        }
        let ns = t0.elapsed().as_nanos() as f64 / updates as f64;
        let mut bytes = Vec::new();
        d.encode(&mut bytes);
        println!(
            "{n} sensors: {ns:.0} ns per update (incl. ~{n} LCG draws), encoded state {} bytes",
            bytes.len()
        );
    }
}
