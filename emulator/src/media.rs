//! The media API's `GetMedia` (`POST /getMedia` at the `GET_MEDIA` data endpoint): one
//! long-lived chunked response of MKV, written frame by frame as the stream's camera encodes
//! them.
//!
//! What the emulator does, following the AWS API reference (GetMedia, StartSelector) and the KVS
//! quotas page:
//! - `StartSelector`: `NOW` (the fragment being ingested, from its key frame, else the next one),
//!   `EARLIEST`, `FRAGMENT_NUMBER` (the fragment *after* `AfterFragmentNumber`),
//!   `PRODUCER_TIMESTAMP` / `SERVER_TIMESTAMP` (the fragment that holds `StartTimestamp`, else the
//!   first after it), `CONTINUATION_TOKEN` (where the connection that wrote the token left off).
//! - Each fragment is one EBML document ([`crate::mkv`]): identity tags before the cluster,
//!   `AWS_KINESISVIDEO_MILLIS_BEHIND_NOW` and `AWS_KINESISVIDEO_CONTINUATION_TOKEN` after it.
//!   Archived fragments go out at once; the live one as its frames are encoded.
//! - Limits per stream: 5 calls per second (a sixth gets 400 `ClientLimitExceededException`),
//!   3 open connections (a fourth gets 400 `ConnectionLimitExceededException`).
//! - With nothing new to send for 3 s the response ends (KVS: "the payload read times out after
//!   about 3 s" when nothing is ingested).
//!
//! Undocumented by KVS, the emulator's choices: the continuation token is opaque
//! (`kvsemct.<hex>`), not a fragment number, so that a client that confuses the two is caught;
//! `NOW` starts with the fragment being ingested; an `AfterFragmentNumber` that is not one of the
//! stream's fragments gives `InvalidArgumentException`; the `Content-Type` is `video/webm`.
//!
//! Faults ([`Faults`](crate::Faults)): `cut_get_media_after` and `cut_get_media_connections`
//! (the response ends without its last chunk, mid-cluster), `get_media_lifetime` (ends cleanly after a time, wherever it is) and
//! `get_media_error` (an error chunk at the next fragment boundary, then the end).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::Response;
use serde::Deserialize;

use super::control::{resolve_stream, respond};
use super::http::{KvsError, from_epoch_seconds, insert_request_id};
use super::mkv::{self, FragmentTags};
use super::mp4::VideoTrack;
use super::store::{State, StoredFragment, StreamState};

/// GetMedia calls per second per stream (KVS quota).
pub(crate) const MAX_CALLS_PER_SECOND: usize = 5;
/// Open GetMedia connections per stream (KVS quota).
pub(crate) const MAX_CONNECTIONS: usize = 3;
/// How long a connection waits for something new before it ends.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(3);
/// Prefix of the emulator's continuation tokens.
const TOKEN_PREFIX: &str = "kvsemct.";

/// One frame of a fragment, as GetMedia writes it.
#[derive(Debug)]
pub(crate) struct LiveFrame {
    /// Presentation time from the fragment's start.
    pub offset: Duration,
    /// Key frame.
    pub key: bool,
    /// The access unit (AVCC / HVCC).
    pub data: bytes::Bytes,
}

/// The identity of a fragment being ingested (fixed at its first frame).
#[derive(Debug)]
pub(crate) struct LiveHeader {
    pub index: u64,
    pub fragment_number: String,
    pub producer_start: SystemTime,
    pub server_start: SystemTime,
    pub track: Arc<VideoTrack>,
}

/// The fragment the camera is encoding now.
#[derive(Debug)]
pub(crate) struct LiveFragment {
    /// The camera's counter of the fragment.
    pub camera_index: u64,
    /// `None` when the fragment is not ingested (the camera was offline at its first frame).
    pub header: Option<Arc<LiveHeader>>,
    /// Its frames so far, in decode order.
    pub frames: Vec<Arc<LiveFrame>>,
}

/// Per-stream GetMedia bookkeeping: limits and counters.
#[derive(Debug, Default)]
pub(crate) struct Limits {
    /// Connections open now.
    pub open: usize,
    /// The most connections open at once so far.
    pub max_open: usize,
    /// Accepted calls in the last second.
    pub calls: VecDeque<Instant>,
    /// Calls accepted.
    pub accepted: u64,
    /// Calls refused with `ConnectionLimitExceededException`.
    pub connection_limit_refusals: u64,
    /// Calls refused with `ClientLimitExceededException`.
    pub throttled: u64,
    /// Frames written, over every connection.
    pub frames_written: u64,
}

/// GetMedia counters of one stream (see [`Emulator::get_media_stats`](crate::Emulator::get_media_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GetMediaStats {
    /// Connections open now.
    pub open_connections: usize,
    /// The most connections that were open at the same time.
    pub max_concurrent_connections: usize,
    /// Calls that got a media stream.
    pub calls_accepted: u64,
    /// Calls refused because 3 connections were open (`ConnectionLimitExceededException`).
    pub connection_limit_refusals: u64,
    /// Calls refused because 5 had come in the last second (`ClientLimitExceededException`).
    pub throttled_calls: u64,
    /// Frames written, over every connection.
    pub frames_written: u64,
}

impl Limits {
    pub(crate) fn stats(&self) -> GetMediaStats {
        GetMediaStats {
            open_connections: self.open,
            max_concurrent_connections: self.max_open,
            calls_accepted: self.accepted,
            connection_limit_refusals: self.connection_limit_refusals,
            throttled_calls: self.throttled,
            frames_written: self.frames_written,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct GetMediaInput {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
    start_selector: Option<StartSelectorInput>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct StartSelectorInput {
    start_selector_type: Option<String>,
    after_fragment_number: Option<String>,
    start_timestamp: Option<f64>,
    continuation_token: Option<String>,
}

/// Where a connection starts.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Start {
    Now,
    Earliest,
    /// The fragment with this stream index.
    Index(u64),
    Producer(SystemTime),
    Server(SystemTime),
}

/// The continuation token for "go on at the fragment with index `next`".
pub(crate) fn continuation_token(next: u64) -> String {
    format!("{TOKEN_PREFIX}{next:x}")
}

fn parse_token(token: &str) -> Option<u64> {
    u64::from_str_radix(token.strip_prefix(TOKEN_PREFIX)?, 16).ok()
}

fn parse_selector(input: Option<StartSelectorInput>) -> Result<Start, KvsError> {
    let Some(s) = input else {
        return Err(KvsError::invalid_argument(
            "1 validation error detected: Value null at 'startSelector' failed to satisfy constraint: Member must not be null",
        ));
    };
    let kind = s.start_selector_type.unwrap_or_default();
    let time = |what: &str| -> Result<SystemTime, KvsError> {
        let v = s.start_timestamp.ok_or_else(|| {
            KvsError::invalid_argument(format!("StartSelectorType {what} needs a StartTimestamp"))
        })?;
        from_epoch_seconds(v)
            .ok_or_else(|| KvsError::invalid_argument(format!("StartTimestamp {v} is not valid")))
    };
    match kind.as_str() {
        "NOW" => Ok(Start::Now),
        "EARLIEST" => Ok(Start::Earliest),
        "PRODUCER_TIMESTAMP" => Ok(Start::Producer(time("PRODUCER_TIMESTAMP")?)),
        "SERVER_TIMESTAMP" => Ok(Start::Server(time("SERVER_TIMESTAMP")?)),
        "FRAGMENT_NUMBER" => {
            let n = s.after_fragment_number.unwrap_or_default();
            if n.is_empty() || n.len() > 128 || !n.bytes().all(|b| b.is_ascii_digit()) {
                return Err(KvsError::invalid_argument(format!(
                    "AfterFragmentNumber '{n}' is not valid: it must be 1-128 digits"
                )));
            }
            // The emulator's fragment numbers end with the index in 15 digits.
            let index = n
                .get(n.len().saturating_sub(15)..)
                .and_then(|tail| tail.parse::<u64>().ok())
                .ok_or_else(|| {
                    KvsError::invalid_argument(format!("AfterFragmentNumber '{n}' is not valid"))
                })?;
            Ok(Start::Index(index.saturating_add(1)))
        }
        "CONTINUATION_TOKEN" => {
            let t = s.continuation_token.unwrap_or_default();
            if t.is_empty()
                || t.len() > 128
                || !t
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
            {
                return Err(KvsError::invalid_argument(format!(
                    "ContinuationToken '{t}' is not valid: 1-128 characters of [a-zA-Z0-9_.-]"
                )));
            }
            parse_token(&t).map(Start::Index).ok_or_else(|| {
                KvsError::invalid_argument(format!("ContinuationToken '{t}' is not valid"))
            })
        }
        other => Err(KvsError::invalid_argument(format!(
            "StartSelectorType '{other}' is not valid: it must be one of FRAGMENT_NUMBER, SERVER_TIMESTAMP, PRODUCER_TIMESTAMP, NOW, EARLIEST, CONTINUATION_TOKEN"
        ))),
    }
}

/// The stream index of the first fragment to send.
fn first_index(stream: &StreamState, start: Start) -> u64 {
    let live = stream
        .live
        .as_ref()
        .and_then(|l| l.header.as_ref())
        .map(|h| h.index);
    let next = stream.next_index();
    match start {
        Start::Now => live.unwrap_or(next),
        Start::Earliest => stream
            .fragments
            .front()
            .map(|f| f.index)
            .or(live)
            .unwrap_or(next),
        Start::Index(i) => i,
        Start::Producer(t) | Start::Server(t) => {
            let server = matches!(start, Start::Server(_));
            let begin = |f: &StoredFragment| {
                if server {
                    f.server_start
                } else {
                    f.producer_start
                }
            };
            // The fragment that holds t, else the first one after it.
            let stored = stream
                .fragments
                .iter()
                .find(|f| t < begin(f) + f.duration)
                .map(|f| f.index);
            stored.or(live).unwrap_or(next)
        }
    }
}

/// What a connection writes next: the fragment's head (if not yet written), frames, its tail.
struct Chunk {
    head: Option<Vec<u8>>,
    frames: Vec<Arc<LiveFrame>>,
    /// Set when the fragment is complete (every frame is in `frames` or written): the server
    /// time of its end, for the tail's `MILLIS_BEHIND_NOW`.
    complete: Option<SystemTime>,
}

/// A connection's position: fragment `index`, `written` of its frames out.
struct Cursor {
    index: u64,
    written: usize,
    head_written: bool,
}

enum Next {
    Chunk(Chunk),
    /// Nothing new: wait.
    Wait,
    /// The stream is gone.
    End,
}

fn next_chunk(state: &State, name: &str, cursor: &mut Cursor) -> Next {
    let streams = state.streams.lock();
    let Some(stream) = streams.get(name) else {
        return Next::End;
    };
    // Fragments removed by retention: go on with the oldest kept.
    if let Some(oldest) = stream.fragments.front()
        && cursor.index < oldest.index
    {
        cursor.index = oldest.index;
        cursor.written = 0;
        cursor.head_written = false;
    }
    let tags = |number: &str, producer: SystemTime, server: SystemTime| FragmentTags {
        fragment_number: number.to_owned(),
        server_start: server,
        producer_start: producer,
    };
    if let Some(stored) = stream.find(cursor.index) {
        let head = (!cursor.head_written).then(|| {
            mkv::fragment_head(
                &stored.track,
                &tags(
                    &stream.fragment_number(stored.index),
                    stored.producer_start,
                    stored.server_start,
                ),
            )
        });
        return Next::Chunk(Chunk {
            head,
            frames: stored.blocks.get(cursor.written..).unwrap_or(&[]).to_vec(),
            complete: Some(stored.server_start + stored.duration),
        });
    }
    if let Some(live) = stream.live.as_ref()
        && let Some(header) = live.header.as_ref()
        && header.index == cursor.index
    {
        let frames = live.frames.get(cursor.written..).unwrap_or(&[]);
        if cursor.head_written && frames.is_empty() {
            return Next::Wait;
        }
        let head = (!cursor.head_written).then(|| {
            mkv::fragment_head(
                &header.track,
                &tags(
                    &header.fragment_number,
                    header.producer_start,
                    header.server_start,
                ),
            )
        });
        return Next::Chunk(Chunk {
            head,
            frames: frames.to_vec(),
            complete: None,
        });
    }
    Next::Wait
}

/// Releases the connection slot when the connection ends, however it ends.
struct Slot {
    state: Arc<State>,
    name: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(stream) = self.state.streams.lock().get_mut(&self.name) {
            stream.get_media.open = stream.get_media.open.saturating_sub(1);
        }
    }
}

/// Per-frame fault check: `Err` when the connection is to be cut before this frame.
fn count_frame(state: &State, name: &str) -> Result<(), ()> {
    let mut streams = state.streams.lock();
    let Some(stream) = streams.get_mut(name) else {
        return Ok(());
    };
    match stream.faults.get_media_cut_after {
        Some(0) => {
            stream.faults.get_media_cut_after = None;
            Err(())
        }
        Some(n) => {
            stream.faults.get_media_cut_after = Some(n - 1);
            stream.get_media.frames_written += 1;
            Ok(())
        }
        None => {
            stream.get_media.frames_written += 1;
            Ok(())
        }
    }
}

fn take_error(state: &State, name: &str) -> Option<(String, u32)> {
    state
        .streams
        .lock()
        .get_mut(name)
        .and_then(|s| s.faults.get_media_error.take())
}

type Tx = tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>;

/// Writes the connection's fragments into `tx` until the client leaves, the stream is gone, it
/// idles 3 s, its lifetime ends or a fault ends it.
async fn serve(
    state: Arc<State>,
    name: String,
    first: u64,
    lifetime: Option<Duration>,
    cut_after: Option<u64>,
    tx: Tx,
) {
    let _slot = Slot {
        state: Arc::clone(&state),
        name: name.clone(),
    };
    let mut changes = match state.streams.lock().get(&name) {
        Some(s) => s.changes.subscribe(),
        None => return,
    };
    let end_at = lifetime.map(|l| tokio::time::Instant::now() + l);
    let mut cursor = Cursor {
        index: first,
        written: 0,
        head_written: false,
    };
    let mut idle_since = tokio::time::Instant::now();
    let mut written: u64 = 0;
    loop {
        if end_at.is_some_and(|t| tokio::time::Instant::now() >= t) {
            tracing::debug!(stream = %name, "GetMedia: connection lifetime over");
            return;
        }
        changes.mark_unchanged();
        match next_chunk(&state, &name, &mut cursor) {
            Next::End => return,
            Next::Wait => {
                let mut deadline = idle_since + IDLE_TIMEOUT;
                if let Some(t) = end_at {
                    deadline = deadline.min(t);
                }
                tokio::select! {
                    changed = changes.changed() => if changed.is_err() { return },
                    () = tokio::time::sleep_until(deadline) => {
                        if end_at != Some(deadline) {
                            tracing::debug!(stream = %name, "GetMedia: nothing new for 3 s, response ends");
                            return;
                        }
                    }
                    () = tx.closed() => return,
                }
            }
            Next::Chunk(chunk) => {
                idle_since = tokio::time::Instant::now();
                let mut out = Vec::new();
                if let Some(head) = chunk.head {
                    if let Some((code, id)) = take_error(&state, &name) {
                        let _ = tx.send(Ok(Bytes::from(mkv::error_chunk(&code, id)))).await;
                        return;
                    }
                    out.extend_from_slice(&head);
                    cursor.head_written = true;
                }
                for frame in &chunk.frames {
                    if cut_after == Some(written) || count_frame(&state, &name).is_err() {
                        // What is due before the cut, then the connection breaks. The pause
                        // lets those bytes reach the client first: a reset that overtakes them
                        // would discard them in the client's socket (TCP RST), which is not a
                        // cut *after* them.
                        if !out.is_empty() {
                            let _ = tx.send(Ok(Bytes::from(out))).await;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        let _ = tx
                            .send(Err(std::io::Error::new(
                                std::io::ErrorKind::ConnectionReset,
                                "fault: GetMedia connection cut",
                            )))
                            .await;
                        return;
                    }
                    let offset = frame.offset.as_millis();
                    out.extend_from_slice(&mkv::simple_block(
                        i64::try_from(offset).unwrap_or(i64::MAX),
                        frame.key,
                        &frame.data,
                    ));
                    cursor.written += 1;
                    written += 1;
                }
                if let Some(server_end) = chunk.complete {
                    let behind = SystemTime::now()
                        .duration_since(server_end)
                        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                        .unwrap_or(0);
                    out.extend_from_slice(&mkv::fragment_tail(
                        behind,
                        &continuation_token(cursor.index + 1),
                    ));
                    cursor.index += 1;
                    cursor.written = 0;
                    cursor.head_written = false;
                }
                if !out.is_empty() && tx.send(Ok(Bytes::from(out))).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// `POST /getMedia`.
pub(crate) async fn get_media(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let handle = Arc::clone(&state);
    respond(&state, "GetMedia", &headers, move || {
        let input: GetMediaInput = super::http::parse_json(&body)?;
        let name = resolve_stream(
            &handle,
            input.stream_name.as_deref(),
            input.stream_arn.as_deref(),
        )?;
        let start = parse_selector(input.start_selector)?;
        let (first, lifetime, cut_after) = {
            let mut streams = handle.streams.lock();
            let stream = streams
                .get_mut(&name)
                .ok_or_else(|| KvsError::stream_not_found(&name))?;
            if stream.faults.throttled() {
                return Err(KvsError::throttled());
            }
            let now = Instant::now();
            let limits = &mut stream.get_media;
            while limits
                .calls
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                limits.calls.pop_front();
            }
            if limits.calls.len() >= MAX_CALLS_PER_SECOND {
                limits.throttled += 1;
                return Err(KvsError::throttled());
            }
            if limits.open >= MAX_CONNECTIONS {
                limits.connection_limit_refusals += 1;
                return Err(KvsError::new(
                    StatusCode::BAD_REQUEST,
                    "ConnectionLimitExceededException",
                    format!(
                        "Kinesis Video Streams has throttled the request because you have exceeded the limit of allowed client connections ({MAX_CONNECTIONS} GetMedia connections per stream)"
                    ),
                ));
            }
            limits.calls.push_back(now);
            limits.accepted += 1;
            limits.open += 1;
            limits.max_open = limits.max_open.max(limits.open);
            (
                first_index(stream, start),
                stream.faults.get_media_lifetime,
                stream.faults.get_media_connection_cuts.pop_front(),
            )
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(serve(
            Arc::clone(&handle),
            name,
            first,
            lifetime,
            cut_after,
            tx,
        ));
        let body = Body::from_stream(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        }));
        let mut response = Response::new(body);
        *response.status_mut() = StatusCode::OK;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("video/webm"));
        insert_request_id(response.headers_mut());
        Ok(response)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_not_fragment_numbers() {
        for next in [0, 1, 4096, u64::MAX] {
            let t = continuation_token(next);
            assert!(t.len() <= 128);
            assert!(!t.bytes().all(|b| b.is_ascii_digit()));
            assert_eq!(parse_token(&t), Some(next));
        }
        assert_eq!(
            parse_token("91343852333181432397633822815289806046931225493"),
            None
        );
    }

    #[test]
    fn selectors_are_checked() {
        let sel = |kind: &str| StartSelectorInput {
            start_selector_type: Some(kind.to_owned()),
            ..Default::default()
        };
        assert_eq!(parse_selector(Some(sel("NOW"))).ok(), Some(Start::Now));
        assert!(parse_selector(None).is_err());
        assert!(parse_selector(Some(sel("LATEST"))).is_err());
        assert!(parse_selector(Some(sel("PRODUCER_TIMESTAMP"))).is_err());
        assert!(parse_selector(Some(sel("FRAGMENT_NUMBER"))).is_err());
        let mut s = sel("FRAGMENT_NUMBER");
        s.after_fragment_number = Some("9134385233318000000000000000000000000000000041".to_owned());
        assert_eq!(parse_selector(Some(s)).ok(), Some(Start::Index(42)));
        let mut s = sel("CONTINUATION_TOKEN");
        s.continuation_token = Some("bad token".to_owned());
        assert!(parse_selector(Some(s)).is_err());
    }
}
