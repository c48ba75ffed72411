//! Helpers shared by the integration tests: emulator streams, AWS SDK clients pointed at the
//! emulator, raw HTTP, and a real GStreamer decoder that reads each frame's barcode.
#![allow(dead_code)]

pub mod blackhole;
pub mod frames;
pub mod rtsp;

use std::time::Duration;

use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia::types::{
    HlsDiscontinuityMode, HlsDisplayFragmentTimestamp, HlsFragmentSelector,
    HlsFragmentSelectorType, HlsPlaybackMode, HlsTimestampRange,
};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use kvs_emulator::{Emulator, StreamSpec, barcode};

/// A small, cheap stream: 320x240, 25 fps, 1 s fragments.
pub fn small(name: &str) -> StreamSpec {
    StreamSpec::new(name)
        .resolution(320, 240)
        .fps(25)
        .fragment_duration(Duration::from_secs(1))
        .bitrate_kbps(300)
}

/// An emulator with `specs`, started once every camera has its first fragment.
pub fn start(specs: Vec<StreamSpec>) -> Emulator {
    start_with(specs, true)
}

/// Like [`start`], but returned before the cameras' first fragments: a stream whose camera has
/// not sent anything yet.
pub fn start_cold(specs: Vec<StreamSpec>) -> Emulator {
    start_with(specs, false)
}

fn start_with(specs: Vec<StreamSpec>, wait_for_cameras: bool) -> Emulator {
    let mut builder = Emulator::builder().wait_for_cameras(wait_for_cameras);
    for spec in specs {
        builder = builder.stream(spec);
    }
    builder.start().expect("emulator starts")
}

pub fn control(emulator: &Emulator) -> aws_sdk_kinesisvideo::Client {
    aws_sdk_kinesisvideo::Client::new(&emulator.sdk_config())
}

/// The stream's data endpoint for `api` (GetDataEndpoint).
pub async fn data_endpoint(emulator: &Emulator, stream: &str, api: ApiName) -> String {
    control(emulator)
        .get_data_endpoint()
        .stream_name(stream)
        .api_name(api)
        .send()
        .await
        .expect("GetDataEndpoint")
        .data_endpoint()
        .expect("DataEndpoint")
        .to_owned()
}

/// The archived-media client built the way AWS documents: at the stream's data endpoint.
pub async fn media(emulator: &Emulator, stream: &str) -> aws_sdk_kinesisvideoarchivedmedia::Client {
    let endpoint = data_endpoint(emulator, stream, ApiName::GetHlsStreamingSessionUrl).await;
    let config = aws_sdk_kinesisvideoarchivedmedia::config::Builder::from(&emulator.sdk_config())
        .endpoint_url(endpoint)
        .build();
    aws_sdk_kinesisvideoarchivedmedia::Client::from_conf(config)
}

/// Session parameters for tests.
#[derive(Clone, Debug)]
pub struct SessionParams {
    pub mode: HlsPlaybackMode,
    pub selector: HlsFragmentSelectorType,
    pub range: Option<(
        aws_smithy_types::DateTime,
        Option<aws_smithy_types::DateTime>,
    )>,
    pub discontinuity: Option<HlsDiscontinuityMode>,
    pub display: bool,
    pub max_results: Option<i64>,
    pub expires: Option<i32>,
    pub container: Option<aws_sdk_kinesisvideoarchivedmedia::types::ContainerFormat>,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            mode: HlsPlaybackMode::Live,
            selector: HlsFragmentSelectorType::ProducerTimestamp,
            range: None,
            discontinuity: None,
            display: true,
            max_results: None,
            expires: None,
            container: None,
        }
    }
}

pub fn dt(t: std::time::SystemTime) -> aws_smithy_types::DateTime {
    aws_smithy_types::DateTime::from(t)
}

pub async fn session(
    client: &aws_sdk_kinesisvideoarchivedmedia::Client,
    stream: &str,
    p: &SessionParams,
) -> Result<
    String,
    aws_sdk_kinesisvideoarchivedmedia::error::SdkError<
        aws_sdk_kinesisvideoarchivedmedia::operation::get_hls_streaming_session_url::GetHLSStreamingSessionURLError,
    >,
>{
    let mut selector = HlsFragmentSelector::builder().fragment_selector_type(p.selector.clone());
    if let Some((start, end)) = &p.range {
        let mut range = HlsTimestampRange::builder().start_timestamp(*start);
        if let Some(end) = end {
            range = range.end_timestamp(*end);
        }
        selector = selector.timestamp_range(range.build());
    }
    let mut request = client
        .get_hls_streaming_session_url()
        .stream_name(stream)
        .playback_mode(p.mode.clone())
        .hls_fragment_selector(selector.build())
        .display_fragment_timestamp(if p.display {
            HlsDisplayFragmentTimestamp::Always
        } else {
            HlsDisplayFragmentTimestamp::Never
        });
    if let Some(mode) = &p.discontinuity {
        request = request.discontinuity_mode(mode.clone());
    }
    if let Some(max) = p.max_results {
        request = request.max_media_playlist_fragment_results(max);
    }
    if let Some(expires) = p.expires {
        request = request.expires(expires);
    }
    if let Some(container) = &p.container {
        request = request.container_format(container.clone());
    }
    let out = request.send().await?;
    Ok(out.hls_streaming_session_url().expect("URL").to_owned())
}

pub struct HttpResponse {
    pub status: u16,
    pub error_type: Option<String>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub async fn get(url: &str) -> Result<HttpResponse, reqwest::Error> {
    let response = reqwest::get(url).await?;
    let status = response.status().as_u16();
    let error_type = response
        .headers()
        .get("x-amzn-ErrorType")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.bytes().await?.to_vec();
    Ok(HttpResponse {
        status,
        error_type,
        body,
    })
}

/// Resolves a playlist-relative URI against the URL of the playlist.
pub fn resolve(base: &str, relative: &str) -> String {
    url::Url::parse(base)
        .and_then(|b| b.join(relative))
        .expect("valid URL")
        .to_string()
}

pub fn parse_media(text: &str) -> m3u8_rs::MediaPlaylist {
    match m3u8_rs::parse_playlist_res(text.as_bytes()) {
        Ok(m3u8_rs::Playlist::MediaPlaylist(p)) => p,
        other => panic!("not a media playlist: {other:?}\n{text}"),
    }
}

pub fn parse_master(text: &str) -> m3u8_rs::MasterPlaylist {
    match m3u8_rs::parse_playlist_res(text.as_bytes()) {
        Ok(m3u8_rs::Playlist::MasterPlaylist(p)) => p,
        other => panic!("not a master playlist: {other:?}\n{text}"),
    }
}

/// Master URL → media playlist URL.
pub async fn media_playlist_url(master_url: &str) -> String {
    let master = get(master_url).await.expect("master GET");
    assert_eq!(master.status, 200, "master playlist: {}", master.text());
    let parsed = parse_master(&master.text());
    resolve(master_url, &parsed.variants[0].uri)
}

/// One decoded frame.
#[derive(Clone, Debug)]
pub struct Decoded {
    pub frame_number: Option<u32>,
    pub width: u32,
    pub height: u32,
    pub pts: Option<gst::ClockTime>,
}

/// Decodes MP4 bytes (a progressive file, or init + fMP4 fragments; H.264 or H.265) with
/// `appsrc ! decodebin (qtdemux, parser, avdec_*) ! videoconvert ! GRAY8 appsink`, reading the
/// barcode of every frame.
pub fn decode_mp4(data: &[u8]) -> Vec<Decoded> {
    gst::init().expect("gst init");
    let pipeline = gst::parse::launch(
        "appsrc name=src format=bytes ! decodebin ! videoconvert ! \
         video/x-raw,format=GRAY8 ! appsink name=sink sync=false",
    )
    .expect("pipeline")
    .downcast::<gst::Pipeline>()
    .expect("pipeline type");
    let src = pipeline
        .by_name("src")
        .expect("src")
        .downcast::<gst_app::AppSrc>()
        .expect("appsrc");
    let sink = pipeline
        .by_name("sink")
        .expect("sink")
        .downcast::<gst_app::AppSink>()
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("playing");
    src.push_buffer(gst::Buffer::from_slice(data.to_vec()))
        .expect("push");
    src.end_of_stream().expect("eos");
    let mut frames = Vec::new();
    loop {
        let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(20)) else {
            break;
        };
        let caps = sample.caps().expect("caps");
        let info = gstreamer_video::VideoInfo::from_caps(caps).expect("video info");
        let buffer = sample.buffer().expect("buffer");
        let map = buffer.map_readable().expect("map");
        let number = barcode::read_gray8(
            map.as_slice(),
            info.stride()[0] as usize,
            info.width() as usize,
            info.height() as usize,
        );
        frames.push(Decoded {
            frame_number: number,
            width: info.width(),
            height: info.height(),
            pts: buffer.pts(),
        });
    }
    let bus = pipeline.bus().expect("bus");
    if let Some(msg) = bus.pop_filtered(&[gst::MessageType::Error])
        && let gst::MessageView::Error(err) = msg.view()
    {
        panic!("decode error: {} ({:?})", err.error(), err.debug());
    }
    pipeline.set_state(gst::State::Null).expect("null");
    frames
}

/// Waits (without blocking the runtime) until the stream has `count` fragments.
pub async fn wait_fragments(emulator: &Emulator, stream: &str, count: usize, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while emulator.ground_truth(stream).len() < count {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream {stream} did not publish {count} fragments within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
