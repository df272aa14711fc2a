//! The HTTP answer of an error: a status and a JSON body `{error, nearest_parent?,
//! position?}`. An `ApiError`'s status comes from its one `ErrorCode`
//! (`ErrorCode::http_status`); axum's own rejections of a bad query string or body are
//! answered in the same shape.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::dto::ErrorDto;
use crate::api::ApiError;
use crate::api::error::bounded;

/// An error answer: status and JSON body `{error, nearest_parent?, position?}`.
#[derive(Debug)]
pub struct HttpError {
    pub status: StatusCode,
    pub body: ErrorDto,
}

impl HttpError {
    pub fn bad_request(message: impl Into<String>) -> HttpError {
        HttpError {
            status: StatusCode::BAD_REQUEST,
            body: ErrorDto {
                error: bounded(message.into()),
                nearest_parent: None,
                position: None,
            },
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> HttpError {
        let status = StatusCode::from_u16(e.code().http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let nearest_parent = match &e {
            ApiError::NotFound { nearest, .. } => nearest.clone(),
            _ => None,
        };
        let position = match &e {
            ApiError::BadQuery(q) => Some(q.position),
            _ => None,
        };
        HttpError {
            status,
            body: ErrorDto {
                error: bounded(e.to_string()),
                nearest_parent,
                position,
            },
        }
    }
}

impl From<QueryRejection> for HttpError {
    fn from(e: QueryRejection) -> HttpError {
        HttpError::bad_request(format!("query string: {}", e.body_text()))
    }
}

impl From<JsonRejection> for HttpError {
    fn from(e: JsonRejection) -> HttpError {
        HttpError {
            status: e.status(),
            body: ErrorDto {
                error: bounded(format!("body: {}", e.body_text())),
                nearest_parent: None,
                position: None,
            },
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}
