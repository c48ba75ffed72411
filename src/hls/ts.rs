//! MPEG-TS HLS segments (`ContainerFormat=MPEG_TS`): the video access units of one segment,
//! with their presentation times, for the decoder's elementary head.
//!
//! The TS packets, PAT/PMT and PES headers are read by the `mpeg2ts` crate; this module picks
//! the PMT's H.264 (stream type 0x1B) or H.265 (0x24) stream, joins its PES payloads (one
//! access unit per PES, as HLS segmenters write), and unwraps the 33-bit, 90 kHz PTS relative
//! to the segment's first presented frame. The decoder is then given presentation times on the
//! source's timeline directly: `tsdemux`'s own timestamp handling (PCR-based discontinuity
//! smoothing) would move frames across the gaps that carry the producer time.

use bytes::Bytes;
use mpeg2ts::es::StreamType;
use mpeg2ts::ts::{ReadTsPacket, TsPacketReader, TsPayload};

use crate::error::{Error, ErrorKind, Result};

/// 2^33: PTS wraps here.
const WRAP: u64 = 1 << 33;

/// The video codec of a TS segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TsCodec {
    H264,
    H265,
}

/// One access unit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TsUnit {
    /// Presentation time after the segment's earliest one, in 90 kHz ticks.
    pub offset: u64,
    /// Annex B bytes.
    pub data: Bytes,
    /// An IDR (H.264) or IRAP (H.265) picture.
    pub key: bool,
}

/// The video of one segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct TsVideo {
    pub codec: TsCodec,
    /// In decode order.
    pub units: Vec<TsUnit>,
}

fn protocol(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol, message)
}

/// Whether an Annex B access unit holds a key picture.
fn is_key(codec: TsCodec, data: &[u8]) -> bool {
    let mut i = 0;
    while i + 3 < data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            let header = data[i + 3];
            let key = match codec {
                TsCodec::H264 => header & 0x1f == 5,
                TsCodec::H265 => (16..=21).contains(&((header >> 1) & 0x3f)),
            };
            if key {
                return true;
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    false
}

/// The video access units of a TS segment. Errors name what is wrong (no PMT, no H.264/H.265
/// stream, a PES without PTS, broken packets).
pub(crate) fn demux(data: &[u8]) -> Result<TsVideo> {
    if data.is_empty() || !data.len().is_multiple_of(188) || data.first() != Some(&0x47) {
        return Err(protocol(format!(
            "an MPEG-TS segment of {} bytes is not a whole number of 188-byte packets starting with 0x47",
            data.len()
        )));
    }
    let mut reader = TsPacketReader::new(data);
    let mut video: Option<(u16, TsCodec)> = None;
    // (PTS, payload) per PES of the video PID.
    let mut pes: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut packets = 0usize;
    loop {
        let packet = match reader.read_ts_packet() {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => {
                return Err(protocol(format!(
                    "MPEG-TS packet {packets} is not valid: {e}"
                )));
            }
        };
        packets += 1;
        let pid = packet.header.pid.as_u16();
        match packet.payload {
            Some(TsPayload::Pmt(pmt)) if video.is_none() => {
                video = pmt.es_info.iter().find_map(|es| {
                    let codec = match es.stream_type {
                        StreamType::H264 => TsCodec::H264,
                        StreamType::H265 => TsCodec::H265,
                        _ => return None,
                    };
                    Some((es.elementary_pid.as_u16(), codec))
                });
                if video.is_none() {
                    let types: Vec<String> = pmt
                        .es_info
                        .iter()
                        .map(|es| format!("{:?}", es.stream_type))
                        .collect();
                    return Err(Error::new(
                        ErrorKind::UnsupportedMedia,
                        format!(
                            "the MPEG-TS segment has no H.264 or H.265 stream (streams: {})",
                            types.join(", ")
                        ),
                    ));
                }
            }
            Some(TsPayload::PesStart(start)) if video.is_some_and(|(p, _)| p == pid) => {
                let pts = start
                    .header
                    .pts
                    .ok_or_else(|| protocol("an MPEG-TS video PES without PTS"))?
                    .as_u64();
                pes.push((pts, start.data.to_vec()));
            }
            Some(TsPayload::PesContinuation(bytes)) if video.is_some_and(|(p, _)| p == pid) => {
                if let Some((_, data)) = pes.last_mut() {
                    data.extend_from_slice(&bytes);
                }
            }
            _ => {}
        }
    }
    let Some((_, codec)) = video else {
        return Err(protocol("the MPEG-TS segment has no PMT"));
    };
    if pes.is_empty() {
        return Err(protocol("the MPEG-TS segment has no video PES"));
    }
    // Presentation times relative to the earliest, across a possible 33-bit wrap: measured from
    // the first PES (within ±2^32 of it).
    let first = pes[0].0;
    let signed: Vec<i64> = pes
        .iter()
        .map(|(pts, _)| {
            let d = (pts + WRAP - first) % WRAP;
            if d >= WRAP / 2 {
                d as i64 - WRAP as i64
            } else {
                d as i64
            }
        })
        .collect();
    let min = signed.iter().copied().min().unwrap_or(0);
    let units = pes
        .into_iter()
        .zip(signed)
        .map(|((_, data), s)| TsUnit {
            offset: u64::try_from(s - min).unwrap_or(0),
            key: is_key(codec, &data),
            data: Bytes::from(data),
        })
        .collect();
    Ok(TsVideo { codec, units })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny segment: PAT, PMT (H.264 on PID 0x100), two PES (PTS 900 000 and 903 600).
    fn segment(pts: [u64; 2]) -> Vec<u8> {
        use mpeg2ts::es::StreamId;
        use mpeg2ts::pes::PesHeader;
        use mpeg2ts::time::Timestamp;
        use mpeg2ts::ts::payload::{Bytes as TsBytes, Pat, Pes, Pmt};
        use mpeg2ts::ts::{
            ContinuityCounter, EsInfo, Pid, ProgramAssociation, TransportScramblingControl,
            TsHeader, TsPacket, TsPacketWriter, VersionNumber, WriteTsPacket,
        };
        let header = |pid: u16, cc: u8| TsHeader {
            transport_error_indicator: false,
            transport_priority: false,
            pid: Pid::new(pid).unwrap(),
            transport_scrambling_control: TransportScramblingControl::NotScrambled,
            continuity_counter: ContinuityCounter::from_u8(cc).unwrap(),
        };
        let mut out = Vec::new();
        let mut w = TsPacketWriter::new(&mut out);
        w.write_ts_packet(&TsPacket {
            header: header(0, 0),
            adaptation_field: None,
            payload: Some(TsPayload::Pat(Pat {
                transport_stream_id: 1,
                version_number: VersionNumber::default(),
                table: vec![ProgramAssociation {
                    program_num: 1,
                    program_map_pid: Pid::new(0x1000).unwrap(),
                }],
            })),
        })
        .unwrap();
        w.write_ts_packet(&TsPacket {
            header: header(0x1000, 0),
            adaptation_field: None,
            payload: Some(TsPayload::Pmt(Pmt {
                program_num: 1,
                pcr_pid: Some(Pid::new(0x100).unwrap()),
                version_number: VersionNumber::default(),
                program_info: vec![],
                es_info: vec![EsInfo {
                    stream_type: StreamType::H264,
                    elementary_pid: Pid::new(0x100).unwrap(),
                    descriptors: vec![],
                }],
            })),
        })
        .unwrap();
        for (i, (pts, nal)) in pts.iter().zip([5u8, 1]).enumerate() {
            let data = [0, 0, 0, 1, 0x60 | nal, 0xAA, 0xBB];
            w.write_ts_packet(&TsPacket {
                header: header(0x100, i as u8),
                adaptation_field: None,
                payload: Some(TsPayload::PesStart(Pes {
                    header: PesHeader {
                        stream_id: StreamId::new(0xE0),
                        priority: false,
                        data_alignment_indicator: true,
                        copyright: false,
                        original_or_copy: false,
                        pts: Some(Timestamp::new(*pts).unwrap()),
                        dts: None,
                        escr: None,
                    },
                    pes_packet_len: 0,
                    data: TsBytes::new(&data).unwrap(),
                })),
            })
            .unwrap();
        }
        out
    }

    #[test]
    fn units_carry_offsets_from_the_earliest_and_key_flags() {
        let v = demux(&segment([900_000, 903_600])).unwrap();
        assert_eq!(v.codec, TsCodec::H264);
        assert_eq!(v.units.len(), 2);
        assert_eq!((v.units[0].offset, v.units[0].key), (0, true));
        assert_eq!((v.units[1].offset, v.units[1].key), (3600, false));
        assert_eq!(&v.units[1].data[..], &[0, 0, 0, 1, 0x61, 0xAA, 0xBB]);
    }

    #[test]
    fn a_wrap_of_the_33_bit_clock_keeps_offsets_small() {
        let v = demux(&segment([WRAP - 1800, 1800])).unwrap();
        assert_eq!(v.units[1].offset, 3600);
    }

    #[test]
    fn bad_segments_are_typed_errors() {
        assert_eq!(demux(&[]).unwrap_err().kind(), ErrorKind::Protocol);
        assert_eq!(demux(&[0x47; 100]).unwrap_err().kind(), ErrorKind::Protocol);
        let mut seg = segment([0, 3600]);
        // Only the PAT: no PMT.
        seg.truncate(188);
        assert_eq!(demux(&seg).unwrap_err().kind(), ErrorKind::Protocol);
    }

    proptest::proptest! {
        /// Mutated segments: an error or units, never a panic.
        #[test]
        fn mutated_segments_never_panic(at in 0usize..752, value in proptest::num::u8::ANY) {
            let mut seg = segment([900_000, 903_600]);
            if let Some(b) = seg.get_mut(at) {
                *b = value;
            }
            let _ = demux(&seg);
        }

        /// Random packets after a valid start: never a panic.
        #[test]
        fn random_packets_never_panic(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..(188 * 4))) {
            let mut seg = segment([0, 3600]);
            let mut tail = tail;
            tail.truncate(tail.len() / 188 * 188);
            for p in tail.chunks_mut(188) {
                p[0] = 0x47;
            }
            seg.extend(tail);
            let _ = demux(&seg);
        }
    }
}
