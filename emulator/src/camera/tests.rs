//! Tests of the camera: configurations, delivery, resolution changes, errors and stopping,
//! checked by decoding the fragments and reading the barcodes back.

use super::*;
use std::sync::mpsc;
use std::time::{Instant, UNIX_EPOCH};

use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use super::pipeline::make;
use crate::barcode;

/// Decode time of frame 0 in the tests (anything but 0, to see that it is honoured).
const BASE: u64 = 123_456_789;

/// A fragment as the test received it.
struct Received {
    /// Monotonic arrival time.
    at: Instant,
    /// Wall-clock arrival time.
    wall: SystemTime,
    /// The fragment.
    fragment: EncodedFragment,
}

/// One decoded GRAY8 picture.
struct Decoded {
    /// Width.
    width: usize,
    /// Height.
    height: usize,
    /// Tightly packed luma.
    gray: Vec<u8>,
}

impl Decoded {
    /// The frame number its barcode shows.
    fn number(&self) -> Option<u32> {
        barcode::read_gray8(&self.gray, self.width, self.width, self.height)
    }
}

/// A 25 fps test configuration whose frame 0 lies `history` before now.
fn config(name: &str, width: u32, height: u32, fpf: u32, history: Duration) -> CameraConfig {
    CameraConfig {
        name: name.to_owned(),
        width,
        height,
        rate: crate::FrameRate::integer(25),
        codec: crate::VideoCodec::H264,
        b_frames: 0,
        offsets: crate::CompositionOffsets::Positive,
        frames_per_fragment: fpf,
        bitrate_kbps: 800,
        start: SystemTime::now() - history,
        history,
        decode_time_base: BASE,
        max_frames: None,
    }
}

/// Starts a camera that sends every fragment, with its arrival time, to the receiver.
fn start(cfg: CameraConfig) -> (Camera, mpsc::Receiver<Received>) {
    let (tx, rx) = mpsc::channel();
    let camera = Camera::start(cfg, move |event| {
        if let CameraEvent::Fragment(fragment) = event {
            let _ = tx.send(Received {
                at: Instant::now(),
                wall: SystemTime::now(),
                fragment,
            });
        }
    })
    .expect("camera starts");
    (camera, rx)
}

/// The next fragment (fails the test after 5 s, with the camera's error).
fn recv(camera: &Camera, rx: &mpsc::Receiver<Received>) -> Received {
    rx.recv_timeout(Duration::from_secs(5)).unwrap_or_else(|e| {
        panic!(
            "no fragment: {e}; camera error: {:?}, frames {}",
            camera.last_error(),
            camera.frames_encoded()
        )
    })
}

/// Decodes the samples of `fragments` (all of `track`) into GRAY8 pictures with GStreamer.
fn decode(track: &VideoTrack, fragments: &[&EncodedFragment]) -> Vec<Decoded> {
    gst::init().expect("gst init");
    let caps = gst::Caps::builder("video/x-h264")
        .field("stream-format", "avc")
        .field("alignment", "au")
        .field("width", track.width as i32)
        .field("height", track.height as i32)
        .field("framerate", gst::Fraction::new(25, 1))
        .field("codec_data", gst::Buffer::from_slice(track.config.clone()))
        .build();
    let appsrc = gst_app::AppSrc::builder()
        .caps(&caps)
        .format(gst::Format::Time)
        .build();
    let decoder = make("avdec_h264").expect("avdec_h264");
    let convert = make("videoconvert").expect("videoconvert");
    let appsink = gst_app::AppSink::builder()
        .caps(
            &gst::Caps::builder("video/x-raw")
                .field("format", "GRAY8")
                .build(),
        )
        .sync(false)
        .build();
    let pipeline = gst::Pipeline::new();
    let elements = [
        appsrc.upcast_ref::<gst::Element>(),
        &decoder,
        &convert,
        appsink.upcast_ref::<gst::Element>(),
    ];
    pipeline.add_many(elements).expect("add");
    gst::Element::link_many(elements).expect("link");
    pipeline.set_state(gst::State::Playing).expect("playing");
    let mut pushed = 0u64;
    for fragment in fragments {
        assert_eq!(*fragment.track, *track);
        for (i, sample) in fragment.samples.iter().enumerate() {
            let mut buffer = gst::Buffer::from_slice(sample.data.clone());
            let b = buffer.get_mut().expect("writable");
            let t = gst::ClockTime::from_mseconds((fragment.first_frame + i as u64) * 40);
            b.set_pts(t);
            b.set_dts(t);
            b.set_duration(gst::ClockTime::from_mseconds(40));
            if !sample.is_sync {
                b.set_flags(gst::BufferFlags::DELTA_UNIT);
            }
            appsrc.push_buffer(buffer).expect("push");
            pushed += 1;
        }
    }
    appsrc.end_of_stream().expect("eos");
    let mut out = Vec::new();
    while let Some(sample) = appsink.try_pull_sample(gst::ClockTime::from_seconds(5)) {
        let info = gst_video::VideoInfo::from_caps(sample.caps().expect("caps")).expect("info");
        let (width, height) = (info.width() as usize, info.height() as usize);
        let stride = info.stride()[0] as usize;
        let map = sample
            .buffer()
            .expect("buffer")
            .map_readable()
            .expect("map");
        let gray = (0..height)
            .flat_map(|y| map[y * stride..y * stride + width].iter().copied())
            .collect();
        out.push(Decoded {
            width,
            height,
            gray,
        });
    }
    pipeline.set_state(gst::State::Null).expect("null");
    assert_eq!(
        out.len() as u64,
        pushed,
        "every sample decodes to a picture"
    );
    out
}

/// Checks that the text band of every picture holds text and changes from one picture to the
/// next (the overlay text is updated per frame).
fn assert_text_changes_per_frame(pictures: &[Decoded], name: &str) {
    let first = &pictures[0];
    let label_chars = label(name, 10_000_000, UNIX_EPOCH).chars().count();
    let layout = Layout::new(first.width as u32, first.height as u32, label_chars);
    let rows = layout.strip + 1..layout.strip + layout.band - 1;
    let band = |p: &Decoded| -> Vec<u8> {
        rows.clone()
            .flat_map(|y| p.gray[y * p.width..(y + 1) * p.width].to_vec())
            .collect()
    };
    for pair in pictures.windows(2) {
        let (a, b) = (band(&pair[0]), band(&pair[1]));
        let bright = b.iter().filter(|&&v| v > 160).count();
        assert!(
            bright > 30,
            "text drawn in the band ({bright} bright pixels)"
        );
        let changed = a
            .iter()
            .zip(&b)
            .filter(|&(&x, &y)| x.abs_diff(y) > 64)
            .count();
        assert!(
            changed > 20,
            "band of #{:?} and #{:?} differ in {changed} pixels only",
            pair[0].number(),
            pair[1].number()
        );
    }
}

/// Out-of-range configurations are refused before anything starts.
#[test]
fn rejects_bad_configs() {
    for cfg in [
        CameraConfig {
            rate: crate::FrameRate::integer(0),
            ..config("bad", 320, 240, 25, Duration::ZERO)
        },
        CameraConfig {
            rate: crate::FrameRate::integer(121),
            ..config("bad", 320, 240, 25, Duration::ZERO)
        },
        config("bad", 321, 240, 25, Duration::ZERO),
        config("bad", 320, 14, 25, Duration::ZERO),
        config("bad", 8194, 240, 25, Duration::ZERO),
        config("bad", 320, 240, 0, Duration::ZERO),
    ] {
        let name = format!(
            "{}x{} {} fps {}",
            cfg.width, cfg.height, cfg.rate, cfg.frames_per_fragment
        );
        let err = Camera::start(cfg, |_| {}).err().expect(&name);
        assert!(err.to_string().contains("camera"), "{err}");
    }
}

/// History comes at once, then real time; fragments are continuous, start with an IDR and
/// decode to pictures whose barcodes and overlay text show every frame.
#[test]
fn delivers_continuous_fragments_with_history_then_in_real_time() {
    let history = Duration::from_secs(2);
    let cfg = config("cam-1", 320, 240, 25, history);
    let start_time = cfg.start;
    let started = Instant::now();
    let (camera, rx) = start(cfg);
    let got: Vec<Received> = (0..4).map(|_| recv(&camera, &rx)).collect();
    assert!(camera.frames_encoded() >= 100);
    camera.stop();

    // The two fragments of history come faster than real time (the bound is the claim
    // itself, not a speed: encoding may be slow on a loaded machine).
    let history_done = got[1].at - started;
    assert!(
        history_done < history,
        "2 s of history took {history_done:?}"
    );
    for (k, r) in got.iter().enumerate() {
        let f = &r.fragment;
        let k = k as u64;
        assert_eq!(f.index, k);
        assert_eq!(f.first_frame, 25 * k);
        assert_eq!(f.decode_time, BASE + 25 * 3600 * k);
        assert_eq!(f.producer_start, start_time + Duration::from_secs(k));
        assert_eq!(f.duration, Duration::from_secs(1));
        assert_eq!(f.samples.len(), 25);
        assert_eq!(
            (f.track.width, f.track.height, f.track.timescale),
            (320, 240, 90_000)
        );
        assert!(Arc::ptr_eq(&f.track, &got[0].fragment.track));
        assert!(f.samples[0].is_sync, "fragment {k} starts with an IDR");
        assert!(
            f.samples[1..].iter().all(|s| !s.is_sync),
            "only the first frame of fragment {k} is a key frame"
        );
        assert!(f.samples.iter().all(|s| s.duration == 3600));
        assert!(f.samples.iter().all(|s| s.composition_offset == 0));
        assert!(f.samples.iter().all(|s| !s.data.is_empty()));
        // AVCC: 4-byte length-prefixed NAL units that fill the access unit exactly.
        let mut rest = &f.samples[0].data[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
            rest = &rest[4 + len..];
        }
        if k >= 2 {
            // Real time: delivered once its last frame's producer time has come, not long
            // after.
            let last_frame_time = f.producer_start + f.duration - Duration::from_millis(40);
            let ahead = last_frame_time.duration_since(r.wall).unwrap_or_default();
            assert!(
                ahead < Duration::from_millis(15),
                "fragment {k} {ahead:?} early"
            );
            let late = r.wall.duration_since(last_frame_time).unwrap_or_default();
            assert!(
                late < Duration::from_millis(750),
                "fragment {k} {late:?} late"
            );
        }
    }
    let gap = got[3].at - got[2].at;
    assert!(
        (Duration::from_millis(600)..Duration::from_millis(1400)).contains(&gap),
        "real-time fragments {gap:?} apart"
    );

    let fragments: Vec<&EncodedFragment> = got[..3].iter().map(|r| &r.fragment).collect();
    let pictures = decode(&got[0].fragment.track, &fragments);
    let numbers: Vec<Option<u32>> = pictures.iter().map(Decoded::number).collect();
    let expected: Vec<Option<u32>> = (0..75).map(Some).collect();
    assert_eq!(numbers, expected);
    assert!(pictures.iter().all(|p| (p.width, p.height) == (320, 240)));
    assert_text_changes_per_frame(&pictures, "cam-1");
}

/// A new resolution starts at a fragment boundary with an IDR, a new track and continuous
/// decode times, and decodes at the new size.
#[test]
fn changes_resolution_at_the_next_fragment_boundary() {
    let cfg = config("cam-res", 320, 240, 10, Duration::from_millis(500));
    let (camera, rx) = start(cfg);
    let first = recv(&camera, &rx);
    camera.set_resolution(641, 360); // odd: ignored
    camera.set_resolution(640, 360);
    let mut before = vec![first.fragment];
    let changed = loop {
        let f = recv(&camera, &rx).fragment;
        if f.track.width != 320 {
            break f;
        }
        assert!(before.len() < 4, "resolution did not change");
        before.push(f);
    };
    let after = recv(&camera, &rx).fragment;
    camera.stop();

    let old = before.last().expect("a fragment before the change");
    assert!(before.iter().all(|f| Arc::ptr_eq(&f.track, &old.track)));
    assert_eq!((old.track.width, old.track.height), (320, 240));
    assert_eq!((changed.track.width, changed.track.height), (640, 360));
    assert_eq!(changed.track.timescale, 90_000);
    assert_ne!(changed.track.config, old.track.config);
    assert_eq!(changed.index, old.index + 1);
    assert_eq!(changed.first_frame, old.first_frame + 10);
    assert_eq!(changed.decode_time, old.decode_time + 10 * 3600);
    assert_eq!(
        changed.producer_start,
        old.producer_start + Duration::from_millis(400)
    );
    assert!(changed.samples[0].is_sync);
    assert!(Arc::ptr_eq(&after.track, &changed.track));
    assert_eq!(after.decode_time, changed.decode_time + 10 * 3600);
    assert!(after.samples[0].is_sync);
    assert!(after.samples[1..].iter().all(|s| !s.is_sync));

    let pictures = decode(&changed.track, &[&changed, &after]);
    assert!(pictures.iter().all(|p| (p.width, p.height) == (640, 360)));
    let numbers: Vec<Option<u32>> = pictures.iter().map(Decoded::number).collect();
    let first = changed.first_frame as u32;
    let expected: Vec<Option<u32>> = (first..first + 20).map(Some).collect();
    assert_eq!(numbers, expected);
    assert_text_changes_per_frame(&pictures, "cam-res");
}

/// A GStreamer error ends the camera thread and is reported by `last_error`.
#[test]
fn a_bus_error_ends_the_camera_and_is_reported() {
    let (camera, rx) = start(config("cam-err", 320, 240, 5, Duration::from_secs(1)));
    let _ = recv(&camera, &rx);
    camera.shared.inject_error.store(true, Ordering::Relaxed);
    let t = Instant::now();
    while camera.is_running() {
        assert!(t.elapsed() < Duration::from_secs(2), "camera still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    let error = camera.last_error().expect("error recorded");
    assert!(error.contains("injected"), "{error}");
    let frames = camera.frames_encoded();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(camera.frames_encoded(), frames);
    camera.stop();
}

/// Tiny pictures encode and decode too (their barcode is readable from 40 pixels wide).
#[test]
fn encodes_tiny_pictures() {
    for (width, height, readable) in [(16u32, 16u32, false), (40, 16, true), (80, 48, true)] {
        let (camera, rx) = start(config("cam-tiny", width, height, 5, Duration::from_secs(1)));
        let f = recv(&camera, &rx).fragment;
        camera.stop();
        assert_eq!((f.track.width, f.track.height), (width, height));
        let pictures = decode(&f.track, &[&f]);
        assert_eq!(pictures.len(), 5);
        if readable {
            let numbers: Vec<Option<u32>> = pictures.iter().map(Decoded::number).collect();
            assert_eq!(
                numbers,
                (0..5).map(Some).collect::<Vec<_>>(),
                "{width}x{height}"
            );
        }
    }
}

/// `stop` and drop return quickly whether the camera is encoding or sleeping.
#[test]
fn stops_promptly_while_catching_up_and_while_pacing() {
    // Ten minutes of history: the camera is busy encoding as fast as it can.
    let (camera, _rx) = start(config("cam-busy", 320, 240, 25, Duration::from_secs(600)));
    std::thread::sleep(Duration::from_millis(300));
    assert!(camera.is_running());
    let t = Instant::now();
    camera.stop();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );

    // No history: the camera sleeps between frames.
    let (camera, rx) = start(config("cam-idle", 320, 240, 5, Duration::ZERO));
    let _ = recv(&camera, &rx);
    let encoded = camera.frames_encoded();
    assert!(encoded >= 5);
    assert_eq!(camera.last_error(), None);
    let t = Instant::now();
    camera.stop();
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t.elapsed()
    );

    // Dropping stops too.
    let (camera, _rx) = start(config("cam-drop", 320, 240, 5, Duration::ZERO));
    let t = Instant::now();
    drop(camera);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        t.elapsed()
    );
}
