//! The error type of this crate and its classification of Kinesis Video Streams failures.
//!
//! Every fallible function of the crate returns [`Result<T>`], whose error is the opaque
//! [`Error`]. Callers and the crate's own reconnect loops decide what to do from
//! [`Error::kind`] and [`Error::is_transient`], so the same classification drives retries
//! everywhere. KVS service errors are classified by [`Error::from_kvs`], whose table follows
//! the AWS service models of `kinesisvideo` and `kinesis-video-archived-media`.
//!
//! Messages and contexts never hold secrets: each is passed through
//! [`crate::redact::redact_text`] when the error is built, so HLS session tokens,
//! signatures, AWS keys and URL passwords are replaced before anything can print them.
//!
//! The code: this file holds [`Error`] and [`ErrorKind`]; `classify` maps KVS error codes, HTTP
//! statuses and HLS error responses to kinds ([`Error::from_kvs`], [`Error::from_hls_response`]);
//! `convert` turns the errors of the AWS SDK, reqwest, `std::io` and GStreamer into an [`Error`].

mod classify;
mod convert;

use std::fmt;
use std::sync::Arc;

use crate::redact::redact_text;

/// A `Result` whose error defaults to this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, coarsely: the basis for deciding whether to retry.
///
/// New kinds may be added in minor releases, so a `match` needs a wildcard arm; use
/// [`ErrorKind::is_transient`] for the retry decision rather than listing kinds.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller's options are invalid (for example `Expires` outside 300–43200 s).
    /// Fatal: fix the configuration; retrying cannot succeed.
    InvalidConfig,
    /// KVS rejected a request parameter (`InvalidArgumentException`, other HTTP 4xx).
    /// Fatal: the same request will be rejected again.
    InvalidArgument,
    /// The stream does not exist or was deleted (`ResourceNotFoundException` about the stream,
    /// HTTP 404). Fatal: the reader stops; create the stream or fix its name/ARN.
    StreamNotFound,
    /// The stream exists but has no fragments to play: in LIVE mode nothing was ingested in the
    /// last 30 s (the camera or producer is offline), or the requested range is empty
    /// (`ResourceNotFoundException` "No fragments found…"). Transient: retry with backoff, the
    /// camera may come back.
    NoFragments,
    /// The caller's AWS credentials are missing, invalid, expired or lack a permission
    /// (`NotAuthorizedException`, `AccessDeniedException`, HTTP 401/403 on an API call).
    /// Fatal: fix the credentials or the IAM policy.
    NotAuthorized,
    /// The HLS streaming session token expired or was revoked ("Streaming session token is
    /// expired", HTTP 403 on a playlist or fragment URL). Transient: request a new session URL
    /// and continue; if that request is itself denied it fails with
    /// [`NotAuthorized`](ErrorKind::NotAuthorized).
    SessionExpired,
    /// A KVS or HTTP rate limit was hit (`ClientLimitExceededException`, `ThrottlingException`,
    /// HTTP 429). Transient: back off (with jitter) and retry.
    Throttled,
    /// The stream's media cannot be served this way (`UnsupportedStreamMediaTypeException`,
    /// `NoDataRetentionException`, `MissingCodecPrivateDataException`,
    /// `InvalidCodecPrivateDataException`, `InvalidMediaFrameException`). Fatal: change the
    /// producer (codec, track layout) or the stream's data retention.
    UnsupportedMedia,
    /// The endpoint does not implement the operation (`UnknownOperationException`, as some KVS
    /// imitations answer for `ListFragments`). Fatal for that operation: use another path
    /// (clips fall back on `GetClip` alone) or another endpoint.
    UnsupportedOperation,
    /// The resource already exists or is busy (`ResourceInUseException`, for example
    /// `CreateStream` of an existing stream). Fatal for that call; the stream itself may be
    /// usable.
    AlreadyExists,
    /// An account or device quota is exhausted (`AccountStreamLimitExceededException`,
    /// `AccountChannelLimitExceededException`, `DeviceStreamLimitExceededException`,
    /// `TagsPerResourceExceededLimitException`). Fatal: delete resources or raise the quota.
    LimitExceeded,
    /// The service failed on its side (HTTP 5xx, `InternalFailure`, `ServiceUnavailable`).
    /// Transient: retry with backoff.
    ServiceUnavailable,
    /// The connection failed: refused, reset, DNS failure, body cut short. Transient: retry
    /// with backoff.
    Network,
    /// A request, connection or read timed out. Transient: retry with backoff.
    Timeout,
    /// A response had an unexpected shape: a malformed playlist, an unparseable body.
    /// Transient: retry (typically with a new session); report it if it persists.
    Protocol,
    /// GStreamer failed while decoding a running stream (corrupt data, decoder error).
    /// Transient: the decode branch is rebuilt and decoding resumes at the next key frame.
    Decode,
    /// The GStreamer pipeline cannot be built: a missing element or plugin, impossible caps, a
    /// state change that fails at setup. Fatal: install the plugin or fix the pipeline.
    Pipeline,
    /// Local I/O failed (files). Fatal. I/O errors that are really network failures are
    /// reported as [`Network`](ErrorKind::Network) or [`Timeout`](ErrorKind::Timeout).
    Io,
    /// The source or supervisor was stopped by the caller. Not an error to retry: stop.
    Stopped,
    /// A bug in this crate. Fatal: please report it.
    Internal,
}

impl ErrorKind {
    /// Every kind, in declaration order (for tests and for pre-registering metric labels).
    pub const ALL: [ErrorKind; 20] = [
        ErrorKind::InvalidConfig,
        ErrorKind::InvalidArgument,
        ErrorKind::StreamNotFound,
        ErrorKind::NoFragments,
        ErrorKind::NotAuthorized,
        ErrorKind::SessionExpired,
        ErrorKind::Throttled,
        ErrorKind::UnsupportedMedia,
        ErrorKind::UnsupportedOperation,
        ErrorKind::AlreadyExists,
        ErrorKind::LimitExceeded,
        ErrorKind::ServiceUnavailable,
        ErrorKind::Network,
        ErrorKind::Timeout,
        ErrorKind::Protocol,
        ErrorKind::Decode,
        ErrorKind::Pipeline,
        ErrorKind::Io,
        ErrorKind::Stopped,
        ErrorKind::Internal,
    ];

    /// Whether retrying (after a backoff, possibly with a new session) can succeed.
    ///
    /// Transient: [`NoFragments`](ErrorKind::NoFragments),
    /// [`SessionExpired`](ErrorKind::SessionExpired), [`Throttled`](ErrorKind::Throttled),
    /// [`ServiceUnavailable`](ErrorKind::ServiceUnavailable), [`Network`](ErrorKind::Network),
    /// [`Timeout`](ErrorKind::Timeout), [`Protocol`](ErrorKind::Protocol) and
    /// [`Decode`](ErrorKind::Decode). Every other kind is fatal.
    #[must_use]
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            ErrorKind::NoFragments
                | ErrorKind::SessionExpired
                | ErrorKind::Throttled
                | ErrorKind::ServiceUnavailable
                | ErrorKind::Network
                | ErrorKind::Timeout
                | ErrorKind::Protocol
                | ErrorKind::Decode
        )
    }

    /// A stable `snake_case` name, suitable as a metrics label (`"no_fragments"`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidConfig => "invalid_config",
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::StreamNotFound => "stream_not_found",
            ErrorKind::NoFragments => "no_fragments",
            ErrorKind::NotAuthorized => "not_authorized",
            ErrorKind::SessionExpired => "session_expired",
            ErrorKind::Throttled => "throttled",
            ErrorKind::UnsupportedMedia => "unsupported_media",
            ErrorKind::UnsupportedOperation => "unsupported_operation",
            ErrorKind::AlreadyExists => "already_exists",
            ErrorKind::LimitExceeded => "limit_exceeded",
            ErrorKind::ServiceUnavailable => "service_unavailable",
            ErrorKind::Network => "network",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Protocol => "protocol",
            ErrorKind::Decode => "decode",
            ErrorKind::Pipeline => "pipeline",
            ErrorKind::Io => "io",
            ErrorKind::Stopped => "stopped",
            ErrorKind::Internal => "internal",
        }
    }

    fn words(self) -> &'static str {
        match self {
            ErrorKind::InvalidConfig => "invalid configuration",
            ErrorKind::InvalidArgument => "invalid argument",
            ErrorKind::StreamNotFound => "stream not found",
            ErrorKind::NoFragments => "no fragments available",
            ErrorKind::NotAuthorized => "not authorized",
            ErrorKind::SessionExpired => "streaming session expired",
            ErrorKind::Throttled => "throttled",
            ErrorKind::UnsupportedMedia => "unsupported media",
            ErrorKind::UnsupportedOperation => "unsupported operation",
            ErrorKind::AlreadyExists => "already exists",
            ErrorKind::LimitExceeded => "limit exceeded",
            ErrorKind::ServiceUnavailable => "service unavailable",
            ErrorKind::Network => "network error",
            ErrorKind::Timeout => "timed out",
            ErrorKind::Protocol => "protocol error",
            ErrorKind::Decode => "decode error",
            ErrorKind::Pipeline => "pipeline error",
            ErrorKind::Io => "I/O error",
            ErrorKind::Stopped => "stopped",
            ErrorKind::Internal => "internal error",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.words())
    }
}

/// The error of every fallible operation in this crate.
///
/// Opaque and cheap to clone (one `Arc`). Inspect it with [`kind`](Error::kind) and
/// [`is_transient`](Error::is_transient); [`aws_error_code`](Error::aws_error_code),
/// [`http_status`](Error::http_status) and [`request_id`](Error::request_id) give the details
/// of a service failure. `Display` shows `{context}: {message}`, followed by the AWS error code
/// and HTTP status when there are any. Message and context are redacted when the error is
/// built (see [`crate::redact`]), and `Debug` shows the same redacted data, so an `Error` can
/// be logged as is. The causes of an error are folded into its message (redacted too) rather
/// than exposed through [`source`](std::error::Error::source).
///
/// # Example
///
/// ```
/// use kvs_frames::error::{Error, ErrorKind};
///
/// let err = Error::from_kvs(
///     "ResourceNotFoundException",
///     Some(404),
///     "No fragments found in the stream for the streaming request.",
/// )
/// .context("camera front-door, stream cam-1, GetHLSStreamingSessionURL");
///
/// let action = match err.kind() {
///     ErrorKind::NoFragments => "camera offline: retry later",
///     ErrorKind::SessionExpired => "get a new session URL",
///     ErrorKind::StreamNotFound | ErrorKind::NotAuthorized => "give up and report",
///     _ if err.is_transient() => "retry with backoff",
///     _ => "give up",
/// };
/// assert_eq!(action, "camera offline: retry later");
/// assert!(err.is_transient());
/// assert_eq!(err.aws_error_code(), Some("ResourceNotFoundException"));
/// assert_eq!(err.http_status(), Some(404));
/// assert_eq!(
///     err.to_string(),
///     "camera front-door, stream cam-1, GetHLSStreamingSessionURL: No fragments found in \
///      the stream for the streaming request. (ResourceNotFoundException, HTTP 404)"
/// );
/// ```
#[derive(Clone)]
pub struct Error(Arc<Inner>);

#[derive(Clone)]
struct Inner {
    kind: ErrorKind,
    message: String,
    context: Option<String>,
    aws_error_code: Option<String>,
    http_status: Option<u16>,
    request_id: Option<String>,
    invalid_option: Option<String>,
}

impl Error {
    /// An error of `kind` with `message` (redacted).
    #[must_use]
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self::build(kind, message.into())
    }

    fn build(kind: ErrorKind, message: String) -> Self {
        let message = match redact_text(&message) {
            std::borrow::Cow::Borrowed(_) => message,
            std::borrow::Cow::Owned(redacted) => redacted,
        };
        Error(Arc::new(Inner {
            kind,
            message,
            context: None,
            aws_error_code: None,
            http_status: None,
            request_id: None,
            invalid_option: None,
        }))
    }

    fn inner_mut(&mut self) -> &mut Inner {
        Arc::make_mut(&mut self.0)
    }

    /// An [`InvalidConfig`](ErrorKind::InvalidConfig) error naming the option, its value and
    /// the rule it breaks: ``invalid option `expires`: 12s (must be between 300 s and 43200 s)``.
    ///
    /// The option name is available from [`invalid_option`](Error::invalid_option).
    #[must_use]
    pub fn invalid_config(option: &str, value: impl fmt::Display, reason: &str) -> Self {
        let mut err = Self::build(
            ErrorKind::InvalidConfig,
            format!("invalid option `{option}`: {value} ({reason})"),
        );
        err.inner_mut().invalid_option = Some(option.to_owned());
        err
    }

    /// Adds what was being done, for example `"camera front-door, stream cam-1,
    /// GetHLSStreamingSessionURL"` (redacted). A context added to an error that already has
    /// one is put in front: `outer: inner`.
    #[must_use]
    pub fn context(mut self, ctx: impl Into<String>) -> Self {
        let ctx = ctx.into();
        let ctx = redact_text(&ctx).into_owned();
        let inner = self.inner_mut();
        inner.context = Some(match inner.context.take() {
            Some(existing) if !existing.is_empty() => format!("{ctx}: {existing}"),
            _ => ctx,
        });
        self
    }

    /// The classification: what happened and whether retrying can help.
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }

    /// Shorthand for `self.kind().is_transient()`: whether retrying can succeed.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        self.0.kind.is_transient()
    }

    /// The (redacted) message, without the context.
    #[must_use]
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// The AWS error code without namespace or URL, e.g. `"ResourceNotFoundException"`, when
    /// the error came from KVS.
    #[must_use]
    pub fn aws_error_code(&self) -> Option<&str> {
        self.0.aws_error_code.as_deref()
    }

    /// The HTTP status of the failed response, if there was one.
    #[must_use]
    pub fn http_status(&self) -> Option<u16> {
        self.0.http_status
    }

    /// The AWS request id of a failed SDK call (`x-amzn-RequestId`), for AWS support.
    #[must_use]
    pub fn request_id(&self) -> Option<&str> {
        self.0.request_id.as_deref()
    }

    /// The (redacted) context added with [`context`](Error::context).
    #[must_use]
    pub fn context_str(&self) -> Option<&str> {
        self.0.context.as_deref()
    }

    /// The option named by [`invalid_config`](Error::invalid_config).
    #[must_use]
    pub fn invalid_option(&self) -> Option<&str> {
        self.0.invalid_option.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.0;
        if let Some(context) = &inner.context {
            write!(f, "{context}: ")?;
        }
        f.write_str(&inner.message)?;
        match (&inner.aws_error_code, inner.http_status) {
            (Some(code), Some(status)) => write!(f, " ({code}, HTTP {status})"),
            (Some(code), None) => write!(f, " ({code})"),
            (None, Some(status)) => write!(f, " (HTTP {status})"),
            (None, None) => Ok(()),
        }
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = &*self.0;
        let mut s = f.debug_struct("Error");
        s.field("kind", &inner.kind);
        s.field("message", &inner.message);
        if let Some(context) = &inner.context {
            s.field("context", context);
        }
        if let Some(code) = &inner.aws_error_code {
            s.field("aws_error_code", code);
        }
        if let Some(status) = inner.http_status {
            s.field("http_status", &status);
        }
        if let Some(id) = &inner.request_id {
            s.field("request_id", id);
        }
        if let Some(option) = &inner.invalid_option {
            s.field("invalid_option", option);
        }
        s.finish()
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::classify::{MAX_BODY_TEXT, sanitize_error_code};
    use super::*;
    use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
    use aws_smithy_runtime_api::client::result::SdkError;

    const NO_FRAGMENTS: &str = "No fragments found in the stream for the streaming request.";
    const EXPIRED: &str = "Streaming session token is expired";

    #[test]
    fn every_kvs_error_is_classified() {
        // (code, HTTP status, message, kind)
        let table: &[(&str, u16, &str, ErrorKind)] = &[
            // GetHLSStreamingSessionURL and the HLS endpoints (KVS_FACTS.md).
            (
                "ResourceNotFoundException",
                404,
                "Stream cam-1 not found",
                ErrorKind::StreamNotFound,
            ),
            (
                "ResourceNotFoundException",
                404,
                NO_FRAGMENTS,
                ErrorKind::NoFragments,
            ),
            (
                "ResourceNotFoundException",
                404,
                "No fragments found in the stream for the specified timestamp range.",
                ErrorKind::NoFragments,
            ),
            (
                "ClientLimitExceededException",
                400,
                "Rate exceeded",
                ErrorKind::Throttled,
            ),
            (
                "NotAuthorizedException",
                403,
                "User is not authorized",
                ErrorKind::NotAuthorized,
            ),
            (
                "NotAuthorizedException",
                401,
                "Unauthorized",
                ErrorKind::NotAuthorized,
            ),
            (
                "NotAuthorizedException",
                403,
                EXPIRED,
                ErrorKind::SessionExpired,
            ),
            (
                "InvalidArgumentException",
                400,
                "Expires must be between 300 and 43200",
                ErrorKind::InvalidArgument,
            ),
            (
                "UnsupportedStreamMediaTypeException",
                400,
                "",
                ErrorKind::UnsupportedMedia,
            ),
            (
                "NoDataRetentionException",
                400,
                "",
                ErrorKind::UnsupportedMedia,
            ),
            (
                "MissingCodecPrivateDataException",
                400,
                "",
                ErrorKind::UnsupportedMedia,
            ),
            (
                "InvalidCodecPrivateDataException",
                400,
                "",
                ErrorKind::UnsupportedMedia,
            ),
            // GetClip.
            (
                "InvalidMediaFrameException",
                400,
                "",
                ErrorKind::UnsupportedMedia,
            ),
            // Control plane.
            ("AccessDeniedException", 403, "", ErrorKind::NotAuthorized),
            // An endpoint without the operation: not a missing stream.
            (
                "UnknownOperationException",
                404,
                "Unknown operation /listFragments",
                ErrorKind::UnsupportedOperation,
            ),
            (
                "AccessDeniedException",
                403,
                "User: arn:aws:iam::123456789012:user/x is not authorized to perform: kinesisvideo:ListFragments",
                ErrorKind::NotAuthorized,
            ),
            (
                "ResourceInUseException",
                400,
                "The stream cam-1 already exists",
                ErrorKind::AlreadyExists,
            ),
            (
                "AccountStreamLimitExceededException",
                400,
                "",
                ErrorKind::LimitExceeded,
            ),
            (
                "AccountChannelLimitExceededException",
                400,
                "",
                ErrorKind::LimitExceeded,
            ),
            (
                "DeviceStreamLimitExceededException",
                400,
                "",
                ErrorKind::LimitExceeded,
            ),
            (
                "TagsPerResourceExceededLimitException",
                400,
                "",
                ErrorKind::LimitExceeded,
            ),
            (
                "InvalidDeviceException",
                400,
                "",
                ErrorKind::InvalidArgument,
            ),
            (
                "InvalidResourceFormatException",
                400,
                "",
                ErrorKind::InvalidArgument,
            ),
            (
                "VersionMismatchException",
                400,
                "",
                ErrorKind::InvalidArgument,
            ),
            (
                "StreamEdgeConfigurationNotFoundException",
                404,
                "",
                ErrorKind::InvalidArgument,
            ),
            // Common AWS errors.
            (
                "ThrottlingException",
                400,
                "Rate exceeded",
                ErrorKind::Throttled,
            ),
            (
                "UnrecognizedClientException",
                400,
                "The security token included in the request is invalid.",
                ErrorKind::NotAuthorized,
            ),
            (
                "ExpiredTokenException",
                400,
                "The security token included in the request is expired",
                ErrorKind::NotAuthorized,
            ),
            (
                "InvalidSignatureException",
                403,
                "",
                ErrorKind::NotAuthorized,
            ),
            ("AccessDenied", 403, "", ErrorKind::NotAuthorized),
            ("InternalFailure", 500, "", ErrorKind::ServiceUnavailable),
            ("ServiceUnavailable", 503, "", ErrorKind::ServiceUnavailable),
            (
                "ServiceUnavailableException",
                503,
                "",
                ErrorKind::ServiceUnavailable,
            ),
            ("ValidationException", 400, "", ErrorKind::InvalidArgument),
            ("RequestTimeout", 408, "", ErrorKind::Timeout),
            (
                "ConnectionLimitExceededException",
                400,
                "",
                ErrorKind::Throttled,
            ),
        ];
        for &(code, status, message, kind) in table {
            let err = Error::from_kvs(code, Some(status), message);
            assert_eq!(err.kind(), kind, "{code} {status} {message:?}");
            assert_eq!(err.aws_error_code(), Some(code));
            assert_eq!(err.http_status(), Some(status));
            // The code decides, whatever the status.
            assert_eq!(Error::from_kvs(code, None, message).kind(), kind, "{code}");
            // Case-insensitive.
            let lower = code.to_ascii_lowercase();
            assert_eq!(
                Error::from_kvs(&lower, Some(status), message).kind(),
                kind,
                "{lower}"
            );
        }
    }

    #[test]
    fn unknown_codes_by_http_status() {
        let table: &[(Option<u16>, ErrorKind)] = &[
            (Some(500), ErrorKind::ServiceUnavailable),
            (Some(502), ErrorKind::ServiceUnavailable),
            (Some(503), ErrorKind::ServiceUnavailable),
            (Some(504), ErrorKind::ServiceUnavailable),
            (Some(429), ErrorKind::Throttled),
            (Some(401), ErrorKind::NotAuthorized),
            (Some(403), ErrorKind::NotAuthorized),
            (Some(404), ErrorKind::StreamNotFound),
            (Some(408), ErrorKind::Timeout),
            (Some(400), ErrorKind::InvalidArgument),
            (Some(409), ErrorKind::InvalidArgument),
            (Some(413), ErrorKind::InvalidArgument),
            (Some(200), ErrorKind::Protocol),
            (Some(302), ErrorKind::Protocol),
            (None, ErrorKind::Protocol),
        ];
        for &(status, kind) in table {
            for code in ["", "SomethingNewException"] {
                let err = Error::from_kvs(code, status, "boom");
                assert_eq!(err.kind(), kind, "{code:?} {status:?}");
            }
        }
        assert_eq!(Error::from_kvs("", None, "").aws_error_code(), None);
        // Message refinements also apply to an unknown code.
        assert_eq!(
            Error::from_kvs("", Some(404), NO_FRAGMENTS).kind(),
            ErrorKind::NoFragments
        );
        assert_eq!(
            Error::from_kvs("", Some(403), EXPIRED).kind(),
            ErrorKind::SessionExpired
        );
    }

    #[test]
    fn empty_messages_get_a_default() {
        assert_eq!(
            Error::from_kvs("NoDataRetentionException", Some(400), "").message(),
            "NoDataRetentionException"
        );
        assert_eq!(Error::from_kvs("", Some(502), " ").message(), "HTTP 502");
        assert_eq!(
            Error::from_kvs("", None, "").message(),
            "unknown service error"
        );
    }

    #[test]
    fn transient_and_fatal_kinds() {
        for kind in ErrorKind::ALL {
            let expected = match kind {
                ErrorKind::NoFragments
                | ErrorKind::SessionExpired
                | ErrorKind::Throttled
                | ErrorKind::ServiceUnavailable
                | ErrorKind::Network
                | ErrorKind::Timeout
                | ErrorKind::Protocol
                | ErrorKind::Decode => true,
                ErrorKind::InvalidConfig
                | ErrorKind::InvalidArgument
                | ErrorKind::StreamNotFound
                | ErrorKind::NotAuthorized
                | ErrorKind::UnsupportedMedia
                | ErrorKind::UnsupportedOperation
                | ErrorKind::AlreadyExists
                | ErrorKind::LimitExceeded
                | ErrorKind::Pipeline
                | ErrorKind::Io
                | ErrorKind::Stopped
                | ErrorKind::Internal => false,
            };
            assert_eq!(kind.is_transient(), expected, "{kind:?}");
            assert_eq!(Error::new(kind, "x").is_transient(), expected, "{kind:?}");
        }
    }

    #[test]
    fn kind_names_are_unique_snake_case() {
        let mut names = std::collections::HashSet::new();
        let mut words = std::collections::HashSet::new();
        for kind in ErrorKind::ALL {
            let name = kind.as_str();
            assert!(
                name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{name}"
            );
            assert!(names.insert(name), "duplicate {name}");
            assert!(words.insert(kind.to_string()), "duplicate words {kind}");
        }
        assert_eq!(ErrorKind::NoFragments.as_str(), "no_fragments");
        assert_eq!(
            ErrorKind::SessionExpired.to_string(),
            "streaming session expired"
        );
    }

    #[test]
    fn error_codes_are_sanitized() {
        for code in [
            "ResourceNotFoundException",
            "ResourceNotFoundException:http://internal.amazon.com/coral/com.amazon.kinesisvideo.hls/",
            "com.amazonaws.kinesisvideo#ResourceNotFoundException",
            "aws.protocoltests.restjson#ResourceNotFoundException:http://internal.amazon.com/coral/com.amazon.coral.validate/",
            "  ResourceNotFoundException  ",
        ] {
            let err = Error::from_kvs(code, Some(404), "Stream not found");
            assert_eq!(err.kind(), ErrorKind::StreamNotFound, "{code}");
            assert_eq!(
                err.aws_error_code(),
                Some("ResourceNotFoundException"),
                "{code}"
            );
        }
        assert_eq!(sanitize_error_code(""), "");
        assert_eq!(sanitize_error_code("#"), "");
    }

    #[test]
    fn hls_403_expired_token() {
        let body = br#"{"message":"Streaming session token is expired"}"#;
        let err = Error::from_hls_response(
            403,
            Some(
                "NotAuthorizedException:http://internal.amazon.com/coral/com.amazon.kinesisvideo.hls/",
            ),
            body,
        );
        assert_eq!(err.kind(), ErrorKind::SessionExpired);
        assert!(err.is_transient());
        assert_eq!(err.message(), EXPIRED);
        assert_eq!(err.aws_error_code(), Some("NotAuthorizedException"));
        assert_eq!(err.http_status(), Some(403));
    }

    #[test]
    fn hls_403_plain() {
        for (header, body) in [
            (None, &b""[..]),
            (None, &b"Forbidden"[..]),
            (
                Some("NotAuthorizedException"),
                &br#"{"Message":"Unauthorized"}"#[..],
            ),
            (Some("AccessDeniedException"), &b"{}"[..]),
        ] {
            let err = Error::from_hls_response(403, header, body);
            assert_eq!(err.kind(), ErrorKind::SessionExpired, "{header:?}");
            assert_eq!(err.http_status(), Some(403));
        }
        assert_eq!(
            Error::from_hls_response(403, None, b"").message(),
            "HTTP 403 from the HLS endpoint"
        );
        // A more specific code wins over the 403.
        assert_eq!(
            Error::from_hls_response(403, Some("ClientLimitExceededException"), b"").kind(),
            ErrorKind::Throttled
        );
        // Outside HLS the same 403 is a permission problem.
        assert_eq!(
            Error::from_kvs("NotAuthorizedException", Some(403), "Unauthorized").kind(),
            ErrorKind::NotAuthorized
        );
    }

    #[test]
    fn hls_404_no_fragments() {
        let body = format!(r#"{{"message":"{NO_FRAGMENTS}"}}"#);
        let err = Error::from_hls_response(404, Some("ResourceNotFoundException"), body.as_bytes());
        assert_eq!(err.kind(), ErrorKind::NoFragments);
        assert!(err.is_transient());
        assert_eq!(err.message(), NO_FRAGMENTS);
        // Without the header the body alone is enough.
        assert_eq!(
            Error::from_hls_response(404, None, body.as_bytes()).kind(),
            ErrorKind::NoFragments
        );
    }

    #[test]
    fn hls_404_other() {
        let err = Error::from_hls_response(
            404,
            Some("ResourceNotFoundException"),
            br#"{"Message":"The requested stream was not found or is not active."}"#,
        );
        assert_eq!(err.kind(), ErrorKind::StreamNotFound);
        assert!(!err.is_transient());
        assert_eq!(
            Error::from_hls_response(404, None, b"").kind(),
            ErrorKind::StreamNotFound
        );
    }

    #[test]
    fn hls_400_client_limit_exceeded() {
        let err = Error::from_hls_response(
            400,
            Some("ClientLimitExceededException"),
            br#"{"message":"Rate exceeded for the session"}"#,
        );
        assert_eq!(err.kind(), ErrorKind::Throttled);
        assert_eq!(err.message(), "Rate exceeded for the session");
        // The code may also come from the body.
        let err = Error::from_hls_response(
            400,
            None,
            br#"{"__type":"com.amazonaws.kinesisvideo#ClientLimitExceededException","message":"Rate exceeded"}"#,
        );
        assert_eq!(err.kind(), ErrorKind::Throttled);
        assert_eq!(err.aws_error_code(), Some("ClientLimitExceededException"));
    }

    #[test]
    fn hls_500_non_json_body() {
        let body = b"<html><body><h1>500 Internal Server Error</h1></body></html>";
        let err = Error::from_hls_response(500, None, body);
        assert_eq!(err.kind(), ErrorKind::ServiceUnavailable);
        assert!(err.is_transient());
        assert!(err.message().contains("500 Internal Server Error"));
        assert_eq!(err.aws_error_code(), None);
        // Invalid UTF-8 and long bodies are tolerated.
        let long = vec![b'x'; 10_000];
        let err = Error::from_hls_response(503, None, &long);
        assert_eq!(err.kind(), ErrorKind::ServiceUnavailable);
        assert!(err.message().chars().count() <= MAX_BODY_TEXT + 1);
        let err = Error::from_hls_response(502, None, &[0xff, 0xfe, b'!']);
        assert_eq!(err.kind(), ErrorKind::ServiceUnavailable);
    }

    #[test]
    fn redaction_inside_messages() {
        let token = "CiAbC%2Bd%2Fef%3D%3Dgh~";
        let url = format!(
            "https://b-1234abcd.kinesisvideo.us-east-1.amazonaws.com/hls/v1/getHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber=1"
        );
        let errors = [
            Error::new(ErrorKind::Network, format!("GET {url} failed")),
            Error::new(ErrorKind::Protocol, "bad playlist").context(format!("fetching {url}")),
            Error::from_kvs(
                "NotAuthorizedException",
                Some(403),
                &format!("{EXPIRED}: {url}"),
            ),
            Error::from_hls_response(500, None, format!("error at {url}").as_bytes()),
            Error::from_hls_response(
                500,
                None,
                format!(r#"{{"message":"{url}","SessionToken":"{token}"}}"#).as_bytes(),
            ),
            Error::invalid_config("rtsp_url", "rtsp://admin:hunter2@10.0.0.5/live", "bad host"),
            Error::from(std::io::Error::other(format!(
                "AWS_SECRET_ACCESS_KEY=wJalrXUt/K7MDENG+bPxRfiCY= {url}"
            ))),
        ];
        for err in errors {
            let display = err.to_string();
            let debug = format!("{err:?}");
            for shown in [&display, &debug] {
                assert!(!shown.contains("CiAbC"), "{shown}");
                assert!(!shown.contains("hunter2"), "{shown}");
                assert!(!shown.contains("wJalrXUt"), "{shown}");
            }
            assert!(
                display.contains("<redacted>") || display.contains("***"),
                "{display}"
            );
        }
    }

    #[test]
    fn display_and_debug() {
        let err = Error::new(ErrorKind::Protocol, "no #EXTM3U header")
            .context("stream cam-1, media playlist");
        assert_eq!(
            err.to_string(),
            "stream cam-1, media playlist: no #EXTM3U header"
        );
        assert_eq!(err.context_str(), Some("stream cam-1, media playlist"));
        let err = err.context("camera front-door");
        assert_eq!(
            err.to_string(),
            "camera front-door: stream cam-1, media playlist: no #EXTM3U header"
        );
        assert_eq!(
            Error::new(ErrorKind::Stopped, "stopped").to_string(),
            "stopped"
        );
        assert_eq!(
            format!("{:?}", Error::new(ErrorKind::Stopped, "stopped")),
            r#"Error { kind: Stopped, message: "stopped" }"#
        );
        let err = Error::from_kvs("ThrottlingException", None, "Rate exceeded");
        assert_eq!(err.to_string(), "Rate exceeded (ThrottlingException)");
        let err = Error::from_kvs("", Some(502), "Bad Gateway");
        assert_eq!(err.to_string(), "Bad Gateway (HTTP 502)");
        assert_eq!(
            format!("{err:?}"),
            r#"Error { kind: ServiceUnavailable, message: "Bad Gateway", http_status: 502 }"#
        );
    }

    #[test]
    fn context_does_not_affect_clones() {
        let base = Error::new(ErrorKind::Network, "reset");
        let with = base.clone().context("ctx");
        assert_eq!(base.context_str(), None);
        assert_eq!(with.context_str(), Some("ctx"));
    }

    #[test]
    fn invalid_config_names_option_and_value() {
        let err = Error::invalid_config("expires", "12s", "must be between 300 s and 43200 s");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert!(!err.is_transient());
        assert_eq!(err.invalid_option(), Some("expires"));
        assert_eq!(
            err.message(),
            "invalid option `expires`: 12s (must be between 300 s and 43200 s)"
        );
        assert_eq!(err.to_string(), err.message());
        let err = Error::invalid_config("max_media_playlist_fragment_results", 0, "1–5000");
        assert_eq!(
            err.message(),
            "invalid option `max_media_playlist_fragment_results`: 0 (1–5000)"
        );
        assert_eq!(
            Error::new(ErrorKind::InvalidConfig, "x").invalid_option(),
            None
        );
    }

    #[test]
    fn from_io_mapping() {
        use std::io::{Error as IoError, ErrorKind as Io};
        let table = [
            (Io::NotFound, ErrorKind::Io),
            (Io::PermissionDenied, ErrorKind::Io),
            (Io::AlreadyExists, ErrorKind::Io),
            (Io::InvalidData, ErrorKind::Io),
            (Io::Other, ErrorKind::Io),
            (Io::ConnectionReset, ErrorKind::Network),
            (Io::ConnectionAborted, ErrorKind::Network),
            (Io::ConnectionRefused, ErrorKind::Network),
            (Io::BrokenPipe, ErrorKind::Network),
            (Io::UnexpectedEof, ErrorKind::Network),
            (Io::NotConnected, ErrorKind::Network),
            (Io::HostUnreachable, ErrorKind::Network),
            (Io::NetworkUnreachable, ErrorKind::Network),
            (Io::TimedOut, ErrorKind::Timeout),
        ];
        for (io, kind) in table {
            let err = Error::from(IoError::new(io, "boom"));
            assert_eq!(err.kind(), kind, "{io:?}");
            assert_eq!(err.message(), "boom");
        }
        // An Error carried through io::Error comes back unchanged.
        let original = Error::new(ErrorKind::SessionExpired, "expired").context("ctx");
        let back = Error::from(IoError::other(original.clone()));
        assert_eq!(back.kind(), ErrorKind::SessionExpired);
        assert_eq!(back.to_string(), original.to_string());
        // `?` works.
        fn read() -> Result<Vec<u8>> {
            Ok(std::fs::read("/nonexistent/kvs-frames/file")?)
        }
        assert_eq!(read().unwrap_err().kind(), ErrorKind::Io);
    }

    #[test]
    fn from_gstreamer_errors() {
        use gstreamer::glib;
        let err = Error::from(glib::Error::new(
            gstreamer::StreamError::Decode,
            "could not decode stream",
        ));
        assert_eq!(err.kind(), ErrorKind::Decode);
        assert!(err.is_transient());
        assert!(err.message().starts_with("could not decode stream"));
        let err = Error::from(glib::Error::new(
            gstreamer::CoreError::MissingPlugin,
            "no element \"avdec_h264\"",
        ));
        assert_eq!(err.kind(), ErrorKind::Pipeline);
        let err = Error::from(glib::Error::new(
            gstreamer::StreamError::CodecNotFound,
            "no decoder for video/x-h265",
        ));
        assert_eq!(err.kind(), ErrorKind::Pipeline);
        let err = Error::from(glib::bool_error!("Failed to link elements"));
        assert_eq!(err.kind(), ErrorKind::Pipeline);
        assert!(err.message().starts_with("Failed to link elements"));
        let err = Error::from(gstreamer::StateChangeError);
        assert_eq!(err.kind(), ErrorKind::Pipeline);
        assert!(!err.is_transient());
    }

    #[test]
    fn from_sdk_service_error() {
        use aws_sdk_kinesisvideoarchivedmedia::operation::get_hls_streaming_session_url::GetHLSStreamingSessionURLError;
        use aws_smithy_runtime_api::http::StatusCode;
        use aws_smithy_types::body::SdkBody;
        use aws_smithy_types::error::ErrorMetadata;

        let meta = ErrorMetadata::builder()
            .code("ResourceNotFoundException")
            .message(NO_FRAGMENTS)
            .custom("aws_request_id", "req-1")
            .build();
        let raw = HttpResponse::new(StatusCode::try_from(404).unwrap(), SdkBody::empty());
        let sdk = SdkError::service_error(GetHLSStreamingSessionURLError::generic(meta), raw);
        let err = Error::from_sdk("GetHLSStreamingSessionURL", sdk);
        assert_eq!(err.kind(), ErrorKind::NoFragments);
        assert_eq!(err.http_status(), Some(404));
        assert_eq!(err.aws_error_code(), Some("ResourceNotFoundException"));
        assert_eq!(err.request_id(), Some("req-1"));
        assert_eq!(err.context_str(), Some("GetHLSStreamingSessionURL"));
        assert_eq!(err.message(), NO_FRAGMENTS);

        // An unmodeled error: no code, classified by the status of the raw response.
        let meta = ErrorMetadata::builder().build();
        let raw = HttpResponse::new(StatusCode::try_from(503).unwrap(), SdkBody::empty());
        let sdk = SdkError::service_error(GetHLSStreamingSessionURLError::generic(meta), raw);
        let err = Error::from_sdk("GetHLSStreamingSessionURL", sdk);
        assert_eq!(err.kind(), ErrorKind::ServiceUnavailable);
        assert_eq!(err.http_status(), Some(503));
    }

    #[test]
    fn from_sdk_other_failures() {
        use aws_sdk_kinesisvideo::operation::describe_stream::DescribeStreamError;
        use aws_smithy_runtime_api::client::result::ConnectorError;
        use aws_smithy_runtime_api::http::StatusCode;
        use aws_smithy_types::body::SdkBody;

        type E = SdkError<DescribeStreamError, HttpResponse>;
        let check = |sdk: E, kind: ErrorKind| {
            let err = Error::from_sdk("DescribeStream", sdk);
            assert_eq!(err.kind(), kind, "{err}");
            assert_eq!(err.context_str(), Some("DescribeStream"));
            err
        };
        check(
            E::timeout_error("operation timeout (all attempts)"),
            ErrorKind::Timeout,
        );
        check(
            E::dispatch_failure(ConnectorError::timeout("connect timeout".into())),
            ErrorKind::Timeout,
        );
        let err = check(
            E::dispatch_failure(ConnectorError::io(
                std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused")
                    .into(),
            )),
            ErrorKind::Network,
        );
        assert!(err.message().contains("connection refused"), "{err}");
        // Credentials: by the provider error's type, never by text.
        use aws_credential_types::provider::error::CredentialsError;
        let provider =
            |e: CredentialsError| E::dispatch_failure(ConnectorError::other(Box::new(e), None));
        let err = check(
            provider(CredentialsError::provider_error("IMDS answered 503")),
            ErrorKind::ServiceUnavailable,
        );
        assert!(err.is_transient());
        let err = check(
            provider(CredentialsError::provider_timed_out(
                std::time::Duration::from_secs(5),
            )),
            ErrorKind::Timeout,
        );
        assert!(err.is_transient());
        check(
            provider(CredentialsError::unhandled("boom")),
            ErrorKind::ServiceUnavailable,
        );
        let err = check(
            provider(CredentialsError::not_loaded("no credentials in the chain")),
            ErrorKind::NotAuthorized,
        );
        assert!(!err.is_transient());
        check(
            provider(CredentialsError::invalid_configuration("bad profile")),
            ErrorKind::InvalidConfig,
        );
        check(
            E::construction_failure(CredentialsError::not_loaded_no_source()),
            ErrorKind::NotAuthorized,
        );
        // A text that only mentions credentials is not a credentials error.
        check(
            E::dispatch_failure(ConnectorError::other(
                "an error occurred while loading credentials".into(),
                None,
            )),
            ErrorKind::Network,
        );
        check(
            E::dispatch_failure(ConnectorError::user("invalid URI".into())),
            ErrorKind::InvalidConfig,
        );
        check(
            E::construction_failure("No credentials provider was configured"),
            ErrorKind::InvalidConfig,
        );
        check(
            E::construction_failure("A region must be set when sending requests"),
            ErrorKind::InvalidConfig,
        );
        let raw = HttpResponse::new(StatusCode::try_from(200).unwrap(), SdkBody::empty());
        let err = check(E::response_error("invalid JSON", raw), ErrorKind::Protocol);
        assert_eq!(err.http_status(), Some(200));
        // A response type other than HttpResponse: no status, still classified.
        let sdk: SdkError<DescribeStreamError, ()> = SdkError::timeout_error("slow");
        assert_eq!(
            Error::from_sdk("DescribeStream", sdk).kind(),
            ErrorKind::Timeout
        );
    }

    #[tokio::test]
    async fn from_reqwest_errors() {
        use std::io::{Read, Write};
        use std::time::Duration;

        let token = "CiAbC%2Bd~";
        let client = reqwest::Client::new();

        // Connection refused: bind a port, then free it.
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let err = client
            .get(format!(
                "http://127.0.0.1:{port}/x.m3u8?SessionToken={token}"
            ))
            .send()
            .await
            .unwrap_err();
        let err = Error::from_reqwest(err);
        assert_eq!(err.kind(), ErrorKind::Network, "{err}");
        assert!(!format!("{err} {err:?}").contains("CiAbC"), "{err:?}");

        // A server that answers 403, then one that never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            conn.write_all(
                b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
            drop(conn);
            let (silent, _) = listener.accept().unwrap();
            std::thread::sleep(Duration::from_millis(500));
            drop(silent);
        });
        let url = format!("http://{addr}/x.m3u8?SessionToken={token}");
        let err = client
            .get(&url)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap_err();
        let err = Error::from_reqwest(err);
        assert_eq!(err.kind(), ErrorKind::SessionExpired, "{err}");
        assert_eq!(err.http_status(), Some(403));
        assert!(!format!("{err} {err:?}").contains("CiAbC"), "{err:?}");

        let err = client
            .get(&url)
            .timeout(Duration::from_millis(100))
            .send()
            .await
            .unwrap_err();
        let err = Error::from_reqwest(err);
        assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
        assert!(!format!("{err} {err:?}").contains("CiAbC"), "{err:?}");
        server.join().unwrap();

        // An invalid request.
        let err = client.get("not a url").build().unwrap_err();
        assert_eq!(Error::from_reqwest(err).kind(), ErrorKind::InvalidConfig);
    }

    #[test]
    fn error_is_send_sync_clone_static() {
        fn assert_traits<T: Send + Sync + Clone + std::error::Error + 'static>() {}
        assert_traits::<Error>();
        assert_eq!(std::mem::size_of::<Error>(), std::mem::size_of::<usize>());
    }

    /// The example of the `Error` docs (doctests are not run by `cargo test --lib`).
    #[test]
    fn doc_example() {
        let err = Error::from_kvs(
            "ResourceNotFoundException",
            Some(404),
            "No fragments found in the stream for the streaming request.",
        )
        .context("camera front-door, stream cam-1, GetHLSStreamingSessionURL");

        let action = match err.kind() {
            ErrorKind::NoFragments => "camera offline: retry later",
            ErrorKind::SessionExpired => "get a new session URL",
            ErrorKind::StreamNotFound | ErrorKind::NotAuthorized => "give up and report",
            _ if err.is_transient() => "retry with backoff",
            _ => "give up",
        };
        assert_eq!(action, "camera offline: retry later");
        assert!(err.is_transient());
        assert_eq!(err.aws_error_code(), Some("ResourceNotFoundException"));
        assert_eq!(err.http_status(), Some(404));
        assert_eq!(
            err.to_string(),
            "camera front-door, stream cam-1, GetHLSStreamingSessionURL: No fragments found in \
             the stream for the streaming request. (ResourceNotFoundException, HTTP 404)"
        );
    }
}
