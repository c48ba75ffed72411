//! # kvs-frames
//!
//! Decoded video frames, with the time the camera captured them, from AWS Kinesis Video
//! Streams (KVS), and the tools around that: stream discovery and clips, supervision of the
//! RTSP→KVS producer processes that feed KVS. Its tests and demo run against `kvs-emulator`, a
//! local KVS on `127.0.0.1` published as a crate of its own (add it as a dev-dependency for
//! yours).
//!
//! ## What is here today
//!
//! * [`KvsHlsFrameSource`]: frames with producer timestamps from a KVS stream over HLS, with
//!   session refresh, reconnect with backoff, a stall watchdog, a bounded delivery queue,
//!   [`metrics`], a blocking iterator and an async stream. Start with its documentation.
//! * [`error`]: one error type for the whole crate. Every KVS error (control plane,
//!   archived media, HLS responses), HTTP status, GStreamer and I/O failure maps to an
//!   [`ErrorKind`] that says whether retrying can help
//!   ([`Error::is_transient`](error::Error::is_transient)).
//! * [`kvs`]: the KVS clients, with data endpoints cached per (stream, API) and reloaded on
//!   failure, shared by every part of the crate.
//! * [`kvs::discovery`] and [`kvs::clips`]: the ACTIVE streams of an account (cached, with
//!   retries on throttling), and clips of any length as one MP4 (GetClip split at its 200
//!   fragment / 100 MB limit and joined without re-encoding, written atomically, with an optional
//!   JPEG thumbnail); [`retention`] deletes old clip files.
//! * [`elements`]: every GStreamer element the crate creates and the Debian package that
//!   provides it; a missing one fails at `build()` with a message naming both.
//! * [`redact`]: removal of session tokens and credentials from any text, used by every error
//!   and log line of the crate.
//! * [`producer`]: supervision of the RTSP→KVS producer processes (`kvs_gstreamer_sample`,
//!   `gst-launch-1.0 … kvssink`, any command): restarts with backoff, stall watchdog, graceful
//!   process-group stops, status, health, events, metrics, orphan cleanup and stream naming.
//!
//! * [`UriFrameSource`]: the same frames, options and API from an RTSP camera (with the
//!   sender's NTP time as producer time), an HLS URL or a file, decoded by GStreamer without
//!   KVS; optional JPEG output ([`PixelFormat::Jpeg`]) for both sources.
//!
//! ## Errors at a glance
//!
//! ```
//! use kvs_frames::error::{Error, ErrorKind};
//!
//! // What a reader gets when a camera has sent nothing for 30 s:
//! let err = Error::from_kvs(
//!     "ResourceNotFoundException",
//!     Some(404),
//!     "No fragments found in the stream for the streaming request.",
//! );
//! assert_eq!(err.kind(), ErrorKind::NoFragments);
//! assert!(err.is_transient()); // back off and try again: the camera may come back
//! ```
#![deny(missing_docs)]
#![forbid(clippy::print_stdout, clippy::print_stderr)]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod backoff;
mod decode;
pub mod elements;
pub mod error;
pub mod frame;
mod hls;
pub mod kvs;
pub mod metrics;
pub mod producer;
pub mod redact;
pub mod retention;
pub mod source;

// The README's and docs/service.md's Rust blocks are compiled as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/service.md")]
struct ServiceGuideDoctests;
#[cfg(doctest)]
#[doc = include_str!("../docs/getmedia.md")]
struct GetMediaGuideDoctests;

pub use decode::DecoderThreads;
pub use error::{Error, ErrorKind, Result};
pub use frame::{ColorConversion, FragmentId, Frame, FrameGeometry, PixelFormat, Rect, ResizeMode};
/// The `prometheus` crate this crate is built with: metrics registries are of its types
/// ([`metrics::FrameSourceMetrics::register`], the producer metrics), so build them from this
/// re-export rather than a `prometheus` dependency of your own whose version must match.
pub use prometheus;
pub use source::{
    DeliveryPolicy, EndOfStream, FrameStream, Frames, GetMediaStart, KvsGetMediaFrameSource,
    KvsGetMediaFrameSourceBuilder, KvsHlsFrameSource, KvsHlsFrameSourceBuilder, PlaybackMode,
    RtspTransport, SetFrames, SetItem, SetMember, SetStats, SetStream, SourceSet, SourceState,
    SourceStats, UriFrameSource, UriFrameSourceBuilder, UriKind,
};
