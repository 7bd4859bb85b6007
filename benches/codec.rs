//! Micro-benchmarks of the per-task CPU work that does not touch the network: decoding and
//! encoding a typical Celery message (kombu envelope, base64 body, protocol v2 headers), a
//! result record, and Celery's back-off computation. `cargo bench` runs them.
//!
//! Speed figures for the whole system come from `celeriac bench` (see docs/BENCHMARKS.md);
//! these show where the codec stands and catch regressions in it.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use celeriac::protocol::{Envelope, Message, ResultMeta, State, TaskBody};
use celeriac::retry::exponential_backoff_interval;
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../../tests/fixtures/messages/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn event_fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{}/../../tests/fixtures/events/{name}.json", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

fn codec(c: &mut Criterion) {
    let raw = fixture("add_basic");
    c.bench_function("decode envelope + headers + body (add_basic, Celery 5.7.0)", |b| {
        b.iter(|| {
            let m = Message::from_wire(black_box(&raw)).unwrap();
            let body: TaskBody = m.task_body().unwrap();
            black_box((m, body))
        })
    });
    c.bench_function("decode envelope + headers only (add_basic)", |b| {
        b.iter(|| black_box(Message::from_wire(black_box(&raw)).unwrap()))
    });
    let m = Message::from_wire(&raw).unwrap();
    c.bench_function("decode body only (add_basic)", |b| {
        b.iter(|| black_box(TaskBody::from_wire(black_box(&m.body)).unwrap()))
    });
    let chain = Message::from_wire(&fixture("chain3")).unwrap().body;
    c.bench_function("decode body with a chain of two signatures (chain3)", |b| {
        b.iter(|| black_box(TaskBody::from_wire(black_box(&chain)).unwrap()))
    });
    c.bench_function("encode message (add_basic)", |b| b.iter(|| black_box(black_box(&m).to_wire())));
    let heartbeat = event_fixture("worker-heartbeat");
    c.bench_function("decode event envelope (worker-heartbeat)", |b| {
        b.iter(|| black_box(Envelope::from_wire(black_box(&heartbeat)).unwrap()))
    });
    let event = Envelope::from_wire(&heartbeat).unwrap();
    c.bench_function("encode event envelope (worker-heartbeat)", |b| b.iter(|| black_box(black_box(&event).to_wire())));
    let meta = ResultMeta::new("43b5133a-2294-5777-b51f-443b61d1d4f9", State::Success, serde_json::json!(5));
    c.bench_function("encode result record", |b| b.iter(|| black_box(black_box(&meta).to_wire())));
    let stored = meta.to_wire();
    c.bench_function("decode result record", |b| {
        b.iter(|| black_box(ResultMeta::from_wire(black_box(&stored)).unwrap()))
    });
}

fn backoff(c: &mut Criterion) {
    let mut rng = rand::rng();
    c.bench_function("exponential back-off with full jitter (retries 0..12)", |b| {
        b.iter(|| {
            let mut total = 0u64;
            for r in 0..12 {
                total += exponential_backoff_interval(black_box(1), r, 600, true, &mut rng);
            }
            black_box(total)
        })
    });
}

criterion_group!(benches, codec, backoff);
criterion_main!(benches);
