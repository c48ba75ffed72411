//! `KvsClient` against the emulator: data-endpoint caching, invalidation and archived-media
//! clients at the endpoint.

mod common;

use std::time::Duration;

use aws_sdk_kinesisvideo::types::ApiName;
use kvs_frames::ErrorKind;
use kvs_frames::kvs::{KvsClient, StreamId};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_endpoints_are_cached_per_stream_and_api_and_reloaded_after_invalidation() {
    let emulator = common::start(vec![common::small("cam-1"), common::small("cam-2")]);
    emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10));
    let client = KvsClient::new(&emulator.sdk_config());
    let cam1 = StreamId::from("cam-1");
    let calls = || {
        emulator
            .request_stats()
            .api_calls
            .get("GetDataEndpoint")
            .copied()
            .unwrap_or(0)
    };

    let url = client
        .data_endpoint(&cam1, ApiName::GetHlsStreamingSessionUrl)
        .await
        .unwrap();
    assert_eq!(url, emulator.data_endpoint());
    client
        .data_endpoint(&cam1, ApiName::GetHlsStreamingSessionUrl)
        .await
        .unwrap();
    assert_eq!(calls(), 1, "second lookup served from the cache");
    client.data_endpoint(&cam1, ApiName::GetClip).await.unwrap();
    client
        .data_endpoint(&StreamId::from("cam-2"), ApiName::GetHlsStreamingSessionUrl)
        .await
        .unwrap();
    assert_eq!(calls(), 3, "one entry per (stream, API)");
    client.invalidate_endpoint(&cam1, ApiName::GetHlsStreamingSessionUrl);
    client
        .data_endpoint(&cam1, ApiName::GetHlsStreamingSessionUrl)
        .await
        .unwrap();
    assert_eq!(calls(), 4, "reloaded after invalidation");

    // The archived-media client really talks to the data endpoint.
    let media = client
        .archived_media(&cam1, ApiName::GetHlsStreamingSessionUrl)
        .await
        .unwrap();
    let out = media
        .get_hls_streaming_session_url()
        .stream_name("cam-1")
        .send()
        .await
        .unwrap();
    assert!(
        out.hls_streaming_session_url()
            .unwrap()
            .starts_with(emulator.data_endpoint())
    );

    // Unknown streams are typed errors with the stream in the context.
    let err = client
        .data_endpoint(&StreamId::from("nope"), ApiName::GetClip)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StreamNotFound);
    assert!(err.to_string().contains("nope"), "{err}");
}

/// A credentials provider that fails with `failure` for the first `failures` calls.
#[derive(Debug)]
struct Flaky {
    failures: std::sync::atomic::AtomicUsize,
    failure: fn() -> aws_credential_types::provider::error::CredentialsError,
}

impl aws_credential_types::provider::ProvideCredentials for Flaky {
    fn provide_credentials<'a>(
        &'a self,
    ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        use std::sync::atomic::Ordering;
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return aws_credential_types::provider::future::ProvideCredentials::ready(Err((self
                .failure)(
            )));
        }
        aws_credential_types::provider::future::ProvideCredentials::ready(Ok(
            aws_credential_types::Credentials::new("AKIDTEST", "secret", None, None, "flaky"),
        ))
    }
}

/// The real SDK's path for a failing credentials provider (identity resolution inside the
/// orchestrator): a provider that fails (STS/IMDS answering 503) or times out is transient, one
/// that finds no credentials is fatal; classified by type, whatever the text says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_provider_failures_are_classified_by_type() {
    use aws_credential_types::provider::error::CredentialsError;
    let emulator = common::start(vec![common::small("cam-1")]);
    type Case = (fn() -> CredentialsError, ErrorKind, bool);
    let cases: [Case; 4] = [
        (
            || CredentialsError::provider_error("IMDS answered 503 (credentials unavailable)"),
            ErrorKind::ServiceUnavailable,
            true,
        ),
        (
            || CredentialsError::provider_timed_out(Duration::from_secs(5)),
            ErrorKind::Timeout,
            true,
        ),
        (
            || CredentialsError::not_loaded("no credentials in the environment"),
            ErrorKind::NotAuthorized,
            false,
        ),
        (
            || CredentialsError::invalid_configuration("profile `x` has no region"),
            ErrorKind::InvalidConfig,
            false,
        ),
    ];
    for (failure, kind, transient) in cases {
        let config = emulator
            .sdk_config()
            .into_builder()
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(Flaky {
                    failures: 1.into(),
                    failure,
                }),
            )
            .build();
        let client = KvsClient::new(&config);
        let cam = StreamId::from("cam-1");
        let err = client
            .data_endpoint(&cam, ApiName::GetHlsStreamingSessionUrl)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind, "{err}");
        assert_eq!(err.is_transient(), transient, "{err}");
        // The next call gets credentials and succeeds.
        client
            .data_endpoint(&cam, ApiName::GetHlsStreamingSessionUrl)
            .await
            .unwrap();
    }
}
