//! The HLS request context (session token, track number, quotas, one-shot faults) and the
//! response helpers of the HLS endpoints.

use std::collections::HashMap;

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::MAX_ACTIVE_SESSIONS;
use super::segments::fragment_response;
use crate::faults::{Failure, Request};
use crate::http::{KvsError, insert_request_id};
use crate::session::{HlsRequest, Session};
use crate::store::{State, StreamState};

/// The HLS request context: the session's parameters and the stream, both locked briefly.
/// One-shot faults ([`Faults::fail_next`](crate::Faults::fail_next)) that end in an error
/// response are applied here; [`Failure::Reset`], [`Failure::Corrupt`] and
/// [`Failure::GarbledMedia`] are returned with the result for the handler to apply to its body.
pub(super) fn with_session<T>(
    state: &State,
    kind: HlsRequest,
    params: &HashMap<String, String>,
    f: impl FnOnce(&Session, &StreamState) -> Result<T, KvsError>,
) -> Result<(T, Option<Failure>), KvsError> {
    state.count_hls(kind);
    let token = params.get("SessionToken").ok_or_else(|| {
        KvsError::new(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            "The SessionToken query parameter is missing",
        )
    })?;
    let mut sessions = state.sessions.lock();
    let session = sessions.get_mut(token).ok_or_else(|| {
        KvsError::new(
            StatusCode::FORBIDDEN,
            "NotAuthorizedException",
            "The streaming session token is not valid",
        )
    })?;
    if session.closed {
        return Err(KvsError::new(
            StatusCode::FORBIDDEN,
            "NotAuthorizedException",
            format!(
                "The streaming session was closed: a newer session of the stream was created \
                 (at most {MAX_ACTIVE_SESSIONS} active HLS sessions per stream)"
            ),
        ));
    }
    if session.expired(state.session_now()) {
        return Err(KvsError::session_expired());
    }
    let mut streams = state.streams.lock();
    let stream = streams
        .get_mut(&session.stream)
        .ok_or_else(|| KvsError::stream_not_found(&session.stream))?;
    // Track 1 is the video; track 2 is a playlist of its own only for a separate audio
    // rendition.
    if let Some(track) = params.get("TrackNumber").filter(|t| *t != "1")
        && !(track == "2" && stream.audio && stream.audio_separate && !session.mpeg_ts)
    {
        return Err(KvsError::invalid_argument(format!(
            "TrackNumber {track} does not exist in this session"
        )));
    }
    if stream.faults.throttled() || !session.admit(kind) {
        return Err(KvsError::throttled());
    }
    if stream.faults.server_errors() {
        return Err(KvsError::internal());
    }
    let request = match kind {
        HlsRequest::Master => Request::MasterPlaylist,
        HlsRequest::MediaPlaylist => Request::MediaPlaylist,
        HlsRequest::Init => Request::InitSegment,
        HlsRequest::Fragment => Request::MediaFragment,
    };
    let failure = stream.faults.take(request);
    match failure {
        Some(Failure::ServerError) => return Err(KvsError::internal()),
        Some(Failure::Throttled) => return Err(KvsError::throttled()),
        Some(Failure::Forbidden) => return Err(KvsError::session_expired()),
        Some(Failure::NoFragments) => return Err(KvsError::no_fragments()),
        Some(Failure::Corrupt) if kind == HlsRequest::Init => {
            return Err(KvsError::internal());
        }
        Some(Failure::GarbledMedia) if kind != HlsRequest::Fragment => {
            return Err(KvsError::internal());
        }
        _ => {}
    }
    f(session, stream).map(|value| (value, failure))
}

/// The body of a successful HLS response, cut short by a [`Failure::Reset`] fault, or (a
/// playlist) without its `#EXTM3U` line for [`Failure::Corrupt`]: a body no HLS parser accepts,
/// whose rest still holds the session's token URLs.
pub(super) fn faulted(
    body: Bytes,
    failure: Option<Failure>,
    content_type: &'static str,
) -> Response {
    match failure {
        Some(Failure::Reset) => fragment_response(body, true, None, content_type),
        Some(Failure::Corrupt) => {
            let cut = body
                .iter()
                .position(|&b| b == b'\n')
                .map_or(body.len(), |i| i + 1);
            with_type(body.slice(cut..), content_type)
        }
        _ => with_type(body, content_type),
    }
}

pub(super) fn hls_result(state: &State, result: Result<Response, KvsError>) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(code = error.code, message = %error.message, "HLS error response");
            state.count_error(error.code);
            error.into_response()
        }
    }
}

pub(super) fn with_type(body: impl Into<Body>, content_type: &'static str) -> Response {
    let mut response = (StatusCode::OK, body.into()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    insert_request_id(headers);
    response
}
