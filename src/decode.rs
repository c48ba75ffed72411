//! The GStreamer decode pipeline, owned by one thread per source.
//!
//! ```text
//!  fragments (init + fMP4, tfdt rebased)            key-frame-only probe      target-fps probe
//!  appsrc ──▶ decodebin (qtdemux/tsdemux → h264parse/h265parse → avdec_*) ──▶ videoconvert ──▶ videoscale ──▶ appsink
//!                                                                                    (caps: format [, width, height])
//! ```
//!
//! * `decodebin` picks the demuxer, parser and decoder from the bytes (fMP4 or MPEG-TS, H.264 or
//!   H.265) and follows resolution changes (a new init segment).
//! * Key-frame-only mode drops delta units *before* the decoder (an IDR decodes alone), so it
//!   costs one decode per fragment. `target_fps` drops decoded frames *before* colour conversion.
//! * Frames leave the appsink without a copy: the [`Frame`] owns the mapped `gst::Buffer`.
//! * A bus error rebuilds the pipeline (and re-sends the init segment); the source is told.

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
        gst::init().map_err(|e| {
            Error::new(
                ErrorKind::Pipeline,
                format!("cannot initialise GStreamer: {e}"),
            )
        })?;
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

    /// Stops the thread and releases the pipeline.
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.tx.lock().take();
        // Unblocks a push waiting on a full appsrc.
        if let Some(pipeline) = self.shared.pipeline.lock().as_ref() {
            let _ = pipeline.set_state(gst::State::Null);
        }
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
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

fn element(factory: &str) -> Result<gst::Element> {
    gst::ElementFactory::make(factory).build().map_err(|_| {
        Error::new(
            ErrorKind::Pipeline,
            format!("GStreamer element {factory:?} is missing: install its plugin package"),
        )
    })
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
    let convert = element("videoconvert")?;
    let scale = element("videoscale")?;
    let mut caps = gst_video::VideoCapsBuilder::new().format(config.pixel_format.video_format());
    if let Some((w, h)) = config.resize {
        caps = caps.width(w as i32).height(h as i32);
    }
    let appsink = gst_app::AppSink::builder()
        .name("sink")
        .caps(&caps.build())
        .sync(false)
        .max_buffers(2)
        .build();
    pipeline
        .add_many([
            appsrc.upcast_ref(),
            &decodebin,
            &convert,
            &scale,
            appsink.upcast_ref(),
        ])
        .map_err(Error::from)?;
    appsrc.link(&decodebin).map_err(Error::from)?;
    gst::Element::link_many([&convert, &scale, appsink.upcast_ref()]).map_err(Error::from)?;

    // decodebin's video pad → videoconvert.
    let convert_sink = convert
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "videoconvert has no sink pad"))?;
    let link_target = convert_sink.clone();
    decodebin.connect_pad_added(move |_, pad| {
        let is_video = pad
            .current_caps()
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(true);
        if !is_video {
            return;
        }
        if let Some(old) = link_target.peer() {
            let _ = old.unlink(&link_target);
        }
        if let Err(e) = pad.link(&link_target) {
            tracing::warn!(error = ?e, "cannot link the decoder to the converter");
        }
    });

    // Key frames only: drop delta units in front of the decoder.
    if config.key_frames_only {
        decodebin.connect("deep-element-added", false, |values| {
            let element = values.get(2).and_then(|v| v.get::<gst::Element>().ok())?;
            let is_decoder = element
                .factory()
                .is_some_and(|f| f.klass().contains("Decoder") && f.klass().contains("Video"));
            if is_decoder && let Some(pad) = element.static_pad("sink") {
                pad.add_probe(gst::PadProbeType::BUFFER, |_, info| match info.buffer() {
                    Some(b) if b.flags().contains(gst::BufferFlags::DELTA_UNIT) => discard(info),
                    _ => gst::PadProbeReturn::Ok,
                });
            }
            None
        });
    }

    // target_fps: keep a frame when at least 1/fps has passed (in stream time) since the last kept.
    if let Some(fps) = config.target_fps {
        let min_gap = Duration::from_secs_f64(1.0 / fps);
        // Tolerate timestamp jitter of a millisecond.
        let min_gap = min_gap.saturating_sub(Duration::from_millis(1));
        let last: Mutex<Option<gst::ClockTime>> = Mutex::new(None);
        let drop_sink = Arc::clone(sink);
        convert_sink.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
            let Some(pts) = info.buffer().and_then(|b| b.pts()) else {
                return gst::PadProbeReturn::Ok;
            };
            let mut last = last.lock();
            match *last {
                Some(prev)
                    if pts > prev
                        && pts - prev
                            < gst::ClockTime::from_nseconds(min_gap.as_nanos() as u64) =>
                {
                    drop_sink.dropped(DecoderDrop::TargetFps);
                    discard(info)
                }
                _ => {
                    *last = Some(pts);
                    gst::PadProbeReturn::Ok
                }
            }
        });
    }

    // Frames out of the appsink, without a copy.
    let frame_shared = Arc::clone(shared);
    let frame_sink = Arc::clone(sink);
    let format = config.pixel_format;
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |appsink| {
                let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                let Some(caps) = sample.caps() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let Ok(info) = gst_video::VideoInfo::from_caps(caps) else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let Some(buffer) = sample.buffer_owned() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let pts = buffer.pts().map(|t| Duration::from_nanos(t.nseconds()));
                let key_frame = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
                let Ok(map) = buffer.into_mapped_buffer_readable() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let (producer_time, fragment) = {
                    let timeline = frame_shared.timeline.lock();
                    let fragment = pts.and_then(|p| {
                        timeline
                            .fragments
                            .iter()
                            .rev()
                            .find(|(start, _)| *start <= p + Duration::from_millis(1))
                            .map(|(_, id)| id.clone())
                    });
                    (timeline.epoch.zip(pts).map(|(e, p)| e + p), fragment)
                };
                frame_sink.frame(Frame {
                    map,
                    info,
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
            .eos({
                let shared = Arc::clone(shared);
                move |_| {
                    *shared.eos.0.lock() = true;
                    shared.eos.1.notify_all();
                }
            })
            .build(),
    );

    // Errors from streaming threads: mark the pipeline failed and tell the source.
    let bus = pipeline
        .bus()
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "the pipeline has no bus"))?;
    let err_shared = Arc::clone(shared);
    let err_sink = Arc::clone(sink);
    bus.set_sync_handler(move |_, message| {
        if let gst::MessageView::Error(err) = message.view()
            && !err_shared.stopping.load(Ordering::SeqCst)
            && !err_shared.failed.swap(true, Ordering::SeqCst)
        {
            let source = err
                .src()
                .map(|s| s.path_string().to_string())
                .unwrap_or_default();
            let error = Error::new(
                ErrorKind::Decode,
                format!("GStreamer error from {source}: {}", err.error()),
            );
            tracing::warn!(%error, debug = ?err.debug(), "decode pipeline failed");
            err_sink.error(error);
        }
        gst::BusSyncReply::Drop
    });

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
