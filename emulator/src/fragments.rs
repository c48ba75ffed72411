//! The archived-media `ListFragments` API (`POST /listFragments`).
//!
//! Follows the service model (`kinesis-video-archived-media` 2017-09-30): `StreamName` or
//! `StreamARN`, `MaxResults` 1–1000, `NextToken`, and a `FragmentSelector` (required unless a
//! `NextToken` is given) whose `TimestampRange` selects the fragments whose *start* timestamp lies
//! in `[StartTimestamp, EndTimestamp]` (both inclusive). KVS returns the results "in no specific
//! order, even across pages"; the emulator lists each page newest first (pages themselves go
//! forward in time), so that a client that forgets to sort is caught by its tests.
//!
//! Choices where KVS documents nothing: `MaxResults` defaults to 100; a stream that is not ACTIVE
//! gives `ResourceNotFoundException` (as GetClip and HLS do); `EndTimestamp` before
//! `StartTimestamp` gives `InvalidArgumentException`; an empty range gives an empty list (not an
//! error). The `throttle` and `server_errors` faults apply (400 `ClientLimitExceededException`,
//! 500 `InternalFailure`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{Value, json};

use super::control::{resolve_stream, respond};
use super::hls::{FragmentSelector, parse_selector, parse_time, selector_time};
use super::http::{KvsError, epoch_seconds, json_response, parse_json, to_millis};
use super::session::Selector;
use super::store::{State, StoredFragment, StreamState, StreamStatus};

/// `ListFragmentsMaxResults` in the service model.
const MAX_RESULTS: i64 = 1000;
/// Not documented by KVS: the emulator's page size when `MaxResults` is absent.
const DEFAULT_MAX_RESULTS: i64 = 100;
/// Prefix of the emulator's page tokens (the rest is hex, within the model's token pattern).
const TOKEN_PREFIX: &str = "kvsemulf";

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ListFragmentsInput {
    stream_name: Option<String>,
    #[serde(rename = "StreamARN")]
    stream_arn: Option<String>,
    max_results: Option<i64>,
    next_token: Option<String>,
    fragment_selector: Option<FragmentSelector>,
}

/// What a page request asks for: the query, and where the previous page ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Query {
    selector: Selector,
    start_ms: u64,
    end_ms: u64,
    /// Only fragments with a larger stream index (the last one of the previous page).
    after: Option<u64>,
}

impl Query {
    fn encode(&self) -> String {
        let plain = format!(
            "{}:{}:{}:{}",
            match self.selector {
                Selector::Producer => 'P',
                Selector::Server => 'S',
            },
            self.start_ms,
            self.end_ms,
            self.after.map_or_else(String::new, |a| a.to_string())
        );
        let mut token = String::from(TOKEN_PREFIX);
        for b in plain.bytes() {
            let _ = write!(token, "{b:02x}");
        }
        token
    }

    fn decode(token: &str) -> Option<Query> {
        let hex = token.strip_prefix(TOKEN_PREFIX)?;
        if hex.len() % 2 != 0 {
            return None;
        }
        let bytes: Option<Vec<u8>> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect();
        let plain = String::from_utf8(bytes?).ok()?;
        let mut parts = plain.split(':');
        let selector = match parts.next()? {
            "P" => Selector::Producer,
            "S" => Selector::Server,
            _ => return None,
        };
        let start_ms = parts.next()?.parse().ok()?;
        let end_ms = parts.next()?.parse().ok()?;
        let after = match parts.next()? {
            "" => None,
            a => Some(a.parse().ok()?),
        };
        if parts.next().is_some() {
            return None;
        }
        Some(Query {
            selector,
            start_ms,
            end_ms,
            after,
        })
    }

    fn matches(&self, fragment: &StoredFragment) -> bool {
        let t = millis(selector_time(fragment, self.selector));
        t >= self.start_ms && t <= self.end_ms && self.after.is_none_or(|a| fragment.index > a)
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// A required timestamp of the range, in milliseconds.
fn required_time(field: &str, value: Option<f64>) -> Result<u64, KvsError> {
    parse_time(field, value)?.map(millis).ok_or_else(|| {
        KvsError::invalid_argument(format!("TimestampRange.{field} must be specified"))
    })
}

fn query_from_selector(selector: FragmentSelector) -> Result<Query, KvsError> {
    let Some(selector_type) = selector.fragment_selector_type.as_deref() else {
        return Err(KvsError::invalid_argument(
            "FragmentSelector.FragmentSelectorType must be specified",
        ));
    };
    let selector_type = parse_selector(Some(selector_type))?;
    let range = selector.timestamp_range.ok_or_else(|| {
        KvsError::invalid_argument("FragmentSelector.TimestampRange must be specified")
    })?;
    let start_ms = required_time("StartTimestamp", range.start_timestamp)?;
    let end_ms = required_time("EndTimestamp", range.end_timestamp)?;
    if end_ms < start_ms {
        return Err(KvsError::invalid_argument(
            "EndTimestamp must not be earlier than StartTimestamp",
        ));
    }
    Ok(Query {
        selector: selector_type,
        start_ms,
        end_ms,
        after: None,
    })
}

fn fragment_json(stream: &StreamState, f: &StoredFragment) -> Value {
    // The KVS-style fragment number of the ground truth (index i is record i, since every
    // published fragment gets the next index).
    let number = usize::try_from(f.index)
        .ok()
        .and_then(|i| stream.ground_truth.get(i))
        .filter(|r| r.index == f.index)
        .or_else(|| stream.ground_truth.iter().find(|r| r.index == f.index))
        .map_or_else(|| f.index.to_string(), |r| r.fragment_number.clone());
    json!({
        "FragmentNumber": number,
        "FragmentSizeInBytes": f.media.len(),
        "ProducerTimestamp": epoch_seconds(to_millis(f.producer_start)),
        "ServerTimestamp": epoch_seconds(to_millis(f.server_start)),
        "FragmentLengthInMilliseconds": u64::try_from(f.duration.as_millis()).unwrap_or(u64::MAX),
    })
}

pub(crate) async fn list_fragments(
    AxState(state): AxState<Arc<State>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    respond(&state, "ListFragments", &headers, || {
        let input: ListFragmentsInput = parse_json(&body)?;
        let name = resolve_stream(
            &state,
            input.stream_name.as_deref(),
            input.stream_arn.as_deref(),
        )?;
        let max = input.max_results.unwrap_or(DEFAULT_MAX_RESULTS);
        if !(1..=MAX_RESULTS).contains(&max) {
            return Err(KvsError::invalid_argument(format!(
                "MaxResults {max} is out of range: it must be between 1 and {MAX_RESULTS}"
            )));
        }
        let page = usize::try_from(max).unwrap_or(100);
        let query = match (input.next_token.as_deref(), input.fragment_selector) {
            (Some(token), _) => Query::decode(token)
                .ok_or_else(|| KvsError::invalid_argument("The NextToken is not valid"))?,
            (None, Some(selector)) => query_from_selector(selector)?,
            (None, None) => {
                return Err(KvsError::invalid_argument(
                    "FragmentSelector must be specified when no NextToken is given",
                ));
            }
        };
        let streams = state.streams.lock();
        let stream = streams
            .get(&name)
            .ok_or_else(|| KvsError::stream_not_found(&name))?;
        if stream.faults.throttled() {
            return Err(KvsError::throttled());
        }
        if stream.faults.server_errors() {
            return Err(KvsError::internal());
        }
        if stream.info.status != StreamStatus::Active {
            return Err(KvsError::not_found(format!(
                "The stream {} is not ACTIVE (status {})",
                stream.info.name,
                stream.info.status.as_str()
            )));
        }
        let mut matching = stream.fragments.iter().filter(|f| query.matches(f));
        let mut chosen: Vec<&Arc<StoredFragment>> = matching.by_ref().take(page).collect();
        let more = matching.next().is_some();
        let next = match (more, chosen.last()) {
            (true, Some(last)) => Some(
                Query {
                    after: Some(last.index),
                    ..query
                }
                .encode(),
            ),
            _ => None,
        };
        // "Results are in no specific order, even across pages": newest first within a page.
        chosen.reverse();
        let list: Vec<Value> = chosen.iter().map(|f| fragment_json(stream, f)).collect();
        drop(streams);
        let mut out = json!({ "Fragments": list });
        if let (Some(token), Some(map)) = (next, out.as_object_mut()) {
            map.insert("NextToken".to_owned(), json!(token));
        }
        Ok(json_response(out))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_match_the_model_pattern() {
        let q = Query {
            selector: Selector::Server,
            start_ms: 1_700_000_000_123,
            end_ms: 1_700_000_060_000,
            after: Some(42),
        };
        let token = q.encode();
        assert!(token.bytes().all(|b| b.is_ascii_alphanumeric()), "{token}");
        assert_eq!(Query::decode(&token), Some(q));
        let first = Query { after: None, ..q };
        assert_eq!(Query::decode(&first.encode()), Some(first));
        assert_eq!(Query::decode("kvsemulfzz"), None);
        assert_eq!(Query::decode("nope"), None);
    }
}
