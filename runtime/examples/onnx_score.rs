//! Time per score of the in-repo ONNX model (W = 16 samples × N = 3 inputs) and per window
//! push, and the load errors of the deliberately broken models.
//!
//! `cargo run --release -p ferrotwin-runtime --example onnx_score [-- SCORES]`

use std::path::Path;
use std::time::Instant;

use ferrotwin_runtime::{ModelWindow, OnnxModel};

const W: usize = 16;
const N: usize = 3;

fn main() -> anyhow::Result<()> {
    let scores: u32 = match std::env::args().nth(1) {
        Some(arg) => arg.parse()?,
        None => 20_000,
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/models");
    let started = Instant::now();
    let model = OnnxModel::load(&dir.join("window_score.onnx"), "press", N, W)?;
    println!(
        "load + optimise: {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );

    let mut window = ModelWindow::new(N, W, 1);
    let sample = |i: u32| {
        let x = f64::from(i % 97);
        [20.0 + 0.01 * x, 50.0 - 0.02 * x, 80.0 + 0.03 * x]
    };
    let started = Instant::now();
    let mut ready = 0u32;
    for i in 0..scores {
        if window.push(&sample(i)) {
            ready += 1;
        }
    }
    let push_ns = started.elapsed().as_secs_f64() * 1e9 / f64::from(scores);
    println!("push: {push_ns:.1} ns per sample ({ready} ready)");

    // Warm-up: first runs fault pages and fill caches.
    let mut sum = 0.0;
    for _ in 0..100 {
        sum += model.score(&window)?;
    }
    let started = Instant::now();
    for i in 0..scores {
        window.push(&sample(i));
        sum += model.score(&window)?;
    }
    let per_score_us = started.elapsed().as_secs_f64() * 1e6 / f64::from(scores);
    println!(
        "score: {per_score_us:.2} µs per push + score, W = {W}, N = {N}, {scores} runs (checksum {sum:.3})"
    );

    for bad in [
        "bad_output_shape.onnx",
        "bad_input_rank.onnx",
        "no_such_file.onnx",
    ] {
        if let Err(err) = OnnxModel::load(&dir.join(bad), "press", N, W) {
            println!("load error: {err}");
        }
    }
    if let Err(err) = OnnxModel::load(&dir.join("window_score.onnx"), "press", 4, 8) {
        println!("load error: {err}");
    }
    Ok(())
}
