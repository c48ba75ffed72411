//! The GStreamer decode pipeline: heads that bring encoded video, one shared tail.
//!
//! ```text
//!  KVS head (Decoder, one thread per source):
//!  fragments (init + fMP4, tfdt rebased)
//!  appsrc ──▶ parsebin (qtdemux/tsdemux → h264parse/h265parse) → avdec_* ─┐   (head::parse_decode_bin)
//!                                                                          │
//!  URI head (source::uri):                                                 │   (head::uri_decode_bin)
//!  urisourcebin (rtspsrc | souphttpsrc → hlsdemux | filesrc) → parsebin (depay | demux → parse) → decoder ─┤
//!                                                                          ▼
//!  tail (add_tail):     target-fps probe ─▶ videoconvert ─▶ videoscale ─▶ appsink (format [, width, height])
//!                                                                  └──▶ capsfilter ─▶ jpegenc ─▶ appsink (image/jpeg)
//! ```
//!
//! * `parsebin` picks the demuxer and parser from the bytes (fMP4 or MPEG-TS, H.264 or H.265),
//!   [`head`] the decoder, in the demuxer's thread (no `multiqueue` hop as in `decodebin`); the
//!   decoder follows resolution changes (a new init segment).
//! * Key-frame-only mode drops delta units *before* the decoder (an IDR decodes alone), so it
//!   costs one decode per fragment. `target_fps` drops decoded frames *before* colour conversion.
//! * Frames leave the appsink without a copy: the [`Frame`] owns the mapped `gst::Buffer`. The
//!   head's [`Stamp`] gives each its producer time (KVS: program date time + PTS; RTSP: the
//!   sender's NTP time).
//! * KVS head: a bus error rebuilds the pipeline (and re-sends the init segment); the source is
//!   told. The URI source handles its own errors (reconnect with backoff).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use parking_lot::Mutex;

use crate::elements::make as element;
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{FragmentId, Frame, PixelFormat};

mod convert;
mod head;
mod kvs;
mod tail;

pub use convert::ColorConversion;
pub(crate) use convert::{ConvertError, Pending};

pub(crate) use convert::converts as pads_letterbox;
pub(crate) use head::uri_decode_bin;
pub(crate) use kvs::{Decoder, Head, KVS_HEAD_ELEMENTS};
#[cfg(test)]
pub(crate) use tail::ntp_to_system_time;
pub(crate) use tail::{Stamp, TailHooks, add_tail, ntp_reference, tail_elements};

/// How many threads each source's video decoder (libav) uses.
///
/// Frame threading raises one stream's decoding throughput by spending more CPU per frame
/// (thread hand-offs, one extra picture buffer and one frame of delay per thread): worth it
/// only when one core cannot decode the stream as fast as it is needed. One core of this
/// crate's reference machine decodes 1080p H.264 several times faster than real time, and when
/// the process decodes as many streams as it has cores the cores are busy with the other
/// streams anyway.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DecoderThreads {
    /// One thread for pictures up to 1920×1088 pixels, and for any picture once the process
    /// decodes at least as many streams as it has cores (counted over every source of the
    /// crate); libav's own choice (one per core) for larger pictures below that. Decided
    /// when a decoder opens: at start, at each pipeline rebuild and on a new resolution. The
    /// default.
    #[default]
    Auto,
    /// Always libav's own choice (one thread per core, frame threading).
    Libav,
    /// Exactly this many threads (1–64).
    Fixed(u32),
}

/// Decode pipelines alive in the process (for [`DecoderThreads::Auto`]).
static ACTIVE_DECODERS: AtomicUsize = AtomicUsize::new(0);

/// One decode pipeline in [`ACTIVE_DECODERS`] while it lives.
pub(crate) struct ActiveDecoder(());

impl ActiveDecoder {
    pub(crate) fn new() -> Self {
        ACTIVE_DECODERS.fetch_add(1, Ordering::SeqCst);
        ActiveDecoder(())
    }
}

impl Drop for ActiveDecoder {
    fn drop(&mut self) {
        ACTIVE_DECODERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Pictures up to this many pixels get one decoder thread with [`DecoderThreads::Auto`]
/// (1080p as coded: 1920 × 1088).
const ONE_THREAD_PIXELS: u64 = 1920 * 1088;

impl DecoderThreads {
    /// libav's `max-threads` for a decoder opening now on pictures of `size` (width, height;
    /// None when the caps do not say), 0 = libav's own choice.
    pub(crate) fn max_threads(self, size: Option<(u32, u32)>) -> u32 {
        match self {
            DecoderThreads::Fixed(n) => n,
            DecoderThreads::Libav => 0,
            DecoderThreads::Auto => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                let small =
                    size.is_some_and(|(w, h)| u64::from(w) * u64::from(h) <= ONE_THREAD_PIXELS);
                if small || ACTIVE_DECODERS.load(Ordering::SeqCst) >= cores {
                    1
                } else {
                    0
                }
            }
        }
    }
}

/// What the decoder produces and how.
#[derive(Clone, Debug)]
pub(crate) struct DecodeConfig {
    pub name: String,
    pub pixel_format: PixelFormat,
    pub resize: Option<(u32, u32)>,
    pub resize_mode: crate::frame::ResizeMode,
    pub target_fps: Option<f64>,
    pub key_frames_only: bool,
    pub max_frame_age: Option<Duration>,
    pub conversion: ColorConversion,
    pub decoder_threads: DecoderThreads,
}

/// One fragment to decode.
pub(crate) struct FragmentInput {
    /// The init segment in effect (fMP4); pushed again whenever it changes.
    pub init: Option<Bytes>,
    /// The media fragment, decode times already on the source's timeline.
    pub data: Bytes,
    /// Where the fragment starts on the source's timeline.
    pub start: Duration,
    pub id: FragmentId,
}

/// One access unit to decode (elementary head).
pub(crate) struct UnitInput {
    /// Its caps (`video/x-h264,stream-format=avc,alignment=au,codec_data=…`, …).
    pub caps: gst::Caps,
    /// The access unit.
    pub data: Bytes,
    /// Its presentation time on the source's timeline.
    pub pts: Duration,
    /// A key frame.
    pub key: bool,
    /// Set on the first unit of a fragment: where the fragment starts on the timeline, and
    /// which it is.
    pub fragment: Option<(Duration, FragmentId)>,
}

/// Why frames were dropped before delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecoderDrop {
    TargetFps,
    TooOld,
}

/// Callbacks from the decoder into the source.
pub(crate) trait FrameSink: Send + Sync + 'static {
    /// A decoded frame (without sequence number yet).
    fn frame(&self, frame: Frame);
    /// A frame dropped inside the pipeline.
    fn dropped(&self, why: DecoderDrop);
    /// The pipeline failed; it will be rebuilt before the next fragment.
    fn error(&self, error: Error);
}

/// (PTS, key frame) of the buffers that entered a video decoder, oldest first.
type KeyFlags = Arc<Mutex<VecDeque<(gst::ClockTime, bool)>>>;

/// Links the video pads `bin` adds (the bins of [`head`], which expose video only) to
/// `target`, replacing the previous link (a new stream group).
fn link_decoded_video(bin: &gst::Element, target: gst::Pad) {
    bin.connect_pad_added(move |_, pad| {
        if let Some(old) = target.peer() {
            let _ = old.unlink(&target);
        }
        if let Err(e) = pad.link(&target) {
            tracing::warn!(error = ?e, "cannot link the decoder to the converter");
        }
    });
}

/// Watches every video decoder that `bin` (or a bin inside it) creates: notes the key flag
/// of each buffer entering it in `keys` and, with `key_frames_only`, drops delta units there so
/// that only key frames are decoded.
fn watch_decoders(
    bin: &gst::Element,
    keys: KeyFlags,
    key_frames_only: bool,
    threads: DecoderThreads,
) {
    bin.connect("deep-element-added", false, move |values| {
        let element = values.get(2).and_then(|v| v.get::<gst::Element>().ok())?;
        let is_decoder = element
            .factory()
            .is_some_and(|f| f.klass().contains("Decoder") && f.klass().contains("Video"));
        if is_decoder && let Some(pad) = element.static_pad("sink") {
            // The thread count, set from the caps before the decoder opens on them (libav
            // reads `max-threads` when it opens).
            if element.has_property("max-threads") {
                let decoder = element.downgrade();
                pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
                    if let Some(gst::PadProbeData::Event(event)) = &info.data
                        && let gst::EventView::Caps(c) = event.view()
                        && let Some(decoder) = decoder.upgrade()
                    {
                        let size = c.caps().structure(0).and_then(|s| {
                            let w = u32::try_from(s.get::<i32>("width").ok()?).ok()?;
                            let h = u32::try_from(s.get::<i32>("height").ok()?).ok()?;
                            Some((w, h))
                        });
                        let n = threads.max_threads(size);
                        decoder.set_property("max-threads", i32::try_from(n).unwrap_or(1));
                        tracing::debug!(decoder = %decoder.name(), ?size, max_threads = n, "decoder threads");
                    }
                    gst::PadProbeReturn::Ok
                });
            }
            let keys = Arc::clone(&keys);
            pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
                let Some(buffer) = info.buffer() else {
                    return gst::PadProbeReturn::Ok;
                };
                let delta = buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
                if delta && key_frames_only {
                    return discard(info);
                }
                if let Some(pts) = buffer.pts() {
                    let mut keys = keys.lock();
                    keys.push_back((pts, !delta));
                    while keys.len() > 64 {
                        keys.pop_front();
                    }
                }
                gst::PadProbeReturn::Ok
            });
        }
        None
    });
}

/// Calls `on_error` (on the posting streaming thread) for every error message of the
/// pipeline; other messages are dropped.
pub(crate) fn on_bus_error(
    pipeline: &gst::Pipeline,
    on_error: impl Fn(&gst::message::Error) + Send + Sync + 'static,
) -> Result<()> {
    let bus = pipeline
        .bus()
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "the pipeline has no bus"))?;
    bus.set_sync_handler(move |_, message| {
        if let gst::MessageView::Error(err) = message.view() {
            on_error(err);
        }
        gst::BusSyncReply::Drop
    });
    Ok(())
}

/// The path of the element that posted `err`.
pub(crate) fn error_source(err: &gst::message::Error) -> String {
    err.src()
        .map(|s| s.path_string().to_string())
        .unwrap_or_default()
}

/// The debug text of `err`, redacted (it may quote a URL).
pub(crate) fn error_debug(err: &gst::message::Error) -> String {
    err.debug()
        .map(|d| crate::redact::redact_text(d.as_str()).into_owned())
        .unwrap_or_default()
}

/// Drops the buffer of a probe: it is released here and the probe reports it handled.
/// (Returning `PadProbeReturn::Drop` makes GStreamer 1.22 log a critical
/// `gst_mini_object_unref: assertion 'mini_object != NULL'` per dropped buffer with these
/// bindings.)
fn discard(info: &mut gst::PadProbeInfo<'_>) -> gst::PadProbeReturn {
    drop(info.data.take());
    gst::PadProbeReturn::Handled
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With as many decoders alive as cores, a new automatic decoder gets one thread whatever
    /// its size; fixed and libav counts are as given. (Other tests of the process may hold
    /// decoders too, which only adds to the count: "fewer than cores" is not asserted here.)
    #[test]
    fn automatic_threads_drop_to_one_when_decoders_fill_the_cores() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let guards: Vec<ActiveDecoder> = (0..cores).map(|_| ActiveDecoder::new()).collect();
        assert_eq!(DecoderThreads::Auto.max_threads(Some((3840, 2160))), 1);
        assert_eq!(DecoderThreads::Auto.max_threads(None), 1);
        assert_eq!(DecoderThreads::Libav.max_threads(Some((640, 360))), 0);
        assert_eq!(DecoderThreads::Fixed(3).max_threads(Some((640, 360))), 3);
        drop(guards);
    }

    /// Pictures up to 1080p as coded get one thread however few decoders run.
    #[test]
    fn automatic_threads_are_one_up_to_1080p() {
        for size in [(640, 360), (1280, 720), (1920, 1080), (1920, 1088)] {
            assert_eq!(DecoderThreads::Auto.max_threads(Some(size)), 1, "{size:?}");
        }
    }
}
