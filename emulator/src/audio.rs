//! The audio of a stream whose camera has a microphone: AAC-LC, mono, 48 kHz, made once per
//! process by GStreamer (`audiotestsrc` silence → `avenc_aac`) and repeated: real AAC frames
//! that any decoder accepts, 1024 samples each, laid on the stream's timeline by
//! [`frames_for`].

use std::sync::OnceLock;

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use crate::error::{Error, ErrorKind, Result};
use crate::mp4::{AudioSample, AudioTrack};

/// Samples per second (and the audio track's timescale).
pub(crate) const SAMPLE_RATE: u32 = 48_000;
/// Samples per AAC frame.
pub(crate) const FRAME_SAMPLES: u32 = 1024;

/// The track and a run of encoded frames to repeat.
pub(crate) struct Silence {
    pub track: AudioTrack,
    pub frames: Vec<Bytes>,
}

/// The encoded silence (made on first use).
pub(crate) fn silence() -> Result<&'static Silence> {
    static SILENCE: OnceLock<std::result::Result<Silence, String>> = OnceLock::new();
    SILENCE
        .get_or_init(|| encode().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| Error::new(ErrorKind::Pipeline, format!("audio: {e}")))
}

fn encode() -> Result<Silence> {
    let pipeline_error = |e: String| Error::new(ErrorKind::Pipeline, e);
    gst::init().map_err(|e| pipeline_error(format!("GStreamer init: {e}")))?;
    let src = crate::elements::make("audiotestsrc")?;
    src.set_property_from_str("wave", "silence");
    src.set_property("num-buffers", 48i32);
    src.set_property("samplesperbuffer", FRAME_SAMPLES as i32);
    let raw = gst::Caps::builder("audio/x-raw")
        .field("rate", SAMPLE_RATE as i32)
        .field("channels", 1i32)
        .build();
    let filter = crate::elements::make("capsfilter")?;
    filter.set_property("caps", &raw);
    let convert = crate::elements::make("audioconvert")?;
    let encoder = crate::elements::make("avenc_aac")?;
    let parser = crate::elements::make("aacparse")?;
    let sink = gst_app::AppSink::builder()
        .caps(
            &gst::Caps::builder("audio/mpeg")
                .field("mpegversion", 4i32)
                .field("stream-format", "raw")
                .build(),
        )
        .sync(false)
        .build();
    let pipeline = gst::Pipeline::with_name("emulator-audio");
    let elements = [
        &src,
        &filter,
        &convert,
        &encoder,
        &parser,
        sink.upcast_ref(),
    ];
    pipeline
        .add_many(elements)
        .map_err(|e| pipeline_error(format!("audio pipeline: {e}")))?;
    gst::Element::link_many(elements).map_err(|e| pipeline_error(format!("audio link: {e}")))?;
    pipeline
        .set_state(gst::State::Playing)
        .map_err(|e| pipeline_error(format!("audio pipeline: {e}")))?;
    let mut frames = Vec::new();
    let mut config = None;
    while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(10)) {
        if config.is_none() {
            config = sample
                .caps()
                .and_then(|c| c.structure(0))
                .and_then(|s| s.get::<gst::Buffer>("codec_data").ok())
                .and_then(|b| b.map_readable().ok().map(|m| m.to_vec()));
        }
        if let Some(buffer) = sample.buffer()
            && let Ok(map) = buffer.map_readable()
        {
            frames.push(Bytes::copy_from_slice(map.as_slice()));
        }
    }
    let _ = pipeline.set_state(gst::State::Null);
    let config = config.ok_or_else(|| pipeline_error("avenc_aac gave no codec_data".into()))?;
    // The first frames carry the encoder's priming; the steady ones repeat cleanly.
    let frames: Vec<Bytes> = frames.into_iter().skip(4).collect();
    if frames.is_empty() {
        return Err(pipeline_error("avenc_aac gave no frames".into()));
    }
    Ok(Silence {
        track: AudioTrack {
            sample_rate: SAMPLE_RATE,
            channels: 1,
            config,
        },
        frames,
    })
}

/// The AAC frames of the video span `[from_ns, to_ns)` (nanoseconds from the camera's frame
/// 0): every frame whose first sample falls in it, and the decode time (audio ticks) of the
/// first.
pub(crate) fn frames_for(silence: &Silence, from_ns: u128, to_ns: u128) -> (u64, Vec<AudioSample>) {
    let rate = u128::from(SAMPLE_RATE);
    let per = u128::from(FRAME_SAMPLES);
    // First sample index at or after a time, in whole samples.
    let sample_at = |ns: u128| (ns * rate).div_ceil(1_000_000_000);
    let first = sample_at(from_ns).div_ceil(per);
    let end = sample_at(to_ns).div_ceil(per);
    let n = silence.frames.len().max(1) as u128;
    let samples = (first..end)
        .map(|k| AudioSample {
            data: silence.frames[(k % n) as usize].clone(),
            duration: FRAME_SAMPLES,
        })
        .collect();
    (u64::try_from(first * per).unwrap_or(u64::MAX), samples)
}
