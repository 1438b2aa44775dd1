//! The proxy's errors, and their one mapping to registry-style HTTP answers.

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bay_common::api::{ErrorBody, ErrorCode};
use bay_common::upstream::{Refusal, UpstreamError};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("registry {0:?} is not an allowed upstream of this proxy")]
    NotAllowed(String),
    #[error("host {0:?} has no p2p- prefix and the proxy has no --default-upstream")]
    NoUpstream(String),
    #[error("{0}")]
    BadDigest(#[from] bay_common::DigestError),
    #[error("{0}")]
    BadName(#[from] bay_common::NameError),
    #[error("range {0:?} is not satisfiable")]
    BadRange(String, u64),
    #[error("upstream refused: {}", .0.status)]
    Refused(Box<Refusal>),
    #[error("{0}")]
    Upstream(UpstreamError),
    /// A tracker could not get the blob from upstream; its status (502, 504) is passed on.
    #[error("{why}")]
    UpstreamViaTracker { status: StatusCode, why: String },
    #[error("blob {digest} failed verification")]
    DigestMismatch { digest: String },
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("piece {piece} of blob {digest} is not held here for passing on")]
    PieceNotHeld { digest: String, piece: String },
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Refused(r) => ProxyError::Refused(r),
            other => ProxyError::Upstream(other),
        }
    }
}

impl ProxyError {
    fn code(&self) -> ErrorCode {
        match self {
            ProxyError::NotAllowed(_) | ProxyError::NoUpstream(_) => ErrorCode::Denied,
            ProxyError::BadDigest(_) => ErrorCode::DigestInvalid,
            ProxyError::BadName(_) => ErrorCode::NameInvalid,
            ProxyError::BadRange(..) => ErrorCode::RangeInvalid,
            ProxyError::PieceNotHeld { .. } => ErrorCode::BlobUnknown,
            ProxyError::Refused(_)
            | ProxyError::Upstream(_)
            | ProxyError::UpstreamViaTracker { .. }
            | ProxyError::DigestMismatch { .. }
            | ProxyError::Io(_) => ErrorCode::Unavailable,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            ProxyError::Upstream(_) | ProxyError::DigestMismatch { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamViaTracker { status, .. } => *status,
            ProxyError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
            other => StatusCode::from_u16(other.code().status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        if let ProxyError::Refused(r) = self {
            // Upstream's own answer, challenge included, so the caller can authenticate.
            let (status, headers, body) = r.to_parts();
            return (status, headers, body).into_response();
        }
        let detail = match &self {
            ProxyError::NotAllowed(r) => json!({ "registry": r }),
            ProxyError::NoUpstream(h) => json!({ "host": h }),
            _ => Value::Null,
        };
        let mut resp = json_response(
            self.status(),
            ErrorBody::new(self.code(), self.to_string(), detail),
        );
        if let ProxyError::BadRange(_, size) = self {
            resp.headers_mut().insert(
                "content-range",
                HeaderValue::from_str(&format!("bytes */{size}")).expect("ascii"),
            );
        }
        resp
    }
}

pub fn json_response(status: StatusCode, body: ErrorBody) -> Response {
    let mut resp = (status, body.to_json()).into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// `e` and its sources, `: `-separated: reqwest's own message alone says only "error sending
/// request", not whether the connect timed out or the connection was reset.
pub fn chain(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
