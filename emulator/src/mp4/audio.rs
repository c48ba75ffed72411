//! The AAC audio track (track 2) of a stream whose producer sends audio, as KVS serves it in
//! fMP4: `trak` with `smhd` and an `mp4a` sample entry whose `esds` carries the
//! AudioSpecificConfig (ISO/IEC 14496-12 §12.2, 14496-14 §5.6, 14496-1 §7.2.6), and one more
//! `traf` per media segment.

use bytes::{BufMut, Bytes};

use super::SampleTables;
use super::boxes::{saturating_u32, write_box, write_full_box, write_sample_tables};

/// The audio track of a progressive MP4 (GetClip): its sample tables, where its samples start
/// in the file, and how long after the video it starts.
pub(crate) struct ProgressiveAudio<'a> {
    /// Sample tables (chunk offsets relative to the first audio byte).
    pub tables: &'a SampleTables,
    /// File offset of the first audio byte.
    pub base: u64,
    /// `co64` instead of `stco`.
    pub co64: bool,
    /// Its first frame's time after the video's first, in audio ticks (an empty edit).
    pub delay: u64,
}

impl ProgressiveAudio<'_> {
    /// The track's duration in the movie timescale (the delay included).
    pub(super) fn movie_duration(&self, audio: &AudioTrack, movie_timescale: u32) -> u64 {
        let ticks = u128::from(self.delay + self.tables.duration);
        u64::try_from(ticks * u128::from(movie_timescale) / u128::from(audio.sample_rate.max(1)))
            .unwrap_or(u64::MAX)
    }
}

/// Track id of the audio track (KVS: track 2).
pub(crate) const AUDIO_TRACK_ID: u32 = 2;

/// An AAC track.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AudioTrack {
    /// Samples per second, also the track's timescale.
    pub sample_rate: u32,
    /// Channels.
    pub channels: u16,
    /// AudioSpecificConfig (GStreamer's `codec_data` of `audio/mpeg,mpegversion=4,
    /// stream-format=raw`).
    pub config: Vec<u8>,
}

/// One AAC access unit (1024 samples).
#[derive(Clone, Debug)]
pub(crate) struct AudioSample {
    /// The raw AAC frame.
    pub data: Bytes,
    /// Duration in the track timescale (1024).
    pub duration: u32,
}

/// Writes the audio `trak`: of an init segment (empty sample tables: samples come in movie
/// fragments), or with `progressive` its sample tables and an edit list that starts it
/// `delay` after the video.
pub(super) fn write_audio_trak(
    out: &mut Vec<u8>,
    audio: &AudioTrack,
    progressive: Option<&ProgressiveAudio<'_>>,
    movie_timescale: u32,
) {
    let movie_duration = progressive.map_or(0, |p| p.movie_duration(audio, movie_timescale));
    let media_duration = progressive.map_or(0, |p| p.tables.duration);
    write_box(out, b"trak", |o| {
        // tkhd, flags track_enabled | track_in_movie; volume 1.0; no width/height.
        write_full_box(o, b"tkhd", 0, 0x3, |o| {
            o.put_u32(0); // creation_time
            o.put_u32(0); // modification_time
            o.put_u32(AUDIO_TRACK_ID);
            o.put_u32(0); // reserved
            o.put_u32(saturating_u32(movie_duration as usize)); // duration
            o.put_bytes(0, 2 * 4); // reserved
            o.put_u16(0); // layer
            o.put_u16(1); // alternate_group
            o.put_u16(0x0100); // volume
            o.put_u16(0); // reserved
            for m in [0x0001_0000u32, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000] {
                o.put_u32(m);
            }
            o.put_u32(0); // width
            o.put_u32(0); // height
        });
        if let Some(p) = progressive
            && p.delay > 0
        {
            // An empty edit for the delay, then the whole media (§8.6.6).
            let delay = u64::try_from(
                u128::from(p.delay) * u128::from(movie_timescale)
                    / u128::from(audio.sample_rate.max(1)),
            )
            .unwrap_or(0);
            write_box(o, b"edts", |o| {
                write_full_box(o, b"elst", 0, 0, |o| {
                    o.put_u32(2);
                    o.put_u32(saturating_u32(delay as usize));
                    o.put_i32(-1);
                    o.put_u16(1);
                    o.put_u16(0);
                    o.put_u32(saturating_u32(movie_duration.saturating_sub(delay) as usize));
                    o.put_i32(0);
                    o.put_u16(1);
                    o.put_u16(0);
                });
            });
        }
        write_box(o, b"mdia", |o| {
            write_full_box(o, b"mdhd", 0, 0, |o| {
                o.put_u32(0);
                o.put_u32(0);
                o.put_u32(audio.sample_rate);
                o.put_u32(saturating_u32(media_duration as usize)); // duration
                o.put_u16(0x55C4); // "und"
                o.put_u16(0);
            });
            write_full_box(o, b"hdlr", 0, 0, |o| {
                o.put_u32(0);
                o.put_slice(b"soun");
                o.put_bytes(0, 3 * 4);
                o.put_slice(b"SoundHandler\0");
            });
            write_box(o, b"minf", |o| {
                write_full_box(o, b"smhd", 0, 0, |o| o.put_u32(0)); // balance, reserved
                write_box(o, b"dinf", |o| {
                    write_full_box(o, b"dref", 0, 0, |o| {
                        o.put_u32(1);
                        write_full_box(o, b"url ", 0, 1, |_| {});
                    });
                });
                write_box(o, b"stbl", |o| {
                    write_full_box(o, b"stsd", 0, 0, |o| {
                        o.put_u32(1);
                        write_mp4a(o, audio);
                    });
                    match progressive {
                        Some(p) => write_sample_tables(o, p.tables, p.base, p.co64),
                        None => {
                            write_full_box(o, b"stts", 0, 0, |o| o.put_u32(0));
                            write_full_box(o, b"stsc", 0, 0, |o| o.put_u32(0));
                            write_full_box(o, b"stsz", 0, 0, |o| {
                                o.put_u32(0);
                                o.put_u32(0);
                            });
                            write_full_box(o, b"stco", 0, 0, |o| o.put_u32(0));
                        }
                    }
                });
            });
        });
    });
}

/// `mp4a` (§12.2.3) with `esds`.
fn write_mp4a(out: &mut Vec<u8>, audio: &AudioTrack) {
    write_box(out, b"mp4a", |o| {
        o.put_bytes(0, 6); // reserved
        o.put_u16(1); // data_reference_index
        o.put_bytes(0, 8); // reserved
        o.put_u16(audio.channels);
        o.put_u16(16); // samplesize
        o.put_u16(0); // pre_defined
        o.put_u16(0); // reserved
        o.put_u32(audio.sample_rate.min(0xFFFF) << 16); // 16.16
        write_full_box(o, b"esds", 0, 0, |o| write_es_descriptor(o, &audio.config));
    });
}

/// An MPEG-4 descriptor: tag, a 4-byte length (0x80 continuation form), body.
fn descriptor(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    let len = saturating_u32(body.len()).min(0x0FFF_FFFF);
    out.put_u8(tag);
    out.put_u8(0x80 | ((len >> 21) & 0x7F) as u8);
    out.put_u8(0x80 | ((len >> 14) & 0x7F) as u8);
    out.put_u8(0x80 | ((len >> 7) & 0x7F) as u8);
    out.put_u8((len & 0x7F) as u8);
    out.put_slice(body);
}

/// ES_Descriptor { DecoderConfigDescriptor { AAC, audio stream, DecoderSpecificInfo(ASC) },
/// SLConfigDescriptor(predefined 2) }.
fn write_es_descriptor(out: &mut Vec<u8>, asc: &[u8]) {
    let mut specific = Vec::new();
    descriptor(&mut specific, 0x05, asc);
    let mut config = vec![
        0x40, // objectTypeIndication: MPEG-4 audio
        0x15, // streamType 5 (audio) << 2 | upStream 0 | reserved 1
        0, 0, 0, // bufferSizeDB
    ];
    config.extend_from_slice(&0u32.to_be_bytes()); // maxBitrate
    config.extend_from_slice(&0u32.to_be_bytes()); // avgBitrate
    config.extend_from_slice(&specific);
    let mut es = vec![0, AUDIO_TRACK_ID as u8, 0]; // ES_ID, flags
    descriptor(&mut es, 0x04, &config);
    descriptor(&mut es, 0x06, &[0x02]);
    descriptor(out, 0x03, &es);
}
