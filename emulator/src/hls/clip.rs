//! GetClip: one progressive MP4 of the fragments in a time range.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;

use super::request::with_type;
use super::{FragmentSelector, check_playable, parse_selector, parse_time, selector_time};
use crate::control::{resolve_stream, respond};
use crate::http::{KvsError, parse_json};
use crate::mp4;
use crate::store::{State, StoredFragment};

/// GetClip returns at most 200 fragments …
const CLIP_MAX_FRAGMENTS: usize = 200;
/// … or 100 MB of media.
const CLIP_MAX_BYTES: usize = 100 * 1024 * 1024;

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
        let rate = stream.rate;
        let with_audio = stream.audio;
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
        // Track 2: the AAC frames of each fragment's span (KVS's clips keep the audio track).
        let audio = match with_audio.then(crate::audio::silence) {
            Some(Ok(silence)) => {
                let mut frames = Vec::new();
                let mut delay = 0;
                for (i, f) in chosen.iter().enumerate() {
                    let from = rate.nanos(f.first_frame);
                    let to = rate.nanos(f.first_frame + u64::from(f.frame_count()));
                    let (first_sample, mut part) = crate::audio::frames_for(silence, from, to);
                    if i == 0 {
                        let from_samples =
                            from * u128::from(crate::audio::SAMPLE_RATE) / 1_000_000_000;
                        delay =
                            first_sample.saturating_sub(u64::try_from(from_samples).unwrap_or(0));
                    }
                    frames.append(&mut part);
                }
                Some((silence, frames, delay))
            }
            Some(Err(e)) => {
                tracing::warn!(stream = %name, error = %e, "clip without its audio track");
                None
            }
            None => None,
        };
        let clip_audio = audio
            .as_ref()
            .map(|(silence, frames, delay)| mp4::ClipAudio {
                track: &silence.track,
                samples: frames,
                delay: *delay,
            });
        let clip = mp4::progressive_mp4_with_audio(&first.track, &samples, clip_audio.as_ref());
        Ok(with_type(clip, "video/mp4"))
    })
}
