//! ONNX models through tract (pure Rust: no native runtime, nothing fetched at run time).
//!
//! A model is checked against the shape the spec promises before tract is told that shape:
//! tract would otherwise take our fact over the file's declared one and fail somewhere deep in
//! shape inference, or worse run a model built for another window.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;

use super::{MAX_MODEL_BYTES, ModelError, ModelWindow};

/// A loaded, optimised model, shared (`Arc`) by every twin of its machine type: scoring takes
/// `&self` and keeps no state between runs.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    file: PathBuf,
    asset_type: String,
    inputs: usize,
    window: usize,
    plan: Arc<TypedSimplePlan>,
}

/// `[1, window, inputs]` as errors print it.
fn expected_input(window: usize, inputs: usize) -> String {
    format!("[1, {window}, {inputs}]")
}

/// A partially known ONNX shape as `[1, ?, W, ..]`: `?` an unknown dim, `..` unknown rank.
fn inference_shape(fact: &InferenceFact) -> String {
    let mut dims: Vec<String> = fact
        .shape
        .dims()
        .map(|d| match d.concretize() {
            Some(d) => d.to_string(),
            None => "?".to_string(),
        })
        .collect();
    if fact.shape.is_open() {
        dims.push("..".to_string());
    }
    format!("[{}]", dims.join(", "))
}

fn typed_shape(fact: &TypedFact) -> String {
    let dims: Vec<String> = fact.shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

impl OnnxModel {
    /// Loads `file` for machine type `asset_type`, whose twins feed it `window` samples of
    /// `inputs` values as f32 `[1, window, inputs]` (oldest sample first, inputs in the spec's
    /// order). The file's declared input must agree where it is concrete (symbolic dims such
    /// as a free batch or window size are fine); its one output must be one value: shape
    /// `[1, 1]` or `[1]`, any float type.
    pub fn load(
        file: &Path,
        asset_type: &str,
        inputs: usize,
        window: usize,
    ) -> Result<OnnxModel, ModelError> {
        let ctx = Ctx { file, asset_type };
        let bytes = read_bounded(&ctx)?;
        let onnx = tract_onnx::onnx();
        // Decoding alone tells ONNX from other bytes; protobuf is lenient, so a decoded
        // message without a graph is not ONNX either.
        let proto = onnx
            .proto_model_for_read(&mut bytes.as_slice())
            .map_err(|e| ctx.not_onnx(format!("{e:#}")))?;
        match &proto.graph {
            Some(graph) if !graph.node.is_empty() && !graph.output.is_empty() => {}
            _ => return Err(ctx.not_onnx("no graph with nodes and outputs".to_string())),
        }
        let expected = expected_input(window, inputs);
        // The directory lets tract find tensors stored beside the file (external data).
        let dir = file.parent().and_then(Path::to_str);
        let parsed = onnx
            .parse(&proto, dir)
            .map_err(|e| ctx.unsupported(&expected, e))?;
        if !parsed.unresolved_inputs.is_empty() {
            return Err(ctx.not_onnx(format!(
                "graph uses undefined values {:?}",
                parsed.unresolved_inputs
            )));
        }
        let model = parsed.model;
        if model.inputs.len() != 1 || model.outputs.len() != 1 {
            return Err(ModelError::Arity {
                file: file.to_path_buf(),
                asset_type: asset_type.to_string(),
                actual: model.inputs.len(),
                outputs: model.outputs.len(),
            });
        }
        let declared = model
            .input_fact(0)
            .map_err(|e| ctx.unsupported(&expected, e))?
            .clone();
        ctx.check_declared_input(&declared, &expected, [1, window, inputs])?;

        let model = model
            .with_input_fact(0, f32::fact([1, window, inputs]).into())
            .and_then(|m| m.into_typed())
            .map_err(|e| ctx.unsupported(&expected, e))?;
        // Checked on the typed model (before optimisation) so the error shows the shape the
        // file computes, not one of tract's rewrites.
        let output = model
            .output_fact(0)
            .map_err(|e| ctx.unsupported(&expected, e))?;
        let one_value = matches!(output.shape.as_concrete(), Some([1]) | Some([1, 1]));
        if !one_value {
            return Err(ModelError::OutputShape {
                file: file.to_path_buf(),
                asset_type: asset_type.to_string(),
                actual: typed_shape(output),
            });
        }
        if !output.datum_type.is_float() {
            return Err(ModelError::OutputType {
                file: file.to_path_buf(),
                asset_type: asset_type.to_string(),
                actual: format!("{:?}", output.datum_type),
            });
        }
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(|e| ctx.unsupported(&expected, e))?;
        Ok(OnnxModel {
            file: file.to_path_buf(),
            asset_type: asset_type.to_string(),
            inputs,
            window,
            plan,
        })
    }

    pub fn file(&self) -> &Path {
        &self.file
    }

    pub fn asset_type(&self) -> &str {
        &self.asset_type
    }

    pub fn inputs(&self) -> usize {
        self.inputs
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Runs the model on a full window and returns its score (finite). Allocates the input
    /// tensor each call: a twin scores about once a second, tract wants an owned tensor.
    pub fn score(&self, window: &ModelWindow) -> Result<f64, ModelError> {
        if window.inputs() != self.inputs || window.window() != self.window {
            return Err(ModelError::WindowShape {
                file: self.file.clone(),
                asset_type: self.asset_type.clone(),
                window: window.window(),
                inputs: window.inputs(),
                expected: expected_input(self.window, self.inputs),
            });
        }
        if !window.is_full() {
            return Err(ModelError::NotReady {
                file: self.file.clone(),
                asset_type: self.asset_type.clone(),
            });
        }
        let run_error = |e: TractError| ModelError::Run {
            file: self.file.clone(),
            asset_type: self.asset_type.clone(),
            reason: format!("{e:#}"),
        };
        let mut input = Tensor::zero::<f32>(&[1, self.window, self.inputs]).map_err(run_error)?;
        {
            let mut view = input.try_as_plain_ram_mut().map_err(run_error)?;
            window.copy_oldest_first(view.as_slice_mut::<f32>().map_err(run_error)?);
        }
        let outputs = self
            .plan
            .run(tvec!(input.into_tvalue()))
            .map_err(run_error)?;
        let value = outputs
            .first()
            .ok_or_else(|| anyhow::anyhow!("no output"))
            .and_then(|t| t.cast_to_scalar::<f64>())
            .map_err(run_error)?;
        if !value.is_finite() {
            return Err(ModelError::NotFinite {
                file: self.file.clone(),
                asset_type: self.asset_type.clone(),
                value,
            });
        }
        Ok(value)
    }
}

/// What every load error names.
struct Ctx<'a> {
    file: &'a Path,
    asset_type: &'a str,
}

impl Ctx<'_> {
    fn not_onnx(&self, reason: String) -> ModelError {
        ModelError::NotOnnx {
            file: self.file.to_path_buf(),
            asset_type: self.asset_type.to_string(),
            reason,
        }
    }

    fn unsupported(&self, input: &str, e: TractError) -> ModelError {
        ModelError::Unsupported {
            file: self.file.to_path_buf(),
            asset_type: self.asset_type.to_string(),
            input: input.to_string(),
            reason: format!("{e:#}"),
        }
    }

    /// Refuses a declared input whose type or concrete dims disagree with `[1, window,
    /// inputs]`; unknown and symbolic dims pass (tract then takes ours).
    fn check_declared_input(
        &self,
        declared: &InferenceFact,
        expected: &str,
        want: [usize; 3],
    ) -> Result<(), ModelError> {
        if let Some(dt) = declared.datum_type.concretize()
            && dt != f32::datum_type()
        {
            return Err(ModelError::InputType {
                file: self.file.to_path_buf(),
                asset_type: self.asset_type.to_string(),
                actual: format!("{dt:?}"),
            });
        }
        let dims: Vec<_> = declared.shape.dims().collect();
        let rank_ok = if declared.shape.is_open() {
            dims.len() <= want.len()
        } else {
            dims.len() == want.len()
        };
        let dims_ok = dims.iter().zip(want).all(|(d, w)| {
            match d.concretize().map(|d| d.to_i64()) {
                Some(Ok(n)) => n == w as i64,
                // Unknown or symbolic.
                _ => true,
            }
        });
        if rank_ok && dims_ok {
            Ok(())
        } else {
            Err(ModelError::InputShape {
                file: self.file.to_path_buf(),
                asset_type: self.asset_type.to_string(),
                expected: expected.to_string(),
                actual: inference_shape(declared),
            })
        }
    }
}

/// The file's bytes, at most [`MAX_MODEL_BYTES`]; a missing file and an unreadable one are
/// told apart.
fn read_bounded(ctx: &Ctx<'_>) -> Result<Vec<u8>, ModelError> {
    let io_error = |e: std::io::Error| {
        if e.kind() == ErrorKind::NotFound {
            ModelError::Missing {
                file: ctx.file.to_path_buf(),
                asset_type: ctx.asset_type.to_string(),
            }
        } else {
            ModelError::Unreadable {
                file: ctx.file.to_path_buf(),
                asset_type: ctx.asset_type.to_string(),
                reason: e.to_string(),
            }
        }
    };
    let meta = std::fs::metadata(ctx.file).map_err(io_error)?;
    if meta.len() > MAX_MODEL_BYTES {
        return Err(ModelError::TooLarge {
            file: ctx.file.to_path_buf(),
            asset_type: ctx.asset_type.to_string(),
            bytes: meta.len(),
        });
    }
    std::fs::read(ctx.file).map_err(io_error)
}
