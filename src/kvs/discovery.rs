//! Stream discovery: which streams exist, which are ACTIVE, and their details.
//!
//! [`Discovery::active_streams`] reads every `ListStreams` page (optionally only names with a
//! prefix), keeps the ACTIVE streams and caches that list for a TTL. The cache is a cache, never
//! a dependency: when a refresh fails, the error is returned, not the old list, unless the caller
//! opted into [`DiscoveryOptions::stale_on_error`] — and even then the list says it is stale
//! ([`ActiveStreams::refresh_error`]) and a warning is logged.
//!
//! Throttling (`ClientLimitExceededException`) and other transient failures (HTTP 5xx,
//! connection failures, timeouts) are retried with jittered exponential backoff: `ListStreams` is
//! limited to 50 TPS per account and `DescribeStream` to 5 TPS per stream (see KVS_FACTS.md).
//!
//! ```no_run
//! use std::time::Duration;
//! use kvs_frames::kvs::{Discovery, DiscoveryOptions, KvsClient};
//!
//! # async fn example() -> kvs_frames::Result<()> {
//! let client = KvsClient::from_env(None).await?;
//! let discovery = Discovery::new(
//!     client,
//!     DiscoveryOptions::default().ttl(Duration::from_secs(60)).name_prefix("cam-"),
//! )?;
//! for stream in discovery.active_streams().await?.iter() {
//!     tracing::info!("{} ({:?})", stream.name, stream.media_type);
//! }
//! let details = discovery.describe("cam-1").await?;
//! assert!(details.status.is_active());
//! # Ok(()) }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesisvideo::types::{ComparisonOperator, Status, StreamInfo, StreamNameCondition};
use parking_lot::Mutex;

use super::client::{KvsClient, StreamId};
use super::shard::Shard;
use crate::error::{Error, ErrorKind, Result};

/// The status of a KVS stream (`StreamInfo.Status`).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamStatus {
    /// Being created: listed, but its media APIs do not work yet.
    Creating,
    /// Usable: the only status in which clips and HLS sessions can be requested.
    Active,
    /// Being updated (for example its retention); media APIs may fail meanwhile.
    Updating,
    /// Being deleted.
    Deleting,
    /// A status this version of the crate does not know, as KVS spelled it.
    Other(String),
}

impl StreamStatus {
    /// Whether the stream is ACTIVE.
    #[must_use]
    pub fn is_active(&self) -> bool {
        *self == StreamStatus::Active
    }

    /// The KVS spelling (`ACTIVE`, …).
    #[must_use]
    pub fn as_str(&self) -> &str {
        match self {
            StreamStatus::Creating => "CREATING",
            StreamStatus::Active => "ACTIVE",
            StreamStatus::Updating => "UPDATING",
            StreamStatus::Deleting => "DELETING",
            StreamStatus::Other(s) => s,
        }
    }

    fn from_sdk(status: Option<&Status>) -> Self {
        match status.map(Status::as_str) {
            Some("ACTIVE") => StreamStatus::Active,
            Some("CREATING") => StreamStatus::Creating,
            Some("UPDATING") => StreamStatus::Updating,
            Some("DELETING") => StreamStatus::Deleting,
            Some(other) => StreamStatus::Other(other.to_owned()),
            None => StreamStatus::Other(String::new()),
        }
    }
}

impl fmt::Display for StreamStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What KVS says about a stream (`StreamInfo` of `ListStreams` and `DescribeStream`).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamDetails {
    /// `StreamName`.
    pub name: String,
    /// `StreamARN`.
    pub arn: String,
    /// `Status`.
    pub status: StreamStatus,
    /// `MediaType` (for example `video/h264`), when set.
    pub media_type: Option<String>,
    /// `DeviceName`, when set.
    pub device_name: Option<String>,
    /// `KmsKeyId`, when set.
    pub kms_key_id: Option<String>,
    /// `Version` (changes with every update of the stream).
    pub version: Option<String>,
    /// `CreationTime`.
    pub creation_time: Option<SystemTime>,
    /// `DataRetentionInHours` (0: the stream keeps no media, so clips and HLS fail).
    pub data_retention_hours: Option<u32>,
}

impl StreamDetails {
    /// The stream as used in KVS calls (by name).
    #[must_use]
    pub fn id(&self) -> StreamId {
        StreamId::Name(self.name.clone())
    }

    fn from_sdk(info: &StreamInfo) -> Option<Self> {
        let name = info.stream_name().filter(|n| !n.is_empty())?.to_owned();
        Some(StreamDetails {
            arn: info.stream_arn().unwrap_or_default().to_owned(),
            status: StreamStatus::from_sdk(info.status()),
            media_type: info.media_type().map(str::to_owned),
            device_name: info.device_name().map(str::to_owned),
            kms_key_id: info.kms_key_id().map(str::to_owned),
            version: info.version().map(str::to_owned),
            creation_time: info
                .creation_time()
                .and_then(|t| SystemTime::try_from(*t).ok()),
            data_retention_hours: info
                .data_retention_in_hours()
                .and_then(|h| u32::try_from(h).ok()),
            name,
        })
    }
}

/// Options of a [`Discovery`]: plain values with by-value setters, validated by
/// [`Discovery::new`].
#[derive(Clone, Debug)]
pub struct DiscoveryOptions {
    ttl: Duration,
    name_prefix: Option<String>,
    page_size: u32,
    stale_on_error: bool,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
    shard: Option<Shard>,
}

impl Default for DiscoveryOptions {
    /// TTL 60 s, no prefix, pages of 1000, no stale-on-error, 5 attempts per call with backoff
    /// from 200 ms up to 5 s.
    fn default() -> Self {
        DiscoveryOptions {
            ttl: Duration::from_secs(60),
            name_prefix: None,
            page_size: 1000,
            stale_on_error: false,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
            shard: None,
        }
    }
}

impl DiscoveryOptions {
    /// How long [`Discovery::active_streams`] serves the cached list (default 60 s;
    /// `Duration::ZERO` asks KVS every time).
    #[must_use]
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Only streams whose name begins with `prefix` (`StreamNameCondition` BEGINS_WITH; 1–256
    /// characters of `[a-zA-Z0-9_.-]`). An empty prefix means every stream.
    #[must_use]
    pub fn name_prefix(mut self, prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        self.name_prefix = (!prefix.is_empty()).then_some(prefix);
        self
    }

    /// `MaxResults` of each `ListStreams` page (1–10000, default 1000).
    #[must_use]
    pub fn page_size(mut self, size: u32) -> Self {
        self.page_size = size;
        self
    }

    /// When a refresh fails and a cached list exists, return that list (marked stale, with the
    /// error) instead of the error (default false: the error is returned).
    #[must_use]
    pub fn stale_on_error(mut self, enabled: bool) -> Self {
        self.stale_on_error = enabled;
        self
    }

    /// Attempts per KVS call when it is throttled or fails transiently (default 5; 1 = no
    /// retry).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Backoff before the first retry and its cap (defaults 200 ms and 5 s); each delay doubles
    /// and is multiplied by a random factor between 0.8 and 1.2.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Only the streams this replica of a fleet owns ([`Shard`]: rendezvous hashing over the
    /// replica index and count), in [`Discovery::list_streams`] and
    /// [`Discovery::active_streams`] alike. Default: every stream.
    #[must_use]
    pub fn shard(mut self, shard: Shard) -> Self {
        self.shard = Some(shard);
        self
    }

    fn validate(&self) -> Result<()> {
        if !(1..=10_000).contains(&self.page_size) {
            return Err(Error::invalid_config(
                "DiscoveryOptions::page_size",
                self.page_size,
                "ListStreams MaxResults is 1-10000",
            ));
        }
        if let Some(prefix) = &self.name_prefix {
            StreamId::Name(prefix.clone()).validate().map_err(|_| {
                Error::invalid_config(
                    "DiscoveryOptions::name_prefix",
                    format!("{prefix:?}"),
                    "a stream name prefix is 1-256 characters of [a-zA-Z0-9_.-]",
                )
            })?;
        }
        Backoff::new(
            self.max_attempts,
            self.initial_backoff,
            self.max_backoff,
            "DiscoveryOptions",
        )
        .map(|_| ())
    }
}

/// The ACTIVE streams, as returned by [`Discovery::active_streams`]: a list plus where it came
/// from. Dereferences to `[StreamDetails]`.
#[derive(Clone, Debug)]
pub struct ActiveStreams {
    streams: Arc<[StreamDetails]>,
    fetched_at: SystemTime,
    fetched: Instant,
    from_cache: bool,
    refresh_error: Option<Error>,
}

impl ActiveStreams {
    /// The streams, sorted by name.
    #[must_use]
    pub fn streams(&self) -> &[StreamDetails] {
        &self.streams
    }

    /// Their names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.streams.iter().map(|s| s.name.as_str())
    }

    /// When the list was read from KVS (wall clock).
    #[must_use]
    pub fn fetched_at(&self) -> SystemTime {
        self.fetched_at
    }

    /// How long ago the list was read from KVS.
    #[must_use]
    pub fn age(&self) -> Duration {
        self.fetched.elapsed()
    }

    /// Whether the list came from the cache rather than from KVS just now.
    #[must_use]
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// Whether this is an old list served because the refresh failed (only with
    /// [`DiscoveryOptions::stale_on_error`]).
    #[must_use]
    pub fn is_stale(&self) -> bool {
        self.refresh_error.is_some()
    }

    /// The error of the failed refresh, when the list [is stale](Self::is_stale).
    #[must_use]
    pub fn refresh_error(&self) -> Option<&Error> {
        self.refresh_error.as_ref()
    }
}

impl std::ops::Deref for ActiveStreams {
    type Target = [StreamDetails];
    fn deref(&self) -> &[StreamDetails] {
        &self.streams
    }
}

impl<'a> IntoIterator for &'a ActiveStreams {
    type Item = &'a StreamDetails;
    type IntoIter = std::slice::Iter<'a, StreamDetails>;
    fn into_iter(self) -> Self::IntoIter {
        self.streams.iter()
    }
}

struct Cached {
    streams: Arc<[StreamDetails]>,
    fetched_at: SystemTime,
    fetched: Instant,
}

/// Lists the streams of an account, keeps the ACTIVE ones and caches them for a TTL; describes
/// single streams. Share one (in an `Arc`) per process: concurrent callers of
/// [`active_streams`](Self::active_streams) share one refresh.
pub struct Discovery {
    client: KvsClient,
    options: DiscoveryOptions,
    backoff: Backoff,
    cache: Mutex<Option<Cached>>,
    refresh_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Discovery")
            .field("options", &self.options)
            .field(
                "cached",
                &self.cache.lock().as_ref().map(|c| c.streams.len()),
            )
            .finish_non_exhaustive()
    }
}

impl Discovery {
    /// A discovery over `client`; fails with [`ErrorKind::InvalidConfig`] for invalid options.
    pub fn new(client: KvsClient, options: DiscoveryOptions) -> Result<Self> {
        options.validate()?;
        let backoff = Backoff::new(
            options.max_attempts,
            options.initial_backoff,
            options.max_backoff,
            "DiscoveryOptions",
        )?;
        Ok(Discovery {
            client,
            options,
            backoff,
            cache: Mutex::new(None),
            refresh_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The client it uses.
    #[must_use]
    pub fn client(&self) -> &KvsClient {
        &self.client
    }

    /// Its options.
    #[must_use]
    pub fn options(&self) -> &DiscoveryOptions {
        &self.options
    }

    /// The ACTIVE streams (with the configured name prefix), sorted by name: from the cache if it
    /// is younger than the TTL, else from every `ListStreams` page.
    ///
    /// A failed refresh returns its error (after the retries), unless
    /// [`stale_on_error`](DiscoveryOptions::stale_on_error) is set and a list was read before:
    /// then that list comes back with [`ActiveStreams::is_stale`] true.
    pub async fn active_streams(&self) -> Result<ActiveStreams> {
        if let Some(hit) = self.fresh() {
            return Ok(hit);
        }
        let _refreshing = self.refresh_lock.lock().await;
        // Another caller may have refreshed while this one waited.
        if let Some(hit) = self.fresh() {
            return Ok(hit);
        }
        self.refresh_locked().await
    }

    /// Reads the list from KVS now, whatever the age of the cache, and caches it.
    pub async fn refresh(&self) -> Result<ActiveStreams> {
        let _refreshing = self.refresh_lock.lock().await;
        self.refresh_locked().await
    }

    /// Forgets the cached list: the next [`active_streams`](Self::active_streams) asks KVS.
    pub fn invalidate(&self) {
        *self.cache.lock() = None;
    }

    /// Every stream with the configured prefix, whatever its status, sorted by name (all
    /// `ListStreams` pages; not cached).
    pub async fn list_streams(&self) -> Result<Vec<StreamDetails>> {
        let mut streams = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0u32;
        loop {
            pages += 1;
            let page_token = token.clone();
            let output = retry(&self.backoff, "ListStreams", |_| {
                let mut request = self
                    .client
                    .control()
                    .list_streams()
                    .max_results(i32::try_from(self.options.page_size).unwrap_or(1000))
                    .set_next_token(page_token.clone());
                if let Some(prefix) = &self.options.name_prefix {
                    request = request.stream_name_condition(
                        StreamNameCondition::builder()
                            .comparison_operator(ComparisonOperator::BeginsWith)
                            .comparison_value(prefix)
                            .build(),
                    );
                }
                async move {
                    request
                        .send()
                        .await
                        .map_err(|e| Error::from_sdk("ListStreams", e))
                }
            })
            .await?;
            for info in output.stream_info_list() {
                match StreamDetails::from_sdk(info) {
                    Some(details) => streams.push(details),
                    None => tracing::warn!("ListStreams returned a stream without a name: skipped"),
                }
            }
            match output.next_token().filter(|t| !t.is_empty()) {
                None => break,
                Some(next) if token.as_deref() == Some(next) => {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "ListStreams returned the same NextToken twice",
                    ));
                }
                Some(next) => token = Some(next.to_owned()),
            }
            if pages >= MAX_PAGES {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("ListStreams did not end after {MAX_PAGES} pages"),
                ));
            }
        }
        streams.sort_by(|a, b| a.name.cmp(&b.name));
        streams.dedup_by(|a, b| a.name == b.name);
        let listed = streams.len();
        if let Some(shard) = self.options.shard {
            streams.retain(|s| shard.owns(&s.name));
        }
        tracing::debug!(listed, kept = streams.len(), pages, "ListStreams");
        Ok(streams)
    }

    /// `DescribeStream`: status and details of one stream (by name, or ARN for strings starting
    /// with `arn:`). An unknown stream is [`ErrorKind::StreamNotFound`].
    pub async fn describe(&self, stream: impl Into<StreamId>) -> Result<StreamDetails> {
        describe_stream(&self.client, &self.backoff, &stream.into()).await
    }

    fn fresh(&self) -> Option<ActiveStreams> {
        let cache = self.cache.lock();
        let cached = cache.as_ref()?;
        (cached.fetched.elapsed() < self.options.ttl).then(|| ActiveStreams {
            streams: Arc::clone(&cached.streams),
            fetched_at: cached.fetched_at,
            fetched: cached.fetched,
            from_cache: true,
            refresh_error: None,
        })
    }

    async fn refresh_locked(&self) -> Result<ActiveStreams> {
        match self.list_streams().await {
            Ok(all) => {
                let active: Arc<[StreamDetails]> =
                    all.into_iter().filter(|s| s.status.is_active()).collect();
                let fetched = Instant::now();
                let fetched_at = SystemTime::now();
                *self.cache.lock() = Some(Cached {
                    streams: Arc::clone(&active),
                    fetched_at,
                    fetched,
                });
                Ok(ActiveStreams {
                    streams: active,
                    fetched_at,
                    fetched,
                    from_cache: false,
                    refresh_error: None,
                })
            }
            Err(err) => {
                let stale = if self.options.stale_on_error {
                    self.cache.lock().as_ref().map(|c| ActiveStreams {
                        streams: Arc::clone(&c.streams),
                        fetched_at: c.fetched_at,
                        fetched: c.fetched,
                        from_cache: true,
                        refresh_error: Some(err.clone()),
                    })
                } else {
                    None
                };
                match stale {
                    Some(stale) => {
                        tracing::warn!(
                            error = %err,
                            age_secs = stale.age().as_secs(),
                            "stream list refresh failed: serving the stale list"
                        );
                        Ok(stale)
                    }
                    None => Err(err),
                }
            }
        }
    }
}

/// A guard against endless pagination.
const MAX_PAGES: u32 = 100_000;

/// `DescribeStream` with retries (shared by discovery and clips).
pub(crate) async fn describe_stream(
    client: &KvsClient,
    backoff: &Backoff,
    stream: &StreamId,
) -> Result<StreamDetails> {
    stream.validate()?;
    let output = retry(backoff, "DescribeStream", |_| {
        let request = client.control().describe_stream();
        let request = match stream {
            StreamId::Name(name) => request.stream_name(name),
            StreamId::Arn(arn) => request.stream_arn(arn),
        };
        async move {
            request
                .send()
                .await
                .map_err(|e| Error::from_sdk("DescribeStream", e))
        }
    })
    .await
    .map_err(|e| e.context(format!("stream {stream}")))?;
    output
        .stream_info()
        .and_then(StreamDetails::from_sdk)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                format!("DescribeStream returned no StreamInfo for stream {stream}"),
            )
        })
}

// ---------------------------------------------------------------------------------------------
// Retries: a bounded number of attempts with the crate's exponential delay
// (`backoff::exponential`), the random factor and the sleep injectable for tests.

/// Jittered exponential backoff for KVS calls.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Backoff {
    max_attempts: u32,
    initial: Duration,
    max: Duration,
    multiplier: f64,
    jitter: (f64, f64),
}

impl Backoff {
    /// `max_attempts` ≥ 1, `0 < initial ≤ max`; doubling, jitter 0.8–1.2.
    pub(crate) fn new(
        max_attempts: u32,
        initial: Duration,
        max: Duration,
        owner: &str,
    ) -> Result<Self> {
        if max_attempts == 0 {
            return Err(Error::invalid_config(
                &format!("{owner}::max_attempts"),
                0,
                "at least 1 attempt",
            ));
        }
        if initial.is_zero() || initial > max {
            return Err(Error::invalid_config(
                &format!("{owner}::backoff"),
                format!("{initial:?}..{max:?}"),
                "the initial backoff must be above zero and not above the maximum",
            ));
        }
        Ok(Backoff {
            max_attempts,
            initial,
            max,
            multiplier: 2.0,
            jitter: (0.8, 1.2),
        })
    }

    /// The delay before retry number `retry` (0 for the first), with `unit` a random number in
    /// `[0, 1)`: `min(initial · 2^retry, max) · (0.8 + 0.4 · unit)`.
    pub(crate) fn delay(&self, retry: u32, unit: f64) -> Duration {
        let (low, high) = self.jitter;
        let factor = low + (high - low) * unit.clamp(0.0, 1.0);
        crate::backoff::exponential(
            self.initial,
            self.multiplier,
            self.max,
            retry.saturating_add(1),
            factor,
        )
    }
}

/// Whether a failed KVS call is worth repeating after a backoff.
pub(crate) fn retryable(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Throttled
            | ErrorKind::ServiceUnavailable
            | ErrorKind::Network
            | ErrorKind::Timeout
    )
}

/// Runs `attempt` (given the attempt number, 0-based) until it succeeds, fails with an error that
/// is not [`retryable`], or `policy.max_attempts` is reached; sleeps the backoff between attempts.
pub(crate) async fn retry<T, F, Fut>(policy: &Backoff, operation: &str, attempt: F) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    retry_with(
        policy,
        operation,
        rand::random::<f64>,
        tokio::time::sleep,
        attempt,
    )
    .await
}

/// [`retry`] with the random source and the sleep injected (for tests).
async fn retry_with<T, F, Fut, S, SFut, U>(
    policy: &Backoff,
    operation: &str,
    mut unit: U,
    mut sleep: S,
    mut attempt: F,
) -> Result<T>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T>>,
    S: FnMut(Duration) -> SFut,
    SFut: Future<Output = ()>,
    U: FnMut() -> f64,
{
    let mut number = 0;
    loop {
        match attempt(number).await {
            Ok(value) => return Ok(value),
            Err(err) if retryable(err.kind()) && number + 1 < policy.max_attempts => {
                let delay = policy.delay(number, unit());
                tracing::debug!(
                    operation,
                    attempt = number + 1,
                    max_attempts = policy.max_attempts,
                    delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    error = %err,
                    "KVS call failed: retrying after a backoff"
                );
                sleep(delay).await;
                number += 1;
            }
            Err(err) => {
                if number > 0 {
                    return Err(err.context(format!("{operation}, attempt {}", number + 1)));
                }
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32) -> Backoff {
        Backoff::new(
            attempts,
            Duration::from_millis(100),
            Duration::from_secs(1),
            "test",
        )
        .unwrap()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let p = policy(10);
        assert_eq!(p.delay(0, 0.5), Duration::from_millis(100));
        assert_eq!(p.delay(1, 0.5), Duration::from_millis(200));
        assert_eq!(p.delay(3, 0.5), Duration::from_millis(800));
        assert_eq!(p.delay(4, 0.5), Duration::from_secs(1));
        assert_eq!(p.delay(60, 0.5), Duration::from_secs(1));
        assert_eq!(p.delay(u32::MAX, 0.5), Duration::from_secs(1));
        assert_eq!(p.delay(0, 0.0), Duration::from_millis(80));
        assert_eq!(p.delay(0, 1.0), Duration::from_millis(120));
        assert_eq!(p.delay(9, 7.0), Duration::from_millis(1200));
    }

    #[test]
    fn invalid_backoff_options_are_refused() {
        let err =
            Backoff::new(0, Duration::from_millis(1), Duration::from_secs(1), "X").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert_eq!(err.invalid_option(), Some("X::max_attempts"));
        assert!(Backoff::new(1, Duration::ZERO, Duration::from_secs(1), "X").is_err());
        assert!(Backoff::new(1, Duration::from_secs(2), Duration::from_secs(1), "X").is_err());
    }

    #[tokio::test]
    async fn throttling_is_retried_with_backoff_then_succeeds() {
        let p = policy(5);
        let mut slept = Vec::new();
        let mut calls = 0;
        let result = retry_with(
            &p,
            "ListStreams",
            || 0.5,
            |d| {
                slept.push(d);
                std::future::ready(())
            },
            |n| {
                calls += 1;
                async move {
                    if n < 3 {
                        Err(Error::from_kvs(
                            "ClientLimitExceededException",
                            Some(400),
                            "throttled",
                        ))
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await
        .unwrap();
        assert_eq!(result, 3);
        assert_eq!(calls, 4);
        assert_eq!(
            slept,
            [100, 200, 400].map(Duration::from_millis).to_vec(),
            "doubling backoff between attempts"
        );
    }

    #[tokio::test]
    async fn retries_stop_at_max_attempts_and_fatal_errors_are_not_retried() {
        let p = policy(3);
        let mut sleeps = 0;
        let err = retry_with(
            &p,
            "DescribeStream",
            || 0.0,
            |_| {
                sleeps += 1;
                std::future::ready(())
            },
            |_| async { Err::<(), _>(Error::from_kvs("", Some(503), "unavailable")) },
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ServiceUnavailable);
        assert_eq!(sleeps, 2, "3 attempts, 2 backoffs");
        assert!(err.to_string().contains("attempt 3"), "{err}");

        let mut calls = 0;
        let err = retry_with(
            &p,
            "DescribeStream",
            || 0.0,
            |_| std::future::ready(()),
            |_| {
                calls += 1;
                async {
                    Err::<(), _>(Error::from_kvs(
                        "ResourceNotFoundException",
                        Some(404),
                        "The requested stream cam-9 was not found",
                    ))
                }
            },
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::StreamNotFound);
        assert_eq!(calls, 1, "fatal errors are not retried");
        for kind in [ErrorKind::NoFragments, ErrorKind::InvalidArgument] {
            assert!(!retryable(kind));
        }
    }

    #[test]
    fn options_are_validated() {
        let ok = DiscoveryOptions::default().name_prefix("cam-");
        assert!(ok.validate().is_ok());
        let err = DiscoveryOptions::default()
            .page_size(0)
            .validate()
            .unwrap_err();
        assert_eq!(err.invalid_option(), Some("DiscoveryOptions::page_size"));
        let err = DiscoveryOptions::default()
            .name_prefix("bad prefix")
            .validate()
            .unwrap_err();
        assert_eq!(err.invalid_option(), Some("DiscoveryOptions::name_prefix"));
        assert!(
            DiscoveryOptions::default()
                .name_prefix("")
                .validate()
                .is_ok()
        );
        let err = DiscoveryOptions::default()
            .max_attempts(0)
            .validate()
            .unwrap_err();
        assert_eq!(err.invalid_option(), Some("DiscoveryOptions::max_attempts"));
    }

    #[test]
    fn statuses_map_from_the_sdk() {
        assert_eq!(
            StreamStatus::from_sdk(Some(&Status::Active)),
            StreamStatus::Active
        );
        assert_eq!(
            StreamStatus::from_sdk(Some(&Status::Creating)),
            StreamStatus::Creating
        );
        assert_eq!(
            StreamStatus::from_sdk(Some(&Status::from("PAUSED"))),
            StreamStatus::Other("PAUSED".into())
        );
        assert_eq!(StreamStatus::Deleting.to_string(), "DELETING");
        assert!(!StreamStatus::Updating.is_active());
    }
}
