//! A real RTSP server on 127.0.0.1 for tests and examples: gst-rtsp-server serving a live H.264
//! test pattern,
//!
//! ```text
//! videotestsrc is-live=true ! video/x-raw,WxH@fps ! x264enc tune=zerolatency ! rtph264pay name=pay0
//! ```
//!
//! at `rtsp://127.0.0.1:{port}/test`, optionally behind basic authentication. The server runs
//! its own GLib main loop on a thread; [`RtspServer::stop`] (or drop) disconnects every client
//! and closes the listening socket, so a test can take a camera away and bring it back on the
//! same port with [`RtspServerBuilder::port`].
//!
//! Include it with `mod common;` (as `common::rtsp`) or on its own with
//! `#[path = "common/rtsp.rs"] mod rtsp;`.
#![allow(dead_code)]

use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use gstreamer as gst;
use gstreamer::glib;
use gstreamer_rtsp_server as rtsp_server;
use gstreamer_rtsp_server::prelude::*;

/// Options of the test server.
#[derive(Clone, Debug)]
pub struct RtspServerBuilder {
    port: u16,
    path: String,
    width: u32,
    height: u32,
    fps: u32,
    key_int: u32,
    credentials: Option<(String, String)>,
    udp_only: bool,
    encoder: Encoder,
    audio: bool,
}

/// What the test camera sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Encoder {
    /// H.264 without B-frames (x264enc zerolatency).
    #[default]
    H264,
    /// H.264 with 2 B-frames between reference frames.
    H264BFrames,
    /// H.265 (x265enc zerolatency, rtph265pay).
    H265,
}

impl Default for RtspServerBuilder {
    fn default() -> Self {
        RtspServerBuilder {
            port: 0,
            path: "/test".to_owned(),
            width: 320,
            height: 240,
            fps: 15,
            key_int: 15,
            credentials: None,
            udp_only: false,
            audio: false,
            encoder: Encoder::H264,
        }
    }
}

impl RtspServerBuilder {
    /// The port; 0 (default) picks a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }

    /// The mount path (default `/test`).
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.to_owned();
        self
    }

    /// Frame size and rate (default 320x240 at 15 fps).
    pub fn video(mut self, width: u32, height: u32, fps: u32) -> Self {
        self.width = width;
        self.height = height;
        self.fps = fps;
        self
    }

    /// Frames between key frames (default 15).
    pub fn key_int(mut self, frames: u32) -> Self {
        self.key_int = frames;
        self
    }

    /// Requires basic authentication with these credentials.
    pub fn credentials(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.to_owned(), password.to_owned()));
        self
    }

    /// The codec (default H.264 without B-frames).
    pub fn encoder(mut self, encoder: Encoder) -> Self {
        self.encoder = encoder;
        self
    }

    /// Sends G.711 A-law audio as a second stream (`pay1`), as most IP cameras do.
    pub fn audio(mut self) -> Self {
        self.audio = true;
        self
    }

    /// Serves the mount over UDP only (a TCP SETUP gets 461 Unsupported Transport).
    pub fn udp_only(mut self) -> Self {
        self.udp_only = true;
        self
    }

    /// Starts the server; fails when the port cannot be bound.
    pub fn start(self) -> Result<RtspServer, String> {
        gst::init().map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel::<Result<(u16, glib::MainLoop), String>>();
        let options = self.clone();
        let thread = std::thread::Builder::new()
            .name("test-rtsp-server".to_owned())
            .spawn(move || serve(options, tx))
            .map_err(|e| e.to_string())?;
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(Ok((port, main_loop))) => Ok(RtspServer {
                port,
                path: self.path,
                credentials: self.credentials,
                main_loop,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(e) => Err(format!("RTSP server did not start: {e}")),
        }
    }

    /// Starts the server, retrying for up to `timeout` while the port is still taken (a port
    /// just released by a stopped server).
    pub fn start_retrying(self, timeout: Duration) -> Result<RtspServer, String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            match self.clone().start() {
                Ok(server) => return Ok(server),
                Err(e) if std::time::Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

fn serve(options: RtspServerBuilder, tx: mpsc::Sender<Result<(u16, glib::MainLoop), String>>) {
    let context = glib::MainContext::new();
    let main_loop = glib::MainLoop::new(Some(&context), false);
    let server = rtsp_server::RTSPServer::new();
    server.set_address("127.0.0.1");
    server.set_service(&options.port.to_string());
    let Some(mounts) = server.mount_points() else {
        let _ = tx.send(Err("no mount points".to_owned()));
        return;
    };
    let factory = rtsp_server::RTSPMediaFactory::new();
    let k = options.key_int;
    let encode = match options.encoder {
        Encoder::H264 => format!(
            "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={k} bitrate=300 \
             ! rtph264pay name=pay0 pt=96 config-interval=1"
        ),
        Encoder::H264BFrames => format!(
            "x264enc speed-preset=ultrafast bframes=2 b-adapt=false key-int-max={k} bitrate=300 \
             ! rtph264pay name=pay0 pt=96 config-interval=1"
        ),
        Encoder::H265 => format!(
            "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={k} bitrate=300 \
             ! rtph265pay name=pay0 pt=96 config-interval=1"
        ),
    };
    let audio = if options.audio {
        " audiotestsrc is-live=true wave=ticks ! audio/x-raw,rate=8000,channels=1 ! alawenc \
         ! rtppcmapay name=pay1 pt=8"
    } else {
        ""
    };
    factory.set_launch(&format!(
        "( videotestsrc is-live=true pattern=ball ! video/x-raw,width={},height={},framerate={}/1 \
         ! {encode}{audio} )",
        options.width, options.height, options.fps
    ));
    // One encoder for every client.
    factory.set_shared(true);
    if options.udp_only {
        factory.set_protocols(
            rtsp_server::gst_rtsp::RTSPLowerTrans::UDP
                | rtsp_server::gst_rtsp::RTSPLowerTrans::UDP_MCAST,
        );
    }
    if let Some((user, password)) = &options.credentials {
        let auth = rtsp_server::RTSPAuth::new();
        let token = rtsp_server::RTSPToken::builder()
            .field(rtsp_server::RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
            .build();
        let basic = rtsp_server::RTSPAuth::make_basic(user, password);
        auth.add_basic(basic.as_str(), &token);
        server.set_auth(Some(&auth));
        factory.add_role_from_structure(
            &gst::Structure::builder("user")
                .field(rtsp_server::RTSP_PERM_MEDIA_FACTORY_ACCESS, true)
                .field(rtsp_server::RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, true)
                .build(),
        );
    }
    mounts.add_factory(&options.path, factory);
    let source = match server.attach(Some(&context)) {
        Ok(source) => source,
        Err(e) => {
            let _ = tx.send(Err(format!(
                "cannot listen on 127.0.0.1:{}: {e}",
                options.port
            )));
            return;
        }
    };
    let port = u16::try_from(server.bound_port()).unwrap_or(0);
    if tx.send(Ok((port, main_loop.clone()))).is_err() {
        return;
    }
    main_loop.run();
    // Stop: disconnect every client and close the listening socket.
    server.client_filter(Some(&mut |_, _| rtsp_server::RTSPFilterResult::Remove));
    // The source belongs to our context (`SourceId::remove` would look in the global one).
    if let Some(source) = context.find_source_by_id(&source) {
        source.destroy();
    }
    while context.iteration(false) {}
}

/// A running test RTSP server.
pub struct RtspServer {
    port: u16,
    path: String,
    credentials: Option<(String, String)>,
    main_loop: glib::MainLoop,
    thread: Option<JoinHandle<()>>,
}

impl RtspServer {
    /// The options, with their defaults.
    pub fn builder() -> RtspServerBuilder {
        RtspServerBuilder::default()
    }

    /// A server with the defaults on a free port.
    pub fn start() -> RtspServer {
        Self::builder().start().expect("test RTSP server starts")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rtsp://127.0.0.1:{port}{path}`, without credentials.
    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}{}", self.port, self.path)
    }

    /// The URL with the configured credentials (as [`url`](Self::url) when there are none).
    pub fn url_with_credentials(&self) -> String {
        match &self.credentials {
            Some((user, password)) => {
                format!(
                    "rtsp://{user}:{password}@127.0.0.1:{}{}",
                    self.port, self.path
                )
            }
            None => self.url(),
        }
    }

    /// Disconnects every client and stops listening.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.main_loop.quit();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}
