//! The KVS control plane and archived-media clients, with the data-endpoint cache that every
//! part of the crate shares.
//!
//! KVS serves archived media (HLS sessions, clips) from a per-stream *data endpoint* returned by
//! `GetDataEndpoint`. AWS says caching endpoints is safe if they are reloaded on failure, and
//! `GetDataEndpoint` is limited to 5 TPS per stream, so [`KvsClient`] caches one endpoint per
//! (stream, API) and forgets it when a call made through it fails
//! ([`KvsClient::invalidate_endpoint`]).

mod client;

pub use client::{KvsClient, StreamId};
