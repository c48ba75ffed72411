//! The archived-media API (GetHLSStreamingSessionURL, GetClip) and the HLS endpoints.
//!
//! Split by concern: [`session_url`] validates GetHLSStreamingSessionURL and creates the
//! session, [`request`] checks an HLS request's session token, quotas and one-shot faults,
//! [`playlists`] writes the master and media playlists, [`segments`] serves the init and media
//! fragments and [`clip`] answers GetClip. This module holds what they share: the fragment
//! selector, timestamps and the checks that a stream can be played.

mod clip;
mod playlists;
mod request;
mod segments;
mod session_url;

use std::time::{Duration, SystemTime};

use axum::http::StatusCode;
use serde::Deserialize;

use super::http::{KvsError, from_epoch_seconds, to_millis};
use super::session::{Selector, Session};
use super::store::{StoredFragment, StreamState, StreamStatus};

pub(crate) use self::clip::get_clip;
pub(crate) use self::playlists::{master, media};
pub(crate) use self::segments::{fragment, init, ts_fragment};
pub(crate) use self::session_url::get_hls_streaming_session_url;

/// KVS: LIVE requests fail when no fragment was ingested in the last 30 s.
const LIVE_WINDOW: Duration = Duration::from_secs(30);
/// KVS: at most this many active HLS sessions per stream; creating one more closes the oldest.
pub(crate) const MAX_ACTIVE_SESSIONS: usize = 5;

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
    if !stream.info.media_type.is_empty()
        && !["video/h264", "video/h265"].contains(&stream.info.media_type.as_str())
    {
        return Err(KvsError::new(
            StatusCode::BAD_REQUEST,
            "UnsupportedStreamMediaTypeException",
            format!(
                "The media type {} of stream {} is not supported (the emulator serves video/h264 and video/h265)",
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
