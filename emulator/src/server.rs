//! The HTTP server: routes and its own runtime thread, so that the emulator works the same from
//! synchronous code, from `#[tokio::test]` and from inside another runtime.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::sync::oneshot;

use super::store::State;
use super::{control, fragments, hls, media};
use crate::error::{Error, ErrorKind, Result};

/// Paths of the archived-media API and HLS, served at the data endpoint only.
const DATA_PATHS: [&str; 9] = [
    "/getHLSStreamingSessionURL",
    "/getMedia",
    "/getClip",
    "/listFragments",
    "/hls/v1/getHLSMasterPlaylist.m3u8",
    "/hls/v1/getHLSMediaPlaylist.m3u8",
    "/hls/v1/getMP4InitFragment.mp4",
    "/hls/v1/getMP4MediaFragment.mp4",
    "/hls/v1/getTSFragment.ts",
];

/// The answer for a request at the wrong endpoint, or for an operation the emulator lacks.
async fn unknown(uri: axum::http::Uri) -> super::http::KvsError {
    let path = uri.path();
    let message = if DATA_PATHS.contains(&path) {
        format!(
            "{path} is served at the stream's data endpoint (GetDataEndpoint), not at the control plane"
        )
    } else if matches!(
        path,
        "/listStreams" | "/describeStream" | "/getDataEndpoint" | "/createStream" | "/deleteStream"
    ) {
        format!("{path} is a control plane operation, not served at the data endpoint")
    } else {
        "The kvs-frames emulator does not implement this operation".to_owned()
    };
    super::http::KvsError::new(
        axum::http::StatusCode::NOT_FOUND,
        "UnknownOperationException",
        message,
    )
}

/// The control plane, as at `kinesisvideo.<region>.amazonaws.com`.
fn control_router(state: Arc<State>) -> Router {
    Router::new()
        .route("/listStreams", post(control::list_streams))
        .route("/describeStream", post(control::describe_stream))
        .route("/getDataEndpoint", post(control::get_data_endpoint))
        .route("/createStream", post(control::create_stream))
        .route("/deleteStream", post(control::delete_stream))
        .fallback(unknown)
        .with_state(state)
}

/// The data endpoint (GetDataEndpoint's answer): archived media and HLS.
fn data_router(state: Arc<State>) -> Router {
    Router::new()
        .route(
            "/getHLSStreamingSessionURL",
            post(hls::get_hls_streaming_session_url),
        )
        .route("/getClip", post(hls::get_clip))
        .route("/getMedia", post(media::get_media))
        .route("/listFragments", post(fragments::list_fragments))
        .route("/hls/v1/getHLSMasterPlaylist.m3u8", get(hls::master))
        .route("/hls/v1/getHLSMediaPlaylist.m3u8", get(hls::media))
        .route("/hls/v1/getMP4InitFragment.mp4", get(hls::init))
        .route("/hls/v1/getMP4MediaFragment.mp4", get(hls::fragment))
        .route("/hls/v1/getTSFragment.ts", get(hls::ts_fragment))
        .fallback(unknown)
        .with_state(state)
}

/// The server thread and the means to stop it.
pub(crate) struct Server {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves the control plane on `listener` and the data endpoint on `data_listener`.
    pub fn start(
        listener: std::net::TcpListener,
        data_listener: std::net::TcpListener,
        state: Arc<State>,
    ) -> Result<Server> {
        for l in [&listener, &data_listener] {
            l.set_nonblocking(true).map_err(|e| {
                Error::new(ErrorKind::Io, format!("cannot configure the listener: {e}"))
            })?;
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvs-emulator")
            .enable_all()
            .build()
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("cannot start the emulator runtime: {e}"),
                )
            })?;
        let (shutdown, stop) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("kvs-emulator-server".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let listeners = tokio::net::TcpListener::from_std(listener).and_then(|c| {
                        tokio::net::TcpListener::from_std(data_listener).map(|d| (c, d))
                    });
                    let (listener, data_listener) = match listeners {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(Error::new(
                                ErrorKind::Io,
                                format!("cannot use the listener: {e}"),
                            )));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let control = axum::serve(listener, control_router(Arc::clone(&state)));
                    let data = axum::serve(data_listener, data_router(state));
                    tokio::select! {
                        result = control => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "emulator server failed");
                            }
                        }
                        result = data => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "emulator data endpoint failed");
                            }
                        }
                        _ = stop => {}
                    }
                });
                // Connections still open (e.g. a stalled download) are dropped here.
                runtime.shutdown_timeout(Duration::from_millis(200));
            })
            .map_err(|e| {
                Error::new(
                    ErrorKind::Io,
                    format!("cannot start the emulator thread: {e}"),
                )
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Server {
                shutdown: Some(shutdown),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(Error::new(
                ErrorKind::Internal,
                "the emulator thread ended at start",
            )),
        }
    }

    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop_inner();
    }
}
