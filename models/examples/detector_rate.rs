//! Cost of `SensorDetector::update`: feeds a noisy signal with regime changes, a spike now
//! and then and stuck stretches to a set of detectors and prints nanoseconds per reading and
//! the detector's size.
//!
//! ```text
//! cargo run --release -p ferrotwin-models --example detector_rate [readings]
//! ```

use std::hint::black_box;
use std::time::Instant;

use ferrotwin_models::Timestamp;
use ferrotwin_models::detect::Regime;
use ferrotwin_models::detect::sensor::{SensorDetector, SensorDetectorConfig};

/// SplitMix64 to a value in [-1, 1).
fn noise(i: u64) -> f64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 52) as f64 - 1.0
}

fn main() {
    let readings: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000_000);
    let cfg = SensorDetectorConfig::default();
    // Many detectors, visited round-robin, as a runtime with many sensors touches them: the
    // state is not always in L1.
    const SENSORS: usize = 10_000;
    let mut dets = vec![SensorDetector::new(&cfg); SENSORS];
    let per_sensor = readings / SENSORS as u64;
    let start = Instant::now();
    let mut alarms = 0u64;
    let mut score_sum = 0.0;
    for i in 0..per_sensor {
        let regime = Regime(if (i / 600).is_multiple_of(3) { 0 } else { 1 });
        let ts = Timestamp::from_millis(i as i64 * 1000);
        for (k, d) in dets.iter_mut().enumerate() {
            let base = if regime.0 == 1 { 60.0 } else { 20.0 };
            let mut v = base + noise(i * SENSORS as u64 + k as u64);
            if (i + k as u64).is_multiple_of(1800) {
                v += 40.0;
            }
            if (i + k as u64) % 7200 < 120 {
                v = 42.0;
            }
            let verdict = d.update(&cfg, ts, black_box(v), regime);
            score_sum += verdict.score;
            alarms += u64::from(verdict.transition.is_some());
        }
    }
    let elapsed = start.elapsed();
    let n = per_sensor * SENSORS as u64;
    println!(
        "{n} readings over {SENSORS} sensors: {:.1} ns per reading ({:.1} M readings/s), {alarms} transitions, mean score {:.3}",
        elapsed.as_nanos() as f64 / n as f64,
        n as f64 / elapsed.as_secs_f64() / 1e6,
        score_sum / n as f64
    );
    println!(
        "size_of::<SensorDetector>() = {} bytes, encoded {} bytes",
        std::mem::size_of::<SensorDetector>(),
        {
            let mut b = Vec::new();
            dets[0].encode(&mut b);
            b.len()
        }
    );
}
