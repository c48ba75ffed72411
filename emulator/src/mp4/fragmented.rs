//! Fragmented MP4 as KVS serves it over HLS: the init segment, the media segments, the rewrite
//! of a segment's decode time and the garbled segments of fault injection.

use bytes::BufMut;

use super::audio::AUDIO_TRACK_ID;
use super::boxes::{
    mdat_header_len, sample_flags, saturating_u32, write_box, write_ftyp, write_full_box,
    write_mdat, write_moov,
};
use super::{AudioSample, AudioTrack, Layout, Sample, TRACK_ID, VideoTrack};

/// `tfhd` flag: offsets are relative to the first byte of the enclosing `moof`.
const TFHD_DEFAULT_BASE_IS_MOOF: u32 = 0x02_0000;

/// `trun` flags: data-offset, then per-sample duration, size, flags and composition offset.
const TRUN_FLAGS: u32 = 0x00_0001 | 0x00_0100 | 0x00_0200 | 0x00_0400 | 0x00_0800;

/// Bytes of one `trun` sample entry with [`TRUN_FLAGS`].
pub(super) const TRUN_ENTRY_LEN: usize = 16;

/// ftyp + moov (mvhd, trak{tkhd, mdia{mdhd, hdlr 'vide', minf{vmhd, dinf/dref, stbl{stsd
/// avc1+avcC, empty stts/stsc/stsz/stco}}}}, mvex{trex}).
///
/// Durations are 0: the samples and their timing come in [`media_segment`]s.
pub(crate) fn init_segment(track: &VideoTrack, audio: Option<&AudioTrack>) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024 + track.config.len());
    write_ftyp(
        &mut out,
        b"iso5",
        &[b"iso5", b"iso6", b"mp41", b"avc1", b"dash"],
    );
    write_moov(&mut out, track, audio, &Layout::Fragmented, None);
    out
}

/// moof{mfhd(sequence_number), traf{tfhd (track 1, default-base-is-moof), tfdt version 1
/// (base_media_decode_time), trun (data-offset, per-sample duration, size, flags (sync vs
/// non-sync, depends-on), composition offset)}} + mdat.
///
/// `trun` is version 0 (unsigned offsets) unless some composition offset is negative.
#[cfg(test)]
pub(crate) fn media_segment(
    sequence_number: u32,
    base_media_decode_time: u64,
    samples: &[Sample],
) -> Vec<u8> {
    media_segment_with_audio(sequence_number, base_media_decode_time, samples, None)
}

/// [`media_segment`] with a second `traf` for the audio track (its decode time in audio ticks
/// and its AAC frames): `moof{mfhd, traf video, traf audio}` + `mdat` (video samples, then
/// audio), each `trun`'s data offset pointing at its own run.
pub(crate) fn media_segment_with_audio(
    sequence_number: u32,
    base_media_decode_time: u64,
    samples: &[Sample],
    audio: Option<(u64, &[AudioSample])>,
) -> Vec<u8> {
    let video_len: u64 = samples.iter().map(|s| s.data.len() as u64).sum();
    let audio_len: u64 = audio.map_or(0, |(_, a)| a.iter().map(|s| s.data.len() as u64).sum());
    let payload_len = video_len + audio_len;
    let trun_version = u8::from(samples.iter().any(|s| s.composition_offset < 0));
    let mut out = Vec::with_capacity(192 + TRUN_ENTRY_LEN * samples.len() + payload_len as usize);
    let mut audio_offset_at = None;
    let mut video_offset_at = 0;
    write_box(&mut out, b"moof", |o| {
        write_full_box(o, b"mfhd", 0, 0, |o| o.put_u32(sequence_number));
        write_box(o, b"traf", |o| {
            write_full_box(o, b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, |o| {
                o.put_u32(TRACK_ID)
            });
            write_full_box(o, b"tfdt", 1, 0, |o| o.put_u64(base_media_decode_time));
            write_full_box(o, b"trun", trun_version, TRUN_FLAGS, |o| {
                o.put_u32(saturating_u32(samples.len()));
                video_offset_at = o.len();
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
        if let Some((audio_time, audio_samples)) = audio {
            write_box(o, b"traf", |o| {
                write_full_box(o, b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, |o| {
                    o.put_u32(AUDIO_TRACK_ID)
                });
                write_full_box(o, b"tfdt", 1, 0, |o| o.put_u64(audio_time));
                // data-offset, per-sample duration and size (every AAC frame is a sync sample).
                write_full_box(o, b"trun", 0, 0x00_0001 | 0x00_0100 | 0x00_0200, |o| {
                    o.put_u32(saturating_u32(audio_samples.len()));
                    audio_offset_at = Some(o.len());
                    o.put_i32(0); // data_offset, patched below
                    for s in audio_samples {
                        o.put_u32(s.duration);
                        o.put_u32(saturating_u32(s.data.len()));
                    }
                });
            });
        }
    });
    let moof_len = out.len();
    let video_offset = moof_len + mdat_header_len(payload_len);
    let at = video_offset_at;
    out[at..at + 4].copy_from_slice(
        &i32::try_from(video_offset)
            .unwrap_or(i32::MAX)
            .to_be_bytes(),
    );
    if let Some(at) = audio_offset_at {
        let audio_offset = video_offset as u64 + video_len;
        out[at..at + 4].copy_from_slice(
            &i32::try_from(audio_offset)
                .unwrap_or(i32::MAX)
                .to_be_bytes(),
        );
    }
    write_mdat(&mut out, samples, payload_len);
    if let Some((_, audio_samples)) = audio {
        for s in audio_samples {
            out.put_slice(&s.data);
        }
    }
    out
}

/// The init segment of a separate audio rendition: ftyp + moov (mvhd in audio ticks, the
/// audio `trak` alone, mvex with its `trex`).
pub(crate) fn audio_init_segment(audio: &AudioTrack) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    write_ftyp(&mut out, b"iso5", &[b"iso5", b"iso6", b"mp41", b"dash"]);
    write_box(&mut out, b"moov", |o| {
        super::boxes::write_mvhd(o, audio.sample_rate, 0, AUDIO_TRACK_ID + 1);
        super::audio::write_audio_trak(o, audio, None, audio.sample_rate);
        write_box(o, b"mvex", |o| {
            write_full_box(o, b"trex", 0, 0, |o| {
                o.put_u32(AUDIO_TRACK_ID);
                o.put_u32(1);
                o.put_u32(0);
                o.put_u32(0);
                o.put_u32(0);
            });
        });
    });
    out
}

/// A media segment of a separate audio rendition: moof{mfhd, traf (track 2, tfdt in audio
/// ticks, trun)} + mdat of its AAC frames.
pub(crate) fn audio_media_segment(
    sequence_number: u32,
    decode_time: u64,
    frames: &[AudioSample],
) -> Vec<u8> {
    let payload_len: u64 = frames.iter().map(|s| s.data.len() as u64).sum();
    let mut out = Vec::with_capacity(128 + 8 * frames.len() + payload_len as usize);
    let mut offset_at = 0;
    write_box(&mut out, b"moof", |o| {
        write_full_box(o, b"mfhd", 0, 0, |o| o.put_u32(sequence_number));
        write_box(o, b"traf", |o| {
            write_full_box(o, b"tfhd", 0, TFHD_DEFAULT_BASE_IS_MOOF, |o| {
                o.put_u32(AUDIO_TRACK_ID)
            });
            write_full_box(o, b"tfdt", 1, 0, |o| o.put_u64(decode_time));
            write_full_box(o, b"trun", 0, 0x00_0001 | 0x00_0100 | 0x00_0200, |o| {
                o.put_u32(saturating_u32(frames.len()));
                offset_at = o.len();
                o.put_i32(0);
                for s in frames {
                    o.put_u32(s.duration);
                    o.put_u32(saturating_u32(s.data.len()));
                }
            });
        });
    });
    let offset = out.len() + mdat_header_len(payload_len);
    out[offset_at..offset_at + 4]
        .copy_from_slice(&i32::try_from(offset).unwrap_or(i32::MAX).to_be_bytes());
    if payload_len + 8 > u64::from(u32::MAX) {
        out.put_u32(1);
        out.put_slice(b"mdat");
        out.put_u64(payload_len + 16);
    } else {
        out.put_u32((payload_len + 8) as u32);
        out.put_slice(b"mdat");
    }
    for s in frames {
        out.put_slice(&s.data);
    }
    out
}

/// Where [`media_segment`] puts the 64-bit `tfdt` value: moof header (8) + mfhd (16) + traf
/// header (8) + tfhd (16) + tfdt header and version/flags (12).
pub(super) const TFDT_VALUE_AT: usize = 60;

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

/// Rewrites the `baseMediaDecodeTime` of the audio `traf` (the second) of a segment made by
/// [`media_segment_with_audio`]; false, changing nothing, when there is none.
pub(crate) fn set_audio_decode_time(segment: &mut [u8], decode_time: u64) -> bool {
    // moof header (8) + mfhd (16), then the video traf (its size at its start).
    let Some(video_traf) = segment
        .get(24..28)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return false;
    };
    let audio_traf = 24 + video_traf;
    // traf header (8) + tfhd (16), then tfdt: header (8), version/flags (4), value.
    let tfdt = audio_traf + 8 + 16;
    let ok = segment.get(audio_traf + 4..audio_traf + 8) == Some(b"traf".as_slice())
        && segment.get(tfdt + 4..tfdt + 8) == Some(b"tfdt".as_slice())
        && segment.get(tfdt + 8) == Some(&1);
    match segment.get_mut(tfdt + 12..tfdt + 20) {
        Some(value) if ok => {
            value.copy_from_slice(&decode_time.to_be_bytes());
            true
        }
        _ => false,
    }
}

/// A segment made by [`media_segment`] with its version-1 `tfdt` rewritten as version 0 (a
/// 32-bit decode time, as some muxers write): 4 bytes shorter, with `moof`, `traf` and the
/// `trun` data offset shrunk to match. `None`, for the caller to serve version 1, when the
/// decode time does not fit 32 bits or the bytes are not laid out as [`media_segment`] writes
/// them.
pub(crate) fn tfdt_as_version_0(segment: &[u8]) -> Option<Vec<u8>> {
    let tfdt = TFDT_VALUE_AT - 12;
    if segment.get(tfdt + 4..tfdt + 8)? != b"tfdt" || *segment.get(tfdt + 8)? != 1 {
        return None;
    }
    let value = segment.get(TFDT_VALUE_AT..TFDT_VALUE_AT + 8)?;
    let value = u32::try_from(u64::from_be_bytes(value.try_into().ok()?)).ok()?;
    let mut out = Vec::with_capacity(segment.len().saturating_sub(4));
    out.extend_from_slice(&segment[..tfdt]);
    out.extend_from_slice(&16u32.to_be_bytes());
    out.extend_from_slice(b"tfdt");
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&value.to_be_bytes());
    out.extend_from_slice(&segment[TFDT_VALUE_AT + 8..]);
    // The trun follows the tfdt; its data offset follows version/flags and the sample count.
    let trun = tfdt + 16;
    if out.get(trun + 4..trun + 8)? != b"trun" {
        return None;
    }
    // moof at 0, traf after the moof header (8) and mfhd (16), the trun's data offset.
    for at in [0, 24, trun + 16] {
        let field: &mut [u8] = out.get_mut(at..at + 4)?;
        let shrunk = u32::from_be_bytes((&*field).try_into().ok()?).checked_sub(4)?;
        field.copy_from_slice(&shrunk.to_be_bytes());
    }
    Some(out)
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
