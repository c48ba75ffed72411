//! Matroska (MKV) writer for the `GetMedia` payload: one EBML document per KVS fragment.
//!
//! KVS streams each fragment as its own EBML header and Segment, both of unknown size here
//! (written frame by frame, the sizes are not known when the headers go out):
//!
//! ```text
//! EBML (DocType matroska)
//! Segment (unknown size)
//!   Info (TimecodeScale 1 ms)  Tracks (TrackEntry 1: V_MPEG4/ISO/AVC | V_MPEGH/ISO/HEVC, CodecPrivate)
//!   Tags  AWS_KINESISVIDEO_FRAGMENT_NUMBER, _SERVER_TIMESTAMP, _PRODUCER_TIMESTAMP
//!   Cluster (unknown size)  Timecode = producer time of the fragment (ms since the epoch)
//!     SimpleBlock … (track 1, timecode relative to the cluster, key flag), one per frame
//!   Tags  AWS_KINESISVIDEO_MILLIS_BEHIND_NOW, AWS_KINESISVIDEO_CONTINUATION_TOKEN
//! ```
//!
//! An unknown-size element ends where an element that cannot be its child begins (Matroska,
//! RFC 9559 section 6.2): the Cluster at the Tags after it, the Segment at the next EBML header.
//! Element IDs and layouts follow RFC 8794 (EBML) and RFC 9559 (Matroska).

use std::time::SystemTime;

use crate::mp4::VideoTrack;

/// Element IDs (with their length-marker bits, as written).
mod id {
    pub const EBML: u32 = 0x1A45_DFA3;
    pub const EBML_VERSION: u32 = 0x4286;
    pub const EBML_READ_VERSION: u32 = 0x42F7;
    pub const EBML_MAX_ID_LENGTH: u32 = 0x42F2;
    pub const EBML_MAX_SIZE_LENGTH: u32 = 0x42F3;
    pub const DOC_TYPE: u32 = 0x4282;
    pub const DOC_TYPE_VERSION: u32 = 0x4287;
    pub const DOC_TYPE_READ_VERSION: u32 = 0x4285;
    pub const SEGMENT: u32 = 0x1853_8067;
    pub const INFO: u32 = 0x1549_A966;
    pub const TIMECODE_SCALE: u32 = 0x2A_D7B1;
    pub const MUXING_APP: u32 = 0x4D80;
    pub const WRITING_APP: u32 = 0x5741;
    pub const TRACKS: u32 = 0x1654_AE6B;
    pub const TRACK_ENTRY: u32 = 0xAE;
    pub const TRACK_NUMBER: u32 = 0xD7;
    pub const TRACK_UID: u32 = 0x73C5;
    pub const TRACK_TYPE: u32 = 0x83;
    pub const CODEC_ID: u32 = 0x86;
    pub const CODEC_PRIVATE: u32 = 0x63A2;
    pub const VIDEO: u32 = 0xE0;
    pub const PIXEL_WIDTH: u32 = 0xB0;
    pub const PIXEL_HEIGHT: u32 = 0xBA;
    pub const TAGS: u32 = 0x1254_C367;
    pub const TAG: u32 = 0x7373;
    pub const SIMPLE_TAG: u32 = 0x67C8;
    pub const TAG_NAME: u32 = 0x45A3;
    pub const TAG_STRING: u32 = 0x4487;
    pub const CLUSTER: u32 = 0x1F43_B675;
    pub const TIMECODE: u32 = 0xE7;
    pub const SIMPLE_BLOCK: u32 = 0xA3;
}

/// The 8-byte "unknown size" (all value bits set).
const UNKNOWN_SIZE: [u8; 8] = [0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];

/// Nanoseconds per timecode tick (1 ms, as KVS producers write).
pub(crate) const TIMECODE_SCALE_NS: u64 = 1_000_000;

/// The KVS tag names.
pub(crate) mod tag {
    pub const FRAGMENT_NUMBER: &str = "AWS_KINESISVIDEO_FRAGMENT_NUMBER";
    pub const SERVER_TIMESTAMP: &str = "AWS_KINESISVIDEO_SERVER_TIMESTAMP";
    pub const PRODUCER_TIMESTAMP: &str = "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP";
    pub const MILLIS_BEHIND_NOW: &str = "AWS_KINESISVIDEO_MILLIS_BEHIND_NOW";
    pub const CONTINUATION_TOKEN: &str = "AWS_KINESISVIDEO_CONTINUATION_TOKEN";
    pub const ERROR_CODE: &str = "AWS_KINESISVIDEO_ERROR_CODE";
    pub const ERROR_ID: &str = "AWS_KINESISVIDEO_ERROR_ID";
}

fn put_id(out: &mut Vec<u8>, id: u32) {
    let bytes = id.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(3);
    out.extend_from_slice(&bytes[skip..]);
}

/// Writes `size` as an EBML variable-size integer of the shortest length (1–8 bytes).
fn put_size(out: &mut Vec<u8>, size: u64) {
    // Length n holds values up to 2^(7n) − 2 (all ones is reserved for "unknown").
    let mut len = 1u32;
    while len < 8 && size >= (1u64 << (7 * len)) - 1 {
        len += 1;
    }
    let marked = size | (1u64 << (7 * len));
    let bytes = marked.to_be_bytes();
    out.extend_from_slice(&bytes[8 - len as usize..]);
}

fn element(out: &mut Vec<u8>, id: u32, payload: &[u8]) {
    put_id(out, id);
    put_size(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

fn uint(out: &mut Vec<u8>, id: u32, value: u64) {
    let bytes = value.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count().min(7);
    element(out, id, &bytes[skip..]);
}

fn master(out: &mut Vec<u8>, id: u32, build: impl FnOnce(&mut Vec<u8>)) {
    let mut payload = Vec::new();
    build(&mut payload);
    element(out, id, &payload);
}

fn simple_tags(out: &mut Vec<u8>, tags: &[(&str, &str)]) {
    master(out, id::TAGS, |tags_out| {
        master(tags_out, id::TAG, |tag_out| {
            for (name, value) in tags {
                master(tag_out, id::SIMPLE_TAG, |s| {
                    element(s, id::TAG_NAME, name.as_bytes());
                    element(s, id::TAG_STRING, value.as_bytes());
                });
            }
        });
    });
}

/// An EBML header (DocType matroska) and the start of a Segment of unknown size.
fn document_start(out: &mut Vec<u8>) {
    master(out, id::EBML, |e| {
        uint(e, id::EBML_VERSION, 1);
        uint(e, id::EBML_READ_VERSION, 1);
        uint(e, id::EBML_MAX_ID_LENGTH, 4);
        uint(e, id::EBML_MAX_SIZE_LENGTH, 8);
        element(e, id::DOC_TYPE, b"matroska");
        uint(e, id::DOC_TYPE_VERSION, 4);
        uint(e, id::DOC_TYPE_READ_VERSION, 2);
    });
    put_id(out, id::SEGMENT);
    out.extend_from_slice(&UNKNOWN_SIZE);
}

/// Seconds since the epoch with millisecond precision, as KVS writes its timestamp tags.
pub(crate) fn decimal_seconds(t: SystemTime) -> String {
    let ms = crate::http::to_millis(t)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    format!("{}.{:03}", ms / 1000, ms % 1000)
}

/// Milliseconds since the epoch.
pub(crate) fn epoch_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The fragment's identity, as the tags before its cluster carry it.
#[derive(Clone, Debug)]
pub(crate) struct FragmentTags {
    pub fragment_number: String,
    pub server_start: SystemTime,
    pub producer_start: SystemTime,
}

/// Everything of a fragment up to and including the Cluster's Timecode: EBML header, Segment
/// (unknown size), Info, Tracks, the identity tags, Cluster (unknown size).
pub(crate) fn fragment_head(track: &VideoTrack, tags: &FragmentTags) -> Vec<u8> {
    let mut out = Vec::with_capacity(512 + track.config.len());
    document_start(&mut out);
    master(&mut out, id::INFO, |i| {
        uint(i, id::TIMECODE_SCALE, TIMECODE_SCALE_NS);
        element(i, id::MUXING_APP, b"kvs-emulator");
        element(i, id::WRITING_APP, b"kvs-emulator");
    });
    master(&mut out, id::TRACKS, |t| {
        master(t, id::TRACK_ENTRY, |e| {
            uint(e, id::TRACK_NUMBER, 1);
            uint(e, id::TRACK_UID, 1);
            uint(e, id::TRACK_TYPE, 1);
            let codec: &[u8] = match track.codec {
                crate::VideoCodec::H264 => b"V_MPEG4/ISO/AVC",
                crate::VideoCodec::H265 => b"V_MPEGH/ISO/HEVC",
            };
            element(e, id::CODEC_ID, codec);
            element(e, id::CODEC_PRIVATE, &track.config);
            master(e, id::VIDEO, |v| {
                uint(v, id::PIXEL_WIDTH, u64::from(track.width));
                uint(v, id::PIXEL_HEIGHT, u64::from(track.height));
            });
        });
    });
    simple_tags(
        &mut out,
        &[
            (tag::FRAGMENT_NUMBER, &tags.fragment_number),
            (tag::SERVER_TIMESTAMP, &decimal_seconds(tags.server_start)),
            (
                tag::PRODUCER_TIMESTAMP,
                &decimal_seconds(tags.producer_start),
            ),
        ],
    );
    put_id(&mut out, id::CLUSTER);
    out.extend_from_slice(&UNKNOWN_SIZE);
    uint(&mut out, id::TIMECODE, epoch_millis(tags.producer_start));
    out
}

/// One SimpleBlock of track 1 (`relative_ms` from the cluster's timecode, clamped to i16).
pub(crate) fn simple_block(relative_ms: i64, key: bool, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 16);
    put_id(&mut out, id::SIMPLE_BLOCK);
    put_size(&mut out, data.len() as u64 + 4);
    out.push(0x81); // track number 1 as a 1-byte vint
    let rel =
        i16::try_from(relative_ms).unwrap_or(if relative_ms < 0 { i16::MIN } else { i16::MAX });
    out.extend_from_slice(&rel.to_be_bytes());
    out.push(if key { 0x80 } else { 0x00 });
    out.extend_from_slice(data);
    out
}

/// The tags after a fragment's cluster (ends the unknown-size cluster).
pub(crate) fn fragment_tail(millis_behind_now: u64, continuation_token: &str) -> Vec<u8> {
    let mut out = Vec::new();
    simple_tags(
        &mut out,
        &[
            (tag::MILLIS_BEHIND_NOW, &millis_behind_now.to_string()),
            (tag::CONTINUATION_TOKEN, continuation_token),
        ],
    );
    out
}

/// An error chunk: an EBML header and a Segment holding only the error tags.
pub(crate) fn error_chunk(code: &str, error_id: u32) -> Vec<u8> {
    let mut out = Vec::new();
    document_start(&mut out);
    simple_tags(
        &mut out,
        &[
            (tag::ERROR_CODE, code),
            (tag::ERROR_ID, &error_id.to_string()),
        ],
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_shortest_vints_and_never_the_unknown_marker() {
        let encode = |v: u64| {
            let mut out = Vec::new();
            put_size(&mut out, v);
            out
        };
        assert_eq!(encode(0), [0x80]);
        assert_eq!(encode(126), [0xFE]);
        // 127 as one byte would be 0xFF, the unknown-size marker.
        assert_eq!(encode(127), [0x40, 0x7F]);
        assert_eq!(encode(16_382), [0x7F, 0xFE]);
        assert_eq!(encode(16_383), [0x20, 0x3F, 0xFF]);
    }

    #[test]
    fn ids_keep_their_marker_bytes() {
        let mut out = Vec::new();
        put_id(&mut out, id::SIMPLE_BLOCK);
        put_id(&mut out, id::TIMECODE_SCALE);
        put_id(&mut out, id::SEGMENT);
        assert_eq!(out, [0xA3, 0x2A, 0xD7, 0xB1, 0x18, 0x53, 0x80, 0x67]);
    }

    #[test]
    fn timestamps_are_decimal_seconds_with_milliseconds() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_042);
        assert_eq!(decimal_seconds(t), "1700000000.042");
    }

    #[test]
    fn a_block_carries_track_timecode_flags_and_data() {
        let b = simple_block(40, true, &[1, 2, 3]);
        assert_eq!(b, [0xA3, 0x87, 0x81, 0x00, 0x28, 0x80, 1, 2, 3]);
        assert_eq!(simple_block(-5, false, &[])[3..5], (-5i16).to_be_bytes());
    }
}
