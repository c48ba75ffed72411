//! The init and media fragments of an HLS session, with the faults that cut or stall a body.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State as AxState};
use axum::http::{HeaderValue, header};
use axum::response::Response;
use futures_util::StreamExt as _;

use super::request::{faulted, hls_result, with_session, with_type};
use crate::faults::Failure;
use crate::http::KvsError;
use crate::mp4;
use crate::session::{HlsRequest, Session};
use crate::store::{State, StoredFragment, StreamState};

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

pub(crate) async fn init(
    AxState(state): AxState<Arc<State>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = with_session(&state, HlsRequest::Init, &params, |session, stream| {
        if params.get("TrackNumber").is_some_and(|t| t == "2") {
            let silence = crate::audio::silence().map_err(|_| KvsError::internal())?;
            return Ok(Bytes::from(mp4::audio_init_segment(&silence.track)));
        }
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
        if params.get("TrackNumber").is_some_and(|t| t == "2") {
            // The separate audio rendition: the fragment's AAC frames alone.
            let time = fragment.audio_decode_time.unwrap_or(0);
            let origin = session.decode_origin.map_or(0, |origin| {
                u64::try_from(
                    u128::from(origin) * u128::from(crate::audio::SAMPLE_RATE)
                        / u128::from(fragment.timescale.max(1)),
                )
                .unwrap_or(0)
            });
            let sequence = u32::try_from(fragment.index % u64::from(u32::MAX)).unwrap_or(0) + 1;
            let media = Bytes::from(mp4::audio_media_segment(
                sequence,
                time.saturating_sub(origin),
                &fragment.audio_frames,
            ));
            return Ok((
                media,
                stream.faults.reset_fragments(),
                stream.faults.stall(),
            ));
        }
        let media = match session.decode_origin {
            Some(origin) => {
                let mut bytes = fragment.media.to_vec();
                let mut ok = mp4::set_base_media_decode_time(
                    &mut bytes,
                    fragment.decode_time.saturating_sub(origin),
                );
                // The audio track moves by the same time, in its own ticks.
                if let Some(audio) = fragment
                    .audio_decode_time
                    .filter(|_| !stream.audio_separate)
                {
                    let origin_audio = u64::try_from(
                        u128::from(origin) * u128::from(crate::audio::SAMPLE_RATE)
                            / u128::from(fragment.timescale.max(1)),
                    )
                    .unwrap_or(0);
                    ok &=
                        mp4::set_audio_decode_time(&mut bytes, audio.saturating_sub(origin_audio));
                }
                if !ok {
                    tracing::warn!(
                        "cannot rewrite the decode time of fragment {}",
                        fragment.index
                    );
                }
                Bytes::from(bytes)
            }
            None => fragment.media.clone(),
        };
        let media = match stream.tfdt_version_0 {
            true => mp4::tfdt_as_version_0(&media).map_or(media, Bytes::from),
            false => media,
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
pub(super) fn fragment_response(
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

/// `GET /hls/v1/getTSFragment.ts`: one fragment as an MPEG-TS segment (`MPEG_TS` sessions).
pub(crate) async fn ts_fragment(
    AxState(state): AxState<Arc<State>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let result = with_session(&state, HlsRequest::Fragment, &params, |session, stream| {
        if !session.mpeg_ts {
            return Err(KvsError::invalid_argument(
                "getTSFragment.ts is served to MPEG_TS sessions only; this session is FRAGMENTED_MP4",
            ));
        }
        let fragment = fragment_by_local(session, stream, &params)?.ok_or_else(|| {
            KvsError::invalid_argument("The FragmentNumber query parameter is missing")
        })?;
        let decode_time = fragment
            .decode_time
            .saturating_sub(session.decode_origin.unwrap_or(0));
        let media = Bytes::from(crate::ts::media_segment_ts(
            &fragment.track,
            decode_time,
            &fragment.samples,
        ));
        Ok((media, stream.faults.reset_fragments(), stream.faults.stall()))
    })
    .map(|((media, reset, stall), failure)| match failure {
        Some(Failure::Reset) => fragment_response(media, true, None, "video/MP2T"),
        Some(Failure::Corrupt | Failure::GarbledMedia) => {
            // Every packet's sync byte gone: no demuxer accepts it.
            let mut bad = media.to_vec();
            for p in bad.chunks_mut(188) {
                p[0] = 0;
            }
            with_type(Bytes::from(bad), "video/MP2T")
        }
        _ => fragment_response(media, reset, stall, "video/MP2T"),
    });
    hls_result(&state, result)
}
