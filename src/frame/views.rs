//! Zero-copy views of a [`Frame`] for the crates detectors use: `ndarray` (feature `ndarray`)
//! and `image` (feature `image`).
//!
//! ```no_run
//! # #[cfg(all(feature = "ndarray", feature = "image"))]
//! # fn run(source: &kvs_frames::KvsHlsFrameSource) {
//! for item in source.frames() {
//!     let Ok((frame, _time)) = item else { break };
//!     // Height × width × channels, over the frame's own bytes and row stride: no copy.
//!     let view = frame.as_ndarray().expect("a packed format (BGR by default)");
//!     let (h, w, c) = view.dim();
//!     let blue_mean = view.slice(ndarray::s![.., .., 0]).iter().map(|&v| f64::from(v)).sum::<f64>()
//!         / (h * w) as f64;
//!     # let _ = (c, blue_mean);
//! }
//! # }
//! ```

#[cfg(feature = "image")]
use std::borrow::Cow;

use super::{Frame, PixelFormat};

impl Frame {
    /// Channels per pixel of a packed format (BGR, RGB, BGRA, RGBA, GRAY8); None for planar YUV
    /// and JPEG.
    fn packed_channels(&self) -> Option<usize> {
        match self.format {
            PixelFormat::I420 | PixelFormat::Nv12 | PixelFormat::Jpeg { .. } => None,
            other => other.bytes_per_pixel(),
        }
    }

    /// The picture as an `ndarray` view of shape (height, width, channels), channels in the
    /// frame's order (B, G, R for [`PixelFormat::Bgr`]; 1 for GRAY8), over the frame's own
    /// bytes with its real row stride: no copy, whatever the padding. None for planar YUV
    /// (I420, NV12; use [`plane`](Frame::plane)) and JPEG.
    #[cfg(feature = "ndarray")]
    pub fn as_ndarray(&self) -> Option<ndarray::ArrayView3<'_, u8>> {
        use ndarray::ShapeBuilder;
        let channels = self.packed_channels()?;
        let (h, w) = (self.height as usize, self.width as usize);
        let shape = (h, w, channels).strides((self.stride(), channels, 1));
        ndarray::ArrayView3::from_shape(shape, self.data()).ok()
    }

    /// An RGB [`PixelFormat::Rgb`] frame as an `image` buffer: borrowed when its rows are not
    /// padded, else copied without the padding. None for other formats (ask the source for
    /// `Rgb`; `image` has no BGR pixel type).
    #[cfg(feature = "image")]
    pub fn to_rgb_image(&self) -> Option<image::ImageBuffer<image::Rgb<u8>, Cow<'_, [u8]>>> {
        self.image_of(PixelFormat::Rgb)
    }

    /// A [`PixelFormat::Rgba`] frame as an `image` buffer (borrowed when rows are not padded).
    #[cfg(feature = "image")]
    pub fn to_rgba_image(&self) -> Option<image::ImageBuffer<image::Rgba<u8>, Cow<'_, [u8]>>> {
        self.image_of(PixelFormat::Rgba)
    }

    /// A [`PixelFormat::Gray8`] frame as an `image` buffer (borrowed when rows are not padded).
    #[cfg(feature = "image")]
    pub fn to_luma_image(&self) -> Option<image::ImageBuffer<image::Luma<u8>, Cow<'_, [u8]>>> {
        self.image_of(PixelFormat::Gray8)
    }

    #[cfg(feature = "image")]
    fn image_of<P: image::Pixel<Subpixel = u8>>(
        &self,
        format: PixelFormat,
    ) -> Option<image::ImageBuffer<P, Cow<'_, [u8]>>> {
        if self.format != format {
            return None;
        }
        let channels = self.packed_channels()?;
        let row = channels * self.width as usize;
        let pixels = if self.stride() == row {
            Cow::Borrowed(self.data().get(..row * self.height as usize)?)
        } else {
            self.to_contiguous()
        };
        image::ImageBuffer::from_raw(self.width, self.height, pixels)
    }
}
