//! Tests of the MP4 writer: box layouts and fields, sample tables, and round trips through
//! GStreamer's demuxer and decoder for both shapes.

use super::boxes::{mdat_header_len, sample_flags};
use super::fragmented::{TFDT_VALUE_AT, TRUN_ENTRY_LEN};
use super::progressive::progressive_mp4_with_stco_limit;

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
            codec: crate::VideoCodec::H264,
            width: s.get::<i32>("width").unwrap() as u32,
            height: s.get::<i32>("height").unwrap() as u32,
            timescale: TIMESCALE,
            config: s
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
    let mut out = vec![init_segment(&enc.track, None)];
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

/// Version-0 `tfdt` segments (what `StreamSpec::tfdt_version_0` serves) decode to the same
/// frames and times; a decode time beyond 32 bits stays version 1.
#[test]
fn version_0_tfdt_segments_decode_every_frame() {
    let enc = zerolatency();
    let mut segments = vec![init_segment(&enc.track, None)];
    let mut decode_time = 0u64;
    for (i, fragment) in enc.samples.chunk_by(|_, b| !b.is_sync).enumerate() {
        let v1 = media_segment(i as u32 + 1, decode_time, fragment);
        let v0 = tfdt_as_version_0(&v1).expect("a 32-bit decode time");
        assert_eq!(v0.len(), v1.len() - 4);
        check_tree(&v0);
        segments.push(v0);
        decode_time += fragment.iter().map(|s| u64::from(s.duration)).sum::<u64>();
    }
    let pts = sorted_pts(&decode(&segments));
    assert_eq!(pts.len(), FRAMES);
    assert_steps_of_one_frame(&pts);
    assert!(pts[0] <= 1_000, "first PTS {}", pts[0]);
    let far = media_segment(1, 1 << 32, &enc.samples[..1]);
    assert_eq!(tfdt_as_version_0(&far), None);
    assert_eq!(tfdt_as_version_0(&far[..40]), None);
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
    let file = progressive_mp4_with_stco_limit(&enc.track, &enc.samples, None, 0);
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
    let init = init_segment(&enc.track, None);
    assert_eq!(kinds(&init), [*b"ftyp", *b"moov"]);
    check_tree(&init);
    assert_eq!(&find(&init, &[b"ftyp"])[..4], b"iso5");
    let stbl = find(&init, &[b"moov", b"trak", b"mdia", b"minf", b"stbl"]);
    let avc1 = find(&find(stbl, &[b"stsd"])[8..], &[b"avc1"]);
    assert_eq!(find(&avc1[78..], &[b"avcC"]), enc.track.config);
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
        codec: crate::VideoCodec::H264,
        width: 2,
        height: 2,
        timescale: TIMESCALE,
        config: vec![1, 0x42, 0, 0x1E, 0xFF, 0xE0, 0],
    };
    let segment = media_segment(7, 42, &[]);
    assert_eq!(kinds(&segment), [*b"moof", *b"mdat"]);
    check_tree(&segment);
    let file = progressive_mp4(&track, &[]);
    assert_eq!(kinds(&file), [*b"ftyp", *b"moov", *b"mdat"]);
    check_tree(&file);
}
