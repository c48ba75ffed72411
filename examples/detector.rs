//! A detector loop over zero-copy `ndarray` views (feature `ndarray`): frames from a live camera
//! of the embedded emulator, each handed as an `ArrayView3<u8>` (height × width × BGR, the
//! frame's own bytes and stride) to a detector-shaped function that finds the emulator camera's
//! red square and checks it against where the camera drew it.
//!
//! ```text
//! cargo run --features ndarray --example detector -- --frames 100
//! ```

#[path = "support/mod.rs"]
mod support;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use kvs_emulator::{Emulator, StreamSpec, barcode};
use kvs_frames::{KvsHlsFrameSource, PixelFormat};
use ndarray::ArrayView3;

#[derive(Parser, Debug)]
#[command(about = "Feed zero-copy ndarray views of live frames to a detector")]
struct Args {
    /// Frames to run the detector on.
    #[arg(long, default_value_t = 50)]
    frames: usize,
}

/// A bounding box in pixels: left, top, width, height.
type BoundingBox = (usize, usize, usize, usize);

/// The detector: the bounding box of the clearly red pixels (BGR), if any. A real service would
/// run its model here; it gets the same view.
fn detect_red(image: ArrayView3<'_, u8>) -> Option<BoundingBox> {
    let (mut left, mut top, mut right, mut bottom) = (usize::MAX, usize::MAX, 0, 0);
    let (h, w, _) = image.dim();
    for y in 0..h {
        for x in 0..w {
            let (b, g, r) = (image[[y, x, 0]], image[[y, x, 1]], image[[y, x, 2]]);
            if r > 200 && g < 60 && b < 60 {
                left = left.min(x);
                top = top.min(y);
                right = right.max(x);
                bottom = bottom.max(y);
            }
        }
    }
    (left <= right).then(|| (left, top, right - left + 1, bottom - top + 1))
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(support::colour(&std::io::stdout()))
        .with_env_filter("warn")
        .init();
    let args = Args::parse();
    let (width, height) = (640, 360);
    let emulator = Emulator::builder()
        .stream(
            StreamSpec::new("detector-cam")
                .resolution(width, height)
                .fps(25),
        )
        .start()?;
    if !emulator.wait_for_fragments("detector-cam", 1, Duration::from_secs(20)) {
        bail!("the emulator's camera published nothing within 20 s");
    }
    let source = KvsHlsFrameSource::builder("detector-cam", "detector-cam")
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Bgr)
        .build()?;
    let (x, y, side) = barcode::red_marker(width as usize, height as usize);
    let mut hits = 0;
    for item in source.frames().take(args.frames) {
        let (frame, time) = item?;
        let view = frame
            .as_ndarray()
            .context("BGR frames have an ndarray view")?;
        match detect_red(view) {
            Some((left, top, w, h)) => {
                // The camera's square, give or take the codec's softening at its edges.
                let near = |a: usize, b: usize| a.abs_diff(b) <= 4;
                if near(left, x) && near(top, y) && near(w, side) && near(h, side) {
                    hits += 1;
                }
                println!(
                    "{} frame {}: red box at ({left}, {top}) {w}x{h}",
                    humantime(time),
                    frame.sequence()
                );
            }
            None => println!(
                "{} frame {}: nothing red",
                humantime(time),
                frame.sequence()
            ),
        }
    }
    println!(
        "the red square was found where the camera drew it ({x}, {y}, {side}x{side}) in {hits} of {} frames",
        args.frames
    );
    source.stop();
    Ok(())
}

fn humantime(t: std::time::SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t)
        .format("%H:%M:%S%.3f")
        .to_string()
}
