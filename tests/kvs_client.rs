//! `KvsClient` against the emulator: data-endpoint caching, invalidation and archived-media
//! clients at the endpoint.
#![cfg(feature = "emulator")]

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
