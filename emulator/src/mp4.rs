//! MP4 (ISO base media file format) writer for one H.264 video track.
//!
//! The emulator serves two shapes of MP4:
//! - fragmented MP4 as AWS KVS serves it over HLS: an init segment ([`init_segment`]:
//!   `ftyp` + `moov` with empty sample tables and `mvex`) and media fragments
//!   ([`media_segment`]: `moof` + `mdat`, one per KVS fragment, starting with a key frame);
//! - a regular, non-fragmented MP4 with `moov` before `mdat` for GetClip ([`progressive_mp4`]).
//!
//! Box layouts follow ISO/IEC 14496-12 (section numbers below) and ISO/IEC 14496-15 (`avc1`,
//! `avcC`). All integers are big-endian. Samples are always given in decode order.

use bytes::{BufMut, Bytes};

/// An H.264 video track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct VideoTrack {
    /// Coded width in pixels.
    pub width: u32,
    /// Coded height in pixels.
    pub height: u32,
    /// Ticks per second of sample durations and decode times (e.g. 90_000).
    pub timescale: u32,
    /// AVCDecoderConfigurationRecord, exactly GStreamer's `codec_data` of
    /// `video/x-h264,stream-format=avc,alignment=au` caps.
    pub avcc: Vec<u8>,
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

/// `sample_flags` (§8.8.3.1) of a sync sample: `sample_depends_on` = 2 (depends on no other).
const SYNC_SAMPLE_FLAGS: u32 = 0x0200_0000;

/// `sample_flags` of a non-sync sample: `sample_depends_on` = 1 and
/// `sample_is_non_sync_sample` = 1.
const NON_SYNC_SAMPLE_FLAGS: u32 = 0x0101_0000;

/// `tfhd` flag: offsets are relative to the first byte of the enclosing `moof`.
const TFHD_DEFAULT_BASE_IS_MOOF: u32 = 0x02_0000;

/// `trun` flags: data-offset, then per-sample duration, size, flags and composition offset.
const TRUN_FLAGS: u32 = 0x00_0001 | 0x00_0100 | 0x00_0200 | 0x00_0400 | 0x00_0800;

/// Bytes of one `trun` sample entry with [`TRUN_FLAGS`].
const TRUN_ENTRY_LEN: usize = 16;

/// Unity transformation matrix of `mvhd` and `tkhd` (16.16 and 2.30 fixed point).
const UNITY_MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// ftyp + moov (mvhd, trak{tkhd, mdia{mdhd, hdlr 'vide', minf{vmhd, dinf/dref, stbl{stsd
/// avc1+avcC, empty stts/stsc/stsz/stco}}}}, mvex{trex}).
///
/// Durations are 0: the samples and their timing come in [`media_segment`]s.
pub(crate) fn init_segment(track: &VideoTrack) -> Vec<u8> {
    let mut out = Vec::with_capacity(768 + track.avcc.len());
    write_ftyp(
        &mut out,
        b"iso5",
        &[b"iso5", b"iso6", b"mp41", b"avc1", b"dash"],
    );
    write_moov(&mut out, track, &Layout::Fragmented);
    out
}

/// moof{mfhd(sequence_number), traf{tfhd (track 1, default-base-is-moof), tfdt version 1
/// (base_media_decode_time), trun (data-offset, per-sample duration, size, flags (sync vs
/// non-sync, depends-on), composition offset)}} + mdat.
///
/// `trun` is version 0 (unsigned offsets) unless some composition offset is negative.
pub(crate) fn media_segment(
    sequence_number: u32,
    base_media_decode_time: u64,
    samples: &[Sample],
) -> Vec<u8> {
    let payload_len: u64 = samples.iter().map(|s| s.data.len() as u64).sum();
    let trun_version = u8::from(samples.iter().any(|s| s.composition_offset < 0));
    let mut out = Vec::with_capacity(128 + TRUN_ENTRY_LEN * samples.len() + payload_len as usize);
    write_box(&mut out, b"moof", |o| {
        write_full_box(o, b"mfhd", 0, 0, |o| o.put_u32(sequence_number));
        write_box(o, b"traf", |o| {
            write_full_box(o, b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, |o| {
                o.put_u32(TRACK_ID)
            });
            write_full_box(o, b"tfdt", 1, 0, |o| o.put_u64(base_media_decode_time));
            write_full_box(o, b"trun", trun_version, TRUN_FLAGS, |o| {
                o.put_u32(saturating_u32(samples.len()));
                o.put_i32(0); // data_offset, patched below once the moof size is known
                for s in samples {
                    o.put_u32(s.duration);
                    o.put_u32(saturating_u32(s.data.len()));
                    o.put_u32(sample_flags(s.is_sync));
                    // Same bits in version 0 (unsigned), where all offsets are >= 0.
                    o.put_i32(s.composition_offset);
                }
            });
        });
    });
    // `trun` ends the `moof`: its data_offset sits just before the sample entries.
    let moof_len = out.len();
    let data_offset = moof_len + mdat_header_len(payload_len);
    let at = moof_len - TRUN_ENTRY_LEN * samples.len() - 4;
    let data_offset = i32::try_from(data_offset).unwrap_or(i32::MAX);
    out[at..at + 4].copy_from_slice(&data_offset.to_be_bytes());
    write_mdat(&mut out, samples, payload_len);
    out
}

/// Where [`media_segment`] puts the 64-bit `tfdt` value: moof header (8) + mfhd (16) + traf
/// header (8) + tfhd (16) + tfdt header and version/flags (12).
const TFDT_VALUE_AT: usize = 60;

/// Rewrites the `baseMediaDecodeTime` of a segment made by [`media_segment`] (the emulator
/// serves each HLS session its own decode-time origin). Returns false, changing nothing, when
/// the bytes are not laid out as [`media_segment`] writes them.
pub(crate) fn set_base_media_decode_time(segment: &mut [u8], base_media_decode_time: u64) -> bool {
    let tfdt_ok = segment.get(TFDT_VALUE_AT - 8..TFDT_VALUE_AT - 4) == Some(b"tfdt".as_slice())
        && segment.get(TFDT_VALUE_AT - 4) == Some(&1);
    match segment.get_mut(TFDT_VALUE_AT..TFDT_VALUE_AT + 8) {
        Some(value) if tfdt_ok => {
            value.copy_from_slice(&base_media_decode_time.to_be_bytes());
            true
        }
        _ => false,
    }
}

/// A complete, playable, non-fragmented MP4 with moov before mdat (fast start):
/// ftyp + moov (full sample tables: stts run-length encoded, ctts only when any offset ≠ 0
/// (version 1, signed), stss, stsz, stsc, stco — or co64 when offsets exceed u32) + mdat
/// (64-bit size when needed).
///
/// Each group of pictures (a sync sample and the samples up to the next one) is one chunk.
/// When the first presentation time is after 0 (B-frames), an edit list starts the
/// presentation at the first composed picture, as other muxers do.
pub(crate) fn progressive_mp4(track: &VideoTrack, samples: &[Sample]) -> Vec<u8> {
    progressive_mp4_with_stco_limit(track, samples, u64::from(u32::MAX))
}

/// [`progressive_mp4`], switching from `stco` to `co64` when a chunk offset exceeds
/// `stco_limit` (tests lower it to exercise `co64` without gigabytes of media).
fn progressive_mp4_with_stco_limit(
    track: &VideoTrack,
    samples: &[Sample],
    stco_limit: u64,
) -> Vec<u8> {
    let tables = SampleTables::new(samples);
    let mdat_header = mdat_header_len(tables.payload_len);
    let mut out = Vec::new();
    write_ftyp(&mut out, b"isom", &[b"isom", b"iso2", b"avc1", b"mp41"]);
    let ftyp_len = out.len();

    // The moov size does not depend on the offsets it holds, only on their width.
    let moov = |base: u64, co64: bool| {
        let mut moov = Vec::new();
        let layout = Layout::Progressive {
            tables: &tables,
            base,
            co64,
        };
        write_moov(&mut moov, track, &layout);
        moov
    };
    let payload_start = |moov_len: usize| (ftyp_len + moov_len + mdat_header) as u64;
    let last_chunk = tables.chunk_offsets.last().copied().unwrap_or(0);
    let mut co64 = false;
    let mut moov_len = moov(0, false).len();
    if payload_start(moov_len) + last_chunk > stco_limit {
        co64 = true;
        moov_len = moov(0, true).len();
    }
    let moov = moov(payload_start(moov_len), co64);

    out.reserve(moov.len() + mdat_header + tables.payload_len as usize);
    out.extend_from_slice(&moov);
    write_mdat(&mut out, samples, tables.payload_len);
    out
}

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

/// Sample tables of a progressive file, computed once from the samples in decode order.
struct SampleTables {
    /// `stts` runs of (sample_count, sample_delta).
    stts: Vec<(u32, u32)>,
    /// `ctts` runs of (sample_count, sample_offset); empty when every offset is 0.
    ctts: Vec<(u32, i32)>,
    /// 1-based numbers of the sync samples.
    stss: Vec<u32>,
    /// `stsc` runs of (first_chunk, samples_per_chunk); first_chunk is 1-based.
    stsc: Vec<(u32, u32)>,
    /// Size of each sample.
    sizes: Vec<u32>,
    /// Chunk offsets relative to the first `mdat` payload byte.
    chunk_offsets: Vec<u64>,
    /// Sum of sample durations.
    duration: u64,
    /// Total bytes of sample data.
    payload_len: u64,
    /// Earliest composition time (decode time + composition offset) of any sample.
    first_pts: i64,
}

impl SampleTables {
    /// Computes the tables; a chunk starts at the first sample and at every sync sample.
    fn new(samples: &[Sample]) -> Self {
        let mut t = SampleTables {
            stts: Vec::new(),
            ctts: Vec::new(),
            stss: Vec::new(),
            stsc: Vec::new(),
            sizes: Vec::with_capacity(samples.len()),
            chunk_offsets: Vec::new(),
            duration: 0,
            payload_len: 0,
            first_pts: if samples.is_empty() { 0 } else { i64::MAX },
        };
        let mut samples_per_chunk: Vec<u32> = Vec::new();
        for (i, s) in samples.iter().enumerate() {
            push_run(&mut t.stts, s.duration);
            push_run(&mut t.ctts, s.composition_offset);
            if s.is_sync {
                t.stss.push(saturating_u32(i + 1));
            }
            if i == 0 || s.is_sync {
                t.chunk_offsets.push(t.payload_len);
                samples_per_chunk.push(0);
            }
            if let Some(n) = samples_per_chunk.last_mut() {
                *n += 1;
            }
            t.sizes.push(saturating_u32(s.data.len()));
            let pts = t.duration as i64 + i64::from(s.composition_offset);
            t.first_pts = t.first_pts.min(pts);
            t.duration += u64::from(s.duration);
            t.payload_len += s.data.len() as u64;
        }
        if t.ctts.iter().all(|&(_, offset)| offset == 0) {
            t.ctts.clear();
        }
        for (i, &n) in samples_per_chunk.iter().enumerate() {
            if t.stsc.last().is_none_or(|&(_, last)| last != n) {
                t.stsc.push((saturating_u32(i + 1), n));
            }
        }
        t
    }
}

/// Counts `value` into run-length encoded `runs` of (count, value).
fn push_run<T: PartialEq>(runs: &mut Vec<(u32, T)>, value: T) {
    match runs.last_mut() {
        Some((count, last)) if *last == value => *count += 1,
        _ => runs.push((1, value)),
    }
}

/// A media segment made undecodable for fault injection: every box keeps its size, but the
/// flags of the track fragment header (`moof/traf/tfhd`) all get set, so that it declares fields
/// it does not hold and GStreamer's demuxer fails on it ("This file is corrupt"). Garbled media
/// data would not do: demuxers and decoders skip or conceal it without an error.
pub(crate) fn garble(segment: &[u8]) -> Vec<u8> {
    let mut out = segment.to_vec();
    if let Some(at) = out.windows(4).position(|w| w == b"tfhd")
        && let Some(flags) = out.get_mut(at + 5..at + 8)
    {
        flags.copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    }
    out
}

/// A media segment whose box structure is intact and whose `mdat` payload is overwritten with a
/// byte pattern that is no valid H.264 NAL unit stream.
pub(crate) fn garble_media(segment: &[u8]) -> Vec<u8> {
    let mut out = segment.to_vec();
    let mut pos = 0usize;
    while let Some(header) = out.get(pos..pos + 8) {
        let size = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = [header[4], header[5], header[6], header[7]];
        if size < 8 {
            break;
        }
        if &kind == b"mdat" {
            let end = (pos + size).min(out.len());
            if let Some(payload) = out.get_mut(pos + 8..end) {
                for (i, b) in payload.iter_mut().enumerate() {
                    *b = if i % 4 == 3 { 0x65 } else { 0xFF };
                }
            }
            break;
        }
        pos += size;
    }
    out
}

/// Writes a box (§4.2): a size and type header, the body written by `body`, then the size
/// patched in; a box of 4 GiB or more gets a 64-bit `largesize` instead.
fn write_box(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.put_u32(0);
    out.put_slice(kind);
    body(out);
    let size = out.len() - start;
    match u32::try_from(size) {
        Ok(size) => out[start..start + 4].copy_from_slice(&size.to_be_bytes()),
        Err(_) => {
            let size = size as u64 + 8;
            out[start..start + 4].copy_from_slice(&1u32.to_be_bytes());
            out.splice(start + 8..start + 8, size.to_be_bytes());
        }
    }
}

/// Writes a full box (§4.2): a box whose body starts with an 8-bit version and 24-bit flags.
fn write_full_box(
    out: &mut Vec<u8>,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut Vec<u8>),
) {
    write_box(out, kind, |o| {
        o.put_u32(u32::from(version) << 24 | (flags & 0x00FF_FFFF));
        body(o);
    });
}

/// Writes `ftyp` (§4.3) with minor version 0.
fn write_ftyp(out: &mut Vec<u8>, major: &[u8; 4], compatible: &[&[u8; 4]]) {
    write_box(out, b"ftyp", |o| {
        o.put_slice(major);
        o.put_u32(0);
        for brand in compatible {
            o.put_slice(*brand);
        }
    });
}

/// Writes `moov` (§8.2.1): `mvhd`, the video `trak` and, when fragmented, `mvex`.
fn write_moov(out: &mut Vec<u8>, track: &VideoTrack, layout: &Layout<'_>) {
    let duration = match layout {
        Layout::Fragmented => 0,
        Layout::Progressive { tables, .. } => tables.duration,
    };
    write_box(out, b"moov", |o| {
        write_mvhd(o, track.timescale, duration);
        write_trak(o, track, duration, layout);
        if let Layout::Fragmented = layout {
            write_box(o, b"mvex", |o| {
                // trex (§8.8.3): defaults unused, every trun entry carries its own values.
                write_full_box(o, b"trex", 0, 0, |o| {
                    o.put_u32(TRACK_ID);
                    o.put_u32(1); // default_sample_description_index
                    o.put_u32(0); // default_sample_duration
                    o.put_u32(0); // default_sample_size
                    o.put_u32(0); // default_sample_flags
                });
            });
        }
    });
}

/// Writes a 64-bit field when `wide` (version 1 times, `co64` offsets), else a 32-bit one.
fn put_wide(out: &mut Vec<u8>, wide: bool, value: u64) {
    if wide {
        out.put_u64(value);
    } else {
        out.put_u32(value as u32);
    }
}

/// Writes `mvhd` (§8.2.2); version 1 only when `duration` needs 64 bits.
fn write_mvhd(out: &mut Vec<u8>, timescale: u32, duration: u64) {
    let wide = duration > u64::from(u32::MAX);
    write_full_box(out, b"mvhd", u8::from(wide), 0, |o| {
        put_wide(o, wide, 0); // creation_time
        put_wide(o, wide, 0); // modification_time
        o.put_u32(timescale);
        put_wide(o, wide, duration);
        o.put_u32(0x0001_0000); // rate 1.0
        o.put_u16(0x0100); // volume 1.0
        o.put_bytes(0, 2 + 8); // reserved
        UNITY_MATRIX.iter().for_each(|&m| o.put_u32(m));
        o.put_bytes(0, 6 * 4); // pre_defined
        o.put_u32(TRACK_ID + 1); // next_track_ID
    });
}

/// Writes the video `trak` (§8.3.1): `tkhd`, an edit list when needed, and `mdia`.
fn write_trak(out: &mut Vec<u8>, track: &VideoTrack, duration: u64, layout: &Layout<'_>) {
    let wide = duration > u64::from(u32::MAX);
    write_box(out, b"trak", |o| {
        // tkhd (§8.3.2), flags track_enabled | track_in_movie.
        write_full_box(o, b"tkhd", u8::from(wide), 0x3, |o| {
            put_wide(o, wide, 0); // creation_time
            put_wide(o, wide, 0); // modification_time
            o.put_u32(TRACK_ID);
            o.put_u32(0); // reserved
            put_wide(o, wide, duration);
            o.put_bytes(0, 2 * 4); // reserved
            o.put_u16(0); // layer
            o.put_u16(0); // alternate_group
            o.put_u16(0); // volume: 0 for video
            o.put_u16(0); // reserved
            UNITY_MATRIX.iter().for_each(|&m| o.put_u32(m));
            o.put_u32(track.width.min(0xFFFF) << 16); // 16.16 fixed point
            o.put_u32(track.height.min(0xFFFF) << 16);
        });
        if let Layout::Progressive { tables, .. } = layout
            && tables.first_pts > 0
        {
            write_edit_list(o, duration, tables.first_pts);
        }
        write_box(o, b"mdia", |o| {
            write_full_box(o, b"mdhd", u8::from(wide), 0, |o| {
                put_wide(o, wide, 0); // creation_time
                put_wide(o, wide, 0); // modification_time
                o.put_u32(track.timescale);
                put_wide(o, wide, duration);
                o.put_u16(0x55C4); // language "und" (ISO 639-2/T, 5 bits per letter)
                o.put_u16(0); // pre_defined
            });
            write_full_box(o, b"hdlr", 0, 0, |o| {
                o.put_u32(0); // pre_defined
                o.put_slice(b"vide");
                o.put_bytes(0, 3 * 4); // reserved
                o.put_slice(b"VideoHandler\0");
            });
            write_minf(o, track, layout);
        });
    });
}

/// Writes `edts`/`elst` (§8.6.5/§8.6.6): one edit presenting `duration` ticks from media
/// time `media_time`, so that the first composed picture is shown at time 0.
fn write_edit_list(out: &mut Vec<u8>, duration: u64, media_time: i64) {
    let wide = duration > u64::from(u32::MAX) || media_time > i64::from(i32::MAX);
    write_box(out, b"edts", |o| {
        write_full_box(o, b"elst", u8::from(wide), 0, |o| {
            o.put_u32(1); // entry_count
            if wide {
                o.put_u64(duration); // segment_duration
                o.put_i64(media_time);
            } else {
                o.put_u32(duration as u32);
                o.put_i32(media_time as i32);
            }
            o.put_u16(1); // media_rate_integer
            o.put_u16(0); // media_rate_fraction
        });
    });
}

/// Writes `minf` (§8.4.4): `vmhd`, `dinf` with a self-contained `dref`, and `stbl`.
fn write_minf(out: &mut Vec<u8>, track: &VideoTrack, layout: &Layout<'_>) {
    write_box(out, b"minf", |o| {
        // vmhd (§12.1.2) has flags 1; graphicsmode copy, opcolor 0.
        write_full_box(o, b"vmhd", 0, 1, |o| o.put_bytes(0, 2 + 3 * 2));
        write_box(o, b"dinf", |o| {
            write_full_box(o, b"dref", 0, 0, |o| {
                o.put_u32(1); // entry_count
                // Flag 1: the media data is in this file.
                write_full_box(o, b"url ", 0, 1, |_| {});
            });
        });
        write_box(o, b"stbl", |o| {
            write_stsd(o, track);
            match layout {
                Layout::Fragmented => write_empty_sample_tables(o),
                Layout::Progressive { tables, base, co64 } => {
                    write_sample_tables(o, tables, *base, *co64);
                }
            }
        });
    });
}

/// Writes `stsd` (§8.5.2) with one `avc1` sample entry (ISO/IEC 14496-15 §5.4.2).
fn write_stsd(out: &mut Vec<u8>, track: &VideoTrack) {
    write_full_box(out, b"stsd", 0, 0, |o| {
        o.put_u32(1); // entry_count
        write_box(o, b"avc1", |o| {
            o.put_bytes(0, 6); // reserved
            o.put_u16(1); // data_reference_index
            o.put_u16(0); // pre_defined
            o.put_u16(0); // reserved
            o.put_bytes(0, 3 * 4); // pre_defined
            o.put_u16(track.width.min(0xFFFF) as u16);
            o.put_u16(track.height.min(0xFFFF) as u16);
            o.put_u32(0x0048_0000); // horizresolution 72 dpi
            o.put_u32(0x0048_0000); // vertresolution 72 dpi
            o.put_u32(0); // reserved
            o.put_u16(1); // frame_count
            o.put_bytes(0, 32); // compressorname (empty Pascal string)
            o.put_u16(0x0018); // depth
            o.put_i16(-1); // pre_defined
            write_box(o, b"avcC", |o| o.put_slice(&track.avcc));
        });
    });
}

/// Writes the empty `stts`, `stsc`, `stsz` and `stco` of a fragmented track.
fn write_empty_sample_tables(out: &mut Vec<u8>) {
    write_full_box(out, b"stts", 0, 0, |o| o.put_u32(0));
    write_full_box(out, b"stsc", 0, 0, |o| o.put_u32(0));
    write_full_box(out, b"stsz", 0, 0, |o| {
        o.put_u32(0); // sample_size
        o.put_u32(0); // sample_count
    });
    write_full_box(out, b"stco", 0, 0, |o| o.put_u32(0));
}

/// Writes `stts`, `ctts` (if any), `stss`, `stsc`, `stsz` and `stco`/`co64` (§8.6, §8.7),
/// with chunk offsets moved by `base`.
fn write_sample_tables(out: &mut Vec<u8>, t: &SampleTables, base: u64, co64: bool) {
    write_full_box(out, b"stts", 0, 0, |o| {
        o.put_u32(saturating_u32(t.stts.len()));
        for &(count, delta) in &t.stts {
            o.put_u32(count);
            o.put_u32(delta);
        }
    });
    if !t.ctts.is_empty() {
        write_full_box(out, b"ctts", 1, 0, |o| {
            o.put_u32(saturating_u32(t.ctts.len()));
            for &(count, offset) in &t.ctts {
                o.put_u32(count);
                o.put_i32(offset);
            }
        });
    }
    write_full_box(out, b"stss", 0, 0, |o| {
        o.put_u32(saturating_u32(t.stss.len()));
        t.stss.iter().for_each(|&n| o.put_u32(n));
    });
    write_full_box(out, b"stsc", 0, 0, |o| {
        o.put_u32(saturating_u32(t.stsc.len()));
        for &(first_chunk, samples_per_chunk) in &t.stsc {
            o.put_u32(first_chunk);
            o.put_u32(samples_per_chunk);
            o.put_u32(1); // sample_description_index
        }
    });
    write_full_box(out, b"stsz", 0, 0, |o| {
        o.put_u32(0); // sample_size: sizes follow
        o.put_u32(saturating_u32(t.sizes.len()));
        t.sizes.iter().for_each(|&size| o.put_u32(size));
    });
    let kind = if co64 { b"co64" } else { b"stco" };
    write_full_box(out, kind, 0, 0, |o| {
        o.put_u32(saturating_u32(t.chunk_offsets.len()));
        for &offset in &t.chunk_offsets {
            put_wide(o, co64, base + offset);
        }
    });
}

/// Length of the `mdat` header for `payload_len` bytes of samples: 16 with a 64-bit size.
fn mdat_header_len(payload_len: u64) -> usize {
    if payload_len + 8 > u64::from(u32::MAX) {
        16
    } else {
        8
    }
}

/// Writes `mdat` (§8.1.1) holding the samples' data back to back.
fn write_mdat(out: &mut Vec<u8>, samples: &[Sample], payload_len: u64) {
    let header_len = mdat_header_len(payload_len);
    let size = payload_len + header_len as u64;
    if header_len == 16 {
        out.put_u32(1);
        out.put_slice(b"mdat");
        out.put_u64(size);
    } else {
        out.put_u32(size as u32);
        out.put_slice(b"mdat");
    }
    for s in samples {
        out.put_slice(&s.data);
    }
}

/// `sample_flags` of a sync or non-sync sample.
fn sample_flags(is_sync: bool) -> u32 {
    if is_sync {
        SYNC_SAMPLE_FLAGS
    } else {
        NON_SYNC_SAMPLE_FLAGS
    }
}

/// A count or size in a 32-bit field. Beyond `u32::MAX` (a 4 GiB access unit, 4 billion
/// samples) the format cannot express it; saturating keeps the writer panic-free.
fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {

    #[test]
    fn base_media_decode_time_can_be_rewritten() {
        let sample = Sample {
            data: bytes::Bytes::from_static(&[0, 0, 0, 1, 0x65]),
            duration: 3600,
            composition_offset: 0,
            is_sync: true,
        };
        let mut segment = media_segment(7, 1 << 40, std::slice::from_ref(&sample));
        assert_eq!(
            u64::from_be_bytes(
                segment[TFDT_VALUE_AT..TFDT_VALUE_AT + 8]
                    .try_into()
                    .unwrap()
            ),
            1 << 40
        );
        assert!(set_base_media_decode_time(&mut segment, 90_000));
        assert_eq!(
            u64::from_be_bytes(
                segment[TFDT_VALUE_AT..TFDT_VALUE_AT + 8]
                    .try_into()
                    .unwrap()
            ),
            90_000
        );
        assert!(!set_base_media_decode_time(&mut [0u8; 16], 1));
    }
    use super::*;
    use gst::prelude::*;
    use gstreamer as gst;
    use gstreamer_app as gst_app;
    use std::sync::{Arc, Mutex, OnceLock};

    const TIMESCALE: u32 = 90_000;
    const FRAMES: usize = 60;
    const BASE_DECODE_TIME: u64 = 1 << 40;
    const FRAME_NS: u64 = 40_000_000;

    /// Encoder output: the track and its samples in decode order.
    struct Encoded {
        track: VideoTrack,
        samples: Vec<Sample>,
    }

    /// One decoded frame.
    #[derive(Clone, Copy, Debug)]
    struct Frame {
        pts: u64,
        /// PTS on the segment's stream time, where qtdemux applies edit lists.
        stream_time: u64,
        width: i32,
        height: i32,
    }

    /// Decoder output: the frames in output order and the duration qtdemux reported.
    struct Decoded {
        frames: Vec<Frame>,
        duration: Option<gst::ClockTime>,
    }

    fn ticks(t: gst::ClockTime) -> i64 {
        (u128::from(t.nseconds()) * u128::from(TIMESCALE) / 1_000_000_000) as i64
    }

    fn bus_error(pipeline: &gst::Pipeline) -> Option<String> {
        let bus = pipeline.bus().unwrap();
        let msg = bus.pop_filtered(&[gst::MessageType::Error])?;
        match msg.view() {
            gst::MessageView::Error(e) => Some(format!("{} ({:?})", e.error(), e.debug())),
            _ => None,
        }
    }

    /// Encodes FRAMES frames of 320x240 at 25 fps with extra x264enc properties `x264`.
    fn encode(x264: &str) -> Encoded {
        gst::init().unwrap();
        let pipeline = gst::parse::launch(&format!(
            "videotestsrc num-buffers={FRAMES} \
             ! video/x-raw,width=320,height=240,framerate=25/1 \
             ! x264enc key-int-max=25 {x264} ! h264parse \
             ! video/x-h264,stream-format=avc,alignment=au ! appsink name=sink sync=false"
        ))
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let sink = pipeline
            .by_name("sink")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        pipeline.set_state(gst::State::Playing).unwrap();
        let mut track = None;
        let mut samples = Vec::new();
        while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(10)) {
            let s = sample.caps().unwrap().structure(0).unwrap().to_owned();
            track.get_or_insert_with(|| VideoTrack {
                width: s.get::<i32>("width").unwrap() as u32,
                height: s.get::<i32>("height").unwrap() as u32,
                timescale: TIMESCALE,
                avcc: s
                    .get::<gst::Buffer>("codec_data")
                    .unwrap()
                    .map_readable()
                    .unwrap()
                    .to_vec(),
            });
            let buf = sample.buffer().unwrap();
            let pts = buf.pts().unwrap();
            let dts = buf.dts().unwrap_or(pts);
            samples.push(Sample {
                data: Bytes::copy_from_slice(&buf.map_readable().unwrap()),
                duration: ticks(buf.duration().unwrap()) as u32,
                composition_offset: (ticks(pts) - ticks(dts)) as i32,
                is_sync: !buf.flags().contains(gst::BufferFlags::DELTA_UNIT),
            });
        }
        assert!(sink.is_eos(), "encoder stalled: {:?}", bus_error(&pipeline));
        pipeline.set_state(gst::State::Null).unwrap();
        assert_eq!(samples.len(), FRAMES);
        Encoded {
            track: track.unwrap(),
            samples,
        }
    }

    /// The no-B-frame encoding, shared by the tests that use it.
    fn zerolatency() -> &'static Encoded {
        static ENCODED: OnceLock<Encoded> = OnceLock::new();
        ENCODED.get_or_init(|| encode("bframes=0 tune=zerolatency"))
    }

    /// Init segment followed by one media segment per group of pictures, as KVS fragments.
    fn fragmented(enc: &Encoded) -> Vec<Vec<u8>> {
        let mut out = vec![init_segment(&enc.track)];
        let mut decode_time = BASE_DECODE_TIME;
        for (i, fragment) in enc.samples.chunk_by(|_, b| !b.is_sync).enumerate() {
            out.push(media_segment(i as u32 + 1, decode_time, fragment));
            decode_time += fragment.iter().map(|s| u64::from(s.duration)).sum::<u64>();
        }
        out
    }

    /// Pushes `chunks` through qtdemux and avdec_h264 and collects the decoded frames.
    fn decode(chunks: &[Vec<u8>]) -> Decoded {
        gst::init().unwrap();
        let pipeline = gst::parse::launch(
            "appsrc name=src is-live=false ! qtdemux ! h264parse ! avdec_h264 \
             ! appsink name=sink sync=false",
        )
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
        let src = pipeline
            .by_name("src")
            .unwrap()
            .downcast::<gst_app::AppSrc>()
            .unwrap();
        let sink = pipeline
            .by_name("sink")
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        src.set_caps(None);
        let frames = Arc::new(Mutex::new(Vec::new()));
        let collected = Arc::clone(&frames);
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let s = sample.caps().unwrap().structure(0).unwrap().to_owned();
                    let pts = sample.buffer().unwrap().pts().unwrap();
                    let segment = sample.segment().unwrap();
                    let segment = segment.downcast_ref::<gst::ClockTime>().unwrap();
                    collected.lock().unwrap().push(Frame {
                        pts: pts.nseconds(),
                        stream_time: segment.to_stream_time(pts).unwrap().nseconds(),
                        width: s.get::<i32>("width").unwrap(),
                        height: s.get::<i32>("height").unwrap(),
                    });
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        pipeline.set_state(gst::State::Playing).unwrap();
        for chunk in chunks {
            src.push_buffer(gst::Buffer::from_slice(chunk.clone()))
                .unwrap();
        }
        src.end_of_stream().unwrap();
        let msg = pipeline
            .bus()
            .unwrap()
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(10),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            )
            .expect("no EOS within 10 s");
        if let gst::MessageView::Error(e) = msg.view() {
            panic!("decode failed: {} ({:?})", e.error(), e.debug());
        }
        let duration = pipeline.query_duration::<gst::ClockTime>();
        pipeline.set_state(gst::State::Null).unwrap();
        let frames = frames.lock().unwrap().clone();
        Decoded { frames, duration }
    }

    /// Sorted presentation times of the decoded frames, after checking their size.
    fn sorted_pts(decoded: &Decoded) -> Vec<u64> {
        for f in &decoded.frames {
            assert_eq!((f.width, f.height), (320, 240));
        }
        let mut pts: Vec<u64> = decoded.frames.iter().map(|f| f.pts).collect();
        pts.sort_unstable();
        pts
    }

    fn assert_steps_of_one_frame(pts: &[u64]) {
        for w in pts.windows(2) {
            assert!(w[1].abs_diff(w[0]).abs_diff(FRAME_NS) <= 1_000, "{w:?}");
        }
    }

    /// Top-level boxes of `buf` as (type, payload), asserting they cover it exactly.
    fn boxes(buf: &[u8]) -> Vec<([u8; 4], &[u8])> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < buf.len() {
            assert!(buf.len() - pos >= 8, "truncated header at {pos}");
            let size = u32::from_be_bytes(buf[pos..pos + 4].try_into().unwrap()) as usize;
            let kind: [u8; 4] = buf[pos + 4..pos + 8].try_into().unwrap();
            let (size, header) = match size {
                1 => (
                    u64::from_be_bytes(buf[pos + 8..pos + 16].try_into().unwrap()) as usize,
                    16,
                ),
                size => (size, 8),
            };
            assert!(
                size >= header && pos + size <= buf.len(),
                "bad size at {pos}"
            );
            out.push((kind, &buf[pos + header..pos + size]));
            pos += size;
        }
        assert_eq!(pos, buf.len());
        out
    }

    /// Checks that the sizes of all boxes, nested ones included, add up.
    fn check_tree(buf: &[u8]) {
        for (kind, payload) in boxes(buf) {
            match &kind {
                b"moov" | b"trak" | b"mdia" | b"minf" | b"dinf" | b"stbl" | b"mvex" | b"moof"
                | b"traf" | b"edts" => check_tree(payload),
                b"stsd" | b"dref" => check_tree(&payload[8..]),
                b"avc1" => check_tree(&payload[78..]),
                _ => {}
            }
        }
    }

    /// Payload of the box at `path` (each step a child of the previous one).
    fn find<'a>(buf: &'a [u8], path: &[&[u8; 4]]) -> &'a [u8] {
        let Some((first, rest)) = path.split_first() else {
            return buf;
        };
        let (_, payload) = boxes(buf)
            .into_iter()
            .find(|(kind, _)| kind == *first)
            .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(*first)));
        find(payload, rest)
    }

    fn kinds(buf: &[u8]) -> Vec<[u8; 4]> {
        boxes(buf).into_iter().map(|(kind, _)| kind).collect()
    }

    fn be_u32(b: &[u8]) -> u32 {
        u32::from_be_bytes(b[..4].try_into().unwrap())
    }

    fn be_u64(b: &[u8]) -> u64 {
        u64::from_be_bytes(b[..8].try_into().unwrap())
    }

    #[test]
    fn fragmented_mp4_decodes_every_frame() {
        let enc = zerolatency();
        let segments = fragmented(enc);
        assert_eq!(
            segments.len(),
            1 + 3,
            "fragments start at frames 0, 25 and 50"
        );
        let decoded = decode(&segments);
        assert_eq!(decoded.frames.len(), FRAMES);
        let pts = sorted_pts(&decoded);
        assert_steps_of_one_frame(&pts);
        // Decode order is presentation order without B-frames.
        let in_order: Vec<u64> = decoded.frames.iter().map(|f| f.pts).collect();
        assert_eq!(in_order, pts);
        // qtdemux takes the first frame's time from tfdt.
        let base_ns = u128::from(BASE_DECODE_TIME) * 1_000_000_000 / u128::from(TIMESCALE);
        assert!(
            u128::from(pts[0]).abs_diff(base_ns) <= 1_000,
            "{} vs {base_ns}",
            pts[0]
        );
    }

    #[test]
    fn progressive_mp4_decodes_every_frame_with_its_duration() {
        let enc = zerolatency();
        let file = progressive_mp4(&enc.track, &enc.samples);
        let decoded = decode(&[file]);
        assert_eq!(decoded.frames.len(), FRAMES);
        let pts = sorted_pts(&decoded);
        assert_eq!(pts[0], 0);
        assert_steps_of_one_frame(&pts);
        assert_eq!(decoded.duration, Some(gst::ClockTime::from_mseconds(2400)));
    }

    #[test]
    fn progressive_mp4_with_co64_decodes_every_frame() {
        let enc = zerolatency();
        let file = progressive_mp4_with_stco_limit(&enc.track, &enc.samples, 0);
        let stbl = find(&file, &[b"moov", b"trak", b"mdia", b"minf", b"stbl"]);
        let co64 = find(stbl, &[b"co64"]);
        assert_eq!(be_u32(&co64[4..]), 3, "one chunk per group of pictures");
        let mdat_payload = file.len() - enc.samples.iter().map(|s| s.data.len()).sum::<usize>();
        assert_eq!(be_u64(&co64[8..]), mdat_payload as u64);
        let decoded = decode(&[file]);
        assert_eq!(decoded.frames.len(), FRAMES);
        assert_steps_of_one_frame(&sorted_pts(&decoded));
    }

    #[test]
    fn b_frames_decode_without_loss_or_duplicates() {
        let enc = encode("bframes=2");
        assert!(enc.samples.iter().any(|s| s.composition_offset != 0));
        let progressive = progressive_mp4(&enc.track, &enc.samples);
        let stbl = find(&progressive, &[b"moov", b"trak", b"mdia", b"minf", b"stbl"]);
        assert_eq!(find(stbl, &[b"ctts"])[0], 1, "ctts version 1");
        let progressive = decode(&[progressive]);
        for decoded in [&decode(&fragmented(&enc)), &progressive] {
            assert_eq!(decoded.frames.len(), FRAMES);
            let pts = sorted_pts(decoded);
            assert!(pts.windows(2).all(|w| w[0] < w[1]), "{pts:?}");
            assert_steps_of_one_frame(&pts);
        }
        // The edit list starts the presentation at the first composed picture.
        let first = progressive.frames.iter().map(|f| f.stream_time).min();
        assert_eq!(first, Some(0));
        assert_eq!(
            progressive.duration,
            Some(gst::ClockTime::from_mseconds(2400))
        );
    }

    #[test]
    fn box_sizes_and_fields() {
        let enc = zerolatency();
        let init = init_segment(&enc.track);
        assert_eq!(kinds(&init), [*b"ftyp", *b"moov"]);
        check_tree(&init);
        assert_eq!(&find(&init, &[b"ftyp"])[..4], b"iso5");
        let stbl = find(&init, &[b"moov", b"trak", b"mdia", b"minf", b"stbl"]);
        let avc1 = find(&find(stbl, &[b"stsd"])[8..], &[b"avc1"]);
        assert_eq!(find(&avc1[78..], &[b"avcC"]), enc.track.avcc);
        assert_eq!(avc1[24..28], [0x01, 0x40, 0x00, 0xF0], "320x240");
        let tkhd = find(&init, &[b"moov", b"trak", b"tkhd"]);
        assert_eq!(be_u32(&tkhd[76..]), 320 << 16);
        assert_eq!(be_u32(&tkhd[80..]), 240 << 16);
        assert_eq!(
            be_u32(&find(&init, &[b"moov", b"mvex", b"trex"])[4..]),
            TRACK_ID
        );

        let mut decode_time = BASE_DECODE_TIME;
        for (i, segment) in fragmented(enc)[1..].iter().enumerate() {
            assert_eq!(kinds(segment), [*b"moof", *b"mdat"]);
            check_tree(segment);
            let mfhd = find(segment, &[b"moof", b"mfhd"]);
            assert_eq!(be_u32(&mfhd[4..]), i as u32 + 1);
            let tfdt = find(segment, &[b"moof", b"traf", b"tfdt"]);
            assert_eq!(tfdt[0], 1, "tfdt version 1");
            assert_eq!(be_u64(&tfdt[4..]), decode_time);
            let trun = find(segment, &[b"moof", b"traf", b"trun"]);
            let count = be_u32(&trun[4..]) as usize;
            let moof_len = 8 + find(segment, &[b"moof"]).len();
            assert_eq!(be_u32(&trun[8..]) as usize, moof_len + 8, "data_offset");
            let samples = &enc.samples[i * 25..(i * 25 + count)];
            let entries = trun[12..].chunks(TRUN_ENTRY_LEN);
            for (s, e) in samples.iter().zip(entries) {
                assert_eq!(be_u32(e), s.duration);
                assert_eq!(be_u32(&e[4..]) as usize, s.data.len());
                assert_eq!(be_u32(&e[8..]), sample_flags(s.is_sync));
            }
            assert!(samples[0].is_sync);
            let payload: Vec<u8> = samples.iter().flat_map(|s| s.data.to_vec()).collect();
            assert_eq!(find(segment, &[b"mdat"]), payload);
            decode_time += samples.iter().map(|s| u64::from(s.duration)).sum::<u64>();
        }

        let file = progressive_mp4(&enc.track, &enc.samples);
        assert_eq!(kinds(&file), [*b"ftyp", *b"moov", *b"mdat"]);
        check_tree(&file);
        let mvhd = find(&file, &[b"moov", b"mvhd"]);
        assert_eq!(be_u32(&mvhd[12..]), TIMESCALE);
        assert_eq!(be_u32(&mvhd[16..]), 60 * 3600);
        let stbl = find(&file, &[b"moov", b"trak", b"mdia", b"minf", b"stbl"]);
        assert_eq!(
            &find(stbl, &[b"stts"])[4..],
            [0, 0, 0, 1, 0, 0, 0, 60, 0, 0, 0x0E, 0x10]
        );
        assert!(boxes(stbl).iter().all(|(kind, _)| kind != b"ctts"));
        let stss = find(stbl, &[b"stss"]);
        assert_eq!(
            stss[4..].chunks(4).map(be_u32).collect::<Vec<_>>(),
            [3, 1, 26, 51]
        );
    }

    #[test]
    fn sample_tables_run_length_encode() {
        let sample = |duration, composition_offset, is_sync| Sample {
            data: Bytes::from_static(&[0; 10]),
            duration,
            composition_offset,
            is_sync,
        };
        let samples = [
            sample(3000, 0, true),
            sample(3000, 6000, false),
            sample(3600, 0, false),
            sample(3600, 0, true),
            sample(3600, 3000, false),
            sample(3600, 0, true),
        ];
        let t = SampleTables::new(&samples);
        assert_eq!(t.stts, [(2, 3000), (4, 3600)]);
        assert_eq!(t.ctts, [(1, 0), (1, 6000), (2, 0), (1, 3000), (1, 0)]);
        assert_eq!(t.stss, [1, 4, 6]);
        assert_eq!(t.stsc, [(1, 3), (2, 2), (3, 1)]);
        assert_eq!(t.chunk_offsets, [0, 30, 50]);
        assert_eq!((t.duration, t.payload_len, t.first_pts), (20400, 60, 0));
        assert_eq!(mdat_header_len(u64::from(u32::MAX) - 8), 8);
        assert_eq!(mdat_header_len(u64::from(u32::MAX)), 16);
    }

    #[test]
    fn no_samples_still_gives_well_formed_boxes() {
        let track = VideoTrack {
            width: 2,
            height: 2,
            timescale: TIMESCALE,
            avcc: vec![1, 0x42, 0, 0x1E, 0xFF, 0xE0, 0],
        };
        let segment = media_segment(7, 42, &[]);
        assert_eq!(kinds(&segment), [*b"moof", *b"mdat"]);
        check_tree(&segment);
        let file = progressive_mp4(&track, &[]);
        assert_eq!(kinds(&file), [*b"ftyp", *b"moov", *b"mdat"]);
        check_tree(&file);
    }
}
