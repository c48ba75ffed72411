//! The master and media playlists of an HLS session.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Query, State as AxState};
use axum::response::Response;

use super::request::{faulted, hls_result, with_session};
use super::{LIVE_WINDOW, in_range, live_recent, selector_time};
use crate::http::{KvsError, rfc3339_millis};
use crate::session::{Discontinuity, HlsRequest, PlaybackMode, Session, encode_query_value};
use crate::store::{State, StoredFragment, StreamState};

/// KVS: gaps or overlaps above 50 ms are discontinuities (ON_DISCONTINUITY).
const DISCONTINUITY_GAP: Duration = Duration::from_millis(50);

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
    audio_rendition: bool,
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
    // fMP4 segments need version 7 (EXT-X-MAP in a media playlist); TS segments version 3.
    let _ = writeln!(
        out,
        "#EXT-X-VERSION:{}",
        if session.mpeg_ts { 3 } else { 7 }
    );
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
        if audio_rendition {
            // One audio configuration: one init segment.
            if previous_generation.is_none() {
                let _ = writeln!(
                    out,
                    "#EXT-X-MAP:URI=\"getMP4InitFragment.mp4?SessionToken={token}&TrackNumber=2\""
                );
                previous_generation = Some(f.codec_generation);
            }
        } else if !session.mpeg_ts && previous_generation != Some(f.codec_generation) {
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
        let segment = if session.mpeg_ts {
            "getTSFragment.ts"
        } else {
            "getMP4MediaFragment.mp4"
        };
        let track = if audio_rendition { 2 } else { 1 };
        let _ = writeln!(
            out,
            "{segment}?FragmentNumber={local}&SessionToken={token}&TrackNumber={track}"
        );
    }
    if complete {
        let _ = writeln!(out, "#EXT-X-ENDLIST");
    }
    Ok(out)
}

/// The `CODECS` attribute of a track (RFC 6381; ISO/IEC 14496-15 annex E for HEVC), from its
/// configuration record.
fn codecs_attribute(track: &crate::mp4::VideoTrack) -> String {
    let c = &track.config;
    match track.codec {
        crate::VideoCodec::H264 if c.len() >= 4 => {
            format!("avc1.{:02x}{:02x}{:02x}", c[1], c[2], c[3])
        }
        crate::VideoCodec::H264 => "avc1.42e01e".to_owned(),
        crate::VideoCodec::H265 if c.len() >= 13 => {
            let space = ["", "A", "B", "C"][usize::from(c[1] >> 6)];
            let tier = if c[1] & 0x20 != 0 { 'H' } else { 'L' };
            let profile = c[1] & 0x1f;
            let compat = u32::from_be_bytes([c[2], c[3], c[4], c[5]]).reverse_bits();
            let mut constraints: Vec<String> = c[6..12].iter().map(|b| format!("{b:X}")).collect();
            while constraints.len() > 1 && constraints.last().is_some_and(|b| b == "0") {
                constraints.pop();
            }
            format!(
                "hvc1.{space}{profile}.{compat:X}.{tier}{}.{}",
                c[12],
                constraints.join(".")
            )
        }
        crate::VideoCodec::H265 => "hvc1.1.6.L93.B0".to_owned(),
    }
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
    let mut codecs = codecs_attribute(&newest.track);
    if newest.audio_decode_time.is_some() && !session.mpeg_ts {
        // AAC-LC.
        codecs.push_str(",mp4a.40.2");
    }
    let bandwidth = list
        .iter()
        .map(|f| (f.media.len() as f64 * 8.0 / f.duration.as_secs_f64().max(0.001)) as u64)
        .max()
        .unwrap_or(1_000_000);
    let fps = f64::from(newest.frame_count()) / newest.duration.as_secs_f64().max(0.001);
    if stream.audio_separate && newest.audio_decode_time.is_some() && !session.mpeg_ts {
        let token = encode_query_value(token);
        return Ok(format!(
            "#EXTM3U\n#EXT-X-VERSION:4\n#EXT-X-MEDIA:TYPE=AUDIO,GROUP-ID=\"audio\",NAME=\"Track 2\",DEFAULT=YES,AUTOSELECT=YES,URI=\"getHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber=2\"\n#EXT-X-STREAM-INF:CODECS=\"{codecs}\",RESOLUTION={}x{},FRAME-RATE={fps:.1},BANDWIDTH={bandwidth},AUDIO=\"audio\"\ngetHLSMediaPlaylist.m3u8?SessionToken={token}&TrackNumber=1\n",
            newest.track.width, newest.track.height
        ));
    }
    Ok(format!(
        "#EXTM3U\n#EXT-X-VERSION:1\n#EXT-X-STREAM-INF:CODECS=\"{codecs}\",RESOLUTION={}x{},FRAME-RATE={fps:.1},BANDWIDTH={bandwidth}\ngetHLSMediaPlaylist.m3u8?SessionToken={}&TrackNumber=1\n",
        newest.track.width,
        newest.track.height,
        encode_query_value(token)
    ))
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
            let audio = params.get("TrackNumber").is_some_and(|t| t == "2");
            media_playlist(session, stream, token, audio)
        },
    )
    .map(|(text, failure)| faulted(Bytes::from(text), failure, "application/x-mpegURL"));
    hls_result(&state, result)
}
