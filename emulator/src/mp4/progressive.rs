//! The non-fragmented MP4 of GetClip (moov before mdat) and its sample tables.

use super::audio::{AudioSample, AudioTrack, ProgressiveAudio};
use super::boxes::{mdat_header_len, saturating_u32, write_ftyp, write_mdat, write_moov};
use super::{Layout, Sample, VideoTrack};

/// An audio track for [`progressive_mp4_with_audio`]: its frames and how long after the first
/// video frame the first of them starts (audio ticks).
pub(crate) struct ClipAudio<'a> {
    pub track: &'a AudioTrack,
    pub samples: &'a [AudioSample],
    pub delay: u64,
}

/// A complete, playable, non-fragmented MP4 with moov before mdat (fast start):
/// ftyp + moov (full sample tables: stts run-length encoded, ctts only when any offset ≠ 0
/// (version 1, signed), stss, stsz, stsc, stco — or co64 when offsets exceed u32) + mdat
/// (64-bit size when needed).
///
/// Each group of pictures (a sync sample and the samples up to the next one) is one chunk.
/// When the first presentation time is after 0 (B-frames), an edit list starts the
/// presentation at the first composed picture, as other muxers do.
#[cfg(test)]
pub(crate) fn progressive_mp4(track: &VideoTrack, samples: &[Sample]) -> Vec<u8> {
    progressive_mp4_with_stco_limit(track, samples, None, u64::from(u32::MAX))
}

/// [`progressive_mp4`] with an AAC track 2 after the video in `mdat` (one chunk per frame),
/// started by an edit list `delay` after the video, as KVS's clips keep track 2.
pub(crate) fn progressive_mp4_with_audio(
    track: &VideoTrack,
    samples: &[Sample],
    audio: Option<&ClipAudio<'_>>,
) -> Vec<u8> {
    progressive_mp4_with_stco_limit(track, samples, audio, u64::from(u32::MAX))
}

/// [`progressive_mp4`], switching from `stco` to `co64` when a chunk offset exceeds
/// `stco_limit` (tests lower it to exercise `co64` without gigabytes of media).
pub(super) fn progressive_mp4_with_stco_limit(
    track: &VideoTrack,
    samples: &[Sample],
    audio: Option<&ClipAudio<'_>>,
    stco_limit: u64,
) -> Vec<u8> {
    let tables = SampleTables::new(samples);
    // The audio frames as samples (each a sync sample, its own chunk), after the video.
    let audio_samples: Vec<Sample> = audio.map_or_else(Vec::new, |a| {
        a.samples
            .iter()
            .map(|s| Sample {
                data: s.data.clone(),
                duration: s.duration,
                composition_offset: 0,
                is_sync: true,
            })
            .collect()
    });
    let audio_tables = audio.map(|_| SampleTables::new(&audio_samples));
    let payload_len = tables.payload_len + audio_tables.as_ref().map_or(0, |t| t.payload_len);
    let mdat_header = mdat_header_len(payload_len);
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
        let progressive_audio = audio_tables
            .as_ref()
            .zip(audio)
            .map(|(t, a)| ProgressiveAudio {
                tables: t,
                base: base + tables.payload_len,
                co64,
                delay: a.delay,
            });
        write_moov(
            &mut moov,
            track,
            audio.map(|a| a.track),
            &layout,
            progressive_audio.as_ref(),
        );
        moov
    };
    let payload_start = |moov_len: usize| (ftyp_len + moov_len + mdat_header) as u64;
    let last_chunk = match &audio_tables {
        Some(t) => tables.payload_len + t.chunk_offsets.last().copied().unwrap_or(0),
        None => tables.chunk_offsets.last().copied().unwrap_or(0),
    };
    let mut co64 = false;
    let mut moov_len = moov(0, false).len();
    if payload_start(moov_len) + last_chunk > stco_limit {
        co64 = true;
        moov_len = moov(0, true).len();
    }
    let moov = moov(payload_start(moov_len), co64);

    out.reserve(moov.len() + mdat_header + payload_len as usize);
    out.extend_from_slice(&moov);
    if audio_samples.is_empty() {
        write_mdat(&mut out, samples, payload_len);
    } else {
        let all: Vec<Sample> = samples.iter().chain(&audio_samples).cloned().collect();
        write_mdat(&mut out, &all, payload_len);
    }
    out
}

/// Sample tables of a progressive file, computed once from the samples in decode order.
pub(super) struct SampleTables {
    /// `stts` runs of (sample_count, sample_delta).
    pub(super) stts: Vec<(u32, u32)>,
    /// `ctts` runs of (sample_count, sample_offset); empty when every offset is 0.
    pub(super) ctts: Vec<(u32, i32)>,
    /// 1-based numbers of the sync samples.
    pub(super) stss: Vec<u32>,
    /// `stsc` runs of (first_chunk, samples_per_chunk); first_chunk is 1-based.
    pub(super) stsc: Vec<(u32, u32)>,
    /// Size of each sample.
    pub(super) sizes: Vec<u32>,
    /// Chunk offsets relative to the first `mdat` payload byte.
    pub(super) chunk_offsets: Vec<u64>,
    /// Sum of sample durations.
    pub(super) duration: u64,
    /// Total bytes of sample data.
    pub(super) payload_len: u64,
    /// Earliest composition time (decode time + composition offset) of any sample.
    pub(super) first_pts: i64,
}

impl SampleTables {
    /// Computes the tables; a chunk starts at the first sample and at every sync sample.
    pub(super) fn new(samples: &[Sample]) -> Self {
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
