//! The tracker's errors, and their one mapping to registry-style HTTP answers.

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bay_common::api::{ErrorBody, ErrorCode};
use bay_common::upstream::{Refusal, UpstreamError};
use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("registry {0:?} is not an allowed upstream of this tracker")]
    NotAllowed(String),
    #[error("{0}")]
    BadDigest(#[from] bay_common::DigestError),
    #[error("{0}")]
    BadName(#[from] bay_common::NameError),
    #[error("malformed torrent path {0:?}: expected /v1/torrents/<registry>/<name>/blobs/<digest>")]
    BadPath(String),
    #[error("upstream refused: {}", .0.status)]
    Refused(Box<Refusal>),
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("blob {digest} failed verification: upstream sent {got}")]
    DigestMismatch { digest: String, got: String },
    #[error("blob {digest} is {got} bytes, upstream announced {expected}")]
    SizeMismatch {
        digest: String,
        expected: u64,
        got: u64,
    },
    #[error("blob {0} is empty; empty blobs are not distributed")]
    Empty(String),
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    #[error("seeding failed: {0}")]
    Seed(String),
    #[error("{0}")]
    BadReference(String),
    #[error("{0}")]
    Manifest(#[from] bay_common::manifest::ManifestError),
    #[error("upstream did not answer {0} in time")]
    Timeout(String),
    #[error("no preheat {0:?}: unknown, or forgotten since it finished")]
    UnknownPreheat(String),
    #[error("{0} preheats are running; try again when one has finished")]
    TooManyPreheats(usize),
    #[error("info hash {0:?} is not 40 hex characters")]
    BadInfoHash(String),
    #[error("this tracker holds no blob with info hash {0}")]
    UnknownTorrent(String),
    #[error("range {0:?} does not fit a blob of {1} bytes")]
    BadRange(String, u64),
    /// Asked with `Cache-Control: only-if-cached` for a blob this tracker neither holds nor is
    /// fetching; 504 as RFC 9111 answers that request when nothing is stored.
    #[error("this tracker does not hold {0} and was asked not to fetch it (only-if-cached)")]
    NotHeld(String),
    /// An early read (`/v1/early/…`) of a blob this tracker is not fetching now: it holds it
    /// already (ask for the torrent), or never started, or the fetch ended.
    #[error("this tracker is not fetching {0} now")]
    NotFetching(String),
    #[error("the fetch of {0} failed; its bytes were not all there")]
    FetchFailed(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Busy(String),
    /// An early read of pieces other proxies got early already.
    #[error("every piece asked for of {0} went to another proxy already")]
    AlreadySent(String),
    /// An early read by a proxy that holds more than its share of the pieces sent so far.
    #[error("this proxy holds its share of {0}'s pieces sent so far: ask again shortly")]
    OverShare(String),
}

impl From<UpstreamError> for TrackerError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Refused(r) => TrackerError::Refused(r),
            other => TrackerError::Upstream(other),
        }
    }
}

impl TrackerError {
    fn code(&self) -> ErrorCode {
        match self {
            TrackerError::NotAllowed(_) => ErrorCode::Denied,
            TrackerError::BadDigest(_) => ErrorCode::DigestInvalid,
            TrackerError::BadName(_) | TrackerError::BadPath(_) => ErrorCode::NameInvalid,
            TrackerError::BadReference(_) | TrackerError::BadInfoHash(_) => ErrorCode::NameInvalid,
            TrackerError::UnknownTorrent(_)
            | TrackerError::NotHeld(_)
            | TrackerError::NotFetching(_) => ErrorCode::BlobUnknown,
            TrackerError::BadRequest(_) => ErrorCode::NameInvalid,
            TrackerError::BadRange(..) | TrackerError::AlreadySent(_) => ErrorCode::RangeInvalid,
            TrackerError::UnknownPreheat(_) => ErrorCode::NameUnknown,
            TrackerError::TooManyPreheats(_) | TrackerError::OverShare(_) => {
                ErrorCode::Toomanyrequests
            }
            TrackerError::Manifest(_) | TrackerError::Timeout(_) => ErrorCode::Unavailable,
            TrackerError::Empty(_) => ErrorCode::SizeInvalid,
            TrackerError::Refused(_)
            | TrackerError::Upstream(_)
            | TrackerError::DigestMismatch { .. }
            | TrackerError::SizeMismatch { .. }
            | TrackerError::Io(_)
            | TrackerError::FetchFailed(_)
            | TrackerError::Busy(_)
            | TrackerError::Seed(_) => ErrorCode::Unavailable,
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            // Upstream trouble is a bad gateway, not our unavailability.
            TrackerError::Upstream(_)
            | TrackerError::DigestMismatch { .. }
            | TrackerError::SizeMismatch { .. }
            | TrackerError::FetchFailed(_) => StatusCode::BAD_GATEWAY,
            TrackerError::Manifest(_) => StatusCode::BAD_GATEWAY,
            TrackerError::Timeout(_) | TrackerError::NotHeld(_) => StatusCode::GATEWAY_TIMEOUT,
            TrackerError::Io(_) | TrackerError::Seed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            other => StatusCode::from_u16(other.code().status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        }
    }
}

impl IntoResponse for TrackerError {
    fn into_response(self) -> Response {
        self.render()
    }
}

impl TrackerError {
    /// The HTTP answer; by reference because one error may answer every waiter of a flight.
    pub fn render(&self) -> Response {
        if let TrackerError::Refused(r) = self {
            // Upstream's own answer, challenge included, so the caller can authenticate.
            let (status, headers, body) = r.to_parts();
            return (status, headers, body).into_response();
        }
        let detail = match self {
            TrackerError::NotAllowed(r) => json!({ "registry": r }),
            _ => Value::Null,
        };
        let body = ErrorBody::new(self.code(), self.to_string(), detail);
        let mut resp = (self.status(), body.to_json()).into_response();
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        resp
    }
}

/// A registry-style JSON error answer.
pub fn json_error(status: StatusCode, code: ErrorCode, message: String) -> Response {
    let mut resp = (status, ErrorBody::new(code, message, Value::Null).to_json()).into_response();
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}
