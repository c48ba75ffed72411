//! The HTTP server: routes and its own runtime thread, so that the emulator works the same from
//! synchronous code, from `#[tokio::test]` and from inside another runtime.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use tokio::sync::oneshot;

use super::store::State;
use super::{control, fragments, hls};
use crate::error::{Error, ErrorKind, Result};

fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/listStreams", post(control::list_streams))
        .route("/describeStream", post(control::describe_stream))
        .route("/getDataEndpoint", post(control::get_data_endpoint))
        .route("/createStream", post(control::create_stream))
        .route("/deleteStream", post(control::delete_stream))
        .route(
            "/getHLSStreamingSessionURL",
            post(hls::get_hls_streaming_session_url),
        )
        .route("/getClip", post(hls::get_clip))
        .route("/listFragments", post(fragments::list_fragments))
        .route("/hls/v1/getHLSMasterPlaylist.m3u8", get(hls::master))
        .route("/hls/v1/getHLSMediaPlaylist.m3u8", get(hls::media))
        .route("/hls/v1/getMP4InitFragment.mp4", get(hls::init))
        .route("/hls/v1/getMP4MediaFragment.mp4", get(hls::fragment))
        .fallback(|| async {
            super::http::KvsError::new(
                axum::http::StatusCode::NOT_FOUND,
                "UnknownOperationException",
                "The kvs-frames emulator does not implement this operation",
            )
        })
        .with_state(state)
}

/// The server thread and the means to stop it.
pub(crate) struct Server {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    pub fn start(listener: std::net::TcpListener, state: Arc<State>) -> Result<Server> {
        listener.set_nonblocking(true).map_err(|e| {
            Error::new(ErrorKind::Io, format!("cannot configure the listener: {e}"))
        })?;
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
                    let listener = match tokio::net::TcpListener::from_std(listener) {
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
                    let serve = axum::serve(listener, router(state));
                    tokio::select! {
                        result = serve => {
                            if let Err(e) = result {
                                tracing::error!(error = %e, "emulator server failed");
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
