//! Conversions into [`Error`] from the errors of the AWS SDK (with credentials-provider
//! failures), reqwest, `std::io` and GStreamer.

use std::any::Any;
use std::fmt;

use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{Error, ErrorKind};
use crate::redact::redact_text;

impl Error {
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
