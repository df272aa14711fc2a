use std::path::PathBuf;

use super::*;

/// `window_score.onnx`'s fixed shape (see tests/models/make_window_score.py).
const W: usize = 16;
const N: usize = 3;

fn model_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/models")
        .join(name)
}

fn window_score() -> OnnxModel {
    OnnxModel::load(&model_path("window_score.onnx"), "press", N, W).expect("in-repo model loads")
}

/// A full window of `W` samples around 20/50/80 with a small wobble, then `last`.
fn window_ending_with(last: [f64; N]) -> ModelWindow {
    let mut window = ModelWindow::new(N, W, 1);
    for i in 0..W - 1 {
        let wobble = if i % 2 == 0 { 0.1 } else { -0.1 };
        window.push(&[20.0 + wobble, 50.0 - wobble, 80.0 + wobble]);
    }
    assert!(window.push(&last), "a full window evaluates");
    window
}

fn assert_names(err: &ModelError, parts: &[&str]) {
    let msg = err.to_string();
    for part in parts {
        assert!(msg.contains(part), "{part:?} missing from: {msg}");
    }
}

#[test]
fn model_is_shared_across_twin_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<OnnxModel>();
    send_sync::<Arc<OnnxModel>>();
}

#[test]
fn flat_window_scores_near_zero_and_a_step_scores_above_threshold() {
    let model = window_score();
    let flat = model
        .score(&window_ending_with([20.1, 49.9, 80.1]))
        .expect("flat scores");
    assert!(flat.abs() < 3.0, "flat window scored {flat}");
    let constant = {
        let mut w = ModelWindow::new(N, W, 1);
        for _ in 0..W {
            w.push(&[1.0, 2.0, 3.0]);
        }
        model.score(&w).expect("constant scores")
    };
    // f32 arithmetic: not exactly zero.
    assert!(constant.abs() < 1e-3, "constant window scored {constant}");
    let step = model
        .score(&window_ending_with([20.0, 58.0, 80.0]))
        .expect("step scores");
    assert!(step > 3.0, "a step of 8 on input 2 scored {step}");
}

#[test]
fn score_sees_samples_oldest_first_after_the_ring_wraps() {
    let model = window_score();
    let mut window = ModelWindow::new(N, W, 1);
    // A step long ago, then a flat stretch longer than the window: the step has left.
    window.push(&[100.0, 100.0, 100.0]);
    for _ in 0..W + 5 {
        window.push(&[1.0, 1.0, 1.0]);
    }
    let score = model.score(&window).expect("scores");
    assert!(score.abs() < 1e-3, "old step still seen: {score}");
    // The newest sample is the one compared with the rest, wherever the ring's head is.
    window.push(&[1.0, 1.0, 9.0]);
    let score = model.score(&window).expect("scores");
    assert!(score > 3.0, "new step not seen: {score}");
}

#[test]
fn model_with_symbolic_dims_runs_with_the_specs_window() {
    // Declared [batch, window, 3] in, [batch] out: tract takes our [1, window, 3].
    let file = model_path("mean_any_window.onnx");
    for window_len in [1, 5, 64] {
        let model = OnnxModel::load(&file, "press", N, window_len).expect("symbolic dims load");
        let mut window = ModelWindow::new(N, window_len, 1);
        for _ in 0..window_len {
            window.push(&[1.0, 2.0, 3.0]);
        }
        let mean = model.score(&window).expect("scores");
        assert!(
            (mean - 2.0).abs() < 1e-5,
            "window {window_len}: mean {mean}"
        );
    }
    let err = OnnxModel::load(&file, "press", 2, 5).expect_err("declared 3 inputs");
    assert_names(&err, &["has shape [batch, window, 3], expected [1, 5, 2]"]);
}

#[test]
fn missing_file_names_the_file_and_the_type() {
    let file = model_path("no_such_model.onnx");
    let err = OnnxModel::load(&file, "press", N, W).expect_err("missing");
    assert!(matches!(err, ModelError::Missing { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            "no_such_model.onnx",
            r#"machine type "press""#,
            "does not exist",
        ],
    );
}

#[test]
fn unreadable_file_is_told_apart_from_a_missing_one() {
    // A directory opens but cannot be read as a file (as root, permissions would not stop us).
    let dir = tempfile::tempdir().expect("tempdir");
    let err = OnnxModel::load(dir.path(), "press", N, W).expect_err("a directory");
    assert!(matches!(err, ModelError::Unreadable { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            &dir.path().display().to_string(),
            r#""press""#,
            "cannot be read",
        ],
    );
}

#[test]
fn bytes_that_are_not_onnx_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, bytes) in [
        (
            "garbage.onnx",
            b"\xff\xff\xff\xff not a protobuf at all".to_vec(),
        ),
        ("empty.onnx", Vec::new()),
        ("text.onnx", b"version = 1\n".to_vec()),
    ] {
        let file = dir.path().join(name);
        std::fs::write(&file, bytes).expect("write");
        let err = OnnxModel::load(&file, "press", N, W).expect_err(name);
        assert!(matches!(err, ModelError::NotOnnx { .. }), "{name}: {err:?}");
        assert_names(&err, &[name, r#""press""#, "not an ONNX model"]);
    }
}

#[test]
fn window_or_inputs_other_than_the_files_name_expected_and_actual_shape() {
    let file = model_path("window_score.onnx");
    let err = OnnxModel::load(&file, "press", 4, W).expect_err("4 inputs");
    assert!(matches!(err, ModelError::InputShape { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            "window_score.onnx",
            r#""press""#,
            "[1, 16, 3]",
            "expected [1, 16, 4]",
        ],
    );
    let err = OnnxModel::load(&file, "press", N, 8).expect_err("window 8");
    assert_names(&err, &["has shape [1, 16, 3], expected [1, 8, 3]"]);
}

#[test]
fn input_of_wrong_rank_names_expected_and_actual_shape() {
    let file = model_path("bad_input_rank.onnx");
    let err = OnnxModel::load(&file, "press", N, W).expect_err("rank 2");
    assert!(matches!(err, ModelError::InputShape { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            "bad_input_rank.onnx",
            r#""press""#,
            "has shape [16, 3], expected [1, 16, 3]",
        ],
    );
}

#[test]
fn output_of_more_than_one_value_names_the_actual_shape() {
    let file = model_path("bad_output_shape.onnx");
    let err = OnnxModel::load(&file, "press", N, W).expect_err("output [1, 3]");
    assert!(matches!(err, ModelError::OutputShape { .. }), "{err:?}");
    assert_names(
        &err,
        &[
            "bad_output_shape.onnx",
            r#""press""#,
            "has shape [1, 3], expected [1, 1] or [1]",
        ],
    );
}

#[test]
fn score_refuses_a_window_not_full_or_of_another_shape() {
    let model = window_score();
    let mut window = ModelWindow::new(N, W, 1);
    window.push(&[1.0, 2.0, 3.0]);
    let err = model.score(&window).expect_err("not full");
    assert!(matches!(err, ModelError::NotReady { .. }), "{err:?}");
    let other = ModelWindow::new(N, W + 1, 1);
    let err = model.score(&other).expect_err("other shape");
    assert!(matches!(err, ModelError::WindowShape { .. }), "{err:?}");
    assert_names(&err, &["17 × 3", "[1, 16, 3]"]);
}

#[test]
fn output_that_is_not_finite_is_an_error_not_a_score() {
    // ln(largest value): -inf on zeros, NaN on negatives.
    let model = OnnxModel::load(&model_path("log_of_max.onnx"), "press", N, W).expect("loads");
    for (fill, finite) in [(1.0, true), (0.0, false), (-1.0, false)] {
        let mut window = ModelWindow::new(N, W, 1);
        for _ in 0..W {
            window.push(&[fill; N]);
        }
        match model.score(&window) {
            Ok(score) => assert!(finite && score == 0.0, "{fill}: scored {score}"),
            Err(err) => {
                assert!(!finite, "{fill}: {err}");
                assert!(
                    matches!(err, ModelError::NotFinite { .. }),
                    "{fill}: {err:?}"
                );
                assert_names(
                    &err,
                    &["log_of_max.onnx", r#""press""#, "not a finite score"],
                );
            }
        }
    }
}

#[test]
fn window_is_not_ready_until_full() {
    let mut window = ModelWindow::new(2, 4, 1);
    for i in 0..3 {
        assert!(!window.push(&[1.0, 2.0]), "sample {i} of 4");
        assert!(!window.is_full());
    }
    assert!(window.push(&[1.0, 2.0]), "fourth sample fills it");
    assert_eq!(window.len(), 4);
    assert!(
        window.push(&[1.0, 2.0]),
        "every = 1 evaluates each sample once full"
    );
}

#[test]
fn window_evaluates_on_the_first_full_window_then_every_nth_sample() {
    let mut window = ModelWindow::new(1, 3, 4);
    let ready: Vec<bool> = (0..12).map(|i| window.push(&[f64::from(i)])).collect();
    let at: Vec<usize> = (0..12).filter(|&i| ready[i]).collect();
    assert_eq!(at, [2, 6, 10]);
}

#[test]
fn non_finite_value_empties_the_window_until_refilled() {
    let mut window = ModelWindow::new(2, 3, 1);
    for _ in 0..3 {
        window.push(&[1.0, 2.0]);
    }
    assert!(window.is_full());
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e300] {
        assert!(!window.push(&[1.0, bad]), "{bad} is not evaluated");
        assert!(window.is_empty(), "{bad} empties the window");
        assert!(!window.push(&[1.0, 2.0]));
        assert!(!window.push(&[1.0, 2.0]));
        assert!(
            window.push(&[1.0, 2.0]),
            "three finite samples after {bad} refill it"
        );
    }
    assert!(!window.push(&[1.0]), "a short sample is not evaluated");
    assert!(window.is_empty(), "a short sample empties the window");
}

#[test]
fn window_copies_rows_oldest_first() {
    let mut window = ModelWindow::new(2, 3, 1);
    for i in 0..5 {
        window.push(&[f64::from(i), f64::from(i) + 0.5]);
    }
    let mut out = [0.0f32; 6];
    window.copy_oldest_first(&mut out);
    assert_eq!(out, [2.0, 2.5, 3.0, 3.5, 4.0, 4.5]);
}

const PLANT: &str = r#"
version = 1
enterprise = "acme"

[machine_types.press]
ideal_cycle_ms = 4000
sensors = [{ name = "temp" }, { name = "force" }, { name = "speed" }]
[machine_types.press.model]
file = "window_score.onnx"
inputs = ["temp", "force", "speed"]
window = 16

[machine_types.lathe]
ideal_cycle_ms = 4000
sensors = [{ name = "temp" }, { name = "force" }, { name = "speed" }]
[machine_types.lathe.model]
file = "lathe_model_that_is_not_there.onnx"
inputs = ["temp", "force", "speed"]
window = 16

[machine_types.drill]
ideal_cycle_ms = 4000
sensors = [{ name = "temp" }]
"#;

#[test]
fn cache_loads_good_models_and_reports_bad_ones_per_type() {
    let spec = PlantSpec::from_toml(PLANT, "plant.toml").expect("valid spec");
    let (models, errors) = ModelCache::load_for_spec(&spec, &model_path(""));
    assert_eq!(models.keys().collect::<Vec<_>>(), ["press"]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(errors[0], ModelError::Missing { .. }),
        "{errors:?}"
    );
    assert_names(
        &errors[0],
        &[r#""lathe""#, "lathe_model_that_is_not_there.onnx"],
    );
    let press = &models["press"];
    let window = ModelWindow::for_spec(spec.machine_types["press"].model.as_ref().expect("model"));
    assert_eq!(
        (window.inputs(), window.window()),
        (press.inputs(), press.window())
    );
}
