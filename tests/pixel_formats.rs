//! Every pixel format gets the right colours in the right order, at a width whose rows are
//! padded (322 pixels: 966 bytes of RGB in a 968-byte stride), through the real decode path.
//!
//! The picture: the top half is red | green | blue in thirds, the bottom half mid grey. A format
//! that swapped R and B, mixed up U and V, or read rows without their stride would see the
//! wrong colour somewhere below.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use kvs_frames::{ColorConversion, Frame, PixelFormat, UriFrameSource};

const W: usize = 322;
const H: usize = 180;
const FRAMES: u64 = 10;

/// The colour of picture pixel (x, y), as RGB.
fn colour(x: usize, y: usize) -> [u8; 3] {
    if y >= H / 2 {
        [128, 128, 128]
    } else if x < W / 3 {
        [255, 0, 0]
    } else if x < 2 * W / 3 {
        [0, 255, 0]
    } else {
        [0, 0, 255]
    }
}

/// Encodes the picture as a near-lossless H.264 MP4 (pushed as RGB with GStreamer's own padded
/// stride, so the test also writes what it later reads).
fn make_file(path: &Path, colorimetry: &str) {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(&format!(
        "appsrc name=src format=time ! videoconvert \
         ! video/x-raw,format=I420,colorimetry={colorimetry} \
         ! x264enc pass=quant quantizer=5 speed-preset=ultrafast bframes=0 key-int-max=5 \
         ! h264parse ! mp4mux ! filesink location={}",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = pipeline
        .by_name("src")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    let info =
        gstreamer_video::VideoInfo::builder(gstreamer_video::VideoFormat::Rgb, W as u32, H as u32)
            .fps(gst::Fraction::new(25, 1))
            .build()
            .unwrap();
    let stride = info.stride()[0] as usize;
    assert!(
        stride > W * 3,
        "the test needs padded rows, stride {stride}"
    );
    src.set_caps(Some(&info.to_caps().unwrap()));
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut picture = vec![0u8; stride * H];
    for y in 0..H {
        for x in 0..W {
            picture[y * stride + x * 3..y * stride + x * 3 + 3].copy_from_slice(&colour(x, y));
        }
    }
    for i in 0..FRAMES {
        let mut buffer = gst::Buffer::from_slice(picture.clone());
        {
            let b = buffer.get_mut().unwrap();
            b.set_pts(gst::ClockTime::from_mseconds(40 * i));
            b.set_duration(gst::ClockTime::from_mseconds(40));
        }
        src.push_buffer(buffer).unwrap();
    }
    src.end_of_stream().unwrap();
    let msg = pipeline
        .bus()
        .unwrap()
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("encoding finishes within 30 s");
    pipeline.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("encoding failed: {} ({:?})", e.error(), e.debug());
    }
}

/// The test file with the YUV of `colorimetry` (`bt601`, `bt709`: the decoder's caps carry it
/// from the stream's VUI), made once per process (removed by the OS's temp cleaning; a few kB).
fn file(colorimetry: &str) -> PathBuf {
    static FILES: std::sync::Mutex<Vec<(String, PathBuf)>> = std::sync::Mutex::new(Vec::new());
    let mut files = FILES.lock().unwrap();
    if let Some((_, path)) = files.iter().find(|(c, _)| c == colorimetry) {
        return path.clone();
    }
    let dir = std::env::temp_dir().join(format!("kvs-frames-pixels-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("bars-{colorimetry}.mp4"));
    make_file(&path, colorimetry);
    files.push((colorimetry.to_owned(), path.clone()));
    path
}

/// Whether `frame` came from the crate's own converter: its buffers are anonymous mappings, so
/// their pixels start on a page boundary; GStreamer's buffers come from the heap (a malloc
/// chunk plus alignment padding), never on one. Without this, a test of the SIMD path would
/// also pass on `videoconvert`.
fn from_the_crates_converter(frame: &Frame) -> bool {
    (frame.data().as_ptr() as usize).is_multiple_of(4096)
}

fn decode(format: PixelFormat) -> Vec<Frame> {
    decode_with("bt601", format, ColorConversion::Simd)
}

fn decode_with(colorimetry: &str, format: PixelFormat, conversion: ColorConversion) -> Vec<Frame> {
    let path = file(colorimetry);
    let source = UriFrameSource::builder("pixels", path.to_str().unwrap())
        .pixel_format(format)
        .color_conversion(conversion)
        .build()
        .unwrap();
    let frames =
        common::frames::drain_frames(source.frames(), Duration::from_secs(20), || source.stats());
    assert_eq!(frames.len(), FRAMES as usize, "{format}");
    frames
}

/// The points checked: the middle of each bar, the last column of the first and last rows of
/// the bars, and the last column of the last row (grey).
fn points() -> Vec<(usize, usize)> {
    vec![
        (W / 6, H / 4),
        (W / 2, H / 4),
        (5 * W / 6, H / 4),
        (W - 1, 0),
        (W - 1, H / 2 - 3),
        (W / 2, 3 * H / 4),
        (W - 1, H - 1),
        (0, H - 1),
    ]
}

/// Both converters land within 3 (SIMD) and 5 (GStreamer) of the picture at the points; the
/// wrong matrix (BT.601 for BT.709 video) is 20 or more off.
const TOLERANCE: u8 = 6;

fn close(got: &[u8], want: &[u8], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            g.abs_diff(*w) <= TOLERANCE,
            "{what}: got {got:?}, want {want:?}"
        );
    }
}

/// Every packed format, by both converters, from BT.601 and BT.709 video: a converter that
/// used the wrong matrix would be 20 or more off in red or green.
#[test]
fn packed_rgb_formats_have_their_channel_order_and_stride() {
    let cases = ["bt601", "bt709"].into_iter().flat_map(|c| {
        [ColorConversion::Simd, ColorConversion::Gstreamer]
            .into_iter()
            .flat_map(move |conv| {
                [
                    PixelFormat::Rgb,
                    PixelFormat::Bgr,
                    PixelFormat::Rgba,
                    PixelFormat::Bgra,
                ]
                .map(|f| (c, conv, f))
            })
    });
    for (colorimetry, conversion, format) in cases {
        let frames = decode_with(colorimetry, format, conversion);
        let f = &frames[FRAMES as usize / 2];
        let name = format!("{format} ({colorimetry}, {conversion})");
        if conversion == ColorConversion::Simd {
            assert!(from_the_crates_converter(f), "{name}: not the SIMD path");
        }
        assert_eq!(
            (f.width(), f.height(), f.format()),
            (W as u32, H as u32, format),
            "{name}"
        );
        let bpp = format.bytes_per_pixel().unwrap();
        if bpp == 3 {
            assert!(
                f.stride() > W * 3,
                "{name}: rows are padded (stride {})",
                f.stride()
            );
        }
        let contiguous = f.to_contiguous();
        assert_eq!(contiguous.len(), W * H * bpp);
        for (x, y) in points() {
            let [r, g, b] = colour(x, y);
            let want: Vec<u8> = match format {
                PixelFormat::Rgb => vec![r, g, b],
                PixelFormat::Bgr => vec![b, g, r],
                PixelFormat::Rgba => vec![r, g, b, 255],
                _ => vec![b, g, r, 255],
            };
            let row = f.row(y as u32).unwrap();
            let what = format!("{name} at ({x}, {y})");
            close(&row[x * bpp..x * bpp + bpp], &want, &what);
            let at = (y * W + x) * bpp;
            close(
                &contiguous[at..at + bpp],
                &want,
                &format!("{what}, contiguous"),
            );
        }
    }
}

#[test]
fn gray_and_yuv_formats_have_their_planes_in_order() {
    // Gray8: luma, green brightest, then red, then blue; grey in the middle.
    let frames = decode(PixelFormat::Gray8);
    let f = &frames[FRAMES as usize / 2];
    let luma = |x: usize, y: usize| f.row(y as u32).unwrap()[x];
    let (red, green, blue, grey) = (
        luma(W / 6, H / 4),
        luma(W / 2, H / 4),
        luma(5 * W / 6, H / 4),
        luma(W - 1, H - 1),
    );
    assert!(green > red && red > blue, "luma r={red} g={green} b={blue}");
    assert!((100..=160).contains(&grey), "grey luma {grey}");
    assert!(
        luma(W - 1, H / 2 - 3).abs_diff(blue) <= 12,
        "the last column of the bars"
    );

    // Both converters give GRAY8 the luma plane unchanged: the same bytes.
    let gst = decode_with("bt601", PixelFormat::Gray8, ColorConversion::Gstreamer);
    let g = &gst[FRAMES as usize / 2];
    assert!(
        from_the_crates_converter(f),
        "GRAY8 takes the SIMD path by default"
    );
    for y in 0..H as u32 {
        assert_eq!(
            f.row(y),
            g.row(y),
            "GRAY8 row {y}: SIMD path vs videoconvert"
        );
    }

    // I420: Y, U, V planes; NV12: Y, then UV interleaved. Red has V (Cr) high and U (Cb) low,
    // blue the other way round.
    for format in [PixelFormat::I420, PixelFormat::Nv12] {
        let frames = decode(format);
        let f = &frames[FRAMES as usize / 2];
        let chroma = |x: usize, y: usize| -> (u8, u8) {
            let (cx, cy) = (x / 2, y / 2);
            match format {
                PixelFormat::I420 => {
                    let (u, v) = (f.plane(1).unwrap(), f.plane(2).unwrap());
                    let (su, sv) = (f.plane_stride(1).unwrap(), f.plane_stride(2).unwrap());
                    (u[cy * su + cx], v[cy * sv + cx])
                }
                _ => {
                    let uv = f.plane(1).unwrap();
                    let s = f.plane_stride(1).unwrap();
                    (uv[cy * s + 2 * cx], uv[cy * s + 2 * cx + 1])
                }
            }
        };
        let (red_u, red_v) = chroma(W / 6, H / 4);
        let (blue_u, blue_v) = chroma(5 * W / 6, H / 4);
        let (grey_u, grey_v) = chroma(W - 1, H - 1);
        assert!(
            red_v > 200 && red_u < 128,
            "{format}: red U={red_u} V={red_v}"
        );
        assert!(
            blue_u > 200 && blue_v < 160,
            "{format}: blue U={blue_u} V={blue_v}"
        );
        assert!(
            grey_u.abs_diff(128) <= 8 && grey_v.abs_diff(128) <= 8,
            "{format}: grey U={grey_u} V={grey_v}"
        );
        let y_plane = f.plane(0).unwrap();
        let ys = f.plane_stride(0).unwrap();
        assert!(ys >= W);
        let grey_y = y_plane[(H - 1) * ys + W - 1];
        assert!((100..=160).contains(&grey_y), "{format}: grey Y {grey_y}");
    }
}

/// `Frame::as_ndarray` sees each pixel where the rows really are (HWC, the 968-byte stride),
/// in the frame's channel order, without copying; planar formats have no such view.
#[cfg(feature = "ndarray")]
#[test]
fn ndarray_views_follow_the_stride_and_channel_order() {
    for format in [PixelFormat::Bgr, PixelFormat::Rgb, PixelFormat::Gray8] {
        let frames = decode(format);
        let f = &frames[FRAMES as usize / 2];
        let view = f.as_ndarray().unwrap();
        let channels = format.bytes_per_pixel().unwrap();
        assert_eq!(view.dim(), (H, W, channels), "{format}");
        assert_eq!(view.strides(), [f.stride() as isize, channels as isize, 1]);
        assert_eq!(view.as_ptr(), f.data().as_ptr(), "{format}: no copy");
        for (x, y) in points() {
            let got: Vec<u8> = (0..channels).map(|c| view[[y, x, c]]).collect();
            let [r, g, b] = colour(x, y);
            let what = format!("{format} at ({x}, {y})");
            match format {
                PixelFormat::Rgb => close(&got, &[r, g, b], &what),
                PixelFormat::Bgr => close(&got, &[b, g, r], &what),
                _ => assert_eq!(got, [f.row(y as u32).unwrap()[x]], "{what}"),
            }
        }
    }
    assert!(decode(PixelFormat::I420)[0].as_ndarray().is_none());
}

/// `Frame::to_rgb_image` and `to_luma_image` give `image` buffers with the right pixels:
/// copied without the padding of 322-pixel rows, and only for their own format.
#[cfg(feature = "image")]
#[test]
fn image_buffers_have_the_pixels_without_the_padding() {
    let frames = decode(PixelFormat::Rgb);
    let f = &frames[FRAMES as usize / 2];
    let picture = f.to_rgb_image().unwrap();
    assert_eq!(picture.dimensions(), (W as u32, H as u32));
    for (x, y) in points() {
        let pixel = picture.get_pixel(x as u32, y as u32);
        close(&pixel.0, &colour(x, y), &format!("rgb image at ({x}, {y})"));
    }
    assert!(f.to_luma_image().is_none() && f.to_rgba_image().is_none());
    let frames = decode(PixelFormat::Gray8);
    let f = &frames[FRAMES as usize / 2];
    let luma = f.to_luma_image().unwrap();
    for (x, y) in points() {
        assert_eq!(
            luma.get_pixel(x as u32, y as u32).0[0],
            f.row(y as u32).unwrap()[x]
        );
    }
    assert!(decode(PixelFormat::Bgr)[0].to_rgb_image().is_none());
}
