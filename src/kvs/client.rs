//! [`KvsClient`]: control-plane client plus cached data endpoints and archived-media clients.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_kinesisvideo::types::ApiName;
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};

/// How a stream is named in KVS calls: by name or by ARN.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum StreamId {
    /// `StreamName` (1–256 characters of `[a-zA-Z0-9_.-]`).
    Name(String),
    /// `StreamARN` (up to 1024 characters).
    Arn(String),
}

impl StreamId {
    /// The stream's name, or its ARN.
    pub fn as_str(&self) -> &str {
        match self {
            StreamId::Name(s) | StreamId::Arn(s) => s,
        }
    }

    /// The name, when the stream is identified by name.
    pub fn name(&self) -> Option<&str> {
        match self {
            StreamId::Name(s) => Some(s),
            StreamId::Arn(_) => None,
        }
    }

    /// The ARN, when the stream is identified by ARN.
    pub fn arn(&self) -> Option<&str> {
        match self {
            StreamId::Arn(s) => Some(s),
            StreamId::Name(_) => None,
        }
    }

    /// Checks the KVS rules: names are 1–256 characters of `[a-zA-Z0-9_.-]`, ARNs start with
    /// `arn:` and have at most 1024 characters.
    pub fn validate(&self) -> Result<()> {
        match self {
            StreamId::Name(name) => {
                let ok = !name.is_empty()
                    && name.len() <= 256
                    && name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
                if ok {
                    Ok(())
                } else {
                    Err(Error::invalid_config(
                        "stream_name",
                        format!("{name:?}"),
                        "KVS stream names are 1-256 characters of [a-zA-Z0-9_.-]",
                    ))
                }
            }
            StreamId::Arn(arn) => {
                if arn.starts_with("arn:") && arn.len() <= 1024 {
                    Ok(())
                } else {
                    Err(Error::invalid_config(
                        "stream_arn",
                        format!("{arn:?}"),
                        "a KVS stream ARN starts with \"arn:\" and has at most 1024 characters",
                    ))
                }
            }
        }
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for StreamId {
    /// Strings starting with `arn:` are ARNs, anything else a name.
    fn from(s: &str) -> Self {
        if s.starts_with("arn:") {
            StreamId::Arn(s.to_owned())
        } else {
            StreamId::Name(s.to_owned())
        }
    }
}

impl From<String> for StreamId {
    fn from(s: String) -> Self {
        StreamId::from(s.as_str())
    }
}

#[derive(Clone)]
struct CachedEndpoint {
    url: String,
    fetched: Instant,
}

struct Inner {
    config: aws_config::SdkConfig,
    control: aws_sdk_kinesisvideo::Client,
    endpoints: Mutex<HashMap<(StreamId, ApiName), CachedEndpoint>>,
    media_clients: Mutex<HashMap<String, aws_sdk_kinesisvideoarchivedmedia::Client>>,
    get_media_clients: Mutex<HashMap<String, aws_sdk_kinesisvideomedia::Client>>,
    endpoint_ttl: Duration,
    /// Set when `ListFragments` was refused (IAM) or unknown to the endpoint: clips go on with
    /// GetClip alone without asking again.
    list_fragments_refused: Mutex<Option<ErrorKind>>,
}

/// A KVS client: the control plane, data endpoints cached per (stream, API) and reloaded on
/// failure, and archived-media clients built at those endpoints. Cheap to clone; share one per
/// process (or per AWS account and region).
#[derive(Clone)]
pub struct KvsClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for KvsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvsClient")
            .field("region", &self.inner.config.region())
            .field("cached_endpoints", &self.inner.endpoints.lock().len())
            .finish_non_exhaustive()
    }
}

impl KvsClient {
    /// A client from an AWS SDK configuration (credentials, region, optional endpoint URL).
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        KvsClient {
            inner: Arc::new(Inner {
                config: config.clone(),
                control: aws_sdk_kinesisvideo::Client::new(config),
                endpoints: Mutex::new(HashMap::new()),
                media_clients: Mutex::new(HashMap::new()),
                get_media_clients: Mutex::new(HashMap::new()),
                endpoint_ttl: Duration::from_secs(3600),
                list_fragments_refused: Mutex::new(None),
            }),
        }
    }

    /// A client configured the standard AWS way (environment, profile, instance or task role),
    /// in `region` when given, else the configured default region.
    pub async fn from_env(region: Option<&str>) -> Result<Self> {
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = region {
            loader = loader.region(aws_config::Region::new(region.to_owned()));
        }
        let config = loader.load().await;
        if config.region().is_none() {
            return Err(Error::invalid_config(
                "region",
                "(none)",
                "no AWS region given and none configured (AWS_REGION, AWS_DEFAULT_REGION or profile)",
            ));
        }
        Ok(Self::new(&config))
    }

    /// The SDK configuration the client was built from.
    pub fn sdk_config(&self) -> &aws_config::SdkConfig {
        &self.inner.config
    }

    /// The control-plane client (ListStreams, DescribeStream, …).
    pub fn control(&self) -> &aws_sdk_kinesisvideo::Client {
        &self.inner.control
    }

    /// The data endpoint of `stream` for `api`, from the cache when it has one (entries live
    /// an hour, and are dropped by [`invalidate_endpoint`](Self::invalidate_endpoint)).
    pub async fn data_endpoint(&self, stream: &StreamId, api: ApiName) -> Result<String> {
        let key = (stream.clone(), api.clone());
        if let Some(hit) = self.inner.endpoints.lock().get(&key)
            && hit.fetched.elapsed() < self.inner.endpoint_ttl
        {
            return Ok(hit.url.clone());
        }
        let mut request = self.inner.control.get_data_endpoint().api_name(api.clone());
        request = match stream {
            StreamId::Name(name) => request.stream_name(name),
            StreamId::Arn(arn) => request.stream_arn(arn),
        };
        let output = request.send().await.map_err(|e| {
            Error::from_sdk("GetDataEndpoint", e).context(format!("stream {stream}"))
        })?;
        let url = output
            .data_endpoint()
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("GetDataEndpoint returned no DataEndpoint for stream {stream}"),
                )
            })?
            .to_owned();
        tracing::debug!(%stream, api = api.as_str(), endpoint = %url, "data endpoint");
        self.inner.endpoints.lock().insert(
            key,
            CachedEndpoint {
                url: url.clone(),
                fetched: Instant::now(),
            },
        );
        Ok(url)
    }

    /// Why `ListFragments` is unavailable to this client (and its clones), if a call was
    /// refused: [`ErrorKind::NotAuthorized`] (the IAM policy does not allow it) or
    /// [`ErrorKind::UnsupportedOperation`] (the endpoint does not know it).
    pub fn list_fragments_refused(&self) -> Option<ErrorKind> {
        *self.inner.list_fragments_refused.lock()
    }

    /// Remembers that `ListFragments` was refused with `kind`; true the first time.
    pub(crate) fn note_list_fragments_refused(&self, kind: ErrorKind) -> bool {
        self.inner
            .list_fragments_refused
            .lock()
            .replace(kind)
            .is_none()
    }

    /// Forgets the cached endpoint of `stream` for `api` (call it when a request made through
    /// the endpoint failed, so that the next call asks `GetDataEndpoint` again).
    pub fn invalidate_endpoint(&self, stream: &StreamId, api: ApiName) {
        self.inner.endpoints.lock().remove(&(stream.clone(), api));
    }

    /// An archived-media client at the data endpoint of `stream` for `api` (clients are reused
    /// per endpoint).
    pub async fn archived_media(
        &self,
        stream: &StreamId,
        api: ApiName,
    ) -> Result<aws_sdk_kinesisvideoarchivedmedia::Client> {
        let endpoint = self.data_endpoint(stream, api).await?;
        let mut clients = self.inner.media_clients.lock();
        let client = clients.entry(endpoint.clone()).or_insert_with(|| {
            let config =
                aws_sdk_kinesisvideoarchivedmedia::config::Builder::from(&self.inner.config)
                    .endpoint_url(endpoint)
                    .build();
            aws_sdk_kinesisvideoarchivedmedia::Client::from_conf(config)
        });
        Ok(client.clone())
    }

    /// A media-API client (`GetMedia`) at the `GET_MEDIA` data endpoint of `stream` (reused
    /// per endpoint). The SDK's own retries are off: a GetMedia caller reconnects with its own
    /// backoff and must stay within KVS's 5 calls per second per stream.
    pub async fn media(&self, stream: &StreamId) -> Result<aws_sdk_kinesisvideomedia::Client> {
        let endpoint = self.data_endpoint(stream, ApiName::GetMedia).await?;
        let mut clients = self.inner.get_media_clients.lock();
        let client = clients.entry(endpoint.clone()).or_insert_with(|| {
            let config = aws_sdk_kinesisvideomedia::config::Builder::from(&self.inner.config)
                .endpoint_url(endpoint)
                .retry_config(aws_config::retry::RetryConfig::disabled())
                .build();
            aws_sdk_kinesisvideomedia::Client::from_conf(config)
        });
        Ok(client.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_are_validated() {
        assert!(StreamId::from("cam-1_a.b").validate().is_ok());
        assert!(matches!(
            StreamId::from("arn:aws:kinesisvideo:us-east-1:1:stream/x/1"),
            StreamId::Arn(_)
        ));
        let err = StreamId::from("bad name").validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert_eq!(err.invalid_option(), Some("stream_name"));
        assert!(err.to_string().contains("bad name"));
        assert!(StreamId::Name(String::new()).validate().is_err());
        assert!(StreamId::Name("x".repeat(257)).validate().is_err());
        assert!(StreamId::Arn("x".repeat(10)).validate().is_err());
    }
}
