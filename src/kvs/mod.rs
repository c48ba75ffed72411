//! The KVS control plane and archived-media clients, with the data-endpoint cache that every
//! part of the crate shares.
//!
//! KVS serves archived media (HLS sessions, clips) from a per-stream *data endpoint* returned by
//! `GetDataEndpoint`. AWS says caching endpoints is safe if they are reloaded on failure, and
//! `GetDataEndpoint` is limited to 5 TPS per stream, so [`KvsClient`] caches one endpoint per
//! (stream, API) and forgets it when a call made through it fails
//! ([`KvsClient::invalidate_endpoint`]).
//!
//! [`discovery`] lists the ACTIVE streams (cached for a TTL) and describes single streams;
//! [`clips`] extracts any time range of a stream as one MP4 file (ListFragments + GetClip, split
//! at KVS's per-call limits and joined without re-encoding); [`shard`] splits the streams among
//! the replicas of a fleet.

mod client;
pub mod clips;
pub mod discovery;
pub mod shard;

pub use client::{KvsClient, StreamId};
pub use clips::{
    ClipBytes, ClipExtractor, ClipInfo, ClipOptions, ClipPlanning, ClipRequest, FragmentInfo,
    TimestampSelector,
};
pub use discovery::{ActiveStreams, Discovery, DiscoveryOptions, StreamDetails, StreamStatus};
pub use shard::Shard;
