//! The emulator's synthetic live camera.
//!
//! A [`Camera`] renders frames in Rust, encodes them with GStreamer's `x264enc` in real time and
//! hands out each finished fragment (a group of pictures starting with an IDR frame) through a
//! callback, ready for the emulator's fMP4 writer:
//!
//! ```text
//! appsrc (I420, rendered here: moving gradient and box, barcode strip of the frame number)
//!   ! textoverlay (stream name, frame number, producer time; text set per buffer by a pad probe)
//!   ! x264enc (zerolatency, ultrafast, IDR exactly every `frames_per_fragment` frames)
//!   ! h264parse ! video/x-h264,stream-format=avc,alignment=au
//!   ! appsink (pulled synchronously after every push: one access unit per frame)
//! ```
//!
//! Frame `n` has the producer time `start + n / fps` and is pushed when the wall clock reaches
//! that time, so frames whose time is already past (the `history` before "now") are encoded as
//! fast as the machine allows and the rest in real time.
//!
//! Every picture carries a [`barcode`](super::barcode) of its frame number in a strip across the
//! top, and below it a line of text such as `cam-1  #000123  2026-11-21T10:00:00.040Z`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use parking_lot::{Condvar, Mutex};
use tracing::{debug, error, info, warn};

use super::barcode;
use crate::error::{Error, ErrorKind, Result};
use crate::mp4::{Sample, VideoTrack};

/// Longest wait between two checks of the wall clock while pacing (a stop wakes it at once).
const MAX_SLEEP: Duration = Duration::from_millis(20);

/// Longest wait for one pull from the appsink before the stop flag and the bus are checked again.
const PULL_SLICE_MS: u64 = 20;

/// How long the encoder may take for one frame before the camera gives up.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(10);

/// Smallest accepted picture width. Below 40 pixels the barcode's 40 cells do not all fit and it
/// cannot be read; from 80 pixels on every cell is at least 2 pixels wide.
const MIN_WIDTH: u32 = 16;

/// Smallest accepted picture height.
const MIN_HEIGHT: u32 = 16;

/// Largest accepted picture width or height.
const MAX_DIMENSION: u32 = 8192;

/// Luma of the dark band behind the text.
const BAND_LUMA: u8 = 40;

/// Font family of the text overlay (monospaced, so the line length is predictable).
const FONT_FAMILY: &str = "DejaVu Sans Mono";

/// How the camera renders, encodes and paces.
#[derive(Clone, Debug)]
pub(crate) struct CameraConfig {
    /// Stream name, drawn into the picture.
    pub name: String,
    /// Picture width in pixels (even, 16..=8192; the barcode needs at least 40, better 80).
    pub width: u32,
    /// Picture height in pixels (even, 16..=8192).
    pub height: u32,
    /// Integer frames per second, 1..=120.
    pub fps: u32,
    /// GOP length: every fragment holds this many frames and starts with an IDR frame.
    pub frames_per_fragment: u32,
    /// Target bit rate of `x264enc` in kbit/s.
    pub bitrate_kbps: u32,
    /// Producer time of frame 0. Pass `now - history` to have the frames up to "now" encoded at
    /// once (as fast as possible) before the camera paces in real time.
    pub start: SystemTime,
    /// How much video lies before "now" (informational: the pacing follows from `start` alone;
    /// the camera logs it when it starts).
    pub history: Duration,
    /// Decode time, in timescale ticks, of frame 0 (not wall time).
    pub decode_time_base: u64,
    /// Stop after this many frames (rounded up to a whole fragment); None runs until stopped.
    pub max_frames: Option<u64>,
}

/// One finished fragment: `frames_per_fragment` encoded frames, the first an IDR frame.
#[derive(Clone, Debug)]
pub(crate) struct EncodedFragment {
    /// Fragment counter: 0, 1, 2, … without gaps.
    pub index: u64,
    /// Global frame number of the fragment's first frame.
    pub first_frame: u64,
    /// Producer time of the fragment's first frame (`start + first_frame / fps`).
    pub producer_start: SystemTime,
    /// Duration of the fragment: frame count / fps.
    pub duration: Duration,
    /// Decode time (timescale ticks) of the first frame; continuous across fragments and
    /// resolution changes.
    pub decode_time: u64,
    /// The track the samples belong to: the same `Arc` until the codec data changes.
    pub track: Arc<VideoTrack>,
    /// The encoded frames in decode order.
    pub samples: Vec<Sample>,
}

/// A running synthetic camera: a thread that renders, encodes and delivers fragments.
///
/// Dropping it stops it like [`Camera::stop`].
pub(crate) struct Camera {
    /// State shared with the camera thread.
    shared: Arc<Shared>,
    /// The camera thread, until it is joined.
    thread: Option<JoinHandle<()>>,
}

/// State shared between [`Camera`] and its thread.
struct Shared {
    /// Set to ask the thread to stop.
    stop: Mutex<bool>,
    /// Wakes the thread when `stop` is set.
    wake: Condvar,
    /// Resolution requested by [`Camera::set_resolution`], applied at the next fragment boundary.
    resolution: Mutex<Option<(u32, u32)>>,
    /// Number of frames encoded so far.
    frames: AtomicU64,
    /// The error that ended the camera thread, if any.
    last_error: Mutex<Option<String>>,
    /// Test hook: makes the thread post an error message on the pipeline's bus.
    #[cfg(test)]
    inject_error: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Whether a stop was requested.
    fn stopping(&self) -> bool {
        *self.stop.lock()
    }

    /// Sleeps until the wall clock reaches `target` (returns `true`) or a stop is requested
    /// (returns `false`). Returns at once when `target` is already past.
    fn wait_until(&self, target: SystemTime) -> bool {
        let mut stop = self.stop.lock();
        loop {
            if *stop {
                return false;
            }
            match target.duration_since(SystemTime::now()) {
                Ok(remaining) if !remaining.is_zero() => {
                    // Bounded so that a wall-clock step is noticed soon.
                    self.wake.wait_for(&mut stop, remaining.min(MAX_SLEEP));
                }
                _ => return true,
            }
        }
    }
}

/// Frame timing: producer time, PTS and decode time of each frame, all exact integers.
#[derive(Clone, Copy, Debug)]
struct Timing {
    /// Producer time of frame 0.
    start: SystemTime,
    /// Frames per second.
    fps: u32,
    /// Ticks per second of the decode times.
    timescale: u32,
    /// Ticks per frame (`timescale / fps`, exact).
    ticks_per_frame: u32,
    /// Decode time of frame 0.
    decode_time_base: u64,
}

impl Timing {
    /// Timing for `fps` frames per second: timescale 90 kHz when it divides evenly, else
    /// `fps * 1000`.
    fn new(start: SystemTime, fps: u32, decode_time_base: u64) -> Self {
        let timescale = if 90_000u32.is_multiple_of(fps) {
            90_000
        } else {
            fps * 1000
        };
        Self {
            start,
            fps,
            timescale,
            ticks_per_frame: timescale / fps,
            decode_time_base,
        }
    }

    /// Time of frame `n` after frame 0, in nanoseconds (`n * 1e9 / fps`, rounded down).
    fn offset_ns(&self, n: u64) -> u128 {
        u128::from(n) * 1_000_000_000 / u128::from(self.fps)
    }

    /// Time of frame `n` after frame 0.
    fn offset(&self, n: u64) -> Duration {
        duration_from_ns(self.offset_ns(n))
    }

    /// Producer time of frame `n`.
    fn producer_time(&self, n: u64) -> SystemTime {
        self.start + self.offset(n)
    }

    /// Buffer PTS of frame `n`.
    fn pts(&self, n: u64) -> gst::ClockTime {
        gst::ClockTime::from_nseconds(u64::try_from(self.offset_ns(n)).unwrap_or(u64::MAX))
    }

    /// Frame number of a buffer with PTS `pts` (the inverse of [`Timing::pts`]).
    fn frame_of_pts(&self, pts: gst::ClockTime) -> u64 {
        let n = (u128::from(pts.nseconds()) * u128::from(self.fps) + 500_000_000) / 1_000_000_000;
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Decode time (ticks) of frame `n`.
    fn decode_time(&self, n: u64) -> u64 {
        self.decode_time_base + n * u64::from(self.ticks_per_frame)
    }

    /// Duration of `frames` frames.
    fn span(&self, frames: u64) -> Duration {
        self.offset(frames)
    }

    /// A nanosecond count converted to ticks, rounded to the nearest tick.
    fn ns_to_ticks(&self, ns: i128) -> i128 {
        let scaled = ns * i128::from(self.timescale);
        (scaled + scaled.signum() * 500_000_000) / 1_000_000_000
    }
}

/// A `Duration` of `ns` nanoseconds (saturating far beyond any realistic value).
fn duration_from_ns(ns: u128) -> Duration {
    let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 1e9 and fits.
    let nanos = (ns % 1_000_000_000) as u32;
    Duration::new(secs, nanos)
}

/// `time` as UTC with milliseconds, e.g. `2026-11-21T10:00:00.040Z` (times before 1970 show as
/// 1970-01-01).
fn format_utc_millis(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Year, month and day of the proleptic Gregorian calendar `days` days after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The overlay text of frame `n`: stream name, frame number and producer time.
fn label(name: &str, n: u64, time: SystemTime) -> String {
    format!("{name}  #{n:06}  {}", format_utc_millis(time))
}

/// Checks a picture size: even, within the accepted range.
fn validate_size(width: u32, height: u32) -> Result<()> {
    if !(MIN_WIDTH..=MAX_DIMENSION).contains(&width)
        || !(MIN_HEIGHT..=MAX_DIMENSION).contains(&height)
        || !width.is_multiple_of(2)
        || !height.is_multiple_of(2)
    {
        return Err(pipeline_error(format!(
            "camera: unsupported picture size {width}x{height} (even, \
             {MIN_WIDTH}..={MAX_DIMENSION} x {MIN_HEIGHT}..={MAX_DIMENSION})"
        )));
    }
    Ok(())
}

/// Checks a whole configuration.
fn validate(cfg: &CameraConfig) -> Result<()> {
    validate_size(cfg.width, cfg.height)?;
    if !(1..=120).contains(&cfg.fps) {
        return Err(pipeline_error(format!(
            "camera {}: fps {} is outside 1..=120",
            cfg.name, cfg.fps
        )));
    }
    if cfg.frames_per_fragment == 0 {
        return Err(pipeline_error(format!(
            "camera {}: frames_per_fragment must be at least 1",
            cfg.name
        )));
    }
    if cfg.bitrate_kbps == 0 {
        return Err(pipeline_error(format!(
            "camera {}: bitrate_kbps must be at least 1",
            cfg.name
        )));
    }
    Ok(())
}

/// A pipeline error with `message`.
fn pipeline_error(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Pipeline, message)
}

/// Where things go in a picture of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Layout {
    /// Rows of the barcode strip (even).
    strip: usize,
    /// Rows of the dark text band below the strip (even).
    band: usize,
    /// Font size of the overlay text in pixels.
    font_px: u32,
    /// Left margin of the text in pixels.
    xpad: u32,
}

impl Layout {
    /// Layout of a `width` × `height` picture whose text line is `label_chars` characters long.
    fn new(width: u32, height: u32, label_chars: usize) -> Self {
        let strip = barcode::strip_height(height as usize);
        let xpad = (width / 80).max(2);
        // DejaVu Sans Mono advances 0.602 em per character.
        let chars = u64::try_from(label_chars.max(20)).unwrap_or(u64::MAX);
        let fit = u64::from(width - 2 * xpad) * 1000 / (chars.saturating_mul(610));
        let font_px = u32::try_from(fit)
            .unwrap_or(u32::MAX)
            .clamp(6, (height / 12).max(6));
        // Line height (about 1.2 em) plus outline and shadow, rounded up to even.
        let band = ((font_px as usize * 3 / 2 + 4) + 1) & !1;
        Self {
            strip,
            band,
            font_px,
            xpad,
        }
    }

    /// First row below the strip and the text band.
    fn scene_top(&self, height: usize) -> usize {
        (self.strip + self.band).min(height)
    }
}

/// Renders the I420 pictures pushed into the pipeline.
struct Renderer {
    /// Size and plane layout of the pictures.
    info: gst_video::VideoInfo,
    /// Where the strip, the band and the scene go.
    layout: Layout,
    /// Two periods of the gradient's luma across the width (a triangle wave, 16..=235, one
    /// period per picture width): each scene row is a window of it.
    gradient: Vec<u8>,
    /// U of one scene chroma row (a static hue gradient).
    u_row: Vec<u8>,
}

impl Renderer {
    /// A renderer for `width` × `height` at `fps`.
    fn new(width: u32, height: u32, fps: u32, layout: Layout) -> Result<Self> {
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, width, height)
            .fps(gst::Fraction::new(i32::try_from(fps).unwrap_or(1), 1))
            .par(gst::Fraction::new(1, 1))
            .build()
            .map_err(|e| pipeline_error(format!("camera: video info {width}x{height}: {e}")))?;
        let width = width as usize;
        let gradient = (0..2 * width)
            .map(|x| {
                let t = (x * 512 / width) & 511;
                let tri = if t < 256 { t } else { 511 - t };
                u8::try_from(16 + tri * 219 / 255).unwrap_or(barcode::WHITE)
            })
            .collect();
        let chroma_width = width.div_ceil(2);
        let u_row = (0..chroma_width)
            .map(|x| u8::try_from(64 + x * 128 / chroma_width).unwrap_or(128))
            .collect();
        Ok(Self {
            info,
            layout,
            gradient,
            u_row,
        })
    }

    /// Caps of the pictures.
    fn caps(&self) -> Result<gst::Caps> {
        self.info
            .to_caps()
            .map_err(|e| pipeline_error(format!("camera: raw caps: {e}")))
    }

    /// Renders frame `n` into a new buffer (timestamps not set). The barcode shows `n` modulo
    /// 2^32 (over five years at 25 fps).
    fn render(&self, n: u64) -> Result<gst::Buffer> {
        let width = self.info.width() as usize;
        let height = self.info.height() as usize;
        let strides = self.info.stride();
        let offsets = self.info.offset();
        let size = self.info.size();
        let (&[ys, us, vs], &[yo, uo, vo]) = (strides, offsets) else {
            return Err(pipeline_error("camera: I420 info without three planes"));
        };
        let ys = usize::try_from(ys).unwrap_or(0);
        let cs = usize::try_from(us).unwrap_or(0);
        if yo != 0 || uo > vo || vo > size || cs != usize::try_from(vs).unwrap_or(0) {
            return Err(pipeline_error("camera: unexpected I420 plane layout"));
        }
        let mut data = vec![0u8; size];
        let (y_plane, chroma) = data.split_at_mut(uo);
        let (u_plane, v_plane) = chroma.split_at_mut(vo - uo);
        self.render_luma(y_plane, ys, width, height, n);
        self.render_chroma(u_plane, v_plane, cs, width, height);
        barcode::draw_i420(y_plane, ys, width, height, n as u32);
        barcode::neutral_chroma_i420(u_plane, v_plane, cs, width, height);
        Self::draw_marker(y_plane, u_plane, v_plane, (ys, cs), width, height);
        Ok(gst::Buffer::from_mut_slice(data))
    }

    /// The red square of [`barcode::red_marker`].
    fn draw_marker(
        y_plane: &mut [u8],
        u_plane: &mut [u8],
        v_plane: &mut [u8],
        (ys, cs): (usize, usize),
        width: usize,
        height: usize,
    ) {
        let (left, top, side) = barcode::red_marker(width, height);
        let (y, u, v) = barcode::RED_YUV;
        for row in top..top + side {
            if let Some(px) = y_plane.get_mut(row * ys + left..row * ys + left + side) {
                px.fill(y);
            }
        }
        for row in top / 2..(top + side) / 2 {
            let span = row * cs + left / 2..row * cs + (left + side) / 2;
            if let Some(px) = u_plane.get_mut(span.clone()) {
                px.fill(u);
            }
            if let Some(px) = v_plane.get_mut(span) {
                px.fill(v);
            }
        }
    }

    /// The luma plane: band, a diagonal gradient scrolling with `n` and a bouncing white box.
    /// (The strip is drawn afterwards by the barcode.)
    fn render_luma(&self, plane: &mut [u8], stride: usize, width: usize, height: usize, n: u64) {
        let top = self.layout.scene_top(height);
        let scene_height = (height - top).max(1);
        // The gradient scrolls by 6/512 of the width per frame.
        let shift = (n % 512) as usize * 6;
        for (y, row) in plane.chunks_mut(stride).take(height).enumerate() {
            let len = width.min(row.len());
            let row = &mut row[..len];
            if y < top {
                row.fill(BAND_LUMA);
                continue;
            }
            let phase = ((y - top) * 256 / scene_height + shift) % 512;
            let offset = phase * width / 512;
            if let Some(window) = self.gradient.get(offset..offset + len) {
                row.copy_from_slice(window);
            }
        }
        // A box of a third of the scene's height, bouncing left and right, 2 s per crossing
        // at 25 fps.
        let side = (scene_height / 3).max(2);
        let travel = width.saturating_sub(side).max(1);
        let step = (travel / 50).max(1);
        let pos = (n as usize).wrapping_mul(step) % (2 * travel);
        let left = if pos < travel { pos } else { 2 * travel - pos };
        let box_top = top + (scene_height - side.min(scene_height)) / 2;
        for y in box_top..(box_top + side).min(height) {
            if let Some(row) =
                plane.get_mut(y * stride + left..y * stride + (left + side).min(width))
            {
                row.fill(barcode::WHITE);
            }
        }
    }

    /// The chroma planes: neutral behind the strip and band, a static hue gradient below.
    fn render_chroma(
        &self,
        u_plane: &mut [u8],
        v_plane: &mut [u8],
        stride: usize,
        width: usize,
        height: usize,
    ) {
        let cw = width.div_ceil(2);
        let ch = height.div_ceil(2);
        let top = self.layout.scene_top(height) / 2;
        let scene = (ch - top.min(ch)).max(1);
        for (y, (u_row, v_row)) in u_plane
            .chunks_mut(stride)
            .zip(v_plane.chunks_mut(stride))
            .take(ch)
            .enumerate()
        {
            let (u_len, v_len) = (cw.min(u_row.len()), cw.min(v_row.len()));
            let u_row = &mut u_row[..u_len];
            let v_row = &mut v_row[..v_len];
            if y < top {
                u_row.fill(barcode::NEUTRAL_CHROMA);
                v_row.fill(barcode::NEUTRAL_CHROMA);
                continue;
            }
            let v = u8::try_from(64 + (y - top) * 128 / scene).unwrap_or(128);
            v_row.fill(v);
            if let Some(u) = self.u_row.get(..u_row.len()) {
                u_row.copy_from_slice(u);
            }
        }
    }
}

/// The GStreamer pipeline; set to `Null` when dropped.
struct Pipeline {
    /// The pipeline.
    pipeline: gst::Pipeline,
    /// Where the rendered pictures go in.
    appsrc: gst_app::AppSrc,
    /// The text overlay (font and position change with the resolution).
    overlay: gst::Element,
    /// Where the encoded access units come out.
    appsink: gst_app::AppSink,
    /// The pipeline's bus.
    bus: gst::Bus,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Err(e) = self.pipeline.set_state(gst::State::Null) {
            warn!("camera: setting the pipeline to Null failed: {e}");
        }
    }
}

/// Makes element `factory` or fails with a message naming it and its Debian package.
fn make(factory: &str) -> Result<gst::Element> {
    crate::elements::make(factory).map_err(|e| pipeline_error(format!("camera: {e}")))
}

impl Pipeline {
    /// Builds the pipeline for `cfg` with the first pictures' caps `raw_caps`.
    fn build(cfg: &CameraConfig, timing: Timing, raw_caps: &gst::Caps) -> Result<Self> {
        let appsrc = gst_app::AppSrc::builder()
            .name("camera-src")
            .caps(raw_caps)
            .format(gst::Format::Time)
            .is_live(true)
            .build();
        let overlay = make("textoverlay")?;
        overlay.set_property("auto-resize", false);
        overlay.set_property("shaded-background", false);
        overlay.set_property_from_str("valignment", "top");
        overlay.set_property_from_str("halignment", "left");
        overlay.set_property_from_str("wrap-mode", "none");
        let encoder = make("x264enc")?;
        encoder.set_property_from_str("tune", "zerolatency");
        encoder.set_property_from_str("speed-preset", "ultrafast");
        encoder.set_property("bitrate", cfg.bitrate_kbps);
        encoder.set_property("key-int-max", cfg.frames_per_fragment);
        encoder.set_property(
            "option-string",
            format!(
                "scenecut=0:keyint={f}:min-keyint={f}",
                f = cfg.frames_per_fragment
            ),
        );
        let parser = make("h264parse")?;
        let h264_caps = gst::Caps::builder("video/x-h264")
            .field("stream-format", "avc")
            .field("alignment", "au")
            .build();
        let appsink = gst_app::AppSink::builder()
            .name("camera-sink")
            .caps(&h264_caps)
            .sync(false)
            .build();
        let pipeline = gst::Pipeline::with_name(&format!("camera-{}", cfg.name));
        let elements = [
            appsrc.upcast_ref::<gst::Element>(),
            &overlay,
            &encoder,
            &parser,
            appsink.upcast_ref::<gst::Element>(),
        ];
        pipeline
            .add_many(elements)
            .map_err(|e| pipeline_error(format!("camera {}: add elements: {e}", cfg.name)))?;
        gst::Element::link_many(elements)
            .map_err(|e| pipeline_error(format!("camera {}: link elements: {e}", cfg.name)))?;
        Self::install_label_probe(&overlay, cfg.name.clone(), timing)?;
        let bus = pipeline
            .bus()
            .ok_or_else(|| pipeline_error(format!("camera {}: pipeline without bus", cfg.name)))?;
        Ok(Self {
            pipeline,
            appsrc,
            overlay,
            appsink,
            bus,
        })
    }

    /// Sets the overlay text of every picture right before `textoverlay` draws it, from the
    /// picture's own PTS: the text always matches the frame it is drawn on.
    fn install_label_probe(overlay: &gst::Element, name: String, timing: Timing) -> Result<()> {
        let pad = overlay
            .static_pad("video_sink")
            .ok_or_else(|| pipeline_error("camera: textoverlay has no video_sink pad"))?;
        let name = gst::glib::markup_escape_text(&name).to_string();
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            if let (Some(pts), Some(overlay)) = (
                info.buffer().and_then(|buffer| buffer.pts()),
                pad.parent_element(),
            ) {
                let n = timing.frame_of_pts(pts);
                overlay.set_property("text", label(&name, n, timing.producer_time(n)));
            }
            gst::PadProbeReturn::Ok
        })
        .ok_or_else(|| pipeline_error("camera: cannot install the overlay probe"))?;
        Ok(())
    }

    /// Places the overlay text for `layout`.
    fn apply_layout(&self, layout: &Layout) {
        self.overlay
            .set_property("font-desc", format!("{FONT_FAMILY} {}px", layout.font_px));
        self.overlay
            .set_property("xpad", i32::try_from(layout.xpad).unwrap_or(0));
        self.overlay
            .set_property("ypad", i32::try_from(layout.strip + 1).unwrap_or(0));
    }

    /// Logs bus warnings and turns the first bus error into an `Err`.
    fn check_bus(&self, name: &str) -> Result<()> {
        while let Some(message) = self
            .bus
            .pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning])
        {
            let source = message
                .src()
                .map(|s| s.path_string().to_string())
                .unwrap_or_default();
            match message.view() {
                gst::MessageView::Error(err) => {
                    return Err(pipeline_error(format!(
                        "camera {name}: GStreamer error from {source}: {} ({})",
                        err.error(),
                        err.debug().map(|d| d.to_string()).unwrap_or_default()
                    )));
                }
                gst::MessageView::Warning(w) => {
                    warn!(
                        camera = name,
                        "GStreamer warning from {source}: {} ({})",
                        w.error(),
                        w.debug().map(|d| d.to_string()).unwrap_or_default()
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A fragment being assembled.
struct PartialFragment {
    /// Its index.
    index: u64,
    /// Its first frame.
    first_frame: u64,
    /// The track of its first sample.
    track: Option<Arc<VideoTrack>>,
    /// Its samples so far.
    samples: Vec<Sample>,
}

/// The camera thread's state.
struct Worker<F> {
    /// Stream name (for logs and the picture).
    name: String,
    /// Frames per fragment.
    frames_per_fragment: u64,
    /// Frame timing.
    timing: Timing,
    /// The pipeline.
    pipe: Pipeline,
    /// The current renderer (changes with the resolution).
    renderer: Renderer,
    /// Characters in the overlay text (for the font size).
    label_chars: usize,
    /// Shared state.
    shared: Arc<Shared>,
    /// Receives the finished fragments.
    on_fragment: F,
    /// Caps of the last encoded sample.
    last_caps: Option<gst::Caps>,
    /// Track of the last encoded sample.
    track: Option<Arc<VideoTrack>>,
    /// The fragment being assembled.
    fragment: Option<PartialFragment>,
    /// Index of the next fragment.
    next_index: u64,
    /// Stop at the first fragment boundary at or after this frame.
    max_frames: Option<u64>,
}

impl<F: FnMut(EncodedFragment)> Worker<F> {
    /// Renders, encodes and delivers until stopped or failed.
    fn run(&mut self) -> Result<()> {
        let mut n: u64 = 0;
        loop {
            if n.is_multiple_of(self.frames_per_fragment) {
                if self.max_frames.is_some_and(|max| n >= max) {
                    info!(
                        camera = self.name.as_str(),
                        frames = n,
                        "camera finished (no live video)"
                    );
                    return Ok(());
                }
                self.apply_pending_resolution()?;
                self.fragment = Some(PartialFragment {
                    index: self.next_index,
                    first_frame: n,
                    track: None,
                    samples: Vec::with_capacity(self.frames_per_fragment as usize),
                });
                self.next_index += 1;
            }
            if !self.shared.wait_until(self.timing.producer_time(n)) {
                return Ok(());
            }
            self.push_frame(n)?;
            let Some(sample) = self.pull_output()? else {
                return Ok(());
            };
            self.add_sample(n, &sample)?;
            self.shared.frames.store(n + 1, Ordering::Relaxed);
            #[cfg(test)]
            if self.shared.inject_error.swap(false, Ordering::Relaxed) {
                gst::element_error!(self.pipe.appsrc, gst::CoreError::Failed, ["injected"]);
            }
            self.pipe.check_bus(&self.name)?;
            if (n + 1).is_multiple_of(self.frames_per_fragment) {
                self.deliver();
            }
            n += 1;
        }
    }

    /// Switches to a resolution requested by [`Camera::set_resolution`], if any.
    fn apply_pending_resolution(&mut self) -> Result<()> {
        let Some((width, height)) = self.shared.resolution.lock().take() else {
            return Ok(());
        };
        if (width, height) == (self.renderer.info.width(), self.renderer.info.height()) {
            return Ok(());
        }
        let layout = Layout::new(width, height, self.label_chars);
        let renderer = Renderer::new(width, height, self.timing.fps, layout)?;
        let caps = renderer.caps()?;
        info!(
            camera = self.name.as_str(),
            "resolution {}x{} -> {width}x{height} at fragment {}",
            self.renderer.info.width(),
            self.renderer.info.height(),
            self.next_index
        );
        // The previous frame has been encoded already (outputs are pulled synchronously), so the
        // overlay is idle and the new caps travel in order with the next buffer.
        self.pipe.apply_layout(&layout);
        self.pipe.appsrc.set_caps(Some(&caps));
        self.renderer = renderer;
        Ok(())
    }

    /// Renders frame `n` and pushes it.
    fn push_frame(&mut self, n: u64) -> Result<()> {
        let mut buffer = self.renderer.render(n)?;
        {
            let buffer = buffer
                .get_mut()
                .ok_or_else(|| pipeline_error("camera: new buffer is not writable"))?;
            let pts = self.timing.pts(n);
            buffer.set_pts(pts);
            buffer.set_duration(self.timing.pts(n + 1).saturating_sub(pts));
            buffer.set_offset(n);
        }
        if let Err(flow) = self.pipe.appsrc.push_buffer(buffer) {
            self.pipe.check_bus(&self.name)?;
            return Err(pipeline_error(format!(
                "camera {}: pushing frame {n} failed: {flow:?}",
                self.name
            )));
        }
        Ok(())
    }

    /// Waits for the next encoded access unit; `None` if a stop was requested meanwhile.
    fn pull_output(&mut self) -> Result<Option<gst::Sample>> {
        let deadline = Instant::now() + OUTPUT_TIMEOUT;
        loop {
            if let Some(sample) = self
                .pipe
                .appsink
                .try_pull_sample(gst::ClockTime::from_mseconds(PULL_SLICE_MS))
            {
                return Ok(Some(sample));
            }
            self.pipe.check_bus(&self.name)?;
            if self.shared.stopping() {
                return Ok(None);
            }
            if self.pipe.appsink.is_eos() {
                return Err(pipeline_error(format!(
                    "camera {}: the encoder branch ended unexpectedly",
                    self.name
                )));
            }
            if Instant::now() > deadline {
                return Err(pipeline_error(format!(
                    "camera {}: no encoded output within {OUTPUT_TIMEOUT:?}",
                    self.name
                )));
            }
        }
    }

    /// The track described by `caps`, reusing the current `Arc` when nothing changed.
    fn track_for(&mut self, caps: Option<&gst::CapsRef>) -> Result<Arc<VideoTrack>> {
        if let (Some(track), Some(caps), Some(last)) = (&self.track, caps, &self.last_caps)
            && caps == last.as_ref()
        {
            return Ok(track.clone());
        }
        let caps = caps
            .ok_or_else(|| pipeline_error(format!("camera {}: sample without caps", self.name)))?;
        let s = caps
            .structure(0)
            .ok_or_else(|| pipeline_error(format!("camera {}: empty caps", self.name)))?;
        let dimension = |field: &str| {
            s.get::<i32>(field)
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| {
                    pipeline_error(format!(
                        "camera {}: caps without {field}: {caps}",
                        self.name
                    ))
                })
        };
        let codec_data = s.get::<gst::Buffer>("codec_data").map_err(|_| {
            pipeline_error(format!(
                "camera {}: caps without codec_data: {caps}",
                self.name
            ))
        })?;
        let avcc = codec_data
            .map_readable()
            .map_err(|_| pipeline_error("camera: cannot map codec_data"))?
            .to_vec();
        let track = VideoTrack {
            width: dimension("width")?,
            height: dimension("height")?,
            timescale: self.timing.timescale,
            avcc,
        };
        self.last_caps = Some(caps.to_owned());
        match &self.track {
            Some(current) if **current == track => Ok(current.clone()),
            _ => {
                info!(
                    camera = self.name.as_str(),
                    "new track {}x{}, {} bytes of codec data",
                    track.width,
                    track.height,
                    track.avcc.len()
                );
                let track = Arc::new(track);
                self.track = Some(track.clone());
                Ok(track)
            }
        }
    }

    /// Adds the encoded sample of frame `n` to the current fragment.
    fn add_sample(&mut self, n: u64, sample: &gst::Sample) -> Result<()> {
        let track = self.track_for(sample.caps())?;
        let buffer = sample.buffer_owned().ok_or_else(|| {
            pipeline_error(format!("camera {}: sample without buffer", self.name))
        })?;
        let is_sync = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
        // Encoders may shift timestamps (x264enc adds 1000 h so that DTS never goes negative)
        // and say so in the segment: compare in running time.
        let pts = buffer.pts().map(|pts| {
            sample
                .segment()
                .and_then(|segment| segment.downcast_ref::<gst::format::Time>())
                .and_then(|segment| segment.to_running_time(pts))
                .unwrap_or(pts)
        });
        if let Some(pts) = pts
            && self.timing.frame_of_pts(pts) != n
        {
            warn!(
                camera = self.name.as_str(),
                "encoded frame has PTS {pts} (frame {}), expected frame {n}",
                self.timing.frame_of_pts(pts)
            );
        }
        let composition_offset = match (pts, buffer.dts()) {
            (Some(pts), Some(dts)) => {
                let ns = i128::from(pts.nseconds()) - i128::from(dts.nseconds());
                i32::try_from(self.timing.ns_to_ticks(ns)).unwrap_or(0)
            }
            _ => 0,
        };
        let data = match buffer.into_mapped_buffer_readable() {
            Ok(mapped) => bytes::Bytes::from_owner(mapped),
            Err(_) => {
                return Err(pipeline_error(format!(
                    "camera {}: cannot map encoded frame {n}",
                    self.name
                )));
            }
        };
        let Some(fragment) = self.fragment.as_mut() else {
            return Err(pipeline_error("camera: sample outside a fragment"));
        };
        match &fragment.track {
            None => {
                if !is_sync {
                    warn!(
                        camera = self.name.as_str(),
                        "fragment {} starts with a non-sync sample (frame {n})", fragment.index
                    );
                }
                fragment.track = Some(track);
            }
            Some(first) if !Arc::ptr_eq(first, &track) => {
                warn!(
                    camera = self.name.as_str(),
                    "codec data changed inside fragment {} (frame {n})", fragment.index
                );
            }
            Some(_) => {}
        }
        fragment.samples.push(Sample {
            data,
            duration: self.timing.ticks_per_frame,
            composition_offset,
            is_sync,
        });
        Ok(())
    }

    /// Hands the finished fragment to the callback.
    fn deliver(&mut self) {
        let Some(fragment) = self.fragment.take() else {
            return;
        };
        let Some(track) = fragment.track else {
            return;
        };
        let frames = fragment.samples.len() as u64;
        let encoded = EncodedFragment {
            index: fragment.index,
            first_frame: fragment.first_frame,
            producer_start: self.timing.producer_time(fragment.first_frame),
            duration: self.timing.span(frames),
            decode_time: self.timing.decode_time(fragment.first_frame),
            track,
            samples: fragment.samples,
        };
        debug!(
            camera = self.name.as_str(),
            index = encoded.index,
            first_frame = encoded.first_frame,
            "fragment ready"
        );
        (self.on_fragment)(encoded);
    }
}

impl Camera {
    /// Starts the camera thread. `on_fragment` is called (from the camera thread) for every
    /// finished fragment, in order; while it runs, the camera does not encode, so it should
    /// return quickly.
    ///
    /// Fails when the configuration is out of range or the pipeline cannot be built or started.
    pub fn start(
        cfg: CameraConfig,
        on_fragment: impl FnMut(EncodedFragment) + Send + 'static,
    ) -> Result<Camera> {
        validate(&cfg)?;
        gst::init().map_err(|e| pipeline_error(format!("GStreamer init: {e}")))?;
        let timing = Timing::new(cfg.start, cfg.fps, cfg.decode_time_base);
        // The label's length with an 8-digit frame number.
        let label_chars = label(&cfg.name, 10_000_000, cfg.start).chars().count();
        let layout = Layout::new(cfg.width, cfg.height, label_chars);
        let renderer = Renderer::new(cfg.width, cfg.height, cfg.fps, layout)?;
        let pipe = Pipeline::build(&cfg, timing, &renderer.caps()?)?;
        pipe.apply_layout(&layout);
        if let Err(e) = pipe.pipeline.set_state(gst::State::Playing) {
            pipe.check_bus(&cfg.name)?;
            return Err(pipeline_error(format!(
                "camera {}: cannot start the pipeline: {e}",
                cfg.name
            )));
        }
        info!(
            camera = cfg.name.as_str(),
            "camera {}x{} at {} fps, {} frames per fragment, {} kbit/s, {:?} of history",
            cfg.width,
            cfg.height,
            cfg.fps,
            cfg.frames_per_fragment,
            cfg.bitrate_kbps,
            cfg.history
        );
        let shared = Arc::new(Shared {
            stop: Mutex::new(false),
            wake: Condvar::new(),
            resolution: Mutex::new(None),
            frames: AtomicU64::new(0),
            last_error: Mutex::new(None),
            #[cfg(test)]
            inject_error: std::sync::atomic::AtomicBool::new(false),
        });
        let mut worker = Worker {
            name: cfg.name.clone(),
            frames_per_fragment: u64::from(cfg.frames_per_fragment),
            timing,
            pipe,
            renderer,
            label_chars,
            shared: shared.clone(),
            on_fragment,
            last_caps: None,
            track: None,
            fragment: None,
            next_index: 0,
            max_frames: cfg.max_frames,
        };
        let thread = std::thread::Builder::new()
            .name(format!("camera-{}", cfg.name))
            .spawn(move || {
                if let Err(e) = worker.run() {
                    error!(camera = worker.name.as_str(), "camera stopped: {e}");
                    *worker.shared.last_error.lock() = Some(e.to_string());
                }
                // Dropping the worker sets the pipeline to Null.
            })
            .map_err(|e| {
                pipeline_error(format!("camera {}: cannot spawn thread: {e}", cfg.name))
            })?;
        Ok(Camera {
            shared,
            thread: Some(thread),
        })
    }

    /// Changes the resolution starting at the next fragment boundary: the next fragment starts
    /// with an IDR frame and carries a new [`VideoTrack`] with new codec data; decode times stay
    /// continuous. A size that is odd or out of range is ignored with a warning.
    pub fn set_resolution(&self, width: u32, height: u32) {
        if let Err(e) = validate_size(width, height) {
            warn!("camera: set_resolution ignored: {e}");
            return;
        }
        *self.shared.resolution.lock() = Some((width, height));
    }

    /// Number of frames encoded so far (for diagnostics).
    pub fn frames_encoded(&self) -> u64 {
        self.shared.frames.load(Ordering::Relaxed)
    }

    /// The error that ended the camera thread (a GStreamer bus error, a push failure, …), if any.
    pub fn last_error(&self) -> Option<String> {
        self.shared.last_error.lock().clone()
    }

    /// Whether the camera thread is still running (it ends on an error or a stop).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Stops and joins the camera thread, which sets the pipeline to `Null`. A fragment still
    /// being assembled is dropped. Also done on drop.
    pub fn stop(mut self) {
        self.shutdown();
    }

    /// Asks the thread to stop and joins it.
    fn shutdown(&mut self) {
        *self.shared.stop.lock() = true;
        self.shared.wake.notify_all();
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            error!("camera thread panicked");
            *self.shared.last_error.lock() = Some("camera thread panicked".to_owned());
        }
    }
}

impl Drop for Camera {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Decode time of frame 0 in the tests (anything but 0, to see that it is honoured).
    const BASE: u64 = 123_456_789;

    /// A fragment as the test received it.
    struct Received {
        /// Monotonic arrival time.
        at: Instant,
        /// Wall-clock arrival time.
        wall: SystemTime,
        /// The fragment.
        fragment: EncodedFragment,
    }

    /// One decoded GRAY8 picture.
    struct Decoded {
        /// Width.
        width: usize,
        /// Height.
        height: usize,
        /// Tightly packed luma.
        gray: Vec<u8>,
    }

    impl Decoded {
        /// The frame number its barcode shows.
        fn number(&self) -> Option<u32> {
            barcode::read_gray8(&self.gray, self.width, self.width, self.height)
        }
    }

    /// A 25 fps test configuration whose frame 0 lies `history` before now.
    fn config(name: &str, width: u32, height: u32, fpf: u32, history: Duration) -> CameraConfig {
        CameraConfig {
            name: name.to_owned(),
            width,
            height,
            fps: 25,
            frames_per_fragment: fpf,
            bitrate_kbps: 800,
            start: SystemTime::now() - history,
            history,
            decode_time_base: BASE,
            max_frames: None,
        }
    }

    /// Starts a camera that sends every fragment, with its arrival time, to the receiver.
    fn start(cfg: CameraConfig) -> (Camera, mpsc::Receiver<Received>) {
        let (tx, rx) = mpsc::channel();
        let camera = Camera::start(cfg, move |fragment| {
            let _ = tx.send(Received {
                at: Instant::now(),
                wall: SystemTime::now(),
                fragment,
            });
        })
        .expect("camera starts");
        (camera, rx)
    }

    /// The next fragment (fails the test after 5 s, with the camera's error).
    fn recv(camera: &Camera, rx: &mpsc::Receiver<Received>) -> Received {
        rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| {
            panic!(
                "no fragment: {e}; camera error: {:?}, frames {}",
                camera.last_error(),
                camera.frames_encoded()
            )
        })
    }

    /// Decodes the samples of `fragments` (all of `track`) into GRAY8 pictures with GStreamer.
    fn decode(track: &VideoTrack, fragments: &[&EncodedFragment]) -> Vec<Decoded> {
        gst::init().expect("gst init");
        let caps = gst::Caps::builder("video/x-h264")
            .field("stream-format", "avc")
            .field("alignment", "au")
            .field("width", track.width as i32)
            .field("height", track.height as i32)
            .field("framerate", gst::Fraction::new(25, 1))
            .field("codec_data", gst::Buffer::from_slice(track.avcc.clone()))
            .build();
        let appsrc = gst_app::AppSrc::builder()
            .caps(&caps)
            .format(gst::Format::Time)
            .build();
        let decoder = make("avdec_h264").expect("avdec_h264");
        let convert = make("videoconvert").expect("videoconvert");
        let appsink = gst_app::AppSink::builder()
            .caps(
                &gst::Caps::builder("video/x-raw")
                    .field("format", "GRAY8")
                    .build(),
            )
            .sync(false)
            .build();
        let pipeline = gst::Pipeline::new();
        let elements = [
            appsrc.upcast_ref::<gst::Element>(),
            &decoder,
            &convert,
            appsink.upcast_ref::<gst::Element>(),
        ];
        pipeline.add_many(elements).expect("add");
        gst::Element::link_many(elements).expect("link");
        pipeline.set_state(gst::State::Playing).expect("playing");
        let mut pushed = 0u64;
        for fragment in fragments {
            assert_eq!(*fragment.track, *track);
            for (i, sample) in fragment.samples.iter().enumerate() {
                let mut buffer = gst::Buffer::from_slice(sample.data.clone());
                let b = buffer.get_mut().expect("writable");
                let t = gst::ClockTime::from_mseconds((fragment.first_frame + i as u64) * 40);
                b.set_pts(t);
                b.set_dts(t);
                b.set_duration(gst::ClockTime::from_mseconds(40));
                if !sample.is_sync {
                    b.set_flags(gst::BufferFlags::DELTA_UNIT);
                }
                appsrc.push_buffer(buffer).expect("push");
                pushed += 1;
            }
        }
        appsrc.end_of_stream().expect("eos");
        let mut out = Vec::new();
        while let Some(sample) = appsink.try_pull_sample(gst::ClockTime::from_seconds(5)) {
            let info = gst_video::VideoInfo::from_caps(sample.caps().expect("caps")).expect("info");
            let (width, height) = (info.width() as usize, info.height() as usize);
            let stride = info.stride()[0] as usize;
            let map = sample
                .buffer()
                .expect("buffer")
                .map_readable()
                .expect("map");
            let gray = (0..height)
                .flat_map(|y| map[y * stride..y * stride + width].iter().copied())
                .collect();
            out.push(Decoded {
                width,
                height,
                gray,
            });
        }
        pipeline.set_state(gst::State::Null).expect("null");
        assert_eq!(
            out.len() as u64,
            pushed,
            "every sample decodes to a picture"
        );
        out
    }

    /// Checks that the text band of every picture holds text and changes from one picture to the
    /// next (the overlay text is updated per frame).
    fn assert_text_changes_per_frame(pictures: &[Decoded], name: &str) {
        let first = &pictures[0];
        let label_chars = label(name, 10_000_000, UNIX_EPOCH).chars().count();
        let layout = Layout::new(first.width as u32, first.height as u32, label_chars);
        let rows = layout.strip + 1..layout.strip + layout.band - 1;
        let band = |p: &Decoded| -> Vec<u8> {
            rows.clone()
                .flat_map(|y| p.gray[y * p.width..(y + 1) * p.width].to_vec())
                .collect()
        };
        for pair in pictures.windows(2) {
            let (a, b) = (band(&pair[0]), band(&pair[1]));
            let bright = b.iter().filter(|&&v| v > 160).count();
            assert!(
                bright > 30,
                "text drawn in the band ({bright} bright pixels)"
            );
            let changed = a
                .iter()
                .zip(&b)
                .filter(|&(&x, &y)| x.abs_diff(y) > 64)
                .count();
            assert!(
                changed > 20,
                "band of #{:?} and #{:?} differ in {changed} pixels only",
                pair[0].number(),
                pair[1].number()
            );
        }
    }

    /// Producer times print as UTC with milliseconds, including leap days.
    #[test]
    fn formats_utc_with_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_255_200_040);
        assert_eq!(format_utc_millis(t), "2026-11-21T10:00:00.040Z");
        assert_eq!(format_utc_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399);
        assert_eq!(format_utc_millis(leap), "2000-02-29T23:59:59.000Z");
        assert_eq!(
            label("cam-1", 123, t),
            "cam-1  #000123  2026-11-21T10:00:00.040Z"
        );
    }

    /// Producer times, PTS and decode times follow from the frame number without drift.
    #[test]
    fn timing_is_exact_integer_arithmetic() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let t = Timing::new(start, 25, 7);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 3600));
        assert_eq!(t.decode_time(10), 7 + 36_000);
        assert_eq!(t.producer_time(25), start + Duration::from_secs(1));
        let t = Timing::new(start, 7, 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (7000, 1000));
        let t = Timing::new(start, 3, 0);
        assert_eq!(
            t.producer_time(3_000_000_000),
            start + Duration::from_secs(1_000_000_000)
        );
        assert_eq!(t.offset(1), Duration::from_nanos(333_333_333));
        for n in [0, 1, 2, 3, 1_000_001, 9_999_999_999] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n);
        }
        let t = Timing::new(start, 120, 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 750));
        for n in [0, 1, 7, 119, 1_234_567] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n);
        }
    }

    /// Out-of-range configurations are refused before anything starts.
    #[test]
    fn rejects_bad_configs() {
        for cfg in [
            CameraConfig {
                fps: 0,
                ..config("bad", 320, 240, 25, Duration::ZERO)
            },
            CameraConfig {
                fps: 121,
                ..config("bad", 320, 240, 25, Duration::ZERO)
            },
            config("bad", 321, 240, 25, Duration::ZERO),
            config("bad", 320, 14, 25, Duration::ZERO),
            config("bad", 8194, 240, 25, Duration::ZERO),
            config("bad", 320, 240, 0, Duration::ZERO),
        ] {
            let name = format!(
                "{}x{} {} fps {}",
                cfg.width, cfg.height, cfg.fps, cfg.frames_per_fragment
            );
            let err = Camera::start(cfg, |_| {}).err().expect(&name);
            assert!(err.to_string().contains("camera"), "{err}");
        }
    }

    /// History comes at once, then real time; fragments are continuous, start with an IDR and
    /// decode to pictures whose barcodes and overlay text show every frame.
    #[test]
    fn delivers_continuous_fragments_with_history_then_in_real_time() {
        let history = Duration::from_secs(2);
        let cfg = config("cam-1", 320, 240, 25, history);
        let start_time = cfg.start;
        let started = Instant::now();
        let (camera, rx) = start(cfg);
        let got: Vec<Received> = (0..4).map(|_| recv(&camera, &rx)).collect();
        assert!(camera.frames_encoded() >= 100);
        camera.stop();

        // The two fragments of history come faster than real time (the bound is the claim
        // itself, not a speed: encoding may be slow on a loaded machine).
        let history_done = got[1].at - started;
        assert!(
            history_done < history,
            "2 s of history took {history_done:?}"
        );
        for (k, r) in got.iter().enumerate() {
            let f = &r.fragment;
            let k = k as u64;
            assert_eq!(f.index, k);
            assert_eq!(f.first_frame, 25 * k);
            assert_eq!(f.decode_time, BASE + 25 * 3600 * k);
            assert_eq!(f.producer_start, start_time + Duration::from_secs(k));
            assert_eq!(f.duration, Duration::from_secs(1));
            assert_eq!(f.samples.len(), 25);
            assert_eq!(
                (f.track.width, f.track.height, f.track.timescale),
                (320, 240, 90_000)
            );
            assert!(Arc::ptr_eq(&f.track, &got[0].fragment.track));
            assert!(f.samples[0].is_sync, "fragment {k} starts with an IDR");
            assert!(
                f.samples[1..].iter().all(|s| !s.is_sync),
                "only the first frame of fragment {k} is a key frame"
            );
            assert!(f.samples.iter().all(|s| s.duration == 3600));
            assert!(f.samples.iter().all(|s| s.composition_offset == 0));
            assert!(f.samples.iter().all(|s| !s.data.is_empty()));
            // AVCC: 4-byte length-prefixed NAL units that fill the access unit exactly.
            let mut rest = &f.samples[0].data[..];
            while !rest.is_empty() {
                let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
                rest = &rest[4 + len..];
            }
            if k >= 2 {
                // Real time: delivered once its last frame's producer time has come, not long
                // after.
                let last_frame_time = f.producer_start + f.duration - Duration::from_millis(40);
                let ahead = last_frame_time.duration_since(r.wall).unwrap_or_default();
                assert!(
                    ahead < Duration::from_millis(15),
                    "fragment {k} {ahead:?} early"
                );
                let late = r.wall.duration_since(last_frame_time).unwrap_or_default();
                assert!(
                    late < Duration::from_millis(750),
                    "fragment {k} {late:?} late"
                );
            }
        }
        let gap = got[3].at - got[2].at;
        assert!(
            (Duration::from_millis(600)..Duration::from_millis(1400)).contains(&gap),
            "real-time fragments {gap:?} apart"
        );

        let fragments: Vec<&EncodedFragment> = got[..3].iter().map(|r| &r.fragment).collect();
        let pictures = decode(&got[0].fragment.track, &fragments);
        let numbers: Vec<Option<u32>> = pictures.iter().map(Decoded::number).collect();
        let expected: Vec<Option<u32>> = (0..75).map(Some).collect();
        assert_eq!(numbers, expected);
        assert!(pictures.iter().all(|p| (p.width, p.height) == (320, 240)));
        assert_text_changes_per_frame(&pictures, "cam-1");
    }

    /// A new resolution starts at a fragment boundary with an IDR, a new track and continuous
    /// decode times, and decodes at the new size.
    #[test]
    fn changes_resolution_at_the_next_fragment_boundary() {
        let cfg = config("cam-res", 320, 240, 10, Duration::from_millis(500));
        let (camera, rx) = start(cfg);
        let first = recv(&camera, &rx);
        camera.set_resolution(641, 360); // odd: ignored
        camera.set_resolution(640, 360);
        let mut before = vec![first.fragment];
        let changed = loop {
            let f = recv(&camera, &rx).fragment;
            if f.track.width != 320 {
                break f;
            }
            assert!(before.len() < 4, "resolution did not change");
            before.push(f);
        };
        let after = recv(&camera, &rx).fragment;
        camera.stop();

        let old = before.last().expect("a fragment before the change");
        assert!(before.iter().all(|f| Arc::ptr_eq(&f.track, &old.track)));
        assert_eq!((old.track.width, old.track.height), (320, 240));
        assert_eq!((changed.track.width, changed.track.height), (640, 360));
        assert_eq!(changed.track.timescale, 90_000);
        assert_ne!(changed.track.avcc, old.track.avcc);
        assert_eq!(changed.index, old.index + 1);
        assert_eq!(changed.first_frame, old.first_frame + 10);
        assert_eq!(changed.decode_time, old.decode_time + 10 * 3600);
        assert_eq!(
            changed.producer_start,
            old.producer_start + Duration::from_millis(400)
        );
        assert!(changed.samples[0].is_sync);
        assert!(Arc::ptr_eq(&after.track, &changed.track));
        assert_eq!(after.decode_time, changed.decode_time + 10 * 3600);
        assert!(after.samples[0].is_sync);
        assert!(after.samples[1..].iter().all(|s| !s.is_sync));

        let pictures = decode(&changed.track, &[&changed, &after]);
        assert!(pictures.iter().all(|p| (p.width, p.height) == (640, 360)));
        let numbers: Vec<Option<u32>> = pictures.iter().map(Decoded::number).collect();
        let first = changed.first_frame as u32;
        let expected: Vec<Option<u32>> = (first..first + 20).map(Some).collect();
        assert_eq!(numbers, expected);
        assert_text_changes_per_frame(&pictures, "cam-res");
    }

    /// A GStreamer error ends the camera thread and is reported by `last_error`.
    #[test]
    fn a_bus_error_ends_the_camera_and_is_reported() {
        let (camera, rx) = start(config("cam-err", 320, 240, 5, Duration::from_secs(1)));
        let _ = recv(&camera, &rx);
        camera.shared.inject_error.store(true, Ordering::Relaxed);
        let t = Instant::now();
        while camera.is_running() {
            assert!(t.elapsed() < Duration::from_secs(2), "camera still running");
            std::thread::sleep(Duration::from_millis(10));
        }
        let error = camera.last_error().expect("error recorded");
        assert!(error.contains("injected"), "{error}");
        let frames = camera.frames_encoded();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(camera.frames_encoded(), frames);
        camera.stop();
    }

    /// Tiny pictures encode and decode too (their barcode is readable from 40 pixels wide).
    #[test]
    fn encodes_tiny_pictures() {
        for (width, height, readable) in [(16u32, 16u32, false), (40, 16, true), (80, 48, true)] {
            let (camera, rx) = start(config("cam-tiny", width, height, 5, Duration::from_secs(1)));
            let f = recv(&camera, &rx).fragment;
            camera.stop();
            assert_eq!((f.track.width, f.track.height), (width, height));
            let pictures = decode(&f.track, &[&f]);
            assert_eq!(pictures.len(), 5);
            if readable {
                let numbers: Vec<Option<u32>> = pictures.iter().map(Decoded::number).collect();
                assert_eq!(
                    numbers,
                    (0..5).map(Some).collect::<Vec<_>>(),
                    "{width}x{height}"
                );
            }
        }
    }

    /// `stop` and drop return quickly whether the camera is encoding or sleeping.
    #[test]
    fn stops_promptly_while_catching_up_and_while_pacing() {
        // Ten minutes of history: the camera is busy encoding as fast as it can.
        let (camera, _rx) = start(config("cam-busy", 320, 240, 25, Duration::from_secs(600)));
        std::thread::sleep(Duration::from_millis(300));
        assert!(camera.is_running());
        let t = Instant::now();
        camera.stop();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t.elapsed()
        );

        // No history: the camera sleeps between frames.
        let (camera, rx) = start(config("cam-idle", 320, 240, 5, Duration::ZERO));
        let _ = recv(&camera, &rx);
        let encoded = camera.frames_encoded();
        assert!(encoded >= 5);
        assert_eq!(camera.last_error(), None);
        let t = Instant::now();
        camera.stop();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "stop took {:?}",
            t.elapsed()
        );

        // Dropping stops too.
        let (camera, _rx) = start(config("cam-drop", 320, 240, 5, Duration::ZERO));
        let t = Instant::now();
        drop(camera);
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "drop took {:?}",
            t.elapsed()
        );
    }
}
