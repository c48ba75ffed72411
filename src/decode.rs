//! The GStreamer decode pipeline: heads that bring encoded video, one shared tail.
//!
//! ```text
//!  KVS head (Decoder, one thread per source):
//!  fragments (init + fMP4, tfdt rebased)
//!  appsrc ──▶ decodebin (qtdemux/tsdemux → h264parse/h265parse → avdec_*) ─┐
//!                                                                          │
//!  URI head (source::uri):                                                 │
//!  uridecodebin (rtspsrc → depay | souphttpsrc → hlsdemux | filesrc → demux → parse → decoder) ─┤
//!                                                                          ▼
//!  tail (add_tail):     target-fps probe ─▶ videoconvert ─▶ videoscale ─▶ appsink (format [, width, height])
//!                                                                  └──▶ capsfilter ─▶ jpegenc ─▶ appsink (image/jpeg)
//! ```
//!
//! * `decodebin` picks the demuxer, parser and decoder from the bytes (fMP4 or MPEG-TS, H.264 or
//!   H.265) and follows resolution changes (a new init segment).
//! * Key-frame-only mode drops delta units *before* the decoder (an IDR decodes alone), so it
//!   costs one decode per fragment. `target_fps` drops decoded frames *before* colour conversion.
//! * Frames leave the appsink without a copy: the [`Frame`] owns the mapped `gst::Buffer`. The
//!   head's [`Stamp`] gives each its producer time (KVS: program date time + PTS; RTSP: the
//!   sender's NTP time).
//! * KVS head: a bus error rebuilds the pipeline (and re-sends the init segment); the source is
//!   told. The URI source handles its own errors (reconnect with backoff).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::frame::{FragmentId, Frame, PixelFormat};

/// What the decoder produces and how.
#[derive(Clone, Debug)]
pub(crate) struct DecodeConfig {
    pub name: String,
    pub pixel_format: PixelFormat,
    pub resize: Option<(u32, u32)>,
    pub target_fps: Option<f64>,
    pub key_frames_only: bool,
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

/// Why frames were dropped before delivery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DecoderDrop {
    TargetFps,
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

enum Command {
    Fragment(FragmentInput),
    /// End of stream: flush the decoder (its last frames) and answer when the appsink saw EOS.
    Finish(tokio::sync::oneshot::Sender<()>),
}

struct Timeline {
    /// Program date time at timeline 0, if known.
    epoch: Option<SystemTime>,
    /// (start on the timeline, fragment), oldest first.
    fragments: VecDeque<(Duration, FragmentId)>,
}

struct Shared {
    timeline: Mutex<Timeline>,
    failed: AtomicBool,
    stopping: AtomicBool,
    pipeline: Mutex<Option<gst::Pipeline>>,
    pipelines_built: std::sync::atomic::AtomicU64,
    /// Set by the appsink when end-of-stream reached it.
    eos: (parking_lot::Mutex<bool>, parking_lot::Condvar),
}

/// Handle of the decoder thread.
pub(crate) struct Decoder {
    tx: Mutex<Option<tokio::sync::mpsc::Sender<Command>>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Decoder {
    /// Starts the decoder thread; the pipeline is built before this returns, so a missing
    /// plugin is reported here.
    pub fn start(config: DecodeConfig, sink: Arc<dyn FrameSink>) -> Result<Decoder> {
        crate::elements::init()?;
        let shared = Arc::new(Shared {
            timeline: Mutex::new(Timeline {
                epoch: None,
                fragments: VecDeque::new(),
            }),
            failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            pipeline: Mutex::new(None),
            pipelines_built: std::sync::atomic::AtomicU64::new(0),
            eos: (parking_lot::Mutex::new(false), parking_lot::Condvar::new()),
        });
        let first = build_pipeline(&config, &shared, &sink)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Command>(2);
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name(format!("kvs-decode-{}", config.name))
            .spawn(move || run(config, thread_shared, sink, rx, first))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Internal,
                    format!("cannot start the decoder thread: {e}"),
                )
            })?;
        Ok(Decoder {
            tx: Mutex::new(Some(tx)),
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Sets the program date time of timeline 0 (once, from the first fragment that has one).
    pub fn set_epoch(&self, epoch: SystemTime) {
        let mut timeline = self.shared.timeline.lock();
        if timeline.epoch.is_none() {
            timeline.epoch = Some(epoch);
        }
    }

    /// Queues a fragment; waits (asynchronously) while the decoder is two fragments behind.
    pub async fn push(&self, fragment: FragmentInput) -> Result<()> {
        let tx = self
            .tx
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Stopped, "the decoder is stopped"))?;
        tx.send(Command::Fragment(fragment))
            .await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))
    }

    /// Sends end-of-stream through the pipeline and waits until every frame is out.
    pub async fn finish(&self) -> Result<()> {
        let tx = self
            .tx
            .lock()
            .clone()
            .ok_or_else(|| Error::new(ErrorKind::Stopped, "the decoder is stopped"))?;
        let (done, wait) = tokio::sync::oneshot::channel();
        tx.send(Command::Finish(done))
            .await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))?;
        wait.await
            .map_err(|_| Error::new(ErrorKind::Stopped, "the decoder thread has ended"))
    }

    /// How many pipelines were built (1 + rebuilds after errors).
    pub fn pipelines_built(&self) -> u64 {
        self.shared.pipelines_built.load(Ordering::Relaxed)
    }

    /// Stops the thread and releases the pipeline. The blocking part (the pipeline to NULL,
    /// which also unblocks a push waiting on a full appsrc, and the thread join) runs on a
    /// thread of its own ([`teardown`](crate::source::teardown)): this returns within a second,
    /// and never blocks a tokio worker.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.shared.wake_finish();
        self.tx.lock().take();
        let pipeline = self.shared.pipeline.lock().clone();
        let thread = self.thread.lock().take();
        if pipeline.is_none() && thread.is_none() {
            return;
        }
        crate::source::teardown("decoder", move || {
            if let Some(pipeline) = pipeline {
                let _ = pipeline.set_state(gst::State::Null);
            }
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        });
    }
}

impl Shared {
    /// Wakes a `Finish` waiting for end-of-stream (stop, or the pipeline failed: either way no
    /// end-of-stream will come).
    fn wake_finish(&self) {
        let _eos = self.eos.0.lock();
        self.eos.1.notify_all();
    }
}

impl Drop for Decoder {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Built {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
}

use crate::elements::make as element;

/// What the KVS head plugs for fMP4 H.264/H.265 (through `decodebin`): checked at `build()`.
pub(crate) const KVS_HEAD_ELEMENTS: &[&str] = &[
    "appsrc",
    "decodebin",
    "typefind",
    "qtdemux",
    "h264parse",
    "avdec_h264",
    "h265parse",
    "avdec_h265",
];

/// What the shared tail needs for raw output (`tail_elements` adds JPEG's).
const RAW_TAIL_ELEMENTS: &[&str] = &["videoconvert", "videoscale", "appsink"];
const JPEG_TAIL_ELEMENTS: &[&str] = &["capsfilter", "jpegenc"];

/// The elements of the shared tail for `format`.
pub(crate) fn tail_elements(format: PixelFormat) -> Vec<&'static str> {
    let mut all = RAW_TAIL_ELEMENTS.to_vec();
    if !format.is_raw() {
        all.extend_from_slice(JPEG_TAIL_ELEMENTS);
    }
    all
}

/// Drops the buffer of a probe: it is released here and the probe reports it handled.
/// (Returning `PadProbeReturn::Drop` makes GStreamer 1.22 log a critical
/// `gst_mini_object_unref: assertion 'mini_object != NULL'` per dropped buffer with these
/// bindings.)
fn discard(info: &mut gst::PadProbeInfo<'_>) -> gst::PadProbeReturn {
    drop(info.data.take());
    gst::PadProbeReturn::Handled
}

fn build_pipeline(
    config: &DecodeConfig,
    shared: &Arc<Shared>,
    sink: &Arc<dyn FrameSink>,
) -> Result<Built> {
    let pipeline = gst::Pipeline::with_name(&format!("kvs-frames-{}", config.name));
    let appsrc = gst_app::AppSrc::builder()
        .name("src")
        .format(gst::Format::Bytes)
        .is_live(false)
        .block(true)
        .max_bytes(16 * 1024 * 1024)
        .build();
    let decodebin = element("decodebin")?;
    pipeline
        .add_many([appsrc.upcast_ref(), &decodebin])
        .map_err(Error::from)?;
    appsrc.link(&decodebin).map_err(Error::from)?;

    // The fragment by its start on the timeline; producer time = the fragment's program date
    // time + the frame's offset in it (the timeline is kept monotonic when the producer clock
    // steps back, so it is not always program date time − epoch), else epoch + PTS.
    let stamp_shared = Arc::clone(shared);
    let stamp: Stamp = Box::new(move |pts, _reference| {
        let timeline = stamp_shared.timeline.lock();
        let found = pts.and_then(|p| {
            timeline
                .fragments
                .iter()
                .rev()
                .find(|(start, _)| *start <= p + Duration::from_millis(1))
        });
        let producer = match (found, pts) {
            (Some((start, id)), Some(p)) if id.program_date_time.is_some() => id
                .program_date_time
                .and_then(|t| match p.checked_sub(*start) {
                    Some(offset) => t.checked_add(offset),
                    None => t.checked_sub(start.saturating_sub(p)),
                }),
            _ => timeline.epoch.zip(pts).and_then(|(e, p)| e.checked_add(p)),
        };
        (producer, found.map(|(_, id)| id.clone()))
    });
    let eos_shared = Arc::clone(shared);
    add_tail(
        &pipeline,
        &decodebin,
        config,
        sink,
        TailHooks {
            stamp,
            on_eos: Box::new(move || {
                *eos_shared.eos.0.lock() = true;
                eos_shared.eos.1.notify_all();
            }),
        },
    )?;

    // Errors from streaming threads: mark the pipeline failed and tell the source.
    let err_shared = Arc::clone(shared);
    let err_sink = Arc::clone(sink);
    on_bus_error(&pipeline, move |err| {
        if !err_shared.stopping.load(Ordering::SeqCst)
            && !err_shared.failed.swap(true, Ordering::SeqCst)
        {
            let error = Error::new(
                ErrorKind::Decode,
                format!(
                    "GStreamer error from {}: {}",
                    error_source(err),
                    err.error()
                ),
            );
            tracing::warn!(%error, debug = %error_debug(err), "decode pipeline failed");
            // The source first learns why, then a Finish waiting for end-of-stream wakes.
            err_sink.error(error);
            err_shared.wake_finish();
        }
    })?;

    pipeline.set_state(gst::State::Playing).map_err(|e| {
        Error::new(
            ErrorKind::Pipeline,
            format!("the decode pipeline does not start: {e}"),
        )
    })?;
    shared.pipelines_built.fetch_add(1, Ordering::Relaxed);
    *shared.pipeline.lock() = Some(pipeline.clone());
    Ok(Built { pipeline, appsrc })
}

/// How the tail gives a frame its producer time and fragment, from the frame's PTS and the
/// sender's NTP time when the buffer carried a reference timestamp (RTSP).
pub(crate) type Stamp = Box<
    dyn Fn(Option<Duration>, Option<SystemTime>) -> (Option<SystemTime>, Option<FragmentId>)
        + Send
        + Sync,
>;

/// What the tail needs from the head that feeds it.
pub(crate) struct TailHooks {
    pub stamp: Stamp,
    /// Called when end-of-stream reaches the appsink.
    pub on_eos: Box<dyn Fn() + Send + Sync>,
}

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
const NTP_UNIX_OFFSET: Duration = Duration::from_secs(2_208_988_800);

/// An NTP time as GStreamer carries it (nanoseconds since 1900) → wall time.
pub(crate) fn ntp_to_system_time(ntp_ns: u64) -> Option<SystemTime> {
    Duration::from_nanos(ntp_ns)
        .checked_sub(NTP_UNIX_OFFSET)
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
}

/// The sender's NTP time of a buffer, from a `GstReferenceTimestampMeta` with caps
/// `timestamp/x-ntp` (added by `rtpjitterbuffer` once RTCP sender reports arrived).
pub(crate) fn ntp_reference(buffer: &gst::BufferRef) -> Option<SystemTime> {
    buffer
        .iter_meta::<gst::ReferenceTimestampMeta>()
        .find(|meta| {
            meta.reference()
                .structure(0)
                .is_some_and(|s| s.name() == "timestamp/x-ntp")
        })
        .and_then(|meta| {
            // SAFETY: the pointer is the meta itself, alive while `meta` borrows the buffer.
            // The field is read directly because the binding's `timestamp()` panics on
            // GST_CLOCK_TIME_NONE (u64::MAX), which is checked here instead.
            let raw = unsafe { (*meta.as_ptr()).timestamp };
            (raw != u64::MAX).then_some(raw)
        })
        .and_then(ntp_to_system_time)
}

/// What the converter probe saw of a frame that the appsink will deliver (an encoder such as
/// `jpegenc` drops the delta flag and may drop metas).
#[derive(Clone, Copy)]
struct Seen {
    pts: Option<gst::ClockTime>,
    key_frame: bool,
    reference: Option<SystemTime>,
}

/// Adds the shared tail to `pipeline`, fed by the decoded video pads of `head` (a decodebin
/// or uridecodebin already in the pipeline):
///
/// ```text
/// head: [decoder sink probe: key flags; key-frame-only drops delta units] decoder ─┐
///   ┌──────────────────────────────────────────────────────────────────────────────┘
///   └▶ [target-fps probe] videoconvert → videoscale → appsink (format [, width, height])
///                         videoconvert → videoscale → capsfilter ([width, height]) → jpegenc → appsink (image/jpeg)
/// ```
///
/// Frames leave the appsink without a copy, stamped by `hooks.stamp`; errors are the head's
/// business ([`on_bus_error`]).
pub(crate) fn add_tail(
    pipeline: &gst::Pipeline,
    head: &gst::Element,
    config: &DecodeConfig,
    sink: &Arc<dyn FrameSink>,
    hooks: TailHooks,
) -> Result<()> {
    config.pixel_format.validate()?;
    let convert = element("videoconvert")?;
    let scale = element("videoscale")?;
    let mut chain = vec![convert.clone(), scale];
    let appsink_caps = match (config.pixel_format, config.pixel_format.video_format()) {
        (_, Some(format)) => {
            let mut caps = gst_video::VideoCapsBuilder::new().format(format);
            if let Some((w, h)) = config.resize {
                caps = caps.width(w as i32).height(h as i32);
            }
            caps.build()
        }
        (PixelFormat::Jpeg { quality }, None) => {
            let mut size = gst_video::VideoCapsBuilder::new();
            if let Some((w, h)) = config.resize {
                size = size.width(w as i32).height(h as i32);
            }
            let filter =
                crate::elements::make_with("capsfilter", |b| b.property("caps", size.build()))?;
            let jpegenc = crate::elements::make_with("jpegenc", |b| {
                b.property("quality", i32::from(quality))
            })?;
            chain.push(filter);
            chain.push(jpegenc);
            gst::Caps::builder("image/jpeg").build()
        }
        (raw, None) => {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("no GStreamer format for {raw}"),
            ));
        }
    };
    let appsink = gst_app::AppSink::builder()
        .name("sink")
        .caps(&appsink_caps)
        .sync(false)
        .max_buffers(2)
        .build();
    for e in &chain {
        pipeline.add(e).map_err(Error::from)?;
    }
    pipeline.add(&appsink).map_err(Error::from)?;
    chain.push(appsink.clone().upcast());
    gst::Element::link_many(chain.iter()).map_err(Error::from)?;

    let convert_sink = convert
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "videoconvert has no sink pad"))?;
    link_decoded_video(pipeline, head, convert_sink.clone());
    // Decoders (avdec_* in GStreamer 1.22) do not mark their output as key or delta: the
    // flag is noted, by PTS, where the demuxer or depayloader set it.
    let keys: KeyFlags = Arc::new(Mutex::new(VecDeque::new()));
    watch_decoders(head, Arc::clone(&keys), config.key_frames_only);

    // target_fps: keep a frame when at least 1/fps has passed (in stream time) since the last
    // kept. Then note what the appsink cannot see any more (key flag, NTP time).
    let min_gap = config.target_fps.map(|fps| {
        // Tolerate timestamp jitter of a millisecond.
        Duration::from_secs_f64(1.0 / fps).saturating_sub(Duration::from_millis(1))
    });
    let last: Mutex<Option<gst::ClockTime>> = Mutex::new(None);
    let seen: Arc<Mutex<VecDeque<Seen>>> = Arc::new(Mutex::new(VecDeque::new()));
    let probe_seen = Arc::clone(&seen);
    let drop_sink = Arc::clone(sink);
    convert_sink.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let pts = buffer.pts();
        if let (Some(min_gap), Some(pts)) = (min_gap, pts) {
            let mut last = last.lock();
            match *last {
                Some(prev)
                    if pts > prev
                        && pts - prev
                            < gst::ClockTime::from_nseconds(min_gap.as_nanos() as u64) =>
                {
                    drop(last);
                    drop_sink.dropped(DecoderDrop::TargetFps);
                    return discard(info);
                }
                _ => *last = Some(pts),
            }
        }
        let noted_key = pts.and_then(|pts| {
            let mut keys = keys.lock();
            let i = keys.iter().position(|(p, _)| *p == pts)?;
            keys.remove(i).map(|(_, key)| key)
        });
        let entry = Seen {
            pts,
            key_frame: noted_key
                .unwrap_or_else(|| !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT)),
            reference: ntp_reference(buffer),
        };
        let mut seen = probe_seen.lock();
        seen.push_back(entry);
        while seen.len() > 32 {
            seen.pop_front();
        }
        gst::PadProbeReturn::Ok
    });

    // Frames out of the appsink, without a copy.
    let frame_sink = Arc::clone(sink);
    let format = config.pixel_format;
    let TailHooks { stamp, on_eos } = hooks;
    // The caps change only on renegotiation: parse them once per caps object, not per frame.
    let parsed: Mutex<Option<(gst::Caps, Layout)>> = Mutex::new(None);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |appsink| {
                let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let Some(caps) = sample.caps() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let (info, width, height) = {
                    let mut parsed = parsed.lock();
                    match parsed.as_ref() {
                        Some((c, (info, w, h))) if c.as_ptr() == caps.as_ptr() => {
                            (info.clone(), *w, *h)
                        }
                        _ => {
                            let Some((info, w, h)) = frame_layout(format, caps) else {
                                return Ok(gst::FlowSuccess::Ok);
                            };
                            *parsed = Some((caps.to_owned(), (info.clone(), w, h)));
                            (info, w, h)
                        }
                    }
                };
                let Some(buffer) = sample.buffer_owned() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let buffer_pts = buffer.pts();
                let pts = buffer_pts.map(|t| Duration::from_nanos(t.nseconds()));
                let noted = {
                    let mut seen = seen.lock();
                    match seen.iter().position(|s| s.pts == buffer_pts) {
                        Some(i) => {
                            let noted = seen.get(i).copied();
                            seen.drain(..=i);
                            noted
                        }
                        None => None,
                    }
                };
                let key_frame = noted.map_or_else(
                    || !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
                    |s| s.key_frame,
                );
                let reference = ntp_reference(&buffer).or(noted.and_then(|s| s.reference));
                let Ok(map) = buffer.into_mapped_buffer_readable() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let (producer_time, fragment) = stamp(pts, reference);
                frame_sink.frame(Frame {
                    map,
                    info,
                    width,
                    height,
                    format,
                    producer_time,
                    pts,
                    emitted: SystemTime::now(),
                    sequence: 0,
                    fragment,
                    key_frame,
                });
                Ok(gst::FlowSuccess::Ok)
            })
            .eos(move |_| on_eos())
            .build(),
    );
    Ok(())
}

/// Video info (raw formats) and size of frames with `caps`; None when the caps are unusable.
/// Video info (raw formats only), width, height.
type Layout = (Option<gst_video::VideoInfo>, u32, u32);

fn frame_layout(format: PixelFormat, caps: &gst::CapsRef) -> Option<Layout> {
    if format.is_raw() {
        let info = gst_video::VideoInfo::from_caps(caps).ok()?;
        let (w, h) = (info.width(), info.height());
        return Some((Some(info), w, h));
    }
    let s = caps.structure(0)?;
    let w = s
        .get::<i32>("width")
        .ok()
        .and_then(|w| u32::try_from(w).ok())
        .unwrap_or(0);
    let h = s
        .get::<i32>("height")
        .ok()
        .and_then(|h| u32::try_from(h).ok())
        .unwrap_or(0);
    Some((None, w, h))
}

/// (PTS, key frame) of the buffers that entered a video decoder, oldest first.
type KeyFlags = Arc<Mutex<VecDeque<(gst::ClockTime, bool)>>>;

/// Links the video pads `bin` adds (decodebin, uridecodebin) to `target`, replacing the
/// previous link (a new stream group); other pads (audio, subtitles) go to a fakesink so that
/// they never stop the pipeline with not-linked.
fn link_decoded_video(pipeline: &gst::Pipeline, bin: &gst::Element, target: gst::Pad) {
    let pipeline = pipeline.downgrade();
    bin.connect_pad_added(move |_, pad| {
        let is_video = pad
            .current_caps()
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(true);
        if !is_video {
            let Some(pipeline) = pipeline.upgrade() else {
                return;
            };
            let Ok(fakesink) = gst::ElementFactory::make("fakesink")
                .property("sync", false)
                .property("async", false)
                .build()
            else {
                return;
            };
            if pipeline.add(&fakesink).is_ok() {
                let _ = fakesink.sync_state_with_parent();
                if let Some(sinkpad) = fakesink.static_pad("sink") {
                    let _ = pad.link(&sinkpad);
                }
            }
            return;
        }
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
fn watch_decoders(bin: &gst::Element, keys: KeyFlags, key_frames_only: bool) {
    bin.connect("deep-element-added", false, move |values| {
        let element = values.get(2).and_then(|v| v.get::<gst::Element>().ok())?;
        let is_decoder = element
            .factory()
            .is_some_and(|f| f.klass().contains("Decoder") && f.klass().contains("Video"));
        if is_decoder && let Some(pad) = element.static_pad("sink") {
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

fn run(
    config: DecodeConfig,
    shared: Arc<Shared>,
    sink: Arc<dyn FrameSink>,
    mut rx: tokio::sync::mpsc::Receiver<Command>,
    first: Built,
) {
    let mut built = Some(first);
    let mut current_init: Option<Bytes> = None;
    let mut init_sent = false;
    while let Some(command) = rx.blocking_recv() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let fragment = match command {
            Command::Fragment(f) => f,
            Command::Finish(done) => {
                if let Some(b) = built.as_ref() {
                    *shared.eos.0.lock() = false;
                    if b.appsrc.end_of_stream().is_ok() {
                        let mut eos = shared.eos.0.lock();
                        let deadline = std::time::Instant::now() + Duration::from_secs(30);
                        while !*eos
                            && !shared.stopping.load(Ordering::SeqCst)
                            && !shared.failed.load(Ordering::SeqCst)
                        {
                            if shared.eos.1.wait_until(&mut eos, deadline).timed_out() {
                                tracing::warn!(source = %config.name, "no end-of-stream from the decoder within 30 s");
                                break;
                            }
                        }
                    }
                }
                let _ = done.send(());
                // The pipeline is spent: the next fragment (if any) gets a new one.
                if let Some(old) = built.take() {
                    let _ = old.pipeline.set_state(gst::State::Null);
                }
                continue;
            }
        };
        if shared.failed.load(Ordering::SeqCst) || built.is_none() {
            if let Some(old) = built.take() {
                let _ = old.pipeline.set_state(gst::State::Null);
            }
            shared.failed.store(false, Ordering::SeqCst);
            match build_pipeline(&config, &shared, &sink) {
                Ok(b) => {
                    tracing::info!(source = %config.name, "decode pipeline rebuilt");
                    built = Some(b);
                    init_sent = false;
                }
                Err(e) => {
                    sink.error(e);
                    continue;
                }
            }
        }
        let Some(b) = built.as_ref() else { continue };
        if let Some(init) = &fragment.init
            && (!init_sent || current_init.as_ref() != Some(init))
        {
            if b.appsrc
                .push_buffer(gst::Buffer::from_slice(init.clone()))
                .is_err()
            {
                continue;
            }
            current_init = Some(init.clone());
            init_sent = true;
        }
        {
            let mut timeline = shared.timeline.lock();
            timeline.fragments.push_back((fragment.start, fragment.id));
            while timeline.fragments.len() > 64 {
                timeline.fragments.pop_front();
            }
        }
        if b.appsrc
            .push_buffer(gst::Buffer::from_slice(fragment.data))
            .is_err()
        {
            tracing::debug!(source = %config.name, "appsrc refused a fragment (flushing or failed)");
        }
    }
    if let Some(b) = built.take() {
        let _ = b.appsrc.end_of_stream();
        let _ = b.pipeline.set_state(gst::State::Null);
    }
    *shared.pipeline.lock() = None;
}
