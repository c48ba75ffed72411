//! A machine-readable barcode of the frame number, drawn by the emulator's synthetic camera.
//!
//! Every picture the emulator's camera renders carries a strip across its top that encodes the
//! 32-bit frame number, so that a test can identify each decoded frame exactly, even after the
//! client scaled the picture or converted it to RGB, BGR or GRAY.
//!
//! # Layout
//! - The strip spans the full width and the rows `0..strip_height(height)`, where
//!   [`strip_height`] is `max(8, height / 12)` rounded down to an even number.
//! - It holds [`CELLS`] (40) equal-width cells, left to right: the 32 bits of the frame number,
//!   most significant first, then the 8 bits of a CRC-8 over the frame number's 4 big-endian
//!   bytes: polynomial 0x07, initial value 0, output XORed with 0x55 (CRC-8/I-432-1, the ITU
//!   variant). The final XOR makes an all-black or all-white strip invalid. Cell `i` covers the columns
//!   `i * width / 40 .. (i + 1) * width / 40`.
//! - A 1 bit is white (luma [`WHITE`] = 235), a 0 bit black (luma [`BLACK`] = 16); the chroma of
//!   the strip is neutral (128), so the cells stay black and white in any colour space.
//!
//! # Reading
//! [`read_luma`] averages a few pixels in the centre of each cell, thresholds them at mid-grey and
//! checks the CRC. Because the layout is relative to the picture size, a picture scaled
//! proportionally (its height at least 96 px, so the 8-px minimum does not kick in) reads back
//! unchanged. The CRC rejects a random picture with a probability of 255/256 only: check the
//! numbers you read against what you expect (they should be consecutive).
//!
//! ```
//! # use kvs_emulator::barcode;
//! let (width, height) = (320, 240);
//! let mut luma = vec![128u8; width * height];
//! barcode::draw_i420(&mut luma, width, width, height, 12345);
//! assert_eq!(barcode::read_gray8(&luma, width, width, height), Some(12345));
//! ```

/// The pure red square every picture of the camera carries in its bottom-left corner, so that a
/// test can tell RGB from BGR (and RGBA from BGRA, I420 from a swapped chroma order): `(left,
/// top, side)` in pixels of a `width` × `height` picture. The side is an eighth of the height
/// (at least 2), even, like its position, so that it covers whole chroma samples; its colour is
/// BT.601 limited-range red: Y 81, U (Cb) 90, V (Cr) 240, i.e. RGB about (255, 0, 0).
pub fn red_marker(width: usize, height: usize) -> (usize, usize, usize) {
    let side = ((height / 8).max(2) & !1).min(width & !1).min(height & !1);
    let margin = (height / 60) & !1;
    let top = height.saturating_sub(side + margin) & !1;
    (margin.min(width.saturating_sub(side)) & !1, top, side)
}

/// Luma, U and V of [`red_marker`].
pub const RED_YUV: (u8, u8, u8) = (81, 90, 240);

/// Number of cells across the strip: 32 data bits followed by 8 CRC bits.
pub const CELLS: usize = 40;

/// Luma of a 1 bit (white, the top of the video range).
pub const WHITE: u8 = 235;

/// Luma of a 0 bit (black, the bottom of the video range).
pub const BLACK: u8 = 16;

/// Chroma value of the strip (neutral: no colour).
pub const NEUTRAL_CHROMA: u8 = 128;

/// Luma threshold between a 0 and a 1 bit: the middle of both the video range (16–235) and the
/// full range (0–255) a client's conversion may produce.
const THRESHOLD: u32 = 127;

/// Height in rows of the barcode strip of a picture `height` rows high: `max(8, height / 12)`
/// rounded down to an even number (never more than the picture's height).
pub fn strip_height(height: usize) -> usize {
    ((height / 12).max(8) & !1).min(height)
}

/// The columns `start..end` that cell `index` (0..[`CELLS`]) covers in a picture `width` wide.
pub fn cell_span(index: usize, width: usize) -> (usize, usize) {
    (index * width / CELLS, (index + 1) * width / CELLS)
}

/// CRC-8 with polynomial 0x07, initial value 0, no reflection, output XORed with 0x55
/// (CRC-8/I-432-1, also called CRC-8/ITU; check value 0xA1).
pub fn crc8(data: &[u8]) -> u8 {
    let mut crc = 0u8;
    for &byte in data {
        crc ^= byte;
        for _ in 0..8 {
            crc = if crc & 0x80 != 0 {
                (crc << 1) ^ 0x07
            } else {
                crc << 1
            };
        }
    }
    crc ^ 0x55
}

/// The 40 bits the strip shows for `frame_number`, in the low bits of the result, the first
/// (leftmost) cell in bit 39: the frame number followed by its CRC-8.
pub fn code_bits(frame_number: u32) -> u64 {
    (u64::from(frame_number) << 8) | u64::from(crc8(&frame_number.to_be_bytes()))
}

/// Whether cell `index` (0..[`CELLS`]) is white for `frame_number`.
fn cell_is_white(bits: u64, index: usize) -> bool {
    (bits >> (CELLS - 1 - index)) & 1 == 1
}

/// Draws the barcode of `frame_number` into the luma plane of a planar YUV picture (I420, NV12,
/// …): rows `0..strip_height(height)`, all `width` columns.
///
/// `stride` is the distance in bytes between two rows. The chroma of the strip must be made
/// neutral by the caller (see [`neutral_chroma_i420`]) for the cells to stay black and white.
/// Rows that do not fit in `y_plane` are left out (nothing panics).
pub fn draw_i420(
    y_plane: &mut [u8],
    stride: usize,
    width: usize,
    height: usize,
    frame_number: u32,
) {
    let bits = code_bits(frame_number);
    let rows = strip_height(height);
    for row in 0..rows {
        let Some(line) = row
            .checked_mul(stride)
            .and_then(|start| y_plane.get_mut(start..start.checked_add(width)?))
        else {
            return;
        };
        for index in 0..CELLS {
            let (start, end) = cell_span(index, width);
            let value = if cell_is_white(bits, index) {
                WHITE
            } else {
                BLACK
            };
            if let Some(cells) = line.get_mut(start..end) {
                cells.fill(value);
            }
        }
    }
}

/// Makes the chroma of the barcode strip neutral in the U and V planes of an I420 (or YV12)
/// picture of `width` × `height` luma pixels: chroma rows `0..strip_height(height) / 2`, columns
/// `0..(width + 1) / 2`. `chroma_stride` is the distance in bytes between two chroma rows.
pub fn neutral_chroma_i420(
    u_plane: &mut [u8],
    v_plane: &mut [u8],
    chroma_stride: usize,
    width: usize,
    height: usize,
) {
    let columns = width.div_ceil(2);
    for row in 0..strip_height(height) / 2 {
        let start = row * chroma_stride;
        for plane in [&mut *u_plane, &mut *v_plane] {
            if let Some(line) = plane.get_mut(start..start + columns) {
                line.fill(NEUTRAL_CHROMA);
            }
        }
    }
}

/// Reads the frame number from the barcode strip of a picture `width` × `height` whose luma (or a
/// proxy of it, such as the green channel) at column `x`, row `y` is `sample(x, y)`.
///
/// Averages up to 3 × 3 pixels around the centre of each cell, thresholds at mid-grey and checks
/// the CRC. Returns `None` when the picture is too small to hold the strip (narrower than 40
/// pixels) or the CRC does not match.
pub fn read_luma(sample: impl Fn(usize, usize) -> u8, width: usize, height: usize) -> Option<u32> {
    if width < CELLS || height == 0 {
        return None;
    }
    let rows = strip_height(height);
    // Rows at a quarter, half and three quarters of the strip: clear of its edges, which a
    // scaler may have blurred into the picture below.
    let mut ys = [rows / 4, rows / 2, (rows * 3) / 4];
    for y in &mut ys {
        *y = (*y).min(rows.saturating_sub(1));
    }
    let mut bits = 0u64;
    for index in 0..CELLS {
        let (start, end) = cell_span(index, width);
        let cell_width = end - start;
        let centre = start + cell_width / 2;
        let offset = cell_width / 4;
        let xs = [centre - offset, centre, (centre + offset).min(end - 1)];
        let mut sum = 0u32;
        for &y in &ys {
            for &x in &xs {
                sum += u32::from(sample(x, y));
            }
        }
        let count = (xs.len() * ys.len()) as u32;
        bits = (bits << 1) | u64::from(sum > THRESHOLD * count);
    }
    let number = (bits >> 8) as u32;
    let crc = (bits & 0xff) as u8;
    (crc8(&number.to_be_bytes()) == crc).then_some(number)
}

/// Reads the frame number from a GRAY8 picture (or the luma plane of a planar YUV picture) whose
/// rows are `stride` bytes apart. Pixels outside `data` read as black.
pub fn read_gray8(data: &[u8], stride: usize, width: usize, height: usize) -> Option<u32> {
    read_luma(
        |x, y| data.get(y * stride + x).copied().unwrap_or(0),
        width,
        height,
    )
}

/// Reads the frame number from a packed RGB-like picture (RGB, BGR, RGBA, BGRA, xRGB, …) with
/// `bytes_per_pixel` bytes per pixel, rows `stride` bytes apart, using the green channel (at byte
/// `green_offset` of each pixel) as the luma: the cells are black and white, so every channel
/// carries them. Pixels outside `data` read as black.
pub fn read_packed(
    data: &[u8],
    stride: usize,
    width: usize,
    height: usize,
    bytes_per_pixel: usize,
    green_offset: usize,
) -> Option<u32> {
    read_luma(
        |x, y| {
            data.get(y * stride + x * bytes_per_pixel + green_offset)
                .copied()
                .unwrap_or(0)
        },
        width,
        height,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tightly packed I420 picture with a noisy background and the barcode of `number`.
    fn i420(width: usize, height: usize, number: u32) -> Vec<u8> {
        let chroma = width.div_ceil(2) * height.div_ceil(2);
        let mut data = vec![0u8; width * height + 2 * chroma];
        for (i, px) in data.iter_mut().enumerate() {
            *px = (i.wrapping_mul(2_654_435_761) >> 7) as u8;
        }
        let (y_plane, rest) = data.split_at_mut(width * height);
        let (u_plane, v_plane) = rest.split_at_mut(chroma);
        draw_i420(y_plane, width, width, height, number);
        neutral_chroma_i420(u_plane, v_plane, width.div_ceil(2), width, height);
        data
    }

    /// Nearest-neighbour scaling of a GRAY8 picture.
    fn scale_nearest(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
        let mut out = vec![0u8; dw * dh];
        for y in 0..dh {
            for x in 0..dw {
                let sx = (x * sw + sw / 2) / dw;
                let sy = (y * sh + sh / 2) / dh;
                out[y * dw + x] = src[sy.min(sh - 1) * sw + sx.min(sw - 1)];
            }
        }
        out
    }

    /// Bilinear scaling of a GRAY8 picture (pixel centres aligned, as most scalers do).
    fn scale_bilinear(src: &[u8], sw: usize, sh: usize, dw: usize, dh: usize) -> Vec<u8> {
        let mut out = vec![0u8; dw * dh];
        for y in 0..dh {
            for x in 0..dw {
                let fx = ((x as f64 + 0.5) * sw as f64 / dw as f64 - 0.5).max(0.0);
                let fy = ((y as f64 + 0.5) * sh as f64 / dh as f64 - 0.5).max(0.0);
                let (x0, y0) = (fx as usize, fy as usize);
                let (x1, y1) = ((x0 + 1).min(sw - 1), (y0 + 1).min(sh - 1));
                let (ax, ay) = (fx - x0 as f64, fy - y0 as f64);
                let p = |x: usize, y: usize| f64::from(src[y * sw + x]);
                let top = p(x0, y0) * (1.0 - ax) + p(x1, y0) * ax;
                let bottom = p(x0, y1) * (1.0 - ax) + p(x1, y1) * ax;
                out[y * dw + x] = (top * (1.0 - ay) + bottom * ay).round() as u8;
            }
        }
        out
    }

    /// Full-range RGB of a video-range luma pixel, as a client's conversion would give.
    fn gray_to_full_range(y: u8) -> u8 {
        ((i32::from(y) - 16) * 255 / 219).clamp(0, 255) as u8
    }

    /// The CRC is CRC-8/I-432-1.
    #[test]
    fn crc8_matches_the_i432_check_value() {
        assert_eq!(crc8(b"123456789"), 0xA1);
        assert_eq!(crc8(&[]), 0x55);
    }

    /// The strip height is `max(8, height / 12)`, even.
    #[test]
    fn strip_height_follows_the_layout() {
        assert_eq!(strip_height(240), 20);
        assert_eq!(strip_height(720), 60);
        assert_eq!(strip_height(120), 10);
        assert_eq!(strip_height(360), 30);
        assert_eq!(strip_height(1080), 90);
        assert_eq!(strip_height(50), 8);
        assert_eq!(strip_height(300), 24);
        assert_eq!(strip_height(6), 6);
        assert_eq!(strip_height(270), 22);
    }

    /// Codes read back from I420 pictures and from their downscaled luma.
    #[test]
    fn round_trips_on_i420_and_after_downscaling() {
        for &(width, height) in &[(320usize, 240usize), (1280, 720), (640, 360), (322, 242)] {
            for &number in &[0u32, 1, 12345, 0xdead_beef, u32::MAX] {
                let picture = i420(width, height, number);
                let luma = &picture[..width * height];
                assert_eq!(
                    read_gray8(luma, width, width, height),
                    Some(number),
                    "{width}x{height} #{number}"
                );
                for scaled in [
                    scale_nearest(luma, width, height, 160, 120),
                    scale_bilinear(luma, width, height, 160, 120),
                ] {
                    assert_eq!(
                        read_gray8(&scaled, 160, 160, 120),
                        Some(number),
                        "{width}x{height} → 160x120 #{number}"
                    );
                }
            }
        }
    }

    /// Padded rows and packed RGB-like pictures read back too.
    #[test]
    fn reads_padded_rows_and_packed_rgb() {
        let (width, height, stride) = (320usize, 240usize, 352usize);
        let mut luma = vec![77u8; stride * height];
        draw_i420(&mut luma, stride, width, height, 4242);
        assert_eq!(read_gray8(&luma, stride, width, height), Some(4242));
        for (bytes_per_pixel, green_offset) in [(3usize, 1usize), (4, 1), (4, 2)] {
            let rgb_stride = width * bytes_per_pixel + 8;
            let mut rgb = vec![0u8; rgb_stride * height];
            for y in 0..height {
                for x in 0..width {
                    let value = gray_to_full_range(luma[y * stride + x]);
                    let px = y * rgb_stride + x * bytes_per_pixel;
                    rgb[px..px + bytes_per_pixel].fill(value);
                }
            }
            assert_eq!(
                read_packed(
                    &rgb,
                    rgb_stride,
                    width,
                    height,
                    bytes_per_pixel,
                    green_offset
                ),
                Some(4242)
            );
        }
    }

    /// Flat pictures, damaged codes and short buffers give `None` (and nothing panics).
    #[test]
    fn rejects_pictures_without_a_valid_code() {
        let (width, height) = (320usize, 240usize);
        // Uniform pictures (a black or white screen) are not valid codes.
        for value in [0u8, 16, 128, 235, 255] {
            let flat = vec![value; width * height];
            assert_eq!(
                read_gray8(&flat, width, width, height),
                None,
                "flat {value}"
            );
        }
        let mut luma = vec![128u8; width * height];
        draw_i420(&mut luma, width, width, height, 99);
        // Flip one data cell: the CRC no longer matches.
        let (start, end) = cell_span(31, width);
        for y in 0..strip_height(height) {
            for x in start..end {
                luma[y * width + x] = 255 - luma[y * width + x];
            }
        }
        assert_eq!(read_gray8(&luma, width, width, height), None);
        assert_eq!(read_gray8(&[], width, width, height), None);
        assert_eq!(read_gray8(&luma, 20, 20, 240), None);
        // Too short a buffer must not panic.
        let mut short = vec![0u8; 100];
        draw_i420(&mut short, width, width, height, 7);
    }
}
