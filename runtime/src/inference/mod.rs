//! User-supplied models on machine twins: a machine type may name an ONNX file in the plant
//! spec (`models::spec::ModelSpec`); every machine twin of the type keeps a [`ModelWindow`] of
//! its sensors' latest values and scores it with the type's shared [`OnnxModel`].
//!
//! Loading is strict and happens once per type, before twins use it ([`ModelCache`]): a
//! missing, unreadable or wrongly shaped model is a [`ModelError`] for that type only, and its
//! twins run without the model. Scoring never panics on what the model returns.
//!
//! The model's input layout is fixed: one f32 tensor `[1, window, inputs]`, axis 1 the
//! samples oldest first, axis 2 the inputs in the spec's `inputs` order; its output is one
//! value (shape `[1, 1]` or `[1]`, any float type).

mod onnx;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrotwin_models::spec::{ModelSpec, PlantSpec};

pub use onnx::OnnxModel;

/// Largest model file read, in bytes. Models are loaded whole into memory once per machine
/// type; a file this big on a twin's path is almost surely the wrong file.
pub const MAX_MODEL_BYTES: u64 = 256 * 1024 * 1024;

/// Why a model could not be loaded or could not score. Every load error names the file and
/// the machine type, and shape errors the expected and the actual shape.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error("{}: machine type {asset_type:?}: model file does not exist", .file.display())]
    Missing { file: PathBuf, asset_type: String },
    #[error("{}: machine type {asset_type:?}: model file cannot be read: {reason}", .file.display())]
    Unreadable {
        file: PathBuf,
        asset_type: String,
        reason: String,
    },
    #[error(
        "{}: machine type {asset_type:?}: model file has {bytes} bytes, more than the limit of {MAX_MODEL_BYTES}",
        .file.display()
    )]
    TooLarge {
        file: PathBuf,
        asset_type: String,
        bytes: u64,
    },
    #[error("{}: machine type {asset_type:?}: not an ONNX model: {reason}", .file.display())]
    NotOnnx {
        file: PathBuf,
        asset_type: String,
        reason: String,
    },
    /// The file is ONNX but tract cannot build it (an operator it does not know, a broken
    /// graph) or cannot run it with the fixed input shape.
    #[error("{}: machine type {asset_type:?}: model cannot run with input {input}: {reason}", .file.display())]
    Unsupported {
        file: PathBuf,
        asset_type: String,
        input: String,
        reason: String,
    },
    #[error(
        "{}: machine type {asset_type:?}: model has {actual} inputs and {outputs} outputs, expected 1 input and 1 output",
        .file.display()
    )]
    Arity {
        file: PathBuf,
        asset_type: String,
        actual: usize,
        outputs: usize,
    },
    #[error(
        "{}: machine type {asset_type:?}: model input has shape {actual}, expected {expected} (1 × window × inputs)",
        .file.display()
    )]
    InputShape {
        file: PathBuf,
        asset_type: String,
        expected: String,
        actual: String,
    },
    #[error("{}: machine type {asset_type:?}: model input is {actual}, expected f32", .file.display())]
    InputType {
        file: PathBuf,
        asset_type: String,
        actual: String,
    },
    #[error(
        "{}: machine type {asset_type:?}: model output has shape {actual}, expected [1, 1] or [1] (one score)",
        .file.display()
    )]
    OutputShape {
        file: PathBuf,
        asset_type: String,
        actual: String,
    },
    #[error("{}: machine type {asset_type:?}: model output is {actual}, expected a float", .file.display())]
    OutputType {
        file: PathBuf,
        asset_type: String,
        actual: String,
    },
    #[error(
        "{}: machine type {asset_type:?}: window of {window} × {inputs} does not fit the model's {expected}",
        .file.display()
    )]
    WindowShape {
        file: PathBuf,
        asset_type: String,
        window: usize,
        inputs: usize,
        expected: String,
    },
    #[error("{}: machine type {asset_type:?}: window is not full yet", .file.display())]
    NotReady { file: PathBuf, asset_type: String },
    #[error("{}: machine type {asset_type:?}: model run failed: {reason}", .file.display())]
    Run {
        file: PathBuf,
        asset_type: String,
        reason: String,
    },
    #[error("{}: machine type {asset_type:?}: model returned {value}, not a finite score", .file.display())]
    NotFinite {
        file: PathBuf,
        asset_type: String,
        value: f64,
    },
}

/// The recent samples one machine twin feeds its model: a ring of `window` rows of `inputs`
/// f32 values, allocated once.
///
/// A sample with a non-finite value (NaN, ±inf, or beyond f32's range) is not stored: it
/// empties the window, and the model is next evaluated once `window` finite samples have
/// arrived again. So a model never sees a hole, and a missing value is never invented.
#[derive(Debug, Clone)]
pub struct ModelWindow {
    inputs: usize,
    window: usize,
    every: u32,
    /// Row `r` holds the sample written `r`-th modulo `window`.
    rows: Box<[f32]>,
    /// Row the next sample goes to; when full, also the oldest row.
    next: usize,
    /// Finite samples in a row since the last reset, capped at `window`.
    filled: usize,
    /// Full-window samples to skip before the next evaluation.
    until_eval: u32,
}

impl ModelWindow {
    /// A window of `window` samples of `inputs` values, evaluated on the first full window
    /// and then every `every` samples. Zeros are raised to 1 (a validated spec has none).
    pub fn new(inputs: usize, window: usize, every: u32) -> ModelWindow {
        let inputs = inputs.max(1);
        let window = window.max(1);
        ModelWindow {
            inputs,
            window,
            every: every.max(1),
            rows: vec![0.0; inputs * window].into_boxed_slice(),
            next: 0,
            filled: 0,
            until_eval: 0,
        }
    }

    /// The window a machine twin keeps for the model of its type.
    pub fn for_spec(spec: &ModelSpec) -> ModelWindow {
        ModelWindow::new(spec.inputs.len(), spec.window, spec.every)
    }

    /// Adds one sample (`values` in the spec's `inputs` order). True when the window is full
    /// and this is a sample to evaluate on: the first full window, then every `every`-th
    /// sample. A non-finite value, or a slice of the wrong length, empties the window (see
    /// the type's doc) and returns false.
    pub fn push(&mut self, values: &[f64]) -> bool {
        if values.len() != self.inputs || !values.iter().all(|v| (*v as f32).is_finite()) {
            self.reset();
            return false;
        }
        let start = self.next * self.inputs;
        for (slot, v) in self.rows[start..start + self.inputs].iter_mut().zip(values) {
            *slot = *v as f32;
        }
        self.next = (self.next + 1) % self.window;
        self.filled = (self.filled + 1).min(self.window);
        if !self.is_full() {
            return false;
        }
        if self.until_eval == 0 {
            self.until_eval = self.every - 1;
            true
        } else {
            self.until_eval -= 1;
            false
        }
    }

    /// Forgets every sample: the next evaluation comes after `window` new finite samples.
    pub fn reset(&mut self) {
        self.next = 0;
        self.filled = 0;
        self.until_eval = 0;
    }

    pub fn is_full(&self) -> bool {
        self.filled == self.window
    }

    /// Finite samples held (at most `window`).
    pub fn len(&self) -> usize {
        self.filled
    }

    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Copies the held samples, oldest first, into `out` (`window × inputs` long when full).
    fn copy_oldest_first(&self, out: &mut [f32]) {
        let split = self.next * self.inputs;
        let (newer, older) = self.rows.split_at(split);
        out[..older.len()].copy_from_slice(older);
        out[older.len()..].copy_from_slice(newer);
    }
}

/// Loads the models a plant spec names, one per machine type.
pub struct ModelCache;

impl ModelCache {
    /// Loads the model of every machine type that names one, its `file` taken relative to
    /// `spec_dir` (the plant spec file's directory). A type whose model fails gets an error in
    /// the second list and no entry in the map; the other types load regardless. Blocking
    /// (reads files, optimises graphs): call it before the twins start or off the async
    /// threads.
    pub fn load_for_spec(
        spec: &PlantSpec,
        spec_dir: &Path,
    ) -> (HashMap<String, Arc<OnnxModel>>, Vec<ModelError>) {
        let mut models = HashMap::new();
        let mut errors = Vec::new();
        for (type_name, machine_type) in &spec.machine_types {
            let Some(model) = &machine_type.model else {
                continue;
            };
            let file = spec_dir.join(&model.file);
            match OnnxModel::load(&file, type_name, model.inputs.len(), model.window) {
                Ok(loaded) => {
                    models.insert(type_name.clone(), Arc::new(loaded));
                }
                Err(err) => errors.push(err),
            }
        }
        (models, errors)
    }
}

#[cfg(test)]
mod tests;
