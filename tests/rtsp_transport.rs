//! RTSP transports against a camera that offers RTP over UDP only: `Udp` and `Auto` deliver
//! frames, and `Tcp` gets none (so the UDP result cannot have come through TCP).

mod common;

use std::time::Duration;

use common::rtsp;
use kvs_frames::backoff::{BackoffPolicy, Jitter};
use kvs_frames::{PixelFormat, RtspTransport, UriFrameSource};

fn source(url: &str, transport: RtspTransport) -> UriFrameSource {
    UriFrameSource::builder("udp-cam", url)
        .pixel_format(PixelFormat::Gray8)
        .rtsp_transport(transport)
        .rtsp_latency(Duration::from_millis(100))
        .backoff(
            BackoffPolicy::default()
                .initial(Duration::from_millis(300))
                .max(Duration::from_secs(1))
                .jitter(Jitter::Fixed(1.0)),
        )
        .build()
        .unwrap()
}

#[test]
fn a_udp_only_camera_is_read_over_udp_and_auto_and_refuses_tcp() {
    let server = rtsp::RtspServer::builder().udp_only().start().unwrap();
    for transport in [RtspTransport::Udp, RtspTransport::Auto] {
        let s = source(&server.url(), transport);
        let frames =
            common::frames::take_frames(s.frames(), 20, Duration::from_secs(15), || s.stats());
        assert!(frames.iter().all(|f| f.width() == 320), "{transport:?}");
        assert_eq!(s.stats().reconnects, 0, "{transport:?}: {:?}", s.stats());
    }

    // TCP only: the server refuses the transport: no frame, and the failure is reported.
    let s = source(&server.url(), RtspTransport::Tcp);
    let mut frames = s.frames();
    let deadline = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < deadline {
        if let Some(item) = frames.next_timeout(Duration::from_millis(200)) {
            assert!(item.is_err(), "a frame over TCP from a UDP-only mount");
        }
        if s.stats().last_error.is_some() {
            break;
        }
    }
    let stats = s.stats();
    assert_eq!(stats.frames_delivered, 0, "{stats:?}");
    assert!(stats.last_error.is_some(), "{stats:?}");
}
