//! Cost of secret redaction, which every error message and URL-bearing log line of the crate
//! passes through: text without secrets (the common case, borrowed without allocation) beside
//! text with a KVS session URL and an RTSP URL with a password, in the same run.
//!
//! `cargo bench --bench redaction`

use criterion::{Criterion, criterion_group, criterion_main};
use kvs_frames::redact::redact_text;
use std::hint::black_box;

fn bench(c: &mut Criterion) {
    let clean = "fragment 1234 of stream front-entrance fetched in 35 ms (1.2 MB), \
                 playlist has 5 fragments, newest ends at 2026-11-21T10:00:02.000Z";
    let secret = "GET https://b-1234abcd.kinesisvideo.us-east-1.amazonaws.com/hls/v1/getMP4MediaFragment.mp4?\
                  FragmentNumber=12&SessionToken=CiAab%2Bcd%2Fef%3D0123456789abcdefghijklmnopqrstuvwxyz~&TrackNumber=1 \
                  failed; camera rtsp://admin:hunter2@10.0.0.5:554/stream1";
    let mut group = c.benchmark_group("redact_text");
    group.bench_function("no_secret", |b| {
        b.iter(|| redact_text(black_box(clean)).len())
    });
    group.bench_function("token_and_password", |b| {
        b.iter(|| redact_text(black_box(secret)).len())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
