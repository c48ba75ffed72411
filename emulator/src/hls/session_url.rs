//! GetHLSStreamingSessionURL: checks the request's parameters, picks the session's first
//! fragment, issues the token and closes the oldest session beyond the per-stream limit.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use super::{
    FragmentSelector, MAX_ACTIVE_SESSIONS, check_playable, in_range, live_recent, parse_selector,
    parse_time,
};
use crate::control::{resolve_stream, respond};
use crate::faults::{Failure, Request};
use crate::http::{KvsError, json_response, parse_json};
use crate::session::{
    Discontinuity, PlaybackMode, Selector, Session, encode_query_value, new_token,
};
use crate::store::State;

/// Sessions that stopped working (expired, revoked, closed) are forgotten after this long.
const FORGET_SESSIONS_AFTER: Duration = Duration::from_secs(3600);

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
        let mpeg_ts = match input
            .container_format
            .as_deref()
            .unwrap_or("FRAGMENTED_MP4")
        {
            "FRAGMENTED_MP4" => false,
            "MPEG_TS" => true,
            other => {
                return Err(KvsError::invalid_argument(format!(
                    "ContainerFormat '{other}' is not valid: it must be FRAGMENTED_MP4 or MPEG_TS"
                )));
            }
        };
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
            Some(Failure::NoFragments) => return Err(KvsError::no_fragments()),
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
        session.mpeg_ts = mpeg_ts;
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
        if stream.decode_time_origin == crate::DecodeTimeOrigin::Session {
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
