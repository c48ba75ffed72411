//! The archived-media API (GetHLSStreamingSessionURL, GetClip) and the HLS endpoints.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxState};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::Deserialize;
use serde_json::json;

use super::control::{resolve_stream, respond};
use super::faults::{Failure, Request};
use super::http::{
    KvsError, from_epoch_seconds, insert_request_id, json_response, parse_json, rfc3339_millis,
    to_millis,
};
use super::mp4;
use super::session::{
    Discontinuity, HlsRequest, PlaybackMode, Selector, Session, encode_query_value, new_token,
};
use super::store::{State, StoredFragment, StreamState, StreamStatus};

/// KVS: LIVE requests fail when no fragment was ingested in the last 30 s.
const LIVE_WINDOW: Duration = Duration::from_secs(30);
/// KVS: gaps or overlaps above 50 ms are discontinuities (ON_DISCONTINUITY).
const DISCONTINUITY_GAP: Duration = Duration::from_millis(50);
/// KVS: at most this many active HLS sessions per stream; creating one more closes the oldest.
pub(crate) const MAX_ACTIVE_SESSIONS: usize = 5;
/// Sessions that stopped working (expired, revoked, closed) are forgotten after this long.
const FORGET_SESSIONS_AFTER: Duration = Duration::from_secs(3600);
/// GetClip returns at most 200 fragments …
const CLIP_MAX_FRAGMENTS: usize = 200;
/// … or 100 MB of media.
const CLIP_MAX_BYTES: usize = 100 * 1024 * 1024;

/// `TimestampRange` of the archived-media requests (epoch seconds).
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TimestampRange {
    pub start_timestamp: Option<f64>,
    pub end_timestamp: Option<f64>,
}

/// `HLSFragmentSelector`, `ClipFragmentSelector` and `FragmentSelector` share this shape.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
pub(super) struct FragmentSelector {
    pub fragment_selector_type: Option<String>,
    pub timestamp_range: Option<TimestampRange>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct GetHlsInput {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
    playback_mode: Option<String>,
    #[serde(rename = "HLSFragmentSelector")]
    hls_fragment_selector: Option<FragmentSelector>,
    container_format: Option<String>,
    discontinuity_mode: Option<String>,
    display_fragment_timestamp: Option<String>,
    expires: Option<i64>,
    max_media_playlist_fragment_results: Option<i64>,
}

/// `FragmentSelectorType` (SERVER_TIMESTAMP when absent, KVS's default).
pub(super) fn parse_selector(value: Option<&str>) -> Result<Selector, KvsError> {
    match value.unwrap_or("SERVER_TIMESTAMP") {
        "PRODUCER_TIMESTAMP" => Ok(Selector::Producer),
        "SERVER_TIMESTAMP" => Ok(Selector::Server),
        other => Err(KvsError::invalid_argument(format!(
            "FragmentSelectorType '{other}' is not valid: it must be PRODUCER_TIMESTAMP or SERVER_TIMESTAMP"
        ))),
    }
}

/// An optional epoch-seconds timestamp field.
pub(super) fn parse_time(field: &str, value: Option<f64>) -> Result<Option<SystemTime>, KvsError> {
    match value {
        None => Ok(None),
        Some(v) => from_epoch_seconds(v).map(Some).ok_or_else(|| {
            KvsError::invalid_argument(format!("{field} {v} is not a valid timestamp"))
        }),
    }
}

/// The fragment's start time for `selector`, at KVS's millisecond precision.
pub(super) fn selector_time(fragment: &StoredFragment, selector: Selector) -> SystemTime {
    to_millis(match selector {
        Selector::Producer => fragment.producer_start,
        Selector::Server => fragment.server_start,
    })
}

/// Checks that the stream's media can be served over HLS (or as a clip).
fn check_playable(stream: &StreamState) -> Result<(), KvsError> {
    if stream.info.status != StreamStatus::Active {
        return Err(KvsError::not_found(format!(
            "The stream {} is not ACTIVE (status {})",
            stream.info.name,
            stream.info.status.as_str()
        )));
    }
    if stream.info.retention_hours == 0 {
        return Err(KvsError::new(
            StatusCode::BAD_REQUEST,
            "NoDataRetentionException",
            format!(
                "The stream {} does not retain data (DataRetentionInHours is 0)",
                stream.info.name
            ),
        ));
    }
    if !stream.info.media_type.is_empty() && stream.info.media_type != "video/h264" {
        return Err(KvsError::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedStreamMediaTypeException",
            format!(
                "The media type {} of stream {} is not supported (the emulator serves video/h264)",
                stream.info.media_type, stream.info.name
            ),
        ));
    }
    Ok(())
}

fn live_recent(stream: &StreamState) -> bool {
    stream
        .newest_server_end()
        .is_some_and(|end| end + LIVE_WINDOW >= SystemTime::now())
}

fn in_range(f: &StoredFragment, s: &Session) -> bool {
    let t = selector_time(f, s.selector);
    s.start.is_none_or(|start| t >= start) && s.end.is_none_or(|end| t <= end)
}

pub(crate) async fn get_hls_streaming_session_url(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "GetHLSStreamingSessionURL", &headers, || {
        let input: GetHlsInput = parse_json(&body)?;
        let name = resolve_stream(
            &state,
            input.stream_name.as_deref(),
            input.stream_arn.as_deref(),
        )?;
        let mode = match input.playback_mode.as_deref().unwrap_or("LIVE") {
            "LIVE" => PlaybackMode::Live,
            "LIVE_REPLAY" => PlaybackMode::LiveReplay,
            "ON_DEMAND" => PlaybackMode::OnDemand,
            other => {
                return Err(KvsError::invalid_argument(format!(
                    "PlaybackMode '{other}' is not valid: it must be LIVE, LIVE_REPLAY or ON_DEMAND"
                )));
            }
        };
        let selector_input = input.hls_fragment_selector.unwrap_or_default();
        let selector = parse_selector(selector_input.fragment_selector_type.as_deref())?;
        let (start, end) = match selector_input.timestamp_range {
            Some(range) => (
                parse_time("StartTimestamp", range.start_timestamp)?,
                parse_time("EndTimestamp", range.end_timestamp)?,
            ),
            None => (None, None),
        };
        match mode {
            PlaybackMode::Live if start.is_some() || end.is_some() => {
                return Err(KvsError::invalid_argument(
                    "TimestampRange must not be set when PlaybackMode is LIVE",
                ));
            }
            PlaybackMode::OnDemand if start.is_none() || end.is_none() => {
                return Err(KvsError::invalid_argument(
                    "TimestampRange with StartTimestamp and EndTimestamp is required when PlaybackMode is ON_DEMAND",
                ));
            }
            PlaybackMode::LiveReplay if start.is_none() => {
                return Err(KvsError::invalid_argument(
                    "TimestampRange with StartTimestamp is required when PlaybackMode is LIVE_REPLAY",
                ));
            }
            _ => {}
        }
        if let (Some(s), Some(e)) = (start, end) {
            if e <= s {
                return Err(KvsError::invalid_argument(
                    "EndTimestamp must be later than StartTimestamp",
                ));
            }
            if e.duration_since(s).unwrap_or_default() > Duration::from_secs(24 * 3600) {
                return Err(KvsError::invalid_argument(
                    "The TimestampRange must not be longer than 24 hours",
                ));
            }
        }
        match input
            .container_format
            .as_deref()
            .unwrap_or("FRAGMENTED_MP4")
        {
            "FRAGMENTED_MP4" => {}
            "MPEG_TS" => {
                return Err(KvsError::invalid_argument(
                    "ContainerFormat MPEG_TS is not supported by the kvs-frames emulator; use FRAGMENTED_MP4",
                ));
            }
            other => {
                return Err(KvsError::invalid_argument(format!(
                    "ContainerFormat '{other}' is not valid: it must be FRAGMENTED_MP4 or MPEG_TS"
                )));
            }
        }
        let discontinuity = match input.discontinuity_mode.as_deref() {
            None => match selector {
                Selector::Server => Discontinuity::Always,
                Selector::Producer => Discontinuity::Never,
            },
            Some("ALWAYS") => Discontinuity::Always,
            Some("NEVER") => Discontinuity::Never,
            Some("ON_DISCONTINUITY") => Discontinuity::OnGap,
            Some(other) => {
                return Err(KvsError::invalid_argument(format!(
                    "DiscontinuityMode '{other}' is not valid: it must be ALWAYS, NEVER or ON_DISCONTINUITY"
                )));
            }
        };
        let display_timestamps = match input
            .display_fragment_timestamp
            .as_deref()
            .unwrap_or("NEVER")
        {
            "ALWAYS" => true,
            "NEVER" => false,
            other => {
                return Err(KvsError::invalid_argument(format!(
                    "DisplayFragmentTimestamp '{other}' is not valid: it must be ALWAYS or NEVER"
                )));
            }
        };
        let expires = input.expires.unwrap_or(300);
        if !(300..=43_200).contains(&expires) {
            return Err(KvsError::invalid_argument(format!(
                "Expires {expires} is out of range: it must be between 300 and 43200 seconds"
            )));
        }
        let default_max = if mode == PlaybackMode::OnDemand {
            1000
        } else {
            5
        };
        let max_results = input
            .max_media_playlist_fragment_results
            .unwrap_or(default_max);
        if !(1..=5000).contains(&max_results) {
            return Err(KvsError::invalid_argument(format!(
                "MaxMediaPlaylistFragmentResults {max_results} is out of range: it must be between 1 and 5000"
            )));
        }
        let mut streams = state.streams.lock();
        let stream = streams
            .get_mut(&name)
            .ok_or_else(|| KvsError::stream_not_found(&name))?;
        if stream.faults.throttled() {
            return Err(KvsError::throttled());
        }
        match stream.faults.take(Request::SessionUrl) {
            Some(Failure::Throttled) => return Err(KvsError::throttled()),
            Some(Failure::Forbidden) => {
                return Err(KvsError::new(
                    StatusCode::FORBIDDEN,
                    "NotAuthorizedException",
                    "User: arn:aws:iam::123456789012:user/emulator is not authorized to perform: kinesisvideo:GetHLSStreamingSessionURL",
                ));
            }
            Some(_) => return Err(KvsError::internal()),
            None => {}
        }
        check_playable(stream)?;
        let mut session = Session::new(
            name.clone(),
            mode,
            selector,
            discontinuity,
            display_timestamps,
            usize::try_from(max_results).unwrap_or(5),
            start,
            end,
            state.session_now() + Duration::from_secs(u64::try_from(expires).unwrap_or(300)),
            0,
            0,
        );
        let base = match mode {
            PlaybackMode::Live => {
                if !live_recent(stream) {
                    return Err(KvsError::no_fragments());
                }
                let skip = stream.fragments.len().saturating_sub(session.max_results);
                stream.fragments.get(skip)
            }
            _ => stream.fragments.iter().find(|f| in_range(f, &session)),
        };
        let Some(base) = base else {
            return Err(KvsError::no_fragments());
        };
        let stream_name = name.clone();
        session.base_index = base.index;
        session.base_generation = base.codec_generation;
        if stream.decode_time_origin == super::DecodeTimeOrigin::Session {
            session.decode_origin = Some(base.decode_time);
        }
        drop(streams);
        let token = new_token();
        state.issued_tokens.lock().push(token.clone());
        let url = format!(
            "{}/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken={}",
            state.settings.data_endpoint,
            encode_query_value(&token)
        );
        let now = state.session_now();
        let mut sessions = state.sessions.lock();
        // Tokens that stopped working long ago are forgotten (their requests get 403 either way).
        sessions.retain(|_, s| {
            !(s.closed || s.expired(now)) || s.created.elapsed() < FORGET_SESSIONS_AFTER
        });
        // KVS: at most 5 active sessions per stream; creating a sixth closes the oldest.
        let mut active: Vec<(&String, std::time::Instant)> = sessions
            .iter()
            .filter(|(_, s)| s.stream == stream_name && !s.closed && !s.expired(now))
            .map(|(token, s)| (token, s.created))
            .collect();
        active.sort_by_key(|(_, created)| *created);
        let excess = (active.len() + 1).saturating_sub(MAX_ACTIVE_SESSIONS);
        let closing: Vec<String> = active
            .iter()
            .take(excess)
            .map(|(t, _)| (*t).clone())
            .collect();
        for token in closing {
            if let Some(old) = sessions.get_mut(&token) {
                tracing::debug!(stream = %stream_name, "sixth HLS session: closing the oldest");
                old.closed = true;
            }
        }
        sessions.insert(token, session);
        drop(sessions);
        state.count_sessions_closed(excess);
        Ok(json_response(json!({ "HLSStreamingSessionURL": url })))
    })
}

/// The HLS request context: the session's parameters and the stream, both locked briefly.
/// One-shot faults ([`Faults::fail_next`](super::Faults::fail_next)) that end in an error
/// response are applied here; [`Failure::Reset`], [`Failure::Corrupt`] and
/// [`Failure::GarbledMedia`] are returned with the result for the handler to apply to its body.
fn with_session<T>(
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
    if let Some(track) = params.get("TrackNumber").filter(|t| *t != "1") {
        return Err(KvsError::invalid_argument(format!(
            "TrackNumber {track} does not exist in this session"
        )));
    }
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
fn faulted(body: Bytes, failure: Option<Failure>, content_type: &'static str) -> Response {
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

fn hls_result(state: &State, result: Result<Response, KvsError>) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(code = error.code, message = %error.message, "HLS error response");
            state.count_error(error.code);
            error.into_response()
        }
    }
}

fn with_type(body: impl Into<Body>, content_type: &'static str) -> Response {
    let mut response = (StatusCode::OK, body.into()).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    insert_request_id(headers);
    response
}

/// Fragments the media playlist lists now, and whether the playlist is complete.
fn playlist_fragments<'a>(
    session: &Session,
    stream: &'a StreamState,
) -> Result<(Vec<&'a Arc<StoredFragment>>, bool), KvsError> {
    let candidates = stream
        .fragments
        .iter()
        .filter(|f| f.index >= session.base_index);
    match session.mode {
        PlaybackMode::Live => {
            if !live_recent(stream) {
                return Err(KvsError::no_fragments());
            }
            let all: Vec<_> = candidates.collect();
            let skip = all.len().saturating_sub(session.max_results);
            Ok((all[skip..].to_vec(), false))
        }
        PlaybackMode::OnDemand => {
            let list: Vec<_> = candidates
                .filter(|f| in_range(f, session))
                .take(session.max_results)
                .collect();
            if list.is_empty() {
                return Err(KvsError::no_fragments());
            }
            Ok((list, true))
        }
        PlaybackMode::LiveReplay => {
            // Fragments are added as the duration of the previous ones elapses.
            let elapsed = session.created.elapsed();
            let in_range: Vec<_> = candidates.filter(|f| in_range(f, session)).collect();
            let mut added = 0;
            let mut clock = Duration::ZERO;
            for f in &in_range {
                if clock > elapsed {
                    break;
                }
                added += 1;
                clock += f.duration;
            }
            let closed = session.end.is_some_and(|end| {
                stream
                    .fragments
                    .back()
                    .is_some_and(|newest| selector_time(newest, session.selector) > end)
                    || end + LIVE_WINDOW < SystemTime::now()
            });
            let complete = closed && added == in_range.len();
            let shown = &in_range[..added];
            let skip = shown.len().saturating_sub(session.max_results);
            if shown.is_empty() {
                return Err(KvsError::no_fragments());
            }
            Ok((shown[skip..].to_vec(), complete))
        }
    }
}

fn format_duration(d: Duration) -> String {
    let s = format!("{:.3}", d.as_secs_f64());
    let s = s.trim_end_matches('0');
    s.trim_end_matches('.').to_owned()
}

fn media_playlist(
    session: &Session,
    stream: &StreamState,
    token: &str,
) -> Result<String, KvsError> {
    let (list, complete) = playlist_fragments(session, stream)?;
    let token = encode_query_value(token);
    let target = list
        .iter()
        .map(|f| f.duration.as_secs_f64().ceil() as u64)
        .max()
        .unwrap_or(1)
        .max(1);
    let first_local = list.first().map_or(0, |f| f.index - session.base_index);
    let mut out = String::with_capacity(256 + list.len() * 200);
    let _ = writeln!(out, "#EXTM3U");
    let _ = writeln!(out, "#EXT-X-VERSION:7");
    let _ = writeln!(out, "#EXT-X-TARGETDURATION:{target}");
    let _ = writeln!(out, "#EXT-X-MEDIA-SEQUENCE:{first_local}");
    if session.mode == PlaybackMode::OnDemand {
        let _ = writeln!(out, "#EXT-X-PLAYLIST-TYPE:VOD");
    }
    let _ = writeln!(out, "#EXT-X-INDEPENDENT-SEGMENTS");
    let mut previous_generation = None;
    for f in &list {
        let local = f.index - session.base_index;
        let previous = f
            .index
            .checked_sub(1)
            .and_then(|i| i.checked_sub(stream.fragments.front()?.index))
            .and_then(|pos| stream.fragments.get(usize::try_from(pos).ok()?));
        let codec_change = previous.is_some_and(|p| p.codec_generation != f.codec_generation);
        let gap = previous.is_some_and(|p| {
            let expected = selector_time(p, session.selector) + p.duration;
            let actual = selector_time(f, session.selector);
            let diff = actual
                .duration_since(expected)
                .or_else(|_| expected.duration_since(actual))
                .unwrap_or_default();
            diff > DISCONTINUITY_GAP
        });
        let discontinuity = match session.discontinuity {
            Discontinuity::Always => true,
            Discontinuity::Never => false,
            Discontinuity::OnGap => gap || codec_change,
        };
        if discontinuity {
            let _ = writeln!(out, "#EXT-X-DISCONTINUITY");
        }
        if previous_generation != Some(f.codec_generation) {
            if f.codec_generation == session.base_generation {
                let _ = writeln!(
                    out,
                    "#EXT-X-MAP:URI=\"getMP4InitFragment.mp4?SessionToken={token}&TrackNumber=1\""
                );
            } else {
                let _ = writeln!(
                    out,
                    "#EXT-X-MAP:URI=\"getMP4InitFragment.mp4?FragmentNumber={local}&SessionToken={token}&TrackNumber=1\""
                );
            }
            previous_generation = Some(f.codec_generation);
        }
        if session.display_timestamps {
            let _ = writeln!(
                out,
                "#EXT-X-PROGRAM-DATE-TIME:{}",
                rfc3339_millis(selector_time(f, session.selector))
            );
        }
        let _ = writeln!(out, "#EXTINF:{},", format_duration(f.duration));
        let _ = writeln!(
            out,
            "getMP4MediaFragment.mp4?FragmentNumber={local}&SessionToken={token}&TrackNumber=1"
        );
    }
    if complete {
        let _ = writeln!(out, "#EXT-X-ENDLIST");
    }
    Ok(out)
}

fn master_playlist(
    session: &Session,
    stream: &StreamState,
    token: &str,
) -> Result<String, KvsError> {
    let (list, _) = playlist_fragments(session, stream)?;
    let Some(newest) = list.last() else {
        return Err(KvsError::no_fragments());
    };
    let avcc = &newest.track.avcc;
    let codecs = if avcc.len() >= 4 {
        format!("avc1.{:02x}{:02x}{:02x}", avcc[1], avcc[2], avcc[3])
    } else {
        "avc1.42e01e".to_owned()
    };
    let bandwidth = list
        .iter()
        .map(|f| (f.media.len() as f64 * 8.0 / f.duration.as_secs_f64().max(0.001)) as u64)
        .max()
        .unwrap_or(1_000_000);
    let fps = f64::from(newest.frame_count()) / newest.duration.as_secs_f64().max(0.001);
    Ok(format!(
        "#EXTM3U\n#EXT-X-VERSION:1\n#EXT-X-STREAM-INF:CODECS=\"{codecs}\",RESOLUTION={}x{},FRAME-RATE={fps:.1},BANDWIDTH={bandwidth}\ngetHLSMediaPlaylist.m3u8?SessionToken={}&TrackNumber=1\n",
        newest.track.width,
        newest.track.height,
        encode_query_value(token)
    ))
}

fn fragment_by_local(
    session: &Session,
    stream: &StreamState,
    params: &HashMap<String, String>,
) -> Result<Option<Arc<StoredFragment>>, KvsError> {
    let Some(number) = params.get("FragmentNumber") else {
        return Ok(None);
    };
    let local: u64 = number.parse().map_err(|_| {
        KvsError::invalid_argument(format!("FragmentNumber '{number}' is not valid"))
    })?;
    let index = session.base_index.saturating_add(local);
    let front = stream.fragments.front().map_or(0, |f| f.index);
    let found = index
        .checked_sub(front)
        .and_then(|pos| stream.fragments.get(usize::try_from(pos).ok()?))
        .filter(|f| f.index == index)
        .cloned();
    found.map(Some).ok_or_else(|| {
        KvsError::not_found(format!(
            "The requested fragment {number} was not found in the stream"
        ))
    })
}

pub(crate) async fn master(
    AxState(state): AxState<Arc<State>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = with_session(&state, HlsRequest::Master, &params, |session, stream| {
        let token = params.get("SessionToken").map_or("", String::as_str);
        master_playlist(session, stream, token)
    })
    .map(|(text, failure)| faulted(Bytes::from(text), failure, "application/x-mpegURL"));
    hls_result(&state, result)
}

pub(crate) async fn media(
    AxState(state): AxState<Arc<State>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = with_session(
        &state,
        HlsRequest::MediaPlaylist,
        &params,
        |session, stream| {
            let token = params.get("SessionToken").map_or("", String::as_str);
            media_playlist(session, stream, token)
        },
    )
    .map(|(text, failure)| faulted(Bytes::from(text), failure, "application/x-mpegURL"));
    hls_result(&state, result)
}

pub(crate) async fn init(
    AxState(state): AxState<Arc<State>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = with_session(&state, HlsRequest::Init, &params, |session, stream| {
        let fragment = match fragment_by_local(session, stream, &params)? {
            Some(f) => f,
            None => stream
                .fragments
                .iter()
                .find(|f| {
                    f.index >= session.base_index && f.codec_generation == session.base_generation
                })
                .or_else(|| {
                    stream
                        .fragments
                        .iter()
                        .find(|f| f.index >= session.base_index)
                })
                .cloned()
                .ok_or_else(KvsError::no_fragments)?,
        };
        Ok(fragment.init.clone())
    })
    .map(|(bytes, failure)| faulted(bytes, failure, "video/mp4"));
    hls_result(&state, result)
}

pub(crate) async fn fragment(
    AxState(state): AxState<Arc<State>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = with_session(&state, HlsRequest::Fragment, &params, |session, stream| {
        let fragment = fragment_by_local(session, stream, &params)?.ok_or_else(|| {
            KvsError::invalid_argument("The FragmentNumber query parameter is missing")
        })?;
        let media = match session.decode_origin {
            Some(origin) => {
                let mut bytes = fragment.media.to_vec();
                if !mp4::set_base_media_decode_time(
                    &mut bytes,
                    fragment.decode_time.saturating_sub(origin),
                ) {
                    tracing::warn!(
                        "cannot rewrite the decode time of fragment {}",
                        fragment.index
                    );
                }
                Bytes::from(bytes)
            }
            None => fragment.media.clone(),
        };
        Ok((
            media,
            stream.faults.reset_fragments(),
            stream.faults.stall(),
        ))
    })
    .map(|((media, reset, stall), failure)| match failure {
        Some(Failure::Corrupt) => with_type(mp4::garble(&media), "video/mp4"),
        Some(Failure::GarbledMedia) => with_type(mp4::garble_media(&media), "video/mp4"),
        Some(Failure::Reset) => fragment_response(media, true, None, "video/mp4"),
        _ => fragment_response(media, reset, stall, "video/mp4"),
    });
    hls_result(&state, result)
}

/// The body of a media fragment, possibly cut short (reset) or paused half-way (stall).
fn fragment_response(
    media: Bytes,
    reset: bool,
    stall: Option<Duration>,
    content_type: &'static str,
) -> Response {
    let total = media.len();
    if !reset && stall.is_none() {
        return with_type(media, content_type);
    }
    let half = media.slice(..total / 2);
    let rest = media.slice(total / 2..);
    let first = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(half) });
    let body = if reset {
        tracing::debug!("fault: resetting the connection half-way through a fragment");
        Body::from_stream(first.chain(futures_util::stream::once(async {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                "emulated connection reset",
            ))
        })))
    } else {
        let pause = stall.unwrap_or_default();
        Body::from_stream(first.chain(futures_util::stream::once(async move {
            tokio::time::sleep(pause).await;
            Ok(rest)
        })))
    };
    let mut response = with_type(body, content_type);
    if let Ok(value) = HeaderValue::from_str(&total.to_string()) {
        response.headers_mut().insert(header::CONTENT_LENGTH, value);
    }
    response
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct GetClipInput {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
    clip_fragment_selector: Option<FragmentSelector>,
}

pub(crate) async fn get_clip(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "GetClip", &headers, || {
        let input: GetClipInput = parse_json(&body)?;
        let name = resolve_stream(
            &state,
            input.stream_name.as_deref(),
            input.stream_arn.as_deref(),
        )?;
        let selector_input = input
            .clip_fragment_selector
            .ok_or_else(|| KvsError::invalid_argument("ClipFragmentSelector must be specified"))?;
        let selector = parse_selector(Some(
            selector_input
                .fragment_selector_type
                .as_deref()
                .unwrap_or("missing"),
        ))?;
        let range = selector_input.timestamp_range.unwrap_or_default();
        let start = parse_time("StartTimestamp", range.start_timestamp)?;
        let end = parse_time("EndTimestamp", range.end_timestamp)?;
        let (Some(start), Some(end)) = (start, end) else {
            return Err(KvsError::invalid_argument(
                "TimestampRange with StartTimestamp and EndTimestamp is required",
            ));
        };
        if end <= start {
            return Err(KvsError::invalid_argument(
                "EndTimestamp must be later than StartTimestamp",
            ));
        }
        if end.duration_since(start).unwrap_or_default() > Duration::from_secs(24 * 3600) {
            return Err(KvsError::invalid_argument(
                "The TimestampRange must not be longer than 24 hours",
            ));
        }
        let streams = state.streams.lock();
        let stream = streams
            .get(&name)
            .ok_or_else(|| KvsError::stream_not_found(&name))?;
        check_playable(stream)?;
        let mut chosen: Vec<Arc<StoredFragment>> = Vec::new();
        let mut bytes = 0usize;
        for f in &stream.fragments {
            let t = selector_time(f, selector);
            if t < start || t > end {
                continue;
            }
            if chosen.len() >= CLIP_MAX_FRAGMENTS || bytes + f.media.len() > CLIP_MAX_BYTES {
                break;
            }
            // One clip holds one codec configuration: stop at a change.
            if chosen
                .first()
                .is_some_and(|first| first.codec_generation != f.codec_generation)
            {
                break;
            }
            bytes += f.media.len();
            chosen.push(Arc::clone(f));
        }
        drop(streams);
        let Some(first) = chosen.first() else {
            return Err(KvsError::not_found(
                "No fragments found in the stream for the clip request.",
            ));
        };
        let samples: Vec<mp4::Sample> = chosen
            .iter()
            .flat_map(|f| f.samples.iter().cloned())
            .collect();
        let clip = mp4::progressive_mp4(&first.track, &samples);
        Ok(with_type(clip, "video/mp4"))
    })
}
