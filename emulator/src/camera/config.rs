//! The camera's configuration and its checks.

use std::time::{Duration, SystemTime};

use super::pipeline_error;
use crate::error::Result;

/// Smallest accepted picture width. Below 40 pixels the barcode's 40 cells do not all fit and it
/// cannot be read; from 80 pixels on every cell is at least 2 pixels wide.
const MIN_WIDTH: u32 = 16;

/// Smallest accepted picture height.
const MIN_HEIGHT: u32 = 16;

/// Largest accepted picture width or height.
const MAX_DIMENSION: u32 = 8192;

/// How the camera renders, encodes and paces.
#[derive(Clone, Debug)]
pub(crate) struct CameraConfig {
    /// Stream name, drawn into the picture.
    pub name: String,
    /// Picture width in pixels (even, 16..=8192; the barcode needs at least 40, better 80).
    pub width: u32,
    /// Picture height in pixels (even, 16..=8192).
    pub height: u32,
    /// Frames per second (`num / den`), 1..=120.
    pub rate: crate::FrameRate,
    /// H.264 or H.265.
    pub codec: crate::VideoCodec,
    /// B-frames between reference frames (H.264 only; 0: none, one access unit out per
    /// picture in).
    pub b_frames: u32,
    /// How the composition offsets of a fragment with B-frames are written.
    pub offsets: crate::CompositionOffsets,
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

/// Checks a picture size: even, within the accepted range.
pub(super) fn validate_size(width: u32, height: u32) -> Result<()> {
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
pub(super) fn validate(cfg: &CameraConfig) -> Result<()> {
    validate_size(cfg.width, cfg.height)?;
    let crate::FrameRate { num, den } = cfg.rate;
    if den == 0 || num < den || u64::from(num) > 120 * u64::from(den) {
        return Err(pipeline_error(format!(
            "camera {}: fps {} is outside 1..=120",
            cfg.name, cfg.rate
        )));
    }
    if cfg.b_frames > 3 || (cfg.b_frames > 0 && cfg.codec != crate::VideoCodec::H264) {
        return Err(pipeline_error(format!(
            "camera {}: {} B-frames: 0..=3, and H.264 only",
            cfg.name, cfg.b_frames
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
