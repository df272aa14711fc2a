//! Everything the API can refuse, and the one code each refusal maps to. gRPC
//! (`grpc::status_of`) and HTTP (`http::error::HttpError`) each turn an `ErrorCode` into
//! their status once; the HTTP answer only adds details (the nearest existing parent, the
//! position in a query) from the error's fields.

use ferrotwin_adapters::WriteError;
use ferrotwin_models::PathError;
use ferrotwin_models::query::QueryError;

use crate::core::TwinError;
use crate::store::StoreError;

/// The class of an API error, named after gRPC's codes (the stricter vocabulary). Each edge
/// maps it once: `grpc::status_of`, `ErrorCode::http_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The request is malformed or names nonsense: fix the request.
    InvalidArgument,
    NotFound,
    /// The request is well formed but the target's state refuses it (alarm not active,
    /// property not writable, the PLC said no).
    FailedPrecondition,
    /// The answer would be too large: narrow the request (a history range).
    TooLarge,
    /// A limit of the runtime is reached right now (a connection's write queue): retry later.
    Busy,
    /// Retry later: a twin restarting, a connection down.
    Unavailable,
    DeadlineExceeded,
    /// Our fault: a store error.
    Internal,
    /// No valid credentials.
    Unauthenticated,
    /// The caller's grants do not cover this.
    PermissionDenied,
}

impl ErrorCode {
    /// The HTTP status of the JSON API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidArgument => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::FailedPrecondition => 409,
            // The caller can narrow the range: a request error, not ours.
            ErrorCode::TooLarge => 400,
            ErrorCode::Busy => 429,
            ErrorCode::Unavailable => 503,
            ErrorCode::DeadlineExceeded => 504,
            ErrorCode::Internal => 500,
            ErrorCode::Unauthenticated => 401,
            ErrorCode::PermissionDenied => 403,
        }
    }
}

/// Everything the API can refuse. `code` classes it; the edges map the class.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{field}: {source}")]
    BadPath {
        field: &'static str,
        source: PathError,
    },
    #[error("{0}")]
    BadArgument(String),
    #[error("no asset at {path}{}", nearest.as_ref().map(|n| format!(" (nearest existing parent: {n})")).unwrap_or_default())]
    NotFound {
        path: String,
        nearest: Option<String>,
    },
    #[error(transparent)]
    BadQuery(#[from] QueryError),
    #[error(transparent)]
    Twin(#[from] TwinError),
    #[error("{0}")]
    Unavailable(String),
    /// The call cannot be done in the state things are in (a rule enabled with no writer).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A limit of the runtime is reached (open watch streams).
    #[error("{0}")]
    Limit(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Write(#[from] WriteError),
    /// The credentials are missing or do not verify (the message never holds a secret).
    #[error("{0}")]
    Unauthenticated(String),
    /// A live apply refused, stale or failed.
    #[error(transparent)]
    Apply(#[from] crate::apply::ApplyError),
    #[error("{subject} may not do this on {target}: it needs the {role} role there")]
    Denied {
        subject: String,
        role: crate::security::Role,
        target: String,
    },
}

/// Longest error message a client gets: each message quotes at most a short prefix of its
/// input, and this bounds what a message could still add up to (a 16 KB query string).
pub const MAX_ERROR_BYTES: usize = 1024;

/// `message`, cut to `MAX_ERROR_BYTES` (at a char boundary) with its full length named.
pub fn bounded(message: String) -> String {
    if message.len() <= MAX_ERROR_BYTES {
        return message;
    }
    let end = crate::core::char_floor(&message, MAX_ERROR_BYTES);
    format!(
        "{}… (message of {} bytes cut)",
        &message[..end],
        message.len()
    )
}

impl ApiError {
    /// The one place an error is classed.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::BadPath { .. } | ApiError::BadArgument(_) | ApiError::BadQuery(_) => {
                ErrorCode::InvalidArgument
            }
            ApiError::NotFound { .. }
            | ApiError::Twin(TwinError::UnknownAlarm { .. } | TwinError::UnknownRule { .. }) => {
                ErrorCode::NotFound
            }
            ApiError::Twin(TwinError::Ack { .. }) => ErrorCode::FailedPrecondition,
            ApiError::Twin(TwinError::NoAlarms { .. }) => ErrorCode::InvalidArgument,
            ApiError::Unavailable(_) => ErrorCode::Unavailable,
            ApiError::FailedPrecondition(_) => ErrorCode::FailedPrecondition,
            ApiError::Limit(_) => ErrorCode::Busy,
            ApiError::Apply(a) => match a {
                crate::apply::ApplyError::Invalid(_) => ErrorCode::InvalidArgument,
                crate::apply::ApplyError::Stale { .. } => ErrorCode::FailedPrecondition,
                crate::apply::ApplyError::Failed(_) => ErrorCode::Internal,
            },
            ApiError::Unauthenticated(_) => ErrorCode::Unauthenticated,
            ApiError::Denied { .. } => ErrorCode::PermissionDenied,
            ApiError::Store(StoreError::TooMuchHistory { .. }) => ErrorCode::TooLarge,
            ApiError::Store(_) => ErrorCode::Internal,
            ApiError::Write(w) => match w {
                WriteError::NotWritable { .. } | WriteError::Refused { .. } => {
                    ErrorCode::FailedPrecondition
                }
                WriteError::BadValue { .. } => ErrorCode::InvalidArgument,
                WriteError::NotConnected { .. } | WriteError::Stopped { .. } => {
                    ErrorCode::Unavailable
                }
                WriteError::Busy { .. } => ErrorCode::Busy,
                WriteError::Timeout { .. } => ErrorCode::DeadlineExceeded,
            },
        }
    }
}
