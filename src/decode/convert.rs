//! YUV → RGB-family (and GRAY8) conversion outside GStreamer: SIMD kernels (`yuvutils-rs`) writing into
//! pooled buffers, honouring the stream's colorimetry.
//!
//! `videoconvert` is the dearest step of the pipeline at 720p (about as much CPU as decoding);
//! the SIMD kernels do the same conversion several times cheaper. The tail asks the decoder for
//! its native 4:2:0 layout (I420, or NV12 from hardware decoders; `videoconvert` stays in
//! front, in passthrough, and converts anything else to I420) and converts each delivered frame
//! here, after target-fps drops and after scaling, so a resized frame is scaled in YUV
//! (1.5 bytes per pixel instead of 3 or 4).
//!
//! Output buffers come from a small pool per source: a 720p BGR frame is 2.7 MB, and a fresh
//! allocation of that size per frame costs page faults and heap growth. A buffer returns to the
//! pool when the last [`Frame`](crate::Frame) (or GStreamer buffer) holding it is dropped.

use std::sync::{Arc, Weak};
use std::time::Instant;

use gstreamer as gst;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use memmap2::MmapMut;
use parking_lot::Mutex;
use yuvutils_rs::{
    YuvBiPlanarImage, YuvConversionMode, YuvPlanarImage, YuvRange, YuvStandardMatrix,
};

use crate::frame::PixelFormat;

/// How decoded YUV frames become the requested RGB-family format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ColorConversion {
    /// SIMD kernels (`yuvutils-rs`, SSE/AVX2 or NEON, chosen at run time) into pooled buffers,
    /// for BGR, RGB, BGRA and RGBA from 8-bit 4:2:0 video (I420 or NV12) with BT.601, BT.709
    /// or BT.2020 matrices, limited or full range; GRAY8 is the luma plane copied into the
    /// same pool. Anything else (I420/NV12 output, JPEG, 10-bit or 4:2:2/4:4:4 video) goes
    /// through GStreamer's `videoconvert`, as with [`Gstreamer`](Self::Gstreamer). The default.
    #[default]
    Simd,
    /// GStreamer's `videoconvert` for every format (what releases before 0.2 did).
    Gstreamer,
}

impl ColorConversion {
    /// Lower-case name: `simd`, `gstreamer`.
    pub fn as_str(self) -> &'static str {
        match self {
            ColorConversion::Simd => "simd",
            ColorConversion::Gstreamer => "gstreamer",
        }
    }
}

impl std::fmt::Display for ColorConversion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ColorConversion {
    type Err = crate::Error;
    /// `simd` or `gstreamer` (ASCII case-insensitive).
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "simd" => Ok(ColorConversion::Simd),
            "gstreamer" => Ok(ColorConversion::Gstreamer),
            _ => Err(crate::Error::invalid_config(
                "color_conversion",
                format!("{s:?}"),
                "must be simd or gstreamer",
            )),
        }
    }
}

/// Whether the tail converts `format` itself with `conversion`: the RGB family with
/// [`ColorConversion::Simd`].
pub(crate) fn converts(conversion: ColorConversion, format: PixelFormat) -> bool {
    conversion == ColorConversion::Simd
        && matches!(
            format,
            PixelFormat::Bgr
                | PixelFormat::Rgb
                | PixelFormat::Bgra
                | PixelFormat::Rgba
                | PixelFormat::Gray8
        )
}

/// The formats the appsink accepts when the tail converts: the decoders' own 4:2:0 layouts.
pub(crate) const NATIVE_FORMATS: [gst_video::VideoFormat; 2] =
    [gst_video::VideoFormat::I420, gst_video::VideoFormat::Nv12];

/// A frame's colour conversion, not done yet: the converter and the decoded picture's caps.
/// The queue converts a frame as it is pushed when a reader already waits for it, else when a
/// reader takes it: a burst of decoded frames waits in the queue as 4:2:0 (half the bytes of
/// BGR), and a frame the queue drops (`DropOldest`, `LatestOnly`, stop) is never converted.
pub(crate) struct Pending {
    converter: Arc<Converter>,
    caps: gst::Caps,
}

impl Pending {
    pub(crate) fn new(converter: Arc<Converter>, caps: gst::Caps) -> Self {
        Pending { converter, caps }
    }

    /// Converts `input` (decoded with the caps given to [`Pending::new`]).
    pub(crate) fn convert(
        &self,
        input: &gst::BufferRef,
    ) -> Result<(gst::Buffer, gst_video::VideoInfo), ConvertError> {
        self.converter.convert(&self.caps, input)
    }
}

/// Why a frame could not be converted (it is then dropped with a warning; never a panic).
#[derive(Debug)]
pub(crate) struct ConvertError(pub String);

/// Free buffers a pool always keeps: what the queue and the reader usually hold at once.
const POOL_KEEP: usize = 2;

/// Free buffers beyond [`POOL_KEEP`] are kept while they are reused within this time (a reader
/// that stays behind holds a full queue, and its frames should not be mapped and unmapped one
/// by one), and unmapped once idle for longer (a burst is over).
const POOL_IDLE: std::time::Duration = std::time::Duration::from_secs(10);

/// Free buffers a pool keeps at most, however busy.
const POOL_MAX: usize = 64;

/// Free output buffers of one size.
struct Pool {
    size: usize,
    /// Free buffers with the time each was returned, most recent last.
    free: Mutex<Vec<(MmapMut, Instant)>>,
}

impl Pool {
    fn new(size: usize) -> Arc<Self> {
        Arc::new(Pool {
            size,
            free: Mutex::new(Vec::new()),
        })
    }

    /// Takes back `data` (returned at `now`) and unmaps what a burst left over: free buffers
    /// beyond [`POOL_KEEP`] idle for more than `idle`, and any beyond [`POOL_MAX`].
    fn give_back(&self, data: MmapMut, now: Instant, idle: std::time::Duration) {
        let mut free = self.free.lock();
        free.push((data, now));
        let stale = free
            .iter()
            .take(free.len().saturating_sub(POOL_KEEP))
            .take_while(|(_, at)| now.saturating_duration_since(*at) > idle)
            .count();
        let over = free.len().saturating_sub(POOL_MAX);
        free.drain(..stale.max(over));
    }
}

/// An output buffer that goes back to its pool when GStreamer frees the buffer holding it.
///
/// The memory is an anonymous mapping of its own, not the heap: when a burst (a reader catching
/// up after an outage fills its queue) needs more frames than the pool keeps, the extra ones
/// are unmapped when they are dropped and the process's resident memory goes back down. Heap
/// chunks of frame size would stay in the allocator's arenas at the burst's high-water mark
/// (what GStreamer's own buffer pools do too: they never shrink while the pipeline lives).
struct Pooled {
    data: Option<MmapMut>,
    pool: Weak<Pool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}

impl AsMut<[u8]> for Pooled {
    fn as_mut(&mut self) -> &mut [u8] {
        self.data.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.upgrade()
            && let Some(data) = self.data.take()
        {
            pool.give_back(data, Instant::now(), POOL_IDLE);
        }
    }
}

/// The input and output layouts for one caps object, and the pool of output buffers of that
/// layout (a new layout, a new pool: the old one's buffers are freed as their frames drop).
struct Layout {
    input: gst_video::VideoInfo,
    output: gst_video::VideoInfo,
    /// Letterbox: where the picture goes in the output (column, row) and the padding pixel.
    letterbox: Option<((usize, usize), Vec<u8>)>,
    range: YuvRange,
    matrix: YuvStandardMatrix,
    pool: Arc<Pool>,
}

/// Converts decoded 4:2:0 frames into one RGB-family format (or GRAY8), into pooled buffers.
pub(crate) struct Converter {
    format: PixelFormat,
    /// Letterbox: the output size and the padding colour (RGB).
    canvas: Option<((u32, u32), [u8; 3])>,
    layout: Mutex<Option<(gst::Caps, Arc<Layout>)>>,
}

/// One pixel of `color` (RGB) in `format` (GRAY8: its BT.601 luma).
fn pixel(format: PixelFormat, [r, g, b]: [u8; 3]) -> Vec<u8> {
    match format {
        PixelFormat::Bgr => vec![b, g, r],
        PixelFormat::Rgb => vec![r, g, b],
        PixelFormat::Bgra => vec![b, g, r, 255],
        PixelFormat::Rgba => vec![r, g, b, 255],
        _ => {
            let luma = (299 * u32::from(r) + 587 * u32::from(g) + 114 * u32::from(b) + 500) / 1000;
            vec![u8::try_from(luma).unwrap_or(u8::MAX)]
        }
    }
}

impl Converter {
    /// A converter to `format`; with `canvas` (letterbox), each picture is centred on an
    /// output of that size, the rest painted with the colour.
    pub(crate) fn new(format: PixelFormat, canvas: Option<((u32, u32), [u8; 3])>) -> Self {
        Converter {
            format,
            canvas,
            layout: Mutex::new(None),
        }
    }

    /// The layout for `caps`, cached per caps object (a reference, not a copy: a copied caps
    /// object has another address, and the cache would never hit).
    fn layout(&self, caps: &gst::Caps) -> Result<Arc<Layout>, ConvertError> {
        let mut cached = self.layout.lock();
        if let Some((c, layout)) = cached.as_ref()
            && c.as_ptr() == caps.as_ptr()
        {
            return Ok(Arc::clone(layout));
        }
        let input = gst_video::VideoInfo::from_caps(caps)
            .map_err(|e| ConvertError(format!("unusable caps {caps}: {e}")))?;
        let format = self
            .format
            .video_format()
            .ok_or_else(|| ConvertError(format!("{} is not a raw format", self.format)))?;
        let (out_w, out_h) = self
            .canvas
            .map_or((input.width(), input.height()), |(size, _)| size);
        if input.width() > out_w || input.height() > out_h {
            return Err(ConvertError(format!(
                "a {}x{} picture does not fit the {out_w}x{out_h} letterbox",
                input.width(),
                input.height()
            )));
        }
        let output = gst_video::VideoInfo::builder(format, out_w, out_h)
            .fps(input.fps())
            .par(input.par())
            .build()
            .map_err(|e| ConvertError(format!("no layout for {format:?}: {e}")))?;
        let letterbox = self.canvas.map(|(_, color)| {
            (
                (
                    ((out_w - input.width()) / 2) as usize,
                    ((out_h - input.height()) / 2) as usize,
                ),
                pixel(self.format, color),
            )
        });
        let colorimetry = input.colorimetry();
        let range = match colorimetry.range() {
            gst_video::VideoColorRange::Range0_255 => YuvRange::Full,
            _ => YuvRange::Limited,
        };
        let matrix = match colorimetry.matrix() {
            gst_video::VideoColorMatrix::Bt709 => YuvStandardMatrix::Bt709,
            gst_video::VideoColorMatrix::Bt2020 => YuvStandardMatrix::Bt2020,
            gst_video::VideoColorMatrix::Smpte240m => YuvStandardMatrix::Smpte240,
            gst_video::VideoColorMatrix::Bt601 | gst_video::VideoColorMatrix::Fcc => {
                YuvStandardMatrix::Bt601
            }
            // Unknown: GStreamer's own default, BT.709 for HD and BT.601 below.
            _ if input.height() >= 720 => YuvStandardMatrix::Bt709,
            _ => YuvStandardMatrix::Bt601,
        };
        tracing::debug!(%caps, ?matrix, ?range, "frame layout for new caps");
        let pool = Pool::new(output.size());
        let layout = Arc::new(Layout {
            input,
            output,
            letterbox,
            range,
            matrix,
            pool,
        });
        *cached = Some((caps.clone(), Arc::clone(&layout)));
        Ok(layout)
    }

    /// A free buffer of `pool`, or a new mapping.
    fn take_buffer(pool: &Arc<Pool>) -> Result<Pooled, ConvertError> {
        let reused = pool.free.lock().pop().map(|(b, _)| b);
        let data = match reused {
            Some(data) => data,
            None => MmapMut::map_anon(pool.size).map_err(|e| {
                ConvertError(format!("cannot map {} bytes for a frame: {e}", pool.size))
            })?,
        };
        Ok(Pooled {
            data: Some(data),
            pool: Arc::downgrade(pool),
        })
    }

    /// The layout frames with `caps` have once converted (checked and cached as for
    /// [`convert`](Self::convert), nothing converted).
    pub(crate) fn output_info(
        &self,
        caps: &gst::Caps,
    ) -> Result<gst_video::VideoInfo, ConvertError> {
        Ok(self.layout(caps)?.output.clone())
    }

    /// `input` (with `caps`: I420 or NV12) converted to the target format: a new buffer with
    /// the input's timestamps and flags, and its layout. Metas are not copied (the tail reads
    /// what it needs from the input first).
    pub(crate) fn convert(
        &self,
        caps: &gst::Caps,
        input: &gst::BufferRef,
    ) -> Result<(gst::Buffer, gst_video::VideoInfo), ConvertError> {
        let layout = self.layout(caps)?;
        let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(input, &layout.input)
            .map_err(|e| ConvertError(format!("cannot map the decoded frame: {e}")))?;
        let out_info = &layout.output;
        let mut out = Self::take_buffer(&layout.pool)?;
        let stride = u32::try_from(out_info.stride()[0])
            .map_err(|_| ConvertError("negative output stride".into()))?;
        let plane = |i: u32| {
            frame
                .plane_data(i)
                .map_err(|e| ConvertError(format!("plane {i}: {e}")))
        };
        let in_stride = |i: usize| {
            frame
                .plane_stride()
                .get(i)
                .and_then(|s| u32::try_from(*s).ok())
                .ok_or_else(|| ConvertError(format!("plane {i} has no usable stride")))
        };
        let (width, height) = (frame.width(), frame.height());
        let dst = out.as_mut();
        let (range, matrix) = (layout.range, layout.matrix);
        // Letterbox: paint the padding, then convert into the picture's place.
        let dst = match &layout.letterbox {
            Some(((col, row), fill)) => {
                paint_padding(
                    dst,
                    stride as usize,
                    (out_info.width() as usize, out_info.height() as usize),
                    (*col, *row),
                    (width as usize, height as usize),
                    fill,
                )?;
                let start = row
                    .checked_mul(stride as usize)
                    .and_then(|s| s.checked_add(col.checked_mul(fill.len())?))
                    .ok_or_else(|| ConvertError("letterbox offset overflows".into()))?;
                dst.get_mut(start..)
                    .ok_or_else(|| ConvertError("letterbox offset outside the frame".into()))?
            }
            None => dst,
        };
        if self.format == PixelFormat::Gray8 {
            // The luma plane as it is, row by row (what videoconvert's I420/NV12 → GRAY8 does:
            // no range change).
            let y = plane(0)?;
            let in_stride = in_stride(0)? as usize;
            let row = width as usize;
            for (r, out_row) in dst
                .chunks_mut(stride as usize)
                .take(height as usize)
                .enumerate()
            {
                let from = r
                    .checked_mul(in_stride)
                    .and_then(|start| y.get(start..start.checked_add(row)?))
                    .ok_or_else(|| ConvertError(format!("luma row {r} is outside the plane")))?;
                out_row
                    .get_mut(..row)
                    .ok_or_else(|| ConvertError(format!("output row {r} is short")))?
                    .copy_from_slice(from);
            }
            return Ok(Self::wrap(out, input, out_info));
        }
        let result = match frame.format() {
            gst_video::VideoFormat::I420 => {
                let image = YuvPlanarImage {
                    y_plane: plane(0)?,
                    y_stride: in_stride(0)?,
                    u_plane: plane(1)?,
                    u_stride: in_stride(1)?,
                    v_plane: plane(2)?,
                    v_stride: in_stride(2)?,
                    width,
                    height,
                };
                match self.format {
                    PixelFormat::Bgr => {
                        yuvutils_rs::yuv420_to_bgr(&image, dst, stride, range, matrix)
                    }
                    PixelFormat::Rgb => {
                        yuvutils_rs::yuv420_to_rgb(&image, dst, stride, range, matrix)
                    }
                    PixelFormat::Bgra => {
                        yuvutils_rs::yuv420_to_bgra(&image, dst, stride, range, matrix)
                    }
                    PixelFormat::Rgba => {
                        yuvutils_rs::yuv420_to_rgba(&image, dst, stride, range, matrix)
                    }
                    other => return Err(ConvertError(format!("cannot convert to {other}"))),
                }
            }
            gst_video::VideoFormat::Nv12 => {
                let image = YuvBiPlanarImage {
                    y_plane: plane(0)?,
                    y_stride: in_stride(0)?,
                    uv_plane: plane(1)?,
                    uv_stride: in_stride(1)?,
                    width,
                    height,
                };
                let mode = YuvConversionMode::Balanced;
                match self.format {
                    PixelFormat::Bgr => {
                        yuvutils_rs::yuv_nv12_to_bgr(&image, dst, stride, range, matrix, mode)
                    }
                    PixelFormat::Rgb => {
                        yuvutils_rs::yuv_nv12_to_rgb(&image, dst, stride, range, matrix, mode)
                    }
                    PixelFormat::Bgra => {
                        yuvutils_rs::yuv_nv12_to_bgra(&image, dst, stride, range, matrix, mode)
                    }
                    PixelFormat::Rgba => {
                        yuvutils_rs::yuv_nv12_to_rgba(&image, dst, stride, range, matrix, mode)
                    }
                    other => return Err(ConvertError(format!("cannot convert to {other}"))),
                }
            }
            other => return Err(ConvertError(format!("unexpected decoded format {other:?}"))),
        };
        result.map_err(|e| ConvertError(format!("{width}x{height} frame: {e}")))?;
        Ok(Self::wrap(out, input, out_info))
    }

    /// `out` as a GStreamer buffer with `input`'s timestamps and key flag, and its layout.
    fn wrap(
        out: Pooled,
        input: &gst::BufferRef,
        info: &gst_video::VideoInfo,
    ) -> (gst::Buffer, gst_video::VideoInfo) {
        let mut buffer = gst::Buffer::from_mut_slice(out);
        if let Some(b) = buffer.get_mut() {
            b.set_pts(input.pts());
            b.set_dts(input.dts());
            b.set_duration(input.duration());
            b.set_flags(input.flags() & gst::BufferFlags::DELTA_UNIT);
        }
        (buffer, info.clone())
    }
}

/// Paints everything of the `size` (columns, rows) output around the `picture` placed at
/// `at` with the pixel `fill`.
fn paint_padding(
    dst: &mut [u8],
    stride: usize,
    (width, height): (usize, usize),
    (col, row): (usize, usize),
    (picture_w, picture_h): (usize, usize),
    fill: &[u8],
) -> Result<(), ConvertError> {
    let bpp = fill.len();
    let paint = |span: &mut [u8]| {
        for px in span.chunks_exact_mut(bpp) {
            px.copy_from_slice(fill);
        }
    };
    for (r, line) in dst.chunks_mut(stride).take(height).enumerate() {
        let line = line
            .get_mut(..width * bpp)
            .ok_or_else(|| ConvertError(format!("output row {r} is short")))?;
        if r < row || r >= row + picture_h {
            paint(line);
        } else {
            let (left, rest) = line.split_at_mut((col * bpp).min(line.len()));
            paint(left);
            let right_from = (picture_w * bpp).min(rest.len());
            paint(&mut rest[right_from..]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// I420 of one colour (BT.601 limited), `w` × `h`, in GStreamer's default layout.
    fn i420(w: u32, h: u32, yuv: [u8; 3]) -> (gst::Caps, gst::Buffer) {
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, w, h)
            .colorimetry(&"bt601".parse().unwrap())
            .build()
            .unwrap();
        let mut data = vec![0u8; info.size()];
        for (plane, value) in yuv.into_iter().enumerate() {
            let offset = info.offset()[plane];
            let stride = info.stride()[plane] as usize;
            let rows = if plane == 0 { h } else { h.div_ceil(2) } as usize;
            data[offset..offset + stride * rows].fill(value);
        }
        (info.to_caps().unwrap(), gst::Buffer::from_mut_slice(data))
    }

    #[test]
    fn converts_into_the_default_layout_and_reuses_buffers() {
        gst::init().unwrap();
        // BT.601 limited (81, 90, 240) is pure red.
        let (caps, input) = i420(322, 10, [81, 90, 240]);
        let converter = Converter::new(PixelFormat::Bgr, None);
        let (out, info) = converter.convert(&caps, &input).unwrap();
        assert_eq!(info.stride()[0], 968, "GStreamer's padded BGR stride");
        let map = out.map_readable().unwrap();
        let px = &map[968 * 5 + 3 * 321..968 * 5 + 3 * 322];
        assert!(px[0] < 4 && px[1] < 4 && px[2] > 250, "{px:?}");
        let first = map.as_ptr();
        drop(map);
        drop(out);
        let (again, _) = converter.convert(&caps, &input).unwrap();
        assert_eq!(
            again.map_readable().unwrap().as_ptr(),
            first,
            "the freed buffer is reused"
        );
    }

    /// A deferred frame is converted when the reader takes it, not before: frames the queue
    /// drops (`LatestOnly`) never take a converted buffer, the delivered one has the pixels
    /// and layout of a direct conversion, and the queue counts the converted size.
    #[test]
    fn deferred_frames_are_converted_only_when_taken() {
        use crate::source::queue::Queue;
        gst::init().unwrap();
        let (caps, input) = i420(322, 10, [81, 90, 240]);
        let converter = Arc::new(Converter::new(PixelFormat::Bgr, None));
        let out_info = converter.output_info(&caps).unwrap();
        let queue = Queue::new(30, usize::MAX, crate::DeliveryPolicy::LatestOnly);
        for sequence in 0..5 {
            let frame = crate::Frame::for_test(
                input.copy().into_mapped_buffer_readable().unwrap(),
                Some(out_info.clone()),
                (out_info.width(), out_info.height()),
                PixelFormat::Bgr,
                sequence,
                Some(Pending::new(Arc::clone(&converter), caps.clone())),
            );
            assert_eq!(frame.delivered_size(), out_info.size());
            queue.push(frame);
        }
        let pool = Arc::clone(&converter.layout(&caps).unwrap().pool);
        assert_eq!(pool.free.lock().len(), 0, "nothing converted while queued");
        let frame = match queue.pop(Some(std::time::Duration::ZERO)) {
            Ok(Some(Ok(frame))) => frame,
            other => panic!("no frame: {:?}", other.map(|o| o.map(|r| r.is_ok()))),
        };
        assert_eq!(frame.sequence(), 4, "the latest frame");
        assert!(frame.pending.is_none());
        assert_eq!(frame.data().len(), out_info.size());
        let (direct, _) = converter.convert(&caps, &input).unwrap();
        assert_eq!(frame.data(), &direct.map_readable().unwrap()[..]);
        assert_eq!(frame.row(5).map(|r| r.len()), Some(322 * 3));
        drop(direct);
        drop(frame);
        assert_eq!(
            pool.free.lock().len(),
            2,
            "two buffers ever: the taken frame's and the direct one"
        );
    }

    /// Odd sizes (a chroma sample covers the last column and row alone) convert in every
    /// packed format, up to the last pixel.
    #[test]
    fn odd_sizes_convert_to_the_last_pixel() {
        gst::init().unwrap();
        // BT.601 limited (81, 90, 240) is pure red.
        let (caps, input) = i420(33, 7, [81, 90, 240]);
        for (format, red) in [
            (PixelFormat::Bgr, 2),
            (PixelFormat::Rgb, 0),
            (PixelFormat::Bgra, 2),
            (PixelFormat::Rgba, 0),
        ] {
            let converter = Converter::new(format, None);
            let (out, info) = converter.convert(&caps, &input).unwrap();
            let bpp = format.bytes_per_pixel().unwrap();
            let map = out.map_readable().unwrap();
            let last = info.stride()[0] as usize * 6 + bpp * 32;
            let px = &map[last..last + bpp];
            assert!(px[red] > 250, "{format}: {px:?}");
            assert!(px[2 - red] < 4 && px[1] < 4, "{format}: {px:?}");
        }
    }

    /// Letterbox: the picture centred, the padding in the given colour, in every format the
    /// converter pads, through reused (dirty) buffers.
    #[test]
    fn letterbox_centres_the_picture_and_paints_the_padding() {
        gst::init().unwrap();
        // A red 30x20 picture on a 40x30 canvas: 5 columns each side, 5 rows above and below.
        let (caps, input) = i420(30, 20, [81, 90, 240]);
        let blue = [0, 0, 255];
        for format in [
            PixelFormat::Bgr,
            PixelFormat::Rgb,
            PixelFormat::Bgra,
            PixelFormat::Rgba,
            PixelFormat::Gray8,
        ] {
            let converter = Converter::new(format, Some(((40, 30), blue)));
            for round in 0..3 {
                let (out, info) = converter.convert(&caps, &input).unwrap();
                assert_eq!((info.width(), info.height()), (40, 30));
                let bpp = format.bytes_per_pixel().unwrap();
                let stride = info.stride()[0] as usize;
                let map = out.map_readable().unwrap();
                let at =
                    |x: usize, y: usize| &map[y * stride + x * bpp..y * stride + (x + 1) * bpp];
                let fill = pixel(format, blue);
                for (x, y) in [(0, 0), (4, 15), (35, 15), (39, 29), (20, 4), (20, 25)] {
                    assert_eq!(at(x, y), fill.as_slice(), "{format} padding at ({x}, {y})");
                }
                for (x, y) in [(5, 5), (34, 24), (20, 15)] {
                    let px = at(x, y);
                    if format == PixelFormat::Gray8 {
                        assert_eq!(px, [81], "{format} luma at ({x}, {y})");
                    } else {
                        let red = if matches!(format, PixelFormat::Bgr | PixelFormat::Bgra) {
                            2
                        } else {
                            0
                        };
                        assert!(
                            px[red] > 250 && px[1] < 4 && px[2 - red] < 4,
                            "{format} at ({x}, {y}): {px:?}"
                        );
                    }
                }
                drop(map);
                drop(out);
                // Dirty the next buffer: the padding must be painted again, not assumed.
                if round == 0 {
                    let (mut dirty, _) = converter.convert(&caps, &input).unwrap();
                    dirty
                        .make_mut()
                        .map_writable()
                        .unwrap()
                        .as_mut_slice()
                        .fill(7);
                }
            }
        }
        // A picture larger than the canvas is an error, not a write out of bounds.
        let (big, input) = i420(50, 20, [81, 90, 240]);
        let converter = Converter::new(PixelFormat::Bgr, Some(((40, 30), blue)));
        assert!(converter.convert(&big, &input).is_err());
    }

    /// The layout (and its pool) is parsed once per caps object, not per frame.
    #[test]
    fn the_layout_is_parsed_once_per_caps_object() {
        gst::init().unwrap();
        let (caps, _) = i420(64, 32, [128, 128, 128]);
        let converter = Converter::new(PixelFormat::Bgr, None);
        let first = converter.layout(&caps).unwrap();
        assert!(Arc::ptr_eq(&first, &converter.layout(&caps).unwrap()));
        let (other, _) = i420(64, 32, [128, 128, 128]);
        assert!(!Arc::ptr_eq(&first, &converter.layout(&other).unwrap()));
    }

    #[test]
    fn the_matrix_and_range_come_from_the_caps() {
        gst::init().unwrap();
        let converter = Converter::new(PixelFormat::Rgb, None);
        for (colorimetry, want) in [
            ("bt601", YuvStandardMatrix::Bt601),
            ("bt709", YuvStandardMatrix::Bt709),
            ("bt2020", YuvStandardMatrix::Bt2020),
        ] {
            let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, 64, 64)
                .colorimetry(&colorimetry.parse().unwrap())
                .build()
                .unwrap();
            let layout = converter.layout(&info.to_caps().unwrap()).unwrap();
            assert_eq!(layout.matrix, want, "{colorimetry}");
            assert_eq!(layout.range, YuvRange::Limited, "{colorimetry}");
        }
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, 64, 64)
            .colorimetry(&"1:4:0:0".parse().unwrap())
            .build()
            .unwrap();
        let layout = converter.layout(&info.to_caps().unwrap()).unwrap();
        assert_eq!(layout.range, YuvRange::Full);
    }

    /// A burst of frames alive at once gets buffers of its own; the pool keeps them while they
    /// are reused, and unmaps all but `POOL_KEEP` once they have been idle for `POOL_IDLE`.
    #[test]
    fn the_pool_keeps_a_busy_burst_and_lets_an_idle_one_go() {
        gst::init().unwrap();
        let (caps, input) = i420(64, 32, [128, 128, 128]);
        let converter = Converter::new(PixelFormat::Gray8, None);
        let burst: Vec<_> = (0..3 * POOL_KEEP)
            .map(|_| converter.convert(&caps, &input).unwrap())
            .collect();
        let pool = Arc::clone(&converter.layout(&caps).unwrap().pool);
        assert_eq!(pool.free.lock().len(), 0);
        drop(burst);
        assert_eq!(pool.free.lock().len(), 3 * POOL_KEEP, "kept while busy");
        // One more return, as if POOL_IDLE later: the idle extras go, POOL_KEEP stay.
        let later = Instant::now() + POOL_IDLE + std::time::Duration::from_secs(1);
        let spare = MmapMut::map_anon(pool.size).unwrap();
        pool.give_back(spare, later, POOL_IDLE);
        assert_eq!(pool.free.lock().len(), POOL_KEEP);
        // Never more than POOL_MAX, however busy.
        for _ in 0..POOL_MAX + 5 {
            pool.give_back(MmapMut::map_anon(pool.size).unwrap(), later, POOL_IDLE);
        }
        assert_eq!(pool.free.lock().len(), POOL_MAX);
    }

    #[test]
    fn gray8_is_the_luma_plane_row_by_row() {
        gst::init().unwrap();
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, 33, 5)
            .build()
            .unwrap();
        let mut data = vec![128u8; info.size()];
        let stride = info.stride()[0] as usize;
        for r in 0..5 {
            for x in 0..33 {
                data[r * stride + x] = (r * 40 + x) as u8;
            }
        }
        let input = gst::Buffer::from_mut_slice(data);
        let converter = Converter::new(PixelFormat::Gray8, None);
        let (out, out_info) = converter.convert(&info.to_caps().unwrap(), &input).unwrap();
        let map = out.map_readable().unwrap();
        let out_stride = out_info.stride()[0] as usize;
        assert!(out_stride >= 33);
        for r in 0..5 {
            let want: Vec<u8> = (0..33).map(|x| (r * 40 + x) as u8).collect();
            assert_eq!(
                &map[r * out_stride..r * out_stride + 33],
                &want[..],
                "row {r}"
            );
        }
    }

    /// Limited range puts black at 16 and white at 235; full range at 0 and 255. A converter that
    /// ignored the range would be 16–20 off at both ends.
    #[test]
    fn full_and_limited_range_map_black_and_white() {
        gst::init().unwrap();
        let converter = Converter::new(PixelFormat::Rgb, None);
        for (colorimetry, y, want) in [
            ("bt601", 16, 0),
            ("bt601", 235, 255),
            ("1:4:0:0", 16, 16),
            ("1:4:0:0", 235, 235),
            ("1:4:0:0", 255, 255),
        ] {
            let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, 34, 8)
                .colorimetry(&colorimetry.parse().unwrap())
                .build()
                .unwrap();
            let mut data = vec![128u8; info.size()];
            let y_size = info.stride()[0] as usize * 8;
            data[..y_size].fill(y);
            let input = gst::Buffer::from_mut_slice(data);
            let (out, out_info) = converter.convert(&info.to_caps().unwrap(), &input).unwrap();
            let map = out.map_readable().unwrap();
            let row = out_info.stride()[0] as usize;
            for px in [0, 3 * 33, row * 7 + 3 * 17] {
                let got = &map[px..px + 3];
                assert!(
                    got.iter().all(|c| c.abs_diff(want) <= 1),
                    "{colorimetry} Y={y}: got {got:?}, want {want}"
                );
            }
        }
    }

    #[test]
    fn a_short_buffer_is_an_error_not_a_panic() {
        gst::init().unwrap();
        let (caps, _) = i420(64, 64, [16, 128, 128]);
        let converter = Converter::new(PixelFormat::Rgba, None);
        let short = gst::Buffer::from_mut_slice(vec![0u8; 100]);
        assert!(converter.convert(&caps, &short).is_err());
    }
}
