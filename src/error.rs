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

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

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
    pub const ALL: [ErrorKind; 19] = [
        ErrorKind::InvalidConfig,
        ErrorKind::InvalidArgument,
        ErrorKind::StreamNotFound,
        ErrorKind::NoFragments,
        ErrorKind::NotAuthorized,
        ErrorKind::SessionExpired,
        ErrorKind::Throttled,
        ErrorKind::UnsupportedMedia,
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

    /// Converts an AWS SDK error of `operation` (e.g. `"GetHLSStreamingSessionURL"`, which
    /// becomes the context).
    ///
    /// | `SdkError` | kind |
    /// |---|---|
    /// | `ServiceError` | [`from_kvs`](Error::from_kvs)`(code, HTTP status, message)` |
    /// | `TimeoutError` | [`Timeout`](ErrorKind::Timeout) |
    /// | `DispatchFailure` | [`Timeout`](ErrorKind::Timeout) if it timed out, [`Network`](ErrorKind::Network) for I/O; [`InvalidConfig`](ErrorKind::InvalidConfig) for an invalid request; otherwise `Network` |
    /// | `ConstructionFailure` | [`InvalidConfig`](ErrorKind::InvalidConfig) |
    /// | either, caused by a `CredentialsError` | by its type: `ProviderTimedOut` → [`Timeout`](ErrorKind::Timeout), `ProviderError` (and `Unhandled`) → [`ServiceUnavailable`](ErrorKind::ServiceUnavailable), both transient; `CredentialsNotLoaded` → [`NotAuthorized`](ErrorKind::NotAuthorized), `InvalidConfiguration` → [`InvalidConfig`](ErrorKind::InvalidConfig), both fatal |
    /// | `ResponseError` | [`Protocol`](ErrorKind::Protocol) |
    ///
    /// The HTTP status is read from the raw response when `R` is the SDK's
    /// [`HttpResponse`] (as for every generated client).
    #[must_use]
    pub fn from_sdk<E, R>(operation: &'static str, err: SdkError<E, R>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
        R: fmt::Debug + 'static,
    {
        let http_status = err
            .raw_response()
            .and_then(|raw| (raw as &dyn Any).downcast_ref::<HttpResponse>())
            .map(|raw| raw.status().as_u16());
        let mut result = match &err {
            SdkError::ServiceError(service) => {
                let source = service.err();
                let meta = source.meta();
                let message = match meta.message() {
                    Some(message) => message.to_owned(),
                    None => chain_text(source),
                };
                let mut result = Self::from_kvs(meta.code().unwrap_or(""), http_status, &message);
                result.inner_mut().request_id = meta.extra("aws_request_id").map(str::to_owned);
                result
            }
            SdkError::TimeoutError(_) => Self::build(ErrorKind::Timeout, chain_text(&err)),
            SdkError::DispatchFailure(dispatch) => {
                let text = chain_text(&err);
                let kind = if let Some(kind) = credentials_kind(&err) {
                    kind
                } else if dispatch.is_timeout() {
                    ErrorKind::Timeout
                } else if dispatch.is_io() {
                    ErrorKind::Network
                } else if dispatch.is_user() {
                    ErrorKind::InvalidConfig
                } else {
                    ErrorKind::Network
                };
                Self::build(kind, text)
            }
            SdkError::ConstructionFailure(_) => {
                let text = chain_text(&err);
                let kind = credentials_kind(&err).unwrap_or(ErrorKind::InvalidConfig);
                Self::build(kind, text)
            }
            SdkError::ResponseError(_) => Self::build(ErrorKind::Protocol, chain_text(&err)),
            _ => Self::build(ErrorKind::Protocol, chain_text(&err)),
        };
        if result.0.http_status.is_none() {
            result.inner_mut().http_status = http_status;
        }
        result.context(operation)
    }

    /// Converts an HTTP client error (HLS playlist or fragment download).
    ///
    /// The URL is removed first (it carries the session token). Timeouts become
    /// [`Timeout`](ErrorKind::Timeout); connect, request, body and decode failures
    /// [`Network`](ErrorKind::Network); a status error (from `error_for_status`) is classified
    /// by its status like [`from_hls_response`](Error::from_hls_response) (403 →
    /// [`SessionExpired`](ErrorKind::SessionExpired)); an invalid request
    /// [`InvalidConfig`](ErrorKind::InvalidConfig); too many redirects
    /// [`Protocol`](ErrorKind::Protocol).
    #[must_use]
    pub fn from_reqwest(err: reqwest::Error) -> Self {
        let err = err.without_url();
        let text = chain_text(&err);
        if err.is_timeout() {
            return Self::build(ErrorKind::Timeout, text);
        }
        if let Some(status) = err.status() {
            let mut result = Self::from_hls_response(status.as_u16(), None, b"");
            result.inner_mut().message = redact_text(&text).into_owned();
            return result;
        }
        let kind = if err.is_connect() || err.is_request() || err.is_body() || err.is_decode() {
            ErrorKind::Network
        } else if err.is_builder() {
            ErrorKind::InvalidConfig
        } else if err.is_redirect() {
            ErrorKind::Protocol
        } else {
            ErrorKind::Network
        };
        Self::build(kind, text)
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

impl From<std::io::Error> for Error {
    /// [`Io`](ErrorKind::Io), except network failures (connection refused/reset/aborted, broken
    /// pipe, unexpected EOF, unreachable host or network) → [`Network`](ErrorKind::Network)
    /// and `TimedOut` → [`Timeout`](ErrorKind::Timeout). An `io::Error` wrapping an [`Error`]
    /// gives back that error.
    fn from(err: std::io::Error) -> Self {
        use std::io::ErrorKind as Io;
        if let Some(inner) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
            return inner.clone();
        }
        let kind = match err.kind() {
            Io::TimedOut => ErrorKind::Timeout,
            Io::ConnectionReset
            | Io::ConnectionAborted
            | Io::ConnectionRefused
            | Io::BrokenPipe
            | Io::UnexpectedEof
            | Io::NotConnected
            | Io::HostUnreachable
            | Io::NetworkUnreachable
            | Io::NetworkDown => ErrorKind::Network,
            _ => ErrorKind::Io,
        };
        Self::build(kind, chain_text(&err))
    }
}

impl From<gstreamer::glib::Error> for Error {
    /// [`Decode`](ErrorKind::Decode), except a missing plugin or decoder
    /// (`CoreError::MissingPlugin`, `StreamError::CodecNotFound`) →
    /// [`Pipeline`](ErrorKind::Pipeline).
    fn from(err: gstreamer::glib::Error) -> Self {
        let missing = matches!(
            err.kind::<gstreamer::CoreError>(),
            Some(gstreamer::CoreError::MissingPlugin)
        ) || matches!(
            err.kind::<gstreamer::StreamError>(),
            Some(gstreamer::StreamError::CodecNotFound)
        );
        let kind = if missing {
            ErrorKind::Pipeline
        } else {
            ErrorKind::Decode
        };
        Self::build(
            kind,
            format!("{} ({})", err.message(), err.domain().as_str()),
        )
    }
}

impl From<gstreamer::glib::BoolError> for Error {
    /// [`Pipeline`](ErrorKind::Pipeline): a GStreamer call failed while building the pipeline.
    fn from(err: gstreamer::glib::BoolError) -> Self {
        Self::build(
            ErrorKind::Pipeline,
            format!("{} (in {})", err.message, err.function),
        )
    }
}

impl From<gstreamer::StateChangeError> for Error {
    /// [`Pipeline`](ErrorKind::Pipeline): the pipeline refused a state change.
    fn from(_: gstreamer::StateChangeError) -> Self {
        Self::build(
            ErrorKind::Pipeline,
            "pipeline state change failed".to_owned(),
        )
    }
}

/// Strips a namespace prefix (`aws.protocoltests#Code`) and a URL suffix
/// (`Code:http://internal.amazon.com/…`) from an AWS error code, like the AWS SDKs do.
fn sanitize_error_code(code: &str) -> &str {
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

/// The kind of a credentials-provider failure anywhere in `err`'s source chain, by its type
/// (`CredentialsError`), never by its text: a provider that failed or timed out (STS, IMDS or
/// the ECS endpoint answering 503, say) is transient, credentials that are not there or a
/// provider configured wrongly are fatal.
fn credentials_kind(err: &(dyn std::error::Error + 'static)) -> Option<ErrorKind> {
    use aws_credential_types::provider::error::CredentialsError;
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(credentials) = e.downcast_ref::<CredentialsError>() {
            return Some(match credentials {
                CredentialsError::ProviderTimedOut(_) => ErrorKind::Timeout,
                CredentialsError::ProviderError(_) => ErrorKind::ServiceUnavailable,
                CredentialsError::CredentialsNotLoaded(_) => ErrorKind::NotAuthorized,
                CredentialsError::InvalidConfiguration(_) => ErrorKind::InvalidConfig,
                // `Unhandled` and variants added later: a provider failure of unknown cause,
                // retried like one that failed.
                _ => ErrorKind::ServiceUnavailable,
            });
        }
        next = e.source();
    }
    None
}

/// The longest error body text kept in a message.
const MAX_BODY_TEXT: usize = 300;

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

/// The `Display` of `err` and of its sources, joined with `": "`, skipping a source whose
/// text is already included.
fn chain_text(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !cause_text.is_empty() && !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

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
