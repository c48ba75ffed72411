//! HTTP helpers shared by the control plane, the archived-media API and HLS: KVS-shaped error
//! responses, SigV4 header checks and JSON timestamps.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::store::random_string;

/// An error response the way KVS sends it: status, `x-amzn-ErrorType` header and a JSON body
/// with the message.
#[derive(Debug, Clone)]
pub(crate) struct KvsError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl KvsError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        KvsError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidArgumentException", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "ResourceNotFoundException", message)
    }
    pub fn stream_not_found(name: &str) -> Self {
        Self::not_found(format!("The requested stream {name} was not found"))
    }
    pub fn no_fragments() -> Self {
        Self::not_found("No fragments found in the stream for the streaming request.")
    }
    pub fn throttled() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "ClientLimitExceededException",
            "The request was throttled because it exceeded the allowed client limits.",
        )
    }
    pub fn session_expired() -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            "NotAuthorizedException",
            "Streaming session token is expired",
        )
    }
    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            "We encountered an internal error. Please try again.",
        )
    }
}

impl IntoResponse for KvsError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "Message": self.message }).to_string();
        let mut response = (self.status, body).into_response();
        let headers = response.headers_mut();
        headers.insert("x-amzn-ErrorType", HeaderValue::from_static(self.code));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        insert_request_id(headers);
        response
    }
}

/// Adds an `x-amzn-RequestId` header, as every KVS response carries one.
pub(crate) fn insert_request_id(headers: &mut HeaderMap) {
    let id = random_string(36, b"0123456789abcdef");
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert("x-amzn-RequestId", value);
    }
}

/// Checks that a request carries a well-formed SigV4 `Authorization` header for the
/// `kinesisvideo` service (and a date), the way AWS rejects unsigned requests.
pub(crate) fn check_sigv4(headers: &HeaderMap) -> Result<(), KvsError> {
    let Some(auth) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return Err(KvsError::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        ));
    };
    let incomplete = |what: &str| {
        KvsError::new(
            StatusCode::FORBIDDEN,
            "IncompleteSignatureException",
            format!("Authorization header requires {what}."),
        )
    };
    let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256 ") else {
        return Err(incomplete("the AWS4-HMAC-SHA256 algorithm"));
    };
    let field = |name: &str| {
        rest.split(',')
            .map(str::trim)
            .find_map(|part| part.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
    };
    let Some(credential) = field("Credential") else {
        return Err(incomplete("'Credential' parameter"));
    };
    if field("SignedHeaders").is_none() {
        return Err(incomplete("'SignedHeaders' parameter"));
    }
    if field("Signature").is_none_or(str::is_empty) {
        return Err(incomplete("'Signature' parameter"));
    }
    // Credential = AKID/yyyymmdd/region/service/aws4_request
    let scope: Vec<&str> = credential.split('/').collect();
    if scope.len() != 5 || scope[4] != "aws4_request" {
        return Err(incomplete(
            "a Credential of the form AKID/date/region/service/aws4_request",
        ));
    }
    if scope[3] != "kinesisvideo" {
        return Err(KvsError::new(
            StatusCode::FORBIDDEN,
            "InvalidSignatureException",
            format!(
                "Credential should be scoped to correct service: 'kinesisvideo', not '{}'",
                scope[3]
            ),
        ));
    }
    if !headers.contains_key("x-amz-date") && !headers.contains_key(header::DATE) {
        return Err(KvsError::new(
            StatusCode::FORBIDDEN,
            "IncompleteSignatureException",
            "Authorization header requires existence of either a 'X-Amz-Date' or a 'Date' header.",
        ));
    }
    Ok(())
}

/// Parses a JSON request body into `T`, mapping failures to the error AWS would give.
pub(crate) fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, KvsError> {
    let body = if body.is_empty() {
        b"{}".as_slice()
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| {
        KvsError::new(
            StatusCode::BAD_REQUEST,
            "SerializationException",
            format!("Could not parse the request body: {e}"),
        )
    })
}

/// A JSON response with the request id header.
pub(crate) fn json_response(value: serde_json::Value) -> Response {
    let mut response = (StatusCode::OK, value.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    insert_request_id(headers);
    response
}

/// Seconds since the epoch (as a JSON number: restJson1's default timestamp format).
pub(crate) fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| (d.as_millis() as f64) / 1000.0)
        .unwrap_or(0.0)
}

/// The inverse of [`epoch_seconds`], rounded to the millisecond (KVS timestamps have millisecond
/// precision, and a float of epoch seconds cannot hold more); None for negative or absurd values.
pub(crate) fn from_epoch_seconds(seconds: f64) -> Option<SystemTime> {
    if !seconds.is_finite() || !(0.0..1.0e11).contains(&seconds) {
        return None;
    }
    let millis = (seconds * 1000.0).round() as u64;
    Some(UNIX_EPOCH + Duration::from_millis(millis))
}

/// Truncates a time to the millisecond, the precision KVS compares timestamps with.
pub(crate) fn to_millis(t: SystemTime) -> SystemTime {
    let millis = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX))
}

/// RFC 3339 with milliseconds and `Z`, as in `#EXT-X-PROGRAM-DATE-TIME`.
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}
