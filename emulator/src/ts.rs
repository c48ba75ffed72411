//! MPEG-2 transport stream writer for `ContainerFormat=MPEG_TS` HLS sessions: one fragment as
//! one self-contained TS segment (ISO/IEC 13818-1).
//!
//! ```text
//! PAT (PID 0) → PMT (PID 0x1000) → video PES (PID 0x100, stream_id 0xE0), one access unit each:
//!   PTS and DTS in 90 kHz (33 bits), PCR (= DTS) in the first packet of every PES,
//!   random_access_indicator on key frames; the access unit in Annex B, the parameter sets
//!   (SPS/PPS, or VPS/SPS/PPS) before each key frame.
//! ```
//!
//! Timestamps are the fragment's decode times on the session's timeline, moved to 90 kHz, so
//! they are continuous across fragments like the fMP4 `tfdt` (KVS does not document its TS
//! timestamps). Video only: a stream's AAC track is not in its TS segments.

use crate::VideoCodec;
use crate::mp4::{Sample, VideoTrack};

const PACKET: usize = 188;
const PAT_PID: u16 = 0;
const PMT_PID: u16 = 0x1000;
const VIDEO_PID: u16 = 0x100;
/// 2^33: PTS, DTS and PCR bases wrap here.
const WRAP: u64 = 1 << 33;

/// CRC-32/MPEG-2 (polynomial 0x04C11DB7, not reflected, initial all ones, no final xor).
fn crc32_mpeg2(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b) << 24;
        for _ in 0..8 {
            crc = if crc & 0x8000_0000 != 0 {
                (crc << 1) ^ 0x04C1_1DB7
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The parameter sets of a decoder configuration record, each as an Annex B NAL unit, and the
/// record's NAL length size.
fn parameter_sets(track: &VideoTrack) -> (Vec<u8>, usize) {
    let c = &track.config;
    let mut out = Vec::new();
    let mut put = |nal: &[u8]| {
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
    };
    let read_u16 = |at: usize| -> Option<usize> {
        Some(usize::from(u16::from_be_bytes([
            *c.get(at)?,
            *c.get(at + 1)?,
        ])))
    };
    match track.codec {
        VideoCodec::H264 => {
            // avcC: version, profile, compat, level, 6 bits + lengthSizeMinusOne, 3 bits + numSPS.
            let length_size = c.get(4).map_or(4, |b| usize::from(b & 3) + 1);
            let mut at = 5;
            for kind in 0..2 {
                let Some(&count) = c.get(at) else { break };
                let count = if kind == 0 { count & 0x1f } else { count };
                at += 1;
                for _ in 0..count {
                    let Some(len) = read_u16(at) else { break };
                    if let Some(nal) = c.get(at + 2..at + 2 + len) {
                        put(nal);
                    }
                    at += 2 + len;
                }
            }
            (out, length_size)
        }
        VideoCodec::H265 => {
            // hvcC: 21 bytes of fields, lengthSizeMinusOne in byte 21, then the arrays.
            let length_size = c.get(21).map_or(4, |b| usize::from(b & 3) + 1);
            let arrays = c.get(22).copied().unwrap_or(0);
            let mut at = 23;
            for _ in 0..arrays {
                let Some(count) = read_u16(at + 1) else { break };
                at += 3;
                for _ in 0..count {
                    let Some(len) = read_u16(at) else { break };
                    if let Some(nal) = c.get(at + 2..at + 2 + len) {
                        put(nal);
                    }
                    at += 2 + len;
                }
            }
            (out, length_size)
        }
    }
}

/// A length-prefixed access unit as Annex B.
fn annex_b(data: &[u8], length_size: usize, out: &mut Vec<u8>) {
    let mut at = 0;
    while at + length_size <= data.len() {
        let len = data[at..at + length_size]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        at += length_size;
        let Some(nal) = data.get(at..at + len) else {
            break;
        };
        out.extend_from_slice(&[0, 0, 0, 1]);
        out.extend_from_slice(nal);
        at += len;
    }
}

/// A PTS or DTS field: 4-bit prefix, 33 bits with marker bits.
fn timestamp(prefix: u8, t: u64) -> [u8; 5] {
    let t = t % WRAP;
    [
        (prefix << 4) | (((t >> 30) as u8 & 0x07) << 1) | 1,
        (t >> 22) as u8,
        (((t >> 15) as u8 & 0x7f) << 1) | 1,
        (t >> 7) as u8,
        ((t as u8 & 0x7f) << 1) | 1,
    ]
}

struct Muxer {
    out: Vec<u8>,
    counters: [u8; 3],
}

impl Muxer {
    fn counter(&mut self, pid: u16) -> u8 {
        let i = match pid {
            PAT_PID => 0,
            PMT_PID => 1,
            _ => 2,
        };
        let c = self.counters[i];
        self.counters[i] = (c + 1) & 0x0f;
        c
    }

    /// Writes `payload` as packets of `pid`: the first with the unit-start flag and, when
    /// given, a PCR (and the random-access flag); the last padded with adaptation-field
    /// stuffing.
    fn packets(&mut self, pid: u16, payload: &[u8], pcr: Option<u64>, random_access: bool) {
        let mut rest = payload;
        let mut first = true;
        loop {
            let mut af: Vec<u8> = Vec::new();
            if first && (pcr.is_some() || random_access) {
                let mut flags = 0u8;
                if random_access {
                    flags |= 0x40;
                }
                af.push(flags);
                if let Some(pcr) = pcr {
                    af[0] |= 0x10;
                    let base = pcr % WRAP;
                    af.extend_from_slice(&[
                        (base >> 25) as u8,
                        (base >> 17) as u8,
                        (base >> 9) as u8,
                        (base >> 1) as u8,
                        (((base & 1) as u8) << 7) | 0x7e,
                        0,
                    ]);
                }
            }
            // Room for payload after the header and the adaptation field (its length byte too).
            let af_total = if af.is_empty() { 0 } else { 1 + af.len() };
            let room = PACKET - 4 - af_total;
            if rest.len() < room {
                // Stuffing: grow (or create) the adaptation field to fill the packet.
                let missing = room - rest.len();
                if af.is_empty() {
                    // An adaptation field of `missing` bytes: its length byte, then flags and
                    // stuffing.
                    if missing >= 2 {
                        af.push(0);
                        af.extend(std::iter::repeat_n(0xFF, missing - 2));
                    }
                    // missing == 1: a zero-length adaptation field (only its length byte).
                } else {
                    af.extend(std::iter::repeat_n(0xFF, missing));
                }
            }
            let has_af = !af.is_empty() || rest.len() < room;
            let counter = self.counter(pid);
            self.out.push(0x47);
            self.out
                .push((if first { 0x40 } else { 0 }) | ((pid >> 8) as u8 & 0x1f));
            self.out.push(pid as u8);
            self.out.push(if has_af { 0x30 } else { 0x10 } | counter);
            if has_af {
                self.out.push(af.len() as u8);
                self.out.extend_from_slice(&af);
            }
            let space = PACKET - (self.out.len() % PACKET);
            let take = rest.len().min(if space == PACKET { 0 } else { space });
            self.out.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            first = false;
            if rest.is_empty() {
                break;
            }
        }
    }

    fn section(&mut self, pid: u16, section: &[u8]) {
        let mut payload = vec![0u8]; // pointer_field
        payload.extend_from_slice(section);
        payload.extend_from_slice(&crc32_mpeg2(section).to_be_bytes());
        // PSI packets are padded with 0xFF after the section, not with adaptation stuffing.
        payload.resize(PACKET - 4, 0xFF);
        self.packets(pid, &payload, None, false);
    }
}

/// One fragment as a TS segment. `decode_time` is the first sample's decode time in the
/// track's timescale (on the session's timeline).
pub(crate) fn media_segment_ts(
    track: &VideoTrack,
    decode_time: u64,
    samples: &[Sample],
) -> Vec<u8> {
    let scale = u128::from(track.timescale.max(1));
    let to_90k = |ticks: i128| -> u64 {
        let t = ticks.max(0) as u128 * 90_000 / scale;
        u64::try_from(t % u128::from(WRAP)).unwrap_or(0)
    };
    let payload_len: usize = samples.iter().map(|s| s.data.len() + 64).sum();
    let mut m = Muxer {
        out: Vec::with_capacity(payload_len * 190 / 184 + 4 * PACKET),
        counters: [0; 3],
    };
    // PAT: program 1 → PMT.
    let mut pat = vec![0x00, 0xB0, 13, 0x00, 0x01, 0xC1, 0x00, 0x00, 0x00, 0x01];
    pat.push(0xE0 | (PMT_PID >> 8) as u8);
    pat.push(PMT_PID as u8);
    m.section(PAT_PID, &pat);
    // PMT: the video stream, which also carries the PCR.
    let stream_type = match track.codec {
        VideoCodec::H264 => 0x1B,
        VideoCodec::H265 => 0x24,
    };
    let mut pmt = vec![0x02, 0xB0, 18, 0x00, 0x01, 0xC1, 0x00, 0x00];
    pmt.extend_from_slice(&[0xE0 | (VIDEO_PID >> 8) as u8, VIDEO_PID as u8, 0xF0, 0x00]);
    pmt.extend_from_slice(&[
        stream_type,
        0xE0 | (VIDEO_PID >> 8) as u8,
        VIDEO_PID as u8,
        0xF0,
        0x00,
    ]);
    m.section(PMT_PID, &pmt);
    let (sets, length_size) = parameter_sets(track);
    let mut dts_ticks = i128::from(decode_time);
    for s in samples {
        let dts = to_90k(dts_ticks);
        let pts = to_90k(dts_ticks + i128::from(s.composition_offset));
        let mut es = Vec::with_capacity(s.data.len() + sets.len() + 32);
        if s.is_sync {
            es.extend_from_slice(&sets);
        }
        annex_b(&s.data, length_size, &mut es);
        let mut pes = vec![0x00, 0x00, 0x01, 0xE0, 0x00, 0x00, 0x84];
        if pts == dts {
            pes.extend_from_slice(&[0x80, 5]);
            pes.extend_from_slice(&timestamp(0b0010, pts));
        } else {
            pes.extend_from_slice(&[0xC0, 10]);
            pes.extend_from_slice(&timestamp(0b0011, pts));
            pes.extend_from_slice(&timestamp(0b0001, dts));
        }
        pes.extend_from_slice(&es);
        m.packets(VIDEO_PID, &pes, Some(dts), s.is_sync);
        dts_ticks += i128::from(s.duration);
    }
    m.out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_is_mpeg2() {
        // The CRC of "123456789" for CRC-32/MPEG-2.
        assert_eq!(crc32_mpeg2(b"123456789"), 0x0376_E6E7);
    }

    #[test]
    fn timestamps_carry_33_bits_with_markers() {
        let t = (1u64 << 32) | 0x1234_5678;
        let b = timestamp(0b0010, t);
        let back = (u64::from(b[0] >> 1) & 7) << 30
            | u64::from(b[1]) << 22
            | u64::from(b[2] >> 1) << 15
            | u64::from(b[3]) << 7
            | u64::from(b[4] >> 1);
        assert_eq!(back, t);
        assert_eq!(b[0] & 1, 1);
        assert_eq!(b[2] & 1, 1);
        assert_eq!(b[4] & 1, 1);
    }

    #[test]
    fn every_packet_is_188_bytes_with_a_sync_byte_and_counters_per_pid() {
        let track = VideoTrack {
            codec: VideoCodec::H264,
            width: 320,
            height: 240,
            timescale: 90_000,
            config: vec![
                1, 0x42, 0, 0x1e, 0xff, 0xe1, 0, 2, 0x67, 1, 1, 0, 2, 0x68, 2,
            ],
        };
        // Sizes around the packet payload boundaries.
        let samples: Vec<Sample> = [1usize, 150, 170, 171, 172, 183, 184, 185, 400, 5000]
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let mut data = (n as u32).to_be_bytes().to_vec();
                data.extend(std::iter::repeat_n(0x41, n));
                Sample {
                    data: bytes::Bytes::from(data),
                    duration: 3600,
                    composition_offset: 0,
                    is_sync: i == 0,
                }
            })
            .collect();
        let ts = media_segment_ts(&track, 90_000, &samples);
        assert_eq!(ts.len() % PACKET, 0);
        let mut last: std::collections::HashMap<u16, u8> = Default::default();
        for p in ts.chunks(PACKET) {
            assert_eq!(p[0], 0x47);
            let pid = (u16::from(p[1] & 0x1f) << 8) | u16::from(p[2]);
            let cc = p[3] & 0x0f;
            if let Some(prev) = last.insert(pid, cc) {
                assert_eq!(cc, (prev + 1) & 0x0f, "continuity of PID {pid:#x}");
            }
            if p[3] & 0x20 != 0 {
                assert!(usize::from(p[4]) <= PACKET - 5, "adaptation field length");
            }
        }
    }
}
