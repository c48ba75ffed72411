//! Rendering of the I420 pictures: layout of the barcode strip, the text band and the scene
//! (a scrolling gradient and a bouncing box).

use gstreamer as gst;
use gstreamer_video as gst_video;

use super::pipeline_error;
use crate::barcode;
use crate::error::Result;

/// Luma of the dark band behind the text.
const BAND_LUMA: u8 = 40;

/// Where things go in a picture of a given size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Layout {
    /// Rows of the barcode strip (even).
    pub(super) strip: usize,
    /// Rows of the dark text band below the strip (even).
    pub(super) band: usize,
    /// Font size of the overlay text in pixels.
    pub(super) font_px: u32,
    /// Left margin of the text in pixels.
    pub(super) xpad: u32,
}

impl Layout {
    /// Layout of a `width` × `height` picture whose text line is `label_chars` characters long.
    pub(super) fn new(width: u32, height: u32, label_chars: usize) -> Self {
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
pub(super) struct Renderer {
    /// Size and plane layout of the pictures.
    pub(super) info: gst_video::VideoInfo,
    /// Where the strip, the band and the scene go.
    layout: Layout,
    /// Two periods of the gradient's luma across the width (a triangle wave, 16..=235, one
    /// period per picture width): each scene row is a window of it.
    gradient: Vec<u8>,
    /// U of one scene chroma row (a static hue gradient).
    u_row: Vec<u8>,
}

impl Renderer {
    /// A renderer for `width` × `height` at `rate`.
    pub(super) fn new(
        width: u32,
        height: u32,
        rate: crate::FrameRate,
        layout: Layout,
    ) -> Result<Self> {
        let info = gst_video::VideoInfo::builder(gst_video::VideoFormat::I420, width, height)
            .fps(gst::Fraction::new(
                i32::try_from(rate.num).unwrap_or(1),
                i32::try_from(rate.den).unwrap_or(1),
            ))
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
    pub(super) fn caps(&self) -> Result<gst::Caps> {
        self.info
            .to_caps()
            .map_err(|e| pipeline_error(format!("camera: raw caps: {e}")))
    }

    /// Renders frame `n` into a new buffer (timestamps not set). The barcode shows `n` modulo
    /// 2^32 (over five years at 25 fps).
    pub(super) fn render(&self, n: u64) -> Result<gst::Buffer> {
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
