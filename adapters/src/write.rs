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
    pub reply: oneshot::Sender<Result<WriteAck, WriteError>>,
    pub span: tracing::Span,
}

/// How far a write that went through is known to have reached the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteAck {
    /// The PLC answered the write itself (a Modbus response, an OPC UA Good status), or
    /// reported the written value back (MQTT and Sparkplug read-back).
    Confirmed,
    /// A broker took it, and the device reported nothing back in time (or the tag has no
    /// read-back): it may or may not have applied the value.
    Unconfirmed,
}

impl WriteAck {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteAck::Confirmed => "confirmed",
            WriteAck::Unconfirmed => "unconfirmed",
        }
    }
}

impl std::fmt::Display for WriteAck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Records the PLC's answer to a write on its span (`confirmed`, `unconfirmed`, or the
/// error).
pub fn record_answer(span: &tracing::Span, answer: &Result<WriteAck, WriteError>) {
    match answer {
        Ok(ack) => {
            span.record("ferrotwin.plc_answer", ack.as_str());
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
