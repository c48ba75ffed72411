//! MP4 (ISO base media file format) writer for one H.264 or H.265 video track.
//!
//! The emulator serves two shapes of MP4:
//! - fragmented MP4 as AWS KVS serves it over HLS: an init segment ([`init_segment`]:
//!   `ftyp` + `moov` with empty sample tables and `mvex`) and media fragments
//!   ([`media_segment`]: `moof` + `mdat`, one per KVS fragment, starting with a key frame);
//! - a regular, non-fragmented MP4 with `moov` before `mdat` for GetClip ([`progressive_mp4`]).
//!
//! Box layouts follow ISO/IEC 14496-12 (section numbers below) and ISO/IEC 14496-15 (`avc1`,
//! `avcC`). All integers are big-endian. Samples are always given in decode order.
//!
//! Split by concern: [`fragmented`] writes the init and media segments (and the faulty variants
//! of a media segment), [`progressive`] the GetClip file and its sample tables, and [`boxes`]
//! the individual boxes both are made of.

mod audio;
mod boxes;
mod fragmented;
mod progressive;

use bytes::Bytes;

pub(crate) use self::audio::{AudioSample, AudioTrack};
#[cfg(test)]
pub(crate) use self::fragmented::media_segment;
pub(crate) use self::fragmented::{
    audio_init_segment, audio_media_segment, garble, garble_media, init_segment,
    media_segment_with_audio, set_audio_decode_time, set_base_media_decode_time, tfdt_as_version_0,
};
use self::progressive::SampleTables;
#[cfg(test)]
pub(crate) use self::progressive::progressive_mp4;
pub(crate) use self::progressive::{ClipAudio, progressive_mp4_with_audio};

/// An H.264 or H.265 video track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VideoTrack {
    /// H.264 (`avc1` + `avcC`) or H.265 (`hvc1` + `hvcC`).
    pub codec: crate::VideoCodec,
    /// Coded width in pixels.
    pub width: u32,
    /// Coded height in pixels.
    pub height: u32,
    /// Ticks per second of sample durations and decode times (e.g. 90_000).
    pub timescale: u32,
    /// The decoder configuration record: AVCDecoderConfigurationRecord (H.264) or
    /// HEVCDecoderConfigurationRecord (H.265), exactly GStreamer's `codec_data` of
    /// `video/x-h264,stream-format=avc` / `video/x-h265,stream-format=hvc1` caps
    /// (`alignment=au`).
    pub config: Vec<u8>,
}

/// One coded access unit.
#[derive(Clone, Debug)]
pub(crate) struct Sample {
    /// The access unit in AVCC form (NAL units each prefixed by a 4-byte big-endian length).
    pub data: Bytes,
    /// Duration in the track timescale.
    pub duration: u32,
    /// PTS − DTS in the track timescale (0 when there are no B-frames).
    pub composition_offset: i32,
    /// True for key frames (IDR).
    pub is_sync: bool,
}

/// Track id of the single video track.
const TRACK_ID: u32 = 1;

/// What the track's sample table describes.
enum Layout<'a> {
    /// Empty sample tables and `mvex`: samples come in movie fragments.
    Fragmented,
    /// Full sample tables for samples stored in the `mdat` that follows the `moov`.
    Progressive {
        /// The tables, with chunk offsets relative to the first `mdat` payload byte.
        tables: &'a SampleTables,
        /// File offset of the first `mdat` payload byte.
        base: u64,
        /// Write `co64` (64-bit chunk offsets) instead of `stco`.
        co64: bool,
    },
}

#[cfg(test)]
mod tests;
