//! UriFrameSource against real parts: the gst-rtsp-server test camera on 127.0.0.1 (directly or
//! through a TCP proxy that can freeze a connection), media files and an HLS directory made by
//! the test with GStreamer (the HLS one served over HTTP on 127.0.0.1), and the KVS emulator
//! for JPEG output from a KVS source. No mocks.

#[path = "common/frames.rs"]
mod frames;
#[path = "common/rtsp.rs"]
mod rtsp;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use kvs_frames::backoff::{BackoffPolicy, Jitter};
use kvs_frames::{
    DeliveryPolicy, EndOfStream, ErrorKind, Frame, PixelFormat, RtspTransport, SourceState,
    UriFrameSource, UriFrameSourceBuilder, UriKind,
};

/// Takes `n` frames, failing after `timeout` per frame.
fn take(source: &UriFrameSource, n: usize, timeout: Duration) -> Vec<Frame> {
    frames::take_frames(source.frames(), n, timeout, || source.stats())
}

/// Every frame until the iterator ends (failing on an error or after 20 s without an item).
fn drain(source: &UriFrameSource) -> Vec<Frame> {
    frames::drain_frames(source.frames(), Duration::from_secs(20), || source.stats())
}

/// The first error the iterator yields (frames before it are skipped), within `timeout`.
fn first_error(source: &UriFrameSource, timeout: Duration) -> kvs_frames::Error {
    let deadline = Instant::now() + timeout;
    let mut frames = source.frames();
    while Instant::now() < deadline {
        if let Some(Err(e)) = frames.next_timeout(Duration::from_millis(200)) {
            return e;
        }
    }
    panic!("no error within {timeout:?}: {:?}", source.stats());
}

fn quick_backoff() -> BackoffPolicy {
    BackoffPolicy::default()
        .initial(Duration::from_millis(300))
        .max(Duration::from_secs(1))
        .jitter(Jitter::Fixed(1.0))
        .max_consecutive_errors(None)
}

/// A scratch directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "kvs-frames-uri-{}-{name}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs a gst-launch description to end-of-stream.
fn run_pipeline(description: &str) {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(description).unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("the pipeline finishes within 30 s");
    pipeline.set_state(gst::State::Null).unwrap();
    if let gst::MessageView::Error(e) = msg.view() {
        panic!("{description}: {} ({:?})", e.error(), e.debug());
    }
}

/// An H.264 MP4 of `frames` frames of 320x240 at 25 fps, a key frame every `key_int`.
fn make_mp4(path: &Path, frames: u32, key_int: u32) {
    run_pipeline(&format!(
        "videotestsrc num-buffers={frames} pattern=ball ! video/x-raw,width=320,height=240,framerate=25/1 \
         ! x264enc key-int-max={key_int} bframes=0 speed-preset=ultrafast bitrate=300 ! h264parse \
         ! mp4mux ! filesink location={}",
        path.display()
    ));
}

/// Decodes one JPEG image with GStreamer's jpegdec: (width, height).
fn decode_jpeg(data: &[u8]) -> (u32, u32) {
    let pipeline = gst::parse::launch(
        "appsrc name=src caps=image/jpeg ! jpegdec ! videoconvert ! video/x-raw,format=GRAY8 ! appsink name=sink sync=false",
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
    pipeline.set_state(gst::State::Playing).unwrap();
    src.push_buffer(gst::Buffer::from_slice(data.to_vec()))
        .unwrap();
    src.end_of_stream().unwrap();
    let sample = sink
        .try_pull_sample(gst::ClockTime::from_seconds(10))
        .expect("jpegdec decodes the frame");
    let info = gstreamer_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
    pipeline.set_state(gst::State::Null).unwrap();
    (info.width(), info.height())
}

/// A TCP proxy in front of the RTSP server that can freeze the connections open so far: they
/// stay open but nothing moves (a camera that hangs), while new connections flow.
struct Proxy {
    port: u16,
    next_id: Arc<AtomicU64>,
    frozen_below: Arc<AtomicU64>,
    shutdown: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = Proxy {
            port: listener.local_addr().unwrap().port(),
            next_id: Arc::new(AtomicU64::new(0)),
            frozen_below: Arc::new(AtomicU64::new(0)),
            shutdown: Arc::new(AtomicBool::new(false)),
        };
        let (next_id, frozen, shutdown) = (
            Arc::clone(&proxy.next_id),
            Arc::clone(&proxy.frozen_below),
            Arc::clone(&proxy.shutdown),
        );
        std::thread::spawn(move || {
            while !shutdown.load(Ordering::SeqCst) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let id = next_id.fetch_add(1, Ordering::SeqCst);
                client.set_nonblocking(false).unwrap();
                for (from, to) in [
                    (client.try_clone().unwrap(), server.try_clone().unwrap()),
                    (server, client),
                ] {
                    let (frozen, shutdown) = (Arc::clone(&frozen), Arc::clone(&shutdown));
                    std::thread::spawn(move || pump(id, from, to, &frozen, &shutdown));
                }
            }
        });
        proxy
    }

    /// Freezes every connection opened so far.
    fn freeze_existing(&self) {
        self.frozen_below
            .store(self.next_id.load(Ordering::SeqCst), Ordering::SeqCst);
    }

    fn connections(&self) -> u64 {
        self.next_id.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shutdown.store(true, Ordering::SeqCst);
    }
}

fn pump(
    id: u64,
    mut from: TcpStream,
    mut to: TcpStream,
    frozen: &AtomicU64,
    shutdown: &AtomicBool,
) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    while !shutdown.load(Ordering::SeqCst) {
        if id < frozen.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
}

fn rtsp_source(url: &str) -> UriFrameSourceBuilder {
    UriFrameSource::builder("rtsp-cam", url).pixel_format(PixelFormat::Gray8)
}

#[test]
fn rtsp_frames_arrive_at_the_camera_rate_with_the_sender_ntp_time() {
    let server = rtsp::RtspServer::start(); // 320x240 at 15 fps
    let source = rtsp_source(&server.url()).build().unwrap();
    assert_eq!(source.kind(), UriKind::Rtsp);
    let started = Instant::now();
    let mut frames = take(&source, 30, Duration::from_secs(10));
    // 30 frames at 15 fps take about 2 s of real time (live pace, not a burst).
    assert!(started.elapsed() > Duration::from_millis(1500));
    assert!(frames.iter().all(|f| f.width() == 320 && f.height() == 240));
    assert!(frames.iter().all(|f| f.fragment().is_none()));
    assert!(frames[0].is_key_frame(), "decoding starts at a key frame");
    for pair in frames.windows(2) {
        let step = pair[1].pts().unwrap() - pair[0].pts().unwrap();
        assert!(
            step.abs_diff(Duration::from_micros(66_667)) < Duration::from_millis(10),
            "PTS step {step:?}"
        );
        assert_eq!(pair[1].sequence(), pair[0].sequence() + 1);
    }
    // The sender's NTP time arrives with the first RTCP sender report (a few seconds in).
    let deadline = Instant::now() + Duration::from_secs(15);
    while frames.last().unwrap().producer_time().is_none() {
        assert!(
            Instant::now() < deadline,
            "no NTP time: {:?}",
            source.stats()
        );
        frames.extend(take(&source, 1, Duration::from_secs(5)));
    }
    let with_ntp = take(&source, 15, Duration::from_secs(5));
    for pair in with_ntp.windows(2) {
        let step = pair[1]
            .producer_time()
            .unwrap()
            .duration_since(pair[0].producer_time().unwrap())
            .unwrap();
        assert!(
            step.abs_diff(Duration::from_micros(66_667)) < Duration::from_millis(2),
            "NTP step {step:?}"
        );
    }
    // Sender and receiver share this host's clock.
    let f = &with_ntp[0];
    let skew = f
        .emitted_at()
        .duration_since(f.producer_time().unwrap())
        .unwrap_or_else(|e| e.duration());
    assert!(
        skew < Duration::from_secs(2),
        "NTP time vs wall time: {skew:?}"
    );
    assert_eq!(f.timestamp(), f.producer_time().unwrap());
    let stats = source.stats();
    assert_eq!(source.state(), SourceState::Connected);
    assert!(source.is_healthy());
    assert_eq!((stats.sessions, stats.pipelines_built), (1, 1));
    assert_eq!(
        stats.last_frame_producer_time,
        with_ntp.last().unwrap().producer_time()
    );
    source.stop();
    assert_eq!(source.state(), SourceState::Disconnected);
    assert!(
        source.frames().next().is_none(),
        "the iterator ends after stop"
    );
}

/// IP cameras that send H.265, or H.264 with B-frames: every frame in presentation order at
/// the camera's pace, the sender's NTP time on each once RTCP reports arrive.
#[test]
fn rtsp_cameras_with_h265_or_b_frames_deliver_frames_in_order_with_ntp_time() {
    for encoder in [rtsp::Encoder::H265, rtsp::Encoder::H264BFrames] {
        let server = rtsp::RtspServer::builder()
            .encoder(encoder)
            .start_retrying(Duration::from_secs(10))
            .unwrap();
        let source = rtsp_source(&server.url()).build().unwrap();
        let mut frames = take(&source, 30, Duration::from_secs(15));
        assert!(
            frames.iter().all(|f| f.width() == 320 && f.height() == 240),
            "{encoder:?}"
        );
        for pair in frames.windows(2) {
            let step = pair[1].pts().unwrap() - pair[0].pts().unwrap();
            assert!(
                step.abs_diff(Duration::from_micros(66_667)) < Duration::from_millis(10),
                "{encoder:?}: PTS step {step:?}"
            );
            assert_eq!(pair[1].sequence(), pair[0].sequence() + 1);
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while frames.last().unwrap().producer_time().is_none() {
            assert!(Instant::now() < deadline, "{encoder:?}: no NTP time");
            frames.extend(take(&source, 1, Duration::from_secs(5)));
        }
        let with_ntp = take(&source, 15, Duration::from_secs(5));
        for pair in with_ntp.windows(2) {
            let step = pair[1]
                .producer_time()
                .unwrap()
                .duration_since(pair[0].producer_time().unwrap())
                .unwrap();
            assert!(
                step.abs_diff(Duration::from_micros(66_667)) < Duration::from_millis(2),
                "{encoder:?}: NTP step {step:?}"
            );
        }
        assert_eq!(source.stats().decode_errors, 0, "{encoder:?}");
        source.stop();
    }
}

/// Most IP cameras send audio beside the video (here G.711 A-law as a second RTP stream), and
/// files often carry AAC: the video arrives whole and at the camera's pace, over TCP and UDP,
/// and a file's every frame, in order. (The audio is dropped at the demuxer's or depayloader's
/// side without a sink: one that took the first buffer would stall the only streaming thread.)
#[test]
fn video_beside_audio_arrives_whole_from_rtsp_and_files() {
    let server = rtsp::RtspServer::builder()
        .audio()
        .start_retrying(Duration::from_secs(10))
        .unwrap();
    for transport in [RtspTransport::Tcp, RtspTransport::Udp] {
        let source = rtsp_source(&server.url())
            .rtsp_transport(transport)
            .build()
            .unwrap();
        let started = Instant::now();
        let frames = take(&source, 30, Duration::from_secs(15));
        assert!(
            started.elapsed() > Duration::from_millis(1500),
            "{transport:?}: live pace"
        );
        assert!(frames.iter().all(|f| f.width() == 320 && f.height() == 240));
        for pair in frames.windows(2) {
            assert_eq!(pair[1].sequence(), pair[0].sequence() + 1, "{transport:?}");
            let step = pair[1].pts().unwrap() - pair[0].pts().unwrap();
            // Over UDP a loaded machine may lose a packet (and so a frame): PTS only grows.
            assert!(
                if transport == RtspTransport::Tcp {
                    step.abs_diff(Duration::from_micros(66_667)) < Duration::from_millis(10)
                } else {
                    step > Duration::ZERO
                },
                "{transport:?}: PTS step {step:?}"
            );
        }
        let stats = source.stats();
        assert_eq!(
            (stats.reconnects, stats.decode_errors, stats.pipelines_built),
            (0, 0, 1),
            "{transport:?}: {stats:?}"
        );
        source.stop();
    }

    let dir = Scratch::new("audio-file");
    let path = dir.path("with-audio.mp4");
    run_pipeline(&format!(
        "videotestsrc num-buffers=50 pattern=ball ! video/x-raw,width=320,height=240,framerate=25/1 \
         ! x264enc key-int-max=10 bframes=0 speed-preset=ultrafast bitrate=300 ! h264parse \
         ! queue ! mp4mux name=mux ! filesink location={} \
         audiotestsrc num-buffers=90 samplesperbuffer=1024 wave=ticks ! audio/x-raw,rate=44100,channels=1 \
         ! avenc_aac ! aacparse ! queue ! mux.",
        path.display()
    ));
    let source = UriFrameSource::builder("file-cam", path.to_str().unwrap())
        .pixel_format(PixelFormat::Bgr)
        .build()
        .unwrap();
    let frames = drain(&source);
    assert_eq!(frames.len(), 50, "{:?}", source.stats());
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            f.pts(),
            Some(Duration::from_millis(40 * i as u64)),
            "frame {i}"
        );
    }
    assert_eq!(source.stats().read_errors, 0);
}

#[test]
fn rtsp_over_udp_and_auto_deliver_frames() {
    let server = rtsp::RtspServer::start();
    for transport in [RtspTransport::Udp, RtspTransport::Auto] {
        let source = rtsp_source(&server.url())
            .rtsp_transport(transport)
            .rtsp_latency(Duration::from_millis(100))
            .build()
            .unwrap();
        let frames = take(&source, 20, Duration::from_secs(10));
        assert!(frames.iter().all(|f| f.width() == 320), "{transport:?}");
        assert_eq!(source.stats().reconnects, 0, "{transport:?}");
    }
}

#[test]
fn rtsp_over_udp_against_a_mount_that_allows_only_udp() {
    let server = rtsp::RtspServer::builder().udp_only().start().unwrap();
    // UDP works, and really is UDP: the same mount refuses TCP.
    let udp = rtsp_source(&server.url())
        .rtsp_transport(RtspTransport::Udp)
        .build()
        .unwrap();
    let frames = take(&udp, 30, Duration::from_secs(15));
    assert!(frames.iter().all(|f| f.width() == 320));
    assert_eq!(udp.stats().reconnects, 0);
    drop(udp);
    let tcp = rtsp_source(&server.url())
        .rtsp_transport(RtspTransport::Tcp)
        .backoff(quick_backoff())
        .build()
        .unwrap();
    // The server refuses the TCP transport: no frame, retries, and an error that says so
    // (not a "missing a plug-in" error).
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut frames = tcp.frames();
    while tcp.stats().read_errors < 2 {
        assert!(Instant::now() < deadline, "{:?}", tcp.stats());
        if let Some(item) = frames.next_timeout(Duration::from_millis(100)) {
            panic!("a TCP client of a UDP-only mount got {item:?}");
        }
    }
    let stats = tcp.stats();
    assert_eq!(stats.frames_delivered, 0, "{stats:?}");
    let last = stats.last_error.clone().unwrap();
    assert!(last.contains("refused to set up the stream"), "{last}");
    assert!(last.contains("rtsp_transport"), "{last}");
}

#[test]
fn rtsp_server_killed_and_restarted_reconnects_and_resumes() {
    let server = rtsp::RtspServer::start();
    let port = server.port();
    let source = rtsp_source(&server.url())
        .backoff(quick_backoff())
        .build()
        .unwrap();
    take(&source, 10, Duration::from_secs(10));
    server.stop();
    // The source notices, backs off and keeps trying while the camera is away.
    let deadline = Instant::now() + Duration::from_secs(15);
    while source.stats().reconnects < 2 {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        let _ = source.frames().next_timeout(Duration::from_millis(100));
    }
    assert_eq!(source.state(), SourceState::Reconnecting);
    assert!(!source.is_healthy());
    let stats = source.stats();
    assert!(stats.consecutive_errors >= 1, "{stats:?}");
    assert!(
        stats
            .backoff_history
            .iter()
            .all(|d| *d <= Duration::from_secs(1)),
        "{stats:?}"
    );
    let _server = rtsp::RtspServer::builder()
        .port(port)
        .start_retrying(Duration::from_secs(10))
        .unwrap();
    let frames = take(&source, 15, Duration::from_secs(15));
    assert!(frames.iter().all(|f| f.width() == 320));
    let stats = source.stats();
    assert_eq!(source.state(), SourceState::Connected);
    assert_eq!(stats.consecutive_errors, 0, "{stats:?}");
    assert!(stats.pipelines_built >= 3, "{stats:?}");
    assert!(stats.read_errors >= 2, "{stats:?}");
    assert!(stats.last_error.is_some());
}

#[test]
fn rtsp_stall_is_detected_and_the_source_reconnects() {
    let server = rtsp::RtspServer::start();
    let proxy = Proxy::start(server.port());
    let url = format!("rtsp://127.0.0.1:{}/test", proxy.port);
    let source = rtsp_source(&url)
        .stall_timeout(Duration::from_secs(2))
        .backoff(quick_backoff())
        .build()
        .unwrap();
    take(&source, 10, Duration::from_secs(10));
    assert_eq!(proxy.connections(), 1);
    // The connection stays open but nothing arrives any more.
    proxy.freeze_existing();
    let deadline = Instant::now() + Duration::from_secs(15);
    while source.stats().reconnects < 1 {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        let _ = source.frames().next_timeout(Duration::from_millis(100));
    }
    let stats = source.stats();
    let last_error = stats.last_error.clone().unwrap();
    assert!(last_error.contains("stall"), "{last_error}");
    // A new connection flows again.
    let frames = take(&source, 10, Duration::from_secs(10));
    assert!(frames.iter().all(|f| f.width() == 320));
    assert!(proxy.connections() >= 2);
    assert_eq!(source.state(), SourceState::Connected);
}

#[test]
fn file_source_delivers_exactly_the_frames_of_the_file_then_ends() {
    let dir = Scratch::new("file");
    let path = dir.path("clip.mp4");
    make_mp4(&path, 50, 10);
    let source = UriFrameSource::builder("file-cam", path.to_str().unwrap())
        .pixel_format(PixelFormat::Bgr)
        .build()
        .unwrap();
    assert_eq!(source.kind(), UriKind::File);
    let frames = drain(&source);
    assert_eq!(frames.len(), 50);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            f.pts(),
            Some(Duration::from_millis(40 * i as u64)),
            "frame {i}"
        );
        assert_eq!(f.sequence(), i as u64);
        assert_eq!(f.producer_time(), None);
        assert_eq!(f.timestamp(), f.emitted_at());
        assert_eq!(f.is_key_frame(), i % 10 == 0, "frame {i}");
        assert_eq!(f.to_contiguous().len(), 320 * 240 * 3);
    }
    let stats = source.stats();
    assert_eq!(source.state(), SourceState::Disconnected);
    assert_eq!(stats.frames_delivered, 50);
    assert_eq!(stats.frames_dropped(), 0);
    assert_eq!(stats.read_errors, 0);
    assert!(source.frames().next().is_none());

    // The same file as a file:// URI, looped: it starts again at its first frame.
    let uri = format!("file://{}", path.display());
    let looped = UriFrameSource::builder("file-cam", &uri)
        .pixel_format(PixelFormat::Gray8)
        .end_of_stream(EndOfStream::Loop)
        .build()
        .unwrap();
    let frames = take(&looped, 120, Duration::from_secs(10));
    let pts: Vec<Duration> = frames.iter().map(|f| f.pts().unwrap()).collect();
    assert_eq!(pts[49], Duration::from_millis(40 * 49));
    assert_eq!(pts[50], Duration::ZERO);
    assert_eq!(pts[100], Duration::ZERO);
    assert!(looped.stats().pipelines_built >= 3);
    assert_eq!(looped.stats().reconnects, 0);
}

#[test]
fn target_fps_key_frames_only_and_realtime_on_a_file() {
    let dir = Scratch::new("sampling");
    let path = dir.path("clip.mp4");
    make_mp4(&path, 50, 10);
    let file = path.to_str().unwrap();
    let five = drain(
        &UriFrameSource::builder("file-cam", file)
            .pixel_format(PixelFormat::Gray8)
            .target_fps(5.0)
            .build()
            .unwrap(),
    );
    let pts: Vec<u64> = five
        .iter()
        .map(|f| f.pts().unwrap().as_millis() as u64)
        .collect();
    assert_eq!(pts, (0..10).map(|i| i * 200).collect::<Vec<_>>());
    let source = UriFrameSource::builder("file-cam", file)
        .pixel_format(PixelFormat::Gray8)
        .key_frames_only(true)
        .build()
        .unwrap();
    let keys = drain(&source);
    let pts: Vec<u64> = keys
        .iter()
        .map(|f| f.pts().unwrap().as_millis() as u64)
        .collect();
    assert_eq!(pts, vec![0, 400, 800, 1200, 1600]);
    assert!(keys.iter().all(Frame::is_key_frame));
    // At the media's pace, 50 frames at 25 fps take about 2 s.
    let started = Instant::now();
    let paced = drain(
        &UriFrameSource::builder("file-cam", file)
            .pixel_format(PixelFormat::Gray8)
            .realtime(true)
            .build()
            .unwrap(),
    );
    assert_eq!(paced.len(), 50);
    assert!(
        started.elapsed() > Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

#[test]
fn jpeg_output_decodes_with_the_frame_size_and_key_flags() {
    let dir = Scratch::new("jpeg");
    let path = dir.path("clip.mp4");
    make_mp4(&path, 20, 10);
    let source = UriFrameSource::builder("file-cam", path.to_str().unwrap())
        .pixel_format(PixelFormat::Jpeg { quality: 80 })
        .resize(160, 120)
        .build()
        .unwrap();
    let frames = drain(&source);
    assert_eq!(frames.len(), 20);
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.format(), PixelFormat::Jpeg { quality: 80 });
        assert_eq!((f.width(), f.height()), (160, 120));
        let data = f.data();
        assert_eq!(&data[..2], &[0xFF, 0xD8], "JPEG start of image");
        assert_eq!(&data[data.len() - 2..], &[0xFF, 0xD9], "JPEG end of image");
        assert_eq!((f.n_planes(), f.stride(), f.row(0)), (0, 0, None));
        assert_eq!(f.to_contiguous().as_ref(), data);
        assert_eq!(
            f.is_key_frame(),
            i % 10 == 0,
            "frame {i}: the source's key flag"
        );
    }
    assert_eq!(decode_jpeg(frames[7].data()), (160, 120));
    // Parsed like the other formats.
    assert_eq!("jpeg".parse::<PixelFormat>().unwrap(), PixelFormat::JPEG);
    let q: PixelFormat = "jpeg:60".parse().unwrap();
    assert_eq!(q, PixelFormat::Jpeg { quality: 60 });
    assert_eq!(q.to_string(), "jpeg:60");
    assert!(q.video_format().is_none() && !q.is_raw());
}

#[test]
fn a_kvs_source_delivers_jpeg_too() {
    use kvs_emulator::{Emulator, StreamSpec, barcode};
    use kvs_frames::{KvsHlsFrameSource, PlaybackMode};
    let emulator = Emulator::builder()
        .stream(
            StreamSpec::new("cam-1")
                .resolution(320, 240)
                .fps(25)
                .fragment_duration(Duration::from_secs(1))
                .bitrate_kbps(300)
                .history(Duration::from_secs(2))
                .live(false),
        )
        .start()
        .unwrap();
    assert!(emulator.wait_for_fragments("cam-1", 2, Duration::from_secs(30)));
    let truth = emulator.ground_truth("cam-1");
    let source = KvsHlsFrameSource::builder("kvs-cam", "cam-1")
        .sdk_config(&emulator.sdk_config())
        .playback(PlaybackMode::OnDemand {
            start: truth[0].producer_start,
            end: truth[0].producer_start + Duration::from_millis(1),
        })
        .pixel_format(PixelFormat::Jpeg { quality: 95 })
        .build()
        .unwrap();
    let mut frames = Vec::new();
    for item in source.frames() {
        frames.push(item.unwrap().0);
    }
    assert_eq!(frames.len(), 25, "one fragment");
    // Each JPEG is the right frame: decode it and read the camera's barcode.
    for (i, f) in frames.iter().enumerate() {
        assert_eq!((f.width(), f.height()), (320, 240));
        let (gray, stride) = decode_jpeg_gray(f.data());
        let n = barcode::read_gray8(&gray, stride, 320, 240).expect("barcode survives JPEG");
        assert_eq!(u64::from(n), truth[0].first_frame + i as u64);
        assert_eq!(
            f.is_key_frame(),
            i == 0,
            "one key frame per fragment, first"
        );
        assert_eq!(
            f.producer_time(),
            emulator.frame_producer_time("cam-1", u64::from(n))
        );
    }
    // An invalid quality is refused by the KVS builder too, naming the option.
    let err = KvsHlsFrameSource::builder("kvs-cam", "cam-1")
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Jpeg { quality: 0 })
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert_eq!(err.invalid_option(), Some("pixel_format"));
}

/// Decodes one JPEG to GRAY8: (pixels, stride).
fn decode_jpeg_gray(data: &[u8]) -> (Vec<u8>, usize) {
    let pipeline = gst::parse::launch(
        "appsrc name=src caps=image/jpeg ! jpegdec ! videoconvert ! video/x-raw,format=GRAY8 ! appsink name=sink sync=false",
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
    pipeline.set_state(gst::State::Playing).unwrap();
    src.push_buffer(gst::Buffer::from_slice(data.to_vec()))
        .unwrap();
    src.end_of_stream().unwrap();
    let sample = sink
        .try_pull_sample(gst::ClockTime::from_seconds(10))
        .expect("jpegdec decodes the frame");
    let info = gstreamer_video::VideoInfo::from_caps(sample.caps().unwrap()).unwrap();
    let pixels = sample.buffer().unwrap().map_readable().unwrap().to_vec();
    pipeline.set_state(gst::State::Null).unwrap();
    (pixels, info.stride()[0] as usize)
}

/// Serves the files of `dir` over HTTP on 127.0.0.1 (axum, from the `emulator` feature).
struct StaticServer {
    port: u16,
    _runtime: tokio::runtime::Runtime,
}

impl StaticServer {
    fn start(dir: PathBuf) -> StaticServer {
        use axum::http::{StatusCode, Uri, header};
        use axum::response::IntoResponse;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let app = axum::Router::new().fallback(move |uri: Uri| {
            let dir = dir.clone();
            async move {
                let name = uri.path().trim_start_matches('/').to_owned();
                if name.is_empty() || name.contains("..") || name.contains('/') {
                    return StatusCode::NOT_FOUND.into_response();
                }
                let content_type = if name.ends_with(".m3u8") {
                    "application/vnd.apple.mpegurl"
                } else {
                    "video/mp2t"
                };
                match tokio::fs::read(dir.join(&name)).await {
                    Ok(body) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
                    Err(_) => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
        runtime.spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        StaticServer {
            port,
            _runtime: runtime,
        }
    }
}

#[test]
fn hls_vod_from_a_static_directory_over_http() {
    let dir = Scratch::new("hls");
    // 3 s at 25 fps, a key frame (and a segment) every second.
    run_pipeline(&format!(
        "videotestsrc num-buffers=75 pattern=ball ! video/x-raw,width=320,height=240,framerate=25/1 \
         ! x264enc key-int-max=25 bframes=0 speed-preset=ultrafast bitrate=300 ! h264parse \
         ! hlssink2 location={} playlist-location={} target-duration=1 playlist-length=0 max-files=0",
        dir.path("segment%05d.ts").display(),
        dir.path("playlist.m3u8").display()
    ));
    let playlist = std::fs::read_to_string(dir.path("playlist.m3u8")).unwrap();
    assert!(playlist.contains("#EXT-X-ENDLIST"), "{playlist}");
    let server = StaticServer::start(dir.0.clone());
    let url = format!("http://127.0.0.1:{}/playlist.m3u8", server.port);
    let source = UriFrameSource::builder("hls-cam", &url)
        .pixel_format(PixelFormat::Gray8)
        .build()
        .unwrap();
    assert_eq!(source.kind(), UriKind::Http);
    let frames = drain(&source);
    assert_eq!(frames.len(), 75, "every frame of the VOD, once");
    assert!(frames.iter().all(|f| f.width() == 320 && f.height() == 240));
    for pair in frames.windows(2) {
        let step = pair[1].pts().unwrap() - pair[0].pts().unwrap();
        assert!(
            step.abs_diff(Duration::from_millis(40)) < Duration::from_millis(2),
            "{step:?}"
        );
    }
    assert_eq!(source.state(), SourceState::Disconnected);
    assert_eq!(source.stats().read_errors, 0);
}

#[test]
fn bad_uris_and_options_are_typed_errors_naming_them() {
    let dir = Scratch::new("bad");
    let cases: Vec<(&str, UriFrameSourceBuilder)> = vec![
        (
            "camera_id",
            UriFrameSource::builder("", "rtsp://127.0.0.1/x"),
        ),
        ("uri", UriFrameSource::builder("c", "")),
        ("uri", UriFrameSource::builder("c", "ftp://127.0.0.1/x.mp4")),
        ("uri", UriFrameSource::builder("c", "rtsp://")),
        ("uri", UriFrameSource::builder("c", "http://:80/x.m3u8")),
        ("uri", UriFrameSource::builder("c", "/no/such/file.mp4")),
        (
            "uri",
            UriFrameSource::builder("c", "file:///no/such/file.mp4"),
        ),
        ("uri", UriFrameSource::builder("c", dir.0.to_str().unwrap())),
        (
            "rtsp_latency",
            rtsp_source("rtsp://127.0.0.1/x").rtsp_latency(Duration::from_secs(11)),
        ),
        (
            "stall_timeout",
            rtsp_source("rtsp://127.0.0.1/x").stall_timeout(Duration::ZERO),
        ),
        (
            "pixel_format",
            rtsp_source("rtsp://127.0.0.1/x").pixel_format(PixelFormat::Jpeg { quality: 0 }),
        ),
        (
            "pixel_format",
            rtsp_source("rtsp://127.0.0.1/x").pixel_format(PixelFormat::Jpeg { quality: 101 }),
        ),
        ("resize", rtsp_source("rtsp://127.0.0.1/x").resize(641, 480)),
        (
            "target_fps",
            rtsp_source("rtsp://127.0.0.1/x").target_fps(0.0),
        ),
        (
            "queue_capacity",
            rtsp_source("rtsp://127.0.0.1/x").queue_capacity(0),
        ),
        (
            "decoder_threads",
            rtsp_source("rtsp://127.0.0.1/x").decoder_threads(kvs_frames::DecoderThreads::Fixed(0)),
        ),
        (
            "decoder_threads",
            rtsp_source("rtsp://127.0.0.1/x")
                .decoder_threads(kvs_frames::DecoderThreads::Fixed(65)),
        ),
        (
            "backoff.initial",
            rtsp_source("rtsp://127.0.0.1/x")
                .backoff(BackoffPolicy::default().initial(Duration::ZERO)),
        ),
    ];
    for (option, builder) in cases {
        let err = builder.build().expect_err(option);
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{option}: {err}");
        assert_eq!(err.invalid_option(), Some(option), "{err}");
        assert!(err.to_string().contains(option), "{err}");
    }
    let err = "jpeg:0".parse::<PixelFormat>().unwrap_err();
    assert_eq!(err.invalid_option(), Some("pixel_format"));
    let err = "opencl".parse::<kvs_frames::ColorConversion>().unwrap_err();
    assert_eq!(err.invalid_option(), Some("color_conversion"));
    assert!(err.to_string().contains("opencl"), "{err}");

    // A file that is not video: a fatal UnsupportedMedia error ends the iterator.
    let text = dir.path("notes.mp4");
    std::fs::write(
        &text,
        "these are not the frames you are looking for\n".repeat(100),
    )
    .unwrap();
    let source = UriFrameSource::builder("c", text.to_str().unwrap())
        .build()
        .unwrap();
    let err = first_error(&source, Duration::from_secs(10));
    assert_eq!(err.kind(), ErrorKind::UnsupportedMedia, "{err}");
    assert_eq!(source.state(), SourceState::Error);
    assert!(source.frames().next().is_none());

    // Nobody listening: Network errors, retried, until max_consecutive_errors.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let source = rtsp_source(&format!("rtsp://127.0.0.1:{port}/none"))
        .backoff(quick_backoff().max_consecutive_errors(Some(2)))
        .build()
        .unwrap();
    let err = first_error(&source, Duration::from_secs(20));
    assert_eq!(err.kind(), ErrorKind::Network, "{err}");
    assert!(err.to_string().contains("giving up after 2"), "{err}");
    let stats = source.stats();
    assert_eq!((stats.reconnects, stats.read_errors), (1, 2), "{stats:?}");
    assert_eq!(source.state(), SourceState::Error);
}

/// Captured log output (the whole process: nextest runs each test in its own process).
#[derive(Clone, Default)]
struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn rtsp_credentials_are_redacted_everywhere() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("kvs_frames=trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    const PASSWORD: &str = "Sup3r-s3cret";
    let server = rtsp::RtspServer::builder()
        .credentials("admin", PASSWORD)
        .start()
        .unwrap();
    let url = server.url_with_credentials();
    assert!(url.contains(PASSWORD));
    let builder = rtsp_source(&url).backoff(quick_backoff().max_consecutive_errors(Some(1)));
    let builder_debug = format!("{builder:?}");
    let source = builder.build().unwrap();
    let frames = take(&source, 10, Duration::from_secs(10));
    assert!(frames.iter().all(|f| f.width() == 320));
    assert_eq!(
        source.uri(),
        format!("rtsp://admin:***@127.0.0.1:{}/test", server.port())
    );
    let debug = format!(
        "{builder_debug} {source:?} {:?} {:?}",
        source.stats(),
        frames[0]
    );
    source.stop();

    // A wrong password is a fatal NotAuthorized error, without the password.
    let wrong = url.replace(PASSWORD, "Wr0ng-s3cret");
    let source = rtsp_source(&wrong)
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let err = first_error(&source, Duration::from_secs(10));
    assert_eq!(err.kind(), ErrorKind::NotAuthorized, "{err}");
    assert_eq!(source.state(), SourceState::Error);
    let error_text = format!("{err} {err:?} {:?}", source.stats());
    assert!(error_text.contains("admin:***@"), "{error_text}");

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("admin:***@"),
        "the URL was logged, redacted: {logs}"
    );
    for output in [&logs, &debug, &error_text] {
        assert!(!output.contains(PASSWORD), "password leaked:\n{output}");
        assert!(
            !output.contains("Wr0ng-s3cret"),
            "password leaked:\n{output}"
        );
    }
}

#[test]
fn metrics_carry_the_kvs_names_and_the_camera_label() {
    let dir = Scratch::new("metrics");
    let path = dir.path("clip.mp4");
    make_mp4(&path, 30, 10);
    let registry = kvs_frames::prometheus::Registry::new();
    let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry).unwrap();
    let source = UriFrameSource::builder("lobby", path.to_str().unwrap())
        .metrics(metrics)
        .target_fps(12.5)
        .build()
        .unwrap();
    assert_eq!(drain(&source).len(), 15);
    let text = kvs_frames::metrics::encode_text(&registry).unwrap();
    for line in [
        "kvs_hls_frames_total{camera_id=\"lobby\"} 15",
        "kvs_hls_frames_dropped_total{camera_id=\"lobby\",reason=\"target_fps\"} 15",
        "kvs_hls_connection_state{camera_id=\"lobby\"} 0",
        "kvs_hls_reconnects_total{camera_id=\"lobby\"} 0",
        "kvs_hls_read_errors_total{camera_id=\"lobby\"} 0",
    ] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    // Without producer time the last-frame gauge holds the emit time (staleness alerts work).
    let gauge: f64 = text
        .lines()
        .find(|l| l.starts_with("kvs_hls_last_frame_timestamp{camera_id=\"lobby\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - gauge).abs() < 60.0, "{gauge} vs {now}");
}

#[test]
fn async_stream_gives_the_same_frames_and_latest_only_keeps_the_newest() {
    let dir = Scratch::new("async");
    let path = dir.path("clip.mp4");
    make_mp4(&path, 25, 10);
    let file = path.to_str().unwrap().to_owned();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let pts: Vec<Duration> = runtime.block_on(async move {
        use futures_util::StreamExt;
        let source = UriFrameSource::builder("file-cam", &file)
            .pixel_format(PixelFormat::I420)
            .build()
            .unwrap();
        let mut stream = source.stream();
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let (frame, _) = item.unwrap();
            assert_eq!(frame.n_planes(), 3);
            out.push(frame.pts().unwrap());
        }
        out
    });
    assert_eq!(
        pts,
        (0..25)
            .map(|i| Duration::from_millis(40 * i))
            .collect::<Vec<_>>()
    );

    // A reader that is not reading: LatestOnly keeps one frame, the last, and counts the rest.
    let source = UriFrameSource::builder("file-cam", path.to_str().unwrap())
        .delivery(DeliveryPolicy::LatestOnly)
        .build()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while source.state() != SourceState::Disconnected {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    let frames = drain(&source);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].pts(), Some(Duration::from_millis(40 * 24)));
    assert_eq!(source.stats().frames_dropped_queue_full, 24);
}

#[test]
fn an_rtsp_source_never_gives_up_on_a_long_outage_by_default() {
    let server = rtsp::RtspServer::start();
    let port = server.port();
    // The default policy, only faster: no explicit max_consecutive_errors.
    let backoff = BackoffPolicy::default()
        .initial(Duration::from_millis(200))
        .max(Duration::from_millis(400))
        .jitter(Jitter::Fixed(1.0));
    let source = rtsp_source(&server.url()).backoff(backoff).build().unwrap();
    take(&source, 10, Duration::from_secs(10));
    server.stop();
    let mut frames = source.frames();
    let deadline = Instant::now() + Duration::from_secs(60);
    while source.stats().consecutive_errors < 15 {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        if let Some(Err(e)) = frames.next_timeout(Duration::from_millis(100)) {
            panic!("the source gave up: {e}");
        }
    }
    let stats = source.stats();
    assert_eq!(stats.state, SourceState::Reconnecting, "{stats:?}");
    assert!(!source.is_healthy());
    assert!(stats.reconnecting_since.is_some(), "{stats:?}");
    let _server = rtsp::RtspServer::builder()
        .port(port)
        .start_retrying(Duration::from_secs(10))
        .unwrap();
    take(&source, 15, Duration::from_secs(15));
    let stats = source.stats();
    assert_eq!(stats.state, SourceState::Connected);
    assert_eq!(stats.consecutive_errors, 0);
    assert_eq!(stats.reconnecting_since, None);
}

#[test]
fn the_iterator_ends_when_the_runtime_of_the_control_task_shuts_down() {
    let server = rtsp::RtspServer::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let source = rtsp_source(&server.url())
        .runtime(runtime.handle().clone())
        .build()
        .unwrap();
    take(&source, 10, Duration::from_secs(10));
    runtime.shutdown_timeout(Duration::from_secs(1));
    let error = first_error(&source, Duration::from_secs(5));
    assert_eq!(error.kind(), ErrorKind::Internal, "{error}");
    assert!(
        source
            .frames()
            .next_timeout(Duration::from_secs(1))
            .is_none()
    );
    assert_eq!(source.state(), SourceState::Error);
}

#[path = "common/blackhole.rs"]
mod blackhole;

/// Builds a source twice, waits each time until `ready`, then ends the first with `stop()` and
/// the second by dropping it: both return within 1 s.
fn assert_stops_fast(
    what: &str,
    build: impl Fn() -> UriFrameSource,
    ready: impl Fn(&UriFrameSource) -> bool,
) {
    for how in ["stop", "drop"] {
        let source = build();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(&source) {
            assert!(
                Instant::now() < deadline,
                "{what}: the state was not reached: {:?}",
                source.stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = Instant::now();
        if how == "stop" {
            source.stop();
            assert!(
                source.frames().next().is_none(),
                "{what}: the iterator ends"
            );
        } else {
            drop(source);
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{what}: {how} took {took:?}");
    }
}

#[test]
fn stop_and_drop_return_within_a_second_in_every_state() {
    let server = rtsp::RtspServer::start();
    // Connecting to a camera that accepts the connection and never answers.
    let hole = blackhole::Blackhole::start();
    let hole_url = format!("rtsp://127.0.0.1:{}/test", hole.port);
    assert_stops_fast(
        "connecting",
        || rtsp_source(&hole_url).build().unwrap(),
        |_| hole.accepted() > 0,
    );
    // Waiting out a 60 s backoff.
    let refused = {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        format!(
            "rtsp://127.0.0.1:{}/test",
            listener.local_addr().unwrap().port()
        )
    };
    let slow = BackoffPolicy::default()
        .initial(Duration::from_secs(60))
        .jitter(Jitter::Fixed(1.0));
    assert_stops_fast(
        "backoff",
        || rtsp_source(&refused).backoff(slow.clone()).build().unwrap(),
        |s| s.state() == SourceState::Reconnecting,
    );
    // A connection that hangs with the session open.
    let proxy = Proxy::start(server.port());
    let proxied = format!("rtsp://127.0.0.1:{}/test", proxy.port);
    assert_stops_fast(
        "stalled connection",
        || {
            let s = rtsp_source(&proxied)
                .stall_timeout(Duration::from_secs(120))
                .build()
                .unwrap();
            take(&s, 3, Duration::from_secs(10));
            proxy.freeze_existing();
            s
        },
        |_| true,
    );
    // A reader that does not read: the streaming thread is blocked on the full queue.
    assert_stops_fast(
        "blocked reader",
        || {
            rtsp_source(&server.url())
                .delivery(DeliveryPolicy::Block)
                .queue_capacity(1)
                .build()
                .unwrap()
        },
        |s| s.stats().queue_len >= 1,
    );
}
