//! How a resized frame relates to the decoded picture: the resize modes and the mapping of
//! frame coordinates (a detection's box) back to the source picture.

/// How [`resize`](crate::KvsHlsFrameSourceBuilder::resize)`(width, height)` fits the decoded
/// picture into the requested size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResizeMode {
    /// Exactly `width` × `height`, whatever the picture's aspect ratio (the default; a 4:3
    /// camera resized to 16:9 looks stretched).
    #[default]
    Stretch,
    /// Keep the aspect ratio and fit inside `width` × `height`: the frame is as large as fits
    /// (one side equal to the request, the other smaller; even sizes), so its size follows the
    /// camera's aspect ratio.
    Fit,
    /// Keep the aspect ratio, fit inside, and pad to exactly `width` × `height` with `color`
    /// (red, green, blue; for `Gray8` its luma), the picture centred: what detectors trained
    /// on letterboxed input expect. For the RGB family and `Gray8` with
    /// [`ColorConversion::Simd`](crate::ColorConversion::Simd) (the default).
    Letterbox {
        /// The padding colour, RGB (for example `[114, 114, 114]`, YOLO's grey).
        color: [u8; 3],
    },
}

/// A rectangle in pixels (fractional: mapped boxes rarely land on whole pixels).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rect {
    /// Left edge.
    pub x: f64,
    /// Top edge.
    pub y: f64,
    /// Width.
    pub width: f64,
    /// Height.
    pub height: f64,
}

impl Rect {
    /// A rectangle from its left, top, width and height.
    #[must_use]
    pub fn new(x: f64, y: f64, width: f64, height: f64) -> Self {
        Rect {
            x,
            y,
            width,
            height,
        }
    }
}

/// Where a frame's pixels come from in the decoded picture (its
/// [`geometry`](crate::Frame::geometry)): the picture, scaled by `scale_x` × `scale_y`, has its
/// top-left corner at (`offset_x`, `offset_y`) of the frame. Without a resize the scale is 1
/// and the offset 0; [`ResizeMode::Letterbox`] has an offset on one axis.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FrameGeometry {
    /// Width of the decoded picture.
    pub source_width: u32,
    /// Height of the decoded picture.
    pub source_height: u32,
    /// Frame pixels per picture pixel, horizontally.
    pub scale_x: f64,
    /// Frame pixels per picture pixel, vertically.
    pub scale_y: f64,
    /// Where the picture's left edge is in the frame.
    pub offset_x: f64,
    /// Where the picture's top edge is in the frame.
    pub offset_y: f64,
    /// Size of the picture's area in the frame (the frame minus any padding).
    pub content_width: u32,
    /// See [`content_width`](Self::content_width).
    pub content_height: u32,
}

impl FrameGeometry {
    /// The identity for a `width` × `height` picture delivered as is.
    #[must_use]
    pub fn identity(width: u32, height: u32) -> Self {
        FrameGeometry {
            source_width: width,
            source_height: height,
            scale_x: 1.0,
            scale_y: 1.0,
            offset_x: 0.0,
            offset_y: 0.0,
            content_width: width,
            content_height: height,
        }
    }

    /// Frame point (`x`, `y`) in picture coordinates (not clamped: a point in the padding maps
    /// outside the picture).
    #[must_use]
    pub fn point_to_source(&self, x: f64, y: f64) -> (f64, f64) {
        (
            (x - self.offset_x) / self.scale_x,
            (y - self.offset_y) / self.scale_y,
        )
    }

    /// Picture point (`x`, `y`) in frame coordinates.
    #[must_use]
    pub fn point_from_source(&self, x: f64, y: f64) -> (f64, f64) {
        (
            x * self.scale_x + self.offset_x,
            y * self.scale_y + self.offset_y,
        )
    }

    /// A box in frame coordinates (a detection) in picture coordinates, clamped to the
    /// picture (what lies in the padding is cut off; a box entirely in it has zero size).
    #[must_use]
    pub fn rect_to_source(&self, rect: Rect) -> Rect {
        let (x0, y0) = self.point_to_source(rect.x, rect.y);
        let (x1, y1) = self.point_to_source(rect.x + rect.width, rect.y + rect.height);
        let (w, h) = (f64::from(self.source_width), f64::from(self.source_height));
        let (x0, x1) = (x0.clamp(0.0, w), x1.clamp(0.0, w));
        let (y0, y1) = (y0.clamp(0.0, h), y1.clamp(0.0, h));
        Rect::new(x0, y0, (x1 - x0).max(0.0), (y1 - y0).max(0.0))
    }

    /// A box in picture coordinates in frame coordinates.
    #[must_use]
    pub fn rect_from_source(&self, rect: Rect) -> Rect {
        let (x0, y0) = self.point_from_source(rect.x, rect.y);
        Rect::new(
            x0,
            y0,
            rect.width * self.scale_x,
            rect.height * self.scale_y,
        )
    }

    /// The geometry of a `source_width` × `source_height` picture (pixel aspect ratio
    /// `par_n`/`par_d`) resized to `width` × `height` with `mode`: the frame's size is
    /// (`content_width`, `content_height`) for [`ResizeMode::Fit`], the request otherwise.
    pub(crate) fn resized(
        source_width: u32,
        source_height: u32,
        (par_n, par_d): (i32, i32),
        (width, height): (u32, u32),
        mode: ResizeMode,
    ) -> Self {
        let (sw, sh) = (
            f64::from(source_width.max(1)),
            f64::from(source_height.max(1)),
        );
        let (w, h) = (f64::from(width), f64::from(height));
        if mode == ResizeMode::Stretch {
            return FrameGeometry {
                source_width,
                source_height,
                scale_x: w / sw,
                scale_y: h / sh,
                offset_x: 0.0,
                offset_y: 0.0,
                content_width: width,
                content_height: height,
            };
        }
        // The picture as displayed: its width times the pixel aspect ratio.
        let par = if par_n > 0 && par_d > 0 {
            f64::from(par_n) / f64::from(par_d)
        } else {
            1.0
        };
        let display_w = sw * par;
        let fit = (w / display_w).min(h / sh);
        // Even sizes (4:2:0 chroma), at least 2, never more than asked.
        let even = |v: f64, max: u32| -> u32 {
            let v = v.round().clamp(2.0, f64::from(max));
            let v = v as u32;
            (v - v % 2).max(2)
        };
        let content_width = even(display_w * fit, width);
        let content_height = even(sh * fit, height);
        let (offset_x, offset_y) = match mode {
            ResizeMode::Letterbox { .. } => (
                f64::from((width - content_width) / 2),
                f64::from((height - content_height) / 2),
            ),
            _ => (0.0, 0.0),
        };
        FrameGeometry {
            source_width,
            source_height,
            scale_x: f64::from(content_width) / sw,
            scale_y: f64::from(content_height) / sh,
            offset_x,
            offset_y,
            content_width,
            content_height,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const GREY: ResizeMode = ResizeMode::Letterbox {
        color: [114, 114, 114],
    };

    #[test]
    fn letterbox_fit_and_stretch_of_a_4_3_picture_into_16_9() {
        let g = FrameGeometry::resized(640, 480, (1, 1), (640, 360), GREY);
        assert_eq!((g.content_width, g.content_height), (480, 360));
        assert_eq!((g.offset_x, g.offset_y), (80.0, 0.0));
        assert_eq!(g.point_to_source(80.0, 0.0), (0.0, 0.0));
        assert_eq!(g.point_to_source(560.0, 360.0), (640.0, 480.0));
        // A box half in the left padding is cut at the picture's edge.
        let r = g.rect_to_source(Rect::new(40.0, 90.0, 120.0, 90.0));
        assert_eq!(r, Rect::new(0.0, 120.0, 80.0 / 0.75, 120.0));

        let f = FrameGeometry::resized(640, 480, (1, 1), (640, 360), ResizeMode::Fit);
        assert_eq!((f.content_width, f.content_height), (480, 360));
        assert_eq!((f.offset_x, f.offset_y), (0.0, 0.0));

        let s = FrameGeometry::resized(640, 480, (1, 1), (640, 360), ResizeMode::Stretch);
        assert_eq!((s.scale_x, s.scale_y), (1.0, 0.75));
        assert_eq!(
            s.rect_to_source(Rect::new(0.0, 0.0, 640.0, 360.0)),
            Rect::new(0.0, 0.0, 640.0, 480.0)
        );
    }

    #[test]
    fn wide_pictures_get_bars_above_and_below_and_the_pixel_aspect_ratio_counts() {
        let g = FrameGeometry::resized(1920, 1080, (1, 1), (640, 640), GREY);
        assert_eq!((g.content_width, g.content_height), (640, 360));
        assert_eq!((g.offset_x, g.offset_y), (0.0, 140.0));
        // 720x576 with 16:15 pixels shows as 768x576 (4:3).
        let p = FrameGeometry::resized(720, 576, (16, 15), (400, 300), ResizeMode::Fit);
        assert_eq!((p.content_width, p.content_height), (400, 300));
        // Odd results are made even, never larger than asked.
        let o = FrameGeometry::resized(333, 100, (1, 1), (100, 100), GREY);
        assert_eq!((o.content_width, o.content_height), (100, 30));
        assert!(o.content_width.is_multiple_of(2) && o.content_height.is_multiple_of(2));
    }

    proptest! {
        #[test]
        fn boxes_map_back_and_forth_and_stay_inside(
            sw in 16u32..4000, sh in 16u32..4000, w in 16u32..2000, h in 16u32..2000,
            par_n in 1i32..40, par_d in 1i32..40, mode in 0u8..3,
            fx in 0.0f64..1.0, fy in 0.0f64..1.0, fw in 0.0f64..1.0, fh in 0.0f64..1.0,
        ) {
            let mode = match mode {
                0 => ResizeMode::Stretch,
                1 => ResizeMode::Fit,
                _ => GREY,
            };
            let g = FrameGeometry::resized(sw, sh, (par_n, par_d), (w & !1, h & !1), mode);
            let (w, h) = (w & !1, h & !1);
            prop_assert!(g.content_width <= w && g.content_height <= h);
            prop_assert!(g.content_width >= 2 && g.content_height >= 2);
            prop_assert!(g.offset_x + f64::from(g.content_width) <= f64::from(w));
            prop_assert!(g.offset_y + f64::from(g.content_height) <= f64::from(h));
            // A box inside the picture survives the round trip.
            let (sw_f, sh_f) = (f64::from(sw), f64::from(sh));
            let source = Rect::new(fx * sw_f, fy * sh_f, fw * (1.0 - fx) * sw_f, fh * (1.0 - fy) * sh_f);
            let back = g.rect_to_source(g.rect_from_source(source));
            prop_assert!((back.x - source.x).abs() < 1e-6 * sw_f.max(1.0));
            prop_assert!((back.y - source.y).abs() < 1e-6 * sh_f.max(1.0));
            prop_assert!((back.width - source.width).abs() < 1e-6 * sw_f.max(1.0));
            prop_assert!((back.height - source.height).abs() < 1e-6 * sh_f.max(1.0));
            // Any frame box maps inside the picture.
            let any = g.rect_to_source(Rect::new(-50.0, -50.0, f64::from(w) + 100.0, f64::from(h) + 100.0));
            prop_assert!(any.x >= 0.0 && any.y >= 0.0);
            prop_assert!(any.x + any.width <= sw_f + 1e-9 && any.y + any.height <= sh_f + 1e-9);
        }
    }
}
