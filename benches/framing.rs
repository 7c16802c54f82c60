//! Framing micro-benchmarks: the CPU cost of turning bytes into frames, on both sides of the proxy.
//!
//! * `request/pipeline=N/value=V`: `RequestParser::next` splitting a pipeline of `N` client
//!   `SET key:i <V bytes>` commands (RESP multibulk, as clients send them) into argument vectors.
//! * `reply/pipeline=N/value=V`: `ReplyScanner::scan` finding the ends of `N` bulk-string
//!   replies of `V` bytes (what `N` pipelined `GET`s return), and `reply/array=1000/value=V`
//!   finding the end of one 1000-element array of bulk strings (an `MGET` of 1000 keys).
//! * `redis_protocol/…`: the same inputs decoded by `redis_protocol::resp2::decode::decode_bytes_mut`,
//!   a full zero-copy RESP2 decoder, as a baseline.
//!
//! Throughput is in elements (commands, replies, or array elements), so criterion's time divided
//! by `N` is the cost per command. Only framing is timed: inputs that the code under test
//! consumes (`BytesMut`) are copied into reused buffers outside the timed region, in batches, so
//! memcpy and allocation of the input are excluded while the clock is read rarely. Arguments and
//! frames produced are dropped inside the timed region, as the proxy drops them after use.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use redis_protocol::resp2::decode::decode_bytes_mut;
use sidecache::protocol::{ReplyLimits, ReplyScanner, RequestLimits, RequestParser, encode};

const PIPELINES: [usize; 3] = [1, 16, 1000];
const VALUES: [(usize, &str); 2] = [(64, "64B"), (16 * 1024, "16KiB")];
const ARRAY_LEN: usize = 1000;

/// About this many input bytes are prepared per timed batch (bounded memory, few clock reads).
const BATCH_BYTES: usize = 1 << 20;
const MAX_BATCH: usize = 1024;

fn value(len: usize) -> Vec<u8> {
    (0..len).map(|i| b'a' + (i % 26) as u8).collect()
}

/// `n` pipelined `SET key:i value` commands, encoded as a client sends them.
fn set_pipeline(n: usize, value_len: usize) -> Vec<u8> {
    let value = value(value_len);
    let mut out = BytesMut::new();
    for i in 0..n {
        let key = format!("key:{i:06}");
        encode::command(&mut out, &[&b"SET"[..], key.as_bytes(), &value]);
    }
    out.to_vec()
}

fn put_bulk(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(format!("${}\r\n", value.len()).as_bytes());
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `n` bulk-string replies, as `n` pipelined `GET`s return them.
fn bulk_replies(n: usize, value_len: usize) -> Vec<u8> {
    let value = value(value_len);
    let mut out = Vec::new();
    for _ in 0..n {
        put_bulk(&mut out, &value);
    }
    out
}

/// One array reply of `n` bulk strings, as an `MGET` of `n` keys returns it.
fn array_reply(n: usize, value_len: usize) -> Vec<u8> {
    let value = value(value_len);
    let mut out = format!("*{n}\r\n").into_bytes();
    for _ in 0..n {
        put_bulk(&mut out, &value);
    }
    out
}

/// Runs `f` once per iteration on a fresh copy of `input`, timing only `f`. Copies are made in
/// batches into buffers kept in `pool`; a buffer that `f` consumed completely (and whose split-off
/// parts `f` dropped) reclaims its allocation, so setup is one memcpy per iteration.
fn time_on_copies(iters: u64, input: &[u8], pool: &mut Vec<BytesMut>, mut f: impl FnMut(&mut BytesMut)) -> Duration {
    let per_batch = (BATCH_BYTES / input.len()).clamp(1, MAX_BATCH) as u64;
    let mut total = Duration::ZERO;
    let mut left = iters;
    while left > 0 {
        let k = left.min(per_batch) as usize;
        if pool.len() < k {
            pool.resize_with(k, BytesMut::new);
        }
        for buf in &mut pool[..k] {
            buf.clear();
            buf.extend_from_slice(input);
        }
        let start = Instant::now();
        for buf in &mut pool[..k] {
            f(buf);
        }
        total += start.elapsed();
        left -= k as u64;
    }
    total
}

/// Parses every command of `buf` with sidecache's request parser; returns the argument count.
fn parse_requests(parser: &mut RequestParser, buf: &mut BytesMut, limits: &RequestLimits) -> usize {
    let mut args = 0;
    while let Some(cmd) = parser.next(buf, limits).expect("valid request") {
        args += black_box(cmd).len();
    }
    assert!(buf.is_empty(), "request pipeline not fully parsed");
    args
}

/// Finds the end of every reply in `input` with sidecache's reply scanner; returns the count.
fn scan_replies(scanner: &mut ReplyScanner, input: &[u8], limits: &ReplyLimits) -> usize {
    let mut off = 0;
    let mut replies = 0;
    while off < input.len() {
        let n = scanner.scan(&input[off..], limits).expect("valid reply").expect("complete reply");
        off += n;
        replies += 1;
    }
    replies
}

/// Decodes every frame of `buf` with `redis-protocol`; returns the frame count.
fn decode_all(buf: &mut BytesMut) -> usize {
    let mut frames = 0;
    while let Some((frame, _, _)) = decode_bytes_mut(buf).expect("valid RESP2") {
        black_box(frame);
        frames += 1;
    }
    assert!(buf.is_empty(), "input not fully decoded");
    frames
}

fn request(c: &mut Criterion) {
    let limits = RequestLimits::default();
    let mut group = c.benchmark_group("request");
    for n in PIPELINES {
        for (len, label) in VALUES {
            let input = set_pipeline(n, len);
            group.throughput(Throughput::Elements(n as u64));
            group.bench_with_input(
                BenchmarkId::from_parameter(format!("pipeline={n}/value={label}")),
                &input,
                |b, input| {
                    let mut parser = RequestParser::new();
                    let mut pool = Vec::new();
                    b.iter_custom(|iters| {
                        time_on_copies(iters, input, &mut pool, |buf| {
                            black_box(parse_requests(&mut parser, buf, &limits));
                        })
                    });
                },
            );
        }
    }
    group.finish();
}

/// The reply inputs: `(id, input, elements)`.
fn reply_inputs() -> Vec<(String, Vec<u8>, usize)> {
    let mut inputs = Vec::new();
    for n in PIPELINES {
        for (len, label) in VALUES {
            inputs.push((format!("pipeline={n}/value={label}"), bulk_replies(n, len), n));
        }
    }
    for (len, label) in VALUES {
        inputs.push((format!("array={ARRAY_LEN}/value={label}"), array_reply(ARRAY_LEN, len), ARRAY_LEN));
    }
    inputs
}

fn reply(c: &mut Criterion) {
    let limits = ReplyLimits::default();
    let mut group = c.benchmark_group("reply");
    for (id, input, elements) in reply_inputs() {
        let replies = if id.starts_with("array=") { 1 } else { elements };
        assert_eq!(scan_replies(&mut ReplyScanner::new(), &input, &limits), replies, "{id}");
        group.throughput(Throughput::Elements(elements as u64));
        group.bench_with_input(BenchmarkId::from_parameter(id), &input, |b, input| {
            let mut scanner = ReplyScanner::new();
            b.iter(|| scan_replies(&mut scanner, black_box(input), &limits));
        });
    }
    group.finish();
}

fn redis_protocol(c: &mut Criterion) {
    let mut group = c.benchmark_group("redis_protocol");
    let mut cases = Vec::new();
    for n in PIPELINES {
        for (len, label) in VALUES {
            cases.push((format!("request/pipeline={n}/value={label}"), set_pipeline(n, len), n));
        }
    }
    for (id, input, elements) in reply_inputs() {
        cases.push((format!("reply/{id}"), input, elements));
    }
    for (id, input, elements) in cases {
        group.throughput(Throughput::Elements(elements as u64));
        group.bench_with_input(BenchmarkId::from_parameter(id), &input, |b, input| {
            let mut pool = Vec::new();
            b.iter_custom(|iters| {
                time_on_copies(iters, input, &mut pool, |buf| {
                    black_box(decode_all(buf));
                })
            });
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    targets = request, reply, redis_protocol
}
criterion_main!(benches);
