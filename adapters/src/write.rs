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

/// A write on its way to an adapter task, with the channel its answer goes back on.
#[derive(Debug)]
pub struct WriteCommand {
    pub req: WriteRequest,
    pub reply: oneshot::Sender<Result<(), WriteError>>,
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
