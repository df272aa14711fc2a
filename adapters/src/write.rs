//! Write-back: a request to set a property on the PLC, and its answer.

use ferrotwin_models::{AssetPath, Value};
use tokio::sync::oneshot;

#[derive(Debug, Clone, PartialEq)]
pub struct WriteRequest {
    pub asset: AssetPath,
    /// A writable tag's property (`speed_setpoint_pct`, ...).
    pub property: String,
    pub value: Value,
    /// Who asked (recorded in the write's event).
    pub by: String,
}

/// A write on its way to an adapter task, with the channel its answer goes back on and the
/// span of its whole way (`adapter.write`): the task's protocol spans are its children, and
/// the PLC's answer is recorded on it (`ferrotwin.plc_answer`).
#[derive(Debug)]
pub struct WriteCommand {
    pub req: WriteRequest,
    pub reply: oneshot::Sender<Result<(), WriteError>>,
    pub span: tracing::Span,
}

/// Records the PLC's answer to a write on its span (`ok`, or the error).
pub fn record_answer(span: &tracing::Span, answer: &Result<(), WriteError>) {
    match answer {
        Ok(()) => {
            span.record("ferrotwin.plc_answer", "ok");
        }
        Err(e) => {
            span.record("ferrotwin.plc_answer", tracing::field::display(e));
            span.record("otel.status_code", "error");
            span.record("error.type", write_error_type(e));
        }
    }
}

/// The class of a write error, for `error.type` (low cardinality).
pub fn write_error_type(e: &WriteError) -> &'static str {
    match e {
        WriteError::NotWritable { .. } => "not_writable",
        WriteError::BadValue { .. } => "bad_value",
        WriteError::NotConnected { .. } => "not_connected",
        WriteError::Busy { .. } => "busy",
        WriteError::Stopped { .. } => "stopped",
        WriteError::Refused { .. } => "refused",
        WriteError::Timeout { .. } => "timeout",
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WriteError {
    #[error("{asset} {property}: no connection writes this property")]
    NotWritable { asset: AssetPath, property: String },
    #[error("{asset} {property}: {value} does not fit the tag ({why})")]
    BadValue {
        asset: AssetPath,
        property: String,
        value: String,
        why: String,
    },
    #[error("connection {connection:?} is not connected")]
    NotConnected { connection: String },
    #[error("connection {connection:?}: too many writes waiting")]
    Busy { connection: String },
    #[error("connection {connection:?} stopped")]
    Stopped { connection: String },
    #[error("connection {connection:?}: the PLC refused the write: {error}")]
    Refused { connection: String, error: String },
    #[error("connection {connection:?}: no answer from the PLC within {timeout_ms} ms")]
    Timeout { connection: String, timeout_ms: u64 },
}
