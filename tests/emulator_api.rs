//! The emulator's control plane and GetHLSStreamingSessionURL through the real AWS Rust SDK,
//! over real HTTP on 127.0.0.1.

mod common;

use std::time::{Duration, SystemTime};

use aws_sdk_kinesisvideo::error::ProvideErrorMetadata;
use aws_sdk_kinesisvideo::types::{ApiName, ComparisonOperator, Status, StreamNameCondition};
use aws_sdk_kinesisvideoarchivedmedia::types::{
    ContainerFormat, HlsFragmentSelector, HlsFragmentSelectorType, HlsPlaybackMode,
    HlsTimestampRange,
};
use common::{SessionParams, dt, small};
use kvs_emulator::{Emulator, StreamSpec, StreamStatus};
use kvs_frames::error::{Error, ErrorKind};

fn no_camera(name: &str) -> StreamSpec {
    StreamSpec::new(name).camera(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_streams_paginates_and_filters_by_prefix() {
    let emulator = Emulator::builder()
        .stream(no_camera("site-a-cam-1"))
        .stream(no_camera("site-a-cam-2"))
        .stream(no_camera("site-a-cam-3"))
        .stream(no_camera("site-b-cam-1"))
        .stream(no_camera("lobby").status(StreamStatus::Creating))
        .list_streams_page_limit(2)
        .start()
        .unwrap();
    let client = common::control(&emulator);

    // Page by page, by hand.
    let mut names = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let out = client
            .list_streams()
            .max_results(10)
            .set_next_token(token.clone())
            .send()
            .await
            .unwrap();
        pages += 1;
        assert!(out.stream_info_list().len() <= 2);
        names.extend(
            out.stream_info_list()
                .iter()
                .map(|s| s.stream_name().unwrap().to_owned()),
        );
        token = out.next_token().map(str::to_owned);
        if token.is_none() {
            break;
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(
        names,
        [
            "lobby",
            "site-a-cam-1",
            "site-a-cam-2",
            "site-a-cam-3",
            "site-b-cam-1"
        ]
    );

    // The SDK's own paginator with a prefix condition.
    let infos: Vec<_> = client
        .list_streams()
        .stream_name_condition(
            StreamNameCondition::builder()
                .comparison_operator(ComparisonOperator::BeginsWith)
                .comparison_value("site-a-")
                .build(),
        )
        .into_paginator()
        .items()
        .send()
        .collect::<Result<Vec<_>, _>>()
        .await
        .unwrap();
    let names: Vec<_> = infos.iter().map(|s| s.stream_name().unwrap()).collect();
    assert_eq!(names, ["site-a-cam-1", "site-a-cam-2", "site-a-cam-3"]);
    assert!(infos.iter().all(|s| s.status() == Some(&Status::Active)));

    let lobby = client
        .describe_stream()
        .stream_name("lobby")
        .send()
        .await
        .unwrap();
    assert_eq!(
        lobby.stream_info().unwrap().status(),
        Some(&Status::Creating)
    );

    // A bad token is an InvalidArgumentException.
    let err = client
        .list_streams()
        .next_token("garbage")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("InvalidArgumentException"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_data_endpoint_create_and_delete() {
    let emulator = common::start(vec![small("cam-1").device_name("door")]);
    let client = common::control(&emulator);

    let info = client
        .describe_stream()
        .stream_name("cam-1")
        .send()
        .await
        .unwrap()
        .stream_info
        .unwrap();
    assert_eq!(info.stream_name(), Some("cam-1"));
    assert_eq!(info.device_name(), Some("door"));
    assert_eq!(info.media_type(), Some("video/h264"));
    assert_eq!(info.data_retention_in_hours(), Some(24));
    assert!(
        info.stream_arn()
            .unwrap()
            .starts_with("arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam-1/")
    );
    let created = SystemTime::try_from(*info.creation_time().unwrap()).unwrap();
    assert!(created.elapsed().unwrap() < Duration::from_secs(60));

    // Describe by ARN too.
    let by_arn = client
        .describe_stream()
        .stream_arn(info.stream_arn().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(by_arn.stream_info().unwrap().stream_name(), Some("cam-1"));

    for api in [
        ApiName::GetHlsStreamingSessionUrl,
        ApiName::GetClip,
        ApiName::GetMedia,
    ] {
        let endpoint = client
            .get_data_endpoint()
            .stream_name("cam-1")
            .api_name(api)
            .send()
            .await
            .unwrap();
        assert_eq!(endpoint.data_endpoint(), Some(emulator.data_endpoint()));
        assert_ne!(emulator.data_endpoint(), emulator.endpoint());
    }

    // Create, duplicate, delete with a wrong and the right version.
    let arn = client
        .create_stream()
        .stream_name("new-stream")
        .data_retention_in_hours(2)
        .media_type("video/h264")
        .send()
        .await
        .unwrap()
        .stream_arn
        .unwrap();
    let dup = client
        .create_stream()
        .stream_name("new-stream")
        .send()
        .await
        .unwrap_err();
    assert!(
        dup.as_service_error()
            .unwrap()
            .is_resource_in_use_exception()
    );
    let err = client
        .delete_stream()
        .stream_arn(&arn)
        .current_version("not-the-version")
        .send()
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("VersionMismatchException"));
    client
        .delete_stream()
        .stream_arn(&arn)
        .send()
        .await
        .unwrap();
    let gone = client
        .describe_stream()
        .stream_name("new-stream")
        .send()
        .await
        .unwrap_err();
    assert!(
        gone.as_service_error()
            .unwrap()
            .is_resource_not_found_exception()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_sdk_errors_and_their_classification() {
    let emulator = common::start(vec![small("cam-1")]);
    emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10));
    let client = common::control(&emulator);

    // Not found.
    let err = client
        .describe_stream()
        .stream_name("no-such-stream")
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_resource_not_found_exception()
    );
    assert_eq!(
        Error::from_sdk("DescribeStream", err).kind(),
        ErrorKind::StreamNotFound
    );

    // Invalid argument: an API name KVS does not know.
    let err = client
        .get_data_endpoint()
        .stream_name("cam-1")
        .api_name(ApiName::from("GET_EVERYTHING"))
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_invalid_argument_exception()
    );
    assert!(err.message().unwrap().contains("GET_EVERYTHING"));
    assert_eq!(
        Error::from_sdk("GetDataEndpoint", err).kind(),
        ErrorKind::InvalidArgument
    );

    // Throttled.
    let media = common::media(&emulator, "cam-1").await;
    emulator
        .faults("cam-1")
        .unwrap()
        .throttle(Duration::from_secs(30));
    let err = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_client_limit_exceeded_exception()
    );
    let e = Error::from_sdk("GetHLSStreamingSessionURL", err);
    assert_eq!(e.kind(), ErrorKind::Throttled);
    assert!(e.is_transient());
    emulator.faults("cam-1").unwrap().clear();

    // Not authorized.
    emulator
        .faults("cam-1")
        .unwrap()
        .deny_access(Duration::from_secs(30));
    let err = client
        .describe_stream()
        .stream_name("cam-1")
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_not_authorized_exception()
    );
    let err = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_not_authorized_exception()
    );
    let e = Error::from_sdk("GetHLSStreamingSessionURL", err);
    assert_eq!(e.kind(), ErrorKind::NotAuthorized);
    assert!(!e.is_transient());
    emulator.faults("cam-1").unwrap().clear();

    // Unsigned requests are refused like AWS refuses them.
    let response = reqwest::Client::new()
        .post(format!("{}/describeStream", emulator.endpoint()))
        .body(r#"{"StreamName":"cam-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response.headers()["x-amzn-ErrorType"],
        "MissingAuthenticationTokenException"
    );
    // … and so are requests signed for another service.
    let response = reqwest::Client::new()
        .post(format!("{}/describeStream", emulator.endpoint()))
        .header("x-amz-date", "20261121T000000Z")
        .header(
            "authorization",
            "AWS4-HMAC-SHA256 Credential=AKID/20261121/us-east-1/s3/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc",
        )
        .body(r#"{"StreamName":"cam-1"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 403);
    assert_eq!(
        response.headers()["x-amzn-ErrorType"],
        "InvalidSignatureException"
    );

    let stats = emulator.request_stats();
    assert!(stats.errors["ResourceNotFoundException"] >= 1);
    assert!(stats.api_calls["DescribeStream"] >= 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_url_in_each_playback_mode() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(6))]);
    common::wait_fragments(&emulator, "cam-1", 6, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let truth = emulator.ground_truth("cam-1");
    let start = truth[1].producer_start;
    let end = truth[4].producer_start;

    let live = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap();
    let on_demand = common::session(
        &media,
        "cam-1",
        &SessionParams {
            mode: HlsPlaybackMode::OnDemand,
            range: Some((dt(start), Some(dt(end)))),
            ..SessionParams::default()
        },
    )
    .await
    .unwrap();
    let replay = common::session(
        &media,
        "cam-1",
        &SessionParams {
            mode: HlsPlaybackMode::LiveReplay,
            range: Some((dt(start), None)),
            ..SessionParams::default()
        },
    )
    .await
    .unwrap();
    for url in [&live, &on_demand, &replay] {
        assert!(url.starts_with(&format!(
            "{}/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=",
            emulator.data_endpoint()
        )));
        assert!(url.ends_with('~'), "KVS tokens end with ~: {url}");
    }
    assert_ne!(live, on_demand);
    assert_ne!(on_demand, replay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_parameters_are_validated_like_kvs() {
    let emulator = common::start(vec![
        small("cam-1").history(Duration::from_secs(2)),
        no_camera("no-retention").retention_hours(0),
        no_camera("audio").media_type("audio/aac"),
        no_camera("empty"),
    ]);
    common::wait_fragments(&emulator, "cam-1", 2, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let now = SystemTime::now();
    let hour_ago = now - Duration::from_secs(3600);

    let invalid: Vec<(&str, SessionParams)> = vec![
        (
            "expires below 300",
            SessionParams {
                expires: Some(299),
                ..Default::default()
            },
        ),
        (
            "expires above 43200",
            SessionParams {
                expires: Some(43_201),
                ..Default::default()
            },
        ),
        (
            "max results 0",
            SessionParams {
                max_results: Some(0),
                ..Default::default()
            },
        ),
        (
            "max results 5001",
            SessionParams {
                max_results: Some(5001),
                ..Default::default()
            },
        ),
        (
            "LIVE with a range",
            SessionParams {
                range: Some((dt(hour_ago), None)),
                ..Default::default()
            },
        ),
        (
            "ON_DEMAND without a range",
            SessionParams {
                mode: HlsPlaybackMode::OnDemand,
                ..Default::default()
            },
        ),
        (
            "ON_DEMAND without an end",
            SessionParams {
                mode: HlsPlaybackMode::OnDemand,
                range: Some((dt(hour_ago), None)),
                ..Default::default()
            },
        ),
        (
            "range over 24 h",
            SessionParams {
                mode: HlsPlaybackMode::OnDemand,
                range: Some((dt(now - Duration::from_secs(25 * 3600)), Some(dt(now)))),
                ..Default::default()
            },
        ),
        (
            "end before start",
            SessionParams {
                mode: HlsPlaybackMode::OnDemand,
                range: Some((dt(now), Some(dt(hour_ago)))),
                ..Default::default()
            },
        ),
    ];
    for (what, params) in invalid {
        let err = common::session(&media, "cam-1", &params).await.unwrap_err();
        let service = err
            .as_service_error()
            .unwrap_or_else(|| panic!("{what}: {err:?}"));
        assert!(
            service.is_invalid_argument_exception(),
            "{what}: {service:?}"
        );
        assert_eq!(
            Error::from_sdk("GetHLSStreamingSessionURL", err).kind(),
            ErrorKind::InvalidArgument,
            "{what}"
        );
    }

    // A container format that does not exist: a clear refusal naming it.
    let err = media
        .get_hls_streaming_session_url()
        .stream_name("cam-1")
        .container_format(ContainerFormat::from("MP4_TS"))
        .send()
        .await
        .unwrap_err();
    assert!(err.message().unwrap().contains("MP4_TS"), "{err:?}");

    // Both name and ARN.
    let err = media
        .get_hls_streaming_session_url()
        .stream_name("cam-1")
        .stream_arn("arn:aws:kinesisvideo:us-east-1:123456789012:stream/cam-1/1")
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_invalid_argument_exception()
    );

    // Streams that cannot be played.
    let err = common::session(&media, "no-retention", &SessionParams::default())
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_no_data_retention_exception()
    );
    assert_eq!(
        Error::from_sdk("GetHLSStreamingSessionURL", err).kind(),
        ErrorKind::UnsupportedMedia
    );
    let err = common::session(&media, "audio", &SessionParams::default())
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_unsupported_stream_media_type_exception()
    );
    // LIVE on a stream without recent fragments: 404 "No fragments found".
    let err = common::session(&media, "empty", &SessionParams::default())
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_resource_not_found_exception()
    );
    let e = Error::from_sdk("GetHLSStreamingSessionURL", err);
    assert_eq!(e.kind(), ErrorKind::NoFragments, "{e}");
    assert!(e.is_transient());
    // ON_DEMAND over a range with no fragments.
    let err = media
        .get_hls_streaming_session_url()
        .stream_name("cam-1")
        .playback_mode(HlsPlaybackMode::OnDemand)
        .hls_fragment_selector(
            HlsFragmentSelector::builder()
                .fragment_selector_type(HlsFragmentSelectorType::ServerTimestamp)
                .timestamp_range(
                    HlsTimestampRange::builder()
                        .start_timestamp(dt(hour_ago))
                        .end_timestamp(dt(hour_ago + Duration::from_secs(60)))
                        .build(),
                )
                .build(),
        )
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_resource_not_found_exception()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_only_streams_hold_their_history_and_stop_encoding() {
    let emulator = common::start(vec![
        small("archive")
            .history(Duration::from_millis(3500))
            .live(false),
    ]);
    common::wait_fragments(&emulator, "archive", 3, Duration::from_secs(20)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while emulator.camera_status("archive").unwrap().running {
        assert!(
            std::time::Instant::now() < deadline,
            "the camera keeps running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = emulator.camera_status("archive").unwrap();
    assert_eq!(
        status.frames_encoded, 75,
        "whole fragments of history: {status:?}"
    );
    assert_eq!(status.last_error, None);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        emulator.ground_truth("archive").len(),
        3,
        "nothing after the history"
    );
    // An archive-only stream needs history.
    let err = Emulator::builder()
        .stream(small("x").live(false))
        .start()
        .unwrap_err();
    assert_eq!(err.invalid_option(), Some("StreamSpec::history"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archived_media_is_served_at_the_data_endpoint_only() {
    let emulator = common::start(vec![common::small("cam-1")]);
    common::wait_fragments(&emulator, "cam-1", 1, Duration::from_secs(20)).await;
    // A client that skips GetDataEndpoint and calls the control endpoint fails, clearly.
    let wrong = aws_sdk_kinesisvideoarchivedmedia::Client::new(&emulator.sdk_config());
    let err = wrong
        .get_hls_streaming_session_url()
        .stream_name("cam-1")
        .send()
        .await
        .unwrap_err();
    let err = kvs_frames::Error::from_sdk("GetHLSStreamingSessionURL", err);
    assert_eq!(err.http_status(), Some(404), "{err}");
    assert!(err.to_string().contains("data endpoint"), "{err}");
    // The data endpoint serves it, and the HLS URLs point at it.
    let media = common::media(&emulator, "cam-1").await;
    let url = common::session(&media, "cam-1", &common::SessionParams::default())
        .await
        .unwrap();
    assert!(url.starts_with(emulator.data_endpoint()), "{url}");
    assert_eq!(common::get(&url).await.unwrap().status, 200);
    let on_control = url.replace(emulator.data_endpoint(), emulator.endpoint());
    let refused = common::get(&on_control).await.unwrap();
    assert_eq!(
        (refused.status, refused.error_type.as_deref()),
        (404, Some("UnknownOperationException"))
    );
    // And the control plane is not served at the data endpoint.
    let config = aws_sdk_kinesisvideo::config::Builder::from(&emulator.sdk_config())
        .endpoint_url(emulator.data_endpoint())
        .build();
    let err = aws_sdk_kinesisvideo::Client::from_conf(config)
        .describe_stream()
        .stream_name("cam-1")
        .send()
        .await
        .unwrap_err();
    let err = kvs_frames::Error::from_sdk("DescribeStream", err);
    assert!(err.to_string().contains("control plane"), "{err}");
}
