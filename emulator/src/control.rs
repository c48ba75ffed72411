//! The control plane: ListStreams, DescribeStream, GetDataEndpoint, CreateStream, DeleteStream.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::http::{KvsError, check_sigv4, epoch_seconds, json_response, parse_json};
use super::store::{State, StreamInfo, StreamStatus, valid_stream_name};

const API_NAMES: [&str; 8] = [
    "PUT_MEDIA",
    "GET_MEDIA",
    "LIST_FRAGMENTS",
    "GET_MEDIA_FOR_FRAGMENT_LIST",
    "GET_HLS_STREAMING_SESSION_URL",
    "GET_DASH_STREAMING_SESSION_URL",
    "GET_CLIP",
    "GET_IMAGES",
];

/// Runs a handler after the SigV4 check, counting the call and any error.
pub(crate) fn respond(
    state: &State,
    operation: &str,
    headers: &HeaderMap,
    handler: impl FnOnce() -> Result<Response, KvsError>,
) -> Response {
    state.count_api(operation);
    let result = check_sigv4(headers)
        .and_then(|()| state.refusals.check(operation))
        .and_then(|()| handler());
    match result {
        Ok(response) => response,
        Err(error) => {
            tracing::debug!(operation, code = error.code, message = %error.message, "KVS error response");
            state.count_error(error.code);
            error.into_response()
        }
    }
}

pub(crate) fn stream_info_json(info: &StreamInfo) -> Value {
    let mut value = json!({
        "StreamName": info.name,
        "StreamARN": info.arn,
        "MediaType": info.media_type,
        "KmsKeyId": info.kms_key_id,
        "Version": info.version,
        "Status": info.status.as_str(),
        "CreationTime": epoch_seconds(info.created),
        "DataRetentionInHours": info.retention_hours,
    });
    if let (Some(name), Some(map)) = (&info.device_name, value.as_object_mut()) {
        map.insert("DeviceName".to_owned(), json!(name));
    }
    value
}

/// Resolves `StreamName` / `StreamARN` (exactly one) to a stream name that exists.
pub(crate) fn resolve_stream(
    state: &State,
    name: Option<&str>,
    arn: Option<&str>,
) -> Result<String, KvsError> {
    let streams = state.streams.lock();
    let found = match (name, arn) {
        (Some(_), Some(_)) => Err(KvsError::invalid_argument(
            "Specify either the StreamName or the StreamARN, not both.",
        )),
        (None, None) => Err(KvsError::invalid_argument(
            "Either StreamName or StreamARN must be specified.",
        )),
        (Some(name), None) => {
            if !valid_stream_name(name) {
                return Err(KvsError::invalid_argument(format!(
                    "1 validation error detected: Value '{name}' at 'streamName' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9_.-]+"
                )));
            }
            if streams.contains_key(name) {
                Ok(name.to_owned())
            } else {
                Err(KvsError::stream_not_found(name))
            }
        }
        (None, Some(arn)) => streams
            .values()
            .find(|s| s.info.arn == arn)
            .map(|s| s.info.name.clone())
            .ok_or_else(|| {
                KvsError::not_found(format!("The requested stream with ARN {arn} was not found"))
            }),
    }?;
    if streams
        .get(&found)
        .is_some_and(|s| s.faults.access_denied())
    {
        return Err(KvsError::new(
            StatusCode::FORBIDDEN,
            "NotAuthorizedException",
            format!(
                "User: arn:aws:iam::{}:user/emulator is not authorized to perform this action on resource: stream {found}",
                super::ACCOUNT_ID
            ),
        ));
    }
    Ok(found)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct NameCondition {
    comparison_operator: Option<String>,
    comparison_value: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ListStreamsInput {
    max_results: Option<i64>,
    next_token: Option<String>,
    stream_name_condition: Option<NameCondition>,
}

pub(crate) async fn list_streams(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "ListStreams", &headers, || {
        let input: ListStreamsInput = parse_json(&body)?;
        let max = input.max_results.unwrap_or(10_000);
        if !(1..=10_000).contains(&max) {
            return Err(KvsError::invalid_argument(format!(
                "MaxResults {max} is out of range: it must be between 1 and 10000"
            )));
        }
        let mut page = usize::try_from(max).unwrap_or(10_000);
        if let Some(limit) = state.settings.list_streams_page_limit {
            page = page.min(limit);
        }
        let prefix = match input.stream_name_condition {
            Some(cond) => {
                if cond.comparison_operator.as_deref().unwrap_or("BEGINS_WITH") != "BEGINS_WITH" {
                    return Err(KvsError::invalid_argument(
                        "ComparisonOperator must be BEGINS_WITH",
                    ));
                }
                cond.comparison_value.unwrap_or_default()
            }
            None => String::new(),
        };
        // The token is the last name of the previous page.
        let after = match input.next_token.as_deref() {
            Some(token) => Some(
                decode_token(token)
                    .ok_or_else(|| KvsError::invalid_argument("The NextToken is not valid"))?,
            ),
            None => None,
        };
        let streams = state.streams.lock();
        let mut matching = streams
            .values()
            .filter(|s| s.info.name.starts_with(&prefix))
            .filter(|s| after.as_deref().is_none_or(|a| s.info.name.as_str() > a));
        let list: Vec<Value> = matching
            .by_ref()
            .take(page)
            .map(|s| stream_info_json(&s.info))
            .collect();
        let more = matching.next().is_some();
        let mut out = json!({ "StreamInfoList": list });
        let last = list
            .last()
            .and_then(|v| v.get("StreamName"))
            .and_then(Value::as_str);
        if let (true, Some(last), Some(map)) = (more, last, out.as_object_mut()) {
            map.insert("NextToken".to_owned(), json!(encode_token(last)));
        }
        Ok(json_response(out))
    })
}

fn encode_token(name: &str) -> String {
    let hex: String = name.bytes().map(|b| format!("{b:02x}")).collect();
    format!("kvsemu-{hex}")
}

fn decode_token(token: &str) -> Option<String> {
    let hex = token.strip_prefix("kvsemu-")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect();
    String::from_utf8(bytes?).ok()
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct StreamRef {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
}

pub(crate) async fn describe_stream(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "DescribeStream", &headers, || {
        let input: StreamRef = parse_json(&body)?;
        let name = resolve_stream(
            &state,
            input.stream_name.as_deref(),
            input.stream_arn.as_deref(),
        )?;
        let streams = state.streams.lock();
        let stream = streams
            .get(&name)
            .ok_or_else(|| KvsError::stream_not_found(&name))?;
        Ok(json_response(
            json!({ "StreamInfo": stream_info_json(&stream.info) }),
        ))
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct GetDataEndpointInput {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
    #[serde(rename = "APIName")]
    api_name: Option<String>,
}

pub(crate) async fn get_data_endpoint(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "GetDataEndpoint", &headers, || {
        let input: GetDataEndpointInput = parse_json(&body)?;
        let api = input.api_name.unwrap_or_default();
        if !API_NAMES.contains(&api.as_str()) {
            return Err(KvsError::invalid_argument(format!(
                "APIName '{api}' is not valid: it must be one of {}",
                API_NAMES.join(", ")
            )));
        }
        resolve_stream(
            &state,
            input.stream_name.as_deref(),
            input.stream_arn.as_deref(),
        )?;
        Ok(json_response(
            json!({ "DataEndpoint": state.settings.data_endpoint }),
        ))
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct CreateStreamInput {
    stream_name: Option<String>,
    device_name: Option<String>,
    media_type: Option<String>,
    kms_key_id: Option<String>,
    data_retention_in_hours: Option<i64>,
}

pub(crate) async fn create_stream(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "CreateStream", &headers, || {
        let input: CreateStreamInput = parse_json(&body)?;
        let name = input.stream_name.unwrap_or_default();
        if !valid_stream_name(&name) {
            return Err(KvsError::invalid_argument(format!(
                "StreamName '{name}' is not valid: it must be 1-256 characters of [a-zA-Z0-9_.-]"
            )));
        }
        let retention = input.data_retention_in_hours.unwrap_or(0);
        let retention = u32::try_from(retention)
            .ok()
            .filter(|h| *h <= 87_600)
            .ok_or_else(|| {
                KvsError::invalid_argument(format!(
                    "DataRetentionInHours {retention} is out of range: it must be between 0 and 87600"
                ))
            })?;
        let info = state.new_info(
            &name,
            StreamStatus::Active,
            input.media_type,
            input.device_name,
            input.kms_key_id,
            retention,
        );
        let arn = info.arn.clone();
        state
            .insert_stream(
                info,
                crate::FrameRate::integer(25),
                std::time::Duration::from_millis(300),
                super::DecodeTimeOrigin::Session,
            )
            .map_err(|_| {
                KvsError::new(
                    StatusCode::BAD_REQUEST,
                    "ResourceInUseException",
                    format!("The stream {name} already exists"),
                )
            })?;
        Ok(json_response(json!({ "StreamARN": arn })))
    })
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct DeleteStreamInput {
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
    current_version: Option<String>,
}

pub(crate) async fn delete_stream(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "DeleteStream", &headers, || {
        let input: DeleteStreamInput = parse_json(&body)?;
        let Some(arn) = input.stream_arn else {
            return Err(KvsError::invalid_argument("StreamARN must be specified."));
        };
        let name = resolve_stream(&state, None, Some(&arn))?;
        if let Some(version) = input.current_version {
            let streams = state.streams.lock();
            if streams
                .get(&name)
                .is_some_and(|s| s.info.version != version)
            {
                return Err(KvsError::new(
                    StatusCode::BAD_REQUEST,
                    "VersionMismatchException",
                    format!("The version {version} does not match the stream's current version"),
                ));
            }
        }
        state.remove_stream(&name);
        Ok(json_response(json!({})))
    })
}
