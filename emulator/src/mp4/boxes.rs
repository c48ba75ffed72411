//! Writers of the individual boxes (ISO/IEC 14496-12 and -15) shared by both MP4 shapes.

use bytes::BufMut;

use super::{Layout, Sample, SampleTables, TRACK_ID, VideoTrack};

/// `sample_flags` (§8.8.3.1) of a sync sample: `sample_depends_on` = 2 (depends on no other).
const SYNC_SAMPLE_FLAGS: u32 = 0x0200_0000;

/// `sample_flags` of a non-sync sample: `sample_depends_on` = 1 and
/// `sample_is_non_sync_sample` = 1.
const NON_SYNC_SAMPLE_FLAGS: u32 = 0x0101_0000;

/// Unity transformation matrix of `mvhd` and `tkhd` (16.16 and 2.30 fixed point).
const UNITY_MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// Writes a box (§4.2): a size and type header, the body written by `body`, then the size
/// patched in; a box of 4 GiB or more gets a 64-bit `largesize` instead.
pub(super) fn write_box(out: &mut Vec<u8>, kind: &[u8; 4], body: impl FnOnce(&mut Vec<u8>)) {
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
pub(super) fn write_full_box(
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
pub(super) fn write_ftyp(out: &mut Vec<u8>, major: &[u8; 4], compatible: &[&[u8; 4]]) {
    write_box(out, b"ftyp", |o| {
        o.put_slice(major);
        o.put_u32(0);
        for brand in compatible {
            o.put_slice(*brand);
        }
    });
}

/// Writes `moov` (§8.2.1): `mvhd`, the video `trak` and, when fragmented, `mvex`.
pub(super) fn write_moov(
    out: &mut Vec<u8>,
    track: &VideoTrack,
    audio: Option<&super::audio::AudioTrack>,
    layout: &Layout<'_>,
    progressive_audio: Option<&super::audio::ProgressiveAudio<'_>>,
) {
    let duration = match layout {
        Layout::Fragmented => 0,
        Layout::Progressive { tables, .. } => tables.duration,
    };
    let movie_duration = progressive_audio.zip(audio).map_or(duration, |(p, a)| {
        duration.max(p.movie_duration(a, track.timescale))
    });
    write_box(out, b"moov", |o| {
        let next_track = if audio.is_some() { 3 } else { TRACK_ID + 1 };
        write_mvhd(o, track.timescale, movie_duration, next_track);
        write_trak(o, track, duration, layout);
        if let Some(audio) = audio {
            super::audio::write_audio_trak(o, audio, progressive_audio, track.timescale);
        }
        if let Layout::Fragmented = layout {
            write_box(o, b"mvex", |o| {
                // trex (§8.8.3): defaults unused, every trun entry carries its own values.
                let tracks = [Some(TRACK_ID), audio.map(|_| super::audio::AUDIO_TRACK_ID)];
                for id in tracks.into_iter().flatten() {
                    write_full_box(o, b"trex", 0, 0, |o| {
                        o.put_u32(id);
                        o.put_u32(1); // default_sample_description_index
                        o.put_u32(0); // default_sample_duration
                        o.put_u32(0); // default_sample_size
                        o.put_u32(0); // default_sample_flags
                    });
                }
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
pub(super) fn write_mvhd(out: &mut Vec<u8>, timescale: u32, duration: u64, next_track: u32) {
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
        o.put_u32(next_track); // next_track_ID
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

/// Writes `stsd` (§8.5.2) with one `avc1` (ISO/IEC 14496-15 §5.4.2) or `hvc1` (§8.4.1)
/// sample entry: parameter sets in the configuration record only, as KVS's fMP4 has them.
fn write_stsd(out: &mut Vec<u8>, track: &VideoTrack) {
    let (entry, config) = match track.codec {
        crate::VideoCodec::H264 => (b"avc1", b"avcC"),
        crate::VideoCodec::H265 => (b"hvc1", b"hvcC"),
    };
    write_full_box(out, b"stsd", 0, 0, |o| {
        o.put_u32(1); // entry_count
        write_box(o, entry, |o| {
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
            write_box(o, config, |o| o.put_slice(&track.config));
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
pub(super) fn write_sample_tables(out: &mut Vec<u8>, t: &SampleTables, base: u64, co64: bool) {
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
pub(super) fn mdat_header_len(payload_len: u64) -> usize {
    if payload_len + 8 > u64::from(u32::MAX) {
        16
    } else {
        8
    }
}

/// Writes `mdat` (§8.1.1) holding the samples' data back to back.
pub(super) fn write_mdat(out: &mut Vec<u8>, samples: &[Sample], payload_len: u64) {
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
pub(super) fn sample_flags(is_sync: bool) -> u32 {
    if is_sync {
        SYNC_SAMPLE_FLAGS
    } else {
        NON_SYNC_SAMPLE_FLAGS
    }
}

/// A count or size in a 32-bit field. Beyond `u32::MAX` (a 4 GiB access unit, 4 billion
/// samples) the format cannot express it; saturating keeps the writer panic-free.
pub(super) fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}
