//! Decoded frames and their timestamps.

use std::fmt;
use std::time::{Duration, SystemTime};

use gstreamer as gst;
use gstreamer_video as gst_video;

mod geometry;
#[cfg(any(feature = "ndarray", feature = "image"))]
mod views;

pub use geometry::{FrameGeometry, Rect, ResizeMode};

pub use crate::decode::ColorConversion;

/// Pixel layout of delivered frames, or JPEG.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum PixelFormat {
    /// 3 bytes per pixel, blue-green-red: what OpenCV expects (default).
    #[default]
    Bgr,
    /// 3 bytes per pixel, red-green-blue (numpy/PIL, most ML models).
    Rgb,
    /// 4 bytes per pixel, red-green-blue-alpha.
    Rgba,
    /// 4 bytes per pixel, blue-green-red-alpha.
    Bgra,
    /// 1 byte per pixel, luma only: cheapest for detectors that work in grey.
    Gray8,
    /// Planar YUV 4:2:0 (Y, U, V planes): the decoder's own layout, no colour conversion.
    I420,
    /// Semi-planar YUV 4:2:0 (Y plane, interleaved UV plane).
    Nv12,
    /// One complete JPEG (JFIF) image per frame, encoded after scaling with `jpegenc` at
    /// `quality` (1–100; 85 is a good default): for services that post frames to an HTTP
    /// endpoint (AI inference, thumbnails). [`Frame::data`] is the whole file; a frame has no
    /// planes, stride or rows. Not a raw format: [`video_format`](Self::video_format) is None.
    Jpeg {
        /// Encoder quality, 1 (smallest) to 100 (best).
        quality: u8,
    },
}

impl PixelFormat {
    /// JPEG at the default quality, 85.
    pub const JPEG: PixelFormat = PixelFormat::Jpeg { quality: 85 };

    /// Every raw (uncompressed) format; JPEG is not listed (it takes a quality:
    /// [`PixelFormat::JPEG`] or `PixelFormat::Jpeg { quality }`).
    pub const ALL: [PixelFormat; 7] = [
        PixelFormat::Bgr,
        PixelFormat::Rgb,
        PixelFormat::Rgba,
        PixelFormat::Bgra,
        PixelFormat::Gray8,
        PixelFormat::I420,
        PixelFormat::Nv12,
    ];

    /// The GStreamer raw video format; None for [`Jpeg`](PixelFormat::Jpeg), which has no
    /// raw equivalent.
    pub fn video_format(self) -> Option<gst_video::VideoFormat> {
        Some(match self {
            PixelFormat::Bgr => gst_video::VideoFormat::Bgr,
            PixelFormat::Rgb => gst_video::VideoFormat::Rgb,
            PixelFormat::Rgba => gst_video::VideoFormat::Rgba,
            PixelFormat::Bgra => gst_video::VideoFormat::Bgra,
            PixelFormat::Gray8 => gst_video::VideoFormat::Gray8,
            PixelFormat::I420 => gst_video::VideoFormat::I420,
            PixelFormat::Nv12 => gst_video::VideoFormat::Nv12,
            PixelFormat::Jpeg { .. } => return None,
        })
    }

    /// Whether frames are raw pixels (every format but [`Jpeg`](PixelFormat::Jpeg)).
    pub fn is_raw(self) -> bool {
        !matches!(self, PixelFormat::Jpeg { .. })
    }

    /// Checks the JPEG quality (1–100); raw formats are always valid. Builders call it and
    /// report an [`InvalidConfig`](crate::ErrorKind::InvalidConfig) error naming `pixel_format`.
    pub fn validate(self) -> crate::Result<()> {
        match self {
            PixelFormat::Jpeg { quality } if !(1..=100).contains(&quality) => {
                Err(crate::Error::invalid_config(
                    "pixel_format",
                    format!("jpeg:{quality}"),
                    "the JPEG quality must be between 1 and 100",
                ))
            }
            _ => Ok(()),
        }
    }

    /// Lower-case name (`bgr`, `rgb`, `rgba`, `bgra`, `gray8`, `i420`, `nv12`, `jpeg`; the
    /// JPEG quality is in [`Display`](fmt::Display): `jpeg:85`).
    pub fn as_str(self) -> &'static str {
        match self {
            PixelFormat::Bgr => "bgr",
            PixelFormat::Rgb => "rgb",
            PixelFormat::Rgba => "rgba",
            PixelFormat::Bgra => "bgra",
            PixelFormat::Gray8 => "gray8",
            PixelFormat::I420 => "i420",
            PixelFormat::Nv12 => "nv12",
            PixelFormat::Jpeg { .. } => "jpeg",
        }
    }

    /// Bytes per pixel of packed formats (None for the planar YUV formats and JPEG).
    pub fn bytes_per_pixel(self) -> Option<usize> {
        match self {
            PixelFormat::Bgr | PixelFormat::Rgb => Some(3),
            PixelFormat::Rgba | PixelFormat::Bgra => Some(4),
            PixelFormat::Gray8 => Some(1),
            PixelFormat::I420 | PixelFormat::Nv12 | PixelFormat::Jpeg { .. } => None,
        }
    }
}

impl fmt::Display for PixelFormat {
    /// The [`as_str`](PixelFormat::as_str) name; JPEG with its quality (`jpeg:85`), which
    /// [`FromStr`](std::str::FromStr) parses back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PixelFormat::Jpeg { quality } => write!(f, "jpeg:{quality}"),
            other => f.write_str(other.as_str()),
        }
    }
}

impl std::str::FromStr for PixelFormat {
    type Err = crate::Error;
    /// A name of [`as_str`](PixelFormat::as_str) (ASCII case-insensitive; `gray` for `gray8`),
    /// `jpeg` (quality 85) or `jpeg:QUALITY` (1–100).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.to_ascii_lowercase();
        if lower == "jpeg" || lower == "jpg" {
            return Ok(PixelFormat::JPEG);
        }
        if let Some(q) = lower
            .strip_prefix("jpeg:")
            .or_else(|| lower.strip_prefix("jpg:"))
        {
            let format = q
                .parse::<u8>()
                .map(|quality| PixelFormat::Jpeg { quality })
                .map_err(|_| {
                    crate::Error::invalid_config(
                        "pixel_format",
                        format!("{s:?}"),
                        "the JPEG quality must be a number between 1 and 100",
                    )
                })?;
            format.validate()?;
            return Ok(format);
        }
        PixelFormat::ALL
            .into_iter()
            .find(|f| {
                f.as_str().eq_ignore_ascii_case(s)
                    || (s.eq_ignore_ascii_case("gray") && *f == PixelFormat::Gray8)
            })
            .ok_or_else(|| {
                crate::Error::invalid_config(
                    "pixel_format",
                    format!("{s:?}"),
                    "must be one of bgr, rgb, rgba, bgra, gray8, i420, nv12, jpeg, jpeg:QUALITY (1-100)",
                )
            })
    }
}

/// Which fragment a frame came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FragmentId {
    /// The fragment's `EXT-X-PROGRAM-DATE-TIME` (its producer or server start time, per the
    /// session's selector), when the playlist carries it: this identifies a fragment across
    /// sessions.
    pub program_date_time: Option<SystemTime>,
    /// Its media sequence number in the session that delivered it (session-local).
    pub media_sequence: u64,
    /// Which session of this source delivered it (1 for the first, +1 per refresh or reconnect;
    /// GetMedia: per connection).
    pub session: u64,
    /// The KVS fragment number (`AWS_KINESISVIDEO_FRAGMENT_NUMBER`), when the transport carries
    /// it (GetMedia; HLS does not).
    pub fragment_number: Option<std::sync::Arc<str>>,
    /// The fragment's server timestamp (`AWS_KINESISVIDEO_SERVER_TIMESTAMP`: when KVS received
    /// its first frame), when the transport carries it (GetMedia).
    pub server_time: Option<SystemTime>,
}

/// One decoded frame. The pixels are the GStreamer buffer itself (no copy after the decoder
/// and converter); the frame keeps it mapped for reading while it lives.
///
/// With [`PixelFormat::Jpeg`] the buffer is one JPEG image: [`data`](Frame::data) is the
/// file, [`width`](Frame::width) and [`height`](Frame::height) are its size, and the
/// pixel-layout accessors (planes, stride, rows) return nothing.
pub struct Frame {
    pub(crate) map: gst::MappedBuffer<gst::buffer::Readable>,
    /// The raw layout; None for JPEG.
    pub(crate) info: Option<gst_video::VideoInfo>,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) format: PixelFormat,
    pub(crate) producer_time: Option<SystemTime>,
    pub(crate) pts: Option<Duration>,
    pub(crate) emitted: SystemTime,
    pub(crate) sequence: u64,
    pub(crate) fragment: Option<FragmentId>,
    pub(crate) key_frame: bool,
    pub(crate) geometry: FrameGeometry,
    /// Set while the colour conversion is deferred: `map` then holds the decoded picture and
    /// `info` the converted layout; the queue converts when the reader takes the frame.
    pub(crate) pending: Option<crate::decode::Pending>,
}

impl Frame {
    /// How the frame's pixels map to the decoded picture (after a [`resize`] and its
    /// [`ResizeMode`]): [`FrameGeometry::rect_to_source`] turns a detection's box into
    /// picture coordinates.
    ///
    /// [`resize`]: crate::KvsHlsFrameSourceBuilder::resize
    pub fn geometry(&self) -> &FrameGeometry {
        &self.geometry
    }
    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }
    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }
    /// Pixel layout.
    pub fn format(&self) -> PixelFormat {
        self.format
    }
    /// All bytes of the frame (every plane, with row padding), or the whole JPEG file.
    pub fn data(&self) -> &[u8] {
        self.map.as_slice()
    }
    /// Bytes per row of the first plane (may exceed `width × bytes per pixel`: rows can be
    /// padded); 0 for JPEG.
    pub fn stride(&self) -> usize {
        self.plane_stride(0).unwrap_or(0)
    }
    /// Number of planes (1 for packed formats, 3 for I420, 2 for NV12, 0 for JPEG).
    pub fn n_planes(&self) -> usize {
        self.info.as_ref().map_or(0, |i| i.n_planes() as usize)
    }
    /// Bytes per row of plane `plane` (None for JPEG).
    pub fn plane_stride(&self, plane: usize) -> Option<usize> {
        self.info
            .as_ref()?
            .stride()
            .get(plane)
            .and_then(|s| usize::try_from(*s).ok())
    }
    /// The bytes of plane `plane` (rows × stride; None for JPEG).
    pub fn plane(&self, plane: usize) -> Option<&[u8]> {
        let info = self.info.as_ref()?;
        let offset = *info.offset().get(plane)?;
        let stride = self.plane_stride(plane)?;
        let rows = info
            .format_info()
            .scale_height(u8::try_from(plane).ok()?, self.height()) as usize;
        self.data().get(offset..offset + stride * rows)
    }
    /// Row `y` of a packed format, without padding.
    pub fn row(&self, y: u32) -> Option<&[u8]> {
        let bpp = self.format.bytes_per_pixel()?;
        let stride = self.stride();
        let start = stride * y as usize;
        self.data().get(start..start + bpp * self.width() as usize)
    }
    /// The frame's pixels without row padding (a copy when rows are padded, else borrowed):
    /// what `numpy.frombuffer(...).reshape(h, w, c)`-style consumers want. Planar formats and
    /// JPEG: [`data`](Frame::data) as is.
    pub fn to_contiguous(&self) -> std::borrow::Cow<'_, [u8]> {
        let Some(bpp) = self.format.bytes_per_pixel() else {
            return std::borrow::Cow::Borrowed(self.data());
        };
        let row = bpp * self.width() as usize;
        if self.stride() == row {
            let len = row * self.height() as usize;
            return std::borrow::Cow::Borrowed(&self.data()[..len.min(self.data().len())]);
        }
        let mut out = Vec::with_capacity(row * self.height() as usize);
        for y in 0..self.height() {
            if let Some(r) = self.row(y) {
                out.extend_from_slice(r);
            }
        }
        std::borrow::Cow::Owned(out)
    }
    /// When the camera captured the frame, on the camera's clock.
    ///
    /// * KVS source: the fragment's program date time plus the frame's offset inside the
    ///   fragment; None when the playlist has no program date times
    ///   (`DisplayFragmentTimestamp=NEVER`).
    /// * URI source, RTSP: the sender's NTP wall-clock time of the frame, from its RTP timestamp
    ///   and the RTCP sender reports; None until the first sender report (a few seconds after
    ///   each connect) and for servers that send none.
    /// * URI source, HLS URL or file: None.
    pub fn producer_time(&self) -> Option<SystemTime> {
        self.producer_time
    }
    /// The frame's presentation time in the source's media timeline (not wall time). KVS
    /// source: continuous from the source's first fragment. URI source: the pipeline's
    /// timeline, which starts again at each reconnect (a file: the position in the file).
    pub fn pts(&self) -> Option<Duration> {
        self.pts
    }
    /// Wall-clock time when the frame left the decoder.
    pub fn emitted_at(&self) -> SystemTime {
        self.emitted
    }
    /// The timestamp the iterators pair with the frame: the producer time when known, else the
    /// emit time.
    pub fn timestamp(&self) -> SystemTime {
        self.producer_time.unwrap_or(self.emitted)
    }
    /// Receive latency: emit time − producer time (None without producer time, or when clocks
    /// disagree so that it would be negative).
    pub fn age(&self) -> Option<Duration> {
        self.emitted.duration_since(self.producer_time?).ok()
    }
    /// A number that grows by one per delivered frame of the source (frames dropped before
    /// delivery leave gaps).
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
    /// The KVS fragment the frame came from (None for URI sources).
    pub fn fragment(&self) -> Option<&FragmentId> {
        self.fragment.as_ref()
    }
    /// Whether the frame was coded as a key frame.
    pub fn is_key_frame(&self) -> bool {
        self.key_frame
    }
    /// The underlying GStreamer buffer (for zero-copy hand-off to other GStreamer pipelines).
    pub fn buffer(&self) -> &gst::BufferRef {
        self.map.buffer()
    }
}

impl Frame {
    /// A frame of `map` for unit tests: no timestamps or fragment, identity geometry.
    #[cfg(test)]
    pub(crate) fn for_test(
        map: gst::MappedBuffer<gst::buffer::Readable>,
        info: Option<gst_video::VideoInfo>,
        (width, height): (u32, u32),
        format: PixelFormat,
        sequence: u64,
        pending: Option<crate::decode::Pending>,
    ) -> Frame {
        Frame {
            map,
            info,
            width,
            height,
            format,
            producer_time: None,
            pts: None,
            emitted: SystemTime::now(),
            sequence,
            fragment: None,
            key_frame: false,
            geometry: FrameGeometry::identity(width, height),
            pending,
        }
    }

    /// Bytes the frame has once converted (what the queue's byte bound counts).
    pub(crate) fn delivered_size(&self) -> usize {
        match (&self.pending, &self.info) {
            (Some(_), Some(info)) => info.size(),
            _ => self.map.len(),
        }
    }

    /// The frame with its deferred colour conversion done (the frame itself when none is
    /// pending).
    pub(crate) fn finish(mut self) -> Result<Frame, crate::decode::ConvertError> {
        let Some(pending) = self.pending.take() else {
            return Ok(self);
        };
        let (buffer, info) = pending.convert(self.map.buffer())?;
        self.map = buffer
            .into_mapped_buffer_readable()
            .map_err(|_| crate::decode::ConvertError("cannot map the converted frame".into()))?;
        self.info = Some(info);
        Ok(self)
    }
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frame")
            .field("sequence", &self.sequence)
            .field("width", &self.width())
            .field("height", &self.height())
            .field("format", &self.format)
            .field("producer_time", &self.producer_time)
            .field("pts", &self.pts)
            .field("fragment", &self.fragment)
            .finish_non_exhaustive()
    }
}
