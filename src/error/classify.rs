//! The classification of KVS service errors: AWS error codes (sanitized like the AWS SDKs do),
//! HTTP statuses and the messages that refine them ("No fragments found", an expired session
//! token), and the error responses of the HLS endpoints.

use super::{Error, ErrorKind};

impl Error {
    /// Classifies a KVS service error from its code, HTTP status and message.
    ///
    /// `code` may be bare (`ResourceNotFoundException`), namespaced
    /// (`com.amazonaws.kinesisvideo#ResourceNotFoundException`) or carry a URL suffix
    /// (`ResourceNotFoundException:http://internal.amazon.com/…`), as in the
    /// `x-amzn-ErrorType` header; both are stripped like the AWS SDKs do. An empty or unknown
    /// code is classified by `http_status`.
    ///
    /// | code | kind |
    /// |---|---|
    /// | `ResourceNotFoundException` with "No fragments found" | [`NoFragments`](ErrorKind::NoFragments) |
    /// | `ResourceNotFoundException` otherwise | [`StreamNotFound`](ErrorKind::StreamNotFound) |
    /// | `NotAuthorizedException` saying the session token expired | [`SessionExpired`](ErrorKind::SessionExpired) |
    /// | `NotAuthorizedException`, `AccessDeniedException`, `AccessDenied`, `UnrecognizedClientException`, `InvalidSignatureException`, `SignatureDoesNotMatch`, `ExpiredTokenException`, `ExpiredToken`, `InvalidClientTokenId`, `MissingAuthenticationToken(Exception)`, `IncompleteSignature(Exception)`, `AuthFailure`, `RequestExpired` | [`NotAuthorized`](ErrorKind::NotAuthorized) |
    /// | `ClientLimitExceededException`, `ConnectionLimitExceededException`, `ThrottlingException`, `Throttling`, `ThrottledException`, `TooManyRequestsException`, `RequestLimitExceeded`, `SlowDown` | [`Throttled`](ErrorKind::Throttled) |
    /// | `InvalidArgumentException`, `InvalidDeviceException`, `InvalidResourceFormatException`, `VersionMismatchException`, `StreamEdgeConfigurationNotFoundException`, `ValidationException`, `SerializationException`, `InvalidParameterException`, `InvalidParameterValue`, `MissingParameter` | [`InvalidArgument`](ErrorKind::InvalidArgument) |
    /// | `UnsupportedStreamMediaTypeException`, `NoDataRetentionException`, `MissingCodecPrivateDataException`, `InvalidCodecPrivateDataException`, `InvalidMediaFrameException` | [`UnsupportedMedia`](ErrorKind::UnsupportedMedia) |
    /// | `UnknownOperationException`, `UnknownOperation` | [`UnsupportedOperation`](ErrorKind::UnsupportedOperation) |
    /// | `ResourceInUseException` | [`AlreadyExists`](ErrorKind::AlreadyExists) |
    /// | `AccountStreamLimitExceededException`, `AccountChannelLimitExceededException`, `DeviceStreamLimitExceededException`, `TagsPerResourceExceededLimitException`, `LimitExceededException` | [`LimitExceeded`](ErrorKind::LimitExceeded) |
    /// | `InternalFailure`, `InternalFailureException`, `InternalServerError`, `InternalServerException`, `InternalError`, `ServiceUnavailable`, `ServiceUnavailableException`, `ServiceUnavailableError` | [`ServiceUnavailable`](ErrorKind::ServiceUnavailable) |
    /// | `RequestTimeout`, `RequestTimeoutException` | [`Timeout`](ErrorKind::Timeout) |
    ///
    /// | unknown code, HTTP status | kind |
    /// |---|---|
    /// | 5xx | [`ServiceUnavailable`](ErrorKind::ServiceUnavailable) |
    /// | 429 | [`Throttled`](ErrorKind::Throttled) |
    /// | 401, 403 | [`NotAuthorized`](ErrorKind::NotAuthorized) ([`SessionExpired`](ErrorKind::SessionExpired) if the message says the session token expired) |
    /// | 404 | [`StreamNotFound`](ErrorKind::StreamNotFound) ([`NoFragments`](ErrorKind::NoFragments) if the message says "No fragments found") |
    /// | 408 | [`Timeout`](ErrorKind::Timeout) |
    /// | other 4xx | [`InvalidArgument`](ErrorKind::InvalidArgument) |
    /// | anything else, or none | [`Protocol`](ErrorKind::Protocol) |
    ///
    /// Codes are compared ASCII case-insensitively.
    #[must_use]
    pub fn from_kvs(code: &str, http_status: Option<u16>, message: &str) -> Self {
        let code = sanitize_error_code(code);
        let kind = classify(code, http_status, message);
        let message = message.trim();
        let message = if !message.is_empty() {
            message.to_owned()
        } else if !code.is_empty() {
            code.to_owned()
        } else if let Some(status) = http_status {
            format!("HTTP {status}")
        } else {
            "unknown service error".to_owned()
        };
        let mut err = Self::build(kind, message);
        let inner = err.inner_mut();
        inner.aws_error_code = (!code.is_empty()).then(|| code.to_owned());
        inner.http_status = http_status;
        err
    }

    /// Classifies the failed response to an HLS playlist or fragment GET (a URL carrying a
    /// `SessionToken`).
    ///
    /// The code comes from the `x-amzn-ErrorType` header (or `__type`/`code` in the body), the
    /// message from the JSON body (`{"message": …}` or `{"Message": …}`; a body that is not
    /// JSON is used as text, shortened), then [`from_kvs`](Error::from_kvs) classifies them.
    /// A 401/403 that classifies as [`NotAuthorized`](ErrorKind::NotAuthorized) becomes
    /// [`SessionExpired`](ErrorKind::SessionExpired): on an HLS URL the session token is the
    /// only credential, so the reader should get a new session (and if that request is denied,
    /// it reports `NotAuthorized`).
    #[must_use]
    pub fn from_hls_response(status: u16, error_type_header: Option<&str>, body: &[u8]) -> Self {
        let (body_code, body_message) = parse_error_body(body);
        let code = error_type_header
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .or(body_code.as_deref())
            .unwrap_or("");
        let message = match body_message {
            Some(message) if !message.trim().is_empty() => message,
            _ => format!("HTTP {status} from the HLS endpoint"),
        };
        let mut err = Self::from_kvs(code, Some(status), &message);
        if matches!(status, 401 | 403) && err.kind() == ErrorKind::NotAuthorized {
            err.inner_mut().kind = ErrorKind::SessionExpired;
        }
        err
    }
}

/// Strips a namespace prefix (`aws.protocoltests#Code`) and a URL suffix
/// (`Code:http://internal.amazon.com/…`) from an AWS error code, like the AWS SDKs do.
pub(super) fn sanitize_error_code(code: &str) -> &str {
    let code = code.trim();
    let code = code.split_once(':').map_or(code, |(code, _)| code);
    let code = code.rsplit_once('#').map_or(code, |(_, code)| code);
    code.trim()
}

fn classify(code: &str, http_status: Option<u16>, message: &str) -> ErrorKind {
    let kind = classify_code(code).unwrap_or_else(|| classify_status(http_status));
    match kind {
        ErrorKind::StreamNotFound if mentions_no_fragments(message) => ErrorKind::NoFragments,
        ErrorKind::NotAuthorized if mentions_expired_session(message) => ErrorKind::SessionExpired,
        kind => kind,
    }
}

/// The kind of a known AWS error code (already sanitized), `None` when unknown.
fn classify_code(code: &str) -> Option<ErrorKind> {
    const TABLE: &[(&str, ErrorKind)] = &[
        // Both KVS APIs.
        ("ResourceNotFoundException", ErrorKind::StreamNotFound),
        ("NotAuthorizedException", ErrorKind::NotAuthorized),
        ("ClientLimitExceededException", ErrorKind::Throttled),
        // GetMedia: a fourth connection to the stream (transient: one of the three may close).
        ("ConnectionLimitExceededException", ErrorKind::Throttled),
        ("InvalidArgumentException", ErrorKind::InvalidArgument),
        ("NoDataRetentionException", ErrorKind::UnsupportedMedia),
        // Archived media.
        (
            "UnsupportedStreamMediaTypeException",
            ErrorKind::UnsupportedMedia,
        ),
        (
            "MissingCodecPrivateDataException",
            ErrorKind::UnsupportedMedia,
        ),
        (
            "InvalidCodecPrivateDataException",
            ErrorKind::UnsupportedMedia,
        ),
        ("InvalidMediaFrameException", ErrorKind::UnsupportedMedia),
        // An endpoint that does not implement the operation (HTTP 404, which alone would say
        // StreamNotFound).
        ("UnknownOperationException", ErrorKind::UnsupportedOperation),
        ("UnknownOperation", ErrorKind::UnsupportedOperation),
        // Control plane.
        ("AccessDeniedException", ErrorKind::NotAuthorized),
        ("ResourceInUseException", ErrorKind::AlreadyExists),
        (
            "AccountStreamLimitExceededException",
            ErrorKind::LimitExceeded,
        ),
        (
            "AccountChannelLimitExceededException",
            ErrorKind::LimitExceeded,
        ),
        (
            "DeviceStreamLimitExceededException",
            ErrorKind::LimitExceeded,
        ),
        (
            "TagsPerResourceExceededLimitException",
            ErrorKind::LimitExceeded,
        ),
        ("InvalidDeviceException", ErrorKind::InvalidArgument),
        ("InvalidResourceFormatException", ErrorKind::InvalidArgument),
        ("VersionMismatchException", ErrorKind::InvalidArgument),
        (
            "StreamEdgeConfigurationNotFoundException",
            ErrorKind::InvalidArgument,
        ),
        // GetMedia.
        ("ConnectionLimitExceededException", ErrorKind::Throttled),
        // Common AWS errors (any service, SigV4, gateways).
        ("LimitExceededException", ErrorKind::LimitExceeded),
        ("AccessDenied", ErrorKind::NotAuthorized),
        ("UnrecognizedClientException", ErrorKind::NotAuthorized),
        ("InvalidSignatureException", ErrorKind::NotAuthorized),
        ("SignatureDoesNotMatch", ErrorKind::NotAuthorized),
        ("ExpiredTokenException", ErrorKind::NotAuthorized),
        ("ExpiredToken", ErrorKind::NotAuthorized),
        ("InvalidClientTokenId", ErrorKind::NotAuthorized),
        ("MissingAuthenticationToken", ErrorKind::NotAuthorized),
        (
            "MissingAuthenticationTokenException",
            ErrorKind::NotAuthorized,
        ),
        ("IncompleteSignature", ErrorKind::NotAuthorized),
        ("IncompleteSignatureException", ErrorKind::NotAuthorized),
        ("AuthFailure", ErrorKind::NotAuthorized),
        ("RequestExpired", ErrorKind::NotAuthorized),
        ("ThrottlingException", ErrorKind::Throttled),
        ("Throttling", ErrorKind::Throttled),
        ("ThrottledException", ErrorKind::Throttled),
        ("TooManyRequestsException", ErrorKind::Throttled),
        ("RequestLimitExceeded", ErrorKind::Throttled),
        ("SlowDown", ErrorKind::Throttled),
        ("ValidationException", ErrorKind::InvalidArgument),
        ("SerializationException", ErrorKind::InvalidArgument),
        ("InvalidParameterException", ErrorKind::InvalidArgument),
        ("InvalidParameterValue", ErrorKind::InvalidArgument),
        ("MissingParameter", ErrorKind::InvalidArgument),
        ("InternalFailure", ErrorKind::ServiceUnavailable),
        ("InternalFailureException", ErrorKind::ServiceUnavailable),
        ("InternalServerError", ErrorKind::ServiceUnavailable),
        ("InternalServerException", ErrorKind::ServiceUnavailable),
        ("InternalError", ErrorKind::ServiceUnavailable),
        ("ServiceUnavailable", ErrorKind::ServiceUnavailable),
        ("ServiceUnavailableException", ErrorKind::ServiceUnavailable),
        ("ServiceUnavailableError", ErrorKind::ServiceUnavailable),
        ("RequestTimeout", ErrorKind::Timeout),
        ("RequestTimeoutException", ErrorKind::Timeout),
    ];
    TABLE
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(code))
        .map(|&(_, kind)| kind)
}

fn classify_status(http_status: Option<u16>) -> ErrorKind {
    match http_status {
        Some(500..=599) => ErrorKind::ServiceUnavailable,
        Some(429) => ErrorKind::Throttled,
        Some(401 | 403) => ErrorKind::NotAuthorized,
        Some(404) => ErrorKind::StreamNotFound,
        Some(408) => ErrorKind::Timeout,
        Some(400..=499) => ErrorKind::InvalidArgument,
        _ => ErrorKind::Protocol,
    }
}

fn mentions_no_fragments(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("no fragments") || message.contains("no fragment found")
}

fn mentions_expired_session(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    let about_session = [
        "session token",
        "sessiontoken",
        "session_token",
        "streaming session",
    ]
    .iter()
    .any(|s| message.contains(s));
    about_session && (message.contains("expire") || message.contains("revoked"))
}

/// The longest error body text kept in a message.
pub(super) const MAX_BODY_TEXT: usize = 300;

/// The code (`__type`, `code`, `Code`) and message (`message`, `Message`) of an AWS error
/// body; a body that is not a JSON object is returned as (shortened) text.
fn parse_error_body(body: &[u8]) -> (Option<String>, Option<String>) {
    if let Ok(serde_json::Value::Object(map)) = serde_json::from_slice::<serde_json::Value>(body) {
        let field = |names: &[&str]| {
            names
                .iter()
                .find_map(|name| map.get(*name).and_then(|v| v.as_str()))
                .map(str::to_owned)
        };
        return (
            field(&["__type", "code", "Code"]),
            field(&["message", "Message", "errorMessage"]),
        );
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if text.is_empty() {
        return (None, None);
    }
    let short = match text.char_indices().nth(MAX_BODY_TEXT) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    };
    (None, Some(short))
}
